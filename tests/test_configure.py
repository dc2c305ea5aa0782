"""The configuration run: prompts, flags and variables, the one-time token exchange, the printed setup."""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from terminal import answer_prompts
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import configure
from tq_mw_thehive.cli import cli
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

EMAIL = "analyst@example.org"
PASSWORD = "Tr0ub4dor&3-never-stored"
CLIENT_SECRET = "client-secret-abcdef0123456789"
THEHIVE_KEY = "hive-key-0123456789abcdef"


@pytest.fixture
def threatq():
    sim = ThreatQSimulator(users={EMAIL: PASSWORD}, client_secrets={"integration": CLIENT_SECRET})
    with LoopbackServer(sim.app) as server:
        sim.url = server.url
        yield sim


def answer_flags(threatq, **overrides):
    flags = {"--threatq-host": threatq.url, "--client-id": threatq.client_id, "--email": EMAIL,
             "--thehive-url": "http://127.0.0.1:9000", "--thehive-api-key": THEHIVE_KEY}
    flags.update(overrides)
    args = []
    for flag, value in flags.items():
        if value is not None:
            args += [flag, value]
    return args


def all_text_under(directory: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_flags_and_variables_configure_without_a_terminal(tmp_path, threatq):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    cfg = config_mod.load(tmp_path)
    assert cfg.threatq.base_url == threatq.url
    assert cfg.threatq.client_id == threatq.client_id
    assert cfg.thehive.api_key == THEHIVE_KEY
    assert cfg.webhook.auth == "bearer"
    assert len(cfg.webhook.token) >= 40  # generated: 32 random bytes, url-safe base64
    assert mode(tmp_path / "config.yaml") == 0o600
    tokens = tq_auth.load_tokens(tmp_path)
    assert tokens is not None and tokens.access_token in threatq.access_tokens
    assert mode(tq_auth.token_path(tmp_path)) == 0o600
    assert PASSWORD not in all_text_under(tmp_path)
    assert PASSWORD not in result.output
    # The password grant went to POST /api/token exactly once.
    assert threatq.requests == [("POST", "/api/token")]


def test_printed_setup_is_filled_in_for_thehive_4_and_5(tmp_path, threatq):
    result = CliRunner().invoke(cli, ["-p", "5077", "-li", "127.0.0.1", "configure", "-c", str(tmp_path),
                                      *answer_flags(threatq, **{"--webhook-token": "tok-1234567890",
                                                                "--organisation": "acme-soc"})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "notification.webhook.endpoints = [" in out
    assert 'url: "http://127.0.0.1:5077/cases"' in out
    assert 'auth: {type: "bearer", key: "tok-1234567890"}' in out
    assert "includedTheHiveOrganisations" in out
    assert "curl -XPUT" in out
    assert "http://127.0.0.1:9000/api/config/organisation/notification" in out
    assert '"trigger":{"name":"AnyEvent"}' in out
    assert '"endpoint":"tq_mw_thehive"' in out
    assert "X-Organisation: acme-soc" in out
    assert "TheHive 5" in out and "URL:             http://127.0.0.1:5077/cases" in out
    assert THEHIVE_KEY not in out


@pytest.mark.parametrize("auth_mode, expected", [
    ("basic", 'auth: {type: "basic", username: "thehive", password: "tok-1234567890"}'),
    ("key", 'auth: {type: "key", key: "tok-1234567890"}'),
    ("none", 'auth: {type: "none"}'),
])
def test_other_webhook_auth_modes_are_written_and_printed(tmp_path, threatq, auth_mode, expected):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), "--webhook-auth", auth_mode,
                                      *answer_flags(threatq, **{"--webhook-token": "tok-1234567890"})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    assert expected in result.output
    assert config_mod.load(tmp_path).webhook.auth == auth_mode


def test_wrong_password_writes_nothing_and_exits_2(tmp_path, threatq):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": "wrong"})
    assert result.exit_code == 2
    assert "ThreatQ rejected the credentials" in result.output
    assert "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_unreachable_threatq_writes_nothing_and_exits_2(tmp_path, threatq):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path),
                                      *answer_flags(threatq, **{"--threatq-host": url})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    assert f"cannot reach ThreatQ at {url}" in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_answer_without_a_terminal_names_flag_and_variable(tmp_path, threatq):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path),
                                      *answer_flags(threatq, **{"--email": None})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    assert "--email" in result.output and "TQ_MW_THREATQ_EMAIL" in result.output
    assert list(tmp_path.iterdir()) == []


def test_client_credentials_need_no_user_and_store_no_tokens(tmp_path, threatq):
    args = answer_flags(threatq, **{"--email": None, "--client-id": "integration",
                                    "--client-secret": CLIENT_SECRET})
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    cfg = config_mod.load(tmp_path)
    assert cfg.threatq.client_secret == CLIENT_SECRET
    assert not tq_auth.token_path(tmp_path).exists()
    assert CLIENT_SECRET not in result.output


def test_every_answer_can_come_from_the_environment(tmp_path, threatq):
    env = {"TQ_MW_THREATQ_HOST": threatq.url, "TQ_MW_THREATQ_CLIENT_ID": threatq.client_id,
           "TQ_MW_THREATQ_EMAIL": EMAIL, "TQ_MW_THREATQ_PASSWORD": PASSWORD,
           "TQ_MW_THEHIVE_URL": "https://hive.example.org", "TQ_MW_THEHIVE_API_KEY": THEHIVE_KEY,
           "TQ_MW_WEBHOOK_TOKEN": "env-token-0123456789"}
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path)], env=env)
    assert result.exit_code == 0, result.output
    cfg = config_mod.load(tmp_path)
    assert cfg.thehive.url == "https://hive.example.org"
    assert cfg.webhook.token == "env-token-0123456789"


def test_rerun_keeps_other_settings_and_replaces_answers(tmp_path, threatq):
    first = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *answer_flags(threatq)],
                               env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert first.exit_code == 0, first.output
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["sync"]["only_ioc"] = True
    raw["webhook"]["max_body_mb"] = 25
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    old_token = raw["webhook"]["token"]
    again = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path),
                                     *answer_flags(threatq, **{"--thehive-url": "https://hive2.example.org"})],
                               env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert again.exit_code == 0, again.output
    cfg = config_mod.load(tmp_path)
    assert cfg.sync.only_ioc is True
    assert cfg.webhook.max_body_mb == 25
    assert cfg.webhook.token == old_token  # kept: TheHive is already set up with it
    assert cfg.thehive.url == "https://hive2.example.org"


def test_interactive_run_on_a_terminal_prompts_like_the_guide(tmp_path, threatq):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_")}
    code, output = answer_prompts(
        [sys.executable, "-m", "tq_mw_thehive", "configure", "-c", str(tmp_path)],
        [("ThreatQ Host", threatq.url), ("ThreatQ Client ID", threatq.client_id),
         ("ThreatQ Email", EMAIL), ("ThreatQ Password", PASSWORD),
         ("TheHive URL", "http://127.0.0.1:9000"), ("TheHive API key", THEHIVE_KEY),
         ("Webhook secret", "")],
        env=env, cwd=str(tmp_path))
    assert code == 0, output
    assert PASSWORD not in output  # hidden input is not echoed
    assert THEHIVE_KEY not in output
    cfg = config_mod.load(tmp_path)
    assert cfg.thehive.api_key == THEHIVE_KEY
    assert len(cfg.webhook.token) >= 40
    assert f'key: "{cfg.webhook.token}"' in output
    assert PASSWORD not in all_text_under(tmp_path)


def test_generated_tokens_differ_and_are_strong():
    tokens = {configure.generate_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) >= 40 for t in tokens)


def test_webhook_url_for_a_wildcard_listener_names_this_host():
    assert configure.webhook_url("127.0.0.1", 5000) == "http://127.0.0.1:5000/cases"
    assert configure.webhook_url("::1", 5000) == "http://[::1]:5000/cases"
    assert "0.0.0.0" not in configure.webhook_url("0.0.0.0", 5000)


def test_token_file_round_trip_and_damage(tmp_path):
    tokens = tq_auth.Tokens(access_token="a" * 40, refresh_token="r" * 40, expires_at=123.0)
    assert "a" * 40 not in repr(tokens)
    tq_auth.save_tokens(tmp_path, tokens)
    assert tq_auth.load_tokens(tmp_path) == tokens
    tq_auth.token_path(tmp_path).write_text(json.dumps({"refresh_token": "x"}))
    with pytest.raises(tq_auth.ThreatQAuthError, match="damaged"):
        tq_auth.load_tokens(tmp_path)


def test_a_missing_config_directory_is_created_private(tmp_path, threatq):
    target = tmp_path / "new" / "tq-config"
    result = CliRunner().invoke(cli, ["configure", "-c", str(target), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    assert mode(target) == 0o700
    assert (target / "config.yaml").exists()


def test_a_config_directory_that_cannot_be_created_is_exit_2(tmp_path, threatq):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path / "file" / "cfg"), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    assert "config directory" in result.output and "file/cfg" in result.output
