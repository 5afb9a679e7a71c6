"""pgbouncer.ini read as a pgmux configuration (proxy/config/ini_*.py), without a daemon.

The syntax as PgBouncer reads it, PgBouncer's defaults, the mapping onto
pgmux's Config, errors naming file and line, unsupported settings, and the
command line (`--check`, `--strict`, `convert`, `-d`, `-R`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pgmux.proxy.config import (
    ConfigError,
    LoadedConfig,
    load_config,
    pgbouncer_settings,
    read_config,
    unsupported_warning,
)
from pgmux.proxy.config.ini_map import DEFAULT_AUTH_QUERY
from pgmux.proxy.config.ini_read import Where, looks_like_ini, parse_connstr
from pgmux.proxy.convert import convert_file

MAIN = "[pgbouncer]\nlisten_addr = 127.0.0.1\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, name: str = "pgbouncer.ini"):
    return load_config(write(tmp_path / name, text))


def read(tmp_path: Path, text: str, name: str = "pgbouncer.ini") -> LoadedConfig:
    """The Config with the unsupported settings the ini reader returns beside it."""
    return read_config(write(tmp_path / name, text))


def pgmux_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgmux", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


# -- defaults and mapping -------------------------------------------------------------


def test_absent_settings_take_pgbouncer_defaults(tmp_path: Path) -> None:
    loaded = read(tmp_path, "[pgbouncer]\n")
    config = loaded.config
    assert config.pool.mode == "session"
    assert config.pool.size == 20
    assert config.pool.min_size == 0
    assert config.pool.reserve_timeout == 5.0
    assert config.pool.max_prepared_statements == 200
    assert config.listen.addresses == ()  # no listen_addr: unix socket only
    assert config.listen.port == 6432
    assert config.listen.unix_socket_dir == "/tmp"
    assert config.listen.max_client_conn == 100
    assert config.listen.backlog == 128
    assert config.timeouts.server_idle == 600.0
    assert config.timeouts.server_connect == 15.0
    assert config.timeouts.server_login_retry == 15.0
    assert config.timeouts.query_wait == 120.0
    assert config.timeouts.cancel_wait == 10.0
    assert config.timeouts.server_lifetime == 3600.0
    assert config.auth.type == "md5"
    assert config.auth.query == DEFAULT_AUTH_QUERY and config.auth.query_user is None  # never run
    assert config.tls.server.mode == "prefer"
    assert config.tls.client.mode == "disable"
    assert config.limits.max_packet_size == 2147483647
    assert loaded.unsupported == ()


def test_settings_map_onto_pgmux_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """[pgbouncer]
listen_addr = *
listen_port = 6543
unix_socket_dir =
unix_socket_mode = 0700
pool_mode = transaction
max_client_conn = 500
default_pool_size = 12
min_pool_size = 2
reserve_pool_size = 3
reserve_pool_timeout = 0.5
max_db_connections = 40
max_user_connections = 30
server_idle_timeout = 90
server_lifetime = 1800
server_connect_timeout = 3
server_login_retry = 2
client_login_timeout = 20
client_idle_timeout = 3600
idle_transaction_timeout = 60
query_timeout = 300
query_wait_timeout = 45
cancel_wait_timeout = 4
max_prepared_statements = 0
ignore_startup_parameters = extra_float_digits,options
auth_type = plain
auth_file = users.txt
auth_user = pgbouncer_auth
admin_users = admin, ops
stats_users = monitor
verbose = 2
max_packet_size = 0x100000
listen_backlog = 4096
""",
    )
    assert config.listen.addresses == ("*",)  # every address, IPv4 and IPv6
    assert config.listen.port == 6543
    assert config.listen.unix_socket_dir is None
    assert config.listen.unix_socket_mode == 0o700
    assert (config.pool.mode, config.pool.size, config.pool.min_size) == ("transaction", 12, 2)
    assert (config.pool.reserve_size, config.pool.reserve_timeout) == (3, 0.5)
    assert (config.pool.max_db_connections, config.pool.max_user_connections) == (40, 30)
    assert config.pool.max_prepared_statements == 0
    timeouts = config.timeouts
    assert (timeouts.server_idle, timeouts.server_lifetime, timeouts.server_connect) == (
        90.0,
        1800.0,
        3.0,
    )
    assert (timeouts.server_login_retry, timeouts.client_login) == (2.0, 20.0)
    assert (timeouts.client_idle, timeouts.idle_transaction, timeouts.query) == (
        3600.0,
        60.0,
        300.0,
    )
    assert (timeouts.query_wait, timeouts.cancel_wait) == (45.0, 4.0)
    assert config.ignore_startup_parameters == ("extra_float_digits", "options")
    assert config.auth.type == "password"  # PgBouncer's "plain"
    assert config.auth.users_file == str(Path.cwd() / "users.txt")  # cwd, as PgBouncer
    assert config.auth.query_user == "pgbouncer_auth"
    assert config.auth.query == DEFAULT_AUTH_QUERY
    assert config.admin.users == ("admin", "ops")
    assert config.admin.stats_users == ("monitor",)
    assert config.logging.level == "debug"
    assert config.limits.max_packet_size == 0x100000
    assert config.listen.backlog == 4096


def test_databases_and_users(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        MAIN
        + """default_pool_size = 10
pool_mode = transaction
[databases]
appdb = host=db1 port=5433 dbname=app user=svc password='it''s a secret' pool_size=5
reports = host=db2 min_pool_size=2 reserve_pool=1 max_db_connections=8 pool_mode=session
slow = host=db3 query_wait_timeout=7 server_lifetime=60 application_name='my app'
local =
* = host=fallback port=6000
[users]
report = pool_mode=session pool_size=3 max_user_connections=2 reserve_pool_size=4
plain =
waiter = query_wait_timeout=2 query_timeout=30 client_idle_timeout=-1
""",
    )
    app = config.databases["appdb"]
    assert (app.host, app.port, app.dbname, app.user) == ("db1", 5433, "app", "svc")
    assert app.password == "it's a secret"
    assert app.pool.size == 5 and app.pool.mode == "transaction"
    reports = config.databases["reports"]
    assert reports.dbname is None  # the client's database name
    assert (reports.pool.size, reports.pool.min_size, reports.pool.reserve_size) == (10, 2, 1)
    assert (reports.pool.max_db_connections, reports.pool.mode) == (8, "session")
    slow = config.databases["slow"]
    assert (slow.timeouts.query_wait, slow.timeouts.server_lifetime) == (7.0, 60.0)
    assert slow.application_name == "my app"
    assert config.databases["local"].host == "/tmp"  # no host: PgBouncer's unix_socket_dir
    fallback = config.database("anything")
    assert fallback is not None and (fallback.host, fallback.port) == ("fallback", 6000)
    user = config.users["report"]
    assert (user.pool_mode, user.pool_size, user.max_user_connections) == ("session", 3, 2)
    assert user.reserve_pool_size == 4 and config.users["plain"].reserve_pool_size is None
    waiter = config.users["waiter"]
    assert (waiter.query_wait, waiter.query, waiter.client_idle) == (2.0, 30.0, None)


def test_min_pool_size_is_capped_at_the_pool_size(tmp_path: Path) -> None:
    # PgBouncer caps it; pgmux's own YAML would refuse min_size > size.
    config = load(tmp_path, MAIN + "min_pool_size = 30\n[databases]\nsmall = host=h pool_size=4\n")
    assert config.pool.min_size == 20
    assert config.databases["small"].pool.min_size == 4


def test_values_are_not_interpolated(tmp_path: Path) -> None:
    config = load(tmp_path, MAIN + "[databases]\nappdb = host=h user=u password=${NOPE}x\n")
    assert config.databases["appdb"].password == "${NOPE}x"


# -- syntax -------------------------------------------------------------------------------


def test_comments_quoting_and_spacing(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """; a comment
# another comment
   ; indented comment
[pgbouncer]
  listen_port=7000
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1 ; not a comment
auth_user = auth
[databases]
"my-db.x" = host=h1
'single''s' = host=h2
""",
    )
    assert config.listen.port == 7000
    query = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1 ; not a comment"
    assert config.auth.query == query
    assert set(config.databases) == {"my-db.x", "single's"}


def test_connstr_parsing() -> None:
    where = Where("f.ini", 3)
    assert parse_connstr("host=a  port=1 password='x y''z'", where, "db") == {
        "host": "a",
        "port": "1",
        "password": "x y'z",
    }
    with pytest.raises(ConfigError) as info:
        parse_connstr("host=a password='open", where, "[databases] db")
    assert "line 3" in str(info.value) and "unterminated quote" in str(info.value)


def test_include_is_read_in_place_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "conf.d"
    sub.mkdir()
    write(sub / "dbs.ini", "[databases]\nappdb = host=included\n")
    write(tmp_path / "main.ini", "[pgbouncer]\nlisten_port = 7001\n%include conf.d/dbs.ini\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "main.ini")
    assert config.databases["appdb"].host == "included"
    assert config.listen.port == 7001


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[pgbouncer]\nlisten_port = 6432\nthis is not a setting\n", 3, "expected '='"),
        ("[pgbouncer\n", 1, "closing ']'"),
        ("[pgbouncer]\n[nosuch]\n", 2, "invalid section [nosuch]"),
        ("listen_port = 1\n[pgbouncer]\n", 1, "outside any section"),
        ("[pgbouncer]\n\nlisten_port = many\n", 3, "listen_port: invalid value 'many'"),
        ("[pgbouncer]\ndefault_pool_sise = 5\n", 2, "did you mean 'default_pool_size'"),
        ("[pgbouncer]\ndefault_pool_size = 0\n", 2, "default_pool_size: expected a positive"),
        ("[pgbouncer]\npool_mode = sometimes\n", 2, "pool_mode"),
        ("[pgbouncer]\nauth_type = ldap\n", 2, "auth_type 'ldap' is not supported"),
        ("[pgbouncer]\n[databases]\ndb = host=h port=x\n", 3, "[databases] db: port"),
        ("[pgbouncer]\n[databases]\ndb = host=h bogus=1\n", 3, "unrecognized connection"),
        ("[pgbouncer]\n[databases]\npgbouncer = host=h\n", 3, "reserved"),
        ("[pgbouncer]\n[users]\nbob = pool_mode=never\n", 3, "[users] bob: pool_mode"),
    ],
)
def test_malformed_lines_name_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path / "bad.ini", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = str(info.value)
    assert error.startswith(f"{path}: line {line}: "), error
    assert message in error


def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    write(tmp_path / "inner.ini", "; inner\nbroken line\n")
    outer = write(tmp_path / "outer.ini", f"[pgbouncer]\n%include {tmp_path}/inner.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(outer)
    assert str(info.value).startswith(f"{tmp_path}/inner.ini: line 2: ")
    missing = write(tmp_path / "missing.ini", "[pgbouncer]\n\n%include /nonexistent/x.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: line 3: %include: cannot read")


def test_missing_main_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[pgbouncer\] section is missing"):
        load(tmp_path, "[databases]\nappdb = host=h\n")


def test_detection_by_extension_or_content(tmp_path: Path) -> None:
    assert looks_like_ini("x.ini", "")
    assert looks_like_ini("pgbouncer.conf", "; hello\n\n[pgbouncer]\n")
    assert looks_like_ini("pgbouncer.conf", "%include other.ini\n")
    assert not looks_like_ini("pgmux.yaml", "# comment\nlisten:\n  port: 6432\n")
    config = load(tmp_path, "# no extension\n[pgbouncer]\nlisten_port = 7002\n", name="bouncer")
    assert config.listen.port == 7002


# -- unsupported settings ---------------------------------------------------------------


def test_unsupported_settings_are_collected_by_name(tmp_path: Path) -> None:
    loaded = read(
        tmp_path,
        MAIN
        + """server_round_robin = 1
syslog = 0
server_reset_query = DISCARD ALL
server_check_query = select 1
tcp_keepalive = 0
log_connections = 0
[databases]
appdb = host=h connect_query='SET x = 1' timezone=UTC
[users]
bob = transaction_timeout=5
""",
    )
    names = [item.name for item in loaded.unsupported]
    # Left at PgBouncer's default (syslog = 0, DISCARD ALL): no effect, not reported;
    # log_connections is honoured (logging.connections), so not reported either;
    # neither is a per-user transaction_timeout (timeouts.transaction), a
    # database's connect_query or server_check_query.
    assert names == [
        "server_round_robin",
        "tcp_keepalive",
        "[databases] appdb: timezone",
    ]
    warning = unsupported_warning(loaded.unsupported)
    assert warning is not None and "server_round_robin" in warning


def test_check_warns_and_strict_rejects(tmp_path: Path) -> None:
    write(tmp_path / "p.ini", MAIN + "server_round_robin = 1\n")
    checked = pgmux_cli("--check", "-c", "p.ini", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "warning" in checked.stderr and "server_round_robin" in checked.stderr
    strict = pgmux_cli("--check", "--strict", "-c", "p.ini", cwd=tmp_path)
    assert strict.returncode == 1
    assert "server_round_robin" in strict.stderr
    write(tmp_path / "clean.ini", MAIN)
    assert pgmux_cli("--check", "--strict", "-c", "clean.ini", cwd=tmp_path).returncode == 0


def test_check_names_file_and_line_of_a_malformed_line(tmp_path: Path) -> None:
    write(tmp_path / "bad.ini", MAIN + "\n= 5\n")
    result = pgmux_cli("--check", "bad.ini", cwd=tmp_path)
    assert result.returncode == 1
    assert "bad.ini: line 4: syntax error" in result.stderr


@pytest.mark.parametrize(("option", "words"), [("-d", "daemonize"), ("-R", "online restart")])
def test_pgbouncer_only_options_are_refused_clearly(
    tmp_path: Path, option: str, words: str
) -> None:
    write(tmp_path / "p.ini", MAIN)
    result = pgmux_cli(option, "p.ini", cwd=tmp_path)
    assert result.returncode == 2
    assert words in result.stderr and "not supported" in result.stderr


def test_unknown_user_for_u_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "p.ini", MAIN + f"listen_port = 6999\nunix_socket_dir = {tmp_path}\n")
    result = pgmux_cli("-u", "no_such_user_xyz", "p.ini", cwd=tmp_path)
    assert result.returncode == 1
    assert "no such user" in result.stderr


# -- convert and SHOW CONFIG ----------------------------------------------------------------

RICH_INI = """[databases]
appdb = host=db1 port=5433 pool_size=5 password='p${x}''q' user=svc min_pool_size=9
"odd name" = host=/var/run/postgresql reserve_pool=2 query_wait_timeout=3
* = host=db3
[users]
report = pool_mode=session max_user_connections=2
[pgbouncer]
listen_addr = 127.0.0.1, ::1
listen_port = 6500
unix_socket_mode = 0750
pool_mode = transaction
default_pool_size = 7
server_idle_timeout = 0.25
query_wait_timeout = 90
auth_type = scram-sha-256
auth_file = users.txt
admin_users = admin
server_round_robin = 1
"""


def test_convert_yields_the_same_configuration(tmp_path: Path) -> None:
    ini = write(tmp_path / "pgbouncer.ini", RICH_INI)
    text, _ = convert_file(str(ini))
    assert "# [default_pool_size]" in text
    assert "server_round_robin" in text  # named in the "not converted" comment
    assert "approximated: min_pool_size 9 capped at 5" in text
    yaml.safe_load(text)  # plain YAML
    converted = write(tmp_path / "pgmux.yaml", text)
    from_ini, from_yaml = load_config(ini), load_config(converted)
    assert replace(from_ini, path=None) == replace(from_yaml, path=None)

    def shown(config):  # SHOW CONFIG rows; conffile names each file
        return [row for row in pgbouncer_settings(config) if row[0] != "conffile"]

    assert shown(from_ini) == shown(from_yaml)


def test_convert_command(tmp_path: Path) -> None:
    write(tmp_path / "pgbouncer.ini", RICH_INI)
    write(tmp_path / "users.txt", '"admin" "secret"\n')
    result = pgmux_cli("convert", "pgbouncer.ini", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "server_round_robin" in result.stderr
    write(tmp_path / "out.yaml", result.stdout)
    checked = pgmux_cli("--check", "-c", "out.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    bad = pgmux_cli("convert", "missing.ini", cwd=tmp_path)
    assert bad.returncode == 1 and "missing.ini" in bad.stderr


def test_pgbouncer_settings_show_effective_values_under_pgbouncer_names(
    tmp_path: Path,
) -> None:
    config = load(tmp_path, RICH_INI.replace("auth_file = users.txt\n", ""))
    rows = {
        name: (value, default, changeable)
        for name, value, default, changeable in pgbouncer_settings(config)
    }
    assert rows["default_pool_size"] == ("7", "20", "yes")
    assert rows["pool_mode"][:2] == ("transaction", "session")
    assert rows["listen_addr"] == ("127.0.0.1,::1", "", "no")
    assert rows["listen_port"] == ("6500", "6432", "no")
    assert rows["unix_socket_mode"][0] == "0750"
    assert rows["server_idle_timeout"][0] == "0.25"
    assert rows["query_wait_timeout"] == ("90", "120", "yes")
    assert rows["auth_type"][0] == "scram-sha-256"
    assert rows["admin_users"][0] == "admin"
    assert rows["max_client_conn"] == ("100", "100", "yes")
    assert "server_round_robin" not in rows  # not supported, so not shown
    # Works for a YAML config as well: pgmux's values under PgBouncer's names.
    yaml_loaded = read_config(write(tmp_path / "x.yaml", "pool:\n  size: 3\n"))
    assert yaml_loaded.unsupported == ()  # only an ini has settings pgmux ignores
    yaml_config = yaml_loaded.config
    rows = dict((row[0], row[1]) for row in pgbouncer_settings(yaml_config))
    assert rows["default_pool_size"] == "3"
    assert os.fspath(tmp_path / "x.yaml") in rows["conffile"]


def test_auth_type_hba_uses_the_hba_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "hba.conf", "host all all 127.0.0.1/32 md5\n")
    config = load(tmp_path, MAIN + "auth_type = hba\nauth_hba_file = hba.conf\n")
    assert config.auth.hba_file == str(tmp_path / "hba.conf")
    assert dict((row[0], row[1]) for row in pgbouncer_settings(config))["auth_type"] == "hba"
    # Without auth_type = hba PgBouncer ignores the file; so does the translation.
    loaded = read(tmp_path, MAIN + "auth_type = md5\nauth_hba_file = hba.conf\n")
    assert loaded.config.auth.hba_file is None
    assert [item.name for item in loaded.unsupported] == ["auth_hba_file"]
    with pytest.raises(ConfigError, match="line 3: auth_type: hba needs auth_hba_file"):
        load(tmp_path, MAIN + "auth_type = hba\n")


def test_connstr_errors_do_not_show_passwords(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, MAIN + "[databases]\nappdb = host=h password=half secretpart\n")
    assert "line 4" in str(info.value) and "secretpart" not in str(info.value)
