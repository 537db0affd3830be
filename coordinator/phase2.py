"""Phase 2 in batches: the XA COMMITs of many transactions to one agent share one RPC.

A unary gRPC call costs about three times the CPU of the work it carries (PERFORMANCE.md), and
phase 2 sends one per branch. ``CommitBatcher`` queues commits per agent; while one CommitMany
call is in flight the next batch accumulates, like group commit in the decision log, so a single
commit waits for no timer and busy periods send few, large calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coordinator.engine.ports import CommitReply
from twopc.api import twopc_pb2 as pb
from twopc.errors import Internal, TwopcError, Unavailable, error_class_named, error_for_code

MAX_BATCH = 256

Send = Callable[[pb.CommitManyRequest, float], Awaitable[pb.CommitManyResponse]]


@dataclass
class _Waiting:
    txid: str
    timeout: float
    reply: asyncio.Future[CommitReply]


class CommitBatcher:
    """Batches phase-2 commits to one participant. ``send`` makes the CommitMany call and
    raises a ``TwopcError`` when the call as a whole fails."""

    def __init__(self, participant: str, send: Send, max_batch: int = MAX_BATCH) -> None:
        self._participant = participant
        self._send = send
        self._max_batch = max_batch
        self._queue: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None

    async def commit(self, txid: str, timeout: float) -> CommitReply:
        reply: asyncio.Future[CommitReply] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(txid, timeout, reply))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())
        return await reply

    async def close(self) -> None:
        """Stops sending. Every commit still waiting (the call in flight, and those queued behind
        it) is answered Unavailable: its outcome is not known here, and recovery finishes it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        queued, self._queue = self._queue, []
        for waiting in queued:
            _settle(waiting, error=self._closing(waiting.txid))

    def _closing(self, txid: str) -> TwopcError:
        return Unavailable(
            f"the coordinator closed its link to {self._participant} during phase 2 of {txid}; "
            "recovery finishes it",
            txid=txid,
        )

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send_batch(batch)
        finally:
            self._task = None

    async def _send_batch(self, batch: list[_Waiting]) -> None:
        request = pb.CommitManyRequest(participant=self._participant, txids=[w.txid for w in batch])
        try:
            response = await self._send(request, max(w.timeout for w in batch))
        except TwopcError as err:
            for waiting in batch:
                _settle(waiting, error=type(err)(err.message, txid=waiting.txid))
            return
        except asyncio.CancelledError:
            for waiting in batch:  # close() stopped the call: its outcome is not known here
                _settle(waiting, error=self._closing(waiting.txid))
            raise
        except BaseException as err:
            for waiting in batch:
                _settle(waiting, error=err)
            raise
        outcomes = {outcome.txid: outcome for outcome in response.outcomes}
        for waiting in batch:
            outcome = outcomes.get(waiting.txid)
            if outcome is None:
                _settle(waiting, error=_missing(waiting.txid))
            elif outcome.error_code:
                cls = error_class_named(outcome.error_class) or error_for_code(outcome.error_code)
                _settle(waiting, error=cls(outcome.error_message, txid=waiting.txid))
            else:
                _settle(waiting, result=CommitReply(already_committed=outcome.already_committed))


def _settle(
    waiting: _Waiting, *, result: CommitReply | None = None, error: BaseException | None = None
) -> None:
    if waiting.reply.done():  # its caller gave up (cancelled)
        return
    if error is not None:
        waiting.reply.set_exception(error)
    else:
        assert result is not None
        waiting.reply.set_result(result)


def _missing(txid: str) -> TwopcError:
    return Internal(f"the agent's CommitMany answer did not mention {txid}", txid=txid)
