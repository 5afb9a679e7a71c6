"""Acceptance: `pgmux --check -c FILE` validates a config without starting anything.

A wrong key, a wrong type and an impossible limit each make it exit non-zero
with the file and the dotted key path in the message (DESIGN.md
"Configuration"); the shipped conf/pgmux.yaml passes.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)

VALID: dict[str, Any] = {
    "listen": {"addresses": ["127.0.0.1"], "port": 16432, "max_client_conn": 100},
    "pool": {"mode": "transaction", "size": 4, "min_size": 1, "max_server_connections": 12},
    "timeouts": {"query_wait": "5s", "server_idle": "1m"},
    "auth": {"type": "scram-sha-256", "users_file": "users.txt"},
    "databases": {
        "hubs": {"host": "127.0.0.1", "port": 5432, "pool_size": 4},
        "*": {"host": "127.0.0.1", "port": 5432},
    },
}


def check(config_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m pgmux --check -c FILE`; it must finish (it starts no server)."""
    return subprocess.run(
        [sys.executable, "-m", "pgmux", "--check", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
    )


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    (tmp_path / "users.txt").write_text('"app" "app-secret"\n')
    path = tmp_path / "pgmux.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def with_change(keys: str, value: Any) -> dict[str, Any]:
    """VALID with the dotted path KEYS set to VALUE."""
    config = copy.deepcopy(VALID)
    *parents, last = keys.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def test_valid_config_passes(tmp_path: Path) -> None:
    result = check(write_config(tmp_path, VALID))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("keys", "value", "reported"),
    [
        # A wrong key (typo)
        ("pool.sise", 4, "pool.sise"),
        ("timeouts.query_wiat", "5s", "timeouts.query_wiat"),
        ("databases.hubs.pool_sise", 4, "databases.hubs.pool_sise"),
        # A wrong type
        ("pool.size", "abc", "pool.size"),
        ("listen.port", "not-a-port", "listen.port"),
        ("timeouts.query_wait", "soon", "timeouts.query_wait"),
        ("databases.hubs.pool_size", "many", "databases.hubs.pool_size"),
        # An impossible limit
        ("pool.min_size", 10, "pool.min_size"),
        ("pool.size", 0, "pool.size"),
        ("listen.port", 70000, "listen.port"),
        ("listen.max_client_conn", 0, "listen.max_client_conn"),
        ("timeouts.server_idle", "-5s", "timeouts.server_idle"),
        ("pool.mode", "sometimes", "pool.mode"),
    ],
)
def test_bad_config_is_reported(tmp_path: Path, keys: str, value: Any, reported: str) -> None:
    path = write_config(tmp_path, with_change(keys, value))
    result = check(path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"--check accepted {keys}={value!r}:\n{output}"
    assert reported in output, output
    assert path.name in output, f"the message does not name the file:\n{output}"
    assert "Traceback" not in output, output


def test_min_sizes_above_the_global_cap_are_reported(tmp_path: Path) -> None:
    """An impossible limit across pools: the warm servers alone would exceed the cap."""
    config = copy.deepcopy(VALID)
    config["pool"]["max_server_connections"] = 3
    config["databases"] = {
        name: {"host": "127.0.0.1", "pool_size": 4, "min_size": 2} for name in ("a", "b")
    }
    path = write_config(tmp_path, config)
    result = check(path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "pool.max_server_connections" in output, output
    assert path.name in output and "Traceback" not in output, output


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.yaml")
    assert result.returncode != 0
    assert "nope.yaml" in result.stdout + result.stderr


def test_shipped_config_passes() -> None:
    path = REPO / "conf" / "pgmux.yaml"
    assert path.exists(), "conf/pgmux.yaml is missing"
    result = check(path)
    assert result.returncode == 0, result.stdout + result.stderr


# A file that defines nothing would, on a reload, drop every database: it is
# an error, never "configuration ok". (name, file bytes, what the message says)
NOTHING = "defines nothing"
EMPTY_OR_UNREADABLE = [
    ("empty.yaml", b"", NOTHING),
    ("comments.yaml", b"# nothing here\n\n# still nothing\n", NOTHING),
    ("dashes.yaml", b"---\n", NOTHING),
    ("null.yaml", b"null\n", NOTHING),
    ("tilde.yaml", b"--- ~\n", NOTHING),
    ("braces.yaml", b"{}\n", NOTHING),
    ("scalar.yaml", b"just a string\n", "top level: expected a mapping"),
    ("list.yaml", b"- databases\n", "top level: expected a mapping"),
    ("nul.yaml", b"pool:\n  size: 4\x00\n", "line 2: character U+0000 is not allowed"),
    ("bell.yaml", b"pool:\n  size: 4\n  mode: \x07\n", "line 3: character U+0007"),
    ("latin1.yaml", b"pool:\n  mode: caf\xe9\n", "line 2: not UTF-8 text"),
    ("scanner.yaml", b"pool:\n  size: 4\n\tmode: x\n", "line 3: YAML syntax error"),
    ("parser.yaml", b"pool: {size: 4\n", "YAML syntax error"),
    ("empty.ini", b"", "[pgbouncer] section is missing"),
    ("comments.ini", b"; only a comment\n", "[pgbouncer] section is missing"),
    ("nul.ini", b"[pgbouncer]\nlisten_port = 6432\x00\n", "line 2"),
    ("latin1.ini", b"[pgbouncer]\n;caf\xe9\n", "line 2: not UTF-8 text"),
]


@pytest.mark.parametrize(("name", "content", "reported"), EMPTY_OR_UNREADABLE)
def test_empty_or_unreadable_file_is_an_error(
    tmp_path: Path, name: str, content: bytes, reported: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = check(path)
    assert result.returncode != 0, result.stdout
    assert "configuration ok" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert name in result.stderr
    assert reported in result.stderr, result.stderr


def test_an_empty_section_is_still_a_configuration(tmp_path: Path) -> None:
    """`pool:` alone defines something (the pool's defaults), as `[pgbouncer]` does."""
    path = tmp_path / "pool.yaml"
    path.write_text("pool:\n")
    result = check(path)
    assert result.returncode == 0, result.stderr
