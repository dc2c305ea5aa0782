#!/usr/bin/env python3
"""Burst: one case, then a burst of new observables of it, against a ThreatQ 50 ms away.

    python bench/burst.py [--observables 300] [--latency-ms 50] [--mode one-at-a-time] [--mode batched] [--enrichment]

Issue 15, item 1. It starts the ThreatQ simulator in this process (loopback) with ``latency_ms``
(every answer, token grants included, waits ``--latency-ms``: a remote instance's round trip;
concurrent calls wait in parallel), the real daemon (gunicorn, ``--workers`` processes, the
daemon's default of 2, a sync thread in each, ``-v 2``) with enrichment disabled (``--enrichment``:
the four offline plugins on, the external ones off; nothing leaves the machine either way), and
posts over one keep-alive connection, back to back: one case create, then ``--observables`` creates
of new observables of that case (ip, domain and hash in turn, every value unique; the hashes MD5,
SHA-1 and SHA-256 in turn; TheHive 5 audit payloads as ``common.py`` builds them from the
project's samples). With ``--enrichment`` the offline plugins' indexes are built beforehand, once,
in ``--index-dir`` (kept between runs), so that the burst does not pay their build.

It measures the seconds from the first post to an empty inbox (nothing pending, every event done
or dead; the inbox is polled every 50 ms up to ``--timeout``), and the ThreatQ calls per new
observable: **every** request the simulator answered in the run (its ``requests`` log: the
benchmark's own token grant, what the daemon calls at start, the case's calls, token grants and
type/status look-ups included) divided by ``--observables``; the calls of the burst alone (first
post to empty inbox) are printed too, with a breakdown by call kind (method, path with ids as
``{id}``, query parameter names). It then asks the simulator whether every observable is one
indicator linked to the case's one event, and the inbox whether nothing is dead.

One summary line per run (a run is one *mode*: a configuration of the daemon, started afresh with
its own simulator). The first mode is the baseline, ``one-at-a-time`` (``sync.batch_max: 1``, the
path before batching); ``batched`` is the default configuration; both run in the same invocation: the comparison lines then give each
mode's ratio to the baseline, and every mode's ratio to the targets (the burst lands in ≤ 5 s with
≤ 0.1 calls per observable). Then PASS/FAIL per check: every post answered ``queued``, the inbox
empty with nothing dead, one event for the case and one indicator per observable, every indicator
linked to the case's event (per mode), and the two targets (for the last mode run: the newest
configuration; with ``one-at-a-time`` alone, that path, which misses them). The last line is ``burst:
N passed, M failed`` and the exit code is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BASE_TS, HEADERS, OFFLINE_PLUGINS, Report, Rig, audit, case_object, encode,  # noqa: E402
                    observable_object, offline_enrichment, percentile, shape, wait_drained)

TARGET_SECONDS = 5.0
TARGET_CALLS = 0.1
CASE_NO = 4242


@dataclass(frozen=True)
class Mode:
    """One configuration of the daemon the benchmark runs: ``sync`` goes into the config's ``sync:``."""
    name: str
    what: str
    sync: Dict[str, object] = field(default_factory=dict)


# The first is the baseline every other mode is compared with in the same invocation.
MODES: Dict[str, Mode] = {m.name: m for m in (
    Mode("one-at-a-time", "sync.batch_max: 1, each event applied alone (the path before batching)",
         {"batch_max": 1}),
    Mode("batched", "sync.batch_max: 500 (the default): a case's queued events in one go"),
)}
BASELINE = next(iter(MODES))


# --------------------------------------------------------------------------- the burst's events

def _hash(j: int) -> str:
    """MD5, SHA-1 and SHA-256 in turn (TheHive's one ``hash`` type; ThreatQ's type by length)."""
    algorithm = ("md5", "sha1", "sha256")[(j // 3) % 3]
    return hashlib.new(algorithm, f"burst-payload-{j}".encode()).hexdigest()


BURST_TYPES: Sequence[Tuple[str, Callable[[int], str]]] = (
    ("ip", lambda j: f"{11 + (j >> 16) % 200}.{(j >> 8) & 255}.{j & 255}.{7 + j % 240}"),
    ("domain", lambda j: f"login-{j}.phish-{j % 61}.example.net"),
    ("hash", _hash),
)


def burst_events(n: int, case_no: int = CASE_NO) -> Tuple[dict, List[dict]]:
    """The case create and ``n`` observable creates of that case, in TheHive's order (one ms apart)."""
    ts0 = BASE_TS + case_no * 1000
    case = case_object(case_no, ts0)
    events = [audit(f"~{7_000_000 + case_no * 10_000}", "create", ts0, case, dict(case))]
    for j in range(n):
        data_type, make = BURST_TYPES[j % len(BURST_TYPES)]
        ts = ts0 + 20 + j
        obs = observable_object(case, case_no * 10_000 + j, data_type, make(j), ts)
        events.append(audit(f"~{7_000_001 + case_no * 10_000 + j}", "create", ts, obs,
                            {k: v for k, v in obs.items() if k != "case"}))
    return case, events


# --------------------------------------------------------------------------- offline indexes (--enrichment)

# One lookup per offline plugin builds its index (data type, value); footprint.py's PLUGIN_VALUES.
WARM_INDEXES = """\
from tq_mw_thehive.enrichment.plugin import Lookup
for name, data_type, value in (("ip_scope", "ip", "9.9.9.9"), ("geoip", "ip", "9.9.9.9"),
                               ("warninglists", "ip", "9.9.9.9"), ("domain", "domain", "www.example.co.uk")):
    plugin = __import__("tq_mw_thehive.plugins." + name, fromlist=["lookup"])
    request = Lookup(data_type=data_type, value=value)
    if hasattr(plugin, "prepare"):
        plugin.prepare(request)
    plugin.lookup(request)
"""


def warm_offline_indexes(index_dir: Path) -> float:
    """Build (or find) the offline plugins' indexes in ``index_dir`` in a child process, and point the
    daemon there (``$TQ_MW_OFFLINE_INDEX_DIR``, read when ``Rig`` builds the daemon's environment):
    otherwise each run's fresh state directory would rebuild them inside the burst (30-40 s here)."""
    index_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["TQ_MW_OFFLINE_INDEX_DIR"] = str(index_dir)
    started = time.monotonic()
    import tq_mw_thehive  # the child imports the package this script runs, as Daemon does
    here = str(Path(tq_mw_thehive.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    subprocess.run([sys.executable, "-c", WARM_INDEXES], check=True, timeout=600, cwd=str(index_dir),
                   stdin=subprocess.DEVNULL, env=env)
    return time.monotonic() - started


# --------------------------------------------------------------------------- what ThreatQ was asked

def call_kind(method: str, path: str, query: str) -> str:
    """``GET /api/indicators?value=…&with=attributes,sources,tags``: ids as ``{id}``, query values
    elided except ``with`` and ``grant_type`` (they say what a call does)."""
    params = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        params.append(f"{name}={value}" if name in ("with", "grant_type") else f"{name}=…")
    return f"{method} {shape(path)}" + ("?" + "&".join(params) if params else "")


class CallLog:
    """WSGI middleware: every request's kind (``call_kind``) in arrival order, around the simulator."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.kinds: List[str] = []

    def __call__(self, environ, start_response):
        kind = call_kind(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        with self.lock:
            self.kinds.append(kind)
        return self.app(environ, start_response)

    def mark(self) -> int:
        with self.lock:
            return len(self.kinds)


# --------------------------------------------------------------------------- posting

def post_in_order(port: int, bodies: Sequence[bytes], timeout: float = 30) -> Tuple[collections.Counter, float]:
    """Post ``bodies`` one after the other on one keep-alive connection (as TheHive's webhook sender
    does); ``(answers, seconds)`` where answers counts ``200 queued``, ``503``, ``error:…``…"""
    answers: collections.Counter = collections.Counter()
    conn: Optional[http.client.HTTPConnection] = None
    started = time.monotonic()
    for body in bodies:
        status = "?"
        for _ in range(2):  # a keep-alive connection the server closed: reconnect once
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.request("POST", "/cases", body=body, headers=HEADERS)
                response = conn.getresponse()
                text = response.read()
                status = str(response.status)
                if status == "200":
                    try:
                        status += " " + str(json.loads(text).get("status"))
                    except (ValueError, AttributeError):
                        status += " not-json"
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
                break
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                conn = None
                status = f"error:{type(exc).__name__}"
        answers[status] += 1
    if conn is not None:
        conn.close()
    return answers, time.monotonic() - started


# --------------------------------------------------------------------------- the daemon's log

SYNC_LINE = re.compile(r"\[(\d+)\] [\w.]+: sync audit=(\S+) case=\S+ object=(\w+):\S+ action=(\w+) threatq=\S+ "
                       r"outcome=(\w+) attempts=\d+ ms=([\d.]+)")


def sync_lines(log_text: str) -> List[Tuple[str, str, str, float, str]]:
    """``(object type, action, outcome, ms, worker pid)`` per ``sync audit=…`` line of the daemon."""
    out = []
    for line in log_text.splitlines():
        match = SYNC_LINE.search(line)
        if match:
            out.append((match.group(3), match.group(4), match.group(5), float(match.group(6)), match.group(1)))
    return out


# --------------------------------------------------------------------------- one run

@dataclass
class Result:
    mode: Mode
    observables: int
    latency_ms: float
    answers: collections.Counter
    post_s: float
    seconds: float
    drained: bool
    stats: Dict[str, object]
    calls_total: int            # every request the simulator answered in the run
    calls_burst: int            # from the first post to the empty inbox
    kinds_setup: collections.Counter
    kinds_start: collections.Counter
    kinds_burst: collections.Counter
    first_calls: List[str]      # the burst's first calls, in arrival order (the case's and the first observables')
    sim_busy_s: float           # wall time inside the simulator's handlers during the burst (latency included)
    events_in_tq: int
    case_events: int
    indicators: int
    linked: int
    single: int                 # observables that are exactly one indicator
    handler_ms: List[float]     # the daemon's own time per observable event (its log)
    case_ms: List[float]
    outcomes: collections.Counter
    per_worker: collections.Counter  # events applied, per worker process (pid)

    @property
    def per_observable(self) -> float:
        return self.calls_total / self.observables

    @property
    def per_observable_burst(self) -> float:
        return self.calls_burst / self.observables

    def summary(self) -> str:
        events = self.observables + 1
        return (f"burst[{self.mode.name}]: 1 case + {self.observables} new observables, ThreatQ {self.latency_ms:g} ms "
                f"a call: {self.seconds:.2f} s from the first post to an empty inbox "
                f"({self.seconds / events * 1000:.0f} ms per event; posting took {self.post_s:.2f} s); "
                f"{self.calls_total} ThreatQ calls = {self.per_observable:.2f} per observable "
                f"({self.calls_burst} = {self.per_observable_burst:.2f} during the burst); "
                f"{self.linked}/{self.observables} indicators linked to the case's event; "
                f"dead {self.stats.get('dead')}" + ("" if self.drained else f"; NOT DRAINED: {self.stats}"))


def run(mode: Mode, args, case: dict, events: List[dict]) -> Result:
    enrichment = offline_enrichment() if args.enrichment else None
    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-burst-") as work:
        rig = Rig(Path(work), threatq="sim", enrichment=enrichment, workers=args.workers,
                  latency_ms=args.latency_ms, sync=mode.sync)
        log = CallLog(rig.timed.app)
        rig.timed.app = log  # TimedApp → CallLog → the simulator
        with rig:
            sim = rig.sim
            setup_mark = rig.setup_calls
            start_mark, start_sim = log.mark(), len(sim.requests)
            sim_s_before = rig.timed.total()
            bodies = [encode(e) for e in events]
            first_post = time.monotonic()
            answers, post_s = post_in_order(rig.daemon.port, bodies)
            drained, stats = wait_drained(rig.state_db, len(events), args.timeout, interval=0.05)
            seconds = time.monotonic() - first_post
            end_mark, end_sim = log.mark(), len(sim.requests)
            sim_busy_s = rig.timed.total() - sim_s_before
            kinds = list(log.kinds)

            # What ThreatQ holds: the case's one event, one indicator per observable, linked to it.
            title = f"Hive Case # {case['_id']} "
            tq_events = sim.events
            case_event_ids = [i for i, e in tq_events.items() if e["title"].startswith(title)]
            linked = single = 0
            for event in events[1:]:
                found = sim.find_indicators(event["object"]["data"])
                if len(found) == 1:
                    single += 1
                    if len(case_event_ids) == 1 and case_event_ids[0] in sim.links_of(
                            "indicators", found[0]["id"], "events"):
                        linked += 1
            indicators = len(sim.indicators)
            time.sleep(0.2)  # the last `sync audit=…` line is written just after the inbox row
            lines = sync_lines(rig.daemon.log_text())
        if args.keep_log:
            target = Path(args.keep_log)
            if len(args.mode) > 1:
                target = target.with_name(f"{target.stem}-{mode.name}{target.suffix}")
            shutil.copyfile(rig.daemon.log_file, target)
    return Result(
        mode=mode, observables=len(events) - 1, latency_ms=args.latency_ms, answers=answers, post_s=post_s,
        seconds=seconds, drained=drained, stats=stats, calls_total=end_sim, calls_burst=end_sim - start_sim,
        kinds_setup=collections.Counter(kinds[:setup_mark]),
        kinds_start=collections.Counter(kinds[setup_mark:start_mark]),
        kinds_burst=collections.Counter(kinds[start_mark:end_mark]),
        first_calls=kinds[start_mark:min(end_mark, start_mark + args.trace)],
        sim_busy_s=sim_busy_s, events_in_tq=len(tq_events), case_events=len(case_event_ids),
        indicators=indicators, linked=linked, single=single,
        handler_ms=[ms for obj, action, _, ms, _ in lines if obj.lower() == "observable" and action == "create"],
        case_ms=[ms for obj, action, _, ms, _ in lines if obj.lower() == "case"],
        outcomes=collections.Counter(outcome for _, _, outcome, _, _ in lines),
        per_worker=collections.Counter(pid for _, _, _, _, pid in lines))


def breakdown(result: Result) -> List[str]:
    """The call kinds × count (rig setup, daemon start, burst) and per observable."""
    n = result.observables
    kinds = list(dict.fromkeys([*result.kinds_setup, *result.kinds_start, *result.kinds_burst]))
    kinds.sort(key=lambda k: -(result.kinds_setup[k] + result.kinds_start[k] + result.kinds_burst[k]))
    width = max([len(k) for k in kinds] + [24])
    out = [f"    {'call kind':{width}}{'setup':>7}{'start':>7}{'burst':>7}{'total':>7}{'per obs.':>10}"]
    for kind in kinds:
        total = result.kinds_setup[kind] + result.kinds_start[kind] + result.kinds_burst[kind]
        out.append(f"    {kind:{width}}{result.kinds_setup[kind]:7d}{result.kinds_start[kind]:7d}"
                   f"{result.kinds_burst[kind]:7d}{total:7d}{total / n:10.3f}")
    setup, start, burst = (sum(c.values()) for c in (result.kinds_setup, result.kinds_start, result.kinds_burst))
    out.append(f"    {'all':{width}}{setup:7d}{start:7d}{burst:7d}{setup + start + burst:7d}"
               f"{(setup + start + burst) / n:10.3f}")
    return out


def timing(result: Result) -> List[str]:
    h = result.handler_ms
    busy = sum(h) + sum(result.case_ms)
    per_event = result.seconds / (result.observables + 1) * 1000
    latency_s = result.calls_burst * result.latency_ms / 1000
    return [
        f"    time: {per_event:.1f} ms per event from the first post to an empty inbox; the daemon's own time "
        f"per observable create (its log) p50 {percentile(h, 50):.1f} ms, p90 {percentile(h, 90):.1f} ms, "
        f"max {max(h, default=float('nan')):.1f} ms over {len(h)} lines; the case create {sum(result.case_ms):.1f} ms",
        f"    where: sync threads busy {busy / 1000:.2f} s = {busy / 1000 / max(result.seconds, 1e-9):.2f} of the "
        f"wall time (1.00 = one thread at a time); the burst's calls × latency = {latency_s:.2f} s "
        f"({latency_s / max(result.seconds, 1e-9):.2f} of the wall time if paid one after the other); "
        f"{result.sim_busy_s:.2f} s inside the simulator (latency included); outcomes {dict(result.outcomes)}; "
        f"events per worker process {sorted(result.per_worker.values(), reverse=True)}",
    ]


def compare(results: List[Result]) -> List[str]:
    base = results[0]
    out = []
    for r in results:
        line = (f"burst[{r.mode.name}] against the targets: {r.seconds:.2f} s = {r.seconds / TARGET_SECONDS:.1f}× "
                f"the {TARGET_SECONDS:g} s target; {r.per_observable:.2f} calls per observable = "
                f"{r.per_observable / TARGET_CALLS:.1f}× the {TARGET_CALLS:g} target")
        if r is not base:
            line += (f"; against {base.mode.name} (same run): time {r.seconds / base.seconds:.3f}×, "
                     f"calls {r.per_observable / base.per_observable:.3f}×")
        out.append(line)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observables", type=int, default=300, help="new observables of the one case (default 300)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="ThreatQ's answer time per call (default 50)")
    parser.add_argument("--mode", action="append", choices=list(MODES),
                        help=f"a configuration of the daemon, repeatable (default: all, {BASELINE} first)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (the daemon's default: 2)")
    parser.add_argument("--enrichment", action="store_true",
                        help=f"enrichment on with the offline plugins only ({', '.join(OFFLINE_PLUGINS)})")
    parser.add_argument("--index-dir", type=Path, default=Path.home() / ".cache" / "tq_mw_thehive" / "bench-burst",
                        help="with --enrichment: where the offline indexes are built once and kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline for the inbox to empty, s")
    parser.add_argument("--trace", type=int, default=12, help="print the burst's first N calls in order (default 12)")
    parser.add_argument("--keep-log", metavar="FILE", help="copy the daemon's log here at the end")
    args = parser.parse_args(argv)
    if args.observables < 1:
        parser.error("--observables must be at least 1")
    args.mode = list(dict.fromkeys(args.mode or list(MODES)))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report("burst")
    case, events = burst_events(args.observables)
    if args.enrichment:
        print(f"burst: offline indexes in {args.index_dir} ready in {warm_offline_indexes(args.index_dir):.1f} s "
              f"(built the first time only)", flush=True)
    print(f"burst: 1 case create + {args.observables} new observables of it ({', '.join(t for t, _ in BURST_TYPES)} "
          f"in turn), posted back to back on one connection; ThreatQ simulator in this process at "
          f"{args.latency_ms:g} ms a call; daemon: {args.workers} gunicorn workers, a sync thread each; "
          f"enrichment {'offline plugins only' if args.enrichment else 'disabled'}; modes: {', '.join(args.mode)}",
          flush=True)

    results: List[Result] = []
    for name in args.mode:
        result = run(MODES[name], args, case, events)
        results.append(result)
        print(result.summary(), flush=True)
        for line in breakdown(result):
            print(line)
        for line in timing(result):
            print(line, flush=True)
        if result.first_calls:
            print(f"    the burst's first {len(result.first_calls)} calls, in order:")
            for k, kind in enumerate(result.first_calls, 1):
                print(f"    {k:4d}. {kind}")
    print()
    for line in compare(results):
        print(line)
    print()
    n = args.observables
    for r in results:
        tag = f"[{r.mode.name}] "
        report.check(tag + "every post answered 200 queued",
                     set(r.answers) == {"200 queued"} and sum(r.answers.values()) == n + 1, f"{dict(r.answers)}")
        report.check(tag + "inbox empty, every event done, none dead",
                     r.drained and r.stats.get("dead") == 0 and r.stats.get("done") == n + 1, f"inbox {r.stats}")
        report.check(tag + "one ThreatQ event for the case, one indicator per observable",
                     r.case_events == 1 and r.events_in_tq == 1 and r.single == n and r.indicators == n,
                     f"{r.events_in_tq} events ({r.case_events} of the case), {r.indicators} indicators, "
                     f"{r.single} observables with exactly one")
        report.check(tag + "every indicator linked to the case's event", r.linked == n, f"{r.linked}/{n}")
        if r is not results[-1]:
            continue  # the targets are checks of the last mode run (the newest configuration)
        report.check(tag + f"target: the burst lands in ≤ {TARGET_SECONDS:g} s", r.seconds <= TARGET_SECONDS,
                     f"{r.seconds:.2f} s")
        report.check(tag + f"target: ≤ {TARGET_CALLS:g} ThreatQ calls per observable, every call counted",
                     r.per_observable <= TARGET_CALLS, f"{r.per_observable:.3f}")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
