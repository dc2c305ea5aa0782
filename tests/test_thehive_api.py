"""TheHive API v1 client: request shapes and error mapping (responses), then against the simulator."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from conftest import THEHIVE_KEY, minimal_config
from tq_mw_thehive.config import from_dict
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.thehive.api import TheHiveClient, TheHiveError, TheHiveNotFound, TheHiveUnavailable

BASE = "https://thehive.example.org"
QUERY = f"{BASE}/api/v1/query"


def make_client(**kwargs) -> TheHiveClient:
    """A client that records its retry waits instead of sleeping."""
    kwargs.setdefault("organisation", "acme-soc")
    client = TheHiveClient(BASE + "/", THEHIVE_KEY, **kwargs)
    client.waits = []
    client._sleep = client.waits.append
    return client


def sent(call) -> dict:
    return json.loads(call.request.body)


def page_op(call) -> dict:
    return sent(call)["query"][-1]


# -- request shapes ------------------------------------------------------------------------------

@responses.activate
def test_get_case_sends_the_query_with_key_organisation_timeout_and_verify():
    case = {"_id": "~8396848", "_type": "Case", "number": 142}
    responses.post(QUERY, json=[case], match=[
        matchers.query_param_matcher({"name": "get-case"}),
        matchers.json_params_matcher({"query": [{"_name": "getCase", "idOrName": "~8396848"}]}),
        matchers.header_matcher({"Authorization": f"Bearer {THEHIVE_KEY}", "X-Organisation": "acme-soc"})])
    client = make_client(verify=False, timeout=(1.5, 7.0))
    assert client.get_case("~8396848") == case
    kwargs = responses.calls[0].request.req_kwargs
    assert (kwargs["timeout"], kwargs["verify"]) == ((1.5, 7.0), False)


@responses.activate
def test_no_organisation_and_no_key_send_no_such_headers():
    responses.post(QUERY, json=[{"_id": "~1"}])
    TheHiveClient(BASE, None).get_case("~1")
    headers = responses.calls[0].request.headers
    assert "X-Organisation" not in headers and "Authorization" not in headers


@responses.activate
def test_get_case_empty_result_is_not_found():
    responses.post(QUERY, json=[])
    with pytest.raises(TheHiveNotFound, match="~404"):
        make_client().get_case("~404")


@responses.activate
def test_case_observables_page_until_a_short_page():
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}])
    responses.post(QUERY, json=[{"_id": "~3"}, {"_id": "~4"}])
    responses.post(QUERY, json=[{"_id": "~5"}])
    got = [o["_id"] for o in make_client(page_size=2).iter_case_observables("~77")]
    assert got == ["~1", "~2", "~3", "~4", "~5"]
    assert [(page_op(c)["from"], page_op(c)["to"]) for c in responses.calls] == [(0, 2), (2, 4), (4, 6)]
    assert all(page_op(c)["extraData"] == ["total"] for c in responses.calls)
    assert sent(responses.calls[0])["query"][:-1] == [
        {"_name": "getCase", "idOrName": "~77"}, {"_name": "observables"},
        {"_name": "sort", "_fields": [{"_createdAt": "asc"}]}]
    assert responses.calls[0].request.params == {"name": "case-observables"}


@responses.activate
def test_exact_multiple_last_page_ends_on_an_empty_page():
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}])
    responses.post(QUERY, json=[{"_id": "~3"}, {"_id": "~4"}])
    responses.post(QUERY, json=[])
    assert len(list(make_client(page_size=2).iter_case_observables("~77"))) == 4
    assert len(responses.calls) == 3  # no extra get_case: the case had observables


@responses.activate
def test_x_total_ends_paging_without_the_empty_page():
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}], headers={"X-Total": "4"})
    responses.post(QUERY, json=[{"_id": "~3"}, {"_id": "~4"}], headers={"X-Total": "4"})
    responses.post(QUERY, json=[])  # what a client ignoring X-Total would need
    assert len(list(make_client(page_size=2).iter_cases())) == 4
    assert len(responses.calls) == 2


@responses.activate
def test_x_total_beyond_the_page_keeps_paging_and_a_short_page_still_ends_it():
    # The set shrank while it was read: the short page ends the listing whatever X-Total said.
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}], headers={"X-Total": "5"})
    responses.post(QUERY, json=[{"_id": "~3"}], headers={"X-Total": "5"})
    assert [c["_id"] for c in make_client(page_size=2).iter_cases()] == ["~1", "~2", "~3"]
    assert len(responses.calls) == 2


@pytest.mark.parametrize("header", ["", "many", "-1", "2.0"])
@responses.activate
def test_an_x_total_that_is_not_a_count_is_ignored(header):
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}], headers={"X-Total": header})
    responses.post(QUERY, json=[])
    assert len(list(make_client(page_size=2).iter_cases())) == 2
    assert len(responses.calls) == 2  # the old end condition: an empty page


@responses.activate
def test_paging_is_lazy_one_page_at_a_time():
    responses.post(QUERY, json=[{"_id": "~1"}, {"_id": "~2"}])
    iterator = make_client(page_size=2).iter_cases()
    assert len(responses.calls) == 0
    assert next(iterator)["_id"] == "~1" and next(iterator)["_id"] == "~2"
    assert len(responses.calls) == 1


@responses.activate
def test_empty_observable_list_checks_that_the_case_exists():
    responses.post(QUERY, json=[], match=[matchers.query_param_matcher({"name": "case-observables"})])
    responses.post(QUERY, json=[{"_id": "~77"}], match=[matchers.query_param_matcher({"name": "get-case"})])
    assert list(make_client().iter_case_observables("~77")) == []

    responses.reset()
    responses.post(QUERY, json=[])  # the case is gone: both queries come back empty
    with pytest.raises(TheHiveNotFound):
        list(make_client().iter_case_observables("~77"))


@responses.activate
def test_iter_cases_since_filters_on_updated_or_created_and_sorts_by_updated():
    responses.post(QUERY, json=[])
    list(make_client().iter_cases(since_ms=1717430400000))
    assert responses.calls[0].request.params == {"name": "list-cases"}
    assert sent(responses.calls[0]) == {"query": [
        {"_name": "listCase"},
        {"_name": "filter", "_or": [{"_gte": {"_field": "_updatedAt", "_value": 1717430400000}},
                                    {"_gte": {"_field": "_createdAt", "_value": 1717430400000}}]},
        {"_name": "sort", "_fields": [{"_updatedAt": "asc"}]},
        {"_name": "page", "from": 0, "to": 100, "extraData": ["total"]}]}


@responses.activate
def test_iter_observables_goes_through_the_cases_never_list_observable():
    responses.post(QUERY, json=[{"_id": "~9"}])
    assert [o["_id"] for o in make_client().iter_observables()] == ["~9"]
    ops = sent(responses.calls[0])["query"]
    assert [op["_name"] for op in ops] == ["listCase", "observables", "sort", "page"]

    responses.calls.reset()
    list(make_client().iter_observables(since_ms=1717430400000))
    ops = sent(responses.calls[0])["query"]
    assert ops[:3] == [{"_name": "listCase"}, {"_name": "observables"},
                       {"_name": "filter", "_or": [{"_gte": {"_field": "_updatedAt", "_value": 1717430400000}},
                                                   {"_gte": {"_field": "_createdAt", "_value": 1717430400000}}]}]
    assert responses.calls[0].request.params == {"name": "list-observables"}


@responses.activate
def test_a_non_array_answer_is_an_error():
    responses.post(QUERY, json={"unexpected": True})
    with pytest.raises(TheHiveError, match="not a JSON array"):
        make_client().get_case("~1")


# -- retries and error mapping ------------------------------------------------------------------

@responses.activate
def test_retries_5xx_connection_errors_and_timeouts_then_succeeds():
    responses.post(QUERY, status=503, json={"type": "InternalError", "message": "busy"})
    responses.post(QUERY, body=requests.ConnectionError("refused"))
    responses.post(QUERY, body=requests.exceptions.ReadTimeout("slow"))
    responses.post(QUERY, json=[{"_id": "~1"}])
    client = make_client(max_wait_s=0.01)  # uncapped, the waits would be random up to 0.5, 1 and 2 s
    assert client.get_case("~1") == {"_id": "~1"}
    assert len(responses.calls) == 4
    assert len(client.waits) == 3 and all(0 <= w <= 0.01 for w in client.waits)


@responses.activate
def test_retries_stop_after_attempts_with_unavailable():
    for _ in range(3):
        responses.post(QUERY, status=502)
    client = make_client(attempts=3)
    with pytest.raises(TheHiveUnavailable, match="after 3 attempt.*HTTP 502"):
        client.get_case("~1")
    assert len(responses.calls) == 3 and len(client.waits) == 2


@responses.activate
def test_zero_max_wait_does_not_wait():
    responses.post(QUERY, body=requests.ConnectionError("refused"))
    responses.post(QUERY, json=[{"_id": "~1"}])
    client = make_client(max_wait_s=0)
    client.get_case("~1")
    assert client.waits == [0]


@pytest.mark.parametrize("status, exc, text", [
    (401, TheHiveUnavailable, "API key refused, or the user is not in organisation 'acme-soc'"),
    (403, TheHiveUnavailable, "lacks the permission.*organisation 'acme-soc'"),
    (404, TheHiveNotFound, "HTTP 404: Case ~1 not found"),
    (400, TheHiveError, "HTTP 400: Invalid filter"),
])
@responses.activate
def test_client_errors_are_mapped_and_not_retried(status, exc, text):
    message = {401: "Authentication failure", 403: "Forbidden", 404: "Case ~1 not found",
               400: "Invalid filter"}[status]
    responses.post(QUERY, status=status, json={"type": "X", "message": message})
    with pytest.raises(exc, match=text) as info:
        make_client().get_case("~1")
    assert len(responses.calls) == 1
    if status == 400:
        assert not isinstance(info.value, (TheHiveUnavailable, TheHiveNotFound))


@responses.activate
def test_missing_key_is_named_on_401():
    responses.post(QUERY, status=401, json={"type": "AuthenticationError", "message": "Authentication failure"})
    with pytest.raises(TheHiveUnavailable, match="no API key is configured"):
        TheHiveClient(BASE, None).get_case("~1")


@responses.activate
def test_the_key_never_appears_in_errors_repr_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    echo = {"type": "AuthenticationError", "message": f"bad key {THEHIVE_KEY}"}
    responses.post(QUERY, status=401, json=echo)
    responses.post(QUERY, status=503, json=echo)
    responses.post(QUERY, status=503, json=echo)
    client = make_client(attempts=2)
    errors = []
    for _ in range(2):
        with pytest.raises(TheHiveUnavailable) as info:
            client.get_case("~1")
        errors.append(str(info.value))
    assert "bad key ***" in errors[0] and "bad key ***" in errors[1]
    debug = [r.getMessage() for r in caplog.records if r.name == "tq_mw_thehive.thehive"]
    assert debug and "POST /api/v1/query?name=get-case -> 401 in" in debug[0]
    everything = " ".join(errors + [caplog.text, repr(client)])
    assert THEHIVE_KEY not in everything
    assert "thehive.example.org" in repr(client)


def test_from_config_uses_the_thehive_section():
    cfg = from_dict(minimal_config(thehive={"organisation": "acme-soc", "verify_ssl": False}), Path("."))
    client = TheHiveClient.from_config(cfg, page_size=7)
    assert (client.url, client.organisation, client.verify, client.page_size) == (
        "http://127.0.0.1:9000", "acme-soc", False, 7)
    assert client._headers["Authorization"] == f"Bearer {THEHIVE_KEY}"


# -- against the simulator ------------------------------------------------------------------------

@pytest.fixture
def sim():
    return TheHiveSimulator(api_key=THEHIVE_KEY, organisation="acme-soc")


@pytest.fixture
def served(sim):
    with LoopbackServer(sim.app) as server:
        yield server


def sim_client(server, **kwargs) -> TheHiveClient:
    kwargs.setdefault("max_wait_s", 0)
    kwargs.setdefault("timeout", (2.0, 5.0))
    return TheHiveClient(server.url, kwargs.pop("api_key", THEHIVE_KEY), **kwargs)


def test_sim_get_case_by_id_and_number(sim, served):
    case = sim.add_case(title="Phishing wave", severity=3, tlp=4)
    client = sim_client(served, organisation="acme-soc")
    got = client.get_case(case["_id"])
    assert (got["title"], got["severityLabel"], got["tlpLabel"], got["stage"]) == (
        "Phishing wave", "HIGH", "RED", "New")
    assert client.get_case(str(case["number"]))["_id"] == case["_id"]
    with pytest.raises(TheHiveNotFound):
        client.get_case("~999999")


def test_sim_case_observables_over_several_pages(sim, served):
    case, other = sim.add_case(), sim.add_case()
    added = [sim.add_observable(case["_id"], dataType="ip", data=f"203.0.113.{i}") for i in range(7)]
    sim.add_observable(other["_id"], data="not mine")
    sim.add_alert_observable(sim.add_alert()["_id"], data="an alert's")
    sim.requests.clear()
    got = list(sim_client(served, page_size=3).iter_case_observables(case["_id"]))
    assert [o["data"] for o in got] == [o["data"] for o in added]
    assert all("_case" not in o and "_alert" not in o for o in got)
    assert sim.requests == [("POST", "/api/v1/query")] * 3


def test_sim_changed_observables_leave_alert_observables_out(sim, served):
    case, alert = sim.add_case(), sim.add_alert(title="Phishing report")
    mine = sim.add_observable(case["_id"], data="case.example")
    theirs = sim.add_alert_observable(alert["_id"], data="alert.example")
    since = sim._now_ms()
    sim.update_observable(mine["_id"], ioc=True)
    sim.update_observable(theirs["_id"], ioc=True)
    client = sim_client(served)
    assert [o["data"] for o in client.iter_observables(since_ms=since)] == ["case.example"]
    assert [o["data"] for o in client.iter_observables()] == ["case.example"]
    # TheHive's listObservable holds both kinds: what the client no longer asks for.
    assert {o["data"] for o in client._query("raw", [{"_name": "listObservable"}])} == {
        "case.example", "alert.example"}


def test_sim_x_total_stops_paging_at_the_total(sim, served):
    case = sim.add_case()
    for i in range(6):
        sim.add_observable(case["_id"], data=f"obs-{i}")
    client = sim_client(served, page_size=3)
    for send_total, requests_made in ((True, 2), (False, 3)):
        sim.send_total = send_total
        sim.requests.clear()
        assert len(list(client.iter_case_observables(case["_id"]))) == 6
        assert len(sim.requests) == requests_made


def test_sim_answers_x_total_only_when_a_page_asks_for_it(sim):
    http = sim.app.test_client()
    auth = {"Authorization": f"Bearer {THEHIVE_KEY}"}
    for _ in range(3):
        sim.add_case()
    page = {"_name": "page", "from": 0, "to": 2}
    plain = http.post("/api/v1/query", json={"query": [{"_name": "listCase"}, page]}, headers=auth)
    assert len(plain.get_json()) == 2 and "X-Total" not in plain.headers
    asked = http.post("/api/v1/query", json={"query": [{"_name": "listCase"}, dict(page, extraData=["total"])]},
                      headers=auth)
    assert len(asked.get_json()) == 2 and asked.headers["X-Total"] == "3"
    bad = http.post("/api/v1/query", json={"query": [{"_name": "listCase"}, dict(page, extraData="total")]},
                    headers=auth)
    assert bad.status_code == 400


def test_sim_case_without_observables_and_deleted_case(sim, served):
    case = sim.add_case()
    client = sim_client(served)
    assert list(client.iter_case_observables(case["_id"])) == []
    with pytest.raises(TheHiveNotFound):
        list(client.iter_case_observables("~123456"))


def test_sim_iter_cases_since_finds_updated_and_new_never_updated_cases(sim, served):
    old = sim.add_case(title="old")
    untouched = sim.add_case(title="untouched")
    since = sim.add_case(title="marker")["_createdAt"] + 1
    sim.add_case(title="new")  # never updated: no _updatedAt, found via _createdAt
    sim.update_case(old["_id"], status="InProgress")
    got = list(sim_client(served, page_size=1).iter_cases(since_ms=since))
    assert [c["title"] for c in got] == ["old", "new"]  # updated first, un-updated last [guess]
    assert "_updatedAt" not in got[1]
    assert untouched["_id"] not in {c["_id"] for c in got}
    assert len(list(sim_client(served, page_size=2).iter_cases())) == 4


def test_sim_iter_observables_since_sees_observable_updates(sim, served):
    case = sim.add_case()
    first = sim.add_observable(case["_id"], data="a")
    sim.add_observable(case["_id"], data="b")
    since = sim._now_ms()
    sim.update_observable(first["_id"], ioc=True)
    got = list(sim_client(served).iter_observables(since_ms=since))
    assert [(o["data"], o["ioc"]) for o in got] == [("a", True)]


def test_sim_organisation_and_key_are_enforced(sim, served):
    case = sim.add_case()
    # TheHive answers a user outside the organisation like a bad key: the message names both.
    with pytest.raises(TheHiveUnavailable, match="HTTP 401: API key refused, or the user is not in "
                                                 "organisation 'other-org'.*: Authentication failure"):
        sim_client(served, organisation="other-org").get_case(case["_id"])
    sim.wrong_organisation_status = 403
    with pytest.raises(TheHiveUnavailable, match="HTTP 403.*'other-org'"):
        sim_client(served, organisation="other-org").get_case(case["_id"])
    with pytest.raises(TheHiveUnavailable, match=r"HTTP 401: the API key was refused \(check thehive.api_key\): "
                                                 "Authentication failure"):
        sim_client(served, api_key="wrong-key-0000").get_case(case["_id"])
    http = sim.app.test_client()
    for scheme, status in (("Bearer", 200), ("bearer", 401), ("BEARER", 401)):  # case-sensitive
        answer = http.post("/api/v1/query", json={"query": [{"_name": "listCase"}]},
                           headers={"Authorization": f"{scheme} {THEHIVE_KEY}"})
        assert answer.status_code == status


@pytest.mark.parametrize("body, shown", [
    ({"type": "NotFoundError", "message": "Case ~1 not found"}, "HTTP 400: Case ~1 not found"),
    ({"type": "AttributeCheckingError", "tableName": "case",
      "errors": [{"name": "severity", "value": "x", "type": "InvalidFormatAttributeError"}]},
     'HTTP 400: AttributeCheckingError: [{"name":"severity","value":"x","type":"InvalidFormatAttributeError"}]'),
    ({"type": "MultiError", "error": "2 errors", "suberrors": []}, "HTTP 400: MultiError: 2 errors"),
    ({"type": "BadRequest"}, "HTTP 400: BadRequest"),
    ({}, "HTTP 400"),
])
@responses.activate
def test_an_error_body_without_a_message_shows_its_type_or_errors(body, shown):
    """ScalliGraph's ErrorHandler answers AttributeCheckingError with {type, errors} and MultiError
    with {type, error, suberrors}: no message, yet the error must say what TheHive said."""
    responses.post(QUERY, status=400, json=body)
    with pytest.raises(TheHiveError) as info:
        make_client().get_case("~1")
    assert str(info.value).endswith(shown)


@responses.activate
def test_a_plain_text_error_body_is_shown_with_the_key_masked():
    responses.post(QUERY, status=400, body=f"A client error occurred on POST /api/v1/query : bad {THEHIVE_KEY}\nmore")
    with pytest.raises(TheHiveError) as info:
        make_client().get_case("~1")
    assert str(info.value).endswith("HTTP 400: A client error occurred on POST /api/v1/query : bad ***")


def test_sim_fault_injection_is_retried(sim, served):
    case = sim.add_case()
    sim.fail_next(2, status=503)
    sim.requests.clear()
    assert sim_client(served).get_case(case["_id"])["_id"] == case["_id"]
    assert len(sim.requests) == 3
    sim.fail_next(5, status=500)
    with pytest.raises(TheHiveUnavailable, match="after 2 attempt.*HTTP 500: simulated failure"):
        sim_client(served, attempts=2).get_case(case["_id"])


def test_sim_slow_answer_times_out_as_unavailable(sim, served):
    case = sim.add_case()
    sim.delay_s = 0.3
    with pytest.raises(TheHiveUnavailable, match="ReadTimeout"):
        sim_client(served, attempts=2, timeout=(2.0, 0.1)).get_case(case["_id"])
    assert len(sim.requests) == 2


def test_sim_query_language_and_rest_routes(sim):
    http = sim.app.test_client()
    auth = {"Authorization": f"Bearer {THEHIVE_KEY}"}
    low, high = sim.add_case(severity=1, flag=True), sim.add_case(severity=4)
    obs = sim.add_observable(high["_id"], dataType="domain", data="evil.example")

    def query(*ops):
        return http.post("/api/v1/query", json={"query": list(ops)}, headers=auth)

    ranged = query({"_name": "listCase"},
                   {"_name": "filter", "_and": [{"_gte": {"_field": "severity", "_value": 1}},
                                                {"_lte": {"_field": "severity", "_value": 3}}]})
    assert [c["_id"] for c in ranged.get_json()] == [low["_id"]]
    flagged = query({"_name": "listCase"}, {"_name": "filter", "_eq": {"_field": "flag", "_value": False}})
    assert [c["_id"] for c in flagged.get_json()] == [high["_id"]]
    desc = query({"_name": "listCase"}, {"_name": "sort", "_fields": [{"severity": "desc"}]},
                 {"_name": "page", "from": 0, "to": 1})
    assert [c["_id"] for c in desc.get_json()] == [high["_id"]]
    bad = query({"_name": "listCase"}, {"_name": "frobnicate"})
    assert bad.status_code == 400 and bad.get_json() == {"type": "BadRequest",
                                                         "message": "Unknown query operation: frobnicate"}

    assert http.get(f"/api/v1/observable/{obs['_id']}", headers=auth).get_json()["data"] == "evil.example"
    missing = http.get("/api/v1/case/~1", headers=auth)
    assert missing.status_code == 404 and missing.get_json()["type"] == "NotFoundError"
    assert http.get(f"/api/v1/case/{low['_id']}").get_json() == {"type": "AuthenticationError",
                                                                 "message": "Authentication failure"}
