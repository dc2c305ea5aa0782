"""server.py's own checks, without gunicorn: the listening address before binding, the settings line.

The real daemon's behaviour (exit code 2 and one line for a port in use, short settings lines at
-v 3) is tested end to end in tests/e2e/test_daemon.py.
"""
from __future__ import annotations

import socket

import pytest
from gunicorn import config as gunicorn_config

from tq_mw_thehive import server


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_a_port_another_process_listens_on_is_named_as_in_use(busy_port, monkeypatch):
    monkeypatch.delenv("GUNICORN_FD", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert server.bind_problem(server.Listen(ip="127.0.0.1", port=busy_port)) == "address already in use"
    assert server.bind_problem(server.Listen(ip="0.0.0.0", port=busy_port)) == "address already in use"


def test_a_free_port_and_port_0_pass(monkeypatch):
    monkeypatch.delenv("GUNICORN_FD", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert server.bind_problem(server.Listen(ip="127.0.0.1", port=free)) is None
    assert server.bind_problem(server.Listen(ip="127.0.0.1", port=0)) is None


def test_an_address_of_another_host_is_named(monkeypatch):
    monkeypatch.delenv("GUNICORN_FD", raising=False)
    assert server.bind_problem(server.Listen(ip="192.0.2.1", port=5000)) == "cannot assign requested address"


@pytest.mark.parametrize("variable", ["GUNICORN_FD", "LISTEN_FDS"])
def test_inherited_sockets_are_not_checked(busy_port, monkeypatch, variable):
    """gunicorn's USR2 re-exec runs the command again with the port held by design."""
    monkeypatch.setenv(variable, "3")
    assert server.bind_problem(server.Listen(ip="127.0.0.1", port=busy_port)) is None


def test_changed_settings_are_the_ones_that_differ_from_gunicorns_defaults():
    cfg = gunicorn_config.Config()
    cfg.set("bind", ["127.0.0.1:5000"])
    cfg.set("workers", 3)
    cfg.set("when_ready", server._when_ready)
    cfg.set("proc_name", "x" * 500)
    changed = dict(server.changed_settings(cfg))
    assert changed["bind"] == "['127.0.0.1:5000']" and changed["workers"] == "3"
    assert changed["when_ready"] == "tq_mw_thehive.server._when_ready"
    assert len(changed["proc_name"]) == server._SHOWN_MAX and changed["proc_name"].endswith("...")
    assert set(changed) == {"bind", "workers", "when_ready", "proc_name"}
