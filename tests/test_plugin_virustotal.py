"""The VirusTotal plugin against recorded-shape answers (responses; no real service).

Answer shapes follow the VirusTotal API v3 documentation:
  https://docs.virustotal.com/reference/ip-object       (data.attributes.last_analysis_stats, reputation)
  https://docs.virustotal.com/reference/url-info        (GET /urls/{id})
  https://docs.virustotal.com/reference/private-urls-api (URL identifier: unpadded URL-safe base64)
  https://docs.virustotal.com/reference/errors          (error body, 401/404/429 codes)
"""
from __future__ import annotations

import json

import pytest
import requests
import responses

from conftest import plugin_fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, VERDICTS
from tq_mw_thehive.plugins import virustotal

KEY = "vt-test-key-5f2c0e9a7b1d4c3e8a6f0b2d9c7e1a4f"
API = "https://www.virustotal.com/api/v3"
IP_URL = f"{API}/ip_addresses/203.0.113.66"


def fixture(name: str) -> dict:
    return plugin_fixture(f"virustotal_{name}.json")


def ask(data_type: str = "ip", value: str = "203.0.113.66", **kwargs) -> Lookup:
    kwargs.setdefault("keys", {"VIRUSTOTAL": KEY})
    return Lookup(data_type=data_type, value=value, **kwargs)


def with_stats(**stats) -> dict:
    body = fixture("ip_malicious")
    body["data"]["attributes"]["last_analysis_stats"] = stats
    return body


# -- declared constants --------------------------------------------------------------------------

def test_declared_constants_are_valid():
    assert virustotal.NAME == virustotal.__name__.rsplit(".", 1)[-1] == "virustotal"
    assert virustotal.TITLE == "VirusTotal"
    assert virustotal.EXTERNAL is True and virustotal.ACTIVE is False
    assert set(virustotal.DATA_TYPES) == {"ip", "domain", "fqdn", "hostname", "url", "hash"}
    assert list(virustotal.API_KEYS) == ["VIRUSTOTAL"]
    assert virustotal.API_KEYS["VIRUSTOTAL"].startswith("https://")
    assert virustotal.RATE_LIMIT_PER_MIN == 4
    assert virustotal.CACHE_TTL > virustotal.NEGATIVE_CACHE_TTL > 0
    assert isinstance(virustotal.VERSION, str) and virustotal.DESCRIPTION
    assert callable(virustotal.lookup)


# -- the request ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data_type, value, url", [
    ("ip", "203.0.113.66", f"{API}/ip_addresses/203.0.113.66"),
    ("ip", "2001:db8::7", f"{API}/ip_addresses/2001:db8::7"),
    ("domain", "example.org", f"{API}/domains/example.org"),
    ("fqdn", "mail.example.org", f"{API}/domains/mail.example.org"),
    ("hostname", "www.example.org", f"{API}/domains/www.example.org"),
    # the documentation's own example of a URL identifier
    ("url", "http://www.google.com/", f"{API}/urls/aHR0cDovL3d3dy5nb29nbGUuY29tLw"),
    # URL-safe alphabet ("_" and "-", never "/" or "+") and no "=" padding
    ("url", "https://evil.example/login?next=%2Fadmin&x=~~~>",
     f"{API}/urls/aHR0cHM6Ly9ldmlsLmV4YW1wbGUvbG9naW4_bmV4dD0lMkZhZG1pbiZ4PX5-fj4"),
    ("hash", "8e97836ae8a620c70ba284fb51607937", f"{API}/files/8e97836ae8a620c70ba284fb51607937"),
])
@responses.activate
def test_each_data_type_asks_its_documented_endpoint_with_the_key_header(data_type, value, url):
    responses.get(url, json=fixture("domain_clean"))
    virustotal.lookup(ask(data_type, value, timeout=4.5))
    assert len(responses.calls) == 1
    request = responses.calls[0].request
    assert request.url == url
    assert request.method == "GET"
    assert request.headers["x-apikey"] == KEY
    assert KEY not in request.url
    assert responses.calls[0].request.req_kwargs["timeout"] == 4.5


@responses.activate
def test_the_given_session_is_used():
    responses.get(IP_URL, json=fixture("ip_malicious"))
    session = requests.Session()
    session.headers["X-Trace"] = "from-the-daemon"
    virustotal.lookup(ask(session=session))
    assert responses.calls[0].request.headers["X-Trace"] == "from-the-daemon"


@responses.activate
def test_unsupported_type_and_missing_key_fail_without_a_call():
    with pytest.raises(PluginError, match="mail"):
        virustotal.lookup(ask("mail", "a@example.org"))
    with pytest.raises(PluginError, match="VIRUSTOTAL"):
        virustotal.lookup(ask(keys={}))
    assert len(responses.calls) == 0


# -- answers -------------------------------------------------------------------------------------

@responses.activate
def test_malicious_ip():
    responses.get(IP_URL, json=fixture("ip_malicious"))
    result = virustotal.lookup(ask())
    assert result.verdict == "malicious"
    assert result.attributes == {"VirusTotal Detections": "9/94", "VirusTotal Reputation": "-42"}
    assert result.data["last_analysis_stats"]["malicious"] == 9
    assert (result.data["detections"], result.data["engines"], result.data["reputation"]) == (9, 94, -42)
    json.dumps(result.data)                                 # the result is JSON-serialisable


@responses.activate
def test_clean_domain_is_safe():
    responses.get(f"{API}/domains/example.org", json=fixture("domain_clean"))
    result = virustotal.lookup(ask("domain", "example.org"))
    assert result.verdict == "safe"
    assert result.attributes == {"VirusTotal Detections": "0/94", "VirusTotal Reputation": "3"}


@responses.activate
def test_undetected_file_without_reputation_is_info_and_counts_every_engine():
    sha256 = "775cfe35222de779be0fd26ec1dfe66d45b91a08a6b7d5905fe572a472aa3d45"
    responses.get(f"{API}/files/{sha256}", json=fixture("file_undetected"))
    result = virustotal.lookup(ask("hash", sha256))
    assert result.verdict == "info"                          # no engine says harmless
    assert result.attributes == {"VirusTotal Detections": "0/76"}   # no reputation: no attribute


@pytest.mark.parametrize("stats, expected", [
    ({"malicious": 3, "suspicious": 0, "harmless": 0, "undetected": 1}, "malicious"),
    ({"malicious": 2, "suspicious": 0, "harmless": 80, "undetected": 1}, "suspicious"),
    ({"malicious": 0, "suspicious": 1, "harmless": 80, "undetected": 1}, "suspicious"),
    ({"malicious": 0, "suspicious": 0, "harmless": 1, "undetected": 90}, "safe"),
    ({"malicious": 0, "suspicious": 0, "harmless": 0, "undetected": 90}, "info"),
])
@responses.activate
def test_verdict_thresholds(stats, expected):
    responses.get(IP_URL, json=with_stats(**stats))
    result = virustotal.lookup(ask())
    assert result.verdict == expected in VERDICTS
    assert result.attributes["VirusTotal Detections"] == f"{stats['malicious']}/{sum(stats.values())}"


def test_malicious_threshold_is_the_module_constant(monkeypatch):
    monkeypatch.setattr(virustotal, "MALICIOUS_MIN", 10)
    assert virustotal.verdict(9, 0, 50) == "suspicious"
    assert virustotal.verdict(10, 0, 50) == "malicious"


@responses.activate
def test_not_found_raises_not_found():
    responses.get(IP_URL, json=fixture("error_not_found"), status=404)
    with pytest.raises(NotFound, match="NotFoundError"):
        virustotal.lookup(ask())


# -- failures ------------------------------------------------------------------------------------

@responses.activate
def test_quota_exceeded_raises_quota_exceeded():
    responses.get(IP_URL, json=fixture("error_quota_exceeded"), status=429)
    with pytest.raises(QuotaExceeded, match="QuotaExceededError"):
        virustotal.lookup(ask())


@responses.activate
def test_too_many_requests_without_a_quota_code_is_quota_exceeded_too():
    responses.get(IP_URL, json={"error": {"code": "TooManyRequestsError", "message": "slow down"}}, status=429)
    with pytest.raises(QuotaExceeded, match="429"):
        virustotal.lookup(ask())


@pytest.mark.parametrize("status", [401, 403])
@responses.activate
def test_bad_key_is_a_plugin_error_that_never_shows_the_key(status):
    body = fixture("error_wrong_credentials")
    body["error"]["message"] += f": {KEY}"                  # a service that echoes the key back
    responses.get(IP_URL, json=body, status=status)
    with pytest.raises(PluginError) as caught:
        virustotal.lookup(ask())
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@responses.activate
def test_an_error_code_echoing_the_key_is_scrubbed():
    responses.get(IP_URL, json={"error": {"code": f"Bad{KEY}"}}, status=400)
    with pytest.raises(PluginError) as caught:
        virustotal.lookup(ask())
    assert KEY not in str(caught.value)


@responses.activate
def test_server_error_is_a_plugin_error():
    responses.get(IP_URL, json={"error": {"code": "TransientError", "message": "retry"}}, status=503)
    with pytest.raises(PluginError, match="503") as caught:
        virustotal.lookup(ask())
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))


@pytest.mark.parametrize("exc", [requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError])
@responses.activate
def test_timeout_and_connection_error_are_plugin_errors(exc):
    responses.get(IP_URL, body=exc("boom"))
    with pytest.raises(PluginError, match=exc.__name__):
        virustotal.lookup(ask())


@pytest.mark.parametrize("body", [
    "<html>502 Bad Gateway</html>",                          # not JSON
    "[]",                                                    # JSON, not an object
    json.dumps({"data": None}),
    json.dumps({"data": {"attributes": {}}}),                # no last_analysis_stats
    json.dumps({"data": {"attributes": {"last_analysis_stats": []}}}),
    json.dumps(with_stats(malicious="many", harmless=1)),    # a counter that is not a count
    json.dumps(with_stats(malicious=True, harmless=1)),
])
@responses.activate
def test_malformed_answer_is_a_plugin_error(body):
    responses.get(IP_URL, body=body, status=200, content_type="application/json")
    with pytest.raises(PluginError) as caught:
        virustotal.lookup(ask())
    assert type(caught.value) is PluginError


@responses.activate
def test_a_reputation_that_is_not_a_number_is_left_out():
    body = fixture("ip_malicious")
    body["data"]["attributes"]["reputation"] = "bad"
    responses.get(IP_URL, json=body)
    result = virustotal.lookup(ask())
    assert "VirusTotal Reputation" not in result.attributes
    assert result.attributes["VirusTotal Detections"] == "9/94"

