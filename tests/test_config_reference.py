"""The configuration reference (docs/configuration.md) lists exactly the keys ``config.py`` accepts,
with their defaults.

The schema is read from ``config.py`` itself: the dataclass fields of each section in
``_SECTIONS`` and the top-level keys of ``Config`` (``config_dir`` is where the file lives, not a
key in it). A key without a row, a row naming a key that does not exist, or a default that differs
from the schema's (where it is a simple value: ``48h`` and 172800 are the same) fails here, so a
new setting cannot ship undocumented and a removed one cannot stay documented.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import minimal_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.config import ConfigError, Duration

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
NOT_A_KEY = {"config_dir"}  # a Config field set from -c, never read from config.yaml
# The type column's word for a field's kind (strings are "string", "URL", a list of choices…).
TYPE_WORDS = {bool: "bool", Duration: "duration", int: "integer", float: "number", list: "list", dict: "mapping"}

Row = Tuple[str, str, str]  # (type cell, default cell, the row as written)


def schema() -> Dict[str, dataclasses.Field]:
    """Every key config.yaml accepts, dotted, with its dataclass field."""
    keys = {f"{section}.{f.name}": f
            for section, cls in config_mod._SECTIONS.items() for f in dataclasses.fields(cls)}
    keys.update({f.name: f for f in dataclasses.fields(config_mod.Config)
                 if f.name not in config_mod._SECTIONS and f.name not in NOT_A_KEY})
    return keys


def reference_rows(text: Optional[str] = None) -> Dict[str, Row]:
    """The reference table's rows by key; a row may name several keys (`a`, `b`)."""
    text = REFERENCE.read_text(encoding="utf-8") if text is None else text
    section = text[text.index("\n## Configuration reference\n"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    rows: Dict[str, Row] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"a reference row has key | type | default | meaning: {line}"
        for key in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", cells[0]):
            assert key not in rows, f"two rows for {key}"
            rows[key] = (cells[1], cells[2], line)
    assert rows, "no rows in the configuration reference (docs/configuration.md)"
    return rows


def default_matches(cell: str, f: dataclasses.Field) -> Optional[bool]:
    """Whether the default column says the schema's default; None where it is not a simple value."""
    meta, default = f.metadata, f.default
    text = cell.strip("`")
    if meta.get("required"):
        return cell == "required"
    if cell.startswith("required for") or cell.startswith("required when"):
        return default is None  # required by another key's value: no default of its own
    if meta.get("kind") is dict and default is None:
        return text in ("{}", "none")
    if default is None:
        return text == "none"
    if isinstance(default, bool):
        return text == str(default).lower()
    if meta.get("kind") is Duration:
        return Duration.parse(text) == default
    if isinstance(default, (int, float)):
        return Duration.parse(text) == float(default)
    if isinstance(default, tuple):
        return text == "[]" and default == ()
    if isinstance(default, Path):
        return text == str(default)
    if isinstance(default, str):
        return text == default or (default == "" and text == "empty")
    return None


def problems(keys: Dict[str, dataclasses.Field], rows: Dict[str, Row]) -> List[str]:
    found = [f"{key}: no row in the configuration reference" for key in keys if key not in rows]
    found += [f"{key}: a row for a key config.py does not accept" for key in rows if key not in keys]
    for key, f in keys.items():
        if key not in rows:
            continue
        type_cell, default_cell, _ = rows[key]
        if default_matches(default_cell, f) is False:
            shown = f.default if f.default is not dataclasses.MISSING else "required"
            found.append(f"{key}: default column says {default_cell!r}, config.py says {shown!r}")
        word = TYPE_WORDS.get(f.metadata.get("kind"))
        if word and word not in type_cell:
            found.append(f"{key}: type column says {type_cell!r}, config.py's kind is {word}")
    return found


def test_every_key_has_a_row_and_every_row_a_key_with_its_default():
    assert problems(schema(), reference_rows()) == []


def test_the_schema_walk_sees_every_section_and_top_level_key():
    keys = schema()
    assert {k.split(".")[0] for k in keys if "." in k} == {"threatq", "thehive", "webhook", "sync",
                                                           "enrichment", "web", "inbox", "logs", "writeback"}
    assert "state_db" in keys and "sync.catch_up" in keys and "enrichment.plugins" in keys
    # config_dir is left out because config.yaml may not set it:
    with pytest.raises(ConfigError, match="config_dir: unknown key"):
        config_mod.from_dict(minimal_config(config_dir="/tmp"), Path("."))


def test_the_check_catches_a_missing_row_an_unknown_row_and_a_wrong_default():
    keys = schema()
    rows = dict(reference_rows())
    rows.pop("sync.catch_up", None)
    rows["sync.catch_down"] = ("bool", "true", "")
    rows["sync.max_age"] = ("duration", "`24h`", "")
    rows["threatq.verify_ssl"] = ("string", "true", "")
    assert sorted(problems(keys, rows)) == sorted([
        "sync.catch_up: no row in the configuration reference",
        "sync.catch_down: a row for a key config.py does not accept",
        "sync.max_age: default column says '`24h`', config.py says 172800.0",
        "threatq.verify_ssl: type column says 'string', config.py's kind is bool",
    ])


@pytest.mark.parametrize("cell, key, expected", [
    ("`48h`", "sync.max_age", True), ("172800", "sync.max_age", True), ("`2d`", "sync.max_age", True),
    ("`5m`", "sync.lease", True), ("`300`", "sync.lease", True), ("`4m`", "sync.lease", False),
    ("true", "sync.catch_up", True), ("false", "sync.catch_up", False),
    ("`TheHive`", "threatq.source", True), ("required", "threatq.host", True), ("none", "threatq.host", False),
    ("`{}`", "enrichment.plugins", True), ("`[]`", "enrichment.disabled", True),
    ("empty", "sync.type_mapping", True), ("required for bearer/key", "webhook.token", True),
    ("`tq_mw_thehive.db`", "state_db", True), ("10", "webhook.max_body_mb", True),
])
def test_defaults_are_compared_by_value_not_by_spelling(cell, key, expected):
    assert default_matches(cell, schema()[key]) is expected
