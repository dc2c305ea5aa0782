"""Progress of long work: a bar on a terminal, log lines at a steady cadence otherwise."""
from __future__ import annotations

import io
import logging

import click
import click.testing
from click.testing import CliRunner

from tq_mw_thehive.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress ")]


def test_off_a_terminal_one_log_line_per_interval_then_a_summary(caplog):
    caplog.set_level(logging.INFO)
    clock, stream = Clock(), io.StringIO()
    with Progress("backfill", total=100, stream=stream, interval_s=10, clock=clock) as shown:
        for step in range(1, 101):
            clock.now += 0.5           # 2 items a second: 50 s in all
            shown.update(step)
    messages = lines(caplog)
    assert stream.getvalue() == ""   # nothing but log lines off a terminal
    assert messages[:5] == [
        f"progress job=backfill done={n} total=100 rate=2.0/s eta={(100 - n) // 2}s" for n in (20, 40, 60, 80, 100)]
    assert messages[5] == "progress job=backfill finished done=100 total=100 rate=2.0/s elapsed=50s"
    assert len(messages) == 6


def test_no_line_before_the_interval_and_a_summary_even_for_quick_work(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    shown = Progress("replay", total=3, stream=io.StringIO(), interval_s=10, clock=clock)
    for _ in range(3):
        clock.now += 1
        shown.advance()
    assert lines(caplog) == []
    shown.finish()
    shown.finish()  # once only
    assert lines(caplog) == ["progress job=replay finished done=3 total=3 rate=1.0/s elapsed=3s"]


def test_an_unknown_total_has_no_eta_and_extra_fields_follow(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    shown = Progress("catch-up", stream=Terminal(), interactive=False, interval_s=5, clock=clock)
    clock.now += 6
    shown.update(300, queued=290, duplicates=10)
    assert lines(caplog) == ["progress job=catch-up done=300 total=? rate=50/s eta=? queued=290 duplicates=10"]


def test_on_a_terminal_a_bar_redraws_in_place_and_ends_its_line(caplog):
    caplog.set_level(logging.INFO)
    clock, stream = Clock(), Terminal()
    with Progress("cache-warm", total=10, stream=stream, clock=clock) as shown:
        for step in range(1, 11):
            clock.now += 1
            shown.update(step)
    out = stream.getvalue()
    assert lines(caplog) == []       # a bar, no log lines
    frames = out.split("\r")[1:]
    assert frames[0].startswith("cache-warm [------------------------] 0/10")
    assert "[############------------] 5/10 1.0/s eta 5s" in out
    assert frames[-1] == "cache-warm [########################] 10/10 1.0/s in 10s\x1b[K\n"
    assert out.endswith("\n") and out.count("\n") == 1


def test_a_terminal_bar_does_not_redraw_faster_than_it_can_be_read():
    clock, stream = Clock(), Terminal()
    shown = Progress("replay", total=1000, stream=stream, clock=clock)
    for step in range(1000):
        clock.now += 0.001               # 1000 updates in one second
        shown.update(step + 1)
    assert 3 <= stream.getvalue().count("\r") <= 7


def test_bar_without_total_counts_and_shows_rate():
    clock, stream = Clock(), Terminal()
    shown = Progress("backfill", stream=stream, clock=clock)
    clock.now += 4
    shown.update(8, queued=8)
    assert "\rbackfill 8 done 2.0/s queued 8" in stream.getvalue()


def test_a_click_command_on_a_terminal_draws_the_bar_on_stderr(monkeypatch):
    """Through click's test runner, with its stderr made to look like a terminal."""
    clock = Clock()

    @click.command()
    def job() -> None:
        with Progress("replay", total=4, clock=clock) as shown:
            for step in range(1, 5):
                clock.now += 1
                shown.update(step)
        click.echo("replayed 4 dead letter(s)")

    runner = CliRunner()
    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    result = runner.invoke(job)
    assert result.exit_code == 0, result.output
    assert "replay [########################] 4/4 1.0/s in 4s" in result.stderr
    assert result.stdout == "replayed 4 dead letter(s)\n"
