"""A throwaway PostgreSQL cluster for tests, the demo and the benchmarks.

pgmux is only ever tested against a real PostgreSQL: this module runs
``initdb`` into a temporary directory and starts the server with ``pg_ctl``.
Everything listens on 127.0.0.1 and on a private unix socket directory, on a
port chosen free at run time, so several clusters (and several test runs) can
coexist on one machine.

PostgreSQL refuses to run as root, so when we are root the server binaries run
as the ``postgres`` OS user (``runuser``) and the temporary directory is handed
over to that user. ``psql`` itself runs as us: it connects over the unix socket,
where ``pg_hba.conf`` trusts everyone. Every TCP login uses SCRAM-SHA-256, so a
pooler in front of this cluster authenticates for real.

    with TempPostgres() as pg:
        pg.create_role("app", "app-secret")
        pg.create_database("appdb", owner="app")
        print(pg.dsn("appdb", "app"))
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
from types import TracebackType
from urllib.parse import quote

from pgmux import pgfind

__all__ = ["TempPostgres", "TempPostgresError", "find_bindir", "free_port"]

# Linux hands out ephemeral (outgoing) ports from this range; a listening port
# inside it can be stolen by any outgoing connection between our bind test and
# the server's bind, so we never pick one there.
EPHEMERAL_LOW, EPHEMERAL_HIGH = 32768, 60999

# Ports already handed out by this process: two free_port() calls made before
# either port is bound (PostgreSQL's and pgmux's) must not return the same one.
_handed_out: set[int] = set()


class TempPostgresError(RuntimeError):
    """A PostgreSQL command failed; the message carries its output."""


def find_bindir() -> str:
    """Directory holding initdb/pg_ctl/postgres/psql (see pgmux.pgfind for the order)."""
    try:
        return pgfind.find_bindir()
    except pgfind.PostgresNotFound as exc:
        raise TempPostgresError(str(exc)) from None


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A TCP port in [low, high] that nothing listens on at 127.0.0.1 right now."""
    if high >= EPHEMERAL_LOW and low <= EPHEMERAL_HIGH:
        raise ValueError(f"port range {low}-{high} overlaps the ephemeral range")
    candidates = [p for p in range(low, high + 1) if p not in _handed_out]
    random.shuffle(candidates)  # random, so concurrent test runs rarely race for one port
    for port in candidates[:200]:
        if _can_bind(port):
            _handed_out.add(port)
            return port
    raise TempPostgresError(f"no free port found in {low}-{high}")


def _can_bind(port: int) -> bool:
    # No SO_REUSEADDR: a port that still has TIME_WAIT connections is refused
    # too, which is the conservative answer.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class TempPostgres:
    """One PostgreSQL cluster in a temporary directory, owned by this object."""

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(
        self,
        *,
        port: int | None = None,
        max_connections: int = 100,
        settings: dict[str, str] | None = None,
        base_dir: str | None = None,
        password: str = "postgres",
    ) -> None:
        self.bindir = find_bindir()
        self.port = port if port is not None else free_port()
        self._port_movable = port is None
        self.max_connections = max_connections
        # Extra postgresql.conf settings; they win over ours and are re-read at
        # every start(), so a test may change them and restart().
        self.settings: dict[str, str] = dict(settings or {})
        self.password = password
        self._owns_base_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="pgmux-pg-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = os.path.join(self.base_dir, "sock")
        self.log_path = os.path.join(self.base_dir, "postgres.log")
        # Passwords of the roles made by create_role(), so dsn() can fill them in.
        self._passwords: dict[str, str] = {self.superuser: password}
        self._atexit_registered = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """initdb on first use, then start the server and wait until it accepts."""
        os.makedirs(self.base_dir, exist_ok=True)
        os.makedirs(self.socket_dir, exist_ok=True)
        self._hand_over_to_postgres_user()
        if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            self._initdb()
        self._write_settings()
        if not self._atexit_registered:
            # A crashed or interrupted test session must not leave a server behind.
            atexit.register(self._stop_quietly)
            self._atexit_registered = True
        for attempt in range(3):
            result = self._pg_ctl_start()
            if result is None:
                return
            # Another process may bind an auto-chosen port between free_port()
            # and the postmaster's bind: move to another one, but never move a
            # port the caller asked for or one a running test already knows.
            if not (self._port_movable and "could not bind" in self._log_tail()) or attempt == 2:
                raise TempPostgresError(result)
            self.port = free_port()
            self._write_settings()

    def _pg_ctl_start(self) -> str | None:
        """Start the server; None on success, else pg_ctl's output and the log tail."""
        argv = [self._bin("pg_ctl"), "start", "-w", "-t", "60", "-D", self.data_dir]
        result = self._run_as_pg([*argv, "-l", self.log_path])
        if result.returncode == 0:
            self._port_movable = False
            return None
        return (
            f"pg_ctl start failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            f"\n--- {self.log_path} ---\n{self._log_tail()}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl stop -m MODE); a no-op when it is not running."""
        if not self.is_running():
            return
        result = self._run_as_pg(
            [self._bin("pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D", self.data_dir]
        )
        if result.returncode != 0 and self.is_running():
            # Only an immediate shutdown is sure to end a server stuck in a
            # smart/fast shutdown; pg_ctl signals exactly our postmaster's pid.
            self._run_as_pg(
                [self._bin("pg_ctl"), "stop", "-w", "-m", "immediate", "-D", self.data_dir]
            )
        if self.is_running():
            raise TempPostgresError(f"could not stop PostgreSQL:\n{result.stderr}")

    def restart(self) -> None:
        """Fast stop, then start with the current settings (same port, same data)."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        if not os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            return False
        result = self._run_as_pg([self._bin("pg_ctl"), "status", "-D", self.data_dir])
        return result.returncode == 0

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, from postmaster.pid; None when not running."""
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        """Stop the server and remove what we created on disk."""
        try:
            self.stop()
        finally:
            if self._owns_base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            else:
                # A caller-supplied directory is theirs: remove only our part.
                for path in (self.data_dir, self.socket_dir):
                    shutil.rmtree(path, ignore_errors=True)
                for path in (self.log_path, self._pwfile):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def __enter__(self) -> TempPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- talking to it -----------------------------------------------------

    def dsn(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        """TCP URL; the password defaults to the one given to create_role()."""
        if password is None:
            password = self._passwords.get(user)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def sql(self, query: str, dbname: str = "postgres") -> str:
        """Run QUERY with psql over the unix socket as the superuser.

        Returns psql's unaligned, tuples-only output without the final newline
        (so ``pg.sql("SELECT 1") == "1"``); raises TempPostgresError on error.
        """
        result = subprocess.run(
            [
                self._bin("psql"),
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                query,
            ],
            capture_output=True,
            text=True,
            env=self._clean_env(),
            cwd=self.base_dir,
        )
        if result.returncode != 0:
            raise TempPostgresError(f"psql failed on {query!r} in {dbname}: {result.stderr}")
        return result.stdout.removesuffix("\n")

    def create_role(
        self, name: str, password: str, *, superuser: bool = False, login: bool = True
    ) -> None:
        """Create the role, or bring an existing one to these attributes."""
        options = " ".join(
            [
                "SUPERUSER" if superuser else "NOSUPERUSER",
                "LOGIN" if login else "NOLOGIN",
                f"PASSWORD {_sql_literal(password)}",  # stored as SCRAM (password_encryption)
            ]
        )
        exists = self.sql(f"SELECT 1 FROM pg_roles WHERE rolname = {_sql_literal(name)}")
        verb = "ALTER" if exists else "CREATE"
        self.sql(f"{verb} ROLE {_sql_ident(name)} {options}")
        self._passwords[name] = password

    def create_database(self, name: str, owner: str = "postgres") -> None:
        """Create the database unless it exists; either way OWNER ends up owning it."""
        exists = self.sql(f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(name)}")
        if exists:
            self.sql(f"ALTER DATABASE {_sql_ident(name)} OWNER TO {_sql_ident(owner)}")
        else:
            self.sql(f"CREATE DATABASE {_sql_ident(name)} OWNER {_sql_ident(owner)}")

    def server_connections(self, dbname: str | None = None, user: str | None = None) -> int:
        """Client backends in pg_stat_activity, not counting the psql asking."""
        conditions = ["backend_type = 'client backend'", "pid <> pg_backend_pid()"]
        if dbname is not None:
            conditions.append(f"datname = {_sql_literal(dbname)}")
        if user is not None:
            conditions.append(f"usename = {_sql_literal(user)}")
        where = " AND ".join(conditions)
        return int(self.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {where}"))

    # -- internals ---------------------------------------------------------

    @property
    def _pwfile(self) -> str:
        return os.path.join(self.base_dir, "pwfile")

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _hand_over_to_postgres_user(self) -> None:
        """As root, give the directory to `postgres` (mkdtemp made it root-only 0700)."""
        if not self._as_root():
            return
        for path in (self.base_dir, self.socket_dir):
            shutil.chown(path, user="postgres", group="postgres")
        probe = self._run_as_pg(["test", "-w", self.base_dir, "-a", "-x", self.base_dir])
        if probe.returncode != 0:
            raise TempPostgresError(
                f"the postgres OS user cannot use {self.base_dir}; every parent directory "
                "must be searchable by it (set TMPDIR or base_dir elsewhere)"
            )

    def _initdb(self) -> None:
        with open(self._pwfile, "w") as f:
            f.write(self.password + "\n")
        if self._as_root():
            shutil.chown(self._pwfile, user="postgres", group="postgres")
        try:
            result = self._run_as_pg(
                [
                    self._bin("initdb"),
                    "-D",
                    self.data_dir,
                    "-U",
                    self.superuser,
                    f"--pwfile={self._pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                    "--no-instructions",
                ],
            )
        finally:
            os.unlink(self._pwfile)  # the superuser's password has no business on disk
        if result.returncode != 0:
            raise TempPostgresError(f"initdb failed:\n{result.stdout}{result.stderr}")
        self._write_hba()
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            # Our settings live in a file of their own, rewritten at every start.
            f.write("\ninclude_if_exists = 'tempgres.conf'\n")

    def _write_hba(self) -> None:
        # Trust only on the private unix socket (psql as superuser); every TCP
        # login, the superuser's included, has to do SCRAM-SHA-256.
        self._write_data_file(
            "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )

    def _write_settings(self) -> None:
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self.socket_dir,
            "max_connections": str(self.max_connections),
            "password_encryption": "scram-sha-256",
            # Throwaway data: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        lines = [f"{key} = {_conf_value(str(value))}" for key, value in settings.items()]
        self._write_data_file("tempgres.conf", "\n".join(lines) + "\n")

    def _write_data_file(self, name: str, text: str) -> None:
        path = os.path.join(self.data_dir, name)
        with open(path, "w") as f:
            f.write(text)
        if self._as_root():
            shutil.chown(path, user="postgres", group="postgres")

    def _run_as_pg(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the `postgres` OS user when we are root."""
        if self._as_root():
            argv = ["runuser", "-u", "postgres", "--", *argv]
        # cwd: the server binaries complain when they cannot read the cwd (/root).
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self._clean_env(),
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def _clean_env() -> dict[str, str]:
        # The caller's libpq variables (PGHOST, PGPASSWORD, PGDATA, ...) must
        # not steer our psql or pg_ctl to another cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSQL"))}
        env["LC_ALL"] = "C"
        return env

    def _log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def _stop_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")

    def __repr__(self) -> str:
        return f"TempPostgres(port={self.port}, base_dir={self.base_dir!r})"
