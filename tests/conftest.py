"""Shared test fixtures: samples, a written config directory."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import yaml

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, state
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import auth as tq_auth
from tq_mw_thehive.worker import Worker

SAMPLES = Path(__file__).parent / "samples"
PLUGIN_FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
SAMPLE_NAMES = sorted(p.name for p in SAMPLES.glob("*.json"))
WEBHOOK_TOKEN = "test-webhook-token-0123456789abcdef"
THEHIVE_KEY = "thehive-api-key-fedcba9876543210"


def sample_text(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8")


def sample(name: str) -> Dict[str, Any]:
    return json.loads(sample_text(name))


def minimal_config(**sections: Dict[str, Any]) -> Dict[str, Any]:
    """A valid config.yaml document; ``sections`` update its sections key by key."""
    raw: Dict[str, Any] = {
        # Loopback ports nobody listens on: a test never resolves or contacts another host.
        "threatq": {"host": "http://127.0.0.1:9", "client_id": "tq-client-id"},
        "thehive": {"url": "http://127.0.0.1:9000", "api_key": THEHIVE_KEY},
        "webhook": {"auth": "bearer", "token": WEBHOOK_TOKEN},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


def write_config(config_dir: Path, **sections: Dict[str, Any]) -> Path:
    path = config_dir / "config.yaml"
    path.write_text(yaml.safe_dump(minimal_config(**sections)), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_config(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def restore_logging():
    """Code under test calls logs.setup(), which replaces the root logger's handlers and
    registers secrets: put both back so that no test sees another's logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("urllib3", "werkzeug")}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    with logs._secrets_lock:
        logs._secrets.clear()


# --- the sync path against live simulators (test_sync.py, test_backfill.py) -------------------

SYNC_EMAIL, SYNC_PASSWORD = "sync@example.org", "sync-password-123"
HIVE_KEY = "hive-key-for-sync-tests"


class World:
    """A config dir wired to live simulators, an inbox and a worker that never waits to retry."""

    def __init__(self, tmp_path: Path, tq_url: str, hive_url: str, tq: ThreatQSimulator,
                 hive: TheHiveSimulator, **sync) -> None:
        self.tq, self.hive = tq, hive
        # Enrichment has its own tests (test_enrichment.py, e2e): here only the sync's own attributes.
        raw = minimal_config(threatq={"host": tq_url, "client_id": tq.client_id},
                             thehive={"url": hive_url, "api_key": HIVE_KEY}, sync=sync,
                             enrichment={"enabled": False})
        self.cfg = config_mod.from_dict(raw, tmp_path)
        tq_auth.save_tokens(tmp_path, tq_auth.password_grant(tq_url, tq.client_id, SYNC_EMAIL, SYNC_PASSWORD))
        state.open_state(self.cfg.state_db).close()
        self.inbox = Inbox(self.cfg.state_db)
        self.worker = Worker(self.cfg, self.inbox, backoff_cap_s=0)

    def deliver(self, *payloads: dict) -> None:
        for payload in payloads:
            self.inbox.put(events.parse(payload), json.dumps(payload))

    def drain(self, limit: int = 500) -> None:
        for _ in range(limit):
            if not self.worker.run_once():
                return
        raise AssertionError("the inbox did not drain")

    def states(self):
        return [r["state"] for r in self.inbox.db.execute("SELECT state FROM inbox ORDER BY id")]

    def last_error(self):
        return self.inbox.db.execute("SELECT last_error FROM inbox ORDER BY id DESC").fetchone()[0]

    def event(self) -> dict:
        (event,) = self.tq.events.values()
        return event

    def attributes(self, collection: str, object_id: int) -> dict:
        found = {}
        for attribute in self.tq.attributes_of(collection, object_id):
            assert attribute["name"] not in found, f"two values for {attribute['name']}"
            found[attribute["name"]] = attribute["value"]
        return found


@pytest.fixture(scope="module")
def servers():
    tq_box, hive_box = {}, {}

    def tq_app(environ, start_response):
        return tq_box["sim"].app(environ, start_response)

    def hive_app(environ, start_response):
        return hive_box["sim"].app(environ, start_response)

    with LoopbackServer(tq_app) as tq_server, LoopbackServer(hive_app) as hive_server:
        yield tq_server.url, hive_server.url, tq_box, hive_box


@pytest.fixture
def make_world(tmp_path, servers):
    tq_url, hive_url, tq_box, hive_box = servers

    def make(**sync) -> World:
        tq_box["sim"] = ThreatQSimulator(users={SYNC_EMAIL: SYNC_PASSWORD},
                                         incident_object=sync.pop("incident_object", True),
                                         consume=sync.pop("consume", True), inline=sync.pop("inline", True),
                                         shapes=sync.pop("shapes", "strict"), refuse=sync.pop("refuse", ()))
        hive_box["sim"] = TheHiveSimulator(api_key=HIVE_KEY)
        return World(tmp_path, tq_url, hive_url, tq_box["sim"], hive_box["sim"], **sync)

    return make




@pytest.fixture(scope="session", autouse=True)
def shared_offline_indexes(tmp_path_factory):
    """One copy of the offline plugins' indexes for the whole run, daemons included (each build
    takes ~20 s); the offline-index tests that place indexes themselves unset it."""
    from tq_mw_thehive.enrichment import offline_index

    path = tmp_path_factory.getbasetemp() / "offline_index"
    previous = os.environ.get(offline_index.ENV_DIRECTORY)
    os.environ[offline_index.ENV_DIRECTORY] = str(path)
    yield path
    if previous is None:
        os.environ.pop(offline_index.ENV_DIRECTORY, None)
    else:
        os.environ[offline_index.ENV_DIRECTORY] = previous


@pytest.fixture
def world(make_world) -> World:
    return make_world()


# --- Prometheus exposition, parsed for assertions (tests/test_metrics.py, tests/e2e) -----------

MetricSamples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def parse_metrics(text: str) -> MetricSamples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: MetricSamples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_value(samples: MetricSamples, name: str, **labels: str) -> float:
    """One sample of ``tq_mw_thehive_<name>``; 0 when absent (a counter never incremented)."""
    from tq_mw_thehive.metrics import PREFIX

    return samples.get((PREFIX + name, tuple(sorted(labels.items()))), 0.0)


# --- enrichment plugins' service answers (tests/test_plugin_*.py) ---------------------------------

def plugin_fixture(name: str) -> Any:
    """A recorded answer of an online service, ``tests/fixtures/plugins/<name>``."""
    return json.loads((PLUGIN_FIXTURES / name).read_text(encoding="utf-8"))


def full_text(exc: BaseException) -> str:
    """The message and the traceback a logger would print, chained exceptions included."""
    import traceback

    return str(exc) + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
