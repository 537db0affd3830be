"""Phase-2 commits batched per agent: few calls when busy, no waiting when idle, every branch
answered on its own."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.engine.ports import CommitReply
from coordinator.phase2 import CommitBatcher
from twopc.api import twopc_pb2 as pb
from twopc.errors import FailedPrecondition, Unavailable


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.called = asyncio.Event()  # a call has reached the agent
        self.release = asyncio.Event()
        self.fail_call: Unavailable | None = None
        self.refuse: set[str] = set()

    async def send(self, request: pb.CommitManyRequest, timeout: float) -> pb.CommitManyResponse:
        self.calls.append(list(request.txids))
        self.called.set()
        await self.release.wait()
        if self.fail_call is not None:
            raise self.fail_call
        outcomes = []
        for txid in request.txids:
            if txid in self.refuse:
                outcomes.append(
                    pb.BranchOutcome(
                        txid=txid,
                        error_code="FAILED_PRECONDITION",
                        error_class="FailedPrecondition",
                        error_message=f"branch {txid} was rolled back",
                    )
                )
            else:
                outcomes.append(pb.BranchOutcome(txid=txid, already_committed=txid.endswith("9")))
        return pb.CommitManyResponse(outcomes=outcomes)


def test_commits_queued_while_a_call_is_in_flight_share_the_next_call() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        batcher = CommitBatcher("eu", agent.send)
        first = asyncio.ensure_future(batcher.commit("c1.t0", 5))
        await asyncio.sleep(0)  # the first call is in flight
        rest = [asyncio.ensure_future(batcher.commit(f"c1.t{i}", 5)) for i in range(1, 100)]
        await asyncio.sleep(0)
        agent.release.set()
        replies = await asyncio.gather(first, *rest)
        assert [len(c) for c in agent.calls] == [1, 99]
        assert replies[9] == CommitReply(already_committed=True)
        assert replies[1] == CommitReply(already_committed=False)

    asyncio.run(scenario())


def test_batches_are_capped() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        agent.release.set()
        batcher = CommitBatcher("eu", agent.send, max_batch=10)
        await asyncio.gather(*(batcher.commit(f"c1.t{i}", 5) for i in range(35)))
        assert [len(c) for c in agent.calls] == [10, 10, 10, 5]

    asyncio.run(scenario())


def test_each_branch_gets_its_own_answer_and_error() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        agent.release.set()
        agent.refuse = {"c1.t2"}
        batcher = CommitBatcher("eu", agent.send)
        results = await asyncio.gather(
            *(batcher.commit(f"c1.t{i}", 5) for i in range(4)), return_exceptions=True
        )
        assert isinstance(results[2], FailedPrecondition)
        assert results[2].txid == "c1.t2"
        assert all(isinstance(r, CommitReply) for i, r in enumerate(results) if i != 2)

    asyncio.run(scenario())


def test_a_failed_call_fails_every_commit_of_its_batch_with_its_own_txid() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        agent.release.set()
        agent.fail_call = Unavailable("agent eu is unreachable")
        batcher = CommitBatcher("eu", agent.send)
        results = await asyncio.gather(
            *(batcher.commit(f"c1.t{i}", 5) for i in range(3)), return_exceptions=True
        )
        assert [type(r) for r in results] == [Unavailable] * 3
        assert [r.txid for r in results if isinstance(r, Unavailable)] == [
            "c1.t0",
            "c1.t1",
            "c1.t2",
        ]
        await batcher.close()

    asyncio.run(scenario())


def test_an_idle_batcher_sends_a_lone_commit_at_once() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        agent.release.set()
        batcher = CommitBatcher("eu", agent.send)
        async with asyncio.timeout(1):
            assert await batcher.commit("c1.t1", 5) == CommitReply()
        assert agent.calls == [["c1.t1"]]

    asyncio.run(scenario())


def _batcher_tasks() -> list[asyncio.Task[object]]:
    """The batcher's own tasks still running (its private coroutines; callers run ``commit``)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith("CommitBatcher._")
    ]


@pytest.mark.parametrize("count", [1, 7])
@pytest.mark.parametrize("answered", [True, False], ids=["answered", "call-in-flight"])
def test_close_leaves_nothing_running(count: int, answered: bool) -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        batcher = CommitBatcher("eu", agent.send)
        commits = [asyncio.ensure_future(batcher.commit(f"c1.t{i}", 5)) for i in range(count)]
        async with asyncio.timeout(1):
            await agent.called.wait()
        assert agent.calls == [[f"c1.t{i}" for i in range(count)]]
        assert len(_batcher_tasks()) == 1  # the call is in flight from the batcher's task
        if answered:
            agent.release.set()
            await asyncio.gather(*commits)

        await batcher.close()

        assert _batcher_tasks() == []
        # Nothing pending: every commit has its answer; one cut off by close is Unavailable (its
        # outcome is not known here), never a CancelledError its caller did not ask for.
        _, pending = await asyncio.wait(commits, timeout=1)
        assert not pending
        assert not any(c.cancelled() for c in commits)
        assert all(isinstance(c.exception(), Unavailable) != answered for c in commits)

    asyncio.run(scenario())


def test_close_answers_the_commits_queued_behind_the_call_in_flight() -> None:
    async def scenario() -> None:
        agent = FakeAgent()
        batcher = CommitBatcher("eu", agent.send, max_batch=2)
        commits = [asyncio.ensure_future(batcher.commit(f"c1.t{i}", 5)) for i in range(5)]
        async with asyncio.timeout(1):
            await agent.called.wait()
        await batcher.close()
        _, pending = await asyncio.wait(commits, timeout=0.2)
        for commit in pending:
            commit.cancel()
        assert not pending, f"{len(pending)} commits left waiting after close"
        for commit in commits:
            assert isinstance(commit.exception(), Unavailable)

    asyncio.run(scenario())
