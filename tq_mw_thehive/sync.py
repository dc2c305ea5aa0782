"""One inbox event → ThreatQ. The only place that knows the order of the steps.

Every step is idempotent, so an event can be redone after a crash, re-delivered by
TheHive or replayed from the dead letters without duplicating anything: objects are
looked up (in ``sync_state``, then in ThreatQ) before they are created, and
``threatq/objects.py`` brings each one to its desired state (attributes in place, tags
removed only when we had synced them, a link checked before it is added). ThreatQ's own
de-duplication is undocumented and never relied on. Events of one object are applied in
TheHive's time order: an event older than the newest one applied is skipped as ``stale``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from tq_mw_thehive.config import Config, shared_state
from tq_mw_thehive.errors import PermanentError
from tq_mw_thehive.inbox import InboxItem
from tq_mw_thehive.mapping import (Attribute, CaseObject, IndicatorObject, case_title, case_title_prefix,
                                   case_consume_item, consume_item, enrichment_type, map_alert, map_case,
                                   map_observable)
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive import events
from tq_mw_thehive.thehive.api import TheHiveNotFound
from tq_mw_thehive.thehive.model import Alert, Case, Observable
from tq_mw_thehive.threatq.api import ThreatQClient
from tq_mw_thehive.threatq.objects import Known, StoredIndicators, ThreatQObjects, Upsert, indicator_key, inline
from tq_mw_thehive.type_mapping import TypeMapping
from tq_mw_thehive.writeback import case_tags, case_url, observable_tags, theirs

log = logging.getLogger(__name__)

CASE_ATTRIBUTES = frozenset({"TheHive Id", "Status", "Owner", "Case Id", "Severity", "PAP", "Flagged"})
ALERT_ATTRIBUTES = frozenset({"TheHive Id", "Status", "Severity", "PAP", "Alert Type", "Alert Source",
                              "Alert Source Ref"})
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

    def note(self, text: str) -> None:
        self.detail = f"{self.detail}; {text}" if self.detail else text


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


@functools.lru_cache(maxsize=4)
def decoded(body: str) -> Any:
    """A stored body, decoded once for the several readers of one event (the worker's log
    scope, its coalescing check, the sync). Read-only: ``as_text`` builds the sync's own copy.
    ``ValueError`` when it is not JSON."""
    return json.loads(body)


def enrichment_key(observable: Observable, indicator: IndicatorObject) -> tuple:
    """What an indicator's plugin runs depend on: (data type as plugins see it, value, TLP, PAP)."""
    return enrichment_type(observable.data_type, indicator.type), indicator.value, observable.tlp, observable.pap


def carries_object(body: str) -> bool:
    """Whether a stored event carries its object's whole state (``object``), not only a diff:
    a later one that does may be applied in place of the ones before it."""
    try:
        payload = decoded(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("object"), dict) and bool(payload["object"])


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


def _detail(skipped: Sequence[str], plan: List[Tuple[IndicatorObject, list]]) -> str:
    """An observable's log detail: what was not mapped, and the enrichment runs by status."""
    enrichment: Dict[str, int] = defaultdict(int)
    for _, runs in plan:
        for run in runs:
            enrichment[run.status] += 1
    shown = ["enrichment " + ", ".join(f"{n} {s}" for s, n in sorted(enrichment.items()))] if enrichment else []
    return "; ".join(list(skipped) + shown)


def _now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


@dataclass(frozen=True)
class PendingObservable:
    """An observable create or update whose indicators are still to be written."""

    obs_id: str
    case_id: str
    case_ref: Tuple[str, int]            # the case's ThreatQ object
    number: Optional[int]                # the case number, for the log line
    ts: Optional[int]
    tags: Tuple[str, ...]
    plan: List[Tuple[IndicatorObject, list]]   # each indicator with its enrichment runs
    stored_ids: List[int]                # the indicators the state database has for it
    digest: str
    skipped: Tuple[str, ...]             # what the mapping could not map
    synced_tags: List[str]


class Sync:
    """Applies inbox events to ThreatQ; one per worker thread (the clients are not shared)."""

    def __init__(self, cfg: Config, threatq, thehive, state: SyncState, types: TypeMapping,
                 enricher=None, watches=None, outbox=None) -> None:
        self.cfg = cfg
        self.sync = cfg.sync
        self.tq = threatq
        self.thehive = thehive
        self.state = state
        self.types = types
        self.enricher = enricher
        self.watches = watches
        self.case_collection = "incident" if cfg.sync.cases_as == "incident" else "events"
        # writeback.enabled: what landed is recorded for TheHive (writeback.Outbox); None: off.
        self.outbox = outbox
        self.prefix = cfg.writeback.tag_prefix
        self.objects = ThreatQObjects(threatq, cfg.threatq.source, cfg.local_dir, shared_state(cfg))
        if isinstance(threatq, ThreatQClient) and threatq.on_capability is None:
            threatq.on_capability = state.record_capability  # for `check` and the status page

    # --- entry ----------------------------------------------------------------------------------

    def handle(self, item: InboxItem) -> Outcome:
        return self.apply(*self.parse(item))

    def handle_batch(self, items: Sequence[InboxItem]) -> list:
        """Several queued events of one case in one go (``sync_batch``)."""
        from tq_mw_thehive.sync_batch import handle_batch  # it builds on this module
        return handle_batch(self, items)

    def parse(self, item: InboxItem) -> Tuple[events.WebhookEvent, dict, Optional[int]]:
        """The stored event, its payload and its TheHive time (``PermanentSyncError`` if unreadable)."""
        try:
            payload = as_text(decoded(item.body))
            event = events.parse(payload, alerts=self.sync.alerts)
        except (ValueError, events.PayloadError) as exc:
            raise PermanentSyncError(f"stored body is not a webhook event: {exc}") from None
        ts = event.timestamp_ms if event.timestamp_ms is not None else \
            thehive_time(payload.get("object") or payload.get("details"))
        return event, payload, ts

    def apply(self, event: events.WebhookEvent, payload: dict, ts: Optional[int]) -> Outcome:
        if event.object_type == "case":
            return self._case_event(event, payload, ts)
        if event.object_type == "observable":
            return self._observable_event(event, payload, ts)
        if event.object_type == "alert" and self.sync.alerts:
            return self._alert_event(event, payload, ts)
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
        case = self.case_of(obj)
        if self._stale(case_id, ts):
            return Outcome("stale", case.number, detail="a newer change of this case was applied")
        if (not self.sync.include_cases_without_observables and not self.state.tq_ids(case_id)
                and not self.state.case_has_synced_observable(case_id)):
            self.state.hold_case(case_id, obj, ts)
            return Outcome("held", case.number, detail="no synced observable yet "
                           "(sync.include_cases_without_observables: false)")
        ref = self._upsert_case(case)
        self.state.mark_applied(case_id, "case", ts)
        self._tell_case(case_id, ref)
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

    def _case_upsert(self, obj: CaseObject, case_id: str) -> Upsert:
        """How a case's event or incident is made and updated."""
        events_ = obj.collection == "events"

        def consume_item() -> dict:
            type_id = self.tq.event_type_id(obj.event_type) if events_ else None
            return case_consume_item(obj, self.objects.source(obj.tlp_id), type_id, obj.happened_at or _now_utc())

        def find() -> Optional[dict]:
            found = self._find_case_object(obj, case_id)
            return None if found is None else {"id": found}

        def create() -> int:
            sources = [self.objects.source(obj.tlp_id)]
            if events_:
                return self.tq.create_event(obj.title, self.tq.event_type_id(obj.event_type),
                                            obj.happened_at or _now_utc(), obj.description, sources)["id"]
            return self.tq.create_incident(obj.title, obj.description, sources)["id"]

        def update(hit: dict) -> Known:
            # The update answers with the sub-resources inline: no separate reads of them.
            if events_:
                fields = {"title": obj.title, "description": obj.description}
                if obj.happened_at:
                    fields["happened_at"] = obj.happened_at
                return inline(self.tq.update_event(hit["id"], expand=True, **fields))
            return inline(self.tq.update_incident(hit["id"], expand=True, value=obj.title,
                                                  description=obj.description))

        return Upsert(obj.collection, obj.title, obj.tlp_id, consume_item, find, create, update)

    def _upsert_case(self, case: Case) -> Tuple[str, int]:
        obj = map_case(case, self.sync)
        existing = self.state.tq_ids(case.id, obj.collection)
        digest = _digest(obj)
        if existing and self.state.digest(case.id) == digest:
            return existing[0]  # TheHive changed nothing that ThreatQ shows: no call at all
        if obj.collection == "incident" and not self.tq.has_collection("incident"):
            raise PermanentSyncError("this ThreatQ instance has no incident object; "
                                     "set sync.cases_as: event or enable the object")
        with self.objects.lock(f"case:{case.id}"):
            tq_id = existing[0][1] if existing else self._find_case_object(obj, case.id)
            written = self.objects.upsert(self._case_upsert(obj, case.id), None if tq_id is None else {"id": tq_id})
            self.state.record(case.id, "case", obj.collection, written.tq_id)
            self.objects.reconcile(written, obj.attributes, CASE_ATTRIBUTES, obj.tags, self.state.synced_tags(case.id))
        self.state.set_synced_tags(case.id, "case", obj.tags)
        self.state.release_case(case.id)
        self.state.set_digest(case.id, "case", digest)
        return obj.collection, written.tq_id

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
        with self.objects.lock(f"case:{case_id}"):
            self.objects.sync_attributes(self.case_collection, tq_id, (Attribute("Status", "Deleted"),), {"Status"})
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
        ref = self._upsert_case(self.case_of(obj))
        self.state.mark_applied(case_id, "case", case_ts)
        self._tell_case(case_id, ref)
        return ref

    # --- alerts (sync.alerts) ------------------------------------------------------------------------

    def _alert_event(self, event: events.WebhookEvent, payload: dict, ts: Optional[int]) -> Outcome:
        """An alert becomes an event of ``sync.alert_event_type``; once TheHive imports or merges it
        into a case, its event and indicators are linked to the case's object (not made again)."""
        alert_id = event.object_id
        if event.action == "delete":
            self.state.mark_applied(alert_id, "case", ts)
            return Outcome("skipped", detail="a deleted alert's ThreatQ event stays (intelligence is never deleted)")
        obj = carried_object(payload)
        if obj is not None and str(obj.get("_type", "alert")).lower() != "alert":
            obj = None  # TheHive 4's alert update on import carries the case as its object (AuditSrv)
        if obj is None:
            try:
                obj = self._fetch_alert(alert_id)
            except TheHiveNotFound:
                return Outcome("skipped", detail=f"alert {alert_id} is no longer in TheHive")
        alert = Alert.from_thehive(obj)
        details = payload.get("details") if isinstance(payload.get("details"), dict) else {}
        if alert.case_id is None and isinstance(details.get("caseId"), str):
            alert = replace(alert, case_id=details["caseId"])
        alert = replace(alert, tags=theirs(alert.tags, self.prefix))
        if self._stale(alert_id, ts):
            return Outcome("stale", detail="a newer change of this alert was applied")
        ref = self._upsert_alert(alert)
        self.state.mark_applied(alert_id, "case", ts)
        refs = [f"{ref[0]}/{ref[1]}"]
        if alert.case_id:
            case_ref = self._ensure_case(alert.case_id, None, None)
            self._link_alert_to_case(alert.id, ref, case_ref)
            refs.append(f"{case_ref[0]}/{case_ref[1]}")
        return Outcome("synced", threatq=refs, detail=f"alert, in case {alert.case_id}" if alert.case_id else "alert")

    def _fetch_alert(self, alert_id: str) -> dict:
        if self.thehive is None:
            raise PermanentSyncError(f"alert {alert_id} is not in the event and no TheHive API key is "
                                     "configured (thehive.api_key)")
        return self.thehive.get_alert(alert_id)

    def _upsert_alert(self, alert: Alert) -> Tuple[str, int]:
        obj = map_alert(alert, self.sync)
        existing = self.state.tq_ids(alert.id, "events")
        digest = _digest((obj, alert.case_id))
        if existing and self.state.digest(alert.id) == digest:
            return existing[0]  # nothing new: no call at all
        with self.objects.lock(f"case:{alert.id}"):
            tq_id = existing[0][1] if existing else self._find_case_object(obj, alert.id)
            written = self.objects.upsert(self._case_upsert(obj, alert.id), None if tq_id is None else {"id": tq_id})
            self.state.record(alert.id, "case", "events", written.tq_id)
            self.objects.reconcile(written, obj.attributes, ALERT_ATTRIBUTES, obj.tags, self.state.synced_tags(alert.id))
        self.state.set_synced_tags(alert.id, "case", obj.tags)
        self.state.set_digest(alert.id, "case", digest)
        return "events", written.tq_id

    def _ensure_alert(self, alert_id: str, embedded: Optional[dict], ts: Optional[int]) -> Tuple[str, int]:
        """The alert's ThreatQ event, made first from the embedded alert (or TheHive's) if missing."""
        existing = self.state.tq_ids(alert_id, "events")
        if existing:
            return existing[0]
        obj = embedded if embedded and embedded.get("_id") else self._fetch_alert(alert_id)
        alert = Alert.from_thehive(obj)
        ref = self._upsert_alert(replace(alert, tags=theirs(alert.tags, self.prefix)))
        self.state.mark_applied(alert_id, "case", ts if embedded else thehive_time(obj))
        return ref

    def _link_alert_to_case(self, alert_id: str, alert_ref: Tuple[str, int], case_ref: Tuple[str, int]) -> None:
        """The alert's event and indicators, linked to the case's object: TheHive copies the
        observables into the case, and their values find these same indicators."""
        if not any(link.get("id") == case_ref[1] for link in self.tq.links(alert_ref[0], alert_ref[1], case_ref[0])):
            self.tq.link(alert_ref[0], alert_ref[1], case_ref[0], case_ref[1])
        for indicator_id in self.state.indicators_in(alert_id):
            self.objects.link(case_ref[0], case_ref[1], indicator_id)

    # --- observables ------------------------------------------------------------------------------

    def _observable_event(self, event: events.WebhookEvent, payload: dict, ts: Optional[int]) -> Outcome:
        if event.action == "delete":
            return self._delete_observable(event.object_id, event.case_id, ts)
        pending = self.observable_to_write(event, payload, ts)
        if isinstance(pending, Outcome):
            return pending
        return self.observable_written(pending, self.write_indicators(pending))

    def observable_to_write(self, event: events.WebhookEvent, payload: dict, ts: Optional[int],
                            enriched: Optional[Dict[tuple, list]] = None) -> Union[Outcome, "PendingObservable"]:
        """Everything of an observable's create or update short of writing its indicators: the
        outcome when there is nothing to write (stale, filtered, unchanged…), else what to write.
        ``enriched``: plugin runs already made, by ``enrichment_key`` (a batch runs them together).
        Its case's object is made first, if missing."""
        obs_id = event.object_id
        found = self._observable_now(event, payload)
        if isinstance(found, Outcome):
            return found
        obj, fetched_case_id = found
        observable = self.observable_of(obj)
        case_id = observable.case_id or event.case_id or self.state.case_of(obs_id) or fetched_case_id
        embedded_case = obj.get("case") if isinstance(obj.get("case"), dict) else None
        number = embedded_case.get("number", embedded_case.get("caseId")) if embedded_case else None
        if not case_id:
            raise PermanentSyncError(f"observable {obs_id}: the event does not say which case it is in")
        if self._stale(obs_id, ts):
            return Outcome("stale", number, detail="a newer change of this observable was applied")
        already = self.state.tq_ids(obs_id, "indicators")
        mapped = map_observable(observable, self.types, status=self.sync.indicator_status)
        skipped = self._not_synced(observable, mapped, already)
        if skipped:
            self.state.mark_applied(obs_id, "observable", ts)
            return Outcome(skipped[0], number, detail=skipped[1])
        if event.alert_id:
            embedded_alert = obj.get("alert") if isinstance(obj.get("alert"), dict) else None
            case_ref = self._ensure_alert(event.alert_id, embedded_alert, ts)
        else:
            case_ref = self._ensure_case(case_id, embedded_case, ts)
        plan = self._enrich(observable, mapped.indicators, enriched or {})
        digest = _digest((*case_ref, [(i, [(r.plugin, sorted(r.attributes.items())) for r in runs])
                                      for i, runs in plan]))
        if already and self.state.digest(obs_id) == digest:
            self.state.mark_applied(obs_id, "observable", ts)
            self._tell_observable(obs_id, [i for _, i in already], plan)
            refs = [f"{case_ref[0]}/{case_ref[1]}"] + [f"indicators/{i}" for _, i in already]
            return Outcome("unchanged", number, refs, detail="nothing to change in ThreatQ")
        return PendingObservable(obs_id, case_id, case_ref, number, ts, mapped.indicators[0].tags, plan,
                                 [i for _, i in already], digest, tuple(mapped.skipped),
                                 self.state.synced_tags(obs_id))

    def observable_written(self, pending: "PendingObservable", indicator_ids: Sequence[int]) -> Outcome:
        """Once its indicators are in ThreatQ: what was synced is remembered; the outcome."""
        self.state.set_synced_tags(pending.obs_id, "observable", pending.tags)
        self.state.mark_applied(pending.obs_id, "observable", pending.ts)
        self.state.set_digest(pending.obs_id, "observable", pending.digest)
        self._tell_observable(pending.obs_id, indicator_ids, pending.plan)
        refs = [f"{pending.case_ref[0]}/{pending.case_ref[1]}"] + [f"indicators/{i}" for i in indicator_ids]
        return Outcome("synced", pending.number, refs, detail=_detail(pending.skipped, pending.plan))

    # --- TheHive's own view: the daemon's tags stay out of ThreatQ, what landed is told back -----

    def case_of(self, obj: Any) -> Case:
        case = Case.from_thehive(obj)
        return replace(case, tags=theirs(case.tags, self.prefix))

    def observable_of(self, obj: Any) -> Observable:
        observable = Observable.from_thehive(obj)
        return replace(observable, tags=theirs(observable.tags, self.prefix))

    def _tell_case(self, case_id: str, ref: Tuple[str, int]) -> None:
        if self.outbox is not None:
            url = case_url(self.cfg.threatq.base_url, ref[0], ref[1]) if self.cfg.writeback.case_custom_field else None
            self.outbox.want(case_id, "case", case_tags(self.prefix, ref[0], ref[1]), url)

    def _tell_observable(self, obs_id: str, indicator_ids: Sequence[int], plan) -> None:
        if self.outbox is not None and indicator_ids:
            runs = [run for _, plugin_runs in plan for run in plugin_runs]
            self.outbox.want(obs_id, "observable", observable_tags(self.prefix, indicator_ids, runs))

    def write_indicators(self, pending: "PendingObservable") -> List[int]:
        """Each indicator of the observable into ThreatQ, one by one: their ids."""
        stored = StoredIndicators(self.tq, pending.stored_ids,
                                  lambda tq_id: self.state.forget(pending.obs_id, "indicators", tq_id))
        return [self._sync_indicator(pending.obs_id, pending.case_id, indicator, runs, pending.case_ref,
                                     pending.tags, pending.synced_tags, stored)
                for indicator, runs in pending.plan]

    def _observable_now(self, event: events.WebhookEvent, payload: dict) -> Union[Outcome, Tuple[dict, Optional[str]]]:
        """The observable the event is about and, when TheHive had to say it, its case's id; or the
        outcome of an event with nothing to apply (the observable is gone, or an alert's)."""
        obj = carried_object(payload)
        if obj is not None:
            return obj, None
        # A thin update (no object, details only the change): read the observable as it is now.
        obs_id = event.object_id
        known_case = event.case_id or self.state.case_of(obs_id)
        try:
            obj, fetched_case_id = self._fetch_observable(obs_id, known_case)
        except TheHiveNotFound:
            return Outcome("skipped", detail=f"observable {obs_id} is no longer in TheHive")
        if fetched_case_id is None and not known_case:
            return Outcome("skipped", detail=f"observable {obs_id} is in no case (an alert's)")
        return obj, fetched_case_id

    def enrich(self, data_type: str, value: str, tlp: Optional[str], pap: Optional[str]) -> list:
        """The plugin runs for one indicator value (none without enrichment)."""
        return self.enricher.run(data_type, value, tlp, pap) if self.enricher is not None else []

    def _not_synced(self, observable: Observable, mapped, already) -> Optional[Tuple[str, str]]:
        """(outcome, why) when the observable does not go to ThreatQ; None when it does."""
        if self.sync.only_ioc and not observable.ioc and not already:
            return "filtered", "not an IOC (sync.only_ioc: true)"
        if not mapped.indicators:
            return "skipped", "; ".join(mapped.skipped)
        return None

    def _enrich(self, observable: Observable, indicators: Sequence[IndicatorObject],
                enriched: Dict[tuple, list]) -> List[Tuple[IndicatorObject, list]]:
        """Each indicator with its plugin runs, before anything is written: a cache hit costs no
        call, and the answers are part of what must reach ThreatQ. An IOC is watched."""
        plan = []
        for indicator in indicators:
            data_type = enrichment_type(observable.data_type, indicator.type)
            key = enrichment_key(observable, indicator)
            runs = enriched[key] if key in enriched else self.enrich(*key)
            plan.append((indicator, runs))
            if observable.ioc and self.watches is not None and self.cfg.enrichment.auto_watch_ioc:
                self.watches.add(indicator.value, data_type, origin="ioc", tlp=observable.tlp, pap=observable.pap)
        return plan

    def _sync_indicator(self, obs_id: str, case_id: str, indicator: IndicatorObject, runs,
                        case_ref: Tuple[str, int], tags: Sequence[str], synced_tags: Sequence[str],
                        stored: StoredIndicators) -> int:
        """One indicator of an observable: the stored id first, else the look-up by value and
        type; then the object, its attributes and tags, its link to the case, its enrichment.

        The same value can arrive in two cases at once, in two worker processes, while the
        monitor rewrites its enrichment: all of it happens under the indicator's lock."""
        type_id = self.tq.indicator_type_id(indicator.type)
        with self.objects.lock(indicator_key(indicator.type, indicator.value)):
            hit = stored.take(indicator.value, type_id) or self.tq.find_indicator(indicator.value, type_id,
                                                                                   expand=True)
            return self.write_indicator(obs_id, case_id, indicator, type_id, runs, case_ref, tags, synced_tags, hit)

    def write_indicator(self, obs_id: str, case_id: str, indicator: IndicatorObject, type_id: int, runs,
                        case_ref: Tuple[str, int], tags: Sequence[str], synced_tags: Sequence[str],
                        hit: Optional[dict]) -> int:
        """The indicator ``hit`` (None: not in ThreatQ) brought to what the observable says; the
        caller holds its lock."""
        written = self.objects.upsert(self._indicator_upsert(indicator, type_id, runs, case_ref, tags), hit)
        self.state.record(obs_id, "observable", "indicators", written.tq_id, case_id)
        if written.consumed:  # attributes, enrichment, tags and the link came in its one call
            return written.tq_id
        self.objects.reconcile(written, indicator.attributes, INDICATOR_ATTRIBUTES, tags, synced_tags)
        self.objects.link(case_ref[0], case_ref[1], written.tq_id, written.fresh)
        touched = set(INDICATOR_ATTRIBUTES)
        for run in runs:
            if run.attributes:  # the snapshot only for names no earlier step changed
                unchanged = not touched & set(run.attributes)
                self.objects.apply_enrichment("indicators", written.tq_id, run, written.known if unchanged else None)
                touched |= set(run.attributes)
        return written.tq_id

    def consume_item(self, pending: "PendingObservable", indicator: IndicatorObject, type_id: int, runs) -> dict:
        """A new indicator of ``pending`` as one item of a consume call (``sync_batch``)."""
        return self._indicator_upsert(indicator, type_id, runs, pending.case_ref, pending.tags).consume_item()

    def _indicator_upsert(self, ind: IndicatorObject, type_id: int, runs, case_ref: Tuple[str, int],
                          tags: Sequence[str]) -> Upsert:
        """How an indicator is made (in one consume call: attributes, enrichment, tags, case
        link) and updated."""
        def consume() -> dict:
            return consume_item(replace(ind, tags=tuple(tags)), type_id, self.tq.indicator_status_id(ind.status),
                                self.objects.source(ind.tlp_id),
                                [(run.plugin, run.attributes) for run in runs if run.attributes],
                                {case_ref[0]: [case_ref[1]]})

        def create() -> int:
            return self.tq.create_indicator(ind.value, type_id, self.tq.indicator_status_id(ind.status),
                                            ind.description, [self.objects.source(ind.tlp_id)])["id"]

        def update(hit: dict) -> Known:
            # The status is set at creation only: an analyst's later choice in ThreatQ stands.
            if (hit.get("description") or "") != ind.description:
                self.tq.update_indicator(hit["id"], description=ind.description)
            return inline(hit)

        return Upsert("indicators", ind.value, ind.tlp_id, consume,
                      lambda: self.tq.find_indicator(ind.value, type_id, expand=True), create, update)

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
            self.objects.unlink(case_collection, case_tq_id, indicator_id)
            refs.append(f"indicators/{indicator_id}")
        self.state.forget(obs_id)
        self.state.set_digest(obs_id, "observable", None)
        return Outcome("unlinked", threatq=refs)
