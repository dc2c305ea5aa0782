"""Each plugin's ``RATE_LIMIT_PER_MIN``, kept by the jobs that call plugins back to back
(``cache warm``, ``monitor``): the worker's lookups come one event at a time and are not paced."""
from __future__ import annotations

import time
from typing import Callable, Dict


class Pacer:
    """Waits, before a call to a plugin, until ``60 / RATE_LIMIT_PER_MIN`` s have passed since
    the previous call to it in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.clock = clock
        self.sleep = sleep
        self._last_call: Dict[str, float] = {}

    def wait(self, plugin) -> None:
        """``plugin``: a ``PluginInfo`` (its ``name`` and ``rate_limit_per_min``)."""
        limit = plugin.rate_limit_per_min
        if not limit:
            return
        last = self._last_call.get(plugin.name)
        if last is not None:
            wait = last + 60.0 / float(limit) - self.clock()
            if wait > 0:
                self.sleep(wait)
        self._last_call[plugin.name] = self.clock()
