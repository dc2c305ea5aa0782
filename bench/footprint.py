#!/usr/bin/env python3
"""Footprint: the daemon's memory against a bare Flask app, and a cold ad-hoc lookup (issue 18).

    python bench/footprint.py [--cases 5] [--workers 2] [--value 9.9.9.9]

In one run:

1. The real daemon as users run it: default configuration with the four bundled offline plugins
   on (ip_scope, geoip, domain, warninglists; the external ones disabled), ``--workers`` gunicorn
   workers, the ThreatQ simulator on loopback; ``--cases`` cases of nine observables (ip, domain,
   fqdn, url, mail, hash...) are posted and synced, so every worker that enriches has loaded what
   its plugins need. Then the proportional set size (PSS, ``Pss:`` of ``/proc/<pid>/smaps_rollup``)
   of the master and each worker, and their sum.
2. The baseline: a bare Flask app (answers 200 to POST /cases, nothing else) under the same
   gunicorn settings (gthread, ``--workers`` workers, 4 threads), after a few requests; its PSS.
3. The ratio daemon / bare app.
4. A cold ``tq-mw-thehive enrich VALUE`` (a value no event carried, so not cached) in the daemon's
   configuration directory: wall time and peak RSS (the child's own ``VmHWM``);
   then the same in a fresh configuration directory (no state database, no offline index yet:
   the one-off build is counted) for a second uncached value.
5. Each offline plugin alone in a fresh process (the CLI's imports first): the time of its load and
   first lookup, the memory it adds and the peak.

Targets (issue 18): daemon PSS at most 2.0 x the bare app's; a cold enrich at most 1.5 s and
150 MB peak. The last line is ``footprint: N passed, M failed``; exit code 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BareGunicorn, Report, Rig, encode, mixed_stream, offline_enrichment,  # noqa: E402
                    process_tree, wait_drained, write_config, UNREACHABLE, OFFLINE_PLUGINS)


def pss_kb(pid: int) -> Optional[int]:
    """``Pss:`` of ``/proc/<pid>/smaps_rollup`` in kB, None once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def tree_pss(master: int) -> Tuple[int, List[Tuple[int, int]]]:
    """Sum of the PSS of ``master`` and its descendants, and (pid, kB) per process."""
    rows = [(pid, pss_kb(pid)) for pid in process_tree(master)]
    rows = [(pid, kb) for pid, kb in rows if kb is not None]
    return sum(kb for _, kb in rows), rows


# The CLI as `python -m tq_mw_thehive` runs it, then its own peak: VmHWM of /proc/self/status. (The
# child's ru_maxrss is no use: Linux carries the parent's peak into it through fork and exec.)
CHILD = """\
import runpy, sys
sys.argv[0] = "tq_mw_thehive"
try:
    runpy.run_module("tq_mw_thehive", run_name="__main__", alter_sys=True)
finally:
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    sys.stderr.write("\\nPEAK_KB " + peak + "\\n")
"""


def timed_run(command: List[str], cwd: Path, env: Dict[str, str]) -> Tuple[float, int, int, str]:
    """Run ``command``; (wall seconds, peak RSS kB of the child, exit code, stdout)."""
    started = time.monotonic()
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=str(cwd),
                          env=env, timeout=300)
    elapsed = time.monotonic() - started
    peak = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KB ")]
    return (elapsed, int(peak[-1]) if peak else 0, done.returncode,
            done.stdout if done.returncode == 0 else done.stdout + done.stderr[-2000:])


def enrich_command(config_dir: Path, value: str) -> List[str]:
    return [sys.executable, "-c", CHILD, "enrich", value, "-c", str(config_dir), "--json"]


def child_env() -> Dict[str, str]:
    """The caller's environment with this ``tq_mw_thehive`` first on the path (as ``Daemon`` does)."""
    import tq_mw_thehive
    env = dict(os.environ)
    here = str(Path(tq_mw_thehive.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


PER_PLUGIN = """\
import json, sys, time
def rss():
    return [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
from tq_mw_thehive.enrichment import runner             # what the CLI has imported before a lookup
from tq_mw_thehive.enrichment.plugin import Lookup
try:
    from tq_mw_thehive.enrichment import offline_index
    offline_index.set_directory(sys.argv[2])
except ImportError:                                     # code from before the offline indexes
    pass
plugin = __import__("tq_mw_thehive.plugins." + sys.argv[1], fromlist=["lookup"])
base, started = rss(), time.perf_counter()
request = Lookup(data_type=sys.argv[3], value=sys.argv[4])
if hasattr(plugin, "prepare"):
    plugin.prepare(request)
plugin.lookup(request)
elapsed = time.perf_counter() - started
peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"s": elapsed, "added_mb": rss() - base, "peak_mb": peak, "base_mb": base}))
"""
PLUGIN_VALUES = (("ip_scope", "ip", "9.9.9.9"), ("geoip", "ip", "9.9.9.9"), ("warninglists", "ip", "9.9.9.9"),
                 ("domain", "domain", "www.example.co.uk"))


def per_plugin(index_dir: Path, env: Dict[str, str]) -> None:
    """Each offline plugin alone in a fresh process: its load and first lookup, memory added and peak."""
    for name, data_type, value in PLUGIN_VALUES:
        done = subprocess.run([sys.executable, "-c", PER_PLUGIN, name, str(index_dir), data_type, value],
                              capture_output=True, text=True, env=env, timeout=300, cwd=str(index_dir.parent))
        try:
            got = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"  plugin {name}: failed: {done.stderr.strip()[-300:]}", flush=True)
            continue
        print(f"  plugin {name:12} load + first lookup {got['s']:.3f} s, +{got['added_mb']:.1f} MB "
              f"(peak {got['peak_mb']:.1f} MB over a base of {got['base_mb']:.1f} MB)", flush=True)


def plugins_answered(output: str) -> Dict[str, str]:
    try:
        return {r["plugin"]: r["status"] for r in json.loads(output)["results"]}
    except (ValueError, KeyError, TypeError):
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5, help="cases of nine observables synced first (5)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers, both apps (2)")
    parser.add_argument("--value", default="9.9.9.9", help="the value of the cold enrich (9.9.9.9)")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--max-enrich-s", type=float, default=1.5)
    parser.add_argument("--max-enrich-mb", type=float, default=150.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    report = Report("footprint")
    tmp = Path(tempfile.mkdtemp(prefix="tq-footprint-"))
    env = child_env()
    print(f"footprint: {args.workers} workers, {args.cases} cases synced first; work dir {tmp}", flush=True)

    # 1. the daemon
    events = list(mixed_stream(args.cases * 20))
    rig = Rig(tmp / "daemon", enrichment=offline_enrichment(), workers=args.workers, verbosity="2")
    with rig:
        started = time.monotonic()
        with requests.Session() as session:
            for event in events:
                answer = session.post(rig.daemon.url + "/cases", data=encode(event),
                                      headers={"Authorization": "Bearer bench-webhook-token-0123456789abcdef",
                                               "Content-Type": "application/json"}, timeout=30)
                answer.raise_for_status()
        drained, stats = wait_drained(rig.state_db, len(events), timeout=300)
        print(f"  {len(events)} events synced in {time.monotonic() - started:.1f} s: {stats}", flush=True)
        report.check("every event synced", drained and stats.get("dead") == 0, str(stats))
        time.sleep(1.0)  # let the last enrichment's transient allocations settle before sampling
        daemon_kb, daemon_rows = tree_pss(rig.daemon.proc.pid)
        # A python -m launcher (none here) would be counted too; the master is the Daemon's process.
        for pid, kb in daemon_rows:
            role = "master" if pid == rig.daemon.proc.pid else "worker"
            print(f"  daemon {role:6} pid {pid}: PSS {kb / 1024:.1f} MB", flush=True)
        print(f"  daemon tree: PSS {daemon_kb / 1024:.1f} MB", flush=True)

        # 4a. a cold enrich beside the running daemon (its index, if any, already built)
        elapsed, peak_kb, code, output = timed_run(enrich_command(rig.workdir, args.value), tmp, env)
        answered = plugins_answered(output)
        print(f"  enrich {args.value} (cold, daemon's config dir): {elapsed:.2f} s, peak RSS {peak_kb / 1024:.1f} MB, "
              f"exit {code}, plugins {answered}", flush=True)
        offline = {p: s for p, s in answered.items() if p in OFFLINE_PLUGINS}
        report.check("cold enrich answered", code == 0 and offline and
                     all(s in ("fetched", "not_found") for s in offline.values()), str(offline) or output[-400:])

    # 2. the bare app
    bare = BareGunicorn(tmp / "bare", workers=args.workers)
    bare.start()
    try:
        with requests.Session() as session:
            for event in events[:20]:
                session.post(f"http://127.0.0.1:{bare.port}/cases", data=encode(event), timeout=30).raise_for_status()
        bare_kb, bare_rows = tree_pss(bare.proc.pid)
        for pid, kb in bare_rows:
            print(f"  bare   {'master' if pid == bare.proc.pid else 'worker':6} pid {pid}: PSS {kb / 1024:.1f} MB",
                  flush=True)
        print(f"  bare tree: PSS {bare_kb / 1024:.1f} MB", flush=True)
    finally:
        bare.stop()

    # 4b. the very first lookup on a new install: no state database, no index yet
    fresh = tmp / "fresh"
    fresh.mkdir()
    write_config(fresh, UNREACHABLE, enrichment=offline_enrichment())
    first_value = "149.112.112.112"
    f_elapsed, f_peak_kb, f_code, f_output = timed_run(enrich_command(fresh, first_value), tmp, env)
    print(f"  enrich {first_value} (first ever, fresh config dir): {f_elapsed:.2f} s, "
          f"peak RSS {f_peak_kb / 1024:.1f} MB, exit {f_code}", flush=True)
    s_elapsed, s_peak_kb, s_code, _ = timed_run(enrich_command(fresh, "9.9.9.10"), tmp, env)
    print(f"  enrich 9.9.9.10 (cold, same fresh dir afterwards): {s_elapsed:.2f} s, "
          f"peak RSS {s_peak_kb / 1024:.1f} MB, exit {s_code}", flush=True)

    per_plugin(fresh / "offline_index", env)

    ratio = daemon_kb / bare_kb if bare_kb else float("inf")
    print(f"  ratio daemon / bare app: {ratio:.2f} ({daemon_kb / 1024:.1f} / {bare_kb / 1024:.1f} MB PSS)",
          flush=True)
    report.check(f"daemon PSS <= {args.max_ratio:g} x the bare app's", ratio <= args.max_ratio, f"{ratio:.2f}")
    report.check(f"cold enrich <= {args.max_enrich_s:g} s", elapsed <= args.max_enrich_s, f"{elapsed:.2f} s")
    report.check(f"cold enrich peak <= {args.max_enrich_mb:g} MB", peak_kb / 1024 <= args.max_enrich_mb,
                 f"{peak_kb / 1024:.1f} MB")
    if not args.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
