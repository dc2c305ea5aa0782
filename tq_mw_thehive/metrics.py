"""Prometheus metrics: every counter and histogram of the daemon, and ``GET /metrics``.

Why it is shaped this way:

* gunicorn runs several worker processes and a scrape reaches any one of them, so under
  gunicorn the values live in prometheus_client's multiprocess files (one per process, in
  ``<state db dir>/.metrics``) and a scrape adds up every process's file. The directory is
  wiped when a daemon starts (by the embedded master, or by the first worker of a plain
  ``gunicorn`` master), never when one worker restarts: a dead worker's counts stay in the
  totals, so a restart neither loses nor double-counts events.
* prometheus_client picks its value store when a metric value is created, from
  ``PROMETHEUS_MULTIPROC_DIR``; the state directory is known only after the configuration is
  read, long after this module is imported. ``enable_multiprocess`` therefore sets the
  variable, switches the value store and builds the metric objects again, before the worker
  records anything. Every other process (CLI commands, tests with Flask's test client) keeps
  the default in-process values.
* Inbox depth is read from the database at scrape time, so it is right whichever worker
  answers and never drifts. So are the enrichment quotas (calls used and left per plugin, the
  lookups waiting for quota, the last 429): every process counts against the same rows.
* ``web.metrics_token``, when set, is required as ``Authorization: Bearer <token>``: the
  scrape is served on the webhook listener, which may be reachable by more than Prometheus.
* Labels are low-cardinality on purpose: ThreatQ paths become templates
  (``/api/indicators/{id}``), rejection reasons and outcomes are fixed words.

Other modules record through the small functions below (one line at each point of
interest), never through the metric objects, which are replaced on the switch.
"""
from __future__ import annotations

import fcntl
import hmac
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import requests
from flask import Blueprint, Response, current_app, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric

from tq_mw_thehive.enrichment.quota import Limits, limits_for

log = logging.getLogger(__name__)

PREFIX = "tq_mw_thehive_"
DIRECTORY_NAME = ".metrics"
ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNER_FILE = "owner"
# The value files this package's metric types use (prometheus_client names them <type>_<pid>.db).
_VALUE_FILE_TYPES = ("counter", "histogram")
# Reserved per value file before prometheus_client maps it: 4 times its first size, so the first
# growths need no new block either.
PREALLOCATE_BYTES = 256 * 1024
_LOCK_FILE = ".lock"
# The classic text format, which every Prometheus version reads (our names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latencies: a loopback ThreatQ answers in milliseconds, a loaded one in seconds; the client's
# read timeout is 30 s by default, plugins are cut at enrichment.timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECT_REASONS = ("unauthorized", "invalid", "too_large", "unavailable")
QUOTA_WINDOWS = ("minute", "day")  # the ``window`` label of the quota gauges: QuotaBook.usage's keys
_NUMBER = re.compile(r"^\d+$")

bp = Blueprint("metrics", __name__)


class _Metrics:
    """The metric objects; built again when the value store changes (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(PREFIX + "events_received", "POST /cases requests (webhook events) received",
                                registry=r)
        self.queued = Counter(PREFIX + "events_queued", "Events stored in the inbox for the first time", registry=r)
        self.duplicate = Counter(PREFIX + "events_duplicate", "Events already in the inbox (same dedup key)",
                                 registry=r)
        self.ignored = Counter(PREFIX + "events_ignored", "Events answered 'ignored' (types that are not synced)",
                               registry=r)
        self.rejected = Counter(PREFIX + "events_rejected", "Webhook requests refused, by reason", ["reason"],
                                registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.sweeps = Counter(PREFIX + "reconcile_sweeps", "Periodic reconciliation sweeps, by outcome "
                              "(ok, failed, first)", ["outcome"], registry=r)
        self.swept_found = Counter(PREFIX + "reconcile_found", "Changes found by reconciliation sweeps that no "
                                   "webhook brought (queued by the sweep)", registry=r)
        self.processed = Counter(PREFIX + "events_processed", "Inbox events handled by a sync worker, by outcome",
                                 ["outcome"], registry=r)
        self.threatq_seconds = Histogram(PREFIX + "threatq_request_duration_seconds",
                                         "ThreatQ HTTP requests (each attempt), by method and endpoint template",
                                         ["method", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.threatq_errors = Counter(PREFIX + "threatq_request_errors",
                                      "ThreatQ requests answered >= 400 or not answered, by status",
                                      ["method", "endpoint", "status"], registry=r)
        self.cache_hits = Counter(PREFIX + "enrichment_cache_hits", "Enrichment answers taken from the cache",
                                  ["plugin"], registry=r)
        self.cache_misses = Counter(PREFIX + "enrichment_cache_misses",
                                    "Enrichment lookups not in the cache (a plugin call follows)", ["plugin"],
                                    registry=r)
        self.plugin_seconds = Histogram(PREFIX + "enrichment_plugin_duration_seconds",
                                        "Enrichment plugin lookups (calls, not cache hits), by plugin", ["plugin"],
                                        buckets=LATENCY_BUCKETS, registry=r)


_m = _Metrics()
_directory: Optional[Path] = None


# ------------------------------------------------------------------ recording (one line at each call site)


def event_received() -> None:
    _m.received.inc()


_ANSWERED = {"queued": "queued", "duplicate": "duplicate", "ignored": "ignored"}  # outcome: counter


def event_answered(outcome: str) -> None:
    """``queued``, ``duplicate`` or ``ignored``: what ``POST /cases`` answered with a 200."""
    getattr(_m, _ANSWERED[outcome]).inc()


def event_rejected(reason: str) -> None:
    """One of ``REJECT_REASONS``: a 401, 400, 413 or 503 answer to ``POST /cases``."""
    _m.rejected.labels(reason).inc()


def reconcile_swept(outcome: str, found: int) -> None:
    """A reconciliation sweep ended (``ok``, ``failed`` or ``first``) having queued ``found`` changes."""
    _m.sweeps.labels(outcome).inc()
    if found:
        _m.swept_found.inc(found)


def event_processed(outcome: str) -> None:
    """The worker's outcome word for one attempt (synced, unchanged, stale, retry, dead…)."""
    _m.processed.labels(outcome).inc()


def endpoint_template(path: str) -> str:
    """``/api/indicators/12/attributes/7`` → ``/api/indicators/{id}/attributes/{id}``: one series per call kind."""
    return "/".join("{id}" if _NUMBER.match(part) else part for part in path.split("?", 1)[0].split("/"))


def _no_answer(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection_error"
    return "request_error"


def threatq_request(method: str, path: str, seconds: float, status: Optional[int] = None,
                    error: Optional[BaseException] = None) -> None:
    """One HTTP attempt to ThreatQ: its duration, and an error when the answer is >= 400 or missing."""
    endpoint = endpoint_template(path)
    _m.threatq_seconds.labels(method, endpoint).observe(seconds)
    if error is not None:
        _m.threatq_errors.labels(method, endpoint, _no_answer(error)).inc()
    elif status is not None and status >= 400:
        _m.threatq_errors.labels(method, endpoint, str(status)).inc()


def enrichment_cache(plugin: str, hit: bool) -> None:
    (_m.cache_hits if hit else _m.cache_misses).labels(plugin).inc()


def plugin_ran(run: Any) -> None:
    """A ``runner.PluginRun``: its duration when the plugin was actually called."""
    if run.status in ("fetched", "not_found", "error") and run.ms:
        _m.plugin_seconds.labels(run.plugin).observe(run.ms / 1000)


# ------------------------------------------------------------------ multiprocess mode


def directory_for(local_dir: Union[str, Path]) -> Path:
    """Where the per-process metric files of the daemon live (``Config.local_dir``: beside a
    SQLite file, else in the config directory)."""
    return Path(local_dir) / DIRECTORY_NAME


def _process_stamp(pid: int) -> str:
    """The pid and its start time: a new master with a reused pid (pid 1 in a container) is new."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            started = stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{pid}:{started}"


def prepare_directory(directory: Path, master_pid: int, fresh: bool = False) -> None:
    """Create ``directory`` (0700) and wipe it unless it already belongs to ``master_pid``'s run.

    ``fresh``: wipe regardless (the embedded master, which is starting). A worker passes its
    master's pid: the first worker of a plain ``gunicorn`` master wipes the files of the
    previous run, every later or restarted worker keeps them. Serialised with ``flock``.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    stamp = _process_stamp(master_pid)
    owner = directory / _OWNER_FILE
    with open(directory / _LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = owner.read_text(encoding="ascii", errors="replace") if owner.exists() else None
        if fresh or current != stamp:
            for stale in directory.glob("*.db"):
                stale.unlink()
            tmp = directory / f".{_OWNER_FILE}.{os.getpid()}"
            tmp.write_text(stamp, encoding="ascii")
            os.replace(tmp, owner)


def _preallocate(directory: Path, pid: int) -> None:
    """Reserve this process's value files on disk before prometheus_client maps them.

    prometheus_client extends a new file with ``truncate`` (a hole) and writes through an mmap:
    on a full file system the first write into the hole is a SIGBUS, which kills a restarted
    worker before it answers anything, and gunicorn forks it again and again. Blocks reserved
    here (``posix_fallocate``) can be written; no space raises ``OSError`` (ENOSPC) instead.
    """
    for typ in _VALUE_FILE_TYPES:
        path = directory / f"{typ}_{pid}.db"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = 0
        try:
            size = os.fstat(fd).st_size
            os.posix_fallocate(fd, 0, max(size, PREALLOCATE_BYTES))
        except OSError:
            if size == 0:  # an empty file would be mapped later as a hole again: leave none
                os.unlink(path)
            raise
        finally:
            os.close(fd)


def enable_multiprocess(directory: Path, master_pid: int) -> bool:
    """In a gunicorn worker, before anything is recorded: values go to ``directory``'s files.

    False (and a warning) when the directory cannot be used (permissions, a full disk): the
    worker then serves its own counts only, which beats failing to boot over metrics (or dying
    of SIGBUS, see ``_preallocate``); its webhooks still get 503 from the database meanwhile.
    """
    global _m, _directory
    if _directory == directory:
        return True
    try:
        prepare_directory(directory, master_pid)
        _preallocate(directory, os.getpid())
    except OSError as exc:
        log.warning("metrics directory %s cannot be used (%s): /metrics shows one worker's counts only",
                    directory, exc)
        return False
    os.environ[ENV] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _directory = directory
    _m = _Metrics()
    return True


def master_prepare(directory: Path) -> None:
    """In the embedded gunicorn master, before it forks: a clean directory for this run."""
    try:
        prepare_directory(directory, os.getpid(), fresh=True)
    except OSError as exc:
        log.warning("metrics directory %s cannot be prepared: %s", directory, exc)
        return
    os.environ[ENV] = str(directory)  # for process_gone() in this master


def process_gone(pid: int) -> None:
    """gunicorn's ``child_exit``: drop the dead worker's live-gauge files (its counters stay)."""
    path = os.environ.get(ENV)
    if path and os.path.isdir(path):
        multiprocess.mark_process_dead(pid, path)


# ------------------------------------------------------------------ exposition


class InboxCollector:
    """Inbox depth from the database at scrape time (the same numbers as ``/healthz``)."""

    STATES = ("queued", "in_progress", "waiting_retry", "done", "dead")

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.inbox.stats()
        except sqlite3.Error as exc:  # a locked or broken database must not break the scrape
            log.warning("metrics: inbox depth not read: %s", exc)
            return
        yield GaugeMetricFamily(PREFIX + "inbox_depth", "Inbox events not done or dead yet (pending)",
                                value=stats["pending"])
        by_state = GaugeMetricFamily(PREFIX + "inbox_events", "Inbox events by state", labels=["state"])
        for state in self.STATES:
            by_state.add_metric([state], stats[state])
        yield by_state
        yield GaugeMetricFamily(PREFIX + "inbox_oldest_pending_age_seconds",
                                "Age of the oldest pending event (0 when none)",
                                value=stats["oldest_pending_age_s"] or 0.0)


def quota_usage(services: Any) -> List[Dict[str, Any]]:
    """``QuotaBook.usage`` of the plugins worth showing (the status page and the scrape show the same).

    Kept: a plugin with a limit in force, lookups queued or a 429 on record; an offline plugin
    with none of these is only noise. A plugin that did not load has no limit in force (its queue
    and 429s still show; its declarations are unknown). [] when ``enrichment.enabled`` is false:
    nothing calls, so no limit is in force, and the plugins need not be imported for a scrape.
    """
    enrichment = services.cfg.enrichment
    if not enrichment.enabled:
        return []
    limits: Dict[str, Limits] = {p.name: limits_for(p, enrichment.limits) for p in services.registry.loaded()}
    for plugin in services.registry.plugins:  # a name taken twice keeps the loaded one's limits
        limits.setdefault(plugin.name, Limits())
    return [row for row in services.quota.usage(limits) if _worth_showing(row)]


def _worth_showing(row: Dict[str, Any]) -> bool:
    limits = row["limits"]
    return (limits["per_minute"] is not None or limits["per_day"] is not None or bool(row["deferred"])
            or row["last_429"] is not None)


def quota_families(rows: List[Dict[str, Any]]) -> Iterator[Metric]:
    """The quota gauges of ``quota_usage``'s rows; every family is listed, with no series when no row."""
    used = GaugeMetricFamily(PREFIX + "enrichment_quota_used", "Calls of an online plugin in the sliding minute "
                             "and the UTC day (summed over its API keys)", labels=["plugin", "window"])
    left = GaugeMetricFamily(PREFIX + "enrichment_quota_left", "Calls left before the plugin's limit of the window "
                             "(only where it has that limit)", labels=["plugin", "window"])
    deferred = GaugeMetricFamily(PREFIX + "enrichment_deferred", "Lookups waiting for quota (table "
                                 "enrichment_deferred)", labels=["plugin"])
    oldest = GaugeMetricFamily(PREFIX + "enrichment_deferred_oldest_age_seconds", "Age of the plugin's oldest "
                               "lookup waiting for quota (0 when none)", labels=["plugin"])
    last_429 = GaugeMetricFamily(PREFIX + "enrichment_last_429_timestamp_seconds", "When the plugin's service last "
                                 "answered 429 (Unix time; no series when it never did)", labels=["plugin"])
    for row in rows:
        name = row["plugin"]
        for window in QUOTA_WINDOWS:
            used.add_metric([name, window], row[f"used_{window}"])
            if row[f"left_{window}"] is not None:
                left.add_metric([name, window], row[f"left_{window}"])
        deferred.add_metric([name], row["deferred"])
        oldest.add_metric([name], row["oldest_deferred_s"] or 0.0)
        if row["last_429"] is not None:
            last_429.add_metric([name], row["last_429"])
    yield from (used, left, deferred, oldest, last_429)


class QuotaCollector:
    """Enrichment quotas from the database at scrape time: every process counts against the same
    rows, so whichever worker answers gives the same figures."""

    def __init__(self, usage: Callable[[], List[Dict[str, Any]]]) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self.usage()
        except sqlite3.Error as exc:  # as for the inbox: the scrape answers without these figures
            log.debug("metrics: enrichment quotas not read: %s", exc)  # the inbox collector warns already
            return
        yield from quota_families(rows)


class _Delegate:
    """The in-process registry as one collector of the scrape registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return self.registry.collect()


def exposition(inbox: Any = None, quota: Optional[Callable[[], List[Dict[str, Any]]]] = None) -> bytes:
    """The Prometheus text exposition: every process's values (multiprocess) or this one's.

    ``inbox``: an ``Inbox`` whose depth is read now; ``quota``: what returns the quota rows now
    (``quota_usage`` of the app's services).
    """
    registry = CollectorRegistry()
    if _directory is not None:
        multiprocess.MultiProcessCollector(registry, path=str(_directory))
    else:
        registry.register(_Delegate(_m.registry))
    if inbox is not None:
        registry.register(InboxCollector(inbox))
    if quota is not None:
        registry.register(QuotaCollector(quota))
    return generate_latest(registry)


def _token_presented(token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, credential = (request.headers.get("Authorization") or "").strip().partition(" ")
    ok = hmac.compare_digest(credential.strip().encode("utf-8", "replace"), token.encode("utf-8"))
    return ok and scheme.lower() == "bearer"


@bp.route("/metrics", methods=["GET"])
def scrape() -> Response:
    """Open like Prometheus exporters unless ``web.metrics_token`` is set (docs/operations.md, Metrics)."""
    from tq_mw_thehive.web import EXTENSION, _error, rejections  # web imports this module

    ext = current_app.extensions[EXTENSION]
    token = ext["config"].web.metrics_token
    if token and not _token_presented(token):
        if rejections().allow(401):
            log.warning("rejected outcome=unauthorized remote=%s path=/metrics reason=%r", request.remote_addr,
                        "missing Authorization header" if "Authorization" not in request.headers
                        else "wrong credentials")
        return _error(401, "authentication required", WWW_Authenticate='Bearer realm="tq-mw-thehive metrics"')
    services = ext.get("services")
    quota = None if services is None else (lambda: quota_usage(services))
    return Response(exposition(ext["inbox"], quota), mimetype=None, content_type=CONTENT_TYPE)
