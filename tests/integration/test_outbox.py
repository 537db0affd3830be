"""The outbox participant: ``Transaction.publish`` and ``twopc relay``, on the session cluster
(real MariaDB regions, agents and coordinator), a real RabbitMQ and the relay as a real process,
SIGKILLed mid-stream.

Invariants checked on what reaches the queue: every committed transaction's messages are
delivered; no message of a rolled-back or aborted transaction is; a message of a transaction not
yet committed is not delivered before the commit; a consumer that applies deliveries through
``first_delivery`` applies each message once, whatever the relay sent twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from tests.support import ROOT
from twopc.client import Client
from twopc.errors import InvalidArgument, StatementFailed, TransactionAborted
from twopc.outbox import INBOX_DDL, OUTBOX_DDL, first_delivery
from twopc.testing.playground.cluster import DATABASE, Cluster, wait_until
from twopc.testing.playground.ports import free_port
from twopc.testing.playground.rabbitmq import RabbitMQInstance

QUEUE = "test-orders"
RELAY_USER = "twopc_relay"
RELAY_PASSWORD = "relay-secret-1"


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQInstance]:
    node = RabbitMQInstance(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
def outbox(live_cluster: Cluster, rabbitmq: RabbitMQInstance) -> None:
    """An empty outbox table in eu, a relay user that may only read and delete it, an empty
    queue, and an inbox and an applied-messages table in us."""
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(OUTBOX_DDL)
        cursor.execute("DELETE FROM twopc_outbox")
        cursor.execute(
            f"CREATE OR REPLACE USER {RELAY_USER}@'127.0.0.1' IDENTIFIED BY %s", [RELAY_PASSWORD]
        )
        cursor.execute(
            f"GRANT SELECT, DELETE ON {DATABASE}.twopc_outbox TO {RELAY_USER}@'127.0.0.1'"
        )
    with live_cluster.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute(INBOX_DDL)
        cursor.execute("DELETE FROM twopc_inbox")
        cursor.execute("CREATE TABLE IF NOT EXISTS applied (message_id VARCHAR(100)) ENGINE=InnoDB")
        cursor.execute("DELETE FROM applied")
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True)
    channel.queue_purge(QUEUE)
    connection.close()


class Relay:
    def __init__(self, cluster: Cluster, rabbitmq: RabbitMQInstance, directory: Path) -> None:
        host, port = cluster.component("mariadb-eu").address.rsplit(":", 1)
        self.metrics = f"127.0.0.1:{free_port()}"
        self.config = directory / "relay.toml"
        self.config.write_text(
            f'mysql_host = "{host}"\nmysql_port = {port}\nmysql_user = "{RELAY_USER}"\n'
            f'mysql_database = "{DATABASE}"\npoll_ms = 5\nretry_ms = 50\nlog_level = "debug"\n'
            f'metrics_listen = "{self.metrics}"\n'
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TWOPC_RELAY_MYSQL_PASSWORD": RELAY_PASSWORD,
            "TWOPC_RELAY_AMQP_URL": rabbitmq.url,
        }
        self.log = directory / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "twopc.cli", "relay", "--config", str(self.config)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def published(self) -> float:
        """``twopc_relay_published_total`` of the running relay, from its metrics endpoint."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return float(re.search(r"^twopc_relay_published_total (\S+)$", text, re.M)[1])  # type: ignore[index]

    def refused(self) -> float:
        """``twopc_relay_refused_rows`` of the running relay."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        found = re.search(r"^twopc_relay_refused_rows (\S+)$", text, re.M)
        return float(found[1]) if found else 0.0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=20)


@pytest.fixture
def relay(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, outbox: None, tmp_path: Path
) -> Iterator[Relay]:
    process = Relay(live_cluster, rabbitmq, tmp_path)
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill(signal.SIGTERM)
        assert process.process.returncode == 0, process.log.read_text()[-2000:]
    assert "amqp://guest:guest" not in process.log.read_text()  # no password in its log


class Consumer:
    """Applies deliveries to us through ``first_delivery``; records every delivered id."""

    def __init__(self, cluster: Cluster, rabbitmq: RabbitMQInstance) -> None:
        self.cluster = cluster
        self.connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
        self.channel = self.connection.channel()
        self.delivered: list[str] = []

    def drain(self, until: set[str] = frozenset(), count: int = 0, timeout: float = 30.0) -> None:
        """Consumes until every id of ``until`` was delivered (and applied), and at least
        ``count`` deliveries in all."""
        deadline = time.monotonic() + timeout
        with self.cluster.mysql("us") as conn:
            conn.autocommit(False)
            while not until <= set(self.delivered) or len(self.delivered) < count:
                assert time.monotonic() < deadline, f"not delivered: {until - set(self.delivered)}"
                method, properties, _ = self.channel.basic_get(QUEUE)
                if method is None:
                    self.connection.sleep(0.01)
                    continue
                with conn.cursor() as cursor:
                    if first_delivery(cursor, properties.message_id):
                        cursor.execute(
                            "INSERT INTO applied (message_id) VALUES (%s)", [properties.message_id]
                        )
                conn.commit()
                self.channel.basic_ack(method.delivery_tag)
                self.delivered.append(properties.message_id)

    def close(self) -> None:
        self.connection.close()


def applied(cluster: Cluster) -> list[str]:
    with cluster.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT message_id FROM applied")
        return [str(row[0]) for row in cursor.fetchall()]


def outbox_rows(cluster: Cluster) -> int:
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM twopc_outbox")
        row = cursor.fetchone()
    return int(row[0]) if row else -1


def test_messages_leave_exactly_when_their_transaction_commits(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, relay: Relay, bank: int
) -> None:
    committed: set[str] = set()
    not_committed: set[str] = set()
    consumer = Consumer(live_cluster, rabbitmq)
    with live_cluster.client(outbox="eu") as client:
        for n in range(36):
            if n == 12:
                relay.kill()  # SIGKILL mid-stream: rows stay until a relay publishes them
            if n == 24:
                relay.start()
            tx = client.begin()
            tx.execute("us", "UPDATE accounts SET balance = balance - 1 WHERE id = %s", [n % 10])
            ids = {tx.publish(QUEUE, f"order {n}", key=f"k{n}"), tx.publish(QUEUE, b"\x00\xff")}
            if n % 4 == 0:
                tx.rollback()
                not_committed |= ids
            elif n % 4 == 1:
                with pytest.raises(StatementFailed):
                    tx.execute("eu", "INSERT INTO no_such_table VALUES (1)")
                not_committed |= ids
            else:
                tx.commit()
                committed |= ids
        consumer.drain(committed)
        wait_until(lambda: outbox_rows(live_cluster) == 0, 10.0, "the outbox emptied")
        assert relay.published() > 0  # the restarted relay published what piled up meanwhile
    consumer.close()
    delivered = set(consumer.delivered)
    assert delivered == committed  # every committed message, no other
    assert not delivered & not_committed
    assert sorted(applied(live_cluster)) == sorted(committed)  # each applied once


def test_a_message_waits_for_its_transaction_to_commit(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, relay: Relay, bank: int
) -> None:
    consumer = Consumer(live_cluster, rabbitmq)
    with live_cluster.client(outbox="eu") as client:
        pending = client.begin()
        first = pending.publish(QUEUE, "first, committed last")
        with client.begin() as later:
            second = later.publish(QUEUE, "second, committed first")
        consumer.drain({second})
        assert first not in consumer.delivered  # its row is in an open branch: unseen
        pending.commit()
        consumer.drain({first})
    consumer.close()


def test_a_message_of_a_transaction_that_loses_its_vote_is_never_sent(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, relay: Relay, bank: int
) -> None:
    consumer = Consumer(live_cluster, rabbitmq)
    with live_cluster.client(outbox="eu") as client:
        doomed = client.begin()
        lost = doomed.publish(QUEUE, "never")
        doomed.execute("us", "UPDATE accounts SET balance = -1 WHERE id = 0")
        with pytest.raises(TransactionAborted):
            doomed.execute("us", "SELECT * FROM no_such_table")
        with client.begin() as marker:
            after = marker.publish(QUEUE, "after")
        consumer.drain({after})
    consumer.close()
    assert lost not in consumer.delivered


def test_a_row_the_broker_refuses_blocks_no_other(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, relay: Relay, bank: int
) -> None:
    """A row written past the SDK (plain SQL in a branch) to a queue RabbitMQ reserves: the
    broker closes the channel on it. The relay leaves it in the table, counts it, and the
    messages committed after it still go out."""
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO twopc_outbox (message_id, queue, body, created_ms) VALUES "
            "('c1.poison.1', 'amq.reserved', 'x', 0)"
        )
    consumer = Consumer(live_cluster, rabbitmq)
    with live_cluster.client(outbox="eu") as client, client.begin() as tx:
        after = tx.publish(QUEUE, "after the refused one")
    consumer.drain({after})
    consumer.close()
    wait_until(lambda: relay.refused() == 1, 10.0, "the refused row counted")
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT message_id FROM twopc_outbox")
        assert cursor.fetchall() == (("c1.poison.1",),)  # left for an operator, not lost


def test_publish_refuses_what_it_cannot_send(live_cluster: Cluster, bank: int) -> None:
    with live_cluster.client() as client:
        tx = client.begin()
        with pytest.raises(InvalidArgument, match="no outbox participant"):
            tx.publish(QUEUE, "x")
        with pytest.raises(InvalidArgument, match="queue"):
            tx.publish("", "x", participant="eu")
        with pytest.raises(InvalidArgument, match="RabbitMQ's own"):
            tx.publish("amq.direct", "x", participant="eu")
        with pytest.raises(InvalidArgument, match="1,048,576"):
            tx.publish(QUEUE, b"x" * (1024 * 1024 + 1), participant="eu")
        tx.rollback()


def test_client_takes_the_outbox_participant() -> None:
    client = Client("127.0.0.1:1", insecure=True, outbox="eu")
    assert client.outbox == "eu"
    client.close()


def test_a_message_delivered_twice_is_applied_once(
    live_cluster: Cluster, rabbitmq: RabbitMQInstance, outbox: None
) -> None:
    """What a relay does when it dies between the broker's confirm and its DELETE."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    channel = connection.channel()
    for body in (b"first send", b"sent again after a crash"):
        channel.basic_publish("", QUEUE, body, pika.BasicProperties(message_id="c1.42.1"))
    connection.close()
    consumer = Consumer(live_cluster, rabbitmq)
    consumer.drain(count=2)
    consumer.close()
    assert consumer.delivered == ["c1.42.1", "c1.42.1"]
    assert applied(live_cluster) == ["c1.42.1"]
