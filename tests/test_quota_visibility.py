"""Issue 17 item 3: the enrichment quotas are seen where operators look.

``/metrics`` (gauges read from the state database at scrape time), the status page's Quotas
section and ``tq-mw-thehive plugins`` (the limits in force) show what ``QuotaBook`` recorded:
calls used and left, the lookups waiting for quota and the oldest one's age, the last 429 and
the pause in force. The book runs on a clock the test sets; the plugins are the bundled ones.
"""
from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import Dict, Tuple

import pytest
from click.testing import CliRunner

from conftest import FakeClock, MetricSamples, minimal_config, parse_metrics, write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import metrics, state
from tq_mw_thehive.cli import cli
from tq_mw_thehive.enrichment.quota import DAY_S, Limits, QuotaBook
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.services import Services
from tq_mw_thehive.web import create_app

ADMIN_TOKEN = "admin-token-quota-3e9d1c7b5a"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
P = metrics.PREFIX
T0 = 1_796_000_000.0 - 1_796_000_000.0 % DAY_S + 3600  # 01:00 UTC: the day's count starts at 00:00
VT = Limits(4.0, 500)          # VirusTotal's declared free tier
ABUSE = Limits(None, 1000)     # AbuseIPDB's: a day only
KEY = "k1"


class World:
    """An app on a fresh state database whose ``Services.quota`` is a book on the test's clock."""

    def __init__(self, tmp_path: Path, **enrichment) -> None:
        raw = minimal_config(web={"admin_token": ADMIN_TOKEN}, enrichment=enrichment)
        self.cfg = config_mod.from_dict(raw, tmp_path)
        state.open_state(self.cfg.state_db).close()
        self.clock = FakeClock(T0)
        self.services = Services(self.cfg, Inbox(self.cfg.state_db, clock=self.clock))
        self.book = self.services.quota = QuotaBook(self.cfg.state_db, clock=self.clock)
        self.client = create_app(self.services).test_client()

    def scrape(self) -> MetricSamples:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        return parse_metrics(response.get_data(as_text=True))

    def page(self) -> str:
        response = self.client.get("/status", headers=BEARER)
        assert response.status_code == 200
        return response.get_data(as_text=True)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def recorded(world: World) -> None:
    """At T0+210: a VirusTotal call at T0 (out of the minute, in the day), 2 at T0+190 and a lookup
    queued at T0+200; 2 AbuseIPDB calls at T0+190; an OTX 429 at T0+120 (paused 10 min) and its
    lookup queued then."""
    book, clock = world.book, world.clock
    assert book.take("virustotal", KEY, VT) is None
    clock.now = T0 + 120
    book.pause("otx", KEY, 600, "HTTP 429")
    book.defer("otx", KEY, "ip", "198.51.100.7", "AMBER", "AMBER", "case", clock() + 600)
    clock.now = T0 + 190
    for _ in range(2):
        assert book.take("virustotal", KEY, VT) is None
        assert book.take("abuseipdb", KEY, ABUSE) is None
    clock.now = T0 + 200
    book.defer("virustotal", KEY, "ip", "198.51.100.8", "AMBER", "AMBER", "case", clock() + 30)
    clock.now = T0 + 210


def gauge(samples: MetricSamples, name: str, **labels: str):
    """The sample's value, or None when the series is absent (unlike conftest's metric_value)."""
    return samples.get((P + name, tuple(sorted(labels.items()))))


def series(samples: MetricSamples, name: str) -> Dict[Tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == P + name}


# --- /metrics -----------------------------------------------------------------------------------

def test_metrics_show_used_and_left_per_window_queue_and_last_429(world):
    recorded(world)
    last_429 = T0 + 120
    samples = world.scrape()
    assert gauge(samples, "enrichment_quota_used", plugin="virustotal", window="minute") == 2
    assert gauge(samples, "enrichment_quota_used", plugin="virustotal", window="day") == 3
    assert gauge(samples, "enrichment_quota_left", plugin="virustotal", window="minute") == 2
    assert gauge(samples, "enrichment_quota_left", plugin="virustotal", window="day") == 497
    # AbuseIPDB has a day limit only: no "left" for the minute, its use is still counted.
    assert gauge(samples, "enrichment_quota_used", plugin="abuseipdb", window="minute") == 2
    assert gauge(samples, "enrichment_quota_left", plugin="abuseipdb", window="day") == 998
    assert gauge(samples, "enrichment_quota_left", plugin="abuseipdb", window="minute") is None
    assert gauge(samples, "enrichment_deferred", plugin="otx") == 1
    assert gauge(samples, "enrichment_deferred_oldest_age_seconds", plugin="otx") == 90
    assert gauge(samples, "enrichment_deferred", plugin="virustotal") == 1
    assert gauge(samples, "enrichment_deferred_oldest_age_seconds", plugin="virustotal") == 10
    assert gauge(samples, "enrichment_deferred_oldest_age_seconds", plugin="shodan") == 0  # limits, empty queue
    assert gauge(samples, "enrichment_last_429_timestamp_seconds", plugin="otx") == last_429
    assert series(samples, "enrichment_last_429_timestamp_seconds") == {(("plugin", "otx"),): last_429}


def test_only_plugins_with_a_limit_a_queue_or_a_429_get_series(world):
    recorded(world)
    shown = {dict(labels)["plugin"] for labels in series(world.scrape(), "enrichment_deferred")}
    # otx has no declared limit but a queue and a 429; the offline plugins and urlhaus have nothing.
    assert shown == {"virustotal", "abuseipdb", "shodan", "otx"}


def test_the_override_in_the_config_is_the_limit_counted_against(tmp_path):
    world = World(tmp_path, limits={"virustotal": {"per_minute": 30, "per_day": None}})
    assert world.book.take("virustotal", KEY, Limits(30.0, None)) is None
    samples = world.scrape()
    assert gauge(samples, "enrichment_quota_left", plugin="virustotal", window="minute") == 29
    assert gauge(samples, "enrichment_quota_left", plugin="virustotal", window="day") is None
    assert gauge(samples, "enrichment_quota_used", plugin="virustotal", window="day") == 1


def test_figures_follow_the_clock_at_each_scrape(world):
    recorded(world)
    world.clock.now += 61  # the minute's calls age out; the queue grows older
    samples = world.scrape()
    assert gauge(samples, "enrichment_quota_left", plugin="virustotal", window="minute") == 4
    assert gauge(samples, "enrichment_deferred_oldest_age_seconds", plugin="otx") == 151


def test_missing_quota_tables_leave_the_figures_out_not_the_scrape(world):
    recorded(world)
    with world.book.db as db:
        db.execute("DROP TABLE enrichment_deferred")
    samples = world.scrape()
    assert (P + "inbox_depth", ()) in samples
    assert series(samples, "enrichment_quota_used") == {}


def test_enrichment_off_shows_no_quota(tmp_path):
    world = World(tmp_path, enabled=False)
    assert world.book.take("virustotal", KEY, VT) is None
    samples = world.scrape()
    assert series(samples, "enrichment_quota_used") == {}
    assert "Enrichment is off" in world.page()


# --- the status page ----------------------------------------------------------------------------

def quota_rows(html: str) -> Dict[str, Dict[str, str]]:
    """plugin -> {cell class without ``quota-``: text} of the Quotas table."""
    rows = {}
    for plugin, body in re.findall(r'<tr data-quota-plugin="([^"]+)">(.*?)</tr>', html, re.S):
        cells = re.findall(r'<td class="(?:n )?quota-([a-z0-9-]+)[^"]*">([^<]*)</td>', body)
        rows[plugin] = {name: unescape(text).strip() for name, text in cells}
    return rows


def test_the_quotas_section_shows_limits_use_queue_and_pauses(world):
    recorded(world)
    html = world.page()
    assert 'id="quotas"' in html
    rows = quota_rows(html)
    assert set(rows) == {"virustotal", "abuseipdb", "shodan", "otx"}
    assert rows["virustotal"] == {"limits": "4 a minute, 500 a day", "used-minute": "2", "left-minute": "2",
                                  "used-day": "3", "left-day": "497", "deferred": "1", "oldest": "10 s",
                                  "last-429": "never", "paused-until": "-"}
    assert rows["abuseipdb"]["limits"] == "1000 a day" and rows["abuseipdb"]["left-minute"] == "no limit"
    otx = rows["otx"]
    assert otx["limits"] == "no limit" and otx["deferred"] == "1" and otx["oldest"] == "1 min 30 s"
    assert otx["last-429"] == "2026-11-30 01:02:00"
    assert otx["paused-until"] == "2026-11-30 01:12:00"
    assert re.search(r'id="quota-queued">2<', html) and re.search(r'id="quota-oldest">1 min 30 s<', html)
    assert 'id="quota-queue-empty"' not in html


def test_an_empty_queue_says_nothing_is_queued(world):
    assert world.book.take("virustotal", KEY, VT) is None
    html = world.page()
    assert "Nothing is queued" in html and 'id="quota-queued"' not in html
    assert quota_rows(html)["virustotal"]["deferred"] == "0"
    assert quota_rows(html)["virustotal"]["oldest"] == "-"


def test_a_pause_that_ended_is_not_shown_as_in_force(world):
    world.book.pause("otx", KEY, 60, "HTTP 429")
    world.clock.now += 61
    row = quota_rows(world.page())["otx"]
    assert row["paused-until"] == "-" and row["last-429"] != "never"


# --- tq-mw-thehive plugins ----------------------------------------------------------------------

def plugins(config_dir: Path, *extra: str):
    result = CliRunner().invoke(cli, ["plugins", "-c", str(config_dir), *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def listing(config_dir: Path) -> Dict[str, dict]:
    return {p["name"]: p for p in json.loads(plugins(config_dir, "--json"))}


def limits_cell(output: str, name: str) -> str:
    header = output.splitlines()[0]
    (row,) = [line for line in output.splitlines() if line.split()[:1] == [name]]
    return row[header.index("LIMITS"):].strip()


def test_plugins_show_the_declared_limits_by_default(tmp_path):
    write_config(tmp_path)
    found = listing(tmp_path)
    assert found["virustotal"]["limits"] == {"per_minute": 4.0, "per_day": 500}
    assert found["abuseipdb"]["limits"] == {"per_minute": None, "per_day": 1000}
    assert found["geoip"]["limits"] == {"per_minute": None, "per_day": None}
    output = plugins(tmp_path)
    assert limits_cell(output, "virustotal") == "4 a minute, 500 a day"
    assert limits_cell(output, "geoip") == "no limit"


def test_plugins_show_the_override_of_the_config(tmp_path):
    write_config(tmp_path, enrichment={"limits": {"virustotal": {"per_minute": 30, "per_day": None}}})
    found = listing(tmp_path)
    assert found["virustotal"]["limits"] == {"per_minute": 30.0, "per_day": None}
    assert found["abuseipdb"]["limits"] == {"per_minute": None, "per_day": 1000}  # the others unchanged
    assert limits_cell(plugins(tmp_path), "virustotal") == "30 a minute"


def test_a_plugin_that_did_not_load_has_no_limits(tmp_path):
    directory = tmp_path / "my_plugins"
    directory.mkdir()
    (directory / "broken.py").write_text("import no_such_module_for_these_tests\n", encoding="utf-8")
    write_config(tmp_path, enrichment={"plugin_dirs": [str(directory)], "limits": {"broken": {"per_day": 5}}})
    assert listing(tmp_path)["broken"]["limits"] is None
    assert limits_cell(plugins(tmp_path), "broken") == "-"
