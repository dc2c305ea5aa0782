"""``GET /status``: one server-rendered HTML page that tells an operator how the daemon is doing.

It shows the inbox counts and the oldest pending event's age, events per hour (an
inline SVG drawn here, so the page needs no JavaScript and no build step), the last
50 events with their outcome and links to the ThreatQ objects, the dead letters with
a Replay button, the enrichment cache hit rate, the plugin states and their quotas (calls
used and left, the lookups waiting for quota, the last 429).

The page lets its user put events back in the queue, so it is off until
``web.admin_token`` is set (404 until then). A script authenticates with
``Authorization: Bearer <token>``; a browser logs in once through a small form and
gets a session cookie; failed tokens are limited (auth.py: the admin token, sessions and
the login limits). Every POST carries a CSRF token bound to the session. Payload text is
hostile: everything is escaped by Jinja's autoescape, and a strict Content-Security-Policy
forbids scripts.

The HTML is in templates/status/ (layout.html, page.html, message.html: the login form and
every other answer), rendered by Flask's ``render_template``; the stylesheet is
templates/status/status.css, inlined into each page and allowed by its hash in the CSP.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import sqlite3
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

import jinja2
from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request, url_for
from markupsafe import Markup

from tq_mw_thehive import __version__, progress
from tq_mw_thehive.auth import (COOKIE, DIGITS, SESSION_MAX_AGE_S, AdminAuth, LoginLimiter, Sessions,
                                login_client, set_session_cookie)
from tq_mw_thehive.enrichment.quota import Limits
from tq_mw_thehive.enrichment.registry import Registry, plugin_state
from tq_mw_thehive.metrics import quota_usage
from tq_mw_thehive.services import Services
from tq_mw_thehive.reconcile import last_sweep
from tq_mw_thehive.sync_state import read_capabilities
from tq_mw_thehive.threatq import capabilities

log = logging.getLogger(__name__)
bp = Blueprint("status_page", __name__, template_folder="templates")  # tq_mw_thehive/templates/status/
EXTENSION = "tq_mw_thehive.status_page"
RECENT_LIMIT = 50
DEAD_LIMIT = 100
CHART_HOURS = 24
# ThreatQ's web pages for the collections the sync writes; ``incident`` (a custom object) has
# no documented page address, so it is shown as text.
TQ_PAGES = {"events": "events", "indicators": "indicators"}

with bp.open_resource("templates/status/status.css") as _file:
    _CSS = _file.read().decode("utf-8").strip()
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode("utf-8")).digest()).decode("ascii")
# No script may run, nothing may be loaded, the page may not be framed; forms post only here.
# The one inline style is the stylesheet above, allowed by its hash.
CSP = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class StatusPage:
    """What the page reads, built once per app: the stores on the state database, the plugins."""

    def __init__(self, services: Services, on_replayed: Optional[Callable[[], None]] = None,
                 clock: Optional[Callable[[], float]] = None) -> None:
        cfg = self.cfg = services.cfg
        self.services = services
        self.inbox = services.inbox
        self.on_replayed = on_replayed
        clock = clock or self.inbox.clock  # one clock for the page's figures, sessions and the limiter
        self.auth = AdminAuth(cfg.web.admin_token, clock) if cfg.web.admin_token else None
        self.limiter = LoginLimiter(cfg.state_db, clock)
        self.sessions = Sessions(cfg.state_db, clock)
        self.sync_state = services.sync_state
        self.cache = services.cache
        self.keys = services.keys

    def __repr__(self) -> str:
        return f"StatusPage(enabled={self.auth is not None})"

    @property
    def registry(self) -> Registry:
        return self.services.registry  # plugins import once per process, on the first view

    def tq_links(self, row: sqlite3.Row) -> List[Dict[str, Optional[str]]]:
        """The ThreatQ objects standing for the event's TheHive object (and for its case)."""
        found: List[Tuple[str, int]] = []
        if row["object_id"]:
            found += self.sync_state.tq_ids(row["object_id"])
        case_key = row["case_key"] or ""
        if case_key.startswith("case:") and case_key[5:] != row["object_id"]:
            found += [ref for ref in self.sync_state.tq_ids(case_key[5:]) if ref[0] != "indicators"]
        base = self.cfg.threatq.base_url
        links = []
        for collection, tq_id in dict.fromkeys(found):
            page = TQ_PAGES.get(collection)
            links.append({"label": f"{collection[:-1] if collection.endswith('s') else collection} {tq_id}",
                          "url": f"{base}/{page}/{tq_id}/details" if page else None})
        return links


def register_status_page(app: Flask, services: Services, on_replayed: Optional[Callable[[], None]] = None) -> None:
    """Add ``/status`` to ``app`` (``create_app`` calls this); ``on_replayed`` wakes the sync worker."""
    app.extensions[EXTENSION] = StatusPage(services, on_replayed)
    app.jinja_env.undefined = jinja2.StrictUndefined  # a value the page misses fails loudly, not blank
    app.register_blueprint(bp)


# --- rendering ----------------------------------------------------------------------------------

def _html(template: str, status: int = 200, **context: Any) -> Response:
    # The stylesheet is ours and goes in as is: the CSP allows exactly these characters.
    body = render_template(f"status/{template}.html", css=Markup(_CSS), **context)
    response = Response(body, status=status, mimetype="text/html")
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-store, max-age=0"
    headers["Pragma"] = "no-cache"
    return response


def _message(status: int, message: str, *, error: bool = True, login: bool = False,
             back: bool = False, **headers: str) -> Response:
    response = _html("message", status, title=message, message=message, error=error, login=login,
                     url_login=url_for("status_page.login"), back=url_for("status_page.page") if back else None)
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _utc(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def age_text(seconds: Optional[float]) -> str:
    """A duration as people read it (``progress.age_text``); None: nothing pending."""
    return "none pending" if seconds is None else progress.age_text(seconds)


def _rate(hits: int, misses: int) -> str:
    return f"{hits / (hits + misses):.0%}" if hits + misses else "-"


def chart_svg(counts: List[Tuple[float, int]]) -> Dict[str, Any]:
    """Bars of events per hour as inline SVG (escaped text only; no script, no external file)."""
    width, height, top, bottom, left = 720, 160, 10, 22, 34
    peak = max((n for _, n in counts), default=0)
    scale = max(peak, 1)
    slot = (width - left) / max(len(counts), 1)
    plot = height - top - bottom
    parts = [f'<svg id="per-hour-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="events received per hour">',
             f'<line x1="{left}" y1="{top + plot}" x2="{width}" y2="{top + plot}" stroke="#999"/>',
             f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end" fill="#666">{peak}</text>',
             f'<text x="{left - 4}" y="{top + plot}" font-size="10" text-anchor="end" fill="#666">0</text>']
    for i, (hour, n) in enumerate(counts):
        h = plot * n / scale
        x = left + i * slot + 1
        label = datetime.fromtimestamp(hour, timezone.utc).strftime("%H:00")
        parts.append(f'<rect class="bar" data-count="{n}" x="{x:.1f}" y="{top + plot - h:.1f}" '
                     f'width="{slot - 2:.1f}" height="{h:.1f}" fill="#4a7ab5">'
                     f'<title>{label} UTC: {n} events</title></rect>')
        if i % 3 == 0 or i == len(counts) - 1:
            parts.append(f'<text x="{x + (slot - 2) / 2:.1f}" y="{height - 6}" font-size="10" '
                         f'text-anchor="middle" fill="#666">{label}</text>')
    parts.append("</svg>")
    return {"svg": Markup("".join(parts)), "total": sum(n for _, n in counts),
            "peak": peak, "hours": len(counts)}


def _left(left: Optional[int]) -> str:
    return "no limit" if left is None else str(left)


def _quota_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """One plugin's ``QuotaBook.usage`` row as the Quotas table shows it (UTC times, ages in words)."""
    oldest = row["oldest_deferred_s"]
    return {"plugin": row["plugin"], "limits": Limits(**row["limits"]).describe(),
            "used_minute": row["used_minute"], "left_minute": _left(row["left_minute"]),
            "used_day": row["used_day"], "left_day": _left(row["left_day"]), "deferred": row["deferred"],
            "oldest": "-" if oldest is None else age_text(oldest),
            "last_429": "never" if row["last_429"] is None else _utc(row["last_429"]),
            "paused_until": _utc(row["paused_until"]), "paused": row["paused_until"] is not None}


def _quotas(page: StatusPage) -> Dict[str, Any]:
    """The Quotas section: per plugin, the limits in force and what is left of them, and the queue of
    lookups that wait for quota (its depth and oldest age tell whether it drains)."""
    rows = quota_usage(page.services)
    ages = [r["oldest_deferred_s"] for r in rows if r["oldest_deferred_s"] is not None]
    return {"enabled": page.cfg.enrichment.enabled, "plugins": [_quota_row(r) for r in rows],
            "queued": sum(r["deferred"] for r in rows), "oldest": age_text(max(ages)) if ages else None}


def _outcome(row: sqlite3.Row, now: float) -> Tuple[str, Optional[str]]:
    if row["state"] == "done":
        return "done", None
    if row["state"] == "dead":
        return "dead", row["last_error"]
    if row["lease_until"] is not None and row["lease_until"] > now:
        return f"in progress (attempt {row['attempts']})", row["last_error"]
    if row["next_attempt_at"] > now and row["attempts"]:
        return f"waiting to retry (after {row['attempts']} attempts)", row["last_error"]
    return "queued", row["last_error"]


def _view(page: StatusPage, session: str, notice: Optional[str]) -> Response:
    inbox, now = page.inbox, page.inbox.clock()
    stats = inbox.stats()
    recent = []
    for row in inbox.recent(RECENT_LIMIT):
        outcome, detail = _outcome(row, now)
        recent.append({"id": row["id"], "received": _utc(row["received_at"]), "object_type": row["object_type"],
                       "action": row["action"], "object_id": row["object_id"], "state": row["state"],
                       "outcome": outcome, "detail": detail, "links": page.tq_links(row)})
    dead = [{"id": row["id"], "received": _utc(row["received_at"]), "finished": _utc(row["finished_at"]),
             "object_type": row["object_type"], "action": row["action"], "object_id": row["object_id"],
             "attempts": row["attempts"], "reason": row["last_error"] or "-",
             "replay_url": url_for("status_page.replay", inbox_id=row["id"])}
            for row in inbox.dead_letters(DEAD_LIMIT)]
    cache_rows = page.cache.stats()
    hits, misses = sum(r["hits"] for r in cache_rows), sum(r["misses"] for r in cache_rows)
    cache = {"hits": hits, "misses": misses, "errors": sum(r["errors"] for r in cache_rows),
             "rate": _rate(hits, misses),
             "plugins": [dict(r, rate=_rate(r["hits"], r["misses"])) for r in cache_rows]}
    plugins = [{"name": p.name, "state": plugin_state(p, page.cfg.enrichment, page.keys), "version": p.version,
                "data_types": ", ".join(p.data_types) or "-", "origin": p.origin}
               for p in page.registry.plugins]
    sweep = last_sweep(inbox)
    shown_sweep = None if sweep is None else dict(
        vars(sweep), when=_utc(sweep.started_at), ago=age_text(max(0.0, now - sweep.started_at)),
        ms=f"{sweep.seconds * 1000:.0f}")
    every = page.cfg.sync.reconcile_every if page.cfg.thehive.api_key else 0
    return _html("page", title="status", version=__version__, now=_utc(now), notice=notice,
                 sweep=shown_sweep, sweep_every=age_text(every) if every else None,
                 session=session != "bearer", csrf=page.auth.csrf_token(session),
                 url_logout=url_for("status_page.logout"), stats=stats,
                 oldest=age_text(stats["oldest_pending_age_s"]), chart=chart_svg(inbox.hourly_counts(CHART_HOURS)),
                 recent=recent, dead=dead, cache=cache, plugins=plugins, quotas=_quotas(page),
                 steps=capabilities.reports(read_capabilities(inbox.db), now=now))


# --- authentication (the mechanisms: auth.py) ---------------------------------------------------

def _page() -> StatusPage:
    return current_app.extensions[EXTENSION]


def _disabled() -> Response:
    return _message(404, "The status page is disabled: set web.admin_token in config.yaml "
                         "(for example to ${TQ_MW_ADMIN_TOKEN}) and restart to enable it.")


def _reject(status: int, reason: str) -> Response:
    log.warning("status page rejected outcome=%s remote=%s path=%s reason=%r",
                "unauthorized" if status == 401 else "forbidden", request.remote_addr, request.path, reason)
    if status == 401:
        return _message(401, "Log in with the admin token (web.admin_token).", error=False, login=True,
                        WWW_Authenticate='Bearer realm="tq-mw-thehive status"')
    return _message(status, reason[:1].upper() + reason[1:] + ".", login=True)


def _client() -> str:
    """Who a failed login is counted against (``auth.login_client``: the TCP peer)."""
    return login_client(request.remote_addr)


def _try_token(page: StatusPage, presented: str) -> Optional[Response]:
    """Check an admin token under the login limits: None when it is right, else the refusal."""
    attempt = page.limiter.attempt(_client())
    if attempt.retry_after_s is not None:
        log.debug("status page rejected outcome=rate_limited remote=%s path=%s retry_after_s=%d",
                  _client(), request.path, attempt.retry_after_s)
        return _message(429, f"Too many failed logins: try again in {attempt.retry_after_s} seconds.",
                        login=True, Retry_After=str(attempt.retry_after_s))
    if page.auth.check_token(presented):
        page.limiter.forget(attempt.row)
        return None
    if attempt.fills is not None:
        limit = page.limiter.per_client if attempt.fills == "client" else page.limiter.overall
        log.warning("status page login limit reached scope=%s remote=%s failures=%d window_s=%g: every "
                    "attempt gets 429 until the oldest failure is older than the window", attempt.fills,
                    _client(), limit, page.limiter.window_s)
    return _reject(403, "wrong admin token")


def _session(page: StatusPage) -> Tuple[Optional[str], Optional[Response]]:
    """Who is asking: a session nonce, ``bearer`` for a script, or the answer that refuses them.

    A live session cookie wins over any ``Authorization`` header: a reverse proxy may add its
    own (Basic, or a Bearer of its single sign-on), which must not log the operator out. Only a
    Bearer header is an attempt at the admin token (limited); another scheme is not ours.
    """
    nonce = page.auth.session_id(request.cookies.get(COOKIE))
    if nonce is not None and page.sessions.live(nonce):
        return nonce, None
    scheme, _, credential = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        refused = _try_token(page, credential.strip())
        return (None, refused) if refused is not None else ("bearer", None)
    reason = "session expired or invalid" if COOKIE in request.cookies else "not logged in"
    return None, _reject(401, reason)


def _set_cookie(response: Response, value: str, max_age: int) -> None:
    set_session_cookie(response, value, max_age, secure=request.is_secure)


# --- routes -------------------------------------------------------------------------------------

@bp.route("/status", methods=["GET"])
def page():
    status = _page()
    if status.auth is None:
        return _disabled()
    session, refused = _session(status)
    if refused is not None:
        return refused
    replayed = request.args.get("replayed", "")
    notice = f"Event {int(replayed)} is pending again." if DIGITS.fullmatch(replayed) else None
    return _view(status, session, notice)


@bp.route("/status/login", methods=["POST"])
def login():
    status = _page()
    if status.auth is None:
        return _disabled()
    token = request.form.get("token", "")
    if not token:  # no guess: not counted
        return _reject(403, "no admin token given")
    refused = _try_token(status, token)
    if refused is not None:
        return refused
    cookie = status.auth.new_session()
    status.sessions.add(status.auth.session_id(cookie))
    log.info("status page login remote=%s", request.remote_addr)
    response = redirect(url_for("status_page.page"), 303)
    _set_cookie(response, cookie, SESSION_MAX_AGE_S)
    return response


def _checked(status: StatusPage) -> Tuple[Optional[str], Optional[Response]]:
    """The session of a POST that carries its CSRF token, or the answer that refuses it."""
    if status.auth is None:
        return None, _disabled()
    session, refused = _session(status)
    if refused is not None:
        return None, refused
    if not status.auth.check_csrf(session, request.form.get("csrf_token")):
        log.warning("status page rejected outcome=forbidden remote=%s path=%s reason='missing or wrong CSRF "
                    "token'", request.remote_addr, request.path)
        return None, _message(403, "Missing or wrong CSRF token: reload the status page and try again.",
                              back=True)
    return session, None


@bp.route("/status/logout", methods=["POST"])
def logout():
    status = _page()
    session, refused = _checked(status)
    if refused is not None:
        return refused
    if session != "bearer":
        status.sessions.revoke(session)
        log.info("status page logout remote=%s", request.remote_addr)
    response = redirect(url_for("status_page.page"), 303)
    _set_cookie(response, "", 0)
    return response


@bp.route("/status/replay/<int:inbox_id>", methods=["POST"])
def replay(inbox_id: int):
    status = _page()
    _, refused = _checked(status)
    if refused is not None:
        return refused
    row = status.inbox.get(inbox_id) if inbox_id < 2 ** 63 else None  # SQLite's INTEGER range
    if row is None:
        return _message(404, f"There is no event {inbox_id} in the inbox.", back=True)
    if row["state"] != "dead" or status.inbox.replay([inbox_id]) != 1:
        return _message(409, f"Event {inbox_id} is not a dead letter (it is {row['state']}); nothing to replay.",
                        back=True)
    log.info("status page replay inbox_id=%d remote=%s", inbox_id, request.remote_addr)
    if status.on_replayed is not None:
        status.on_replayed()
    return redirect(url_for("status_page.page", replayed=inbox_id, _anchor="dead-letters"), 303)


@bp.errorhandler(sqlite3.Error)
def _database_error(exc: sqlite3.Error):
    log.error("status page outcome=unavailable error=%r", str(exc))
    return _message(503, "The state database cannot be read now; reload in a few seconds.", Retry_After="5")
