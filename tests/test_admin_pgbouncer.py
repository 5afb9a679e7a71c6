"""The console as PgBouncer's users and tools expect it (PgBouncer 1.25).

Who gets in without a password (the daemon's own OS user on the unix
socket), PgBouncer's setting names in SET and SHOW CONFIG, the SHOW STATS
column names, KILL of every database and SHUTDOWN's two waiting modes.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
from helpers import PgmuxFactory
from test_admin_console import console_config

pytestmark = pytest.mark.timeout(90)


def psql_as(
    mux: Any, host: str, user: str, sql: str, password: str = ""
) -> subprocess.CompletedProcess[str]:
    """psql to the console as USER, with no password unless PASSWORD is given."""
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    if password:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-X", "-A", "-w", "-F", "\t", "-P", "footer=off", "-h", host, "-p",
         str(mux.port), "-U", user, "-d", "pgbouncer", "-c", sql],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


# --- the daemon's own OS user ----------------------------------------------------


@pytest.mark.parametrize("user", ["pgbouncer", "pgmux"])
def test_own_os_user_gets_in_over_the_unix_socket_only(pgmux: PgmuxFactory, user: str) -> None:
    # Neither name is in admin.users nor in the users file; the test runs as
    # the daemon's OS user, which SO_PEERCRED shows on the unix socket.
    mux = pgmux(console_config())
    done = psql_as(mux, mux.socket_dir, user, "SHOW POOLS")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("database\tuser\tcl_active")
    # An admin: commands work too, not only SHOW.
    done = psql_as(mux, mux.socket_dir, user, "PAUSE; RESUME")
    assert done.returncode == 0, done.stderr
    # Over TCP the peer is unknown: the usual password check, which fails.
    done = psql_as(mux, "127.0.0.1", user, "SHOW POOLS")
    assert done.returncode != 0
    assert "password" in done.stderr, done.stderr
    done = psql_as(mux, "127.0.0.1", user, "SHOW POOLS", password="anything")
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr, done.stderr


def test_other_users_on_the_unix_socket_still_need_their_password(pgmux: PgmuxFactory) -> None:
    mux = pgmux(console_config())
    done = psql_as(mux, mux.socket_dir, "admin", "SHOW POOLS")
    assert done.returncode != 0 and "password" in done.stderr, done.stderr
    done = psql_as(mux, mux.socket_dir, "admin", "SHOW POOLS", password="admin-secret")
    assert done.returncode == 0, done.stderr
    # The own-user rule is for the console only, not for a database.
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    done = subprocess.run(
        ["psql", "-X", "-w", "-h", mux.socket_dir, "-p", str(mux.port), "-U", "pgbouncer",
         "-d", "appdb", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout
