"""Which ThreatQ indicator type a TheHive observable becomes.

The default table is OUR RECONSTRUCTION, not the vendor guide's table (which we do not have):
it pairs TheHive's default observable dataTypes (TheHive 4 ``ObservableType.scala``, assumed
unchanged in TheHive 5) with ThreatQ's default indicator type names. Two rules depend on the
value rather than the type name alone:

- ``IP Address`` becomes ``IPv6 Address`` for an IPv6 value, because TheHive has a single
  ``ip`` type while ThreatQ keeps the two apart.
- ``hash`` (the word itself as the target) means "by hex length": 32 MD5, 40 SHA-1,
  64 SHA-256, 96 SHA-384, 128 SHA-512, because TheHive has a single ``hash`` type.

``file`` maps each attachment hash (by length) and adds a ``Filename`` indicator for the
attachment name (see ``mapping.map_observable``). ``other``, ``regexp`` and unknown types are
not mapped: they are skipped with a reason, never an error, so one odd observable cannot stop
a case from syncing.

``sync.custom_mapping: true`` replaces the table with ``sync.type_mapping``, one
``<Observable Type>: <ThreatQ Indicator Type>`` per line (the guide's format), read by ``parse``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Dict, Optional, Set, Tuple

from tq_mw_thehive.config import SyncConfig

BY_LENGTH = "hash"                  # target meaning "choose the hash type by hex length"
IP_ADDRESS = "IP Address"
IPV6_ADDRESS = "IPv6 Address"
FILENAME = "Filename"
FILE = "file"                       # TheHive's attachment dataType

HASH_TYPES: Dict[int, str] = {32: "MD5", 40: "SHA-1", 64: "SHA-256", 96: "SHA-384", 128: "SHA-512"}

DEFAULT_RULES: Dict[str, str] = {
    "url": "URL",
    "domain": "FQDN",
    "fqdn": "FQDN",
    "hostname": "FQDN",
    "ip": IP_ADDRESS,
    "mail": "Email Address",
    "mail-subject": "Email Subject",
    "filename": FILENAME,
    "uri_path": "URL Path",
    "user-agent": "User-agent",
    "registry": "Registry Key",
    "autonomous-system": "ASN",
    "hash": BY_LENGTH,
    FILE: BY_LENGTH,
}

# Default dataTypes deliberately left out, with the reason given when one is skipped.
_UNMAPPED_REASONS: Dict[str, str] = {
    "other": "free text with no ThreatQ indicator type",
    "regexp": "a pattern, not an indicator value",
}

_HEX = re.compile(r"[0-9A-Fa-f]+")
_SHOWN = 80


class TypeMappingError(ValueError):
    """A malformed ``sync.type_mapping`` line; ``line`` is its 1-based number."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"sync.type_mapping line {line}: {message}")
        self.line = line


def _shown(value: str) -> str:
    """A value as quoted in a skip reason, cut short so one huge value cannot flood the log."""
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")


def parse(text: str) -> Dict[str, str]:
    """Read the guide's ``<Observable Type>: <ThreatQ Indicator Type>`` lines.

    Blank lines and lines starting with ``#`` are ignored; both sides are trimmed; the line is
    split at its first colon. A line without a colon, with an empty side, or repeating an
    observable type raises ``TypeMappingError`` naming the line, so a typo stops the start
    instead of silently dropping observables.
    """
    rules: Dict[str, str] = {}
    first_seen: Dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        left, colon, right = line.partition(":")
        observable_type, indicator_type = left.strip(), right.strip()
        if not colon:
            raise TypeMappingError(number, f"no colon in {line!r} "
                                           "(expected '<Observable Type>: <ThreatQ Indicator Type>')")
        if not observable_type:
            raise TypeMappingError(number, f"empty observable type in {line!r}")
        if not indicator_type:
            raise TypeMappingError(number, f"empty ThreatQ indicator type in {line!r}")
        if observable_type in rules:
            raise TypeMappingError(number, f"observable type {observable_type!r} is already mapped "
                                           f"on line {first_seen[observable_type]} ({line!r})")
        rules[observable_type] = indicator_type
        first_seen[observable_type] = number
    return rules


def hash_type(value: str) -> Tuple[Optional[str], Optional[str]]:
    """(ThreatQ hash type, None) by hex length, or (None, why not)."""
    if not _HEX.fullmatch(value):
        return None, f"hash {_shown(value)} is not hexadecimal"
    found = HASH_TYPES.get(len(value))
    if found is None:
        return None, f"hash {_shown(value)} has {len(value)} hex digits, which is no known hash length"
    return found, None


def _is_ipv6(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).version == 6
    except ValueError:
        return False


@dataclass(frozen=True)
class TypeMapping:
    """Observable dataType → ThreatQ indicator type (or ``hash``: by length)."""

    rules: Dict[str, str]

    @classmethod
    def default(cls) -> "TypeMapping":
        return cls(dict(DEFAULT_RULES))

    @classmethod
    def from_config(cls, sync: SyncConfig) -> "TypeMapping":
        """The custom table when ``sync.custom_mapping`` is on (it replaces the default)."""
        if sync.custom_mapping:
            return cls(parse(sync.type_mapping))
        return cls.default()

    def resolve(self, data_type: str, value: str) -> Tuple[Optional[str], Optional[str]]:
        """(ThreatQ type, None) for a value of ``data_type``, or (None, why it is skipped)."""
        target = self.rules.get(data_type)
        if target is None:
            why = _UNMAPPED_REASONS.get(data_type, "not in the type mapping")
            return None, f"observable type {_shown(data_type)} is not mapped: {why}"
        value = value.strip()
        if not value:
            return None, f"observable of type {_shown(data_type)} has an empty value"
        if target == BY_LENGTH:
            return hash_type(value)
        if target == IP_ADDRESS and _is_ipv6(value):
            return IPV6_ADDRESS, None
        return target, None

    def indicator_types(self) -> Set[str]:
        """Every ThreatQ type this mapping can produce, to check they exist at start-up."""
        found: Set[str] = set()
        for data_type, target in self.rules.items():
            if target == BY_LENGTH:
                found.update(HASH_TYPES.values())
            else:
                found.add(target)
            if target == IP_ADDRESS:
                found.add(IPV6_ADDRESS)
            if data_type == FILE:
                found.add(FILENAME)
        return found
