"""OTX (AlienVault / LevelBlue Open Threat Exchange): how many community pulses mention an observable.

``GET https://otx.alienvault.com/api/v1/indicators/<section>/<value>/general`` with the key
in the ``X-OTX-API-KEY`` header; the answer's ``pulse_info.count`` is the number of pulses and
``pulse_info.pulses`` lists them (each with a ``name``). Documentation used:

- the API reference lives at https://otx.alienvault.com/api (a JavaScript page the
  documentation search could not read); the request and answer shape were confirmed from
  AlienVault's own SDK, https://github.com/AlienVault-OTX/OTX-Python-SDK (``OTXv2.py``: the
  ``X-OTX-API-KEY`` header, ``/api/v1/indicators/{type}/{indicator}/{section}``, 403 for a bad
  key, 404 not found; ``IndicatorTypes.py``: the type slugs IPv4, IPv6, domain, hostname,
  url, file), and from
  https://docs.swimlane.com/connectors/alienvault-open-threat-exchange (``pulse_info.count``,
  ``pulse_info.pulses``).

A URL observable goes into the path as the SDK sends it, except that characters which would
end the path (``?``, ``#``) or are not allowed in it are percent-encoded; how OTX treats a
URL with a query string was not confirmed.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Dict, List
from urllib.parse import quote

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, Result, answer_json, retry_after

NAME = "otx"
TITLE = "OTX"
DESCRIPTION = "AlienVault OTX community pulses that mention an IP, domain, URL or file hash"
VERSION = "1.0"
DATA_TYPES = ("ip", "domain", "fqdn", "hostname", "url", "hash")
EXTERNAL = True
ACTIVE = False
KEY_NAME = "OTX"
API_KEYS = {KEY_NAME: "https://otx.alienvault.com/api"}
CACHE_TTL = 24 * 3600
NEGATIVE_CACHE_TTL = 3600
RATE_LIMIT_PER_MIN = None       # no per-minute limit documented

BASE_URL = "https://otx.alienvault.com/api/v1/indicators"
MALICIOUS_MIN = 5               # pulses for a malicious verdict
SUSPICIOUS_MIN = 1
MAX_PULSE_NAMES = 10

_SECTIONS = {"domain": "domain", "fqdn": "hostname", "hostname": "hostname", "url": "url", "hash": "file"}


def section(data_type: str, value: str) -> str:
    """OTX's indicator type for one observable (IPv4 or IPv6 decided by the value)."""
    if data_type == "ip":
        try:
            return "IPv6" if ipaddress.ip_address(value).version == 6 else "IPv4"
        except ValueError:
            raise PluginError(f"{TITLE}: {value!r} is not an IP address") from None
    if data_type not in _SECTIONS:
        raise PluginError(f"{TITLE} does not take data type {data_type!r}")
    return _SECTIONS[data_type]


def endpoint(data_type: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise PluginError(f"{TITLE}: empty {data_type} value")
    kind = section(data_type, value)
    return f"{BASE_URL}/{kind}/{quote(value, safe=':/')}/general"


def lookup(request: Lookup) -> Result:
    url = endpoint(request.data_type, request.value)
    key = request.keys.get(KEY_NAME)
    if not key:
        raise PluginError(f"{TITLE}: no API key configured ({KEY_NAME})")
    response = request.get(TITLE, url, headers={"X-OTX-API-KEY": key, "Accept": "application/json"})
    if response.status_code != 200:
        _raise_for_status(response)
    return _parse(answer_json(TITLE, response))




def _raise_for_status(response: requests.Response) -> None:
    status = response.status_code
    # The error bodies are not documented: only the status is used, so no service text
    # (which could echo the key) reaches the message.
    if status == 404:
        raise NotFound(f"{TITLE} does not know this indicator (HTTP 404)")
    if status == 429:
        raise QuotaExceeded(f"{TITLE} rate limit reached (HTTP 429)", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"{TITLE} refused the API key (HTTP {status})")
    raise PluginError(f"{TITLE} lookup failed (HTTP {status})")


def _parse(body: Any) -> Result:
    pulse_info = body.get("pulse_info") if isinstance(body, dict) else None
    if not isinstance(pulse_info, dict):
        raise PluginError(f"{TITLE}: the answer has no pulse_info object")
    count = pulse_info.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise PluginError(f"{TITLE}: pulse_info.count is missing or not a count")
    pulses = pulse_info.get("pulses", [])
    if not isinstance(pulses, list):
        raise PluginError(f"{TITLE}: pulse_info.pulses is not a list")
    names: List[str] = [p["name"] for p in pulses
                        if isinstance(p, dict) and isinstance(p.get("name"), str)][:MAX_PULSE_NAMES]
    data: Dict[str, Any] = {"pulse_count": count, "pulses": names}
    return Result(verdict=verdict(count), data=data, attributes={f"{TITLE} Pulses": str(count)})


def verdict(pulses: int) -> str:
    if pulses >= MALICIOUS_MIN:
        return "malicious"
    if pulses >= SUSPICIOUS_MIN:
        return "suspicious"
    return "info"
