"""How the engine reaches participant agents, and reports what it measures: interfaces,
implemented over gRPC and Prometheus elsewhere.

Statements and results pass through the coordinator untouched: they are opaque to the engine
(``Statements``, ``Results``), so the relay costs no conversion.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twopc.votes import Presence, Vote

__all__ = [
    "CommitReply",
    "EngineMetrics",
    "IdStanding",
    "NoMetrics",
    "ParticipantPort",
    "Presence",
    "RequestClaimPort",
    "Results",
    "Standing",
    "Statements",
    "Vote",
    "VoteReply",
    "WaitEdge",
]

Statements = Sequence[object]
Results = Sequence[object]


@dataclass(frozen=True)
class VoteReply:
    vote: Vote
    reason: str = ""
    mysql_errno: int = 0
    results: Results = ()


@dataclass(frozen=True)
class CommitReply:
    results: Results = ()
    already_committed: bool = False


@dataclass(frozen=True)
class WaitEdge:
    """On ``participant``, transaction ``waiter`` has waited ``waited_ms`` for a lock that
    ``holder`` holds ("" when the holder is no branch the agent knows)."""

    waiter: str
    holder: str
    participant: str
    waited_ms: int = 0


class ParticipantPort(Protocol):
    """Calls to agents. Every method raises a ``TwopcError`` on failure (``Unavailable`` or
    ``DeadlineExceeded`` when the agent could not be reached or did not answer in time)."""

    def names(self) -> Sequence[str]:
        """The configured participants."""
        ...

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
        """``continues``: earlier statements ran on this participant; its branch must exist."""
        ...

    async def prepare(
        self, participant: str, txid: str, statements: Statements, sequence: int, timeout: float
    ) -> VoteReply: ...

    async def commit(
        self,
        participant: str,
        txid: str,
        *,
        one_phase: bool,
        statements: Statements = (),
        sequence: int = 0,
        timeout: float,
    ) -> CommitReply: ...

    async def rollback(self, participant: str, txid: str, timeout: float) -> bool: ...

    async def recover(self, participant: str, txid_prefix: str, timeout: float) -> list[str]:
        """Txids of the prepared branches on that participant whose txid has the prefix."""
        ...

    async def inspect(
        self, participant: str, txids: Sequence[str], timeout: float
    ) -> dict[str, Presence]: ...

    async def waits_for(self, participant: str, min_wait_ms: int, timeout: float) -> list[WaitEdge]:
        """The lock waits on that participant of branches whose statement has run
        ``min_wait_ms`` at least."""
        ...


class EngineMetrics(Protocol):
    """What the engine measures, for an adapter to export (``coordinator.metrics``). Each call
    is cheap and never raises; no argument is a txid (metric labels stay a bounded set)."""

    def transaction_finished(self, outcome: str) -> None:
        """A transaction's fate is sealed: "committed", "aborted" or "unknown" (a one-phase
        commit whose answer was lost)."""
        ...

    def commit_decided(self, seconds: float) -> None:
        """A commit took ``seconds`` from its start (Commit, or RunTransaction's commit) to its
        decision: phase 1 and the decision log's write."""
        ...

    def prepare_answered(self, participant: str, seconds: float) -> None:
        """A Prepare to ``participant`` answered, or failed, after ``seconds``."""
        ...

    def recovery_pass(self, *, clean: bool, committed: int, rolled_back: int) -> None:
        """A recovery pass ended; ``clean``: nothing was left in doubt or unreachable."""
        ...

    def deadlock_found(self) -> None:
        """The detector found a lock cycle across participants."""
        ...

    def deadlock_victim(self, seconds: float) -> None:
        """A victim's abort was sent, ``seconds`` after the most recent wait of its cycle
        began."""
        ...

    def one_shot_prepared(self, *, ordered: bool) -> None:
        """Under ``one_shot_order = "adaptive"``, a one-shot transaction with several
        participants was prepared in order (contended rows) or in parallel."""
        ...

    def admission_refused(self, reason: str) -> None:
        """A new transaction was refused: ``rate_limit`` (its identity's) or ``overload``
        (shed)."""
        ...

    def breaker_moved(self, participant: str, to: str) -> None:
        """``participant``'s circuit breaker moved to ``to``: "closed", "open", "half_open"
        (``coordinator.engine.breakers``)."""
        ...

    def breaker_refused(self, participant: str) -> None:
        """A new transaction was refused at once: ``participant``'s breaker is open."""
        ...


class NoMetrics:
    """An ``EngineMetrics`` that records nothing (tests, tools)."""

    def transaction_finished(self, outcome: str) -> None:
        pass

    def commit_decided(self, seconds: float) -> None:
        pass

    def prepare_answered(self, participant: str, seconds: float) -> None:
        pass

    def recovery_pass(self, *, clean: bool, committed: int, rolled_back: int) -> None:
        pass

    def deadlock_found(self) -> None:
        pass

    def deadlock_victim(self, seconds: float) -> None:
        pass

    def one_shot_prepared(self, *, ordered: bool) -> None:
        pass

    def admission_refused(self, reason: str) -> None:
        pass

    def breaker_moved(self, participant: str, to: str) -> None:
        pass

    def breaker_refused(self, participant: str) -> None:
        pass


class Standing(enum.Enum):
    """Where a coordinator id of the group stands, as the store's lease row and clock tell."""

    LIVE = "live"  # another member holds a live lease: it may still decide the id's transactions
    DUE = "due"  # expired, still naming a holder: a takeover is due, nothing is resolved yet
    # Freed (a takeover resolved everything the id left), or held by this member (its own id,
    # or a takeover in progress here): no other member decides anything of the id any more.
    RESOLVED = "resolved"


@dataclass(frozen=True)
class IdStanding:
    standing: Standing
    holder: str = ""  # the member named by the lease row ("" when freed)


class RequestClaimPort(Protocol):
    """The group's shared record of request ids (the SQL store's ``twopc_requests``, read with
    its leases and COMMIT rows): which transaction each identity's request id ran as, on any
    member. Every method raises ``Unavailable`` when the store does not answer (then nothing may
    run: a request must not run without its claim)."""

    async def claim(self, owner: str | None, request_id: str, txid: str) -> str | None:
        """Claims ``owner``'s ``request_id`` for ``txid``: the txid that holds it (``txid``
        when this call inserted it, the earlier one otherwise), or None when ``txid`` holds
        another identity's request id already (nothing written: claim again with a fresh txid).
        """
        ...

    async def claimed(self, owner: str | None, request_id: str) -> str | None:
        """The txid that ``owner``'s ``request_id`` was claimed for, or None."""
        ...

    async def unclaim(self, owner: str | None, request_id: str, txid: str) -> None:
        """Drops the claim of ``txid`` (it was refused before anything of it ran)."""
        ...

    async def claimed_by(self, txid: str, owner: str | None) -> bool | None:
        """Whether the claim of ``txid`` is ``owner``'s; None when ``txid`` has no claim."""
        ...

    async def standing(self, coordinator_id: str) -> IdStanding:
        """Where ``coordinator_id`` stands (its lease row by the store's clock)."""
        ...

    async def has_commit(self, coordinator_id: str, txid: str) -> bool:
        """Whether ``coordinator_id``'s decision log holds an open COMMIT record of ``txid``."""
        ...
