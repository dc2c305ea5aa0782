"""`tq-mw-thehive thehive-setup` against the TheHive simulator on a loopback port (real HTTP)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import WEBHOOK_TOKEN, write_config
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import configure
from tq_mw_thehive.cli import cli
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator

KEY = "org-admin-key-0123456789"
NOTIFICATION = "/api/config/organisation/notification"
OURS = configure.notification_entry()
OTHER = {"delegate": False, "trigger": {"name": "CaseCreated"}, "notifier": {"name": "Mattermost"}}


@pytest.fixture(scope="module")
def server():
    box = {}
    with LoopbackServer(lambda environ, start: box["sim"].app(environ, start)) as srv:
        yield srv.url, box


@pytest.fixture
def hive(server, tmp_path) -> TheHiveSimulator:
    url, box = server
    box["sim"] = sim = TheHiveSimulator(api_key=KEY)
    write_config(tmp_path, thehive={"url": url, "api_key": KEY})
    return sim


def setup(config_dir: Path, *args: str, answer: str = ""):
    return CliRunner().invoke(cli, ["thehive-setup", "-c", str(config_dir), "-p", "5123", *args], input=answer)


def puts(sim: TheHiveSimulator):
    return [r for r in sim.requests if r == ("PUT", NOTIFICATION)]


def test_thehive4_registers_the_notification_after_showing_it(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert hive.notifications() == [OURS]
    out = result.stdout
    # The endpoint block is filled in (auth included) so that it can be pasted as is.
    assert 'url: "http://127.0.0.1:5123/cases"' in out
    assert f'auth: {{type: "bearer", key: "{WEBHOOK_TOKEN}"}}' in out
    # The preview shows the request with the API key masked, and the body that is sent.
    assert f"PUT {hive_url(tmp_path)}{NOTIFICATION}" in out and "Authorization: Bearer ********" in out
    assert '"endpoint": "tq_mw_thehive"' in out and '"name": "AnyEvent"' in out
    assert "Verified: TheHive lists the notification" in out
    assert KEY not in result.output


def hive_url(config_dir: Path) -> str:
    return config_mod.load(config_dir).thehive.url.rstrip("/")


def test_thehive4_asks_first_and_sends_nothing_when_declined(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "4", answer="n\n")
    assert result.exit_code == 1
    assert "Send it? [y/N]" in result.stdout and "Nothing was sent." in result.stdout
    assert puts(hive) == [] and hive.notifications() == []


def test_thehive4_sends_when_confirmed(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "4", answer="y\n")
    assert result.exit_code == 0, result.output
    assert len(puts(hive)) == 1 and hive.notifications() == [OURS]


def test_thehive4_keeps_the_organisations_other_notifications(hive, tmp_path):
    hive.org_config["default"] = {"notification": [OTHER]}
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert hive.notifications() == [OTHER, OURS]
    assert "keeps the organisation's 1 other notification(s)" in result.stdout


def test_thehive4_already_registered_sends_nothing(hive, tmp_path):
    hive.org_config["default"] = {"notification": [OURS]}
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert "nothing to send" in result.stdout and puts(hive) == []


def test_thehive4_key_without_manage_config_fails(hive, tmp_path):
    hive.manage_config = False
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 1
    assert "HTTP 403" in result.stderr and "manageConfig" in result.stderr
    assert hive.notifications() == [] and KEY not in result.output


def test_thehive4_wrong_key_fails_before_sending(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "4", "--yes", "--api-key", "not-the-key")
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and puts(hive) == []
    assert "not-the-key" not in result.output


def test_thehive4_admin_key_from_the_environment(hive, tmp_path):
    write_config(tmp_path, thehive={"url": hive_url(tmp_path), "api_key": "read-only-key"})
    result = CliRunner().invoke(cli, ["thehive-setup", "-c", str(tmp_path), "--thehive-version", "4", "--yes"],
                                env={"TQ_MW_THEHIVE_ADMIN_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert hive.notifications() == [OURS]


def test_thehive4_unreadable_list_warns_that_the_put_replaces_it(hive, tmp_path):
    hive.config_readable = False
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert "replaces the organisation's whole list" in result.stdout
    assert "cannot be read back" in result.stdout
    assert hive.notifications() == [OURS]


def test_thehive4_uses_the_configured_organisation(server, tmp_path):
    url, box = server
    box["sim"] = sim = TheHiveSimulator(api_key=KEY, organisation="SOC")
    write_config(tmp_path, thehive={"url": url, "api_key": KEY, "organisation": "SOC"})
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert "X-Organisation: SOC" in result.stdout
    assert sim.notifications("SOC") == [OURS] and sim.notifications() == []


def test_thehive5_prints_the_endpoint_form_and_calls_nothing(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "5", "--webhook-url", "https://mw.example.org/cases")
    assert result.exit_code == 0, result.output
    assert "URL:             https://mw.example.org/cases" in result.stdout
    assert "Version:         1" in result.stdout
    assert f"Authentication:  Bearer, key {WEBHOOK_TOKEN}" in result.stdout
    assert "trigger AnyEvent" in result.stdout and "loopback" not in result.stdout
    assert hive.requests == []


def test_a_loopback_url_gets_a_note(hive, tmp_path):
    result = setup(tmp_path, "--thehive-version", "5")
    assert "http://127.0.0.1:5123/cases" in result.stdout and "loopback address" in result.stdout


@pytest.mark.parametrize("version", ["4", "5"])
def test_mask_secrets_hides_the_webhook_secret(hive, tmp_path, version):
    result = setup(tmp_path, "--thehive-version", version, "--mask-secrets", "--yes")
    assert result.exit_code == 0, result.output
    assert WEBHOOK_TOKEN not in result.output and "********" in result.stdout


def test_basic_auth_block_is_filled_in(hive, tmp_path):
    write_config(tmp_path, thehive={"url": hive_url(tmp_path), "api_key": KEY},
                 webhook={"auth": "basic", "username": "thehive", "password": "s3cret-pw", "token": None})
    result = setup(tmp_path, "--thehive-version", "4", "--yes")
    assert result.exit_code == 0, result.output
    assert 'auth: {type: "basic", username: "thehive", password: "s3cret-pw"}' in result.stdout


def test_version_is_required_and_a_bad_config_exits_2(hive, tmp_path):
    assert setup(tmp_path).exit_code == 2
    (tmp_path / "config.yaml").write_text("threatq: {}\n")
    result = setup(tmp_path, "--thehive-version", "5")
    assert result.exit_code == 2 and "thehive: required section is missing" in result.stderr


def test_a_put_answered_204_counts_as_accepted():
    """TheHive's ConfigCtrl answers some configuration PUTs with 204 No Content."""
    import responses

    from tq_mw_thehive.thehive.api import TheHiveClient
    from tq_mw_thehive.thehive_setup import register

    base = "http://127.0.0.1:9"
    client = TheHiveClient(base, KEY, attempts=1)
    with responses.RequestsMock() as mock:
        mock.get(base + NOTIFICATION, json={"path": "notification", "value": []})
        mock.put(base + NOTIFICATION, status=204)
        mock.get(base + NOTIFICATION, json={"path": "notification", "value": [OURS]})
        said = []
        assert register(client, yes=True, echo=said.append) is True
        assert mock.calls[1].request.headers["Authorization"] == f"Bearer {KEY}"
    assert any("Verified" in line for line in said)
