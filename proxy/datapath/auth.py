"""Client authentication: which exchange to run and whether the client passed.

The exchanges themselves (md5, SCRAM-SHA-256) live in protocol/; this module
picks one from `auth.type` (or the matching hba rule) and the user's secret,
feeds it the client's password messages and says what to send back. An
unknown user runs the same exchange as a known one and fails the same way, so
logins reveal nothing.

On TLS connections SCRAM-SHA-256-PLUS is offered too (channel binding
tls-server-end-point). A successful login leaves behind what pgmux needs to
log in to PostgreSQL as that user (a LearnedSecret): the plain or md5 secret
an auth_query returned, or, when only a SCRAM secret is known, the client's
ClientKey recovered from its proof (SCRAM passthrough, as PgBouncer does).
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

from pgmux.protocol import messages
from pgmux.protocol.auth import (
    ScramSecret,
    ScramServer,
    is_md5_hash,
    md5_hash,
    md5_verify,
    parse_scram_secret,
    secret_from_password,
)
from pgmux.protocol.errors import AuthError, ProtocolError
from pgmux.proxy.core.authstate import LearnedSecret

if TYPE_CHECKING:
    from pgmux.proxy.core.authstate import AuthState

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"


class ClientAuth:
    """One client's authentication exchange, driven by its password messages."""

    def __init__(
        self,
        method: str,
        user: str,
        secret: str | None,
        state: AuthState,
        *,
        channel_binding: bytes | None = None,
        from_auth_query: bool = False,
    ) -> None:
        self.user = user
        self.secret = secret
        self.state = state  # where learned secrets go; also the SCRAM cache, mock key
        self.method = _effective_method(method, secret)
        self.channel_binding = channel_binding  # set on TLS connections
        self.from_auth_query = from_auth_query
        self._salt = os.urandom(4)
        self._scram: ScramServer | None = None
        self._step = 0

    def start(self) -> bytes | None:
        """The first Authentication request, or None when no password is asked."""
        if self.method in ("trust", "cert"):  # cert: the TLS handshake proved who it is
            return None
        if self.method == "password":
            return messages.authentication_cleartext_password()
        if self.method == "md5":
            return messages.authentication_md5_password(self._salt)
        if self.channel_binding is not None:
            return messages.authentication_sasl([SCRAM_PLUS, SCRAM])
        return messages.authentication_sasl([SCRAM])

    def handle(self, body: bytes) -> tuple[bytes | None, bool]:
        """Feed one PasswordMessage body: (reply to send or None, finished)."""
        if self.method == "password":
            self._check_plain(messages.parse_password_message(body).decode("utf-8", "replace"))
            self._learn_password()
            return None, True
        if self.method == "md5":
            response = messages.parse_password_message(body).decode("ascii", "replace")
            if self.secret is None or not md5_verify(self.user, self.secret, self._salt, response):
                raise self._failed()
            self._learn_password()
            return None, True
        return self._handle_scram(body)

    def _learn_password(self) -> None:
        # The users file's secrets reach the pool directly; auth_query's only this way.
        if self.from_auth_query and self.secret is not None:
            self.state.learned[self.user] = LearnedSecret(password=self.secret)

    def _handle_scram(self, body: bytes) -> tuple[bytes | None, bool]:
        self._step += 1
        if self._step == 1:
            mechanism, data = messages.parse_sasl_initial_response(body)
            plus = mechanism == SCRAM_PLUS and self.channel_binding is not None
            if mechanism != SCRAM and not plus:
                raise ProtocolError(
                    "client selected an invalid SASL authentication mechanism", "28000"
                )
            self._scram = ScramServer(
                self._scram_secret(),
                username=self.user,
                mock_key=self.state.mock_key,
                channel_binding=self.channel_binding,
                plus=plus,
            )
            server_first = self._scram.handle_client_first(data)
            return messages.authentication_sasl_continue(server_first), False
        assert self._scram is not None
        try:
            final = self._scram.handle_client_final(body)  # SASLResponse: raw bytes
        except AuthError:
            raise self._scram_failed() from None
        self._learn_scram()
        return messages.authentication_sasl_final(final), True

    def _learn_scram(self) -> None:
        secret = self.secret
        if secret is None or self._scram is None or self._scram.client_key is None:
            return
        if self.from_auth_query and not secret.startswith("SCRAM-SHA-256$"):
            self.state.learned[self.user] = LearnedSecret(password=secret)
            return
        parsed = parse_scram_secret(secret)
        if parsed is not None:
            # Only the SCRAM secret is known: keep the key the client proved,
            # so pgmux can log in to PostgreSQL as this user (passthrough).
            self.state.learned[self.user] = LearnedSecret(
                client_key=self._scram.client_key, scram=parsed
            )

    def _scram_secret(self) -> ScramSecret | None:
        secret = self.secret
        if secret is None or is_md5_hash(secret):
            return None  # unknown user, or an md5 hash SCRAM cannot use: mock exchange
        parsed = parse_scram_secret(secret)
        if parsed is not None:
            return parsed
        # A plain password: derive a SCRAM secret once (PBKDF2 is deliberately slow).
        key = (self.user, secret)
        cached = self.state.scram_cache.get(key)
        if cached is None:
            cached = secret_from_password(secret)
            self.state.scram_cache[key] = cached
        return cached

    def _check_plain(self, password: str) -> None:
        secret = self.secret
        if secret is None:
            raise self._failed()
        if is_md5_hash(secret):
            ok = hmac.compare_digest(md5_hash(self.user, password), secret)
        elif secret.startswith("SCRAM-SHA-256$"):
            ok = _scram_matches(secret, password)
        else:
            ok = hmac.compare_digest(password.encode(), secret.encode())
        if not ok:
            raise self._failed()

    def failure(self) -> AuthError:
        """How this exchange fails, for a password refused before it was read."""
        if self.method in ("password", "md5"):
            return self._failed()
        return self._scram_failed()

    def _scram_failed(self) -> AuthError:
        if self.state.config.auth.pgbouncer_rules:
            return AuthError("SASL authentication failed", "28P01")  # PgBouncer's words
        return self._failed()

    def _failed(self) -> AuthError:
        return AuthError(f'password authentication failed for user "{self.user}"', "28P01")


def _effective_method(method: str, secret: str | None) -> str:
    # Like PostgreSQL: md5 with a SCRAM secret on file runs SCRAM instead.
    if method == "md5" and secret is not None and secret.startswith("SCRAM-SHA-256$"):
        return "scram-sha-256"
    return method


def _scram_matches(secret: str, password: str) -> bool:
    parsed = parse_scram_secret(secret)
    if parsed is None:
        return False
    from pgmux.protocol.auth import make_scram_secret

    again = parse_scram_secret(make_scram_secret(password, parsed.salt, parsed.iterations))
    return again is not None and hmac.compare_digest(again.stored_key, parsed.stored_key)
