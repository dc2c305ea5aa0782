"""The composition root: every collaborator built from one config, in one place.

The web app, the worker, the catch-up, the monitor, the cache warm-up and ``check`` take a
``Services`` instead of each building its own clients and stores, so how a ThreatQ client,
an enricher or the sync is made is written once. Stores open their SQLite connections
lazily (per thread), so building a ``Services`` touches neither the network nor the disk.
Clients are made per call: a ``requests.Session`` and its token refresh are not shared
across threads.
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional

from tq_mw_thehive.config import Config, shared_state
from tq_mw_thehive.enrichment.cache import ResultCache
from tq_mw_thehive.enrichment.keys import KeyStore
from tq_mw_thehive.enrichment.deferred import Drainer
from tq_mw_thehive.enrichment.monitor import Monitor, WatchList
from tq_mw_thehive.enrichment.quota import QuotaBook
from tq_mw_thehive.enrichment.registry import Registry
from tq_mw_thehive.enrichment.runner import Enricher
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync import Sync
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive.api import TheHiveClient
from tq_mw_thehive.threatq.api import ThreatQClient
from tq_mw_thehive.threatq.objects import ThreatQObjects
from tq_mw_thehive.type_mapping import TypeMapping
from tq_mw_thehive.writeback import Outbox


class Services:
    def __init__(self, cfg: Config, inbox: Optional[Inbox] = None) -> None:
        self.cfg = cfg
        if inbox is not None:
            self.inbox = inbox

    # --- the state database: one store object per table family, shared by this process --------

    @cached_property
    def inbox(self) -> Inbox:
        return Inbox(self.cfg.state_db)

    @cached_property
    def sync_state(self) -> SyncState:
        return SyncState(self.cfg.state_db)

    @cached_property
    def watches(self) -> WatchList:
        return WatchList(self.cfg.state_db)

    @cached_property
    def cache(self) -> ResultCache:
        return ResultCache(self.cfg.state_db)

    @cached_property
    def keys(self) -> KeyStore:
        return KeyStore(self.cfg.state_db)

    @cached_property
    def quota(self) -> QuotaBook:
        return QuotaBook(self.cfg.state_db)

    @cached_property
    def outbox(self) -> Optional[Outbox]:
        """What TheHive is to be told (``writeback.enabled``); None when write-back is off."""
        return Outbox(self.cfg.state_db) if self.cfg.writeback.enabled else None

    @cached_property
    def types(self) -> TypeMapping:
        return TypeMapping.from_config(self.cfg.sync)

    @cached_property
    def registry(self) -> Registry:
        """The plugins, imported once per process, when first asked for (not at boot)."""
        return Registry.discover(self.cfg.enrichment.plugin_dirs)

    # --- clients and workers: a new one per caller (per thread) ----------------------------------

    def threatq(self, **kwargs) -> ThreatQClient:
        """``kwargs``: retry settings (``check`` gives up sooner than the worker)."""
        return ThreatQClient.from_config(self.cfg, **kwargs)

    def thehive(self, **kwargs) -> Optional[TheHiveClient]:
        """None without ``thehive.api_key``: the sync then works from what events carry."""
        return TheHiveClient.from_config(self.cfg, **kwargs) if self.cfg.thehive.api_key else None

    def enricher(self) -> Optional[Enricher]:
        """None when ``enrichment.enabled`` is false."""
        if not self.cfg.enrichment.enabled:
            return None
        return Enricher(self.cfg, self.registry, self.cache, self.keys, quota=self.quota)

    def sync(self) -> Sync:
        """One per worker thread: its clients are its own."""
        return Sync(self.cfg, self.threatq(), self.thehive(), self.sync_state, self.types,
                    enricher=self.enricher(), watches=self.watches, outbox=self.outbox)

    def objects(self, threatq: Optional[ThreatQClient] = None) -> ThreatQObjects:
        return ThreatQObjects(threatq or self.threatq(), self.cfg.threatq.source, self.cfg.local_dir,
                              shared_state(self.cfg))

    def monitor(self, enricher: Enricher) -> Monitor:
        """Re-checks of the watch list that write changed answers to ThreatQ as the sync does."""
        return Monitor(enricher, self.watches, self.objects(), self.types,
                       on_verdict=self._verdict_changed if self.outbox is not None else None)

    def drainer(self, owner: str) -> Optional[Drainer]:
        """The lookups that waited for quota, run when it returns; None when enrichment is off."""
        enricher = self.enricher()
        if enricher is None:
            return None
        return Drainer(enricher, self.quota, self.monitor(enricher), owner)

    def _verdict_changed(self, indicator_ids, plugin: str, verdict: Optional[str]) -> None:
        """A watched IOC's new verdict: the verdict tag of its TheHive observables follows."""
        self.outbox.set_verdict(self.sync_state.observables_of(indicator_ids), self.cfg.writeback.tag_prefix,
                                plugin, verdict)
