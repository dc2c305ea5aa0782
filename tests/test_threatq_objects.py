"""threatq/objects.py: every writer of a ThreatQ object (the sync's workers, the monitor) goes
through one module and one per-object lock, against the ThreatQ simulator over real HTTP."""
from __future__ import annotations

import threading
import types

from conftest import sample
from tq_mw_thehive.enrichment.monitor import Monitor, WatchList
from tq_mw_thehive.threatq.api import ThreatQClient
from tq_mw_thehive.threatq.objects import ThreatQObjects, indicator_key

VALUE, TYPE = "203.0.113.47", "IP Address"


class _Verdict:
    """What ``Enricher.run`` answers: one plugin run with new attributes."""

    def __init__(self, score: str) -> None:
        self.plugin, self.title, self.status, self.attributes = "intel", "Intel", "fetched", {"Intel Score": score}


class _StubEnricher:
    """The part of ``Enricher`` the monitor uses: one plugin whose score changed since the cache."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.plugin = types.SimpleNamespace(name="intel", version="1", title="Intel", rate_limit_per_min=None)
        self.cache = types.SimpleNamespace(latest=lambda *a: None)

    def plugins_for(self, data_type):
        return [self.plugin] if data_type == "ip" else []

    def limits(self, plugin):
        return types.SimpleNamespace(per_minute=None, per_day=None)

    def run(self, data_type, value, tlp, pap, bypass_cache=False, only=None, origin="case"):
        return [_Verdict("90")]


def _synced_indicator(world) -> int:
    world.deliver(sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    world.drain()
    (indicator,) = world.tq.find_indicators(VALUE, TYPE)
    return indicator["id"]


def _intel_scores(world, tq_id: int):
    return [a["value"] for a in world.tq.attributes_of("indicators", tq_id) if a["name"] == "Intel Score"]


def test_the_monitor_waits_for_the_lock_a_worker_holds_on_the_indicator(world):
    tq_id = _synced_indicator(world)
    sync = world.worker.sync
    watches = WatchList(world.cfg.state_db)
    watches.add(VALUE, "ip")                      # a manual watch: due at once
    monitor = Monitor(_StubEnricher(world.cfg), watches, objects=sync.objects, types=sync.types)
    counts = {}
    # The worker's side: another holder of the same lock (its own open file, as in another process).
    worker_side = ThreatQObjects(sync.tq, world.cfg.threatq.source, world.cfg.state_db.parent)
    with worker_side.lock(indicator_key(TYPE, VALUE.upper())):
        thread = threading.Thread(target=lambda: counts.update(monitor.run_once()), daemon=True)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the monitor wrote while a worker held the indicator's lock"
        assert _intel_scores(world, tq_id) == []
    thread.join(30)
    assert not thread.is_alive()
    assert counts == {"checked": 1, "changed": 1, "errors": 0}
    assert _intel_scores(world, tq_id) == ["90"]


def test_writers_racing_on_one_indicator_add_its_attribute_once(world):
    tq_id = _synced_indicator(world)
    writers = [ThreatQObjects(ThreatQClient.from_config(world.cfg), world.cfg.threatq.source,
                              world.cfg.state_db.parent) for _ in range(4)]
    start = threading.Barrier(len(writers))
    world.tq.delay_s = 0.02   # ThreatQ's own latency: without the lock, reads and writes interleave

    def write(objects: ThreatQObjects, score: str) -> None:
        start.wait(10)
        for _ in range(5):
            objects.enrich_by_value([TYPE], VALUE, _Verdict(score))

    before = len(world.tq.requests)
    threads = [threading.Thread(target=write, args=(w, str(i))) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    world.tq.delay_s = 0.0
    adds = [r for r in world.tq.requests[before:] if r == ("POST", f"/api/indicators/{tq_id}/attributes")]
    assert len(adds) == 1   # without the lock, writers that read "no value yet" each add one
    assert len(_intel_scores(world, tq_id)) == 1


def test_the_lock_key_of_an_indicator_ignores_case():
    assert indicator_key("FQDN", "Evil.Example") == indicator_key("FQDN", "evil.example")
    assert indicator_key("FQDN", "evil.example") != indicator_key("URL", "evil.example")
