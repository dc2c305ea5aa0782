"""Alerts end to end against the TheHive simulator (4 and 5): the audits TheHive sends when an
analyst promotes an alert to a case or merges it into one go through the sync, and ThreatQ ends
with one event per alert and case, linked, and each value once, linked to both."""
from __future__ import annotations

import pytest

VALUES = ("203.0.113.47", "c2.example.net")


@pytest.fixture(params=[5, 4], ids=["thehive5", "thehive4"])
def world(request, make_world):
    world = make_world(alerts=True, thehive_version=request.param)
    world.hive.emit_audits = True
    return world


def alert_with_observables(world) -> str:
    alert = world.hive.add_alert(title="Beacon", type="splunk", source="splunk", sourceRef="SPL-1",
                                 tags=["c2"])
    world.hive.add_alert_observable(alert["_id"], dataType="ip", data=VALUES[0], tlp=1, pap=1)
    world.hive.add_alert_observable(alert["_id"], dataType="domain", data=VALUES[1], tlp=1, pap=1)
    world.deliver_new_audits()
    return alert["_id"]


def one_event(world, prefix: str) -> dict:
    (found,) = [e for e in world.tq.events.values() if e["title"].startswith(prefix)]
    return found


def assert_joined(world, alert_id: str) -> None:
    alert_event = one_event(world, f"Hive Alert #{alert_id} ")
    case_event = one_event(world, "Hive Case #")
    assert len(world.tq.events) == 2
    assert world.tq.links_of("events", alert_event["id"], "events") == [case_event["id"]]
    for value in VALUES:
        (indicator,) = world.tq.find_indicators(value)  # once, not once per copy
        assert sorted(world.tq.links_of("indicators", indicator["id"], "events")) == sorted(
            [alert_event["id"], case_event["id"]])
    assert len(world.tq.indicators) == len(VALUES)


def test_an_alert_promoted_to_a_case_joins_the_case_s_event(world):
    alert_id = alert_with_observables(world)
    assert len(world.tq.events) == 1 and len(world.tq.indicators) == 2
    world.hive.promote_alert(alert_id)
    assert world.deliver_new_audits()
    assert_joined(world, alert_id)


def test_an_alert_merged_into_a_case_joins_it_and_the_value_both_had_stays_one_indicator(world):
    case = world.hive.add_case(title="Ongoing intrusion")
    world.hive.add_observable(case["_id"], dataType="ip", data=VALUES[0], tlp=1, pap=1)
    world.deliver_new_audits()
    alert_id = alert_with_observables(world)
    world.hive.merge_alert(alert_id, case["_id"])
    assert world.deliver_new_audits()
    assert_joined(world, alert_id)


def test_replaying_the_import_s_audits_costs_no_threatq_call(world):
    alert_id = alert_with_observables(world)
    world.hive.promote_alert(alert_id)
    replay = world.deliver_new_audits()
    calls = len(world.tq.requests)
    world.deliver(*replay)  # TheHive retries a webhook it thinks was lost
    world.drain()
    assert len(world.tq.requests) == calls
    assert_joined(world, alert_id)
