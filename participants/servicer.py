"""The gRPC face of the agent: protobuf in, ``Agent`` calls on the event loop, protobuf out.

A request is bounded here before anything is decoded (``twopc.limits``: statements, parameters,
characters of SQL; txids per CommitMany and Inspect), and its parameters are decoded
(``twopc.values``, which refuses what MySQL cannot hold) before the agent touches a branch: what
is refused is InvalidArgument, and nothing of the request was done. Only a txid of a txid's form
is echoed, in a log line or an error. Every ``TwopcError`` becomes a status here, and nothing
else does. An agent call runs to its end even when its caller goes away (a cancelled RPC, a
broken stream): stopping it halfway would leave a branch between two states, its session in the
middle of a statement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from grpc import aio

from participants.agent import Agent
from participants.calls import StatementRequest
from participants.metrics import AgentMetrics
from participants.xa import StatementOutput
from twopc import tracing
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import Internal, InvalidArgument, TwopcError
from twopc.limits import RequestLimits
from twopc.logs import redact
from twopc.pipeline_messages import split_by_size
from twopc.status import abort_with
from twopc.txid import is_txid, parse_txid
from twopc.values import from_values, to_values
from twopc.votes import Presence, Vote

T = TypeVar("T")
Context = aio.ServicerContext[object, object]

_VOTES = {
    Vote.PREPARED: pb.VOTE_PREPARED,
    Vote.READ_ONLY: pb.VOTE_READ_ONLY,
    Vote.ABORT: pb.VOTE_ABORT,
    Vote.ALREADY_COMMITTED: pb.VOTE_ALREADY_COMMITTED,
}
_PRESENCE = {
    Presence.UNKNOWN: pb.BRANCH_STATE_UNKNOWN,
    Presence.ACTIVE: pb.BRANCH_STATE_ACTIVE,
    Presence.PREPARED: pb.BRANCH_STATE_PREPARED,
    Presence.COMMITTED: pb.BRANCH_STATE_COMMITTED,
    Presence.ROLLED_BACK: pb.BRANCH_STATE_ROLLED_BACK,
}


def statement_requests(statements: Sequence[pb.Statement]) -> list[StatementRequest]:
    """The statements with their parameters decoded; InvalidArgument naming the first statement
    with a parameter that is refused (``twopc.values``: one MySQL cannot hold), before the agent
    touches a branch."""
    requests = []
    for index, statement in enumerate(statements, 1):
        try:
            params = from_values(statement.params)
        except InvalidArgument as err:
            raise InvalidArgument(f"statement {index}: {err.message}") from None
        requests.append(StatementRequest(statement.sql, params))
    return requests


def statement_results(outputs: Sequence[StatementOutput]) -> list[pb.StatementResult]:
    return [
        pb.StatementResult(
            affected_rows=o.affected_rows,
            last_insert_id=o.last_insert_id,
            columns=o.columns,
            rows=[pb.Row(values=to_values(row)) for row in o.rows],
        )
        for o in outputs
    ]


class ParticipantServicer(pb_grpc.ParticipantServicer):
    def __init__(
        self,
        agent: Agent,
        *,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agent = agent
        self._metrics = metrics
        self._clock = clock
        self._limits: RequestLimits = agent.config.request_limits()
        self._max_batch = agent.config.max_batch_txids
        self._log = structlog.get_logger("twopc.agent.rpc")
        self._stopping = asyncio.Event()

    async def Execute(
        self, request: pb.BranchExecuteRequest, context: Context
    ) -> pb.BranchExecuteResponse:
        async def run() -> pb.BranchExecuteResponse:
            outputs = await self._agent.execute(
                request.txid,
                request.participant,
                self._statements(request.statements),
                request.sequence,
                request.timeout_ms,
                continues=request.continues,
                epoch=request.epoch,
            )
            return pb.BranchExecuteResponse(results=statement_results(outputs))

        return await self._call(context, request.txid, run, "Execute")

    async def Prepare(self, request: pb.PrepareRequest, context: Context) -> pb.PrepareResponse:
        return await self._call(context, request.txid, lambda: self._prepare(request), "Prepare")

    async def _prepare(self, request: pb.PrepareRequest) -> pb.PrepareResponse:
        result = await self._agent.prepare(
            request.txid,
            request.participant,
            self._statements(request.statements),
            request.sequence,
            request.timeout_ms,
            epoch=request.epoch,
        )
        return pb.PrepareResponse(
            vote=_VOTES[result.vote],
            reason=result.reason,
            mysql_errno=result.mysql_errno,
            results=statement_results(result.outputs),
        )

    async def Commit(
        self, request: pb.BranchCommitRequest, context: Context
    ) -> pb.BranchCommitResponse:
        async def run() -> pb.BranchCommitResponse:
            result = await self._agent.commit(
                request.txid,
                request.participant,
                one_phase=request.one_phase,
                statements=self._statements(request.statements),
                sequence=request.sequence,
                timeout_ms=request.timeout_ms,
                epoch=request.epoch,
            )
            return pb.BranchCommitResponse(
                results=statement_results(result.outputs),
                already_committed=result.already_committed,
            )

        return await self._call(context, request.txid, run, "Commit")

    async def CommitMany(
        self, request: pb.CommitManyRequest, context: Context
    ) -> pb.CommitManyResponse:
        return await self._call(context, "", lambda: self._commit_many(request), "CommitMany")

    async def _commit_many(self, request: pb.CommitManyRequest) -> pb.CommitManyResponse:
        self._check_batch(request.txids, "CommitMany")

        async def commit(txid: str) -> pb.BranchOutcome:
            try:
                result = await self._agent.commit(
                    txid, request.participant, one_phase=False, epoch=request.epoch
                )
            except TwopcError as err:
                return pb.BranchOutcome(
                    txid=txid,
                    error_code=err.code,
                    error_class=type(err).__name__,
                    error_message=err.message,
                )
            except Exception as err:
                self._log.exception("rpc_crashed", txid=txid)
                return pb.BranchOutcome(
                    txid=txid,
                    error_code="INTERNAL",
                    error_class="Internal",
                    error_message=f"agent error: {type(err).__name__}: {err}",
                )
            return pb.BranchOutcome(txid=txid, already_committed=result.already_committed)

        # Concurrently: each commit is an fsync on the server, and concurrent ones share them.
        outcomes = await asyncio.gather(*(commit(txid) for txid in request.txids))
        return pb.CommitManyResponse(outcomes=outcomes)

    async def Pipeline(  # type: ignore[override]
        self, requests: AsyncIterator[pb.PipelineRequest], context: Context
    ) -> None:
        """Serves the stream until the coordinator closes it or the agent stops. Each call runs
        as its own task, which nothing cancels (so it needs no shield: a broken stream only
        loses its answer); one writer sends the answers, all that are ready in one message (it
        answers with ``context.write``; the stub's type expects a generator of answers)."""
        ready: asyncio.Queue[pb.PipelineAnswer | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(call: pb.PipelineCall) -> None:
            ready.put_nowait(await self._pipeline_answer(call))

        async def read() -> None:
            async for request in requests:
                for call in request.calls:
                    task = asyncio.ensure_future(answer(call))
                    running.add(task)
                    task.add_done_callback(running.discard)

        async def write() -> None:
            finished = False
            while not finished:
                answers: list[pb.PipelineAnswer] = []
                item = await ready.get()
                await asyncio.sleep(0)  # one turn of the loop: answers ready in it share a message
                while item is not None:
                    answers.append(item)
                    if ready.empty():
                        break
                    item = ready.get_nowait()
                finished = item is None
                for part in split_by_size(answers):
                    try:
                        await context.write(pb.PipelineResponse(answers=part))
                    except Exception as err:  # the stream is gone: its caller sees it broken
                        self._log.debug("pipeline_answers_lost", count=len(part), error=str(err))
                        return

        reader = asyncio.ensure_future(read())
        writer = asyncio.ensure_future(write())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((reader, writer, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            stopping.cancel()
            if running:  # work already handed to the database is answered before the end
                await asyncio.wait(running)
            ready.put_nowait(None)
            await asyncio.wait((writer,))

    async def _pipeline_answer(self, call: pb.PipelineCall) -> pb.PipelineAnswer:
        started = self._clock()
        answer = await self._pipeline_answer_now(call)
        if self._metrics is not None:
            method = {"prepare": "Prepare", "commit_many": "CommitMany"}.get(
                call.WhichOneof("call") or "", ""
            )
            code = answer.error.code if answer.WhichOneof("result") == "error" else ""
            self._metrics.call(method, self._clock() - started, code)
        return answer

    async def _pipeline_answer_now(self, call: pb.PipelineCall) -> pb.PipelineAnswer:
        kind = call.WhichOneof("call")
        txid = call.prepare.txid if kind == "prepare" and is_txid(call.prepare.txid) else ""
        try:
            if kind == "prepare":
                with tracing.span(
                    "twopc.Participant/Prepare",
                    call.trace_context.items(),
                    txid=txid,
                    participant=self._agent.name,
                ):
                    prepared = await self._prepare(call.prepare)
                return pb.PipelineAnswer(id=call.id, prepare=prepared)
            if kind == "commit_many":
                committed = await self._commit_many(call.commit_many)
                return pb.PipelineAnswer(id=call.id, commit_many=committed)
            error: TwopcError = InvalidArgument(
                "a pipeline call carries no request (prepare or commit_many); is the "
                "coordinator newer than this agent?"
            )
        except TwopcError as err:
            error = err
        except Exception as err:
            self._log.exception("rpc_crashed", txid=txid)
            error = Internal(f"agent error: {type(err).__name__}: {err}", txid=txid)
        if error.code in ("INTERNAL", "UNKNOWN"):
            self._log.error("rpc_failed", txid=txid, error=redact(error.message))
        return pb.PipelineAnswer(
            id=call.id,
            error=pb.CallError(
                code=error.code,
                error_class=type(error).__name__,
                message=error.message,
                txid=error.txid if is_txid(error.txid) else txid,
                mysql_errno=error.mysql_errno,
            ),
        )

    def stop(self) -> None:
        """Ends every open pipeline once its work in flight is answered (the agent stops)."""
        self._stopping.set()

    async def Rollback(
        self, request: pb.BranchRollbackRequest, context: Context
    ) -> pb.BranchRollbackResponse:
        async def run() -> pb.BranchRollbackResponse:
            already = await self._agent.rollback(
                request.txid, request.participant, epoch=request.epoch
            )
            return pb.BranchRollbackResponse(already_rolled_back=already)

        return await self._call(context, request.txid, run, "Rollback")

    async def Recover(self, request: pb.RecoverRequest, context: Context) -> pb.RecoverResponse:
        async def run() -> pb.RecoverResponse:
            branches = await self._agent.recover(request.txid_prefix, epoch=request.epoch)
            return pb.RecoverResponse(
                branches=[
                    pb.PreparedBranch(
                        txid=b.xid.txid,
                        participant=b.xid.branch,
                        held_by_this_agent=b.held_by_this_agent,
                    )
                    for b in branches
                ]
            )

        return await self._call(context, "", run, "Recover")

    async def Inspect(self, request: pb.InspectRequest, context: Context) -> pb.InspectResponse:
        async def run() -> pb.InspectResponse:
            self._check_batch(request.txids, "Inspect")
            states = await self._agent.inspect(list(request.txids))
            return pb.InspectResponse(
                branches=[
                    pb.BranchStatus(txid=txid, state=_PRESENCE[state])
                    for txid, state in states.items()
                ]
            )

        return await self._call(context, "", run, "Inspect")

    async def WaitsFor(self, request: pb.WaitsForRequest, context: Context) -> pb.WaitsForResponse:
        async def run() -> pb.WaitsForResponse:
            reports = await self._agent.waits_for(request.min_wait_ms)
            if reports and self._metrics is not None:
                self._metrics.lock_wait_edges_reported(len(reports))
            return pb.WaitsForResponse(
                edges=[
                    pb.WaitEdge(
                        waiter_txid=r.waiter_txid,
                        holder_txid=r.holder_txid,
                        holder_thread_id=r.holder_thread_id,
                        holder_state=r.holder_state,
                        waited_ms=r.waited_ms,
                    )
                    for r in reports
                ]
            )

        return await self._call(context, "", run, "WaitsFor")

    async def GetInfo(self, request: pb.GetInfoRequest, context: Context) -> pb.AgentInfo:
        active, prepared = self._agent.counts()
        return pb.AgentInfo(
            participant=self._agent.name,
            server_version=self._agent.server_version,
            agent_instance=self._agent.instance_id,
            active_branches=active,
            prepared_branches=prepared,
        )

    def _statements(self, statements: Sequence[pb.Statement]) -> list[StatementRequest]:
        """The request's statements, bounded and decoded (InvalidArgument: nothing was done)."""
        self._limits.check(statements, "this agent")
        return statement_requests(statements)

    def _check_batch(self, txids: Sequence[str], call: str) -> None:
        """A batch of txids is bounded, and each must be a txid, before any is looked at."""
        if len(txids) > self._max_batch:
            raise InvalidArgument(
                f"{call} carries {len(txids)} txids, more than the {self._max_batch} that this "
                "agent takes in one call (its max_batch_txids setting); split the batch"
            )
        for index, txid in enumerate(txids, 1):
            try:
                parse_txid(txid)
            except InvalidArgument as err:
                raise InvalidArgument(f"{call} txid {index}: {err.message}") from None

    async def _call(
        self, context: Context, txid: str, run: Callable[[], Awaitable[T]], method: str
    ) -> T:
        """Runs a call to its end (``_finish``), in a span of its own (the child of the trace
        context the coordinator sent, ``twopc.tracing``), measured; errors become statuses."""
        # Only a well-formed txid is echoed (in the logs and the trailing metadata).
        txid = txid if is_txid(txid) else ""
        started = self._clock()
        error: TwopcError | None = None
        try:
            with tracing.span(
                f"twopc.Participant/{method}",
                context.invocation_metadata(),
                txid=txid,
                participant=self._agent.name,
            ):
                try:
                    return await _finish(run())
                except TwopcError as err:
                    err.txid = err.txid or txid
                    if err.code in ("INTERNAL", "UNKNOWN"):
                        self._log.error("rpc_failed", txid=txid, error=redact(err.message))
                    error = err
                except Exception as err:
                    self._log.exception("rpc_crashed", txid=txid)
                    error = Internal(f"agent error: {type(err).__name__}: {err}", txid=txid)
                tracing.mark_error(error)
        finally:
            if self._metrics is not None:
                code = error.code if error is not None else ""
                self._metrics.call(method, self._clock() - started, code)
        await abort_with(context, error)
        raise AssertionError("unreachable: abort_with raises")


_unfinished: set[asyncio.Future[Any]] = set()  # held until done, whoever still awaits them


async def _finish(work: Awaitable[T]) -> T:
    """Awaits ``work``, which runs to its end even if this await is cancelled (the caller is
    then not answered; the branch is left in a state of the protocol)."""
    task = asyncio.ensure_future(work)
    _unfinished.add(task)
    task.add_done_callback(_forget)
    return await asyncio.shield(task)


def _forget(task: asyncio.Future[Any]) -> None:
    _unfinished.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an error nobody awaits any more is not reported twice
