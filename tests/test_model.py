"""thehive.model: v1 and v0 case/observable objects to Case and Observable, or a ModelError."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_mw_thehive.thehive.model import (PAP_LABELS, TLP_LABELS, Attachment, Case, ModelError,
                                         Observable)

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


def part(name: str, *path: str) -> dict:
    """A nested object of a sample, e.g. part("th4-case-artifact-create.json", "object", "case")."""
    obj = sample(name)
    for key in path:
        obj = obj[key]
    return obj


PHISHING_TITLE = "Phishing wave targeting finance mailboxes"
PHISHING_DESCRIPTION = "Several users in finance reported a credential-harvesting mail."

# --- cases from every sample ------------------------------------------------------------------

CASE_TABLE = [
    # (sample, path to the case object), expected Case
    (("th5-case-create.json", "object"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=3, severity_label="HIGH", start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="New", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=None)),
    (("th5-case-create.json", "details"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=3, severity_label="HIGH", start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="New", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=None)),
    (("th5-case-update.json", "object"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=4, severity_label="CRITICAL", start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="InProgress", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=1717434000250)),
    (("th5-observable-create-ip.json", "object", "case"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=4, severity_label="CRITICAL", start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="InProgress", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=1717434000250)),
    (("seed-case-update.json", "object"), Case(
        id="~43872472", number=5984, title="Hamsters Test", description="Test integration with ThreatQ",
        severity=3, severity_label="HIGH", start_ms=1751456989469, tags=("utility",), flag=False,
        tlp="GREEN", pap="GREEN", status="New", owner="thehive@thehive.local",
        created_ms=1751457012174, updated_ms=1751886507804)),
    # TheHive 5 version 0: caseId, owner, createdAt, numbers without labels
    (("th5v0-case-create.json", "object"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=3, severity_label=None, start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="Open", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=None)),
    # TheHive 4 version 0: the case embedded in a case_artifact, with updatedAt
    (("th4-case-artifact-create.json", "object", "case"), Case(
        id="~8396848", number=142, title=PHISHING_TITLE, description=PHISHING_DESCRIPTION,
        severity=3, severity_label=None, start_ms=1717429800000, tags=("phishing", "finance"),
        flag=False, tlp="AMBER", pap="AMBER", status="Open", owner="jdoe@soc.example.org",
        created_ms=1717430400480, updated_ms=1717434000250)),
]


@pytest.mark.parametrize("where, expected", CASE_TABLE, ids=[".".join(w) for w, _ in CASE_TABLE])
def test_case_from_every_sample(where, expected):
    assert Case.from_thehive(part(*where)) == expected


OBSERVABLE_TABLE = [
    (("th5-observable-create-ip.json", "object"), Observable(
        id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
        message="IP hosting the credential-harvesting page", tags=("phishing-landing", "src:mail-header"),
        tlp="AMBER", pap="AMBER", ioc=False, sighted=True, created_ms=1717434300100, updated_ms=None,
        case_id="~8396848")),
    # the create's details carry no embedded case
    (("th5-observable-create-ip.json", "details"), Observable(
        id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
        message="IP hosting the credential-harvesting page", tags=("phishing-landing", "src:mail-header"),
        tlp="AMBER", pap="AMBER", ioc=False, sighted=True, created_ms=1717434300100, updated_ms=None,
        case_id=None)),
    (("th5-observable-update-ioc.json", "object"), Observable(
        id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
        message="IP hosting the credential-harvesting page", tags=("phishing-landing", "src:mail-header"),
        tlp="AMBER", pap="AMBER", ioc=True, sighted=True, created_ms=1717434300100,
        updated_ms=1717435200310, case_id="~8396848")),
    (("seed-observable-update.json", "object"), Observable(
        id="~85033200", data_type="hash", data="ff7b2c3938306261881c42e78d0df51d9bcdd574",
        attachment=None, message="unknown signature", tags=("ioc",), tlp="AMBER", pap="AMBER",
        ioc=False, sighted=True, created_ms=1751876750526, updated_ms=1751887430161, case_id=None)),
    # TheHive 4 version 0 case_artifact: numeric tlp, no pap, createdAt, embedded v0 case
    (("th4-case-artifact-create.json", "object"), Observable(
        id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
        message="IP hosting the credential-harvesting page", tags=("phishing-landing",),
        tlp="AMBER", pap=None, ioc=False, sighted=True, created_ms=1717434300100, updated_ms=None,
        case_id="~8396848")),
    # TheHive 4's details are v1 style but without labels
    (("th4-case-artifact-create.json", "details"), Observable(
        id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
        message="IP hosting the credential-harvesting page", tags=("phishing-landing",),
        tlp="AMBER", pap=None, ioc=False, sighted=True, created_ms=1717434300100, updated_ms=None,
        case_id=None)),
]


@pytest.mark.parametrize("where, expected", OBSERVABLE_TABLE,
                         ids=[".".join(w) for w, _ in OBSERVABLE_TABLE])
def test_observable_from_every_sample(where, expected):
    assert Observable.from_thehive(part(*where)) == expected


def test_case_delete_details_have_no_id():
    """A case delete carries only {number, title}: not a case object, and said so."""
    with pytest.raises(ModelError, match=r"case\._id"):
        Case.from_thehive(part("th5-case-delete.json", "details"))


# --- labels and numbers -----------------------------------------------------------------------

def test_tlp_table_is_the_thehive4_scheme():
    assert TLP_LABELS == {0: "WHITE", 1: "GREEN", 2: "AMBER", 3: "RED"}
    assert PAP_LABELS == TLP_LABELS


def base_case(**fields) -> dict:
    obj = {"_id": "~1", "title": "t"}
    obj.update(fields)
    return obj


def base_observable(**fields) -> dict:
    obj = {"_id": "~2", "dataType": "ip", "data": "192.0.2.1"}
    obj.update(fields)
    return obj


@pytest.mark.parametrize("number, label", [(0, "WHITE"), (1, "GREEN"), (2, "AMBER"), (3, "RED"),
                                           (4, "RED"), (-1, "RED"), (99, "RED")])
def test_tlp_and_pap_numbers_without_labels(number, label):
    """Unknown numbers (TheHive 5.2+ RED is 4) read as RED: a restriction is never lowered."""
    case = Case.from_thehive(base_case(tlp=number, pap=number))
    observable = Observable.from_thehive(base_observable(tlp=number, pap=number))
    assert (case.tlp, case.pap) == (label, label)
    assert (observable.tlp, observable.pap) == (label, label)


@pytest.mark.parametrize("field", ["tlp", "pap"])
def test_label_wins_over_number_and_is_upper_cased(field):
    # TheHive 5.2+: 3 is AMBER+STRICT, not RED; only the label says so.
    case = Case.from_thehive(base_case(**{field: 3, f"{field}Label": "amber+strict"}))
    observable = Observable.from_thehive(base_observable(**{field: 4, f"{field}Label": "Red"}))
    assert getattr(case, field) == "AMBER+STRICT"
    assert getattr(observable, field) == "RED"


def test_unknown_label_is_kept_and_empty_label_falls_back_to_number():
    assert Case.from_thehive(base_case(tlpLabel="purple", tlp=0)).tlp == "PURPLE"
    assert Case.from_thehive(base_case(tlpLabel="  ", tlp=1)).tlp == "GREEN"


def test_severity_label_only_from_the_label():
    assert Case.from_thehive(base_case(severity=2, severityLabel="medium")).severity_label == "MEDIUM"
    case = Case.from_thehive(base_case(severity=2))
    assert (case.severity, case.severity_label) == (2, None)


def test_v1_names_win_over_v0_names():
    case = Case.from_thehive(base_case(number=7, caseId=8, assignee="new", owner="old",
                                       _createdAt=10, createdAt=20, _updatedAt=30, updatedAt=40))
    assert (case.number, case.owner, case.created_ms, case.updated_ms) == (7, "new", 10, 30)


def test_v0_id_field_when_no_underscore_id():
    assert Case.from_thehive({"id": "~9"}).id == "~9"


# --- defaults and cleaning --------------------------------------------------------------------

def test_missing_fields_have_empty_defaults():
    case = Case.from_thehive({"_id": "~1"})
    assert case == Case(id="~1", number=None, title="", description="", severity=None,
                        severity_label=None, start_ms=None, tags=(), flag=False, tlp=None, pap=None,
                        status=None, owner=None, created_ms=None, updated_ms=None)
    observable = Observable.from_thehive({"_id": "~2", "dataType": "other"})
    assert observable == Observable(id="~2", data_type="other", data=None, attachment=None,
                                    message="", tags=(), tlp=None, pap=None, ioc=False,
                                    sighted=False, created_ms=None, updated_ms=None, case_id=None)


def test_null_values_are_missing_values():
    case = Case.from_thehive(base_case(title=None, tags=None, flag=None, tlp=None, number=None))
    assert (case.title, case.tags, case.flag, case.tlp, case.number) == ("", (), False, None, None)


def test_tags_deduplicated_in_order_trimmed_and_empty_dropped():
    case = Case.from_thehive(base_case(tags=["b", "a", "b", " a ", "", "  ", "c"]))
    assert case.tags == ("b", "a", "c")


def test_integral_float_numbers_are_accepted():
    assert Case.from_thehive(base_case(number=142.0, startDate=1.5e12)).number == 142
    assert Case.from_thehive(base_case(startDate=1.5e12)).start_ms == 1500000000000


def test_file_observable_attachment():
    obj = base_observable(dataType="file", data=None, attachment={
        "name": "invoice.pdf.exe", "hashes": ["a" * 64, "b" * 40, "a" * 64], "size": 10,
        "contentType": "application/octet-stream", "id": "x"})
    observable = Observable.from_thehive(obj)
    assert observable.data is None
    assert observable.attachment == Attachment(name="invoice.pdf.exe", hashes=("a" * 64, "b" * 40))


def test_embedded_v0_case_id():
    obj = base_observable(case={"id": "~77", "_type": "case"})
    assert Observable.from_thehive(obj).case_id == "~77"


# --- wrong types: ModelError naming the field, never KeyError/TypeError ----------------------

CASE_WRONG_TYPES = [
    ("_id", 5, "case._id"),
    ("_id", "", "case._id"),
    ("number", "142", "case.number"),
    ("caseId", 1.5, "case.caseId"),
    ("title", ["x"], "case.title"),
    ("description", 3, "case.description"),
    ("severity", "HIGH", "case.severity"),
    ("severity", True, "case.severity"),
    ("severityLabel", 3, "case.severityLabel"),
    ("startDate", "2024-06-03", "case.startDate"),
    ("tags", "phishing", "case.tags"),
    ("tags", ["ok", 3], "case.tags"),
    ("flag", "false", "case.flag"),
    ("tlp", "AMBER", "case.tlp"),
    ("tlpLabel", 2, "case.tlpLabel"),
    ("pap", {}, "case.pap"),
    ("papLabel", [], "case.papLabel"),
    ("status", 1, "case.status"),
    ("assignee", {"login": "x"}, "case.assignee"),
    ("owner", 1, "case.owner"),
    ("_createdAt", "yesterday", "case._createdAt"),
    ("updatedAt", False, "case.updatedAt"),
]


@pytest.mark.parametrize("field, value, named", CASE_WRONG_TYPES)
def test_case_wrong_type_names_the_field(field, value, named):
    obj = {"_id": "~1", "title": "t"}  # no v1 names, so v0 names (caseId, owner...) are read
    obj[field] = value
    with pytest.raises(ModelError) as caught:
        Case.from_thehive(obj)
    assert str(caught.value).startswith(named + ":")


OBSERVABLE_WRONG_TYPES = [
    ("_id", None, "observable._id"),
    ("dataType", None, "observable.dataType"),
    ("dataType", 3, "observable.dataType"),
    ("data", ["a", "b"], "observable.data"),
    ("attachment", "file.exe", "observable.attachment"),
    ("attachment", {"name": 3}, "observable.attachment.name"),
    ("attachment", {"hashes": "abc"}, "observable.attachment.hashes"),
    ("message", 1, "observable.message"),
    ("tags", {"a": 1}, "observable.tags"),
    ("tlp", "2", "observable.tlp"),
    ("papLabel", 2, "observable.papLabel"),
    ("ioc", "true", "observable.ioc"),
    ("sighted", 1, "observable.sighted"),
    ("_createdAt", [], "observable._createdAt"),
    ("case", "~8396848", "observable.case"),
    ("case", {"_id": 8396848}, "observable.case._id"),
]


@pytest.mark.parametrize("field, value, named", OBSERVABLE_WRONG_TYPES)
def test_observable_wrong_type_names_the_field(field, value, named):
    obj = copy.deepcopy(part("th5-observable-update-ioc.json", "object"))
    if value is None:
        obj.pop(field)
    else:
        obj[field] = value
    with pytest.raises(ModelError) as caught:
        Observable.from_thehive(obj)
    assert str(caught.value).startswith(named + ":")


@pytest.mark.parametrize("not_an_object", [None, [], "case", 3])
def test_not_an_object(not_an_object):
    with pytest.raises(ModelError, match=r"^case: must be a JSON object"):
        Case.from_thehive(not_an_object)
    with pytest.raises(ModelError, match=r"^observable: must be a JSON object"):
        Observable.from_thehive(not_an_object)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
FIELDS = ["_id", "id", "number", "caseId", "title", "severity", "severityLabel", "tags", "flag",
          "tlp", "tlpLabel", "pap", "papLabel", "assignee", "owner", "_createdAt", "dataType",
          "data", "attachment", "message", "ioc", "sighted", "case", "startDate"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8))
def test_only_model_error_for_any_json(obj):
    for cls in (Case, Observable):
        try:
            cls.from_thehive(obj)
        except ModelError:
            pass


# --- real captures (tests/samples/README.md) ------------------------------------------------------

def test_thehive3_case_from_the_docs_capture_has_only_id_and_case_id():
    case = Case.from_thehive(part("thehivedocs-th3-case-update.json", "object"))
    assert (case.id, case.number, case.severity, case.tlp, case.pap, case.owner, case.status, case.updated_ms) == (
        "AV6FZsTj0KeanEfOQfd_", 1445, 3, "AMBER", None, "me", "Open", 1505477372246)


def test_thehive5_observable_from_the_capture_with_thehive5_case_fields():
    observable = Observable.from_thehive(part("ryu-v1-observable-tag-update.json", "object"))
    assert (observable.id, observable.data_type, observable.data, observable.tags, observable.case_id) == (
        "~12336", "domain", "1.1.1.1", ("a-sample-tag", "new-tag"), "~40976512")
    case = Case.from_thehive(part("ryu-v1-observable-tag-update.json", "object", "case"))
    assert (case.number, case.status, case.owner) == (3, "InProgress", "user@thehive.local")


@pytest.mark.parametrize("name", ["ryu-v1-observable-delete.json", "ryu-v0-observable-delete.json"])
def test_a_captured_observable_delete_carries_no_observable(name):
    payload = sample(name)
    assert "object" not in payload
    with pytest.raises(ModelError, match=r"observable\._id"):
        Observable.from_thehive(payload["details"])
