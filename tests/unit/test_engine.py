"""The coordinator's protocol logic (states, decisions, phase 2, recovery, lookup) against fakes.

No database, no gRPC, no sleeping: agents are ``FakeParticipants``, the decision log is in memory
and the clock is a ``FakeClock`` (see ``tests/unit/fakes.py``). Each test runs its scenario in
``asyncio.run`` through the ``scenario`` decorator, with a real-time safety net that only a hang
reaches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec

import pytest
import structlog.testing

from coordinator.decision_log import (
    CommitRecord,
    DecisionLogFailed,
    DecisionLogFenced,
    DecisionLogFull,
    Replay,
)
from coordinator.engine.aborts import CLIENT_ERRORS, AbortCause, AbortReason
from coordinator.engine.manager import EngineSettings, Transaction, TransactionManager
from coordinator.engine.ports import CommitReply, Vote, VoteReply
from coordinator.engine.recovery import Recovery
from coordinator.engine.states import (
    TRANSITIONS,
    IllegalTransition,
    Outcome,
    TxState,
    check_transition,
    outcome_of,
)
from participants import branches
from participants.branches import Branch, BranchRegistry, BranchState
from tests.unit.fakes import FakeClock, FakeParticipants, Gate, InMemoryDecisionLog
from twopc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatementFailed,
    TransactionAborted,
    TransactionConflict,
    TwopcError,
    Unavailable,
)
from twopc.failpoints import Failpoints
from twopc.txid import Xid

P = ParamSpec("P")

DEADLINE_S = 5.0  # real time; reached only if a scenario hangs
REGIONS = ("eu", "us", "ap")
WRITE = "UPDATE accounts SET balance = balance + 1 WHERE id = 1"
READ = "SELECT balance FROM accounts WHERE id = 1"
SETTINGS = EngineSettings(
    coordinator_id="c1",
    default_timeout_ms=10_000,
    max_timeout_ms=60_000,
    max_active=100,
    rpc_timeout_s=1.0,
    phase2_attempts=4,
    phase2_backoff_s=0.05,
    finished_memory=1_000,
)
UNKNOWN_TXID = "c1.0000018f00000000000000000000beef"


def scenario(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Runs an async test function in its own event loop."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), DEADLINE_S))

    return run


@dataclasses.dataclass
class Env:
    ports: FakeParticipants
    log: InMemoryDecisionLog
    clock: FakeClock
    manager: TransactionManager
    fatal: list[BaseException]
    failpoints: Failpoints

    async def open(self, work: Iterable[tuple[str, str]], timeout_ms: int = 5_000) -> Transaction:
        """Begins a transaction and executes one statement per (participant, statement)."""
        tx = self.manager.begin(timeout_ms)
        for sequence, (participant, statement) in enumerate(work, start=1):
            await self.manager.execute(tx.txid, participant, [statement], sequence)
        return tx

    async def drain(self) -> None:
        """Waits for the manager's background tasks (phase 2, quiet rollbacks)."""
        while self.manager._background:
            await asyncio.gather(*list(self.manager._background), return_exceptions=True)

    def assert_decision_first(self, txid: str) -> None:
        """I4: every two-phase XA COMMIT of ``txid`` went out after its record was durable."""
        durable = self.log.durable_at[txid]
        commits = self.ports.indexes_of("commit", txid, one_phase=False)
        assert commits, f"no phase-2 commit was sent for {txid}"
        assert min(commits) >= durable, (commits, durable)


def make_env(
    names: Sequence[str] = REGIONS,
    *,
    replay: Replay | None = None,
    failpoints: dict[str, str] | None = None,
    clock: FakeClock | None = None,
    **overrides: Any,
) -> Env:
    """An engine over fakes; ``failpoints`` arms coordinator points (short name -> spec)."""
    ports = FakeParticipants(names)
    log = InMemoryDecisionLog(ports.calls, replay)
    clock = clock or FakeClock()
    fatal: list[BaseException] = []
    points = Failpoints({f"coordinator.{k}": v for k, v in (failpoints or {}).items()})
    manager = TransactionManager(
        dataclasses.replace(SETTINGS, **overrides),
        ports,
        log,
        clock=clock,
        failpoints=points,
        on_fatal=fatal.append,
    )
    return Env(ports, log, clock, manager, fatal, points)


def fired(points: Failpoints, name: str) -> int:
    return next(state.fired for state in points.snapshot() if state.name == name)


async def until(predicate: Callable[[], bool], what: str, steps: int = 1_000) -> None:
    """Lets the loop run until ``predicate`` holds, for at most ``steps`` loop steps."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} did not happen within {steps} loop steps")


# --------------------------------------------------------------------------------------------------
# State machines: every (state, target) pair of both tables
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("current", "target"), list(itertools.product(TxState, TxState)))
def test_transaction_transition_table(current: TxState, target: TxState) -> None:
    if target in TRANSITIONS[current]:
        check_transition("c1.r-t", current, target)
        tx = Transaction(txid="c1.r-t", deadline=0.0, timeout_ms=1, state=current)
        tx.move_to(target)
        assert tx.state is target
        assert tx.decided.is_set() == (target is not TxState.PREPARING)
        assert tx.done.is_set() == target.final
    else:
        with pytest.raises(IllegalTransition, match=f"from {current.value} to {target.value}"):
            check_transition("c1.r-t", current, target)


def test_transition_table_covers_every_state_and_final_states_are_dead_ends() -> None:
    assert set(TRANSITIONS) == set(TxState)
    assert {s for s in TxState if s.final} == {TxState.COMMITTED, TxState.ABORTED}
    assert all(not TRANSITIONS[s] for s in TxState if s.final)
    assert issubclass(IllegalTransition, FailedPrecondition)


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        (TxState.ACTIVE, Outcome.PENDING),
        (TxState.PREPARING, Outcome.PENDING),
        (TxState.COMMITTING, Outcome.COMMITTED),
        (TxState.COMMITTED, Outcome.COMMITTED),
        (TxState.ABORTING, Outcome.ABORTED),
        (TxState.ABORTED, Outcome.ABORTED),
    ],
)
def test_outcome_of(state: TxState, outcome: Outcome) -> None:
    assert outcome_of(state) is outcome


@pytest.mark.parametrize(("current", "target"), list(itertools.product(BranchState, BranchState)))
def test_branch_transition_table(current: BranchState, target: BranchState) -> None:
    branch = Branch(xid=Xid("c1.r-b", "eu"), deadline=0.0, state=current)
    if target in branches.TRANSITIONS[current]:
        branch.move_to(target, "why")
        assert branch.state is target
        assert branch.reason == "why"
    else:
        with pytest.raises(
            branches.IllegalTransition, match=f"from {current.value} to {target.value}"
        ):
            branch.move_to(target)
        assert branch.state is current


def test_branch_table_covers_every_state_and_finished_states_are_dead_ends() -> None:
    assert set(branches.TRANSITIONS) == set(BranchState)
    finished = {s for s in BranchState if s.finished}
    assert finished == {BranchState.COMMITTED, BranchState.ROLLED_BACK, BranchState.READ_ONLY}
    assert all(not branches.TRANSITIONS[s] for s in finished)


def test_branch_registry_create_finish_forget_and_bounds() -> None:
    registry = BranchRegistry(capacity=2, finished_memory=1)
    a = registry.create(Xid("c1.r-a", "eu"), 1.0)
    assert registry.create(Xid("c1.r-a", "eu"), 9.0) is a
    b = registry.create(Xid("c1.r-b", "eu"), 1.0)
    with pytest.raises(ResourceExhausted):
        registry.create(Xid("c1.r-c", "eu"), 1.0)
    assert isinstance(a, Branch)
    assert isinstance(b, Branch)
    a.move_to(BranchState.PREPARED)
    assert registry.counts() == (1, 1)
    a.move_to(BranchState.COMMITTED)
    registry.finish(a)
    found = registry.get("c1.r-a")
    assert isinstance(found, branches.FinishedBranch)
    assert found.state is BranchState.COMMITTED
    assert registry.create(Xid("c1.r-a", "eu"), 1.0) == found  # a retry gets the first answer
    registry.forget(b)
    assert b.forgotten
    assert registry.get("c1.r-b") is None
    c = registry.create(Xid("c1.r-c", "eu"), 1.0)
    assert isinstance(c, Branch)
    c.move_to(BranchState.ROLLED_BACK)
    registry.finish(c)
    assert registry.get("c1.r-a") is None  # the finished memory holds one
    assert registry.live() == []


# --------------------------------------------------------------------------------------------------
# Begin and execute
# --------------------------------------------------------------------------------------------------


@scenario
async def test_begin_checks_timeout_and_capacity() -> None:
    env = make_env(max_active=2)
    tx = env.manager.begin(0)
    assert tx.timeout_ms == SETTINGS.default_timeout_ms
    assert tx.deadline == env.clock.now + 10.0
    with pytest.raises(InvalidArgument):
        env.manager.begin(SETTINGS.max_timeout_ms + 1)
    with pytest.raises(InvalidArgument):
        env.manager.begin(-1)
    env.manager.begin(1_000)
    with pytest.raises(ResourceExhausted):
        env.manager.begin(1_000)
    assert tx.txid.startswith(env.manager.prefix)


@scenario
async def test_execute_refused_by_the_coordinator_leaves_the_transaction_active() -> None:
    env = make_env()
    tx = env.manager.begin(5_000)
    with pytest.raises(InvalidArgument):
        await env.manager.execute(tx.txid, "eu", [WRITE], 0)
    with pytest.raises(InvalidArgument):
        await env.manager.execute(tx.txid, "eu", [], 1)
    with pytest.raises(NotFound):
        await env.manager.execute(tx.txid, "mars", [WRITE], 1)
    with pytest.raises(NotFound):
        await env.manager.execute(UNKNOWN_TXID, "eu", [WRITE], 1)
    with pytest.raises(InvalidArgument):
        await env.manager.execute("not-a-txid", "eu", [WRITE], 1)
    assert tx.state is TxState.ACTIVE
    assert env.ports.calls == []


@scenario
async def test_execute_refused_by_the_agent_leaves_the_transaction_active_and_usable() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("execute", "us", InvalidArgument("statement refused by the SQL guard"))
    with pytest.raises(InvalidArgument, match="SQL guard"):
        await env.manager.execute(tx.txid, "us", ["LOCK TABLES accounts WRITE"], 2)
    assert tx.state is TxState.ACTIVE
    assert env.ports.calls_of("rollback") == []
    await env.manager.execute(tx.txid, "us", [WRITE], 3)
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert env.ports.state("eu", tx.txid) is BranchState.COMMITTED
    assert env.ports.state("us", tx.txid) is BranchState.COMMITTED


@scenario
async def test_statement_failure_aborts_the_whole_transaction() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("ap", WRITE)])
    with pytest.raises(StatementFailed) as caught:
        await env.manager.execute(tx.txid, "us", ["FAIL 1062"], 3)
    assert caught.value.mysql_errno == 1062
    assert caught.value.txid == tx.txid
    assert "us" in caught.value.message
    assert tx.state is TxState.ABORTED
    # The agent rolled its own branch back; the others get a rollback.
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "ap"}
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.state("ap", tx.txid) is BranchState.ROLLED_BACK
    with pytest.raises(TransactionAborted):
        await env.manager.execute(tx.txid, "eu", [WRITE], 4)
    with pytest.raises(TransactionAborted):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert env.log.attempts == []


@scenario
async def test_execute_transport_failure_aborts_and_rolls_that_branch_back_too() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("execute", "us", Unavailable("agent us is unreachable"), after=True)
    with pytest.raises(TransactionAborted) as caught:
        await env.manager.execute(tx.txid, "us", [WRITE], 2)
    assert type(caught.value) is TransactionAborted
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "us"}
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK


# --------------------------------------------------------------------------------------------------
# Commit: the decision, presumed abort, I4
# --------------------------------------------------------------------------------------------------


@scenario
async def test_commit_across_three_participants_writes_the_decision_before_phase_2() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    held = env.ports.hold("commit", "ap")  # phase 2 is in flight when the client is answered
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTING
    assert env.log.commits == [CommitRecord(tx.txid, ("eu", "us", "ap"))]
    assert env.log.ends == []
    assert env.manager.view(tx.txid).outcome is Outcome.COMMITTED
    held.release()
    await tx.done.wait()
    assert tx.state is TxState.COMMITTED
    env.assert_decision_first(tx.txid)
    commits = env.ports.indexes_of("commit", tx.txid, one_phase=False)
    assert len(commits) == 3
    assert env.log.ends == [tx.txid]
    assert env.log.ended_at[tx.txid] > max(commits)  # END after every acknowledgement
    assert all(env.ports.state(p, tx.txid) is BranchState.COMMITTED for p in REGIONS)
    assert env.log.open_commits() == []
    assert tx.txid not in env.manager._live


@scenario
async def test_commit_waiting_for_phase_2_answers_committed() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    env.assert_decision_first(tx.txid)
    assert env.log.ends == [tx.txid]
    # A retried Commit gets the same answer from memory, without new calls.
    calls = len(env.ports.calls)
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert len(env.ports.calls) == calls
    view = await env.manager.lookup(tx.txid)
    assert (view.state, view.participants) == (TxState.COMMITTED, ("eu", "us"))


@scenario
async def test_run_commits_in_one_shot_and_returns_the_results() -> None:
    env = make_env()
    outcome = await env.manager.run(
        [("eu", [WRITE]), ("us", [READ])], timeout_ms=5_000, wait_for_phase2=True
    )
    assert outcome.state is TxState.COMMITTED
    assert outcome.results == {"eu": [f"eu: {WRITE}"], "us": [f"us: {READ}"]}
    assert env.ports.calls_of("execute") == []
    assert env.log.commits == [CommitRecord(outcome.txid, ("eu",))]
    env.assert_decision_first(outcome.txid)


@pytest.mark.parametrize(
    ("errno", "error"),
    [(1213, TransactionConflict), (1062, StatementFailed), (0, TransactionAborted)],
)
@scenario
async def test_a_no_vote_aborts_and_rolls_the_others_back(
    errno: int, error: type[TransactionAborted]
) -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    env.ports.script("prepare", "us", VoteReply(Vote.ABORT, "deadlock found", errno))
    with pytest.raises(TransactionAborted) as caught:
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert type(caught.value) is error
    assert caught.value.mysql_errno == errno
    assert "deadlock found" in caught.value.message
    assert "us" in caught.value.message
    assert env.log.attempts == []  # presumed abort: no log write
    assert env.ports.calls_of("commit") == []
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "ap"}
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.state("ap", tx.txid) is BranchState.ROLLED_BACK
    view = await env.manager.lookup(tx.txid)
    assert view.state is TxState.ABORTED
    assert not view.presumed


@scenario
async def test_all_read_only_commits_without_log_record_or_phase_2() -> None:
    env = make_env()
    tx = await env.open([("eu", READ), ("us", READ), ("ap", READ)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert env.log.attempts == []
    assert env.ports.calls_of("commit") == []
    assert len(env.ports.calls_of("prepare")) == 3
    assert all(env.ports.state(p, tx.txid) is BranchState.READ_ONLY for p in REGIONS)


@scenario
async def test_read_only_branches_leave_phase_2() -> None:
    env = make_env()
    tx = await env.open([("eu", READ), ("us", WRITE), ("ap", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert env.log.commits == [CommitRecord(tx.txid, ("us", "ap"))]
    assert {c.participant for c in env.ports.calls_of("commit")} == {"us", "ap"}
    env.assert_decision_first(tx.txid)


@scenario
async def test_commit_of_a_transaction_that_touched_nothing() -> None:
    env = make_env()
    tx = env.manager.begin(5_000)
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTED
    assert env.ports.calls == []
    assert env.log.attempts == []


# --------------------------------------------------------------------------------------------------
# One participant: one-phase commit
# --------------------------------------------------------------------------------------------------


@scenario
async def test_single_participant_commits_in_one_phase_without_log_record() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("eu", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTED
    assert env.log.attempts == []
    assert env.ports.calls_of("prepare") == []
    [call] = env.ports.calls_of("commit")
    assert call.one_phase
    assert env.ports.state("eu", tx.txid) is BranchState.COMMITTED


@scenario
async def test_run_on_one_participant_sends_the_statements_with_the_one_phase_commit() -> None:
    env = make_env()
    outcome = await env.manager.run([("us", [WRITE, READ])], timeout_ms=5_000)
    assert outcome.state is TxState.COMMITTED
    assert outcome.results == {"us": [f"us: {WRITE}", f"us: {READ}"]}
    [call] = env.ports.calls_of("commit")
    assert call.one_phase
    assert call.statements == (WRITE, READ)
    assert env.log.attempts == []


@scenario
async def test_one_phase_statement_failure_is_a_statement_failed() -> None:
    env = make_env()
    with pytest.raises(StatementFailed) as caught:
        await env.manager.run([("us", ["FAIL 1062"])], timeout_ms=5_000)
    assert caught.value.mysql_errno == 1062
    assert env.ports.calls_of("rollback") == []  # the agent rolled its branch back itself


@scenario
async def test_a_lock_wait_timeout_or_local_deadlock_is_a_retryable_conflict() -> None:
    env = make_env()
    for errno in (1205, 1213):
        with pytest.raises(TransactionConflict) as caught:
            await env.manager.run([("us", [f"FAIL {errno}"])], timeout_ms=5_000)
        assert caught.value.mysql_errno == errno
    assert env.ports.calls_of("rollback") == []  # the agent rolled its branch back itself


@scenario
async def test_one_phase_commit_whose_answer_was_lost_but_committed_is_committed() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"), after=True)
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTED
    # Settled by a rollback that the agent refused because the branch had committed.
    assert len(env.ports.calls_of("rollback", "eu")) == 1
    assert (await env.manager.lookup(tx.txid)).state is TxState.COMMITTED


@scenario
async def test_one_phase_commit_that_never_arrived_and_left_nothing_is_aborted() -> None:
    env = make_env()
    env.ports.fail("commit", "eu", Unavailable("connection refused"))
    with pytest.raises(TransactionAborted, match="connection refused"):
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000)
    txid = env.ports.calls[0].txid
    assert (await env.manager.lookup(txid)).outcome is Outcome.ABORTED
    # The request, delayed on its way, arrives now: the agent's tombstone refuses it.
    with pytest.raises(TransactionAborted):
        await env.ports.commit("eu", txid, one_phase=True, statements=[WRITE], timeout=1.0)
    assert (await env.manager.lookup(txid)).outcome is Outcome.ABORTED


@scenario
async def test_one_phase_commit_in_doubt_raises_unavailable_and_lookup_resolves_later() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"), after=True)
    env.ports.fail("rollback", "eu", Unavailable("agent eu is unreachable"))
    with pytest.raises(Unavailable, match="look the outcome"):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert tx.txid not in env.manager._live
    view = await env.manager.lookup(tx.txid)  # the agent answers again: its marker tells
    assert view.state is TxState.COMMITTED
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTED


@scenario
async def test_one_phase_commit_still_running_on_the_agent_is_settled_by_a_rollback() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"))  # branch still active
    with pytest.raises(TransactionAborted):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    with pytest.raises(TransactionAborted):  # the commit, arriving late, cannot land any more
        await env.ports.commit("eu", tx.txid, one_phase=True, timeout=1.0)
    assert (await env.manager.lookup(tx.txid)).outcome is Outcome.ABORTED


@scenario
async def test_one_phase_commit_still_running_and_agent_unreachable_stays_in_doubt() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"))
    env.ports.fail("rollback", "eu", Unavailable("agent eu is unreachable"))
    with pytest.raises(Unavailable):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    view = await env.manager.lookup(tx.txid)
    assert view.outcome is Outcome.PENDING
    assert "eu" in view.abort_reason
    with pytest.raises(Unavailable):
        await env.manager.rollback(tx.txid)


# --------------------------------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------------------------------


@scenario
async def test_reaper_aborts_an_expired_active_transaction() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)], timeout_ms=1_000)
    other = await env.open([("ap", WRITE)], timeout_ms=10_000)
    assert await env.manager.reap_expired() == 0
    env.clock.advance(1.5)
    assert await env.manager.reap_expired() == 1
    assert tx.state is TxState.ABORTED
    assert other.state is TxState.ACTIVE
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "us"}
    with pytest.raises(TransactionAborted, match="deadline"):
        await env.manager.execute(tx.txid, "eu", [WRITE], 3)
    with pytest.raises(TransactionAborted, match="deadline"):
        await env.manager.commit(tx.txid, wait_for_phase2=False)


@scenario
async def test_execute_and_commit_after_the_deadline_abort() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)], timeout_ms=1_000)
    env.clock.advance(2)
    with pytest.raises(TransactionAborted, match="deadline"):
        await env.manager.execute(tx.txid, "us", [WRITE], 2)
    assert env.ports.calls_of("execute", "us") == []
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK

    late = await env.open([("eu", WRITE), ("us", WRITE)], timeout_ms=1_000)
    env.clock.advance(2)
    with pytest.raises(TransactionAborted, match="deadline"):
        await env.manager.commit(late.txid, wait_for_phase2=False)
    assert env.ports.calls_of("prepare") == []


# --------------------------------------------------------------------------------------------------
# Abort reasons: one value decided with the abort, one mapping to the client's error
# --------------------------------------------------------------------------------------------------

# Every cause, built the way the engine builds it, and the error the client gets for it.
ABORT_ERRORS: list[tuple[AbortReason, type[TwopcError], str]] = [
    (AbortReason.rolled_back(), TransactionAborted, "rolled back by the client"),
    (AbortReason.deadline(" before commit"), TransactionAborted, "deadline passed before commit"),
    (AbortReason.idle(1500), TransactionAborted, "no call on the transaction for 1500 ms"),
    (
        AbortReason.participant_failed("us", StatementFailed("dup key", mysql_errno=1062)),
        StatementFailed,
        "participant us: dup key",
    ),
    (
        AbortReason.participant_failed("us", FailedPrecondition("lost the branch")),
        TransactionAborted,
        "participant us: lost the branch",
    ),
    (AbortReason.prepare_failed("us", DeadlineExceeded("late")), TransactionAborted, "us: late"),
    (
        AbortReason.prepare_failed("us", InvalidArgument("LOCK TABLES is refused")),
        InvalidArgument,
        "participant us: LOCK TABLES is refused; the transaction was rolled back",
    ),
    (AbortReason.voted_no("us", "gone", 0), TransactionAborted, "participant us voted no: gone"),
    (AbortReason.voted_no("us", "lock wait", 1205), TransactionConflict, "us voted no: lock wait"),
    (AbortReason.voted_no("us", "dup key", 1062), StatementFailed, "us voted no: dup key"),
    (
        AbortReason.deadlock("c1.a waits on c1.b in eu, c1.b waits on c1.a in us"),
        TransactionConflict,
        "victim: c1.a waits on c1.b in eu",
    ),
    (AbortReason.log_write_failed("no space"), TransactionAborted, "no space"),
    (
        AbortReason.by_operator("admin", "OPS-12: holds locks"),
        TransactionAborted,
        "aborted by operator 'admin': OPS-12: holds locks",
    ),
    (
        AbortReason.unreachable("us", "unreachable").maybe_committed_earlier("req-7"),
        Unavailable,
        "an earlier attempt of request req-7 may have committed there",
    ),
]


def test_every_abort_cause_is_mapped_and_covered() -> None:
    assert set(CLIENT_ERRORS) == set(AbortCause)
    assert {reason.cause for reason, _, _ in ABORT_ERRORS} == set(AbortCause)


@pytest.mark.parametrize(("reason", "error", "message"), ABORT_ERRORS, ids=lambda v: str(v)[:40])
def test_the_client_error_of_each_abort_reason(
    reason: AbortReason, error: type[TwopcError], message: str
) -> None:
    err = reason.client_error("c1.r-t")
    assert type(err) is error
    assert message in err.message
    assert err.txid == "c1.r-t"
    assert err.mysql_errno == reason.mysql_errno
    if error is StatementFailed:
        assert err.mysql_errno != 0
    if err.mysql_errno:
        assert error in (StatementFailed, TransactionConflict)
    assert reason.conclusive == (error is not Unavailable)
    context = reason.client_error("c1.r-t", "transaction c1.r-t was aborted: why")
    assert type(context) is error
    assert context.message.startswith("transaction c1.r-t was aborted: why")


def test_an_abort_reason_carries_an_errno_only_for_a_failed_statement() -> None:
    with pytest.raises(ValueError, match="voted_no"):
        AbortReason(AbortCause.VOTED_NO, "no", mysql_errno=1205)
    with pytest.raises(ValueError, match="statement_failed"):
        AbortReason(AbortCause.STATEMENT_FAILED, "failed")
    with pytest.raises(ValueError, match="request id"):
        AbortReason(AbortCause.UNREACHABLE, "gone", request_id="req-1")
    # An agent's error at prepare is no statement's: its MySQL error number is not passed on.
    reason = AbortReason.prepare_failed("us", TransactionAborted("rolled back", mysql_errno=1213))
    assert (reason.cause, reason.mysql_errno) == (AbortCause.PARTICIPANT_FAILED, 0)


@scenario
async def test_a_request_the_agent_refuses_at_prepare_aborts_as_the_clients_error() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    env.ports.fail("prepare", "us", InvalidArgument("statement refused by the SQL guard"))
    # A later participant's plain no does not hide it: the refusal explains the abort.
    env.ports.script("prepare", "ap", VoteReply(Vote.ABORT, "lock wait timeout", 1205))
    with pytest.raises(InvalidArgument, match="rolled back") as caught:
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert caught.value.message.startswith("participant us: statement refused by the SQL guard")
    assert tx.abort == AbortReason(
        AbortCause.REFUSED, "participant us: statement refused by the SQL guard"
    )
    assert tx.state is TxState.ABORTED
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    view = await env.manager.lookup(tx.txid)
    assert (view.state, view.abort_reason) == (TxState.ABORTED, tx.abort.message)


@scenario
async def test_a_one_phase_commit_the_agent_refuses_aborts_as_the_clients_error() -> None:
    """One participant or several, a refused request is InvalidArgument, never a plain abort."""
    env = make_env()
    env.ports.fail("commit", "eu", InvalidArgument("statement refused by the SQL guard"))
    with pytest.raises(InvalidArgument, match="rolled back") as caught:
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000)
    assert caught.value.message.startswith("participant eu: statement refused by the SQL guard")
    assert caught.value.txid


@scenario
async def test_a_retried_request_refused_only_by_an_unreachable_agent_is_no_answer() -> None:
    """Its first attempt (before a restart of the coordinator) may have committed on the agent
    that cannot be reached: the client is told Unavailable, and nothing is remembered."""
    env = make_env()
    env.ports.fail("prepare", "us", Unavailable("agent us is unreachable"))
    work = [("eu", [WRITE]), ("us", [WRITE])]
    with pytest.raises(Unavailable, match="earlier attempt of request req-8") as caught:
        await env.manager.run(work, timeout_ms=5_000, request_id="req-8")
    txid = caught.value.txid
    assert txid == env.manager.request_txid("req-8")
    assert env.manager.view(txid).presumed  # not remembered as aborted
    assert env.ports.state("eu", txid) is BranchState.ROLLED_BACK
    # Without a request id the same failure is a plain abort.
    env.ports.fail("prepare", "us", Unavailable("agent us is unreachable"))
    with pytest.raises(TransactionAborted, match="unreachable") as plain:
        await env.manager.run(work, timeout_ms=5_000)
    assert type(plain.value) is TransactionAborted
    assert not env.manager.view(plain.value.txid).presumed


@scenario
async def test_a_statement_failing_after_a_rollback_answers_the_rollback() -> None:
    """The abort was decided (by the client's Rollback) before the statement's error came back:
    the client learns the reason that was decided, not the statement's error number."""
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    gate = Gate()
    env.ports.fail("execute", "us", StatementFailed("deadlock", mysql_errno=1213), gate=gate)
    executing = asyncio.create_task(env.manager.execute(tx.txid, "us", [WRITE], 2))
    await gate.entered.wait()
    assert await env.manager.rollback(tx.txid) is TxState.ABORTED
    gate.release()
    with pytest.raises(TransactionAborted, match="rolled back by the client") as caught:
        await executing
    assert type(caught.value) is TransactionAborted
    assert caught.value.mysql_errno == 0
    assert tx.abort == AbortReason.rolled_back()


# --------------------------------------------------------------------------------------------------
# Rollback
# --------------------------------------------------------------------------------------------------


@scenario
async def test_rollback_while_preparing_leads_to_abort() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    gate = env.ports.hold("prepare", "us")
    committing = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=False))
    await gate.entered.wait()
    assert tx.state is TxState.PREPARING
    rolling_back = asyncio.create_task(env.manager.rollback(tx.txid))
    await asyncio.sleep(0)
    assert tx.abort_request == AbortReason.rolled_back()
    assert tx.state is TxState.PREPARING  # the decider, which owns it, applies the request
    gate.release()
    assert await rolling_back is TxState.ABORTED
    with pytest.raises(TransactionAborted, match="rolled back by the client"):
        await committing
    assert env.log.attempts == []
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK


@scenario
async def test_rollback_is_idempotent() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    for _ in range(3):
        assert await env.manager.rollback(tx.txid) is TxState.ABORTED
    assert len(env.ports.calls_of("rollback")) == 1
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    # A txid this coordinator never ran: nothing anywhere, presumed aborted.
    assert await env.manager.rollback(UNKNOWN_TXID) is TxState.ABORTED


@scenario
async def test_rollback_of_a_committed_transaction_is_refused() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    held = env.ports.hold("commit", "us")
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTING
    with pytest.raises(FailedPrecondition, match="committed"):
        await env.manager.rollback(tx.txid)  # live, in phase 2
    held.release()
    await tx.done.wait()
    with pytest.raises(FailedPrecondition, match="committed"):
        await env.manager.rollback(tx.txid)  # finished
    assert env.ports.calls_of("rollback") == []


@scenario
async def test_rollback_stops_a_hanging_statement_and_cleans_up_its_branch() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE)])
    gate = env.ports.hold("execute", "us")
    executing = asyncio.create_task(env.manager.execute(tx.txid, "us", [WRITE], 2))
    await gate.entered.wait()
    assert await env.manager.rollback(tx.txid) is TxState.ABORTED
    gate.release()  # the statement lands after the rollback reached the agent
    with pytest.raises(TransactionAborted):
        await executing
    await env.drain()
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK


# --------------------------------------------------------------------------------------------------
# Request ids (idempotency)
# --------------------------------------------------------------------------------------------------


@scenario
async def test_begin_with_the_same_request_id_returns_the_same_transaction() -> None:
    env = make_env()
    tx = env.manager.begin(5_000, "req-1")
    assert tx.txid == "c1.r-req-1" == env.manager.request_txid("req-1")
    assert env.manager.begin(5_000, "req-1") is tx
    await env.manager.execute(tx.txid, "eu", [WRITE], 1)
    await env.manager.commit(tx.txid, wait_for_phase2=True)
    with pytest.raises(FailedPrecondition, match="already ran"):
        env.manager.begin(5_000, "req-1")
    with pytest.raises(InvalidArgument):
        env.manager.begin(5_000, "bad request id!")


@scenario
async def test_run_twice_with_the_same_request_id_answers_the_first_outcome() -> None:
    env = make_env()
    work = [("eu", [WRITE]), ("us", [WRITE])]
    first = await env.manager.run(work, timeout_ms=5_000, request_id="req-2", wait_for_phase2=True)
    assert first.state is TxState.COMMITTED
    calls = len(env.ports.calls)
    again = await env.manager.run(work, timeout_ms=5_000, request_id="req-2")
    assert (again.txid, again.state) == (first.txid, TxState.COMMITTED)
    assert len(env.ports.calls) == calls


@scenario
async def test_run_twice_after_an_abort_answers_aborted_again() -> None:
    env = make_env()
    work = [("eu", [WRITE]), ("us", ["FAIL 1062"])]
    with pytest.raises(StatementFailed):
        await env.manager.run(work, timeout_ms=5_000, request_id="req-3")
    calls = len(env.ports.calls)
    with pytest.raises(TransactionAborted):
        await env.manager.run(work, timeout_ms=5_000, request_id="req-3")
    assert len(env.ports.calls) == calls


@scenario
async def test_already_committed_vote_reports_committed_and_undoes_this_attempt() -> None:
    env = make_env()
    txid = env.manager.request_txid("req-4")
    env.ports.markers["us"].add(txid)  # a first attempt, forgotten here, committed on us
    outcome = await env.manager.run(
        [("eu", [WRITE]), ("us", [WRITE]), ("ap", [WRITE])], timeout_ms=5_000, request_id="req-4"
    )
    assert (outcome.txid, outcome.state) == (txid, TxState.COMMITTED)
    assert env.log.attempts == []
    assert env.ports.calls_of("commit") == []
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "ap"}
    assert env.ports.state("eu", txid) is BranchState.ROLLED_BACK
    assert env.ports.state("ap", txid) is BranchState.ROLLED_BACK
    view = await env.manager.lookup(txid)
    assert view.state is TxState.COMMITTED
    assert view.abort_reason == ""


@scenario
async def test_already_committed_wins_over_an_abort_vote() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    env.ports.script("prepare", "eu", VoteReply(Vote.ABORT, "lock wait timeout", 1205))
    env.ports.script("prepare", "us", VoteReply(Vote.ALREADY_COMMITTED, "committed before"))
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTED
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"ap"}


# --------------------------------------------------------------------------------------------------
# The decision log failing
# --------------------------------------------------------------------------------------------------


@scenario
async def test_decision_log_full_aborts_and_commits_nothing() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.log.fail_next_commit(DecisionLogFull("no space left on device"))
    with pytest.raises(TransactionAborted, match="decision log"):
        await env.manager.commit(tx.txid, wait_for_phase2=True)
    assert env.log.commits == []
    assert env.ports.calls_of("commit") == []
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK
    assert env.fatal == []


@scenario
async def test_a_fenced_decision_log_aborts_as_a_full_one_and_is_not_fatal() -> None:
    """DecisionLogFenced (another member took the coordinator id over): nothing was written,
    so the transaction aborts, as the new holder's replay presumes; the process goes on (the
    group, not built yet, makes the member step down)."""
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.log.fail_next_commit(DecisionLogFenced("member-b now holds c1 at epoch 2"))
    with pytest.raises(TransactionAborted, match="decision log"):
        await env.manager.commit(tx.txid, wait_for_phase2=True)
    assert env.log.commits == []
    assert env.ports.calls_of("commit") == []
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK
    assert env.fatal == []


@scenario
async def test_decision_log_failed_calls_on_fatal_and_commits_nothing() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    failure = DecisionLogFailed("fsync failed: EIO")
    env.log.fail_next_commit(failure)
    with pytest.raises(DecisionLogFailed):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    assert env.fatal == [failure]
    assert env.ports.calls_of("commit") == []
    assert env.ports.calls_of("rollback") == []  # durability unknown: nothing may be undone


# --------------------------------------------------------------------------------------------------
# Phase 2
# --------------------------------------------------------------------------------------------------


@scenario
async def test_phase_2_retries_a_participant_that_is_down_and_then_ends() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.ports.fail("commit", "us", Unavailable("agent us is unreachable"), times=2)
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert len(env.ports.calls_of("commit", "us")) == 3
    assert len(env.ports.calls_of("commit", "eu")) == 1  # acknowledged branches are not retried
    assert env.clock.sleeps == [0.05, 0.1]
    assert env.log.ends == [tx.txid]
    env.assert_decision_first(tx.txid)


@scenario
async def test_phase_2_gives_up_and_recovery_finishes_when_the_participant_is_back() -> None:
    env = make_env(phase2_attempts=3)
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.ports.fail("commit", "us", Unavailable("agent us is unreachable"), times=3)
    with structlog.testing.capture_logs() as logs:
        assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTING
    assert any(e["event"] == "phase2_incomplete" for e in logs)
    assert env.log.ends == []
    assert env.manager.commit_record(tx.txid) == CommitRecord(tx.txid, ("eu", "us"))
    assert env.ports.state("us", tx.txid) is BranchState.PREPARED
    view = await env.manager.lookup(tx.txid)
    assert (view.state, view.outcome) == (TxState.COMMITTING, Outcome.COMMITTED)

    report = await Recovery(env.manager).run_once()
    assert report.redriven == 1
    assert report.clean
    assert env.ports.state("us", tx.txid) is BranchState.COMMITTED
    assert env.log.ends == [tx.txid]
    assert (await env.manager.lookup(tx.txid)).state is TxState.COMMITTED
    env.assert_decision_first(tx.txid)


@scenario
async def test_drive_commit_returns_false_while_a_participant_is_down() -> None:
    env = make_env(phase2_attempts=2)
    record = CommitRecord(UNKNOWN_TXID, ("eu", "us"))
    for participant in record.participants:
        env.ports.seed(participant, record.txid, BranchState.PREPARED)
    env.ports.down.add("us")
    assert await env.manager.drive_commit(record) is False
    assert env.log.ends == []
    env.ports.down.clear()
    assert await env.manager.drive_commit(record) is True
    assert env.log.ends == [record.txid]
    assert env.ports.state("us", record.txid) is BranchState.COMMITTED


@scenario
async def test_phase_2_treats_a_committed_branch_as_acknowledged() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.ports.script("commit", "eu", CommitReply(already_committed=True))
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    assert env.log.ends == [tx.txid]


@scenario
async def test_phase_2_sends_every_commit_at_once_when_mid_commit_is_not_armed() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    gates = [env.ports.hold("commit", p) for p in REGIONS]
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTING
    # Every XA COMMIT is on its way while none has been answered.
    await until(lambda: all(g.entered.is_set() for g in gates), "every commit sent")
    for gate in gates:
        gate.release()
    await tx.done.wait()
    assert tx.state is TxState.COMMITTED


@scenario
async def test_mid_commit_comes_after_the_first_commit_and_before_the_others_are_sent() -> None:
    env = make_env(failpoints={"mid_commit": "1*pause"})
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=False) is TxState.COMMITTING
    await until(
        lambda: fired(env.failpoints, "coordinator.mid_commit") == 1,
        "phase 2 reaching coordinator.mid_commit",
    )
    assert [c.participant for c in env.ports.calls_of("commit")] == ["eu"]
    assert env.ports.state("eu", tx.txid) is BranchState.COMMITTED
    assert env.ports.state("us", tx.txid) is BranchState.PREPARED
    assert env.ports.state("ap", tx.txid) is BranchState.PREPARED
    env.failpoints.set("coordinator.mid_commit", "")  # releases the pause
    await tx.done.wait()
    assert tx.state is TxState.COMMITTED
    # The same messages as an unarmed phase 2: one XA COMMIT per branch, then END.
    assert sorted(c.participant for c in env.ports.calls_of("commit")) == sorted(REGIONS)
    assert not any(c.one_phase for c in env.ports.calls_of("commit"))
    assert env.log.ends == [tx.txid]
    env.assert_decision_first(tx.txid)


@scenario
async def test_mid_commit_failing_leaves_the_other_branches_prepared_for_recovery() -> None:
    env = make_env(failpoints={"mid_commit": "1*return(internal)"})
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTING
    assert [c.participant for c in env.ports.calls_of("commit")] == ["eu"]
    assert env.ports.state("eu", tx.txid) is BranchState.COMMITTED
    assert env.ports.state("us", tx.txid) is BranchState.PREPARED
    assert env.manager.commit_record(tx.txid) == CommitRecord(tx.txid, ("eu", "us"))
    report = await Recovery(env.manager, failpoints=env.failpoints).run_once()
    assert report.clean
    assert env.ports.state("us", tx.txid) is BranchState.COMMITTED
    assert env.log.ends == [tx.txid]
    assert (await env.manager.lookup(tx.txid)).state is TxState.COMMITTED


# --------------------------------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------------------------------


@scenario
async def test_recovery_rolls_back_a_prepared_branch_without_commit_record() -> None:
    env = make_env()
    orphan = "c1.0000018f0000000000000000000000aa"
    env.ports.seed("us", orphan, BranchState.PREPARED)
    report = await Recovery(env.manager).run_once()
    assert (report.rolled_back, report.committed, report.redriven) == (1, 0, 0)
    assert env.ports.state("us", orphan) is BranchState.ROLLED_BACK
    assert env.ports.calls_of("commit") == []


@scenario
async def test_recovery_commits_a_prepared_branch_that_has_a_commit_record() -> None:
    record = CommitRecord("c1.0000018f0000000000000000000000bb", ("eu", "us"))
    env = make_env(replay=Replay(open_commits=[record]), phase2_attempts=2)
    await env.manager.start()
    for participant in record.participants:
        env.ports.seed(participant, record.txid, BranchState.PREPARED)
    # Step 1 (re-drive the open record) cannot reach us; step 2 finds the branch prepared there.
    env.ports.fail("commit", "us", Unavailable("agent us is unreachable"), times=2)
    report = await Recovery(env.manager).run_once()
    assert (report.redriven, report.committed, report.rolled_back) == (0, 1, 0)
    assert env.ports.state("eu", record.txid) is BranchState.COMMITTED
    assert env.ports.state("us", record.txid) is BranchState.COMMITTED
    assert env.ports.calls_of("rollback") == []
    assert env.log.ends == [record.txid]
    again = await Recovery(env.manager).run_once()
    assert again.clean
    assert (again.redriven, again.committed, again.rolled_back) == (0, 0, 0)


@scenario
async def test_recovery_report_does_not_count_a_commit_that_did_not_happen() -> None:
    record = CommitRecord("c1.0000018f0000000000000000000000cc", ("eu", "us"))
    env = make_env(replay=Replay(open_commits=[record]), phase2_attempts=2)
    await env.manager.start()
    for participant in record.participants:
        env.ports.seed(participant, record.txid, BranchState.PREPARED)
    env.ports.fail("commit", "us", Unavailable("agent us is unreachable"), times=4)
    report = await Recovery(env.manager).run_once()
    assert env.ports.state("us", record.txid) is BranchState.PREPARED  # still in doubt
    assert not report.clean
    # Step 2 re-drove the record and failed again: that is not a commit, it is left over.
    assert (report.committed, report.left) == (0, 2)


@scenario
async def test_recovery_leaves_live_transactions_alone() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    gate = env.ports.hold("prepare", "us")
    committing = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=True))
    await gate.entered.wait()
    assert env.ports.state("eu", tx.txid) is BranchState.PREPARED  # prepared, and live here
    assert not env.manager.claim_for_recovery(tx.txid)
    report = await Recovery(env.manager).run_once()
    assert (report.rolled_back, report.committed) == (0, 0)
    assert env.ports.calls_of("rollback") == []
    gate.release()
    assert await committing is TxState.COMMITTED


@scenario
async def test_recovery_commits_a_listed_branch_of_a_transaction_known_as_committed() -> None:
    """XA RECOVER listed the branch while it was prepared; by the time recovery gets to it the
    transaction has committed everywhere and left this process (or the database lost the commit
    and brought the branch back prepared). It is committed, never rolled back, and no conflict
    is reported."""
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    assert await env.manager.commit(tx.txid, wait_for_phase2=True) is TxState.COMMITTED
    env.ports.seed("us", tx.txid, BranchState.PREPARED)  # what the listing shows
    commits_before = len(env.ports.calls_of("commit"))
    with structlog.testing.capture_logs() as logs:
        report = await Recovery(env.manager).run_once()
    assert env.ports.calls_of("rollback") == []
    assert len(env.ports.calls_of("commit")) == commits_before + 1
    assert env.ports.state("us", tx.txid) is BranchState.COMMITTED
    assert (report.rolled_back, report.left) == (0, 0)
    assert not [line for line in logs if line["log_level"] in ("warning", "error")]


@scenario
async def test_recovery_touches_only_branches_of_its_own_coordinator() -> None:
    env = make_env()
    foreign = ["c2.0000018f0000000000000000000000dd", "c10.0000018f0000000000000000000000dd"]
    for txid in foreign:
        env.ports.seed("eu", txid, BranchState.PREPARED)
    report = await Recovery(env.manager).run_once()
    assert report.rolled_back == 0
    assert all(env.ports.state("eu", t) is BranchState.PREPARED for t in foreign)
    assert {c.txid for c in env.ports.calls_of("recover")} == {"c1."}


@scenario
async def test_recovery_counts_an_unreachable_agent() -> None:
    env = make_env()
    env.ports.down.add("ap")
    report = await Recovery(env.manager).run_once()
    assert report.unreachable == 1
    assert not report.clean


@scenario
async def test_a_request_txid_being_recovered_cannot_be_begun_meanwhile() -> None:
    env = make_env()
    txid = env.manager.request_txid("req-9")
    env.ports.seed("eu", txid, BranchState.PREPARED)  # an earlier attempt, before a crash
    gate = env.ports.hold("rollback", "eu")
    recovering = asyncio.create_task(Recovery(env.manager).run_once())
    await gate.entered.wait()
    with pytest.raises(Unavailable, match="being recovered"):
        env.manager.begin(5_000, "req-9")
    with pytest.raises(Unavailable, match="being recovered"):
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, request_id="req-9")
    gate.release()
    report = await recovering
    assert report.rolled_back == 1
    assert env.ports.state("eu", txid) is BranchState.ROLLED_BACK
    assert env.manager.begin(5_000, "req-9").txid == txid  # released after recovery


def test_claim_for_recovery() -> None:
    env = make_env()
    tx = env.manager.begin(5_000)
    assert not env.manager.claim_for_recovery(tx.txid)
    assert env.manager.claim_for_recovery(UNKNOWN_TXID)
    env.manager.release_from_recovery(UNKNOWN_TXID)
    assert UNKNOWN_TXID not in env.manager._recovering


# --------------------------------------------------------------------------------------------------
# Start and lookup
# --------------------------------------------------------------------------------------------------


@scenario
async def test_start_loads_open_commits_and_ended_transactions() -> None:
    open_record = CommitRecord("c1.r-req-5", ("eu", "us"))
    replay = Replay(open_commits=[open_record], ended={"c1.r-req-6"}, torn_bytes=7)
    env = make_env(replay=replay)
    await env.manager.start()
    assert env.log.opened
    assert env.manager.open_commits_to_drive() == [open_record]
    view = await env.manager.lookup("c1.r-req-5")
    assert (view.state, view.outcome, view.participants) == (
        TxState.COMMITTING,
        Outcome.COMMITTED,
        ("eu", "us"),
    )
    assert (await env.manager.lookup("c1.r-req-6")).state is TxState.COMMITTED
    with pytest.raises(FailedPrecondition, match="already ran"):
        env.manager.begin(5_000, "req-5")
    again = await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, request_id="req-5")
    assert (again.txid, again.state) == ("c1.r-req-5", TxState.COMMITTING)
    assert env.ports.calls == []
    await env.manager.close()
    assert env.log.closed


@scenario
async def test_lookup_answers_from_memory_for_live_and_finished_transactions() -> None:
    env = make_env()
    live = await env.open([("eu", WRITE)])
    view = await env.manager.lookup(live.txid)
    assert (view.state, view.participants) == (TxState.ACTIVE, ("eu",))
    aborted = await env.open([("us", WRITE)])
    await env.manager.rollback(aborted.txid)
    view = await env.manager.lookup(aborted.txid)
    assert (view.state, view.presumed) == (TxState.ABORTED, False)
    assert view.abort_reason == "rolled back by the client"
    assert env.ports.calls_of("inspect") == []


@pytest.mark.parametrize(
    ("seeds", "down", "expected", "presumed"),
    [
        ({"us": BranchState.COMMITTED}, set(), TxState.COMMITTED, False),
        ({"us": BranchState.COMMITTED}, {"ap"}, TxState.COMMITTED, False),
        ({"us": BranchState.ACTIVE}, set(), TxState.PREPARING, False),
        ({"us": BranchState.PREPARED}, set(), TxState.ABORTED, True),
        ({"us": BranchState.PREPARED, "eu": BranchState.READ_ONLY}, set(), TxState.ABORTED, True),
        ({}, set(), TxState.ABORTED, True),
    ],
)
@scenario
async def test_lookup_asks_the_participants_for_a_transaction_it_does_not_know(
    seeds: dict[str, BranchState], down: set[str], expected: TxState, presumed: bool
) -> None:
    env = make_env()
    for participant, state in seeds.items():
        env.ports.seed(participant, UNKNOWN_TXID, state, wrote=state is not BranchState.READ_ONLY)
    env.ports.down.update(down)
    view = await env.manager.lookup(UNKNOWN_TXID)
    assert view.state is expected
    assert view.presumed is presumed
    assert {c.participant for c in env.ports.calls_of("inspect")} == set(REGIONS)


@scenario
async def test_lookup_with_an_unreachable_participant_and_no_committed_branch_is_unavailable() -> (
    None
):
    env = make_env()
    env.ports.seed("us", UNKNOWN_TXID, BranchState.PREPARED)
    env.ports.down.add("ap")
    with pytest.raises(Unavailable, match="ap"):
        await env.manager.lookup(UNKNOWN_TXID)


@scenario
async def test_lookup_refuses_foreign_and_malformed_txids() -> None:
    env = make_env()
    with pytest.raises(NotFound, match="c2"):
        await env.manager.lookup("c2.0000018f00000000000000000000beef")
    with pytest.raises(InvalidArgument):
        await env.manager.lookup("c1.not-hex")
    with pytest.raises(InvalidArgument):
        await env.manager.lookup("")
    assert env.ports.calls == []


# --------------------------------------------------------------------------------------------------
# Cancellation: a decision half-made is never abandoned
# --------------------------------------------------------------------------------------------------


@scenario
async def test_cancelled_commit_still_completes_the_decision() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE), ("ap", WRITE)])
    gate: Gate = env.log.hold_next_commit()
    committing = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=False))
    await gate.entered.wait()
    committing.cancel()  # the client's RPC is cancelled while the record is being written
    with pytest.raises(asyncio.CancelledError):
        await committing
    gate.release()
    await tx.done.wait()
    assert tx.state is TxState.COMMITTED
    assert env.log.ends == [tx.txid]
    assert all(env.ports.state(p, tx.txid) is BranchState.COMMITTED for p in REGIONS)
    env.assert_decision_first(tx.txid)


@scenario
async def test_cancelled_rollback_still_rolls_back() -> None:
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    gate = env.ports.hold("rollback", "us")
    rolling_back = asyncio.create_task(env.manager.rollback(tx.txid))
    await gate.entered.wait()
    rolling_back.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rolling_back
    gate.release()
    await tx.done.wait()
    assert tx.state is TxState.ABORTED
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK


# --------------------------------------------------------------------------------------------------
# Bugs found while writing these tests (they fail until the engine is fixed)
# --------------------------------------------------------------------------------------------------


@scenario
async def test_prepare_whose_answer_was_lost_is_rolled_back_with_the_others() -> None:
    """A transport failure at prepare is not a vote: the branch may be prepared on the agent."""
    env = make_env()
    tx = await env.open([("eu", WRITE), ("us", WRITE)])
    env.ports.fail("prepare", "eu", DeadlineExceeded("deadline exceeded"), after=True)
    with pytest.raises(TransactionAborted):
        await env.manager.commit(tx.txid, wait_for_phase2=False)
    await env.drain()
    assert env.ports.state("us", tx.txid) is BranchState.ROLLED_BACK
    assert env.ports.calls_of("rollback", "eu"), "no rollback was sent to eu"
    assert env.ports.state("eu", tx.txid) is BranchState.ROLLED_BACK, (
        "eu's branch stays prepared (holding its locks) until the next recovery pass"
    )


async def _one_phase_commit_in_doubt(env: Env) -> tuple[Transaction, Gate]:
    """A single-participant transaction whose one-phase commit is in flight and will time out
    while the agent cannot be reached for the rollback that would settle it (it may still
    commit the branch later)."""
    tx = await env.open([("eu", WRITE)])
    gate = Gate()
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"), gate=gate)
    env.ports.fail("rollback", "eu", Unavailable("agent eu is unreachable"))
    return tx, gate


@scenario
async def test_rollback_during_an_in_doubt_one_phase_commit_does_not_report_aborted() -> None:
    env = make_env()
    tx, gate = await _one_phase_commit_in_doubt(env)
    committing = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=False))
    await gate.entered.wait()
    rolling_back = asyncio.create_task(env.manager.rollback(tx.txid))
    await asyncio.sleep(0)
    gate.release()
    with pytest.raises(Unavailable):
        await committing
    [answer] = await asyncio.gather(rolling_back, return_exceptions=True)
    # The commit, delayed on its way, lands on the agent afterwards.
    await env.ports.commit("eu", tx.txid, one_phase=True, timeout=1.0)
    assert (await env.manager.lookup(tx.txid)).state is TxState.COMMITTED
    assert isinstance(answer, Unavailable), (
        f"Rollback answered {answer!r} for a transaction whose outcome was unknown (and which "
        "then committed): I3 broken"
    )


@scenario
async def test_concurrent_commit_during_an_in_doubt_one_phase_commit_raises_unavailable() -> None:
    env = make_env()
    tx, gate = await _one_phase_commit_in_doubt(env)
    first = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=False))
    await gate.entered.wait()
    second = asyncio.create_task(env.manager.commit(tx.txid, wait_for_phase2=False))
    await asyncio.sleep(0)
    gate.release()
    with pytest.raises(Unavailable):
        await first
    [answer] = await asyncio.gather(second, return_exceptions=True)
    assert isinstance(answer, Unavailable), f"Commit answered {answer!r} for an unknown outcome"


# --- one-shot branches prepared in order (one_shot_order = "ordered") ----------------------------


@scenario
async def test_ordered_one_shot_prepares_one_branch_after_another_in_name_order() -> None:
    env = make_env(one_shot_order="ordered")
    gate = env.ports.hold("prepare", "eu")
    run = asyncio.create_task(
        env.manager.run(
            [("us", [WRITE]), ("eu", [WRITE]), ("ap", [WRITE])],
            timeout_ms=5_000,
            wait_for_phase2=True,
        )
    )
    await gate.entered.wait()
    # ap prepared first; us has not been asked while eu's vote is outstanding.
    assert [c.participant for c in env.ports.calls_of("prepare")] == ["ap", "eu"]
    gate.release()
    outcome = await run
    assert outcome.state is TxState.COMMITTED
    assert [c.participant for c in env.ports.calls_of("prepare")] == ["ap", "eu", "us"]
    env.assert_decision_first(outcome.txid)


@scenario
async def test_ordered_one_shot_starts_no_branch_after_a_no() -> None:
    env = make_env(one_shot_order="ordered")
    env.ports.script("prepare", "eu", VoteReply(Vote.ABORT, "deadlock found", 1213))
    with pytest.raises(TransactionConflict):
        await env.manager.run([("eu", [WRITE]), ("us", [WRITE]), ("ap", [WRITE])], timeout_ms=5_000)
    await env.drain()
    # ap prepared and was rolled back; us was never started, so there is nothing to roll back.
    assert [c.participant for c in env.ports.calls_of("prepare")] == ["ap", "eu"]
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"ap"}
    assert env.ports.state("us", _only_txid(env)) is None
    assert env.log.attempts == []


async def _first_prepares(env: Env) -> list[str]:
    """The participants asked to prepare while eu's prepare is held, for one 3-way one-shot."""
    before = len(env.ports.calls_of("prepare"))
    gate = env.ports.hold("prepare", "eu")
    run = asyncio.create_task(
        env.manager.run(
            [("us", [WRITE]), ("eu", [WRITE]), ("ap", [WRITE])],
            timeout_ms=5_000,
            wait_for_phase2=True,
        )
    )
    await gate.entered.wait()
    await asyncio.sleep(0)  # parallel prepares are all out in this loop turn
    asked = [c.participant for c in env.ports.calls_of("prepare")[before:]]
    gate.release()
    assert (await run).state is TxState.COMMITTED
    return sorted(asked)


async def _victim_of_a_cycle(env: Env) -> None:
    """One 2-region one-shot transaction, aborted by the deadlock detector while it prepares."""
    gate = env.ports.hold("prepare", "us")
    running = asyncio.create_task(
        env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000)
    )
    await gate.entered.wait()
    [tx] = [tx for tx in env.manager.live_transactions() if tx.state is TxState.PREPARING]
    assert env.manager.break_deadlock(tx.txid, "a cycle", 0.01)
    gate.release()
    with pytest.raises(TransactionConflict):
        await running


@scenario
async def test_adaptive_one_shot_is_ordered_while_victims_are_many() -> None:
    env = make_env(one_shot_order="adaptive", contended_hold_s=10.0, one_shot_victim_share=0.1)
    assert await _first_prepares(env) == ["ap", "eu", "us"]  # nothing contended: parallel
    for _ in range(18):
        await env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000)
    await _victim_of_a_cycle(env)
    await _victim_of_a_cycle(env)  # 2 victims of 21 one-shot transactions: 9.5 %
    env.clock.advance(1.1)
    assert await _first_prepares(env) == ["ap", "eu", "us"]  # below 10 %: still parallel
    for _ in range(16):
        await env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000)
    for _ in range(3):
        await _victim_of_a_cycle(env)  # 3 of 20 since
    env.clock.advance(1.1)
    assert await _first_prepares(env) == ["ap", "eu"]  # in name order, us not asked yet
    env.clock.advance(9.0)
    assert await _first_prepares(env) == ["ap", "eu"]
    env.clock.advance(1.0)  # the hold is over: parallel again
    assert await _first_prepares(env) == ["ap", "eu", "us"]
    await env.drain()


@scenario
async def test_victims_change_nothing_unless_adaptive() -> None:
    env = make_env()  # parallel
    for _ in range(20):
        await _victim_of_a_cycle(env)
    env.clock.advance(1.1)
    assert await _first_prepares(env) == ["ap", "eu", "us"]


@scenario
async def test_parallel_one_shot_asks_every_branch_at_once() -> None:
    env = make_env()  # the default
    gate = env.ports.hold("prepare", "eu")
    run = asyncio.create_task(
        env.manager.run([("us", [WRITE]), ("eu", [WRITE]), ("ap", [WRITE])], timeout_ms=5_000)
    )
    await gate.entered.wait()
    await asyncio.sleep(0)  # the other prepares are already out, in the same loop turn
    assert {c.participant for c in env.ports.calls_of("prepare")} == {"ap", "eu", "us"}
    gate.release()
    assert (await run).state in (TxState.COMMITTING, TxState.COMMITTED)


def _only_txid(env: Env) -> str:
    (txid,) = {c.txid for c in env.ports.calls if c.txid}
    return txid
