"""``tq-mw-thehive check``: everything a working daemon depends on, one line each, with the fix.

A misconfiguration otherwise shows up hours later as a dead letter or as webhooks that never
arrive. Each check is a small function that returns a ``Result``; checks that need an earlier
one (the lookups need ThreatQ authentication, everything needs the config) are skipped, not
failed, when it failed, so the first red line is the one to fix. The webhook check posts a
self-test event to the running daemon exactly as TheHive would (same ``Authorization``), sees
it committed to the state database and deletes it again (``events.SELF_TEST_OBJECT_TYPE``): the
daemon stores such an event already done, so no worker ever sends it to ThreatQ.
"""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import requests

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, startup, state, state_postgres
from tq_mw_thehive.config import Config
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.thehive import events
from tq_mw_thehive.thehive.api import TheHiveError
from tq_mw_thehive.threatq import auth as tq_auth
from tq_mw_thehive.services import Services
from tq_mw_thehive.threatq.api import OPTIONAL_STEPS, ThreatQClient, ThreatQError

WEBHOOK_TIMEOUT_S = (3.0, 15.0)
MARKS = {"ok": "✔", "fail": "✘", "skip": "–", "arrow": "→"}
ASCII_MARKS = {"ok": "[ok]", "fail": "[FAIL]", "skip": "[skip]", "arrow": "->"}


@dataclass(frozen=True)
class Result:
    """One check's outcome: ``fix`` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: Optional[str] = None
    skipped: bool = False


@dataclass
class Context:
    """What the checks share: the command line, and what earlier checks found."""

    config_dir: Path
    log_dir: Optional[Path]
    webhook_url: Optional[str]
    use_proxy: bool = False
    disable_ssl: bool = False
    cfg: Optional[Config] = None
    tq: Optional[ThreatQClient] = None
    _services: Optional[Services] = field(default=None, repr=False)

    @property
    def services(self) -> Services:
        """The collaborators of the loaded config (the checks that use it run after ``config``)."""
        assert self.cfg is not None
        if self._services is None or self._services.cfg is not self.cfg:
            self._services = Services(self.cfg)
        return self._services


Check = Callable[[Context], Result]


def _ok(name: str, detail: str) -> Result:
    return Result(name, True, detail)


def _fail(name: str, detail: str, fix: str) -> Result:
    return Result(name, False, detail, fix)


def _skip(name: str, why: str) -> Result:
    return Result(name, True, why, skipped=True)


def _configure_hint(ctx: Context) -> str:
    return f"`tq-mw-thehive configure -c {ctx.config_dir}`"


# --------------------------------------------------------------------------------- the checks

def check_config(ctx: Context) -> Result:
    name = "config"
    path = config_mod.config_path(ctx.config_dir)
    try:
        ctx.cfg = startup.load_config(ctx.config_dir, use_proxy=ctx.use_proxy, disable_ssl=ctx.disable_ssl)
    except startup.StartupError as exc:
        fix = (f"run {_configure_hint(ctx)}" if not path.exists()
               else f"correct the key the message names in {path}")
        return _fail(name, str(exc), fix)
    return _ok(name, f"ok ({path})")


def _answered_unavailable(exc: ThreatQError) -> Optional[int]:
    """The HTTP status when ThreatQ answered but could not serve (5xx, 429), else None.

    Such an answer says nothing about the credentials: calling it an authentication failure
    would send the operator to re-run ``configure`` while ThreatQ itself is what is down.
    """
    status = getattr(exc, "status", None)
    return status if status is not None and (status >= 500 or status == 429) else None


def _threatq_fix(ctx: Context, exc: ThreatQError) -> str:
    cfg = ctx.cfg
    assert cfg is not None
    status = getattr(exc, "status", None)
    if _answered_unavailable(exc) is not None:
        return (f"retry later: ThreatQ at {cfg.threatq.base_url} answers, but with HTTP {status}; "
                "if it lasts, check ThreatQ's health (its services, database, disk and its own logs)")
    if status is None and "unavailable after" in str(exc):
        return (f"check that ThreatQ answers at {cfg.threatq.base_url} from this host (threatq.host; "
                "-ep to go through threatq.proxy; -ds for a self-signed certificate)")
    if status == 403:
        return "give the ThreatQ user or client read access to the indicator and event settings"
    if cfg.threatq.client_secret:
        return "check threatq.client_id and threatq.client_secret (an OAuth client with the client-credentials grant)"
    return f"sign in again: {_configure_hint(ctx)} (the stored tokens are missing, expired or refused)"


def _threatq_failed(name: str, ctx: Context, exc: ThreatQError) -> Result:
    """A failed ThreatQ call: "ThreatQ unavailable (HTTP 503)" first when that is what it was."""
    status = _answered_unavailable(exc)
    detail = f"ThreatQ unavailable (HTTP {status}), not a credentials problem: {exc}" if status else str(exc)
    return _fail(name, detail, _threatq_fix(ctx, exc))


def check_threatq_auth(ctx: Context) -> Result:
    name = "threatq auth"
    cfg = ctx.cfg
    if cfg is None:
        return _skip(name, "skipped: needs a valid config")
    client = ctx.services.threatq(attempts=2, max_wait_s=1.0)
    before = None
    if not cfg.threatq.client_secret:
        try:
            before = tq_auth.load_tokens(cfg.config_dir)
        except tq_auth.ThreatQAuthError as exc:
            return _fail(name, str(exc), f"run {_configure_hint(ctx)}")
        if before is None:
            return _fail(name, f"no ThreatQ tokens in {tq_auth.token_path(cfg.config_dir)}",
                         f"run {_configure_hint(ctx)} (it signs in once and stores the tokens)")
    try:
        client.request("GET", "/api/indicator/statuses", params={"limit": 1})
    except ThreatQError as exc:
        return _threatq_failed(name, ctx, exc)
    ctx.tq = client
    if cfg.threatq.client_secret:
        return _ok(name, "ok (client credentials accepted)")
    try:
        after = tq_auth.load_tokens(cfg.config_dir)
    except tq_auth.ThreatQAuthError:
        after = None
    if after is not None and before is not None and after.access_token != before.access_token:
        return _ok(name, "ok (token refreshed)")
    minutes = max(0, int(((after or before).expires_at - time.time()) // 60))
    return _ok(name, f"ok (stored token accepted, valid {minutes} min more; it refreshes itself)")


def _missing_name(exc: ThreatQError) -> bool:
    return str(exc).startswith("ThreatQ has no ")


def _known_names(exc: ThreatQError) -> str:
    return str(exc).partition("(it has: ")[2].rstrip(")")


def check_indicator_types(ctx: Context) -> Result:
    name = "indicator types"
    if ctx.cfg is None or ctx.tq is None:
        return _skip(name, "skipped: needs ThreatQ authentication")
    sync = ctx.cfg.sync
    wanted = sorted(ctx.services.types.indicator_types())
    missing = []
    for type_name in wanted:
        try:
            ctx.tq.indicator_type_id(type_name)
        except ThreatQError as exc:
            if not _missing_name(exc):
                return _threatq_failed(name, ctx, exc)
            missing.append(type_name)
    which = "custom (sync.type_mapping)" if sync.custom_mapping else "default"
    if missing:
        fix = ("create them in ThreatQ, or change their lines in sync.type_mapping" if sync.custom_mapping else
               "create them in ThreatQ, or set sync.custom_mapping: true with a sync.type_mapping that "
               "names types ThreatQ has")
        return _fail(name, f"{', '.join(json.dumps(m) for m in missing)} not found in ThreatQ "
                           f"({which} mapping)", fix)
    return _ok(name, f"ok (all {len(wanted)} types of the {which} mapping exist)")


def _name_exists(name: str, lookup: Callable[[str], int], wanted: str, fix: str, ctx: Context) -> Result:
    """One ThreatQ name → id look-up: ok, or the fix listing the names the instance has."""
    try:
        lookup(wanted)
    except ThreatQError as exc:
        if not _missing_name(exc):
            return _threatq_failed(name, ctx, exc)
        known = _known_names(exc)
        return _fail(name, f"{json.dumps(wanted)} not found in ThreatQ", fix + (f": {known}" if known else ""))
    return _ok(name, f"ok ({json.dumps(wanted)})")


def check_indicator_status(ctx: Context) -> Result:
    name = "indicator status"
    if ctx.cfg is None or ctx.tq is None:
        return _skip(name, "skipped: needs ThreatQ authentication")
    return _name_exists(name, ctx.tq.indicator_status_id, ctx.cfg.sync.indicator_status,
                        "set sync.indicator_status to a status ThreatQ has", ctx)


def check_event_type(ctx: Context) -> Result:
    name = "event type"
    if ctx.cfg is None or ctx.tq is None:
        return _skip(name, "skipped: needs ThreatQ authentication")
    if ctx.cfg.sync.cases_as == "incident":
        return _skip(name, "not used: sync.cases_as is incident")
    return _name_exists(name, ctx.tq.event_type_id, ctx.cfg.sync.event_type,
                        "create the event type in ThreatQ, or set sync.event_type to one it has", ctx)


def check_incident_object(ctx: Context) -> Result:
    name = "incident object"
    if ctx.cfg is None or ctx.tq is None:
        return _skip(name, "skipped: needs ThreatQ authentication")
    if ctx.cfg.sync.cases_as != "incident":
        return _skip(name, f"not used: sync.cases_as is {ctx.cfg.sync.cases_as}")
    try:
        present = ctx.tq.has_collection("incident")
    except ThreatQError as exc:
        return _threatq_failed(name, ctx, exc)
    if not present:
        return _fail(name, "ThreatQ has no incident object (GET /api/objects does not list it)",
                     "enable the Incident custom object in ThreatQ, or set sync.cases_as: event")
    return _ok(name, "ok (sync.cases_as: incident)")


STEP_NAMES = [f"step {step}" for step in OPTIONAL_STEPS]


def check_threatq_steps(ctx: Context) -> List[Result]:
    """One line per optional ThreatQ step: served or not, probed now where a read-only probe
    exists, else as the daemon learned it. Optional steps never fail the check: the line says
    what the daemon does without the step."""
    from tq_mw_thehive.sync_state import threatq_capabilities
    from tq_mw_thehive.threatq import capabilities

    if ctx.cfg is None or ctx.tq is None:
        return [_skip(name, "skipped: needs ThreatQ authentication") for name in STEP_NAMES]
    collections = ["indicators", "incident" if ctx.cfg.sync.cases_as == "incident" else "events"]
    try:
        probes = capabilities.probe(ctx.tq, collections)
    except ThreatQError as exc:
        return [_threatq_failed(name, ctx, exc) for name in STEP_NAMES]
    try:
        learned = threatq_capabilities(ctx.cfg.state_db) \
            if state.is_shared(ctx.cfg.state_db) or Path(ctx.cfg.state_db).exists() else {}
    except sqlite3.Error:
        learned = {}  # the state db check says what is wrong with it
    return [Result(f"step {r.step}", True, f"{r.state}: {r.label}; {r.detail}", skipped=r.state == "unknown")
            for r in capabilities.reports(learned, probes)]


def check_thehive_api(ctx: Context) -> Result:
    name = "thehive api"
    cfg = ctx.cfg
    if cfg is None:
        return _skip(name, "skipped: needs a valid config")
    org = f" in organisation {cfg.thehive.organisation}" if cfg.thehive.organisation else ""
    key_fix = (f"set thehive.api_key to the API key of a TheHive user that can read cases{org} "
               "(catch-up, backfill and case re-reads use it)")
    if not cfg.thehive.api_key:
        return _fail(name, "thehive.api_key is not set", key_fix)
    client = ctx.services.thehive(attempts=2, max_wait_s=0.5, page_size=1)
    try:
        next(iter(client.iter_cases()), None)
    except TheHiveError as exc:
        text = str(exc)
        if "HTTP 401" in text or "HTTP 403" in text:
            # TheHive answers 401 both for a bad key and for a user outside thehive.organisation.
            org_too = "HTTP 403" in text or bool(cfg.thehive.organisation)
            fix = key_fix + (" (and thehive.organisation to one it belongs to)" if org_too else "")
        else:
            fix = (f"check that TheHive answers at {cfg.thehive.url} from this host (thehive.url; "
                   "-ds or thehive.verify_ssl: false for a self-signed certificate)")
        return _fail(name, text, fix)
    return _ok(name, f"ok (API key accepted{org})")


def _state_db_fix(text: str) -> str:
    if "not a database" in text or "malformed" in text or "quick_check" in text:
        return ("the file is damaged: stop the daemon and restore a backup, or move the file away "
                "(the daemon creates a new one; the events in it are lost)")
    if "newer than this version" in text:
        return "upgrade tq-mw-thehive to the version that wrote the database"
    return "give the daemon's user write access to the file and its directory, or set state_db in config.yaml"


def check_state_db(ctx: Context) -> Result:
    name = "state db"
    cfg = ctx.cfg
    if cfg is None:
        return _skip(name, "skipped: needs a valid config")
    path = cfg.state_db
    if state.is_shared(path):
        return _check_shared_state(name, path)
    if not path.exists():
        parent = path.parent
        if not parent.is_dir():
            return _fail(name, f"{path}: directory {parent} does not exist",
                         f"create it (mkdir -p {parent}) or set state_db in config.yaml")
        if not os.access(parent, os.W_OK | os.X_OK):
            return _fail(name, f"{path}: cannot create files in {parent}", _state_db_fix(""))
        return _ok(name, f"ok ({path} does not exist yet: the daemon creates it at start)")
    try:
        inbox = Inbox.open(path)  # migrates as the daemon would at start
        try:
            verdict = inbox.db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict}")
            inbox.check_writable()
            counts = inbox.stats()
        finally:
            inbox.close()
    except (state.StateError, sqlite3.Error, OSError) as exc:
        text = str(exc) if str(exc).startswith("state database") else f"state database {path}: {exc}"
        return _fail(name, text, _state_db_fix(text))
    return _ok(name, f"ok ({path}: writable, {_backlog(counts)})")


def _check_shared_state(name: str, url: Any) -> Result:
    """``check`` of a PostgreSQL state: reachable, migrated, a write commits."""
    try:
        inbox = Inbox.open(url)
        inbox.check_writable()
        counts = inbox.stats()
        server = state_postgres.describe(url)
    except (state.StateError, sqlite3.Error) as exc:
        text = str(exc) if str(exc).startswith("state database") else f"state database {url}: {exc}"
        return _fail(name, text, "check that PostgreSQL is up and reachable from this host, that the "
                     "database exists and that the user in state_db may create tables in it")
    return _ok(name, f"ok ({url}: PostgreSQL {server['server_version']}, writable, {_backlog(counts)})")


def _backlog(counts: Dict[str, Any]) -> str:
    """The inbox figures the state db line ends with, whichever engine holds it."""
    dead = f", {counts['dead']} dead (see `tq-mw-thehive status`, then `replay`)" if counts["dead"] else ""
    return f"{counts['pending']} pending{dead}"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_log_dir(ctx: Context) -> Result:
    name = "log dir"
    log_dir = ctx.log_dir
    if log_dir is None:
        return _ok(name, "ok (no -ll given: the daemon logs to the console)")
    fix = f"give the daemon's user write access to {log_dir}, or pass -ll a directory it can write"
    if not log_dir.exists():
        base = _nearest_existing(log_dir)
        if not base.is_dir():
            return _fail(name, f"{log_dir}: {base} is not a directory", fix)
        if not os.access(base, os.W_OK | os.X_OK):
            return _fail(name, f"{log_dir} does not exist and cannot be created in {base}", fix)
        return _ok(name, f"ok ({log_dir} does not exist yet: the daemon creates it)")
    if not log_dir.is_dir():
        return _fail(name, f"{log_dir} is not a directory", fix)
    try:
        with tempfile.NamedTemporaryFile(dir=log_dir, prefix=".tq-mw-thehive-check-"):
            pass
        log_file = log_dir / logs.LOG_FILE
        if log_file.exists():
            with open(log_file, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        return _fail(name, f"cannot write in {log_dir}: {exc.strerror or exc}", fix)
    return _ok(name, f"ok ({log_dir / logs.LOG_FILE} is writable)")


def authorization_header(cfg: Config) -> Optional[str]:
    """``Authorization`` exactly as TheHive's endpoint ``auth`` block sends it (reference §1)."""
    hook = cfg.webhook
    if hook.auth == "bearer":
        return f"Bearer {hook.token}"
    if hook.auth == "key":
        return hook.token
    if hook.auth == "basic":
        pair = f"{hook.username}:{hook.password}".encode("utf-8")
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


def _post_self_test(ctx: Context, url: str, nonce: str) -> Tuple[Optional[requests.Response], Optional[Result]]:
    name = "webhook"
    cfg = ctx.cfg
    assert cfg is not None
    headers = {"Content-Type": "application/json"}
    header = authorization_header(cfg)
    if header is not None:
        headers["Authorization"] = header
    payload = events.self_test_payload(nonce, int(time.time() * 1000))
    start_hint = (f"start the daemon (`tq-mw-thehive -c {ctx.config_dir} ...` or its systemd unit), or give "
                  "check the daemon's -p/-li (or --webhook-url)")
    try:
        return requests.post(url, data=json.dumps(payload), headers=headers, timeout=WEBHOOK_TIMEOUT_S), None
    except requests.ConnectionError as exc:
        return None, _fail(name, f"nothing answers at {url} ({type(exc).__name__})", start_hint)
    except requests.Timeout:
        return None, _fail(name, f"{url} did not answer within {WEBHOOK_TIMEOUT_S[1]:g} s",
                           "see the daemon's log: it may be stuck or overloaded")
    except requests.RequestException as exc:
        return None, _fail(name, f"cannot post to {url}: {type(exc).__name__}", "check --webhook-url")


def check_webhook(ctx: Context) -> Result:
    name = "webhook"
    cfg = ctx.cfg
    if cfg is None:
        return _skip(name, "skipped: needs a valid config")
    url = ctx.webhook_url
    if not url:
        return _fail(name, "no port to reach the daemon on (-p 0)", "pass the running daemon's -p PORT")
    nonce = uuid.uuid4().hex
    started = time.monotonic()
    response, failed = _post_self_test(ctx, url, nonce)
    if failed is not None:
        return failed
    assert response is not None
    ms = (time.monotonic() - started) * 1000
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if response.status_code == 401:
        return _fail(name, f"the daemon at {url} refused the webhook credentials of config.yaml (HTTP 401)",
                     "restart the daemon so that it reads the current config.yaml, and check that it "
                     f"runs with -c {ctx.config_dir}")
    if response.status_code == 503:
        return _fail(name, f"the daemon at {url} cannot write its state database (HTTP 503)",
                     "see the state db line above and the daemon's log")
    if response.status_code != 200 or not isinstance(body, dict) or body.get("status") != "self-test":
        shown = body.get("error") or body.get("status") if isinstance(body, dict) else None
        return _fail(name, f"{url} answered HTTP {response.status_code}"
                           + (f" ({shown})" if shown else "") + " instead of storing the self-test",
                     "restart the daemon (an older version does not know the self-test), or check "
                     "-p/-li/--webhook-url: they must reach tq-mw-thehive's /cases")
    return _verify_and_remove(ctx, url, body.get("id"), nonce, ms)


def _verify_and_remove(ctx: Context, url: str, item_id: Any, nonce: str, ms: float) -> Result:
    name = "webhook"
    cfg = ctx.cfg
    assert cfg is not None
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        return _fail(name, f"{url} answered the self-test without an inbox id", "restart the daemon")
    inbox = ctx.services.inbox
    try:
        row = inbox.get(item_id)
        stored = (row is not None and row["object_type"] == events.SELF_TEST_OBJECT_TYPE
                  and f"self-test-{nonce}" in row["body"])
        removed = inbox.remove_self_test(item_id) if stored else False
        gone = inbox.get(item_id) is None if stored else False
    except sqlite3.Error as exc:
        return _fail(name, f"cannot read the self-test back from {cfg.state_db}: {exc}",
                     "see the state db line above")
    finally:
        inbox.close()
    if not stored:
        return _fail(name, f"the daemon at {url} stored the self-test, but not in {cfg.state_db}",
                     f"the daemon runs with another configuration: restart it with -c {ctx.config_dir}")
    if not (removed and gone):
        return _fail(name, f"the self-test row #{item_id} could not be removed from {cfg.state_db}",
                     "see the state db line above")
    return _ok(name, f"ok (self-test accepted at {url}, stored as inbox #{item_id} and removed; {ms:.0f} ms)")


CHECKS: Tuple[Tuple[str, Callable[[Context], Union[Result, List[Result]]]], ...] = (
    ("config", check_config),
    ("threatq auth", check_threatq_auth),
    ("indicator types", check_indicator_types),
    ("indicator status", check_indicator_status),
    ("event type", check_event_type),
    ("incident object", check_incident_object),
    ("threatq steps", check_threatq_steps),
    ("thehive api", check_thehive_api),
    ("state db", check_state_db),
    ("log dir", check_log_dir),
    ("webhook", check_webhook),
)


def _lines(check_name: str) -> List[str]:
    """The names of a check's lines: the optional ThreatQ steps have a line each."""
    return STEP_NAMES if check_name == "threatq steps" else [check_name]


def names() -> List[str]:
    """Every line's name, in order."""
    return [line for name, _ in CHECKS for line in _lines(name)]


def run_checks(ctx: Context) -> List[Result]:
    """Every check in order; an unexpected exception fails that check only."""
    results = []
    for name, check in CHECKS:
        try:
            found = check(ctx)
            results.extend(found if isinstance(found, list) else [found])
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            failed = f"unexpected error: {type(exc).__name__}: {logs.redact(str(exc))}"
            results.extend(_fail(line, failed, "run again with -v 3 and report this with the output")
                           for line in _lines(name))
    return results


# ------------------------------------------------------------------------------------ output

def marks_for(stream) -> Dict[str, str]:
    """✔/✘ where the terminal can show them, ASCII elsewhere."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(MARKS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


def render(results: List[Result], marks: Dict[str, str] = MARKS) -> List[str]:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        mark = marks["skip"] if r.skipped else marks["ok"] if r.ok else marks["fail"]
        line = f"{mark} {r.name:<{width}}  {r.detail}"
        if not r.ok and r.fix:
            line += f"  {marks['arrow']} fix: {r.fix}"
        lines.append(line)
    return lines


def listener_url(listener_ip: str, port: int) -> Optional[str]:
    """Where the daemon listening on ``listener_ip:port`` is reached from this host."""
    if not port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listener_ip, listener_ip)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/cases"
