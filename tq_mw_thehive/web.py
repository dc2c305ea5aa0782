"""The Flask app: ``POST /cases`` takes TheHive's webhooks, ``GET /healthz`` reports.

The request path does as little as it can: authenticate, bound the size, decode,
read the envelope, commit to the inbox, answer. Everything that talks to ThreatQ
happens later, in the worker, so TheHive (which never re-sends) is answered in
milliseconds and an accepted event is never lost. ``POST /cases`` is answered by a
small WSGI app in front of Flask (``_Door``) with the bytes Flask would send; every
other request goes through Flask. A client error is always a 4xx
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
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

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
        if self._started is None:  # no rejection counted (read without the lock: set only under it)
            return
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


# Built once per process: json.loads(text, parse_constant=…) and jsonify build a new decoder or
# encoder on every call. The encoder writes what jsonify writes (compact, ASCII, keys in order).
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


class _Answer(NamedTuple):
    """What ``POST /cases`` answers: a status, a JSON document and any other headers, written as
    jsonify writes it (compact, ASCII, keys in order, a final newline)."""

    status: int
    document: Dict[str, object]
    headers: Tuple[Tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return (_ENCODER.encode(self.document) + "\n").encode("ascii")

    def response(self):
        """As a Flask response (for Flask's views and error handlers)."""
        response = current_app.response_class(self.body(), status=self.status, content_type="application/json")
        for name, value in self.headers:
            response.headers[name] = value
        return response


def _error_answer(status: int, message: str, **headers: str) -> _Answer:
    return _Answer(status, {"status": "error", "error": message},
                   tuple((name.replace("_", "-"), value) for name, value in headers.items()))


def _error(status: int, message: str, **headers: str):
    return _error_answer(status, message, **headers).response()


def _reject_constant(token: str):
    raise ValueError(f"{token} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(body: bytes):
    """The JSON document in ``body``, or a ``PayloadError`` saying what is wrong with it."""
    if not body.strip():
        raise events.PayloadError("empty body: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise events.PayloadError(f"body is not valid UTF-8 (byte {exc.start})") from None
    try:
        if text.startswith("\ufeff"):  # what json.loads says of it (JSONDecoder.decode does not look)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return text, _DECODER.decode(text)
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


def _too_large(app: Flask, remote: Optional[str]) -> _Answer:
    limit = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
    if app.extensions[EXTENSION]["rejections"].allow(413):
        log.warning("rejected outcome=too_large remote=%s limit_mb=%g", remote, limit)
    metrics.event_rejected("too_large")
    return _error_answer(413, f"body larger than webhook.max_body_mb ({limit:g} MB)")


def _receive(app: Flask, environ: dict) -> _Answer:
    """``POST /cases``: authenticate, read and bound the body, decode, commit to the inbox, answer."""
    started = time.monotonic()
    metrics.event_received()
    ext = app.extensions[EXTENSION]
    remote = environ.get("REMOTE_ADDR")
    auth: WebhookAuth = ext["auth"]
    authorization = environ.get("HTTP_AUTHORIZATION")
    if not auth.check(authorization):
        if ext["rejections"].allow(401):
            log.warning("rejected outcome=unauthorized remote=%s reason=%r", remote,
                        "missing Authorization header" if authorization is None else "wrong credentials")
        headers = {"WWW_Authenticate": auth.challenge} if auth.challenge else {}
        metrics.event_rejected("unauthorized")
        return _error_answer(401, "authentication required", **headers)
    max_length = app.config["MAX_CONTENT_LENGTH"]
    try:  # what Flask's request.get_data() reads (werkzeug's checks of the length)
        body = get_input_stream(environ, max_content_length=max_length).read()
    except RequestEntityTooLarge:
        return _too_large(app, remote)
    if len(body) >= max_length and get_content_length(environ) != len(body):
        # A chunked body is cut at the limit by werkzeug without an error: refuse it here
        # rather than parse a truncated document.
        return _too_large(app, remote)
    try:
        text, payload = _decode(body)
        event = events.parse(payload, alerts=ext["alerts"])
    except events.PayloadError as exc:
        if ext["rejections"].allow(400):
            log.warning("rejected outcome=invalid remote=%s reason=%r", remote, str(exc))
        metrics.event_rejected("invalid")
        return _error_answer(400, str(exc))
    if events.is_self_test(event):  # `tq-mw-thehive check`: stored already done (never synced), then removed
        try:
            self_test_id = ext["inbox"].put_self_test(event, text)
        except sqlite3.Error:
            return _error_answer(503, "state database unavailable; retry later", Retry_After=RETRY_AFTER_S)
        _log_event(event, "self-test", started, inbox_id=self_test_id)
        return _Answer(200, {"status": "self-test", "id": self_test_id, "audit_id": event.audit_id})

    if event.ignore_reason:
        _log_event(event, "ignored", started, reason=event.ignore_reason)
        metrics.event_answered("ignored")
        return _Answer(200, {"status": "ignored", "reason": event.ignore_reason})

    inbox: Inbox = ext["inbox"]
    try:
        result = inbox.put(event, text)
    except sqlite3.Error as exc:
        log.error("event audit=%s type=%s action=%s object=%s outcome=unavailable error=%r",
                  event.audit_id or "-", event.raw_object_type, event.raw_action,
                  event.object_id or "-", str(exc))
        metrics.event_rejected("unavailable")
        return _error_answer(503, "state database unavailable; retry later", Retry_After=RETRY_AFTER_S)
    outcome = "queued" if result.created else "duplicate"
    _log_event(event, outcome, started, inbox_id=result.id)
    metrics.event_answered(outcome)
    if result.created and ext["on_queued"] is not None:
        ext["on_queued"]()
    return _Answer(200, {"status": outcome, "id": result.id, "audit_id": event.audit_id,
                         "object_type": event.object_type, "action": event.action, "object_id": event.object_id})


@bp.route("/cases", methods=["POST"], strict_slashes=False)
def receive_event():
    """Flask's route for ``POST /cases``: its answer when ``_Door`` is not in front (a bare
    ``web.bp``); with it, Flask only answers the other methods (405) and ``OPTIONS``."""
    return _receive(current_app._get_current_object(), request.environ).response()


_CASES_PATHS = ("/cases", "/cases/")  # the route's paths (strict_slashes=False)
_STATUS_LINES: Dict[int, str] = {}


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:  # as werkzeug writes it
        line = _STATUS_LINES[status] = f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"
    return line


class _Door:
    """The WSGI app in front of Flask's: ``POST /cases`` is answered here, everything else by Flask.

    A webhook is the one request the daemon takes by the thousand. Flask's request and app
    contexts, URL routing, hooks, signals and response objects cost a webhook more CPU than
    everything ``_receive`` does besides the commit (docs/performance.md), and give it nothing it
    uses: it reads the environ, and its answer is a status, a JSON body and a few headers, the same
    bytes Flask would send. What Flask does for every request is done here too: the rejection
    summary (``before_request``), and an unexpected error logged and answered 500 in the JSON error
    shape (``_unexpected_error``).
    """

    def __init__(self, app: Flask, flask_wsgi_app: Callable) -> None:
        self.app = app
        self.flask_wsgi_app = flask_wsgi_app

    def __call__(self, environ: dict, start_response: Callable):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") not in _CASES_PATHS:
            return self.flask_wsgi_app(environ, start_response)
        try:
            self.app.extensions[EXTENSION]["rejections"].flush()
            answer = _receive(self.app, environ)
        except Exception:
            log.exception("internal error on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            answer = _error_answer(500, "internal error (logged)")
        body = answer.body()
        headers: List[Tuple[str, str]] = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers.extend(answer.headers)
        start_response(_status_line(answer.status), headers)
        return [body]


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
        return _too_large(current_app._get_current_object(), request.remote_addr).response()
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
        "services": services,  # /metrics reads the quota book and plugins through it
        "on_queued": on_queued,
        "rejections": RejectionLog(),
        "alerts": cfg.sync.alerts,  # sync.alerts: alert events are stored, not answered "ignored"
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
    app.wsgi_app = _Door(app, app.wsgi_app)  # POST /cases without Flask's machinery
    return app
