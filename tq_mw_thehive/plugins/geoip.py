"""GeoIP: country and autonomous system of a public IP address, offline.

Data: the ``geoip2fast`` package's bundled ``geoip2fast-asn-ipv6.dat.gz`` (IPv4 and
IPv6, country and AS), built from MaxMind GeoLite2 Country and ASN; version 1.2.2
ships the 2024-06-18 build, so answers are as old as the installed package (upgrade
it to refresh). Loaded once per process on first use (~0.25 s, ~110 MB of memory).
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

import ipaddress
import os
import threading
from typing import Any, Dict, Optional

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
    data = _from_mmdb(str(path), address) if path else _from_bundled(address)
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
