"""The team's API keys, kept in the state database (mode 0600) so one place serves everyone.

``TQ_MW_KEY_<NAME>`` in the environment overrides a stored key (for secrets managers and
tests). Values are registered with the log redactor as soon as they are read, and are
shown only masked.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional

from tq_mw_thehive import logs, state

if TYPE_CHECKING:
    from tq_mw_thehive.enrichment.registry import PluginInfo

ENV_PREFIX = "TQ_MW_KEY_"


def mask(value: str) -> str:
    """Enough to tell two keys apart, never enough to use one: the last 4 characters at most."""
    if len(value) < 12:
        return "*" * 8
    return "*" * 8 + value[-4:]


def normalise(name: str) -> str:
    name = name.strip().upper().replace("-", "_")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"a key name is letters, digits and underscores (got {name!r})")
    return name


def declared(plugins: Iterable["PluginInfo"]) -> Dict[str, List[str]]:
    """Each key name the plugins declare in ``API_KEYS`` → the names of the plugins that use it."""
    users: Dict[str, List[str]] = {}
    for plugin in plugins:
        for name in plugin.api_keys:
            try:
                users.setdefault(normalise(name), []).append(plugin.name)
            except ValueError:  # a name no key can have: nothing to store under it
                continue
    return users


def check_declared(name: str, plugins: Iterable["PluginInfo"]) -> str:
    """``name`` normalised, if a plugin uses it; else ``ValueError`` listing the names they use.

    A key that no plugin reads (a typo, ``VIRUS_TOTAL``) would be stored and listed while
    the plugin it was meant for still says ``missing key``.
    """
    name, users = normalise(name), declared(plugins)
    if name not in users:
        known = ", ".join(sorted(users)) or "none"
        raise ValueError(f"no loaded plugin uses a key named {name} (the keys they use: {known}; "
                         "see `tq-mw-thehive plugins`)")
    return name


class KeyStore(state.Store):
    """Table ``api_keys`` (migration 3), with the environment override."""

    def __init__(self, path, busy_timeout: float = state.BUSY_TIMEOUT_S,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(path, busy_timeout)
        self.environ = os.environ if environ is None else environ

    def set(self, name: str, value: str) -> None:
        name, value = normalise(name), value.strip()
        if not value:
            raise ValueError("an API key cannot be empty")
        logs.add_secrets([value])
        self.write(lambda db: db.execute(
            "INSERT INTO api_keys (name, value, set_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, set_at = excluded.set_at",
            (name, value, time.time())))

    def delete(self, name: str) -> bool:
        name = normalise(name)
        return self.write(lambda db: db.execute("DELETE FROM api_keys WHERE name = ?", (name,)).rowcount) == 1

    def get(self, name: str) -> Optional[str]:
        name = normalise(name)
        value = self.environ.get(ENV_PREFIX + name)
        if not value:
            row = self.db.execute("SELECT value FROM api_keys WHERE name = ?", (name,)).fetchone()
            value = row["value"] if row else None
        if value:
            logs.add_secrets([value])
        return value or None

    def resolve(self, names) -> Dict[str, str]:
        """The keys among ``names`` that are set (stored or in the environment)."""
        found = {}
        for name in names:
            value = self.get(name)
            if value:
                found[name] = value
        return found

    def listing(self) -> List[dict]:
        """Every key stored or overridden, masked, with when it was set and where it comes from."""
        rows = {r["name"]: {"name": r["name"], "value": mask(r["value"]), "set_at": r["set_at"],
                            "source": "database"}
                for r in self.db.execute("SELECT name, value, set_at FROM api_keys ORDER BY name")}
        for env_name, value in self.environ.items():
            if env_name.startswith(ENV_PREFIX) and value:
                name = env_name[len(ENV_PREFIX):]
                rows[name] = {"name": name, "value": mask(value), "set_at": None, "source": f"${env_name}"}
        return [rows[n] for n in sorted(rows)]
