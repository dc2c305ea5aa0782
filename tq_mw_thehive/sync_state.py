"""What the sync remembers between events: TheHive ids → ThreatQ ids, and per object its sync state.

This is what makes the effect in ThreatQ exactly-once: a re-delivered event finds
its objects here instead of creating them again, and an older event that arrives
after a newer one sees that a newer change was already applied.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from tq_mw_thehive import state

CAPABILITY_PREFIX = "threatq_capability:"


@dataclass(frozen=True)
class Capability:
    """What the daemon last learned about one optional ThreatQ step (``OPTIONAL_STEPS``)."""

    step: str
    supported: bool          # False: ThreatQ refused it (``status``), the sync goes without it
    status: Optional[int]
    at: float                # when it was learned (epoch seconds)


def _capability(key: str, value: str) -> Optional[Capability]:
    try:
        data = json.loads(value)
        return Capability(key[len(CAPABILITY_PREFIX):], data["state"] == "supported", data.get("status"),
                          float(data["at"]))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged row says nothing; the next event learns it again


def read_capabilities(db: sqlite3.Connection) -> Dict[str, Capability]:
    """Every optional step the daemon has learned about, by step name (table ``meta``)."""
    rows = db.execute("SELECT key, value FROM meta WHERE key LIKE ?", (CAPABILITY_PREFIX + "%",))
    found = (_capability(key, value) for key, value in rows)
    return {c.step: c for c in found if c is not None}


def threatq_capabilities(path: Union[str, Path]) -> Dict[str, Capability]:
    """``read_capabilities`` of the state database at ``path``, for ``check`` and the status
    page: which optional ThreatQ calls this instance serves, as the sync found out."""
    store = state.Store(path)
    try:
        return read_capabilities(store.db)
    finally:
        store.close()


class SyncState(state.Store):
    """Tables ``object_map`` and ``sync_state`` (migration 2)."""

    DURABLE_WRITES = False  # redone by the idempotent sync if a power cut undoes them

    def tq_ids(self, thehive_id: str, collection: Optional[str] = None) -> List[Tuple[str, int]]:
        """The ThreatQ objects (collection, id) standing for a TheHive case or observable."""
        sql = "SELECT collection, tq_id FROM object_map WHERE thehive_id = ?"
        params: tuple = (thehive_id,)
        if collection is not None:
            sql += " AND collection = ?"
            params += (collection,)
        return [(r["collection"], r["tq_id"]) for r in self.db.execute(sql + " ORDER BY rowid", params)]

    def thehive_ids(self, kind: str) -> Set[str]:
        """The TheHive cases (``kind`` "case") or observables ("observable") that reached ThreatQ."""
        return {r[0] for r in self.db.execute("SELECT DISTINCT thehive_id FROM object_map WHERE kind = ?", (kind,))}

    def record(self, thehive_id: str, kind: str, collection: str, tq_id: int,
               case_id: Optional[str] = None) -> None:
        self.write(lambda db: db.execute(
            "INSERT INTO object_map (thehive_id, kind, collection, tq_id, case_id) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (thehive_id, kind, collection, tq_id, case_id)))

    def forget(self, thehive_id: str, collection: Optional[str] = None,
               tq_id: Optional[int] = None) -> None:
        sql, params = "DELETE FROM object_map WHERE thehive_id = ?", [thehive_id]
        if collection is not None:
            sql += " AND collection = ?"
            params.append(collection)
        if tq_id is not None:
            sql += " AND tq_id = ?"
            params.append(tq_id)
        self.write(lambda db: db.execute(sql, params))

    def observables_of(self, indicator_ids: Sequence[int]) -> List[str]:
        """The TheHive observables that reached ThreatQ as these indicators."""
        ids = list(indicator_ids)
        if not ids:
            return []
        return [r[0] for r in self.db.execute(
            f"SELECT DISTINCT thehive_id FROM object_map WHERE kind = 'observable' AND collection = 'indicators' "
            f"AND tq_id IN ({', '.join('?' * len(ids))})", ids)]

    def indicators_in(self, case_id: str) -> List[int]:
        """The indicators of the observables synced under a case (or an alert)."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT tq_id FROM object_map WHERE kind = 'observable' AND collection = 'indicators' "
            "AND case_id = ? ORDER BY tq_id", (case_id,))]

    def case_of(self, thehive_id: str) -> Optional[str]:
        """The case an observable was synced under (a TheHive 4 delete event does not say)."""
        row = self.db.execute("SELECT case_id FROM object_map WHERE thehive_id = ? AND case_id IS NOT NULL "
                              "LIMIT 1", (thehive_id,)).fetchone()
        return None if row is None else row["case_id"]

    def case_has_synced_observable(self, case_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM object_map WHERE kind = 'observable' AND case_id = ? LIMIT 1",
                              (case_id,)).fetchone()
        return row is not None

    def _row(self, thehive_id: str) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM sync_state WHERE thehive_id = ?", (thehive_id,)).fetchone()

    def applied_ts(self, thehive_id: str) -> Optional[int]:
        row = self._row(thehive_id)
        return None if row is None else row["applied_ts"]

    def mark_applied(self, thehive_id: str, kind: str, ts: Optional[int]) -> None:
        """Remember that TheHive's state as of ``ts`` reached ThreatQ (never moves back; an
        unknown TheHive time, None, keeps what was there: it is never compared with our clock)."""
        self.write(lambda db: db.execute(
            "INSERT INTO sync_state (thehive_id, kind, applied_ts) VALUES (?, ?, ?) "
            "ON CONFLICT (thehive_id) DO UPDATE SET applied_ts = CASE WHEN excluded.applied_ts > sync_state.applied_ts "
            "THEN excluded.applied_ts ELSE sync_state.applied_ts END",
            (thehive_id, kind, ts or 0)))

    def synced_tags(self, thehive_id: str) -> List[str]:
        row = self._row(thehive_id)
        return [] if row is None else json.loads(row["tags"])

    def set_synced_tags(self, thehive_id: str, kind: str, tags: Sequence[str]) -> None:
        self.write(lambda db: db.execute(
            "INSERT INTO sync_state (thehive_id, kind, applied_ts, tags) VALUES (?, ?, 0, ?) "
            "ON CONFLICT (thehive_id) DO UPDATE SET tags = excluded.tags",
            (thehive_id, kind, json.dumps(list(tags)))))

    def digest(self, thehive_id: str) -> Optional[str]:
        row = self._row(thehive_id)
        return None if row is None else row["digest"]

    def set_digest(self, thehive_id: str, kind: str, digest: Optional[str]) -> None:
        """Remember what was last written to ThreatQ for this object (None: write next time)."""
        self.write(lambda db: db.execute(
            "INSERT INTO sync_state (thehive_id, kind, applied_ts, digest) VALUES (?, ?, 0, ?) "
            "ON CONFLICT (thehive_id) DO UPDATE SET digest = excluded.digest", (thehive_id, kind, digest)))

    def hold_case(self, case_id: str, case: dict, ts: Optional[int]) -> None:
        """Keep the newest state of a case that waits for its first synced observable (one of
        unknown TheHive time, None, came later in TheHive's order of the case: it replaces)."""
        def hold(db: sqlite3.Connection) -> None:
            state.exclusive(db, f"hold:{case_id}")
            row = db.execute("SELECT applied_ts, held_case FROM sync_state WHERE thehive_id = ?",
                             (case_id,)).fetchone()
            held = json.loads(row["held_case"]) if row is not None and row["held_case"] else None
            if ts is not None and held is not None and held["ts"] > ts:
                return
            db.execute("INSERT INTO sync_state (thehive_id, kind, applied_ts, held_case) VALUES (?, 'case', 0, ?) "
                       "ON CONFLICT (thehive_id) DO UPDATE SET held_case = excluded.held_case",
                       (case_id, json.dumps({"ts": ts or 0, "case": case})))

        self.write(hold)

    def held_case(self, case_id: str) -> Optional[Tuple[dict, int]]:
        row = self._row(case_id)
        if row is None or not row["held_case"]:
            return None
        held = json.loads(row["held_case"])
        return held["case"], held["ts"]

    def record_capability(self, step: str, supported: bool, status: Optional[int] = None) -> None:
        """Remember whether ThreatQ serves an optional step (``meta``,
        ``threatq_capability:<step>``): told once per worker process by the ThreatQ client."""
        value = json.dumps({"state": "supported" if supported else "refused", "status": status, "at": time.time()})
        self.write(lambda db: state.set_meta(db, CAPABILITY_PREFIX + step, value))

    def capabilities(self) -> Dict[str, Capability]:
        return read_capabilities(self.db)

    def release_case(self, case_id: str) -> None:
        self.write(lambda db: db.execute("UPDATE sync_state SET held_case = NULL WHERE thehive_id = ?",
                                         (case_id,)))
