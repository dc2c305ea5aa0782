"""Logging for ops who tail files: levels by ``-v``, a file that survives logrotate, no secrets.

Every line passes through ``RedactingFormatter``, which replaces each registered
secret (webhook token, API keys, ThreatQ tokens) and any ``Bearer``/``Basic``
credential with ``***``, so a secret that slips into a message or an exception
text still never reaches a log file. The file itself is created 0600 (and a directory the
daemon creates for it 0700): its lines carry case titles, observable values and addresses,
which other local users have no business reading.

Payload text is hostile: every control character (C0, DEL, C1, the Unicode line and
paragraph separators, bidi overrides) is escaped, so a value can neither break a line,
forge another, nor rewrite the terminal an operator tails the file in. Observable values
above ``logs.max_tlp_values`` are withheld: a log file travels further (tickets, log
shippers, support bundles) than the data's TLP allows.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Dict, Hashable, Iterable, Iterator, Optional, Pattern, Set

from tq_mw_thehive.config import TLP_ORDER
from tq_mw_thehive.enrichment.gate import rank

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


class Once:
    """What this process has said already: a line that would repeat for every event or value
    (a plugin skipped for a missing key, a plugin without EXTERNAL) is said the first time only."""

    def __init__(self) -> None:
        self._said: Set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is asked for in this process."""
        with self._lock:
            if key in self._said:
                return False
            self._said.add(key)
            return True


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
    # Every line passes here: an ASCII line without either scheme name cannot match (the common
    # case, decided at a fraction of the regex's cost). Other text always meets the regex, whose
    # case-insensitive match also takes non-ASCII letters such as "ſ" for "s".
    if text.isascii():
        lowered = text.lower()
        if "bearer" not in lowered and "basic" not in lowered:
            return text
    return _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)


# Every character that can end a line for some reader (str.splitlines, a terminal, a log
# shipper) or change what a terminal shows: C0, DEL, C1 (NEL is U+0085), the line and
# paragraph separators, and the bidi embeddings, overrides and isolates; and lone surrogates
# (JSON's "\ud800" decodes to one), which no UTF-8 log file can hold.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: "re.Match[str]") -> str:
    char = match.group(0)
    return _SHORT.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    if text.isascii() and text.isprintable():  # no C0 and no DEL: nothing to escape (most lines)
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_block(text: str) -> str:
    """A traceback or stack: its own line breaks kept, every other control escaped, and every
    line indented, so an exception message carrying a newline cannot start a forged line."""
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


def _withheld(text: str) -> str:
    scope = _scope.get()
    return scope.scrub(text) if scope is not None else text


class RedactingFormatter(logging.Formatter):
    """Escapes, withholds and redacts what a record carries; the line's own prefix stays as it is."""

    _second: Optional[tuple] = None  # (whole second, its date and time text): one strftime a second

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        if datefmt or self.converter is not time.localtime or not self.default_msec_format:
            return super().formatTime(record, datefmt)
        whole = int(record.created)
        cached = self._second
        if cached is None or cached[0] != whole:
            cached = self._second = (whole, time.strftime(self.default_time_format, time.localtime(whole)))
        return self.default_msec_format % (cached[1], record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: text from a payload (an id with a newline) cannot forge log lines.
        record.message = _withheld(escape_controls(record.message))
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _withheld(_escape_block(super().formatException(ei)))

    def formatStack(self, stack_info: str) -> str:
        return _withheld(_escape_block(super().formatStack(stack_info)))

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format would reuse an exc_text another handler's formatter cached
        # on the record, unescaped: the traceback is formatted here, every time.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            text += "\n" + _withheld(_escape_block(record.exc_text))
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return redact(text)


# --- observable values above logs.max_tlp_values --------------------------------------------

def tlp_allows(tlp: Optional[str], max_tlp: str) -> bool:
    """Whether a value of TLP ``tlp`` may be logged; a missing or unknown TLP may not (fail closed)."""
    label = (tlp or "").strip().upper()
    return label in TLP_ORDER and rank(label) <= rank(max_tlp)


def withheld_label(tlp: Optional[str]) -> str:
    """What a log line shows instead of a withheld value (no payload text: an odd label is ``unknown``)."""
    label = (tlp or "").strip().upper()
    return f"<TLP:{label if label in TLP_ORDER else 'unknown'} value withheld>"


def loggable(value: str, tlp: Optional[str], max_tlp: str) -> str:
    """``value`` if its TLP may be logged, else the placeholder; for fields that always carry it."""
    return value if tlp_allows(tlp, max_tlp) else withheld_label(tlp)


class Withheld:
    """The observable values the log lines of one piece of work (an event, a watch) must not show.

    The fields that carry a value use ``loggable``; this catches the rest: a value quoted in an
    exception, a ThreatQ error, a plugin's own log line. Matched case-insensitively, as written
    raw, escaped or by ``%r``, and not inside a longer word (a short value would shred the line).
    """

    def __init__(self, max_tlp: str, parent: Optional["Withheld"] = None) -> None:
        self.max_tlp = max_tlp
        self._labels: Dict[str, str] = dict(parent._labels) if parent is not None else {}
        self._pattern: Optional[Pattern[str]] = None
        self._lock = threading.Lock()  # plugin threads log in the same scope

    def add(self, values: Iterable[Optional[str]], tlp: Optional[str]) -> None:
        """Withhold ``values`` when ``tlp`` is above the maximum (or missing)."""
        if tlp_allows(tlp, self.max_tlp):
            return
        label = withheld_label(tlp)
        with self._lock:
            for value in values:
                if isinstance(value, str) and value.strip():
                    for form in (value, value.strip(), escape_controls(value.strip()), repr(value.strip())[1:-1]):
                        self._labels.setdefault(form.lower(), label)
            self._pattern = None

    def scrub(self, text: str) -> str:
        with self._lock:
            if not self._labels:
                return text
            if self._pattern is None:
                forms = sorted(self._labels, key=len, reverse=True)  # a value inside another: the longer
                self._pattern = re.compile("|".join(map(_whole, forms)), re.IGNORECASE)
            pattern, labels = self._pattern, self._labels
        return pattern.sub(lambda m: labels.get(m.group(0).lower(), withheld_label(None)), text)


def _whole(form: str) -> str:
    """A regex for ``form`` not inside a longer word (``10.0.0.1`` is not in ``10.0.0.10``)."""
    before = r"(?<!\w)" if re.match(r"\w", form) else ""
    after = r"(?!\w)" if re.search(r"\w\Z", form) else ""
    return before + re.escape(form) + after


_scope: ContextVar[Optional[Withheld]] = ContextVar("tq_mw_thehive_withheld", default=None)


@contextmanager
def withholding(max_tlp: str) -> Iterator[Withheld]:
    """A scope whose log lines (this thread, and tasks run in a copy of its context) withhold
    the values added to it; nested scopes keep the outer one's values."""
    token = _scope.set(Withheld(max_tlp, _scope.get()))
    try:
        yield _scope.get()
    finally:
        _scope.reset(token)


def withhold(values: Iterable[Optional[str]], tlp: Optional[str]) -> None:
    """Add ``values`` to the innermost scope (the worker learns of a coalesced event's values late)."""
    scope = _scope.get()
    if scope is not None:
        scope.add(values, tlp)


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


def _private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents 0700 whatever the umask (mkdir's mode is masked
    by it, chmod's is not). A directory that exists is left as it is: its mode is the operator's."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # another process made it first: theirs
            continue
        os.chmod(directory, 0o700)


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
            _private_dir(log_dir)
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
