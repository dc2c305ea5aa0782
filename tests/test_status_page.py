"""The status page through Flask's test client: disabled, authentication, CSRF, figures, escaping."""
from __future__ import annotations

import copy
import json
import logging
import re
import sqlite3
import threading
from html import unescape

import pytest

from conftest import minimal_config, sample
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, startup, state
from tq_mw_thehive.auth import COOKIE, AdminAuth
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.status_page import EXTENSION, age_text
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive import events
from tq_mw_thehive.web import create_app
from tq_mw_thehive.services import Services

ADMIN_TOKEN = "admin-token-7c1f0e9b2d4a"
HOSTILE = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def observable_event(i: int, object_id: str = None) -> dict:
    event = copy.deepcopy(sample("th5-observable-create-ip.json"))
    event["_id"] = f"~9{i:06d}"
    event["objectId"] = object_id or f"~7{i:06d}"
    event["rootId"] = f"~5{i:06d}"
    event["_createdAt"] = event["_createdAt"] + i
    return event


@pytest.fixture
def make(tmp_path):
    def make(admin_token=ADMIN_TOKEN, clock=None):
        raw = minimal_config(web={"admin_token": admin_token}) if admin_token else minimal_config()
        cfg = config_mod.from_dict(raw, tmp_path)
        state.open_state(cfg.state_db).close()
        inbox = Inbox(cfg.state_db, clock=clock or Clock())
        app = create_app(Services(cfg, inbox))
        return cfg, inbox, app.test_client()

    return make


def put(inbox: Inbox, payload: dict) -> int:
    return inbox.put(events.parse(payload), json.dumps(payload)).id


def finish(inbox: Inbox, outcome: str, reason: str = "") -> int:
    item = inbox.claim("test-owner")
    assert item is not None
    if outcome == "done":
        assert inbox.done(item.id, "test-owner")
    else:
        assert inbox.dead(item.id, "test-owner", reason)
    return item.id


def seeded(inbox: Inbox):
    """Two done, one dead (hostile reason), one pending with a hostile object id."""
    for i in range(3):
        put(inbox, observable_event(i))
    done = [finish(inbox, "done"), finish(inbox, "done")]
    dead = finish(inbox, "dead", f"ThreatQPermanentError: 400 {HOSTILE}")
    pending = put(inbox, observable_event(3, object_id=HOSTILE))
    return done, dead, pending


def figure(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert match, element_id
    return unescape(match.group(1)).strip()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)


def login(client) -> str:
    response = client.post("/status/login", data={"token": ADMIN_TOKEN})
    assert response.status_code == 303
    return client.get("/status").get_data(as_text=True)


# --- disabled ---------------------------------------------------------------------------------

def test_disabled_without_admin_token(make):
    _, inbox, client = make(admin_token=None)
    put(inbox, observable_event(0))
    finish(inbox, "dead", "x")
    for response in (client.get("/status", headers=BEARER), client.post("/status/login", data={"token": "x"}),
                     client.post("/status/replay/1", headers=BEARER)):
        assert response.status_code == 404
        assert response.mimetype == "text/html"
        assert "disabled: set web.admin_token" in response.get_data(as_text=True)
    assert inbox.get(1)["state"] == "dead"


def test_empty_admin_token_is_a_config_error(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="web.admin_token: must not be empty"):
        config_mod.from_dict(minimal_config(web={"admin_token": "  "}), tmp_path)


def test_admin_token_from_env_is_a_secret_for_the_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_MW_ADMIN_TOKEN", ADMIN_TOKEN)
    (tmp_path / "config.yaml").write_text(json.dumps(minimal_config(web={"admin_token": "${TQ_MW_ADMIN_TOKEN}"})))
    cfg = startup.load_config(tmp_path)
    assert cfg.web.admin_token == ADMIN_TOKEN
    assert ADMIN_TOKEN in cfg.secrets()
    assert ADMIN_TOKEN not in repr(cfg)
    assert ADMIN_TOKEN not in logs.redact(f"token {ADMIN_TOKEN}")


# --- authentication ---------------------------------------------------------------------------

def test_no_credentials_get_a_login_form_with_safe_headers(make):
    _, _, client = make()
    response = client.get("/status")
    assert response.status_code == 401
    body = response.get_data(as_text=True)
    assert '<form method="post" action="/status/login">' in body and 'name="token"' in body
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "no-store" in response.headers["Cache-Control"]


def test_wrong_token_is_refused_and_logged_without_it(make, caplog):
    _, _, client = make()
    wrong = "guessed-token-123456"
    with caplog.at_level(logging.INFO):
        assert client.get("/status", headers={"Authorization": f"Bearer {wrong}"}).status_code == 403
        # Another scheme is not an attempt at the admin token (a proxy's own header): the login form.
        assert client.get("/status", headers={"Authorization": f"Basic {ADMIN_TOKEN}"}).status_code == 401
        response = client.post("/status/login", data={"token": wrong})
    assert response.status_code == 403
    assert "Wrong admin token" in response.get_data(as_text=True)
    assert COOKIE not in response.headers.get("Set-Cookie", "")
    assert "reason='wrong admin token'" in caplog.text
    assert wrong not in caplog.text and ADMIN_TOKEN not in caplog.text


def test_bearer_token_shows_the_page(make):
    _, _, client = make()
    response = client.get("/status", headers=BEARER)
    assert response.status_code == 200
    assert "tq-mw-thehive status" in response.get_data(as_text=True)


def test_login_sets_a_strict_http_only_signed_cookie(make):
    _, _, client = make()
    response = client.post("/status/login", data={"token": ADMIN_TOKEN})
    assert response.status_code == 303 and response.headers["Location"].endswith("/status")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/status" in cookie
    assert client.get("/status").status_code == 200
    # A tampered cookie, or one signed under another admin token, is refused.
    value = cookie.split(";")[0].split("=", 1)[1]
    fresh = client.application.test_client(use_cookies=False)  # each request says its own cookie
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={value}"}).status_code == 200
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={tampered}"}).status_code == 401
    foreign = AdminAuth("another-token").new_session()
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={foreign}"}).status_code == 401


def test_session_expires():
    clock = Clock()
    auth = AdminAuth(ADMIN_TOKEN, clock=clock)
    cookie = auth.new_session()
    assert auth.session_id(cookie)
    clock.now += 13 * 3600
    assert auth.session_id(cookie) is None
    for bad in ("", "x", "1.2", "1.2.3", "a.b.c", None):
        assert auth.session_id(bad) is None


def test_logout_needs_csrf_and_clears_the_cookie(make):
    _, _, client = make()
    html = login(client)
    assert client.post("/status/logout").status_code == 403
    response = client.post("/status/logout", data={"csrf_token": csrf_of(html)})
    assert response.status_code == 303
    assert client.get("/status").status_code == 401


# --- figures ----------------------------------------------------------------------------------

def test_figures_match_the_database(make):
    cfg, inbox, client = make()
    done, dead, pending = seeded(inbox)
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    counts = dict(inbox.db.execute("SELECT state, COUNT(*) FROM inbox GROUP BY state").fetchall())
    assert figure(html, "count-pending") == str(counts["pending"]) == "1"
    assert figure(html, "count-done") == str(counts["done"]) == "2"
    assert figure(html, "count-dead") == str(counts["dead"]) == "1"
    inbox.clock.now += 195
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert figure(html, "oldest-pending") == "3 min 15 s"
    assert figure(html, "events-24h") == "4"
    assert html.count('data-count="4"') == 1  # the current hour's bar
    rows = re.findall(r'<tr data-inbox-id="(\d+)" data-state="(\w+)">', html)
    assert rows == [(str(pending), "pending"), (str(dead), "dead"), (str(done[1]), "done"), (str(done[0]), "done")]
    assert f'id="replay-{dead}"' in html


def test_links_to_threatq_objects(make):
    cfg, inbox, client = make()
    put(inbox, observable_event(0))
    item_id = finish(inbox, "done")
    row = inbox.get(item_id)
    sync_state = SyncState(cfg.state_db)
    sync_state.record(row["object_id"], "observable", "indicators", 31, case_id=row["case_key"][5:])
    sync_state.record(row["case_key"][5:], "case", "events", 12)
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert 'href="http://127.0.0.1:9/indicators/31/details"' in html
    assert 'href="http://127.0.0.1:9/events/12/details"' in html


def test_cache_hit_rate_and_plugin_states(make):
    cfg, _, client = make()
    cache = ResultCache(cfg.state_db)
    for hit in (True, True, False):
        cache.count("geoip", hit=hit, miss=not hit)
    cache.count("domain", hit=True)
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert figure(html, "cache-hit-rate") == "75%"
    assert re.search(r'data-plugin="virustotal">.*?class="plugin-state">missing key: VIRUSTOTAL', html, re.S)
    assert re.search(r'data-plugin="geoip">.*?class="plugin-state">enabled<', html, re.S)


def test_threatq_optional_steps_as_the_daemon_learned_them(make):
    cfg, inbox, client = make()
    learned = SyncState(cfg.state_db)
    learned.record_capability("tag_delete", False, 405)
    learned.record_capability("consume:indicators", True)
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    rows = dict(re.findall(r'<tr data-step="([^"]+)">.*?class="step-state">([^<]+)<', html, re.S))
    assert rows["tag_delete"] == "not served" and rows["consume:indicators"] == "served"
    assert rows["source_tlp"] == "unknown"
    assert "tags removed in TheHive stay on the ThreatQ object" in unescape(html)


def test_hourly_counts_fill_empty_hours(tmp_path):
    clock = Clock(1_800_000_000.0 - 1_800_000_000.0 % 3600 + 1800)  # half past an hour
    inbox = Inbox.open(tmp_path / "db.sqlite", clock=clock)
    put(inbox, observable_event(0))
    clock.now -= 2 * 3600
    put(inbox, observable_event(1))
    put(inbox, observable_event(2))
    clock.now -= 30 * 3600  # outside the window
    put(inbox, observable_event(3))
    clock.now += 32 * 3600
    counts = inbox.hourly_counts(24)
    assert len(counts) == 24 and counts[-1] == (clock.now - 1800, 1)
    assert [n for _, n in counts][-3:] == [2, 0, 1] and sum(n for _, n in counts) == 3


def test_age_text():
    assert [age_text(s) for s in (None, 5, 65, 7260, 90000)] == \
        ["none pending", "5 s", "1 min 05 s", "2 h 01 min", "1 d 01 h"]


def test_hostile_text_is_escaped(make):
    _, inbox, client = make()
    seeded(inbox)
    html = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html and "onerror=alert(1)&gt;" in html


# --- replay -----------------------------------------------------------------------------------

def test_replay_needs_the_session_csrf_token(make, tmp_path):
    _, inbox, client = make()
    _, dead, _ = seeded(inbox)
    html = login(client)
    assert client.post(f"/status/replay/{dead}").status_code == 403
    assert client.post(f"/status/replay/{dead}", data={"csrf_token": "0" * 64}).status_code == 403
    other = AdminAuth(ADMIN_TOKEN)  # a token of another session does not work in this one
    assert client.post(f"/status/replay/{dead}", data={"csrf_token": other.csrf_token("other")}).status_code == 403
    assert inbox.get(dead)["state"] == "dead"

    response = client.post(f"/status/replay/{dead}", data={"csrf_token": csrf_of(html)})
    assert response.status_code == 303
    assert response.headers["Location"].endswith(f"/status?replayed={dead}#dead-letters")
    row = inbox.get(dead)
    assert (row["state"], row["attempts"]) == ("pending", 0)
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert f"Event {dead} is pending again." in page


def test_replay_without_login_or_of_a_live_event(make):
    _, inbox, client = make()
    done, dead, pending = seeded(inbox)
    assert client.post(f"/status/replay/{dead}").status_code == 401
    csrf = csrf_of(client.get("/status", headers=BEARER).get_data(as_text=True))
    assert client.post(f"/status/replay/{done[0]}", headers=BEARER, data={"csrf_token": csrf}).status_code == 409
    assert client.post("/status/replay/999", headers=BEARER, data={"csrf_token": csrf}).status_code == 404
    assert client.post(f"/status/replay/{2 ** 70}", headers=BEARER, data={"csrf_token": csrf}).status_code == 404
    assert inbox.get(done[0])["state"] == "done"
    woken = []
    app = client.application
    app.extensions["tq_mw_thehive.status_page"].on_replayed = lambda: woken.append(1)
    assert client.post(f"/status/replay/{dead}", headers=BEARER, data={"csrf_token": csrf}).status_code == 303
    assert woken == [1]


def test_odd_query_and_cookie_values_are_no_500(make):
    _, _, client = make()
    for replayed in ("²", "1" * 40, "-1", "<b>"):
        response = client.get("/status", query_string={"replayed": replayed}, headers=BEARER)
        assert response.status_code == 200 and "pending again" not in response.get_data(as_text=True)
    fresh = client.application.test_client(use_cookies=False)
    for cookie in ("².a.b", "9" * 40 + ".a.b", "..", "\u00e9"):
        assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={cookie}"}).status_code == 401
    assert client.get("/status", headers={"Authorization": "Bearer \u00e9\u00e9"}).status_code == 403


def test_a_database_error_is_a_503_page(make, monkeypatch):
    _, inbox, client = make()

    def locked():
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(inbox, "stats", locked)
    response = client.get("/status", headers=BEARER)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "state database cannot be read" in response.get_data(as_text=True)


# --- login limits ---------------------------------------------------------------------------------

def from_address(client, address: str):
    """A test client whose requests come from ``address`` (its own cookie jar)."""
    other = client.application.test_client()
    other.environ_base["REMOTE_ADDR"] = address
    return other


def wrong_login(client) -> int:
    return client.post("/status/login", data={"token": "guessed-token-123456"}).status_code


def test_five_failed_logins_from_a_client_lock_it_out_for_the_window_then_it_logs_in(make, caplog):
    clock = Clock()
    _, _, client = make(clock=clock)
    with caplog.at_level(logging.INFO):
        assert [wrong_login(client) for _ in range(5)] == [403] * 5
        response = client.post("/status/login", data={"token": ADMIN_TOKEN})  # the right one, too late
    assert response.status_code == 429 and response.headers["Retry-After"] == "60"
    body = response.get_data(as_text=True)
    assert "Too many failed logins: try again in 60 seconds." in body and 'name="token"' in body
    assert COOKIE not in response.headers.get("Set-Cookie", "")
    assert caplog.text.count("status page login limit reached scope=client remote=127.0.0.1") == 1
    assert ADMIN_TOKEN not in caplog.text
    # Another address is not locked out; this one is, for exactly the window.
    assert from_address(client, "10.0.0.7").post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 303
    clock.now += 59.5
    response = client.post("/status/login", data={"token": ADMIN_TOKEN})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    clock.now += 0.5
    assert client.post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 303
    assert client.get("/status").status_code == 200


def test_refused_attempts_do_not_extend_the_lockout(make):
    clock = Clock()
    _, _, client = make(clock=clock)
    for _ in range(5):
        wrong_login(client)
        clock.now += 1
    for _ in range(20):  # hammering while locked out is not recorded
        assert wrong_login(client) == 429
    clock.now += 55  # the first failure is now 60 s old: one more guess is allowed
    assert wrong_login(client) == 403
    assert wrong_login(client) == 429


def test_bearer_guesses_count_and_are_limited_too(make):
    _, _, client = make()
    wrong = {"Authorization": "Bearer guessed-token-123456"}
    assert [client.get("/status", headers=wrong).status_code for _ in range(5)] == [403] * 5
    response = client.get("/status", headers=BEARER)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) == 60
    assert wrong_login(client) == 429  # the form shares the limit


def test_right_tokens_are_not_counted(make):
    _, _, client = make()
    for _ in range(20):
        assert client.get("/status", headers=BEARER).status_code == 200
    assert [wrong_login(client) for _ in range(5)] == [403] * 5


def test_fifty_failures_from_many_addresses_lock_out_everyone(make, caplog):
    clock = Clock()
    _, _, client = make(clock=clock)
    with caplog.at_level(logging.WARNING):
        for i in range(50):
            assert wrong_login(from_address(client, f"198.51.100.{i}")) == 403
    assert "status page login limit reached scope=overall remote=198.51.100.49" in caplog.text
    fresh = from_address(client, "10.0.0.7")
    response = fresh.post("/status/login", data={"token": ADMIN_TOKEN})
    assert response.status_code == 429 and response.headers["Retry-After"] == "60"
    clock.now += 60
    assert fresh.post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 303


def test_the_limit_is_shared_by_every_worker_process(make):
    """Each gunicorn worker builds its own app: the limit lives in the state database, not in one."""
    cfg, inbox, client = make()
    other_worker = create_app(Services(cfg, Inbox(cfg.state_db, clock=inbox.clock))).test_client()
    assert [wrong_login(client) for _ in range(3)] == [403] * 3
    assert [wrong_login(other_worker) for _ in range(2)] == [403] * 2
    assert client.post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 429
    assert other_worker.post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 429


def test_concurrent_guesses_cannot_slip_past_the_count(make):
    """The failure is recorded in the transaction that counts: 20 guesses at once, 5 get checked."""
    cfg, inbox, client = make()
    barrier = threading.Barrier(20)
    codes = []

    def guess() -> None:
        mine = client.application.test_client()
        barrier.wait()
        codes.append(wrong_login(mine))

    threads = [threading.Thread(target=guess) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [403] * 5 + [429] * 15


# --- sessions -----------------------------------------------------------------------------------

def cookie_of(response) -> str:
    return response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def test_logout_revokes_the_session_for_every_copy_of_the_cookie(make):
    _, _, client = make()
    copied = cookie_of(client.post("/status/login", data={"token": ADMIN_TOKEN}))
    second = from_address(client, "10.0.0.8")  # another browser, logged in on its own
    second.post("/status/login", data={"token": ADMIN_TOKEN})
    fresh = client.application.test_client(use_cookies=False)
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={copied}"}).status_code == 200
    html = client.get("/status").get_data(as_text=True)
    assert client.post("/status/logout", data={"csrf_token": csrf_of(html)}).status_code == 303
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={copied}"}).status_code == 401
    csrf = AdminAuth(ADMIN_TOKEN).csrf_token(AdminAuth(ADMIN_TOKEN).session_id(copied) or "x")
    assert fresh.post("/status/replay/1", headers={"Cookie": f"{COOKIE}={copied}"},
                      data={"csrf_token": csrf}).status_code == 401
    assert second.get("/status").status_code == 200  # only the session that logged out ended


def test_a_signed_cookie_without_its_session_row_is_refused(make):
    """A cookie signed with the right key but never issued here (or issued, then revoked) is no session."""
    cfg, inbox, client = make()
    forged = client.application.extensions[EXTENSION].auth.new_session()
    fresh = client.application.test_client(use_cookies=False)
    assert fresh.get("/status", headers={"Cookie": f"{COOKIE}={forged}"}).status_code == 401


@pytest.mark.parametrize("header", ["Basic dXNlcjpwcm94eS1wYXNzd29yZA==", "Bearer proxy-sso-token-0f3a9c1e",
                                    "Negotiate YIIabc", "garbage"])
def test_a_valid_cookie_wins_over_whatever_authorization_a_proxy_adds(make, header):
    _, _, client = make()
    html = login(client)
    response = client.get("/status", headers={"Authorization": header})
    assert response.status_code == 200
    assert client.post("/status/logout", headers={"Authorization": header},
                       data={"csrf_token": csrf_of(html)}).status_code == 303
    # The proxy's header was not a guess at the admin token: nothing counted against the limit.
    assert [wrong_login(client) for _ in range(5)] == [403] * 5


def test_sessions_are_stored_as_digests_and_expire(make):
    clock = Clock()
    cfg, _, client = make(clock=clock)
    value = cookie_of(client.post("/status/login", data={"token": ADMIN_TOKEN}))
    nonce = value.split(".")[1]
    rows = sqlite3.connect(cfg.state_db).execute("SELECT digest FROM status_sessions").fetchall()
    assert len(rows) == 1 and nonce not in rows[0][0]
    clock.now += 12 * 3600 + 1
    assert client.get("/status").status_code == 401


def test_an_ipv6_client_is_counted_by_its_slash_64(make):
    """One host usually holds a whole /64: fresh addresses from it are the same client."""
    _, _, client = make()
    codes = [wrong_login(from_address(client, f"2001:db8:1:2::{i:x}")) for i in range(6)]
    assert codes == [403] * 5 + [429]
    assert wrong_login(from_address(client, "2001:db8:1:3::1")) == 403  # another /64
    assert wrong_login(from_address(client, "::ffff:192.0.2.1")) == 403  # IPv4-mapped: that IPv4 address
    assert [wrong_login(from_address(client, "192.0.2.1")) for _ in range(5)] == [403] * 4 + [429]


# --- reconciliation ---------------------------------------------------------------------------

def test_the_last_reconciliation_sweep_is_shown(make):
    from dataclasses import asdict

    from tq_mw_thehive.reconcile import LAST_KEY, Sweep
    clock = Clock()
    _, inbox, client = make(clock=clock)
    page = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert 'id="reconcile-none"' in page and "15 min 00 s after the start" in page
    sweep = Sweep(clock.now - 125, 0.42, "ok", cases=12, observables=40, found=3, known=49)
    inbox.write(lambda db: db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (LAST_KEY, json.dumps(asdict(sweep)))))
    page = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert re.search(r'id="reconcile-outcome">ok<', page)
    assert 'data-found="3"' in page and ">2 min 05 s<" in page and "in 420 ms" in page
    failed = Sweep(clock.now, 0.01, "failed", error="TheHiveUnavailable: <refused>")
    inbox.write(lambda db: db.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(asdict(failed)), LAST_KEY)))
    page = client.get("/status", headers=BEARER).get_data(as_text=True)
    assert re.search(r'id="reconcile-outcome">failed<', page)
    assert "TheHiveUnavailable: &lt;refused&gt;" in page  # escaped


def test_reconciliation_off_says_so(tmp_path):
    raw = minimal_config(web={"admin_token": ADMIN_TOKEN}, sync={"reconcile_every": 0})
    cfg = config_mod.from_dict(raw, tmp_path)
    state.open_state(cfg.state_db).close()
    client = create_app(Services(cfg, Inbox(cfg.state_db, clock=Clock()))).test_client()
    assert 'id="reconcile-off"' in client.get("/status", headers=BEARER).get_data(as_text=True)
