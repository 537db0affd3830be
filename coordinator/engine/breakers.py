"""A circuit breaker per participant: new work touching an agent that keeps failing is refused at
once (``CircuitOpen``, an ``Unavailable`` naming why) instead of waiting for its timeouts.

One breaker per participant, three states and one table of moves (``TRANSITIONS``)::

    CLOSED ──TRIP (breaker_failures failures within breaker_window_ms)──> OPEN
    OPEN ──OPEN_ELAPSED (breaker_open_ms passed, a transaction asks)──> HALF_OPEN
    HALF_OPEN ──SUCCESS──> CLOSED            HALF_OPEN ──FAILURE──> OPEN (another open period)
    any ──SUCCESS──> CLOSED                  (an agent that answers anything is alive)

What counts: the calls that carry transactions' work, Execute, Prepare and Commit (one-phase
or phase 2), report their outcome (``Breakers.observe``, through ``ObservedParticipants``). They
wait for the agent's connection for as long as their deadline allows, so a transport failure of
one (``twopc.errors.is_transport_failure``: ``Unavailable``, the agent unreachable or its
database down or its connection lost; ``DeadlineExceeded``, the call's deadline passed) means
the agent stayed out of reach. Any answer, errors included (a statement error, a deadlock, a
vote to abort, ``Fenced``, ``InvalidArgument``: the caller's or the data's), is a success: the
agent and its database answered. A success also forgets the failures counted so far (the
breaker opens on failures in a row, within the window). A call that ends in neither (cancelled)
reports nothing. Rollback, Recover, Inspect and WaitsFor report nothing: they do not wait for
the connection, and while gRPC backs off before reconnecting to an agent (seconds after a long
outage, and on past the agent's return) they fail at once, which would keep a breaker open
after its agent is back.

Only admissions are ever refused (``Breakers.admit``): the engine asks before new work first
touches a participant. Phase 2, rollbacks, recovery, Inspect and WaitsFor are never refused
(decided commits keep being retried, and their answers close the breaker).

In HALF_OPEN, ``breaker_probes`` transactions are let through; the others are refused until a
probe's outcome closes or reopens the breaker. If no outcome comes within ``breaker_open_ms`` of
the last probe (a probe refused for another reason before reaching the agent), more probes are
let through.

Pure: no grpc, no wall clock; the caller passes a monotonic clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from coordinator.engine.ports import (
    CommitReply,
    ParticipantPort,
    Presence,
    Results,
    Statements,
    VoteReply,
    WaitEdge,
)
from twopc.errors import CircuitOpen, TwopcError, is_transport_failure

__all__ = [
    "TRANSITIONS",
    "Breaker",
    "BreakerEvent",
    "BreakerSettings",
    "BreakerState",
    "Breakers",
    "Move",
    "ObservedParticipants",
    "is_breaker_failure",
]

_T = TypeVar("_T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def level(self) -> int:
        """The state as a number, for a gauge: 0 closed, 1 half open, 2 open."""
        return _LEVELS[self]


_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class BreakerEvent(enum.Enum):
    SUCCESS = "success"  # the agent answered
    FAILURE = "failure"  # a failure that does not reach the threshold (or any failure, not CLOSED)
    TRIP = "trip"  # the failure that makes breaker_failures within breaker_window_ms
    OPEN_ELAPSED = "open_elapsed"  # a transaction asks after the open period ended


TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.FAILURE): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.CLOSED, BreakerEvent.OPEN_ELAPSED): BreakerState.CLOSED,
    # A success while OPEN: a call sent before it opened, or phase 2 (the engine's or
    # recovery's) reaching the agent: it is alive again.
    (BreakerState.OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    # Failures of calls the breaker does not refuse (phase 2) keep it open; they do not
    # lengthen the open period.
    (BreakerState.OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.OPEN_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.FAILURE): BreakerState.OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.OPEN_ELAPSED): BreakerState.HALF_OPEN,
}


@dataclass(frozen=True)
class BreakerSettings:
    """``failures`` (0: breakers off) within ``window_s`` open a breaker for ``open_s``; then
    ``probes`` transactions are let through."""

    failures: int = 5
    window_s: float = 10.0
    open_s: float = 2.0
    probes: int = 1

    @property
    def enabled(self) -> bool:
        return self.failures > 0


@dataclass(frozen=True)
class Move:
    """A breaker changed state: to log and count."""

    participant: str
    source: BreakerState
    target: BreakerState
    reason: str


def is_breaker_failure(error: BaseException) -> bool:
    """Whether a call's error says the agent or its database is failing (not the caller's or
    the data's fault)."""
    return isinstance(error, TwopcError) and is_transport_failure(error)


class Breaker:
    """The breaker of one participant. ``clock``: monotonic seconds."""

    def __init__(
        self,
        participant: str,
        settings: BreakerSettings,
        clock: Callable[[], float],
        on_move: Callable[[Move], None],
    ) -> None:
        self.participant = participant
        self._settings = settings
        self._clock = clock
        self._on_move = on_move
        self.state = BreakerState.CLOSED
        self._failures: deque[float] = deque()  # when each failure in a row came (CLOSED)
        self.last_failure = ""
        self._opened_at = 0.0
        self._opened_because = ""
        self._probes_left = 0
        self._probes_renew_at = 0.0

    # --- events ---------------------------------------------------------------------------------

    def succeeded(self, call: str = "") -> None:
        self._failures.clear()
        self._fire(BreakerEvent.SUCCESS, f"the agent answered {call or 'a call'}")

    def failed(self, error: str) -> None:
        now = self._clock()
        self.last_failure = error
        if self.state is not BreakerState.CLOSED:
            self._fire(BreakerEvent.FAILURE, f"a call failed while probing ({error})")
            return
        self._failures.append(now)
        horizon = now - self._settings.window_s
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()
        if len(self._failures) < self._settings.failures:
            self._fire(BreakerEvent.FAILURE, error)
            return
        window_ms = round(self._settings.window_s * 1000)
        count = len(self._failures)
        failures = "1 failure" if count == 1 else f"{count} failures in a row"
        self._fire(BreakerEvent.TRIP, f"{failures} within {window_ms} ms")

    def refusal(self, txid: str = "") -> CircuitOpen | None:
        """Asks to let a new transaction through: None when it may go (a probe slot is taken in
        HALF_OPEN), else the error to refuse it with (nothing changes then but the state, when
        the open period just ended)."""
        now = self._clock()
        if self.state is BreakerState.OPEN and now >= self._opened_at + self._settings.open_s:
            self._fire(BreakerEvent.OPEN_ELAPSED, "the open period ended: probing")
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.HALF_OPEN:
            if self._probes_left <= 0 and now >= self._probes_renew_at:
                self._probes_left = self._settings.probes  # the last probes told nothing
            if self._probes_left > 0:
                return None
            return self._refused(txid, self._probes_renew_at - now, "a probe is under way")
        return self._refused(txid, self._opened_at + self._settings.open_s - now, "")

    def admitted(self) -> None:
        """A transaction that ``refusal`` let through goes: it takes a probe slot when probing."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes_left -= 1
            self._probes_renew_at = self._clock() + self._settings.open_s

    # --- inside ---------------------------------------------------------------------------------

    def _refused(self, txid: str, wait_s: float, probing: str) -> CircuitOpen:
        wait_ms = max(0, math.ceil(wait_s * 1000))
        state = f"half open ({probing})" if probing else "open"
        because = f" after {self._opened_because}" if self._opened_because else ""
        open_ms = round(self._settings.open_s * 1000)
        return CircuitOpen(
            f"participant {self.participant!r} is failing: its circuit breaker is {state}{because} "
            f"(last failure: {self.last_failure}); new transactions "
            f"touching {self.participant} are refused, nothing of this one ran; the next probe "
            f"is let through in {wait_ms} ms (breaker_open_ms = {open_ms}); transactions on "
            "other participants are not affected",
            txid=txid,
        )

    def _fire(self, event: BreakerEvent, reason: str) -> None:
        source = self.state
        target = TRANSITIONS[(source, event)]
        if target is BreakerState.OPEN and (
            source is not BreakerState.OPEN or event is not BreakerEvent.FAILURE
        ):
            self._opened_at = self._clock()
            self._opened_because = reason
        if target is BreakerState.HALF_OPEN and source is not BreakerState.HALF_OPEN:
            self._probes_left = self._settings.probes
        if target is BreakerState.CLOSED:
            self._opened_because = ""
        self.state = target
        if target is not source:
            self._on_move(Move(self.participant, source, target, reason))


class Breakers:
    """The breakers of all participants (made on first use). ``on_move`` hears every change of
    state; ``on_refused`` every transaction refused, by participant."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float],
        *,
        on_move: Callable[[Move], None] = lambda move: None,
        on_refused: Callable[[str], None] = lambda participant: None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_move = on_move
        self._on_refused = on_refused
        self._breakers: dict[str, Breaker] = {}

    def breaker(self, participant: str) -> Breaker:
        found = self._breakers.get(participant)
        if found is None:
            found = Breaker(participant, self.settings, self._clock, self._on_move)
            self._breakers[participant] = found
        return found

    def states(self, participants: Iterable[str]) -> dict[str, BreakerState]:
        return {
            p: (self._breakers[p].state if p in self._breakers else BreakerState.CLOSED)
            for p in participants
        }

    def admit(self, participants: Sequence[str], txid: str = "") -> None:
        """Lets new work touch ``participants``, all or none: every breaker is asked before any
        probe slot is taken.

        Raises:
            CircuitOpen: (an ``Unavailable``) a participant's breaker is open (or half open
                with its probes out); the first such participant's reason.
        """
        if not self.settings.enabled:
            return
        for participant in participants:
            refusal = self.breaker(participant).refusal(txid)
            if refusal is not None:
                self._on_refused(participant)
                raise refusal
        for participant in participants:
            self.breaker(participant).admitted()

    def observe(self, participant: str, error: BaseException | None, call: str = "") -> None:
        """A ``call`` (its name, for the logs) to ``participant``'s agent ended: answered
        (``error`` None or not a failure, see ``is_breaker_failure``), failed, or cancelled
        (nothing reported)."""
        if not self.settings.enabled:
            return
        if error is None or (isinstance(error, TwopcError) and not is_breaker_failure(error)):
            self.breaker(participant).succeeded(call)
        elif is_breaker_failure(error):
            assert isinstance(error, TwopcError)
            what = f"{call}: " if call else ""
            self.breaker(participant).failed(f"{what}{type(error).__name__}: {error.message}")


class ObservedParticipants:
    """A ``ParticipantPort`` that reports the outcome of its Execute, Prepare and Commit calls to
    ``breakers`` and passes every call on unchanged. It refuses nothing: admissions are the
    engine's (``Breakers.admit``)."""

    def __init__(self, inner: ParticipantPort, breakers: Breakers) -> None:
        self._inner = inner
        self._breakers = breakers

    async def _observed(self, participant: str, name: str, call: Awaitable[_T]) -> _T:
        try:
            answer = await call
        except Exception as err:
            self._breakers.observe(participant, err, name)
            raise
        self._breakers.observe(participant, None, name)
        return answer

    def names(self) -> Sequence[str]:
        return self._inner.names()

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
        return await self._observed(
            participant,
            "Execute",
            self._inner.execute(
                participant, txid, statements, sequence, timeout, continues=continues
            ),
        )

    async def prepare(
        self, participant: str, txid: str, statements: Statements, sequence: int, timeout: float
    ) -> VoteReply:
        return await self._observed(
            participant,
            "Prepare",
            self._inner.prepare(participant, txid, statements, sequence, timeout),
        )

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
        return await self._observed(
            participant,
            "Commit" if one_phase or statements else "Commit (phase 2)",
            self._inner.commit(
                participant,
                txid,
                one_phase=one_phase,
                statements=statements,
                sequence=sequence,
                timeout=timeout,
            ),
        )

    # Not observed (see the module's docstring): passed on as they are.

    async def rollback(self, participant: str, txid: str, timeout: float) -> bool:
        return await self._inner.rollback(participant, txid, timeout)

    async def recover(self, participant: str, txid_prefix: str, timeout: float) -> list[str]:
        return await self._inner.recover(participant, txid_prefix, timeout)

    async def inspect(
        self, participant: str, txids: Sequence[str], timeout: float
    ) -> dict[str, Presence]:
        return await self._inner.inspect(participant, txids, timeout)

    async def waits_for(self, participant: str, min_wait_ms: int, timeout: float) -> list[WaitEdge]:
        return await self._inner.waits_for(participant, min_wait_ms, timeout)
