"""Write-back to TheHive: the tags' shapes, the outbox, the client's requests for TheHive 4 and 5,
and the sender (retries, refusals, one process at a time)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import List

import pytest
import responses

from conftest import THEHIVE_KEY
from tq_mw_thehive import state
from tq_mw_thehive.thehive.api import TheHiveClient, TheHiveNotFound, TheHiveRefused, TheHiveUnavailable
from tq_mw_thehive.writeback import Outbox, Sender, case_tags, case_url, observable_tags, ours, theirs

BASE = "https://thehive.example.org"


def run(plugin: str, verdict, status: str = "fetched"):
    return SimpleNamespace(plugin=plugin, verdict=verdict, status=status)


# --- tags ----------------------------------------------------------------------------------------

def test_the_daemon_s_tags_and_only_those_are_its_own():
    mine = ["threatq:indicator=12", "threatq:event=7", "threatq:incident=7", "threatq:verdict:vt=malicious"]
    others = ["threatq", "threatq:note", "threatq-indicator=1", "Threatq:indicator=1", "c2", "apt:threatq:event=1"]
    assert all(ours(t, "threatq") for t in mine)
    assert not any(ours(t, "threatq") for t in others)
    assert theirs(mine + others, "threatq") == tuple(others)
    assert theirs(["tq:indicator=1", "threatq:indicator=1"], "tq") == ("threatq:indicator=1",)


def test_an_observable_carries_its_indicators_and_each_plugin_s_worst_verdict():
    runs = [run("virustotal", "suspicious"), run("virustotal", "malicious"), run("otx", "safe", "cached"),
            run("geoip", "info"), run("shodan", None, "not_found"), run("abuseipdb", "malicious", "error")]
    assert observable_tags("threatq", [812, 813, 812], runs) == [
        "threatq:indicator=812", "threatq:indicator=813", "threatq:verdict:otx=safe",
        "threatq:verdict:virustotal=malicious"]


def test_a_case_carries_its_event_or_incident_and_its_url():
    assert case_tags("tq", "events", 7) == ["tq:event=7"]
    assert case_tags("tq", "incident", 7) == ["tq:incident=7"]
    assert case_url("https://tq.example", "events", 7) == "https://tq.example/events/7/details"


# --- the outbox ----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def outbox(tmp_path):
    path = tmp_path / "state.db"
    state.open_state(path).close()
    woken: List[int] = []
    box = Outbox(path, clock=Clock(), on_due=lambda: woken.append(1))
    box.woken = woken
    return box


def test_a_want_is_due_once_and_an_equal_want_costs_nothing(outbox):
    assert outbox.want("~1", "observable", ["threatq:indicator=5"]) is True
    assert outbox.woken == [1]
    assert outbox.want("~1", "observable", ["threatq:indicator=5"]) is False  # the echo of our own change
    (row,) = outbox.due()
    outbox.sent(row)
    assert outbox.due() == [] and outbox.pending() == 0
    assert outbox.want("~1", "observable", ["threatq:indicator=5"]) is False
    assert outbox.woken == [1]


def test_a_want_that_changes_while_it_is_sent_stays_due(outbox):
    outbox.want("~1", "observable", ["threatq:indicator=5"])
    (row,) = outbox.due()
    outbox.want("~1", "observable", ["threatq:indicator=5", "threatq:verdict:vt=malicious"])
    outbox.sent(row)
    (again,) = outbox.due()
    assert json.loads(again["sent_tags"]) == ["threatq:indicator=5"]
    assert json.loads(again["want_tags"]) == ["threatq:indicator=5", "threatq:verdict:vt=malicious"]


def test_a_failure_waits_before_the_next_try_and_a_given_up_row_waits_for_a_new_want(outbox):
    outbox.want("~1", "case", ["threatq:event=2"])
    (row,) = outbox.due()
    outbox.failed(row, "TheHive down", 30)
    assert outbox.due() == [] and outbox.pending() == 1
    outbox.clock.now += 30
    (row,) = outbox.due()
    assert (row["attempts"], row["last_error"]) == (1, "TheHive down")
    outbox.failed(row, "refused", None)
    assert outbox.pending() == 0
    assert outbox.want("~1", "case", ["threatq:event=3"]) is True


def test_a_verdict_change_replaces_only_that_plugin_s_tag(outbox):
    outbox.want("~1", "observable", ["threatq:indicator=5", "threatq:verdict:vt=safe", "threatq:verdict:otx=safe"])
    outbox.sent(outbox.due()[0])
    assert outbox.set_verdict(["~1", "~unknown"], "threatq", "vt", "malicious") == 1
    (row,) = outbox.due()
    assert json.loads(row["want_tags"]) == ["threatq:indicator=5", "threatq:verdict:otx=safe",
                                            "threatq:verdict:vt=malicious"]
    outbox.sent(row)
    outbox.set_verdict(["~1"], "threatq", "otx", None)  # no answer any more: its tag goes
    assert json.loads(outbox.due()[0]["want_tags"]) == ["threatq:indicator=5", "threatq:verdict:vt=malicious"]


# --- the client: TheHive 5 and TheHive 4 ----------------------------------------------------------

def client() -> TheHiveClient:
    c = TheHiveClient(BASE, THEHIVE_KEY, max_wait_s=0)
    return c


def body(call) -> dict:
    return json.loads(call.request.body)


@responses.activate
def test_thehive5_gets_add_and_remove_tags_and_a_custom_field_map():
    responses.patch(f"{BASE}/api/v1/observable/~9", status=204)
    responses.patch(f"{BASE}/api/v1/case/~3", status=204)
    c = client()
    c.update_tags("observable", "~9", ["threatq:indicator=5"], ["threatq:verdict:vt=safe"])
    c.set_case_custom_field("~3", "threatq-url", "https://tq/events/1/details")
    assert body(responses.calls[0]) == {"addTags": ["threatq:indicator=5"], "removeTags": ["threatq:verdict:vt=safe"]}
    assert body(responses.calls[1]) == {"customFields": {"threatq-url": "https://tq/events/1/details"}}
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {THEHIVE_KEY}"
    assert c.add_tags_supported is True


@responses.activate
def test_thehive4_refusing_add_tags_gets_the_whole_list_with_only_our_tags_changed(caplog):
    path = f"{BASE}/api/v1/observable/~9"
    responses.patch(path, status=400, json={"type": "BadRequestError", "message": "Invalid field addTags"})
    responses.post(f"{BASE}/api/v1/query", json=[{"_id": "~9", "tags": ["c2", "threatq:verdict:vt=safe"]}])
    responses.patch(path, status=204)
    responses.patch(f"{BASE}/api/v1/case/~3", status=204)
    c = client()
    with caplog.at_level(logging.INFO, logger="tq_mw_thehive.thehive"):
        c.update_tags("observable", "~9", ["threatq:indicator=5"], ["threatq:verdict:vt=safe"])
    assert body(responses.calls[2]) == {"tags": ["c2", "threatq:indicator=5"]}
    assert c.add_tags_supported is False
    assert sum("whole list" in r.getMessage() for r in caplog.records) == 1
    c.set_case_custom_field("~3", "threatq-url", "u")
    assert body(responses.calls[3]) == {"customFields.threatq-url": "u"}  # never the map: it replaces all on 4
    c.update_tags("observable", "~9", ["x"], [])
    assert [call.request.method for call in responses.calls[4:]] == ["POST", "PATCH"]  # remembered: no addTags


@responses.activate
def test_a_400_once_add_tags_worked_is_a_refusal_not_thehive4():
    path = f"{BASE}/api/v1/observable/~9"
    responses.patch(path, status=204)
    responses.patch(path, status=400, json={"type": "BadRequestError", "message": "Invalid tag"})
    c = client()
    c.update_tags("observable", "~9", ["a"], [])
    with pytest.raises(TheHiveRefused) as refused:
        c.update_tags("observable", "~9", ["b"], [])
    assert refused.value.status == 400 and c.add_tags_supported is True


@responses.activate
def test_unknown_objects_and_a_down_thehive_raise_what_the_sender_tells_apart():
    responses.patch(f"{BASE}/api/v1/observable/~gone", status=404, json={"type": "NotFoundError", "message": "x"})
    responses.patch(f"{BASE}/api/v1/observable/~9", status=503)
    c = client()
    with pytest.raises(TheHiveNotFound):
        c.update_tags("observable", "~gone", ["a"], [])
    with pytest.raises(TheHiveUnavailable):
        c.update_tags("observable", "~9", ["a"], [])


# --- the sender ------------------------------------------------------------------------------------

class FakeTheHive:
    def __init__(self) -> None:
        self.calls: list = []
        self.fail: dict = {}

    def update_tags(self, kind, object_id, add, remove):
        self.calls.append(("tags", kind, object_id, list(add), list(remove)))
        if object_id in self.fail:
            raise self.fail[object_id]

    def set_case_custom_field(self, case_id, name, value):
        self.calls.append(("field", case_id, name, value))
        if "field" in self.fail:
            raise self.fail["field"]


def test_the_sender_tells_the_difference_then_nothing_more(outbox):
    hive = FakeTheHive()
    sender = Sender(outbox, hive, "w1", "threatq-url")
    outbox.want("~c", "case", ["threatq:event=2"], "https://tq/events/2/details")
    outbox.want("~o", "observable", ["threatq:indicator=5", "threatq:verdict:vt=safe"])
    assert sender.run_once() == 2
    assert sender.run_once() == 0
    outbox.want("~o", "observable", ["threatq:indicator=5", "threatq:verdict:vt=malicious"])
    assert sender.run_once() == 1
    assert hive.calls == [
        ("tags", "case", "~c", ["threatq:event=2"], []),
        ("field", "~c", "threatq-url", "https://tq/events/2/details"),
        ("tags", "observable", "~o", ["threatq:indicator=5", "threatq:verdict:vt=safe"], []),
        ("tags", "observable", "~o", ["threatq:verdict:vt=malicious"], ["threatq:verdict:vt=safe"]),
    ]


def test_a_down_thehive_is_retried_with_one_warning_and_a_deleted_object_is_dropped(outbox, caplog):
    hive = FakeTheHive()
    sender = Sender(outbox, hive, "w1", None)
    hive.fail = {"~o": TheHiveUnavailable("HTTP 503"), "~gone": TheHiveNotFound("HTTP 404")}
    outbox.want("~o", "observable", ["threatq:indicator=5"])
    outbox.want("~gone", "observable", ["threatq:indicator=6"])
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.writeback"):
        assert sender.run_once() == 0
        outbox.clock.now += 10
        assert sender.run_once() == 0
    assert sum("delayed" in r.getMessage() for r in caplog.records) == 1
    assert outbox.pending() == 1  # ~o waits for the next try; ~gone is dropped
    del hive.fail["~o"]
    outbox.clock.now += 600
    assert sender.run_once() == 1 and outbox.pending() == 0


def test_a_refused_change_waits_for_the_next_want_and_a_missing_custom_field_does_not_stop_the_tags(outbox, caplog):
    hive = FakeTheHive()
    sender = Sender(outbox, hive, "w1", "no-such-field")
    refused = TheHiveRefused("HTTP 404")
    hive.fail = {"field": refused, "~bad": TheHiveRefused("HTTP 400: Invalid tag")}
    outbox.want("~c", "case", ["threatq:event=2"], "u")
    outbox.want("~c2", "case", ["threatq:event=3"], "u2")
    outbox.want("~bad", "observable", ["threatq:indicator=5"])
    with caplog.at_level(logging.WARNING, logger="tq_mw_thehive.writeback"):
        assert sender.run_once() == 2
    assert sum("no-such-field" in r.getMessage() for r in caplog.records) == 1  # once per process
    assert sum("refused for observable ~bad" in r.getMessage() for r in caplog.records) == 1
    assert outbox.pending() == 0
    del hive.fail["field"]  # an admin created the field: the case's next change sends it
    assert outbox.want("~c", "case", ["threatq:event=2"], "u") is True
    hive.calls.clear()
    assert sender.run_once() == 1 and hive.calls == [("field", "~c", "no-such-field", "u")]


def test_one_process_sends_at_a_time(outbox):
    first, second = Sender(outbox, FakeTheHive(), "w1", None), Sender(outbox, FakeTheHive(), "w2", None)
    outbox.want("~o", "observable", ["threatq:indicator=5"])
    assert first._lock(True)
    assert second.run_once() == 0 and second.thehive.calls == []
    first._lock(False)
    assert second.run_once() == 1
