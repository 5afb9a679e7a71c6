"""Message type bytes of the PostgreSQL wire protocol, by name.

PostgreSQL's src/include/libpq/protocol.h (and PgBouncer, which uses it)
spells these ``PqMsg_ReadyForQuery`` and so on; here they are the same names
in Python's constant case, as ints so that ``data[pos] == READY_FOR_QUERY``
compares without building a bytes object. One letter often means two
different messages depending on who sends it ('S' is Sync from a client and
ParameterStatus from a server), so the two directions are listed apart.

Hot-path modules bind the ones they use to module globals at import time
(a global read is cheaper than an attribute of this module).
"""

from __future__ import annotations

# --- frontend: client to server --------------------------------------------

BIND = ord("B")
CLOSE = ord("C")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FUNCTION_CALL = ord("F")
FLUSH = ord("H")
PARSE = ord("P")
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")
COPY_FAIL = ord("f")
# GSSResponse, PasswordMessage, SASLInitialResponse and SASLResponse share 'p'.
PASSWORD_MESSAGE = ord("p")
GSS_RESPONSE = PASSWORD_MESSAGE
SASL_INITIAL_RESPONSE = PASSWORD_MESSAGE
SASL_RESPONSE = PASSWORD_MESSAGE

# --- both directions ---------------------------------------------------------

COPY_DONE = ord("c")
COPY_DATA = ord("d")

# --- backend: server to client -----------------------------------------------

PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
NOTIFICATION_RESPONSE = ord("A")
COMMAND_COMPLETE = ord("C")
DATA_ROW = ord("D")
ERROR_RESPONSE = ord("E")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
EMPTY_QUERY_RESPONSE = ord("I")
BACKEND_KEY_DATA = ord("K")
NOTICE_RESPONSE = ord("N")
AUTHENTICATION_REQUEST = ord("R")
PARAMETER_STATUS = ord("S")
ROW_DESCRIPTION = ord("T")
FUNCTION_CALL_RESPONSE = ord("V")
COPY_BOTH_RESPONSE = ord("W")
READY_FOR_QUERY = ord("Z")
NO_DATA = ord("n")
PORTAL_SUSPENDED = ord("s")
PARAMETER_DESCRIPTION = ord("t")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# --- the status byte of ReadyForQuery (libpq's PQTRANS_*) --------------------

TX_IDLE = ord("I")  # no transaction open
TX_IN_BLOCK = ord("T")  # inside a transaction block
TX_FAILED = ord("E")  # inside a failed transaction block: only ROLLBACK helps

# --- the target byte of Describe and Close -----------------------------------

TARGET_STATEMENT = ord("S")
TARGET_PORTAL = ord("P")
