"""ThreatQ tokens kept in a shared (PostgreSQL) state: one refresh across hosts, seeding, recovery.

Each "host" is a ``ThreatQClient`` with a config directory of its own (its own token file) and the
same ``shared`` URL (``pg_url``: a real PostgreSQL server, skipped where there is none). ThreatQ is
``responses``.
"""
from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from conftest import full_text, write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state, state_postgres
from tq_mw_thehive.state_postgres import PostgresURL
from tq_mw_thehive.threatq import api as api_mod
from tq_mw_thehive.threatq import auth
from tq_mw_thehive.threatq.api import SHARED_TOKENS_KEY, ThreatQClient, ThreatQUnavailable

BASE = "https://threatq.example.org"
TOKEN_URL = f"{BASE}/api/token"
ACCESS = "acc-shared-0123456789"
REFRESH = "ref-shared-0123456789"
NEW_ACCESS = "acc-new-aaaabbbbcccc"
NEW_REFRESH = "ref-new-aaaabbbbcccc"
FILE_ACCESS = "acc-file-configure-again"
FILE_REFRESH = "ref-file-configure-again"
DB_PASSWORD = "s3cret-pw"


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def shared(pg_url) -> PostgresURL:
    url = PostgresURL(pg_url)
    state.open_state(url)  # the tables, meta among them
    return url


def tokens(access: str = ACCESS, refresh: Optional[str] = REFRESH, expires_in: float = 3600) -> auth.Tokens:
    return auth.Tokens(access, refresh, time.time() + expires_in)


def store_shared(url: PostgresURL, value: auth.Tokens) -> None:
    state.set_meta(state.open_state(url), SHARED_TOKENS_KEY, json.dumps(value.to_dict()))


def shared_tokens(url: PostgresURL) -> Optional[dict]:
    row = state.open_state(url).execute("SELECT value FROM meta WHERE key = ?", (SHARED_TOKENS_KEY,)).fetchone()
    return json.loads(row["value"]) if row is not None else None


def host(root: Path, name: str, url: Any, file_tokens: Optional[auth.Tokens] = None) -> ThreatQClient:
    """One daemon's client on the host ``name``: its own config dir (token file when given)."""
    config_dir = root / name
    config_dir.mkdir()
    if file_tokens is not None:
        auth.save_tokens(config_dir, file_tokens)
    client = ThreatQClient(BASE, "cid", config_dir=config_dir, shared=url)
    client.waits = []  # type: ignore[attr-defined]
    client._sleep = client.waits.append  # type: ignore[attr-defined]
    return client


def token_calls(mock: responses.RequestsMock) -> List[Any]:
    return [c for c in mock.calls if urlsplit(c.request.url).path == "/api/token"]


def api_bearers(mock: responses.RequestsMock) -> List[str]:
    return [c.request.headers["Authorization"] for c in mock.calls if urlsplit(c.request.url).path != "/api/token"]


def query_of(url: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def query(call: Any) -> dict:
    return query_of(call.request.url)


def refresh_answer(access: str = NEW_ACCESS, refresh: str = NEW_REFRESH) -> dict:
    return {"access_token": access, "refresh_token": refresh, "expires_in": 3600, "token_type": "bearer"}


# ------------------------------------------------------------------ one refresh across hosts

def test_two_hosts_with_an_expired_token_refresh_once_and_both_use_the_new_token(rsps, shared, tmp_path):
    old = tokens(expires_in=-5)
    store_shared(shared, old)
    clients = [host(tmp_path, "host-a", shared, old), host(tmp_path, "host-b", shared, old)]
    spent: List[str] = []

    def grant(request):
        refresh = query_of(request.url).get("refresh_token")
        spent.append(refresh)
        time.sleep(0.3)  # a slow ThreatQ: the other host has every chance to refresh meanwhile
        if refresh != REFRESH or spent.count(refresh) > 1:  # a refresh token works once
            return 400, {}, json.dumps({"errors": ["The refresh token is invalid."]})
        return 200, {}, json.dumps(refresh_answer())

    rsps.add_callback(responses.POST, TOKEN_URL, callback=grant)
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    barrier = threading.Barrier(8)
    errors: List[BaseException] = []

    def run(client: ThreatQClient) -> None:
        try:
            barrier.wait(5)
            client.request("GET", "/api/objects")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert len(token_calls(rsps)) == 1
    assert api_bearers(rsps) == [f"Bearer {NEW_ACCESS}"] * 8
    assert shared_tokens(shared)["access_token"] == NEW_ACCESS
    assert shared_tokens(shared)["refresh_token"] == NEW_REFRESH


def test_a_host_whose_token_was_refreshed_elsewhere_uses_the_stored_one_after_a_401(rsps, shared, tmp_path):
    store_shared(shared, tokens())
    a = host(tmp_path, "host-a", shared)
    seen: List[str] = []

    def objects(request):
        seen.append(request.headers["Authorization"])
        if len(seen) == 1:
            store_shared(shared, tokens(NEW_ACCESS, NEW_REFRESH))  # "another host" refreshed meanwhile
            return 401, {}, json.dumps({"errors": ["Unauthenticated."]})
        return 200, {}, json.dumps({"data": []})

    rsps.add_callback(responses.GET, f"{BASE}/api/objects", callback=objects)
    rsps.post(TOKEN_URL, json=refresh_answer("acc-should-not-be-used", "x"))
    a.request("GET", "/api/objects")
    assert token_calls(rsps) == []
    assert seen == [f"Bearer {ACCESS}", f"Bearer {NEW_ACCESS}"]


# ------------------------------------------------------------------------------- seeding

def test_an_empty_store_is_seeded_from_the_hosts_file_and_serves_a_host_without_one(rsps, shared, tmp_path):
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    a = host(tmp_path, "host-a", shared, tokens())
    assert shared_tokens(shared) is None
    a.request("GET", "/api/objects")
    assert shared_tokens(shared)["access_token"] == ACCESS
    assert shared_tokens(shared)["refresh_token"] == REFRESH

    b = host(tmp_path, "host-b", shared)  # `configure` never ran on this host
    b.request("GET", "/api/objects")
    assert api_bearers(rsps) == [f"Bearer {ACCESS}"] * 2
    assert token_calls(rsps) == []
    assert not auth.token_path(tmp_path / "host-b").exists()


def test_no_tokens_in_the_store_nor_the_file_waits_for_configure(rsps, shared, tmp_path):
    with pytest.raises(ThreatQUnavailable, match="shared state database.*tq-mw-thehive configure"):
        host(tmp_path, "host-b", shared).request("GET", "/api/objects")
    assert len(rsps.calls) == 0


def test_damaged_shared_tokens_are_seeded_again_from_the_file(rsps, shared, tmp_path):
    state.set_meta(state.open_state(shared), SHARED_TOKENS_KEY, "{not json")
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    host(tmp_path, "host-a", shared, tokens()).request("GET", "/api/objects")
    assert api_bearers(rsps) == [f"Bearer {ACCESS}"]
    assert shared_tokens(shared)["access_token"] == ACCESS


# ------------------------------------------------------------------------------ recovery

def test_a_refused_refresh_uses_and_stores_the_other_tokens_configure_wrote_on_this_host(rsps, shared, tmp_path):
    store_shared(shared, tokens(expires_in=-5))
    client = host(tmp_path, "host-a", shared, tokens(FILE_ACCESS, FILE_REFRESH))
    rsps.post(TOKEN_URL, status=400, json={"errors": ["The refresh token is invalid."]})
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client.request("GET", "/api/objects")
    assert [query(c)["refresh_token"] for c in token_calls(rsps)] == [REFRESH]
    assert api_bearers(rsps) == [f"Bearer {FILE_ACCESS}"]
    assert (shared_tokens(shared)["access_token"], shared_tokens(shared)["refresh_token"]) == (FILE_ACCESS,
                                                                                               FILE_REFRESH)


def test_a_refused_refresh_refreshes_the_files_tokens_when_they_expired_too(rsps, shared, tmp_path):
    store_shared(shared, tokens(expires_in=-5))
    client = host(tmp_path, "host-a", shared, tokens(FILE_ACCESS, FILE_REFRESH, expires_in=-5))

    def grant(request):
        if query_of(request.url)["refresh_token"] == FILE_REFRESH:
            return 200, {}, json.dumps(refresh_answer())
        return 400, {}, json.dumps({"errors": ["The refresh token is invalid."]})

    rsps.add_callback(responses.POST, TOKEN_URL, callback=grant)
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client.request("GET", "/api/objects")
    assert [query(c)["refresh_token"] for c in token_calls(rsps)] == [REFRESH, FILE_REFRESH]
    assert api_bearers(rsps) == [f"Bearer {NEW_ACCESS}"]
    assert shared_tokens(shared)["refresh_token"] == NEW_REFRESH


def test_a_refused_refresh_with_the_same_tokens_in_the_file_says_to_configure(rsps, shared, tmp_path):
    old = tokens(expires_in=-5)
    store_shared(shared, old)
    client = host(tmp_path, "host-a", shared, old)
    rsps.post(TOKEN_URL, status=400, json={"errors": ["The refresh token is invalid."]})
    with pytest.raises(ThreatQUnavailable, match="refresh token is invalid.*tq-mw-thehive configure") as err:
        client.request("GET", "/api/objects")
    assert err.value.status == 400
    assert len(token_calls(rsps)) == 1
    assert shared_tokens(shared)["access_token"] == ACCESS  # left as it was


def test_refreshed_tokens_the_store_could_not_take_are_kept_and_stored_at_the_next_renewal(
        rsps, shared, tmp_path, monkeypatch):
    store_shared(shared, tokens(expires_in=-5))
    client = host(tmp_path, "host-a", shared)
    rsps.post(TOKEN_URL, json=refresh_answer())
    rsps.post(TOKEN_URL, json=refresh_answer("acc-third-xxxxxxxx", "ref-third-xxxxxxxx"))
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    set_meta = state.set_meta

    def broken(*args: Any) -> None:
        raise state_postgres.Unavailable("PostgreSQL: server closed the connection unexpectedly")

    monkeypatch.setattr(api_mod.state, "set_meta", broken)
    client.request("GET", "/api/objects")  # the refresh token is spent: the new tokens must not be lost
    assert api_bearers(rsps) == [f"Bearer {NEW_ACCESS}"]
    assert shared_tokens(shared)["access_token"] == ACCESS

    monkeypatch.setattr(api_mod.state, "set_meta", set_meta)
    client._after_401(NEW_ACCESS)  # the next renewal: ours are stored, then refreshed with their token
    assert [query(c)["refresh_token"] for c in token_calls(rsps)] == [REFRESH, NEW_REFRESH]
    assert shared_tokens(shared)["refresh_token"] == "ref-third-xxxxxxxx"


# ---------------------------------------------------------------------- database failures

def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_shared_database_is_unavailable_without_the_password(rsps, tmp_path, monkeypatch):
    monkeypatch.setattr(state, "BUSY_TIMEOUT_S", 0.5)  # the wait for a connection: no need for 5 s here
    url = PostgresURL(f"postgresql://u:{DB_PASSWORD}@127.0.0.1:{closed_port()}/db")
    client = host(tmp_path, "host-a", url, tokens())
    try:
        with pytest.raises(ThreatQUnavailable) as err:
            client.request("GET", "/api/objects")
    finally:
        state_postgres.close_all()
    assert isinstance(err.value, ThreatQUnavailable) and not isinstance(err.value, sqlite3.Error)
    assert "shared state database" in str(err.value)
    for secret in (DB_PASSWORD, ACCESS, REFRESH):
        assert secret not in full_text(err.value)
    assert len(rsps.calls) == 0


# ------------------------------------------------------------------------------ wiring

def test_from_config_shares_the_tokens_when_the_state_is_postgresql(tmp_path):
    write_config(tmp_path, state_db=f"postgresql://u:{DB_PASSWORD}@db.example.org/tq")
    cfg = config_mod.load(tmp_path)
    client = ThreatQClient.from_config(cfg)
    assert client._shared == config_mod.shared_state(cfg)
    assert "shared tokens" in repr(client) and DB_PASSWORD not in repr(client)

    write_config(tmp_path, threatq={"client_secret": "cs-secret-9f8e7d6c5b4a"},
                 state_db=f"postgresql://u:{DB_PASSWORD}@db.example.org/tq")
    client = ThreatQClient.from_config(config_mod.load(tmp_path))
    assert client._shared is None and "client credentials" in repr(client)  # nothing to share


def test_without_a_shared_state_the_token_file_is_used(tmp_path):
    write_config(tmp_path)
    assert "token file" in repr(ThreatQClient.from_config(config_mod.load(tmp_path)))
