"""Hostile input against ONE live daemon (gunicorn, 2 workers, loopback): thousands of generated requests.

Every answer must be one docs/sync.md promises: a 4xx with ``{"status": "error", "error": …}`` (401 for
authentication), or a 200 whose status is queued, duplicate or ignored; never a 500, never a dropped
connection, and the daemon is alive and healthy afterwards. ``webhook.max_body_mb`` is set small
(0.05 MB) so that the size limit is crossed often and cheaply.

Known bugs found here are pinned by the ``xfail(strict=True)`` tests at the end; the generators above
stay clear of exactly those inputs (each place says which), so that they keep testing everything else.
"""
from __future__ import annotations

import copy
import http.client
import json
from typing import Any, Dict, Optional

import pytest
import requests
from requests.structures import CaseInsensitiveDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st

from conftest import SAMPLE_NAMES, WEBHOOK_TOKEN, sample, sample_text, write_config
from tq_mw_thehive.testing.daemon import Daemon

pytestmark = pytest.mark.e2e

LIMIT_MB = 0.05
LIMIT = int(LIMIT_MB * 1024 * 1024)           # the byte limit the app enforces (MAX_CONTENT_LENGTH)
GUNICORN_DRAIN = 64 * 1024                    # gunicorn drains at most this much of an unread body
FIELD_LINE_MAX = 8190                         # gunicorn's limit_request_field_size
FIELDS_MAX = 100                              # gunicorn's limit_request_fields
AUTH = f"Bearer {WEBHOOK_TOKEN}"
BEARER = {"Authorization": AUTH}
ACCEPTED = ("queued", "duplicate", "ignored")
INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)  # wider timestamps: test_out_of_range_timestamp_is_a_400
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow, HealthCheck.data_too_large])

# Requests sent, and the generating tests that ran to the end (the total is checked last).
SENT = {"requests": 0}
FINISHED = set()
GENERATORS = {"test_random_json_values", "test_envelopes_with_fields_of_the_wrong_type",
              "test_truncated_samples", "test_invalid_utf8", "test_unknown_versions_and_types",
              "test_deep_nesting", "test_huge_strings_and_the_size_limit", "test_header_abuse"}
MIN_REQUESTS = 2000


class Live:
    """The daemon, one keep-alive session to it, and how many workers it had booted at the start."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.url = daemon.url
        self.session = requests.Session()
        self.boots = daemon.log_text().count("Booting worker with pid")

    def post(self, data: Any, headers: Optional[Dict[str, Any]] = None, path: str = "/cases",
             timeout: float = 30) -> requests.Response:
        SENT["requests"] += 1
        headers = dict(headers if headers is not None else BEARER)
        size = len(data) if isinstance(data, (bytes, str)) else None
        if size is None or size > GUNICORN_DRAIN:
            # A body the app does not read (401, 413) and gunicorn cannot drain makes gunicorn drop
            # the keep-alive connection it announced: test_keepalive_survives_a_rejected_large_body.
            headers.setdefault("Connection", "close")
        try:
            return self.session.post(self.url + path, data=data, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            pytest.fail(f"connection error ({exc!r}) for a {size}-byte body with headers "
                        f"{ {k: str(v)[:80] for k, v in headers.items()} }")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("hostile")
    write_config(config_dir, webhook={"max_body_mb": LIMIT_MB}, enrichment={"enabled": False})
    daemon = Daemon(config_dir, config_dir / "logs", verbosity="2")
    try:
        yield Live(daemon.start())
    finally:
        daemon.stop()


@pytest.fixture
def fresh_log(live):
    """No request of this test made the app log an internal error (its 500 path)."""
    start = len(live.daemon.log_text())
    yield
    added = live.daemon.log_text()[start:]
    assert "internal error on" not in added, added[added.find("internal error on"):][:3000]


def check(response: requests.Response, what: str = "") -> Any:
    """The promise of docs/sync.md for any answer of the app; returns the JSON body."""
    where = f"{what}: {response.status_code} {response.text[:300]!r}"
    assert response.status_code < 500, where
    assert response.headers.get("Content-Type", "").startswith("application/json"), where
    body = response.json()
    if response.status_code == 200:
        assert body["status"] in ACCEPTED, where
    else:
        assert 400 <= response.status_code < 500, where
        assert body["status"] == "error" and isinstance(body["error"], str) and body["error"], where
        assert set(body) == {"status", "error"}, where
    return body


def finished(name: str) -> None:
    FINISHED.add(name)


# --------------------------------------------------------------------------- strategies

# st.text() never draws lone surrogates: those are test_lone_surrogate_in_an_id_is_a_400.
leaves = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(
    leaves, lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children,
                                                                            max_size=5),
    max_leaves=20)


def unique(event: dict, tag: int) -> dict:
    """The same event under a new identity, so that it is queued rather than a duplicate."""
    event = copy.deepcopy(event)
    if "_id" in event:
        event["_id"] = f"~h{tag}"
    else:
        event["requestId"] = f"hostile:{tag}"
    return event


@st.composite
def sample_events(draw) -> dict:
    name = draw(st.sampled_from(SAMPLE_NAMES))
    return unique(sample(name), draw(st.integers(0, 10 ** 12)))


# --------------------------------------------------------------------------- generated requests

@settings(max_examples=400, **SETTINGS)
@given(value=json_values, as_text=st.booleans())
def test_random_json_values(live, fresh_log, value, as_text):
    body = json.dumps(value)
    answer = check(live.post(body if as_text else body.encode()), body[:200])
    if not isinstance(value, dict):
        assert answer["status"] == "error" and "JSON object" in answer["error"]
    finished("test_random_json_values")


ENVELOPE_FIELDS = {
    # field: the JSON types it may have (anything else is the wrong type)
    "objectType": (str,), "action": (str,), "operation": (str,), "objectId": (str,), "_id": (str,),
    "rootId": (str,), "requestId": (str,), "_createdAt": (int,), "startDate": (int,), "createdAt": (int,),
    "object": (dict,), "details": (dict,), "context": (dict,), "organisation": (dict, str),
}


def wrong_type(field: str):
    allowed = ENVELOPE_FIELDS[field]

    def bad(value):
        if isinstance(value, bool):
            return True  # never an int here, never a str
        return not isinstance(value, allowed)
    return json_values.filter(bad)


@st.composite
def wrongly_typed(draw):
    event = draw(sample_events())
    fields = draw(st.lists(st.sampled_from(sorted(ENVELOPE_FIELDS)), min_size=1, max_size=5, unique=True))
    for field in fields:
        event[field] = draw(wrong_type(field))
    return event, fields


@settings(max_examples=550, **SETTINGS)
@given(case=wrongly_typed())
def test_envelopes_with_fields_of_the_wrong_type(live, fresh_log, case):
    event, fields = case
    answer = check(live.post(json.dumps(event)), json.dumps(event)[:300])
    # The fields every shape reads: a wrong type there is always a 400.
    always = {"objectType", "objectId", "_id", "rootId", "requestId", "object", "details", "context"}
    v1 = "action" in event or event.get("_type") == "Audit"
    decisive = [f for f in fields if (f in always and (event[f] is not None or f == "objectType"))
                or f == "action" or (f == "operation" and not v1)
                or (f == "_createdAt" and v1 and event[f] is not None)
                or (f == "startDate" and not v1 and event[f] is not None)]
    if decisive:
        assert answer["status"] == "error", (fields, answer)
    finished("test_envelopes_with_fields_of_the_wrong_type")


@settings(max_examples=300, **SETTINGS)
@given(name=st.sampled_from(SAMPLE_NAMES), cut=st.floats(0, 1, exclude_max=True), chunked=st.booleans())
def test_truncated_samples(live, fresh_log, name, cut, chunked):
    body = sample_text(name).rstrip().encode()
    cut_at = int(len(body) * cut)
    truncated = body[:cut_at]
    data: Any = truncated if not chunked else (truncated[i:i + 500] for i in range(0, len(truncated), 500))
    answer = check(live.post(data), f"{name}[:{cut_at}]")
    assert answer["status"] == "error", f"{name} cut at {cut_at} of {len(body)} was accepted"
    finished("test_truncated_samples")


INVALID_UTF8 = st.sampled_from([b"\x80", b"\xbf", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                                b"\xf0\x9f\x98", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe", b"\xff"])


@settings(max_examples=250, **SETTINGS)
@given(event=sample_events(), where=st.floats(0, 1), bad=st.lists(INVALID_UTF8, min_size=1, max_size=3),
       raw=st.binary(max_size=200), use_raw=st.booleans())
def test_invalid_utf8(live, fresh_log, event, where, bad, raw, use_raw):
    if use_raw:
        body = raw
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            body += b"\xff"
    else:
        text = json.dumps(event).encode()
        at = int(len(text) * where)
        body = text[:at] + b"".join(bad) + text[at:]
    try:
        body.decode("utf-8")
        valid = True  # two fragments can make one valid sequence (b"\xc3" + b"\xbf" is "ÿ")
    except UnicodeDecodeError:
        valid = False
    answer = check(live.post(body), repr(body[:200]))
    if not valid:
        assert answer["status"] == "error" and "UTF-8" in answer["error"], answer
    finished("test_invalid_utf8")


@settings(max_examples=200, **SETTINGS)
@given(event=sample_events(), version=st.one_of(st.just(7), st.integers(-5, 100), json_values),
       type_=st.one_of(st.none(), st.sampled_from(["Audit", "audit", "Event", "AuditV7", "", "Case"]),
                       st.text(max_size=20)),
       extra=st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_unknown_versions_and_types(live, fresh_log, event, version, type_, extra):
    event.update({k: v for k, v in extra.items() if k not in ENVELOPE_FIELDS and k != "_type"})
    event["version"] = version
    if type_ is None:
        event.pop("_type", None)
    else:
        event["_type"] = type_
    answer = check(live.post(json.dumps(event)), json.dumps(event)[:300])
    if "action" in event:
        # The audit shape is read from "action", whatever version or _type say.
        assert answer["status"] in ACCEPTED, answer
    finished("test_unknown_versions_and_types")


def nested(kind: str, depth: int) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    if kind == "dict":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + "[]" + "}]" * (depth // 2)


@settings(max_examples=200, **SETTINGS)
@given(kind=st.sampled_from(["list", "dict", "mixed"]),
       depth=st.one_of(st.integers(1, 5000), st.integers(900, 1100), st.integers(5000, LIMIT // 6)),
       place=st.sampled_from(["top", "object", "details", "context", "extra"]), event=sample_events())
def test_deep_nesting(live, fresh_log, kind, depth, place, event):
    inner = nested(kind, depth)
    if place == "top":
        body = inner
    else:
        marker = '"__deep__"'
        event[place if place != "extra" else "customFields"] = "__deep__"
        body = json.dumps(event).replace(marker, inner, 1)
    assume(len(body.encode()) <= LIMIT)
    answer = check(live.post(body), f"{kind} depth {depth} in {place}")
    tally(f"nested {place}: {answer['status']}")
    if place == "top":
        assert answer["status"] == "error"
    finished("test_deep_nesting")


@settings(max_examples=90, **SETTINGS)
@given(event=sample_events(),
       size=st.one_of(st.integers(LIMIT - 2000, LIMIT + 2000), st.integers(1, 1_000_000),
                      st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 1_000_000])),
       char=st.sampled_from(["x", "é", "\u2603", "\U0001f600", "\\", '"', "\x00"]),
       field=st.sampled_from(["title", "description", "data", "message", "pad"]), chunked=st.booleans(),
       authenticated=st.booleans())
def test_huge_strings_and_the_size_limit(live, fresh_log, event, size, char, field, chunked, authenticated):
    """Huge strings in a valid event, and bodies just under, at and just over webhook.max_body_mb."""
    container = event.get("object") if isinstance(event.get("object"), dict) else event
    container[field] = ""
    skeleton = json.dumps(event).encode()
    # Pad the string so that the body is `size` bytes (a char may take 1 to 6 bytes in the JSON).
    unit = len(json.dumps(char).encode()) - 2
    count = max(0, (size - len(skeleton)) // unit)
    container[field] = char * count
    body = json.dumps(event).encode()
    headers = BEARER if authenticated else {}
    data: Any = body if not chunked else (body[i:i + 65536] for i in range(0, len(body), 65536))
    tally("over the limit" if len(body) > LIMIT else "within the limit")
    answer = check(live.post(data, headers), f"{len(body)} bytes, chunked={chunked}")
    if not authenticated:
        assert answer == {"status": "error", "error": "authentication required"}
    elif len(body) > LIMIT:
        assert "webhook.max_body_mb" in answer["error"], (len(body), answer)
    elif len(body) < LIMIT:  # a chunked body of exactly the limit is refused too (see test_web)
        assert answer["status"] in ACCEPTED, (len(body), answer)
    finished("test_huge_strings_and_the_size_limit")


# ----- header abuse

header_names = st.from_regex(r"\AX-[A-Za-z0-9-]{1,24}\Z")
CTL = set(range(0, 9)) | set(range(10, 32)) | {127}


def printable_bytes(min_size=0, max_size=60):
    """Header values requests will send: no CR/LF, no leading whitespace."""
    return st.binary(min_size=min_size, max_size=max_size).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b" \t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"))


@st.composite
def abusive_requests(draw):
    """(headers, body, how): one or several kinds of header abuse on one request."""
    event = draw(sample_events())
    body = json.dumps(event).encode()
    headers: Dict[str, Any] = CaseInsensitiveDict({"Authorization": AUTH})
    kinds = draw(st.sets(st.sampled_from(["huge", "many", "content_type", "auth", "chunked"]), min_size=1))
    if "huge" in kinds:
        size = draw(st.one_of(st.integers(1, 20_000), st.integers(8100, 8300), st.integers(20_000, 1_000_000)))
        headers[draw(header_names)] = "h" * size
    if "many" in kinds:
        for name in draw(st.lists(header_names, min_size=1, max_size=160, unique_by=str.lower)):
            headers.setdefault(name, draw(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                  max_size=10)))
    if "content_type" in kinds:
        headers["Content-Type"] = draw(st.one_of(
            st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                             "multipart/form-data; boundary=zzz", "application/xml", "image/png",
                             "application/json; charset=utf-16", "application/json; charset=latin-1",
                             "*/*", "application/json, text/html"]),
            printable_bytes(1, 80)))
    if "auth" in kinds:
        headers["Authorization"] = draw(st.one_of(
            printable_bytes(0, 120),
            st.builds(lambda junk: b"Bearer " + junk, printable_bytes(0, 80)),
            st.builds(lambda junk: AUTH.encode() + junk, printable_bytes(1, 20)),
            st.builds(lambda junk: b"Bearer " + junk + WEBHOOK_TOKEN.encode(), printable_bytes(1, 5)),
            st.just("Bearer " + WEBHOOK_TOKEN.upper()), st.just("Bearer \u00e9\u00e8\u00ff"),
            st.just(b"Bearer \xc3\xa9" + WEBHOOK_TOKEN.encode())))
    chunked = "chunked" in kinds
    return headers, body, chunked


def bearer_accepted(value: Any) -> bool:
    """What ``webhook.auth: bearer`` accepts: scheme ``Bearer`` in any case, whitespace around ignored."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, credential = text.strip().partition(" ")
    return scheme.lower() == "bearer" and credential.strip(" \t\n\r\x0b\x0c") == WEBHOOK_TOKEN


def parser_rejects(headers: Dict[str, Any], chunked: bool) -> bool:
    """Whether gunicorn's HTTP parser refuses the request before the app sees it."""
    fields = len(headers) + len({"host", "user-agent", "accept-encoding", "accept", "connection",
                                 "content-length"} - {k.lower() for k in headers})
    values = {k: v if isinstance(v, bytes) else v.encode("latin-1") for k, v in headers.items()}
    too_long = any(len(k) + len(v) + 4 > FIELD_LINE_MAX for k, v in values.items())
    control = any(b in CTL for v in values.values() for b in v)
    return fields > FIELDS_MAX or too_long or control


@settings(max_examples=260, **SETTINGS)
@given(request=abusive_requests())
def test_header_abuse(live, fresh_log, request):
    headers, body, chunked = request
    for value in headers.values():
        assume(not (isinstance(value, str) and any(ord(c) > 255 for c in value)))
    data: Any = body if not chunked else (body[i:i + 777] for i in range(0, len(body), 777))
    response = live.post(data, headers)
    tally(f"answered {response.status_code}")
    if parser_rejects(headers, chunked):
        # Refused by gunicorn's HTTP parser, still in our JSON error shape.
        assert response.status_code in (400, 431), response.status_code
        assert response.json()["status"] == "error"
    else:
        answer = check(response, f"headers {[(k, str(v)[:60]) for k, v in headers.items()]}")
        if bearer_accepted(headers["Authorization"]):
            assert answer["status"] in ACCEPTED, answer
        else:
            assert response.status_code == 401, answer
    finished("test_header_abuse")


DUPLICATES = [(AUTH, AUTH), (AUTH, "Bearer wrong"), ("Bearer wrong", AUTH), (AUTH, ""), ("", AUTH),
              (AUTH, WEBHOOK_TOKEN), ("Basic dGhlaGl2ZTp4", AUTH)]


@pytest.mark.parametrize("first, second", DUPLICATES)
def test_duplicate_authorization_headers_are_never_accepted(live, fresh_log, first, second):
    """Two Authorization headers (a proxy adding one, a smuggling attempt) are refused, whatever their order."""
    SENT["requests"] += 1
    conn = http.client.HTTPConnection("127.0.0.1", live.daemon.port, timeout=30)
    try:
        body = json.dumps(unique(sample("th5-case-create.json"), 77)).encode()
        conn.putrequest("POST", "/cases")
        conn.putheader("Authorization", first)
        conn.putheader("Authorization", second)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status in (400, 401), (status, answer)
    assert answer["status"] == "error"


# --------------------------------------------------------------------------- afterwards

def test_the_daemon_survived_and_is_healthy(live):
    print(f"hostile requests sent so far: {SENT['requests']}")
    if GENERATORS <= FINISHED:
        assert SENT["requests"] >= MIN_REQUESTS, SENT
    daemon = live.daemon
    assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    health = requests.get(live.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    log = daemon.log_text()
    # No worker process died or was replaced on the way (a crash, a timeout kill, a memory blow-up).
    assert log.count("Booting worker with pid") == live.boots, log[-3000:]
    for sign in ("WORKER TIMEOUT", "was sent SIGKILL", "Worker exited", "exited with code"):
        assert sign not in log, sign
    # And it still does its job.
    response = live.post(json.dumps(unique(sample("th5-case-create.json"), 424242)))
    assert check(response)["status"] == "queued"


# --------------------------------------------------------------------------- known bugs

@pytest.mark.parametrize("field, value", [("_createdAt", 2 ** 63), ("_createdAt", -(2 ** 63) - 1),
                                          ("startDate", 10 ** 30), ("createdAt", 10 ** 4000)])
def test_out_of_range_timestamp_is_a_400(live, field, value):
    if field == "_createdAt":
        event = {"_id": f"~ts{len(str(value))}{value < 0}", "action": "create", "objectType": "Case",
                 "objectId": "~1"}
    elif field == "startDate":
        event = {"operation": "create", "objectType": "case", "objectId": "~2", "requestId": "r-ts"}
    else:
        event = {"operation": "Creation", "objectType": "case", "objectId": "~3", "requestId": "r-ts2"}
    body = json.dumps(event)[:-1] + f', "{field}": {value}}}'
    response = live.post(body)
    assert response.status_code == 400, response.text
    check(response)


@pytest.mark.parametrize("where", ["objectId", "_id", "rootId", "object.case._id"])
def test_lone_surrogate_in_an_id_is_a_400(live, where):
    event = sample("th5-observable-create-ip.json")
    event["_id"] = f"~sur-{where}"
    if where == "object.case._id":
        event["object"]["case"]["_id"] = "\ud800"
    else:
        event[where] = "~\udc00" + where
    if where == "rootId":
        del event["object"]["case"]  # then the root id is the case id, and is stored
    response = live.post(json.dumps(event))  # ensure_ascii: the body is valid UTF-8 with a \\udXXX escape
    assert response.status_code == 400, response.text
    check(response)


@pytest.mark.parametrize("headers", [
    {"X-Huge": "h" * 9000}, {f"X-Many-{i}": "v" for i in range(120)},
    {"Authorization": AUTH + "\x01"}, {"Content-Type": "application/json\x7f"}],
    ids=["huge-header", "many-headers", "control-char-in-authorization", "control-char-in-content-type"])
def test_http_parser_rejections_have_a_json_body(live, headers):
    response = live.post(json.dumps(sample("th5-case-create.json")), {"Authorization": AUTH, **headers})
    assert 400 <= response.status_code < 500
    check(response)


@pytest.mark.parametrize("authenticated", [True, False], ids=["413", "401"])
def test_keepalive_survives_a_rejected_large_body(live, authenticated):
    """TheHive never re-sends: an event lost because the connection it was sent on had been dropped
    after the previous (rejected) one is lost for good. One raw connection, no client-side staleness
    check, so the outcome does not depend on who is faster."""
    SENT["requests"] += 2
    conn = http.client.HTTPConnection("127.0.0.1", live.daemon.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", **(BEARER if authenticated else {})}
        conn.request("POST", "/cases", body=b'{"pad": "' + b"x" * 300_000 + b'"}', headers=headers)
        first = conn.getresponse()
        first.read()
        assert first.status == (413 if authenticated else 401)
        if (first.getheader("Connection") or "").lower() == "close":
            return  # announced: the client opens a new connection for the next event
        try:  # announced as kept alive, so the next event on it must be answered
            conn.request("POST", "/cases", body=sample_text("th5-case-create.json").encode(),
                         headers={"Content-Type": "application/json", **BEARER})
            second = conn.getresponse()
            second.read()
        except (OSError, http.client.HTTPException) as exc:
            pytest.fail(f"the next request on the kept-alive connection failed: {exc!r}")
        assert second.status == 200
    finally:
        conn.close()


def test_payload_text_cannot_forge_a_log_line(live):
    """"One line per received event" (docs/operations.md, Logs): whatever an id contains, it stays on that line."""
    forged = "1999-12-31 23:59:59,999 WARNING [1] tq_mw_thehive.web: rejected outcome=unauthorized remote=203.0.113.66"
    for field in ("objectType", "action", "objectId", "_id"):
        event = {"_id": f"~forge-{field}", "_type": "Audit", "action": "create", "objectType": "Case",
                 "objectId": f"~forge-{field}", "_createdAt": 1717430400512}
        event[field] = f"{event[field]}\n{forged} reason='{field}'"
        check(live.post(json.dumps(event)), field)
    forged_lines = [line for line in live.daemon.log_text().splitlines() if line.startswith("1999-12-31")]
    assert forged_lines == []

