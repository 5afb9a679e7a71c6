"""PendingChanges (proxy/datapath/pending.py): the notes of one transaction
across savepoints, without a server."""

from __future__ import annotations

from types import SimpleNamespace

from pgmux.proxy.datapath.pending import UNKNOWN, PendingChanges, abandoned

SET, ROLE = "set", "role"


def test_rollback_to_forgets_what_came_after_the_savepoint_and_keeps_it() -> None:
    notes = PendingChanges()
    notes.note(SET, True)
    notes.savepoint(b"a")
    notes.note(ROLE, True)
    notes.savepoint(b"b")
    notes.note(SET, False)
    notes.rollback_to(b"a")
    assert notes.changes == [(SET, True)]
    notes.note(ROLE, True)  # "a" is still there: a second ROLLBACK TO a
    notes.rollback_to(b"a")
    assert notes.changes == [(SET, True)]
    assert notes.take() == [(SET, True)]
    assert notes.changes == [] and notes.savepoints == []


def test_release_folds_into_the_savepoint_before() -> None:
    notes = PendingChanges()
    notes.savepoint(b"a")
    notes.savepoint(b"b")
    notes.note(SET, True)
    notes.release(b"b")
    notes.savepoint(b"c")
    notes.note(ROLE, True)
    notes.rollback_to(b"c")
    assert notes.changes == [(SET, True)]
    notes.rollback_to(b"a")
    assert notes.changes == []


def test_the_latest_savepoint_of_a_name_counts() -> None:
    notes = PendingChanges()
    notes.savepoint(b"a")
    notes.note(SET, True)
    notes.savepoint(b"a")
    notes.note(ROLE, True)
    notes.rollback_to(b"a")
    assert notes.changes == [(SET, True)]


def test_an_unknown_savepoint_keeps_what_was_made_and_drops_the_clears() -> None:
    notes = PendingChanges()
    notes.note(SET, True)
    notes.savepoint(UNKNOWN)
    notes.note(SET, False)
    notes.note(ROLE, True)
    notes.rollback_to(UNKNOWN)
    assert notes.changes == [(SET, True), (ROLE, True)]
    notes.rollback_to(b"never-seen")
    assert notes.changes == [(SET, True), (ROLE, True)]


def test_a_client_gone_mid_transaction_leaves_its_state_to_be_reset() -> None:
    """What it made counts (its set_config as a plain SET, the kind the reset
    knows), unless the transaction is rolled back."""
    server = SimpleNamespace(pending=PendingChanges(), dirty=set())
    server.pending.note("set_config", True)
    server.pending.note(ROLE, True)
    server.pending.note(SET, False)
    abandoned(server, rolled_back=False, mode="pin")  # type: ignore[arg-type]
    assert server.dirty == {SET, ROLE} and server.pending.changes == []
    server = SimpleNamespace(pending=PendingChanges(), dirty=set())
    server.pending.note(SET, True)
    abandoned(server, rolled_back=True, mode="pin")  # type: ignore[arg-type]
    assert server.dirty == set() and server.pending.changes == []
