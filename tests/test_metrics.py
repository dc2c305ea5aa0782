"""GET /metrics: each metric moves as events flow (Flask test client, `responses`, stand-in plugins),
and the multiprocess files add up across forked processes the way gunicorn workers use them."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import responses
from prometheus_client.parser import text_string_to_metric_families

from conftest import WEBHOOK_TOKEN, minimal_config, sample, sample_text
from conftest import MetricSamples as Samples, metric_value as value, parse_metrics as parse
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import metrics, state, web
from tq_mw_thehive.enrichment.plugin import NotFound
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync import Outcome
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import auth
from tq_mw_thehive.threatq.api import ThreatQClient, ThreatQUnavailable
from tq_mw_thehive.worker import Worker
from tq_mw_thehive.services import Services

BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
P = metrics.PREFIX


def current() -> Samples:
    return parse(metrics.exposition().decode("utf-8"))


def make_app(tmp_path: Path, **sections):
    cfg = config_mod.from_dict(minimal_config(**sections), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    return web.create_app(Services(cfg, inbox)), inbox, cfg


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.get_data(as_text=True))


# ------------------------------------------------------------------ the webhook path


def test_metrics_lists_every_family_without_authentication(tmp_path):
    app, _, _ = make_app(tmp_path)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    names = {family.name for family in text_string_to_metric_families(text)}
    for expected in ("events_received", "events_queued", "events_duplicate", "events_ignored", "events_rejected",
                     "events_processed", "threatq_request_duration_seconds", "threatq_request_errors",
                     "enrichment_cache_hits", "enrichment_cache_misses", "enrichment_plugin_duration_seconds",
                     "inbox_depth", "inbox_events", "inbox_oldest_pending_age_seconds"):
        assert P + expected in names, expected
    samples = parse(text)
    for reason in metrics.REJECT_REASONS:  # every reason is a series from the start, at 0
        assert (P + "events_rejected_total", (("reason", reason),)) in samples


def test_each_webhook_outcome_moves_its_counter(tmp_path):
    app, _, _ = make_app(tmp_path, webhook={"max_body_mb": 0.01})
    client = app.test_client()
    before = scrape(client)
    assert client.post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER).json["status"] == "queued"
    assert client.post("/cases", data=sample_text("th5-case-update.json"), headers=BEARER).json["status"] == "queued"
    assert client.post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER).json["status"] == "duplicate"
    task = {"_id": "~1", "_type": "Audit", "action": "create", "objectType": "Task", "objectId": "~2"}
    assert client.post("/cases", json=task, headers=BEARER).json["status"] == "ignored"
    assert client.post("/cases", data=sample_text("th5-case-create.json")).status_code == 401
    assert client.post("/cases", data="{not json", headers=BEARER).status_code == 400
    assert client.post("/cases", data="x" * 20_000, headers=BEARER).status_code == 413
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("events_received_total") == 7
    assert delta("events_queued_total") == 2
    assert delta("events_duplicate_total") == 1
    assert delta("events_ignored_total") == 1
    assert {r: delta("events_rejected_total", reason=r) for r in metrics.REJECT_REASONS} == {
        "unauthorized": 1, "invalid": 1, "too_large": 1, "unavailable": 0}


def test_a_database_that_cannot_take_the_event_counts_as_unavailable(tmp_path, monkeypatch):
    app, inbox, _ = make_app(tmp_path)

    def locked(*_args, **_kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(inbox, "put", locked)
    client = app.test_client()
    before = value(current(), "events_rejected_total", reason="unavailable")
    assert client.post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER).status_code == 503
    assert value(current(), "events_rejected_total", reason="unavailable") == before + 1


def test_inbox_depth_is_read_from_the_database_at_scrape_time(tmp_path):
    app, inbox, cfg = make_app(tmp_path)
    client = app.test_client()
    for name in ("th5-case-create.json", "th5-case-update.json", "th5-observable-create-ip.json"):
        client.post("/cases", data=sample_text(name), headers=BEARER)
    samples = scrape(client)
    assert value(samples, "inbox_depth") == inbox.stats()["pending"] == 3
    assert value(samples, "inbox_events", state="queued") == 3
    item = inbox.claim("test:1")
    inbox.done(item.id, "test:1")
    # Another Inbox on the same file (as another process would write it) is seen at the next scrape.
    other = Inbox(cfg.state_db)
    item = other.claim("test:2")
    other.dead(item.id, "test:2", "broken")
    samples = scrape(client)
    assert value(samples, "inbox_depth") == 1
    assert value(samples, "inbox_events", state="done") == 1
    assert value(samples, "inbox_events", state="dead") == 1
    assert value(samples, "inbox_oldest_pending_age_seconds") >= 0


def test_a_locked_database_leaves_out_the_inbox_but_the_scrape_still_answers(tmp_path, monkeypatch):
    app, inbox, _ = make_app(tmp_path)

    def broken():
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(inbox, "stats", broken)
    samples = scrape(app.test_client())
    assert (P + "inbox_depth", ()) not in samples
    assert (P + "events_received_total", ()) in samples


# ------------------------------------------------------------------ the worker


class Scripted:
    def __init__(self, *script) -> None:
        self.script = list(script)

    def handle(self, item):
        result = self.script.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def test_each_processing_outcome_is_counted(tmp_path):
    cfg = config_mod.from_dict(minimal_config(sync={"max_attempts": 2}), tmp_path)
    state.open_state(cfg.state_db).close()
    inbox = Inbox(cfg.state_db)
    scripted = Scripted(Outcome("synced"), Outcome("unchanged"), ThreatQUnavailable("down"),
                        ThreatQUnavailable("still down"))
    worker = Worker(Services(cfg, inbox), sync_factory=lambda: scripted, backoff_cap_s=0)
    for name in ("th5-case-create.json", "th5-observable-create-ip.json", "th5-case-delete.json"):
        payload = sample(name)
        inbox.put(events.parse(payload), json.dumps(payload))
    before = current()
    for _ in range(4):
        assert worker.run_once()
    after = current()
    got = {o: value(after, "events_processed_total", outcome=o) - value(before, "events_processed_total", outcome=o)
           for o in ("synced", "unchanged", "retry", "dead")}
    assert got == {"synced": 1, "unchanged": 1, "retry": 1, "dead": 1}


# ------------------------------------------------------------------ the ThreatQ client


@pytest.mark.parametrize("path, template", [
    ("/api/indicators/12", "/api/indicators/{id}"),
    ("/api/events/3/attributes/44", "/api/events/{id}/attributes/{id}"),
    ("/api/indicators", "/api/indicators"),
    ("/api/indicators/consume", "/api/indicators/consume"),
    ("/api/search?query=1", "/api/search"),
])
def test_threatq_paths_become_templates(path, template):
    assert metrics.endpoint_template(path) == template


def test_threatq_latency_and_errors_by_status(tmp_path):
    base = "https://threatq.example.org"
    auth.save_tokens(tmp_path, auth.Tokens("access-0123", "refresh-0123", 4_000_000_000))
    client = ThreatQClient(base, "cid", config_dir=tmp_path, attempts=2)
    client._sleep = lambda _s: None
    before = current()
    with responses.RequestsMock() as rsps:
        rsps.add("PUT", f"{base}/api/indicators/7", status=500, json={"errors": ["boom"]})
        rsps.add("PUT", f"{base}/api/indicators/7", status=200, json={"data": {"id": 7}})
        rsps.add("PUT", f"{base}/api/indicators/8", body=requests.ConnectionError("refused"))
        rsps.add("PUT", f"{base}/api/indicators/8", body=requests.ConnectionError("refused"))
        client.update_indicator(7, status_id=1)
        with pytest.raises(ThreatQUnavailable):
            client.update_indicator(8, status_id=1)
    after = current()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    endpoint = {"method": "PUT", "endpoint": "/api/indicators/{id}"}
    assert delta("threatq_request_duration_seconds_count", **endpoint) == 4
    assert delta("threatq_request_duration_seconds_sum", **endpoint) > 0
    assert delta("threatq_request_errors_total", status="500", **endpoint) == 1
    assert delta("threatq_request_errors_total", status="connection_error", **endpoint) == 2
    assert delta("threatq_request_errors_total", status="200", **endpoint) == 0
    assert not any("/api/indicators/7" in str(labels) for (_, labels) in after)  # no raw ids as labels


# ------------------------------------------------------------------ enrichment


def test_cache_hits_misses_and_plugin_latency_by_plugin(tmp_path):
    from test_enrichment import make as make_enricher, stand_in

    plugin = stand_in("metered")
    gone = stand_in("gone_intel", answer=NotFound("unknown"))
    enricher = make_enricher(tmp_path, plugin, gone)
    before = current()
    enricher.run("domain", "example.org", tlp="GREEN")
    enricher.run("domain", "example.org", tlp="GREEN")
    enricher.run("domain", "example.net", tlp="GREEN")
    after = current()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("enrichment_cache_misses_total", plugin="metered") == 2
    assert delta("enrichment_cache_hits_total", plugin="metered") == 1
    assert delta("enrichment_cache_hits_total", plugin="gone_intel") == 1  # "not found" is cached too
    assert delta("enrichment_plugin_duration_seconds_count", plugin="metered") == 2
    assert delta("enrichment_plugin_duration_seconds_count", plugin="gone_intel") == 2
    assert len(plugin.calls) == 2


# ------------------------------------------------------------------ multiprocess files


def test_prepare_directory_wipes_only_for_a_new_master(tmp_path):
    directory = tmp_path / ".metrics"
    metrics.prepare_directory(directory, os.getpid(), fresh=True)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (directory / "counter_111.db").write_bytes(b"x")
    metrics.prepare_directory(directory, os.getpid())            # a (re)started worker of this master
    assert (directory / "counter_111.db").exists()
    metrics.prepare_directory(directory, os.getppid())           # another master: a new run
    assert not (directory / "counter_111.db").exists()
    (directory / "counter_222.db").write_bytes(b"x")
    metrics.prepare_directory(directory, os.getppid(), fresh=True)
    assert not (directory / "counter_222.db").exists()
    assert metrics.directory_for(tmp_path) == tmp_path / ".metrics"


FORKING_MASTER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from tq_mw_thehive import metrics

    directory, embedded = Path(sys.argv[1]), sys.argv[2] == "embedded"
    if embedded:
        metrics.master_prepare(directory)

    def worker(events, scrape=False):
        pid = os.fork()
        if pid == 0:
            metrics.enable_multiprocess(directory, master_pid=os.getppid())
            for _ in range(events):
                metrics.event_received()
                metrics.event_processed("synced")
            if scrape:
                sys.stdout.write(metrics.exposition().decode())
                sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        metrics.process_gone(pid)

    worker(3)
    worker(4)
    worker(1, scrape=True)   # a restarted worker: the dead ones' counts are still in the total
''')


@pytest.mark.parametrize("mode", ["embedded", "plain_gunicorn"])
def test_forked_workers_add_up_keep_dead_ones_and_a_new_master_starts_from_zero(tmp_path, mode):
    directory = tmp_path / ".metrics"
    for _run in range(2):  # the second run is a new daemon start: totals restart, not 16
        out = subprocess.run([sys.executable, "-c", FORKING_MASTER, str(directory), mode], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        samples = parse(out.stdout)
        assert value(samples, "events_received_total") == 8
        assert value(samples, "events_processed_total", outcome="synced") == 8
    assert len(list(directory.glob("counter_*.db"))) == 3


# ------------------------------------------------------------------ web.metrics_token (issue 13 item 8)

METRICS_TOKEN = "metrics-token-5f0c1e9a7b3d"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {METRICS_TOKEN}", METRICS_TOKEN,
                                    f"Bearer {METRICS_TOKEN}x", f"Bearer {WEBHOOK_TOKEN}"])
def test_metrics_token_is_required_when_set(tmp_path, header, caplog):
    app, _, cfg = make_app(tmp_path, web={"metrics_token": METRICS_TOKEN})
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        refused = client.get("/metrics", headers={"Authorization": header} if header else {})
    assert refused.status_code == 401
    assert refused.json == {"status": "error", "error": "authentication required"}
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert P not in refused.get_data(as_text=True)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("rejected outcome=unauthorized remote=127.0.0.1 path=/metrics reason=")
    assert METRICS_TOKEN not in caplog.text

    scraped = client.get("/metrics", headers={"Authorization": f"bearer  {METRICS_TOKEN} "})
    assert scraped.status_code == 200 and P + "inbox_depth" in scraped.get_data(as_text=True)


def test_metrics_token_is_a_secret_like_the_others(tmp_path):
    cfg = config_mod.from_dict(minimal_config(web={"metrics_token": METRICS_TOKEN}), tmp_path)
    assert METRICS_TOKEN not in repr(cfg) and METRICS_TOKEN not in repr(cfg.web)
    assert METRICS_TOKEN in cfg.secrets()  # what startup registers for redaction in every log line
    with pytest.raises(config_mod.ConfigError) as error:
        config_mod.from_dict(minimal_config(web={"metrics_token": 12345}), tmp_path)
    assert "web.metrics_token" in str(error.value) and "12345" not in str(error.value)


def test_metrics_refusals_count_in_the_rejection_log_limit(tmp_path, caplog):
    app, _, _ = make_app(tmp_path, web={"metrics_token": METRICS_TOKEN})
    app.extensions[web.EXTENSION]["rejections"] = web.RejectionLog(burst=2, interval_s=60)
    client = app.test_client()
    with caplog.at_level(logging.WARNING):
        for _ in range(16):
            assert client.get("/metrics").status_code == 401
    assert len(caplog.records) == 2


def test_value_files_are_reserved_before_prometheus_client_maps_them(tmp_path):
    """A hole mapped on a full disk is a SIGBUS at the first write: the blocks are allocated."""
    metrics._preallocate(tmp_path, 4242)
    for typ in ("counter", "histogram"):
        st = (tmp_path / f"{typ}_4242.db").stat()
        assert st.st_size == metrics.PREALLOCATE_BYTES and st.st_blocks * 512 >= st.st_size


def test_no_space_for_the_value_files_keeps_the_worker_on_its_own_counts(tmp_path, monkeypatch, caplog):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "posix_fallocate", full)
    directory = tmp_path / ".metrics"
    before = metrics._m
    assert metrics.enable_multiprocess(directory, master_pid=os.getppid()) is False
    assert metrics._m is before and metrics._directory is None
    assert not list(directory.glob("*.db")), "an empty value file would be mapped as a hole later"
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "cannot be used" in warning.getMessage() and "No space left" in warning.getMessage()
    metrics.event_received()  # still recorded, in this process
