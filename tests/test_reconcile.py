"""The periodic sweep: changes no webhook brought are found and queued while the daemon runs,
nothing else is queued, one process sweeps at a time, and what it found is counted and shown."""
from __future__ import annotations

import copy
import json

import pytest

from conftest import metric_value, parse_metrics
from tq_mw_thehive import metrics
from tq_mw_thehive.backfill import OVERLAP_MS, Marks, updated_ms
from tq_mw_thehive.reconcile import LAST_KEY, Reconciler, last_sweep
from tq_mw_thehive.services import Services
from tq_mw_thehive.testing.thehive_sim import _CASE_LINK as CASE_LINK

EVERY_S = 900.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def webhook(kind: str, obj: dict, case: dict) -> dict:
    """TheHive 5's audit event for ``obj``'s latest change: stamped just after the change."""
    obj = copy.deepcopy(obj)
    if kind == "Observable":
        obj["case"] = copy.deepcopy(case)
    stamp = updated_ms(obj) + 12
    return {"_id": f"~audit-{obj['_id']}-{stamp}", "_type": "Audit", "action": "update", "objectType": kind,
            "objectId": obj["_id"], "rootId": case["_id"], "_createdAt": stamp, "details": {}, "object": obj}


def every_webhook(hive) -> list:
    out = []
    for case in hive.cases.values():
        out.append(webhook("Case", case, case))
        out.extend(webhook("Observable", o, case) for o in hive.observables.values()
                   if o.get(CASE_LINK) == case["_id"])
    return out


def fill(hive, cases: int = 2, observables: int = 2) -> list:
    made = []
    for i in range(cases):
        case = hive.add_case(title=f"Case {i}")
        for j in range(observables):
            hive.add_observable(case["_id"], dataType="ip", data=f"198.51.100.{i * 10 + j}", tlp=1, pap=1)
        made.append(case["_id"])
    return made


def found_total() -> float:
    return metric_value(parse_metrics(metrics.exposition().decode()), "reconcile_found_total")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def reconciler(world, clock: Clock, owner: str = "w1", every_s: float = EVERY_S, woken=None) -> Reconciler:
    on_queued = (lambda: woken.append(1)) if woken is not None else (lambda: None)
    return Reconciler(Services(world.cfg, world.inbox), owner, on_queued, every_s, clock=clock)


def due(world, clock: Clock, owner: str = "w1", woken=None):
    """A reconciler whose first sweep is due now (its first look only schedules it)."""
    sweeper = reconciler(world, clock, owner, woken=woken)
    assert sweeper.run_once() is None  # the first look: the catch-up covers the start
    clock.now += EVERY_S
    return sweeper


def synced_through_webhooks(world) -> None:
    """Every change delivered as TheHive would deliver it, applied, and the catch-up mark set."""
    world.deliver(*every_webhook(world.hive))
    world.drain()
    Marks(world.cfg.state_db).advance(max(updated_ms(c) for c in world.hive.cases.values()) - OVERLAP_MS // 2)


def test_a_sweep_over_a_healthy_feed_queues_nothing_and_costs_threatq_nothing(world, clock):
    fill(world.hive)
    synced_through_webhooks(world)
    rows, tq_calls = len(world.states()), len(world.tq.requests)
    sweep = due(world, clock).run_once()
    assert sweep is not None and sweep.outcome == "ok"
    assert (sweep.found, sweep.cases, sweep.observables, sweep.known) == (0, 2, 4, 6)
    assert len(world.states()) == rows
    world.drain()
    assert len(world.tq.requests) == tq_calls


def test_changes_whose_webhooks_were_lost_are_found_queued_and_synced(world, clock):
    first, second = fill(world.hive)
    synced_through_webhooks(world)
    world.hive.update_case(first, severity=4)               # its webhook is lost
    added = world.hive.add_observable(second, dataType="domain", data="lost.example.net", tlp=1, pap=1)
    woken = []
    before = found_total()
    sweep = due(world, clock, woken=woken).run_once()
    assert sweep.outcome == "ok" and sweep.found == 3  # the changed case, the case the observable bumped, the observable
    assert woken, "the sync worker is woken for what the sweep queued"
    world.drain()
    assert set(world.states()) == {"done"}
    event = next(e for e in world.tq.events.values() if first in e["title"])
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"
    assert [i["value"] for i in world.tq.indicators.values()].count("lost.example.net") == 1
    assert added["_id"] in {r[0] for r in world.inbox.db.execute("SELECT object_id FROM inbox")}
    assert found_total() == before + 3
    recorded = last_sweep(world.inbox)
    assert (recorded.outcome, recorded.found, recorded.started_at) == ("ok", 3, clock.now)
    clock.now += EVERY_S
    assert reconciler(world, clock).run_once().found == 0  # what it queued counts as here now


def test_one_process_sweeps_per_period(world, clock):
    fill(world.hive, cases=1)
    synced_through_webhooks(world)
    first, second = reconciler(world, clock, "w1"), reconciler(world, clock, "w2")
    assert first.run_once() is None and second.run_once() is None  # scheduled, not due
    clock.now += EVERY_S
    outcomes = [first.run_once(), second.run_once()]
    assert [o is not None for o in outcomes] == [True, False]
    clock.now += EVERY_S - 1
    assert first.run_once() is None and second.run_once() is None
    clock.now += 1
    assert second.run_once() is not None


def test_a_sweep_never_runs_beside_a_catch_up(world, clock):
    fill(world.hive, cases=1)
    synced_through_webhooks(world)
    sweeper = due(world, clock)
    marks = Marks(world.cfg.state_db)
    assert marks.try_lock("catch-up-owner", ttl_s=3600)
    assert sweeper.run_once() is None
    assert last_sweep(world.inbox) is None
    marks.unlock("catch-up-owner")


def test_thehive_down_fails_the_sweep_keeps_the_mark_and_the_next_one_reads_again(world, clock):
    (case_id,) = fill(world.hive, cases=1)
    synced_through_webhooks(world)
    world.hive.update_case(case_id, severity=3)
    mark = Marks(world.cfg.state_db).get()
    sweeper = due(world, clock)
    world.hive.fail_next(1, status=401)  # a key TheHive refuses: not retried
    failed = sweeper.run_once()
    assert (failed.outcome, failed.found) == ("failed", 0) and failed.error
    assert Marks(world.cfg.state_db).get() == mark
    assert last_sweep(world.inbox).outcome == "failed"
    clock.now += EVERY_S
    assert reconciler(world, clock).run_once().found == 1


def test_without_a_mark_the_first_sweep_follows_changes_from_then_on(world, clock):
    fill(world.hive, cases=1)
    sweep = due(world, clock).run_once()
    assert sweep.outcome == "first" and sweep.found == 0
    assert Marks(world.cfg.state_db).get() == int(clock.now * 1000)
    assert world.states() == []


def test_reconcile_every_0_is_off(world, clock):
    sweeper = reconciler(world, clock, every_s=0)
    clock.now += 10 * EVERY_S
    assert sweeper.run_once() is None
    assert sweeper.start()._thread is None
    assert world.inbox.db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'reconcile%'").fetchone()[0] == 0


def test_a_damaged_record_of_the_last_sweep_reads_as_none(world):
    world.inbox.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (LAST_KEY, "{bad")))
    assert last_sweep(world.inbox) is None
    world.inbox.write(lambda db: db.execute("UPDATE meta SET value = ? WHERE key = ?",
                                            (json.dumps({"nope": 1}), LAST_KEY)))
    assert last_sweep(world.inbox) is None


def test_a_change_whose_webhook_waits_in_the_inbox_is_not_queued_again(world, clock):
    """Received but not applied yet (ThreatQ down, a backlog): here already."""
    fill(world.hive, cases=1)
    synced_through_webhooks(world)
    (case_id,) = world.hive.cases
    world.deliver(webhook("Case", world.hive.update_case(case_id, severity=4), world.hive.cases[case_id]))
    assert due(world, clock).run_once().found == 0
    assert world.states().count("pending") == 1
