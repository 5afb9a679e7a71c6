"""ServerSlots and ClientSlots (proxy/core/limits.py) without PostgreSQL.

Fake pools stand in for proxy/datapath/pool.py: they count servers, keep
idle ones least recently used first, and record what the slots ask of them.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from pgmux.proxy.base.ledger import Ledger
from pgmux.proxy.config import Config, PoolSettings, UserConfig
from pgmux.proxy.core.limits import LENT, ClientSlots, ServerSlots
from pgmux.proxy.core.peers import Message, RoomWanted, SlotFreed


class FakeServer:
    def __init__(self, pool: FakePool, last_used: float) -> None:
        self.pool = pool
        self.last_used = last_used


class FakePool:
    def __init__(self, slots: ServerSlots, dbname: str, user: str, **settings: Any) -> None:
        self.slots = slots
        self.dbname = dbname
        self.user = user
        self.settings = dataclasses.replace(PoolSettings(), **settings)
        self.idle: list[FakeServer] = []
        self.busy = 0
        self.waiting: list[object] = []
        self.closed: list[tuple[FakeServer, str]] = []
        self.grown = 0
        self.shared_rows = slots.shared_rows(dbname, user) if slots.ledger is not None else ()
        slots.pools[(dbname, user)] = self  # type: ignore[index]

    def open(self, idle_since: float | None = None) -> None:
        """One server counted in the slots, idle since IDLE_SINCE or busy."""
        self.slots.taken(self)  # type: ignore[arg-type]
        if idle_since is None:
            self.busy += 1
        else:
            self.idle.append(FakeServer(self, idle_since))

    def server_total(self) -> int:
        return self.busy + len(self.idle)

    def size_limit(self) -> int:
        return self.settings.size

    def close_server(self, server: FakeServer, reason: str) -> None:
        self.idle.remove(server)
        self.closed.append((server, reason))
        self.slots.freed(self)  # type: ignore[arg-type]

    def grow(self) -> None:
        self.grown += 1


class FakePeers:
    def __init__(self) -> None:
        self.sent: list[tuple[int, Message]] = []
        self.broadcasts: list[Message] = []

    def send(self, index: int, message: Message, fd: int | None = None) -> bool:
        self.sent.append((index, message))
        return True

    def broadcast(self, message: Message) -> None:
        self.broadcasts.append(message)


def server_slots(max_servers: int = 0, **users: int) -> ServerSlots:
    config = dataclasses.replace(
        Config(),
        max_server_connections=max_servers,
        users=MappingProxyType(
            {name: UserConfig(name, max_user_connections=n) for name, n in users.items()}
        ),
    )
    return ServerSlots(config, {})


# --- one process -------------------------------------------------------------


def test_counts_follow_taken_and_freed() -> None:
    slots = server_slots()
    pool = FakePool(slots, "appdb", "app")
    pool.open()
    pool.open(idle_since=1.0)
    assert (slots.server_count, slots.db_server_count["appdb"]) == (2, 2)
    assert slots.user_server_count["app"] == 2
    pool.close_server(pool.idle[0], "test")
    assert (slots.server_count, slots.db_server_count["appdb"]) == (1, 1)


def test_limits_list_only_what_is_configured() -> None:
    slots = server_slots(max_servers=5)
    pool = FakePool(slots, "appdb", "app", max_db_connections=3)
    pool.open()
    assert slots.limits(pool) == [("global", 1, 5), ("db", 1, 3)]  # type: ignore[arg-type]


def test_user_setting_overrides_the_pools_max_user_connections() -> None:
    slots = server_slots(app=2)
    pool = FakePool(slots, "appdb", "app", max_user_connections=7)
    other = FakePool(slots, "appdb", "report", max_user_connections=7)
    assert slots.max_user_connections(pool) == 2  # type: ignore[arg-type]
    assert slots.max_user_connections(other) == 7  # type: ignore[arg-type]


def test_below_every_limit_a_pool_may_open() -> None:
    slots = server_slots(max_servers=2)
    pool = FakePool(slots, "appdb", "app")
    pool.open()
    assert slots.may_open(pool)  # type: ignore[arg-type]
    assert not slots.starving


def test_at_the_limit_an_idle_server_of_another_pool_makes_room() -> None:
    slots = server_slots(max_servers=2)
    busy = FakePool(slots, "appdb", "app")
    idle = FakePool(slots, "otherdb", "app")
    busy.open()
    idle.open(idle_since=5.0)
    assert slots.may_open(busy)  # type: ignore[arg-type]
    assert [reason for _, reason in idle.closed] == [LENT]
    assert slots.server_count == 1 and not slots.starving


def test_the_least_recently_used_idle_server_is_the_victim() -> None:
    slots = server_slots()
    recent = FakePool(slots, "a", "app")
    old = FakePool(slots, "b", "app")
    recent.open(idle_since=9.0)
    old.open(idle_since=2.0)
    old.open(idle_since=3.0)
    victim = slots.idle_victim("c", "app", ["global"])
    assert victim is old.idle[0]


def test_victims_stay_within_the_blocked_scope_and_above_min_size() -> None:
    slots = server_slots()
    other_db = FakePool(slots, "otherdb", "app")
    same_db_at_min = FakePool(slots, "appdb", "report", min_size=1)
    same_db = FakePool(slots, "appdb", "batch")
    other_db.open(idle_since=1.0)
    same_db_at_min.open(idle_since=2.0)
    assert slots.idle_victim("appdb", "app", ["db"]) is None
    same_db.open(idle_since=3.0)
    assert slots.idle_victim("appdb", "app", ["db"]) is same_db.idle[0]
    assert slots.idle_victim("appdb", "app", ["user"]) is other_db.idle[0]


def test_the_own_pool_is_never_its_victim() -> None:
    slots = server_slots(max_servers=1)
    pool = FakePool(slots, "appdb", "app")
    pool.open(idle_since=1.0)
    assert slots.idle_victim("appdb", "app", ["global"]) is None


def test_without_room_a_pool_starves_until_a_slot_is_freed() -> None:
    slots = server_slots(max_servers=1)
    holder = FakePool(slots, "appdb", "app")
    hungry = FakePool(slots, "otherdb", "app")
    holder.open(idle_since=1.0)
    holder.settings = dataclasses.replace(holder.settings, min_size=1)  # no victim here
    assert not slots.may_open(hungry, register_starving=False)  # type: ignore[arg-type]
    assert not slots.starving  # a quiet check registers nothing
    assert not slots.may_open(hungry)  # type: ignore[arg-type]
    assert list(slots.starving) == [hungry]
    assert slots.has_starving_pools(holder)  # type: ignore[arg-type]
    assert not slots.has_starving_pools(hungry)  # type: ignore[arg-type]
    hungry.waiting.append(object())
    holder.close_server(holder.idle[0], "test")
    assert hungry.grown == 1 and not slots.starving


def test_a_starving_pool_without_waiters_is_dropped_without_growing() -> None:
    slots = server_slots(max_servers=1)
    holder = FakePool(slots, "appdb", "app")
    hungry = FakePool(slots, "otherdb", "app")
    holder.open()
    assert not slots.may_open(hungry)  # type: ignore[arg-type]
    slots.feed_starving()
    assert hungry.grown == 0 and not slots.starving


# --- several workers: the ledger ---------------------------------------------


def shared_slots(max_servers: int) -> tuple[ServerSlots, Ledger, FakePeers]:
    slots = server_slots(max_servers=max_servers)
    ledger = Ledger(workers=2, slots=64)
    peers = FakePeers()
    slots.ledger, slots.peers = ledger, peers
    return slots, ledger, peers


def count_elsewhere(ledger: Ledger, rows: tuple[int, ...]) -> None:
    """Worker 1 takes a slot under ROWS."""
    ledger.index = 1
    assert ledger.take([(row, 0) for row in rows]) is None
    ledger.index = 0


def test_shared_slot_is_taken_in_the_ledger() -> None:
    slots, ledger, _ = shared_slots(max_servers=2)
    pool = FakePool(slots, "appdb", "app", size=4)
    assert slots.may_open(pool)  # type: ignore[arg-type]
    assert [ledger.total(row) for row in pool.shared_rows] == [1, 1, 1, 1]


def test_a_global_limit_counts_other_workers_servers() -> None:
    slots, ledger, peers = shared_slots(max_servers=1)
    pool = FakePool(slots, "appdb", "app", size=4)
    count_elsewhere(ledger, pool.shared_rows)
    assert not slots.may_open(pool)  # type: ignore[arg-type]
    assert peers.broadcasts == [RoomWanted("appdb", "app", "global")]
    assert list(slots.starving) == [pool]
    assert not slots.may_open(pool)  # type: ignore[arg-type]
    assert len(peers.broadcasts) == 1  # once per episode


def test_a_full_pool_asks_the_others_for_one_of_its_servers() -> None:
    slots, ledger, peers = shared_slots(max_servers=0)
    pool = FakePool(slots, "appdb", "app", size=1)
    count_elsewhere(ledger, pool.shared_rows)
    assert not slots.may_open(pool)  # type: ignore[arg-type]
    assert peers.broadcasts == [RoomWanted("appdb", "app", "pool")]


def test_a_local_idle_server_makes_room_under_a_shared_limit() -> None:
    slots, _, peers = shared_slots(max_servers=1)
    busy = FakePool(slots, "appdb", "app", size=4)
    idle = FakePool(slots, "otherdb", "app", size=4)
    assert slots.may_open(idle)  # type: ignore[arg-type]
    idle.open(idle_since=1.0)
    assert slots.may_open(busy)  # type: ignore[arg-type]
    assert [reason for _, reason in idle.closed] == [LENT]
    assert not peers.broadcasts


def test_a_freed_shared_slot_wakes_workers_whose_pools_starve() -> None:
    slots, ledger, peers = shared_slots(max_servers=0)
    elsewhere = ServerSlots(slots.config, {})  # worker 1's view of the same ledger
    elsewhere.ledger, elsewhere.peers = ledger, FakePeers()
    hungry = FakePool(elsewhere, "appdb", "app", size=1)
    count_elsewhere(ledger, hungry.shared_rows)  # its one server is busy
    ledger.index = 1
    assert not elsewhere.may_open(hungry)  # type: ignore[arg-type]
    ledger.index = 0
    pool = FakePool(slots, "otherdb", "app", size=4)
    assert slots.may_open(pool)  # type: ignore[arg-type]
    pool.open(idle_since=1.0)
    assert not peers.sent
    pool.close_server(pool.idle[0], "test")
    assert peers.sent == [(1, SlotFreed())]


# --- clients -------------------------------------------------------------------


def test_client_slots_count_per_database_and_user() -> None:
    clients = ClientSlots()
    assert clients.take("appdb", 2, "app", 0) == ""
    assert clients.take("appdb", 2, "app", 0) == ""
    assert clients.take("appdb", 2, "app", 0) == "max_db_client_connections"
    assert clients.take("otherdb", 0, "app", 3) == ""
    assert clients.take("otherdb", 0, "app", 3) == "max_user_client_connections"
    clients.release("appdb", "app")
    assert clients.take("appdb", 2, "app", 0) == ""
    for _ in range(3):
        clients.release("appdb", "app")
    clients.release("otherdb", "app")
    assert not clients.db_client_count and not clients.user_client_count


def test_client_connections_count_here_or_in_the_ledger() -> None:
    clients = ClientSlots()
    clients.connection_opened()
    clients.connection_opened()
    clients.connection_closed()
    assert clients.total() == 1
    shared = ClientSlots()
    shared.ledger = Ledger(workers=2, slots=64)
    shared.connection_opened()
    shared.ledger.index = 1
    shared.connection_opened()
    assert shared.total() == 2


@pytest.mark.parametrize(("db_limit", "user_limit", "reached"), [
    (1, 0, "max_db_client_connections"),
    (0, 1, "max_user_client_connections"),
    (0, 0, ""),
])  # fmt: skip
def test_shared_client_slots_count_all_workers(db_limit, user_limit, reached) -> None:
    clients = ClientSlots()
    clients.ledger = Ledger(workers=2, slots=64)
    clients.ledger.index = 1
    assert clients.take("appdb", db_limit, "app", user_limit) == ""
    clients.ledger.index = 0
    assert clients.take("appdb", db_limit, "app", user_limit) == reached
