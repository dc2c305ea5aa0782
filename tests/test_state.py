"""The state database: file mode, WAL, numbered migrations, concurrent first start."""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tq_mw_thehive import state


def migration_rows(db):
    return [tuple(r) for r in db.execute(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")]


def expected_versions():
    return [(version, name) for version, name, _ in state.MIGRATIONS]


def test_open_state_creates_private_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = state.open_state(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # SQLite gives -wal/-shm the mode of the database file; they exist while a WAL connection is open.
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            assert side.exists()
            assert stat.S_IMODE(side.stat().st_mode) == 0o600
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert [(v, n) for v, n, _ in migration_rows(db)] == expected_versions()
        assert expected_versions()[0] == (1, "inbox")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"inbox", "meta", "schema_migrations"} <= tables
    finally:
        db.close()


def test_journal_mode_is_persistent_for_plain_connections(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    state.open_state(path).close()
    raw = sqlite3.connect(str(path))
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_open_twice_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = state.open_state(path)
    first.execute("INSERT INTO meta (key, value) VALUES ('marker', 'kept')")
    before = migration_rows(first)
    first.close()

    second = state.open_state(path)
    try:
        assert migration_rows(second) == before  # same rows, same applied_at
        assert second.execute("SELECT value FROM meta WHERE key = 'marker'").fetchone()[0] == "kept"
        assert state.migrate(second) == state.MIGRATIONS[-1][0]
        assert migration_rows(second) == before
    finally:
        second.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = state.open_state(path)
    newer = state.MIGRATIONS[-1][0] + 1
    db.execute("INSERT INTO schema_migrations VALUES (?, 'from-the-future', 0)", (newer,))
    db.close()

    with pytest.raises(state.StateError, match="newer"):
        state.open_state(path)

    # The refusal rolled back: the database is left exactly as it was.
    check = state.connect(path)
    try:
        assert [r[0] for r in check.execute("SELECT version FROM schema_migrations ORDER BY version")] \
            == [v for v, _ in expected_versions()] + [newer]
    finally:
        check.close()


def test_missing_directory_is_a_state_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist" / "state.db"
    with pytest.raises(state.StateError) as err:
        state.open_state(path)
    assert str(path) in str(err.value)
    assert not path.parent.exists()


def test_directory_as_database_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()
    with pytest.raises(state.StateError) as err:
        state.open_state(path)
    assert str(path) in str(err.value)


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    """Several workers start at once on a fresh file: all succeed, each migration applied once."""
    path = tmp_path / "state.db"
    n = 8
    barrier = threading.Barrier(n, timeout=10)

    def opener(_: int):
        barrier.wait()
        db = state.open_state(path)
        try:
            return db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]
        finally:
            db.close()

    with ThreadPoolExecutor(max_workers=n) as pool:
        counts = list(pool.map(opener, range(n)))

    assert counts == [len(state.MIGRATIONS)] * n
    db = state.connect(path)
    try:
        assert [(v, name) for v, name, _ in migration_rows(db)] == expected_versions()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        db.close()


def test_open_state_honours_busy_timeout_during_first_start(tmp_path: Path) -> None:
    """The deterministic form of the first-start race: another worker is mid-way through creating the file.

    A correct open_state waits up to busy_timeout for the lock before giving up.
    """
    path = tmp_path / "state.db"
    other = sqlite3.connect(str(path), isolation_level=None)  # rollback journal, as a fresh file is
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(state.StateError, match="locked"):
            state.open_state(path, busy_timeout=0.3)
        assert time.monotonic() - started >= 0.25
    finally:
        other.execute("ROLLBACK")
        other.close()
    state.open_state(path).close()


def test_open_state_of_an_up_to_date_database_needs_no_write_lock(tmp_path: Path) -> None:
    """A worker restarting while another process holds a long write must still start."""
    path = tmp_path / "state.db"
    state.open_state(path).close()
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        db = state.open_state(path, busy_timeout=0.1)
        assert state.schema_version(db) == state.MIGRATIONS[-1][0]
        db.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_only_what_cannot_be_redone_waits_for_the_disk(tmp_path):
    """Accepted events commit with synchronous=FULL; the sync's bookkeeping (claims, done marks,
    object map) with NORMAL, since the idempotent sync redoes whatever a power cut undoes."""
    from tq_mw_thehive.inbox import Inbox
    from tq_mw_thehive.sync_state import SyncState
    from tq_mw_thehive.thehive import events

    path = tmp_path / "state.db"
    state.open_state(path).close()
    inbox, sync_state = Inbox(path), SyncState(path)
    mode = lambda store: store.db.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
    FULL, NORMAL = 2, 1
    payload = {"_id": "~1", "objectType": "Case", "operation": "Creation", "objectId": "~9",
               "object": {"_id": "~9", "_type": "Case", "title": "t"}, "_createdAt": 1}
    inbox.put(events.parse(payload), "{}")
    assert mode(inbox) == FULL
    item = inbox.claim("me")
    assert mode(inbox) == NORMAL
    inbox.done(item.id, "me")
    assert mode(inbox) == NORMAL
    payload["_id"] = "~2"
    inbox.put(events.parse(payload), "{}")
    assert mode(inbox) == FULL
    sync_state.mark_applied("~9", "case", 1)
    assert mode(sync_state) == NORMAL
    assert sync_state.applied_ts("~9") == 1


# ------------------------------------------------------------------ a file that changes under the daemon


def _store(tmp_path: Path) -> state.Store:
    store = state.Store.open(tmp_path / "state.db")
    store.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES ('a', '1')"))
    return store


def test_a_connection_opened_read_only_is_reopened_once_the_file_is_writable(tmp_path: Path) -> None:
    """SQLite keeps a connection opened while the file was read-only read-only for ever: the
    write must reopen it and succeed, without a restart of the process."""
    store = _store(tmp_path)
    store.close()
    stale = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None,
                            check_same_thread=False)
    store._local.db = stale  # what this thread opened while the file was read-only
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        stale.execute("INSERT INTO meta (key, value) VALUES ('b', '2')")
    store.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES ('b', '2')"))
    assert store.db is not stale
    assert store.db.execute("SELECT value FROM meta WHERE key = 'b'").fetchone()[0] == "2"


def test_a_removed_database_is_refused_with_one_critical_line_and_not_recreated(tmp_path: Path, caplog) -> None:
    store = _store(tmp_path)
    store.path.unlink()
    for _ in range(2):
        with pytest.raises(state.StateMoved, match="was removed"):
            store.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES ('b', '2')"))
    with ThreadPoolExecutor(1) as pool, pytest.raises(sqlite3.Error):  # another thread's first connection
        pool.submit(lambda: store.db).result()
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1 and "was removed while the daemon had it open" in critical[0].getMessage()
    assert not store.path.exists()


def test_a_replaced_database_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    other = state.Store.open(tmp_path / "restored.db")
    other.close()
    (tmp_path / "restored.db").replace(store.path)
    with pytest.raises(state.StateMoved, match="replaced by another file"):
        store.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES ('b', '2')"))


def test_a_database_created_by_a_plain_connection_is_private(tmp_path: Path) -> None:
    """A file SQLite creates takes the umask's mode; this one holds plugin keys."""
    old = os.umask(0o022)
    try:
        state.connect(tmp_path / "new.db").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o600
