"""The ThreatQ simulator over real HTTP: the contract in docs/threatq-api-subset.md, and its fault knobs."""
from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator

EMAIL, PASSWORD = "analyst@example.org", "pw-sim-0123456789"
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
HAPPENED = "2024-05-06 07:08:09"


class Api:
    """A logged-in session against one simulator: ``api("GET", "/api/...")``."""

    def __init__(self, sim: ThreatQSimulator, url: str) -> None:
        self.sim, self.url = sim, url
        self.tokens = self.login()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.tokens['access_token']}"

    def login(self) -> dict:
        response = requests.post(self.url + "/api/token", params={"grant_type": "password",
                                 "client_id": self.sim.client_id},
                                 json={"email": EMAIL, "password": PASSWORD}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.request(method, self.url + path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs):
        response = self(method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()["data"] if response.content else None

    def indicator(self, value: str = "198.51.100.7", type_name: str = "IP Address", **extra) -> dict:
        return self.ok("POST", "/api/indicators", 201, json={"value": value, "type": type_name, **extra})[0]

    def event(self, title: str = "Hive Case # abc", **extra) -> dict:
        return self.ok("POST", "/api/events", 201,
                       json={"title": title, "type_id": 13, "happened_at": HAPPENED, **extra})


class Front:
    """The module's one loopback server answers with the current test's simulator: stopping a
    Werkzeug server costs up to 0.5 s (its poll interval), one per test would blow the budget."""

    def __init__(self) -> None:
        self.app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def front():
    front = Front()
    with LoopbackServer(front) as server:
        front.url = server.url
        yield front


@pytest.fixture
def sim() -> ThreatQSimulator:
    return ThreatQSimulator(users={EMAIL: PASSWORD})


@pytest.fixture
def api(sim, front):
    front.app = sim.app
    return Api(sim, front.url)


def validation_errors(response: requests.Response) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"data"} and set(body["data"]) == {"errors"}
    errors = body["data"]["errors"]
    assert all(isinstance(m, list) and m and all(isinstance(s, str) for s in m) for m in errors.values())
    return errors


def assert_not_found(response: requests.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json() == {"errors": ["Not found"]}


# ------------------------------------------------------------------ tokens


def test_every_api_path_but_token_needs_a_valid_unexpired_bearer(api, sim):
    unauthenticated = {"errors": ["Unauthenticated."]}
    for headers in ({}, {"Authorization": "Bearer not-a-token"},
                    {"Authorization": f"Basic {api.tokens['access_token']}"}):
        for path in ("/api/indicators", "/api/objects", "/api/no-such-thing"):
            response = requests.get(api.url + path, headers=headers, timeout=10)
            assert (response.status_code, response.json()) == (401, unauthenticated)
    assert api("GET", "/api/indicators").status_code == 200
    sim.expire_all_tokens()
    response = api("GET", "/api/indicators")
    assert (response.status_code, response.json()) == (401, unauthenticated)
    assert api.login()["access_token"] in sim.access_tokens  # /api/token still answers


def test_tokens_expire_after_token_ttl(api, sim):
    assert api("GET", "/api/objects").status_code == 200
    start = time.time()
    sim.clock = lambda: start + sim.token_ttl + 1
    assert api("GET", "/api/objects").status_code == 401


# ------------------------------------------------------------------ lookups


def test_indicator_types_list_every_contract_default_with_stable_ids(api, front):
    body = api("GET", "/api/indicator/types").json()
    types = {t["name"]: t for t in body["data"]}
    assert body["total"] == len(body["data"]) and (body["limit"], body["offset"]) == (50, 0)
    for name in ("ASN", "CIDR Block", "Email Address", "Email Subject", "Filename", "FQDN", "IP Address",
                 "IPv6 Address", "MD5", "Registry Key", "SHA-1", "SHA-256", "SHA-384", "SHA-512", "String",
                 "URL", "URL Path", "User-agent", "Username"):
        assert set(types[name]) == {"id", "name", "class", "score", "wildcard_matching"}
    assert len({t["id"] for t in body["data"]}) == len(body["data"])
    other = ThreatQSimulator(users={EMAIL: PASSWORD})
    front.app = other.app  # a second simulator: the same ids
    assert Api(other, front.url)("GET", "/api/indicator/types").json()["data"] == body["data"]


def test_statuses_and_event_types_have_the_default_ids(api):
    statuses = api.ok("GET", "/api/indicator/statuses")
    assert [(s["id"], s["name"]) for s in statuses] == [
        (1, "Active"), (2, "Expired"), (3, "Indirect"), (4, "Review"), (5, "Whitelisted")]
    types = {t["id"]: t for t in api.ok("GET", "/api/event/types")}
    assert len(types) == 14 and types[1]["name"] == "Spearphish"
    assert (types[13]["name"], types[14]["name"]) == ("Incident", "Sighting")
    assert set(types[13]) == {"id", "name", "user_editable"}


def test_objects_lists_the_incident_custom_object(api):
    objects = {o["collection"]: o for o in api.ok("GET", "/api/objects")}
    assert objects["incident"] == {"collection": "incident", "display_name": "Incident",
                                   "display_name_plural": "Incidents"}
    assert {"indicators", "events"} <= set(objects)


def test_without_the_incident_object_incident_paths_answer_404():
    """Also the documented way to serve a simulator: its own LoopbackServer(sim.app)."""
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, incident_object=False)
    with LoopbackServer(sim.app) as server:
        api = Api(sim, server.url)
        assert "incident" not in [o["collection"] for o in api.ok("GET", "/api/objects")]
        assert_not_found(api("GET", "/api/incident"))
        assert_not_found(api("POST", "/api/incident", json={"value": "Hive Case # 1"}))
        event = api.event()
        assert_not_found(api("GET", f"/api/events/{event['id']}/incident"))
        assert [h["object"] for h in api.ok("GET", "/api/search", params={"query": "hive"})] == ["event"]
    assert sim.incidents == {}


# ------------------------------------------------------------------ objects


def test_indicator_create_lookup_get_update(api, sim):
    created = api.indicator("10.0.0.1", description="seen in case")
    assert set(created) == {"id", "value", "type_id", "status_id", "description", "created_at", "updated_at"}
    assert (created["value"], created["status_id"], created["description"]) == ("10.0.0.1", 1, "seen in case")
    assert TIMESTAMP.fullmatch(created["created_at"]) and TIMESTAMP.fullmatch(created["updated_at"])
    ip_id = next(t["id"] for t in api.ok("GET", "/api/indicator/types") if t["name"] == "IP Address")
    assert created["type_id"] == ip_id
    api.indicator("10.0.0.10")
    found = api("GET", "/api/indicators", params={"value": "10.0.0.1"}).json()
    assert found["total"] == 1 and found["data"] == [created]  # exact match, not a prefix
    assert api.ok("GET", f"/api/indicators/{created['id']}") == created
    sim.clock = lambda: time.time() + 60
    updated = api.ok("PUT", f"/api/indicators/{created['id']}", json={"status_id": 4, "description": "x"})
    assert (updated["status_id"], updated["description"], updated["value"]) == (4, "x", "10.0.0.1")
    assert updated["updated_at"] > created["updated_at"] and updated["created_at"] == created["created_at"]
    assert sim.indicators[created["id"]] == updated


def test_plain_post_never_deduplicates_indicators(api, sim):
    first, second = api.indicator("evil.example"), api.indicator("evil.example")
    assert first["id"] != second["id"]
    batch = api.ok("POST", "/api/indicators", 201, json=[
        {"value": "evil.example", "type": "IP Address"}, {"value": "evil.example", "type_id": 8}])
    assert len(batch) == 2
    assert api("GET", "/api/indicators", params={"value": "evil.example"}).json()["total"] == 4
    assert len(sim.find_indicators("evil.example")) == 4
    assert [i["id"] for i in sim.find_indicators("evil.example", "IP Address")] == [
        first["id"], second["id"], batch[0]["id"]]
    assert sim.find_indicators("evil.example", "No Such Type") == []


def test_event_create_lookup_get_update(api, sim):
    event = api.ok("POST", "/api/events", 201, json={"title": "Hive Case # 7", "type": "Incident",
                                                     "happened_at": HAPPENED, "description": "<b>d</b>"})
    assert isinstance(event, dict) and (event["type_id"], event["happened_at"]) == (13, HAPPENED)
    api.event("Hive Case # 77")
    assert api.ok("GET", "/api/events", params={"title": "Hive Case # 7"}) == [event]
    assert api.ok("GET", f"/api/events/{event['id']}") == event
    updated = api.ok("PUT", f"/api/events/{event['id']}",
                     json={"title": "Renamed", "happened_at": "2024-01-02 03:04:05"})
    assert (updated["title"], updated["happened_at"], updated["type_id"]) == ("Renamed", "2024-01-02 03:04:05", 13)
    assert api.ok("GET", "/api/events", params={"title": "Hive Case # 7"}) == []
    assert sim.events[event["id"]]["title"] == "Renamed"


def test_incident_create_lookup_get_update(api, sim):
    incident = api.ok("POST", "/api/incident", 201, json={"value": "Hive Case # 9", "description": "d"})
    assert set(incident) == {"id", "value", "description", "created_at", "updated_at"}
    assert api.ok("GET", "/api/incident", params={"value": "Hive Case # 9"}) == [incident]
    assert api.ok("GET", f"/api/incident/{incident['id']}") == incident
    updated = api.ok("PUT", f"/api/incident/{incident['id']}", json={"description": "closed"})
    assert (updated["value"], updated["description"]) == ("Hive Case # 9", "closed")
    assert sim.incidents[incident["id"]]["description"] == "closed"


@pytest.mark.parametrize("path, body, fields", [
    ("/api/indicators", {"type": "FQDN"}, {"value"}),
    ("/api/indicators", {"value": "  ", "type_id": 1}, {"value"}),
    ("/api/indicators", {"value": "x"}, {"type_id"}),
    ("/api/indicators", {"value": "x", "type_id": 999}, {"type_id"}),
    ("/api/indicators", {"value": "x", "type": "Hostname"}, {"type"}),
    ("/api/indicators", {"value": "x", "type_id": 1, "status_id": 6}, {"status_id"}),
    ("/api/indicators", [{"value": "ok", "type_id": 1}, {"type_id": 1}], {"1.value"}),
    ("/api/indicators", {"value": "x", "type_id": 1, "sources": [{"name": "TheHive", "tlp_id": 5}]},
     {"sources.0.tlp_id"}),
    ("/api/indicators", [], {"body"}),
    ("/api/indicators", "not an object", {"body"}),
    ("/api/events", {"type_id": 13, "happened_at": HAPPENED}, {"title"}),
    ("/api/events", {"title": "t", "type_id": 15, "happened_at": HAPPENED}, {"type_id"}),
    ("/api/events", {"title": "t", "type_id": 13}, {"happened_at"}),
    ("/api/events", {"title": "t", "type_id": 13, "happened_at": "2024-05-06T07:08:09"}, {"happened_at"}),
    ("/api/events", {"title": "t", "type_id": 13, "happened_at": "2024-13-06 07:08:09"}, {"happened_at"}),
    ("/api/events", {"title": "t", "type_id": 13, "happened_at": "2024-5-6 7:08:09"}, {"happened_at"}),
    ("/api/events", {}, {"title", "type_id", "happened_at"}),
    ("/api/incident", {"description": "no value"}, {"value"}),
])
def test_invalid_bodies_answer_400_per_field_and_create_nothing(api, sim, path, body, fields):
    assert set(validation_errors(api("POST", path, json=body))) == fields
    assert sim.indicators == sim.events == sim.incidents == {}


def test_invalid_updates_answer_400_and_change_nothing(api, sim):
    event = api.event()
    assert set(validation_errors(api("PUT", f"/api/events/{event['id']}",
                                     json={"happened_at": "yesterday"}))) == {"happened_at"}
    indicator = api.indicator()
    assert set(validation_errors(api("PUT", f"/api/indicators/{indicator['id']}",
                                     json={"status_id": 0}))) == {"status_id"}
    assert sim.events[event["id"]] == event and sim.indicators[indicator["id"]] == indicator


def test_unknown_ids_and_paths_answer_404(api):
    event, indicator = api.event(), api.indicator()
    attribute = api.ok("POST", f"/api/events/{event['id']}/attributes", 201,
                       json={"name": "Severity", "value": "High"})[0]
    for method, path in [("GET", "/api/indicators/999"), ("PUT", "/api/events/999"),
                         ("GET", "/api/incident/999/attributes"), ("GET", "/api/adversaries"),
                         ("PUT", f"/api/indicators/{indicator['id']}/attributes/{attribute['id']}"),
                         ("DELETE", f"/api/events/{event['id']}/tags/999"),
                         ("PUT", f"/api/events/{event['id']}/sources/999"),
                         ("GET", f"/api/events/{event['id']}/adversaries")]:
        assert_not_found(api(method, path, json={"value": "v", "tlp_id": 1}))


# ------------------------------------------------------------------ search and paging


def test_search_finds_substrings_across_kinds_case_insensitively(api):
    event = api.event("Hive Case # ab12 – phishing")
    incident = api.ok("POST", "/api/incident", 201, json={"value": "HIVE CASE # AB12"})
    indicator = api.indicator("hive case # ab12.example", "FQDN")
    api.indicator("unrelated.example", "FQDN")
    hits = api.ok("GET", "/api/search", params={"query": "case # Ab12"})
    assert sorted(hits, key=lambda h: h["object"]) == [
        {"id": event["id"], "value": event["title"], "object": "event"},
        {"id": incident["id"], "value": incident["value"], "object": "incident"},
        {"id": indicator["id"], "value": indicator["value"], "object": "indicator"}]
    limited = api("GET", "/api/search", params={"query": "ab12", "limit": 2}).json()
    assert (limited["total"], len(limited["data"])) == (3, 2)
    assert set(validation_errors(api("GET", "/api/search"))) == {"query"}


def test_lists_page_with_limit_and_offset(api):
    created = api.ok("POST", "/api/indicators", 201,
                     json=[{"value": f"host{i}.example", "type": "FQDN"} for i in range(7)])
    pages = [api("GET", "/api/indicators", params={"limit": 3, "offset": offset}).json()
             for offset in (0, 3, 6)]
    assert [(p["total"], p["limit"], p["offset"], len(p["data"])) for p in pages] == [
        (7, 3, 0, 3), (7, 3, 3, 3), (7, 3, 6, 1)]
    assert [i for p in pages for i in p["data"]] == created
    everything = api("GET", "/api/indicators").json()
    assert (everything["limit"], everything["offset"], len(everything["data"])) == (50, 0, 7)
    tags = api("GET", f"/api/indicators/{created[0]['id']}/tags", params={"limit": 1}).json()
    assert (tags["total"], tags["limit"], tags["data"]) == (0, 1, [])
    for bad in ({"limit": 0}, {"limit": "ten"}, {"offset": -1}):
        assert set(validation_errors(api("GET", "/api/indicators", params=bad))) == set(bad)


# ------------------------------------------------------------------ sub-resources


def test_attributes_add_list_update_delete(api, sim):
    event = api.event()
    path = f"/api/events/{event['id']}/attributes"
    severity = api.ok("POST", path, 201, json={"name": "Severity", "value": "High"})
    assert severity == [{"id": severity[0]["id"], "name": "Severity", "value": "High", "sources": []}]
    flag = api.ok("POST", path, 201, json={"name": "Flagged", "value": 3})[0]
    assert flag["value"] == "3"
    assert api.ok("GET", path) == severity + [flag]
    changed = api.ok("PUT", f"{path}/{severity[0]['id']}", json={"value": "Low"})
    assert changed == {"id": severity[0]["id"], "name": "Severity", "value": "Low", "sources": []}
    assert api("DELETE", f"{path}/{flag['id']}").status_code == 204
    assert sim.attributes_of("events", event["id"]) == [changed]
    assert set(validation_errors(api("POST", path, json={"name": "Severity"}))) == {"value"}
    assert set(validation_errors(api("POST", path, json={"value": "x"}))) == {"name"}
    enriched = api.ok("POST", path, 201, json={"name": "GeoIP Country", "value": "FR", "sources": [{"name": "geoip"}]})
    assert enriched[0]["sources"] == [{"name": "geoip"}]
    assert set(validation_errors(api("POST", path, json={"name": "a", "value": "b", "sources": "geoip"}))) == {"sources"}


def test_tags_add_list_delete_without_duplicates(api, sim):
    event, indicator = api.event(), api.indicator()
    path = f"/api/events/{event['id']}/tags"
    tags = api.ok("POST", path, 201, json=[{"name": "phishing"}, {"name": "tlp:amber"}])
    assert [t["name"] for t in tags] == ["phishing", "tlp:amber"]
    assert api.ok("POST", path, 200, json=[{"name": "phishing"}]) == tags[:1]
    assert api.ok("GET", path) == tags
    shared = api.ok("POST", f"/api/indicators/{indicator['id']}/tags", 201, json={"name": "phishing"})
    assert shared == tags[:1]  # one tag, one id, on any object
    assert api("DELETE", f"{path}/{tags[0]['id']}").status_code == 204
    assert sim.tags_of("events", event["id"]) == ["tlp:amber"]
    assert sim.tags_of("indicators", indicator["id"]) == ["phishing"]
    assert set(validation_errors(api("POST", path, json=[{"name": ""}]))) == {"0.name"}


def test_sources_carry_tlp_and_are_not_duplicated(api, sim):
    event = api.event(sources=[{"name": "TheHive", "tlp_id": 2}])
    path = f"/api/events/{event['id']}/sources"
    [hive] = api.ok("GET", path)
    assert (hive["name"], hive["tlp_id"]) == ("TheHive", 2) and set(hive) == {"id", "name", "tlp_id", "pivot"}
    again = api.ok("POST", path, 200, json={"name": "TheHive", "tlp_id": 1})
    assert again == [hive]  # the existing one, TLP unchanged
    [misp] = api.ok("POST", path, 201, json={"name": "MISP", "tlp_id": 3})
    assert misp["pivot"]["id"] != hive["pivot"]["id"]
    assert api.ok("PUT", f"{path}/{hive['pivot']['id']}", json={"tlp_id": 1})["tlp_id"] == 1
    assert [(s["name"], s["tlp_id"]) for s in sim.sources_of("events", event["id"])] == [("TheHive", 1), ("MISP", 3)]
    for bad in (0, 5, "2", True, None):
        assert set(validation_errors(api("POST", path, json={"name": "X", "tlp_id": bad}))) == {"tlp_id"}
    assert set(validation_errors(api("PUT", f"{path}/{misp['pivot']['id']}", json={"tlp_id": 9}))) == {"tlp_id"}
    assert len(sim.sources_of("events", event["id"])) == 2


def test_links_are_symmetric_and_unlink_by_pivot_id(api, sim):
    event, indicator, other = api.event(), api.indicator(), api.indicator("203.0.113.5")
    [linked] = api.ok("POST", f"/api/events/{event['id']}/indicators", 201, json={"id": indicator["id"]})
    pivot = linked["pivot"]["id"]
    assert linked["id"] == indicator["id"]
    from_indicator = api.ok("GET", f"/api/indicators/{indicator['id']}/events")
    assert [(e["id"], e["title"], e["pivot"]) for e in from_indicator] == [
        (event["id"], event["title"], {"id": pivot})]
    assert api.ok("POST", f"/api/indicators/{indicator['id']}/events", 200,
                  json=[{"id": event["id"]}])[0]["pivot"]["id"] == pivot  # no second link
    api.ok("POST", f"/api/events/{event['id']}/indicators", 201, json=[{"id": other["id"]}])
    assert sim.links_of("events", event["id"], "indicators") == [indicator["id"], other["id"]]
    assert sim.links_of("indicators", indicator["id"], "events") == [event["id"]]
    # Unlinked from the other side, by the pivot id seen from the first; all or nothing.
    assert_not_found(api("DELETE", f"/api/indicators/{other['id']}/events", json=[pivot]))
    assert_not_found(api("DELETE", f"/api/indicators/{indicator['id']}/events", json=[pivot, 999]))
    assert sim.links_of("indicators", indicator["id"], "events") == [event["id"]]
    assert api("DELETE", f"/api/indicators/{indicator['id']}/events", json=[pivot]).status_code == 204
    assert api.ok("GET", f"/api/events/{event['id']}/indicators")[0]["id"] == other["id"]
    assert sim.links_of("indicators", indicator["id"], "events") == []
    links = f"/api/events/{event['id']}/indicators"
    assert set(validation_errors(api("POST", links, json={"id": 999}))) == {"id"}
    assert set(validation_errors(api("POST", f"/api/indicators/{other['id']}/indicators",
                                     json={"id": other["id"]}))) == {"id"}
    assert set(validation_errors(api("DELETE", links, json={"id": 1}))) == {"body"}


# ------------------------------------------------------------------ consume


def test_consume_creates_indicators_with_sources_attributes_tags_and_links_in_one_call(api, sim):
    event = api.event()
    body = [{"value": "198.51.100.7", "type": {"name": "IP Address"}, "status": {"name": "Review"},
             "description": "seen", "sources": [{"name": "TheHive", "tlp_id": 2}],
             "attributes": [{"name": "PAP", "value": "AMBER"},
                            {"name": "GeoIP Country", "value": "NL", "sources": [{"name": "geoip"}]}],
             "tags": ["phishing", {"name": "landing"}], "events": [{"id": event["id"]}]},
            {"value": "x.example", "type_id": 8, "status_id": 1}]
    created = api.ok("POST", "/api/indicators/consume", 201, json=body)
    assert [(r["value"], r["type_id"], r["status_id"]) for r in created] == [
        ("198.51.100.7", 10, 4), ("x.example", 8, 1)]
    oid = created[0]["id"]
    assert [(a["name"], a["value"], a["sources"]) for a in sim.attributes_of("indicators", oid)] == [
        ("PAP", "AMBER", []), ("GeoIP Country", "NL", [{"name": "geoip"}])]
    assert sim.tags_of("indicators", oid) == ["phishing", "landing"]
    assert [(s["name"], s["tlp_id"]) for s in sim.sources_of("indicators", oid)] == [("TheHive", 2)]
    assert sim.links_of("events", event["id"], "indicators") == [oid]


def test_consume_merges_into_the_same_value_and_type(api, sim):  # [guess] of the contract, modelled
    event = api.event()
    first = api.indicator("198.51.100.7", status="Review", description="")
    again = [{"value": "198.51.100.7", "type": "IP Address", "status": "Active", "description": "now set",
              "sources": [{"name": "TheHive", "tlp_id": 3}], "attributes": [{"name": "PAP", "value": "RED"}],
              "tags": ["t"], "events": [{"id": event["id"]}]}]
    for _ in range(2):  # twice: nothing is added the second time
        (merged,) = api.ok("POST", "/api/indicators/consume", 200, json=again)
    assert merged["id"] == first["id"] and merged["status_id"] == 4 and merged["description"] == "now set"
    assert len(sim.find_indicators("198.51.100.7")) == 1
    assert [a["value"] for a in sim.attributes_of("indicators", first["id"])] == ["RED"]
    assert sim.tags_of("indicators", first["id"]) == ["t"]
    assert sim.links_of("indicators", first["id"], "events") == [event["id"]]


def test_consume_validates_every_item_before_storing_any(api, sim):
    bad = [{"value": "198.51.100.7", "type": "IP Address"},
           {"value": "", "type": "Nope", "attributes": [{"name": "PAP"}], "tags": [""],
            "events": [{"id": 999}]}]
    errors = validation_errors(api("POST", "/api/indicators/consume", json=bad))
    assert "1.value" in errors and "1.type" in errors
    assert sim.indicators == {}
    for body in ({"value": "x"}, []):
        assert set(validation_errors(api("POST", "/api/indicators/consume", json=body))) == {"body"}
    for item, field in (({"attributes": [{"name": "PAP"}]}, "0.attributes.0.value"),
                        ({"tags": [3]}, "0.tags.0"), ({"events": [{"id": 999}]}, "0.events.0.id")):
        body = [{"value": "198.51.100.7", "type": "IP Address", **item}]
        assert set(validation_errors(api("POST", "/api/indicators/consume", json=body))) == {field}
    assert sim.indicators == {}


def test_events_and_incidents_consume_too_keyed_by_title_and_value(api, sim):
    item = {"title": "Hive Case # ~1 t", "type": "Incident", "happened_at": HAPPENED, "description": "",
            "sources": [{"name": "TheHive", "tlp_id": 3}], "attributes": [{"name": "Status", "value": "New"}],
            "tags": ["x"]}
    (event,) = api.ok("POST", "/api/events/consume", 201, json=[item])
    (again,) = api.ok("POST", "/api/events/consume", 200, json=[dict(item, tags=["y"])])
    assert again["id"] == event["id"] and len(sim.events) == 1
    assert sim.tags_of("events", event["id"]) == ["x", "y"]
    assert [a["value"] for a in sim.attributes_of("events", event["id"])] == ["New"]
    (incident,) = api.ok("POST", "/api/incident/consume", 201, json=[{"value": "Hive Case # ~2 t"}])
    assert sim.incidents[incident["id"]]["value"] == "Hive Case # ~2 t"
    assert set(validation_errors(api("POST", "/api/events/consume", json=[{"title": "t"}]))) == {
        "0.type_id", "0.happened_at"}


def test_an_instance_without_consume_answers_404(front):
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, consume=False)
    front.app = sim.app
    api = Api(sim, front.url)
    assert_not_found(api("POST", "/api/indicators/consume", json=[{"value": "x", "type_id": 8}]))
    assert sim.indicators == {}


# ------------------------------------------------------------------ fault injection


def test_fail_next_fails_api_calls_but_not_token_calls(api, sim):
    sim.fail_next(2, status=502)
    first = api("GET", "/api/objects")
    assert (first.status_code, first.json()) == (502, {"errors": ["Simulated failure"]})
    api.login()  # a token call consumes no failure
    assert api("POST", "/api/events", json={}).status_code == 502
    assert api("GET", "/api/objects").status_code == 200
    sim.fail_next(1)
    assert requests.get(api.url + "/api/objects", timeout=10).status_code == 500


def test_rate_limit_next_answers_429_with_retry_after_in_order(api, sim):
    sim.fail_next(1)
    sim.rate_limit_next(2, retry_after=7)
    assert api("GET", "/api/objects").status_code == 500
    for _ in range(2):
        limited = api("GET", "/api/objects")
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "7")
        assert "errors" in limited.json()
    assert api("GET", "/api/objects").status_code == 200


def test_delay_s_makes_client_timeouts_happen(api, sim):
    sim.delay_s = 0.3
    with pytest.raises(requests.Timeout):
        api("GET", "/api/objects", timeout=0.05)
    sim.delay_s = 0.0
    assert api("GET", "/api/objects").status_code == 200


def test_latency_ms_defaults_to_zero_and_is_a_constructor_argument():
    assert ThreatQSimulator().latency_ms == 0
    assert ThreatQSimulator(latency_ms=50).latency_ms == 50


def test_latency_ms_delays_every_request_including_the_token_grant(api, sim):
    sim.latency_ms = 150
    started = time.monotonic()
    assert api("GET", "/api/objects").status_code == 200
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    api.login()
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    assert api("GET", "/api/no-such-path").status_code == 404  # even an unknown path waits
    assert time.monotonic() - started >= 0.15


def test_latency_ms_waits_outside_the_lock_so_concurrent_requests_wait_in_parallel(api, sim):
    sim.latency_ms = 200
    n = 8
    statuses = []
    barrier = threading.Barrier(n)

    def call(i: int) -> None:  # one session per thread: a Session is not thread-safe
        with requests.Session() as session:
            session.headers.update(api.session.headers)
            barrier.wait(timeout=10)
            statuses.append(session.post(api.url + "/api/indicators", timeout=30,
                                         json={"value": f"p{i}.example", "type": "FQDN"}).status_code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert statuses == [201] * n and len(sim.indicators) == n
    assert elapsed >= 0.2
    assert elapsed < n * 0.2 * 0.6  # serialised they would take n × 200 ms


def test_down_answers_503_everywhere_including_token(api, sim):
    sim.down = True
    assert api("GET", "/api/objects").status_code == 503
    response = requests.post(api.url + "/api/token", params={"grant_type": "password",
                             "client_id": sim.client_id}, json={"email": EMAIL, "password": PASSWORD}, timeout=10)
    assert response.status_code == 503 and response.json()["errors"]
    sim.down = False
    assert api("GET", "/api/objects").status_code == 200


def test_refresh_fails_rejects_the_refresh_grant_until_cleared(api, sim):
    params = {"grant_type": "refresh_token", "refresh_token": api.tokens["refresh_token"]}
    headers = {"Authorization": f"Bearer {api.tokens['access_token']}"}
    sim.refresh_fails = True
    refused = requests.post(api.url + "/api/token", params=params, headers=headers, timeout=10)
    assert refused.status_code == 400 and refused.json()["errors"]
    assert api("GET", "/api/objects").status_code == 200  # the access token still works
    sim.refresh_fails = False
    refreshed = requests.post(api.url + "/api/token", params=params, headers=headers, timeout=10)
    assert refreshed.status_code == 200 and refreshed.json()["access_token"] in sim.access_tokens


def test_request_log_is_method_and_path_without_query_under_concurrency(api, sim):
    sim.requests.clear()

    def post_some(n: int) -> None:  # one session per thread: a Session is not thread-safe
        with requests.Session() as session:
            session.headers.update(api.session.headers)
            for i in range(5):
                session.post(api.url + "/api/indicators", params={"normalize": "Y"}, timeout=10,
                             json={"value": f"t{n}-{i}.example", "type": "FQDN"})

    threads = [threading.Thread(target=post_some, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sim.requests == [("POST", "/api/indicators")] * 40
    assert len(sim.indicators) == 40 and sorted(sim.indicators) == list(range(1, 41))


def test_with_puts_attributes_sources_and_tags_inline_on_list_get_and_put(api, sim):
    indicator = api.indicator(sources=[{"name": "TheHive", "tlp_id": 2}])
    path = f"/api/indicators/{indicator['id']}"
    api.ok("POST", path + "/attributes", 201, json={"name": "PAP", "value": "AMBER"})
    api.ok("POST", path + "/tags", 201, json=[{"name": "t"}])
    plain = api.ok("GET", path)
    assert not {"attributes", "sources", "tags"} & set(plain)
    (listed,) = api.ok("GET", "/api/indicators", params={"value": indicator["value"],
                                                         "with": "attributes,sources,tags,score"})
    got = api.ok("GET", path, params={"with": "attributes,tags"})
    put = api.ok("PUT", path, params={"with": "sources"}, json={"description": "d"})
    assert listed["attributes"] == api.ok("GET", path + "/attributes")
    assert listed["sources"] == api.ok("GET", path + "/sources") and listed["sources"][0]["pivot"]["id"]
    assert listed["tags"] == got["tags"] == api.ok("GET", path + "/tags")
    assert "sources" not in got and set(put) - set(plain) == {"sources"} and put["description"] == "d"


# ------------------------------------------------------------------ query, and the two answer shapes


def test_query_matches_criteria_and_filters_exactly_and_pages(api, sim):
    """``POST /api/{c}/query`` as XSOAR (criteria value + filters type_name), Siemplify (``{"is": v}``
    in ``+or``/``+and`` groups) and stix-shifter send it."""
    a = api.indicator("198.51.100.7")
    api.indicator("198.51.100.7", "String")
    api.indicator("198.51.100.70")
    xsoar = {"criteria": {"value": "198.51.100.7"}, "filters": {"type_name": "IP Address"}}
    assert [i["id"] for i in api.ok("POST", "/api/indicators/query", json=xsoar)] == [a["id"]]
    siemplify = {"criteria": {}, "filters": {"+or": [{"+and": [{"value": {"is": "198.51.100.7"}},
                                                              {"type_name": "IP Address"}]}]}}
    assert [i["id"] for i in api.ok("POST", "/api/indicators/query", json=siemplify)] == [a["id"]]
    both = api("POST", "/api/indicators/query", params={"limit": 1, "offset": 1, "with": "tags"},
               json={"criteria": {"value": "198.51.100.7"}}).json()
    assert (both["total"], len(both["data"]), both["data"][0]["tags"]) == (2, 1, [])
    assert api.ok("POST", "/api/indicators/query", json={"criteria": {"value": "198.51.100"}}) == []
    event = api.event("Hive Case # ~1 a, b")
    assert [e["id"] for e in api.ok("POST", "/api/events/query",
                                    json={"criteria": {"title": "Hive Case # ~1 a, b"}})] == [event["id"]]
    assert set(validation_errors(api("POST", "/api/events/query", json=["x"]))) == {"body"}


@pytest.fixture
def sdk(sim) -> ThreatQSimulator:
    sim.shapes = "sdk"
    return sim


def test_sdk_shape_sources_are_link_rows_without_a_tlp(api, sdk):
    event = api.event(sources=[{"name": "TheHive", "tlp_id": 2}])
    [row] = api.ok("GET", f"/api/events/{event['id']}/sources")
    assert set(row) == {"id", "source_id", "name", "published_at", "pivot"} and row["name"] == "TheHive"
    assert api.ok("GET", f"/api/events/{event['id']}", params={"with": "sources"})["sources"] == [row]
    assert sdk.sources_of("events", event["id"])[0]["tlp_id"] == 2  # kept, only not shown
    response = api("PUT", f"/api/events/{event['id']}/sources/{row['pivot']['id']}", json={"tlp_id": 1})
    assert response.status_code == 405
    assert sdk.sources_of("events", event["id"])[0]["tlp_id"] == 2


def test_sdk_shape_attribute_rows_name_their_attribute_in_attribute(api, sdk):
    event = api.event()
    path = f"/api/events/{event['id']}/attributes"
    [added] = api.ok("POST", path, 201, json={"name": "Severity", "value": "High"})
    assert "name" not in added and added["attribute"]["name"] == "Severity"
    assert added["attribute_id"] == added["attribute"]["id"]
    [listed] = api.ok("GET", path)
    assert listed == added
    assert api.ok("PUT", f"{path}/{added['id']}", json={"value": "Low"})["attribute"]["name"] == "Severity"
    assert sdk.attributes_of("events", event["id"])[0]["name"] == "Severity"


def test_sdk_shape_list_filters_read_commas_as_or_and_percent_as_wildcard_ignoring_case(api, sdk):
    ids = {v: api.indicator(v, "URL")["id"] for v in ("https://a.example/x,y", "https://a.example/x", "y",
                                                      "https://A.example/x,Y%z")}

    def found(value):
        return sorted(i["id"] for i in api.ok("GET", "/api/indicators", params={"value": value}))

    assert found("https://a.example/x,y") == sorted([ids["https://a.example/x"], ids["y"]])  # not itself
    assert found("https://a.example/x%") == sorted(ids[v] for v in ids if v != "y")
    assert found("HTTPS://A.EXAMPLE/X") == [ids["https://a.example/x"]]
    sdk.shapes = "strict"
    assert found("https://a.example/x,y") == [ids["https://a.example/x,y"]]
    assert found("https://a.example/x%") == []


def test_sdk_shape_refuses_tag_reads_and_deletes_and_answers_consume_in_its_own_order(api, sdk):
    event = api.event()
    tags = api.ok("POST", f"/api/events/{event['id']}/tags", 201, json=[{"name": "a"}])
    assert_not_found(api("GET", f"/api/events/{event['id']}/tags"))
    assert api("DELETE", f"/api/events/{event['id']}/tags/{tags[0]['id']}").status_code == 405
    assert api.ok("GET", f"/api/events/{event['id']}", params={"with": "tags"})["tags"] == tags
    answer = api.ok("POST", "/api/indicators/consume", 201, json=[
        {"value": "first.example", "type": "FQDN"}, {"value": "second.example", "type": "FQDN"}])
    assert [r["value"] for r in answer] == ["second.example", "first.example"]


def test_refuse_turns_off_optional_calls_in_either_shape_and_shapes_are_checked(api, sim):
    event = api.event(sources=[{"name": "TheHive", "tlp_id": 2}])
    sim.refuse = {"query", "source_list"}
    assert_not_found(api("POST", "/api/events/query", json={"criteria": {}}))
    assert_not_found(api("GET", f"/api/events/{event['id']}/sources"))
    assert api("GET", f"/api/events/{event['id']}/tags").status_code == 200
    assert sim.refuses("query") and not sim.refuses("tag_list")
    sim.shapes = "sdk"
    assert sim.refuses("tag_list") and sim.refuses("source_tlp")
    with pytest.raises(ValueError):
        sim.shapes = "loose"


def test_consume_records_limit_answers_fewer_records_than_objects_made(api, sim):
    sim.consume_records_limit = 0
    assert api.ok("POST", "/api/indicators/consume", 201, json=[{"value": "z.example", "type": "FQDN"}]) == []
    assert len(sim.find_indicators("z.example", "FQDN")) == 1


def test_delete_object_removes_it_and_its_links(api, sim):
    event, indicator = api.event(), api.indicator()
    api.ok("POST", f"/api/events/{event['id']}/indicators", 201, json={"id": indicator["id"]})
    sim.delete_object("indicators", indicator["id"])
    assert_not_found(api("GET", f"/api/indicators/{indicator['id']}"))
    assert sim.links_of("events", event["id"], "indicators") == []
