"""Shared test fixtures: samples, a written config directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from tq_mw_thehive import logs

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_NAMES = sorted(p.name for p in SAMPLES.glob("*.json"))
WEBHOOK_TOKEN = "test-webhook-token-0123456789abcdef"
THEHIVE_KEY = "thehive-api-key-fedcba9876543210"


def sample_text(name: str) -> str:
    return (SAMPLES / name).read_text(encoding="utf-8")


def sample(name: str) -> Dict[str, Any]:
    return json.loads(sample_text(name))


def minimal_config(**sections: Dict[str, Any]) -> Dict[str, Any]:
    """A valid config.yaml document; ``sections`` update its sections key by key."""
    raw: Dict[str, Any] = {
        # Loopback ports nobody listens on: a test never resolves or contacts another host.
        "threatq": {"host": "http://127.0.0.1:9", "client_id": "tq-client-id"},
        "thehive": {"url": "http://127.0.0.1:9000", "api_key": THEHIVE_KEY},
        "webhook": {"auth": "bearer", "token": WEBHOOK_TOKEN},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


def write_config(config_dir: Path, **sections: Dict[str, Any]) -> Path:
    path = config_dir / "config.yaml"
    path.write_text(yaml.safe_dump(minimal_config(**sections)), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write_config(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def restore_logging():
    """Code under test calls logs.setup(), which replaces the root logger's handlers and
    registers secrets: put both back so that no test sees another's logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("urllib3", "werkzeug")}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    with logs._secrets_lock:
        logs._secrets.clear()
