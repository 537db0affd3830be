"""The one error hierarchy of twopc, shared by the daemons and the SDK.

Each class declares the gRPC status code it travels as (by name, so that this module needs no grpc).
Servers turn a ``TwopcError`` into a status in one place; the SDK turns the status back into the
same class::

    TwopcError                      UNKNOWN
    ├── InvalidArgument             INVALID_ARGUMENT     malformed request, statement twopc refuses
    ├── NotFound                    NOT_FOUND            unknown transaction or participant
    ├── PermissionDenied            PERMISSION_DENIED    the caller's identity may not do this
    ├── FailedPrecondition          FAILED_PRECONDITION  wrong state (execute after commit, ...)
    │   └── Fenced                  FAILED_PRECONDITION  a coordinator acting under a lease epoch
    │                                                    that another member superseded
    ├── TransactionAborted          ABORTED              rolled back; the message says why
    │   ├── StatementFailed         ABORTED              a statement failed (carries mysql_errno)
    │   └── TransactionConflict     ABORTED              retryable: a lock cycle across regions
    │                                                    (deadlock victim), a local deadlock (1213)
    │                                                    or a lock wait timeout (1205)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED
    ├── ResourceExhausted           RESOURCE_EXHAUSTED   too many transactions, decision log full,
    │                                                    a rate limit, shedding (retry_after_s)
    ├── Unavailable                 UNAVAILABLE          a component or database cannot be reached
    │   └── CircuitOpen             UNAVAILABLE          refused at once: a participant's circuit
    │                                                    breaker is open (nothing ran; not retried)
    ├── OutcomeUnknown              UNKNOWN              SDK only: the commit may or may not
    │                                                    have happened; look it up by txid
    └── Internal                    INTERNAL
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CircuitOpen",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Fenced",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "ResourceExhausted",
    "StatementFailed",
    "TransactionAborted",
    "TransactionConflict",
    "TwopcError",
    "Unavailable",
    "error_class_named",
    "error_for_code",
    "is_transport_failure",
]


class TwopcError(Exception):
    """Root of every twopc error.

    Attributes:
        txid: the transaction concerned, when there is one.
        mysql_errno: the MySQL error number behind the error, when there is one.
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, txid: str = "", mysql_errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.txid = txid
        self.mysql_errno = mysql_errno


class InvalidArgument(TwopcError):
    code = "INVALID_ARGUMENT"


class NotFound(TwopcError):
    code = "NOT_FOUND"


class PermissionDenied(TwopcError):
    """The caller's identity (its client certificate) is not allowed to make this call; the
    message names the identity and the setting that decides."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(TwopcError):
    code = "FAILED_PRECONDITION"


class Fenced(FailedPrecondition):
    """A participant agent refused a call that changes a branch: it carries a lease epoch
    below the highest the agent has seen for its coordinator id, so it comes from a group
    member that lost the id to another. That member must step down; the id's new holder
    finishes the transaction."""


class TransactionAborted(TwopcError):
    code = "ABORTED"


class StatementFailed(TransactionAborted):
    """A statement failed on a participant; the transaction was rolled back everywhere."""


class TransactionConflict(TransactionAborted):
    """The transaction lost a lock conflict and was rolled back everywhere: retrying it (a new
    transaction) is expected to succeed. A victim of a lock cycle across regions (the
    coordinator's deadlock detector), a local deadlock (MySQL 1213, ``mysql_errno`` says) or a
    lock wait timeout (1205). The SDK retries it only when asked (``conflict_retries``)."""


# MySQL error numbers of a lost lock conflict: a deadlock, a lock wait timeout.
ER_LOCK_DEADLOCK = 1213
ER_LOCK_WAIT_TIMEOUT = 1205
CONFLICT_ERRNOS = frozenset({ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT})


class DeadlineExceeded(TwopcError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(TwopcError):
    """Refused for want of room: a quota, a full pool or log, an identity over its rate limit,
    or a coordinator shedding new transactions under overload. Nothing was started.

    Attributes:
        retry_after_s: when the refusal says when to try again (a rate limit, shedding), the
            seconds to wait first (sent as the ``twopc-retry-after-ms`` metadata); 0 when it
            does not say.
    """

    code = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, txid: str = "", mysql_errno: int = 0, retry_after_s: float = 0.0
    ) -> None:
        super().__init__(message, txid=txid, mysql_errno=mysql_errno)
        self.retry_after_s = retry_after_s


class Unavailable(TwopcError):
    code = "UNAVAILABLE"


class CircuitOpen(Unavailable):
    """The coordinator refused a new transaction at once: a participant it touches keeps failing
    (its circuit breaker is open, ``coordinator.engine.breakers``). Nothing of it ran, and the
    answer did arrive: it is no transport failure, so the SDK does not retry it; the message
    names the participant, why its breaker opened and when the next probe is let through."""


class OutcomeUnknown(TwopcError):
    """The request may or may not have taken effect (the connection broke after it was sent).

    ``txid`` names the transaction when it is known; ``request_id`` is the idempotency key that was
    sent. Look the outcome up with ``Client.get_transaction`` or retry with the same request id.
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, txid: str = "", request_id: str = "") -> None:
        super().__init__(message, txid=txid)
        self.request_id = request_id


class Internal(TwopcError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[TwopcError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        FailedPrecondition,
        TransactionAborted,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        Internal,
    )
}


def error_for_code(
    code: str, *, statement_failed: bool = False, mysql_errno: int = 0
) -> type[TwopcError]:
    """The error class a status code maps back to (``TwopcError`` for codes twopc does not use)."""
    if code == "ABORTED" and mysql_errno in CONFLICT_ERRNOS:
        return TransactionConflict
    if code == "ABORTED" and statement_failed:
        return StatementFailed
    return _BY_CODE.get(code, TwopcError)


def is_transport_failure(error: TwopcError) -> bool:
    """True when the request may not have reached the server, or its answer was lost."""
    return isinstance(error, Unavailable | DeadlineExceeded) and not isinstance(error, CircuitOpen)


def error_class_named(name: str) -> type[TwopcError] | None:
    """The twopc error class of that name (as sent in the ``twopc-error`` metadata), if any."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, TwopcError) and cls is not OutcomeUnknown:
        return cls  # OutcomeUnknown is the SDK's own conclusion, never a server's answer
    return None
