"""The GreyNoise Community plugin against recorded answers (``responses``; no real service is called).

Documentation: https://docs.greynoise.io/reference/getcommunityip (GET
/v3/community/{ip}, optional ``key`` header). Fixtures follow its answer: ip, noise,
riot, classification, name, link, last_seen, message; an unobserved IP answers 404
with noise/riot false and "IP not observed scanning the internet or contained in RIOT
data set." (the 429 body is not documented there, so the tests do not rely on it).
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import requests
import responses
from responses import matchers

from conftest import full_text, plugin_fixture as fixture
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded
from tq_mw_thehive.plugins import greynoise

KEY = "greynoise-test-key-abcdef0123456789"
BASE = "https://api.greynoise.io/v3/community/"


def ask(value: str, keys=None, timeout: float = 2.5, data_type: str = "ip"):
    keys = {"GREYNOISE": KEY} if keys is None else keys
    return greynoise.lookup(Lookup(data_type, value, keys=keys, session=requests.Session(), timeout=timeout))


@pytest.fixture
def api():
    with responses.RequestsMock() as rsps:
        yield rsps


def test_request_is_a_get_with_the_key_header_and_the_timeout(api):
    api.add(responses.GET, BASE + "192.0.2.45", json=fixture("greynoise_malicious.json"),
            match=[matchers.header_matcher({"key": KEY, "Accept": "application/json"})])
    ask("192.0.2.45", timeout=2.5)
    (call,) = api.calls
    assert call.request.method == "GET"
    assert call.request.url == BASE + "192.0.2.45"
    assert urlsplit(call.request.url).query == ""      # the key is never in the URL
    assert call.request.headers["key"] == KEY
    assert call.request.req_kwargs["timeout"] == 2.5


@pytest.mark.parametrize("keys", [{}, {"GREYNOISE": ""}])
def test_without_a_key_no_key_header_is_sent(api, keys):
    api.add(responses.GET, BASE + "198.51.100.1", json=fixture("greynoise_benign_riot.json"))
    result = ask(" 198.51.100.1 ", keys=keys)
    (call,) = api.calls
    assert call.request.url == BASE + "198.51.100.1"
    assert "key" not in {name.lower() for name in call.request.headers}
    assert result.verdict == "safe"


def test_a_malicious_classification_is_malicious(api):
    api.add(responses.GET, BASE + "192.0.2.45", json=fixture("greynoise_malicious.json"))
    result = ask("192.0.2.45")
    assert result.verdict == "malicious"
    assert result.attributes == {      # name "unknown" carries nothing: no Name attribute
        "GreyNoise Classification": "malicious",
        "GreyNoise Noise": "Yes",
        "GreyNoise RIOT": "No",
    }
    assert result.data["link"] == "https://viz.greynoise.io/ip/192.0.2.45"
    json.dumps(result.data)


def test_a_riot_benign_service_is_safe_and_named(api):
    api.add(responses.GET, BASE + "198.51.100.1", json=fixture("greynoise_benign_riot.json"))
    result = ask("198.51.100.1")
    assert result.verdict == "safe"
    assert result.attributes == {
        "GreyNoise Classification": "benign",
        "GreyNoise Noise": "No",
        "GreyNoise RIOT": "Yes",
        "GreyNoise Name": "Example Public DNS",
    }


def test_a_benign_scanner_outside_riot_is_safe(api):
    answer = fixture("greynoise_noise_unknown.json")
    answer.update(classification="benign", name="Example Research Scanner")
    api.add(responses.GET, BASE + "203.0.113.77", json=answer)
    result = ask("203.0.113.77")
    assert result.verdict == "safe"
    assert result.attributes["GreyNoise RIOT"] == "No"
    assert result.attributes["GreyNoise Name"] == "Example Research Scanner"


def test_riot_alone_is_safe_even_without_a_classification(api):
    answer = fixture("greynoise_benign_riot.json")
    del answer["classification"]
    api.add(responses.GET, BASE + "198.51.100.1", json=answer)
    result = ask("198.51.100.1")
    assert result.verdict == "safe"
    assert result.attributes["GreyNoise Classification"] == "unknown"


def test_malicious_wins_over_riot(api):
    answer = fixture("greynoise_benign_riot.json")
    answer["classification"] = "malicious"
    api.add(responses.GET, BASE + "198.51.100.1", json=answer)
    assert ask("198.51.100.1").verdict == "malicious"


def test_unclassified_noise_is_info(api):
    api.add(responses.GET, BASE + "203.0.113.77", json=fixture("greynoise_noise_unknown.json"))
    result = ask("203.0.113.77")
    assert result.verdict == "info"
    assert result.attributes == {
        "GreyNoise Classification": "unknown",
        "GreyNoise Noise": "Yes",
        "GreyNoise RIOT": "No",
    }


def test_an_unobserved_ip_is_not_found(api):
    api.add(responses.GET, BASE + "203.0.113.200", status=404, json=fixture("greynoise_not_found.json"))
    with pytest.raises(NotFound):
        ask("203.0.113.200")


@pytest.mark.parametrize("body", ['{"message": "Invalid IP address"}', "Not Found", "[]"])
def test_another_404_is_a_plugin_error_not_a_negative_answer(api, body):
    api.add(responses.GET, BASE + "203.0.113.200", status=404, body=body, content_type="application/json")
    with pytest.raises(PluginError) as caught:
        ask("203.0.113.200")
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))


def test_http_429_is_quota_exceeded(api):
    api.add(responses.GET, BASE + "192.0.2.45", status=429, json={"message": "rate limit"})
    with pytest.raises(QuotaExceeded):
        ask("192.0.2.45")


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_a_plugin_error_that_never_shows_the_key(api, status):
    api.add(responses.GET, BASE + "192.0.2.45", status=status, json={"message": f"invalid key {KEY}"})
    with pytest.raises(PluginError) as caught:
        ask("192.0.2.45")
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert str(status) in str(caught.value)
    assert KEY not in full_text(caught.value)


def test_a_bad_request_is_a_plugin_error(api):
    api.add(responses.GET, BASE + "not-an-ip", status=400, json={"message": "Invalid IP"})
    with pytest.raises(PluginError, match="400") as caught:
        ask("not-an-ip")
    assert not isinstance(caught.value, NotFound)


@pytest.mark.parametrize("error", [
    requests.exceptions.ReadTimeout,
    requests.exceptions.ConnectTimeout,
    requests.exceptions.ConnectionError,
])
def test_timeouts_and_connection_errors_are_plugin_errors(api, error):
    api.add(responses.GET, BASE + "192.0.2.45", body=error("api.greynoise.io: boom"))
    with pytest.raises(PluginError) as caught:
        ask("192.0.2.45")
    assert not isinstance(caught.value, (NotFound, QuotaExceeded))
    assert error.__name__ in str(caught.value)
    assert KEY not in full_text(caught.value)


@pytest.mark.parametrize("body", [
    "<html>not json</html>",
    "null",
    "[]",
    "{}",
    '{"noise": true}',
    '{"noise": "true", "riot": false}',
    '{"noise": true, "riot": 0}',
    '{"noise": true, "riot": false, "classification": "evil"}',
    '{"noise": true, "riot": false, "classification": ["malicious"]}',
    '{"noise": true, "riot": false, "classification": "unknown", "name": 7}',
    '{"noise": true, "riot": false, "classification": "unknown", "link": {}}',
])
def test_malformed_bodies_are_plugin_errors(api, body):
    api.add(responses.GET, BASE + "192.0.2.45", body=body, content_type="application/json")
    with pytest.raises(PluginError):   # never KeyError, TypeError or AttributeError
        ask("192.0.2.45")


def test_another_data_type_is_refused_without_a_call(api):
    with pytest.raises(PluginError):
        ask("example.com", data_type="domain")
    assert len(api.calls) == 0


def test_declared_constants():
    assert greynoise.NAME == "greynoise" == greynoise.__name__.rsplit(".", 1)[-1]
    assert greynoise.TITLE == "GreyNoise"
    assert greynoise.DATA_TYPES == ("ip",)
    assert greynoise.EXTERNAL is True and greynoise.ACTIVE is False
    assert set(greynoise.API_KEYS) == {"GREYNOISE"}
    assert urlsplit(greynoise.API_KEYS["GREYNOISE"]).scheme == "https"
    assert isinstance(greynoise.VERSION, str) and greynoise.VERSION
    assert 0 < greynoise.NEGATIVE_CACHE_TTL <= greynoise.CACHE_TTL
