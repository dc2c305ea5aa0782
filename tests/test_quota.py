"""Enrichment quotas (enrichment/quota.py, enrichment/deferred.py): a burst never spends more than
a plugin's limit, what is over waits in a queue and lands later, once, in order; a 429 pauses.
The bundled VirusTotal plugin answered by ``responses``, a clock the test moves, the sync and
ThreatQ's simulator as the daemon runs them."""
from __future__ import annotations

import json
import re
from typing import List

import pytest
import requests
import responses

from conftest import FakeClock, minimal_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state
from tq_mw_thehive.config import ConfigError
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.plugin import retry_after
from tq_mw_thehive.enrichment.quota import DAY_S, Limits, QuotaBook, key_id, limits_for
from tq_mw_thehive.enrichment.registry import Registry
from tq_mw_thehive.services import Services

VT = re.compile(r"https://www\.virustotal\.com/api/v3/ip_addresses/.*")
OFFLINE_AND_OTHERS = ["abuseipdb", "domain", "geoip", "greynoise", "ip_scope", "otx", "shodan", "urlhaus",
                      "warninglists"]
T0 = 1_796_000_000.0 - 1_796_000_000.0 % DAY_S + 3600  # 01:00 UTC: a whole day ahead


def vt_answer(malicious: int = 0) -> dict:
    return {"data": {"type": "ip_address", "id": "x", "attributes": {
        "last_analysis_stats": {"malicious": malicious, "suspicious": 0, "harmless": 60, "undetected": 10},
        "reputation": 0}}}


class VirusTotal:
    """VirusTotal as ``responses`` plays it: every call's time on the test clock, 429s on demand."""

    def __init__(self, mock: responses.RequestsMock, clock: FakeClock) -> None:
        self.calls: List[float] = []
        self.refuse: List[dict] = []  # headers of the next answers that are 429s
        self.malicious = 0
        self.clock = clock
        mock.add_callback(responses.GET, VT, callback=self._answer)

    def _answer(self, request):
        self.calls.append(self.clock())
        if self.refuse:
            return 429, self.refuse.pop(0), json.dumps({"error": {"code": "QuotaExceededError"}})
        return 200, {}, json.dumps(vt_answer(self.malicious))

    def most_in_a_minute(self) -> int:
        return max((sum(1 for c in self.calls if start <= c < start + 60) for start in self.calls), default=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as m:
        m.add_passthru("http://127.0.0.1")  # the ThreatQ and TheHive simulators
        yield m


@pytest.fixture
def world(make_world, clock):
    return quota_world(make_world, clock)


def quota_world(make_world, clock, **sync):
    world = make_world(enrichment={"enabled": True, "max_tlp_external": "GREEN", "disabled": OFFLINE_AND_OTHERS},
                       **sync)
    KeyStore(world.cfg.state_db).set("VIRUSTOTAL", "vt-test-key-0123456789")
    world.services.quota = QuotaBook(world.cfg.state_db, clock=clock)  # before anything builds an enricher
    world.hive.emit_audits = True
    return world


def burst(world, count: int, first: int = 0) -> List[str]:
    """A case with ``count`` GREEN ip observables (global addresses: external plugins may see them)."""
    case = world.hive.add_case(title="Burst")
    values = [f"45.33.{i // 200}.{i % 200 + 1}" for i in range(first, first + count)]
    for value in values:
        world.hive.add_observable(case["_id"], dataType="ip", data=value, tlp=1, pap=1)
    world.deliver_new_audits()
    return values


def asked(mock) -> List[str]:
    """The values VirusTotal was asked about, in order."""
    return [c.request.url.rsplit("/", 1)[1] for c in mock.calls if "virustotal" in c.request.url]


def enriched(world, value: str) -> bool:
    (indicator,) = world.tq.find_indicators(value)
    return "VirusTotal Detections" in world.attributes("indicators", indicator["id"])


def drainer(world_or_services, clock):
    found = getattr(world_or_services, "services", world_or_services).drainer("test-owner")
    found.clock = clock
    return found


def test_a_burst_of_50_spends_4_lookups_a_minute_and_ends_with_all_50_enriched(world, mock, clock):
    vt = VirusTotal(mock, clock)
    values = burst(world, 50)
    assert len(vt.calls) == 4                                      # the minute's quota, no more
    assert sum(enriched(world, v) for v in values) == 4            # synced now, the rest without VT
    assert len(world.tq.indicators) == 50
    assert world.services.quota.depth() == 46
    drain = drainer(world, clock)
    for _ in range(100):  # 12 minutes' quota; a bound, not a wait
        clock.advance(15)
        drain.run_once()
        if not world.services.quota.depth():
            break
    assert world.services.quota.depth() == 0
    assert all(enriched(world, v) for v in values)
    assert len(vt.calls) == 50                                     # each value once
    assert vt.most_in_a_minute() == 4


def test_the_queue_is_applied_in_order_and_each_lookup_once(world, mock, clock):
    vt = VirusTotal(mock, clock)
    values = burst(world, 10)
    live = asked(mock)
    queued = [r[0] for r in world.services.quota.db.execute(
        "SELECT value FROM enrichment_deferred ORDER BY priority, id")]
    assert len(live) == 4 and sorted(live + queued) == sorted(values)  # each value once, live or queued
    drain = drainer(world, clock)
    clock.advance(61)
    assert drain.run_once()["applied"] == 4
    assert asked(mock)[4:] == queued[:4]                           # the queue's order
    assert drain.run_once()["applied"] == 0                        # still the same minute
    clock.advance(61)
    drain.run_once()
    assert asked(mock)[4:] == queued and world.services.quota.depth() == 0
    assert drain.run_once()["applied"] == 0 and len(vt.calls) == 10  # once each


def test_a_429_pauses_the_plugin_for_retry_after_and_queues_the_lookup(make_world, mock, clock):
    world = quota_world(make_world, clock, batch_max=1)  # one observable at a time: no lookup in flight
    vt = VirusTotal(mock, clock)
    vt.refuse.append({"Retry-After": "300"})
    values = burst(world, 3)
    assert len(vt.calls) == 1                                      # refused, then paused: no more calls
    assert world.services.quota.depth() == 3
    (usage,) = [u for u in world.services.quota.usage({"virustotal": Limits(4, 500)})]
    assert usage["paused_until"] == pytest.approx(clock.now + 300) and usage["last_429"] == clock.now
    drain = drainer(world, clock)
    clock.advance(200)
    drain.run_once()
    assert len(vt.calls) == 1                                      # still paused
    clock.advance(101)
    drain.run_once()
    assert all(enriched(world, v) for v in values) and world.services.quota.depth() == 0


def test_a_429_without_retry_after_backs_off_doubling(tmp_path, clock):
    state.open_state(tmp_path / "s.db").close()
    book = QuotaBook(tmp_path / "s.db", clock=clock)
    assert book.pause("vt", "k", None, "429") == clock.now + 60
    assert book.pause("vt", "k", None, "429") == clock.now + 120
    assert book.pause("vt", "k", 30, "429") == clock.now + 30     # the service's word wins
    clock.advance(3601)
    assert book.pause("vt", "k", None, "429") == clock.now + 60    # an hour later: from the start


def test_the_queue_survives_a_restart(world, mock, clock):
    vt = VirusTotal(mock, clock)
    values = burst(world, 6)
    assert world.services.quota.depth() == 2
    again = Services(world.cfg)                                    # a new process on the same database
    again.quota = QuotaBook(world.cfg.state_db, clock=clock)
    clock.advance(61)
    drainer(again, clock).run_once()
    assert all(enriched(world, v) for v in values) and len(vt.calls) == 6


def test_a_case_s_lookups_go_before_monitor_s_rechecks(world, mock, clock):
    vt = VirusTotal(mock, clock)
    book = world.services.quota
    kid = key_id({"VIRUSTOTAL": "vt-test-key-0123456789"})
    book.defer("virustotal", kid, "ip", "45.33.9.9", "GREEN", "GREEN", "monitor", clock.now)  # queued first
    values = burst(world, 5)
    assert len(vt.calls) == 4
    clock.advance(61)
    drainer(world, clock).run_once()
    order = asked(mock)
    assert len(order) == 6 and sorted(order[:5]) == sorted(values) and order[5] == "45.33.9.9"


def test_a_value_already_cached_never_uses_quota(world, mock, clock):
    vt = VirusTotal(mock, clock)
    values = burst(world, 4)
    assert len(vt.calls) == 4                                      # the minute is spent
    case = world.hive.add_case(title="Same values")
    for value in values:
        world.hive.add_observable(case["_id"], dataType="ip", data=value, tlp=1, pap=1)
    world.deliver_new_audits()
    assert len(vt.calls) == 4 and world.services.quota.depth() == 0


def test_a_queued_lookup_the_gate_now_refuses_is_dropped(world, mock, clock):
    VirusTotal(mock, clock)
    burst(world, 5)
    world.services.quota.write(lambda db: db.execute("UPDATE enrichment_deferred SET tlp = 'RED'"))
    clock.advance(61)
    counts = drainer(world, clock).run_once()
    assert counts["dropped"] == 1 and world.services.quota.depth() == 0


def test_a_monitor_recheck_over_quota_waits_and_the_drainer_settles_it_as_monitor_would(world, mock, clock,
                                                                                        caplog):
    vt = VirusTotal(mock, clock)
    values = burst(world, 4)                                       # the minute's quota spent
    world.services.watches.add(values[0], "ip", tlp="GREEN", pap="GREEN")
    monitor = world.services.monitor(world.services.enricher())
    vt.malicious = 5                                               # the verdict changed overnight
    assert monitor.run_once()["deferred"] == 1 and len(vt.calls) == 4
    clock.advance(61)
    with caplog.at_level("INFO"):
        assert drainer(world, clock).run_once()["applied"] == 1
    (indicator,) = world.tq.find_indicators(values[0])
    assert world.attributes("indicators", indicator["id"])["VirusTotal Detections"] == "5/75"
    assert f"changed {values[0]} virustotal VirusTotal Detections: 0/70 -> 5/75" in caplog.text


# --- the quota book ---------------------------------------------------------------------------------

@pytest.fixture
def book(tmp_path, clock) -> QuotaBook:
    state.open_state(tmp_path / "s.db").close()
    return QuotaBook(tmp_path / "s.db", clock=clock)


def test_the_minute_is_sliding(book, clock):
    limits = Limits(per_minute=4)
    assert [book.take("vt", "k", limits) for _ in range(4)] == [None] * 4
    refused = book.take("vt", "k", limits)
    assert refused is not None and refused.retry_at == clock.now + 60
    clock.advance(59.9)
    assert book.take("vt", "k", limits) is not None               # a minute boundary does not reset it
    clock.advance(0.2)
    assert book.take("vt", "k", limits) is None


def test_the_day_is_the_utc_day(book, clock):
    limits = Limits(per_day=3)
    assert [book.take("vt", "k", limits) for _ in range(3)] == [None] * 3
    refused = book.take("vt", "k", limits)
    assert refused.reason == "quota of 3 a day used" and refused.retry_at == T0 - 3600 + DAY_S
    clock.now = T0 - 3600 + DAY_S                                  # midnight UTC
    assert book.take("vt", "k", limits) is None


def test_each_api_key_has_its_own_count(book):
    limits = Limits(per_minute=1)
    assert book.take("vt", key_id({"VIRUSTOTAL": "a"}), limits) is None
    assert book.take("vt", key_id({"VIRUSTOTAL": "a"}), limits) is not None
    assert book.take("vt", key_id({"VIRUSTOTAL": "b"}), limits) is None
    digest = key_id({"VIRUSTOTAL": "secret-key-123"})
    assert re.fullmatch(r"[0-9a-f]{16}", digest) and "secret" not in digest  # never the key itself


def test_a_plugin_without_limits_records_nothing(book):
    assert book.take("geoip", "-", Limits()) is None
    assert book.db.execute("SELECT COUNT(*) FROM quota_calls").fetchone()[0] == 0


def test_a_fractional_limit_spreads_the_calls(book, clock):
    limits = Limits(per_minute=0.5)
    assert book.take("p", "-", limits) is None
    assert book.take("p", "-", limits).retry_at == clock.now + 120


def test_the_config_replaces_or_lifts_a_declared_limit():
    vt = next(p for p in Registry.discover(()).loaded() if p.name == "virustotal")
    assert limits_for(vt, None) == Limits(4, 500)
    assert limits_for(vt, {"virustotal": {"per_minute": 30}}) == Limits(30, 500)
    assert limits_for(vt, {"virustotal": {"per_day": None}}) == Limits(4, None)


@pytest.mark.parametrize("limits, message", [
    ({"virustotal": {"per_minute": 0}}, "virustotal.per_minute: must be a whole number"),
    ({"virustotal": {"per_hour": 5}}, "virustotal.per_hour: unknown limit"),
    ({"virustotal": 4}, "enrichment.limits: must map names to mappings"),
    ({"virustotal": {"per_day": "500"}}, "virustotal.per_day: must be a whole number"),
])
def test_a_wrong_limit_is_a_clear_config_error(tmp_path, limits, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_mod.from_dict(minimal_config(enrichment={"limits": limits}), tmp_path)


@pytest.mark.parametrize("header, seconds", [("120", 120.0), ("0", 1.0), ("soon", None), ("", None),
                                             ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0), ("1e9", 86400.0)])
def test_retry_after_reads_seconds_and_dates_and_caps_them(header, seconds):
    response = requests.Response()
    if header:
        response.headers["Retry-After"] = header
    assert retry_after(response) == seconds


def test_a_plugin_without_limits_is_paused_by_a_429_and_cli_lookups_are_not_queued(tmp_path, clock):
    from test_enrichment import stand_in
    from tq_mw_thehive.enrichment.cache import ResultCache
    from tq_mw_thehive.enrichment.plugin import QuotaExceeded
    from tq_mw_thehive.enrichment.registry import PluginInfo
    from tq_mw_thehive.enrichment.runner import Enricher

    plugin = stand_in(answer=QuotaExceeded("HTTP 429", retry_after_s=90))
    cfg = config_mod.from_dict(minimal_config(enrichment={"max_tlp_external": "GREEN"}), tmp_path)
    state.open_state(cfg.state_db).close()
    book = QuotaBook(cfg.state_db, clock=clock)
    enricher = Enricher(cfg, Registry([PluginInfo("intel", "test", module=plugin)]), ResultCache(cfg.state_db),
                        KeyStore(cfg.state_db, environ={}), quota=book)
    (run,) = enricher.run("ip", "45.33.1.1", "GREEN", "GREEN")
    assert (run.status, run.retry_at) == ("deferred", clock.now + 90) and book.depth() == 1
    (run,) = enricher.run("ip", "45.33.1.2", "GREEN", "GREEN", queue=False)   # `enrich`: said, not queued
    assert run.status == "over_quota" and "next call possible at" in run.reason and book.depth() == 1
    assert len(plugin.calls) == 1                                  # paused: the second never called


def test_a_limit_reached_is_said_once_not_per_value(world, mock, clock, caplog, monkeypatch):
    from tq_mw_thehive import logs
    from tq_mw_thehive.enrichment import runner

    monkeypatch.setattr(runner, "_quota_said", logs.Once())  # as in a new process
    VirusTotal(mock, clock)
    with caplog.at_level("DEBUG", logger="tq_mw_thehive.enrichment.runner"):
        burst(world, 12)
    said = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "wait in the queue" in r.getMessage()]
    assert said == ["enrichment virustotal quota of 4 a minute used: its lookups wait in the queue "
                    "(enrichment_deferred) and are applied in order when quota returns"]
    assert sum("outcome=deferred" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG") == 8
