"""TheHive cases and observables as plain values, whatever API version rendered them.

A webhook's ``object`` comes in two dialects: API v1 (TheHive 5 version 1 payloads, the
``details`` of a create, the v1 API) with ``number``, ``assignee``, ``_createdAt`` and the
``tlpLabel``/``papLabel``/``severityLabel`` labels; and API v0 (TheHive 4 and TheHive 5
"version 0" payloads) with ``caseId``, ``owner``, ``createdAt`` and numbers only. Reading
both here, once, lets the mapping work on one shape and be tested without a network.

A field of the wrong type raises ``ModelError`` naming the field: a payload we do not
understand must fail loudly and precisely, never as a ``KeyError`` deep in the sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from tq_mw_thehive.errors import PermanentError

# TheHive 4 and TheHive 5 before 5.2 (5.2 renumbered: 3 AMBER+STRICT, 4 RED). TheHive 5.2+
# always sends tlpLabel in version 1 payloads, so the numbers matter only without labels,
# where reading 3 as RED can only over-restrict, never under-restrict.
TLP_LABELS: Dict[int, str] = {0: "WHITE", 1: "GREEN", 2: "AMBER", 3: "RED"}
PAP_LABELS: Dict[int, str] = dict(TLP_LABELS)


class ModelError(ValueError, PermanentError):
    """A TheHive object cannot be read; the message names the field (``case.tags: ...``)."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _require_object(obj: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise ModelError(f"{kind}: must be a JSON object, got {_type_name(obj)}")
    return obj


def _first(obj: Mapping[str, Any], *keys: str) -> Tuple[Optional[str], Any]:
    """The first of ``keys`` present with a non-null value (v1 name first, then v0)."""
    for key in keys:
        if obj.get(key) is not None:
            return key, obj[key]
    return None, None


def _str(obj: Mapping[str, Any], kind: str, *keys: str) -> Optional[str]:
    key, value = _first(obj, *keys)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ModelError(f"{kind}.{key}: must be a string, got {_type_name(value)}")
    return value


def _int(obj: Mapping[str, Any], kind: str, *keys: str) -> Optional[int]:
    key, value = _first(obj, *keys)
    if value is None:
        return None
    # JSON has one number type: accept 3.0 as 3, but not 3.5, and never a bool (an int in Python).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{kind}.{key}: must be an integer, got {_type_name(value)}")
    return value


def _bool(obj: Mapping[str, Any], kind: str, key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ModelError(f"{kind}.{key}: must be true or false, got {_type_name(value)}")
    return value


def _strings(obj: Mapping[str, Any], kind: str, key: str) -> Tuple[str, ...]:
    """A list of strings, trimmed, empty ones dropped, de-duplicated in order."""
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ModelError(f"{kind}.{key}: must be a list of strings, got {_type_name(value)}")
    seen: List[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ModelError(f"{kind}.{key}: must be a list of strings, got an item of type "
                             f"{_type_name(item)}")
        item = item.strip()
        if item and item not in seen:
            seen.append(item)
    return tuple(seen)


def _id(obj: Mapping[str, Any], kind: str) -> str:
    value = _str(obj, kind, "_id", "id")
    if not value:
        raise ModelError(f"{kind}._id: missing")
    return value


def _label(obj: Mapping[str, Any], kind: str, name: str,
           numbers: Optional[Mapping[int, str]]) -> Optional[str]:
    """``<name>Label`` upper-cased when sent; else the number read with ``numbers``."""
    label = _str(obj, kind, f"{name}Label")
    number = _int(obj, kind, name)  # checked even when the label wins: a bad field is never hidden
    if label and label.strip():
        return label.strip().upper()
    if number is None or numbers is None:
        return None
    # A number outside the table (TheHive 5.2+ RED is 4) is read as the strictest level:
    # a restriction is never lowered because we did not understand it.
    return numbers.get(number, "RED")


@dataclass(frozen=True)
class Case:
    """A TheHive case; ``tlp``/``pap``/``severity_label`` are upper-case labels or None."""

    id: str
    number: Optional[int]
    title: str
    description: str
    severity: Optional[int]
    severity_label: Optional[str]   # only what TheHive sent (severityLabel); the mapping derives one
    start_ms: Optional[int]
    tags: Tuple[str, ...]
    flag: bool
    tlp: Optional[str]
    pap: Optional[str]
    status: Optional[str]
    owner: Optional[str]
    created_ms: Optional[int]
    updated_ms: Optional[int]

    @classmethod
    def from_thehive(cls, obj: Any) -> "Case":
        """Read a v1 or v0 case object (v1 names win when both are present)."""
        kind = "case"
        obj = _require_object(obj, kind)
        return cls(
            id=_id(obj, kind),
            number=_int(obj, kind, "number", "caseId"),
            title=_str(obj, kind, "title") or "",
            description=_str(obj, kind, "description") or "",
            severity=_int(obj, kind, "severity"),
            severity_label=_label(obj, kind, "severity", None),
            start_ms=_int(obj, kind, "startDate"),
            tags=_strings(obj, kind, "tags"),
            flag=_bool(obj, kind, "flag"),
            tlp=_label(obj, kind, "tlp", TLP_LABELS),
            pap=_label(obj, kind, "pap", PAP_LABELS),
            status=_str(obj, kind, "status"),
            owner=_str(obj, kind, "assignee", "owner"),
            created_ms=_int(obj, kind, "_createdAt", "createdAt"),
            updated_ms=_int(obj, kind, "_updatedAt", "updatedAt"),
        )


@dataclass(frozen=True)
class Attachment:
    """The file of a ``file`` observable: its name and the hashes TheHive computed."""

    name: Optional[str]
    hashes: Tuple[str, ...]

    @classmethod
    def from_thehive(cls, obj: Any) -> "Attachment":
        kind = "observable.attachment"
        obj = _require_object(obj, kind)
        return cls(name=_str(obj, kind, "name"), hashes=_strings(obj, kind, "hashes"))


@dataclass(frozen=True)
class Observable:
    """A TheHive observable; ``case_id`` is the ``_id`` of the embedded ``case``, if any."""

    id: str
    data_type: str
    data: Optional[str]
    attachment: Optional[Attachment]
    message: str
    tags: Tuple[str, ...]
    tlp: Optional[str]
    pap: Optional[str]
    ioc: bool
    sighted: bool
    created_ms: Optional[int]
    updated_ms: Optional[int]
    case_id: Optional[str]

    @classmethod
    def from_thehive(cls, obj: Any) -> "Observable":
        """Read a v1 or v0 observable object (v0 ``case_artifact`` has no ``pap``)."""
        kind = "observable"
        obj = _require_object(obj, kind)
        data_type = _str(obj, kind, "dataType")
        if not data_type:
            raise ModelError(f"{kind}.dataType: missing")
        attachment = obj.get("attachment")
        case_id = None
        if obj.get("case") is not None:
            case_id = _str(_require_object(obj["case"], f"{kind}.case"), f"{kind}.case", "_id", "id")
        return cls(
            id=_id(obj, kind),
            data_type=data_type,
            data=_str(obj, kind, "data"),
            attachment=None if attachment is None else Attachment.from_thehive(attachment),
            message=_str(obj, kind, "message") or "",
            tags=_strings(obj, kind, "tags"),
            tlp=_label(obj, kind, "tlp", TLP_LABELS),
            pap=_label(obj, kind, "pap", PAP_LABELS),
            ioc=_bool(obj, kind, "ioc"),
            sighted=_bool(obj, kind, "sighted"),
            created_ms=_int(obj, kind, "_createdAt", "createdAt"),
            updated_ms=_int(obj, kind, "_updatedAt", "updatedAt"),
            case_id=case_id or None,
        )


@dataclass(frozen=True)
class Alert:
    """A TheHive alert (``sync.alerts``); ``case_id`` is the case it was imported or merged into.

    TheHive 5 API v1 and audit objects name that case ``caseId`` (thehive4py 2.x ``OutputAlert``);
    TheHive 4's v0 webhook object names it ``case`` (TheHive-Project/TheHive ``dto/v0/Alert.scala``).
    """

    id: str
    title: str
    description: str
    severity: Optional[int]
    severity_label: Optional[str]
    date_ms: Optional[int]
    tags: Tuple[str, ...]
    tlp: Optional[str]
    pap: Optional[str]
    status: Optional[str]
    type: Optional[str]
    source: Optional[str]
    source_ref: Optional[str]
    case_id: Optional[str]
    created_ms: Optional[int]
    updated_ms: Optional[int]

    @classmethod
    def from_thehive(cls, obj: Any) -> "Alert":
        kind = "alert"
        obj = _require_object(obj, kind)
        case = obj.get("caseId", obj.get("case"))
        if isinstance(case, dict):  # an embedded case, as some renderings give it [guess]
            case = case.get("_id")
        if case is not None and not isinstance(case, str):
            raise ModelError(f"{kind}.caseId: must be a string, got {_type_name(case)}")
        return cls(
            id=_id(obj, kind),
            title=_str(obj, kind, "title") or "",
            description=_str(obj, kind, "description") or "",
            severity=_int(obj, kind, "severity"),
            severity_label=_label(obj, kind, "severity", None),
            date_ms=_int(obj, kind, "date"),
            tags=_strings(obj, kind, "tags"),
            tlp=_label(obj, kind, "tlp", TLP_LABELS),
            pap=_label(obj, kind, "pap", PAP_LABELS),
            status=_str(obj, kind, "status"),
            type=_str(obj, kind, "type"),
            source=_str(obj, kind, "source"),
            source_ref=_str(obj, kind, "sourceRef"),
            case_id=case or None,
            created_ms=_int(obj, kind, "_createdAt", "createdAt"),
            updated_ms=_int(obj, kind, "_updatedAt", "updatedAt"),
        )
