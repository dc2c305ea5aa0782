"""GreyNoise Community: is an IP internet background noise, a known benign service, or malicious?

Request: ``GET https://api.greynoise.io/v3/community/{ip}`` with the API key, if any,
in the ``key`` header (https://docs.greynoise.io/reference/getcommunityip). The
answer carries ``ip``, ``noise`` (seen scanning the internet), ``riot`` (a common
business service, "Rule It Out"), ``classification`` (benign, malicious or unknown),
``name``, ``link``, ``last_seen`` and ``message``. An IP GreyNoise has not seen
answers 404 with ``noise`` and ``riot`` false and the message "IP not observed
scanning the internet or contained in RIOT data set."; the community quota, once
used, answers 429.

The Community API also answers without a key (a smaller quota), so an empty or
absent GREYNOISE key sends no ``key`` header. API_KEYS still declares the key with
its sign-up URL, and the plugin registry treats every declared key as required
(the plugin shows "missing key: GREYNOISE" until one is set): through the daemon
the plugin therefore runs with a key; the keyless path serves direct calls.
"""
from __future__ import annotations

from typing import Any, Dict

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, Result, retry_after

NAME = "greynoise"
TITLE = "GreyNoise"
DESCRIPTION = "Internet-scanner noise, benign-service (RIOT) and classification of an IP, from GreyNoise Community"
VERSION = "1.0"
DATA_TYPES = ("ip",)
EXTERNAL = True
ACTIVE = False
KEY_NAME = "GREYNOISE"
API_KEYS = {KEY_NAME: "https://viz.greynoise.io/signup"}
CACHE_TTL = 24 * 3600
NEGATIVE_CACHE_TTL = 6 * 3600    # the community quota is small: ask again rarely
RATE_LIMIT_PER_MIN = None        # the community quota is daily; a 429 tells when it is spent

URL = "https://api.greynoise.io/v3/community/{ip}"
NOT_OBSERVED = "IP not observed"
CLASSIFICATIONS = ("benign", "malicious", "unknown")


def lookup(request: Lookup) -> Result:
    if request.data_type not in DATA_TYPES:
        raise PluginError(f"GreyNoise looks up IP addresses, not {request.data_type!r}")
    ip = request.value.strip()
    key = request.keys.get(KEY_NAME) or ""
    headers = {"Accept": "application/json"}
    if key:
        headers["key"] = key
    try:
        response = request.http().get(URL.format(ip=ip), headers=headers, timeout=request.timeout)
    except requests.RequestException as exc:
        raise PluginError(f"GreyNoise request failed: {type(exc).__name__}") from None

    status = response.status_code
    if status == 429:
        raise QuotaExceeded("GreyNoise community quota exhausted (HTTP 429)", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"GreyNoise refused the API key (HTTP {status})")
    if status == 404:
        if _message(response).startswith(NOT_OBSERVED):
            raise NotFound(f"GreyNoise has not observed {ip}")
        raise PluginError("GreyNoise answered HTTP 404")
    if status != 200:
        raise PluginError(f"GreyNoise answered HTTP {status}")
    try:
        answer = response.json()
    except ValueError:
        raise PluginError("GreyNoise answered with a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise PluginError("GreyNoise answered with JSON that is not an object")
    return _result(answer, ip)


def _result(answer: Dict[str, Any], ip: str) -> Result:
    noise, riot = answer.get("noise"), answer.get("riot")
    if not isinstance(noise, bool) or not isinstance(riot, bool):
        raise PluginError("GreyNoise answer lacks boolean 'noise' and 'riot' fields")
    classification = answer.get("classification") or "unknown"
    if classification not in CLASSIFICATIONS:
        raise PluginError("GreyNoise answer has a malformed 'classification' field")
    name = _optional_str(answer, "name")

    attributes = {
        "GreyNoise Classification": classification,
        "GreyNoise Noise": "Yes" if noise else "No",
        "GreyNoise RIOT": "Yes" if riot else "No",
    }
    if name and name != "unknown":     # GreyNoise names an unattributed actor "unknown"
        attributes["GreyNoise Name"] = name
    if classification == "malicious":
        verdict = "malicious"
    elif riot or classification == "benign":
        verdict = "safe"
    else:
        verdict = "info"
    data = {
        "ip": _optional_str(answer, "ip") or ip,
        "noise": noise,
        "riot": riot,
        "classification": classification,
        "name": name,
        "link": _optional_str(answer, "link"),
        "last_seen": _optional_str(answer, "last_seen"),
    }
    return Result(verdict=verdict, data=data, attributes=attributes)


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else ""


def _optional_str(answer: Dict[str, Any], field: str) -> str:
    value = answer.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PluginError(f"GreyNoise answer has a malformed {field!r} field")
    return value
