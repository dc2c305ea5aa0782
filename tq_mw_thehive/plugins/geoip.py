"""GeoIP: country and autonomous system of a public IP address, offline.

Data: the ``geoip2fast`` package's bundled ``geoip2fast-asn-ipv6.dat.gz`` (IPv4 and
IPv6, country and AS), built from MaxMind GeoLite2 Country and ASN; version 1.2.2
ships the 2024-06-18 build, so answers are as old as the installed package (upgrade
it to refresh). Its tables (789 k country networks, 644 k AS networks, 72 k AS names)
are copied once per data version into a SQLite index (``offline_index.py``, ~44 MB on
disk, built in a child process: ~10-15 s, which loads geoip2fast once), and each lookup
is two indexed queries answering exactly as geoip2fast's bisection would (parity tested);
a process never loads geoip2fast itself (it held ~110 MB per process before issue 18).
That build keeps AS *names* only ("GOOGLE"): the AS numbers were dropped when the
file was made, so "GeoIP ASN" is set only from a MaxMind database.

With ``enrichment.plugins.geoip.mmdb_path`` set, a MaxMind ``.mmdb`` file (GeoLite2 or
GeoIP2 Country, City or ASN) is read instead, with the optional ``maxminddb`` package;
it is as fresh as that file.

geoip2fast quirks handled here: it keeps the loaded data in module globals (a second
``GeoIP2Fast(...)`` anywhere in the process replaces ours), it looks in the current
directory before its own, it sets PYTHONWARNINGS/PYTHONIOENCODING in ``os.environ``
on import, it maps ``::ffff:a.b.c.d`` to the wrong place, and with the IPv6 file it
gives IPv4 addresses outside any AS block the name of the block before them.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import threading
from typing import Any, Dict, Optional

from tq_mw_thehive.enrichment import offline_index
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, Result
from tq_mw_thehive.plugins import ip_scope

NAME = "geoip"
TITLE = "GeoIP"
DESCRIPTION = "Country and autonomous system of an IP address, offline (geoip2fast or a MaxMind mmdb)"
VERSION = "1.0"
DATA_TYPES = ("ip",)
EXTERNAL = False
ACTIVE = False
API_KEYS: dict = {}
CACHE_TTL = 7 * 24 * 3600           # the data only changes when the package or the mmdb does
NEGATIVE_CACHE_TTL = 24 * 3600
RATE_LIMIT_PER_MIN = None

# Best first: the package has carried all three since 1.1; older ones may lack the IPv6/ASN files.
BUNDLED_FILES = ("geoip2fast-asn-ipv6.dat.gz", "geoip2fast-asn.dat.gz", "geoip2fast.dat.gz")

_lock = threading.Lock()
_bundled: Any = None                # the GeoIP2Fast instance, once loaded
_mmdb_readers: Dict[str, Any] = {}  # mmdb path -> maxminddb.Reader


def _load_bundled() -> Any:
    """Open geoip2fast's best bundled data file (the slow part; runs once per process)."""
    saved = {name: os.environ.get(name) for name in ("PYTHONWARNINGS", "PYTHONIOENCODING")}
    try:
        import geoip2fast
        from geoip2fast import GeoIP2Fast
    finally:                        # undo the environment changes its import makes
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    directory = os.path.dirname(geoip2fast.__file__)
    for filename in BUNDLED_FILES:
        path = os.path.join(directory, filename)   # a full path: never a file in the working directory
        if os.path.isfile(path):
            try:
                return GeoIP2Fast(geoip2fast_data_file=path)
            except Exception as exc:
                raise PluginError(f"cannot load {path}: {exc}") from exc
    raise PluginError(f"geoip2fast has none of {', '.join(BUNDLED_FILES)} in {directory}")


def _bundled_db() -> Any:
    global _bundled
    with _lock:
        if _bundled is None:
            _bundled = _load_bundled()
        return _bundled


INDEX_NAME = "geoip"
INDEX_FORMAT = "f1"                 # bump when the tables below or their meaning change
_MAX_IPV4 = 2 ** 32                 # geoip2fast keeps IPv4 and IPv6 in one integer space
_index_lock = threading.Lock()
_index: Any = None                  # (connection, lock, country names, ASN ranges are IPv6-sized, source)


def _package_dir() -> str:
    spec = importlib.util.find_spec("geoip2fast")   # found without importing it (its import edits os.environ)
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("the geoip2fast package is not installed: pip install geoip2fast")
    return list(spec.submodule_search_locations)[0]


def data_version() -> str:
    """Our index format, geoip2fast's version, and the name and size of the data file it ships."""
    from importlib import metadata
    directory = _package_dir()
    for filename in BUNDLED_FILES:
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            try:
                version = metadata.version("geoip2fast")
            except metadata.PackageNotFoundError:
                version = "unknown"
            return f"{INDEX_FORMAT}-{version}-{filename.split('.')[0]}-{os.path.getsize(path)}"
    raise PluginError(f"geoip2fast has none of {', '.join(BUNDLED_FILES)} in {directory}")


def _key(number: int) -> bytes:
    return number.to_bytes(16, "big")


def _build(conn: Any) -> Dict[str, object]:
    """Copy geoip2fast's tables (network starts, prefix lengths, country and AS name ids) into the index.
    Loads geoip2fast once (~0.8 s, ~110 MB, in the building process only)."""
    db = _load_bundled()
    from geoip2fast import geoip2fast as g
    conn.executescript("""
        CREATE TABLE country (first BLOB PRIMARY KEY, netlen INTEGER NOT NULL, name_id INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE asn (first BLOB PRIMARY KEY, netlen INTEGER NOT NULL, name_id INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE country_names (id INTEGER PRIMARY KEY, entry TEXT NOT NULL);
        CREATE TABLE asn_names (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
    """)

    def rows(firsts: Any, netlens: Any, ids: Any) -> Any:
        for chunk_firsts, chunk_lens, chunk_ids in zip(firsts, netlens, ids):
            for first, netlen, name_id in zip(chunk_firsts, chunk_lens, chunk_ids):
                yield _key(first), netlen, name_id

    # In ascending order, as geoip2fast bisects them; a repeated start keeps the last (bisect_right).
    conn.executemany("INSERT OR REPLACE INTO country VALUES (?, ?, ?)",
                     rows(g.mainListFirstIP, g.mainListNetlength, g.mainListIDCountryCodes))
    conn.executemany("INSERT INTO country_names VALUES (?, ?)", enumerate(g.mainListNamesCountry))
    networks = 0
    if db.asn:
        conn.executemany("INSERT OR REPLACE INTO asn VALUES (?, ?, ?)",
                         rows(g.mainListFirstIPASN, g.mainListNetlengthASN, g.mainListIDASN))
        conn.executemany("INSERT INTO asn_names VALUES (?, ?)", enumerate(g.mainListNamesASN))
        networks = sum(len(c) for c in g.mainListFirstIPASN)
    conn.executemany("INSERT INTO index_meta VALUES (?, ?)",
                     [("source_info", str(getattr(db, "source_info", ""))), ("asn", "1" if db.asn else "0"),
                      ("ipv6", "1" if db.ipv6 else "0")])
    return {"networks": sum(len(c) for c in g.mainListFirstIP), "as_networks": networks}


def _open_index() -> Any:
    try:
        path = offline_index.ensure(INDEX_NAME, data_version(), f"{__name__}:_build")   # in a child process
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"cannot build the GeoIP index: {type(exc).__name__}: {exc}") from exc
    conn = offline_index.connect(path)
    meta = dict(conn.execute("SELECT key, value FROM index_meta"))
    names = [entry for _, entry in conn.execute("SELECT id, entry FROM country_names ORDER BY id")]
    return conn, threading.Lock(), names, meta.get("ipv6") == "1", meta.get("source_info", "")


def _get_index() -> Any:
    global _index
    with _index_lock:
        if _index is None:
            _index = _open_index()
        return _index


def prepare(request: Optional[Lookup] = None) -> None:
    """Build (once per data version) or open the index: the runner calls this outside the lookup timeout.
    Nothing to do when a MaxMind database is configured."""
    if request is None or not request.settings.get("mmdb_path"):
        _get_index()


def _int2ip(number: int) -> str:
    """As geoip2fast writes a network's start (below 2**32: dotted IPv4)."""
    if number < _MAX_IPV4:
        return socket.inet_ntoa(number.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))


def _span(number: int, netlen: int, ipv6_sizes: bool) -> int:
    return 2 ** ((128 if ipv6_sizes else 32) - netlen)


def _from_index(address: Any) -> Dict[str, Any]:
    """geoip2fast's lookup on the index: the last network starting at or below the address."""
    conn, lock, names, asn_ipv6, source = _get_index()
    number = int(address)
    with lock:
        row = conn.execute("SELECT first, netlen, name_id FROM country WHERE first <= ? ORDER BY first DESC LIMIT 1",
                           (_key(number),)).fetchone()
        as_row = conn.execute("SELECT a.first, a.netlen, n.name FROM asn a JOIN asn_names n ON n.id = a.name_id "
                              "WHERE a.first <= ? ORDER BY a.first DESC LIMIT 1", (_key(number),)).fetchone()
    if row is None:
        raise NotFound(f"{address} is not in the geoip2fast data")
    first, netlen, name_id = int.from_bytes(row[0], "big"), row[1], row[2]
    if number > first + _span(number, netlen, number > _MAX_IPV4) - 1 or name_id < 16:
        raise NotFound(f"{address} is not in the geoip2fast data")      # not found, or private/reserved
    code, _, country_name = names[name_id].partition(":")
    if code in ("", "--"):
        raise NotFound(f"{address} is not in the geoip2fast data")
    as_name, as_cidr = None, None
    if as_row is not None:
        as_first, as_len = int.from_bytes(as_row[0], "big"), as_row[1]
        if number <= as_first + _span(number, as_len, asn_ipv6) - 1:
            as_name, as_cidr = as_row[2] or None, f"{_int2ip(as_first)}/{as_len}"
    if as_name and (not as_cidr or address not in ipaddress.ip_network(as_cidr)):
        as_name = None              # geoip2fast's neighbouring-block answer, not this address's
    return {
        "country_code": code,
        "country_name": country_name or None,
        "network": f"{_int2ip(first)}/{netlen}",
        "asn": None,
        "as_name": as_name,
        "source": f"geoip2fast {source}".strip(),
    }


def _open_mmdb(path: str) -> Any:
    try:
        import maxminddb
    except ImportError:
        raise PluginError("mmdb_path is set but the maxminddb package is missing: pip install maxminddb") from None
    try:
        return maxminddb.open_database(path)
    except (OSError, ValueError) as exc:
        raise PluginError(f"cannot read MaxMind database {path}: {exc}") from exc


def _mmdb(path: str) -> Any:
    with _lock:
        reader = _mmdb_readers.get(path)
        if reader is None:
            reader = _mmdb_readers[path] = _open_mmdb(path)
        return reader


def _from_bundled(address: Any) -> Dict[str, Any]:
    """The answer from geoip2fast loaded in this process: the reference the index is tested against."""
    db = _bundled_db()
    found = db.lookup(str(address))
    if found.is_private or found.country_code in ("", "--", None):
        raise NotFound(f"{address} is not in the geoip2fast data")
    as_name = found.asn_name or None
    if as_name and (not found.asn_cidr or address not in ipaddress.ip_network(found.asn_cidr)):
        as_name = None              # geoip2fast's neighbouring-block answer, not this address's
    return {
        "country_code": found.country_code,
        "country_name": found.country_name or None,
        "network": found.cidr or None,
        "asn": None,
        "as_name": as_name,
        "source": f"geoip2fast {getattr(db, 'source_info', '')}".strip(),
    }


def _from_mmdb(path: str, address: Any) -> Dict[str, Any]:
    reader = _mmdb(path)
    try:
        record, prefix_len = reader.get_with_prefix_len(str(address))
    except ValueError as exc:       # e.g. an IPv6 address against an IPv4-only database
        raise NotFound(f"{address}: {exc}") from exc
    record = record if isinstance(record, dict) else {}
    country = record.get("country") or record.get("registered_country") or {}
    asn = record.get("autonomous_system_number")
    if not country.get("iso_code") and not asn:
        raise NotFound(f"{address} is not in {os.path.basename(path)}")
    network = ipaddress.ip_network(f"{address}/{prefix_len}", strict=False) if prefix_len else None
    return {
        "country_code": country.get("iso_code"),
        "country_name": (country.get("names") or {}).get("en"),
        "network": str(network) if network else None,
        "asn": int(asn) if asn else None,
        "as_name": record.get("autonomous_system_organization"),
        "source": f"mmdb {os.path.basename(path)}",
    }


def lookup(request: Lookup) -> Result:
    address = ip_scope.parse(request.value)
    scope = ip_scope.classify(str(address))
    if scope != "global":
        raise NotFound(f"{address} is a {scope} address")
    path: Optional[str] = request.settings.get("mmdb_path")
    data = _from_mmdb(str(path), address) if path else _from_index(address)
    attributes = {}
    if data["country_code"]:
        attributes[f"{TITLE} Country"] = data["country_code"]
    if data["country_name"]:
        attributes[f"{TITLE} Country Name"] = data["country_name"]
    if data["asn"]:
        attributes[f"{TITLE} ASN"] = f"AS{data['asn']}"
    if data["as_name"]:
        attributes[f"{TITLE} AS Name"] = data["as_name"]
    return Result(verdict="info", data=data, attributes=attributes)
