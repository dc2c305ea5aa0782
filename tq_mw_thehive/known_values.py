"""Every indicator value this daemon already knows, from what it stores locally: for ``cache
warm``, which looks them up ahead of time.

The values come from the watch list (value, type, TLP, PAP) and from each synced observable
(the object map) as its newest readable event in the inbox carries it, mapped to indicator
values exactly as the sync maps it. Never from ThreatQ or TheHive: warming must not cost them
a call. Each table is read through the module that owns it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional

from tq_mw_thehive.enrichment.cache import normalise
from tq_mw_thehive.enrichment.monitor import WatchList
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.mapping import enrichment_type, map_observable
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive.model import Observable
from tq_mw_thehive.type_mapping import TypeMapping

if TYPE_CHECKING:
    from tq_mw_thehive.services import Services


@dataclass(frozen=True)
class KnownValue:
    data_type: str   # as a plugin sees it (a file's hashes are ``hash``)
    value: str
    tlp: Optional[str]
    pap: Optional[str]


def _watched(watches: WatchList) -> Iterator[KnownValue]:
    for row in sorted(watches.listing(), key=lambda w: w["value"]):
        yield KnownValue(row["data_type"], row["value"], row["tlp"], row["pap"])


def _synced(inbox: Inbox, synced: SyncState, types: TypeMapping, indicator_status: str) -> Iterator[KnownValue]:
    """Each synced observable's indicator values, from its newest stored event that reads."""
    ids = synced.thehive_ids("observable")
    found = set()
    for object_id, body in inbox.object_bodies("observable"):
        if object_id in found or object_id not in ids:
            continue
        try:
            payload = json.loads(body)
            observable = Observable.from_thehive(payload.get("object") or payload.get("details"))
            mapped = map_observable(observable, types, status=indicator_status)
        except Exception:  # an older or partial event: try the next one of this observable
            continue
        found.add(object_id)
        for indicator in mapped.indicators:
            yield KnownValue(enrichment_type(observable.data_type, indicator.type), indicator.value,
                             observable.tlp, observable.pap)


def collect(services: "Services") -> List[KnownValue]:
    """Every known value once per (type, normalised value, TLP, PAP): the gate may differ by TLP/PAP."""
    status = services.cfg.sync.indicator_status
    seen, out = set(), []
    for known in list(_watched(services.watches)) + list(_synced(services.inbox, services.sync_state,
                                                                 services.types, status)):
        key = (known.data_type, normalise(known.data_type, known.value), known.tlp, known.pap)
        if key not in seen:
            seen.add(key)
            out.append(known)
    return out
