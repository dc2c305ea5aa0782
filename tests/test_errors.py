"""The worker decides retry or dead letter by an error's base alone (tq_mw_thehive.errors)."""
import sqlite3

import pytest

from tq_mw_thehive import errors
from tq_mw_thehive.state import StateMoved
from tq_mw_thehive.sync import PermanentSyncError
from tq_mw_thehive.thehive.api import TheHiveNotFound, TheHiveRefused, TheHiveUnavailable
from tq_mw_thehive.thehive.model import ModelError
from tq_mw_thehive.threatq.api import ThreatQPermanentError, ThreatQStepRefused, ThreatQUnavailable


@pytest.mark.parametrize("exc, kind", [
    (ThreatQUnavailable("down", 503), errors.TRANSIENT),
    (ThreatQPermanentError("refused", 400), errors.PERMANENT),
    (ThreatQStepRefused("tag_delete", 405), errors.PERMANENT),
    (TheHiveUnavailable("down"), errors.TRANSIENT),
    (TheHiveRefused("HTTP 400"), errors.PERMANENT),
    (TheHiveNotFound("gone"), errors.PERMANENT),
    (ModelError("no _id"), errors.PERMANENT),
    (PermanentSyncError("no api key"), errors.PERMANENT),
    (sqlite3.OperationalError("database is locked"), errors.TRANSIENT),
    (StateMoved("replaced"), errors.TRANSIENT),
    (KeyError("a bug"), None),
    (sqlite3.IntegrityError("a bug too"), None),
])
def test_each_error_of_the_sync_path_has_one_meaning(exc, kind):
    assert errors.classify(exc) == kind


def test_no_error_class_is_both_transient_and_permanent():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    both = set(subclasses(errors.TransientError)) & set(subclasses(errors.PermanentError))
    assert both == set()
