"""Host-based authentication: `auth.hba_file` in PostgreSQL's pg_hba.conf syntax.

Each line is `TYPE DATABASE USER [ADDRESS [MASK]] METHOD`; the first line that
matches the connection decides its method, and no matching line means the
connection is refused (PostgreSQL's rule). Supported, like PostgreSQL:

* TYPE: local (unix socket), host, hostssl, hostnossl; hostgssenc never matches
  (pgmux refuses GSSAPI encryption) and hostnogssenc is host.
* DATABASE and USER: comma lists of names, `all`, `sameuser` (database only),
  `@file` (names read from a file next to the hba file); a quoted keyword is
  a plain name.
* ADDRESS: `all`, `samehost` (the address the client connected to), an
  address with /prefix, or an address followed by a netmask column.
* METHOD: trust, reject, password, md5, scram-sha-256.

What PostgreSQL allows but pgmux cannot honour (group membership `+role`,
`samerole`, `samenet`, host names, other methods, options) is an error at
load time that names the line, so a rule never silently means something else.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from pgmux.proxy.config.errors import ConfigError

CONNECTION_TYPES = ("local", "host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")
METHODS = ("trust", "reject", "password", "md5", "scram-sha-256")
_UNSUPPORTED_METHODS = ("peer", "ident", "cert", "gss", "sspi", "ldap", "radius", "pam", "bsd")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    quoted: bool = False

    def is_keyword(self, word: str) -> bool:
        return not self.quoted and self.text == word


@dataclass(frozen=True, slots=True)
class HbaRule:
    line: int
    conn_type: str
    databases: tuple[Token, ...]
    users: tuple[Token, ...]
    address: Network | str | None  # None for local, "all", "samehost", or a network
    method: str


@dataclass(frozen=True, slots=True)
class Connection:
    """What a rule is matched against."""

    database: str
    user: str
    local: bool  # unix socket
    ssl: bool
    address: str | None = None  # client IP
    server_address: str | None = None  # the IP the client connected to

    def describe(self) -> str:
        """PostgreSQL's wording, for the error message."""
        host = "[local]" if self.local else self.address
        encryption = "SSL encryption" if self.ssl else "no encryption"
        return f'host "{host}", user "{self.user}", database "{self.database}", {encryption}'


class Hba:
    def __init__(self, rules: tuple[HbaRule, ...], path: str | None = None) -> None:
        self.rules = rules
        self.path = path

    def match(self, conn: Connection) -> HbaRule | None:
        """The first rule that matches, or None (which means: reject)."""
        for rule in self.rules:
            if (
                _type_matches(rule, conn)
                and _address_matches(rule, conn)
                and _names_match(rule.databases, conn.database, conn.user, True)
                and _names_match(rule.users, conn.user, conn.user, False)
            ):
                return rule
        return None


def load_hba(path: str) -> Hba:
    """Parse the file at PATH; ConfigError names the file and line."""
    return Hba(parse_hba(_read(path, path, None), path=path), path)


def parse_hba(text: str, *, path: str | None = None) -> tuple[HbaRule, ...]:
    base_dir = os.path.dirname(path) if path else os.getcwd()
    rules = []
    for number, fields in _logical_lines(text, path):
        try:
            rules.append(_rule(number, fields, base_dir, path))
        except ValueError as exc:
            raise ConfigError(path, "", str(exc), line=number) from None
    return tuple(rules)


# --- matching ------------------------------------------------------------


def _type_matches(rule: HbaRule, conn: Connection) -> bool:
    kind = rule.conn_type
    if kind == "local":
        return conn.local
    if conn.local or kind == "hostgssenc":
        return False
    if kind == "hostssl":
        return conn.ssl
    if kind == "hostnossl":
        return not conn.ssl
    return True  # host, hostnogssenc


def _address_matches(rule: HbaRule, conn: Connection) -> bool:
    if rule.address is None or rule.address == "all":
        return True
    client = _ip(conn.address)
    if client is None:
        return False
    if rule.address == "samehost":
        return client == _ip(conn.server_address)
    assert not isinstance(rule.address, str)
    return client.version == rule.address.version and client in rule.address


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _names_match(tokens: tuple[Token, ...], name: str, user: str, database: bool) -> bool:
    for token in tokens:
        if token.is_keyword("all"):
            return True
        if database and token.is_keyword("sameuser"):
            if name == user:
                return True
        elif token.text == name:
            return True
    return False


# --- parsing --------------------------------------------------------------


def _rule(number: int, fields: list[list[Token]], base_dir: str, path: str | None) -> HbaRule:
    if len(fields) < 4:
        raise ValueError("end-of-line before authentication method")
    for field in fields:
        if len(field) != 1 and field is not fields[1] and field is not fields[2]:
            raise ValueError("a comma-separated list is allowed only for database and user")
    conn_type = fields[0][0].text
    if conn_type not in CONNECTION_TYPES:
        raise ValueError(f'invalid connection type "{conn_type}"')
    databases = _expand(fields[1], base_dir, path, "database")
    users = _expand(fields[2], base_dir, path, "user")
    rest = [field[0] for field in fields[3:]]
    address: Network | str | None = None
    if conn_type != "local":
        address, rest = _address(rest)
    if not rest:
        raise ValueError("end-of-line before authentication method")
    method = rest[0].text
    if method in _UNSUPPORTED_METHODS:
        raise ValueError(f'authentication method "{method}" is not supported by pgmux')
    if method not in METHODS:
        raise ValueError(f'invalid authentication method "{method}"')
    if len(rest) > 1:
        raise ValueError(f'authentication options are not supported ("{rest[1].text}")')
    return HbaRule(number, conn_type, databases, users, address, method)


def _expand(tokens: list[Token], base_dir: str, path: str | None, what: str) -> tuple[Token, ...]:
    out: list[Token] = []
    for token in tokens:
        if not token.quoted and token.text.startswith("@"):
            name = os.path.join(base_dir, token.text[1:])
            out += _names_file(name, path)
            continue
        if not token.quoted and token.text.startswith("+"):
            raise ValueError(f'group membership "{token.text}" is not supported by pgmux')
        if not token.quoted and token.text in ("samerole", "samegroup"):
            raise ValueError(f'"{token.text}" is not supported by pgmux')
        if what == "user" and token.is_keyword("sameuser"):
            raise ValueError('"sameuser" is a database keyword')
        out.append(token)
    return tuple(out)


def _names_file(name: str, hba_path: str | None) -> list[Token]:
    """The names in an @file: separated by spaces, commas or lines; # comments."""
    tokens: list[Token] = []
    for _, fields in _logical_lines(_read(name, hba_path, "@file"), name):
        for field in fields:
            tokens += field
    return tokens


def _address(rest: list[Token]) -> tuple[Network | str, list[Token]]:
    if not rest:
        raise ValueError("end-of-line before IP address")
    text = rest[0].text
    if not rest[0].quoted and text in ("all", "samehost"):
        return text, rest[1:]
    if not rest[0].quoted and text == "samenet":
        raise ValueError('"samenet" is not supported by pgmux; write the network instead')
    if "/" in text:
        return _network(text), rest[1:]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f'invalid IP address "{text}" (host names are not supported)') from None
    if len(rest) < 2:
        raise ValueError(f'IP address "{text}" needs a /prefix or a netmask')
    mask = rest[1].text
    try:
        network = ipaddress.ip_network(f"{text}/{mask}", strict=False)
    except ValueError:
        raise ValueError(f'invalid IP mask "{mask}"') from None
    return network, rest[2:]


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'invalid IP address/prefix "{text}"') from None


_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([^\s,"#]+)|(,)|(#.*)|(\s+)|(")')


def _logical_lines(text: str, path: str | None) -> list[tuple[int, list[list[Token]]]]:
    """(line number, fields) per non-empty line; a field is a comma list of tokens."""
    lines: list[tuple[int, list[list[Token]]]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        fields = _fields(pending + raw, path, start)
        pending = ""
        if fields:
            lines.append((start, fields))
    if pending and (fields := _fields(pending, path, start)):
        lines.append((start, fields))
    return lines


def _fields(line: str, path: str | None, number: int) -> list[list[Token]]:
    fields: list[list[Token]] = []
    current: list[Token] = []
    after_comma = False
    for match in _TOKEN.finditer(line):
        quoted, bare, comma, comment, space, stray = match.groups()
        if comment is not None:
            break
        if stray is not None:
            raise ConfigError(path, "", "unterminated quoted string", line=number)
        if comma is not None:
            if not current:
                if not fields:
                    raise ConfigError(path, "", "empty item in a comma-separated list", line=number)
                current = fields.pop()  # "a , b": the space did not end the list (PgBouncer)
            after_comma = True
        elif space is not None:
            if current and not after_comma:
                fields.append(current)
                current = []
        else:
            if current and not after_comma:
                # "a"b or a"b": PostgreSQL reads one token; so do we.
                last = current.pop()
                text = last.text + (quoted.replace('""', '"') if quoted is not None else bare)
                current.append(Token(text, last.quoted or quoted is not None))
            elif quoted is not None:
                current.append(Token(quoted.replace('""', '"'), True))
            else:
                current.append(Token(bare))
            after_comma = False
    if after_comma:
        raise ConfigError(path, "", "a comma-separated list ends with a comma", line=number)
    if current:
        fields.append(current)
    return fields


def _read(name: str, hba_path: str | None, what: str | None) -> str:
    try:
        with open(name, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        where = f" ({what} of {hba_path})" if what else ""
        raise ConfigError(name, "", f"cannot read the hba file{where}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text (byte {exc.start})") from None
