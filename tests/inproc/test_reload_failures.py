"""Daemon.reload: every failure of the new configuration keeps the running one.

A ConfigError, an OSError and an unexpected exception (a bug) while reading
the new files, and an exception while applying them, are each logged as
`reload_failed` and end with READY=1, so systemd never stays "reloading".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from pgmux.proxy.config import ConfigError
from pgmux.proxy.config.build import parse_config
from pgmux.proxy.daemon import lifecycle
from pgmux.proxy.daemon.lifecycle import Daemon


@pytest.fixture(autouse=True)
def every_log_level() -> Iterator[None]:
    """capture_logs sees only what the level lets through; another test may
    have configured logging above info."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


class FakeNotifier:
    """Records what the daemon would tell systemd."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def reloading(self) -> None:
        self.sent.append(("RELOADING", ""))

    def ready(self, status: str = "") -> None:
        self.sent.append(("READY", status))


def make_daemon(tmp_path: Path) -> tuple[Daemon, FakeNotifier]:
    path = tmp_path / "pgmux.yaml"
    path.write_text("databases:\n  appdb: {host: 127.0.0.1, port: 5432}\n")
    config = parse_config(
        {"databases": {"appdb": {"host": "127.0.0.1", "port": 5432}}}, path=str(path)
    )
    daemon = Daemon(config)
    notifier = FakeNotifier()
    daemon.notifier = notifier  # type: ignore[assignment]
    return daemon, notifier


def raiser(exc: BaseException) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    "failure",
    [
        ConfigError("pgmux.yaml", "", "the file defines nothing"),
        PermissionError(13, "Permission denied"),
        RuntimeError("a bug in the reader"),
        RecursionError("maximum recursion depth exceeded"),
    ],
    ids=["ConfigError", "OSError", "RuntimeError", "RecursionError"],
)
def test_reading_failure_keeps_the_config_and_sends_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    daemon, notifier = make_daemon(tmp_path)
    before = daemon.config
    monkeypatch.setattr(lifecycle, "load_config", raiser(failure))
    with structlog.testing.capture_logs() as logs:
        daemon.reload()
    assert daemon.config is before and daemon.registry.config is before
    assert notifier.sent[0] == ("RELOADING", "")
    kind, status = notifier.sent[-1]
    assert kind == "READY" and "reload failed, running configuration kept" in status
    failed = [entry for entry in logs if entry["event"] == "reload_failed"]
    assert len(failed) == 1 and str(failure) in failed[0]["error"], logs


def test_applying_failure_is_logged_and_sends_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, notifier = make_daemon(tmp_path)
    monkeypatch.setattr(Daemon, "apply", raiser(KeyError("pool")))
    with structlog.testing.capture_logs() as logs:
        daemon.reload()
    kind, status = notifier.sent[-1]
    assert kind == "READY" and "reload failed" in status
    failed = [entry for entry in logs if entry["event"] == "reload_failed"]
    assert failed and "KeyError" in failed[0]["error"] and "traceback" in failed[0]


def test_a_good_reload_still_succeeds(tmp_path: Path) -> None:
    daemon, notifier = make_daemon(tmp_path)
    with structlog.testing.capture_logs() as logs:
        daemon.reload()
    assert notifier.sent == [("RELOADING", ""), ("READY", daemon.status())]
    assert [entry["event"] for entry in logs].count("reload") == 1
    assert not [entry for entry in logs if entry["event"] == "reload_failed"]


def test_a_reload_that_drops_every_database_is_warned_about(tmp_path: Path) -> None:
    daemon, notifier = make_daemon(tmp_path)
    (tmp_path / "pgmux.yaml").write_text("pool:\n  size: 3\n")  # valid, but no databases
    with structlog.testing.capture_logs() as logs:
        daemon.reload()
    assert not daemon.config.databases and notifier.sent[-1][0] == "READY"
    warned = [entry for entry in logs if entry["event"] == "reload_without_databases"]
    assert warned and warned[0]["before"] == 1, logs
