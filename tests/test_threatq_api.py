"""ThreatQClient against `responses`: tokens, refresh races, retries, errors, paging, the contract's calls.

No real network and no sleeping: every client records its waits in ``waits`` instead.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from responses import matchers

from conftest import write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs
from tq_mw_thehive.threatq import auth
from tq_mw_thehive.threatq.api import (LOCK_FILE, MAX_FILTER_CHARS, OPTIONAL_STEPS, PAGE_SIZE, ThreatQClient,
                                       ThreatQError, ThreatQPermanentError, ThreatQStepRefused, ThreatQUnavailable,
                                       attribute_name, list_filters, record_type_id, source_pivot_id, source_tlp)

BASE = "https://threatq.example.org"
TOKEN_URL = f"{BASE}/api/token"
ACCESS = "acc-0123456789abcdef"
REFRESH = "ref-0123456789abcdef"
NEW_ACCESS = "acc-new-aaaabbbbcccc"
NEW_REFRESH = "ref-new-aaaabbbbcccc"
SECRET = "cs-secret-9f8e7d6c5b4a"
PROXY_PW = "proxy-pw-5a4b3c2d1e"
PROXY = f"http://tquser:{PROXY_PW}@proxy.example.org:3128"
ALL_SECRETS = (ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH, SECRET, PROXY_PW)


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def store_tokens(config_dir: Path, access: str = ACCESS, refresh: Optional[str] = REFRESH,
                 expires_in: float = 3600) -> None:
    auth.save_tokens(config_dir, auth.Tokens(access, refresh, time.time() + expires_in))


def make_client(config_dir: Optional[Path], **kwargs: Any) -> ThreatQClient:
    client = ThreatQClient(BASE, "cid", config_dir=config_dir, **kwargs)
    client.waits = []  # type: ignore[attr-defined]
    client._sleep = client.waits.append  # type: ignore[attr-defined]
    return client


@pytest.fixture
def client(tmp_path: Path) -> ThreatQClient:
    store_tokens(tmp_path)
    return make_client(tmp_path)


def token_answer(access: str = NEW_ACCESS, refresh: Optional[str] = NEW_REFRESH) -> dict:
    body = {"access_token": access, "expires_in": 3600, "token_type": "bearer"}
    if refresh:
        body["refresh_token"] = refresh
    return body


def bearer(call: Any) -> str:
    return call.request.headers["Authorization"]


def token_calls(mock: responses.RequestsMock) -> List[Any]:
    return [c for c in mock.calls if urlsplit(c.request.url).path == "/api/token"]


def api_calls(mock: responses.RequestsMock) -> List[Any]:
    return [c for c in mock.calls if urlsplit(c.request.url).path != "/api/token"]


def query(call: Any) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()}


def sent_json(call: Any) -> Any:
    return json.loads(call.request.body) if call.request.body else None


# ------------------------------------------------------------------------------------ tokens

def test_tokens_are_read_from_the_token_file(rsps, client):
    rsps.get(f"{BASE}/api/indicators/5", json={"data": {"id": 5}})
    assert client.request("GET", "/api/indicators/5") == {"data": {"id": 5}}
    assert client.request("GET", "api/indicators/5") == {"data": {"id": 5}}
    assert [bearer(c) for c in rsps.calls] == [f"Bearer {ACCESS}"] * 2
    assert token_calls(rsps) == []


def test_a_missing_token_file_keeps_events_waiting_and_says_to_configure(rsps, tmp_path):
    with pytest.raises(ThreatQUnavailable, match="tq-mw-thehive configure"):
        make_client(tmp_path).request("GET", "/api/objects")
    (tmp_path / auth.TOKEN_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ThreatQUnavailable, match="damaged.*tq-mw-thehive configure"):
        make_client(tmp_path).request("GET", "/api/objects")
    assert len(rsps.calls) == 0


def test_without_secret_or_config_dir_the_client_cannot_authenticate():
    with pytest.raises(ValueError, match="client_secret or the config_dir"):
        ThreatQClient(BASE, "cid")


def test_client_credentials_authenticate_with_basic_auth_and_store_nothing(rsps, tmp_path):
    rsps.post(TOKEN_URL, match=[matchers.query_param_matcher({"grant_type": "client_credentials"}),
                                matchers.header_matcher({"Authorization": "Basic Y2lkOmNzLXNlY3JldC05ZjhlN2Q2YzViNGE="})],
              json=token_answer(NEW_ACCESS, None))
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client = make_client(tmp_path, client_secret=SECRET)
    client.request("GET", "/api/objects")
    client.request("GET", "/api/objects")
    assert len(token_calls(rsps)) == 1
    assert [bearer(c) for c in api_calls(rsps)] == [f"Bearer {NEW_ACCESS}"] * 2
    assert not auth.token_path(tmp_path).exists()


def test_client_credentials_authenticate_again_on_401(rsps):
    rsps.post(TOKEN_URL, json=token_answer("acc-first-11111111", None))
    rsps.post(TOKEN_URL, json=token_answer(NEW_ACCESS, None))
    rsps.get(f"{BASE}/api/objects", status=401, json={"errors": ["Unauthenticated."]})
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client = make_client(None, client_secret=SECRET)
    assert client.request("GET", "/api/objects") == {"data": []}
    assert len(token_calls(rsps)) == 2
    assert all(query(c) == {"grant_type": "client_credentials"} for c in token_calls(rsps))
    assert [bearer(c) for c in api_calls(rsps)] == ["Bearer acc-first-11111111", f"Bearer {NEW_ACCESS}"]


def test_refused_client_credentials_are_unavailable_not_permanent(rsps, caplog):
    rsps.post(TOKEN_URL, status=400, json={"errors": ["Client authentication failed."]})
    with caplog.at_level(logging.ERROR, logger="tq_mw_thehive.threatq"):
        with pytest.raises(ThreatQUnavailable, match="Client authentication failed") as err:
            make_client(None, client_secret=SECRET).request("GET", "/api/objects")
    assert err.value.status == 400
    assert len(rsps.calls) == 1  # a refusal is not retried
    assert "client_secret" in caplog.text


def test_a_token_close_to_expiry_is_refreshed_before_use_and_saved(rsps, tmp_path):
    store_tokens(tmp_path, expires_in=30)
    rsps.post(TOKEN_URL, match=[matchers.query_param_matcher({"grant_type": "refresh_token", "refresh_token": REFRESH}),
                                matchers.header_matcher({"Authorization": f"Bearer {ACCESS}"})],
              json=token_answer())
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    make_client(tmp_path).request("GET", "/api/objects")
    assert [urlsplit(c.request.url).path for c in rsps.calls] == ["/api/token", "/api/objects"]
    assert bearer(rsps.calls[1]) == f"Bearer {NEW_ACCESS}"
    saved = auth.load_tokens(tmp_path)
    assert (saved.access_token, saved.refresh_token) == (NEW_ACCESS, NEW_REFRESH)
    assert stat.S_IMODE(os.stat(auth.token_path(tmp_path)).st_mode) == 0o600


def test_401_refreshes_once_and_retries_once(rsps, client, tmp_path):
    rsps.get(f"{BASE}/api/objects", status=401, json={"errors": ["Unauthenticated."]})
    rsps.get(f"{BASE}/api/objects", json={"data": [{"collection": "events"}]})
    rsps.post(TOKEN_URL, json=token_answer())
    assert client.request("GET", "/api/objects") == {"data": [{"collection": "events"}]}
    assert [(c.request.method, urlsplit(c.request.url).path) for c in rsps.calls] == [
        ("GET", "/api/objects"), ("POST", "/api/token"), ("GET", "/api/objects")]
    assert query(rsps.calls[1]) == {"grant_type": "refresh_token", "refresh_token": REFRESH}
    assert bearer(rsps.calls[2]) == f"Bearer {NEW_ACCESS}"
    assert auth.load_tokens(tmp_path).access_token == NEW_ACCESS
    assert (tmp_path / LOCK_FILE).exists()


def test_a_second_401_is_unavailable_after_one_refresh(rsps, client):
    rsps.get(f"{BASE}/api/objects", status=401, json={"errors": ["Unauthenticated."]})
    rsps.post(TOKEN_URL, json=token_answer())
    with pytest.raises(ThreatQUnavailable, match="Unauthenticated") as err:
        client.request("GET", "/api/objects")
    assert err.value.status == 401
    assert len(token_calls(rsps)) == 1 and len(api_calls(rsps)) == 2


def test_a_refused_refresh_is_unavailable_and_logged_with_the_fix(rsps, client, caplog):
    rsps.get(f"{BASE}/api/objects", status=401, json={"errors": ["Unauthenticated."]})
    rsps.post(TOKEN_URL, status=400, json={"errors": ["The refresh token is invalid."]})
    with caplog.at_level(logging.ERROR, logger="tq_mw_thehive.threatq"):
        with pytest.raises(ThreatQUnavailable, match="refresh token is invalid.*tq-mw-thehive configure"):
            client.request("GET", "/api/objects")
    assert len(token_calls(rsps)) == 1
    assert any(r.levelno == logging.ERROR and "tq-mw-thehive configure" in r.getMessage() for r in caplog.records)


def test_an_expired_token_without_refresh_token_says_to_configure(rsps, tmp_path):
    store_tokens(tmp_path, refresh=None, expires_in=-5)
    with pytest.raises(ThreatQUnavailable, match="no refresh token.*tq-mw-thehive configure"):
        make_client(tmp_path).request("GET", "/api/objects")
    assert len(rsps.calls) == 0


def test_a_refresh_that_cannot_reach_threatq_is_retried_then_unavailable(rsps, tmp_path):
    store_tokens(tmp_path, expires_in=10)
    rsps.post(TOKEN_URL, body=requests.ConnectionError("refused"))
    client = make_client(tmp_path)
    with pytest.raises(ThreatQUnavailable, match="POST /api/token"):
        client.request("GET", "/api/objects")
    assert len(token_calls(rsps)) == 4 and len(client.waits) == 3
    assert auth.load_tokens(tmp_path).access_token == ACCESS  # the file is left as it was


def test_a_token_grant_is_retried_on_5xx_but_not_after_a_refusal(rsps):
    rsps.post(TOKEN_URL, status=503, json={"message": "maintenance"})
    rsps.post(TOKEN_URL, status=400, json={"errors": ["Client authentication failed."]})
    client = make_client(None, client_secret=SECRET)
    with pytest.raises(ThreatQUnavailable, match="Client authentication failed"):
        client.request("GET", "/api/objects")
    assert len(token_calls(rsps)) == 2 and len(client.waits) == 1


def test_tokens_another_process_refreshed_are_used_without_a_second_refresh(rsps, client, tmp_path):
    """Worker A's call fails with 401 while worker B refreshes and saves; A must not spend the
    (already used) refresh token again but pick up B's tokens from the file."""
    seen = []

    def api(request):
        seen.append(request.headers["Authorization"])
        if len(seen) == 1:
            store_tokens(tmp_path, NEW_ACCESS, NEW_REFRESH)  # "another process" refreshed meanwhile
            return 401, {}, json.dumps({"errors": ["Unauthenticated."]})
        return 200, {}, json.dumps({"data": []})

    rsps.add_callback(responses.GET, f"{BASE}/api/objects", callback=api)
    rsps.post(TOKEN_URL, json=token_answer("acc-should-not-be-used", "x"))
    client.request("GET", "/api/objects")
    client.request("GET", "/api/objects")
    assert token_calls(rsps) == []
    assert seen == [f"Bearer {ACCESS}", f"Bearer {NEW_ACCESS}", f"Bearer {NEW_ACCESS}"]


def test_the_refresh_waits_for_the_file_lock_and_then_uses_the_winners_tokens(rsps, tmp_path):
    store_tokens(tmp_path, expires_in=30)  # due for a proactive refresh
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    rsps.post(TOKEN_URL, json=token_answer("acc-should-not-be-used", "x"))
    client = make_client(tmp_path)
    fd = os.open(str(tmp_path / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is refreshing
    errors: List[BaseException] = []

    def run() -> None:
        try:
            client.request("GET", "/api/objects")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        time.sleep(0.2)
        assert worker.is_alive() and len(rsps.calls) == 0  # blocked on the lock
        store_tokens(tmp_path, NEW_ACCESS, NEW_REFRESH)
    finally:
        os.close(fd)
    worker.join(5)
    assert not worker.is_alive() and errors == []
    assert token_calls(rsps) == []
    assert [bearer(c) for c in rsps.calls] == [f"Bearer {NEW_ACCESS}"]


# ----------------------------------------------------------------------------------- retries

@pytest.mark.parametrize("first", [
    {"body": requests.ConnectionError("connection refused")},
    {"body": requests.exceptions.ReadTimeout("read timed out")},
    {"status": 500, "json": {"errors": ["Server Error"]}},
    {"status": 502, "body": "<html>bad gateway</html>"},
    {"status": 503, "json": {"message": "maintenance"}},
    {"status": 429, "json": {"errors": ["Too Many Attempts."]}},
], ids=["connection", "timeout", "500", "502", "503", "429"])
def test_transient_failures_are_retried_with_backoff_then_succeed(rsps, client, first):
    rsps.get(f"{BASE}/api/objects", **first)
    rsps.get(f"{BASE}/api/objects", json={"data": [{"collection": "incident"}]})
    assert client.request("GET", "/api/objects") == {"data": [{"collection": "incident"}]}
    assert len(rsps.calls) == 2
    assert len(client.waits) == 1 and 0.2 <= client.waits[0] <= 0.4


@pytest.mark.parametrize("first, repeated", [
    ({"body": requests.ConnectionError("connection refused")}, True),
    ({"status": 503, "json": {"message": "maintenance"}}, True),
    ({"status": 429, "json": {"errors": ["Too Many Attempts."]}}, True),
    ({"body": requests.exceptions.ReadTimeout("read timed out")}, False),
    ({"status": 500, "json": {"errors": ["Server Error"]}}, False),
    ({"status": 502, "body": "<html>bad gateway</html>"}, False),
], ids=["connection", "503", "429", "read-timeout", "500", "502"])
def test_a_create_is_repeated_only_when_threatq_cannot_have_carried_it_out(rsps, client, first, repeated):
    """Repeating a POST that may have created the object would create a second one."""
    rsps.post(f"{BASE}/api/indicators", **first)
    rsps.post(f"{BASE}/api/indicators", json={"data": [{"id": 9, "value": "1.2.3.4"}]})
    if repeated:
        assert client.create_indicator("1.2.3.4", 1, 1, "", [])["id"] == 9
        assert len(rsps.calls) == 2
    else:
        with pytest.raises(ThreatQUnavailable):
            client.create_indicator("1.2.3.4", 1, 1, "", [])
        assert len(rsps.calls) == 1


@pytest.mark.parametrize("status, header, expected", [
    (429, "3", 3.0),
    (503, "2.5", 2.5),
    (429, "100", 8.0),  # capped at max_wait_s
])
def test_retry_after_is_honoured_up_to_max_wait(rsps, client, status, header, expected):
    rsps.get(f"{BASE}/api/objects", status=status, headers={"Retry-After": header}, json={})
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client.request("GET", "/api/objects")
    assert client.waits == [expected]


def test_retry_after_on_a_500_or_as_a_date_falls_back_to_backoff(rsps, client):
    rsps.get(f"{BASE}/api/objects", status=500, headers={"Retry-After": "7"}, json={})
    rsps.get(f"{BASE}/api/objects", status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, json={})
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client.request("GET", "/api/objects")
    assert len(client.waits) == 2 and all(w <= 0.6 for w in client.waits)


def test_exhausted_retries_are_unavailable_with_the_last_status(rsps, client):
    rsps.get(f"{BASE}/api/objects", status=502, json={"errors": ["Bad Gateway"]})
    with pytest.raises(ThreatQUnavailable, match="4 attempt.*HTTP 502: Bad Gateway") as err:
        client.request("GET", "/api/objects")
    assert err.value.status == 502
    assert len(rsps.calls) == 4
    lows = [0.2, 0.4, 0.8]  # exponential from 0.2 s, plus up to 0.2 s jitter
    assert [low <= w <= low + 0.2 for w, low in zip(client.waits, lows)] == [True] * 3


def test_exhausted_connection_errors_name_the_error_type(rsps, tmp_path):
    store_tokens(tmp_path)
    client = make_client(tmp_path, attempts=2, max_wait_s=0)
    rsps.get(f"{BASE}/api/objects", body=requests.ConnectionError("refused"))
    with pytest.raises(ThreatQUnavailable, match="2 attempt.*ConnectionError") as err:
        client.request("GET", "/api/objects")
    assert err.value.status is None
    assert len(rsps.calls) == 2 and client.waits == [0]


def test_waits_never_exceed_max_wait(rsps, tmp_path):
    store_tokens(tmp_path)
    client = make_client(tmp_path, attempts=8, max_wait_s=0.5)
    rsps.get(f"{BASE}/api/objects", status=500, json={})
    with pytest.raises(ThreatQUnavailable):
        client.request("GET", "/api/objects")
    assert len(client.waits) == 7 and max(client.waits) == 0.5


@pytest.mark.parametrize("status, body, text", [
    (400, {"data": {"errors": {"happened_at": ["The happened at does not match the format Y-m-d H:i:s."]}}},
     "HTTP 400: The happened at does not match the format Y-m-d H:i:s."),
    (400, {"errors": ["The name has already been taken."]}, "HTTP 400: The name has already been taken."),
    (403, {"errors": ["This action is unauthorized."]}, "HTTP 403: This action is unauthorized."),
    (404, {"errors": ["Not found"]}, "HTTP 404: Not found"),
    (409, {"errors": ["Conflict"]}, "HTTP 409: Conflict"),
    (422, {"data": {"errors": {"value": ["The value field is required."]}}}, "HTTP 422: The value field is required."),
])
def test_client_errors_are_permanent_at_once_with_threatqs_text(rsps, client, status, body, text):
    rsps.post(f"{BASE}/api/events", status=status, json=body)
    with pytest.raises(ThreatQPermanentError) as err:
        client.create_event("t", 13, "bad", "d", [])
    assert text in str(err.value) and "POST /api/events" in str(err.value)
    assert err.value.status == status
    assert len(rsps.calls) == 1 and client.waits == []


@pytest.mark.parametrize("body", [{"errors": ["Account locked"]}, {"data": {"errors": {"value": ["bad value"]}}}])
def test_a_2xx_answer_with_errors_is_permanent(rsps, client, body):
    rsps.put(f"{BASE}/api/indicators/3", json=body)
    with pytest.raises(ThreatQPermanentError, match="HTTP 200: (Account locked|bad value)"):
        client.update_indicator(3, description="x")


def test_a_2xx_answer_that_is_not_json_is_unavailable(rsps, client):
    rsps.get(f"{BASE}/api/objects", body="<html>proxy login</html>")
    with pytest.raises(ThreatQUnavailable, match="not JSON"):
        client.request("GET", "/api/objects")


def test_errors_share_one_base_class():
    assert issubclass(ThreatQPermanentError, ThreatQError) and issubclass(ThreatQUnavailable, ThreatQError)
    assert not issubclass(ThreatQPermanentError, ThreatQUnavailable)


# ------------------------------------------------------------------------------------ paging

def test_lists_are_read_across_pages(rsps, client):
    items = [{"id": i, "name": f"tag{i}"} for i in range(120)]
    for offset in (0, 50, 100):
        rsps.get(f"{BASE}/api/events/7/tags",
                 match=[matchers.query_param_matcher({"limit": "50", "offset": str(offset)})],
                 json={"total": 120, "limit": 50, "offset": offset, "data": items[offset:offset + 50]})
    assert client.tags("events", 7) == items
    assert [query(c)["offset"] for c in rsps.calls] == ["0", "50", "100"]


def test_paging_stops_on_an_empty_page_even_if_total_says_more(rsps, client):
    rsps.get(f"{BASE}/api/events/7/tags", json={"total": 10, "data": []})
    assert client.tags("events", 7) == []
    assert len(rsps.calls) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(total=st.integers(0, 260), server_cap=st.integers(1, 60))
def test_paging_reads_every_item_once_whatever_the_servers_page_size(tmp_path, total, server_cap):
    """The server may return fewer than ``limit`` items per page; offsets follow what came back."""
    store_tokens(tmp_path)
    client = make_client(tmp_path)
    items = [{"id": i} for i in range(total)]

    def page(request):
        q = query_of(request.url)
        offset, limit = int(q["offset"]), min(int(q["limit"]), server_cap)
        return 200, {}, json.dumps({"total": total, "offset": offset, "data": items[offset:offset + limit]})

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, f"{BASE}/api/indicators/query", callback=page)
        assert client.find_indicator("none", 1) is None
        assert len(mock.calls) == max(1, -(-total // min(server_cap, PAGE_SIZE)))
    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{BASE}/api/indicators/1/attributes", callback=page)
        assert client.attributes("indicators", 1) == items


def query_of(url: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# ----------------------------------------------------------------------------------- lookups

def test_names_are_resolved_once_and_cached(rsps, client):
    rsps.get(f"{BASE}/api/indicator/types",
             json={"total": 3, "data": [{"id": 11, "name": "IP Address"}, {"id": 12, "name": "FQDN"},
                                        {"id": 13, "name": "SHA-1"}]})
    rsps.get(f"{BASE}/api/indicator/statuses", json={"data": [{"id": 1, "name": "Active"}, {"id": 4, "name": "Review"}]})
    rsps.get(f"{BASE}/api/event/types", json={"data": [{"id": 13, "name": "Incident", "user_editable": "N"}]})
    for _ in range(3):
        assert client.indicator_type_id("IP Address") == 11
        assert client.indicator_type_id("FQDN") == 12
        assert client.indicator_type_id("sha-1") == 13  # case only differs: still the same type
        assert client.indicator_status_id("Review") == 4
        assert client.event_type_id("Incident") == 13
    assert [urlsplit(c.request.url).path for c in rsps.calls] == [
        "/api/indicator/types", "/api/indicator/statuses", "/api/event/types"]


def test_a_missing_name_is_permanent_and_named(rsps, client):
    rsps.get(f"{BASE}/api/indicator/types", json={"data": [{"id": 11, "name": "IP Address"}]})
    with pytest.raises(ThreatQPermanentError, match="no indicator type named 'Bogus Type'.*IP Address"):
        client.indicator_type_id("Bogus Type")
    with pytest.raises(ThreatQPermanentError, match="Bogus Type"):
        client.indicator_type_id("Bogus Type")
    assert len(rsps.calls) == 1


def test_has_collection_asks_once(rsps, client):
    rsps.get(f"{BASE}/api/objects", json={"data": [{"collection": "indicators"}, {"collection": "events"},
                                                   {"collection": "incident"}]})
    assert client.has_collection("incident") is True
    assert client.has_collection("events") is True
    assert client.has_collection("campaign") is False
    assert len(rsps.calls) == 1


# ----------------------------------------------------------------------------------- objects

QUERY = f"{BASE}/api/indicators/query"


def test_find_indicator_asks_query_with_the_value_as_criteria_and_keeps_exact_matches_of_its_type(rsps, client):
    """XSOAR's reputation commands and stix-shifter post ``{"criteria": {"value": v}}``; ThreatQ's own
    matching may be looser (case, type), so only the exact value of the type counts."""
    rsps.post(QUERY, json={"total": 4, "data": [
        {"id": 1, "value": "Evil.com", "type_id": 12},
        {"id": 2, "value": "evil.com", "type_id": 99},
        {"id": 3, "value": "evil.com", "type": {"id": 12, "name": "FQDN"}},  # type only as an object
        {"id": 4, "value": "evil.com", "type_id": "12"},
    ]})
    assert client.find_indicator("evil.com", 12)["id"] == 3  # the first made of two exact ones
    assert client.find_indicator("evil.com", 7) is None
    first = rsps.calls[0]
    assert sent_json(first) == {"criteria": {"value": "evil.com"}}
    assert query(first) == {"limit": "50", "offset": "0"}


def test_find_reads_every_page_of_the_query(rsps, client):
    noise = [{"id": i, "value": f"evil.com.{i}", "type_id": 12} for i in range(60)]
    hit = {"id": 99, "value": "evil.com", "type_id": 12}
    rsps.post(QUERY, match=[matchers.query_param_matcher({"limit": "50", "offset": "0"})],
              json={"total": 61, "data": noise[:50]})
    rsps.post(QUERY, match=[matchers.query_param_matcher({"limit": "50", "offset": "50"})],
              json={"total": 61, "data": noise[50:] + [hit]})
    assert client.find_indicator("evil.com", 12) == hit


def test_find_event_and_incident_query_by_title_and_value_and_match_exactly(rsps, client):
    rsps.post(f"{BASE}/api/events/query", json={"data": [{"id": 1, "title": "Hive Case # 1 longer"},
                                                         {"id": 2, "title": "Hive Case # 1"}]})
    rsps.post(f"{BASE}/api/incident/query", json={"data": [{"id": 5, "value": "case a"}]})
    assert client.find_event("Hive Case # 1")["id"] == 2
    assert client.find_event("Hive Case #") is None
    assert client.find_incident("case a")["id"] == 5
    assert client.find_incident("case") is None
    assert sent_json(rsps.calls[0]) == {"criteria": {"title": "Hive Case # 1"}}
    assert sent_json(rsps.calls[2]) == {"criteria": {"value": "case a"}}


def test_a_query_that_timed_out_is_repeated_within_the_call_as_it_only_reads(rsps, client):
    rsps.post(QUERY, body=requests.ReadTimeout("slow"))
    rsps.post(QUERY, json={"total": 1, "data": [{"id": 7, "value": "x", "type_id": 1}]})
    assert client.find_indicator("x", 1)["id"] == 7
    assert len(api_calls(rsps)) == 2 and len(client.waits) == 1


@pytest.mark.parametrize("value, filters", [
    ("evil.com", ["evil.com"]),
    ("a,b", ["a,b", "a%"]),
    ("100%", ["100%"]),  # its own wildcard reading already
    (",lead%x,longest-part", [",lead%x,longest-part", "%longest-part%"]),
    (",", [",", "%"]),
    ("x" * (MAX_FILTER_CHARS + 1), ["x" * (MAX_FILTER_CHARS + 1), "x" * 256 + "%"]),
])
def test_list_filters_back_a_literal_reading_with_a_wildcard_one(value, filters):
    assert list_filters(value) == filters


@pytest.mark.parametrize("status", [404, 405, 400, 422])
def test_without_query_the_look_up_uses_list_filters_that_cannot_miss_a_value_with_commas(rsps, client, caplog,
                                                                                         status):
    """SDK2's ``find()``: a comma in a list filter means "or", so ``?value=a,b`` may answer "a" and
    "b" but not "a,b"; the wildcard on the part before the comma finds it. Never a look-alike."""
    value = "Mozilla/5.0 (KHTML, like Gecko)"
    rsps.post(QUERY, json={"errors": ["Not found"]}, status=status)
    rsps.get(f"{BASE}/api/indicators", match=[matchers.query_param_matcher(
        {"value": value, "limit": "50", "offset": "0"})],
        json={"total": 1, "data": [{"id": 1, "value": "Mozilla/5.0 (KHTML", "type_id": 23}]})
    rsps.get(f"{BASE}/api/indicators", match=[matchers.query_param_matcher(
        {"value": "Mozilla/5.0 (KHTML%", "limit": "50", "offset": "0"})],
        json={"total": 2, "data": [{"id": 1, "value": "Mozilla/5.0 (KHTML", "type_id": 23},
                                   {"id": 2, "value": value, "type_id": 23}]})
    learned = []
    client.on_capability = lambda *args: learned.append(args)
    assert client.find_indicator(value, 23)["id"] == 2
    assert client.find_indicator(value, 23)["id"] == 2
    assert [urlsplit(c.request.url).path for c in api_calls(rsps)].count("/api/indicators/query") == 1
    assert caplog.text.count("indicators are looked up with list filters instead") == 1
    assert learned == [("query:indicators", False, status)]


def test_a_value_too_long_for_a_url_falls_back_to_the_wildcard_on_its_start(rsps, client):
    value = "https://example.net/" + "a" * 3000
    rsps.post(QUERY, status=404, json={"errors": ["Not found"]})
    rsps.get(f"{BASE}/api/indicators", match=[matchers.query_param_matcher(
        {"value": value, "limit": "50", "offset": "0"})], status=414, json={"errors": ["URI Too Long"]})
    rsps.get(f"{BASE}/api/indicators", match=[matchers.query_param_matcher(
        {"value": value[:256] + "%", "limit": "50", "offset": "0"})],
        json={"total": 1, "data": [{"id": 4, "value": value, "type_id": 21}]})
    assert client.find_indicator(value, 21)["id"] == 4


def test_a_query_that_fails_otherwise_is_an_error_not_a_fallback(rsps, client):
    rsps.post(QUERY, status=403, json={"errors": ["Forbidden"]})
    with pytest.raises(ThreatQPermanentError) as failed:
        client.find_indicator("x", 1)
    assert failed.value.status == 403 and client.refused_steps() == {}


def test_get_reads_one_object_by_its_id_with_its_sub_resources_inline(rsps, client):
    rsps.get(f"{BASE}/api/indicators/9", json={"data": {"id": 9, "value": "x", "attributes": []}})
    assert client.get("indicators", 9, expand=True)["id"] == 9
    assert query(rsps.calls[0]) == {"with": "attributes,sources,tags"}


SRC = [{"name": "TheHive", "tlp_id": 2}]

CALLS = [
    # (method name, args, kwargs, HTTP method, path, query subset, body sent, answer, expected result)
    ("create_indicator", ("1.2.3.4", 11, 1, "desc", SRC), {}, "POST", "/api/indicators", {},
     {"value": "1.2.3.4", "type_id": 11, "status_id": 1, "description": "desc", "sources": SRC},
     {"data": [{"id": 9, "value": "1.2.3.4"}]}, {"id": 9, "value": "1.2.3.4"}),
    ("update_indicator", (9,), {"description": "new", "status_id": 4}, "PUT", "/api/indicators/9", {},
     {"description": "new", "status_id": 4}, {"data": {"id": 9}}, {"id": 9}),
    ("create_event", ("Hive Case # 1", 13, "2024-01-02 03:04:05", "d", SRC), {}, "POST", "/api/events", {},
     {"title": "Hive Case # 1", "type_id": 13, "happened_at": "2024-01-02 03:04:05", "description": "d",
      "sources": SRC}, {"data": {"id": 4, "title": "Hive Case # 1"}}, {"id": 4, "title": "Hive Case # 1"}),
    ("update_event", (4,), {"title": "t2"}, "PUT", "/api/events/4", {}, {"title": "t2"},
     {"data": {"id": 4, "title": "t2"}}, {"id": 4, "title": "t2"}),
    ("create_incident", ("case", "d", SRC), {}, "POST", "/api/incident", {},
     {"value": "case", "description": "d", "sources": SRC}, {"data": {"id": 6}}, {"id": 6}),
    ("update_incident", (6,), {"value": "v2"}, "PUT", "/api/incident/6", {}, {"value": "v2"},
     {"data": {"id": 6}}, {"id": 6}),
    ("search", ("Hive Case # 1",), {"limit": 10}, "GET", "/api/search", {"query": "Hive Case # 1", "limit": "10"},
     None, {"data": [{"id": 4, "value": "Hive Case # 1", "object": "event"}]},
     [{"id": 4, "value": "Hive Case # 1", "object": "event"}]),
    ("attributes", ("events", 4), {}, "GET", "/api/events/4/attributes", {"offset": "0"}, None,
     {"total": 1, "data": [{"id": 2, "name": "n", "value": "v"}]}, [{"id": 2, "name": "n", "value": "v"}]),
    ("add_attribute", ("events", 4, "Severity", "High"), {}, "POST", "/api/events/4/attributes", {},
     {"name": "Severity", "value": "High"}, {"data": [{"id": 3, "name": "Severity", "value": "High"}]},
     {"id": 3, "name": "Severity", "value": "High"}),
    ("update_attribute", ("incident", 6, 3, "Low"), {}, "PUT", "/api/incident/6/attributes/3", {},
     {"value": "Low"}, {"data": {"id": 3, "value": "Low"}}, {"id": 3, "value": "Low"}),
    ("delete_attribute", ("indicators", 9, 3), {}, "DELETE", "/api/indicators/9/attributes/3", {}, None, None, None),
    ("tags", ("indicators", 9), {}, "GET", "/api/indicators/9/tags", {"limit": "50"}, None,
     {"data": [{"id": 1, "name": "a"}]}, [{"id": 1, "name": "a"}]),
    ("add_tags", ("indicators", 9, ["a", "b"]), {}, "POST", "/api/indicators/9/tags", {},
     [{"name": "a"}, {"name": "b"}], {"data": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]},
     [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]),
    ("delete_tag", ("events", 4, 2), {}, "DELETE", "/api/events/4/tags/2", {}, None, None, None),
    ("sources", ("events", 4), {}, "GET", "/api/events/4/sources", {}, None,
     {"data": [{"id": 1, "name": "TheHive", "tlp_id": 2, "pivot": {"id": 77}}]},
     [{"id": 1, "name": "TheHive", "tlp_id": 2, "pivot": {"id": 77}}]),
    ("add_source", ("events", 4, "TheHive", 1), {}, "POST", "/api/events/4/sources", {},
     {"name": "TheHive", "tlp_id": 1}, {"data": {"id": 1, "pivot": {"id": 78}}}, {"id": 1, "pivot": {"id": 78}}),
    ("add_source", ("events", 4, "TheHive", None), {}, "POST", "/api/events/4/sources", {},
     {"name": "TheHive"}, {"data": [{"id": 1}]}, {"id": 1}),
    ("set_source_tlp", ("indicators", 9, 77, 3), {}, "PUT", "/api/indicators/9/sources/77", {},
     {"tlp_id": 3}, {"data": {"id": 1, "tlp_id": 3}}, {"id": 1, "tlp_id": 3}),
    ("links", ("events", 4, "indicators"), {}, "GET", "/api/events/4/indicators", {}, None,
     {"data": [{"id": 9, "pivot": {"id": 55}}]}, [{"id": 9, "pivot": {"id": 55}}]),
    ("link", ("events", 4, "indicators", 9), {}, "POST", "/api/events/4/indicators", {}, {"id": 9},
     {"data": [{"id": 9, "pivot": {"id": 55}}]}, {"id": 9, "pivot": {"id": 55}}),
    ("unlink", ("events", 4, "indicators", [55, 56]), {}, "DELETE", "/api/events/4/indicators", {}, [55, 56],
     None, None),
]


@pytest.mark.parametrize("name, args, kwargs, method, path, params, body, answer, expected", CALLS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_each_call_sends_the_contracts_method_path_and_body(rsps, client, name, args, kwargs, method, path,
                                                            params, body, answer, expected):
    if answer is None:
        rsps.add(method, f"{BASE}{path}", status=204)
    else:
        rsps.add(method, f"{BASE}{path}", json=answer, status=201 if method == "POST" else 200)
    assert getattr(client, name)(*args, **kwargs) == expected
    assert len(rsps.calls) == 1
    call = rsps.calls[0]
    assert (call.request.method, urlsplit(call.request.url).path) == (method, path)
    assert params.items() <= query(call).items()
    assert sent_json(call) == body


def test_empty_tag_and_unlink_lists_send_nothing(rsps, client):
    assert client.add_tags("events", 4, []) == []
    client.unlink("events", 4, "indicators", [])
    assert len(rsps.calls) == 0


@pytest.mark.parametrize("collection, other", [("events/../admin", "indicators"), ("events", "x?y=1"), ("", "events")])
def test_collection_names_cannot_change_the_path(rsps, client, collection, other):
    with pytest.raises(ValueError):
        client.links(collection, 1, other)
    assert len(rsps.calls) == 0


# ---------------------------------------------------------------- transport settings, secrets

def test_verify_proxy_and_timeout_reach_every_call_including_token_grants(rsps):
    rsps.post(TOKEN_URL, json=token_answer(NEW_ACCESS, None))
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    client = make_client(None, client_secret=SECRET, verify=False, proxy=PROXY, timeout=(2.0, 9.0))
    client.request("GET", "/api/objects")
    assert len(rsps.calls) == 2
    for call in rsps.calls:
        kwargs = call.request.req_kwargs
        assert kwargs["verify"] is False
        assert dict(kwargs["proxies"]) == {"http": PROXY, "https": PROXY}
        assert kwargs["timeout"] == (2.0, 9.0)


def test_one_session_is_reused(rsps, client):
    rsps.get(f"{BASE}/api/objects", json={"data": []})
    session = client._session
    client.request("GET", "/api/objects")
    client.request("GET", "/api/objects")
    assert client._session is session and isinstance(session, requests.Session)


def test_from_config_uses_the_threatq_section_and_config_dir(rsps, tmp_path):
    write_config(tmp_path, threatq={"host": "tq.example.net:8443", "verify_ssl": False, "proxy": PROXY})
    cfg = config_mod.load(tmp_path)
    store_tokens(tmp_path)
    client = ThreatQClient.from_config(cfg, attempts=1)
    rsps.get("https://tq.example.net:8443/api/objects", json={"data": []})
    client.request("GET", "/api/objects")
    kwargs = rsps.calls[0].request.req_kwargs
    assert kwargs["verify"] is False and dict(kwargs["proxies"])["https"] == PROXY
    assert bearer(rsps.calls[0]) == f"Bearer {ACCESS}"
    assert client.client_id == "tq-client-id"


def test_each_http_call_logs_one_debug_line_without_query(rsps, client, caplog):
    rsps.get(f"{BASE}/api/indicators", json={"total": 0, "data": []})
    rsps.post(QUERY, json={"total": 0, "data": []})
    with caplog.at_level(logging.DEBUG, logger="tq_mw_thehive.threatq"):
        client.find_indicator("secret-looking-value.example", 11)
    lines = [r.getMessage() for r in caplog.records if r.name == "tq_mw_thehive.threatq"]
    assert len(lines) == 1
    assert lines[0].startswith("POST /api/indicators/query 200 ") and lines[0].endswith(" ms")
    assert "secret-looking-value" not in lines[0]


def test_secrets_never_reach_messages_repr_or_logs(rsps, tmp_path, caplog):
    """Every failure path that touches a secret: client credentials, refresh, errors that quote URLs."""
    leak = f"{SECRET} {ACCESS} {REFRESH} {PROXY}"
    rsps.post(TOKEN_URL, json=token_answer(NEW_ACCESS, NEW_REFRESH))
    rsps.get(f"{BASE}/api/objects", body=requests.ConnectionError(f"HTTPSConnectionPool {leak}"))
    store_tokens(tmp_path, expires_in=10)
    messages = []
    with caplog.at_level(logging.DEBUG):
        for client in (make_client(None, client_secret=SECRET, proxy=PROXY, max_wait_s=0),
                       make_client(tmp_path, proxy=PROXY, max_wait_s=0)):
            messages.append(repr(client))
            with pytest.raises(ThreatQUnavailable) as err:
                client.request("GET", "/api/objects")
            messages.append(str(err.value))
        rsps.replace(responses.POST, TOKEN_URL, body=requests.ConnectionError(f"url: /api/token?{leak}"))
        store_tokens(tmp_path, NEW_ACCESS, NEW_REFRESH, expires_in=10)
        with pytest.raises(ThreatQUnavailable) as err:
            make_client(tmp_path, proxy=PROXY, max_wait_s=0).request("GET", "/api/objects")
        messages.append(str(err.value))
    messages += [r.getMessage() for r in caplog.records] + [r.exc_text or "" for r in caplog.records]
    assert len(caplog.records) > 5  # the debug lines were really captured
    for text in messages:
        for secret in ALL_SECRETS:
            assert secret not in text, (secret, text)
    assert "ThreatQClient(base_url='https://threatq.example.org'" in messages[0]
    # and the tokens it saw are registered for the redacting log formatter
    assert logs.redact(f"{NEW_ACCESS} {NEW_REFRESH} {SECRET}") == "*** *** ***"


# ------------------------------------------------------------------------------------ consume

CONSUME = f"{BASE}/api/indicators/consume"


def test_consume_sends_the_array_and_returns_the_records_in_order(rsps, client):
    items = [{"value": "1.2.3.4", "type_id": 10, "tags": ["a"], "events": [{"id": 3}]},
             {"value": "x.example", "type_id": 8}]
    rsps.post(CONSUME, json={"data": [{"id": 7, "value": "1.2.3.4"}, {"id": 8, "value": "x.example"}]},
              status=201)
    assert [r["id"] for r in client.consume("indicators", items)] == [7, 8]
    (call,) = api_calls(rsps)
    assert sent_json(call) == items


def test_consume_records_are_matched_by_value_and_type_never_by_position(rsps, client):
    """SDK2's ``bulk_upload`` matches the answer to what it sent by value/name/title: an answer in
    an order of its own, or with one record missing, names each object right or not at all."""
    items = [{"value": "d41d8cd98f00b204e9800998ecf8427e", "type_id": 13},
             {"value": "same", "type_id": 7}, {"value": "same", "type_id": 20},
             {"value": "missing.example", "type_id": 8}, {"value": "Case.Example", "type_id": 8}]
    rsps.post(CONSUME, status=201, json={"data": [
        {"id": 33, "value": "same", "type": {"id": 20}}, {"id": 32, "value": "same", "type_id": 7},
        {"value": "no id at all"}, "not a record", {"id": 35, "value": "case.example", "type_id": 8},
        {"id": 31, "value": "d41d8cd98f00b204e9800998ecf8427e"}]})
    records = client.consume("indicators", items)
    assert [r and r["id"] for r in records] == [31, 32, 33, None, 35]


def test_consume_matches_events_by_title_and_incidents_by_value(rsps, client):
    rsps.post(f"{BASE}/api/events/consume", json={"data": [{"id": 2, "title": "b"}, {"id": 1, "title": "a"}]})
    assert [r["id"] for r in client.consume("events", [{"title": "a"}, {"title": "b"}])] == [1, 2]
    rsps.post(f"{BASE}/api/incident/consume", json={"data": []})
    assert client.consume("incident", [{"value": "c"}]) == [None]


@pytest.mark.parametrize("status", [404, 405])
def test_an_instance_without_consume_is_asked_once_then_the_caller_goes_call_by_call(rsps, client, caplog,
                                                                                    status):
    rsps.post(CONSUME, json={"errors": ["Not found"]}, status=status)
    assert client.consume("indicators", [{"value": "1.2.3.4", "type_id": 10}]) is None
    assert client.consume("indicators", [{"value": "5.6.7.8", "type_id": 10}]) is None
    assert len(api_calls(rsps)) == 1
    assert f"ThreatQ answered {status} to POST /api/indicators/consume: creating indicators call by call" \
        in caplog.text


def test_consume_refused_for_its_content_is_a_permanent_error(rsps, client):
    rsps.post(CONSUME, json={"data": {"errors": {"0.type_id": ["The selected type id is invalid."]}}},
              status=400)
    with pytest.raises(ThreatQPermanentError, match="type id"):
        client.consume("indicators", [{"value": "1.2.3.4", "type_id": 999}])
    assert client.refused_steps() == {}  # a refusal of the content says nothing about the endpoint


@pytest.mark.parametrize("answer", [{"data": []}, {"data": [{"value": "1.2.3.4"}]}, {"data": {"id": 3}}, None])
def test_a_consume_answer_without_a_record_for_an_item_says_so_instead_of_failing(rsps, client, answer):
    if answer is None:
        rsps.post(CONSUME, status=204)
    else:
        rsps.post(CONSUME, json=answer, status=201)
    assert client.consume("indicators", [{"value": "1.2.3.4", "type_id": 10}]) == [None]


# ------------------------------------------------------------------------------------ connections

def test_one_client_reuses_one_connection_for_all_its_calls(tmp_path):
    """Connection reuse: against a server that keeps connections open (HTTP/1.1 with
    Content-Length, as ThreatQ behind nginx), the client's calls share one TCP connection.
    (The simulators run on Werkzeug's development server, which closes every connection.)"""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ports = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            ports.append(self.client_address[1])
            body = json.dumps({"total": 0, "limit": 50, "offset": 0, "data": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        store_tokens(tmp_path)
        client = ThreatQClient(f"http://127.0.0.1:{server.server_port}", "cid", config_dir=tmp_path)
        for value in ("198.51.100.1", "198.51.100.2", "x.example"):
            assert client.find_indicator(value, 10) is None
        assert client.request("POST", "/api/indicators/query", json={"criteria": {}})["data"] == []  # a POST
        client.attributes("indicators", 1)
    finally:
        server.shutdown()
        server.server_close()
    assert len(ports) == 5 and len(set(ports)) == 1, ports


def test_expand_asks_for_attributes_sources_and_tags_inline(rsps, client):
    rsps.post(QUERY, json={"total": 1, "data": [{"id": 4, "value": "x", "type_id": 8, "tags": []}]})
    rsps.put(f"{BASE}/api/events/3", json={"data": {"id": 3, "attributes": []}})
    assert client.find_indicator("x", 8, expand=True)["tags"] == []
    assert client.update_event(3, expand=True, title="t")["attributes"] == []
    find, put = api_calls(rsps)
    assert query(find)["with"] == query(put)["with"] == "attributes,sources,tags"
    assert sent_json(put) == {"title": "t"}


# ------------------------------------------------------------------- optional steps, answer shapes

OPTIONAL_CALLS = [
    # (step, method name, args, HTTP method, path)
    ("tag_list", "tags", ("events", 4), "GET", "/api/events/4/tags"),
    ("tag_delete", "delete_tag", ("events", 4, 2), "DELETE", "/api/events/4/tags/2"),
    ("source_list", "sources", ("indicators", 9), "GET", "/api/indicators/9/sources"),
    ("source_tlp", "set_source_tlp", ("indicators", 9, 77, 1), "PUT", "/api/indicators/9/sources/77"),
]


@pytest.mark.parametrize("status", [404, 405])
@pytest.mark.parametrize("step, name, args, method, path", OPTIONAL_CALLS, ids=[c[0] for c in OPTIONAL_CALLS])
def test_an_optional_call_refused_is_turned_off_for_the_process_with_one_warning(rsps, client, caplog, status,
                                                                                step, name, args, method, path):
    rsps.add(method, f"{BASE}{path}", status=status, json={"errors": ["Not found"]})
    learned = []
    client.on_capability = lambda *a: learned.append(a)
    for _ in range(3):
        with pytest.raises(ThreatQStepRefused) as refused:
            getattr(client, name)(*args)
        assert (refused.value.step, refused.value.status) == (step, status)
    assert len(api_calls(rsps)) == 1  # never asked again by this client
    assert caplog.text.count(f"ThreatQ answered {status} to {method} {path}: {OPTIONAL_STEPS[step]}") == 1
    assert learned == [(step, False, status)]
    assert client.refused_steps() == {step: status}
    assert isinstance(refused.value, ThreatQPermanentError)  # a refusal, never an outage


@pytest.mark.parametrize("step, name, args, method, path", OPTIONAL_CALLS, ids=[c[0] for c in OPTIONAL_CALLS])
def test_an_optional_call_that_works_is_reported_once_and_other_refusals_stay_errors(rsps, client, step, name,
                                                                                    args, method, path):
    if method == "DELETE":
        rsps.add(method, f"{BASE}{path}", status=204)
    else:
        rsps.add(method, f"{BASE}{path}", json={"data": [{"id": 1, "name": "x"}]} if method == "GET"
                 else {"data": {"id": 1}})
    learned = []
    client.on_capability = lambda *a: learned.append(a)
    getattr(client, name)(*args)
    getattr(client, name)(*args)
    assert learned == [(step, True, None)]
    rsps.replace(method, f"{BASE}{path}", status=400, json={"errors": ["bad"]})
    with pytest.raises(ThreatQPermanentError) as failed:
        getattr(client, name)(*args)
    assert not isinstance(failed.value, ThreatQStepRefused) and client.refused_steps() == {}


@pytest.mark.parametrize("source, tlp", [
    ({"name": "TheHive", "tlp_id": 2, "pivot": {"id": 7}}, 2),                                # SDK2, XSOAR
    ({"name": "TheHive", "pivot": {"id": 7, "tlp_id": 1}}, 1),
    ({"name": "TheHive", "tlp": {"id": 3, "name": "GREEN"}}, 3),
    ({"name": "TheHive", "tlp": {"name": "White"}}, 4),
    ({"name": "TheHive", "tlp": "AMBER"}, 2),
    ({"name": "TheHive", "tlp_id": "1"}, 1),
    ({"id": 13604439, "source_id": 20, "name": "TheHive", "published_at": "2022-03-11 10:15:03",
      "pivot": {"id": 13604439}}, None),                                                       # stix-shifter
    ({"name": "TheHive", "tlp_id": None, "pivot": {"id": 5269046, "source_id": 20}}, None),
    ({"name": "TheHive", "tlp_id": 9}, None),
    ({"name": "TheHive", "tlp_id": True}, None),
])
def test_a_sources_tlp_is_read_from_every_shape_seen_and_none_when_absent(source, tlp):
    assert source_tlp(source) == tlp


def test_a_sources_pivot_id_and_an_attributes_name_and_a_records_type_in_every_shape():
    assert source_pivot_id({"id": 1, "pivot": {"id": 77}}) == 77
    assert source_pivot_id({"id": 13604439, "source_id": 20, "name": "x"}) == 13604439  # a link row itself
    assert source_pivot_id({"name": "x"}) is None
    assert attribute_name({"id": 1, "name": "PAP", "value": "AMBER"}) == "PAP"
    assert attribute_name({"id": 5252913, "attribute_id": 184, "value": "v",
                           "attribute": {"id": 184, "name": "Title"}}) == "Title"          # SDK1, SS
    assert attribute_name({"id": 1, "attribute": "PAP"}) is None
    assert record_type_id({"type_id": "15"}) == 15
    assert record_type_id({"type": {"name": "IP Address", "id": 15, "class": "network"}}) == 15  # XSOAR mock
    assert record_type_id({"type": "IP Address"}) is None


def test_every_optional_step_says_what_the_sync_does_without_it():
    assert set(OPTIONAL_STEPS) >= {"source_tlp", "source_list", "tag_list", "tag_delete", "query:indicators",
                                   "query:events", "query:incident", "consume:indicators"}
    assert all(text and not text.endswith(".") for text in OPTIONAL_STEPS.values())
