"""Shodan: open ports, owner and known CVEs of an IP address.

Request: ``GET https://api.shodan.io/shodan/host/{ip}?key=<key>`` ("Host Information",
https://developer.shodan.io/api and its OpenAPI definition
https://developer.shodan.io/api/openapi.json). The answer is a host record whose
fields used here are ``ip_str``, ``ports`` (list of integers), ``org``, ``isp``,
``asn``, ``hostnames``, ``country_code``, ``last_update`` and ``vulns`` (CVE
identifiers; present only when Shodan saw vulnerable software). An IP Shodan has
never seen answers 404 ``{"error": "No information available for that IP."}``.

The key travels in the query string, so no message built here ever contains the
request URL or the text of a ``requests`` exception (which quotes the URL): errors
carry the HTTP status or the exception's type name only, and are raised
``from None`` so that a logged traceback cannot show the original either.
"""
from __future__ import annotations

from typing import Any, Dict, List

import requests

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, QuotaExceeded, Result, retry_after

NAME = "shodan"
TITLE = "Shodan"
DESCRIPTION = "Open ports, organisation and known vulnerabilities of an IP address, from Shodan"
VERSION = "1.0"
DATA_TYPES = ("ip",)
EXTERNAL = True
ACTIVE = False
KEY_NAME = "SHODAN"
API_KEYS = {KEY_NAME: "https://account.shodan.io/register"}
CACHE_TTL = 24 * 3600
NEGATIVE_CACHE_TTL = 3600
RATE_LIMIT_PER_MIN = 60          # Shodan allows about one request a second

URL = "https://api.shodan.io/shodan/host/{ip}"


def lookup(request: Lookup) -> Result:
    if request.data_type not in DATA_TYPES:
        raise PluginError(f"Shodan looks up IP addresses, not {request.data_type!r}")
    key = request.keys.get(KEY_NAME) or ""
    if not key:
        raise PluginError(f"no {KEY_NAME} API key configured")
    ip = request.value.strip()
    try:
        response = request.http().get(
            URL.format(ip=ip), params={"key": key}, timeout=request.timeout,
        )
    except requests.RequestException as exc:
        # The exception's text quotes the URL, key included: keep only its type.
        raise PluginError(f"Shodan request failed: {type(exc).__name__}") from None

    status = response.status_code
    if status == 404:
        raise NotFound(f"Shodan has no information on {ip}")
    if status == 429:
        raise QuotaExceeded("Shodan rate limit or query credits exhausted (HTTP 429)", retry_after_s=retry_after(response))
    if status in (401, 403):
        raise PluginError(f"Shodan refused the API key (HTTP {status})")
    if status != 200:
        raise PluginError(f"Shodan answered HTTP {status}")
    try:
        host = response.json()
    except ValueError:
        raise PluginError("Shodan answered with a body that is not JSON") from None
    if not isinstance(host, dict):
        raise PluginError("Shodan answered with JSON that is not a host record")
    return _result(host, ip)


def _result(host: Dict[str, Any], ip: str) -> Result:
    ports = host.get("ports") or []
    if not isinstance(ports, list) or not all(_is_int(p) for p in ports):
        raise PluginError("Shodan host record has a malformed 'ports' field")
    ports = sorted(set(ports))
    vulns = _vulns(host.get("vulns"))
    org = _optional_str(host, "org")

    attributes: Dict[str, str] = {}
    if ports:
        attributes["Shodan Ports"] = ", ".join(str(p) for p in ports)
    if org:
        attributes["Shodan Org"] = org
    if vulns:
        attributes["Shodan Vulns"] = str(len(vulns))

    data = {
        "ip": _optional_str(host, "ip_str") or ip,
        "ports": ports,
        "org": org,
        "isp": _optional_str(host, "isp"),
        "asn": _optional_str(host, "asn"),
        "country_code": _optional_str(host, "country_code"),
        "hostnames": _str_list(host.get("hostnames"), "hostnames"),
        "last_update": _optional_str(host, "last_update"),
        "vulns": vulns,
    }
    return Result(verdict="suspicious" if vulns else "info", data=data, attributes=attributes)


def _vulns(raw: Any) -> List[str]:
    """The host's CVE identifiers: a list at host level (a dict keyed by CVE inside banners)."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = list(raw)
    return sorted(set(_str_list(raw, "vulns")))


def _str_list(raw: Any, field: str) -> List[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise PluginError(f"Shodan host record has a malformed {field!r} field")
    return list(raw)


def _optional_str(host: Dict[str, Any], field: str) -> str:
    value = host.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PluginError(f"Shodan host record has a malformed {field!r} field")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
