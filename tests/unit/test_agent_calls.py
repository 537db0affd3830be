"""What the agent derives from a call's statements: the digest that tells a retry from other work
under the same sequence number, and whether the session is reset afterwards."""

from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass

import pytest

from participants.calls import StatementRequest, checked_work, mark_for_reset, work_digest
from twopc.values import SqlValue

MARKER = "twopc_branch_marker"


def digest(*statements: tuple[str, list[SqlValue]]) -> bytes:
    return work_digest(checked_work([StatementRequest(s, p) for s, p in statements], MARKER))


def test_the_same_statements_and_parameters_have_the_same_digest() -> None:
    statement = ("UPDATE t SET a = %s WHERE id = %s", [decimal.Decimal("1.50"), 7])
    assert digest(statement) == digest(statement)
    assert len(digest(statement)) == 16


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([1], [2]),
        ([1], [1.0]),  # equal in Python, not the same parameter
        ([1], ["1"]),
        ([1], [True]),
        ([decimal.Decimal("1.0")], [decimal.Decimal("1.00")]),
        (["a"], [b"a"]),
        ([None], [""]),
        ([dt.date(2024, 1, 1)], [dt.datetime(2024, 1, 1)]),
        (["ab", "c"], ["a", "bc"]),  # lengths are part of it
    ],
    ids=repr,
)
def test_other_parameters_have_another_digest(
    first: list[SqlValue], second: list[SqlValue]
) -> None:
    sql = "SELECT " + ", ".join(["%s"] * len(first))
    assert digest((sql, first)) != digest((sql, second))


def test_other_statements_have_another_digest() -> None:
    one = ("SELECT 1", [])
    assert digest(one) != digest(("SELECT 2", []))
    assert digest(one) != digest(one, one)
    assert digest(("SELECT 1", []), ("SELECT 2", [])) != digest(("SELECT 1 ", []))


@dataclass
class FakeSession:
    reset_when_released: bool = False


@pytest.mark.parametrize(
    ("statements", "always", "reset"),
    [
        (["UPDATE t SET a = a + 1 WHERE id = 1", "SELECT a FROM t"], False, False),
        (["UPDATE t SET a = 1", "INSERT INTO t (a) VALUES (1)"], False, True),
        (["SELECT my_function()"], False, True),
        (["SELECT a FROM t"], True, True),  # reset_sessions = "always"
    ],
)
def test_a_session_is_reset_after_a_statement_that_may_leave_state(
    statements: list[str], always: bool, reset: bool
) -> None:
    work = checked_work([StatementRequest(s, []) for s in statements], MARKER)
    session = FakeSession()
    mark_for_reset(session, work, always=always)  # type: ignore[arg-type]
    assert session.reset_when_released is reset
