"""Run the plugins that take a value: gate, cache, timeout, and one record per plugin.

The gate (``gate.refusal``: TLP, PAP, and no non-global address to an external plugin) is asked
for every plugin and value, from the plugin's checked declarations (its ``PluginSpec``); the
lookup and ``prepare`` called are the ones checked when the plugin loaded.

A failing or slow plugin never fails the event: each lookup runs under
``enrichment.timeout`` in a small thread pool, and whatever it raises becomes an
``error`` record in the log, never an exception here. Cached answers make no call.

A plugin may define ``prepare(request)``: a one-off setup (e.g. building or opening an on-disk index of its
package data, ``offline_index.py``) that is called before each lookup, outside the timeout; it must
be cheap once done. What it raises is the lookup's error.

A plugin skipped for what it is (no API key, disabled by config) rather than for the value is
said once per process: the same line for every observable would bury the lines that matter.

Quotas (``quota.py``): after the cache missed, a lookup asks the quota book; over quota, or after
a 429, it is not made: the run says ``deferred`` and the lookup is queued (``queue=True``) for
``deferred.Drainer``, or it says ``over_quota`` (``queue=False``, the ``enrich`` command).
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import requests

from tq_mw_thehive import logs, metrics
from tq_mw_thehive.progress import age_text
from tq_mw_thehive.config import Config
from tq_mw_thehive.enrichment import gate, offline_index
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.plugin import Lookup, NotFound, QuotaExceeded, Result
from tq_mw_thehive.enrichment.quota import PRIORITY, QuotaBook, Refusal, key_id, limits_for
from tq_mw_thehive.enrichment.registry import PluginInfo, Registry, plugin_state, ttl_s

log = logging.getLogger(__name__)

# (plugin, state) pairs this process has logged already: each is said once, not per observable.
_said = logs.Once()
_quota_said = logs.Once()   # (plugin, limit) reached: said once per process, the queue holds the rest


def _hhmm(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


@dataclass
class PluginRun:
    """What one plugin did for one value."""

    plugin: str
    title: str
    status: str                      # fetched, cached, not_found, skipped, error, deferred, over_quota
    verdict: Optional[str] = None
    data: Dict = field(default_factory=dict)
    attributes: Dict[str, str] = field(default_factory=dict)   # ThreatQ attributes, incl. "<Title> Verdict"
    age_s: Optional[float] = None    # for cached answers
    reason: str = ""
    ms: float = 0.0
    for_plugin: bool = False         # skipped for what the plugin is (no key, disabled), not for the value
    retry_at: Optional[float] = None  # deferred or over_quota: when quota returns (epoch seconds)

    def describe(self) -> str:
        if self.status in ("cached", "not_found") and self.age_s is not None:
            return f"{'cached' if self.status == 'cached' else 'not found (cached)'}, {age_text(self.age_s)} old"
        return self.reason or self.status


class Enricher:
    def __init__(self, cfg: Config, registry: Registry, cache: ResultCache, keys: KeyStore,
                 session: Optional[requests.Session] = None, workers: int = 4,
                 quota: Optional[QuotaBook] = None) -> None:
        self.cfg = cfg
        self.settings = cfg.enrichment
        # The offline plugins' on-disk indexes live next to the state database (offline_index.py).
        offline_index.set_directory(offline_index.for_local_dir(cfg.local_dir))
        self.registry = registry
        self.cache = cache
        self.keys = keys
        self.quota = quota
        self.session = session or requests.Session()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tq-plugin")

    @classmethod
    def from_config(cls, cfg: Config, **kwargs) -> "Enricher":
        registry = Registry.discover(cfg.enrichment.plugin_dirs)
        kwargs.setdefault("quota", QuotaBook(cfg.state_db))
        return cls(cfg, registry, ResultCache(cfg.state_db), KeyStore(cfg.state_db), **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def limits(self, info: PluginInfo):
        """The quota limits in force for ``info`` (``enrichment.limits``, else its declarations)."""
        return limits_for(info, self.settings.limits)

    def plugins_for(self, data_type: str, only: Optional[str] = None) -> List[PluginInfo]:
        return [p for p in self.registry.loaded()
                if data_type in p.data_types and (only is None or p.name == only)]

    def run(self, data_type: str, value: str, tlp: Optional[str] = None, pap: Optional[str] = None, *,
            bypass_cache: bool = False, only: Optional[str] = None, origin: str = "case",
            queue: bool = True) -> List[PluginRun]:
        """Every enabled plugin that takes ``data_type``, each gated, cached and timed. Over
        quota, a lookup is queued (``origin``: ``case`` or ``monitor``, its priority) unless
        ``queue`` is False."""
        if not self.settings.enabled:
            return []
        max_tlp = self.cfg.logs.max_tlp_values
        shown = logs.loggable(value[:80], tlp, max_tlp)
        runs = []
        # Also in plugin threads (a copy of this context): a value above logs.max_tlp_values is
        # withheld from an error's reason and from a plugin's own lines too.
        with logs.withholding(max_tlp) as withheld:
            withheld.add([value], tlp)
            for info in self.plugins_for(data_type, only):
                run = self._one(info, data_type, value, tlp, pap, bypass_cache, origin if queue else None)
                metrics.plugin_ran(run)
                if run.status in ("deferred", "over_quota"):
                    log.debug("enrichment %s %s value=%r outcome=%s reason=%r", info.name, data_type, shown,
                              run.status, run.reason)
                elif run.for_plugin and _said.first((info.name, run.reason)):
                    log.info("enrichment %s skipped for every value until this changes: %s", info.name, run.reason)
                elif run.status in ("skipped", "error"):
                    level = (logging.WARNING if run.status == "error" else
                             logging.DEBUG if run.for_plugin else logging.INFO)
                    log.log(level, "enrichment %s %s value=%r outcome=%s reason=%r", info.name, data_type,
                            shown, run.status, run.reason)
                runs.append(run)
        return runs

    def refusal(self, info: PluginInfo, data_type: str, value: str, tlp: Optional[str],
                pap: Optional[str]) -> Optional[str]:
        """Why the gate keeps this value from ``info`` under this config, or None."""
        return gate.refusal(info.spec, tlp, pap, self.settings.max_tlp_external, self.settings.max_pap_active,
                            data_type, value)

    def _one(self, info: PluginInfo, data_type: str, value: str, tlp: Optional[str], pap: Optional[str],
             bypass_cache: bool, origin: Optional[str], from_queue: bool = False) -> PluginRun:
        """One plugin for one value. ``origin``: queue it over quota with this priority (None: say
        so, do not queue); ``from_queue``: the drainer's turn, ahead of the queue, never queued again."""
        run = PluginRun(info.name, info.title, "skipped")
        state = plugin_state(info, self.settings, self.keys)
        if state != "enabled":
            run.reason, run.for_plugin = state, True
            return run
        refusal = self.refusal(info, data_type, value, tlp, pap)
        if refusal:
            run.reason = refusal
            return run
        if not bypass_cache:
            hit = self.cache.get(info.name, info.version, data_type, value)
            metrics.enrichment_cache(info.name, hit=hit is not None)
            if hit is not None:
                self.cache.count(info.name, hit=True)
                return self._with_result(run, "cached" if hit.found else "not_found", hit.verdict, hit.data,
                                         hit.attributes, age_s=hit.age_s())
        keys = self.keys.resolve(info.api_keys)
        kid = key_id(keys)
        limits = self.limits(info)
        ask = None if from_queue else (data_type, value, tlp, pap, origin)
        if self.quota is not None and (info.external or limits.any):  # an offline plugin: no read at all
            refusal = self.quota.take(info.name, kid, limits, PRIORITY[origin or "case"], behind_queue=not from_queue)
            if refusal is not None:
                return self._refused(run, info, kid, refusal, ask)
        return self._fetch(info, run, data_type, value, keys, ask)

    def run_deferred(self, row, info: Optional[PluginInfo]) -> PluginRun:
        """A queued lookup (a row of ``enrichment_deferred``; ``info``: its plugin, None when it no
        longer loads), when the drainer tries it: through the same plugin state, gate (the config
        may have changed) and cache (a case's lookup; a monitor re-check asks the service again)
        as a live lookup, ahead of newer lookups. ``deferred`` again: still no quota (the row stays)."""
        if info is None:
            return PluginRun(row["plugin"], row["plugin"], "skipped", reason="plugin not loaded", for_plugin=True)
        with logs.withholding(self.cfg.logs.max_tlp_values) as withheld:
            withheld.add([row["value"]], row["tlp"])
            run = self._one(info, row["data_type"], row["value"], row["tlp"], row["pap"],
                            bypass_cache=row["origin"] == "monitor", origin=row["origin"], from_queue=True)
        metrics.plugin_ran(run)
        return run

    def _refused(self, run: PluginRun, info: PluginInfo, kid: str, refusal: Refusal,
                 queue: Optional[tuple]) -> PluginRun:
        """Over quota or paused: queued when ``queue`` is (data_type, value, tlp, pap, origin) with an
        origin. A limit reached is said once per process and plugin (the status page shows the rest);
        a lookup queued behind others is a consequence of that, and a 429 has its own warning."""
        run.retry_at = refusal.retry_at
        data_type, value, tlp, pap, origin = queue if queue is not None else (None, None, None, None, None)
        if origin is not None:
            self.quota.defer(info.name, kid, data_type, value, tlp, pap, origin, refusal.retry_at)
            run.status, run.reason = "deferred", f"{refusal.reason}: queued until quota returns"
        elif queue is not None:
            run.status, run.reason = "over_quota", f"{refusal.reason}; next call possible at {_hhmm(refusal.retry_at)}"
        else:
            run.status, run.reason = "deferred", refusal.reason
        if refusal.kind == "limit" and _quota_said.first((info.name, refusal.reason)):
            log.info("enrichment %s %s: its lookups wait in the queue (enrichment_deferred) and are applied in "
                     "order when quota returns", info.name, refusal.reason)
        return run

    def _fetch(self, info: PluginInfo, run: PluginRun, data_type: str, value: str, keys, queue: Optional[tuple]
               ) -> PluginRun:
        request = Lookup(data_type=data_type, value=value.strip(), keys=keys,
                         settings=(self.settings.plugins or {}).get(info.name, {}), session=self.session,
                         timeout=self.settings.timeout)
        started = time.monotonic()
        try:
            if info.spec.prepare is not None:   # one-off setup (an offline index built or opened): not timed
                info.spec.prepare(request)
                started = time.monotonic()
            future = self._pool.submit(contextvars.copy_context().run, info.spec.lookup, request)
            result = future.result(timeout=self.settings.timeout)
            if not isinstance(result, Result):
                raise TypeError(f"lookup returned {type(result).__name__}, not a Result")
        except NotFound as exc:
            run.ms = (time.monotonic() - started) * 1000
            self.cache.count(info.name, miss=True, lookup_ms=run.ms)
            self.cache.put(info.name, info.version, data_type, value, found=False, verdict=None, data={},
                           attributes={}, ttl_s=ttl_s(info, self.settings, found=False))
            run.status, run.reason = "not_found", str(exc) or "not found"
            return run
        except concurrent.futures.TimeoutError:
            run.status, run.reason = "error", f"timed out after {self.settings.timeout:g} s"
        except QuotaExceeded as exc:
            if self.quota is None:
                run.status, run.reason = "error", f"quota exceeded: {exc}"
            else:
                reason, kid = logs.redact(str(exc)) or "HTTP 429", key_id(keys)
                until = self.quota.pause(info.name, kid, exc.retry_after_s, reason)
                log.warning("enrichment %s refused for quota (%s): paused until %s, its lookups queued",
                            info.name, reason, _hhmm(until))
                self.cache.count(info.name, error=True)
                return self._refused(run, info, kid, Refusal(f"paused after {reason}", until, "paused"), queue)
        except Exception as exc:  # any plugin failure is contained here
            run.status, run.reason = "error", f"{type(exc).__name__}: {exc}"
        else:
            run.ms = (time.monotonic() - started) * 1000
            self.cache.count(info.name, miss=True, lookup_ms=run.ms)
            self.cache.put(info.name, info.version, data_type, value, found=True, verdict=result.verdict,
                           data=result.data, attributes=result.attributes, ttl_s=ttl_s(info, self.settings, True))
            return self._with_result(run, "fetched", result.verdict, result.data, result.attributes)
        run.ms = (time.monotonic() - started) * 1000
        run.reason = logs.redact(run.reason)  # a plugin may quote its own key in an error
        self.cache.count(info.name, error=True)
        return run

    @staticmethod
    def _with_result(run: PluginRun, status: str, verdict: Optional[str], data: Dict,
                     attributes: Dict[str, str], age_s: Optional[float] = None) -> PluginRun:
        run.status, run.verdict, run.data, run.age_s = status, verdict, data, age_s
        if status != "not_found":
            run.attributes = {**{k: str(v) for k, v in attributes.items()}, f"{run.title} Verdict": verdict or "info"}
        return run
