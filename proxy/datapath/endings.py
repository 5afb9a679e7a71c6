"""How pgmux ends a client on its own account.

Each ending has PostgreSQL's SQLSTATE and text for the condition, and
PgBouncer's text, sent with 08P01 under `error_codes: pgbouncer` (a
pgbouncer.ini), so drivers raise what they raise through PgBouncer.
"""

from __future__ import annotations

from typing import NamedTuple

from pgmux.protocol import sqlstate
from pgmux.proxy.config import Config


class Ending(NamedTuple):
    code: str
    message: str
    pgbouncer_message: str


IDLE_TRANSACTION = Ending(
    sqlstate.IDLE_IN_TRANSACTION_TIMEOUT,
    "terminating connection due to idle_transaction timeout",
    "idle transaction timeout",
)
TRANSACTION = Ending(
    sqlstate.TRANSACTION_TIMEOUT,
    "terminating connection due to transaction timeout",
    "transaction timeout",
)
STATEMENT_MODE = Ending(
    sqlstate.ACTIVE_SQL_TRANSACTION,
    "transaction blocks are not allowed in statement pooling mode (pool.mode = statement)",
    "transaction blocks not allowed in statement pooling mode",
)


def ending(config: Config, which: Ending) -> tuple[str, str]:
    """(SQLSTATE, message) for the client: PostgreSQL's, or PgBouncer's."""
    if config.error_codes == "pgbouncer":
        return sqlstate.PROTOCOL_VIOLATION, which.pgbouncer_message
    return which.code, which.message
