"""Shared helpers of the performance benchmarks (``ingest``, ``sync_calls``, ``enrichment``, ``memory``).

Everything here depends on the installed package only (never on ``tests/``): TheHive 5 webhook
payloads shaped like the project's samples, a config directory wired to the ThreatQ simulator,
the real daemon under gunicorn (``Daemon``), a multi-process HTTP load generator, resident-memory
sampling from ``/proc``, percentiles, and the PASS/FAIL report every benchmark ends with.

Everything binds or talks to 127.0.0.1 only, every loop is bounded by a count or a deadline, and
every process started here is stopped by its own id.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.testing.daemon import Daemon
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

EMAIL, PASSWORD = "bench@example.org", "bench-password-not-stored"
WEBHOOK_TOKEN = "bench-webhook-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: nobody listens, nothing leaves
BASE_TS = 1717430400000  # 2024-06-03 16:00 UTC, TheHive milliseconds
# The bundled plugins that need no network and no key (docs/enrichment.md "Bundled plugins").
OFFLINE_PLUGINS = ("ip_scope", "geoip", "domain", "warninglists")
EXTERNAL_PLUGINS = ("virustotal", "abuseipdb", "otx", "shodan", "urlhaus", "greynoise")

# --------------------------------------------------------------------------- TheHive 5 payloads
# Copied (compacted) from the project's TheHive 5 samples (th5-case-create.json,
# th5-observable-create-ip.json): an Audit envelope with details, object and context.

ORG = {"organisationId": "~4120", "organisation": "acme-soc"}
ANALYSTS = ("jdoe@soc.example.org", "mroe@soc.example.org", "akim@soc.example.org")
SEVERITY_LABELS = {1: "LOW", 2: "MEDIUM", 3: "HIGH", 4: "CRITICAL"}


def case_object(i: int, ts: int) -> dict:
    return {
        "_id": f"~{8_400_000 + i * 8}", "_type": "Case", "_createdBy": ANALYSTS[i % 3], "_createdAt": ts - 20,
        "number": 1000 + i, "title": f"Bench case {i}: phishing wave {i % 37} targeting finance mailboxes",
        "description": "Several users in finance reported a credential-harvesting mail.",
        "severity": 3, "severityLabel": "HIGH", "startDate": ts - 600_000, "tags": ["phishing", f"wave-{i % 37}"],
        "flag": False, "tlp": 2, "tlpLabel": "AMBER", "pap": 2, "papLabel": "AMBER", "status": "New",
        "stage": "New", "assignee": ANALYSTS[i % 3], "customFields": [], "customFieldValues": {},
        "userPermissions": [], "extraData": {}, "newDate": ts - 30, "timeToDetect": 600470,
    }


def _sha256(j: int) -> str:
    return hashlib.sha256(f"payload-{j}".encode()).hexdigest()


# Nine TheHive data types, each one indicator of a distinct ThreatQ type (docs/sync.md "Type mapping").
DATA_TYPES: Sequence[Tuple[str, Callable[[int], str]]] = (
    ("ip", lambda j: f"{11 + (j >> 16) % 200}.{(j >> 8) & 255}.{j & 255}.{7 + j % 240}"),
    ("domain", lambda j: f"login-{j}.phish-{j % 61}.example.net"),
    ("fqdn", lambda j: f"portal{j}.login-{j % 53}.example.org"),
    ("url", lambda j: f"https://cdn{j % 89}.example.org/o365/login?session={j:08x}"),
    ("mail", lambda j: f"payroll{j}@mail-{j % 41}.example.com"),
    ("mail-subject", lambda j: f"Action required: salary review #{j}"),
    ("filename", lambda j: f"salary_review_{j:06d}.html"),
    ("hash", _sha256),
    ("user-agent", lambda j: f"Mozilla/5.0 (X11; Linux x86_64) benchbot/{j}"),
)


def observable_object(case: dict, j: int, data_type: str, value: str, ts: int) -> dict:
    return {
        "_id": f"~{12_000_000 + j * 4}", "_type": "Observable", "_createdBy": ANALYSTS[j % 3],
        "_createdAt": ts - 10, "dataType": data_type, "data": value, "startDate": ts - 10,
        "tlp": 2, "tlpLabel": "AMBER", "pap": 2, "papLabel": "AMBER",
        "tags": ["phishing-landing", "src:mail-header"], "ioc": False, "sighted": j % 2 == 0,
        "sightedAt": 1717433000000, "reports": {}, "message": f"{data_type} seen in case {case['number']}",
        "extraData": {}, "ignoreSimilarity": False, "case": case,
    }


def audit(audit_id: str, action: str, ts: int, obj: dict, details: dict) -> dict:
    """The TheHive 5 (v1) webhook envelope around a case or observable."""
    is_case = obj["_type"] == "Case"
    root = obj["_id"] if is_case else obj["case"]["_id"]
    return {"_id": audit_id, "_type": "Audit", "_createdBy": obj["_createdBy"], "_createdAt": ts,
            "action": action, "mainAction": True, "requestId": f"4f1c2a9be07d11aa:bench:{audit_id}",
            "objectId": obj["_id"], "objectType": obj["_type"], "rootId": root, "details": details,
            "object": obj, "context": obj, "organisation": ORG}


def case_block(i: int, first_audit: int, ts0: int) -> List[dict]:
    """Twenty events of case ``i`` in TheHive's order: the case, its nine observables, one update of
    the case (severity and status change) and one update of each observable (half of them toggle the
    IOC flag; the other half re-send the same state: a new audit ``_id``, a later ``_createdAt``)."""
    out: List[dict] = []
    case = case_object(i, ts0)
    out.append(audit(f"~{first_audit}", "create", ts0, case, dict(case)))
    observables = []
    for t, (data_type, make) in enumerate(DATA_TYPES):
        j = i * len(DATA_TYPES) + t
        ts = ts0 + 10 + t
        obs = observable_object(case, j, data_type, make(j), ts)
        observables.append(obs)
        out.append(audit(f"~{first_audit + 1 + t}", "create", ts, obs, {k: v for k, v in obs.items() if k != "case"}))
    ts = ts0 + 100
    updated = dict(case, severity=4, severityLabel="CRITICAL", status="InProgress", stage="InProgress",
                   _updatedBy=ANALYSTS[(i + 1) % 3], _updatedAt=ts - 5)
    out.append(audit(f"~{first_audit + 10}", "update", ts, updated,
                     {"severity": 4, "status": "InProgress", "stage": "InProgress"}))
    for t, obs in enumerate(observables):
        ts = ts0 + 110 + t
        if t % 2 == 0:
            changed = dict(obs, ioc=True, case=updated)
            out.append(audit(f"~{first_audit + 11 + t}", "update", ts, changed, {"ioc": True}))
        else:
            out.append(audit(f"~{first_audit + 11 + t}", "update", ts, obs, {"sighted": obs["sighted"]}))
    return out


def mixed_stream(n_events: int, run: int = 0) -> Iterable[dict]:
    """``n_events`` distinct events, case after case (``case_block``); ``run`` keeps the ids of two
    runs apart (the audit ``_id``s, case and observable ids all differ)."""
    emitted, i = 0, 0
    while emitted < n_events:
        case_no = run * 1_000_000 + i
        for event in case_block(case_no, 3_000_000 + case_no * 20, BASE_TS + case_no * 1000):
            if emitted == n_events:
                return
            yield event
            emitted += 1
        i += 1


def encode(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- config, simulator, daemon

def write_config(config_dir: Path, tq_url: str, enrichment: Optional[dict] = None, **sync) -> Path:
    """A config.yaml as ``tq-mw-thehive configure`` writes it (the shape of the tests' ``write_config``).

    TheHive's API key is left out, so the daemon does no catch-up at start (nothing to fetch): the
    benchmarks post every event themselves.
    """
    raw = {
        "threatq": {"host": tq_url, "client_id": "tq-client-id"},
        "thehive": {"url": UNREACHABLE},
        "webhook": {"auth": "bearer", "token": WEBHOOK_TOKEN},
        "sync": dict(sync),
        "enrichment": enrichment if enrichment is not None else {"enabled": False},
    }
    path = Path(config_dir) / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    path.chmod(0o600)
    return path


def offline_enrichment() -> dict:
    """Enrichment on with the four offline bundled plugins only (the external ones disabled)."""
    return {"enabled": True, "disabled": list(EXTERNAL_PLUGINS)}


_ID = re.compile(r"/\d+")


def shape(path: str) -> str:
    """``/api/indicators/17/attributes`` → ``/api/indicators/{id}/attributes``."""
    return _ID.sub("/{id}", path)


class TimedApp:
    """WSGI middleware: wall time spent inside the simulator, per ``METHOD /path/{id}``."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.seconds: Dict[str, float] = collections.defaultdict(float)

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        try:
            return self.app(environ, start_response)  # Flask builds the whole body here
        finally:
            key = f"{environ['REQUEST_METHOD']} {shape(environ.get('PATH_INFO', ''))}"
            with self.lock:
                self.seconds[key] += time.perf_counter() - started

    def total(self) -> float:
        with self.lock:
            return sum(self.seconds.values())


class Rig:
    """The ThreatQ simulator on loopback, a config directory, tokens, and the real daemon.

    ``threatq="sim"`` points the daemon at the running simulator; ``"down"`` at a loopback port
    nobody listens on (the sync thread then only backs off). ``with Rig(...) as rig:`` stops both.
    """

    def __init__(self, workdir: Path, threatq: str = "sim", enrichment: Optional[dict] = None,
                 workers: int = 2, verbosity: str = "2", latency_ms: float = 0,
                 sync: Optional[dict] = None) -> None:
        self.workdir = Path(workdir)
        # latency_ms: every simulator answer waits that long (a remote ThreatQ's round trip).
        self.sim = ThreatQSimulator(users={EMAIL: PASSWORD}, latency_ms=latency_ms)
        # sync: keys of the config's `sync:` section (compare two configurations in one run).
        self.sync = dict(sync or {})
        # The simulator's request count once the rig's own token grant is made, before the daemon starts.
        self.setup_calls = 0
        self.timed = TimedApp(self.sim.app)
        self.server: Optional[LoopbackServer] = None
        self.threatq = threatq
        self.enrichment = enrichment
        self.daemon = Daemon(self.workdir, self.workdir / "logs", verbosity=verbosity, workers=workers,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def state_db(self) -> Path:
        return self.workdir / "tq_mw_thehive.db"

    def start(self, timeout: float = 90) -> "Rig":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server = LoopbackServer(self.timed).start()
        self.sim.url = self.server.url
        tq_url = self.server.url if self.threatq == "sim" else UNREACHABLE
        write_config(self.workdir, tq_url, enrichment=self.enrichment, **self.sync)
        # The daemon reads its tokens from the config directory (what `configure` stores).
        tq_auth.save_tokens(self.workdir, tq_auth.password_grant(self.server.url, self.sim.client_id,
                                                                 EMAIL, PASSWORD))
        self.setup_calls = len(self.sim.requests)
        self.daemon.start(timeout=timeout)
        return self

    def stop(self) -> None:
        try:
            self.daemon.stop(timeout=30)
        finally:
            self.daemon.close()
            if self.server is not None:
                self.server.stop()
                self.server = None

    def __enter__(self) -> "Rig":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def inbox_stats(state_db: Path) -> Dict[str, object]:
    inbox = Inbox(state_db)
    try:
        return inbox.stats()
    finally:
        inbox.close()


def wait_drained(state_db: Path, expected_finished: int, timeout: float, interval: float = 0.2,
                 on_poll: Optional[Callable[[Dict[str, object]], None]] = None) -> Tuple[bool, Dict[str, object]]:
    """Poll until nothing is pending and ``done + dead`` reaches ``expected_finished`` (bounded)."""
    inbox = Inbox(state_db)
    deadline = time.monotonic() + timeout
    try:
        while True:
            stats = inbox.stats()
            if on_poll is not None:
                on_poll(stats)
            if stats["pending"] == 0 and stats["done"] + stats["dead"] >= expected_finished:
                return True, stats
            if time.monotonic() > deadline:
                return False, stats
            time.sleep(interval)
    finally:
        inbox.close()


# --------------------------------------------------------------------------- process memory

def rss_kb(pid: int) -> Optional[int]:
    """VmRSS of ``pid`` in kB, None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def children(pid: int) -> List[int]:
    """Direct children of ``pid``, from ``/proc/<pid>/task/*/children``."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                found.extend(int(p) for p in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return sorted(set(found))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of ``pids`` so far (``/proc/<pid>/stat``); a process gone counts 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def process_tree(pid: int, depth: int = 3) -> List[int]:
    """``pid`` and its descendants (gunicorn: the master and its workers), bounded in depth."""
    out, level = [pid], [pid]
    for _ in range(depth):
        level = [c for p in level for c in children(p)]
        if not level:
            break
        out.extend(level)
    return out


# --------------------------------------------------------------------------- figures

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Report:
    """Checks, printed as ``PASS name (detail)``, then ``<bench>: N passed, M failed``."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.results: List[Tuple[str, bool]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok)))
        print(f"  {'PASS' if ok else 'FAIL'} {name}" + (f" ({detail})" if detail else ""), flush=True)
        return ok

    def finish(self) -> int:
        passed = sum(ok for _, ok in self.results)
        failed = len(self.results) - passed
        print(f"{self.bench}: {passed} passed, {failed} failed", flush=True)
        return 0 if failed == 0 else 1


# --------------------------------------------------------------------------- load generation

@dataclass
class LoadResult:
    """What a load run measured: one entry per request."""
    statuses: collections.Counter = field(default_factory=collections.Counter)  # "200", "503", "error:…"
    answers: collections.Counter = field(default_factory=collections.Counter)   # the JSON "status": queued…
    service_s: List[float] = field(default_factory=list)    # send → full answer read
    scheduled_s: List[float] = field(default_factory=list)  # planned send time → answer (paced runs)
    started: float = float("inf")
    ended: float = 0.0
    reconnects: int = 0

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def elapsed(self) -> float:
        return max(1e-9, self.ended - self.started)

    @property
    def rate(self) -> float:
        return self.count / self.elapsed

    def merge(self, other: "LoadResult") -> None:
        self.statuses.update(other.statuses)
        self.answers.update(other.answers)
        self.service_s.extend(other.service_s)
        self.scheduled_s.extend(other.scheduled_s)
        self.started = min(self.started, other.started)
        self.ended = max(self.ended, other.ended)
        self.reconnects += other.reconnects

    def summary(self, latencies: Optional[List[float]] = None) -> str:
        lat = self.service_s if latencies is None else latencies
        return (f"{self.count} requests in {self.elapsed:.2f} s = {self.rate:.0f} req/s; "
                f"p50 {percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms, "
                f"max {max(lat, default=float('nan')) * 1000:.1f} ms; HTTP {dict(self.statuses)} {dict(self.answers)}")


def _answer(body: bytes) -> str:
    try:
        return str(json.loads(body).get("status", "?"))
    except (ValueError, AttributeError):
        return "not-json"


def _client_process(port: int, path: str, bodies: List[Tuple[int, bytes]], threads: int,
                    rate: Optional[float], t0: float, deadline: float) -> LoadResult:
    """One load-generator process: ``threads`` keep-alive connections (``http.client``), each taking
    the next body from this process's share. Closed loop (as fast as answers come) unless ``rate``:
    then body ``k`` is sent at ``t0 + k / rate`` (open loop, latency also counted from that time)."""
    lock = threading.Lock()
    cursor = iter(bodies)
    results = [LoadResult() for _ in range(threads)]

    def run(result: LoadResult) -> None:
        conn: Optional[http.client.HTTPConnection] = None
        while time.monotonic() < deadline:
            with lock:
                item = next(cursor, None)
            if item is None:
                break
            k, body = item
            planned = None
            if rate:
                planned = t0 + k / rate
                delay = planned - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            status = None
            for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    if attempt or result.count:
                        result.reconnects += 1
                sent = time.monotonic()
                try:
                    conn.request("POST", path, body=body, headers=HEADERS)
                    response = conn.getresponse()
                    answer = response.read()
                    status = str(response.status)
                    if response.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    break
                except (http.client.HTTPException, OSError) as exc:
                    conn.close()
                    conn = None
                    status = f"error:{type(exc).__name__}"
            done = time.monotonic()
            result.started = min(result.started, planned if planned is not None else sent)
            result.ended = max(result.ended, done)
            result.statuses[status] += 1
            if status == "200":
                result.answers[_answer(answer)] += 1
            result.service_s.append(done - sent)
            if planned is not None:
                result.scheduled_s.append(done - planned)
        if conn is not None:
            conn.close()

    workers = [threading.Thread(target=run, args=(r,), daemon=True) for r in results]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(1.0, deadline - time.monotonic() + 35))
    total = LoadResult()
    for result in results:
        total.merge(result)
    return total


def client_pool(processes: int):
    """A pool of load-generator processes to reuse across ``post_load`` calls (``with client_pool(n)``)."""
    return multiprocessing.get_context("spawn").Pool(processes)


def post_load(port: int, bodies: Sequence[bytes], processes: int = 2, threads: int = 8,
              rate: Optional[float] = None, path: str = "/cases", timeout: float = 600.0,
              pool=None) -> LoadResult:
    """Post ``bodies`` to ``127.0.0.1:port`` from ``processes`` × ``threads`` keep-alive clients.

    The clients run in separate processes (``spawn``), so the benchmark's own interpreter (which
    may be serving the ThreatQ simulator) does not slow them, nor they it. Bodies are dealt
    round-robin; with ``rate`` the run is paced at that many requests per second overall.
    """
    indexed = list(enumerate(bodies))
    shares = [indexed[p::processes] for p in range(processes)]
    start_in = 1.5 if rate else 0.0  # paced: every process starts on the same clock (spawn takes time)
    t0 = time.monotonic() + start_in
    deadline = time.monotonic() + timeout
    total = LoadResult()
    own = pool is None
    pool = client_pool(processes) if own else pool
    try:
        jobs = [pool.apply_async(_client_process, (port, path, share, threads, rate, t0, deadline))
                for share in shares if share]
        for job in jobs:
            total.merge(job.get(timeout=timeout + 60))
    finally:
        if own:
            pool.terminate()
            pool.join()
    return total


# --------------------------------------------------------------------------- a plain gunicorn app

BARE_APP = '''\
"""The baseline: a Flask app that answers 200 to POST /cases and does nothing else."""
from flask import Flask, request

app = Flask(__name__)


@app.route("/cases", methods=["POST"])
def cases():
    request.get_data()  # read the body, as any server must; nothing is decoded or stored
    return {"status": "queued"}
'''


class BareGunicorn:
    """``python -m gunicorn -k gthread --threads T -w W -b 127.0.0.1:0 bare_app:app`` from a temp dir."""

    LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")

    def __init__(self, workdir: Path, workers: int = 2, threads: int = 4) -> None:
        self.workdir = Path(workdir)
        self.workers, self.threads = workers, threads
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.log = self.workdir / "gunicorn.log"

    def start(self, timeout: float = 30) -> "BareGunicorn":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "bare_app.py").write_text(BARE_APP)
        command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", str(self.threads),
                   "-w", str(self.workers), "-b", "127.0.0.1:0", "--chdir", str(self.workdir), "bare_app:app"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(self.workdir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            match = self.LISTENING.search(text)
            if match and text.count("Booting worker with pid") >= self.workers:
                self.port = int(match.group(1))
                time.sleep(0.5)  # the workers import Flask after their "Booting" line
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the bare gunicorn app did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def stopwatch() -> Callable[[], float]:
    started = time.monotonic()
    return lambda: time.monotonic() - started
