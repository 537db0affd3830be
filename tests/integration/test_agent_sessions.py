"""The agent's database sessions under the daemon's event loop (uvloop): a connection that is gone
must surface as ``ConnectionLost``, which the agent handles, never as a bare ``RuntimeError``
from the transport (which would crash the RPC and strand the branch).

(The first chaos run of the agent on the event loop: 150 RPCs crashed with uvloop's "unable to
perform operation on <TCPTransport closed=True>" and "Transport does not expose socket
instance", while databases restarted and the reaper severed sessions.)"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from participants.xa import ConnectionLost, SessionPool
from twopc.testing.playground.cluster import Cluster


def _pool(host: str, port: int) -> SessionPool:
    return SessionPool(
        host=host,
        port=port,
        user="root",
        password="",
        database=None,
        pool_size=2,
        overflow=0,
        checkout_timeout=5,
        connect_timeout=5,
        read_timeout=10,
        lock_wait_timeout=5,
        idle_timeout=60,
        command_timeout=5,
    )


def _on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(scenario())


def test_a_severed_session_reports_connection_lost(live_cluster: Cluster) -> None:
    host, port = live_cluster.component("mariadb-eu").address.rsplit(":", 1)
    pool = _pool(host, int(port))

    async def scenario() -> None:
        session = await pool.session()
        assert (await session.execute("SELECT 1")).rows == [(1,)]
        session.sever()  # what the reaper does to a statement lost on a dead link
        await asyncio.sleep(0.05)  # one loop turn or more: the transport is closed by then
        with pytest.raises(ConnectionLost):
            await session.execute("SELECT 2")
        session.discard()
        again = await pool.session()  # the pool is not poisoned
        assert (await again.execute("SELECT 3")).rows == [(3,)]
        again.release()
        pool.dispose()

    _on_uvloop(scenario)


@pytest.fixture
def closes_at_once() -> Iterator[int]:
    """A TCP port whose listener closes every connection as soon as it is accepted (a database
    that is going down)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()  # RST

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_database_that_drops_new_connections_reports_connection_lost(
    closes_at_once: int,
) -> None:
    pool = _pool("127.0.0.1", closes_at_once)

    async def scenario() -> None:
        for _ in range(20):
            with pytest.raises(ConnectionLost):
                await pool.session()

    _on_uvloop(scenario)
