"""Alerts (``sync.alerts``): an alert becomes a ThreatQ event, its observables indicators; once
TheHive imports or merges it into a case, its event and indicators are linked to the case's
object, never made twice. TheHive 4 and 5 payloads (tests/samples/alerts)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import minimal_config
from tq_mw_thehive.testing.threatq_sim import EVENT_TYPES
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.services import Services
from tq_mw_thehive.thehive import events
from tq_mw_thehive.web import create_app

ALERTS = Path(__file__).parent / "samples" / "alerts"
ALERT_ID, CASE5, CASE4 = "~40993016", "~81948848", "~206028968"


def alert_sample(name: str) -> dict:
    return json.loads((ALERTS / name).read_text(encoding="utf-8"))


@pytest.fixture
def world(make_world):
    return make_world(alerts=True)


def event_titled(world, prefix: str) -> dict:
    (found,) = [e for e in world.tq.events.values() if e["title"].startswith(prefix)]
    return found


def test_an_alert_and_its_observable_become_an_event_and_a_linked_indicator(world):
    world.deliver(alert_sample("th5-alert-create.json"), alert_sample("th5-alert-observable-create.json"))
    world.drain()
    assert set(world.states()) == {"done"}
    alert_event = event_titled(world, "Hive Alert #")
    assert alert_event["title"] == f"Hive Alert #{ALERT_ID} Beacon to 203.0.113.47"
    assert EVENT_TYPES[alert_event["type_id"] - 1] == "Sighting"
    attributes = world.attributes("events", alert_event["id"])
    assert (attributes["Alert Source"], attributes["Alert Source Ref"], attributes["TheHive Id"]) == (
        "splunk", "SPL-88123", ALERT_ID)
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert world.tq.links_of("indicators", indicator["id"], "events") == [alert_event["id"]]


def test_an_imported_alert_links_its_event_and_indicators_to_the_case_and_the_copies_add_nothing(world):
    world.deliver(alert_sample("th5-alert-create.json"), alert_sample("th5-alert-observable-create.json"))
    world.drain()
    world.hive.cases[CASE5] = {"_id": CASE5, "_type": "Case", "number": 143, "title": "Beacon to 203.0.113.47",
                               "description": "C2 beacon", "severity": 2, "startDate": 1717503107990,
                               "tags": ["c2"], "tlp": 2, "pap": 2, "status": "New",
                               "_createdAt": 1717503108001}
    world.deliver(alert_sample("th5-alert-imported.json"))
    # TheHive 5 then sends the observable copied into the case (a new id, the same value).
    copied = copy.deepcopy(alert_sample("th5-alert-observable-create.json"))
    copied.update({"_id": "~40997200", "objectId": "~40993999", "rootId": CASE5, "_createdAt": 1717503108100})
    copied["object"] = dict(copied["object"], _id="~40993999", case=world.hive.cases[CASE5])
    del copied["object"]["alert"]
    copied["context"] = world.hive.cases[CASE5]
    world.deliver(copied)
    world.drain()
    assert set(world.states()) == {"done"}
    alert_event = event_titled(world, "Hive Alert #")
    case_event = event_titled(world, f"Hive Case # {CASE5}")
    assert world.tq.links_of("events", alert_event["id"], "events") == [case_event["id"]]
    (indicator,) = world.tq.find_indicators("203.0.113.47")  # one indicator, not two
    assert sorted(world.tq.links_of("indicators", indicator["id"], "events")) == sorted(
        [alert_event["id"], case_event["id"]])
    assert len(world.tq.events) == 2


def test_a_thehive4_merge_names_the_case_in_its_details_and_the_alert_is_read_from_thehive(world):
    """TheHive 4's alert update on merge carries the case as its object and sends no observable
    events: the alert is read back, and what it already brought is linked to the case."""
    world.deliver(alert_sample("th4-alert-create.json"))
    observable = alert_sample("th5-alert-observable-create.json")  # the alert's observable, synced before
    world.deliver(observable)
    world.drain()
    alert = copy.deepcopy(alert_sample("th5-alert-imported.json")["object"])
    alert["caseId"] = CASE4
    world.hive.alerts[ALERT_ID] = alert
    world.hive.cases[CASE4] = {"_id": CASE4, "_type": "Case", "number": 57, "title": "Beacon cluster",
                               "description": "", "severity": 2, "startDate": 1717400000000, "tags": [],
                               "tlp": 2, "pap": 2, "status": "Open", "_createdAt": 1717400000000}
    world.deliver(alert_sample("th4-alert-merged.json"))
    world.drain()
    assert set(world.states()) == {"done"}
    case_event = event_titled(world, f"Hive Case # {CASE4}")
    alert_event = event_titled(world, "Hive Alert #")
    assert world.tq.links_of("events", alert_event["id"], "events") == [case_event["id"]]
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert case_event["id"] in world.tq.links_of("indicators", indicator["id"], "events")


def test_an_unchanged_alert_update_costs_no_threatq_call(world):
    world.deliver(alert_sample("th5-alert-create.json"))
    world.drain()
    calls = len(world.tq.requests)
    again = alert_sample("th5-alert-create.json")
    again.update({"_id": "~57497", "action": "update", "_createdAt": again["_createdAt"] + 10, "details": {}})
    world.deliver(again)
    world.drain()
    assert len(world.tq.requests) == calls


def test_with_alerts_off_alert_events_are_answered_ignored_and_not_stored(tmp_path):
    cfg = config_mod.from_dict(minimal_config(), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    client = create_app(Services(cfg, inbox)).test_client()
    headers = {"Authorization": "Bearer " + cfg.webhook.token}
    for name in ("th5-alert-create.json", "th5-alert-observable-create.json", "th4-alert-create.json"):
        answer = client.post("/cases", json=alert_sample(name), headers=headers).json
        assert answer["status"] == "ignored" and "sync.alerts: false" in answer["reason"], name
    assert inbox.stats()["pending"] == 0


def test_with_alerts_on_the_webhook_stores_them_ordered_by_their_alert(tmp_path):
    cfg = config_mod.from_dict(minimal_config(sync={"alerts": True}), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    client = create_app(Services(cfg, inbox)).test_client()
    headers = {"Authorization": "Bearer " + cfg.webhook.token}
    for name in sorted(p.name for p in ALERTS.glob("*.json")):
        assert client.post("/cases", json=alert_sample(name), headers=headers).json["status"] == "queued", name
    keys = {r["audit_id"] or r["object_type"]: r["case_key"] for r in inbox.db.execute("SELECT * FROM inbox")}
    assert set(keys.values()) == {f"case:{ALERT_ID}"}


def test_the_envelope_of_alert_events():
    created = events.parse(alert_sample("th5-alert-create.json"), alerts=True)
    assert (created.object_type, created.alert_id, created.case_id, created.ignore_reason) == (
        "alert", ALERT_ID, ALERT_ID, None)
    observable = events.parse(alert_sample("th5-alert-observable-create.json"), alerts=True)
    assert (observable.object_type, observable.alert_id, observable.case_key) == (
        "observable", ALERT_ID, f"case:{ALERT_ID}")
    imported = events.parse(alert_sample("th5-alert-imported.json"), alerts=True)
    assert imported.case_id == ALERT_ID  # ordered with its alert, not with the case (rootId)
    off = events.parse(alert_sample("th5-alert-observable-create.json"))
    assert off.alert_id is None and "alert" in off.ignore_reason


def test_our_write_back_tags_on_an_alert_never_reach_threatq(world):
    payload = alert_sample("th5-alert-create.json")
    payload["object"]["tags"] = ["c2", "threatq:event=99"]
    world.deliver(payload)
    world.drain()
    alert_event = event_titled(world, "Hive Alert #")
    assert world.tq.tags_of("events", alert_event["id"]) == ["c2"]
