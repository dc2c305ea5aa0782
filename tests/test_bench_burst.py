"""``bench/burst.py`` (issue 15): its events, its call accounting, and one small run of the real daemon."""
from __future__ import annotations

import collections
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tq_mw_thehive.thehive import events as thehive_events

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "burst.py"


@pytest.fixture(scope="module")
def burst():
    spec = importlib.util.spec_from_file_location("tq_mw_bench_burst", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_the_burst_is_one_case_then_unique_ip_domain_and_hash_observables_of_it(burst):
    case, events = burst.burst_events(30)
    assert len(events) == 31 and events[0]["objectType"] == "Case" and events[0]["action"] == "create"
    observables = events[1:]
    assert all(e["objectType"] == "Observable" and e["action"] == "create" for e in observables)
    assert all(e["rootId"] == case["_id"] and e["object"]["case"]["_id"] == case["_id"] for e in observables)
    assert collections.Counter(e["object"]["dataType"] for e in observables) == {"ip": 10, "domain": 10, "hash": 10}
    values = [e["object"]["data"] for e in observables]
    assert len(set(values)) == len(values)
    assert {len(e["object"]["data"]) for e in observables if e["object"]["dataType"] == "hash"} == {32, 40, 64}
    assert len({e["_id"] for e in events}) == 31 and len({e["objectId"] for e in events}) == 31
    stamps = [e["_createdAt"] for e in events]
    assert stamps == sorted(stamps)
    for event in events:  # the daemon's envelope parser: TheHive 5, one case, nothing ignored
        parsed = thehive_events.parse(json.loads(burst.encode(event)))
        assert (parsed.shape, parsed.action, parsed.case_key, parsed.ignore_reason) == \
            (thehive_events.THEHIVE5_V1, "create", f"case:{case['_id']}", None)


def test_call_kinds_name_ids_and_elide_query_values_but_with_and_grant_type(burst):
    assert burst.call_kind("GET", "/api/indicators/17/attributes", "") == "GET /api/indicators/{id}/attributes"
    assert burst.call_kind("POST", "/api/indicators/query", "with=attributes,sources&limit=50&offset=0") == \
        "POST /api/indicators/query?with=attributes,sources&limit=…&offset=…"
    assert burst.call_kind("POST", "/api/token", "grant_type=password&client_id=x") == \
        "POST /api/token?grant_type=password&client_id=…"
    assert burst.call_kind("GET", "/api/indicators", "value=1.2.3.4") == "GET /api/indicators?value=…"


def test_the_first_mode_is_one_at_a_time_the_baseline(burst):
    assert burst.BASELINE == "one-at-a-time" and burst.MODES["one-at-a-time"].sync == {"batch_max": 1}
    assert burst.MODES["batched"].sync == {}   # the default configuration
    args = burst.parse_args([])
    assert (args.observables, args.latency_ms, args.mode, args.workers, args.enrichment) == (
        300, 50.0, ["one-at-a-time", "batched"], 2, False)


@pytest.mark.e2e
def test_a_small_burst_through_the_real_daemon_lands_linked_and_counts_every_call(burst, capsys):
    args = burst.parse_args(["--observables", "6", "--latency-ms", "20", "--timeout", "120"])
    case, events = burst.burst_events(args.observables)
    result = burst.run(burst.MODES["batched"], args, case, events)
    assert result.drained and result.stats["dead"] == 0 and result.stats["done"] == 7, result.stats
    assert result.answers == {"200 queued": 7}
    assert (result.case_events, result.events_in_tq, result.indicators, result.single, result.linked) == (1, 1, 6, 6, 6)
    # every call the simulator answered, the rig's own token grant included, and by kind
    kinds = result.kinds_setup + result.kinds_start + result.kinds_burst
    assert result.calls_total == sum(kinds.values()) >= result.calls_burst > 0
    assert result.kinds_setup == {"POST /api/token?grant_type=password&client_id=…": 1}
    assert result.seconds >= 0.02 * result.calls_burst / args.workers  # the latency was paid
    assert "burst[batched]:" in result.summary() and "6/6 indicators linked" in result.summary()
