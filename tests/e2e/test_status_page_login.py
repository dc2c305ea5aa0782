"""The status page's login limit and logout through the real daemon (gunicorn, 2 worker processes).

The unit tests (tests/test_status_page.py) drive the clock; here the point is that the limit and
the sessions live in the state database, so they hold whichever worker answers. Each request is a
new connection (gunicorn hands it to either worker). A second client address is 127.0.0.2 (Linux
routes all of 127/8 to loopback), so one address can be locked out while another logs in.
"""
from __future__ import annotations

import http.client
import re
import urllib.parse
from typing import Dict, Optional, Tuple

import pytest

from conftest import write_config
from tq_mw_thehive.auth import COOKIE
from tq_mw_thehive.testing.daemon import Daemon

pytestmark = pytest.mark.e2e
ADMIN_TOKEN = "daemon-admin-token-8e21b4f7"


def call(daemon: Daemon, method: str, path: str, source: str = "127.0.0.1", form: Optional[dict] = None,
         headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], str]:
    """One request on a new connection from ``source``: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=15, source_address=(source, 0))
    try:
        body = urllib.parse.urlencode(form) if form is not None else None
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_login_limit_and_logout_hold_across_worker_processes(tmp_path):
    write_config(tmp_path, web={"admin_token": ADMIN_TOKEN})
    daemon = Daemon(tmp_path, tmp_path / "logs", workers=2)
    try:
        daemon.start()
        wrong = [call(daemon, "POST", "/status/login", form={"token": "guess-0123456789"})[0] for _ in range(5)]
        assert wrong == [403] * 5
        status, headers, body = call(daemon, "POST", "/status/login", form={"token": ADMIN_TOKEN})
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60, (status, headers)
        assert "Too many failed logins" in body and 'name="token"' in body
        for _ in range(4):  # whichever worker answers
            assert call(daemon, "GET", "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})[0] == 429

        # Another address logs in; its cookie works in both workers, with a proxy's own header too.
        status, headers, _ = call(daemon, "POST", "/status/login", "127.0.0.2", form={"token": ADMIN_TOKEN})
        assert status == 303, status
        cookie = re.match(rf"{COOKIE}=([^;]+)", headers["Set-Cookie"]).group(1)
        jar = {"Cookie": f"{COOKIE}={cookie}"}
        for proxy_header in ({}, {"Authorization": "Basic cHJveHk6c2VjcmV0"}, {"Authorization": "Bearer sso-1"}):
            status, _, html = call(daemon, "GET", "/status", "127.0.0.2", headers={**jar, **proxy_header})
            assert status == 200, (status, proxy_header)
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html).group(1)
        assert call(daemon, "POST", "/status/logout", "127.0.0.2", form={"csrf_token": csrf}, headers=jar)[0] == 303
        # The cookie copied before logout is worthless afterwards, in every worker.
        assert [call(daemon, "GET", "/status", "127.0.0.2", headers=jar)[0] for _ in range(4)] == [401] * 4
    finally:
        daemon.stop()
    log = daemon.log_text()
    assert "status page login limit reached scope=client remote=127.0.0.1" in log
    assert ADMIN_TOKEN not in log
