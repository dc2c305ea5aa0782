"""Domain: registered domain and public suffix of a domain, host name, URL or e-mail address, offline.

Data: the Public Suffix List snapshot bundled in ``tldextract`` (``.tld_set_snapshot``;
tldextract 5.4.0 ships the list of 2025-04-07), so a suffix newer than the installed
package is unknown until it is upgraded. The extractor is built with
``suffix_list_urls=()`` (never fetch the live list) and ``cache_dir=None`` (never read
or write a disk cache), so it cannot touch the network or the file system; it is
built once per process on first use (~0.1 s with the import).

Only the ICANN section of the list counts by default, so ``foo.github.io`` has the
registered domain ``github.io``; ``enrichment.plugins.domain.private_suffixes: true``
also honours the PSL's private section (``foo.github.io`` under ``github.io``).
"""
from __future__ import annotations

import threading
from typing import Any

from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, PluginError, Result

NAME = "domain"
TITLE = "Domain"
DESCRIPTION = "Registered domain and public suffix (Public Suffix List), offline"
VERSION = "1.0"
DATA_TYPES = ("domain", "fqdn", "hostname", "url", "mail")
EXTERNAL = False
ACTIVE = False
API_KEYS: dict = {}
CACHE_TTL = 30 * 24 * 3600          # the data only changes when tldextract is upgraded
NEGATIVE_CACHE_TTL = 24 * 3600
RATE_LIMIT_PER_MIN = None

_lock = threading.Lock()
_extractor: Any = None


def _load_extractor() -> Any:
    """A tldextract extractor on the bundled snapshot only (the slow part; runs once per process)."""
    import tldextract

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)
    extractor("example.com")        # parse the snapshot and build the trie now, under the lock
    return extractor


def _get_extractor() -> Any:
    global _extractor
    with _lock:
        if _extractor is None:
            _extractor = _load_extractor()
        return _extractor


def host_of(data_type: str, value: str) -> str:
    """The host name to look at: the part after "@" of an address; the host of a URL (tldextract strips the rest)."""
    text = str(value).strip()
    if data_type == "mail":
        if "@" not in text:
            raise PluginError(f"not an e-mail address: {value!r}")
        text = text.rsplit("@", 1)[1].strip("<>[] ")
    return text.lower()


def lookup(request: Lookup) -> Result:
    host = host_of(request.data_type, request.value)
    private = bool(request.settings.get("private_suffixes", False))
    parts = _get_extractor()(host, include_psl_private_domains=private)
    if not parts.domain or not parts.suffix:
        raise NotFound(f"no registered domain in {request.value!r}")
    registered = f"{parts.domain}.{parts.suffix}"
    data = {
        "registered_domain": registered,
        "public_suffix": parts.suffix,
        "subdomain": parts.subdomain,
        "domain": parts.domain,
        "host": ".".join(p for p in (parts.subdomain, parts.domain, parts.suffix) if p),
        "private_suffix": bool(parts.is_private),
    }
    attributes = {"Registered Domain": registered, "Public Suffix": parts.suffix}
    return Result(verdict="info", data=data, attributes=attributes)
