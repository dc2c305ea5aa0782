"""The load soak (``bench/load_soak.py``) as a test: the real daemon under concurrent posting.

By default a small run (1,500 events, 8 clients, about half a minute); set
``TQ_MW_LOAD_EVENTS=20000`` (and optionally ``TQ_MW_LOAD_CLIENTS``, ``TQ_MW_LOAD_CASES``) for the
issue's full size, which takes much longer (see ``bench/README.md``). Select or skip it with
``-m load`` / ``-m "not load"`` (or ``-m "not e2e"`` with the other end-to-end tests).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.load]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "load_soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("tq_mw_load_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def _size():
    events = os.environ.get("TQ_MW_LOAD_EVENTS")
    if events:
        return {"events": int(events), "clients": int(os.environ.get("TQ_MW_LOAD_CLIENTS", "16")),
                "cases": int(os.environ.get("TQ_MW_LOAD_CASES", "500"))}
    return {"events": 1500, "clients": 8, "cases": 40}


def test_concurrent_posting_loses_nothing_duplicates_nothing_and_memory_stays_flat():
    soak = _load_soak()
    report = soak.run(**_size())
    failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
    assert report.checks, "the load run did not get as far as checking anything"
    assert report.server_errors == 0 and report.transport_errors == 0, report.answers
    assert report.drain_s is not None, "the inbox did not drain in time"
    assert report.lost == 0, failed
    assert report.duplicated == 0, failed
    assert report.max_rss_growth_mb is not None and report.max_rss_growth_mb < report.rss_limit_mb, report.memory
    assert not failed, failed
    assert report.lines[-1] == f"load: {len(report.checks)} passed, 0 failed"
