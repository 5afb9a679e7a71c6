"""Every builder through a parser (or through the framer and a manual check)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgmux.protocol import messages as m
from pgmux.protocol.codec import INT16, INT32, UINT16
from pgmux.protocol.errors import ProtocolError
from pgmux.protocol.extended import bind_names, rename_bind
from pgmux.protocol.framing import MessageReader
from pgmux.protocol.startup import StartupReader

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)


def body_of(raw: bytes, kind: str) -> bytes:
    """The body of `raw`, which must be exactly one message of type `kind`."""
    reader = MessageReader()
    reader.feed(raw)
    msg = reader.next_message()
    assert msg is not None and reader.buffered() == 0
    assert chr(msg[0]) == kind
    return msg[1]


# --- backend -----------------------------------------------------------------


def test_authentication_requests():
    assert m.parse_authentication(body_of(m.authentication_ok(), "R")) == (m.AUTH_OK, b"")
    assert m.parse_authentication(body_of(m.authentication_cleartext_password(), "R")) == (3, b"")
    assert m.parse_authentication(body_of(m.authentication_md5_password(b"salt"), "R")) == (
        5,
        b"salt",
    )
    code, rest = m.parse_authentication(body_of(m.authentication_sasl(["SCRAM-SHA-256"]), "R"))
    assert code == m.AUTH_SASL and m.parse_sasl_mechanisms(rest) == ["SCRAM-SHA-256"]
    raw = m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert m.parse_sasl_mechanisms(m.parse_authentication(body_of(raw, "R"))[1]) == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
    ]
    assert m.parse_authentication(body_of(m.authentication_sasl_continue(b"r=x"), "R")) == (
        11,
        b"r=x",
    )
    assert m.parse_authentication(body_of(m.authentication_sasl_final(b"v=y"), "R")) == (
        12,
        b"v=y",
    )


def test_md5_salt_must_be_four_bytes():
    with pytest.raises(ValueError):
        m.authentication_md5_password(b"abc")


def test_parameter_status():
    body = body_of(m.parameter_status("TimeZone", "Europe/Berlin"), "S")
    assert m.parse_parameter_status(body) == ("TimeZone", "Europe/Berlin")


@pytest.mark.parametrize("pid", [0, 1, 2**31 - 1, 2**32 - 1])
def test_backend_key_data(pid):
    body = body_of(m.backend_key_data(pid, b"\x00\x01\x02\x03"), "K")
    assert m.parse_backend_key_data(body) == (pid, b"\x00\x01\x02\x03")


def test_backend_key_data_negative_pid_wraps():
    body = body_of(m.backend_key_data(-1, b"abcd"), "K")
    assert m.parse_backend_key_data(body) == (2**32 - 1, b"abcd")


def test_backend_key_data_long_key():
    key = bytes(range(32))
    assert m.parse_backend_key_data(body_of(m.backend_key_data(7, key), "K")) == (7, key)


@pytest.mark.parametrize("status", ["I", "T", "E"])
def test_ready_for_query(status):
    assert body_of(m.ready_for_query(status), "Z") == status.encode()


def test_ready_for_query_default_and_bad():
    assert m.ready_for_query() == b"Z\0\0\0\x05I"
    with pytest.raises(ValueError):
        m.ready_for_query("X")


def test_error_response():
    raw = m.error_response("53300", "no more connections allowed (max_client_conn)")
    assert m.parse_error_fields(body_of(raw, "E")) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "53300",
        "M": "no more connections allowed (max_client_conn)",
    }


def test_error_response_with_detail_and_hint():
    raw = m.error_response("08P01", "bad", severity="FATAL", detail="why", hint="fix it")
    fields = m.parse_error_fields(body_of(raw, "E"))
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08P01",
        "M": "bad",
        "D": "why",
        "H": "fix it",
    }


def test_notice_response():
    fields = m.parse_error_fields(body_of(m.notice_response("01000", "careful", hint="h"), "N"))
    assert fields == {"S": "NOTICE", "V": "NOTICE", "C": "01000", "M": "careful", "H": "h"}


def test_row_description():
    cols = [("database", 25), ("cl_active", 20), ("avg_wait", 1700)]
    body = body_of(m.row_description(cols), "T")
    assert m.parse_row_description(body) == cols
    # text format, typlen -1, typmod -1, table oid 0, attnum 0
    name_end = body.index(b"\0", 2) + 1
    assert body[name_end : name_end + 18] == (
        INT32.pack(0) + INT16.pack(0) + INT32.pack(25) + INT16.pack(-1) + INT32.pack(-1)
    ) + INT16.pack(0)


def test_data_row():
    body = body_of(m.data_row(["abc", None, b"\x00\xff", ""]), "D")
    assert m.parse_data_row(body) == [b"abc", None, b"\x00\xff", b""]


def test_command_complete_query_and_empty():
    assert m.parse_command_complete(body_of(m.command_complete("SELECT 3"), "C")) == "SELECT 3"
    assert m.parse_query(body_of(m.query("select 'é'"), "Q")) == "select 'é'"
    assert body_of(m.empty_query_response(), "I") == b""


@pytest.mark.parametrize(
    ("builder", "kind"),
    [
        (m.parse_complete, "1"),
        (m.bind_complete, "2"),
        (m.close_complete, "3"),
        (m.no_data, "n"),
        (m.sync, "S"),
        (m.flush, "H"),
        (m.terminate, "X"),
    ],
)
def test_empty_messages(builder, kind):
    assert body_of(builder(), kind) == b""


def test_parameter_description():
    body = body_of(m.parameter_description([23, 25, 4294967295]), "t")
    assert body == UINT16.pack(3) + b"\0\0\0\x17\0\0\0\x19\xff\xff\xff\xff"


# --- frontend ----------------------------------------------------------------


def test_password_message():
    assert m.parse_password_message(body_of(m.password_message("secret"), "p")) == b"secret"
    assert body_of(m.password_message(b"raw"), "p") == b"raw"


def test_sasl_messages():
    body = body_of(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"), "p")
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert body_of(m.sasl_response(b"c=biws"), "p") == b"c=biws"


def test_sasl_initial_response_without_data():
    assert m.parse_sasl_initial_response(b"SCRAM-SHA-256\0" + INT32.pack(-1)) == (
        "SCRAM-SHA-256",
        b"",
    )


def test_parse():
    assert m.parse_parse(body_of(m.parse("s1", "select $1, $2", [23, 0]), "P")) == (
        "s1",
        "select $1, $2",
        [23, 0],
    )
    assert m.parse_parse(body_of(m.parse("", "select 1"), "P")) == ("", "select 1", [])


def test_parse_many_parameters():
    oids = [25] * 40000  # more than Int16 allows signed: PostgreSQL reads it unsigned
    assert m.parse_parse(body_of(m.parse("", "q", oids), "P"))[2] == oids


def test_bind():
    body = body_of(m.bind("p1", "s1", [b"42", None, b""]), "B")
    assert body == (
        b"p1\0s1\0"
        + INT16.pack(0)  # all parameters text
        + INT16.pack(3)
        + INT32.pack(2)
        + b"42"
        + INT32.pack(-1)
        + INT32.pack(0)
        + INT16.pack(0)  # all results text
    )


def test_describe_execute_close():
    assert body_of(m.describe("S", "s1"), "D") == b"Ss1\0"
    assert body_of(m.describe("P", ""), "D") == b"P\0"
    assert body_of(m.execute("p1"), "E") == b"p1\0" + INT32.pack(0)
    assert body_of(m.execute("", 10), "E") == b"\0" + INT32.pack(10)
    assert body_of(m.close("S", "s1"), "C") == b"Ss1\0"
    with pytest.raises(ValueError):
        m.close("X", "s1")


def test_startup_builders_through_reader():
    reader = StartupReader()
    reader.feed(m.ssl_request())
    assert type(reader.next_event()).__name__ == "SSLRequest"
    reader.feed(m.startup_message({"user": "ü", "database": "d"}))
    assert reader.next_event().params == {"user": "ü", "database": "d"}


# --- parsers refuse malformed bodies ------------------------------------------


@pytest.mark.parametrize(
    ("parser", "body"),
    [
        (m.parse_error_fields, b"SERROR"),  # unterminated field
        (m.parse_error_fields, b"SERROR\0"),  # no final terminator
        (m.parse_error_fields, b"SERROR\0\0x"),  # trailing bytes
        (m.parse_parameter_status, b"a\0"),
        (m.parse_parameter_status, b"a\0b\0c"),
        (m.parse_backend_key_data, b"\0\0\0\x01ab"),
        (m.parse_authentication, b"\0\0"),
        (m.parse_sasl_mechanisms, b"SCRAM-SHA-256\0"),
        (m.parse_row_description, b"\0\x01col\0"),
        (m.parse_data_row, b"\0\x01\0\0\0\x05abc"),
        (m.parse_data_row, b"\0\x01\xff\xff\xff\xfe"),  # length -2
        (m.parse_command_complete, b"SELECT 1"),
        (m.parse_command_complete, b"SELECT\x001\0"),
        (m.parse_query, b"\xff\0"),
        (m.parse_password_message, b"pw"),
        (m.parse_password_message, b"p\0w\0"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256\0\0\0\0\x09abc"),
        (m.parse_sasl_initial_response, b"SCRAM-SHA-256\0\0\0\0\x01ab"),
        (m.parse_parse, b"s\0q\0\0\x02\0\0\0\x17"),
    ],
)
def test_parsers_reject(parser, body):
    with pytest.raises(ProtocolError):
        parser(body)


# --- property round trips ----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(code=st.text("0123456789ABCDEFP", min_size=5, max_size=5), msg=text, detail=text)
def test_error_response_property(code, msg, detail):
    fields = m.parse_error_fields(body_of(m.error_response(code, msg, detail=detail), "E"))
    assert (fields["C"], fields["M"], fields["D"]) == (code, msg, detail)


@settings(max_examples=300, deadline=None)
@given(cols=st.lists(st.tuples(text, st.integers(0, 2**32 - 1)), max_size=8))
def test_row_description_property(cols):
    assert m.parse_row_description(body_of(m.row_description(cols), "T")) == cols


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=8))
def test_data_row_property(values):
    assert m.parse_data_row(body_of(m.data_row(values), "D")) == values


@settings(max_examples=300, deadline=None)
@given(name=text, sql=text, oids=st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_parse_property(name, sql, oids):
    assert m.parse_parse(body_of(m.parse(name, sql, oids), "P")) == (name, sql, oids)


@settings(max_examples=300, deadline=None)
@given(params=st.dictionaries(text.filter(bool), text, max_size=5), user=text.filter(bool))
def test_startup_message_property(params, user):
    params = {**params, "user": user}
    reader = StartupReader()
    reader.feed(m.startup_message(params))
    event = reader.next_event()
    expected = dict(params)
    if not expected.get("database"):
        expected["database"] = user
    assert event.params == expected


# --- extended-query renaming ---------------------------------------------------

names = st.binary(max_size=12).filter(lambda b: b"\0" not in b)


@given(portal=names, name=names, new=names, params=st.binary(max_size=40))
def test_rename_bind_keeps_portal_and_parameters(portal, name, new, params):
    """pgmux renames a Bind's statement by offsets; the rest must come through unchanged."""
    body = portal + b"\0" + name + b"\0" + params
    portal_end, name_end = bind_names(body, {})  # any bytes (no encoding): offsets only
    assert body[:portal_end] == portal and body[portal_end + 1 : name_end] == name
    assert body_of(rename_bind(body, portal_end, name_end, new), "B") == (
        portal + b"\0" + new + b"\0" + params
    )


def test_bind_names_refuses_a_bind_without_terminators():
    with pytest.raises(ProtocolError):
        bind_names(b"portal\0statement")
