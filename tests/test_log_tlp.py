"""Observable values above ``logs.max_tlp_values`` never reach a log line: worker and sync lines,
enrichment lines (and plugins' own), monitor change lines. A missing TLP counts as above.

The checks read the log file written through ``logs.setup``: the withholding happens in the
formatter, so pytest's ``caplog`` (which keeps the raw records) would not show it.
"""
from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path

import pytest

from conftest import minimal_config, sample
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, state
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.monitor import Monitor, WatchList
from tq_mw_thehive.enrichment.plugin import PluginError, Result
from tq_mw_thehive.enrichment.registry import PluginInfo, Registry
from tq_mw_thehive.enrichment.runner import Enricher
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync import Outcome
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq.api import ThreatQPermanentError, ThreatQUnavailable
from tq_mw_thehive.worker import Worker, observable_values
from tq_mw_thehive.services import Services

VALUE = "203.0.113.47"
RED_LINE = "<TLP:RED value withheld>"


def log_text(log_dir: Path) -> str:
    return (log_dir / logs.LOG_FILE).read_text(encoding="utf-8")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    logs.setup(directory, "3")
    return directory


# --- the rule --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tlp, maximum, shown", [
    ("WHITE", "AMBER", True), ("CLEAR", "AMBER", True), ("GREEN", "AMBER", True), ("AMBER", "AMBER", True),
    ("amber", "AMBER", True), ("AMBER+STRICT", "AMBER", False), ("RED", "AMBER", False),
    ("GREEN", "WHITE", False), ("RED", "RED", True),
    (None, "AMBER", False), ("", "AMBER", False), ("purple", "AMBER", False), (None, "RED", False),
])
def test_which_tlp_may_be_logged(tlp, maximum, shown):
    assert logs.tlp_allows(tlp, maximum) is shown
    assert logs.loggable(VALUE, tlp, maximum) == (VALUE if shown else logs.withheld_label(tlp))


def test_the_placeholder_never_carries_payload_text():
    assert logs.withheld_label("red") == RED_LINE
    assert logs.withheld_label(None) == "<TLP:unknown value withheld>"
    assert logs.withheld_label("RED\n2026-01-01 forged") == "<TLP:unknown value withheld>"


def test_the_config_key_defaults_to_amber_and_takes_only_tlp_levels(tmp_path):
    assert config_mod.from_dict(minimal_config(), tmp_path).logs.max_tlp_values == "AMBER"
    assert config_mod.from_dict(minimal_config(logs={"max_tlp_values": "RED"}), tmp_path).logs.max_tlp_values == "RED"
    with pytest.raises(config_mod.ConfigError, match="logs.max_tlp_values: must be one of"):
        config_mod.from_dict(minimal_config(logs={"max_tlp_values": "PURPLE"}), tmp_path)


def test_a_scope_withholds_every_form_of_the_value_in_any_line(log_dir):
    log = logging.getLogger("tq_mw_thehive.test_log_tlp")
    hostile = "evil.example\x1b[31m"
    with logs.withholding("AMBER") as withheld:
        withheld.add([VALUE, hostile], "RED")
        withheld.add(["green.example"], "GREEN")
        log.warning("raw %s quoted %r upper %s", VALUE, VALUE, "EVIL.EXAMPLE\x1b[31m")
        log.warning("escaped %s and %r", hostile, hostile)
        log.info("not inside a longer value: %s0 and 1%s", VALUE, VALUE)
        log.info("green.example is AMBER or lower: shown")
        try:
            raise ThreatQPermanentError(f"400 indicator {VALUE} refused")
        except ThreatQPermanentError:
            log.exception("call failed")
    log.info("outside the scope %s", VALUE)
    text = log_text(log_dir)
    inside, outside = text.split("outside the scope")
    assert VALUE not in inside.replace(f"{VALUE}0", "").replace(f"1{VALUE}", "")
    assert "evil.example" not in inside.lower()
    assert inside.count(RED_LINE) == 6
    assert f"{VALUE}0" in inside and f"1{VALUE}" in inside  # other values are left alone
    assert "green.example is AMBER" in inside
    assert VALUE in outside


# --- the worker and the sync's lines ---------------------------------------------------------------

def observable_event(tlp_label=None, tlp_number=None) -> dict:
    event = copy.deepcopy(sample("th5-observable-create-ip.json"))
    for obj in (event["object"], event["details"], event["context"]):
        obj.pop("tlpLabel"), obj.pop("tlp")
        if tlp_label is not None:
            obj["tlpLabel"] = tlp_label
        if tlp_number is not None:
            obj["tlp"] = tlp_number
    return event


class LeakySync:
    """Logs the value as sync.py's consume fallback does, then fails quoting it, as ThreatQ may."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def handle(self, item):
        obj = json.loads(item.body)["object"]
        logging.getLogger("tq_mw_thehive.sync").warning(
            "ThreatQ refused to consume %s %r (%s); creating it call by call", "indicators", obj["data"], "400")
        if self.error is None:
            return Outcome("skipped", 142, detail=f"no ThreatQ type for {obj['data']}")
        raise self.error


def run_worker(tmp_path: Path, event: dict, error: Exception = None, **log_settings) -> None:
    cfg = config_mod.from_dict(minimal_config(logs=log_settings), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    inbox.put(events.parse(event), json.dumps(event))
    worker = Worker(Services(cfg, inbox), sync_factory=lambda: LeakySync(error), backoff_cap_s=0)
    assert worker.run_once()


@pytest.mark.parametrize("event, placeholder", [
    (observable_event("RED"), RED_LINE),
    (observable_event(tlp_number=3), RED_LINE),                     # TheHive 4 numbers: 3 is RED
    (observable_event("AMBER+STRICT"), "<TLP:AMBER+STRICT value withheld>"),
    (observable_event(), "<TLP:unknown value withheld>"),           # no TLP at all: fail closed
])
@pytest.mark.parametrize("error", [None, ThreatQPermanentError(f"400: value {VALUE} is invalid"),
                                   ThreatQUnavailable(f"timeout looking up {VALUE}"),
                                   KeyError(VALUE)])
def test_worker_and_sync_lines_withhold_a_value_above_the_maximum(tmp_path, log_dir, event, placeholder, error):
    run_worker(tmp_path, event, error)
    text = log_text(log_dir)
    assert "sync audit=~2060400" in text and "ThreatQ refused to consume indicators" in text
    assert VALUE not in text, text
    assert placeholder in text


def test_worker_lines_show_a_value_at_or_below_the_maximum(tmp_path, log_dir):
    run_worker(tmp_path, observable_event("AMBER"), ThreatQPermanentError(f"400: value {VALUE} is invalid"))
    text = log_text(log_dir)
    assert f"consume indicators '{VALUE}'" in text and f"value {VALUE} is invalid" in text
    assert "withheld" not in text


@pytest.mark.parametrize("event, shown", [(observable_event("RED"), True), (observable_event(), False)])
def test_max_tlp_values_red_logs_red_values_but_never_a_missing_tlp(tmp_path, log_dir, event, shown):
    run_worker(tmp_path, event, max_tlp_values="RED")
    assert (f"consume indicators '{VALUE}'" in log_text(log_dir)) is shown


def test_file_hashes_and_name_are_withheld_too():
    event = sample("th5-observable-create-ip.json")
    event["object"].update(dataType="file", data=None, tlpLabel="RED",
                           attachment={"name": "invoice.pdf.exe", "hashes": ["a" * 64, "b" * 40]})
    values, tlp = observable_values(json.dumps(event))
    assert {"invoice.pdf.exe", "a" * 64, "b" * 40} <= set(values) and tlp == "RED"
    assert observable_values("not json") == ([], None) and observable_values("[1]") == ([], None)


def test_a_coalesced_later_state_is_withheld_by_its_own_tlp(tmp_path, log_dir):
    """The worker may apply a later queued state of the object: its TLP (raised to RED) counts."""
    cfg = config_mod.from_dict(minimal_config(), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    first = observable_event("GREEN")
    first["object"]["data"] = first["details"]["data"] = "198.51.100.9"
    later = observable_event("RED")
    later["_id"], later["action"], later["_createdAt"] = "~2060401", "update", first["_createdAt"] + 1
    later["object"]["data"] = "198.51.100.9"
    for event in (first, later):
        inbox.put(events.parse(event), json.dumps(event))
    worker = Worker(Services(cfg, inbox), sync_factory=lambda: LeakySync(None), backoff_cap_s=0)
    assert worker.run_once()
    text = log_text(log_dir)
    assert "198.51.100.9" not in text and RED_LINE in text


# --- enrichment lines and plugins' own lines ---------------------------------------------------------

def erring_plugin(name: str = "leaky"):
    module = types.ModuleType(name)
    module.NAME, module.TITLE, module.VERSION, module.DESCRIPTION = name, name.title(), "1", "stand-in"
    module.DATA_TYPES, module.EXTERNAL, module.ACTIVE, module.API_KEYS = ("ip",), False, False, {}

    def lookup(request):
        logging.getLogger(f"plugin.{name}").warning("looking up %s", request.value)  # in a pool thread
        raise PluginError(f"upstream refused {request.value}")

    module.lookup = lookup
    return module


def enricher_for(tmp_path: Path, *modules, **log_settings) -> Enricher:
    cfg = config_mod.from_dict(minimal_config(logs=log_settings), tmp_path)
    state.open_state(cfg.state_db).close()
    registry = Registry(PluginInfo(m.NAME, "test", module=m) for m in modules)
    return Enricher(cfg, registry, ResultCache(cfg.state_db), KeyStore(cfg.state_db, environ={}))


@pytest.mark.parametrize("tlp, placeholder", [("RED", RED_LINE), (None, "<TLP:unknown value withheld>"),
                                               ("AMBER+STRICT", "<TLP:AMBER+STRICT value withheld>")])
def test_enrichment_lines_withhold_the_value_in_every_field_and_in_the_plugin(tmp_path, log_dir, tlp, placeholder):
    enricher = enricher_for(tmp_path, erring_plugin())
    (run,) = enricher.run("ip", VALUE, tlp=tlp, pap="WHITE")
    assert run.status == "error"
    text = log_text(log_dir)
    assert f"enrichment leaky ip value='{placeholder}' outcome=error" in text
    assert "looking up" in text and VALUE not in text, text


def test_enrichment_lines_show_a_value_at_or_below_the_maximum(tmp_path, log_dir):
    enricher = enricher_for(tmp_path, erring_plugin())
    enricher.run("ip", VALUE, tlp="GREEN", pap="WHITE")
    text = log_text(log_dir)
    assert f"enrichment leaky ip value='{VALUE}' outcome=error reason='PluginError: upstream refused {VALUE}'" in text
    assert f"looking up {VALUE}" in text


# --- monitor change lines ---------------------------------------------------------------------------

@pytest.mark.parametrize("tlp, shown", [("RED", RED_LINE), ("GREEN", "example.org")])
def test_monitor_change_lines_withhold_a_red_watch(tmp_path, log_dir, tlp, shown):
    score = {"value": "10"}
    module = types.ModuleType("intel")
    module.NAME, module.TITLE, module.VERSION, module.DESCRIPTION = "intel", "Intel", "1", "stand-in"
    module.DATA_TYPES, module.EXTERNAL, module.ACTIVE, module.API_KEYS = ("domain",), False, False, {}
    module.lookup = lambda request: Result("info", {}, {"Intel Score": score["value"]})
    enricher = enricher_for(tmp_path, module)
    clock = [5000.0]
    watches = WatchList(enricher.cfg.state_db, clock=lambda: clock[0])
    watches.add("example.org", "domain", interval_s=60, tlp=tlp)
    monitor = Monitor(enricher, watches, clock=lambda: clock[0], sleep=lambda s: None)
    monitor.run_once()
    clock[0] += 61
    score["value"] = "90"
    assert monitor.run_once()["changed"] == 1
    text = log_text(log_dir)
    assert f"changed {shown} intel Intel Score: 10 -> 90" in text
    assert ("example.org" in text) is (tlp == "GREEN")
