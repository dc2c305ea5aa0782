"""Two daemons, one PostgreSQL state: the deployment for more than one host (docs/deployment.md).

Real gunicorn daemons on two loopback ports share one real PostgreSQL server (``pg_url``: a schema
of its own per test). Webhooks go to either daemon in any mix, one daemon is SIGKILLed (master and
workers) in the middle of a burst, PostgreSQL itself goes away and comes back; each time every
accepted event must land in ThreatQ exactly once, in TheHive's order per case, and nothing dies.
"""
from __future__ import annotations

import itertools
import json
import re
import signal
from pathlib import Path
from typing import List

import pytest
import requests

from conftest import write_config
from test_faults import (BEARER, EMAIL, HIVE_KEY, HIVE_URL, PASSWORD, assert_session_once, make_case, post)
from tq_mw_thehive import state_postgres
from tq_mw_thehive.state_postgres import PostgresURL
from tq_mw_thehive.testing.daemon import Daemon, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.postgres import PostgresServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

pytestmark = pytest.mark.e2e

LEASE_S = 3


@pytest.fixture
def tq():
    # 20 ms a call, as a ThreatQ on the LAN: a burst keeps events in flight long enough to kill them.
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, latency_ms=20)
    with LoopbackServer(sim.app) as server:
        sim.url = server.url
        yield sim


def make_daemon(config_dir: Path, tq: ThreatQSimulator, state_db: str) -> Daemon:
    """A daemon of its own configuration directory (another host, as far as it knows)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    write_config(config_dir, threatq={"host": tq.url, "client_id": tq.client_id},
                 thehive={"url": HIVE_URL, "api_key": HIVE_KEY},
                 sync={"catch_up": False, "lease": f"{LEASE_S}s"}, enrichment={"enabled": False},
                 state_db=state_db)
    tq_auth.save_tokens(config_dir, tq_auth.password_grant(tq.url, tq.client_id, EMAIL, PASSWORD))
    return Daemon(config_dir, config_dir / "logs", workers=2)


def rows(url: str) -> List[dict]:
    return [dict(zip(r.keys(), r)) for r in state_postgres.database(PostgresURL(url), 5).execute(
        "SELECT * FROM inbox ORDER BY id")]


def drained(url: str, expected: int, timeout: float = 60) -> List[dict]:
    def finished():
        found = rows(url)
        return len(found) == expected and all(r["state"] != "pending" for r in found) and found

    found = wait_for(finished, timeout, f"{expected} events to finish", 0.1)
    assert [r for r in found if r["state"] != "done"] == []
    return found


def applied_in_order(tq: ThreatQSimulator, cases) -> None:
    """Each case's update (CRITICAL) was applied after its create: a reversed pair would leave the
    create's severity; and its observables after the case (they link to its one event)."""
    assert_session_once(tq, cases)


@pytest.fixture
def daemons(tmp_path, tq, pg_url):
    started: List[Daemon] = []

    def start(name: str) -> Daemon:
        daemon = make_daemon(tmp_path / name, tq, pg_url)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.close()
    state_postgres.close_all()


def test_two_daemons_take_webhooks_in_any_mix_and_each_event_lands_once_in_order(daemons, tq, pg_url):
    a, b = daemons("host-a"), daemons("host-b")
    cases = [make_case(i) for i in range(1, 7)]
    doors = itertools.cycle([a, b, b, a, a, b, a])  # the same case's events through both, in TheHive's order
    for case in cases:
        for payload in case.session:
            assert post(next(doors), payload) == ["queued"]
    # A webhook TheHive sends twice, to each daemon once, is one event.
    assert post(b, cases[0].create) == ["duplicate"]
    found = drained(pg_url, 4 * len(cases))
    assert len({r["dedup_key"] for r in found}) == len(found)
    applied_in_order(tq, cases)
    # Both did work: the load was shared, not merely accepted by both.
    assert "outcome=synced" in a.log_text() and "outcome=synced" in b.log_text()


def test_a_daemon_sigkilled_mid_burst_the_other_finishes_its_events_after_the_lease(daemons, tq, pg_url):
    a, b = daemons("host-a"), daemons("host-b")
    cases = [make_case(i) for i in range(1, 11)]
    tq.latency_ms = 150  # every ThreatQ call slow: a's events are in flight when it dies
    for case in cases[:5]:
        assert post(a, *case.session) == ["queued"] * 4
    pids = [int(p) for p in re.findall(r"worker ready pid=(\d+)", a.log_text())]

    def a_holds_a_lease():
        return any(r["lease_owner"] and int(r["lease_owner"].rpartition(":")[2]) in pids
                   for r in rows(pg_url) if r["state"] == "pending")

    wait_for(a_holds_a_lease, 30, "daemon a to lease an event", 0.02)
    a.kill(signal.SIGKILL)
    held = [r["id"] for r in rows(pg_url) if r["state"] == "pending" and r["lease_owner"]
            and int(r["lease_owner"].rpartition(":")[2]) in pids]
    assert held, "no event was in flight in daemon a when it died"
    tq.latency_ms = 20
    for case in cases[5:]:  # new traffic goes to b, which was up throughout
        assert post(b, *case.session) == ["queued"] * 4
    found = drained(pg_url, 4 * len(cases), timeout=90)
    by_id = {r["id"]: r for r in found}
    assert all(by_id[i]["state"] == "done" for i in held)
    applied_in_order(tq, cases)  # exactly once: a's half-done events were redone idempotently


def test_postgresql_unreachable_webhooks_get_503_then_everything_recovers(tmp_path, tq):
    server = PostgresServer(tmp_path / "pg")
    server.start()
    try:
        url = server.create_database("tq_state")
        daemon = make_daemon(tmp_path / "host-a", tq, url)
        daemon.start()
        try:
            first, second = make_case(1), make_case(2)
            tq.down = True  # the first case's events wait in the inbox, retried, through the outage
            assert post(daemon, *first.session) == ["queued"] * 4
            wait_for(lambda: "outcome=retry" in daemon.log_text(), 30, "a first failed attempt")
            server.kill()
            answer = requests.post(daemon.url + "/cases", data=json.dumps(second.create), headers=BEARER, timeout=30)
            assert answer.status_code == 503, answer.text
            assert "password" not in answer.text.lower()
            health = requests.get(daemon.url + "/healthz", timeout=30)
            assert health.status_code == 503
            tq.down = False
            server.start()
            wait_for(lambda: requests.get(daemon.url + "/healthz", timeout=30).status_code == 200, 30,
                     "healthz to recover once PostgreSQL is back")
            assert daemon.proc.poll() is None and "Traceback" not in daemon.log_text()
            assert post(daemon, *second.session) == ["queued"] * 4
            drained(url, 8)
            applied_in_order(tq, [first, second])
        finally:
            daemon.close()
    finally:
        state_postgres.close_all()
        server.stop("immediate")
