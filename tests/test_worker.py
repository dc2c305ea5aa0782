"""The worker's decisions: done, retry with backoff, dead letters, and the log line — with a scripted sync."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

import pytest

from conftest import minimal_config, sample
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync import Outcome, PermanentSyncError
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq.api import ThreatQPermanentError, ThreatQUnavailable
from tq_mw_thehive.worker import BACKOFF_CAP_S, Worker, backoff_s
from tq_mw_thehive.services import Services
from tq_mw_thehive.state_postgres import PostgresURL


class ScriptedSync:
    """Answers each handle() with the next scripted result (an Outcome or an exception)."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls = 0

    def handle(self, item):
        self.calls += 1
        result = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(result, BaseException):
            raise result
        return result


@pytest.fixture
def make(tmp_path, state_db):
    """``make(*script, **sync)``: a worker whose sync answers ``script``, one event in its inbox."""
    return lambda *script, **sync: _make(tmp_path, state_db, *script, **sync)


def _make(tmp_path, state_db, *script, **sync):
    raw = minimal_config(sync=sync)
    if isinstance(state_db, PostgresURL):
        raw["state_db"] = state_db.conninfo
    cfg = config_mod.from_dict(raw, tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    scripted = ScriptedSync(*script)
    worker = Worker(Services(cfg, inbox), sync_factory=lambda: scripted, backoff_cap_s=0)
    payload = sample("th5-case-create.json")
    inbox.put(events.parse(payload), json.dumps(payload))
    return worker, inbox, scripted


def row(inbox):
    return inbox.db.execute("SELECT state, attempts, last_error FROM inbox").fetchone()


@pytest.mark.parametrize("attempts", range(1, 12))
def test_backoff_doubles_from_two_seconds_with_jitter_and_is_capped(attempts):
    ceiling = min(BACKOFF_CAP_S, 2.0 * 2 ** (attempts - 1))
    for _ in range(50):
        assert ceiling / 2 <= backoff_s(attempts) <= ceiling


def test_an_applied_event_is_done_and_logged_once(make, caplog):
    worker, inbox, _ = make(Outcome("synced", 142, ["events/1"]))
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.worker"):
        assert worker.run_once() is True
        assert worker.run_once() is False
    assert row(inbox)["state"] == "done"
    (line,) = [r.getMessage() for r in caplog.records]
    for part in ("audit=~2048112", "case=#142", "object=case:~8396848", "action=create",
                 "threatq=events/1", "outcome=synced", "attempts=1", "ms="):
        assert part in line


def test_unavailable_is_retried_until_max_attempts_then_dead(make):
    worker, inbox, scripted = make(ThreatQUnavailable("ThreatQ down"), max_attempts=3)
    for _ in range(10):
        worker.run_once()
    assert scripted.calls == 3
    found = row(inbox)
    assert found["state"] == "dead" and found["attempts"] == 3
    assert "ThreatQ down" in found["last_error"] and "gave up: 3 attempts" in found["last_error"]


def test_a_retry_waits_its_backoff(make):
    worker, inbox, scripted = make(ThreatQUnavailable("down"), Outcome("synced"))
    worker.backoff_cap_s = 60
    worker.run_once()
    found = inbox.db.execute("SELECT state, next_attempt_at FROM inbox").fetchone()
    assert found["state"] == "pending" and found["next_attempt_at"] >= time.time() + 0.9
    assert worker.run_once() is False  # not due yet
    assert scripted.calls == 1


def test_an_event_older_than_max_age_goes_dead_on_its_next_failure(make):
    worker, inbox, _ = make(ThreatQUnavailable("down"), max_age="1s")
    inbox.db.execute("UPDATE inbox SET received_at = received_at - 5")
    worker.run_once()
    assert row(inbox)["state"] == "dead" and "too old" in row(inbox)["last_error"]


@pytest.mark.parametrize("error", [ThreatQPermanentError("POST /api/events: type missing", status=400),
                                   PermanentSyncError("no incident object")])
def test_a_permanent_error_is_dead_at_once_with_its_text(make, error, caplog):
    worker, inbox, scripted = make(error)
    with caplog.at_level(logging.ERROR, logger="tq_mw_thehive.worker"):
        worker.run_once()
    assert scripted.calls == 1
    assert row(inbox)["state"] == "dead" and str(error) in row(inbox)["last_error"]
    assert "outcome=dead" in caplog.records[-1].getMessage()


def test_an_unexpected_error_is_retried_five_times_by_default_then_dead(make):
    worker, inbox, scripted = make(KeyError("bug"))
    assert worker.cfg.sync.max_unexpected_attempts == 5
    for _ in range(10):
        worker.run_once()
    assert scripted.calls == 5
    assert row(inbox)["state"] == "dead" and "KeyError" in row(inbox)["last_error"]
    assert "gave up: 5 attempts" in row(inbox)["last_error"]


def test_max_unexpected_attempts_is_configurable(make):
    worker, inbox, scripted = make(KeyError("bug"), max_unexpected_attempts=2)
    for _ in range(5):
        worker.run_once()
    assert scripted.calls == 2 and row(inbox)["state"] == "dead"


def test_max_unexpected_attempts_does_not_cut_outages_short(make):
    worker, inbox, scripted = make(ThreatQUnavailable("down"), max_unexpected_attempts=2)
    for _ in range(6):
        worker.run_once()
    assert scripted.calls == 6 and row(inbox)["state"] == "pending"  # an outage keeps max_attempts


def test_a_sync_that_cannot_be_built_dead_letters_soon(make):
    """The broken install the Quick start once met: every event failed importing the plugins."""
    worker, inbox, _ = make(Outcome("synced"))

    def broken():
        raise ModuleNotFoundError("No module named 'tq_mw_thehive.plugins'")

    worker.sync_factory = broken
    for _ in range(10):
        worker.run_once()
    found = row(inbox)
    assert found["state"] == "dead" and found["attempts"] == 5
    assert "ModuleNotFoundError: No module named 'tq_mw_thehive.plugins'" in found["last_error"]
    assert inbox.replay() == 1  # a dead letter stays replayable: nothing is lost


def test_an_unexpected_errors_traceback_is_logged_once_per_process(make, caplog):
    worker, inbox, scripted = make(KeyError("bug"))
    payload = sample("th5-observable-create-ip.json")
    inbox.put(events.parse(payload), json.dumps(payload))
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.worker"):
        for _ in range(10):
            worker.run_once()
    assert scripted.calls == 10  # both events, five attempts each
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unexpected error on inbox event" in tracebacks[0].getMessage()
    retries = [r.getMessage() for r in caplog.records if "outcome=retry" in r.getMessage()]
    assert len(retries) == 8 and all("KeyError: 'bug'" in line for line in retries)
    worker.sync_factory = lambda: ScriptedSync(ValueError("another bug"))
    worker._sync = None
    inbox.replay()
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.worker"):
        worker.run_once()
    assert len([r for r in caplog.records if r.exc_info]) == 2  # a different error: its own traceback


def test_a_dead_letter_replayed_is_processed_again(make):
    worker, inbox, scripted = make(PermanentSyncError("fix me"), Outcome("synced"))
    worker.run_once()
    assert inbox.replay() == 1
    worker.run_once()
    assert row(inbox)["state"] == "done" and scripted.calls == 2


def test_the_thread_drains_new_events_and_stops_cleanly(make):
    worker, inbox, scripted = make(Outcome("synced"))
    worker.idle_poll_s = 30  # only the wake-up can make it notice the second event quickly
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while row(inbox)["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        payload = sample("th5-case-update.json")
        inbox.put(events.parse(payload), json.dumps(payload))
        worker.wakeup.set()
        while scripted.calls < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        worker.stop(timeout=10)
    assert not worker._thread.is_alive()


def test_an_inbox_that_cannot_be_read_is_said_once_while_the_error_lasts(make, caplog):
    worker, inbox, _ = make(Outcome("synced"))
    polls = {"n": 0}

    def failing_claim(*_args, **_kwargs):
        polls["n"] += 1
        if polls["n"] == 6:
            worker.stopping.set()
        if polls["n"] <= 4:
            raise sqlite3.OperationalError("database is locked")
        return []

    inbox.claim_batch = failing_claim
    worker.idle_poll_s = 0
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.worker"):
        worker.run_forever()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["worker cannot read the inbox: database is locked", "worker reads the inbox again"]
