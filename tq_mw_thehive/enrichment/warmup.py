"""Cache warm-up: look up, ahead of time, every indicator value this daemon already knows.

After a new plugin is enabled, a key is added, a plugin version is bumped or the cache
was cleared, the next events would pay for every lookup while ThreatQ waits. ``cache
warm`` fills the cache first. The values come from what is stored locally, never from
ThreatQ or TheHive: the watch list (value, type, TLP, PAP), and each synced observable
(``object_map``) as its latest event in the inbox carries it, mapped to indicator values
exactly as the sync maps it. Each lookup goes through ``Enricher.run``, so the plugin
state, the TLP/PAP gate, the private-address rule and the cache behave as in the worker;
a value whose entry is fresh costs nothing, not even a hit in the statistics.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from tq_mw_thehive import state
from tq_mw_thehive.enrichment import gate
from tq_mw_thehive.enrichment.cache import normalise
from tq_mw_thehive.enrichment.registry import plugin_state
from tq_mw_thehive.enrichment.runner import Enricher, address_scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownValue:
    data_type: str   # as a plugin sees it (a file's hashes are ``hash``)
    value: str
    tlp: Optional[str]
    pap: Optional[str]


class KnownValues(state.Store):
    """Reads tables ``watches``, ``object_map`` and ``inbox``; writes nothing."""

    def _watched(self) -> Iterator[KnownValue]:
        for row in self.db.execute("SELECT value, data_type, tlp, pap FROM watches ORDER BY value"):
            yield KnownValue(row["data_type"], row["value"], row["tlp"], row["pap"])

    def _synced(self, types, indicator_status: str) -> Iterator[KnownValue]:
        """Each synced observable's indicator values, from its newest stored event that reads."""
        from tq_mw_thehive.mapping import map_observable
        from tq_mw_thehive.sync import enrichment_type
        from tq_mw_thehive.thehive.model import Observable

        current, found = None, False
        rows = self.db.execute(
            "SELECT object_id, body FROM inbox WHERE object_type = 'observable' AND action != 'delete' "
            "AND object_id IN (SELECT thehive_id FROM object_map WHERE kind = 'observable') "
            "ORDER BY object_id, order_ts DESC, id DESC")
        for row in rows:
            if row["object_id"] != current:
                current, found = row["object_id"], False
            if found:
                continue
            try:
                payload = json.loads(row["body"])
                observable = Observable.from_thehive(payload.get("object") or payload.get("details"))
                mapped = map_observable(observable, types, status=indicator_status)
            except Exception:  # an older or partial event: try the next one of this observable
                continue
            found = True
            for indicator in mapped.indicators:
                yield KnownValue(enrichment_type(observable.data_type, indicator.type), indicator.value,
                                 observable.tlp, observable.pap)

    def collect(self, types, indicator_status: str = "Active") -> List[KnownValue]:
        """Every known value once per (type, normalised value, TLP, PAP): the gate may differ by TLP/PAP."""
        seen, out = set(), []
        for known in list(self._watched()) + list(self._synced(types, indicator_status)):
            key = (known.data_type, normalise(known.data_type, known.value), known.tlp, known.pap)
            if key not in seen:
                seen.add(key)
                out.append(known)
        return out


class Warmer:
    """Runs the plugins for values whose cache entry is missing or expired, at each plugin's rate limit."""

    def __init__(self, enricher: Enricher, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.enricher = enricher
        self.clock = clock
        self.sleep = sleep
        self._last_call: Dict[str, float] = {}

    def _respect_rate_limit(self, info) -> None:
        limit = info.rate_limit_per_min
        if not limit:
            return
        last = self._last_call.get(info.name)
        if last is not None:
            wait = last + 60.0 / float(limit) - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_call[info.name] = self.clock()

    def _will_call(self, info, known: KnownValue) -> bool:
        """Whether ``Enricher.run`` will call the plugin (it decides; this only paces the calls)."""
        settings = self.enricher.settings
        if plugin_state(info, settings, self.enricher.keys) != "enabled":
            return False
        if gate.refusal(info.module, known.tlp, known.pap, settings.max_tlp_external, settings.max_pap_active):
            return False
        return not (info.external and known.data_type == "ip" and address_scope(known.value) not in (None, "global"))

    def run(self, values: List[KnownValue], only: Optional[str] = None, progress=None) -> Dict[str, int]:
        """Counts: ``fresh`` (already cached) and the run statuses (fetched, not_found, skipped, error)."""
        counts = {"fresh": 0, "fetched": 0, "not_found": 0, "skipped": 0, "error": 0}
        for known in values:
            for info in self.enricher.plugins_for(known.data_type, only):
                if self.enricher.cache.get(info.name, info.version, known.data_type, known.value) is not None:
                    counts["fresh"] += 1
                    continue
                if self._will_call(info, known):
                    self._respect_rate_limit(info)
                for run in self.enricher.run(known.data_type, known.value, known.tlp, known.pap, only=info.name):
                    counts[run.status] = counts.get(run.status, 0) + 1
            if progress is not None:
                progress.advance(fetched=counts["fetched"], errors=counts["error"])
        return counts
