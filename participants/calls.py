"""What the agent's calls take and answer: client statements in (checked by the statement guard
before anything reaches the database), votes and commit results out."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from participants.xa import Session, StatementOutput
from twopc.sql_guard import StatementKind, check_statement
from twopc.txid import Xid
from twopc.values import SqlValue
from twopc.votes import Vote


@dataclass(frozen=True)
class StatementRequest:
    sql: str
    params: list[SqlValue]


@dataclass(frozen=True)
class Work:
    """A client statement that passed the guard."""

    sql: str
    params: list[SqlValue]
    kind: StatementKind
    body: str | None  # the statement to send in a batch (None: it must go on its own)
    session_state: bool = True  # may leave state on its session: reset it before reuse


def mark_for_reset(session: Session, work: Sequence[Work], *, always: bool) -> None:
    """Before ``work`` runs on ``session``: the session is reset when it returns to the pool if
    any of it may leave state there (a statement that fails may have left some already), or
    ``always`` (the agent's ``reset_sessions`` setting)."""
    if always or any(item.session_state for item in work):
        session.reset_when_released = True


@dataclass(frozen=True)
class VoteResult:
    vote: Vote
    reason: str = ""
    mysql_errno: int = 0
    outputs: tuple[StatementOutput, ...] = ()


@dataclass(frozen=True)
class CommitResult:
    outputs: tuple[StatementOutput, ...] = ()
    already_committed: bool = False


@dataclass(frozen=True)
class RecoveredBranch:
    xid: Xid
    held_by_this_agent: bool


def checked_work(statements: Sequence[StatementRequest], marker_table: str) -> list[Work]:
    """The statements as work, each checked by the guard (which keeps clients off the marker
    table). Raises InvalidArgument for the first it refuses."""
    work = []
    for statement in statements:
        checked = check_statement(
            statement.sql,
            placeholders=len(statement.params),
            protected_tables=(marker_table.lower(),),
        )
        work.append(
            Work(statement.sql, statement.params, checked.kind, checked.body, checked.session_state)
        )
    return work


def work_digest(work: Sequence[Work]) -> bytes:
    """A digest of the statements and their parameters (types included: 1, 1.0, "1" and
    Decimal("1.0") differ), so that a retried call can be told from other work sent under the
    same sequence number without keeping the work itself."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    for item in work:
        feed(item.sql.encode("utf-8", "surrogatepass"))
        digest.update(len(item.params).to_bytes(8, "big"))
        for param in item.params:
            if isinstance(param, str):
                feed(b"s" + param.encode("utf-8", "surrogatepass"))
            elif isinstance(param, bytes):
                feed(b"y" + param)
            else:  # None, bool, int, float, Decimal, datetime, date, timedelta: repr is exact
                feed(repr(param).encode("ascii", "backslashreplace"))
    return digest.digest()
