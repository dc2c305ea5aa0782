"""A TheHive 5 API v1 simulator: the read side that ``thehive.api`` uses (reference §4, §5).

``POST /api/v1/query`` understands the sources ``getCase``, ``listCase``, ``getAlert``,
``listAlert``, ``getObservable`` and ``listObservable``, the traversals ``observables``
(from cases or alerts) and ``case`` (from observables), ``filter`` with every operator
thehive4py 2.x builds (TheHive-Project/TheHive4py ``thehive4py/query/filters.py``: ``_lt``,
``_gt``, ``_lte``, ``_gte``, ``_eq``, ``_ne``, ``_is``, ``_in``, ``_between``, ``_id``,
``_has``, ``_contains``, ``_like``, ``_match``, ``_startsWith``, ``_endsWith``, ``_and``,
``_or``, ``_not``), ``sort`` on one field or several (``query/sort.py``: ``Asc(a) & Desc(b)``)
and ``page`` (``from`` inclusive, ``to`` exclusive), and answers a bare JSON array like
TheHive. Errors use TheHive's ``{"type", "message"}`` body (ScalliGraph ``ErrorHandler``),
unknown routes and methods too. ``GET /api/v1/case/{idOrName}`` and
``GET /api/v1/observable/{id}`` answer one object or 404. ``queries`` records every query's
operations, so a test can compare what two clients send.

Objects carry the fields of thehive4py's ``OutputCase``/``OutputObservable``
(``thehive4py/types/case.py``, ``types/observable.py``): TheHive 5's ``newDate``,
``timeToDetect``, ``access``, ``userPermissions`` on cases, ``external`` on observables.

Alerts hold observables too, and ``listObservable`` returns them with the case ones, as
TheHive's does (``controllers/v1/ObservableCtrl.scala``), so a test can prove that a
reader going through the cases never sees them. A ``page`` whose ``extraData`` holds
``"total"`` is answered with the size of the whole set in an ``X-Total`` header, the body
staying a bare array (ScalliGraph ``query/QueryExecutor.scala``; TheHive 4 ``richPage(from,
to, extraData.contains("total"))``); ``send_total = False`` plays a TheHive that never
sends it.

Writes (``version`` 4 or 5; sources as in ``thehive/api.py``: thehive4py 2.x, StrangeBeeCorp/thehive4go,
TheHive 4 ``controllers/v1/Properties.scala``): ``PATCH /api/v1/observable/{id}``
and ``PATCH /api/v1/case/{idOrNumber}`` answer 204 with an empty body. Tags: ``tags`` replaces the list;
``addTags``/``removeTags`` exist on TheHive 5 only. Case custom fields: on 5 ``customFields`` as a map sets
those fields and keeps the others, as a list replaces them all; on 4 ``customFields.<name>`` sets one and
the object form replaces them all (``CaseSrv.updateCustomField``). Each change builds an audit
(``audits``), TheHive 5's webhook version 1 or TheHive 4's version 0, handed to ``webhook`` in order from
one background thread (``drain_webhooks`` waits for it). ``promote_alert`` and ``merge_alert`` play the
alert import and merge with their audit sequences; the Python helpers build audits with ``emit_audits``.

Choices where the reference has no source ([guess]):
- A never-updated object has no ``_updatedAt`` (as in the TheHive 5 captures);
  sorting puts objects without the field last in both directions, like Elasticsearch, or
  first with ``nulls_first = True`` (TheHive 4 sorts a missing value as null, and TinkerPop
  probably orders nulls first): a reader must be right with either.
- ``getCase`` of an unknown case answers ``[]`` (its traversal is empty), not 404.
- Adding an observable bumps its case's ``_updatedAt`` (seen in the captures).
"""
from __future__ import annotations

import copy
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from flask import Flask, jsonify, request

SEVERITY_LABELS = {1: "LOW", 2: "MEDIUM", 3: "HIGH", 4: "CRITICAL"}
TLP_LABELS = {0: "CLEAR", 1: "GREEN", 2: "AMBER", 3: "AMBER+STRICT", 4: "RED"}  # TheHive 5.2+
PAP_LABELS = {0: "CLEAR", 1: "GREEN", 2: "AMBER", 3: "RED"}
SIM_USER = "sim@thehive.example.org"
_CASE_LINK = "_case"  # observable -> case id; kept in memory, never served
_ALERT_LINK = "_alert"  # observable -> alert id; kept in memory, never served
_LINKS = (_CASE_LINK, _ALERT_LINK)


class QueryError(Exception):
    """A query the simulator (and TheHive) would reject with 400."""


def _error(status: int, kind: str, message: str):
    return jsonify({"type": kind, "message": message}), status


class TheHiveSimulator:
    def __init__(self, api_key: str = "thehive-sim-api-key", organisation: Optional[str] = None,
                 version: int = 5) -> None:
        if version not in (4, 5):
            raise ValueError(f"version must be 4 or 5, not {version!r}")
        self.api_key = api_key
        self.organisation = organisation
        self.version = version  # 4 or 5: PATCH semantics and the audit ("webhook") shape
        self.api_user = "sync-bot@thehive.sim"  # the API key's user: the actor of changes made over HTTP
        # Custom fields an admin has created; setting any other one answers 404.
        self.custom_fields_defined = {"threatq-url", "threatq-id"}
        self.patches: List[dict] = []  # every PATCH: {"path", "body" (parsed JSON or None), "status"}
        self.audits: List[dict] = []   # every audit built, in order (version 5 or version 4 "v0" shape)
        # Called with each audit (a copy), in order, from one background thread, never under _lock.
        self.webhook: Optional[Callable[[dict], None]] = None
        self.webhook_errors: List[str] = []  # exceptions raised by ``webhook``, as "Type: message"
        self.emit_audits = False  # True: the Python helpers (add_case, ...) build audits too
        self._hook_queue: "queue.Queue[Tuple[Callable[[dict], None], dict]]" = queue.Queue()
        self._hook_cond = threading.Condition()
        self._hook_pending = 0  # queued plus in flight
        self._hook_thread: Optional[threading.Thread] = None
        self._next_request = 0
        self.cases: Dict[str, dict] = {}
        self.alerts: Dict[str, dict] = {}
        self.observables: Dict[str, dict] = {}  # of cases and of alerts
        self.send_total = True  # False: no X-Total, even for a page asking extraData ["total"]
        self.nulls_first = False  # True: a sort puts objects without the field first, not last
        # A key whose user is not in the X-Organisation asked for: TheHive answers it like a bad key
        # (401 AuthenticationError); 403 plays an AuthorizationError instead.
        self.wrong_organisation_status = 401
        self.requests: List[Tuple[str, str]] = []
        self.queries: List[Any] = []  # the "query" of each POST /api/v1/query, as sent
        self.delay_s: float = 0.0
        self._failures: List[int] = []
        self._lock = threading.RLock()
        self._next_id = 4096
        self._next_number = 1
        self._last_ms = 0
        # TheHive 4 organisation configuration (see _add_config_routes): organisation -> name -> value.
        self.org_config: Dict[str, Dict[str, Any]] = {}
        self.manage_config = True     # False: the key lacks manageConfig (403 on PUT)
        self.config_readable = True   # False: GET of a configuration item answers 404
        self.app = self._build_app()

    # -- data helpers ---------------------------------------------------------------------------

    def _now_ms(self) -> int:
        """Wall-clock milliseconds, strictly increasing, so that sort orders are deterministic."""
        with self._lock:
            self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
            return self._last_ms

    def _new_id(self) -> str:
        with self._lock:
            self._next_id += 1
            return f"~{self._next_id}"

    def add_case(self, **fields: Any) -> dict:
        """Store a case with TheHive 5 defaults; ``fields`` override them. Returns a copy."""
        with self._lock:
            case = self._store_case(fields)
            if self.emit_audits:
                self._audit("create", case, _served(case), SIM_USER, self._request_id())
            return copy.deepcopy(case)

    def _store_case(self, fields: Dict[str, Any]) -> dict:
        """Store a case (no audit); the stored dict."""
        with self._lock:
            now = self._now_ms()
            number = fields.get("number", self._next_number)
            self._next_number = max(self._next_number, int(number)) + 1
            case = {"_id": self._new_id(), "_type": "Case", "_createdBy": SIM_USER, "_createdAt": now,
                    "number": number, "title": f"Simulated case {number}", "description": "",
                    "severity": 2, "startDate": now, "tags": [], "flag": False, "tlp": 2, "pap": 2,
                    "status": "New", "stage": "New", "assignee": SIM_USER, "customFields": [],
                    "customFieldValues": {}, "extraData": {},
                    # TheHive 5 (thehive4py OutputCase); access and userPermissions values [guess]
                    "newDate": now, "timeToDetect": 0, "access": {"kind": "organisation"},
                    "userPermissions": ["manageCase/update", "manageObservable"]}
            case.update(fields)
            _label(case)
            self.cases[case["_id"]] = case
            return case

    def update_case(self, case_id: str, **fields: Any) -> dict:
        """Change a case as an analyst would: ``_updatedAt``/``_updatedBy`` move on."""
        with self._lock:
            case = self.cases[case_id]
            case.update(fields)
            _label(case)
            self._touch(case)
            if self.emit_audits:
                self._audit("update", case, copy.deepcopy(fields), SIM_USER, self._request_id())
            return copy.deepcopy(case)

    def add_observable(self, case_id: str, **fields: Any) -> dict:
        """Store an observable in ``case_id`` (KeyError if absent). Returns the served form."""
        with self._lock:
            case = self.cases[case_id]
            observable = self._new_observable(_CASE_LINK, case_id, fields)
            self._touch(case)
            if self.emit_audits:
                self._audit("create", observable, _served(observable), SIM_USER, self._request_id())
            return _served(observable)

    def add_alert(self, **fields: Any) -> dict:
        """Store an alert with TheHive 5 defaults; ``fields`` override them. Returns a copy."""
        with self._lock:
            now = self._now_ms()
            alert = {"_id": self._new_id(), "_type": "Alert", "_createdBy": SIM_USER, "_createdAt": now,
                     "type": "external", "source": "sim", "sourceRef": f"sim-{now}", "title": "Simulated alert",
                     "description": "", "severity": 2, "date": now, "tags": [], "tlp": 2, "pap": 2,
                     "status": "New", "stage": "New", "follow": True, "customFields": [], "extraData": {}}
            alert.update(fields)
            _label(alert)
            self.alerts[alert["_id"]] = alert
            if self.emit_audits:
                self._audit("create", alert, _served(alert), SIM_USER, self._request_id())
            return copy.deepcopy(alert)

    def add_alert_observable(self, alert_id: str, **fields: Any) -> dict:
        """Store an observable in alert ``alert_id`` (KeyError if absent). Returns the served form."""
        with self._lock:
            alert = self.alerts[alert_id]
            observable = self._new_observable(_ALERT_LINK, alert_id, fields)
            self._touch(alert)
            if self.emit_audits:
                self._audit("create", observable, _served(observable), SIM_USER, self._request_id())
            return _served(observable)

    def _new_observable(self, link: str, parent_id: str, fields: Dict[str, Any]) -> dict:
        """Store an observable with TheHive 5 defaults under its parent (``link``: case or alert)."""
        now = self._now_ms()
        observable = {"_id": self._new_id(), "_type": "Observable", "_createdBy": SIM_USER,
                      "_createdAt": now, "dataType": "other", "data": f"sim-observable-{now}",
                      "startDate": now, "tlp": 2, "pap": 2, "tags": [], "ioc": False, "sighted": False,
                      "reports": {}, "message": "", "extraData": {}, "ignoreSimilarity": False,
                      "external": False}
        observable.update(fields)
        observable[link] = parent_id
        _label(observable)
        self.observables[observable["_id"]] = observable
        return observable

    def update_observable(self, observable_id: str, **fields: Any) -> dict:
        """Change an observable; unlike ``add_observable`` this leaves the case's ``_updatedAt`` alone."""
        with self._lock:
            observable = self.observables[observable_id]
            observable.update(fields)
            _label(observable)
            self._touch(observable)
            if self.emit_audits:
                self._audit("update", observable, copy.deepcopy(fields), SIM_USER, self._request_id())
            return _served(observable)

    def _touch(self, obj: dict, by: str = SIM_USER) -> None:
        obj["_updatedAt"] = self._now_ms()
        obj["_updatedBy"] = by

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` API requests with ``status`` before looking at them."""
        with self._lock:
            self._failures.extend([status] * n)

    # -- alert flows (TheHive 4 AlertSrv/AlertAudit; TheHive#2064) -------------------------------------------------------------

    def promote_alert(self, alert_id: str) -> dict:
        """Import an alert into a new case as an analyst would (TheHive 5 ``POST /api/v1/alert/{id}/case``,
        TheHive 4 ``createCase``): the alert's observables are copied (new ids), the alert gets ``caseId``.
        Returns the served case. ValueError if the alert is already imported, KeyError if absent."""
        with self._lock:
            alert = self.alerts[alert_id]
            if alert.get("caseId"):
                raise ValueError("Alert is already imported")
            request_id = self._request_id()
            case = self._store_case({"title": alert["title"], "description": alert.get("description", ""),
                                     "severity": alert.get("severity", 2), "tags": list(alert.get("tags", [])),
                                     "tlp": alert.get("tlp", 2), "pap": alert.get("pap", 2),
                                     "alertDate": alert.get("date"), "alertNewDate": alert["_createdAt"]})
            copies = self._copy_alert_observables(alert, case)
            self._mark_imported(alert, case)
            case["alertImportedDate"] = alert["importedDate"]
            from_alert = self._from_alert(alert)
            if self.emit_audits:
                case_details = dict(_served(case), fromAlert=from_alert)
                if self.version == 5:
                    self._audit("create", case, case_details, SIM_USER, request_id)
                    self._audit("update", alert, {"caseId": case["_id"]}, SIM_USER, request_id, root_id=case["_id"])
                    for observable in copies:
                        self._audit("create", observable, _served(observable), SIM_USER, request_id)
                else:
                    # TheHive 4 AlertAudit.createCase: the alert update first (context and object: the
                    # case), then the case create; "No audit for markAsRead and observables" (AlertSrv).
                    # base false on the alert update is a [guess].
                    self._audit("update", alert, {"caseId": case["_id"]}, SIM_USER, request_id,
                                root_id=case["_id"], v0_object=_v0_case(case), base=False)
                    self._audit("create", case, _v1_details(case_details), SIM_USER, request_id)
            return _served(case)

    def merge_alert(self, alert_id: str, case_id: str) -> dict:
        """Merge an alert into an existing case (``POST /api/v1/alert/{id}/merge/{caseId}``): observables the
        case lacks (by dataType+data) are copied, the alert's tags join the case's and its description is
        appended (TheHive 4 ``AlertSrv.mergeInCase``; the same on TheHive 5 is a [guess]). Returns the
        served case. ValueError if the alert is already imported, KeyError for an unknown alert or case."""
        with self._lock:
            alert = self.alerts[alert_id]
            case = self._find_case(case_id)
            if case is None:
                raise KeyError(case_id)
            if alert.get("caseId"):
                raise ValueError("Alert is already imported")
            request_id = self._request_id()
            copies = self._copy_alert_observables(alert, case)
            self._mark_imported(alert, case)
            case["tags"] = list(dict.fromkeys(list(case.get("tags", [])) + list(alert.get("tags", []))))
            case["description"] = (f"{case.get('description', '')}\n  \n#### Merged with alert "
                                   f"#{alert.get('sourceRef')} {alert.get('title')}\n\n{alert.get('description', '')}")
            self._touch(case)
            from_alert = self._from_alert(alert)
            if self.emit_audits:
                if self.version == 5:
                    # Not captured on TheHive 5: by analogy with TheHive 4, an update (not a
                    # "merge" action) carrying fromAlert and the case tags [guess].
                    self._audit("update", alert, {"caseId": case["_id"]}, SIM_USER, request_id, root_id=case["_id"])
                    self._audit("update", case, {"fromAlert": from_alert, "tags": list(case["tags"])},
                                SIM_USER, request_id)
                    for observable in copies:
                        self._audit("create", observable, _served(observable), SIM_USER, request_id)
                else:
                    # TheHive 4 AlertAudit.mergeToCase; the capture in TheHive#2064 has base false.
                    self._audit("update", alert, {"caseId": case["_id"]}, SIM_USER, request_id,
                                root_id=case["_id"], v0_object=_v0_case(case), base=False)
                    self._audit("update", case, {"customFields": _v0_custom_fields(case),
                                                 "description": case["description"], "tags": list(case["tags"]),
                                                 "fromAlert": from_alert}, SIM_USER, request_id, base=False)
            return _served(case)

    def _copy_alert_observables(self, alert: dict, case: dict) -> List[dict]:
        """New case observables copied from the alert's, skipping dataType+data the case already has."""
        have = {(o.get("dataType"), o.get("data")) for o in self.observables.values()
                if o.get(_CASE_LINK) == case["_id"]}
        copies = []
        for source in [o for o in self.observables.values() if o.get(_ALERT_LINK) == alert["_id"]]:
            key = (source.get("dataType"), source.get("data"))
            if key in have:
                continue
            have.add(key)
            fields = {k: copy.deepcopy(source[k]) for k in ("dataType", "data", "tags", "tlp", "pap", "ioc")
                      if k in source}
            copies.append(self._new_observable(_CASE_LINK, case["_id"], fields))
        return copies

    def _mark_imported(self, alert: dict, case: dict) -> None:
        alert.update(caseId=case["_id"], status="Imported", stage="Imported", importedDate=self._now_ms())
        self._touch(alert)

    def _from_alert(self, alert: dict) -> dict:
        """``details.fromAlert``: TheHive 5 adds the title, TheHive 4 does not
        (TheHive 4 ``AlertAudit``; the TheHive 5 shape is a [guess] from its alert view)."""
        keys = ("_id", "type", "source", "sourceRef", "title") if self.version == 5 else (
            "_id", "type", "source", "sourceRef")
        return {k: alert.get(k) for k in keys}

    # -- writes: PATCH /api/v1/observable/{id}, PATCH /api/v1/case/{idOrNumber} -------------

    def _patch(self, obj: dict, body: dict) -> Tuple[int, Optional[dict]]:
        """Apply a PATCH body to ``obj`` (all or nothing). Returns (status, error body or None)."""
        is_case = obj.get("_type") == "Case"
        updated = copy.deepcopy(obj)
        details: Dict[str, Any] = {}
        tag_change = False
        for key in ("addTags", "removeTags"):
            if key in body and self.version == 4:
                # TheHive 4 has no addTags/removeTags (Properties.scala); this message text is a [guess].
                return 400, {"type": "BadRequestError", "message": f"Invalid field {key}"}
        if "tags" in body:
            if not _str_list(body["tags"]):
                return 400, {"type": "BadRequestError", "message": "Invalid format for tags: a list of strings"}
            updated["tags"] = list(dict.fromkeys(body["tags"]))
            tag_change = True
        if "addTags" in body:
            if not _str_list(body["addTags"]):
                return 400, {"type": "BadRequestError", "message": "Invalid format for addTags: a list of strings"}
            updated["tags"] = list(dict.fromkeys(list(updated.get("tags", [])) + body["addTags"]))
            tag_change = True
        if "removeTags" in body:
            if not _str_list(body["removeTags"]):
                return 400, {"type": "BadRequestError", "message": "Invalid format for removeTags: a list of strings"}
            updated["tags"] = [t for t in updated.get("tags", []) if t not in body["removeTags"]]
            tag_change = True
        if tag_change:
            details["tags"] = list(updated["tags"])

        custom_keys = [k for k in body if k == "customFields" or k.startswith("customFields.")]
        if custom_keys and not is_case:
            # Observables have no custom fields in TheHive's v1 API; the status is a [guess].
            return 400, {"type": "BadRequestError", "message": f"Invalid field {custom_keys[0]}"}
        if custom_keys:
            values, replace, error = self._custom_field_change(body, custom_keys)
            if error:
                return error
            unknown = sorted(set(values) - self.custom_fields_defined, key=list(values).index)
            if unknown:
                # TheHive 4: customFieldSrv.getOrFail; the same on TheHive 5 is a [guess].
                return 404, {"type": "NotFoundError", "message": f"CustomField {unknown[0]} not found"}
            _set_custom_fields(updated, values, replace)
            if self.version == 4:
                # fixCustomFieldDetails: {name: {type: value, order}} (reference §2)
                details["customFields"] = {k: v for k, v in _v0_custom_fields(updated).items() if k in values}
            else:  # [guess] the TheHive 5 details of a custom field change: name -> new value
                details["customFields"] = dict(values)

        for key, value in body.items():
            if key in ("tags", "addTags", "removeTags") or key in custom_keys:
                continue
            if key.startswith("_") or key in ("number", "data") or "." in key:
                # Read-only or unknown paths; TheHive's exact answer for these is a [guess].
                return 400, {"type": "BadRequestError", "message": f"Invalid field {key}"}
            updated[key] = copy.deepcopy(value)
            details[key] = copy.deepcopy(value)

        _label(updated)
        obj.clear()
        obj.update(updated)
        self._touch(obj, self.api_user)
        self._audit("update", obj, details, self.api_user, self._request_id())
        return 204, None

    def _custom_field_change(self, body: dict, keys: List[str]) -> Tuple[Dict[str, Any], bool, Optional[tuple]]:
        """The custom field values a PATCH sets and whether they replace all others (``CaseSrv.updateCustomField``; thehive4go)."""
        values: Dict[str, Any] = {}
        replace = False
        for key in keys:
            value = body[key]
            if key != "customFields":
                if self.version == 5:
                    # Whether TheHive 5 accepts the dotted form is unconfirmed; refusing it
                    # keeps a client on the documented map form [guess].
                    return {}, False, (400, {"type": "BadRequestError", "message": f"Invalid field {key}"})
                values[key[len("customFields."):]] = copy.deepcopy(value)
            elif isinstance(value, dict):
                values.update(copy.deepcopy(value))
                replace = self.version == 4  # TheHive 4 updateCustomField drops the fields not listed
            elif isinstance(value, list) and self.version == 5:
                if not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
                    return {}, False, (400, {"type": "BadRequestError", "message": "Invalid custom fields format"})
                values = {v["name"]: copy.deepcopy(v.get("value")) for v in value}
                replace = True  # "replaces the whole list" (TheHive 5 spec)
            else:
                return {}, False, (400, {"type": "BadRequestError", "message": "Invalid custom fields format"})
        return values, replace, None

    # -- audits and webhooks -----------------------------------------------------------------------------

    def _request_id(self) -> str:
        """One id per request or flow, shared by all its audits, shaped like TheHive's."""
        with self._lock:
            self._next_request += 1
            return f"sim0000000000000:-1:18fd3a1b2c4:-8000:{self._next_request}"

    def _audit(self, action: str, obj: dict, details: dict, actor: str, request_id: str,
               root_id: Optional[str] = None, v0_object: Optional[dict] = None, base: bool = True) -> dict:
        """Build the audit of a change to ``obj`` (already made), record it and queue it for ``webhook``."""
        with self._lock:
            kind = obj.get("_type")
            parent = self._parent(obj)
            now = self._now_ms()  # after the change, so later than the object's _updatedAt
            org_name = self.organisation or "sim-org"
            if self.version == 5:
                served = _served(obj)
                if parent is not None:
                    served["case" if parent["_type"] == "Case" else "alert"] = _served(parent)
                audit = {"_id": self._new_id(), "_type": "Audit", "_createdBy": actor, "_createdAt": now,
                         "action": action, "requestId": request_id, "objectId": obj["_id"], "objectType": kind,
                         # the case or alert an observable belongs to, the object itself otherwise
                         "rootId": root_id or (parent or obj)["_id"],
                         "details": copy.deepcopy(details), "object": served,
                         "organisation": {"organisationId": "~1", "organisation": org_name}}
            else:
                # TheHive 4 webhook version 0 (Webhook.scala buildMessage; tests/samples/th4-case-artifact-
                # create.json): v0 objects, flat organisation. A case observable is its own context, so its
                # rootId is itself; an alert observable's is its alert (AuditSrv).
                if root_id is None:
                    root_id = parent["_id"] if parent is not None and parent["_type"] == "Alert" else obj["_id"]
                audit = {"operation": action, "objectType": {"Case": "case", "Observable": "case_artifact",
                                                             "Alert": "alert"}[kind],
                         "objectId": obj["_id"], "base": base, "startDate": now, "rootId": root_id,
                         "requestId": request_id, "details": _v1_details(details) if action == "create" else
                         copy.deepcopy(details),
                         "object": v0_object if v0_object is not None else self._v0_object(obj),
                         "organisationId": "~1", "organisation": org_name}
            self.audits.append(audit)
            self._enqueue_webhook(audit)
            return audit

    def _parent(self, obj: dict) -> Optional[dict]:
        if obj.get(_CASE_LINK) in self.cases:
            return self.cases[obj[_CASE_LINK]]
        if obj.get(_ALERT_LINK) in self.alerts:
            return self.alerts[obj[_ALERT_LINK]]
        return None

    def _v0_object(self, obj: dict) -> dict:
        kind = obj.get("_type")
        if kind == "Case":
            return _v0_case(obj)
        if kind == "Alert":
            return _v0_alert(obj)
        served = _v0_observable(obj)
        parent = self._parent(obj)
        if parent is not None:  # the key is named after the parent's type (AuditRenderer)
            served["case" if parent["_type"] == "Case" else "alert"] = self._v0_object(parent)
        return served

    def _enqueue_webhook(self, audit: dict) -> None:
        """Queue an audit for ``webhook``; a lone daemon thread hands them over in order, outside _lock."""
        hook = self.webhook
        if hook is None:
            return
        with self._hook_cond:
            self._hook_pending += 1
            if self._hook_thread is None:
                self._hook_thread = threading.Thread(target=self._send_webhooks, name="thehive-sim-webhooks",
                                                     daemon=True)
                self._hook_thread.start()
        self._hook_queue.put((hook, copy.deepcopy(audit)))

    def _send_webhooks(self) -> None:
        while True:
            hook, audit = self._hook_queue.get()
            try:
                hook(audit)
            except Exception as exc:  # keep the sender alive; a test reads webhook_errors
                with self._hook_cond:
                    self.webhook_errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                with self._hook_cond:
                    self._hook_pending -= 1
                    self._hook_cond.notify_all()

    def drain_webhooks(self, timeout: float = 10) -> None:
        """Wait until every queued audit has been handed to ``webhook`` and the last call returned.
        TimeoutError after ``timeout`` seconds."""
        with self._hook_cond:
            if not self._hook_cond.wait_for(lambda: self._hook_pending == 0, timeout=timeout):
                raise TimeoutError(f"{self._hook_pending} webhook(s) still pending after {timeout}s")

    def post_webhooks_to(self, url: str, headers: dict) -> None:
        """Send each audit from now on as TheHive's webhook notifier does: a JSON POST to ``url``.
        A non-2xx answer or a connection error lands in ``webhook_errors``."""
        import requests  # a runtime dependency of the project; imported here to keep the module light

        sent_headers = dict(headers)

        def post(audit: dict) -> None:
            requests.post(url, json=audit, headers=sent_headers, timeout=10).raise_for_status()

        self.webhook = post

    # -- query engine -----------------------------------------------------------------------------

    def run_query(self, ops: Any) -> List[dict]:
        """Evaluate a v1 query (a list of operations); raises QueryError for what TheHive rejects."""
        return self.query_page(ops)[0]

    def query_page(self, ops: Any) -> Tuple[List[dict], Optional[int]]:
        """``run_query`` plus the total that a ``page`` asking ``extraData: ["total"]`` gets: the size
        of the set before paging (None when not asked, or with ``send_total`` off)."""
        if not isinstance(ops, list) or not ops or not all(isinstance(op, dict) for op in ops):
            raise QueryError("query must be a non-empty list of operations")
        total = None
        with self._lock:
            items = self._source(ops[0])
            for op in ops[1:]:
                if op.get("_name") == "page" and _wants_total(op) and self.send_total:
                    total = len(items)
                items = self._apply(op, items)
            return [_served(item) for item in items], total

    def _source(self, op: dict) -> List[dict]:
        name = op.get("_name")
        if name == "getCase":
            case = self._find_case(op.get("idOrName"))
            return [case] if case else []
        if name == "listCase":
            return list(self.cases.values())
        if name == "getAlert":
            alert = self.alerts.get(op.get("idOrName"))
            return [alert] if alert else []
        if name == "listAlert":
            return list(self.alerts.values())
        if name == "getObservable":
            observable = self.observables.get(op.get("idOrName"))
            return [observable] if observable else []
        if name == "listObservable":
            return list(self.observables.values())  # case and alert observables alike, as TheHive
        raise QueryError(f"Unknown query source: {name}")

    def _apply(self, op: dict, items: List[dict]) -> List[dict]:
        name = op.get("_name")
        if name == "observables":
            if any(item.get("_type") not in ("Case", "Alert") for item in items):
                raise QueryError("observables applies to cases and alerts only")
            ids = {item["_id"] for item in items}
            return [o for o in self.observables.values() if any(o.get(link) in ids for link in _LINKS)]
        if name == "case":
            if any(item.get("_type") != "Observable" for item in items):
                raise QueryError("case applies to observables only")
            ids = [item.get(_CASE_LINK) for item in items]
            return [self.cases[i] for i in dict.fromkeys(ids) if i in self.cases]
        if name == "filter":
            expr = {k: v for k, v in op.items() if k != "_name"}
            return [item for item in items if _matches(expr, item)]
        if name == "sort":
            fields = op.get("_fields")
            if not (isinstance(fields, list) and fields and all(isinstance(f, dict) and len(f) == 1
                                                                  for f in fields)):
                raise QueryError("sort takes _fields: a list of {field: asc|desc}")
            keys = [next(iter(f.items())) for f in fields]
            for _, order in keys:
                if order not in ("asc", "desc"):
                    raise QueryError(f"sort order must be asc or desc, not {order!r}")
            ordered = list(items)
            for field, order in reversed(keys):  # stable sorts, the last field first
                ordered = self._sorted(ordered, field, order)
            return ordered
        if name == "page":
            start, end = op.get("from", 0), op.get("to")
            if not isinstance(start, int) or not isinstance(end, int) or start < 0 or end < start:
                raise QueryError("page needs integers 0 <= from <= to")
            return items[start:end]
        raise QueryError(f"Unknown query operation: {name}")

    def _sorted(self, items: List[dict], field: str, order: str) -> List[dict]:
        present = [i for i in items if i.get(field) is not None]
        missing = [i for i in items if i.get(field) is None]
        try:
            ordered = sorted(present, key=lambda i: i[field], reverse=order == "desc")
        except TypeError:
            raise QueryError(f"cannot sort on {field}: values of different types") from None
        return missing + ordered if self.nulls_first else ordered + missing

    def _find_case(self, id_or_name: Any) -> Optional[dict]:
        """A case by ``~id`` or by number (int or digits), as TheHive resolves ``idOrName``."""
        if isinstance(id_or_name, str) and id_or_name in self.cases:
            return self.cases[id_or_name]
        if isinstance(id_or_name, int) or (isinstance(id_or_name, str) and id_or_name.isdigit()):
            return next((c for c in self.cases.values() if str(c.get("number")) == str(id_or_name)), None)
        return None

    # -- HTTP ---------------------------------------------------------------------------------------

    def _build_app(self) -> Flask:
        app = Flask("thehive-simulator")

        @app.before_request
        def gate():
            with self._lock:
                self.requests.append((request.method, request.path))
                failure = self._failures.pop(0) if self._failures else None
            if self.delay_s:
                time.sleep(self.delay_s)
            if failure is not None:
                return _error(failure, "InternalError", f"simulated failure (HTTP {failure})")
            scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
            # Case-sensitive, as TheHive's header authentication ("Bearer " prefix; thehive4py
            # sends exactly that: TheHive4py thehive4py/session.py).
            if scheme != "Bearer" or key != self.api_key:
                return _error(401, "AuthenticationError", "Authentication failure")
            wanted = request.headers.get("X-Organisation")
            if self.organisation and wanted and wanted != self.organisation:
                if self.wrong_organisation_status == 401:
                    return _error(401, "AuthenticationError", "Authentication failure")
                return _error(self.wrong_organisation_status, "AuthorizationError",
                              f"Organisation {wanted} not found or not accessible")
            return None

        @app.post("/api/v1/query")
        def query():
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return _error(400, "BadRequest", "Invalid JSON body")
            with self._lock:
                self.queries.append(copy.deepcopy(body.get("query")))
            try:
                items, total = self.query_page(body.get("query"))
            except QueryError as exc:
                return _error(400, "BadRequest", str(exc))
            response = jsonify(items)
            if total is not None:
                response.headers["X-Total"] = str(total)
            return response

        @app.get("/api/v1/case/<id_or_name>")
        def get_case(id_or_name: str):
            with self._lock:
                case = self._find_case(id_or_name)
                if case is None:
                    return _error(404, "NotFoundError", f"Case {id_or_name} not found")
                return jsonify(_served(case))

        @app.get("/api/v1/observable/<observable_id>")
        def get_observable(observable_id: str):
            with self._lock:
                observable = self.observables.get(observable_id)
                if observable is None:
                    return _error(404, "NotFoundError", f"Observable {observable_id} not found")
                return jsonify(_served(observable))

        def patch(kind: str, find: Callable[[str], Optional[dict]], key: str):
            body = request.get_json(silent=True)
            with self._lock:
                if not isinstance(body, dict):
                    status, error = 400, {"type": "BadRequest", "message": "Invalid JSON body: expected an object"}
                else:
                    obj = find(key)
                    if obj is None:
                        status, error = 404, {"type": "NotFoundError", "message": f"{kind} {key} not found"}
                    else:
                        status, error = self._patch(obj, body)
                self.patches.append({"path": request.path, "body": copy.deepcopy(body), "status": status})
            if error is not None:
                return _error(status, error["type"], error["message"])
            return "", 204  # TheHive 4 Results.NoContent; TheHive 5 an empty body [guess]

        @app.patch("/api/v1/observable/<observable_id>")
        def patch_observable(observable_id: str):
            return patch("Observable", self.observables.get, observable_id)

        @app.patch("/api/v1/case/<id_or_number>")
        def patch_case(id_or_number: str):
            return patch("Case", self._find_case, id_or_number)

        self._add_config_routes(app)

        # [guess] TheHive's statuses for these; its body shape is ScalliGraph's {type, message}.
        @app.errorhandler(404)
        def no_route(_exc):
            return _error(404, "NotFoundError", f"No route for {request.method} {request.path}")

        @app.errorhandler(405)
        def no_method(_exc):
            return _error(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path}")

        return app

    # -- TheHive 4 organisation configuration (`tq-mw-thehive thehive-setup`) --------------------------

    def notifications(self, organisation: str = "default") -> List[dict]:
        """The ``notification`` list stored for an organisation (a copy)."""
        with self._lock:
            return copy.deepcopy(self.org_config.get(organisation, {}).get("notification", []))

    def _add_config_routes(self, app: Flask) -> None:
        """``PUT``/``GET /api/config/organisation/<name>``: reference §1 documents the PUT and its
        body ``{"value": ...}``. [guess] The GET, its ``{path, defaultValue, value}`` answer (the shape
        of TheHive 4's ConfigCtrl user items), the PUT answering the same and 403 without manageConfig."""

        def organisation() -> str:
            return request.headers.get("X-Organisation") or self.organisation or "default"

        def item(name: str, value: Any):
            return jsonify({"path": name, "defaultValue": [] if name == "notification" else None, "value": value})

        @app.put("/api/config/organisation/<name>")
        def put_org_config(name: str):
            if not self.manage_config:
                return _error(403, "AuthorizationError", "You need manageConfig permission to set configuration")
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or "value" not in body:
                return _error(400, "BadRequest", "Invalid JSON body: expected {\"value\": ...}")
            with self._lock:
                self.org_config.setdefault(organisation(), {})[name] = copy.deepcopy(body["value"])
            return item(name, body["value"])

        @app.get("/api/config/organisation/<name>")
        def get_org_config(name: str):
            if not self.config_readable:
                return _error(404, "NotFoundError", f"Configuration {name} not found")
            with self._lock:
                stored = self.org_config.get(organisation(), {})
                value = copy.deepcopy(stored.get(name, [] if name == "notification" else None))
            return item(name, value)


def _served(obj: dict) -> dict:
    """A copy as the API shows it: no internal links, safe to mutate."""
    return {k: copy.deepcopy(v) for k, v in obj.items() if k not in _LINKS}


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _set_custom_fields(obj: dict, values: Dict[str, Any], replace: bool) -> None:
    """Set custom field values, keeping (or, with ``replace``, dropping) the others; both the v1 list
    ``customFields`` ({name, value, order, type}) and the ``customFieldValues`` map follow."""
    fields = [] if replace else [dict(f) for f in obj.get("customFields", [])]
    by_name = {f["name"]: f for f in fields}
    for name, value in values.items():
        if name in by_name:
            by_name[name]["value"] = value
        else:
            field = {"name": name, "value": value, "order": len(fields), "type": "string"}
            fields.append(field)
            by_name[name] = field
    obj["customFields"] = fields
    obj["customFieldValues"] = {f["name"]: f.get("value") for f in fields}


def _v0_custom_fields(obj: dict) -> Dict[str, dict]:
    """TheHive 4 v0 custom fields: ``{name: {type: value, order}}``."""
    return {f["name"]: {f.get("type", "string"): f.get("value"), "order": f.get("order", 0)}
            for f in obj.get("customFields", [])}


def _v1_details(obj: dict) -> dict:
    """``details`` of a TheHive 4 create: the v1 entity, which has no ``*Label`` fields nor
    ``customFieldValues`` (TheHive 4 dto/v1) [guess for the exact key set]."""
    return {k: copy.deepcopy(v) for k, v in obj.items()
            if k not in _LINKS and not k.endswith("Label") and k != "customFieldValues"}


def _v0_common(obj: dict, kind: str) -> dict:
    out = {"_id": obj["_id"], "id": obj["_id"], "_type": kind, "createdBy": obj.get("_createdBy"),
           "createdAt": obj.get("_createdAt")}
    if "_updatedAt" in obj:
        out.update(updatedBy=obj.get("_updatedBy"), updatedAt=obj["_updatedAt"])
    return out


def _v0_case(case: dict) -> dict:
    """A case as TheHive 4 v0 renders it (reference §2; the status mapping is a [guess])."""
    out = _v0_common(case, "case")
    out.update({k: copy.deepcopy(case.get(k)) for k in ("title", "description", "severity", "startDate", "tags",
                                                         "flag", "tlp", "pap")})
    out.update(caseId=case.get("number"), owner=case.get("assignee"),
               status="Resolved" if case.get("stage") == "Closed" else "Open",
               customFields=_v0_custom_fields(case), stats={}, permissions=[])
    return out


def _v0_observable(observable: dict) -> dict:
    """An observable as TheHive 4 v0 renders it: ``case_artifact``, no ``pap`` (reference §2)."""
    out = _v0_common(observable, "case_artifact")
    out.update({k: copy.deepcopy(observable.get(k)) for k in ("dataType", "data", "startDate", "tlp", "tags", "ioc",
                                                               "sighted", "message", "reports", "ignoreSimilarity")})
    out["stats"] = {}
    return out


def _v0_alert(alert: dict) -> dict:
    """An alert as TheHive 4 v0 renders it (TheHive 4 ``controllers/v0/Conversion.scala``); ``status`` from the case link, the unread
    variant ("Updated") not played."""
    out = _v0_common(alert, "alert")
    out.update({k: copy.deepcopy(alert.get(k)) for k in ("type", "source", "sourceRef", "externalLink", "title",
                                                         "description", "severity", "date", "tags", "tlp", "pap",
                                                         "follow", "caseTemplate")})
    out.update(case=alert.get("caseId"), status="Imported" if alert.get("caseId") else "New",
               customFields=_v0_custom_fields(alert), artifacts=[])
    return out


def _wants_total(page: dict) -> bool:
    """Whether a ``page`` operation asks for the total (``extraData`` is a list of names)."""
    extra = page.get("extraData", [])
    if not isinstance(extra, list):
        raise QueryError("page extraData must be a list of names")
    return "total" in extra


def _label(obj: dict) -> None:
    """Derive the TheHive 5 ``*Label`` fields from the numbers, so the two never disagree."""
    for number, label, names in (("severity", "severityLabel", SEVERITY_LABELS), ("tlp", "tlpLabel", TLP_LABELS),
                                 ("pap", "papLabel", PAP_LABELS)):
        if number in obj:
            obj[label] = names.get(obj[number], str(obj[number]))


def _like(value: Any, pattern: Any) -> bool:
    """``_like``: ``*`` is a wildcard; without one, a substring (case-insensitive) [guess]."""
    if not isinstance(value, str) or not isinstance(pattern, str):
        return False
    value, pattern = value.lower(), pattern.lower()
    if "*" not in pattern:
        return pattern in value
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value) is not None


def _equal(a: Any, b: Any) -> bool:
    # A list field (tags) equals a value it holds, as TheHive's filters on multi-valued fields.
    return b in a if isinstance(a, list) and not isinstance(b, list) else a == b


_COMPARE: Dict[str, Callable[[Any, Any], bool]] = {
    "_gte": lambda a, b: a >= b,
    "_lte": lambda a, b: a <= b,
    "_gt": lambda a, b: a > b,
    "_lt": lambda a, b: a < b,
    "_eq": _equal,
    "_is": _equal,
    "_like": _like,
    "_match": lambda a, b: isinstance(a, str) and isinstance(b, str) and b.lower() in a.lower(),
    "_startsWith": lambda a, b: isinstance(a, str) and isinstance(b, str) and a.startswith(b),
    "_endsWith": lambda a, b: isinstance(a, str) and isinstance(b, str) and a.endswith(b),
}


def _matches(expr: Any, item: dict) -> bool:
    """Evaluate one filter expression; a missing or null field never matches a comparison."""
    if not isinstance(expr, dict) or len(expr) != 1:
        raise QueryError("a filter holds exactly one operator")
    (operator, arg), = expr.items()
    if operator in ("_and", "_or"):
        if not isinstance(arg, list):
            raise QueryError(f"{operator} takes a list of filters")
        results: Iterable[bool] = (_matches(sub, item) for sub in arg)
        return all(results) if operator == "_and" else any(results)
    if operator == "_not":
        return not _matches(arg, item)
    if operator == "_id":
        return item.get("_id") == arg
    if operator in ("_has", "_contains"):
        if not isinstance(arg, str):
            raise QueryError(f"{operator} takes a field name")
        return item.get(arg) is not None
    if operator == "_in":
        if not isinstance(arg, dict) or "_field" not in arg or not isinstance(arg.get("_values"), list):
            raise QueryError("_in takes {_field, _values: [...]}")
        value = item.get(arg["_field"])
        return value is not None and any(_equal(value, v) for v in arg["_values"])
    if operator == "_between":
        if not isinstance(arg, dict) or not {"_field", "_from", "_to"} <= set(arg):
            raise QueryError("_between takes {_field, _from, _to}")
        value = item.get(arg["_field"])
        try:  # from inclusive, to exclusive (thehive4py query/filters.py Between)
            return value is not None and arg["_from"] <= value < arg["_to"]
        except TypeError:
            return False
    if operator == "_ne":
        if not isinstance(arg, dict) or "_field" not in arg or "_value" not in arg:
            raise QueryError("_ne takes {_field, _value}")
        return not _equal(item.get(arg["_field"]), arg["_value"])
    if operator in _COMPARE:
        if not isinstance(arg, dict) or "_field" not in arg or "_value" not in arg:
            raise QueryError(f"{operator} takes {{_field, _value}}")
        value = item.get(arg["_field"])
        if value is None:
            return False
        try:
            return _COMPARE[operator](value, arg["_value"])
        except TypeError:
            return False
    raise QueryError(f"Unknown filter operator: {operator}")
