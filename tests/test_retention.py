"""Issue 13, items 5 and 7: a replay is a fresh start; months of traffic stay cheap and bounded.

Retention deletes only done events older than ``inbox.keep_done``, in small batches, one process
per interval; the counts by state survive an upgrade of an existing database; the file gives its
free pages back (new databases) or can be converted once (``Inbox.vacuum``).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import FakeClock, minimal_config, sample
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state, web
from tq_mw_thehive.inbox import Inbox, Retention
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq.api import ThreatQUnavailable
from tq_mw_thehive.worker import Worker
from tq_mw_thehive.services import Services

DAY = 86400.0
T0 = 1_760_000_000.0



class Failing:
    calls = 0

    def handle(self, item):
        self.calls += 1
        raise ThreatQUnavailable("ThreatQ down")


def event(i: int, body_pad: int = 0):
    payload = sample("th5-case-update.json")
    case = f"~81{i:05d}"
    payload.update({"_id": f"~ret-{i}", "objectId": case, "rootId": case, "_createdAt": 1_700_000_000_000 + i})
    if body_pad:
        payload["pad"] = "x" * body_pad
    return events.parse(payload), json.dumps(payload)


def fill(inbox: Inbox, n: int, outcome: str, body_pad: int = 0, first: int = 0) -> list:
    """``n`` events of their own cases, each claimed and finished: done, dead or waiting a year to retry."""
    ids = []
    for i in range(first, first + n):
        ids.append(inbox.put(*event(i, body_pad)).id)
        item = inbox.claim("w")
        assert item.id == ids[-1]
        assert {"done": lambda: inbox.done(item.id, "w"), "dead": lambda: inbox.dead(item.id, "w", "refused"),
                "waiting": lambda: inbox.retry(item.id, "w", "ThreatQ down", 365 * DAY)}[outcome]()
    return ids


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def inbox(tmp_path, clock):
    ib = Inbox.open(tmp_path / "state.db", clock=clock)
    yield ib
    ib.close()


# --- item 5: replay means a fresh start --------------------------------------------------------

def test_a_replayed_dead_letter_older_than_max_age_gets_the_full_retry_budget(tmp_path, clock):
    cfg = config_mod.from_dict(minimal_config(sync={"max_age": "48h", "max_attempts": 3}), tmp_path)
    inbox = Inbox.open(cfg.state_db, clock=clock)
    failing = Failing()
    worker = Worker(Services(cfg, inbox), sync_factory=lambda: failing, backoff_cap_s=0)
    (item_id,) = fill(inbox, 1, "dead")
    clock.now += 5 * DAY  # the cause is fixed days later, long after sync.max_age
    assert inbox.replay([item_id]) == 1

    for attempt in (1, 2):
        assert worker.run_once() is True
        found = inbox.get(item_id)
        assert (found["state"], found["attempts"]) == ("pending", attempt), found["last_error"]
    assert worker.run_once() is True
    found = inbox.get(item_id)
    assert found["state"] == "dead" and "gave up: 3 attempts" in found["last_error"]
    assert failing.calls == 3

    clock.now += 3 * DAY  # replayed again, then failing past max_age counted from the replay
    assert inbox.replay([item_id]) == 1
    clock.now += 2 * DAY + 1
    assert worker.run_once() is True
    assert "gave up: too old" in inbox.get(item_id)["last_error"]


# --- item 7: retention in the daemon -----------------------------------------------------------

def test_a_pass_deletes_only_done_events_older_than_keep_done_in_short_batches(inbox, clock):
    old_done = fill(inbox, 12, "done")
    dead = fill(inbox, 2, "dead", first=100)
    stuck = fill(inbox, 2, "waiting", first=200)
    clock.now += 31 * DAY
    recent = fill(inbox, 3, "done", first=300)
    pauses = []
    retention = Retention(inbox, keep_done_s=30 * DAY, batch=5, pause_s=0.05, sleep=pauses.append)

    assert retention.run_once()["done"] == 12
    assert pauses[:2] == [0.05, 0.05]  # batches of 5: 5, 5, 2, a pause after each full one
    remaining = {r["id"]: r["state"] for r in inbox.db.execute("SELECT id, state FROM inbox")}
    assert remaining == {**dict.fromkeys(dead, "dead"), **dict.fromkeys(stuck, "pending"),
                         **dict.fromkeys(recent, "done")}
    assert not set(old_done) & set(remaining)
    stats = inbox.stats()
    assert (stats["pending"], stats["done"], stats["dead"]) == (2, 3, 2)


def test_one_process_runs_a_pass_per_interval(tmp_path, clock):
    first = Inbox.open(tmp_path / "state.db", clock=clock)
    second = Inbox(tmp_path / "state.db", clock=clock)  # another gunicorn worker
    fill(first, 3, "done")
    clock.now += 31 * DAY
    a = Retention(first, keep_done_s=30 * DAY, interval_s=3600, sleep=lambda s: None)
    b = Retention(second, keep_done_s=30 * DAY, interval_s=3600, sleep=lambda s: None)
    assert a.run_once()["done"] == 3
    assert b.run_once() is None and a.run_once() is None  # claimed until the interval is over
    fill(first, 2, "done", first=10)
    clock.now += 31 * DAY
    assert b.run_once()["done"] == 2
    assert a.run_once() is None


def test_keep_done_zero_keeps_everything(inbox, clock):
    fill(inbox, 3, "done")
    clock.now += 365 * DAY
    assert Retention(inbox, keep_done_s=0).run_once() is None
    assert inbox.stats()["done"] == 3


def test_the_daemon_app_runs_retention_and_a_bare_app_does_not(tmp_path):
    cfg = config_mod.from_dict(minimal_config(inbox={"keep_done": "7d"}), tmp_path)
    inbox = Inbox.open(cfg.state_db)
    bare = web.create_app(Services(cfg, inbox))
    assert "retention" not in bare.extensions[web.EXTENSION]
    daemon = web.create_app(Services(cfg, inbox), on_queued=lambda: None, retention=True)
    retention = daemon.extensions[web.EXTENSION]["retention"]
    try:
        assert retention.keep_done_s == 7 * DAY and retention._thread.is_alive()
    finally:
        retention.stop()
    assert not retention._thread.is_alive()


def test_a_locked_database_stops_a_pass_with_a_warning_and_the_thread_goes_on(inbox, clock, caplog):
    fill(inbox, 2, "done")
    clock.now += 31 * DAY
    retention = Retention(inbox, keep_done_s=30 * DAY)
    calls = []

    def locked():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        retention._stop.set()  # the second pass ends the loop
        return None

    retention.run_once = locked
    retention._loop(0, 0)
    assert len(calls) == 2
    assert "retention pass stopped (the next one goes on): database is locked" in caplog.text


# --- item 7: an existing database is upgraded; space goes back to the file system ------------------

def create_like_before(path: Path, monkeypatch, rows: int, body_pad: int = 0) -> None:
    """A database as the versions before migration 7 made it: no counters, auto_vacuum none."""
    with monkeypatch.context() as patched:
        patched.setattr(state, "MIGRATIONS", [m for m in state.MIGRATIONS if m[0] < 7])
        patched.setattr(state, "_incremental_vacuum_mode", lambda db: None)
        old = Inbox.open(path)
        for i in range(rows):
            payload_event, body = event(i, body_pad)
            old.db.execute(
                "INSERT INTO inbox (dedup_key, received_at, order_ts, shape, audit_id, object_type, action, "
                "object_id, case_key, body, next_attempt_at, state, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?)", (payload_event.dedup_key, T0, i, payload_event.shape, payload_event.audit_id,
                                payload_event.object_type, payload_event.action, payload_event.object_id,
                                payload_event.case_key, body, T0, ("done", "dead", "pending")[i % 3], T0))
        old.close()


def test_an_existing_database_gets_its_counts_at_the_upgrade(tmp_path, monkeypatch):
    path = tmp_path / "state.db"
    create_like_before(path, monkeypatch, rows=10)
    upgraded = Inbox.open(path, clock=FakeClock(T0 + 10))
    stats = upgraded.stats()
    assert (stats["done"], stats["dead"], stats["pending"]) == (4, 3, 3)
    assert stats["oldest_pending_age_s"] == 10.0
    assert upgraded.vacuum_mode() == "none"  # untouched until purge --vacuum
    upgraded.close()


def test_new_databases_give_freed_pages_back_old_ones_once_converted(tmp_path, monkeypatch, clock):
    new = Inbox.open(tmp_path / "new.db", clock=clock)
    assert new.vacuum_mode() == "incremental"
    fill(new, 200, "done", body_pad=4000)
    clock.now += 31 * DAY
    assert new.purge(30 * DAY)["done"] == 200
    assert new.free_bytes() > 200 * 4000
    assert new.release_free_pages(budget_s=0) == 0  # a pass's budget bounds it
    assert new.release_free_pages() > 200 * 4000
    assert new.free_bytes() == 0

    old_path = tmp_path / "old.db"
    create_like_before(old_path, monkeypatch, rows=300, body_pad=4000)
    old = Inbox.open(old_path, clock=FakeClock(T0 + 31 * DAY))
    assert old.purge(30 * DAY)["done"] == 100
    assert old.release_free_pages() == 0  # pages are reused by new events, the file keeps its size
    assert old.vacuum() > 100 * 4000
    assert old.vacuum_mode() == "incremental"
    assert old.stats()["done"] == 0 and old.stats()["dead"] == 100  # the rewrite keeps every row
    old.close()
    new.close()


def test_a_pass_leaves_a_long_free_list_to_purge_vacuum(inbox, clock, monkeypatch):
    """Moving pages one by one costs milliseconds each with gigabytes free: the pass does not try."""
    fill(inbox, 50, "done", body_pad=4000)
    clock.now += 31 * DAY
    monkeypatch.setattr("tq_mw_thehive.inbox.REWRITE_FREE_BYTES", 1000)
    result = Retention(inbox, keep_done_s=30 * DAY, sleep=lambda s: None).run_once()
    assert result == {"done": 50, "released_bytes": 0}
    assert inbox.free_bytes() > 50 * 4000  # reused by new events, or given back by `purge --vacuum`
