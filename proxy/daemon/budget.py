"""The fleet's server budget: what all instances together may open, against
what PostgreSQL allows (docs/scaling.md).

Every instance opens up to `pool.max_server_connections`; `peers:` says how
many instances there are (its members and this one). Their product must fit
in PostgreSQL's `max_connections` less the slots ordinary roles cannot use
(`superuser_reserved_connections`, and `reserved_connections` from
PostgreSQL 16). `pgmux --check` and the startup log compute it; PostgreSQL is
asked with the login of a database whose user is fixed in the config, or the
auth_query user, and when none can log in the budget is told without the
comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from pgmux.proxy.config import Config

_LIMITS_SQL = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true), '0')::int"
)
_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Budget:
    per_instance: int  # 0: unlimited (no pool.max_server_connections)
    instances: int

    @property
    def fleet(self) -> int:
        return self.per_instance * self.instances

    def describe(self) -> str:
        if not self.per_instance:
            return f"{self.instances} instance(s), pool.max_server_connections unlimited"
        return (
            f"{self.instances} instance(s) x {self.per_instance} servers"
            f" (pool.max_server_connections) = {self.fleet}"
        )


@dataclass(frozen=True, slots=True)
class ServerLimit:
    """What one PostgreSQL lets ordinary roles open."""

    host: str
    port: int
    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections

    @property
    def usable(self) -> int:
        return self.max_connections - self.reserved


def fleet_budget(config: Config) -> Budget:
    peers = config.peers
    instances = (
        len({member.id for member in peers.members} | {peers.peer_id}) if peers.peer_id else 1
    )
    return Budget(config.max_server_connections, instances)


def _logins(config: Config, users: Mapping[str, str]) -> list[tuple[str, int, str, str, str]]:
    """(host, port, dbname, user, password) pgmux may use to ask each PostgreSQL."""
    logins: dict[tuple[str, int], tuple[str, int, str, str, str]] = {}
    for name, database in config.databases.items():
        target = (database.host, database.port)
        if target in logins:
            continue
        dbname = database.dbname or (name if name != "*" else "postgres")
        user, password = database.user, database.password
        if user is None and config.auth.query_user:
            user, password = config.auth.query_user, config.auth.query_password
        if user is None:
            continue
        if password is None:
            password = users.get(user)
        if password is None or password.startswith(("SCRAM-SHA-256$", "md5")):
            continue  # a stored verifier cannot log in by itself
        logins[target] = (database.host, database.port, dbname, user, password)
    return list(logins.values())


async def _ask(login: tuple[str, int, str, str, str]) -> ServerLimit:
    host, port, dbname, user, password = login
    try:
        # The maintenance database first: the pools' own databases see no
        # stranger in pg_stat_activity.
        conn = await _connect(host, port, "postgres", user, password)
    except asyncpg.PostgresError:
        conn = await _connect(host, port, dbname, user, password)
    try:
        row = await asyncio.wait_for(conn.fetchrow(_LIMITS_SQL), _TIMEOUT)
    finally:
        await conn.close(timeout=_TIMEOUT)
    assert row is not None
    return ServerLimit(host, port, row[0], row[1] + row[2])


async def _connect(host: str, port: int, dbname: str, user: str, password: str) -> Any:
    return await asyncpg.connect(
        host=host,
        port=port,
        database=dbname,
        user=user,
        password=password,
        timeout=_TIMEOUT,
        server_settings={"application_name": "pgmux budget check"},
    )


async def server_limits(
    config: Config, users: Mapping[str, str]
) -> tuple[list[ServerLimit], list[str]]:
    """Each reachable PostgreSQL's limit, and why the others could not be asked."""
    limits, failures = [], []
    for login in _logins(config, users):
        try:
            limits.append(await _ask(login))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures.append(f"{login[0]}:{login[1]}: {type(exc).__name__}")
    return limits, failures


def over_budget(budget: Budget, limits: list[ServerLimit]) -> list[str]:
    """One warning per PostgreSQL the fleet could exhaust."""
    if not budget.per_instance:
        return []
    return [
        f"the fleet may open {budget.fleet} server connections ({budget.describe()}) but"
        f" PostgreSQL at {limit.host}:{limit.port} allows {limit.usable}"
        f" (max_connections {limit.max_connections} - {limit.reserved} reserved)"
        for limit in limits
        if budget.fleet > limit.usable
    ]


async def report(config: Config, users: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """What --check prints: the budget and each PostgreSQL's limit; the warnings."""
    budget = fleet_budget(config)
    limits, failures = await server_limits(config, users)
    lines = [f"server budget: {budget.describe()}"]
    lines += [
        f"PostgreSQL {limit.host}:{limit.port}: max_connections {limit.max_connections},"
        f" {limit.reserved} reserved, {limit.usable} usable"
        for limit in limits
    ]
    lines += [f"PostgreSQL {failure} (not reachable; budget not compared)" for failure in failures]
    return lines, over_budget(budget, limits)
