"""The ``tq-mw-thehive`` command.

With no subcommand it behaves as the vendor guide's tool: configure if
``config.yaml`` is missing, then serve. The guide's flat flags (-c -ll -v -p -li
-ep -ds) are accepted before the subcommand and, for subcommands, after it too.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Union

import click

from tq_mw_thehive import __version__, configure, logs, server, startup, state
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.worker import Worker

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


def _config_option(fn: Callable) -> Callable:
    return click.option("-c", "--config", metavar="DIR",
                        help="Configuration directory (default: the current directory).")(fn)


def _logging_options(fn: Callable) -> Callable:
    fn = click.option("-v", "--verbosity", type=click.Choice(logs.VERBOSITY_CHOICES),
                      help="1 warnings, 2 info, 3 debug; stdout: log to the console "
                           "(the default without -ll).")(fn)
    return click.option("-ll", "--loglocation", metavar="DIR",
                        help=f"Write logs to DIR/{logs.LOG_FILE}.")(fn)


def _server_options(fn: Callable) -> Callable:
    for decorator in reversed((
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
    )):
        fn = decorator(fn)
    return fn


def _fail(exc: Union[Exception, str], exit_code: int) -> NoReturn:
    click.echo(f"tq-mw-thehive: error: {exc}", err=True)
    sys.exit(exit_code)


def _start(opts: Options, answers: Optional[configure.Answers]) -> None:
    """Configure when needed (or when ``answers`` asks for it), then serve."""
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity)
        if answers is not None or not config_mod.config_path(opts.config_dir).exists():
            configure.run(answers or configure.answers_from_env(os.environ), opts.config_dir,
                          listener_ip=opts.listen().ip, port=opts.listen().port,
                          disable_ssl=opts.disable_ssl, use_proxy=opts.external_proxy)
        cfg = startup.load_config(opts.config_dir, use_proxy=opts.external_proxy,
                                  disable_ssl=opts.disable_ssl)
        startup.prepare(cfg, disable_ssl=opts.disable_ssl)
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    except configure.ConfigureError as exc:
        _fail(exc, 2)
    server.serve(cfg, opts.listen())


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_config_option
@_logging_options
@_server_options
@click.version_option(__version__, "--version", prog_name="tq-mw-thehive")
@click.pass_context
def cli(ctx: click.Context, **given: Any) -> None:
    """Receive TheHive webhooks and push cases and observables into ThreatQ.

    Without a subcommand: run the configuration if config.yaml is missing, then
    serve POST /cases under gunicorn.
    """
    ctx.obj = Options().merged(**given)
    if ctx.invoked_subcommand is None:
        _start(ctx.obj, None)


def _answer_options(fn: Callable) -> Callable:
    for name, _, _, flag, env, help_text in reversed(configure.QUESTIONS):
        kwargs: dict = {"envvar": env, "show_envvar": True, "help": help_text}
        if name == "webhook_auth":
            kwargs["type"] = click.Choice(config_mod.WEBHOOK_AUTH_MODES)
        fn = click.option(flag, name, **kwargs)(fn)
    return fn


@cli.command("configure")
@_config_option
@_logging_options
@_server_options
@_answer_options
@click.option("--serve/--no-serve", default=False, help="Start serving when done.")
@click.option("--show-secrets", is_flag=True,
              help="Print the webhook secret in the TheHive setup even when stdout is not a terminal.")
@click.pass_obj
def configure_command(obj: Options, serve: bool, show_secrets: bool, **given: Any) -> None:
    """(Re-)run the configuration: ThreatQ credentials, TheHive, webhook secret.

    Answers not given as flags or TQ_MW_* variables are prompted for. The ThreatQ
    credentials are checked right after they are given (three tries on a terminal);
    the password is exchanged once for tokens and never stored. The webhook secret is
    printed only to a terminal, unless --show-secrets.
    """
    opts = obj.merged(**given)
    answers = configure.Answers(**{name: given[name] for name, *_ in configure.QUESTIONS})
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity)
        listen = opts.listen()
        configure.run(answers, opts.config_dir, listener_ip=listen.ip, port=listen.port,
                      disable_ssl=opts.disable_ssl, use_proxy=opts.external_proxy,
                      show_secrets=show_secrets or None)
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    except configure.ConfigureError as exc:
        _fail(exc, 2)
    if serve:
        _start(opts, None)  # config.yaml exists now: _start loads it and serves


def _status_counts(opts: Options) -> dict:
    cfg = _load(opts)
    try:
        inbox = Inbox(cfg.state_db)
        counts = inbox.stats()
        inbox.close()
    except sqlite3.Error as exc:
        _fail(f"state database {cfg.state_db}: {exc}", 1)
    return {**counts, "state_db": str(cfg.state_db)}


@cli.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def status_command(obj: Options, as_json: bool, **given: Any) -> None:
    """Show the inbox: pending (queued, in progress, waiting to retry), done, dead."""
    counts = _status_counts(obj.merged(**given))
    if as_json:
        click.echo(json.dumps(counts))
        return
    age = counts["oldest_pending_age_s"]
    click.echo(f"state database: {counts['state_db']}")
    click.echo(f"pending: {counts['pending']} (queued {counts['queued']}, in progress "
               f"{counts['in_progress']}, waiting to retry {counts['waiting_retry']})"
               + (f", oldest {age:.0f} s" if age is not None else ""))
    click.echo(f"done:    {counts['done']}")
    click.echo(f"dead:    {counts['dead']}")


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (config, database, logs).")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the inbox to drain.")
def demo_command(keep: bool, timeout: float) -> None:
    """Run the daemon against the ThreatQ simulator and show what a TheHive session becomes.

    Everything runs on loopback ports in a temporary directory; nothing needs configuring.
    """
    from tq_mw_thehive import demo

    try:
        sys.exit(demo.run(keep=keep, timeout=timeout))
    except demo.DemoError as exc:
        _fail(exc, 1)


@cli.command("worker")
@_config_option
@_logging_options
@click.option("-ep", "--external-proxy", is_flag=True, help="Reach ThreatQ through threatq.proxy.")
@click.option("-ds", "--disable-ssl", is_flag=True, help="Do not verify TLS certificates.")
@click.pass_obj
def worker_command(obj: Options, **given: Any) -> None:
    """Drain the inbox into ThreatQ in the foreground, without serving (until SIGTERM or Ctrl-C).

    The daemon already runs a worker in each gunicorn worker; this is for draining
    without the web endpoint, e.g. after `replay` while the service is stopped.
    """
    opts = obj.merged(**given)
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity)
        cfg = startup.load_config(opts.config_dir, use_proxy=opts.external_proxy,
                                  disable_ssl=opts.disable_ssl)
        startup.prepare(cfg, disable_ssl=opts.disable_ssl)
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    worker = Worker(cfg, Inbox(cfg.state_db))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop_soon())
    worker.run_forever()


REPLAY_BATCH = 500        # dead letters put back per transaction: short write locks, visible progress
REPLAY_WAIT_POLL_S = 1.0  # how often `replay --wait` looks at the inbox


@cli.command("replay")
@_config_option
@_logging_options
@click.option("--id", "ids", type=int, multiple=True, metavar="N",
              help="Replay only dead letter N (repeatable). Default: all dead letters.")
@click.option("--wait", is_flag=True,
              help="Then follow the replayed events until none is pending (the daemon or "
                   "`tq-mw-thehive worker` must be running); exit 1 if some are dead again.")
@click.pass_obj
def replay_command(obj: Options, ids: tuple, wait: bool, **given: Any) -> None:
    """Put dead letters back into the inbox, once the cause is fixed; a running daemon picks them up."""
    from tq_mw_thehive.progress import Progress

    opts = obj.merged(**given)
    tty = _progress_logging(opts)
    inbox = Inbox(_load(opts).state_db)
    targets = inbox.dead_ids(ids or None)
    dead = set(targets)
    missing = [i for i in ids if i not in dead]
    count = 0
    with Progress("replay", total=len(targets), interactive=tty) as shown:
        for start in range(0, len(targets), REPLAY_BATCH):
            count += inbox.replay(targets[start:start + REPLAY_BATCH])
            shown.update(count)
    click.echo(f"replayed {count} dead letter(s)")
    if missing:
        click.echo(f"not dead letters: {', '.join(map(str, missing))}", err=True)
    dead_again = _follow_replayed(inbox, targets, tty) if wait and targets else 0
    if missing or dead_again:
        sys.exit(1)


def _follow_replayed(inbox: Inbox, ids: List[int], tty: bool) -> int:
    """Show the replayed events leaving the inbox (pending going to zero); how many died again."""
    from tq_mw_thehive.progress import Progress

    with Progress("replay-wait", total=len(ids), interactive=tty) as shown:
        while True:
            counts = inbox.states_of(ids)
            pending = counts.get("pending", 0)
            shown.update(len(ids) - pending, pending=pending, synced=counts.get("done", 0),
                         dead=counts.get("dead", 0))
            if not pending:
                break
            time.sleep(REPLAY_WAIT_POLL_S)
    click.echo(f"synced {counts.get('done', 0)}, dead again {counts.get('dead', 0)}")
    if counts.get("dead"):
        click.echo("some replayed events are dead again: `tq-mw-thehive status` and the log say why", err=True)
    return counts.get("dead", 0)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@cli.command("purge")
@_config_option
@_logging_options
@click.option("--done-older-than", "older_than", metavar="DURATION",
              help="Delete done events finished more than this long ago (30d, 12h; 0: all of them). "
                   "Default: inbox.keep_done.")
@click.option("--dead", is_flag=True, help="Also delete every dead letter (otherwise kept until replayed).")
@click.option("--vacuum", is_flag=True,
              help="Then give the freed space back to the file system. With more than 100 MB free, or "
                   "a database created before this version, the file is rewritten: stop the daemon first.")
@click.pass_obj
def purge_command(obj: Options, older_than: Optional[str], dead: bool, vacuum: bool, **given: Any) -> None:
    """Delete done events older than inbox.keep_done (the daemon also does it hourly), and the
    dead letters with --dead. Pending events are never deleted.

    Deletes in small batches, one short transaction each, so it can run beside the daemon.
    """
    from tq_mw_thehive.inbox import PURGE_PAUSE_S, REWRITE_FREE_BYTES
    from tq_mw_thehive.progress import Progress

    seconds = config_mod.Duration.parse(older_than) if older_than is not None else None
    if older_than is not None and (seconds is None or seconds < 0):
        _fail(f"--done-older-than: not a duration: {older_than!r} (e.g. 30d, 12h; 0 for every done event)", 2)
    opts = obj.merged(**given)
    tty = _progress_logging(opts)
    cfg = _load(opts)
    if older_than is None:
        seconds = cfg.inbox.keep_done or None  # 0: keep done events forever
    inbox = Inbox(cfg.state_db)
    try:
        with Progress("purge", total=inbox.purgeable(seconds, dead), interactive=tty) as shown:
            deleted = inbox.purge(seconds, dead, pause_s=PURGE_PAUSE_S, progress=shown.update)
        # In place, step by step, while little is free; otherwise one rewrite (VACUUM), which is far
        # quicker for a long free list and is the only way to switch a file made before to that mode.
        rewrite = vacuum and (inbox.vacuum_mode() != "incremental" or inbox.free_bytes() > REWRITE_FREE_BYTES)
        released = (inbox.vacuum() if rewrite else inbox.release_free_pages()) if vacuum else 0
    except sqlite3.Error as exc:
        _fail(f"state database {cfg.state_db}: {exc}", 1)
    finally:
        inbox.close()
    done = (f"purged {deleted['done']} done event(s) finished more than {_duration_text(seconds)} ago"
            if seconds is not None else "purged no done event (inbox.keep_done is 0: give --done-older-than)")
    click.echo(done + (f", {deleted['dead']} dead letter(s)" if dead else ""))
    if vacuum:
        click.echo(f"released {released / 1e6:.1f} MB" + (" (the database was rewritten, in incremental "
                   "auto-vacuum mode: from now on the daemon gives freed space back by itself)" if rewrite else ""))


def _progress_logging(opts: Options) -> bool:
    """Logging for a long job; True when stderr is a terminal (progress as a bar, not log lines).

    Off a terminal, progress is log lines at info: shown unless ``-v 1`` asks for quiet.
    """
    tty = sys.stderr.isatty()
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity or ("2" if opts.log_dir or not tty else "1"))
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    return tty


def _config(opts: Options) -> config_mod.Config:
    """The validated configuration of ``-c``, or exit 2 saying what to do."""
    if not opts.config_dir.is_dir():
        _fail(f"configuration directory {opts.config_dir} does not exist: run "
              f"`tq-mw-thehive configure -c {opts.config_dir}` first", 2)
    try:
        return startup.load_config(opts.config_dir)
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)


def _open_state(cfg: config_mod.Config, *, create: bool = False) -> config_mod.Config:
    """``cfg`` once its state database is open and migrated.

    Commands that show or change what the daemon keeps (status, replay, cache, keys, watch,
    monitor) need the daemon's own database: a missing file means a wrong ``-c`` or a daemon
    never started, and an empty database made here would answer with zeros that look like
    facts. So they exit 2 naming the path; only ``create`` (plugins, enrich, backfill) makes one.
    """
    if not create and not cfg.state_db.exists():
        _fail(f"state database {cfg.state_db} does not exist: the daemon creates it at its first start "
              f"(`tq-mw-thehive -c {cfg.config_dir}`); check that -c names its configuration directory", 2)
    try:
        state.open_state(cfg.state_db).close()
    except state.StateError as exc:
        _fail(exc, 1)
    return cfg


def _load(opts: Options, *, create_state: bool = False) -> config_mod.Config:
    """Config and an opened (migrated) state database for the maintenance commands."""
    return _open_state(_config(opts), create=create_state)


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _table(rows: List[List[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@cli.command("plugins")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins_command(obj: Options, as_json: bool, **given: Any) -> None:
    """List every enrichment plugin: data types, flags, keys and state."""
    from tq_mw_thehive.enrichment.keys import KeyStore
    from tq_mw_thehive.enrichment.registry import Registry, plugin_state

    cfg = _load(obj.merged(**given), create_state=True)
    registry, keys = Registry.discover(cfg.enrichment.plugin_dirs), KeyStore(cfg.state_db)
    listing = [{"name": p.name, "state": plugin_state(p, cfg.enrichment, keys), "version": p.version,
                "data_types": list(p.data_types), "external": p.external, "active": p.active,
                "keys": {k: url for k, url in p.api_keys.items()}, "origin": p.origin,
                "description": p.description} for p in registry.plugins]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    rows = [["PLUGIN", "STATE", "TYPES", "EXTERNAL", "ACTIVE", "KEYS (sign-up)"]]
    for p in listing:
        rows.append([p["name"], p["state"], ",".join(p["data_types"]) or "-", "yes" if p["external"] else "no",
                     "yes" if p["active"] else "no",
                     ", ".join(f"{k} ({u})" for k, u in p["keys"].items()) or "-"])
    _table(rows)


def _group_options(ctx: click.Context, given: dict) -> None:
    """Options given after a group's name (`watch -c DIR list`) go into the Options its
    subcommands merge, so they work wherever they are written; the innermost one given wins."""
    ctx.obj = (ctx.obj or Options()).merged(**given)


@cli.group("cache")
@_config_option
@click.pass_context
def cache_group(ctx: click.Context, **given: Any) -> None:
    """The enrichment result cache."""
    _group_options(ctx, given)


@cache_group.command("stats")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def cache_stats_command(obj: Options, as_json: bool, **given: Any) -> None:
    """Entries, hits, misses, errors and mean plugin time per plugin."""
    from tq_mw_thehive.enrichment.cache import ResultCache

    stats = ResultCache(_load(obj.merged(**given)).state_db).stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    rows = [["PLUGIN", "ENTRIES", "EXPIRED", "HITS", "MISSES", "ERRORS", "HIT RATE", "MEAN MS"]]
    for r in stats:
        rows.append([r["plugin"], r["entries"], r["expired"], r["hits"], r["misses"], r["errors"],
                     "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}",
                     "-" if r["mean_lookup_ms"] is None else r["mean_lookup_ms"]])
    _table(rows) if stats else click.echo("the cache is empty")


@cache_group.command("clear")
@_config_option
@click.option("--plugin", help="Only this plugin's entries.")
@click.pass_obj
def cache_clear_command(obj: Options, plugin: Optional[str], **given: Any) -> None:
    """Forget cached results (all, or one plugin's)."""
    from tq_mw_thehive.enrichment.cache import ResultCache

    removed = ResultCache(_load(obj.merged(**given)).state_db).clear(plugin)
    click.echo(f"removed {removed} cached result(s)")


@cache_group.command("warm")
@_config_option
@_logging_options
@click.option("--plugin", help="Only this plugin.")
@click.pass_obj
def cache_warm_command(obj: Options, plugin: Optional[str], **given: Any) -> None:
    """Look up every known indicator value whose cached result is missing or expired.

    Known values: the watch list and the observables already synced (as their latest event
    in the inbox carries them). The TLP/PAP gate and the plugin states apply as in the daemon.
    """
    from tq_mw_thehive.enrichment.runner import Enricher
    from tq_mw_thehive import known_values
    from tq_mw_thehive.enrichment.warmup import Warmer
    from tq_mw_thehive.progress import Progress
    from tq_mw_thehive.type_mapping import TypeMapping

    opts = obj.merged(**given)
    tty = _progress_logging(opts)
    cfg = _config(opts)
    if not cfg.enrichment.enabled:
        _fail("enrichment.enabled is false: nothing to warm", 2)
    _open_state(cfg)
    enricher = Enricher.from_config(cfg)
    if plugin and plugin not in {p.name for p in enricher.registry.loaded()}:
        enricher.close()
        _fail(f"no loaded plugin {plugin!r} (see `tq-mw-thehive plugins`)", 2)
    try:
        values = known_values.collect(cfg.state_db, TypeMapping.from_config(cfg.sync), cfg.sync.indicator_status)
        with Progress("cache-warm", total=len(values), interactive=tty) as shown:
            counts = Warmer(enricher).run(values, only=plugin, progress=shown)
    finally:
        enricher.close()
    click.echo(f"cache warm: {len(values)} value(s); {counts['fetched']} fetched, {counts['not_found']} not found, "
               f"{counts['fresh']} already cached, {counts['skipped']} skipped, {counts['error']} error(s)")


@cli.group("keys")
@_config_option
@click.pass_context
def keys_group(ctx: click.Context, **given: Any) -> None:
    """The team's API keys for the plugins (kept in the state database, mode 0600)."""
    _group_options(ctx, given)


@keys_group.command("set")
@click.argument("name")
@_config_option
@click.pass_obj
def keys_set_command(obj: Options, name: str, **given: Any) -> None:
    """Store key NAME (one a loaded plugin uses): typed at a hidden prompt, or read from standard input."""
    from tq_mw_thehive.enrichment.keys import KeyStore, check_declared
    from tq_mw_thehive.enrichment.registry import Registry

    cfg = _load(obj.merged(**given))
    try:
        name = check_declared(name, Registry.discover(cfg.enrichment.plugin_dirs).loaded())
    except ValueError as exc:
        _fail(exc, 2)
    value = (click.prompt(f"{name}", hide_input=True) if sys.stdin.isatty()
             else sys.stdin.readline()).strip()
    try:
        KeyStore(cfg.state_db).set(name, value)
    except ValueError as exc:
        _fail(exc, 2)
    click.echo(f"stored {name}")


@keys_group.command("list")
@_config_option
@click.pass_obj
def keys_list_command(obj: Options, **given: Any) -> None:
    """Key names, masked values, when set (an environment variable overrides a stored key)."""
    from tq_mw_thehive.enrichment.keys import KeyStore

    listing = KeyStore(_load(obj.merged(**given)).state_db).listing()
    if not listing:
        click.echo("no keys")
        return
    _table([["NAME", "VALUE", "SET", "FROM"]] +
           [[k["name"], k["value"], _age(k["set_at"]), k["source"]] for k in listing])


@keys_group.command("delete")
@click.argument("name")
@_config_option
@click.pass_obj
def keys_delete_command(obj: Options, name: str, **given: Any) -> None:
    """Remove stored key NAME."""
    from tq_mw_thehive.enrichment.keys import KeyStore

    try:
        deleted = KeyStore(_load(obj.merged(**given)).state_db).delete(name)
    except ValueError as exc:
        _fail(exc, 2)
    if not deleted:
        _fail(f"no stored key {name.strip().upper()}", 1)
    click.echo(f"deleted {name.strip().upper()}")


_LEVELS = click.Choice(["WHITE", "CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"], case_sensitive=False)


@cli.command("enrich")
@click.argument("value")
@_config_option
@click.option("--type", "data_type", help="TheHive data type (default: guessed from the value).")
@click.option("--plugin", help="Only this plugin.")
@click.option("--tlp", type=_LEVELS, default="AMBER", show_default=True,
              help="TLP of the value: external plugins only see up to enrichment.max_tlp_external.")
@click.option("--pap", type=_LEVELS, default="AMBER", show_default=True, help="PAP of the value.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def enrich_command(obj: Options, value: str, data_type: Optional[str], plugin: Optional[str], tlp: str, pap: str,
                   as_json: bool, **given: Any) -> None:
    """Look VALUE up through the plugins, with the same gate and cache as the daemon."""
    from tq_mw_thehive.enrichment.monitor import guess_type
    from tq_mw_thehive.enrichment.runner import Enricher

    opts = obj.merged(**given)
    try:
        startup.setup_logging(None, "1")  # warnings only, redacted, on stderr
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    cfg = _load(opts, create_state=True)
    data_type = data_type or guess_type(value)
    enricher = Enricher.from_config(cfg)
    if plugin and not enricher.plugins_for(data_type, plugin):
        _fail(f"no loaded plugin {plugin!r} takes {data_type} values (see `tq-mw-thehive plugins`)", 2)
    runs = enricher.run(data_type, value, tlp.upper(), pap.upper(), only=plugin)
    enricher.close()
    if as_json:
        click.echo(json.dumps({"value": value, "type": data_type, "results": [
            {"plugin": r.plugin, "status": r.status, "verdict": r.verdict, "attributes": r.attributes,
             "data": r.data, "age_s": r.age_s, "reason": r.reason} for r in runs]}, indent=2, default=str))
        return
    click.echo(f"{value} ({data_type})")
    rows = [["PLUGIN", "VERDICT", "RESULT", "STATUS"]]
    for r in runs:
        shown = "; ".join(f"{k}: {v}" for k, v in r.attributes.items() if not k.endswith(" Verdict")) or "-"
        rows.append([r.plugin, r.verdict or "-", shown, r.describe()])
    _table(rows) if runs else click.echo(f"no plugin takes {data_type} values")


@cli.group("watch")
@_config_option
@click.pass_context
def watch_group(ctx: click.Context, **given: Any) -> None:
    """IOCs that `tq-mw-thehive monitor` re-checks on a schedule."""
    _group_options(ctx, given)


@watch_group.command("add")
@click.argument("value")
@_config_option
@click.option("--type", "data_type", help="TheHive data type (default: guessed from the value).")
@click.option("--interval", help="Re-check interval (90m, 6h, 1d; default enrichment.monitor_interval).")
@click.option("--tlp", type=_LEVELS, help="TLP of the value (a new watch: AMBER).")
@click.option("--pap", type=_LEVELS, help="PAP of the value (a new watch: AMBER).")
@click.pass_obj
def watch_add_command(obj: Options, value: str, data_type: Optional[str], interval: Optional[str], tlp: str,
                      pap: str, **given: Any) -> None:
    """Watch VALUE (checked against its data type); the next `monitor` pass checks it."""
    from tq_mw_thehive.config import Duration
    from tq_mw_thehive.enrichment.monitor import WatchList, check_value, guess_type, watchable_types
    from tq_mw_thehive.enrichment.registry import Registry
    from tq_mw_thehive.type_mapping import TypeMapping

    cfg = _load(obj.merged(**given))
    seconds = Duration.parse(interval) if interval else None
    if interval and not seconds:
        _fail(f"--interval: not a duration: {interval!r} (e.g. 90m, 6h, 1d)", 2)
    if data_type:
        known = watchable_types(TypeMapping.from_config(cfg.sync),
                                Registry.discover(cfg.enrichment.plugin_dirs).loaded())
        if data_type not in known:
            _fail(f"--type: unknown data type {data_type!r} (known: {', '.join(sorted(known))})", 2)
    guessed = data_type is None
    data_type = data_type or guess_type(value)
    try:
        check_value(data_type, value)
    except ValueError as exc:
        _fail(f"{exc}" + (" (guessed from the value; give --type if it is another type)" if guessed else ""), 2)
    new = WatchList(cfg.state_db).add(value, data_type, interval_s=seconds, tlp=tlp.upper() if tlp else None,
                                      pap=pap.upper() if pap else None,
                                      default_interval_s=cfg.enrichment.monitor_interval)
    click.echo(f"{'watching' if new else 'updated watch of'} {value} ({data_type})")


@watch_group.command("list")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def watch_list_command(obj: Options, as_json: bool, **given: Any) -> None:
    """The watch list, next due first."""
    from tq_mw_thehive.enrichment.monitor import WatchList

    listing = WatchList(_load(obj.merged(**given)).state_db).listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("nothing watched")
        return
    _table([["VALUE", "TYPE", "EVERY", "NEXT", "FROM", "TLP", "PAP"]] +
           [[w["value"], w["data_type"], f"{w['interval_s'] / 3600:g} h", _age(w["next_due"]), w["origin"],
             w["tlp"] or "-", w["pap"] or "-"] for w in listing])


@watch_group.command("rm")
@click.argument("value")
@_config_option
@click.option("--type", "data_type", help="Only the watch of this data type.")
@click.pass_obj
def watch_rm_command(obj: Options, value: str, data_type: Optional[str], **given: Any) -> None:
    """Stop watching VALUE."""
    from tq_mw_thehive.enrichment.monitor import WatchList

    removed = WatchList(_load(obj.merged(**given)).state_db).remove(value, data_type)
    if not removed:
        _fail(f"{value} is not watched", 1)
    click.echo(f"no longer watching {value}")


@cli.command("monitor")
@_config_option
@_logging_options
@click.option("--once", is_flag=True, help="One pass over the due watches, then exit (for a systemd timer).")
@click.pass_obj
def monitor_command(obj: Options, once: bool, **given: Any) -> None:
    """Re-run the plugins for due watches; push changed results to ThreatQ."""
    from tq_mw_thehive.enrichment.monitor import Monitor, WatchList
    from tq_mw_thehive.worker import build_sync

    opts = obj.merged(**given)
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity)
    except startup.StartupError as exc:
        _fail(exc, exc.exit_code)
    cfg = _config(opts)
    if not cfg.enrichment.enabled:
        _fail("enrichment.enabled is false: nothing to monitor", 2)
    sync = build_sync(_open_state(cfg))
    monitor = Monitor(sync.enricher, WatchList(cfg.state_db), sync.objects, sync.types)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    while True:
        counts = monitor.run_once()
        logging.getLogger("tq_mw_thehive.monitor").info(
            "monitor pass checked=%d changed=%d errors=%d", counts["checked"], counts["changed"], counts["errors"])
        if once or stopping.wait(60):
            break


def _parse_since(value: str) -> int:
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 date or time: {value!r} (e.g. 2026-11-20T08:00:00Z)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@cli.command("backfill")
@_config_option
@_logging_options
@click.option("--since", "since", metavar="ISO8601", help="Changes since this time (default: since the last run).")
@click.option("--all", "everything", is_flag=True, help="Every case TheHive holds.")
@click.pass_obj
def backfill_command(obj: Options, since: Optional[str], everything: bool, **given: Any) -> None:
    """Queue what TheHive changed while webhooks were missed; the running daemon syncs it.

    Reads cases and their observables from TheHive's API (paged, oldest change first) and
    puts them into the inbox like webhooks; re-running is harmless.
    """
    from tq_mw_thehive.backfill import Backfill, Marks, backfill_progress
    from tq_mw_thehive.progress import Progress
    from tq_mw_thehive.sync_state import SyncState
    from tq_mw_thehive.thehive.api import TheHiveClient, TheHiveError

    if since and everything:
        _fail("--since and --all exclude each other", 2)
    opts = obj.merged(**given)
    tty = _progress_logging(opts)
    cfg = _load(opts, create_state=True)
    if not cfg.thehive.api_key:
        _fail("thehive.api_key is not set: backfill reads TheHive's API", 2)
    since_ms = _parse_since(since) if since else None
    marks = Marks(cfg.state_db)
    if since_ms is None and not everything and marks.get() is None:
        _fail("no previous run to continue from: use --since ISO8601 or --all", 2)
    # TheHive's listing gives no total: progress counts cases read, without an ETA.
    shown = Progress("backfill", interactive=tty)
    try:
        result = Backfill(Inbox(cfg.state_db), TheHiveClient.from_config(cfg), marks, SyncState(cfg.state_db),
                          progress=backfill_progress(shown)).run(since_ms, everything)
    except TheHiveError as exc:
        shown.finish(stopped="yes")
        _fail(f"{exc} (what was queued stays queued; run backfill again to resume)", 1)
    shown.finish()
    click.echo(f"backfill: {result.cases} case(s), {result.observables} observable(s); {result.queued} queued, "
               f"{result.duplicates} already queued")


# Defined in their own modules; they take the same -c/-ll/-p/-li... options as the daemon.
from tq_mw_thehive.check import check_command  # noqa: E402
from tq_mw_thehive.thehive_setup import thehive_setup_command  # noqa: E402

cli.add_command(_server_options(_logging_options(_config_option(check_command))))
cli.add_command(_server_options(_config_option(thehive_setup_command)))


def main() -> None:
    cli(prog_name="tq-mw-thehive")
