"""The fault proxy's core over real loopback sockets: forwarding, half-close and every fault.

Each test runs its own event loop (``asyncio.run``) with an overall deadline. The upstream is a
server whose accepted streams the test drives itself, so both ends of a proxied connection are in
the test's hands. Waits are on conditions with deadlines; the only fixed waits are the windows in
which something must *not* happen (``QUIET_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from twopc.testing.chaos.proxy import (
    READ_SIZE,
    FaultSpec,
    LinkSpec,
    Mode,
    ProxyLink,
    split_host_port,
)

HOST = "127.0.0.1"
QUIET_S = 0.3  # how long "nothing arrives" is watched
DEADLINE_S = 5.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run(test: Callable[[], Coroutine[Any, Any, None]], deadline: float = 8.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(deadline):
            await test()

    asyncio.run(bounded())


class Upstream:
    """A loopback server that hands every accepted connection's streams to the test."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Streams] = asyncio.Queue()
        self.count = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        self._writers.append(writer)
        self.accepted.put_nowait((reader, writer))

    async def accept(self) -> Streams:
        async with asyncio.timeout(DEADLINE_S):
            return await self.accepted.get()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await close_all(self._writers)
        await self._server.wait_closed()


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Harness:
    def __init__(self, link: ProxyLink, upstream: Upstream) -> None:
        self.link = link
        self.upstream = upstream
        self.clients: list[asyncio.StreamWriter] = []

    async def connect(self) -> Streams:
        reader, writer = await asyncio.open_connection(HOST, self.link.port)
        self.clients.append(writer)
        return reader, writer

    async def pair(self) -> tuple[Streams, Streams]:
        """A client connection and the upstream's end of it, proven to forward both ways."""
        client = await self.connect()
        server = await self.upstream.accept()
        client[1].write(b"hi")
        assert await exactly(server[0], 2) == b"hi"
        server[1].write(b"yo")
        assert await exactly(client[0], 2) == b"yo"
        return client, server


@contextlib.asynccontextmanager
async def proxied(queue_limit: int = 4 * 1024 * 1024) -> AsyncIterator[Harness]:
    upstream = Upstream()
    await upstream.start()
    link = ProxyLink(
        LinkSpec("test", f"{HOST}:0", f"{HOST}:{upstream.port}"),
        queue_limit=queue_limit,
        rng=random.Random(7),
    )
    await link.start()
    harness = Harness(link, upstream)
    try:
        yield harness
    finally:
        await close_all(harness.clients)
        await link.close()
        await upstream.close()


async def exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    async with asyncio.timeout(DEADLINE_S):
        return await reader.readexactly(size)


async def until_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(DEADLINE_S):
        return await reader.read()


async def nothing_arrives(reader: asyncio.StreamReader) -> None:
    """Within QUIET_S: no byte and no EOF."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET_S):
            await reader.read(1)
    assert not reader.at_eof()


async def wait_until(what: str, condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"not reached within {DEADLINE_S} s: {what}")
        await asyncio.sleep(0.005)


async def both(*waits: Awaitable[object]) -> None:
    await asyncio.gather(*waits)


def numbered(count: int) -> list[bytes]:
    return [b"%06d\n" % i for i in range(count)]


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "mode"),
    [
        (FaultSpec(), Mode.FORWARD),
        (FaultSpec(latency_ms=5, jitter_ms=1, bandwidth_bytes_per_s=10), Mode.FORWARD),
        (FaultSpec(blackhole=True, latency_ms=5), Mode.BLACKHOLE),
        (FaultSpec(half_open=True, blackhole=True), Mode.HALF_OPEN),
        (FaultSpec(reset=True, half_open=True, blackhole=True), Mode.RESET),
        (FaultSpec(cut=True, reset=True, half_open=True, blackhole=True), Mode.CUT),
        (FaultSpec(cut=True), Mode.CUT),
    ],
)
def test_contradictory_fields_resolve_by_precedence(fault: FaultSpec, mode: Mode) -> None:
    assert fault.mode is mode


def test_fault_values() -> None:
    assert FaultSpec().healthy
    assert not FaultSpec(jitter_ms=1).healthy
    assert FaultSpec(latency_ms=5, cut=True).describe() == {"latency_ms": 5, "cut": True}
    with pytest.raises(ValueError, match="latency_ms"):
        FaultSpec(latency_ms=-1)


def test_link_spec_parsing() -> None:
    spec = LinkSpec.parse("a-b=127.0.0.1:0=127.0.0.1:7100")
    assert spec == LinkSpec("a-b", "127.0.0.1:0", "127.0.0.1:7100")
    assert split_host_port("[::1]:80") == ("::1", 80)
    for bad in ("a=127.0.0.1:1", "=127.0.0.1:1=127.0.0.1:2", "a=127.0.0.1=127.0.0.1:2"):
        with pytest.raises(ValueError, match=r"host:port|NAME=|link name"):
            LinkSpec.parse(bad)
    with pytest.raises(ValueError, match="out of range"):
        split_host_port("127.0.0.1:70000")


# --- forwarding -----------------------------------------------------------------------------


def test_large_payloads_are_forwarded_both_ways_byte_exact() -> None:
    up_payload = os.urandom(3 * 1024 * 1024 + 17)
    down_payload = os.urandom(2 * 1024 * 1024 + 5)

    async def test() -> None:
        async with proxied() as h:
            (client_r, client_w), (server_r, server_w) = await h.pair()
            client_w.write(up_payload)
            server_w.write(down_payload)
            got_up, got_down, _, _ = await asyncio.gather(
                exactly(server_r, len(up_payload)),
                exactly(client_r, len(down_payload)),
                client_w.drain(),
                server_w.drain(),
            )
            assert got_up == up_payload
            assert got_down == down_payload
            stats = h.link.stats()
            assert stats.bytes_up == len(up_payload) + 2
            assert stats.bytes_down == len(down_payload) + 2

    run(test)


def test_a_fin_is_forwarded_and_the_other_direction_stays_open() -> None:
    async def test() -> None:
        async with proxied() as h:
            # The client finishes sending first; the upstream answers after seeing the FIN.
            (client_r, client_w), (server_r, server_w) = await h.pair()
            client_w.write(b"request")
            client_w.write_eof()
            assert await until_eof(server_r) == b"request"
            server_w.write(b"answer after your FIN")
            server_w.write_eof()
            assert await until_eof(client_r) == b"answer after your FIN"

            # The upstream finishes first; the client goes on sending.
            (client_r, client_w), (server_r, server_w) = await h.pair()
            server_w.write(b"bye")
            server_w.write_eof()
            assert await until_eof(client_r) == b"bye"
            client_w.write(b"still talking")
            client_w.write_eof()
            assert await until_eof(server_r) == b"still talking"

            # Both FINs through: the proxy closes its two sockets.
            await wait_until("connections closed", lambda: h.link.stats().connections == 0)

    run(test)


def test_stats_count_connections_and_forwarded_bytes() -> None:
    async def test() -> None:
        async with proxied() as h:
            assert h.link.stats().accepted == 0
            (_, client_w), (server_r, server_w) = await h.pair()
            await h.pair()
            stats = h.link.stats()
            assert (stats.accepted, stats.connections) == (2, 2)
            assert (stats.bytes_up, stats.bytes_down) == (4, 4)
            client_w.write(b"12345")
            assert await exactly(server_r, 5) == b"12345"
            assert h.link.stats().bytes_up == 9
            client_w.close()
            server_w.close()
            await wait_until("one connection left", lambda: h.link.stats().connections == 1)
            assert h.link.stats().accepted == 2
            assert h.link.stats().queued_bytes == 0

    run(test)


def test_upstream_refusing_resets_the_client() -> None:
    async def test() -> None:
        async with proxied() as h:
            await h.upstream.close()
            reader, _ = await h.connect()
            with pytest.raises(ConnectionResetError):
                await until_eof(reader)

    run(test)


def test_a_full_queue_stops_reading_instead_of_growing() -> None:
    limit = 64 * 1024
    payload = os.urandom(1024 * 1024)

    async def test() -> None:
        async with proxied(queue_limit=limit) as h:
            (_, client_w), (server_r, _) = await h.pair()
            await h.link.set_fault(FaultSpec(latency_ms=20))
            client_w.write(payload)
            assert await exactly(server_r, len(payload)) == payload
            assert 0 < h.link.stats().peak_queued_bytes <= limit + READ_SIZE

    run(test)


# --- latency and bandwidth ------------------------------------------------------------------


def test_latency_delays_each_way_and_jitter_keeps_order() -> None:
    latency = 0.1
    chunks = numbered(200)

    async def test() -> None:
        async with proxied() as h:
            (client_r, client_w), (server_r, server_w) = await h.pair()
            await h.link.set_fault(FaultSpec(latency_ms=100, jitter_ms=50))
            loop = asyncio.get_running_loop()

            async def echo() -> None:  # the upstream sends back what it gets, as it gets it
                while data := await server_r.read(READ_SIZE):
                    server_w.write(data)
                server_w.write_eof()

            async def send() -> None:
                for chunk in chunks:  # many small writes: many chunks, each with its own delay
                    client_w.write(chunk)
                    await client_w.drain()
                    await asyncio.sleep(0)
                client_w.write_eof()

            started = loop.time()
            sending = asyncio.create_task(send())
            first = await exactly(server_r, len(chunks[0]))
            one_way = loop.time() - started
            server_w.write(first)
            echoing = asyncio.create_task(echo())
            echoed = await until_eof(client_r)
            round_trip_all = loop.time() - started
            await asyncio.gather(echoing, sending)

            assert one_way >= latency
            assert echoed == b"".join(chunks)  # every chunk, none overtaking another
            assert round_trip_all >= 2 * latency
            assert round_trip_all < 2.0  # a delay is not a throughput cap (200 x 0.1 s = 20 s)

    run(test)


def test_heal_delivers_data_queued_under_latency_at_once_and_in_order() -> None:
    chunks = numbered(50)

    async def test() -> None:
        async with proxied() as h:
            (_, client_w), (server_r, _) = await h.pair()
            await h.link.set_fault(FaultSpec(latency_ms=3000, jitter_ms=100))
            for chunk in chunks:
                client_w.write(chunk)
                await client_w.drain()
            await wait_until("all queued", lambda: h.link.stats().queued_bytes == 350)
            healed = time.monotonic()
            await h.link.heal()
            assert await exactly(server_r, 350) == b"".join(chunks)
            assert time.monotonic() - healed < 1.5

    run(test)


def test_bandwidth_is_capped_each_way() -> None:
    rate = 64 * 1024
    size = 32 * 1024  # 0.5 s at the cap

    async def test() -> None:
        async with proxied() as h:
            (client_r, client_w), (server_r, server_w) = await h.pair()
            await h.link.set_fault(FaultSpec(bandwidth_bytes_per_s=rate))
            for sender, receiver in ((client_w, server_r), (server_w, client_r)):
                payload = os.urandom(size)
                started = time.monotonic()
                sender.write(payload)
                assert await exactly(receiver, size) == payload
                elapsed = time.monotonic() - started
                assert 0.4 <= elapsed < 3.0, elapsed

    run(test)


# --- blackhole, reset, half-open, cut -------------------------------------------------------


def test_blackhole_drops_bytes_both_ways_and_keeps_connections_open() -> None:
    async def test() -> None:
        async with proxied() as h:
            (client_r, client_w), (server_r, server_w) = await h.pair()
            await h.link.set_fault(FaultSpec(blackhole=True))
            client_w.write(b"lost up")
            server_w.write(b"lost down")
            new_r, new_w = await h.connect()  # a new connection is blackholed too
            new_w.write(b"hello?")
            await both(
                nothing_arrives(server_r),
                nothing_arrives(client_r),
                nothing_arrives(new_r),
            )
            assert h.link.stats().connections == 2

            await h.link.heal()
            client_w.write(b"after")
            assert await exactly(server_r, 5) == b"after"  # what was dropped stays lost
            server_w.write(b"back")
            assert await exactly(client_r, 4) == b"back"

    run(test)


def test_a_fin_under_blackhole_is_held_until_healed() -> None:
    async def test() -> None:
        async with proxied() as h:
            (_, client_w), (server_r, _) = await h.pair()
            await h.link.set_fault(FaultSpec(blackhole=True))
            client_w.write(b"dropped")
            client_w.write_eof()
            await nothing_arrives(server_r)
            await h.link.heal()
            assert await until_eof(server_r) == b""

    run(test)


def test_reset_aborts_open_connections_with_rst_and_new_ones_at_once() -> None:
    async def test() -> None:
        async with proxied() as h:
            (client_r, _), (server_r, _) = await h.pair()
            await h.link.set_fault(FaultSpec(reset=True))
            with pytest.raises(ConnectionResetError):
                await until_eof(client_r)
            with pytest.raises(ConnectionResetError):
                await until_eof(server_r)
            assert h.link.stats().connections == 0

            new_r, _ = await h.connect()
            with pytest.raises(ConnectionResetError):
                await until_eof(new_r)
            assert h.upstream.count == 1  # the upstream never saw the reset one
            assert h.link.stats().accepted == 2

            await h.link.heal()
            await h.pair()

    run(test)


def test_half_open_holds_everything_then_heal_delivers_it_in_order() -> None:
    up_chunks = numbered(100)
    down_chunks = [b"down %d;" % i for i in range(100)]

    async def test() -> None:
        async with proxied() as h:
            (client_r, client_w), (server_r, server_w) = await h.pair()
            await h.link.set_fault(FaultSpec(half_open=True))
            for up, down in zip(up_chunks, down_chunks, strict=True):
                client_w.write(up)
                server_w.write(down)
                await asyncio.sleep(0)
            # Keep writing until the client's side can write no more: the proxy stopped reading.
            blob = bytearray()
            while len(blob) < 256 * 1024 * 1024:
                piece = os.urandom(1024 * 1024)
                blob += piece
                client_w.write(piece)
                try:
                    async with asyncio.timeout(0.2):
                        await client_w.drain()
                except TimeoutError:
                    break
            else:
                raise AssertionError("the client could write 256 MiB into a half-open link")
            server_w.write_eof()
            await both(nothing_arrives(server_r), nothing_arrives(client_r))
            assert h.link.stats().connections == 1
            assert h.link.stats().queued_bytes <= 2 * READ_SIZE  # it stopped reading

            await h.link.heal()
            client_w.write_eof()
            got_up, got_down, _ = await asyncio.gather(
                until_eof(server_r), until_eof(client_r), client_w.drain()
            )
            assert got_up == b"".join(up_chunks) + bytes(blob)
            assert got_down == b"".join(down_chunks)

    run(test)


def test_cut_refuses_new_connections_closes_open_ones_and_heal_rebinds() -> None:
    async def test() -> None:
        async with proxied() as h:
            port = h.link.port
            (client_r, _), (server_r, _) = await h.pair()
            await h.link.set_fault(FaultSpec(cut=True))
            assert await until_eof(client_r) == b""  # closed (FIN), not reset
            assert await until_eof(server_r) == b""
            with pytest.raises(ConnectionRefusedError):
                await h.connect()
            assert h.link.stats().connections == 0

            await h.link.heal()
            assert h.link.port == port
            await h.pair()
            assert h.link.stats().connections == 1

    run(test)


def test_cut_with_reset_resets_open_connections() -> None:
    async def test() -> None:
        async with proxied() as h:
            (client_r, _), _ = await h.pair()
            await h.link.set_fault(FaultSpec(cut=True, reset=True))
            with pytest.raises(ConnectionResetError):
                await until_eof(client_r)
            with pytest.raises(ConnectionRefusedError):
                await h.connect()
            # Lifting the cut but keeping reset: accepted, then reset at once.
            await h.link.set_fault(FaultSpec(reset=True))
            new_r, _ = await h.connect()
            with pytest.raises(ConnectionResetError):
                await until_eof(new_r)

    run(test)


def test_close_closes_everything() -> None:
    async def test() -> None:
        async with proxied() as h:
            (client_r, _), (server_r, _) = await h.pair()
            await h.link.close()
            assert await until_eof(client_r) == b""
            assert await until_eof(server_r) == b""
            with pytest.raises(ConnectionRefusedError):
                await h.connect()
            await h.link.close()  # idempotent
            with pytest.raises(RuntimeError, match="closed"):
                await h.link.heal()

    run(test)


def test_small_replies_are_not_held_back_by_nagle() -> None:
    """Regression: the proxy's accepted sockets lacked TCP_NODELAY, so a reply written in two
    parts waited for the client's delayed ACK (~40 ms) before its second part left the proxy."""
    rounds = 15

    async def test() -> None:
        async with proxied() as harness:
            (client_reader, client_writer), (server_reader, server_writer) = await harness.pair()
            started = time.monotonic()
            for _ in range(rounds):
                client_writer.write(b"?")
                assert await exactly(server_reader, 1) == b"?"
                server_writer.write(b"a")
                assert await exactly(client_reader, 1) == b"a"  # unacknowledged at the proxy
                server_writer.write(b"b")
                assert await exactly(client_reader, 1) == b"b"
            elapsed = time.monotonic() - started
            assert elapsed < 0.25, f"{rounds} round trips took {elapsed:.3f} s"

    run(test)
