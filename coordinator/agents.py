"""The coordinator's gRPC clients of the participant agents (``ParticipantPort`` over gRPC).

One persistent HTTP/2 channel per agent; on it, one long-lived stream carries the hot path's
Prepare and CommitMany calls (``coordinator.pipeline``) and the other calls are unary. Calls made
on behalf of a transaction (execute, prepare, commit) wait for the channel to connect, within the
transaction's time: an agent that restarts is reached as soon as it is back. Rollback, Recover and
Inspect fail fast: their callers have another way (the agent's deadline reaper, the next recovery
pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from grpc import aio

from coordinator.engine.ports import (
    CommitReply,
    Presence,
    Results,
    Statements,
    Vote,
    VoteReply,
    WaitEdge,
)
from coordinator.phase2 import CommitBatcher, Send
from coordinator.pipeline import AgentPipeline, PipelineUnsupported
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import Fenced, InvalidArgument
from twopc.serving import channel
from twopc.status import error_from_rpc
from twopc.tls import TlsConfig
from twopc.tracing import outgoing_metadata
from twopc.txid import txid_prefix

_VOTES = {
    pb.VOTE_PREPARED: Vote.PREPARED,
    pb.VOTE_READ_ONLY: Vote.READ_ONLY,
    pb.VOTE_ABORT: Vote.ABORT,
    pb.VOTE_ALREADY_COMMITTED: Vote.ALREADY_COMMITTED,
}
_PRESENCE = {
    pb.BRANCH_STATE_UNKNOWN: Presence.UNKNOWN,
    pb.BRANCH_STATE_ACTIVE: Presence.ACTIVE,
    pb.BRANCH_STATE_PREPARED: Presence.PREPARED,
    pb.BRANCH_STATE_COMMITTED: Presence.COMMITTED,
    pb.BRANCH_STATE_ROLLED_BACK: Presence.ROLLED_BACK,
}
_MIN_TIMEOUT_S = 0.001
T = TypeVar("T")


class AgentClients:
    """Clients of the agents at ``addresses`` (participant name -> host:port), over mutual TLS
    with ``tls`` (the coordinator's certificate is its identity towards them), or in plaintext
    when ``tls`` is None.

    Every call that changes a branch carries ``epoch``, the lease epoch under which this
    coordinator acts for ``coordinator_id`` (0 without a lease), and so does a Recover of that
    id's prefix (the agent then lists only once no older epoch's call runs); a Recover of
    another prefix (an operator's listing) carries none. An agent that has seen a higher epoch
    refuses with ``Fenced``: ``on_fenced`` is told (the member steps down) before the error
    goes on.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        tls: TlsConfig | None,
        *,
        coordinator_id: str = "",
        epoch: int = 0,
        on_fenced: Callable[[str], None] | None = None,
    ) -> None:
        if not addresses:
            raise InvalidArgument(
                "no participants configured: set participants = { name = address }"
            )
        self._names = tuple(sorted(addresses))
        self._channels: dict[str, aio.Channel] = {n: channel(a, tls) for n, a in addresses.items()}
        self._stubs = {n: pb_grpc.ParticipantStub(c) for n, c in self._channels.items()}
        self._pipelines = {n: AgentPipeline(n, stub) for n, stub in self._stubs.items()}
        self._batchers = {n: CommitBatcher(n, self._sender(n)) for n in self._names}
        self._epoch = epoch
        self._own_prefix = txid_prefix(coordinator_id) if coordinator_id else None
        self._on_fenced = on_fenced

    @property
    def epoch(self) -> int:
        return self._epoch

    def names(self) -> Sequence[str]:
        return self._names

    def _sender(self, participant: str) -> Send:
        async def send(request: pb.CommitManyRequest, timeout: float) -> pb.CommitManyResponse:
            request.epoch = self._epoch
            pipeline = self._pipelines[participant]
            if not pipeline.unsupported:
                with contextlib.suppress(PipelineUnsupported):
                    piped = await pipeline.call(pb.PipelineCall(commit_many=request), timeout)
                    return piped.commit_many
            stub = self._stubs[participant]
            reply: pb.CommitManyResponse = await self._call(
                stub.CommitMany, request, timeout, wait=True
            )
            return reply

        return send

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        for pipeline in self._pipelines.values():
            await pipeline.close()
        for ch in self._channels.values():
            await ch.close(grace=None)

    async def execute(
        self,
        participant: str,
        txid: str,
        statements: Statements,
        sequence: int,
        timeout: float,
        *,
        continues: bool = False,
    ) -> Results:
        request = pb.BranchExecuteRequest(
            txid=txid,
            participant=participant,
            statements=statements,  # type: ignore[arg-type]
            sequence=sequence,
            timeout_ms=_ms(timeout),
            continues=continues,
            epoch=self._epoch,
        )
        reply = await self._call(self._stubs[participant].Execute, request, timeout, wait=True)
        return list(reply.results)

    async def prepare(
        self, participant: str, txid: str, statements: Statements, sequence: int, timeout: float
    ) -> VoteReply:
        request = pb.PrepareRequest(
            txid=txid,
            participant=participant,
            statements=statements,  # type: ignore[arg-type]
            sequence=sequence,
            timeout_ms=_ms(timeout),
            epoch=self._epoch,
        )
        reply = await self._watch(self._prepare(participant, request, timeout))
        return VoteReply(
            _VOTES.get(reply.vote, Vote.ABORT), reply.reason, reply.mysql_errno, list(reply.results)
        )

    async def _prepare(
        self, participant: str, request: pb.PrepareRequest, timeout: float
    ) -> pb.PrepareResponse:
        pipeline = self._pipelines[participant]
        if not pipeline.unsupported:
            with contextlib.suppress(PipelineUnsupported):
                # The stream's own metadata is the first caller's: each call carries its own.
                call = pb.PipelineCall(
                    prepare=request, trace_context=dict(outgoing_metadata() or ())
                )
                piped = await pipeline.call(call, timeout)
                return piped.prepare
        reply: pb.PrepareResponse = await self._call(
            self._stubs[participant].Prepare, request, timeout, wait=True
        )
        return reply

    async def commit(
        self,
        participant: str,
        txid: str,
        *,
        one_phase: bool,
        statements: Statements = (),
        sequence: int = 0,
        timeout: float,
    ) -> CommitReply:
        if not one_phase and not statements:
            # phase 2, batched
            return await self._watch(self._batchers[participant].commit(txid, timeout))
        request = pb.BranchCommitRequest(
            txid=txid,
            participant=participant,
            one_phase=one_phase,
            statements=statements,  # type: ignore[arg-type]
            sequence=sequence,
            timeout_ms=_ms(timeout),
            epoch=self._epoch,
        )
        reply = await self._call(self._stubs[participant].Commit, request, timeout, wait=True)
        return CommitReply(list(reply.results), reply.already_committed)

    async def rollback(self, participant: str, txid: str, timeout: float) -> bool:
        request = pb.BranchRollbackRequest(txid=txid, participant=participant, epoch=self._epoch)
        reply = await self._call(self._stubs[participant].Rollback, request, timeout)
        return bool(reply.already_rolled_back)

    async def recover(self, participant: str, txid_prefix: str, timeout: float) -> list[str]:
        epoch = self._epoch if txid_prefix == self._own_prefix else 0
        request = pb.RecoverRequest(txid_prefix=txid_prefix, epoch=epoch)
        reply = await self._call(self._stubs[participant].Recover, request, timeout)
        return [b.txid for b in reply.branches]

    async def inspect(
        self, participant: str, txids: Sequence[str], timeout: float
    ) -> dict[str, Presence]:
        request = pb.InspectRequest(txids=list(txids))
        reply = await self._call(self._stubs[participant].Inspect, request, timeout)
        return {b.txid: _PRESENCE.get(b.state, Presence.UNKNOWN) for b in reply.branches}

    async def waits_for(self, participant: str, min_wait_ms: int, timeout: float) -> list[WaitEdge]:
        request = pb.WaitsForRequest(min_wait_ms=min_wait_ms)
        reply = await self._call(self._stubs[participant].WaitsFor, request, timeout)
        return [
            WaitEdge(e.waiter_txid, e.holder_txid, participant, e.waited_ms) for e in reply.edges
        ]

    async def _call(self, method: Any, request: Any, timeout: float, *, wait: bool = False) -> Any:
        try:
            return await method(
                request,
                timeout=max(timeout, _MIN_TIMEOUT_S),
                wait_for_ready=wait,
                metadata=outgoing_metadata(),  # the call's trace context, if any
            )
        except grpc.RpcError as err:
            error = error_from_rpc(err)
            if isinstance(error, Fenced):
                self._fenced(error)
            raise error from err

    async def _watch(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except Fenced as err:
            self._fenced(err)
            raise

    def _fenced(self, err: Fenced) -> None:
        if self._on_fenced is not None:
            self._on_fenced(err.message)


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
