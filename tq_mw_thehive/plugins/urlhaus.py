"""URLhaus (abuse.ch): is a URL, host or file hash known to distribute malware?

API documentation: https://urlhaus-api.abuse.ch/ — sections "Query URL information"
(``POST /v1/url/``, form ``url``), "Query host information" (``POST /v1/host/``, form
``host``: an IPv4 address, hostname or domain) and "Query payload information"
(``POST /v1/payload/``, form ``md5_hash`` or ``sha256_hash``). Every request carries
the abuse.ch ``Auth-Key`` header, required since 2024 (free key: https://auth.abuse.ch/).

The outcome is in the body's ``query_status``, not the HTTP status: ``ok`` (then the
record), ``no_results`` (unknown: ``NotFound``), or an error word such as
``invalid_url``, ``invalid_host``, ``invalid_md5``, ``invalid_sha256`` or
``unknown_auth_key`` (``PluginError``). Fields read: for a URL ``url_status``
(online/offline/unknown), ``threat``, ``host``, ``date_added``, ``tags`` and
``urlhaus_reference``; for a host ``url_count``, ``firstseen``, ``urlhaus_reference``
and ``urls`` (each with ``url_status`` and ``threat``); for a payload ``md5_hash``,
``sha256_hash``, ``file_type``, ``signature``, ``firstseen``, ``lastseen`` and
``url_count``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, Result, retry_after

NAME = "urlhaus"
TITLE = "URLhaus"
DESCRIPTION = "Malware-distribution URLs, hosts and payloads known to abuse.ch URLhaus"
VERSION = "1.0"
DATA_TYPES = ("url", "domain", "fqdn", "hostname", "ip", "hash")
EXTERNAL = True
ACTIVE = False
KEY_NAME = "URLHAUS"
API_KEYS = {KEY_NAME: "https://auth.abuse.ch/"}
CACHE_TTL = 6 * 3600             # a URL goes offline within hours: keep its status fresh
NEGATIVE_CACHE_TTL = 3600
RATE_LIMIT_PER_MIN = None        # no documented limit

BASE_URL = "https://urlhaus-api.abuse.ch/v1/"
HOST_TYPES = ("domain", "fqdn", "hostname", "ip")
_HEX = re.compile(r"[0-9a-f]+")
_HASH_FIELDS = {32: "md5_hash", 64: "sha256_hash"}


def lookup(request: Lookup) -> Result:
    key = request.keys.get(KEY_NAME) or ""
    if not key:
        raise PluginError(f"no {KEY_NAME} Auth-Key configured")
    kind, endpoint, form = _query(request.data_type, request.value.strip())
    answer = _post(request, endpoint, form, key)
    if kind == "url":
        return _url_result(answer)
    if kind == "host":
        return _host_result(answer)
    return _payload_result(answer)


def _query(data_type: str, value: str) -> Tuple[str, str, Dict[str, str]]:
    """(kind, endpoint, form) for one observable."""
    if data_type == "url":
        return "url", "url/", {"url": value}
    if data_type in HOST_TYPES:
        return "host", "host/", {"host": value}
    if data_type == "hash":
        digest = value.lower()
        field = _HASH_FIELDS.get(len(digest))
        if field is None or not _HEX.fullmatch(digest):
            raise NotFound("URLhaus indexes payloads by MD5 or SHA-256 only")
        return "payload", "payload/", {field: digest}
    raise PluginError(f"URLhaus does not look up {data_type!r}")


def _post(request: Lookup, endpoint: str, form: Dict[str, str], key: str) -> Dict[str, Any]:
    try:
        response = request.http().post(
            BASE_URL + endpoint, data=form, headers={"Auth-Key": key}, timeout=request.timeout,
        )
    except requests.RequestException as exc:
        raise PluginError(f"URLhaus request failed: {type(exc).__name__}") from None

    status = response.status_code
    if status == 429:
        raise QuotaExceeded("URLhaus rate limit (HTTP 429)", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"URLhaus refused the Auth-Key (HTTP {status})")
    if status != 200:
        raise PluginError(f"URLhaus answered HTTP {status}")
    try:
        answer = response.json()
    except ValueError:
        raise PluginError("URLhaus answered with a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise PluginError("URLhaus answered with JSON that is not an object")

    query_status = answer.get("query_status")
    if query_status == "ok":
        return answer
    if query_status == "no_results":
        raise NotFound("unknown to URLhaus")
    if isinstance(query_status, str) and query_status:
        raise PluginError(f"URLhaus answered query_status {query_status[:60]!r}")
    raise PluginError("URLhaus answer has no query_status")


def _url_result(answer: Dict[str, Any]) -> Result:
    url_status = _str(answer, "url_status", required=True)
    threat = _str(answer, "threat")
    attributes = {"URLhaus Status": url_status}
    if threat:
        attributes["URLhaus Threat"] = threat
    verdict = {"online": "malicious", "offline": "suspicious"}.get(url_status, "info")
    data = {
        "kind": "url",
        "url_status": url_status,
        "threat": threat,
        "host": _str(answer, "host"),
        "date_added": _str(answer, "date_added"),
        "tags": _str_list(answer.get("tags"), "tags"),
        "reference": _str(answer, "urlhaus_reference"),
    }
    return Result(verdict=verdict, data=data, attributes=attributes)


def _host_result(answer: Dict[str, Any]) -> Result:
    urls = answer.get("urls")
    if urls is None:
        urls = []
    if not isinstance(urls, list) or not all(isinstance(u, dict) for u in urls):
        raise PluginError("URLhaus host record has a malformed 'urls' field")
    statuses = [_str(u, "url_status") for u in urls]
    online = statuses.count("online")
    total = _count(answer.get("url_count"), default=len(urls))
    threats = sorted({_str(u, "threat") for u in urls} - {""})

    attributes = {"URLhaus Status": f"{online}/{total} URLs online"}
    if threats:
        attributes["URLhaus Threat"] = ", ".join(threats)
    if online:
        verdict = "malicious"
    elif total:
        verdict = "suspicious"
    else:
        verdict = "info"
    data = {
        "kind": "host",
        "url_count": total,
        "urls_online": online,
        "threats": threats,
        "firstseen": _str(answer, "firstseen"),
        "reference": _str(answer, "urlhaus_reference"),
    }
    return Result(verdict=verdict, data=data, attributes=attributes)


def _payload_result(answer: Dict[str, Any]) -> Result:
    signature = _str(answer, "signature")
    attributes = {"URLhaus Status": "known payload"}
    if signature:
        attributes["URLhaus Threat"] = signature
    data = {
        "kind": "payload",
        "md5": _str(answer, "md5_hash"),
        "sha256": _str(answer, "sha256_hash"),
        "file_type": _str(answer, "file_type"),
        "signature": signature,
        "firstseen": _str(answer, "firstseen"),
        "lastseen": _str(answer, "lastseen"),
        "url_count": _count(answer.get("url_count"), default=0),
    }
    return Result(verdict="malicious", data=data, attributes=attributes)


def _str(record: Dict[str, Any], field: str, required: bool = False) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise PluginError(f"URLhaus record has a malformed {field!r} field")
    return value


def _str_list(raw: Any, field: str) -> List[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise PluginError(f"URLhaus record has a malformed {field!r} field")
    return list(raw)


def _count(raw: Any, default: int) -> int:
    """URLhaus sends counts as strings ("110"); accept an integer too."""
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise PluginError("URLhaus record has a malformed 'url_count' field")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise PluginError("URLhaus record has a malformed 'url_count' field") from None
