"""The one-trip prepare: a one-shot branch (its statements come with the prepare) reaches the
database in one round trip: XA START, the statements, the marker, XA END and XA PREPARE (a branch
that only reads ends with XA END and XA ROLLBACK, and votes READ_ONLY). Each outcome is the one
the step-by-step path gives; a failed trip is judged by the step that failed.

The agent's crash points are on this path too, at the same steps as on the step-by-step path:
``agent.mid_statement`` before each statement, ``agent.after_end`` between XA END and XA PREPARE
(pauses of the round trip, only while armed), ``agent.after_prepare`` after it.
"""

from __future__ import annotations

from collections.abc import Sequence

from structlog.typing import FilteringBoundLogger

from participants.branches import Branch, BranchRegistry, BranchState
from participants.calls import VoteResult, Work, mark_for_reset, work_digest
from participants.steps import BranchSteps, pool_exhausted
from participants.xa import (
    ER_DUP_ENTRY,
    BatchFailed,
    ConnectionLost,
    DbError,
    PoolExhausted,
    SessionPool,
    check_rows,
)
from twopc.errors import TransactionAborted, Unavailable
from twopc.failpoints import Failpoints
from twopc.sql_guard import StatementKind
from twopc.votes import Vote


class OneTripPrepare:
    def __init__(
        self,
        *,
        participant: str,
        max_result_rows: int,
        pool: SessionPool,
        registry: BranchRegistry,
        steps: BranchSteps,
        failpoints: Failpoints,
        log: FilteringBoundLogger,
    ) -> None:
        self._name = participant
        self._max_result_rows = max_result_rows
        self._pool = pool
        self._registry = registry
        self._steps = steps
        self._failpoints = failpoints
        self._log = log

    @staticmethod
    def possible(branch: Branch, work: Sequence[Work]) -> bool:
        """Whether ``branch`` is new (nothing has run on it) and every statement can go in a
        batch."""
        return (
            bool(work)
            and branch.session is None
            and branch.state is BranchState.ACTIVE
            and branch.last_sequence == 0
            and not branch.forgotten
            and all(item.body is not None for item in work)
        )

    async def prepare(self, branch: Branch, work: Sequence[Work], sequence: int) -> VoteResult:
        xid = branch.xid.sql()
        writes = any(item.kind is StatementKind.WRITE for item in work)
        finish = (
            [self._steps.marker_sql(branch), f"XA END {xid}", f"XA PREPARE {xid}"]
            if writes
            else [f"XA END {xid}", f"XA ROLLBACK {xid}"]
        )
        try:
            session = await self._pool.session()
        except PoolExhausted as err:
            self._registry.forget(branch)
            raise pool_exhausted(self._name, err, branch.txid) from err
        except DbError as err:
            self._registry.forget(branch)
            raise Unavailable(
                f"participant {self._name} could not start the branch: {err}", txid=branch.txid
            ) from err
        branch.attach(session)
        try:
            bound = [session.bind(item.body or item.sql, item.params) for item in work]
        except BaseException:
            branch.release_session()  # nothing was sent
            self._registry.forget(branch)
            raise
        mark_for_reset(session, work, always=self._steps.reset_always)
        statements = [f"XA START {xid}", *bound, *finish]
        # Statement i (1..n) is the i-th of the client's; XA PREPARE follows the marker and END.
        points = dict.fromkeys(range(1, len(work) + 1), "agent.mid_statement")
        if writes:
            points[len(work) + 3] = "agent.after_end"
        branch.running_since = self._steps.now()
        branch.first_statement_at = branch.first_statement_at or branch.running_since
        branch.running_statement = True
        try:
            outputs = await session.batch(statements, self._steps.pauses(branch, points))
        except BatchFailed as failed:
            return await self._vote_of_failed_trip(branch, len(work), failed)
        finally:
            branch.running_statement = False
        results = outputs[1 : 1 + len(work)]
        branch.last_sequence = sequence
        branch.last_outputs = results
        branch.last_digest = work_digest(work)
        branch.wrote = writes
        if not writes:
            self._steps.finish(branch, BranchState.READ_ONLY)
            return VoteResult(Vote.READ_ONLY, outputs=tuple(results))
        branch.move_to(BranchState.PREPARED)
        self._log.debug("branch_prepared", txid=branch.txid, trips=1)
        try:
            for output in results:
                check_rows(output, self._max_result_rows)
        except DbError as err:
            await self._steps.rollback_prepared(branch)
            return VoteResult(Vote.ABORT, f"statement failed: {err}")
        await self._failpoints.ahit("agent.after_prepare")
        return VoteResult(Vote.PREPARED, outputs=tuple(results))

    async def _vote_of_failed_trip(
        self, branch: Branch, statements: int, failed: BatchFailed
    ) -> VoteResult:
        """The vote when a statement of the trip failed (the server ran none after it): the
        step that failed decides, as it would on the step-by-step path."""
        session = branch.session
        assert session is not None
        err = failed.error
        if isinstance(err, ConnectionLost):
            # Whatever ran may have reached PREPARE: the server settles it once the session ends.
            branch.discard_session()
            if failed.completed == 0:
                self._pool.reset()  # the database may have restarted: its idle sessions are gone
            return await self._steps.vote_after_lost_prepare(branch, session.thread_id)
        if failed.completed == 0:  # XA START
            branch.release_session()
            refused = self._steps.not_started(branch, err)
            if isinstance(refused, TransactionAborted):
                return VoteResult(Vote.ABORT, refused.message)
            raise refused from err
        if failed.completed <= statements:
            aborted = await self._steps.abort_after_statement(branch, failed.completed, err)
            return VoteResult(Vote.ABORT, aborted.message, aborted.mysql_errno)
        if err.errno == ER_DUP_ENTRY and failed.completed == statements + 1:  # the marker
            await self._steps.abort(
                branch, "this transaction committed here before (a retried request)"
            )
            return VoteResult(Vote.ALREADY_COMMITTED, branch.reason)
        await self._steps.abort(branch, f"prepare failed: {err}")
        return VoteResult(Vote.ABORT, branch.reason, err.errno)
