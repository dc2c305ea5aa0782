"""Each plugin's per-minute limit, kept by the jobs that call plugins back to back (``cache warm``,
``monitor``) by waiting between calls; the quota book (``quota.py``) is what keeps every process,
the worker included, within the limits: these jobs pace so as not to spend a minute's quota at once."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional


class Pacer:
    """Waits, before a call to a plugin, until ``60 / RATE_LIMIT_PER_MIN`` s have passed since
    the previous call to it in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.clock = clock
        self.sleep = sleep
        self._last_call: Dict[str, float] = {}

    def wait(self, plugin, per_minute: Optional[float] = None) -> None:
        """``plugin``: a ``PluginInfo`` (its ``name``); ``per_minute``: the limit in force
        (``quota.limits_for``: the config's, else the plugin's ``RATE_LIMIT_PER_MIN``)."""
        limit = per_minute
        if not limit:
            return
        last = self._last_call.get(plugin.name)
        if last is not None:
            wait = last + 60.0 / float(limit) - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_call[plugin.name] = self.clock()
