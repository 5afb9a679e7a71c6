"""The welcome: what a client gets once it has joined its pool.

ParameterStatus for every server parameter (the client's own startup values
where it gave them), BackendKeyData with a cancel key of pgmux's own, and
ReadyForQuery; then whatever it pipelined before (kept, within a bound, by
ClientConnection) runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.proxy.base.log import get_logger
from pgmux.proxy.core.states import CLIENT_WELCOME
from pgmux.proxy.datapath import varcache

if TYPE_CHECKING:
    from pgmux.proxy.datapath.client import ClientConnection

log = get_logger("pgmux.client")


def send_welcome(client: ClientConnection, server_params: dict[str, str]) -> None:
    params, client.gucs = varcache.split_by_reported(client.startup_gucs, server_params)
    if "DateStyle" in client.startup_gucs:
        params["DateStyle"] = datestyle(params["DateStyle"], server_params.get("DateStyle", ""))
    client.params = varcache.interned(params)
    client.application_name = client.params.get("application_name", client.application_name)
    client.cancel_pid, client.cancel_key = client.registry.cancels.issue(client)
    key = (client.cancel_pid, client.cancel_key)
    notice = client.registry.config.login_notify_message
    client.send(varcache.welcome_messages(server_params, client.params, *key, notice))
    client.feed_to(None)
    log.info("login", **client.log_fields())
    if client.state is CLIENT_WELCOME and client.server is not None:
        return  # session mode: server_assigned goes on with the server it has
    client.welcomed()


def _datestyle_word(token: str) -> tuple[str, str]:
    """("style" or "order", PostgreSQL's spelling) for one DateStyle word, as
    check_datestyle matches them (some by prefix); ("", "") if unknown."""
    if token in ("iso", "sql"):
        return "style", token.upper()
    if token.startswith("postgres"):
        return "style", "Postgres"
    if token == "german":
        return "style", "German"
    if token == "ymd":
        return "order", "YMD"
    if token == "dmy" or token.startswith("euro"):
        return "order", "DMY"
    if token in ("mdy", "us") or token.startswith("noneuro"):
        return "order", "MDY"
    return "", ""


def datestyle(value: str, current: str) -> str:
    """DateStyle as PostgreSQL reports it after the client's VALUE (its
    check_datestyle): both parts spelled its way, a part not given kept from
    CURRENT (the server's), German implying DMY unless an order is given,
    DEFAULT the server's. A value it would refuse is kept as given: the
    server then says what is wrong with it."""
    default_style, _, default_order = current.partition(", ")
    got = {"style": "", "order": ""}
    german = False
    for raw in value.split(","):
        token = raw.strip().lower()
        if token == "default":
            got["style"] = got["style"] or default_style
            got["order"] = got["order"] or default_order
            continue
        part, spelled = _datestyle_word(token)
        if not part or (got[part] and got[part] != spelled):
            return value  # unknown word, conflict, quotes, a list PostgreSQL refuses
        got[part] = spelled
        german = german or (spelled == "German" and not got["order"])
    style = got["style"] or default_style
    order = got["order"] or ("DMY" if german else default_order)
    return f"{style}, {order}" if style and order else value
