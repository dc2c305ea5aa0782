"""The configuration run: prompts, flags and variables, the one-time token exchange, the printed setup."""
from __future__ import annotations

import io
import json
import os
import socket
import ssl
import stat
import sys
from pathlib import Path

import pytest
import requests
import urllib3
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
                                      "--show-secrets",
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
    args = ["configure", "-c", str(tmp_path), "--webhook-auth", auth_mode, "--show-secrets",
            *answer_flags(threatq, **{"--webhook-token": "tok-1234567890"})]
    result = CliRunner().invoke(cli, args, env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    assert expected in result.output
    assert config_mod.load(tmp_path).webhook.auth == auth_mode


def test_wrong_password_without_a_terminal_fails_at_once_writes_nothing_and_exits_2(tmp_path, threatq):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": "wrong"})
    assert result.exit_code == 2
    assert result.output.count("ThreatQ refused the email/password (or client id)") == 1
    assert "Nothing was written." in result.output
    assert "try again" not in result.output.lower()
    assert threatq.requests == [("POST", "/api/token")]  # one try: nothing could change the answers
    assert list(tmp_path.iterdir()) == []


def test_unreachable_threatq_writes_nothing_and_exits_2(tmp_path, threatq):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path),
                                      *answer_flags(threatq, **{"--threatq-host": url})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    assert f"nothing listens at {url}: is the host/port right?" in result.output
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


def test_on_a_real_terminal_a_refused_password_is_asked_for_again(tmp_path, threatq):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_")}
    code, output = answer_prompts(
        [sys.executable, "-m", "tq_mw_thehive", "configure", "-c", str(tmp_path)],
        [("ThreatQ Host", threatq.url), ("ThreatQ Client ID", threatq.client_id),
         ("ThreatQ Email", EMAIL), ("ThreatQ Password", "not-the-password"),
         ("Please try again (2 of 3).", ""), ("ThreatQ Client ID", ""), ("ThreatQ Email", ""),
         ("ThreatQ Password", PASSWORD), ("ThreatQ accepted the credentials.", "http://127.0.0.1:9000"),
         ("TheHive API key", THEHIVE_KEY), ("Webhook secret (empty: generate one)", "")],
        env=env, cwd=str(tmp_path))
    assert code == 0, output
    assert output.count("ThreatQ refused the email/password (or client id)") == 1
    assert config_mod.load(tmp_path).threatq.host == threatq.url
    assert PASSWORD not in output and "not-the-password" not in output


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


# --------------------------------------------------------------------------- a run a person can get through

FORBIDDEN_IN_ERRORS = ("Max retries", "Caused by", "HTTPConnectionPool", "HTTPSConnectionPool",
                       "NewConnectionError", "NameResolutionError", "urllib3", "object at 0x")


@pytest.fixture
def on_a_terminal(monkeypatch):
    """stdin is a terminal: configure prompts (CliRunner's input answers) and retries."""
    monkeypatch.setattr(configure, "_stdin_is_terminal", lambda: True, raising=False)


def closed_port_url() -> str:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def error_lines(output: str):
    return [line for line in output.splitlines() if line.startswith("tq-mw-thehive: error:")]


def lines(*answers: str) -> str:
    return "".join(answer + "\n" for answer in answers)


def test_threatq_is_checked_before_the_thehive_questions_and_asked_again(tmp_path, threatq, on_a_terminal):
    typed = lines(threatq.url, threatq.client_id, EMAIL, "wrong-password",
                  "", "", "", PASSWORD,  # second try: Enter keeps host, client id and email
                  "http://127.0.0.1:9000", THEHIVE_KEY, "")
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path)], input=typed)
    assert result.exit_code == 0, result.output
    out = result.output
    refused = "ThreatQ refused the email/password (or client id)"
    assert out.count(refused) == 1
    assert "Please try again (2 of 3)." in out
    assert out.index(refused) < out.index("TheHive URL")  # checked before TheHive is asked about
    assert out.count("ThreatQ Host") == 2 and out.count("ThreatQ Password") == 2
    assert out.index("ThreatQ accepted the credentials.") < out.index("TheHive URL")
    assert threatq.requests == [("POST", "/api/token")] * 2
    cfg = config_mod.load(tmp_path)
    assert (cfg.threatq.host, cfg.threatq.client_id) == (threatq.url, threatq.client_id)
    assert PASSWORD not in out and "wrong-password" not in out


def test_three_refusals_on_a_terminal_end_the_run_with_the_error(tmp_path, threatq, on_a_terminal):
    typed = lines(threatq.url, threatq.client_id, EMAIL, "wrong-1",
                  "", "", "", "wrong-2", "", "", "", "wrong-3")
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path)], input=typed)
    assert result.exit_code == 2
    assert result.output.count("ThreatQ refused the email/password (or client id)") == 3  # once per try
    assert error_lines(result.output) == [error_lines(result.output)[0]]
    assert "Gave up after 3 tries; nothing was written." in error_lines(result.output)[0]
    assert "TheHive URL" not in result.output
    assert threatq.requests == [("POST", "/api/token")] * 3
    assert list(tmp_path.iterdir()) == []


def test_a_refused_client_secret_is_asked_again_on_a_terminal(tmp_path, threatq, on_a_terminal):
    args = answer_flags(threatq, **{"--email": None, "--client-id": "integration", "--client-secret": "wrong"})
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *args],
                                input=lines("", "", CLIENT_SECRET, ""))
    assert result.exit_code == 0, result.output
    assert result.output.count("ThreatQ refused the client id/client secret") == 1
    assert "ThreatQ Client Secret (empty: keep the current one)" in result.output
    assert "ThreatQ Email" not in result.output
    assert config_mod.load(tmp_path).threatq.client_secret == CLIENT_SECRET
    assert CLIENT_SECRET not in result.output


def refusing_threatq(environ, start_response):
    """A ThreatQ that answers the token request as OAuth servers do for a wrong password."""
    body = json.dumps({"error": "invalid_grant", "error_description": "Invalid credentials."}).encode()
    start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(body)))])
    return [body]


def unresolvable(monkeypatch):
    """Names under .invalid do not resolve, without asking any DNS server."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return "http://nonexistent.invalid:8443", ["cannot resolve host nonexistent.invalid: is the name right?"]


def refused(monkeypatch, threatq):
    url = closed_port_url()
    return url, [f"nothing listens at {url}: is the host/port right?"]


def tls_on_plain_http(monkeypatch, threatq):
    url = threatq.url.replace("http://", "https://")
    return url, [f"TLS handshake with {url} failed", "is it http://?", "-ds/--disable-ssl"]


def unavailable(monkeypatch, threatq):
    threatq.down = True
    return threatq.url, ["ThreatQ unavailable (HTTP 503)"]


@pytest.mark.parametrize("setup", [
    refused, tls_on_plain_http, unavailable,
    pytest.param(lambda monkeypatch, threatq: unresolvable(monkeypatch), id="unresolvable"),
])
def test_each_threatq_failure_is_one_clean_line_with_a_hint(tmp_path, threatq, monkeypatch, setup):
    url, expected = setup(monkeypatch, threatq)
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path),
                                      *answer_flags(threatq, **{"--threatq-host": url})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    [line] = error_lines(result.output)
    for text in expected:
        assert line.count(text) == 1, line
    assert line.endswith("Nothing was written.")
    assert not [bad for bad in FORBIDDEN_IN_ERRORS if bad in result.output], result.output
    assert PASSWORD not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_401_invalid_grant_says_the_email_or_password_was_refused(tmp_path):
    with LoopbackServer(refusing_threatq) as server:
        result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), "--threatq-host", server.url,
                                          "--client-id", "tq-client-id", "--email", EMAIL,
                                          "--thehive-url", "http://127.0.0.1:9000"],
                                    env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 2
    [line] = error_lines(result.output)
    assert "ThreatQ refused the email/password (or client id) with HTTP 401: Invalid credentials." in line
    assert PASSWORD not in result.output


def test_a_failed_check_drops_the_password_and_never_shows_it(tmp_path, threatq):
    answers = configure.Answers(threatq_host=closed_port_url(), client_id=threatq.client_id, email=EMAIL,
                                password=PASSWORD, thehive_url="http://127.0.0.1:9000",
                                thehive_api_key=THEHIVE_KEY)
    with pytest.raises(configure.ConfigureError) as caught:
        configure.run(answers, tmp_path, listener_ip="127.0.0.1", port=5000, disable_ssl=False,
                      use_proxy=False, interactive=False)
    assert answers.password is None
    assert PASSWORD not in str(caught.value) and PASSWORD not in repr(answers)


class Prompts:
    """A person at the prompts: answers by prompt text, records every prompt."""

    def __init__(self, **by_prefix: str) -> None:
        self.by_prefix, self.asked = by_prefix, []

    def __call__(self, text, default=None, hide_input=False, show_default=True):
        self.asked.append(text)
        return next(answer for prefix, answer in self.by_prefix.items() if text.startswith(prefix))


def run_interactively(tmp_path, threatq, prompts: Prompts) -> configure.Config:
    answers = configure.Answers(threatq_host=threatq.url, client_id=threatq.client_id, email=EMAIL,
                                password=PASSWORD, thehive_url="http://127.0.0.1:9000",
                                thehive_api_key=THEHIVE_KEY)
    return configure.run(answers, tmp_path, listener_ip="127.0.0.1", port=5000, disable_ssl=False,
                         use_proxy=False, interactive=True, out=io.StringIO(), err=io.StringIO(),
                         prompt=prompts)


def test_the_webhook_secret_prompt_says_one_thing(tmp_path, threatq):
    first = Prompts(**{"Webhook secret": ""})
    token = run_interactively(tmp_path, threatq, first).webhook.token
    assert first.asked == ["Webhook secret (empty: generate one)"]
    again = Prompts(**{"Webhook secret": ""})
    assert run_interactively(tmp_path, threatq, again).webhook.token == token
    assert again.asked == ["Webhook secret (empty: keep the current one)"]


def test_a_rerun_in_basic_mode_keeps_the_webhook_password(tmp_path, threatq):
    args = ["configure", "-c", str(tmp_path), "--webhook-auth", "basic", *answer_flags(threatq)]
    assert CliRunner().invoke(cli, args, env={"TQ_MW_THREATQ_PASSWORD": PASSWORD}).exit_code == 0
    password = config_mod.load(tmp_path).webhook.password
    assert CliRunner().invoke(cli, args, env={"TQ_MW_THREATQ_PASSWORD": PASSWORD}).exit_code == 0
    assert config_mod.load(tmp_path).webhook.password == password


@pytest.mark.parametrize("auth_mode, key", [("bearer", "webhook.token"), ("basic", "webhook.password")])
def test_no_secret_is_printed_when_stdout_is_not_a_terminal(tmp_path, threatq, auth_mode, key):
    token = "tok-not-for-a-pipe-0123456789"
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), "--webhook-auth", auth_mode,
                                      *answer_flags(threatq, **{"--webhook-token": token})],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    assert token not in result.output and THEHIVE_KEY not in result.output
    assert configure.SECRET_MASK in result.output
    assert f"it is {key} in {tmp_path / 'config.yaml'} (mode 0600)" in result.output
    assert "--show-secrets" in result.output


def test_show_secrets_or_a_terminal_prints_the_webhook_secret(tmp_path, threatq, monkeypatch):
    token = "tok-for-the-person-0123456789"
    args = ["configure", "-c", str(tmp_path), *answer_flags(threatq, **{"--webhook-token": token})]
    env = {"TQ_MW_THREATQ_PASSWORD": PASSWORD}
    shown = CliRunner().invoke(cli, args + ["--show-secrets"], env=env)
    assert shown.exit_code == 0 and f'key: "{token}"' in shown.output
    assert configure.SECRET_MASK not in shown.output
    monkeypatch.setattr(configure, "_is_terminal", lambda stream: True)
    on_terminal = CliRunner().invoke(cli, args, env=env)
    assert on_terminal.exit_code == 0 and f'key: "{token}"' in on_terminal.output
    assert "--show-secrets" not in on_terminal.output


@pytest.mark.parametrize("listener, warned", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                              ("localhost", True), ("192.0.2.10", False)])
def test_a_loopback_webhook_url_is_warned_about(tmp_path, threatq, listener, warned):
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), "-li", listener,
                                      *answer_flags(threatq)], env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    warning = "is a loopback address: TheHive on another host cannot reach it"
    assert (warning in result.stderr) is warned
    if warned:
        assert "-li 0.0.0.0 (or this host's address)" in result.stderr


def test_loopback_urls():
    for url in ("http://127.0.0.1:5000/cases", "http://127.9.9.9/cases", "http://[::1]:5000/cases",
                "http://localhost:5000/cases", "http://LOCALHOST./cases"):
        assert configure.is_loopback_url(url), url
    for url in ("http://10.0.0.5:5000/cases", "http://[2001:db8::1]/cases", "http://mw.example.org/cases"):
        assert not configure.is_loopback_url(url), url


def test_the_curl_command_takes_the_admin_key_from_its_own_variable(tmp_path, threatq):
    from tq_mw_thehive.cli.setup import thehive_setup_command
    result = CliRunner().invoke(cli, ["configure", "-c", str(tmp_path), *answer_flags(threatq)],
                                env={"TQ_MW_THREATQ_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    assert 'curl -XPUT -H "Authorization: Bearer $TQ_MW_THEHIVE_ADMIN_API_KEY"' in result.output
    assert "TQ_MW_THEHIVE_API_KEY" not in result.output  # the daemon's read key is not the admin's
    api_key = next(p for p in thehive_setup_command.params if p.name == "api_key")
    assert api_key.envvar == configure.ADMIN_KEY_VARIABLE == "TQ_MW_THEHIVE_ADMIN_API_KEY"


def wrapped(outer: type, reason: BaseException) -> BaseException:
    """How requests raises: its exception around urllib3's MaxRetryError around the cause."""
    return outer(urllib3.exceptions.MaxRetryError(None, "/api/token", reason))


def test_certificate_timeout_and_proxy_failures_have_their_own_hint():
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cert.verify_message = "self-signed certificate"
    cases = [
        (wrapped(requests.exceptions.SSLError, urllib3.exceptions.SSLError(cert)),
         "the TLS certificate of https://tq.example.org is not trusted (self-signed certificate): "
         "install its CA certificate, or pass -ds/--disable-ssl (lab only)"),
        (wrapped(requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError("timed out")),
         "no answer from https://tq.example.org within 5 s"),
        (wrapped(requests.exceptions.ProxyError, urllib3.exceptions.ProxyError("down", OSError())),
         "cannot reach ThreatQ through the proxy (threatq.proxy, used with -ep)"),
    ]
    for error, expected in cases:
        text = configure.explain_threatq_failure(tq_auth.ThreatQAuthError("x"), error, None,
                                                 "https://tq.example.org", False)
        assert text.startswith(expected), text
        assert "\n" not in text and not [bad for bad in FORBIDDEN_IN_ERRORS if bad in text]
