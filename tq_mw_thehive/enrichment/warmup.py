"""Cache warm-up: look up, ahead of time, every indicator value this daemon already knows.

After a new plugin is enabled, a key is added, a plugin version is bumped or the cache
was cleared, the next events would pay for every lookup while ThreatQ waits. ``cache
warm`` fills the cache first. The values come from what is stored locally, never from
ThreatQ or TheHive (``known_values.collect``). Each lookup goes through ``Enricher.run``, so the plugin
state, the TLP/PAP gate, the private-address rule and the cache behave as in the worker;
a value whose entry is fresh costs nothing, not even a hit in the statistics.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from tq_mw_thehive.enrichment.pacing import Pacer
from tq_mw_thehive.enrichment.registry import plugin_state
from tq_mw_thehive.enrichment.runner import Enricher

if TYPE_CHECKING:
    from tq_mw_thehive.known_values import KnownValue

log = logging.getLogger(__name__)


class Warmer:
    """Runs the plugins for values whose cache entry is missing or expired, at each plugin's rate limit."""

    def __init__(self, enricher: Enricher, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.enricher = enricher
        self.pacer = Pacer(clock, sleep)

    def _will_call(self, info, known: "KnownValue") -> bool:
        """Whether ``Enricher.run`` will call the plugin (it decides; this only paces the calls)."""
        return (plugin_state(info, self.enricher.settings, self.enricher.keys) == "enabled"
                and self.enricher.refusal(info, known.data_type, known.value, known.tlp, known.pap) is None)

    def run(self, values: List["KnownValue"], only: Optional[str] = None, progress=None) -> Dict[str, int]:
        """Counts: ``fresh`` (already cached) and the run statuses (fetched, not_found, skipped, error,
        over_quota)."""
        counts = {"fresh": 0, "fetched": 0, "not_found": 0, "skipped": 0, "error": 0}
        for known in values:
            for info in self.enricher.plugins_for(known.data_type, only):
                if self.enricher.cache.get(info.name, info.version, known.data_type, known.value) is not None:
                    counts["fresh"] += 1
                    continue
                if self._will_call(info, known):
                    self.pacer.wait(info, self.enricher.limits(info).per_minute)
                # Over quota: counted, not queued (no indicator waits for it; the next warm-up tries again).
                for run in self.enricher.run(known.data_type, known.value, known.tlp, known.pap, only=info.name,
                                             queue=False):
                    counts[run.status] = counts.get(run.status, 0) + 1
            if progress is not None:
                progress.advance(fetched=counts["fetched"], errors=counts["error"])
        return counts
