"""The state on PostgreSQL (state_postgres.py): the dialect, the URL's secrecy, migrations that
run once however many daemons start together, the claim's order under concurrent claimers, the
advisory locks, and what a caller sees when the server is gone."""
from __future__ import annotations

import json
import multiprocessing
import socket
import sqlite3
import sys
import threading
from collections import Counter, defaultdict

import pytest

from click.testing import CliRunner

from conftest import minimal_config, sample, write_config
from tq_mw_thehive import check
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, startup, state, state_postgres
from tq_mw_thehive.cli import cli
from tq_mw_thehive.config import ConfigError
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.state_postgres import PostgresURL, pg_sql
from tq_mw_thehive.testing.postgres import PostgresServer
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import api as tq_api
from tq_mw_thehive.threatq.auth import Tokens


# --- the dialect, the URL: no server needed ---------------------------------------------------

@pytest.mark.parametrize("sqlite, postgres", [
    ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = %s AND b = %s"),
    ("SELECT 1 WHERE x > :now AND y <= :now", "SELECT 1 WHERE x > %(now)s AND y <= %(now)s"),
    ("SELECT 1 WHERE k LIKE 'case:%' AND v = '?'", "SELECT 1 WHERE k LIKE 'case:%%' AND v = '?'"),
    ("SELECT * FROM inbox AS e INDEXED BY inbox_pending_order WHERE 1", "SELECT * FROM inbox AS e WHERE 1"),
    ("UPDATE w SET d = NULL WHERE f IS ? AND g IS NOT ? AND h IS NULL",
     "UPDATE w SET d = NULL WHERE f IS NOT DISTINCT FROM %s AND g IS DISTINCT FROM %s AND h IS NULL"),
])
def test_sqlite_statements_are_translated_for_psycopg(sqlite, postgres):
    assert pg_sql(sqlite) == postgres


def test_the_url_never_shows_its_password():
    url = PostgresURL("postgresql://tq:s3cret-pw@db.example:5432/tq_state")
    assert "s3cret-pw" not in str(url) and "s3cret-pw" not in repr(url) and "s3cret-pw" not in f"{url}"
    assert str(url) == "postgresql://tq:***@db.example:5432/tq_state"
    assert url.conninfo.endswith("tq:s3cret-pw@db.example:5432/tq_state")


def test_config_takes_a_postgresql_url_with_the_password_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_PG_PASSWORD", "from-env-pw")
    raw = minimal_config()
    raw["state_db"] = "postgresql://tq:${TQ_PG_PASSWORD}@db.example/tq_state"
    cfg = config_mod.from_dict(raw, tmp_path)
    assert isinstance(cfg.state_db, PostgresURL) and state.is_shared(cfg.state_db)
    assert cfg.state_db.password == "from-env-pw"
    assert "from-env-pw" in cfg.secrets()  # registered for log redaction at start
    assert cfg.local_dir == tmp_path      # metric files, offline indexes: the config directory


@pytest.mark.parametrize("value, message", [
    ("postgresql://tq@db.example", "names no database"),
    ("postgresql://tq@db.example:notaport/x", "not a valid PostgreSQL URL"),
    (5432, "must be a file path or a postgresql:// URL"),
])
def test_a_wrong_state_db_is_a_clear_config_error(tmp_path, value, message):
    raw = minimal_config()
    raw["state_db"] = value
    with pytest.raises(ConfigError, match=message):
        config_mod.from_dict(raw, tmp_path)


def test_a_libpq_service_names_the_database(tmp_path):
    raw = minimal_config()
    raw["state_db"] = "postgresql:///?service=tq_state"
    assert isinstance(config_mod.from_dict(raw, tmp_path).state_db, PostgresURL)


# --- against the server ------------------------------------------------------------------------

def _migrate(url: str, barrier, results) -> None:
    barrier.wait(30)
    try:
        state.open_state(url)
        results.put(state_postgres.database(PostgresURL(url), 5).execute(
            "SELECT MAX(version) FROM schema_migrations").fetchone()[0])
    except Exception as exc:  # reported, not lost in the child
        results.put(repr(exc))


def test_daemons_starting_together_migrate_once(pg_url):
    """Four processes open a fresh database at the same moment: one migrates, the others wait for
    it under the advisory lock and find it done (no error, one row per version)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=_migrate, args=(pg_url, barrier, results)) for _ in range(4)]
    for p in processes:
        p.start()
    versions = [results.get(timeout=60) for _ in processes]
    for p in processes:
        p.join(30)
    assert versions == [state.MIGRATIONS[-1][0]] * 4
    db = state_postgres.database(PostgresURL(pg_url), 5)
    rows = db.execute("SELECT version, COUNT(*) AS n FROM schema_migrations GROUP BY version").fetchall()
    assert [tuple(r) for r in rows] == [(v, 1) for v, _, _ in state_postgres.MIGRATIONS]


def test_a_schema_newer_than_this_version_is_refused(pg_url):
    url = PostgresURL(pg_url)
    state.open_state(url)
    state_postgres.database(url, 5).execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
    with pytest.raises(state.StateError, match="newer than this version"):
        state.open_state(url)


def _event(case: int, n: int):
    payload = sample("th5-case-update.json")
    payload["_id"] = f"~audit-{case}-{n}"
    payload["_createdAt"] = 1_700_000_000_000 + n
    payload["objectId"] = payload["object"]["_id"] = f"~case{case}"
    return events.parse(payload), json.dumps(payload)


def test_concurrent_claimers_take_each_event_once_and_a_case_in_order(pg_url):
    """Eight claimers (as many daemons' workers) drain 6 cases × 15 events: every event is taken
    once, and a case's events are taken in TheHive's order, never two of a case at once."""
    state.open_state(pg_url)
    inbox = Inbox(pg_url)
    for n in range(15):
        for case in range(6):
            assert inbox.put(*_event(case, n)).created
    taken = defaultdict(list)
    overlaps = []
    in_flight = set()
    guard = threading.Lock()

    def claimer(owner: str) -> None:
        mine = Inbox(pg_url)
        idle = 0
        while idle < 50:
            items = mine.claim_batch(owner, lease_s=60, limit=3)
            if not items:
                idle += 1
                continue
            idle = 0
            case = items[0].case_key
            with guard:
                if case in in_flight:
                    overlaps.append(case)
                in_flight.add(case)
                taken[case].extend(item.order_ts for item in items)
            for item in items:
                assert mine.done(item.id, owner)
            with guard:
                in_flight.discard(case)

    threads = [threading.Thread(target=claimer, args=(f"host:{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert inbox.stats()["done"] == 90 and inbox.stats()["pending"] == 0
    assert overlaps == []
    for case, order in taken.items():
        assert order == sorted(order) and len(order) == 15, case


def test_advisory_locks_exclude_across_connections(pg_url):
    url = PostgresURL(pg_url)
    inside = threading.Event()
    order = []

    def other() -> None:
        inside.wait(10)
        with state_postgres.session_locks(url, ["threatq-object:7"], 10):
            order.append("other")

    thread = threading.Thread(target=other)
    thread.start()
    with state_postgres.session_locks(url, ["threatq-object:7"], 10):
        inside.set()
        thread.join(0.3)  # it must be waiting for the lock
        order.append("first")
    thread.join(10)
    assert order == ["first", "other"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_an_sqlite3_error_without_the_password(tmp_path):
    """What the web turns into 503 and the worker into a retry, as for a locked SQLite file."""
    url = f"postgresql://tq:s3cret-pw@127.0.0.1:{_closed_port()}/tq_state"
    logs.add_secrets(["s3cret-pw"])
    with pytest.raises(state.StateError) as opened:
        state.open_state(url)
    assert "s3cret-pw" not in str(opened.value) and "***" in str(opened.value)
    inbox = Inbox(url, busy_timeout=1)
    with pytest.raises(sqlite3.OperationalError) as wrote:
        inbox.put(*_event(1, 1))
    assert "s3cret-pw" not in str(wrote.value)
    with pytest.raises(sqlite3.OperationalError):
        inbox.stats()
    state_postgres.close_all()


def test_rows_read_like_sqlite_rows_and_sums_come_back_as_numbers(pg_url):
    state.open_state(pg_url)
    db = state_postgres.database(PostgresURL(pg_url), 5)
    db.execute("INSERT INTO enrichment_stats (plugin, hits) VALUES (?, ?), (?, ?)", ("a", 2, "b", 3))
    row = db.execute("SELECT SUM(hits) AS total, 'x' AS name FROM enrichment_stats").fetchone()
    assert row[0] == row["total"] == 5 and isinstance(row["total"], int)
    assert dict(zip(row.keys(), row)) == {"total": 5, "name": "x"}


def test_a_host_without_a_token_file_is_not_sent_to_configure_once_the_shared_state_has_tokens(
        tmp_path, pg_url, caplog):
    raw = minimal_config()
    raw["state_db"] = pg_url
    cfg = config_mod.from_dict(raw, tmp_path)
    caplog.set_level("WARNING", logger="tq_mw_thehive.startup")
    startup.prepare(cfg)
    assert "no ThreatQ tokens in" in caplog.text  # nothing anywhere yet: configure is the fix
    caplog.clear()
    stored = Tokens(access_token="shared-access", refresh_token="shared-refresh", expires_at=2e9)
    state.set_meta(state_postgres.database(PostgresURL(pg_url), 5), tq_api.SHARED_TOKENS_KEY,
                   json.dumps(stored.to_dict()))
    startup.prepare(cfg)
    assert "no ThreatQ tokens in" not in caplog.text


def _pg_config(tmp_path, url: str):
    write_config(tmp_path, state_db=url)
    return config_mod.from_dict(minimal_config(state_db=url), tmp_path)


def test_check_and_status_read_the_shared_state(tmp_path, pg_url):
    cfg = _pg_config(tmp_path, pg_url)
    result = check.check_state_db(check.Context(config_dir=tmp_path, log_dir=None, webhook_url=None, cfg=cfg))
    assert result.ok and "PostgreSQL 15" in result.detail and "writable, 0 pending" in result.detail, result
    Inbox(pg_url).put(*_event(1, 1))
    status = CliRunner().invoke(cli, ["status", "-c", str(tmp_path), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["pending"] == 1  # no file to miss: the shared inbox is read


def test_check_names_an_unreachable_server_and_the_fix_without_the_password(tmp_path):
    cfg = _pg_config(tmp_path, f"postgresql://tq:s3cret-pw@127.0.0.1:{_closed_port()}/tq_state")
    result = check.check_state_db(check.Context(config_dir=tmp_path, log_dir=None, webhook_url=None, cfg=cfg))
    assert not result.ok
    assert "s3cret-pw" not in result.detail and "tq:***@127.0.0.1" in result.detail
    assert "PostgreSQL is up and reachable" in result.fix
    state_postgres.close_all()


def test_a_postgresql_state_without_psycopg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg → ImportError
    with pytest.raises(state.StateError, match=r"pip install 'tq-mw-thehive\[postgresql\]'"):
        state.open_state("postgresql://tq@db.example/tq_state")


def test_a_deadlock_victim_is_run_again_and_both_transactions_commit(pg_url):
    """Two transactions locking two rows in opposite orders: PostgreSQL cancels one (after its
    deadlock_timeout, 1 s); the store runs it again instead of failing the write."""
    url = PostgresURL(pg_url)
    state.open_state(url)
    db = state_postgres.database(url, 10)
    for key in ("a", "b"):
        state.set_meta(db, key, "-")
    both_hold_one = threading.Barrier(2)
    runs: Counter = Counter()
    done = {}

    def swap(name: str, first: str, second: str) -> None:
        def fn(tx) -> int:
            runs[name] += 1
            tx.execute("UPDATE meta SET value = ? WHERE key = ?", (name, first))
            if runs[name] == 1:
                both_hold_one.wait(10)
            tx.execute("UPDATE meta SET value = ? WHERE key = ?", (name, second))
            return runs[name]
        done[name] = db.transaction(fn, durable=True)

    threads = [threading.Thread(target=swap, args=args) for args in (("t1", "a", "b"), ("t2", "b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done.values()) == [1, 2]  # one ran once, the deadlock's victim twice
    values = {r["key"]: r["value"] for r in db.execute("SELECT key, value FROM meta WHERE key IN ('a', 'b')")}
    assert len(set(values.values())) == 1  # the one that ran last wrote both rows


def test_a_long_read_is_served_by_a_server_side_cursor_in_order(pg_url, monkeypatch):
    """``cache warm`` reads every stored observable body: on PostgreSQL through ``Store.rows``,
    a batch at a time, the newest event of each object first."""
    state.open_state(pg_url)
    inbox = Inbox(pg_url)
    for n in range(3):
        for case in range(400):
            payload = sample("th5-observable-create-ip.json")
            payload["_id"], payload["_createdAt"] = f"~obs-{case}-{n}", 1_700_000_000_000 + n
            payload["objectId"] = payload["object"]["_id"] = f"~obs{case:04d}"
            inbox.put(events.parse(payload), json.dumps(payload))
    fetched = []
    real = state_postgres.Database.iterate

    def counting(self, sql, params=(), size=500):
        for row in real(self, sql, params, size=100):
            fetched.append(1)
            yield row

    monkeypatch.setattr(state_postgres.Database, "iterate", counting)
    bodies = list(inbox.object_bodies("observable"))
    assert len(bodies) == len(fetched) == 1200
    assert [object_id for object_id, _ in bodies[:3]] == ["~obs0000"] * 3
    assert [json.loads(body)["_id"] for _, body in bodies[:3]] == ["~obs-0-2", "~obs-0-1", "~obs-0-0"]


def test_a_password_given_as_a_libpq_parameter_is_masked_too():
    url = PostgresURL("postgresql://tq@db.example/tq_state?sslmode=require&password=s3cret-pw")
    assert "s3cret-pw" not in str(url) and "password=***" in str(url) and "sslmode=require" in str(url)
    assert url.password == "s3cret-pw"


def test_a_write_is_durable_unless_told_and_an_error_rolls_it_back(pg_url):
    """``durable=False`` (the sync's redoable bookkeeping) commits without waiting for the disk,
    as SQLite's synchronous=NORMAL; an accepted event's commit waits (on); a failure keeps nothing."""
    store = state.Store(pg_url)
    state.open_state(pg_url)
    show = lambda db: db.execute("SHOW synchronous_commit").fetchone()[0]  # noqa: E731
    assert store.write(show, durable=False) == "off"
    assert store.write(show, durable=True) == "on"
    assert store.write(show) == "on"  # DURABLE_WRITES of a plain store

    def half(db):
        state.set_meta(db, "half", "written")
        raise RuntimeError("stopped midway")

    with pytest.raises(RuntimeError):
        store.write(half)
    assert store.db.execute("SELECT 1 FROM meta WHERE key = 'half'").fetchone() is None
    assert store.write(lambda db: state.set_meta(db, "whole", "written") or "ok") == "ok"


def test_after_a_server_restart_the_first_write_and_read_succeed(tmp_path, monkeypatch):
    """The pool's connections die with the server; one lent before the pool noticed (here: never
    checked) fails before doing anything, so the store runs the write or read again on a new one
    instead of answering 503 for an event it could store."""
    monkeypatch.setattr(state_postgres, "IDLE_CHECK_S", 3600.0)
    server = PostgresServer(tmp_path / "pg").start()
    try:
        url = server.create_database("tq_state")
        state.open_state(url)
        inbox = Inbox(url)
        assert inbox.put(*_event(1, 1)).created and inbox.stats()["pending"] == 1
        server.kill()
        server.start()
        assert inbox.put(*_event(1, 2)).created
        assert inbox.stats()["pending"] == 2
    finally:
        state_postgres.close_all()
        server.stop("immediate")


def test_the_stores_and_the_advisory_locks_share_one_pool_of_pool_max(pg_url):
    """docs/deployment.md sizes PostgreSQL at POOL_MAX connections a process: the locks held
    across ThreatQ calls (a longer wait) borrow from the stores' pool, not a second one."""
    url = PostgresURL(pg_url)
    state.open_state(url)
    with state_postgres.session_locks(url, ["threatq-object:1"], state_postgres.LOCK_WAIT_S):
        state.Store(url).db.execute("SELECT 1")
    assert len(state_postgres._pools) == 1
    (_, pool), = state_postgres._pools.values()
    assert pool.max_size == state_postgres.POOL_MAX
