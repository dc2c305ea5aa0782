"""The sync path end to end in one process: inbox → worker → real HTTP → ThreatQ and TheHive simulators.

Every test that builds a world runs against both answer shapes of the ThreatQ simulator
(``shapes``: ``strict``, the contract's reading; ``sdk``, what the public captures show, without
the calls that have no public evidence). No event may become a dead letter in either."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest

from conftest import sample
from tq_mw_thehive import state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.thehive import events
from tq_mw_thehive.testing.threatq_sim import INDICATOR_TYPES, KINDS
from tq_mw_thehive.threatq.api import ThreatQClient
from tq_mw_thehive.worker import Worker
from tq_mw_thehive.services import Services

CASE_ID = "~8396848"
TITLE = "Hive Case # ~8396848 Phishing wave targeting finance mailboxes"


@pytest.fixture(params=["strict", "sdk"])
def shapes(request) -> str:
    return request.param


@pytest.fixture
def make_world(make_world, shapes):
    """conftest's worlds, with the simulator answering in ``shapes`` (the ``world`` fixture too)."""
    def make(**sync):
        refuse = sync.pop("refuse", ())
        world = make_world(**sync)
        world.tq.shapes, world.tq.refuse = shapes, set(refuse)
        return world

    return make


def test_case_create_maps_every_attribute_tag_and_tlp(world):
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    assert world.states() == ["done"]
    event = world.event()
    assert event["title"] == TITLE
    assert event["type_id"] == 13  # Incident
    assert event["happened_at"] == "2024-06-03 15:50:00"  # startDate 1717429800000 in UTC
    assert event["description"] == "Several users in finance reported a credential-harvesting mail."
    assert world.attributes("events", event["id"]) == {
        "TheHive Id": CASE_ID, "Status": "New", "Owner": "jdoe@soc.example.org", "Case Id": "142",
        "Severity": "HIGH", "PAP": "AMBER", "Flagged": "No"}
    assert sorted(world.tq.tags_of("events", event["id"])) == ["finance", "phishing"]
    assert [(s["name"], s["tlp_id"]) for s in world.tq.sources_of("events", event["id"])] == [("TheHive", 2)]


def test_updates_change_values_in_place_and_redelivery_duplicates_nothing(world):
    created, updated = sample("th5-case-create.json"), sample("th5-case-update.json")
    world.deliver(created, updated)
    world.drain()
    event = world.event()
    attributes = world.attributes("events", event["id"])
    assert (attributes["Severity"], attributes["Status"]) == ("CRITICAL", "InProgress")
    # TheHive sends an event twice, or the whole inbox is replayed: nothing is added.
    world.inbox.db.execute("UPDATE inbox SET state = 'dead'")
    assert world.inbox.replay() == 2
    world.drain()
    assert len(world.tq.events) == 1
    assert world.attributes("events", event["id"]) == attributes
    assert len(world.tq.tags_of("events", event["id"])) == 2


def test_observable_becomes_a_linked_indicator_and_ioc_is_set_later(world):
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert indicator["description"] == "IP hosting the credential-harvesting page"
    assert indicator["status_id"] == 1  # Active
    assert world.attributes("indicators", indicator["id"]) == {"PAP": "AMBER", "Sighted?": "Yes"}
    assert sorted(world.tq.tags_of("indicators", indicator["id"])) == ["phishing-landing", "src:mail-header"]
    assert world.tq.links_of("events", world.event()["id"], "indicators") == [indicator["id"]]
    world.deliver(sample("th5-observable-update-ioc.json"))
    world.drain()
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    assert len(world.tq.find_indicators("203.0.113.47")) == 1


def test_thehive4_observable_creates_its_case_first_from_the_embedded_case(world):
    world.deliver(sample("th4-case-artifact-create.json"))
    world.drain()
    assert world.states() == ["done"]
    event = world.event()
    assert event["title"] == TITLE
    assert world.attributes("events", event["id"])["Owner"] == "jdoe@soc.example.org"
    assert world.attributes("events", event["id"])["Status"] == "Open"
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.tq.links_of("indicators", indicator["id"], "events") == [event["id"]]


def test_an_observable_without_its_case_fetches_the_case_from_thehive(world):
    case = world.hive.add_case(title="Fetched case", severity=2, tlp=2, pap=2)
    payload = sample("th5-observable-create-ip.json")
    del payload["object"]["case"], payload["context"]
    payload["rootId"] = case["_id"]
    world.deliver(payload)
    world.drain()
    assert world.event()["title"] == f"Hive Case # {case['_id']} Fetched case"
    assert ("POST", "/api/v1/query") in world.hive.requests


def test_deletes_never_delete_intelligence(world):
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    delete_observable = {"_id": "~2070000", "_type": "Audit", "action": "delete", "objectType": "Observable",
                         "objectId": "~12734592", "rootId": CASE_ID, "_createdAt": 1717500000000,
                         "details": {"dataType": "ip", "data": "203.0.113.47"}}
    world.deliver(delete_observable, sample("th5-case-delete.json"))
    world.drain()
    assert world.states() == ["done"] * 4
    event = world.event()
    assert world.attributes("events", event["id"])["Status"] == "Deleted"
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.tq.links_of("events", event["id"], "indicators") == []


def test_an_older_update_arriving_late_never_overwrites_a_newer_one(world):
    older = sample("th5-case-update.json")
    newer = copy.deepcopy(older)
    newer["_id"], newer["_createdAt"] = "~2056999", older["_createdAt"] + 60_000
    newer["object"]["severity"], newer["object"]["severityLabel"] = 1, "LOW"
    world.deliver(sample("th5-case-create.json"), newer)
    world.drain()
    world.deliver(older)
    world.drain()
    assert world.attributes("events", world.event()["id"])["Severity"] == "LOW"


def test_the_stale_check_compares_thehive_times_only_never_our_clock(world):
    """An event without a TheHive time used to be stamped with our clock: a TheHive whose clock
    is behind ours (or an old backlog) then had every later update thrown away as stale."""
    create = sample("th5-case-create.json")
    untimed = sample("th5-case-update.json")
    del untimed["_createdAt"]  # no audit time: the object's own _updatedAt (TheHive's clock) counts
    untimed["object"]["_updatedAt"] = create["_createdAt"] + 1_000
    untimed["object"]["severity"], untimed["object"]["severityLabel"] = 1, "LOW"
    later = copy.deepcopy(untimed)
    later["_id"], later["_createdAt"] = "~2057001", create["_createdAt"] + 2_000  # hours behind our clock
    later["object"]["severity"], later["object"]["severityLabel"] = 4, "CRITICAL"
    world.deliver(create, untimed)
    world.drain()
    assert world.attributes("events", world.event()["id"])["Severity"] == "LOW"
    world.deliver(later)
    world.drain()
    assert world.states() == ["done", "done", "done"]
    assert world.attributes("events", world.event()["id"])["Severity"] == "CRITICAL"


def test_a_lone_surrogate_is_text_not_an_unexpected_error(world):
    """JSON may carry "\\ud800" alone: it decodes to a string no UTF-8 encoder takes."""
    case = sample("th5-case-create.json")
    case["object"]["title"] = case["details"]["title"] = "Phish \ud800 wave"
    obs = sample("th5-observable-create-ip.json")
    obs["object"]["dataType"], obs["object"]["data"] = "domain", "evil\udfff.example"
    obs["object"]["message"] = "seen \ud83d here"
    obs["details"] = dict(obs["object"])
    world.deliver(case, obs)
    world.drain()
    assert world.states() == ["done", "done"]
    assert world.event()["title"].endswith("Phish \ufffd wave")
    assert len(world.tq.find_indicators("evil\ufffd.example")) == 1


def test_tags_removed_in_thehive_are_removed_but_not_an_analysts_own(world, shapes, caplog):
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    event_id = world.event()["id"]
    ThreatQClient.from_config(world.cfg).add_tags("events", event_id, ["analyst-note"])  # an analyst's tag
    update = sample("th5-case-update.json")
    update["object"]["tags"] = ["phishing", "wave-2"]
    world.deliver(update)
    world.drain()
    assert world.states() == ["done", "done"]
    if shapes == "strict":
        assert sorted(world.tq.tags_of("events", event_id)) == ["analyst-note", "phishing", "wave-2"]
    else:  # no DELETE …/tags/{id}: the removed tag stays, with one warning, and the event is done
        assert sorted(world.tq.tags_of("events", event_id)) == ["analyst-note", "finance", "phishing", "wave-2"]
        assert caplog.text.count("tags removed in TheHive stay on the ThreatQ object") == 1
        assert world.worker.sync.state.capabilities()["tag_delete"].supported is False


def test_incident_mode_makes_an_incident_object(make_world):
    world = make_world(cases_as="incident")
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    assert world.tq.events == {}
    (incident,) = world.tq.incidents.values()
    assert incident["value"] == TITLE
    assert world.attributes("incident", incident["id"])["TheHive Id"] == CASE_ID
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.tq.links_of("incident", incident["id"], "indicators") == [indicator["id"]]


def test_incident_mode_without_the_object_is_a_dead_letter_saying_why(make_world):
    world = make_world(cases_as="incident", incident_object=False)
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    assert world.states() == ["dead"]
    assert "no incident object" in world.last_error()


def test_only_ioc_syncs_an_observable_once_it_becomes_an_ioc(make_world):
    world = make_world(only_ioc=True)
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    assert world.tq.find_indicators("203.0.113.47") == []
    world.deliver(sample("th5-observable-update-ioc.json"))
    world.drain()
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"


def test_cases_without_observables_wait_for_the_first_one(make_world):
    world = make_world(include_cases_without_observables=False)
    world.deliver(sample("th5-case-create.json"), sample("th5-case-update.json"))
    world.drain()
    assert world.tq.events == {}
    assert world.states() == ["done", "done"]
    observable = sample("th5-observable-create-ip.json")
    del observable["object"]["case"], observable["context"]  # only the held case can supply it
    world.deliver(observable)
    world.drain()
    event = world.event()
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"  # the newest held state
    assert ("POST", "/api/v1/query") not in world.hive.requests


def test_a_file_observable_gives_one_indicator_per_hash_and_a_filename(world):
    payload = sample("th5-observable-create-ip.json")
    obj = payload["object"]
    obj.update(dataType="file", data=None, attachment={
        "name": "invoice.pdf.exe", "hashes": ["d41d8cd98f00b204e9800998ecf8427e",
                                              "da39a3ee5e6b4b0d3255bfef95601890afd80709"]})
    world.deliver(sample("th5-case-create.json"), payload)
    world.drain()
    found = {(i["value"], i["type_id"]) for i in world.tq.indicators.values()}
    assert len(found) == 3
    assert world.tq.find_indicators("d41d8cd98f00b204e9800998ecf8427e", "MD5")
    assert world.tq.find_indicators("da39a3ee5e6b4b0d3255bfef95601890afd80709", "SHA-1")
    assert world.tq.find_indicators("invoice.pdf.exe", "Filename")


def test_a_threatq_outage_delays_but_loses_and_duplicates_nothing(world):
    world.tq.down = True
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.worker.run_once()
    assert world.states() == ["pending", "pending"]
    assert "ThreatQUnavailable" in world.inbox.db.execute(
        "SELECT last_error FROM inbox WHERE id = 1").fetchone()[0]
    world.tq.down = False
    world.drain()
    assert world.states() == ["done", "done"]
    assert len(world.tq.events) == 1 and len(world.tq.find_indicators("203.0.113.47")) == 1


def test_an_expired_token_is_refreshed(world):
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    world.tq.expire_all_tokens()
    world.deliver(sample("th5-case-update.json"))
    world.drain()
    assert world.states() == ["done", "done"]
    assert world.attributes("events", world.event()["id"])["Severity"] == "CRITICAL"


def test_a_refusal_by_threatq_is_a_dead_letter_with_its_text(make_world):
    world = make_world(event_type="No Such Type")
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    assert world.states() == ["dead"]
    assert "No Such Type" in world.last_error()


def test_a_lost_state_database_finds_existing_objects_again(world, tmp_path):
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    lose_state(world)
    state.open_state(world.cfg.state_db).close()
    world.inbox = Inbox(world.cfg.state_db)
    world.worker = Worker(Services(world.cfg, world.inbox), backoff_cap_s=0)
    update = sample("th5-case-update.json")
    update["object"]["title"] = "Renamed in TheHive"
    world.deliver(update, sample("th5-observable-update-ioc.json"))
    world.drain()
    assert len(world.tq.events) == 1
    assert world.event()["title"] == "Hive Case # ~8396848 Renamed in TheHive"
    assert len(world.tq.find_indicators("203.0.113.47")) == 1


def _v0_case(case: dict) -> dict:
    """A v1 case object as TheHive 4 / TheHive 5 version 0 renders it (numbers, caseId, owner)."""
    return {"_id": case["_id"], "id": case["_id"], "_type": "case", "caseId": case["number"],
            "title": case["title"], "description": case["description"], "severity": case["severity"],
            "startDate": case["startDate"], "tags": case["tags"], "flag": case["flag"], "tlp": case["tlp"],
            "pap": case["pap"], "status": "Open", "owner": case["assignee"], "createdAt": case["_createdAt"]}


def _v0_observable(obs: dict, case: dict) -> dict:
    keep = ("dataType", "data", "tlp", "tags", "ioc", "sighted", "message", "startDate")
    return {"_id": obs["_id"], "id": obs["_id"], "_type": "case_artifact", **{k: obs[k] for k in keep},
            "case": _v0_case(case)}


def as_version0(payload: dict, thehive5: bool) -> dict:
    """The same audit event in TheHive 4 version 0 or TheHive 5 version 0 shape."""
    operation = payload["action"]
    if thehive5:
        operation = {"create": "Creation", "update": "Update", "delete": "Delete"}[operation]
    is_case = payload["objectType"] == "Case"
    obj = payload.get("object")
    if obj:
        obj = _v0_case(obj) if is_case else _v0_observable(obj, obj["case"])
    v0 = {"operation": operation, "objectType": "case" if is_case else "case_artifact",
          "objectId": payload["objectId"], "base": True, "startDate": payload["_createdAt"],
          "rootId": payload["objectId"], "requestId": payload["requestId"], "details": payload["details"]}
    if obj:
        v0["object"] = obj
    if thehive5:
        v0.update(_id=payload["_id"], _type="audit", organisation={"organisation": "acme-soc"})
    else:
        v0.update(organisation="acme-soc", organisationId="~4120")
    return v0


def session() -> list:
    """A case's life: create, update, an observable created then made an IOC, deleted, the case deleted."""
    delete_observable = {"_id": "~2070000", "_type": "Audit", "action": "delete", "objectType": "Observable",
                         "objectId": "~12734592", "rootId": CASE_ID, "_createdAt": 1717500000000,
                         "requestId": "req-del", "details": {"dataType": "ip", "data": "203.0.113.47"}}
    return [sample("th5-case-create.json"), sample("th5-case-update.json"), sample("th5-observable-create-ip.json"),
            sample("th5-observable-update-ioc.json"), delete_observable, sample("th5-case-delete.json")]


@pytest.mark.parametrize("shape", ["thehive5-v1", "thehive4-v0", "thehive5-v0"])
def test_a_whole_case_life_in_every_payload_shape(world, shape):
    payloads = session()
    if shape != "thehive5-v1":
        payloads = [as_version0(p, thehive5=shape == "thehive5-v0") for p in payloads]
    assert {events.parse(p).shape for p in payloads} == {shape}
    world.deliver(*payloads[:4])
    world.drain()
    event = world.event()
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    assert world.tq.links_of("events", event["id"], "indicators") == [indicator["id"]]
    world.deliver(*payloads[4:])
    world.drain()
    assert world.states() == ["done"] * 6
    assert world.tq.links_of("events", event["id"], "indicators") == []
    assert world.attributes("events", event["id"])["Status"] == "Deleted"
    assert len(world.tq.events) == 1 and len(world.tq.indicators) == 1


def test_an_update_that_changes_nothing_costs_no_threatq_call(world):
    created, observed = sample("th5-case-create.json"), sample("th5-observable-create-ip.json")
    world.deliver(created, observed)
    world.drain()
    before = len(world.tq.requests)
    same_case, same_observable = copy.deepcopy(created), copy.deepcopy(observed)
    for payload, audit in ((same_case, "~2999101"), (same_observable, "~2999102")):
        payload["_id"], payload["action"], payload["_createdAt"] = audit, "update", payload["_createdAt"] + 999
    world.deliver(same_case, same_observable)
    world.drain()
    assert world.states() == ["done"] * 4
    assert world.tq.requests[before:] == []
    changed = copy.deepcopy(same_observable)
    changed["_id"], changed["_createdAt"] = "~2999103", changed["_createdAt"] + 1
    changed["object"]["sighted"] = False
    world.deliver(changed)
    world.drain()
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.attributes("indicators", indicator["id"])["Sighted?"] == "No"


def test_the_same_value_in_two_cases_at_once_makes_one_indicator(world):
    """Two workers (threads here, processes in the daemon) apply observables of two cases that share
    a value at the same moment: the look-up and create of the indicator must not interleave."""
    first = sample("th5-observable-create-ip.json")
    second = copy.deepcopy(first)
    second["_id"], second["objectId"], second["object"]["_id"] = "~2999201", "~12999201", "~12999201"
    second["rootId"] = second["object"]["case"]["_id"] = "~8396999"
    world.deliver(first, second)
    world.tq.delay_s = 0.05  # widen the window between the look-up and the create
    other = Worker(Services(world.cfg, Inbox(world.cfg.state_db)), backoff_cap_s=0, name="other-worker")
    threads = [threading.Thread(target=w.run_once) for w in (world.worker, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    world.tq.delay_s = 0
    world.drain()
    assert world.states() == ["done", "done"]
    assert len(world.tq.find_indicators("203.0.113.47")) == 1
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert len(world.tq.links_of("indicators", indicator["id"], "events")) == 2


def _observable_calls(world) -> list:
    """The ThreatQ calls of one new observable of a case already in ThreatQ, without the token
    and the name → id look-ups (made once per process)."""
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    before = len(world.tq.requests)
    world.deliver(sample("th5-observable-create-ip.json"))
    world.drain()
    once = {"/api/token", "/api/indicator/types", "/api/indicator/statuses"}
    return [(m, p) for m, p in world.tq.requests[before:] if p not in once]


def _indicator_as_synced(world) -> dict:
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    oid = indicator["id"]
    return {"description": indicator["description"], "status_id": indicator["status_id"],
            "attributes": world.attributes("indicators", oid),
            "tags": sorted(world.tq.tags_of("indicators", oid)),
            "sources": [(s["name"], s["tlp_id"]) for s in world.tq.sources_of("indicators", oid)],
            "events": world.tq.links_of("indicators", oid, "events")}


def test_a_new_observable_costs_two_calls_look_up_and_consume(make_world):
    world = make_world()
    calls = _observable_calls(world)
    assert calls == [("POST", "/api/indicators/query"), ("POST", "/api/indicators/consume")], calls
    assert [s for s in world.states()] == ["done", "done"]
    synced = _indicator_as_synced(world)
    assert synced == {"description": "IP hosting the credential-harvesting page", "status_id": 1,
                      "attributes": {"PAP": "AMBER", "Sighted?": "Yes"},
                      "tags": ["phishing-landing", "src:mail-header"], "sources": [("TheHive", 2)],
                      "events": [world.event()["id"]]}


def test_without_a_consume_endpoint_the_same_indicator_is_built_call_by_call(make_world, caplog):
    world = make_world(consume=False)
    calls = _observable_calls(world)
    assert ("POST", "/api/indicators/consume") in calls and ("POST", "/api/indicators") in calls
    # A fresh indicator has no links to check: create, 2 attributes, link, tags (+ the look-up).
    assert not any(m == "GET" and p.endswith("/events") for m, p in calls)
    assert "creating indicators call by call" in caplog.text
    synced = _indicator_as_synced(world)
    assert synced["attributes"] == {"PAP": "AMBER", "Sighted?": "Yes"}
    assert synced["tags"] == ["phishing-landing", "src:mail-header"]
    assert synced["sources"] == [("TheHive", 2)] and synced["events"] == [world.event()["id"]]
    # The process does not ask for the missing endpoint again.
    before = len(world.tq.requests)
    other = sample("th5-observable-create-ip.json")
    other["_id"], other["objectId"], other["object"]["_id"] = "~99", "~99", "~99"
    other["object"]["data"] = "198.51.100.9"
    world.deliver(other)
    world.drain()
    assert ("POST", "/api/indicators/consume") not in world.tq.requests[before:]
    assert world.tq.find_indicators("198.51.100.9", "IP Address")


def test_an_indicator_already_in_threatq_is_updated_not_consumed(world):
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    # An analyst created it before, with another status.
    existing = world.tq._store(KINDS["indicators"], {"value": "203.0.113.47", "type_id": 10,
                                                     "status_id": 4, "description": ""})
    world.deliver(sample("th5-observable-create-ip.json"))
    world.drain()
    assert ("POST", "/api/indicators/consume") not in world.tq.requests
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert indicator["id"] == existing["id"] and indicator["status_id"] == 4  # the analyst's status stands
    assert world.attributes("indicators", existing["id"]) == {"PAP": "AMBER", "Sighted?": "Yes"}


def _observable_versions():
    """The observable's creation, then two updates that TheHive sent before the worker got to it."""
    created = sample("th5-observable-create-ip.json")
    ioc = sample("th5-observable-update-ioc.json")
    tagged = copy.deepcopy(ioc)
    tagged["_id"], tagged["_createdAt"] = "~2060001", ioc["_createdAt"] + 1_000
    tagged["object"]["tags"] = ioc["object"]["tags"] + ["late-tag"]
    return created, ioc, tagged


def test_changes_queued_behind_an_event_are_written_once_as_the_latest_state(world, caplog):
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    before = len(world.tq.requests)
    world.deliver(*_observable_versions())
    with caplog.at_level("INFO", logger="tq_mw_thehive.worker"):
        world.drain()
    once = {"/api/token", "/api/indicator/types", "/api/indicator/statuses"}
    calls = [(m, p) for m, p in world.tq.requests[before:] if p not in once]
    assert calls == [("POST", "/api/indicators/query"), ("POST", "/api/indicators/consume")]
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    assert "late-tag" in world.tq.tags_of("indicators", indicator["id"])
    assert world.states() == ["done"] * 4
    outcomes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sync ")]
    assert "applied the state of inbox event 4" in outcomes[0]
    assert ["outcome=synced" in outcomes[0], "outcome=unchanged" in outcomes[1],
            "outcome=unchanged" in outcomes[2]] == [True, True, True], outcomes


def test_a_delete_queued_behind_stops_the_coalescing(world):
    created, ioc, _ = _observable_versions()
    delete = {"_id": "~2070000", "_type": "Audit", "action": "delete", "objectType": "Observable",
              "objectId": created["objectId"], "rootId": CASE_ID, "_createdAt": ioc["_createdAt"] - 1,
              "details": {"dataType": "ip", "data": "203.0.113.47"}}
    world.deliver(sample("th5-case-create.json"), created, delete, ioc)
    world.drain()
    assert world.states() == ["done"] * 4
    # The update after the delete was not applied ahead of it: the link went, and came back
    # only with the later update (the same indicator, never a second one).
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.tq.links_of("indicators", indicator["id"], "events") == [world.event()["id"]]
    assert ("DELETE", f"/api/indicators/{indicator['id']}/events") in world.tq.requests


@pytest.mark.parametrize("inline", [True, False])
def test_a_changed_update_reads_what_it_checks_in_one_call_where_threatq_inlines_it(make_world, inline, shapes):
    """Fewer look-ups: the read by the stored id (observable) or the update (case) asks ThreatQ for
    the object's attributes, sources and tags inline (`with=`); an instance that ignores it costs
    the reads (in the ``sdk`` shape tags cannot be read on their own: they are left as they are)."""
    world = make_world(inline=inline)
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    once = {"/api/token", "/api/indicator/types", "/api/indicator/statuses", "/api/event/types"}

    def calls_for(payload):
        before = len(world.tq.requests)
        world.deliver(payload)
        world.drain()
        return [(m, p) for m, p in world.tq.requests[before:] if p not in once]

    observable_calls = calls_for(sample("th5-observable-update-ioc.json"))
    case_calls = calls_for(sample("th5-case-update.json"))
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    event = world.event()
    reads = {"/attributes", "/sources", "/tags"}
    if inline:
        assert observable_calls == [("GET", f"/api/indicators/{indicator['id']}"),  # the stored id
                                    ("POST", f"/api/indicators/{indicator['id']}/attributes"),
                                    ("GET", f"/api/indicators/{indicator['id']}/events")]
        assert [m for m, p in case_calls] == ["PUT", "PUT", "PUT"]  # the event, Status, Severity
    else:
        assert {p[p.rindex("/"):] for m, p in observable_calls if m == "GET"} >= reads
        # The sdk shape refused GET …/tags for the observable: this process does not ask again.
        expected = reads if shapes == "strict" else reads - {"/tags"}
        assert {p[p.rindex("/"):] for m, p in case_calls if m == "GET"} == expected
    assert world.states() == ["done"] * 4
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    attributes = world.attributes("events", event["id"])
    assert (attributes["Severity"], attributes["Status"]) == ("CRITICAL", "InProgress")
    assert sorted(world.tq.tags_of("events", event["id"])) == ["finance", "phishing"]


def test_inline_sub_resources_are_used_only_when_well_formed():
    from tq_mw_thehive.threatq.objects import inline as _inline

    record = {"attributes": [{"name": "PAP"}], "sources": [{"name": "TheHive", "tlp_id": 2}], "tags": "t"}
    assert _inline(record) == {"sources": [{"name": "TheHive", "tlp_id": 2}]}  # no attribute id, tags not a list
    assert _inline(None) == {} and _inline({"id": 1}) == {}
    sdk1 = [{"id": 5, "value": "AMBER", "attribute": {"id": 9, "name": "PAP"}}]  # named in `attribute`
    assert _inline({"attributes": sdk1}) == {"attributes": sdk1}
    assert _inline({"attributes": [{"id": 5, "value": "AMBER", "attribute": {"id": 9}}]}) == {}


def test_a_new_case_costs_three_calls_two_look_ups_and_consume(world):
    before = len(world.tq.requests)
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    once = {"/api/token", "/api/event/types"}
    calls = [(m, p) for m, p in world.tq.requests[before:] if p not in once]
    assert calls == [("POST", "/api/events/query"), ("GET", "/api/search"), ("POST", "/api/events/consume")]
    assert world.attributes("events", world.event()["id"])["Severity"] == "HIGH"  # the rest: first test


def test_a_consume_call_that_threatq_refuses_falls_back_to_call_by_call(world, caplog):
    from tq_mw_thehive.threatq.api import ThreatQPermanentError

    def refuse(collection, items):
        raise ThreatQPermanentError(f"POST /api/{collection}/consume: The tags field is invalid.", status=400)

    world.worker.sync.tq.consume = refuse
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    assert world.states() == ["done", "done"]
    event = world.event()
    assert world.attributes("events", event["id"])["TheHive Id"] == CASE_ID
    assert sorted(world.tq.tags_of("events", event["id"])) == ["finance", "phishing"]
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.tq.links_of("indicators", indicator["id"], "events") == [event["id"]]
    assert caplog.text.count("creating it call by call") == 2


# --- issue 12: what the public ThreatQ sources show, and the calls they do not confirm -------------


def _tlp_update(label: str, audit: str, later_ms: int) -> dict:
    update = sample("th5-case-update.json")
    update["_id"], update["_createdAt"] = audit, update["_createdAt"] + later_ms
    update["object"]["tlpLabel"], update["object"]["tlp"] = label, {"RED": 3, "GREEN": 1}[label]
    return update


def _source_puts(world, event_id: int) -> list:
    return [(m, p) for m, p in world.tq.requests if m == "PUT" and p.startswith(f"/api/events/{event_id}/sources/")]


def _one_by_one(world, *payloads: dict) -> None:
    """Each applied before the next arrives (queued together, a later state is applied at once)."""
    for payload in payloads:
        world.deliver(payload)
        world.drain()


def test_a_changed_tlp_is_written_where_threatq_shows_it_and_left_alone_where_it_does_not(world, shapes):
    _one_by_one(world, sample("th5-case-create.json"), _tlp_update("RED", "~2990001", 1000))
    assert world.states() == ["done", "done"]
    event_id = world.event()["id"]
    sources = [(s["name"], s["tlp_id"]) for s in world.tq.sources_of("events", event_id)]
    if shapes == "strict":
        assert sources == [("TheHive", 1)] and len(_source_puts(world, event_id)) == 1
    else:  # the answers carry no TLP: it is never touched after creation
        assert sources == [("TheHive", 2)] and _source_puts(world, event_id) == []


@pytest.mark.parametrize("shapes", ["strict"])  # only there does ThreatQ show the TLP it would change
def test_a_refused_tlp_change_warns_once_per_process_and_never_fails_an_event(make_world, caplog):
    world = make_world(refuse=["source_tlp"])
    _one_by_one(world, sample("th5-case-create.json"), _tlp_update("RED", "~2990001", 1000),
                _tlp_update("GREEN", "~2990002", 2000))
    assert world.states() == ["done"] * 3
    event_id = world.event()["id"]
    assert len(_source_puts(world, event_id)) == 1  # the second change does not ask again
    assert caplog.text.count("the source keeps the TLP it was created with") == 1
    assert "ThreatQ answered 405 to PUT /api/events/" in caplog.text
    refused = world.worker.sync.state.capabilities()["source_tlp"]
    assert (refused.supported, refused.status) == (False, 405)
    assert [(s["name"], s["tlp_id"]) for s in world.tq.sources_of("events", event_id)] == [("TheHive", 2)]


def test_what_threatq_serves_is_recorded_for_check_and_the_status_page(world, shapes):
    from tq_mw_thehive.sync_state import threatq_capabilities

    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    found = threatq_capabilities(world.cfg.state_db)
    # The case and its observable were queued together: the indicator was looked up in bulk.
    assert {step: c.supported for step, c in found.items()} == {
        "query:events": True, "consume:events": True, "query_many:indicators": True, "consume:indicators": True}
    assert all(c.at > 0 and c.status is None for c in found.values())


HARD_VALUES = {
    "user agent with commas": ("user-agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                                             "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"),
    "url with commas and percent": ("url", "https://cdn.example.net/a,b,c/100%off?q=1,2&r=%41"),
    "leading comma and percent": ("user-agent", ",%,odd agent%"),
    "quotes": ("url", "https://example.net/\"double\"/'single'/`back`"),
    "unicode": ("url", "https://пример.испытание/路径/ü?q=é,ß"),
    "very long": ("url", "https://example.net/" + "a" * 3000 + ",tail%"),
    # Past any URL limit (the simulator's server answers 414 beyond 64 KiB, nginx beyond 8 KiB):
    # the look-up goes in a request body, or a wildcard on its start; never a dead letter.
    "one megabyte": ("url", "https://example.net/" + "b" * (1 << 20)),
}


def _observable_in_case(data_type: str, value: str, case_id: str, n: int) -> dict:
    payload = sample("th5-observable-create-ip.json")
    payload["_id"], payload["objectId"] = f"~29991{n}", f"~12999{n}"
    payload["rootId"] = case_id
    obj = payload["object"]
    obj.update(_id=f"~12999{n}", dataType=data_type, data=value)
    obj["case"]["_id"] = case_id
    obj["case"]["title"] = f"case {n}"
    return payload


@pytest.mark.parametrize("query_refused", [False, True], ids=["query", "list-filters"])
@pytest.mark.parametrize("name", list(HARD_VALUES))
def test_values_with_commas_percent_quotes_unicode_or_great_length_are_found_never_duplicated(
        make_world, shapes, name, query_refused):
    """The second case's observable has no stored id: it must find the first one's indicator by
    value, through /query or, refused, through list filters (commas and % made safe), and must not
    take a look-alike (the part before the comma, another case) for it."""
    data_type, value = HARD_VALUES[name]
    type_name = "User-agent" if data_type == "user-agent" else "URL"
    world = make_world(refuse=["query"] if query_refused else [])
    type_id = 1 + [n for n, _ in INDICATOR_TYPES].index(type_name)
    for decoy in {value.split(",")[0], value.upper(), value + " "} - {value}:
        world.tq._store(KINDS["indicators"], {"value": decoy, "type_id": type_id, "status_id": 1, "description": ""})
    world.deliver(_observable_in_case(data_type, value, "~7001", 1))
    world.drain()
    before = len(world.tq.requests)
    world.deliver(_observable_in_case(data_type, value, "~7002", 2))
    world.drain()
    assert world.states() == ["done", "done"]
    if name == "one megabyte" and query_refused and shapes == "strict":
        # No URL carries it and the strict simulator's filters have no wildcard: only consume's
        # merge by value (ThreatQ's, and the simulator's) keeps it one indicator. No dead letter.
        assert len(world.tq.find_indicators(value, type_name)) == 1
        return
    # Found by the look-up: no create at all (consume would merge in the simulator, hiding a miss).
    assert not {("POST", "/api/indicators/consume"), ("POST", "/api/indicators")} & set(world.tq.requests[before:])
    (indicator,) = world.tq.find_indicators(value, type_name)
    assert len(world.tq.links_of("indicators", indicator["id"], "events")) == 2
    assert world.attributes("indicators", indicator["id"]) == {"PAP": "AMBER", "Sighted?": "Yes"}


def lose_state(world) -> None:
    """The state database is lost (a new host, a failed disk): the file, or every table of the schema."""
    if world.inbox.shared:
        schema = world.inbox.db.execute("SELECT current_schema()").fetchone()[0]
        world.inbox.db.execute(f"DROP SCHEMA {schema} CASCADE")
        world.inbox.db.execute(f"CREATE SCHEMA {schema}")
        return
    for suffix in ("", "-wal", "-shm"):
        Path(str(world.cfg.state_db) + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize("query_refused", [False, True], ids=["query", "list-filters"])
def test_a_case_title_with_commas_and_percent_is_found_again_after_a_lost_database(make_world, query_refused):
    world = make_world(refuse=["query"] if query_refused else [])
    create, update = sample("th5-case-create.json"), sample("th5-case-update.json")
    for payload in (create, update):
        payload["object"]["title"] = 'Phishing, wave 2: 100% of "finance", Zürich'
    world.deliver(create)
    world.drain()
    lose_state(world)
    state.open_state(world.cfg.state_db).close()
    world.inbox = Inbox(world.cfg.state_db)
    world.worker = Worker(Services(world.cfg, world.inbox), backoff_cap_s=0)
    before = len(world.tq.requests)
    world.deliver(update)
    world.drain()
    assert world.states() == ["done"]
    assert world.event()["title"] == f'Hive Case # {CASE_ID} Phishing, wave 2: 100% of "finance", Zürich'
    assert world.attributes("events", world.event()["id"])["Severity"] == "CRITICAL"
    # Found by its exact title: the keyword search for a renamed case was not needed.
    assert ("GET", "/api/search") not in world.tq.requests[before:]


def test_a_consume_answer_without_the_record_looks_it_up_instead_of_failing(world, caplog):
    world.tq.consume_records_limit = 0  # ThreatQ carries the consume out but names nothing
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    assert world.states() == ["done", "done"]
    assert caplog.text.count("names no record for") == 2
    event = world.event()
    assert world.attributes("events", event["id"])["TheHive Id"] == CASE_ID
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.attributes("indicators", indicator["id"]) == {"PAP": "AMBER", "Sighted?": "Yes"}
    assert world.tq.links_of("indicators", indicator["id"], "events") == [event["id"]]
    assert sorted(world.tq.tags_of("indicators", indicator["id"])) == ["phishing-landing", "src:mail-header"]
    assert world.worker.sync.state.tq_ids("~12734592") == [("indicators", indicator["id"])]


def test_an_indicator_deleted_in_threatq_is_found_missing_by_its_stored_id_and_made_again(world):
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    (old,) = world.tq.find_indicators("203.0.113.47")
    world.tq.delete_object("indicators", old["id"])
    world.deliver(sample("th5-observable-update-ioc.json"))
    world.drain()
    assert world.states() == ["done"] * 3
    (new,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert new["id"] != old["id"]
    assert world.attributes("indicators", new["id"])["Indicator Of Compromise?"] == "Yes"
    assert world.tq.links_of("indicators", new["id"], "events") == [world.event()["id"]]
    assert world.worker.sync.state.tq_ids("~12734592") == [("indicators", new["id"])]


@pytest.mark.parametrize("refuse", [["tag_list", "source_list"], ["tag_list", "tag_delete", "source_list", "query",
                                                                    "source_tlp"]])
def test_every_optional_call_refused_at_once_dead_letters_nothing(make_world, refuse):
    world = make_world(inline=False, refuse=refuse)
    update = sample("th5-case-update.json")
    update["object"]["tags"] = ["phishing", "wave-2"]
    tlp = _tlp_update("RED", "~2990001", 5000)
    tlp["object"]["tags"] = ["phishing", "wave-2"]
    _one_by_one(world, sample("th5-case-create.json"), sample("th5-observable-create-ip.json"), update,
                sample("th5-observable-update-ioc.json"), tlp)
    assert world.states() == ["done"] * 5
    event = world.event()
    assert "wave-2" in world.tq.tags_of("events", event["id"])
    (indicator,) = world.tq.find_indicators("203.0.113.47", "IP Address")
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"


def test_a_thehive5_v0_observable_delete_waits_for_its_case_and_unlinks_the_indicator(world):
    """TheHive 5 version 0 names a deleted observable's case only by rootId (its context is a
    Share; ryukisec/TheHive-Webhooks v0/Observable.md): the delete is queued behind its case's
    events, so it cannot overtake the create that is still waiting, and it unlinks."""
    created, deleted = sample("ryu-v0-observable-create.json"), sample("ryu-v0-observable-delete.json")
    world.deliver(created, deleted)
    # The create waits to be retried (ThreatQ was down, say): the delete must wait behind it.
    world.inbox.db.execute("UPDATE inbox SET next_attempt_at = next_attempt_at + 3600 WHERE object_id = ? "
                           "AND action = 'create'", ("~12336",))
    assert world.worker.run_once() is False
    world.inbox.db.execute("UPDATE inbox SET next_attempt_at = 0")
    world.drain()
    assert world.states() == ["done", "done"]
    event = world.event()
    assert event["title"] == "Hive Case # ~40976512 Test 3"
    assert len(world.tq.indicators) == 1
    assert world.tq.links_of("events", event["id"], "indicators") == []


def _th4_artifact_delete(created: dict) -> dict:
    """TheHive 4's delete of that observable: no case anywhere in it (rootId is the observable)."""
    return {"operation": "delete", "objectType": "case_artifact", "objectId": created["objectId"], "base": True,
            "startDate": created["startDate"] + 60_000, "rootId": created["objectId"],
            "requestId": "th4-delete-1", "details": {}}


def test_a_thehive4_observable_delete_without_its_case_waits_behind_the_create_and_unlinks(world):
    """The inbox orders a case-less event with the case its object's earlier events named: before,
    it formed a group of its own and overtook a create still waiting to be retried."""
    created = sample("th4-case-artifact-create.json")
    deleted = _th4_artifact_delete(created)
    world.deliver(created, deleted)
    keys = [r[0] for r in world.inbox.db.execute("SELECT case_key FROM inbox ORDER BY id")]
    assert keys == ["case:~8396848", "case:~8396848"]
    world.inbox.db.execute("UPDATE inbox SET next_attempt_at = next_attempt_at + 3600 WHERE action = 'create'")
    assert world.worker.run_once() is False  # the delete may not overtake the waiting create
    world.inbox.db.execute("UPDATE inbox SET next_attempt_at = 0")
    world.drain()
    assert world.states() == ["done", "done"]
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.tq.links_of("indicators", indicator["id"], "events") == []


def test_a_case_less_delete_of_an_object_synced_long_ago_takes_its_case_from_the_object_map(world):
    created = sample("th4-case-artifact-create.json")
    world.deliver(created)
    world.drain()
    world.inbox.db.execute("DELETE FROM inbox")  # retention purged the create long ago
    world.deliver(_th4_artifact_delete(created))
    assert [r[0] for r in world.inbox.db.execute("SELECT case_key FROM inbox")] == ["case:~8396848"]


# --- thin payloads: no object, details only the change (issue 19, item 2) ----------------------

THIN_SHAPES = ["thehive5-v1", "thehive5-v0", "thehive4-v0", "thehive3"]


def _thin(shape: str, kind: str, object_id: str, case_id: str, details: dict, ts: int, n: int,
          empty_object: bool) -> dict:
    """An update whose ``object`` is missing (or ``{}``) and whose ``details`` is the change alone."""
    if shape == "thehive5-v1":
        payload = {"_id": f"~thin{n}", "_type": "Audit", "action": "update", "objectType": kind.capitalize(),
                   "objectId": object_id, "rootId": case_id, "_createdAt": ts, "requestId": f"req-thin-{n}",
                   "details": details}
    else:
        v0_type = "case" if kind == "case" else "case_artifact"
        # TheHive 4 v0: rootId is the observable itself (its own audit context); TheHive 3 and 5 v0: the case.
        root = object_id if shape == "thehive4-v0" else case_id
        payload = {"operation": "update" if shape == "thehive4-v0" else "Update", "objectType": v0_type,
                   "objectId": object_id, "rootId": root, "startDate": ts, "requestId": f"req-thin-{n}",
                   "base": True, "details": details}
        if shape == "thehive5-v0":
            payload.update(_id=f"~thin{n}", _type="audit", organisation={"organisation": "acme-soc"})
    if empty_object:
        payload["object"] = {}
    return payload


@pytest.mark.parametrize("empty_object", [False, True], ids=["no-object", "empty-object"])
@pytest.mark.parametrize("shape", THIN_SHAPES)
def test_a_thin_update_is_completed_by_reading_thehive_never_dead(world, shape, empty_object):
    case = world.hive.add_case(title="Thin case", severity=2, tlp=2, pap=2)
    observable = world.hive.add_observable(case["_id"], dataType="ip", data="198.51.100.7", tlp=2, pap=2)
    world.hive.update_case(case["_id"], severity=4)
    world.hive.update_observable(observable["_id"], ioc=True)
    now = world.hive._now_ms()
    thin_case = _thin(shape, "case", case["_id"], case["_id"], {"severity": 4}, now, 1, empty_object)
    thin_obs = _thin(shape, "observable", observable["_id"], case["_id"], {"ioc": True}, now + 1, 2, empty_object)
    assert {events.parse(p).shape for p in (thin_case, thin_obs)} == {
        "thehive5-v0" if shape == "thehive3" else shape}
    world.deliver(thin_case, thin_obs)
    world.drain()
    assert world.states() == ["done", "done"], world.last_error()
    event = world.event()
    assert event["title"] == f"Hive Case # {case['_id']} Thin case"
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"
    (indicator,) = world.tq.find_indicators("198.51.100.7", "IP Address")
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"
    assert world.tq.links_of("events", event["id"], "indicators") == [indicator["id"]]


def test_a_thin_update_waits_while_thehive_is_unreachable_then_completes(world):
    case = world.hive.add_case(title="Thin case", severity=3)
    world.deliver(_thin("thehive5-v1", "case", case["_id"], case["_id"], {"severity": 3},
                        world.hive._now_ms(), 1, empty_object=False))
    world.worker.sync.thehive.attempts = 1  # no retry inside the client: the worker's retry is what is tested
    world.hive.fail_next(1, 503)
    assert world.worker.run_once() is True
    assert world.states() == ["pending"]
    assert "TheHiveUnavailable" in world.last_error()
    world.drain()
    assert world.states() == ["done"]
    assert world.attributes("events", world.event()["id"])["Severity"] == "HIGH"


def test_a_thin_update_of_an_object_gone_from_thehive_is_skipped_not_dead(world):
    world.deliver(_thin("thehive5-v1", "case", "~404404", "~404404", {"severity": 3}, 1_700_000_000_000, 1, False),
                  _thin("thehive5-v1", "observable", "~404405", "~404404", {"ioc": True}, 1_700_000_000_001, 2,
                        False))
    world.drain()
    assert world.states() == ["done", "done"]
    assert not world.tq.events and not world.tq.indicators


def test_a_thin_update_of_an_alerts_observable_is_skipped(world):
    alert = world.hive.add_alert()
    observable = world.hive.add_alert_observable(alert["_id"], dataType="ip", data="192.0.2.9")
    # TheHive 4 v0: rootId is the observable itself, so only TheHive can say where it lives.
    world.deliver(_thin("thehive4-v0", "observable", observable["_id"], observable["_id"], {"ioc": True},
                        world.hive._now_ms(), 1, False))
    world.drain()
    assert world.states() == ["done"]
    assert not world.tq.indicators


def test_the_captured_thehive3_case_bodies_sync(world):
    """TheHiveDocs admin/webhooks.md: a TheHive 3 create, then an update (no audit _id, ``id`` only)."""
    world.deliver(sample("thehivedocs-th3-case-create.json"), sample("thehivedocs-th3-case-update.json"))
    world.drain()
    assert world.states() == ["done", "done"]
    event = world.event()
    assert event["title"] == "Hive Case # AV6FZsTj0KeanEfOQfd_ Test case for webhook"
    assert world.attributes("events", event["id"])["Severity"] == "HIGH"


def test_the_captured_thehive5_v1_observable_update_and_delete_sync(world):
    world.deliver(sample("ryu-v1-observable-tag-update.json"), sample("ryu-v1-observable-delete.json"))
    world.drain()
    assert world.states() == ["done", "done"]
    event = world.event()
    assert event["title"] == "Hive Case # ~40976512 Test 3"
    (indicator,) = world.tq.indicators.values()
    assert sorted(world.tq.tags_of("indicators", indicator["id"])) == ["a-sample-tag", "new-tag"]
    assert world.tq.links_of("events", event["id"], "indicators") == []
