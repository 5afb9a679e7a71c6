"""Which auth_query a login runs: PgBouncer's auth_user, auth_query, auth_dbname.

Each comes from the client's database entry, else from the auth section:
the auth_user (`auth_user=` of the entry, else `auth.query_user`), the query
(`auth_query=`, else `auth.query`) and the database it runs in (`auth_dbname=`,
else `auth.dbname`, else the client's own database; an unlisted name takes
the "*" entry, as PgBouncer registers an automatic database). As in
PgBouncer's prepare_auth_database, an auth database that is not configured,
is the console, or is disabled refuses the login (src/client.c).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgmux.protocol import sqlstate
from pgmux.protocol.errors import ProtocolError
from pgmux.proxy.base.log import get_logger
from pgmux.proxy.config import ADMIN_DATABASES
from pgmux.proxy.datapath.authquery import Lookup

if TYPE_CHECKING:
    from pgmux.proxy.config import Config, DatabaseConfig
    from pgmux.proxy.core.flags import Flags

log = get_logger("pgmux.client")

CONFIG_ERROR = "bouncer config error"  # PgBouncer's words to the client


def lookup_for(
    config: Config,
    flags: Flags,
    dbname: str,
    database: DatabaseConfig | None,
    fields: dict[str, str],
) -> Lookup | None:
    """The auth_query for a client of DBNAME (DATABASE: its entry, None for
    the console); None when no auth_user applies. FIELDS: the client's log fields."""
    auth = config.auth
    user = (database.auth_user if database is not None else None) or auth.query_user
    query = (database.auth_query if database is not None else None) or auth.query
    if not user or not query:
        return None
    named = (database.auth_dbname if database is not None else None) or auth.dbname
    auth_dbname = named or dbname
    if auth_dbname in ADMIN_DATABASES:
        detail = f'cannot use the reserved "{auth_dbname}" database as an auth_dbname'
        raise _config_error(detail, fields)
    auth_database = database if named is None else config.database(auth_dbname)
    if auth_database is None:
        detail = f'authentication database "{auth_dbname}" is not configured.'
        raise _config_error(detail, fields)
    if flags.is_disabled(auth_dbname):
        message = f'authentication database "{auth_dbname}" is disabled'
        raise ProtocolError(message, sqlstate.CANNOT_CONNECT_NOW)
    upstream = auth_database.dbname or auth_dbname
    return Lookup(auth_database.host, auth_database.port, upstream, user, query)


def _config_error(detail: str, fields: dict[str, str]) -> ProtocolError:
    log.error("login_config_error", detail=detail, **fields)
    return ProtocolError(CONFIG_ERROR, sqlstate.CONFIG_FILE_ERROR)
