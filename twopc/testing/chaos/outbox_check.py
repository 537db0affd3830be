"""The outbox in the chaos run: transactions that publish, a watcher on the queue, I8 and I9.

``OutboxWorkload`` runs interactive transfers between the first two regions, each publishing one
or two messages to ``QUEUE`` through the outbox in the first region; some are rolled back on
purpose. ``QueueWatcher`` consumes the queue straight from the broker (never through the proxy)
and records every delivered message id, reconnecting after the broker's faults. Once the run is
healed, ``outbox_verdicts`` waits until the outbox is empty and every committed message has come
(or the deadline passes), then judges:

- I8, committed messages delivered: every message of a transaction that committed (as its
  client saw, or as GetTransaction says after the run) was delivered;
- I9, no aborted message delivered: no message of a transaction rolled back, aborted, or never
  committed was delivered.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, field

import pika
import pika.exceptions

from twopc.client import Client, Outcome, Transaction
from twopc.errors import CircuitOpen, OutcomeUnknown, TransactionAborted, TwopcError
from twopc.testing.playground.bank import ABORTED, COMMITTED, UNKNOWN
from twopc.testing.playground.cluster import RABBITMQ, Cluster
from twopc.testing.playground.invariants import Verdict

__all__ = ["QUEUE", "OutboxWorkload", "Publication", "QueueWatcher", "outbox_verdicts"]

QUEUE = "chaos-orders"
_ROLLBACK_SHARE = 0.15
_PAUSE_S = 0.02
_DRAIN_S = 60.0


@dataclass
class Publication:
    request_id: str
    message_ids: list[str] = field(default_factory=list)
    outcome: str = UNKNOWN
    detail: str = ""


class OutboxWorkload:
    def __init__(self, client: Client, regions: list[str], accounts: int, seed: int, run_id: str):
        self._client = client
        self._source, self._target = regions[0], regions[1]
        self._accounts = accounts
        self._rng = random.Random(seed * 7919)
        self._run_id = run_id
        self.publications: list[Publication] = []

    def run(self, stop: threading.Event) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            self.publications.append(self._one(f"{self._run_id}-outbox-{number}"))
            stop.wait(_PAUSE_S)

    def _one(self, request_id: str) -> Publication:
        record = Publication(request_id)
        rng = self._rng
        amount = rng.randint(1, 20)
        try:
            tx = self._client.begin(request_id=request_id, timeout=5.0)
        except TwopcError as err:
            record.outcome, record.detail = ABORTED, f"begin: {type(err).__name__}"
            return record
        committing = False
        try:
            tx.execute(
                self._source,
                "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                [amount, rng.randrange(self._accounts)],
            )
            tx.execute(
                self._target,
                "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                [amount, rng.randrange(self._accounts)],
            )
            for part in range(rng.randint(1, 2)):
                body = f"{request_id} part {part}"
                message = tx.publish(QUEUE, body, key=request_id, participant=self._source)
                record.message_ids.append(message)
            if rng.random() < _ROLLBACK_SHARE:
                tx.rollback()
                record.outcome = ABORTED
                return record
            committing = True
            tx.commit()
            record.outcome = COMMITTED
        except (TransactionAborted, CircuitOpen) as err:
            record.outcome, record.detail = ABORTED, err.message[:120]
        except (OutcomeUnknown, TwopcError) as err:
            # Before the commit was sent, nothing can commit it: the coordinator rolls it back.
            record.outcome = UNKNOWN if committing else ABORTED
            record.detail = f"{type(err).__name__}: {err.message[:120]}"
            if not committing:
                with_quiet_rollback(tx)
        return record


def with_quiet_rollback(tx: Transaction) -> None:
    with contextlib.suppress(TwopcError):  # its deadline rolls it back anyway
        tx.rollback()


class QueueWatcher(threading.Thread):
    """Records every message id delivered on ``QUEUE``, straight from the broker."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(name="queue-watcher", daemon=True)
        self._url = f"amqp://guest:guest@{cluster.component(RABBITMQ).address}/%2F"
        self._stop_asked = threading.Event()
        self._lock = threading.Lock()
        self._delivered: list[str] = []
        self.reconnects = 0

    def delivered(self) -> list[str]:
        with self._lock:
            return list(self._delivered)

    def stop(self) -> None:
        self._stop_asked.set()
        self.join(10)

    def run(self) -> None:
        while not self._stop_asked.is_set():
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self._url))
                try:
                    channel = connection.channel()
                    channel.queue_declare(QUEUE, durable=True)
                    for method, properties, _ in channel.consume(
                        QUEUE, auto_ack=True, inactivity_timeout=0.1
                    ):
                        if self._stop_asked.is_set():
                            break
                        if method is not None:
                            with self._lock:
                                self._delivered.append(str(properties.message_id))
                finally:
                    if connection.is_open:
                        connection.close()
            except (pika.exceptions.AMQPError, OSError):
                self.reconnects += 1
                self._stop_asked.wait(0.2)


def resolve(client: Client, publications: list[Publication]) -> None:
    """Outcomes the client did not see, from GetTransaction."""
    for record in publications:
        if record.outcome != UNKNOWN:
            continue
        try:
            info = client.get_transaction(request_id=record.request_id)
        except TwopcError as err:
            record.detail = f"lookup failed: {err.message[:120]}"
            continue
        record.outcome = {Outcome.COMMITTED: COMMITTED, Outcome.ABORTED: ABORTED}.get(
            info.outcome, UNKNOWN
        )


def outbox_verdicts(
    cluster: Cluster, watcher: QueueWatcher, publications: list[Publication]
) -> tuple[list[Verdict], dict[str, object]]:
    """Waits (bounded) until the outbox is empty and every committed message came, then I8, I9."""
    committed = {m for p in publications if p.outcome == COMMITTED for m in p.message_ids}
    aborted = {m for p in publications if p.outcome == ABORTED for m in p.message_ids}
    deadline = time.monotonic() + _DRAIN_S
    while time.monotonic() < deadline:
        if not committed - set(watcher.delivered()) and _outbox_rows(cluster) == 0:
            break
        time.sleep(0.1)
    delivered = watcher.delivered()
    seen = set(delivered)
    missing = sorted(committed - seen)
    leaked = sorted(aborted & seen)
    verdicts = [
        Verdict(
            "I8 committed messages delivered",
            not missing,
            f"{len(committed) - len(missing)} of {len(committed)} messages of committed "
            "transactions delivered",
            missing,
        ),
        Verdict(
            "I9 no aborted message delivered",
            not leaked,
            f"{len(leaked)} of {len(aborted)} messages of rolled-back or aborted transactions "
            "delivered",
            leaked,
        ),
    ]
    counts: dict[str, object] = {
        "transactions": len(publications),
        "committed": sum(p.outcome == COMMITTED for p in publications),
        "aborted": sum(p.outcome == ABORTED for p in publications),
        "unresolved": sum(p.outcome == UNKNOWN for p in publications),
        "messages_committed": len(committed),
        "deliveries": len(delivered),
        "redelivered": len(delivered) - len(seen),
        "watcher_reconnects": watcher.reconnects,
    }
    return verdicts, counts


def _outbox_rows(cluster: Cluster) -> int:
    try:
        with cluster.mysql(cluster.regions[0]) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM twopc_outbox")
            row = cursor.fetchone()
    except Exception:
        return -1
    return int(row[0]) if row else -1
