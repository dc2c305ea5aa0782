"""What the daemon learns about ThreatQ's optional calls, kept in the state database for `check`
and the status page (table ``meta``, keys ``threatq_capability:<step>``)."""
from __future__ import annotations

import time

from tq_mw_thehive import state
from tq_mw_thehive.sync_state import CAPABILITY_PREFIX, SyncState, threatq_capabilities


def test_the_latest_word_on_each_step_is_kept_with_its_time(tmp_path):
    db = tmp_path / "state.db"
    store = SyncState.open(db)
    before = time.time()
    store.record_capability("source_tlp", True)
    store.record_capability("tag_delete", False, 405)
    store.record_capability("source_tlp", False, 404)  # another process learned otherwise later
    found = threatq_capabilities(db)
    assert {s: (c.supported, c.status) for s, c in found.items()} == {"source_tlp": (False, 404),
                                                                       "tag_delete": (False, 405)}
    assert all(before <= c.at <= time.time() for c in found.values())
    assert store.capabilities() == found


def test_other_meta_rows_and_damaged_ones_are_ignored(tmp_path):
    db = tmp_path / "state.db"
    con = state.open_state(db)
    with con:
        con.execute("INSERT INTO meta (key, value) VALUES ('backfill_mark', '123')")
        con.execute("INSERT INTO meta (key, value) VALUES (?, 'not json')", (CAPABILITY_PREFIX + "tag_list",))
        con.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (CAPABILITY_PREFIX + "query:events",
                                                                     '{"state": "supported", "at": 5}'))
    con.close()
    found = threatq_capabilities(db)
    assert list(found) == ["query:events"] and found["query:events"].supported and found["query:events"].at == 5.0
