"""The OTX plugin against recorded-shape answers (responses; no real service).

The API reference (https://otx.alienvault.com/api) is a JavaScript page the documentation search
could not read; request and answer shapes follow AlienVault's SDK and a vendor connector page:
  https://github.com/AlienVault-OTX/OTX-Python-SDK  (OTXv2.py: X-OTX-API-KEY header,
      /api/v1/indicators/{type}/{indicator}/general, 403 bad key, 404 not found;
      IndicatorTypes.py: IPv4, IPv6, domain, hostname, url, file)
  https://docs.swimlane.com/connectors/alienvault-open-threat-exchange  (pulse_info.count, pulse_info.pulses)
"""
from __future__ import annotations

import json

import pytest
import requests
import responses

from conftest import plugin_fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded
from tq_mw_thehive.plugins import otx

KEY = "otx-test-key-9a8b7c6d5e4f30211f2e3d4c5b6a7988"
API = "https://otx.alienvault.com/api/v1/indicators"
IP_URL = f"{API}/IPv4/203.0.113.66/general"


def fixture(name: str) -> dict:
    return plugin_fixture(f"otx_{name}.json")


def ask(data_type: str = "ip", value: str = "203.0.113.66", **kwargs) -> Lookup:
    kwargs.setdefault("keys", {"OTX": KEY})
    return Lookup(data_type=data_type, value=value, **kwargs)


def with_pulses(count: int) -> dict:
    body = fixture("ipv4_general_malicious")
    body["pulse_info"]["count"] = count
    body["pulse_info"]["pulses"] = body["pulse_info"]["pulses"][:count]
    return body


# -- declared constants --------------------------------------------------------------------------

def test_declared_constants_are_valid():
    assert otx.NAME == otx.__name__.rsplit(".", 1)[-1] == "otx"
    assert otx.TITLE == "OTX"
    assert otx.EXTERNAL is True and otx.ACTIVE is False
    assert set(otx.DATA_TYPES) == {"ip", "domain", "fqdn", "hostname", "url", "hash"}
    assert list(otx.API_KEYS) == ["OTX"]
    assert otx.API_KEYS["OTX"].startswith("https://")
    assert otx.CACHE_TTL > otx.NEGATIVE_CACHE_TTL > 0
    assert otx.RATE_LIMIT_PER_MIN is None or otx.RATE_LIMIT_PER_MIN > 0
    assert isinstance(otx.VERSION, str) and otx.DESCRIPTION
    assert callable(otx.lookup)


# -- the request ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data_type, value, url", [
    ("ip", "203.0.113.66", f"{API}/IPv4/203.0.113.66/general"),
    ("ip", "2001:db8::7", f"{API}/IPv6/2001:db8::7/general"),
    ("domain", "example.org", f"{API}/domain/example.org/general"),
    ("fqdn", "mail.example.org", f"{API}/hostname/mail.example.org/general"),
    ("hostname", "www.example.org", f"{API}/hostname/www.example.org/general"),
    ("url", "http://evil.example/dl/payload.exe", f"{API}/url/http://evil.example/dl/payload.exe/general"),
    # a query string must not end the path: "?" (and the "=" and "&" after it) are encoded
    ("url", "http://evil.example/a?b=1&c=2", f"{API}/url/http://evil.example/a%3Fb%3D1%26c%3D2/general"),
    ("hash", "8e97836ae8a620c70ba284fb51607937", f"{API}/file/8e97836ae8a620c70ba284fb51607937/general"),
])
@responses.activate
def test_each_data_type_asks_its_section_with_the_key_header(data_type, value, url):
    responses.get(url, json=fixture("domain_general_clean"))
    otx.lookup(ask(data_type, value, timeout=2.5))
    assert len(responses.calls) == 1
    request = responses.calls[0].request
    assert request.url == url
    assert request.method == "GET"
    assert request.headers["X-OTX-API-KEY"] == KEY
    assert KEY not in request.url
    assert request.req_kwargs["timeout"] == 2.5


@responses.activate
def test_the_given_session_is_used():
    responses.get(IP_URL, json=fixture("ipv4_general_malicious"))
    session = requests.Session()
    session.headers["X-Trace"] = "from-the-daemon"
    otx.lookup(ask(session=session))
    assert responses.calls[0].request.headers["X-Trace"] == "from-the-daemon"


@responses.activate
def test_bad_ip_unsupported_type_and_missing_key_fail_without_a_call():
    with pytest.raises(PluginError, match="not an IP address"):
        otx.lookup(ask("ip", "example.org"))
    with pytest.raises(PluginError, match="mail"):
        otx.lookup(ask("mail", "a@example.org"))
    with pytest.raises(PluginError, match="OTX"):
        otx.lookup(ask(keys={}))
    assert len(responses.calls) == 0


# -- answers -------------------------------------------------------------------------------------

@responses.activate
def test_ip_in_many_pulses_is_malicious_with_at_most_ten_names():
    responses.get(IP_URL, json=fixture("ipv4_general_malicious"))
    result = otx.lookup(ask())
    assert result.verdict == "malicious"
    assert result.attributes == {"OTX Pulses": "12"}
    assert result.data["pulse_count"] == 12
    assert result.data["pulses"] == [f"Botnet C2 infrastructure, wave {i}" for i in range(1, 11)]
    json.dumps(result.data)


@responses.activate
def test_domain_in_no_pulse_is_info():
    responses.get(f"{API}/domain/example.org/general", json=fixture("domain_general_clean"))
    result = otx.lookup(ask("domain", "example.org"))
    assert result.verdict == "info"
    assert result.attributes == {"OTX Pulses": "0"}
    assert result.data == {"pulse_count": 0, "pulses": []}


@pytest.mark.parametrize("count, expected", [
    (0, "info"), (1, "suspicious"), (4, "suspicious"), (5, "malicious")])
@responses.activate
def test_verdict_thresholds(count, expected):
    responses.get(IP_URL, json=with_pulses(count))
    result = otx.lookup(ask())
    assert result.verdict == expected
    assert result.attributes == {"OTX Pulses": str(count)}


@responses.activate
def test_the_count_not_the_length_of_the_list_decides():
    body = with_pulses(2)
    body["pulse_info"]["count"] = 40                        # the list is a page of a larger count
    body["pulse_info"]["pulses"].append({"id": "no-name"})  # a pulse without a name is skipped
    responses.get(IP_URL, json=body)
    result = otx.lookup(ask())
    assert (result.verdict, result.attributes["OTX Pulses"]) == ("malicious", "40")
    assert len(result.data["pulses"]) == 2


@responses.activate
def test_not_found_raises_not_found():
    responses.get(f"{API}/file/8e97836ae8a620c70ba284fb51607937/general", status=404)
    with pytest.raises(NotFound):
        otx.lookup(ask("hash", "8e97836ae8a620c70ba284fb51607937"))


# -- failures ------------------------------------------------------------------------------------

@responses.activate
def test_rate_limit_raises_quota_exceeded():
    responses.get(IP_URL, body="Too Many Requests", status=429)
    with pytest.raises(QuotaExceeded, match="429"):
        otx.lookup(ask())


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_bad_key_is_a_plugin_error_that_never_shows_the_key(status):
    responses.get(IP_URL, json={"detail": f"Invalid API key {KEY}"}, status=status)  # echoes it
    with pytest.raises(PluginError) as caught:
        otx.lookup(ask())
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@responses.activate
def test_server_error_is_a_plugin_error():
    responses.get(IP_URL, body="<html>oops</html>", status=500)
    with pytest.raises(PluginError, match="500") as caught:
        otx.lookup(ask())
    assert type(caught.value) is PluginError


@pytest.mark.parametrize("exc", [requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError])
@responses.activate
def test_timeout_and_connection_error_are_plugin_errors(exc):
    responses.get(IP_URL, body=exc("boom"))
    with pytest.raises(PluginError, match=exc.__name__):
        otx.lookup(ask())


@pytest.mark.parametrize("body", [
    "<!doctype html><title>maintenance</title>",
    "null",
    json.dumps({"indicator": "203.0.113.66"}),              # no pulse_info
    json.dumps({"pulse_info": []}),
    json.dumps({"pulse_info": {"pulses": []}}),              # no count
    json.dumps({"pulse_info": {"count": "3", "pulses": []}}),
    json.dumps({"pulse_info": {"count": -1, "pulses": []}}),
    json.dumps({"pulse_info": {"count": 2, "pulses": {"name": "x"}}}),
])
@responses.activate
def test_malformed_answer_is_a_plugin_error(body):
    responses.get(IP_URL, body=body, status=200, content_type="application/json")
    with pytest.raises(PluginError) as caught:
        otx.lookup(ask())
    assert type(caught.value) is PluginError
