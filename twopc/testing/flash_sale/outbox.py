"""The queue mode's relay and consumer: a transactional outbox carried over RabbitMQ.

- The **relay** reads unsent outbox rows of the stock region in id order, publishes each to the
  ``orders`` queue as a persistent message whose ``message_id`` is the row's ``msg_id``, waits
  for the broker's confirms, then marks the rows sent. A crash between the confirm and the mark
  publishes those rows again: delivery is at least once.
- The **consumer** applies messages to the wallet region in batches, each batch in one local
  transaction: a message whose ``msg_id`` the inbox table already holds is skipped, so each
  order is applied exactly once; the batch is acknowledged after its COMMIT. A database that is
  down leaves the batch unacknowledged and tried again.

Both run in threads of the flash-sale process and stop when told. Each keeps counters of what it
did (published, applied, skipped duplicates, errors).
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

__all__ = ["QUEUE", "Consumer", "Relay"]

QUEUE = "orders"
_BATCH = 200
_IDLE_S = 0.005
_RETRY_S = 0.1
Connect = Callable[[], Any]  # a new pymysql connection to one region's database


def _channel(amqp_url: str) -> tuple[Any, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True)
    return connection, channel


class _Worker(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_asked = threading.Event()
        self.errors = 0
        self.last_error = ""

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_asked.set()
        self.join(timeout)

    def _failed(self, err: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(err).__name__}: {err}"
        self._stop_asked.wait(_RETRY_S)


class Relay(_Worker):
    def __init__(self, connect_stock: Connect, amqp_url: str) -> None:
        super().__init__("outbox-relay")
        self._connect = connect_stock
        self._amqp_url = amqp_url
        self.published = 0

    def run(self) -> None:
        db: Any = None
        amqp: tuple[Any, Any] | None = None
        while not self._stop_asked.is_set():
            try:
                if db is None:
                    db = self._connect()
                if amqp is None:
                    amqp = _channel(self._amqp_url)
                    amqp[1].confirm_delivery()
                if not self._relay_once(db, amqp[1]):
                    self._stop_asked.wait(_IDLE_S)
            except (pymysql.MySQLError, OSError) as err:
                _closed(db)
                db = None
                self._failed(err)
            except pika.exceptions.AMQPError as err:
                _closed_amqp(amqp)
                amqp = None
                self._failed(err)
        _closed(db)
        _closed_amqp(amqp)

    def _relay_once(self, db: Any, channel: Any) -> bool:
        with db.cursor() as cursor:
            cursor.execute(
                "SELECT msg_id, buyer, created_ms FROM sale_outbox WHERE sent_ms IS NULL "
                "ORDER BY id LIMIT %s",
                [_BATCH],
            )
            rows = cursor.fetchall()
        db.commit()
        if not rows:
            return False
        for msg_id, buyer, created_ms in rows:
            body = json.dumps({"buyer": buyer, "created_ms": created_ms}).encode()
            # With confirms on, basic_publish returns once the broker has the message
            # (persistent, in a durable queue) and raises if it was refused.
            channel.basic_publish(
                "",
                QUEUE,
                body,
                pika.BasicProperties(message_id=msg_id, delivery_mode=2),
                mandatory=True,
            )
        with db.cursor() as cursor:
            cursor.execute(
                "UPDATE sale_outbox SET sent_ms = %s WHERE msg_id IN %s",
                [int(time.time() * 1000), [row[0] for row in rows]],
            )
        db.commit()
        self.published += len(rows)
        return True


class Consumer(_Worker):
    def __init__(self, connect_wallets: Connect, amqp_url: str, price: int) -> None:
        super().__init__("outbox-consumer")
        self._connect = connect_wallets
        self._amqp_url = amqp_url
        self._price = price
        self.applied = 0
        self.duplicates = 0
        self.refused = 0  # a wallet that could not pay: the order needs a compensation

    def run(self) -> None:
        db: Any = None
        amqp: tuple[Any, Any] | None = None
        pending: list[tuple[Any, Any, bytes]] = []
        while not self._stop_asked.is_set():
            try:
                if amqp is None:
                    amqp = _channel(self._amqp_url)
                    amqp[1].basic_qos(prefetch_count=_BATCH)
                    pending = []
                if not pending:
                    pending = self._next_batch(amqp[1])
                if not pending:
                    continue
                if db is None:
                    db = self._connect()
                self._apply(db, pending)
                amqp[1].basic_ack(pending[-1][0].delivery_tag, multiple=True)
                pending = []
            except (pymysql.MySQLError, OSError) as err:
                _closed(db)
                db = None
                self._failed(err)  # the batch stays unacknowledged and is tried again
            except pika.exceptions.AMQPError as err:
                _closed_amqp(amqp)  # unacknowledged messages are delivered again
                amqp = None
                pending = []
                self._failed(err)
        _closed(db)
        _closed_amqp(amqp)

    def _next_batch(self, channel: Any) -> list[tuple[Any, Any, bytes]]:
        batch = []
        for method, properties, body in channel.consume(QUEUE, inactivity_timeout=0.05):
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
                    msg_id = properties.message_id
                    if not cursor.execute(
                        "INSERT IGNORE INTO sale_inbox (msg_id) VALUES (%s)", [msg_id]
                    ):
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
                        [msg_id, order["buyer"], order["created_ms"], now_ms],
                    )
                    applied += 1
            db.commit()
        except BaseException:
            db.rollback()
            raise
        self.applied += applied
        self.duplicates += duplicates
        self.refused += refused


def _closed(db: Any) -> None:
    if db is not None:
        with contextlib.suppress(Exception):  # a dead connection: nothing to close
            db.close()


def _closed_amqp(amqp: tuple[Any, Any] | None) -> None:
    if amqp is not None:
        with contextlib.suppress(Exception):  # a dead connection: nothing to close
            amqp[0].close()
