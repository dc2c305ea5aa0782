"""mapping: cases to ThreatQ events/incidents and observables to indicators, as tables."""
from __future__ import annotations

import ast
import dataclasses
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_mw_thehive import mapping
from tq_mw_thehive.config import SyncConfig
from tq_mw_thehive.mapping import (SEVERITY_LABELS, TLP_IDS, Attribute, CaseObject,
                                   IndicatorObject, MappedObservable, case_title,
                                   case_title_prefix, is_case_title, map_case, map_observable,
                                   tlp_id)
from tq_mw_thehive.thehive.model import Attachment, Case, Observable
from tq_mw_thehive.type_mapping import TypeMapping

SAMPLES = Path(__file__).parent / "samples"
EVENT = SyncConfig(cases_as="event", event_type="Incident")
INCIDENT = SyncConfig(cases_as="incident", event_type="Incident")
DEFAULT = TypeMapping.default()
HEX40 = "ff7b2c3938306261881c42e78d0df51d9bcdd574"
HEX64 = "e3b0c44298fc1c149afbf4c8996fb924" * 2


def sample_object(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))["object"]


# The guide's example case (seed-case-update.json), as the model reads it.
HAMSTERS = Case(
    id="~43872472", number=5984, title="Hamsters Test", description="Test integration with ThreatQ",
    severity=3, severity_label="HIGH", start_ms=1751456989469, tags=("utility",), flag=False,
    tlp="GREEN", pap="GREEN", status="New", owner="thehive@thehive.local",
    created_ms=1751457012174, updated_ms=1751886507804)

IP = Observable(
    id="~12734592", data_type="ip", data="203.0.113.47", attachment=None,
    message="IP hosting the credential-harvesting page", tags=("phishing-landing", "src:mail-header"),
    tlp="AMBER", pap="AMBER", ioc=True, sighted=True, created_ms=1717434300100,
    updated_ms=1717435200310, case_id="~8396848")


def case(**changes) -> Case:
    return dataclasses.replace(HAMSTERS, **changes)


def observable(**changes) -> Observable:
    return dataclasses.replace(IP, **changes)


def attribute(attributes, name):
    """The value of the attribute called ``name``, or None when it is left out."""
    values = [a.value for a in attributes if a.name == name]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


# --- the guide's example, end to end ----------------------------------------------------------

def test_guide_example_case_as_event():
    mapped = map_case(Case.from_thehive(sample_object("seed-case-update.json")), EVENT)
    assert mapped == CaseObject(
        collection="events",
        title="Hive Case # ~43872472 Hamsters Test",
        event_type="Incident",
        description="Test integration with ThreatQ",
        happened_at="2025-07-02 11:49:49",
        tags=("utility",),
        tlp_id=3,
        attributes=(
            Attribute("TheHive Id", "~43872472"),
            Attribute("Status", "New"),
            Attribute("Owner", "thehive@thehive.local"),
            Attribute("Case Id", "5984"),
            Attribute("Severity", "HIGH"),
            Attribute("PAP", "GREEN"),
            Attribute("Flagged", "No"),
        ),
    )


def test_guide_example_observable():
    mapped = map_observable(Observable.from_thehive(sample_object("seed-observable-update.json")),
                            DEFAULT)
    assert mapped == MappedObservable(indicators=(IndicatorObject(
        value=HEX40, type="SHA-1", description="unknown signature", status="Active", tags=("ioc",),
        tlp_id=2, attributes=(Attribute("PAP", "AMBER"), Attribute("Sighted?", "Yes")),
    ),), skipped=())


def test_thehive4_v0_observable_has_no_pap_attribute():
    mapped = map_observable(Observable.from_thehive(sample_object("th4-case-artifact-create.json")),
                            DEFAULT)
    (indicator,) = mapped.indicators
    assert (indicator.value, indicator.type, indicator.tlp_id) == ("203.0.113.47", "IP Address", 2)
    assert indicator.attributes == (Attribute("Sighted?", "Yes"),)


# --- case: title ------------------------------------------------------------------------------

def test_title_is_the_guides_example_exactly():
    assert case_title("~43872472", "Hamsters Test") == "Hive Case # ~43872472 Hamsters Test"
    assert map_case(HAMSTERS, EVENT).title == "Hive Case # ~43872472 Hamsters Test"


def test_title_prefix_survives_a_title_change():
    prefix = case_title_prefix("~43872472")
    assert prefix == "Hive Case # ~43872472"
    renamed = map_case(case(title="Hamsters Test (escalated)"), EVENT).title
    assert renamed == "Hive Case # ~43872472 Hamsters Test (escalated)"
    assert renamed.startswith(prefix + " ")


def test_title_trimmed_and_empty_title_is_the_prefix():
    assert case_title("~1", "  padded  ") == "Hive Case # ~1 padded"
    assert case_title("~1", "") == "Hive Case # ~1"


@pytest.mark.parametrize("title, case_id, belongs", [
    ("Hive Case # ~12 Hamsters", "~12", True),
    ("Hive Case # ~12", "~12", True),
    ("Hive Case # ~123 Hamsters", "~12", False),   # a longer id with the same start
    ("Hive Case # ~1 2 x", "~12", False),
    ("hive case # ~12 Hamsters", "~12", False),
])
def test_is_case_title(title, case_id, belongs):
    assert is_case_title(title, case_id) is belongs


# --- case: attributes, one row per attribute ---------------------------------------------------

CASE_ATTRIBUTE_ROWS = [
    # changes to the example case, attribute name, expected value (None: left out)
    ({}, "TheHive Id", "~43872472"),
    ({"id": "~8396848"}, "TheHive Id", "~8396848"),
    ({}, "Status", "New"),
    ({"status": "TruePositive"}, "Status", "TruePositive"),
    ({"status": None}, "Status", None),
    ({"status": ""}, "Status", None),
    ({}, "Owner", "thehive@thehive.local"),
    ({"owner": None}, "Owner", None),
    ({}, "Case Id", "5984"),
    ({"number": 0}, "Case Id", "0"),
    ({"number": None}, "Case Id", None),
    ({}, "Severity", "HIGH"),
    ({"severity_label": "MEDIUM", "severity": 4}, "Severity", "MEDIUM"),   # the label wins
    ({"severity_label": None, "severity": 1}, "Severity", "LOW"),
    ({"severity_label": None, "severity": 2}, "Severity", "MEDIUM"),
    ({"severity_label": None, "severity": 3}, "Severity", "HIGH"),
    ({"severity_label": None, "severity": 4}, "Severity", "CRITICAL"),
    ({"severity_label": None, "severity": 5}, "Severity", None),
    ({"severity_label": None, "severity": None}, "Severity", None),
    ({}, "PAP", "GREEN"),
    ({"pap": "AMBER"}, "PAP", "AMBER"),
    ({"pap": "CLEAR"}, "PAP", "CLEAR"),
    ({"pap": None}, "PAP", None),
    ({"flag": False}, "Flagged", "No"),
    ({"flag": True}, "Flagged", "Yes"),
]


@pytest.mark.parametrize("changes, name, expected", CASE_ATTRIBUTE_ROWS)
def test_case_attribute_row(changes, name, expected):
    assert attribute(map_case(case(**changes), EVENT).attributes, name) == expected


def test_case_attribute_order_and_unknowns_left_out():
    names = [a.name for a in map_case(HAMSTERS, EVENT).attributes]
    assert names == ["TheHive Id", "Status", "Owner", "Case Id", "Severity", "PAP", "Flagged"]
    bare = case(status=None, owner=None, number=None, severity=None, severity_label=None, pap=None)
    assert map_case(bare, EVENT).attributes == (Attribute("TheHive Id", "~43872472"),
                                                Attribute("Flagged", "No"))


def test_severity_labels_table():
    assert SEVERITY_LABELS == {1: "LOW", 2: "MEDIUM", 3: "HIGH", 4: "CRITICAL"}


def test_thehive5_v0_case_gets_severity_from_number():
    mapped = map_case(Case.from_thehive(sample_object("th5v0-case-create.json")), EVENT)
    assert attribute(mapped.attributes, "Severity") == "HIGH"
    assert attribute(mapped.attributes, "Case Id") == "142"
    assert attribute(mapped.attributes, "Status") == "Open"


# --- case: happened_at ------------------------------------------------------------------------

@pytest.fixture
def far_from_utc(monkeypatch):
    """A local zone 14 hours off UTC: local-time formatting would move every date."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("start_ms, created_ms, expected", [
    (1717429800000, 1717430400480, "2024-06-03 15:50:00"),
    (1717459199999, None, "2024-06-03 23:59:59"),          # one ms before midnight UTC
    (1717459200000, None, "2024-06-04 00:00:00"),          # midnight UTC
    (1717459200999, None, "2024-06-04 00:00:00"),          # milliseconds are dropped, not rounded
    (None, 1717430400480, "2024-06-03 16:00:00"),          # no start date: the creation date
    (0, 1717430400480, "1970-01-01 00:00:00"),             # 0 is a date, not a missing one
    (None, None, None),
    (10 ** 18, None, None),                                # beyond any calendar: left out
])
def test_happened_at_is_utc(far_from_utc, start_ms, created_ms, expected):
    mapped = map_case(case(start_ms=start_ms, created_ms=created_ms), EVENT)
    assert mapped.happened_at == expected


# --- case: TLP, tags, description, event vs incident ------------------------------------------

TLP_ROWS = [
    ("RED", 1), ("AMBER+STRICT", 1), ("AMBER", 2), ("GREEN", 3), ("WHITE", 4), ("CLEAR", 4),
    ("amber+strict", 1), (" green ", 3), ("PURPLE", None), ("", None), (None, None),
]


@pytest.mark.parametrize("label, expected", TLP_ROWS)
def test_tlp_id_row(label, expected):
    assert tlp_id(label) == expected
    assert map_case(case(tlp=label), EVENT).tlp_id == expected
    assert map_observable(observable(tlp=label), DEFAULT).indicators[0].tlp_id == expected


def test_tlp_table_never_lowers_a_restriction():
    assert TLP_IDS == {"RED": 1, "AMBER+STRICT": 1, "AMBER": 2, "GREEN": 3, "WHITE": 4, "CLEAR": 4}


def test_case_tags_and_description_pass_through():
    mapped = map_case(case(tags=("a", "b"), description="line 1\nline 2"), EVENT)
    assert (mapped.tags, mapped.description) == (("a", "b"), "line 1\nline 2")


def test_cases_as_event():
    mapped = map_case(HAMSTERS, SyncConfig(cases_as="event", event_type="Sighting"))
    assert (mapped.collection, mapped.event_type) == ("events", "Sighting")


def test_cases_as_incident():
    mapped = map_case(HAMSTERS, SyncConfig(cases_as="incident", event_type="Sighting"))
    assert (mapped.collection, mapped.event_type) == ("incident", None)
    assert mapped.title == "Hive Case # ~43872472 Hamsters Test"
    assert mapped.attributes == map_case(HAMSTERS, EVENT).attributes


# --- observable: attributes, one row per attribute ---------------------------------------------

OBSERVABLE_ATTRIBUTE_ROWS = [
    ({}, "PAP", "AMBER"),
    ({"pap": "RED"}, "PAP", "RED"),
    ({"pap": None}, "PAP", None),
    ({"sighted": True}, "Sighted?", "Yes"),
    ({"sighted": False}, "Sighted?", "No"),
    ({"ioc": True}, "Indicator Of Compromise?", "Yes"),
    ({"ioc": False}, "Indicator Of Compromise?", None),
]


@pytest.mark.parametrize("changes, name, expected", OBSERVABLE_ATTRIBUTE_ROWS)
def test_observable_attribute_row(changes, name, expected):
    (indicator,) = map_observable(observable(**changes), DEFAULT).indicators
    assert attribute(indicator.attributes, name) == expected


def test_observable_attribute_order():
    (indicator,) = map_observable(IP, DEFAULT).indicators
    assert [a.name for a in indicator.attributes] == ["PAP", "Sighted?", "Indicator Of Compromise?"]


def test_observable_fields():
    mapped = map_observable(IP, DEFAULT, status="Review")
    assert mapped.skipped == ()
    (indicator,) = mapped.indicators
    assert indicator.value == "203.0.113.47"
    assert indicator.type == "IP Address"
    assert indicator.description == "IP hosting the credential-harvesting page"
    assert indicator.status == "Review"
    assert indicator.tags == ("phishing-landing", "src:mail-header")
    assert map_observable(IP, DEFAULT).indicators[0].status == "Active"


def test_ipv6_observable():
    (indicator,) = map_observable(observable(data="2001:db8::47"), DEFAULT).indicators
    assert indicator.type == "IPv6 Address"


def test_value_is_stripped():
    (indicator,) = map_observable(observable(data_type="domain", data="  example.net \n"),
                                  DEFAULT).indicators
    assert indicator.value == "example.net"


@pytest.mark.parametrize("data", [None, "", "   "])
def test_empty_value_is_skipped_with_a_reason(data):
    mapped = map_observable(observable(data=data), DEFAULT)
    assert mapped.indicators == ()
    assert len(mapped.skipped) == 1 and "empty value" in mapped.skipped[0]


@pytest.mark.parametrize("data_type", ["other", "regexp", "custom-thing"])
def test_unmapped_type_is_skipped_with_a_reason(data_type):
    mapped = map_observable(observable(data_type=data_type, data="x"), DEFAULT)
    assert mapped.indicators == ()
    assert len(mapped.skipped) == 1 and repr(data_type) in mapped.skipped[0]


# --- observable: files ------------------------------------------------------------------------

def file_observable(name="invoice.pdf.exe", hashes=(HEX64, HEX40, "not-a-hash")) -> Observable:
    return observable(data_type="file", data=None, attachment=Attachment(name=name, hashes=hashes),
                      tags=("mal",), message="attachment of the phishing mail", tlp="RED",
                      pap="GREEN", ioc=True, sighted=False)


def test_file_two_hashes_a_filename_and_one_bad_hash_skipped():
    mapped = map_observable(file_observable(), DEFAULT)
    assert [(i.type, i.value) for i in mapped.indicators] == [
        ("SHA-256", HEX64), ("SHA-1", HEX40), ("Filename", "invoice.pdf.exe")]
    assert len(mapped.skipped) == 1 and "'not-a-hash' is not hexadecimal" in mapped.skipped[0]
    expected_attributes = (Attribute("PAP", "GREEN"), Attribute("Sighted?", "No"),
                           Attribute("Indicator Of Compromise?", "Yes"))
    for indicator in mapped.indicators:
        assert indicator.description == "attachment of the phishing mail"
        assert indicator.tags == ("mal",)
        assert indicator.tlp_id == 1
        assert indicator.status == "Active"
        assert indicator.attributes == expected_attributes


def test_file_hash_and_name_are_stripped_and_repeated_hashes_once():
    mapped = map_observable(file_observable(name=" a.exe ", hashes=(HEX40, f" {HEX40} ")), DEFAULT)
    assert [(i.type, i.value) for i in mapped.indicators] == [("SHA-1", HEX40), ("Filename", "a.exe")]
    assert mapped.skipped == ()


def test_file_without_attachment():
    mapped = map_observable(observable(data_type="file", data=None, attachment=None), DEFAULT)
    assert mapped.indicators == ()
    assert mapped.skipped == ("file observable without an attachment",)


def test_file_without_name_or_hashes():
    mapped = map_observable(file_observable(name=None, hashes=()), DEFAULT)
    assert mapped.indicators == ()
    assert mapped.skipped == ("file observable: the attachment has no hashes",
                              "file observable: the attachment has no name")


def test_file_not_in_a_custom_mapping_is_one_reason():
    mapped = map_observable(file_observable(), TypeMapping({"ip": "IP Address"}))
    assert mapped.indicators == ()
    assert len(mapped.skipped) == 1 and "'file' is not mapped" in mapped.skipped[0]


def test_file_with_a_custom_fixed_type():
    mapped = map_observable(file_observable(hashes=(HEX64,)), TypeMapping({"file": "SHA-256"}))
    assert [(i.type, i.value) for i in mapped.indicators] == [
        ("SHA-256", HEX64), ("Filename", "invoice.pdf.exe")]


# --- never raises -----------------------------------------------------------------------------

TYPES = st.sampled_from(["ip", "hash", "file", "url", "other", "regexp", "mail"]) | st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(data_type=TYPES, data=st.none() | st.text(max_size=200),
       hashes=st.lists(st.text(max_size=140), max_size=3), name=st.none() | st.text(max_size=30),
       with_attachment=st.booleans(),
       types=st.sampled_from([DEFAULT, TypeMapping({"ip": "IP Address", "x": "hash"})]))
def test_map_observable_never_raises(data_type, data, hashes, name, with_attachment, types):
    attachment = Attachment(name=name, hashes=tuple(hashes)) if with_attachment else None
    mapped = map_observable(observable(data_type=data_type, data=data, attachment=attachment), types)
    assert mapped.indicators or mapped.skipped
    for indicator in mapped.indicators:
        assert indicator.value and indicator.value == indicator.value.strip()
        assert indicator.type in types.indicator_types()


# --- purity -----------------------------------------------------------------------------------

def test_mapping_imports_only_the_model_and_type_mapping():
    tree = ast.parse(Path(mapping.__file__).read_text(encoding="utf-8"))
    project_imports = {node.module for node in tree.body
                       if isinstance(node, ast.ImportFrom) and node.module
                       and node.module.startswith("tq_mw_thehive")}
    assert project_imports == {"tq_mw_thehive.thehive.model", "tq_mw_thehive.type_mapping"}
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not top_level & {"requests", "sqlite3", "flask"}


def test_consume_item_carries_attributes_enrichment_tags_source_and_links():
    indicator = mapping.IndicatorObject(value="203.0.113.47", type="IP Address", description="landing",
                                        status="Active", tags=("phishing",), tlp_id=2,
                                        attributes=(mapping.Attribute("PAP", "AMBER"),))
    item = mapping.consume_item(indicator, 10, 1, {"name": "TheHive", "tlp_id": 2},
                                [("geoip", {"GeoIP Country": "NL"})], {"events": [12]})
    assert item == {
        "value": "203.0.113.47", "type_id": 10, "status_id": 1, "description": "landing",
        "sources": [{"name": "TheHive", "tlp_id": 2}],
        "attributes": [{"name": "PAP", "value": "AMBER"},
                       {"name": "GeoIP Country", "value": "NL", "sources": [{"name": "geoip"}]}],
        "tags": ["phishing"], "events": [{"id": 12}]}


def test_case_consume_item_is_the_create_with_attributes_and_tags():
    case = mapping.CaseObject(collection="events", title="Hive Case # ~1 t", event_type="Incident", description="d",
                              happened_at=None, tags=("a",), tlp_id=2,
                              attributes=(mapping.Attribute("Status", "New"),))
    assert mapping.case_consume_item(case, {"name": "TheHive", "tlp_id": 2}, 13, "2024-06-03 15:50:00") == {
        "title": "Hive Case # ~1 t", "type_id": 13, "happened_at": "2024-06-03 15:50:00", "description": "d",
        "sources": [{"name": "TheHive", "tlp_id": 2}], "attributes": [{"name": "Status", "value": "New"}],
        "tags": ["a"]}
    incident = mapping.case_consume_item(dataclasses.replace(case, collection="incident"), {"name": "TheHive"})
    assert incident["value"] == "Hive Case # ~1 t" and "title" not in incident and "type_id" not in incident


def test_consume_items_never_ask_threatq_to_normalize_the_value():
    """SDK1 sends ``normalize: 'Y'``; a rewritten value would escape the sync's exact look-up."""
    indicator = mapping.IndicatorObject(value="HXXPS://Example.COM/Path", type="URL", description="",
                                        status="Active", tags=(), tlp_id=None, attributes=())
    item = mapping.consume_item(indicator, 21, 1, {"name": "TheHive"})
    assert "normalize" not in item and item["value"] == "HXXPS://Example.COM/Path"
