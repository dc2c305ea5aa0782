"""IP Scope: what kind of address an IP is (public, private, loopback, documentation...).

Data: a table written here from the IANA IPv4 and IPv6 Special-Purpose Address
Registries (RFC 6890 and its updates, checked 2025: 3fff::/20 from RFC 9637, 5f00::/16
from RFC 9602). No package data, no network, and deliberately not ``ipaddress``'s
``is_private``/``is_global``, whose answers changed between Python patch releases.
It ages only when IANA adds a range, which is rare.

``classify`` is pure and fast (one parse plus a walk over ~35 integer ranges); the
runner calls it to skip external lookups for every non-global address.
"""
from __future__ import annotations

import ipaddress
from typing import Tuple, Union

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

SCOPES = ("global", "private", "loopback", "link-local", "multicast", "reserved",
          "unspecified", "cgnat", "documentation")

# First match wins, so the most specific ranges come first. "global" rows are the
# registry's globally reachable exceptions inside larger non-global blocks.
_V4 = (
    ("0.0.0.0/32", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("192.0.2.0/24", "documentation"),       # TEST-NET-1
    ("198.51.100.0/24", "documentation"),    # TEST-NET-2
    ("203.0.113.0/24", "documentation"),     # TEST-NET-3
    ("100.64.0.0/10", "cgnat"),              # RFC 6598 shared address space
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("192.0.0.9/32", "global"),              # Port Control Protocol anycast
    ("192.0.0.10/32", "global"),             # TURN anycast
    ("0.0.0.0/8", "reserved"),               # "this network"
    ("192.0.0.0/24", "reserved"),            # IETF protocol assignments
    ("192.88.99.0/24", "reserved"),          # deprecated 6to4 relay anycast
    ("198.18.0.0/15", "reserved"),           # benchmarking
    ("240.0.0.0/4", "reserved"),             # future use, includes 255.255.255.255
)
_V6 = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("fc00::/7", "private"),                 # unique local addresses
    ("2001:1::1/128", "global"),             # PCP anycast
    ("2001:1::2/128", "global"),             # TURN anycast
    ("2001:1::3/128", "global"),             # DNS-SD SRP anycast
    ("2001:3::/32", "global"),               # AMT
    ("2001:4:112::/48", "global"),           # AS112-v6
    ("2001:20::/28", "global"),              # ORCHIDv2
    ("2001:30::/28", "global"),              # DRIP DETs
    ("2001::/23", "reserved"),               # IETF protocol assignments (Teredo, benchmarking...)
    ("64:ff9b::/96", "global"),              # well-known NAT64 prefix (outside 2000::/3)
    ("64:ff9b:1::/48", "reserved"),          # local-use IPv4/IPv6 translation
    ("100::/64", "reserved"),                # discard-only
    ("100:0:0:1::/64", "reserved"),          # dummy prefix
    ("5f00::/16", "reserved"),               # SRv6 SIDs
    ("fec0::/10", "reserved"),               # deprecated site-local
)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")   # outside it, IPv6 is still unassigned


def _ranges(table: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[int, int, str], ...]:
    nets = ((ipaddress.ip_network(cidr), scope) for cidr, scope in table)
    return tuple((int(n.network_address), int(n.broadcast_address), scope) for n, scope in nets)


_V4_RANGES = _ranges(_V4)
_V6_RANGES = _ranges(_V6)
_V6_UNICAST = (int(_GLOBAL_UNICAST_V6.network_address), int(_GLOBAL_UNICAST_V6.broadcast_address))


def parse(value: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The address in ``value``; an IPv4-mapped IPv6 address comes back as its IPv4. PluginError if not an IP."""
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise PluginError(f"not an IP address: {value!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def classify(value: str) -> str:
    """One of SCOPES for an IP address given as text; PluginError if it is not one."""
    address = parse(value)
    number = int(address)
    for low, high, scope in (_V4_RANGES if address.version == 4 else _V6_RANGES):
        if low <= number <= high:
            return scope
    if address.version == 6 and not _V6_UNICAST[0] <= number <= _V6_UNICAST[1]:
        return "reserved"
    return "global"


def lookup(request: Lookup) -> Result:
    scope = classify(request.value)
    return Result(verdict="info", data={"scope": scope}, attributes={TITLE: scope})
