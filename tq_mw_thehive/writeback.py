"""Write-back: TheHive is told what landed in ThreatQ (``writeback.enabled``, off by default).

An observable that reached ThreatQ gets the tags ``<prefix>:indicator=<id>`` and, per plugin that
gave a verdict, ``<prefix>:verdict:<plugin>=<verdict>``; its case gets ``<prefix>:event=<id>``
(``incident=`` with ``sync.cases_as: incident``) and, when ``writeback.case_custom_field`` names
one, the ThreatQ URL in that custom field. Only the daemon's own tags are ever added or removed.

The sync does not call TheHive: it records what each object should carry (``Outbox.want``, a row
per object in table ``writeback``), and a ``Sender`` thread tells TheHive the difference from
what it was last told. So a TheHive that is down delays the tags, never the sync, and a want
that equals what TheHive has costs no call: TheHive's webhook for our own change comes back as an
update that changes nothing (our tags are never mapped to ThreatQ: ``theirs``), whose want is the
same again, and the loop ends there.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from tq_mw_thehive import state
from tq_mw_thehive.logs import Once

log = logging.getLogger(__name__)
LOCK_KEY = "writeback_lock"
LOCK_TTL_S = 300.0          # a sender that dies holding the lock frees it by then
POLL_S = 2.0                # how often a sender looks for due rows (a want in its own process wakes it)
RETRY_CAP_S = 300.0         # TheHive down: retries back off to this
BATCH = 100                 # rows sent per round
VERDICTS_SHOWN = ("safe", "suspicious", "malicious")  # "info" is a plugin's "no opinion"


def ours(tag: str, prefix: str) -> bool:
    """Whether ``tag`` is one the daemon writes (its exact shapes, not every tag with the prefix)."""
    return (tag.startswith((f"{prefix}:indicator=", f"{prefix}:event=", f"{prefix}:incident=",
                            f"{prefix}:verdict:")))


def theirs(tags: Iterable[str], prefix: str) -> tuple:
    """``tags`` without the daemon's own: what goes to ThreatQ and into the sync's digest."""
    return tuple(t for t in tags if not ours(t, prefix))


def observable_tags(prefix: str, indicator_ids: Iterable[int], runs: Iterable) -> List[str]:
    """The tags an observable should carry: its indicators (a file can be several) and each
    plugin's verdict, the worst when a plugin judged several of its values."""
    verdicts: Dict[str, str] = {}
    for run in runs:
        if run.status in ("fetched", "cached") and run.verdict in VERDICTS_SHOWN:
            known = verdicts.get(run.plugin)
            if known is None or VERDICTS_SHOWN.index(run.verdict) > VERDICTS_SHOWN.index(known):
                verdicts[run.plugin] = run.verdict
    return ([f"{prefix}:indicator={i}" for i in dict.fromkeys(indicator_ids)]
            + [f"{prefix}:verdict:{p}={v}" for p, v in sorted(verdicts.items())])


def case_tags(prefix: str, collection: str, tq_id: int) -> List[str]:
    return [f"{prefix}:{'incident' if collection == 'incident' else 'event'}={tq_id}"]


def case_url(base_url: str, collection: str, tq_id: int) -> str:
    # [guess] an incident's page path: ThreatQ's event pages are /events/<id>/details (status page).
    return f"{base_url}/{'incidents' if collection == 'incident' else 'events'}/{tq_id}/details"


class Outbox(state.Store):
    """Table ``writeback``: what each TheHive object should carry, and what TheHive was last told.

    Bookkeeping, not durable (``synchronous=NORMAL``): a power cut may undo the last wants, and the
    next change of those objects records them again.
    """

    DURABLE_WRITES = False

    def __init__(self, path, busy_timeout: float = state.BUSY_TIMEOUT_S, clock: Callable[[], float] = time.time,
                 on_due: Optional[Callable[[], None]] = None) -> None:
        super().__init__(path, busy_timeout)
        self.clock = clock
        self.on_due = on_due

    def want(self, thehive_id: str, kind: str, tags: Sequence[str], field: Optional[str] = None) -> bool:
        """Record what the object should carry; True when TheHive must be told (a row is due)."""
        now = self.clock()
        wanted = json.dumps(sorted(set(tags)))

        def put(db: sqlite3.Connection) -> bool:
            state.exclusive(db, f"writeback:{thehive_id}")
            row = db.execute("SELECT want_tags, sent_tags, want_field, sent_field, due_at FROM writeback "
                             "WHERE thehive_id = ?", (thehive_id,)).fetchone()
            if row is not None and row["want_tags"] == wanted and row["want_field"] == field and (
                    row["due_at"] is not None or (row["sent_tags"] == wanted and row["sent_field"] == field)):
                return False  # nothing new: due already, or TheHive has it
            sent = row["sent_tags"] if row is not None else "[]"
            sent_field = row["sent_field"] if row is not None else None
            due = None if wanted == sent and field == sent_field else now
            db.execute("INSERT INTO writeback (thehive_id, kind, want_tags, want_field, due_at) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (thehive_id) DO UPDATE SET want_tags = excluded.want_tags, "
                       "want_field = excluded.want_field, due_at = excluded.due_at, attempts = 0",
                       (thehive_id, kind, wanted, field, due))
            return due is not None

        due = self.write(put)
        if due and self.on_due is not None:
            self.on_due()
        return due

    def set_verdict(self, thehive_ids: Iterable[str], prefix: str, plugin: str, verdict: Optional[str]) -> int:
        """A watched IOC's verdict changed: the observables' verdict tag of ``plugin`` follows; how many."""
        changed = 0
        for thehive_id in thehive_ids:
            row = self.db.execute("SELECT kind, want_tags, want_field FROM writeback WHERE thehive_id = ?",
                                  (thehive_id,)).fetchone()
            if row is None:
                continue
            tags = [t for t in json.loads(row["want_tags"]) if not t.startswith(f"{prefix}:verdict:{plugin}=")]
            if verdict in VERDICTS_SHOWN:
                tags.append(f"{prefix}:verdict:{plugin}={verdict}")
            changed += self.want(thehive_id, row["kind"], tags, row["want_field"])
        return changed

    def due(self, limit: int = BATCH) -> List[sqlite3.Row]:
        return self.db.execute("SELECT * FROM writeback WHERE due_at IS NOT NULL AND due_at <= ? ORDER BY due_at "
                               "LIMIT ?", (self.clock(), limit)).fetchall()

    def sent(self, row: sqlite3.Row, field: bool = True) -> None:
        """TheHive has ``row``'s want (its tags; its field too unless ``field`` is False: tried
        again at the object's next change); still due if the want changed meanwhile."""
        self.write(lambda db: db.execute(
            "UPDATE writeback SET sent_tags = ?, sent_field = CASE WHEN ? = 1 THEN ? ELSE sent_field END, attempts = 0, "
            "last_error = NULL, due_at = CASE WHEN want_tags = ? AND want_field IS ? THEN NULL ELSE due_at END "
            "WHERE thehive_id = ?",
            (row["want_tags"], field, row["want_field"], row["want_tags"], row["want_field"], row["thehive_id"])))

    def failed(self, row: sqlite3.Row, error: str, retry_in_s: Optional[float]) -> None:
        """Not sent: tried again in ``retry_in_s``, or never (None: given up until the next want)."""
        due = None if retry_in_s is None else self.clock() + retry_in_s
        self.write(lambda db: db.execute(
            "UPDATE writeback SET attempts = attempts + 1, last_error = ?, due_at = ? WHERE thehive_id = ?",
            (error[:500], due, row["thehive_id"])))

    def pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM writeback WHERE due_at IS NOT NULL").fetchone()[0]


class Sender:
    """Tells TheHive what the outbox says, one process at a time (a lock in ``meta``)."""

    def __init__(self, outbox: Outbox, thehive, owner: str, custom_field: Optional[str],
                 sleep_s: float = POLL_S) -> None:
        self.outbox = outbox
        self.thehive = thehive
        self.owner = owner
        self.custom_field = custom_field
        self.sleep_s = sleep_s
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._field_refused = Once()

    def _lock(self, take: bool) -> bool:
        return state.meta_lease(self.outbox, LOCK_KEY, self.owner, take, LOCK_TTL_S)

    def run_once(self) -> int:
        """Send what is due, if this process may; how many objects TheHive was told about."""
        rows = self.outbox.due()
        if not rows or not self._lock(True):
            return 0
        told = 0
        try:
            for row in rows:
                told += self._send(row)
        finally:
            self._lock(False)
        return told

    def _send(self, row: sqlite3.Row) -> int:
        from tq_mw_thehive.thehive.api import TheHiveNotFound, TheHiveRefused

        thehive_id, kind = row["thehive_id"], row["kind"]
        want, sent = json.loads(row["want_tags"]), json.loads(row["sent_tags"])
        add = [t for t in want if t not in sent]
        remove = [t for t in sent if t not in want]
        field = True
        try:
            if add or remove:
                self.thehive.update_tags(kind, thehive_id, add, remove)
            if kind == "case" and self.custom_field and row["want_field"] and row["want_field"] != row["sent_field"]:
                field = self._set_field(thehive_id, row["want_field"])
        except TheHiveNotFound:  # deleted in TheHive meanwhile: nothing to tell
            self.outbox.failed(row, "not in TheHive any more", None)
            return 0
        except TheHiveRefused as exc:
            log.warning("writeback refused for %s %s (not retried until it changes again): %s", kind, thehive_id, exc)
            self.outbox.failed(row, str(exc), None)
            return 0
        except Exception as exc:  # TheHive down, the database busy: later, backing off
            wait = min(RETRY_CAP_S, 2.0 ** min(row["attempts"] + 1, 10))
            if row["attempts"] == 0:
                log.warning("writeback to TheHive delayed for %s %s (retried, backing off to %.0f s): %s",
                            kind, thehive_id, RETRY_CAP_S, exc)
            self.outbox.failed(row, str(exc), wait)
            return 0
        self.outbox.sent(row, field)
        log.info("writeback %s %s added=%s removed=%s", kind, thehive_id, ",".join(add) or "-", ",".join(remove) or "-")
        return 1

    def _set_field(self, case_id: str, url: str) -> bool:
        """Whether TheHive took the custom field; a refusal (no such field) does not stop the tags."""
        from tq_mw_thehive.thehive.api import TheHiveRefused

        try:
            self.thehive.set_case_custom_field(case_id, self.custom_field, url)
            return True
        except TheHiveRefused as exc:
            if self._field_refused.first(self.custom_field):
                log.warning("writeback.case_custom_field %r refused by TheHive (create it in TheHive as a "
                            "string field; the tags are written without it): %s", self.custom_field, exc)
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("writeback round failed")
            self.wake.wait(self.sleep_s)
            self.wake.clear()

    def start(self) -> "Sender":
        self._thread = threading.Thread(target=self._loop, name="tq-writeback", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
