"""Write-back through the sync, against the TheHive simulator (4 and 5): what lands is told back
as tags and a custom field, TheHive's own tags stay, and the webhooks TheHive sends for our own
changes come back to the daemon without a ThreatQ call or a second write: no loop."""
from __future__ import annotations

import pytest

from tq_mw_thehive.thehive.api import TheHiveClient
from tq_mw_thehive.writeback import Sender

FIELD = "threatq-url"


@pytest.fixture(params=[5, 4], ids=["thehive5", "thehive4"])
def world(request, make_world):
    return make_world(thehive_version=request.param,
                      writeback={"enabled": True, "case_custom_field": FIELD})


def sender(world) -> Sender:
    client = TheHiveClient.from_config(world.cfg, max_wait_s=0)
    return Sender(world.services.outbox, client, "w1", FIELD)


def landed_case(world):
    """A case with an analyst's tag and an observable, delivered as TheHive (4 or 5) sends them, synced."""
    world.hive.emit_audits = True
    case = world.hive.add_case(title="Beacon", tags=["analyst-tag"])
    observable = world.hive.add_observable(case["_id"], dataType="ip", data="203.0.113.47", tlp=1, pap=1,
                                           tags=["dst-ip"])
    world.deliver_new_audits()
    assert set(world.states()) == {"done"}
    return case["_id"], observable["_id"]


def test_what_landed_is_told_to_thehive_and_its_own_tags_stay(world):
    case_id, observable_id = landed_case(world)
    (event,) = world.tq.events.values()
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    assert sender(world).run_once() == 2
    assert world.hive.observables[observable_id]["tags"] == ["dst-ip", f"threatq:indicator={indicator['id']}"]
    assert world.hive.cases[case_id]["tags"] == ["analyst-tag", f"threatq:event={event['id']}"]
    values = world.hive.cases[case_id]["customFieldValues"]
    assert values[FIELD] == f"{world.cfg.threatq.base_url}/events/{event['id']}/details"
    assert sender(world).run_once() == 0  # nothing more to tell


def test_thehive_s_webhooks_for_our_own_changes_cost_nothing_and_write_nothing_back(world):
    landed_case(world)
    told = sender(world)
    told.run_once()
    patches, tq_calls = len(world.hive.patches), len(world.tq.requests)
    echoes = world.deliver_new_audits()
    assert len(echoes) == 3, "an audit per PATCH: the observable's tags, the case's tags, its field"
    assert set(world.states()) == {"done"}
    assert len(world.tq.requests) == tq_calls          # 0 ThreatQ calls for our own change
    assert told.run_once() == 0                         # and nothing written back again
    assert len(world.hive.patches) == patches
    for indicator in world.tq.indicators.values():      # our tags never reach ThreatQ
        assert not [t for t in world.tq.tags_of("indicators", indicator["id"]) if t.startswith("threatq:")]
    for event in world.tq.events.values():
        assert world.tq.tags_of("events", event["id"]) == ["analyst-tag"]


def test_a_new_verdict_of_a_watched_ioc_replaces_its_verdict_tag(world):
    _, observable_id = landed_case(world)
    (indicator,) = world.tq.find_indicators("203.0.113.47")
    told = sender(world)
    told.run_once()
    world.services._verdict_changed([indicator["id"]], "virustotal", "suspicious")
    told.run_once()
    world.services._verdict_changed([indicator["id"]], "virustotal", "malicious")
    told.run_once()
    tags = world.hive.observables[observable_id]["tags"]
    assert [t for t in tags if ":verdict:" in t] == ["threatq:verdict:virustotal=malicious"]
    assert "dst-ip" in tags


def test_an_observable_deleted_in_thehive_before_it_was_told_is_dropped(world):
    _, observable_id = landed_case(world)
    del world.hive.observables[observable_id]
    assert sender(world).run_once() == 1  # the case only
    assert world.services.outbox.pending() == 0


def test_the_sync_records_nothing_for_thehive_when_write_back_is_off(make_world):
    world = make_world()
    assert world.services.outbox is None
    world.hive.emit_audits = True
    world.hive.add_case(title="Off")
    world.deliver_new_audits()
    assert set(world.states()) == {"done"}
    assert world.inbox.db.execute("SELECT COUNT(*) FROM writeback").fetchone()[0] == 0
