"""The twopc SDK: run distributed transactions through a twopc coordinator.

Blocking::

    from twopc import Client, TlsConfig

    tls = TlsConfig(cert="client.pem", key="client.key", ca="ca.pem")  # mutual TLS
    with Client("127.0.0.1:7100", tls=tls) as client:
        with client.transaction(timeout=5.0) as tx:
            balance = tx.execute("eu", "SELECT balance FROM accounts WHERE id = %s", [1]).scalar()
            tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [5, 2])
        # committed here; an exception in the block rolls back and propagates

        client.run({"eu": [("UPDATE ...", [1])], "us": [("UPDATE ...", [2])]})  # one-shot

asyncio: ``AsyncClient``, the same API with ``await`` / ``async with``.

Requests whose answer is lost (UNAVAILABLE, DEADLINE_EXCEEDED) are retried unchanged, as the
``RetryPolicy`` allows. Given the members of a coordinator group (``Client(["a:7100",
"b:7100"], ...)``, ``"a:7100,b:7100"`` or ``"dns:///name:7100"``), a client sends each retry of
``run``, ``begin`` and ``get_transaction`` to the next member and stays on the one that answers;
an interactive transaction's calls stay on the member that began it. A transaction that lost
a lock conflict (``TransactionConflict``) is run again as a new transaction only when the client
is given ``conflict_retries=ConflictRetry(...)`` (exponential backoff, full jitter): ``run`` and
``run_in_transaction`` do it. A commit whose answer never comes raises ``OutcomeUnknown``: look
its outcome up with ``get_transaction``. Every error is a ``TwopcError``.

With OpenTelemetry installed (``pip install 'twopc[tracing]'``), every request carries the
caller's current trace context (``twopc.tracing``); without it, nothing is sent.
"""

from twopc.client._async import AsyncClient, AsyncTransaction
from twopc.client._common import (
    ConflictRetry,
    Outcome,
    Result,
    RetryPolicy,
    RunResult,
    TransactionInfo,
    TransactionState,
)
from twopc.client._sync import Client, Transaction
from twopc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    ResourceExhausted,
    StatementFailed,
    TransactionAborted,
    TransactionConflict,
    TwopcError,
    Unavailable,
)
from twopc.tls import TlsConfig

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
