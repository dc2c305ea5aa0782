"""What a TheHive case or observable becomes in ThreatQ: pure values, no HTTP, no database.

The sync posts these objects; keeping the decisions here (titles, attributes, TLP, indicator
types, what is skipped and why) lets them be tested as tables without a ThreatQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from tq_mw_thehive.thehive.model import Alert, Case, Observable
from tq_mw_thehive.type_mapping import FILE, FILENAME, TypeMapping

if TYPE_CHECKING:  # only for the annotation: this module stays free of configuration loading
    from tq_mw_thehive.config import SyncConfig

# ThreatQ source tlp_id: 1 RED, 2 AMBER, 3 GREEN, 4 WHITE/CLEAR. A restriction is never
# lowered, so TheHive 5.2's AMBER+STRICT becomes RED.
TLP_IDS = {"RED": 1, "AMBER+STRICT": 1, "AMBER": 2, "GREEN": 3, "WHITE": 4, "CLEAR": 4}
SEVERITY_LABELS = {1: "LOW", 2: "MEDIUM", 3: "HIGH", 4: "CRITICAL"}

TITLE_PREFIX = "Hive Case #"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Attribute:
    name: str
    value: str


@dataclass(frozen=True)
class CaseObject:
    """A TheHive case as a ThreatQ event (collection ``events``) or incident (``incident``)."""

    collection: str
    title: str
    event_type: Optional[str]
    description: str
    happened_at: Optional[str]
    tags: Tuple[str, ...]
    tlp_id: Optional[int]
    attributes: Tuple[Attribute, ...]


@dataclass(frozen=True)
class IndicatorObject:
    value: str
    type: str
    description: str
    status: str
    tags: Tuple[str, ...]
    tlp_id: Optional[int]
    attributes: Tuple[Attribute, ...]


@dataclass(frozen=True)
class MappedObservable:
    """The indicators of one observable, and one reason per thing that was not mapped."""

    indicators: Tuple[IndicatorObject, ...]
    skipped: Tuple[str, ...]


def case_title_prefix(case_id: str) -> str:
    """``Hive Case # <_id>``: what finds a case's object in ThreatQ even after a title change."""
    return f"{TITLE_PREFIX} {case_id}"


def case_title(case_id: str, title: str) -> str:
    """``Hive Case # <_id> <title>``, the guide's title (no trailing space for an empty title)."""
    title = title.strip()
    prefix = case_title_prefix(case_id)
    return f"{prefix} {title}" if title else prefix


def is_case_title(title: str, case_id: str) -> bool:
    """Whether a ThreatQ title belongs to ``case_id``; a bare prefix test would also accept
    the case ``~123`` for ``~12``, so the prefix must end the title or be followed by a space."""
    prefix = case_title_prefix(case_id)
    return title == prefix or title.startswith(prefix + " ")


def tlp_id(label: Optional[str]) -> Optional[int]:
    """ThreatQ's tlp_id for a TheHive TLP label (any case), None when unknown or absent."""
    if label is None:
        return None
    return TLP_IDS.get(label.strip().upper())


def _utc(ms: Optional[int]) -> Optional[str]:
    if ms is None:
        return None
    try:
        return (_EPOCH + timedelta(milliseconds=ms)).strftime(_TIME_FORMAT)
    except (OverflowError, ValueError):
        return None  # beyond any calendar: as unknown as a missing date


def _attributes(*pairs: Tuple[str, Optional[str]]) -> Tuple[Attribute, ...]:
    """Attributes in the given order, leaving out those whose value is unknown or empty."""
    return tuple(Attribute(name, value) for name, value in pairs if value)


def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def _severity(label: Optional[str], number: Optional[int]) -> Optional[str]:
    """TheHive's label when it sent one, else the label of its number."""
    if not label and number is not None:
        return SEVERITY_LABELS.get(number)
    return label


def map_case(case: Case, sync: "SyncConfig") -> CaseObject:
    """A case as the ThreatQ event (``sync.cases_as: event``) or incident it becomes."""
    as_event = sync.cases_as != "incident"
    severity = _severity(case.severity_label, case.severity)
    return CaseObject(
        collection="events" if as_event else "incident",
        title=case_title(case.id, case.title),
        event_type=sync.event_type if as_event else None,
        description=case.description,
        happened_at=_utc(case.start_ms if case.start_ms is not None else case.created_ms),
        tags=case.tags,
        tlp_id=tlp_id(case.tlp),
        attributes=_attributes(
            ("TheHive Id", case.id),
            ("Status", case.status),
            ("Owner", case.owner),
            ("Case Id", None if case.number is None else str(case.number)),
            ("Severity", severity),
            ("PAP", case.pap),
            ("Flagged", _yes_no(case.flag)),
        ),
    )


ALERT_TITLE_PREFIX = "Hive Alert #"


def alert_title(alert_id: str, title: str) -> str:
    """``Hive Alert #<_id> <title>``: an alert's ThreatQ event (``sync.alerts``)."""
    title = title.strip()
    return f"{ALERT_TITLE_PREFIX}{alert_id} {title}" if title else f"{ALERT_TITLE_PREFIX}{alert_id}"


def map_alert(alert: Alert, sync: "SyncConfig") -> CaseObject:
    """An alert as the ThreatQ event it becomes (type ``sync.alert_event_type``), with the
    fields of a case it has and what says where it came from."""
    severity = _severity(alert.severity_label, alert.severity)
    return CaseObject(
        collection="events",
        title=alert_title(alert.id, alert.title),
        event_type=sync.alert_event_type,
        description=alert.description,
        happened_at=_utc(alert.date_ms if alert.date_ms is not None else alert.created_ms),
        tags=alert.tags,
        tlp_id=tlp_id(alert.tlp),
        attributes=_attributes(
            ("TheHive Id", alert.id),
            ("Status", alert.status),
            ("Severity", severity),
            ("PAP", alert.pap),
            ("Alert Type", alert.type),
            ("Alert Source", alert.source),
            ("Alert Source Ref", alert.source_ref),
        ),
    )


def map_observable(observable: Observable, types: TypeMapping,
                   status: str = "Active") -> MappedObservable:
    """An observable as ThreatQ indicators: one, or for a ``file`` one per hash plus its name.

    Nothing here raises for odd data: what cannot be mapped is returned in ``skipped`` so the
    sync can log it and carry on with the rest of the case.
    """
    attributes = _attributes(
        ("PAP", observable.pap),
        ("Sighted?", _yes_no(observable.sighted)),
        ("Indicator Of Compromise?", "Yes" if observable.ioc else None),
    )
    tlp = tlp_id(observable.tlp)
    indicators: List[IndicatorObject] = []
    skipped: List[str] = []
    seen: Set[Tuple[str, str]] = set()

    def add(indicator_type: str, value: str) -> None:
        if (indicator_type, value) not in seen:
            seen.add((indicator_type, value))
            indicators.append(IndicatorObject(
                value=value, type=indicator_type, description=observable.message, status=status,
                tags=observable.tags, tlp_id=tlp, attributes=attributes))

    def resolve(data_type: str, value: str) -> None:
        indicator_type, reason = types.resolve(data_type, value)
        if indicator_type is None:
            skipped.append(reason or f"observable type {data_type!r} is not mapped")
        else:
            add(indicator_type, value.strip())

    data_type = observable.data_type
    attachment = observable.attachment
    if data_type != FILE:
        resolve(data_type, observable.data or "")
    elif data_type not in types.rules:
        resolve(data_type, "")  # the mapping's own "not mapped" reason, once for the observable
    elif attachment is None:
        skipped.append(f"{data_type} observable without an attachment")
    else:
        if not attachment.hashes:
            skipped.append(f"{data_type} observable: the attachment has no hashes")
        for value in attachment.hashes:
            resolve(data_type, value)
        name = (attachment.name or "").strip()
        if name:
            add(FILENAME, name)
        else:
            skipped.append(f"{data_type} observable: the attachment has no name")
    return MappedObservable(indicators=tuple(indicators), skipped=tuple(skipped))


def consume_item(indicator: IndicatorObject, type_id: int, status_id: int, source: Dict[str, Any],
                 enrichment: Sequence[Tuple[str, Mapping[str, str]]] = (),
                 links: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Any]:
    """A new indicator as one item of ``POST /api/indicators/consume``: what the call-by-call path
    sends in four or more requests (create, attributes, link, tags), in one.

    ``enrichment`` is ``(plugin, attributes)`` per plugin that answered: those attributes carry the
    plugin as their source. ``links`` maps a collection (``events``, ``incident``) to the ids of
    the objects to relate, the reference's relationship keys.

    No ``normalize`` flag (SDK1 1.8.0 sends ``normalize: 'Y'`` to ``/consume/new``): ThreatQ
    would then be free to rewrite the value, and the sync's exact look-up by value (after a lost
    state database) could miss what it stored. Sent as TheHive has it (trimmed), the value is
    what the look-up asks for.
    """
    attributes: List[Dict[str, Any]] = [{"name": a.name, "value": a.value} for a in indicator.attributes]
    for plugin, found in enrichment:
        attributes += [{"name": name, "value": value, "sources": [{"name": plugin}]}
                       for name, value in found.items()]
    item: Dict[str, Any] = {"value": indicator.value, "type_id": type_id, "status_id": status_id,
                            "description": indicator.description, "sources": [dict(source)],
                            "attributes": attributes, "tags": list(indicator.tags)}
    for collection, ids in (links or {}).items():
        item[collection] = [{"id": int(i)} for i in ids]
    return item


def case_consume_item(case: CaseObject, source: Dict[str, Any], type_id: Optional[int] = None,
                      happened_at: Optional[str] = None) -> Dict[str, Any]:
    """A new case as one item of ``POST /api/events/consume`` (or ``/api/incident/consume``): the
    create, its attributes and its tags in one request instead of nine."""
    item: Dict[str, Any] = ({"title": case.title, "type_id": type_id, "happened_at": happened_at}
                            if case.collection == "events" else {"value": case.title})
    item.update(description=case.description, sources=[dict(source)],
                attributes=[{"name": a.name, "value": a.value} for a in case.attributes], tags=list(case.tags))
    return item


_HASH_TYPES = {"MD5", "SHA-1", "SHA-256", "SHA-384", "SHA-512"}


def enrichment_type(data_type: str, indicator_type: str) -> str:
    """The TheHive data type a plugin sees: a file's hashes are ``hash``, its name ``filename``."""
    if data_type != "file":
        return data_type
    return "hash" if indicator_type in _HASH_TYPES else "filename"
