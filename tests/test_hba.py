"""HBA: `auth.hba_file` in pg_hba.conf syntax (issue 8).

The parser and matcher on their own, then the acceptance case against a real
PostgreSQL: a host rule rejecting 127.0.0.1 for one database while another
is allowed; the method comes from the matching rule; no match is 28000.
"""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import asyncpg
import pytest
from helpers import PgmuxFactory, close_quietly, connect_asyncpg, wait_until

from pgmux.proxy.config import ConfigError
from pgmux.proxy.config.hba import Connection, Hba, load_hba, parse_hba

pytestmark = pytest.mark.timeout(120)


def tcp(database: str = "appdb", user: str = "app", ssl: bool = False,
        address: str = "127.0.0.1", server: str = "127.0.0.1") -> Connection:  # fmt: skip
    return Connection(database, user, local=False, ssl=ssl, address=address,
                      server_address=server)  # fmt: skip


def method(text: str, conn: Connection) -> str | None:
    rule = Hba(parse_hba(text)).match(conn)
    return None if rule is None else rule.method


# -- parser and matcher ---------------------------------------------------------


def test_first_match_wins() -> None:
    text = "host appdb all 127.0.0.1/32 reject\nhost all all 0.0.0.0/0 md5\n"
    assert method(text, tcp("appdb")) == "reject"
    assert method(text, tcp("other")) == "md5"


def test_no_match_is_none() -> None:
    assert method("host all all 10.0.0.0/8 md5\n", tcp()) is None
    assert method("local all all trust\n", tcp()) is None


def test_connection_types() -> None:
    text = "hostssl all all all scram-sha-256\nhostnossl all all all md5\n"
    assert method(text, tcp(ssl=True)) == "scram-sha-256"
    assert method(text, tcp(ssl=False)) == "md5"
    local = Connection("appdb", "app", local=True, ssl=False)
    assert method("local all all trust\nhost all all all md5\n", local) == "trust"
    assert method("host all all all md5\n", local) is None
    assert method("hostgssenc all all all md5\n", tcp()) is None
    assert method("hostnogssenc all all all md5\n", tcp()) == "md5"


def test_databases_and_users() -> None:
    text = 'host "appdb",other app,"Bob" all md5\nhost sameuser all all password\n'
    assert method(text, tcp("other", "app")) == "md5"
    assert method(text, tcp("appdb", "Bob")) == "md5"
    assert method(text, tcp("appdb", "bob")) is None
    assert method(text, tcp("carol", "carol")) == "password"
    # A quoted keyword is just a name.
    assert method('host "all" all all md5\n', tcp("appdb")) is None
    assert method('host "all" all all md5\n', tcp("all")) == "md5"
    # Spaces around a comma keep the list going, as PgBouncer reads it.
    spaced = "host tmp1,all user1,user2 , user3 all md5\n"
    assert method(spaced, tcp("appdb", "user3")) == "md5"
    assert method(spaced, tcp("appdb", "user4")) is None


def test_addresses() -> None:
    assert method("host all all 127.0.0.0 255.0.0.0 md5\n", tcp()) == "md5"
    assert method("host all all ::1/128 md5\n", tcp()) is None
    assert method("host all all ::1/128 md5\n", tcp(address="::1")) == "md5"
    assert method("host all all 127.0.0.1/32 md5\n", tcp(address="::ffff:127.0.0.1")) == "md5"
    samehost = "host all all samehost md5\n"
    assert method(samehost, tcp(address="10.1.1.1", server="10.1.1.1")) == "md5"
    assert method(samehost, tcp(address="10.1.1.2", server="10.1.1.1")) is None
    rule = parse_hba("host all all 10.1.2.3/8 md5\n")[0]
    assert rule.address == ipaddress.ip_network("10.0.0.0/8")


def test_comments_continuations_and_files(tmp_path: Path) -> None:
    (tmp_path / "admins.txt").write_text("# the admins\nalice, bob\ncarol\n")
    hba = tmp_path / "pg_hba.conf"
    hba.write_text(
        "# comment line\n\n"
        "host all @admins.txt 127.0.0.1/32 \\\n"
        "    scram-sha-256   # trailing comment\n"
        "host all all all reject\n"
    )
    rules = load_hba(str(hba)).rules
    assert [r.line for r in rules] == [3, 5]
    assert [t.text for t in rules[0].users] == ["alice", "bob", "carol"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("host all all", "end-of-line before authentication method"),
        ("hots all all all md5", 'invalid connection type "hots"'),
        ("host all all all peer", '"peer" is not supported'),
        ("host all all all md6", 'invalid authentication method "md6"'),
        ("host all +admins all md5", '"+admins" is not supported'),
        ("host all all db.example.com md5", "host names are not supported"),
        ("host all all 10.0.0.1 md5", 'invalid IP mask "md5"'),
        ("host all all 10.0.0.0/33 md5", "invalid IP address/prefix"),
        ("host all all all md5 clientcert=verify-ca", "options are not supported"),
        ('host "all all all md5', "unterminated quoted string"),
        ("host all, all all md5", "invalid IP address"),
        ("host all all samenet md5", '"samenet" is not supported'),
    ],
)
def test_errors_name_the_line(line: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hba(f"# first\n{line}\n", path="/etc/pgmux/hba.conf")
    assert info.value.line == 2
    assert error in str(info.value)
    assert str(info.value).startswith("/etc/pgmux/hba.conf: line 2: ")


# -- against a real PostgreSQL -----------------------------------------------------


async def test_host_rule_rejects_one_database_allows_another(
    pgmux: PgmuxFactory, tmp_path: Path
) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text(
        "host other all 127.0.0.1/32 reject\nhost appdb all 127.0.0.1/32 scram-sha-256\n"
    )
    mux = pgmux({"auth": {"hba_file": str(hba)}})
    conn = await connect_asyncpg(mux, "appdb")
    try:
        assert await conn.fetchval("SELECT current_database()") == "appdb"
    finally:
        await close_quietly(conn)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await connect_asyncpg(mux, "other")
    assert info.value.sqlstate == "28000"
    assert 'pg_hba.conf rejects connection for host "127.0.0.1", user "app", database "other"' in (
        str(info.value)
    )
    # No rule at all for hubs: rejected too, with PostgreSQL's wording.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        await connect_asyncpg(mux, "hubs")
    assert 'no pg_hba.conf entry for host "127.0.0.1", user "app", database "hubs"' in str(
        info.value
    )
    assert mux.proc.poll() is None


async def test_method_comes_from_the_rule(pgmux: PgmuxFactory, tmp_path: Path) -> None:
    """trust for one database, a password for another, whatever auth.type says."""
    hba = tmp_path / "hba.conf"
    hba.write_text("host hubs all all trust\nhost all all all md5\n")
    mux = pgmux({"auth": {"type": "scram-sha-256", "hba_file": str(hba)}})
    conn = await connect_asyncpg(mux, "hubs", password="not-asked")
    await close_quietly(conn)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect_asyncpg(mux, "appdb", password="wrong")
    conn = await connect_asyncpg(mux, "appdb")
    await close_quietly(conn)


async def test_hba_reload(pgmux: PgmuxFactory, tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    mux = pgmux({"auth": {"hba_file": str(hba)}})
    await close_quietly(await connect_asyncpg(mux))
    hba.write_text("host all all 127.0.0.1/32 reject\n")
    mux.signal(signal.SIGHUP)

    async def refused() -> bool:
        try:
            await close_quietly(await connect_asyncpg(mux))
        except asyncpg.InvalidAuthorizationSpecificationError:
            return True
        return False

    await wait_until(refused, bool, timeout=10, what="the new hba rules")
    # A broken file on reload keeps the running rules.
    hba.write_text("host all all nonsense md5\n")
    mux.signal(signal.SIGHUP)
    await wait_until(lambda: _logs(mux), lambda text: "reload_failed" in text, timeout=10)
    assert await refused()


async def _logs(mux: object) -> str:
    return mux.logs()  # type: ignore[attr-defined]
