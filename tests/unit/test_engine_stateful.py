"""A Hypothesis state machine over the engine: random transactions, faults, crashes and recovery.

The machine drives ``TransactionManager`` and ``Recovery`` against the in-memory fakes (three
agents, the decision log, the clock), keeps what the client was told about every txid, and checks
proto/PROTOCOL.md's invariants after every step:

- continuously: I2 (a transaction reported committed never has a written branch rolled back), I3
  (one reported aborted never has a committed branch), I4 (no XA COMMIT before the COMMIT record
  was durable), no request applied twice; then (their messages say less) no call answering an
  error outside its contract, no background task failing, no heuristic hazard logged;
- once quiescent (the ``heal_and_settle`` rule, and at teardown): every fault healed, every
  deadline passed and reaped, recovery run a bounded number of times; then I1 (all written
  branches committed or none), I2 (every written branch of a reported commit committed), I5 (no
  branch left prepared or active) and I6 (GetTransaction reports what the agents applied).

Faults: agents down and up, one call failing before or after the agent did the work, a NO vote,
the decision log full, a coordinator failpoint returning an error once, time passing (with the
coordinator's and the agents' reapers), and a call interrupted after a few loop steps by a crash,
a recovery pass, the client's rollback, a reaper or an agent going down. A crash throws the
manager away with all its memory, cancels everything it had in flight, and starts a new one over
the same agents and what the decision log made durable: every COMMIT record whose write returned;
END records are not forced, so the last few may be lost; a compacted log keeps only open commits.

One event loop per example, no pytest-asyncio; no real sleeping (``FakeClock``). The budget is
``TWOPC_STATEFUL_EXAMPLES`` examples of up to ``TWOPC_STATEFUL_STEPS`` steps (defaults below):
raise them locally to hunt for bugs. The bugs found so far are replayed step by step at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import structlog.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coordinator.decision_log import CommitRecord, DecisionLogFull, Replay
from coordinator.engine.manager import EngineSettings, TransactionManager
from coordinator.engine.ports import CommitReply, Statements, Vote, VoteReply
from coordinator.engine.recovery import Recovery
from coordinator.engine.states import Outcome, TxState
from participants.branches import BranchState
from tests.unit.fakes import FakeClock, FakeParticipants, InMemoryDecisionLog
from twopc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TransactionAborted,
    TwopcError,
    Unavailable,
)
from twopc.failpoints import FAILPOINTS, Failpoints

T = TypeVar("T")

EXAMPLES = int(os.environ.get("TWOPC_STATEFUL_EXAMPLES", "300"))
STEPS = int(os.environ.get("TWOPC_STATEFUL_STEPS", "40"))
STEP_DEADLINE_S = 10.0  # real time; reached only if the engine hangs
SETTLE_PASSES = 3  # recovery passes allowed to reach quiescence once every fault is healed
REGIONS = ("eu", "us", "ap")
STATEMENTS = {
    "write": "UPDATE accounts SET balance = balance + 1 WHERE id = 1",
    "read": "SELECT balance FROM accounts WHERE id = 1",
    "fail": "FAIL 1205",
}
SETTINGS = EngineSettings(
    coordinator_id="c1",
    default_timeout_ms=5_000,
    max_timeout_ms=60_000,
    max_active=1_000,
    rpc_timeout_s=1.0,
    phase2_attempts=3,
    phase2_backoff_s=0.05,
    finished_memory=10_000,
)
PAST_EVERY_DEADLINE_S = SETTINGS.max_timeout_ms / 1000 + 1
# The failpoints the engine passes on the event loop (``after_begin`` is a blocking hit in begin).
COORDINATOR_FAILPOINTS = tuple(
    name
    for name in FAILPOINTS
    if name.startswith("coordinator.") and name != "coordinator.after_begin"
)
FAILPOINT_KINDS = ("unavailable", "deadline")  # what a real component sends there
HAZARD_EVENTS = {"heuristic_hazard", "recovery_conflict", "decision_log_failed"}

regions = st.sampled_from(REGIONS)
# Writes dominate; a few reads (READ_ONLY votes) and failing statements (StatementFailed).
kinds = st.sampled_from(("write", "read", "write", "fail", "write", "read"))
works = st.dictionaries(regions, st.lists(kinds, min_size=1, max_size=2), min_size=1)
# None: no request id; -1: a new one; k >= 0: the k-th one used before (a retry), if any.
requests = st.one_of(st.none(), st.just(-1), st.integers(0, 5))
timeouts_ms = st.sampled_from((5_000, 1_000, 20_000))
# What happens while a call is in flight, after it made ``steps`` loop steps (see ``_race``).
step_counts = st.one_of(st.integers(0, 2), st.integers(0, 12))  # the first steps matter most
interruptions = st.sampled_from(
    ("crash", "recover", "rollback", "reap", "agents_reap", "down-eu", "down-us", "down-ap")
)


class Answer(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    UNKNOWN = "unknown"


class Agents(FakeParticipants):
    """The fake agents, plus what the machine needs: each branch's deadline (the agent's own
    reaper rolls back an active branch past it), a NO vote on the next prepare (the agent rolls
    its branch back and votes ABORT, as on a deadlock), and how many times each branch's writes
    were applied (committed)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(REGIONS)
        self._clock = clock
        self.deadlines: dict[tuple[str, str], float] = {}
        self.no_votes: Counter[str] = Counter()
        self.applied: Counter[tuple[str, str]] = Counter()

    def heal(self) -> None:
        self.down.clear()
        self._faults.clear()
        self.no_votes.clear()

    def reap_expired(self) -> int:
        """The agents' reaper: active (unprepared) branches past their deadline roll back."""
        now = self._clock.monotonic()
        reaped = 0
        for participant, branches in self.branches.items():
            for txid, state in branches.items():
                deadline = self.deadlines.get((participant, txid), now)
                if state is BranchState.ACTIVE and now >= deadline:
                    branches[txid] = BranchState.ROLLED_BACK
                    reaped += 1
        return reaped

    def unfinished(self) -> list[tuple[str, str, BranchState]]:
        return [
            (participant, txid, state)
            for participant, branches in self.branches.items()
            for txid, state in branches.items()
            if state in (BranchState.ACTIVE, BranchState.PREPARED)
        ]

    def committed_on(self, txid: str) -> list[str]:
        return [p for p in REGIONS if txid in self.markers[p]]

    def written_on(self, txid: str) -> list[str]:
        return [p for p in REGIONS if txid in self.wrote[p]]

    async def execute(
        self,
        participant: str,
        txid: str,
        statements: Statements,
        sequence: int,
        timeout: float,
        *,
        continues: bool = False,
    ) -> Sequence[object]:
        self.deadlines.setdefault((participant, txid), self._clock.monotonic() + timeout)
        return await super().execute(
            participant, txid, statements, sequence, timeout, continues=continues
        )

    def _prepare(self, participant: str, txid: str, statements: Statements) -> VoteReply:
        state = self.state(participant, txid)
        if self.no_votes[participant] and state in (None, BranchState.ACTIVE):
            self.no_votes[participant] -= 1
            self.branches[participant][txid] = BranchState.ROLLED_BACK
            return VoteReply(Vote.ABORT, "deadlock found when trying to get lock", 1213)
        return super()._prepare(participant, txid, statements)

    def _commit_one_phase(self, participant: str, txid: str, statements: Statements) -> CommitReply:
        before = self.state(participant, txid)
        reply = super()._commit_one_phase(participant, txid, statements)
        self._count_applied(participant, txid, before)
        return reply

    def _commit_prepared(self, participant: str, txid: str, statements: Statements) -> CommitReply:
        before = self.state(participant, txid)
        reply = super()._commit_prepared(participant, txid, statements)
        self._count_applied(participant, txid, before)
        return reply

    def _count_applied(self, participant: str, txid: str, before: BranchState | None) -> None:
        now = self.state(participant, txid)
        if now is BranchState.COMMITTED and before is not now and txid in self.wrote[participant]:
            self.applied[(participant, txid)] += 1


def _in_creation_order(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks by creation (asyncio names them Task-<n>): a set's order changes from run to run."""

    def number(task: asyncio.Task[Any]) -> int:
        _, _, n = task.get_name().rpartition("-")
        return int(n) if n.isdigit() else -1

    return sorted(tasks, key=number)


@dataclasses.dataclass
class Interactive:
    """A transaction the client began and has not finished (it may be dead on the coordinator)."""

    txid: str
    sequence: int = 0


class TwoPhaseCommitMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.loop_errors: list[str] = []
        self._logs = contextlib.ExitStack()
        self.events = self._logs.enter_context(structlog.testing.capture_logs())
        self.clock = FakeClock()
        self.agents = Agents(self.clock)
        self.log = InMemoryDecisionLog(self.agents.calls)
        self.fatal: list[BaseException] = []
        self.manager = self._new_manager()
        self._run(self.manager.start())
        # What the client was told, per txid (a request id retried gets several answers).
        self.answers: dict[str, list[Answer]] = {}
        self.open: list[Interactive] = []
        self.request_work: dict[str, list[tuple[str, list[str]]]] = {}
        self.durable_at: dict[str, int] = {}
        self.contract_errors: list[str] = []
        self._calls_checked = 0

    # --- plumbing ----------------------------------------------------------------------------

    def _new_manager(self) -> TransactionManager:
        """A coordinator process: its manager, recovery and (disarmed) failpoints."""
        self.failpoints = Failpoints(rng=random.Random(0))
        manager = TransactionManager(
            SETTINGS,
            self.agents,
            self.log,
            clock=self.clock,
            failpoints=self.failpoints,
            on_fatal=self.fatal.append,
        )
        self.recovery = Recovery(
            manager, rpc_timeout=SETTINGS.rpc_timeout_s, failpoints=self.failpoints
        )
        return manager

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs ``work`` to its end; a hang fails with the stacks of every task left waiting."""
        task = self.loop.create_task(work)
        self.loop.run_until_complete(asyncio.wait({task}, timeout=STEP_DEADLINE_S))
        if not task.done():
            stacks = "\n".join(
                f"{t.get_name()}: {t.get_coro()!r} at "
                + " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in t.get_stack())
                for t in _in_creation_order(asyncio.all_tasks(self.loop))
            )
            raise AssertionError(f"hang: no progress in {STEP_DEADLINE_S} s; tasks:\n{stacks}")
        return task.result()

    def _step(self) -> None:
        """Runs one iteration of the loop: each ready task makes one step."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    async def _drain(self) -> None:
        """Waits for the manager's background work (phase 2, quiet rollbacks)."""
        while self.manager._background:
            await asyncio.gather(*list(self.manager._background), return_exceptions=True)

    async def _cancel_everything(self) -> None:
        """What a crash does to the coordinator's work in flight: it stops, wherever it was."""
        me = asyncio.current_task()
        while others := [
            t for t in _in_creation_order(asyncio.all_tasks()) if t is not me and not t.done()
        ]:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def _tell(self, txid: str, answer: Answer) -> None:
        assert txid, f"the client was told {answer.value} without a txid to look it up by"
        self.answers.setdefault(txid, []).append(answer)

    def _pick(self, pick: int) -> Interactive:
        return self.open[pick % len(self.open)]

    def _note_durable(self) -> None:
        for txid, at in self.log.durable_at.items():
            self.durable_at.setdefault(txid, at)

    # --- client calls: each notes what the client was told ---------------------------------

    def _off_contract(self, call: str, err: TwopcError) -> Answer:
        """An error that ``call`` may not answer: noted (the check comes after the invariants',
        which say more), and the outcome counts as unknown to the client."""
        self.contract_errors.append(f"{call} answered {type(err).__name__}: {err.message}")
        return Answer.UNKNOWN

    async def _commit(self, manager: TransactionManager, txid: str, wait: bool) -> None:
        try:
            state = await manager.commit(txid, wait_for_phase2=wait)
        except (TransactionAborted, InvalidArgument):  # StatementFailed is a TransactionAborted
            self._tell(txid, Answer.ABORTED)
        except (Unavailable, DeadlineExceeded):
            self._tell(txid, Answer.UNKNOWN)
        except TwopcError as err:
            self._tell(txid, self._off_contract(f"Commit({txid})", err))
        else:
            assert state in (TxState.COMMITTED, TxState.COMMITTING), state
            self._tell(txid, Answer.COMMITTED)

    async def _rollback(self, manager: TransactionManager, txid: str) -> None:
        try:
            state = await manager.rollback(txid)
        except FailedPrecondition as err:
            if "committed" in err.message:
                self._tell(txid, Answer.COMMITTED)
            else:
                self._tell(txid, self._off_contract(f"Rollback({txid})", err))
        except (Unavailable, DeadlineExceeded):
            self._tell(txid, Answer.UNKNOWN)
        except TwopcError as err:
            self._tell(txid, self._off_contract(f"Rollback({txid})", err))
        else:
            assert state is TxState.ABORTED, state
            self._tell(txid, Answer.ABORTED)

    async def _execute(
        self, manager: TransactionManager, handle: Interactive, participant: str, kind: str
    ) -> None:
        handle.sequence += 1
        try:
            await manager.execute(handle.txid, participant, [STATEMENTS[kind]], handle.sequence)
        except (TransactionAborted, NotFound):
            # NotFound: begun before a restart of the coordinator, "which aborted it".
            self._tell(handle.txid, Answer.ABORTED)
            if handle in self.open:
                self.open.remove(handle)
        except (FailedPrecondition, InvalidArgument):
            pass  # refused (the transaction is committing, or the agent refused): as it was
        except (Unavailable, DeadlineExceeded):
            pass  # the answer was lost: the statement may have run; the transaction goes on
        except TwopcError as err:
            self._off_contract(f"Execute({handle.txid})", err)

    async def _one_shot(
        self,
        manager: TransactionManager,
        work: list[tuple[str, list[str]]],
        request_id: str,
        wait: bool,
    ) -> None:
        try:
            outcome = await manager.run(
                work, timeout_ms=5_000, request_id=request_id, wait_for_phase2=wait
            )
        except (TransactionAborted, InvalidArgument) as err:
            self._tell(err.txid, Answer.ABORTED)
        except (Unavailable, DeadlineExceeded) as err:
            # A lost answer names no txid: the client asks by request id (the SDK always sends
            # one); without one it cannot ask, and there is nothing to check.
            txid = err.txid or (manager.request_txid(request_id) if request_id else "")
            if txid:
                self._tell(txid, Answer.UNKNOWN)
        except TwopcError as err:
            answer = self._off_contract(f"RunTransaction({request_id or '-'})", err)
            if err.txid:
                self._tell(err.txid, answer)
        else:
            assert outcome.state in (TxState.COMMITTED, TxState.COMMITTING), outcome.state
            self._tell(outcome.txid, Answer.COMMITTED)

    async def _reap(self, manager: TransactionManager) -> None:
        """The coordinator's reaper (its daemon loop logs what this raises, and goes on)."""
        try:
            await manager.reap_expired()
        except TwopcError as err:
            self._off_contract("reap_expired()", err)

    def _work_for(
        self, work: dict[str, list[str]], request: int | None
    ) -> tuple[list[tuple[str, list[str]]], str]:
        """The one-shot work and its request id; a retried request id sends the same work."""
        if request is not None and request >= 0 and self.request_work:
            request_id = list(self.request_work)[request % len(self.request_work)]
            return self.request_work[request_id], request_id
        statements = [(p, [STATEMENTS[k] for k in ks]) for p, ks in work.items()]
        if request is None:
            return statements, ""
        request_id = f"req-{len(self.request_work)}"
        self.request_work[request_id] = statements
        return statements, request_id

    # --- crash and recovery ------------------------------------------------------------------

    def _durable_replay(self, lost_ends: int, compacted: bool) -> Replay:
        """What the decision log holds after a crash: every COMMIT record whose write returned.
        END records are not forced: the last ``lost_ends`` of this life may be gone. A compacted
        log keeps only the open commits (it forgot which transactions ended)."""
        ends = self.log.ends[: max(0, len(self.log.ends) - lost_ends)]
        ended = set(self.log.replay.ended) | set(ends)
        records: dict[str, CommitRecord] = {}
        for record in [*self.log.replay.open_commits, *self.log.commits]:
            records.setdefault(record.txid, record)
        return Replay(
            open_commits=[r for txid, r in records.items() if txid not in ended],
            ended=set() if compacted else ended,
        )

    def _crash_and_restart(
        self, lost_ends: int = 0, compacted: bool = False, passes: int = 1, bring_up: bool = False
    ) -> None:
        self.loop.run_until_complete(self._cancel_everything())
        self._note_durable()
        replay = self._durable_replay(lost_ends, compacted)
        self.log = InMemoryDecisionLog(self.agents.calls, replay)
        self.manager = self._new_manager()
        self._run(self.manager.start())
        for _ in range(passes):
            if bring_up and self.agents.down:
                self.agents.down.discard(sorted(self.agents.down)[0])
            self._run(self.recovery.run_once())

    def _settle(self) -> None:
        """Heals every fault, lets every deadline pass and recovery run until nothing is left."""
        self.agents.heal()
        for point in FAILPOINTS:
            self.failpoints.set(point, "")
        self.log.commit_failures.clear()
        self.log.end_failures.clear()
        self._run(self._drain())
        self.clock.advance(PAST_EVERY_DEADLINE_S)
        self._run(self.manager.reap_expired())
        self._run(self._drain())
        self.agents.reap_expired()
        for _ in range(SETTLE_PASSES):
            report = self._run(self.recovery.run_once())
            self._run(self._drain())
            if report.clean and not self.agents.unfinished():
                break

    def _check_quiescent(self) -> None:
        # I5: nothing left prepared or active, nothing left to drive.
        assert not self.agents.unfinished(), (
            f"I5: after healing and {SETTLE_PASSES} recovery passes, branches are left "
            f"unfinished: {self.agents.unfinished()}"
        )
        assert not self.manager.open_commits_to_drive(), self.manager.open_commits_to_drive()
        assert not self.manager._live, list(self.manager._live)
        txids = {t for p in REGIONS for t in self.agents.wrote[p]} | set(self.answers)
        for txid in sorted(txids):
            written = self.agents.written_on(txid)
            committed = self.agents.committed_on(txid)
            # I1: every written branch committed, or none.
            assert not committed or set(committed) == set(written), (
                f"I1: {txid} wrote on {written} but committed only on {committed}"
            )
            # I2: a commit the client was told of is applied on every written branch.
            if Answer.COMMITTED in self.answers.get(txid, []):
                assert set(committed) == set(written), (
                    f"I2: the client was told {txid} committed; it wrote on {written}, "
                    f"committed on {committed}"
                )
            # I6 (and GetTransaction in general): the outcome looked up is the one applied.
            if written:
                view = self._run(self.manager.lookup(txid))
                expected = Outcome.COMMITTED if committed else Outcome.ABORTED
                assert view.outcome is expected, (
                    f"I6: lookup({txid}) says {view.state.value} ({view.abort_reason!r}); the "
                    f"agents show it {expected.value} (answers: {self.answers.get(txid)})"
                )

    # --- rules: interactive transactions -----------------------------------------------------

    @rule(timeout_ms=timeouts_ms)
    def begin(self, timeout_ms: int) -> None:
        tx = self.manager.begin(timeout_ms)
        self.open.append(Interactive(tx.txid))

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10), participant=regions, kind=kinds)
    def execute(self, pick: int, participant: str, kind: str) -> None:
        self._run(self._execute(self.manager, self._pick(pick), participant, kind))

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10), wait=st.booleans())
    def commit(self, pick: int, wait: bool) -> None:
        handle = self._pick(pick)
        self.open.remove(handle)
        self._run(self._commit(self.manager, handle.txid, wait))

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10))
    def rollback(self, pick: int) -> None:
        handle = self._pick(pick)
        self.open.remove(handle)
        self._run(self._rollback(self.manager, handle.txid))

    # --- rules: one-shot transactions --------------------------------------------------------

    @rule(work=works, request=requests, wait=st.booleans())
    def run(self, work: dict[str, list[str]], request: int | None, wait: bool) -> None:
        statements, request_id = self._work_for(work, request)
        self._run(self._one_shot(self.manager, statements, request_id, wait))

    # --- rules: a call interrupted after some loop steps -------------------------------------

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10), wait=st.booleans(), steps=step_counts, then=interruptions)
    def commit_interrupted(self, pick: int, wait: bool, steps: int, then: str) -> None:
        handle = self._pick(pick)
        self.open.remove(handle)
        self._race(self._commit(self.manager, handle.txid, wait), steps, then, handle.txid)

    @rule(work=works, request=requests, wait=st.booleans(), steps=step_counts, then=interruptions)
    def run_interrupted(
        self, work: dict[str, list[str]], request: int | None, wait: bool, steps: int, then: str
    ) -> None:
        statements, request_id = self._work_for(work, request)
        txid = self.manager.request_txid(request_id) if request_id else ""
        self._race(self._one_shot(self.manager, statements, request_id, wait), steps, then, txid)

    @precondition(lambda self: self.open)
    @rule(
        pick=st.integers(0, 10),
        participant=regions,
        kind=kinds,
        steps=step_counts,
        then=interruptions,
    )
    def execute_interrupted(
        self, pick: int, participant: str, kind: str, steps: int, then: str
    ) -> None:
        handle = self._pick(pick)
        call = self._execute(self.manager, handle, participant, kind)
        self._race(call, steps, then, handle.txid, unknown_if_cut=False)
        if then == "rollback" and handle in self.open:
            self.open.remove(handle)  # the client rolled it back

    @rule(steps=step_counts, then=interruptions)
    def recovery_interrupted(self, steps: int, then: str) -> None:
        self._race(self.recovery.run_once(), steps, then, "", unknown_if_cut=False)

    def _race(
        self,
        call: Coroutine[Any, Any, Any],
        steps: int,
        then: str,
        txid: str,
        *,
        unknown_if_cut: bool = True,
    ) -> None:
        """Runs ``call`` for ``steps`` loop steps, then does ``then`` while it is in flight.

        ``then`` is a crash, or something that runs alongside: a recovery pass, the client's
        rollback of the same transaction, the coordinator's reaper (or the agents') after every
        deadline passed, an agent going down."""
        before = set(self.manager._live)
        task = self.loop.create_task(call)
        for _ in range(steps):
            if task.done():
                break
            self._step()
            if not txid and (new := sorted(set(self.manager._live) - before)):
                txid = new[0]  # the txid of a one-shot transaction, once begun
        if then == "crash":
            if task.done():
                task.result()
            elif txid and unknown_if_cut:
                self._tell(txid, Answer.UNKNOWN)  # the client's call broke: outcome unknown
            self._crash_and_restart()
            return
        other: Coroutine[Any, Any, Any] | None = None
        if then == "recover":
            other = self.recovery.run_once()
        elif then == "rollback" and txid:
            other = self._rollback(self.manager, txid)
        elif then == "reap":
            self.clock.advance(PAST_EVERY_DEADLINE_S)
            other = self._reap(self.manager)
        elif then.startswith("down-"):
            self.agents.down.add(then.removeprefix("down-"))
        elif then == "agents_reap":
            self.clock.advance(PAST_EVERY_DEADLINE_S)
            self.agents.reap_expired()
        tasks = [task] if other is None else [task, self.loop.create_task(other)]
        self._run(asyncio.wait(tasks))
        for done in tasks:
            done.result()

    # --- rules: faults -----------------------------------------------------------------------

    @rule(participant=regions)
    def agent_down(self, participant: str) -> None:
        self.agents.down.add(participant)

    @precondition(lambda self: self.agents.down)
    @rule(pick=st.integers(0, 2))
    def agent_up(self, pick: int) -> None:
        down = sorted(self.agents.down)
        self.agents.down.discard(down[pick % len(down)])

    @rule(
        method=st.sampled_from(("execute", "prepare", "commit", "rollback", "recover", "inspect")),
        participant=regions,
        after=st.booleans(),
        deadline=st.booleans(),
    )
    def fail_next_call(self, method: str, participant: str, after: bool, deadline: bool) -> None:
        """The next call fails: before the agent did the work, or after it (the answer lost)."""
        error: TwopcError = (
            DeadlineExceeded("deadline exceeded") if deadline else Unavailable("connection reset")
        )
        self.agents.fail(method, participant, error, after=after)

    @rule(point=st.sampled_from(COORDINATOR_FAILPOINTS), kind=st.sampled_from(FAILPOINT_KINDS))
    def failpoint_once(self, point: str, kind: str) -> None:
        """The coordinator's next pass at ``point`` fails there (a lost vote, a failed log
        write, a phase 2 or a recovery step stopped, an Execute answer lost)."""
        self.failpoints.set(point, f"1*return({kind})")

    @rule(participant=regions)
    def vote_no_next(self, participant: str) -> None:
        self.agents.no_votes[participant] += 1

    @rule()
    def decision_log_full(self) -> None:
        self.log.fail_next_commit(DecisionLogFull("no space left on device"))

    @rule(seconds=st.sampled_from((0.5, 2.0, 6.0, 25.0)), reap=st.booleans())
    def time_passes(self, seconds: float, reap: bool) -> None:
        self.clock.advance(seconds)
        if reap:
            self._run(self._reap(self.manager))

    @rule()
    def agents_reap(self) -> None:
        self.agents.reap_expired()

    # --- rules: crash and recovery -----------------------------------------------------------

    @rule(
        lost_ends=st.integers(0, 2),
        compacted=st.booleans(),
        passes=st.integers(0, 3),
        bring_up=st.booleans(),
    )
    def crash(self, lost_ends: int, compacted: bool, passes: int, bring_up: bool) -> None:
        self._crash_and_restart(lost_ends, compacted, passes, bring_up)

    @rule()
    def recover(self) -> None:
        self._run(self.recovery.run_once())

    @rule()
    def heal_and_settle(self) -> None:
        self._settle()
        self._check_quiescent()

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def safety(self) -> None:
        # I4: every two-phase XA COMMIT went out after its transaction's COMMIT record was durable.
        self._note_durable()
        calls = self.agents.calls
        for index in range(self._calls_checked, len(calls)):
            call = calls[index]
            if call.method == "commit" and not call.one_phase:
                durable = self.durable_at.get(call.txid, len(calls))
                assert index >= durable, (
                    f"I4: XA COMMIT #{index} of {call.txid} to {call.participant}, but its "
                    f"COMMIT record was durable at call #{durable} (or never)"
                )
        self._calls_checked = len(calls)
        for (participant, txid), times in self.agents.applied.items():
            assert times <= 1, f"{txid} was applied {times} times on {participant}"
        for txid, answers in self.answers.items():
            committed = self.agents.committed_on(txid)
            # I3: a transaction reported aborted has no committed branch, ever.
            if Answer.ABORTED in answers:
                assert not committed, (
                    f"I3: the client was told {txid} aborted ({answers}), yet it committed on "
                    f"{committed}"
                )
            # I2: a transaction reported committed never has a written branch rolled back.
            if Answer.COMMITTED in answers:
                for p in self.agents.written_on(txid):
                    assert (
                        self.agents.state(p, txid) is not BranchState.ROLLED_BACK or p in committed
                    ), f"I2: the client was told {txid} committed ({answers}); rolled back on {p}"
        # Last, so that an invariant's message comes first: what went wrong behind the scenes.
        hazards = [e for e in self.events if e.get("event") in HAZARD_EVENTS]
        assert not hazards, f"the engine logged a hazard: {hazards}"
        assert not self.contract_errors, f"a call answered off its contract: {self.contract_errors}"
        assert not self.loop_errors, f"a background task failed: {self.loop_errors}"
        assert not self.fatal, f"the decision log failed: {self.fatal}"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:  # not while a failure is on its way out
                self._settle()
                self._check_quiescent()
                self.safety()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self._cancel_everything())
            self.loop.close()
            self._logs.close()


TwoPhaseCommitMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineStateful = TwoPhaseCommitMachine.TestCase


# --------------------------------------------------------------------------------------------------
# Bugs the machine found, as it printed them once shrunk (they fail until the engine is fixed)
# --------------------------------------------------------------------------------------------------


def replay(*steps: Callable[[TwoPhaseCommitMachine], None], check_each: bool = True) -> None:
    """Runs the steps of a shrunk example with the invariants checked after each step (or only
    after the last one), then the teardown's heal, settle and final checks."""
    machine = TwoPhaseCommitMachine()
    try:
        for step in steps:
            step(machine)
            if check_each:
                machine.safety()
        machine.safety()
    finally:
        machine.teardown()


def test_rollback_racing_a_one_phase_commit_answers_aborted_for_a_committed_branch() -> None:
    """Rollback checks ``tx.state is ACTIVE`` and then spawns ``_abort``, which runs a loop step
    later: meanwhile Commit's ``_decide`` moved the transaction to PREPARING and sent the
    one-phase commit. ``_abort`` moves PREPARING -> ABORTING anyway; the commit lands, so
    ``_commit_one_phase`` raises IllegalTransition (aborting -> committed) and Rollback answers
    ABORTED: I3 broken."""
    replay(
        lambda m: m.run_interrupted(
            work={"eu": ["write"]}, request=-1, wait=False, steps=0, then="rollback"
        )
    )


def test_rollback_racing_a_two_phase_commit_commits_a_branch_after_answering_aborted() -> None:
    """The same race with two participants: the prepares land before the rollbacks, so both vote
    PREPARED; ``_decide`` writes the COMMIT record (durable, kept in ``_open_commits``) and only
    then fails with IllegalTransition (aborted -> committing). Rollback answered ABORTED; eu was
    rolled back, us's rollback was lost and recovery re-drives the record: us commits (I1, I3)."""
    replay(
        lambda m: m.begin(timeout_ms=5_000),
        lambda m: m.execute(pick=0, participant="eu", kind="write"),
        lambda m: m.execute(pick=0, participant="us", kind="write"),
        lambda m: m.fail_next_call(
            method="rollback", participant="us", after=False, deadline=False
        ),
        lambda m: m.commit_interrupted(pick=0, wait=False, steps=0, then="rollback"),
        lambda m: m.recover(),
        check_each=False,
    )


def test_reaper_racing_the_commit_of_an_empty_transaction() -> None:
    """``reap_expired`` picks the ACTIVE transactions past their deadline, then runs ``_abort`` on
    each in a task of ``gather``; meanwhile Commit of a transaction that touched nothing moved it
    to COMMITTED (``_decide`` does not look at the deadline then): IllegalTransition (committed
    -> aborting) out of ``reap_expired``."""
    replay(
        lambda m: m.begin(timeout_ms=5_000),
        lambda m: m.commit_interrupted(pick=0, wait=False, steps=0, then="reap"),
    )


def test_a_request_reported_aborted_commits_when_retried_after_a_restart() -> None:
    """Request req-0 (ap writes, eu reads) cannot reach ap: the prepare and the rollback fail, so
    ap never saw the txid and keeps no tombstone; eu's branch is read-only. The client is told
    ABORTED. The coordinator restarts (aborts are not logged: it forgets req-0), ap comes back, and
    the client's retry of req-0, under the same txid, commits on ap: I3 broken for that txid."""
    replay(
        lambda m: m.agent_down(participant="ap"),
        lambda m: m.run(work={"ap": ["write"], "eu": ["read"]}, request=-1, wait=False),
        lambda m: m.crash(lost_ends=0, compacted=False, passes=1, bring_up=True),
        lambda m: m.run(work={"eu": ["write"]}, request=0, wait=False),
    )


def test_a_committed_request_retried_after_compaction_and_a_restart_is_reported_aborted() -> None:
    """Request req-0 commits on eu and us (END written). The log is compacted (it keeps only open
    commits) and the coordinator restarts: it no longer knows req-0. The client retries req-0
    while eu and us cannot be reached: both prepares fail, which the engine counts as NO votes,
    and it answers TransactionAborted for a transaction that committed: I3 broken (a client that
    then resubmits under a new request id applies the transfer twice)."""
    replay(
        lambda m: m.run(work={"eu": ["write"], "us": ["write"]}, request=-1, wait=True),
        lambda m: m.crash(lost_ends=0, compacted=True, passes=0, bring_up=False),
        lambda m: m.agent_down(participant="eu"),
        lambda m: m.agent_down(participant="us"),
        lambda m: m.run(work={"eu": ["write"]}, request=0, wait=False),
    )


def test_a_committed_request_retried_after_a_restart_past_its_deadline_is_reported_aborted() -> (
    None
):
    """Request req-0 commits on us in one phase (no log record). The coordinator restarts and
    forgets it. The client retries req-0; the retry's deadline passes before ``_decide`` (the
    clock jumps), so ``_abort`` rolls back us: the agent refuses ("committed; it cannot be rolled
    back"), ``_rollback_quietly`` swallows that, and the client is told TransactionAborted for a
    request that committed: I3 broken."""
    replay(
        lambda m: m.run(work={"us": ["write"]}, request=-1, wait=False),
        lambda m: m.crash(lost_ends=0, compacted=False, passes=0, bring_up=False),
        lambda m: m.run_interrupted(
            work={"us": ["write"]}, request=0, wait=False, steps=1, then="agents_reap"
        ),
    )
