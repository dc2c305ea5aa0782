"""POST /cases and GET /healthz through Flask's test client: every outcome TheHive can meet."""
from __future__ import annotations

import base64
import io
import json
import logging
import sqlite3
from pathlib import Path

import flask
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app

from conftest import SAMPLE_NAMES, WEBHOOK_TOKEN, minimal_config, sample, sample_text
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import web
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.services import Services

BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}


def make_app(tmp_path: Path, busy_timeout: float = 5.0, **sections):
    cfg = config_mod.from_dict(minimal_config(**sections), tmp_path)
    inbox = Inbox.open(cfg.state_db, busy_timeout=busy_timeout)
    return web.create_app(Services(cfg, inbox)), inbox


@pytest.fixture
def app_inbox(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def client(app_inbox):
    return app_inbox[0].test_client()


def rows(inbox: Inbox):
    return inbox.db.execute("SELECT * FROM inbox ORDER BY id").fetchall()


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_is_queued_once_then_duplicate(app_inbox, name):
    app, inbox = app_inbox
    client = app.test_client()
    first = client.post("/cases", data=sample_text(name), headers=BEARER)
    assert first.status_code == 200
    assert first.json["status"] == "queued"
    again = client.post("/cases", data=sample_text(name), headers=BEARER)
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    assert again.json["id"] == first.json["id"]
    stored = rows(inbox)
    assert len(stored) == 1
    assert stored[0]["body"] == sample_text(name)
    assert stored[0]["state"] == "pending"


def test_thehive4_events_without_audit_id_are_deduplicated_by_digest(app_inbox):
    app, inbox = app_inbox
    client = app.test_client()
    body = sample("th4-case-artifact-create.json")
    assert client.post("/cases", json=body, headers=BEARER).json["status"] == "queued"
    body["details"]["message"] = "same event, re-sent by another notification"
    assert client.post("/cases", json=body, headers=BEARER).json["status"] == "duplicate"
    body["startDate"] += 1
    assert client.post("/cases", json=body, headers=BEARER).json["status"] == "queued"
    assert len(rows(inbox)) == 2


@pytest.mark.parametrize("payload, reason", [
    ({"_id": "~1", "_type": "Audit", "action": "create", "objectType": "Task", "objectId": "~2"}, "Task"),
    ({"operation": "update", "objectType": "case_task_log", "objectId": "~3"}, "case_task_log"),
    ({"_id": "~4", "action": "create", "objectType": "Alert", "objectId": "~5"}, "Alert"),
    ({"_id": "~6", "action": "invoke", "objectType": "Case", "objectId": "~7"}, "invoke"),
])
def test_object_types_and_actions_not_synced_are_ignored_and_not_stored(app_inbox, payload, reason):
    app, inbox = app_inbox
    response = app.test_client().post("/cases", json=payload, headers=BEARER)
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert reason in response.json["reason"]
    assert rows(inbox) == []


@pytest.mark.parametrize("body, problem", [
    (b"", "empty body"),
    (b"   ", "empty body"),
    (b"{bad", "invalid JSON"),
    (b'{"objectType": "Case", "action": "create"', "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"a string"', "JSON object"),
    (b"null", "JSON object"),
    (b'{"action": "create", "objectId": "~1"}', "missing objectType"),
    (b'{"objectType": "Case", "objectId": "~1"}', "missing action"),
    (b'{"operation": "create", "objectType": 5}', "objectType must be"),
    (b'{"action": ["create"], "objectType": "Case"}', "action must be"),
    (b'{"action": "create", "objectType": "Case"}', "missing objectId"),
    (b'{"action": "create", "objectType": "Case", "objectId": 42}', "objectId must be"),
    (b'{"action": "create", "objectType": "Case", "objectId": "~1", "_createdAt": "yesterday"}',
     "_createdAt must be"),
    (b'{"action": "create", "objectType": "Case", "objectId": "~1", "object": []}', "object must be"),
    (b'{"action": "create", "objectType": "Case", "objectId": "~1", "x": NaN}', "NaN"),
    (b'{"action": "cr\xff\xfeate", "objectType": "Case"}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_bad_bodies_get_400_naming_the_problem_and_nothing_is_stored(app_inbox, body, problem):
    app, inbox = app_inbox
    response = app.test_client().post("/cases", data=body, headers=BEARER,
                                      content_type="application/json")
    assert response.status_code == 400
    assert response.json["status"] == "error"
    assert problem in response.json["error"]
    assert rows(inbox) == []


def test_body_over_the_limit_gets_413(tmp_path):
    app, inbox = make_app(tmp_path, webhook={"max_body_mb": 0.01})
    big = json.dumps({**sample("th5-case-create.json"), "pad": "x" * 20_000})
    response = app.test_client().post("/cases", data=big, headers=BEARER)
    assert response.status_code == 413
    assert "webhook.max_body_mb" in response.json["error"]
    assert rows(inbox) == []
    # A body under the same limit is fine.
    assert app.test_client().post("/cases", data=sample_text("th5-case-create.json"),
                                  headers=BEARER).status_code == 200


@pytest.mark.parametrize("size, status", [(20_000, 413), (10_240, 413), (5_000, 200)])
def test_chunked_bodies_are_held_to_the_limit_too(tmp_path, size, status):
    """Without Content-Length (chunked), werkzeug stops reading at the limit; that must be a 413."""
    app, inbox = make_app(tmp_path, webhook={"max_body_mb": 10_240 / (1024 * 1024)})
    head = sample_text("th5-case-create.json").rstrip().rstrip("}") + ', "pad": "'
    body = (head + "x" * (size - len(head) - 2) + '"}').encode()
    assert len(body) == size
    environ = EnvironBuilder("/cases", method="POST", input_stream=io.BytesIO(body), headers=BEARER,
                             environ_overrides={"wsgi.input_terminated": True}).get_environ()
    del environ["CONTENT_LENGTH"]  # as gunicorn passes a chunked request
    app_iter, status_line, _ = run_wsgi_app(app, environ, buffered=True)
    answer = json.loads(b"".join(app_iter))
    assert int(status_line.split()[0]) == status, answer
    assert len(rows(inbox)) == (1 if status == 200 else 0)


def test_other_methods_get_405_and_unknown_paths_404(client):
    for method in ("get", "put", "delete", "patch"):
        response = getattr(client, method)("/cases", headers=BEARER)
        assert response.status_code == 405
        assert response.json["status"] == "error"
        assert "POST" in response.headers["Allow"]
    response = client.post("/nope", data="{}", headers=BEARER)
    assert response.status_code == 404
    assert response.json["status"] == "error"


def _wsgi_answer(wsgi_app, body: bytes, headers: dict):
    environ = EnvironBuilder(path="/cases", method="POST", data=body, headers=headers).get_environ()
    app_iter, status_line, answer_headers = run_wsgi_app(wsgi_app, environ, buffered=True)
    return status_line, list(answer_headers.items()), b"".join(app_iter)


DOOR_REQUESTS = {
    "queued": (sample_text("th5-case-create.json").encode(), BEARER),
    "duplicate": (sample_text("th5-case-create.json").encode(), BEARER),
    "ignored": (json.dumps({"_id": "~1", "action": "create", "objectType": "Task", "objectId": "~2"}).encode(),
                BEARER),
    "invalid": (b'{"action": "create"', BEARER),
    "unauthorized": (b"{}", {}),
    "too large": (b"x" * 20_000, BEARER),
}


@pytest.mark.parametrize("auth", [{"auth": "bearer", "token": WEBHOOK_TOKEN},
                                  {"auth": "basic", "username": "thehive", "password": WEBHOOK_TOKEN}])
def test_post_cases_answers_the_same_bytes_as_flasks_route(tmp_path, auth):
    """``_Door`` answers POST /cases without Flask's machinery; what TheHive (and a proxy) sees
    must stay what Flask's route sends: status line, headers, body."""
    (tmp_path / "door").mkdir()
    (tmp_path / "flask").mkdir()
    door, _ = make_app(tmp_path / "door", webhook={"max_body_mb": 0.01, **auth})
    flask_app, _ = make_app(tmp_path / "flask", webhook={"max_body_mb": 0.01, **auth})
    flask_route = flask_app.wsgi_app.flask_wsgi_app
    headers_for = {"bearer": BEARER, "basic": {"Authorization": basic("thehive", WEBHOOK_TOKEN)}}
    seen = set()
    for name, (body, headers) in DOOR_REQUESTS.items():
        headers = headers_for[auth["auth"]] if headers else {}
        ours = _wsgi_answer(door.wsgi_app, body, headers)
        theirs = _wsgi_answer(flask_route, body, headers)
        assert ours == theirs, name
        status, _, answer = ours
        with flask_app.app_context():  # what jsonify writes for that document
            assert answer == flask.jsonify(json.loads(answer)).get_data(), name
        seen.add(status)
    assert seen == {"200 OK", "400 BAD REQUEST", "401 UNAUTHORIZED", "413 REQUEST ENTITY TOO LARGE"}


def test_an_unexpected_error_on_post_cases_is_logged_and_answered_500_in_json(app_inbox, monkeypatch, caplog):
    app, inbox = app_inbox

    def broken(payload):
        raise RuntimeError("a bug")

    monkeypatch.setattr(web.events, "parse", broken)
    with caplog.at_level(logging.ERROR, logger="tq_mw_thehive"):
        response = app.test_client().post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER)
    assert response.status_code == 500
    assert response.json == {"status": "error", "error": "internal error (logged)"}
    assert any("internal error on POST /cases" in r.getMessage() and r.exc_info for r in caplog.records)
    assert rows(inbox) == []


def test_trailing_slash_is_accepted(client):
    response = client.post("/cases/", data=sample_text("th5-case-create.json"), headers=BEARER)
    assert response.status_code == 200
    assert response.json["status"] == "queued"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH_CASES = [
    ("bearer", {}, f"Bearer {WEBHOOK_TOKEN}", True),
    ("bearer", {}, f"bearer {WEBHOOK_TOKEN}", True),
    ("bearer", {}, None, False),
    ("bearer", {}, "", False),
    ("bearer", {}, "Bearer", False),
    ("bearer", {}, "Bearer wrong-token", False),
    ("bearer", {}, f"Bearer {WEBHOOK_TOKEN}x", False),
    ("bearer", {}, WEBHOOK_TOKEN, False),
    ("bearer", {}, f"Basic {WEBHOOK_TOKEN}", False),
    ("key", {}, WEBHOOK_TOKEN, True),
    ("key", {}, f"Bearer {WEBHOOK_TOKEN}", False),
    ("key", {}, "wrong", False),
    ("key", {}, None, False),
    ("basic", {"username": "thehive", "password": "pa55:word"}, basic("thehive", "pa55:word"), True),
    ("basic", {"username": "thehive", "password": "pa55:word"}, basic("thehive", "wrong"), False),
    ("basic", {"username": "thehive", "password": "pa55:word"}, basic("other", "pa55:word"), False),
    ("basic", {"username": "thehive", "password": "pa55:word"}, "Basic !!!not-base64", False),
    ("basic", {"username": "thehive", "password": "pa55:word"}, f"Bearer {WEBHOOK_TOKEN}", False),
    ("none", {}, None, True),
    ("none", {}, "Bearer anything", True),
]


@pytest.mark.parametrize("mode, extra, header, accepted", AUTH_CASES)
def test_authentication_modes(tmp_path, mode, extra, header, accepted):
    app, inbox = make_app(tmp_path, webhook={"auth": mode, **extra})
    headers = {} if header is None else {"Authorization": header}
    response = app.test_client().post("/cases", data=sample_text("th5-case-create.json"), headers=headers)
    if accepted:
        assert response.status_code == 200
        assert len(rows(inbox)) == 1
    else:
        assert response.status_code == 401
        assert response.json == {"status": "error", "error": "authentication required"}
        assert rows(inbox) == []
        if mode in ("bearer", "basic"):
            assert response.headers["WWW-Authenticate"].lower().startswith(mode)


def test_authentication_is_checked_before_the_body_is_read(client):
    """An unauthenticated caller learns nothing about the body: 401 even for garbage or huge bodies."""
    assert client.post("/cases", data=b"{bad").status_code == 401
    assert client.post("/cases", data=b"x" * (11 * 1024 * 1024)).status_code == 401


def test_unwritable_state_database_gives_503_and_healthz_503(tmp_path):
    app, inbox = make_app(tmp_path, busy_timeout=0.05)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    blocker = sqlite3.connect(str(inbox.path), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = client.post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER)
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert response.json["status"] == "error"
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json["status"] == "unavailable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    response = client.post("/cases", data=sample_text("th5-case-create.json"), headers=BEARER)
    assert response.json["status"] == "queued"


def test_healthz_reports_inbox_counts(app_inbox):
    app, inbox = app_inbox
    client = app.test_client()
    for name in ("th5-case-create.json", "th5-case-update.json", "th4-case-artifact-create.json"):
        client.post("/cases", data=sample_text(name), headers=BEARER)
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json["status"] == "ok"
    assert response.json["inbox"]["pending"] == 3
    assert response.json["inbox"]["done"] == 0
    assert response.json["inbox"]["dead"] == 0


def test_one_log_line_per_event_with_ids_and_outcome_and_no_secret(app_inbox, caplog):
    app, _ = app_inbox
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.web"):
        client.post("/cases", data=sample_text("th5-observable-create-ip.json"), headers=BEARER)
        client.post("/cases", data=sample_text("th5-observable-create-ip.json"), headers=BEARER)
        client.post("/cases", data=b"{bad", headers=BEARER)
        client.post("/cases", data=b"{}", headers={"Authorization": "Bearer wrong"})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    queued, duplicate, invalid, unauthorized = lines
    for part in ("audit=~2060400", "type=Observable", "action=create", "object=~12734592",
                 "case=~8396848", "outcome=queued"):
        assert part in queued
    assert "outcome=duplicate" in duplicate
    assert "outcome=invalid" in invalid
    assert "outcome=unauthorized" in unauthorized
    assert all(WEBHOOK_TOKEN not in line for line in lines)


def test_repr_of_the_auth_checker_holds_no_secret(app_inbox):
    app, _ = app_inbox
    assert WEBHOOK_TOKEN not in repr(app.extensions[web.EXTENSION]["auth"])
    assert WEBHOOK_TOKEN not in repr(app.extensions[web.EXTENSION]["config"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
envelopes = st.fixed_dictionaries({}, optional={
    "_id": json_values, "action": st.sampled_from(["create", "update", "delete", "invoke"]) | json_values,
    "operation": st.sampled_from(["create", "Creation", "Update"]) | json_values,
    "objectType": st.sampled_from(["Case", "Observable", "case_artifact", "Task"]) | json_values,
    "objectId": json_values, "rootId": json_values, "_createdAt": json_values, "startDate": json_values,
    "object": json_values, "details": json_values, "context": json_values, "organisation": json_values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(envelopes.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=64)))
def test_no_body_ever_gets_a_500(client, body):
    response = client.post("/cases", data=body, headers=BEARER)
    assert response.status_code in (200, 400)
    assert response.json["status"] in ("queued", "duplicate", "ignored", "error")


# --- issue 13 item 8: unauthenticated noise is bounded -----------------------------------------

class Ticking:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rejection_lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "tq_mw_thehive.web" and r.levelno == logging.WARNING]


def test_a_flood_of_rejections_logs_the_first_few_then_one_summary_per_interval(tmp_path, caplog):
    app, inbox = make_app(tmp_path, webhook={"max_body_mb": 0.01})
    clock = Ticking()
    app.extensions[web.EXTENSION]["rejections"] = web.RejectionLog(burst=3, interval_s=60, clock=clock)
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.web"):
        for _ in range(1500):
            assert client.post("/cases", data=b"{}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for _ in range(30):
            assert client.post("/cases", data=b"{bad", headers=BEARER).status_code == 400
        for _ in range(2):
            assert client.post("/cases", data=b"x" * 20_000, headers=BEARER).status_code == 413
        assert len(rejection_lines(caplog)) == 3  # the first three, one by one
        clock.now += 59
        client.get("/healthz")
        assert len(rejection_lines(caplog)) == 3  # the interval is not over
        clock.now += 1
        client.get("/healthz")  # any request after the interval writes its summary
        client.get("/healthz")
    lines = rejection_lines(caplog)
    assert all("outcome=unauthorized" in line for line in lines[:3])
    assert lines[3:] == ["rejected 1532 requests in the last 60 s (400: 30, 401: 1500, 413: 2)"]
    assert all(WEBHOOK_TOKEN not in line for line in lines)
    assert rows(inbox) == []


def test_a_few_rejections_are_each_logged_and_need_no_summary(caplog):
    clock = Ticking()
    limiter = web.RejectionLog(burst=3, interval_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.web"):
        assert [limiter.allow(401) for _ in range(3)] == [True, True, True]
        clock.now += 61
        limiter.flush()
        assert limiter.allow(413) is True  # a new interval: logged on its own again
        assert [limiter.allow(401) for _ in range(3)] == [True, True, False]
        clock.now += 120
        limiter.flush()
    assert [r.getMessage() for r in caplog.records] == ["rejected 4 requests in the last 120 s (401: 3, 413: 1)"]


def test_the_shipped_logrotate_rotates_by_size_too():
    text = (Path(__file__).resolve().parent.parent / "config" / "logrotate").read_text()
    directives = [line.split() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert any(d[0] == "maxsize" and d[1][-1] in "kMG" and d[1][:-1].isdigit() for d in directives)
