"""The offline plugins (ip_scope, geoip, domain, warninglists) answer from package data alone.

Every test runs with the network cut: a connection or name lookup is recorded and
refused, and a test that tried one fails even if the plugin swallowed the error.
The slow loads run once per module under a counting wrapper (see ``loaded``).
"""
from __future__ import annotations

import os
import socket
import sys
import time
import types
from typing import Any, Dict, Iterator, List

import pytest

from tq_mw_thehive.enrichment import offline_index
from tq_mw_thehive.enrichment.plugin import VERDICTS, Lookup, NotFound, PluginError, Result
from tq_mw_thehive.plugins import domain, geoip, ip_scope, warninglists


@pytest.fixture(autouse=True)
def own_index_directory(monkeypatch):
    """These tests place the indexes themselves: the run's shared directory (conftest) is unset."""
    monkeypatch.delenv(offline_index.ENV_DIRECTORY, raising=False)


PLUGINS = (ip_scope, geoip, domain, warninglists)
# The real loaders, for the tests that call one directly (the ``loaded`` fixture wraps them to count).
LOAD_GEOIP, LOAD_DOMAIN = geoip._load_bundled, domain._load_extractor
THEHIVE_TYPES = {"ip", "domain", "fqdn", "hostname", "url", "mail", "hash", "filename", "uri_path",
                 "user-agent", "registry", "autonomous-system", "mail-subject", "other", "file"}

_attempts: List[str] = []


def _cut_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            _attempts.append(f"{name}{tuple(a for a in args if not isinstance(a, socket.socket))}")
            raise OSError(f"network access during an offline test: {name}")
        return refused

    mp.setattr(socket.socket, "connect", refuse("connect"))
    mp.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    mp.setattr(socket, "create_connection", refuse("create_connection"))
    mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    mp.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    mp.setattr(socket, "gethostbyaddr", refuse("gethostbyaddr"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _cut_network(monkeypatch)
    del _attempts[:]
    yield
    assert _attempts == [], f"network access attempted: {_attempts}"


def test_the_network_is_really_cut() -> None:
    with pytest.raises(OSError):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
    with pytest.raises(OSError):
        socket.socket().connect(("192.0.2.1", 80))
    assert len(_attempts) == 2
    del _attempts[:]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, int]]:
    """Each slow loader wrapped to count its runs, starting from an empty module cache; loads happen lazily.
    The offline indexes go to one directory per test session (test_offline_index.py uses it too)."""
    counts = {"geoip": 0, "domain": 0, "warninglists": 0}
    offline_index.set_directory(tmp_path_factory.getbasetemp() / "offline_index")
    with pytest.MonkeyPatch.context() as mp:
        _cut_network(mp)               # the module fixture outlives any one test's cut

        def counting(name: str, loader: Any) -> Any:
            def load(*args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                return loader(*args, **kwargs)
            return load

        mp.setattr(geoip, "_bundled", None)
        mp.setattr(geoip, "_index", None)
        mp.setattr(geoip, "_open_index", counting("geoip", geoip._open_index))
        mp.setattr(domain, "_extractor", None)
        mp.setattr(domain, "_open_extractor", counting("domain", domain._open_extractor))
        mp.setattr(warninglists, "_opened", None)
        mp.setattr(warninglists, "_open", counting("warninglists", warninglists._open))
        yield counts
    offline_index.set_directory(None)


def ask(plugin: types.ModuleType, data_type: str, value: str, **settings: Any) -> Result:
    result = plugin.lookup(Lookup(data_type=data_type, value=value, settings=settings))
    assert isinstance(result, Result) and result.verdict in VERDICTS
    return result


# ---------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.__name__.rsplit(".", 1)[1])
def test_declared_constants(plugin: types.ModuleType) -> None:
    assert plugin.NAME == plugin.__name__.rsplit(".", 1)[1] and plugin.NAME == plugin.NAME.lower()
    assert isinstance(plugin.TITLE, str) and plugin.TITLE.strip()
    assert isinstance(plugin.DESCRIPTION, str) and plugin.DESCRIPTION.strip()
    assert isinstance(plugin.VERSION, str) and plugin.VERSION
    assert isinstance(plugin.DATA_TYPES, tuple) and plugin.DATA_TYPES
    assert all(isinstance(t, str) for t in plugin.DATA_TYPES) and set(plugin.DATA_TYPES) <= THEHIVE_TYPES
    assert plugin.EXTERNAL is False and plugin.ACTIVE is False and plugin.API_KEYS == {}
    assert isinstance(plugin.CACHE_TTL, int) and plugin.CACHE_TTL > 0
    assert isinstance(plugin.NEGATIVE_CACHE_TTL, int) and 0 < plugin.NEGATIVE_CACHE_TTL <= plugin.CACHE_TTL
    assert plugin.RATE_LIMIT_PER_MIN is None
    assert callable(plugin.lookup)
    assert plugin.__doc__ and "Data:" in plugin.__doc__        # says where its data comes from


def test_plugin_names_are_unique_and_titles_too() -> None:
    assert len({p.NAME for p in PLUGINS}) == len({p.TITLE for p in PLUGINS}) == len(PLUGINS)


# ---------------------------------------------------------------------------------------------- ip_scope

SCOPES = [
    # IPv4, with the edges of each range
    ("0.0.0.0", "unspecified"), ("0.0.0.1", "reserved"), ("0.255.255.255", "reserved"),
    ("1.0.0.0", "global"), ("8.8.8.8", "global"), ("9.255.255.255", "global"),
    ("10.0.0.0", "private"), ("10.255.255.255", "private"), ("11.0.0.0", "global"),
    ("100.63.255.255", "global"), ("100.64.0.0", "cgnat"), ("100.127.255.255", "cgnat"), ("100.128.0.0", "global"),
    ("126.255.255.255", "global"), ("127.0.0.0", "loopback"), ("127.0.0.1", "loopback"),
    ("127.255.255.255", "loopback"), ("128.0.0.0", "global"),
    ("169.253.255.255", "global"), ("169.254.0.0", "link-local"), ("169.254.255.255", "link-local"),
    ("169.255.0.0", "global"),
    ("172.15.255.255", "global"), ("172.16.0.0", "private"), ("172.31.255.255", "private"), ("172.32.0.0", "global"),
    ("192.0.0.0", "reserved"), ("192.0.0.8", "reserved"), ("192.0.0.9", "global"), ("192.0.0.10", "global"),
    ("192.0.0.255", "reserved"), ("192.0.1.255", "global"),
    ("192.0.2.0", "documentation"), ("192.0.2.255", "documentation"), ("192.0.3.0", "global"),
    ("192.88.99.1", "reserved"),
    ("192.167.255.255", "global"), ("192.168.0.0", "private"), ("192.168.255.255", "private"),
    ("192.169.0.0", "global"),
    ("198.17.255.255", "global"), ("198.18.0.0", "reserved"), ("198.19.255.255", "reserved"), ("198.20.0.0", "global"),
    ("198.51.99.255", "global"), ("198.51.100.0", "documentation"), ("198.51.100.255", "documentation"),
    ("198.51.101.0", "global"),
    ("203.0.112.255", "global"), ("203.0.113.0", "documentation"), ("203.0.113.255", "documentation"),
    ("203.0.114.0", "global"),
    ("223.255.255.255", "global"), ("224.0.0.0", "multicast"), ("239.255.255.255", "multicast"),
    ("240.0.0.0", "reserved"), ("255.255.255.254", "reserved"), ("255.255.255.255", "reserved"),
    # IPv6
    ("::", "unspecified"), ("::1", "loopback"), ("::2", "reserved"),
    ("::ffff:8.8.8.8", "global"), ("::ffff:10.1.2.3", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:192.0.2.1", "documentation"), ("::ffff:100.64.0.1", "cgnat"), ("::ffff:0.0.0.0", "unspecified"),
    ("64:ff9b::808:808", "global"), ("64:ff9b::1:0:0", "reserved"), ("64:ff9b:1::1", "reserved"),
    ("100::", "reserved"), ("100::ffff:ffff:ffff:ffff", "reserved"), ("100:0:0:1::1", "reserved"),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("2000::", "global"), ("2001::", "reserved"), ("2001::1", "reserved"),
    ("2001:1::1", "global"), ("2001:1::4", "reserved"), ("2001:3::1", "global"), ("2001:20::1", "global"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"), ("2001:200::", "global"),
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "global"), ("2001:db8::", "documentation"),
    ("2001:DB8:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF", "documentation"), ("2001:db9::", "global"),
    ("2001:4860:4860::8888", "global"), ("2002::1", "global"), ("2606:4700:4700::1111", "global"),
    ("3ffe:ffff::1", "global"), ("3fff::", "documentation"), ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", "documentation"),
    ("3fff:1000::", "global"), ("4000::1", "reserved"), ("5f00::1", "reserved"),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fc00::", "private"), ("fd12:3456:789a::1", "private"), ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "private"),
    ("fe00::", "reserved"), ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("fe80::", "link-local"), ("fe80::1%eth0", "link-local"), ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link-local"),
    ("fec0::1", "reserved"), ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "reserved"),
    ("ff00::", "multicast"), ("ff02::1", "multicast"), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
    # whitespace around the value is not a reason to fail
    (" 8.8.4.4\n", "global"),
]


@pytest.mark.parametrize("value, scope", SCOPES)
def test_classify(value: str, scope: str) -> None:
    assert ip_scope.classify(value) == scope


def test_every_scope_is_covered_by_the_table() -> None:
    assert {scope for _, scope in SCOPES} == set(ip_scope.SCOPES)


@pytest.mark.parametrize("value", ["", "not-an-ip", "10.0.0.0/8", "256.1.1.1", "1.2.3", "8.8.8.8:53", "[::1]", "::g"])
def test_classify_rejects_what_is_not_an_ip(value: str) -> None:
    with pytest.raises(PluginError) as caught:
        ip_scope.classify(value)
    assert type(caught.value) is PluginError


def test_classify_is_fast_enough_to_gate_every_lookup() -> None:
    values = [v for v, _ in SCOPES] * 50
    started = time.perf_counter()
    for value in values:
        ip_scope.classify(value)
    assert (time.perf_counter() - started) / len(values) < 100e-6


@pytest.mark.parametrize("value, scope", [("8.8.8.8", "global"), ("192.168.1.10", "private"), ("2001:db8::5", "documentation")])
def test_ip_scope_lookup(value: str, scope: str) -> None:
    result = ask(ip_scope, "ip", value)
    assert result.verdict == "info"
    assert result.data == {"scope": scope}
    assert result.attributes == {"IP Scope": scope}


# ---------------------------------------------------------------------------------------------- geoip

@pytest.mark.parametrize("value, country, name, as_name", [
    ("8.8.8.8", "US", "United States", "GOOGLE"),
    ("1.1.1.1", "AU", "Australia", "CLOUDFLARENET"),
    ("81.2.69.142", "GB", "United Kingdom", "Andrews & Arnold Ltd"),
    ("2001:4860:4860::8888", "US", "United States", "GOOGLE"),
    ("2606:4700:4700::1111", "US", "United States", "CLOUDFLARENET"),
    ("::ffff:8.8.8.8", "US", "United States", "GOOGLE"),     # geoip2fast alone says "Reserved for broadcast"
])
def test_geoip_bundled(loaded: Dict[str, int], value: str, country: str, name: str, as_name: str) -> None:
    result = ask(geoip, "ip", value)
    assert result.verdict == "info"
    assert result.attributes == {"GeoIP Country": country, "GeoIP Country Name": name, "GeoIP AS Name": as_name}
    assert result.data["country_code"] == country and result.data["asn"] is None
    assert result.data["source"].startswith("geoip2fast ")


@pytest.mark.parametrize("value", ["10.0.0.1", "192.168.1.1", "127.0.0.1", "100.64.1.1", "192.0.2.7",
                                   "224.0.0.1", "0.0.0.0", "::1", "fe80::1", "fd00::1", "2001:db8::1"])
def test_geoip_non_public_is_not_found(loaded: Dict[str, int], value: str) -> None:
    with pytest.raises(NotFound):
        ask(geoip, "ip", value)


def test_geoip_rejects_what_is_not_an_ip(loaded: Dict[str, int]) -> None:
    with pytest.raises(PluginError) as caught:
        ask(geoip, "ip", "example.com")
    assert type(caught.value) is PluginError


def test_geoip_drops_the_as_name_of_a_neighbouring_block(loaded: Dict[str, int]) -> None:
    # With the IPv6 file, geoip2fast names the AS block *before* an IPv4 address outside any block.
    import ipaddress
    raw = geoip._bundled_db().lookup("145.183.88.74")
    assert raw.asn_name and ipaddress.ip_address("145.183.88.74") not in ipaddress.ip_network(raw.asn_cidr)
    result = ask(geoip, "ip", "145.183.88.74")
    assert result.attributes == {"GeoIP Country": "NL", "GeoIP Country Name": "The Netherlands"}


def test_geoip_loads_once(loaded: Dict[str, int]) -> None:
    ask(geoip, "ip", "8.8.8.8")
    ask(geoip, "ip", "1.1.1.1")
    assert loaded["geoip"] == 1
    _, _, _, ipv6_sizes, source = geoip._get_index()
    assert ipv6_sizes and source.startswith("MAXMIND:")


def test_geoip_import_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "geoip2fast" or m.startswith("geoip2fast.")]:
        monkeypatch.delitem(sys.modules, name)      # so that the import really runs again
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")
    LOAD_GEOIP()
    assert "PYTHONWARNINGS" not in os.environ and os.environ["PYTHONIOENCODING"] == "latin-1"


class _FakeReader:
    RECORDS = {
        "90.1.2.3": ({"country": {"iso_code": "FR", "names": {"en": "France", "de": "Frankreich"}},
                      "autonomous_system_number": 3215, "autonomous_system_organization": "Orange"}, 12),
        "2a01:cb00::1": ({"registered_country": {"iso_code": "FR", "names": {"en": "France"}}}, 32),
    }

    def get_with_prefix_len(self, ip: str) -> Any:
        return self.RECORDS.get(ip, (None, 8))


@pytest.fixture()
def fake_maxminddb(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    opened: List[str] = []

    def open_database(path: str) -> _FakeReader:
        opened.append(path)
        if not path.endswith(".mmdb"):
            raise ValueError("not a MaxMind DB")
        return _FakeReader()

    monkeypatch.setitem(sys.modules, "maxminddb", types.SimpleNamespace(open_database=open_database))
    monkeypatch.setattr(geoip, "_mmdb_readers", {})

    def no_bundled() -> Any:
        raise AssertionError("the bundled data must not be read when mmdb_path is set")
    monkeypatch.setattr(geoip, "_bundled", None)
    monkeypatch.setattr(geoip, "_load_bundled", no_bundled)
    monkeypatch.setattr(geoip, "_index", None)
    monkeypatch.setattr(geoip, "_open_index", no_bundled)
    return opened


def test_geoip_reads_a_maxmind_database_when_configured(fake_maxminddb: List[str]) -> None:
    result = ask(geoip, "ip", "90.1.2.3", mmdb_path="/data/GeoLite2.mmdb")
    assert result.attributes == {"GeoIP Country": "FR", "GeoIP Country Name": "France",
                                 "GeoIP ASN": "AS3215", "GeoIP AS Name": "Orange"}
    assert result.data["network"] == "90.0.0.0/12" and result.data["source"] == "mmdb GeoLite2.mmdb"
    v6 = ask(geoip, "ip", "2a01:cb00::1", mmdb_path="/data/GeoLite2.mmdb")
    assert v6.attributes == {"GeoIP Country": "FR", "GeoIP Country Name": "France"}
    with pytest.raises(NotFound):
        ask(geoip, "ip", "8.8.8.8", mmdb_path="/data/GeoLite2.mmdb")
    assert fake_maxminddb == ["/data/GeoLite2.mmdb"]           # opened once for three lookups


def test_geoip_unreadable_maxmind_database_is_an_error(fake_maxminddb: List[str]) -> None:
    with pytest.raises(PluginError) as caught:
        ask(geoip, "ip", "90.1.2.3", mmdb_path="/data/not-a-database.txt")
    assert type(caught.value) is PluginError and "not-a-database.txt" in str(caught.value)


def test_geoip_without_maxminddb_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "maxminddb", None)          # makes "import maxminddb" fail
    monkeypatch.setattr(geoip, "_mmdb_readers", {})
    with pytest.raises(PluginError) as caught:
        ask(geoip, "ip", "90.1.2.3", mmdb_path="/data/GeoLite2.mmdb")
    assert type(caught.value) is PluginError and "pip install maxminddb" in str(caught.value)


# ---------------------------------------------------------------------------------------------- domain

@pytest.mark.parametrize("data_type, value, registered, suffix, subdomain", [
    ("domain", "example.com", "example.com", "com", ""),
    ("domain", "Example.COM.", "example.com", "com", ""),
    ("fqdn", "a.b.example.co.uk", "example.co.uk", "co.uk", "a.b"),
    ("hostname", "www.worldbank.org.kg", "worldbank.org.kg", "org.kg", "www"),
    ("hostname", "city.kawasaki.jp", "city.kawasaki.jp", "kawasaki.jp", ""),     # PSL exception rule
    ("hostname", "a.b.c.kawasaki.jp", "b.c.kawasaki.jp", "c.kawasaki.jp", "a"),  # PSL wildcard rule
    ("url", "https://user:pw@Forums.BBC.co.uk:8443/path?q=1#x", "bbc.co.uk", "co.uk", "forums"),
    ("url", "hxxp://evil.example.com.au/payload.exe", "example.com.au", "com.au", "evil"),
    ("url", "www.example.org/no/scheme", "example.org", "org", "www"),
    ("mail", "Alice@Mail.Example.COM", "example.com", "com", "mail"),
    ("mail", "<bob@example.co.jp>", "example.co.jp", "co.jp", ""),
    ("domain", "пример.рф", "пример.рф", "рф", ""),                              # IDN, Unicode
    ("domain", "xn--e1afmkfd.xn--p1ai", "xn--e1afmkfd.xn--p1ai", "xn--p1ai", ""),  # the same, punycode
    ("fqdn", "bücher.example.de", "example.de", "de", "bücher"),
    ("fqdn", "foo.github.io", "github.io", "io", "foo"),                          # PSL private part off
])
def test_domain(loaded: Dict[str, int], data_type: str, value: str, registered: str, suffix: str,
                subdomain: str) -> None:
    result = ask(domain, data_type, value)
    assert result.verdict == "info"
    assert result.attributes == {"Registered Domain": registered, "Public Suffix": suffix}
    assert result.data["registered_domain"] == registered and result.data["subdomain"] == subdomain


def test_domain_private_suffixes_on_request(loaded: Dict[str, int]) -> None:
    result = ask(domain, "fqdn", "foo.github.io", private_suffixes=True)
    assert result.attributes == {"Registered Domain": "foo.github.io", "Public Suffix": "github.io"}
    assert result.data["private_suffix"] is True


@pytest.mark.parametrize("data_type, value", [
    ("domain", "co.uk"), ("domain", "com"), ("hostname", "localhost"), ("hostname", "WS-0042"),
    ("url", "http://192.0.2.1/x"), ("url", "http://[2001:db8::1]:8080/"), ("domain", "example.invalid"),
    ("mail", "root@localhost"),
])
def test_domain_without_registered_domain_is_not_found(loaded: Dict[str, int], data_type: str, value: str) -> None:
    with pytest.raises(NotFound):
        ask(domain, data_type, value)


def test_domain_mail_without_at_is_an_error(loaded: Dict[str, int]) -> None:
    with pytest.raises(PluginError) as caught:
        ask(domain, "mail", "no-at-sign.example.com")
    assert type(caught.value) is PluginError


def test_domain_loads_once(loaded: Dict[str, int]) -> None:
    ask(domain, "domain", "example.com")
    ask(domain, "url", "https://example.net/")
    assert loaded["domain"] == 1


def test_domain_never_fetches_nor_writes_a_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # The environment that would make a default TLDExtract fetch a list and cache it here.
    monkeypatch.setenv("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "https://psl.invalid/public_suffix_list.dat")
    monkeypatch.setenv("TLDEXTRACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    extractor = LOAD_DOMAIN()
    assert extractor("forums.bbc.co.uk").suffix == "co.uk"
    assert list(tmp_path.iterdir()) == []
    assert _attempts == []


# ---------------------------------------------------------------------------------------------- warninglists

RESOLVERS_V4 = "List of known IPv4 public DNS resolvers"


def test_warninglists_known_resolver_is_safe(loaded: Dict[str, int]) -> None:
    result = ask(warninglists, "ip", "8.8.8.8")
    assert result.verdict == "safe"
    assert RESOLVERS_V4 in result.data["lists"]
    assert result.data["lists"] == sorted(result.data["lists"])
    assert result.attributes == {"MISP Warning List": "; ".join(result.data["lists"])}


@pytest.mark.parametrize("data_type, value, expected", [
    ("ip", "1.1.1.1", RESOLVERS_V4),
    ("ip", "::ffff:9.9.9.9", RESOLVERS_V4),
    ("ip", "2001:4860:4860::8888", "List of known IPv6 public DNS resolvers"),
    ("ip", "10.20.30.40", "List of RFC 1918 CIDR blocks"),        # inside a listed CIDR, not listed itself
    ("domain", "google.com", "List of known google domains"),
    ("fqdn", "zz-unlisted-label.google.com", "Top 1,000,000 most-used sites from Tranco"),  # parent domain
    ("url", "HTTPS://WWW.Google.com/search?q=x", "Top 1,000,000 most-used sites from Tranco"),
    ("mail", "someone@mailinator.com", "List of disposable email domains"),
    ("mail", "Abuse@example.org", "Common contact e-mail addresses"),                       # a regex list
    ("hash", "D41D8CD98F00B204E9800998ECF8427E", "List of known hashes for empty files"),  # any case
    ("hash", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "List of known hashes for empty files"),
])
def test_warninglists_match(loaded: Dict[str, int], data_type: str, value: str, expected: str) -> None:
    result = ask(warninglists, data_type, value)
    assert expected in result.data["lists"]
    assert result.verdict == ("info" if result.data["not_benign"] else "safe")


def test_warninglists_a_vpn_or_datacenter_range_alone_is_no_evidence(loaded: Dict[str, int]) -> None:
    # An address the bundled lists place only in the VPN/datacenter list (found when this was written).
    names = warninglists.search("ip", "136.2.0.1")
    assert names and all(warninglists.NEUTRAL.search(n) for n in names)
    result = ask(warninglists, "ip", "136.2.0.1")
    assert result.verdict == "info" and result.data["not_benign"] == []


@pytest.mark.parametrize("data_type, value", [
    ("fqdn", "evil-login.duckdns.org"),        # dynamic DNS, though duckdns.org is a top site
    ("mail", "someone@mailinator.com"),        # disposable e-mail
])
def test_warninglists_never_calls_well_known_abuse_infrastructure_safe(loaded: Dict[str, int], data_type: str,
                                                                       value: str) -> None:
    result = ask(warninglists, data_type, value)
    assert result.verdict == "info" and result.data["not_benign"]


@pytest.mark.parametrize("data_type, value", [
    ("domain", "zq8v3kx1-unlisted-7f2c.com"),
    ("url", "http://zq8v3kx1-unlisted-7f2c.com/a"),
    ("mail", "j.doe@zq8v3kx1-unlisted-7f2c.com"),
    ("hash", "0" * 63 + "1"),
    ("ip", "2a0c:9a40:8000:1234::1"),
    ("domain", "d41d8cd98f00b204e9800998ecf8427e"),    # hash lists are only searched for hashes
])
def test_warninglists_unlisted_is_not_found(loaded: Dict[str, int], data_type: str, value: str) -> None:
    with pytest.raises(NotFound):
        ask(warninglists, data_type, value)


def test_warninglists_rejects_a_bad_ip(loaded: Dict[str, int]) -> None:
    with pytest.raises(PluginError) as caught:
        ask(warninglists, "ip", "8.8.8")
    assert type(caught.value) is PluginError


def test_warninglists_loads_once(loaded: Dict[str, int]) -> None:
    ask(warninglists, "ip", "8.8.8.8")
    ask(warninglists, "domain", "google.com")
    assert loaded["warninglists"] == 1
    assert len(warninglists._get_index().lists) > 100
