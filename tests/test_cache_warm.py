"""`tq-mw-thehive cache warm`: known values looked up ahead of time, gated like the worker, with progress.

No network: connections are refused (and fail the test); the online bundled plugins have no
key so they are skipped; a stand-in plugin (external, like an online service) counts its lookups.
"""
from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import List

import pytest
from click.testing import CliRunner

from conftest import sample, write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import progress
from tq_mw_thehive.cli import cli
from tq_mw_thehive import known_values
from tq_mw_thehive.known_values import KnownValue
from tq_mw_thehive.services import Services
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.thehive import events

STAND_IN = '''\
from pathlib import Path

from tq_mw_thehive.enrichment.plugin import Result

NAME = "standin"
TITLE = "Standin"
VERSION = "1"
DATA_TYPES = ("ip", "domain", "hash")
EXTERNAL = True
ACTIVE = False
API_KEYS = {}
HERE = Path(__file__).resolve().parent


def lookup(request):
    with open(HERE / "calls.txt", "a", encoding="utf-8") as calls:
        calls.write(f"{request.data_type} {request.value}\\n")
    return Result("suspicious", {"score": 7}, {"Standin Score": "7"})
'''


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    attempts: List[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in these tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "my_plugins"
    directory.mkdir()
    (directory / "standin.py").write_text(STAND_IN, encoding="utf-8")
    return directory


@pytest.fixture
def conf(tmp_path: Path, plugin_dir: Path) -> Path:
    directory = tmp_path / "conf"
    directory.mkdir()
    write_config(directory, enrichment={"plugin_dirs": [str(plugin_dir)]})
    return directory


def synced_observable(conf: Path, obs_id: str, data_type: str, data: str, tlp: int, pap: int = 1) -> None:
    """An observable as the worker leaves it: its event in the inbox (done) and its object_map row."""
    db_path = config_mod.load(conf).state_db
    inbox = Inbox.open(db_path)
    payload = sample("th5-observable-create-ip.json")
    payload["_id"] = f"~audit-{obs_id}"
    payload["objectId"] = obs_id
    for key in ("object", "details"):
        payload[key].update(_id=obs_id, dataType=data_type, data=data, tlp=tlp, pap=pap)
        payload[key].pop("tlpLabel", None)
        payload[key].pop("papLabel", None)
    inbox.put(events.parse(payload), json.dumps(payload))
    item = inbox.claim("test")
    assert inbox.done(item.id, "test")
    SyncState(db_path).record(obs_id, "observable", "indicators", 100 + item.id, case_id="~8396848")


def calls(plugin_dir: Path) -> List[str]:
    path = plugin_dir / "calls.txt"
    return sorted(path.read_text(encoding="utf-8").splitlines()) if path.exists() else []


def warm(conf: Path, *args: str):
    result = CliRunner().invoke(cli, ["cache", "warm", "-c", str(conf), *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def cache_rows(conf: Path, plugin: str) -> List[tuple]:
    db = sqlite3.connect(str(config_mod.load(conf).state_db))
    try:
        return sorted(db.execute("SELECT data_type, value FROM enrichment_cache WHERE plugin = ?", (plugin,)))
    finally:
        db.close()


@pytest.fixture
def known(conf: Path) -> Path:
    synced_observable(conf, "~obs-green", "ip", "9.9.9.9", tlp=1)       # GREEN: the stand-in may see it
    synced_observable(conf, "~obs-red", "domain", "secret.example", tlp=3)  # RED: no external plugin may
    synced_observable(conf, "~obs-private", "ip", "10.1.2.3", tlp=0)        # private: never sent out
    assert CliRunner().invoke(cli, ["watch", "add", "1.1.1.1", "-c", str(conf), "--tlp", "GREEN"]).exit_code == 0
    return conf


def test_known_values_come_from_synced_observables_and_watches(known):
    values = known_values.collect(Services(config_mod.load(known)))
    assert sorted(values, key=lambda v: v.value) == [
        KnownValue("ip", "1.1.1.1", "GREEN", "AMBER"),
        KnownValue("ip", "10.1.2.3", "WHITE", "GREEN"),
        KnownValue("ip", "9.9.9.9", "GREEN", "GREEN"),
        KnownValue("domain", "secret.example", "RED", "GREEN"),
    ]


def test_warm_fills_the_cache_through_the_gate_and_a_second_run_calls_nothing(known, plugin_dir):
    first = warm(known)
    # The gate and the private-address rule hold exactly as in the worker.
    assert calls(plugin_dir) == ["ip 1.1.1.1", "ip 9.9.9.9"]
    assert cache_rows(known, "standin") == [("ip", "1.1.1.1"), ("ip", "9.9.9.9")]
    assert ("domain", "secret.example") in cache_rows(known, "domain")  # offline plugins see RED values
    assert "cache warm: 4 value(s); " in first.stdout
    assert "progress job=cache-warm finished done=4 total=4" in first.stderr

    second = warm(known)
    assert calls(plugin_dir) == ["ip 1.1.1.1", "ip 9.9.9.9"]   # zero plugin calls
    assert "0 fetched, 0 not found" in second.stdout and "0 error(s)" in second.stdout

    db = sqlite3.connect(str(config_mod.load(known).state_db))
    db.execute("UPDATE enrichment_cache SET expires_at = 0 WHERE value = '9.9.9.9'")
    db.commit()
    db.close()
    warm(known)
    assert calls(plugin_dir) == ["ip 1.1.1.1", "ip 9.9.9.9", "ip 9.9.9.9"]  # expired: again


def test_warm_of_one_plugin_leaves_the_others_alone(known, plugin_dir):
    result = warm(known, "--plugin", "standin")
    assert "2 fetched" in result.stdout
    assert calls(plugin_dir) == ["ip 1.1.1.1", "ip 9.9.9.9"]
    assert cache_rows(known, "geoip") == [] and cache_rows(known, "domain") == []


def test_warm_refuses_an_unknown_plugin_and_disabled_enrichment(known, tmp_path):
    result = CliRunner().invoke(cli, ["cache", "warm", "-c", str(known), "--plugin", "nope"])
    assert result.exit_code == 2 and "no loaded plugin 'nope'" in result.output
    off = tmp_path / "off"
    off.mkdir()
    write_config(off, enrichment={"enabled": False})
    result = CliRunner().invoke(cli, ["cache", "warm", "-c", str(off)])
    assert result.exit_code == 2 and "enrichment.enabled is false" in result.output


def test_warm_logs_progress_lines_off_a_terminal(known, monkeypatch):
    monkeypatch.setattr(progress, "DEFAULT_INTERVAL_S", 0.0)
    result = warm(known)
    lines = [line.split(": ", 1)[1] for line in result.stderr.splitlines() if "progress job=cache-warm" in line]
    assert [line.split(" rate=")[0] for line in lines[:4]] == [
        f"progress job=cache-warm done={n} total=4" for n in (1, 2, 3, 4)]
    assert lines[-1].startswith("progress job=cache-warm finished done=4 total=4")
    assert "\r" not in result.stderr


def test_an_observable_whose_events_do_not_read_is_left_out(conf):
    db_path = config_mod.load(conf).state_db
    synced_observable(conf, "~obs-ok", "ip", "8.8.4.4", tlp=1)
    db = sqlite3.connect(str(db_path))
    db.execute("UPDATE inbox SET body = '{\"object\": {\"_id\": \"~obs-ok\"}}'")  # no dataType
    db.commit()
    db.close()
    assert known_values.collect(Services(config_mod.load(conf))) == []
