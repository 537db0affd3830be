"""What both daemons do around their gRPC server: options, listening (mutual TLS unless a
daemon is set to plaintext), stopping on a signal; and their channels to other daemons."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from grpc import aio

from twopc.tls import TlsConfig

MAX_MESSAGE_BYTES = 32 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


def new_server(
    interceptors: Sequence[aio.ServerInterceptor[Any, Any]] = (),
    *,
    max_request_bytes: int = MAX_MESSAGE_BYTES,
) -> aio.Server:
    """A server with ``interceptors`` (access control) that refuses, with RESOURCE_EXHAUSTED, a
    message larger than ``max_request_bytes`` (gRPC's answer names both sizes)."""
    options = [
        (k, max_request_bytes if k == "grpc.max_receive_message_length" else v)
        for k, v in SERVER_OPTIONS
    ]
    return aio.server(options=options, interceptors=list(interceptors) or None)


def listen(server: aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Binds ``address`` (host:port) with mutual TLS (``tls``; every caller must present a
    certificate its CA signed), or in plaintext when ``tls`` is None; returns the port. Raises a
    clear error when the port is taken (``OSError``) or a TLS file cannot be read
    (``InvalidArgument``)."""
    credentials = tls.server_credentials() if tls is not None else None
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err} (is another process using it?)") from err
    if port == 0:
        raise OSError(f"cannot listen on {address} (is another process using it?)")
    return port


async def wait_for_stop_signal() -> signal.Signals:
    """Waits for SIGTERM or SIGINT and returns which one came."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[signal.Signals] = loop.create_future()

    def note(sig: signal.Signals) -> None:
        if not stopped.done():
            stopped.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, note, sig)
    try:
        return await stopped
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_daemon(main: Coroutine[Any, Any, None]) -> None:
    """Runs a daemon's main coroutine to its end, on uvloop where it is installed (a faster
    event loop for the gRPC and timer work the daemons do; the standard loop otherwise)."""
    try:
        import uvloop  # noqa: PLC0415 (optional: absent on platforms it does not support)
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def channel(target: str, tls: TlsConfig | None) -> aio.Channel:
    """A channel to another daemon: mutual TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    options = CHANNEL_OPTIONS + tls.channel_options()
    return aio.secure_channel(target, tls.channel_credentials(), options=options)
