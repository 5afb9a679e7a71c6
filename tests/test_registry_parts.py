"""The registry keeps its parts current when the daemon sets what they read."""

from __future__ import annotations

import dataclasses

from pgmux.proxy.base.ledger import Ledger
from pgmux.proxy.config import Config
from pgmux.proxy.config.tls import TlsContexts
from pgmux.proxy.registry import Registry


class Worker:
    def send(self, index: int, message: tuple, fd: int | None = None) -> bool:
        return True

    def broadcast(self, message: tuple) -> None:
        pass

    def issue_pid(self, random_bits: int) -> int:
        return random_bits

    def forward_cancel(self, pid: int, key: bytes) -> bool:
        return False


def test_reload_and_worker_setup_reach_every_part() -> None:
    registry = Registry(Config(), {"app": "pw"})
    config = dataclasses.replace(Config(), max_server_connections=3)
    users = {"report": "secret"}
    tls = TlsContexts()
    ledger = Ledger(workers=2, slots=16)
    worker = Worker()
    registry.config, registry.users, registry.tls = config, users, tls
    registry.ledger, registry.worker = ledger, worker  # type: ignore[assignment]
    assert registry.slots.config is config and registry.auth.config is config
    assert registry.auth_query.state.config is config
    assert registry.auth.users is users and registry.auth.tls is tls
    assert registry.slots.ledger is ledger and registry.client_slots.ledger is ledger
    assert registry.slots.peers is worker and registry.cancels.peers is worker
    assert registry.worker is worker and registry.ledger is ledger


def test_pause_and_resume_through_the_registry() -> None:
    registry = Registry(Config(), {})
    registry.pause("appdb")
    assert registry.is_paused("appdb") and registry.paused_databases == {"appdb"}
    registry.suspend()
    assert registry.suspended and registry.is_paused("otherdb")
    registry.resume()
    assert not registry.suspended and not registry.paused
    assert registry.is_paused("appdb")
