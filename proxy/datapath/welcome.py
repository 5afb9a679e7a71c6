"""The welcome: what a client gets once it has joined its pool.

ParameterStatus for every server parameter (the client's own startup values
where it gave them), BackendKeyData with a cancel key of pgmux's own, and
ReadyForQuery; then whatever it pipelined before (kept, within a bound, by
ClientConnection) runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.protocol import messages
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import CLIENT_WELCOME
from pgmux.proxy.datapath import varcache

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection

log = get_logger("pgmux.client")


def send_welcome(client: ClientConnection, server_params: dict[str, str]) -> None:
    params, client.gucs = varcache.split_by_reported(client.startup_gucs, server_params)
    client.startup_gucs = {}
    client.params = varcache.interned(params)
    client.application_name = client.params.get("application_name", client.application_name)
    client.cancel_pid, client.cancel_key = client.registry.cancels.issue(client)
    key = (client.cancel_pid, client.cancel_key)
    client.send(_welcome_messages(server_params, client.params, *key))
    client.feed_to(None)
    log.info("login", **client.log_fields())
    if client.state is CLIENT_WELCOME and client.server is not None:
        return  # session mode: server_assigned goes on with the server it has
    client.welcomed()


def _welcome_messages(
    server_params: dict[str, str], params: dict[str, str], pid: int, key: bytes
) -> bytes:
    """ParameterStatus in the order the server reported them (PostgreSQL's own,
    which drivers and tests may rely on), the client's values in place of the
    server's, then BackendKeyData and ReadyForQuery."""
    out = [messages.parameter_status(k, params.get(k, v)) for k, v in server_params.items()]
    out += [messages.parameter_status(k, v) for k, v in params.items() if k not in server_params]
    out += (messages.backend_key_data(pid, key), messages.ready_for_query("I"))
    return b"".join(out)
