"""The inbox: ``status``, ``replay``, ``purge`` and ``backfill``."""
from __future__ import annotations

import json
import sqlite3
import sys
import time
from typing import Any, List, Optional

import click

from tq_mw_thehive import cli as package  # REPLAY_BATCH, REPLAY_WAIT_POLL_S (see cli/__init__.py)
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.cli.common import Options, common_options, fail, load, progress_logging
from tq_mw_thehive.inbox import Inbox


def _status_counts(opts: Options) -> dict:
    cfg = load(opts)
    try:
        inbox = Inbox(cfg.state_db)
        counts = inbox.stats()
        inbox.close()
    except sqlite3.Error as exc:
        fail(f"state database {cfg.state_db}: {exc}", 1)
    return {**counts, "state_db": str(cfg.state_db)}


@click.command("status")
@common_options("config")
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


@click.command("replay")
@common_options("config", "logging")
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
    tty = progress_logging(opts)
    inbox = Inbox(load(opts).state_db)
    targets = inbox.dead_ids(ids or None)
    dead = set(targets)
    missing = [i for i in ids if i not in dead]
    count = 0
    batch = package.REPLAY_BATCH
    with Progress("replay", total=len(targets), interactive=tty) as shown:
        for start in range(0, len(targets), batch):
            count += inbox.replay(targets[start:start + batch])
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
            time.sleep(package.REPLAY_WAIT_POLL_S)
    click.echo(f"synced {counts.get('done', 0)}, dead again {counts.get('dead', 0)}")
    if counts.get("dead"):
        click.echo("some replayed events are dead again: `tq-mw-thehive status` and the log say why", err=True)
    return counts.get("dead", 0)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@click.command("purge")
@common_options("config", "logging")
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
        fail(f"--done-older-than: not a duration: {older_than!r} (e.g. 30d, 12h; 0 for every done event)", 2)
    opts = obj.merged(**given)
    tty = progress_logging(opts)
    cfg = load(opts)
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
        fail(f"state database {cfg.state_db}: {exc}", 1)
    finally:
        inbox.close()
    done = (f"purged {deleted['done']} done event(s) finished more than {_duration_text(seconds)} ago"
            if seconds is not None else "purged no done event (inbox.keep_done is 0: give --done-older-than)")
    click.echo(done + (f", {deleted['dead']} dead letter(s)" if dead else ""))
    if vacuum:
        click.echo(f"released {released / 1e6:.1f} MB" + (" (the database was rewritten, in incremental "
                   "auto-vacuum mode: from now on the daemon gives freed space back by itself)" if rewrite else ""))


def _parse_since(value: str) -> int:
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 date or time: {value!r} (e.g. 2026-11-20T08:00:00Z)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


@click.command("backfill")
@common_options("config", "logging")
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
    from tq_mw_thehive.services import Services
    from tq_mw_thehive.thehive.api import TheHiveError

    if since and everything:
        fail("--since and --all exclude each other", 2)
    opts = obj.merged(**given)
    tty = progress_logging(opts)
    cfg = load(opts, create_state=True)
    if not cfg.thehive.api_key:
        fail("thehive.api_key is not set: backfill reads TheHive's API", 2)
    since_ms = _parse_since(since) if since else None
    marks = Marks(cfg.state_db)
    if since_ms is None and not everything and marks.get() is None:
        fail("no previous run to continue from: use --since ISO8601 or --all", 2)
    # TheHive's listing gives no total: progress counts cases read, without an ETA.
    shown = Progress("backfill", interactive=tty)
    try:
        services = Services(cfg)
        result = Backfill(services.inbox, services.thehive(), marks, services.sync_state,
                          progress=backfill_progress(shown)).run(since_ms, everything)
    except TheHiveError as exc:
        shown.finish(stopped="yes")
        fail(f"{exc} (what was queued stays queued; run backfill again to resume)", 1)
    shown.finish()
    click.echo(f"backfill: {result.cases} case(s), {result.observables} observable(s); {result.queued} queued, "
               f"{result.duplicates} already queued")


COMMANDS = (status_command, replay_command, purge_command, backfill_command)
