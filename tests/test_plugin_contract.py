"""The plugin contract fails closed (issue 14, item 4).

One typed contract (``plugin.CONTRACT``), checked once when a plugin loads: a wrong declaration keeps
that plugin out, named and explained, while the others load. A plugin that does not declare
``EXTERNAL`` is external. No non-global address (an ``ip`` value, or a URL's, mail address's or host
name's IP literal) reaches an external plugin, and nothing (not even a broken ``ip_scope`` import)
can skip that rule.
"""
from __future__ import annotations

import ast
import ipaddress
import logging
import sys
import types
from pathlib import Path
from typing import Dict, Optional

import pytest

from conftest import minimal_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, state
from tq_mw_thehive.enrichment import gate, registry as registry_mod, runner
from tq_mw_thehive.enrichment import plugin as contract
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.plugin import Result
from tq_mw_thehive.enrichment.registry import PluginInfo, Registry, plugin_state
from tq_mw_thehive.enrichment.runner import Enricher
from tq_mw_thehive.plugins import ip_scope

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = {"abuseipdb", "domain", "geoip", "greynoise", "ip_scope", "otx", "shodan", "urlhaus", "virustotal",
           "warninglists"}

# A plugin file declaring every name of the contract, correctly; each case below breaks one.
VALID: Dict[str, str] = {
    "NAME": 'NAME = "probe"',
    "TITLE": 'TITLE = "Probe"',
    "DESCRIPTION": 'DESCRIPTION = "a plugin that declares everything"',
    "VERSION": 'VERSION = "2.1"',
    "DATA_TYPES": 'DATA_TYPES = ("ip", "url", "custom-type")',   # a type TheHive may add: still valid
    "EXTERNAL": "EXTERNAL = True",
    "ACTIVE": "ACTIVE = False",
    "API_KEYS": 'API_KEYS = {"PROBE_KEY": "https://signup.invalid/"}',
    "CACHE_TTL": "CACHE_TTL = 3600",
    "NEGATIVE_CACHE_TTL": "NEGATIVE_CACHE_TTL = 60.5",
    "RATE_LIMIT_PER_MIN": "RATE_LIMIT_PER_MIN = 30",
    "RATE_LIMIT_PER_DAY": "RATE_LIMIT_PER_DAY = 500",
    "lookup": "def lookup(request):\n    return Result()",
    "prepare": "def prepare(request=None):\n    pass",
}
HEADER = "from tq_mw_thehive.enrichment.plugin import Result\n"

# (declaration, its wrong form: None removes it); one or more for every name of the contract.
WRONG = [
    ("NAME", 'NAME = "Probe Plugin"'), ("NAME", "NAME = 3"), ("NAME", None),
    ("TITLE", "TITLE = 3"),
    ("DESCRIPTION", 'DESCRIPTION = ["a", "list"]'),
    ("VERSION", "VERSION = None"), ("VERSION", 'VERSION = "  "'), ("VERSION", "VERSION = True"),
    ("DATA_TYPES", 'DATA_TYPES = "ip"'), ("DATA_TYPES", "DATA_TYPES = ()"), ("DATA_TYPES", 'DATA_TYPES = ("ip", 4)'),
    ("DATA_TYPES", None),
    ("EXTERNAL", 'EXTERNAL = "no"'), ("EXTERNAL", "EXTERNAL = 0"), ("EXTERNAL", "EXTERNAL = None"),
    ("ACTIVE", 'ACTIVE = "yes"'), ("ACTIVE", "ACTIVE = 1"),
    ("API_KEYS", 'API_KEYS = ["PROBE_KEY"]'), ("API_KEYS", 'API_KEYS = {"PROBE_KEY": None}'),
    ("API_KEYS", 'API_KEYS = {"probe key!": "https://signup.invalid/"}'),
    ("CACHE_TTL", "CACHE_TTL = 0"), ("CACHE_TTL", "CACHE_TTL = -60"), ("CACHE_TTL", 'CACHE_TTL = "1h"'),
    ("CACHE_TTL", "CACHE_TTL = True"), ("CACHE_TTL", 'CACHE_TTL = float("nan")'),
    ("NEGATIVE_CACHE_TTL", 'NEGATIVE_CACHE_TTL = "10m"'), ("NEGATIVE_CACHE_TTL", "NEGATIVE_CACHE_TTL = 0"),
    ("RATE_LIMIT_PER_MIN", "RATE_LIMIT_PER_MIN = 0"), ("RATE_LIMIT_PER_MIN", 'RATE_LIMIT_PER_MIN = "60"'),
    ("RATE_LIMIT_PER_MIN", "RATE_LIMIT_PER_MIN = -5"),
    ("RATE_LIMIT_PER_DAY", "RATE_LIMIT_PER_DAY = 0"), ("RATE_LIMIT_PER_DAY", "RATE_LIMIT_PER_DAY = True"),
    ("lookup", 'lookup = "not a function"'), ("lookup", "def lookup():\n    return Result()"), ("lookup", None),
    ("prepare", "prepare = 42"), ("prepare", "def prepare(request, extra):\n    pass"),
]


def plugin_source(**changes: Optional[str]) -> str:
    lines = dict(VALID, **changes)
    return HEADER + "\n".join(line for line in lines.values() if line is not None) + "\n"


def discover(tmp_path: Path, source: str, stem: str = "probe") -> Registry:
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    (directory / f"{stem}.py").write_text(source, encoding="utf-8")
    return Registry.discover([str(directory)], entry_points=False)


def stand_in(name: str = "intel", data_types=("ip", "url", "domain", "fqdn", "hostname", "mail", "other"),
             **declared) -> types.ModuleType:
    """A plugin module in memory that records each lookup; ``declared`` adds or overrides names."""
    module = types.ModuleType(name)
    module.NAME, module.VERSION, module.DATA_TYPES = name, "1", data_types
    module.calls = []
    for key, value in declared.items():
        setattr(module, key, value)

    def lookup(request):
        module.calls.append(request.value)
        return Result("info", {}, {f"{name.title()} Seen": "yes"})

    module.lookup = lookup
    return module


def enricher(tmp_path: Path, *infos: PluginInfo) -> Enricher:
    cfg = config_mod.from_dict(minimal_config(), tmp_path)
    state.open_state(cfg.state_db).close()
    return Enricher(cfg, Registry(infos), ResultCache(cfg.state_db), KeyStore(cfg.state_db, environ={}))


@pytest.fixture
def fresh_process(monkeypatch):
    """Nothing said yet about any plugin, as in a newly started worker."""
    monkeypatch.setattr(registry_mod, "_warned", logs.Once())
    monkeypatch.setattr(runner, "_said", set())


# --- one contract, checked once at load --------------------------------------------------------------------

def test_the_contract_is_one_table_and_the_spec_has_a_field_for_each_name():
    names = [d.name for d in contract.CONTRACT]
    assert len(names) == len(set(names))
    assert set(names) == set(VALID), "a declaration without its valid and wrong cases in this file"
    assert {n for n, _ in WRONG} == set(names), "every declared name has at least one wrong case"
    fields = {f for f in contract.PluginSpec.__dataclass_fields__ if f != "declared"}
    assert {d.field for d in contract.CONTRACT} == fields


def test_a_plugin_declaring_everything_loads_as_a_typed_spec(tmp_path):
    info = discover(tmp_path, plugin_source()).get("probe")
    assert info is not None and info.error is None
    spec = info.spec
    assert (spec.name, spec.title, spec.description, spec.version) == \
        ("probe", "Probe", "a plugin that declares everything", "2.1")
    assert spec.data_types == ("ip", "url", "custom-type") and spec.external is True and spec.active is False
    assert dict(spec.api_keys) == {"PROBE_KEY": "https://signup.invalid/"}
    assert (spec.cache_ttl, spec.negative_cache_ttl, spec.rate_limit_per_min) == (3600, 60.5, 30)
    assert callable(spec.lookup) and callable(spec.prepare) and not spec.external_assumed
    assert {info: 1}[info] == 1                                              # hashable, as before
    # The registry's PluginInfo reads the same spec (callers use these names).
    assert (info.title, info.version, info.data_types, info.external, info.api_keys, info.rate_limit_per_min) == \
        ("Probe", "2.1", ("ip", "url", "custom-type"), True, {"PROBE_KEY": "https://signup.invalid/"}, 30)


def test_a_plugin_declaring_the_least_gets_the_contracts_defaults(tmp_path, fresh_process):
    source = HEADER + 'NAME = "bare_probe"\nDATA_TYPES = ("domain",)\ndef lookup(request):\n    return Result()\n'
    spec = discover(tmp_path, source).get("bare_probe").spec
    assert (spec.title, spec.description, spec.version) == ("Bare Probe", "", "0")
    assert (spec.external, spec.active, dict(spec.api_keys)) == (True, False, {})
    assert (spec.cache_ttl, spec.negative_cache_ttl, spec.rate_limit_per_min, spec.prepare) == (None,) * 4
    assert spec.external_assumed


@pytest.mark.parametrize("name, wrong", WRONG, ids=[f"{n}:{w}" for n, w in WRONG])
def test_each_wrong_declaration_keeps_the_plugin_out_naming_it(tmp_path, caplog, name, wrong):
    with caplog.at_level(logging.ERROR, logger="tq_mw_thehive.enrichment.registry"):
        registry = discover(tmp_path, plugin_source(**{name: wrong}))
    (info,) = [p for p in registry.plugins if p.origin.endswith("probe.py")]
    assert info.error is not None and info.error.startswith("invalid plugin: "), info.error
    assert f"{name} must be" in info.error or f"{name} is missing" in info.error, info.error
    expected = next(d.expected for d in contract.CONTRACT if d.name == name)
    assert expected in info.error
    assert info.module is None and info.spec is None and info not in registry.loaded()
    # Named in the log, as an import failure is; the state `tq-mw-thehive plugins` shows is the error.
    assert f"plugin {info.name} ({info.origin}) failed to load: invalid plugin: " in caplog.text
    assert name in caplog.text
    cfg = config_mod.from_dict(minimal_config(), tmp_path).enrichment
    assert plugin_state(info, cfg, KeyStore(tmp_path / "k.db", environ={})) == info.error
    # The daemon still starts with every other plugin.
    assert BUNDLED <= {p.name for p in registry.loaded()}


def test_every_problem_of_a_plugin_is_said_at_once(tmp_path):
    registry = discover(tmp_path, plugin_source(EXTERNAL='EXTERNAL = "no"', CACHE_TTL="CACHE_TTL = -1"))
    error = next(p.error for p in registry.plugins if p.name == "probe")
    assert "EXTERNAL must be" in error and "CACHE_TTL must be" in error


def test_a_plugin_info_built_from_a_wrong_module_did_not_load():
    info = PluginInfo("intel", "test", module=stand_in(EXTERNAL="yes"))
    assert info.module is None and info.spec is None and info.error.startswith("invalid plugin: EXTERNAL must be")
    assert Registry([info]).loaded() == []


def test_every_bundled_plugin_meets_the_contract_and_says_whether_it_is_external(caplog, fresh_process):
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.enrichment.registry"):
        registry = Registry.discover([], entry_points=False)
    assert {p.name for p in registry.loaded()} == BUNDLED and all(p.error is None for p in registry.plugins)
    assert not any(p.spec.external_assumed for p in registry.loaded()) and caplog.records == []


# --- EXTERNAL not declared: external ---------------------------------------------------------------------

def test_a_plugin_without_external_is_external_and_said_once(tmp_path, caplog, fresh_process):
    source = plugin_source(EXTERNAL=None, API_KEYS=None)
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.enrichment.registry"):
        info = discover(tmp_path, source).get("probe")
        discover(tmp_path, source)                      # a second discovery in the same process
    assert info.external is True and info.spec.external is True
    said = [r for r in caplog.records if "does not declare EXTERNAL" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING]
    assert said[0].getMessage() == (
        f"plugin probe ({info.origin}) does not declare EXTERNAL: treated as external, so the TLP gate and "
        "the non-global address rule apply; declare EXTERNAL = False if no value leaves")


@pytest.mark.parametrize("tlp", ["AMBER", "AMBER+STRICT", "RED", None])
def test_a_plugin_without_external_gets_no_value_above_the_tlp_limit(tmp_path, tlp, fresh_process):
    plugin = stand_in()                                 # declares no EXTERNAL
    engine = enricher(tmp_path, PluginInfo("intel", "test", module=plugin))
    (run,) = engine.run("ip", "8.8.4.4", tlp=tlp, pap="WHITE")
    assert run.status == "skipped" and "max_tlp_external" in run.reason
    assert plugin.calls == []
    assert engine.run("ip", "8.8.4.4", tlp="GREEN", pap="WHITE")[0].status == "fetched"   # the gate, not a fault
    assert plugin.calls == ["8.8.4.4"]


def test_a_plugin_without_external_gets_no_private_address(tmp_path, fresh_process):
    plugin = stand_in()
    (run,) = enricher(tmp_path, PluginInfo("intel", "test", module=plugin)).run("ip", "10.1.2.3", tlp="WHITE")
    assert run.status == "skipped" and plugin.calls == []


# --- no non-global address to an external plugin --------------------------------------------------------

NON_GLOBAL = [
    ("ip", "10.1.2.3", "private"), ("ip", "127.0.0.1", "loopback"), ("ip", "169.254.10.20", "link-local"),
    ("ip", "fe80::1", "link-local"), ("ip", "::1", "loopback"), ("ip", "::ffff:192.168.1.1", "private"),
    ("ip", "fd00::5", "private"), ("ip", "100.64.0.1", "cgnat"),
    ("ip", "not an address", "unparsable"), ("ip", "10.0.0.0/8", "unparsable"), ("ip", "8.8.8.8:53", "unparsable"),
    ("url", "http://192.168.1.10/admin", "private"), ("url", "https://127.0.0.1:8443/x", "loopback"),
    ("url", "http://[fe80::1]/", "link-local"), ("url", "http://[::1]:8080/", "loopback"),
    ("url", "10.0.0.5/login.php", "private"), ("url", "http://user:pw@172.16.0.1/", "private"),
    ("url", "http://127.1/", "loopback"), ("url", "http://0x7f000001/", "loopback"),
    ("url", "http://2130706433/", "loopback"), ("url", "http://10.0.0.1\\@example.org/", "private"),
    ("url", "http://[10.0.0.1]/", "unparsable"),
    ("domain", "192.168.0.1", "private"), ("fqdn", "10.0.0.1.", "private"), ("hostname", "[::1]", "loopback"),
    ("mail", "root@[10.0.0.1]", "private"), ("mail", "root@[IPv6:fe80::1]", "link-local"),
    ("other", "10.9.8.7", "private"),
]


@pytest.mark.parametrize("data_type, value, scope", NON_GLOBAL, ids=[f"{t}:{v}" for t, v, _ in NON_GLOBAL])
def test_a_non_global_address_never_reaches_an_external_plugin(tmp_path, data_type, value, scope):
    plugin = stand_in(EXTERNAL=True)
    (run,) = enricher(tmp_path, PluginInfo("intel", "test", module=plugin)).run(data_type, value, tlp="WHITE",
                                                                                pap="WHITE")
    assert run.status == "skipped" and run.reason == f"{scope} address: never sent to a third party"
    assert plugin.calls == []


@pytest.mark.parametrize("data_type, value", [("ip", "10.1.2.3"), ("url", "http://192.168.1.10/admin"),
                                              ("mail", "root@[10.0.0.1]")])
def test_the_address_rule_holds_when_ip_scope_cannot_be_imported(tmp_path, monkeypatch, data_type, value):
    monkeypatch.setitem(sys.modules, "tq_mw_thehive.plugins.ip_scope", None)   # any import of it now fails
    with pytest.raises(ImportError):
        __import__("tq_mw_thehive.plugins.ip_scope")
    plugin = stand_in(EXTERNAL=True)
    (run,) = enricher(tmp_path, PluginInfo("intel", "test", module=plugin)).run(data_type, value, tlp="WHITE",
                                                                                pap="WHITE")
    assert run.status == "skipped" and "address: never sent to a third party" in run.reason
    assert plugin.calls == []


@pytest.mark.parametrize("data_type, value", [("ip", "10.1.2.3"), ("ip", "127.0.0.1"), ("ip", "fe80::1"),
                                              ("url", "http://192.168.1.10/admin"), ("mail", "root@[10.0.0.1]")])
def test_an_internal_plugin_still_sees_private_addresses(tmp_path, data_type, value):
    plugin = stand_in(EXTERNAL=False)
    (run,) = enricher(tmp_path, PluginInfo("intel", "test", module=plugin)).run(data_type, value, tlp="WHITE")
    assert run.status == "fetched" and plugin.calls == [value]


@pytest.mark.parametrize("data_type, value", [
    ("ip", "8.8.4.4"), ("ip", "2606:4700:4700::1111"), ("url", "https://example.org/a?next=10.0.0.1"),
    ("url", "http://8.8.8.8/x"), ("domain", "example.org"), ("fqdn", "www.example.org"), ("mail", "a@example.org"),
    ("other", "12345"),
])
def test_global_addresses_and_names_still_reach_an_external_plugin(tmp_path, data_type, value):
    plugin = stand_in(EXTERNAL=True)
    (run,) = enricher(tmp_path, PluginInfo("intel", "test", module=plugin)).run(data_type, value, tlp="GREEN")
    assert run.status == "fetched" and plugin.calls == [value]


def test_the_gate_decides_from_the_spec_alone():
    external = contract.read_spec(stand_in(EXTERNAL=True))
    assert gate.refusal(external, "WHITE", "WHITE", "GREEN", "GREEN", "ip", "10.0.0.1") == \
        "private address: never sent to a third party"
    assert gate.refusal(external, "WHITE", "WHITE", "GREEN", "GREEN", "ip", "8.8.8.8") is None
    assert "max_tlp_external" in gate.refusal(external, "RED", "WHITE", "GREEN", "GREEN", "ip", "8.8.8.8")
    internal = contract.read_spec(stand_in(EXTERNAL=False))
    assert gate.refusal(internal, "RED", "RED", "GREEN", "GREEN", "ip", "10.0.0.1") is None
    # EXTERNAL missing: read as the registry reads it, external.
    undeclared = contract.read_spec(stand_in())
    assert "max_tlp_external" in gate.refusal(undeclared, "AMBER", "WHITE", "GREEN", "GREEN", "ip", "8.8.8.8")
    assert gate.refusal(undeclared, "WHITE", "WHITE", "GREEN", "GREEN", "ip", "not an address") == \
        "unparsable address: never sent to a third party"


@pytest.mark.parametrize("path", ["tq_mw_thehive/enrichment/gate.py", "tq_mw_thehive/enrichment/runner.py"])
def test_the_gate_and_the_runner_read_no_declaration_and_import_no_plugin(path):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "getattr" not in calls and "hasattr" not in calls
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any(m.startswith("tq_mw_thehive.plugins") for m in imported)
    handlers = [ast.unparse(h.type) for n in ast.walk(tree) if isinstance(n, ast.Try) for h in n.handlers if h.type]
    assert not any("ImportError" in h or "ModuleNotFoundError" in h for h in handlers)


# --- one address table -------------------------------------------------------------------------------------

def test_the_ip_scope_plugin_reports_the_gates_table():
    assert ip_scope.SCOPES == gate.SCOPES
    for cidr, _ in gate._V4 + gate._V6:
        network = ipaddress.ip_network(cidr)
        low, high = int(network.network_address), int(network.broadcast_address)
        top = 2 ** network.max_prefixlen - 1
        for number in {max(low - 1, 0), low, high, min(high + 1, top)}:
            address = str(ipaddress.ip_address(number) if network.version == 4 else ipaddress.IPv6Address(number))
            assert gate.classify(address) == ip_scope.classify(address), address
