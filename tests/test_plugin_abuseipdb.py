"""The AbuseIPDB plugin against recorded-shape answers (responses; no real service).

Answer shapes follow the AbuseIPDB API v2 documentation, CHECK endpoint:
  https://docs.abuseipdb.com/  ("CHECK Endpoint": GET /api/v2/check, data.abuseConfidenceScore,
  totalReports, isWhitelisted, usageType, ...)
Error bodies ({"errors": [{"detail", "status"}]}, 401 and 422 texts) as quoted in
  https://evidencehub.app/docs/Knowledge%20base/Error%20codes/AbuseIPDB
"""
from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from conftest import plugin_fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded
from tq_mw_thehive.plugins import abuseipdb

KEY = "abuseipdb-test-key-0d9f8e7c6b5a49382716f5e4d3c2b1a0"
CHECK = "https://api.abuseipdb.com/api/v2/check"


def fixture(name: str) -> dict:
    return plugin_fixture(f"abuseipdb_{name}.json")


def ask(value: str = "203.0.113.66", data_type: str = "ip", **kwargs) -> Lookup:
    kwargs.setdefault("keys", {"ABUSEIPDB": KEY})
    return Lookup(data_type=data_type, value=value, **kwargs)


def with_data(**fields) -> dict:
    body = fixture("check_malicious")
    body["data"].update(fields)
    return body


# -- declared constants --------------------------------------------------------------------------

def test_declared_constants_are_valid():
    assert abuseipdb.NAME == abuseipdb.__name__.rsplit(".", 1)[-1] == "abuseipdb"
    assert abuseipdb.TITLE == "AbuseIPDB"
    assert abuseipdb.EXTERNAL is True and abuseipdb.ACTIVE is False
    assert abuseipdb.DATA_TYPES == ("ip",)
    assert list(abuseipdb.API_KEYS) == ["ABUSEIPDB"]
    assert abuseipdb.API_KEYS["ABUSEIPDB"].startswith("https://")
    assert abuseipdb.CACHE_TTL > abuseipdb.NEGATIVE_CACHE_TTL > 0
    assert abuseipdb.RATE_LIMIT_PER_MIN is None or abuseipdb.RATE_LIMIT_PER_MIN > 0
    assert isinstance(abuseipdb.VERSION, str) and abuseipdb.DESCRIPTION
    assert callable(abuseipdb.lookup)


# -- the request ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ip", ["203.0.113.66", "2001:db8::7"])
@responses.activate
def test_check_request_has_the_documented_params_and_headers(ip):
    responses.get(CHECK, json=fixture("check_malicious"), match=[
        matchers.query_param_matcher({"ipAddress": ip, "maxAgeInDays": "90"}),
        matchers.header_matcher({"Key": KEY, "Accept": "application/json"})])
    abuseipdb.lookup(ask(ip, timeout=3.25))
    assert len(responses.calls) == 1
    request = responses.calls[0].request
    assert request.method == "GET"
    assert request.url.split("?")[0] == CHECK
    assert KEY not in request.url
    assert request.req_kwargs["timeout"] == 3.25


@responses.activate
def test_the_given_session_is_used():
    responses.get(CHECK, json=fixture("check_malicious"))
    session = requests.Session()
    session.headers["X-Trace"] = "from-the-daemon"
    abuseipdb.lookup(ask(session=session))
    assert responses.calls[0].request.headers["X-Trace"] == "from-the-daemon"


@responses.activate
def test_unsupported_type_and_missing_key_fail_without_a_call():
    with pytest.raises(PluginError, match="domain"):
        abuseipdb.lookup(ask("example.org", data_type="domain"))
    with pytest.raises(PluginError, match="ABUSEIPDB"):
        abuseipdb.lookup(ask(keys={}))
    assert len(responses.calls) == 0


# -- answers -------------------------------------------------------------------------------------

@responses.activate
def test_malicious_ip():
    responses.get(CHECK, json=fixture("check_malicious"))
    result = abuseipdb.lookup(ask())
    assert result.verdict == "malicious"
    assert result.attributes == {"AbuseIPDB Confidence": "100", "AbuseIPDB Reports": "1284",
                                 "AbuseIPDB Usage Type": "Data Center/Web Hosting/Transit"}
    assert result.data["abuseConfidenceScore"] == 100
    assert result.data["numDistinctUsers"] == 311
    assert result.data["lastReportedAt"] == "2024-05-30T20:55:14+00:00"
    json.dumps(result.data)


@responses.activate
def test_whitelisted_ip_is_safe():
    responses.get(CHECK, json=fixture("check_whitelisted"))
    result = abuseipdb.lookup(ask("198.51.100.53"))
    assert result.verdict == "safe"
    assert result.attributes == {"AbuseIPDB Confidence": "0", "AbuseIPDB Reports": "17",
                                 "AbuseIPDB Usage Type": "Content Delivery Network"}
    assert result.data["isWhitelisted"] is True


@responses.activate
def test_never_reported_ip_is_info_not_not_found():
    # AbuseIPDB has no "not found": an unknown address has a score and a report count of 0.
    responses.get(CHECK, json=fixture("check_unreported"))
    result = abuseipdb.lookup(ask("2001:db8::7"))
    assert result.verdict == "info"
    assert result.attributes == {"AbuseIPDB Confidence": "0", "AbuseIPDB Reports": "0"}  # usageType null


@pytest.mark.parametrize("score, whitelisted, expected", [
    (75, False, "malicious"),
    (74, False, "suspicious"),
    (25, False, "suspicious"),
    (24, False, "info"),
    (24, True, "safe"),
    (0, None, "info"),
    (90, True, "malicious"),
])
@responses.activate
def test_verdict_thresholds(score, whitelisted, expected):
    responses.get(CHECK, json=with_data(abuseConfidenceScore=score, isWhitelisted=whitelisted))
    result = abuseipdb.lookup(ask())
    assert result.verdict == expected
    assert result.attributes["AbuseIPDB Confidence"] == str(score)


@responses.activate
def test_an_answer_without_is_whitelisted_is_not_safe():
    body = fixture("check_whitelisted")
    del body["data"]["isWhitelisted"]
    responses.get(CHECK, json=body)
    assert abuseipdb.lookup(ask("198.51.100.53")).verdict == "info"


# -- failures ------------------------------------------------------------------------------------

@responses.activate
def test_rate_limit_raises_quota_exceeded():
    responses.get(CHECK, json=fixture("error_rate_limited"), status=429)
    with pytest.raises(QuotaExceeded, match="429"):
        abuseipdb.lookup(ask())


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_bad_key_is_a_plugin_error_that_never_shows_the_key(status):
    body = fixture("error_unauthorized")
    body["errors"][0]["detail"] += f" Key sent: {KEY}"      # a service that echoes the key back
    responses.get(CHECK, json=body, status=status)
    with pytest.raises(PluginError) as caught:
        abuseipdb.lookup(ask())
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value) and "Authentication failed" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@responses.activate
def test_invalid_ip_is_a_plugin_error_with_the_service_detail():
    responses.get(CHECK, json=fixture("error_invalid_ip"), status=422)
    with pytest.raises(PluginError, match="422.*must be a valid IPv4 or IPv6") as caught:
        abuseipdb.lookup(ask("not-an-ip"))
    assert type(caught.value) is PluginError


@responses.activate
def test_server_error_without_a_json_body_is_a_plugin_error():
    responses.get(CHECK, body="<html>Bad gateway</html>", status=502)
    with pytest.raises(PluginError, match="502") as caught:
        abuseipdb.lookup(ask())
    assert type(caught.value) is PluginError


@pytest.mark.parametrize("exc", [requests.exceptions.ConnectTimeout, requests.exceptions.ConnectionError])
@responses.activate
def test_timeout_and_connection_error_are_plugin_errors(exc):
    responses.get(CHECK, body=exc("boom"))
    with pytest.raises(PluginError, match=exc.__name__):
        abuseipdb.lookup(ask())


@pytest.mark.parametrize("body", [
    "not json at all",
    "[1, 2]",
    json.dumps({"errors": []}),                               # 200 without data
    json.dumps({"data": "203.0.113.66"}),
    json.dumps({"data": {"ipAddress": "203.0.113.66", "totalReports": 3}}),   # no score
    json.dumps({"data": {"ipAddress": "203.0.113.66", "abuseConfidenceScore": 80}}),  # no reports
    json.dumps(with_data(abuseConfidenceScore="80")),
    json.dumps(with_data(abuseConfidenceScore=180)),
    json.dumps(with_data(totalReports=-1)),
    json.dumps(with_data(totalReports=None)),
])
@responses.activate
def test_malformed_answer_is_a_plugin_error(body):
    responses.get(CHECK, body=body, status=200, content_type="application/json")
    with pytest.raises(PluginError) as caught:
        abuseipdb.lookup(ask())
    assert type(caught.value) is PluginError
