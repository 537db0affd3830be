"""What both daemons serve for operators: gRPC health and reflection, and Prometheus metrics.

**Health** (``grpc.health.v1.Health``): the overall service ``""`` and the daemon's own service
(``twopc.v1.Coordinator``, ``twopc.v1.Participant``) answer SERVING or NOT_SERVING together;
each daemon decides when (``Health.serving``). At shutdown both turn NOT_SERVING for good.

**Reflection** (``grpc.reflection.v1alpha.ServerReflection``): lists the services and their
descriptors, for grpcurl and friends.

With TLS, both are open to every identity the CA vouches for (``OPEN_RULES``, for the
``AccessControl`` interceptor): they disclose nothing about transactions.

**Metrics**: each daemon keeps its own ``CollectorRegistry`` and serves it over HTTP on
``metrics_listen`` (off when empty) from a thread of its own. Where it may listen
(``metrics_server``): on loopback, plain HTTP; beyond loopback, HTTPS with client certificates
(the daemon's own certificate and key, callers' certificates signed by its ``tls_ca``), unless
the daemon runs with ``insecure_plaintext``, which serves plain HTTP anywhere (its warning at
start says so). No label ever carries a txid, SQL or a value: labels are bounded sets
(outcomes, participant names, RPC methods).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from grpc import aio
from grpc_health.v1 import _async as health_aio  # the asyncio servicer (health.aio)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from twopc.identity import ServiceRule
from twopc.tls import TlsConfig

__all__ = [
    "HEALTH_SERVICE",
    "LATENCY_BUCKETS",
    "OPEN_RULES",
    "REFLECTION_SERVICE",
    "Health",
    "MetricsServer",
    "add_health_and_reflection",
    "is_loopback",
    "metrics_server",
    "split_metrics_listen",
]

#: Histogram buckets of both daemons' latencies, in seconds: from a fast loopback round trip to
#: a slow cross-region one.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME
#: AccessControl rules: every identity the CA vouches for may ask for health and reflection.
OPEN_RULES = {HEALTH_SERVICE: ServiceRule(None), REFLECTION_SERVICE: ServiceRule(None)}


class Health:
    """The daemon's health, as the standard health service reports it: the overall service
    ``""`` and ``service`` move together. Starts NOT_SERVING."""

    def __init__(self, service: str) -> None:
        self.servicer = health_aio.HealthServicer()
        self._services = ("", service)
        self._serving: bool | None = None

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    async def set(self, serving: bool) -> bool:
        """Sets the status; True when it changed (the caller logs it)."""
        if serving == self._serving:
            return False
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._services:
            await self.servicer.set(name, status)
        return True

    async def shutting_down(self) -> None:
        """NOT_SERVING for good: the server is stopping."""
        self._serving = False
        await self.servicer.enter_graceful_shutdown()


def add_health_and_reflection(server: aio.Server, health: Health, services: Sequence[str]) -> None:
    """Serves ``health`` and reflection (which lists ``services``, itself and health) on
    ``server``."""
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [*services, HEALTH_SERVICE, REFLECTION_SERVICE],
        server,
    )


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``; False for anything else (a wildcard, a
    name, another address)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class MetricsServer:
    """A running metrics endpoint: where it listens, and whether over HTTPS."""

    host: str
    port: int
    https: bool
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def split_metrics_listen(address: str) -> tuple[str, int]:
    """``metrics_listen``'s host and port; ValueError when it is not host:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics_listen {address!r} must be host:port (port 0: any free one)")
    return host.strip("[]"), int(port)


def metrics_server(
    address: str, registry: CollectorRegistry, tls: TlsConfig | None
) -> MetricsServer | None:
    """Serves ``registry`` at ``http(s)://address/metrics``; None when ``address`` is empty.

    Loopback: plain HTTP. Beyond loopback: HTTPS with client certificates from ``tls`` (the
    daemon's certificate, key and CA) when the daemon runs TLS; plain HTTP when it runs with
    ``insecure_plaintext`` (``tls`` is None).

    Raises:
        ValueError: ``address`` is not host:port.
        OSError: the port cannot be bound, or a TLS file cannot be read.
    """
    if not address:
        return None
    host, port = split_metrics_listen(address)
    https = tls is not None and not is_loopback(host)
    try:
        if https:
            assert tls is not None
            server, thread = start_http_server(
                port,
                addr=host,
                registry=registry,
                certfile=str(tls.cert),
                keyfile=str(tls.key),
                client_cafile=str(tls.ca),
                client_auth_required=True,
            )
        else:
            server, thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, socket.gaierror) as err:
        raise OSError(f"cannot serve metrics on {address}: {err}") from err
    bound_port = server.server_address[1]
    return MetricsServer(host, int(bound_port), https, server, thread)
