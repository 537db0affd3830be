"""The queue mode's consumer: the orders, from RabbitMQ into the wallet region.

The stock region's side is twopc's own: each purchase commits a row of ``twopc_outbox`` with its
unit, and ``participants.relay.OutboxRelay`` (what ``twopc relay`` runs) publishes committed rows
with publisher confirms, then deletes them. This consumer applies deliveries in batches, each
batch in one local transaction of the wallet region: a delivery whose message id
``twopc.outbox.first_delivery`` has seen is skipped, so each order is applied once; the batch is
acknowledged after its COMMIT. A database that is down leaves the batch unacknowledged and tried
again. It runs in a thread of the flash-sale process and stops when told.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pymysql

from twopc.outbox import first_delivery

__all__ = ["Consumer"]

_BATCH = 200
_RETRY_S = 0.1
Connect = Callable[[], Any]  # a new pymysql connection to the wallet region's database


class Consumer(threading.Thread):
    def __init__(self, connect_wallets: Connect, amqp_url: str, queue: str, price: int) -> None:
        super().__init__(name="outbox-consumer", daemon=True)
        self._connect = connect_wallets
        self._amqp_url = amqp_url
        self._queue = queue
        self._price = price
        self._stop_asked = threading.Event()
        self.applied = 0
        self.duplicates = 0
        self.refused = 0  # a wallet that could not pay: the order needs a compensation
        self.errors = 0

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_asked.set()
        self.join(timeout)

    def run(self) -> None:
        db: Any = None
        amqp: tuple[Any, Any] | None = None
        pending: list[tuple[Any, Any, bytes]] = []
        while not self._stop_asked.is_set():
            try:
                if amqp is None:
                    connection = pika.BlockingConnection(pika.URLParameters(self._amqp_url))
                    channel = connection.channel()
                    channel.queue_declare(self._queue, durable=True)
                    channel.basic_qos(prefetch_count=_BATCH)
                    amqp, pending = (connection, channel), []
                if not pending:
                    pending = self._next_batch(amqp[1])
                if not pending:
                    continue
                if db is None:
                    db = self._connect()
                self._apply(db, pending)
                amqp[1].basic_ack(pending[-1][0].delivery_tag, multiple=True)
                pending = []
            except (pymysql.MySQLError, OSError):
                _closed(db)
                db = None
                self._failed()  # the batch stays unacknowledged and is tried again
            except pika.exceptions.AMQPError:
                _closed(amqp[0] if amqp else None)  # unacknowledged deliveries come again
                amqp, pending = None, []
                self._failed()
        _closed(db)
        _closed(amqp[0] if amqp else None)

    def _failed(self) -> None:
        self.errors += 1
        self._stop_asked.wait(_RETRY_S)

    def _next_batch(self, channel: Any) -> list[tuple[Any, Any, bytes]]:
        batch = []
        for method, properties, body in channel.consume(self._queue, inactivity_timeout=0.05):
            if method is None:
                break
            batch.append((method, properties, body))
            if len(batch) >= _BATCH:
                break
        return batch

    def _apply(self, db: Any, batch: list[tuple[Any, Any, bytes]]) -> None:
        applied = duplicates = refused = 0
        now_ms = int(time.time() * 1000)
        try:
            with db.cursor() as cursor:
                for _, properties, body in batch:
                    message_id = properties.message_id
                    if not first_delivery(cursor, message_id):
                        duplicates += 1
                        continue
                    order = json.loads(body)
                    paid = cursor.execute(
                        "UPDATE sale_wallets SET balance = balance - %s "
                        "WHERE id = %s AND balance >= %s",
                        [self._price, order["buyer"], self._price],
                    )
                    if not paid:
                        refused += 1
                        continue
                    cursor.execute(
                        "INSERT INTO sale_orders (buy_id, buyer, created_ms, applied_ms) "
                        "VALUES (%s, %s, %s, %s)",
                        [message_id, order["buyer"], order["created_ms"], now_ms],
                    )
                    applied += 1
            db.commit()
        except BaseException:
            with contextlib.suppress(pymysql.MySQLError):
                db.rollback()
            raise
        self.applied += applied
        self.duplicates += duplicates
        self.refused += refused


def _closed(connection: Any) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):  # a dead connection: nothing to close
            connection.close()
