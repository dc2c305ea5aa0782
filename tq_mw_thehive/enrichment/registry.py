"""Find and load enrichment plugins; say what state each is in.

Three places, in this order (a name already taken is reported, not loaded twice):
the bundled plugins (``tq_mw_thehive.plugins``), the
directories in ``enrichment.plugin_dirs`` (one ``.py`` file per plugin), and installed
packages through the entry-point group ``tq_mw_thehive.plugins``. A plugin that fails
to import or declares itself wrongly (``plugin.CONTRACT``, checked once here) is logged and
skipped; the rest still load. One that does not declare ``EXTERNAL`` loads as external.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterable, List, Optional, Tuple

from tq_mw_thehive import logs
from tq_mw_thehive.config import EnrichmentConfig
from tq_mw_thehive.enrichment.plugin import (DEFAULT_CACHE_TTL_S, DEFAULT_NEGATIVE_CACHE_TTL_S, ContractError,
                                             PluginSpec, name_of, read_spec)

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "tq_mw_thehive.plugins"
BUNDLED_PACKAGE = "tq_mw_thehive.plugins"

# (name, origin) of the plugins this process has warned about already: said once, not per discovery.
_warned = logs.Once()


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as found: its module and checked declarations when it loaded, else why it did not.

    Given a module and no spec, it reads the module's declarations (``plugin.read_spec``) once, here:
    a wrong one leaves ``module`` None and says why in ``error``.
    """

    name: str
    origin: str
    module: Optional[ModuleType] = None
    error: Optional[str] = None
    spec: Optional[PluginSpec] = None

    def __post_init__(self) -> None:
        if self.module is None or self.spec is not None or self.error is not None:
            return
        try:
            spec = read_spec(self.module)
        except ContractError as exc:
            log.error("plugin %s (%s) failed to load: %s: %s", self.name, self.origin, "invalid plugin", exc)
            object.__setattr__(self, "module", None)
            object.__setattr__(self, "error", f"invalid plugin: {exc}")
            return
        if spec.external_assumed and _warned.first((self.name, self.origin)):
            log.warning("plugin %s (%s) does not declare EXTERNAL: treated as external, so the TLP gate and "
                        "the non-global address rule apply; declare EXTERNAL = False if no value leaves",
                        self.name, self.origin)
        object.__setattr__(self, "spec", spec)

    @property
    def declarations(self) -> PluginSpec:
        """The checked declarations; for a plugin that did not load, the contract's defaults."""
        return self.spec if self.spec is not None else PluginSpec.defaults(self.name)

    # The spec's fields, as callers read them before the spec existed.
    @property
    def title(self) -> str:
        return self.declarations.title

    @property
    def description(self) -> str:
        return self.declarations.description

    @property
    def version(self) -> str:
        return self.declarations.version

    @property
    def data_types(self) -> Tuple[str, ...]:
        return self.declarations.data_types

    @property
    def external(self) -> bool:
        return self.declarations.external

    @property
    def active(self) -> bool:
        return self.declarations.active

    @property
    def api_keys(self) -> Dict[str, str]:
        return dict(self.declarations.api_keys)

    @property
    def cache_ttl(self) -> Optional[float]:
        return self.declarations.cache_ttl

    @property
    def negative_cache_ttl(self) -> Optional[float]:
        return self.declarations.negative_cache_ttl

    @property
    def rate_limit_per_min(self) -> Optional[float]:
        return self.declarations.rate_limit_per_min

    @property
    def rate_limit_per_day(self) -> Optional[float]:
        return self.declarations.rate_limit_per_day


def _found(module: ModuleType, origin: str, fallback_name: str) -> PluginInfo:
    return PluginInfo(name_of(module, fallback_name), origin, module=module)


def _failed(name: str, origin: str, exc: BaseException) -> PluginInfo:
    log.error("plugin %s (%s) failed to load: %s: %s", name, origin, type(exc).__name__, exc)
    return PluginInfo(name, origin, error=f"import error: {type(exc).__name__}: {exc}")


def _bundled() -> Iterable[PluginInfo]:
    package = importlib.import_module(BUNDLED_PACKAGE)
    for entry in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if entry.name.startswith("_"):
            continue
        origin = f"bundled ({BUNDLED_PACKAGE}.{entry.name})"
        try:
            yield _found(importlib.import_module(f"{BUNDLED_PACKAGE}.{entry.name}"), origin, entry.name)
        except Exception as exc:  # a broken plugin must not stop the others
            yield _failed(entry.name, origin, exc)


def _from_dirs(dirs: Iterable[str]) -> Iterable[PluginInfo]:
    for directory in dirs:
        path = Path(directory).expanduser()
        if not path.is_dir():
            yield PluginInfo(path.name or str(path), str(path), error="plugin directory does not exist")
            continue
        for file in sorted(path.glob("*.py")):
            if file.name.startswith("_"):
                continue
            digest = hashlib.sha1(str(file.parent).encode()).hexdigest()[:8]
            module_name = f"tq_mw_thehive_plugin_{digest}_{file.stem}"
            try:
                spec = importlib.util.spec_from_file_location(module_name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
                yield _found(module, str(file), file.stem)
            except Exception as exc:
                sys.modules.pop(module_name, None)
                yield _failed(file.stem, str(file), exc)


def _entry_points() -> Iterable[PluginInfo]:
    from importlib import metadata

    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python 3.9: entry_points() takes no arguments
        found = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    for entry in found:
        origin = f"entry point {entry.value}"
        try:
            yield _found(entry.load(), origin, entry.name)
        except Exception as exc:
            yield _failed(entry.name, origin, exc)


class Registry:
    def __init__(self, plugins: Iterable[PluginInfo]) -> None:
        self.plugins: List[PluginInfo] = []
        seen: Dict[str, PluginInfo] = {}
        for info in plugins:
            first = seen.get(info.name)
            if first is not None and first.spec is not None:
                log.error("plugin %s from %s ignored: the name is taken by %s", info.name, info.origin, first.origin)
                info = PluginInfo(info.name, info.origin, error=f"duplicate name (already from {first.origin})")
            else:
                seen[info.name] = info
            self.plugins.append(info)

    @classmethod
    def discover(cls, plugin_dirs: Iterable[str] = (), entry_points: bool = True) -> "Registry":
        found = list(_bundled()) + list(_from_dirs(plugin_dirs))
        if entry_points:
            found += list(_entry_points())
        return cls(found)

    def loaded(self) -> List[PluginInfo]:
        return [p for p in self.plugins if p.spec is not None and p.error is None]

    def get(self, name: str) -> Optional[PluginInfo]:
        return next((p for p in self.loaded() if p.name == name), None)


def plugin_state(info: PluginInfo, cfg: EnrichmentConfig, keys) -> str:
    """enabled, disabled by config, missing key: NAME, or the load error."""
    if info.error:
        return info.error
    if not cfg.enabled or info.name in cfg.disabled:
        return "disabled by config"
    missing = [k for k in info.api_keys if not keys.get(k)]
    if missing:
        return "missing key: " + ", ".join(missing)
    return "enabled"


def ttl_s(info: PluginInfo, cfg: EnrichmentConfig, found: bool) -> float:
    """Per-plugin setting, else the plugin's declaration, else the configured default."""
    from tq_mw_thehive.config import Duration

    settings = (cfg.plugins or {}).get(info.name, {})
    key, declared, default = (("cache_ttl", info.cache_ttl, cfg.cache_ttl) if found else
                              ("negative_ttl", info.negative_cache_ttl, cfg.negative_ttl))
    configured = Duration.parse(settings.get(key)) if key in settings else None
    if configured:
        return configured
    return float(declared) if declared else float(default or (DEFAULT_CACHE_TTL_S if found
                                                              else DEFAULT_NEGATIVE_CACHE_TTL_S))
