"""The coordinator's Pipeline stream to an agent (coordinator.pipeline, coordinator.agents), against
fake Participant servicers on a real gRPC server on 127.0.0.1.

Each test runs one event loop that holds both the server and the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc import aio

from coordinator.agents import AgentClients
from coordinator.engine.ports import Vote
from coordinator.pipeline import AgentPipeline
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from twopc.pipeline_messages import split_by_size
from twopc.serving import channel

Context = aio.ServicerContext[object, object]


class PipelinedAgent(pb_grpc.ParticipantServicer):
    """Answers each prepare after ``delays[txid]`` seconds (0 by default) with a PREPARED vote;
    txid 'refused' gets a FAILED_PRECONDITION error answer, txid 'boom' breaks the stream."""

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}
        self.streams = 0
        self.messages = 0
        self.calls = 0
        self.answered: list[str] = []
        self.late_answered = asyncio.Event()

    async def Pipeline(  # type: ignore[override]
        self, requests: AsyncIterator[pb.PipelineRequest], context: Context
    ) -> None:
        self.streams += 1
        lock = asyncio.Lock()
        tasks = set()

        async def answer(call: pb.PipelineCall) -> None:
            txid = call.prepare.txid
            await asyncio.sleep(self.delays.get(txid, 0))
            if txid == "refused":
                reply = pb.PipelineAnswer(
                    id=call.id,
                    error=pb.CallError(
                        code="FAILED_PRECONDITION",
                        error_class="FailedPrecondition",
                        message="branch refused was rolled back",
                        txid=txid,
                        mysql_errno=1213,
                    ),
                )
            else:
                reply = pb.PipelineAnswer(
                    id=call.id, prepare=pb.PrepareResponse(vote=pb.VOTE_PREPARED, reason=txid)
                )
            async with lock:
                await context.write(pb.PipelineResponse(answers=[reply]))
            self.answered.append(txid)
            if txid == "late":
                self.late_answered.set()

        async for request in requests:
            self.messages += 1
            for call in request.calls:
                self.calls += 1
                if call.prepare.txid == "boom":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "agent went away")
                task = asyncio.ensure_future(answer(call))
                tasks.add(task)
        await asyncio.gather(*tasks)


class UnaryOnlyAgent(pb_grpc.ParticipantServicer):
    """An agent from before the Pipeline method: Prepare is unary only."""

    def __init__(self) -> None:
        self.prepares = 0

    async def Prepare(self, request: pb.PrepareRequest, context: Context) -> pb.PrepareResponse:
        self.prepares += 1
        return pb.PrepareResponse(vote=pb.VOTE_PREPARED)


def run_with_server(
    servicer: pb_grpc.ParticipantServicer, scenario: Callable[[str], Awaitable[None]]
) -> None:
    async def main() -> None:
        server = aio.server()
        pb_grpc.add_ParticipantServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(scenario(f"127.0.0.1:{port}"), timeout=20)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def prepare_call(txid: str) -> pb.PipelineCall:
    return pb.PipelineCall(prepare=pb.PrepareRequest(txid=txid, participant="eu"))


def test_answers_come_back_as_work_finishes_and_each_reaches_its_caller() -> None:
    agent = PipelinedAgent()
    agent.delays = {"slow": 0.3}

    async def scenario(address: str) -> None:
        pipeline = AgentPipeline("eu", pb_grpc.ParticipantStub(channel(address, None)))
        slow = asyncio.ensure_future(pipeline.call(prepare_call("slow"), 5))
        fast = await pipeline.call(prepare_call("fast"), 5)
        assert fast.prepare.reason == "fast"
        assert not slow.done(), "the fast call waited for the slow one"
        assert (await slow).prepare.reason == "slow"
        await pipeline.close()

    run_with_server(agent, scenario)
    assert agent.streams == 1


def test_calls_made_together_share_messages() -> None:
    agent = PipelinedAgent()

    async def scenario(address: str) -> None:
        pipeline = AgentPipeline("eu", pb_grpc.ParticipantStub(channel(address, None)))
        await pipeline.call(prepare_call("warm"), 5)  # the stream is open
        calls = [pipeline.call(prepare_call(f"t{i}"), 5) for i in range(50)]
        answers = await asyncio.gather(*calls)
        assert [a.prepare.reason for a in answers] == [f"t{i}" for i in range(50)]
        await pipeline.close()

    run_with_server(agent, scenario)
    assert agent.calls == 51
    assert agent.messages <= 3, f"50 calls made together took {agent.messages - 1} messages"


def test_an_error_answer_is_raised_as_the_error_it_names() -> None:
    async def scenario(address: str) -> None:
        pipeline = AgentPipeline("eu", pb_grpc.ParticipantStub(channel(address, None)))
        with pytest.raises(FailedPrecondition) as caught:
            await pipeline.call(prepare_call("refused"), 5)
        assert caught.value.message == "branch refused was rolled back"
        assert caught.value.txid == "refused"
        assert caught.value.mysql_errno == 1213
        await pipeline.close()

    run_with_server(PipelinedAgent(), scenario)


def test_a_broken_stream_fails_its_calls_with_unavailable_and_the_next_call_reopens_it() -> None:
    agent = PipelinedAgent()
    agent.delays = {"waiting": 5}

    async def scenario(address: str) -> None:
        pipeline = AgentPipeline("eu", pb_grpc.ParticipantStub(channel(address, None)))
        waiting = asyncio.ensure_future(pipeline.call(prepare_call("waiting"), 10))
        with pytest.raises(Unavailable):
            await pipeline.call(prepare_call("boom"), 5)
        with pytest.raises(Unavailable):
            await waiting  # on the same stream: its answer can no longer come
        answer = await pipeline.call(prepare_call("after"), 5)
        assert answer.prepare.reason == "after"
        await pipeline.close()

    run_with_server(agent, scenario)
    assert agent.streams == 2


def test_a_call_past_its_timeout_is_deadline_exceeded_and_its_late_answer_is_dropped() -> None:
    agent = PipelinedAgent()
    agent.delays = {"late": 0.4}

    async def scenario(address: str) -> None:
        pipeline = AgentPipeline("eu", pb_grpc.ParticipantStub(channel(address, None)))
        with pytest.raises(DeadlineExceeded):
            await pipeline.call(prepare_call("late"), 0.1)
        await agent.late_answered.wait()  # its answer arrives and finds nobody waiting
        assert (await pipeline.call(prepare_call("next"), 5)).prepare.reason == "next"
        await pipeline.close()

    run_with_server(agent, scenario)
    assert agent.streams == 1


def test_an_agent_without_the_pipeline_is_served_with_unary_calls() -> None:
    agent = UnaryOnlyAgent()

    async def scenario(address: str) -> None:
        clients = AgentClients({"eu": address}, None)
        for txid in ("c1.r-one", "c1.r-two"):
            reply = await clients.prepare("eu", txid, [], 1, 5)
            assert reply.vote is Vote.PREPARED
        await clients.close()

    run_with_server(agent, scenario)
    assert agent.prepares == 2


def test_large_calls_are_split_across_messages_in_order() -> None:
    calls = [pb.PipelineCall(id=i, prepare=pb.PrepareRequest(txid=f"t{i}")) for i in range(5)]
    assert [len(run) for run in split_by_size(calls, budget=10**6)] == [5]
    sizes = [call.ByteSize() for call in calls]
    runs = list(split_by_size(calls, budget=2 * max(sizes)))
    assert [[c.id for c in run] for run in runs] == [[0, 1], [2, 3], [4]]
    assert [len(run) for run in split_by_size(calls, budget=1)] == [1] * 5  # each alone
