"""Parse TheHive webhook bodies of every shape into one ``WebhookEvent``.

TheHive sends three shapes (see ARCHITECTURE.md): TheHive 4 "version 0"
(lowercase ``operation``, ``case_artifact``), TheHive 5 "version 0" (TheHive 3
style ``Creation``/``Update``/``Delete``) and TheHive 5 "version 1" (the audit
record: ``_id``, ``_type: Audit``, ``action``). Only the envelope is read here;
what a case or observable becomes in ThreatQ is the mapping's business.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

THEHIVE4_V0 = "thehive4-v0"
THEHIVE5_V0 = "thehive5-v0"
THEHIVE5_V1 = "thehive5-v1"

SYNCED_OBJECT_TYPES = ("case", "observable")

# v0 object types (TheHive 4 Conversion.fromObjectType) and v1 names, to one vocabulary.
_OBJECT_TYPES = {
    "case": "case",
    "case_artifact": "observable",
    "observable": "observable",
    "case_task": "task",
    "task": "task",
    "case_task_log": "log",
    "log": "log",
    "case_artifact_job": "job",
    "job": "job",
    "alert": "alert",
}
_ACTIONS = {
    "create": "create", "creation": "create",
    "update": "update", "merge": "update",
    "delete": "delete",
}


class PayloadError(ValueError):
    """The body is not a TheHive webhook event; the message says why (answered with 400)."""


@dataclass(frozen=True)
class WebhookEvent:
    """The envelope of one TheHive event, whatever shape it came in."""

    shape: str
    object_type: str          # normalised: case, observable, task, log, job, alert, ...
    action: str               # normalised: create, update, delete (others lowercased as sent)
    raw_object_type: str
    raw_action: str
    object_id: Optional[str]
    audit_id: Optional[str]
    request_id: Optional[str]
    case_id: Optional[str]    # the case this event belongs to, when the payload says
    timestamp_ms: Optional[int]
    organisation: Optional[str]
    dedup_key: str
    ignore_reason: Optional[str]
    # The alert an alert event or an alert's observable belongs to (``parse(..., alerts=True)``);
    # ``case_id`` is then that alert's id too, so an alert's events are ordered as a case's.
    alert_id: Optional[str] = None

    @property
    def case_key(self) -> str:
        """What orders events: those of one case are applied one at a time, in TheHive's time order."""
        if self.case_id:
            return f"case:{self.case_id}"
        return f"object:{self.object_id or self.dedup_key}"


_INT64 = 2 ** 63


def _text(value: str, key: str) -> str:
    """``value`` if it can be stored: JSON's ``\ud800`` escapes decode to text UTF-8 cannot hold."""
    if value.isascii():  # every id TheHive sends: no surrogate, no copy to find out
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{key} is not valid Unicode text (a lone surrogate escape)") from None
    return value


def _optional_str(payload: Mapping[str, Any], key: str) -> Optional[str]:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{key} must be a string, got {type(value).__name__}")
    return _text(value, key)


def _optional_int(payload: Mapping[str, Any], key: str) -> Optional[int]:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{key} must be an integer (epoch milliseconds), got {type(value).__name__}")
    if not -_INT64 <= value < _INT64:
        raise PayloadError(f"{key} is out of range for epoch milliseconds")
    return value


def _optional_object(payload: Mapping[str, Any], key: str) -> Dict[str, Any]:
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _shape(payload: Mapping[str, Any]) -> str:
    if "action" in payload or payload.get("_type") == "Audit":
        return THEHIVE5_V1
    operation = payload.get("operation")
    if isinstance(operation, str) and operation[:1].isupper():
        return THEHIVE5_V0
    return THEHIVE4_V0


def _embedded_id(obj: Mapping[str, Any], key: str) -> Optional[str]:
    parent = obj.get(key)
    if isinstance(parent, dict) and isinstance(parent.get("_id"), str):
        return _text(parent["_id"], f"object.{key}._id")
    return None


def _case_id(shape: str, object_type: str, object_id: Optional[str], root_id: Optional[str],
             obj: Mapping[str, Any], context: Mapping[str, Any]) -> Optional[str]:
    if object_type == "case":
        return object_id
    embedded = _embedded_id(obj, "case")
    if embedded:
        return embedded
    if str(context.get("_type", "")).lower() == "case" and isinstance(context.get("_id"), str):
        return _text(context["_id"], "context._id")
    # In TheHive 5 (version 1 and version 0 alike) an observable's rootId is its case (for case
    # observables): an observable delete carries its case only there, its context being a Share
    # (ryukisec/TheHive-Webhooks v0/Observable.md and v1/Observable.md, "Observable deleted").
    # In TheHive 4 v0 rootId is the observable itself, so it says nothing there.
    if shape in (THEHIVE5_V0, THEHIVE5_V1) and object_type == "observable" and root_id != object_id:
        return root_id
    return None


def _organisation(payload: Mapping[str, Any]) -> Optional[str]:
    org = payload.get("organisation")
    if isinstance(org, dict):
        org = org.get("organisation")
    return _text(org, "organisation") if isinstance(org, str) else None


def _dedup_key(payload: Mapping[str, Any], audit_id: Optional[str], action_key: str,
               timestamp_key: str) -> str:
    if audit_id:
        return f"audit:{audit_id}"
    parts = [payload.get("requestId"), payload.get("objectId"), payload.get(action_key),
             payload.get(timestamp_key)]
    if all(p is None for p in parts):
        # Nothing identifies the event: fall back to its whole content.
        parts = [payload]
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return "digest:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _alert_bound(obj: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """An observable of an alert: its object embeds the alert (no case), or its context is the alert."""
    return ("alert" in obj and "case" not in obj) or str(context.get("_type", "")).lower() == "alert"


def _ignore_reason(object_type: str, raw_object_type: str, action: str, raw_action: str,
                   obj: Mapping[str, Any], context: Mapping[str, Any], alerts: bool) -> Optional[str]:
    if object_type not in SYNCED_OBJECT_TYPES and not (alerts and object_type == "alert"):
        return f"object type {raw_object_type} is not synced to ThreatQ" + (
            " (sync.alerts: false)" if object_type == "alert" else "")
    if action not in ("create", "update", "delete"):
        return f"action {raw_action} is not synced to ThreatQ"
    if object_type == "observable" and not alerts and _alert_bound(obj, context):
        return "observable of an alert, not of a case (sync.alerts: false)"
    return None


def _alert_id(object_type: str, object_id: Optional[str], root_id: Optional[str], obj: Mapping[str, Any],
              context: Mapping[str, Any]) -> Optional[str]:
    if object_type == "alert":
        return object_id
    if object_type != "observable" or not _alert_bound(obj, context):
        return None
    embedded = _embedded_id(obj, "alert")
    if embedded:
        return embedded
    if str(context.get("_type", "")).lower() == "alert" and isinstance(context.get("_id"), str):
        return _text(context["_id"], "context._id")
    return root_id if root_id != object_id else None  # an alert observable's rootId is its alert


def parse(payload: Any, alerts: bool = False) -> WebhookEvent:
    """Read the envelope of a decoded webhook body; raise ``PayloadError`` if it is not one.
    ``alerts`` (``sync.alerts``): alerts and their observables are events to sync, not ignored."""
    if not isinstance(payload, dict):
        raise PayloadError(f"body must be a JSON object, got {type(payload).__name__}")
    shape = _shape(payload)
    action_key = "action" if shape == THEHIVE5_V1 else "operation"
    timestamp_key = "_createdAt" if shape == THEHIVE5_V1 else "startDate"

    raw_object_type = payload.get("objectType")
    if raw_object_type is None:
        raise PayloadError("missing objectType")
    if not isinstance(raw_object_type, str) or not raw_object_type.strip():
        raise PayloadError("objectType must be a non-empty string")
    _text(raw_object_type, "objectType")
    raw_action = payload.get(action_key)
    if raw_action is None:
        raise PayloadError("missing action (TheHive 5 version 1) or operation (version 0)")
    if not isinstance(raw_action, str) or not raw_action.strip():
        raise PayloadError(f"{action_key} must be a non-empty string")
    _text(raw_action, action_key)

    object_id = _optional_str(payload, "objectId")
    root_id = _optional_str(payload, "rootId")
    request_id = _optional_str(payload, "requestId")
    audit_id = _optional_str(payload, "_id")
    timestamp = _optional_int(payload, timestamp_key)
    if timestamp is None and shape == THEHIVE5_V0:
        timestamp = _optional_int(payload, "createdAt")
    obj = _optional_object(payload, "object")
    context = _optional_object(payload, "context")
    _optional_object(payload, "details")

    object_type = _OBJECT_TYPES.get(raw_object_type.lower(), raw_object_type.lower())
    action = _ACTIONS.get(raw_action.lower(), raw_action.lower())
    ignore = _ignore_reason(object_type, raw_object_type, action, raw_action, obj, context, alerts)
    if ignore is None and not object_id:
        raise PayloadError(f"missing objectId for a {raw_object_type} event")
    alert_id = _alert_id(object_type, object_id, root_id, obj, context) if alerts and ignore is None else None

    return WebhookEvent(
        shape=shape,
        object_type=object_type,
        action=action,
        raw_object_type=raw_object_type,
        raw_action=raw_action,
        object_id=object_id,
        audit_id=audit_id,
        request_id=request_id,
        case_id=alert_id or _case_id(shape, object_type, object_id, root_id, obj, context),
        timestamp_ms=timestamp,
        organisation=_organisation(payload),
        dedup_key=_dedup_key(payload, audit_id, action_key, timestamp_key),
        ignore_reason=ignore,
        alert_id=alert_id,
    )


# --- the self-test of `tq-mw-thehive check` ----------------------------------------------------

# No TheHive object type is spelled like this. The web app stores an event of this type already
# finished (so no worker ever claims or syncs it) and `check` removes the row by its id: the
# self-test proves authentication, decoding and a database write end to end, and leaves nothing.
SELF_TEST_OBJECT_TYPE = "tq_mw_thehive_self_test"


def self_test_payload(nonce: str, now_ms: int) -> Dict[str, Any]:
    """A TheHive 5 version 1 shaped body whose ``objectType`` marks it as the self-test."""
    return {"_id": f"self-test-{nonce}", "_type": "Audit", "_createdAt": now_ms, "action": "create",
            "objectType": SELF_TEST_OBJECT_TYPE, "objectId": f"self-test-{nonce}",
            "rootId": f"self-test-{nonce}", "details": {}, "object": {}}


def is_self_test(event: WebhookEvent) -> bool:
    return event.object_type == SELF_TEST_OBJECT_TYPE
