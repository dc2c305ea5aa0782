"""events.parse: every TheHive webhook shape to one WebhookEvent, or a PayloadError."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_mw_thehive.thehive import events
from tq_mw_thehive.thehive.events import (THEHIVE4_V0, THEHIVE5_V0, THEHIVE5_V1, PayloadError,
                                          WebhookEvent, parse)

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


def changed(name: str, **changes) -> dict:
    """A sample with top-level keys replaced (a value of ``...`` deletes the key)."""
    payload = sample(name)
    for key, value in changes.items():
        if value is ...:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


# --- the samples ----------------------------------------------------------------------------

SAMPLE_TABLE = [
    # file, shape, object_type, action, object_id, audit_id, case_id, timestamp_ms, organisation
    ("th5-case-create.json", THEHIVE5_V1, "case", "create",
     "~8396848", "~2048112", "~8396848", 1717430400512, "acme-soc"),
    ("th5-case-update.json", THEHIVE5_V1, "case", "update",
     "~8396848", "~2056304", "~8396848", 1717434000266, "acme-soc"),
    ("th5-case-delete.json", THEHIVE5_V1, "case", "delete",
     "~8396848", "~2072688", "~8396848", 1717520000900, "acme-soc"),
    ("th5-observable-create-ip.json", THEHIVE5_V1, "observable", "create",
     "~12734592", "~2060400", "~8396848", 1717434300141, "acme-soc"),
    ("th5-observable-update-ioc.json", THEHIVE5_V1, "observable", "update",
     "~12734592", "~2064496", "~8396848", 1717435200330, "acme-soc"),
    ("seed-case-update.json", THEHIVE5_V1, "case", "update",
     "~43872472", "~43528360", "~43872472", 1751886507808, "demo"),
    ("seed-observable-update.json", THEHIVE5_V1, "observable", "update",
     "~85033200", "~43532456", "~43872472", 1751887430166, "demo"),
    ("th4-case-artifact-create.json", THEHIVE4_V0, "observable", "create",
     "~12734592", None, "~8396848", 1717434300141, "acme-soc"),
    ("th5v0-case-create.json", THEHIVE5_V0, "case", "create",
     "~8396848", "~2048116", "~8396848", 1717430400515, "acme-soc"),
    # Real captures (tests/samples/README.md): TheHive 5, version 0.
    ("ryu-v0-observable-create.json", THEHIVE5_V0, "observable", "create",
     "~12336", "~40988832", "~40976512", 1683315003836, "sample-org"),
    # Its context is a Share: the case is named only by rootId.
    ("ryu-v0-observable-delete.json", THEHIVE5_V0, "observable", "delete",
     "~12336", "~81940656", "~40976512", 1683360735682, "sample-org"),
    # TheHive 5, version 1.
    ("ryu-v1-observable-tag-update.json", THEHIVE5_V1, "observable", "update",
     "~12336", "~40980528", "~40976512", 1683360607326, "sample-org"),
    ("ryu-v1-observable-delete.json", THEHIVE5_V1, "observable", "delete",
     "~12336", "~81940656", "~40976512", 1683360734678, "sample-org"),
    # TheHive 3 (TheHiveDocs admin/webhooks.md): read as the TheHive 3-style version 0.
    ("thehivedocs-th3-case-create.json", THEHIVE5_V0, "case", "create",
     "AV6FZsTj0KeanEfOQfd_", None, "AV6FZsTj0KeanEfOQfd_", 1505476659427, None),
    ("thehivedocs-th3-case-update.json", THEHIVE5_V0, "case", "update",
     "AV6FZsTj0KeanEfOQfd_", None, "AV6FZsTj0KeanEfOQfd_", 1505477372601, None),
]


def test_every_sample_is_in_the_table():
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(row[0] for row in SAMPLE_TABLE)


@pytest.mark.parametrize(
    "name, shape, object_type, action, object_id, audit_id, case_id, timestamp_ms, organisation",
    SAMPLE_TABLE, ids=[row[0] for row in SAMPLE_TABLE])
def test_samples(name, shape, object_type, action, object_id, audit_id, case_id, timestamp_ms,
                 organisation):
    payload = sample(name)
    event = parse(payload)

    assert isinstance(event, WebhookEvent)
    assert event.shape == shape
    assert event.object_type == object_type
    assert event.action == action
    assert event.raw_object_type == payload["objectType"]
    assert event.raw_action == payload.get("action", payload.get("operation"))
    assert event.object_id == object_id
    assert event.audit_id == audit_id
    assert event.request_id == payload["requestId"]
    assert event.case_id == case_id
    assert event.timestamp_ms == timestamp_ms
    assert event.organisation == organisation
    assert event.ignore_reason is None
    assert event.case_key == f"case:{case_id}"
    if audit_id:
        assert event.dedup_key == f"audit:{audit_id}"
    else:
        assert event.dedup_key.startswith("digest:")


def test_parse_does_not_modify_the_payload():
    payload = sample("th5-observable-create-ip.json")
    before = copy.deepcopy(payload)
    parse(payload)
    assert payload == before


def test_thehive4_case_id_comes_from_embedded_case_not_root_id():
    """In TheHive 4 v0 the rootId of a case_artifact is the observable itself."""
    payload = sample("th4-case-artifact-create.json")
    assert payload["rootId"] == payload["objectId"]
    assert parse(payload).case_id == "~8396848"

    del payload["object"]["case"]
    event = parse(payload)
    assert event.case_id is None
    assert event.case_key == "object:~12734592"

    payload["rootId"] = "~999"
    assert parse(payload).case_id is None


def test_thehive5_observable_case_id_falls_back_to_root_id():
    payload = sample("th5-observable-create-ip.json")
    del payload["object"]["case"]
    del payload["context"]["case"]
    payload["rootId"] = "~777"
    assert parse(payload).case_id == "~777"


def test_thehive5_v0_observable_delete_is_ordered_with_its_case_by_root_id():
    """TheHive 5 version 0 sends a delete's context as a Share and its case only as rootId."""
    payload = sample("ryu-v0-observable-delete.json")
    assert payload["context"]["_type"] == "Share" and "object" not in payload
    event = parse(payload)
    assert event.case_key == "case:~40976512"
    # TheHive 4 version 0 sends the same delete with rootId = the observable: it names no case.
    th4 = changed("ryu-v0-observable-delete.json", _id=..., operation="delete", rootId="~12336")
    assert parse(th4).shape == THEHIVE4_V0 and parse(th4).case_id is None


def test_thehive5_observable_case_id_from_case_context():
    payload = changed("th5-observable-create-ip.json", rootId=...,
                      context={"_id": "~555", "_type": "Case"})
    del payload["object"]["case"]
    assert parse(payload).case_id == "~555"


def test_case_delete_case_id_is_the_object_not_the_organisation_root():
    payload = sample("th5-case-delete.json")
    assert payload["rootId"] == "~4120"
    event = parse(payload)
    assert event.case_id == payload["objectId"]
    assert "object" not in payload


def test_thehive5_v0_timestamp_falls_back_to_created_at():
    event = parse(changed("th5v0-case-create.json", startDate=..., createdAt=1717430499999))
    assert event.timestamp_ms == 1717430499999


@pytest.mark.parametrize("raw, normalised", [
    ("Creation", "create"), ("Update", "update"), ("Delete", "delete"),
])
def test_thehive5_v0_operations(raw, normalised):
    event = parse(changed("th5v0-case-create.json", operation=raw))
    assert (event.shape, event.action, event.raw_action) == (THEHIVE5_V0, normalised, raw)


@pytest.mark.parametrize("raw, normalised", [
    ("create", "create"), ("update", "update"), ("delete", "delete"),
])
def test_thehive4_operations(raw, normalised):
    event = parse(changed("th4-case-artifact-create.json", operation=raw))
    assert (event.shape, event.action) == (THEHIVE4_V0, normalised)


@pytest.mark.parametrize("raw, normalised", [
    ("case", "case"), ("CASE", "case"), ("Observable", "observable"), ("case_artifact", "observable"),
])
def test_object_types_are_normalised(raw, normalised):
    assert parse(changed("th5-case-update.json", objectType=raw)).object_type == normalised


def test_thehive5_v1_is_recognised_by_audit_type_without_action():
    with pytest.raises(PayloadError, match="action"):
        parse(changed("th5-case-update.json", action=..., operation="update"))


# --- dedup_key ------------------------------------------------------------------------------

def test_dedup_key_is_audit_id_when_present():
    assert parse(sample("th5-case-update.json")).dedup_key == "audit:~2056304"
    assert parse(sample("th5v0-case-create.json")).dedup_key == "audit:~2048116"


def test_thehive4_digest_is_stable():
    first = parse(sample("th4-case-artifact-create.json")).dedup_key
    assert first.startswith("digest:")
    assert len(first) == len("digest:") + 64
    assert parse(sample("th4-case-artifact-create.json")).dedup_key == first


@pytest.mark.parametrize("key, value", [
    ("details", {"ioc": True}),
    ("object", {"_id": "~12734592", "case": {"_id": "~8396848"}}),
    ("base", False),
    ("organisation", "other-org"),
])
def test_thehive4_digest_ignores_irrelevant_fields(key, value):
    base = parse(sample("th4-case-artifact-create.json")).dedup_key
    assert parse(changed("th4-case-artifact-create.json", **{key: value})).dedup_key == base


@pytest.mark.parametrize("key, value", [
    ("requestId", "6e2d1f0a9c3b44e1:-1a2b3c4d:18fd3a1b2c4:-8000:53"),
    ("objectId", "~12734593"),
    ("operation", "update"),
    ("startDate", 1717434300142),
])
def test_thehive4_digest_changes_with_identifying_fields(key, value):
    base = parse(sample("th4-case-artifact-create.json")).dedup_key
    other = parse(changed("th4-case-artifact-create.json", **{key: value})).dedup_key
    assert other.startswith("digest:")
    assert other != base


def test_different_audits_have_different_dedup_keys():
    keys = {parse(sample(row[0])).dedup_key for row in SAMPLE_TABLE}
    # The same audit captured in both webhook versions (ryu-v0/v1 deletes) is one event.
    audits = {row[5] or row[0] for row in SAMPLE_TABLE}
    assert len(keys) == len(audits) < len(SAMPLE_TABLE)
    assert parse(sample("ryu-v0-observable-delete.json")).dedup_key == \
        parse(sample("ryu-v1-observable-delete.json")).dedup_key


# --- ignored events -------------------------------------------------------------------------

@pytest.mark.parametrize("name, object_type", [
    ("th5-case-update.json", "Task"),
    ("th5-case-update.json", "Log"),
    ("th5-case-update.json", "Alert"),
    ("th5-case-update.json", "Comment"),
    ("th5-case-update.json", "Job"),
    ("th4-case-artifact-create.json", "case_task"),
    ("th4-case-artifact-create.json", "case_task_log"),
    ("th4-case-artifact-create.json", "alert"),
    ("th5v0-case-create.json", "case_task"),
])
def test_unsynced_object_types_are_ignored(name, object_type):
    event = parse(changed(name, objectType=object_type))
    assert event.ignore_reason is not None
    assert object_type in event.ignore_reason


@pytest.mark.parametrize("object_type", ["Task", "Log", "Comment"])
def test_ignored_types_need_no_object_id(object_type):
    event = parse(changed("th5-case-update.json", objectType=object_type, objectId=...))
    assert event.ignore_reason is not None
    assert event.object_id is None


@pytest.mark.parametrize("name, key", [
    ("th5-case-update.json", "action"),
    ("th4-case-artifact-create.json", "operation"),
])
def test_unknown_action_is_ignored(name, key):
    event = parse(changed(name, objectType="Case", **{key: "invoke"}))
    assert event.action == "invoke"
    assert event.ignore_reason is not None
    assert "invoke" in event.ignore_reason


def test_unknown_action_needs_no_object_id():
    event = parse(changed("th5-case-update.json", action="invoke", objectId=...))
    assert "invoke" in event.ignore_reason


def alert_observable(name: str) -> dict:
    payload = sample(name)
    obj = payload["object"]
    obj.pop("case", None)
    obj["alert"] = {"_id": "~40960", "_type": "Alert", "title": "Suspicious login"}
    payload.pop("context", None)
    return payload


@pytest.mark.parametrize("name", ["th5-observable-create-ip.json", "th4-case-artifact-create.json"])
def test_observable_of_an_alert_is_ignored(name):
    event = parse(alert_observable(name))
    assert event.object_type == "observable"
    assert event.ignore_reason is not None
    assert "alert" in event.ignore_reason


def test_observable_with_alert_and_case_is_not_ignored():
    payload = sample("th5-observable-create-ip.json")
    payload["object"]["alert"] = {"_id": "~40960"}
    assert parse(payload).ignore_reason is None


def test_observable_in_alert_context_is_ignored():
    payload = changed("th5-observable-create-ip.json", context={"_id": "~40960", "_type": "Alert"})
    del payload["object"]["case"]
    assert "alert" in parse(payload).ignore_reason


# --- PayloadError ---------------------------------------------------------------------------

@pytest.mark.parametrize("body, kind", [
    ([], "list"),
    ([sample("th5-case-update.json")], "list"),
    ("Case", "str"),
    (42, "int"),
    (4.2, "float"),
    (True, "bool"),
    (None, "NoneType"),
])
def test_body_must_be_an_object(body, kind):
    with pytest.raises(PayloadError, match="JSON object") as info:
        parse(body)
    assert kind in str(info.value)


@pytest.mark.parametrize("name", ["th5-case-update.json", "th4-case-artifact-create.json",
                                  "th5v0-case-create.json"])
def test_missing_object_type(name):
    with pytest.raises(PayloadError, match="missing objectType"):
        parse(changed(name, objectType=...))


def test_missing_action_v1():
    with pytest.raises(PayloadError, match="missing") as info:
        parse(changed("th5-case-update.json", action=...))
    assert "action" in str(info.value)


@pytest.mark.parametrize("name", ["th4-case-artifact-create.json", "th5v0-case-create.json"])
def test_missing_operation_v0(name):
    with pytest.raises(PayloadError, match="missing") as info:
        parse(changed(name, operation=...))
    assert "operation" in str(info.value)


@pytest.mark.parametrize("value", [5, "", "   ", ["Case"], {"name": "Case"}, True])
def test_object_type_must_be_a_non_empty_string(value):
    with pytest.raises(PayloadError, match="objectType must be a non-empty string"):
        parse(changed("th5-case-update.json", objectType=value))


@pytest.mark.parametrize("name, key", [
    ("th5-case-update.json", "action"),
    ("th4-case-artifact-create.json", "operation"),
])
@pytest.mark.parametrize("value", [1, "", " ", ["update"], False])
def test_action_must_be_a_non_empty_string(name, key, value):
    with pytest.raises(PayloadError, match=f"{key} must be a non-empty string"):
        parse(changed(name, **{key: value}))


@pytest.mark.parametrize("key", ["objectId", "rootId", "requestId", "_id"])
@pytest.mark.parametrize("value", [8396848, ["~8396848"], {"_id": "~1"}])
def test_ids_must_be_strings(key, value):
    with pytest.raises(PayloadError, match=f"{key} must be a string"):
        parse(changed("th5-case-update.json", **{key: value}))


@pytest.mark.parametrize("name, key", [
    ("th5-case-update.json", "_createdAt"),
    ("th4-case-artifact-create.json", "startDate"),
    ("th5v0-case-create.json", "startDate"),
])
@pytest.mark.parametrize("value", ["1717434000266", True, 1717434000266.5, [1]])
def test_timestamp_must_be_an_integer(name, key, value):
    with pytest.raises(PayloadError, match=f"{key} must be an integer"):
        parse(changed(name, **{key: value}))


@pytest.mark.parametrize("key", ["object", "details", "context"])
@pytest.mark.parametrize("value", [[], "text", 3, True])
def test_nested_parts_must_be_objects(key, value):
    with pytest.raises(PayloadError, match=f"{key} must be a JSON object"):
        parse(changed("th5-case-update.json", **{key: value}))


@pytest.mark.parametrize("name", [row[0] for row in SAMPLE_TABLE])
@pytest.mark.parametrize("object_id", [..., None, ""])
def test_synced_event_without_object_id(name, object_id):
    payload = changed(name, objectId=object_id)
    with pytest.raises(PayloadError, match="missing objectId") as info:
        parse(payload)
    assert payload["objectType"] in str(info.value)


# --- case_key -------------------------------------------------------------------------------

def test_events_of_one_case_share_the_case_key():
    names = ["th5-case-create.json", "th5-case-update.json", "th5-case-delete.json",
             "th5-observable-create-ip.json", "th5-observable-update-ioc.json",
             "th4-case-artifact-create.json", "th5v0-case-create.json"]
    assert {parse(sample(n)).case_key for n in names} == {"case:~8396848"}
    assert {parse(sample(n)).case_key for n in ["seed-case-update.json",
                                                  "seed-observable-update.json"]} == {"case:~43872472"}


def test_event_without_a_case_falls_back_to_the_object():
    event = parse({"_id": "~9", "_type": "Audit", "action": "update", "objectType": "Task",
                   "objectId": "~321"})
    assert event.case_id is None
    assert event.case_key == "object:~321"


# --- property: parse returns an event or raises PayloadError, nothing else ------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8,
)
KNOWN_KEYS = ["objectType", "objectId", "rootId", "requestId", "_id", "_type", "_createdAt",
              "startDate", "createdAt", "object", "context", "details", "organisation",
              "operation", "action"]
NAMES = st.sampled_from(["Case", "Observable", "case_artifact", "Task", "alert", "case"])
ACTIONS = st.sampled_from(["create", "update", "delete", "Creation", "Update", "invoke"])
# Arbitrary dicts with an objectType and maybe an action/operation, each of any JSON type.
ENVELOPES = st.builds(
    lambda head, known, extra: {**extra, **known, **head},
    st.fixed_dictionaries({"objectType": JSON | NAMES},
                          optional={"action": JSON | ACTIONS, "operation": JSON | ACTIONS}),
    st.dictionaries(st.sampled_from(KNOWN_KEYS[1:]), JSON, max_size=5),
    st.dictionaries(st.text(max_size=8), JSON, max_size=3),
)
# Real samples with a few envelope keys replaced by arbitrary JSON or removed, to get deep.
SAMPLE_PAYLOADS = [sample(row[0]) for row in SAMPLE_TABLE]


def _mutate(index, replace, remove):
    payload = copy.deepcopy(SAMPLE_PAYLOADS[index])
    for key in remove:
        payload.pop(key, None)
    payload.update(replace)
    return payload


MUTATED = st.builds(
    _mutate,
    st.integers(0, len(SAMPLE_PAYLOADS) - 1),
    st.dictionaries(st.sampled_from(KNOWN_KEYS), JSON | NAMES | ACTIONS, max_size=2),
    st.lists(st.sampled_from(KNOWN_KEYS), max_size=2),
)


def check_total(payload):
    try:
        event = parse(payload)
    except PayloadError as exc:
        assert str(exc)
        return
    assert isinstance(event, WebhookEvent)
    assert event.shape in (THEHIVE4_V0, THEHIVE5_V0, THEHIVE5_V1)
    assert isinstance(event.object_type, str) and event.object_type
    assert isinstance(event.action, str) and event.action
    assert event.dedup_key.startswith(("audit:", "digest:"))
    assert event.case_key
    assert parse(payload) == event
    if event.ignore_reason is None:
        assert event.object_type in events.SYNCED_OBJECT_TYPES
        assert event.object_id


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parse_any_json_value(payload):
    check_total(payload)


@settings(max_examples=300, deadline=None)
@given(ENVELOPES | MUTATED)
def test_parse_any_envelope(payload):
    check_total(payload)
