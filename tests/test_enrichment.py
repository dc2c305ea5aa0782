"""The enrichment framework: registry, TLP/PAP gate, cache, keys, timeouts, monitor — with stand-in plugins."""
from __future__ import annotations

import logging
import textwrap
import threading
import types

import pytest

from conftest import minimal_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, state
from tq_mw_thehive.enrichment import gate, runner
from tq_mw_thehive.enrichment.cache import ResultCache, normalise
from tq_mw_thehive.enrichment.keys import KeyStore, mask
from tq_mw_thehive.enrichment.monitor import Monitor, WatchList, guess_type
from tq_mw_thehive.enrichment.plugin import NotFound, PluginError, QuotaExceeded, Result
from tq_mw_thehive.enrichment.registry import PluginInfo, Registry, plugin_state, ttl_s
from tq_mw_thehive.enrichment.runner import Enricher


def stand_in(name="intel", external=True, active=False, data_types=("ip", "domain"), keys=None, answer=None,
             version="1", **extra) -> types.ModuleType:
    """A plugin module built in memory; ``answer`` is a Result, an exception, or a callable."""
    module = types.ModuleType(name)
    module.NAME, module.TITLE, module.VERSION, module.DESCRIPTION = name, name.title(), version, "stand-in"
    module.DATA_TYPES, module.EXTERNAL, module.ACTIVE = data_types, external, active
    module.API_KEYS = keys or {}
    module.calls = []
    for key, value in extra.items():
        setattr(module, key, value)

    def lookup(request):
        module.calls.append(request)
        result = answer(request) if callable(answer) else answer
        if isinstance(result, BaseException):
            raise result
        return result or Result("suspicious", {"score": 50}, {f"{module.TITLE} Score": "50"})

    module.lookup = lookup
    return module


def make(tmp_path, *modules, environ=None, **enrichment):
    cfg = config_mod.from_dict(minimal_config(enrichment=enrichment), tmp_path)
    state.open_state(cfg.state_db).close()
    registry = Registry(PluginInfo(m.NAME, "test", module=m) for m in modules)
    return Enricher(cfg, registry, ResultCache(cfg.state_db), KeyStore(cfg.state_db, environ=environ or {}))


# --- gate --------------------------------------------------------------------------------------

@pytest.mark.parametrize("level, maximum, allowed", [
    ("WHITE", "GREEN", True), ("CLEAR", "GREEN", True), ("GREEN", "GREEN", True), ("AMBER", "GREEN", False),
    ("AMBER+STRICT", "AMBER", False), ("RED", "AMBER", False), ("RED", "RED", True), (None, "AMBER", False),
    ("purple", "AMBER", False), ("amber", "AMBER", True),
])
def test_gate_levels(level, maximum, allowed):
    assert gate.allows(level, maximum) is allowed


def test_a_tlp_red_value_causes_zero_outbound_calls(tmp_path):
    plugin = stand_in()
    enricher = make(tmp_path, plugin)
    (run,) = enricher.run("ip", "198.51.100.7", tlp="RED", pap="WHITE")
    assert run.status == "skipped" and "max_tlp_external" in run.reason
    assert plugin.calls == []
    (run,) = enricher.run("ip", "8.8.4.4", tlp="AMBER", pap="WHITE")
    assert run.status == "skipped" and plugin.calls == []
    (run,) = enricher.run("ip", "8.8.4.4", tlp="GREEN", pap="WHITE")
    assert run.status == "fetched" and len(plugin.calls) == 1


def test_an_active_plugin_is_held_to_pap_and_an_internal_one_to_nothing(tmp_path):
    active, internal = stand_in("prober", external=False, active=True), stand_in("local", external=False)
    enricher = make(tmp_path, active, internal)
    runs = {r.plugin: r for r in enricher.run("domain", "example.org", tlp="RED", pap="AMBER")}
    assert runs["prober"].status == "skipped" and "max_pap_active" in runs["prober"].reason
    assert runs["local"].status == "fetched"


def test_the_limits_are_configurable(tmp_path):
    plugin = stand_in()
    enricher = make(tmp_path, plugin, max_tlp_external="AMBER")
    assert enricher.run("ip", "8.8.4.4", tlp="AMBER")[0].status == "fetched"


def test_a_non_global_address_never_leaves_even_at_tlp_white(tmp_path):
    plugin = stand_in()
    enricher = make(tmp_path, plugin)
    for address in ("10.1.2.3", "192.168.0.1", "127.0.0.1", "100.64.1.1", "192.0.2.1", "fe80::1"):
        (run,) = enricher.run("ip", address, tlp="WHITE", pap="WHITE")
        assert run.status == "skipped" and "address" in run.reason, address
    assert plugin.calls == []


# --- cache -------------------------------------------------------------------------------------

def test_a_cache_hit_makes_no_call_and_says_how_old(tmp_path):
    plugin = stand_in()
    enricher = make(tmp_path, plugin)
    first = enricher.run("domain", "Example.ORG.", tlp="GREEN")[0]
    second = enricher.run("domain", "example.org", tlp="GREEN")[0]
    assert (first.status, second.status) == ("fetched", "cached")
    assert len(plugin.calls) == 1
    assert second.attributes == first.attributes == {"Intel Score": "50", "Intel Verdict": "suspicious"}
    assert second.describe() == "cached, 0 s old"
    assert enricher.run("domain", "example.org", tlp="GREEN", bypass_cache=True)[0].status == "fetched"
    assert len(plugin.calls) == 2


def test_a_new_plugin_version_misses_the_old_entries(tmp_path):
    v1, v2 = stand_in(version="1"), stand_in(version="2")
    make(tmp_path, v1).run("domain", "example.org", tlp="GREEN")
    make(tmp_path, v2).run("domain", "example.org", tlp="GREEN")
    assert len(v1.calls) == len(v2.calls) == 1


def test_not_found_is_cached_shorter_and_errors_not_at_all(tmp_path):
    clock = [1000.0]
    missing = stand_in("missing", answer=NotFound("unknown"))
    failing = stand_in("failing", answer=PluginError("HTTP 500"))
    quota = stand_in("quota", answer=QuotaExceeded("429"))
    enricher = make(tmp_path, missing, failing, quota, negative_ttl="10m", cache_ttl="24h")
    enricher.cache.clock = lambda: clock[0]
    statuses = [r.status for r in enricher.run("ip", "8.8.4.4", tlp="GREEN")]
    assert statuses == ["not_found", "error", "error"]
    enricher.run("ip", "8.8.4.4", tlp="GREEN")
    assert (len(missing.calls), len(failing.calls), len(quota.calls)) == (1, 2, 2)
    clock[0] += 11 * 60
    enricher.run("ip", "8.8.4.4", tlp="GREEN")
    assert len(missing.calls) == 2
    stats = {s["plugin"]: s for s in enricher.cache.stats()}
    assert stats["missing"]["hits"] == 1 and stats["failing"]["errors"] == 3


def test_ttl_setting_beats_declaration_beats_default(tmp_path):
    cfg = config_mod.from_dict(minimal_config(enrichment={"cache_ttl": "2h", "plugins": {"b": {"cache_ttl": "5m"}}}),
                               tmp_path).enrichment
    assert ttl_s(PluginInfo("a", "t", module=stand_in("a")), cfg, True) == 7200
    assert ttl_s(PluginInfo("a", "t", module=stand_in("a", CACHE_TTL=60)), cfg, True) == 60
    assert ttl_s(PluginInfo("b", "t", module=stand_in("b", CACHE_TTL=60)), cfg, True) == 300


@pytest.mark.parametrize("data_type, raw, expected", [
    ("ip", " 2001:DB8:0:0::1 ", "2001:db8::1"), ("domain", "Example.COM.", "example.com"),
    ("hash", "ABCDEF", "abcdef"), ("url", "https://Example.com/A", "https://Example.com/A"),
])
def test_cache_keys_are_normalised(data_type, raw, expected):
    assert normalise(data_type, raw) == expected


def test_cache_clear_all_or_one_plugin(tmp_path):
    a, b = stand_in("a"), stand_in("b")
    enricher = make(tmp_path, a, b)
    enricher.run("domain", "example.org", tlp="GREEN")
    assert enricher.cache.clear("a") == 1
    assert enricher.cache.clear() == 1


# --- failures and timeouts -------------------------------------------------------------------------

def test_a_slow_plugin_times_out_and_the_others_still_answer(tmp_path):
    release = threading.Event()
    slow = stand_in("slow", answer=lambda request: release.wait(5) and Result())
    fast = stand_in("fast")
    enricher = make(tmp_path, slow, fast, timeout="0.2s")
    try:
        runs = {r.plugin: r for r in enricher.run("ip", "8.8.4.4", tlp="GREEN")}
    finally:
        release.set()
    assert runs["slow"].status == "error" and "timed out" in runs["slow"].reason
    assert runs["fast"].status == "fetched"


@pytest.mark.parametrize("answer", [KeyError("boom"), "not a Result", ValueError("bad")])
def test_anything_a_plugin_raises_or_returns_wrongly_is_contained(tmp_path, answer, caplog):
    broken = stand_in("broken", answer=lambda request: answer if isinstance(answer, str) else (_ for _ in ()).throw(answer))
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.enrichment.runner"):
        (run,) = make(tmp_path, broken).run("ip", "8.8.4.4", tlp="GREEN")
    assert run.status == "error"
    assert "outcome=error" in caplog.text


# --- keys --------------------------------------------------------------------------------------------

def test_keys_set_list_delete_mask_and_env_override(tmp_path, caplog):
    cfg = config_mod.from_dict(minimal_config(), tmp_path)
    state.open_state(cfg.state_db).close()
    keys = KeyStore(cfg.state_db, environ={"TQ_MW_KEY_SHODAN": "env-shodan-key-0000"})
    keys.set("virustotal", "vt-secret-key-123456789")
    assert keys.get("VIRUSTOTAL") == "vt-secret-key-123456789"
    assert keys.get("shodan") == "env-shodan-key-0000"
    keys.set("shodan", "db-shodan-key-1111")
    assert keys.get("shodan") == "env-shodan-key-0000"  # the environment wins
    listing = {k["name"]: k for k in keys.listing()}
    assert listing["VIRUSTOTAL"]["value"] == "********6789" and listing["SHODAN"]["source"] == "$TQ_MW_KEY_SHODAN"
    assert "vt-secret-key" not in repr(listing)
    assert keys.delete("virustotal") and not keys.delete("virustotal")
    assert keys.get("virustotal") is None
    assert mask("short") == "********"
    with pytest.raises(ValueError):
        keys.set("bad name!", "x")
    assert logs.redact("key vt-secret-key-123456789 leaked") == "key *** leaked"


def test_a_plugin_with_a_missing_key_is_reported_and_skipped(tmp_path):
    plugin = stand_in("keyed", keys={"KEYED": "https://example.org/signup"})
    enricher = make(tmp_path, plugin)
    (run,) = enricher.run("ip", "8.8.4.4", tlp="GREEN")
    assert run.status == "skipped" and run.reason == "missing key: KEYED" and plugin.calls == []
    enricher.keys.environ = {"TQ_MW_KEY_KEYED": "k-123456"}
    enricher.run("ip", "8.8.4.4", tlp="GREEN")
    assert plugin.calls[0].keys == {"KEYED": "k-123456"}


@pytest.fixture
def fresh_process(monkeypatch):
    """What this process has said about plugins, forgotten: as in a newly started worker."""
    monkeypatch.setattr(runner, "_said", logs.Once())


def test_a_missing_key_is_said_once_per_process_not_once_per_observable(tmp_path, caplog, fresh_process):
    keyed = stand_in("keyed", keys={"KEYED": "https://example.org/signup"})
    off = stand_in("off")
    values = ["8.8.4.4", "1.1.1.1", "9.9.9.9", "208.67.222.222", "example.org"]
    with caplog.at_level(logging.DEBUG, logger="tq_mw_thehive.enrichment.runner"):
        enricher = make(tmp_path, keyed, off, disabled=["off"])
        for value in values:
            enricher.run("domain" if "org" in value else "ip", value, tlp="GREEN")
        make(tmp_path, keyed, off, disabled=["off"]).run("ip", "8.8.8.8", tlp="GREEN")  # another Enricher
    said = [r for r in caplog.records if r.levelno >= logging.INFO and "missing key: KEYED" in r.getMessage()]
    assert [r.getMessage() for r in said] == \
        ["enrichment keyed skipped for every value until this changes: missing key: KEYED"]
    assert sum("off skipped for every value" in r.getMessage() and "disabled by config" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.INFO) == 1
    # Per observable only at debug, for -v 3.
    per_value = [r for r in caplog.records if "enrichment keyed ip value=" in r.getMessage()]
    assert len(per_value) == 4 and {r.levelno for r in per_value} == {logging.DEBUG}
    assert keyed.calls == [] and off.calls == []


def test_a_refusal_for_the_value_is_still_said_for_each_value(tmp_path, caplog, fresh_process):
    plugin = stand_in()
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.enrichment.runner"):
        enricher = make(tmp_path, plugin)
        for value in ("8.8.4.4", "1.1.1.1"):
            enricher.run("ip", value, tlp="RED")
    assert sum("outcome=skipped" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records) == 2


# --- registry ----------------------------------------------------------------------------------------

def test_the_registry_loads_bundled_dirs_and_reports_broken_plugins(tmp_path):
    extra = tmp_path / "plugins"
    extra.mkdir()
    (extra / "echo.py").write_text(textwrap.dedent('''
        from tq_mw_thehive.enrichment.plugin import Result
        NAME = "echo"
        VERSION = "1"
        DATA_TYPES = ("domain",)
        def lookup(request):
            return Result("info", {}, {"Echo": request.value})
    '''))
    (extra / "broken.py").write_text("import does_not_exist\n")
    (extra / "invalid.py").write_text("NAME = 'Invalid Name'\nDATA_TYPES = ()\n")
    (extra / "_private.py").write_text("raise SystemExit('never imported')\n")
    registry = Registry.discover([str(extra), str(tmp_path / "missing")], entry_points=False)
    by_name = {p.name: p for p in registry.plugins}
    assert by_name["echo"].module is not None and by_name["echo"].error is None
    assert "ModuleNotFoundError" in by_name["broken"].error
    assert by_name["Invalid Name"].error.startswith("invalid plugin")
    assert "does not exist" in by_name["missing"].error
    assert "_private" not in by_name
    assert {"ip_scope", "geoip", "domain", "warninglists"} <= {p.name for p in registry.loaded()}
    cfg = config_mod.from_dict(minimal_config(enrichment={"disabled": ["echo"]}), tmp_path).enrichment
    assert plugin_state(by_name["echo"], cfg, KeyStore(tmp_path / "k.db", environ={})) == "disabled by config"


def test_a_duplicate_name_is_reported_not_loaded_twice():
    first, second = stand_in("twin"), stand_in("twin")
    registry = Registry([PluginInfo("twin", "one", module=first), PluginInfo("twin", "two", module=second)])
    assert registry.get("twin").module is first
    assert "duplicate name" in registry.plugins[1].error


# --- monitor -----------------------------------------------------------------------------------------

def test_monitor_rechecks_due_watches_bypassing_the_cache_and_logs_changes(tmp_path, caplog):
    score = {"value": "10"}
    plugin = stand_in("intel", external=False, data_types=("domain",),
                      answer=lambda r: Result("info", {}, {"Intel Score": score["value"]}))
    enricher = make(tmp_path, plugin)
    clock = [5000.0]
    watches = WatchList(enricher.cfg.state_db, clock=lambda: clock[0])
    assert watches.add("Example.org", "domain", interval_s=3600) is True
    assert watches.add("example.org", "domain", interval_s=3600, origin="ioc") is False
    enricher.run("domain", "example.org")
    monitor = Monitor(enricher, watches, clock=lambda: clock[0], sleep=lambda s: None)
    assert monitor.run_once() == {"checked": 1, "changed": 0, "errors": 0}  # added by hand: due at once
    assert monitor.run_once()["checked"] == 0  # not due again yet
    clock[0] += 3601
    score["value"] = "90"
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.enrichment.monitor"):
        counts = monitor.run_once()
    assert counts == {"checked": 1, "changed": 1, "errors": 0}
    assert "changed example.org intel Intel Score: 10 -> 90" in caplog.text
    assert len(plugin.calls) == 3  # the cached answer was bypassed each time
    clock[0] += 3601
    assert monitor.run_once() == {"checked": 1, "changed": 0, "errors": 0}
    assert watches.remove("example.org") == 1 and watches.listing() == []


def test_monitor_keeps_to_each_plugins_rate_limit(tmp_path):
    plugin = stand_in("intel", external=False, data_types=("domain",), RATE_LIMIT_PER_MIN=30)
    enricher = make(tmp_path, plugin)
    clock = [0.0]
    watches = WatchList(enricher.cfg.state_db, clock=lambda: clock[0])
    for domain in ("a.example", "b.example", "c.example"):
        watches.add(domain, "domain", interval_s=60)
    clock[0] += 61
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    Monitor(enricher, watches, clock=lambda: clock[0], sleep=sleep).run_once()
    assert slept == [2.0, 2.0]  # 30 a minute: two seconds between calls
    assert len(plugin.calls) == 3


@pytest.mark.parametrize("value, expected", [
    ("8.8.8.8", "ip"), ("2001:db8::1", "ip"), ("https://x.org/a", "url"), ("d41d8cd98f00b204e9800998ecf8427e", "hash"),
    ("a@b.org", "mail"), ("example.org", "domain"),
])
def test_guess_type(value, expected):
    assert guess_type(value) == expected
