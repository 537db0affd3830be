"""Health, the metrics endpoint and trace context, on real in-process gRPC and HTTP servers (no
daemon, no database): what the coordinator's health follows, where metrics may be served and
how, and that the SDK carries the caller's trace context to a server that extracts it."""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, Counter

from coordinator.config import CoordinatorConfig
from coordinator.daemon import COORDINATOR_SERVICE, _keep_health
from participants.config import AgentConfig
from twopc import tracing
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import AsyncClient, Client, RetryPolicy
from twopc.errors import StatementFailed, TransactionAborted
from twopc.observability import Health, add_health_and_reflection, is_loopback, metrics_server
from twopc.testing.certs import CertificateAuthority
from twopc.tls import TlsConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# --- the coordinator's health --------------------------------------------------------------------


@dataclass
class _Manager:
    draining: bool = False


@dataclass
class _Recovery:
    passes: int = 0


async def _status_becomes(stub: Any, wanted: int, service: str = "") -> None:
    """Waits (at most 5 s) until the health service answers ``wanted`` for ``service``."""
    async with asyncio.timeout(5):
        while True:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            if reply.status == wanted:
                return
            await asyncio.sleep(0.02)


def test_the_coordinator_serves_after_its_first_recovery_pass_and_not_while_draining() -> None:
    asyncio.run(asyncio.wait_for(_coordinator_health(), 30))


async def _coordinator_health() -> None:
    health = Health(COORDINATOR_SERVICE)
    await health.set(False)
    server = aio.server()
    add_health_and_reflection(server, health, [COORDINATOR_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    manager, recovery = _Manager(), _Recovery()
    keeper = asyncio.create_task(_keep_health(manager, recovery, health))  # type: ignore[arg-type]
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await asyncio.sleep(0.3)  # more than one turn of the keeper: still no pass
            for service in ("", COORDINATOR_SERVICE):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == NOT_SERVING
            recovery.passes = 1
            await _status_becomes(stub, SERVING)
            await _status_becomes(stub, SERVING, COORDINATOR_SERVICE)
            manager.draining = True
            await _status_becomes(stub, NOT_SERVING)
            await _status_becomes(stub, NOT_SERVING, COORDINATOR_SERVICE)
            manager.draining = False
            await _status_becomes(stub, SERVING)
            await health.shutting_down()
            await _status_becomes(stub, NOT_SERVING, COORDINATOR_SERVICE)
    finally:
        keeper.cancel()
        await server.stop(None)


# --- the metrics endpoint ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("metrics.internal", False),
    ],
)
def test_loopback_is_only_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsConfig, TlsConfig, Path]:
    """The daemon's TLS, a scraper's, and another CA's certificate (as a scraper's TLS)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory / "ca")
    daemon = ca.issue("coordinator")
    scraper = ca.issue("prometheus")
    return (
        TlsConfig(daemon.cert, daemon.key, ca.cert_path),
        TlsConfig(scraper.cert, scraper.key, ca.cert_path),
        directory,
    )


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("twopc_test_things", "things", registry=registry).inc(3)
    return registry


def _get(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310
        return str(response.read().decode())


def _refused(url: str, context: ssl.SSLContext | None = None) -> bool:
    """True when the request fails at the connection (a reset, a refused handshake)."""
    try:
        _get(url, context)
    except OSError:  # URLError, SSLError, ConnectionResetError: the server would not serve it
        return True
    return False


def test_metrics_on_loopback_are_plain_http(pki: tuple[TlsConfig, TlsConfig, Path]) -> None:
    daemon, _, _ = pki
    served = metrics_server("127.0.0.1:0", _registry(), daemon)
    assert served is not None
    try:
        assert not served.https
        assert "twopc_test_things_total 3.0" in _get(f"http://{served.address}/metrics")
    finally:
        served.close()


def test_metrics_beyond_loopback_need_a_certificate_of_the_ca(
    pki: tuple[TlsConfig, TlsConfig, Path],
) -> None:
    daemon, scraper, directory = pki
    served = metrics_server("0.0.0.0:0", _registry(), daemon)
    assert served is not None
    url = f"https://127.0.0.1:{served.port}/metrics"
    try:
        assert served.https
        trusting = ssl.create_default_context(cafile=str(daemon.ca))
        assert _refused(f"http://127.0.0.1:{served.port}/metrics")  # plain HTTP is not served
        assert _refused(url, trusting)  # no client certificate
        stranger_ca = CertificateAuthority.create(directory / "stranger")
        stranger = stranger_ca.issue("prometheus")
        other = ssl.create_default_context(cafile=str(daemon.ca))
        other.load_cert_chain(stranger.cert, stranger.key)
        assert _refused(url, other)  # a certificate another CA signed
        trusting.load_cert_chain(scraper.cert, scraper.key)
        assert "twopc_test_things_total 3.0" in _get(url, trusting)
    finally:
        served.close()


def test_metrics_beyond_loopback_in_plaintext_only_with_insecure_plaintext() -> None:
    served = metrics_server("0.0.0.0:0", _registry(), None)  # the daemon has no TLS
    assert served is not None
    try:
        assert not served.https
        assert "twopc_test_things_total" in _get(f"http://127.0.0.1:{served.port}/metrics")
    finally:
        served.close()


def test_no_metrics_listen_serves_nothing() -> None:
    assert metrics_server("", _registry(), None) is None


@pytest.mark.parametrize("address", ["7100", "host:", ":9", "host:port", "host:70000"])
def test_metrics_listen_is_checked_in_both_configurations(address: str) -> None:
    with pytest.raises(ValueError, match="metrics_listen"):
        CoordinatorConfig(metrics_listen=address)
    with pytest.raises(ValueError, match="metrics_listen"):
        AgentConfig(metrics_listen=address)


# --- trace context: the SDK sends it, a server extracts it --------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A recording tracer for ``twopc.tracing`` (the servers' spans) in place of the global
    no-op one, and the exporter that holds what it recorded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("twopc"))
    monkeypatch.setattr(tracing, "_recording", lambda: True)
    yield exporter
    provider.shutdown()


class _Coordinator(pb_grpc.CoordinatorServicer):
    """Answers Begin inside ``tracing.span``, as the coordinator does; records the metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def _begin(self, context: Any) -> pb.BeginResponse:
        metadata = context.invocation_metadata()
        self.metadata.append({key: value for key, value in metadata if isinstance(value, str)})
        with tracing.span("twopc.Coordinator/Begin", metadata):
            tracing.set_txid("c1.r-traced")
        return pb.BeginResponse(txid="c1.r-traced", timeout_ms=1000)


class _SyncCoordinator(_Coordinator):
    def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        return self._begin(context)


class _AsyncCoordinator(_Coordinator):
    async def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        return self._begin(context)


def _check_one_child_of(
    app: trace.Span, exporter: InMemorySpanExporter, servicer: _Coordinator
) -> None:
    parent = app.get_span_context()
    traceparent = servicer.metadata[-1]["traceparent"]
    assert traceparent.startswith(f"00-{parent.trace_id:032x}-{parent.span_id:016x}-")
    (server_span,) = exporter.get_finished_spans()
    assert server_span.name == "twopc.Coordinator/Begin"
    assert server_span.context is not None
    assert server_span.parent is not None
    assert server_span.context.trace_id == parent.trace_id
    assert server_span.parent.span_id == parent.span_id
    assert server_span.kind is trace.SpanKind.SERVER
    assert dict(server_span.attributes or {}) == {"twopc.txid": "c1.r-traced"}


def test_the_blocking_client_sends_the_trace_context(spans: InMemorySpanExporter) -> None:
    servicer = _SyncCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    application = TracerProvider().get_tracer("application")
    try:
        with Client(f"127.0.0.1:{port}", insecure=True) as client:
            client.begin()  # no current span: no trace context sent
            assert "traceparent" not in servicer.metadata[-1]
            assert not spans.get_finished_spans()[0].parent
            spans.clear()
            with application.start_as_current_span("checkout") as app:
                client.begin()
        _check_one_child_of(app, spans, servicer)
    finally:
        server.stop(None)


def test_the_asyncio_client_sends_the_trace_context(spans: InMemorySpanExporter) -> None:
    asyncio.run(asyncio.wait_for(_asyncio_client_sends(spans), 30))


async def _asyncio_client_sends(spans: InMemorySpanExporter) -> None:
    servicer = _AsyncCoordinator()
    server = aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    application = TracerProvider().get_tracer("application")
    try:
        policy = RetryPolicy(attempts=1)
        async with AsyncClient(f"127.0.0.1:{port}", insecure=True, retry_policy=policy) as client:
            with application.start_as_current_span("checkout") as app:
                await client.begin()
        _check_one_child_of(app, spans, servicer)
    finally:
        await server.stop(None)


def test_a_span_names_the_error_class_and_never_its_message(spans: InMemorySpanExporter) -> None:
    """An error's message may quote the database's (a duplicate key's value)."""
    incoming = (("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),)
    secret = "Duplicate entry 'alice@example.com' for key 'email'"
    with (
        pytest.raises(StatementFailed),
        tracing.span("twopc.Participant/Execute", incoming, txid="c1.r-x"),
    ):
        raise StatementFailed(f"(1062) {secret}")
    with tracing.span("twopc.Coordinator/Commit", incoming):
        tracing.mark_error(TransactionAborted(f"voted no: {secret}"))
    failed, marked = spans.get_finished_spans()
    assert failed.attributes is not None
    assert failed.attributes["twopc.error"] == "StatementFailed"
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert failed.status.description == "StatementFailed"
    assert marked.attributes is not None
    assert marked.attributes["twopc.error"] == "TransactionAborted"
    for span in (failed, marked):
        assert "alice" not in span.to_json()
