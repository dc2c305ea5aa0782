"""``tq-mw-thehive demo``: the whole product on one machine, with nothing to set up.

It starts the ThreatQ simulator on a free loopback port, runs the configuration
against it in a temporary directory, starts the real daemon (gunicorn, as
production runs it), replays a realistic TheHive session (cases, one observable of
every default type, updates, a delete, in TheHive 4 and 5 shapes), waits until the
inbox drains, and prints what ThreatQ now holds.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, TextIO

import requests

from tq_mw_thehive import configure
from tq_mw_thehive.config import Config
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.testing.daemon import Daemon, DaemonTimeout, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import INDICATOR_TYPES, ThreatQSimulator

EMAIL, PASSWORD = "demo@example.org", "demo-password-not-stored"
CASE = {
    "_id": "~8396848", "_type": "Case", "_createdBy": "jdoe@soc.example.org", "_createdAt": 1717430400480,
    "number": 142, "title": "Phishing wave targeting finance mailboxes",
    "description": "Several users in finance reported a credential-harvesting mail.",
    "severity": 3, "severityLabel": "HIGH", "startDate": 1717429800000, "tags": ["phishing", "finance"],
    "flag": False, "tlp": 2, "tlpLabel": "AMBER", "pap": 2, "papLabel": "AMBER", "status": "New",
    "stage": "New", "assignee": "jdoe@soc.example.org",
}
ORG = {"organisationId": "~4120", "organisation": "acme-soc"}
# One observable of every default TheHive type (and one that is not mapped).
OBSERVABLES = [
    ("ip", "203.0.113.47", "IP hosting the credential-harvesting page"),
    ("ip", "2001:db8::47", "IPv6 address of the same host"),
    ("domain", "login-finance.example.net", "Phishing domain"),
    ("fqdn", "portal.login-finance.example.net", "Landing host"),
    ("hostname", "mx1.example.net", "Sending mail server"),
    ("url", "https://portal.login-finance.example.net/o365/login", "Credential form"),
    ("mail", "payroll@login-finance.example.net", "Sender"),
    ("mail-subject", "Action required: salary review", "Lure subject"),
    ("filename", "salary_review.html", "Attachment name"),
    ("uri_path", "/o365/login", "Form path"),
    ("user-agent", "python-requests/2.31", "Scanner seen on the landing page"),
    ("registry", r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run\updater", "Persistence key"),
    ("autonomous-system", "AS64500", "Hosting network"),
    ("hash", "44d88612fea8a8f36de82e1278abb02f", "Dropper (MD5)"),
    ("hash", "3395856ce81f2b7382dee72602f798b642f14140", "Dropper (SHA-1)"),
    ("hash", "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f", "Dropper (SHA-256)"),
    ("other", "free text note", "Not an indicator: skipped"),
]


def _case_event(audit_id: str, action: str, ts: int, case: dict, details: dict) -> dict:
    return {"_id": audit_id, "_type": "Audit", "_createdBy": case["assignee"], "_createdAt": ts,
            "action": action, "mainAction": True, "requestId": f"demo:{audit_id}", "objectId": case["_id"],
            "objectType": "Case", "rootId": case["_id"], "details": details, "object": case,
            "context": case, "organisation": ORG}


def _observable(index: int, data_type: str, data: Optional[str], message: str, ts: int) -> dict:
    obs = {"_id": f"~1273{index:04d}", "_type": "Observable", "_createdBy": "mroe@soc.example.org",
           "_createdAt": ts, "dataType": data_type, "startDate": ts, "tlp": 2, "tlpLabel": "AMBER",
           "pap": 2, "papLabel": "AMBER", "tags": ["phishing-wave"], "ioc": False, "sighted": True,
           "message": message, "reports": {}, "extraData": {}, "ignoreSimilarity": False}
    if data is not None:
        obs["data"] = data
    return obs


def _observable_event(audit_id: str, action: str, ts: int, obs: dict, case: dict, details: dict) -> dict:
    obj = dict(obs, case=case)
    return {"_id": audit_id, "_type": "Audit", "_createdBy": "mroe@soc.example.org", "_createdAt": ts,
            "action": action, "mainAction": True, "requestId": f"demo:{audit_id}", "objectId": obs["_id"],
            "objectType": "Observable", "rootId": case["_id"], "details": details, "object": obj,
            "context": obj, "organisation": ORG}


def scenario() -> Iterator[dict]:
    """The TheHive session the demo replays, in the order TheHive would send it."""
    ts = CASE["_createdAt"]
    case = dict(CASE)
    yield _case_event("~3000001", "create", ts + 20, case, dict(case))
    updated = dict(case, severity=4, severityLabel="CRITICAL", status="InProgress", stage="InProgress",
                   _updatedAt=ts + 3_600_000)
    yield _case_event("~3000002", "update", ts + 3_600_010, updated, {"severity": 4, "status": "InProgress"})
    observables = []
    for i, (data_type, data, message) in enumerate(OBSERVABLES):
        obs = _observable(i, data_type, data, message, ts + 3_700_000 + i)
        observables.append(obs)
        yield _observable_event(f"~31{i:05d}", "create", obs["_createdAt"] + 5, obs, updated, dict(obs))
    attachment = _observable(len(OBSERVABLES), "file", None, "Attachment of the lure mail", ts + 3_800_000)
    attachment["attachment"] = {"name": "salary_review.html", "size": 18311, "contentType": "text/html",
                                "id": "a1b2c3", "hashes": [
                                    "8c6b8ad9a0b7d4f9e1a2c3b4d5e6f708",
                                    "d2c1b0a9f8e7d6c5b4a39281706f5e4d3c2b1a09"]}
    yield _observable_event("~3200000", "create", ts + 3_800_005, attachment, updated, dict(attachment))
    flagged = dict(observables[0], ioc=True, _updatedAt=ts + 3_900_000)
    yield _observable_event("~3300000", "update", ts + 3_900_010, flagged, updated, {"ioc": True})
    # A TheHive 4 instance (webhook version 0) reporting the same IP on another case.
    th4_case = {"_id": "~8400000", "id": "~8400000", "_type": "case", "caseId": 143,
                "title": "Suspicious logins from hosting range", "description": "Impossible travel alerts.",
                "severity": 2, "startDate": ts + 4_000_000, "tags": ["identity"], "flag": True, "tlp": 1,
                "pap": 1, "status": "Open", "owner": "akim@soc.example.org", "createdAt": ts + 4_000_000}
    th4_obs = {"_id": "~12800000", "id": "~12800000", "_type": "case_artifact", "dataType": "ip",
               "data": "203.0.113.47", "tlp": 1, "tags": ["login-source"], "ioc": True, "sighted": False,
               "message": "Source of the impossible-travel logins", "startDate": ts + 4_000_100,
               "case": th4_case}
    yield {"operation": "create", "objectType": "case_artifact", "objectId": th4_obs["_id"], "base": True,
           "startDate": ts + 4_000_110, "rootId": th4_obs["_id"], "requestId": "demo:th4-1",
           "details": dict(th4_obs), "object": th4_obs, "organisationId": "~4120", "organisation": "acme-soc"}
    gone = observables[10]  # the user-agent turned out to be our own scanner
    yield {"_id": "~3400000", "_type": "Audit", "_createdBy": "jdoe@soc.example.org",
           "_createdAt": ts + 5_000_000, "action": "delete", "mainAction": True, "requestId": "demo:del",
           "objectId": gone["_id"], "objectType": "Observable", "rootId": case["_id"],
           "details": {"dataType": gone["dataType"], "data": gone["data"]}, "organisation": ORG}


class DemoError(Exception):
    pass


def summary(sim: ThreatQSimulator, counts: Dict[str, object], host: str) -> str:
    """What ThreatQ holds now, readable: objects, attributes, TLP, tags, links."""
    tlp = {1: "RED", 2: "AMBER", 3: "GREEN", 4: "WHITE"}
    types = {i: name for i, (name, _) in enumerate(INDICATOR_TYPES, 1)}
    lines: List[str] = []

    def describe(collection: str, object_id: int) -> None:
        sources = ", ".join(f"{s['name']} (TLP:{tlp.get(s.get('tlp_id'), '?')})"
                            for s in sim.sources_of(collection, object_id))
        lines.append(f"      sources: {sources or '-'}")
        tags = ", ".join(sim.tags_of(collection, object_id))
        lines.append(f"      tags: {tags or '-'}")
        for attribute in sim.attributes_of(collection, object_id):
            lines.append(f"      {attribute['name']}: {attribute['value']}")

    lines.append(f"ThreatQ now holds {len(sim.events)} events and {len(sim.indicators)} indicators:")
    for event_id, event in sorted(sim.events.items()):
        lines.append(f"  event {event_id}: {event['title']}  ({host}/events/{event_id}/details)")
        lines.append(f"      happened_at: {event['happened_at']}")
        describe("events", event_id)
        linked = sim.links_of("events", event_id, "indicators")
        lines.append(f"      linked indicators: {len(linked)}")
    for indicator_id, indicator in sorted(sim.indicators.items()):
        events = sorted(sim.links_of("indicators", indicator_id, "events"))  # two workers: any order
        lines.append(f"  indicator {indicator_id}: [{types.get(indicator['type_id'], '?')}] {indicator['value']}"
                     f"  linked to events {events or '-'}")
        describe("indicators", indicator_id)
    lines.append(f"Inbox: {counts['done']} done, {counts['pending']} pending, {counts['dead']} dead.")
    return "\n".join(lines)


def first_error(log_file: Path) -> Optional[str]:
    """The daemon log's first ERROR or CRITICAL line: the cause, where later lines repeat it."""
    try:
        with open(log_file, encoding="utf-8", errors="replace") as lines:
            return next((line.rstrip() for line in lines if " ERROR " in line or " CRITICAL " in line), None)
    except OSError:
        return None


def _failure(what: str, work: Path, daemon: Daemon) -> DemoError:
    """A failed demo keeps its directory: the message names it and the daemon's first error."""
    cause = first_error(daemon.log_file)
    return DemoError(f"{what}\n  first error in the daemon's log: {cause or '(none)'}\n"
                     f"  kept for you: {work} (the daemon's log: {daemon.log_file})")


def run(out: TextIO = sys.stdout, keep: bool = False, timeout: float = 120.0) -> int:
    """Run the demo; 0 when every event reached ThreatQ (or was deliberately skipped).

    Raises DemoError when it did not, after keeping the working directory for a look.
    """
    sim = ThreatQSimulator(users={EMAIL: PASSWORD})
    work = Path(tempfile.mkdtemp(prefix="tq-mw-demo-"))
    daemon = Daemon(work, work / "logs", verbosity="2")
    succeeded = False
    try:
        with LoopbackServer(sim.app) as threatq:
            print(f"ThreatQ simulator on {threatq.url}; working directory {work}", file=out)
            answers = configure.Answers(threatq_host=threatq.url, client_id=sim.client_id, email=EMAIL,
                                        password=PASSWORD, thehive_url="http://127.0.0.1:9",
                                        thehive_api_key="demo-thehive-key")
            cfg: Config = configure.run(answers, work, listener_ip="127.0.0.1", port=0, disable_ssl=False,
                                        use_proxy=False, interactive=False, out=io.StringIO())
            daemon.start()
            url = f"{daemon.url}/cases"
            headers = {"Authorization": f"Bearer {cfg.webhook.token}", "Content-Type": "application/json"}
            sent = 0
            for payload in scenario():
                response = requests.post(url, data=json.dumps(payload), headers=headers, timeout=10)
                if response.status_code != 200:
                    raise DemoError(f"the daemon answered {response.status_code}: {response.text}")
                sent += 1
            print(f"Posted {sent} TheHive webhook events to {url}; waiting for the inbox to drain…", file=out)
            inbox = Inbox(cfg.state_db)
            wait_for(lambda: inbox.stats()["pending"] == 0, timeout, "the inbox to drain", interval=0.1)
            counts = inbox.stats()
            inbox.close()
            print(summary(sim, counts, threatq.url), file=out)
            if counts["dead"]:
                raise DemoError(f"{counts['dead']} event(s) became dead letters")
            if keep:
                print(f"Daemon log: {daemon.log_file}", file=out)
            succeeded = True
            return 0
    except (DaemonTimeout, requests.RequestException, DemoError) as exc:
        raise _failure(str(exc), work, daemon) from None
    finally:
        daemon.stop()
        if succeeded and not keep:
            shutil.rmtree(work, ignore_errors=True)

