"""Security properties: authentication takes one path, secrets stay out of logs, secret files are
private, the listener is loopback by default, and the daemon never fetches a URL a payload names."""
from __future__ import annotations

import base64
import copy
import hmac
import json
import os
import re
import socketserver
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests
import yaml
from click.testing import CliRunner

from conftest import SAMPLE_NAMES, WEBHOOK_TOKEN, minimal_config, sample, sample_text, write_config
from tq_mw_thehive import auth, cli
from tq_mw_thehive import config as config_mod
from tq_mw_thehive import web
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.services import Services
from tq_mw_thehive.testing.daemon import Daemon, wait_for
from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.thehive_sim import TheHiveSimulator
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth as tq_auth

EMAIL, PASSWORD = "secops@example.org", "tq-password-never-stored-7c1e"
CLIENT_SECRET = "tq-client-secret-5b9d0e7a31"
HIVE_KEY = "hive-api-key-security-4f2a8c"
VT_KEY = "vt-key-stored-with-keys-set-9e3b71"
LEAKY_KEY = "leaky-plugin-key-from-env-2d6f04"
USER, BASIC_PASSWORD = "thehive", "basic-pass-0a9f7c2e"
BEARER = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}


# --------------------------------------------------------------------------- authentication

def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_app(tmp_path: Path, mode: str):
    webhook = {"auth": mode}
    if mode == "basic":
        webhook.update(username=USER, password=BASIC_PASSWORD, token=None)
    cfg = config_mod.from_dict(minimal_config(webhook=webhook), tmp_path)
    inbox = Inbox.open(cfg.state_db)
    return web.create_app(Services(cfg, inbox)), inbox


WRONG_SAME_LENGTH = "X" * len(WEBHOOK_TOKEN)
REJECTED = {
    "bearer": [None, "", "garbage", "Bearer", "Bearer ", "bearer  ", f"Basic {WEBHOOK_TOKEN}", f"Token {WEBHOOK_TOKEN}",
               WEBHOOK_TOKEN, f"Bearer {WRONG_SAME_LENGTH}", f"Bearer {WEBHOOK_TOKEN}x", f"Bearer {WEBHOOK_TOKEN[:-1]}",
               f"Bearer\t{WEBHOOK_TOKEN}", f"BearerX {WEBHOOK_TOKEN}", f"Bearer {WEBHOOK_TOKEN.upper()}",
               "Bearer \u00e9\u00e8", f"Bearer {WEBHOOK_TOKEN} {WEBHOOK_TOKEN}", basic(USER, WEBHOOK_TOKEN)],
    "key": [None, "", "garbage", f"Bearer {WEBHOOK_TOKEN}", f"Key {WEBHOOK_TOKEN}", WRONG_SAME_LENGTH,
            WEBHOOK_TOKEN + "x", WEBHOOK_TOKEN[:-1], WEBHOOK_TOKEN.upper(), "\u00e9" * 10,
            f"{WEBHOOK_TOKEN} {WEBHOOK_TOKEN}"],
    "basic": [None, "", "garbage", "Basic", "Basic ", "Basic !!!not-base64!!!", "Basic dGhlaGl2ZQ",
              "Basic " + base64.b64encode(USER.encode()).decode(),                # no colon
              basic(USER, "wrong"), basic("other", BASIC_PASSWORD), basic("", BASIC_PASSWORD),
              basic(USER, ""), basic(USER, BASIC_PASSWORD + "x"), basic(USER.upper(), BASIC_PASSWORD),
              "Basic " + base64.b64encode(b"\xff\xfe:\x80").decode(),
              "Basic " + base64.b64encode(f"{USER}:{BASIC_PASSWORD}".encode()).decode()[:-2],
              f"Bearer {base64.b64encode(f'{USER}:{BASIC_PASSWORD}'.encode()).decode()}",
              f"Bearer {WEBHOOK_TOKEN}"],
}
ACCEPTED = {"bearer": f"Bearer {WEBHOOK_TOKEN}", "key": WEBHOOK_TOKEN, "basic": basic(USER, BASIC_PASSWORD)}


class CountingCompare:
    """Stands in for ``hmac`` inside ``tq_mw_thehive.auth`` (WebhookAuth): the real compare_digest, counted."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def compare_digest(self, a, b):
        self.calls.append((bytes(a), bytes(b)))
        return hmac.compare_digest(a, b)


@pytest.fixture
def counting(monkeypatch):
    counter = CountingCompare()
    monkeypatch.setattr(auth, "hmac", types.SimpleNamespace(compare_digest=counter.compare_digest))
    return counter


@pytest.mark.parametrize("mode", ["bearer", "basic", "key"])
def test_missing_malformed_and_wrong_credentials_get_401_and_nothing_is_stored(tmp_path, mode):
    app, inbox = make_app(tmp_path, mode)
    client = app.test_client()
    body = sample_text("th5-case-create.json")
    for header in REJECTED[mode]:
        headers = {} if header is None else {"Authorization": header}
        response = client.post("/cases", data=body, headers=headers)
        assert response.status_code == 401, (mode, header, response.json)
        assert response.json == {"status": "error", "error": "authentication required"}
    assert inbox.db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 0
    response = client.post("/cases", data=body, headers={"Authorization": ACCEPTED[mode]})
    assert response.status_code == 200 and response.json["status"] == "queued"


@pytest.mark.parametrize("mode", ["bearer", "key"])
def test_every_token_failure_takes_the_same_comparison_path(tmp_path, counting, mode):
    """A wrong token of the right length, one of the wrong length, a missing header, any malformed
    header and the right token: each makes exactly one constant-time comparison against the secret."""
    app, _ = make_app(tmp_path, mode)
    client = app.test_client()
    prefix = "Bearer " if mode == "bearer" else ""
    cases = {"wrong, right length": prefix + WRONG_SAME_LENGTH, "wrong, wrong length": prefix + "short",
             "missing": None, **{f"malformed {i}": h for i, h in enumerate(REJECTED[mode]) if h is not None},
             "right": ACCEPTED[mode]}
    counts = {}
    for name, header in cases.items():
        counting.calls.clear()
        client.post("/cases", data=b"{}", headers={} if header is None else {"Authorization": header})
        counts[name] = len(counting.calls)
        assert all(secret == WEBHOOK_TOKEN.encode() for _, secret in counting.calls), name
    assert set(counts.values()) == {1}, counts
    # The right-length and wrong-length guesses are both compared in full, not refused on length first.
    counting.calls.clear()
    client.post("/cases", data=b"{}", headers={"Authorization": prefix + WRONG_SAME_LENGTH})
    client.post("/cases", data=b"{}", headers={"Authorization": prefix + "short"})
    assert [a for a, _ in counting.calls] == [WRONG_SAME_LENGTH.encode(), b"short"]


def test_basic_compares_user_and_password_even_when_the_user_is_wrong(tmp_path, counting):
    app, _ = make_app(tmp_path, "basic")
    client = app.test_client()
    cases = {"wrong user": basic("intruder", BASIC_PASSWORD), "wrong password": basic(USER, "x" * 19),
             "both wrong": basic("intruder", "guess"), "missing": None, "not base64": "Basic %%%%",
             "wrong scheme": f"Bearer {WEBHOOK_TOKEN}", "right": ACCEPTED["basic"],
             **{f"malformed {i}": h for i, h in enumerate(REJECTED["basic"]) if h is not None}}
    for name, header in cases.items():
        counting.calls.clear()
        client.post("/cases", data=b"{}", headers={} if header is None else {"Authorization": header})
        secrets = [secret for _, secret in counting.calls]
        assert secrets == [USER.encode(), BASIC_PASSWORD.encode()], (name, counting.calls)
    counting.calls.clear()
    client.post("/cases", data=b"{}", headers={"Authorization": basic("intruder", BASIC_PASSWORD)})
    assert counting.calls == [(b"intruder", USER.encode()), (BASIC_PASSWORD.encode(), BASIC_PASSWORD.encode())]


# --------------------------------------------------------------------------- shared helpers

class Trap:
    """A loopback TCP server that counts every connection made to it (HTTP, CONNECT, anything)."""

    def __init__(self) -> None:
        self.hits: List[bytes] = []
        trap = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(2)
                try:
                    head = self.request.recv(4096)
                except OSError:
                    head = b""
                trap.hits.append(head)
                try:
                    self.request.sendall(b"HTTP/1.1 418 Trap\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Trap":
        self.thread.start()
        # The trap sees a direct fetch and one through it as a proxy (no name is resolved for that).
        requests.get(self.url + "/self-test", timeout=5)
        requests.get("http://bait.invalid/self-test", proxies={"http": self.url}, timeout=5)
        assert len(self.hits) == 2 and b"bait.invalid" in self.hits[1], self.hits
        self.hits.clear()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def simulators():
    tq = ThreatQSimulator(users={EMAIL: PASSWORD}, client_secrets={"tq-client-id": CLIENT_SECRET})
    hive = TheHiveSimulator(api_key=HIVE_KEY)
    issued: List[str] = []
    original = tq._issue

    def issue() -> dict:  # every token ThreatQ ever hands out, refreshed or not
        body = original()
        issued.extend([body["access_token"], body["refresh_token"]])
        return body

    tq._issue = issue
    tq.issued = issued
    with LoopbackServer(tq.app) as tq_server, LoopbackServer(hive.app) as hive_server:
        tq.url, hive.url = tq_server.url, hive_server.url
        yield tq, hive


def daemon_env(trap: Trap, **extra: str) -> Dict[str, str]:
    """The environment of a daemon under test: anything it would fetch from a non-loopback host goes
    through the trap (a proxy that answers nothing), so a test can never reach beyond this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQ_MW_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(HTTP_PROXY=trap.url, HTTPS_PROXY=trap.url, ALL_PROXY=trap.url, NO_PROXY="127.0.0.1,localhost",
               **extra)
    return env


def run_cli(args: List[str], env: Dict[str, str], stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tq_mw_thehive", *args], input=stdin, capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def status(config_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "tq_mw_thehive", "status", "-c", str(config_dir), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def drained(config_dir: Path, timeout: float = 45) -> dict:
    return wait_for(lambda: (s := status(config_dir))["pending"] == 0 and s, timeout, "the inbox to drain", 0.2)


def post(daemon: Daemon, payload, headers=BEARER) -> requests.Response:
    data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
    return requests.post(daemon.url + "/cases", data=data, headers=headers, timeout=15)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def set_config(config_dir: Path, **sections) -> None:
    path = config_dir / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))


# --------------------------------------------------------------------------- no secret in any log

LEAKY_PLUGIN = '''
"""A careless plugin: it logs its key and puts it in its error (the redactor must catch both)."""
import logging
from tq_mw_thehive.enrichment.plugin import PluginError

NAME = "leaky"
TITLE = "Leaky"
VERSION = "1"
DESCRIPTION = "logs its own key"
DATA_TYPES = ("ip", "hash", "url", "domain", "fqdn", "hostname", "mail")
EXTERNAL = False
ACTIVE = False
API_KEYS = {"LEAKY": "https://example.invalid/signup"}


def lookup(request):
    key = request.keys["LEAKY"]
    logging.getLogger("leaky").warning("looking up %s with key=%s (Authorization: Bearer %s)",
                                       request.value, key, key)
    raise PluginError(f"upstream refused key {key}")
'''


@pytest.mark.e2e
def test_no_secret_reaches_any_log_or_console_at_verbosity_3(tmp_path, simulators):
    tq, hive = simulators
    config_dir, logs = tmp_path / "etc", tmp_path / "logs"
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "leaky.py").write_text(LEAKY_PLUGIN)
    case = hive.add_case(title="Fetched from TheHive with the API key", tlp=2, pap=2)
    outputs: List[str] = []
    with Trap() as trap:
        env = daemon_env(trap)
        # 1. configure: the password grant, then the TheHive key and the webhook secret are written.
        result = run_cli(["configure", "-c", str(config_dir), "-ll", str(logs / "configure"), "-v", "3",
                          "--threatq-host", tq.url, "--client-id", tq.client_id, "--email", EMAIL,
                          "--thehive-url", hive.url, "--webhook-token", WEBHOOK_TOKEN],
                         {**env, "TQ_MW_THREATQ_PASSWORD": PASSWORD, "TQ_MW_THEHIVE_API_KEY": HIVE_KEY})
        # Not a terminal and no --show-secrets: the printed TheHive setup masks the webhook secret too.
        assert "webhook" in result.stdout and "********" in result.stdout
        outputs += [result.stdout, result.stderr]
        # 2. a plugin key stored with `keys set`, another from the environment.
        result = run_cli(["keys", "set", "VIRUSTOTAL", "-c", str(config_dir)], env, stdin=VT_KEY + "\n")
        outputs += [result.stdout, result.stderr]
        result = run_cli(["keys", "list", "-c", str(config_dir)], {**env, "TQ_MW_KEY_LEAKY": LEAKY_KEY})
        assert "VIRUSTOTAL" in result.stdout and "LEAKY" in result.stdout
        outputs += [result.stdout, result.stderr]
        set_config(config_dir, enrichment={"plugin_dirs": [str(plugin_dir)]})

        # 3. the daemon at verbosity 3: samples, a fetch from TheHive, a wrong token, a token refresh.
        daemon = Daemon(config_dir, logs / "daemon", env={**env, "TQ_MW_KEY_LEAKY": LEAKY_KEY})
        try:
            daemon.start()
            for name in SAMPLE_NAMES:
                assert post(daemon, sample_text(name)).status_code == 200, name
            fetched = {"_id": "~sec-fetch", "_type": "Audit", "action": "update", "objectType": "Case",
                       "objectId": case["_id"], "_createdAt": int(time.time() * 1000), "details": {}}
            assert post(daemon, fetched).json()["status"] == "queued"
            for header in (f"Bearer {WEBHOOK_TOKEN[::-1]}", WEBHOOK_TOKEN, f"Basic {WEBHOOK_TOKEN}",
                           f"Bearer {WEBHOOK_TOKEN}-wrong"):
                assert post(daemon, sample_text("th5-case-create.json"),
                            {"Authorization": header}).status_code == 401
            assert drained(config_dir)["dead"] == 0, daemon.log_text()[-3000:]
            tq.expire_all_tokens()  # the next call gets a 401: the daemon refreshes and stores new tokens
            later = sample("th5-case-create.json")
            later["_id"], later["objectId"], later["rootId"] = "~sec-after-refresh", "~sec-case-2", "~sec-case-2"
            later["object"]["_id"], later["_createdAt"] = "~sec-case-2", int(time.time() * 1000)
            assert post(daemon, later).json()["status"] == "queued"
            assert drained(config_dir)["dead"] == 0, daemon.log_text()[-3000:]
        finally:
            daemon.stop()

        # 4. the client-credentials variant: configure with a client secret, then serve with it.
        result = run_cli(["configure", "-c", str(config_dir), "-ll", str(logs / "configure2"), "-v", "3"],
                         {**env, "TQ_MW_THREATQ_CLIENT_SECRET": CLIENT_SECRET})
        outputs += [result.stdout.replace(WEBHOOK_TOKEN, "<the webhook secret, shown on purpose>"), result.stderr]
        assert yaml.safe_load((config_dir / "config.yaml").read_text())["threatq"]["client_secret"] == CLIENT_SECRET
        second = Daemon(config_dir, logs / "daemon2", env={**env, "TQ_MW_KEY_LEAKY": LEAKY_KEY})
        try:
            second.start()
            update = sample("th5-observable-update-ioc.json")
            update["_id"] = "~sec-client-credentials"
            assert post(second, update).json()["status"] == "queued"
            assert drained(config_dir)["dead"] == 0, second.log_text()[-3000:]
        finally:
            second.stop()
        assert trap.hits == [], trap.hits  # nothing tried to leave this machine

    # Every secret was really in play...
    text = daemon.log_text()
    assert "refreshed the ThreatQ access token" in text
    assert "outcome=unauthorized" in text and "outcome=synced" in text
    assert re.search(r"enrichment leaky \S+ value=.* outcome=error", text)
    assert any(path.startswith("/api/v1/") for _, path in hive.requests)
    tokens = json.loads((config_dir / "threatq_tokens.json").read_text())
    assert tokens["access_token"] in tq.issued and tokens["refresh_token"] in tq.issued
    assert len(tq.issued) >= 6  # password grant, refresh, client credentials (and their refresh tokens)
    # ...and none of them is in any log file, console capture or command output.
    secrets = {"webhook token": WEBHOOK_TOKEN, "ThreatQ password": PASSWORD, "client secret": CLIENT_SECRET,
               "TheHive key": HIVE_KEY, "VirusTotal key": VT_KEY, "plugin key from env": LEAKY_KEY,
               "stored access token": tokens["access_token"], "stored refresh token": tokens["refresh_token"],
               **{f"issued token {i}": t for i, t in enumerate(tq.issued)}}
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"tq_mw_thehive.log", "console.txt"}
    everything = {str(p): p.read_text(errors="replace") for p in files}
    everything.update({f"command output {i}": out for i, out in enumerate(outputs)})
    assert "DEBUG" in everything[str(logs / "daemon" / "tq_mw_thehive.log")]
    leaks = [(what, where) for where, content in everything.items() for what, secret in secrets.items()
             if secret in content]
    assert leaks == []


# --------------------------------------------------------------------------- private files

def umask_zero_env(trap: Trap, tq, hive) -> Dict[str, str]:
    return daemon_env(trap, TQ_MW_THREATQ_HOST=tq.url, TQ_MW_THREATQ_CLIENT_ID=tq.client_id,
                      TQ_MW_THREATQ_EMAIL=EMAIL, TQ_MW_THREATQ_PASSWORD=PASSWORD, TQ_MW_THEHIVE_URL=hive.url,
                      TQ_MW_THEHIVE_API_KEY=HIVE_KEY, TQ_MW_WEBHOOK_TOKEN=WEBHOOK_TOKEN)


def start_with_umask(daemon: Daemon, umask: int) -> Daemon:
    old = os.umask(umask)  # inherited by the daemon: no file may rely on a kind umask
    try:
        return daemon.start()
    finally:
        os.umask(old)


def assert_private(config_dir: Path, names) -> None:
    for name in names:
        assert (config_dir / name).exists(), name
    loose = {p.name: oct(mode(p)) for p in config_dir.iterdir() if p.is_file() and mode(p) & 0o077}
    assert loose == {}, f"readable or writable by others: {loose}"
    for name in names:
        assert mode(config_dir / name) == 0o600, (name, oct(mode(config_dir / name)))


SECRET_FILES = ("config.yaml", "threatq_tokens.json")
STATE_FILES = ("tq_mw_thehive.db", "tq_mw_thehive.db-wal", "tq_mw_thehive.db-shm")


@pytest.mark.e2e
def test_configure_and_the_daemon_create_every_secret_file_0600_even_with_umask_0(tmp_path, simulators):
    tq, hive = simulators
    configured, first_start = tmp_path / "configured", tmp_path / "first-start"
    with Trap() as trap:
        env = umask_zero_env(trap, tq, hive)
        # `configure`, under umask 000.
        result = subprocess.run([sys.executable, "-m", "tq_mw_thehive", "configure", "-c", str(configured)],
                                capture_output=True, text=True, timeout=60, env=env, umask=0)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_private(configured, SECRET_FILES)
        # Its first daemon start creates the state database (WAL: -wal and -shm while it runs).
        daemon = Daemon(configured, tmp_path / "logs-configured", env=env)
        try:
            start_with_umask(daemon, 0)
            assert post(daemon, sample_text("th5-case-create.json")).status_code == 200
            assert_private(configured, SECRET_FILES + STATE_FILES)
        finally:
            daemon.stop()
        # The daemon's very first start, no config.yaml yet: it configures from TQ_MW_*, then serves.
        daemon = Daemon(first_start, tmp_path / "logs-first-start", env=env)
        try:
            start_with_umask(daemon, 0)
            assert post(daemon, sample_text("th5-case-create.json")).status_code == 200
            assert_private(first_start, SECRET_FILES + STATE_FILES)
        finally:
            daemon.stop()
        assert trap.hits == []
    assert "is readable by other users" not in daemon.log_text()


@pytest.mark.e2e
def test_a_config_readable_by_others_is_named_in_a_warning_with_the_chmod_hint(tmp_path):
    path = write_config(tmp_path)
    path.chmod(0o644)
    daemon = Daemon(tmp_path, tmp_path / "logs", workers=1)
    try:
        daemon.start()
    finally:
        daemon.stop()
    log = daemon.log_text()
    warning = re.search(r"WARNING .*: (\S+) is readable by other users; run: chmod 600 (\S+)", log)
    assert warning, log[-3000:]
    assert Path(warning.group(1)).resolve() == path.resolve() == Path(warning.group(2)).resolve()
    assert "tq_mw_thehive.db is readable" not in log  # the files it creates itself are private
    assert mode(path) == 0o644  # warned about, not changed behind the operator's back


# --------------------------------------------------------------------------- loopback by default

def test_the_default_listener_is_loopback_in_the_options_and_the_help():
    assert cli.Options().listen().ip == "127.0.0.1"
    assert cli.DEFAULT_LISTENER == "127.0.0.1"
    result = CliRunner().invoke(cli.cli, ["--help"])
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    assert "-li, --listener-ip IP Listening address (default 127.0.0.1)." in help_text
    result = CliRunner().invoke(cli.cli, ["configure", "--help"])
    assert "Listening address (default 127.0.0.1)." in " ".join(result.output.split())


def listening_addresses(port: int) -> List[str]:
    """The local addresses of the LISTEN sockets on ``port`` (IPv4 and IPv6), from /proc."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_a_daemon_started_without_li_binds_127_0_0_1_only(tmp_path):
    write_config(tmp_path)
    daemon = Daemon(tmp_path, tmp_path / "logs", workers=1)
    daemon.command = lambda: [sys.executable, "-m", "tq_mw_thehive", "-c", str(tmp_path), "-ll",
                              str(daemon.log_dir), "-v", "3", "-p", "0", "-w", "1"]
    assert "-li" not in daemon.command()
    daemon.spawn()
    try:
        def ready():
            assert daemon.proc.poll() is None, daemon.log_text()
            return re.search(r"ready listening=(\S+):(\d+)", daemon.log_text())

        match = wait_for(ready, 60, "the ready line")
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        assert re.search(r"starting listen=127\.0\.0\.1:0 ", daemon.log_text())
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and nothing else
        daemon.port = port
        wait_for(lambda: daemon._healthy(), 30, "/healthz")
    finally:
        daemon.stop()


# --------------------------------------------------------------------------- no URL from a payload is fetched

def bait_urls(trap: Trap, label: str) -> List[str]:
    return [f"{trap.url}/{label}", f"http://localhost:{trap.port}/{label}?x=1",
            f"http://127.0.0.1:{trap.port}/{label}/image.png", f"https://127.0.0.1:{trap.port}/{label}"]


def baited_events(trap: Trap) -> List[dict]:
    """Cases and observables whose every URL-looking field points at the trap."""
    case = sample("th5-case-create.json")
    urls = bait_urls(trap, "case")
    for obj in (case["object"], case["details"], case["context"]):
        obj["description"] = f"See {urls[0]} and <img src=\"{urls[2]}\"> and [link]({urls[1]})"
        obj.update(url=urls[0], link=urls[1], href=urls[1], callbackUrl=urls[3], attachment={"url": urls[2]},
                   customFields=[{"name": "reference", "value": urls[0], "type": "url"}],
                   extraData={"webhook": urls[3], "links": urls})
    case["url"], case["callback"], case["_links"] = urls[0], urls[3], {"self": urls[1]}

    events = [case]
    observable_base = sample("th5-observable-create-ip.json")
    values = [("url", f"{trap.url}/observable?download=1"), ("url", f"http://localhost:{trap.port}/o2"),
              ("domain", "localhost"), ("fqdn", "localhost"), ("ip", "127.0.0.1"), ("uri_path", "/trap"),
              ("other", f"{trap.url}/other"), ("mail", "trap@localhost"), ("hash", "0" * 64),
              ("file", None)]
    for i, (data_type, data) in enumerate(values):
        event = copy.deepcopy(observable_base)
        event["_id"], event["objectId"] = f"~trap-{i}", f"~trap-obs-{i}"
        urls = bait_urls(trap, f"observable-{i}")
        for obj in (event["object"], event["details"], event["context"]):
            obj["_id"], obj["dataType"], obj["data"] = f"~trap-obs-{i}", data_type, data
            obj.update(tlp=0, tlpLabel="WHITE", pap=0, papLabel="WHITE", message=f"fetch me: {urls[0]}",
                       tags=[urls[1], "trap"], reports={"Cortex_1_0": {"url": urls[2], "taxonomies": []}},
                       url=urls[0], externalLink=urls[3], extraData={"href": urls[1]})
            if data_type == "file":
                obj["attachment"] = {"name": "invoice.pdf.exe", "id": "att-1", "size": 1234,
                                     "contentType": "application/octet-stream",
                                     "hashes": ["a" * 64, "b" * 40, "c" * 32],
                                     "url": f"{trap.url}/attachment/att-1", "downloadUrl": urls[2]}
            else:
                obj["attachment"] = {"url": urls[2]}
        events.append(event)
    th4 = sample("th4-case-artifact-create.json")
    th4["requestId"] = "trap-th4"
    for obj in (th4["object"], th4["details"]):
        obj.update(dataType="url", data=f"{trap.url}/th4", tlp=0, message=f"{trap.url}/message",
                   attachment={"url": f"{trap.url}/th4-attachment"})
    events.append(th4)
    return events


@pytest.mark.e2e
def test_no_url_from_a_payload_is_ever_fetched_by_the_daemon(tmp_path, simulators):
    tq, hive = simulators
    with Trap() as trap:
        write_config(tmp_path, threatq={"host": tq.url, "client_id": tq.client_id},
                     thehive={"url": hive.url, "api_key": HIVE_KEY},
                     enrichment={"enabled": True, "max_tlp_external": "RED", "max_pap_active": "RED"})
        tq_auth.save_tokens(tmp_path, tq_auth.password_grant(tq.url, tq.client_id, EMAIL, PASSWORD))
        daemon = Daemon(tmp_path, tmp_path / "logs", env=daemon_env(trap))
        try:
            daemon.start()
            for event in baited_events(trap):
                response = post(daemon, event)
                assert response.status_code == 200 and response.json()["status"] == "queued", response.text
            assert drained(tmp_path)["dead"] == 0, daemon.log_text()[-4000:]
            time.sleep(0.5)  # anything fired off in the background would have arrived by now
        finally:
            daemon.stop()
        assert trap.hits == [], trap.hits
    log = daemon.log_text()
    # The events were really processed: the URL and the file's hashes are indicators, enriched offline.
    (indicator,) = tq.find_indicators(f"{trap.url}/observable?download=1", "URL")
    assert tq.find_indicators("a" * 64, "SHA-256") and tq.find_indicators("invoice.pdf.exe", "Filename")
    assert tq.find_indicators(f"{trap.url}/th4", "URL")
    assert re.search(r"sync audit=~trap-0 .*outcome=synced .*enrichment \d+ not_found, 3 skipped", log), log
    (loopback,) = tq.find_indicators("127.0.0.1", "IP Address")
    scope = {a["name"]: a["value"] for a in tq.attributes_of("indicators", loopback["id"])}
    assert scope.get("IP Scope") == "loopback", scope  # the offline plugins ran
    assert "missing key: VIRUSTOTAL" in log and "missing key: URLHAUS" in log  # the online ones could not
    assert indicator["id"]
    assert all(not path.startswith(("/case", "/observable", "/attachment")) for _, path in hive.requests)
