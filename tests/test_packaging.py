"""A plain ``pip install .`` (not editable) gives a working command, module and bundled plugins."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tq_mw_thehive

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_plain_install_gives_console_script_module_and_plugins(tmp_path):
    venv = tmp_path / "venv"
    # System site-packages supply the dependencies, so nothing is downloaded.
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        str(ROOT), cwd=tmp_path)
    where = run(str(python), "-c", "import tq_mw_thehive, tq_mw_thehive.plugins as p; "
                "print(tq_mw_thehive.__file__); print(p.__file__)", cwd=tmp_path).split()
    assert all(Path(w).is_relative_to(venv) for w in where), where
    assert tq_mw_thehive.__version__ in run(str(venv / "bin" / "tq-mw-thehive"), "--version", cwd=tmp_path)
    assert "--loglocation" in run(str(python), "-m", "tq_mw_thehive", "--help", cwd=tmp_path)
