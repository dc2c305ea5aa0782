"""A case's queued events applied together, so that a burst costs a handful of ThreatQ calls.

An analyst pastes 300 observables into a case; TheHive sends 300 webhooks in a second. One
at a time, each costs a look-up and a consume call: at a real ThreatQ's 50 ms a call, most
of a minute. Here the worker hands over the events of one case that are due, in TheHive's
order (``Inbox.claim_batch``), and the new observables among them are written together: one
look-up per 100 values (``ThreatQClient.find_indicators``), one consume call per 500 new
indicators carrying their attributes, enrichment, tags, source TLP and case link. Everything
else (case events, deletes, thin updates, observables ThreatQ already has) takes the same
path as a single event, in order.

What stays true: the events of a case are applied in order, one object's events never
overlap, each event has its own outcome and log line, and the first event that fails stops
the batch; the events after it are handed back untouched (``None``), to be claimed again
after it, as if they had never been taken.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
from typing import Dict, List, Sequence, Set, Tuple, Union

from tq_mw_thehive.inbox import InboxItem
from tq_mw_thehive.mapping import map_observable
from tq_mw_thehive.sync import (Outcome, PendingObservable, Sync, carried_object, carries_object,
                                enrichment_key)
from tq_mw_thehive.threatq.api import ThreatQStepRefused
from tq_mw_thehive.threatq.objects import indicator_key

ENRICH_THREADS = 4   # indicator values enriched at once in a batch (each runs its plugins side by side)

Result = Union[Outcome, Exception, None]   # None: not applied, give it back


def handle_batch(sync: Sync, items: Sequence[InboxItem]) -> List[Result]:
    """Each event's outcome or error, in order; ``None`` for those after the first failure."""
    latest = _latest_states(items)
    results: List[Result] = [None] * len(items)
    _apply_in_order(sync, items, latest, results)
    for index, later in latest.items():
        if isinstance(results[index], Outcome):
            results[index].note(f"applied the state of inbox event {items[later].id} (queued behind it)")
    return results


def _apply_in_order(sync: Sync, items: Sequence[InboxItem], latest: Dict[int, int], results: List[Result]) -> None:
    group: List[Tuple[int, PendingObservable]] = []
    grouped: Set[str] = set()
    enriched = _enrich_together(sync, items)
    for index, item in enumerate(items):
        try:
            event, payload, ts = sync.parse(items[latest.get(index, index)])
            if event.object_type == "observable" and event.action != "delete" and event.object_id in grouped:
                if not _write_group(sync, group, results):   # a second change of one object: after the first
                    return
                group, grouped = [], set()
            if event.object_type == "observable" and event.action != "delete":
                pending = sync.observable_to_write(event, payload, ts, enriched)
                if isinstance(pending, PendingObservable):
                    group.append((index, pending))
                    grouped.add(pending.obs_id)
                    continue
                results[index] = pending
                continue
            if not _write_group(sync, group, results):
                return
            group, grouped = [], set()
            results[index] = sync.apply(event, payload, ts)
        except Exception as exc:  # this event's error; the ones after it wait for its retry
            if _write_group(sync, group, results):
                results[index] = exc
            return
    _write_group(sync, group, results)


def _enrich_together(sync: Sync, items: Sequence[InboxItem]) -> Dict[tuple, list]:
    """The plugin runs of every indicator value the batch's observables carry, ``ENRICH_THREADS``
    values at a time (each value's plugins run side by side inside ``Enricher.run``, from the
    cache where it can): a burst does not wait for one lookup after the other. An event that
    cannot be read here is left to its own turn, which says why."""
    if sync.enricher is None:
        return {}
    wanted: Dict[tuple, None] = {}  # in the events' order: over quota, the first ones get the lookups
    for item in items:
        try:
            event, payload, _ = sync.parse(item)
            obj = carried_object(payload)
            if event.object_type != "observable" or event.action == "delete" or obj is None:
                continue
            observable = sync.observable_of(obj)
            mapped = map_observable(observable, sync.types, status=sync.sync.indicator_status)
        except Exception:
            continue
        wanted.update((enrichment_key(observable, indicator), None) for indicator in mapped.indicators)
    if len(wanted) < 2:
        return {}
    keys = list(wanted)
    # Each in a copy of this thread's context: the event's log scope (values withheld) goes along.
    calls = [(contextvars.copy_context(), key) for key in keys]
    with concurrent.futures.ThreadPoolExecutor(ENRICH_THREADS, thread_name_prefix="tq-enrich") as pool:
        return dict(zip(keys, pool.map(lambda call: call[0].run(sync.enrich, *call[1]), calls)))


def _latest_states(items: Sequence[InboxItem]) -> Dict[int, int]:
    """For a create or update followed in the batch by later ones of the same object (before
    any delete of it), the index of the last that carries the whole object: its state is
    applied at once, and the ones in between find it applied (as ``Worker`` coalesces)."""
    latest: Dict[int, int] = {}
    for i, item in enumerate(items):
        if item.object_id is None or item.action not in ("create", "update"):
            continue
        for j in range(i + 1, len(items)):
            later = items[j]
            if (later.object_type, later.object_id) != (item.object_type, item.object_id):
                continue
            if later.action not in ("create", "update"):
                break
            if carries_object(later.body):
                latest[i] = j
    return latest


def _write_group(sync: Sync, group: List[Tuple[int, PendingObservable]], results: List[Result]) -> bool:
    """Write the indicators of the grouped observables; False when one failed (it carries the
    error; the later ones of the group are left as None)."""
    for position, (index, pending) in enumerate(group):
        if not pending.stored_ids:
            return _write_new(sync, group[position:], results)
        try:  # an observable ThreatQ already has: read and updated by its stored ids
            results[index] = sync.observable_written(pending, sync.write_indicators(pending))
        except Exception as exc:
            results[index] = exc
            return False
    return True


def _write_new(sync: Sync, group: List[Tuple[int, PendingObservable]], results: List[Result]) -> bool:
    """New observables (and any update after them, one by one): their indicators looked up in
    bulk and the missing ones consumed together, all under their locks."""
    fresh = [(index, pending) for index, pending in group if not pending.stored_ids]
    wanted = [(index, pending, k, indicator, runs, sync.tq.indicator_type_id(indicator.type))
              for index, pending in fresh for k, (indicator, runs) in enumerate(pending.plan)]
    written: Dict[Tuple[int, int], int] = {}
    done = 0
    try:
        with sync.objects.locks(indicator_key(w[3].type, w[3].value) for w in wanted):
            hits = _look_up(sync, [(w[3].value, w[5]) for w in wanted])
            new, seen = [], set()
            for w in wanted:
                key = (w[3].value, w[5])
                if key not in hits and key not in seen:
                    seen.add(key)
                    new.append(w)
            items = [sync.consume_item(w[1], w[3], w[5], w[4]) for w in new]
            for (index, pending, k, _, _, _), tq_id in zip(new, sync.objects.consume_many("indicators", items)):
                if tq_id is not None:
                    sync.state.record(pending.obs_id, "observable", "indicators", tq_id, pending.case_id)
                    written[(index, k)] = tq_id
            for index, pending in fresh:
                ids = []
                for k, (indicator, runs) in enumerate(pending.plan):
                    if (index, k) not in written:   # found, a second of one value, or not consumed
                        type_id = sync.tq.indicator_type_id(indicator.type)
                        hit = hits.get((indicator.value, type_id)) or \
                            sync.tq.find_indicator(indicator.value, type_id, expand=True)
                        written[(index, k)] = sync.write_indicator(
                            pending.obs_id, pending.case_id, indicator, type_id, runs, pending.case_ref,
                            pending.tags, pending.synced_tags, hit)
                    ids.append(written[(index, k)])
                results[index] = sync.observable_written(pending, ids)
                done += 1
    except Exception as exc:
        results[fresh[done][0]] = exc
        return False
    rest = [(index, pending) for index, pending in group if pending.stored_ids]
    return _write_group(sync, rest, results) if rest else True


def _look_up(sync: Sync, keys: List[Tuple[str, int]]) -> Dict[Tuple[str, int], dict]:
    """The indicators ThreatQ has of these (value, type id): in bulk, else one value at a time
    where the instance does not take the bulk criteria."""
    try:
        return sync.tq.find_indicators([value for value, _ in keys], expand=True)
    except ThreatQStepRefused:
        pass
    hits: Dict[Tuple[str, int], dict] = {}
    for key in dict.fromkeys(keys):
        hit = sync.tq.find_indicator(*key, expand=True)
        if hit is not None:
            hits[key] = hit
    return hits
