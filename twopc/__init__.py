"""twopc: atomic commits across MySQL/MariaDB databases in different regions.

This package is the SDK (``pip install twopc`` needs only grpcio and protobuf)::

    from twopc import Client, TlsConfig

    with Client("127.0.0.1:7100", tls=TlsConfig.from_env()) as client:
        with client.transaction(timeout=5.0) as tx:
            tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = %s", [5, 1])
            tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [5, 2])

It also holds what the two daemons share (errors, txids, values, the generated wire API, logging,
serving, settings, failpoints, TLS and identities), the ``twopc`` command (``twopc.cli``) and the
tools for testing and measuring (``twopc.testing``). The coordinator daemon is the
``coordinator`` package and the participant agent the ``participants`` package; each comes with
an extra of its own.
"""

from twopc.client import (
    AsyncClient,
    AsyncTransaction,
    Client,
    ConflictRetry,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Outcome,
    OutcomeUnknown,
    PermissionDenied,
    ResourceExhausted,
    Result,
    RetryPolicy,
    RunResult,
    StatementFailed,
    TlsConfig,
    Transaction,
    TransactionAborted,
    TransactionConflict,
    TransactionInfo,
    TransactionState,
    TwopcError,
    Unavailable,
)

__all__ = [
    "AsyncClient",
    "AsyncTransaction",
    "Client",
    "ConflictRetry",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Outcome",
    "OutcomeUnknown",
    "PermissionDenied",
    "ResourceExhausted",
    "Result",
    "RetryPolicy",
    "RunResult",
    "StatementFailed",
    "TlsConfig",
    "Transaction",
    "TransactionAborted",
    "TransactionConflict",
    "TransactionInfo",
    "TransactionState",
    "TwopcError",
    "Unavailable",
]
