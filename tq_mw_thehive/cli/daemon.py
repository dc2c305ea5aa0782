"""The daemon: the root command (with no subcommand, the vendor guide's tool: configure if
``config.yaml`` is missing, then serve) with the guide's flat flags, and ``worker``."""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

import click

from tq_mw_thehive import __version__, configure, server, startup
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.cli.common import Options, common_options, fail
from tq_mw_thehive.services import Services
from tq_mw_thehive.worker import Worker


def start(opts: Options, answers: Optional[configure.Answers]) -> None:
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
        fail(exc, exc.exit_code)
    except configure.ConfigureError as exc:
        fail(exc, 2)
    server.serve(cfg, opts.listen())


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@common_options("config", "logging", "server")
@click.version_option(__version__, "--version", prog_name="tq-mw-thehive")
@click.pass_context
def cli(ctx: click.Context, **given: Any) -> None:
    """Receive TheHive webhooks and push cases and observables into ThreatQ.

    Without a subcommand: run the configuration if config.yaml is missing, then
    serve POST /cases under gunicorn.
    """
    ctx.obj = Options().merged(**given)
    if ctx.invoked_subcommand is None:
        start(ctx.obj, None)


@click.command("worker")
@common_options("config", "logging")
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
        fail(exc, exc.exit_code)
    worker = Worker(Services(cfg))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop_soon())
    worker.run_forever()


COMMANDS = (worker_command,)
