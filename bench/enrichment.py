#!/usr/bin/env python3
"""Enrichment: time per observable with the result cache missing, then hitting, against enrichment doing nothing.

    python bench/enrichment.py [--values 2000]

It runs the ``Enricher`` (the daemon's own class) in this process on a temporary state database,
with the four bundled offline plugins only (ip_scope, geoip, domain, warninglists: no network,
no key), over ``--values`` distinct observable values of six data types (public and private IP
addresses, domains, FQDNs, URLs, mail addresses, SHA-256 hashes):

* the plugins are loaded and their data read first, on a throwaway database (a one-off cost at
  a worker's start, reported separately, not in the passes);
* pass 1: every value once: every lookup a cache miss (the plugin runs, the answer is stored);
* pass 2: the same values again: every lookup a cache hit;
* baseline: the same loop with an ``Enricher`` whose registry is empty (enrichment doing
  nothing; the loop, the call and the IP-scope check remain);
* per plugin: hits, misses and mean plugin time from ``ResultCache.stats()``, and the time of a
  cache hit for that plugin alone (``Enricher.run(..., only=plugin)``).

Prints time per observable for each pass, the added time of a hit over the baseline and the
ratio, then PASS/FAIL against the issue's target: with a cache hit, enrichment adds under 1 ms per
observable (plus: pass 1 all misses, pass 2 all hits). The last line is
``enrichment: N passed, M failed``; the exit code is 1 when a check failed. The temporary
database sits on the file system of ``$TMPDIR`` (each cache write is a committed, fsync'd
SQLite transaction, as in the daemon).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OFFLINE_PLUGINS, Report, percentile  # noqa: E402

from tq_mw_thehive import config as config_mod  # noqa: E402
from tq_mw_thehive import state  # noqa: E402
from tq_mw_thehive.enrichment.cache import ResultCache  # noqa: E402
from tq_mw_thehive.enrichment.keys import KeyStore  # noqa: E402
from tq_mw_thehive.enrichment.registry import Registry  # noqa: E402
from tq_mw_thehive.enrichment.runner import Enricher  # noqa: E402


def values(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` distinct (data type, value) pairs, in a fixed mix of six data types."""
    makers = (
        ("ip", lambda j: f"{23 + j % 170}.{(j >> 8) % 250 + 1}.{j % 250 + 1}.{(j * 7) % 250 + 1}"),
        ("ip", lambda j: f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}"),
        ("domain", lambda j: f"login-{j}.phish-{j % 61}.example.net"),
        ("fqdn", lambda j: f"portal{j}.login-{j % 53}.co.uk"),
        ("url", lambda j: f"https://cdn{j}.example.org/o365/login?session={j:08x}"),
        ("mail", lambda j: f"payroll{j}@mail-{j % 41}.example.com"),
        ("hash", lambda j: hashlib.sha256(f"payload-{seed}-{j}".encode()).hexdigest()),
    )
    out, seen, j = [], set(), 0
    while len(out) < n and j < n * 10:
        data_type, make = makers[j % len(makers)]
        pair = (data_type, make(seed * 1_000_000 + j))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
        j += 1
    return out


def make_config(work: Path, name: str):
    raw = {"threatq": {"host": "http://127.0.0.1:9", "client_id": "bench"},
           "thehive": {"url": "http://127.0.0.1:9"},
           "webhook": {"auth": "bearer", "token": "bench-webhook-token-0123456789"},
           "enrichment": {"enabled": True}, "state_db": str(work / f"{name}.db")}
    cfg = config_mod.from_dict(raw, work)
    state.open_state(cfg.state_db).close()
    return cfg


def enricher(cfg, plugins) -> Enricher:
    return Enricher(cfg, Registry(plugins), ResultCache(cfg.state_db), KeyStore(cfg.state_db))


def timed_pass(e: Enricher, pairs, tlp: str = "AMBER", pap: str = "AMBER"):
    """Seconds per observable, and per plugin: statuses and plugin ms (what PluginRun says)."""
    per_obs: List[float] = []
    statuses: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    plugin_ms: Dict[str, List[float]] = collections.defaultdict(list)
    for data_type, value in pairs:
        started = time.perf_counter()
        runs = e.run(data_type, value, tlp, pap)
        per_obs.append(time.perf_counter() - started)
        for run in runs:
            statuses[run.plugin][run.status] += 1
            if run.status in ("fetched", "not_found"):
                plugin_ms[run.plugin].append(run.ms)
    return per_obs, statuses, plugin_ms


def counters(e: Enricher) -> Tuple[int, int, int]:
    """(hits, misses, errors) over all plugins, from ResultCache.stats()."""
    rows = e.cache.stats()
    return (sum(r["hits"] for r in rows), sum(r["misses"] for r in rows), sum(r["errors"] for r in rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=2000)
    parser.add_argument("--max-added-ms", type=float, default=1.0)
    args = parser.parse_args(argv)
    report = Report("enrichment")

    discovered = Registry.discover(entry_points=False)
    offline = [p for p in discovered.loaded() if p.name in OFFLINE_PLUGINS]
    missing = sorted(set(OFFLINE_PLUGINS) - {p.name for p in offline})
    if missing:
        print(f"the bundled offline plugins {missing} did not load: "
              f"{[(p.name, p.error) for p in discovered.plugins if p.name in missing]}")
        return 2
    pairs = values(args.values)
    mix = collections.Counter(dt for dt, _ in pairs)
    print(f"enrichment: {len(pairs)} values ({dict(mix)}); plugins {', '.join(p.name for p in offline)}; "
          f"TLP/PAP AMBER (offline plugins are never gated)", flush=True)

    with tempfile.TemporaryDirectory(prefix="tq-mw-bench-enrich-") as tmp:
        work = Path(tmp)
        # Load each plugin's data (geoip's table, tldextract's list, the MISP warning lists) on a
        # throwaway database: a one-off cost per worker process, not part of either pass.
        warm = enricher(make_config(work, "warm"), offline)
        for p in offline:
            started = time.perf_counter()
            for data_type in p.data_types[:1]:
                sample = {"ip": "9.9.9.9", "hash": "0" * 64, "url": "https://warm.example/x",
                          "mail": "a@warm.example"}.get(data_type, "warm.example")
                warm.run(data_type, sample, "AMBER", "AMBER", only=p.name)
            print(f"  load {p.name}: {(time.perf_counter() - started) * 1000:.0f} ms (first lookup in a process)")
        warm.close()

        cfg = make_config(work, "bench")
        e = enricher(cfg, offline)
        miss_s, miss_status, miss_plugin_ms = timed_pass(e, pairs)
        after_1 = counters(e)
        hit_s, hit_status, _ = timed_pass(e, pairs)
        after_2 = counters(e)
        # Per plugin, a hit alone: the same values, one plugin at a time.
        hit_alone: Dict[str, float] = {}
        for p in offline:
            subset = [(dt, v) for dt, v in pairs if dt in p.data_types]
            started = time.perf_counter()
            for data_type, value in subset:
                e.run(data_type, value, "AMBER", "AMBER", only=p.name)
            hit_alone[p.name] = (time.perf_counter() - started) / max(1, len(subset))
        stats = {row["plugin"]: row for row in e.cache.stats()}
        e.close()

        base = enricher(make_config(work, "baseline"), [])
        base_s, _, _ = timed_pass(base, pairs)
        base.close()

    def line(name: str, samples: List[float]) -> str:
        return (f"{name:34}{statistics.fmean(samples) * 1000:10.3f}{percentile(samples, 50) * 1000:10.3f}"
                f"{percentile(samples, 99) * 1000:10.3f}{sum(samples):10.2f}")

    print()
    print(f"{'per observable':34}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}{'total s':>10}")
    print(line("baseline (empty registry)", base_s))
    print(line("pass 1: cache misses", miss_s))
    print(line("pass 2: cache hits", hit_s))
    added_hit = statistics.fmean(hit_s) - statistics.fmean(base_s)
    added_miss = statistics.fmean(miss_s) - statistics.fmean(base_s)
    print(f"added by enrichment, per observable: misses {added_miss * 1000:.3f} ms "
          f"(×{statistics.fmean(miss_s) / statistics.fmean(base_s):.0f} the baseline), hits "
          f"{added_hit * 1000:.3f} ms (×{statistics.fmean(hit_s) / statistics.fmean(base_s):.0f} the baseline)")
    print()
    print(f"{'plugin':14}{'types':>30}{'misses':>8}{'hits':>8}{'errors':>8}{'mean plugin ms':>16}"
          f"{'hit alone ms':>14}")
    for p in offline:
        row = stats.get(p.name, {})
        mean = row.get("mean_lookup_ms")
        print(f"{p.name:14}{','.join(p.data_types):>30}{row.get('misses', 0):8d}{row.get('hits', 0):8d}"
              f"{row.get('errors', 0):8d}{'-' if mean is None else format(mean, '.1f'):>16}"
              f"{hit_alone[p.name] * 1000:14.3f}")
    print("(ResultCache.stats(): hits include the per-plugin 'hit alone' loop; mean plugin ms is over misses, "
          "rounded to 0.1 ms; per-miss times from PluginRun.ms below)")
    for name, samples in sorted(miss_plugin_ms.items()):
        print(f"  {name}: pass 1 plugin time mean {statistics.fmean(samples):.3f} ms, "
              f"p99 {percentile(samples, 99):.3f} ms over {len(samples)} misses")
    print()
    runs_1 = sum(sum(c.values()) for c in miss_status.values())
    runs_2 = sum(sum(c.values()) for c in hit_status.values())
    report.check("pass 1: every lookup a miss that ran the plugin", runs_1 > 0 and after_1 == (0, runs_1, 0),
                 f"{runs_1} lookups; hits, misses, errors {after_1}; "
                 f"{ {k: dict(v) for k, v in miss_status.items()} }")
    report.check("pass 2: every lookup answered by the cache",
                 runs_2 == runs_1 and after_2 == (runs_2, runs_1, 0),
                 f"{runs_2} lookups; hits, misses, errors {after_2}; "
                 f"{ {k: dict(v) for k, v in hit_status.items()} }")
    report.check(f"with a cache hit, enrichment adds under {args.max_added_ms:g} ms per observable",
                 added_hit * 1000 < args.max_added_ms,
                 f"{added_hit * 1000:.3f} ms added ({statistics.fmean(hit_s) * 1000:.3f} ms vs baseline "
                 f"{statistics.fmean(base_s) * 1000:.3f} ms)")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
