"""Quotas of online plugins, per API key, shared by every process (the state database).

Free tiers are small (VirusTotal's public API: 4 lookups a minute, 500 a day), so a lookup
that would go over is not made: the value syncs without that plugin's answer and the lookup
waits in table ``enrichment_deferred`` until quota returns (``deferred.Drainer`` runs it and
puts its attributes on the indicator). A 429 from a service pauses the plugin for its
``Retry-After``, or a backoff that doubles with each 429 within the hour.

- **Limits**: a plugin's ``RATE_LIMIT_PER_MIN``/``RATE_LIMIT_PER_DAY`` (its service's documented
  free tier), replaced per plugin by ``enrichment.limits.<name>.per_minute|per_day`` (null lifts
  one). The minute is sliding (no burst of twice the limit across a minute boundary); the day is
  the UTC day, as the services count it.
- **Per key**: calls are counted per plugin and ``key_id``, a digest of the plugin's API keys
  (never the key); a plugin without keys has one count.
- **Order**: a lookup is refused while lookups of the same plugin and key of its priority or
  better wait, so the queue is applied in order and a case's observables (priority 0) go before
  ``monitor``'s re-checks (priority 1).
- Only lookups that would call the service count: the runner asks after its cache missed.
"""
from __future__ import annotations

import hashlib
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from tq_mw_thehive import state

PRIORITY = {"case": 0, "monitor": 1}
MINUTE_S, DAY_S = 60.0, 86400.0
BACKOFF_S = 60.0             # a 429 without Retry-After: paused this long, doubled per 429 in the hour
BACKOFF_CAP_S = 3600.0


@dataclass(frozen=True)
class Limits:
    """The limits in force for one plugin: calls per sliding minute and per UTC day (None: none)."""

    per_minute: Optional[float] = None
    per_day: Optional[int] = None

    @property
    def any(self) -> bool:
        return self.per_minute is not None or self.per_day is not None

    def minute_window(self) -> Tuple[int, float]:
        """(calls, seconds): 4 a minute is 4 in 60 s; 0.5 a minute is 1 in 120 s."""
        calls = max(1, math.floor(self.per_minute))
        return calls, MINUTE_S * calls / self.per_minute

    def describe(self) -> str:
        parts = [f"{_num(self.per_minute)} a minute" if self.per_minute is not None else "",
                 f"{self.per_day} a day" if self.per_day is not None else ""]
        return ", ".join(p for p in parts if p) or "no limit"


def _num(value: float) -> str:
    return f"{value:g}"


def limits_for(plugin: Any, limits: Optional[Mapping[str, Mapping[str, Any]]]) -> Limits:
    """``plugin``: a ``PluginInfo``; ``limits``: ``enrichment.limits``. A key present in the
    config wins over the declaration, null included (a paid key lifts the free tier's limit)."""
    override = (limits or {}).get(plugin.name) or {}
    per_minute = override["per_minute"] if "per_minute" in override else plugin.rate_limit_per_min
    per_day = override["per_day"] if "per_day" in override else plugin.rate_limit_per_day
    return Limits(None if per_minute is None else float(per_minute),
                  None if per_day is None else int(per_day))


def key_id(keys: Mapping[str, str]) -> str:
    """Which API key a call counts against: a digest of the plugin's keys, never a key itself."""
    if not keys:
        return "-"
    joined = "\0".join(f"{name}={keys[name]}" for name in sorted(keys))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Refusal:
    """Why a lookup may not call now, and when it may be tried again (epoch seconds)."""

    reason: str
    retry_at: float
    kind: str = "limit"   # limit (a minute's or day's quota used), paused (after a 429), queued (behind others)


class QuotaBook(state.Store):
    """Tables ``quota_calls``, ``quota_pauses`` and ``enrichment_deferred``.

    The calls are bookkeeping (a power cut may forget the last ones: at worst a few calls over);
    a deferred lookup is an accepted promise, so queuing one is a durable write.
    """

    DURABLE_WRITES = False

    def __init__(self, path, busy_timeout: float = state.BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock

    # --- asking for a call ------------------------------------------------------------------------

    def take(self, plugin: str, key: str, limits: Limits, priority: int = 0,
             behind_queue: bool = True) -> Optional[Refusal]:
        """Record one call of ``plugin`` with ``key`` if it may be made now; else why not.
        ``behind_queue``: refuse while lookups of this priority or better wait (the drainer, which
        runs them, passes False). A plugin without limits costs one read, no write."""
        now = self.clock()

        def check(db: sqlite3.Connection, record: bool) -> Optional[Refusal]:
            if record:  # count, then record: one process at a time per key, on every host
                state.exclusive(db, f"quota:{plugin}:{key}")
            paused = db.execute("SELECT until FROM quota_pauses WHERE plugin = ? AND key_id = ? AND until > ?",
                                (plugin, key, now)).fetchone()
            if paused is not None:
                return Refusal(f"paused after HTTP 429 until {_clock(paused[0])}", paused[0], "paused")
            if behind_queue:
                waiting = db.execute("SELECT COUNT(*) FROM enrichment_deferred WHERE plugin = ? AND key_id = ? "
                                     "AND priority <= ?", (plugin, key, priority)).fetchone()[0]
                if waiting:
                    return Refusal(f"{waiting} earlier lookup(s) of {plugin} queued", now, "queued")
            if not record:
                return None
            if limits.per_minute is not None:
                calls, window = limits.minute_window()
                recent = [r[0] for r in db.execute(
                    "SELECT at FROM quota_calls WHERE plugin = ? AND key_id = ? AND at > ? ORDER BY at",
                    (plugin, key, now - window))]
                if len(recent) >= calls:
                    return Refusal(f"quota of {_num(limits.per_minute)} a minute used",
                                   recent[len(recent) - calls] + window)
            if limits.per_day is not None:
                day = math.floor(now / DAY_S) * DAY_S
                used = db.execute("SELECT COUNT(*) FROM quota_calls WHERE plugin = ? AND key_id = ? AND at >= ?",
                                  (plugin, key, day)).fetchone()[0]
                if used >= limits.per_day:
                    return Refusal(f"quota of {limits.per_day} a day used", day + DAY_S)
            db.execute("INSERT INTO quota_calls (plugin, key_id, at) VALUES (?, ?, ?)", (plugin, key, now))
            db.execute("DELETE FROM quota_calls WHERE plugin = ? AND key_id = ? AND at < ?",
                       (plugin, key, now - DAY_S - MINUTE_S * 60))
            return None

        if not limits.any:
            return check(self.db, False)
        return self.write(lambda db: check(db, True))

    def pause(self, plugin: str, key: str, retry_after_s: Optional[float], reason: str) -> float:
        """A 429: no call of ``plugin`` with ``key`` until the service's ``Retry-After`` or a backoff
        doubling with each 429 of the last hour. Returns when the pause ends."""
        now = self.clock()

        def put(db: sqlite3.Connection) -> float:
            state.exclusive(db, f"quota:{plugin}:{key}")
            row = db.execute("SELECT last_429, strikes FROM quota_pauses WHERE plugin = ? AND key_id = ?",
                             (plugin, key)).fetchone()
            strikes = (row["strikes"] + 1) if row is not None and row["last_429"] and now - row["last_429"] < 3600 else 1
            wait = retry_after_s if retry_after_s else min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (strikes - 1))
            db.execute("INSERT INTO quota_pauses (plugin, key_id, until, last_429, reason, strikes) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (plugin, key_id) DO UPDATE SET until = excluded.until, "
                       "last_429 = excluded.last_429, reason = excluded.reason, strikes = excluded.strikes",
                       (plugin, key, now + wait, now, reason[:300], strikes))
            return now + wait

        return self.write(put)

    # --- the queue --------------------------------------------------------------------------------

    def defer(self, plugin: str, key: str, data_type: str, value: str, tlp: Optional[str], pap: Optional[str],
              origin: str, retry_at: float) -> None:
        """Queue a lookup (once per plugin, value and origin: a value queued again keeps its place)."""
        now = self.clock()
        self.write(lambda db: db.execute(
            "INSERT INTO enrichment_deferred (plugin, key_id, data_type, value, tlp, pap, origin, priority, queued_at, "
            "due_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (plugin, data_type, value, origin) DO UPDATE "
            "SET tlp = excluded.tlp, pap = excluded.pap",
            (plugin, key, data_type, value, tlp, pap, origin, PRIORITY[origin], now, max(now, retry_at))),
            durable=True)

    def due(self, limit: int = 200) -> List[sqlite3.Row]:
        """Queued lookups that may be tried now, in the order they are to be applied."""
        return self.db.execute("SELECT * FROM enrichment_deferred WHERE due_at <= ? ORDER BY priority, id LIMIT ?",
                               (self.clock(), limit)).fetchall()

    def done(self, row_id: int) -> None:
        self.write(lambda db: db.execute("DELETE FROM enrichment_deferred WHERE id = ?", (row_id,)), durable=True)

    def later(self, row_id: int, retry_at: float, error: Optional[str] = None) -> int:
        """Try ``row_id`` again at ``retry_at`` (an error counts an attempt); the attempts so far."""
        def put(db: sqlite3.Connection) -> int:
            db.execute("UPDATE enrichment_deferred SET due_at = ?, attempts = attempts + ?, "
                       "last_error = COALESCE(?, last_error) WHERE id = ?",
                       (retry_at, 1 if error else 0, error and error[:300], row_id))
            row = db.execute("SELECT attempts FROM enrichment_deferred WHERE id = ?", (row_id,)).fetchone()
            return row[0] if row is not None else 0

        return self.write(put)

    def depth(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM enrichment_deferred").fetchone()[0]

    # --- what the status page, /metrics and `plugins` show ----------------------------------------

    def usage(self, plugins: Mapping[str, Limits]) -> List[Dict[str, Any]]:
        """Per plugin (summed over its keys, as one key is the usual case): calls in the last minute
        and this UTC day, what is left of each, the queue depth, the oldest queued lookup's age, the
        last 429 and the pause in force."""
        now = self.clock()
        day = math.floor(now / DAY_S) * DAY_S
        db = self.db
        out = []
        for name, limits in sorted(plugins.items()):
            window = limits.minute_window()[1] if limits.per_minute is not None else MINUTE_S
            minute = db.execute("SELECT COUNT(*) FROM quota_calls WHERE plugin = ? AND at > ?",
                                (name, now - window)).fetchone()[0]
            today = db.execute("SELECT COUNT(*) FROM quota_calls WHERE plugin = ? AND at >= ?",
                               (name, day)).fetchone()[0]
            queued, oldest = db.execute("SELECT COUNT(*), MIN(queued_at) FROM enrichment_deferred WHERE plugin = ?",
                                        (name,)).fetchone()
            pause = db.execute("SELECT MAX(last_429), MAX(until) FROM quota_pauses WHERE plugin = ?",
                               (name,)).fetchone()
            out.append({
                "plugin": name, "limits": {"per_minute": limits.per_minute, "per_day": limits.per_day},
                "used_minute": minute, "used_day": today,
                "left_minute": None if limits.per_minute is None else max(0, limits.minute_window()[0] - minute),
                "left_day": None if limits.per_day is None else max(0, limits.per_day - today),
                "deferred": queued, "oldest_deferred_s": None if oldest is None else max(0.0, now - oldest),
                "last_429": pause[0], "paused_until": pause[1] if pause[1] and pause[1] > now else None,
            })
        return out


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(epoch))
