"""The offline indexes (issue 18): built once per data version, atomically, safe against two
builders; and the warning-list lookup through the index answers exactly as the in-memory
matcher it replaced, itself on the lists pymispwarninglists loads.

The reference (``Reference``) is the plugin's previous code, kept here verbatim in substance: every
list read by ``pymispwarninglists.WarningLists(slow_search=False)`` and matched in Python
objects. The parity test runs every list's own entries (a sample of each, with variants: a
subdomain, a URL, a mail address, an address inside a network) and a fixed set of IPs, CIDRs,
domains, host names, hashes and URLs through both, for every data type, and compares the
matched lists.
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import re
import sqlite3
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, List, Set, Tuple

import pytest

from tq_mw_thehive.enrichment import offline_index
from tq_mw_thehive.plugins import warninglists


@pytest.fixture(autouse=True)
def own_index_directory(monkeypatch):
    """These tests place the indexes themselves: the run's shared directory (conftest) is unset."""
    monkeypatch.delenv(offline_index.ENV_DIRECTORY, raising=False)



@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One index directory for the session (test_plugin_offline uses the same), so the index is built once."""
    path = tmp_path_factory.getbasetemp() / "offline_index"
    offline_index.set_directory(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warninglists, "_opened", None)
        yield path
    offline_index.set_directory(None)


@pytest.fixture(autouse=True)
def keep_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that points the indexes elsewhere gives the module's directory back afterwards (never the
    fallback under the home directory)."""
    monkeypatch.setattr(offline_index, "_configured", offline_index._configured)
    monkeypatch.setattr(offline_index, "_chosen", offline_index._chosen)


# ---------------------------------------------------------------------------------------------- the reference

@dataclass
class _List:
    name: str
    kind: str
    applies_to: FrozenSet[str]
    exact: FrozenSet[str] = frozenset()
    substrings: Tuple[str, ...] = ()
    patterns: Tuple["re.Pattern[str]", ...] = ()
    prefixes: Dict[Tuple[int, int], Set[int]] = field(default_factory=dict)
    entries: List[str] = field(default_factory=list)


def _reference_list(name: str, kind: str, entries: List[str], matching: List[str]) -> _List:
    entry = _List(name=name, kind=kind, applies_to=warninglists._applies(matching), entries=list(entries))
    if kind in ("string", "hostname"):
        strip = ". " if kind == "hostname" else " "
        entry.exact = frozenset(e.strip(strip).lower() for e in entries)
    elif kind == "substring":
        entry.substrings = tuple(sorted({e.lower() for e in entries if e}))
    elif kind == "regex":
        entry.patterns = tuple(p for p in map(warninglists._php_regex, entries) if p is not None)
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


def _reference_matches(wl: _List, q: Any) -> bool:
    if wl.kind == "string":
        return q.text in wl.exact
    if wl.kind == "hostname":
        host = q.host if q.host is not None else q.text
        return any(h in wl.exact for h in warninglists._parents(host))
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


class Reference:
    def __init__(self) -> None:
        from pymispwarninglists import WarningLists
        self.lists = [_reference_list(wl.name, wl.type, wl.list, list(getattr(wl, "matching_attributes", None) or ()))
                      for wl in WarningLists(slow_search=False).values()]

    def search(self, data_type: str, value: str) -> List[str]:
        query = warninglists._query(data_type, value)
        return sorted(wl.name for wl in self.lists if data_type in wl.applies_to and _reference_matches(wl, query))


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


# ---------------------------------------------------------------------------------------------- parity

TYPES = ("ip", "domain", "fqdn", "hostname", "url", "mail", "hash")
FIXED = [
    "8.8.8.8", "1.1.1.1", "9.9.9.9", "10.20.30.40", "192.168.1.1", "127.0.0.1", "100.64.0.1", "136.2.0.1",
    "::ffff:9.9.9.9", "2001:4860:4860::8888", "2606:4700:4700::1111", "fe80::1", "2a0c:9a40:8000:1234::1",
    "13.32.0.1", "52.95.110.1", "104.16.0.1", "20.33.0.1", "35.190.0.1",
    "10.0.0.0/8", "192.168.0.0/16", "8.8.8.0/24", "2001:db8::/32", "fc00::/7",
    "google.com", "www.google.com", "zz-unlisted-label.google.com", "evil-login.duckdns.org", "mailinator.com",
    "bit.ly", "example.com", "example.org", "localhost", "wpad", "zq8v3kx1-unlisted-7f2c.com", "amazonaws.com",
    "s3.amazonaws.com", "github.io", "foo.github.io", "WWW.Microsoft.COM.", "login.microsoftonline.com",
    "https://www.google.com/search?q=x", "HTTPS://WWW.Google.com/search?q=x", "http://8.8.8.8/dns",
    "http://[2001:4860:4860::8888]/", "http://zq8v3kx1-unlisted-7f2c.com/a", "www.example.org/no/scheme",
    "someone@mailinator.com", "Abuse@example.org", "postmaster@google.com", "j.doe@zq8v3kx1-unlisted-7f2c.com",
    "d41d8cd98f00b204e9800998ecf8427e", "D41D8CD98F00B204E9800998ECF8427E",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "0" * 63 + "1",
    "", " ", ".", "..", "a" * 300, "xn--e1afmkfd.xn--p1ai",
]


def _variants(wl: _List, entry: str) -> List[str]:
    entry = entry.strip()
    out = [entry, entry.upper()]
    if wl.kind == "cidr":
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return out
        out.append(str(net.network_address))
        out.append(str(net.broadcast_address))
        if net.num_addresses > 2:
            out.append(str(net.network_address + net.num_addresses // 2))
        out.append(str(net.broadcast_address + 1) if int(net.broadcast_address) < (2 ** net.max_prefixlen - 1)
                   else str(net.network_address - 1))
    elif wl.kind == "hostname" or wl.kind == "string":
        host = entry.strip(". ")
        out += [f"zz-sub.{host}", f"https://zz-sub.{host}/path", f"user@{host}", f"{host}.zz-not-a-parent"]
    else:       # substring, regex
        out += [f"zz{entry}zz", f"https://x.example/{entry}"]
    return out


def _sample(entries: List[str], n: int = 10) -> List[str]:
    if len(entries) <= 2 * n:
        return list(entries)
    step = len(entries) // n
    return list(entries[:n]) + [entries[i] for i in range(0, len(entries), step)] + list(entries[-5:])


def _same(reference: Reference, data_type: str, value: str) -> Tuple[Any, Any]:
    try:
        expected: Any = reference.search(data_type, value)
    except Exception as exc:
        expected = type(exc).__name__
    try:
        got: Any = warninglists.search(data_type, value)
    except Exception as exc:
        got = type(exc).__name__
    return expected, got


def test_every_lists_samples_match_the_same_lists(index_dir: Path, reference: Reference) -> None:
    checked, mismatches, matched = 0, [], 0
    for wl in reference.lists:
        for entry in _sample(wl.entries):
            for value in _variants(wl, entry):
                for data_type in TYPES:
                    expected, got = _same(reference, data_type, value)
                    checked += 1
                    matched += bool(expected and isinstance(expected, list))
                    if expected != got:
                        mismatches.append((wl.name, data_type, value, expected, got))
    assert not mismatches[:20], f"{len(mismatches)} of {checked} differ"
    assert len(reference.lists) > 100 and checked > 20_000 and matched > checked // 10


def test_a_fixed_set_of_values_matches_the_same_lists(index_dir: Path, reference: Reference) -> None:
    mismatches = [(t, v, *_same(reference, t, v)) for v in FIXED for t in TYPES]
    assert [m for m in mismatches if m[2] != m[3]] == []
    assert sum(1 for m in mismatches if isinstance(m[2], list) and m[2]) > 40


def test_the_lookup_reads_no_json_and_loads_no_list(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warninglists._get_index()                               # built (or found) once
    monkeypatch.setattr(warninglists, "_opened", None)
    monkeypatch.setattr(warninglists, "_build", lambda conn: pytest.fail("rebuilt an index that exists"))

    def no_json(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the JSON lists were read")
    monkeypatch.setattr(warninglists.json, "load", no_json)
    assert "List of known IPv4 public DNS resolvers" in warninglists.search("ip", "8.8.8.8")
    index = warninglists._get_index()
    assert sum(len(v) for _, v in index.substrings) < 10_000   # only the small parts live in memory


# ---------------------------------------------------------------------------------------------- build

def _tiny_build(calls: List[int], rows: int = 3):
    def build(conn: sqlite3.Connection) -> Dict[str, object]:
        calls.append(os.getpid())
        conn.execute("CREATE TABLE t (v INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
        return {"rows": rows}
    return build


def test_built_once_per_data_version_then_rebuilt_for_a_new_one(tmp_path: Path) -> None:
    offline_index.set_directory(tmp_path / "idx")
    try:
        calls: List[int] = []
        first = offline_index.ensure("tiny", "1.0", _tiny_build(calls))
        again = offline_index.ensure("tiny", "1.0", _tiny_build(calls))
        assert first == again and len(calls) == 1
        assert stat.S_IMODE(first.stat().st_mode) == 0o600
        assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
        newer = offline_index.ensure("tiny", "1.1", _tiny_build(calls, rows=5))
        assert len(calls) == 2 and newer != first and not first.exists()      # the old version removed
        assert offline_index.connect(newer).execute("SELECT count(*) FROM t").fetchone() == (5,)
        assert sorted(p.name for p in newer.parent.iterdir()) == [".tiny.lock", newer.name]   # no temp left
    finally:
        offline_index.set_directory(None)


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path: Path) -> None:
    offline_index.set_directory(tmp_path / "idx")
    try:
        def broken(conn: sqlite3.Connection) -> Dict[str, object]:
            conn.execute("CREATE TABLE t (v INTEGER)")
            raise RuntimeError("disk full")
        with pytest.raises(RuntimeError):
            offline_index.ensure("tiny", "1.0", broken)
        assert [p.name for p in (tmp_path / "idx").iterdir()] == [".tiny.lock"]
        calls: List[int] = []
        path = offline_index.ensure("tiny", "1.0", _tiny_build(calls))
        assert calls and offline_index.connect(path).execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        offline_index.set_directory(None)


def test_a_truncated_index_is_rebuilt(tmp_path: Path) -> None:
    offline_index.set_directory(tmp_path / "idx")
    try:
        calls: List[int] = []
        path = offline_index.ensure("tiny", "1.0", _tiny_build(calls))
        path.write_bytes(path.read_bytes()[:100])
        assert offline_index.ensure("tiny", "1.0", _tiny_build(calls)) == path and len(calls) == 2
        assert offline_index.connect(path).execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        offline_index.set_directory(None)


def _build_in_child(directory: str, start: Any, results: Any) -> None:
    offline_index.set_directory(directory)
    calls: List[int] = []
    start.wait(30)
    path = offline_index.ensure("tiny", "1.0", _tiny_build(calls, rows=50_000))
    count = offline_index.connect(path).execute("SELECT count(*) FROM t").fetchone()[0]
    results.put((len(calls), count))


def test_two_processes_starting_together_build_once_and_both_read_a_whole_index(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "idx"), start, results)) for _ in range(2)]
    for child in children:
        child.start()
    start.set()
    got = sorted(results.get(timeout=60) for _ in children)
    for child in children:
        child.join(30)
    assert got == [(0, 50_000), (1, 50_000)]          # one built, the other waited and read it


def test_threads_of_one_process_build_once(tmp_path: Path) -> None:
    offline_index.set_directory(tmp_path / "idx")
    try:
        calls: List[int] = []
        paths: List[Path] = []
        barrier = threading.Barrier(4)

        def run() -> None:
            barrier.wait(10)
            paths.append(offline_index.ensure("tiny", "1.0", _tiny_build(calls)))
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 4
    finally:
        offline_index.set_directory(None)


def test_the_directory_falls_back_when_the_state_dir_is_not_writable(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    offline_index.set_directory(blocker / "offline_index")
    try:
        assert offline_index.directory() == tmp_path / "xdg" / "tq_mw_thehive"
        assert "is not writable; using" in caplog.text
    finally:
        offline_index.set_directory(None)


def test_the_directory_belongs_to_the_state_database() -> None:
    assert offline_index.for_local_dir("/var/lib/tq") == Path("/var/lib/tq/offline_index")


# ---------------------------------------------------------------------------------------------- geoip

def _geoip_answer(fn: Any, address: Any) -> Any:
    from tq_mw_thehive.enrichment.plugin import NotFound
    try:
        return fn(address)
    except NotFound:
        return "not found"


def test_geoip_index_answers_as_geoip2fast(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Country code and name, network and AS name, for the edges of a sample of geoip2fast's own networks
    (country and AS blocks: first, last, one past the last) and a fixed set of addresses."""
    import random
    from geoip2fast import geoip2fast as g

    from tq_mw_thehive.plugins import geoip, ip_scope
    monkeypatch.setattr(geoip, "_index", None)
    raw = geoip._bundled_db()
    geoip.prepare()
    numbers: Set[int] = set()
    rng = random.Random(18)
    for firsts, lens in ((g.mainListFirstIP, g.mainListNetlength), (g.mainListFirstIPASN, g.mainListNetlengthASN)):
        flat = [(f, n) for fs, ns in zip(firsts, lens) for f, n in zip(fs, ns)]
        for first, netlen in rng.sample(flat, 1500) + flat[:50] + flat[-50:]:
            size = 2 ** ((32 if first < 2 ** 32 else 128) - netlen)
            numbers.update({first, first + size - 1, first + size, first + size // 2})
    numbers.update(rng.randrange(2 ** 32) for _ in range(2000))
    numbers.update((0x2000 << 112) + rng.randrange(2 ** 125) for _ in range(1000))
    addresses = [ipaddress.ip_address(n) if n < 2 ** 32 else ipaddress.IPv6Address(n)
                 for n in numbers if n < 2 ** 128]
    addresses += [ipaddress.ip_address(v) for v in ("8.8.8.8", "1.1.1.1", "81.2.69.142", "145.183.88.74",
                                                     "2001:4860:4860::8888", "2606:4700:4700::1111", "9.9.9.9")]
    checked, found, differ = 0, 0, []
    for address in addresses:
        if ip_scope.classify(str(address)) != "global":
            continue                            # the plugin never looks these up
        expected, got = _geoip_answer(geoip._from_bundled, address), _geoip_answer(geoip._from_index, address)
        checked += 1
        found += expected != "not found"
        if expected != got:
            differ.append((str(address), expected, got))
    assert differ[:10] == [], f"{len(differ)} of {checked} differ"
    assert checked > 5000 and found > checked // 2
    assert raw.asn and raw.ipv6


def test_a_build_named_by_module_runs_in_a_child_and_its_failure_is_reported(tmp_path: Path) -> None:
    offline_index.set_directory(tmp_path / "idx")
    try:
        with pytest.raises(RuntimeError, match="has no attribute 'no_such_builder'"):
            offline_index.ensure("tiny", "1.0", "json:no_such_builder")
        assert [p.name for p in (tmp_path / "idx").iterdir()] == [".tiny.lock"]
    finally:
        offline_index.set_directory(None)


# ---------------------------------------------------------------------------------------------- domain

def test_domain_index_extracts_as_tldextract_for_every_suffix(index_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rule of the bundled Public Suffix List (ICANN and private), as a host, under a name, under
    two labels, inside a URL and a mail address, with and without private suffixes: the same
    subdomain, domain, suffix and is_private as tldextract with its tries in memory."""
    from tq_mw_thehive.plugins import domain
    monkeypatch.setattr(domain, "_extractor", None)
    reference = domain._load_extractor()
    on_disk = domain._get_extractor()
    assert on_disk is not reference
    psl = reference._get_tld_extractor()
    rules = sorted(psl.tlds_incl_private)
    hosts = ["example.com", "localhost", "WS-0042", "192.0.2.1", "[2001:db8::1]", "", ".", "a..b.com",
             "city.kawasaki.jp", "a.b.c.kawasaki.jp", "пример.рф", "xn--e1afmkfd.xn--p1ai", "bücher.example.de"]
    for rule in rules:
        plain = rule.lstrip("!*.")
        hosts += [plain, f"zz.{plain}", f"a.b.{plain}", f"https://u:p@Www.Zz.{plain}:8443/x?q=1", f"x@zz.{plain}"]
    checked, differ = 0, []
    for host in hosts:
        for private in (False, True):
            expected, got = reference(host, include_psl_private_domains=private), \
                on_disk(host, include_psl_private_domains=private)
            checked += 1
            if expected != got:           # a dataclass: subdomain, domain, suffix, is_private
                differ.append((host, private, expected, got))
    assert differ[:10] == [], f"{len(differ)} of {checked} differ"
    assert len(rules) > 5000 and checked > 50_000
