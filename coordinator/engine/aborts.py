"""Why a transaction was aborted: one value, decided with the abort, and the client's error for it.

The coordinator decides ABORT for one reason, known at that moment: an ``AbortReason`` holds it
(its cause, the message the client and GetTransaction see, and the MySQL error number when a
statement failed). The error a client gets for an aborted transaction comes from
``AbortReason.client_error`` and nowhere else; ``CLIENT_ERRORS`` is the table behind it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twopc.errors import (
    CONFLICT_ERRNOS,
    InvalidArgument,
    StatementFailed,
    TransactionAborted,
    TransactionConflict,
    TwopcError,
    Unavailable,
    is_transport_failure,
)

__all__ = ["CLIENT_ERRORS", "AbortCause", "AbortReason"]


class AbortCause(enum.Enum):
    ROLLED_BACK = "rolled_back"  # the client asked for it
    DEADLINE = "deadline"  # the transaction's deadline passed
    IDLE = "idle"  # no call came for max_idle_ms
    # A statement failed on a participant (or a branch's prepare, saying why in MySQL's words):
    # the only cause with a MySQL error number.
    STATEMENT_FAILED = "statement_failed"
    REFUSED = "refused"  # an agent refused a request as invalid: the client's own error
    VOTED_NO = "voted_no"  # a participant voted no without a MySQL error behind it
    PARTICIPANT_FAILED = "participant_failed"  # an agent answered an error (no MySQL error)
    UNREACHABLE = "unreachable"  # an agent could not be reached, or its answer was lost
    LOG_WRITE_FAILED = "log_write_failed"  # the COMMIT record could not be written
    # A request-id transaction refused only by agents it could not reach: an earlier attempt
    # of the request (before a restart of this coordinator) may have committed there.
    MAYBE_COMMITTED_EARLIER = "maybe_committed_earlier"
    OPERATOR = "operator"  # an operator's ``twopc admin resolve --abort``
    # The victim of a lock cycle across participants (coordinator.engine.deadlocks): no database
    # sees it, so the coordinator breaks it. Retryable, as a local deadlock is.
    DEADLOCK = "deadlock"


# The client's error for each cause: the one place where an abort becomes an error class.
CLIENT_ERRORS: dict[AbortCause, type[TwopcError]] = {
    AbortCause.ROLLED_BACK: TransactionAborted,
    AbortCause.DEADLINE: TransactionAborted,
    AbortCause.IDLE: TransactionAborted,
    AbortCause.STATEMENT_FAILED: StatementFailed,
    AbortCause.REFUSED: InvalidArgument,
    AbortCause.VOTED_NO: TransactionAborted,
    AbortCause.PARTICIPANT_FAILED: TransactionAborted,
    AbortCause.UNREACHABLE: TransactionAborted,
    AbortCause.LOG_WRITE_FAILED: TransactionAborted,
    AbortCause.MAYBE_COMMITTED_EARLIER: Unavailable,
    AbortCause.OPERATOR: TransactionAborted,
    AbortCause.DEADLOCK: TransactionConflict,
}


@dataclass(frozen=True)
class AbortReason:
    """Why a transaction was aborted. Build one with the class methods below.

    Attributes:
        cause: what made the coordinator abort.
        message: what the client and GetTransaction are told.
        mysql_errno: the MySQL error number of a failed statement (``STATEMENT_FAILED`` only).
        request_id: the request whose earlier attempt may have committed
            (``MAYBE_COMMITTED_EARLIER`` only).
    """

    cause: AbortCause
    message: str
    mysql_errno: int = 0
    request_id: str = ""

    def __post_init__(self) -> None:
        if (self.mysql_errno != 0) != (self.cause is AbortCause.STATEMENT_FAILED):
            raise ValueError(f"{self.cause.value} with MySQL error number {self.mysql_errno}")
        if bool(self.request_id) != (self.cause is AbortCause.MAYBE_COMMITTED_EARLIER):
            raise ValueError(f"{self.cause.value} with request id {self.request_id!r}")

    # --- the reasons -------------------------------------------------------------------------

    @classmethod
    def rolled_back(cls) -> AbortReason:
        return cls(AbortCause.ROLLED_BACK, "rolled back by the client")

    @classmethod
    def deadline(cls, when: str = "") -> AbortReason:
        """``when``: where the deadline was found passed (" before commit", say)."""
        return cls(AbortCause.DEADLINE, f"the transaction's deadline passed{when}")

    @classmethod
    def idle(cls, max_idle_ms: int) -> AbortReason:
        """No call on the transaction for ``max_idle_ms`` (its sessions are released)."""
        return cls(
            AbortCause.IDLE,
            f"no call on the transaction for {max_idle_ms} ms (the coordinator's max_idle_ms)",
        )

    @classmethod
    def participant_failed(cls, participant: str, error: TwopcError) -> AbortReason:
        """An agent's error on a call that runs statements (Execute, a one-phase commit). A
        request the agent refused is the client's error, as it is at prepare."""
        message = f"participant {participant}: {error.message}"
        if isinstance(error, InvalidArgument):
            return cls(AbortCause.REFUSED, message)
        if error.mysql_errno:
            return cls(AbortCause.STATEMENT_FAILED, message, error.mysql_errno)
        if is_transport_failure(error):
            return cls(AbortCause.UNREACHABLE, message)
        return cls(AbortCause.PARTICIPANT_FAILED, message)

    @classmethod
    def prepare_failed(cls, participant: str, error: TwopcError) -> AbortReason:
        """An agent's error instead of a vote. A statement that fails in a one-shot prepare is
        a no vote (``voted_no``), so a MySQL error number here is not the client's."""
        message = f"participant {participant}: {error.message}"
        if isinstance(error, InvalidArgument):
            return cls(AbortCause.REFUSED, message)
        if is_transport_failure(error):
            return cls(AbortCause.UNREACHABLE, message)
        return cls(AbortCause.PARTICIPANT_FAILED, message)

    @classmethod
    def voted_no(cls, participant: str, why: str, mysql_errno: int = 0) -> AbortReason:
        message = f"participant {participant} voted no: {why}"
        if mysql_errno:
            return cls(AbortCause.STATEMENT_FAILED, message, mysql_errno)
        return cls(AbortCause.VOTED_NO, message)

    @classmethod
    def unreachable(cls, participant: str, what: str) -> AbortReason:
        return cls(AbortCause.UNREACHABLE, f"participant {participant}: {what}")

    @classmethod
    def by_operator(cls, identity: str, reason: str) -> AbortReason:
        """``twopc admin resolve --abort`` of a live transaction: who, and why."""
        who = f"operator {identity!r}" if identity else "an operator"
        return cls(AbortCause.OPERATOR, f"aborted by {who}: {reason}")

    @classmethod
    def deadlock(cls, cycle: str) -> AbortReason:
        """The victim of a lock cycle across participants; ``cycle`` names it (txids, where
        each waits)."""
        return cls(
            AbortCause.DEADLOCK,
            f"deadlock across participants, this transaction chosen as the victim: {cycle}; "
            "retry it",
        )

    @classmethod
    def log_write_failed(cls, what: str) -> AbortReason:
        return cls(AbortCause.LOG_WRITE_FAILED, what)

    def maybe_committed_earlier(self, request_id: str) -> AbortReason:
        """This reason (an agent out of reach), for a request that may have committed before."""
        return AbortReason(AbortCause.MAYBE_COMMITTED_EARLIER, self.message, request_id=request_id)

    # --- what it means -----------------------------------------------------------------------

    @property
    def conclusive(self) -> bool:
        """False when the abort is no answer to repeat: lookups and retries must ask the
        participants, which may hold a commit of an earlier attempt."""
        return self.cause is not AbortCause.MAYBE_COMMITTED_EARLIER

    @property
    def outranks_others(self) -> bool:
        """Among the refusals of one prepare round, a refused request explains the abort best:
        retrying cannot help, and its error must name it."""
        return self.cause is AbortCause.REFUSED

    def client_error(self, txid: str, message: str = "") -> TwopcError:
        """The error that tells the client its transaction was aborted, and why. ``message``
        replaces the reason's own (to put it in context)."""
        text = message or self.message or "aborted"
        if self.cause is AbortCause.REFUSED:
            text += "; the transaction was rolled back"
        elif self.cause is AbortCause.MAYBE_COMMITTED_EARLIER:
            text += (
                f"; an earlier attempt of request {self.request_id} may have committed there, "
                "which only those participants can tell: retry the request (the same request id) "
                "or look it up later"
            )
        cls = CLIENT_ERRORS[self.cause]
        if self.cause is AbortCause.STATEMENT_FAILED and self.mysql_errno in CONFLICT_ERRNOS:
            cls = TransactionConflict  # a local deadlock or lock wait timeout: retryable
        return cls(text, txid=txid, mysql_errno=self.mysql_errno)
