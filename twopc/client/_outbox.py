"""Messages published by a transaction: rows of the outbox table, written in its XA branch.

``Transaction.publish(queue, body, key=...)`` inserts one row into ``twopc_outbox`` on the
client's outbox participant, inside the transaction: the row commits exactly when the
transaction commits and is rolled back with it. ``twopc relay``, next to that participant's
database, publishes committed rows to RabbitMQ with publisher confirms and then deletes them; a
crash between the broker's confirm and the delete publishes a row again, so a consumer drops
deliveries whose ``message_id`` it has seen (``twopc.outbox.first_delivery``).

The message id is ``<txid>.<n>``: the transaction's id and the message's number in it, from 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from twopc.errors import InvalidArgument

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_NAME_CHARS",
    "OUTBOX_TABLE",
    "OutboxMessage",
    "no_outbox",
    "outbox_message",
]

OUTBOX_TABLE = "twopc_outbox"
MAX_NAME_CHARS = 255  # AMQP's short string: a queue name, a routing key
MAX_BODY_BYTES = 1024 * 1024
_INSERT = (
    f"INSERT INTO {OUTBOX_TABLE} (message_id, queue, msg_key, body, created_ms) "
    "VALUES (%s, %s, %s, %s, %s)"
)


@dataclass(frozen=True)
class OutboxMessage:
    message_id: str
    sql: str
    params: tuple[object, ...]


def outbox_message(
    txid: str, number: int, queue: str, body: bytes | str, key: str | None
) -> OutboxMessage:
    """The row of message ``number`` of transaction ``txid``.

    Raises:
        InvalidArgument: an empty or too long queue name or key, a body that is not bytes or
            str, or one over ``MAX_BODY_BYTES``.
    """
    if not isinstance(queue, str) or not 0 < len(queue) <= MAX_NAME_CHARS:
        raise InvalidArgument(
            f"a message's queue must be a name of 1 to {MAX_NAME_CHARS} characters, "
            f"not {queue!r:.80}"
        )
    if queue.startswith("amq."):
        raise InvalidArgument(
            f"queue {queue!r:.80}: names starting with 'amq.' are RabbitMQ's own; choose another"
        )
    if key is not None and (not isinstance(key, str) or len(key) > MAX_NAME_CHARS):
        raise InvalidArgument(
            f"a message's key must be a str of at most {MAX_NAME_CHARS} characters"
        )
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, bytes | bytearray):
        raise InvalidArgument(f"a message's body must be bytes or str, not {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidArgument(
            f"a message's body has {len(body):,} bytes, more than {MAX_BODY_BYTES:,}: put the data "
            "in a table and publish its key"
        )
    message_id = f"{txid}.{number}"
    created_ms = int(time.time() * 1000)
    return OutboxMessage(message_id, _INSERT, (message_id, queue, key, bytes(body), created_ms))


def no_outbox(txid: str) -> InvalidArgument:
    return InvalidArgument(
        f"transaction {txid} cannot publish: no outbox participant; name the participant whose "
        "database holds the twopc_outbox table, as Client(..., outbox='<participant>') or "
        "publish(..., participant='<participant>')"
    )
