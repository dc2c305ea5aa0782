"""Load, validate and write ``config.yaml``.

A daemon that starts with a half-understood configuration fails later and far from
the cause, so every key is checked at start: unknown keys, wrong types and bad
values stop the start with one message that names the key path (exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlsplit

import yaml

from tq_mw_thehive import private_files
from tq_mw_thehive.state_postgres import PostgresURL, is_url

CONFIG_FILE = "config.yaml"
DEFAULT_STATE_DB = "tq_mw_thehive.db"
WEBHOOK_AUTH_MODES = ("bearer", "basic", "key", "none")
CASES_AS = ("event", "incident")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path."""


def _opt(kind: type, default: Any = None, *, required: bool = False, secret: bool = False,
         choices: Optional[Tuple[str, ...]] = None,
         check: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
    meta = {"kind": kind, "required": required, "secret": secret, "choices": choices, "check": check}
    return field(default=default, repr=not secret, metadata=meta)


def _http_url(value: str) -> Optional[str]:
    try:
        parts = urlsplit(value)
        parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:
        return "must be an http:// or https:// URL with a valid host and port"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    return None


def _host_or_url(value: str) -> Optional[str]:
    if "://" in value:
        return _http_url(value)
    if not value.strip() or any(c in value for c in " /?#@"):
        return "must be a host name (for https) or an http(s):// URL"
    return None


def _max_body(value: float) -> Optional[str]:
    if not 0 < value <= 1024:
        return "must be more than 0 and at most 1024"
    return None


def _non_empty(value: str) -> Optional[str]:
    return None if value.strip() else "must not be empty"


LIMIT_WINDOWS = ("per_minute", "per_day")


def _limits(value: Dict[str, Any]) -> Optional[str]:
    for plugin, limits in value.items():
        if not isinstance(limits, dict):
            return f"{plugin}: must be a mapping such as {{per_minute: 4, per_day: 500}}"
        for window, limit in limits.items():
            if window not in LIMIT_WINDOWS:
                return f"{plugin}.{window}: unknown limit (known: {', '.join(LIMIT_WINDOWS)})"
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                return (f"{plugin}.{window}: must be a whole number of calls of 1 or more, or null for no "
                        f"limit (to stop a plugin, list it in enrichment.disabled)")
    return None


def _positive(value: float) -> Optional[str]:
    return None if value > 0 else "must be more than 0"


def _off_or_positive(value: float) -> Optional[str]:
    return None if value >= 0 else "must be 0 (off) or more"


class Duration(float):
    """A length of time in seconds, written as a number or with a unit: 90s, 30m, 48h, 2d."""

    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    @classmethod
    def parse(cls, value: Any) -> Optional[float]:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            text = value.strip().lower()
            unit = cls.UNITS.get(text[-1:], None)
            try:
                return float(text[:-1]) * unit if unit else float(text)
            except ValueError:
                return None
        return None


@dataclass(frozen=True)
class ThreatQConfig:
    host: str = _opt(str, required=True, check=_host_or_url)
    client_id: str = _opt(str, required=True, check=_non_empty)
    client_secret: Optional[str] = _opt(str, secret=True)
    verify_ssl: bool = _opt(bool, True)
    proxy: Optional[str] = _opt(str, secret=True, check=_http_url)  # may carry user:password
    source: str = _opt(str, "TheHive", check=_non_empty)
    timeout: float = _opt(Duration, 30.0, check=_positive)          # read timeout of one API call

    @property
    def base_url(self) -> str:
        """``host`` as a URL without a trailing slash; a bare host name means https."""
        url = self.host if "://" in self.host else f"https://{self.host}"
        return url.rstrip("/")


@dataclass(frozen=True)
class TheHiveConfig:
    url: str = _opt(str, required=True, check=_http_url)
    api_key: Optional[str] = _opt(str, secret=True)
    organisation: Optional[str] = _opt(str)
    verify_ssl: bool = _opt(bool, True)


@dataclass(frozen=True)
class WebhookConfig:
    auth: str = _opt(str, "bearer", choices=WEBHOOK_AUTH_MODES)
    token: Optional[str] = _opt(str, secret=True)
    username: Optional[str] = _opt(str)
    password: Optional[str] = _opt(str, secret=True)
    max_body_mb: float = _opt(float, 10, check=_max_body)


@dataclass(frozen=True)
class SyncConfig:
    cases_as: str = _opt(str, "event", choices=CASES_AS)
    event_type: str = _opt(str, "Incident", check=_non_empty)
    only_ioc: bool = _opt(bool, False)
    include_cases_without_observables: bool = _opt(bool, True)
    custom_mapping: bool = _opt(bool, False)
    type_mapping: str = _opt(str, "")
    indicator_status: str = _opt(str, "Active", check=_non_empty)
    # Retries back off to about a minute, so 2000 attempts or 48 hours (whichever comes
    # first) ride out a ThreatQ outage of a day or more before an event goes dead.
    max_attempts: int = _opt(int, 2000, check=_positive)
    max_age: float = _opt(Duration, 48 * 3600.0, check=_positive)
    # An unexpected error (a bug, an import error, a payload the mapping cannot handle) is not
    # an outage: no amount of waiting fixes it, so it goes to the dead letters after this many.
    max_unexpected_attempts: int = _opt(int, 5, check=_positive)
    # How long a worker holds an event before another may take it over (a killed worker's
    # event waits this long); longer than the slowest event, including enrichment.
    lease: float = _opt(Duration, 300.0, check=_positive)
    # At start, queue what TheHive changed since the last run (TheHive never re-sends a webhook).
    catch_up: bool = _opt(bool, True)
    # Events of one case applied in one go (a burst of new observables: one look-up and one consume
    # call per few hundred); 1 applies them one at a time.
    batch_max: int = _opt(int, 500, check=_positive)
    # While the daemon runs, one process re-reads what TheHive changed since the last mark this
    # often and queues what no webhook brought (lost webhooks found in minutes); 0 turns it off.
    reconcile_every: float = _opt(Duration, 900.0, check=_off_or_positive)
    # TheHive alerts and their observables go to ThreatQ too (alerts as events of this type).
    alerts: bool = _opt(bool, False)
    alert_event_type: str = _opt(str, "Sighting", check=_non_empty)


TLP_ORDER = ("WHITE", "CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED")


@dataclass(frozen=True)
class EnrichmentConfig:
    enabled: bool = _opt(bool, True)
    plugin_dirs: Tuple[str, ...] = _opt(list, ())
    disabled: Tuple[str, ...] = _opt(list, ())
    max_tlp_external: str = _opt(str, "GREEN", choices=TLP_ORDER)
    max_pap_active: str = _opt(str, "GREEN", choices=TLP_ORDER)
    timeout: float = _opt(Duration, 10.0, check=_positive)
    cache_ttl: float = _opt(Duration, 24 * 3600.0, check=_positive)
    negative_ttl: float = _opt(Duration, 3600.0, check=_positive)
    auto_watch_ioc: bool = _opt(bool, False)
    monitor_interval: float = _opt(Duration, 24 * 3600.0, check=_positive)
    # Per-plugin settings, e.g. {"geoip": {"mmdb_path": "/var/lib/GeoIP/GeoLite2-City.mmdb"},
    # "virustotal": {"cache_ttl": "7d"}}: handed to the plugin as Lookup.settings.
    plugins: Dict[str, Dict[str, Any]] = _opt(dict, None)
    # Per-plugin call limits, per API key, replacing the plugin's declared free-tier defaults, e.g.
    # {"virustotal": {"per_minute": 4, "per_day": 500}}; null lifts that limit (a paid key).
    limits: Dict[str, Dict[str, Any]] = _opt(dict, None, check=lambda v: _limits(v))


@dataclass(frozen=True)
class WebConfig:
    # Protects GET /status; while it is unset the status page is disabled (404).
    admin_token: Optional[str] = _opt(str, secret=True, check=_non_empty)
    # When set, GET /metrics asks for `Authorization: Bearer <token>` (401 otherwise): the
    # scrape is served on the webhook listener, which may be reachable by more than Prometheus.
    metrics_token: Optional[str] = _opt(str, secret=True, check=_non_empty)


def _not_negative(value: float) -> Optional[str]:
    return None if value >= 0 else "must be 0 (keep forever) or more"


@dataclass(frozen=True)
class InboxConfig:
    # Done events older than this are deleted by the daemon (4 KB each: months of traffic would
    # be gigabytes); 0 keeps them forever. Pending events and dead letters are never deleted by it.
    keep_done: float = _opt(Duration, 30 * 86400.0, check=_not_negative)


@dataclass(frozen=True)
class LogsConfig:
    # Observable values whose TLP is above this (or missing) are withheld from every log line:
    # a log file travels further (tickets, shippers, support bundles) than RED data may.
    max_tlp_values: str = _opt(str, "AMBER", choices=TLP_ORDER)


def _tag_prefix(value: str) -> Optional[str]:
    if not value or any(c in value for c in ":= \t\n") or not value.isprintable():
        return "must be a word without ':', '=' or spaces"
    return None


@dataclass(frozen=True)
class WritebackConfig:
    # Off by default: the daemon then only reads TheHive. On: what landed in ThreatQ is told
    # back to TheHive as tags (and a case custom field), see docs/sync.md.
    enabled: bool = _opt(bool, False)
    tag_prefix: str = _opt(str, "threatq", check=_tag_prefix)
    case_custom_field: Optional[str] = _opt(str, check=_non_empty)


_SECTIONS = {
    "threatq": ThreatQConfig,
    "thehive": TheHiveConfig,
    "webhook": WebhookConfig,
    "sync": SyncConfig,
    "enrichment": EnrichmentConfig,
    "web": WebConfig,
    "inbox": InboxConfig,
    "logs": LogsConfig,
    "writeback": WritebackConfig,
}
_REQUIRED_SECTIONS = ("threatq", "thehive")


@dataclass(frozen=True)
class Config:
    threatq: ThreatQConfig
    thehive: TheHiveConfig
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    enrichment: EnrichmentConfig = field(default_factory=EnrichmentConfig)
    web: WebConfig = field(default_factory=WebConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    writeback: WritebackConfig = field(default_factory=WritebackConfig)
    state_db: Union[Path, PostgresURL] = Path(DEFAULT_STATE_DB)  # a SQLite file, or a shared PostgreSQL
    config_dir: Path = Path(".")

    @property
    def local_dir(self) -> Path:
        """Where this host's own files go (metric files, offline indexes, object locks): beside the
        SQLite file, or in the config directory when the state is on PostgreSQL."""
        if isinstance(self.state_db, PostgresURL):
            return Path(self.config_dir)
        return Path(self.state_db).parent

    def secrets(self) -> Tuple[str, ...]:
        """Every secret value in this configuration, for log redaction."""
        found = []
        for name in _SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.metadata["secret"] and value:
                    found.append(value)
        if isinstance(self.state_db, PostgresURL) and self.state_db.password:
            found.append(self.state_db.password)
        return tuple(found)

    def to_dict(self) -> Dict[str, Any]:
        """The YAML-ready form, as ``write_config`` stores it."""
        data: Dict[str, Any] = {
            name: {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(getattr(self, name)).items()}
            for name in _SECTIONS}
        state_db = self.state_db
        if isinstance(state_db, PostgresURL):
            data["state_db"] = state_db.conninfo
            return data
        if state_db.parent == self.config_dir:
            state_db = Path(state_db.name)
        data["state_db"] = str(state_db)
        return data


def shared_state(cfg: Config) -> Optional[PostgresURL]:
    """The PostgreSQL state database that daemons on several hosts share, or None (SQLite)."""
    return cfg.state_db if isinstance(cfg.state_db, PostgresURL) else None


def config_path(config_dir: Path) -> Path:
    return Path(config_dir) / CONFIG_FILE


def _expand_env(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REF.sub(substitute, value)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _shown(value: Any, secret: bool) -> str:
    """How an error message quotes a rejected value: a secret's type only, never its text."""
    return f"a {type(value).__name__}" if secret else f"{type(value).__name__} {value!r}"


def _coerce(value: Any, kind: type, path: str, from_env: bool, secret: bool) -> Any:
    """Check ``value`` against ``kind``; strings from ``${ENV}`` may stand for bools and numbers."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{path}: must be true or false (got {_shown(value, secret)})")
    if kind is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{path}: must be a list of strings (got {_shown(value, secret)})")
    if kind is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()):
            return value
        raise ConfigError(f"{path}: must map names to mappings of settings (got {_shown(value, secret)})")
    if kind is Duration:
        seconds = Duration.parse(value)
        if seconds is None:
            raise ConfigError(f"{path}: must be a duration such as 90s, 30m, 48h or 2d "
                              f"(got {_shown(value, secret)})")
        return seconds
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{path}: must be a whole number (got {_shown(value, secret)})")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: must be a number (got {_shown(value, secret)})")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: must be a string (got {_shown(value, secret)})")
    raise AssertionError(kind)  # pragma: no cover - schema error


def _unknown(path: str, key: Any, known) -> ConfigError:
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    suffix = f" (did you mean {hint[0]}?)" if hint else ""
    return ConfigError(f"{path}{key}: unknown key{suffix}")


def _build_section(cls: type, raw: Any, name: str, raw_unexpanded: Any) -> Any:
    if raw is None:
        raw, raw_unexpanded = {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be a mapping of keys to values (got {type(raw).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown(f"{name}.", key, fields)
    values = {}
    for key, f in fields.items():
        path = f"{name}.{key}"
        meta = f.metadata
        value = raw.get(key)
        if value is None:
            if meta["required"]:
                raise ConfigError(f"{path}: required key is missing")
            continue
        from_env = isinstance(raw_unexpanded.get(key), str) and bool(_ENV_REF.search(raw_unexpanded[key]))
        value = _coerce(value, meta["kind"], path, from_env, meta["secret"])
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{path}: must be one of {', '.join(meta['choices'])} (got {value!r})")
        if meta["check"]:
            problem = meta["check"](value)
            if problem:
                shown = "" if meta["secret"] else f" (got {value!r})"
                raise ConfigError(f"{path}: {problem}{shown}")
        values[key] = value
    return cls(**values)


def from_dict(raw: Any, config_dir: Path) -> Config:
    """Validate a parsed YAML document and build a ``Config``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"top level: must be a mapping of sections (got {type(raw).__name__})")
    allowed = set(_SECTIONS) | {"state_db"}
    for key in raw:
        if key not in allowed:
            raise _unknown("", key, allowed)
    for name in _REQUIRED_SECTIONS:
        if raw.get(name) is None:
            raise ConfigError(f"{name}: required section is missing")
    expanded = _expand_env(raw, "")
    sections = {name: _build_section(cls, expanded.get(name), name, raw.get(name) or {})
                for name, cls in _SECTIONS.items()}
    state_db = expanded.get("state_db") or DEFAULT_STATE_DB
    if not isinstance(state_db, str):
        raise ConfigError("state_db: must be a file path or a postgresql:// URL string "
                          f"(got {type(state_db).__name__})")
    where: Union[Path, PostgresURL]
    if is_url(state_db):
        where = _postgres_url(state_db)
    else:
        where = Path(state_db).expanduser()
        if not where.is_absolute():
            where = Path(config_dir) / where
    cfg = Config(state_db=where, config_dir=Path(config_dir), **sections)
    _check_cross_field(cfg)
    return cfg


def _postgres_url(text: str) -> PostgresURL:
    """``postgresql://user[:password]@host[:port]/dbname[?service=…]``; what is wrong, said without
    the password."""
    url = PostgresURL(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"state_db: not a valid PostgreSQL URL ({url})") from None
    if not parts.path.strip("/") and "service=" not in parts.query and "dbname=" not in parts.query:
        raise ConfigError(f"state_db: {url} names no database (postgresql://user@host:5432/dbname)")
    return url


def _check_cross_field(cfg: Config) -> None:
    hook = cfg.webhook
    if hook.auth in ("bearer", "key") and not hook.token:
        raise ConfigError(f"webhook.token: required when webhook.auth is {hook.auth}")
    if hook.auth == "basic" and not (hook.username and hook.password):
        raise ConfigError("webhook.username: webhook.username and webhook.password are required "
                          "when webhook.auth is basic")
    if cfg.writeback.enabled and not cfg.thehive.api_key:
        raise ConfigError("writeback.enabled: needs thehive.api_key (the daemon writes to TheHive's API)")


def load(config_dir: Path) -> Config:
    """Read and validate ``<config_dir>/config.yaml``."""
    path = config_path(config_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no configuration file (run `tq-mw-thehive configure -c {config_dir}`)")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}")
    try:
        return from_dict(raw, Path(config_dir))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


_HEADER = """\
# tq-mw-thehive configuration. Written by `tq-mw-thehive configure`; safe to edit.
# Any value may be ${ENV_NAME}. The ThreatQ password is never stored here: the OAuth
# tokens it was exchanged for live in threatq_tokens.json beside this file (mode 0600).
"""


def write(cfg: Config) -> Path:
    """Write ``cfg`` as ``config.yaml`` in its config dir, mode 0600, atomically."""
    path = config_path(cfg.config_dir)
    text = _HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    private_files.write(path, text)
    return path
