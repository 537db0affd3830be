"""The decision log: durable record of every commit decision (presumed abort).

Only COMMIT decisions are forced to disk, before the first XA COMMIT is sent (invariant I4). END
records, written after every branch acknowledged, are not forced; they let the log forget a
transaction. AUDIT records (the operator's actions through ``twopc admin``: who, when, what, why)
are forced like COMMITs, and the last ``audit_keep`` of them are kept across compactions. The
interface is small so that a replicated backend can replace the file later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from twopc.errors import Internal, ResourceExhausted

__all__ = [
    "AuditRecord",
    "CommitRecord",
    "DecisionLog",
    "DecisionLogCorrupted",
    "DecisionLogFailed",
    "DecisionLogFenced",
    "DecisionLogFull",
    "Replay",
]


@dataclass(frozen=True)
class CommitRecord:
    """A COMMIT decision: the transaction and the participants whose branches must commit."""

    txid: str
    participants: tuple[str, ...]


@dataclass(frozen=True)
class AuditRecord:
    """One action of an operator, as the log keeps it.

    Attributes:
        at_ms: wall-clock time of the action, ms since the epoch.
        identity: who acted (the caller's certificate identity; "" in plaintext).
        action: what was asked: ``resolve``, ``drain``, ``undrain``.
        txid: the transaction acted on ("" for drain and undrain).
        outcome: what was chosen (``commit``, ``abort``), or ``refused: <why>``.
        reason: why, in the operator's words.
    """

    at_ms: int
    identity: str
    action: str
    txid: str
    outcome: str
    reason: str


@dataclass(frozen=True)
class Replay:
    """What the log holds when opened.

    Attributes:
        open_commits: COMMIT records without an END record, in log order: phase 2 must be re-driven.
        ended: txids whose COMMIT and END records are both still in the log (committed everywhere).
        torn_bytes: bytes of a torn last write that were cut from the end of the log (0 if none).
        audits: the last audit records, oldest first (at most the log's ``audit_keep``).
    """

    open_commits: list[CommitRecord] = field(default_factory=list)
    ended: set[str] = field(default_factory=set)
    torn_bytes: int = 0
    audits: list[AuditRecord] = field(default_factory=list)


class DecisionLogFull(ResourceExhausted):
    """A decision could not be written (no space, write error); nothing of it is in the log."""


class DecisionLogFenced(DecisionLogFull):
    """The store says another member now holds this log's coordinator id (a newer epoch, or
    another holder): the batch was rolled back, so nothing of it is in the log, and the log
    refuses every later record. A ``DecisionLogFull``, because that is what it is for the
    transaction: certainly not written, so it must abort, and the new holder, whose replay
    cannot hold the record, presumes abort too. Not a ``DecisionLogFailed``: nothing is unknown,
    and the fix is not a restart but that this member stops acting for the id (steps down)."""


class DecisionLogFailed(Internal):
    """The log can no longer tell what is durable (fsync failed). The process must stop: its
    restart reads the log to learn which decisions survived."""


class DecisionLogCorrupted(Internal):
    """A batch before the last one fails its checksum: the log is refused, not truncated (damage
    in the last batch is a torn write, which is cut)."""


class DecisionLog(Protocol):
    async def open(self) -> Replay:
        """Reads the log, cuts a torn tail, and makes the log ready for appends."""
        ...

    async def record_commit(self, record: CommitRecord) -> None:
        """Returns once the record is durable. Many concurrent calls share one fsync.

        Raises:
            DecisionLogFull: the record is not in the log; the transaction must abort.
            DecisionLogFailed: durability unknown; the caller must stop the process.
        """
        ...

    async def record_end(self, txid: str) -> None:
        """Notes that every branch of ``txid`` committed. Not forced to disk."""
        ...

    async def record_audit(self, record: AuditRecord) -> None:
        """Returns once the record is durable (forced as a COMMIT is).

        Raises:
            DecisionLogFull: the record is not in the log.
            DecisionLogFailed: durability unknown; the caller must stop the process.
        """
        ...

    def open_commits(self) -> list[CommitRecord]:
        """COMMIT records without END, as the log knows them now."""
        ...

    async def close(self) -> None:
        """Writes what is buffered, syncs, and closes."""
        ...
