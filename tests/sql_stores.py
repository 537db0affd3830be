"""Throwaway SQL stores for the SQL decision log's tests: a MariaDB and a PostgreSQL server (one
each per session, started on first use), a fresh database per test, and a TCP proxy that can cut
the link to the store (all of it, or a connection at the moment it sends COMMIT)."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url

from coordinator.decision_log.sql_log import store_url
from twopc.testing.playground.mariadb import MariaDBInstance
from twopc.testing.playground.postgres import PostgresInstance

KINDS = ("mariadb", "postgresql")
_numbers = itertools.count()


def reachable_tmp_dir(prefix: str) -> Path:
    """A temporary directory that the ``postgres`` user can enter (pytest's are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class Stores:
    """The session's store servers, each started when first asked for."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._mariadb: MariaDBInstance | None = None
        self._postgres: PostgresInstance | None = None

    def mariadb(self) -> MariaDBInstance:
        if self._mariadb is None:
            instance = MariaDBInstance("decision-log-store", self._base / "mariadb")
            instance.start()
            self._mariadb = instance
        return self._mariadb

    def postgres(self) -> PostgresInstance:
        if self._postgres is None:
            instance = PostgresInstance(self._base / "postgres")
            instance.start()
            self._postgres = instance
        return self._postgres

    def port(self, kind: str) -> int:
        return self.mariadb().port if kind == "mariadb" else self.postgres().port

    def new_database(self, kind: str) -> str:
        """A new empty database on the ``kind`` store; returns its URL (no password)."""
        name = f"dl_{os.getpid()}_{next(_numbers)}"
        if kind == "mariadb":
            server = self.mariadb()
            with server.connect() as conn, conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
            return f"mariadb://root@127.0.0.1:{server.port}/{name}"
        return self.postgres().create_database(name)

    def stop(self) -> None:
        if self._mariadb is not None:
            self._mariadb.stop(timeout=30)
        if self._postgres is not None:
            self._postgres.stop(timeout=30)


def via(url: str, port: int) -> str:
    """``url`` with its port replaced (to go through a proxy)."""
    return make_url(url).set(port=port).render_as_string(hide_password=False)


def peek_engine(url: str) -> sqlalchemy.Engine:
    """An engine to look at the store from outside the log (its own connections).

    Its MariaDB connections are plain, as the log's are: PyMySQL's TLS "if offered" costs about
    40 ms per connection here, and a test that looks 200 times ran out of its deadline on it."""
    url = store_url(url)
    plain = {"ssl_disabled": True} if url.get_backend_name() != "postgresql" else {}
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool, connect_args=plain)


def lock_waits(url: str, kind: str) -> int:
    """How many transactions of the store wait for a row lock now.

    On MariaDB, a locking read or an UPDATE by primary key waits in the optimizer (state
    "Statistics"), and ``innodb_trx`` may not show it as LOCK WAIT: one running for over 200 ms
    (a primary-key lookup takes well under 1 ms here) counts as waiting too (the log's fence is
    such an UPDATE: a CI run missed its wait)."""
    if kind == "mariadb":
        query = (
            "SELECT (SELECT count(*) FROM information_schema.innodb_trx "
            "WHERE trx_state = 'LOCK WAIT') + (SELECT count(*) FROM "
            "information_schema.processlist WHERE id <> connection_id() AND command = 'Query' "
            "AND time_ms > 200 AND (info LIKE '%FOR UPDATE' OR info LIKE '%LOCK IN SHARE MODE' "
            "OR info LIKE 'UPDATE %'))"
        )
    else:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    ((count,),) = rows(url, query)
    return int(str(count))


def rows(url: str, query: str, **params: object) -> list[tuple[object, ...]]:
    engine = peek_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(query), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


# The store ends a transaction idle for IDLE_IN_TRANSACTION_S (5 s); a test that holds a COMMIT
# in the proxy while it waits for a condition may hold it longer on a loaded machine (a CI run
# lost its held batch that way): the log or leases whose COMMIT it holds ask for this instead.
HELD_COMMIT_IDLE_S = 120


class CutProxy:
    """A TCP proxy on 127.0.0.1 in front of a store, run by threads.

    ``cut()`` closes every connection through it and refuses (closes at once) new ones until
    ``heal()``. With ``cut_on_commit`` set, a connection that sends a COMMIT statement is closed
    before the statement reaches the store: the client's COMMIT fails with its outcome unknown to
    it (the store rolls the transaction back). With ``stall_on_commit``, the COMMIT and all that
    follows on that connection are taken and never delivered: a store that stopped answering.
    With ``hold_commits``, a COMMIT is held (its transaction open, its locks kept) until
    ``release_commits()``, then delivered; ``commits_held`` counts them.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self.cut_on_commit = False
        self.commits_cut = 0
        self.stall_on_commit = False
        self.commits_stalled = 0
        self.hold_commits = False
        self.commits_held = 0
        self._released = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def release_commits(self) -> None:
        self.hold_commits = False
        self._released.set()

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                _close(client)
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        stalled = False
        try:
            while data := source.recv(65536):
                if upstream and self.cut_on_commit and b"COMMIT" in data:
                    self.commits_cut += 1
                    break
                if upstream and self.hold_commits and _is_commit(data):
                    self.commits_held += 1
                    self._released.wait(30)
                if upstream and self.stall_on_commit and b"COMMIT" in data:
                    self.commits_stalled += 1
                    stalled = True
                if not stalled:  # a stalled link takes the client's bytes and answers nothing
                    sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _is_commit(data: bytes) -> bool:
    """A COMMIT statement (not the driver's SET AUTOCOMMIT at connect)."""
    return b"COMMIT" in data and b"AUTOCOMMIT" not in data.upper()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def proxy_to(target_port: int) -> Iterator[CutProxy]:
    proxy = CutProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()


__all__ = [
    "HELD_COMMIT_IDLE_S",
    "KINDS",
    "CutProxy",
    "Stores",
    "lock_waits",
    "peek_engine",
    "proxy_to",
    "reachable_tmp_dir",
    "rows",
    "via",
]
