"""What client logins and auth_query share across the daemon.

The users file's secrets, what logins taught pgmux (the SCRAM passthrough
keys and auth_query answers PgBouncer keeps on its user credentials),
derived SCRAM secrets, the key that salts unknown
users' fake exchanges, the hba rules and the TLS contexts. The daemon fills
it at start-up and again on RELOAD; ClientAuth and AuthQuery read and learn
through it. Nothing here is ever logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgmux.proxy.config.tls import TlsContexts

if TYPE_CHECKING:
    from pgmux.protocol.auth import ScramSecret
    from pgmux.proxy.config import Config
    from pgmux.proxy.config.hba import Hba


@dataclass(frozen=True, slots=True, repr=False)
class LearnedSecret:
    """How pgmux may log in to PostgreSQL as a user, learned from a client's login."""

    password: str | None = None  # plain password or md5 hash
    client_key: bytes | None = None  # SCRAM passthrough: the client's proven ClientKey
    scram: ScramSecret | None = None  # ...and the secret it belongs to

    def __repr__(self) -> str:
        return "LearnedSecret(****)"


class AuthState:
    """Secrets and security settings of the running daemon."""

    def __init__(self, config: Config, users: dict[str, str]) -> None:
        self.config = config  # auth.* and timeouts, as auth_query reads them
        self.users = users  # name -> secret from the users file
        # what clients' logins taught us for logging in to PostgreSQL as them
        # (SCRAM passthrough keys, auth_query secrets)
        self.learned: dict[str, LearnedSecret] = {}
        # SCRAM secrets derived from plain passwords, by (user, password): PBKDF2 is slow
        self.scram_cache: dict[tuple[str, str], ScramSecret] = {}
        self.mock_key = os.urandom(32)  # salts the fake SCRAM exchange of unknown users
        self.tls = TlsContexts()  # set by the daemon from tls.*, again on reload
        self.hba: Hba | None = None  # auth.hba_file, likewise
