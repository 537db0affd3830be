"""Trace context across twopc's hops (OpenTelemetry, W3C ``traceparent``), when it is installed.

The SDK puts the caller's current trace context into the metadata of every request it sends to
the coordinator; the coordinator opens a span per call (Begin, Execute, Commit, Rollback,
RunTransaction, GetTransaction) as a child of it, and sends the context on to the agents, which
open theirs: in the metadata of a unary call, in ``PipelineCall.trace_context`` for a Prepare on
the pipeline stream (a batched phase-2 CommitMany carries none). Spans carry the txid
(``twopc.txid``), the participant and the call's name, never SQL, parameters or rows.

``opentelemetry-api`` is optional (``pip install 'twopc[tracing]'``; the daemons' extras have
it): without it every function here does nothing. With the API and no SDK configured, spans are
no-ops, but the context is still carried from hop to hop. An operator who wants spans exported
configures an OpenTelemetry SDK in the daemon's process (``opentelemetry-instrument``), or sets
``trace_file``, which writes each finished span as one JSON line (for a look, and the tests).

This module needs neither grpc nor a daemon's dependencies: the SDK imports it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


def _load() -> tuple[Any, Any]:
    """The OpenTelemetry API's propagate and trace modules; (None, None) when it is absent
    (the SDK's base install: grpcio and protobuf only)."""
    try:
        from opentelemetry import propagate, trace  # noqa: PLC0415 (optional)
    except ImportError:
        return None, None
    return propagate, trace


propagate, trace = _load()

__all__ = [
    "ERROR_ATTRIBUTE",
    "PARTICIPANT_ATTRIBUTE",
    "TXID_ATTRIBUTE",
    "available",
    "export_to_file",
    "mark_error",
    "outgoing_metadata",
    "set_txid",
    "span",
]

TXID_ATTRIBUTE = "twopc.txid"
PARTICIPANT_ATTRIBUTE = "twopc.participant"
ERROR_ATTRIBUTE = "twopc.error"  # the class of the error a call ended with, never its message
_tracer: Tracer | None = trace.get_tracer("twopc") if trace is not None else None


def _recording() -> bool:
    """True when an OpenTelemetry SDK (a tracer provider of its own) is installed."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def available() -> bool:
    """True when the OpenTelemetry API is importable (context is carried)."""
    return trace is not None


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata (``traceparent``, ``tracestate``); None when
    there is none to send, or OpenTelemetry is not installed."""
    if propagate is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


@contextlib.contextmanager
def span(
    name: str,
    incoming: Iterable[tuple[str, Any]] | None = None,
    *,
    txid: str = "",
    participant: str = "",
) -> Iterator[None]:
    """A span named ``name``, current for the block: a server span, child of the context that
    ``incoming`` (the call's metadata) carries, if any; an internal one without ``incoming``.
    Its attributes are the txid and the participant, when given: nothing else (no SQL, no
    values). Does nothing without OpenTelemetry."""
    if _tracer is None or propagate is None or trace is None:
        yield
        return
    parent = None
    if incoming is not None:
        carrier = {key: value for key, value in incoming if isinstance(value, str)}
        if "traceparent" in carrier:
            parent = propagate.extract(carrier)
        elif not _recording():
            # No context to carry on and no SDK to record a span: a no-op span would cost a
            # few microseconds a call for nothing.
            yield
            return
    kind = trace.SpanKind.SERVER if incoming is not None else trace.SpanKind.INTERNAL
    # An error's message may quote the database's (a duplicate key's value): the span records
    # the error's class alone, never its message or traceback.
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes={
            key: value
            for key, value in ((TXID_ATTRIBUTE, txid), (PARTICIPANT_ATTRIBUTE, participant))
            if value
        },
        record_exception=False,
        set_status_on_exception=False,
    ):
        try:
            yield
        except BaseException as err:
            mark_error(err)
            raise


def mark_error(error: BaseException) -> None:
    """Marks the current span as ended in ``error``: its class only (the message may quote the
    database's)."""
    if trace is not None:
        current = trace.get_current_span()
        current.set_attribute(ERROR_ATTRIBUTE, type(error).__name__)
        current.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))


def set_txid(txid: str) -> None:
    """Names the txid on the current span, when it became known inside it (Begin)."""
    if trace is not None and txid:
        trace.get_current_span().set_attribute(TXID_ATTRIBUTE, txid)


def export_to_file(path: Path, service: str) -> None:
    """Installs an OpenTelemetry SDK tracer provider in this process that appends each finished
    span to ``path`` as one JSON line (name, trace and span ids, parent, attributes).

    Raises:
        RuntimeError: opentelemetry-sdk is not installed.
    """
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 (optional)
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError as err:
        raise RuntimeError(
            "trace_file needs the OpenTelemetry SDK: pip install opentelemetry-sdk"
        ) from err
    assert trace is not None  # the SDK depends on the API
    out = path.open("a", encoding="utf-8", buffering=1)  # open for the life of the process

    def line(finished: Any) -> str:
        context = finished.get_span_context()
        return (
            json.dumps(
                {
                    "name": finished.name,
                    "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}",
                    "parent_span_id": (
                        f"{finished.parent.span_id:016x}" if finished.parent is not None else None
                    ),
                    "service": service,
                    "attributes": dict(finished.attributes or {}),
                }
            )
            + "\n"
        )

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=line)))
    trace.set_tracer_provider(provider)
