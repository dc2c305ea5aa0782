"""README's Quick start, exactly as a newcomer runs it: a fresh clone, a fresh venv, its root.

The first line is run here as printed. The second one is the suite itself, so CI runs it
(``.ci/run``); this file checks that ``.ci/run`` says the same line.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quick_start() -> List[str]:
    """The command lines of README's Quick start block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def fresh_clone(target: Path) -> Path:
    """What a clone of this working tree holds: the files git tracks, and new ones it does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in the clone
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_quick_start_has_two_lines_and_ci_runs_the_second():
    install_and_demo, install_and_test = quick_start()
    assert install_and_demo == "pip install . && tq-mw-thehive demo"
    assert "-e" not in install_and_test.split(), "the newcomer's install is a plain one"
    assert install_and_test in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_the_quick_start_demo_works_from_a_fresh_clones_root(tmp_path):
    clone = fresh_clone(tmp_path / "tq-mw-thehive")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    bin_dir = tmp_path / "venv" / "bin"
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "TQ_MW_OFFLINE_INDEX_DIR")}  # as a newcomer has it
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(tmp_path / "venv"))
    line = quick_start()[0]
    result = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Inbox: 23 done, 0 pending, 0 dead." in result.stdout
    installed = subprocess.run([str(bin_dir / "python"), "-c", "import tq_mw_thehive as t; print(t.__file__)"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "venv") in installed.stdout, "a plain install, not the clone"
    # From the root, Python finds the source tree first; it must be whole.
    imported = subprocess.run([str(bin_dir / "python"), "-c", "import tq_mw_thehive.plugins, tq_mw_thehive.cli"],
                              cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
