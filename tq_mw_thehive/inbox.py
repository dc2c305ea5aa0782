"""The durable inbox: every accepted webhook event, from arrival to done or dead.

TheHive never re-sends a webhook, so an event exists only here once it is
answered. ``put`` commits before the web answers; a worker ``claim``s an event
under a lease, so an event whose process dies is claimed again when the lease
runs out; ``done``/``retry``/``dead`` only take effect for the lease holder, so a
worker that lost its lease cannot overwrite the outcome of the one that took over.

Events of one case are handed out one at a time, in TheHive's time order: an
event is claimable only when no earlier event of its case is still pending and
none of its case is leased.

Months of traffic: the counts by state are kept by triggers (migration 7), the figures that
depend on the time read small partial indexes, and ``Retention`` deletes done events older
than ``inbox.keep_done`` in the daemon, so every figure costs the same at 10,000 rows as at
a million.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from tq_mw_thehive import state
from tq_mw_thehive.thehive.events import WebhookEvent

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
PURGE_BATCH = 200               # rows per delete transaction: about 15 ms of write lock each
PURGE_PAUSE_S = 0.05            # between batches, so that webhooks waiting for the lock get it
RELEASE_STEP_S = 0.02           # write lock per step of giving free pages back (the step adapts)
RELEASE_BUDGET_S = 30.0         # per retention pass; the rest of the free pages wait for the next
REWRITE_FREE_BYTES = 100e6      # more free than this: no release in place (`purge --vacuum` rewrites)
RETENTION_INTERVAL_S = 3600.0   # one retention pass per hour, in one process
RETENTION_CHECK_S = 300.0       # how often each process looks whether a pass is due
RETENTION_FIRST_S = 60.0        # after a worker starts: never while it boots


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
    order_ts: Optional[int] = None
    replayed_at: Optional[float] = None

    @property
    def age_from(self) -> float:
        """Where ``sync.max_age`` counts from: a replay is a fresh start, with the full budget."""
        return self.replayed_at if self.replayed_at is not None else self.received_at


_OBJECT_ID, _CASE_KEY = 7, 8  # in ``Inbox._row``


def _with_known_case(db: sqlite3.Connection, row: tuple) -> tuple:
    """``row`` ordered with its object's case when the payload did not name one.

    A TheHive 4 observable delete carries no case: in a group of its own it could overtake the
    observable's create (still pending in its case's group) and leave the indicator linked. The
    object's earlier events in the inbox name its case, and so does the object map once it synced.
    """
    object_id, case_key = row[_OBJECT_ID], row[_CASE_KEY]
    if not object_id or not case_key.startswith("object:"):
        return row
    known = db.execute("SELECT case_key FROM inbox WHERE object_id = ? AND case_key LIKE 'case:%' "
                       "ORDER BY id DESC LIMIT 1", (object_id,)).fetchone()
    if known is not None:
        case_key = known[0]
    else:
        mapped = db.execute("SELECT case_id FROM object_map WHERE thehive_id = ? AND case_id IS NOT NULL "
                            "LIMIT 1", (object_id,)).fetchone()
        if mapped is None:
            return row
        case_key = f"case:{mapped[0]}"
    return row[:_CASE_KEY] + (case_key,) + row[_CASE_KEY + 1:]


def _with_known_cases(db: sqlite3.Connection, rows: Sequence[tuple]) -> List[tuple]:
    """``_with_known_case`` for the rows of one statement, in order: a row before this one that
    names the object's case counts first, as it would once inserted ahead of it (the same
    observable's create and delete can arrive in one group)."""
    out: List[tuple] = []
    for row in rows:
        object_id, case_key = row[_OBJECT_ID], row[_CASE_KEY]
        if object_id and case_key.startswith("object:"):
            earlier = next((r[_CASE_KEY] for r in reversed(out)
                            if r[_OBJECT_ID] == object_id and r[_CASE_KEY].startswith("case:")), None)
            row = _with_known_case(db, row) if earlier is None else \
                row[:_CASE_KEY] + (earlier,) + row[_CASE_KEY + 1:]
        out.append(row)
    return out


_INSERT = ("INSERT OR IGNORE INTO inbox (dedup_key, received_at, order_ts, shape, audit_id, object_type, action, "
           "object_id, case_key, body, next_attempt_at) VALUES ")
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # one row, in ``Inbox._row``'s order
_ROWS_PER_INSERT = 500  # 11 parameters a row: far below SQLite's 32,766 per statement


def _insert(db: sqlite3.Connection, rows: List[tuple]) -> List[PutResult]:
    if getattr(db, "dialect", "sqlite") == "postgresql":
        return _insert_returning(db, rows)
    return _insert_sqlite(db, rows)


def _insert_returning(db, rows: List[tuple]) -> List[PutResult]:
    """``_insert`` on PostgreSQL: ids come from ``RETURNING`` (sequences leave gaps and other
    daemons insert concurrently, so consecutive ids cannot be assumed)."""
    results: List[PutResult] = []
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        sql = (_INSERT.replace("INSERT OR IGNORE", "INSERT") + ", ".join([_VALUES] * len(chunk))
               + " ON CONFLICT (dedup_key) DO NOTHING RETURNING id, dedup_key")
        created = {r[1]: r[0] for r in db.execute(sql, [v for row in chunk for v in row])}
        missing = [row[0] for row in chunk if row[0] not in created]
        stored = {}
        if missing:
            keys = list(dict.fromkeys(missing))
            stored = {r[0]: r[1] for r in db.execute(
                f"SELECT dedup_key, id FROM inbox WHERE dedup_key IN ({', '.join('?' * len(keys))})", keys)}
        for row in chunk:
            key = row[0]
            if key in created:
                results.append(PutResult(created.pop(key), True))
                stored[key] = results[-1].id
            else:
                results.append(PutResult(stored[key], False))
    return results


def _insert_sqlite(db: sqlite3.Connection, rows: List[tuple]) -> List[PutResult]:
    """Insert ``rows`` (in a transaction) unless their dedup key is here: each one's id, and
    whether this inserted it (the first of a key inserts it; a later one, or a key already
    stored, answers the stored row's id).

    One statement for the whole group, not one per row: each statement is a call into SQLite
    that lets go of the GIL and must take it back, while this process holds SQLite's write lock,
    which every other worker is waiting for. The rows one statement inserts get consecutive ids
    above every id in the table (SQLite's rowid: the largest plus one, row after row), which is
    how the ids are known without reading them back unless a key was already there.
    """
    results: List[PutResult] = []
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        cursor = db.execute(_INSERT + ", ".join([_VALUES] * len(chunk)), [v for row in chunk for v in row])
        inserted = cursor.rowcount
        if inserted == len(chunk):
            first = cursor.lastrowid - inserted + 1
            results.extend(PutResult(first + i, True) for i in range(inserted))
            continue
        keys = list(dict.fromkeys(row[0] for row in chunk))
        ids = {r[0]: r[1] for r in db.execute(
            f"SELECT dedup_key, id FROM inbox WHERE dedup_key IN ({', '.join('?' * len(keys))})", keys)}
        # Ids above this one are this statement's (when it inserted anything: else lastrowid is
        # an older insert's).
        older = cursor.lastrowid - inserted if inserted else None
        seen = set()
        for row in chunk:
            key = row[0]
            results.append(PutResult(ids[key], older is not None and ids[key] > older and key not in seen))
            seen.add(key)
    return results


class _Put:
    """One event waiting in a group commit: its row, then its result or the error that stopped it.

    ``wake`` is held from the start: its release tells the waiting thread that its outcome is
    set, or, when it is not, that it leads the next group.
    """

    __slots__ = ("row", "result", "error", "wake")

    def __init__(self, row: tuple) -> None:
        self.row = row
        self.result: Optional[PutResult] = None
        self.error: Optional[BaseException] = None
        self.wake = threading.Lock()
        self.wake.acquire()

    def outcome(self) -> PutResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class _Group:
    """The puts of one process waiting for the transaction that carries them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: List[_Put] = []
        self.leading = False     # a leader waits for its process's turn or commits: the others wait
        self.committing = False  # the leader took the queue and commits it


class Inbox(state.Store):
    """The ``inbox`` table."""

    def __init__(self, path: Union[str, Path], busy_timeout: float = state.BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock
        self._group = _Group()

    def put(self, event: WebhookEvent, body: str) -> PutResult:
        """Store ``event`` unless its dedup key is already here; committed on return.

        Group commit: the web threads of a process that put at the same time share one
        transaction (one fsync, one turn at SQLite's write lock). The first becomes the leader:
        it waits for the write turn (``state.WriteTurn``: the sync's writes, the other workers'
        commits), then commits
        everything queued by then; the others wait, each on its own lock, instead of in SQLite's
        busy handler, which sleeps up to 100 ms between tries. The leader wakes each put of its
        batch, and the first put queued behind the batch, which leads the next one. Every caller
        still returns only after its own event is committed, or raises the ``sqlite3.Error``
        that stopped it.
        """
        mine = _Put(self._row(event, body))
        group = self._group
        with group.lock:
            group.queue.append(mine)
            leads = not group.leading
            group.leading = True
        if not leads:
            mine.wake.acquire()  # its outcome is set, or it leads the next group
            if mine.result is not None or mine.error is not None:
                return mine.outcome()
        batch: List[_Put] = []
        turn = False
        try:
            turn = self.turn.take(self.busy_timeout)
            with group.lock:  # this one's put, and every put queued while it waited for the turn
                batch, group.queue, group.committing = group.queue, [], True
            self._commit(batch)
        except BaseException as exc:  # not SQLite's (those are per put): fail the whole batch
            if not batch:
                with group.lock:
                    batch, group.queue = group.queue, []
            for put in batch:
                if put.result is None and put.error is None:
                    put.error = exc
        finally:
            if turn:
                self.turn.give()
            with group.lock:
                group.committing = False
                following = group.queue[0] if group.queue else None  # queued meanwhile: leads the next group
                group.leading = following is not None
            for put in batch:
                if put is not mine:
                    put.wake.release()
            if following is not None:
                following.wake.release()
        return mine.outcome()

    def put_many(self, items: Sequence[Tuple[WebhookEvent, str]]) -> List[PutResult]:
        """``put`` for several events at once (a backfilled case and its observables): one
        transaction, committed on return; each result as ``put`` would give it."""
        batch = [_Put(self._row(event, body)) for event, body in items]
        if batch:
            self._commit(batch)
        return [put.outcome() for put in batch]

    def _row(self, event: WebhookEvent, body: str) -> tuple:
        """The inbox columns of a new event, in the order ``_commit`` inserts them."""
        now = self.clock()
        order_ts = event.timestamp_ms if event.timestamp_ms is not None else int(now * 1000)
        return (event.dedup_key, now, order_ts, event.shape, event.audit_id, event.object_type, event.action,
                event.object_id, event.case_key, body, now)

    def _commit(self, batch: List["_Put"]) -> None:
        """One transaction for ``batch``; if it fails, each put alone, so one error fails one."""
        try:
            results = self.write(lambda db: _insert(db, _with_known_cases(db, [put.row for put in batch])))
        except sqlite3.Error as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for put in batch:
                try:
                    put.result = self.write(lambda db: _insert(db, _with_known_cases(db, [put.row]))[0])
                except sqlite3.Error as single:
                    put.error = single
            return
        for put, result in zip(batch, results):
            put.result = result

    def claim(self, owner: str, lease_s: float = DEFAULT_LEASE_S) -> Optional[InboxItem]:
        """Lease the oldest due event whose case has nothing earlier pending and nothing in flight.

        It walks the pending events in TheHive's order (index ``inbox_pending_order``) and stops
        at the first one it may take, instead of sorting the whole backlog under the write lock.
        """
        return self.write(lambda db: self._take_first(db, owner, lease_s), durable=False)

    def _take_first(self, db: sqlite3.Connection, owner: str, lease_s: float) -> Optional[InboxItem]:
        now = self.clock()
        # PostgreSQL: claims of every daemon one at a time, as SQLite's one writer makes them, so
        # that each sees the leases the previous one took (the order within a case rests on it);
        # SKIP LOCKED passes over a row another transaction is finishing instead of waiting.
        state.exclusive(db, "inbox:claim")
        row = db.execute(
            """SELECT * FROM inbox AS e INDEXED BY inbox_pending_order
               WHERE e.state = 'pending' AND e.next_attempt_at <= :now
                 AND (e.lease_until IS NULL OR e.lease_until <= :now)
                 AND NOT EXISTS (
                     SELECT 1 FROM inbox AS o
                     WHERE o.case_key = e.case_key AND o.state = 'pending' AND o.id != e.id
                       AND ((o.order_ts, o.id) < (e.order_ts, e.id) OR o.lease_until > :now))
               ORDER BY e.order_ts, e.id LIMIT 1""" + (" FOR UPDATE SKIP LOCKED" if self.shared else ""),
            {"now": now}).fetchone()
        if row is None:
            return None
        return self._lease(db, row, owner, now + lease_s)

    @staticmethod
    def _lease(db: sqlite3.Connection, row: sqlite3.Row, owner: str, until: float) -> InboxItem:
        db.execute("UPDATE inbox SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
                   "WHERE id = ?", (owner, until, row["id"]))
        return InboxItem(id=row["id"], dedup_key=row["dedup_key"], object_type=row["object_type"],
                         action=row["action"], object_id=row["object_id"], audit_id=row["audit_id"],
                         case_key=row["case_key"], body=row["body"], attempts=row["attempts"] + 1,
                         received_at=row["received_at"], lease_until=until, order_ts=row["order_ts"],
                         replayed_at=row["replayed_at"])

    def claim_batch(self, owner: str, lease_s: float = DEFAULT_LEASE_S, limit: int = 1) -> List[InboxItem]:
        """``claim``, and with it up to ``limit - 1`` due events of the same case queued right
        behind it, in TheHive's order, stopping at the first that is not due (waiting to retry,
        or leased): events of a case are still applied in order, several in one go."""
        def take(db: sqlite3.Connection) -> List[InboxItem]:
            first = self._take_first(db, owner, lease_s)
            if first is None or limit <= 1:
                return [first] if first is not None else []
            now = self.clock()
            items = [first]
            for row in db.execute(
                    """SELECT * FROM inbox INDEXED BY inbox_case
                       WHERE case_key = ? AND state = 'pending' AND (order_ts, id) > (?, ?)
                       ORDER BY order_ts, id LIMIT ?""" + (" FOR UPDATE" if self.shared else ""),
                    (first.case_key, first.order_ts, first.id, limit - 1)):
                if row["next_attempt_at"] > now or (row["lease_until"] is not None and row["lease_until"] > now):
                    break
                items.append(self._lease(db, row, owner, now + lease_s))
            return items

        return self.write(take, durable=False)

    def give_back(self, items: Sequence[InboxItem], owner: str) -> int:
        """Undo the claim of events this owner leased and did not apply (a batch stopped at an
        earlier event's failure): claimable again at once, this attempt not counted."""
        def update(db: sqlite3.Connection) -> int:
            return sum(db.execute(
                "UPDATE inbox SET lease_owner = NULL, lease_until = NULL, attempts = attempts - 1 "
                "WHERE id = ? AND state = 'pending' AND lease_owner = ?", (item.id, owner)).rowcount
                for item in items)
        return self.write(update, durable=False)

    def latest_state(self, item: InboxItem) -> Optional[sqlite3.Row]:
        """The newest pending create or update of ``item``'s object queued behind it (before any
        delete of it), or ``None``: its body carries the object's latest state, so applying that
        once makes the events in between cost nothing (they find it applied).

        Safe while ``item`` is leased: the claim hands out nothing of its case meanwhile.
        """
        if item.object_id is None or item.action not in ("create", "update") or item.order_ts is None:
            return None
        latest = None
        for row in self.db.execute(
                """SELECT id, action, body FROM inbox INDEXED BY inbox_case
                   WHERE case_key = ? AND state = 'pending' AND (order_ts, id) > (?, ?)
                     AND object_type = ? AND object_id = ?
                   ORDER BY order_ts, id""",
                (item.case_key, item.order_ts, item.id, item.object_type, item.object_id)):
            if row["action"] not in ("create", "update"):
                break
            latest = row
        return latest

    def _finish(self, item_id: int, owner: str, assignments: str, params: tuple) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                f"UPDATE inbox SET {assignments}, lease_owner = NULL, lease_until = NULL "
                "WHERE id = ? AND state = 'pending' AND lease_owner = ? AND lease_until > ?",
                params + (item_id, owner, self.clock()))
            return cur.rowcount == 1

        return self.write(update, durable=False)

    def extend(self, item_id: int, owner: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        """Keep a lease for a long event; False if it was lost (another worker may have it)."""
        now = self.clock()

        def update(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE inbox SET lease_until = ? WHERE id = ? AND state = 'pending' "
                             "AND lease_owner = ? AND lease_until > ?", (now + lease_s, item_id, owner, now))
            return cur.rowcount == 1

        return self.write(update, durable=False)

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

        return self.write(release, durable=False)

    def replay(self, ids: Optional[Iterable[int]] = None) -> int:
        """Put dead events (all, or those in ``ids``) back to pending, due now, with a fresh start.

        Attempts are reset and ``replayed_at`` becomes the reference of ``sync.max_age``: an
        operator replays once the cause is fixed, often days later, and an event older than
        ``max_age`` would otherwise be dead again ("too old") after its first failed attempt.
        """
        now = self.clock()

        def update(db: sqlite3.Connection) -> int:
            sql = ("UPDATE inbox SET state = 'pending', attempts = 0, next_attempt_at = ?, replayed_at = ?, "
                   "finished_at = NULL, lease_owner = NULL, lease_until = NULL WHERE state = 'dead'")
            if ids is None:
                return db.execute(sql, (now, now)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, now, i)).rowcount for i in ids)

        return self.write(update)

    def dead_ids(self, ids: Optional[Iterable[int]] = None) -> List[int]:
        """The dead events (all, or those of ``ids``) as of now, oldest first: what a replay
        works through in batches, so that it can show progress and never replays an event
        that died again during the same replay."""
        if ids is None:
            return [r["id"] for r in self.db.execute("SELECT id FROM inbox WHERE state = 'dead' ORDER BY id")]
        wanted = sorted(set(ids))
        return [i for i in wanted if (row := self.get(i)) is not None and row["state"] == "dead"]

    def states_of(self, ids: Sequence[int], chunk: int = 500) -> Dict[str, int]:
        """How many of ``ids`` are in each state (``replay --wait`` follows them to done or dead)."""
        counts: Dict[str, int] = {}
        for start in range(0, len(ids), chunk):
            part = list(ids[start:start + chunk])
            for row in self.db.execute(f"SELECT state, COUNT(*) AS n FROM inbox WHERE id IN "
                                       f"({','.join('?' * len(part))}) GROUP BY state", part):
                counts[row["state"]] = counts.get(row["state"], 0) + row["n"]
        return counts

    def newest_order_ts(self, object_id: str) -> Optional[int]:
        """TheHive's time (ms) of the newest event held for ``object_id``, whatever its state."""
        row = self.db.execute("SELECT MAX(order_ts) FROM inbox WHERE object_id = ?", (object_id,)).fetchone()
        return row[0]

    def get(self, item_id: int) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM inbox WHERE id = ?", (item_id,)).fetchone()

    # --- retention: done events do not stay forever ---------------------------------------------

    _PURGE_DONE = ("DELETE FROM inbox WHERE id IN (SELECT id FROM inbox INDEXED BY inbox_done_finished "
                   "WHERE state = 'done' AND finished_at < ? LIMIT ?)")
    _PURGE_DEAD = "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE state = 'dead' LIMIT ?)"

    def purgeable(self, done_older_than_s: Optional[float] = None, dead: bool = False) -> int:
        """How many rows ``purge`` with the same arguments would delete now (for its progress)."""
        n = 0
        if done_older_than_s is not None:
            n += self.db.execute("SELECT COUNT(*) FROM inbox INDEXED BY inbox_done_finished WHERE state = 'done' "
                                 "AND finished_at < ?", (self.clock() - done_older_than_s,)).fetchone()[0]
        if dead:
            n += self.db.execute("SELECT SUM(n) FROM inbox_counts WHERE state = 'dead'").fetchone()[0]
        return n

    def purge(self, done_older_than_s: Optional[float] = None, dead: bool = False, batch: int = PURGE_BATCH,
              pause_s: float = 0.0, progress: Optional[Callable[[int], None]] = None,
              sleep: Callable[[float], None] = time.sleep) -> Dict[str, int]:
        """Delete ``done`` events finished more than ``done_older_than_s`` ago and, with ``dead``,
        every dead letter; the numbers deleted, by state. Never a pending event.

        ``batch`` rows per transaction, ``pause_s`` between transactions: the write lock is
        the one every webhook waits for, so a purge of months of history never holds it for
        longer than one small batch. A power cut may undo the last batches (they are committed
        without waiting for the disk), which only means they are deleted again next time.
        """
        steps = []
        if done_older_than_s is not None:
            steps.append(("done", self._PURGE_DONE, (self.clock() - done_older_than_s, batch)))
        if dead:
            steps.append(("dead", self._PURGE_DEAD, (batch,)))
        deleted = {"done": 0, "dead": 0}
        for state_name, sql, params in steps:
            while True:
                n = self.write(lambda db: db.execute(sql, params).rowcount, durable=False)
                deleted[state_name] += n
                self._checkpoint()
                if progress is not None:
                    progress(deleted["done"] + deleted["dead"])
                if n < batch:
                    break
                sleep(pause_s)
        return deleted

    def _checkpoint(self) -> None:
        """Copy the WAL back into the file here, without the write lock (PASSIVE): otherwise the
        commit that crosses SQLite's auto-checkpoint size, often a webhook's put, does it and
        answers hundreds of milliseconds late after a purge's megabytes of deletes."""
        if self.shared:
            return  # PostgreSQL checkpoints on its own
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def vacuum_mode(self) -> str:
        """SQLite's ``auto_vacuum`` of this file: ``incremental`` (created by this version) or ``none``;
        ``autovacuum`` on PostgreSQL, whose own vacuum makes deleted rows' space reusable."""
        if self.shared:
            return "autovacuum"
        return {0: "none", 1: "full", 2: "incremental"}[self.db.execute("PRAGMA auto_vacuum").fetchone()[0]]

    def free_bytes(self) -> int:
        """Space inside the file that deletes freed and new events will reuse (0 on PostgreSQL:
        not measured; its autovacuum manages it)."""
        if self.shared:
            return 0
        return (self.db.execute("PRAGMA freelist_count").fetchone()[0]
                * self.db.execute("PRAGMA page_size").fetchone()[0])

    def release_free_pages(self, pause_s: float = 0.0, budget_s: Optional[float] = None,
                           sleep: Callable[[float], None] = time.sleep) -> int:
        """Give the pages that deletes freed back to the file system; the bytes released.

        Only a file in incremental auto-vacuum mode can (see ``vacuum``); in any other mode
        this releases nothing, and the free pages are reused by new events instead: the file
        stops growing but keeps its size. Each step moves pages from the end of the file into
        the free ones under the write lock, and a page costs more the longer the free list is
        (milliseconds each with gigabytes free), so the step is sized to hold the lock about
        ``RELEASE_STEP_S``, and ``budget_s`` bounds the whole (the rest waits for next time).
        """
        if self.vacuum_mode() != "incremental":
            return 0
        db = self.db
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        deadline = None if budget_s is None else time.monotonic() + budget_s
        released, step = 0, 64
        while deadline is None or time.monotonic() < deadline:
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            if not free:
                break
            started = time.monotonic()
            # executescript steps the pragma to its end (execute would free one page only).
            db.executescript(f"PRAGMA incremental_vacuum({min(free, step)});")
            took = time.monotonic() - started
            left = db.execute("PRAGMA freelist_count").fetchone()[0]
            if left >= free:
                break
            released += (free - left) * page_size
            step = max(8, min(4096, int(step * min(2.0, RELEASE_STEP_S / max(took, 1e-4)))))
            self._checkpoint()
            sleep(pause_s)
        return released

    def vacuum(self) -> int:
        """Rewrite the whole file in incremental auto-vacuum mode (``VACUUM``); the bytes released.

        For a database created before migration 7, once: SQLite can switch an existing file to
        that mode only by rewriting it, which holds the write lock throughout (webhooks get 503,
        and TheHive does not re-send) and needs free disk space about the size of the file; so
        this is ``tq-mw-thehive purge --vacuum`` with the daemon stopped, never the daemon's own.
        """
        if self.shared:
            self.db.execute("VACUUM (ANALYZE) inbox")  # no file to shrink: space is reused, statistics fresh
            return 0
        before = self._file_bytes()
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return max(0, before - self._file_bytes())

    def _file_bytes(self) -> int:
        return sum(Path(f"{self.path}{suffix}").stat().st_size
                   for suffix in ("", "-wal") if Path(f"{self.path}{suffix}").exists())

    @staticmethod
    def empty_stats() -> Dict[str, object]:
        """``stats()`` of a database that does not exist yet."""
        return {"pending": 0, "queued": 0, "in_progress": 0, "waiting_retry": 0, "done": 0,
                "dead": 0, "oldest_pending_age_s": None}

    def stats(self) -> Dict[str, object]:
        """Counts by state; ``pending`` covers queued, in progress and waiting to retry.

        Read by every ``/healthz``, ``/metrics`` scrape, ``/status`` and ``status``, which anyone
        who reaches the listener can call in a loop: the totals come from ``inbox_counts`` (one row
        per state on SQLite; on PostgreSQL 16 slots a state, summed: see state_postgres)
        (kept by triggers), the rest from partial indexes as small as the backlog, so the cost
        does not grow with the history kept (one statement: one consistent snapshot).
        """
        now = self.clock()
        row = self.db.execute(
            """SELECT
                 (SELECT SUM(n) FROM inbox_counts WHERE state = 'pending') AS pending,
                 (SELECT COUNT(*) FROM inbox INDEXED BY inbox_leased
                   WHERE lease_until > :now AND state = 'pending') AS in_progress,
                 (SELECT COUNT(*) FROM inbox INDEXED BY inbox_due
                   WHERE state = 'pending' AND next_attempt_at > :now
                     AND (lease_until IS NULL OR lease_until <= :now)) AS waiting_retry,
                 (SELECT SUM(n) FROM inbox_counts WHERE state = 'done') AS done,
                 (SELECT SUM(n) FROM inbox_counts WHERE state = 'dead') AS dead,
                 (SELECT MIN(received_at) FROM inbox INDEXED BY inbox_pending_received
                   WHERE state = 'pending') AS oldest_pending""", {"now": now}).fetchone()
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
        self.write(lambda db: state.set_meta(db, "healthz_at", str(self.clock())))

    # --- read-only views for the status page (status_page.py) ----------------------------------

    _VIEW_COLUMNS = ("id, received_at, object_type, action, object_id, audit_id, case_key, state, "
                     "attempts, next_attempt_at, lease_until, last_error, finished_at")

    def object_bodies(self, object_type: str) -> Iterator[Tuple[str, str]]:
        """``(object_id, body)`` of every stored create or update of ``object_type``, grouped by
        object, each object's newest (TheHive's order) first: the latest state we were sent."""
        for row in self.rows(
                "SELECT object_id, body FROM inbox WHERE object_type = ? AND action != 'delete' "
                "ORDER BY object_id, order_ts DESC, id DESC", (object_type,)):
            yield row["object_id"], row["body"]

    def recent(self, limit: int = 50) -> List[sqlite3.Row]:
        """The newest ``limit`` events, newest first, without their bodies (a read, never waits)."""
        return self.db.execute(f"SELECT {self._VIEW_COLUMNS} FROM inbox ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()

    def dead_letters(self, limit: int = 100) -> List[sqlite3.Row]:
        """Dead events, the most recently given up first, with the reason in ``last_error``."""
        return self.db.execute(f"SELECT {self._VIEW_COLUMNS} FROM inbox WHERE state = 'dead' "
                               "ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,)).fetchall()

    def hourly_counts(self, hours: int = 24) -> List[Tuple[float, int]]:
        """Events received per clock hour over the last ``hours`` hours, oldest first, empty hours as 0.

        Each entry is (start of the hour as a Unix time, count); the last one is the current hour.
        """
        now = self.clock()
        current = now - now % 3600
        first = current - (hours - 1) * 3600
        # CAST truncates in SQLite but rounds in PostgreSQL: there, FLOOR first.
        hour = "CAST(FLOOR(received_at / 3600) AS BIGINT)" if self.shared else "CAST(received_at / 3600 AS INTEGER)"
        counts = {row["hour"]: row["n"] for row in self.db.execute(
            f"SELECT {hour} * 3600 AS hour, COUNT(*) AS n FROM inbox "
            "INDEXED BY inbox_received WHERE received_at >= ? GROUP BY hour", (first,))}
        return [(first + i * 3600, counts.get(int(first + i * 3600), 0)) for i in range(hours)]

    # --- the self-test of `tq-mw-thehive check` (events.SELF_TEST_OBJECT_TYPE) -----------------

    def put_self_test(self, event: WebhookEvent, body: str) -> int:
        """Store a self-test event already ``done``, so that no worker ever claims it; its id.

        It takes the same write path as a real event (one committed transaction), which is what
        the self-test proves; ``remove_self_test`` deletes it again.
        """
        now = self.clock()

        def insert(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO inbox (dedup_key, received_at, order_ts, shape, audit_id, object_type, "
                "action, object_id, case_key, body, next_attempt_at, state, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'done', ?) ON CONFLICT DO NOTHING",
                (event.dedup_key, now, int(now * 1000), event.shape, event.audit_id, event.object_type,
                 event.action, event.object_id, event.case_key, body, now, now))
            return db.execute("SELECT id FROM inbox WHERE dedup_key = ?", (event.dedup_key,)).fetchone()["id"]

        return self.write(insert)

    def remove_self_test(self, item_id: int) -> bool:
        """Delete self-test row ``item_id``; never any other row. False if there was none."""
        from tq_mw_thehive.thehive.events import SELF_TEST_OBJECT_TYPE

        return self.write(lambda db: db.execute("DELETE FROM inbox WHERE id = ? AND object_type = ?",
                                                (item_id, SELF_TEST_OBJECT_TYPE)).rowcount == 1)


class Retention:
    """Deletes done events older than ``inbox.keep_done`` inside the daemon, a batch at a time.

    Each gunicorn worker runs one in a background thread, but a pass is claimed in ``meta``
    (``retention_next_at``, in a write transaction), so one process does it per
    ``interval_s``. A pass is ``Inbox.purge`` in small batches with pauses (webhooks never wait
    long for the write lock), then the freed pages go back to the file system where the file's
    mode allows it and little is free, for at most ``RELEASE_BUDGET_S``. Pending events and dead
    letters are never deleted here.
    """

    def __init__(self, inbox: Inbox, keep_done_s: float, interval_s: float = RETENTION_INTERVAL_S,
                 batch: int = PURGE_BATCH, pause_s: float = PURGE_PAUSE_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.inbox = inbox
        self.keep_done_s = keep_done_s
        self.interval_s = interval_s
        self.batch = batch
        self.pause_s = pause_s
        self.sleep = sleep
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _claim(self) -> bool:
        """Whether this process runs the pass that is due now (at most one per interval)."""
        now = self.inbox.clock()

        def claim(db: sqlite3.Connection) -> bool:
            state.exclusive(db, "meta:retention_next_at")
            row = db.execute("SELECT value FROM meta WHERE key = 'retention_next_at'").fetchone()
            if row is not None and float(row["value"]) > now:
                return False
            state.set_meta(db, "retention_next_at", repr(now + self.interval_s))
            return True

        return self.inbox.write(claim, durable=False)

    def run_once(self) -> Optional[Dict[str, int]]:
        """One pass if one is due and ``keep_done`` is not 0: what it deleted, else None."""
        if self.keep_done_s <= 0 or not self._claim():
            return None
        started = time.monotonic()
        deleted = self.inbox.purge(self.keep_done_s, batch=self.batch, pause_s=self.pause_s, sleep=self.sleep)
        # Above REWRITE_FREE_BYTES (the first pass over months of history) moving pages one by one
        # would take hours of CPU: new events reuse the space, and `purge --vacuum` rewrites the file.
        released = 0
        if deleted["done"] and self.inbox.free_bytes() <= REWRITE_FREE_BYTES:
            released = self.inbox.release_free_pages(self.pause_s, RELEASE_BUDGET_S, self.sleep)
        if deleted["done"]:
            log.info("retention purged done=%d older_than_days=%g released_mb=%.1f free_mb=%.1f ms=%.0f",
                     deleted["done"], self.keep_done_s / 86400, released / 1e6, self.inbox.free_bytes() / 1e6,
                     (time.monotonic() - started) * 1000)
        return {"done": deleted["done"], "released_bytes": released}

    def _loop(self, first_s: float, check_s: float) -> None:
        delay = first_s
        while not self._stop.wait(delay):
            delay = check_s
            try:
                self.run_once()
            except sqlite3.Error as exc:  # locked or full: what is deleted stays deleted; next pass goes on
                log.warning("retention pass stopped (the next one goes on): %s", exc)
            except Exception:  # a bug must not end the thread: retention would silently stop
                log.exception("retention pass failed")

    def start(self, first_s: float = RETENTION_FIRST_S, check_s: float = RETENTION_CHECK_S) -> "Retention":
        """Run passes in a daemon thread: the first after ``first_s``, then look every ``check_s``."""
        if self.keep_done_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(first_s, check_s), name="tq-retention",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
