"""Who may call what: TheHive's webhook calls (``WebhookAuth``) and the status page's admin
(``AdminAuth`` and its session cookie, ``Sessions``, ``LoginLimiter``).

The webhook caller presents the secret configured for TheHive's endpoint on every request. The
admin presents ``web.admin_token``: a script as ``Authorization: Bearer <token>`` on every
request, a browser once, through the login form, for a session cookie (HttpOnly,
SameSite=Strict) signed with a key derived from the token, so changing the token ends every
session. The session is also a row in the state database, which logout deletes: a cookie copied
before logout is worthless after it. Failed admin tokens (form or Bearer) are limited per client
address and overall, in the state database too, so the limit holds whichever gunicorn worker
answers. Every comparison with a secret is ``hmac.compare_digest``.

(``GET /metrics`` checks its own ``web.metrics_token`` in metrics.py.)
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import sqlite3
import time
from typing import Callable, NamedTuple, Optional, Tuple

from flask import Response

from tq_mw_thehive import state
from tq_mw_thehive.config import WebhookConfig

COOKIE = "tq_mw_status"
SESSION_MAX_AGE_S = 12 * 3600
# Failed admin tokens allowed per minute from one address, and from all addresses together
# (someone guessing from many addresses); beyond either, every attempt gets 429 until the
# oldest failure leaves the window, the right token too: otherwise guessing would go on.
LOGIN_WINDOW_S = 60.0
LOGIN_FAILURES_PER_CLIENT = 5
LOGIN_FAILURES_OVERALL = 50

DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes "²", which int() refuses


# --- webhook callers ----------------------------------------------------------------------------

class WebhookAuth:
    """Checks ``Authorization`` the way TheHive's endpoint ``auth`` block sends it.

    bearer: ``Bearer <token>``; key: the raw token as the whole header; basic:
    HTTP Basic. Credentials are compared with ``hmac.compare_digest`` and every
    failure takes the same path, so timing tells a caller nothing.
    """

    def __init__(self, cfg: WebhookConfig) -> None:
        self.mode = cfg.auth
        self._token = (cfg.token or "").encode("utf-8")
        self._username = (cfg.username or "").encode("utf-8")
        self._password = (cfg.password or "").encode("utf-8")

    def __repr__(self) -> str:
        return f"WebhookAuth(mode={self.mode!r})"

    @property
    def challenge(self) -> Optional[str]:
        return {"bearer": 'Bearer realm="tq-mw-thehive"', "basic": 'Basic realm="tq-mw-thehive"'}.get(self.mode)

    def check(self, header: Optional[str]) -> bool:
        if self.mode == "none":
            return True
        presented = (header or "").strip().encode("utf-8", "replace")
        if self.mode == "key":
            return hmac.compare_digest(presented, self._token)
        scheme, _, credential = presented.partition(b" ")
        credential = credential.strip()
        if self.mode == "bearer":
            ok = hmac.compare_digest(credential, self._token)
            return ok and scheme.lower() == b"bearer"
        user, password = self._basic_pair(credential)
        ok_user = hmac.compare_digest(user, self._username)
        ok_password = hmac.compare_digest(password, self._password)
        return ok_user and ok_password and scheme.lower() == b"basic"

    @staticmethod
    def _basic_pair(credential: bytes) -> Tuple[bytes, bytes]:
        try:
            decoded = base64.b64decode(credential, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        user, _, password = decoded.partition(b":")
        return user, password


# --- the status page's admin --------------------------------------------------------------------

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
        if not (DIGITS.fullmatch(issued) and nonce and mac):
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


def set_session_cookie(response: Response, value: str, max_age: int, *, secure: bool) -> None:
    """Set (or, with ``max_age`` 0, clear) the session cookie: only for /status, never for scripts."""
    response.set_cookie(COOKIE, value, max_age=max_age, path="/status", httponly=True, samesite="Strict",
                        secure=secure)


def login_client(address: Optional[str]) -> str:
    """Who a failed login is counted against: the TCP peer, never X-Forwarded-For (anyone can
    write that; behind a reverse proxy every client shares the proxy's limit, which errs on the
    safe side). An IPv6 peer counts by its /64: one host usually holds the whole /64."""
    address = address or "-"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        return str(mapped) if mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


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
            state.exclusive(db, "status_login_failures")  # count, then insert: one at a time
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
            if getattr(db, "dialect", "sqlite") == "postgresql":
                row_id = db.execute("INSERT INTO status_login_failures (client, at) VALUES (?, ?) RETURNING rowid",
                                    (client, now)).fetchone()[0]
            else:
                row_id = db.execute("INSERT INTO status_login_failures (client, at) VALUES (?, ?)",
                                    (client, now)).lastrowid
            return Attempt(row=row_id, fills=fills)

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
            db.execute("INSERT INTO status_sessions (digest, expires_at) VALUES (?, ?) "
                       "ON CONFLICT (digest) DO UPDATE SET expires_at = excluded.expires_at",
                       (self._digest(nonce), now + SESSION_MAX_AGE_S))

        self.write(add)

    def live(self, nonce: str) -> bool:
        return self.db.execute("SELECT 1 FROM status_sessions WHERE digest = ? AND expires_at > ?",
                               (self._digest(nonce), self.clock())).fetchone() is not None

    def revoke(self, nonce: str) -> None:
        self.write(lambda db: db.execute("DELETE FROM status_sessions WHERE digest = ?", (self._digest(nonce),)))
