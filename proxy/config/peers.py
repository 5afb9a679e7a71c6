"""The `peers:` section (YAML) and PgBouncer's `peer_id` / `[peers]` (ini).

    peers:
      peer_id: 1                      # this instance, 1..16383; 0 = off
      secret: ${PGMUX_PEERS_SECRET}   # optional: signs protocol 3.2 cancel keys
      short_keys: false               # true: 8-byte keys for all, when PgBouncer is a peer
      members:                        # every instance, this one may be listed too
        - {id: 1, host: 10.0.0.11, port: 6432}
        - {id: 2, host: /run/pgmux-2, port: 6432}   # a unix socket directory

In a pgbouncer.ini the same is `peer_id = 1` in [pgbouncer] and a [peers]
section of `1 = host=10.0.0.11 port=6432` lines (PgBouncer's pool_size, the
cancels in flight to one peer, is accepted and not needed).
"""

from __future__ import annotations

from typing import Any

from pgmux.proxy.config.errors import join_key, key_error
from pgmux.proxy.config.model import MAX_PEER_ID, PeerConfig, PeersConfig
from pgmux.proxy.config.values import boolean, expected_error, integer, port, secret, text

peer_id = integer(0, MAX_PEER_ID, f"an integer from 0 to {MAX_PEER_ID}")
_member_id = integer(1, MAX_PEER_ID, f"an integer from 1 to {MAX_PEER_ID}")
_MEMBER_KEYS = ("id", "host", "port")
_KEYS = ("peer_id", "secret", "short_keys", "members")


def _mapping(value: Any, key: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise expected_error(key, "a mapping", value)
    for name in value:
        if name not in (_MEMBER_KEYS if key.endswith("]") else _KEYS):
            allowed = ", ".join(_MEMBER_KEYS if key.endswith("]") else _KEYS)
            raise key_error(join_key(key, str(name)), f"unknown key (expected one of: {allowed})")
    return value


def _member(value: Any, key: str) -> PeerConfig:
    entry = _mapping(value, key)
    if "id" not in entry or "host" not in entry:
        raise key_error(key, "a peer needs an id and a host")
    return PeerConfig(
        id=_member_id(entry["id"], join_key(key, "id")),
        host=text(entry["host"], join_key(key, "host")),
        port=port(entry.get("port", 6432), join_key(key, "port")),
    )


def parse_peers(value: Any, key: str = "peers") -> PeersConfig:
    """The `peers:` mapping; ids unique, and an id of our own when peers are listed."""
    entry = _mapping(value, key)
    members_value = entry.get("members") or []
    if not isinstance(members_value, list):
        raise expected_error(join_key(key, "members"), "a list of {id, host, port}", members_value)
    members = tuple(
        _member(item, f"{key}.members[{index}]") for index, item in enumerate(members_value)
    )
    ids = [member.id for member in members]
    for member_id in ids:
        if ids.count(member_id) > 1:
            raise key_error(join_key(key, "members"), f"peer id {member_id} is listed twice")
    own = peer_id(entry.get("peer_id", 0), join_key(key, "peer_id"))
    if members and not own:
        raise key_error(join_key(key, "peer_id"), "this instance's id is needed with members")
    return PeersConfig(
        peer_id=own,
        members=members,
        secret=secret(entry.get("secret"), join_key(key, "secret")),
        short_keys=boolean(entry.get("short_keys", False), join_key(key, "short_keys")),
    )


def peer_from_ini(name: str, params: dict[str, str]) -> dict[str, Any]:
    """One [peers] line (`2 = host=h port=p`), as the YAML member it stands for."""
    try:
        member_id = int(name)
    except ValueError:
        raise ValueError(f"a peer id must be a number, got {name!r}") from None
    if "host" not in params:
        raise ValueError(f"host was not provided for peer {member_id}")
    unknown = sorted(set(params) - {"host", "port", "pool_size"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} for peer {member_id}")
    member: dict[str, Any] = {"id": member_id, "host": params["host"]}
    if "port" in params:
        member["port"] = int(params["port"])
    return member
