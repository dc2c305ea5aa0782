"""``GET /status``: one server-rendered HTML page that tells an operator how the daemon is doing.

It shows the inbox counts and the oldest pending event's age, events per hour (an
inline SVG drawn here, so the page needs no JavaScript and no build step), the last
50 events with their outcome and links to the ThreatQ objects, the dead letters with
a Replay button, the enrichment cache hit rate and the plugin states.

The page lets its user put events back in the queue, so it is off until
``web.admin_token`` is set (404 until then). A script authenticates with
``Authorization: Bearer <token>``; a browser logs in once through a small form and
gets a session cookie (HttpOnly, SameSite=Strict) signed with a key derived from the
token, so changing the token ends every session. The session is also a row in the state
database, which logout deletes: a cookie copied before logout is worthless after it.
Failed tokens (form or Bearer) are limited per client address and overall, in the state
database too, so the limit holds whichever gunicorn worker answers. Every POST carries a
CSRF token bound to the session. Payload text is hostile: everything is escaped by
Jinja's autoescape, and a strict Content-Security-Policy forbids scripts.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import sqlite3
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jinja2
from flask import Blueprint, Flask, Response, current_app, redirect, request, url_for
from markupsafe import Markup

from tq_mw_thehive import __version__, state
from tq_mw_thehive.config import Config
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.registry import Registry, plugin_state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync_state import SyncState, read_capabilities
from tq_mw_thehive.threatq import capabilities

log = logging.getLogger(__name__)
bp = Blueprint("status_page", __name__)
EXTENSION = "tq_mw_thehive.status_page"
COOKIE = "tq_mw_status"
SESSION_MAX_AGE_S = 12 * 3600
# Failed admin tokens allowed per minute from one address, and from all addresses together
# (someone guessing from many addresses); beyond either, every attempt gets 429 until the
# oldest failure leaves the window, the right token too: otherwise guessing would go on.
LOGIN_WINDOW_S = 60.0
LOGIN_FAILURES_PER_CLIENT = 5
LOGIN_FAILURES_OVERALL = 50
RECENT_LIMIT = 50
DEAD_LIMIT = 100
CHART_HOURS = 24
# ThreatQ's web pages for the collections the sync writes; ``incident`` (a custom object) has
# no documented page address, so it is shown as text.
TQ_PAGES = {"events": "events", "indicators": "indicators"}

_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes "²", which int() refuses

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h3{font-size:1em;margin:1.2em 0 .3em}h2{font-size:1.1em;margin:1.6em 0 .4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}th,td{padding:.2em .6em;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666}.done{color:#176b2c}.dead{color:#a11}.pending{color:#8a5a00}
.reason{max-width:40em;overflow-wrap:anywhere;font-family:monospace;font-size:.9em}
.notice{background:#eef6ee;border:1px solid #9c9;padding:.4em .8em}
.error{background:#fbeeee;border:1px solid #c99;padding:.4em .8em}
form.inline{display:inline;margin:0}header{display:flex;justify-content:space-between;align-items:start}
""".strip()
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode("utf-8")).digest()).decode("ascii")
# No script may run, nothing may be loaded, the page may not be framed; forms post only here.
CSP = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="referrer" content="no-referrer">
<title>{{ title }} – tq-mw-thehive</title><style>{{ css }}</style></head>
<body>{% block body %}{% endblock %}</body></html>"""

_MESSAGE = """{% extends "layout" %}{% block body %}
<h1>tq-mw-thehive</h1>
<p class="{{ 'error' if error else 'notice' }}" id="message">{{ message }}</p>
{% if login %}
<form method="post" action="{{ url_login }}">
  <label>Admin token <input type="password" name="token" autocomplete="current-password" autofocus></label>
  <button type="submit" id="login">Log in</button>
</form>
{% endif %}
{% if back %}<p><a href="{{ back }}">Back to the status page</a></p>{% endif %}
{% endblock %}"""

_PAGE = """{% extends "layout" %}{% block body %}
<header><div><h1>tq-mw-thehive status</h1>
<p class="muted">version {{ version }} · {{ now }} UTC · this page does not refresh by itself</p></div>
{% if session %}<form class="inline" method="post" action="{{ url_logout }}">
<input type="hidden" name="csrf_token" value="{{ csrf }}"><button type="submit">Log out</button></form>{% endif %}
</header>
{% if notice %}<p class="notice" id="notice">{{ notice }}</p>{% endif %}

<h2 id="inbox">Inbox</h2>
<table><tr><th>pending</th><th>queued</th><th>in progress</th><th>waiting to retry</th><th>done</th>
<th>dead</th><th>oldest pending</th></tr>
<tr><td class="n" id="count-pending">{{ stats.pending }}</td><td class="n" id="count-queued">{{ stats.queued }}</td>
<td class="n" id="count-in-progress">{{ stats.in_progress }}</td>
<td class="n" id="count-waiting-retry">{{ stats.waiting_retry }}</td>
<td class="n" id="count-done">{{ stats.done }}</td><td class="n" id="count-dead">{{ stats.dead }}</td>
<td class="n" id="oldest-pending" data-seconds="{{ stats.oldest_pending_age_s if stats.oldest_pending_age_s is not none else '' }}">
{{- oldest }}</td></tr></table>

<h2 id="per-hour">Events per hour</h2>
<p><span id="events-24h">{{ chart.total }}</span> events received in the last {{ chart.hours }} hours
(most in one hour: {{ chart.peak }}).</p>
{{ chart.svg }}

<h2 id="recent">Last {{ recent|length }} events</h2>
{% if recent %}
<table id="recent-events"><tr><th>id</th><th>received (UTC)</th><th>object</th><th>action</th>
<th>TheHive id</th><th>outcome</th><th>ThreatQ</th></tr>
{% for e in recent %}<tr data-inbox-id="{{ e.id }}" data-state="{{ e.state }}">
<td class="n">{{ e.id }}</td><td>{{ e.received }}</td><td>{{ e.object_type }}</td><td>{{ e.action }}</td>
<td>{{ e.object_id or '-' }}</td><td class="{{ e.state }}"><span class="outcome">{{ e.outcome }}</span>
{% if e.detail %}<div class="reason">{{ e.detail }}</div>{% endif %}</td>
<td>{% for link in e.links %}{% if link.url %}<a class="tq-link" href="{{ link.url }}" rel="noopener noreferrer">{{ link.label }}</a>
{%- else %}<span>{{ link.label }}</span>{% endif %}{% if not loop.last %}, {% endif %}{% else %}-{% endfor %}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">No event received yet.</p>{% endif %}

<h2 id="dead-letters">Dead letters ({{ stats.dead }})</h2>
{% if dead %}
<p class="muted">Replay puts the event back in the queue with its attempts reset; the worker takes it at once.</p>
<table id="dead-table"><tr><th>id</th><th>received (UTC)</th><th>given up (UTC)</th><th>object</th>
<th>TheHive id</th><th>attempts</th><th>reason</th><th></th></tr>
{% for e in dead %}<tr data-inbox-id="{{ e.id }}">
<td class="n">{{ e.id }}</td><td>{{ e.received }}</td><td>{{ e.finished }}</td>
<td>{{ e.object_type }} {{ e.action }}</td><td>{{ e.object_id or '-' }}</td><td class="n">{{ e.attempts }}</td>
<td class="reason">{{ e.reason }}</td>
<td><form class="inline" method="post" action="{{ e.replay_url }}">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<button type="submit" class="replay" id="replay-{{ e.id }}">Replay</button></form></td></tr>
{% endfor %}</table>
{% if stats.dead > dead|length %}<p class="muted">{{ stats.dead - dead|length }} older dead letters not shown
(<code>tq-mw-thehive replay</code> handles them all).</p>{% endif %}
{% else %}<p class="muted">No dead letters.</p>{% endif %}

<h2 id="threatq-steps">ThreatQ optional steps</h2>
<p class="muted">Calls with no public evidence that every ThreatQ serves them, as this daemon found out
(<code>tq-mw-thehive check</code> also probes the read-only ones).</p>
<table id="threatq-steps-table"><tr><th>step</th><th>state</th><th>how it is known, what is done without it</th></tr>
{% for s in steps %}<tr data-step="{{ s.step }}"><td>{{ s.label }}</td><td class="step-state">{{ s.state }}</td>
<td class="muted">{{ s.detail }}</td></tr>{% endfor %}</table>

<h2 id="enrichment">Enrichment</h2>
<p>Cache hit rate: <strong id="cache-hit-rate" data-hits="{{ cache.hits }}" data-misses="{{ cache.misses }}">
{{- cache.rate }}</strong> ({{ cache.hits }} hits, {{ cache.misses }} misses, {{ cache.errors }} errors)</p>
{% if cache.plugins %}<h3>Cache by plugin</h3>
<table id="cache-table"><tr><th>plugin</th><th>entries</th><th>expired</th><th>hits</th>
<th>misses</th><th>errors</th><th>hit rate</th></tr>
{% for p in cache.plugins %}<tr><td>{{ p.plugin }}</td><td class="n">{{ p.entries }}</td><td class="n">{{ p.expired }}</td>
<td class="n">{{ p.hits }}</td><td class="n">{{ p.misses }}</td><td class="n">{{ p.errors }}</td>
<td class="n">{{ p.rate }}</td></tr>{% endfor %}</table>{% endif %}
<h3>Plugins</h3>
<table id="plugins"><tr><th>plugin</th><th>state</th><th>version</th><th>data types</th><th>origin</th></tr>
{% for p in plugins %}<tr data-plugin="{{ p.name }}"><td>{{ p.name }}</td><td class="plugin-state">{{ p.state }}</td>
<td>{{ p.version }}</td><td>{{ p.data_types }}</td><td class="muted">{{ p.origin }}</td></tr>
{% else %}<tr><td colspan="5" class="muted">no plugin found</td></tr>{% endfor %}</table>
{% endblock %}"""

_templates = jinja2.Environment(
    loader=jinja2.DictLoader({"layout": _LAYOUT, "message": _MESSAGE, "page": _PAGE}),
    autoescape=True, undefined=jinja2.StrictUndefined)


class AdminAuth:
    """The admin token, the session cookies and CSRF tokens derived from it.

    A session is ``<issued>.<nonce>.<mac>``: the MAC makes a forged or foreign cookie fail
    without a database read, and a new admin token ends every session; whether the session
    is still open (not logged out) is ``Sessions``'s row. The CSRF token is a MAC of the
    session nonce (``bearer`` for a script), so it is useless in another session.
    """

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self._token = token.encode("utf-8")
        self._key = hmac.new(self._token, b"tq-mw-thehive status page v1", hashlib.sha256).digest()
        self.clock = clock

    def __repr__(self) -> str:
        return "AdminAuth()"

    def check_token(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self._token)

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}:{text}".encode("utf-8"), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        payload = f"{int(self.clock())}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._mac('session', payload)}"

    def session_id(self, cookie: Optional[str]) -> Optional[str]:
        """The nonce of a valid, unexpired session cookie, else None."""
        issued, _, rest = (cookie or "").partition(".")
        nonce, _, mac = rest.partition(".")
        if not (_DIGITS.fullmatch(issued) and nonce and mac):
            return None
        if not hmac.compare_digest(mac.encode("ascii", "replace"),
                                   self._mac("session", f"{issued}.{nonce}").encode("ascii")):
            return None
        age = self.clock() - int(issued)
        return nonce if -60 <= age <= SESSION_MAX_AGE_S else None

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)

    def check_csrf(self, session: str, presented: Optional[str]) -> bool:
        return hmac.compare_digest((presented or "").encode("ascii", "replace"),
                                   self.csrf_token(session).encode("ascii"))


class Attempt(NamedTuple):
    """One admin-token attempt as the limiter answered it."""

    row: Optional[int] = None          # the failure recorded in advance; forgotten if the token is right
    retry_after_s: Optional[int] = None  # set: refused, a limit is reached
    fills: Optional[str] = None        # "client" / "overall": this attempt, if wrong, reaches that limit


class LoginLimiter(state.Store):
    """Failed admin tokens per client and overall in a sliding window (table ``status_login_failures``).

    Each attempt is recorded as a failure *before* the token is checked, in the transaction that
    counts the window, and forgotten when the token is right: concurrent guesses in several
    gunicorn workers cannot slip past the count between a check and a record. Its writes are
    not durable (synchronous=NORMAL): a power cut forgetting a few failures is harmless.
    """

    def __init__(self, path, clock: Callable[[], float] = time.time, window_s: float = LOGIN_WINDOW_S,
                 per_client: int = LOGIN_FAILURES_PER_CLIENT, overall: int = LOGIN_FAILURES_OVERALL) -> None:
        super().__init__(path)
        self.clock, self.window_s, self.per_client, self.overall = clock, window_s, per_client, overall

    def attempt(self, client: str) -> Attempt:
        now = self.clock()
        since = now - self.window_s

        def reserve(db: sqlite3.Connection) -> Attempt:
            db.execute("DELETE FROM status_login_failures WHERE at <= ?", (since,))
            fills = None
            for scope, where, args, limit in (("client", "client = ? AND", (client,), self.per_client),
                                              ("overall", "", (), self.overall)):
                # The limit-th newest failure in the window: while it is there, a limit is reached.
                row = db.execute(f"SELECT at FROM status_login_failures WHERE {where} at > ? "
                                 "ORDER BY at DESC LIMIT 1 OFFSET ?", (*args, since, limit - 1)).fetchone()
                if row is not None:
                    return Attempt(retry_after_s=max(1, math.ceil(row[0] + self.window_s - now)))
                if fills is None and db.execute(f"SELECT COUNT(*) FROM status_login_failures WHERE {where} at > ?",
                                                (*args, since)).fetchone()[0] == limit - 1:
                    fills = scope
            cursor = db.execute("INSERT INTO status_login_failures (client, at) VALUES (?, ?)", (client, now))
            return Attempt(row=cursor.lastrowid, fills=fills)

        return self.write(reserve, durable=False)

    def forget(self, row: int) -> None:
        """The token was right: the attempt recorded in advance is no failure."""
        self.write(lambda db: db.execute("DELETE FROM status_login_failures WHERE rowid = ?", (row,)),
                   durable=False)


class Sessions(state.Store):
    """Live status page sessions (table ``status_sessions``), by a digest of the cookie's nonce.

    The signed cookie alone cannot be revoked before it expires; this row can, so logout ends
    the session for every copy of the cookie, in every worker.
    """

    def __init__(self, path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(path)
        self.clock = clock

    @staticmethod
    def _digest(nonce: str) -> str:
        return hashlib.sha256(nonce.encode("utf-8")).hexdigest()

    def add(self, nonce: str) -> None:
        now = self.clock()

        def add(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM status_sessions WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO status_sessions VALUES (?, ?)",
                       (self._digest(nonce), now + SESSION_MAX_AGE_S))

        self.write(add)

    def live(self, nonce: str) -> bool:
        return self.db.execute("SELECT 1 FROM status_sessions WHERE digest = ? AND expires_at > ?",
                               (self._digest(nonce), self.clock())).fetchone() is not None

    def revoke(self, nonce: str) -> None:
        self.write(lambda db: db.execute("DELETE FROM status_sessions WHERE digest = ?", (self._digest(nonce),)))


class StatusPage:
    """What the page reads, built once per app: the stores on the state database, the plugins."""

    def __init__(self, cfg: Config, inbox: Inbox, on_replayed: Optional[Callable[[], None]] = None,
                 clock: Optional[Callable[[], float]] = None) -> None:
        self.cfg = cfg
        self.inbox = inbox
        self.on_replayed = on_replayed
        clock = clock or inbox.clock  # one clock for the page's figures, sessions and the limiter
        self.auth = AdminAuth(cfg.web.admin_token, clock) if cfg.web.admin_token else None
        self.limiter = LoginLimiter(cfg.state_db, clock)
        self.sessions = Sessions(cfg.state_db, clock)
        self.sync_state = SyncState(cfg.state_db)
        self.cache = ResultCache(cfg.state_db)
        self.keys = KeyStore(cfg.state_db)
        self._registry: Optional[Registry] = None

    def __repr__(self) -> str:
        return f"StatusPage(enabled={self.auth is not None})"

    @property
    def registry(self) -> Registry:
        if self._registry is None:  # plugins import once per process, on the first view
            self._registry = Registry.discover(self.cfg.enrichment.plugin_dirs)
        return self._registry

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


def register_status_page(app: Flask, cfg: Config, inbox: Inbox,
                         on_replayed: Optional[Callable[[], None]] = None) -> None:
    """Add ``/status`` to ``app`` (``create_app`` calls this); ``on_replayed`` wakes the sync worker."""
    app.extensions[EXTENSION] = StatusPage(cfg, inbox, on_replayed)
    app.register_blueprint(bp)


# --- rendering ----------------------------------------------------------------------------------

def _html(template: str, status: int = 200, **context: Any) -> Response:
    body = _templates.get_template(template).render(css=_CSS, **context)
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
    """A duration as people read it: ``45 s``, ``3 min 12 s``, ``5 h 02 min``, ``2 d 04 h``."""
    if seconds is None:
        return "none pending"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


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
    return _html("page", title="status", version=__version__, now=_utc(now), notice=notice,
                 session=session != "bearer", csrf=page.auth.csrf_token(session),
                 url_logout=url_for("status_page.logout"), stats=stats,
                 oldest=age_text(stats["oldest_pending_age_s"]), chart=chart_svg(inbox.hourly_counts(CHART_HOURS)),
                 recent=recent, dead=dead, cache=cache, plugins=plugins,
                 steps=capabilities.reports(read_capabilities(inbox.db), now=now))


# --- authentication -----------------------------------------------------------------------------

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
    """Who a failed login is counted against: the TCP peer, never X-Forwarded-For (anyone can
    write that; behind a reverse proxy every client shares the proxy's limit, which errs on the
    safe side). An IPv6 peer counts by its /64: one host usually holds the whole /64."""
    address = request.remote_addr or "-"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        return str(mapped) if mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


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
    response.set_cookie(COOKIE, value, max_age=max_age, path="/status", httponly=True, samesite="Strict",
                        secure=request.is_secure)


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
    notice = f"Event {int(replayed)} is pending again." if _DIGITS.fullmatch(replayed) else None
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
