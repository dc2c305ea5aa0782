"""The gunicorn entry named by the vendor guide.

    gunicorn -b 0.0.0.0:5000 'tq_mw_thehive.tq_driver:run(c="/etc/tq_labs/")'

gunicorn calls ``run`` in every worker; it returns the WSGI app and starts that
worker's sync thread. A configuration
that cannot be used raises, so gunicorn stops with "worker failed to boot" after
the message has been logged, instead of restarting workers forever.

Add ``-c python:tq_mw_thehive.gunicorn_conf`` for the daemon's own worker and hooks: without
them gunicorn's threads read requests themselves, and a few slow clients can hold them all
(``intake.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tq_mw_thehive import server, startup

DEFAULT_CONFIG_DIR = "/etc/tq_labs/"


def run(c: str = DEFAULT_CONFIG_DIR, n: Optional[str] = None, ll: Optional[str] = None,
        v: Optional[str] = None, ep: bool = False, ds: bool = False):
    """``c``: config dir; ``n``: app name; ``ll``/``v``/``ep``/``ds``: as the CLI's -ll/-v/-ep/-ds."""
    try:
        startup.setup_logging(Path(ll) if ll else None, v)
        cfg = startup.load_config(Path(c), use_proxy=ep, disable_ssl=ds)
        startup.prepare(cfg, disable_ssl=ds)
    except startup.StartupError as exc:
        logging.getLogger(__name__).critical("cannot start: %s", exc)
        raise
    return server.start_app(cfg, n or "tq_mw_thehive")
