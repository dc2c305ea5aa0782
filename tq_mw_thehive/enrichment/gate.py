"""The gate: what a plugin may see (Cortex's max TLP/PAP, stricter by default).

An external plugin sends the value to a third party: it only sees observables whose
TLP is at or below ``enrichment.max_tlp_external``. An active plugin touches the
target: it only sees observables whose PAP is at or below ``enrichment.max_pap_active``.
An unknown or missing level counts as RED: when in doubt, nothing leaves.

An external plugin never sees a non-global address either (private, loopback, link-local,
CGNAT, documentation, reserved...): an ``ip`` value, or the host of a URL, mail address or
host name when that host is an IP literal. A value of type ``ip`` that does not parse, or a
host that looks like an address but does not parse, counts as non-global: when in doubt,
nothing leaves. The address table is here, not in a plugin, so that nothing can skip it.

What a plugin is comes from its ``PluginSpec`` (``plugin.py``), checked when it loaded.
"""
from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple, Union
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # logs.py imports this module early: the plugin contract is imported when needed
    from tq_mw_thehive.enrichment.plugin import PluginSpec

# WHITE and CLEAR are the same level (TLP 2.0 renamed it); AMBER+STRICT sits below RED.
_RANK = {"WHITE": 0, "CLEAR": 0, "GREEN": 1, "AMBER": 2, "AMBER+STRICT": 3, "RED": 4}


def rank(level: Optional[str]) -> int:
    return _RANK.get((level or "").strip().upper(), _RANK["RED"])


def allows(level: Optional[str], maximum: str) -> bool:
    return rank(level) <= rank(maximum)


# --- address scope -------------------------------------------------------------------------------------
#
# From the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and its updates, checked
# 2025: 3fff::/20 from RFC 9637, 5f00::/16 from RFC 9602). Deliberately not ``ipaddress``'s
# ``is_private``/``is_global``, whose answers changed between Python patch releases. First match
# wins, so the most specific ranges come first; "global" rows are the registry's globally
# reachable exceptions inside larger non-global blocks. The ip_scope plugin reports this table.

SCOPES = ("global", "private", "loopback", "link-local", "multicast", "reserved",
          "unspecified", "cgnat", "documentation")
UNPARSABLE = "unparsable"          # a value that should be an address and is not: never sent out

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

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _ranges(table: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[int, int, str], ...]:
    nets = ((ipaddress.ip_network(cidr), scope) for cidr, scope in table)
    return tuple((int(n.network_address), int(n.broadcast_address), scope) for n, scope in nets)


_V4_RANGES = _ranges(_V4)
_V6_RANGES = _ranges(_V6)
_V6_UNICAST = (int(_GLOBAL_UNICAST_V6.network_address), int(_GLOBAL_UNICAST_V6.broadcast_address))


def parse_address(value: str) -> Address:
    """The address in ``value``; an IPv4-mapped IPv6 address comes back as its IPv4. ValueError if not an IP."""
    address = ipaddress.ip_address(str(value).strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def classify(address: Union[str, Address]) -> str:
    """One of SCOPES for an address (or its text; ValueError if the text is not one)."""
    if isinstance(address, str):
        address = parse_address(address)
    number = int(address)
    for low, high, scope in (_V4_RANGES if address.version == 4 else _V6_RANGES):
        if low <= number <= high:
            return scope
    if address.version == 6 and not _V6_UNICAST[0] <= number <= _V6_UNICAST[1]:
        return "reserved"
    return "global"


class _Unparsable(ValueError):
    """Looks like an address, does not parse as one."""


_NUMBER = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_V6_TEXT = re.compile(r"^[0-9a-f:.]+(?:%.*)?$")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})   # the full stops IDNA maps to "."
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:/+", re.I)


def _numeric_ipv4(host: str) -> Optional[ipaddress.IPv4Address]:
    """A host that ends in a number is an IPv4 address in the URL standard's sense (127.1, 0x7f.1,
    2130706433, 0177.0.0.1): the address, or _Unparsable. None when the host is a name."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if not _NUMBER.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMBER.match(label) for label in labels):
        raise _Unparsable(host)
    numbers = []
    for label in labels:
        try:
            numbers.append(int(label[2:] or "0", 16) if label.startswith("0x") else
                           int(label, 8) if len(label) > 1 and label.startswith("0") else int(label))
        except ValueError:   # 08, 09: not octal
            raise _Unparsable(host) from None
    last = numbers.pop()
    if any(n > 255 for n in numbers) or last >= 256 ** (4 - len(numbers)):
        raise _Unparsable(host)
    return ipaddress.IPv4Address(sum(n << (8 * (3 - i)) for i, n in enumerate(numbers)) + last)


def _host_address(host: str) -> Optional[Address]:
    """The address a host names literally; None for a name; _Unparsable for a broken literal."""
    host = unicodedata.normalize("NFKC", unquote(host)).translate(_DOTS).strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.startswith("ipv6:"):           # a mail address literal, [IPv6:...]
        host = host[5:]
    if not host:
        return None
    try:
        return parse_address(host.rstrip(".") if ":" not in host else host)
    except ValueError:
        pass
    if ":" in host:
        name, _, port = host.rpartition(":")
        if port.isdigit() and name and ":" not in name:
            return _host_address(name)          # host:port
        if _V6_TEXT.match(host):
            raise _Unparsable(host)
        return None
    return _numeric_ipv4(host)


def _url_hosts(value: str) -> Iterator[str]:
    """The host of a URL as Python reads it, and as a browser does (a backslash is a slash)."""
    for text in dict.fromkeys((value, value.replace("\\", "/"))):
        rest = _SCHEME.sub("", text, count=1)
        try:
            host = urlsplit("//" + rest.lstrip("/")).hostname
        except ValueError:                  # a broken [IPv6] literal
            raise _Unparsable(value) from None
        if host:
            yield host


def _addresses(data_type: str, value: str) -> List[Address]:
    value = value.strip()
    if data_type == "ip":
        try:
            return [parse_address(value)]
        except ValueError:
            raise _Unparsable(value) from None
    if data_type == "url":
        hosts: List[str] = list(_url_hosts(value))
    elif data_type == "mail":
        hosts = [value.rpartition("@")[2]] if "@" in value else []
    elif data_type in ("domain", "fqdn", "hostname"):
        hosts = [value]
    else:                                   # any other type: only a value that is an address itself
        try:
            return [parse_address(value)]
        except ValueError:
            return []
    return [address for address in map(_host_address, hosts) if address is not None]


def scope_of(data_type: str, value: str) -> Optional[str]:
    """None when the value holds no address; else "global", the first non-global scope found,
    or UNPARSABLE when it should hold an address and does not parse."""
    try:
        scopes = [classify(address) for address in _addresses(data_type, value)]
    except _Unparsable:
        return UNPARSABLE
    if not scopes:
        return None
    return next((s for s in scopes if s != "global"), "global")


# --- the decision ----------------------------------------------------------------------------------------

def refusal(spec: "PluginSpec", tlp: Optional[str], pap: Optional[str], max_tlp: str, max_pap: str,
            data_type: str, value: str) -> Optional[str]:
    """Why the plugin declared by ``spec`` may not see this value, or None: the TLP limit and
    the non-global-address rule for an external plugin, the PAP limit for an active one."""
    if spec.external and not allows(tlp, max_tlp):
        return f"TLP:{tlp or 'unknown'} is above enrichment.max_tlp_external ({max_tlp}) for an external plugin"
    if spec.active and not allows(pap, max_pap):
        return f"PAP:{pap or 'unknown'} is above enrichment.max_pap_active ({max_pap}) for an active plugin"
    if spec.external:
        scope = scope_of(data_type, value)
        if scope not in (None, "global"):
            return f"{scope} address: never sent to a third party"
    return None
