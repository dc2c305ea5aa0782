"""Logging: levels by verbosity, file vs console, logrotate, redaction of secrets."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tq_mw_thehive import logs

SECRET = "s3cr3t-token-value"


@pytest.fixture
def log() -> logging.Logger:
    return logging.getLogger("tq_mw_thehive.test_logs")


def log_text(log_dir: Path, name: str = logs.LOG_FILE) -> str:
    return (log_dir / name).read_text(encoding="utf-8")


# --- levels and destinations -------------------------------------------------------------------

@pytest.mark.parametrize("verbosity, seen, unseen", [
    ("1", ["warning-line"], ["info-line", "debug-line"]),
    ("2", ["warning-line", "info-line"], ["debug-line"]),
    ("3", ["warning-line", "info-line", "debug-line"], []),
])
def test_verbosity_selects_the_level(tmp_path: Path, log, capsys, verbosity, seen, unseen) -> None:
    logs.setup(tmp_path, verbosity)
    log.warning("warning-line")
    log.info("info-line")
    log.debug("debug-line")

    text = log_text(tmp_path)
    for line in seen:
        assert line in text
    for line in unseen:
        assert line not in text
    assert capsys.readouterr().err == ""  # a file was asked for: the console stays quiet


def test_file_lines_carry_level_and_logger(tmp_path: Path, log) -> None:
    logs.setup(tmp_path, "2")
    log.warning("something odd")
    line = log_text(tmp_path).strip()
    assert f"WARNING [{os.getpid()}] tq_mw_thehive.test_logs: something odd" in line


def test_log_dir_is_created(tmp_path: Path, log) -> None:
    log_dir = tmp_path / "var" / "log" / "tq"
    logs.setup(log_dir, "2")
    log.info("hello")
    assert "hello" in log_text(log_dir)


def test_stdout_logs_to_stderr_and_to_the_file(tmp_path: Path, log, capsys) -> None:
    logs.setup(tmp_path, "stdout")
    log.info("both-places")
    log.debug("nowhere")

    err = capsys.readouterr().err
    assert "both-places" in err and "nowhere" not in err
    text = log_text(tmp_path)
    assert "both-places" in text and "nowhere" not in text


@pytest.mark.parametrize("verbosity", [None, "stdout"])
def test_without_a_dir_logs_to_the_console_only(tmp_path: Path, monkeypatch, log, capsys, verbosity) -> None:
    monkeypatch.chdir(tmp_path)
    logs.setup(None, verbosity)
    log.info("console-only")
    log.debug("too-chatty")

    err = capsys.readouterr().err
    assert "console-only" in err and "too-chatty" not in err
    assert list(tmp_path.iterdir()) == []
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)


def test_setup_replaces_previous_handlers(tmp_path: Path, log) -> None:
    logs.setup(tmp_path / "one", "2")
    logs.setup(tmp_path / "two", "2")
    log.info("after-second-setup")
    assert "after-second-setup" not in log_text(tmp_path / "one")
    assert "after-second-setup" in log_text(tmp_path / "two")
    assert len(logging.getLogger().handlers) == 1


def test_third_party_chatter_is_quiet_unless_debugging(tmp_path: Path) -> None:
    logs.setup(tmp_path, "2")
    assert logging.getLogger("urllib3").level == logging.WARNING
    logs.setup(tmp_path, "3")
    assert logging.getLogger("urllib3").level == logging.DEBUG


def test_file_follows_logrotate(tmp_path: Path, log) -> None:
    """logrotate renames the file without copytruncate: the next line goes to a new file."""
    logs.setup(tmp_path, "2")
    log.info("before-rotation")
    os.rename(tmp_path / logs.LOG_FILE, tmp_path / (logs.LOG_FILE + ".1"))
    log.info("after-rotation")

    rotated = log_text(tmp_path, logs.LOG_FILE + ".1")
    current = log_text(tmp_path)
    assert "before-rotation" in rotated and "after-rotation" not in rotated
    assert "after-rotation" in current and "before-rotation" not in current


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_log_file_is_created_0600_whatever_the_umask(tmp_path: Path, log, umask) -> None:
    """Log lines carry case titles, observable values and addresses: not for other local users."""
    logs.setup(tmp_path, "2")
    log.info("first line")
    assert file_mode(tmp_path / logs.LOG_FILE) == 0o600


def test_the_file_reopened_after_logrotate_is_0600_too(tmp_path: Path, log, umask) -> None:
    logs.setup(tmp_path, "2")
    log.info("before-rotation")
    os.rename(tmp_path / logs.LOG_FILE, tmp_path / (logs.LOG_FILE + ".1"))
    log.info("after-rotation")
    assert "after-rotation" in log_text(tmp_path)
    assert file_mode(tmp_path / logs.LOG_FILE) == 0o600


def test_an_existing_log_file_keeps_the_mode_it_has(tmp_path: Path, log) -> None:
    """logrotate's ``create 0640 user group`` (or the operator) chose that mode: left alone."""
    (tmp_path / logs.LOG_FILE).write_text("")
    (tmp_path / logs.LOG_FILE).chmod(0o640)
    logs.setup(tmp_path, "2")
    log.info("appended")
    assert file_mode(tmp_path / logs.LOG_FILE) == 0o640 and "appended" in log_text(tmp_path)


def test_unusable_log_dir_is_a_setup_error_naming_it(tmp_path: Path, log) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    log_dir = blocker / "logs"
    root = logging.getLogger()
    before = root.handlers[:]

    with pytest.raises(logs.LogSetupError) as err:
        logs.setup(log_dir, "2")
    assert str(log_dir) in str(err.value)
    assert root.handlers == before  # the logging in place is left alone


# --- redaction ---------------------------------------------------------------------------------

def emit_with_secret(log: logging.Logger, where: str) -> None:
    if where == "message":
        log.warning(f"calling ThreatQ with token {SECRET} failed")
    elif where == "args":
        log.warning("calling ThreatQ with token %s failed", SECRET)
    else:
        try:
            raise RuntimeError(f"401 for token {SECRET}")
        except RuntimeError:
            log.exception("calling ThreatQ failed")


@pytest.mark.parametrize("where", ["message", "args", "exception"])
def test_registered_secret_never_reaches_the_file(tmp_path: Path, log, where) -> None:
    logs.setup(tmp_path, "2")
    logs.add_secrets([SECRET, None, ""])
    emit_with_secret(log, where)

    text = log_text(tmp_path)
    assert "calling ThreatQ" in text
    assert SECRET not in text
    assert logs.MASK in text
    if where == "exception":
        assert "RuntimeError: 401 for token ***" in text


@pytest.mark.parametrize("where", ["message", "args", "exception"])
def test_registered_secret_never_reaches_the_console(log, capsys, where) -> None:
    logs.setup(None, "stdout")
    logs.add_secrets([SECRET])
    emit_with_secret(log, where)
    err = capsys.readouterr().err
    assert "calling ThreatQ" in err
    assert SECRET not in err and logs.MASK in err


def test_secret_registered_before_setup_is_masked(tmp_path: Path, log) -> None:
    logs.add_secrets([SECRET])
    logs.setup(tmp_path, "2")
    log.warning("token=%s", SECRET)
    assert "token=***" in log_text(tmp_path)


def test_longer_secret_is_masked_whole_when_it_contains_a_shorter_one() -> None:
    logs.add_secrets(["abcd", "abcdefgh-1234"])
    assert logs.redact("x abcdefgh-1234 y abcd z") == "x *** y *** z"


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer abc123def", "Authorization: Bearer ***"),
    ("Authorization: Basic dXNlcjpwYXNz1", "Authorization: Basic ***"),
    ("headers={'Authorization': 'Bearer eyJhbGciOi.J9eyJzdWIi.OiIx-MjM0_NTY3'}",
     "headers={'Authorization': 'Bearer ***'}"),
])
def test_http_credentials_are_masked(text: str, expected: str) -> None:
    assert logs.redact(text) == expected


def test_padded_basic_credential_without_digits_is_masked() -> None:
    assert logs.redact("Authorization: Basic dXNlcjpwYXNzMQ== sent") == "Authorization: Basic *** sent"


@pytest.mark.parametrize("text", [
    "auth=bearer state_db=/tmp/x.db",
    "webhook auth is Bearer token or Basic authentication",
    "Basic authentication failed for user admin",
    "Bearer",
])
def test_ordinary_words_are_not_masked(text: str) -> None:
    assert logs.redact(text) == text


def test_credentials_are_masked_in_the_file(tmp_path: Path, log) -> None:
    logs.setup(tmp_path, "2")
    log.info("sending Authorization: Bearer abc123def to %s", "threatq.example.org")
    text = log_text(tmp_path)
    assert "abc123def" not in text
    assert "Authorization: Bearer *** to threatq.example.org" in text


def test_short_secrets_are_ignored(tmp_path: Path, log) -> None:
    logs.add_secrets(["abc", "x"])
    assert logs._secrets == set()
    logs.setup(tmp_path, "2")
    log.info("the abc of x")
    assert "the abc of x" in log_text(tmp_path)


def test_four_character_secret_is_masked() -> None:
    logs.add_secrets(["wxyz"])
    assert logs.redact("key=wxyz") == "key=***"


@given(st.text(alphabet="bBeEaArRsSiIcCſKk \t:='\"-_.1234é", max_size=40))
@example("Authorization: BASIC dXNlcjpwYXNz1")
@example("Authorization: bEaReR abc123def")
@example("Authorization: Baſic dXNlcjpwYXNz1")
@example("Authorization: Basic dXNlcjpwYXNzMQ== sent")
@settings(max_examples=500, deadline=None)
def test_the_ascii_shortcut_of_redaction_masks_exactly_what_the_pattern_masks(text: str) -> None:
    """Redaction skips its pattern for ASCII text without "bearer"/"basic" in any case: it must
    answer what the pattern answers for every text, the odd cases ("BeArEr", "Baſic") included."""
    expected = logs._CREDENTIAL.sub(lambda m: f"{m.group(1)} {logs.MASK}", text)
    assert logs.redact(text) == expected
    assert logs.redact("Bearer " + text + "1x") == \
        logs._CREDENTIAL.sub(lambda m: f"{m.group(1)} {logs.MASK}", "Bearer " + text + "1x")


def test_the_time_prefix_written_once_a_second_is_what_logging_writes() -> None:
    ours, theirs = logs.RedactingFormatter("%(asctime)s %(message)s"), logging.Formatter("%(asctime)s %(message)s")
    for created in (1_760_000_000.001, 1_760_000_000.999, 1_760_000_001.0, 1_760_000_001.5, 1_760_000_000.5):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.formatTime(record) == theirs.formatTime(record)
        assert ours.formatTime(record, "%H") == theirs.formatTime(record, "%H")


# --- control characters ------------------------------------------------------------------------

def test_no_code_point_survives_escaping_as_a_line_break_or_a_control() -> None:
    """Exhaustive over Unicode: whatever a payload holds, the escaped text is one line for every
    reader (str.splitlines knows the most line ends: VT, FF, FS/GS/RS, NEL, U+2028, U+2029) and
    holds no control character at all (C0, DEL, C1), nor a bidi override."""
    import unicodedata

    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    escaped = logs.escape_controls(every)
    assert len(("a" + escaped + "b").splitlines()) == 1
    assert not [c for c in set(escaped) if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
    assert not set(escaped) & {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
    # Only the controls change: everything else is written as it came.
    printable = "".join(c for c in every[:0x3000] if unicodedata.category(c) not in ("Cc", "Zl", "Zp", "Cf"))
    assert logs.escape_controls(printable) == printable


def test_the_printable_ascii_shortcut_of_escaping_changes_nothing_the_pattern_would_change() -> None:
    for code in range(128):
        text = f"a{chr(code)}b"
        assert logs.escape_controls(text) == logs._CONTROL.sub(logs._escape_one, text), hex(code)


def test_a_lone_surrogate_is_written_as_an_escape_not_lost_with_its_line(tmp_path: Path, log) -> None:
    """JSON's "\\ud800" decodes to a string a UTF-8 file cannot hold: logging would drop the line."""
    logs.setup(tmp_path, "2")
    log.warning("event object=%s", "~1\ud800x")
    assert "event object=~1\\ud800x" in log_text(tmp_path)


FORGED = "1999-12-31 23:59:59,999 WARNING [1] tq_mw_thehive.web: rejected outcome=unauthorized"


@pytest.mark.parametrize("char, shown", [
    ("\x00", "\\x00"), ("\x1b", "\\x1b"), ("\x0b", "\\x0b"), ("\x0c", "\\x0c"), ("\r", "\\r"), ("\n", "\\n"),
    ("\t", "\\t"), ("\x1c", "\\x1c"), ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9b", "\\x9b"),
    ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\u202e", "\\u202e"),
])
def test_a_control_character_in_a_value_cannot_forge_a_line(tmp_path: Path, log, char, shown) -> None:
    logs.setup(tmp_path, "2")
    log.warning("event object=%s", f"~1{char}{FORGED}")
    log.warning("event object=%r", f"~2{char}{FORGED}")
    text = log_text(tmp_path)
    lines = text.splitlines()
    assert len(lines) == 2 and not [line for line in lines if line.startswith("1999-12-31")]
    assert f"object=~1{shown}{FORGED}" in text
    assert all(char not in line for line in text.split("\n"))


def test_an_exception_text_keeps_its_traceback_but_cannot_forge_a_line(tmp_path: Path, log) -> None:
    logs.setup(tmp_path, "2")
    try:
        raise RuntimeError(f"bad value\n{FORGED}\x1b[2J\u2028{FORGED}")
    except RuntimeError:
        log.exception("failed")
    lines = log_text(tmp_path).splitlines()
    assert lines[0].endswith("failed") and lines[1].strip() == "Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in lines[1:])  # every traceback line indented
    assert not [line for line in lines if line.startswith("1999-12-31")]
    assert "\\x1b[2J\\u2028" in lines[-1]


def test_a_traceback_another_handler_formatted_first_is_escaped_too(tmp_path: Path, log) -> None:
    """logging caches a record's exc_text: ours must not reuse another formatter's raw one."""
    logs.setup(tmp_path, "2")
    plain = logging.StreamHandler(open(os.devnull, "w"))
    plain.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers.insert(0, plain)
    try:
        try:
            raise RuntimeError(f"x\n{FORGED}")
        except RuntimeError:
            log.exception("failed")
    finally:
        root.removeHandler(plain)
        plain.stream.close()
    assert not [line for line in log_text(tmp_path).splitlines() if line.startswith("1999-12-31")]


# --- the log directory -------------------------------------------------------------------------

def test_a_log_directory_the_daemon_creates_is_0700_whatever_the_umask(tmp_path: Path, log, umask) -> None:
    log_dir = tmp_path / "var" / "log" / "tq"
    logs.setup(log_dir, "2")
    log.info("hello")
    assert file_mode(log_dir) == 0o700
    assert file_mode(tmp_path / "var") == 0o700 and file_mode(tmp_path / "var" / "log") == 0o700
    assert file_mode(log_dir / logs.LOG_FILE) == 0o600


def test_an_existing_log_directory_keeps_the_mode_it_has(tmp_path: Path, log) -> None:
    """An operator who made /var/log/tq_labs 0750 for a log reader group chose that."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_dir.chmod(0o750)
    logs.setup(log_dir, "2")
    log.info("hello")
    assert file_mode(log_dir) == 0o750
