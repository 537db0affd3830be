"""The outbox's tables, and the consumer's side of at-most-once delivery.

A transaction publishes with ``Transaction.publish(queue, body, key=...)``: a row of
``OUTBOX_DDL``'s table on the client's outbox participant, inside the transaction. ``twopc relay``
publishes committed rows to RabbitMQ and deletes them; after a relay crash a row may be
published twice, with the same ``message_id``. A consumer applies a delivery inside its own
database transaction only if ``first_delivery`` says so, and commits before it acknowledges::

    with conn.cursor() as cursor:
        if first_delivery(cursor, properties.message_id):
            ...  # apply the message
    conn.commit()
    channel.basic_ack(method.delivery_tag)

The inbox row and the message's effects commit together: a message is applied at most once per
consumer database, and, acknowledged only after that commit, at least once.
"""

from __future__ import annotations

from typing import Any

from twopc.client._outbox import MAX_BODY_BYTES, MAX_NAME_CHARS, OUTBOX_TABLE

__all__ = [
    "INBOX_DDL",
    "INBOX_TABLE",
    "MAX_BODY_BYTES",
    "MAX_NAME_CHARS",
    "OUTBOX_DDL",
    "OUTBOX_TABLE",
    "first_delivery",
]

# On the outbox participant's database, beside the application's tables. The agent's database
# user needs INSERT on it; the relay's user SELECT and DELETE.
OUTBOX_DDL = f"""CREATE TABLE IF NOT EXISTS {OUTBOX_TABLE} (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    message_id VARCHAR(100) NOT NULL UNIQUE,
    queue VARCHAR({MAX_NAME_CHARS}) NOT NULL,
    msg_key VARCHAR({MAX_NAME_CHARS}) NULL,
    body LONGBLOB NOT NULL,
    created_ms BIGINT NOT NULL
) ENGINE=InnoDB"""

INBOX_TABLE = "twopc_inbox"
# On each consumer's database.
INBOX_DDL = (
    f"CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (message_id VARCHAR(100) PRIMARY KEY) ENGINE=InnoDB"
)


def first_delivery(cursor: Any, message_id: str, table: str = INBOX_TABLE) -> bool:
    """True the first time ``message_id`` is seen in ``cursor``'s transaction's database (a DB-API
    cursor of MySQL/MariaDB); False for a delivery seen before. Commit the cursor's transaction
    with the message's effects, then acknowledge the delivery."""
    inserted = cursor.execute(f"INSERT IGNORE INTO {table} (message_id) VALUES (%s)", [message_id])
    return bool(inserted)
