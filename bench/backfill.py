"""Backfill at scale: cases per second read from the TheHive simulator, and memory that stays flat.

    python bench/backfill.py [--cases 10000] [--observables-per-case 10] [--page-size 100]

It fills the TheHive simulator (served from this process on a loopback port), writes a
config in a temporary directory, and runs the real command, ``tq-mw-thehive backfill
--all``, in a child process whose resident memory it samples every 0.2 s. The baseline, in
the same run: the same reads (every page of cases, every case's observables) made with
``TheHiveClient`` in a child process that stores nothing, i.e. what reading TheHive alone
costs. It prints cases and observables per second for both and their ratio, the RSS after
warm-up (the first 5 % of the run) and the growth after it, and exits non-zero when the
growth exceeds ``--max-growth-mb`` (50 MB, the issue's bound) or when not every object was
queued.
"""
from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator

KEY = "bench-thehive-key"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


BASELINE = """
import sys, time
from tq_mw_thehive.thehive.api import TheHiveClient
client = TheHiveClient(sys.argv[1], sys.argv[2])
started, objects = time.monotonic(), 0
for case in client.iter_cases(None):
    objects += 1 + sum(1 for _ in client.iter_case_observables(case["_id"]))
print(objects, time.monotonic() - started)
"""


def baseline(url: str) -> tuple:
    """The reads alone, in a child process like the real command: (objects read, seconds)."""
    out = subprocess.run([sys.executable, "-c", BASELINE, url, KEY], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), float(out[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--observables-per-case", type=int, default=10)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    hive = TheHiveSimulator(api_key=KEY)
    filled = time.monotonic()
    for i in range(args.cases):
        case = hive.add_case(title=f"Bench case {i}", tags=["bench"])
        for j in range(args.observables_per_case):
            hive.add_observable(case["_id"], dataType="ip", data=f"10.{i // 256 % 256}.{i % 256}.{j}")
    expected = args.cases * (1 + args.observables_per_case)
    print(f"filled the TheHive simulator: {args.cases} cases, {expected - args.cases} observables "
          f"in {time.monotonic() - filled:.1f} s")

    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-") as work, LoopbackServer(hive.app) as server:
        config = {"threatq": {"host": "http://127.0.0.1:9", "client_id": "bench"},
                  "thehive": {"url": server.url, "api_key": KEY},
                  "webhook": {"auth": "bearer", "token": "bench-token-0123456789"}}
        (Path(work) / "config.yaml").write_text(yaml.safe_dump(config))
        read, read_s = baseline(server.url)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "tq_mw_thehive", "backfill", "-c", work, "--all"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        samples = []
        while proc.poll() is None:
            if time.monotonic() - started > args.timeout:
                proc.kill()
                print("timed out")
                return 1
            samples.append((time.monotonic() - started, rss_mb(proc.pid)))
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        output = proc.stdout.read()
        db = sqlite3.connect(str(Path(work) / "tq_mw_thehive.db"))
        queued = db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        db.close()

    samples = [s for s in samples if s[1] > 0]
    warm_at = elapsed * 0.05
    warm = next((mb for t, mb in samples if t >= warm_at), samples[0][1] if samples else 0.0)
    peak = max((mb for _, mb in samples), default=0.0)
    growth = peak - warm
    print(output.strip())
    print(f"baseline (reads only): {read_s:.1f} s, {args.cases / read_s:.0f} cases/s, {read / read_s:.0f} objects/s")
    print(f"backfill: {elapsed:.1f} s, {args.cases / elapsed:.0f} cases/s, {expected / elapsed:.0f} objects/s "
          f"= {read_s / elapsed:.2f} of the reads alone (its time includes starting the command)")
    print(f"memory: {warm:.1f} MB after warm-up, peak {peak:.1f} MB, growth {growth:.1f} MB "
          f"(bound {args.max_growth_mb:.0f} MB)")
    checks = {"every object queued": queued == expected, "baseline read every object": read == expected,
              "memory flat": growth <= args.max_growth_mb}
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}" + ("" if ok or name != "every object queued"
                                                        else f" ({queued} of {expected})"))
    passed = sum(checks.values())
    print(f"backfill: {passed} passed, {len(checks) - passed} failed")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
