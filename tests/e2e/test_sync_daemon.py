"""Sync end to end: the real daemon (gunicorn, 2 workers, a sync thread in each) against the simulators.

The tests of the sync itself run against both answer shapes of the ThreatQ simulator (``strict``,
the contract's reading; ``sdk``, the public captures' shapes without the calls that have no public
evidence): ``@both_shapes``. No event may become a dead letter in either."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import WEBHOOK_TOKEN, sample, write_config
from tq_mw_thehive.testing.daemon import Daemon, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

pytestmark = pytest.mark.e2e
EMAIL, PASSWORD = "e2e@example.org", "e2e-password-42"
HIVE_KEY = "e2e-hive-key-0123"
BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
CASE_ID, IP = "~8396848", "203.0.113.47"


@pytest.fixture
def shapes() -> str:
    """The ThreatQ simulator's answer shape; ``@both_shapes`` runs a test in each."""
    return "strict"


both_shapes = pytest.mark.parametrize("shapes", ["strict", "sdk"])


@pytest.fixture
def simulators(shapes):
    tq, hive = ThreatQSimulator(users={EMAIL: PASSWORD}, shapes=shapes), TheHiveSimulator(api_key=HIVE_KEY)
    with LoopbackServer(tq.app) as tq_server, LoopbackServer(hive.app) as hive_server:
        tq.url, hive.url = tq_server.url, hive_server.url
        yield tq, hive


@pytest.fixture
def start(tmp_path, simulators):
    tq, hive = simulators
    daemons = []

    def start(enrichment=None, env=None, writeback=None, **sync) -> Daemon:
        write_config(tmp_path, threatq={"host": tq.url, "client_id": tq.client_id},
                     thehive={"url": hive.url, "api_key": HIVE_KEY}, sync=sync,
                     enrichment=enrichment or {"enabled": False}, writeback=writeback or {"enabled": False})
        tq_auth.save_tokens(tmp_path, tq_auth.password_grant(tq.url, tq.client_id, EMAIL, PASSWORD))
        daemon = Daemon(tmp_path, tmp_path / "logs", env=env)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        daemon.close()


def post(daemon: Daemon, *payloads: dict) -> list:
    return [requests.post(daemon.url + "/cases", data=json.dumps(p), headers=BEARER, timeout=10).json()["status"]
            for p in payloads]


def status(daemon: Daemon) -> dict:
    out = subprocess.run([sys.executable, "-m", "tq_mw_thehive", "status", "-c", str(daemon.config_dir), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def drained(daemon: Daemon, timeout: float = 60) -> dict:
    return wait_for(lambda: (s := status(daemon))["pending"] == 0 and s, timeout, "the inbox to drain", 0.2)


def attributes(tq: ThreatQSimulator, collection: str, object_id: int) -> dict:
    found = {}
    for attribute in tq.attributes_of(collection, object_id):
        assert attribute["name"] not in found, f"two values for {attribute['name']}"
        found[attribute["name"]] = attribute["value"]
    return found


@both_shapes
def test_every_shape_updates_duplicates_order_and_deletes(start, simulators):
    tq, _ = simulators
    daemon = start()
    th5_create, th5_update = sample("th5-case-create.json"), sample("th5-case-update.json")
    th5_obs, th5_ioc = sample("th5-observable-create-ip.json"), sample("th5-observable-update-ioc.json")
    th4_obs, th5v0_case = sample("th4-case-artifact-create.json"), sample("th5v0-case-create.json")
    assert post(daemon, th5_create, th5_update, th5_obs, th5_ioc, th4_obs, th5v0_case) == ["queued"] * 6
    assert drained(daemon)["dead"] == 0
    assert post(daemon, th5_create, th5_update, th5_obs, th4_obs) == ["duplicate"] * 4
    (event,) = tq.events.values()
    assert event["title"] == "Hive Case # ~8396848 Phishing wave targeting finance mailboxes"
    case_attributes = attributes(tq, "events", event["id"])
    assert (case_attributes["Severity"], case_attributes["Status"]) == ("CRITICAL", "InProgress")
    (indicator,) = tq.find_indicators(IP, "IP Address")
    assert attributes(tq, "indicators", indicator["id"]) == {
        "PAP": "AMBER", "Sighted?": "Yes", "Indicator Of Compromise?": "Yes"}
    assert tq.links_of("events", event["id"], "indicators") == [indicator["id"]]

    # An update that TheHive made earlier but that arrives last changes nothing.
    late = copy.deepcopy(th5_update)
    late["_id"], late["_createdAt"] = "~2056001", th5_update["_createdAt"] - 1000
    late["object"]["severity"], late["object"]["severityLabel"] = 1, "LOW"
    assert post(daemon, late) == ["queued"]
    drained(daemon)
    assert attributes(tq, "events", event["id"])["Severity"] == "CRITICAL"
    assert "outcome=stale" in daemon.log_text()

    delete_obs = {"_id": "~2070000", "_type": "Audit", "action": "delete", "objectType": "Observable",
                  "objectId": "~12734592", "rootId": CASE_ID, "_createdAt": 1717500000000,
                  "details": {"dataType": "ip", "data": IP}}
    assert post(daemon, delete_obs, sample("th5-case-delete.json")) == ["queued", "queued"]
    assert drained(daemon)["dead"] == 0
    assert attributes(tq, "events", event["id"])["Status"] == "Deleted"
    assert tq.links_of("events", event["id"], "indicators") == []
    assert len(tq.events) == 1 and len(tq.find_indicators(IP)) == 1
    log = daemon.log_text()
    assert "sync audit=~2048112 case=#142 object=case:~8396848 action=create threatq=events/1 outcome=synced" in log


@both_shapes
def test_a_threatq_outage_then_an_expired_token_lose_and_duplicate_nothing(start, simulators):
    tq, _ = simulators
    daemon = start()
    tq.down = True
    assert post(daemon, sample("th5-case-create.json"), sample("th5-observable-create-ip.json")) == ["queued"] * 2
    wait_for(lambda: "outcome=retry" in daemon.log_text(), 30, "a retry while ThreatQ is down")
    assert status(daemon)["pending"] == 2
    tq.down = False
    assert drained(daemon, 90)["done"] == 2
    tq.expire_all_tokens()
    assert post(daemon, sample("th5-case-update.json"), sample("th5-observable-update-ioc.json")) == ["queued"] * 2
    assert drained(daemon)["done"] == 4
    assert len(tq.events) == 1 and len(tq.find_indicators(IP)) == 1
    (event,) = tq.events.values()
    assert attributes(tq, "events", event["id"])["Severity"] == "CRITICAL"


@both_shapes
def test_incident_mode(start, simulators):
    tq, _ = simulators
    daemon = start(cases_as="incident")
    post(daemon, sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    assert drained(daemon)["done"] == 2
    assert tq.events == {}
    (incident,) = tq.incidents.values()
    assert incident["value"].startswith("Hive Case # ~8396848 ")
    (indicator,) = tq.find_indicators(IP)
    assert tq.links_of("incident", incident["id"], "indicators") == [indicator["id"]]


@both_shapes
def test_only_iocs_and_no_case_without_observables(start, simulators):
    tq, hive = simulators
    daemon = start(only_ioc=True, include_cases_without_observables=False)
    post(daemon, sample("th5-case-create.json"), sample("th5-observable-create-ip.json"))
    drained(daemon)
    assert tq.events == {} and tq.indicators == {}
    post(daemon, sample("th5-observable-update-ioc.json"))
    drained(daemon)
    assert len(tq.events) == 1 and len(tq.find_indicators(IP)) == 1
    assert hive.requests == []  # the case came from the event itself


def _case_change(audit: str, later_ms: int, **fields) -> dict:
    update = sample("th5-case-update.json")
    update["_id"], update["_createdAt"] = audit, update["_createdAt"] + later_ms
    update["object"].update(fields)
    return update


def test_calls_without_public_evidence_refused_warn_once_per_worker_and_dead_letter_nothing(start, simulators,
                                                                                            tmp_path):
    """A ThreatQ that shows the TLP but refuses to change it and to remove tags: every event is
    done, each worker process warns at most once per step, and the state database says so."""
    from tq_mw_thehive.sync_state import threatq_capabilities

    tq, _ = simulators
    tq.refuse = {"source_tlp", "tag_delete"}
    daemon = start()
    changes = [sample("th5-case-create.json"),
               _case_change("~2990001", 1000, tlpLabel="RED", tags=["phishing"]),
               _case_change("~2990002", 2000, tlpLabel="GREEN", tags=["wave-2"]),
               _case_change("~2990003", 3000, tlpLabel="AMBER", tags=[])]
    for done, change in enumerate(changes, 1):  # one at a time: queued together they would coalesce
        assert post(daemon, change) == ["queued"]
        assert wait_for(lambda: (s := status(daemon))["done"] == done and s, 60, "the change to apply",
                        0.2)["dead"] == 0
    (event,) = tq.events.values()
    assert sorted(tq.tags_of("events", event["id"])) == ["finance", "phishing", "wave-2"]
    assert [(s["name"], s["tlp_id"]) for s in tq.sources_of("events", event["id"])] == [("TheHive", 2)]
    log = daemon.log_text()
    for consequence in ("the source keeps the TLP it was created with",
                        "tags removed in TheHive stay on the ThreatQ object"):
        assert 1 <= log.count(consequence) <= 2, consequence  # two worker processes
    found = threatq_capabilities(tmp_path / "tq_mw_thehive.db")
    assert (found["source_tlp"].supported, found["source_tlp"].status) == (False, 405)
    assert (found["tag_delete"].supported, found["tag_delete"].status) == (False, 405)
    assert found["consume:events"].supported


def test_demo_runs_and_shows_what_threatq_holds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tq_mw_thehive", "demo"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ThreatQ now holds 2 events and 18 indicators" in out
    assert "Hive Case # ~8396848 Phishing wave targeting finance mailboxes" in out
    for expected in ("[IP Address] 203.0.113.47  linked to events [1, 2]", "[IPv6 Address] 2001:db8::47",
                     "[SHA-256] 275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f",
                     "[Filename] salary_review.html", "[ASN] AS64500", "Severity: CRITICAL",
                     "Indicator Of Compromise?: Yes", "sources: TheHive (TLP:AMBER)",
                     "[User-agent] python-requests/2.31  linked to events -"):
        assert expected in out, expected
    assert "0 pending, 0 dead" in out
    assert not any(Path(tempdir).exists() for tempdir in
                   [line.split("working directory ")[1] for line in out.splitlines() if "working directory" in line])


def test_a_failed_demo_keeps_its_directory_and_names_the_first_error(monkeypatch):
    from tq_mw_thehive import demo

    made = []

    class RefusingThreatQ(ThreatQSimulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    configure_run = demo.configure.run

    def configure_then_refuse(*args, **kwargs):
        cfg = configure_run(*args, **kwargs)
        made[0].fail_next(10 ** 6, 403)  # every API call from now on: the daemon's events die
        return cfg

    monkeypatch.setattr(demo, "ThreatQSimulator", RefusingThreatQ)
    monkeypatch.setattr(demo.configure, "run", configure_then_refuse)
    with pytest.raises(demo.DemoError) as failed:
        demo.run(out=open(os.devnull, "w"), timeout=60)
    message = str(failed.value)
    assert "event(s) became dead letters" in message
    first = message.split("first error in the daemon's log: ", 1)[1].splitlines()[0]
    assert " ERROR " in first and "outcome=dead" in first
    kept = Path(message.split("kept for you: ", 1)[1].split(" ", 1)[0])
    try:
        assert kept.is_dir() and (kept / "logs" / "tq_mw_thehive.log").is_file()
        assert first in (kept / "logs" / "tq_mw_thehive.log").read_text()
    finally:
        import shutil
        shutil.rmtree(kept, ignore_errors=True)


FAKE_INTEL_PLUGIN = '''
"""A third-party reputation service, stood in by a loopback server the test runs."""
from tq_mw_thehive.enrichment.plugin import PluginError, Result

NAME = "fake_intel"
TITLE = "Fake Intel"
VERSION = "1"
DESCRIPTION = "test stand-in for an external reputation service"
DATA_TYPES = ("ip",)
EXTERNAL = True
ACTIVE = False
API_KEYS = {"FAKE_INTEL": "https://example.invalid/signup"}


def lookup(request):
    response = request.http().get(request.settings["url"] + "/reputation/" + request.value,
                                  headers={"X-Key": request.keys["FAKE_INTEL"]}, timeout=request.timeout)
    if response.status_code != 200:
        raise PluginError(f"HTTP {response.status_code}")
    score = response.json()["score"]
    return Result("malicious" if score > 80 else "info", {"score": score}, {"Fake Intel Score": str(score)})
'''
FAKE_INTEL_KEY = "fake-intel-key-77"


@contextlib.contextmanager
def fake_intel(tmp_path, **enrichment):
    """The fake_intel plugin in a plugin dir and its service on a loopback port, scoring 93:
    yields (the (path, key) of each call, the daemon's enrichment section, its environment)."""
    seen = []

    def intel(environ, start_response):
        seen.append((environ["PATH_INFO"], environ.get("HTTP_X_KEY")))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"score": 93}']

    plugin_dir = tmp_path / "more_plugins"
    plugin_dir.mkdir()
    (plugin_dir / "fake_intel.py").write_text(FAKE_INTEL_PLUGIN)
    with LoopbackServer(intel) as service:
        yield seen, dict(enrichment, plugin_dirs=[str(plugin_dir)], plugins={"fake_intel": {"url": service.url}}), \
            {**os.environ, "TQ_MW_KEY_FAKE_INTEL": FAKE_INTEL_KEY}


@both_shapes
def test_enrichment_reaches_threatq_the_cache_saves_calls_and_tlp_red_never_leaves(start, simulators, tmp_path):
    """The issue's proof: enriched attributes arrive, the second time the cache answers with zero
    network calls, and a TLP:RED value causes no outbound request at all."""
    tq, _ = simulators
    with fake_intel(tmp_path) as (seen, enrichment, env):
        daemon = start(enrichment=enrichment, env=env)
        green = sample("th5-observable-create-ip.json")
        # 203.0.113.47 is a documentation address, which never leaves; use a public one.
        green["object"]["data"], green["object"]["tlpLabel"] = "9.9.9.9", "GREEN"
        assert post(daemon, sample("th5-case-create.json"), green) == ["queued", "queued"]
        assert drained(daemon)["dead"] == 0
        (indicator,) = tq.find_indicators("9.9.9.9", "IP Address")
        found = {a["name"]: a for a in tq.attributes_of("indicators", indicator["id"])}
        assert found["Fake Intel Score"]["value"] == "93"
        assert found["Fake Intel Verdict"]["value"] == "malicious"
        assert found["Fake Intel Score"]["sources"] == [{"name": "fake_intel"}]
        assert found["IP Scope"]["value"] == "global" and found["GeoIP Country"]["value"]
        assert seen == [("/reputation/9.9.9.9", "fake-intel-key-77")]

        again = copy.deepcopy(green)  # the same value in another observable: the cache answers
        again["_id"], again["objectId"], again["object"]["_id"] = "~2999001", "~12999001", "~12999001"
        red = copy.deepcopy(green)
        red["_id"], red["objectId"], red["object"]["_id"] = "~2999002", "~12999002", "~12999002"
        red["object"]["data"], red["object"]["tlpLabel"] = "8.8.4.4", "RED"
        assert post(daemon, again, red) == ["queued", "queued"]
        assert drained(daemon)["dead"] == 0
        assert seen == [("/reputation/9.9.9.9", "fake-intel-key-77")]  # no new call: cache, and RED stayed home
        (red_indicator,) = tq.find_indicators("8.8.4.4", "IP Address")
        names = {a["name"] for a in tq.attributes_of("indicators", red_indicator["id"])}
        assert "Fake Intel Score" not in names and "GeoIP Country" in names
        assert "max_tlp_external" in daemon.log_text()
        assert "fake-intel-key-77" not in daemon.log_text()


@both_shapes
def test_catch_up_at_start_brings_what_was_missed_while_down(start, simulators):
    tq, hive = simulators
    daemon = start()  # the first start only sets the mark
    wait_for(lambda: "catch-up: first start" in daemon.log_text(), 30, "the first catch-up")
    daemon.stop()
    case = hive.add_case(title="Created while the daemon was down", tags=["missed"])
    hive.add_observable(case["_id"], dataType="domain", data="missed.example.net", tlp=1, pap=1)
    daemon.start()
    wait_for(lambda: len(tq.events) == 1 and tq.find_indicators("missed.example.net"), 60,
             "the missed case in ThreatQ")
    (event,) = tq.events.values()
    assert event["title"] == f"Hive Case # {case['_id']} Created while the daemon was down"
    assert "catch-up done cases=1 observables=1 queued=2" in daemon.log_text()


def test_an_unreachable_thehive_delays_catch_up_only(start, simulators, tmp_path):
    tq, hive = simulators
    daemon = start()
    wait_for(lambda: "catch-up: first start" in daemon.log_text(), 30, "the first catch-up")
    daemon.stop()
    hive.fail_next(1000, 503)  # TheHive keeps failing
    daemon.start()
    assert post(daemon, sample("th5-case-create.json")) == ["queued"]
    assert drained(daemon)["done"] == 1 and len(tq.events) == 1
    wait_for(lambda: "catch-up stopped" in daemon.log_text(), 90, "catch-up to give up for now")


def _webhook(kind: str, obj: dict, case: dict) -> dict:
    """TheHive 5's audit event of ``obj``'s last change (stamped just after it)."""
    obj = dict(obj, case=case) if kind == "Observable" else dict(obj)
    stamp = (obj.get("_updatedAt") or obj["_createdAt"]) + 12
    return {"_id": f"~audit-{obj['_id']}", "_type": "Audit", "action": "create", "objectType": kind,
            "objectId": obj["_id"], "rootId": case["_id"], "_createdAt": stamp, "details": {}, "object": obj}


def test_a_lost_webhook_is_found_by_the_periodic_sweep_while_the_daemon_runs(start, simulators, tmp_path):
    tq, hive = simulators
    daemon = start(reconcile_every="2s")
    wait_for(lambda: "catch-up: first start" in daemon.log_text(), 30, "the first catch-up")
    delivered = hive.add_case(title="Delivered")
    assert post(daemon, _webhook("Case", delivered, delivered)) == ["queued"]
    lost = hive.add_case(title="Its webhook was lost")
    hive.add_observable(lost["_id"], dataType="domain", data="lost.example.net", tlp=1, pap=1)
    wait_for(lambda: len(tq.events) == 2 and tq.find_indicators("lost.example.net"), 60,
             "the lost case in ThreatQ, found by a sweep")
    wait_for(lambda: "reconcile done found=0" in daemon.log_text(), 30, "a later sweep that finds nothing more")
    log = daemon.log_text()
    assert log.count("tq_mw_thehive.reconcile: reconcile found=") == 1, log
    assert "reconcile found=2 " in log  # the lost case and its observable; the delivered case is here
    db = sqlite3.connect(f"file:{tmp_path / 'tq_mw_thehive.db'}?mode=ro", uri=True)
    try:
        swept = [r[0] for r in db.execute("SELECT object_id FROM inbox WHERE audit_id LIKE 'backfill:%'")]
    finally:
        db.close()
    assert sorted(swept) == sorted([lost["_id"], next(iter(o for o in hive.observables))])
    text = requests.get(daemon.url + "/metrics", timeout=10).text
    assert "tq_mw_thehive_reconcile_found_total 2.0" in text
    assert 'tq_mw_thehive_reconcile_sweeps_total{outcome="ok"}' in text


def _due_writebacks(state_db) -> int:
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM writeback WHERE due_at IS NOT NULL").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("version", [5, 4])
def test_write_back_tells_thehive_and_its_webhooks_for_our_changes_end_there(start, simulators, version, tmp_path):
    """The loop, end to end: TheHive's simulator sends its webhooks to the daemon, the daemon
    PATCHes TheHive, the simulator sends the audit events of those PATCHes back, and the daemon
    answers them without a ThreatQ call and without writing back again."""
    tq, hive = simulators
    hive.version = version
    daemon = start(writeback={"enabled": True, "case_custom_field": "threatq-url"})
    hive.post_webhooks_to(daemon.url + "/cases", BEARER)
    hive.emit_audits = True
    case = hive.add_case(title="Loop check", tags=["analyst-tag"])
    observable = hive.add_observable(case["_id"], dataType="domain", data="loop.example.net", tlp=1, pap=1)

    def told() -> bool:
        return (any(t.startswith("threatq:indicator=") for t in hive.observables[observable["_id"]]["tags"])
                and any(t.startswith("threatq:event=") for t in hive.cases[case["_id"]]["tags"])
                and "threatq-url" in (hive.cases[case["_id"]].get("customFieldValues") or {}))

    wait_for(told, 60, "the write-back tags and field in TheHive")

    def settled() -> bool:  # every webhook delivered and applied, nothing left to tell TheHive
        hive.drain_webhooks()
        return status(daemon)["pending"] == 0 and _due_writebacks(tmp_path / "tq_mw_thehive.db") == 0

    wait_for(settled, 60, "the echoes of our own changes to be applied", 0.2)
    wait_for(settled, 60, "nothing more after them", 0.2)  # a loop would have queued more by now
    # TheHive 5 names the actor on the audit, TheHive 4 only as the object's updatedBy
    echoes = [a for a in hive.audits if hive.api_user in (a.get("_createdBy"), a["object"].get("updatedBy"))]
    assert len(echoes) == 3  # the observable's tags, the case's tags, the case's field
    ok = [p for p in hive.patches if p["status"] < 300]
    assert len(ok) == 3, hive.patches  # observable tags, case tags, case field: once each, never again
    assert all(p["status"] == 400 and "addTags" in p["body"] for p in hive.patches if p["status"] >= 300)
    (event,) = tq.events.values()
    assert hive.cases[case["_id"]]["customFieldValues"]["threatq-url"].endswith(f"/events/{event['id']}/details")
    assert "analyst-tag" in hive.cases[case["_id"]]["tags"]
    assert tq.tags_of("events", event["id"]) == ["analyst-tag"]
    (indicator,) = tq.find_indicators("loop.example.net")
    assert not [t for t in tq.tags_of("indicators", indicator["id"]) if t.startswith("threatq:")]


@pytest.mark.parametrize("version", [5, 4])
def test_an_alert_and_its_promotion_reach_threatq_as_two_linked_events(start, simulators, version):
    """TheHive's webhooks for an alert, its observable and its import into a case, sent by the
    simulator to a real daemon with ``sync.alerts`` on: one event each, linked, the value once."""
    tq, hive = simulators
    hive.version = version
    daemon = start(alerts=True)
    hive.post_webhooks_to(daemon.url + "/cases", BEARER)
    hive.emit_audits = True
    alert = hive.add_alert(title="Beacon", type="splunk", source="splunk", sourceRef="SPL-9")
    hive.add_alert_observable(alert["_id"], dataType="ip", data=IP, tlp=1, pap=1)
    hive.drain_webhooks()
    wait_for(lambda: len(tq.find_indicators(IP)) == 1, 60, "the alert's indicator")
    hive.promote_alert(alert["_id"])
    hive.drain_webhooks()
    assert not hive.webhook_errors
    drained(daemon)
    titles = sorted(e["title"].split(" #")[0] for e in tq.events.values())
    assert titles == ["Hive Alert", "Hive Case"]
    alert_event, case_event = sorted(tq.events.values(), key=lambda e: e["title"])
    assert tq.links_of("events", alert_event["id"], "events") == [case_event["id"]]
    (indicator,) = tq.find_indicators(IP)
    assert sorted(tq.links_of("indicators", indicator["id"], "events")) == sorted([alert_event["id"], case_event["id"]])
    assert status(daemon)["dead"] == 0


def test_a_lookup_over_quota_is_queued_and_the_daemon_lands_it_when_quota_returns(start, simulators, tmp_path):
    """The daemon's own drainer thread: an observable over its plugin's daily quota syncs without
    the plugin's attribute, and gets it once the quota returns (the day's calls forgotten here)."""
    tq, _ = simulators
    with fake_intel(tmp_path, limits={"fake_intel": {"per_day": 1}}) as (seen, enrichment, env):
        daemon = start(enrichment=enrichment, env=env)
        observables = []
        for n, value in enumerate(("9.9.9.9", "1.1.1.1")):
            event = sample("th5-observable-create-ip.json")
            event["_id"], event["objectId"] = f"~audit-{n}", f"~obs-{n}"
            event["object"].update({"_id": f"~obs-{n}", "data": value, "tlpLabel": "GREEN"})
            observables.append(event)
        assert post(daemon, sample("th5-case-create.json"), observables[0]) == ["queued", "queued"]
        drained(daemon)
        assert post(daemon, observables[1]) == ["queued"]
        assert drained(daemon)["dead"] == 0

        def score(value: str):
            (indicator,) = tq.find_indicators(value, "IP Address")
            return {a["name"]: a["value"] for a in tq.attributes_of("indicators", indicator["id"])}.get(
                "Fake Intel Score")

        assert (score("9.9.9.9"), score("1.1.1.1"), len(seen)) == ("93", None, 1)  # the day's one call
        db = sqlite3.connect(tmp_path / "tq_mw_thehive.db")
        try:
            assert db.execute("SELECT value FROM enrichment_deferred").fetchall() == [("1.1.1.1",)]
            with db:  # a new UTC day: the day's calls forgotten, the lookup due
                db.execute("DELETE FROM quota_calls")
                db.execute("UPDATE enrichment_deferred SET due_at = 0")
        finally:
            db.close()
        wait_for(lambda: score("1.1.1.1") == "93", 60, "the queued lookup to land")
        assert [path for path, _ in seen] == ["/reputation/9.9.9.9", "/reputation/1.1.1.1"]
        text = requests.get(daemon.url + "/metrics", timeout=10).text
        assert 'tq_mw_thehive_enrichment_deferred{plugin="fake_intel"} 0.0' in text
