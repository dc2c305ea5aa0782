"""The durable inbox: dedup, durability, leases, per-case ordering, retry/dead/replay, stats."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Tuple

import pytest

from conftest import FakeClock
from tq_mw_thehive import state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.thehive import events

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_NAMES = sorted(p.name for p in SAMPLES.glob("*.json"))
T0 = 1_760_000_000.0
CASE_A = "~1000001"
CASE_B = "~2000002"


def sample_text(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8")


def make_event(audit_id: str, case_id: str, created_at: Optional[int],
               observable_id: Optional[str] = None) -> Tuple[events.WebhookEvent, str]:
    """A TheHive 5 audit event of case ``case_id``: on the case itself, or on one of its observables."""
    name = "seed-observable-update.json" if observable_id else "seed-case-update.json"
    payload = json.loads(sample_text(name))
    payload.update({"_id": audit_id, "objectId": observable_id or case_id, "rootId": case_id,
                    "_createdAt": created_at})
    if created_at is None:
        del payload["_createdAt"]
    body = json.dumps(payload)
    return events.parse(json.loads(body)), body


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    state.open_state(path).close()
    return path


@pytest.fixture
def inbox(state_db, clock: FakeClock):
    """On SQLite and on PostgreSQL (``db_path``: SQLite only, for what is SQLite's own)."""
    state.open_state(state_db).close()
    ib = Inbox(state_db, clock=clock)
    yield ib
    ib.close()


def put(ib: Inbox, audit_id: str, case_id: str = CASE_A, created_at: Optional[int] = 1_000,
        observable_id: Optional[str] = None) -> int:
    result = ib.put(*make_event(audit_id, case_id, created_at, observable_id))
    assert result.created
    return result.id


def row(ib: Inbox, item_id: int) -> dict:
    return dict(ib.get(item_id))


# --- put ---------------------------------------------------------------------------------------

def test_put_dedups_on_the_event_key(inbox: Inbox) -> None:
    event, body = make_event("~audit-1", CASE_A, 1_000)
    first = inbox.put(event, body)
    again = inbox.put(event, body)
    other = inbox.put(*make_event("~audit-2", CASE_A, 1_000))

    assert first.created is True
    assert again.created is False
    assert again.id == first.id
    assert other.created is True and other.id != first.id
    assert inbox.db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 2


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_put_stores_the_body_verbatim(inbox: Inbox, clock: FakeClock, name: str) -> None:
    text = sample_text(name)
    event = events.parse(json.loads(text))
    result = inbox.put(event, text)

    stored = row(inbox, result.id)
    assert stored["body"] == text
    assert stored["dedup_key"] == event.dedup_key
    assert stored["case_key"] == event.case_key
    assert (stored["object_type"], stored["action"]) == (event.object_type, event.action)
    assert stored["order_ts"] == event.timestamp_ms
    assert (stored["state"], stored["attempts"]) == ("pending", 0)
    assert stored["received_at"] == stored["next_attempt_at"] == clock()


def test_put_without_thehive_time_orders_by_arrival(inbox: Inbox, clock: FakeClock) -> None:
    item = put(inbox, "~no-time", created_at=None)
    assert row(inbox, item)["order_ts"] == int(T0 * 1000)


def test_put_is_committed_when_it_returns(db_path: Path, clock: FakeClock) -> None:
    """The web answers 200 right after put: another connection must already see the event."""
    writer = Inbox(db_path, clock=clock)
    event, body = make_event("~durable", CASE_A, 1_000)
    result = writer.put(event, body)
    assert not writer.db.in_transaction

    reader = Inbox(db_path, clock=clock)
    try:
        stored = reader.get(result.id)
        assert stored is not None
        assert stored["body"] == body
        assert reader.stats()["pending"] == 1
    finally:
        reader.close()
        writer.close()


def test_concurrent_puts_create_each_event_once(db_path: Path) -> None:
    threads, puts_each, distinct = 8, 25, 20
    batch = [make_event(f"~c-{i}", f"~case-{i % 5}", 1_000 + i) for i in range(distinct)]
    barrier = threading.Barrier(threads, timeout=10)

    def worker(n: int):
        ib = Inbox(db_path)
        try:
            barrier.wait()
            out = []
            for k in range(puts_each):
                event, body = batch[(n * 3 + k) % distinct]  # each thread starts elsewhere
                out.append((event.dedup_key, ib.put(event, body)))
            return out
        finally:
            ib.close()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [r for chunk in pool.map(worker, range(threads)) for r in chunk]

    assert len(results) == threads * puts_each
    created = Counter(key for key, r in results if r.created)
    assert created == Counter({event.dedup_key: 1 for event, _ in batch})
    ids = {}
    for key, r in results:
        assert ids.setdefault(key, r.id) == r.id  # every put of one event answers the same id
    check = Inbox(db_path)
    try:
        assert check.db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == distinct
    finally:
        check.close()


def _held_first_write(ib: Inbox, others: int, monkeypatch) -> list:
    """Make the first transaction wait until ``others`` puts are queued behind it; record the
    size of every transaction's batch."""
    real, sizes = ib.write, []

    def write(fn):
        if not sizes:
            deadline = time.monotonic() + 10
            while len(ib._group.queue) < others:
                assert time.monotonic() < deadline, "the other puts never queued"
                time.sleep(0.001)
        result = real(fn)
        sizes.append(len(result) if isinstance(result, list) else 1)
        return result

    monkeypatch.setattr(ib, "write", write)
    return sizes


def test_puts_of_one_process_arriving_together_share_one_transaction(db_path: Path, monkeypatch) -> None:
    """The web threads of a worker share the Inbox: while one commits, the others queue and go in
    the next transaction together, each answered with its own id (or the first's, if a duplicate)."""
    ib = Inbox(db_path)
    sizes = _held_first_write(ib, others=7, monkeypatch=monkeypatch)
    events_ = [make_event(f"~g-{i}", CASE_A, 1_000 + i) for i in range(7)] + [make_event("~g-3", CASE_A, 1_003)]
    with ThreadPoolExecutor(max_workers=9) as pool:
        first = pool.submit(ib.put, *make_event("~g-first", CASE_A, 999))
        deadline = time.monotonic() + 10
        while not ib._group.committing:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        rest = [pool.submit(ib.put, *e) for e in events_]
        results = [first.result(timeout=10)] + [f.result(timeout=10) for f in rest]
    assert sizes == [1, 8]
    assert [r.created for r in results] == [True] * 8 + [False]
    assert results[-1].id == results[4].id  # the duplicate of ~g-3 in the same batch
    assert len({r.id for r in results}) == 8
    assert Inbox(db_path).db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 8


def test_a_failed_group_transaction_is_retried_put_by_put_so_one_error_fails_one_put(db_path: Path,
                                                                                     monkeypatch) -> None:
    ib = Inbox(db_path)
    real = ib.write
    calls = {"n": 0}

    def write(fn):
        calls["n"] += 1
        if calls["n"] == 1:  # the leader's own put: hold it until the rest has queued
            deadline = time.monotonic() + 10
            while len(ib._group.queue) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            return real(fn)
        if calls["n"] == 2:
            raise sqlite3.OperationalError("database is locked")  # the group's transaction
        if calls["n"] == 3:
            raise sqlite3.OperationalError("disk I/O error")  # the first put alone fails again
        return real(fn)

    monkeypatch.setattr(ib, "write", write)
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(ib.put, *make_event("~lead", CASE_A, 1))
        deadline = time.monotonic() + 10
        while not ib._group.committing:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        rest = {name: pool.submit(ib.put, *make_event(name, CASE_A, 2)) for name in ("~a", "~b", "~c")}
        assert first.result(timeout=10).created
        outcomes = {name: f.exception(timeout=10) for name, f in rest.items()}
    failed = [name for name, exc in outcomes.items() if exc is not None]
    assert len(failed) == 1 and "disk I/O" in str(outcomes[failed[0]])
    stored = {r["audit_id"] for r in ib.db.execute("SELECT audit_id FROM inbox")}
    assert stored == {"~lead", "~a", "~b", "~c"} - set(failed)


def _th4_pair() -> list:
    """TheHive 4's create of an observable (naming its case) and its delete (naming none)."""
    created = json.loads(sample_text("th4-case-artifact-create.json"))
    deleted = {"operation": "delete", "objectType": "case_artifact", "objectId": created["objectId"],
               "base": True, "startDate": created["startDate"] + 60_000, "rootId": created["objectId"],
               "requestId": "th4-delete-1", "details": {}}
    return [(events.parse(p), json.dumps(p)) for p in (created, deleted)]


def test_a_thehive4_create_and_its_case_less_delete_in_one_group_both_go_to_the_case(db_path: Path,
                                                                                     monkeypatch) -> None:
    """One INSERT carries a group: the delete cannot look its case up in the table (the create is
    not there yet), so it takes it from the create ahead of it in the same statement."""
    (create, create_body), (delete, delete_body) = _th4_pair()
    assert delete.case_key.startswith("object:")
    ib = Inbox(db_path)
    sizes = _held_first_write(ib, others=2, monkeypatch=monkeypatch)
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = pool.submit(ib.put, *make_event("~lead", CASE_B, 1))
        deadline = time.monotonic() + 10
        while not ib._group.committing:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        created = pool.submit(ib.put, create, create_body)
        while len(ib._group.queue) < 1:  # the create queues first, then the delete
            assert time.monotonic() < deadline
            time.sleep(0.001)
        deleted = pool.submit(ib.put, delete, delete_body)
        results = [f.result(timeout=10) for f in (first, created, deleted)]
    assert sizes == [1, 2]
    assert all(r.created for r in results)
    keys = [r[0] for r in ib.db.execute("SELECT case_key FROM inbox WHERE id IN (?, ?) ORDER BY id",
                                        (results[1].id, results[2].id))]
    assert keys == ["case:~8396848", "case:~8396848"]


def test_put_many_orders_a_case_less_delete_with_the_create_before_it(inbox: Inbox) -> None:
    results = inbox.put_many(_th4_pair())
    assert [row(inbox, r.id)["case_key"] for r in results] == ["case:~8396848", "case:~8396848"]


def test_a_group_with_keys_stored_before_answers_their_ids_and_inserts_the_rest(inbox: Inbox) -> None:
    """Ids of one INSERT are read from lastrowid unless a key was there: then they are read back."""
    old = [inbox.put(*make_event(f"~old-{i}", CASE_A, i)) for i in range(3)]
    mixed = [make_event(name, CASE_A, 10 + n) for n, name in
             enumerate(["~new-0", "~old-1", "~new-1", "~new-1", "~old-2", "~new-2"])]
    results = inbox.put_many(mixed)
    assert [r.created for r in results] == [True, False, True, False, False, True]
    assert results[1].id == old[1].id and results[4].id == old[2].id
    assert results[3].id == results[2].id
    stored = {r["audit_id"]: r["id"] for r in inbox.db.execute("SELECT audit_id, id FROM inbox")}
    assert len(stored) == 6
    for (event, _), result in zip(mixed, results):
        assert stored[event.audit_id] == result.id


def test_put_many_splits_a_group_larger_than_one_statement(inbox: Inbox, monkeypatch) -> None:
    from tq_mw_thehive import inbox as inbox_mod
    monkeypatch.setattr(inbox_mod, "_ROWS_PER_INSERT", 4)
    results = inbox.put_many([make_event(f"~s-{i}", CASE_A, i) for i in range(10)])
    stored = {r["audit_id"]: r["id"] for r in inbox.db.execute("SELECT audit_id, id FROM inbox")}
    assert [r.id for r in results] == [stored[f"~s-{i}"] for i in range(10)]
    assert all(r.created for r in results)


class _CountingFlock:
    """``fcntl`` as the state module sees it, counting its tries for the write turn."""

    def __init__(self) -> None:
        import fcntl
        self.real, self.tries = fcntl, 0
        self.LOCK_EX, self.LOCK_NB, self.LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

    def flock(self, fd: int, op: int) -> None:
        if op & self.LOCK_EX:
            self.tries += 1
        self.real.flock(fd, op)


def _hold_turn(db_path: Path) -> int:
    """Take the write turn as another gunicorn worker would: a lock on a file description of its own."""
    import fcntl
    import os
    fd = os.open(f"{db_path}-write.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _waits_for_the_turn_then_writes(db_path: Path, monkeypatch, write: Callable[[Inbox], object]) -> object:
    """Run ``write`` while another process holds the write turn: it must wait (ask again and again,
    write nothing) until the turn is given back, then write."""
    import fcntl
    import os
    counting = _CountingFlock()
    monkeypatch.setattr(state, "fcntl", counting)
    ib = Inbox(db_path, busy_timeout=30)
    fd = _hold_turn(db_path)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(write, ib)
            deadline = time.monotonic() + 10
            while counting.tries < 3:  # it tried, and tried again: it is waiting for the turn
                assert time.monotonic() < deadline, "the write never asked for the turn"
                time.sleep(0.001)
            assert not pending.done()
            fcntl.flock(fd, fcntl.LOCK_UN)
            return pending.result(timeout=10)
    finally:
        os.close(fd)


def test_a_put_waits_for_the_turn_another_worker_holds_then_commits(db_path: Path, monkeypatch) -> None:
    result = _waits_for_the_turn_then_writes(db_path, monkeypatch, lambda ib: ib.put(*make_event("~turn", CASE_A, 1)))
    assert result.created
    assert Inbox(db_path).db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 1


def test_the_sync_s_bookkeeping_waits_for_the_same_turn(db_path: Path, monkeypatch) -> None:
    """Not only webhooks: every write of the state database takes the turn, so a webhook never
    sleeps in SQLite's busy handler behind the sync's claim, done mark or object map write."""
    seed = Inbox(db_path)
    item_id = put(seed, "~claimed")
    claimed = _waits_for_the_turn_then_writes(db_path, monkeypatch, lambda ib: ib.claim("w1", lease_s=60))
    assert claimed is not None and claimed.id == item_id
    assert row(seed, item_id)["lease_owner"] == "w1"


def test_a_turn_not_had_within_the_busy_timeout_does_not_stop_the_put(db_path: Path) -> None:
    """A worker stuck holding the turn (a hung disk) must not hold every webhook: past the busy
    timeout the put goes to SQLite without a turn, as it would without the lock file."""
    import os
    ib = Inbox(db_path, busy_timeout=0.05)
    fd = _hold_turn(db_path)
    try:
        assert ib.put(*make_event("~no-turn", CASE_A, 1)).created
    finally:
        os.close(fd)
    assert ib.db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 1


def test_the_turn_file_is_private_and_a_put_works_when_it_cannot_be_made(tmp_path: Path) -> None:
    import os
    import stat as stat_mod
    path = tmp_path / "state.db"
    state.open_state(path).close()
    ib = Inbox(path)
    ib.put(*make_event("~private", CASE_A, 1))
    assert stat_mod.S_IMODE(os.stat(f"{path}-write.lock").st_mode) == 0o600

    other = tmp_path / "other" / "state.db"
    other.parent.mkdir()
    state.open_state(other).close()
    Path(f"{other}-write.lock").mkdir()  # cannot be opened as a file
    assert Inbox(other).put(*make_event("~no-file", CASE_A, 2)).created


def test_a_thread_that_has_the_turn_may_write_again_and_others_wait_for_it(db_path: Path) -> None:
    ib = Inbox(db_path)
    turn = ib.turn
    assert turn is state.write_turn(db_path) is Inbox(db_path).turn  # one per database and process
    assert turn.take(1)
    try:
        assert ib.put(*make_event("~nested", CASE_A, 1)).created  # takes it again: no deadlock
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(turn.take, 0.01).result(timeout=10) is False  # held by this thread
    finally:
        turn.give()
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(lambda: turn.take(0.01) and (turn.give() or True)).result(timeout=10)


# --- claim and leases --------------------------------------------------------------------------

def test_claim_takes_the_oldest_by_thehive_time(inbox: Inbox, clock: FakeClock) -> None:
    late = put(inbox, "~late", CASE_A, created_at=2_000)
    early = put(inbox, "~early", CASE_B, created_at=1_000)

    item = inbox.claim("w1", lease_s=60)
    assert item is not None and item.id == early
    assert item.attempts == 1
    assert item.lease_until == T0 + 60
    stored = row(inbox, early)
    assert (stored["attempts"], stored["lease_owner"], stored["lease_until"]) == (1, "w1", T0 + 60)
    assert row(inbox, late)["attempts"] == 0

    assert inbox.claim("w2", lease_s=60).id == late
    assert inbox.claim("w3", lease_s=60) is None


def test_claim_on_an_empty_inbox_returns_none(inbox: Inbox) -> None:
    assert inbox.claim("w1") is None


def test_expired_lease_is_redelivered_and_only_the_new_owner_finishes(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~crash")
    first = inbox.claim("w1", lease_s=30)
    assert first.id == item_id

    clock.advance(29)
    assert inbox.claim("w2", lease_s=30) is None  # the lease still holds

    clock.advance(2)  # w1 died: its lease ran out
    second = inbox.claim("w2", lease_s=30)
    assert second is not None and second.id == item_id
    assert second.attempts == 2
    assert second.body == first.body

    assert inbox.done(item_id, "w1") is False
    assert row(inbox, item_id)["state"] == "pending"
    assert inbox.done(item_id, "w2") is True
    stored = row(inbox, item_id)
    assert (stored["state"], stored["lease_owner"], stored["lease_until"]) == ("done", None, None)
    assert stored["finished_at"] == clock()
    assert inbox.claim("w3") is None


def test_owner_cannot_finish_after_its_lease_expired(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~slow")
    inbox.claim("w1", lease_s=10)
    clock.advance(10)
    assert inbox.done(item_id, "w1") is False
    assert row(inbox, item_id)["state"] == "pending"


def test_extend_keeps_the_lease_past_its_first_expiry(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~long")
    inbox.claim("w1", lease_s=10)
    clock.advance(8)
    assert inbox.extend(item_id, "w1", lease_s=10) is True
    assert row(inbox, item_id)["lease_until"] == T0 + 18

    clock.advance(5)  # past the first expiry (T0 + 10), within the extension
    assert inbox.claim("w2") is None
    assert inbox.done(item_id, "w1") is True


def test_extend_after_expiry_fails(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~lost")
    inbox.claim("w1", lease_s=10)
    clock.advance(11)
    assert inbox.extend(item_id, "w1", lease_s=10) is False
    assert inbox.claim("w2").id == item_id
    assert inbox.extend(item_id, "w1") is False
    assert row(inbox, item_id)["lease_owner"] == "w2"


# --- per-case ordering -------------------------------------------------------------------------

def test_events_of_one_case_are_handed_out_in_thehive_order(inbox: Inbox) -> None:
    t2 = put(inbox, "~t2", CASE_A, created_at=2_000, observable_id="~obs-1")  # same case by rootId
    t1 = put(inbox, "~t1", CASE_A, created_at=1_000)
    other = put(inbox, "~other", CASE_B, created_at=3_000)

    first = inbox.claim("w1")
    assert first.id == t1

    # t1 in flight: nothing more of case A, but case B is free.
    assert inbox.claim("w2").id == other
    assert inbox.claim("w3") is None

    assert inbox.done(t1, "w1") is True
    assert inbox.claim("w3").id == t2


def test_a_later_event_waits_while_an_earlier_one_of_its_case_is_leased(inbox: Inbox) -> None:
    """Even when the earlier event arrives second (and TheHive time says it comes first)."""
    late = put(inbox, "~late", CASE_A, created_at=2_000)
    assert inbox.claim("w1").id == late
    early = put(inbox, "~early", CASE_A, created_at=1_000)
    assert inbox.claim("w2") is None  # the case is busy
    assert inbox.done(late, "w1") is True
    assert inbox.claim("w2").id == early


@pytest.mark.parametrize("outcome", ["done", "dead"])
def test_event_waiting_to_retry_blocks_its_case(inbox: Inbox, clock: FakeClock, outcome: str) -> None:
    t1 = put(inbox, "~t1", CASE_A, created_at=1_000)
    t2 = put(inbox, "~t2", CASE_A, created_at=2_000)
    other = put(inbox, "~other", CASE_B, created_at=3_000)

    assert inbox.claim("w1").id == t1
    assert inbox.retry(t1, "w1", "ThreatQ 503", delay_s=60) is True

    assert inbox.claim("w2").id == other
    assert inbox.claim("w2") is None  # t2 must not overtake t1

    clock.advance(60)
    assert inbox.claim("w3").id == t1
    assert inbox.claim("w4") is None
    if outcome == "done":
        assert inbox.done(t1, "w3") is True
    else:
        assert inbox.dead(t1, "w3", "gave up") is True
    assert inbox.claim("w4").id == t2


# --- retry, dead, replay -----------------------------------------------------------------------

def test_retry_delays_the_event(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~retry")
    inbox.claim("w1")
    assert inbox.retry(item_id, "w1", "ThreatQ 503", delay_s=30) is True

    stored = row(inbox, item_id)
    assert stored["next_attempt_at"] == T0 + 30
    assert stored["last_error"] == "ThreatQ 503"
    assert (stored["state"], stored["lease_owner"], stored["lease_until"]) == ("pending", None, None)

    clock.advance(29.9)
    assert inbox.claim("w2") is None
    clock.advance(0.2)
    item = inbox.claim("w2")
    assert item.id == item_id and item.attempts == 2


def test_dead_keeps_the_error_and_is_never_claimed(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~dead")
    inbox.claim("w1")
    clock.advance(1)
    assert inbox.dead(item_id, "w1", "400 Bad Request: bad indicator") is True

    stored = row(inbox, item_id)
    assert stored["state"] == "dead"
    assert stored["last_error"] == "400 Bad Request: bad indicator"
    assert stored["finished_at"] == T0 + 1
    assert stored["lease_owner"] is None
    clock.advance(10_000)
    assert inbox.claim("w2") is None


def kill(ib: Inbox, item_id: int) -> None:
    item = ib.claim("killer")
    assert item is not None and item.id == item_id
    assert ib.dead(item_id, "killer", "boom") is True


def test_replay_all_puts_dead_events_back(inbox: Inbox, clock: FakeClock) -> None:
    a = put(inbox, "~a", CASE_A)
    b = put(inbox, "~b", CASE_B)
    kept = put(inbox, "~kept", "~3000003")
    kill(inbox, a)
    kill(inbox, b)
    assert row(inbox, a)["attempts"] == 1

    clock.advance(100)
    assert inbox.replay() == 2
    for item_id in (a, b):
        stored = row(inbox, item_id)
        assert (stored["state"], stored["attempts"], stored["finished_at"]) == ("pending", 0, None)
        assert stored["next_attempt_at"] == T0 + 100
    assert row(inbox, kept)["state"] == "pending"
    assert {inbox.claim("w").id for _ in range(3)} == {a, b, kept}
    assert inbox.replay() == 0


def test_replay_ids_only_touches_those(inbox: Inbox) -> None:
    a = put(inbox, "~a", CASE_A)
    b = put(inbox, "~b", CASE_B)
    kill(inbox, a)
    kill(inbox, b)

    assert inbox.replay(ids=[b]) == 1
    assert row(inbox, a)["state"] == "dead"
    assert row(inbox, b)["state"] == "pending"
    assert inbox.claim("w").id == b
    assert inbox.replay(ids=[b]) == 0  # not dead any more


@pytest.mark.parametrize("finish", [
    lambda ib, i, who: ib.done(i, who),
    lambda ib, i, who: ib.retry(i, who, "err", 10),
    lambda ib, i, who: ib.dead(i, who, "err"),
    lambda ib, i, who: ib.extend(i, who, 10),
], ids=["done", "retry", "dead", "extend"])
def test_wrong_owner_changes_nothing(inbox: Inbox, finish) -> None:
    item_id = put(inbox, "~mine")
    inbox.claim("owner", lease_s=60)
    before = row(inbox, item_id)

    assert finish(inbox, item_id, "intruder") is False
    assert row(inbox, item_id) == before
    assert finish(inbox, item_id, "owner") is True


def test_finishing_an_unclaimed_event_fails(inbox: Inbox) -> None:
    item_id = put(inbox, "~unclaimed")
    before = row(inbox, item_id)
    assert inbox.done(item_id, "w1") is False
    assert inbox.done(item_id + 1000, "w1") is False
    assert row(inbox, item_id) == before


# --- stats -------------------------------------------------------------------------------------

def assert_stats(ib: Inbox, **expected) -> None:
    stats = ib.stats()
    assert set(stats) == set(Inbox.empty_stats())
    full = dict(Inbox.empty_stats(), **expected)
    assert stats == full
    for key, value in stats.items():
        if key != "oldest_pending_age_s":
            assert type(value) is int, key


def test_stats_through_an_events_life(inbox: Inbox, clock: FakeClock) -> None:
    assert_stats(inbox)  # empty: all zero, no age
    assert inbox.stats() == Inbox.empty_stats()

    a = put(inbox, "~a", CASE_A, created_at=1_000)
    clock.advance(5)
    b = put(inbox, "~b", CASE_B, created_at=2_000)
    c = put(inbox, "~c", "~3000003", created_at=3_000)
    clock.advance(2)
    assert_stats(inbox, pending=3, queued=3, oldest_pending_age_s=7.0)

    assert inbox.claim("w1", lease_s=60).id == a
    assert_stats(inbox, pending=3, queued=2, in_progress=1, oldest_pending_age_s=7.0)

    assert inbox.retry(a, "w1", "later", delay_s=30) is True
    assert_stats(inbox, pending=3, queued=2, waiting_retry=1, oldest_pending_age_s=7.0)

    assert inbox.claim("w2", lease_s=60).id == b
    assert inbox.done(b, "w2") is True
    assert_stats(inbox, pending=2, queued=1, waiting_retry=1, done=1, oldest_pending_age_s=7.0)

    assert inbox.claim("w3", lease_s=10).id == c
    assert_stats(inbox, pending=2, in_progress=1, waiting_retry=1, done=1, oldest_pending_age_s=7.0)
    clock.advance(10)  # c's worker died: its lease ran out, it is queued again
    assert_stats(inbox, pending=2, queued=1, waiting_retry=1, done=1, oldest_pending_age_s=17.0)

    assert inbox.claim("w3").id == c
    assert inbox.dead(c, "w3", "bad") is True
    clock.advance(20)  # a's retry is due
    assert_stats(inbox, pending=1, queued=1, done=1, dead=1, oldest_pending_age_s=37.0)

    assert inbox.claim("w4").id == a
    assert inbox.done(a, "w4") is True
    assert_stats(inbox, done=2, dead=1)


def test_stats_of_a_fresh_database_match_empty_stats(db_path: Path) -> None:
    ib = Inbox(db_path)
    try:
        assert ib.stats() == Inbox.empty_stats()
    finally:
        ib.close()


# --- writability -------------------------------------------------------------------------------

def test_locked_database_is_reported_and_recovers(db_path: Path, clock: FakeClock) -> None:
    ib = Inbox(db_path, busy_timeout=0.1, clock=clock)
    ib.check_writable()
    locker = state.connect(db_path)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.Error):
            ib.check_writable()
        with pytest.raises(sqlite3.OperationalError):
            ib.put(*make_event("~while-locked", CASE_A, 1_000))
        assert not ib.db.in_transaction
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    ib.check_writable()
    result = ib.put(*make_event("~while-locked", CASE_A, 1_000))
    assert result.created is True  # the failed put left nothing behind
    assert ib.db.execute("SELECT value FROM meta WHERE key = 'healthz_at'").fetchone()[0] == str(T0)
    ib.close()


def test_put_many_stores_a_batch_in_one_transaction_with_put_s_results(inbox: Inbox, monkeypatch) -> None:
    """What backfill uses: a case and its observables in one commit, duplicates answered as put does."""
    put(inbox, "~m-1")
    writes = []
    real = inbox.write
    monkeypatch.setattr(inbox, "write", lambda fn, **kw: writes.append(fn) or real(fn, **kw))
    results = inbox.put_many([make_event(f"~m-{i}", CASE_A, 1_000 + i) for i in range(4)])
    assert len(writes) == 1
    assert [r.created for r in results] == [True, False, True, True]  # ~m-1 was already there
    assert results[1].id == 1 and len({r.id for r in results}) == 4
    assert inbox.put_many([]) == []


# --- issue 13: a replay is a fresh start; counts that do not grow with the history ---------------

def test_replay_restarts_the_age_that_max_age_counts_from(inbox: Inbox, clock: FakeClock) -> None:
    item_id = put(inbox, "~old")
    kill(inbox, item_id)
    clock.advance(3 * 86400)  # replayed days later, once the cause is fixed
    assert inbox.replay([item_id]) == 1
    item = inbox.claim("w")
    assert item.received_at == T0 and item.replayed_at == T0 + 3 * 86400
    assert item.age_from == T0 + 3 * 86400 and item.attempts == 1
    assert inbox.claim("w") is None
    fresh = put(inbox, "~fresh", CASE_B)
    never_replayed = inbox.claim("w2")
    assert never_replayed.id == fresh and never_replayed.replayed_at is None
    assert never_replayed.age_from == never_replayed.received_at == clock()


LEGACY_STATS = """SELECT COUNT(*) FILTER (WHERE state = 'pending') AS pending,
                         COUNT(*) FILTER (WHERE state = 'done') AS done,
                         COUNT(*) FILTER (WHERE state = 'dead') AS dead FROM inbox"""


def test_counts_kept_by_triggers_match_a_full_count_through_every_change(inbox: Inbox, clock: FakeClock) -> None:
    def check() -> None:
        full = dict(inbox.db.execute(LEGACY_STATS).fetchone())
        assert {k: inbox.stats()[k] for k in full} == full

    ids = [put(inbox, f"~c{i}", f"~case-{i}") for i in range(8)]
    check()
    assert inbox.put(*make_event("~c0", "~case-0", 1_000)).created is False  # a duplicate counts nothing
    check()
    for i, action in enumerate(["done", "done", "dead", "dead", "retry", "done"]):
        item = inbox.claim("w")
        getattr(inbox, action)(*((item.id, "w") + {"done": (), "dead": ("x",), "retry": ("x", 0)}[action]))
        check()
    assert inbox.replay([ids[2]]) == 1
    check()
    inbox.db.execute("UPDATE inbox SET state = 'done', finished_at = 0 WHERE id = ?", (ids[7],))  # a hand edit too
    check()
    clock.advance(10)
    assert inbox.purge(done_older_than_s=5, dead=True)["done"] == 4
    check()
    inbox.db.execute("DELETE FROM inbox WHERE state = 'pending'")
    check()


def test_stats_and_the_chart_read_no_row_of_the_history(db_path: Path) -> None:
    """A scan of `inbox` costs 1-2 s at a million rows: every query of the figures uses an index
    (SQLite's plans; PostgreSQL's planner picks by its statistics, so a plan here would say little)."""
    inbox = Inbox(db_path)
    plans = []
    real = inbox.db

    class Spy:
        def execute(self, sql, params=()):
            plans.extend(r[3] for r in real.execute("EXPLAIN QUERY PLAN " + sql, params))
            return real.execute(sql, params)

    inbox._local.db = Spy()
    try:
        inbox.stats()
        inbox.hourly_counts(24)
    finally:
        inbox._local.db = real
    assert plans and not [p for p in plans if p.startswith("SCAN inbox")], plans


def test_purge_deletes_only_done_rows_older_than_the_cutoff_in_batches(inbox: Inbox, clock: FakeClock) -> None:
    old_done = []
    for i in range(7):
        old_done.append(put(inbox, f"~old-{i}", f"~case-old-{i}"))
        assert inbox.done(inbox.claim("w").id, "w")
    dead = put(inbox, "~dead", "~case-dead")
    kill(inbox, dead)
    pending = put(inbox, "~pending", "~case-pending")
    clock.advance(31 * 86400)
    recent = put(inbox, "~recent", "~case-recent")
    assert inbox.claim("w").id == pending and inbox.retry(pending, "w", "x", 3600)
    assert inbox.claim("w").id == recent and inbox.done(recent, "w")

    pauses, seen = [], []
    assert inbox.purgeable(30 * 86400) == 7
    deleted = inbox.purge(30 * 86400, batch=3, pause_s=0.25, progress=seen.append, sleep=pauses.append)
    assert deleted == {"done": 7, "dead": 0}
    assert seen == [3, 6, 7] and pauses == [0.25, 0.25]  # three transactions, a pause between
    assert all(inbox.get(i) is None for i in old_done)
    assert [row(inbox, i)["state"] for i in (dead, pending, recent)] == ["dead", "pending", "done"]

    assert inbox.purge(30 * 86400) == {"done": 0, "dead": 0}
    clock.advance(1)
    assert inbox.purgeable(0, dead=True) == 2
    assert inbox.purge(dead=True) == {"done": 0, "dead": 1}
    assert inbox.purge(0) == {"done": 1, "dead": 0}
    assert [r["id"] for r in inbox.db.execute("SELECT id FROM inbox")] == [pending]
