"""One long-lived gRPC stream per agent that carries the hot path's calls (Prepare, CommitMany).

A message on an open stream costs about a third of the CPU of a unary call (PERFORMANCE.md), and
the coordinator makes one Prepare per branch. ``AgentPipeline`` tags each request with an id,
sends it on the stream and waits, within the caller's time, for the answer with that id; answers
come in the order the agent finishes them, so a branch waiting on a lock holds up no other.

The stream is opened on first use and again after it breaks. When it breaks, every call still
waiting on it fails with ``Unavailable``, as a unary call on a broken connection does: the caller
cannot know whether the request was carried out, and the protocol treats it so. A request whose
caller has given up before the stream could take it is not sent. An agent that does not know the
stream (UNIMPLEMENTED) raises ``PipelineUnsupported`` once, and the caller goes unary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import (
    DeadlineExceeded,
    TwopcError,
    Unavailable,
    error_class_named,
    error_for_code,
)
from twopc.pipeline_messages import split_by_size
from twopc.status import error_from_rpc

log = structlog.get_logger("twopc.coordinator.pipeline")


class PipelineUnsupported(Exception):
    """The agent has no Pipeline method (an older version): nothing was carried out."""


_Outbox = asyncio.Queue[tuple[pb.PipelineCall, asyncio.Future[pb.PipelineAnswer]] | None]


class _Stream:
    """One open Pipeline call: its requests waiting to be written, its calls waiting for answers."""

    def __init__(self, participant: str, stub: pb_grpc.ParticipantStub) -> None:
        self.participant = participant
        self.outbox: _Outbox = asyncio.Queue()
        self.waiting: dict[int, asyncio.Future[pb.PipelineAnswer]] = {}
        self.broken: BaseException | None = None
        pipeline: Any = stub.Pipeline  # typed for the sync API; this is the asyncio one
        self.call: Any = pipeline(self._requests(), wait_for_ready=True)
        self.reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[pb.PipelineRequest]:
        """Every call that is waiting when the stream can take a message goes in that message;
        a call whose caller has given up is left out."""
        while True:
            calls: list[pb.PipelineCall] = []
            item = await self.outbox.get()
            await asyncio.sleep(0)  # one turn of the loop: calls made in it share the message
            while item is not None:
                call, reply = item
                if not reply.done():
                    calls.append(call)
                if self.outbox.empty():
                    break
                item = self.outbox.get_nowait()
            for part in split_by_size(calls):
                yield pb.PipelineRequest(calls=part)
            if item is None:
                return

    async def _read(self) -> None:
        error: BaseException
        try:
            async for response in self.call:
                for answer in response.answers:
                    reply = self.waiting.pop(answer.id, None)
                    if reply is not None and not reply.done():
                        reply.set_result(answer)
            error = Unavailable(f"agent {self.participant} closed the pipeline (it is stopping)")
        except grpc.RpcError as err:
            error = (
                PipelineUnsupported(str(err))
                if err.code() == grpc.StatusCode.UNIMPLEMENTED
                else error_from_rpc(err)
            )
        except asyncio.CancelledError:
            error = Unavailable(f"the pipeline to agent {self.participant} was closed")
        except Exception as err:  # a broken stream must not take the coordinator with it
            log.exception("pipeline_read_failed", participant=self.participant)
            error = Unavailable(f"the pipeline to agent {self.participant} failed: {err}")
        self.broken = error
        waiting, self.waiting = self.waiting, {}
        for reply in waiting.values():
            if not reply.done():
                reply.set_exception(_copy(error))

    def send(self, call: pb.PipelineCall) -> asyncio.Future[pb.PipelineAnswer]:
        reply: asyncio.Future[pb.PipelineAnswer] = asyncio.get_running_loop().create_future()
        self.waiting[call.id] = reply
        self.outbox.put_nowait((call, reply))
        return reply

    def forget(self, request_id: int) -> None:
        self.waiting.pop(request_id, None)

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class AgentPipeline:
    def __init__(self, participant: str, stub: pb_grpc.ParticipantStub) -> None:
        self._participant = participant
        self._stub = stub
        self._stream: _Stream | None = None
        self._ids = itertools.count(1)
        self.unsupported = False

    async def call(self, call: pb.PipelineCall, timeout: float) -> pb.PipelineAnswer:
        """Sends ``call`` (its id is set here) and returns the agent's answer. A ``CallError``
        answer is raised as the ``TwopcError`` it names; a timeout is ``DeadlineExceeded``."""
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = self._stream = _Stream(self._participant, self._stub)
        call.id = next(self._ids)
        reply = stream.send(call)
        try:
            response = await asyncio.wait_for(reply, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"agent {self._participant} did not answer within {timeout:.3g} s"
            ) from None
        except PipelineUnsupported:
            self.unsupported = True
            raise
        finally:
            stream.forget(call.id)
        if response.WhichOneof("result") == "error":
            raise _error_of(response.error)
        return response

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None


def _error_of(error: pb.CallError) -> TwopcError:
    cls = error_class_named(error.error_class) or error_for_code(error.code)
    return cls(error.message, txid=error.txid, mysql_errno=error.mysql_errno)


def _copy(error: BaseException) -> BaseException:
    """A fresh exception per waiting call (one raised object must not be shared by tasks)."""
    if isinstance(error, TwopcError):
        return type(error)(error.message, txid=error.txid, mysql_errno=error.mysql_errno)
    if isinstance(error, PipelineUnsupported):
        return PipelineUnsupported(str(error))
    return Unavailable(str(error))
