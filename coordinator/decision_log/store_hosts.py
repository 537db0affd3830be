"""More than one host for a MariaDB/MySQL store: a Galera cluster's nodes, tried in turn.

A coordinator of a group writes its decision log and its lease through one node of the store; when
that node dies, every node that is left holds the same rows (Galera replicates synchronously, and
the lease fence conflicts in certification whatever node a write goes through). So the
connections of the log and of the leases are made by ``failover_creator``: the URL's host first,
then each of ``decision_log_hosts`` in turn, staying on the last one that answered. PostgreSQL
needs none of this: libpq takes several hosts in the URL itself
(``postgresql://user@/db?host=h1:5432&host=h2:5432&target_session_attrs=read-write``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pymysql
import structlog
from sqlalchemy.engine import URL

__all__ = ["failover_creator", "parse_hosts"]

log = structlog.get_logger("twopc.coordinator.decision_log")


def parse_hosts(hosts: Sequence[str]) -> list[tuple[str, int]]:
    """``host:port`` strings as pairs.

    Raises:
        ValueError: one is not ``host:port`` with a port from 1 to 65535.
    """
    parsed = []
    for entry in hosts:
        host, colon, port = entry.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a store host is host:port, got {entry!r}")
        parsed.append((host, int(port)))
    return parsed


def failover_creator(
    url: URL, alternates: Sequence[str], connect_args: Mapping[str, Any]
) -> Callable[[], Any]:
    """A DBAPI connection factory (``create_engine(..., creator=...)``) for a MariaDB/MySQL
    store: the host last reached first, then the URL's host and ``alternates`` in order.

    Raises (when called):
        pymysql.err.OperationalError: no host answered (the last one's error).
    """
    endpoints = [(url.host or "127.0.0.1", url.port or 3306), *parse_hosts(alternates)]
    # TLS as SQLAlchemy's MySQL dialects read it from the URL (?ssl_ca=...&ssl_cert=...).
    tls = {
        key.removeprefix("ssl_"): str(value)
        for key, value in url.query.items()
        if key in ("ssl_ca", "ssl_cert", "ssl_key", "ssl_capath", "ssl_cipher")
    }
    extra: dict[str, Any] = {"ssl": tls} if tls else {}
    lock = threading.Lock()
    last = [0]

    def connect() -> Any:
        with lock:
            first = last[0]
        error: Exception | None = None
        for step in range(len(endpoints)):
            index = (first + step) % len(endpoints)
            host, port = endpoints[index]
            try:
                connection = pymysql.connect(
                    host=host,
                    port=port,
                    user=url.username or "",
                    password=url.password or "",
                    database=url.database or None,
                    **connect_args,
                    **extra,
                )
            except pymysql.err.OperationalError as err:
                error = err
                continue
            if index != first:
                log.warning(
                    "store_host_changed",
                    host=f"{host}:{port}",
                    previous=f"{endpoints[first][0]}:{endpoints[first][1]}",
                )
            with lock:
                last[0] = index
            return connection
        assert error is not None
        raise error

    return connect
