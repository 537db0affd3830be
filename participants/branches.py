"""The branches an agent holds: their states, the one transition table, and the registry.

A branch lives here from its XA START until it is finished (committed, rolled back, or read-only
finished at prepare). Finished branches are remembered, a bounded number of them, so that a retried
request gets the first answer without asking the server.

A live branch owns the pooled session it is pinned to. The session is attached once, right after
its checkout, and leaves the branch only through ``release_session`` or ``discard_session``; a
branch that leaves the live set gives back whatever session it still holds (``finish`` releases
it: the branch's work on it is over; ``forget`` discards it: the server settles what it held).
So a branch session cannot be dropped without its pool slot coming back.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from participants.xa import Session, StatementOutput
from twopc.errors import FailedPrecondition, ResourceExhausted, Unavailable
from twopc.txid import Xid

Clock = Callable[[], float]  # monotonic seconds: the time that branch deadlines are read on


class BranchState(enum.Enum):
    ACTIVE = "active"  # XA START done, statements may run
    PREPARED = "prepared"  # XA PREPARE done: durable, waits for the decision
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    READ_ONLY = "read-only"  # changed nothing; finished by its own session at prepare

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({BranchState.COMMITTED, BranchState.ROLLED_BACK, BranchState.READ_ONLY})

TRANSITIONS: dict[BranchState, frozenset[BranchState]] = {
    BranchState.ACTIVE: frozenset(
        {
            BranchState.PREPARED,
            BranchState.COMMITTED,
            BranchState.ROLLED_BACK,
            BranchState.READ_ONLY,
        }
    ),
    BranchState.PREPARED: frozenset({BranchState.COMMITTED, BranchState.ROLLED_BACK}),
    BranchState.COMMITTED: frozenset(),
    BranchState.ROLLED_BACK: frozenset(),
    BranchState.READ_ONLY: frozenset(),
}


class IllegalTransition(FailedPrecondition):
    pass


@dataclass
class Branch:
    """A live branch. Every field but ``state`` is touched only while holding ``lock``."""

    xid: Xid
    deadline: float
    session: Session | None = None
    state: BranchState = BranchState.ACTIVE
    wrote: bool = False
    last_sequence: int = 0
    last_outputs: list[StatementOutput] = field(default_factory=list)
    last_digest: bytes = b""  # of the statements that ran under last_sequence (work_digest)
    running_statement: bool = False
    running_since: float = 0.0  # the clock's time when the running statement (or trip) began
    first_statement_at: float = 0.0  # when its first statement began (its locks from then on)
    severed: bool = False  # the reaper shut its session's socket (a statement lost on a dead link)
    forgotten: bool = False
    reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def txid(self) -> str:
        return self.xid.txid

    def attach(self, session: Session) -> None:
        """Pins the branch to ``session``, just checked out for it (no await in between)."""
        assert self.session is None, f"branch {self.txid} holds a session already"
        self.session = session

    def release_session(self) -> None:
        """Gives the branch's session back to the pool, healthy (the branch is done with it).

        Never while the branch is prepared: its session holds the prepared XA branch, and the
        pool may reset a session it gets back, which on MariaDB 10.11 orphans the branch's
        transaction (XA COMMIT of it then answers OK and applies nothing; see PROTOCOL.md).
        A prepared branch's session is given up with ``discard_session``, which detaches it."""
        assert self.state is not BranchState.PREPARED, f"{self.txid} is prepared: discard it"
        session, self.session = self.session, None
        if session is not None:
            session.release()

    def discard_session(self) -> None:
        """Closes the branch's session for good (its connection broke, or what the server made of
        its last statement is unknown): the server detaches a prepared branch, rolls back an
        active one."""
        session, self.session = self.session, None
        if session is not None:
            session.discard()

    def move_to(self, target: BranchState, reason: str = "") -> None:
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(
                f"branch {self.txid} cannot go from {self.state.value} to {target.value}",
                txid=self.txid,
            )
        self.state = target
        if reason:
            self.reason = reason


@dataclass(frozen=True)
class FinishedBranch:
    state: BranchState
    reason: str
    # False for a tombstone: a rollback recorded before the server confirmed it (it refuses
    # requests still on their way; what the server holds may differ: ask it).
    confirmed: bool = True


class BranchRegistry:
    """Live branches by txid, and a bounded memory of finished ones. Used from the agent's event
    loop only: each method runs without yielding, so none needs a lock."""

    def __init__(self, *, capacity: int, finished_memory: int) -> None:
        self._capacity = capacity
        self._finished_memory = finished_memory
        self._live: dict[str, Branch] = {}
        self._finished: OrderedDict[str, FinishedBranch] = OrderedDict()

    def get(self, txid: str) -> Branch | FinishedBranch | None:
        return self._live.get(txid) or self._finished.get(txid)

    def create(self, xid: Xid, deadline: float) -> Branch | FinishedBranch:
        """The branch of ``xid``: the existing one (live or finished), or a new live one."""
        existing = self.get(xid.txid)
        if existing is not None:
            return existing
        if len(self._live) >= self._capacity:
            raise ResourceExhausted(
                f"the agent holds {len(self._live)} branches, its max_branches; retry later",
                txid=xid.txid,
            )
        branch = Branch(xid=xid, deadline=deadline)
        self._live[xid.txid] = branch
        return branch

    def finish(self, branch: Branch) -> None:
        """Moves a branch whose state is final from the live set to the finished memory; a
        session it still holds goes back to the pool (its work there is over)."""
        assert branch.state.finished, branch.state
        branch.release_session()
        self._live.pop(branch.txid, None)
        self._remember(branch.txid, FinishedBranch(branch.state, branch.reason))

    def _remember(self, txid: str, finished: FinishedBranch) -> None:
        self._finished[txid] = finished
        self._finished.move_to_end(txid)
        while len(self._finished) > self._finished_memory:
            self._finished.popitem(last=False)

    def tombstone(self, txid: str, reason: str) -> Branch | FinishedBranch | None:
        """Records ``txid`` as rolled back unless the agent holds it: a request for it that is
        still on its way is then refused. Returns what the agent held instead, if anything."""
        existing = self.get(txid)
        if existing is None:
            self._remember(txid, FinishedBranch(BranchState.ROLLED_BACK, reason, confirmed=False))
        return existing

    def remember(self, txid: str, finished: FinishedBranch) -> None:
        self._remember(txid, finished)

    def forget(self, branch: Branch) -> None:
        """Drops a live branch without recording an outcome: what became of its XID on the server
        is not known (XA START failed, or the connection broke at prepare). A session it still
        holds is closed: the server settles whatever it held."""
        branch.discard_session()
        if self._live.get(branch.txid) is branch:
            del self._live[branch.txid]
        branch.forgotten = True

    def live(self) -> list[Branch]:
        return list(self._live.values())

    def counts(self) -> tuple[int, int]:
        """(active, prepared) live branches. Safe from another thread (the metrics'): the
        copy of the live set is made in one step, under the GIL."""
        live = list(self._live.values())
        prepared = sum(b.state is BranchState.PREPARED for b in live)
        return len(live) - prepared, prepared


async def take_lock(branch: Branch, patience: float) -> bool:
    """Takes the branch's lock if it is free within ``patience`` seconds. With 0, only if it is
    free now: a free lock is taken without yielding, before a zero timeout can fire."""
    try:
        async with asyncio.timeout(patience):
            await branch.lock.acquire()
    except TimeoutError:
        return False
    return True


@asynccontextmanager
async def locked(branch: Branch, patience: float, participant: str) -> AsyncIterator[None]:
    """Holds the branch's lock; Unavailable when it is not free within ``patience`` seconds."""
    if not await take_lock(branch, patience):
        raise Unavailable(
            f"branch {branch.txid} on {participant} is busy (a statement has run for over "
            f"{patience:.0f} s)",
            txid=branch.txid,
        )
    try:
        yield
    finally:
        branch.lock.release()
