"""IP Scope: what kind of address an IP is (public, private, loopback, documentation...).

Data: the enrichment gate's own table (``enrichment/gate.py``, from the IANA IPv4 and IPv6
Special-Purpose Address Registries), the one that keeps every non-global address away from
external plugins; no package data, no network. An analyst sees in ThreatQ exactly what the
gate decided.
"""
from __future__ import annotations

import ipaddress
from typing import Union

from tq_mw_thehive.enrichment import gate
from tq_mw_thehive.enrichment.plugin import Lookup, PluginError, Result

NAME = "ip_scope"
TITLE = "IP Scope"
DESCRIPTION = "Scope of an IP address (global, private, loopback, documentation, CGNAT...), offline"
VERSION = "1.0"
DATA_TYPES = ("ip",)
EXTERNAL = False
ACTIVE = False
API_KEYS: dict = {}
CACHE_TTL = 30 * 24 * 3600          # the answer never changes for a given table
NEGATIVE_CACHE_TTL = 3600           # never raised: every IP has a scope
RATE_LIMIT_PER_MIN = None

SCOPES = gate.SCOPES


def parse(value: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The address in ``value``; an IPv4-mapped IPv6 address comes back as its IPv4. PluginError if not an IP."""
    try:
        return gate.parse_address(value)
    except ValueError:
        raise PluginError(f"not an IP address: {value!r}") from None


def classify(value: str) -> str:
    """One of SCOPES for an IP address given as text; PluginError if it is not one."""
    return gate.classify(parse(value))


def lookup(request: Lookup) -> Result:
    scope = classify(request.value)
    return Result(verdict="info", data={"scope": scope}, attributes={TITLE: scope})
