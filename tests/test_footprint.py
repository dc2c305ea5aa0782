"""Issue 18: an ad-hoc lookup loads only what its data type needs, and stays small.

``tq-mw-thehive enrich`` runs in a child process (its peak RSS and modules are its own) on a
configuration whose offline indexes already exist (copied from the session's index directory,
built once by the offline-plugin tests or here): an IP lookup imports neither tldextract nor the
warning lists' or geoip2fast's packages, a domain lookup not geoip2fast, and the peak stays far
below the 750 MB the in-memory data took.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

from conftest import write_config
from tq_mw_thehive.enrichment import offline_index
from tq_mw_thehive.plugins import domain, geoip, warninglists

EXTERNAL = ["virustotal", "abuseipdb", "otx", "shodan", "urlhaus", "greynoise"]
HEAVY = ("tldextract", "geoip2fast", "pymispwarninglists")


@pytest.fixture(autouse=True)
def own_index_directory(monkeypatch):
    """These tests place the indexes themselves: the run's shared directory (conftest) is unset."""
    monkeypatch.delenv(offline_index.ENV_DIRECTORY, raising=False)


CHILD = """\
import json, sys
from tq_mw_thehive.cli import cli

try:
    cli.main(sys.argv[1:], prog_name="tq-mw-thehive", standalone_mode=False)
finally:
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited through exec)
    peak = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    sys.stdout.write("\\nMODULES " + json.dumps(sorted(m for m in %r if m in sys.modules)))
    sys.stdout.write("\\nPEAK_KB " + peak + "\\n")
""" % (HEAVY,)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's index directory with the three indexes built."""
    path = tmp_path_factory.getbasetemp() / "offline_index"
    offline_index.set_directory(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warninglists, "_opened", None)
        mp.setattr(geoip, "_index", None)
        mp.setattr(domain, "_extractor", None)
        warninglists.prepare()
        geoip.prepare()
        domain.prepare()
        yield path
    offline_index.set_directory(None)


@pytest.fixture()
def conf(tmp_path: Path, built: Path) -> Path:
    write_config(tmp_path, enrichment={"disabled": EXTERNAL})
    shutil.copytree(built, tmp_path / offline_index.SUBDIR)     # next to the state database, as the daemon's
    return tmp_path


def enrich(conf: Path, value: str) -> Dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, "enrich", value, "-c", str(conf), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=str(conf))
    assert done.returncode == 0, done.stderr
    text, _, tail = done.stdout.rpartition("\nMODULES ")
    modules, _, peak = tail.partition("\nPEAK_KB ")
    results = {r["plugin"]: r for r in json.loads(text)["results"]}
    return {"results": results, "modules": json.loads(modules), "peak_mb": int(peak) / 1024}


def test_an_ip_lookup_loads_neither_the_domain_data_nor_the_raw_lists(conf: Path) -> None:
    got = enrich(conf, "9.9.9.9")
    results = got["results"]
    assert results["geoip"]["status"] == "fetched" and results["geoip"]["attributes"]["GeoIP Country"]
    assert results["warninglists"]["status"] == "fetched"
    assert "List of known IPv4 public DNS resolvers" in results["warninglists"]["data"]["lists"]
    assert results["ip_scope"]["attributes"]["IP Scope"] == "global"
    assert "domain" not in results
    assert got["modules"] == []
    assert got["peak_mb"] < 150, got["peak_mb"]


def test_a_domain_lookup_loads_the_suffix_list_only(conf: Path) -> None:
    got = enrich(conf, "www.google.com")
    results = got["results"]
    assert results["domain"]["attributes"]["Registered Domain"] == "google.com"
    assert "Top 1,000,000 most-used sites from Tranco" in results["warninglists"]["data"]["lists"]
    assert "geoip" not in results
    assert got["modules"] == ["tldextract"]
    assert got["peak_mb"] < 150, got["peak_mb"]


def test_the_indexes_are_next_to_the_state_database_and_not_rebuilt(conf: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (conf / offline_index.SUBDIR).glob("*.sqlite")}
    enrich(conf, "149.112.112.112")
    after = {p.name: p.stat().st_mtime_ns for p in (conf / offline_index.SUBDIR).glob("*.sqlite")}
    assert len(before) == 3 and after == before
