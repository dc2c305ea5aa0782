"""ThreatQ OAuth: the token grants and the 0600 file that keeps the tokens.

Facts from ``reference/threatq-api.md`` §1: ``POST /api/token``; the password
grant sends ``grant_type``/``client_id`` in the query and ``{email, password}``
as JSON (ThreatQuotient's own SDK does this; XSOAR puts all four in the body);
client-credentials uses HTTP Basic ``client_id:client_secret``; a refresh sends
``grant_type=refresh_token&refresh_token=…`` with the current Bearer token.
Bad credentials answer 400. The password is used for one request and dropped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import requests

from tq_mw_thehive import private_files

TOKEN_FILE = "threatq_tokens.json"
TIMEOUT_S = (5.0, 30.0)
# The SDK assumes 30-minute tokens; a reply without expires_in is treated the same way.
DEFAULT_EXPIRES_IN_S = 1800


class ThreatQAuthError(Exception):
    """A token grant failed; the message never contains a secret."""


@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: Optional[str] = field(repr=False)
    expires_at: float
    token_type: str = "Bearer"

    @classmethod
    def from_response(cls, body: Dict[str, Any], now: Optional[float] = None) -> "Tokens":
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise ThreatQAuthError("ThreatQ answered the token request without an access_token")
        expires_in = body.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN_S
        refresh = body.get("refresh_token")
        return cls(access_token=access, refresh_token=refresh if isinstance(refresh, str) else None,
                   expires_at=(time.time() if now is None else now) + float(expires_in),
                   token_type=str(body.get("token_type") or "Bearer"))

    def to_dict(self) -> Dict[str, Any]:
        return {"access_token": self.access_token, "refresh_token": self.refresh_token,
                "expires_at": self.expires_at, "token_type": self.token_type}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Tokens":
        """``to_dict``'s output back (the token file, the shared state's copy); KeyError,
        TypeError or ValueError when it is damaged."""
        return cls(access_token=data["access_token"], refresh_token=data.get("refresh_token"),
                   expires_at=float(data["expires_at"]), token_type=data.get("token_type") or "Bearer")


def token_path(config_dir: Path) -> Path:
    return Path(config_dir) / TOKEN_FILE


def save_tokens(config_dir: Path, tokens: Tokens) -> Path:
    path = token_path(config_dir)
    private_files.write(path, json.dumps(tokens.to_dict(), indent=2) + "\n")
    return path


def load_tokens(config_dir: Path) -> Optional[Tokens]:
    try:
        return Tokens.from_dict(json.loads(token_path(config_dir).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ThreatQAuthError(f"{token_path(config_dir)} is damaged ({type(exc).__name__}); "
                               "run `tq-mw-thehive configure` again") from None


def _error_text(response: requests.Response) -> str:
    """ThreatQ's own error message from either error shape (reference §7), else the status."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    messages = []
    errors = body.get("errors") if isinstance(body, dict) else None
    data = body.get("data") if isinstance(body, dict) else None
    if errors is None and isinstance(data, dict):
        errors = data.get("errors")
    if isinstance(errors, dict):
        for value in errors.values():
            messages.extend(value if isinstance(value, list) else [value])
    elif isinstance(errors, list):
        for value in errors:
            messages.extend(value if isinstance(value, list) else [value])
    for key in ("error_description", "message", "error"):
        if isinstance(body, dict) and isinstance(body.get(key), str):
            messages.append(body[key])
    text = "; ".join(str(m) for m in messages if m)
    return f"HTTP {response.status_code}: {text}" if text else f"HTTP {response.status_code}"


def _grant(base_url: str, params: Dict[str, str], *, json_body: Optional[Dict[str, str]] = None,
           auth: Optional[tuple] = None, headers: Optional[Dict[str, str]] = None,
           verify: bool = True, proxy: Optional[str] = None,
           session: Optional[requests.Session] = None) -> Tokens:
    http = session or requests.Session()
    url = f"{base_url}/api/token"
    try:
        response = http.post(url, params=params, json=json_body, auth=auth, headers=headers,
                             verify=verify, timeout=TIMEOUT_S,
                             proxies={"http": proxy, "https": proxy} if proxy else None)
    except requests.RequestException as exc:
        raise ThreatQAuthError(f"cannot reach ThreatQ at {base_url}: {type(exc).__name__}") from None
    if response.status_code in (400, 401, 403):
        raise ThreatQAuthError(f"ThreatQ rejected the credentials ({_error_text(response)})")
    if response.status_code >= 300:
        raise ThreatQAuthError(f"ThreatQ token request failed ({_error_text(response)})")
    try:
        body = response.json()
    except ValueError:
        raise ThreatQAuthError("ThreatQ answered the token request with something that is not JSON") from None
    if not isinstance(body, dict):
        raise ThreatQAuthError("ThreatQ answered the token request with an unexpected JSON shape")
    if "errors" in body:
        raise ThreatQAuthError(f"ThreatQ rejected the credentials ({_error_text(response)})")
    return Tokens.from_response(body)


def password_grant(base_url: str, client_id: str, email: str, password: str, **kwargs: Any) -> Tokens:
    """Exchange a user's email and password for tokens (the configuration run, once)."""
    return _grant(base_url, {"grant_type": "password", "client_id": client_id},
                  json_body={"email": email, "password": password}, **kwargs)


def client_credentials_grant(base_url: str, client_id: str, client_secret: str, **kwargs: Any) -> Tokens:
    """Tokens for a dedicated integration client; nothing needs storing, the secret re-authenticates."""
    return _grant(base_url, {"grant_type": "client_credentials"}, auth=(client_id, client_secret), **kwargs)


def refresh_grant(base_url: str, tokens: Tokens, **kwargs: Any) -> Tokens:
    if not tokens.refresh_token:
        raise ThreatQAuthError("no refresh token stored; run `tq-mw-thehive configure` again")
    return _grant(base_url, {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                  headers={"Authorization": f"Bearer {tokens.access_token}"}, **kwargs)
