"""config.from_dict / load / write: defaults, validation with key paths, ${ENV}, 0600 files."""
from __future__ import annotations

import copy
import os
import re
import stat
from pathlib import Path

import pytest

from tq_mw_thehive import config
from tq_mw_thehive.config import ConfigError

TOKEN = "wh-token-5f0c1d"
API_KEY = "th-api-key-9a8b7c"
CLIENT_SECRET = "tq-client-secret-3e4f"
PASSWORD = "wh-password-77aa"

MINIMAL = {
    "threatq": {"host": "tq.example.com", "client_id": "tq-client"},
    "thehive": {"url": "https://thehive.example.com"},
    "webhook": {"token": TOKEN},
}


def minimal(**changes):
    """A deep copy of MINIMAL with ``section={key: value}`` merged in (value None deletes)."""
    raw = copy.deepcopy(MINIMAL)
    for section, values in changes.items():
        if not isinstance(values, dict):
            raw[section] = values
            continue
        target = raw.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return raw


def full(tmp_path):
    """A Config with every secret set and non-default values, built through from_dict."""
    raw = {
        "threatq": {"host": "https://tq.example.com:8443/", "client_id": "tq-client",
                    "client_secret": CLIENT_SECRET, "verify_ssl": False,
                    "proxy": "http://proxy.example.com:3128", "source": "TheHive Prod"},
        "thehive": {"url": "https://thehive.example.com", "api_key": API_KEY,
                    "organisation": "acme-soc", "verify_ssl": True},
        "webhook": {"auth": "basic", "token": TOKEN, "username": "hive", "password": PASSWORD,
                    "max_body_mb": 2.5},
        "sync": {"cases_as": "incident", "event_type": "Phishing", "only_ioc": True,
                 "include_cases_without_observables": False, "custom_mapping": True,
                 "type_mapping": "ip: IP Address"},
        "state_db": "state/hive.db",
    }
    return config.from_dict(raw, tmp_path)


def expect_error(raw, key_path, tmp_path, *extra):
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw, tmp_path)
    message = str(info.value)
    assert key_path in message
    for text in extra:
        assert text in message
    return message


# --- defaults -------------------------------------------------------------------------------

def test_minimal_config_gets_all_defaults(tmp_path):
    cfg = config.from_dict(minimal(), tmp_path)

    assert cfg.threatq.host == "tq.example.com"
    assert cfg.threatq.client_id == "tq-client"
    assert cfg.threatq.client_secret is None
    assert cfg.threatq.verify_ssl is True
    assert cfg.threatq.proxy is None
    assert cfg.threatq.source == "TheHive"
    assert cfg.thehive.url == "https://thehive.example.com"
    assert cfg.thehive.api_key is None
    assert cfg.thehive.organisation is None
    assert cfg.thehive.verify_ssl is True
    assert cfg.webhook.auth == "bearer"
    assert cfg.webhook.token == TOKEN
    assert cfg.webhook.max_body_mb == 10
    assert cfg.sync.cases_as == "event"
    assert cfg.sync.event_type == "Incident"
    assert cfg.sync.only_ioc is False
    assert cfg.sync.include_cases_without_observables is True
    assert cfg.sync.custom_mapping is False
    assert cfg.sync.type_mapping == ""
    assert cfg.config_dir == tmp_path
    assert cfg.state_db == tmp_path / "tq_mw_thehive.db"


def test_optional_sections_may_be_empty(tmp_path):
    raw = minimal(webhook={"auth": "none", "token": None})
    raw["sync"] = None
    cfg = config.from_dict(raw, tmp_path)
    assert cfg.webhook.auth == "none"
    assert cfg.sync == config.SyncConfig()


def test_max_body_mb_integer_becomes_float(tmp_path):
    cfg = config.from_dict(minimal(webhook={"max_body_mb": 25}), tmp_path)
    assert cfg.webhook.max_body_mb == 25.0
    assert isinstance(cfg.webhook.max_body_mb, float)


def test_relative_state_db_resolves_against_config_dir(tmp_path):
    raw = minimal()
    raw["state_db"] = "data/state.db"
    cfg = config.from_dict(raw, tmp_path)
    assert cfg.state_db == tmp_path / "data" / "state.db"


def test_absolute_state_db_stays(tmp_path):
    elsewhere = tmp_path.parent / "elsewhere" / "state.db"
    raw = minimal()
    raw["state_db"] = str(elsewhere)
    cfg = config.from_dict(raw, tmp_path / "conf")
    assert cfg.state_db == elsewhere


def test_state_db_must_be_a_string(tmp_path):
    raw = minimal()
    raw["state_db"] = 5
    expect_error(raw, "state_db", tmp_path)


# --- threatq.host ---------------------------------------------------------------------------

@pytest.mark.parametrize("host, base_url", [
    ("tq.example.com", "https://tq.example.com"),
    ("tq.example.com:8443", "https://tq.example.com:8443"),
    ("10.0.0.5", "https://10.0.0.5"),
    ("https://tq.example.com", "https://tq.example.com"),
    ("https://tq.example.com/", "https://tq.example.com"),
    ("http://tq.example.com:8080/", "http://tq.example.com:8080"),
    ("https://tq.example.com/threatq/", "https://tq.example.com/threatq"),
])
def test_threatq_base_url(tmp_path, host, base_url):
    cfg = config.from_dict(minimal(threatq={"host": host}), tmp_path)
    assert cfg.threatq.base_url == base_url


@pytest.mark.parametrize("host", [
    "tq example.com",
    "tq.example.com/threatq",
    "ftp://tq.example.com",
    "https://",
    "",
    "   ",
    "user@tq.example.com",
])
def test_bad_threatq_host_is_an_error(tmp_path, host):
    expect_error(minimal(threatq={"host": host}), "threatq.host", tmp_path)


@pytest.mark.parametrize("section, key", [("thehive", "url"), ("threatq", "proxy")])
@pytest.mark.parametrize("url", ["thehive.example.com", "ftp://thehive.example.com", "https://"])
def test_url_keys_need_an_http_url(tmp_path, section, key, url):
    expect_error(minimal(**{section: {key: url}}), f"{section}.{key}", tmp_path, "http")


def test_malformed_ipv6_url_is_a_config_error(tmp_path):
    expect_error(minimal(thehive={"url": "http://[::1"}), "thehive.url", tmp_path)


@pytest.mark.parametrize("url", ["https://thehive.example.com:abc", "https://thehive.example.com:99999"])
def test_url_with_bad_port_is_a_config_error(tmp_path, url):
    expect_error(minimal(thehive={"url": url}), "thehive.url", tmp_path)


# --- errors name the key path ---------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    raw = minimal()
    raw["thehvie"] = {}
    expect_error(raw, "thehvie", tmp_path, "unknown key", "did you mean thehive?")


def test_unknown_top_level_key_without_close_match(tmp_path):
    raw = minimal()
    raw["zzzzzz"] = 1
    message = expect_error(raw, "zzzzzz", tmp_path, "unknown key")
    assert "did you mean" not in message


def test_unknown_key_in_section_with_hint(tmp_path):
    raw = minimal(threatq={"hots": "tq.example.com"})
    expect_error(raw, "threatq.hots", tmp_path, "unknown key", "did you mean host?")


def test_unknown_key_in_section_without_hint(tmp_path):
    raw = minimal(sync={"colour": "blue"})
    message = expect_error(raw, "sync.colour", tmp_path, "unknown key")
    assert "did you mean" not in message


@pytest.mark.parametrize("section, key, value, expected", [
    ("threatq", "verify_ssl", "false", "true or false"),
    ("thehive", "verify_ssl", "yes", "true or false"),
    ("sync", "only_ioc", 1, "true or false"),
    ("threatq", "client_id", ["a", "b"], "must be a string"),
    ("thehive", "url", 42, "must be a string"),
    ("sync", "event_type", {"name": "x"}, "must be a string"),
    ("webhook", "max_body_mb", True, "must be a number"),
    ("webhook", "max_body_mb", "10", "must be a number"),
])
def test_wrong_type(tmp_path, section, key, value, expected):
    expect_error(minimal(**{section: {key: value}}), f"{section}.{key}", tmp_path, expected)


@pytest.mark.parametrize("section, key, value", [
    ("webhook", "auth", "token"),
    ("webhook", "auth", "Bearer"),
    ("sync", "cases_as", "case"),
])
def test_bad_choice(tmp_path, section, key, value):
    expect_error(minimal(**{section: {key: value}}), f"{section}.{key}", tmp_path,
                 "must be one of", repr(value))


@pytest.mark.parametrize("size", [0, -1, 5000, 1024.5])
def test_max_body_mb_out_of_range(tmp_path, size):
    expect_error(minimal(webhook={"max_body_mb": size}), "webhook.max_body_mb", tmp_path,
                 "at most 1024")


@pytest.mark.parametrize("size", [0.5, 1024])
def test_max_body_mb_limits_are_accepted(tmp_path, size):
    cfg = config.from_dict(minimal(webhook={"max_body_mb": size}), tmp_path)
    assert cfg.webhook.max_body_mb == size


@pytest.mark.parametrize("section, key, value", [
    ("threatq", "client_id", "  "),
    ("threatq", "source", ""),
    ("sync", "event_type", " "),
])
def test_empty_strings_are_errors(tmp_path, section, key, value):
    expect_error(minimal(**{section: {key: value}}), f"{section}.{key}", tmp_path, "must not be empty")


@pytest.mark.parametrize("section", ["threatq", "thehive"])
def test_missing_required_section(tmp_path, section):
    raw = minimal()
    del raw[section]
    expect_error(raw, section, tmp_path, "required section is missing")


@pytest.mark.parametrize("section", ["threatq", "thehive"])
def test_required_section_given_as_null(tmp_path, section):
    raw = minimal()
    raw[section] = None
    expect_error(raw, section, tmp_path, "required section is missing")


@pytest.mark.parametrize("section, key", [
    ("threatq", "host"),
    ("threatq", "client_id"),
    ("thehive", "url"),
])
def test_missing_required_key(tmp_path, section, key):
    expect_error(minimal(**{section: {key: None}}), f"{section}.{key}", tmp_path, "required key")


@pytest.mark.parametrize("auth", ["bearer", "key"])
def test_token_required_for_bearer_and_key(tmp_path, auth):
    expect_error(minimal(webhook={"auth": auth, "token": None}), "webhook.token", tmp_path, auth)


@pytest.mark.parametrize("username, password", [(None, PASSWORD), ("hive", None), (None, None)])
def test_basic_auth_needs_username_and_password(tmp_path, username, password):
    raw = minimal(webhook={"auth": "basic", "token": None, "username": username, "password": password})
    expect_error(raw, "webhook.username", tmp_path, "webhook.password", "basic")


def test_basic_auth_with_username_and_password(tmp_path):
    raw = minimal(webhook={"auth": "basic", "token": None, "username": "hive", "password": PASSWORD})
    cfg = config.from_dict(raw, tmp_path)
    assert (cfg.webhook.username, cfg.webhook.password) == ("hive", PASSWORD)


@pytest.mark.parametrize("section", ["threatq", "thehive", "webhook", "sync"])
def test_section_that_is_a_list(tmp_path, section):
    raw = minimal(**{section: ["host", "tq.example.com"]})
    expect_error(raw, section, tmp_path, "must be a mapping", "list")


@pytest.mark.parametrize("raw, kind", [
    ([MINIMAL], "list"),
    ("threatq: x", "str"),
    (None, "NoneType"),
    (3, "int"),
])
def test_top_level_must_be_a_mapping(tmp_path, raw, kind):
    expect_error(raw, "top level", tmp_path, "must be a mapping", kind)


@pytest.mark.parametrize("key", ["token", "password"])
def test_type_error_on_a_secret_does_not_echo_it(tmp_path, key):
    message = expect_error(minimal(webhook={key: 98765432123}), f"webhook.{key}", tmp_path)
    assert "98765432123" not in message


# --- ${ENV_NAME} ----------------------------------------------------------------------------

def test_env_whole_values(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    raw = minimal(threatq={"client_secret": "${TQ_SECRET}"}, webhook={"token": "${HOOK_TOKEN}"})
    cfg = config.from_dict(raw, tmp_path)
    assert cfg.threatq.client_secret == CLIENT_SECRET
    assert cfg.webhook.token == TOKEN


def test_env_embedded_in_a_value(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_HOST", "tq.internal.example.com")
    monkeypatch.setenv("TQ_PORT", "8443")
    cfg = config.from_dict(minimal(threatq={"host": "https://${TQ_HOST}:${TQ_PORT}/"}), tmp_path)
    assert cfg.threatq.host == "https://tq.internal.example.com:8443/"
    assert cfg.threatq.base_url == "https://tq.internal.example.com:8443"


@pytest.mark.parametrize("text, value", [
    ("false", False), ("False", False), ("no", False), ("off", False), ("0", False),
    ("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True),
])
def test_env_bools(tmp_path, monkeypatch, text, value):
    monkeypatch.setenv("TQ_VERIFY", text)
    cfg = config.from_dict(minimal(threatq={"verify_ssl": "${TQ_VERIFY}"}), tmp_path)
    assert cfg.threatq.verify_ssl is value


def test_env_bool_that_is_not_a_bool(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_VERIFY", "maybe")
    expect_error(minimal(threatq={"verify_ssl": "${TQ_VERIFY}"}), "threatq.verify_ssl", tmp_path,
                 "true or false", "maybe")


@pytest.mark.parametrize("text, value", [("25", 25.0), ("0.5", 0.5)])
def test_env_numbers(tmp_path, monkeypatch, text, value):
    monkeypatch.setenv("MAX_BODY", text)
    cfg = config.from_dict(minimal(webhook={"max_body_mb": "${MAX_BODY}"}), tmp_path)
    assert cfg.webhook.max_body_mb == value


@pytest.mark.parametrize("text, expected", [("lots", "must be a number"), ("5000", "at most 1024")])
def test_env_number_still_validated(tmp_path, monkeypatch, text, expected):
    monkeypatch.setenv("MAX_BODY", text)
    expect_error(minimal(webhook={"max_body_mb": "${MAX_BODY}"}), "webhook.max_body_mb", tmp_path,
                 expected)


def test_env_choice_still_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_AUTH", "token")
    expect_error(minimal(webhook={"auth": "${HOOK_AUTH}"}), "webhook.auth", tmp_path, "must be one of")


def test_env_in_state_db(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "var"))
    raw = minimal()
    raw["state_db"] = "${STATE_DIR}/hive.db"
    assert config.from_dict(raw, tmp_path / "etc").state_db == tmp_path / "var" / "hive.db"


@pytest.mark.parametrize("section, key", [("threatq", "host"), ("webhook", "token"),
                                          ("threatq", "verify_ssl")])
def test_missing_env_var_names_key_and_variable(tmp_path, monkeypatch, section, key):
    monkeypatch.delenv("TQ_NOT_SET_ANYWHERE", raising=False)
    raw = minimal(**{section: {key: "x${TQ_NOT_SET_ANYWHERE}"}})
    expect_error(raw, f"{section}.{key}", tmp_path, "TQ_NOT_SET_ANYWHERE", "not set")


def test_literal_strings_do_not_become_bools(tmp_path):
    """Only values that came from ${ENV} may be strings standing for bools."""
    expect_error(minimal(thehive={"verify_ssl": "false"}), "thehive.verify_ssl", tmp_path)


# --- load -----------------------------------------------------------------------------------

def write_yaml(config_dir: Path, text: str) -> Path:
    path = config_dir / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_reads_yaml(tmp_path):
    write_yaml(tmp_path, "threatq:\n  host: tq.example.com\n  client_id: c\n"
                         "thehive:\n  url: https://thehive.example.com\n"
                         f"webhook:\n  token: {TOKEN}\n")
    cfg = config.load(tmp_path)
    assert cfg == config.from_dict(minimal(threatq={"client_id": "c"}), tmp_path)
    assert cfg.state_db == tmp_path / "tq_mw_thehive.db"


def test_load_missing_file(tmp_path):
    path = tmp_path / "config.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        config.load(tmp_path)
    assert "no configuration file" in str(info.value)


def test_load_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path, "threatq: [unclosed\n  host: : :\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        config.load(tmp_path)
    assert "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_load_empty_file(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        config.load(tmp_path)
    assert "top level" in str(info.value)


def test_load_prefixes_validation_errors_with_the_file(tmp_path):
    path = write_yaml(tmp_path, "threatq:\n  hots: tq.example.com\n  client_id: c\n"
                                "thehive:\n  url: https://thehive.example.com\n")
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert str(info.value).startswith(f"{path}: threatq.hots: unknown key")


def test_load_unreadable_config_path(tmp_path):
    (tmp_path / "config.yaml").mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(tmp_path)


# --- write ----------------------------------------------------------------------------------

def test_write_is_0600_and_round_trips(tmp_path):
    cfg = full(tmp_path)
    path = config.write(cfg)
    assert path == tmp_path / "config.yaml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert config.load(tmp_path) == cfg


def test_write_minimal_round_trips(tmp_path):
    cfg = config.from_dict(minimal(), tmp_path)
    config.write(cfg)
    assert config.load(tmp_path) == cfg
    assert "state_db: tq_mw_thehive.db" in (tmp_path / "config.yaml").read_text()


def test_write_keeps_an_absolute_state_db(tmp_path):
    raw = minimal()
    raw["state_db"] = str(tmp_path / "elsewhere.db")
    cfg = config.from_dict(raw, tmp_path / "conf")
    (tmp_path / "conf").mkdir()
    config.write(cfg)
    assert config.load(tmp_path / "conf").state_db == tmp_path / "elsewhere.db"


def test_write_replaces_a_world_readable_file_with_0600(tmp_path):
    path = write_yaml(tmp_path, "old: content\n")
    os.chmod(path, 0o644)
    cfg = full(tmp_path)
    config.write(cfg)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert config.load(tmp_path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left


# --- secrets --------------------------------------------------------------------------------

def test_repr_never_shows_secrets(tmp_path):
    cfg = full(tmp_path)
    texts = [repr(cfg), repr(cfg.webhook), repr(cfg.threatq), repr(cfg.thehive), str(cfg)]
    for text in texts:
        for secret in (TOKEN, API_KEY, CLIENT_SECRET, PASSWORD):
            assert secret not in text
    assert "username='hive'" in repr(cfg.webhook)  # non-secret values are still shown
    assert "tq-client" in repr(cfg.threatq)


def test_secrets_lists_every_secret(tmp_path):
    assert set(full(tmp_path).secrets()) == {TOKEN, API_KEY, CLIENT_SECRET, PASSWORD,
                                             "http://proxy.example.com:3128"}


def test_secrets_skips_unset_ones(tmp_path):
    assert config.from_dict(minimal(), tmp_path).secrets() == (TOKEN,)
