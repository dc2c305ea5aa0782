"""The lookups that waited for quota (table ``enrichment_deferred``), run when it returns.

A thread per gunicorn worker, one process at a time (a lock in ``meta``), takes the queue in
order (a case's observables, then ``monitor``'s re-checks; oldest first) and, for each lookup
the quota now allows, runs it (``Enricher.run_deferred``: the cache first, which costs no
quota) and hands the answer to ``Monitor.settle``, which writes its attributes to the ThreatQ
indicators with that value as the sync would have (and the write-back verdict tag follows).
The row goes only once that is done, so a crash redoes it, from the cache, at no quota: the
attributes land once. A plugin still over quota waits for the time the quota book gave; an
error is retried with a backoff, ``MAX_ATTEMPTS`` times, then dropped with a warning.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Set, Tuple

from tq_mw_thehive import logs, state

if TYPE_CHECKING:
    from tq_mw_thehive.enrichment.monitor import Monitor
    from tq_mw_thehive.enrichment.quota import QuotaBook
    from tq_mw_thehive.enrichment.runner import Enricher

log = logging.getLogger(__name__)
LOCK_KEY = "enrichment_deferred_lock"
LOCK_TTL_S = 300.0
POLL_S = 5.0
MAX_ATTEMPTS = 5
RETRY_S = 60.0


class Drainer:
    def __init__(self, enricher: "Enricher", quota: "QuotaBook", monitor: "Monitor", owner: str,
                 clock: Callable[[], float] = time.time, sleep_s: float = POLL_S) -> None:
        self.enricher = enricher
        self.quota = quota
        self.monitor = monitor
        self.owner = owner
        self.clock = clock
        self.sleep_s = sleep_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _lock(self, take: bool) -> bool:
        return state.meta_lease(self.quota, LOCK_KEY, self.owner, take, LOCK_TTL_S)

    def run_once(self) -> Dict[str, int]:
        """One pass over the due queue, if this process may; counts by what became of each lookup."""
        counts = {"applied": 0, "waiting": 0, "dropped": 0, "failed": 0, "changed": 0, "errors": 0}
        rows = self.quota.due()
        if not rows or not self._lock(True):
            return counts
        blocked: Set[Tuple[str, str]] = set()  # plugin and key over quota: the rest of theirs keeps its place
        try:
            for row in rows:
                if (row["plugin"], row["key_id"]) in blocked:
                    continue
                self._one(row, counts, blocked)
        finally:
            self._lock(False)
        return counts

    def _one(self, row: sqlite3.Row, counts: Dict[str, int], blocked: Set[Tuple[str, str]]) -> None:
        max_tlp = self.enricher.cfg.logs.max_tlp_values
        shown = logs.loggable(row["value"][:80], row["tlp"], max_tlp)
        info = self.enricher.registry.get(row["plugin"])
        before = (self.enricher.cache.latest(info.name, info.version, row["data_type"], row["value"])
                  if info is not None and row["origin"] == "monitor" else None)
        run = self.enricher.run_deferred(row, info)
        if run.status == "deferred":
            blocked.add((row["plugin"], row["key_id"]))
            self.quota.later(row["id"], run.retry_at or self.clock() + RETRY_S)
            counts["waiting"] += 1
            return
        if run.status == "skipped":
            log.info("enrichment %s %s value=%s dropped from the queue: %s", row["plugin"], row["data_type"], shown,
                     run.reason)
            self.quota.done(row["id"])
            counts["dropped"] += 1
            return
        if run.status == "error":
            self._failed(row, run.reason, shown, counts)
            return
        with logs.withholding(max_tlp) as withheld:
            withheld.add([row["value"]], row["tlp"])
            settled = self.monitor.settle(row["value"], row["data_type"], before, run, counts, shown,
                                          first=row["origin"] == "case")
        if not settled and row["origin"] == "case":  # ThreatQ down, or the indicator not written yet:
            self._failed(row, "ThreatQ down or no indicator with this value yet", shown, counts)  # from the cache
            return
        self.quota.done(row["id"])
        counts["applied"] += 1

    def _failed(self, row: sqlite3.Row, reason: str, shown: str, counts: Dict[str, int]) -> None:
        attempts = self.quota.later(row["id"], self.clock() + RETRY_S * 2 ** row["attempts"], reason)
        if attempts >= MAX_ATTEMPTS:
            log.warning("enrichment %s %s value=%s dropped from the queue after %d attempts: %s", row["plugin"],
                        row["data_type"], shown, attempts, reason)
            self.quota.done(row["id"])
            counts["dropped"] += 1
        else:
            counts["failed"] += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("enrichment queue round failed")
            self._stop.wait(self.sleep_s)

    def start(self) -> "Drainer":
        self._thread = threading.Thread(target=self._loop, name="tq-enrichment-queue", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
