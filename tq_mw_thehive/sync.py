"""One inbox event → ThreatQ. The only place that knows the order of the steps.

Every step is idempotent, so an event can be redone after a crash, re-delivered by
TheHive or replayed from the dead letters without duplicating anything:
objects are looked up (in ``sync_state``, then in ThreatQ) before they are
created, attributes are set in place (one value per synced attribute), tags are
added when missing and removed only when we had synced them, and a link is
checked before it is added. ThreatQ's own de-duplication is undocumented and
never relied on. Events of one object are applied in TheHive's time order: an
event older than the newest one applied is skipped as ``stale``.

ThreatQ calls without public evidence (a source's TLP change, reading tags or sources
with their own call, removing a tag) are best effort: refused, they are skipped with a
warning (``ThreatQStepRefused``), and an event never becomes a dead letter for them.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from tq_mw_thehive.config import Config
from tq_mw_thehive.errors import PermanentError
from tq_mw_thehive.inbox import InboxItem
from tq_mw_thehive.mapping import (Attribute, CaseObject, IndicatorObject, case_title, case_title_prefix,
                                   case_consume_item, consume_item, map_case, map_observable)
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive import events
from tq_mw_thehive.thehive.api import TheHiveNotFound
from tq_mw_thehive.thehive.model import Case, Observable
from tq_mw_thehive.threatq.api import (ThreatQClient, ThreatQPermanentError, ThreatQStepRefused, attribute_name,
                                       record_type_id, source_pivot_id, source_tlp)
from tq_mw_thehive.type_mapping import TypeMapping

log = logging.getLogger(__name__)

CASE_ATTRIBUTES = frozenset({"TheHive Id", "Status", "Owner", "Case Id", "Severity", "PAP", "Flagged"})
INDICATOR_ATTRIBUTES = frozenset({"PAP", "Sighted?", "Indicator Of Compromise?"})
_KIND = {"events": "event", "incident": "incident"}


class PermanentSyncError(PermanentError):
    """The event cannot be applied however often it is retried: it goes to the dead letters."""


@dataclass
class Outcome:
    result: str                       # synced, held, stale, filtered, skipped, deleted, unlinked, not_in_threatq
    case_number: Optional[int] = None
    threatq: List[str] = field(default_factory=list)   # "events/12", "indicators/34"
    detail: str = ""


_HASH_TYPES = {"MD5", "SHA-1", "SHA-256", "SHA-384", "SHA-512"}


def enrichment_type(data_type: str, indicator_type: str) -> str:
    """The TheHive data type a plugin sees: a file's hashes are ``hash``, its name ``filename``."""
    if data_type != "file":
        return data_type
    return "hash" if indicator_type in _HASH_TYPES else "filename"


_LOCK_BUCKETS = 64


@contextlib.contextmanager
def _object_lock(directory: Path, key: str) -> Iterator[None]:
    """A lock shared by every process of this daemon (flock on one of a few files beside the state
    database), so that one ThreatQ object is looked up and created by one of them at a time."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % _LOCK_BUCKETS
    locks = directory / ".locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    with open(locks / f"{bucket}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def as_text(value: Any) -> Any:
    """``value`` (a decoded payload) with every lone surrogate replaced by U+FFFD.

    JSON may carry "\\ud800" alone; Python decodes it to a string that no UTF-8 encoder (SQLite,
    a log file, ThreatQ) accepts. It is text all the same: keep the rest of it, replace only
    what cannot be written."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {as_text(k): as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_text(v) for v in value]
    return value


def thehive_time(obj: Any) -> Optional[int]:
    """When TheHive last changed ``obj`` (ms, TheHive's clock): the time to order by when an
    event carries none, or for a case read from TheHive's API. None when it does not say."""
    if not isinstance(obj, dict):
        return None
    for key in ("_updatedAt", "updatedAt", "_createdAt", "createdAt"):
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def carried_object(payload: dict) -> Optional[dict]:
    """The case or observable an event carries: ``object`` when not empty, else ``details`` when it
    is a whole object (a create's, with its ``_id``); None for a thin update, whose ``details`` hold
    only the changed fields (TheHive 4's audits, TheHive 5 without ``object``): the sync then reads
    the object from TheHive instead of failing on a partial one."""
    obj = payload.get("object")
    if isinstance(obj, dict) and obj:
        return obj
    details = payload.get("details")
    if isinstance(details, dict) and (details.get("_id") or details.get("id")):
        return details
    return None


def _digest(value) -> str:
    """What was last sent for an object: equal digests mean nothing new to write (frozen dataclasses
    and lists of them have a stable repr)."""
    return hashlib.sha256(repr(value).encode("utf-8")).hexdigest()


def _now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


_INLINE_NEEDS: Dict[str, Callable[[dict], bool]] = {
    "attributes": lambda a: "id" in a and attribute_name(a) is not None,  # `name` or `attribute.name`
    "sources": lambda s: "name" in s,
    "tags": lambda t: "id" in t and "name" in t,
}


def _inline(record: Optional[dict]) -> Dict[str, List[dict]]:
    """The sub-resources ThreatQ put inline in ``record`` (``with=``), each only if well formed;
    what is missing is read with its own call. [guess] inline items are shaped like the lists."""
    known: Dict[str, List[dict]] = {}
    for name, well_formed in _INLINE_NEEDS.items():
        items = (record or {}).get(name)
        if isinstance(items, list) and all(isinstance(i, dict) and well_formed(i) for i in items):
            known[name] = items
    return known


def _or_read(known: Optional[Dict[str, List[dict]]], name: str, read: Callable[[], List[dict]]) -> List[dict]:
    """The sub-resource ``name`` as ThreatQ answered it inline, else read with its own call."""
    return known[name] if known and name in known else read()


def _or_read_optional(known: Optional[Dict[str, List[dict]]], name: str,
                      read: Callable[[], List[dict]]) -> Optional[List[dict]]:
    """As ``_or_read`` for a read without public evidence: ``None`` when ThreatQ refuses it."""
    try:
        return _or_read(known, name, read)
    except ThreatQStepRefused:
        return None


def _same_indicator(record: dict, value: str, type_id: int) -> bool:
    """Whether a record read by its stored id is still this indicator (value up to case, type)."""
    answered = record.get("value")
    return (isinstance(answered, str) and answered.casefold() == value.casefold()
            and record_type_id(record) in (None, type_id))


@dataclass(frozen=True)
class _Consumed:
    """What one consume call did for one new object."""

    tq_id: Optional[int] = None  # the object's id, when the answer named it
    answered: bool = False       # ThreatQ carried the call out: the object may exist without being named


_NOT_CONSUMED = _Consumed()


class _StoredIndicators:
    """The indicators the state database says an observable became, read by id (with their
    sub-resources inline) only when asked for: the id stored locally is trusted before any
    look-up by value. One that ThreatQ no longer has (404) is forgotten."""

    def __init__(self, sync: "Sync", obs_id: str) -> None:
        self.sync, self.obs_id = sync, obs_id
        self.ids = [tq_id for _, tq_id in sync.state.tq_ids(obs_id, "indicators")]
        self.records: Dict[int, Optional[dict]] = {}

    def take(self, value: str, type_id: int) -> Optional[dict]:
        for tq_id in list(self.ids):
            record = self._read(tq_id)
            if record is not None and _same_indicator(record, value, type_id):
                self.ids.remove(tq_id)
                return record
        return None

    def _read(self, tq_id: int) -> Optional[dict]:
        if tq_id not in self.records:
            try:
                self.records[tq_id] = self.sync.tq.get("indicators", tq_id, expand=True)
            except ThreatQPermanentError as exc:
                if exc.status != 404:
                    raise
                self.sync.state.forget(self.obs_id, "indicators", tq_id)
                self.records[tq_id] = None
        return self.records[tq_id]


class Sync:
    """Applies inbox events to ThreatQ; one per worker thread (the clients are not shared)."""

    def __init__(self, cfg: Config, threatq, thehive, state: SyncState, types: TypeMapping,
                 enricher=None, watches=None) -> None:
        self.cfg = cfg
        self.sync = cfg.sync
        self.tq = threatq
        self.thehive = thehive
        self.state = state
        self.types = types
        self.enricher = enricher
        self.watches = watches
        self.case_collection = "incident" if cfg.sync.cases_as == "incident" else "events"
        if isinstance(threatq, ThreatQClient) and threatq.on_capability is None:
            threatq.on_capability = state.record_capability  # for `check` and the status page

    # --- entry ----------------------------------------------------------------------------------

    def handle(self, item: InboxItem) -> Outcome:
        try:
            payload = as_text(json.loads(item.body))
            event = events.parse(payload)
        except (ValueError, events.PayloadError) as exc:
            raise PermanentSyncError(f"stored body is not a webhook event: {exc}") from None
        ts = event.timestamp_ms if event.timestamp_ms is not None else \
            thehive_time(payload.get("object") or payload.get("details"))
        if event.object_type == "case":
            return self._case_event(event, payload, ts)
        if event.object_type == "observable":
            return self._observable_event(event, payload, ts)
        return Outcome("skipped", detail=f"{event.raw_object_type} events are not synced")

    def _stale(self, thehive_id: str, ts: Optional[int]) -> bool:
        """Older than what was applied, by TheHive's clock only: an event without a TheHive time
        is never stale (our clock and TheHive's may differ by minutes, or by a time zone)."""
        applied = self.state.applied_ts(thehive_id)
        return ts is not None and applied is not None and ts < applied

    # --- cases ----------------------------------------------------------------------------------

    def _case_event(self, event: events.WebhookEvent, payload: dict, ts: Optional[int]) -> Outcome:
        case_id = event.object_id
        if event.action == "delete":
            return self._delete_case(case_id, payload.get("details") or {}, ts)
        obj = carried_object(payload)
        if obj is None:
            # A thin update (no object, details only the change): read the case as it is now.
            try:
                obj = self._fetch_case(case_id)
            except TheHiveNotFound:
                return Outcome("skipped", detail=f"case {case_id} is no longer in TheHive")
        case = Case.from_thehive(obj)
        if self._stale(case_id, ts):
            return Outcome("stale", case.number, detail="a newer change of this case was applied")
        if (not self.sync.include_cases_without_observables and not self.state.tq_ids(case_id)
                and not self.state.case_has_synced_observable(case_id)):
            self.state.hold_case(case_id, obj, ts)
            return Outcome("held", case.number, detail="no synced observable yet "
                           "(sync.include_cases_without_observables: false)")
        ref = self._upsert_case(case)
        self.state.mark_applied(case_id, "case", ts)
        return Outcome("synced", case.number, [f"{ref[0]}/{ref[1]}"])

    def _fetch_observable(self, obs_id: str, known_case: Optional[str]) -> Tuple[dict, Optional[str]]:
        """The observable as TheHive holds it now, and its case's id when it had to be asked for
        (``known_case``, from the event or the state, is None)."""
        if self.thehive is None:
            raise PermanentSyncError(f"observable {obs_id} is not in the event and no TheHive API key is "
                                     "configured (thehive.api_key)")
        obj = self.thehive.get_observable(obs_id)
        if known_case:
            return obj, None
        return obj, self.thehive.case_of_observable(obs_id)

    def _fetch_case(self, case_id: str) -> dict:
        if self.thehive is None:
            raise PermanentSyncError(f"case {case_id} is not in the event and no TheHive API key is "
                                     "configured (thehive.api_key)")
        return self.thehive.get_case(case_id)

    def _find_case_object(self, obj: CaseObject, case_id: str) -> Optional[int]:
        """The case's ThreatQ object by exact title, else by the title's fixed prefix (title changed)."""
        hit = self.tq.find_event(obj.title) if obj.collection == "events" else self.tq.find_incident(obj.title)
        if hit:
            return hit["id"]
        prefix = case_title_prefix(case_id)
        for result in self.tq.search(prefix):
            value = str(result.get("value") or "")
            if result.get("object") == _KIND[obj.collection] and (value == prefix or value.startswith(prefix + " ")):
                return result["id"]
        return None

    def _consume_case(self, obj: CaseObject) -> _Consumed:
        """Create a new case's event or incident with its attributes and tags in one consume call."""
        type_id = self.tq.event_type_id(obj.event_type) if obj.collection == "events" else None
        item = case_consume_item(obj, self._source(obj.tlp_id), type_id, obj.happened_at or _now_utc())
        return self._consumed(obj.collection, item, obj.title)

    def _consumed(self, collection: str, item: dict, what: str) -> _Consumed:
        """One consume call. Without an id the caller goes call by call: no such endpoint, or a
        400 (its item shape is partly a guess: the call-by-call path may be accepted, and if
        ThreatQ refuses that too, its error dead-letters the event). An answer that names no
        record for the object (``answered``) makes the caller look it up first: ThreatQ may
        well have made it."""
        try:
            records = self.tq.consume(collection, [item])
        except ThreatQPermanentError as exc:
            if exc.status != 400:
                raise
            log.warning("ThreatQ refused to consume %s %r (%s); creating it call by call", collection, what, exc)
            return _NOT_CONSUMED
        if records is None:
            return _NOT_CONSUMED
        if records[0] is None:
            log.warning("ThreatQ's answer to POST /api/%s/consume names no record for %r; looking it up",
                        collection, what)
            return _Consumed(answered=True)
        return _Consumed(int(records[0]["id"]), answered=True)

    def _create_case_object(self, obj: CaseObject) -> int:
        sources = [self._source(obj.tlp_id)]
        if obj.collection == "events":
            type_id = self.tq.event_type_id(obj.event_type)
            return self.tq.create_event(obj.title, type_id, obj.happened_at or _now_utc(), obj.description,
                                        sources)["id"]
        return self.tq.create_incident(obj.title, obj.description, sources)["id"]

    def _upsert_case(self, case: Case) -> Tuple[str, int]:
        obj = map_case(case, self.sync)
        existing = self.state.tq_ids(case.id, obj.collection)
        digest = _digest(obj)
        if existing and self.state.digest(case.id) == digest:
            return existing[0]  # TheHive changed nothing that ThreatQ shows: no call at all
        if obj.collection == "incident" and not self.tq.has_collection("incident"):
            raise PermanentSyncError("this ThreatQ instance has no incident object; "
                                     "set sync.cases_as: event or enable the object")
        tq_id = existing[0][1] if existing else self._find_case_object(obj, case.id)
        fresh = tq_id is None
        consumed = False
        if tq_id is None:
            tq_id, fresh, consumed = self._new_case_object(obj, case.id)
        self.state.record(case.id, "case", obj.collection, tq_id)
        known: Dict[str, List[dict]] = {}
        if not fresh:
            # The update answers with the sub-resources inline: no separate reads of them.
            if obj.collection == "events":
                fields = {"title": obj.title, "description": obj.description}
                if obj.happened_at:
                    fields["happened_at"] = obj.happened_at
                known = _inline(self.tq.update_event(tq_id, expand=True, **fields))
            else:
                known = _inline(self.tq.update_incident(tq_id, expand=True, value=obj.title,
                                                        description=obj.description))
            self._sync_source(obj.collection, tq_id, obj.tlp_id, known)
        if consumed:
            self.state.set_synced_tags(case.id, "case", obj.tags)
        else:
            self._sync_attributes(obj.collection, tq_id, obj.attributes, CASE_ATTRIBUTES, fresh, known=known)
            self._sync_tags(case.id, "case", obj.collection, tq_id, fresh, obj.tags, known=known)
        self.state.release_case(case.id)
        self.state.set_digest(case.id, "case", digest)
        return obj.collection, tq_id

    def _new_case_object(self, obj: CaseObject, case_id: str) -> Tuple[int, bool, bool]:
        """``(id, fresh, consumed)`` of a case's object that the look-up did not find: consumed in
        one call, else found after a consume whose answer did not name it, else created call by
        call."""
        result = self._consume_case(obj)
        if result.tq_id is not None:
            return result.tq_id, True, True
        found = self._find_case_object(obj, case_id) if result.answered else None
        if found is not None:
            return found, False, False
        return self._create_case_object(obj), True, False

    def _delete_case(self, case_id: str, details: dict, ts: Optional[int]) -> Outcome:
        number = details.get("number") if isinstance(details.get("number"), int) else None
        if self._stale(case_id, ts):
            return Outcome("stale", number)
        existing = self.state.tq_ids(case_id, self.case_collection)
        tq_id = existing[0][1] if existing else None
        if tq_id is None and isinstance(details.get("title"), str):
            probe = CaseObject(collection=self.case_collection, title=case_title(case_id, details["title"]),
                               event_type=None, description="", happened_at=None, tags=(), tlp_id=None,
                               attributes=())
            tq_id = self._find_case_object(probe, case_id)
        self.state.mark_applied(case_id, "case", ts)
        if tq_id is None:
            return Outcome("not_in_threatq", number, detail="the case never reached ThreatQ")
        # Intelligence is never deleted: the case's object stays, marked as deleted.
        self._sync_attributes(self.case_collection, tq_id, (Attribute("Status", "Deleted"),), {"Status"})
        self.state.set_digest(case_id, "case", None)
        return Outcome("deleted", number, [f"{self.case_collection}/{tq_id}"])

    def _ensure_case(self, case_id: str, embedded: Optional[dict], ts: Optional[int]) -> Tuple[str, int]:
        """The case's ThreatQ object; created first from the freshest state we have if missing."""
        existing = self.state.tq_ids(case_id, self.case_collection)
        if existing:
            return existing[0]
        held = self.state.held_case(case_id)
        if held is not None and (not embedded or ts is None or held[1] >= ts):
            obj, case_ts = held
        elif embedded:
            obj, case_ts = embedded, ts
        else:
            obj = self._fetch_case(case_id)
            case_ts = thehive_time(obj)
        ref = self._upsert_case(Case.from_thehive(obj))
        self.state.mark_applied(case_id, "case", case_ts)
        return ref

    # --- observables ------------------------------------------------------------------------------

    def _observable_event(self, event: events.WebhookEvent, payload: dict, ts: Optional[int]) -> Outcome:
        obs_id = event.object_id
        if event.action == "delete":
            return self._delete_observable(obs_id, event.case_id, ts)
        obj = carried_object(payload)
        fetched_case_id = None
        if obj is None:
            # A thin update (no object, details only the change): read the observable as it is now.
            known_case = event.case_id or self.state.case_of(obs_id)
            try:
                obj, fetched_case_id = self._fetch_observable(obs_id, known_case)
            except TheHiveNotFound:
                return Outcome("skipped", detail=f"observable {obs_id} is no longer in TheHive")
            if fetched_case_id is None and not known_case:
                return Outcome("skipped", detail=f"observable {obs_id} is in no case (an alert's)")
        observable = Observable.from_thehive(obj)
        case_id = observable.case_id or event.case_id or self.state.case_of(obs_id) or fetched_case_id
        embedded_case = obj.get("case") if isinstance(obj.get("case"), dict) else None
        number = embedded_case.get("number", embedded_case.get("caseId")) if embedded_case else None
        if not case_id:
            raise PermanentSyncError(f"observable {obs_id}: the event does not say which case it is in")
        if self._stale(obs_id, ts):
            return Outcome("stale", number, detail="a newer change of this observable was applied")
        already = self.state.tq_ids(obs_id, "indicators")
        if self.sync.only_ioc and not observable.ioc and not already:
            self.state.mark_applied(obs_id, "observable", ts)
            return Outcome("filtered", number, detail="not an IOC (sync.only_ioc: true)")
        mapped = map_observable(observable, self.types, status=self.sync.indicator_status)
        if not mapped.indicators:
            self.state.mark_applied(obs_id, "observable", ts)
            return Outcome("skipped", number, detail="; ".join(mapped.skipped))
        case_collection, case_tq_id = self._ensure_case(case_id, embedded_case, ts)
        refs = [f"{case_collection}/{case_tq_id}"]
        # Enrichment first (a cache hit costs no call): its answers are part of what must reach ThreatQ.
        plan = []
        for indicator in mapped.indicators:
            data_type = enrichment_type(observable.data_type, indicator.type)
            runs = self.enricher.run(data_type, indicator.value, observable.tlp, observable.pap) \
                if self.enricher is not None else []
            plan.append((indicator, data_type, runs))
            if observable.ioc and self.watches is not None and self.cfg.enrichment.auto_watch_ioc:
                self.watches.add(indicator.value, data_type, origin="ioc", tlp=observable.tlp, pap=observable.pap)
        digest = _digest((case_collection, case_tq_id, [(i, [(r.plugin, sorted(r.attributes.items()))
                                                             for r in runs]) for i, _, runs in plan]))
        if already and self.state.digest(obs_id) == digest:
            self.state.mark_applied(obs_id, "observable", ts)
            return Outcome("unchanged", number, refs + [f"indicators/{i}" for _, i in already],
                           detail="nothing to change in ThreatQ")
        enrichment: Dict[str, int] = defaultdict(int)
        stored = _StoredIndicators(self, obs_id)
        for indicator, data_type, runs in plan:
            # The same value can arrive in two cases at once, in two worker processes: its look-up,
            # create, attributes and link must not interleave (ThreatQ does not de-duplicate).
            with _object_lock(self.cfg.state_db.parent, f"indicator:{indicator.type}:{indicator.value}"):
                tq_id = self._sync_indicator(obs_id, case_id, indicator, runs, (case_collection, case_tq_id),
                                             mapped.indicators[0].tags, stored)
            for run in runs:
                enrichment[run.status] += 1
            refs.append(f"indicators/{tq_id}")
        self.state.set_synced_tags(obs_id, "observable", mapped.indicators[0].tags)
        self.state.mark_applied(obs_id, "observable", ts)
        self.state.set_digest(obs_id, "observable", digest)
        detail = "; ".join(list(mapped.skipped) + (
            ["enrichment " + ", ".join(f"{n} {s}" for s, n in sorted(enrichment.items()))] if enrichment else []))
        return Outcome("synced", number, refs, detail=detail)

    def _sync_indicator(self, obs_id: str, case_id: str, indicator: IndicatorObject, runs,
                        case_ref: Tuple[str, int], tags: Sequence[str], stored: _StoredIndicators) -> int:
        """One indicator of an observable, under its lock: the stored id first, else the look-up by
        value and type; a new one in one consume call, an existing one updated step by step."""
        type_id = self.tq.indicator_type_id(indicator.type)
        hit = stored.take(indicator.value, type_id) or self.tq.find_indicator(indicator.value, type_id, expand=True)
        fresh = hit is None
        if fresh:
            # A new one: one call carries it all, where the instance has the consume endpoint.
            result = self._consume(indicator, type_id, runs, case_ref, tags)
            if result.tq_id is not None:
                self.state.record(obs_id, "observable", "indicators", result.tq_id, case_id)
                return result.tq_id
            if result.answered:
                hit = self.tq.find_indicator(indicator.value, type_id, expand=True)
                fresh = hit is None
        known = _inline(hit)
        tq_id = self._upsert_indicator(indicator, type_id, hit, known)
        self.state.record(obs_id, "observable", "indicators", tq_id, case_id)
        self._sync_attributes("indicators", tq_id, indicator.attributes, INDICATOR_ATTRIBUTES, fresh, known=known)
        self._link(case_ref[0], case_ref[1], tq_id, fresh)
        touched = set(INDICATOR_ATTRIBUTES)
        for run in runs:
            if run.attributes:  # the snapshot only for names no earlier step changed
                unchanged = not touched & set(run.attributes)
                self.apply_enrichment("indicators", tq_id, run, known if unchanged else None)
                touched |= set(run.attributes)
        self._sync_tags(obs_id, "observable", "indicators", tq_id, fresh, tags, remember=False, known=known)
        return tq_id

    def apply_enrichment(self, collection: str, tq_id: int, run, known: Optional[Dict[str, List[dict]]] = None
                         ) -> None:
        attributes = [Attribute(name, value) for name, value in run.attributes.items()]
        self._sync_attributes(collection, tq_id, attributes, set(run.attributes), source=run.plugin, known=known)

    def _consume(self, ind: IndicatorObject, type_id: int, runs, case_ref: Tuple[str, int],
                 tags: Sequence[str]) -> _Consumed:
        """Create a new indicator with its attributes, enrichment, tags and case link in one
        consume call."""
        status_id = self.tq.indicator_status_id(ind.status)
        item = consume_item(replace(ind, tags=tuple(tags)), type_id, status_id, self._source(ind.tlp_id),
                            [(run.plugin, run.attributes) for run in runs if run.attributes],
                            {case_ref[0]: [case_ref[1]]})
        return self._consumed("indicators", item, ind.value)

    def _upsert_indicator(self, ind: IndicatorObject, type_id: int, hit: Optional[dict],
                          known: Optional[Dict[str, List[dict]]] = None) -> int:
        if hit is None:
            status_id = self.tq.indicator_status_id(ind.status)
            return self.tq.create_indicator(ind.value, type_id, status_id, ind.description,
                                            [self._source(ind.tlp_id)])["id"]
        tq_id = hit["id"]
        # The status is set at creation only: an analyst's later choice in ThreatQ stands.
        if (hit.get("description") or "") != ind.description:
            self.tq.update_indicator(tq_id, description=ind.description)
        self._sync_source("indicators", tq_id, ind.tlp_id, known)
        return tq_id

    def _link(self, case_collection: str, case_tq_id: int, indicator_id: int, fresh: bool = False) -> None:
        """Link the indicator to the case; one created a moment ago has no links to check."""
        if not fresh:
            linked = self.tq.links("indicators", indicator_id, case_collection)
            if any(link.get("id") == case_tq_id for link in linked):
                return
        self.tq.link(case_collection, case_tq_id, "indicators", indicator_id)

    def _delete_observable(self, obs_id: str, case_id: Optional[str], ts: Optional[int]) -> Outcome:
        if self._stale(obs_id, ts):
            return Outcome("stale")
        case_id = case_id or self.state.case_of(obs_id)
        indicators = self.state.tq_ids(obs_id, "indicators")
        case_ref = self.state.tq_ids(case_id, self.case_collection) if case_id else []
        self.state.mark_applied(obs_id, "observable", ts)
        if not indicators or not case_ref:
            return Outcome("not_in_threatq", detail="the observable never reached ThreatQ")
        case_collection, case_tq_id = case_ref[0]
        refs = []
        # The indicator stays (it is intelligence); only its link to this case goes.
        for _, indicator_id in indicators:
            pivots = [link["pivot"]["id"] for link in self.tq.links("indicators", indicator_id, case_collection)
                      if link.get("id") == case_tq_id and isinstance(link.get("pivot"), dict)]
            if pivots:
                self.tq.unlink("indicators", indicator_id, case_collection, pivots)
            refs.append(f"indicators/{indicator_id}")
        self.state.forget(obs_id)
        self.state.set_digest(obs_id, "observable", None)
        return Outcome("unlinked", threatq=refs)

    # --- shared steps ---------------------------------------------------------------------------

    def _source(self, tlp_id: Optional[int]) -> dict:
        source = {"name": self.cfg.threatq.source}
        if tlp_id is not None:
            source["tlp_id"] = tlp_id
        return source

    def _sync_source(self, collection: str, tq_id: int, tlp_id: Optional[int],
                     known: Optional[Dict[str, List[dict]]] = None) -> None:
        """Our source on the object, with TheHive's TLP where ThreatQ shows the source's TLP.

        The TLP is set when the object is created or consumed. Many answers show sources
        without it (link rows, SS): then it is left alone. Changing it (``PUT …/sources/{pivot}``)
        has no public evidence: tried only where a TLP really changed, best effort. Unreadable
        sources (not inline, ``GET …/sources`` refused) are left alone too."""
        name = self.cfg.threatq.source
        sources = _or_read_optional(known, "sources", lambda: self.tq.sources(collection, tq_id))
        if sources is None:
            return
        mine = next((s for s in sources if s.get("name") == name), None)
        if mine is None:
            self.tq.add_source(collection, tq_id, name, tlp_id)
            return
        shown, pivot = source_tlp(mine), source_pivot_id(mine)
        if tlp_id is None or shown is None or shown == tlp_id or pivot is None:
            return
        self._best_effort("source_tlp", f"{collection}/{tq_id}",
                          lambda: self.tq.set_source_tlp(collection, tq_id, pivot, tlp_id))

    @staticmethod
    def _best_effort(step: str, where: str, call: Callable[[], object]) -> bool:
        """Run an optional step; ``False`` when ThreatQ refused it. A refusal never fails the
        event: 404/405 was logged once by the client, anything else (400, 403, 409…) is logged
        here. An outage (``ThreatQUnavailable``) still retries the event, as for any call."""
        try:
            call()
        except ThreatQStepRefused:
            return False
        except ThreatQPermanentError as exc:
            log.warning("optional ThreatQ step %s failed for %s (%s); carrying on without it", step, where, exc)
            return False
        return True

    def _sync_attributes(self, collection: str, tq_id: int, desired: Iterable[Attribute],
                         managed: Iterable[str], fresh: bool = False, source: Optional[str] = None,
                         known: Optional[Dict[str, List[dict]]] = None) -> None:
        """Exactly one value per synced attribute, changed in place; ours that went away are removed.

        ``known``: the object's sub-resources as ThreatQ answered them inline, read before any
        change of this event; valid for ``managed`` names no earlier step of the event changed.
        """
        managed = set(managed)
        have: Dict[str, List[dict]] = defaultdict(list)
        if not fresh:
            for attribute in _or_read(known, "attributes", lambda: self.tq.attributes(collection, tq_id)):
                name = attribute_name(attribute)
                if name in managed:
                    have[name].append(attribute)
        for attribute in desired:
            current = have.pop(attribute.name, [])
            if not current:
                if source:
                    self.tq.add_attribute(collection, tq_id, attribute.name, attribute.value,
                                          sources=[{"name": source}])
                else:
                    self.tq.add_attribute(collection, tq_id, attribute.name, attribute.value)
                continue
            keep = next((a for a in current if a.get("value") == attribute.value), None)
            if keep is None:
                keep = current[0]
                self.tq.update_attribute(collection, tq_id, keep["id"], attribute.value)
            for extra in current:
                if extra is not keep:
                    self.tq.delete_attribute(collection, tq_id, extra["id"])
        for leftovers in have.values():
            for attribute in leftovers:
                self.tq.delete_attribute(collection, tq_id, attribute["id"])

    def _sync_tags(self, thehive_id: str, kind: str, collection: str, tq_id: int, fresh: bool,
                   desired: Sequence[str], remember: bool = True,
                   known: Optional[Dict[str, List[dict]]] = None) -> None:
        """Add TheHive's tags; remove those we synced before and TheHive no longer has.

        Reading tags with their own call and removing one have no public evidence: with tags
        neither inline nor readable, the tags not synced before are added and none is removed;
        with removal refused, the tags stay."""
        previous = set(self.state.synced_tags(thehive_id))
        tags = [] if fresh else _or_read_optional(known, "tags", lambda: self.tq.tags(collection, tq_id))
        existing = None if tags is None else {t.get("name"): t.get("id") for t in tags}
        missing = [t for t in desired if t not in (previous if existing is None else existing)]
        if missing:
            self.tq.add_tags(collection, tq_id, missing)
        for name in sorted(previous - set(desired)):
            if existing and name in existing and not self._best_effort(
                    "tag_delete", f"{collection}/{tq_id}",
                    lambda tag_id=existing[name]: self.tq.delete_tag(collection, tq_id, tag_id)):
                break
        if remember:
            self.state.set_synced_tags(thehive_id, kind, desired)
