#!/usr/bin/env python3
"""Memory: resident memory of every daemon process stays within 30 MB of its level after warm-up.

    python bench/memory.py [--events 50000] [--warmup 5000] [--enrichment]

It starts the ThreatQ simulator in this process (loopback) and the real daemon (gunicorn master
and ``--workers`` workers, a sync thread in each, ``-v 2``), enrichment disabled unless
``--enrichment`` (then the four bundled offline plugins: ip_scope, geoip, domain,
warninglists), and posts ``--events`` distinct TheHive 5 events (per case: the case, nine
observables, an update of the case and of each observable, half of which change nothing), in
chunks, never letting more than ``--max-backlog`` wait in the inbox, so that the sync keeps up
and every event is applied to ThreatQ, not only stored.

Every ``--interval`` seconds it reads VmRSS from ``/proc/<pid>/status`` for the master and every
child (``/proc/<pid>/task/*/children``). The warm-up level of a process is its RSS once
``--warmup`` events are done (applied); its growth is the highest RSS after that minus the
warm-up level. Prints per process: warm-up, peak, final and growth, and the events/s, then
PASS/FAIL: every process within ``--max-growth-mb`` (30 MB) of its warm-up level, no worker
replaced, every event done and none dead. The last line is ``memory: N passed, M failed``; the
exit code is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (Inbox, Report, Rig, client_pool, encode, mixed_stream, offline_enrichment,  # noqa: E402
                    post_load, process_tree, rss_kb)


@dataclass
class Proc:
    pid: int
    role: str
    samples: List[Tuple[float, int, int]] = field(default_factory=list)  # (s, done events, kB)
    warmup_kb: Optional[int] = None
    warmup_s: Optional[float] = None

    def peak_after_warmup(self) -> Optional[int]:
        if self.warmup_s is None:
            return None
        return max(kb for t, _, kb in self.samples if t >= self.warmup_s)


class Sampler:
    """RSS of the daemon's processes every ``interval`` s; the warm-up sample once ``warmup`` events are done."""

    def __init__(self, master: int, state_db: Path, interval: float, warmup: int) -> None:
        self.master, self.state_db = master, state_db
        self.interval, self.warmup = interval, warmup
        self.procs: Dict[int, Proc] = {}
        self.started = time.monotonic()
        self.done = 0
        self.warm_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._inbox = None

    def sample(self) -> None:
        now = time.monotonic() - self.started
        stats = self._inbox.stats()
        self.done = stats["done"] + stats["dead"]
        warm_now = self.warm_at is None and self.done >= self.warmup
        for pid in process_tree(self.master):
            kb = rss_kb(pid)
            if kb is None:
                continue
            proc = self.procs.setdefault(pid, Proc(pid, "master" if pid == self.master else "worker"))
            proc.samples.append((now, self.done, kb))
            if warm_now:
                proc.warmup_kb, proc.warmup_s = kb, now
        if warm_now:
            self.warm_at = now

    def _run(self) -> None:
        self._inbox = Inbox(self.state_db)
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)
            self.sample()
        finally:
            self._inbox.close()

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def line(self) -> str:
        latest = {pid: p.samples[-1][2] / 1024 for pid, p in self.procs.items() if p.samples}
        return ", ".join(f"{self.procs[pid].role} {pid} {mb:.1f} MB" for pid, mb in sorted(latest.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=5_000, help="events done before the warm-up sample")
    parser.add_argument("--max-growth-mb", type=float, default=30.0)
    parser.add_argument("--enrichment", action="store_true", help="the offline bundled plugins on")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=500, help="events posted at a time")
    parser.add_argument("--max-backlog", type=int, default=1000, help="pending events before posting waits")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=3600.0, help="the whole run")
    args = parser.parse_args(argv)
    if args.warmup >= args.events:
        parser.error("--warmup must be smaller than --events")
    report = Report("memory")
    print(f"memory: {args.events} events (warm-up: the first {args.warmup} applied); daemon with "
          f"{args.workers} workers; ThreatQ simulator running; enrichment "
          f"{'on (offline plugins: ip_scope, geoip, domain, warninglists)' if args.enrichment else 'disabled'}",
          flush=True)
    deadline = time.monotonic() + args.timeout
    events = mixed_stream(args.events, run=7)
    posted, answers, timed_out = 0, {}, False

    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-memory-") as work, client_pool(1) as pool:
        rig = Rig(Path(work), threatq="sim", workers=args.workers,
                  enrichment=offline_enrichment() if args.enrichment else None)
        try:
            rig.start()
            sampler = Sampler(rig.daemon.proc.pid, rig.state_db, args.interval, args.warmup).start()
            inbox = Inbox(rig.state_db)
            started, last_print = time.monotonic(), 0.0
            try:
                while posted < args.events and not timed_out:
                    while inbox.stats()["pending"] > args.max_backlog:
                        if time.monotonic() > deadline:
                            timed_out = True
                            break
                        time.sleep(0.2)
                    chunk = [encode(e) for _, e in zip(range(args.chunk), events)]
                    load = post_load(rig.daemon.port, chunk, processes=1, threads=4, pool=pool,
                                     timeout=max(10.0, deadline - time.monotonic()))
                    posted += len(chunk)
                    for key, n in {**load.statuses, **load.answers}.items():
                        answers[key] = answers.get(key, 0) + n
                    if time.monotonic() - last_print >= 30:
                        last_print = time.monotonic()
                        el = last_print - started
                        print(f"  {el:6.0f} s: posted {posted}, applied {sampler.done} "
                              f"({sampler.done / el:.0f}/s); {sampler.line()}", flush=True)
                while not timed_out:
                    stats = inbox.stats()
                    if stats["pending"] == 0 and stats["done"] + stats["dead"] >= posted:
                        break
                    if time.monotonic() > deadline:
                        timed_out = True
                        break
                    time.sleep(0.5)
                elapsed = time.monotonic() - started
                time.sleep(max(2.0, 2 * args.interval))  # a last sample or two once idle
                final_stats = inbox.stats()
            finally:
                inbox.close()
                sampler.stop()
            workers_now = set(process_tree(rig.daemon.proc.pid)[1:])
            sim_calls, sim_s = len(rig.sim.requests), rig.timed.total()
        finally:
            rig.stop()

    print()
    print(f"posted {posted} events, answers {answers}; applied {final_stats['done']} "
          f"({final_stats['dead']} dead) in {elapsed:.0f} s = {posted / elapsed:.1f} events/s; "
          f"{sim_calls} ThreatQ calls, {sim_s:.0f} s inside the simulator" + ("; TIMED OUT" if timed_out else ""))
    print(f"{'process':18}{'warm-up MB':>12}{'peak MB':>10}{'final MB':>10}{'growth MB':>11}{'samples':>9}")
    growths = {}
    for pid, proc in sorted(sampler.procs.items()):
        peak = max(kb for _, _, kb in proc.samples)
        after = proc.peak_after_warmup()
        final = proc.samples[-1][2]
        growth = None if after is None else (after - proc.warmup_kb) / 1024
        growths[pid] = growth
        warm = "-" if proc.warmup_kb is None else f"{proc.warmup_kb / 1024:.1f}"
        print(f"{proc.role + ' ' + str(pid):18}{warm:>12}{peak / 1024:10.1f}{final / 1024:10.1f}"
              f"{'-' if growth is None else format(growth, '.1f'):>11}{len(proc.samples):9d}")
    print(f"(warm-up sample at {sampler.warm_at or float('nan'):.0f} s, once {args.warmup} events were applied; "
          f"growth = highest RSS after it − warm-up)")
    print()
    every = all(g is not None for g in growths.values()) and bool(growths)
    worst = max((g for g in growths.values() if g is not None), default=float("nan"))
    report.check(f"every daemon process within {args.max_growth_mb:g} MB of its warm-up level",
                 every and worst <= args.max_growth_mb, f"largest growth {worst:.1f} MB")
    initial_workers = {pid for pid, p in sampler.procs.items() if p.role == "worker" and p.warmup_kb is not None}
    report.check("no worker replaced", len(initial_workers) == args.workers and initial_workers == workers_now,
                 f"workers at warm-up {sorted(initial_workers)}, at the end {sorted(workers_now)}")
    report.check("every event applied, none dead", not timed_out and final_stats["pending"] == 0
                 and final_stats["dead"] == 0 and final_stats["done"] == posted == args.events,
                 f"inbox {final_stats}")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
