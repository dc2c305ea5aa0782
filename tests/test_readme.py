"""README's "Writing a plugin" example is real code: write it out, load it, run its own test."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tq_mw_thehive.enrichment.registry import Registry

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> dict:
    """The README's python code blocks, keyed by the file name in their first comment line."""
    blocks = {}
    for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        first = block.splitlines()[0]
        if first.startswith("# "):
            blocks[first[2:].strip()] = block
    return blocks


def test_the_example_plugin_loads_and_its_test_passes(tmp_path):
    blocks = python_blocks()
    plugin_dir = tmp_path / "my_plugins"
    plugin_dir.mkdir()
    for name in ("my_plugins/blocklist.py", "my_plugins/test_blocklist.py"):
        (tmp_path / name).write_text(blocks[name], encoding="utf-8")
    registry = Registry.discover([str(plugin_dir)], entry_points=False)
    info = registry.get("blocklist")
    assert info is not None and info.error is None and info.data_types == ("domain", "fqdn")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(plugin_dir / "test_blocklist.py")], cwd=plugin_dir, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
