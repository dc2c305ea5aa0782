#!/usr/bin/env python3
"""Inbox scale: the cost of /healthz, /metrics, /status and `status` from 10,000 to 1,000,000 rows.

    python bench/inbox_scale.py [--sizes 10000,100000,1000000] [--body-bytes 4200] [--per-day 6000]

Issue 13 item 7: months of done events must not make the endpoints slower (before: a full scan,
1.1-1.9 s at a million rows, which a loop of unauthenticated scrapes turned into seconds of
delay for webhooks). For each size, in the same run:

1. A state database is built directly in SQLite (the daemon's schema, `state.open_state`; rows
   inserted by one recursive ``INSERT … SELECT``, so the counting triggers run as for real
   events): ``--body-bytes`` per body (4,200: the issue's average), ``--per-day`` events a day
   up to now (6,000: a busy instance, so a million rows are the issue's six months), a backlog
   that does not grow with the history (200 pending: 150 queued, 20 in progress, 30 waiting to
   retry), 50 dead letters, every other row done (finished a second after arrival).
2. The Flask app of the daemon (``web.create_app``, test client, no network) answers ``--repeat``
   times each, the sizes taken in turns (10 rounds) so that they share the disk's and CPU's
   moods: ``GET /healthz`` (a durable write and the counts), ``GET /metrics``, ``GET /status``
   (Bearer admin token), and ``Inbox.stats()`` (what `tq-mw-thehive status` prints).
   Medians and p95 are printed, with the ratio of the median to the smallest size's.
   For comparison, the counting query as it was before (one pass over every row) is timed too.
3. Retention at that size (the first pass after an upgrade: everything older than 30 days; none
   below 180,000 rows at the default rate): ``Inbox.purge`` with ``inbox.keep_done`` = 30 days, in
   the daemon's batches (``inbox.PURGE_BATCH``) and pauses, with the batches timed (each is one
   write transaction: the longest a webhook can wait behind it), while another thread puts an
   event every 20 ms (its put latency, p50/p99/max); then ``release_free_pages`` with a daemon
   pass's budget (even above the 100 MB free where the daemon skips it), and, the put thread
   stopped, ``Inbox.vacuum``, which `purge --vacuum` runs with the daemon stopped.

Checks (PASS/FAIL): every endpoint's median at the largest size within ``--flat-ratio`` (2.5)
of the smallest size's; no purge batch over 250 ms; every put during the purge answered in
under 1 s; the counts still equal a full count after the purge. The last line is
``inbox_scale: N passed, M failed``; exit 1 when a check failed. Disk: about
``rows × (body + 0.4 KB)`` for all sizes together (5.3 GB at the defaults), freed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Report, percentile  # noqa: E402

from tq_mw_thehive import config as config_mod, state, web  # noqa: E402
from tq_mw_thehive.inbox import PURGE_BATCH, PURGE_PAUSE_S, RELEASE_BUDGET_S, Inbox  # noqa: E402
from tq_mw_thehive.services import Services  # noqa: E402
from tq_mw_thehive.thehive import events  # noqa: E402

ADMIN = "bench-admin-token-0123456789abcdef"
DAY = 86400.0
KEEP_DONE = 30 * DAY
PENDING, LEASED, WAITING, DEAD = 200, 20, 30, 50
# What `stats()` was before migration 7: one pass over every row (and, through `state`, which
# comes after `body` in each row, over every body's overflow pages).
LEGACY_STATS = """SELECT COALESCE(SUM(state = 'pending'), 0),
    COALESCE(SUM(state = 'pending' AND lease_until > :now), 0),
    COALESCE(SUM(state = 'pending' AND next_attempt_at > :now AND NOT IFNULL(lease_until > :now, 0)), 0),
    COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'dead'), 0),
    MIN(CASE WHEN state = 'pending' THEN received_at END) FROM inbox"""


def build(directory: Path, rows: int, body_bytes: int, per_day: int) -> config_mod.Config:
    raw = {"threatq": {"host": "http://127.0.0.1:9", "client_id": "bench"}, "thehive": {"url": "http://127.0.0.1:9"},
           "webhook": {"auth": "none"}, "enrichment": {"enabled": False}, "web": {"admin_token": ADMIN}}
    cfg = config_mod.from_dict(raw, directory)
    db = state.open_state(cfg.state_db)
    now = time.time()
    dead_every = max(1, (rows - PENDING) // DEAD)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :rows),
           r AS (SELECT i, :now - (:rows - i) * 86400.0 / :per_day AS at,
                        CASE WHEN i >= :rows - :pending THEN 'pending'
                             WHEN i % :dead_every = 0 AND i / :dead_every < :dead THEN 'dead' ELSE 'done' END AS st
                 FROM n)
           INSERT INTO inbox (dedup_key, received_at, order_ts, shape, audit_id, object_type, action, object_id,
                              case_key, body, state, attempts, next_attempt_at, lease_owner, lease_until,
                              last_error, finished_at)
           SELECT 'bench:' || i, at, CAST(at * 1000 AS INTEGER), 'thehive5-v1', '~' || i,
                  CASE WHEN i % 10 = 0 THEN 'case' ELSE 'observable' END, 'update', '~obs' || i,
                  'case:~' || (i % 5000), printf('%.*c', :body, 'x'), st, 1,
                  CASE WHEN st = 'pending' AND i >= :rows - :waiting THEN :now + 600 ELSE at END,
                  CASE WHEN st = 'pending' AND i < :rows - :pending + :leased THEN 'bench:1' END,
                  CASE WHEN st = 'pending' AND i < :rows - :pending + :leased THEN :now + 300 END,
                  CASE WHEN st = 'dead' THEN 'ThreatQPermanentError: refused' END,
                  CASE WHEN st = 'pending' THEN NULL ELSE at + 1 END
           FROM r""",
        {"rows": rows, "now": now, "per_day": per_day, "pending": PENDING, "dead_every": dead_every, "dead": DEAD,
         "body": body_bytes, "waiting": WAITING, "leased": LEASED})
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    os.sync()  # the build's gigabytes on disk now, not written back while the endpoints are timed
    return cfg


ROUNDS = 10  # the sizes are measured in turns, so that disk and CPU conditions are shared


def calls(cfg: config_mod.Config) -> Dict[str, Callable[[], object]]:
    """One call of each measured endpoint on the database of ``cfg`` (Flask test client, no network)."""
    inbox = Inbox(cfg.state_db)
    client = web.create_app(Services(cfg, inbox)).test_client()
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def get(path: str, headers=None) -> Callable[[], None]:
        def call() -> None:
            assert client.get(path, headers=headers).status_code == 200, path
        return call

    legacy = Inbox(cfg.state_db)
    return {"/healthz": get("/healthz"), "/metrics": get("/metrics"), "/status": get("/status", admin),
            "status counts": inbox.stats,
            "before: full count": lambda: legacy.db.execute(LEGACY_STATS, {"now": time.time()}).fetchone()}


def measure(targets: Dict[int, Dict[str, Callable[[], object]]], repeat: int) -> Dict[int, Dict[str, List[float]]]:
    """``repeat`` timings (ms) of every call at every size, taken in ``ROUNDS`` turns over the sizes."""
    share = {"/status": max(1, repeat // 10), "before: full count": max(1, repeat // 40)}
    out: Dict[int, Dict[str, List[float]]] = {rows: {name: [] for name in fns} for rows, fns in targets.items()}
    for fns in targets.values():
        for fn in fns.values():
            fn()  # warm-up: connections, page cache, Flask's first request
    for _ in range(ROUNDS):
        for rows, fns in targets.items():
            for name, fn in fns.items():
                for _ in range(max(1, share.get(name, repeat) // ROUNDS)):
                    started = time.perf_counter()
                    fn()
                    out[rows][name].append((time.perf_counter() - started) * 1000)
    return out


def retention(cfg: config_mod.Config) -> Dict[str, object]:
    inbox = Inbox(cfg.state_db)
    batches: List[float] = []
    real_write = inbox.write

    def timed_write(fn, durable=None):
        started = time.perf_counter()
        try:
            return real_write(fn, durable=durable)
        finally:
            batches.append((time.perf_counter() - started) * 1000)

    inbox.write = timed_write  # type: ignore[method-assign]
    puts: List[float] = []
    failed: List[str] = []
    stop = threading.Event()

    def webhooks() -> None:
        writer = Inbox(cfg.state_db)
        i = 0
        while not stop.wait(0.02):
            payload = {"_id": f"~during-{i}", "action": "update", "objectType": "Case", "objectId": f"~c{i}",
                       "rootId": f"~c{i}", "_createdAt": int(time.time() * 1000), "object": {"_id": f"~c{i}"}}
            started = time.perf_counter()
            try:
                writer.put(events.parse(payload), json.dumps(payload))
            except Exception as exc:  # the web would answer 503, and TheHive does not re-send
                failed.append(f"{type(exc).__name__}: {exc}")
            puts.append((time.perf_counter() - started) * 1000)
            i += 1
        writer.close()

    thread = threading.Thread(target=webhooks)
    thread.start()
    started = time.perf_counter()
    deleted = inbox.purge(KEEP_DONE, pause_s=PURGE_PAUSE_S)
    purge_s = time.perf_counter() - started
    started = time.perf_counter()
    # A daemon pass's release (the daemon skips it above REWRITE_FREE_BYTES; done here regardless,
    # to show that the step keeps the lock short even with gigabytes free).
    released = inbox.release_free_pages(PURGE_PAUSE_S, RELEASE_BUDGET_S)
    release_s = time.perf_counter() - started
    stop.set()
    thread.join()
    free_mb = inbox.free_bytes() / 1e6
    before_mb = cfg.state_db.stat().st_size / 1e6
    started = time.perf_counter()
    inbox.vacuum()  # `purge --vacuum` with the daemon stopped: one rewrite
    vacuum_s = time.perf_counter() - started
    counts = dict(zip(("pending", "done", "dead"), inbox.db.execute(
        "SELECT SUM(state = 'pending'), SUM(state = 'done'), SUM(state = 'dead') FROM inbox").fetchone()))
    stats = inbox.stats()
    inbox.close()
    return {"deleted": deleted["done"], "purge_s": purge_s, "batches": batches, "released_mb": released / 1e6,
            "release_s": release_s, "free_mb": free_mb, "puts": puts, "failed": failed, "vacuum_s": vacuum_s,
            "file_mb": (before_mb, cfg.state_db.stat().st_size / 1e6),
            "counts_ok": all(stats[k] == counts[k] for k in counts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--body-bytes", type=int, default=4200)
    parser.add_argument("--per-day", type=int, default=6000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--flat-ratio", type=float, default=2.5)
    parser.add_argument("--dir", help="where to build the databases (default: a temporary directory)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    report = Report("inbox_scale")
    purges: Dict[int, Dict[str, object]] = {}
    work = Path(tempfile.mkdtemp(prefix="inbox-scale-", dir=args.dir))
    try:
        configs = {}
        for rows in sizes:
            started = time.perf_counter()
            (work / str(rows)).mkdir()
            configs[rows] = build(work / str(rows), rows, args.body_bytes, args.per_day)
            size_mb = configs[rows].state_db.stat().st_size / 1e6
            print(f"{rows:>9,} rows: built in {time.perf_counter() - started:.1f} s, {size_mb:,.0f} MB", flush=True)
        results = measure({rows: calls(cfg) for rows, cfg in configs.items()}, args.repeat)
        for rows, cfg in configs.items():
            purges[rows] = retention(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = sizes[0]
    print(f"\nmedian ms (p95) and ratio of the median to {base:,} rows, same run")
    names = list(results[base])
    print(f"{'':>20}" + "".join(f"{rows:>26,}" for rows in sizes))
    for name in names:
        cells = []
        for rows in sizes:
            values = results[rows][name]
            median = statistics.median(values)
            ratio = median / statistics.median(results[base][name])
            cells.append(f"{median:9.2f} ({percentile(values, 95):7.2f}) x{ratio:5.1f}")
        print(f"{name:>20}" + "".join(f"{c:>26}" for c in cells))
    print(f"\nretention (inbox.keep_done 30 days; batches of {PURGE_BATCH}; a put every 20 ms meanwhile)")
    for rows in sizes:
        p = purges[rows]
        batches, puts = p["batches"], p["puts"]
        print(f"{rows:>9,} rows: deleted {p['deleted']:,} in {p['purge_s']:.1f} s "
              f"({p['deleted'] / max(p['purge_s'], 1e-9):,.0f}/s), batch p50 {statistics.median(batches):.1f} ms "
              f"max {max(batches):.1f} ms; released {p['released_mb']:,.0f} MB in {p['release_s']:.1f} s "
              f"({p['free_mb']:,.0f} MB left free); puts meanwhile p50 {percentile(puts, 50):.1f} "
              f"p99 {percentile(puts, 99):.1f} max {max(puts or [0]):.1f} ms, {len(p['failed'])} failed; "
              f"then purge --vacuum: {p['file_mb'][0]:,.0f} -> {p['file_mb'][1]:,.0f} MB in {p['vacuum_s']:.1f} s")

    print()
    top = sizes[-1]
    for name in names:
        if name.startswith("before"):
            continue
        ratio = statistics.median(results[top][name]) / statistics.median(results[base][name])
        report.check(f"{name} flat from {base:,} to {top:,} rows", ratio <= args.flat_ratio, f"x{ratio:.2f}")
    worst = max(max(p["batches"] or [0]) for p in purges.values())
    report.check("no purge batch holds the write lock over 250 ms", worst <= 250, f"max {worst:.1f} ms")
    slowest = max(max(p["puts"] or [0]) for p in purges.values())
    failures = [f for p in purges.values() for f in p["failed"]]
    report.check("every put during a purge answered within 1 s", slowest < 1000 and not failures,
                 f"max {slowest:.1f} ms" + (f"; {len(failures)} failed: {failures[0]}" if failures else ""))
    report.check("the counts equal a full count after the purge", all(p["counts_ok"] for p in purges.values()))
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
