"""GET /metrics on the real daemon: gunicorn with 2 workers, real HTTP, the ThreatQ simulator.

Whichever worker answers a scrape, the totals are those of every worker; a worker killed and
restarted by gunicorn neither loses nor double-counts; a new daemon start counts from zero.
Each wait is a poll with a deadline; every process started here is stopped in a finally or
fixture teardown; every listener is on 127.0.0.1.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import WEBHOOK_TOKEN, sample, write_config
from conftest import MetricSamples as Samples, metric_value as value, parse_metrics as parse
from tq_mw_thehive import metrics
from tq_mw_thehive.testing.daemon import Daemon, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

pytestmark = pytest.mark.e2e

EMAIL, PASSWORD = "metrics@example.org", "metrics-password-31"
HIVE_URL = "http://127.0.0.1:9"  # never called: every event here embeds its case (a closed port)
BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
P = metrics.PREFIX
FAULTS = 5
TERMINAL_EXCLUDED = ("retry", "lease_lost")  # attempts that leave the event pending


def total(samples: Samples, name: str, **fixed: str) -> float:
    """The sum over every label set of ``name`` that has the ``fixed`` labels."""
    return sum(v for (n, labels), v in samples.items()
               if n == P + name and all((k, fixed[k]) in labels for k in fixed))


def scrape(url: str) -> Samples:
    # A new connection each time (no session): the kernel hands it to either worker.
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def case_event(i: int) -> dict:
    """A TheHive 5 case creation of its own case: every one is queued, none waits for another."""
    event = copy.deepcopy(sample("th5-case-create.json"))
    case_id = f"~77{i:05d}"
    event["_id"], event["objectId"], event["rootId"] = f"~66{i:05d}", case_id, case_id
    for part in ("details", "object"):
        if isinstance(event.get(part), dict):
            event[part]["_id"], event[part]["number"] = case_id, 5000 + i
            event[part]["title"] = f"Metrics case {i}"
    event.pop("requestId", None)
    return event


def post(url: str, payload, headers=BEARER) -> requests.Response:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return requests.post(url + "/cases", data=data, headers=headers, timeout=10)


def received_by_process(directory: Path) -> Dict[str, float]:
    """events_received per worker pid, read from a copy of each process's counter file."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        one = directory.parent / f".one-{path.stem}"
        one.mkdir(exist_ok=True)
        shutil.copy(path, one / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))
        counts[path.stem.split("_")[1]] = value(parse(generate_latest(registry).decode()), "events_received_total")
        shutil.rmtree(one)
    return counts


def status(config_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "tq_mw_thehive", "status", "-c", str(config_dir), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def worker_pids(daemon: Daemon) -> List[int]:
    return [int(p) for p in re.findall(r"worker ready pid=(\d+)", daemon.log_text())]


def assert_every_scrape(url: str, expected: Dict[str, float], scrapes: int = 8) -> Samples:
    """The webhook totals are the same whichever worker answers."""
    samples: Samples = {}
    for _ in range(scrapes):
        samples = scrape(url)
        got = {name: total(samples, name) if "reason" not in name else
               value(samples, "events_rejected_total", reason=name.split("=")[1]) for name in expected}
        assert got == expected
    return samples


@pytest.fixture
def threatq():
    tq = ThreatQSimulator(users={EMAIL: PASSWORD})
    with LoopbackServer(tq.app) as server:
        tq.url = server.url
        yield tq


@pytest.fixture
def daemon(tmp_path, threatq):
    write_config(tmp_path, threatq={"host": threatq.url, "client_id": threatq.client_id},
                 thehive={"url": HIVE_URL, "api_key": "metrics-hive-key"}, sync={"catch_up": False},
                 enrichment={"enabled": False})
    tq_auth.save_tokens(tmp_path, tq_auth.password_grant(threatq.url, threatq.client_id, EMAIL, PASSWORD))
    d = Daemon(tmp_path, tmp_path / "logs", workers=2)
    try:
        yield d.start()
    finally:
        d.close()


def test_totals_agree_across_workers_restarts_and_threatq_failures(daemon, threatq, tmp_path):
    directory = tmp_path / metrics.DIRECTORY_NAME
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    url = daemon.url

    # ThreatQ down: every event stays in the inbox, so its depth is known exactly.
    threatq.down = True
    n = 0
    while n < 10 or len([c for c in received_by_process(directory).values() if c > 0]) < 2:
        assert n < 200, f"one worker took every webhook: {received_by_process(directory)}"
        assert post(url, case_event(n)).json()["status"] == "queued"
        n += 1
    assert post(url, case_event(0)).json()["status"] == "duplicate"
    task = {"_id": "~1", "_type": "Audit", "action": "create", "objectType": "Task", "objectId": "~2"}
    assert post(url, task).json()["status"] == "ignored"
    assert post(url, case_event(0), headers={"Content-Type": "application/json"}).status_code == 401
    assert post(url, "{broken").status_code == 400
    webhook = {"events_received_total": n + 4, "events_queued_total": n, "events_duplicate_total": 1,
               "events_ignored_total": 1, "reason=unauthorized": 1, "reason=invalid": 1}
    samples = assert_every_scrape(url, webhook)
    assert value(samples, "inbox_depth") == status(tmp_path)["pending"] == n
    wait_for(lambda: total(scrape(url), "threatq_request_errors_total", status="503") >= 1, 60,
             "ThreatQ's 503s in /metrics")

    # ThreatQ back, but its next FAULTS answers are 500: each is one error, and every event still ends.
    threatq.fail_next(FAULTS, 500)
    threatq.down = False
    wait_for(lambda: status(tmp_path)["pending"] == 0, 120, "the inbox to drain", 0.3)
    samples = assert_every_scrape(url, webhook)
    assert total(samples, "threatq_request_errors_total", status="500") == FAULTS
    assert value(samples, "threatq_request_duration_seconds_count", method="POST", endpoint="/api/events/consume") >= n
    assert not any("/api/events/1" in str(labels) for (_, labels) in samples)  # templates, not raw ids
    processed = {labels[0][1]: v for (name, labels), v in samples.items() if name == P + "events_processed_total"}
    assert sum(v for o, v in processed.items() if o not in TERMINAL_EXCLUDED) == n, processed
    assert processed.get("dead", 0) == 0 and processed.get("synced", 0) == n
    assert value(samples, "inbox_depth") == 0
    assert value(samples, "inbox_events", state="done") == status(tmp_path)["done"] == n

    # A worker killed and restarted by gunicorn: its counts stay, nothing is counted twice.
    before = worker_pids(daemon)
    os.kill(before[0], signal.SIGKILL)
    wait_for(lambda: len(worker_pids(daemon)) == len(before) + 1, 60, "gunicorn to start a new worker")
    assert_every_scrape(url, webhook)
    for i in range(n, n + 3):
        assert post(url, case_event(i)).json()["status"] == "queued"
    webhook.update({"events_received_total": n + 7, "events_queued_total": n + 3})
    wait_for(lambda: status(tmp_path)["pending"] == 0, 60, "the new events to drain", 0.3)
    samples = assert_every_scrape(url, webhook)
    assert value(samples, "events_processed_total", outcome="synced") == n + 3
    assert "Traceback" not in daemon.log_text()


def test_a_new_daemon_start_counts_from_zero(daemon, threatq, tmp_path):
    threatq.down = True  # the events stay pending: the inbox depth holds still while compared
    for i in range(3):
        post(daemon.url, case_event(i))
    assert value(scrape(daemon.url), "events_received_total") == 3
    daemon.stop()
    again = Daemon(daemon.config_dir, daemon.log_dir, workers=2).start()
    try:
        post(again.url, case_event(3))
        assert value(scrape(again.url), "events_received_total") == 1
        assert value(scrape(again.url), "inbox_depth") == status(tmp_path)["pending"] == 4
    finally:
        again.close()


@pytest.mark.parametrize("settings", [[], ["-c", "python:tq_mw_thehive.gunicorn_conf"]],
                         ids=["as-the-guide-writes-it", "with-our-gunicorn-settings"])
def test_plain_gunicorn_with_tq_driver_adds_up_its_workers_and_restarts_from_zero(config_dir, tmp_path, settings):
    for run, events in enumerate((4, 2)):
        output = tmp_path / f"gunicorn-{run}.txt"
        with open(output, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gunicorn", *settings, "-b", "127.0.0.1:0", "-w", "2",
                                     f'tq_mw_thehive.tq_driver:run(c="{config_dir}")'],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
        try:
            port = wait_for(lambda: (m := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)",
                                                    output.read_text())) and int(m.group(1)), 60,
                            "gunicorn's Listening line")
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: output.read_text().count("Booting worker") >= 2, 60, "two workers")
            for i in range(events):
                event = case_event(100 * run + i)
                wait_for(lambda: _posted(url, event), 30, "a queued event")
            for _ in range(6):
                samples = scrape(url)
                assert value(samples, "events_received_total") == events
                assert value(samples, "events_queued_total") == events
                assert value(samples, "inbox_depth") == status(config_dir)["pending"]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 0


def _posted(url: str, event: dict) -> bool:
    try:
        return post(url, event).status_code == 200
    except requests.ConnectionError:
        return False
