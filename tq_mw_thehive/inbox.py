"""The durable inbox: every accepted webhook event, from arrival to done or dead.

TheHive never re-sends a webhook, so an event exists only here once it is
answered. ``put`` commits before the web answers; a worker ``claim``s an event
under a lease, so an event whose process dies is claimed again when the lease
runs out; ``done``/``retry``/``dead`` only take effect for the lease holder, so a
worker that lost its lease cannot overwrite the outcome of the one that took over.

Events of one case are handed out one at a time, in TheHive's time order: an
event is claimable only when no earlier event of its case is still pending and
none of its case is leased.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Union

from tq_mw_thehive import state
from tq_mw_thehive.thehive.events import WebhookEvent

DEFAULT_LEASE_S = 300.0


@dataclass(frozen=True)
class PutResult:
    id: int
    created: bool


@dataclass(frozen=True)
class InboxItem:
    id: int
    dedup_key: str
    object_type: str
    action: str
    object_id: Optional[str]
    audit_id: Optional[str]
    case_key: str
    body: str
    attempts: int
    received_at: float
    lease_until: float


class Inbox(state.Store):
    """The ``inbox`` table."""

    def __init__(self, path: Union[str, Path], busy_timeout: float = state.BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock

    def put(self, event: WebhookEvent, body: str) -> PutResult:
        """Store ``event`` unless its dedup key is already here; committed on return."""
        now = self.clock()
        order_ts = event.timestamp_ms if event.timestamp_ms is not None else int(now * 1000)

        def insert(db: sqlite3.Connection) -> PutResult:
            cur = db.execute(
                "INSERT OR IGNORE INTO inbox (dedup_key, received_at, order_ts, shape, audit_id, "
                "object_type, action, object_id, case_key, body, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event.dedup_key, now, order_ts, event.shape, event.audit_id, event.object_type,
                 event.action, event.object_id, event.case_key, body, now))
            if cur.rowcount == 1:
                return PutResult(cur.lastrowid, True)
            row = db.execute("SELECT id FROM inbox WHERE dedup_key = ?", (event.dedup_key,)).fetchone()
            return PutResult(row["id"], False)

        return self.write(insert)

    def claim(self, owner: str, lease_s: float = DEFAULT_LEASE_S) -> Optional[InboxItem]:
        """Lease the oldest due event whose case has nothing earlier pending and nothing in flight.

        It walks the pending events in TheHive's order (index ``inbox_pending_order``) and stops
        at the first one it may take, instead of sorting the whole backlog under the write lock.
        """
        def take(db: sqlite3.Connection) -> Optional[InboxItem]:
            now = self.clock()
            row = db.execute(
                """SELECT * FROM inbox AS e INDEXED BY inbox_pending_order
                   WHERE e.state = 'pending' AND e.next_attempt_at <= :now
                     AND (e.lease_until IS NULL OR e.lease_until <= :now)
                     AND NOT EXISTS (
                         SELECT 1 FROM inbox AS o
                         WHERE o.case_key = e.case_key AND o.state = 'pending' AND o.id != e.id
                           AND ((o.order_ts, o.id) < (e.order_ts, e.id) OR o.lease_until > :now))
                   ORDER BY e.order_ts, e.id LIMIT 1""", {"now": now}).fetchone()
            if row is None:
                return None
            until = now + lease_s
            db.execute("UPDATE inbox SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (owner, until, row["id"]))
            return InboxItem(id=row["id"], dedup_key=row["dedup_key"], object_type=row["object_type"],
                             action=row["action"], object_id=row["object_id"], audit_id=row["audit_id"],
                             case_key=row["case_key"], body=row["body"], attempts=row["attempts"] + 1,
                             received_at=row["received_at"], lease_until=until)

        return self.write(take)

    def _finish(self, item_id: int, owner: str, assignments: str, params: tuple) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                f"UPDATE inbox SET {assignments}, lease_owner = NULL, lease_until = NULL "
                "WHERE id = ? AND state = 'pending' AND lease_owner = ? AND lease_until > ?",
                params + (item_id, owner, self.clock()))
            return cur.rowcount == 1

        return self.write(update)

    def extend(self, item_id: int, owner: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        """Keep a lease for a long event; False if it was lost (another worker may have it)."""
        now = self.clock()

        def update(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE inbox SET lease_until = ? WHERE id = ? AND state = 'pending' "
                             "AND lease_owner = ? AND lease_until > ?", (now + lease_s, item_id, owner, now))
            return cur.rowcount == 1

        return self.write(update)

    def done(self, item_id: int, owner: str) -> bool:
        return self._finish(item_id, owner, "state = 'done', finished_at = ?, last_error = NULL",
                            (self.clock(),))

    def retry(self, item_id: int, owner: str, error: str, delay_s: float) -> bool:
        return self._finish(item_id, owner, "next_attempt_at = ?, last_error = ?",
                            (self.clock() + delay_s, error))

    def dead(self, item_id: int, owner: str, error: str) -> bool:
        return self._finish(item_id, owner, "state = 'dead', finished_at = ?, last_error = ?",
                            (self.clock(), error))

    def release_leases(self, owner_prefix: str, alive: Callable[[int], bool]) -> int:
        """Free the leases of processes on this host that are gone (after a crash or SIGKILL of
        the daemon), so that a restart redoes their events at once instead of after the lease."""
        def release(db: sqlite3.Connection) -> int:
            freed = 0
            for row in db.execute("SELECT id, lease_owner FROM inbox WHERE state = 'pending' "
                                  "AND lease_owner LIKE ?", (owner_prefix + "%",)).fetchall():
                pid = row["lease_owner"][len(owner_prefix):]
                if pid.isdigit() and not alive(int(pid)):
                    freed += db.execute("UPDATE inbox SET lease_owner = NULL, lease_until = NULL WHERE id = ?",
                                        (row["id"],)).rowcount
            return freed

        return self.write(release)

    def replay(self, ids: Optional[Iterable[int]] = None) -> int:
        """Put dead events (all, or those in ``ids``) back to pending, due now, attempts reset."""
        now = self.clock()

        def update(db: sqlite3.Connection) -> int:
            sql = ("UPDATE inbox SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                   "finished_at = NULL, lease_owner = NULL, lease_until = NULL WHERE state = 'dead'")
            if ids is None:
                return db.execute(sql, (now,)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, i)).rowcount for i in ids)

        return self.write(update)

    def get(self, item_id: int) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM inbox WHERE id = ?", (item_id,)).fetchone()

    @staticmethod
    def empty_stats() -> Dict[str, object]:
        """``stats()`` of a database that does not exist yet."""
        return {"pending": 0, "queued": 0, "in_progress": 0, "waiting_retry": 0, "done": 0,
                "dead": 0, "oldest_pending_age_s": None}

    def stats(self) -> Dict[str, object]:
        """Counts by state; ``pending`` covers queued, in progress and waiting to retry."""
        now = self.clock()
        row = self.db.execute(
            """SELECT
                 COALESCE(SUM(state = 'pending'), 0) AS pending,
                 COALESCE(SUM(state = 'pending' AND lease_until > :now), 0) AS in_progress,
                 COALESCE(SUM(state = 'pending' AND next_attempt_at > :now
                              AND NOT IFNULL(lease_until > :now, 0)), 0) AS waiting_retry,
                 COALESCE(SUM(state = 'done'), 0) AS done,
                 COALESCE(SUM(state = 'dead'), 0) AS dead,
                 MIN(CASE WHEN state = 'pending' THEN received_at END) AS oldest_pending
               FROM inbox""", {"now": now}).fetchone()
        oldest = row["oldest_pending"]
        return {
            "pending": row["pending"],
            "queued": row["pending"] - row["in_progress"] - row["waiting_retry"],
            "in_progress": row["in_progress"],
            "waiting_retry": row["waiting_retry"],
            "done": row["done"],
            "dead": row["dead"],
            "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
        }

    def check_writable(self) -> None:
        """Raise ``sqlite3.Error`` unless a write commits now (what ``/healthz`` reports)."""
        self.write(lambda db: db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                                          "('healthz_at', ?)", (str(self.clock()),)))
