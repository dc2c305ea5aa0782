"""Serve the app under gunicorn, embedded through its application API.

Flask's development server is never used: gunicorn gives several worker
processes (each with threads), graceful restarts and signal handling that
systemd expects. Everything that can fail at start (config, state database,
log directory) is checked in the master before gunicorn forks, so a bad start
ends with one clear message and a non-zero exit instead of a worker crash loop.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, Optional

from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication

from tq_mw_thehive import metrics, web
from tq_mw_thehive.backfill import catch_up_in_background
from tq_mw_thehive.config import Config
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.worker import Worker

log = logging.getLogger(__name__)


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


# The sync worker of this gunicorn worker process (set in load(), which runs after the fork).
_worker: Optional[Worker] = None


def start_app(cfg: Config, name: str = "tq_mw_thehive"):
    """The WSGI app plus this process's sync worker thread, woken by each new event."""
    global _worker
    metrics.enable_multiprocess(metrics.directory_for(cfg.state_db), master_pid=os.getppid())
    inbox = Inbox(cfg.state_db)
    _worker = Worker(cfg, inbox).start()
    atexit.register(_worker.stop)  # plain `gunicorn … tq_driver:run()` has no worker_exit hook
    if cfg.sync.catch_up and cfg.thehive.api_key:
        # The workers of one gunicorn master share its pid: one catch-up per daemon start.
        catch_up_in_background(cfg, inbox, _worker.owner, _worker.wakeup.set,
                               run_id=f"{socket.gethostname()}:{os.getppid()}")
    return web.create_app(cfg, inbox=inbox, name=name, on_queued=_worker.wakeup.set)


def _worker_exit(server: Any, gunicorn_worker: Any) -> None:
    """On a graceful stop, let the event in progress finish before the process exits."""
    if _worker is not None:
        _worker.stop(timeout=server.cfg.graceful_timeout)


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
    """After the worker's signal handlers and app are in place: from here a SIGTERM is graceful."""
    gunicorn_util.write_error = _json_error  # gunicorn's workers call it through the module
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
            "worker_class": "gthread",
            "threads": self.listen.threads,
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


def serve(cfg: Config, listen: Listen) -> None:
    """Run until gunicorn stops (SIGTERM: finish requests in flight, then exit)."""
    log.info("starting listen=%s auth=%s state_db=%s workers=%d threads=%d", listen.bind,
             cfg.webhook.auth, cfg.state_db, listen.workers, listen.threads)
    metrics.master_prepare(metrics.directory_for(cfg.state_db))  # before the fork: a clean run
    DaemonApplication(cfg, listen).run()
