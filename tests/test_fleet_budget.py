"""The fleet's server budget (proxy/daemon/budget.py) in --check and at startup.

The test PostgreSQL has max_connections 100: nine instances of 12 servers
(108) do not fit, two (24) do. --check says so when PostgreSQL answers and
still passes when it does not; the daemon logs the same at startup.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgmux.tempgres import TempPostgres, free_port

pytestmark = pytest.mark.timeout(90)


def fleet_config(pg: TempPostgres, instances: int, port: int | None = None) -> dict[str, Any]:
    members = [{"id": i, "host": "127.0.0.1", "port": 6432 + i} for i in range(1, instances + 1)]
    return {
        "pool": {"size": 6, "max_server_connections": 12},
        "peers": {"peer_id": 1, "members": members},
        "databases": {
            # the login pgmux asks PostgreSQL with: a fixed user, its password in users.txt
            "appdb": {"host": pg.host, "port": port or pg.port, "user": "app"},
        },
    }


def check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config = {**config, "auth": {"users_file": "users.txt"}}
    (tmp_path / "users.txt").write_text('"app" "app-secret"\n')
    (tmp_path / "pgmux.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "pgmux", "--check", "-c", "pgmux.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_warns_when_the_fleet_exceeds_max_connections(pg: TempPostgres, tmp_path) -> None:
    result = check(tmp_path, fleet_config(pg, 9))
    assert result.returncode == 0, result.stderr
    assert "9 instance(s) x 12 servers (pool.max_server_connections) = 108" in result.stdout
    assert "max_connections 100" in result.stdout
    assert "warning: the fleet may open 108 server connections" in result.stderr


def test_check_is_quiet_when_the_fleet_fits(pg: TempPostgres, tmp_path) -> None:
    result = check(tmp_path, fleet_config(pg, 2))
    assert result.returncode == 0, result.stderr
    assert "= 24" in result.stdout and "usable" in result.stdout
    assert "warning" not in result.stderr


def test_check_passes_when_postgresql_is_unreachable(pg: TempPostgres, tmp_path) -> None:
    result = check(tmp_path, fleet_config(pg, 9, port=free_port()))
    assert result.returncode == 0, result.stderr
    assert "not reachable" in result.stdout
    assert "warning" not in result.stderr


def test_startup_logs_the_budget_and_warns(pg: TempPostgres, pgmux: Any) -> None:
    config = fleet_config(pg, 9)
    mux = pgmux({**config, "databases": {**config["databases"], "*": {"host": pg.host}}})
    deadline = time.monotonic() + 20
    while "server_budget_exceeded" not in mux.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = mux.logs()
    assert "9 instance(s) x 12 servers" in logs
    assert "server_budget_exceeded" in logs and "allows 97" in logs
