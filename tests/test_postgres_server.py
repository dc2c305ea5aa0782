"""tq_mw_thehive.testing.postgres: the throwaway PostgreSQL server the state suites run against."""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

import psycopg
import pytest

from tq_mw_thehive.testing.postgres import PostgresServer, find_bin_dir


def _connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=5)


def test_the_server_answers_over_its_url(postgres_server):
    assert postgres_server.url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    with _connect(postgres_server.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("postgres", "postgres")


def test_the_pg_url_fixture_sets_the_search_path_to_a_schema_of_the_tests_own(pg_url):
    assert "?options=-csearch_path%3Dt_test_the_pg_url_fixture" in pg_url
    with _connect(pg_url) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
    assert schema.startswith("t_test_the_pg_url_fixture_sets_the_sear")


def test_a_table_made_through_one_schema_url_is_invisible_through_another(postgres_server):
    first, second = postgres_server.schema_url("iso_first"), postgres_server.schema_url("iso_second")
    try:
        with _connect(first) as conn:
            conn.execute("CREATE TABLE items (value text)")
            conn.execute("INSERT INTO items VALUES ('in first')")
        with _connect(second) as conn:
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT value FROM items")
        with _connect(second) as conn:   # the same name in the second schema is another table
            conn.execute("CREATE TABLE items (value text)")
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        with _connect(first) as conn:
            assert conn.execute("SELECT value FROM items").fetchall() == [("in first",)]
    finally:
        postgres_server.drop_schema("iso_first")
        postgres_server.drop_schema("iso_second")
    with _connect(postgres_server.url) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'iso_%'").fetchall()
    assert left == []


def test_a_database_of_its_own_is_created_and_dropped(postgres_server):
    url = postgres_server.create_database("helper_db")
    try:
        assert url == postgres_server.url.rsplit("/", 1)[0] + "/helper_db"
        with _connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("helper_db",)
    finally:
        postgres_server.drop_database("helper_db")
    with pytest.raises(psycopg.OperationalError):
        _connect(url).close()


def test_a_schema_name_that_would_not_survive_the_url_is_refused(postgres_server):
    for name in ("Upper", "with space", "semi;colon", "1digit", ""):
        with pytest.raises(ValueError):
            postgres_server.schema_url(name)


def test_the_server_listens_on_127_0_0_1_only(postgres_server):
    with _connect(postgres_server.url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    port = postgres_server.port
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # 127.0.0.2 is this host too (all of 127/8 is loopback), but no socket bound to it
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    if socket.has_ipv6:
        with pytest.raises(OSError):     # refused, or no IPv6 loopback at all
            socket.create_connection(("::1", port), timeout=5).close()


def test_kill_makes_it_unreachable_and_start_brings_it_back_with_the_data(postgres_server, tmp_path):
    # a server of its own, so as not to stop the session's; postgres_server: skipped the same way
    with PostgresServer(tmp_path / "pg", bin_dir=postgres_server.bin_dir) as server:
        url = server.url
        with _connect(url) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1), (2)")

        server.kill()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            _connect(url).close()
        server.kill()                    # stopping a stopped server does nothing

        server.start()
        assert server.url == url        # same port: clients reconnect to the same URL
        with _connect(url) as conn:
            assert conn.execute("SELECT n FROM kept ORDER BY n").fetchall() == [(1,), (2,)]
    assert not server.running            # __exit__ stopped it
    server.__exit__(None, None, None)    # and never raises once stopped
    assert (tmp_path / "pg" / "postgres.log").is_file()


def test_find_bin_dir_honours_tq_pg_bin(monkeypatch, tmp_path):
    monkeypatch.setenv("TQ_PG_BIN", str(tmp_path))
    assert find_bin_dir() == tmp_path


def test_a_bin_dir_without_initdb_raises_postgres_unavailable(tmp_path):
    from tq_mw_thehive.testing.postgres import PostgresUnavailable

    with pytest.raises(PostgresUnavailable, match="initdb"):
        PostgresServer(tmp_path / "pg", bin_dir=tmp_path / "nowhere").start()


def test_the_url_is_libpq_s_own(postgres_server):
    parts = urlsplit(postgres_server.schema_url("url_check"))
    try:
        assert (parts.scheme, parts.hostname, parts.username, parts.path) == \
            ("postgresql", "127.0.0.1", "postgres", "/postgres")
        assert parts.query == "options=-csearch_path%3Durl_check"
    finally:
        postgres_server.drop_schema("url_check")
