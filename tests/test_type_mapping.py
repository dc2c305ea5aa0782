"""type_mapping: the default table row by row, the custom-mapping parser, from_config."""
from __future__ import annotations

import pytest

from tq_mw_thehive.config import SyncConfig
from tq_mw_thehive.type_mapping import (DEFAULT_RULES, TypeMapping, TypeMappingError, hash_type,
                                        parse)

HEX32, HEX40, HEX64, HEX96, HEX128 = ("d41d8cd98f00b204e9800998ecf8427e",
                                      "ff7b2c3938306261881c42e78d0df51d9bcdd574",
                                      "e3b0c44298fc1c149afbf4c8996fb924" * 2,
                                      "38b060a751ac96384cd9327eb1b1e36a" * 3,
                                      "cf83e1357eefb8bdf1542850d66d8007" * 4)

# ThreatQ's default indicator types (docs/threatq-api-subset.md, GET /api/indicator/types)
THREATQ_DEFAULT_TYPES = {"ASN", "CIDR Block", "Email Address", "Email Subject", "Filename", "FQDN",
                         "IP Address", "IPv6 Address", "MD5", "Registry Key", "SHA-1", "SHA-256",
                         "SHA-384", "SHA-512", "String", "URL", "URL Path", "User-agent", "Username"}

# --- the default table: one row per mapping ---------------------------------------------------

MAPPED = [
    # dataType, value, ThreatQ type
    ("url", "https://login.example.net/finance/auth.php", "URL"),
    ("domain", "example.net", "FQDN"),
    ("fqdn", "login.example.net", "FQDN"),
    ("hostname", "mail01.corp.example.org", "FQDN"),
    ("ip", "203.0.113.47", "IP Address"),
    ("ip", "10.0.0.1", "IP Address"),
    ("ip", "2001:db8::1", "IPv6 Address"),                              # compressed
    ("ip", "2001:0db8:0000:0000:0000:0000:0000:0001", "IPv6 Address"),  # full form
    ("ip", "2001:DB8:85A3::8A2E:370:7334", "IPv6 Address"),            # upper case
    ("ip", "::1", "IPv6 Address"),
    ("ip", "::", "IPv6 Address"),
    ("ip", "::ffff:1.2.3.4", "IPv6 Address"),                           # IPv4-mapped, dotted tail
    ("ip", "64:ff9b::192.0.2.33", "IPv6 Address"),                      # NAT64, dotted tail
    ("ip", "fe80::1%eth0", "IPv6 Address"),                             # with a zone index
    ("ip", "not-an-address", "IP Address"),                             # ThreatQ judges the value
    ("mail", "ceo@example.org", "Email Address"),
    ("mail-subject", "Urgent: invoice overdue", "Email Subject"),
    ("filename", "invoice.pdf.exe", "Filename"),
    ("uri_path", "/finance/auth.php", "URL Path"),
    ("user-agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "User-agent"),
    ("registry", r"HKLM\Software\Microsoft\Windows\CurrentVersion\Run\updater", "Registry Key"),
    ("autonomous-system", "AS64496", "ASN"),
    ("hash", HEX32, "MD5"),
    ("hash", HEX40, "SHA-1"),
    ("hash", HEX64, "SHA-256"),
    ("hash", HEX96, "SHA-384"),
    ("hash", HEX128, "SHA-512"),
    ("hash", HEX64.upper(), "SHA-256"),
    ("hash", f"  {HEX32}\n", "MD5"),                                     # surrounding whitespace
    ("file", HEX32, "MD5"),                                             # attachment hashes
    ("file", HEX40, "SHA-1"),
    ("file", HEX64, "SHA-256"),
]


@pytest.mark.parametrize("data_type, value, expected", MAPPED)
def test_default_mapping_row(data_type, value, expected):
    assert TypeMapping.default().resolve(data_type, value) == (expected, None)


SKIPPED = [
    # dataType, value, words the reason must contain
    ("other", "anything at all", ["'other'", "not mapped"]),
    ("regexp", "^evil.*$", ["'regexp'", "not mapped"]),
    ("my-custom-type", "x", ["'my-custom-type'", "not mapped"]),
    ("IP", "192.0.2.1", ["'IP'", "not mapped"]),                       # type names are exact
    ("", "x", ["''", "not mapped"]),
    ("hash", "z" * 32, ["not hexadecimal"]),
    ("hash", "0x" + "a" * 30, ["not hexadecimal"]),
    ("hash", "d41d8cd9-8f00-b204-e980-0998ecf8427e", ["not hexadecimal"]),
    ("hash", "a" * 33, ["33 hex digits"]),                               # odd length
    ("hash", "a" * 31, ["31 hex digits"]),
    ("hash", "a" * 56, ["56 hex digits"]),                               # SHA-224: no ThreatQ type
    ("file", "invoice.pdf", ["not hexadecimal"]),
    ("url", "", ["empty value"]),
    ("ip", "   ", ["empty value"]),
]


@pytest.mark.parametrize("data_type, value, words", SKIPPED)
def test_default_mapping_skips_with_a_reason(data_type, value, words):
    indicator_type, reason = TypeMapping.default().resolve(data_type, value)
    assert indicator_type is None
    assert reason is not None
    for word in words:
        assert word in reason


def test_every_default_datatype_has_a_row():
    """The tables above cover every TheHive default dataType (and nothing is silently mapped)."""
    thehive_defaults = {"url", "other", "user-agent", "regexp", "mail-subject", "registry", "mail",
                        "autonomous-system", "domain", "ip", "uri_path", "filename", "hash",
                        "file", "fqdn", "hostname"}
    covered = {row[0] for row in MAPPED} | {row[0] for row in SKIPPED}
    assert thehive_defaults <= covered
    assert set(DEFAULT_RULES) == thehive_defaults - {"other", "regexp"}


def test_long_values_are_cut_in_reasons():
    reason = TypeMapping.default().resolve("hash", "q" * 10_000)[1]
    assert reason is not None and len(reason) < 200


def test_hash_type_helper():
    assert hash_type(HEX96) == ("SHA-384", None)
    assert hash_type("") == (None, "hash '' is not hexadecimal")


# --- indicator_types --------------------------------------------------------------------------

def test_default_indicator_types_are_threatq_defaults():
    types = TypeMapping.default().indicator_types()
    assert types == {"URL", "FQDN", "IP Address", "IPv6 Address", "Email Address", "Email Subject",
                     "Filename", "URL Path", "User-agent", "Registry Key", "ASN",
                     "MD5", "SHA-1", "SHA-256", "SHA-384", "SHA-512"}
    assert types <= THREATQ_DEFAULT_TYPES


@pytest.mark.parametrize("rules, expected", [
    ({}, set()),
    ({"ip": "IP Address"}, {"IP Address", "IPv6 Address"}),
    ({"hash": "SHA-256"}, {"SHA-256"}),
    ({"hash": "hash"}, {"MD5", "SHA-1", "SHA-256", "SHA-384", "SHA-512"}),
    ({"file": "hash"}, {"MD5", "SHA-1", "SHA-256", "SHA-384", "SHA-512", "Filename"}),
    ({"file": "SHA-256"}, {"SHA-256", "Filename"}),
    ({"domain": "String", "fqdn": "String"}, {"String"}),
])
def test_indicator_types_of_custom_rules(rules, expected):
    assert TypeMapping(rules).indicator_types() == expected


# --- custom rules resolve ---------------------------------------------------------------------

def test_custom_hash_target_is_used_as_is():
    mapping = TypeMapping({"hash": "SHA-256"})
    assert mapping.resolve("hash", HEX32) == ("SHA-256", None)
    assert mapping.resolve("hash", "not hex") == ("SHA-256", None)


def test_ipv6_only_refines_ip_address():
    mapping = TypeMapping({"ip": "String", "ip6": "IP Address"})
    assert mapping.resolve("ip", "2001:db8::1") == ("String", None)
    assert mapping.resolve("ip6", "2001:db8::1") == ("IPv6 Address", None)
    assert mapping.resolve("ip6", "192.0.2.1") == ("IP Address", None)


def test_by_length_works_for_any_custom_type():
    assert TypeMapping({"sha": "hash"}).resolve("sha", HEX64) == ("SHA-256", None)


def test_default_is_a_fresh_copy():
    first = TypeMapping.default()
    first.rules["url"] = "String"
    assert TypeMapping.default().resolve("url", "http://x") == ("URL", None)


# --- the parser -------------------------------------------------------------------------------

def test_parse_valid_text():
    text = (
        "# TheHive observable type: ThreatQ indicator type\n"
        "\n"
        "ip: IP Address\n"
        "   hash   :   hash   \n"
        "\t# an indented comment: ignored\n"
        "domain:FQDN\n"
        "sha256-custom: SHA-256\r\n"
        "user-agent: User-agent\n"
        "   \n"
        "note: Threat Actor: alias\n"
    )
    assert parse(text) == {
        "ip": "IP Address",
        "hash": "hash",
        "domain": "FQDN",
        "sha256-custom": "SHA-256",
        "user-agent": "User-agent",
        "note": "Threat Actor: alias",  # split at the first colon only
    }


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n"])
def test_parse_nothing(text):
    assert parse(text) == {}


MALFORMED = [
    # text, line number, words the message must contain
    ("ip: IP Address\nurl URL\n", 2, ["no colon", "'url URL'"]),
    ("# header\n\n: URL\n", 3, ["empty observable type", "': URL'"]),
    ("ip: IP Address\nurl:\n", 2, ["empty ThreatQ indicator type", "'url:'"]),
    ("url:    \n", 1, ["empty ThreatQ indicator type"]),
    ("ip: IP Address\nurl: URL\n\nip: String\n", 4,
     ["'ip' is already mapped on line 1", "'ip: String'"]),
    ("hash: hash\n# again\nhash : SHA-256\n", 3, ["'hash' is already mapped on line 1"]),
]


@pytest.mark.parametrize("text, line, words", MALFORMED)
def test_parse_malformed(text, line, words):
    with pytest.raises(TypeMappingError) as caught:
        parse(text)
    assert caught.value.line == line
    message = str(caught.value)
    assert message.startswith(f"sync.type_mapping line {line}: ")
    for word in words:
        assert word in message


def test_type_mapping_error_is_a_value_error():
    assert issubclass(TypeMappingError, ValueError)


# --- from_config ------------------------------------------------------------------------------

def test_from_config_default_ignores_the_text():
    mapping = TypeMapping.from_config(SyncConfig(custom_mapping=False, type_mapping="ip: String"))
    assert mapping == TypeMapping.default()


def test_from_config_custom_replaces_the_default():
    sync = SyncConfig(custom_mapping=True, type_mapping="ip: IP Address\nhash: SHA-256\n")
    mapping = TypeMapping.from_config(sync)
    assert mapping.rules == {"ip": "IP Address", "hash": "SHA-256"}
    assert mapping.resolve("hash", HEX32) == ("SHA-256", None)
    indicator_type, reason = mapping.resolve("url", "http://x")
    assert indicator_type is None and "not mapped" in reason


def test_from_config_custom_malformed_raises():
    with pytest.raises(TypeMappingError) as caught:
        TypeMapping.from_config(SyncConfig(custom_mapping=True, type_mapping="ip IP Address"))
    assert caught.value.line == 1
