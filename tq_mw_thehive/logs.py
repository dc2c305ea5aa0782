"""Logging for ops who tail files: levels by ``-v``, a file that survives logrotate, no secrets.

Every line passes through ``RedactingFormatter``, which replaces each registered
secret (webhook token, API keys, ThreatQ tokens) and any ``Bearer``/``Basic``
credential with ``***``, so a secret that slips into a message or an exception
text still never reaches a log file. The file itself is created 0600: its lines carry case
titles, observable values and addresses, which other local users have no business reading.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterable, Optional

LOG_FILE = "tq_mw_thehive.log"
VERBOSITY_CHOICES = ("1", "2", "3", "stdout")
_LEVELS = {"1": logging.WARNING, "2": logging.INFO, "3": logging.DEBUG, "stdout": logging.INFO}
FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words; config rejects nothing for it
# An HTTP credential as it would appear in a header dump: the scheme (any case), then a
# token with a digit or base64 padding, so that prose like "Basic authentication" stays.
_CREDENTIAL = re.compile(r"(?i)\b(Bearer|Basic) +(?:(?=[A-Za-z._~+/-]*[0-9])[A-Za-z0-9._~+/-]+=*"
                         r"|[A-Za-z0-9+/]+={1,2})")

_secrets: set = set()
_secrets_lock = threading.Lock()
_longest_first: tuple = ()  # _secrets sorted once per change, not once per log line


class LogSetupError(Exception):
    """The log directory or file cannot be used."""


def add_secrets(values: Iterable[Optional[str]]) -> None:
    """Register values that must never appear in a log line."""
    global _longest_first
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LEN)
        _longest_first = tuple(sorted(_secrets, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _longest_first:
        if secret in text:
            text = text.replace(secret, MASK)
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)


class RedactingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: text from a payload (an id with a newline) cannot forge log lines.
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """A ``WatchedFileHandler`` whose file, when it creates one, is 0600 whatever the umask.

    The handler creates the file at start and again after logrotate moved it away (without
    ``create``); both go through ``_open``. A file that exists is opened as it is: a mode that
    logrotate's ``create`` or the operator chose is theirs.
    """

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            return open(fd, self.mode, encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


def level_for(verbosity: str) -> int:
    return _LEVELS[verbosity]


def setup(log_dir: Optional[Path], verbosity: Optional[str]) -> None:
    """Route the root logger to ``log_dir/tq_mw_thehive.log`` and/or the console.

    ``-v stdout`` logs to the console (at info), as does any run without ``-ll``;
    a file is written only with ``-ll``. The file handler reopens the file when
    logrotate moves it away, so no ``copytruncate`` is needed; a file it creates is 0600.
    """
    verbosity = verbosity or ("2" if log_dir else "stdout")
    formatter = RedactingFormatter(FORMAT)
    handlers = []
    if log_dir is not None:
        log_dir = Path(log_dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(PrivateWatchedFileHandler(str(log_dir / LOG_FILE), encoding="utf-8"))
        except OSError as exc:
            raise LogSetupError(f"log directory {log_dir}: {exc.strerror or exc}") from exc
    if log_dir is None or verbosity == "stdout":
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level_for(verbosity))
    # Third-party chatter stays at warning unless debugging.
    quiet = logging.DEBUG if verbosity == "3" else logging.WARNING
    for name in ("urllib3", "werkzeug"):
        logging.getLogger(name).setLevel(quiet)
