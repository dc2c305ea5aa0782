"""The one-shot configuration run: ask, exchange the password for tokens, write, explain.

Every answer can come from a flag or an environment variable (``TQ_MW_*``), so
the run can be automated; what is still missing is prompted for on a terminal
and is an error (exit 2) without one. The ThreatQ password is sent once to
``POST /api/token`` and then forgotten: only the tokens are kept, in a 0600 file
beside the configuration.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import click

from tq_mw_thehive import config as config_mod
from tq_mw_thehive.config import Config, ConfigError
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
    ("webhook_token", "Webhook secret (empty: generate one)", True, "--webhook-token",
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


def answers_from_env(environ) -> Answers:
    """Answers given through ``TQ_MW_*`` variables (the run without a subcommand has no flags for them)."""
    return Answers(**{name: environ.get(env) for name, _, _, _, env, _ in QUESTIONS})


class ConfigureError(Exception):
    """The configuration run cannot finish; nothing was written."""


def generate_token() -> str:
    """A webhook secret with 256 bits of entropy, safe in a header and in HOCON."""
    return secrets.token_urlsafe(32)


def _ask(answers: Answers, name: str, text: str, hidden: bool, flag: str, env: str,
         default: Optional[str], interactive: bool, prompt: Callable[..., str]) -> None:
    if getattr(answers, name):
        return
    if not interactive:
        if default is not None:
            setattr(answers, name, default)
            return
        raise ConfigureError(f"{text} is required: pass {flag} or set {env} (no terminal to ask on)")
    shown_default = None if hidden else default
    suffix = " (empty: keep the current one)" if hidden and default else ""
    value = prompt(text + suffix, default=shown_default or ("" if hidden else None),
                   hide_input=hidden, show_default=not hidden)
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


def collect(answers: Answers, config_dir: Path, interactive: bool,
            prompt: Callable[..., str] = click.prompt) -> Optional[Config]:
    """Fill ``answers`` from the prompts; return the configuration being replaced, if any."""
    old = _base_config(config_dir)
    defaults = {}
    if old is not None:
        defaults = {"threatq_host": old.threatq.host, "client_id": old.threatq.client_id,
                    "thehive_url": old.thehive.url, "thehive_api_key": old.thehive.api_key,
                    "webhook_token": old.webhook.token}
    client_secret = answers.client_secret
    if client_secret is None and old is not None:
        client_secret = old.threatq.client_secret
    for name, text, hidden, flag, env, _ in QUESTIONS:
        if text is None:
            continue
        if name in ("email", "password") and client_secret:
            continue  # the client-credentials grant needs no user account
        default = defaults.get(name)
        if name == "webhook_token" and default is None and not interactive:
            default = generate_token()
        _ask(answers, name, text, hidden, flag, env, default, interactive, prompt)
    if not answers.webhook_token:
        answers.webhook_token = generate_token()
    return old


def build_config(answers: Answers, config_dir: Path, old: Optional[Config]) -> Config:
    """The new configuration: the answers over the old file's other settings (or the defaults)."""
    raw = old.to_dict() if old is not None else {}
    threatq = raw.setdefault("threatq", {})
    threatq.update(host=answers.threatq_host, client_id=answers.client_id)
    if answers.client_secret is not None:
        threatq["client_secret"] = answers.client_secret or None
    if answers.proxy is not None:
        threatq["proxy"] = answers.proxy or None
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


def obtain_tokens(cfg: Config, answers: Answers, verify: bool,
                  proxy: Optional[str]) -> Optional[tq_auth.Tokens]:
    """Check the ThreatQ credentials now; the stored tokens for a user account, None for a client."""
    kwargs = {"verify": verify, "proxy": proxy}
    base = cfg.threatq.base_url
    if cfg.threatq.client_secret:
        tq_auth.client_credentials_grant(base, cfg.threatq.client_id, cfg.threatq.client_secret, **kwargs)
        return None
    return tq_auth.password_grant(base, cfg.threatq.client_id, answers.email or "", answers.password or "",
                                  **kwargs)


def webhook_url(listener_ip: str, port: int) -> str:
    host = listener_ip
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/cases"


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


def thehive_instructions(cfg: Config, url: str) -> str:
    """What to paste into TheHive 4 and 5 so that they call this daemon, filled in."""
    activation = json.dumps({"value": [notification_entry()]}, separators=(",", ":"))
    thehive = cfg.thehive.url.rstrip("/")
    org_header = (f" \\\n  -H {shlex.quote('X-Organisation: ' + cfg.thehive.organisation)}"
                  if cfg.thehive.organisation else "")
    return f"""\
TheHive 4: add this endpoint to /etc/thehive/application.conf and restart TheHive:

{thehive4_endpoint(cfg, url)}
Then enable the notification for your organisation (an org admin's API key; set
TQ_MW_THEHIVE_API_KEY to it first), or run `tq-mw-thehive thehive-setup --thehive-version 4`:

curl -XPUT -H "Authorization: Bearer $TQ_MW_THEHIVE_API_KEY" \\
  -H 'Content-Type: application/json'{org_header} \\
  {shlex.quote(thehive + NOTIFICATION_PATH)} \\
  -d {shlex.quote(activation)}

{thehive5_endpoint(cfg, url)}"""


def run(answers: Answers, config_dir: Path, *, listener_ip: str, port: int, disable_ssl: bool,
        use_proxy: bool, interactive: Optional[bool] = None, out=None) -> Config:
    """The whole configuration run; raise ``ConfigureError`` (nothing written) when it cannot finish."""
    out = out or sys.stdout
    config_dir = Path(config_dir)
    try:
        config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigureError(f"config directory {config_dir}: {exc.strerror or exc}") from None
    if interactive is None:
        interactive = sys.stdin.isatty()
    old = collect(answers, config_dir, interactive)
    try:
        cfg = build_config(answers, config_dir, old)
    except ConfigError as exc:
        raise ConfigureError(str(exc)) from None
    verify = cfg.threatq.verify_ssl and not disable_ssl
    proxy = cfg.threatq.proxy if use_proxy else None
    try:
        tokens = obtain_tokens(cfg, answers, verify, proxy)
    except tq_auth.ThreatQAuthError as exc:
        raise ConfigureError(f"{exc}; nothing was written") from None
    answers.password = None
    if tokens is not None:
        tq_auth.save_tokens(config_dir, tokens)
    path = config_mod.write(cfg)
    print(f"Wrote {path} (mode 0600)" + (f" and {tq_auth.token_path(config_dir)} (mode 0600)"
                                          if tokens is not None else "") + ".\n", file=out)
    print(thehive_instructions(cfg, webhook_url(listener_ip, port)), file=out)
    return cfg
