"""States of a global transaction and the one table of allowed moves."""

from __future__ import annotations

import enum

from twopc.errors import FailedPrecondition


class TxState(enum.Enum):
    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTING = "aborting"
    ABORTED = "aborted"

    @property
    def final(self) -> bool:
        return self in (TxState.COMMITTED, TxState.ABORTED)


class Outcome(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"
    ABORTED = "aborted"


TRANSITIONS: dict[TxState, frozenset[TxState]] = {
    TxState.ACTIVE: frozenset({TxState.PREPARING, TxState.ABORTING, TxState.COMMITTED}),
    TxState.PREPARING: frozenset({TxState.COMMITTING, TxState.COMMITTED, TxState.ABORTING}),
    TxState.COMMITTING: frozenset({TxState.COMMITTED}),
    TxState.COMMITTED: frozenset(),
    # ABORTING -> COMMITTED: a rollback refused because the branch committed proves that an
    # earlier attempt of the same txid (a retried request id) committed: that is the outcome.
    TxState.ABORTING: frozenset({TxState.ABORTED, TxState.COMMITTED}),
    TxState.ABORTED: frozenset(),
}


def outcome_of(state: TxState) -> Outcome:
    if state in (TxState.COMMITTING, TxState.COMMITTED):
        return Outcome.COMMITTED
    if state in (TxState.ABORTING, TxState.ABORTED):
        return Outcome.ABORTED
    return Outcome.PENDING


class IllegalTransition(FailedPrecondition):
    pass


def check_transition(txid: str, current: TxState, target: TxState) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"transaction {txid} cannot go from {current.value} to {target.value}", txid=txid
        )
