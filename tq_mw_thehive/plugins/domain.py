"""Domain: registered domain and public suffix of a domain, host name, URL or e-mail address, offline.

Data: the Public Suffix List snapshot bundled in ``tldextract`` (``.tld_set_snapshot``;
tldextract 5.4.0 ships the list of 2025-04-07), so a suffix newer than the installed
package is unknown until it is upgraded. The extractor is built with
``suffix_list_urls=()`` (never fetch the live list) and ``cache_dir=None`` (never read
or write a disk cache), so it cannot touch the network or the file system. Its two
suffix tries (ICANN only; ICANN and private) are copied once per tldextract version into
a SQLite index (``offline_index.py``, built in a child process in about a second), and
tldextract's own extraction walks them on disk, so a process holds ~1 MB for the module
instead of ~5.6 MB of tries (issue 18); answers are the same (parity tested).

Only the ICANN section of the list counts by default, so ``foo.github.io`` has the
registered domain ``github.io``; ``enrichment.plugins.domain.private_suffixes: true``
also honours the PSL's private section (``foo.github.io`` under ``github.io``).
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple

from tq_mw_thehive.enrichment import offline_index
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

INDEX_NAME = "domain"
INDEX_FORMAT = "f1"                 # bump when the table below or its meaning change

_lock = threading.Lock()
_extractor: Any = None


def _load_extractor() -> Any:
    """A tldextract extractor on the bundled snapshot only, its tries in memory (~5.6 MB): what the
    index is built from, and the reference it is tested against."""
    import tldextract

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)
    extractor("example.com")        # parse the snapshot and build the trie now, under the lock
    return extractor


def data_version() -> str:
    from importlib import metadata
    try:
        return f"{INDEX_FORMAT}-{metadata.version('tldextract')}"
    except metadata.PackageNotFoundError:
        raise PluginError("the tldextract package is not installed: pip install tldextract") from None


def _build(conn: Any) -> Dict[str, object]:
    """tldextract's two tries (ICANN only; ICANN and private), one row per node: trie, path (the labels
    from the right, joined by dots), end, is_private."""
    psl = _load_extractor()._get_tld_extractor()
    conn.execute("CREATE TABLE nodes (trie INTEGER NOT NULL, path TEXT NOT NULL, end INTEGER NOT NULL, "
                 "is_private INTEGER NOT NULL, PRIMARY KEY (trie, path)) WITHOUT ROWID")
    rows = []
    for trie, root in ((0, psl.tlds_excl_private_trie), (1, psl.tlds_incl_private_trie)):
        stack = [("", root)]
        while stack:
            path, node = stack.pop()
            rows.append((trie, path, int(node.end), int(node.is_private)))
            stack.extend((f"{path}.{label}" if path else label, child) for label, child in node.matches.items())
    conn.executemany("INSERT INTO nodes VALUES (?, ?, ?, ?)", sorted(rows))
    return {"nodes": len(rows)}


class _Children:
    """``node.matches`` of an on-disk trie node: ``label in matches`` and ``matches[label]``, one query each."""

    __slots__ = ("node",)

    def __init__(self, node: "_Node") -> None:
        self.node = node

    def _path(self, label: str) -> str:
        return f"{self.node.path}.{label}" if self.node.path else label

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and self.node.index.row(self.node.trie, self._path(label)) is not None

    def __getitem__(self, label: str) -> "_Node":
        row = self.node.index.row(self.node.trie, self._path(label))
        if row is None:
            raise KeyError(label)
        return _Node(self.node.index, self.node.trie, self._path(label), bool(row[0]), bool(row[1]))


class _Node:
    """A trie node read from the index, with tldextract's Trie attributes (matches, end, is_private)."""

    __slots__ = ("index", "trie", "path", "end", "is_private")

    def __init__(self, index: "_Index", trie: int, path: str, end: bool, is_private: bool) -> None:
        self.index, self.trie, self.path, self.end, self.is_private = index, trie, path, end, is_private

    @property
    def matches(self) -> _Children:
        return _Children(self)


class _Index:
    def __init__(self, path: Any) -> None:
        self.conn = offline_index.connect(path)
        self.lock = threading.Lock()

    def row(self, trie: int, path: str) -> Optional[Tuple[int, int]]:
        with self.lock:
            return self.conn.execute("SELECT end, is_private FROM nodes WHERE trie = ? AND path = ?",
                                     (trie, path)).fetchone()


def _open_extractor() -> Any:
    """tldextract's own extraction (URL and host handling, punycode, wildcard and exception rules) over
    the tries on disk: the snapshot is never parsed in this process."""
    try:
        path = offline_index.ensure(INDEX_NAME, data_version(), f"{__name__}:_build")   # in a child process
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"cannot build the public suffix index: {type(exc).__name__}: {exc}") from exc
    import tldextract
    from tldextract.tldextract import _PublicSuffixListTLDExtractor

    index = _Index(path)
    psl = object.__new__(_PublicSuffixListTLDExtractor)   # its suffix_index() walks our nodes
    psl.include_psl_private_domains = False
    psl.tlds_excl_private_trie = _Node(index, 0, "", False, False)
    psl.tlds_incl_private_trie = _Node(index, 1, "", False, False)
    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)
    extractor._extractor = psl
    return extractor


def _get_extractor() -> Any:
    global _extractor
    with _lock:
        if _extractor is None:
            _extractor = _open_extractor()
        return _extractor


def prepare(request: Optional[Lookup] = None) -> None:
    """Build (once per tldextract version, ~1 s) or open the index: called by the runner outside the timeout."""
    _get_extractor()


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
