#!/usr/bin/env python3
"""Bounded load and soak test of the real daemon on loopback.

    python bench/load_soak.py [--events 20000] [--clients 16] [--cases 500] [--workers 2]

It starts the ThreatQ simulator in this process (``LoopbackServer`` on 127.0.0.1), writes a
configuration in a temporary directory (enrichment disabled: this measures ingest and sync,
not the plugins), obtains ThreatQ tokens, starts the real daemon (gunicorn, ``--workers``
processes, a sync thread in each) with ``Daemon``, and posts ``--events`` distinct TheHive 5
webhook events (cases created and updated, observables of every default type created and
updated, spread over ``--cases`` cases) from ``--clients`` concurrent clients (one thread and
one ``requests.Session`` each), plus ``--dup-ratio`` of them posted a second time. It then
waits (bounded) until the inbox drains and checks:

- zero 5xx answers and zero transport errors;
- every distinct event was answered ``queued`` exactly once, every re-post ``duplicate``;
- every accepted event is ``done`` exactly once in the inbox, and the daemon logged exactly one
  final ``sync`` line for it (no lost lease, no dead letter);
- the simulator holds exactly one indicator per distinct observable value and type, one event
  per case, no synced attribute with two values, the newest TheHive state of every case and
  observable, and every indicator linked to its case's event;
- resident memory (VmRSS) of every daemon process (gunicorn master and workers) is flat after
  warm-up: the highest RSS seen after the warm-up sample (taken once the first 10 % of the
  events were accepted) exceeds that sample by less than ``--rss-limit-mb`` (30 MB), and no
  process was replaced during the run.

It prints events/s accepted, the drain time, the counts, the RSS figures and where the time
went, then ``load: N passed, M failed``; the exit code is 1 when a check failed, 2 when the run
could not be set up. Every wait has a deadline; everything binds 127.0.0.1; the daemon and the
simulator are always stopped and the temporary directory removed (unless ``--keep``).

The event templates below are copied (trimmed) from the project's TheHive 5 samples, so this
script depends on the installed package only, not on ``tests/``.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import requests
import yaml

from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.testing.daemon import Daemon, DaemonTimeout, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import INDICATOR_TYPES, ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import children, rss_kb  # noqa: E402  (the /proc sampling every benchmark uses)

EMAIL, PASSWORD = "load@example.org", "load-password-not-stored"
WEBHOOK_TOKEN = "load-webhook-token-0123456789abcdef"
DEFAULT_RSS_LIMIT_MB = 30.0
WARMUP_FRACTION = 0.10
BASE_TS = 1717430400000  # 2024-06-03 16:00 UTC, TheHive milliseconds

# --------------------------------------------------------------------------- TheHive 5 templates

ORG = {"organisationId": "~4120", "organisation": "acme-soc"}
SEVERITY_LABELS = {1: "LOW", 2: "MEDIUM", 3: "HIGH", 4: "CRITICAL"}
CASE_STATUSES = ("New", "InProgress", "Indeterminate", "TruePositive", "FalsePositive")
ANALYSTS = ("jdoe@soc.example.org", "mroe@soc.example.org", "akim@soc.example.org")
CASE_TEMPLATE = {  # th5-case-create.json, "object"
    "_id": None, "_type": "Case", "_createdBy": "jdoe@soc.example.org", "_createdAt": None, "number": None,
    "title": None, "description": "Several users in finance reported a credential-harvesting mail.",
    "severity": 3, "severityLabel": "HIGH", "startDate": None, "tags": ["phishing", "finance"], "flag": False,
    "tlp": 2, "tlpLabel": "AMBER", "pap": 2, "papLabel": "AMBER", "status": "New", "stage": "New",
    "assignee": "jdoe@soc.example.org", "customFields": [], "customFieldValues": {}, "userPermissions": [],
    "extraData": {}, "newDate": None, "timeToDetect": 600470,
}
OBSERVABLE_TEMPLATE = {  # th5-observable-create-ip.json, "object" without its case
    "_id": None, "_type": "Observable", "_createdBy": "mroe@soc.example.org", "_createdAt": None,
    "dataType": None, "data": None, "startDate": None, "tlp": 2, "tlpLabel": "AMBER", "pap": 2,
    "papLabel": "AMBER", "tags": ["phishing-landing", "src:mail-header"], "ioc": False, "sighted": True,
    "sightedAt": 1717433000000, "reports": {}, "message": None, "extraData": {}, "ignoreSimilarity": False,
}

# TheHive data type -> (weight, value maker, ThreatQ indicator type as docs/sync.md's default table says)
_HASHES = (("md5", "MD5"), ("sha1", "SHA-1"), ("sha256", "SHA-256"))


def _hash(j: int) -> Tuple[str, str]:
    algorithm, tq_type = _HASHES[j % len(_HASHES)]
    return hashlib.new(algorithm, f"payload-{j}".encode()).hexdigest(), tq_type


DATA_TYPES: Sequence[Tuple[str, int, Callable[[int], Tuple[str, str]]]] = (
    ("ip", 6, lambda j: (f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}", "IP Address")),
    ("domain", 4, lambda j: (f"login-{j}.phish-{j % 61}.example.net", "FQDN")),
    ("fqdn", 2, lambda j: (f"portal{j}.login-{j % 53}.example.org", "FQDN")),
    ("hostname", 1, lambda j: (f"mx{j}.mail-{j % 17}.example.com", "FQDN")),
    ("url", 4, lambda j: (f"https://cdn{j % 89}.example.org/o365/login?session={j:08x}", "URL")),
    ("mail", 2, lambda j: (f"payroll{j}@mail-{j % 41}.example.com", "Email Address")),
    ("mail-subject", 1, lambda j: (f"Action required: salary review #{j}", "Email Subject")),
    ("filename", 2, lambda j: (f"salary_review_{j:06d}.html", "Filename")),
    ("uri_path", 1, lambda j: (f"/wp-content/plugins/x{j}/shell.php", "URL Path")),
    ("user-agent", 1, lambda j: (f"Mozilla/5.0 (X11; Linux x86_64) loadbot/{j}", "User-agent")),
    ("registry", 1, lambda j: (f"HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\upd{j}",
                               "Registry Key")),
    ("autonomous-system", 1, lambda j: (f"AS{4200000000 + j}", "ASN")),
    ("hash", 6, _hash),
)


@dataclass
class Expected:
    """What ThreatQ must hold once every event is applied (the newest state of everything)."""
    case_titles: Dict[str, str] = field(default_factory=dict)           # case id -> event title
    case_state: Dict[str, dict] = field(default_factory=dict)           # case id -> newest case object
    observables: Dict[str, dict] = field(default_factory=dict)          # obs id -> newest observable object
    observable_case: Dict[str, str] = field(default_factory=dict)       # obs id -> case id
    indicator_key: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # obs id -> (value, tq type)
    audit_ids: List[str] = field(default_factory=list)
    kinds: collections.Counter = field(default_factory=collections.Counter)


def _case_event(audit_id: str, action: str, ts: int, case: dict, details: dict) -> dict:
    return {"_id": audit_id, "_type": "Audit", "_createdBy": case["assignee"], "_createdAt": ts,
            "action": action, "mainAction": True, "requestId": f"4f1c2a9be07d11aa:load:{audit_id}",
            "objectId": case["_id"], "objectType": "Case", "rootId": case["_id"], "details": details,
            "object": case, "context": case, "organisation": ORG}


def _observable_event(audit_id: str, action: str, ts: int, obs: dict, case: dict, details: dict) -> dict:
    obj = dict(obs, case=case)
    return {"_id": audit_id, "_type": "Audit", "_createdBy": obs["_createdBy"], "_createdAt": ts,
            "action": action, "mainAction": True, "requestId": f"4f1c2a9be07d11aa:load:{audit_id}",
            "objectId": obs["_id"], "objectType": "Observable", "rootId": case["_id"], "details": details,
            "object": obj, "context": obj, "organisation": ORG}


def generate(n_events: int, n_cases: int, seed: int = 42) -> Tuple[List[dict], Expected]:
    """``n_events`` distinct TheHive 5 events in TheHive's time order, and what ThreatQ must end with.

    Case ``i`` is created at position ``i * 0.8 n / cases`` (all cases open within the first 80 % of
    the stream); every other position is, for a random open case, an update of the case (12 %), a
    new observable with a value no other observable has (70 %), or an update of one of its
    observables (18 %: the IOC flag or the sighted flag toggled, the message changed).
    """
    if n_cases < 1 or n_events < n_cases:
        raise ValueError("need at least one case and at least as many events as cases")
    rng = random.Random(seed)
    kinds = [name for name, weight, _ in DATA_TYPES for _ in range(weight)]
    makers = {name: maker for name, _, maker in DATA_TYPES}
    create_at = {int(i * 0.8 * n_events / n_cases): i for i in range(n_cases)}
    expected = Expected()
    events: List[dict] = []
    open_cases: List[str] = []
    case_observables: Dict[str, List[str]] = collections.defaultdict(list)
    next_obs = 0
    for k in range(n_events):
        ts = BASE_TS + k * 7
        audit_id = f"~{3_000_000 + k}"
        expected.audit_ids.append(audit_id)
        if k in create_at:
            i = create_at[k]
            case_id = f"~{8_400_000 + i * 8}"
            case = dict(CASE_TEMPLATE, _id=case_id, _createdAt=ts - 20, number=1000 + i,
                        title=f"Load case {i}: phishing wave {i % 37}", startDate=ts - 600_000, newDate=ts - 30,
                        assignee=ANALYSTS[i % len(ANALYSTS)], tags=["phishing", f"wave-{i % 37}"])
            expected.case_state[case_id] = case
            expected.case_titles[case_id] = f"Hive Case # {case_id} {case['title']}"
            open_cases.append(case_id)
            events.append(_case_event(audit_id, "create", ts, case, dict(case)))
            expected.kinds["case create"] += 1
            continue
        case_id = rng.choice(open_cases[-50:]) if rng.random() < 0.7 else rng.choice(open_cases)
        case = expected.case_state[case_id]
        roll = rng.random()
        if roll < 0.12:
            severity = rng.randint(1, 4)
            status = rng.choice(CASE_STATUSES)
            case = dict(case, severity=severity, severityLabel=SEVERITY_LABELS[severity], status=status,
                        stage="Closed" if status in ("TruePositive", "FalsePositive") else "InProgress",
                        _updatedBy=ANALYSTS[k % len(ANALYSTS)], _updatedAt=ts - 5)
            expected.case_state[case_id] = case
            events.append(_case_event(audit_id, "update", ts, case,
                                      {"severity": severity, "status": status, "stage": case["stage"]}))
            expected.kinds["case update"] += 1
        elif roll < 0.30 and case_observables[case_id]:
            obs_id = rng.choice(case_observables[case_id])
            obs = expected.observables[obs_id]
            if rng.random() < 0.6:
                details = {"ioc": not obs["ioc"]}
            else:
                details = {"sighted": not obs["sighted"], "message": f"{obs['message'].split(' (')[0]} (seen {k})"}
            obs = dict(obs, **details, _updatedBy=ANALYSTS[k % len(ANALYSTS)], _updatedAt=ts - 5)
            expected.observables[obs_id] = obs
            events.append(_observable_event(audit_id, "update", ts, obs, case, details))
            expected.kinds["observable update"] += 1
        else:
            j = next_obs
            next_obs += 1
            data_type = kinds[j % len(kinds)] if j < len(kinds) else rng.choice(kinds)
            value, tq_type = makers[data_type](j)
            obs_id = f"~{12_000_000 + j * 4}"
            obs = dict(OBSERVABLE_TEMPLATE, _id=obs_id, _createdAt=ts - 10, startDate=ts - 10, dataType=data_type,
                       data=value, ioc=rng.random() < 0.2, sighted=rng.random() < 0.5,
                       message=f"{data_type} seen in case {case['number']}")
            expected.observables[obs_id] = obs
            expected.observable_case[obs_id] = case_id
            expected.indicator_key[obs_id] = (value, tq_type)
            case_observables[case_id].append(obs_id)
            events.append(_observable_event(audit_id, "create", ts, obs, case, dict(obs)))
            expected.kinds["observable create"] += 1
    return events, expected


# --------------------------------------------------------------------------- process memory

@dataclass
class ProcMemory:
    pid: int
    role: str
    first_seen_s: float
    samples: List[Tuple[float, int]] = field(default_factory=list)   # (seconds since start, kB)
    warmup_kb: Optional[int] = None
    warmup_s: float = 0.0

    @property
    def peak_kb(self) -> int:
        return max(kb for _, kb in self.samples)

    @property
    def final_kb(self) -> int:
        return self.samples[-1][1]

    def after_warmup_peak_kb(self) -> Optional[int]:
        return None if self.warmup_kb is None else max(kb for t, kb in self.samples if t >= self.warmup_s)

    def growth_mb(self) -> Optional[float]:
        peak = self.after_warmup_peak_kb()
        return None if peak is None else (peak - self.warmup_kb) / 1024


class MemorySampler:
    """Samples the daemon's master and workers every ``interval`` s; warm-up when ``warm()`` says so."""

    def __init__(self, master_pid: int, started: float, interval: float, warm: Callable[[], bool],
                 progress: Callable[[float], None]) -> None:
        self.master_pid = master_pid
        self.started = started
        self.interval = interval
        self.warm = warm
        self.progress = progress
        self.procs: Dict[int, ProcMemory] = {}
        self.warmup_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self, warmup: bool = False) -> None:
        now = time.monotonic() - self.started
        for pid in [self.master_pid, *children(self.master_pid)]:
            kb = rss_kb(pid)
            if kb is None:
                continue
            proc = self.procs.get(pid)
            if proc is None:
                proc = self.procs[pid] = ProcMemory(pid, "master" if pid == self.master_pid else "worker", now)
            proc.samples.append((now, kb))
            if warmup:
                proc.warmup_kb, proc.warmup_s = kb, now

    def _run(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.warmup_at is None and self.warm():
                self.warmup_at = now - self.started
                self.sample(warmup=True)
                next_sample = now + self.interval
            elif now >= next_sample:
                self.sample()
                self.progress(now - self.started)
                next_sample = now + self.interval
            self._stop.wait(0.1)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- the simulator, timed

class TimedApp:
    """WSGI middleware around the simulator: time spent in it, per method and path shape."""

    _ID = re.compile(r"/\d+")

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.seconds: Dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        try:
            return self.app(environ, start_response)  # Flask builds the whole body here
        finally:
            key = f"{environ['REQUEST_METHOD']} {self._ID.sub('/{id}', environ.get('PATH_INFO', ''))}"
            with self.lock:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1


# --------------------------------------------------------------------------- posting

@dataclass
class PostStats:
    by_answer: collections.Counter = field(default_factory=collections.Counter)  # "200 queued", "503", ...
    errors: collections.Counter = field(default_factory=collections.Counter)     # transport errors by type
    queued_ids: collections.Counter = field(default_factory=collections.Counter)  # audit id -> queued answers
    duplicate_ids: collections.Counter = field(default_factory=collections.Counter)
    latencies: List[float] = field(default_factory=list)
    accepted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def post_all(url: str, bodies: Sequence[Tuple[str, bytes]], clients: int, deadline: float,
             stats: PostStats, timeout: float = 30.0) -> None:
    """Post ``bodies`` (audit id, JSON) from ``clients`` threads, each with its own Session."""
    headers = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
    cursor = iter(range(len(bodies)))
    cursor_lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            latencies = []
            while time.monotonic() < deadline:
                with cursor_lock:
                    index = next(cursor, None)
                if index is None:
                    break
                audit_id, body = bodies[index]
                started = time.perf_counter()
                try:
                    response = session.post(url, data=body, headers=headers, timeout=timeout)
                except requests.RequestException as exc:
                    with stats.lock:
                        stats.errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                try:
                    status = response.json().get("status", "?")
                except ValueError:
                    status = "not-json"
                with stats.lock:
                    stats.by_answer[f"{response.status_code} {status}"] += 1
                    if response.status_code == 200 and status == "queued":
                        stats.queued_ids[audit_id] += 1
                        stats.accepted += 1
                    elif response.status_code == 200 and status == "duplicate":
                        stats.duplicate_ids[audit_id] += 1
                        stats.accepted += 1
            with stats.lock:
                stats.latencies.extend(latencies)

    threads = [threading.Thread(target=client, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + timeout + 5)


# --------------------------------------------------------------------------- the run

@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    events: int
    duplicates_posted: int
    clients: int
    cases: int
    workers: int
    post_s: float = 0.0
    events_per_s: float = 0.0
    drain_s: Optional[float] = None
    total_s: float = 0.0
    answers: Dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    server_errors: int = 0
    lost: int = 0
    duplicated: int = 0
    inbox: Dict[str, object] = field(default_factory=dict)
    indicators: int = 0
    threatq_events: int = 0
    outcomes: Dict[str, int] = field(default_factory=dict)
    memory: List[dict] = field(default_factory=list)
    max_rss_growth_mb: Optional[float] = None
    rss_limit_mb: float = DEFAULT_RSS_LIMIT_MB
    checks: List[Check] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.ok for c in self.checks)

    @property
    def failed(self) -> int:
        return sum(not c.ok for c in self.checks)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and self.failed == 0

    def summary(self) -> str:
        return f"load: {self.passed} passed, {self.failed} failed"


def _write_config(work: Path, threatq_url: str, client_id: str) -> None:
    raw = {
        "threatq": {"host": threatq_url, "client_id": client_id},
        # Never contacted: every event embeds its case, and no API key is configured.
        "thehive": {"url": "http://127.0.0.1:9"},
        "webhook": {"auth": "bearer", "token": WEBHOOK_TOKEN},
        "sync": {},
        # Disabled: this measures ingest + sync, not the plugins (which have their own cache).
        "enrichment": {"enabled": False},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    path.chmod(0o600)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SYNC_LINE = re.compile(r"sync audit=(\S+) .*? outcome=(\w+) attempts=\d+ ms=([\d.]+)")
QUEUED_LINE = re.compile(r"event audit=\S+ .*? outcome=(queued|duplicate) inbox_id=\d+ ms=([\d.]+)")


def run(events: int = 20000, clients: int = 16, cases: int = 500, workers: int = 2, threads: int = 4,
        dup_ratio: float = 0.05, rss_limit_mb: float = DEFAULT_RSS_LIMIT_MB, sample_interval: float = 3.0,
        post_timeout: Optional[float] = None, drain_timeout: Optional[float] = None, seed: int = 42,
        keep: bool = False, out=sys.stdout) -> Report:
    """The whole load test; the returned report carries every figure and check."""
    def say(line: str = "") -> None:
        report.lines.append(line)
        print(line, file=out, flush=True)

    payloads, expected = generate(events, cases, seed)
    rng = random.Random(seed + 1)
    bodies = [(p["_id"], json.dumps(p).encode("utf-8")) for p in payloads]
    dup_indexes = rng.sample(range(events), int(round(events * dup_ratio)))
    order = [(float(k), k) for k in range(events)] + [(k + rng.uniform(1, 400), k) for k in dup_indexes]
    order.sort()
    post_list = [bodies[k] for _, k in order]
    del payloads
    report = Report(events=events, duplicates_posted=len(dup_indexes), clients=clients, cases=cases,
                    workers=workers, rss_limit_mb=rss_limit_mb)
    post_timeout = post_timeout or max(60.0, len(post_list) / 20.0)
    drain_timeout = drain_timeout or max(120.0, events / 10.0)
    mean_kb = sum(len(b) for _, b in bodies) / len(bodies) / 1024
    say(f"load: {events} events ({', '.join(f'{n} {k}' for k, n in sorted(expected.kinds.items()))}) "
        f"over {cases} cases, {len(expected.indicator_key)} distinct observable values, "
        f"{len(dup_indexes)} re-posted; {clients} clients, {workers} workers x {threads} threads; "
        f"mean body {mean_kb:.1f} KB")

    sim = ThreatQSimulator(users={EMAIL: PASSWORD})
    timed = TimedApp(sim.app)
    work = Path(tempfile.mkdtemp(prefix="tq-mw-load-"))
    daemon = Daemon(work, work / "logs", args=["--threads", str(threads)], verbosity="2", workers=workers)
    stats = PostStats()
    sampler: Optional[MemorySampler] = None
    try:
        with LoopbackServer(timed) as threatq:
            sim.url = threatq.url
            _write_config(work, threatq.url, sim.client_id)
            tq_auth.save_tokens(work, tq_auth.password_grant(threatq.url, sim.client_id, EMAIL, PASSWORD))
            daemon.start()
            say(f"load: ThreatQ simulator {threatq.url}, daemon {daemon.url} (pid {daemon.proc.pid}), "
                f"work dir {work}")
            inbox = Inbox(work / "tq_mw_thehive.db")
            warm_after = max(1, int(events * WARMUP_FRACTION))
            started = time.monotonic()

            def progress(t: float) -> None:
                probe = Inbox(work / "tq_mw_thehive.db")  # the sampler thread's own connection
                try:
                    counts = probe.stats()
                finally:
                    probe.close()
                rss = " ".join(f"{p.role[0]}{p.pid}={p.samples[-1][1] / 1024:.0f}MB"
                               for p in sampler.procs.values() if p.samples)
                say(f"  t={t:6.1f}s accepted={stats.accepted:6d} done={counts['done']:6d} "
                    f"pending={counts['pending']:6d} rss {rss}")

            sampler = MemorySampler(daemon.proc.pid, started, sample_interval,
                                    warm=lambda: stats.accepted >= warm_after, progress=progress)
            sampler.sample()
            sampler.start()
            post_all(daemon.url + "/cases", post_list, clients, started + post_timeout, stats)
            report.post_s = time.monotonic() - started
            posted_at = time.monotonic()
            try:
                wait_for(lambda: inbox.stats()["pending"] == 0 and stats.queued_ids, drain_timeout,
                         "the inbox to drain", interval=0.2)
                report.drain_s = time.monotonic() - posted_at
            except DaemonTimeout:
                report.drain_s = None
            report.total_s = time.monotonic() - started
            time.sleep(min(2.0, sample_interval))  # idle a moment: the final sample is the resting size
            sampler.stop()
            sampler.sample()
            _verify(report, expected, stats, sim, inbox, daemon, sampler, timed, say)
            inbox.close()
    except DaemonTimeout as exc:
        report.checks.append(Check("the daemon started and answered", False, str(exc)))
        say(f"load: {exc}")
    finally:
        if sampler is not None:
            sampler.stop()
        daemon.stop()
        if keep:
            say(f"load: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    say(report.summary())
    return report


def _verify(report: Report, expected: Expected, stats: PostStats, sim: ThreatQSimulator, inbox: Inbox,
            daemon: Daemon, sampler: MemorySampler, timed: TimedApp, say: Callable[[str], None]) -> None:
    checks = report.checks
    n = report.events

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append(Check(name, ok, detail))

    # --- HTTP answers
    report.answers = dict(stats.by_answer)
    report.transport_errors = sum(stats.errors.values())
    report.server_errors = sum(v for k, v in stats.by_answer.items() if k.startswith("5"))
    report.events_per_s = stats.accepted / report.post_s if report.post_s else 0.0
    lat = stats.latencies
    say(f"posting: {sum(stats.by_answer.values())} answers in {report.post_s:.1f} s = "
        f"{report.events_per_s:.0f} events/s accepted; latency p50 {_percentile(lat, .5) * 1000:.1f} ms, "
        f"p99 {_percentile(lat, .99) * 1000:.1f} ms, max {max(lat, default=0) * 1000:.0f} ms")
    say(f"answers: {dict(sorted(stats.by_answer.items()))}"
        + (f"; transport errors {dict(stats.errors)}" if stats.errors else ""))
    check("no 5xx answer", report.server_errors == 0, f"{report.server_errors} answers 5xx")
    check("no transport error", report.transport_errors == 0, str(dict(stats.errors)))
    twice = [a for a, c in stats.queued_ids.items() if c > 1]
    missing = [a for a in expected.audit_ids if stats.queued_ids[a] == 0]
    check("every distinct event answered queued exactly once", not twice and not missing,
          f"{len(missing)} never queued, {len(twice)} queued twice")
    duplicates = sum(stats.duplicate_ids.values())
    check("every re-post answered duplicate", duplicates == report.duplicates_posted,
          f"{duplicates} duplicate answers for {report.duplicates_posted} re-posts")

    # --- the inbox
    report.inbox = inbox.stats()
    say(f"drain: {'%.1f s after the last post' % report.drain_s if report.drain_s is not None else 'TIMED OUT'}; "
        f"start to drained {report.total_s:.1f} s = {n / report.total_s:.0f} events/s synced end to end; "
        f"inbox {report.inbox}")
    check("inbox drained in time", report.drain_s is not None, f"pending {report.inbox['pending']}")
    rows = inbox.db.execute("SELECT dedup_key, state, attempts FROM inbox").fetchall()
    by_key = collections.Counter(r["dedup_key"] for r in rows)
    states = collections.Counter(r["state"] for r in rows)
    expected_keys = {f"audit:{a}" for a in expected.audit_ids}
    done_keys = {r["dedup_key"] for r in rows if r["state"] == "done"}
    report.lost = len(expected_keys - done_keys)
    extra_rows = len(rows) - len(expected_keys)
    retried = sum(1 for r in rows if r["attempts"] > 1)
    check("every accepted event done exactly once in the inbox",
          report.lost == 0 and extra_rows == 0 and max(by_key.values(), default=0) == 1,
          f"{len(rows)} rows for {n} events, states {dict(states)}, {report.lost} not done, "
          f"{retried} claimed more than once")

    # --- the daemon's log: exactly one final sync line per event
    log = daemon.log_text()
    finals: collections.Counter = collections.Counter()
    outcomes: collections.Counter = collections.Counter()
    sync_ms: List[float] = []
    for match in SYNC_LINE.finditer(log):
        outcomes[match.group(2)] += 1
        if match.group(2) != "retry":
            finals[match.group(1)] += 1
            sync_ms.append(float(match.group(3)))
    ingest_ms = [float(m.group(2)) for m in QUEUED_LINE.finditer(log)]
    report.outcomes = dict(outcomes)
    not_once = [a for a in expected.audit_ids if finals[a] != 1]
    bad = {k: v for k, v in outcomes.items() if k in ("dead", "lease_lost")}
    tracebacks = log.count("Traceback")
    check("each event synced exactly once (one final sync log line, none dead or lease_lost)",
          not not_once and not bad and tracebacks == 0,
          f"{len(not_once)} events without exactly one final line, {bad}, {tracebacks} tracebacks")
    say(f"sync outcomes: {dict(sorted(outcomes.items()))}")

    # --- ThreatQ: one object per thing, one value per attribute, the newest state, the links
    indicators = sim.indicators
    tq_events = sim.events
    report.indicators, report.threatq_events = len(indicators), len(tq_events)
    type_names = {i: name for i, (name, _) in enumerate(INDICATOR_TYPES, 1)}
    held: Dict[Tuple[str, str], List[int]] = collections.defaultdict(list)
    for indicator_id, record in indicators.items():
        held[(record["value"], type_names.get(record["type_id"], "?"))].append(indicator_id)
    wanted = set(expected.indicator_key.values())
    dup_indicators = {k: v for k, v in held.items() if len(v) > 1}
    missing_indicators = wanted - set(held)
    unexpected = set(held) - wanted
    report.duplicated = sum(len(v) - 1 for v in dup_indicators.values())
    check("exactly one indicator per distinct observable value and type",
          not dup_indicators and not missing_indicators and not unexpected,
          f"{len(indicators)} indicators for {len(wanted)} values: {len(dup_indicators)} duplicated, "
          f"{len(missing_indicators)} missing, {len(unexpected)} unexpected")
    titles: Dict[str, List[int]] = collections.defaultdict(list)
    for event_id, record in tq_events.items():
        titles[record["title"]].append(event_id)
    dup_events = {t: v for t, v in titles.items() if len(v) > 1}
    report.duplicated += sum(len(v) - 1 for v in dup_events.values())
    missing_events = set(expected.case_titles.values()) - set(titles)
    check("exactly one ThreatQ event per case",
          not dup_events and not missing_events and len(tq_events) == len(expected.case_titles),
          f"{len(tq_events)} events for {len(expected.case_titles)} cases: {len(dup_events)} duplicated, "
          f"{len(missing_events)} missing")
    say(f"threatq: {len(tq_events)} events, {len(indicators)} indicators, "
        f"{sum(timed.calls.values())} API calls")

    multi = 0
    wrong_state: List[str] = []
    attrs_by_event: Dict[int, Dict[str, str]] = {}
    for event_id in tq_events:
        attrs = sim.attributes_of("events", event_id)
        names = collections.Counter(a["name"] for a in attrs)
        multi += sum(1 for c in names.values() if c > 1)
        attrs_by_event[event_id] = {a["name"]: a["value"] for a in attrs}
    for case_id, title in expected.case_titles.items():
        for event_id in titles.get(title, [])[:1]:
            case, attrs = expected.case_state[case_id], attrs_by_event[event_id]
            if (attrs.get("Severity"), attrs.get("Status")) != (case["severityLabel"], case["status"]):
                wrong_state.append(f"{case_id}: {attrs.get('Severity')}/{attrs.get('Status')} "
                                   f"!= {case['severityLabel']}/{case['status']}")
    first_indicator = {key: ids[0] for key, ids in held.items()}
    for obs_id, key in expected.indicator_key.items():
        indicator_id = first_indicator.get(key)
        if indicator_id is None:
            continue
        attrs = sim.attributes_of("indicators", indicator_id)
        names = collections.Counter(a["name"] for a in attrs)
        multi += sum(1 for c in names.values() if c > 1)
        values = {a["name"]: a["value"] for a in attrs}
        obs = expected.observables[obs_id]
        want = ("Yes" if obs["ioc"] else None, "Yes" if obs["sighted"] else "No", obs["message"])
        got = (values.get("Indicator Of Compromise?"), values.get("Sighted?"), indicators[indicator_id]["description"])
        if got != want:
            wrong_state.append(f"{obs_id} {key[0]}: {got} != {want}")
    check("no synced attribute has two values", multi == 0, f"{multi} attributes with several values")
    check("ThreatQ holds the newest TheHive state of every case and observable", not wrong_state,
          f"{len(wrong_state)} differ, e.g. {wrong_state[:3]}")
    unlinked = 0
    for case_id, title in expected.case_titles.items():
        ids = titles.get(title)
        if not ids:
            continue
        linked = set(sim.links_of("events", ids[0], "indicators"))
        want_linked = {first_indicator.get(expected.indicator_key[o]) for o, c in expected.observable_case.items()
                       if c == case_id}
        unlinked += len(want_linked - linked)
    check("every indicator linked to its case's event", unlinked == 0, f"{unlinked} links missing")

    # --- memory
    say(f"memory: warm-up sample at t={sampler.warmup_at if sampler.warmup_at is not None else float('nan'):.1f} s "
        f"(after {WARMUP_FRACTION:.0%} of the events); growth = highest RSS after warm-up - warm-up RSS")
    growths = []
    replaced = [p for p in sampler.procs.values() if p.role == "worker" and p.first_seen_s > 0.5]
    for proc in sorted(sampler.procs.values(), key=lambda p: (p.role != "master", p.pid)):
        growth = proc.growth_mb()
        if growth is not None:
            growths.append(growth)
        entry = {"pid": proc.pid, "role": proc.role, "warmup_mb": proc.warmup_kb and proc.warmup_kb / 1024,
                 "peak_mb": proc.peak_kb / 1024, "final_mb": proc.final_kb / 1024, "growth_mb": growth,
                 "samples": len(proc.samples)}
        report.memory.append(entry)
        warm = f"{proc.warmup_kb / 1024:6.1f}" if proc.warmup_kb else "     -"
        grow = f"{growth:+6.1f}" if growth is not None else "     -"
        final_growth = f"{(proc.final_kb - proc.warmup_kb) / 1024:+.1f}" if proc.warmup_kb else "-"
        say(f"  {proc.role:6s} pid {proc.pid:7d}: warm-up {warm} MB, peak {proc.peak_kb / 1024:6.1f} MB, "
            f"final {proc.final_kb / 1024:6.1f} MB, growth after warm-up {grow} MB (final {final_growth} MB), "
            f"{len(proc.samples)} samples")
    report.max_rss_growth_mb = max(growths) if growths else None
    flat = sampler.warmup_at is not None and bool(growths) and len(growths) == len(sampler.procs) \
        and max(growths) < report.rss_limit_mb
    figure = f"{max(growths):.1f}" if growths else "n/a"
    say(f"memory: max growth after warm-up {figure} MB, limit {report.rss_limit_mb:g} MB per process: "
        f"{'PASS' if flat else 'FAIL'}")
    check(f"RSS flat after warm-up (< {report.rss_limit_mb:g} MB per process)", flat,
          f"max growth {figure} MB")
    check("no daemon process replaced during the run", not replaced,
          f"{len(replaced)} workers appeared after the start: {[p.pid for p in replaced]}")

    # --- where the time went
    sim_total = sum(timed.seconds.values())
    top = sorted(timed.seconds.items(), key=lambda kv: -kv[1])[:6]
    say(f"time: simulator handlers {sim_total:.1f} s in total over {sum(timed.calls.values())} calls; top: "
        + ", ".join(f"{k} {v:.1f} s/{timed.calls[k]}" for k, v in top))
    if sync_ms:
        say(f"time: sync per event mean {statistics.mean(sync_ms):.1f} ms, p99 {_percentile(sync_ms, .99):.1f} ms, "
            f"sum {sum(sync_ms) / 1000:.1f} s over {report.workers} workers")
    if ingest_ms:
        say(f"time: POST /cases in the app mean {statistics.mean(ingest_ms):.1f} ms, "
            f"p99 {_percentile(ingest_ms, .99):.1f} ms")

    for c in checks:
        say(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}" + ("" if c.ok else f": {c.detail}"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="distinct events to post (default 20000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--cases", type=int, default=500, help="cases the events spread over (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument("--dup-ratio", type=float, default=0.05, help="share re-posted (default 0.05)")
    parser.add_argument("--rss-limit-mb", type=float, default=DEFAULT_RSS_LIMIT_MB,
                        help="allowed RSS growth after warm-up per process (default 30)")
    parser.add_argument("--sample-interval", type=float, default=3.0, help="seconds between RSS samples")
    parser.add_argument("--post-timeout", type=float, help="deadline for posting (default: scaled to --events)")
    parser.add_argument("--drain-timeout", type=float, help="deadline for draining (default: scaled to --events)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, db, logs)")
    args = parser.parse_args(argv)
    if args.events < 1 or args.clients < 1 or not 1 <= args.cases <= args.events or args.workers < 1:
        parser.error("need events >= cases >= 1, clients >= 1, workers >= 1")
    report = run(events=args.events, clients=args.clients, cases=args.cases, workers=args.workers,
                 threads=args.threads, dup_ratio=args.dup_ratio, rss_limit_mb=args.rss_limit_mb,
                 sample_interval=args.sample_interval, post_timeout=args.post_timeout,
                 drain_timeout=args.drain_timeout, seed=args.seed, keep=args.keep)
    if not report.checks:
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
