"""Setting up: ``configure``, ``check``, ``thehive-setup`` and ``demo``."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import click

from tq_mw_thehive import check, configure, logs, startup
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.cli.common import Options, common_options, fail
from tq_mw_thehive.cli.daemon import start
from tq_mw_thehive.configure import ADMIN_KEY_VARIABLE, SECRET_MASK
from tq_mw_thehive.thehive.api import TheHiveClient
from tq_mw_thehive.thehive_setup import SetupError, register


def _answer_options(fn: Callable) -> Callable:
    for name, _, _, flag, env, help_text in reversed(configure.QUESTIONS):
        kwargs: dict = {"envvar": env, "show_envvar": True, "help": help_text}
        if name == "webhook_auth":
            kwargs["type"] = click.Choice(config_mod.WEBHOOK_AUTH_MODES)
        fn = click.option(flag, name, **kwargs)(fn)
    return fn


@click.command("configure")
@common_options("config", "logging", "server")
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
        fail(exc, exc.exit_code)
    except configure.ConfigureError as exc:
        fail(exc, 2)
    if serve:
        start(opts, None)  # config.yaml exists now: start loads it and serves


@click.command("demo")
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
        fail(exc, 1)


@common_options("config", "logging", "server")   # on the command: listed after its own options
@click.command("check")
@click.option("--webhook-url", metavar="URL",
              help="Post the self-test here instead of to the -li/-p listener (e.g. through a reverse proxy).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
@click.pass_obj
def check_command(obj: Any, webhook_url: Optional[str], as_json: bool, **given: Any) -> None:
    """Check the config, ThreatQ, TheHive, the state database, the log directory and the webhook.

    Give it the daemon's own flags (-c, -ll, -p, -li, -ep, -ds): the webhook check posts a
    self-test event to the running daemon and removes it again. Exit code 1 when a check fails.
    """
    opts = obj.merged(**given)
    # The check's lines are the report: library log lines would repeat them (and could go to
    # the daemon's log file), so they are shown only with -v 3, on stderr, redacted.
    logs.setup(None, "3" if opts.verbosity == "3" else "1")
    if opts.verbosity != "3":
        logging.getLogger().setLevel(logging.CRITICAL)
    listen = opts.listen()
    ctx = check.Context(config_dir=opts.config_dir, log_dir=opts.log_dir,
                  webhook_url=webhook_url or check.listener_url(listen.ip, listen.port),
                  use_proxy=opts.external_proxy, disable_ssl=opts.disable_ssl)
    results = check.run_checks(ctx)
    failed = [r for r in results if not r.ok]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        for line in check.render(results, check.marks_for(sys.stdout)):
            click.echo(line)
        click.echo(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


@common_options("config", "server")
@click.command("thehive-setup")
@click.option("--thehive-version", type=click.Choice(["4", "5"]), required=True,
              help="4: print the endpoint and register the notification through the API; "
                   "5: print what to enter in TheHive's UI (TheHive 5 has no API for it).")
@click.option("--webhook-url", metavar="URL",
              help="The URL TheHive posts to (default: from -li/-p, as `configure` prints it).")
@click.option("--api-key", envvar=ADMIN_KEY_VARIABLE, show_envvar=True,
              help="TheHive 4: an org admin's API key for the PUT (default thehive.api_key; "
                   "prefer the variable).")
@click.option("-y", "--yes", is_flag=True, help="TheHive 4: send without asking.")
@click.option("--mask-secrets", is_flag=True,
              help=f"Print the webhook token/password as {SECRET_MASK} (e.g. on a shared screen).")
@click.pass_obj
def thehive_setup_command(obj: Any, thehive_version: str, webhook_url: Optional[str], api_key: Optional[str],
                          yes: bool, mask_secrets: bool, **given: Any) -> None:
    """Make TheHive call this daemon: the endpoint (filled in) and, for TheHive 4, the notification.

    The endpoint block holds the webhook secret, filled in so that it can be pasted as is
    (--mask-secrets hides it); it goes to this terminal only, never to a log.
    """
    opts = obj.merged(**given)
    try:
        startup.setup_logging(None, "1")
        cfg = startup.load_config(opts.config_dir, disable_ssl=opts.disable_ssl)
    except startup.StartupError as exc:
        click.echo(f"tq-mw-thehive: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    listen = opts.listen()
    url = webhook_url or configure.webhook_url(listen.ip, listen.port)
    show = not mask_secrets
    if urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Note: TheHive must reach {url}; a loopback address works only when TheHive runs on "
                   "this host (otherwise pass -li or --webhook-url).\n")
    if thehive_version == "5":
        click.echo(configure.thehive5_endpoint(cfg, url, show))
        click.echo("TheHive 5 has no API for this: enter these values in its UI, then run "
                   f"`tq-mw-thehive check -c {opts.config_dir}`.")
        return
    click.echo("1. Add this endpoint to /etc/thehive/application.conf (every TheHive node) and "
               "restart TheHive:\n")
    click.echo(configure.thehive4_endpoint(cfg, url, show))
    click.echo("2. Enable the notification for the organisation.\n")
    key = api_key or cfg.thehive.api_key
    if not key:
        click.echo("tq-mw-thehive: error: no TheHive API key: set thehive.api_key or pass an org admin's "
                   f"key with {ADMIN_KEY_VARIABLE}", err=True)
        sys.exit(2)
    logs.add_secrets([key])
    client = TheHiveClient(cfg.thehive.url, key, organisation=cfg.thehive.organisation,
                           verify=cfg.thehive.verify_ssl, attempts=2, max_wait_s=1.0)
    try:
        registered = register(client, yes)
    except SetupError as exc:
        click.echo(f"tq-mw-thehive: error: {exc}", err=True)
        sys.exit(1)
    if not registered:
        sys.exit(1)


COMMANDS = (configure_command, demo_command, check_command, thehive_setup_command)
