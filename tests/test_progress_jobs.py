"""Progress as the long jobs show it: `backfill`, the daemon's catch-up, `replay` (and `--wait`).

Off a terminal (click's runner, a pipe, the daemon) progress is log lines on stderr; on a
real pseudo-terminal it is a bar. ``DEFAULT_INTERVAL_S`` is set to 0 where a test wants a
line per step instead of one per 10 seconds.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import List

from click.testing import CliRunner

from conftest import sample
from terminal import TerminalSession
from test_backfill import fill
from tq_mw_thehive import cli as cli_mod
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import progress
from tq_mw_thehive.backfill import Marks, catch_up_in_background
from tq_mw_thehive.cli import cli
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.thehive import events
from tq_mw_thehive.services import Services


def progress_lines(text: str, job: str) -> List[str]:
    """The messages of the ``progress job=<job>`` log lines, without time, level and logger."""
    return [line.split(": ", 1)[1] for line in text.splitlines() if f"progress job={job} " in line]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- backfill ---------------------------------------------------------------------------------

def test_backfill_off_a_terminal_logs_progress_lines_and_a_summary(world, monkeypatch):
    fill(world.hive, cases=3, observables=1)
    config_mod.write(world.cfg)
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    result = CliRunner().invoke(cli, ["backfill", "-c", str(world.cfg.config_dir), "--all"])
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "backfill")
    assert [line.split(" rate=")[0] for line in lines[:3]] == [
        f"progress job=backfill done={n} total=?" for n in (1, 2, 3)]
    assert lines[2].endswith("eta=? observables=3 queued=6 duplicates=0")
    assert lines[3].startswith("progress job=backfill finished done=3 total=?")
    assert len(lines) == 4 and "\r" not in result.stderr
    assert "backfill: 3 case(s), 3 observable(s); 6 queued, 0 already queued" in result.stdout


def test_backfill_on_a_terminal_draws_a_bar(world):
    fill(world.hive, cases=2, observables=1)
    config_mod.write(world.cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_")}
    session = TerminalSession([sys.executable, "-m", "tq_mw_thehive", "backfill", "-c",
                               str(world.cfg.config_dir), "--all"], env=env, timeout=60)
    try:
        session.expect("backfill: 2 case(s), 2 observable(s); 4 queued")
        assert session.finish() == 0
    finally:
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.wait(timeout=10)
    assert "\rbackfill 2 done" in session.output and "queued 4" in session.output
    assert "progress job=" not in session.output  # a bar, not log lines


def test_the_daemon_catch_up_logs_lines_even_when_stderr_is_a_terminal(world, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    fill(world.hive, cases=2, observables=1)
    Marks(world.cfg.state_db).advance(1)          # a previous run long ago
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    queued = []
    thread = catch_up_in_background(Services(world.cfg, world.inbox), "owner-a", lambda: queued.append(1), "run-1")
    thread.join(timeout=30)
    assert not thread.is_alive()
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" rate=")[0] for m in messages if m.startswith("progress job=catch-up")] == [
        "progress job=catch-up done=1 total=?", "progress job=catch-up done=2 total=?"]
    assert any(m.startswith("catch-up done cases=2") for m in messages)
    assert terminal.getvalue() == "" and queued


# --- replay -----------------------------------------------------------------------------------

def dead_letters(config_dir: Path, n: int) -> List[int]:
    inbox = Inbox.open(config_mod.load(config_dir).state_db)
    for i in range(n):
        payload = sample("th5-case-create.json")
        payload["_id"], payload["objectId"], payload["rootId"] = f"~audit{i}", f"~case{i}", f"~case{i}"
        payload["object"]["_id"] = f"~case{i}"
        inbox.put(events.parse(payload), json.dumps(payload))
    ids = []
    while (item := inbox.claim("test")) is not None:
        assert inbox.dead(item.id, "test", "ThreatQPermanentError: refused")
        ids.append(item.id)
    assert len(ids) == n
    return ids


def test_replay_off_a_terminal_logs_progress_by_batch(config_dir, monkeypatch):
    dead_letters(config_dir, 5)
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    monkeypatch.setattr(cli_mod, "REPLAY_BATCH", 2)
    result = CliRunner().invoke(cli, ["replay", "-c", str(config_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "replayed 5 dead letter(s)\n"
    lines = progress_lines(result.stderr, "replay")
    assert [line.split(" rate=")[0] for line in lines] == [
        "progress job=replay done=2 total=5", "progress job=replay done=4 total=5",
        "progress job=replay done=5 total=5", "progress job=replay finished done=5 total=5"]


def test_replay_wait_follows_the_events_until_none_is_pending(config_dir, monkeypatch):
    ids = dead_letters(config_dir, 3)
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    monkeypatch.setattr(cli_mod, "REPLAY_WAIT_POLL_S", 0.05)
    inbox = Inbox(config_mod.load(config_dir).state_db)
    handled: List[int] = []

    def worker() -> None:
        # Stands in for the daemon: one replayed event fails again, the others sync.
        deadline = time.monotonic() + 30
        while len(handled) < 3 and time.monotonic() < deadline:
            item = inbox.claim("worker")
            if item is None:
                time.sleep(0.02)
                continue
            if item.id == ids[0]:
                inbox.dead(item.id, "worker", "ThreatQPermanentError: still refused")
            else:
                inbox.done(item.id, "worker")
            handled.append(item.id)
        inbox.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        result = CliRunner().invoke(cli, ["replay", "-c", str(config_dir), "--wait"])
    finally:
        thread.join(timeout=30)
    assert sorted(handled) == sorted(ids)
    assert result.exit_code == 1, result.output          # one is dead again
    assert "replayed 3 dead letter(s)" in result.stdout and "synced 2, dead again 1" in result.stdout
    assert "dead again" in result.stderr
    lines = progress_lines(result.stderr, "replay-wait")
    assert lines[-1].startswith("progress job=replay-wait finished done=3 total=3")
    assert lines[-1].endswith("pending=0 synced=2 dead=1")
    pending = [int(line.split(" pending=")[1].split()[0]) for line in lines]
    assert pending == sorted(pending, reverse=True) and pending[-1] == 0


def test_replay_wait_with_nothing_to_replay_returns_at_once(config_dir):
    dead_letters(config_dir, 0)  # the daemon has started once: its database exists
    result = CliRunner().invoke(cli, ["replay", "-c", str(config_dir), "--wait"])
    assert result.exit_code == 0 and "replayed 0 dead letter(s)" in result.stdout
    assert "synced" not in result.stdout
