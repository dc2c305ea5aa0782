"""The files ops copy out of the repository: they must stay true to the code."""
from __future__ import annotations

import configparser
from pathlib import Path

from tq_mw_thehive import config as config_mod

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_lists_every_key(tmp_path, monkeypatch):
    for name in ("TQ_CLIENT_ID", "THEHIVE_API_KEY", "TQ_MW_WEBHOOK_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    (tmp_path / "config.yaml").write_text((ROOT / "config" / "config.example.yaml").read_text())
    cfg = config_mod.load(tmp_path)
    assert cfg.webhook.token == "value-of-tq_mw_webhook_token"
    assert set(cfg.to_dict()) == {"threatq", "thehive", "webhook", "sync", "enrichment", "web", "state_db"}
    example = (ROOT / "config" / "config.example.yaml").read_text()
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for key in values:
                assert f"  {key}:" in example, f"{section}.{key} missing from the example"


def test_systemd_unit_runs_the_guide_command_hardened():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "tq_thehive.service")
    service = unit["Service"]
    assert "tq-mw-thehive -c /etc/tq_labs/ -ll /var/log/tq_labs/" in service["ExecStart"]
    assert service["Restart"] == "always"
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


def test_monitor_timer_runs_the_monitor_once_per_activation():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "tq_thehive-monitor.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert "tq-mw-thehive monitor --once -c /etc/tq_labs/" in unit["Service"]["ExecStart"]
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.optionxform = str
    timer.read(ROOT / "systemd" / "tq_thehive-monitor.timer")
    assert timer["Timer"]["OnUnitActiveSec"] and timer["Install"]["WantedBy"] == "timers.target"
