"""Catch-up: read what TheHive changed while no webhook reached us, and queue it like a webhook.

TheHive never re-sends a webhook, so after downtime the daemon asks TheHive's API v1 for
the cases (and their observables) created or updated since the last successful run, in
``_updatedAt`` order, page by page, and puts each into the inbox as a synthetic audit
event. From there it takes the normal sync path: the same mapping, the same exactly-once
effect, and the sync's time-order check keeps a late, older state from overwriting a
newer one. The mark moves only when a run completes, to the newest change it read: where
TheHive sorts the objects that were never updated (no ``_updatedAt``) is not documented
(first or last), so the order of a listing proves nothing about what a run cut short has not
read yet. A TheHive that fails mid-run leaves the mark where it was; the next run reads again
from it (what was queued is recognised as a duplicate). Memory stays flat: one page of cases
and one page of observables at a time.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from tq_mw_thehive import state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.progress import Progress
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive import events

log = logging.getLogger(__name__)
MARK_KEY = "catch_up_mark_ms"
LOCK_KEY = "catch_up_lock"
DONE_KEY = "catch_up_done_by"
# A catch-up that starts goes back a little before the mark: TheHive's clock and ours differ,
# and an object updated in the same millisecond as the mark must not be missed. Re-reading
# is harmless (duplicates are recognised, older states are stale).
OVERLAP_MS = 60_000


@dataclass
class BackfillResult:
    cases: int = 0
    observables: int = 0
    queued: int = 0
    duplicates: int = 0
    known: int = 0  # states skipped as already received or applied (a sweep's ``covered``)
    mark_ms: Optional[int] = None


def updated_ms(obj: dict) -> int:
    value = obj.get("_updatedAt") or obj.get("_createdAt") or 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _event(kind: str, obj: dict, case_id: str) -> dict:
    """A TheHive 5 version 1 audit event carrying ``obj`` as its state at ``_updatedAt``."""
    ts = updated_ms(obj)
    return {"_id": f"backfill:{obj['_id']}:{ts}", "_type": "Audit", "action": "update",
            "objectType": kind, "objectId": obj["_id"], "rootId": case_id, "_createdAt": ts,
            "details": {}, "object": obj}


class Marks(state.Store):
    """The catch-up mark and the lock that lets one process run a catch-up at a time (table meta)."""

    def get(self) -> Optional[int]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (MARK_KEY,)).fetchone()
        return int(row["value"]) if row else None

    def advance(self, ms: int) -> None:
        self.write(lambda db: db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = CASE "
            "WHEN CAST(excluded.value AS BIGINT) > CAST(meta.value AS BIGINT) THEN excluded.value "
            "ELSE meta.value END", (MARK_KEY, str(ms))))

    def try_lock(self, owner: str, ttl_s: float) -> bool:
        now = time.time()

        def take(db) -> bool:
            state.exclusive(db, f"meta:{LOCK_KEY}")
            row = db.execute("SELECT value FROM meta WHERE key = ?", (LOCK_KEY,)).fetchone()
            if row is not None:
                holder, until = json.loads(row["value"])
                if until > now and holder != owner:
                    return False
            state.set_meta(db, LOCK_KEY, json.dumps([owner, now + ttl_s]))
            return True

        return self.write(take)

    def done_for(self, run: str) -> bool:
        """Whether this daemon run already caught up (every gunicorn worker offers to at start)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (DONE_KEY,)).fetchone()
        return row is not None and row["value"] == run

    def record_done(self, run: str) -> None:
        self.write(lambda db: state.set_meta(db, DONE_KEY, run))

    def unlock(self, owner: str) -> None:
        def release(db) -> None:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (LOCK_KEY,)).fetchone()
            if row is not None and json.loads(row["value"])[0] == owner:
                db.execute("DELETE FROM meta WHERE key = ?", (LOCK_KEY,))
        self.write(release)


class Backfill:
    """``covered(object)``, when given, says that a state is here already (received or applied):
    it is not queued again (the periodic sweep queues only what no webhook brought)."""

    def __init__(self, inbox: Inbox, thehive, marks: Marks, sync_state: Optional[SyncState] = None,
                 progress: Optional[Callable[[BackfillResult], None]] = None,
                 covered: Optional[Callable[[dict], bool]] = None) -> None:
        self.inbox = inbox
        self.thehive = thehive
        self.marks = marks
        self.sync_state = sync_state
        self.progress = progress
        self.covered = covered

    def _queue(self, payloads: List[dict], result: BackfillResult) -> None:
        """Store ``payloads`` (a case and its observables) in one transaction."""
        if self.covered is not None:
            wanted = [p for p in payloads if not self.covered(p["object"])]
            result.known += len(payloads) - len(wanted)
            payloads = wanted
        if not payloads:
            return
        for put in self.inbox.put_many([(events.parse(p), json.dumps(p)) for p in payloads]):
            if put.created:
                result.queued += 1
            else:
                result.duplicates += 1

    def run(self, since_ms: Optional[int] = None, everything: bool = False) -> BackfillResult:
        """Queue cases and observables changed since ``since_ms`` (default: the mark; all with ``everything``)."""
        if since_ms is None and not everything:
            mark = self.marks.get()
            since_ms = None if mark is None else max(0, mark - OVERLAP_MS)
        result = BackfillResult()
        queued_observables = set()
        for case in self.thehive.iter_cases(None if everything else since_ms):
            case_id = case["_id"]
            payloads = [_event("Case", case, case_id)]
            for observable in self.thehive.iter_case_observables(case_id):
                if everything or since_ms is None or updated_ms(observable) >= since_ms:
                    payloads.append(_event("Observable", dict(observable, case=case), case_id))
                    queued_observables.add(observable["_id"])
            self._queue(payloads, result)
            result.cases += 1
            result.observables += len(payloads) - 1
            newest = max(updated_ms(p["object"]) for p in payloads)
            result.mark_ms = max(result.mark_ms or 0, newest)
            if self.progress:
                self.progress(result)
        self._changed_observables(since_ms, everything, queued_observables, result)
        # Only now, the whole listing read: a null _updatedAt may sort first or last (TheHive 4
        # sorts a missing value as null; TinkerPop puts nulls first [guess]), so a mark moved case
        # by case could pass cases that a run cut short never read.
        if result.mark_ms is not None:
            self.marks.advance(result.mark_ms)
        return result

    def _changed_observables(self, since_ms, everything, already, result) -> None:
        """Observables updated without their case being bumped; placed by the case they were synced in."""
        if everything or since_ms is None:
            return  # every case's observables were read above
        for observable in self.thehive.iter_observables(since_ms):
            if observable["_id"] in already:
                continue
            case_id = self.sync_state.case_of(observable["_id"]) if self.sync_state else None
            if case_id is None:
                log.info("catch-up: observable %s changed but its case is unknown here; it is synced when its "
                         "case next changes", observable["_id"])
                continue
            self._queue([_event("Observable", observable, case_id)], result)
            result.observables += 1
            result.mark_ms = max(result.mark_ms or 0, updated_ms(observable))
            if self.progress:
                self.progress(result)


def backfill_progress(shown) -> Callable[[BackfillResult], None]:
    """A ``Backfill`` progress callback that reports to a ``tq_mw_thehive.progress.Progress``
    (done: cases read; TheHive's listing gives no total)."""
    def report(result: BackfillResult) -> None:
        shown.update(result.cases, observables=result.observables, queued=result.queued,
                     duplicates=result.duplicates)
    return report


def catch_up_in_background(services, owner: str, on_queued: Callable[[], None],
                           run_id: str) -> threading.Thread:
    """Run one catch-up in a thread, unless this daemon run (``run_id``: the gunicorn master)
    had one or another process is running one; never blocks start-up."""
    from tq_mw_thehive.thehive.api import TheHiveError

    def run() -> None:
        marks = Marks(services.cfg.state_db)
        try:
            if marks.done_for(run_id) or not marks.try_lock(owner, ttl_s=3600):
                return
            if marks.done_for(run_id):  # another worker finished between the two checks
                marks.unlock(owner)
                return
            if marks.get() is None:
                # A first start has no "last run": history is imported only when asked for.
                marks.advance(int(time.time() * 1000))
                marks.record_done(run_id)
                marks.unlock(owner)
                log.info("catch-up: first start, changes are caught up from now on; "
                         "`tq-mw-thehive backfill --all` imports what TheHive already holds")
                return
        except Exception as exc:  # the database is busy: the next start will try again
            log.warning("catch-up not started: %s", exc)
            return
        started = time.monotonic()
        # Inside the daemon progress is always log lines, never a bar, whatever stderr is.
        shown = Progress("catch-up", interactive=False, logger=log)
        report = backfill_progress(shown)

        def progress(result: BackfillResult) -> None:
            report(result)
            if result.queued:
                on_queued()

        try:
            backfill = Backfill(services.inbox, services.thehive(), marks, services.sync_state, progress=progress)
            result = backfill.run()
            marks.record_done(run_id)
            log.info("catch-up done cases=%d observables=%d queued=%d duplicates=%d ms=%.0f", result.cases,
                     result.observables, result.queued, result.duplicates, (time.monotonic() - started) * 1000)
        except TheHiveError as exc:
            log.warning("catch-up stopped (the mark stays where it was: the next start or `tq-mw-thehive "
                        "backfill` reads again from it; what was queued stays queued): %s", exc)
        except Exception:
            log.exception("catch-up failed")
        finally:
            try:
                marks.unlock(owner)
            except Exception:  # the lock expires by itself
                pass

    thread = threading.Thread(target=run, name="tq-catch-up", daemon=True)
    thread.start()
    return thread
