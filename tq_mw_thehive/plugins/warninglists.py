"""MISP Warning Lists: is the value on a list of well-known, false-positive-prone indicators?

Data: the MISP warning lists bundled in ``pymispwarninglists``
(``pymispwarninglists/data/misp-warninglists/lists/*/list.json``: 119 lists, ~2.5 M
entries: top-site rankings, public DNS resolvers, cloud and CDN ranges, benign file
hashes, RFC special-use blocks...). They are as old as the installed package (1.7.0,
January 2026; its newest lists carry version 25121022, December 2025); upgrade it to
refresh. Never ``from_xdg_home=True``, which downloads.

Search: ``WarningLists().search(value)`` (``slow_search=False``, the default) is exact
string matching only, so ``8.8.8.8`` is found but an address inside a listed CIDR, a
subdomain of a listed host name or a URL are not; ``slow_search=True`` matches properly
but takes ~10 s to load and 50-150 ms per search (it scans 1 M-entry host name lists).
So the lists are read with the fast loader and indexed here once, with MISP's meaning
of each list type: "string" exact, "hostname" the host or any parent domain, "cidr"
containment (a set of prefixes per prefix length), "substring" and "regex" as such;
matching is case-insensitive, and a list is only searched for the data types its
``matching_attributes`` name. Loading takes ~2.5 s and ~280 MB of memory the first
time it is used (measured on one core: 0.6 s in pymispwarninglists reading the JSON,
~1.9 s building the index, half of it parsing 120 k networks); each search then takes
0.1-0.3 ms.

A match means "well known", not "harmless": the lists include dynamic-DNS and
disposable e-mail domains, VPN, scanner and cloud address ranges, and any subdomain of
a Tranco top-1M domain.
"""
from __future__ import annotations

import ipaddress
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, Result

NAME = "warninglists"
TITLE = "MISP Warning Lists"
DESCRIPTION = "Match against the MISP warning lists of well-known indicators, offline"
VERSION = "1.0"
DATA_TYPES = ("ip", "domain", "fqdn", "hostname", "url", "mail", "hash")
EXTERNAL = False
ACTIVE = False
API_KEYS: dict = {}
CACHE_TTL = 7 * 24 * 3600           # the lists only change when the package is upgraded
NEGATIVE_CACHE_TTL = 24 * 3600
RATE_LIMIT_PER_MIN = None

ATTRIBUTE = "MISP Warning List"

_HOST_TYPES = frozenset({"domain", "hostname", "hostname|port"})
_HASH_TYPES = frozenset({"md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ssdeep", "imphash",
                         "tlsh", "authentihash", "x509-fingerprint-md5", "x509-fingerprint-sha1",
                         "x509-fingerprint-sha256"})
# TheHive dataType -> the MISP attribute types (a list's matching_attributes) it stands for.
MISP_TYPES: Dict[str, FrozenSet[str]] = {
    "ip": frozenset({"ip-src", "ip-dst", "ip-src|port", "ip-dst|port"}),
    "domain": _HOST_TYPES,
    "fqdn": _HOST_TYPES,
    "hostname": _HOST_TYPES,
    "url": frozenset({"url", "uri", "link"}),
    "mail": frozenset({"email", "email-src", "email-dst", "target-email", "whois-registrant-email",
                       "dns-soa-email"}),
    "hash": _HASH_TYPES | frozenset(f"filename|{t}" for t in _HASH_TYPES),
}


@dataclass
class _List:
    name: str
    kind: str                                   # string, hostname, cidr, substring or regex
    applies_to: FrozenSet[str]                  # TheHive dataTypes it is searched for
    exact: FrozenSet[str] = frozenset()         # string and hostname entries; cidr entries that are no network
    substrings: Tuple[str, ...] = ()
    patterns: Tuple["re.Pattern[str]", ...] = ()
    prefixes: Dict[Tuple[int, int], Set[int]] = field(default_factory=dict)  # (version, length) -> prefixes


@dataclass(frozen=True)
class _Query:
    text: str                                   # the whole value, lower case
    host: Optional[str]                         # the host name it names, if any
    ip: Any = None                              # an ipaddress address, if it is or names one


_lock = threading.Lock()
_lists: Optional[List[_List]] = None


def _php_regex(entry: str) -> Optional["re.Pattern[str]"]:
    """MISP stores PCRE as "/pattern/flags"."""
    if len(entry) < 2 or not entry.startswith("/") or entry.rfind("/") == 0:
        return None
    end = entry.rfind("/")
    flags = re.IGNORECASE if "i" in entry[end + 1:] else 0
    try:
        return re.compile(entry[1:end], flags)
    except re.error:
        return None


def _index(name: str, kind: str, entries: List[str], matching: List[str]) -> _List:
    applies = frozenset(t for t, misp in MISP_TYPES.items() if not matching or misp & set(matching))
    entry = _List(name=name, kind=kind, applies_to=applies)
    if kind in ("string", "hostname"):
        strip = ". " if kind == "hostname" else " "
        entry.exact = frozenset(e.strip(strip).lower() for e in entries)
    elif kind == "substring":
        entry.substrings = tuple(sorted({e.lower() for e in entries if e}))
    elif kind == "regex":
        entry.patterns = tuple(p for p in map(_php_regex, entries) if p is not None)
    elif kind == "cidr":
        others = set()
        for e in entries:
            try:
                net = ipaddress.ip_network(e.strip(), strict=False)
            except ValueError:
                others.add(e.strip().lower())
                continue
            entry.prefixes.setdefault((net.version, net.prefixlen), set()).add(
                int(net.network_address) >> (net.max_prefixlen - net.prefixlen))
        entry.exact = frozenset(others)
    return entry


def _load() -> List[_List]:
    """Read every bundled list with pymispwarninglists' fast loader and index it (the slow part; once per process)."""
    try:
        from pymispwarninglists import WarningLists
        loaded = WarningLists(slow_search=False)
    except Exception as exc:
        raise PluginError(f"cannot load the bundled MISP warning lists: {exc}") from exc
    return [_index(wl.name, wl.type, wl.list, list(getattr(wl, "matching_attributes", None) or ()))
            for wl in loaded.values()]


def _get_lists() -> List[_List]:
    global _lists
    with _lock:
        if _lists is None:
            _lists = _load()
        return _lists


def _ip(text: str) -> Any:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _query(data_type: str, value: str) -> _Query:
    text = str(value).strip().lower()
    if data_type == "ip":
        address = _ip(text)
        if address is None:
            raise PluginError(f"not an IP address: {value!r}")
        if getattr(address, "ipv4_mapped", None) is not None:
            address = address.ipv4_mapped
        return _Query(text=str(address), host=None, ip=address)
    if data_type == "url":
        try:
            host = urlsplit(text if "://" in text else "//" + text).hostname
        except ValueError:
            host = None
        return _Query(text=text, host=host.rstrip(".") if host else None, ip=_ip(host or ""))
    if data_type == "mail":
        return _Query(text=text, host=text.rsplit("@", 1)[-1].strip("<>[] ") if "@" in text else None)
    if data_type in ("domain", "fqdn", "hostname"):
        host = text.rstrip(".")
        return _Query(text=host, host=host, ip=_ip(host))
    return _Query(text=text, host=None)


def _parents(host: str) -> List[str]:
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


def _matches(wl: _List, q: _Query) -> bool:
    if wl.kind == "string":
        return q.text in wl.exact
    if wl.kind == "hostname":
        host = q.host if q.host is not None else q.text
        return any(h in wl.exact for h in _parents(host))
    if wl.kind == "cidr":
        if q.ip is not None:
            number, bits = int(q.ip), q.ip.max_prefixlen
            return any(number >> (bits - length) in prefixes
                       for (version, length), prefixes in wl.prefixes.items() if version == q.ip.version)
        return q.text in wl.exact
    if wl.kind == "substring":
        return any(s in q.text for s in wl.substrings)
    if wl.kind == "regex":
        return any(p.search(q.text) for p in wl.patterns)
    return False


def search(data_type: str, value: str) -> List[str]:
    """Sorted names of the lists that ``value`` (of TheHive type ``data_type``) is on."""
    query = _query(data_type, value)
    return sorted(wl.name for wl in _get_lists() if data_type in wl.applies_to and _matches(wl, query))


# Lists that say "well known", not "harmless": a value on one of them (evil.duckdns.org is on
# the dynamic-DNS list and, by its parent, on Tranco's top million) is never called safe.
NOT_BENIGN = re.compile(r"dynamic dns|disposable|url shortener|scanning|parking|attack simulator|blockpage",
                        re.I)
# Lists that are no evidence either way (a VPN provider's or a datacenter's range hosts anyone).
NEUTRAL = re.compile(r"vpn providers and datacenters", re.I)


def lookup(request: Lookup) -> Result:
    names = search(request.data_type, request.value)
    if not names:
        raise NotFound(f"{request.value!r} is on no MISP warning list")
    cautious = [name for name in names if NOT_BENIGN.search(name)]
    benign = [name for name in names if not NOT_BENIGN.search(name) and not NEUTRAL.search(name)]
    verdict = "safe" if benign and not cautious else "info"
    return Result(verdict=verdict, data={"lists": names, "not_benign": cautious},
                  attributes={ATTRIBUTE: "; ".join(names)})
