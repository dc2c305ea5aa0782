"""Serve the app under gunicorn, embedded through its application API.

Flask's development server is never used: gunicorn gives several worker
processes (each with threads), graceful restarts and signal handling that
systemd expects. Everything that can fail at start (config, state database,
log directory, the listening address) is checked in the master before gunicorn forks, so a
bad start ends with one clear message and a non-zero exit instead of a worker crash loop (or,
for a port in use, gunicorn's five "Connection in use" retries).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from gunicorn import config as gunicorn_config
from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication

from tq_mw_thehive import intake, metrics, web
from tq_mw_thehive.backfill import catch_up_in_background
from tq_mw_thehive.reconcile import Reconciler
from tq_mw_thehive.writeback import Sender
from tq_mw_thehive.config import Config
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.services import Services
from tq_mw_thehive.startup import process_alive
from tq_mw_thehive.worker import Worker

log = logging.getLogger(__name__)
# threads per worker: a slow ThreatQ call never blocks the whole process. _post_worker_init makes
# it an intake.IntakeWorker (requests read whole in the event loop before a thread takes them).
WORKER_CLASS = "gthread"


@dataclass(frozen=True)
class Listen:
    ip: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    threads: int = 4
    timeout_s: int = 60
    graceful_timeout_s: int = 30

    @property
    def bind(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class RootLogger(glogging.Logger):
    """Gunicorn's messages go through our handlers (file, console, redaction), not its own."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        self.error_log.setLevel(logging.NOTSET)

    def access(self, resp, req, environ, request_time) -> None:
        """One line per event is logged by the app itself; gunicorn's access line would repeat it."""

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """gunicorn's "Current configuration" is one 4 KB record of ~100 settings, which our
        one-record-one-line formatter makes one unreadable line: say the settings we changed
        instead, one per line."""
        if isinstance(msg, str) and msg.startswith("Current configuration:"):
            for name, value in changed_settings(self.cfg):
                self.error_log.debug("gunicorn setting %s=%s", name, value)
            return
        super().debug(msg, *args, **kwargs)


_SHOWN_MAX = 120


def _shown(value: Any) -> str:
    """A setting's value for a log line: hooks by name, anything long cut short."""
    if callable(value):
        text = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    else:
        text = repr(value)
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX - 3] + "..."


def changed_settings(cfg: Any) -> List[Tuple[str, str]]:
    """(name, value) of each gunicorn setting that differs from gunicorn's default, by name."""
    defaults = gunicorn_config.Config().settings
    return [(name, _shown(setting.value)) for name, setting in sorted(cfg.settings.items())
            if name not in defaults or defaults[name].value != setting.value]


def start_app(cfg: Config, name: str = "tq_mw_thehive"):
    """The WSGI app plus this process's sync worker thread, woken by each new event (runs in
    each gunicorn worker, after the fork). The sync worker is kept in the app's extension,
    where the ``worker_exit`` hook finds it."""
    intake.configure(int(cfg.webhook.max_body_mb * 1024 * 1024))  # bodies above it are not buffered
    metrics.enable_multiprocess(metrics.directory_for(cfg.local_dir), master_pid=os.getppid())
    services = Services(cfg)
    worker = Worker(services).start()
    atexit.register(worker.stop)  # plain `gunicorn … tq_driver:run()` has no worker_exit hook
    if cfg.sync.catch_up and cfg.thehive.api_key:
        # The workers of one gunicorn master share its pid: one catch-up per daemon start.
        catch_up_in_background(services, worker.owner, worker.wakeup.set,
                               run_id=f"{socket.gethostname()}:{os.getppid()}")
    if services.outbox is not None:
        sender = Sender(services.outbox, services.thehive(), worker.owner, cfg.writeback.case_custom_field).start()
        services.outbox.on_due = sender.wake.set
        atexit.register(sender.stop)
    drainer = services.drainer(worker.owner)  # lookups that waited for quota (enrichment/deferred.py)
    if drainer is not None:
        atexit.register(drainer.start().stop)
    if cfg.sync.reconcile_every and cfg.thehive.api_key:
        reconciler = Reconciler(services, worker.owner, worker.wakeup.set, cfg.sync.reconcile_every).start()
        atexit.register(reconciler.stop)
    app = web.create_app(services, name=name, on_queued=worker.wakeup.set, retention=True)
    app.extensions[web.EXTENSION]["worker"] = worker
    return app


# Left of gunicorn's graceful_timeout for this worker to say what it abandoned before the
# master kills it.
_EXIT_MARGIN_S = 2.0


def _worker_exit(server: Any, gunicorn_worker: Any) -> None:
    """On a graceful stop, let the event in progress finish before the process exits."""
    app = getattr(gunicorn_worker, "wsgi", None)
    worker = getattr(app, "extensions", {}).get(web.EXTENSION, {}).get("worker")
    if worker is None:
        return
    waited = max(1.0, server.cfg.graceful_timeout - _EXIT_MARGIN_S)
    finished = worker.stop(timeout=waited)
    atexit.unregister(worker.stop)  # waited already: the process exits now, not after another wait
    if not finished:
        log.warning("stopping with an event still in progress after %.0f s (ThreatQ or TheHive slow): "
                    "it is abandoned to its lease and redone at the next start", waited)


def _child_exit(server: Any, gunicorn_worker: Any) -> None:
    """In the master, after a worker is gone: prometheus_client's bookkeeping for its pid."""
    metrics.process_gone(gunicorn_worker.pid)


_DRAINED_BY_GUNICORN = 64 * 1024


def _json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own refusals (header too long, too many headers…) in our JSON error shape."""
    body = json.dumps({"status": "error", "error": f"{reason}: {mesg}" if mesg else reason}).encode("utf-8")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1", "replace") + body)


def _post_worker_init(gunicorn_worker: Any) -> None:
    """After the worker's signal handlers and app are in place: from here a SIGTERM is graceful.
    The gthread worker becomes an ``intake.IntakeWorker`` here, before its loop starts: each
    request is read whole without a thread, so slow clients cannot hold the threads."""
    gunicorn_util.write_error = _json_error  # gunicorn's workers call it through the module
    intake.install(gunicorn_worker)
    log.info("worker ready pid=%d", gunicorn_worker.pid)


def _pre_request(gunicorn_worker: Any, req: Any) -> None:
    """Close the connection after a large or chunked body: when the app refuses it unread (401,
    413), gunicorn drains only 64 KiB, and a next request on the same connection would be lost."""
    for name, value in req.headers:
        if (name == "CONTENT-LENGTH" and value.isdigit() and int(value) > _DRAINED_BY_GUNICORN) or \
                (name == "TRANSFER-ENCODING" and "chunked" in value.lower()):
            req.must_close = True
            return


def _when_ready(server: Any) -> None:
    addresses = ",".join(f"{sock.sock.getsockname()[0]}:{sock.sock.getsockname()[1]}"
                         for sock in server.LISTENERS)
    log.info("ready listening=%s workers=%s", addresses, server.cfg.workers)


class DaemonApplication(BaseApplication):
    def __init__(self, cfg: Config, listen: Listen, app_name: str = "tq_mw_thehive") -> None:
        self.app_config = cfg
        self.listen = listen
        self.app_name = app_name
        super().__init__()

    def load_config(self) -> None:
        settings: Dict[str, Any] = {
            "bind": [self.listen.bind],
            "workers": self.listen.workers,
            "worker_class": WORKER_CLASS,
            "threads": self.listen.threads,
            "worker_connections": intake.WORKER_CONNECTIONS,
            "timeout": self.listen.timeout_s,
            "graceful_timeout": self.listen.graceful_timeout_s,
            "logger_class": RootLogger,
            "accesslog": None,
            "proc_name": "tq-mw-thehive",
            "when_ready": _when_ready,
            "worker_exit": _worker_exit,
            "child_exit": _child_exit,
            "post_worker_init": _post_worker_init,
            "pre_request": _pre_request,
        }
        # gunicorn >= 25 opens a control socket under $HOME, which a hardened unit forbids.
        if "control_socket_disable" in self.cfg.settings:
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        return start_app(self.app_config, self.app_name)


def bind_problem(listen: Listen) -> Optional[str]:
    """Why gunicorn could not listen on ``listen`` ("address already in use"…), or None.

    Binds and closes a socket the way gunicorn will (``SO_REUSEADDR``: a port in TIME_WAIT is
    free, one another process listens on is not). Port 0 picks a free port: nothing to check.
    Nor is there when gunicorn is handed its sockets (a USR2 re-exec, systemd socket activation):
    the port is then in use by design, by the very socket it will serve on.
    """
    if listen.port == 0 or "GUNICORN_FD" in os.environ or "LISTEN_FDS" in os.environ:
        return None
    family = socket.AF_INET6 if ":" in listen.ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listen.ip, listen.port))
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def _console_logged() -> bool:
    """Whether log lines already reach stderr (no ``-ll``, or ``-v stdout``)."""
    return any(type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr
               for h in logging.getLogger().handlers)


def serve(cfg: Config, listen: Listen) -> None:
    """Run until gunicorn stops (SIGTERM: finish requests in flight, then exit).

    A listening address that cannot be bound ends the start here, with one line (in the log,
    and on stderr when the log is a file) and exit code 2: -p/-li is what to change.
    """
    problem = bind_problem(listen)
    if problem:
        log.error("cannot listen on %s: %s", listen.bind, problem)
        if not _console_logged():
            print(f"tq-mw-thehive: error: cannot listen on {listen.bind}: {problem}", file=sys.stderr)
        sys.exit(2)
    log.info("starting listen=%s auth=%s state_db=%s workers=%d threads=%d worker_class=%s "
             "timeout=%ds", listen.bind, cfg.webhook.auth, cfg.state_db, listen.workers, listen.threads,
             WORKER_CLASS, listen.timeout_s)
    metrics.master_prepare(metrics.directory_for(cfg.local_dir))  # before the fork: a clean run
    try:
        DaemonApplication(cfg, listen).run()
    except SystemExit as stopped:
        code = stopped.code
    else:
        code = 0
    _reap_workers()
    abandoned = _release_abandoned(cfg)
    if abandoned:
        log.error("stopped with %d event(s) abandoned in progress; their leases are released and the next "
                  "start (or another daemon on this database) redoes them", abandoned)
        code = code or 1
    sys.exit(code)


def _reap_workers(timeout_s: float = 5.0) -> None:
    """Wait until gunicorn's workers are gone: it sends the last SIGKILL without waiting, and a
    worker still alive would keep its lease from being counted and freed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left
        if pid == 0:
            time.sleep(0.05)


def _release_abandoned(cfg: Config) -> int:
    """Events that workers of this host left in progress (the graceful timeout ran out): freed,
    so nothing waits out a lease; counted, so the exit code can say that something was cut."""
    try:
        inbox = Inbox(cfg.state_db)
        try:
            return inbox.release_leases(f"{socket.gethostname()}:", process_alive)
        finally:
            inbox.close()
    except sqlite3.Error as exc:
        log.warning("cannot check the inbox for events left in progress: %s", exc)
        return 0
