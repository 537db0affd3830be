"""The TCP fault proxy's core: links that forward bytes and break on demand (pure asyncio).

A ``ProxyLink`` listens on one address and forwards every accepted connection to one upstream
address, two pumps per connection (client -> upstream "up", upstream -> client "down"). Each pump
is a reader task that fills a bounded queue and a writer task that empties it, so a delay never
caps throughput and a slow side pushes back instead of growing memory.

The fault of a link (``FaultSpec``, the proto ``Fault``) applies to both directions, to open and to
new connections. Its fields combine as follows; where two contradict each other, the one higher in
this list wins (``FaultSpec.mode``), the others are kept but have no effect while it holds::

    cut        listening socket closed: new connections are refused. Open connections are
               closed (FIN, as when a process dies; with ``reset`` too: RST). Healing re-binds
               the same port.
    reset      open connections are aborted with RST now; new ones are accepted and reset at once.
    half_open  nothing is read and nothing is written, either way: no FIN, no RST, the peers'
               send buffers fill (a silent partition). Lifting it delivers everything that was
               queued, in order; a FIN that arrived meanwhile follows its data.
    blackhole  bytes are read and dropped either way, the connection stays open; data queued
               when it starts is dropped too (the stream is broken for good). A FIN is not
               dropped: it is held and forwarded once the blackhole is lifted.
    latency_ms, jitter_ms   each chunk is written latency + U(0, jitter) after it was read, never
               before the chunk read before it (order kept). Lowering them (healing) re-times
               chunks already queued: none waits longer than the new latency + jitter.
    bandwidth_bytes_per_s   a token bucket per direction (20 ms worth of burst).

A FIN from one side is forwarded after the data queued before it; the other direction stays open.
A reset or an error on one side (RST, broken pipe, upstream refused) resets the other side too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import socket
import struct
from collections import deque
from dataclasses import dataclass, fields

import structlog

__all__ = [
    "DEFAULT_QUEUE_LIMIT",
    "FaultSpec",
    "LinkSpec",
    "LinkStats",
    "Mode",
    "ProxyLink",
    "split_host_port",
]

log = structlog.get_logger("twopc.chaos.proxy")

DEFAULT_QUEUE_LIMIT = 4 * 1024 * 1024
"""Bytes queued per direction of a connection before the proxy stops reading that side."""

READ_SIZE = 64 * 1024
BURST_S = 0.02
"""Bandwidth cap: the bucket holds this many seconds' worth of bytes; pieces are as large."""

_RST_LINGER = struct.pack("ii", 1, 0)


def split_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:7000"`` -> ``("127.0.0.1", 7000)``; IPv6 hosts in brackets (``[::1]:7000``).

    Raises:
        ValueError: not host:port, or the port is not in 0-65535.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{address!r}: port {port} is out of range")
    return host, port


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class LinkSpec:
    """One link: accept on ``listen`` (host:port, port 0 allowed), forward to ``upstream``."""

    name: str
    listen: str
    upstream: str

    def __post_init__(self) -> None:
        if not self.name or "=" in self.name:
            raise ValueError(f"link name {self.name!r} must be non-empty and without '='")
        split_host_port(self.listen)
        split_host_port(self.upstream)

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``NAME=LISTEN_HOST:PORT=UPSTREAM_HOST:PORT``, as on the command line."""
        parts = text.split("=")
        if len(parts) != 3:
            raise ValueError(f"{text!r} is not NAME=LISTEN_HOST:PORT=UPSTREAM_HOST:PORT")
        return cls(*parts)


class Mode(enum.Enum):
    """What a link does with bytes under its fault (the one field that wins, see the module)."""

    FORWARD = "forward"  # possibly delayed and rate-capped
    BLACKHOLE = "blackhole"
    HALF_OPEN = "half_open"
    RESET = "reset"
    CUT = "cut"


@dataclass(frozen=True)
class FaultSpec:
    """The proto ``Fault``; the default value is a healthy link."""

    latency_ms: int = 0
    jitter_ms: int = 0
    bandwidth_bytes_per_s: int = 0
    blackhole: bool = False
    reset: bool = False
    half_open: bool = False
    cut: bool = False

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "bandwidth_bytes_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def mode(self) -> Mode:
        if self.cut:
            return Mode.CUT
        if self.reset:
            return Mode.RESET
        if self.half_open:
            return Mode.HALF_OPEN
        if self.blackhole:
            return Mode.BLACKHOLE
        return Mode.FORWARD

    @property
    def healthy(self) -> bool:
        return self == FaultSpec()

    def describe(self) -> dict[str, int | bool]:
        """The fields that differ from a healthy link (for logs)."""
        healthy = FaultSpec()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(healthy, f.name)
        }


@dataclass(frozen=True)
class LinkStats:
    connections: int  # open now (including those still connecting upstream)
    accepted: int  # since start
    bytes_up: int  # client -> upstream, written to upstream
    bytes_down: int  # upstream -> client, written to the client
    queued_bytes: int  # held in the proxy now, all connections and directions
    peak_queued_bytes: int  # the most any one direction of one connection ever held


class _Signal:
    """Wakes every waiter when something changes; waiters re-check their own condition.

    Checking a condition and then waiting cannot miss a wake-up: nothing runs in between.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None = None) -> None:
        event = self._event
        if timeout is None:
            await event.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()


@dataclass
class _Chunk:
    data: bytes  # b"" is the FIN
    read_at: float
    due: float


class _Direction:
    """One way of one connection: a reader task fills the queue, a writer task empties it."""

    def __init__(self, link: ProxyLink, signal: _Signal, *, up: bool) -> None:
        self._link = link
        self._signal = signal
        self._up = up
        self._queue: deque[_Chunk] = deque()
        self._offset = 0  # bytes of the queue's head already written
        self.queued_bytes = 0
        self._last_due = -math.inf
        self._next_send = -math.inf  # bandwidth cap: when the next piece may go

    def drop_queued_data(self) -> None:
        """Blackhole: what is queued is lost; a queued FIN is kept."""
        fin = [chunk for chunk in self._queue if not chunk.data]
        self._queue = deque(fin)
        self._offset = 0
        self.queued_bytes = 0
        self._signal.fire()

    def _may_read(self) -> bool:
        mode = self._link.fault.mode
        if mode is Mode.HALF_OPEN:
            return False
        return mode is Mode.BLACKHOLE or self.queued_bytes < self._link.queue_limit

    async def read_loop(self, source: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._may_read():
                await self._signal.wait()
            data = await source.read(READ_SIZE)
            now = loop.time()
            fault = self._link.fault
            if data and fault.mode is Mode.BLACKHOLE:
                continue
            delay = (fault.latency_ms + self._link.rng.uniform(0, fault.jitter_ms)) / 1000
            due = max(self._last_due, now + delay)
            self._last_due = due
            self._queue.append(_Chunk(data, now, due))
            self.queued_bytes += len(data)
            self._link.note_queued(self.queued_bytes)
            self._signal.fire()
            if not data:
                return

    def _wait_before_head(self, now: float) -> float | None:
        """Seconds until the queue's head may be written; None: wait for a change."""
        if not self._queue or self._link.fault.mode is not Mode.FORWARD:
            return None
        head = self._queue[0]
        fault = self._link.fault
        # A lowered latency (a heal) re-times what is queued; order is the queue's.
        due = min(head.due, head.read_at + (fault.latency_ms + fault.jitter_ms) / 1000)
        if due > now:
            return due - now
        rate = fault.bandwidth_bytes_per_s
        if rate and head.data:
            self._next_send = max(self._next_send, now - BURST_S)
            if self._next_send > now:
                return self._next_send - now
        return 0.0

    async def write_loop(self, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._wait_before_head(loop.time())
            if wait is None or wait > 0:
                await self._signal.wait(wait)
                continue
            head = self._queue[0]
            if not head.data:
                self._queue.popleft()
                if sink.can_write_eof():
                    sink.write_eof()
                return
            piece_limit = len(head.data) - self._offset
            rate = self._link.fault.bandwidth_bytes_per_s
            if rate:
                piece_limit = min(piece_limit, max(1, int(rate * BURST_S)))
            piece = head.data[self._offset : self._offset + piece_limit]
            self._offset += len(piece)
            if self._offset == len(head.data):
                self._queue.popleft()
                self._offset = 0
            self.queued_bytes -= len(piece)
            if rate:
                self._next_send += len(piece) / rate
            sink.write(piece)
            self._link.note_forwarded(len(piece), up=self._up)
            self._signal.fire()  # room in the queue: the reader may go on
            await sink.drain()


class _Ending(enum.Enum):
    CLOSE = "close"  # closed at once: FIN (RST if unread data is left, as the kernel does)
    RESET = "reset"  # RST


class _Connection:
    def __init__(
        self,
        link: ProxyLink,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self._link = link
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._signal = _Signal()
        self.up = _Direction(link, self._signal, up=True)
        self.down = _Direction(link, self._signal, up=False)
        self._ending: _Ending | None = None
        self._ended_by_link = False
        self.task: asyncio.Task[None] | None = None

    def fault_changed(self) -> None:
        if self._link.fault.mode is Mode.BLACKHOLE:
            self.up.drop_queued_data()
            self.down.drop_queued_data()
        self._signal.fire()

    def end(self, how: _Ending) -> None:
        """Ends the connection (the link then waits for ``task``); the first call counts."""
        if self._ended_by_link:
            return
        self._ended_by_link = True
        self._ending = how
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        try:
            await self._forward()
        except asyncio.CancelledError:
            if self._ending is None:  # cancelled from outside the link: still clean up
                self._ending = _Ending.CLOSE
            raise
        except Exception:
            log.exception("proxy_connection_failed", link=self._link.name)
            self._ending = _Ending.RESET
        finally:
            await self.close_transports()
            self._link.forget(self)

    async def _forward(self) -> None:
        host, port = self._link.upstream_address
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError as err:
            log.info("proxy_upstream_unreachable", link=self._link.name, error=str(err))
            self._ending = _Ending.RESET  # the client learns as it would have: a reset
            return
        self._upstream_writer = upstream_writer
        broken = False
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.up.read_loop(self._client_reader))
                tasks.create_task(self.up.write_loop(upstream_writer))
                tasks.create_task(self.down.read_loop(upstream_reader))
                tasks.create_task(self.down.write_loop(self._client_writer))
        except* OSError:  # a peer reset or vanished: pass it on to the other one
            broken = True
        if broken:
            self._ending = _Ending.RESET
            return
        # Both FINs were forwarded: close once the last bytes are out.
        for writer in (self._client_writer, upstream_writer):
            writer.close()
        for writer in (self._client_writer, upstream_writer):
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._ending = _Ending.CLOSE

    async def close_transports(self) -> None:
        """Closes both sockets now, as ``_ending`` says (idempotent)."""
        writers = [w for w in (self._client_writer, self._upstream_writer) if w is not None]
        for writer in writers:
            _abort(writer.transport, rst=self._ending is _Ending.RESET)
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @property
    def queued_bytes(self) -> int:
        return self.up.queued_bytes + self.down.queued_bytes


def _abort(transport: asyncio.BaseTransport, *, rst: bool) -> None:
    """Closes the socket now, dropping what is not sent yet (idempotent). ``rst``: with a RST
    (SO_LINGER 0) rather than the FIN the kernel sends when nothing unread is left."""
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # closed already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


class ProxyLink:
    """A listening socket that forwards to one upstream and applies one ``FaultSpec``.

    Use: ``await start()`` (returns the bound port), ``await set_fault(...)`` / ``await heal()``
    any number of times, ``await close()`` once. ``set_fault`` returns when the fault holds:
    reset or cut connections are closed and a cut port refuses connections, a healed cut port
    accepts again.
    """

    def __init__(
        self,
        spec: LinkSpec,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        rng: random.Random | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be positive")
        self.spec = spec
        self.queue_limit = queue_limit
        self.rng = rng or random.Random()
        self.upstream_address = split_host_port(spec.upstream)
        self._fault = FaultSpec()
        self._server: asyncio.Server | None = None
        self._bind: tuple[socket.AddressFamily, tuple[object, ...]] | None = None
        self._port = 0
        self._connections: set[_Connection] = set()
        self._changing = asyncio.Lock()
        self._closed = False
        self._accepted = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._peak_queued = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fault(self) -> FaultSpec:
        return self._fault

    @property
    def port(self) -> int:
        """The bound port (0 before ``start``)."""
        return self._port

    @property
    def listen_address(self) -> str:
        """host:port as bound (the port ``start`` chose when the spec said 0)."""
        host, port = split_host_port(self.spec.listen)
        return _join_host_port(host, self._port or port)

    def stats(self) -> LinkStats:
        return LinkStats(
            connections=len(self._connections),
            accepted=self._accepted,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
            queued_bytes=sum(c.queued_bytes for c in self._connections),
            peak_queued_bytes=self._peak_queued,
        )

    async def start(self) -> int:
        """Binds the listening address and starts accepting; returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None or self._closed:
            raise RuntimeError(f"link {self.name} is started or closed already")
        host, port = split_host_port(self.spec.listen)
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve {self.spec.listen}")
        family, _, _, _, address = infos[0]
        self._bind = (family, tuple(address))
        try:
            await self._listen()
        except OSError as err:
            raise OSError(
                err.errno,
                f"link {self.name}: cannot listen on {self.spec.listen}: {err.strerror or err}",
            ) from err
        return self._port

    async def _listen(self) -> None:
        assert self._bind is not None
        family, address = self._bind
        if self._port:  # re-binding after a cut: the same port
            address = (address[0], self._port, *address[2:])
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and an accepted socket inherits this. Without it, Nagle holds back every small reply
        # until the peer's delayed ACK (~40 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # The port may have connections in TIME_WAIT (a cut closed them): bind anyway.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind(address)
            self._server = await asyncio.start_server(self._accept, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        mode = self._fault.mode
        if mode is Mode.RESET or mode is Mode.CUT or self._closed:
            _abort(writer.transport, rst=mode is Mode.RESET)
            return
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        connection.task = asyncio.get_running_loop().create_task(
            connection.run(), name=f"proxy-{self.name}-{self._accepted}"
        )

    def forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def note_forwarded(self, count: int, *, up: bool) -> None:
        if up:
            self._bytes_up += count
        else:
            self._bytes_down += count

    def note_queued(self, queued: int) -> None:
        self._peak_queued = max(self._peak_queued, queued)

    async def set_fault(self, fault: FaultSpec) -> None:
        """Replaces the link's fault (``FaultSpec()`` heals it); returns once it holds.

        Raises:
            OSError: a cut link could not re-bind its port (it stays cut).
            RuntimeError: the link is closed.
        """
        async with self._changing:
            if self._closed:
                raise RuntimeError(f"link {self.name} is closed")
            previous, self._fault = self._fault, fault
            mode = fault.mode
            if mode is Mode.CUT:
                self._stop_listening()
                await self._end_all(_Ending.RESET if fault.reset else _Ending.CLOSE)
            else:
                if self._server is None and self._bind is not None:
                    try:
                        await self._listen()
                    except OSError:
                        self._fault = previous
                        raise
                if mode is Mode.RESET:
                    await self._end_all(_Ending.RESET)
                for connection in list(self._connections):
                    connection.fault_changed()
            if fault != previous:
                log.info("proxy_fault_set", link=self.name, fault=fault.describe())

    async def heal(self) -> None:
        await self.set_fault(FaultSpec())

    async def close(self) -> None:
        """Stops accepting and closes every connection (idempotent)."""
        async with self._changing:
            self._closed = True
            server = self._stop_listening()
            await self._end_all(_Ending.CLOSE)
            if server is not None:
                await server.wait_closed()

    def _stop_listening(self) -> asyncio.Server | None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket now: connecting is refused from here
        return server

    async def _end_all(self, how: _Ending) -> None:
        connections = list(self._connections)
        for connection in connections:
            connection.end(how)
        tasks = [c.task for c in connections if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in connections:
            # A task cancelled before its first step never ran its own clean-up.
            await connection.close_transports()
            self.forget(connection)
