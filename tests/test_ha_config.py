"""The settings of a database with several hosts: YAML, pgbouncer.ini, the order tried."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgmux.proxy.config import ConfigError, load_config
from pgmux.proxy.datapath.hosts import HostPlan, targets
from pgmux.proxy.datapath.server_login import ServerCredentials


def load(tmp_path: Path, text: str, name: str = "pgmux.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_yaml_host_list_with_ports_per_host(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "databases:\n  app:\n    host: [db1, db2]\n    port: [5432, 5433]\n"
        "    target_session_attrs: read-write\n    load_balance_hosts: round-robin\n",
    )
    app = config.databases["app"]
    assert (app.host, app.port) == ("db1", 5432)  # the first, for what needs one
    assert targets(app) == [("db1", 5432), ("db2", 5433)]
    assert (app.target_session_attrs, app.load_balance_hosts) == ("read-write", "round-robin")


def test_one_port_is_every_hosts(tmp_path: Path) -> None:
    app = load(tmp_path, "databases:\n  app:\n    host: a,b,c\n    port: 6000\n").databases["app"]
    assert targets(app) == [("a", 6000), ("b", 6000), ("c", 6000)]


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("host: [a, b]\n    port: [1, 2, 3]", "3 ports for 2 hosts"),
        ("target_session_attrs: writable", "target_session_attrs"),
        ("load_balance_hosts: sometimes", "load_balance_hosts"),
        ("host: []", "a host or a list of hosts"),
    ],
)
def test_bad_host_settings_are_refused(tmp_path: Path, entry: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load(tmp_path, f"databases:\n  app:\n    {entry}\n")


def test_pgbouncer_ini_host_list(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[pgbouncer]\nlisten_addr = 127.0.0.1\n[databases]\n"
        "app = host=db1,db2 port=5432,5433 load_balance_hosts=round-robin"
        " target_session_attrs=read-write\n",
        name="pgbouncer.ini",
    )
    app = config.databases["app"]
    assert targets(app) == [("db1", 5432), ("db2", 5433)]
    assert (app.load_balance_hosts, app.target_session_attrs) == ("round-robin", "read-write")


def test_round_robin_and_prefer_standby_order(tmp_path: Path) -> None:
    base = ServerCredentials("x", 1, "app", "app", None, "")
    app = load(
        tmp_path, "databases:\n  app:\n    host: [a, b]\n    load_balance_hosts: round-robin\n"
    ).databases["app"]
    plan = HostPlan()
    firsts = [plan.attempts(app, base)[0].credentials.host for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    prefer = load(
        tmp_path, "databases:\n  app:\n    host: [a, b]\n    target_session_attrs: prefer-standby\n"
    ).databases["app"]
    order = [(a.credentials.host, a.attrs) for a in HostPlan().attempts(prefer, base)]
    assert order == [("a", "standby"), ("b", "standby"), ("a", "any"), ("b", "any")]
