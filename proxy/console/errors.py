"""The error a console command answers with; the console stays usable after it."""

from __future__ import annotations

from pgmux.protocol import sqlstate


class ConsoleError(Exception):
    """Sent as an ErrorResponse with CODE; the connection carries on."""

    def __init__(self, code: str, message: str, pgbouncer_message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.pgbouncer_message = pgbouncer_message or message  # where PgBouncer words it otherwise


def syntax_error(query: str) -> ConsoleError:
    return ConsoleError(sqlstate.SYNTAX_ERROR, f"invalid command '{query}', use SHOW HELP;")
