"""Everything the daemon checks before it serves, shared by the CLI and ``tq_driver``.

Each failure is a ``StartupError`` with one clear message and the exit code to
use: 2 for configuration problems the user must fix in ``config.yaml`` or on the
command line, 1 for the environment (state database, log directory).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sqlite3
from pathlib import Path
from typing import Optional

from tq_mw_thehive import config as config_mod
from tq_mw_thehive import logs, private_files, state, state_postgres
from tq_mw_thehive.config import Config, ConfigError
from tq_mw_thehive.inbox import Inbox
from tq_mw_thehive.threatq import api as tq_api
from tq_mw_thehive.threatq import auth as tq_auth
from tq_mw_thehive.type_mapping import TypeMapping, TypeMappingError

log = logging.getLogger(__name__)


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_config(config_dir: Path, *, use_proxy: bool = False, disable_ssl: bool = False) -> Config:
    """The configuration as this run uses it: ``-ep`` keeps ``threatq.proxy``, ``-ds`` drops TLS checks."""
    try:
        cfg = config_mod.load(config_dir)
    except ConfigError as exc:
        raise StartupError(str(exc), 2) from None
    try:
        TypeMapping.from_config(cfg.sync)
    except TypeMappingError as exc:
        raise StartupError(f"{config_mod.config_path(config_dir)}: {exc}", 2) from None
    if use_proxy and not cfg.threatq.proxy:
        raise StartupError(f"{config_mod.config_path(config_dir)}: threatq.proxy: required by "
                           "-ep/--external-proxy but not set", 2)
    threatq = cfg.threatq if use_proxy else dataclasses.replace(cfg.threatq, proxy=None)
    thehive = cfg.thehive
    if disable_ssl:
        threatq = dataclasses.replace(threatq, verify_ssl=False)
        thehive = dataclasses.replace(thehive, verify_ssl=False)
    logs.add_secrets(cfg.secrets())
    return dataclasses.replace(cfg, threatq=threatq, thehive=thehive)


def process_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (killed, not yet reaped by its adopter) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _shared_tokens_stored(cfg: Config) -> bool:
    """Whether a PostgreSQL state already holds the ThreatQ tokens (another host seeded them): then
    this host needs no token file of its own."""
    if not state.is_shared(cfg.state_db):
        return False
    try:
        return state.Store(cfg.state_db).db.execute("SELECT 1 FROM meta WHERE key = ?",
                                                    (tq_api.SHARED_TOKENS_KEY,)).fetchone() is not None
    except sqlite3.Error:
        return False


def prepare(cfg: Config, *, disable_ssl: bool = False) -> None:
    """Open and migrate the state database, register stored secrets, warn about loose files."""
    try:
        state.open_state(cfg.state_db).close()
        freed = Inbox(cfg.state_db).release_leases(f"{socket.gethostname()}:", process_alive)
    except state.StateError as exc:
        raise StartupError(str(exc), 1) from None
    except sqlite3.Error as exc:
        raise StartupError(f"state database {cfg.state_db}: {exc}", 1) from None
    if freed:
        log.info("redoing %d event(s) left in progress by processes that are gone", freed)
    try:
        tokens = tq_auth.load_tokens(cfg.config_dir)
    except tq_auth.ThreatQAuthError as exc:
        log.warning("%s", exc)
        tokens = None
    if tokens is not None:
        logs.add_secrets([tokens.access_token, tokens.refresh_token])
    elif not cfg.threatq.client_secret and not _shared_tokens_stored(cfg):
        log.warning("no ThreatQ tokens in %s: events are accepted and wait until you run "
                    "`tq-mw-thehive configure -c %s`", tq_auth.token_path(cfg.config_dir), cfg.config_dir)
    if disable_ssl:
        log.warning("TLS certificate verification is disabled for ThreatQ and TheHive (-ds)")
    if cfg.webhook.auth == "none":
        log.warning("webhook.auth is none: anyone who can reach the listener can post events")
    secret_files = [config_mod.config_path(cfg.config_dir), tq_auth.token_path(cfg.config_dir)]
    if not state.is_shared(cfg.state_db):
        secret_files.append(cfg.state_db)
    for path in private_files.readable_by_others(secret_files):
        log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    # The master forks the workers next: each opens a pool of its own, so the master keeps none.
    state_postgres.close_all()


def setup_logging(log_dir: Optional[Path], verbosity: Optional[str]) -> None:
    try:
        logs.setup(log_dir, verbosity)
    except logs.LogSetupError as exc:
        raise StartupError(str(exc), 1) from None
