#!/usr/bin/env python3
"""Sync calls: ThreatQ HTTP calls per event and events/s, end to end through the daemon into the simulator.

    python bench/sync_calls.py [--cases 200]        # the issue's size: --cases 1000

It starts the ThreatQ simulator in this process (loopback), the real daemon (gunicorn, two
workers, a sync thread in each, ``-v 2``) with enrichment disabled so that only the sync's own
calls count, and posts, phase by phase, waiting for the inbox to drain after each:

1. ``--cases`` new cases;
2. nine new observables per case (ip, domain, fqdn, url, mail, mail-subject, filename, hash,
   user-agent: one indicator each);
3. changed updates: half of the cases (severity and status change) and half of the observables
   (the IOC flag set);
4. unchanged updates: the other half of the cases and observables, each re-sent in the state it
   already has, with a new audit ``_id`` and a later ``_createdAt``;
5. bursts: per case, a new observable and two changes of it posted back to back (the worker
   finds the changes queued behind the creation and writes the latest state once).

Every call the simulator answers is in its ``requests`` log; the calls of a phase are those
logged between its first post and the drained inbox, so each figure is the phase's calls divided
by its events, not counting the token grants and name → id look-ups (indicator types and
statuses, event types, object kinds) that each worker process makes once whatever the number of
events (those are printed apart). Then one event of each kind is sent alone and its calls are listed in order (the
"trace"), which shows where the calls go.

Prints, per phase: events/s (from the first post until the inbox drained), the time from the last
post until the inbox drained, calls per event and by endpoint, and the wall time spent inside the
simulator; then PASS/FAIL against the issue's targets: an update that changes nothing costs zero
ThreatQ calls; a new observable costs at most 2 calls on average (plus every event done, none
dead, and ThreatQ holding one event per case and one indicator per observable). The last line is
``sync_calls: N passed, M failed``; the exit code is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ANALYSTS, BASE_TS, DATA_TYPES, Report, Rig, audit, case_object, encode,  # noqa: E402
                    observable_object, post_load, shape, wait_drained)

N_TYPES = len(DATA_TYPES)
ONCE_PER_PROCESS = {"/api/token", "/api/indicator/types", "/api/indicator/statuses", "/api/event/types",
                    "/api/objects"}


class World:
    """The TheHive objects of the run, and the events that create and update them."""

    def __init__(self, cases: int) -> None:
        self.cases = [case_object(i, BASE_TS + i) for i in range(cases)]
        self.observables: List[dict] = []
        for i, case in enumerate(self.cases):
            for t, (data_type, make) in enumerate(DATA_TYPES):
                j = i * N_TYPES + t
                self.observables.append(observable_object(case, j, data_type, make(j), BASE_TS + 10_000_000 + j))
        self.audit = 5_000_000

    def next_id(self) -> str:
        self.audit += 1
        return f"~{self.audit}"

    def new_cases(self) -> List[dict]:
        return [audit(self.next_id(), "create", BASE_TS + i, c, dict(c)) for i, c in enumerate(self.cases)]

    def new_observables(self) -> List[dict]:
        return [audit(self.next_id(), "create", o["_createdAt"] + 10, o, {k: v for k, v in o.items() if k != "case"})
                for o in self.observables]

    def changed_updates(self, ts0: int) -> Tuple[List[dict], List[dict]]:
        cases, observables = [], []
        for i, case in enumerate(self.cases):
            if i % 2 == 0:
                updated = dict(case, severity=4, severityLabel="CRITICAL", status="InProgress", stage="InProgress",
                               _updatedBy=ANALYSTS[(i + 1) % 3], _updatedAt=ts0 + i)
                self.cases[i] = updated
                cases.append(audit(self.next_id(), "update", ts0 + i, updated,
                                   {"severity": 4, "status": "InProgress", "stage": "InProgress"}))
        for j, obs in enumerate(self.observables):
            if j % 2 == 0:
                updated = dict(obs, ioc=True, _updatedBy=ANALYSTS[j % 3], _updatedAt=ts0 + j)
                self.observables[j] = updated
                observables.append(audit(self.next_id(), "update", ts0 + j + 1, updated, {"ioc": True}))
        return cases, observables

    def unchanged_updates(self, ts0: int) -> Tuple[List[dict], List[dict]]:
        """The same state again: a new audit ``_id`` and a later ``_createdAt``, nothing else."""
        cases = [audit(self.next_id(), "update", ts0 + i, c, {"status": c["status"]})
                 for i, c in enumerate(self.cases) if i % 2 == 1]
        observables = [audit(self.next_id(), "update", ts0 + j + 1, o, {"sighted": o["sighted"]})
                       for j, o in enumerate(self.observables) if j % 2 == 1]
        return cases, observables

    def bursts(self, ts0: int) -> List[dict]:
        """Per case, a new observable and two changes of it posted back to back, as TheHive sends
        them when an analyst adds an IOC and edits it at once: the worker finds the updates
        queued behind the creation and writes the latest state once (coalescing)."""
        events = []
        for i, case in enumerate(self.cases):
            j = 1_000_000 + i
            obs = observable_object(case, j, "domain", f"burst-{i}.example.net", ts0 + 3 * i)
            flagged = dict(obs, ioc=True, _updatedAt=ts0 + 3 * i + 1)
            tagged = dict(flagged, tags=obs["tags"] + ["reviewed"], _updatedAt=ts0 + 3 * i + 2)
            events += [audit(self.next_id(), "create", ts0 + 3 * i, obs, {k: v for k, v in obs.items() if k != "case"}),
                       audit(self.next_id(), "update", ts0 + 3 * i + 1, flagged, {"ioc": True}),
                       audit(self.next_id(), "update", ts0 + 3 * i + 2, tagged, {"tags": tagged["tags"]})]
        return events


class Phases:
    """Posts a phase, waits for the drain, and attributes the simulator's calls to it."""

    def __init__(self, rig: Rig, args) -> None:
        self.rig, self.args = rig, args
        self.finished = 0
        self.results: Dict[str, dict] = {}

    def run(self, name: str, events: List[dict], quiet: bool = False) -> dict:
        sim = self.rig.sim
        calls_before, sim_s_before = len(sim.requests), self.rig.timed.total()
        bodies = [encode(e) for e in events]
        load = post_load(self.rig.daemon.port, bodies, processes=1, threads=4, timeout=self.args.timeout)
        posted_at = time.monotonic()
        self.finished += len(events)
        ok, stats = wait_drained(self.rig.state_db, self.finished, self.args.timeout)
        drained_at = time.monotonic()
        calls = sim.requests[calls_before:]
        result = {
            "events": len(events), "answers": dict(load.statuses), "status": dict(load.answers),
            "drained": ok, "stats": stats,
            "elapsed": drained_at - load.started, "drain_after_post": drained_at - posted_at,
            "calls": calls, "sim_s": self.rig.timed.total() - sim_s_before,
        }
        result["rate"] = len(events) / result["elapsed"]
        # Name → id look-ups and token grants happen once per worker process, whatever the number
        # of events: counted apart, so that a per-event figure is what each event costs.
        result["once"] = [c for c in calls if c[1] in ONCE_PER_PROCESS]
        result["per_event"] = (len(calls) - len(result["once"])) / len(events)
        self.results[name] = result
        if not quiet:
            print(f"{name}: {len(events)} events, {result['rate']:.1f} events/s "
                  f"({result['elapsed']:.1f} s from the first post to a drained inbox; "
                  f"drained {result['drain_after_post']:.1f} s after the last post); "
                  f"{len(calls)} ThreatQ calls ({len(result['once'])} of them once-per-process look-ups) "
                  f"= {result['per_event']:.2f} per event; "
                  f"{result['sim_s']:.1f} s inside the simulator; answers {result['status']}"
                  + ("" if ok else f"; NOT DRAINED within {self.args.timeout:g} s: {stats}"), flush=True)
            by_endpoint = collections.Counter(f"{m} {shape(p)}" for m, p in calls)
            for endpoint, n in by_endpoint.most_common():
                print(f"    {n / len(events):7.2f}  {endpoint}")
        return result


def trace(phases: Phases, name: str, event: dict) -> List[str]:
    result = phases.run(name, [event], quiet=True)
    lines = [f"{m} {shape(p)}" for m, p in result["calls"]]
    print(f"trace, {name}: {len(lines)} calls")
    for n, line in enumerate(lines, 1):
        print(f"    {n:2d}. {line}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per phase: post and drain")
    parser.add_argument("--keep-log", metavar="FILE", help="copy the daemon's log here at the end")
    parser.add_argument("--max-calls-new-observable", type=float, default=2.0)
    parser.add_argument("--max-calls-unchanged-update", type=float, default=0.0)
    args = parser.parse_args(argv)
    report = Report("sync_calls")
    world = World(args.cases)
    print(f"sync_calls: {args.cases} cases × {N_TYPES} observables, one update each (half change nothing); "
          f"daemon: {args.workers} gunicorn workers, a sync thread each; ThreatQ simulator in this process; "
          f"enrichment disabled", flush=True)

    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-sync-") as work:
        with Rig(Path(work), threatq="sim", workers=args.workers) as rig:
            setup_calls = len(rig.sim.requests)
            phases = Phases(rig, args)
            new_cases = phases.run("new cases", world.new_cases())
            new_obs = phases.run("new observables", world.new_observables())
            changed_cases, changed_obs = world.changed_updates(BASE_TS + 20_000_000)
            ch_case = phases.run("changed case updates", changed_cases)
            ch_obs = phases.run("changed observable updates", changed_obs)
            same_cases, same_obs = world.unchanged_updates(BASE_TS + 30_000_000)
            un_case = phases.run("unchanged case updates", same_cases)
            un_obs = phases.run("unchanged observable updates", same_obs)
            burst = phases.run("bursts: new observable + 2 updates posted together", world.bursts(BASE_TS + 35_000_000))

            # One event of each kind alone, its calls in order.
            print()
            i = args.cases
            case = case_object(i, BASE_TS + 40_000_000)
            trace(phases, "one new case", audit(world.next_id(), "create", case["_createdAt"] + 20, case, dict(case)))
            obs = observable_object(case, 10_000_000, "ip", "198.51.100.77", BASE_TS + 40_000_100)
            trace(phases, "one new observable (ip) in an existing case",
                  audit(world.next_id(), "create", BASE_TS + 40_000_110, obs, dict(obs)))
            trace(phases, "one unchanged observable update",
                  audit(world.next_id(), "update", BASE_TS + 40_000_120, obs, {"sighted": obs["sighted"]}))
            trace(phases, "one unchanged case update",
                  audit(world.next_id(), "update", BASE_TS + 40_000_130, case, {"status": case["status"]}))
            changed = dict(obs, ioc=True)
            trace(phases, "one changed observable update (IOC flag set)",
                  audit(world.next_id(), "update", BASE_TS + 40_000_140, changed, {"ioc": True}))

            final = phases.results["one changed observable update (IOC flag set)"]["stats"]
            events_in_tq, indicators_in_tq = len(rig.sim.events), len(rig.sim.indicators)
        if args.keep_log:
            shutil.copyfile(rig.daemon.log_file, args.keep_log)

    main_phases = [new_cases, new_obs, ch_case, ch_obs, un_case, un_obs]
    total_events = sum(p["events"] for p in main_phases)
    total_time = sum(p["elapsed"] for p in main_phases)
    changed_events = ch_case["events"] + ch_obs["events"]
    changed_calls = len(ch_case["calls"]) + len(ch_obs["calls"])
    unchanged_events = un_case["events"] + un_obs["events"]
    unchanged_calls = len(un_case["calls"]) + len(un_obs["calls"])
    print()
    print(f"setup (tokens) before the phases: {setup_calls} calls")
    print(f"{'':34}{'events':>8}{'events/s':>10}{'calls/event':>13}{'drain s':>9}")
    for name, p in (("new case", new_cases), ("new observable", new_obs), ("changed case update", ch_case),
                    ("changed observable update", ch_obs), ("unchanged case update", un_case),
                    ("unchanged observable update", un_obs)):
        print(f"{name:34}{p['events']:8d}{p['rate']:10.1f}{p['per_event']:13.2f}{p['drain_after_post']:9.1f}")
    print(f"{'per changed update (both kinds)':34}{changed_events:8d}{'':10}{changed_calls / changed_events:13.2f}")
    print(f"{'per unchanged update (both kinds)':34}{unchanged_events:8d}{'':10}"
          f"{unchanged_calls / unchanged_events:13.2f}")
    print(f"{'all phases':34}{total_events:8d}{total_events / total_time:10.1f}"
          f"{sum(len(p['calls']) for p in main_phases) / total_events:13.2f}{total_time:9.1f}")
    per_burst = (len(burst["calls"]) - len(burst["once"])) / args.cases
    print(f"{'burst (3 events of one new object)':34}{burst['events']:8d}{burst['rate']:10.1f}"
          f"{burst['per_event']:13.2f}{burst['drain_after_post']:9.1f}   = {per_burst:.2f} calls per object")
    print()
    all_answered = all(set(p["answers"]) == {"200"} for p in phases.results.values())
    report.check("every post answered 200", all_answered)
    report.check("every event done, none dead", all(p["drained"] for p in phases.results.values())
                 and final["dead"] == 0 and final["pending"] == 0, f"inbox {final}")
    report.check("ThreatQ holds one event per case and one indicator per observable",
                 events_in_tq == args.cases + 1 and indicators_in_tq == args.cases * (N_TYPES + 1) + 1,
                 f"{events_in_tq} events, {indicators_in_tq} indicators")
    per_unchanged = unchanged_calls / unchanged_events
    report.check(f"an update that changes nothing costs {args.max_calls_unchanged_update:g} ThreatQ calls",
                 per_unchanged <= args.max_calls_unchanged_update,
                 f"{per_unchanged:.2f} calls per unchanged update")
    report.check(f"a new observable costs at most {args.max_calls_new_observable:g} calls on average",
                 new_obs["per_event"] <= args.max_calls_new_observable,
                 f"{new_obs['per_event']:.2f} calls per new observable")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
