"""Progress of long work (backfill, catch-up, replay, cache warm-up), shown the way the reader sees it.

A person at a terminal wants one bar that redraws in place; a cron job, systemd or a
pipe wants log lines that say the same thing every few seconds and one summary at the
end, never carriage returns in a log file. One ``Progress`` does both, chosen by whether
its stream is a terminal, so every job reports alike. The clock is injectable so tests
check the cadence without sleeping.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Optional, TextIO

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0   # one log line per this many seconds of work, at most
REDRAW_S = 0.2              # a terminal bar redraws at most this often
BAR_WIDTH = 24


def age_text(seconds: float) -> str:
    """A duration as people read it: ``45 s``, ``3 min 12 s``, ``5 h 02 min``, ``2 d 04 h`` (the
    status page's ages, a cached answer's age)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Count of work done (of ``total``, when known), rate and ETA, as a bar or as log lines.

    ``interactive`` defaults to whether ``stream`` (stderr) is a terminal; pass False for work
    that runs inside the daemon, whose stderr may be a terminal but whose output is a log.
    """

    def __init__(self, job: str, total: Optional[int] = None, *, interactive: Optional[bool] = None,
                 stream: Optional[TextIO] = None, interval_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, logger: Optional[logging.Logger] = None) -> None:
        self.job = job
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.clock = clock
        self.log = logger or log
        self.done = 0
        self.fields: dict = {}
        self.started = clock()
        self._last_line = self.started
        self._last_draw: Optional[float] = None
        self._finished = False

    # --- what the job reports ------------------------------------------------------------------

    def update(self, done: Optional[int] = None, total: Optional[int] = None, **fields: Any) -> None:
        """Set the count done (absolute), and optionally the total and extra ``key=value`` fields."""
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        self.fields.update(fields)
        self._show()

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.update(self.done + n, **fields)

    def finish(self, **fields: Any) -> None:
        """The last word: the bar completes and ends its line, or one summary log line."""
        if self._finished:
            return
        self._finished = True
        self.fields.update(fields)
        if self.interactive:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self.log.info("progress job=%s finished done=%d total=%s rate=%s/s elapsed=%s%s", self.job, self.done,
                          self._total(), self._rate_text(), _duration(self.elapsed()), self._fields_text())

    def __enter__(self) -> "Progress":
        if self.interactive:  # the empty bar at once; a log line only once there is progress to tell
            self._draw()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.finish()

    # --- figures ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.started)

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> Optional[float]:
        """Seconds left at the rate so far; None when the total or a rate is not known yet."""
        if self.total is None:
            return None
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        rate = self.rate()
        return left / rate if rate > 0 else None

    def _total(self) -> str:
        return "?" if self.total is None else str(self.total)

    def _rate_text(self) -> str:
        rate = self.rate()
        return f"{rate:.1f}" if 0 < rate < 10 else f"{rate:.0f}"

    def _eta_text(self) -> str:
        eta = self.eta_s()
        return "?" if eta is None else f"{eta:.0f}s"

    def _fields_text(self) -> str:
        return "".join(f" {k}={v}" for k, v in self.fields.items())

    # --- output ----------------------------------------------------------------------------------

    def _show(self) -> None:
        if self._finished:
            return
        now = self.clock()
        if self.interactive:
            if self._last_draw is None or now - self._last_draw >= REDRAW_S:
                self._draw()
            return
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self.log.info("progress job=%s done=%d total=%s rate=%s/s eta=%s%s", self.job, self.done,
                          self._total(), self._rate_text(), self._eta_text(), self._fields_text())

    def _draw(self) -> None:
        self._last_draw = self.clock()
        if self.total:
            filled = min(BAR_WIDTH, int(BAR_WIDTH * self.done / self.total))
            bar = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} done"
        tail = f" {self._rate_text()}/s"
        eta = self.eta_s()
        if self._finished:
            tail += f" in {_duration(self.elapsed())}"
        elif eta is not None:
            tail += f" eta {_duration(eta)}"
        extra = "".join(f" {k} {v}" for k, v in self.fields.items())
        # \r and clear-to-end-of-line: the bar redraws in place, a shorter line leaves no debris.
        self.stream.write(f"\r{self.job} {bar}{tail}{extra}\x1b[K")
        self.stream.flush()
