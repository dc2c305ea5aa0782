#!/usr/bin/env python3
"""Ingest: how fast the daemon takes webhooks on POST /cases, against a bare Flask app on the same gunicorn.

    python bench/ingest.py [--requests 5000] [--rate 200] [--paced-seconds 15] [--threatq sim|down]
                           [--store sqlite|nofsync|noop] [--batch-max N]

Two servers, one after the other, in the same run and with the same gunicorn settings (gthread,
``--workers`` processes × 4 threads, 127.0.0.1, an ephemeral port):

* the baseline: a Flask app written into a temporary directory that reads the body and answers
  200 without doing anything (``python -m gunicorn -k gthread --threads 4 -w 2 -b 127.0.0.1:0
  bare_app:app``, its port read from gunicorn's log);
* our daemon (``python -m tq_mw_thehive``, started by ``Daemon`` at ``-v 2``, the default level
  with a log directory), with the ThreatQ simulator running in this process (``--threatq sim``,
  the realistic case: each worker's sync thread applies the events while they arrive, so its CPU
  is part of the figure) or ThreatQ unreachable (``--threatq down``: the sync thread only backs
  off). Enrichment is disabled.

Both get the same realistic TheHive 5 webhook bodies (cases, observables of nine data types,
updates; about 3-6 KB each), every one with its own audit ``_id`` so that the daemon stores
every one. Each server gets a warm-up, then a paced phase (``--rate`` requests/s, open loop,
for ``--paced-seconds``), then a closed-loop phase (``--requests`` as fast as
``--processes`` × ``--threads`` keep-alive clients can, in separate processes).

``--store`` says what the daemon's ``Inbox.put`` does, to show what the durable commit costs:
``sqlite`` (the default: the product as it is, each event committed with an fsync before its
answer), ``nofsync`` (the same SQLite transactions committed without waiting for the disk,
``synchronous=NORMAL``) or ``noop`` (nothing stored: every event answered ``queued``, the rest of
the request path unchanged). The last two are measurements only, made by a ``sitecustomize`` this
script writes into its temporary directory and puts on the daemon's ``PYTHONPATH``; with ``noop``
the "every event stored" check is skipped.

Prints requests/s, p50 and p99 latency, the daemon/baseline ratios, then PASS/FAIL against the
issue's targets: throughput at least 0.7 of the baseline; p99 under 20 ms at 200 requests/s;
plus every answer 200 and every event stored. The last line is ``ingest: N passed, M failed``;
the exit code is 1 when a check failed. Note that the load generator runs on the same machine
(2 cores here) as the server it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BareGunicorn, Report, Rig, cpu_seconds, encode, inbox_stats, mixed_stream,  # noqa: E402
                    percentile, post_load, process_tree)


# Loaded by the daemon's processes (and only theirs) with --store nofsync|noop: a measurement, not the product.
STORE_SITECUSTOMIZE = '''\
import itertools, os, threading
_store = os.environ.get("TQ_MW_BENCH_STORE")
if _store in ("nofsync", "noop"):
    from tq_mw_thehive import inbox as _inbox
    if _store == "nofsync":
        _inbox.Inbox.DURABLE_WRITES = False  # the same transactions, committed with synchronous=NORMAL
    else:
        _ids, _ids_lock = itertools.count(1), threading.Lock()

        def _put(self, event, body):
            with _ids_lock:
                return _inbox.PutResult(next(_ids), True)

        _inbox.Inbox.put = _put
'''

HANDLER_MS = re.compile(r"event audit=~(\d+) .*? outcome=\w+.*? ms=([\d.]+)")
RUNS = {10: "warm-up", 11: "paced", 12: "closed loop", 20: "warm-up", 21: "paced", 22: "closed loop"}


def handler_ms(log_text: str) -> Dict[str, List[float]]:
    """The daemon's own time per request (its ``event … ms=`` log line), by phase (from the audit id)."""
    out: Dict[str, List[float]] = {}
    for match in HANDLER_MS.finditer(log_text):
        run = (int(match.group(1)) - 3_000_000) // 20_000_000
        out.setdefault(RUNS.get(run, "?"), []).append(float(match.group(2)))
    return out


def probe_put(work: Path, n: int = 500) -> Dict[str, float]:
    """One process, one thread, no contention: the request path's parts, timed in-process."""
    from tq_mw_thehive import state
    from tq_mw_thehive.inbox import Inbox
    from tq_mw_thehive.thehive import events

    raw = bodies(n, 30)
    started = time.perf_counter()
    parsed = []
    for body in raw:
        text = body.decode("utf-8")
        parsed.append((events.parse(json.loads(text)), text))
    decode_ms = (time.perf_counter() - started) * 1000 / n
    db = work / "probe.db"
    state.open_state(db).close()
    inbox = Inbox(db)
    try:
        started = time.perf_counter()
        for event, text in parsed:
            inbox.put(event, text)
        put_ms = (time.perf_counter() - started) * 1000 / n
    finally:
        inbox.close()
    return {"decode_parse_ms": decode_ms, "put_ms": put_ms, "bytes": sum(map(len, raw)) / n}


def bodies(n: int, run: int):
    return [encode(e) for e in mixed_stream(n, run=run)]


def measure(name: str, port: int, master: int, args, run_base: int, load_kwargs) -> dict:
    warm = post_load(port, bodies(args.warmup, run_base), **load_kwargs)
    print(f"  {name} warm-up: {warm.summary()}", flush=True)
    paced_bodies = bodies(int(args.rate * args.paced_seconds), run_base + 1)
    paced = post_load(port, paced_bodies, rate=args.rate, **load_kwargs)
    print(f"  {name} paced at {args.rate:g}/s: {paced.summary()}", flush=True)
    print(f"  {name} paced, counted from the planned send time: p50 "
          f"{percentile(paced.scheduled_s, 50) * 1000:.1f} ms, p99 {percentile(paced.scheduled_s, 99) * 1000:.1f} ms",
          flush=True)
    full_bodies = bodies(args.requests, run_base + 2)
    pids = process_tree(master)
    cpu_before = cpu_seconds(pids)
    full = post_load(port, full_bodies, **load_kwargs)
    cpu = cpu_seconds(pids) - cpu_before
    print(f"  {name} closed loop: {full.summary()}", flush=True)
    print(f"  {name} closed loop: server processes used {cpu:.1f} CPU s = {cpu / full.count * 1000:.2f} CPU ms "
          f"per request ({cpu / full.elapsed:.2f} of the machine's cores while it ran)", flush=True)
    return {"warm": warm, "paced": paced, "full": full, "cpu_ms": cpu / full.count * 1000,
            "posted": warm.count + paced.count + full.count}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="closed-loop requests per server")
    parser.add_argument("--rate", type=float, default=200.0, help="paced phase, requests per second")
    parser.add_argument("--paced-seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--threads", type=int, default=8, help="keep-alive connections per load process")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers, both servers")
    parser.add_argument("--threatq", choices=("sim", "down"), default="sim",
                        help="sim: the ThreatQ simulator runs (realistic); down: ThreatQ unreachable")
    parser.add_argument("--store", choices=("sqlite", "nofsync", "noop"), default="sqlite",
                        help="the daemon's Inbox.put: sqlite (the product), nofsync (no fsync on commit) "
                             "or noop (nothing stored); the last two are measurements only")
    parser.add_argument("--batch-max", type=int, default=None,
                        help="the daemon's sync.batch_max (default: the config's default)")
    parser.add_argument("--min-ratio", type=float, default=0.7)
    parser.add_argument("--max-p99-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    load_kwargs = {"processes": args.processes, "threads": args.threads}
    report = Report("ingest")
    print(f"ingest: {args.workers} gunicorn workers × 4 threads (gthread) for both servers; "
          f"{args.processes}×{args.threads} clients; {args.requests} closed-loop requests; "
          f"paced {args.rate:g}/s for {args.paced_seconds:g} s; ThreatQ {args.threatq}; enrichment off"
          + (f"; store {args.store} (a measurement, not the product)" if args.store != "sqlite" else ""),
          flush=True)

    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-ingest-") as work:
        bare = BareGunicorn(Path(work) / "bare", workers=args.workers, threads=4)
        try:
            bare.start()
            print(f"baseline: bare Flask app on gunicorn, port {bare.port}", flush=True)
            base = measure("baseline", bare.port, bare.proc.pid, args, 10, load_kwargs)
        finally:
            bare.stop()

        rig = Rig(Path(work) / "daemon", threatq=args.threatq, workers=args.workers,
                  sync={} if args.batch_max is None else {"batch_max": args.batch_max})
        if args.store != "sqlite":
            site = Path(work) / "store"
            site.mkdir()
            (site / "sitecustomize.py").write_text(STORE_SITECUSTOMIZE)
            env = rig.daemon.env
            env["TQ_MW_BENCH_STORE"] = args.store
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        try:
            rig.start()
            print(f"daemon: tq_mw_thehive on gunicorn, port {rig.daemon.port}, ThreatQ "
                  f"{'simulator at ' + rig.sim.url if args.threatq == 'sim' else 'unreachable'}", flush=True)
            ours = measure("daemon", rig.daemon.port, rig.daemon.proc.pid, args, 20, load_kwargs)
            time.sleep(0.5)
            stats = inbox_stats(rig.state_db)
            stored = stats["pending"] + stats["done"] + stats["dead"]
            synced = len(rig.sim.requests)
            print(f"  daemon inbox after the run: {stats}; ThreatQ calls meanwhile: {synced}", flush=True)
        finally:
            rig.stop()
        inside = handler_ms(rig.daemon.log_text())
        probe = probe_put(Path(work))

    b, o = base["full"], ours["full"]
    ratio = o.rate / b.rate
    bp, op = percentile(base["paced"].service_s, 99) * 1000, percentile(ours["paced"].service_s, 99) * 1000
    bps, ops = (percentile(base["paced"].scheduled_s, 99) * 1000, percentile(ours["paced"].scheduled_s, 99) * 1000)
    print()
    print(f"{'':26}{'baseline':>12}{'daemon':>12}{'ratio':>9}")
    print(f"{'closed loop req/s':26}{b.rate:12.0f}{o.rate:12.0f}{ratio:9.2f}")
    for q in (50, 99):
        bq, oq = percentile(b.service_s, q) * 1000, percentile(o.service_s, q) * 1000
        print(f"{f'closed loop p{q} ms':26}{bq:12.1f}{oq:12.1f}{oq / bq:9.2f}")
    for q in (50, 99):
        bq = percentile(base["paced"].service_s, q) * 1000
        oq = percentile(ours["paced"].service_s, q) * 1000
        print(f"{f'paced {args.rate:g}/s p{q} ms':26}{bq:12.1f}{oq:12.1f}{oq / bq:9.2f}")
    print(f"{'paced p99 from schedule':26}{bps:12.1f}{ops:12.1f}{ops / bps:9.2f}")
    print(f"{'paced achieved req/s':26}{base['paced'].rate:12.0f}{ours['paced'].rate:12.0f}")
    cpu_b, cpu_o = base["cpu_ms"], ours["cpu_ms"]
    print(f"{'server CPU ms/request':26}{cpu_b:12.2f}{cpu_o:12.2f}{cpu_o / cpu_b:9.2f}")
    print()
    print("where the daemon's time goes:")
    for phase in ("paced", "closed loop"):
        ms = inside.get(phase, [])
        if ms:
            print(f"  inside the handler ({phase}, from its log lines): p50 {percentile(ms, 50):.1f} ms, "
                  f"p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms over {len(ms)} requests")
    print(f"  alone in one thread, no contention (mean body {probe['bytes']:.0f} B): decode + parse "
          f"{probe['decode_parse_ms']:.3f} ms; inbox.put (one fsync'd SQLite transaction) {probe['put_ms']:.2f} ms, "
          f"so one write lock for all workers allows at most ~{1000 / probe['put_ms']:.0f} puts/s")
    print()
    all_ok = all(r.ok == r.count for run in (base, ours) for r in (run["warm"], run["paced"], run["full"]))
    report.check("every answer 200", all_ok,
                 f"baseline {dict(b.statuses)}, daemon {dict(o.statuses)}" if not all_ok else "")
    if args.store == "noop":
        print(f"  (store noop: nothing stored, {stored} events in the inbox: no \"every event stored\" check)")
    else:
        report.check("every event stored in the inbox", stored == ours["posted"], f"{stored} of {ours['posted']}")
    report.check(f"throughput at least {args.min_ratio:g} of the bare app", ratio >= args.min_ratio,
                 f"{o.rate:.0f} / {b.rate:.0f} req/s = {ratio:.2f}")
    report.check(f"p99 under {args.max_p99_ms:g} ms at {args.rate:g} requests/s", op < args.max_p99_ms,
                 f"daemon p99 {op:.1f} ms (baseline {bp:.1f} ms); from the planned send time {ops:.1f} ms")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
