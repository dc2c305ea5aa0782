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
but takes ~10 s to load and 50-150 ms per search. So the lists are indexed here with
MISP's meaning of each list type: "string" exact, "hostname" the host or any parent
domain, "cidr" containment (one key per network: version, prefix length, prefix),
"substring" and "regex" as such; matching is case-insensitive, and a list is only
searched for the data types its ``matching_attributes`` name.

Index: a SQLite file (``offline_index.py``: next to the state database, built once per
version of pymispwarninglists, atomically, one builder at a time): the 2.4 M exact
entries and 120 k networks in two clustered tables (~74 MB on disk), the 5 k substrings
and 34 regexes in memory. The build reads the JSON files one at a time (~10-15 s and a
~250 MB peak, once per package version); ``prepare`` (called by the runner outside the
lookup timeout) builds or opens it; opening costs a few ms and under 1 MB; a search is
one or two indexed queries (0.2-1.5 ms) that read a few pages the OS page cache shares
between processes. Before this index (issue 18) every process held the lists in Python
objects: ~280-320 MB each, 2.5 s to load.

A match means "well known", not "harmless": the lists include dynamic-DNS and
disposable e-mail domains, VPN, scanner and cloud address ranges, and any subdomain of
a Tranco top-1M domain.
"""
from __future__ import annotations

import glob
import importlib.util
import ipaddress
import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from tq_mw_thehive.enrichment import offline_index
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


INDEX_NAME = "warninglists"
INDEX_FORMAT = "f1"                 # bump when the tables below or their meaning change


@dataclass(frozen=True)
class _Query:
    text: str                                   # the whole value, lower case
    host: Optional[str]                         # the host name it names, if any
    ip: Any = None                              # an ipaddress address, if it is or names one


@dataclass(frozen=True)
class _ListInfo:
    name: str
    kind: str                                   # string, hostname, cidr, substring or regex
    applies_to: FrozenSet[str]                  # TheHive dataTypes it is searched for


@dataclass
class _Index:
    """An open index: the small parts in memory, the 2.4 M exact entries and 120 k networks on disk."""

    path: str
    conn: sqlite3.Connection
    lists: Dict[int, _ListInfo]
    lengths: Dict[int, Tuple[int, ...]]                     # IP version -> prefix lengths present
    substrings: List[Tuple[int, Tuple[str, ...]]]
    patterns: List[Tuple[int, Tuple["re.Pattern[str]", ...]]]
    lock: threading.Lock = field(default_factory=threading.Lock)


_lock = threading.Lock()
_opened: Optional[_Index] = None


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


def _applies(matching: List[str]) -> FrozenSet[str]:
    return frozenset(t for t, misp in MISP_TYPES.items() if not matching or misp & set(matching))


def _data_dir() -> Path:
    """pymispwarninglists' bundled lists, found without importing the package."""
    spec = importlib.util.find_spec("pymispwarninglists")
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("the pymispwarninglists package is not installed: pip install pymispwarninglists")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "misp-warninglists" / "lists"


def data_version() -> str:
    """The version of the data: that of the package that ships it, and of our index format."""
    from importlib import metadata
    try:
        return f"{INDEX_FORMAT}-{metadata.version('pymispwarninglists')}"
    except metadata.PackageNotFoundError:
        raise PluginError("the pymispwarninglists package is not installed: pip install pymispwarninglists") from None


def _cidr_key(version: int, length: int, prefix: int) -> bytes:
    return bytes((version, length)) + prefix.to_bytes(16, "big")


def _build(conn: sqlite3.Connection) -> Dict[str, object]:
    """Fill an empty index from the bundled JSON, one list at a time (what WarningLists() reads, in its
    order: a later list of the same name replaces an earlier one)."""
    files = glob.glob(str(_data_dir() / "*" / "list.json"))
    if not files:
        raise PluginError(f"no MISP warning lists in {_data_dir()}")
    conn.executescript("""
        CREATE TABLE lists (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
                            applies TEXT NOT NULL);
        CREATE TABLE patterns (list INTEGER NOT NULL, kind TEXT NOT NULL, entry TEXT NOT NULL);
        CREATE TABLE cidr_lengths (version INTEGER NOT NULL, length INTEGER NOT NULL,
                                   PRIMARY KEY (version, length)) WITHOUT ROWID;
        CREATE TEMP TABLE staging_exact (value TEXT NOT NULL, list INTEGER NOT NULL);
        CREATE TEMP TABLE staging_cidr (key BLOB NOT NULL, list INTEGER NOT NULL);
    """)
    ids: Dict[str, int] = {}
    entries_seen = 0
    for file in files:
        with open(file, encoding="utf-8") as fh:
            raw = json.load(fh)
        name, kind, entries = raw["name"], raw["type"], raw["list"]
        applies = ",".join(sorted(_applies(list(raw.get("matching_attributes") or ()))))
        entries_seen += len(entries)
        if name in ids:             # replaced, as in WarningLists' dict
            list_id = ids[name]
            for table in ("staging_exact", "staging_cidr", "patterns"):
                conn.execute(f"DELETE FROM {table} WHERE list = ?", (list_id,))
            conn.execute("UPDATE lists SET kind = ?, applies = ? WHERE id = ?", (kind, applies, list_id))
        else:
            list_id = ids[name] = conn.execute("INSERT INTO lists (name, kind, applies) VALUES (?, ?, ?)",
                                               (name, kind, applies)).lastrowid
        if kind in ("string", "hostname"):
            strip = ". " if kind == "hostname" else " "
            values = {e.strip(strip).lower() for e in entries}
            conn.executemany("INSERT INTO staging_exact VALUES (?, ?)", ((v, list_id) for v in values))
        elif kind == "substring":
            conn.executemany("INSERT INTO patterns VALUES (?, 'substring', ?)",
                             ((list_id, e) for e in sorted({e.lower() for e in entries if e})))
        elif kind == "regex":
            conn.executemany("INSERT INTO patterns VALUES (?, 'regex', ?)", ((list_id, e) for e in entries))
        elif kind == "cidr":
            others, keys = set(), set()
            for e in entries:
                try:
                    net = ipaddress.ip_network(e.strip(), strict=False)
                except ValueError:
                    others.add(e.strip().lower())
                    continue
                keys.add((net.version, net.prefixlen,
                          int(net.network_address) >> (net.max_prefixlen - net.prefixlen)))
            conn.executemany("INSERT OR IGNORE INTO cidr_lengths VALUES (?, ?)", {(v, n) for v, n, _ in keys})
            conn.executemany("INSERT INTO staging_cidr VALUES (?, ?)",
                             ((_cidr_key(v, n, p), list_id) for v, n, p in keys))
            conn.executemany("INSERT INTO staging_exact VALUES (?, ?)", ((v, list_id) for v in others))
        del raw, entries
    # Sorted inserts into clustered (WITHOUT ROWID) tables: compact pages, no separate index.
    conn.executescript("""
        CREATE TABLE exact (value TEXT NOT NULL, list INTEGER NOT NULL, PRIMARY KEY (value, list)) WITHOUT ROWID;
        INSERT OR IGNORE INTO exact SELECT value, list FROM staging_exact ORDER BY value, list;
        CREATE TABLE cidr (key BLOB NOT NULL, list INTEGER NOT NULL, PRIMARY KEY (key, list)) WITHOUT ROWID;
        INSERT OR IGNORE INTO cidr SELECT key, list FROM staging_cidr ORDER BY key, list;
        DROP TABLE staging_exact;
        DROP TABLE staging_cidr;
    """)
    return {"lists": len(ids), "entries": entries_seen}


def _open() -> _Index:
    """Find (or build, once per data version) the index and open it; only its small parts are read."""
    try:
        path = offline_index.ensure(INDEX_NAME, data_version(), f"{__name__}:_build")   # in a child process
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"cannot build the MISP warning lists index: {type(exc).__name__}: {exc}") from exc
    conn = offline_index.connect(path)
    lists = {i: _ListInfo(n, k, frozenset(a.split(",")) if a else frozenset())
             for i, n, k, a in conn.execute("SELECT id, name, kind, applies FROM lists")}
    lengths: Dict[int, List[int]] = {4: [], 6: []}
    for version, length in conn.execute("SELECT version, length FROM cidr_lengths ORDER BY version, length"):
        lengths.setdefault(version, []).append(length)
    substrings: Dict[int, List[str]] = {}
    patterns: Dict[int, List["re.Pattern[str]"]] = {}
    for list_id, kind, entry in conn.execute("SELECT list, kind, entry FROM patterns ORDER BY rowid"):
        if kind == "substring":
            substrings.setdefault(list_id, []).append(entry)
        else:
            pattern = _php_regex(entry)
            if pattern is not None:
                patterns.setdefault(list_id, []).append(pattern)
    return _Index(str(path), conn, lists, {v: tuple(n) for v, n in lengths.items()},
                  [(i, tuple(v)) for i, v in substrings.items()], [(i, tuple(v)) for i, v in patterns.items()])


def _get_index() -> _Index:
    global _opened
    with _lock:
        if _opened is None:
            _opened = _open()
        return _opened


def prepare(request: Optional[Lookup] = None) -> None:
    """Build (once per data version, ~10 s) or open the index: the runner calls this outside the lookup timeout."""
    _get_index()


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


_CHUNK = 500                        # SQLite host parameters per statement


def _rows(index: _Index, sql: str, keys: List[Any]) -> List[Tuple[Any, int]]:
    out: List[Tuple[Any, int]] = []
    with index.lock:                # one connection, shared by the plugin threads
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            out.extend(index.conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return out


def search(data_type: str, value: str) -> List[str]:
    """Sorted names of the lists that ``value`` (of TheHive type ``data_type``) is on.

    MISP's meaning of each list type: "string" exact, "hostname" the host or any parent domain,
    "cidr" containment (an entry that is no network: exact), "substring" and "regex" as such.
    """
    query = _query(data_type, value)
    index = _get_index()
    parents = _parents(query.host if query.host is not None else query.text)
    found: Set[int] = set()
    for entry, list_id in _rows(index, "SELECT value, list FROM exact WHERE value IN ({})",
                                sorted(set(parents) | {query.text})):
        info = index.lists.get(list_id)
        if info is None or data_type not in info.applies_to:
            continue
        if (info.kind == "string" and entry == query.text) or (info.kind == "hostname" and entry in parents) or \
                (info.kind == "cidr" and query.ip is None and entry == query.text):
            found.add(list_id)
    if query.ip is not None:
        number, bits, version = int(query.ip), query.ip.max_prefixlen, query.ip.version
        keys = [_cidr_key(version, length, number >> (bits - length)) for length in index.lengths.get(version, ())]
        for _, list_id in _rows(index, "SELECT key, list FROM cidr WHERE key IN ({})", keys):
            info = index.lists.get(list_id)
            if info is not None and info.kind == "cidr" and data_type in info.applies_to:
                found.add(list_id)
    for list_id, substrings in index.substrings:
        if data_type in index.lists[list_id].applies_to and any(s in query.text for s in substrings):
            found.add(list_id)
    for list_id, patterns in index.patterns:
        if data_type in index.lists[list_id].applies_to and any(p.search(query.text) for p in patterns):
            found.add(list_id)
    return sorted(index.lists[i].name for i in found)


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
