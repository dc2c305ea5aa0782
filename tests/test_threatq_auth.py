"""ThreatQ token grants: request shape (responses), error texts, and the simulator's token flow."""
from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from tq_mw_thehive.testing.loopback import LoopbackServer
from tq_mw_thehive.testing.threatq_sim import ThreatQSimulator
from tq_mw_thehive.threatq import auth

BASE = "https://threatq.example.org"
PASSWORD = "pw-3f9a8b7c6d"


@responses.activate
def test_password_grant_sends_the_sdk_request_shape():
    responses.post(f"{BASE}/api/token",
                   match=[matchers.query_param_matcher({"grant_type": "password", "client_id": "cid"}),
                          matchers.json_params_matcher({"email": "a@example.org", "password": PASSWORD})],
                   json={"access_token": "acc", "refresh_token": "ref", "expires_in": 3600,
                         "token_type": "bearer"})
    tokens = auth.password_grant(BASE, "cid", "a@example.org", PASSWORD)
    assert (tokens.access_token, tokens.refresh_token, tokens.token_type) == ("acc", "ref", "bearer")
    assert tokens.expires_at > 0


@responses.activate
def test_client_credentials_grant_uses_basic_auth():
    responses.post(f"{BASE}/api/token",
                   match=[matchers.query_param_matcher({"grant_type": "client_credentials"}),
                          matchers.header_matcher({"Authorization": "Basic Y2lkOnNlY3JldA=="})],
                   json={"access_token": "acc", "expires_in": 1800})
    tokens = auth.client_credentials_grant(BASE, "cid", "secret")
    assert tokens.access_token == "acc" and tokens.refresh_token is None


@responses.activate
def test_refresh_grant_sends_the_refresh_token_and_current_bearer():
    responses.post(f"{BASE}/api/token",
                   match=[matchers.query_param_matcher({"grant_type": "refresh_token", "refresh_token": "ref"}),
                          matchers.header_matcher({"Authorization": "Bearer acc"})],
                   json={"access_token": "acc2", "refresh_token": "ref2", "expires_in": 60})
    new = auth.refresh_grant(BASE, auth.Tokens("acc", "ref", 0.0))
    assert (new.access_token, new.refresh_token) == ("acc2", "ref2")
    with pytest.raises(auth.ThreatQAuthError, match="no refresh token"):
        auth.refresh_grant(BASE, auth.Tokens("acc", None, 0.0))


@pytest.mark.parametrize("status, body, expected", [
    (400, {"errors": ["The user credentials were incorrect."]},
     "rejected the credentials (HTTP 400: The user credentials were incorrect.)"),
    (400, {"data": {"errors": {"email": ["The email field is required."]}}},
     "rejected the credentials (HTTP 400: The email field is required.)"),
    (401, {"error": "invalid_client", "error_description": "Client authentication failed"},
     "rejected the credentials (HTTP 401: Client authentication failed; invalid_client)"),
    (500, "<html>oops</html>", "token request failed (HTTP 500)"),
    (503, {"message": "maintenance"}, "token request failed (HTTP 503: maintenance)"),
    (200, {"errors": ["Account locked"]}, "rejected the credentials (HTTP 200: Account locked)"),
    (200, {"token_type": "bearer"}, "without an access_token"),
    (200, ["not", "an", "object"], "unexpected JSON shape"),
    (200, "not json", "not JSON"),
])
@responses.activate
def test_every_failure_is_a_clear_error_without_the_password(status, body, expected):
    kwargs = {"json": body} if not isinstance(body, str) else {"body": body}
    responses.post(f"{BASE}/api/token", status=status, **kwargs)
    with pytest.raises(auth.ThreatQAuthError) as err:
        auth.password_grant(BASE, "cid", "a@example.org", PASSWORD)
    assert expected in str(err.value)
    assert PASSWORD not in str(err.value)


@responses.activate
def test_connection_errors_name_the_host_not_the_password():
    responses.post(f"{BASE}/api/token", body=requests.ConnectionError(f"refused {PASSWORD}"))
    with pytest.raises(auth.ThreatQAuthError) as err:
        auth.password_grant(BASE, "cid", "a@example.org", PASSWORD)
    assert str(err.value) == f"cannot reach ThreatQ at {BASE}: ConnectionError"


@pytest.mark.parametrize("expires_in", [None, 0, -5, "3600", True])
def test_unusable_expires_in_falls_back_to_the_sdk_lifetime(expires_in):
    tokens = auth.Tokens.from_response({"access_token": "a", "expires_in": expires_in}, now=1000.0)
    assert tokens.expires_at == 1000.0 + auth.DEFAULT_EXPIRES_IN_S


def test_simulator_token_flow_password_refresh_and_expiry():
    sim = ThreatQSimulator(users={"a@example.org": PASSWORD}, token_ttl=3600)
    with LoopbackServer(sim.app) as server:
        tokens = auth.password_grant(server.url, sim.client_id, "a@example.org", PASSWORD)
        assert sim.token_valid(f"Bearer {tokens.access_token}")
        refreshed = auth.refresh_grant(server.url, tokens)
        assert not sim.token_valid(f"Bearer {tokens.access_token}")  # replaced
        assert sim.token_valid(f"Bearer {refreshed.access_token}")
        with pytest.raises(auth.ThreatQAuthError, match="refresh token is invalid"):
            auth.refresh_grant(server.url, tokens)  # a refresh token is single-use
        sim.expire_all_tokens()
        assert not sim.token_valid(f"Bearer {refreshed.access_token}")
        with pytest.raises(auth.ThreatQAuthError, match="client credentials are invalid"):
            auth.password_grant(server.url, "other-client", "a@example.org", PASSWORD)
        # The all-in-the-body style (XSOAR, Polarity) is accepted too.
        response = requests.post(server.url + "/api/token", timeout=10,
                                 data=json.dumps({"grant_type": "password", "client_id": sim.client_id,
                                                  "email": "a@example.org", "password": PASSWORD}),
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 200 and "access_token" in response.json()
