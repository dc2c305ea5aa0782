"""The plugin contract: one small module per enrichment source.

A plugin is a Python module (TheTHE's and misp-modules' recipe; Cortex's declared inputs and
outputs) that declares module-level names and a ``lookup`` function, for example::

    NAME = "geoip"                      # unique, lower case; the name of its ThreatQ source
    TITLE = "GeoIP"                     # display name: attributes read "<TITLE> Verdict" etc.
    DESCRIPTION = "Country and ASN of an IP address, offline"
    VERSION = "1.0"                     # part of the cache key: bump it when results change shape
    DATA_TYPES = ("ip",)                # TheHive dataTypes it takes
    EXTERNAL = False                    # True: the value is sent to a third party (TLP gate)
    ACTIVE = False                      # True: it touches the target itself (PAP gate)
    API_KEYS = {}                       # key name -> sign-up URL, e.g. {"VIRUSTOTAL": "https://…"}

    def lookup(request: Lookup) -> Result: ...

``CONTRACT`` below is the one list of the names a plugin may declare, each with its type,
its default and its check; nothing else reads a plugin's declarations. ``read_spec`` checks
every declared name once, when the plugin loads, and gives a typed ``PluginSpec``; a wrong
declaration is a ``ContractError`` naming it and what is expected, and the plugin does not
load. The defaults fail closed: a plugin that does not say ``EXTERNAL = False`` is external.

``lookup`` returns structured data, a verdict and the ThreatQ attributes to set. It
raises ``NotFound`` for a negative answer (cached, shorter), ``QuotaExceeded`` on a
rate limit, and ``PluginError`` (or anything else) on failure: errors are logged and
never cached, and never fail the event. HTTP goes through ``request.session`` with
``request.timeout`` so that tests can intercept it and a slow service cannot hang.
An optional ``prepare(request)`` does one-off setup before a lookup (``runner.py``).
"""
from __future__ import annotations

import email.utils
import inspect
import math
import re
import reprlib
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import requests

VERDICTS = ("info", "safe", "suspicious", "malicious")
DEFAULT_CACHE_TTL_S = 24 * 3600
DEFAULT_NEGATIVE_CACHE_TTL_S = 3600


class PluginError(Exception):
    """A lookup failed (service down, bad answer); logged, not cached."""


class NotFound(PluginError):
    """The service knows nothing about the value: a negative answer, cached with a shorter TTL."""


class QuotaExceeded(PluginError):
    """The service refused for rate or quota (HTTP 429 and the like); not cached. The plugin is
    paused for ``retry_after_s`` (the answer's ``Retry-After``, see ``retry_after``) or a backoff,
    and the lookup is queued (``quota.py``)."""

    def __init__(self, message: str = "", retry_after_s: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def retry_after(response: requests.Response, cap_s: float = 86400.0) -> Optional[float]:
    """An answer's ``Retry-After`` in seconds (a number or an HTTP date, RFC 9110 10.2.3), capped;
    None when absent or unreadable."""
    text = (response.headers.get("Retry-After") or "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(cap_s, max(1.0, seconds))


@dataclass(frozen=True)
class Lookup:
    """What a plugin is asked: one value of one TheHive data type."""

    data_type: str
    value: str
    keys: Mapping[str, str] = field(default_factory=dict, repr=False)   # the API keys it declared
    settings: Mapping[str, Any] = field(default_factory=dict)            # enrichment.plugins.<NAME>
    session: Optional[requests.Session] = field(default=None, repr=False, compare=False)
    timeout: float = 10.0

    def http(self) -> requests.Session:
        return self.session if self.session is not None else requests.Session()

    def get(self, title: str, url: str, **kwargs: Any) -> requests.Response:
        """GET ``url`` with this lookup's session and timeout. A transport failure becomes a
        ``PluginError`` naming only the exception's type: requests' own texts carry URLs, and a
        service's URL or headers may carry its key."""
        session = self.http()
        try:
            return session.get(url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise PluginError(f"{title} request failed: {type(exc).__name__}") from exc
        finally:
            if self.session is None:
                session.close()


def answer_json(title: str, response: requests.Response) -> Any:
    """The JSON body of a service's answer, or a ``PluginError`` saying it is not JSON."""
    try:
        return response.json()
    except ValueError:
        raise PluginError(f"{title}: the answer is not JSON (HTTP {response.status_code})") from None


@dataclass(frozen=True)
class Result:
    """A plugin's answer."""

    verdict: str = "info"                                     # one of VERDICTS
    data: Dict[str, Any] = field(default_factory=dict)        # structured output, JSON-serialisable
    attributes: Dict[str, str] = field(default_factory=dict)  # ThreatQ attributes, e.g. {"GeoIP Country": "FR"}

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")


# --- the contract: every name a plugin may declare, once ---------------------------------------------

_MISSING = object()
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_-]*[A-Za-z0-9][A-Za-z0-9_-]*$")   # what keys.normalise takes ("-" is "_")
_short = reprlib.Repr()
_short.maxstring, _short.maxother = 60, 60


class ContractError(ValueError):
    """A plugin's declarations break the contract; ``problems`` says each, one per name."""

    def __init__(self, problems: Tuple[str, ...]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Wrong(ValueError):
    """One declaration's value is not what the contract expects."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Wrong
    return value


def _optional_text(value: Any) -> str:
    return "" if value is None else _text(value)


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _Wrong
    return value


def _version(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise _Wrong
    return str(value)


def _data_types(value: Any) -> Tuple[str, ...]:
    if not isinstance(value, (tuple, list)) or not value or \
            not all(isinstance(t, str) and t for t in value):
        raise _Wrong
    return tuple(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):   # not 0/1, not None, not "yes": say True or False
        raise _Wrong
    return value


def _api_keys(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or \
            not all(isinstance(k, str) and _KEY_NAME.match(k) and isinstance(u, str) for k, u in value.items()):
        raise _Wrong
    return types.MappingProxyType(dict(value))


def _positive(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _Wrong
    return value


def _function(value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise _Wrong
    try:
        inspect.signature(value).bind(None)   # it is called with one argument, the Lookup
    except TypeError:
        raise _Wrong from None
    except ValueError:                        # no signature to read (a builtin): callable will do
        pass
    return value


def _optional_function(value: Any) -> Optional[Callable[..., Any]]:
    return None if value is None else _function(value)


@dataclass(frozen=True)
class Declaration:
    """One module-level name a plugin may declare: what it must be and what not declaring it means."""

    name: str                         # as the plugin spells it, e.g. "EXTERNAL"
    field: str                        # the PluginSpec field it fills
    expected: str                     # what it must be, for the error message
    check: Callable[[Any], Any]       # the typed value, or _Wrong
    required: bool = False
    default: Any = None               # when not declared


CONTRACT: Tuple[Declaration, ...] = (
    Declaration("NAME", "name", "a lower-case identifier (a-z, 0-9, _, starting with a letter)", _identifier,
                required=True),
    Declaration("TITLE", "title", "a string (default: NAME in title case)", _optional_text, default=""),
    Declaration("DESCRIPTION", "description", "a string", _optional_text, default=""),
    Declaration("VERSION", "version", "a non-empty string such as \"1.0\"", _version, default="0"),
    Declaration("DATA_TYPES", "data_types", "a non-empty tuple of TheHive data types (non-empty strings)",
                _data_types, required=True),
    Declaration("EXTERNAL", "external", "True or False (not declared: True, the value may leave)", _flag,
                default=True),
    Declaration("ACTIVE", "active", "True or False", _flag, default=False),
    Declaration("API_KEYS", "api_keys", "a dict of key name (letters, digits, _ or -) to sign-up URL (a string)",
                _api_keys, default=types.MappingProxyType({})),
    Declaration("CACHE_TTL", "cache_ttl", "a positive number of seconds, or None", _positive),
    Declaration("NEGATIVE_CACHE_TTL", "negative_cache_ttl", "a positive number of seconds, or None", _positive),
    Declaration("RATE_LIMIT_PER_MIN", "rate_limit_per_min", "a positive number of calls a minute, or None",
                _positive),
    Declaration("RATE_LIMIT_PER_DAY", "rate_limit_per_day", "a positive number of calls a UTC day, or None",
                _positive),
    Declaration("lookup", "lookup", "a function lookup(request) returning a Result", _function, required=True),
    Declaration("prepare", "prepare", "a function prepare(request), or absent", _optional_function),
)


@dataclass(frozen=True)
class PluginSpec:
    """A plugin's declarations, checked against ``CONTRACT``; what the registry, gate and runner read."""

    name: str
    data_types: Tuple[str, ...]
    lookup: Optional[Callable[["Lookup"], "Result"]]
    title: str = ""
    description: str = ""
    version: str = "0"
    external: bool = True
    active: bool = False
    api_keys: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    cache_ttl: Optional[float] = None
    negative_cache_ttl: Optional[float] = None
    rate_limit_per_min: Optional[float] = None
    rate_limit_per_day: Optional[float] = None
    prepare: Optional[Callable[["Lookup"], Any]] = None
    declared: FrozenSet[str] = frozenset()     # the CONTRACT names the plugin itself declared

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name.replace("_", " ").title())

    def __hash__(self) -> int:   # api_keys is a read-only mapping, not hashable itself
        return hash((self.name, self.version, self.data_types, self.external, self.active,
                     tuple(sorted(self.api_keys.items())), self.lookup))

    @property
    def external_assumed(self) -> bool:
        """The plugin did not declare EXTERNAL, so it counts as external (fail closed)."""
        return "EXTERNAL" not in self.declared

    @classmethod
    def defaults(cls, name: str) -> "PluginSpec":
        """What the contract assumes of a plugin that declares nothing (one that did not load)."""
        return cls(**{d.field: d.default for d in CONTRACT if not d.required}, name=name, data_types=(),
                   lookup=None)


def name_of(module: Any, fallback: str) -> str:
    """What to call a plugin in messages, even one whose declarations are wrong: its NAME if a string."""
    name = getattr(module, "NAME", None)
    return name if isinstance(name, str) and name else fallback


def read_spec(module: Any) -> PluginSpec:
    """Check every name of ``CONTRACT`` that ``module`` declares; a ``ContractError`` lists what is wrong."""
    values: Dict[str, Any] = {}
    declared, problems = set(), []
    for declaration in CONTRACT:
        value = getattr(module, declaration.name, _MISSING)
        if value is _MISSING:
            if declaration.required:
                problems.append(f"{declaration.name} is missing: it must be {declaration.expected}")
            else:
                values[declaration.field] = declaration.default
            continue
        declared.add(declaration.name)
        try:
            values[declaration.field] = declaration.check(value)
        except _Wrong:
            problems.append(f"{declaration.name} must be {declaration.expected}, not {_short.repr(value)}")
    if problems:
        raise ContractError(tuple(problems))
    return PluginSpec(**values, declared=frozenset(declared))
