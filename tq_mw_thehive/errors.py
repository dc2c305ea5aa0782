"""What a failure means for an event: the two bases every error of the sync path derives from.

The worker decides between "retry later" and "dead letter" by the base alone, so a module that
adds an error says what it means where it raises it, and the worker never learns its name.
"""
from __future__ import annotations

import sqlite3
from typing import Optional


class TransientError(Exception):
    """The same event may well succeed later (ThreatQ or TheHive down, timing out, rate limiting,
    refusing a key that an operator may fix): the event is retried with backoff."""


class PermanentError(Exception):
    """Sending the same event again cannot help (ThreatQ refused the data, the payload cannot be
    read, a needed setting is missing): the event becomes a dead letter, replayable by hand."""


TRANSIENT = "transient"
PERMANENT = "permanent"


def classify(exc: BaseException) -> Optional[str]:
    """``TRANSIENT``, ``PERMANENT``, or None for an unexpected error (a bug), which the worker
    retries a few times and then dead-letters.

    ``sqlite3.OperationalError`` (the state database locked, full, read-only, or moved) is the
    one outside error counted as transient: it is the local disk, not the event, that fails."""
    if isinstance(exc, TransientError) or isinstance(exc, sqlite3.OperationalError):
        return TRANSIENT
    if isinstance(exc, PermanentError):
        return PERMANENT
    return None
