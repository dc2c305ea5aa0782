"""The files ops copy out of the repository: they must stay true to the code."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tq_mw_thehive import config as config_mod

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_lists_every_key(tmp_path, monkeypatch):
    for name in ("TQ_CLIENT_ID", "THEHIVE_API_KEY", "TQ_MW_WEBHOOK_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    (tmp_path / "config.yaml").write_text((ROOT / "config" / "config.example.yaml").read_text())
    cfg = config_mod.load(tmp_path)
    assert cfg.webhook.token == "value-of-tq_mw_webhook_token"
    assert set(cfg.to_dict()) == {"threatq", "thehive", "webhook", "sync", "enrichment", "web", "inbox", "logs", "writeback",
                                  "state_db"}
    example = (ROOT / "config" / "config.example.yaml").read_text()
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for key in values:
                assert f"  {key}:" in example, f"{section}.{key} missing from the example"


UNITS = ("tq_thehive.service", "tq_thehive-monitor.service", "tq_thehive-monitor.timer")
VENV_COMMAND = "/opt/tq_mw_thehive/bin/tq-mw-thehive"


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / name)
    return unit


def test_systemd_unit_runs_the_guide_command_hardened():
    unit = read_unit("tq_thehive.service")
    service = unit["Service"]
    assert service["ExecStart"].startswith(f"{VENV_COMMAND} -c /etc/tq_labs/ -ll /var/log/tq_labs/")
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error is not restarted forever
    assert service["EnvironmentFile"] == "-/etc/tq_labs/env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert set(service["ReadWritePaths"].split()) == {"/etc/tq_labs", "/var/log/tq_labs"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_logrotate_snippet_needs_no_copytruncate():
    lines = [line.strip() for line in (ROOT / "config" / "logrotate").read_text().splitlines()]
    directives = [line for line in lines if line and not line.startswith("#")]
    assert "/var/log/tq_labs/*.log {" in directives
    assert "copytruncate" not in directives
    assert "create 0600 tq_labs tq_labs" in directives  # as private as the file the daemon creates


def test_monitor_timer_runs_the_monitor_once_per_activation():
    unit = read_unit("tq_thehive-monitor.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["ExecStart"].startswith(f"{VENV_COMMAND} monitor --once -c /etc/tq_labs/")
    assert unit["Service"]["EnvironmentFile"] == "-/etc/tq_labs/env"
    timer = read_unit("tq_thehive-monitor.timer")
    assert timer["Timer"]["OnUnitActiveSec"] and timer["Install"]["WantedBy"] == "timers.target"
    # Persistent= acts on OnCalendar= only; elsewhere it promises a catch-up that never happens.
    assert "Persistent" not in timer["Timer"] or "OnCalendar" in timer["Timer"]


def test_systemd_analyze_verify_passes_on_every_shipped_unit(tmp_path):
    """Each unit as systemd itself reads it: no unknown key, no bad value, its command present.

    The units go into a scratch root with systemd's own units and a stand-in for the venv's
    command (verify checks that ExecStart exists and is executable).
    """
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    system = tmp_path / "etc" / "systemd" / "system"
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    system.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(ROOT / "systemd" / name, system / name)
    command = tmp_path / VENV_COMMAND.lstrip("/")
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", "--man=no",
                             *(f"/etc/systemd/system/{name}" for name in UNITS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
