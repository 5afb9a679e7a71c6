"""protocol.msgtypes against PostgreSQL's src/include/libpq/protocol.h.

The table is copied from protocol.h (PostgreSQL 17), written as the C
source spells it; each entry must exist in msgtypes under its constant-case
name with the same byte, and msgtypes must hold nothing the table lacks.
"""

from __future__ import annotations

import re

import pytest

from pgmux.protocol import msgtypes

# (name in protocol.h without the PqMsg_ prefix, the byte it #defines)
PROTOCOL_H = [
    # frontend
    ("Bind", "B"),
    ("Close", "C"),
    ("Describe", "D"),
    ("Execute", "E"),
    ("FunctionCall", "F"),
    ("Flush", "H"),
    ("Parse", "P"),
    ("Query", "Q"),
    ("Sync", "S"),
    ("Terminate", "X"),
    ("CopyFail", "f"),
    ("GSSResponse", "p"),
    ("PasswordMessage", "p"),
    ("SASLInitialResponse", "p"),
    ("SASLResponse", "p"),
    # both
    ("CopyDone", "c"),
    ("CopyData", "d"),
    # backend
    ("ParseComplete", "1"),
    ("BindComplete", "2"),
    ("CloseComplete", "3"),
    ("NotificationResponse", "A"),
    ("CommandComplete", "C"),
    ("DataRow", "D"),
    ("ErrorResponse", "E"),
    ("CopyInResponse", "G"),
    ("CopyOutResponse", "H"),
    ("EmptyQueryResponse", "I"),
    ("BackendKeyData", "K"),
    ("NoticeResponse", "N"),
    ("AuthenticationRequest", "R"),
    ("ParameterStatus", "S"),
    ("RowDescription", "T"),
    ("FunctionCallResponse", "V"),
    ("CopyBothResponse", "W"),
    ("ReadyForQuery", "Z"),
    ("NoData", "n"),
    ("PortalSuspended", "s"),
    ("ParameterDescription", "t"),
    ("NegotiateProtocolVersion", "v"),
]

# Not message types: the ReadyForQuery status (libpq) and Describe/Close targets.
OTHER_BYTES = {
    "TX_IDLE": "I",
    "TX_IN_BLOCK": "T",
    "TX_FAILED": "E",
    "TARGET_STATEMENT": "S",
    "TARGET_PORTAL": "P",
}


def constant_case(name: str) -> str:
    """PqMsg CamelCase to Python's constant case: SASLInitialResponse -> SASL_INITIAL_RESPONSE."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


@pytest.mark.parametrize(("name", "byte"), PROTOCOL_H)
def test_value_matches_protocol_h(name, byte):
    assert getattr(msgtypes, constant_case(name)) == ord(byte)


@pytest.mark.parametrize(("name", "byte"), sorted(OTHER_BYTES.items()))
def test_status_and_target_bytes(name, byte):
    assert getattr(msgtypes, name) == ord(byte)


def test_nothing_beyond_the_table():
    declared = {name for name in vars(msgtypes) if name.isupper()}
    expected = {constant_case(name) for name, _ in PROTOCOL_H} | set(OTHER_BYTES)
    assert declared == expected


def test_constant_case():
    assert constant_case("SASLInitialResponse") == "SASL_INITIAL_RESPONSE"
    assert constant_case("GSSResponse") == "GSS_RESPONSE"
    assert constant_case("ReadyForQuery") == "READY_FOR_QUERY"
