"""Watched IOCs, re-checked on a schedule, so a verdict that changes overnight reaches ThreatQ.

``tq-mw-thehive monitor`` runs the plugins again for every due watch, bypassing the
cache and keeping to each plugin's ``RATE_LIMIT_PER_MIN``; a result that changed
updates the indicator's attributes in ThreatQ and logs one line
``changed <value> <plugin> <field>: old -> new``.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time
import unicodedata
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Set
from urllib.parse import urlsplit

from tq_mw_thehive import logs, state
from tq_mw_thehive.enrichment.cache import normalise
from tq_mw_thehive.enrichment.pacing import Pacer
from tq_mw_thehive.enrichment.runner import Enricher
from tq_mw_thehive.threatq.api import ThreatQError
from tq_mw_thehive.type_mapping import DEFAULT_RULES, HASH_TYPES, TypeMapping

if TYPE_CHECKING:
    from tq_mw_thehive.enrichment.registry import PluginInfo
    from tq_mw_thehive.threatq.objects import ThreatQObjects

log = logging.getLogger(__name__)
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
THEHIVE_TYPES = frozenset(DEFAULT_RULES) | {"other", "regexp"}   # TheHive's default dataTypes


def guess_type(value: str) -> str:
    """The TheHive data type a bare value most likely is (for ``watch add`` without ``--type``)."""
    value = value.strip()
    try:
        ipaddress.ip_address(value)
        return "ip"
    except ValueError:
        pass
    if "://" in value:
        return "url"
    if len(value) in HASH_TYPES and _HEX.match(value):
        return "hash"
    if "@" in value:
        return "mail"
    return "domain"


def watchable_types(mapping: TypeMapping, plugins: Iterable["PluginInfo"]) -> Set[str]:
    """The data types ``watch add --type`` takes: TheHive's, the type mapping's and the plugins'."""
    return set(THEHIVE_TYPES) | set(mapping.rules) | {t for p in plugins for t in p.data_types}


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _is_hostname(value: str) -> bool:
    """RFC 1123 labels (underscores allowed, as in ``_dmarc``; IDN through its ASCII form),
    and a last label that is not a number, so that an IP address is not taken for a domain."""
    try:
        name = value[:-1] if value.endswith(".") else value
        labels = name.encode("idna").decode("ascii").split(".")
    except UnicodeError:
        return False
    return len(name) <= 253 and all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def _is_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return bool(parts.scheme and parts.hostname) and not any(c.isspace() for c in value)
    except ValueError:  # e.g. an unclosed [IPv6] host
        return False


def _is_mail(value: str) -> bool:
    local, at, domain = value.rpartition("@")
    return bool(at and local.strip()) and not any(c.isspace() for c in local) and _is_hostname(domain)


_VALID = {
    "ip": (_is_ip, "an IPv4 or IPv6 address"),
    "domain": (_is_hostname, "a host name such as example.org"),
    "fqdn": (_is_hostname, "a host name such as www.example.org"),
    "hostname": (_is_hostname, "a host name such as www.example.org"),
    "url": (_is_url, "a URL with a scheme and a host, such as https://example.org/path"),
    "hash": (lambda v: bool(_HEX.match(v)) and len(v) in HASH_TYPES,
             "hexadecimal with " + ", ".join(f"{n} ({t})" for n, t in HASH_TYPES.items()) + " digits"),
    "mail": (_is_mail, "an address with a local part and a domain, such as soc@example.org"),
}


def check_value(data_type: str, value: str) -> None:
    """``ValueError`` saying why ``value`` cannot be a ``data_type`` value.

    A watch is looked up, perhaps at a cost, every interval for as long as it stays: a typo
    or a value of another type would be checked forever without ever meaning anything.
    """
    value = value.strip()
    if not value:
        raise ValueError("the value is empty")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError(f"{value!r} contains control characters")
    valid, expected = _VALID.get(data_type, (None, ""))
    if valid is not None and not valid(value):
        raise ValueError(f"{value!r} is not a valid {data_type} value: expected {expected}")


class WatchList(state.Store):
    """Table ``watches`` (migration 3)."""

    def __init__(self, path, busy_timeout: float = state.BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock

    def add(self, value: str, data_type: str, *, interval_s: Optional[float] = None, origin: str = "manual",
            tlp: Optional[str] = None, pap: Optional[str] = None, default_interval_s: float = 86400.0) -> bool:
        """Watch ``value``; True if it was not watched. A manual add updates an existing watch:
        what it does not give (interval, TLP, PAP) stays; a new watch without TLP/PAP is AMBER.

        A new manual watch is due at once, so the next ``monitor`` pass checks it (whoever adds
        one wants an answer now, not after a day); one added by the sync (``origin="ioc"``) was
        just enriched, so its first re-check waits an interval."""
        now = self.clock()
        value = normalise(data_type, value)

        def upsert(db) -> bool:
            state.exclusive(db, f"watch:{data_type}:{value}")
            exists = db.execute("SELECT interval_s FROM watches WHERE value = ? AND data_type = ?",
                                (value, data_type)).fetchone()
            if exists and origin != "manual":
                return False
            if exists:
                interval = interval_s or exists["interval_s"]
                db.execute("UPDATE watches SET interval_s = ?, next_due = CASE WHEN next_due < ? THEN next_due ELSE ? END, origin = 'manual', "
                           "tlp = COALESCE(?, tlp), pap = COALESCE(?, pap) WHERE value = ? AND data_type = ?",
                           (interval, now + interval, now + interval, tlp, pap, value, data_type))
                return False
            interval = interval_s or default_interval_s
            first_due = now if origin == "manual" else now + interval
            db.execute("INSERT INTO watches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (value, data_type, interval, first_due, now, origin, tlp or "AMBER", pap or "AMBER"))
            return True

        return self.write(upsert)

    def remove(self, value: str, data_type: Optional[str] = None) -> int:
        def delete(db) -> int:
            if data_type:
                return db.execute("DELETE FROM watches WHERE value = ? AND data_type = ?",
                                  (normalise(data_type, value), data_type)).rowcount
            return db.execute("DELETE FROM watches WHERE value IN (?, ?)",
                              (value.strip(), normalise(guess_type(value), value))).rowcount
        return self.write(delete)

    def listing(self) -> List[Dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM watches ORDER BY next_due, value")]

    def due(self) -> List[Dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM watches WHERE next_due <= ? ORDER BY next_due",
                                                 (self.clock(),))]

    def reschedule(self, value: str, data_type: str, interval_s: float) -> None:
        self.write(lambda db: db.execute("UPDATE watches SET next_due = ? WHERE value = ? AND data_type = ?",
                                         (self.clock() + interval_s, value, data_type)))


class Monitor:
    """One pass over the due watches; with ``objects`` (``threatq.objects.ThreatQObjects``) and the
    type mapping, a changed answer is written to ThreatQ as the sync writes it, under the same
    per-indicator lock as a worker applying an event of that indicator."""

    def __init__(self, enricher: Enricher, watches: WatchList, objects: Optional["ThreatQObjects"] = None,
                 types: Optional[TypeMapping] = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 on_verdict: Optional[Callable[[List[int], str, Optional[str]], None]] = None) -> None:
        self.enricher = enricher
        self.watches = watches
        self.objects = objects
        self.types = types
        # Told (indicator ids written, plugin, new verdict) after a change lands: write-back's verdict tags.
        self.on_verdict = on_verdict
        self.pacer = Pacer(clock, sleep)

    def run_once(self) -> Dict[str, int]:
        counts = {"checked": 0, "changed": 0, "errors": 0}
        for watch in self.watches.due():
            counts["checked"] += 1
            try:
                self._check(watch, counts)
            finally:  # a watch that failed waits its interval too, never loops on every run
                self.watches.reschedule(watch["value"], watch["data_type"], watch["interval_s"])
        return counts

    def _check(self, watch: Dict, counts: Dict[str, int]) -> None:
        max_tlp = self.enricher.cfg.logs.max_tlp_values
        with logs.withholding(max_tlp) as withheld:  # also in a ThreatQ error quoting the value
            withheld.add([watch["value"]], watch["tlp"])
            self._check_plugins(watch, counts, logs.loggable(watch["value"], watch["tlp"], max_tlp))

    def _check_plugins(self, watch: Dict, counts: Dict[str, int], shown: str) -> None:
        value, data_type = watch["value"], watch["data_type"]
        for plugin in self.enricher.plugins_for(data_type):
            before = self.enricher.cache.latest(plugin.name, plugin.version, data_type, value)
            self.pacer.wait(plugin, self.enricher.limits(plugin).per_minute)
            runs = self.enricher.run(data_type, value, watch["tlp"], watch["pap"], bypass_cache=True,
                                     only=plugin.name, origin="monitor")
            run = runs[0] if runs else None
            if run is not None and run.status == "deferred":  # over quota: the daemon's drainer settles it
                counts["deferred"] = counts.get("deferred", 0) + 1
                continue
            self.settle(value, data_type, before, run, counts, shown)

    def settle(self, value: str, data_type: str, before, run, counts: Dict[str, int], shown: str,
               first: bool = False) -> bool:
        """A re-check's answer against the cached one (``before``): each changed field logged,
        the indicator updated in ThreatQ. ``first``: a case's lookup that waited for quota, whose
        answer is new, not changed: one line, and written whatever it says. False when ThreatQ
        could not be updated."""
        if run is not None and run.status == "error":
            counts["errors"] += 1
        if run is None or run.status not in ("fetched", "not_found", "cached"):
            return True
        old = dict(before.attributes, **({f"{run.title} Verdict": before.verdict or "info"}
                                         if before and before.found else {})) if before else {}
        changed = {k for k in set(old) | set(run.attributes) if old.get(k) != run.attributes.get(k)}
        if first:
            log.info("enrichment %s %s value=%s outcome=%s after waiting for quota", run.plugin, data_type, shown,
                     run.status)
        else:
            for field in sorted(changed):
                log.info("changed %s %s %s: %s -> %s", shown, run.plugin, field,
                         old.get(field, "-"), run.attributes.get(field, "-"))
        if changed or (first and run.attributes):
            counts["changed"] += 1
            try:
                written = self._push(value, data_type, run)
                if first and self.objects is not None and not written:
                    return False  # the sync has not written the indicator yet: the drainer tries later
            except ThreatQError as exc:
                counts["errors"] += 1
                log.warning("monitor: cannot update %s in ThreatQ (%s); the change is in the cache "
                            "and the log", shown, exc)
                return False
        return True

    def _push(self, value: str, data_type: str, run) -> List[int]:
        """Set the new attributes on the ThreatQ indicators with this value (there may be none yet);
        the ids written."""
        if self.objects is None or not run.attributes:
            return []
        written = self.objects.enrich_by_value(self._threatq_types(data_type, value), value, run)
        if written and self.on_verdict is not None:
            self.on_verdict(written, run.plugin, run.verdict if run.status in ("fetched", "cached") else None)
        return written

    def _threatq_types(self, data_type: str, value: str) -> List[str]:
        if data_type == "filename":
            return ["Filename"]
        if self.types is None:
            return []
        resolved, _ = self.types.resolve(data_type, value)
        return [resolved] if resolved else []
