"""Catch-up: what TheHive changed while webhooks were missed reaches ThreatQ through the same sync path."""
from __future__ import annotations


import pytest
from click.testing import CliRunner

from conftest import World, write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.backfill import OVERLAP_MS, Backfill, Marks
from tq_mw_thehive.cli import cli
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive.api import TheHiveClient, TheHiveUnavailable


def fill(hive, cases: int = 3, observables: int = 2):
    made = []
    for i in range(cases):
        case = hive.add_case(title=f"Missed case {i}", tags=["missed"])
        for j in range(observables):
            hive.add_observable(case["_id"], dataType="ip", data=f"198.51.100.{i * 10 + j}", tlp=1, pap=1)
        made.append(hive.cases[case["_id"]])
    return made


def backfill(world: World, **kwargs) -> Backfill:
    client = TheHiveClient.from_config(world.cfg, max_wait_s=0, page_size=2)
    return Backfill(world.inbox, client, Marks(world.cfg.state_db), SyncState(world.cfg.state_db), **kwargs)


def test_everything_is_queued_and_synced_once(world):
    cases = fill(world.hive)
    result = backfill(world).run(everything=True)
    assert (result.cases, result.observables, result.queued, result.duplicates) == (3, 6, 9, 0)
    world.drain()
    assert set(world.states()) == {"done"}
    assert sorted(e["title"] for e in world.tq.events.values()) == sorted(
        f"Hive Case # {c['_id']} {c['title']}" for c in cases)
    assert len(world.tq.indicators) == 6
    for event_id in world.tq.events:
        assert len(world.tq.links_of("events", event_id, "indicators")) == 2
    again = backfill(world).run(everything=True)
    assert (again.queued, again.duplicates) == (0, 9)
    assert Marks(world.cfg.state_db).get() == max(c["_updatedAt"] for c in cases)


def test_since_the_mark_only_what_changed_and_newer_states_win(world):
    old, changed = fill(world.hive, cases=2)
    backfill(world).run(everything=True)
    world.drain()
    mark = Marks(world.cfg.state_db).get()
    world.hive.cases[old["_id"]].update(_createdAt=1_000, _updatedAt=2_000)  # untouched for ages
    world.hive.update_case(changed["_id"], severity=4)
    world.hive.cases[changed["_id"]]["_updatedAt"] = mark + OVERLAP_MS + 10_000
    result = backfill(world).run()
    assert result.cases == 1 and result.queued >= 1
    world.drain()
    event = next(e for e in world.tq.events.values() if changed["_id"] in e["title"])
    assert world.attributes("events", event["id"])["Severity"] == "CRITICAL"
    assert len(world.tq.events) == 2


def test_an_observable_changed_without_its_case_is_found_too(world):
    (case,) = fill(world.hive, cases=1, observables=1)
    backfill(world).run(everything=True)
    world.drain()
    (observable_id,) = [o for o in world.hive.observables]
    world.hive.cases[case["_id"]].update(_createdAt=1_000, _updatedAt=2_000)  # the case did not move
    world.hive.update_observable(observable_id, ioc=True)
    world.hive.observables[observable_id]["_updatedAt"] = Marks(world.cfg.state_db).get() + OVERLAP_MS + 10_000
    result = backfill(world).run()
    assert result.cases == 0 and result.observables == 1
    world.drain()
    (indicator,) = world.tq.indicators.values()
    assert world.attributes("indicators", indicator["id"])["Indicator Of Compromise?"] == "Yes"


def test_alert_observables_are_neither_fetched_nor_skipped(world, caplog):
    (case,) = fill(world.hive, cases=1, observables=1)
    backfill(world).run(everything=True)
    world.drain()
    mark = Marks(world.cfg.state_db).get()
    world.hive.cases[case["_id"]].update(_createdAt=1_000, _updatedAt=2_000)  # the case did not move
    (observable_id,) = list(world.hive.observables)
    alert = world.hive.add_alert(title="Reported phishing")
    alert_observable = world.hive.add_alert_observable(alert["_id"], dataType="domain", data="lure.example")
    for changed in (observable_id, alert_observable["_id"]):
        world.hive.update_observable(changed, ioc=True)
        world.hive.observables[changed]["_updatedAt"] = mark + OVERLAP_MS + 10_000
    caplog.set_level("INFO", logger="tq_mw_thehive.backfill")
    result = backfill(world).run()
    assert (result.cases, result.observables, result.queued) == (0, 1, 1)
    assert "its case is unknown" not in caplog.text  # never read, so never skipped
    assert world.inbox.db.execute("SELECT COUNT(*) FROM inbox WHERE object_id = ?",
                                  (alert_observable["_id"],)).fetchone()[0] == 0


@pytest.mark.parametrize("send_total, queries", [(True, 3), (False, 6)])
def test_paging_stops_at_thehives_total(world, send_total, queries):
    fill(world.hive, cases=2, observables=2)  # page_size=2: each listing is exactly one full page
    world.hive.send_total = send_total
    world.hive.requests.clear()
    result = backfill(world).run(everything=True)
    assert (result.cases, result.observables) == (2, 4)
    # X-Total: one query for the cases, one per case's observables; without it each listing
    # needs a last, empty page.
    assert len(world.hive.requests) == queries


def test_a_failing_thehive_stops_the_run_and_the_next_one_resumes(world):
    fill(world.hive, cases=3, observables=1)
    world.hive.fail_next(1, 502)  # retried inside the client
    runner = backfill(world)
    runner.thehive._attempts = 1  # no retries: the failure stops the run
    calls = {"n": 0}
    original = runner.thehive.iter_case_observables

    def flaky(case_id):
        calls["n"] += 1
        if calls["n"] == 2:
            raise TheHiveUnavailable("TheHive answered 503")
        return original(case_id)

    runner.thehive.iter_case_observables = flaky
    with pytest.raises(TheHiveUnavailable):
        runner.run(everything=True)
    marks = Marks(world.cfg.state_db)
    assert marks.get() is None  # a run cut short never moves the mark
    result = backfill(world).run(since_ms=marks.get())
    world.drain()
    assert len(world.tq.events) == 3 and len(world.tq.indicators) == 3
    assert result.queued >= 2


def test_the_catch_up_lock_lets_one_process_run_at_a_time(world):
    marks = Marks(world.cfg.state_db)
    assert marks.try_lock("worker-a", ttl_s=60) is True
    assert marks.try_lock("worker-b", ttl_s=60) is False
    marks.unlock("worker-b")  # not the holder: nothing happens
    assert marks.try_lock("worker-b", ttl_s=60) is False
    marks.unlock("worker-a")
    assert marks.try_lock("worker-b", ttl_s=60) is True


def test_backfill_command(world, tmp_path):
    fill(world.hive, cases=2, observables=1)
    config_mod.write(world.cfg)
    runner = CliRunner()
    result = runner.invoke(cli, ["backfill", "-c", str(world.cfg.config_dir)])
    assert result.exit_code == 2 and "--since ISO8601 or --all" in result.output
    result = runner.invoke(cli, ["backfill", "-c", str(world.cfg.config_dir), "--since", "yesterday"])
    assert result.exit_code == 2 and "ISO 8601" in result.output
    result = runner.invoke(cli, ["backfill", "-c", str(world.cfg.config_dir), "--all"])
    assert result.exit_code == 0, result.output
    assert "backfill: 2 case(s), 2 observable(s); 4 queued, 0 already queued" in result.output
    result = runner.invoke(cli, ["backfill", "-c", str(world.cfg.config_dir), "--since", "2020-01-01T00:00:00Z"])
    assert result.exit_code == 0 and "0 queued, 4 already queued" in result.output
    assert world.inbox.db.execute("SELECT COUNT(*) FROM inbox WHERE dedup_key LIKE 'audit:backfill:%'").fetchone()[0] == 4


def test_backfill_without_a_thehive_key_says_so(tmp_path):
    write_config(tmp_path, thehive={"api_key": None})
    result = CliRunner().invoke(cli, ["backfill", "-c", str(tmp_path), "--all"])
    assert result.exit_code == 2 and "thehive.api_key" in result.output


@pytest.mark.parametrize("nulls_first", [True, False], ids=["nulls-first", "nulls-last"])
def test_a_run_cut_short_never_moves_the_mark_past_cases_it_did_not_read(world, nulls_first):
    """Where TheHive sorts never-updated cases (no ``_updatedAt``) is not documented: wherever they
    sort, a run that stops half-way must leave every unread case to the next run."""
    world.hive.nulls_first = nulls_first
    marks = Marks(world.cfg.state_db)
    start = world.hive._now_ms()
    marks.advance(start)
    step = 2 * OVERLAP_MS  # farther apart than the overlap a run goes back
    made = {}
    # (created, updated) after the mark; None: never updated.
    for name, created, updated in (("new-a", 1, None), ("new-b", 4, None), ("upd-c", -9, 2), ("upd-d", -9, 3)):
        case = world.hive.add_case(title=name)
        stored = world.hive.cases[case["_id"]]
        stored["_createdAt"] = start + created * step
        if updated is not None:
            stored["_updatedAt"] = start + updated * step
        made[case["_id"]] = name
    client = TheHiveClient.from_config(world.cfg, max_wait_s=0, page_size=2)
    listed = [made[c["_id"]] for c in client.iter_cases(since_ms=start)]
    expected = ["new-a", "new-b", "upd-c", "upd-d"] if nulls_first else ["upd-c", "upd-d", "new-a", "new-b"]
    assert listed == expected  # the simulator plays both orders
    runner = backfill(world)
    original, calls = runner.thehive.iter_case_observables, {"n": 0}

    def stops_at_the_third(case_id):
        calls["n"] += 1
        if calls["n"] == 3:
            raise TheHiveUnavailable("TheHive answered 503")
        return original(case_id)

    runner.thehive.iter_case_observables = stops_at_the_third
    with pytest.raises(TheHiveUnavailable):
        runner.run()
    assert marks.get() == start
    result = backfill(world).run()  # the next start: from the mark
    assert result.cases == 4 and result.duplicates == 2
    assert marks.get() == start + 4 * step  # a complete run moves it to the newest change read
    world.drain()
    assert sorted(e["title"].rsplit(" ", 1)[1] for e in world.tq.events.values()) == sorted(made.values())
