"""The state database on PostgreSQL: for more than one daemon (hosts) sharing one truth.

SQLite stays the default; ``state_db: postgresql://…`` puts the same tables on a server so that
two or more daemons behind one URL share the inbox, the sync state, the cache, keys and quotas.

Why it is shaped this way:

* **The stores' SQL is written once.** They speak the subset both engines share (``ON CONFLICT``
  upserts, row values, partial indexes); what differs mechanically is translated here, once per
  statement text (``pg_sql``): ``?`` and ``:name`` placeholders, ``%`` escaped for psycopg, and
  SQLite's planner hints (``INDEXED BY``) dropped. The few places where the engines really differ
  (the inbox's insert and claim, SQLite's pragmas) ask ``dialect``.
* **Errors keep their meaning.** Every psycopg error leaves here as a subclass of the matching
  ``sqlite3`` exception (``Unavailable`` is an ``sqlite3.OperationalError``): the web's 503, the
  worker's retry and the CLI's messages already handle those, and so handle a PostgreSQL that is
  down, restarting or refusing, with no second set of ``except`` clauses to keep in step.
* **Connections come from psycopg's pool**, one per process (a forked gunicorn worker makes its
  own), borrowed per transaction or per read and checked before use when idle a while, so that a
  server restart costs no failed request once it is back; waiting for a connection is bounded by
  the store's busy timeout, past which the caller gets ``Unavailable`` (503 on ingest, a retry in
  the worker). A transaction PostgreSQL cancels to break a deadlock is run again.
* **Rows look like ``sqlite3.Row``** (by index and by name, ``keys()``), ``numeric`` comes back as
  ``int``/``float`` and ``bool`` parameters go as integers, as SQLite stores them.
* **Migrations run once, whoever starts first**: under a transaction-level advisory lock, the
  version read again inside it. PostgreSQL support starts at schema 10: its first migration makes
  the tables SQLite reached in ten steps; later numbers are shared by both engines.
"""
from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")
POOL_MAX = 10            # connections per process at most (docs/deployment.md: sizing)
CONNECT_TIMEOUT_S = 5    # libpq's connect_timeout: an unreachable server fails fast, then 503
IDLE_CHECK_S = 2.0       # a pooled connection idle longer than this is checked before it is lent
RERUNS = 3               # a transaction PostgreSQL cancelled as a deadlock's victim is run again
LOCK_WAIT_S = 30.0       # for a pooled connection to hold advisory locks on

T = TypeVar("T")


class Unavailable(sqlite3.OperationalError):
    """PostgreSQL could not do it: unreachable, restarting, out of connections, refusing."""


class Stale(Unavailable):
    """The connection was broken before the statement ran (a server restart the pool had not yet
    noticed): nothing was done, and a new connection may do it (``Database`` runs it again)."""


class Integrity(sqlite3.IntegrityError):
    """A constraint refused the row (as ``sqlite3.IntegrityError`` would)."""


class Data(sqlite3.DataError):
    """A value the column cannot hold."""


def is_url(location: Any) -> bool:
    """Whether ``state_db`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, PostgresURL) or (isinstance(location, str) and location.startswith(SCHEMES))


class PostgresURL:
    """A ``postgresql://`` location whose password never shows: ``str`` and ``repr`` mask it.

    The password may also come from ``${ENV}`` in config.yaml, a libpq service (``?service=``) or
    a pgpass file, which libpq reads itself; this class only keeps it out of text.
    """

    __slots__ = ("_url",)

    def __init__(self, url: str) -> None:
        if not str(url).startswith(SCHEMES):
            raise ValueError("a PostgreSQL URL starts with postgresql://")
        self._url = str(url)

    @property
    def conninfo(self) -> str:
        """The URL itself, password included: for libpq only."""
        return self._url

    @property
    def password(self) -> Optional[str]:
        """In the user part, or as libpq's ``?password=`` parameter."""
        parts = urlsplit(self._url)
        return parts.password or (parse_qs(parts.query).get("password") or [None])[0]

    def __str__(self) -> str:
        parts = urlsplit(self._url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = _QUERY_PASSWORD.sub(r"\1***", parts.query)
        return urlunsplit(parts._replace(query=query))

    def __repr__(self) -> str:
        return f"PostgresURL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostgresURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)


_QUERY_PASSWORD = re.compile(r"((?:^|&)password=)[^&]*")


def _driver():
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise Unavailable("state_db is a PostgreSQL URL but psycopg is not installed: "
                          "pip install 'tq-mw-thehive[postgresql]'") from None
    return psycopg


# --- the dialect -------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEXED_BY = re.compile(r"\s+INDEXED\s+BY\s+[A-Za-z0-9_]+", re.IGNORECASE)
_IS_PARAMETER = re.compile(r"\bIS(\s+NOT)?\s+\?")  # SQLite's null-safe "x IS ?"


@functools.lru_cache(maxsize=2048)
def pg_sql(sql: str) -> str:
    """SQLite's statement text in psycopg's: ``?`` → ``%s``, ``:name`` → ``%(name)s``, ``%`` →
    ``%%`` (also inside literals: psycopg reads the whole text), ``INDEXED BY x`` dropped, and
    ``IS [NOT] ?`` (null-safe equality) → ``IS [NOT] DISTINCT FROM``, inverted as it reads."""
    sql = _INDEXED_BY.sub("", sql)
    sql = _IS_PARAMETER.sub(lambda m: "IS DISTINCT FROM ?" if m.group(1) else "IS NOT DISTINCT FROM ?", sql)
    out: List[str] = []
    quoted = False
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch == "'":
            quoted = not quoted
        elif ch == "%":
            out.append("%%")
            i += 1
            continue
        elif not quoted and ch == "?":
            out.append("%s")
            i += 1
            continue
        elif not quoted and ch == ":" and (i == 0 or sql[i - 1] != ":"):
            match = _NAME.match(sql, i + 1)
            if match and (i + 1 >= n or sql[i + 1] != ":"):
                out.append(f"%({match.group()})s")
                i = match.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _params(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
    return tuple(int(v) if isinstance(v, bool) else v for v in (params or ()))


class Row:
    """A row read by name or index, like ``sqlite3.Row``."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: Sequence[Any], index: Dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> List[str]:
        return list(self._index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self._values == other._values and self.keys() == other.keys()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


def _wrap(exc: BaseException, conn: Any = None) -> sqlite3.Error:
    """``exc`` as the matching ``sqlite3`` error; ``Stale`` when ``conn`` is broken (ask only where
    a broken connection means nothing was done: never of a COMMIT)."""
    psycopg = _driver()
    text = str(exc).strip() or type(exc).__name__
    if conn is not None and conn.broken:
        return Stale(f"PostgreSQL: {text}")
    if isinstance(exc, psycopg.IntegrityError):
        return Integrity(text)
    if isinstance(exc, psycopg.DataError):
        return Data(text)
    return Unavailable(f"PostgreSQL: {text}")


class Result:
    """What a statement gave: its rows, read at once (the connection goes back to the pool)."""

    def __init__(self, rows: List[Row], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Optional[Row]:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> List[Row]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())


class Connection:
    """One borrowed connection, spoken to as the stores speak to sqlite3's."""

    dialect = "postgresql"

    def __init__(self, conn: Any, raw_conflicts: bool = False) -> None:
        self._conn = conn
        self._raw_conflicts = raw_conflicts  # let deadlocks through, for the transaction to run again

    def execute(self, sql: str, params: Any = ()) -> Result:
        psycopg = _driver()
        try:
            cursor = self._conn.cursor()
            cursor.execute(pg_sql(sql), _params(params))
            rows = cursor.fetchall() if cursor.description is not None else []
            return Result(rows, cursor.rowcount)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            if self._raw_conflicts:
                raise
            raise _wrap(exc) from None
        except psycopg.Error as exc:
            raise _wrap(exc, self._conn) from None



def _numeric_loader():
    from psycopg.adapt import Loader

    class NumericLoader(Loader):
        """``numeric`` (SUM of bigints) as SQLite gives it: an int, or a float."""

        def load(self, data: Any) -> Any:
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)

    return NumericLoader


def _configure(conn: Any) -> None:
    conn.adapters.register_loader("numeric", _numeric_loader())


def _check(conn: Any) -> None:
    """Before a connection is lent: one round trip to be sure it still works (after a server
    restart the pool's connections are broken; the pool drops one that fails here and lends
    another), unless it was last given back moments ago, working: under load a check per
    statement would double the round trips."""
    used = getattr(conn, "_tq_returned_at", None)
    if used is not None and time.monotonic() - used < IDLE_CHECK_S:
        return
    conn.execute("")


# --- the database: a pool per process ----------------------------------------------------------

_pools: Dict[PostgresURL, Tuple[int, Any]] = {}  # url -> (the pid that made it, its pool)
_pools_lock = threading.Lock()


def _pool(url: PostgresURL) -> Any:
    """This process's one pool for ``url``, whatever the waits its users accept: ``POOL_MAX``
    connections a process in all (docs/deployment.md's sizing rests on it)."""
    with _pools_lock:
        made = _pools.get(url)
        if made is not None and made[0] == os.getpid():
            return made[1]
        _driver()
        from psycopg_pool import ConnectionPool

        # A forked worker never touches its parent's pool (its sockets are the parent's).
        pool = ConnectionPool(
            url.conninfo, min_size=1, max_size=POOL_MAX, open=False,
            kwargs={"autocommit": True, "row_factory": _row_factory, "connect_timeout": CONNECT_TIMEOUT_S,
                    "application_name": "tq-mw-thehive"},
            configure=_configure, check=_check, reconnect_timeout=0, name="tq-state")
        pool.open(wait=False)
        _pools[url] = (os.getpid(), pool)
        return pool


class Database:
    """The PostgreSQL database at one URL, for this process, with the wait for a connection its
    user accepts: what a ``state.Store`` uses. Every ``Database`` of a URL shares its pool."""

    dialect = "postgresql"

    def __init__(self, url: PostgresURL, timeout: float) -> None:
        self.url = url
        self.timeout = timeout

    @contextmanager
    def connection(self) -> Iterator[Any]:
        psycopg = _driver()
        try:
            with _pool(self.url).connection(timeout=self.timeout) as conn:
                yield conn
                conn._tq_returned_at = time.monotonic()  # worked: no check if lent again soon
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            raise  # for ``transaction`` to run again (what reaches a caller was wrapped before)
        except psycopg.Error as exc:
            raise _wrap(exc) from None

    def execute(self, sql: str, params: Any = ()) -> Result:
        for attempt in range(POOL_MAX + 1):
            try:
                with self.connection() as conn:
                    return Connection(conn).execute(sql, params)
            except Stale:  # the pool drops that connection: the next one is another
                if attempt == POOL_MAX:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def iterate(self, sql: str, params: Any = (), size: int = 500) -> Iterator[Row]:
        """A long read, ``size`` rows at a time (a server-side cursor), where ``execute`` would
        hold every row in memory at once: months of stored bodies, for ``cache warm``."""
        psycopg = _driver()
        with self.connection() as conn:
            try:
                with conn.transaction(), conn.cursor(name="tq_iterate") as cursor:
                    cursor.itersize = size
                    cursor.execute(pg_sql(sql), _params(params))
                    yield from cursor
            except psycopg.Error as exc:
                raise _wrap(exc) from None

    def transaction(self, fn: Callable[[Connection], T], durable: bool) -> T:
        """Run ``fn`` in one transaction (READ COMMITTED), committed on return.

        Not durable: ``synchronous_commit`` off for this transaction only, the engine's own form
        of SQLite's ``synchronous=NORMAL`` for redoable bookkeeping: never corrupt, may lose the
        last commits in a crash of the server, and the commit does not wait for the disk.

        A deadlock or serialisation failure, which PostgreSQL resolves by cancelling one of the
        transactions, is run again (up to ``RERUNS`` times): ``fn`` only talks to the database,
        and nothing of a cancelled transaction was kept. So is a transaction whose connection
        turned out broken before its COMMIT (``Stale``: the server restarted): a COMMIT that
        fails is never run again, its outcome being unknown.
        """
        psycopg = _driver()
        conflicts = stale = 0
        while True:
            try:
                return self._transaction(fn, durable)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                conflicts += 1
                if conflicts > RERUNS:
                    raise _wrap(exc) from None
            except Stale:
                stale += 1
                if stale > POOL_MAX:
                    raise

    def _transaction(self, fn: Callable[[Connection], T], durable: bool) -> T:
        psycopg = _driver()
        with self.connection() as conn:
            try:
                # One round trip for both (a text without parameters may hold several statements):
                # the sync's bookkeeping is a transaction of one or two statements, where each
                # round trip counts.
                conn.execute(_BEGIN if durable else _BEGIN_NOT_DURABLE)
            except psycopg.Error as exc:
                raise _wrap(exc, conn) from None
            try:
                result = fn(Connection(conn, raw_conflicts=True))
            except BaseException:
                if not conn.broken:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass  # the error being raised says more
                raise
            try:
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise _wrap(exc) from None  # never Stale: it may have committed
            return result

    def close(self) -> None:
        """Nothing: the pool is the process's, shared by every store (``close_all`` ends it)."""


_BEGIN = "BEGIN"
_BEGIN_NOT_DURABLE = "BEGIN; SET LOCAL synchronous_commit TO OFF"

_databases: Dict[Tuple[PostgresURL, float], Database] = {}
_databases_lock = threading.Lock()


def database(url: PostgresURL, timeout: float) -> Database:
    """The ``Database`` of this process for ``url`` and this wait: every one shares the URL's pool."""
    with _databases_lock:
        db = _databases.get((url, timeout))
        if db is None:
            db = _databases[(url, timeout)] = Database(url, timeout)
        return db


def close_all() -> None:
    """Close this process's pools (the master before it forks its workers, tests between runs)."""
    with _databases_lock, _pools_lock:
        for pid, pool in _pools.values():
            if pid == os.getpid():
                pool.close()
        _pools.clear()
        _databases.clear()


def lock_key(name: str) -> int:
    """A stable 32-bit advisory lock key for ``name`` (the same on every host)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def xact_lock(db: Any, name: str) -> None:
    """Serialise the transaction of ``db`` with every other taking the lock ``name``, on every host,
    until it ends: what SQLite's one writer gives for free (``BEGIN IMMEDIATE``)."""
    if getattr(db, "dialect", "sqlite") == "postgresql":
        db.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(name),))


@contextmanager
def session_locks(url: PostgresURL, names: Sequence[str], timeout: float) -> Iterator[None]:
    """Advisory locks held across network calls (a token refresh, ThreatQ objects' upserts), on
    every host: taken in the order given (callers sort, so two holders cannot deadlock), on one
    pooled connection kept outside any transaction until they are given back. The server frees
    them if this process dies or its connection breaks."""
    psycopg = _driver()
    with database(url, timeout).connection() as conn:
        keys = [lock_key(name) for name in names]
        try:
            for key in keys:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        except psycopg.Error as exc:
            raise _wrap(exc) from None
        try:
            yield
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass  # a broken connection: the pool discards it, and the server freed the locks


# --- the schema --------------------------------------------------------------------------------

_BASE = [
    """CREATE TABLE inbox (
            id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            dedup_key       TEXT    NOT NULL UNIQUE,
            received_at     DOUBLE PRECISION NOT NULL,
            order_ts        BIGINT  NOT NULL,
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
            next_attempt_at DOUBLE PRECISION NOT NULL,
            lease_owner     TEXT,
            lease_until     DOUBLE PRECISION,
            last_error      TEXT,
            finished_at     DOUBLE PRECISION,
            replayed_at     DOUBLE PRECISION
        )""",
    "CREATE INDEX inbox_due ON inbox (state, next_attempt_at)",
    "CREATE INDEX inbox_case ON inbox (case_key, state, order_ts, id)",
    "CREATE INDEX inbox_pending_order ON inbox (state, order_ts, id)",
    "CREATE INDEX inbox_pending_received ON inbox (received_at) WHERE state = 'pending'",
    "CREATE INDEX inbox_leased ON inbox (lease_until) WHERE lease_until IS NOT NULL",
    "CREATE INDEX inbox_done_finished ON inbox (finished_at) WHERE state = 'done'",
    "CREATE INDEX inbox_received ON inbox (received_at)",
    "CREATE INDEX inbox_object ON inbox (object_id, id)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    # The counts by state, as SQLite's triggers keep them, but in 16 slots a state (readers sum
    # them): every insert and every finished event updates a count, and that row stays locked
    # until its transaction commits; one row a state made every daemon's writers queue on it.
    # A session always counts in the same slot (its backend's pid), so sessions rarely share one.
    "CREATE TABLE inbox_counts (state TEXT NOT NULL, slot INTEGER NOT NULL, n BIGINT NOT NULL, "
    "PRIMARY KEY (state, slot))",
    "INSERT INTO inbox_counts (state, slot, n) SELECT s, g, 0 FROM (VALUES ('pending'), ('done'), ('dead')) AS v(s) "
    "CROSS JOIN generate_series(0, 15) AS g",
    """CREATE FUNCTION inbox_counts_change() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
           IF TG_OP IN ('UPDATE', 'DELETE') THEN
               UPDATE inbox_counts SET n = n - 1 WHERE state = OLD.state AND slot = pg_backend_pid() % 16;
           END IF;
           IF TG_OP IN ('UPDATE', 'INSERT') THEN
               UPDATE inbox_counts SET n = n + 1 WHERE state = NEW.state AND slot = pg_backend_pid() % 16;
           END IF;
           RETURN NULL;
       END $$""",
    """CREATE TRIGGER inbox_counts_insert_delete AFTER INSERT OR DELETE ON inbox
       FOR EACH ROW EXECUTE FUNCTION inbox_counts_change()""",
    """CREATE TRIGGER inbox_counts_update AFTER UPDATE OF state ON inbox
       FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION inbox_counts_change()""",
    # `rowid`: SQLite's implicit column, made explicit where the stores read it (insert order).
    """CREATE TABLE object_map (
            rowid       BIGINT GENERATED BY DEFAULT AS IDENTITY,
            thehive_id  TEXT    NOT NULL,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            collection  TEXT    NOT NULL,
            tq_id       BIGINT  NOT NULL,
            case_id     TEXT,
            PRIMARY KEY (thehive_id, collection, tq_id)
        )""",
    "CREATE INDEX object_map_case ON object_map (case_id)",
    """CREATE TABLE sync_state (
            thehive_id  TEXT    PRIMARY KEY,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            applied_ts  BIGINT  NOT NULL,
            tags        TEXT    NOT NULL DEFAULT '[]',
            held_case   TEXT,
            digest      TEXT
        )""",
    """CREATE TABLE enrichment_cache (
            plugin      TEXT    NOT NULL,
            version     TEXT    NOT NULL,
            data_type   TEXT    NOT NULL,
            value       TEXT    NOT NULL,
            found       INTEGER NOT NULL,
            verdict     TEXT,
            result      TEXT    NOT NULL,
            fetched_at  DOUBLE PRECISION NOT NULL,
            expires_at  DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (plugin, version, data_type, value)
        )""",
    """CREATE TABLE enrichment_stats (
            plugin      TEXT    PRIMARY KEY,
            hits        BIGINT  NOT NULL DEFAULT 0,
            misses      BIGINT  NOT NULL DEFAULT 0,
            errors      BIGINT  NOT NULL DEFAULT 0,
            lookup_ms   DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
    """CREATE TABLE api_keys (
            name        TEXT    PRIMARY KEY,
            value       TEXT    NOT NULL,
            set_at      DOUBLE PRECISION NOT NULL
        )""",
    """CREATE TABLE watches (
            value       TEXT    NOT NULL,
            data_type   TEXT    NOT NULL,
            interval_s  DOUBLE PRECISION NOT NULL,
            next_due    DOUBLE PRECISION NOT NULL,
            added_at    DOUBLE PRECISION NOT NULL,
            origin      TEXT    NOT NULL,
            tlp         TEXT,
            pap         TEXT,
            PRIMARY KEY (value, data_type)
        )""",
    """CREATE TABLE status_login_failures (
            rowid       BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            client      TEXT    NOT NULL,
            at          DOUBLE PRECISION NOT NULL
        )""",
    "CREATE INDEX status_login_failures_client ON status_login_failures (client, at)",
    "CREATE INDEX status_login_failures_at ON status_login_failures (at)",
    """CREATE TABLE status_sessions (
            digest      TEXT    PRIMARY KEY,
            expires_at  DOUBLE PRECISION NOT NULL
        )""",
    """CREATE TABLE writeback (
            thehive_id  TEXT    PRIMARY KEY,
            kind        TEXT    NOT NULL CHECK (kind IN ('case', 'observable')),
            want_tags   TEXT    NOT NULL DEFAULT '[]',
            sent_tags   TEXT    NOT NULL DEFAULT '[]',
            want_field  TEXT,
            sent_field  TEXT,
            due_at      DOUBLE PRECISION,
            attempts    INTEGER NOT NULL DEFAULT 0,
            last_error  TEXT
        )""",
    "CREATE INDEX writeback_due ON writeback (due_at) WHERE due_at IS NOT NULL",
    """CREATE TABLE quota_calls (
            plugin  TEXT NOT NULL,
            key_id  TEXT NOT NULL,
            at      DOUBLE PRECISION NOT NULL
        )""",
    "CREATE INDEX quota_calls_by_key ON quota_calls (plugin, key_id, at)",
    """CREATE TABLE quota_pauses (
            plugin    TEXT NOT NULL,
            key_id    TEXT NOT NULL,
            until     DOUBLE PRECISION NOT NULL,
            last_429  DOUBLE PRECISION,
            reason    TEXT,
            strikes   INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (plugin, key_id)
        )""",
    """CREATE TABLE enrichment_deferred (
            id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            plugin     TEXT    NOT NULL,
            key_id     TEXT    NOT NULL,
            data_type  TEXT    NOT NULL,
            value      TEXT    NOT NULL,
            tlp        TEXT,
            pap        TEXT,
            origin     TEXT    NOT NULL CHECK (origin IN ('case', 'monitor')),
            priority   INTEGER NOT NULL,
            queued_at  DOUBLE PRECISION NOT NULL,
            due_at     DOUBLE PRECISION NOT NULL,
            attempts   INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            UNIQUE (plugin, data_type, value, origin)
        )""",
    "CREATE INDEX enrichment_deferred_order ON enrichment_deferred (plugin, key_id, priority, id)",
]

# Append only, as SQLite's list in state.py; a version here is the same version there.
MIGRATIONS: List[Tuple[int, str, List[str]]] = [
    (10, "schema of SQLite's migrations 1 to 10", _BASE),
]

MIGRATION_LOCK = "tq-mw-thehive:migrate"


def schema_version(conn: Any) -> int:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0


def migrate(url: PostgresURL, latest: int, check_not_newer: Callable[[int, int], None]) -> int:
    """Apply what the database lacks, one daemon at a time (the others wait, then find it done)."""
    psycopg = _driver()
    try:
        with psycopg.connect(url.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                             application_name="tq-mw-thehive migrate") as conn:
            current = schema_version(conn)
            check_not_newer(current, latest)
            if current == latest:
                return latest
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(MIGRATION_LOCK),))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                             "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
                current = schema_version(conn)
                check_not_newer(current, latest)
                for version, name, statements in MIGRATIONS:
                    if version > current:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                                     (version, name, time.time()))
    except psycopg.Error as exc:
        raise _wrap(exc) from None
    return latest


def describe(url: PostgresURL) -> Dict[str, Any]:
    """What ``check`` says about the server: its version, the database."""
    row = database(url, CONNECT_TIMEOUT_S).execute(
        "SELECT current_setting('server_version') AS version, current_database() AS db").fetchone()
    return {"server_version": row["version"], "database": row["db"]}
