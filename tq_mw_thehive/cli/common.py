"""What the commands share: ``Options`` (the guide's flat flags, wherever they are written), the
``common_options`` decorator that declares them, and the helpers that load the configuration and
the state database or exit saying what to do."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Union

import click

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, server, startup, state

DEFAULT_PORT = 5000
DEFAULT_LISTENER = "127.0.0.1"


@dataclass(frozen=True)
class Options:
    config: Optional[str] = None
    loglocation: Optional[str] = None
    verbosity: Optional[str] = None
    port: Optional[int] = None
    listener_ip: Optional[str] = None
    external_proxy: bool = False
    disable_ssl: bool = False
    workers: Optional[int] = None
    threads: Optional[int] = None
    graceful_timeout: Optional[int] = None

    def merged(self, **given: Any) -> "Options":
        """These options with the ones given after a subcommand's name taking precedence."""
        known = {f.name for f in fields(self)}
        changes = {k: v for k, v in given.items() if k in known and v is not None and v is not False}
        return replace(self, **changes)

    @property
    def config_dir(self) -> Path:
        return Path(self.config or ".")

    @property
    def log_dir(self) -> Optional[Path]:
        return Path(self.loglocation) if self.loglocation else None

    def listen(self) -> server.Listen:
        defaults = server.Listen()
        return server.Listen(ip=self.listener_ip or DEFAULT_LISTENER,
                             port=DEFAULT_PORT if self.port is None else self.port,
                             workers=self.workers or defaults.workers,
                             threads=self.threads or defaults.threads,
                             graceful_timeout_s=self.graceful_timeout or defaults.graceful_timeout_s)


# The options several commands take, by group, each group in the order the help lists it. Their
# values reach a command as keyword arguments (its ``**given``) and go into ``Options.merged``.
OPTION_GROUPS: Dict[str, Sequence[Callable]] = {
    "config": (
        click.option("-c", "--config", metavar="DIR",
                     help="Configuration directory (default: the current directory)."),
    ),
    "logging": (
        click.option("-ll", "--loglocation", metavar="DIR",
                     help=f"Write logs to DIR/{logs.LOG_FILE}."),
        click.option("-v", "--verbosity", type=click.Choice(logs.VERBOSITY_CHOICES),
                     help="1 warnings, 2 info, 3 debug; stdout: log to the console "
                          "(the default without -ll)."),
    ),
    "server": (
        click.option("-p", "--port", type=click.IntRange(0, 65535),
                     help=f"Listening port (default {DEFAULT_PORT}; 0 picks a free one)."),
        click.option("-li", "--listener-ip", metavar="IP",
                     help=f"Listening address (default {DEFAULT_LISTENER})."),
        click.option("-ep", "--external-proxy", is_flag=True,
                     help="Reach ThreatQ through threatq.proxy."),
        click.option("-ds", "--disable-ssl", is_flag=True,
                     help="Do not verify TLS certificates of ThreatQ and TheHive."),
        click.option("-w", "--workers", type=click.IntRange(1, 64),
                     help="gunicorn worker processes (default 2)."),
        click.option("--threads", type=click.IntRange(1, 256),
                     help="Threads per worker (default 4)."),
        click.option("--graceful-timeout", type=click.IntRange(1, 3600), metavar="SECONDS",
                     help="On SIGTERM, how long an event in progress may take to finish before it is "
                          "abandoned to its lease (default 30; keep it under systemd's TimeoutStopSec)."),
    ),
}


def common_options(*groups: str) -> Callable:
    """Give a command the shared options of ``groups`` ("config": -c; "logging": -ll -v; "server":
    -p -li -ep -ds -w --threads --graceful-timeout), the groups listed in the order named.

    On a command's function they are listed before the options decorated below. On a command
    defined elsewhere (``check``, ``thehive-setup``) they are appended after its own options, each
    group's options in reverse, as the help has always listed them there.
    """
    unknown = set(groups) - set(OPTION_GROUPS)
    if unknown:
        raise ValueError(f"unknown option groups: {', '.join(sorted(unknown))}")

    def decorate(fn: Any) -> Any:
        # click lists a function's options outermost first and appends to a built command.
        for group in (groups if isinstance(fn, click.Command) else reversed(groups)):
            for option in reversed(OPTION_GROUPS[group]):
                fn = option(fn)
        return fn

    return decorate


def group_options(ctx: click.Context, given: dict) -> None:
    """Options given after a group's name (`watch -c DIR list`) go into the Options its
    subcommands merge, so they work wherever they are written; the innermost one given wins."""
    ctx.obj = (ctx.obj or Options()).merged(**given)


def fail(exc: Union[Exception, str], exit_code: int) -> NoReturn:
    click.echo(f"tq-mw-thehive: error: {exc}", err=True)
    sys.exit(exit_code)


def progress_logging(opts: Options) -> bool:
    """Logging for a long job; True when stderr is a terminal (progress as a bar, not log lines).

    Off a terminal, progress is log lines at info: shown unless ``-v 1`` asks for quiet.
    """
    tty = sys.stderr.isatty()
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity or ("2" if opts.log_dir or not tty else "1"))
    except startup.StartupError as exc:
        fail(exc, exc.exit_code)
    return tty


def config_of(opts: Options) -> config_mod.Config:
    """The validated configuration of ``-c``, or exit 2 saying what to do."""
    if not opts.config_dir.is_dir():
        fail(f"configuration directory {opts.config_dir} does not exist: run "
             f"`tq-mw-thehive configure -c {opts.config_dir}` first", 2)
    try:
        return startup.load_config(opts.config_dir)
    except startup.StartupError as exc:
        fail(exc, exc.exit_code)


def open_state(cfg: config_mod.Config, *, create: bool = False) -> config_mod.Config:
    """``cfg`` once its state database is open and migrated.

    Commands that show or change what the daemon keeps (status, replay, cache, keys, watch,
    monitor) need the daemon's own database: a missing file means a wrong ``-c`` or a daemon
    never started, and an empty database made here would answer with zeros that look like
    facts. So they exit 2 naming the path; only ``create`` (plugins, enrich, backfill) makes one.
    """
    if not create and not state.is_shared(cfg.state_db) and not cfg.state_db.exists():
        fail(f"state database {cfg.state_db} does not exist: the daemon creates it at its first start "
             f"(`tq-mw-thehive -c {cfg.config_dir}`); check that -c names its configuration directory", 2)
    try:
        state.open_state(cfg.state_db).close()
    except state.StateError as exc:
        fail(exc, 1)
    return cfg


def load(opts: Options, *, create_state: bool = False) -> config_mod.Config:
    """Config and an opened (migrated) state database for the maintenance commands."""
    return open_state(config_of(opts), create=create_state)


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def table(rows: List[List[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
