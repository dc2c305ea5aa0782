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
    def __init__(self, api_key: str = "thehive-sim-api-key", organisation: Optional[str] = None) -> None:
        self.api_key = api_key
        self.organisation = organisation
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
            return copy.deepcopy(case)

    def update_case(self, case_id: str, **fields: Any) -> dict:
        """Change a case as an analyst would: ``_updatedAt``/``_updatedBy`` move on."""
        with self._lock:
            case = self.cases[case_id]
            case.update(fields)
            _label(case)
            self._touch(case)
            return copy.deepcopy(case)

    def add_observable(self, case_id: str, **fields: Any) -> dict:
        """Store an observable in ``case_id`` (KeyError if absent). Returns the served form."""
        with self._lock:
            case = self.cases[case_id]
            observable = self._new_observable(_CASE_LINK, case_id, fields)
            self._touch(case)
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
            return copy.deepcopy(alert)

    def add_alert_observable(self, alert_id: str, **fields: Any) -> dict:
        """Store an observable in alert ``alert_id`` (KeyError if absent). Returns the served form."""
        with self._lock:
            alert = self.alerts[alert_id]
            observable = self._new_observable(_ALERT_LINK, alert_id, fields)
            self._touch(alert)
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
            return _served(observable)

    def _touch(self, obj: dict) -> None:
        obj["_updatedAt"] = self._now_ms()
        obj["_updatedBy"] = SIM_USER

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` API requests with ``status`` before looking at them."""
        with self._lock:
            self._failures.extend([status] * n)

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
