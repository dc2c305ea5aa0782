"""Drive a command on a real pseudo-terminal, answering its prompts as a person would."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple


class TerminalSession:
    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 timeout: float = 60.0) -> None:
        self.deadline = time.monotonic() + timeout
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(list(args), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.output = ""
        self._seen = 0

    def _read_some(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"terminal session timed out; output so far:\n{self.output}")
        ready, _, _ = select.select([self.master], [], [], min(remaining, 1.0))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not chunk:
            return False
        self.output += chunk.decode("utf-8", "replace")
        return True

    def expect(self, text: str) -> None:
        while text not in self.output[self._seen:]:
            if not self._read_some():
                raise AssertionError(f"{text!r} never appeared; output:\n{self.output}")
        self._seen = self.output.index(text, self._seen) + len(text)

    def send_line(self, line: str) -> None:
        os.write(self.master, line.encode("utf-8") + b"\r")

    def finish(self) -> int:
        while self._read_some():
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0.2)[0]:
                break
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        finally:
            os.close(self.master)


def answer_prompts(args: Sequence[str], dialogue: List[Tuple[str, str]], **kwargs) -> Tuple[int, str]:
    """Run ``args`` on a terminal, answer each (prompt, answer) in order; return (exit code, output)."""
    session = TerminalSession(args, **kwargs)
    try:
        for prompt, answer in dialogue:
            session.expect(prompt)
            session.send_line(answer)
        return session.finish(), session.output
    finally:
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.wait(timeout=10)
