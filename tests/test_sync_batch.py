"""A case's queued events applied together (sync_batch.py): a burst of new observables costs a
bulk look-up and one consume call, with the same result in ThreatQ as one event at a time, each
event with its own outcome, in order, exactly once."""
from __future__ import annotations

import copy
import logging

import pytest

from conftest import sample
from tq_mw_thehive.testing.threatq_sim import INDICATOR_TYPES, KINDS
from tq_mw_thehive.threatq.api import ThreatQUnavailable

CASE_ID = "~8396848"
IP_TYPE_ID = 1 + [n for n, _ in INDICATOR_TYPES].index("IP Address")


@pytest.fixture(params=["strict", "sdk"])
def make_world(make_world, request):
    def make(**sync):
        world = make_world(**sync)
        world.tq.shapes = request.param
        return world
    return make


def observable(n: int, value: str = "", tags=("burst",), at: int = 0) -> dict:
    """The n-th new observable of the sample case (its own audit id, object id and value)."""
    payload = copy.deepcopy(sample("th5-observable-create-ip.json"))
    obs_id = f"~5{n:05d}"
    payload["_id"], payload["objectId"] = f"~9{n:05d}", obs_id
    payload["_createdAt"] = 1717434300141 + n + at
    for obj in (payload["object"], payload["details"]):
        obj.update(_id=obs_id, data=value or f"198.18.{n // 250}.{n % 250 + 1}", tags=list(tags))
        obj["_createdAt"] = 1717434300100 + n + at
    return payload


def indicator_calls(world, since: int = 0):
    return [r for r in world.tq.requests[since:] if r[1].startswith("/api/indicators")]


def test_a_burst_of_new_observables_costs_one_look_up_and_one_consume(make_world, caplog):
    world = make_world()
    world.deliver(sample("th5-case-create.json"), *[observable(n) for n in range(40)])
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.worker"):
        assert world.worker.run_once() is True          # the case and its 40 observables in one go
    assert world.states() == ["done"] * 41
    assert indicator_calls(world) == [("POST", "/api/indicators/query"), ("POST", "/api/indicators/consume")]
    event = world.event()
    for n in range(40):
        (indicator,) = world.tq.find_indicators(f"198.18.0.{n + 1}", "IP Address")
        assert world.tq.links_of("indicators", indicator["id"], "events") == [event["id"]]
        assert sorted(world.tq.tags_of("indicators", indicator["id"])) == ["burst"]
    lines = [r.getMessage() for r in caplog.records if "sync audit=" in r.getMessage()]
    assert len(lines) == 41 and all("outcome=synced" in line for line in lines)
    # Redelivered: nothing new to write, no call at all.
    before = len(world.tq.requests)
    world.inbox.db.execute("UPDATE inbox SET state = 'dead'")
    world.inbox.replay()
    world.drain()
    assert world.tq.requests[before:] == []


@pytest.mark.parametrize("batch_max", [1, 500])
def test_a_burst_leaves_threatq_as_one_event_at_a_time_does(make_world, batch_max):
    world = make_world(batch_max=batch_max)
    world.deliver(sample("th5-case-create.json"), *[observable(n, tags=("burst", f"n{n % 3}")) for n in range(12)])
    world.drain()
    assert world.states() == ["done"] * 13
    found = {i["value"]: (world.attributes("indicators", i["id"]), sorted(world.tq.tags_of("indicators", i["id"])),
                          [(s["name"], s.get("tlp_id")) for s in world.tq.sources_of("indicators", i["id"])],
                          world.tq.links_of("indicators", i["id"], "events"))
             for i in world.tq.indicators.values()}
    assert found == {f"198.18.0.{n + 1}": ({"PAP": "AMBER", "Sighted?": "Yes"}, ["burst", f"n{n % 3}"],
                                           [("TheHive", 2)], [world.event()["id"]]) for n in range(12)}


def test_a_failure_retries_that_event_and_gives_the_later_ones_back_untried(make_world):
    world = make_world()
    world.deliver(sample("th5-case-create.json"))
    world.drain()
    world.deliver(*[observable(n) for n in range(10)])
    objects = world.worker.sync.objects
    real, sent = objects.consume_many, []

    def flaky(collection, items):
        sent.append(len(items))
        if len(sent) == 1:
            raise ThreatQUnavailable("ThreatQ answered 503 (simulated)", 503)
        return real(collection, items)

    objects.consume_many = flaky
    world.worker.run_once()
    rows = world.inbox.db.execute("SELECT state, attempts, last_error, lease_owner FROM inbox ORDER BY id").fetchall()
    assert [tuple(r)[:2] for r in rows[1:]] == [("pending", 1)] + [("pending", 0)] * 9
    assert "ThreatQUnavailable" in rows[1]["last_error"] and all(r["lease_owner"] is None for r in rows)
    world.drain()
    assert world.states() == ["done"] * 11 and sent == [10, 10]
    assert sorted(i["value"] for i in world.tq.indicators.values()) == sorted(f"198.18.0.{n + 1}" for n in range(10))


def test_a_later_change_of_an_observable_in_the_batch_wins(make_world):
    world = make_world()
    first, later = observable(1, tags=("old",)), observable(1, tags=("new",), at=1000)
    later["_id"], later["action"] = "~9later", "update"
    world.deliver(sample("th5-case-create.json"), first, observable(2), later)
    world.drain()
    assert world.states() == ["done"] * 4
    (indicator,) = world.tq.find_indicators("198.18.0.2", "IP Address")
    assert world.tq.tags_of("indicators", indicator["id"]) == ["new"]
    assert len(world.tq.indicators) == 2


def test_values_threatq_already_has_are_found_in_bulk_not_made_again(make_world):
    world = make_world()
    known = world.tq._store(KINDS["indicators"], {"value": "198.18.0.3", "type_id": IP_TYPE_ID, "status_id": 1,
                                                  "description": ""})
    world.deliver(sample("th5-case-create.json"), *[observable(n) for n in range(5)])
    world.drain()
    assert world.states() == ["done"] * 6
    assert [i["id"] for i in world.tq.indicators.values() if i["value"] == "198.18.0.3"] == [known["id"]]
    assert world.tq.links_of("indicators", known["id"], "events") == [world.event()["id"]]
    assert len(world.tq.indicators) == 5


def test_two_observables_with_one_value_make_one_indicator(make_world):
    world = make_world()
    world.deliver(sample("th5-case-create.json"), observable(1, value="198.51.100.9"),
                  observable(2, value="198.51.100.9"))
    world.drain()
    assert world.states() == ["done"] * 3
    (indicator,) = world.tq.find_indicators("198.51.100.9", "IP Address")
    assert world.tq.links_of("indicators", indicator["id"], "events") == [world.event()["id"]]


def test_an_instance_without_or_criteria_looks_each_value_up(make_world, caplog):
    world = make_world(refuse=["query_or"])
    world.deliver(sample("th5-case-create.json"), *[observable(n) for n in range(5)])
    with caplog.at_level(logging.WARNING):
        world.drain()
    assert world.states() == ["done"] * 6
    assert indicator_calls(world).count(("POST", "/api/indicators/query")) == 1 + 5   # refused, then one each
    assert indicator_calls(world).count(("POST", "/api/indicators/consume")) == 1
    assert caplog.text.count("a burst's new indicators are looked up one value at a time") == 1
    assert len(world.tq.indicators) == 5


def test_a_batch_takes_a_cases_due_events_in_order_and_stops_at_one_waiting_to_retry(world):
    world.deliver(sample("th5-case-create.json"), *[observable(n) for n in range(5)])
    inbox = world.inbox
    ids = [r[0] for r in inbox.db.execute("SELECT id FROM inbox ORDER BY id")]
    first = inbox.claim_batch("w1", 60, limit=3)
    assert [i.id for i in first] == ids[:3]                   # the limit, in order
    assert inbox.claim_batch("w2", 60, limit=10) == []        # the case is in flight
    assert inbox.retry(ids[0], "w1", "ThreatQ down", delay_s=0) and inbox.done(ids[1], "w1")
    assert inbox.give_back(first[2:], "w1") == 1
    inbox.db.execute("UPDATE inbox SET next_attempt_at = next_attempt_at + 3600 WHERE id = ?", (ids[3],))
    again = inbox.claim_batch("w1", 60, limit=10)
    assert [i.id for i in again] == [ids[0], ids[2]]          # stops before the one waiting
    assert [i.attempts for i in again] == [2, 1]              # a given-back claim was not counted


def test_a_batch_enriches_its_values_side_by_side_each_once(make_world):
    import dataclasses
    import threading
    import types

    from tq_mw_thehive.enrichment.cache import ResultCache
    from tq_mw_thehive.enrichment.keys import KeyStore
    from tq_mw_thehive.enrichment.plugin import Result
    from tq_mw_thehive.enrichment.registry import PluginInfo, Registry
    from tq_mw_thehive.enrichment.runner import Enricher

    world = make_world()
    meet, calls = threading.Barrier(2, timeout=10), []   # one lookup alone waits in vain, then fails
    plugin = types.ModuleType("sidebyside")
    plugin.NAME, plugin.DATA_TYPES, plugin.EXTERNAL = "sidebyside", ("ip",), False

    def lookup(request):
        calls.append(request.value)
        meet.wait()
        return Result("info", {}, {"Side Score": "1"})

    plugin.lookup = lookup
    cfg = dataclasses.replace(world.cfg, enrichment=dataclasses.replace(world.cfg.enrichment, enabled=True))
    world.worker.sync.enricher = Enricher(cfg, Registry([PluginInfo("sidebyside", "test", module=plugin)]),
                                          ResultCache(cfg.state_db), KeyStore(cfg.state_db, environ={}))
    world.deliver(sample("th5-case-create.json"), *[observable(n) for n in range(4)])
    world.drain()
    assert world.states() == ["done"] * 5
    assert sorted(calls) == sorted(f"198.18.0.{n + 1}" for n in range(4))     # each value once
    for indicator in world.tq.indicators.values():
        assert world.attributes("indicators", indicator["id"])["Side Score"] == "1"
