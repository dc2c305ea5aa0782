"""VirusTotal: how many antivirus engines and URL scanners flag an IP, domain, URL or file hash.

VirusTotal API v3, ``GET https://www.virustotal.com/api/v3/<collection>/<id>`` with the key
in the ``x-apikey`` header. Documentation used:

- API overview: https://docs.virustotal.com/reference/overview
- IP address object (``data.attributes.last_analysis_stats``, ``reputation``):
  https://docs.virustotal.com/reference/ip-object; the plugin reads the same two
  attributes from domain, URL and file objects (their pages were not re-checked)
- URL identifiers (unpadded URL-safe base64 of the URL, RFC 4648 section 3.2):
  https://docs.virustotal.com/reference/url-info and
  https://docs.virustotal.com/reference/private-urls-api
- Errors (``{"error": {"code": ..., "message": ...}}``; 401 WrongCredentialsError,
  404 NotFoundError, 429 QuotaExceededError): https://docs.virustotal.com/reference/errors

The total in "VirusTotal Detections" is the sum of every counter in
``last_analysis_stats`` (for files this includes ``type-unsupported``, ``failure`` and
``confirmed-timeout``); the VirusTotal web page may leave some of those out.
"""
from __future__ import annotations

import base64
from typing import Any, Dict, Mapping, Optional
from urllib.parse import quote

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, Result, answer_json, retry_after

NAME = "virustotal"
TITLE = "VirusTotal"
DESCRIPTION = "Antivirus and URL-scanner detections for IPs, domains, URLs and file hashes"
VERSION = "1.0"
DATA_TYPES = ("ip", "domain", "fqdn", "hostname", "url", "hash")
EXTERNAL = True
ACTIVE = False
KEY_NAME = "VIRUSTOTAL"
API_KEYS = {KEY_NAME: "https://www.virustotal.com/gui/join-us"}
CACHE_TTL = 24 * 3600
NEGATIVE_CACHE_TTL = 3600
RATE_LIMIT_PER_MIN = 4          # the public API: 4 a minute and 500 a day, per key
RATE_LIMIT_PER_DAY = 500        # (docs.virustotal.com/reference/public-vs-premium-api)

BASE_URL = "https://www.virustotal.com/api/v3"
MALICIOUS_MIN = 3               # engines saying "malicious" for a malicious verdict

_COLLECTIONS = {"ip": "ip_addresses", "domain": "domains", "fqdn": "domains",
                "hostname": "domains", "url": "urls", "hash": "files"}


def url_identifier(url: str) -> str:
    """VirusTotal's identifier for a URL: URL-safe base64 without the "=" padding."""
    return base64.urlsafe_b64encode(url.encode("utf-8")).decode("ascii").rstrip("=")


def endpoint(data_type: str, value: str) -> str:
    """The v3 object URL for one observable."""
    collection = _COLLECTIONS.get(data_type)
    if collection is None:
        raise PluginError(f"{TITLE} does not take data type {data_type!r}")
    value = value.strip()
    if not value:
        raise PluginError(f"{TITLE}: empty {data_type} value")
    ident = url_identifier(value) if data_type == "url" else quote(value, safe=":")
    return f"{BASE_URL}/{collection}/{ident}"


def lookup(request: Lookup) -> Result:
    url = endpoint(request.data_type, request.value)
    key = request.keys.get(KEY_NAME)
    if not key:
        raise PluginError(f"{TITLE}: no API key configured ({KEY_NAME})")
    response = request.get(TITLE, url, headers={"x-apikey": key, "Accept": "application/json"})
    if response.status_code != 200:
        _raise_for_status(response, key)
    return _parse(answer_json(TITLE, response))




def _error_code(response: requests.Response) -> Optional[str]:
    """The documented ``error.code`` of an error answer, if the body has one."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _raise_for_status(response: requests.Response, key: str) -> None:
    status = response.status_code
    code = _error_code(response)
    detail = f"HTTP {status}" + (f" {code}" if code else "")
    detail = detail.replace(key, "***")     # the code is service text: never echo the key
    if status == 404:
        raise NotFound(f"{TITLE} has no report ({detail})")
    if status == 429 or code == "QuotaExceededError":
        raise QuotaExceeded(f"{TITLE} quota exceeded ({detail})", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"{TITLE} refused the API key ({detail})")
    raise PluginError(f"{TITLE} lookup failed ({detail})")


def _parse(body: Any) -> Result:
    data = body.get("data") if isinstance(body, dict) else None
    attributes = data.get("attributes") if isinstance(data, dict) else None
    stats = attributes.get("last_analysis_stats") if isinstance(attributes, dict) else None
    if not isinstance(stats, dict):
        raise PluginError(f"{TITLE}: the answer has no data.attributes.last_analysis_stats")
    counts = _counts(stats)
    total = sum(counts.values())
    malicious, suspicious, harmless = (counts.get(k, 0) for k in ("malicious", "suspicious", "harmless"))

    out: Dict[str, str] = {f"{TITLE} Detections": f"{malicious}/{total}"}
    result: Dict[str, Any] = {"type": data.get("type"), "id": data.get("id"),
                              "last_analysis_stats": counts, "detections": malicious,
                              "engines": total}
    reputation = attributes.get("reputation")
    if isinstance(reputation, int) and not isinstance(reputation, bool):
        out[f"{TITLE} Reputation"] = str(reputation)
        result["reputation"] = reputation
    if isinstance(attributes.get("last_analysis_date"), int):
        result["last_analysis_date"] = attributes["last_analysis_date"]
    return Result(verdict=verdict(malicious, suspicious, harmless), data=result, attributes=out)


def _counts(stats: Mapping[str, Any]) -> Dict[str, int]:
    counts = {}
    for name, count in stats.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise PluginError(f"{TITLE}: last_analysis_stats.{name} is not a count")
        counts[str(name)] = count
    return counts


def verdict(malicious: int, suspicious: int, harmless: int) -> str:
    if malicious >= MALICIOUS_MIN:
        return "malicious"
    if malicious >= 1 or suspicious >= 1:
        return "suspicious"
    if harmless > 0:
        return "safe"
    return "info"
