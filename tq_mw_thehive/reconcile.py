"""The periodic sweep: find, while the daemon runs, what TheHive changed and no webhook brought.

TheHive sends each webhook once. One lost while the daemon is up (TheHive restarted, a network
cut, a proxy that dropped a request) used to be found only by the catch-up at the next start.
Every ``sync.reconcile_every`` one process (a slot claimed in ``meta``, and the catch-up's own
lock, so a sweep and a catch-up never run together) reads what changed since the catch-up mark,
through the catch-up's path (``backfill.Backfill``), and queues only the states that are not here
already: a state counts as here when the inbox holds an event of that object at least as new as
it, or the sync applied one (TheHive stamps an audit event after the change it records). What a
sweep found is counted in ``/metrics``, logged, and shown on the status page.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from tq_mw_thehive import metrics
from tq_mw_thehive.backfill import Backfill, BackfillResult, Marks, updated_ms
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive import state
from tq_mw_thehive.sync_state import SyncState

log = logging.getLogger(__name__)
NEXT_KEY = "reconcile_next_at"
LAST_KEY = "reconcile_last"
CHECK_S = 30.0        # how often each process looks whether a sweep is due (at most; half a short period)
LOCK_TTL_S = 3600.0   # the catch-up lock's lifetime: a process that dies holding it frees it by then


@dataclass
class Sweep:
    """One sweep, as ``/status`` shows it (stored as JSON in ``meta``)."""

    started_at: float
    seconds: float
    outcome: str            # "ok", "failed" or "first" (no mark yet: changes are followed from now on)
    cases: int = 0          # cases read from TheHive
    observables: int = 0    # observables read from TheHive
    found: int = 0          # states no webhook brought: queued
    known: int = 0          # states already received or applied
    error: Optional[str] = None


def covered_by(inbox: Inbox, sync_state: SyncState) -> Callable[[dict], bool]:
    """Whether TheHive's ``obj`` (a case or observable, as read from its API) is here already."""
    def covered(obj: dict) -> bool:
        changed = updated_ms(obj)
        applied = sync_state.applied_ts(obj["_id"])
        if applied is not None and applied >= changed:
            return True
        held = inbox.newest_order_ts(obj["_id"])
        return held is not None and held >= changed
    return covered


def last_sweep(inbox: Inbox) -> Optional[Sweep]:
    """The last sweep recorded in this database, or None."""
    row = inbox.db.execute("SELECT value FROM meta WHERE key = ?", (LAST_KEY,)).fetchone()
    if row is None:
        return None
    try:
        return Sweep(**json.loads(row["value"]))
    except (TypeError, ValueError):
        return None


class Reconciler:
    """Runs a sweep every ``every_s`` seconds in one of the daemon's processes (a thread in each
    gunicorn worker offers; the slot in ``meta`` says whose turn it is)."""

    def __init__(self, services, owner: str, on_queued: Callable[[], None], every_s: float,
                 check_s: Optional[float] = None, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.owner = owner
        self.on_queued = on_queued
        self.every_s = every_s
        self.check_s = check_s if check_s is not None else min(CHECK_S, max(every_s / 2, 0.5))
        self.clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _claim(self) -> bool:
        """Whether this process sweeps now. The first look of a daemon only sets the first sweep
        ``every_s`` ahead: at start the catch-up does that work."""
        now = self.clock()

        def claim(db) -> bool:
            state.exclusive(db, f"meta:{NEXT_KEY}")
            row = db.execute("SELECT value FROM meta WHERE key = ?", (NEXT_KEY,)).fetchone()
            due = row is not None and float(row["value"]) <= now
            if row is None or due:
                state.set_meta(db, NEXT_KEY, repr(now + self.every_s))
            return due

        return self.services.inbox.write(claim, durable=False)

    def run_once(self) -> Optional[Sweep]:
        """One sweep if one is due here and no catch-up runs; what it did, else None."""
        if self.every_s <= 0 or not self._claim():
            return None
        marks = Marks(self.services.cfg.state_db)
        if not marks.try_lock(self.owner, ttl_s=LOCK_TTL_S):
            log.info("reconcile skipped: a catch-up or backfill is running")
            return None
        started, clock_started = time.monotonic(), self.clock()
        try:
            if marks.get() is None:  # no catch-up ever ran here (sync.catch_up: false): follow from now
                marks.advance(int(clock_started * 1000))
                sweep = Sweep(clock_started, 0.0, "first")
            else:
                sweep = self._sweep(marks, started, clock_started)
        finally:
            try:
                marks.unlock(self.owner)
            except Exception:  # the lock expires by itself
                pass
        self._record(sweep)
        return sweep

    def _sweep(self, marks: Marks, started: float, clock_started: float) -> Sweep:
        from tq_mw_thehive.thehive.api import TheHiveError

        def progress(result: BackfillResult) -> None:
            if result.queued:
                self.on_queued()

        services = self.services
        backfill = Backfill(services.inbox, services.thehive(), marks, services.sync_state, progress=progress,
                            covered=covered_by(services.inbox, services.sync_state))
        try:
            result = backfill.run()
        except TheHiveError as exc:
            log.warning("reconcile failed (the next sweep reads again from the same mark): %s", exc)
            return Sweep(clock_started, time.monotonic() - started, "failed", error=str(exc))
        sweep = Sweep(clock_started, time.monotonic() - started, "ok", result.cases, result.observables,
                      result.queued, result.known)
        if sweep.found:
            log.warning("reconcile found=%d change(s) that no webhook brought (queued now); cases=%d "
                        "observables=%d known=%d ms=%.0f", sweep.found, sweep.cases, sweep.observables,
                        sweep.known, sweep.seconds * 1000)
        else:
            log.info("reconcile done found=0 cases=%d observables=%d known=%d ms=%.0f", sweep.cases,
                     sweep.observables, sweep.known, sweep.seconds * 1000)
        return sweep

    def _record(self, sweep: Sweep) -> None:
        metrics.reconcile_swept(sweep.outcome, sweep.found)
        self.services.inbox.write(lambda db: state.set_meta(db, LAST_KEY, json.dumps(asdict(sweep))), durable=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.run_once()
            except Exception:  # a busy or full database, a bug: the next look tries again
                log.exception("reconcile sweep failed")

    def start(self) -> "Reconciler":
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._loop, name="tq-reconcile", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
