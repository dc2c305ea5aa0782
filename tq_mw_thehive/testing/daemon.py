"""Run the real daemon (``python -m tq_mw_thehive``, gunicorn) as a user would, on a loopback port.

Used by the end-to-end tests, the benchmarks and ``tq-mw-thehive demo``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import requests

import tq_mw_thehive

READY = re.compile(r"ready listening=127\.0\.0\.1:(\d+)")
LOG_NAME = "tq_mw_thehive.log"


class DaemonTimeout(AssertionError):
    """A condition polled with a deadline did not come true (an AssertionError for tests)."""


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DaemonTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """One daemon process group; ``start`` returns once ``/healthz`` answers."""

    def __init__(self, config_dir: Path, log_dir: Path, args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None, verbosity: str = "3", workers: int = 2) -> None:
        self.config_dir = Path(config_dir).absolute()  # the daemon runs elsewhere: relative paths would move
        self.log_dir = Path(log_dir).absolute()
        self.args = list(args)
        self.env = env
        self.verbosity = verbosity
        self.workers = workers
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.console = self.log_dir / "console.txt"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.log_dir / LOG_NAME

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def command(self) -> List[str]:
        return [sys.executable, "-m", "tq_mw_thehive", "-c", str(self.config_dir), "-ll", str(self.log_dir),
                "-v", self.verbosity, "-p", "0", "-li", "127.0.0.1", "-w", str(self.workers), *self.args]

    def environment(self) -> Dict[str, str]:
        """The caller's environment, with the package that started us first on the import path.

        ``python -m`` puts the working directory first on ``sys.path``: started from a source
        checkout, the daemon would import that tree instead of what the caller runs (and a
        checkout is not an installed package). So the daemon runs in its log directory (which exists
        before it starts, unlike a config directory a first start creates) and
        imports the very ``tq_mw_thehive`` its caller imported, wherever that came from.
        """
        env = dict(os.environ if self.env is None else self.env)
        here = str(Path(tq_mw_thehive.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        return env

    def spawn(self) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        console = open(self.console, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=console,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=self.environment(),
                                     cwd=self.log_dir)
        console.close()
        return self.proc

    def start(self, timeout: float = 60) -> "Daemon":
        seen = len(self.log_text())
        self.spawn()

        def ready():
            if self.proc.poll() is not None:
                raise DaemonTimeout(f"daemon exited with {self.proc.returncode}:\n"
                                     f"{self.console.read_text(errors='replace')}\n{self.log_text()[seen:]}")
            match = READY.search(self.log_text(), seen)
            return match and int(match.group(1))

        self.port = wait_for(ready, timeout, "the daemon's ready line")
        # Every worker must have its signal handlers: a SIGTERM that reaches a worker still
        # booting is lost (gunicorn then waits out its graceful timeout).
        wait_for(lambda: self.log_text().count("worker ready pid=", seen) >= self.workers, timeout,
                 "every worker to be ready")
        wait_for(self._healthy, timeout, "/healthz")
        return self

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Signal the whole process group (master and workers) and wait for the master."""
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout=timeout)
        if sig == signal.SIGKILL:
            # Orphaned workers notice their parent is gone; make sure none is left.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop (SIGTERM: events in progress finish), SIGKILL if that takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.kill(signal.SIGTERM, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
