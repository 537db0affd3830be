"""What the agent's database user may hold, judged from ``SHOW GRANTS`` (pure: no I/O).

The agent needs, on MariaDB 10.11 (measured; proto/PROTOCOL.md, "What MariaDB does"), nothing
server-wide: XA START/END/PREPARE/COMMIT/ROLLBACK and XA RECOVER need no privilege, a user may
KILL its own sessions and sees them (and only them) in information_schema.PROCESSLIST, and
``SET SESSION`` of its settings needs none. It needs SELECT, INSERT, UPDATE and DELETE on the
schemas statements may touch (REPLACE is INSERT and DELETE), and CREATE on the marker table
alone until that table exists. MySQL 8 also needs ``XA_RECOVER_ADMIN`` for XA RECOVER.

Everything beyond that is a finding, with the REVOKE that takes it away:

- any server-wide privilege but USAGE (and XA_RECOVER_ADMIN): FILE reads and writes files on the
  database host, SUPER bypasses most checks, PROCESS shows every session's statements, and
  SELECT or ALL on ``*.*`` reach every schema, ``mysql`` included;
- any right on ``mysql``, and on any schema that is not configured for statements (a schema
  pattern with an unescaped ``_`` or ``%`` counts as another schema: it matches others);
- on a configured schema, rights beyond SELECT, INSERT, UPDATE, DELETE and EXECUTE (stored
  functions the database's owner wrote); CREATE on the marker table is allowed;
- the grant option, PROXY, and roles (the agent cannot see what a role that is not active
  allows, and a client could not set one, but nothing in the database stops it).

Grants to PUBLIC (MariaDB 10.11), which ``SHOW GRANTS`` lists, are judged like the user's own.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOWED_GLOBAL",
    "ALLOWED_ON_SCHEMA",
    "Finding",
    "Grant",
    "GrantLevel",
    "UnreadableGrant",
    "grant_findings",
    "least_grants",
    "parse_grant",
    "quote_name",
    "reach_findings",
]

ALLOWED_GLOBAL = frozenset({"USAGE", "XA_RECOVER_ADMIN"})
# What reading information_schema.INNODB_LOCK_WAITS and INNODB_TRX needs (the agent's lock wait
# reports, ``report_lock_waits``): allowed, and granted, only with that setting on.
LOCK_WAITS_PRIVILEGE = "PROCESS"
ALLOWED_ON_SCHEMA = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "EXECUTE"})
NEEDED_ON_SCHEMA = ("SELECT", "INSERT", "UPDATE", "DELETE")
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})

# Why a server-wide privilege is refused, for the ones an operator is most likely to meet.
_GLOBAL_WHY = {
    "ALL PRIVILEGES": "every right on every schema, mysql.* included",
    "FILE": "reads and writes files on the database host (LOAD_FILE, INTO OUTFILE)",
    "SUPER": "bypasses read_only and connection limits, kills any session, sets globals",
    "PROCESS": "shows every session's statements and InnoDB's internals",
    "CONNECTION ADMIN": "kills other users' sessions",
    "SHOW DATABASES": "lists every schema",
    "SELECT": "reads every schema, mysql.* included",
    "INSERT": "writes every schema, mysql.* included",
    "UPDATE": "writes every schema, mysql.* included",
    "DELETE": "writes every schema, mysql.* included",
}


class GrantLevel(enum.Enum):
    GLOBAL = "global"  # ON *.*
    SCHEMA = "schema"  # ON `db`.*  (the name is a LIKE pattern)
    TABLE = "table"  # ON `db`.`table`
    ROUTINE = "routine"  # ON FUNCTION|PROCEDURE|PACKAGE [BODY] `db`.`name`
    PROXY = "proxy"  # GRANT PROXY ON ''@'%'
    ROLE = "role"  # GRANT `role` TO ...


class UnreadableGrant(ValueError):
    """A ``SHOW GRANTS`` line this module cannot read (so it cannot vouch for it)."""


@dataclass(frozen=True)
class Grant:
    """One line of ``SHOW GRANTS``.

    Attributes:
        privileges: each as written (``SELECT``, ``UPDATE (`a`, `b`)``, ``ALL PRIVILEGES``), or
            the role names of a role grant.
        names: each privilege's name alone, upper case (``UPDATE``, ``ALL PRIVILEGES``).
        level: what the grant is on.
        target: the object as written after ON (``*.*``, ```shop`.*``, ``FUNCTION `shop`.`f```);
            empty for a role grant.
        schema: the schema named (unescaped), or None (global, proxy, role).
        pattern: the schema name is a pattern with an unescaped ``_`` or ``%``.
        table: the table or routine named, or None.
        grantee: as written (```twopc_agent`@`%```, ``PUBLIC``).
        grant_option: WITH GRANT OPTION.
    """

    privileges: tuple[str, ...]
    names: tuple[str, ...]
    level: GrantLevel
    target: str
    schema: str | None
    pattern: bool
    table: str | None
    grantee: str
    grant_option: bool


@dataclass(frozen=True)
class Finding:
    """A right the agent's user should not have: what it is, and the statement that fixes it."""

    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what} (run: {self.fix})"


_TOKEN = re.compile(
    r"\s*(?:(?P<ident>`(?:[^`]|``)*`)|(?P<string>'(?:[^'\\]|\\.|'')*')"
    r"|(?P<word>[A-Za-z0-9_$]+)|(?P<punct>\S))"
)


@dataclass(frozen=True)
class _Token:
    kind: str  # ident, string, word, punct
    text: str  # as written
    start: int
    end: int

    @property
    def value(self) -> str:
        if self.kind == "ident":
            return self.text[1:-1].replace("``", "`")
        if self.kind == "word":
            return self.text.upper()
        return self.text

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words


def _tokens(line: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(line):
        match = _TOKEN.match(line, position)
        if match is None or match.end() == position:
            break
        kind = match.lastgroup or "punct"
        tokens.append(_Token(kind, match.group(kind), match.start(kind), match.end(kind)))
        position = match.end()
    if line[position:].strip():
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    return tokens


def parse_grant(line: str) -> Grant | None:
    """One ``SHOW GRANTS`` line as a ``Grant``; None for a line that grants nothing
    (``SET DEFAULT ROLE ...``). Raises ``UnreadableGrant`` for a line it cannot read."""
    tokens = _tokens(line.strip())
    if tokens and tokens[0].is_word("SET"):
        return None
    if not tokens or not tokens[0].is_word("GRANT"):
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    # The privilege (or role) list runs to ON, or to TO for a role grant, outside parentheses.
    depth = 0
    items: list[list[_Token]] = [[]]
    index = 1
    while index < len(tokens):
        token = tokens[index]
        if depth == 0 and token.is_word("ON", "TO"):
            break
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            depth -= 1
        if depth == 0 and token.text == ",":
            items.append([])
        else:
            items[-1].append(token)
        index += 1
    if index == len(tokens) or not all(items):
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    privileges = tuple(line[item[0].start : item[-1].end] for item in items)
    names = tuple(_privilege_name(item) for item in items)
    if tokens[index].is_word("TO"):  # GRANT `role` TO ...
        grantee, option = _grantee(line, tokens, index)
        return Grant(privileges, names, GrantLevel.ROLE, "", None, False, None, grantee, option)
    on = index + 1
    to = next((i for i in range(on, len(tokens)) if tokens[i].is_word("TO")), None)
    if to is None or to == on:
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    target = line[tokens[on].start : tokens[to - 1].end]
    grantee, grant_option = _grantee(line, tokens, to)
    if names == ("PROXY",):
        return Grant(
            privileges, names, GrantLevel.PROXY, target, None, False, None, grantee, grant_option
        )
    level, schema, pattern, table = _object(tokens[on:to], line)
    return Grant(privileges, names, level, target, schema, pattern, table, grantee, grant_option)


def _privilege_name(item: Sequence[_Token]) -> str:
    """``UPDATE`` of ``UPDATE (`a`)``; ``DELETE HISTORY``; a role's name for a role grant."""
    if item[0].kind != "word":
        return item[0].value
    words = []
    for token in item:
        if token.kind != "word":
            break
        words.append(token.value)
    return " ".join(words)


def _grantee(line: str, tokens: Sequence[_Token], to: int) -> tuple[str, bool]:
    """The grantee after TO (a user ``u@h``, a role, or PUBLIC) and whether the grant option
    follows."""
    rest = tokens[to + 1 :]
    if not rest:
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    end = 1
    if len(rest) >= 3 and rest[1].text == "@":
        end = 3
    grantee = line[rest[0].start : rest[end - 1].end]
    tail = rest[end:]
    option = any(a.is_word("GRANT") and b.is_word("OPTION") for a, b in itertools.pairwise(tail))
    return grantee, option


def _object(tokens: Sequence[_Token], line: str) -> tuple[GrantLevel, str | None, bool, str | None]:
    routine = False
    while tokens and tokens[0].is_word("FUNCTION", "PROCEDURE", "PACKAGE", "BODY", "TABLE"):
        routine = routine or not tokens[0].is_word("TABLE")
        tokens = tokens[1:]
    if len(tokens) != 3 or tokens[1].text != ".":
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    first, last = tokens[0], tokens[2]
    if first.text == "*" and last.text == "*":
        return GrantLevel.GLOBAL, None, False, None
    if first.kind not in ("ident", "word"):
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    if last.text == "*":
        name, pattern = _unescape_pattern(first.value if first.kind == "ident" else first.text)
        return GrantLevel.SCHEMA, name, pattern, None
    if last.kind not in ("ident", "word"):
        raise UnreadableGrant(f"cannot read the grant {line!r}")
    # Below schema level the names are literal (no wildcards).
    schema = first.value if first.kind == "ident" else first.text
    table = last.value if last.kind == "ident" else last.text
    return (GrantLevel.ROUTINE if routine else GrantLevel.TABLE), schema, False, table


def _unescape_pattern(text: str) -> tuple[str, bool]:
    """A schema-level grant's name: ``\\_`` and ``\\%`` are the characters, a bare ``_`` or
    ``%`` a wildcard. Returns the name without escapes and whether it holds a wildcard."""
    name = []
    wildcard = False
    escaped = False
    for char in text:
        if escaped:
            name.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            wildcard = wildcard or char in "_%"
            name.append(char)
    return "".join(name), wildcard


def quote_name(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def grant_findings(
    lines: Iterable[str],
    *,
    schemas: Sequence[str],
    database: str,
    marker_table: str,
    lock_waits: bool = False,
) -> list[Finding]:
    """What the grants give beyond the agent's needs, one finding per right to take away.

    Args:
        lines: ``SHOW GRANTS`` as the agent's user sees it (its own grants, its active role's,
            PUBLIC's).
        schemas: the schemas statements may touch.
        database: the agent's own schema (``mysql_database``), where the marker table is.
        marker_table: the marker table's name (CREATE on it is allowed).
    """
    findings = []
    for line in lines:
        try:
            grant = parse_grant(line)
        except UnreadableGrant:
            findings.append(Finding(f"a grant the agent cannot read: {line}", "check it by hand"))
            continue
        if grant is not None:
            findings.extend(_judge(grant, set(schemas), database, marker_table, lock_waits))
    return findings


def _judge(
    grant: Grant, schemas: set[str], database: str, marker_table: str, lock_waits: bool
) -> list[Finding]:
    findings = []
    revoke_all = f"REVOKE {', '.join(grant.privileges)} ON {grant.target} FROM {grant.grantee}"
    if grant.level is GrantLevel.ROLE:
        for role in grant.privileges:
            findings.append(
                Finding(
                    f"role {role} granted to {grant.grantee}: the agent cannot see what a role "
                    "allows; grant the privileges to the user itself",
                    f"REVOKE {role} FROM {grant.grantee}",
                )
            )
        return findings
    if grant.level is GrantLevel.PROXY:
        findings.append(Finding(f"PROXY on {grant.target}: acts as another user", revoke_all))
        return findings
    if grant.grant_option:
        findings.append(
            Finding(
                f"the grant option on {grant.target}: passes rights on to other users",
                f"REVOKE GRANT OPTION ON {grant.target} FROM {grant.grantee}",
            )
        )
    if grant.level is GrantLevel.GLOBAL:
        for privilege, name in zip(grant.privileges, grant.names, strict=True):
            if name in ALLOWED_GLOBAL or (lock_waits and name == LOCK_WAITS_PRIVILEGE):
                continue
            why = _GLOBAL_WHY.get(name, "a server-wide right the agent does not need")
            findings.append(
                Finding(
                    f"{privilege} on *.*: {why}",
                    f"REVOKE {privilege} ON *.* FROM {grant.grantee}",
                )
            )
        return findings
    assert grant.schema is not None
    if grant.schema.lower() == "mysql":
        findings.append(
            Finding(
                f"{', '.join(grant.privileges)} on {grant.target}: the server's own tables "
                "(users, password hashes, privileges)",
                revoke_all,
            )
        )
    elif grant.pattern:
        findings.append(
            Finding(
                f"{', '.join(grant.privileges)} on {grant.target}: a pattern (an unescaped _ or "
                "%) that matches other schemas too; grant on the exact name, _ written \\_",
                revoke_all,
            )
        )
    elif grant.schema not in schemas:
        findings.append(
            Finding(
                f"{', '.join(grant.privileges)} on {grant.target}: a schema beyond those "
                f"statements may touch ({', '.join(sorted(schemas))}); add it to the agent's "
                "schemas setting if statements are meant to reach it",
                revoke_all,
            )
        )
    else:
        marker = grant.level is GrantLevel.TABLE and (grant.schema, grant.table) == (
            database,
            marker_table,
        )
        allowed = ALLOWED_ON_SCHEMA | ({"CREATE"} if marker else set())
        extra = [p for p, n in zip(grant.privileges, grant.names, strict=True) if n not in allowed]
        if extra:
            findings.append(
                Finding(
                    f"{', '.join(extra)} on {grant.target}: not needed (statements only read and "
                    "write rows: SELECT, INSERT, UPDATE, DELETE, REPLACE)",
                    f"REVOKE {', '.join(extra)} ON {grant.target} FROM {grant.grantee}",
                )
            )
    return findings


def reach_findings(visible: Iterable[str], schemas: Sequence[str]) -> list[Finding]:
    """Schemas the server shows the user (in information_schema: those it holds any right on,
    through a grant, a role or PUBLIC) beyond ``schemas``: a check that does not depend on
    reading the grants right. information_schema, and the three tables of performance_schema
    that every account sees (global_status, session_status, session_account_connect_attrs),
    are not counted."""
    beyond = sorted(set(visible) - set(schemas) - {"information_schema", "performance_schema"})
    if not beyond:
        return []
    return [
        Finding(
            "the user reaches schemas beyond those statements may touch: "
            + ", ".join(quote_name(s) for s in beyond),
            "SHOW GRANTS FOR the user, and REVOKE what reaches them",
        )
    ]


def least_grants(
    user: str,
    schemas: Sequence[str],
    database: str,
    marker_table: str,
    *,
    lock_waits: bool = False,
) -> list[str]:
    """The GRANT statements that give ``user`` (written ```name`@`host```) what the agent needs
    on MariaDB, and no more (MySQL 8 also needs ``GRANT XA_RECOVER_ADMIN ON *.*``).
    ``lock_waits``: also PROCESS, to read who waits on whom (``report_lock_waits``)."""
    statements = [
        f"GRANT {', '.join(NEEDED_ON_SCHEMA)} ON {quote_name(schema)}.* TO {user}"
        for schema in schemas
    ]
    statements.append(
        f"GRANT CREATE ON {quote_name(database)}.{quote_name(marker_table)} TO {user}"
    )
    if lock_waits:
        statements.append(f"GRANT {LOCK_WAITS_PRIVILEGE} ON *.* TO {user}")
    return statements
