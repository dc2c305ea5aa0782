"""The command line: global flags before and after subcommands, `status`, and every way
the run without a subcommand must stop (with the right exit code) before it serves.

No test here may serve: in-process runs have ``server.serve`` replaced by a function
that fails the test, and subprocess runs of the no-subcommand path go through
``GUARDED``, which does the same in the child (exit 99) before running the package
as ``python -m`` would.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from click.testing import CliRunner

from conftest import sample, write_config
from tq_mw_thehive import __version__, server, state
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.cli import Options, cli
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.thehive import events

COUNT_KEYS = ("pending", "queued", "in_progress", "waiting_retry", "done", "dead")
SERVE_REACHED = 99

GUARDED = """\
import runpy, sys
import tq_mw_thehive.server as server

def refuse(*args, **kwargs):
    sys.stderr.write("TEST GUARD: server.serve was reached\\n")
    sys.exit(%d)

server.serve = refuse
sys.argv[0] = "tq_mw_thehive"
runpy.run_module("tq_mw_thehive", run_name="__main__", alter_sys=True)
""" % SERVE_REACHED


@pytest.fixture(autouse=True)
def no_serving(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("server.serve must not be reached from test_cli.py")

    monkeypatch.setattr(server, "serve", refuse)


def scrubbed_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_")}
    env.update(extra)
    return env


def run_process(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None,
                guarded: bool = True) -> subprocess.CompletedProcess:
    """The real process, stdin empty (never a terminal); ``guarded`` stops it if it would serve."""
    head = [sys.executable, "-c", GUARDED] if guarded else [sys.executable, "-m", "tq_mw_thehive"]
    result = subprocess.run(head + args, cwd=str(cwd), env=env or scrubbed_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode != SERVE_REACHED, result.stderr
    return result


def invoke(args: List[str]):
    return CliRunner().invoke(cli, args, input="", catch_exceptions=False)


def status_json(args: List[str]) -> dict:
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def fill_inbox(db_path: Path) -> Dict[str, int]:
    """Five events of five cases, one in each state; returns the counts status must report."""
    inbox = Inbox.open(db_path)
    try:
        for i in range(5):
            payload = sample("th5-case-update.json")
            case = f"~90000{i}"
            payload.update({"_id": f"~audit-{i}", "objectId": case, "rootId": case,
                            "_createdAt": 1_700_000_000_000 + i})
            assert inbox.put(events.parse(payload), json.dumps(payload)).created
        in_progress = inbox.claim("test")  # left leased
        retried = inbox.claim("test")
        dead = inbox.claim("test")
        done = inbox.claim("test")
        assert None not in (in_progress, retried, dead, done)
        assert inbox.retry(retried.id, "test", "ThreatQ unavailable", delay_s=3600)
        assert inbox.dead(dead.id, "test", "rejected")
        assert inbox.done(done.id, "test")
    finally:
        inbox.close()
    return {"pending": 3, "queued": 1, "in_progress": 1, "waiting_retry": 1, "done": 1, "dead": 1}


def started(config_dir: Path) -> Path:
    """``config_dir`` as after the daemon's first start: its state database exists (empty)."""
    state.open_state(config_mod.load(config_dir).state_db).close()
    return config_dir


def counts_of(report: dict) -> Dict[str, int]:
    for key in COUNT_KEYS:
        assert type(report[key]) is int, (key, report[key])
    return {key: report[key] for key in COUNT_KEYS}


# --- status -------------------------------------------------------------------------------

def test_status_json_of_a_started_daemon_with_nothing_received_is_all_zero(config_dir):
    started(config_dir)
    before = sorted(os.listdir(config_dir))
    report = status_json(["status", "-c", str(config_dir), "--json"])
    assert counts_of(report) == dict.fromkeys(COUNT_KEYS, 0)
    assert sorted(os.listdir(config_dir)) == before


def test_status_json_real_process_prints_one_object(config_dir):
    started(config_dir)
    result = run_process(["status", "--json", "-c", str(config_dir)], cwd=config_dir)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert counts_of(json.loads(result.stdout)) == dict.fromkeys(COUNT_KEYS, 0)


def test_status_json_counts_each_state(config_dir):
    cfg = config_mod.load(config_dir)
    expected = fill_inbox(cfg.state_db)
    report = status_json(["status", "-c", str(config_dir), "--json"])
    assert counts_of(report) == expected
    assert report["state_db"] == str(cfg.state_db)


def test_status_json_reads_a_custom_relative_state_db(tmp_path):
    write_config(tmp_path, state_db="data/inbox.db")
    (tmp_path / "data").mkdir()
    cfg = config_mod.load(tmp_path)
    assert cfg.state_db == tmp_path / "data" / "inbox.db"
    expected = fill_inbox(cfg.state_db)
    report = status_json(["status", "-c", str(tmp_path), "--json"])
    assert counts_of(report) == expected
    assert report["state_db"] == str(cfg.state_db)
    assert not (tmp_path / config_mod.DEFAULT_STATE_DB).exists()


def test_config_flag_works_before_and_after_the_subcommand(config_dir):
    expected = fill_inbox(config_mod.load(config_dir).state_db)
    before = status_json(["-c", str(config_dir), "status", "--json"])
    after = status_json(["status", "-c", str(config_dir), "--json"])
    assert counts_of(before) == counts_of(after) == expected
    assert before["state_db"] == after["state_db"] == str(config_mod.load(config_dir).state_db)


@pytest.mark.parametrize("first, second", [("full", "empty"), ("empty", "full")])
def test_config_flag_after_the_subcommand_wins(tmp_path, first, second):
    dirs = {"full": tmp_path / "full", "empty": tmp_path / "empty"}
    for d in dirs.values():
        d.mkdir()
        write_config(d)
        started(d)
    full = fill_inbox(config_mod.load(dirs["full"]).state_db)
    wanted = full if second == "full" else dict.fromkeys(COUNT_KEYS, 0)
    report = status_json(["-c", str(dirs[first]), "status", "-c", str(dirs[second]), "--json"])
    assert counts_of(report) == wanted
    assert report["state_db"].startswith(str(dirs[second]))


def test_status_human_output(config_dir):
    cfg = config_mod.load(config_dir)
    fill_inbox(cfg.state_db)
    result = invoke(["status", "-c", str(config_dir)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert str(cfg.state_db) in out
    assert re.search(r"^pending:\s+3\b", out, re.M), out
    assert re.search(r"^done:\s+1$", out, re.M), out
    assert re.search(r"^dead:\s+1$", out, re.M), out
    with pytest.raises(ValueError):
        json.loads(out)


BROKEN = [
    pytest.param({"webhook": {"tokn": "x"}}, "webhook.tokn", id="unknown-key"),
    pytest.param({"threatq": {"verify_ssl": "no"}}, "threatq.verify_ssl", id="wrong-type"),
    pytest.param({"webhook": {"max_body_mb": "ten"}}, "webhook.max_body_mb", id="wrong-type-number"),
    pytest.param({"webhook": {"auth": "token"}}, "webhook.auth", id="bad-choice"),
]


@pytest.mark.parametrize("sections, key", BROKEN)
def test_status_with_a_broken_config_exits_2_naming_the_key(tmp_path, sections, key):
    write_config(tmp_path, **sections)
    result = invoke(["status", "-c", str(tmp_path), "--json"])
    assert result.exit_code == 2
    assert key in result.stderr
    assert result.stdout == ""


# --- no silent zeros: the commands on the daemon's state need its database -----------------------

STATE_COMMANDS = [
    pytest.param(["status"], id="status"),
    pytest.param(["status", "--json"], id="status-json"),
    pytest.param(["replay"], id="replay"),
    pytest.param(["cache", "stats"], id="cache-stats"),
    pytest.param(["cache", "clear"], id="cache-clear"),
    pytest.param(["cache", "warm"], id="cache-warm"),
    pytest.param(["keys", "set", "VIRUSTOTAL"], id="keys-set"),
    pytest.param(["keys", "list"], id="keys-list"),
    pytest.param(["keys", "delete", "VIRUSTOTAL"], id="keys-delete"),
    pytest.param(["watch", "add", "example.org"], id="watch-add"),
    pytest.param(["watch", "list"], id="watch-list"),
    pytest.param(["watch", "rm", "example.org"], id="watch-rm"),
    pytest.param(["monitor", "--once"], id="monitor"),
]


def one_error(result) -> str:
    """The single ``tq-mw-thehive: error:`` line of a refused command (exit 2, nothing on stdout)."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tq-mw-thehive: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args", STATE_COMMANDS)
def test_a_state_command_on_a_missing_config_dir_says_to_configure(tmp_path, args):
    missing = tmp_path / "no-such-dir"
    error = one_error(invoke(args + ["-c", str(missing)]))
    assert f"configuration directory {missing} does not exist" in error
    assert f"tq-mw-thehive configure -c {missing}" in error
    assert not missing.exists()


@pytest.mark.parametrize("args", STATE_COMMANDS)
def test_a_state_command_without_the_state_database_says_so_and_creates_none(tmp_path, args):
    write_config(tmp_path, state_db="data/inbox.db")
    (tmp_path / "data").mkdir()
    error = one_error(invoke(args + ["-c", str(tmp_path)]))
    assert f"state database {tmp_path / 'data' / 'inbox.db'} does not exist" in error
    assert "the daemon creates it at its first start" in error
    assert os.listdir(tmp_path / "data") == []
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "data"]


def test_status_in_a_directory_without_config_says_to_configure(tmp_path):
    error = one_error(invoke(["status", "-c", str(tmp_path), "--json"]))
    assert "no configuration file" in error and f"tq-mw-thehive configure -c {tmp_path}" in error
    assert os.listdir(tmp_path) == []


# --- the run without a subcommand stops before serving --------------------------------------

def write_invalid_yaml(config_dir: Path) -> None:
    (config_dir / "config.yaml").write_text("threatq: [unclosed\n  host: x\n", encoding="utf-8")


@pytest.mark.parametrize("sections, key", BROKEN + [
    pytest.param(None, "not valid YAML", id="invalid-yaml"),
])
def test_start_with_a_bad_config_exits_2_without_prompting(tmp_path, sections, key):
    if sections is None:
        write_invalid_yaml(tmp_path)
    else:
        write_config(tmp_path, **sections)
    path = tmp_path / "config.yaml"
    before = (path.read_bytes(), path.stat().st_mode)
    result = run_process(["-c", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "tq-mw-thehive: error:" in result.stderr
    assert key in result.stderr
    assert str(path) in result.stderr
    assert "ThreatQ Host" not in result.stdout + result.stderr  # no configuration prompt
    assert (path.read_bytes(), path.stat().st_mode) == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_start_in_process_with_a_bad_config_exits_2(tmp_path):
    write_config(tmp_path, webhook={"tokn": "x"})
    before = (tmp_path / "config.yaml").read_bytes()
    result = invoke(["-c", str(tmp_path)])
    assert result.exit_code == 2
    assert "webhook.tokn" in result.stderr
    assert (tmp_path / "config.yaml").read_bytes() == before


def test_external_proxy_without_threatq_proxy_exits_2(config_dir):
    result = run_process(["-c", str(config_dir), "-ep"], cwd=config_dir)
    assert result.returncode == 2, result.stderr
    assert "threatq.proxy" in result.stderr
    assert not (config_dir / config_mod.DEFAULT_STATE_DB).exists()


@pytest.mark.parametrize("given, flag, variable", [
    ({}, "--threatq-host", "TQ_MW_THREATQ_HOST"),
    ({"TQ_MW_THREATQ_HOST": "threatq.example.org"}, "--client-id", "TQ_MW_THREATQ_CLIENT_ID"),
])
def test_start_without_config_or_terminal_exits_2_naming_the_missing_answer(tmp_path, given, flag,
                                                                               variable):
    result = run_process(["-c", str(tmp_path)], cwd=tmp_path, env=scrubbed_env(**given))
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert variable in result.stderr
    assert os.listdir(tmp_path) == []


def test_log_directory_that_cannot_be_created_exits_1(config_dir):
    blocker = config_dir / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    log_dir = blocker / "logs"
    result = run_process(["-c", str(config_dir), "-ll", str(log_dir)], cwd=config_dir)
    assert result.returncode == 1, result.stderr
    assert str(log_dir) in result.stderr
    assert not (config_dir / config_mod.DEFAULT_STATE_DB).exists()


def test_state_db_in_a_missing_directory_exits_1(tmp_path):
    write_config(tmp_path, state_db="missing/dir/inbox.db")
    result = run_process(["-c", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert str(tmp_path / "missing" / "dir" / "inbox.db") in result.stderr
    assert not (tmp_path / "missing").exists()


# --- flags ----------------------------------------------------------------------------------

def test_version(tmp_path):
    result = run_process(["--version"], cwd=tmp_path, guarded=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tq-mw-thehive, version {__version__}"


def test_help_lists_the_guide_flags_and_subcommands(tmp_path):
    result = run_process(["--help"], cwd=tmp_path, guarded=False)
    assert result.returncode == 0, result.stderr
    for flag in ("-ll, --loglocation", "-li, --listener-ip", "-ep, --external-proxy",
                 "-ds, --disable-ssl", "-v, --verbosity", "-p, --port", "-c, --config"):
        assert flag in result.stdout, flag
    commands = result.stdout.split("Commands:", 1)[1]
    assert re.search(r"^\s+configure\b", commands, re.M)
    assert re.search(r"^\s+status\b", commands, re.M)


@pytest.mark.parametrize("value", ["1", "2", "3", "stdout"])
def test_verbosity_accepts_the_guide_values(config_dir, value):
    result = invoke(["-v", value, "status", "-c", str(started(config_dir)), "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flag, value", [
    ("-v", "0"), ("-v", "4"), ("-v", "debug"), ("-v", "STDOUT"),
    ("-p", "70000"), ("-p", "65536"), ("-p", "-1"), ("-p", "http"),
])
def test_bad_flag_values_are_usage_errors(tmp_path, flag, value):
    result = invoke([flag, value, "status", "-c", str(tmp_path), "--json"])
    assert result.exit_code == 2
    assert value in result.stderr
    assert result.stdout == ""


def test_port_zero_survives_merging():
    """Port 0 asks for a free port; it must not be dropped as falsy."""
    assert Options().merged(port=0).port == 0
    assert Options().merged(port=0).listen().port == 0
    assert Options(port=8080).merged(port=0).listen().port == 0
    assert Options().listen().port == 5000


def test_options_given_before_the_subcommand_are_kept_when_not_repeated():
    before = Options(config="dir", loglocation="logs", verbosity="3", port=8080,
                     listener_ip="0.0.0.0", external_proxy=True, disable_ssl=True, workers=3,
                     threads=5)
    not_repeated = {name: None for name in ("config", "loglocation", "verbosity", "port",
                                            "listener_ip", "workers", "threads")}
    assert before.merged(external_proxy=False, disable_ssl=False, **not_repeated) == before
    assert before.merged(config="other", unknown="ignored") == Options(
        **{**before.__dict__, "config": "other"})


def test_a_malformed_custom_type_mapping_stops_the_start_with_its_line_number(tmp_path):
    write_config(tmp_path, sync={"custom_mapping": True,
                                 "type_mapping": "ip: IP Address\n# comment\ndomain FQDN\n"})
    result = run_process(["-c", str(tmp_path), "-p", "0"], cwd=tmp_path)
    assert result.returncode == 2
    assert "sync.type_mapping line 3" in result.stderr and "domain FQDN" in result.stderr


def test_replay_puts_dead_letters_back(config_dir):
    inbox = Inbox.open(config_mod.load(config_dir).state_db)
    ids = []
    for name in ("th5-case-create.json", "th5-case-update.json"):
        inbox.put(events.parse(sample(name)), "{}")
    for _ in range(2):
        item = inbox.claim("test")
        inbox.dead(item.id, "test", "ThreatQPermanentError: refused")
        ids.append(item.id)
    runner = CliRunner()
    result = runner.invoke(cli, ["replay", "-c", str(config_dir), "--id", str(ids[0])])
    assert result.exit_code == 0 and "replayed 1 dead letter(s)" in result.output
    assert [inbox.get(i)["state"] for i in ids] == ["pending", "dead"]
    result = runner.invoke(cli, ["replay", "-c", str(config_dir), "--id", str(ids[0])])
    assert result.exit_code == 1 and f"not dead letters: {ids[0]}" in result.output
    result = runner.invoke(cli, ["replay", "-c", str(config_dir)])
    assert result.exit_code == 0 and "replayed 1 dead letter(s)" in result.output
    assert inbox.get(ids[1])["state"] == "pending" and inbox.get(ids[1])["attempts"] == 0


# --- purge (issue 13 item 7) ---------------------------------------------------------------------

def aged_inbox(db_path: Path) -> Dict[str, List[int]]:
    """Done events finished 40 and 10 days ago, a dead letter, a pending event."""
    import time as _time

    inbox = Inbox.open(db_path)
    ids: Dict[str, List[int]] = {"old": [], "recent": [], "dead": [], "pending": []}
    try:
        for i, kind in enumerate(["old", "old", "old", "recent", "dead", "pending"]):
            payload = sample("th5-case-update.json")
            case = f"~91000{i}"
            payload.update({"_id": f"~purge-{i}", "objectId": case, "rootId": case})
            ids[kind].append(inbox.put(events.parse(payload), json.dumps(payload)).id)
            if kind != "pending":
                item = inbox.claim("test")
                assert inbox.dead(item.id, "test", "refused") if kind == "dead" else inbox.done(item.id, "test")
        days = {"old": 40, "recent": 10}
        for kind, age in days.items():
            inbox.db.executemany("UPDATE inbox SET finished_at = ? WHERE id = ?",
                                 [(_time.time() - age * 86400, i) for i in ids[kind]])
    finally:
        inbox.close()
    return ids


def states(db_path: Path) -> Dict[int, str]:
    inbox = Inbox(db_path)
    try:
        return {r["id"]: r["state"] for r in inbox.db.execute("SELECT id, state FROM inbox")}
    finally:
        inbox.close()


def test_purge_deletes_done_events_older_than_keep_done_and_dead_letters_only_when_asked(config_dir):
    db_path = config_mod.load(config_dir).state_db
    ids = aged_inbox(db_path)
    result = invoke(["purge", "-c", str(config_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 3 done event(s) finished more than 30d ago\n"
    assert sorted(states(db_path)) == sorted(ids["recent"] + ids["dead"] + ids["pending"])

    result = invoke(["purge", "--done-older-than", "7d", "--dead", "-c", str(config_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 1 done event(s) finished more than 7d ago, 1 dead letter(s)\n"
    assert states(db_path) == {ids["pending"][0]: "pending"}  # never a pending event

    result = invoke(["purge", "--done-older-than", "0", "--dead", "-c", str(config_dir)])
    assert result.stdout == "purged 0 done event(s) finished more than 0s ago, 0 dead letter(s)\n"
    assert status_json(["status", "-c", str(config_dir), "--json"])["pending"] == 1


def test_purge_follows_inbox_keep_done_and_its_zero(tmp_path):
    write_config(tmp_path, inbox={"keep_done": "45d"})
    db_path = config_mod.load(tmp_path).state_db
    aged_inbox(db_path)
    assert invoke(["purge", "-c", str(tmp_path)]).stdout == "purged 0 done event(s) finished more than 45d ago\n"
    write_config(tmp_path, inbox={"keep_done": 0})
    result = invoke(["purge", "-c", str(tmp_path)])
    assert result.exit_code == 0 and "inbox.keep_done is 0" in result.stdout
    assert len(states(db_path)) == 6


@pytest.mark.parametrize("args", [["purge"], ["purge", "--dead", "--vacuum"]])
def test_purge_refuses_a_missing_config_dir_or_state_database_with_exit_2(tmp_path, args):
    missing = tmp_path / "no-such-dir"
    assert "configuration directory" in one_error(invoke(args + ["-c", str(missing)]))
    assert not missing.exists()
    write_config(tmp_path, state_db="data/inbox.db")
    (tmp_path / "data").mkdir()
    error = one_error(invoke(args + ["-c", str(tmp_path)]))
    assert f"state database {tmp_path / 'data' / 'inbox.db'} does not exist" in error
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize("value", ["soon", "-3d", ""])
def test_purge_with_a_bad_duration_exits_2(config_dir, value):
    started(config_dir)
    error = one_error(invoke(["purge", "--done-older-than", value, "-c", str(config_dir)]))
    assert "--done-older-than" in error


def test_purge_vacuum_converts_an_old_database_once_then_releases_in_place(config_dir, monkeypatch):
    db_path = config_mod.load(config_dir).state_db
    with monkeypatch.context() as patched:  # a database as the versions before migration 7 made it
        patched.setattr(state, "_incremental_vacuum_mode", lambda db: None)
        aged_inbox(db_path)
    assert Inbox(db_path).vacuum_mode() == "none"
    result = invoke(["purge", "--vacuum", "-c", str(config_dir)])
    assert result.exit_code == 0, result.output
    assert "the database was rewritten, in incremental auto-vacuum mode" in result.stdout
    assert Inbox(db_path).vacuum_mode() == "incremental"
    result = invoke(["purge", "--vacuum", "-c", str(config_dir)])
    assert result.exit_code == 0 and re.search(r"^released \d+\.\d MB$", result.stdout, re.M), result.stdout
    monkeypatch.setattr("tq_mw_thehive.inbox.REWRITE_FREE_BYTES", -1)  # a long free list: one rewrite is quicker
    assert "the database was rewritten" in invoke(["purge", "--vacuum", "-c", str(config_dir)]).stdout
    assert len(states(db_path)) == 3
