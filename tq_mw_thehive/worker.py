"""The loop that drains the inbox into ThreatQ.

One worker thread runs in each gunicorn worker process (and ``tq-mw-thehive
worker`` runs one in the foreground). It claims an event under a lease, applies
it, and records the outcome: done; retry later with backoff when ThreatQ or
TheHive is unreachable (capped near a minute, so a short outage costs seconds);
dead when retrying cannot help (ThreatQ refused the data) or after
``sync.max_attempts`` / ``sync.max_age``; an unexpected error (a bug, an import
error) is no outage, so it is dead after ``sync.max_unexpected_attempts``. A killed process's event is claimed
again when its lease runs out. One log line per event says what happened.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import sqlite3
import threading
import time
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, Union

from tq_mw_thehive import errors, logs, metrics
from tq_mw_thehive.inbox import InboxItem
from tq_mw_thehive.sync import Outcome, Sync, carries_object, decoded
from tq_mw_thehive.thehive.model import Observable

if TYPE_CHECKING:
    from tq_mw_thehive.services import Services

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0
BACKOFF_FIRST_S = 2.0
BACKOFF_CAP_S = 60.0


def backoff_s(attempts: int, cap: float = BACKOFF_CAP_S) -> float:
    """Exponential backoff with full jitter in the upper half: 2, 4, 8, … capped at ``cap``."""
    ceiling = min(cap, BACKOFF_FIRST_S * 2 ** max(0, attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def observable_values(body: str) -> Tuple[List[str], Optional[str]]:
    """The observable values a stored event carries and their TLP, to withhold from its log lines.

    Read from the payload, not from the sync's result: a line about an event that fails halfway
    must not show them either. Unreadable TLP: None, which withholds (fail closed).
    """
    try:
        payload = decoded(body)
    except ValueError:
        return [], None
    if not isinstance(payload, dict):
        return [], None
    # The first is the one the sync reads (and so the TLP that counts).
    objects = [o for o in (payload.get("object"), payload.get("details")) if isinstance(o, dict) and o]
    values: List[Any] = []
    for obj in objects:
        attachment = obj.get("attachment") if isinstance(obj.get("attachment"), dict) else {}
        hashes = attachment.get("hashes")
        values += [obj.get("data"), attachment.get("name"), *(hashes if isinstance(hashes, list) else [])]
    try:
        tlp = Observable.from_thehive(objects[0]).tlp if objects else None
    except ValueError:  # ModelError: no observable, or one it cannot read
        tlp = None
    return [v for v in values if isinstance(v, str)], tlp


class Worker:
    def __init__(self, services: "Services", sync_factory: Optional[Callable[[], Sync]] = None,
                 name: Optional[str] = None, lease_s: Optional[float] = None, idle_poll_s: float = IDLE_POLL_S,
                 backoff_cap_s: float = BACKOFF_CAP_S) -> None:
        """``sync_factory``: what applies events (``services.sync`` unless a test gives another)."""
        cfg = self.cfg = services.cfg
        self.inbox = services.inbox
        self.sync_factory = sync_factory or services.sync
        self.owner = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s or cfg.sync.lease
        self.idle_poll_s = idle_poll_s
        self.backoff_cap_s = backoff_cap_s
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self._sync: Optional[Sync] = None
        self._thread: Optional[threading.Thread] = None
        self._tracebacks_shown = logs.Once()

    @property
    def sync(self) -> Sync:
        if self._sync is None:
            self._sync = self.sync_factory()
        return self._sync

    def run_once(self) -> bool:
        """Process the due events of one case (up to ``sync.batch_max``) if there are any; True
        if something was processed."""
        items = self.inbox.claim_batch(self.owner, self.lease_s, self.cfg.sync.batch_max)
        if not items:
            return False
        self._process(items)
        return True

    def _keep_leases(self, items: List[InboxItem], finished: threading.Event) -> None:
        """Extend the leases while the events are applied, so a slow batch is not taken over while we live."""
        while not finished.wait(self.lease_s / 3):
            for item in items:
                try:
                    if not self.inbox.extend(item.id, self.owner, self.lease_s):
                        log.warning("inbox event %s: lease lost while it was being applied", item.id)
                        return
                except sqlite3.Error as exc:  # try again at the next beat, well within the lease
                    log.warning("inbox event %s: lease not extended: %s", item.id, exc)

    def _process(self, items: List[InboxItem]) -> None:
        started = time.monotonic()
        finished = threading.Event()
        heartbeat = threading.Thread(target=self._keep_leases, args=(items, finished), name="tq-lease", daemon=True)
        heartbeat.start()
        try:
            with logs.withholding(self.cfg.logs.max_tlp_values) as withheld:
                for item in items:
                    withheld.add(*observable_values(item.body))
                if len(items) == 1:
                    self._apply(items[0], started)
                else:
                    self._apply_batch(items, started)
        finally:
            finished.set()
            heartbeat.join()

    def _apply(self, item: InboxItem, started: float) -> None:
        try:
            outcome: Union[Outcome, Exception] = self._handle(item)
        except Exception as exc:
            outcome = exc
        self._record(item, outcome, started)

    def _apply_batch(self, items: List[InboxItem], started: float) -> None:
        """Several events of one case (``sync_batch``): each recorded with its own outcome and
        log line; those after a failure are given back, unapplied, to follow its retry."""
        try:
            sync = self.sync
            batched = getattr(sync, "handle_batch", None)   # a stand-in sync may take one at a time
            results = batched(items) if batched else [sync.handle(items[0])] + [None] * (len(items) - 1)
        except Exception as exc:  # building the sync failed, or the one event applied: it carries it
            results = [exc] + [None] * (len(items) - 1)
        untouched = [item for item, result in zip(items, results) if result is None]
        for item, result in zip(items, results):
            if result is not None:
                self._record(item, result, started)
        if untouched:
            self.inbox.give_back(untouched, self.owner)

    def _record(self, item: InboxItem, outcome: Union[Outcome, Exception], started: float) -> None:
        if isinstance(outcome, Exception):
            kind, error = errors.classify(outcome), f"{type(outcome).__name__}: {outcome}"
            if kind == errors.TRANSIENT:
                self._retry_or_dead(item, error, started, unexpected=False)
            elif kind == errors.PERMANENT:
                self._dead(item, error, started)
            else:  # a bug: keep the event, say what happened, stop after a few tries
                self._traceback_once(item, outcome)
                self._retry_or_dead(item, error, started, unexpected=True)
        elif self.inbox.done(item.id, self.owner):
            self._log(item, outcome.result, started, outcome)
        else:
            self._log(item, "lease_lost", started, outcome, level=logging.WARNING)

    def _handle(self, item: InboxItem) -> Outcome:
        """Apply ``item``; when later changes of the same object are already queued, apply its
        latest state instead: one write to ThreatQ for several events (they then find it done)."""
        latest = self.inbox.latest_state(item)
        if latest is None or not carries_object(latest["body"]):
            return self.sync.handle(item)
        logs.withhold(*observable_values(latest["body"]))
        outcome = self.sync.handle(replace(item, body=latest["body"]))
        outcome.note(f"applied the state of inbox event {latest['id']} (queued behind it)")
        return outcome

    def _traceback_once(self, item: InboxItem, exc: Exception) -> None:
        """Log an unexpected error's traceback the first time this process meets it.

        The same bug fails every event and every retry the same way: its traceback once is
        what an operator needs; the per-event line then carries the one-line reason.
        """
        frames = traceback.extract_tb(exc.__traceback__)
        where = (frames[-1].filename, frames[-1].lineno) if frames else ("", 0)
        signature = (type(exc).__name__, *where)
        if not self._tracebacks_shown.first(signature):
            return
        log.error("unexpected error on inbox event %s (traceback shown once per process; later events "
                  "failing at the same place log only their reason)", item.id, exc_info=exc)

    def _retry_or_dead(self, item: InboxItem, error: str, started: float, unexpected: bool) -> None:
        limit = self.cfg.sync.max_unexpected_attempts if unexpected else self.cfg.sync.max_attempts
        too_old = self.inbox.clock() - item.age_from > self.cfg.sync.max_age  # a replay restarts the age
        if item.attempts >= limit or too_old:
            why = "too old" if too_old else f"{item.attempts} attempts"
            self._dead(item, f"{error} (gave up: {why})", started)
            return
        delay = backoff_s(item.attempts, self.backoff_cap_s)
        self.inbox.retry(item.id, self.owner, error, delay)
        self._log(item, "retry", started, error=error, extra=f" retry_in_s={delay:.1f}", level=logging.WARNING)

    def _dead(self, item: InboxItem, error: str, started: float) -> None:
        self.inbox.dead(item.id, self.owner, error)
        self._log(item, "dead", started, error=error, level=logging.ERROR)

    def _log(self, item: InboxItem, result: str, started: float, outcome: Optional[Outcome] = None,
             error: str = "", extra: str = "", level: int = logging.INFO) -> None:
        metrics.event_processed(result)  # every attempt's outcome goes through here, once
        case = f"#{outcome.case_number}" if outcome and outcome.case_number is not None else "-"
        threatq = ",".join(outcome.threatq) if outcome and outcome.threatq else "-"
        detail = outcome.detail if outcome else error
        log.log(level, "sync audit=%s case=%s object=%s:%s action=%s threatq=%s outcome=%s attempts=%d "
                "ms=%.1f%s%s", item.audit_id or "-", case, item.object_type, item.object_id or "-", item.action,
                threatq, result, item.attempts, (time.monotonic() - started) * 1000, extra,
                f" detail={detail!r}" if detail else "")

    def run_forever(self) -> None:
        """Drain until ``stop``; an event in progress is finished first."""
        failing = ""  # said once until it changes or ends, not at every poll
        while not self.stopping.is_set():
            try:
                busy = self.run_once()
                if failing:
                    log.info("worker reads the inbox again")
                    failing = ""
            except sqlite3.Error as exc:  # the state database is locked or full: wait, then go on
                if str(exc) != failing:
                    log.warning("worker cannot read the inbox: %s", exc)
                    failing = str(exc)
                busy = False
            if not busy:
                self.wakeup.wait(self.idle_poll_s)
                self.wakeup.clear()

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self.run_forever, name="tq-sync-worker", daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Ask the loop to stop after the event in progress (safe from a signal handler)."""
        self.stopping.set()
        self.wakeup.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the event in progress; False when it was still running after ``timeout``
        (it is then abandoned to its lease)."""
        self.stopping.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
