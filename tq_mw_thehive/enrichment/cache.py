"""The enrichment result cache, in the state database.

Key: plugin name + plugin version + data type + normalised value. A hit makes no
network call; a negative answer ("not found") is kept for a shorter time; an error is
never kept. Each entry remembers when it was fetched, so output can say "cached, N min
old" (what Cortex users asked for in Cortex#97).
"""
from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from tq_mw_thehive import state

_CASE_INSENSITIVE = {"domain", "fqdn", "hostname", "mail", "hash", "ip"}


def normalise(data_type: str, value: str) -> str:
    """The form two equal values share: trimmed; lower case where case means nothing; IPs canonical."""
    value = value.strip()
    if data_type == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    if data_type in _CASE_INSENSITIVE:
        value = value.lower().rstrip(".") if data_type in ("domain", "fqdn", "hostname") else value.lower()
    return value


@dataclass(frozen=True)
class CachedResult:
    found: bool
    verdict: Optional[str]
    data: Dict
    attributes: Dict[str, str]
    fetched_at: float

    def age_s(self, now: Optional[float] = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.fetched_at)


class ResultCache(state.Store):
    """Tables ``enrichment_cache`` and ``enrichment_stats`` (migration 3)."""

    DURABLE_WRITES = False  # a cache: what a power cut undoes is looked up again

    def __init__(self, path, busy_timeout: float = state.BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock

    def get(self, plugin: str, version: str, data_type: str, value: str) -> Optional[CachedResult]:
        row = self.db.execute(
            "SELECT * FROM enrichment_cache WHERE plugin = ? AND version = ? AND data_type = ? AND value = ? "
            "AND expires_at > ?", (plugin, version, data_type, normalise(data_type, value), self.clock())).fetchone()
        if row is None:
            return None
        result = json.loads(row["result"])
        return CachedResult(bool(row["found"]), row["verdict"], result.get("data") or {},
                            result.get("attributes") or {}, row["fetched_at"])

    def latest(self, plugin: str, version: str, data_type: str, value: str) -> Optional[CachedResult]:
        """The last answer kept, even expired: what the monitor compares a fresh answer with."""
        row = self.db.execute(
            "SELECT * FROM enrichment_cache WHERE plugin = ? AND version = ? AND data_type = ? AND value = ?",
            (plugin, version, data_type, normalise(data_type, value))).fetchone()
        if row is None:
            return None
        result = json.loads(row["result"])
        return CachedResult(bool(row["found"]), row["verdict"], result.get("data") or {},
                            result.get("attributes") or {}, row["fetched_at"])

    def put(self, plugin: str, version: str, data_type: str, value: str, *, found: bool,
            verdict: Optional[str], data: Dict, attributes: Dict[str, str], ttl_s: float) -> None:
        now = self.clock()
        blob = json.dumps({"data": data, "attributes": attributes}, sort_keys=True, default=str)
        self.write(lambda db: db.execute(
            "INSERT INTO enrichment_cache (plugin, version, data_type, value, found, verdict, result, fetched_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (plugin, version, data_type, value) "
            "DO UPDATE SET found = excluded.found, verdict = excluded.verdict, result = excluded.result, "
            "fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
            (plugin, version, data_type, normalise(data_type, value), int(found), verdict, blob, now,
             now + ttl_s)))

    def count(self, plugin: str, *, hit: bool = False, miss: bool = False, error: bool = False,
              lookup_ms: float = 0.0) -> None:
        self.write(lambda db: db.execute(
            "INSERT INTO enrichment_stats (plugin, hits, misses, errors, lookup_ms) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (plugin) DO UPDATE SET hits = enrichment_stats.hits + excluded.hits, "
            "misses = enrichment_stats.misses + excluded.misses, errors = enrichment_stats.errors + excluded.errors, "
            "lookup_ms = enrichment_stats.lookup_ms + excluded.lookup_ms",
            (plugin, int(hit), int(miss), int(error), lookup_ms)))

    def stats(self) -> List[Dict]:
        """Per plugin: entries (fresh, expired), hits, misses, errors, mean plugin time per miss."""
        now = self.clock()
        entries = {r["plugin"]: (r["fresh"], r["expired"]) for r in self.db.execute(
            "SELECT plugin, SUM(expires_at > ?) AS fresh, SUM(expires_at <= ?) AS expired "
            "FROM enrichment_cache GROUP BY plugin", (now, now))}
        counters = {r["plugin"]: r for r in self.db.execute("SELECT * FROM enrichment_stats")}
        out = []
        for plugin in sorted(set(entries) | set(counters)):
            fresh, expired = entries.get(plugin, (0, 0))
            c = counters.get(plugin)
            hits, misses = (c["hits"], c["misses"]) if c else (0, 0)
            out.append({"plugin": plugin, "entries": fresh, "expired": expired, "hits": hits, "misses": misses,
                        "errors": c["errors"] if c else 0,
                        "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
                        "mean_lookup_ms": round(c["lookup_ms"] / misses, 1) if c and misses else None})
        return out

    def clear(self, plugin: Optional[str] = None) -> int:
        if plugin is None:
            return self.write(lambda db: db.execute("DELETE FROM enrichment_cache").rowcount)
        return self.write(lambda db: db.execute("DELETE FROM enrichment_cache WHERE plugin = ?",
                                                (plugin,)).rowcount)
