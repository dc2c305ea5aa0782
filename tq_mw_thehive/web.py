"""The Flask app: ``POST /cases`` takes TheHive's webhooks, ``GET /healthz`` reports.

The request path does as little as it can: authenticate, bound the size, decode,
read the envelope, commit to the inbox, answer. Everything that talks to ThreatQ
happens later, in the worker, so TheHive (which never re-sends) is answered in
milliseconds and an accepted event is never lost. A client error is always a 4xx
with a JSON body saying what is wrong; 503 means "the state database cannot take
it now", never "your request was bad".
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from typing import Callable, Optional

from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from tq_mw_thehive import metrics
from tq_mw_thehive.auth import WebhookAuth  # who may post: auth.py
from tq_mw_thehive.inbox import Inbox, Retention
from tq_mw_thehive.services import Services
from tq_mw_thehive.thehive import events

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)
EXTENSION = "tq_mw_thehive"
RETRY_AFTER_S = "5"
REJECTION_LOG_BURST = 10        # rejections logged one by one per interval (per process)
REJECTION_LOG_INTERVAL_S = 60.0


class RejectionLog:
    """Decides which refused requests (401, 400, 413) get their own log line.

    Anyone who reaches the listener can send requests that are refused, as fast as they like;
    one line each would let them fill the disk and bury the lines that matter. The first
    ``burst`` of an interval are logged one by one (their address and reason are what finds a
    misconfigured TheHive); the rest are only counted, and one summary line per interval says
    how many there were, by status. The summary is written by the first request (of any kind)
    after the interval ends. ``clock`` is injectable so tests need no sleeping.
    """

    def __init__(self, burst: int = REJECTION_LOG_BURST, interval_s: float = REJECTION_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._started: Optional[float] = None
        self._counts: Counter = Counter()

    def allow(self, status: int) -> bool:
        """Count one rejection answered ``status``; True when it should be logged on its own."""
        self.flush()
        with self._lock:
            if self._started is None:
                self._started = self.clock()
            self._counts[status] += 1
            return sum(self._counts.values()) <= self.burst

    def flush(self) -> None:
        """Write the summary of an interval that is over, if some of its rejections were not logged."""
        with self._lock:
            now = self.clock()
            if self._started is None or now - self._started < self.interval_s:
                return
            counts, elapsed = self._counts, now - self._started
            self._started, self._counts = None, Counter()
        total = sum(counts.values())
        if total > self.burst:
            log.warning("rejected %d requests in the last %d s (%s)", total, round(elapsed),
                        ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))


def rejections() -> RejectionLog:
    """This app's ``RejectionLog`` (the /metrics and /status rejections use it too)."""
    return current_app.extensions[EXTENSION]["rejections"]


def _error(status: int, message: str, **headers: str):
    response = jsonify({"status": "error", "error": message})
    response.status_code = status
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _reject_constant(token: str):
    raise ValueError(f"{token} is not valid JSON")


def _decode(body: bytes):
    """The JSON document in ``body``, or a ``PayloadError`` saying what is wrong with it."""
    if not body.strip():
        raise events.PayloadError("empty body: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise events.PayloadError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return text, json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise events.PayloadError("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise events.PayloadError(f"invalid JSON: {exc}") from None


def _log_event(event: events.WebhookEvent, outcome: str, started: float, inbox_id: Optional[int] = None,
               reason: Optional[str] = None) -> None:
    log.info("event audit=%s type=%s action=%s object=%s case=%s shape=%s outcome=%s%s%s ms=%.1f",
             event.audit_id or "-", event.raw_object_type, event.raw_action, event.object_id or "-",
             event.case_id or "-", event.shape, outcome,
             f" inbox_id={inbox_id}" if inbox_id is not None else "",
             f" reason={reason!r}" if reason else "", (time.monotonic() - started) * 1000)


@bp.route("/cases", methods=["POST"], strict_slashes=False)
def receive_event():
    started = time.monotonic()
    metrics.event_received()
    ext = current_app.extensions[EXTENSION]
    auth: WebhookAuth = ext["auth"]
    if not auth.check(request.headers.get("Authorization")):
        if rejections().allow(401):
            log.warning("rejected outcome=unauthorized remote=%s reason=%r", request.remote_addr,
                        "missing Authorization header" if "Authorization" not in request.headers
                        else "wrong credentials")
        headers = {"WWW_Authenticate": auth.challenge} if auth.challenge else {}
        metrics.event_rejected("unauthorized")
        return _error(401, "authentication required", **headers)
    body = request.get_data(cache=False)
    if len(body) >= current_app.config["MAX_CONTENT_LENGTH"] and request.content_length != len(body):
        # A chunked body is cut at the limit by werkzeug without an error: refuse it here
        # rather than parse a truncated document.
        raise RequestEntityTooLarge()
    try:
        text, payload = _decode(body)
        event = events.parse(payload)
    except events.PayloadError as exc:
        if rejections().allow(400):
            log.warning("rejected outcome=invalid remote=%s reason=%r", request.remote_addr, str(exc))
        metrics.event_rejected("invalid")
        return _error(400, str(exc))
    if events.is_self_test(event):  # `tq-mw-thehive check`: stored already done (never synced), then removed
        try:
            self_test_id = ext["inbox"].put_self_test(event, text)
        except sqlite3.Error:
            return _error(503, "state database unavailable; retry later", Retry_After=RETRY_AFTER_S)
        _log_event(event, "self-test", started, inbox_id=self_test_id)
        return jsonify({"status": "self-test", "id": self_test_id, "audit_id": event.audit_id})

    if event.ignore_reason:
        _log_event(event, "ignored", started, reason=event.ignore_reason)
        metrics.event_answered("ignored")
        return jsonify({"status": "ignored", "reason": event.ignore_reason})

    inbox: Inbox = ext["inbox"]
    try:
        result = inbox.put(event, text)
    except sqlite3.Error as exc:
        log.error("event audit=%s type=%s action=%s object=%s outcome=unavailable error=%r",
                  event.audit_id or "-", event.raw_object_type, event.raw_action,
                  event.object_id or "-", str(exc))
        metrics.event_rejected("unavailable")
        return _error(503, "state database unavailable; retry later", Retry_After=RETRY_AFTER_S)
    outcome = "queued" if result.created else "duplicate"
    _log_event(event, outcome, started, inbox_id=result.id)
    metrics.event_answered(outcome)
    if result.created and ext["on_queued"] is not None:
        ext["on_queued"]()
    return jsonify({"status": outcome, "id": result.id, "audit_id": event.audit_id,
                    "object_type": event.object_type, "action": event.action,
                    "object_id": event.object_id})


@bp.route("/healthz", methods=["GET"])
def healthz():
    inbox: Inbox = current_app.extensions[EXTENSION]["inbox"]
    try:
        inbox.check_writable()
        counts = inbox.stats()
    except sqlite3.Error as exc:
        log.error("healthz outcome=unavailable error=%r", str(exc))
        return jsonify({"status": "unavailable", "error": f"state database cannot be written: {exc}"}), 503
    return jsonify({"status": "ok", "inbox": counts})


def _http_error(exc: HTTPException):
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        if rejections().allow(413):
            log.warning("rejected outcome=too_large remote=%s limit_mb=%g", request.remote_addr, limit)
        metrics.event_rejected("too_large")
        return _error(413, f"body larger than webhook.max_body_mb ({limit:g} MB)")
    response = _error(exc.code or 500, exc.description or exc.name)
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unexpected_error(exc: Exception):
    log.exception("internal error on %s %s", request.method, request.path)
    return _error(500, "internal error (logged)")


def create_app(services: Services, name: str = "tq_mw_thehive", on_queued: Optional[Callable[[], None]] = None,
               retention: bool = False) -> Flask:
    """Build the WSGI app on ``services`` (its config, its inbox).

    The database must already be migrated (``startup.prepare``). Building the app does
    not touch it, so a gunicorn worker that boots while another process holds a write
    lock still boots, and answers 503 until the lock is gone, instead of failing to
    boot (which makes gunicorn stop the whole service). ``on_queued`` is called after
    each new event is stored (it wakes this process's sync worker).

    ``retention`` starts the deletion of done events older than ``inbox.keep_done`` in a
    background thread (``inbox.Retention``; its first pass a minute later, so never while the
    worker boots): the daemon's workers ask for it (``server.start_app``), a test or tool that
    only wants the app does not.
    """
    cfg = services.cfg
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = int(cfg.webhook.max_body_mb * 1024 * 1024)
    app.json.sort_keys = False
    app.extensions[EXTENSION] = {
        "config": cfg,
        "auth": WebhookAuth(cfg.webhook),
        "inbox": services.inbox,
        "on_queued": on_queued,
        "rejections": RejectionLog(),
    }
    if retention:
        ext = app.extensions[EXTENSION]
        ext["retention"] = Retention(ext["inbox"], cfg.inbox.keep_done).start()
    app.before_request(lambda: rejections().flush())  # a flood's summary once its interval is over
    app.register_blueprint(bp)
    app.register_blueprint(metrics.bp)  # GET /metrics (metrics.py)
    from tq_mw_thehive.status_page import register_status_page  # GET /status (status_page.py)
    register_status_page(app, services, on_replayed=on_queued)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app
