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
  rolling back keeps a write hidden in a stored function from committing early). A one-shot
  branch (statements sent with the prepare) does all of it in one round trip.
- Commit / Rollback: by the owning session when the agent has it; otherwise from any session. When
  the server answers XAER_NOTA, the marker row tells committed (present) from rolled back (absent);
  a branch still listed by XA RECOVER is held by a live session (a frozen or partitioned agent):
  the marker names that session, the agent kills it, and then finishes the branch.

This module is the RPC surface: it validates requests, finds the branch, takes its lock and hands
it to the part that does the work, each in a module of its own:
- ``steps.BranchSteps``: a branch's steps on its own session (statements, the step-by-step
  prepare, the one-phase commit, commit and rollback by the owner, abort);
- ``one_trip.OneTripPrepare``: the one-trip prepare of a one-shot branch;
- ``takeover.Takeover``: finishing a branch from another session, and doubtful sessions;
- ``admin.AdminSessions``: sessions for the agent's own commands.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext

import structlog

from participants.admin import AdminSessions
from participants.branches import (
    Branch,
    BranchRegistry,
    BranchState,
    Clock,
    FinishedBranch,
    locked,
    take_lock,
)
from participants.calls import (
    CommitResult,
    RecoveredBranch,
    StatementRequest,
    VoteResult,
    Work,
    checked_work,
)
from participants.config import AgentConfig
from participants.fences import FENCE_GTRID_PREFIX, Fences
from participants.lock_waits import LockWaits, WaitReport
from participants.one_trip import OneTripPrepare
from participants.safety import DatabaseChecks
from participants.steps import BranchSteps
from participants.takeover import Takeover
from participants.xa import (
    ConnectionLost,
    Session,
    SessionPool,
    StatementOutput,
    committed_markers,
    durable_xa_problem,
    prepared_xids,
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
from twopc.txid import (
    Xid,
    check_coordinator_id,
    check_participant_name,
    check_txid_prefix,
    parse_txid,
)
from twopc.votes import Presence, Vote

_LOCK_WAIT_S = 60.0
_FENCE_PATIENCE_S = 2.0  # how long raising a fence waits for an active branch's lock


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        pool: SessionPool,
        *,
        clock: Clock = time.monotonic,
        failpoints: Failpoints | None = None,
        instance_id: str | None = None,
        lock_waits_pool: SessionPool | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.instance_id = instance_id or secrets.token_hex(16)
        self._pool = pool
        self._clock = clock
        failpoints = failpoints or Failpoints()
        self._registry = BranchRegistry(
            capacity=config.max_branches, finished_memory=config.finished_branch_memory
        )
        self._log = structlog.get_logger("twopc.agent").bind(participant=self.name)
        self._admin = AdminSessions(pool, self.name)
        self._takeover = Takeover(
            participant=self.name,
            marker_table=config.marker_table,
            admin=self._admin,
            clock=clock,
            failpoints=failpoints,
            log=self._log,
        )
        self._steps = BranchSteps(
            config=config,
            instance_id=self.instance_id,
            pool=pool,
            registry=self._registry,
            admin=self._admin,
            takeover=self._takeover,
            clock=clock,
            failpoints=failpoints,
            log=self._log,
        )
        self._one_trip = OneTripPrepare(
            participant=self.name,
            max_result_rows=config.max_result_rows,
            pool=pool,
            registry=self._registry,
            steps=self._steps,
            failpoints=failpoints,
            log=self._log,
        )
        # Lock waits are read as lock_waits_user (PROCESS only) when it is set, else as the
        # agent's own user; always on an admin session, never a branch's.
        self._lock_waits_pool = lock_waits_pool
        self._lock_waits = LockWaits(
            participant=self.name,
            enabled=config.report_lock_waits,
            registry=self._registry,
            admin=AdminSessions(lock_waits_pool, self.name) if lock_waits_pool else self._admin,
            clock=clock,
            log=self._log,
        )
        self._checks = DatabaseChecks(config, self._log)
        self._fences = Fences(
            participant=self.name,
            marker_table=config.marker_table,
            admin=self._admin,
            instance_id=self.instance_id,
            served=config.coordinator_ids,
            abort_active=self._abort_active_of,
            log=self._log,
        )
        self.server_version = ""

    # --- start and stop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Checks the server and the agent's user (``participants.safety``) and creates the
        marker table. Raises FailedPrecondition when the server's XA PREPARE is not durable or
        a check fails that its setting does not downgrade, Unavailable when the server cannot
        be reached."""
        async with self._admin.session() as session:
            version = str((await session.execute("SELECT VERSION()")).rows[0][0])
            problem = durable_xa_problem(version)
            if problem is not None:
                raise FailedPrecondition(problem)
            await self._checks.at_start(session)
            await self._warn_of_foreign_branches(session)
            flush = (await session.execute("SELECT @@innodb_flush_log_at_trx_commit")).rows[0][0]
        await self._fences.load()
        self.server_version = version
        if int(flush) != 1:
            self._log.warning(
                "prepare_not_crash_safe",
                innodb_flush_log_at_trx_commit=int(flush),
                detail="prepared branches may be lost if the database host crashes; set it to 1",
            )
        self._log.info(
            "agent_ready",
            server_version=version,
            instance=self.instance_id,
            schemas=list(self.config.statement_schemas),
        )

    async def close(self, patience: float = 1.0) -> None:
        """Rolls back active branches and lets prepared ones go (they stay prepared on the
        server, where recovery finishes them). Bounded: a branch whose statement is still
        running (a lock wait, a cut link) is not waited for; its session is killed, and the
        server rolls an unprepared branch back when its session ends."""
        for branch in self._registry.live():
            if not await take_lock(branch, patience):
                await self._steps.kill_session_of(branch)
                continue
            try:
                if branch.state is BranchState.ACTIVE:
                    await self._steps.abort(branch, "agent shutting down")
                else:
                    branch.discard_session()
            finally:
                branch.lock.release()
        self._pool.dispose()
        if self._lock_waits_pool is not None:
            self._lock_waits_pool.dispose()

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
        epoch: int = 0,
    ) -> list[StatementOutput]:
        async with self._fenced(txid, epoch):
            return await self._execute(
                txid, participant, statements, sequence, timeout_ms, continues=continues
            )

    async def _execute(
        self,
        txid: str,
        participant: str,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
        *,
        continues: bool,
    ) -> list[StatementOutput]:
        xid = self._xid(txid, participant, starts=True)
        work = self._check(statements)
        if sequence < 1:
            raise InvalidArgument("sequence numbers start at 1", txid=txid)
        deadline = self._deadline(timeout_ms, txid)
        found = self._registry.create(xid, deadline)
        if isinstance(found, FinishedBranch):
            raise self._finished_error(txid, found)
        async with locked(found, _LOCK_WAIT_S, self.name):
            if continues and found.session is None and found.state is BranchState.ACTIVE:
                # Created just now: the branch that ran the earlier statements is gone.
                self._registry.forget(found)
                raise TransactionAborted(
                    f"participant {self.name} lost the branch of {txid} (its agent or database "
                    "restarted): the statements that ran on it earlier are gone, so the "
                    "transaction is rolled back",
                    txid=txid,
                )
            await self._steps.ensure_started(found)
            if found.state is not BranchState.ACTIVE:
                raise self._not_active_error(found)
            return await self._steps.run_or_abort(found, work, sequence)

    async def prepare(
        self,
        txid: str,
        participant: str,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
        *,
        epoch: int = 0,
    ) -> VoteResult:
        async with self._fenced(txid, epoch):
            return await self._prepare(txid, participant, statements, sequence, timeout_ms)

    async def _prepare(
        self,
        txid: str,
        participant: str,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
    ) -> VoteResult:
        xid = self._xid(txid, participant, starts=True)
        work = self._check(statements)
        deadline = self._deadline(timeout_ms, txid)
        found = self._registry.get(txid)
        if found is None:
            if not work:
                return await self._vote_without_branch(xid)
            found = self._registry.create(xid, deadline)
        if isinstance(found, FinishedBranch):
            return await self._vote_of_finished(xid.txid, found)
        async with locked(found, _LOCK_WAIT_S, self.name):
            if found.state.finished:
                return await self._vote_of_finished(
                    xid.txid, FinishedBranch(found.state, found.reason)
                )
            if found.state is BranchState.PREPARED:
                if work:  # a retried one-shot prepare: its statements must be the first's
                    self._steps.check_retry(found, work, sequence)
                return VoteResult(Vote.PREPARED, outputs=tuple(found.last_outputs))
            if self._one_trip.possible(found, work):
                return await self._one_trip.prepare(found, work, sequence)
            try:
                await self._steps.ensure_started(found)
                outputs = await self._steps.run_or_abort(found, work, sequence) if work else []
            except StatementFailed as err:
                return VoteResult(Vote.ABORT, err.message, err.mysql_errno)
            except TransactionAborted as err:
                return VoteResult(Vote.ABORT, err.message)
            return await self._steps.prepare(found, tuple(outputs))

    async def commit(
        self,
        txid: str,
        participant: str,
        *,
        one_phase: bool,
        statements: Sequence[StatementRequest] = (),
        sequence: int = 0,
        timeout_ms: int = 0,
        epoch: int = 0,
    ) -> CommitResult:
        async with self._fenced(txid, epoch):
            return await self._commit(
                txid,
                participant,
                one_phase=one_phase,
                statements=statements,
                sequence=sequence,
                timeout_ms=timeout_ms,
            )

    async def _commit(
        self,
        txid: str,
        participant: str,
        *,
        one_phase: bool,
        statements: Sequence[StatementRequest],
        sequence: int,
        timeout_ms: int,
    ) -> CommitResult:
        xid = self._xid(txid, participant, starts=one_phase)
        work = self._check(statements)
        if work and not one_phase:
            raise InvalidArgument("statements come with a one-phase commit only", txid=txid)
        if one_phase:
            deadline = self._deadline(timeout_ms, txid)
            return await self._commit_one_phase(xid, work, sequence, deadline)
        found = self._registry.get(txid)
        if isinstance(found, FinishedBranch) and found.state is not BranchState.ROLLED_BACK:
            return CommitResult(already_committed=True)
        if found is None or isinstance(found, FinishedBranch):
            # Remembered as rolled back, or not at all: the server decides (it refuses, with
            # FailedPrecondition, a branch that is neither prepared nor committed).
            already = await self._takeover.commit(xid)
            self._log.info("branch_committed", txid=txid, by="recovery", already=already)
            return CommitResult(already_committed=already)
        async with locked(found, _LOCK_WAIT_S, self.name):
            return await self._steps.commit_prepared(found)

    async def rollback(self, txid: str, participant: str, *, epoch: int = 0) -> bool:
        """Rolls the branch back; True when there was nothing left to roll back."""
        async with self._fenced(txid, epoch):
            return await self._rollback(txid, participant)

    async def _rollback(self, txid: str, participant: str) -> bool:
        xid = self._xid(txid, participant)
        found = self._registry.tombstone(txid, "rolled back before this agent saw it")
        if found is None:
            # Nothing held here: what the server holds (a branch prepared in an earlier life of
            # the agent) is rolled back, and the tombstone refuses a request still on its way.
            return await self._rollback_on_server(xid, "rolled back before this agent saw it")
        if isinstance(found, FinishedBranch):
            if found.state is BranchState.COMMITTED:
                raise FailedPrecondition(
                    f"branch {txid} on {self.name} committed; it cannot be rolled back", txid=txid
                )
            # What the agent remembers is advice; the server is the truth (recovery asks to roll
            # back what XA RECOVER lists).
            return await self._rollback_on_server(xid, found.reason)
        await self._steps.interrupt_if_running(found)
        async with locked(found, _LOCK_WAIT_S, self.name):
            if found.forgotten:
                # Given up meanwhile by the call that held it: its outcome on the server is not
                # known here (a one-phase commit whose connection broke may have landed). The
                # server decides, once the broken session has ended.
                self._registry.tombstone(txid, "rolled back on request")
                return await self._rollback_on_server(xid, "rolled back on request")
            if found.state is BranchState.COMMITTED:
                raise FailedPrecondition(
                    f"branch {txid} on {self.name} committed; it cannot be rolled back", txid=txid
                )
            if found.state.finished:
                return True
            if found.state is BranchState.ACTIVE:
                await self._steps.abort(found, "rolled back on request")
                return False
            return await self._steps.rollback_prepared(found)

    async def _rollback_on_server(self, xid: Xid, reason: str) -> bool:
        """XA ROLLBACK of ``xid`` on the server, behind a tombstone; the registry then holds the
        outcome the server gave (rolled back, confirmed; or committed)."""
        try:
            nothing = await self._takeover.rollback(xid)
        except FailedPrecondition:
            self._registry.remember(xid.txid, FinishedBranch(BranchState.COMMITTED, ""))
            raise
        self._registry.remember(xid.txid, FinishedBranch(BranchState.ROLLED_BACK, reason))
        return nothing

    async def recover(self, txid_prefix: str, *, epoch: int = 0) -> list[RecoveredBranch]:
        """The prepared branches whose txid starts with ``txid_prefix``. With an epoch, the
        prefix is a coordinator id's (``<id>.``) and the call is fenced as the others are: the
        id's new holder lists only once no call of an older epoch runs any more."""
        check_txid_prefix(txid_prefix)
        if not epoch:
            return await self._recover(txid_prefix)
        coordinator_id, dot, rest = txid_prefix.partition(".")
        if not dot or rest:
            raise InvalidArgument(
                f"a Recover with an epoch lists one coordinator id's branches: its prefix is "
                f"'<coordinator id>.', not {txid_prefix!r}"
            )
        check_coordinator_id(coordinator_id)
        async with self._fences.admitted(coordinator_id, epoch):
            return await self._recover(txid_prefix)

    async def _recover(self, txid_prefix: str) -> list[RecoveredBranch]:
        async with self._admin.session() as session:
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
        for txid in txids:
            parse_txid(txid)
        result: dict[str, Presence] = {}
        unknown = []
        for txid in txids:
            found = self._registry.get(txid)
            if isinstance(found, Branch):
                result[txid] = (
                    Presence.PREPARED if found.state is BranchState.PREPARED else Presence.ACTIVE
                )
            elif isinstance(found, FinishedBranch) and found.state is BranchState.COMMITTED:
                result[txid] = Presence.COMMITTED
            elif (
                isinstance(found, FinishedBranch)
                and found.state is BranchState.ROLLED_BACK
                and found.confirmed
            ):
                result[txid] = Presence.ROLLED_BACK
            else:
                # A tombstone is advice, not the truth: written before the server confirmed the
                # rollback (a one-phase commit whose connection broke, then a rollback that could
                # not reach the server), and that commit may have landed. The server's marker
                # answers (a chaos run found a lookup answered "aborted" for a commit).
                unknown.append(txid)
        if unknown:
            async with self._admin.session() as session:
                for txid in unknown:
                    await self._takeover.settle_doubtful(session, txid)
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

    async def waits_for(self, min_wait_ms: int) -> list[WaitReport]:
        """Lock waits of this agent's branches whose statement has run ``min_wait_ms`` at least
        (``lock_waits``); no SQL when there is none. ``min_wait_ms`` is at least the agent's
        ``lock_wait_report_ms``."""
        return await self._lock_waits.report(max(min_wait_ms, self.config.lock_wait_report_ms))

    def observe_lock_hold(self, callback: Callable[[float], None]) -> None:
        """``callback(seconds)`` for each committed branch: from its first statement to its
        XA COMMIT, how long it held its locks."""
        self._steps.on_lock_hold = callback

    def fence_epochs(self) -> dict[str, int]:
        """The highest lease epoch seen per coordinator id (``participants.fences``)."""
        return self._fences.epochs()

    def _fenced(self, txid: str, epoch: int) -> AbstractAsyncContextManager[None]:
        """The call as one of its coordinator id at ``epoch`` (``participants.fences``)."""
        try:
            coordinator_id = parse_txid(txid).coordinator_id
        except InvalidArgument:
            return nullcontext()  # the call itself refuses the txid, with the same message
        return self._fences.admitted(coordinator_id, epoch, txid)

    async def _abort_active_of(self, coordinator_id: str) -> int:
        """Rolls back the branches of ``coordinator_id`` that are active here (never prepared):
        the member that ran them was deposed. Returns how many."""
        prefix = f"{coordinator_id}."
        aborted = 0
        for branch in self._registry.live():
            if not branch.txid.startswith(prefix) or branch.state is not BranchState.ACTIVE:
                continue
            await self._steps.interrupt_if_running(branch)
            if not await take_lock(branch, _FENCE_PATIENCE_S):
                continue  # its call is still running: the fence waits for it to end
            try:
                if branch.state is BranchState.ACTIVE and not branch.forgotten:
                    await self._steps.abort(branch, "its coordinator was deposed (fenced)")
                    aborted += 1
            finally:
                branch.lock.release()
        return aborted

    def counts(self) -> tuple[int, int]:
        return self._registry.counts()

    @property
    def pool(self) -> SessionPool:
        return self._pool

    @property
    def refusing(self) -> bool:
        """True while a safety check refuses new branches (``participants.safety``)."""
        return self._checks.refusal is not None

    async def database_reachable(self) -> bool:
        """Asks the database ``SELECT 1`` on a pooled session: False when it cannot be reached
        (no connection, or the link broke), True when it answered, and also when every pooled
        session is busy (the database is in use, so it answers)."""
        try:
            async with self._admin.session() as session:
                await session.execute("SELECT 1")
        except Unavailable as err:
            return not isinstance(err.__cause__, ConnectionLost)
        return True

    # --- housekeeping -----------------------------------------------------------------------------

    async def reap_expired(self) -> int:
        """Rolls back active branches past their deadline (a statement still running is
        interrupted first). Returns how many were rolled back now."""
        reaped = 0
        now = self._clock()
        for branch in self._registry.live():
            if branch.state is not BranchState.ACTIVE or now <= branch.deadline:
                continue
            if not await take_lock(branch, 0):  # busy: interrupted now, reaped next time
                await self._steps.interrupt_if_running(branch)
                continue
            try:
                if branch.state is BranchState.ACTIVE:
                    await self._steps.abort(branch, "the transaction's deadline passed")
                    reaped += 1
            finally:
                branch.lock.release()
        return reaped

    async def check_database(self) -> None:
        """The start's checks of the agent's user and tables, again (rights can be granted and
        tables altered while it runs): in "refuse" mode, no new branch starts while one
        fails."""
        async with self._admin.session() as session:
            await self._checks.again(session)
            await self._warn_of_foreign_branches(session)

    async def _warn_of_foreign_branches(self, session: Session) -> None:
        """Logs the prepared branches on this participant whose coordinator id is not one this
        agent serves: no recovery of this agent's coordinators touches them, so they hold their
        locks until an operator rolls them back (Rollback, or XA ROLLBACK)."""
        served = tuple(f"{c}." for c in self.config.coordinator_ids)
        foreign = sorted(
            x.txid
            for x in await prepared_xids(session)
            if x.branch == self.name and not x.txid.startswith(served)
        )
        if foreign:
            self._log.warning(
                "foreign_prepared_branches",
                count=len(foreign),
                txids=foreign[:50],
                coordinator_ids=list(self.config.coordinator_ids),
                detail="prepared branches of coordinator ids this agent does not serve: no "
                "recovery resolves them; roll them back, or add their id to coordinator_ids",
            )

    async def collect_markers(self, limit: int = 1000) -> int:
        """Deletes marker rows older than the retention; returns how many went."""
        async with self._admin.session() as session:
            output = await session.execute(
                f"DELETE FROM `{self.config.marker_table}` "
                "WHERE created_at < NOW(6) - INTERVAL %s SECOND AND gtrid NOT LIKE %s LIMIT %s",
                [self.config.marker_retention_s, FENCE_GTRID_PREFIX + b"%", limit],
            )
        return output.affected_rows

    # --- answers about branches that are finished or not held here --------------------------------

    async def _commit_one_phase(
        self, xid: Xid, work: Sequence[Work], sequence: int, deadline: float
    ) -> CommitResult:
        found = self._registry.get(xid.txid)
        if found is None and not work:
            async with self._admin.session() as admin:
                await self._takeover.settle_doubtful(admin, xid.txid)
                if await committed_markers(admin, self.config.marker_table, [xid.txid]):
                    return CommitResult(already_committed=True)
            raise TransactionAborted(
                f"participant {self.name} has no branch of {xid.txid}: it was rolled back "
                "(the agent or its database restarted)",
                txid=xid.txid,
            )
        if found is None:
            found = self._registry.create(xid, deadline)
        if isinstance(found, FinishedBranch):
            return await self._one_phase_result_of_finished(xid.txid, found)
        async with locked(found, _LOCK_WAIT_S, self.name):
            if found.state.finished:
                return await self._one_phase_result_of_finished(
                    xid.txid, FinishedBranch(found.state, found.reason)
                )
            if found.state is BranchState.PREPARED:
                raise FailedPrecondition(
                    f"branch {xid.txid} is prepared: it takes a two-phase commit", txid=xid.txid
                )
            return await self._steps.commit_one_phase(found, work, sequence)

    async def _one_phase_result_of_finished(self, txid: str, found: FinishedBranch) -> CommitResult:
        if found.state is BranchState.ROLLED_BACK and await self._takeover.committed(txid):
            return CommitResult(already_committed=True)
        if found.state is BranchState.ROLLED_BACK:
            raise TransactionAborted(
                f"branch {txid} on {self.name} was rolled back: {found.reason}", txid=txid
            )
        return CommitResult(already_committed=True)

    async def _vote_of_finished(self, txid: str, found: FinishedBranch) -> VoteResult:
        if found.state is BranchState.READ_ONLY:
            return VoteResult(Vote.READ_ONLY)
        if found.state is BranchState.COMMITTED or await self._takeover.committed(txid):
            return VoteResult(Vote.ALREADY_COMMITTED, "the branch committed already")
        return VoteResult(Vote.ABORT, found.reason or "the branch was rolled back")

    async def _vote_without_branch(self, xid: Xid) -> VoteResult:
        """Prepare for a branch this agent does not hold: prepared in an earlier life of the agent
        (a retried prepare), or lost with it."""
        async with self._admin.session() as session:
            if xid in await prepared_xids(session):
                return VoteResult(Vote.PREPARED)
        return VoteResult(
            Vote.ABORT,
            f"participant {self.name} has no branch of {xid.txid} (its agent or database "
            "restarted before prepare)",
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _xid(self, txid: str, participant: str, *, starts: bool = False) -> Xid:
        """The branch's XID; InvalidArgument (echoing neither) for a txid that is not one, or a
        participant name that is not this agent's. For a call that ``starts`` or prepares a
        branch, FailedPrecondition when the txid's coordinator id is not one this agent serves
        (``coordinator_ids``): nothing was started."""
        coordinator_id = parse_txid(txid).coordinator_id
        if starts and coordinator_id not in self.config.coordinator_ids:
            served = ", ".join(self.config.coordinator_ids)
            raise FailedPrecondition(
                f"agent {self.name} serves coordinator id(s) {served} (its coordinator_ids "
                f"setting), not {coordinator_id!r}: no branch of {txid} was started; add "
                f"{coordinator_id!r} to coordinator_ids if that coordinator uses this agent",
                txid=txid,
            )
        if participant != self.name:
            check_participant_name(participant)
            raise InvalidArgument(
                f"this agent serves participant {self.name!r}, not {participant!r}: check the "
                "coordinator's participants map",
                txid=txid,
            )
        return Xid(txid, participant)

    def _check(self, statements: Sequence[StatementRequest]) -> list[Work]:
        work = checked_work(statements, self.config.marker_table)
        if work:  # statements start or extend a branch: not while the database checks fail
            self._checks.admit()
        return work

    def _deadline(self, timeout_ms: int, txid: str) -> float:
        """When a branch given ``timeout_ms`` (0: the default) expires; InvalidArgument past the
        agent's ``max_timeout_ms`` (a branch holds a pooled session and its locks until then)."""
        if timeout_ms > self.config.max_timeout_ms:
            raise InvalidArgument(
                f"timeout_ms {timeout_ms} is more than the {self.config.max_timeout_ms} that "
                "this agent allows a branch (its max_timeout_ms setting)",
                txid=txid,
            )
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
