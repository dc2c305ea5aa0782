"""The Troubleshooting table (docs/troubleshooting.md) stays honest: every warning or error the code
can log has a row.

The code is read with ``ast``: each ``log.warning/error/exception/critical(...)`` call (and
``log.log(level, ...)``, whose level is chosen at run time) in ``tq_mw_thehive/`` (bundled
plugins included) gives its format string. A row matches when its first cell (the line as it
appears) contains, in order, the format's first literal pieces (each cut to 4 words) and, for
lines of the ``outcome=<word>`` kind, that outcome. Values in the row are examples, so a format
may change its placeholders freely; a new message, or a reworded start, needs its row.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
LEVELS_NEEDING_A_ROW = {"warning", "error", "exception", "critical", "log"}
PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[a-zA-Z%]")
# Formats with no text of their own pass on an exception's message: the rows for those messages.
PASSED_THROUGH = {
    ("tq_mw_thehive/startup.py", "%s"): ["threatq_tokens.json is damaged"],  # ThreatQAuthError of load_tokens
}
# The info lines an operator watches for; not required by the scan, required here.
KEY_INFO_LINES = ["starting listen=", "ready listening=", "worker ready pid=", "event audit=", "sync audit=",
                  "outcome=synced", "progress job=", "finished done=", "catch-up done cases="]


def log_calls() -> Iterator[Tuple[str, int, str, str]]:
    """(path, line, level, format) of each logging call with a literal format string."""
    for base in ("tq_mw_thehive",):
        for path in sorted((ROOT / base).rglob("*.py")):
            if "testing" in path.relative_to(ROOT).parts:  # the simulators are not the product
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                level = node.func.attr
                if level not in LEVELS_NEEDING_A_ROW | {"info", "debug"}:
                    continue
                if "log" not in ast.unparse(node.func.value).lower():
                    continue
                args = node.args[1:] if level == "log" else node.args
                if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                    yield str(path.relative_to(ROOT)), node.lineno, level, args[0].value


def literal_pieces(fmt: str) -> List[str]:
    pieces = [p.strip() for p in PLACEHOLDER.split(fmt)]
    return [" ".join(p.split()[:4]) for p in pieces if re.search("[A-Za-z]", p)][:3]


def table_rows() -> List[str]:
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    assert text.startswith("# Troubleshooting\n"), "docs/troubleshooting.md is the Troubleshooting page"
    section = text[text.index("\n## Log lines\n"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no rows in the Troubleshooting table (docs/troubleshooting.md)"
    # First cell; backticks removed (a row wraps code in one or two of them).
    return [row[2:].split(" | ", 1)[0].replace("`", "") for row in rows]


def has_row(rows: List[str], pieces: List[str], outcome: str) -> bool:
    for row in rows:
        at = 0
        for piece in pieces:
            at = row.find(piece.replace("`", ""), at)
            if at < 0:
                break
            at += len(piece)
        else:
            if not outcome or outcome in row:
                return True
    return False


def test_every_warning_and_error_log_line_has_a_troubleshooting_row():
    rows = table_rows()
    missing, scanned = [], 0
    for path, line, level, fmt in log_calls():
        if level not in LEVELS_NEEDING_A_ROW:
            continue
        scanned += 1
        pieces = literal_pieces(fmt)
        if not pieces:
            texts = PASSED_THROUGH.get((path, fmt))
            if texts is None:
                missing.append(f"{path}:{line} {fmt!r}: no text of its own; add its messages to PASSED_THROUGH")
            else:
                missing += [f"{path}:{line} passes on {t!r}" for t in texts if not any(t in r for r in rows)]
            continue
        outcome = re.search(r"outcome=([a-z_]+)", fmt)
        if not has_row(rows, pieces, outcome.group(0) if outcome else ""):
            missing.append(f"{path}:{line} {level} {fmt!r}")
    assert scanned >= 30, "the scan found too few log calls: is it still reading the code?"
    assert not missing, "docs/troubleshooting.md has no row for:\n" + "\n".join(missing)


def test_the_key_info_lines_have_rows():
    rows = table_rows()
    assert [key for key in KEY_INFO_LINES if not any(key in row for row in rows)] == []


def test_the_matcher_catches_a_line_without_a_row():
    rows = table_rows()
    assert has_row(rows, literal_pieces("inbox event %s: lease lost while it was being applied"), "")
    assert not has_row(rows, literal_pieces("inbox event %s: lease stolen by %s"), "")
    assert not has_row(rows, literal_pieces("event audit=%s type=%s action=%s"), "outcome=exploded")
    assert not has_row(rows, literal_pieces("something brand new went wrong: %s"), "")
