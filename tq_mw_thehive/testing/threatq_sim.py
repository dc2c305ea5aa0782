"""An in-memory ThreatQ REST API: the subset in ``docs/threatq-api-subset.md`` (the contract).

The client (``tq_mw_thehive/threatq``) is tested against this simulator, so it must behave the
way the contract says a real instance does, including where the contract only guesses.

Where each behaviour comes from (contract section, then the research notes behind it):

- Token flow (contract "Token"; research §1: ThreatQuotient's SDK, XSOAR, Polarity, Siemplify):
  ``password`` grant (``grant_type``/``client_id`` in the query or the JSON body, ``email``/
  ``password`` in the body), ``client_credentials`` (HTTP Basic ``client_id:client_secret``),
  ``refresh_token`` (query, with the current Bearer; a refresh token is single-use). Bad
  credentials answer 400 ``{"errors": [...]}``; tokens live ``token_ttl`` seconds (3600 s in
  XSOAR's mock, 30 min in the SDK).
- Envelope, paging, status codes and the two error shapes (contract "Envelope, paging, errors";
  research §7, XSOAR's error parser and mocks). Every list is paged by ``limit`` (default 50)
  and ``offset`` and carries ``total``/``limit``/``offset``.
- Lookups (contract "Lookups"; names from SDK2's ``/api/objects`` dump, shapes from XSOAR's mocks).
- Indicators, events, incidents and ``/api/search`` (contract sections of those names; research
  §2-§4 and §6).
- Attributes, tags, sources, links (contract "Sub-resources of any object"; research §5-§6).
- Fault injection (``fail_next``, ``rate_limit_next``, ``delay_s``, ``down``, ``refresh_fails``,
  ``consume_records_limit``) and the inspection helpers are the simulator's own, for the client's
  tests: no ThreatQ source.
- Latency (``latency_ms``, a constructor argument and attribute, default 0): every request,
  ``/api/token`` included, waits that many milliseconds before it is answered, as a remote
  instance's round trip would (the benchmarks' ``bench/burst.py`` uses 50 ms). The wait happens
  outside the state lock, so concurrent requests each wait in parallel, as on a real server;
  ``delay_s`` (a fault knob, seconds) adds to it.

Two answer shapes (``shapes``), because the public sources disagree and the client must accept both:

- ``strict``: the contract's reading. Sources carry ``tlp_id``; attribute rows ``name``; list
  filters match literally; consume answers in the order sent; every call of the contract is served.
- ``sdk``: what the public captures and ThreatQuotient's SDK show. Sources are link rows without a
  TLP (``{id, source_id, name, published_at, pivot: {id}}``, stix-shifter's captures); attribute
  rows name their attribute in ``attribute: {id, name}`` (SDK1 reads ``a["attribute"]["name"]``);
  list filters read a comma as "or" and ``%`` as a wildcard, ignoring case (SDK2's ``find()``
  rewrites a title with a comma to ``first_part%``); consume answers in an order of its own
  (SDK2 matches records by value); and the calls without public evidence are not served:
  ``PUT …/sources/{pivot}`` (405), ``GET …/tags`` (404), ``DELETE …/tags/{id}`` (405).

``refuse`` turns off optional calls one by one in either shape (``OPTIONAL_ROUTES``);
``query_or`` refuses only ``/query`` criteria with ``+or`` (400), as an instance that has the
endpoint but not that operator may.

``# [guess]`` marks code that implements a **[guess]** of the contract; ``# [sim choice]`` marks
what the contract leaves open and this simulator decides (the strict reading, so client bugs show).

Serve it with ``LoopbackServer(sim.app)`` (``tq_mw_thehive.testing.loopback``); Werkzeug serves it
threaded, so all state sits behind one lock.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DEFAULT_LIMIT = 50
TLP_IDS = (1, 2, 3, 4)  # 1 RED, 2 AMBER, 3 GREEN, 4 WHITE (CLEAR)

# Ids are list positions + 1: stable for every simulator, as the client must still resolve them
# by name (they differ per real instance). The contract's names plus the extra defaults of the
# research notes' /api/objects dump (CVE, File Path, Fuzzy Hash, MAC Address, Mutex).
# [guess] `class` per type; `score` None and `wildcard_matching` "Y" as in XSOAR's mocks.
INDICATOR_TYPES: Tuple[Tuple[str, str], ...] = (
    ("ASN", "network"), ("CIDR Block", "network"), ("CVE", "host"), ("Email Address", "network"),
    ("Email Subject", "network"), ("File Path", "host"), ("Filename", "host"), ("FQDN", "network"),
    ("Fuzzy Hash", "host"), ("IP Address", "network"), ("IPv6 Address", "network"),
    ("MAC Address", "host"), ("MD5", "host"), ("Mutex", "host"), ("Registry Key", "host"),
    ("SHA-1", "host"), ("SHA-256", "host"), ("SHA-384", "host"), ("SHA-512", "host"),
    ("String", "host"), ("URL", "network"), ("URL Path", "network"), ("User-agent", "network"),
    ("Username", "host"),
)
STATUSES = ("Active", "Expired", "Indirect", "Review", "Whitelisted")
EVENT_TYPES = ("Spearphish", "Watering Hole", "SQL Injection Attack", "DoS Attack", "Malware",
               "Watchlist", "Command and Control", "Anonymization", "Exfiltration",
               "Host Characteristics", "Compromised PKI Certificate", "Login Compromise", "Incident",
               "Sighting")

_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_MISSING = object()
SHAPES = ("strict", "sdk")
# Optional calls the simulator can refuse, with the status it answers then (a missing method on
# a served path is 405, a missing path 404, as Laravel's router answers).
OPTIONAL_ROUTES: Dict[str, int] = {"source_tlp": 405, "source_list": 404, "tag_list": 404, "tag_delete": 405,
                                   "query": 404, "query_or": 400}
_SDK_REFUSES = frozenset({"source_tlp", "tag_list", "tag_delete"})

Key = Tuple[str, int]  # (collection, id): one object


@dataclass(frozen=True)
class _Kind:
    """One object collection: its path segment, search name, identifying field and fields."""
    collection: str
    name: str
    key: str
    fields: Tuple[str, ...]  # a record's fields besides id and timestamps, in answer order
    required: Tuple[str, ...]
    updatable: Tuple[str, ...]
    display: Tuple[str, str]


KINDS: Dict[str, _Kind] = {k.collection: k for k in (
    _Kind("indicators", "indicator", "value", ("value", "type_id", "status_id", "description"),
          ("value", "type_id"), ("value", "status_id", "description"), ("Indicator", "Indicators")),
    _Kind("events", "event", "title", ("title", "type_id", "happened_at", "description"),
          ("title", "type_id", "happened_at"), ("title", "happened_at", "description"),
          ("Event", "Events")),
    # [guess] the incident custom object has the shape of other custom objects: keyed by value.
    _Kind("incident", "incident", "value", ("value", "description"), ("value",),
          ("value", "description"), ("Incident", "Incidents")),
)}
# Names the inspection helpers accept for a collection, besides the collection itself.
_ALIASES = {"indicator": "indicators", "event": "events", "incidents": "incident"}


class ApiError(Exception):
    """A non-2xx answer, raised anywhere (gate, view, validation) and rendered by one handler."""

    def __init__(self, status: int, body: dict, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FieldError(Exception):
    """One field failed validation: a 400 ``{"data": {"errors": {field: [message]}}}``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message


def _invalid(errors: Dict[str, List[str]]) -> ApiError:
    return ApiError(400, {"data": {"errors": errors}})


def _not_found() -> ApiError:
    return ApiError(404, {"errors": ["Not found"]})


def _data(payload: Any, status: int = 200) -> Tuple[Response, int]:
    return jsonify({"data": payload}), status


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _label(field: str) -> str:
    return field.rsplit(".", 1)[-1].replace("_", " ")


def _text(body: dict, field: str, blank_ok: bool = False) -> Any:
    """A string field; blank counts as missing unless ``blank_ok`` (Laravel's ``required``)."""
    value = body.get(field)
    if value is None:
        return _MISSING
    if not isinstance(value, str):
        raise FieldError(field, f"The {_label(field)} must be a string.")
    return value if blank_ok or value.strip() else _MISSING


def _lookup_id(body: dict, id_field: str, name_field: str, names: Sequence[str]) -> Any:
    """An id from ``<x>_id`` or from the name in ``<x>`` (research: XSOAR sends names)."""
    if body.get(id_field) is not None:
        value = body[id_field]
        if not _is_int(value) or not 1 <= value <= len(names):
            raise FieldError(id_field, f"The selected {_label(id_field)} is invalid.")
        return value
    if body.get(name_field) is not None:
        if body[name_field] not in names:
            raise FieldError(name_field, f"The selected {name_field} is invalid.")
        return names.index(body[name_field]) + 1
    return _MISSING


def _happened_at(body: dict) -> Any:
    value = body.get("happened_at")
    if value is None:
        return _MISSING
    try:
        if not isinstance(value, str) or not _DATETIME.fullmatch(value):
            raise ValueError(value)
        datetime.strptime(value, TIME_FORMAT)
    except ValueError:
        raise FieldError("happened_at", "The happened at does not match the format Y-m-d H:i:s.") from None
    return value


def _tlp(body: dict, prefix: str = "") -> int:
    # [sim choice] tlp_id is required wherever a source is given: the contract always sends it, and
    # the project never lets a source go out without a restriction.
    value = body.get("tlp_id")
    if value is None:
        raise FieldError(prefix + "tlp_id", "The tlp id field is required.")
    if not _is_int(value) or value not in TLP_IDS:
        raise FieldError(prefix + "tlp_id", "The selected tlp id is invalid.")
    return value


def _source(item: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(item, dict):
        raise FieldError(prefix.rstrip(".") or "body", "A source must be a JSON object.")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FieldError(prefix + "name", "The name field is required.")
    return {"name": name, "tlp_id": _tlp(item, prefix)}


def _sources(body: dict) -> Any:
    value = body.get("sources")
    if value is None:
        return _MISSING
    if not isinstance(value, list):
        raise FieldError("sources", "The sources must be an array.")
    return [_source(item, f"sources.{i}.") for i, item in enumerate(value)]


def _int_arg(name: str, default: int, minimum: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise FieldError(name, f"The {name} must be an integer of at least {minimum}.")
    return int(raw)


def _page(items: List[Any]) -> Response:
    """Every list answer: ``limit``/``offset`` from the query, ``total`` before paging."""
    limit, offset = _int_arg("limit", DEFAULT_LIMIT, 1), _int_arg("offset", 0, 0)
    return jsonify({"total": len(items), "limit": limit, "offset": offset,
                    "data": items[offset:offset + limit]})


def _strict_source(entry: dict) -> dict:
    """A source as the contract shows it: ``{id, name, tlp_id, pivot: {id}}``."""
    return {"id": entry["id"], "name": entry["name"], "tlp_id": entry["tlp_id"], "pivot": dict(entry["pivot"])}


def _json_body() -> Any:
    return request.get_json(silent=True)


class ThreatQSimulator:
    """ThreatQ's REST API for the client's tests: real HTTP, in-memory state, injectable faults."""

    def __init__(self, users: Optional[Dict[str, str]] = None, client_id: str = "tq-client-id",
                 client_secrets: Optional[Dict[str, str]] = None, token_ttl: int = 3600,
                 incident_object: bool = True, consume: bool = True, inline: bool = True,
                 shapes: str = "strict", refuse: Sequence[str] = (), latency_ms: float = 0) -> None:
        self.users = dict(users or {"analyst@example.org": "correct horse battery staple"})
        self.client_id = client_id
        self.client_secrets = dict(client_secrets or {})
        self.token_ttl = token_ttl
        self.incident_object = incident_object
        #: False: an instance without ``POST /api/indicators/consume`` (it answers 404).
        self.consume = consume
        #: False: an instance that ignores ``with=`` (the sub-resources are read with their own calls).
        self.inline = inline
        self.shapes = shapes
        #: Optional calls refused in any shape (names of ``OPTIONAL_ROUTES``), besides the shape's own.
        self.refuse = set(refuse)
        #: At most this many records in a consume answer (0: none), for the client's fallbacks.
        self.consume_records_limit: Optional[int] = None
        #: Milliseconds every request (token grants included) waits before it is answered, outside
        #: the lock: a network round trip to a remote instance. May be changed while serving.
        self.latency_ms: float = latency_ms
        # Fault knobs: tests set these directly while the server runs.
        self.delay_s: float = 0.0
        self.down: bool = False
        self.refresh_fails: bool = False
        #: Time source for token expiry and timestamps; a test may swap it to move time on.
        self.clock: Callable[[], float] = time.time
        self.access_tokens: Dict[str, float] = {}
        self.refresh_tokens: Dict[str, str] = {}
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.RLock()
        self._faults: Deque[ApiError] = deque()
        self._ids: Dict[str, Iterator[int]] = defaultdict(lambda: itertools.count(1))
        self._objects: Dict[str, Dict[int, dict]] = {c: {} for c in KINDS}
        self._attrs: Dict[Key, List[dict]] = defaultdict(list)
        self._tags: Dict[Key, List[dict]] = defaultdict(list)
        self._tag_ids: Dict[str, int] = {}
        self._sources: Dict[Key, List[dict]] = defaultdict(list)
        self._source_ids: Dict[str, int] = {}
        self._attribute_type_ids: Dict[str, int] = {}
        self._links: Dict[int, Tuple[Key, Key]] = {}
        self.app = self._build_app()

    @property
    def shapes(self) -> str:
        """``strict`` or ``sdk`` (see the module's docstring); may be changed while serving."""
        return self._shapes

    @shapes.setter
    def shapes(self, value: str) -> None:
        if value not in SHAPES:
            raise ValueError(f"shapes must be one of {SHAPES}, not {value!r}")
        self._shapes = value

    def refuses(self, step: str) -> bool:
        """Whether the optional call ``step`` is refused (by ``refuse`` or by the shape)."""
        return step in self.refuse or (self.shapes == "sdk" and step in _SDK_REFUSES)

    def _served(self, step: str) -> None:
        if self.refuses(step):
            status = OPTIONAL_ROUTES[step]
            raise ApiError(status, {"errors": ["Not found" if status == 404 else "Method Not Allowed"]})

    # ----------------------------------------------------------------- fault injection

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next ``n`` API calls (not ``/api/token``) answer ``status``: for retry tests."""
        self._queue_faults(n, status, {"errors": ["Simulated failure"]})

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        """The next ``n`` API calls answer 429 with ``Retry-After``.

        [guess] the contract documents no rate limit; the client must still honour one.
        """
        self._queue_faults(n, 429, {"errors": ["Too Many Requests"]}, {"Retry-After": str(retry_after)})

    def _queue_faults(self, n: int, status: int, body: dict,
                      headers: Optional[Dict[str, str]] = None) -> None:
        """Faults answer in the order queued, one per API call."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._faults.extend(ApiError(status, body, headers) for _ in range(n))

    # ----------------------------------------------------------------- tokens

    def _issue(self) -> dict:
        access, refresh = secrets.token_hex(20), secrets.token_hex(20)
        with self._lock:
            self.access_tokens[access] = self.clock() + self.token_ttl
            self.refresh_tokens[refresh] = access
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.token_ttl,
                "token_type": "bearer"}

    def token_valid(self, header: Optional[str]) -> bool:
        """Whether an ``Authorization`` header carries a known, unexpired Bearer token."""
        scheme, _, token = (header or "").partition(" ")
        with self._lock:
            expiry = self.access_tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and expiry > self.clock()

    def expire_all_tokens(self) -> None:
        """Every issued access token is now expired: the next API call answers 401."""
        with self._lock:
            for token in self.access_tokens:
                self.access_tokens[token] = 0.0

    def _token(self) -> Any:
        body = request.get_json(silent=True) or {}
        field = lambda name: request.args.get(name) or body.get(name)  # noqa: E731
        grant = field("grant_type")
        if grant == "password":
            if field("client_id") != self.client_id:
                return jsonify({"errors": ["The client credentials are invalid."]}), 400
            if self.users.get(body.get("email")) != body.get("password") or not body.get("password"):
                return jsonify({"errors": ["The user credentials were incorrect."]}), 400
            return jsonify(self._issue())
        if grant == "client_credentials":
            auth = request.authorization
            if not auth or self.client_secrets.get(auth.username) != auth.password:
                return jsonify({"errors": ["Client authentication failed."]}), 400
            return jsonify(self._issue())
        if grant == "refresh_token":
            if self.refresh_fails:  # leaves the refresh token usable once the knob is off
                return jsonify({"errors": ["The refresh token is invalid."]}), 400
            old = self.refresh_tokens.pop(field("refresh_token") or "", None)
            if old is None:
                return jsonify({"errors": ["The refresh token is invalid."]}), 400
            self.access_tokens.pop(old, None)
            return jsonify(self._issue())
        return jsonify({"errors": [f"Unsupported grant type: {grant}"]}), 400

    # ----------------------------------------------------------------- inspection helpers

    @property
    def indicators(self) -> Dict[int, dict]:
        """A snapshot copy, id → indicator record."""
        return self._snapshot("indicators")

    @property
    def events(self) -> Dict[int, dict]:
        """A snapshot copy, id → event record."""
        return self._snapshot("events")

    @property
    def incidents(self) -> Dict[int, dict]:
        """A snapshot copy, id → incident record."""
        return self._snapshot("incident")

    def attributes_of(self, collection: str, oid: int) -> List[dict]:
        """``[{id, name, value}]`` on one object (``collection`` as in the API, or singular)."""
        return self._copy(self._attrs.get((self._canonical(collection), oid), []))

    def tags_of(self, collection: str, oid: int) -> List[str]:
        with self._lock:
            return [tag["name"] for tag in self._tags.get((self._canonical(collection), oid), [])]

    def sources_of(self, collection: str, oid: int) -> List[dict]:
        """``[{id, name, tlp_id, pivot: {id}}]`` on one object (with the TLP, whatever the shape)."""
        with self._lock:
            return [_strict_source(e) for e in self._sources.get((self._canonical(collection), oid), [])]

    def links_of(self, collection: str, oid: int, collection2: str) -> List[int]:
        """Ids of the ``collection2`` objects linked to one object, whichever side linked them."""
        with self._lock:
            me = (self._canonical(collection), oid)
            return [other[1] for _, other in self._related(me, self._canonical(collection2))]

    def find_indicators(self, value: str, type_name: Optional[str] = None) -> List[dict]:
        """Indicators with exactly this value (and type name): how a test checks for duplicates."""
        names = [name for name, _ in INDICATOR_TYPES]
        type_id = names.index(type_name) + 1 if type_name in names else None
        with self._lock:
            return [copy.deepcopy(r) for r in self._objects["indicators"].values()
                    if r["value"] == value and (type_name is None or r["type_id"] == type_id)]

    def delete_object(self, collection: str, oid: int) -> None:
        """An analyst deletes an object in ThreatQ's UI: it and its links are gone (a stored id
        of it now answers 404)."""
        with self._lock:
            key = (self._canonical(collection), oid)
            del self._objects[key[0]][oid]
            for pivot_id in [p for p, (a, b) in self._links.items() if key in (a, b)]:
                del self._links[pivot_id]

    def _snapshot(self, collection: str) -> Dict[int, dict]:
        with self._lock:
            return copy.deepcopy(self._objects[collection])

    def _copy(self, items: List[dict]) -> List[dict]:
        with self._lock:
            return copy.deepcopy(items)

    @staticmethod
    def _canonical(collection: str) -> str:
        return _ALIASES.get(collection, collection)

    # ----------------------------------------------------------------- the app

    def _build_app(self) -> Flask:
        app = Flask("threatq-simulator")
        app.json.sort_keys = False  # records answer in their documented field order
        app.before_request(self._gate)
        app.register_error_handler(ApiError, self._render)
        app.register_error_handler(FieldError, lambda e: self._render(_invalid({e.field: [e.message]})))
        app.register_error_handler(HTTPException, lambda e: (
            jsonify({"errors": ["Not found" if e.code == 404 else e.name]}), e.code))
        obj, sub = "/api/<collection>/<int:oid>", "/api/<collection>/<int:oid>/"
        routes: List[Tuple[str, str, Callable[..., Any]]] = [
            ("POST", "/api/token", self._token),
            ("GET", "/api/indicator/types", lambda: _page([
                {"id": i, "name": name, "class": cls, "score": None, "wildcard_matching": "Y"}
                for i, (name, cls) in enumerate(INDICATOR_TYPES, 1)])),
            ("GET", "/api/indicator/statuses", lambda: _page([
                {"id": i, "name": name} for i, name in enumerate(STATUSES, 1)])),
            ("GET", "/api/event/types", lambda: _page([
                {"id": i, "name": name, "user_editable": "N"} for i, name in enumerate(EVENT_TYPES, 1)])),
            ("GET", "/api/objects", lambda: _page([
                {"collection": k.collection, "display_name": k.display[0],
                 "display_name_plural": k.display[1]} for k in self._kinds()])),
            ("GET", "/api/search", self._search),
            ("POST", "/api/<collection>/consume", self._consume),
            ("POST", "/api/<collection>/query", self._query),
            ("GET", "/api/<collection>", self._list_objects),
            ("POST", "/api/<collection>", self._create_objects),
            ("GET", obj, lambda **url: _data(self._expanded(url["collection"], self._record(**url)))),
            ("PUT", obj, self._update_object),
            ("GET", sub + "attributes", lambda **url: _page(
                [self._render_attribute(a) for a in self._attrs[self._key(**url)]])),
            ("POST", sub + "attributes", self._add_attribute),
            ("PUT", sub + "attributes/<int:aid>", self._update_attribute),
            ("DELETE", sub + "attributes/<int:aid>", self._delete_attribute),
            ("GET", sub + "tags", self._list_tags),
            ("POST", sub + "tags", self._add_tags),
            ("DELETE", sub + "tags/<int:tag_id>", self._delete_tag),
            ("GET", sub + "sources", self._list_sources),
            ("POST", sub + "sources", self._add_source),
            ("PUT", sub + "sources/<int:pivot_id>", self._update_source),
            ("GET", sub + "<other>", self._list_links),
            ("POST", sub + "<other>", self._add_links),
            ("DELETE", sub + "<other>", self._delete_links),
        ]
        for method, rule, view in routes:
            app.add_url_rule(rule, f"{method} {rule}", self._locked(view), methods=[method])
        return app

    def _locked(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """Each view runs whole under the one lock: answers never see half an update."""
        def run(**kwargs: Any) -> Any:
            with self._lock:
                return view(**kwargs)
        return run

    @staticmethod
    def _render(error: ApiError) -> Tuple[Response, int, Dict[str, str]]:
        return jsonify(error.body), error.status, error.headers

    def _gate(self) -> None:
        """Before every request: log it, then latency and delay, outage, queued faults and the token
        check. The waits hold no lock: concurrent requests wait in parallel."""
        with self._lock:
            self.requests.append((request.method, request.path))
        wait_s = max(0.0, self.latency_ms) / 1000 + max(0.0, self.delay_s)
        if wait_s > 0:
            time.sleep(wait_s)
        if self.down:
            raise ApiError(503, {"errors": ["Service unavailable"]})
        if request.path == "/api/token" or not request.path.startswith("/api/"):
            return
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:  # [sim choice] a queued fault answers before the token is checked
            raise fault
        if not self.token_valid(request.headers.get("Authorization")):
            raise ApiError(401, {"errors": ["Unauthenticated."]})  # [guess] the message text

    # ----------------------------------------------------------------- objects

    def _kinds(self) -> List[_Kind]:
        return [k for k in KINDS.values() if k.collection != "incident" or self.incident_object]

    def _kind(self, collection: str) -> _Kind:
        kind = KINDS.get(collection)
        if kind is None or kind not in self._kinds():
            raise _not_found()
        return kind

    def _record(self, collection: str, oid: int) -> dict:
        record = self._objects[self._kind(collection).collection].get(oid)
        if record is None:
            raise _not_found()
        return record

    def _key(self, collection: str, oid: int) -> Key:
        """The key of an object named by a URL: 404 unless it exists."""
        self._record(collection, oid)
        return collection, oid

    def _now(self) -> str:
        return time.strftime(TIME_FORMAT, time.gmtime(self.clock()))

    def _field(self, kind: _Kind, field: str, body: dict) -> Any:
        if field == kind.key:
            return _text(body, field)
        if field == "description":
            return _text(body, field, blank_ok=True)
        if field == "type_id":
            names = [n for n, _ in INDICATOR_TYPES] if kind.collection == "indicators" else EVENT_TYPES
            return _lookup_id(body, "type_id", "type", names)
        if field == "status_id":
            return _lookup_id(body, "status_id", "status", STATUSES)
        if field == "happened_at":
            return _happened_at(body)
        return _sources(body)

    def _clean(self, kind: _Kind, body: Any, fields: Sequence[str], required: Sequence[str],
               prefix: str = "") -> Dict[str, Any]:
        """The accepted fields of a body, or a 400 naming every bad field (``0.value`` in arrays)."""
        if not isinstance(body, dict):
            raise _invalid({prefix.rstrip(".") or "body": ["A JSON object is required."]})
        clean: Dict[str, Any] = {}
        errors: Dict[str, List[str]] = {}
        for field in fields:
            try:
                value = self._field(kind, field, body)
            except FieldError as exc:
                errors[prefix + exc.field] = [exc.message]
                continue
            if value is not _MISSING:
                clean[field] = value
            elif field in required:
                errors[prefix + field] = [f"The {_label(field)} field is required."]
        if errors:
            raise _invalid(errors)
        return clean

    def _store(self, kind: _Kind, fields: Dict[str, Any]) -> dict:
        oid, now = next(self._ids[kind.collection]), self._now()
        defaults = {"status_id": 1} if kind.collection == "indicators" else {}
        record = {"id": oid, **{f: fields.get(f, defaults.get(f)) for f in kind.fields},
                  "created_at": now, "updated_at": now}
        self._objects[kind.collection][oid] = record
        for source in fields.get("sources", []):
            self._attach_source((kind.collection, oid), source)
        return record

    def _list_objects(self, collection: str) -> Response:
        """Exact match on the identifying field; other filters (such as ``type_id``) are ignored,
        as the contract says the client filters by type itself."""
        kind = self._kind(collection)
        records = list(self._objects[kind.collection].values())
        if kind.key in request.args:
            records = [r for r in records if self._matches(r[kind.key], request.args[kind.key])]
        return _page([self._expanded(kind.collection, r) for r in records])

    def _create_objects(self, collection: str) -> Any:
        kind = self._kind(collection)
        body = _json_body()
        fields = (*kind.fields, "sources")
        if kind.collection != "indicators":
            return _data(self._store(kind, self._clean(kind, body, fields, kind.required)), 201)
        # Indicators: an object or an array; `data` is an array either way (research: XSOAR).
        is_array = isinstance(body, list)
        items = body if is_array else [body]
        if not items:
            raise FieldError("body", "At least one indicator is required.")
        cleaned = [self._clean(kind, item, fields, kind.required, f"{i}." if is_array else "")
                   for i, item in enumerate(items)]  # all validated before any is stored
        # [guess] a plain create never de-duplicates: the same value and type twice makes two.
        return _data([self._store(kind, c) for c in cleaned], 201)

    def _update_object(self, collection: str, oid: int) -> Any:
        kind, record = self._kind(collection), self._record(collection, oid)
        record.update(self._clean(kind, _json_body(), kind.updatable, ()), updated_at=self._now())
        return _data(self._expanded(kind.collection, record))

    # The sub-resources `with=` puts inline (research §6: "with= to expand (attributes, sources,
    # score, type, status, tags)", and §2 "append ?with=attributes,sources" to an update).
    # [guess] inline items have the shape of the sub-resource lists (ids, pivots included).
    _EXPANSIONS = ("attributes", "sources", "tags")

    def _expanded(self, collection: str, record: dict) -> dict:
        """``record`` with the sub-resources named in ``?with=`` inline (unknown names ignored)."""
        wanted = [w.strip() for w in request.args.get("with", "").split(",") if w.strip() in self._EXPANSIONS]
        if not wanted or not self.inline:
            return record
        key = (self._kind(collection).collection, record["id"])
        rendered = {"attributes": lambda: [self._render_attribute(a) for a in self._attrs[key]],
                    "sources": lambda: [self._render_source(s) for s in self._sources[key]],
                    "tags": lambda: copy.deepcopy(self._tags[key])}
        return {**record, **{w: rendered[w]() for w in wanted}}

    def _render_attribute(self, attribute: dict) -> dict:
        """An attribute row as answered: ``strict`` ``{id, name, value, sources}``; ``sdk`` names it
        only in ``attribute: {id, name}`` (with ``attribute_id``), as SDK1 reads it."""
        if self.shapes == "strict":
            return copy.deepcopy(attribute)
        type_id = self._attribute_type_ids.setdefault(attribute["name"], len(self._attribute_type_ids) + 1)
        return {"id": attribute["id"], "attribute_id": type_id, "value": attribute["value"],
                "sources": copy.deepcopy(attribute.get("sources", [])),
                "attribute": {"id": type_id, "name": attribute["name"]}}

    def _render_source(self, entry: dict) -> dict:
        """An object's source as answered: ``strict`` with its ``tlp_id``; ``sdk`` a link row
        without any TLP (stix-shifter's captured answers, XSOAR's mocks)."""
        if self.shapes == "strict":
            return _strict_source(entry)
        return {"id": entry["pivot"]["id"], "source_id": entry["id"], "name": entry["name"],
                "published_at": entry["published_at"], "pivot": {"id": entry["pivot"]["id"]}}

    def _list_sources(self, collection: str, oid: int) -> Response:
        self._served("source_list")
        return _page([self._render_source(s) for s in self._sources[self._key(collection, oid)]])

    def _list_tags(self, collection: str, oid: int) -> Response:
        self._served("tag_list")  # [guess] the list path; no public client reads tags this way
        return _page(self._tags[self._key(collection, oid)])

    def _matches(self, stored: Any, wanted: str) -> bool:
        """One list-filter value against a stored key: literal in ``strict``; in ``sdk`` a comma
        separates alternatives, ``%`` is a wildcard, case is ignored (SDK2 ``find()``)."""
        if self.shapes == "strict":
            return stored == wanted
        if not isinstance(stored, str):
            return False
        for alternative in wanted.split(","):
            pattern = ".*".join(re.escape(part) for part in alternative.split("%"))
            if re.fullmatch(pattern, stored, flags=re.IGNORECASE | re.DOTALL):
                return True
        return False

    def _criteria_match(self, kind: _Kind, record: dict, condition: Any) -> bool:
        """A ``/query`` criteria or filters object: ``{field: value}``, ``{field: {"is": value}}``,
        ``+or``/``+and`` lists; fields ``value``/``title``, ``type_name``/``type``, ``type_id``.
        Values compare literally (``strict``) or ignoring case (``sdk``); a JSON body has no
        special characters."""
        if not isinstance(condition, dict):
            return True
        for key, wanted in condition.items():
            if key in ("+or", "+and"):
                parts = [self._criteria_match(kind, record, c) for c in (wanted or [])]
                ok = (any(parts) if key == "+or" else all(parts)) if parts else True
            else:
                ok = self._field_is(kind, record, key, wanted.get("is") if isinstance(wanted, dict) else wanted)
            if not ok:
                return False
        return True

    def _field_is(self, kind: _Kind, record: dict, field: str, wanted: Any) -> bool:
        if field in ("type_name", "type") and kind.collection == "indicators":
            names = [n for n, _ in INDICATOR_TYPES]
            field, wanted = "type_id", names.index(wanted) + 1 if wanted in names else -1
        if field not in record:
            return True  # [sim choice] criteria on fields a kind does not have are ignored
        stored = record[field]
        if self.shapes == "sdk" and isinstance(stored, str) and isinstance(wanted, str):
            return stored.casefold() == wanted.casefold()
        return stored == wanted

    def _query(self, collection: str) -> Response:
        """``POST /api/{collection}/query`` body ``{criteria, filters}`` (XSOAR, Siemplify,
        stix-shifter; SDK1's threat library pages it with ``limit``/``offset``)."""
        kind = self._kind(collection)
        self._served("query")
        body = _json_body()
        if not isinstance(body, dict):
            raise FieldError("body", "A JSON object with criteria is required.")
        if self.refuses("query_or") and "+or" in json.dumps(body.get("criteria")):
            raise FieldError("criteria", "Unknown operator +or.")  # [sim choice] an instance without it
        records = [r for r in self._objects[kind.collection].values()
                   if self._criteria_match(kind, r, body.get("criteria"))
                   and self._criteria_match(kind, r, body.get("filters"))]
        return _page([self._expanded(kind.collection, r) for r in records])

    def _search(self) -> Response:
        query = request.args.get("query") or ""
        if not query.strip():
            raise FieldError("query", "The query field is required.")
        hits = [{"id": r["id"], "value": r[k.key], "object": k.name}
                for k in self._kinds() for r in self._objects[k.collection].values()
                if query.casefold() in r[k.key].casefold()]  # [guess] case-insensitive substring
        return _page(hits)

    def _consume(self, collection: str) -> Any:
        """``POST /api/{collection}/consume``: an array of objects, each carrying its sources,
        attributes, tags and relations (research §2: SDK2 ``bulk_object``, SDK1 ``bulkindicator``;
        the generic form serves every collection).

        [guess] keyed like the plain look-ups (indicators: value and type; events: title;
        incidents: value): an object that exists is merged into (sources, attributes, tags and
        links added when missing; its status and a non-empty description stay), a new one is
        created. Every item is validated before any is stored.
        """
        kind = self._kind(collection)
        if not self.consume:
            raise _not_found()
        body = _json_body()
        if not isinstance(body, list) or not body:
            raise FieldError("body", f"A JSON array of {kind.display[1].lower()} is required.")
        plans = [self._consume_item(kind, item, f"{i}.") for i, item in enumerate(body)]
        answer, created = [], False
        for fields, attributes, tags, targets in plans:
            same = ("value", "type_id") if kind.collection == "indicators" else (kind.key,)
            record = next((r for r in self._objects[kind.collection].values()
                           if all(r[f] == fields[f] for f in same)), None)
            if record is None:
                record, created = self._store(kind, fields), True
            else:
                for source in fields.get("sources", []):
                    self._attach_source((kind.collection, record["id"]), source)
                if not record["description"] and fields.get("description"):
                    record["description"] = fields["description"]
            key = (kind.collection, record["id"])
            for attribute in attributes:
                if not any(a["name"] == attribute["name"] and a["value"] == attribute["value"]
                           for a in self._attrs[key]):
                    self._attrs[key].append({"id": next(self._ids["attribute"]), **attribute})
            for name in tags:
                self._tag(key, name)
            for target in targets:
                self._link(key, target)
            answer.append(record)
        if self.shapes == "sdk":
            answer.reverse()  # an order of its own: the client matches records by value (SDK2)
        if self.consume_records_limit is not None:
            answer = answer[:self.consume_records_limit]
        return _data(answer, 201 if created else 200)

    def _consume_item(self, kind: _Kind, item: Any, prefix: str
                      ) -> Tuple[Dict[str, Any], List[dict], List[str], List[Key]]:
        """One consume item: its fields, attributes, tag names and link targets, or a 400."""
        if not isinstance(item, dict):
            raise _invalid({prefix.rstrip("."): ["A JSON object is required."]})
        # The SDK sends `type`/`status` as {"name": …}; the plain create takes the bare name.
        flat = {k: (v.get("name") if k in ("type", "status") and isinstance(v, dict) else v)
                for k, v in item.items()}
        fields = self._clean(kind, flat, (*kind.fields, "sources"), kind.required, prefix)
        attributes = []
        for i, attribute in enumerate(item.get("attributes") or []):
            at = f"{prefix}attributes.{i}."
            if not isinstance(attribute, dict):
                raise FieldError(at.rstrip("."), "An attribute must be a JSON object.")
            attributes.append(self._attribute_fields(attribute, at))
        tags = []
        for i, tag in enumerate(item.get("tags") or []):  # [guess] names, or {"name": …} objects
            name = tag.get("name") if isinstance(tag, dict) else tag
            if not isinstance(name, str) or not name.strip():
                raise FieldError(f"{prefix}tags.{i}", "A tag must be a name.")
            tags.append(name)
        targets: List[Key] = []
        for other in self._kinds():
            if other.collection == kind.collection or other.collection not in item:
                continue  # [sim choice] other keys are ignored, as unknown fields are elsewhere
            for i, ref in enumerate(item[other.collection] or []):
                target = ref.get("id") if isinstance(ref, dict) else None
                if not _is_int(target) or target not in self._objects[other.collection]:
                    raise FieldError(f"{prefix}{other.collection}.{i}.id", "The selected id is invalid.")
                targets.append((other.collection, target))
        return fields, attributes, tags, targets

    # ----------------------------------------------------------------- attributes and tags

    def _attribute(self, collection: str, oid: int, aid: int) -> dict:
        for attribute in self._attrs[self._key(collection, oid)]:
            if attribute["id"] == aid:
                return attribute
        raise _not_found()

    @staticmethod
    def _attribute_value(body: dict) -> str:
        # [sim choice] values are text, as on ThreatQ; numbers are accepted and kept as text.
        value = body.get("value")
        if _is_int(value) or isinstance(value, float):
            return str(value)
        if not isinstance(value, str) or not value.strip():
            raise FieldError("value", "The value field is required.")
        return value

    def _attribute_fields(self, body: dict, prefix: str = "") -> dict:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FieldError(prefix + "name", "The name field is required.")
        sources = body.get("sources", [])
        if not isinstance(sources, list) or not all(isinstance(src, dict) and isinstance(src.get("name"), str)
                                                    and src["name"].strip() for src in sources):
            raise FieldError(prefix + "sources", "The sources must be a list of objects with a name.")
        try:
            value = self._attribute_value(body)
        except FieldError as exc:
            raise FieldError(prefix + exc.field, exc.message) from None
        return {"name": name, "value": value, "sources": [{"name": src["name"]} for src in sources]}

    def _add_attribute(self, collection: str, oid: int) -> Any:
        key, body = self._key(collection, oid), _json_body()
        if not isinstance(body, dict):
            raise FieldError("body", "A JSON object is required.")
        # [sim choice] no de-duplication of attributes: the contract does not promise any.
        attribute = {"id": next(self._ids["attribute"]), **self._attribute_fields(body)}
        self._attrs[key].append(attribute)
        return _data([self._render_attribute(attribute)], 201)

    def _update_attribute(self, collection: str, oid: int, aid: int) -> Any:
        attribute = self._attribute(collection, oid, aid)
        body = _json_body()
        attribute["value"] = self._attribute_value(body if isinstance(body, dict) else {})
        return _data(self._render_attribute(attribute))

    def _delete_attribute(self, collection: str, oid: int, aid: int) -> Any:
        self._attrs[(collection, oid)].remove(self._attribute(collection, oid, aid))
        return "", 204

    def _add_tags(self, collection: str, oid: int) -> Any:
        """Body ``[{"name": t}, ...]`` (a single ``{"name": t}`` too, as Polarity sends it).

        Tag ids are global by name; a tag already on the object is not added twice.
        """
        key, body = self._key(collection, oid), _json_body()
        items = body if isinstance(body, list) else [body]
        names = []
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not name.strip():
                field = f"{i}.name" if isinstance(body, list) else "name"
                raise FieldError(field, "The name field is required.")
            names.append(name)
        if not names:
            raise FieldError("body", "At least one tag is required.")
        answer, added = [], False
        for name in dict.fromkeys(names):
            tag, new = self._tag(key, name)
            added = added or new
            answer.append(tag)
        return _data(answer, 201 if added else 200)

    def _tag(self, key: Key, name: str) -> Tuple[dict, bool]:
        """The tag ``name`` on the object, added if missing: ``(tag, added)``."""
        if name not in self._tag_ids:
            self._tag_ids[name] = next(self._ids["tag"])
        tag = {"id": self._tag_ids[name], "name": name}
        if tag in self._tags[key]:
            return tag, False
        self._tags[key].append(tag)
        return tag, True

    def _delete_tag(self, collection: str, oid: int, tag_id: int) -> Any:
        self._served("tag_delete")
        tags = self._tags[self._key(collection, oid)]  # [guess] the delete path
        for tag in tags:
            if tag["id"] == tag_id:
                tags.remove(tag)
                return "", 204
        raise _not_found()

    # ----------------------------------------------------------------- sources

    def _attach_source(self, key: Key, source: Dict[str, Any]) -> Tuple[dict, bool]:
        """The object's source of that name, added if missing: ``(source, added)``.

        [sim choice] an existing source keeps its TLP; a change of TLP goes through PUT.
        """
        for existing in self._sources[key]:
            if existing["name"] == source["name"]:
                return existing, False
        if source["name"] not in self._source_ids:
            self._source_ids[source["name"]] = next(self._ids["source"])
        entry = {"id": self._source_ids[source["name"]], "name": source["name"],
                 "tlp_id": source["tlp_id"], "pivot": {"id": next(self._ids["source_pivot"])},
                 "published_at": self._now()}
        self._sources[key].append(entry)
        return entry, True

    def _add_source(self, collection: str, oid: int) -> Any:
        # [sim choice] the contract gives no answer shape: `data` is an array, like attributes/tags.
        entry, added = self._attach_source(self._key(collection, oid), _source(_json_body()))
        return _data([self._render_source(entry)], 201 if added else 200)

    def _update_source(self, collection: str, oid: int, pivot_id: int) -> Any:
        # [guess] how a source's TLP changes: PUT on the source pivot (no public evidence).
        self._served("source_tlp")
        for entry in self._sources[self._key(collection, oid)]:
            if entry["pivot"]["id"] == pivot_id:
                body = _json_body()
                entry["tlp_id"] = _tlp(body if isinstance(body, dict) else {})
                return _data(self._render_source(entry))
        raise _not_found()

    # ----------------------------------------------------------------- links

    def _related(self, me: Key, collection2: str) -> List[Tuple[int, Key]]:
        """``(pivot id, other object)`` for every link of ``me`` to ``collection2``, both sides."""
        related = []
        for pivot_id, (a, b) in self._links.items():
            other = b if a == me else a if b == me else None
            if other is not None and other[0] == collection2:
                related.append((pivot_id, other))
        return related

    def _with_pivot(self, pivot_id: int, other: Key) -> dict:
        return {**self._objects[other[0]][other[1]], "pivot": {"id": pivot_id}}

    def _list_links(self, collection: str, oid: int, other: str) -> Response:
        me, collection2 = self._key(collection, oid), self._kind(other).collection
        return _page([self._with_pivot(p, o) for p, o in self._related(me, collection2)])

    def _add_links(self, collection: str, oid: int, other: str) -> Any:
        """Body ``{"id": n}`` or ``[{"id": n}, ...]`` (research: XSOAR, SDK); linking twice
        returns the existing pivot [sim choice]."""
        me, collection2 = self._key(collection, oid), self._kind(other).collection
        body = _json_body()
        items = body if isinstance(body, list) else [body]
        targets = []
        for i, item in enumerate(items):
            field = f"{i}.id" if isinstance(body, list) else "id"
            target = item.get("id") if isinstance(item, dict) else None
            known = _is_int(target) and target in self._objects[collection2]
            if not known or (collection2, target) == me:  # [sim choice] no link to itself
                raise FieldError(field, "The selected id is invalid.")
            targets.append((collection2, target))
        if not targets:
            raise FieldError("body", "At least one id is required.")
        answer, added = [], False
        for target in targets:
            pivot_id, new = self._link(me, target)
            added = added or new
            answer.append(self._with_pivot(pivot_id, target))
        return _data(answer, 201 if added else 200)

    def _link(self, me: Key, target: Key) -> Tuple[int, bool]:
        """The link between two objects, made if missing: ``(pivot id, added)``."""
        existing = [p for p, o in self._related(me, target[0]) if o == target]
        if existing:
            return existing[0], False
        pivot_id = next(self._ids["link_pivot"])
        self._links[pivot_id] = (me, target)
        return pivot_id, True

    def _delete_links(self, collection: str, oid: int, other: str) -> Any:
        """Body ``[pivot_id, ...]``; all or nothing: a pivot id that is not a link of this object
        to ``other`` answers 404 and removes none [sim choice]."""
        me, collection2 = self._key(collection, oid), self._kind(other).collection
        body = _json_body()
        if not isinstance(body, list) or not body or not all(_is_int(p) for p in body):
            raise FieldError("body", "A JSON array of pivot ids is required.")
        mine = {p for p, _ in self._related(me, collection2)}
        if not set(body) <= mine:
            raise _not_found()
        for pivot_id in set(body):
            del self._links[pivot_id]
        return "", 204
