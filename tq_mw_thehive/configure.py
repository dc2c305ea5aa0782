"""The one-shot configuration run: ask, exchange the password for tokens, write, explain.

Every answer can come from a flag or an environment variable (``TQ_MW_*``), so
the run can be automated; what is still missing is prompted for on a terminal
and is an error (exit 2) without one. The ThreatQ answers are checked as soon
as they are given (a typo is fixed before the TheHive questions, up to three
tries on a terminal). The ThreatQ password is sent once to ``POST /api/token``
and then forgotten: only the tokens are kept, in a 0600 file beside the
configuration.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import secrets
import shlex
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, TextIO, Tuple
from urllib.parse import urlsplit

import click
import requests
import urllib3

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import state
from tq_mw_thehive.config import Config, ConfigError, ThreatQConfig
from tq_mw_thehive.threatq import auth as tq_auth

ENDPOINT_NAME = "tq_mw_thehive"


@dataclass
class Answers:
    """What the configuration run asks for; ``None`` means "not given yet"."""

    threatq_host: Optional[str] = None
    client_id: Optional[str] = None
    email: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    client_secret: Optional[str] = dataclasses.field(default=None, repr=False)
    proxy: Optional[str] = None
    thehive_url: Optional[str] = None
    thehive_api_key: Optional[str] = dataclasses.field(default=None, repr=False)
    organisation: Optional[str] = None
    webhook_auth: Optional[str] = None
    webhook_username: Optional[str] = None
    webhook_token: Optional[str] = dataclasses.field(default=None, repr=False)


# (answer, prompt or None when never prompted, hidden, flag, environment variable, help)
QUESTIONS = (
    ("threatq_host", "ThreatQ Host", False, "--threatq-host", "TQ_MW_THREATQ_HOST",
     "ThreatQ host name (https) or URL."),
    ("client_id", "ThreatQ Client ID", False, "--client-id", "TQ_MW_THREATQ_CLIENT_ID",
     "OAuth client id of the ThreatQ instance."),
    ("email", "ThreatQ Email", False, "--email", "TQ_MW_THREATQ_EMAIL",
     "ThreatQ user's login email (password grant)."),
    ("password", "ThreatQ Password", True, "--password", "TQ_MW_THREATQ_PASSWORD",
     "ThreatQ user's password: used once, never stored (prefer the variable)."),
    ("thehive_url", "TheHive URL", False, "--thehive-url", "TQ_MW_THEHIVE_URL",
     "TheHive base URL."),
    ("thehive_api_key", "TheHive API key", True, "--thehive-api-key", "TQ_MW_THEHIVE_API_KEY",
     "TheHive API key (for reading cases)."),
    ("webhook_token", "Webhook secret", True, "--webhook-token",
     "TQ_MW_WEBHOOK_TOKEN", "Secret TheHive sends with each webhook (default: generated)."),
    ("client_secret", None, True, "--client-secret", "TQ_MW_THREATQ_CLIENT_SECRET",
     "Client secret: use the client-credentials grant instead of a user account."),
    ("proxy", None, False, "--proxy", "TQ_MW_THREATQ_PROXY",
     "HTTP(S) proxy URL for ThreatQ, used with -ep."),
    ("organisation", None, False, "--organisation", "TQ_MW_THEHIVE_ORGANISATION",
     "TheHive organisation to read from (X-Organisation)."),
    ("webhook_auth", None, False, "--webhook-auth", "TQ_MW_WEBHOOK_AUTH",
     "How TheHive authenticates (default bearer)."),
    ("webhook_username", None, False, "--webhook-username", "TQ_MW_WEBHOOK_USERNAME",
     "User name for --webhook-auth basic (default thehive)."),
)


# What an empty answer means, said in the prompt, when there is no current value to keep.
EMPTY_MEANS = {"webhook_token": "generate one"}
THREATQ_ANSWERS = ("threatq_host", "client_id", "email", "password")
CLIENT_SECRET_PROMPT = "ThreatQ Client Secret"  # asked only again, after a refused client secret
MAX_TRIES = 3


def answers_from_env(environ) -> Answers:
    """Answers given through ``TQ_MW_*`` variables (the run without a subcommand has no flags for them)."""
    return Answers(**{name: environ.get(env) for name, _, _, _, env, _ in QUESTIONS})


class ConfigureError(Exception):
    """The configuration run cannot finish; nothing was written."""


class ThreatQCheckError(ConfigureError):
    """ThreatQ did not accept the ThreatQ answers; the message is one line with a hint, no secret."""


def generate_token() -> str:
    """A webhook secret with 256 bits of entropy, safe in a header and in HOCON."""
    return secrets.token_urlsafe(32)


def _prompt_text(name: str, text: str, hidden: bool, default: Optional[str]) -> Tuple[str, bool]:
    """(prompt, whether an empty answer is taken): at most one hint, saying what empty does.

    A hidden answer cannot show its default, so the hint says that empty keeps it; the password
    has no default and an empty one would only be refused by ThreatQ, so it is asked until given.
    """
    if hidden and default:
        return f"{text} (empty: keep the current one)", True
    if name in EMPTY_MEANS:
        return f"{text} (empty: {EMPTY_MEANS[name]})", True
    return text, hidden and name != "password"


def _ask(answers: Answers, name: str, text: str, hidden: bool, flag: str, env: str,
         default: Optional[str], interactive: bool, prompt: Callable[..., str]) -> None:
    if getattr(answers, name):
        return
    if not interactive:
        if default is not None:
            setattr(answers, name, default)
            return
        raise ConfigureError(f"{text} is required: pass {flag} or set {env} (no terminal to ask on)")
    shown, empty_ok = _prompt_text(name, text, hidden, default)
    if hidden:  # a secret is never shown as a default; an empty answer keeps it
        value = prompt(shown, default="" if empty_ok else None, hide_input=True, show_default=False)
    else:
        value = prompt(shown, default=default, show_default=True)
    value = (value or "").strip()
    setattr(answers, name, value or default)


def _base_config(config_dir: Path) -> Optional[Config]:
    """The current configuration, whose values become the defaults of a re-run."""
    if not config_mod.config_path(config_dir).exists():
        return None
    try:
        return config_mod.load(config_dir)
    except ConfigError:
        return None


def _question(name: str) -> tuple:
    return next(q for q in QUESTIONS if q[0] == name)


def _uses_client_secret(answers: Answers, old: Optional[Config]) -> bool:
    """The client-credentials grant (no user account) is in use: given now or kept from the old file."""
    if answers.client_secret is not None:
        return bool(answers.client_secret)
    return bool(old is not None and old.threatq.client_secret)


def _ask_threatq_once(answers: Answers, defaults: dict, client_grant: bool, interactive: bool,
                      prompt: Callable[..., str]) -> None:
    for name in THREATQ_ANSWERS:
        if name in ("email", "password") and client_grant:
            continue  # the client-credentials grant needs no user account
        _, text, hidden, flag, env, _ = _question(name)
        _ask(answers, name, text, hidden, flag, env, defaults.get(name), interactive, prompt)
    if client_grant and "client_secret" in defaults:  # a retry: the secret may be the mistake
        _, _, _, flag, env, _ = _question("client_secret")
        _ask(answers, "client_secret", CLIENT_SECRET_PROMPT, True, flag, env, defaults["client_secret"],
             interactive, prompt)


def _forget_threatq_answers(answers: Answers, client_grant: bool, old: Optional[Config]) -> dict:
    """Clear the ThreatQ answers so that they are asked again; return them as the new defaults.

    The password is never a default: it must be typed again (and is gone already, used once).
    """
    defaults = {name: getattr(answers, name) for name in ("threatq_host", "client_id", "email")}
    if client_grant:
        kept = old.threatq.client_secret if old is not None else None
        defaults["client_secret"] = answers.client_secret if answers.client_secret is not None else kept
        answers.client_secret = None
    for name in THREATQ_ANSWERS:
        setattr(answers, name, None)
    return defaults


def _sentence(message: object) -> str:
    text = str(message)
    return text if text.endswith((".", "?", "!")) else text + "."


def ask_threatq(answers: Answers, old: Optional[Config], config_dir: Path, interactive: bool,
                prompt: Callable[..., str], *, disable_ssl: bool, use_proxy: bool,
                err: TextIO) -> Optional[tq_auth.Tokens]:
    """Ask the ThreatQ questions and check them with ThreatQ at once.

    Checking before the TheHive questions lets a person fix a typo while it is fresh: on a
    terminal the ThreatQ questions are asked again (``MAX_TRIES`` in all); without one the
    first failure ends the run, since asking again could not change the answers.
    """
    defaults = {"threatq_host": old.threatq.host, "client_id": old.threatq.client_id} if old else {}
    client_grant = _uses_client_secret(answers, old)
    for attempt in range(1, MAX_TRIES + 1):
        _ask_threatq_once(answers, defaults, client_grant, interactive, prompt)
        try:
            tokens = check_threatq(answers, old, config_dir, disable_ssl=disable_ssl, use_proxy=use_proxy)
        except ThreatQCheckError as exc:
            if not interactive:
                raise ThreatQCheckError(f"{_sentence(exc)} Nothing was written.") from None
            if attempt == MAX_TRIES:
                raise ThreatQCheckError(f"{_sentence(exc)} Gave up after {MAX_TRIES} tries; "
                                        "nothing was written.") from None
            click.echo(f"{_sentence(exc)} Please try again ({attempt + 1} of {MAX_TRIES}).", file=err)
            defaults = _forget_threatq_answers(answers, client_grant, old)
            continue
        if interactive:
            click.echo("ThreatQ accepted the credentials.", file=err)
        return tokens
    raise AssertionError("unreachable")  # pragma: no cover


def collect(answers: Answers, old: Optional[Config], interactive: bool,
            prompt: Callable[..., str] = click.prompt) -> None:
    """Fill the answers that come after ThreatQ's (TheHive, the webhook secret) from the prompts."""
    defaults = {}
    if old is not None:
        defaults = {"thehive_url": old.thehive.url, "thehive_api_key": old.thehive.api_key,
                    "webhook_token": old.webhook.token or old.webhook.password}
    auth = answers.webhook_auth or (old.webhook.auth if old is not None else "bearer")
    for name, text, hidden, flag, env, _ in QUESTIONS:
        if text is None or name in THREATQ_ANSWERS:
            continue
        if name == "webhook_token" and auth == "none":
            continue  # nothing to ask: TheHive sends no secret
        default = defaults.get(name)
        if name == "webhook_token" and default is None and not interactive:
            default = generate_token()
        _ask(answers, name, text, hidden, flag, env, default, interactive, prompt)
    if not answers.webhook_token:
        answers.webhook_token = generate_token()


def _threatq_section(answers: Answers, old: Optional[Config]) -> dict:
    """The ``threatq`` section: the answers over the old file's other ThreatQ settings."""
    threatq = old.to_dict()["threatq"] if old is not None else {}
    threatq.update(host=answers.threatq_host, client_id=answers.client_id)
    if answers.client_secret is not None:
        threatq["client_secret"] = answers.client_secret or None
    if answers.proxy is not None:
        threatq["proxy"] = answers.proxy or None
    return threatq


def threatq_settings(answers: Answers, old: Optional[Config], config_dir: Path) -> ThreatQConfig:
    """The validated ``threatq`` section alone, before TheHive's answers exist.

    ``config.from_dict`` validates whole files: the other sections are placeholders here, never
    used, so that a bad ThreatQ host is reported while the ThreatQ questions are being asked.
    """
    raw = {"threatq": _threatq_section(answers, old), "thehive": {"url": "http://127.0.0.1"},
           "webhook": {"auth": "none"}}
    return config_mod.from_dict(raw, config_dir).threatq


def build_config(answers: Answers, config_dir: Path, old: Optional[Config]) -> Config:
    """The new configuration: the answers over the old file's other settings (or the defaults)."""
    raw = old.to_dict() if old is not None else {}
    raw["threatq"] = _threatq_section(answers, old)
    thehive = raw.setdefault("thehive", {})
    thehive.update(url=answers.thehive_url, api_key=answers.thehive_api_key)
    if answers.organisation is not None:
        thehive["organisation"] = answers.organisation or None
    webhook = raw.setdefault("webhook", {})
    webhook["auth"] = answers.webhook_auth or webhook.get("auth") or "bearer"
    if webhook["auth"] == "basic":
        webhook["username"] = answers.webhook_username or webhook.get("username") or "thehive"
        webhook["password"] = answers.webhook_token
        webhook["token"] = None
    else:
        webhook["token"] = answers.webhook_token
        webhook["password"] = None
    return config_mod.from_dict(raw, config_dir)


class _WatchedSession(requests.Session):
    """A session that remembers how the token request ended, so that a failure can be explained.

    ``threatq.auth`` reduces every failure to one text; the configuration run needs the cause
    (refused connection, unknown name, TLS, HTTP status) to give the matching hint. Only the
    exception and the status are kept, for the time of one check.
    """

    def __init__(self) -> None:
        super().__init__()
        self.error: Optional[requests.RequestException] = None
        self.status: Optional[int] = None

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        try:
            response = super().request(*args, **kwargs)
        except requests.RequestException as exc:
            self.error = exc
            raise
        self.status = response.status_code
        return response


def _causes(exc: BaseException) -> List[BaseException]:
    """``exc`` and all it wraps: requests' error → urllib3's MaxRetryError → its reason → OSError."""
    found: List[BaseException] = []
    todo: List[Any] = [exc]
    while todo:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__, *current.args]
    return found


def _first(causes: List[BaseException], *kinds: type) -> Optional[BaseException]:
    return next((cause for cause in causes if isinstance(cause, kinds)), None)


def _tls_failure(causes: List[BaseException], url: str) -> Optional[str]:
    cert = _first(causes, ssl.SSLCertVerificationError)
    if cert is not None:
        why = getattr(cert, "verify_message", None) or "certificate verify failed"
        return (f"the TLS certificate of {url} is not trusted ({why}): install its CA certificate, "
                "or pass -ds/--disable-ssl (lab only)")
    tls = _first(causes, ssl.SSLError, urllib3.exceptions.SSLError, requests.exceptions.SSLError)
    if tls is None:
        return None
    low = _first(causes, ssl.SSLError)
    why = getattr(low, "reason", None) or "TLS error"
    why = str(why).lower().replace("_", " ")
    return (f"TLS handshake with {url} failed ({why}): is it http://? "
            "(-ds/--disable-ssl skips only the certificate check)")


def _reach_failure(exc: requests.RequestException, url: str) -> str:
    """One line for a request that got no HTTP answer, instead of urllib3's nested reprs."""
    causes = _causes(exc)
    host = urlsplit(url).hostname or url
    if isinstance(exc, requests.exceptions.ProxyError):
        return "cannot reach ThreatQ through the proxy (threatq.proxy, used with -ep): is it right and up?"
    if _first(causes, urllib3.exceptions.NameResolutionError, socket.gaierror):
        return f"cannot resolve host {host}: is the name right?"
    tls = _tls_failure(causes, url)
    if tls:
        return tls
    if _first(causes, ConnectionRefusedError):
        return f"nothing listens at {url}: is the host/port right?"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return (f"no answer from {url} within {tq_auth.TIMEOUT_S[0]:g} s: is the host/port right, "
                "or a firewall in the way?")
    if isinstance(exc, requests.exceptions.Timeout):
        return f"ThreatQ at {url} did not answer within {tq_auth.TIMEOUT_S[1]:g} s: is it overloaded?"
    low = next((c for c in reversed(causes)
                if isinstance(c, OSError) and not isinstance(c, requests.RequestException)), None)
    why = (low.strerror if low is not None and low.strerror else type(exc).__name__)
    return f"cannot reach ThreatQ at {url}: {why}"


_THREATQ_SAID = re.compile(r"\(HTTP \d+: (.+)\)$")


def _status_failure(exc: tq_auth.ThreatQAuthError, status: int, url: str, client_grant: bool) -> str:
    """One line for an HTTP answer that is not tokens: refused credentials, outage, not ThreatQ."""
    if status >= 500:
        return f"ThreatQ unavailable (HTTP {status}) at {url}: try again when it is up"
    if status < 300:
        return str(exc)  # an answer without tokens: auth's own text says what was wrong
    said = _THREATQ_SAID.search(str(exc))
    detail = f"HTTP {status}: {said.group(1)}" if said else f"HTTP {status}"
    if status in (400, 401, 403):
        what = "the client id/client secret" if client_grant else "the email/password (or client id)"
        return f"ThreatQ refused {what} with {detail}"
    return f"{url} answered POST /api/token with {detail}: is it ThreatQ's address?"


def explain_threatq_failure(exc: tq_auth.ThreatQAuthError, error: Optional[requests.RequestException],
                            status: Optional[int], url: str, client_grant: bool) -> str:
    """The one-line reason a ThreatQ check failed, with what to do about it; never a secret."""
    if error is not None:
        return _reach_failure(error, url)
    if status is not None:
        return _status_failure(exc, status, url, client_grant)
    return str(exc)


def check_threatq(answers: Answers, old: Optional[Config], config_dir: Path, *, disable_ssl: bool,
                  use_proxy: bool) -> Optional[tq_auth.Tokens]:
    """Exchange the ThreatQ answers for tokens now: the tokens for a user account, None for a client.

    The password is used for this one request and dropped, whatever the outcome.
    """
    try:
        settings = threatq_settings(answers, old, config_dir)
    except ConfigError as exc:
        answers.password = None
        raise ThreatQCheckError(str(exc)) from None
    session = _WatchedSession()
    kwargs = {"verify": settings.verify_ssl and not disable_ssl,
              "proxy": settings.proxy if use_proxy else None, "session": session}
    try:
        if settings.client_secret:
            tq_auth.client_credentials_grant(settings.base_url, settings.client_id, settings.client_secret,
                                             **kwargs)
            return None
        return tq_auth.password_grant(settings.base_url, settings.client_id, answers.email or "",
                                      answers.password or "", **kwargs)
    except tq_auth.ThreatQAuthError as exc:
        reason = explain_threatq_failure(exc, session.error, session.status, settings.base_url,
                                         bool(settings.client_secret))
        raise ThreatQCheckError(reason) from None
    finally:
        answers.password = None
        session.close()


def webhook_url(listener_ip: str, port: int) -> str:
    """The URL TheHive must call: the listener's address, or this host's name for a wildcard."""
    host = listener_ip
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/cases"


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this host only (127.0.0.0/8, ::1, localhost): unreachable from elsewhere."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hocon_string(value: str) -> str:
    return json.dumps(value)


NOTIFICATION_PATH = "/api/config/organisation/notification"
SECRET_MASK = "********"


def notification_entry() -> dict:
    """TheHive 4's organisation notification that sends every event (AnyEvent) to our endpoint."""
    return {"delegate": False, "trigger": {"name": "AnyEvent"},
            "notifier": {"name": "webhook", "endpoint": ENDPOINT_NAME}}


def auth_blocks(cfg: Config, show_secrets: bool = True) -> Tuple[str, str]:
    """(TheHive 4 HOCON ``auth`` block, TheHive 5 Authentication fields) for ``webhook.*``.

    With ``show_secrets`` off the token or password reads ``SECRET_MASK`` (for a preview).
    """
    hook = cfg.webhook
    secret = (lambda value: value or "") if show_secrets else (lambda value: SECRET_MASK)
    if hook.auth == "basic":
        auth4 = (f'{{type: "basic", username: {_hocon_string(hook.username or "")}, '
                 f'password: {_hocon_string(secret(hook.password))}}}')
        auth5 = f"Basic, username {hook.username}, password {secret(hook.password)}"
    elif hook.auth in ("bearer", "key"):
        auth4 = f'{{type: "{hook.auth}", key: {_hocon_string(secret(hook.token))}}}'
        auth5 = f"{'Bearer' if hook.auth == 'bearer' else 'Key'}, key {secret(hook.token)}"
    else:
        auth4 = '{type: "none"}'
        auth5 = "None"
    return auth4, auth5


def thehive4_endpoint(cfg: Config, url: str, show_secrets: bool = True) -> str:
    """The ``notification.webhook.endpoints`` entry for TheHive 4's application.conf."""
    auth4, _ = auth_blocks(cfg, show_secrets)
    return f"""\
notification.webhook.endpoints = [
  {{
    name: {ENDPOINT_NAME}
    url: "{url}"
    version: 0
    wsConfig: {{}}
    includedTheHiveOrganisations: ["*"]
    excludedTheHiveOrganisations: []
    auth: {auth4}
  }}
]
"""


def thehive5_endpoint(cfg: Config, url: str, show_secrets: bool = True) -> str:
    """TheHive 5's webhook endpoint form (Organization > Endpoints) and the notification to add."""
    _, auth5 = auth_blocks(cfg, show_secrets)
    return f"""\
TheHive 5: Organization > Endpoints > + (Webhook):
  Name:            {ENDPOINT_NAME}
  URL:             {url}
  Version:         1
  Authentication:  {auth5}
then Organization > Notifications > +: trigger AnyEvent, notifier Webhook, endpoint {ENDPOINT_NAME}.
"""


ADMIN_KEY_VARIABLE = "TQ_MW_THEHIVE_ADMIN_API_KEY"


def thehive_instructions(cfg: Config, url: str, show_secrets: bool = True) -> str:
    """What to paste into TheHive 4 and 5 so that they call this daemon, filled in.

    The notification PUT needs an org admin's key, which the daemon must not hold (it only reads
    cases): the ``curl`` takes it from its own variable, the one ``thehive-setup`` reads too.
    """
    activation = json.dumps({"value": [notification_entry()]}, separators=(",", ":"))
    thehive = cfg.thehive.url.rstrip("/")
    org_header = (f" \\\n  -H {shlex.quote('X-Organisation: ' + cfg.thehive.organisation)}"
                  if cfg.thehive.organisation else "")
    return f"""\
TheHive 4: add this endpoint to /etc/thehive/application.conf and restart TheHive:

{thehive4_endpoint(cfg, url, show_secrets)}
Then enable the notification for your organisation: put an org admin's API key (not the
daemon's read key) in {ADMIN_KEY_VARIABLE} and run this curl, or run
`tq-mw-thehive thehive-setup --thehive-version 4` (it reads the same variable):

curl -XPUT -H "Authorization: Bearer ${ADMIN_KEY_VARIABLE}" \\
  -H 'Content-Type: application/json'{org_header} \\
  {shlex.quote(thehive + NOTIFICATION_PATH)} \\
  -d {shlex.quote(activation)}

{thehive5_endpoint(cfg, url, show_secrets)}"""


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def masked_note(cfg: Config) -> Optional[str]:
    """Where to find the webhook secret that the printed setup shows masked; None if it has none."""
    key = {"bearer": "token", "key": "token", "basic": "password"}.get(cfg.webhook.auth)
    if key is None:
        return None
    return (f"The webhook secret is shown as {SECRET_MASK} because stdout is not a terminal: it is "
            f"webhook.{key} in {config_mod.config_path(cfg.config_dir)} (mode 0600), or run configure "
            "again with --show-secrets.")


def loopback_warning(url: str) -> Optional[str]:
    """A warning when TheHive is told to call a loopback address, which only this host can reach."""
    if not is_loopback_url(url):
        return None
    return (f"Warning: {url} is a loopback address: TheHive on another host cannot reach it. If TheHive "
            "runs elsewhere, pass -li 0.0.0.0 (or this host's address) here and when starting the daemon.")


def _print_setup(cfg: Config, url: str, wrote: str, show_secrets: bool, out: TextIO, err: TextIO) -> None:
    print(wrote + "\n", file=out)
    print(thehive_instructions(cfg, url, show_secrets), file=out)
    note = None if show_secrets else masked_note(cfg)
    if note:
        print(note, file=out)
    warning = loopback_warning(url)
    if warning:
        click.echo(warning, file=err)


def run(answers: Answers, config_dir: Path, *, listener_ip: str, port: int, disable_ssl: bool,
        use_proxy: bool, interactive: Optional[bool] = None, out: Optional[TextIO] = None,
        err: Optional[TextIO] = None, show_secrets: Optional[bool] = None,
        prompt: Callable[..., str] = click.prompt) -> Config:
    """The whole configuration run; raise ``ConfigureError`` (nothing written) when it cannot finish.

    ``show_secrets`` None prints the webhook secret only when ``out`` is a terminal, so that a
    redirect or a CI log never catches it; True prints it anyway.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    config_dir = Path(config_dir)
    try:
        config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigureError(f"config directory {config_dir}: {exc.strerror or exc}") from None
    if interactive is None:
        interactive = _stdin_is_terminal()
    old = _base_config(config_dir)
    tokens = ask_threatq(answers, old, config_dir, interactive, prompt, disable_ssl=disable_ssl,
                         use_proxy=use_proxy, err=err)
    collect(answers, old, interactive, prompt)
    try:
        cfg = build_config(answers, config_dir, old)
    except ConfigError as exc:
        raise ConfigureError(str(exc)) from None
    if tokens is not None:
        tq_auth.save_tokens(config_dir, tokens)
    path = config_mod.write(cfg)
    wrote = f"Wrote {path} (mode 0600)" + (f" and {tq_auth.token_path(config_dir)} (mode 0600)"
                                           if tokens is not None else "") + "."
    try:  # now, so that `keys set` and `watch add` work before the daemon's first start
        state.open_state(cfg.state_db).close()
    except state.StateError as exc:
        print(f"warning: {exc}; the daemon will try again at its start", file=err)
    show = bool(show_secrets) or _is_terminal(out)
    _print_setup(cfg, webhook_url(listener_ip, port), wrote, show, out, err)
    return cfg
