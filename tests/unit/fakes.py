"""In-memory stand-ins for the engine's collaborators: the agents, the decision log, the clock.

``FakeParticipants`` implements ``ParticipantPort`` and behaves like the agents of
``participants/agent.py``, one dict of branches per participant, without a database:

- a statement is a string; one that starts with ``SELECT`` reads, any other writes, and
  ``FAIL <errno>`` fails (the agent rolls its branch back and raises ``StatementFailed``);
- prepare of a branch that wrote votes PREPARED, of one that only read votes READ_ONLY (and is
  finished); a branch whose txid has a commit marker (committed here before) votes
  ALREADY_COMMITTED, as the agent's duplicate marker row makes it do;
- commit and rollback are idempotent; recover lists prepared branches; inspect answers like the
  agent's (live branch, finished branch, then the commit markers).

Faults are scripted per (method, participant), like python-spanner's mock servicer: raise an
error for the next N calls (before doing the work, or after it: an answer lost on the way back),
return a scripted reply instead of doing the work, or hold the call at a ``Gate`` until the test
releases it. Every call is recorded in order in ``calls``; ``InMemoryDecisionLog`` notes the
length of that list when a COMMIT record became durable, which is what the I4 checks compare with.

``FakeClock`` is the engine's clock: ``sleep`` advances time at once, nothing really waits.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

from coordinator.decision_log import AuditRecord, CommitRecord, Replay
from coordinator.engine.ports import (
    CommitReply,
    Presence,
    Results,
    Statements,
    Vote,
    VoteReply,
    WaitEdge,
)
from participants.branches import BranchState
from twopc.errors import (
    FailedPrecondition,
    InvalidArgument,
    StatementFailed,
    TransactionAborted,
    TwopcError,
    Unavailable,
)

__all__ = [
    "Call",
    "FakeClock",
    "FakeParticipants",
    "Fault",
    "Gate",
    "InMemoryDecisionLog",
]

METHODS = ("execute", "prepare", "commit", "rollback", "recover", "inspect")


class Gate:
    """Holds a call until the test releases it. ``entered`` is set once a call waits here."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.released = asyncio.Event()

    def release(self) -> None:
        self.released.set()

    async def pass_through(self) -> None:
        self.entered.set()
        await self.released.wait()


@dataclasses.dataclass(frozen=True)
class Call:
    """One call received by a fake agent."""

    method: str
    participant: str
    txid: str = ""
    one_phase: bool = False
    statements: tuple[object, ...] = ()


@dataclasses.dataclass
class Fault:
    """What the next ``times`` calls of one method on one participant do instead of the normal.

    Attributes:
        error: raised (a copy of it), before the work is done, or after it when ``after``.
        reply: returned instead of doing the work (a ``VoteReply`` for prepare, a
            ``CommitReply`` for commit).
        after: do the work, then raise ``error``: the agent acted but its answer was lost.
        gate: the call waits at this gate first (then does what the other fields say).
        times: how many calls this fault applies to.
    """

    error: TwopcError | None = None
    reply: VoteReply | CommitReply | None = None
    after: bool = False
    gate: Gate | None = None
    times: int = 1


class FakeParticipants:
    """``ParticipantPort`` over in-memory agents. See the module docstring."""

    def __init__(self, names: Iterable[str] = ("eu", "us", "ap")) -> None:
        self._names = tuple(names)
        self.branches: dict[str, dict[str, BranchState]] = {n: {} for n in self._names}
        self.wrote: dict[str, set[str]] = {n: set() for n in self._names}
        # Commit markers: the txids whose writing branch committed on that participant. They
        # outlive the branch, as the agent's marker rows outlive its bounded memory.
        self.markers: dict[str, set[str]] = {n: set() for n in self._names}
        # What waits_for answers, per participant (the deadlock detector's tests set it).
        self.waits: dict[str, list[WaitEdge]] = {}
        self.calls: list[Call] = []
        self.down: set[str] = set()
        self._faults: dict[tuple[str, str], deque[Fault]] = defaultdict(deque)

    # --- scripting ----------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        participant: str,
        error: TwopcError,
        *,
        times: int = 1,
        after: bool = False,
        gate: Gate | None = None,
    ) -> None:
        """The next ``times`` calls of ``method`` on ``participant`` raise ``error``."""
        self.add_fault(method, participant, Fault(error=error, after=after, gate=gate, times=times))

    def script(
        self, method: str, participant: str, reply: VoteReply | CommitReply, *, times: int = 1
    ) -> None:
        """The next ``times`` calls of ``method`` on ``participant`` return ``reply``."""
        self.add_fault(method, participant, Fault(reply=reply, times=times))

    def hold(self, method: str, participant: str) -> Gate:
        """The next call of ``method`` on ``participant`` waits until the gate is released."""
        gate = Gate()
        self.add_fault(method, participant, Fault(gate=gate))
        return gate

    def add_fault(self, method: str, participant: str, fault: Fault) -> None:
        assert method in METHODS, method
        assert participant in self._names, participant
        self._faults[(method, participant)].append(fault)

    def seed(self, participant: str, txid: str, state: BranchState, *, wrote: bool = True) -> None:
        """Puts a branch in a state directly (what a crash left behind)."""
        self.branches[participant][txid] = state
        if wrote:
            self.wrote[participant].add(txid)
        if wrote and state is BranchState.COMMITTED:
            self.markers[participant].add(txid)

    # --- reading --------------------------------------------------------------------------------

    def state(self, participant: str, txid: str) -> BranchState | None:
        return self.branches[participant].get(txid)

    def calls_of(
        self, method: str, participant: str | None = None, txid: str | None = None
    ) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == method
            and (participant is None or c.participant == participant)
            and (txid is None or c.txid == txid)
        ]

    def indexes_of(self, method: str, txid: str, *, one_phase: bool | None = None) -> list[int]:
        """Positions in ``calls`` of the calls of ``method`` for ``txid``."""
        return [
            i
            for i, c in enumerate(self.calls)
            if c.method == method
            and c.txid == txid
            and (one_phase is None or c.one_phase == one_phase)
        ]

    # --- ParticipantPort -----------------------------------------------------------------------

    def names(self) -> Sequence[str]:
        return self._names

    async def execute(
        self,
        participant: str,
        txid: str,
        statements: Statements,
        sequence: int,
        timeout: float,
        *,
        continues: bool = False,
    ) -> Results:
        fault = await self._enter(Call("execute", participant, txid, statements=tuple(statements)))
        if continues and self.state(participant, txid) is None:
            raise TransactionAborted(
                f"participant {participant} lost the branch of {txid}", txid=txid
            )
        results = self._execute(participant, txid, statements)
        _leave(fault)
        return results

    async def prepare(
        self, participant: str, txid: str, statements: Statements, sequence: int, timeout: float
    ) -> VoteReply:
        fault = await self._enter(Call("prepare", participant, txid, statements=tuple(statements)))
        if fault is not None and isinstance(fault.reply, VoteReply):
            return fault.reply
        reply = self._prepare(participant, txid, statements)
        _leave(fault)
        return reply

    async def commit(
        self,
        participant: str,
        txid: str,
        *,
        one_phase: bool,
        statements: Statements = (),
        sequence: int = 0,
        timeout: float,
    ) -> CommitReply:
        call = Call("commit", participant, txid, one_phase=one_phase, statements=tuple(statements))
        fault = await self._enter(call)
        if fault is not None and isinstance(fault.reply, CommitReply):
            return fault.reply
        if one_phase:
            reply = self._commit_one_phase(participant, txid, statements)
        else:
            reply = self._commit_prepared(participant, txid, statements)
        _leave(fault)
        return reply

    async def rollback(self, participant: str, txid: str, timeout: float) -> bool:
        fault = await self._enter(Call("rollback", participant, txid))
        already = self._rollback(participant, txid)
        _leave(fault)
        return already

    async def recover(self, participant: str, txid_prefix: str, timeout: float) -> list[str]:
        fault = await self._enter(Call("recover", participant, txid_prefix))
        prepared = [
            txid
            for txid, state in self.branches[participant].items()
            if state is BranchState.PREPARED and txid.startswith(txid_prefix)
        ]
        _leave(fault)
        return prepared

    async def inspect(
        self, participant: str, txids: Sequence[str], timeout: float
    ) -> dict[str, Presence]:
        fault = await self._enter(Call("inspect", participant, ",".join(txids)))
        answer = {txid: self._presence(participant, txid) for txid in txids}
        _leave(fault)
        return answer

    async def waits_for(self, participant: str, min_wait_ms: int, timeout: float) -> list[WaitEdge]:
        """The edges a test put in ``waits[participant]``."""
        self.calls.append(Call("waits_for", participant, ""))
        await asyncio.sleep(0)
        return list(self.waits.get(participant, ()))

    # --- the agent's behaviour -----------------------------------------------------------------

    async def _enter(self, call: Call) -> Fault | None:
        self.calls.append(call)
        await asyncio.sleep(0)  # a real RPC always lets other tasks run
        fault = self._take(call.method, call.participant)
        if fault is not None and fault.gate is not None:
            await fault.gate.pass_through()
        if call.participant in self.down:
            raise Unavailable(f"agent {call.participant} is unreachable", txid=call.txid)
        if fault is not None and fault.error is not None and not fault.after:
            raise copy.copy(fault.error)
        return fault

    def _take(self, method: str, participant: str) -> Fault | None:
        queue = self._faults.get((method, participant))
        if not queue:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.popleft()
        return fault

    def _run(self, participant: str, txid: str, statements: Statements) -> list[str]:
        results = []
        for statement in statements:
            text = str(statement)
            words = text.split()
            if words and words[0].upper() == "FAIL":
                errno = int(words[1]) if len(words) > 1 else 0
                self.branches[participant][txid] = BranchState.ROLLED_BACK
                raise StatementFailed(
                    f"statement failed on {participant}: {text}", txid=txid, mysql_errno=errno
                )
            if not (words and words[0].upper() == "SELECT"):
                self.wrote[participant].add(txid)
            results.append(f"{participant}: {text}")
        return results

    def _execute(self, participant: str, txid: str, statements: Statements) -> list[str]:
        state = self.state(participant, txid)
        if state is BranchState.ROLLED_BACK:
            raise TransactionAborted(f"branch {txid} on {participant} was rolled back", txid=txid)
        if state is not None and state is not BranchState.ACTIVE:
            raise FailedPrecondition(f"branch {txid} on {participant} is {state.value}", txid=txid)
        self.branches[participant][txid] = BranchState.ACTIVE
        return self._run(participant, txid, statements)

    def _prepare(self, participant: str, txid: str, statements: Statements) -> VoteReply:
        state = self.state(participant, txid)
        if state is None and not statements:
            return VoteReply(Vote.ABORT, f"participant {participant} has no branch of {txid}")
        if state is BranchState.READ_ONLY:
            return VoteReply(Vote.READ_ONLY)
        if state is BranchState.COMMITTED:
            return VoteReply(Vote.ALREADY_COMMITTED, "the branch committed already")
        if state is BranchState.ROLLED_BACK:
            return VoteReply(Vote.ABORT, "the branch was rolled back")
        if state is BranchState.PREPARED:
            return VoteReply(Vote.PREPARED)
        self.branches[participant][txid] = BranchState.ACTIVE
        try:
            results = self._run(participant, txid, statements)
        except StatementFailed as err:
            return VoteReply(Vote.ABORT, err.message, err.mysql_errno)
        if txid not in self.wrote[participant]:
            self.branches[participant][txid] = BranchState.READ_ONLY
            return VoteReply(Vote.READ_ONLY, results=results)
        if txid in self.markers[participant]:
            self.branches[participant][txid] = BranchState.ROLLED_BACK
            return VoteReply(Vote.ALREADY_COMMITTED, "this transaction committed here before")
        self.branches[participant][txid] = BranchState.PREPARED
        return VoteReply(Vote.PREPARED, results=results)

    def _commit_one_phase(self, participant: str, txid: str, statements: Statements) -> CommitReply:
        state = self.state(participant, txid)
        if state is None and not statements:
            if txid in self.markers[participant]:
                return CommitReply(already_committed=True)
            raise TransactionAborted(
                f"participant {participant} has no branch of {txid}", txid=txid
            )
        if state is BranchState.ROLLED_BACK:
            raise TransactionAborted(f"branch {txid} on {participant} was rolled back", txid=txid)
        if state in (BranchState.COMMITTED, BranchState.READ_ONLY):
            return CommitReply(already_committed=True)
        if state is BranchState.PREPARED:
            raise FailedPrecondition(f"branch {txid} is prepared: two-phase commit", txid=txid)
        self.branches[participant][txid] = BranchState.ACTIVE
        results = self._run(participant, txid, statements)
        wrote = txid in self.wrote[participant]
        if wrote and txid in self.markers[participant]:
            self.branches[participant][txid] = BranchState.ROLLED_BACK
            return CommitReply(results, already_committed=True)
        self.branches[participant][txid] = BranchState.COMMITTED
        if wrote:
            self.markers[participant].add(txid)
        return CommitReply(results)

    def _commit_prepared(self, participant: str, txid: str, statements: Statements) -> CommitReply:
        if statements:
            raise InvalidArgument("statements come with a one-phase commit only", txid=txid)
        state = self.state(participant, txid)
        if state is BranchState.ROLLED_BACK:
            raise FailedPrecondition(f"branch {txid} on {participant} was rolled back", txid=txid)
        if state in (BranchState.COMMITTED, BranchState.READ_ONLY):
            return CommitReply(already_committed=True)
        if state is None:
            if txid in self.markers[participant]:
                return CommitReply(already_committed=True)
            raise FailedPrecondition(
                f"branch {txid} is not prepared on {participant} and left no commit marker",
                txid=txid,
            )
        if state is BranchState.ACTIVE:
            raise FailedPrecondition(f"branch {txid} on {participant} is not prepared", txid=txid)
        self.branches[participant][txid] = BranchState.COMMITTED
        self.markers[participant].add(txid)
        return CommitReply()

    def _rollback(self, participant: str, txid: str) -> bool:
        state = self.state(participant, txid)
        if state is BranchState.COMMITTED:
            raise FailedPrecondition(
                f"branch {txid} on {participant} committed; it cannot be rolled back", txid=txid
            )
        if state is None:
            if txid in self.markers[participant]:
                raise FailedPrecondition(
                    f"branch {txid} on {participant} committed; it cannot be rolled back",
                    txid=txid,
                )
            # A tombstone, as the agent keeps: a request for this txid still on its way is refused.
            self.branches[participant][txid] = BranchState.ROLLED_BACK
            return True
        if state.finished:
            return True
        self.branches[participant][txid] = BranchState.ROLLED_BACK
        return False

    def _presence(self, participant: str, txid: str) -> Presence:
        state = self.state(participant, txid)
        if state is BranchState.ACTIVE:
            return Presence.ACTIVE
        if state is BranchState.PREPARED:
            return Presence.PREPARED
        if state is BranchState.COMMITTED:
            return Presence.COMMITTED
        if state is BranchState.ROLLED_BACK:
            return Presence.ROLLED_BACK
        return Presence.COMMITTED if txid in self.markers[participant] else Presence.UNKNOWN


def _leave(fault: Fault | None) -> None:
    """Raises the error of a fault whose work was done first (the answer lost on the way)."""
    if fault is not None and fault.after and fault.error is not None:
        raise copy.copy(fault.error)


class InMemoryDecisionLog:
    """``DecisionLog`` in lists.

    ``durable_at[txid]`` and ``ended_at[txid]`` are the lengths of the participants' call log when
    the COMMIT (END) record of ``txid`` was written: a call at a smaller index came before it.
    """

    def __init__(self, calls: list[Call] | None = None, replay: Replay | None = None) -> None:
        self._calls = calls if calls is not None else []
        self.replay = replay or Replay()
        self.commits: list[CommitRecord] = []
        self.ends: list[str] = []
        self.audits: list[AuditRecord] = []
        # The length of the participants' call log when each audit record was durable.
        self.audited_at: list[int] = []
        self.attempts: list[CommitRecord] = []
        self.durable_at: dict[str, int] = {}
        self.ended_at: dict[str, int] = {}
        self.commit_failures: deque[TwopcError] = deque()
        self.end_failures: deque[TwopcError] = deque()
        self.gate: Gate | None = None
        self.opened = False
        self.closed = False

    def fail_next_commit(self, error: TwopcError) -> None:
        """The next ``record_commit`` raises ``error`` (``DecisionLogFull``/``Failed``)."""
        self.commit_failures.append(error)

    def hold_next_commit(self) -> Gate:
        """The next ``record_commit`` waits at the returned gate before it becomes durable."""
        self.gate = Gate()
        return self.gate

    async def open(self) -> Replay:
        self.opened = True
        return self.replay

    async def record_commit(self, record: CommitRecord) -> None:
        self.attempts.append(record)
        gate, self.gate = self.gate, None
        if gate is not None:
            await gate.pass_through()
        else:
            await asyncio.sleep(0)  # the fsync
        if self.commit_failures:
            raise self.commit_failures.popleft()
        self.commits.append(record)
        self.durable_at[record.txid] = len(self._calls)

    async def record_audit(self, record: AuditRecord) -> None:
        await asyncio.sleep(0)  # the fsync
        self.audits.append(record)
        self.audited_at.append(len(self._calls))

    async def record_end(self, txid: str) -> None:
        if self.end_failures:
            raise self.end_failures.popleft()
        self.ends.append(txid)
        self.ended_at[txid] = len(self._calls)

    def open_commits(self) -> list[CommitRecord]:
        ended = set(self.ends)
        return [r for r in [*self.replay.open_commits, *self.commits] if r.txid not in ended]

    async def close(self) -> None:
        self.closed = True


class FakeClock:
    """The engine's ``Clock``: time moves only when a test advances it or the engine sleeps."""

    def __init__(self, start: float = 1000.0, wall_ms: int = 1_767_225_600_000) -> None:
        self.now = start
        self._start = start
        self._wall_ms = wall_ms
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall_ms(self) -> int:
        return self._wall_ms + round((self.now - self._start) * 1000)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.now += seconds
