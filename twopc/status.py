"""Errors to gRPC statuses and back: the one place where ``TwopcError`` meets the wire.

A server aborts an RPC with the error's status code, its message, and trailing metadata naming
the error class, the transaction and the MySQL error number. A client turns a ``grpc.RpcError``
back into the same class. Transport failures (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED and
statuses that no twopc server sends) become ``Unavailable`` / ``DeadlineExceeded``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from grpc import aio

from twopc.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    TwopcError,
    Unavailable,
    error_class_named,
    error_for_code,
    is_transport_failure,
)
from twopc.txid import is_txid

__all__ = [
    "ERROR_CLASS_KEY",
    "MYSQL_ERRNO_KEY",
    "RETRY_AFTER_KEY",
    "TXID_KEY",
    "abort_with",
    "error_from_rpc",
    "is_transport_failure",
    "status_code",
    "trailing_metadata",
]

TXID_KEY = "twopc-txid"
MYSQL_ERRNO_KEY = "twopc-mysql-errno"
ERROR_CLASS_KEY = "twopc-error"
# Milliseconds to wait before trying again, on a ResourceExhausted that says (a rate limit,
# shedding under overload): ResourceExhausted.retry_after_s on the client's side.
RETRY_AFTER_KEY = "twopc-retry-after-ms"


def status_code(error: TwopcError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def trailing_metadata(error: TwopcError) -> tuple[tuple[str, str], ...]:
    """The error's class, and its txid, MySQL error number and retry-after hint (in whole
    milliseconds, rounded up) when it has them. A txid goes
    only when it has a txid's form: one taken from a hostile request could hold what no header
    may (a newline, a NUL, a megabyte) and turn the answer into an INTERNAL "Invalid metadata"."""
    metadata = [(ERROR_CLASS_KEY, type(error).__name__)]
    if error.txid and is_txid(error.txid):
        metadata.append((TXID_KEY, error.txid))
    if error.mysql_errno:
        metadata.append((MYSQL_ERRNO_KEY, str(error.mysql_errno)))
    if isinstance(error, ResourceExhausted) and error.retry_after_s > 0:
        metadata.append((RETRY_AFTER_KEY, str(math.ceil(error.retry_after_s * 1000))))
    return tuple(metadata)


async def abort_with(context: aio.ServicerContext[object, object], error: TwopcError) -> None:
    """Ends the RPC with the status of ``error`` (raises, as ``context.abort`` does)."""
    context.set_trailing_metadata(trailing_metadata(error))
    await context.abort(status_code(error), error.message)


def error_from_rpc(err: grpc.RpcError) -> TwopcError:
    """The ``TwopcError`` that a failed RPC stands for (sync ``grpc.Call`` errors and
    ``grpc.aio.AioRpcError`` alike: both carry code, details and trailing metadata)."""
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(err, "details", None)
    message = (details_of() if callable(details_of) else None) or str(err)
    trailing_of = getattr(err, "trailing_metadata", None)
    metadata = _metadata_dict(trailing_of() if callable(trailing_of) else None)
    txid = metadata.get(TXID_KEY, "")
    errno_text = metadata.get(MYSQL_ERRNO_KEY, "0")
    mysql_errno = int(errno_text) if errno_text.isdigit() else 0
    cls = error_class_named(metadata.get(ERROR_CLASS_KEY, ""))
    if cls is None:
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            cls = DeadlineExceeded
        elif code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.UNKNOWN,
        ):
            cls = Unavailable
        else:
            cls = error_for_code(code.name, mysql_errno=mysql_errno)
    if issubclass(cls, ResourceExhausted):
        retry_text = metadata.get(RETRY_AFTER_KEY, "0")
        retry_after_ms = int(retry_text) if retry_text.isdigit() and len(retry_text) < 10 else 0
        return cls(message, txid=txid, mysql_errno=mysql_errno, retry_after_s=retry_after_ms / 1000)
    return cls(message, txid=txid, mysql_errno=mysql_errno)


def _metadata_dict(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in metadata or ():
        result[key] = value.decode() if isinstance(value, bytes) else value
    return result
