"""The participant agent: runs the XA branches of one MySQL/MariaDB server for the coordinator.

Each public method is one RPC of the Participant service: a coroutine on the agent's event loop
(database I/O included, with aiomysql: no thread hop per call), and idempotent. Operations on one
branch are serialised by the branch's lock; a statement that runs too long is interrupted with KILL
QUERY from another session.

What happens to a branch:
- Execute: XA START on the first call (the branch is pinned to one pooled session), statements run.
  A statement that fails rolls the branch back at once (nothing half-done is ever prepared).
- Prepare: a branch that ran a writing statement gets its marker row (txid, branch, owner session),
  then XA END and XA PREPARE; it votes PREPARED. A branch that only read votes READ_ONLY and is
  rolled back by its own session (a read-only prepared branch is not durable on MariaDB, and
  rolling back keeps a write hidden in a stored function from committing early).
- Commit / Rollback: by the owning session when the agent has it; otherwise from any session. When
  the server answers XAER_NOTA, the marker row tells committed (present) from rolled back (absent);
  a branch still listed by XA RECOVER is held by a live session (a frozen or partitioned agent):
  the marker names that session, the agent kills it, and then finishes the branch.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from participants.branches import Branch, BranchRegistry, BranchState, FinishedBranch
from participants.config import AgentConfig
from participants.xa import (
    ER_DUP_ENTRY,
    ER_XA_RBROLLBACK,
    ER_XAER_DUPID,
    ER_XAER_NOTA,
    BatchFailed,
    ConnectionLost,
    DbError,
    Session,
    SessionPool,
    StatementOutput,
    check_rows,
    committed_markers,
    durable_xa_problem,
    kill,
    marker_owner,
    marker_table_ddl,
    prepared_xids,
    session_exists,
)
from twopc.errors import (
    FailedPrecondition,
    InvalidArgument,
    StatementFailed,
    TransactionAborted,
    TwopcError,
    Unavailable,
)
from twopc.failpoints import Failpoints
from twopc.logs import redact
from twopc.sql_guard import StatementKind, check_statement
from twopc.txid import Xid, check_participant_name, parse_txid
from twopc.values import SqlValue
from twopc.votes import Presence, Vote

Clock = Callable[[], float]


@dataclass(frozen=True)
class StatementRequest:
    sql: str
    params: list[SqlValue]


@dataclass(frozen=True)
class _Work:
    sql: str
    params: list[SqlValue]
    kind: StatementKind
    body: str | None  # the statement to send in a batch (None: it must go on its own)


@dataclass(frozen=True)
class VoteResult:
    vote: Vote
    reason: str = ""
    mysql_errno: int = 0
    outputs: tuple[StatementOutput, ...] = ()


@dataclass(frozen=True)
class CommitResult:
    outputs: tuple[StatementOutput, ...] = ()
    already_committed: bool = False


@dataclass(frozen=True)
class RecoveredBranch:
    xid: Xid
    held_by_this_agent: bool


_KILL_SETTLE_S = 5.0
_LOCK_WAIT_S = 60.0
_SEVER_AFTER_S = 2.0  # past a branch's deadline: KILL QUERY had its chance, the socket goes


async def _take_lock(branch: Branch, patience: float) -> bool:
    """Takes the branch's lock if it is free within ``patience`` seconds. With 0, only if it is
    free now: a free lock is taken without yielding, before a zero timeout can fire."""
    try:
        async with asyncio.timeout(patience):
            await branch.lock.acquire()
    except TimeoutError:
        return False
    return True


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        pool: SessionPool,
        *,
        clock: Clock = time.monotonic,
        failpoints: Failpoints | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.instance_id = instance_id or secrets.token_hex(16)
        self._pool = pool
        self._clock = clock
        self._failpoints = failpoints or Failpoints()
        self._registry = BranchRegistry(
            capacity=config.max_branches, finished_memory=config.finished_branch_memory
        )
        self._log = structlog.get_logger("twopc.agent").bind(participant=self.name)
        # Sessions whose connection broke mid-PREPARE or mid-COMMIT and that could not be ended
        # then: txid -> server session id. Nothing is answered about that txid before it ends.
        self._doubtful: dict[str, int] = {}
        self.server_version = ""

    # --- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Checks the server and creates the marker table. Raises FailedPrecondition when the
        server's XA PREPARE is not durable, Unavailable when it cannot be reached."""
        async with self._admin() as session:
            version = str((await session.execute("SELECT VERSION()")).rows[0][0])
            problem = durable_xa_problem(version)
            if problem is not None:
                raise FailedPrecondition(problem)
            await session.execute(marker_table_ddl(self.config.marker_table))
            flush = (await session.execute("SELECT @@innodb_flush_log_at_trx_commit")).rows[0][0]
        self.server_version = version
        if int(flush) != 1:
            self._log.warning(
                "prepare_not_crash_safe",
                innodb_flush_log_at_trx_commit=int(flush),
                detail="prepared branches may be lost if the database host crashes; set it to 1",
            )
        self._log.info("agent_ready", server_version=version, instance=self.instance_id)

    async def close(self, patience: float = 1.0) -> None:
        """Rolls back active branches and lets prepared ones go (they stay prepared on the
        server, where recovery finishes them). Bounded: a branch whose statement is still
        running (a lock wait, a cut link) is not waited for; its session is killed, and the
        server rolls an unprepared branch back when its session ends."""
        for branch in self._registry.live():
            if not await _take_lock(branch, patience):
                await self._kill_session_of(branch)
                continue
            try:
                if branch.state is BranchState.ACTIVE:
                    await self._abort(branch, "agent shutting down")
                elif branch.session is not None:
                    branch.session.discard()
                    branch.session = None
            finally:
                branch.lock.release()
        self._pool.dispose()

    async def _kill_session_of(self, branch: Branch, *, query_only: bool = False) -> None:
        """KILL [QUERY] on the session of ``branch``, from an admin session; a failure is
        logged (the caller has a fallback: the read timeout, or the process's exit)."""
        session = branch.session
        if session is None:
            return
        try:
            async with self._admin() as admin:
                await kill(admin, session.thread_id, query_only=query_only)
        except Unavailable as err:
            self._log.warning(
                "kill_failed", txid=branch.txid, query_only=query_only, error=str(err)
            )

    # --- RPCs -------------------------------------------------------------------------------------

    async def execute(
        self,
        txid: str,
        participant: str,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
        *,
        continues: bool = False,
    ) -> list[StatementOutput]:
        xid = self._xid(txid, participant)
        work = self._check(statements)
        if sequence < 1:
            raise InvalidArgument("sequence numbers start at 1", txid=txid)
        found = self._registry.create(xid, self._deadline(timeout_ms))
        if isinstance(found, FinishedBranch):
            raise self._finished_error(txid, found)
        async with self._locked(found):
            if continues and found.session is None and found.state is BranchState.ACTIVE:
                # Created just now: the branch that ran the earlier statements is gone.
                self._registry.forget(found)
                raise TransactionAborted(
                    f"participant {self.name} lost the branch of {txid} (its agent or database "
                    "restarted): the statements that ran on it earlier are gone, so the "
                    "transaction is rolled back",
                    txid=txid,
                )
            await self._ensure_started(found)
            if found.state is not BranchState.ACTIVE:
                raise self._not_active_error(found)
            return await self._run_or_abort(found, work, sequence)

    async def prepare(
        self,
        txid: str,
        participant: str,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
    ) -> VoteResult:
        xid = self._xid(txid, participant)
        work = self._check(statements)
        found = self._registry.get(txid)
        if found is None:
            if not work:
                return await self._vote_without_branch(xid)
            found = self._registry.create(xid, self._deadline(timeout_ms))
        if isinstance(found, FinishedBranch):
            return await self._vote_of_finished(xid.txid, found)
        async with self._locked(found):
            if found.state.finished:
                return await self._vote_of_finished(
                    xid.txid, FinishedBranch(found.state, found.reason)
                )
            if found.state is BranchState.PREPARED:
                return VoteResult(Vote.PREPARED, outputs=tuple(found.last_outputs))
            if self._one_trip_possible(found, work):
                return await self._prepare_in_one_trip(found, work, sequence)
            try:
                await self._ensure_started(found)
                outputs = await self._run_or_abort(found, work, sequence) if work else []
            except StatementFailed as err:
                return VoteResult(Vote.ABORT, err.message, err.mysql_errno)
            except TransactionAborted as err:
                return VoteResult(Vote.ABORT, err.message)
            return await self._prepare_locked(found, tuple(outputs))

    async def commit(
        self,
        txid: str,
        participant: str,
        *,
        one_phase: bool,
        statements: Sequence[StatementRequest] = (),
        sequence: int = 0,
        timeout_ms: int = 0,
    ) -> CommitResult:
        xid = self._xid(txid, participant)
        work = self._check(statements)
        if work and not one_phase:
            raise InvalidArgument("statements come with a one-phase commit only", txid=txid)
        if one_phase:
            return await self._commit_one_phase(xid, work, sequence, timeout_ms)
        found = self._registry.get(txid)
        if isinstance(found, FinishedBranch) and found.state is not BranchState.ROLLED_BACK:
            return CommitResult(already_committed=True)
        if found is None or isinstance(found, FinishedBranch):
            # Remembered as rolled back, or not at all: the server decides (it refuses, with
            # FailedPrecondition, a branch that is neither prepared nor committed).
            already = await self._commit_on_server(xid)
            self._log.info("branch_committed", txid=txid, by="recovery", already=already)
            return CommitResult(already_committed=already)
        async with self._locked(found):
            return await self._commit_prepared_locked(found)

    async def rollback(self, txid: str, participant: str) -> bool:
        """Rolls the branch back; True when there was nothing left to roll back."""
        xid = self._xid(txid, participant)
        found = self._registry.tombstone(txid, "rolled back before this agent saw it")
        if found is None:
            # Nothing held here: what the server holds (a branch prepared in an earlier life of
            # the agent) is rolled back, and the tombstone refuses a request still on its way.
            try:
                return await self._rollback_on_server(xid)
            except FailedPrecondition:
                self._registry.remember(txid, FinishedBranch(BranchState.COMMITTED, ""))
                raise
        if isinstance(found, FinishedBranch):
            if found.state is BranchState.COMMITTED:
                raise FailedPrecondition(
                    f"branch {txid} on {self.name} committed; it cannot be rolled back", txid=txid
                )
            # What the agent remembers is advice; the server is the truth (recovery asks to roll
            # back what XA RECOVER lists).
            return await self._rollback_on_server(xid)
        await self._interrupt_if_running(found)
        async with self._locked(found):
            if found.forgotten:
                # Given up meanwhile by the call that held it: its outcome on the server is not
                # known here (a one-phase commit whose connection broke may have landed). The
                # server decides, once the broken session has ended.
                self._registry.tombstone(txid, "rolled back on request")
                try:
                    return await self._rollback_on_server(xid)
                except FailedPrecondition:
                    self._registry.remember(txid, FinishedBranch(BranchState.COMMITTED, ""))
                    raise
            if found.state is BranchState.COMMITTED:
                raise FailedPrecondition(
                    f"branch {txid} on {self.name} committed; it cannot be rolled back", txid=txid
                )
            if found.state.finished:
                return True
            if found.state is BranchState.ACTIVE:
                await self._abort(found, "rolled back on request")
                return False
            return await self._rollback_prepared_locked(found)

    async def recover(self, txid_prefix: str) -> list[RecoveredBranch]:
        async with self._admin() as session:
            xids = await prepared_xids(session)
        held = {
            b.txid
            for b in self._registry.live()
            if b.state is BranchState.PREPARED and b.session is not None
        }
        return [
            RecoveredBranch(xid, xid.txid in held)
            for xid in xids
            if xid.txid.startswith(txid_prefix) and xid.branch == self.name
        ]

    async def inspect(self, txids: Sequence[str]) -> dict[str, Presence]:
        result: dict[str, Presence] = {}
        unknown = []
        for txid in txids:
            found = self._registry.get(txid)
            if isinstance(found, Branch):
                result[txid] = (
                    Presence.PREPARED if found.state is BranchState.PREPARED else Presence.ACTIVE
                )
            elif isinstance(found, FinishedBranch) and found.state is not BranchState.READ_ONLY:
                result[txid] = (
                    Presence.COMMITTED
                    if found.state is BranchState.COMMITTED
                    else Presence.ROLLED_BACK
                )
            else:
                unknown.append(txid)
        if unknown:
            async with self._admin() as session:
                for txid in unknown:
                    await self._settle_doubtful(session, txid)
                committed = await committed_markers(session, self.config.marker_table, unknown)
                prepared = {x.txid for x in await prepared_xids(session) if x.branch == self.name}
            for txid in unknown:
                if txid in committed:
                    result[txid] = Presence.COMMITTED
                elif txid in prepared:
                    result[txid] = Presence.PREPARED
                else:
                    result[txid] = Presence.UNKNOWN
        return result

    def counts(self) -> tuple[int, int]:
        return self._registry.counts()

    # --- housekeeping -----------------------------------------------------------------------------

    async def reap_expired(self) -> int:
        """Rolls back active branches past their deadline (a statement still running is
        interrupted first). Returns how many were rolled back now."""
        reaped = 0
        now = self._clock()
        for branch in self._registry.live():
            if branch.state is not BranchState.ACTIVE or now <= branch.deadline:
                continue
            if not await _take_lock(branch, 0):  # busy: interrupted now, reaped next time
                await self._interrupt_if_running(branch)
                continue
            try:
                if branch.state is BranchState.ACTIVE:
                    await self._abort(branch, "the transaction's deadline passed")
                    reaped += 1
            finally:
                branch.lock.release()
        return reaped

    async def collect_markers(self, limit: int = 1000) -> int:
        """Deletes marker rows older than the retention; returns how many went."""
        async with self._admin() as session:
            output = await session.execute(
                f"DELETE FROM `{self.config.marker_table}` "
                "WHERE created_at < NOW(6) - INTERVAL %s SECOND LIMIT %s",
                [self.config.marker_retention_s, limit],
            )
        return output.affected_rows

    # --- branch steps (caller holds the branch lock) --------------------------------------------

    async def _ensure_started(self, branch: Branch) -> None:
        if branch.forgotten:
            raise Unavailable(
                f"branch {branch.txid} on {self.name} could not be started; retry",
                txid=branch.txid,
            )
        if branch.session is not None or branch.state is not BranchState.ACTIVE:
            return
        try:
            session = await self._started_session(branch.xid)
        except DbError as err:
            raise self._not_started(branch, err) from err
        branch.session = session
        self._log.debug("branch_started", txid=branch.txid, session=session.thread_id)

    async def _run_or_abort(
        self, branch: Branch, work: Sequence[_Work], sequence: int
    ) -> list[StatementOutput]:
        if sequence == branch.last_sequence and sequence > 0:
            return branch.last_outputs  # a retry of the last call: its first answer
        if sequence < branch.last_sequence:
            raise FailedPrecondition(
                f"stale Execute on {self.name}: sequence {sequence} comes after "
                f"{branch.last_sequence} already ran",
                txid=branch.txid,
            )
        session = branch.session
        assert session is not None
        outputs = []
        for index, item in enumerate(work, start=1):
            if self._clock() > branch.deadline:
                await self._abort(branch, "the transaction's deadline passed")
                raise TransactionAborted(
                    f"the transaction's deadline passed on {self.name}; branch rolled back",
                    txid=branch.txid,
                )
            await self._failpoints.ahit("agent.mid_statement")
            branch.running_statement = True
            try:
                output = await session.execute(
                    item.sql, item.params, max_rows=self.config.max_result_rows
                )
            except DbError as err:
                raise await self._abort_after_statement(branch, index, err) from err
            finally:
                branch.running_statement = False
            if item.kind is StatementKind.WRITE:
                branch.wrote = True
            outputs.append(output)
        branch.last_sequence = sequence
        branch.last_outputs = outputs
        return outputs

    async def _prepare_locked(
        self, branch: Branch, outputs: tuple[StatementOutput, ...]
    ) -> VoteResult:
        session = branch.session
        assert session is not None
        if self._clock() > branch.deadline:
            await self._abort(branch, "the transaction's deadline passed before prepare")
            return VoteResult(Vote.ABORT, branch.reason)
        if not branch.wrote:
            # Rolled back, not committed: a SELECT that called a writing stored function must
            # not commit that write ahead of the global decision.
            try:
                await session.script(
                    [f"XA END {branch.xid.sql()}", f"XA ROLLBACK {branch.xid.sql()}"]
                )
            except DbError as err:
                await self._abort(branch, f"read-only finish failed: {err}")
                return VoteResult(Vote.ABORT, branch.reason, err.errno)
            self._finish(branch, BranchState.READ_ONLY, release=True)
            return VoteResult(Vote.READ_ONLY, outputs=outputs)
        xid = branch.xid.sql()
        try:
            if self._failpoints.spec("agent.after_end"):  # keep the point between END and PREPARE
                await session.script([self._marker_sql(branch.xid), f"XA END {xid}"])
                await self._failpoints.ahit("agent.after_end")
                await session.xa("PREPARE", branch.xid)
            else:  # one round trip: the marker, XA END and XA PREPARE
                await session.script(
                    [self._marker_sql(branch.xid), f"XA END {xid}", f"XA PREPARE {xid}"]
                )
        except ConnectionLost:
            session.discard()
            branch.session = None
            return await self._vote_after_lost_prepare(branch, session.thread_id)
        except DbError as err:
            if err.errno == ER_DUP_ENTRY:
                await self._abort(
                    branch, "this transaction committed here before (a retried request)"
                )
                return VoteResult(Vote.ALREADY_COMMITTED, branch.reason)
            await self._abort(branch, f"prepare failed: {err}")
            return VoteResult(Vote.ABORT, branch.reason, err.errno)
        branch.move_to(BranchState.PREPARED)
        self._log.debug("branch_prepared", txid=branch.txid)
        await self._failpoints.ahit("agent.after_prepare")
        return VoteResult(Vote.PREPARED, outputs=outputs)

    def _one_trip_possible(self, branch: Branch, work: Sequence[_Work]) -> bool:
        return (
            bool(work)
            and branch.session is None
            and branch.state is BranchState.ACTIVE
            and branch.last_sequence == 0
            and not branch.forgotten
            and all(item.body is not None for item in work)
            # keep the points between the steps reachable
            and not self._failpoints.spec("agent.mid_statement")
            and not self._failpoints.spec("agent.after_end")
        )

    async def _prepare_in_one_trip(
        self, branch: Branch, work: Sequence[_Work], sequence: int
    ) -> VoteResult:
        """A one-shot branch in one round trip: XA START, the statements, the marker, XA END and
        XA PREPARE (a branch that only reads ends with XA END and XA ROLLBACK, and votes
        READ_ONLY). Each outcome is the one the step-by-step path gives."""
        xid = branch.xid.sql()
        writes = any(item.kind is StatementKind.WRITE for item in work)
        finish = (
            [self._marker_sql(branch.xid), f"XA END {xid}", f"XA PREPARE {xid}"]
            if writes
            else [f"XA END {xid}", f"XA ROLLBACK {xid}"]
        )
        try:
            session = await self._pool.session()
        except DbError as err:
            self._registry.forget(branch)
            raise Unavailable(
                f"participant {self.name} could not start the branch: {err}", txid=branch.txid
            ) from err
        try:
            bound = [session.bind(item.body or item.sql, item.params) for item in work]
        except BaseException:
            session.release()
            self._registry.forget(branch)
            raise
        branch.session = session
        statements = [f"XA START {xid}", *bound, *finish]
        branch.running_statement = True
        try:
            outputs = await session.batch(statements)
        except BatchFailed as failed:
            return await self._vote_of_failed_trip(branch, len(work), failed)
        finally:
            branch.running_statement = False
        results = outputs[1 : 1 + len(work)]
        branch.last_sequence = sequence
        branch.last_outputs = results
        branch.wrote = writes
        if not writes:
            self._finish(branch, BranchState.READ_ONLY, release=True)
            return VoteResult(Vote.READ_ONLY, outputs=tuple(results))
        branch.move_to(BranchState.PREPARED)
        self._log.debug("branch_prepared", txid=branch.txid, trips=1)
        try:
            for output in results:
                check_rows(output, self.config.max_result_rows)
        except DbError as err:
            await self._rollback_prepared_locked(branch)
            return VoteResult(Vote.ABORT, f"statement failed: {err}")
        await self._failpoints.ahit("agent.after_prepare")
        return VoteResult(Vote.PREPARED, outputs=tuple(results))

    async def _vote_of_failed_trip(
        self, branch: Branch, statements: int, failed: BatchFailed
    ) -> VoteResult:
        """The vote when a statement of ``_prepare_in_one_trip`` failed (the server ran none
        after it): the step that failed decides, as it would on the step-by-step path."""
        session = branch.session
        assert session is not None
        err = failed.error
        if isinstance(err, ConnectionLost):
            # Whatever ran may have reached PREPARE: the server settles it once the session ends.
            session.discard()
            branch.session = None
            if failed.completed == 0:
                self._pool.reset()  # the database may have restarted: its idle sessions are gone
            return await self._vote_after_lost_prepare(branch, session.thread_id)
        if failed.completed == 0:  # XA START
            branch.session = None
            session.release()
            refused = self._not_started(branch, err)
            if isinstance(refused, TransactionAborted):
                return VoteResult(Vote.ABORT, refused.message)
            raise refused from err
        if failed.completed <= statements:
            aborted = await self._abort_after_statement(branch, failed.completed, err)
            return VoteResult(Vote.ABORT, aborted.message, aborted.mysql_errno)
        if err.errno == ER_DUP_ENTRY and failed.completed == statements + 1:  # the marker
            await self._abort(branch, "this transaction committed here before (a retried request)")
            return VoteResult(Vote.ALREADY_COMMITTED, branch.reason)
        await self._abort(branch, f"prepare failed: {err}")
        return VoteResult(Vote.ABORT, branch.reason, err.errno)

    async def _abort_after_statement(
        self, branch: Branch, index: int, err: DbError
    ) -> StatementFailed:
        """Rolls the branch back after its statement ``index`` failed; the error to answer."""
        reason = (
            "the transaction's deadline passed during a statement"
            if self._clock() > branch.deadline
            else f"statement {index} failed: {err}"
        )
        await self._abort(branch, reason)
        return StatementFailed(
            f"{reason} on participant {self.name}; the transaction is rolled back",
            txid=branch.txid,
            mysql_errno=err.errno,
        )

    def _not_started(self, branch: Branch, err: DbError) -> TwopcError:
        """XA START failed: the error to answer. The XID may belong to a prepared branch of an
        earlier life, so the branch is forgotten, never recorded as finished (a later commit of
        that prepared branch would be refused)."""
        self._registry.forget(branch)
        if err.errno == ER_XAER_DUPID:
            return TransactionAborted(
                f"a branch of {branch.txid} already exists on {self.name} (prepared by an "
                "earlier attempt, or held by another session); this attempt was not started",
                txid=branch.txid,
            )
        return Unavailable(
            f"participant {self.name} could not start the branch: {err}", txid=branch.txid
        )

    async def _vote_after_lost_prepare(self, branch: Branch, thread_id: int) -> VoteResult:
        """The connection broke during XA END/PREPARE: the server prepares the branch (it is
        then detached and listed by XA RECOVER) or rolls it back, but only once it is done with
        the session, which may still be executing the PREPARE."""
        try:
            async with self._admin() as admin:
                settled = await self._end_session(admin, thread_id)
                prepared = settled and branch.xid in await prepared_xids(admin)
        except Unavailable as err:
            settled, prepared = False, False
            reason = f"lost the database during prepare: {err}"
        else:
            reason = "lost the database during prepare"
        if not settled:
            # Cannot tell: say no. If it did prepare, recovery rolls it back (no commit record).
            self._registry.forget(branch)
            self._remember_doubtful(branch.txid, thread_id)
            return VoteResult(Vote.ABORT, reason)
        if prepared:
            branch.move_to(BranchState.PREPARED)
            return VoteResult(Vote.PREPARED)
        self._finish(branch, BranchState.ROLLED_BACK, "lost the database during prepare")
        return VoteResult(Vote.ABORT, branch.reason)

    async def _commit_one_phase(
        self, xid: Xid, work: Sequence[_Work], sequence: int, timeout_ms: int
    ) -> CommitResult:
        found = self._registry.get(xid.txid)
        if found is None and not work:
            async with self._admin() as admin:
                await self._settle_doubtful(admin, xid.txid)
                if await committed_markers(admin, self.config.marker_table, [xid.txid]):
                    return CommitResult(already_committed=True)
            raise TransactionAborted(
                f"participant {self.name} has no branch of {xid.txid}: it was rolled back "
                "(the agent or its database restarted)",
                txid=xid.txid,
            )
        if found is None:
            found = self._registry.create(xid, self._deadline(timeout_ms))
        if isinstance(found, FinishedBranch):
            return await self._one_phase_result_of_finished(xid.txid, found)
        async with self._locked(found):
            if found.state.finished:
                return await self._one_phase_result_of_finished(
                    xid.txid, FinishedBranch(found.state, found.reason)
                )
            if found.state is BranchState.PREPARED:
                raise FailedPrecondition(
                    f"branch {xid.txid} is prepared: it takes a two-phase commit", txid=xid.txid
                )
            await self._ensure_started(found)
            outputs = tuple(await self._run_or_abort(found, work, sequence) if work else ())
            session = found.session
            assert session is not None
            if self._clock() > found.deadline:
                await self._abort(found, "the transaction's deadline passed before commit")
                raise TransactionAborted(found.reason, txid=xid.txid)
            marker = [self._marker_sql(xid)] if found.wrote else []
            try:  # one round trip: the marker, XA END and XA COMMIT ... ONE PHASE
                await session.script(
                    [*marker, f"XA END {xid.sql()}", f"XA COMMIT {xid.sql()} ONE PHASE"]
                )
            except ConnectionLost as err:
                session.discard()
                found.session = None
                return await self._one_phase_after_lost_commit(
                    found, outputs, err, session.thread_id
                )
            except DbError as err:
                if err.errno == ER_DUP_ENTRY:
                    await self._abort(found, "this transaction committed here before")
                    return CommitResult(outputs, already_committed=True)
                await self._abort(found, f"one-phase commit failed: {err}")
                raise TransactionAborted(
                    f"one-phase commit on {self.name} failed: {err}; rolled back",
                    txid=xid.txid,
                    mysql_errno=err.errno,
                ) from err
            self._finish(found, BranchState.COMMITTED, release=True)
            await self._failpoints.ahit("agent.after_commit")
            return CommitResult(outputs)

    async def _one_phase_after_lost_commit(
        self, branch: Branch, outputs: tuple[StatementOutput, ...], err: DbError, thread_id: int
    ) -> CommitResult:
        if not branch.wrote:
            self._finish(branch, BranchState.READ_ONLY)
            return CommitResult(outputs)
        try:
            async with self._admin() as admin:
                # The marker tells only once the server is done with the session: until then
                # the commit may still be running there.
                settled = await self._end_session(admin, thread_id)
                committed = settled and bool(
                    await committed_markers(admin, self.config.marker_table, [branch.txid])
                )
        except Unavailable as again:
            settled, problem = False, str(again)
        else:
            problem = f"session {thread_id} did not end"
        if not settled:
            self._registry.forget(branch)
            self._remember_doubtful(branch.txid, thread_id)
            raise Unavailable(
                f"lost the database during a one-phase commit on {self.name} and cannot tell "
                f"whether it committed ({problem}); ask again later",
                txid=branch.txid,
            ) from err
        if committed:
            self._finish(branch, BranchState.COMMITTED)
            return CommitResult(outputs)
        self._finish(branch, BranchState.ROLLED_BACK, "lost the database during commit")
        raise TransactionAborted(
            f"lost the database during a one-phase commit on {self.name}; it rolled back",
            txid=branch.txid,
        ) from err

    async def _one_phase_result_of_finished(self, txid: str, found: FinishedBranch) -> CommitResult:
        if found.state is BranchState.ROLLED_BACK and await self._committed_on_server(txid):
            return CommitResult(already_committed=True)
        if found.state is BranchState.ROLLED_BACK:
            raise TransactionAborted(
                f"branch {txid} on {self.name} was rolled back: {found.reason}", txid=txid
            )
        return CommitResult(already_committed=True)

    async def _commit_prepared_locked(self, branch: Branch) -> CommitResult:
        if branch.state is BranchState.ROLLED_BACK:
            raise FailedPrecondition(
                f"branch {branch.txid} on {self.name} was rolled back ({branch.reason}); "
                "it cannot commit",
                txid=branch.txid,
            )
        if branch.state.finished:
            return CommitResult(already_committed=True)
        if branch.state is BranchState.ACTIVE:
            raise FailedPrecondition(
                f"branch {branch.txid} on {self.name} is not prepared; a two-phase commit needs "
                "a prepared branch",
                txid=branch.txid,
            )
        session = branch.session
        if session is not None:
            try:
                await session.xa("COMMIT", branch.xid)
            except DbError:
                session.discard()
                branch.session = None
            else:
                await self._failpoints.ahit("agent.after_commit")
                self._finish(branch, BranchState.COMMITTED, release=True)
                return CommitResult()
        already = await self._commit_on_server(branch.xid)
        self._finish(branch, BranchState.COMMITTED)
        return CommitResult(already_committed=already)

    async def _rollback_prepared_locked(self, branch: Branch) -> bool:
        session = branch.session
        if session is not None:
            try:
                await session.xa("ROLLBACK", branch.xid)
            except DbError:
                session.discard()
                branch.session = None
            else:
                self._finish(
                    branch, BranchState.ROLLED_BACK, "rolled back on request", release=True
                )
                return False
        already = await self._rollback_on_server(branch.xid)
        self._finish(branch, BranchState.ROLLED_BACK, "rolled back on request")
        return already

    async def _abort(self, branch: Branch, reason: str) -> None:
        """Rolls back an ACTIVE branch. Dropping the session is the fallback: the server rolls
        back an unprepared branch whose session ends."""
        session = branch.session
        branch.session = None
        if session is not None:
            try:
                try:
                    await session.xa("END", branch.xid)
                except ConnectionLost:
                    raise
                except DbError:
                    pass  # already ended, or rollback-only after a deadlock: ROLLBACK still works
                await session.xa("ROLLBACK", branch.xid)
            except DbError:
                session.discard()
            else:
                session.release()
        self._finish(branch, BranchState.ROLLED_BACK, reason)
        self._log.info("branch_rolled_back", txid=branch.txid, reason=redact(reason))

    def _finish(
        self, branch: Branch, state: BranchState, reason: str = "", *, release: bool = False
    ) -> None:
        if release and branch.session is not None:
            branch.session.release()
        branch.session = None
        branch.move_to(state, reason)
        self._registry.finish(branch)

    # --- finishing a branch from another session -------------------------------------------------

    async def _commit_on_server(self, xid: Xid) -> bool:
        """XA COMMIT from a pooled session; True if it had committed already."""
        return await self._finish_on_server(xid, "COMMIT")

    async def _rollback_on_server(self, xid: Xid) -> bool:
        """XA ROLLBACK from a pooled session; True if there was nothing to roll back."""
        return await self._finish_on_server(xid, "ROLLBACK")

    async def _finish_on_server(self, xid: Xid, command: str) -> bool:
        committing = command == "COMMIT"
        deadline = self._clock() + _KILL_SETTLE_S
        async with self._admin() as session:
            await self._settle_doubtful(session, xid.txid)
            while True:
                try:
                    await session.xa(command, xid)
                except DbError as err:
                    if err.errno == ER_XA_RBROLLBACK and not committing:
                        return True
                    if err.errno not in (ER_XAER_NOTA, ER_XA_RBROLLBACK):
                        raise self._db_unavailable(xid, err) from err
                else:
                    if committing:
                        await self._check_commit_landed(session, xid)
                        await self._failpoints.ahit("agent.after_commit")
                    self._log.info("branch_finished_by_recovery", txid=xid.txid, how=command)
                    return False
                if await committed_markers(session, self.config.marker_table, [xid.txid]):
                    if committing:
                        return True
                    raise FailedPrecondition(
                        f"branch {xid.txid} on {self.name} committed; it cannot be rolled back",
                        txid=xid.txid,
                    )
                if xid not in await prepared_xids(session):
                    if not committing:
                        return True
                    # Neither prepared nor committed: unless its marker row is there,
                    # uncommitted, in a transaction the server lost track of.
                    await self._check_commit_landed(session, xid)
                    raise FailedPrecondition(
                        f"branch {xid.txid} is not prepared on {self.name} and left no commit "
                        "marker: it was rolled back, so it cannot commit (heuristic outcome)",
                        txid=xid.txid,
                    )
                await self._detach_from_owner(session, xid)
                if self._clock() > deadline:
                    raise Unavailable(
                        f"branch {xid.txid} on {self.name} is still held by another session",
                        txid=xid.txid,
                    )
                await asyncio.sleep(0.02)

    async def _vote_of_finished(self, txid: str, found: FinishedBranch) -> VoteResult:
        if found.state is BranchState.READ_ONLY:
            return VoteResult(Vote.READ_ONLY)
        if found.state is BranchState.COMMITTED or await self._committed_on_server(txid):
            return VoteResult(Vote.ALREADY_COMMITTED, "the branch committed already")
        return VoteResult(Vote.ABORT, found.reason or "the branch was rolled back")

    async def _committed_on_server(self, txid: str) -> bool:
        """Whether the branch's marker is committed. Asked before repeating a remembered
        rollback: the memory may come from a rollback recorded while the server could not be
        asked, and a commit started before it may have landed since (the server is the truth).
        Unavailable while a broken session of ``txid`` may still be committing."""
        async with self._admin() as admin:
            await self._settle_doubtful(admin, txid)
            return bool(await committed_markers(admin, self.config.marker_table, [txid]))

    def _remember_doubtful(self, txid: str, thread_id: int) -> None:
        self._doubtful[txid] = thread_id

    async def _settle_doubtful(self, admin: Session, txid: str) -> None:
        """Ends the broken session that may still be working on ``txid``, if there is one;
        Unavailable while it cannot be ended (what the server shows is not final yet)."""
        thread_id = self._doubtful.get(txid)
        if thread_id is None:
            return
        if not await self._end_session(admin, thread_id):
            raise Unavailable(
                f"a session of {txid} on {self.name} is still running after its connection "
                "broke; ask again later",
                txid=txid,
            )
        self._doubtful.pop(txid, None)

    async def _end_session(self, admin: Session, thread_id: int) -> bool:
        """Kills server session ``thread_id`` (its connection broke mid-statement) and waits until
        the server is done with it, so that what it shows afterwards is final. False if the
        session is still there after the settle time."""
        await kill(admin, thread_id, query_only=False)
        deadline = self._clock() + _KILL_SETTLE_S
        while await session_exists(admin, thread_id):
            if self._clock() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _detach_from_owner(self, session: Session, xid: Xid) -> None:
        """A prepared branch answered XAER_NOTA while XA RECOVER lists it: a live session (a frozen
        or cut-off agent) still owns it. Kill that session, found by the branch's marker row."""
        owner = await marker_owner(session, self.config.marker_table, xid)
        if owner is None or owner == session.thread_id:
            raise Unavailable(
                f"branch {xid.txid} on {self.name} is held by a session the agent cannot "
                "identify; it is finished once that session ends",
                txid=xid.txid,
            )
        if await session_exists(session, owner):
            # Waited for, not only killed: MariaDB 10.11 answers OK to an XA COMMIT that races
            # with the KILL of the branch's owner, and then leaves the transaction behind
            # uncommitted, its locks held, until the server restarts (about 1 in 10 tries when
            # the COMMIT follows the KILL at once; none in 400 once the owner has left the
            # processlist).
            self._log.warning("killing_branch_owner", txid=xid.txid, session=owner)
            if not await self._end_session(session, owner):
                raise Unavailable(
                    f"branch {xid.txid} on {self.name} is held by session {owner}, which has "
                    "not ended yet after KILL; ask again later",
                    txid=xid.txid,
                )

    async def _check_commit_landed(self, session: Session, xid: Xid) -> None:
        """After an XA COMMIT from a session other than the branch's own: its marker row must be
        committed now. If it is there but uncommitted (a dirty read sees it), the server lost the
        commit (see ``_detach_from_owner``):
        say so, and fail the call so that the coordinator keeps its COMMIT record and commits
        the branch again once the server has restarted (it is then prepared once more)."""
        if await committed_markers(session, self.config.marker_table, [xid.txid]):
            return
        if await marker_owner(session, self.config.marker_table, xid) is None:
            return  # no marker at all: a branch that twopc's agent did not write
        self._log.error(
            "commit_lost_by_database",
            txid=xid.txid,
            action="restart the database: the branch comes back prepared and recovery commits it",
        )
        raise Unavailable(
            f"the database of {self.name} holds the work of branch {xid.txid} uncommitted, in a "
            "transaction that is neither prepared nor committed (it lost an XA COMMIT, which it "
            "had answered OK); restart that database and recovery will commit the branch",
            txid=xid.txid,
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _marker_sql(self, xid: Xid) -> str:
        """The marker row's INSERT, as literals only (XIDs in hex, the instance id is hex)."""
        return (
            f"INSERT INTO `{self.config.marker_table}` "
            "(gtrid, bqual, owner_thread, agent_instance) "
            f"VALUES (X'{xid.gtrid.hex()}', X'{xid.bqual.hex()}', CONNECTION_ID(), "
            f"'{self.instance_id}')"
        )

    async def _started_session(self, xid: Xid) -> Session:
        """A pooled session with ``xid`` started on it. A pooled connection may be dead (the
        database restarted); XA START on it fails without effect, so it is tried once more on
        a fresh pool."""
        for attempt in (1, 2):
            session = await self._pool.session()
            try:
                await session.xa("START", xid)
            except ConnectionLost:
                session.discard()
                if attempt == 2:
                    raise
                self._pool.reset()
            except DbError:
                session.release()
                raise
            else:
                return session
        raise AssertionError("unreachable")

    async def _vote_without_branch(self, xid: Xid) -> VoteResult:
        """Prepare for a branch this agent does not hold: prepared in an earlier life of the agent
        (a retried prepare), or lost with it."""
        async with self._admin() as session:
            if xid in await prepared_xids(session):
                return VoteResult(Vote.PREPARED)
        return VoteResult(
            Vote.ABORT,
            f"participant {self.name} has no branch of {xid.txid} (its agent or database "
            "restarted before prepare)",
        )

    async def _interrupt_if_running(self, branch: Branch) -> None:
        session = branch.session
        if not branch.running_statement or session is None:
            return
        if self._clock() > branch.deadline + _SEVER_AFTER_S:
            # KILL QUERY has not ended it: the statement or its answer is lost on a dead link,
            # and the call would wait out mysql_read_timeout_s. Shutting the socket ends the
            # wait now; the server rolls the branch back once it sees the connection go.
            if not branch.severed:
                branch.severed = True
                self._log.warning("branch_connection_severed", txid=branch.txid)
            session.sever()
            return
        await self._kill_session_of(branch, query_only=True)

    @asynccontextmanager
    async def _locked(self, branch: Branch) -> AsyncIterator[None]:
        if not await _take_lock(branch, _LOCK_WAIT_S):
            raise Unavailable(
                f"branch {branch.txid} on {self.name} is busy (a statement has run for over "
                f"{_LOCK_WAIT_S:.0f} s)",
                txid=branch.txid,
            )
        try:
            yield
        finally:
            branch.lock.release()

    @asynccontextmanager
    async def _admin(self) -> AsyncIterator[Session]:
        """A pooled session for the agent's own commands. A database error that leaves the block
        becomes Unavailable: every caller can answer that, and the coordinator retries."""
        try:
            session = await self._pool.session()
        except DbError as err:
            raise Unavailable(f"participant {self.name} cannot reach its database: {err}") from err
        try:
            with session.commands():  # twopc's own statements only: the command timeout
                yield session
        except ConnectionLost as err:
            session.discard()
            raise Unavailable(
                f"participant {self.name} lost its database during a command of its own: {err}"
            ) from err
        except DbError as err:
            session.release()
            raise Unavailable(
                f"participant {self.name}: its database refused a command of its own: {err}"
            ) from err
        except BaseException:
            session.release()
            raise
        else:
            session.release()

    def _db_unavailable(self, xid: Xid, err: DbError) -> TwopcError:
        return Unavailable(
            f"participant {self.name} could not finish branch {xid.txid}: {err}", txid=xid.txid
        )

    def _xid(self, txid: str, participant: str) -> Xid:
        if participant != self.name:
            check_participant_name(participant)
            raise InvalidArgument(
                f"this agent serves participant {self.name!r}, not {participant!r}: check the "
                "coordinator's participants map",
                txid=txid,
            )
        parse_txid(txid)
        return Xid(txid, participant)

    def _check(self, statements: Sequence[StatementRequest]) -> list[_Work]:
        work = []
        for statement in statements:
            checked = check_statement(
                statement.sql,
                placeholders=len(statement.params),
                protected_tables=(self.config.marker_table.lower(),),
            )
            work.append(_Work(statement.sql, statement.params, checked.kind, checked.body))
        return work

    def _deadline(self, timeout_ms: int) -> float:
        return self._clock() + (timeout_ms or self.config.default_timeout_ms) / 1000

    def _finished_error(self, txid: str, found: FinishedBranch) -> TwopcError:
        if found.state is BranchState.ROLLED_BACK:
            return TransactionAborted(
                f"branch {txid} on {self.name} was rolled back: {found.reason}", txid=txid
            )
        return FailedPrecondition(
            f"branch {txid} on {self.name} is finished ({found.state.value})", txid=txid
        )

    def _not_active_error(self, branch: Branch) -> TwopcError:
        if branch.state is BranchState.ROLLED_BACK:
            return self._finished_error(branch.txid, FinishedBranch(branch.state, branch.reason))
        return FailedPrecondition(
            f"branch {branch.txid} on {self.name} is {branch.state.value}; it takes no more "
            "statements",
            txid=branch.txid,
        )
