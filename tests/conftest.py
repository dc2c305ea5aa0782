"""Shared test fixtures: samples, a written config directory."""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, state, state_postgres
from tq_mw_thehive.state_postgres import PostgresURL
from tq_mw_thehive.testing.postgres import PostgresServer, find_bin_dir
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import auth as tq_auth
from tq_mw_thehive.services import Services
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


class FakeClock:
    """A clock a test moves: ``clock()`` is now, ``advance(s)`` moves it on."""

    def __init__(self, now: float = 1_760_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
                 hive: TheHiveSimulator, writeback: Optional[dict] = None, enrichment: Optional[dict] = None,
                 state_db: Any = None, **sync) -> None:
        self.tq, self.hive = tq, hive
        # Enrichment has its own tests (test_enrichment.py, test_quota.py, e2e): by default here
        # only the sync's own attributes.
        raw = minimal_config(threatq={"host": tq_url, "client_id": tq.client_id},
                             thehive={"url": hive_url, "api_key": HIVE_KEY}, sync=sync,
                             enrichment=enrichment or {"enabled": False}, writeback=writeback or {"enabled": False})
        if isinstance(state_db, PostgresURL):
            raw["state_db"] = state_db.conninfo
        self.cfg = config_mod.from_dict(raw, tmp_path)
        tq_auth.save_tokens(tmp_path, tq_auth.password_grant(tq_url, tq.client_id, SYNC_EMAIL, SYNC_PASSWORD))
        state.open_state(self.cfg.state_db).close()
        self.inbox = Inbox(self.cfg.state_db)
        self.services = Services(self.cfg, self.inbox)
        self.worker = Worker(self.services, backoff_cap_s=0)
        self.audits_seen = 0  # of hive.audits, delivered by deliver_new_audits

    def deliver_new_audits(self) -> List[dict]:
        """The audits the TheHive simulator built since the last call (``hive.emit_audits``),
        delivered as its webhooks would be and applied: every event done. Returns them."""
        new = self.hive.audits[self.audits_seen:]
        self.audits_seen = len(self.hive.audits)
        self.deliver(*new)
        self.drain()
        assert set(self.states()) == {"done"}, self.states()
        return new

    def deliver(self, *payloads: dict) -> None:
        for payload in payloads:
            self.inbox.put(events.parse(payload, alerts=self.cfg.sync.alerts), json.dumps(payload))

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
def make_world(tmp_path, servers, state_db):
    tq_url, hive_url, tq_box, hive_box = servers

    def make(**sync) -> World:
        tq_box["sim"] = ThreatQSimulator(users={SYNC_EMAIL: SYNC_PASSWORD},
                                         incident_object=sync.pop("incident_object", True),
                                         consume=sync.pop("consume", True), inline=sync.pop("inline", True),
                                         shapes=sync.pop("shapes", "strict"), refuse=sync.pop("refuse", ()))
        hive_box["sim"] = TheHiveSimulator(api_key=HIVE_KEY, version=sync.pop("thehive_version", 5))
        return World(tmp_path, tq_url, hive_url, tq_box["sim"], hive_box["sim"], state_db=state_db, **sync)

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


# --- a real PostgreSQL server (tq_mw_thehive/testing/postgres.py), and the state on both engines -----

# The suites that run on both engines: each test taking ``state_db`` (directly, through ``inbox``
# or through ``make_world``/``world``) runs once on SQLite and once on PostgreSQL.
BOTH_ENGINES = {"test_inbox.py", "test_worker.py", "test_sync.py", "test_sync_batch.py", "test_backfill.py",
                "test_alerts.py", "test_alert_flows.py", "test_writeback_sync.py", "test_reconcile.py",
                "test_quota.py", "test_retention.py", "test_faults.py"}
_PG_SCHEMAS = itertools.count(1)   # schema names stay unique when test names truncate alike


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if ("state_db" in metafunc.fixturenames and Path(str(metafunc.definition.path)).name in BOTH_ENGINES
            and not metafunc.definition.get_closest_marker("sqlite_only")):
        metafunc.parametrize("state_db", ["sqlite", "postgresql"], indirect=True)


def _same_on_both_engines(item: pytest.Item) -> bool:
    """A fault test on PostgreSQL in the ThreatQ simulator's ``sdk`` shape: the answer shapes and the
    storage engine are independent, so PostgreSQL runs the fault suite in the ``strict`` shape only."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("state_db") == "postgresql" and params.get("simulators") == "sdk"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One throwaway PostgreSQL server for the session; skipped where the server binaries are missing,
    a failure instead when TQ_REQUIRE_POSTGRES=1 (.ci/run: CI installs Debian's postgresql)."""
    if find_bin_dir() is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if os.environ.get("TQ_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + "; TQ_REQUIRE_POSTGRES=1 requires them")
        pytest.skip(message)
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def pg_url(postgres_server, request):
    """A URL of the session's server whose connections use a schema of this test's own (dropped after,
    with this process's pools on it: a pool per test would pile up connections)."""
    stem = re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:40]
    name = f"t_{stem}_{next(_PG_SCHEMAS)}"
    yield postgres_server.schema_url(name)
    state_postgres.close_all()
    postgres_server.drop_schema(name)


@pytest.fixture
def state_db(request, tmp_path):
    """Where a test's state lives: a SQLite file, or (``BOTH_ENGINES``) a PostgreSQL schema."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return tmp_path / "state.db"
    return PostgresURL(request.getfixturevalue("pg_url"))


# --- the fast loop: which tests are e2e or load (issue 14, item 8) ---------------------------------
#
#   python -m pytest -m "not e2e and not load"    the unit loop, about three minutes (both engines)
#   python -m pytest                              the full suite, as CI runs it
#
# This hook is the one place that says which tests are e2e or load; it only adds markers, so the full
# suite collects every test either way. A test is
#   * load: under tests/load/;
#   * e2e:  under tests/e2e/ or tests/fault/; or it uses a fixture of E2E_FIXTURES (in the module named
#           there); or its node id (from tests/ on) starts with a key of E2E_TESTS.
# e2e means an integration test: it runs the real daemon or gunicorn's worker loop, the program, pip or
# pytest as a child process, needs the offline indexes of the bundled data (a ~20 s build, once per
# session), or loops over thousands of generated or bundled values. Tests that also mark themselves
# (pytestmark, @pytest.mark.e2e) are listed here all the same. A unit test that is only slow because of
# a fixture gets a cheaper fixture, not a marker. An entry that no longer matches a test of its module
# is reported as a warning (a renamed test would otherwise drift into the fast loop).

TESTS_DIR = Path(__file__).resolve().parent
LOAD_DIRS = ("load",)
E2E_DIRS = ("e2e", "fault")

# fixture name -> (the module that defines it, why a test using it is e2e)
E2E_FIXTURES: Dict[str, Tuple[str, str]] = {
    "daemon": ("test_check.py", "runs the real daemon (python -m tq_mw_thehive, gunicorn) on a loopback port"),
    "short": ("test_intake.py", "gunicorn's real worker loop on a loopback socket, waiting out real deadlines"),
    "index_dir": ("test_offline_index.py", "opens the offline indexes of the bundled data"),
    "reference": ("test_offline_index.py", "also loads every MISP warning list into Python objects (~300 MB)"),
    "loaded": ("test_plugin_offline.py", "looks values up in the offline indexes of the bundled data"),
}

# node-id prefix (from tests/ on) -> why
E2E_TESTS: Dict[str, str] = {
    # the real daemon
    "test_hostile_input.py": "one live daemon, thousands of hypothesis-generated requests",
    "test_security.py::test_no_secret_reaches_any_log_or_console_at_verbosity_3": "real daemons",
    "test_security.py::test_configure_and_the_daemon_create_every_secret_file_0600_even_with_umask_0":
        "real daemons",
    "test_security.py::test_a_config_readable_by_others_is_named_in_a_warning_with_the_chmod_hint": "real daemon",
    "test_security.py::test_a_daemon_started_without_li_binds_127_0_0_1_only": "real daemon",
    "test_security.py::test_no_url_from_a_payload_is_ever_fetched_by_the_daemon": "real daemon",
    # gunicorn's worker loop in this process (the other such tests of the module use the fixture `short`)
    "test_intake.py::test_a_graceful_stop_waits_for_bodies_at_the_minimum_rate_only":
        "gunicorn's real worker loop, stopped while requests are in flight",
    # pip, pytest, the program as a child process (click's runner covers the same commands in process)
    "test_packaging.py": "pip install of the project into a directory, then runs what it installed",
    "test_readme.py::test_the_example_plugin_loads_and_its_test_passes": "pytest in a child process",
    "test_cli.py::test_status_json_real_process_prints_one_object": "child process",
    "test_cli.py::test_start_with_a_bad_config_exits_2_without_prompting": "child process",
    "test_cli.py::test_external_proxy_without_threatq_proxy_exits_2": "child process",
    "test_cli.py::test_start_without_config_or_terminal_exits_2_naming_the_missing_answer": "child process",
    "test_cli.py::test_log_directory_that_cannot_be_created_exits_1": "child process",
    "test_cli.py::test_state_db_in_a_missing_directory_exits_1": "child process",
    "test_cli.py::test_version": "child process",
    "test_cli.py::test_help_lists_the_guide_flags_and_subcommands": "child process",
    "test_cli.py::test_a_malformed_custom_type_mapping_stops_the_start_with_its_line_number": "child process",
    "test_cli_enrichment.py::test_a_key_never_appears_in_output_config_or_logs": "child process",
    "test_cli_enrichment.py::test_a_key_quoted_in_a_plugin_error_is_not_printed": "child process",
    "test_cli_enrichment.py::test_monitor_with_nothing_due_makes_no_call": "child process",
    "test_cli_enrichment.py::test_monitor_rechecks_a_due_watch_bypassing_the_cache": "child process",
    "test_cli_enrichment.py::test_monitor_logs_a_changed_answer": "child process",
    "test_cli_enrichment.py::test_monitor_finishes_when_threatq_is_unreachable": "child process",
    "test_cli_enrichment.py::test_a_new_watch_is_checked_by_the_next_monitor_pass": "child process",
    "test_configure.py::test_interactive_run_on_a_terminal_prompts_like_the_guide": "child process on a pty",
    "test_configure.py::test_on_a_real_terminal_a_refused_password_is_asked_for_again": "child process on a pty",
    "test_progress_jobs.py::test_backfill_on_a_terminal_draws_a_bar": "child process on a pty",
    "test_metrics.py::test_forked_workers_add_up_keep_dead_ones_and_a_new_master_starts_from_zero":
        "a child master that forks workers, as gunicorn does",
    # the offline indexes of the bundled data (warning lists, geoip2fast, Public Suffix List)
    "test_footprint.py": "builds the indexes, then `enrich` in a child process per test",
    "test_cache_warm.py::test_warm_fills_the_cache_through_the_gate_and_a_second_run_calls_nothing":
        "warms with every bundled plugin",
    "test_cache_warm.py::test_warm_logs_progress_lines_off_a_terminal": "warms with every bundled plugin",
    "test_cli_enrichment.py::test_enrich_an_ip_then_the_same_again_from_the_cache": "geoip, warning lists",
    "test_cli_enrichment.py::test_a_non_global_address_never_reaches_an_external_plugin": "geoip, warning lists",
    "test_cli_enrichment.py::test_enrich_only_one_plugin": "geoip",
    "test_cli_enrichment.py::test_cache_stats_and_clear": "geoip, warning lists",
    # loops over thousands of values: exhaustive parity with the bundled data, hypothesis with 200+ examples
    "test_offline_index.py::test_geoip_index_answers_as_geoip2fast": "parity over ~10,000 addresses",
    "test_offline_index.py::test_domain_index_extracts_as_tldextract_for_every_suffix":
        "parity over every Public Suffix List rule",
    "test_web.py::test_no_body_ever_gets_a_500": "hypothesis, 300 bodies through the whole Flask app",
    "test_events.py::test_parse_any_json_value": "hypothesis, 300 examples",
    "test_events.py::test_parse_any_envelope": "hypothesis, 300 examples",
    "test_mapping.py::test_map_observable_never_raises": "hypothesis, 300 examples",
    "test_model.py::test_only_model_error_for_any_json": "hypothesis, 200 examples",
}


def _local_id(item: pytest.Item) -> Tuple[str, str]:
    """(the test's folder under tests/, "" for tests/ itself; its node id from tests/ on), the same
    whatever directory pytest runs from and whatever paths it is given."""
    rel = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
    rest = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else ""
    return (rel.parts[0] if len(rel.parts) > 1 else ""), rel.as_posix() + ("::" + rest if rest else "")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    redundant = [item for item in items if _same_on_both_engines(item)]
    if redundant:
        config.hook.pytest_deselected(items=redundant)
        items[:] = [item for item in items if not _same_on_both_engines(item)]
    modules, used = set(), set()
    for item in items:
        try:
            folder, local = _local_id(item)
        except ValueError:          # not under tests/
            continue
        module = local.split("::", 1)[0]
        modules.add(module)
        if folder in LOAD_DIRS:
            item.add_marker(pytest.mark.load)
        reasons = [name for name, (where, _) in E2E_FIXTURES.items()
                   if where == module and name in getattr(item, "fixturenames", ())]
        reasons += [prefix for prefix in E2E_TESTS if local.startswith(prefix)]
        used.update(reasons)
        if folder in E2E_DIRS or reasons:
            item.add_marker(pytest.mark.e2e)
    if any("::" in arg for arg in config.args):
        return                      # tests chosen by node id: the other tests of a module are not there
    entries = [(name, where) for name, (where, _) in E2E_FIXTURES.items()]
    entries += [(prefix, prefix.split("::", 1)[0]) for prefix in E2E_TESTS]
    for entry, module in entries:
        if module in modules and entry not in used:
            warnings.warn(pytest.PytestWarning(f"tests/conftest.py: the e2e entry {entry!r} matches no test "
                                               f"of {module} (renamed?)"))
