"""ThreatQ objects as the sync wants them: upsert one, then reconcile its attributes, tags,
source and links, each write of one object under that object's lock.

``Sync`` decides what an event means and in which order objects are touched; this module
knows how one object is brought to a desired state with the fewest calls, whoever asks
(the sync for a TheHive event, the monitor for a changed verdict):

- a new object is made in one consume call where the instance has it; when the consume is
  refused (400, no endpoint) it is made call by call; when the answer names nothing it is
  looked up first (ThreatQ may well have made it);
- an existing object is updated in place, with its sub-resources read inline (``with=``)
  where ThreatQ puts them there, else with their own call;
- exactly one value per synced attribute; tags added when missing and removed only when we
  had synced them; our source added, its TLP changed best effort;
- calls without public evidence (a source's TLP change, reading tags or sources with their
  own call, removing a tag) are optional: refused, they are skipped with a warning
  (``ThreatQStepRefused``), never a dead letter.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from tq_mw_thehive import state_postgres
from tq_mw_thehive.mapping import Attribute
from tq_mw_thehive.state_postgres import PostgresURL
from tq_mw_thehive.threatq.api import (ThreatQPermanentError, ThreatQStepRefused, attribute_name, record_type_id,
                                       source_pivot_id, source_tlp)

log = logging.getLogger(__name__)

Known = Dict[str, List[dict]]   # an object's sub-resources as ThreatQ answered them inline

_LOCK_BUCKETS = 64
CONSUME_MANY = 500   # objects in one consume call, as ThreatQ's SDK2 bulk_upload sends them

_INLINE_NEEDS: Dict[str, Callable[[dict], bool]] = {
    "attributes": lambda a: "id" in a and attribute_name(a) is not None,  # `name` or `attribute.name`
    "sources": lambda s: "name" in s,
    "tags": lambda t: "id" in t and "name" in t,
}


def inline(record: Optional[dict]) -> Known:
    """The sub-resources ThreatQ put inline in ``record`` (``with=``), each only if well formed;
    what is missing is read with its own call. [guess] inline items are shaped like the lists."""
    known: Known = {}
    for name, well_formed in _INLINE_NEEDS.items():
        items = (record or {}).get(name)
        if isinstance(items, list) and all(isinstance(i, dict) and well_formed(i) for i in items):
            known[name] = items
    return known


def _or_read(known: Optional[Known], name: str, read: Callable[[], List[dict]]) -> List[dict]:
    """The sub-resource ``name`` as ThreatQ answered it inline, else read with its own call."""
    return known[name] if known and name in known else read()


def _or_read_optional(known: Optional[Known], name: str, read: Callable[[], List[dict]]) -> Optional[List[dict]]:
    """As ``_or_read`` for a read without public evidence: ``None`` when ThreatQ refuses it."""
    try:
        return _or_read(known, name, read)
    except ThreatQStepRefused:
        return None


def same_indicator(record: dict, value: str, type_id: int) -> bool:
    """Whether a record read by its stored id is still this indicator (value up to case, type)."""
    answered = record.get("value")
    return (isinstance(answered, str) and answered.casefold() == value.casefold()
            and record_type_id(record) in (None, type_id))


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % _LOCK_BUCKETS


def indicator_key(indicator_type: str, value: str) -> str:
    """The lock key of one ThreatQ indicator, for every writer of it (sync, monitor)."""
    return f"indicator:{indicator_type}:{value.casefold()}"


@dataclass(frozen=True)
class Upsert:
    """One object to bring into ThreatQ, and how: the caller knows the object kind's calls."""

    collection: str                          # "indicators", "events", "incident"
    what: str                                # its value or title, for log lines
    tlp_id: Optional[int]                    # TheHive's TLP for our source on it
    consume_item: Callable[[], dict]         # the whole new object for one consume call
    find: Callable[[], Optional[dict]]       # look it up (after a consume answer that names nothing)
    create: Callable[[], int]                # make it call by call → its id
    update: Callable[[dict], Known]          # update an existing one in place → its inline sub-resources


@dataclass
class Written:
    """What ``upsert`` did: the object's id; ``fresh`` when made just now (nothing to read back);
    ``consumed`` when one consume call carried everything (attributes, tags, links)."""

    collection: str
    tq_id: int
    fresh: bool
    consumed: bool = False
    known: Known = field(default_factory=dict)


@dataclass(frozen=True)
class _Consumed:
    tq_id: Optional[int] = None  # the object's id, when the answer named it
    answered: bool = False       # ThreatQ carried the call out: the object may exist without being named


class StoredIndicators:
    """The indicators the state database says an observable became, read by id (with their
    sub-resources inline) only when asked for: the id stored locally is trusted before any
    look-up by value. One that ThreatQ no longer has (404) is forgotten through ``forget``."""

    def __init__(self, tq, ids: Iterable[int], forget: Callable[[int], None]) -> None:
        self.tq, self.ids, self.forget = tq, list(ids), forget
        self.records: Dict[int, Optional[dict]] = {}

    def take(self, value: str, type_id: int) -> Optional[dict]:
        for tq_id in list(self.ids):
            record = self._read(tq_id)
            if record is not None and same_indicator(record, value, type_id):
                self.ids.remove(tq_id)
                return record
        return None

    def _read(self, tq_id: int) -> Optional[dict]:
        if tq_id not in self.records:
            try:
                self.records[tq_id] = self.tq.get("indicators", tq_id, expand=True)
            except ThreatQPermanentError as exc:
                if exc.status != 404:
                    raise
                self.forget(tq_id)
                self.records[tq_id] = None
        return self.records[tq_id]


class ThreatQObjects:
    """The write primitives of the sync, over one ``ThreatQClient`` (not shared across threads)."""

    def __init__(self, tq, source: str, lock_dir: Path, shared: Optional[PostgresURL] = None) -> None:
        self.tq = tq
        self.source_name = source
        self.lock_dir = Path(lock_dir)
        self.shared = shared  # the state is on PostgreSQL: daemons on other hosts write ThreatQ too

    # --- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """A lock shared by every process of this daemon and its CLI (flock on one of a few files
        beside the state database; a PostgreSQL advisory lock, for every host, when the state is
        shared), so that one ThreatQ object is looked up, created and written by one of them at a
        time: ThreatQ does not de-duplicate, and two writers of one attribute would each keep
        their own value."""
        with self.locks([key]):
            yield

    @contextlib.contextmanager
    def _bucket_lock(self, bucket: int) -> Iterator[None]:
        locks = self.lock_dir / ".locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        with open(locks / f"{bucket}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locks(self, keys: Iterable[str]) -> Iterator[None]:
        """The locks of several objects at once (a burst's new indicators), taken in one order
        so that two holders of overlapping sets cannot deadlock; a lock file shared by two keys
        is taken once."""
        buckets = sorted({_bucket(key) for key in keys})
        if self.shared is not None:
            with state_postgres.session_locks(self.shared, [f"threatq-object:{b}" for b in buckets],
                                              state_postgres.LOCK_WAIT_S):
                yield
            return
        with contextlib.ExitStack() as stack:
            for bucket in buckets:
                stack.enter_context(self._bucket_lock(bucket))
            yield

    # --- one object ----------------------------------------------------------------------------

    def source(self, tlp_id: Optional[int]) -> dict:
        source = {"name": self.source_name}
        if tlp_id is not None:
            source["tlp_id"] = tlp_id
        return source

    def upsert(self, plan: Upsert, hit: Optional[dict]) -> Written:
        """``hit`` (the object found by the caller's look-up, at least ``{"id": …}``) updated in
        place; else a new one, consumed in one call, else found after a consume whose answer
        did not name it, else created call by call."""
        if hit is None:
            consumed = self._consume(plan.collection, plan.consume_item(), plan.what)
            if consumed.tq_id is not None:
                return Written(plan.collection, consumed.tq_id, fresh=True, consumed=True)
            hit = plan.find() if consumed.answered else None
            if hit is None:
                return Written(plan.collection, plan.create(), fresh=True)
        known = plan.update(hit)
        self.sync_source(plan.collection, hit["id"], plan.tlp_id, known)
        return Written(plan.collection, hit["id"], fresh=False, known=known)

    def reconcile(self, written: Written, attributes: Iterable[Attribute], managed: Iterable[str],
                  tags: Sequence[str], synced_tags: Iterable[str]) -> None:
        """The synced attributes and tags of an object ``upsert`` did not consume (a consumed one
        got them in its one call)."""
        if written.consumed:
            return
        self.sync_attributes(written.collection, written.tq_id, attributes, managed, written.fresh,
                             known=written.known)
        self.sync_tags(written.collection, written.tq_id, written.fresh, tags, synced_tags, known=written.known)

    def consume_many(self, collection: str, items: List[dict]) -> List[Optional[int]]:
        """New objects in consume calls of up to ``CONSUME_MANY`` items (SDK2 ``bulk_upload``
        sends 500): each item's id, None where the answer names none or the instance has no
        consume, or refused a call (400: one bad item refuses the lot): the caller makes those
        one by one, looking each up first."""
        ids: List[Optional[int]] = []
        for start in range(0, len(items), CONSUME_MANY):
            part = items[start:start + CONSUME_MANY]
            try:
                records = self.tq.consume(collection, part)
            except ThreatQPermanentError as exc:
                if exc.status != 400:
                    raise
                log.warning("ThreatQ refused to consume %d %s at once (%s); creating them one by one",
                            len(part), collection, exc)
                records = None
            if records is None:
                ids += [None] * len(part)
                continue
            for item, record in zip(part, records):
                if record is None:
                    log.warning("ThreatQ's answer to POST /api/%s/consume names no record for %r; looking it up",
                                collection, item.get("value", item.get("title")))
                ids.append(int(record["id"]) if record else None)
        return ids

    def _consume(self, collection: str, item: dict, what: str) -> _Consumed:
        """One consume call. Without an id the caller goes call by call: no such endpoint, or a
        400 (its item shape is partly a guess: the call-by-call path may be accepted, and if
        ThreatQ refuses that too, its error dead-letters the event). An answer that names no
        record for the object (``answered``) makes the caller look it up first: ThreatQ may
        well have made it."""
        try:
            records = self.tq.consume(collection, [item])
        except ThreatQPermanentError as exc:
            if exc.status != 400:
                raise
            log.warning("ThreatQ refused to consume %s %r (%s); creating it call by call", collection, what, exc)
            return _Consumed()
        if records is None:
            return _Consumed()
        if records[0] is None:
            log.warning("ThreatQ's answer to POST /api/%s/consume names no record for %r; looking it up",
                        collection, what)
            return _Consumed(answered=True)
        return _Consumed(int(records[0]["id"]), answered=True)

    # --- sub-resources -------------------------------------------------------------------------

    def sync_source(self, collection: str, tq_id: int, tlp_id: Optional[int], known: Optional[Known] = None) -> None:
        """Our source on the object, with TheHive's TLP where ThreatQ shows the source's TLP.

        The TLP is set when the object is created or consumed. Many answers show sources
        without it (link rows, SS): then it is left alone. Changing it (``PUT …/sources/{pivot}``)
        has no public evidence: tried only where a TLP really changed, best effort. Unreadable
        sources (not inline, ``GET …/sources`` refused) are left alone too."""
        sources = _or_read_optional(known, "sources", lambda: self.tq.sources(collection, tq_id))
        if sources is None:
            return
        mine = next((s for s in sources if s.get("name") == self.source_name), None)
        if mine is None:
            self.tq.add_source(collection, tq_id, self.source_name, tlp_id)
            return
        shown, pivot = source_tlp(mine), source_pivot_id(mine)
        if tlp_id is None or shown is None or shown == tlp_id or pivot is None:
            return
        _best_effort("source_tlp", f"{collection}/{tq_id}",
                     lambda: self.tq.set_source_tlp(collection, tq_id, pivot, tlp_id))

    def sync_attributes(self, collection: str, tq_id: int, desired: Iterable[Attribute], managed: Iterable[str],
                        fresh: bool = False, source: Optional[str] = None, known: Optional[Known] = None) -> None:
        """Exactly one value per synced attribute, changed in place; ours that went away are removed.

        ``known``: the object's sub-resources as ThreatQ answered them inline, read before any
        change of this event; valid for ``managed`` names no earlier step of the event changed.
        """
        managed = set(managed)
        have: Dict[str, List[dict]] = defaultdict(list)
        if not fresh:
            for attribute in _or_read(known, "attributes", lambda: self.tq.attributes(collection, tq_id)):
                name = attribute_name(attribute)
                if name in managed:
                    have[name].append(attribute)
        for attribute in desired:
            current = have.pop(attribute.name, [])
            if not current:
                if source:
                    self.tq.add_attribute(collection, tq_id, attribute.name, attribute.value,
                                          sources=[{"name": source}])
                else:
                    self.tq.add_attribute(collection, tq_id, attribute.name, attribute.value)
                continue
            keep = next((a for a in current if a.get("value") == attribute.value), None)
            if keep is None:
                keep = current[0]
                self.tq.update_attribute(collection, tq_id, keep["id"], attribute.value)
            for extra in current:
                if extra is not keep:
                    self.tq.delete_attribute(collection, tq_id, extra["id"])
        for leftovers in have.values():
            for attribute in leftovers:
                self.tq.delete_attribute(collection, tq_id, attribute["id"])

    def sync_tags(self, collection: str, tq_id: int, fresh: bool, desired: Sequence[str],
                  synced: Iterable[str], known: Optional[Known] = None) -> None:
        """Add TheHive's tags; remove those we ``synced`` before and TheHive no longer has.

        Reading tags with their own call and removing one have no public evidence: with tags
        neither inline nor readable, the tags not synced before are added and none is removed;
        with removal refused, the tags stay."""
        previous = set(synced)
        tags = [] if fresh else _or_read_optional(known, "tags", lambda: self.tq.tags(collection, tq_id))
        existing = None if tags is None else {t.get("name"): t.get("id") for t in tags}
        missing = [t for t in desired if t not in (previous if existing is None else existing)]
        if missing:
            self.tq.add_tags(collection, tq_id, missing)
        for name in sorted(previous - set(desired)):
            if existing and name in existing and not _best_effort(
                    "tag_delete", f"{collection}/{tq_id}",
                    lambda tag_id=existing[name]: self.tq.delete_tag(collection, tq_id, tag_id)):
                break

    def apply_enrichment(self, collection: str, tq_id: int, run, known: Optional[Known] = None) -> None:
        """A plugin's answer as attributes with the plugin as their source, one value per name."""
        attributes = [Attribute(name, value) for name, value in run.attributes.items()]
        self.sync_attributes(collection, tq_id, attributes, set(run.attributes), source=run.plugin, known=known)

    def enrich_by_value(self, indicator_types: Iterable[str], value: str, run) -> List[int]:
        """A changed plugin answer on the indicators with this value (there may be none yet),
        each under its lock, as the sync writes it: the ids written."""
        written = []
        for indicator_type in indicator_types:
            type_id = self.tq.indicator_type_id(indicator_type)
            with self.lock(indicator_key(indicator_type, value)):
                hit = self.tq.find_indicator(value, type_id)
                if hit is not None:
                    self.apply_enrichment("indicators", hit["id"], run)
                    written.append(hit["id"])
        return written

    # --- links ----------------------------------------------------------------------------------

    def link(self, case_collection: str, case_tq_id: int, indicator_id: int, fresh: bool = False) -> None:
        """Link the indicator to the case; one created a moment ago has no links to check."""
        if not fresh:
            linked = self.tq.links("indicators", indicator_id, case_collection)
            if any(link.get("id") == case_tq_id for link in linked):
                return
        self.tq.link(case_collection, case_tq_id, "indicators", indicator_id)

    def unlink(self, case_collection: str, case_tq_id: int, indicator_id: int) -> None:
        """Remove the indicator's links to the case (the indicator stays: it is intelligence)."""
        pivots = [link["pivot"]["id"] for link in self.tq.links("indicators", indicator_id, case_collection)
                  if link.get("id") == case_tq_id and isinstance(link.get("pivot"), dict)]
        if pivots:
            self.tq.unlink("indicators", indicator_id, case_collection, pivots)


def _best_effort(step: str, where: str, call: Callable[[], object]) -> bool:
    """Run an optional step; ``False`` when ThreatQ refused it. A refusal never fails the
    event: 404/405 was logged once by the client, anything else (400, 403, 409…) is logged
    here. An outage (``ThreatQUnavailable``) still retries the event, as for any call."""
    try:
        call()
    except ThreatQStepRefused:
        return False
    except ThreatQPermanentError as exc:
        log.warning("optional ThreatQ step %s failed for %s (%s); carrying on without it", step, where, exc)
        return False
    return True
