"""A ThreatQ API simulator. This first part is the OAuth token flow (reference §1).

Grants: ``password`` (``grant_type``/``client_id`` in the query or the JSON body,
``email``/``password`` in the body), ``client_credentials`` (HTTP Basic
``client_id:client_secret``), ``refresh_token`` (query, with the current Bearer).
Bad credentials answer 400 with ``{"errors": [...]}``; tokens expire after
``token_ttl`` seconds and API calls with an expired or unknown token answer 401.
Token lifetimes on a real instance vary (3600 s in XSOAR's mock, 30 min in the SDK).
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Dict, List, Optional, Tuple

from flask import Flask, jsonify, request


class ThreatQSimulator:
    def __init__(self, users: Optional[Dict[str, str]] = None, client_id: str = "tq-client-id",
                 client_secrets: Optional[Dict[str, str]] = None, token_ttl: int = 3600) -> None:
        self.users = dict(users or {"analyst@example.org": "correct horse battery staple"})
        self.client_id = client_id
        self.client_secrets = dict(client_secrets or {})
        self.token_ttl = token_ttl
        self.access_tokens: Dict[str, float] = {}
        self.refresh_tokens: Dict[str, str] = {}
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self.app = self._build_app()

    def _issue(self) -> dict:
        access, refresh = secrets.token_hex(20), secrets.token_hex(20)
        with self._lock:
            self.access_tokens[access] = time.time() + self.token_ttl
            self.refresh_tokens[refresh] = access
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.token_ttl,
                "token_type": "bearer"}

    def token_valid(self, header: Optional[str]) -> bool:
        scheme, _, token = (header or "").partition(" ")
        with self._lock:
            expiry = self.access_tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and expiry > time.time()

    def expire_all_tokens(self) -> None:
        with self._lock:
            for token in self.access_tokens:
                self.access_tokens[token] = 0.0

    def _build_app(self) -> Flask:
        app = Flask("threatq-simulator")

        @app.before_request
        def record():
            self.requests.append((request.method, request.path))

        @app.post("/api/token")
        def token():
            body = request.get_json(silent=True) or {}
            field = lambda name: request.args.get(name) or body.get(name)  # noqa: E731
            grant = field("grant_type")
            if grant == "password":
                if field("client_id") != self.client_id:
                    return jsonify({"errors": ["The client credentials are invalid."]}), 400
                if self.users.get(body.get("email")) != body.get("password") or not body.get("password"):
                    return jsonify({"errors": ["The user credentials were incorrect."]}), 400
                return jsonify(self._issue())
            if grant == "client_credentials":
                auth = request.authorization
                if not auth or self.client_secrets.get(auth.username) != auth.password:
                    return jsonify({"errors": ["Client authentication failed."]}), 400
                return jsonify(self._issue())
            if grant == "refresh_token":
                with self._lock:
                    old = self.refresh_tokens.pop(field("refresh_token") or "", None)
                    if old is not None:
                        self.access_tokens.pop(old, None)
                if old is None:
                    return jsonify({"errors": ["The refresh token is invalid."]}), 400
                return jsonify(self._issue())
            return jsonify({"errors": [f"Unsupported grant type: {grant}"]}), 400

        return app
