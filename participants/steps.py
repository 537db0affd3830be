"""The steps of one branch on its own session; the caller holds the branch's lock.

Starting the branch (XA START on a pooled session), running statements (a statement that fails
rolls the branch back at once: nothing half-done is ever prepared), the step-by-step prepare (the
marker row, XA END and XA PREPARE in one round trip; a branch that only read ends with XA END and
XA ROLLBACK and votes READ_ONLY), the one-phase commit, finishing a prepared branch by its owning
session, and rolling an active branch back. When the branch's own session cannot finish it, the
branch is handed to ``Takeover``.

The agent's crash points are hit on these paths as production runs them: a point between two
statements of a round trip is a pause of that round trip (see ``pauses``), which changes neither
the statements sent nor their order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from structlog.typing import FilteringBoundLogger

from participants.admin import AdminSessions
from participants.branches import Branch, BranchRegistry, BranchState, Clock
from participants.calls import CommitResult, VoteResult, Work, mark_for_reset, work_digest
from participants.config import AgentConfig
from participants.takeover import Takeover
from participants.xa import (
    ER_DUP_ENTRY,
    ER_XAER_DUPID,
    ConnectionLost,
    DbError,
    Pause,
    PoolExhausted,
    Session,
    SessionPool,
    StatementOutput,
    committed_markers,
    kill,
    marker_insert,
    prepared_xids,
)
from twopc.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StatementFailed,
    TransactionAborted,
    TwopcError,
    Unavailable,
)
from twopc.failpoints import Failpoints
from twopc.logs import redact
from twopc.sql_guard import StatementKind
from twopc.votes import Vote

SEVER_AFTER_S = 2.0  # past a branch's deadline: KILL QUERY had its chance, the socket goes


def pool_exhausted(participant: str, err: PoolExhausted, txid: str) -> ResourceExhausted:
    """The answer when no pooled session came free for a new branch: nothing was started (the
    coordinator keeps the transaction as it was), and the message says which settings bound it."""
    return ResourceExhausted(
        f"participant {participant} has no database session for a new branch of {txid}: "
        f"{err.message}; nothing was started. Retry later; if one application holds them, "
        "lower the coordinator's max_sessions_per_identity, or raise this agent's pool",
        txid=txid,
    )


class BranchSteps:
    def __init__(
        self,
        *,
        config: AgentConfig,
        instance_id: str,
        pool: SessionPool,
        registry: BranchRegistry,
        admin: AdminSessions,
        takeover: Takeover,
        clock: Clock,
        failpoints: Failpoints,
        log: FilteringBoundLogger,
    ) -> None:
        self._config = config
        self._name = config.name
        self.reset_always = config.reset_sessions == "always"
        self._instance_id = instance_id
        self._pool = pool
        self._registry = registry
        self._admin = admin
        self._takeover = takeover
        self._clock = clock
        self._failpoints = failpoints
        self._log = log

    # Told how long each committed branch held its locks (the agent's metrics), when set.
    on_lock_hold: Callable[[float], None] | None = None

    def now(self) -> float:
        """The agent's clock (monotonic seconds)."""
        return self._clock()

    # --- starting and running statements ----------------------------------------------------------

    async def ensure_started(self, branch: Branch) -> None:
        if branch.forgotten:
            raise Unavailable(
                f"branch {branch.txid} on {self._name} could not be started; retry",
                txid=branch.txid,
            )
        if branch.session is not None or branch.state is not BranchState.ACTIVE:
            return
        try:
            session = await self._start_session(branch)
        except DbError as err:
            raise self.not_started(branch, err) from err
        self._log.debug("branch_started", txid=branch.txid, session=session.thread_id)

    async def _start_session(self, branch: Branch) -> Session:
        """Pins ``branch`` to a pooled session and starts it there. A pooled connection may be
        dead (the database restarted); XA START on it fails without effect, so it is tried once
        more on a fresh pool."""
        for attempt in (1, 2):
            session = await self._pool.session()
            branch.attach(session)
            try:
                await session.xa("START", branch.xid)
            except ConnectionLost:
                branch.discard_session()
                if attempt == 2:
                    raise
                self._pool.reset()
            except DbError:
                branch.release_session()
                raise
            else:
                return session
        raise AssertionError("unreachable")

    async def run_or_abort(
        self, branch: Branch, work: Sequence[Work], sequence: int
    ) -> list[StatementOutput]:
        if sequence == branch.last_sequence and sequence > 0:
            self.check_retry(branch, work, sequence)
            return branch.last_outputs  # a retry of the last call: its first answer
        if sequence < branch.last_sequence:
            raise FailedPrecondition(
                f"stale Execute on {self._name}: sequence {sequence} comes after "
                f"{branch.last_sequence} already ran",
                txid=branch.txid,
            )
        session = branch.session
        assert session is not None
        mark_for_reset(session, work, always=self.reset_always)
        outputs = []
        for index, item in enumerate(work, start=1):
            if self._clock() > branch.deadline:
                await self.abort(branch, "the transaction's deadline passed")
                raise TransactionAborted(
                    f"the transaction's deadline passed on {self._name}; branch rolled back",
                    txid=branch.txid,
                )
            await self._failpoints.ahit("agent.mid_statement")
            branch.running_since = self._clock()
            branch.first_statement_at = branch.first_statement_at or branch.running_since
            branch.running_statement = True
            try:
                output = await session.execute(
                    item.sql, item.params, max_rows=self._config.max_result_rows
                )
            except DbError as err:
                raise await self.abort_after_statement(branch, index, err) from err
            finally:
                branch.running_statement = False
            if item.kind is StatementKind.WRITE:
                branch.wrote = True
            outputs.append(output)
        branch.last_sequence = sequence
        branch.last_outputs = outputs
        branch.last_digest = work_digest(work)
        return outputs

    def check_retry(self, branch: Branch, work: Sequence[Work], sequence: int) -> None:
        """A call that repeats the last sequence number is a retry, answered with the first
        answer: InvalidArgument unless it carries the same statements and parameters (another
        call under a used number would otherwise get an answer to work that never ran)."""
        if sequence != branch.last_sequence or work_digest(work) != branch.last_digest:
            raise InvalidArgument(
                f"sequence {sequence} on {self._name} was used already, for other statements "
                f"or parameters (the last call that ran was sequence {branch.last_sequence}): "
                "a retry must repeat its call exactly; new work takes a new sequence number",
                txid=branch.txid,
            )

    async def abort_after_statement(
        self, branch: Branch, index: int, err: DbError
    ) -> StatementFailed:
        """Rolls the branch back after its statement ``index`` failed; the error to answer."""
        reason = (
            "the transaction's deadline passed during a statement"
            if self._clock() > branch.deadline
            else f"statement {index} failed: {err}"
        )
        await self.abort(branch, reason)
        return StatementFailed(
            f"{reason} on participant {self._name}; the transaction is rolled back",
            txid=branch.txid,
            mysql_errno=err.errno,
        )

    def not_started(self, branch: Branch, err: DbError) -> TwopcError:
        """XA START failed: the error to answer. The XID may belong to a prepared branch of an
        earlier life, so the branch is forgotten, never recorded as finished (a later commit of
        that prepared branch would be refused)."""
        self._registry.forget(branch)
        if isinstance(err, PoolExhausted):
            return pool_exhausted(self._name, err, branch.txid)
        if err.errno == ER_XAER_DUPID:
            return TransactionAborted(
                f"a branch of {branch.txid} already exists on {self._name} (prepared by an "
                "earlier attempt, or held by another session); this attempt was not started",
                txid=branch.txid,
            )
        return Unavailable(
            f"participant {self._name} could not start the branch: {err}", txid=branch.txid
        )

    # --- the step-by-step prepare ---------------------------------------------------------------

    async def prepare(self, branch: Branch, outputs: tuple[StatementOutput, ...]) -> VoteResult:
        session = branch.session
        assert session is not None
        if self._clock() > branch.deadline:
            await self.abort(branch, "the transaction's deadline passed before prepare")
            return VoteResult(Vote.ABORT, branch.reason)
        if not branch.wrote:
            # Rolled back, not committed: a SELECT that called a writing stored function must
            # not commit that write ahead of the global decision.
            try:
                await session.script(
                    [f"XA END {branch.xid.sql()}", f"XA ROLLBACK {branch.xid.sql()}"]
                )
            except DbError as err:
                await self.abort(branch, f"read-only finish failed: {err}")
                return VoteResult(Vote.ABORT, branch.reason, err.errno)
            self.finish(branch, BranchState.READ_ONLY)
            return VoteResult(Vote.READ_ONLY, outputs=outputs)
        xid = branch.xid.sql()
        try:  # one round trip: the marker, XA END and XA PREPARE
            await session.script(
                [self.marker_sql(branch), f"XA END {xid}", f"XA PREPARE {xid}"],
                self.pauses(branch, {2: "agent.after_end"}),
            )
        except ConnectionLost:
            branch.discard_session()
            return await self.vote_after_lost_prepare(branch, session.thread_id)
        except DbError as err:
            if err.errno == ER_DUP_ENTRY:
                await self.abort(
                    branch, "this transaction committed here before (a retried request)"
                )
                return VoteResult(Vote.ALREADY_COMMITTED, branch.reason)
            await self.abort(branch, f"prepare failed: {err}")
            return VoteResult(Vote.ABORT, branch.reason, err.errno)
        branch.move_to(BranchState.PREPARED)
        self._log.debug("branch_prepared", txid=branch.txid)
        await self._failpoints.ahit("agent.after_prepare")
        return VoteResult(Vote.PREPARED, outputs=outputs)

    async def vote_after_lost_prepare(self, branch: Branch, thread_id: int) -> VoteResult:
        """The connection broke during XA END/PREPARE: the server prepares the branch (it is
        then detached and listed by XA RECOVER) or rolls it back, but only once it is done with
        the session, which may still be executing the PREPARE."""
        try:
            async with self._admin.session() as admin:
                settled = await self._takeover.end_session(admin, thread_id)
                prepared = settled and branch.xid in await prepared_xids(admin)
        except Unavailable as err:
            settled, prepared = False, False
            reason = f"lost the database during prepare: {err}"
        else:
            reason = "lost the database during prepare"
        if not settled:
            # Cannot tell: say no. If it did prepare, recovery rolls it back (no commit record).
            self._registry.forget(branch)
            self._takeover.remember_doubtful(branch.txid, thread_id)
            return VoteResult(Vote.ABORT, reason)
        if prepared:
            branch.move_to(BranchState.PREPARED)
            return VoteResult(Vote.PREPARED)
        self.finish(branch, BranchState.ROLLED_BACK, "lost the database during prepare")
        return VoteResult(Vote.ABORT, branch.reason)

    # --- committing and rolling back on the branch's own session --------------------------------

    async def commit_one_phase(
        self, branch: Branch, work: Sequence[Work], sequence: int
    ) -> CommitResult:
        """Runs ``work`` on an active branch and commits it in one phase: the marker, XA END and
        XA COMMIT ... ONE PHASE in one round trip."""
        await self.ensure_started(branch)
        outputs = tuple(await self.run_or_abort(branch, work, sequence) if work else ())
        session = branch.session
        assert session is not None
        if self._clock() > branch.deadline:
            await self.abort(branch, "the transaction's deadline passed before commit")
            raise TransactionAborted(branch.reason, txid=branch.txid)
        xid = branch.xid.sql()
        marker = [self.marker_sql(branch)] if branch.wrote else []
        finish = [*marker, f"XA END {xid}", f"XA COMMIT {xid} ONE PHASE"]
        try:
            await session.script(finish, self.pauses(branch, {len(finish) - 1: "agent.after_end"}))
        except ConnectionLost as err:
            branch.discard_session()
            return await self._one_phase_after_lost_commit(branch, outputs, err, session.thread_id)
        except DbError as err:
            if err.errno == ER_DUP_ENTRY:
                await self.abort(branch, "this transaction committed here before")
                return CommitResult(outputs, already_committed=True)
            await self.abort(branch, f"one-phase commit failed: {err}")
            raise TransactionAborted(
                f"one-phase commit on {self._name} failed: {err}; rolled back",
                txid=branch.txid,
                mysql_errno=err.errno,
            ) from err
        self.finish(branch, BranchState.COMMITTED)
        await self._failpoints.ahit("agent.after_commit")
        return CommitResult(outputs)

    async def _one_phase_after_lost_commit(
        self, branch: Branch, outputs: tuple[StatementOutput, ...], err: DbError, thread_id: int
    ) -> CommitResult:
        if not branch.wrote:
            self.finish(branch, BranchState.READ_ONLY)
            return CommitResult(outputs)
        try:
            async with self._admin.session() as admin:
                # The marker tells only once the server is done with the session: until then
                # the commit may still be running there.
                settled = await self._takeover.end_session(admin, thread_id)
                committed = settled and bool(
                    await committed_markers(admin, self._config.marker_table, [branch.txid])
                )
        except Unavailable as again:
            settled, problem = False, str(again)
        else:
            problem = f"session {thread_id} did not end"
        if not settled:
            self._registry.forget(branch)
            self._takeover.remember_doubtful(branch.txid, thread_id)
            raise Unavailable(
                f"lost the database during a one-phase commit on {self._name} and cannot tell "
                f"whether it committed ({problem}); ask again later",
                txid=branch.txid,
            ) from err
        if committed:
            self.finish(branch, BranchState.COMMITTED)
            return CommitResult(outputs)
        self.finish(branch, BranchState.ROLLED_BACK, "lost the database during commit")
        raise TransactionAborted(
            f"lost the database during a one-phase commit on {self._name}; it rolled back",
            txid=branch.txid,
        ) from err

    async def commit_prepared(self, branch: Branch) -> CommitResult:
        if branch.state is BranchState.ROLLED_BACK:
            raise FailedPrecondition(
                f"branch {branch.txid} on {self._name} was rolled back ({branch.reason}); "
                "it cannot commit",
                txid=branch.txid,
            )
        if branch.state.finished:
            return CommitResult(already_committed=True)
        if branch.state is BranchState.ACTIVE:
            raise FailedPrecondition(
                f"branch {branch.txid} on {self._name} is not prepared; a two-phase commit "
                "needs a prepared branch",
                txid=branch.txid,
            )
        session = branch.session
        if session is not None:
            try:
                await session.xa("COMMIT", branch.xid)
            except DbError:
                branch.discard_session()
            else:
                await self._failpoints.ahit("agent.after_commit")
                self.finish(branch, BranchState.COMMITTED)
                return CommitResult()
        already = await self._takeover.commit(branch.xid)
        self.finish(branch, BranchState.COMMITTED)
        return CommitResult(already_committed=already)

    async def rollback_prepared(self, branch: Branch) -> bool:
        session = branch.session
        if session is not None:
            try:
                await session.xa("ROLLBACK", branch.xid)
            except DbError:
                branch.discard_session()
            else:
                self.finish(branch, BranchState.ROLLED_BACK, "rolled back on request")
                return False
        already = await self._takeover.rollback(branch.xid)
        self.finish(branch, BranchState.ROLLED_BACK, "rolled back on request")
        return already

    async def abort(self, branch: Branch, reason: str) -> None:
        """Rolls back an ACTIVE branch. Dropping the session is the fallback: the server rolls
        back an unprepared branch whose session ends."""
        session = branch.session
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
                branch.discard_session()
        self.finish(branch, BranchState.ROLLED_BACK, reason)
        self._log.info("branch_rolled_back", txid=branch.txid, reason=redact(reason))

    def finish(self, branch: Branch, state: BranchState, reason: str = "") -> None:
        """Records the branch's final state; the session it still holds goes back to the pool."""
        branch.move_to(state, reason)
        self._registry.finish(branch)
        if state is BranchState.COMMITTED and branch.first_statement_at and self.on_lock_hold:
            # From its first statement to its XA COMMIT: how long it held its row locks.
            self.on_lock_hold(self._clock() - branch.first_statement_at)

    # --- interrupting a branch that another call holds ------------------------------------------

    async def interrupt_if_running(self, branch: Branch) -> None:
        session = branch.session
        if not branch.running_statement or session is None:
            return
        if self._clock() > branch.deadline + SEVER_AFTER_S:
            # KILL QUERY has not ended it: the statement or its answer is lost on a dead link,
            # and the call would wait out mysql_read_timeout_s. Shutting the socket ends the
            # wait now; the server rolls the branch back once it sees the connection go.
            if not branch.severed:
                branch.severed = True
                self._log.warning("branch_connection_severed", txid=branch.txid)
            session.sever()
            return
        await self.kill_session_of(branch, query_only=True)

    async def kill_session_of(self, branch: Branch, *, query_only: bool = False) -> None:
        """KILL [QUERY] on the session of ``branch``, from an admin session; a failure is
        logged (the caller has a fallback: the read timeout, or the process's exit)."""
        session = branch.session
        if session is None:
            return
        try:
            async with self._admin.session() as admin:
                await kill(admin, session.thread_id, query_only=query_only)
        except Unavailable as err:
            self._log.warning(
                "kill_failed", txid=branch.txid, query_only=query_only, error=str(err)
            )

    # --- helpers ----------------------------------------------------------------------------------

    def marker_sql(self, branch: Branch) -> str:
        return marker_insert(self._config.marker_table, branch.xid, self._instance_id)

    def pauses(self, branch: Branch, points: Mapping[int, str]) -> dict[int, Pause]:
        """The crash points among ``points`` (statement index -> failpoint) that are armed, as
        pauses for ``Session.batch`` or ``Session.script``. A point that is not armed adds no
        pause: the round trip stays whole. While paused the branch runs no statement, so the
        reaper does not interrupt it (as on the step-by-step path, where the point falls
        between two calls)."""
        armed = {name for name in set(points.values()) if self._failpoints.spec(name)}
        if not armed:
            return {}

        def pause_at(name: str) -> Pause:
            async def pause() -> None:
                running, branch.running_statement = branch.running_statement, False
                try:
                    await self._failpoints.ahit(name)
                finally:
                    branch.running_statement = running

            return pause

        return {index: pause_at(name) for index, name in points.items() if name in armed}
