"""`tq-mw-thehive check`: each check catches the misconfiguration it is for, and a correct
setup (simulators plus a real gunicorn daemon) passes with exit code 0 and leaves no trace.

Every run goes through the real command (click's runner), the real ThreatQ and TheHive clients
against the simulators on loopback ports, and the real SQLite files.
"""
from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from click.testing import CliRunner

from conftest import HIVE_KEY, WEBHOOK_TOKEN, World
from tq_mw_thehive import check, state
from tq_mw_thehive import config as config_mod
from tq_mw_thehive.cli import cli
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.sync_state import SyncState
from tq_mw_thehive.testing.daemon import Daemon
from tq_mw_thehive.thehive import events
from tq_mw_thehive.threatq import auth as tq_auth
from tq_mw_thehive.threatq.api import ThreatQClient
from tq_mw_thehive.web import create_app
from tq_mw_thehive.services import Services

ALL = check.names()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(world: World, **changes) -> None:
    """Write the world's configuration as config.yaml, with ``changes`` to its sections."""
    cfg = world.cfg
    for section, values in changes.items():
        if section == "state_db":
            cfg = dataclasses.replace(cfg, state_db=Path(values))
        else:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    config_mod.write(cfg)


def run_check(config_dir: Path, *args: str, port: Optional[int] = None):
    """(exit code, {check name: result dict}, the whole JSON answer)."""
    argv = ["check", "-c", str(config_dir), "-p", str(port or free_port()), "-li", "127.0.0.1", "--json", *args]
    result = CliRunner().invoke(cli, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    answer = json.loads(result.stdout)
    assert [c["name"] for c in answer["checks"]] == ALL
    return result.exit_code, {c["name"]: c for c in answer["checks"]}, answer


def assert_only_failure(results: Dict[str, dict], name: str, expected: List[str]) -> dict:
    """``name`` failed, with each of ``expected`` in its detail or fix; nothing before it failed."""
    failed = results[name]
    assert failed["ok"] is False and not failed["skipped"], failed
    assert failed["fix"], failed
    for text in expected:
        assert text in failed["detail"] + " " + failed["fix"], failed
    for earlier in ALL[:ALL.index(name)]:
        assert results[earlier]["ok"], results[earlier]
    return failed


# --- one test per check --------------------------------------------------------------------------

def test_bad_config_file_fails_config_and_skips_what_needs_it(tmp_path):
    (tmp_path / "config.yaml").write_text("threatq:\n  host: h\n  client_id: c\n  colour: blue\n"
                                          "thehive:\n  url: http://127.0.0.1:9\n")
    code, results, answer = run_check(tmp_path)
    assert code == 1 and answer["ok"] is False
    assert_only_failure(results, "config", ["threatq.colour: unknown key", "config.yaml"])
    for name in ("threatq auth", "indicator types", "event type", "thehive api", "state db", "webhook"):
        assert results[name]["skipped"], results[name]


def test_missing_config_file_says_to_run_configure(tmp_path):
    code, results, _ = run_check(tmp_path)
    assert code == 1
    assert_only_failure(results, "config", ["no configuration file", "tq-mw-thehive configure -c"])


@pytest.mark.parametrize("mode", ["token file", "client secret"])
def test_wrong_threatq_credentials(make_world, mode):
    world = make_world()
    if mode == "token file":
        # Tokens ThreatQ never issued: the call answers 401 and the refresh is refused.
        tq_auth.save_tokens(world.cfg.config_dir, tq_auth.Tokens("not-a-token", "not-a-refresh", 4e9))
        write(world)
        expected = ["refused to refresh", "tq-mw-thehive configure -c"]
    else:
        write(world, threatq={"client_secret": "wrong-secret"})
        expected = ["refused the client credentials", "threatq.client_secret"]
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "threatq auth", expected)
    for name in ("indicator types", "indicator status", "event type", "incident object"):
        assert results[name]["skipped"]
    assert "not-a-token" not in json.dumps(results) and "wrong-secret" not in json.dumps(results)


class TokenGrantAnswers:
    """The simulator behind a front that answers ``status`` to every token grant (the simulator's
    own ``down`` knob answers 503 to everything; a 500 to the grant alone needs this front)."""

    def __init__(self, sim, status: int) -> None:
        self.sim, self.status = sim, status

    def app(self, environ, start_response):
        if environ["PATH_INFO"] != "/api/token":
            return self.sim.app(environ, start_response)
        start_response(f"{self.status} Internal Server Error", [("Content-Type", "application/json")])
        return [json.dumps({"errors": ["Server Error"]}).encode()]


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("mode", ["token file", "client secret"])
def test_threatq_5xx_to_the_token_grant_is_unavailable_not_an_authentication_failure(make_world, servers,
                                                                                       mode, status):
    world = make_world()
    config_dir = world.cfg.config_dir
    if mode == "token file":  # an expired access token: the refresh grant is the first call
        tq_auth.save_tokens(config_dir, dataclasses.replace(tq_auth.load_tokens(config_dir), expires_at=0.0))
        write(world)
    else:
        world.tq.client_secrets[world.tq.client_id] = "the-right-secret"
        write(world, threatq={"client_secret": "the-right-secret"})
    if status == 503:
        world.tq.down = True  # the simulator's fault injection: every call, the grant first, answers 503
    else:
        servers[2]["sim"] = TokenGrantAnswers(world.tq, status)
    code, results, _ = run_check(config_dir)
    assert code == 1
    failed = assert_only_failure(results, "threatq auth", ["retry later", "ThreatQ's health"])
    assert failed["detail"].startswith(f"ThreatQ unavailable (HTTP {status}), not a credentials problem: ")
    assert "POST /api/token" in failed["detail"]
    for wrong_lead in ("configure", "client_secret", "sign in", "refused", "rejected"):
        assert wrong_lead not in failed["fix"], failed
    if status == 503:
        assert world.tq.requests[-1] == ("POST", "/api/token")


def test_threatq_unreachable_still_says_to_check_the_address(make_world):
    world = make_world()
    write(world, threatq={"host": f"http://127.0.0.1:{free_port()}"})
    code, results, _ = run_check(world.cfg.config_dir)
    failed = assert_only_failure(results, "threatq auth", ["check that ThreatQ answers at", "threatq.host"])
    assert not failed["detail"].startswith("ThreatQ unavailable (HTTP")


def test_missing_threatq_tokens(make_world):
    world = make_world()
    tq_auth.token_path(world.cfg.config_dir).unlink()
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "threatq auth", ["no ThreatQ tokens", "tq-mw-thehive configure -c"])


def test_missing_indicator_type(make_world):
    world = make_world(custom_mapping=True, type_mapping="ip: IPv4 Address\ndomain: FQDN\nmail: E-mail")
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    failed = assert_only_failure(results, "indicator types", ['"E-mail"', '"IPv4 Address"', "sync.type_mapping"])
    assert "FQDN" not in failed["detail"]


def test_missing_indicator_status(make_world):
    world = make_world(indicator_status="Hot")
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "indicator status", ['"Hot" not found in ThreatQ', "Active"])


def test_missing_event_type(make_world):
    world = make_world(event_type="Incident X")
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "event type", ['"Incident X" not found in ThreatQ', "sync.event_type", "Incident"])


def test_missing_incident_object_in_incident_mode(make_world):
    world = make_world(cases_as="incident", incident_object=False)
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "incident object", ["no incident object", "sync.cases_as: event"])
    assert results["event type"]["skipped"]  # not used in incident mode


def test_incident_object_is_not_needed_in_event_mode(make_world):
    world = make_world(incident_object=False)
    write(world)
    _, results, _ = run_check(world.cfg.config_dir)
    assert results["incident object"]["skipped"] and results["incident object"]["ok"]
    assert results["event type"]["ok"] and not results["event type"]["skipped"]


@pytest.mark.parametrize("key", ["wrong-thehive-key", None])
def test_wrong_or_missing_thehive_key(make_world, key):
    world = make_world()
    write(world, thehive={"api_key": key})
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    expected = ["HTTP 401", "thehive.api_key"] if key else ["thehive.api_key is not set"]
    assert_only_failure(results, "thehive api", expected)
    assert "wrong-thehive-key" not in json.dumps(results)


def test_a_user_outside_the_configured_organisation_is_named_not_just_the_key(make_world):
    """TheHive answers a key whose user is not in thehive.organisation with 401, as a bad key."""
    world = make_world()
    world.hive.organisation = "acme-soc"
    write(world, thehive={"organisation": "other-org"})
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    failed = assert_only_failure(results, "thehive api", [
        "HTTP 401", "API key refused, or the user is not in organisation 'other-org'",
        "thehive.organisation to one it belongs to"])
    assert HIVE_KEY not in json.dumps(failed)


@pytest.mark.parametrize("problem", ["corrupt", "cannot be opened", "no directory"])
def test_unusable_state_db(make_world, problem):
    world = make_world()
    if problem == "corrupt":
        db = world.cfg.config_dir / "damaged.db"
        db.write_bytes(b"this is not an SQLite database, just bytes " * 100)
        expected = ["not a database", "restore a backup"]
    elif problem == "cannot be opened":
        # Tests run as root, where file modes do not stop a write: a directory in the way does.
        db = world.cfg.config_dir / "a-directory.db"
        db.mkdir()
        expected = ["unable to open database file", "write access"]
    else:
        db = world.cfg.config_dir / "missing" / "state.db"
        expected = ["does not exist", "mkdir -p"]
    write(world, state_db=str(db))
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "state db", expected)


@pytest.mark.parametrize("problem", ["a file", "under a file"])
def test_unwritable_log_dir(make_world, problem):
    world = make_world()
    write(world)
    blocker = world.cfg.config_dir / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    log_dir = blocker if problem == "a file" else blocker / "logs"
    code, results, _ = run_check(world.cfg.config_dir, "-ll", str(log_dir))
    assert code == 1
    assert_only_failure(results, "log dir", ["not a directory", "-ll"])


def test_log_dir_that_is_writable_passes(make_world, tmp_path):
    world = make_world()
    write(world)
    _, results, _ = run_check(world.cfg.config_dir, "-ll", str(tmp_path / "logs"))
    assert results["log dir"]["ok"] and "creates it" in results["log dir"]["detail"]
    assert not (tmp_path / "logs").exists()  # the check creates nothing


def test_webhook_down_says_start_the_daemon(make_world):
    world = make_world()
    write(world)
    code, results, _ = run_check(world.cfg.config_dir)
    assert code == 1
    assert_only_failure(results, "webhook", ["nothing answers at http://127.0.0.1:", "start the daemon"])


# --- against a real daemon -------------------------------------------------------------------------

@pytest.fixture
def daemon(make_world, tmp_path):
    world = make_world()
    write(world)
    running = Daemon(world.cfg.config_dir, tmp_path / "logs", workers=1).start()
    try:
        yield world, running
    finally:
        running.stop()


def self_test_rows(db: Path) -> int:
    inbox = Inbox(db)
    try:
        return inbox.db.execute("SELECT COUNT(*) FROM inbox WHERE object_type = ?",
                                (events.SELF_TEST_OBJECT_TYPE,)).fetchone()[0]
    finally:
        inbox.close()


def test_all_green_against_the_simulators_and_a_real_daemon(daemon, tmp_path):
    world, running = daemon
    tq_calls = len(world.tq.requests)
    code, results, answer = run_check(world.cfg.config_dir, "-ll", str(tmp_path / "logs"), port=running.port)
    assert code == 0, answer
    assert answer["ok"] is True
    assert all(r["ok"] for r in results.values()), results
    skipped = [n for n, r in results.items() if r["skipped"]]
    # event mode; steps that write have no probe and this daemon has not needed them yet
    assert skipped == ["incident object", "step source_tlp", "step source_list", "step tag_list", "step tag_delete",
                       "step query:incident", "step consume:indicators", "step consume:events",
                       "step consume:incident"], skipped
    assert "no indicator in ThreatQ to probe with" in results["step tag_list"]["detail"]
    assert results["step query:indicators"]["detail"].startswith("served: look up indicators")
    assert results["step query_many:indicators"]["detail"].startswith("served: look up many indicators at once")
    hook = results["webhook"]["detail"]
    assert "stored as inbox #" in hook and "removed" in hook
    assert "outcome=self-test" in running.log_text()
    # The self-test row is gone, and nothing of it reached ThreatQ.
    assert self_test_rows(world.cfg.state_db) == 0
    assert Inbox(world.cfg.state_db).stats()["pending"] == 0
    writes = [r for r in world.tq.requests[tq_calls:]
              if r[0] != "GET" and r[1] != "/api/token" and not r[1].endswith("/query")]  # /query only reads
    assert writes == []


def test_each_optional_threatq_step_is_reported_from_a_probe_or_what_the_daemon_learned(make_world):
    """A first real deployment shows its differences in one screen: read-only probes where one
    exists, the daemon's own findings (the state database) for the steps that write."""
    world = make_world(shapes="sdk", refuse=["query"])  # sdk: no GET/DELETE of tags, no PUT of a source TLP
    write(world)
    learned = SyncState(world.cfg.state_db)
    learned.record_capability("source_tlp", False, 405)
    learned.record_capability("consume:indicators", True)
    # Any indicator will do for the read-only probes of its tags and sources.
    ThreatQClient.from_config(world.cfg).create_indicator("198.51.100.7", 1, 1, "probe target", [])
    code, results, _ = run_check(world.cfg.config_dir)
    steps = {name[len("step "):]: r for name, r in results.items() if name.startswith("step ")}
    assert all(r["ok"] for r in steps.values()), steps  # an optional step never fails the check
    assert steps["query:indicators"]["detail"].startswith("not served: look up indicators")
    assert "HTTP 404, probed now: indicators are looked up with list filters" in steps["query:indicators"]["detail"]
    assert steps["tag_list"]["detail"].startswith("not served: read tags") and "probed now" in steps["tag_list"]["detail"]
    assert steps["source_list"]["detail"].startswith("served: read sources (GET …/sources); probed now")
    assert "HTTP 405, learned by the daemon just now" in steps["source_tlp"]["detail"]
    assert steps["consume:indicators"]["detail"].startswith("served") and not steps["consume:indicators"]["skipped"]
    assert steps["tag_delete"]["skipped"] and "not used yet" in steps["tag_delete"]["detail"]
    human = CliRunner().invoke(cli, ["check", "-c", str(world.cfg.config_dir), "-p", str(free_port())]).stdout
    assert sum(1 for line in human.splitlines() if " step " in f" {line}") == len(check.STEP_NAMES)


def test_wrong_webhook_auth_is_caught(daemon):
    world, running = daemon
    write(world, webhook={"token": "another-token-than-the-daemon-has"})  # the daemon keeps the old one
    code, results, _ = run_check(world.cfg.config_dir, port=running.port)
    assert code == 1
    assert_only_failure(results, "webhook", ["HTTP 401", "restart the daemon"])
    assert "another-token-than-the-daemon-has" not in json.dumps(results)
    assert self_test_rows(world.cfg.state_db) == 0


def test_human_output_has_one_line_per_check_with_marks_and_fixes(make_world):
    world = make_world(event_type="Incident X")
    write(world)
    result = CliRunner().invoke(cli, ["check", "-c", str(world.cfg.config_dir), "-p", str(free_port())])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == len(ALL) + 1 and lines[-1] == "2 check(s) failed"
    event_line = next(line for line in lines if " event type " in line)
    assert event_line.startswith("✘ event type") and '"Incident X" not found in ThreatQ  → fix: ' in event_line
    assert next(line for line in lines if "threatq auth" in line).startswith("✔ threatq auth")
    assert WEBHOOK_TOKEN not in result.output and HIVE_KEY not in result.output


def test_ascii_marks_where_the_terminal_cannot_show_them():
    lines = check.render([check.Result("x", False, "bad", "do y")], check.marks_for(type("S", (), {"encoding": "ascii"})))
    assert lines == ["[FAIL] x  bad  -> fix: do y"]


# --- the self-test's storage path ---------------------------------------------------------------

def test_self_test_event_is_stored_done_never_synced_and_removable(tmp_path):
    raw = {"threatq": {"host": "http://127.0.0.1:9", "client_id": "c"},
           "thehive": {"url": "http://127.0.0.1:9"}, "webhook": {"auth": "key", "token": WEBHOOK_TOKEN}}
    cfg = config_mod.from_dict(raw, tmp_path)
    state.open_state(cfg.state_db).close()
    client = create_app(Services(cfg)).test_client()
    body = json.dumps(events.self_test_payload("n1", 1))
    assert client.post("/cases", data=body, headers={"Authorization": "wrong"}).status_code == 401
    answer = client.post("/cases", data=body, headers={"Authorization": check.authorization_header(cfg)})
    assert answer.status_code == 200 and answer.get_json()["status"] == "self-test"
    inbox = Inbox(cfg.state_db)
    row = inbox.get(answer.get_json()["id"])
    assert row["state"] == "done" and "self-test-n1" in row["body"]
    assert inbox.claim("worker") is None  # no worker ever gets it
    # remove_self_test deletes only self-test rows.
    other = events.parse({"_id": "a1", "_type": "Audit", "action": "create", "objectType": "Case", "objectId": "~1"})
    real = inbox.put(other, "{}").id
    assert inbox.remove_self_test(real) is False and inbox.get(real) is not None
    assert inbox.remove_self_test(row["id"]) is True and inbox.get(row["id"]) is None


def test_authorization_header_matches_what_thehive_sends(tmp_path):
    def header(**webhook):
        raw = {"threatq": {"host": "h", "client_id": "c"}, "thehive": {"url": "http://127.0.0.1:9"},
               "webhook": webhook}
        return check.authorization_header(config_mod.from_dict(raw, tmp_path))

    assert header(auth="bearer", token="t") == "Bearer t"
    assert header(auth="key", token="t") == "t"
    assert header(auth="basic", username="u", password="p") == "Basic dTpw"
    assert header(auth="none") is None


@pytest.mark.parametrize("ip,port,url", [("127.0.0.1", 5000, "http://127.0.0.1:5000/cases"),
                                         ("0.0.0.0", 8080, "http://127.0.0.1:8080/cases"),
                                         ("::", 5000, "http://[::1]:5000/cases"),
                                         ("127.0.0.1", 0, None)])
def test_listener_url(ip, port, url):
    assert check.listener_url(ip, port) == url
