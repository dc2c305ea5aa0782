"""The Shodan plugin against recorded answers (``responses``; no real service is called).

Documentation: https://developer.shodan.io/api ("Host Information",
GET /shodan/host/{ip}?key=…; OpenAPI at https://developer.shodan.io/api/openapi.json).
Fixtures follow its host record: ip_str, ports, org, isp, asn, hostnames, data[], and
vulns (a list of CVE identifiers at host level, a dict inside each banner).
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from responses import matchers

from conftest import full_text, plugin_fixture as fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded
from tq_mw_thehive.plugins import shodan

KEY = "shodan-test-key-0123456789ABCDEF"
IP = "203.0.113.10"
URL = f"https://api.shodan.io/shodan/host/{IP}"


def ask(value: str = IP, keys=None, timeout: float = 4.5, data_type: str = "ip"):
    keys = {"SHODAN": KEY} if keys is None else keys
    return shodan.lookup(Lookup(data_type, value, keys=keys, session=requests.Session(), timeout=timeout))


@pytest.fixture
def api():
    with responses.RequestsMock() as rsps:
        yield rsps


def test_request_is_a_get_with_the_key_as_query_parameter_and_the_timeout(api):
    api.add(responses.GET, URL, json=fixture("shodan_host_clean.json"),
            match=[matchers.query_param_matcher({"key": KEY})])
    ask(timeout=4.5)
    (call,) = api.calls
    assert call.request.method == "GET"
    parts = urlsplit(call.request.url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "api.shodan.io", f"/shodan/host/{IP}")
    assert parse_qs(parts.query) == {"key": [KEY]}
    assert call.request.req_kwargs["timeout"] == 4.5


def test_the_value_is_stripped_before_it_goes_into_the_path(api):
    api.add(responses.GET, URL, json=fixture("shodan_host_clean.json"))
    ask(f"  {IP}\n")
    assert urlsplit(api.calls[0].request.url).path == f"/shodan/host/{IP}"


def test_a_host_with_vulns_is_suspicious_with_ports_org_and_vuln_count(api):
    api.add(responses.GET, URL, json=fixture("shodan_host_vulnerable.json"))
    result = ask()
    assert result.verdict == "suspicious"
    assert result.attributes == {
        "Shodan Ports": "22, 443, 8080",          # sorted numerically, not as given (8080, 443, 22)
        "Shodan Org": "Example Hosting LLC",
        "Shodan Vulns": "2",
    }
    assert result.data["ports"] == [22, 443, 8080]
    assert result.data["vulns"] == ["CVE-2019-0211", "CVE-2021-44790"]
    assert result.data["ip"] == IP and result.data["asn"] == "AS64500"
    json.dumps(result.data)                        # structured output stays JSON-serialisable
    assert "data" not in result.data               # banners are not copied into the cache


def test_a_host_without_vulns_is_info_and_has_no_vulns_attribute(api):
    api.add(responses.GET, "https://api.shodan.io/shodan/host/198.51.100.10",
            json=fixture("shodan_host_clean.json"))
    result = ask("198.51.100.10")
    assert result.verdict == "info"
    assert result.attributes == {"Shodan Ports": "53", "Shodan Org": "Example Public DNS"}
    assert result.data["vulns"] == []


def test_org_and_vulns_are_left_out_when_absent_or_null(api):
    host = fixture("shodan_host_vulnerable.json")
    del host["vulns"]
    host["org"] = None
    api.add(responses.GET, URL, json=host)
    result = ask()
    assert result.verdict == "info"
    assert result.attributes == {"Shodan Ports": "22, 443, 8080"}


def test_vulns_given_as_a_dict_are_counted_by_cve(api):
    host = fixture("shodan_host_vulnerable.json")
    host["vulns"] = {"CVE-2019-0211": {"cvss": 7.2}}
    api.add(responses.GET, URL, json=host)
    result = ask()
    assert result.verdict == "suspicious"
    assert result.attributes["Shodan Vulns"] == "1"


def test_an_unknown_ip_is_not_found(api):
    api.add(responses.GET, URL, status=404, json=fixture("shodan_not_found.json"))
    with pytest.raises(NotFound):
        ask()


def test_http_429_is_quota_exceeded(api):
    api.add(responses.GET, URL, status=429, json={"error": "Rate limit reached"})
    with pytest.raises(QuotaExceeded):
        ask()


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_a_plugin_error_that_never_shows_the_key(api, status):
    api.add(responses.GET, URL, status=status, body=f"<html>401 Unauthorized {URL}?key={KEY}</html>")
    with pytest.raises(PluginError) as caught:
        ask()
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value)
    assert KEY not in full_text(caught.value)


@pytest.mark.parametrize("error", [
    requests.exceptions.ReadTimeout,
    requests.exceptions.ConnectTimeout,
    requests.exceptions.ConnectionError,
])
def test_timeouts_and_connection_errors_are_plugin_errors_without_the_url(api, error):
    # requests quotes the URL, key included, in these exceptions' text.
    api.add(responses.GET, URL, body=error(f"HTTPSConnectionPool: Max retries exceeded with url: "
                                           f"/shodan/host/{IP}?key={KEY}"))
    with pytest.raises(PluginError) as caught:
        ask()
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert error.__name__ in str(caught.value)
    assert KEY not in full_text(caught.value)


def test_a_server_error_is_a_plugin_error(api):
    api.add(responses.GET, URL, status=503, body="Service Unavailable")
    with pytest.raises(PluginError) as caught:
        ask()
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert "503" in str(caught.value)


@pytest.mark.parametrize("body", [
    "<html>not json</html>",
    "",
    "null",
    "[]",
    '"a string"',
    '{"ports": "22,80"}',
    '{"ports": [22, "80"]}',
    '{"ports": [true]}',
    '{"ports": [22], "vulns": 3}',
    '{"ports": [22], "vulns": [1, 2]}',
    '{"ports": [22], "org": {"name": "x"}}',
    '{"ports": [22], "hostnames": "a.example"}',
])
def test_malformed_bodies_are_plugin_errors(api, body):
    api.add(responses.GET, URL, body=body, content_type="application/json")
    with pytest.raises(PluginError):   # never KeyError, TypeError or AttributeError
        ask()


@pytest.mark.parametrize("keys", [{}, {"SHODAN": ""}])
def test_without_a_key_nothing_is_sent(api, keys):
    with pytest.raises(PluginError, match="SHODAN"):
        ask(keys=keys)
    assert len(api.calls) == 0


def test_another_data_type_is_refused_without_a_call(api):
    with pytest.raises(PluginError):
        ask("example.com", data_type="domain")
    assert len(api.calls) == 0


def test_declared_constants():
    assert shodan.NAME == "shodan" == shodan.__name__.rsplit(".", 1)[-1]
    assert shodan.TITLE == "Shodan"
    assert shodan.DATA_TYPES == ("ip",)
    assert shodan.EXTERNAL is True and shodan.ACTIVE is False
    assert set(shodan.API_KEYS) == {"SHODAN"}
    assert urlsplit(shodan.API_KEYS["SHODAN"]).scheme == "https"
    assert shodan.RATE_LIMIT_PER_MIN == 60
    assert isinstance(shodan.VERSION, str) and shodan.VERSION
    assert shodan.NEGATIVE_CACHE_TTL < shodan.CACHE_TTL
    assert isinstance(shodan.DESCRIPTION, str) and shodan.DESCRIPTION
