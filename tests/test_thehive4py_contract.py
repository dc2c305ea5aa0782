"""Contract: the TheHive simulator against thehive4py, StrangeBee's own TheHive 5 client.

TheHive 5 is closed source. thehive4py 2.x (TheHive-Project/TheHive4py, a test-only dependency:
setup.cfg's ``test`` extra) is what its vendor tests against a TheHive 5 container, so the
simulator is held to it here: for every read the daemon does, the vendor's client and the
daemon's ``TheHiveClient`` send the same query and get the same answer, and the simulator
answers the way TheHive does where the daemon may meet it (error bodies, authentication, the
organisation header, filters, sorts, ``extraData``, TheHive 5's fields).
"""
from __future__ import annotations

import pytest
from thehive4py import TheHiveApi
from thehive4py.errors import TheHiveError as VendorError
from thehive4py.query.filters import Between, Eq, Gte, Has, Id, In, Like, Lt, Ne, StartsWith
from thehive4py.query.page import Paginate
from thehive4py.query.sort import Asc, Desc
from thehive4py.types.case import OutputCase
from thehive4py.types.observable import OutputObservable

from conftest import THEHIVE_KEY
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.thehive.api import CASE_OBSERVABLES, TheHiveClient, TheHiveUnavailable

ORG = "acme-soc"


@pytest.fixture
def sim():
    hive = TheHiveSimulator(api_key=THEHIVE_KEY, organisation=ORG)
    case = hive.add_case(title="Phishing wave", severity=3, tags=["phishing"])
    hive.add_observable(case["_id"], dataType="ip", data="203.0.113.47", ioc=True)
    hive.add_observable(case["_id"], dataType="domain", data="lure.example")
    other = hive.add_case(title="Malware on a laptop", severity=1)
    hive.add_observable(other["_id"], dataType="hash", data="ff7b2c3938306261881c42e78d0df51d9bcdd574")
    hive.add_alert_observable(hive.add_alert()["_id"], dataType="domain", data="alert.example")
    hive.add_case(title="Never updated", severity=2)
    return hive


@pytest.fixture
def served(sim):
    with LoopbackServer(sim.app) as server:
        yield server


def vendor(server, key: str = THEHIVE_KEY, organisation: str = ORG) -> TheHiveApi:
    return TheHiveApi(server.url, apikey=key, organisation=organisation, max_retries=0)


def ours(server, **kwargs) -> TheHiveClient:
    kwargs.setdefault("organisation", ORG)
    return TheHiveClient(server.url, kwargs.pop("key", THEHIVE_KEY), max_wait_s=0, **kwargs)


def last_query(sim):
    return sim.queries[-1]


# --- every read the daemon does, both clients --------------------------------------------------

def test_get_case_the_vendors_rest_get_and_our_query_agree(sim, served):
    case_id = next(iter(sim.cases))
    theirs = vendor(served).case.get(case_id)
    assert ours(served).get_case(case_id) == theirs
    # thehive4py's find with an Id filter is the query form of the same read.
    assert vendor(served).case.find(filters=Id(case_id)) == [theirs]


def test_case_observables_same_query_same_answer(sim, served):
    case_id = next(iter(sim.cases))
    got = list(ours(served, page_size=100).iter_case_observables(case_id))
    sent = last_query(sim)
    theirs = vendor(served).case.find_observables(case_id, sortby=Asc("_createdAt"),
                                                   paginate=Paginate(0, 100, ["total"]))
    assert last_query(sim) == sent  # byte for byte the operations thehive4py builds
    assert got == theirs and [o["data"] for o in got] == ["203.0.113.47", "lure.example"]


@pytest.mark.parametrize("nulls_first", [False, True])
def test_cases_since_same_query_same_answer_in_either_null_order(sim, served, nulls_first):
    sim.nulls_first = nulls_first
    since = min(c["_createdAt"] for c in sim.cases.values())
    sim.update_case(next(iter(sim.cases)), severity=4)
    got = list(ours(served, page_size=100).iter_cases(since_ms=since))
    sent = last_query(sim)
    filters = Gte("_updatedAt", since) | Gte("_createdAt", since)
    theirs = vendor(served).case.find(filters=filters, sortby=Asc("_updatedAt"),
                                      paginate=Paginate(0, 100, ["total"]))
    assert last_query(sim) == sent
    assert got == theirs and len(got) == 3
    never_updated = [c["_id"] for c in got if "_updatedAt" not in c]
    assert len(never_updated) == 1
    assert [c["_id"] for c in got].index(never_updated[0]) == (0 if nulls_first else 2)


def test_changed_observables_same_query_same_answer(sim, served):
    since = sim._now_ms()
    changed = next(o for o in sim.observables.values() if o.get("data") == "lure.example")
    sim.update_observable(changed["_id"], ioc=True)
    got = list(ours(served).iter_observables(since_ms=since))
    sent = last_query(sim)
    filters = Gte("_updatedAt", since) | Gte("_createdAt", since)
    query = [*CASE_OBSERVABLES, {"_name": "filter", **filters}, {"_name": "sort", **Asc("_updatedAt")},
             {"_name": "page", **Paginate(0, 100, ["total"])}]
    theirs = vendor(served).query.run(query)
    assert last_query(sim) == sent
    assert got == theirs and [o["data"] for o in got] == ["lure.example"]


def test_get_observable_and_its_case(sim, served):
    observable = next(o for o in sim.observables.values() if o.get("data") == "203.0.113.47")
    theirs = vendor(served).observable.get(observable["_id"])
    assert ours(served).get_observable(observable["_id"]) == theirs
    case_id = next(iter(sim.cases))
    assert ours(served).case_of_observable(observable["_id"]) == case_id
    assert vendor(served).query.run([{"_name": "getObservable", "idOrName": observable["_id"]},
                                     {"_name": "case"}])[0]["_id"] == case_id
    alert_observable = next(o for o in sim.observables.values() if o.get("data") == "alert.example")
    assert ours(served).case_of_observable(alert_observable["_id"]) is None


def test_extra_data_total_is_the_x_total_header(sim, served):
    api = vendor(served)
    api.case.find(paginate=Paginate(0, 1, ["total"]))
    # thehive4py returns the body only; the header is what the daemon's paging reads.
    answer = api.session.post(served.url + "/api/v1/query", json={"query": [
        {"_name": "listCase"}, {"_name": "page", **Paginate(0, 1, ["total"])}]})
    assert answer.headers["X-Total"] == "3" and len(answer.json()) == 1
    plain = api.session.post(served.url + "/api/v1/query", json={"query": [
        {"_name": "listCase"}, {"_name": "page", **Paginate(0, 1)}]})
    assert "X-Total" not in plain.headers


# --- what the vendor's client may ask of TheHive -------------------------------------------------

def test_every_filter_thehive4py_builds(sim, served):
    api = vendor(served)

    def titles(filters):
        return sorted(c["title"] for c in api.case.find(filters=filters))

    assert titles(Ne("severity", 3)) == ["Malware on a laptop", "Never updated"]
    assert titles(In("severity", [1, 3])) == ["Malware on a laptop", "Phishing wave"]
    assert titles(~Eq("severity", 3)) == ["Malware on a laptop", "Never updated"]  # _not
    assert titles(Between("severity", 1, 3)) == ["Malware on a laptop", "Never updated"]  # to exclusive
    assert titles({"_is": {"_field": "title", "_value": "Phishing wave"}}) == ["Phishing wave"]
    assert titles(Eq("tags", "phishing")) == ["Phishing wave"]
    assert titles(Lt("severity", 2) | StartsWith("title", "Never")) == ["Malware on a laptop", "Never updated"]
    assert titles(Like("title", "*wave")) == ["Phishing wave"]
    assert titles(Has("_updatedAt")) == ["Malware on a laptop", "Phishing wave"]  # observables bumped them
    assert titles(Gte("severity", 2) & ~Has("_updatedAt")) == ["Never updated"]


def test_several_sort_fields(sim, served):
    sim.add_case(title="Another high one", severity=3)
    got = vendor(served).case.find(sortby=Desc("severity") & Asc("title"))
    assert [(c["severity"], c["title"]) for c in got] == [
        (3, "Another high one"), (3, "Phishing wave"), (2, "Never updated"), (1, "Malware on a laptop")]


def test_objects_carry_every_field_thehive4py_requires(sim, served):
    api = vendor(served)
    for case in api.case.find():
        assert OutputCase.__required_keys__ <= set(case), OutputCase.__required_keys__ - set(case)
        assert isinstance(case["newDate"], int) and isinstance(case["timeToDetect"], int)
        assert isinstance(case["userPermissions"], list)
    observables = api.query.run(list(CASE_OBSERVABLES))
    assert observables
    for observable in observables:
        assert OutputObservable.__required_keys__ <= set(observable)
        assert observable["external"] is False


# --- errors as TheHive answers them ---------------------------------------------------------------

def test_unknown_routes_and_methods_answer_thehives_error_body(sim, served):
    api = vendor(served)
    for method, path in (("GET", "/api/v1/nothing-here"), ("DELETE", "/api/v1/query")):
        with pytest.raises(VendorError) as info:
            api.session.make_request(method, path)
        body = info.value.response.json()
        assert set(body) == {"type", "message"} and info.value.response.status_code in (404, 405)
        # thehive4py shows "<type> - <message>" only for this shape.
        assert info.value.message == f"{body['type']} - {body['message']}"


def test_a_bad_query_is_a_400_both_clients_explain(sim, served):
    with pytest.raises(VendorError, match="BadRequest - Unknown query operation: frobnicate"):
        vendor(served).query.run([{"_name": "listCase"}, {"_name": "frobnicate"}])


def test_bearer_is_case_sensitive_and_a_wrong_key_is_refused(sim, served):
    api = vendor(served, key="wrong-key-0000")
    with pytest.raises(VendorError, match="AuthenticationError - Authentication failure"):
        api.case.find()
    api = vendor(served)
    api.session.headers["Authorization"] = f"bearer {THEHIVE_KEY}"
    with pytest.raises(VendorError, match="AuthenticationError"):
        api.case.find()


@pytest.mark.parametrize("status", [401, 403])
def test_a_user_outside_the_organisation(sim, served, status):
    sim.wrong_organisation_status = status
    with pytest.raises(VendorError) as info:
        vendor(served, organisation="other-org").case.find()
    assert info.value.response.status_code == status
    with pytest.raises(TheHiveUnavailable, match=f"HTTP {status}.*'other-org'"):
        ours(served, organisation="other-org").get_case(next(iter(sim.cases)))


def test_the_daemon_itself_never_imports_thehive4py():
    """A test-only dependency: the package must run without it."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "tq_mw_thehive"
    importing = [str(p) for p in root.rglob("*.py")
                 if "import thehive4py" in p.read_text(encoding="utf-8")
                 or "from thehive4py" in p.read_text(encoding="utf-8")]
    assert importing == []
