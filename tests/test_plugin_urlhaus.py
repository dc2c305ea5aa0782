"""The URLhaus plugin against recorded answers (``responses``; no real service is called).

Documentation: https://urlhaus-api.abuse.ch/ (sections #urlinfo, #hostinfo and
#payloadinfo; Auth-Key header, https://auth.abuse.ch/). Fixtures follow its answers:
query_status, then for a URL url_status/threat/tags/urlhaus_reference/payloads, for a
host url_count (a string)/firstseen/blacklists/urls[], for a payload
md5_hash/sha256_hash/file_type/signature/url_count/urls[].
"""
from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest
import requests
import responses
from responses import matchers

from conftest import full_text, plugin_fixture as fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded
from tq_mw_thehive.plugins import urlhaus

KEY = "urlhaus-auth-key-0123456789abcdef0123"
BASE = "https://urlhaus-api.abuse.ch/v1/"
MD5 = "12c8aec5766ac3e6f26f2505e2f4a8f2"
SHA256 = "01fa56184fcaa42b6ee1882787a34098c79898c182814774fd81dc18a6af0b00"
BAD_URL = "http://malware.example.com/invoice/Outstanding-Invoices.doc"


def ask(data_type: str, value: str, keys=None, timeout: float = 3.0):
    keys = {"URLHAUS": KEY} if keys is None else keys
    return urlhaus.lookup(Lookup(data_type, value, keys=keys, session=requests.Session(), timeout=timeout))


@pytest.fixture
def api():
    with responses.RequestsMock() as rsps:
        yield rsps


@pytest.mark.parametrize("data_type, value, endpoint, form, answer", [
    ("url", BAD_URL, "url/", {"url": BAD_URL}, "urlhaus_url_online.json"),
    ("domain", "malware.example.com", "host/", {"host": "malware.example.com"}, "urlhaus_host_online.json"),
    ("fqdn", "malware.example.com", "host/", {"host": "malware.example.com"}, "urlhaus_host_online.json"),
    ("hostname", "malware.example.com", "host/", {"host": "malware.example.com"}, "urlhaus_host_online.json"),
    ("ip", "198.51.100.23", "host/", {"host": "198.51.100.23"}, "urlhaus_host_offline.json"),
    ("hash", MD5, "payload/", {"md5_hash": MD5}, "urlhaus_payload.json"),
    ("hash", MD5.upper(), "payload/", {"md5_hash": MD5}, "urlhaus_payload.json"),
    ("hash", f" {SHA256} ", "payload/", {"sha256_hash": SHA256}, "urlhaus_payload.json"),
])
def test_each_data_type_posts_its_form_with_the_auth_key(api, data_type, value, endpoint, form, answer):
    api.add(responses.POST, BASE + endpoint, json=fixture(answer),
            match=[matchers.urlencoded_params_matcher(form), matchers.header_matcher({"Auth-Key": KEY})])
    ask(data_type, value, timeout=3.0)
    (call,) = api.calls
    assert call.request.method == "POST"
    assert call.request.url == BASE + endpoint
    assert call.request.headers["Auth-Key"] == KEY
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert {k: v[0] for k, v in parse_qs(call.request.body).items()} == form
    assert call.request.req_kwargs["timeout"] == 3.0


@pytest.mark.parametrize("value", [
    "3395856ce81f2b7382dee72602f798b642f14140",   # SHA-1: URLhaus does not index it
    "a" * 128,                                     # SHA-512
    "z" * 32,                                      # 32 characters, not hex
    "",
])
def test_other_hashes_are_not_found_without_a_call(api, value):
    with pytest.raises(NotFound):
        ask("hash", value)
    assert len(api.calls) == 0


def test_an_online_url_is_malicious(api):
    api.add(responses.POST, BASE + "url/", json=fixture("urlhaus_url_online.json"))
    result = ask("url", BAD_URL)
    assert result.verdict == "malicious"
    assert result.attributes == {"URLhaus Status": "online", "URLhaus Threat": "malware_download"}
    assert result.data["tags"] == ["doc", "emotet", "heodo"]
    assert result.data["reference"] == "https://urlhaus.abuse.ch/url/105821/"
    json.dumps(result.data)


def test_an_offline_url_is_suspicious(api):
    api.add(responses.POST, BASE + "url/", json=fixture("urlhaus_url_offline.json"))
    result = ask("url", "http://203.0.113.78/bins/x.mips")
    assert result.verdict == "suspicious"
    assert result.attributes == {"URLhaus Status": "offline", "URLhaus Threat": "malware_download"}


def test_a_url_of_unknown_status_without_threat_is_info(api):
    answer = fixture("urlhaus_url_offline.json")
    answer["url_status"], answer["threat"] = "unknown", None
    api.add(responses.POST, BASE + "url/", json=answer)
    result = ask("url", "http://203.0.113.78/bins/x.mips")
    assert result.verdict == "info"
    assert result.attributes == {"URLhaus Status": "unknown"}


def test_a_host_with_an_online_url_is_malicious_and_counts_online_of_total(api):
    api.add(responses.POST, BASE + "host/", json=fixture("urlhaus_host_online.json"))
    result = ask("domain", "malware.example.com")
    assert result.verdict == "malicious"
    assert result.attributes == {
        "URLhaus Status": "1/3 URLs online",
        "URLhaus Threat": "malware_download, phishing",
    }
    assert (result.data["url_count"], result.data["urls_online"]) == (3, 1)


def test_a_host_with_only_offline_urls_is_suspicious(api):
    api.add(responses.POST, BASE + "host/", json=fixture("urlhaus_host_offline.json"))
    result = ask("ip", "198.51.100.23")
    assert result.verdict == "suspicious"
    assert result.attributes == {"URLhaus Status": "0/2 URLs online", "URLhaus Threat": "malware_download"}


def test_the_host_total_is_url_count_not_the_length_of_a_truncated_list(api):
    answer = fixture("urlhaus_host_online.json")
    answer["url_count"] = "110"
    api.add(responses.POST, BASE + "host/", json=answer)
    assert ask("domain", "malware.example.com").attributes["URLhaus Status"] == "1/110 URLs online"


def test_a_host_with_no_urls_is_info(api):
    answer = fixture("urlhaus_host_offline.json")
    answer["url_count"], answer["urls"] = "0", []
    api.add(responses.POST, BASE + "host/", json=answer)
    result = ask("ip", "198.51.100.23")
    assert result.verdict == "info"
    assert result.attributes == {"URLhaus Status": "0/0 URLs online"}


def test_a_known_payload_is_malicious_with_its_signature(api):
    api.add(responses.POST, BASE + "payload/", json=fixture("urlhaus_payload.json"))
    result = ask("hash", SHA256)
    assert result.verdict == "malicious"
    assert result.attributes == {"URLhaus Status": "known payload", "URLhaus Threat": "Heodo"}
    assert result.data["md5"] == MD5 and result.data["url_count"] == 2
    assert result.data["file_type"] == "doc"


def test_a_payload_without_signature_has_no_threat_attribute(api):
    answer = fixture("urlhaus_payload.json")
    answer["signature"] = None
    api.add(responses.POST, BASE + "payload/", json=answer)
    result = ask("hash", MD5)
    assert result.verdict == "malicious"
    assert "URLhaus Threat" not in result.attributes


@pytest.mark.parametrize("data_type, value, endpoint", [
    ("url", "http://clean.example.org/", "url/"),
    ("fqdn", "clean.example.org", "host/"),
    ("hash", MD5, "payload/"),
])
def test_no_results_is_not_found(api, data_type, value, endpoint):
    api.add(responses.POST, BASE + endpoint, json=fixture("urlhaus_no_results.json"))
    with pytest.raises(NotFound):
        ask(data_type, value)


@pytest.mark.parametrize("answer", ["urlhaus_invalid_url.json", "urlhaus_unknown_auth_key.json"])
def test_other_query_statuses_are_plugin_errors(api, answer):
    api.add(responses.POST, BASE + "url/", json=fixture(answer))
    with pytest.raises(PluginError) as caught:
        ask("url", "not a url")
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert fixture(answer)["query_status"] in str(caught.value)
    assert KEY not in full_text(caught.value)


def test_http_429_is_quota_exceeded(api):
    api.add(responses.POST, BASE + "host/", status=429, body="Too Many Requests")
    with pytest.raises(QuotaExceeded):
        ask("domain", "malware.example.com")


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_a_plugin_error_that_never_shows_the_key(api, status):
    api.add(responses.POST, BASE + "url/", status=status, json=fixture("urlhaus_unknown_auth_key.json"))
    with pytest.raises(PluginError) as caught:
        ask("url", BAD_URL)
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value)
    assert KEY not in full_text(caught.value)


@pytest.mark.parametrize("error", [
    requests.exceptions.ReadTimeout,
    requests.exceptions.ConnectTimeout,
    requests.exceptions.ConnectionError,
])
def test_timeouts_and_connection_errors_are_plugin_errors(api, error):
    api.add(responses.POST, BASE + "url/", body=error("urlhaus-api.abuse.ch: boom"))
    with pytest.raises(PluginError) as caught:
        ask("url", BAD_URL)
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert error.__name__ in str(caught.value)
    assert KEY not in full_text(caught.value)


def test_a_server_error_is_a_plugin_error(api):
    api.add(responses.POST, BASE + "url/", status=502, body="Bad Gateway")
    with pytest.raises(PluginError, match="502"):
        ask("url", BAD_URL)


@pytest.mark.parametrize("endpoint, data_type, value, body", [
    ("url/", "url", BAD_URL, "<html>not json</html>"),
    ("url/", "url", BAD_URL, "[]"),
    ("url/", "url", BAD_URL, "null"),
    ("url/", "url", BAD_URL, "{}"),
    ("url/", "url", BAD_URL, '{"query_status": 5}'),
    ("url/", "url", BAD_URL, '{"query_status": "ok"}'),
    ("url/", "url", BAD_URL, '{"query_status": "ok", "url_status": ["online"]}'),
    ("url/", "url", BAD_URL, '{"query_status": "ok", "url_status": "online", "tags": "exe"}'),
    ("url/", "url", BAD_URL, '{"query_status": "ok", "url_status": "online", "threat": 3}'),
    ("host/", "domain", "a.example", '{"query_status": "ok", "urls": "none"}'),
    ("host/", "domain", "a.example", '{"query_status": "ok", "urls": ["http://a.example/x"]}'),
    ("host/", "domain", "a.example", '{"query_status": "ok", "url_count": "many", "urls": []}'),
    ("host/", "domain", "a.example", '{"query_status": "ok", "url_count": true, "urls": []}'),
    ("host/", "domain", "a.example", '{"query_status": "ok", "urls": [{"url_status": 1}]}'),
    ("payload/", "hash", MD5, '{"query_status": "ok", "signature": ["Heodo"]}'),
    ("payload/", "hash", MD5, '{"query_status": "ok", "url_count": [2]}'),
])
def test_malformed_bodies_are_plugin_errors(api, endpoint, data_type, value, body):
    api.add(responses.POST, BASE + endpoint, body=body, content_type="application/json")
    with pytest.raises(PluginError) as caught:   # never KeyError, TypeError or AttributeError
        ask(data_type, value)
    assert not isinstance(caught.value, NotFound)


@pytest.mark.parametrize("keys", [{}, {"URLHAUS": ""}])
def test_without_a_key_nothing_is_sent(api, keys):
    with pytest.raises(PluginError, match="URLHAUS"):
        ask("url", BAD_URL, keys=keys)
    assert len(api.calls) == 0


def test_an_undeclared_data_type_is_refused_without_a_call(api):
    with pytest.raises(PluginError):
        ask("mail", "a@example.com")
    assert len(api.calls) == 0


def test_declared_constants():
    assert urlhaus.NAME == "urlhaus" == urlhaus.__name__.rsplit(".", 1)[-1]
    assert urlhaus.TITLE == "URLhaus"
    assert set(urlhaus.DATA_TYPES) == {"url", "domain", "fqdn", "hostname", "ip", "hash"}
    assert urlhaus.EXTERNAL is True and urlhaus.ACTIVE is False
    assert urlhaus.API_KEYS == {"URLHAUS": "https://auth.abuse.ch/"}
    assert isinstance(urlhaus.VERSION, str) and urlhaus.VERSION
    assert 0 < urlhaus.NEGATIVE_CACHE_TTL <= urlhaus.CACHE_TTL
