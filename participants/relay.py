"""``twopc relay``: publishes the outbox's committed rows to RabbitMQ, then deletes them.

It runs next to the outbox participant's database (``twopc.outbox``), one relay per outbox. Each
pass reads up to ``batch`` rows in id order. Rows of a transaction not yet committed are
invisible to its reads (a prepared XA branch's rows too), so only committed messages leave, and a
rolled-back transaction's never exist for it. Each row is published as a persistent message to
the durable queue it names (declared on first sight), ``message_id`` = the row's, with publisher
confirms: ``basic_publish`` returns once the broker has it. Then the batch's rows are deleted.

A crash (of the relay, the broker or the database, or a cut link) between a confirm and the
delete publishes those rows again on the next pass: delivery is at least once, and consumers
drop ids they have seen (``twopc.outbox.first_delivery``). Nothing is lost: a row leaves the
table only after the broker confirmed it.

Errors are logged (the error's class and text: never a message body, never the AMQP password)
and the relay reconnects after ``retry_ms``; SIGTERM stops it after the pass under way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pymysql
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from twopc.logs import configure_logging
from twopc.outbox import OUTBOX_TABLE
from twopc.settings import load_settings

__all__ = [
    "ENV_PREFIX",
    "OutboxRelay",
    "RelayConfig",
    "RelayMetrics",
    "load_relay_config",
    "main",
]

ENV_PREFIX = "TWOPC_RELAY_"
_log = structlog.get_logger("twopc.relay")


@dataclass(frozen=True)
class RelayConfig:
    """The relay's settings (a TOML file, then ``TWOPC_RELAY_<NAME>`` variables over it).

    ``amqp_url`` holds the broker's password: set it in the environment
    (``TWOPC_RELAY_AMQP_URL``), as ``mysql_password`` (``TWOPC_RELAY_MYSQL_PASSWORD``)."""

    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "twopc_relay"
    mysql_password: str = ""
    mysql_database: str = ""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    batch: int = 200
    poll_ms: int = 10
    retry_ms: int = 200
    timeout_s: float = 5.0
    log_level: str = "info"
    # Prometheus metrics on http://<metrics_listen>/metrics, loopback only ("": none).
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        if not self.mysql_database:
            raise ValueError("mysql_database: the outbox participant's database is required")
        if not 1 <= self.batch <= 10_000:
            raise ValueError(f"batch must be 1 to 10000, not {self.batch}")
        if self.poll_ms < 1 or self.retry_ms < 1 or self.timeout_s <= 0:
            raise ValueError("poll_ms, retry_ms and timeout_s must be positive")
        if self.metrics_listen:
            host, _ = _metrics_address(self.metrics_listen)
            if not _is_loopback(host):
                raise ValueError(
                    f"metrics_listen {self.metrics_listen!r}: the relay serves metrics on "
                    "loopback only (plain HTTP); scrape it from the same host"
                )

    @property
    def broker(self) -> str:
        """The broker's host:port, for logs (the URL carries a password)."""
        parts = urlsplit(self.amqp_url)
        return f"{parts.hostname}:{parts.port or 5672}"


def load_relay_config(path: Path | None, environ: Mapping[str, str] = os.environ) -> RelayConfig:
    return load_settings(RelayConfig, path, environ, ENV_PREFIX)


class RelayMetrics:
    """The relay's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.published = Counter(
            "twopc_relay_published", "Outbox rows published and confirmed", registry=self.registry
        )
        self.errors = Counter(
            "twopc_relay_errors",
            "Passes that failed, by what failed: database or broker",
            ["kind"],
            registry=self.registry,
        )
        self.last_batch = Gauge(
            "twopc_relay_last_batch_rows",
            "Rows the last pass read (batch: a backlog at least that long)",
            registry=self.registry,
        )
        self.refused = Gauge(
            "twopc_relay_refused_rows",
            "Outbox rows the broker refused (a reserved or forbidden queue): left in the table, "
            "skipped until the relay restarts; an operator's to look at",
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "twopc_relay_batch_seconds",
            "A pass that found rows: read, publish with confirms, delete",
            registry=self.registry,
        )


class OutboxRelay:
    def __init__(
        self,
        config: RelayConfig,
        stop: threading.Event | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._config = config
        self._stop = stop or threading.Event()
        self._metrics = metrics or RelayMetrics()
        self._db: Any = None
        self._connection: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()
        self.published = 0
        self.errors = 0
        self._refused: set[int] = set()  # rows the broker refused: skipped, left in the table

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        _log.info("relay_started", broker=self._config.broker, database=self._config.mysql_database)
        while not self._stop.is_set():
            try:
                if not self.relay_once():
                    self._stop.wait(self._config.poll_ms / 1000)
            except pymysql.MySQLError as err:
                self.errors += 1
                self._metrics.errors.labels("database").inc()
                _log.warning("relay_database_error", error=f"{type(err).__name__}: {err}")
                self._close_db()
                self._stop.wait(self._config.retry_ms / 1000)
            except (pika.exceptions.AMQPError, OSError) as err:
                self.errors += 1
                self._metrics.errors.labels("broker").inc()
                _log.warning(
                    "relay_broker_error", error=type(err).__name__, broker=self._config.broker
                )
                self._close_broker()
                self._stop.wait(self._config.retry_ms / 1000)
        self._close_db()
        self._close_broker()
        _log.info("relay_stopped", published=self.published)

    def relay_once(self) -> bool:
        """One pass: publish up to ``batch`` committed rows, delete them. False: none."""
        started = time.monotonic()
        db = self._database()
        refused = ", ".join(str(row_id) for row_id in sorted(self._refused))  # ints, not input
        skip = f"WHERE id NOT IN ({refused}) " if refused else ""
        with db.cursor() as cursor:
            cursor.execute(
                f"SELECT id, message_id, queue, msg_key, body FROM {OUTBOX_TABLE} {skip}"
                "ORDER BY id LIMIT %s",
                [self._config.batch],
            )
            rows: Sequence[tuple[Any, ...]] = cursor.fetchall()
        self._metrics.last_batch.set(len(rows))
        if not rows:
            return False
        sent = []
        for row_id, message_id, queue, key, body in rows:
            try:
                self._publish(message_id, queue, key, bytes(body))
            except (
                pika.exceptions.AMQPChannelError,
                pika.exceptions.UnroutableError,
                pika.exceptions.NackError,
            ) as err:
                # This message, not the broker: left in the table for an operator, skipped from
                # now on, so that the rows behind it still go out.
                self._refused.add(row_id)
                self._metrics.refused.set(len(self._refused))
                self._close_broker()  # the broker closed the channel
                _log.error(
                    "relay_row_refused",
                    message_id=message_id,
                    queue=queue,
                    error=type(err).__name__,
                    refused_rows=len(self._refused),
                )
                continue
            sent.append(row_id)
        if sent:
            with db.cursor() as cursor:
                cursor.execute(f"DELETE FROM {OUTBOX_TABLE} WHERE id IN %s", [sent])
        self.published += len(sent)
        self._metrics.published.inc(len(sent))
        self._metrics.batch_seconds.observe(time.monotonic() - started)
        _log.debug("relay_batch", published=len(rows))
        return True

    def _publish(self, message_id: str, queue: str, key: str | None, body: bytes) -> None:
        channel = self._broker()
        if queue not in self._declared:
            channel.queue_declare(queue, durable=True)
            self._declared.add(queue)
        # With confirms on, this returns once the broker has the message, and raises when it
        # refuses it (NackError) or cannot route it (UnroutableError).
        channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(
                message_id=message_id,
                delivery_mode=2,
                app_id="twopc-relay",
                headers={"twopc-key": key} if key is not None else None,
            ),
            mandatory=True,
        )

    def _database(self) -> Any:
        if self._db is None:
            config = self._config
            self._db = pymysql.connect(
                host=config.mysql_host,
                port=config.mysql_port,
                user=config.mysql_user,
                password=config.mysql_password,
                database=config.mysql_database,
                autocommit=True,  # every read a fresh snapshot: rows committed since are seen
                connect_timeout=max(1, round(config.timeout_s)),
                read_timeout=max(1, round(config.timeout_s)),
                write_timeout=max(1, round(config.timeout_s)),
                charset="utf8mb4",
            )
        return self._db

    def _broker(self) -> Any:
        if self._channel is None:
            parameters = pika.URLParameters(self._config.amqp_url)
            parameters.socket_timeout = self._config.timeout_s
            parameters.blocked_connection_timeout = self._config.timeout_s
            self._connection = pika.BlockingConnection(parameters)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self._declared.clear()
        return self._channel

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(pymysql.MySQLError):  # a dead connection: nothing to close
                self._db.close()
            self._db = None

    def _close_broker(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):  # a dead connection
                self._connection.close()
        self._connection = self._channel = None


def main(config_path: Path | None) -> int:
    config = load_relay_config(config_path)
    configure_logging(config.log_level)
    metrics = RelayMetrics()
    server = None
    if config.metrics_listen:
        host, port = _metrics_address(config.metrics_listen)
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
        _log.info("relay_metrics_listening", address=f"{host}:{server.server_address[1]}")
    relay = OutboxRelay(config, metrics=metrics)
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    signal.signal(signal.SIGINT, lambda *_: relay.stop())
    try:
        relay.run()
    finally:
        if server is not None:
            server.shutdown()
    return 0


def _metrics_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics_listen {address!r} must be host:port (port 0: any free one)")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
