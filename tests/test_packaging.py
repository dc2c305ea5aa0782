"""A plain ``pip install .`` (not editable) gives a working command, module and bundled plugins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tq_mw_thehive

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path, env=None) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_plain_install_gives_console_script_module_and_plugins(tmp_path):
    target = tmp_path / "site"
    # Dependencies come from the running environment, so nothing is downloaded.
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--target", str(target), str(ROOT), cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    # server imports everything the daemon runs (web, status page, worker, enrichment): all installed.
    run(sys.executable, "-c", "import tq_mw_thehive.server", cwd=tmp_path, env=env)
    where = run(sys.executable, "-c", "import tq_mw_thehive, tq_mw_thehive.plugins as p; "
                "print(tq_mw_thehive.__file__); print(p.__file__)", cwd=tmp_path, env=env).split()
    assert all(Path(w).is_relative_to(target) for w in where), where
    script = run(str(target / "bin" / "tq-mw-thehive"), "--version", cwd=tmp_path, env=env)
    assert tq_mw_thehive.__version__ in script
    assert "--loglocation" in run(sys.executable, "-m", "tq_mw_thehive", "--help", cwd=tmp_path, env=env)
