#!/usr/bin/env python3
"""Shared state: one daemon on SQLite, one on PostgreSQL, two on one PostgreSQL, and a SIGKILL.

    python bench/shared_state.py [--cases 100] [--latency-ms 20] [--lease 5] [--workers 2] [--pg-fsync-off]

docs/deployment.md ("More than one daemon"): two or more daemons with the same
``state_db: postgresql://…`` share one inbox. This measures, in one run, what that costs and buys.

**Throughput** (events per second end to end: from the first webhook posted until every inbox
row is ``done``, polled in the state database every 50 ms), three scenarios one after the other,
each with a fresh ThreatQ simulator and a fresh state database:

* ``sqlite``: ONE daemon on its SQLite file (the default deployment; the baseline);
* ``pg-1``: ONE daemon on PostgreSQL (``create_database``: a database of its own);
* ``pg-2``: TWO daemons (two configuration directories, two ports: two hosts as far as they know)
  on the same PostgreSQL database, the webhooks split between them.

Every scenario gets the same events: ``--cases`` cases of 20 TheHive 5 events each (the case, nine
observables of nine data types, an update of the case and of each observable; ``common.case_block``),
posted by two client processes at once, each one case after the other in TheHive's order on one
keep-alive connection (TheHive's sender posts one at a time), the cases dealt alternately to the
two clients. With one daemon both clients post to it; with two, each client posts to its own
daemon, so the split is by case and concurrent. Enrichment is off; TheHive's API is never called.

**Recovery**: two daemons on a fresh PostgreSQL database with ``sync.lease: --lease`` seconds; the
same burst posted to both; as soon as the posting is over and daemon A holds a lease on an event
(its ``lease_owner`` names one of A's worker pids), A's whole process group (master and workers)
gets SIGKILL. Printed: the seconds from the kill until every event is ``done`` (polled), next to
the lease; when the leases A held ran out (their ``lease_until``); when the last of A's held events
was done (its ``finished_at``); how many events were still pending at the kill.

The ThreatQ simulator runs in this process on 127.0.0.1 and answers every call after
``--latency-ms`` (20 ms: a ThreatQ on the LAN; concurrent calls wait in parallel). PostgreSQL is
a throwaway server (``tq_mw_thehive.testing.postgres.PostgresServer``: 127.0.0.1 only, trust
authentication), run here with ``fsync`` and ``full_page_writes`` **on** (the test helper turns
them off; ``--pg-fsync-off`` keeps its settings) so that PostgreSQL pays for durable commits as the
SQLite baseline does. As root it runs as the ``postgres`` system user.

Checks (PASS/FAIL): every post answered ``200 queued``; every event ``done``, none dead; ThreatQ
holds exactly one event per case and one indicator per observable value (none duplicated by two
daemons or by the redo after the kill); with two daemons, both synced events; after the kill, the
events A held were redone and nothing dead. The last line is ``shared_state: N passed, M failed``;
the exit code is 1 when a check failed. Ratios: each scenario against ``sqlite`` and ``pg-2``
against ``pg-1``, all measured in this run. CPU seconds per party (daemons, PostgreSQL, this
process: simulator and poller, the posting clients) say where the two cores went.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DATA_TYPES, EMAIL, PASSWORD, LoadResult, Report, _client_process, case_block,  # noqa: E402
                    cpu_seconds, encode, percentile, process_tree, wait_drained, write_config, BASE_TS)

from tq_mw_thehive import state_postgres  # noqa: E402
from tq_mw_thehive.state_postgres import PostgresURL  # noqa: E402
from tq_mw_thehive.testing.daemon import Daemon, DaemonTimeout, wait_for  # noqa: E402
from tq_mw_thehive.testing.loopback import LoopbackServer  # noqa: E402
from tq_mw_thehive.testing.postgres import PostgresServer  # noqa: E402
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator  # noqa: E402
from tq_mw_thehive.threatq import auth as tq_auth  # noqa: E402

EVENTS_PER_CASE = 20
WORKER_READY = re.compile(r"worker ready pid=(\d+)")
SYNC_LINE = re.compile(r"sync audit=\S+ .*?outcome=(\w+)")


class DurablePostgres(PostgresServer):
    """The test helper's server with ``fsync`` and ``full_page_writes`` on (a real server's settings)."""

    def _server_options(self) -> str:
        options = super()._server_options()
        return options.replace("-c fsync=off", "-c fsync=on").replace("-c full_page_writes=off",
                                                                       "-c full_page_writes=on")


@dataclass(frozen=True)
class Scenario:
    name: str
    backend: str   # "sqlite" or "postgresql"
    daemons: int
    what: str


SCENARIOS = (
    Scenario("sqlite", "sqlite", 1, "one daemon, SQLite (the baseline)"),
    Scenario("pg-1", "postgresql", 1, "one daemon, PostgreSQL"),
    Scenario("pg-2", "postgresql", 2, "two daemons, one PostgreSQL database, webhooks split between them"),
)


# --------------------------------------------------------------------------- events

def burst(cases: int, run: int) -> Tuple[List[List[Tuple[int, bytes]]], List[dict], List[str]]:
    """``cases`` case blocks dealt alternately to two posting shares (each in TheHive's order);
    the case objects and the observable values (for the ThreatQ checks). ``run`` keeps the ids of
    two scenarios apart (one simulator each anyway)."""
    shares: List[List[Tuple[int, bytes]]] = [[], []]
    case_objects, values = [], []
    k = 0
    for i in range(cases):
        case_no = run * 100_000 + i
        block = case_block(case_no, 3_000_000 + case_no * EVENTS_PER_CASE, BASE_TS + case_no * 1000)
        case_objects.append(block[0]["object"])
        values.extend(e["object"]["data"] for e in block[1:1 + len(DATA_TYPES)])
        for event in block:
            shares[i % 2].append((k, encode(event)))
            k += 1
    return shares, case_objects, values


# --------------------------------------------------------------------------- daemons

def make_daemon(config_dir: Path, sim: ThreatQSimulator, state_db: Optional[str], workers: int,
                sync: Dict[str, object]) -> Daemon:
    """A configuration directory of its own (another host, as far as the daemon knows), tokens from
    the simulator as ``configure`` gets them, and the daemon (not started)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    path = write_config(config_dir, sim.url, **sync)
    if state_db is not None:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw["state_db"] = state_db
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        path.chmod(0o600)
    tq_auth.save_tokens(config_dir, tq_auth.password_grant(sim.url, sim.client_id, EMAIL, PASSWORD))
    return Daemon(config_dir, config_dir / "logs", verbosity="2", workers=workers,
                  env={**os.environ, "PYTHONUNBUFFERED": "1"})


def worker_pids(daemon: Daemon) -> List[int]:
    return [int(p) for p in WORKER_READY.findall(daemon.log_text())]


def synced_lines(daemon: Daemon) -> collections.Counter:
    return collections.Counter(SYNC_LINE.findall(daemon.log_text()))


def postmaster_pid(server: PostgresServer) -> Optional[int]:
    try:
        return int((server.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds of the daemons, PostgreSQL, this process and the posting clients over a window."""

    def __init__(self, daemons: Sequence[Daemon], server: Optional[PostgresServer], clients: Sequence[int]) -> None:
        self.daemons, self.server, self.clients = list(daemons), server, list(clients)
        self.start = self._sample()

    def _trees(self) -> Dict[str, List[int]]:
        trees = {"daemons": [p for d in self.daemons if d.proc is not None for p in process_tree(d.proc.pid)],
                 "clients": self.clients}
        pid = postmaster_pid(self.server) if self.server is not None else None
        trees["postgresql"] = process_tree(pid, depth=2) if pid else []
        return trees

    def _sample(self) -> Dict[str, Dict[int, float]]:
        out = {name: {pid: cpu_seconds([pid]) for pid in pids} for name, pids in self._trees().items()}
        times = os.times()
        out["bench"] = {os.getpid(): times.user + times.system}  # the simulator, the poller
        return out

    def stop(self) -> Dict[str, float]:
        """Per party: CPU used since the start (processes started since count from zero)."""
        end = self._sample()
        return {name: sum(max(0.0, cpu - self.start.get(name, {}).get(pid, 0.0)) for pid, cpu in pids.items())
                for name, pids in end.items()}


def cpu_text(cpu: Dict[str, float], seconds: float) -> str:
    total = sum(cpu.values())
    parts = ", ".join(f"{name} {cpu.get(name, 0.0):.1f}" for name in ("daemons", "postgresql", "bench", "clients"))
    return f"CPU s: {parts}; all {total:.1f} = {total / max(seconds, 1e-9):.2f} of {os.cpu_count()} cores"


# --------------------------------------------------------------------------- one throughput run

@dataclass
class Result:
    scenario: Scenario
    events: int
    seconds: float = float("nan")
    post_s: float = float("nan")
    drained: bool = False
    stats: Dict[str, object] = field(default_factory=dict)
    posts: LoadResult = field(default_factory=LoadResult)
    tq_events: int = 0
    case_events_once: int = 0
    values_once: int = 0
    indicators: int = 0
    synced_by: List[int] = field(default_factory=list)
    cpu: Dict[str, float] = field(default_factory=dict)
    connections: Optional[int] = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds == self.seconds and self.seconds > 0 else float("nan")


def check_threatq(sim: ThreatQSimulator, cases: List[dict], values: List[str]) -> Tuple[int, int, int, int]:
    """(events in ThreatQ, cases with exactly one event, values with exactly one indicator, indicators)."""
    titles = collections.Counter(e["title"] for e in sim.events.values())
    once = sum(1 for c in cases if sum(n for t, n in titles.items() if t.startswith(f"Hive Case # {c['_id']} ")) == 1)
    values_once = sum(1 for v in values if len(sim.find_indicators(v)) == 1)
    return len(sim.events), once, values_once, len(sim.indicators)


def pg_connections(server: PostgresServer, database: str) -> Optional[int]:
    import psycopg
    try:
        with psycopg.connect(server.url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                "AND application_name = 'tq-mw-thehive'", (database,)).fetchone()[0]
    except psycopg.Error:
        return None


def post(pool, ports: Sequence[int], shares, timeout: float):
    """Each share posted by one client process, in order, to its port; the jobs (not waited for)."""
    deadline = time.monotonic() + timeout
    return [pool.apply_async(_client_process, (port, "/cases", share, 1, None, 0.0, deadline))
            for port, share in zip(ports, shares)]


def collect(jobs, timeout: float) -> LoadResult:
    total = LoadResult()
    for job in jobs:
        total.merge(job.get(timeout=timeout))
    return total


def run_throughput(scenario: Scenario, run: int, args, work: Path, server: Optional[PostgresServer],
                   pool, client_pids: List[int]) -> Result:
    shares, cases, values = burst(args.cases, run)
    n = sum(len(s) for s in shares)
    result = Result(scenario=scenario, events=n)
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, latency_ms=args.latency_ms)
    db_name = f"tq_{scenario.name.replace('-', '_')}"
    with LoopbackServer(sim.app) as tq:
        sim.url = tq.url
        state_db = server.create_database(db_name) if scenario.backend == "postgresql" else None
        daemons = [make_daemon(work / scenario.name / f"host-{chr(97 + d)}", sim, state_db, args.workers, {})
                   for d in range(scenario.daemons)]
        try:
            for daemon in daemons:
                daemon.start(timeout=90)
            poll_db = state_db or str(daemons[0].config_dir / "tq_mw_thehive.db")
            ports = [daemons[i % len(daemons)].port for i in range(len(shares))]
            meter = CpuMeter(daemons, server if state_db else None, client_pids)
            first_post = time.monotonic()
            jobs = post(pool, ports, shares, args.timeout)
            result.drained, result.stats = wait_drained(poll_db, n, args.timeout, interval=0.05)
            result.seconds = time.monotonic() - first_post
            result.cpu = meter.stop()
            result.posts = collect(jobs, 60)
            result.post_s = result.posts.ended - first_post
            result.tq_events, result.case_events_once, result.values_once, result.indicators = \
                check_threatq(sim, cases, values)
            state_postgres.close_all()  # this process's poller: count the daemons' connections only
            time.sleep(0.3)  # the last `sync audit=…` line is written just after its inbox row
            if state_db:
                result.connections = pg_connections(server, db_name)
            result.synced_by = [sum(synced_lines(d).values()) for d in daemons]
        finally:
            for daemon in daemons:
                daemon.stop(timeout=30)
                daemon.close()
            state_postgres.close_all()
    return result


def throughput_line(r: Result, base: Optional[Result], pg1: Optional[Result]) -> str:
    lat = r.posts.service_s
    line = (f"shared_state[{r.scenario.name}] {r.scenario.what}: {r.events} events in {r.seconds:.2f} s = "
            f"{r.rate:.1f} events/s end to end (posting took {r.post_s:.2f} s, POST p50 "
            f"{percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms; drained "
            f"{r.seconds - r.post_s:.2f} s after the last post)")
    if base is not None and r is not base:
        line += f"; {r.rate / base.rate:.2f}× sqlite"
    if pg1 is not None and r.scenario.name == "pg-2":
        line += f"; {r.rate / pg1.rate:.2f}× pg-1"
    return line


# --------------------------------------------------------------------------- recovery

@dataclass
class Recovery:
    events: int
    lease_s: float
    drained: bool = False
    stats: Dict[str, object] = field(default_factory=dict)
    posts: LoadResult = field(default_factory=LoadResult)
    held: int = 0
    pending_at_kill: int = 0
    done_after_kill_s: float = float("nan")
    held_done_after_kill_s: float = float("nan")
    leases_out_after_kill_s: Tuple[float, float] = (float("nan"), float("nan"))
    held_done: int = 0
    tq_events: int = 0
    case_events_once: int = 0
    values_once: int = 0
    indicators: int = 0
    error: str = ""


def inbox_rows(url: str) -> List[dict]:
    db = state_postgres.database(PostgresURL(url), 5)
    return [dict(zip(r.keys(), r)) for r in db.execute(
        "SELECT id, state, lease_owner, lease_until, finished_at FROM inbox ORDER BY id")]


def run_recovery(args, work: Path, server: PostgresServer, pool) -> Recovery:
    shares, cases, values = burst(args.cases, 9)
    n = sum(len(s) for s in shares)
    rec = Recovery(events=n, lease_s=args.lease)
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, latency_ms=args.latency_ms)
    with LoopbackServer(sim.app) as tq:
        sim.url = tq.url
        url = server.create_database("tq_recovery")
        sync = {"lease": f"{args.lease:g}s"}
        a, b = (make_daemon(work / "recovery" / f"host-{h}", sim, url, args.workers, sync) for h in "ab")
        try:
            a.start(timeout=90)
            b.start(timeout=90)
            a_pids = set(worker_pids(a))
            jobs = post(pool, [a.port, b.port], shares, args.timeout)
            rec.posts = collect(jobs, args.timeout + 60)

            def a_holds_a_lease():
                now = time.time()
                return any(r["state"] == "pending" and r["lease_owner"] and r["lease_until"] > now
                           and int(r["lease_owner"].rpartition(":")[2]) in a_pids for r in inbox_rows(url))

            try:
                wait_for(a_holds_a_lease, 60, "daemon A to hold a lease", 0.02)
            except DaemonTimeout as exc:
                rec.error = f"{exc} (nothing of A's in flight to kill: raise --cases)"
                return rec
            kill_wall, kill_t = time.time(), time.monotonic()
            a.kill(signal.SIGKILL)  # the process group: master and workers
            rows = inbox_rows(url)
            held = [r for r in rows if r["state"] == "pending" and r["lease_owner"]
                    and int(r["lease_owner"].rpartition(":")[2]) in a_pids]
            rec.held = len(held)
            rec.pending_at_kill = sum(1 for r in rows if r["state"] == "pending")
            if held:
                rec.leases_out_after_kill_s = (min(r["lease_until"] for r in held) - kill_wall,
                                               max(r["lease_until"] for r in held) - kill_wall)
            rec.drained, rec.stats = wait_drained(url, n, args.timeout, interval=0.05)
            rec.done_after_kill_s = time.monotonic() - kill_t
            by_id = {r["id"]: r for r in inbox_rows(url)}
            finished = [by_id[r["id"]] for r in held if by_id[r["id"]]["state"] == "done"]
            rec.held_done = len(finished)
            if finished:
                rec.held_done_after_kill_s = max(r["finished_at"] for r in finished) - kill_wall
            rec.tq_events, rec.case_events_once, rec.values_once, rec.indicators = check_threatq(sim, cases, values)
        finally:
            for daemon in (a, b):
                daemon.stop(timeout=30)
                daemon.close()
            state_postgres.close_all()
    return rec


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100,
                        help=f"cases per scenario, {EVENTS_PER_CASE} events each (default 100: 2,000 events)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="ThreatQ simulator's answer time per call (default 20: a ThreatQ on the LAN)")
    parser.add_argument("--lease", type=float, default=5.0, help="sync.lease in the recovery scenario, s (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per daemon (the default: 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline for each wait, s (default 300)")
    parser.add_argument("--pg-fsync-off", action="store_true",
                        help="run PostgreSQL with the test helper's fsync=off, full_page_writes=off")
    parser.add_argument("--skip-recovery", action="store_true", help="the throughput scenarios only")
    args = parser.parse_args(argv)
    if args.cases < 2:
        parser.error("--cases must be at least 2 (the cases are split between two daemons)")
    if args.lease <= 0:
        parser.error("--lease must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report("shared_state")
    n = args.cases * EVENTS_PER_CASE
    print(f"shared_state: {args.cases} cases × {EVENTS_PER_CASE} TheHive 5 events = {n} events per scenario, "
          f"posted by 2 client processes (one keep-alive connection each, a case's events in order); "
          f"ThreatQ simulator in this process at {args.latency_ms:g} ms a call; each daemon {args.workers} "
          f"gunicorn workers, a sync thread each, enrichment off; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-shared-") as tmp:
        work = Path(tmp)
        server_cls = PostgresServer if args.pg_fsync_off else DurablePostgres
        server = server_cls(work / "pg")
        started = time.monotonic()
        server.start()
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(2)
        try:
            import psycopg
            with psycopg.connect(server.url, autocommit=True, connect_timeout=5) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
                fsync = conn.execute("SHOW fsync").fetchone()[0]
                fpw = conn.execute("SHOW full_page_writes").fetchone()[0]
            print(f"shared_state: PostgreSQL {version} on 127.0.0.1:{server.port} (fsync={fsync}, "
                  f"full_page_writes={fpw}), started in {time.monotonic() - started:.1f} s", flush=True)
            # The clients import this module's helpers once, before any clock starts.
            client_pids = sorted(set(pool.map(_noop_pid, range(8))))

            results: List[Result] = []
            for run, scenario in enumerate(SCENARIOS):
                result = run_throughput(scenario, run, args, work, server, pool, client_pids)
                results.append(result)
                base = results[0]
                pg1 = next((r for r in results if r.scenario.name == "pg-1"), None)
                print(throughput_line(result, base, pg1), flush=True)
                extra = f"    synced lines per daemon {result.synced_by}; {cpu_text(result.cpu, result.seconds)}"
                if result.connections is not None:
                    extra += f"; connections to the database at the end: {result.connections}"
                print(extra, flush=True)

            recovery = None
            if not args.skip_recovery:
                recovery = run_recovery(args, work, server, pool)
                if recovery.error:
                    print(f"shared_state[recovery]: {recovery.error}", flush=True)
                else:
                    lo, hi = recovery.leases_out_after_kill_s
                    print(f"shared_state[recovery] two daemons on PostgreSQL, sync.lease {args.lease:g} s, "
                          f"{n} events posted to both, daemon A SIGKILLed (process group) holding {recovery.held} "
                          f"leases with {recovery.pending_at_kill} events pending: every event done "
                          f"{recovery.done_after_kill_s:.2f} s after the kill (lease {args.lease:g} s); "
                          f"A's leases ran out {lo:.2f}–{hi:.2f} s after the kill; the last of A's held "
                          f"events done {recovery.held_done_after_kill_s:.2f} s after the kill", flush=True)
        finally:
            pool.terminate()
            pool.join()
            state_postgres.close_all()
            server.stop("immediate")

    print()
    for r in results:
        tag = f"[{r.scenario.name}] "
        report.check(tag + "every post answered 200 queued",
                     r.posts.statuses == collections.Counter({"200": n}) and r.posts.answers.get("queued") == n,
                     f"{dict(r.posts.statuses)} {dict(r.posts.answers)}")
        report.check(tag + "every event done, none dead",
                     r.drained and r.stats.get("done") == n and r.stats.get("dead") == 0, f"inbox {r.stats}")
        report.check(tag + "ThreatQ: one event per case, one indicator per observable value",
                     r.case_events_once == args.cases and r.tq_events == args.cases
                     and r.values_once == args.cases * len(DATA_TYPES) and r.indicators == args.cases * len(DATA_TYPES),
                     f"{r.tq_events} events ({r.case_events_once}/{args.cases} cases once), {r.indicators} "
                     f"indicators ({r.values_once}/{args.cases * len(DATA_TYPES)} values once)")
        if r.scenario.daemons > 1:
            report.check(tag + "both daemons synced events", all(r.synced_by), f"sync lines {r.synced_by}")
    if recovery is not None:
        tag = "[recovery] "
        report.check(tag + "daemon A held leases when it was killed", recovery.held > 0,
                     recovery.error or f"{recovery.held} held")
        if not recovery.error:
            report.check(tag + "every event done, none dead, A's held events included",
                         recovery.drained and recovery.stats.get("done") == n and recovery.stats.get("dead") == 0
                         and recovery.held_done == recovery.held,
                         f"inbox {recovery.stats}; {recovery.held_done}/{recovery.held} held done")
            report.check(tag + "ThreatQ: one event per case, one indicator per value (the redo made no duplicate)",
                         recovery.case_events_once == args.cases and recovery.tq_events == args.cases
                         and recovery.values_once == args.cases * len(DATA_TYPES)
                         and recovery.indicators == args.cases * len(DATA_TYPES),
                         f"{recovery.tq_events} events, {recovery.indicators} indicators, "
                         f"{recovery.values_once} values once")
            report.check(tag + "posts answered 200 queued (before the kill)",
                         recovery.posts.statuses == collections.Counter({"200": n}),
                         f"{dict(recovery.posts.statuses)}")
    return report.finish()


def _noop_pid(_: int) -> int:
    time.sleep(0.05)  # long enough for every pool process to take one
    return os.getpid()


if __name__ == "__main__":
    sys.exit(main())
