"""The status page in a real headless Chromium (Debian's) against the real daemon (gunicorn, 2 workers).

The inbox is seeded through the Inbox API before the daemon starts: events already done (with their
ThreatQ objects in the object map), one dead letter whose reason is hostile HTML, one pending. ThreatQ
is an unreachable loopback port, so the worker keeps every pending case event pending (retrying):
after Replay the dead letter stays pending, which makes the check deterministic.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import sample, write_config
from tq_mw_thehive import state
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.testing.daemon import Daemon, wait_for
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import auth as tq_auth

pytestmark = pytest.mark.e2e
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ADMIN_TOKEN = "browser-admin-token-51c3a0"
HOSTILE_REASON = 'ThreatQPermanentError: 400 <script>alert("pwned")</script><img src=x onerror=alert(2)>'
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them: "
                "apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once the browser is known to be there)
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def case_event(i: int) -> dict:
    event = copy.deepcopy(sample("th5-case-create.json"))
    event["_id"], event["objectId"], event["rootId"] = f"~3{i:06d}", f"~4{i:06d}", f"~4{i:06d}"
    event["_createdAt"] += i
    event["details"]["_id"] = event["objectId"]
    event["details"]["title"] = f"Case {i}: phishing wave"
    return event


def observable_event(i: int, case_id: str) -> dict:
    event = copy.deepcopy(sample("th5-observable-create-ip.json"))
    event["_id"], event["objectId"], event["rootId"] = f"~9{i:06d}", f"~7{i:06d}", case_id
    event["_createdAt"] += i
    event["object"]["case"]["_id"] = case_id
    return event


class SeedClock:
    """The inbox's clock while seeding: events arrive at chosen times over the last day."""

    def __init__(self) -> None:
        self.ago = 0.0

    def __call__(self) -> float:
        return time.time() - self.ago


# Hours ago at which earlier cases arrived (all within the chart's 24 hours): a day's traffic.
HISTORY_HOURS = (22.5, 21.2, 19.8, 19.1, 18.4, 16.9, 15.3, 14.8, 14.1, 13.6, 13.2, 12.7, 11.9, 10.4, 9.8,
                 9.1, 8.6, 7.2, 6.9, 6.3, 5.7, 4.4, 3.9, 3.8)


def seed(db_path: Path) -> dict:
    """Done cases over the last day, a case with two observables mapped to ThreatQ objects, one dead
    letter (its reason is hostile HTML) and one pending case event."""
    state.open_state(db_path).close()
    clock = SeedClock()
    inbox, sync_state = Inbox(db_path, clock=clock), SyncState(db_path)

    def put(payload: dict, hours_ago: float) -> int:
        clock.ago = hours_ago * 3600
        return inbox.put(events.parse(payload), json.dumps(payload)).id

    def finish(dead_reason: str = None) -> int:
        clock.ago = 0.0
        item = inbox.claim("seed")
        assert inbox.dead(item.id, "seed", dead_reason) if dead_reason else inbox.done(item.id, "seed")
        return item.id

    for i, hours_ago in enumerate(HISTORY_HOURS, start=10):
        put(case_event(i), hours_ago)
        finish()
    case = case_event(1)
    for payload in (case, observable_event(1, case["objectId"]), observable_event(2, case["objectId"])):
        put(payload, 2.5)
        finish()
    sync_state.record(case["objectId"], "case", "events", 101)
    sync_state.record("~7000001", "observable", "indicators", 201, case_id=case["objectId"])
    sync_state.record("~7000002", "observable", "indicators", 202, case_id=case["objectId"])
    put(case_event(3), 1.2)
    dead = finish(HOSTILE_REASON)
    pending = put(case_event(4), 0.3)
    cache = ResultCache(db_path)
    for hit in (True, True, True, False):
        cache.count("geoip", hit=hit, miss=not hit, lookup_ms=3.0)
    inbox.close()
    return {"dead": dead, "pending": pending}


def db_query(db_path: Path, sql: str, *params):
    db = sqlite3.connect(str(db_path))
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture
def daemon(tmp_path: Path):
    # ThreatQ (127.0.0.1:9) and TheHive (127.0.0.1:9000) are unreachable: pending events stay pending.
    write_config(tmp_path, web={"admin_token": ADMIN_TOKEN})
    tq_auth.save_tokens(tmp_path, tq_auth.Tokens("tq-access-token-b1", "tq-refresh-token-b1", expires_at=0.0))
    seeded = seed(tmp_path / "tq_mw_thehive.db")
    d = Daemon(tmp_path, tmp_path / "logs")
    d.start()
    d.seeded = seeded
    yield d
    d.close()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch):
    # Selenium must use Debian's driver and browser and never fetch one (selenium-manager).
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path / "chromium-profile"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text.strip()


def no_alert(driver) -> bool:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_status_page_in_chromium(daemon, browser, tmp_path):
    db_path = tmp_path / "tq_mw_thehive.db"
    seeded = daemon.seeded

    browser.get(daemon.url + "/status")
    assert "Log in with the admin token" in text(browser, "message")
    browser.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_for(lambda: browser.find_elements(By.ID, "count-pending"), 15, "the status page after login")
    loaded_at = time.time()

    # The figures, against the database.
    counts = dict(db_query(db_path, "SELECT state, COUNT(*) FROM inbox GROUP BY state"))
    assert (counts["done"], counts["dead"], counts["pending"]) == (len(HISTORY_HOURS) + 3, 1, 1)
    for state_name in ("pending", "done", "dead"):
        assert text(browser, f"count-{state_name}") == str(counts[state_name]), state_name
    (oldest,) = db_query(db_path, "SELECT MIN(received_at) FROM inbox WHERE state = 'pending'")[0]
    shown_age = float(browser.find_element(By.ID, "oldest-pending").get_attribute("data-seconds"))
    assert loaded_at - oldest - 15 <= shown_age <= loaded_at - oldest + 1
    (total,) = db_query(db_path, "SELECT COUNT(*) FROM inbox")[0]
    assert text(browser, "events-24h") == str(total) == str(len(HISTORY_HOURS) + 5)
    bars = browser.find_elements(By.CSS_SELECTOR, "#per-hour-chart rect.bar")
    assert len(bars) == 24 and sum(int(b.get_attribute("data-count")) for b in bars) == total
    rows = browser.find_elements(By.CSS_SELECTOR, "#recent-events tr[data-inbox-id]")
    ids = [int(r.get_attribute("data-inbox-id")) for r in rows]
    assert ids == [r[0] for r in db_query(db_path, "SELECT id FROM inbox ORDER BY id DESC LIMIT 50")]
    states = [r.get_attribute("data-state") for r in rows]
    assert states == [r[0] for r in db_query(db_path, "SELECT state FROM inbox ORDER BY id DESC LIMIT 50")]
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a.tq-link")]
    assert hrefs.count("http://127.0.0.1:9/events/101/details") == 3  # the case's row and its observables'
    assert set(hrefs) == {"http://127.0.0.1:9/events/101/details", "http://127.0.0.1:9/indicators/201/details",
                     "http://127.0.0.1:9/indicators/202/details"}
    hits, misses = db_query(db_path, "SELECT SUM(hits), SUM(misses) FROM enrichment_stats")[0]
    assert text(browser, "cache-hit-rate") == f"{hits / (hits + misses):.0%}" == "75%"
    plugin_rows = browser.find_elements(By.CSS_SELECTOR, "#plugins tr[data-plugin]")
    plugin_states = {r.get_attribute("data-plugin"): r.find_element(By.CLASS_NAME, "plugin-state").text
                     for r in plugin_rows}
    assert plugin_states["geoip"] == "enabled" and plugin_states["virustotal"].startswith("missing key")

    # Hostile text is shown as text; no script ran.
    dead_row = browser.find_element(By.CSS_SELECTOR, f"#dead-table tr[data-inbox-id='{seeded['dead']}']")
    assert HOSTILE_REASON in dead_row.text
    assert no_alert(browser)

    height = browser.execute_script("return document.documentElement.scrollHeight")  # DevTools, not the page
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    browser.save_screenshot(str(tmp_path / "status-page.png"))  # the whole page, for docs/operations.md
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert (tmp_path / "status-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TQ_MW_UPDATE_SCREENSHOT"):  # refresh the picture in docs/operations.md on purpose only
        shutil.copyfile(tmp_path / "status-page.png", SCREENSHOT)

    # Replay: the form posts with its CSRF token; the event goes back to pending.
    browser.find_element(By.ID, f"replay-{seeded['dead']}").click()
    wait_for(lambda: browser.find_elements(By.ID, "notice"), 15, "the page after Replay")
    assert text(browser, "notice") == f"Event {seeded['dead']} is pending again."
    wait_for(lambda: db_query(db_path, "SELECT state FROM inbox WHERE id = ?", seeded["dead"])[0][0] == "pending",
             15, "the replayed event to be pending")
    assert text(browser, "count-dead") == "0"
    assert text(browser, "count-pending") == "2"
    assert not browser.find_elements(By.ID, f"replay-{seeded['dead']}")
    assert ADMIN_TOKEN not in daemon.log_text()
    assert f"status page replay inbox_id={seeded['dead']}" in daemon.log_text()
