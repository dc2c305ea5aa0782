"""The TheHive simulator's write side: PATCH semantics of TheHive 4 and 5, audits ("webhooks") and the
alert import/merge flows (sources in the simulator's docstring)."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import List

import pytest
from flask import Flask, request

from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import SIM_USER, TheHiveSimulator

KEY = "writes-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make(version: int) -> TheHiveSimulator:
    return TheHiveSimulator(api_key=KEY, version=version)


def patch(sim: TheHiveSimulator, path: str, body):
    client = sim.app.test_client()
    if isinstance(body, (dict, list)):
        return client.patch(path, json=body, headers=AUTH)
    return client.patch(path, data=body, headers=AUTH, content_type="application/json")


def served_observable(sim: TheHiveSimulator, observable_id: str) -> dict:
    response = sim.app.test_client().get(f"/api/v1/observable/{observable_id}", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


def served_case(sim: TheHiveSimulator, id_or_number) -> dict:
    response = sim.app.test_client().get(f"/api/v1/case/{id_or_number}", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


def test_version_is_checked_and_defaults():
    sim = TheHiveSimulator()
    assert (sim.version, sim.api_user, sim.emit_audits, sim.webhook) == (5, "sync-bot@thehive.sim", False, None)
    assert sim.custom_fields_defined == {"threatq-url", "threatq-id"}
    with pytest.raises(ValueError):
        TheHiveSimulator(version=3)


# -- tags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_tags_replace_the_whole_list_and_answer_204(version):
    sim = make(version)
    case = sim.add_case()
    obs = sim.add_observable(case["_id"], tags=["a", "b"])
    response = patch(sim, f"/api/v1/observable/{obs['_id']}", {"tags": ["c", "a"]})
    assert response.status_code == 204 and response.data == b""
    got = served_observable(sim, obs["_id"])
    assert got["tags"] == ["c", "a"]
    assert got["_updatedBy"] == sim.api_user and got["_updatedAt"] > obs["_createdAt"]
    assert sim.patches == [{"path": f"/api/v1/observable/{obs['_id']}", "body": {"tags": ["c", "a"]},
                            "status": 204}]


def test_v5_add_and_remove_tags():
    sim = make(5)
    obs = sim.add_observable(sim.add_case()["_id"], tags=["a", "b"])
    path = f"/api/v1/observable/{obs['_id']}"
    assert patch(sim, path, {"addTags": ["b", "c", "d", "c"]}).status_code == 204
    assert served_observable(sim, obs["_id"])["tags"] == ["a", "b", "c", "d"]
    assert patch(sim, path, {"removeTags": ["a", "never-there", "d"]}).status_code == 204
    assert served_observable(sim, obs["_id"])["tags"] == ["b", "c"]
    # The audits carry the full new list, not the delta.
    assert [a["details"] for a in sim.audits] == [{"tags": ["a", "b", "c", "d"]}, {"tags": ["b", "c"]}]


def test_v5_case_tags_by_number():
    sim = make(5)
    case = sim.add_case(tags=["x"])
    assert patch(sim, f"/api/v1/case/{case['number']}", {"addTags": ["y"], "severity": 4}).status_code == 204
    got = served_case(sim, case["_id"])
    assert (got["tags"], got["severity"], got["severityLabel"]) == (["x", "y"], 4, "CRITICAL")
    assert sim.audits[-1]["details"] == {"tags": ["x", "y"], "severity": 4}


@pytest.mark.parametrize("field", ["addTags", "removeTags"])
def test_v4_refuses_add_and_remove_tags(field):
    sim = make(4)
    obs = sim.add_observable(sim.add_case()["_id"], tags=["a"])
    response = patch(sim, f"/api/v1/observable/{obs['_id']}", {field: ["b"]})
    assert response.status_code == 400
    assert response.get_json() == {"type": "BadRequestError", "message": f"Invalid field {field}"}
    assert served_observable(sim, obs["_id"])["tags"] == ["a"]
    assert sim.patches[-1]["status"] == 400 and sim.audits == []


# -- custom fields ------------------------------------------------------------------------------------

def test_v5_custom_fields_map_adds_and_list_replaces():
    sim = make(5)
    case = sim.add_case()
    path = f"/api/v1/case/{case['_id']}"
    assert patch(sim, path, {"customFields": {"threatq-id": "42"}}).status_code == 204
    assert patch(sim, path, {"customFields": {"threatq-url": "https://tq/42"}}).status_code == 204
    got = served_case(sim, case["_id"])
    assert got["customFieldValues"] == {"threatq-id": "42", "threatq-url": "https://tq/42"}
    assert got["customFields"] == [{"name": "threatq-id", "value": "42", "order": 0, "type": "string"},
                                   {"name": "threatq-url", "value": "https://tq/42", "order": 1, "type": "string"}]
    assert sim.audits[-1]["details"] == {"customFields": {"threatq-url": "https://tq/42"}}
    body = {"customFields": [{"name": "threatq-url", "value": "https://tq/43", "order": 0}]}
    assert patch(sim, path, body).status_code == 204
    assert served_case(sim, case["_id"])["customFieldValues"] == {"threatq-url": "https://tq/43"}


def test_v4_dotted_sets_one_and_object_replaces_all():
    sim = make(4)
    case = sim.add_case()
    path = f"/api/v1/case/{case['_id']}"
    assert patch(sim, path, {"customFields.threatq-id": "42"}).status_code == 204
    assert patch(sim, path, {"customFields.threatq-url": "https://tq/42"}).status_code == 204
    assert served_case(sim, case["_id"])["customFieldValues"] == {"threatq-id": "42", "threatq-url": "https://tq/42"}
    assert sim.audits[-1]["details"] == {"customFields": {"threatq-url": {"string": "https://tq/42", "order": 1}}}
    # The object form drops every field it does not list (TheHive 4 CaseSrv.updateCustomField).
    assert patch(sim, path, {"customFields": {"threatq-url": "https://tq/43"}}).status_code == 204
    assert served_case(sim, case["_id"])["customFieldValues"] == {"threatq-url": "https://tq/43"}
    assert patch(sim, path, {"customFields": [{"name": "threatq-id", "value": "1"}]}).status_code == 400


@pytest.mark.parametrize("version,body", [(5, {"customFields": {"threatq-id": "1", "nope": "x"}}),
                                          (4, {"customFields.nope": "x"})])
def test_unknown_custom_field_is_404_and_changes_nothing(version, body):
    sim = make(version)
    case = sim.add_case()
    response = patch(sim, f"/api/v1/case/{case['_id']}", body)
    assert response.status_code == 404
    assert response.get_json() == {"type": "NotFoundError", "message": "CustomField nope not found"}
    assert served_case(sim, case["_id"])["customFieldValues"] == {}
    assert "_updatedAt" not in served_case(sim, case["_id"])
    assert sim.patches == [{"path": f"/api/v1/case/{case['_id']}", "body": body, "status": 404}]


# -- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("path", ["/api/v1/observable/~999", "/api/v1/case/~999", "/api/v1/case/77"])
def test_unknown_object_is_404(version, path):
    sim = make(version)
    response = patch(sim, path, {"tags": ["a"]})
    assert response.status_code == 404 and response.get_json()["type"] == "NotFoundError"
    assert sim.patches == [{"path": path, "body": {"tags": ["a"]}, "status": 404}]


@pytest.mark.parametrize("body", ["not json", "[1, 2]"])
def test_body_must_be_an_object(body):
    sim = make(5)
    case = sim.add_case()
    response = patch(sim, f"/api/v1/case/{case['_id']}", body)
    assert response.status_code == 400 and response.get_json()["type"] == "BadRequest"
    assert sim.patches[0]["status"] == 400


def test_patch_needs_the_key():
    sim = make(5)
    case = sim.add_case()
    response = sim.app.test_client().patch(f"/api/v1/case/{case['_id']}", json={"tags": []})
    assert response.status_code == 401 and sim.patches == []


# -- audits -----------------------------------------------------------------------------------------------

def test_v5_patch_audit_shape_and_actor():
    sim = make(5)
    case = sim.add_case(title="C")
    obs = sim.add_observable(case["_id"], dataType="ip", data="203.0.113.7", tags=["a"])
    assert sim.audits == []  # helpers build none without emit_audits
    patch(sim, f"/api/v1/observable/{obs['_id']}", {"addTags": ["b"], "ioc": True})
    (audit,) = sim.audits
    assert set(audit) == {"_id", "_type", "_createdBy", "_createdAt", "action", "requestId", "objectId",
                          "objectType", "rootId", "details", "object", "organisation"}
    assert (audit["_type"], audit["_createdBy"], audit["action"], audit["objectType"]) == (
        "Audit", "sync-bot@thehive.sim", "update", "Observable")
    assert (audit["objectId"], audit["rootId"]) == (obs["_id"], case["_id"])
    assert audit["details"] == {"tags": ["a", "b"], "ioc": True}
    assert audit["object"]["tags"] == ["a", "b"] and audit["object"]["ioc"] is True
    assert audit["object"]["case"]["_id"] == case["_id"] and "_case" not in audit["object"]
    assert audit["_createdAt"] > audit["object"]["_updatedAt"]
    assert audit["organisation"] == {"organisationId": "~1", "organisation": "sim-org"}


def test_v4_patch_audit_is_a_v0_message():
    sim = make(4)
    case = sim.add_case(number=142, title="C")
    obs = sim.add_observable(case["_id"], dataType="ip", data="203.0.113.7", tags=["a"])
    patch(sim, f"/api/v1/observable/{obs['_id']}", {"tags": ["a", "b"]})
    (audit,) = sim.audits
    sample = json.loads((Path(__file__).parent / "samples" / "th4-case-artifact-create.json").read_text())
    assert set(audit) == set(sample)
    assert set(audit["object"]) - {"updatedBy", "updatedAt"} == set(sample["object"])
    assert (audit["operation"], audit["objectType"], audit["objectId"], audit["rootId"], audit["base"]) == (
        "update", "case_artifact", obs["_id"], obs["_id"], True)
    assert audit["details"] == {"tags": ["a", "b"]}
    assert audit["object"]["updatedBy"] == sim.api_user and "pap" not in audit["object"]
    assert audit["object"]["case"]["caseId"] == 142 and audit["object"]["case"]["_type"] == "case"
    assert (audit["organisationId"], audit["organisation"]) == ("~1", "sim-org")


@pytest.mark.parametrize("version", [4, 5])
def test_helpers_emit_audits_as_the_analyst(version):
    sim = make(version)
    sim.emit_audits = True
    case = sim.add_case()
    obs = sim.add_observable(case["_id"], data="x")
    sim.update_case(case["_id"], severity=3)
    sim.update_observable(obs["_id"], tags=["t"])
    alert = sim.add_alert()
    alert_obs = sim.add_alert_observable(alert["_id"], data="y")
    if version == 5:
        got = [(a["action"], a["objectType"], a["objectId"], a["rootId"], a["_createdBy"]) for a in sim.audits]
        assert got == [("create", "Case", case["_id"], case["_id"], SIM_USER),
                       ("create", "Observable", obs["_id"], case["_id"], SIM_USER),
                       ("update", "Case", case["_id"], case["_id"], SIM_USER),
                       ("update", "Observable", obs["_id"], case["_id"], SIM_USER),
                       ("create", "Alert", alert["_id"], alert["_id"], SIM_USER),
                       ("create", "Observable", alert_obs["_id"], alert["_id"], SIM_USER)]
        assert sim.audits[-1]["object"]["alert"]["_id"] == alert["_id"] and "case" not in sim.audits[-1]["object"]
    else:
        got = [(a["operation"], a["objectType"], a["objectId"], a["rootId"]) for a in sim.audits]
        assert got == [("create", "case", case["_id"], case["_id"]),
                       ("create", "case_artifact", obs["_id"], obs["_id"]),
                       ("update", "case", case["_id"], case["_id"]),
                       ("update", "case_artifact", obs["_id"], obs["_id"]),
                       ("create", "alert", alert["_id"], alert["_id"]),
                       ("create", "case_artifact", alert_obs["_id"], alert["_id"])]
        assert sim.audits[-1]["object"]["alert"]["_type"] == "alert"
        assert sim.audits[2]["object"]["updatedBy"] == SIM_USER
    assert sim.audits[0]["details"]["_id"] == case["_id"]  # create: the full object
    assert sim.audits[2]["details"] == {"severity": 3}      # update: the fields passed


# -- webhook hand-off --------------------------------------------------------------------------------------

def test_webhook_gets_every_audit_in_order_outside_the_lock():
    sim = make(5)
    received: List[dict] = []
    lock_free: List[bool] = []

    def hook(audit: dict) -> None:
        # The daemon under test calls the simulator while it handles a webhook: the hand-off must not
        # hold the lock (the main thread may hold it meanwhile, for its next PATCH: that is fine).
        lock_free.append(not sim._lock._is_owned())
        lock_free.append(threading.current_thread() is not threading.main_thread())
        received.append(audit)

    sim.webhook = hook
    case = sim.add_case()
    for i in range(20):
        patch(sim, f"/api/v1/case/{case['_id']}", {"addTags": [f"t{i}"]})
    sim.drain_webhooks()
    assert [a["_id"] for a in received] == [a["_id"] for a in sim.audits] and len(received) == 20
    assert received[-1]["details"]["tags"] == [f"t{i}" for i in range(20)]
    assert all(lock_free)


def test_drain_waits_for_the_last_hand_off_and_times_out():
    sim = make(5)
    release = threading.Event()
    done: List[str] = []

    def slow(audit: dict) -> None:
        release.wait(5)
        done.append(audit["objectId"])

    sim.webhook = slow
    case = sim.add_case()
    patch(sim, f"/api/v1/case/{case['_id']}", {"tags": ["a"]})
    with pytest.raises(TimeoutError):
        sim.drain_webhooks(timeout=0.2)
    release.set()
    sim.drain_webhooks()
    assert done == [case["_id"]]


def test_webhook_errors_are_recorded_and_sending_goes_on():
    sim = make(5)
    received: List[str] = []

    def flaky(audit: dict) -> None:
        if not received:
            received.append("boom")
            raise RuntimeError("receiver down")
        received.append(audit["details"]["tags"][-1])

    sim.webhook = flaky
    case = sim.add_case()
    patch(sim, f"/api/v1/case/{case['_id']}", {"tags": ["a"]})
    patch(sim, f"/api/v1/case/{case['_id']}", {"tags": ["b"]})
    sim.drain_webhooks()
    assert received == ["boom", "b"] and sim.webhook_errors == ["RuntimeError: receiver down"]


def test_post_webhooks_to_posts_the_audit_json():
    receiver = Flask("receiver")
    got: List[tuple] = []

    @receiver.post("/hook")
    def hook():
        got.append((request.headers.get("Authorization"), request.get_json()))
        return "", 200

    sim = make(4)
    case = sim.add_case()
    with LoopbackServer(receiver) as server:
        sim.post_webhooks_to(server.url + "/hook", {"Authorization": "Bearer hook-secret"})
        patch(sim, f"/api/v1/case/{case['_id']}", {"tags": ["a"]})
        sim.drain_webhooks()
    assert got == [("Bearer hook-secret", sim.audits[0])]
    assert sim.webhook_errors == []


# -- alert flows -------------------------------------------------------------------------------------------

def alert_with_observables(sim: TheHiveSimulator):
    alert = sim.add_alert(title="Beacon", type="siem", source="splunk", sourceRef="SPL-1", tags=["c2"], tlp=3,
                          pap=1)
    first = sim.add_alert_observable(alert["_id"], dataType="ip", data="203.0.113.47", tags=["dst"], tlp=1, pap=0,
                                     ioc=True)
    second = sim.add_alert_observable(alert["_id"], dataType="domain", data="evil.example", tags=["c2"])
    return alert, [first, second]


def query(sim: TheHiveSimulator, ops) -> list:
    response = sim.app.test_client().post("/api/v1/query", json={"query": ops}, headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


@pytest.mark.parametrize("version", [4, 5])
def test_promote_alert_data(version):
    sim = make(version)
    alert, originals = alert_with_observables(sim)
    case = sim.promote_alert(alert["_id"])
    assert (case["title"], case["tags"], case["tlp"], case["pap"]) == ("Beacon", ["c2"], 3, 1)
    copies = query(sim, [{"_name": "getCase", "idOrName": case["_id"]}, {"_name": "observables"}])
    assert {o["_id"] for o in copies}.isdisjoint({o["_id"] for o in originals})
    keys = ("dataType", "data", "tags", "tlp", "pap", "ioc")
    assert sorted(tuple(o[k] for k in keys) for o in copies) == sorted(tuple(o[k] for k in keys) for o in originals)
    served_alert = query(sim, [{"_name": "getAlert", "idOrName": alert["_id"]}])[0]
    assert (served_alert["caseId"], served_alert["status"], served_alert["stage"]) == (
        case["_id"], "Imported", "Imported")
    assert isinstance(served_alert["importedDate"], int)
    assert query(sim, [{"_name": "listAlert"}])[0]["caseId"] == case["_id"]
    still = query(sim, [{"_name": "getAlert", "idOrName": alert["_id"]}, {"_name": "observables"}])
    assert {o["_id"] for o in still} == {o["_id"] for o in originals}
    with pytest.raises(ValueError):
        sim.promote_alert(alert["_id"])


def test_v5_promote_audits():
    sim = make(5)
    alert, _ = alert_with_observables(sim)
    sim.emit_audits = True
    case = sim.promote_alert(alert["_id"])
    got = [(a["action"], a["objectType"], a["rootId"]) for a in sim.audits]
    assert got == [("create", "Case", case["_id"]), ("update", "Alert", case["_id"]),
                   ("create", "Observable", case["_id"]), ("create", "Observable", case["_id"])]
    assert len({a["requestId"] for a in sim.audits}) == 1
    assert {a["_createdBy"] for a in sim.audits} == {SIM_USER}
    assert sim.audits[0]["details"]["fromAlert"] == {"_id": alert["_id"], "type": "siem", "source": "splunk",
                                                     "sourceRef": "SPL-1", "title": "Beacon"}
    assert sim.audits[0]["details"]["title"] == "Beacon"
    assert sim.audits[1]["details"] == {"caseId": case["_id"]}
    assert sim.audits[1]["object"]["caseId"] == case["_id"] and sim.audits[1]["object"]["stage"] == "Imported"
    assert [a["object"]["case"]["_id"] for a in sim.audits[2:]] == [case["_id"]] * 2
    assert [a["object"]["data"] for a in sim.audits[2:]] == ["203.0.113.47", "evil.example"]


def test_v4_promote_audits_have_no_observables():
    sim = make(4)
    alert, _ = alert_with_observables(sim)
    sim.emit_audits = True
    case = sim.promote_alert(alert["_id"])
    got = [(a["operation"], a["objectType"], a["objectId"], a["rootId"]) for a in sim.audits]
    assert got == [("update", "alert", alert["_id"], case["_id"]), ("create", "case", case["_id"], case["_id"])]
    assert sim.audits[0]["details"] == {"caseId": case["_id"]}
    assert sim.audits[1]["details"]["fromAlert"] == {"_id": alert["_id"], "type": "siem", "source": "splunk",
                                                     "sourceRef": "SPL-1"}
    assert sim.audits[1]["object"]["_type"] == "case" and sim.audits[1]["base"] is True
    # The case's observables exist although no audit announced them: a reader must re-query.
    assert len(query(sim, [{"_name": "getCase", "idOrName": case["_id"]}, {"_name": "observables"}])) == 2


@pytest.mark.parametrize("version", [4, 5])
def test_merge_alert_copies_only_new_observables(version):
    sim = make(version)
    target = sim.add_case(tags=["cluster"], description="Old")
    existing = sim.add_observable(target["_id"], dataType="ip", data="203.0.113.47")
    alert, _ = alert_with_observables(sim)
    sim.emit_audits = True
    case = sim.merge_alert(alert["_id"], str(target["number"]))
    observables = query(sim, [{"_name": "getCase", "idOrName": target["_id"]}, {"_name": "observables"}])
    assert sorted(o["data"] for o in observables) == ["203.0.113.47", "evil.example"]
    new = [o for o in observables if o["_id"] != existing["_id"]]
    assert case["tags"] == ["cluster", "c2"] and "Merged with alert #SPL-1" in case["description"]
    served_alert = query(sim, [{"_name": "getAlert", "idOrName": alert["_id"]}])[0]
    assert (served_alert["caseId"], served_alert["status"]) == (target["_id"], "Imported")
    if version == 5:
        got = [(a["action"], a["objectType"], a["objectId"], a["rootId"]) for a in sim.audits]
        assert got == [("update", "Alert", alert["_id"], target["_id"]),
                       ("update", "Case", target["_id"], target["_id"]),
                       ("create", "Observable", new[0]["_id"], target["_id"])]
        assert sim.audits[1]["details"] == {"fromAlert": {"_id": alert["_id"], "type": "siem", "source": "splunk",
                                                          "sourceRef": "SPL-1", "title": "Beacon"},
                                            "tags": ["cluster", "c2"]}
    else:
        got = [(a["operation"], a["objectType"], a["objectId"], a["rootId"]) for a in sim.audits]
        assert got == [("update", "alert", alert["_id"], target["_id"]),
                       ("update", "case", target["_id"], target["_id"])]
        details = sim.audits[1]["details"]
        assert set(details) == {"customFields", "description", "tags", "fromAlert"}
        assert details["tags"] == ["cluster", "c2"] and details["fromAlert"]["sourceRef"] == "SPL-1"
    assert sim.audits[0]["details"] == {"caseId": target["_id"]}
    with pytest.raises(ValueError):
        sim.merge_alert(alert["_id"], target["_id"])
