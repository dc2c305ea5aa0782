"""The state database: SQLite's connection settings, numbered migrations, and ``Store``.

One file holds all the daemon's state, or, with ``state_db: postgresql://…``, one PostgreSQL
database shared by several daemons (``state_postgres.py``: the same stores, the same SQL).
Several gunicorn workers (processes, each with threads) open the file at once, so every
connection uses WAL, a busy timeout and ``synchronous=FULL``: an event the web answered 200 for
must survive a power cut, not only a crash of the process.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, TypeVar, Union

from tq_mw_thehive import private_files, state_postgres
from tq_mw_thehive.state_postgres import PostgresURL

Location = Union[Path, PostgresURL]

log = logging.getLogger(__name__)

_M001_INBOX = [
    """CREATE TABLE inbox (
            id              INTEGER PRIMARY KEY,
            dedup_key       TEXT    NOT NULL UNIQUE,
            received_at     REAL    NOT NULL,
            order_ts        INTEGER NOT NULL,          -- TheHive's time (ms), else arrival
            shape           TEXT    NOT NULL,
            audit_id        TEXT,
            object_type     TEXT    NOT NULL,
            action          TEXT    NOT NULL,
            object_id       TEXT,
            case_key        TEXT    NOT NULL,
            body            TEXT    NOT NULL,
            state           TEXT    NOT NULL DEFAULT 'pending'
                                    CHECK (state IN ('pending', 'done', 'dead')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL    NOT NULL,
            lease_owner     TEXT,
            lease_until     REAL,
            last_error      TEXT,
            finished_at     REAL
        )""",
    "CREATE INDEX inbox_due ON inbox (state, next_attempt_at)",
    "CREATE INDEX inbox_case ON inbox (case_key, state, order_ts, id)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
]


_M002_SYNC = [
    # Which ThreatQ objects stand for a TheHive case or observable (a file observable can
    # become several indicators): what makes a re-delivered event change nothing.
    """CREATE TABLE object_map (
            thehive_id  TEXT    NOT NULL,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            collection  TEXT    NOT NULL,           -- events | incident | indicators
            tq_id       INTEGER NOT NULL,
            case_id     TEXT,                       -- an observable's case
            PRIMARY KEY (thehive_id, collection, tq_id)
        )""",
    "CREATE INDEX object_map_case ON object_map (case_id)",
    # Per TheHive object: the TheHive time of the newest change applied (an older event that
    # arrives late changes nothing), the tags last synced (to remove only ours), and for a
    # case held back until its first observable, its latest state.
    """CREATE TABLE sync_state (
            thehive_id  TEXT    PRIMARY KEY,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            applied_ts  INTEGER NOT NULL,
            tags        TEXT    NOT NULL DEFAULT '[]',
            held_case   TEXT
        )""",
]

_M003_ENRICHMENT = [
    # One entry per plugin version, data type and normalised value; a hit makes no network call.
    """CREATE TABLE enrichment_cache (
            plugin      TEXT    NOT NULL,
            version     TEXT    NOT NULL,
            data_type   TEXT    NOT NULL,
            value       TEXT    NOT NULL,
            found       INTEGER NOT NULL,            -- 0: a negative answer (shorter TTL)
            verdict     TEXT,
            result      TEXT    NOT NULL,            -- JSON: {"data": …, "attributes": …}
            fetched_at  REAL    NOT NULL,
            expires_at  REAL    NOT NULL,
            PRIMARY KEY (plugin, version, data_type, value)
        )""",
    """CREATE TABLE enrichment_stats (
            plugin      TEXT    PRIMARY KEY,
            hits        INTEGER NOT NULL DEFAULT 0,
            misses      INTEGER NOT NULL DEFAULT 0,
            errors      INTEGER NOT NULL DEFAULT 0,
            lookup_ms   REAL    NOT NULL DEFAULT 0    -- time spent in the plugin on misses
        )""",
    # The team's API keys for the plugins (the database file is 0600).
    """CREATE TABLE api_keys (
            name        TEXT    PRIMARY KEY,
            value       TEXT    NOT NULL,
            set_at      REAL    NOT NULL
        )""",
    """CREATE TABLE watches (
            value       TEXT    NOT NULL,
            data_type   TEXT    NOT NULL,
            interval_s  REAL    NOT NULL,
            next_due    REAL    NOT NULL,
            added_at    REAL    NOT NULL,
            origin      TEXT    NOT NULL,            -- manual | ioc
            tlp         TEXT,
            pap         TEXT,
            PRIMARY KEY (value, data_type)
        )""",
]

_M004_DIGEST = [
    # A digest of what was last written to ThreatQ for an object: an update that changes
    # nothing ThreatQ shows costs no API call.
    "ALTER TABLE sync_state ADD COLUMN digest TEXT",
]

_M005_CLAIM_INDEX = [
    # The claim picks the oldest pending event: with this index it reads a few rows, not the
    # whole backlog (74 ms per claim at 17,700 pending, under the write lock, without it).
    "CREATE INDEX inbox_pending_order ON inbox (state, order_ts, id)",
]

_M006_STATUS_LOGIN = [
    # The status page's failed logins, shared by every gunicorn worker so the limit holds per
    # client and overall whichever process answers; rows older than the window are pruned.
    """CREATE TABLE status_login_failures (
            client      TEXT    NOT NULL,            -- the remote address
            at          REAL    NOT NULL
        )""",
    "CREATE INDEX status_login_failures_client ON status_login_failures (client, at)",
    "CREATE INDEX status_login_failures_at ON status_login_failures (at)",
    # Its sessions (a digest of the cookie's nonce): logout deletes the row, so a copied cookie
    # is worthless afterwards.
    """CREATE TABLE status_sessions (
            digest      TEXT    PRIMARY KEY,
            expires_at  REAL    NOT NULL
        )""",
]

_M007_RETENTION = [
    # A replayed dead letter gets a fresh start: sync.max_age counts from here when it is set.
    "ALTER TABLE inbox ADD COLUMN replayed_at REAL",
    # Counts by state, kept by triggers in the same transactions as the rows: status, /healthz,
    # /metrics and /status read three rows instead of scanning months of done events.
    "CREATE TABLE inbox_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT INTO inbox_counts (state, n) SELECT s, (SELECT COUNT(*) FROM inbox WHERE state = s) "
    "FROM (SELECT 'pending' AS s UNION ALL SELECT 'done' UNION ALL SELECT 'dead')",
    """CREATE TRIGGER inbox_counts_insert AFTER INSERT ON inbox BEGIN
           UPDATE inbox_counts SET n = n + 1 WHERE state = NEW.state; END""",
    """CREATE TRIGGER inbox_counts_delete AFTER DELETE ON inbox BEGIN
           UPDATE inbox_counts SET n = n - 1 WHERE state = OLD.state; END""",
    """CREATE TRIGGER inbox_counts_update AFTER UPDATE OF state ON inbox WHEN OLD.state != NEW.state BEGIN
           UPDATE inbox_counts SET n = n - 1 WHERE state = OLD.state;
           UPDATE inbox_counts SET n = n + 1 WHERE state = NEW.state; END""",
    # Small partial indexes for the figures that depend on the time: they hold pending or
    # leased rows only, so they stay as small as the backlog however long the history is.
    "CREATE INDEX inbox_pending_received ON inbox (received_at) WHERE state = 'pending'",
    "CREATE INDEX inbox_leased ON inbox (lease_until) WHERE lease_until IS NOT NULL",
    # Retention walks done events by the time they were finished; the chart counts by arrival.
    "CREATE INDEX inbox_done_finished ON inbox (finished_at) WHERE state = 'done'",
    "CREATE INDEX inbox_received ON inbox (received_at)",
]

_M008_OBJECT_ORDER = [
    # An event that does not name its case (a TheHive 4 observable delete) is ordered with the
    # case its object's earlier events named: found by object id.
    "CREATE INDEX inbox_object ON inbox (object_id, id)",
]

_M009_WRITEBACK = [
    # What the daemon tells TheHive (writeback.enabled): per case or observable, the daemon's own
    # tags it should carry and what TheHive was last told; a row with due_at is waiting to be sent.
    """CREATE TABLE writeback (
            thehive_id  TEXT    PRIMARY KEY,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            want_tags   TEXT    NOT NULL DEFAULT '[]',  -- JSON list
            sent_tags   TEXT    NOT NULL DEFAULT '[]',  -- JSON list
            want_field  TEXT,                           -- a case's ThreatQ URL (writeback.case_custom_field)
            sent_field  TEXT,
            due_at      REAL,                           -- NULL: TheHive has what it should
            attempts    INTEGER NOT NULL DEFAULT 0,
            last_error  TEXT
        )""",
    "CREATE INDEX writeback_due ON writeback (due_at) WHERE due_at IS NOT NULL",
]

_M010_QUOTA = [
    # Enrichment quotas (enrichment/quota.py), per plugin and API key (key_id: a digest, never the
    # key): each call made, for the sliding minute and the UTC day; a pause after a 429; and the
    # lookups waiting for quota, applied in (priority, id) order: a case's before monitor's.
    """CREATE TABLE quota_calls (
            plugin  TEXT NOT NULL,
            key_id  TEXT NOT NULL,
            at      REAL NOT NULL
        )""",
    "CREATE INDEX quota_calls_by_key ON quota_calls (plugin, key_id, at)",
    """CREATE TABLE quota_pauses (
            plugin    TEXT NOT NULL,
            key_id    TEXT NOT NULL,
            until     REAL NOT NULL,
            last_429  REAL,
            reason    TEXT,
            strikes   INTEGER NOT NULL DEFAULT 0,   -- 429s within the hour: the backoff doubles
            PRIMARY KEY (plugin, key_id)
        )""",
    """CREATE TABLE enrichment_deferred (
            id         INTEGER PRIMARY KEY,
            plugin     TEXT    NOT NULL,
            key_id     TEXT    NOT NULL,
            data_type  TEXT    NOT NULL,
            value      TEXT    NOT NULL,
            tlp        TEXT,
            pap        TEXT,
            origin     TEXT    NOT NULL CHECK (origin IN ('case', 'monitor')),
            priority   INTEGER NOT NULL,               -- 0 a case's observable, 1 a monitor re-check
            queued_at  REAL    NOT NULL,
            due_at     REAL    NOT NULL,
            attempts   INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            UNIQUE (plugin, data_type, value, origin)
        )""",
    "CREATE INDEX enrichment_deferred_order ON enrichment_deferred (plugin, key_id, priority, id)",
]

# Append only: a released migration is never edited, a change is a new number (and, from 11 on,
# the same number in state_postgres.MIGRATIONS, in PostgreSQL's words).
# Statements run one by one inside the migration's transaction (executescript would commit).
MIGRATIONS: List[Tuple[int, str, List[str]]] = [
    (1, "inbox", _M001_INBOX),
    (2, "sync", _M002_SYNC),
    (3, "enrichment", _M003_ENRICHMENT),
    (4, "digest", _M004_DIGEST),
    (5, "claim index", _M005_CLAIM_INDEX),
    (6, "status page login", _M006_STATUS_LOGIN),
    (7, "inbox retention and counts", _M007_RETENTION),
    (8, "inbox order by object", _M008_OBJECT_ORDER),
    (9, "writeback", _M009_WRITEBACK),
    (10, "enrichment quotas", _M010_QUOTA),
]

BUSY_TIMEOUT_S = 5.0


class StateError(Exception):
    """The state database cannot be opened or migrated."""


class StateMoved(sqlite3.OperationalError):
    """The database file was removed or replaced while this process had it open.

    A ``sqlite3.Error``, so every caller's existing path applies (the web answers 503, the worker
    retries); what was written through the old connections is in a file nobody will read again.
    """


# Primary result codes after which the connection itself may be what fails: opened read-only
# while the file was (permissions, a read-only remount, chattr +i) and read-only for ever after,
# or its file descriptor broken (I/O error). A new connection sees the file as it is now.
_REOPEN_CODES = {8: "readonly", 10: "disk i/o error", 14: "unable to open"}


def _reopen_helps(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; the message before
    if code is not None:
        return code & 0xFF in _REOPEN_CODES
    return not isinstance(exc, StateMoved) and any(t in str(exc).lower() for t in _REOPEN_CODES.values())


FileIdentity = Optional[Tuple[int, int]]


def file_identity(path: Union[str, Path]) -> FileIdentity:
    """(st_dev, st_ino) of ``path``, None when it is gone: what tells the same file from a new one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _enable_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    # Switching a new file to WAL fails at once with "database is locked" while another
    # process holds a lock (SQLite skips the busy handler here), which happens when
    # several gunicorn workers open a new database together: wait as a busy timeout would.
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _incremental_vacuum_mode(db: sqlite3.Connection) -> None:
    # Possible only before the first page is written (before WAL and the first table): pages
    # freed by inbox retention can then be given back with `PRAGMA incremental_vacuum`. An
    # existing file keeps its mode until `tq-mw-thehive purge --vacuum` rewrites it once.
    try:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    except sqlite3.OperationalError:
        pass  # another process is creating the file right now, with this same setting


def location(state_db: Union[str, Path, PostgresURL]) -> Location:
    """``state_db`` as a SQLite file's ``Path`` or a ``PostgresURL``."""
    if isinstance(state_db, PostgresURL):
        return state_db
    if state_postgres.is_url(state_db):
        return PostgresURL(str(state_db))
    return Path(state_db)


def is_shared(state_db: Union[str, Path, PostgresURL]) -> bool:
    """Whether ``state_db`` is a PostgreSQL database (shared by daemons on several hosts)."""
    return state_postgres.is_url(state_db)


def exclusive(db: Any, name: str) -> None:
    """Serialise a read-then-write transaction with every other one naming ``name``: nothing to
    do on SQLite (``BEGIN IMMEDIATE`` already makes one writer), an advisory lock on PostgreSQL."""
    state_postgres.xact_lock(db, name)


def connect(path: Union[str, Path], busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open the database with the settings every connection needs (autocommit; explicit BEGIN)."""
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    if new_file:
        try:  # SQLite would create it with the umask's mode (0644): it holds plugin keys
            private_files.create(Path(path))
        except OSError:
            pass  # no directory, no permission: sqlite3.connect says so as an sqlite3.Error
    db = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                         check_same_thread=False)
    try:
        db.row_factory = sqlite3.Row
        if new_file:
            _incremental_vacuum_mode(db)
        _enable_wal(db, busy_timeout)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db


def schema_version(db: sqlite3.Connection) -> int:
    """The highest migration applied; a read only, so it never waits for a writer (WAL)."""
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                        "AND name = 'schema_migrations'").fetchone()
    if not exists:
        return 0
    return db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0


def _check_not_newer(current: int, latest: int) -> None:
    if current > latest:
        raise StateError(f"the state database is at schema {current}, newer than this "
                         f"version of tq-mw-thehive knows ({latest}); upgrade the package")


def migrate(db: sqlite3.Connection) -> int:
    """Apply the migrations this database lacks; safe when several processes start at once.

    An up-to-date database is only read, so a worker (re)starting while another
    process holds a long write lock still starts.
    """
    latest = MIGRATIONS[-1][0]
    current = schema_version(db)
    _check_not_newer(current, latest)
    if current == latest:
        return latest
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                   "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        current = schema_version(db)  # again, inside the lock: another process may have migrated
        _check_not_newer(current, latest)
        for version, name, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return latest


def open_state(path: Union[str, Path, PostgresURL], busy_timeout: float = BUSY_TIMEOUT_S) -> Any:
    """Create (mode 0600) and migrate the database at ``path``; ``StateError`` if that fails.

    A PostgreSQL URL: migrate it (the database itself must exist) and return this process's
    ``state_postgres.Database`` on it.
    """
    where = location(path)
    if isinstance(where, PostgresURL):
        try:
            state_postgres.migrate(where, MIGRATIONS[-1][0], _check_not_newer)
        except sqlite3.Error as exc:
            raise StateError(f"state database {where}: {exc}") from exc
        return state_postgres.database(where, busy_timeout)
    path = where
    try:
        if not path.parent.is_dir():
            raise StateError(f"state database {path}: directory {path.parent} does not exist")
        private_files.create(path)
        db = connect(path, busy_timeout)
        try:
            migrate(db)
        except BaseException:
            db.close()
            raise
        return db
    except (sqlite3.Error, OSError) as exc:
        raise StateError(f"state database {path}: {exc}") from exc


T = TypeVar("T")


TURN_POLL_S = 0.0002  # how often a writer waiting for another process's turn looks again


class WriteTurn:
    """Whose turn it is to write one database, among the threads and processes of the daemon: an
    ``RLock`` in each process, and an exclusive ``flock`` on ``<database>-write.lock`` between them.

    SQLite lets one connection write at a time, and a connection that finds the write lock taken
    waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms, … up to 100 ms between tries: a
    webhook arriving while the sync commits its bookkeeping, or while the other gunicorn worker
    commits its webhooks, waited for tens of milliseconds when the lock was free again after one.
    Here a thread waits on its process's lock, and the one thread of a process that wants the
    other's turn looks again every ``TURN_POLL_S``. The kernel drops the lock of a process that
    dies. Every wait is bounded by the caller's timeout (the busy timeout); past it, or when the
    file cannot be opened, the write goes to SQLite without a turn, as it would without this, so
    a process stuck holding the turn (a hung disk) delays the others, never stops them.

    Re-entrant: a thread that has the turn may write again (the inbox's group commit takes the
    turn, then writes). One instance per database and process (``write_turn``).
    """

    def __init__(self, path: str) -> None:
        self.path = f"{path}-write.lock"
        self._pid: Optional[int] = None
        self._setup = threading.Lock()

    def _for_this_process(self) -> None:
        if self._pid == os.getpid():
            return
        with self._setup:
            if self._pid == os.getpid():
                return
            # First use, or a forked worker: a lock of its own. A file description inherited from
            # the parent would share the parent's flock; a lock held by a parent thread stays held.
            self._lock = threading.RLock()
            self._held = threading.local()
            try:
                self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._fd = None
            else:
                weakref.finalize(self, os.close, self._fd)
            self._pid = os.getpid()

    def take(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the turn. True: this thread holds it, and must
        ``give`` it back; False: it was not had in time (write anyway: SQLite still serialises)."""
        self._for_this_process()
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            return False
        depth = getattr(self._held, "depth", 0)
        if depth == 0:
            self._held.flocked = self._flock(timeout)
        self._held.depth = depth + 1
        return True

    def give(self) -> None:
        self._held.depth -= 1
        if self._held.depth == 0 and self._held.flocked:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._lock.release()

    def _flock(self, timeout: float) -> bool:
        if self._fd is None:
            return False
        deadline = None
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError:
                return False
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now >= deadline:
                return False
            time.sleep(TURN_POLL_S)


_turns: "weakref.WeakValueDictionary[str, WriteTurn]" = weakref.WeakValueDictionary()
_turns_lock = threading.Lock()


def write_turn(path: Union[str, Path]) -> WriteTurn:
    """The ``WriteTurn`` of the database at ``path``, shared by every store of this process on it."""
    key = os.path.abspath(path)
    with _turns_lock:
        turn = _turns.get(key)
        if turn is None:
            turn = _turns[key] = WriteTurn(key)
        return turn


class _NoTurn:
    """PostgreSQL has no one-writer lock to queue for: row locks and ``exclusive`` do that job."""

    def take(self, timeout: float) -> bool:
        return False

    def give(self) -> None:  # pragma: no cover - take never grants it
        pass


class Store:
    """A table family in the state database, with one connection per thread.

    gunicorn's threads and the sync worker each use their own connection; SQLite
    connections must not be shared across threads mid-transaction. On PostgreSQL
    (``shared``) a statement or a transaction borrows one from the process's pool instead.
    """

    DURABLE_WRITES = True  # see ``write``

    def __init__(self, path: Union[str, Path, PostgresURL], busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path: Any = location(path)  # a Path, or a PostgresURL (``shared``)
        self.shared = isinstance(self.path, PostgresURL)
        self.busy_timeout = busy_timeout
        # every write of every store on this database takes it
        self.turn: Any = _NoTurn() if self.shared else write_turn(self.path)
        self._local = threading.local()
        self._identity: FileIdentity = None  # of the file this store's first connection opened
        self._moved_logged = False

    @classmethod
    def open(cls, path: Union[str, Path], **kwargs):
        """Create and migrate the database if needed, then return the store on it."""
        store = cls(path, **kwargs)
        opened = open_state(store.path, store.busy_timeout)
        if store.shared:
            return store
        store._local.db = opened
        store._identity = file_identity(store.path)
        return store

    @property
    def db(self) -> Any:
        """This thread's connection, opened on first use; ``StateMoved`` once the file was swapped.

        On PostgreSQL, the process's ``state_postgres.Database``: each statement borrows a
        pooled connection (a transaction keeps one throughout: ``write``)."""
        if self.shared:
            return state_postgres.database(self.path, self.busy_timeout)
        self.check_identity()
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, self.busy_timeout)
            self._local.synchronous = "FULL"
            if self._identity is None:
                self._identity = file_identity(self.path)
        return db

    def check_identity(self) -> None:
        """Raise ``StateMoved`` if the file at ``path`` is no longer the one this store opened.

        An operator's ``rm`` or a restore while the daemon runs leaves the open connections on
        the old inode: commits would still succeed, into a file nobody reads again, and TheHive
        never re-sends. So every use compares (st_dev, st_ino) (one ``stat``) and the store
        refuses from then on, with one CRITICAL line per store; it never follows the new file
        (the old connections of this and other processes still share its ``-wal`` by name):
        a restart does, through the checks at start.
        """
        if self._identity is None or self.shared:
            return
        now = file_identity(self.path)
        if now == self._identity:
            return
        what = "removed" if now is None else "replaced by another file"
        if not self._moved_logged:
            self._moved_logged = True
            log.critical("state database %s was %s while the daemon had it open: webhooks get 503 "
                         "until the daemon is restarted", self.path, what)
        raise StateMoved(f"state database {self.path} was {what}; restart the daemon")

    def rows(self, sql: str, params: Any = ()) -> Any:
        """The rows of a long read, without holding them all in memory: SQLite's cursor steps
        through them; on PostgreSQL a server-side cursor (``Database.iterate``)."""
        if self.shared:
            return state_postgres.database(self.path, self.busy_timeout).iterate(sql, params)
        return self.db.execute(sql, params)

    def close(self) -> None:
        if self.shared:
            return  # the pool is the process's (state_postgres.close_all)
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def write(self, fn: Callable[[sqlite3.Connection], T], durable: Optional[bool] = None) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction: committed on return, rolled back on error.

        ``durable`` (default: the store's ``DURABLE_WRITES``) commits with ``synchronous=FULL``:
        on disk when this returns, even across a power cut. Otherwise ``NORMAL``: safe from a
        crash of the process and never corrupt, but a power cut may undo the last commits, and
        the commit does not wait for the disk. That is for what can be redone (the sync's
        bookkeeping: every sync step is idempotent), so that it does not hold the one write
        lock through an fsync that the web's puts are waiting behind. A later durable commit
        makes every earlier one durable too (one WAL).

        An error that a new connection may not have (``_reopen_helps``: a connection opened while
        the file was read-only stays read-only after it is writable again) closes this thread's
        connection and the transaction is tried once more on a new one: once the file is
        writable, the first write succeeds, with no restart. The identity is checked again after
        the commit, so an event committed into a removed file is not reported as stored.
        """
        if self.shared:
            return state_postgres.database(self.path, self.busy_timeout).transaction(
                fn, self.DURABLE_WRITES if durable is None else durable)
        try:
            return self._transaction(fn, durable)
        except sqlite3.Error as exc:
            if not _reopen_helps(exc):
                raise
            self.close()
        try:
            return self._transaction(fn, durable)
        except sqlite3.Error as exc:
            if _reopen_helps(exc):
                self.close()
            raise

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], durable: Optional[bool]) -> T:
        turn = self.turn.take(self.busy_timeout)
        try:
            return self._transaction_in_turn(fn, durable)
        finally:
            if turn:
                self.turn.give()

    def _transaction_in_turn(self, fn: Callable[[sqlite3.Connection], T], durable: Optional[bool]) -> T:
        db = self.db
        mode = "FULL" if (self.DURABLE_WRITES if durable is None else durable) else "NORMAL"
        if getattr(self._local, "synchronous", "FULL") != mode:
            db.execute(f"PRAGMA synchronous={mode}")
            self._local.synchronous = mode
        try:
            db.execute("BEGIN IMMEDIATE")
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.check_identity()
        return result


def meta_lease(store: Store, key: str, owner: str, take: bool, ttl_s: float) -> bool:
    """A lease in ``meta`` that lets one process at a time do a background job (write-back,
    the enrichment queue): taken if free, expired or ours (True), else False; given back with
    ``take=False``. A process that dies holding it frees it after ``ttl_s``."""
    now = time.time()  # between processes: the wall clock

    def change(db: sqlite3.Connection) -> bool:
        exclusive(db, f"meta:{key}")
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        holder, until = json.loads(row["value"]) if row is not None else (None, 0)
        if not take:
            if holder == owner:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            return True
        if holder not in (None, owner) and until > now:
            return False
        set_meta(db, key, json.dumps([owner, now + ttl_s]))
        return True

    return store.write(change)


def set_meta(db: Any, key: str, value: str) -> None:
    """``meta[key] = value``, in either engine's words (an upsert both understand)."""
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (key, value))
