"""The enrichment commands as users run them: `plugins`, `keys`, `enrich`, `cache`, `watch`, `monitor`.

No network at all: every test runs with ``socket.socket.connect`` and
``socket.create_connection`` replaced by functions that record the attempt and fail,
and the test fails at teardown if anything tried. Subprocess runs go through
``NO_NETWORK_MAIN``, which does the same in the child before running the package as
``python -m tq_mw_thehive`` would. The online bundled plugins are never called: they
are skipped for a missing key or by the TLP gate. Where a plugin has to answer, a
stand-in plugin file is written into a directory named in ``enrichment.plugin_dirs``;
it appends one line per lookup to ``calls.txt`` beside it and answers what
``answer.txt`` says, so a test can count lookups and change the answer between runs.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml
from click.testing import CliRunner

from conftest import write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state
from tq_mw_thehive.cli import cli

OFFLINE = ("ip_scope", "geoip", "domain", "warninglists")
ONLINE = {"virustotal": "VIRUSTOTAL", "abuseipdb": "ABUSEIPDB", "otx": "OTX", "shodan": "SHODAN",
          "urlhaus": "URLHAUS", "greynoise": "GREYNOISE"}
SECRET = "sk-test-9f8e7d6c5b4a3210"          # a key value that must never be shown
OTHER_SECRET = "env-key-0011223344556677"

NO_NETWORK_MAIN = """\
import runpy, socket, sys

def refuse(*args, **kwargs):
    sys.stderr.write("TEST GUARD: network access attempted\\n")
    raise OSError("network access is disabled in these tests")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
sys.argv[0] = "tq_mw_thehive"
runpy.run_module("tq_mw_thehive", run_name="__main__", alter_sys=True)
"""

STAND_IN = '''\
"""Test stand-in: one line per lookup in calls.txt beside it; answers what answer.txt says."""
from pathlib import Path

from tq_mw_thehive.enrichment.plugin import Result

NAME = "standin"
TITLE = "Standin"
DESCRIPTION = "stand-in for an online service"
VERSION = "1"
DATA_TYPES = ("ip", "domain", "fqdn", "url")
EXTERNAL = True
ACTIVE = False
API_KEYS = {}
HERE = Path(__file__).resolve().parent


def lookup(request):
    with open(HERE / "calls.txt", "a", encoding="utf-8") as calls:
        calls.write(f"{request.data_type} {request.value}\\n")
    answer = HERE / "answer.txt"
    score = answer.read_text(encoding="utf-8").strip() if answer.exists() else "10"
    return Result("suspicious", {"score": score}, {"Standin Score": score})
'''

# Uses a stored key; logs it (the log redactor must hide it) but never puts it in its answer.
KEYED = '''\
"""Test stand-in that needs the key STANDIN_KEY."""
import logging

from tq_mw_thehive.enrichment.plugin import PluginError, Result

NAME = "keyed"
TITLE = "Keyed"
VERSION = "1"
DATA_TYPES = ("domain",)
EXTERNAL = False
ACTIVE = False
API_KEYS = {"STANDIN_KEY": "https://signup.invalid/"}
log = logging.getLogger("keyed_plugin")


def lookup(request):
    key = request.keys.get("STANDIN_KEY")
    if not key:
        raise PluginError("no key")
    log.warning("keyed plugin calling its service with key %s", key)
    return Result("info", {"length": len(key)}, {"Keyed Length": str(len(key))})
'''

# A plugin whose failure message quotes its key, as a requests exception quoting a URL with the key would.
LEAKY = '''\
from tq_mw_thehive.enrichment.plugin import PluginError

NAME = "leaky"
VERSION = "1"
DATA_TYPES = ("domain",)
EXTERNAL = False
API_KEYS = {"LEAKY_KEY": "https://signup.invalid/"}


def lookup(request):
    raise PluginError(f"GET https://api.invalid/v1/lookup?key={request.keys['LEAKY_KEY']} failed")
'''


# --- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails, and fails the test even if the code under test swallows it."""
    attempts: List[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access is disabled in these tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(autouse=True)
def no_key_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TQ_MW_"):
            monkeypatch.delenv(name)


def started(config_dir: Path) -> Path:
    """``config_dir`` as after the daemon's first start: its state database exists (empty)."""
    state.open_state(config_mod.load(config_dir).state_db).close()
    return config_dir


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A configuration directory after the daemon's first start (the commands need its database)."""
    write_config(tmp_path)
    return started(tmp_path)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "my_plugins"
    directory.mkdir()
    (directory / "standin.py").write_text(STAND_IN, encoding="utf-8")
    return directory


@pytest.fixture
def conf(tmp_path: Path, plugin_dir: Path) -> Path:
    """A config directory whose enrichment loads the stand-in besides the bundled plugins."""
    directory = tmp_path / "conf"
    directory.mkdir()
    write_config(directory, enrichment={"plugin_dirs": [str(plugin_dir)]})
    return started(directory)


def run(*args: str, input: Optional[str] = None, env: Optional[Dict[str, str]] = None):
    return CliRunner().invoke(cli, list(args), input=input, env=env)


def ok(*args: str, **kwargs):
    result = run(*args, **kwargs)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def as_json(*args: str, **kwargs):
    return json.loads(ok(*args, "--json", **kwargs).stdout)


def run_process(args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_")}
    return subprocess.run([sys.executable, "-c", NO_NETWORK_MAIN, *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def calls(plugin_dir: Path) -> List[str]:
    path = plugin_dir / "calls.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def state_db(config_dir: Path) -> Path:
    return config_mod.load(config_dir).state_db


def set_next_due(config_dir: Path, value: str, when: float) -> None:
    db = sqlite3.connect(str(state_db(config_dir)))
    try:
        assert db.execute("UPDATE watches SET next_due = ? WHERE value = ?", (when, value)).rowcount == 1
        db.commit()
    finally:
        db.close()


def make_due(config_dir: Path, value: str) -> None:
    set_next_due(config_dir, value, time.time() - 60)


def next_due(config_dir: Path, value: str) -> float:
    db = sqlite3.connect(str(state_db(config_dir)))
    try:
        return db.execute("SELECT next_due FROM watches WHERE value = ?", (value,)).fetchone()[0]
    finally:
        db.close()


def by_plugin(document) -> Dict[str, dict]:
    rows = document["results"] if isinstance(document, dict) else document
    key = "plugin" if rows and "plugin" in rows[0] else "name"
    return {row[key]: row for row in rows}


def table_row(output: str, first: str) -> str:
    rows = [line for line in output.splitlines() if line.split()[:1] == [first]]
    assert len(rows) == 1, f"no single row for {first!r} in:\n{output}"
    return rows[0]


# --- plugins ------------------------------------------------------------------------------------

def test_plugins_lists_every_bundled_plugin_with_its_state(config_dir):
    output = ok("plugins", "-c", str(config_dir)).output
    for name in OFFLINE:
        assert table_row(output, name).split()[1] == "enabled"
    for name, key in ONLINE.items():
        assert f"missing key: {key}" in table_row(output, name)

    listing = as_json("plugins", "-c", str(config_dir))
    assert isinstance(listing, list)
    plugins = by_plugin(listing)
    assert set(OFFLINE) | set(ONLINE) <= set(plugins)
    for entry in listing:
        assert {"name", "state", "data_types", "external", "active", "keys"} <= set(entry)
    for name in OFFLINE:
        assert plugins[name]["state"] == "enabled" and plugins[name]["external"] is False
        assert plugins[name]["keys"] == {}
    for name, key in ONLINE.items():
        assert plugins[name]["state"] == f"missing key: {key}"
        assert plugins[name]["external"] is True and list(plugins[name]["keys"]) == [key]
    assert plugins["geoip"]["data_types"] == ["ip"]
    assert "url" in plugins["domain"]["data_types"]


def test_a_stored_key_enables_its_plugin(config_dir):
    ok("keys", "set", "VIRUSTOTAL", "-c", str(config_dir), input=SECRET + "\n")
    plugins = by_plugin(as_json("plugins", "-c", str(config_dir)))
    assert plugins["virustotal"]["state"] == "enabled"
    assert plugins["abuseipdb"]["state"] == "missing key: ABUSEIPDB"


def test_a_plugin_disabled_in_the_config_says_so(tmp_path):
    write_config(tmp_path, enrichment={"disabled": ["geoip"]})
    plugins = by_plugin(as_json("plugins", "-c", str(tmp_path)))
    assert plugins["geoip"]["state"] == "disabled by config"
    assert plugins["ip_scope"]["state"] == "enabled"
    assert table_row(ok("plugins", "-c", str(tmp_path)).output, "geoip").split()[1:4] == \
        ["disabled", "by", "config"]


def test_a_broken_plugin_file_shows_its_import_error_and_the_rest_still_load(conf, plugin_dir):
    (plugin_dir / "broken.py").write_text("import no_such_module_for_these_tests\nNAME = 'broken'\n",
                                          encoding="utf-8")
    result = ok("plugins", "-c", str(conf))
    assert "ModuleNotFoundError" in table_row(result.output, "broken")
    assert table_row(result.output, "standin").split()[1] == "enabled"
    plugins = by_plugin(as_json("plugins", "-c", str(conf)))
    assert plugins["broken"]["state"].startswith("import error: ModuleNotFoundError")
    assert "no_such_module_for_these_tests" in plugins["broken"]["state"]
    assert plugins["standin"]["state"] == "enabled" and plugins["geoip"]["state"] == "enabled"


# --- keys ---------------------------------------------------------------------------------------

def test_keys_set_list_delete(config_dir):
    assert ok("keys", "list", "-c", str(config_dir)).output.strip() == "no keys"
    result = ok("keys", "set", "virustotal", "-c", str(config_dir), input=SECRET + "\n")
    assert "stored VIRUSTOTAL" in result.output and SECRET not in result.output

    listing = ok("keys", "list", "-c", str(config_dir)).output
    row = table_row(listing, "VIRUSTOTAL")
    assert SECRET not in listing
    assert "********" + SECRET[-4:] in row
    assert "database" in row
    today = {time.strftime("%Y-%m-%d", time.localtime(t)) for t in (time.time() - 60, time.time())}
    assert any(day in row for day in today), row

    result = ok("keys", "delete", "VIRUSTOTAL", "-c", str(config_dir))
    assert "deleted VIRUSTOTAL" in result.output
    assert ok("keys", "list", "-c", str(config_dir)).output.strip() == "no keys"
    assert by_plugin(as_json("plugins", "-c", str(config_dir)))["virustotal"]["state"] == \
        "missing key: VIRUSTOTAL"
    again = run("keys", "delete", "VIRUSTOTAL", "-c", str(config_dir))
    assert again.exit_code == 1 and "no stored key VIRUSTOTAL" in again.output


def test_an_environment_variable_overrides_a_stored_key(config_dir):
    ok("keys", "set", "VIRUSTOTAL", "-c", str(config_dir), input=SECRET + "\n")
    env = {"TQ_MW_KEY_VIRUSTOTAL": OTHER_SECRET, "TQ_MW_KEY_SHODAN": OTHER_SECRET}
    listing = ok("keys", "list", "-c", str(config_dir), env=env).output
    assert "$TQ_MW_KEY_VIRUSTOTAL" in table_row(listing, "VIRUSTOTAL")
    assert "********" + OTHER_SECRET[-4:] in table_row(listing, "VIRUSTOTAL")
    assert "$TQ_MW_KEY_SHODAN" in table_row(listing, "SHODAN")
    assert SECRET not in listing and OTHER_SECRET not in listing
    assert by_plugin(as_json("plugins", "-c", str(config_dir), env=env))["shodan"]["state"] == "enabled"
    # Without the variable the stored key is back.
    assert "database" in table_row(ok("keys", "list", "-c", str(config_dir)).output, "VIRUSTOTAL")


@pytest.mark.parametrize("name, value, message", [
    ("VIRUSTOTAL", "\n", "cannot be empty"),
    ("VIRUSTOTAL", "   \n", "cannot be empty"),
    ("b@d name", SECRET + "\n", "letters, digits and underscores"),
])
def test_keys_set_refuses_an_empty_value_or_a_bad_name(config_dir, name, value, message):
    result = run("keys", "set", name, "-c", str(config_dir), input=value)
    assert result.exit_code == 2 and message in result.output
    assert SECRET not in result.output
    assert ok("keys", "list", "-c", str(config_dir)).output.strip() == "no keys"


def test_keys_delete_refuses_a_bad_name(config_dir):
    result = run("keys", "delete", "no/such", "-c", str(config_dir))
    assert result.exit_code == 2


def test_keys_set_refuses_a_name_no_plugin_uses_before_reading_the_value(config_dir):
    result = run("keys", "set", "VIRUS_TOTAL", "-c", str(config_dir), input="")
    assert result.exit_code == 2 and result.stdout == ""
    assert "no loaded plugin uses a key named VIRUS_TOTAL" in result.stderr
    for key in ONLINE.values():                      # the names it would take, from the plugins
        assert key in result.stderr
    assert "cannot be empty" not in result.stderr     # refused on the name: stdin was not read
    assert ok("keys", "list", "-c", str(config_dir)).output.strip() == "no keys"


def test_keys_set_takes_a_key_declared_by_a_plugin_from_plugin_dirs(tmp_path):
    plugins = tmp_path / "keyed_plugins"
    plugins.mkdir()
    (plugins / "keyed.py").write_text(KEYED, encoding="utf-8")
    write_config(tmp_path, enrichment={"plugin_dirs": [str(plugins)]})
    c = str(started(tmp_path))
    assert "stored STANDIN_KEY" in ok("keys", "set", "standin-key", "-c", c, input=SECRET + "\n").output
    assert table_row(ok("keys", "list", "-c", c).output, "STANDIN_KEY")
    other = tmp_path / "without_the_plugin"
    other.mkdir()
    write_config(other)
    unknown = run("keys", "set", "STANDIN_KEY", "-c", str(started(other)), input=SECRET + "\n")
    assert unknown.exit_code == 2 and "no loaded plugin uses a key named STANDIN_KEY" in unknown.stderr


def test_a_key_never_appears_in_output_config_or_logs(tmp_path):
    plugins = tmp_path / "keyed_plugins"
    plugins.mkdir()
    (plugins / "keyed.py").write_text(KEYED, encoding="utf-8")
    conf, log_dir = tmp_path / "conf", tmp_path / "logs"
    conf.mkdir()
    write_config(conf, enrichment={"plugin_dirs": [str(plugins)], "disabled": ["warninglists"]})
    started(conf)
    c = str(conf)
    outputs = [
        ok("keys", "set", "STANDIN_KEY", "-c", c, input=SECRET + "\n").output,
        ok("keys", "list", "-c", c).output,
        ok("plugins", "-c", c).output,
        ok("plugins", "-c", c, "--json").output,
        ok("enrich", "example.org", "-c", c, "--plugin", "keyed").output,
        ok("enrich", "example.org", "-c", c, "--json").output,
        ok("watch", "add", "example.org", "-c", c).output,
    ]
    assert "enabled" in table_row(outputs[2], "keyed")
    assert "Keyed Length: %d" % len(SECRET) in outputs[4]
    make_due(conf, "example.org")
    # The real process: the key is read from the database there, the plugin logs it at warning.
    monitor = run_process(["monitor", "--once", "-c", c, "-ll", str(log_dir), "-v", "3"])
    assert monitor.returncode == 0, monitor.stderr
    outputs += [monitor.stdout, monitor.stderr]
    log_text = (log_dir / "tq_mw_thehive.log").read_text(encoding="utf-8")
    assert "keyed plugin calling its service with key ***" in log_text   # it did log, redacted
    assert all(SECRET not in text for text in outputs)

    db_name = state_db(conf).name
    checked = 0
    for path in list(conf.rglob("*")) + list(log_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(db_name):   # the database and its -wal/-shm
            assert SECRET.encode() not in path.read_bytes(), path
            checked += 1
    assert (conf / "config.yaml").exists() and checked >= 2


def test_a_key_quoted_in_a_plugin_error_is_not_printed(tmp_path):
    plugins = tmp_path / "leaky_plugins"
    plugins.mkdir()
    (plugins / "leaky.py").write_text(LEAKY, encoding="utf-8")
    write_config(tmp_path, enrichment={"plugin_dirs": [str(plugins)]})
    started(tmp_path)
    ok("keys", "set", "LEAKY_KEY", "-c", str(tmp_path), input=SECRET + "\n")
    result = ok("enrich", "example.org", "-c", str(tmp_path), "--plugin", "leaky")
    assert "PluginError" in table_row(result.output, "leaky")
    assert SECRET not in result.output
    # The real process: no logging is set up for enrich, so the runner's warning goes out unredacted too.
    process = run_process(["enrich", "example.org", "-c", str(tmp_path), "--plugin", "leaky"])
    assert process.returncode == 0 and SECRET not in process.stdout + process.stderr


# --- enrich -------------------------------------------------------------------------------------

def test_enrich_refresh_ignores_the_cache_and_says_it_uses_quota(config_dir):
    ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN")
    cached = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN")
    assert "cached," in table_row(cached.stdout, "geoip") and "quota" not in cached.stderr
    fresh = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN", "--refresh")
    assert table_row(fresh.stdout, "geoip").endswith("fetched")
    assert "--refresh: the cache is ignored; each online plugin's lookup uses its quota" in fresh.stderr


def test_enrich_over_quota_says_when_and_queues_nothing(config_dir):
    from tq_mw_thehive.enrichment.quota import QuotaBook

    cfg_path = config_dir / "config.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw.setdefault("enrichment", {})["limits"] = {"geoip": {"per_minute": 1}}
    cfg_path.write_text(yaml.safe_dump(raw))
    ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN", "--refresh")
    over = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN", "--refresh")
    assert re.search(r"quota of 1 a minute used; next call possible at \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$",
                     table_row(over.stdout, "geoip")), over.stdout
    assert QuotaBook(config_dir / "tq_mw_thehive.db").depth() == 0


def test_enrich_an_ip_then_the_same_again_from_the_cache(config_dir):
    first = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN").output
    assert first.splitlines()[0] == "8.8.8.8 (ip)"
    assert "IP Scope: global" in table_row(first, "ip_scope")
    assert "GeoIP Country: US" in table_row(first, "geoip")
    assert table_row(first, "geoip").endswith("fetched")
    for name, key in ONLINE.items():
        assert table_row(first, name).endswith(f"missing key: {key}")

    second = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN").output
    for name in ("ip_scope", "geoip", "warninglists"):
        assert re.search(r"cached, \d+ s old$", table_row(second, name)), second  # its age, said
    assert "GeoIP Country: US" in table_row(second, "geoip")
    assert table_row(second, "virustotal").endswith("missing key: VIRUSTOTAL")

    document = as_json("enrich", "8.8.8.8", "-c", str(config_dir), "--tlp", "GREEN")
    assert document["value"] == "8.8.8.8" and document["type"] == "ip"
    results = by_plugin(document)
    for row in document["results"]:
        assert {"plugin", "status", "verdict", "attributes"} <= set(row)
    assert results["geoip"]["status"] == "cached"
    assert results["geoip"]["attributes"]["GeoIP Country"] == "US"
    assert results["geoip"]["verdict"] == "info"
    assert results["ip_scope"]["attributes"]["IP Scope"] == "global"
    assert results["shodan"]["status"] == "skipped" and results["shodan"]["verdict"] is None
    assert "domain" not in results      # it does not take IPs


def test_the_tlp_gate_keeps_an_external_plugin_from_amber_and_red_values(conf, plugin_dir):
    default = as_json("enrich", "example.org", "-c", str(conf), "--plugin", "standin")
    (row,) = default["results"]
    assert row["status"] == "skipped" and "max_tlp_external" in row["reason"] and "AMBER" in row["reason"]
    red = ok("enrich", "example.org", "-c", str(conf), "--plugin", "standin", "--tlp", "RED").output
    assert "max_tlp_external" in table_row(red, "standin")
    assert calls(plugin_dir) == []

    green = as_json("enrich", "example.org", "-c", str(conf), "--plugin", "standin", "--tlp", "GREEN")
    (row,) = green["results"]
    assert row["status"] == "fetched" and row["verdict"] == "suspicious"
    assert row["attributes"]["Standin Score"] == "10"
    assert calls(plugin_dir) == ["domain example.org"]
    again = as_json("enrich", "example.org", "-c", str(conf), "--plugin", "standin", "--tlp", "green")
    assert again["results"][0]["status"] == "cached" and len(calls(plugin_dir)) == 1


def test_a_non_global_address_never_reaches_an_external_plugin(conf, plugin_dir):
    results = by_plugin(as_json("enrich", "10.1.2.3", "-c", str(conf), "--tlp", "WHITE"))
    assert results["standin"]["status"] == "skipped" and "private" in results["standin"]["reason"]
    assert results["ip_scope"]["attributes"]["IP Scope"] == "private"
    assert calls(plugin_dir) == []


def test_enrich_only_one_plugin(config_dir):
    document = as_json("enrich", "8.8.8.8", "-c", str(config_dir), "--plugin", "geoip")
    assert [r["plugin"] for r in document["results"]] == ["geoip"]
    output = ok("enrich", "8.8.8.8", "-c", str(config_dir), "--plugin", "geoip").output
    assert "ip_scope" not in output and "virustotal" not in output


@pytest.mark.parametrize("args", [("8.8.8.8", "--plugin", "nope"), ("example.org", "--plugin", "geoip")])
def test_enrich_with_a_plugin_that_does_not_apply_exits_2(config_dir, args):
    result = run("enrich", *args, "-c", str(config_dir))
    assert result.exit_code == 2 and "no loaded plugin" in result.output


@pytest.mark.parametrize("value, extra, data_type", [
    ("https://x.example/a", (), "url"),
    ("example.org", (), "domain"),
    ("2001:4860:4860::8888", (), "ip"),
    ("example.org", ("--type", "fqdn"), "fqdn"),
])
def test_enrich_guesses_the_type_and_type_overrides(conf, plugin_dir, value, extra, data_type):
    document = as_json("enrich", value, "-c", str(conf), "--tlp", "GREEN", "--plugin", "standin", *extra)
    assert document["type"] == data_type
    assert document["results"][0]["status"] == "fetched"
    assert calls(plugin_dir) == [f"{data_type} {value}"]


def test_enrich_with_a_type_no_plugin_takes(config_dir):
    output = ok("enrich", "whatever", "-c", str(config_dir), "--type", "registry").output
    assert "no plugin takes registry values" in output


# --- cache --------------------------------------------------------------------------------------

def test_cache_stats_and_clear(conf, plugin_dir):
    c = str(conf)
    assert "the cache is empty" in ok("cache", "stats", "-c", c).output
    ok("enrich", "8.8.8.8", "-c", c, "--tlp", "GREEN")
    ok("enrich", "8.8.8.8", "-c", c, "--tlp", "GREEN")
    ok("enrich", "8.8.8.8", "-c", c, "--tlp", "GREEN", "--plugin", "geoip")
    assert len(calls(plugin_dir)) == 1

    stats = by_plugin(as_json("cache", "stats", "-c", c))
    assert stats["geoip"]["hits"] == 2 and stats["geoip"]["misses"] == 1 and stats["geoip"]["entries"] == 1
    assert stats["ip_scope"]["hits"] == 1 and stats["ip_scope"]["misses"] == 1
    assert stats["standin"]["hits"] == 1 and stats["standin"]["misses"] == 1
    assert stats["geoip"]["hit_rate"] == pytest.approx(2 / 3, abs=0.001)
    assert "virustotal" not in stats           # skipped lookups are no cache traffic
    row = table_row(ok("cache", "stats", "-c", c).output, "geoip").split()
    assert row[1:6] == ["1", "0", "2", "1", "0"] and row[6] == "67%"

    assert "removed 1 cached result(s)" in ok("cache", "clear", "-c", c, "--plugin", "geoip").output
    stats = by_plugin(as_json("cache", "stats", "-c", c))
    assert stats["geoip"]["entries"] == 0
    assert stats["ip_scope"]["entries"] == 1 and stats["standin"]["entries"] == 1
    results = by_plugin(as_json("enrich", "8.8.8.8", "-c", c, "--tlp", "GREEN"))
    assert results["geoip"]["status"] == "fetched"
    assert results["ip_scope"]["status"] == "cached" and results["standin"]["status"] == "cached"
    assert results["warninglists"]["status"] == "cached"
    assert len(calls(plugin_dir)) == 1

    entries = sum(row["entries"] for row in as_json("cache", "stats", "-c", c))
    assert entries == 4
    assert f"removed {entries} cached result(s)" in ok("cache", "clear", "-c", c).output
    assert all(row["entries"] == 0 for row in as_json("cache", "stats", "-c", c))
    results = by_plugin(as_json("enrich", "8.8.8.8", "-c", c, "--tlp", "GREEN"))
    assert {results[p]["status"] for p in ("geoip", "ip_scope", "standin", "warninglists")} == {"fetched"}
    assert len(calls(plugin_dir)) == 2
    assert "removed 0 cached result(s)" in ok("cache", "clear", "-c", c, "--plugin", "nope").output


# --- watch --------------------------------------------------------------------------------------

def test_watch_add_list_update_remove(config_dir):
    c = str(config_dir)
    assert ok("watch", "list", "-c", c).output.strip() == "nothing watched"
    assert as_json("watch", "list", "-c", c) == []
    assert "watching example.org (domain)" in ok("watch", "add", "example.org", "-c", c, "--interval", "2h").output
    row = table_row(ok("watch", "list", "-c", c).output, "example.org")
    assert row.split()[1:4] == ["domain", "2", "h"]
    (watch,) = as_json("watch", "list", "-c", c)
    assert watch["value"] == "example.org" and watch["data_type"] == "domain" and watch["interval_s"] == 7200
    assert watch["next_due"] == pytest.approx(time.time(), abs=60)   # a new watch is due at once

    assert "updated watch of example.org" in ok("watch", "add", "example.org", "-c", c, "--interval", "3h").output
    (watch,) = as_json("watch", "list", "-c", c)
    assert watch["interval_s"] == 3 * 3600

    ok("watch", "add", "8.8.8.8", "-c", c)
    listing = as_json("watch", "list", "-c", c)
    assert {(w["value"], w["data_type"]) for w in listing} == {("example.org", "domain"), ("8.8.8.8", "ip")}
    assert {w["value"]: w["interval_s"] for w in listing}["8.8.8.8"] == 86400   # enrichment.monitor_interval

    assert "no longer watching example.org" in ok("watch", "rm", "example.org", "-c", c).output
    again = run("watch", "rm", "example.org", "-c", c)
    assert again.exit_code == 1 and "not watched" in again.output
    assert [w["value"] for w in as_json("watch", "list", "-c", c)] == ["8.8.8.8"]
    assert run("watch", "rm", "8.8.8.8", "-c", c, "--type", "domain").exit_code == 1
    ok("watch", "rm", "8.8.8.8", "-c", c, "--type", "ip")


def test_watch_rm_with_a_type_finds_the_value_as_add_stored_it(config_dir):
    c = str(config_dir)
    ok("watch", "add", "Example.ORG.", "-c", c)
    assert [w["value"] for w in as_json("watch", "list", "-c", c)] == ["example.org"]
    ok("watch", "rm", "Example.ORG.", "-c", c, "--type", "domain")
    assert as_json("watch", "list", "-c", c) == []


def test_watch_rm_without_a_type_finds_the_value_as_add_stored_it(config_dir):
    c = str(config_dir)
    ok("watch", "add", "Example.ORG", "-c", c)
    result = run("watch", "rm", "Example.ORG", "-c", c)
    assert result.exit_code == 0, result.output
    assert as_json("watch", "list", "-c", c) == []


@pytest.mark.parametrize("interval", ["soon", "0"])
def test_watch_add_refuses_a_bad_interval(config_dir, interval):
    result = run("watch", "add", "example.org", "-c", str(config_dir), "--interval", interval)
    assert result.exit_code == 2 and "not a duration" in result.output
    assert as_json("watch", "list", "-c", str(config_dir)) == []


def test_updating_a_watch_keeps_its_tlp_unless_given(config_dir):
    c = str(config_dir)
    ok("watch", "add", "example.org", "-c", c, "--tlp", "RED", "--pap", "RED")
    ok("watch", "add", "example.org", "-c", c, "--interval", "2h")
    (watch,) = as_json("watch", "list", "-c", c)
    assert watch["interval_s"] == 7200
    assert (watch["tlp"], watch["pap"]) == ("RED", "RED")


@pytest.mark.parametrize("value, extra, expected", [
    ("1.2.3", ("--type", "ip"), "not a valid ip value"),
    ("999.1.1.1", (), "not a valid domain value"),               # guessed: a domain, and not one
    ("not a host name", (), "not a valid domain value"),
    ("exa_mple..org", ("--type", "fqdn"), "not a valid fqdn value"),
    ("bad-.example", ("--type", "hostname"), "not a valid hostname value"),
    ("example.org/path", ("--type", "url"), "not a valid url value"),
    ("https://", (), "not a valid url value"),
    ("d41d8cd98f00b204e9800998ecf8427", ("--type", "hash"), "not a valid hash value"),   # 31 digits
    ("z41d8cd98f00b204e9800998ecf8427e", ("--type", "hash"), "not a valid hash value"),
    ("@example.org", (), "not a valid mail value"),
    ("soc@", ("--type", "mail"), "not a valid mail value"),
    ("bad\x07value", ("--type", "other"), "control characters"),
    ("   ", ("--type", "other"), "the value is empty"),
])
def test_watch_add_refuses_a_value_not_of_its_type(config_dir, value, extra, expected):
    result = run("watch", "add", value, "-c", str(config_dir), *extra)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith("tq-mw-thehive: error: ") and expected in result.stderr
    assert ("give --type" in result.stderr) == (not extra)
    assert as_json("watch", "list", "-c", str(config_dir)) == []


@pytest.mark.parametrize("value, extra, data_type", [
    ("8.8.8.8", (), "ip"),
    ("2001:db8::1", (), "ip"),
    ("Example.ORG.", (), "domain"),
    ("_dmarc.example.org", ("--type", "fqdn"), "fqdn"),
    ("mail-gw", ("--type", "hostname"), "hostname"),
    ("https://x.example/a?b=1", (), "url"),
    ("d41d8cd98f00b204e9800998ecf8427e", (), "hash"),
    ("da39a3ee5e6b4b0d3255bfef95601890afd80709", (), "hash"),
    ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", (), "hash"),
    ("cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd"
     "47417a81a538327af927da3e", (), "hash"),
    ("soc@example.org", (), "mail"),
    ("free text, any length", ("--type", "other"), "other"),
    ("HKLM\\Software\\Run", ("--type", "registry"), "registry"),
])
def test_watch_add_takes_a_value_of_its_type(config_dir, value, extra, data_type):
    assert f"({data_type})" in ok("watch", "add", value, "-c", str(config_dir), *extra).output
    (watch,) = as_json("watch", "list", "-c", str(config_dir))
    assert watch["data_type"] == data_type


def test_watch_add_refuses_an_unknown_type_and_takes_a_plugins_own(config_dir, tmp_path):
    result = run("watch", "add", "example.org", "-c", str(config_dir), "--type", "domian")
    assert result.exit_code == 2 and "unknown data type 'domian'" in result.stderr
    assert "domain" in result.stderr.split("known:", 1)[1]
    assert as_json("watch", "list", "-c", str(config_dir)) == []

    plugins = tmp_path / "wallet_plugins"
    plugins.mkdir()
    (plugins / "wallet.py").write_text(STAND_IN.replace('NAME = "standin"', 'NAME = "wallet"').replace(
        'DATA_TYPES = ("ip", "domain", "fqdn", "url")', 'DATA_TYPES = ("btc-address",)'), encoding="utf-8")
    conf = tmp_path / "wallet_conf"
    conf.mkdir()
    write_config(conf, enrichment={"plugin_dirs": [str(plugins)]})
    ok("watch", "add", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT", "-c", str(started(conf)), "--type", "btc-address")


# --- -c anywhere ---------------------------------------------------------------------------------

@pytest.mark.parametrize("group, command, nothing", [
    ("watch", "list", "nothing watched"), ("cache", "stats", "the cache is empty"), ("keys", "list", "no keys"),
])
def test_config_option_after_a_group_name(tmp_path, group, command, nothing):
    filled, empty = tmp_path / "filled", tmp_path / "empty"
    for d in (filled, empty):
        d.mkdir()
        write_config(d)
        started(d)
    f, e = str(filled), str(empty)
    ok("watch", "add", "example.org", "-c", f)
    ok("keys", "set", "VIRUSTOTAL", "-c", f, input=SECRET + "\n")
    ok("enrich", "8.8.8.8", "-c", f, "--plugin", "ip_scope")
    expected = ok("-c", f, group, command).output
    assert nothing not in expected
    assert ok(group, "-c", f, command).output == expected
    assert ok(group, command, "-c", f).output == expected
    # The innermost one given wins.
    assert ok("-c", e, group, "-c", f, command).output == expected
    assert ok(group, "-c", e, command, "-c", f).output == expected
    assert ok("-c", f, group, "-c", e, command).output.strip() == nothing


# --- monitor ------------------------------------------------------------------------------------

@pytest.fixture
def watched(tmp_path: Path, plugin_dir: Path) -> Path:
    """example.org enriched at TLP:GREEN (the stand-in's answer "10" cached) and watched, due in a day.

    The slow offline plugins are disabled so that each monitor process starts fast; domain stays.
    """
    conf = tmp_path / "conf"
    conf.mkdir()
    write_config(conf, enrichment={"plugin_dirs": [str(plugin_dir)], "disabled": ["warninglists"]})
    results = by_plugin(as_json("enrich", "example.org", "-c", str(conf), "--tlp", "GREEN"))
    assert results["standin"]["status"] == "fetched" and results["domain"]["status"] == "fetched"
    ok("watch", "add", "example.org", "-c", str(conf), "--tlp", "GREEN")
    set_next_due(conf, "example.org", time.time() + 86400)   # as after its first check
    assert len(calls(plugin_dir)) == 1
    return conf


def test_monitor_with_nothing_due_makes_no_call(watched, plugin_dir):
    due_before = next_due(watched, "example.org")
    result = run_process(["monitor", "--once", "-c", str(watched)])
    assert result.returncode == 0, result.stderr
    assert "monitor pass checked=0 changed=0 errors=0" in result.stderr
    assert len(calls(plugin_dir)) == 1
    assert next_due(watched, "example.org") == due_before


def test_monitor_rechecks_a_due_watch_bypassing_the_cache(watched, plugin_dir):
    make_due(watched, "example.org")
    result = run_process(["monitor", "--once", "-c", str(watched)])
    assert result.returncode == 0, result.stderr
    assert calls(plugin_dir) == ["domain example.org"] * 2        # cached, yet asked again
    assert "monitor pass checked=1 changed=0 errors=0" in result.stderr
    assert "changed example.org" not in result.stderr
    assert next_due(watched, "example.org") == pytest.approx(time.time() + 86400, abs=120)
    assert "TEST GUARD" not in result.stderr

    again = run_process(["monitor", "--once", "-c", str(watched)])      # rescheduled: not due any more
    assert again.returncode == 0 and len(calls(plugin_dir)) == 2


def test_monitor_logs_a_changed_answer(watched, plugin_dir):
    (plugin_dir / "answer.txt").write_text("90\n", encoding="utf-8")
    make_due(watched, "example.org")
    result = run_process(["monitor", "--once", "-c", str(watched)])
    assert len(calls(plugin_dir)) == 2
    changed = [line for line in result.stderr.splitlines() if "changed example.org" in line]
    assert len(changed) == 1, result.stderr
    assert changed[0].endswith("changed example.org standin Standin Score: 10 -> 90")
    assert "TEST GUARD" not in result.stderr
    # The new answer is what the cache keeps now.
    results = by_plugin(as_json("enrich", "example.org", "-c", str(watched), "--tlp", "GREEN",
                                "--plugin", "standin"))
    assert results["standin"]["status"] == "cached" and results["standin"]["attributes"]["Standin Score"] == "90"


def test_monitor_finishes_when_threatq_is_unreachable(watched, plugin_dir):
    (plugin_dir / "answer.txt").write_text("90\n", encoding="utf-8")
    make_due(watched, "example.org")
    result = run_process(["monitor", "--once", "-c", str(watched)])
    assert "changed example.org standin Standin Score: 10 -> 90" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert next_due(watched, "example.org") > time.time() + 3600


def test_monitor_refuses_when_enrichment_is_disabled(tmp_path):
    write_config(tmp_path, enrichment={"enabled": False})
    result = run("monitor", "--once", "-c", str(tmp_path))
    assert result.exit_code == 2 and "enrichment.enabled is false" in result.output


def test_a_new_watch_is_checked_by_the_next_monitor_pass(tmp_path, plugin_dir):
    conf = tmp_path / "conf"
    conf.mkdir()
    write_config(conf, enrichment={"plugin_dirs": [str(plugin_dir)], "disabled": ["warninglists"]})
    started(conf)
    ok("watch", "add", "example.org", "-c", str(conf), "--tlp", "GREEN", "--interval", "6h")
    result = run_process(["monitor", "--once", "-c", str(conf)])
    assert result.returncode == 0, result.stderr
    assert calls(plugin_dir) == ["domain example.org"]              # enriched in this first pass
    assert "monitor pass checked=1 " in result.stderr
    assert "changed example.org standin Standin Score: - -> 10" in result.stderr
    assert next_due(conf, "example.org") == pytest.approx(time.time() + 6 * 3600, abs=120)
