"""What this ThreatQ instance serves of the optional calls, in one screen.

The daemon's optional steps (``api.OPTIONAL_STEPS``: calls with no public evidence that a real
ThreatQ serves them) are learned as the sync meets them and kept in the state database. A first
real deployment should show its differences without waiting for traffic, so ``check`` adds a
read-only probe where one exists (a ``/query`` with a value that matches nothing; listing the
tags and sources of an object that already exists). Steps that write (consume, changing a
source's TLP, removing a tag) have no harmless probe: only the daemon's own use tells.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from tq_mw_thehive.sync_state import Capability
from tq_mw_thehive.threatq.api import OPTIONAL_STEPS, ThreatQClient, ThreatQStepRefused

# A value no analyst stores: a /query for it is answered with an empty list, or refused.
PROBE_VALUE = "tq-mw-thehive capability probe 0f3c9a"

LABELS = {
    "source_tlp": "change a source's TLP (PUT …/sources/{id})",
    "source_list": "read sources (GET …/sources)",
    "tag_list": "read tags (GET …/tags)",
    "tag_delete": "remove a tag (DELETE …/tags/{id})",
    "query_many:indicators": "look up many indicators at once (POST /api/indicators/query, +or criteria)",
}


@dataclass(frozen=True)
class Probe:
    """What one read-only probe found: ``served`` None when nothing could be probed."""

    served: Optional[bool]
    status: Optional[int] = None
    note: str = ""


@dataclass(frozen=True)
class StepReport:
    step: str
    label: str
    state: str          # served, not served, unknown
    detail: str         # how it is known, and what the daemon does without it


def label(step: str) -> str:
    if step in LABELS:
        return LABELS[step]
    kind, _, collection = step.partition(":")
    return {"query": f"look up {collection} (POST /api/{collection}/query)",
            "consume": f"create {collection} in one call (POST /api/{collection}/consume)"}.get(kind, step)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def report(step: str, learned: Optional[Capability], probe: Optional[Probe] = None,
           now: Optional[float] = None) -> StepReport:
    """One step's line: a probe made now wins over what the daemon learned earlier."""
    now = time.time() if now is None else now
    without = OPTIONAL_STEPS.get(step, "")
    if probe is not None and probe.served is not None:
        how = "probed now" + (f", {probe.note}" if probe.note else "")
        served, status = probe.served, probe.status
    elif learned is not None:
        how = f"learned by the daemon {_ago(now - learned.at)}"
        served, status = learned.supported, learned.status
    else:
        why = probe.note if probe is not None and probe.note else "no read-only probe"
        return StepReport(step, label(step), "unknown",
                          f"not used yet ({why}); the daemon learns it at its first use")
    if served:
        return StepReport(step, label(step), "served", how)
    return StepReport(step, label(step), "not served", f"HTTP {status}, {how}: {without}")


def _first_id(tq: ThreatQClient, collection: str) -> Optional[int]:
    body: Any = tq.request("GET", f"/api/{collection}", params={"limit": 1})
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and "id" in data[0]:
        return int(data[0]["id"])
    return None


def probe(tq: ThreatQClient, collections: List[str]) -> Dict[str, Probe]:
    """Read-only probes of the optional steps that have one. ThreatQ errors other than a
    refusal propagate: the caller reports ThreatQ itself as failing."""
    found: Dict[str, Probe] = {}
    for collection in collections:
        tq.find(collection, PROBE_VALUE)  # a refusal falls back to list filters, and is remembered
    bulk = ["query_many:indicators"] if "indicators" in collections else []
    if bulk:
        try:
            tq.find_indicators([PROBE_VALUE, PROBE_VALUE + "-2"])   # the +or criteria of a burst
        except ThreatQStepRefused:
            pass
    indicator = _first_id(tq, "indicators")
    readers = {"tag_list": tq.tags, "source_list": tq.sources}
    for step, read in readers.items():
        if indicator is None:
            found[step] = Probe(None, note="no indicator in ThreatQ to probe with")
            continue
        try:
            read("indicators", indicator)
        except ThreatQStepRefused:
            pass  # remembered by the client, read below
    refused = tq.refused_steps()
    for step in [f"query:{c}" for c in collections] + bulk + [s for s in readers if s not in found]:
        found[step] = Probe(False, refused[step]) if step in refused else Probe(True)
    return found


def reports(learned: Dict[str, Capability], probes: Optional[Dict[str, Probe]] = None,
            now: Optional[float] = None) -> List[StepReport]:
    """Every optional step, in ``OPTIONAL_STEPS`` order."""
    probes = probes or {}
    return [report(step, learned.get(step), probes.get(step), now) for step in OPTIONAL_STEPS]
