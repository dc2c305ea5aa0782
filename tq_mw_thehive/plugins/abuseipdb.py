"""AbuseIPDB: how confident the community is that an IP address is abusive, and how often it was reported.

AbuseIPDB API v2, ``GET https://api.abuseipdb.com/api/v2/check?ipAddress=<ip>&maxAgeInDays=90``
with the key in the ``Key`` header and ``Accept: application/json``. Documentation used:

- CHECK endpoint, request and answer (``data.abuseConfidenceScore``, ``totalReports``,
  ``isWhitelisted``, ``usageType``, ...): https://docs.abuseipdb.com/ ("CHECK Endpoint")
- Errors: ``{"errors": [{"detail": ..., "status": ...}]}`` with 401 for a bad key and 422
  for an invalid address, 429 for the rate limit. The shape and the 401/422 texts were
  confirmed only from third-party copies of AbuseIPDB's answers (e.g.
  https://evidencehub.app/docs/Knowledge%20base/Error%20codes/AbuseIPDB), not from the
  official page; the plugin reads nothing but the HTTP status and, when present, the
  first ``detail``.

AbuseIPDB answers for every valid address, so there is no "not found": an address nobody
reported comes back with a score and a report count of 0 (verdict "info").
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, PluginError, QuotaExceeded, Result, answer_json, retry_after

NAME = "abuseipdb"
TITLE = "AbuseIPDB"
DESCRIPTION = "Abuse confidence score and report count of an IP address"
VERSION = "1.0"
DATA_TYPES = ("ip",)
EXTERNAL = True
ACTIVE = False
KEY_NAME = "ABUSEIPDB"
API_KEYS = {KEY_NAME: "https://www.abuseipdb.com/register"}
CACHE_TTL = 24 * 3600
NEGATIVE_CACHE_TTL = 3600
RATE_LIMIT_PER_MIN = None
RATE_LIMIT_PER_DAY = 1000       # the free plan's CHECK endpoint (docs.abuseipdb.com/#rate-limiting)

CHECK_URL = "https://api.abuseipdb.com/api/v2/check"
MAX_AGE_DAYS = 90
MALICIOUS_MIN = 75              # abuseConfidenceScore for a malicious verdict
SUSPICIOUS_MIN = 25

_KEPT = ("ipAddress", "isPublic", "ipVersion", "isWhitelisted", "abuseConfidenceScore",
         "countryCode", "usageType", "isp", "domain", "isTor", "totalReports",
         "numDistinctUsers", "lastReportedAt")


def lookup(request: Lookup) -> Result:
    if request.data_type not in DATA_TYPES:
        raise PluginError(f"{TITLE} does not take data type {request.data_type!r}")
    ip = request.value.strip()
    if not ip:
        raise PluginError(f"{TITLE}: empty ip value")
    key = request.keys.get(KEY_NAME)
    if not key:
        raise PluginError(f"{TITLE}: no API key configured ({KEY_NAME})")
    response = request.get(TITLE, CHECK_URL, params={"ipAddress": ip, "maxAgeInDays": str(MAX_AGE_DAYS)}, headers={"Key": key, "Accept": "application/json"})
    if response.status_code != 200:
        _raise_for_status(response, key)
    return _parse(answer_json(TITLE, response))




def _error_detail(response: requests.Response) -> Optional[str]:
    """The first documented ``errors[].detail`` of an error answer, if the body has one."""
    try:
        detail = response.json()["errors"][0]["detail"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return detail if isinstance(detail, str) else None


def _raise_for_status(response: requests.Response, key: str) -> None:
    status = response.status_code
    detail = _error_detail(response)
    text = f"HTTP {status}" + (f": {detail}" if detail else "")
    text = text.replace(key, "***")         # service text: never echo the key
    if status == 429:
        raise QuotaExceeded(f"{TITLE} rate limit reached ({text})", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"{TITLE} refused the API key ({text})")
    raise PluginError(f"{TITLE} lookup failed ({text})")


def _parse(body: Any) -> Result:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise PluginError(f"{TITLE}: the answer has no data object")
    score = _count(data, "abuseConfidenceScore")
    reports = _count(data, "totalReports")
    if score > 100:
        raise PluginError(f"{TITLE}: abuseConfidenceScore {score} is not 0-100")
    whitelisted = data.get("isWhitelisted") is True

    attributes: Dict[str, str] = {f"{TITLE} Confidence": str(score), f"{TITLE} Reports": str(reports)}
    usage = data.get("usageType")
    if isinstance(usage, str) and usage:
        attributes[f"{TITLE} Usage Type"] = usage
    kept = {name: data[name] for name in _KEPT if name in data}
    return Result(verdict=verdict(score, whitelisted), data=kept, attributes=attributes)


def _count(data: Dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PluginError(f"{TITLE}: data.{name} is missing or not a count")
    return value


def verdict(score: int, whitelisted: bool) -> str:
    if score >= MALICIOUS_MIN:
        return "malicious"
    if score >= SUSPICIOUS_MIN:
        return "suspicious"
    if whitelisted:
        return "safe"
    return "info"
