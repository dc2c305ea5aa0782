"""The plugin contract: one small module per enrichment source.

A plugin is a Python module with these module-level names (TheTHE's and
misp-modules' recipe; Cortex's declared inputs and outputs)::

    NAME = "geoip"                      # unique, lower case; the name of its ThreatQ source
    TITLE = "GeoIP"                     # display name: attributes read "<TITLE> Verdict" etc.
    DESCRIPTION = "Country and ASN of an IP address, offline"
    VERSION = "1.0"                     # part of the cache key: bump it when results change shape
    DATA_TYPES = ("ip",)                # TheHive dataTypes it takes
    EXTERNAL = False                    # True: the value is sent to a third party (TLP gate)
    ACTIVE = False                      # True: it touches the target itself (PAP gate)
    API_KEYS = {}                       # key name -> sign-up URL, e.g. {"VIRUSTOTAL": "https://…"}
    CACHE_TTL = 24 * 3600               # seconds a result is reused (optional; default 24 h)
    NEGATIVE_CACHE_TTL = 3600           # seconds a "not found" is reused (optional; default 1 h)
    RATE_LIMIT_PER_MIN = None           # calls per minute the service allows (optional; monitor honours it)

    def lookup(request: Lookup) -> Result: ...

``lookup`` returns structured data, a verdict and the ThreatQ attributes to set. It
raises ``NotFound`` for a negative answer (cached, shorter), ``QuotaExceeded`` on a
rate limit, and ``PluginError`` (or anything else) on failure: errors are logged and
never cached, and never fail the event. HTTP goes through ``request.session`` with
``request.timeout`` so that tests can intercept it and a slow service cannot hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import requests

VERDICTS = ("info", "safe", "suspicious", "malicious")
DEFAULT_CACHE_TTL_S = 24 * 3600
DEFAULT_NEGATIVE_CACHE_TTL_S = 3600


class PluginError(Exception):
    """A lookup failed (service down, bad answer); logged, not cached."""


class NotFound(PluginError):
    """The service knows nothing about the value: a negative answer, cached with a shorter TTL."""


class QuotaExceeded(PluginError):
    """The service refused for rate or quota (HTTP 429 and the like); not cached."""


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
