"""The operator's view and hand (``twopc admin``): list, show, resolve, drain, audit.

The rules of ``resolve`` (proto/PROTOCOL.md, The operator's hand):

- **Never against a logged decision.** With a COMMIT record in the log (or the transaction known
  here as committed), ``abort`` is refused (FailedPrecondition, naming the decision) and
  ``commit`` drives phase 2 now.
- **Presumed abort.** A transaction of this coordinator with no commit decision can only be
  aborted: ``commit`` is refused. ``abort`` of a live ACTIVE transaction aborts it as the client's
  Rollback would (the client is told who aborted it and why); of one no longer live, it rolls
  back its branches that are prepared (or still active) on the agents, as recovery would.
- **A decision being made** (PREPARING) is refused with Unavailable: try again.
- **Another coordinator's transaction** (its txid's prefix is not this coordinator's id), e.g.
  a stray prepared branch of a decommissioned coordinator, which this coordinator's recovery never
  touches: both are allowed, with the mandatory reason, as Vitess's ``conclude``. Every agent must
  answer first (a branch on an agent that cannot be asked would be left out). ``abort`` is
  refused when a branch committed somewhere; ``commit`` writes a COMMIT record for the prepared
  branches to this coordinator's log first, and recovery drives it (here, and after a restart)
  like its own. Only for a coordinator that is gone for good: a coordinator still running decides
  its own transactions, and the operator's decision could contradict its.

Every action is recorded in the decision log (an AUDIT record: who, when, what, why) and made
durable **before** it is carried out; a refused attempt is recorded too (``refused: why``), and
an action that failed after its record (``failed: why``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from coordinator.decision_log import AuditRecord, CommitRecord
from coordinator.engine.aborts import AbortReason
from coordinator.engine.manager import TransactionManager, TransactionView
from coordinator.engine.ports import Presence
from coordinator.engine.states import TxState
from twopc.errors import (
    FailedPrecondition,
    InvalidArgument,
    TwopcError,
    Unavailable,
)
from twopc.logs import redact
from twopc.txid import check_coordinator_id, parse_txid, txid_prefix

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "MAX_LIST_LIMIT",
    "MAX_REASON",
    "AuditRecord",
    "Branch",
    "InDoubt",
    "Listing",
    "LiveEntry",
    "Operator",
    "Report",
    "Resolution",
    "Verdict",
    "check_reason",
]

log = structlog.get_logger("twopc.admin")

DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
MAX_REASON = 1000  # characters


class Verdict(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"


@dataclass(frozen=True)
class LiveEntry:
    txid: str
    state: TxState
    age_s: float
    participants: tuple[str, ...]
    holder: str | None
    request_id: str


@dataclass(frozen=True)
class InDoubt:
    """A txid with prepared branches that no live transaction here owns."""

    txid: str
    prepared_on: tuple[str, ...]
    commit_logged: bool


@dataclass(frozen=True)
class Listing:
    coordinator_id: str
    draining: bool
    live_count: int
    live: list[LiveEntry]
    in_doubt: list[InDoubt]
    unreachable: list[str]
    truncated: bool


@dataclass(frozen=True)
class Branch:
    """One participant's branch of a transaction, as its agent tells it (``presence`` None and
    ``error`` set when it could not be asked)."""

    participant: str
    presence: Presence | None
    error: str = ""


@dataclass(frozen=True)
class Report:
    view: TransactionView
    foreign: bool
    live: bool
    age_s: float
    commit_record: CommitRecord | None
    branches: list[Branch]
    audits: list[AuditRecord]


@dataclass(frozen=True)
class Resolution:
    txid: str
    state: TxState
    detail: str


def check_reason(reason: str, *, required: bool = True) -> str:
    """An operator's reason: non-empty (when ``required``), at most MAX_REASON characters, no
    control characters (it goes to logs and to the terminal)."""
    if required and not reason.strip():
        raise InvalidArgument("a reason is required: say why (e.g. a ticket), it is audited")
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"the reason has {len(reason)} characters; at most {MAX_REASON}")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in reason):
        raise InvalidArgument("the reason may not hold control characters (newlines, tabs, ...)")
    return reason


class Operator:
    """What ``twopc admin`` does, over the transaction manager, its agents and its log."""

    def __init__(self, manager: TransactionManager, *, rpc_timeout: float = 5.0) -> None:
        self._manager = manager
        self._ports = manager.participants
        self._rpc_timeout = rpc_timeout

    @property
    def manager(self) -> TransactionManager:
        return self._manager

    # --- list --------------------------------------------------------------------------------

    async def listing(self, limit: int = 0, coordinator_id: str = "") -> Listing:
        """Live transactions (oldest first) and in-doubt ones: prepared branches with this
        coordinator's prefix (or ``coordinator_id``'s) that no live transaction owns, with
        whether a COMMIT record is logged; at most ``limit`` of each (0: DEFAULT_LIST_LIMIT)."""
        limit = _limit(limit)
        manager = self._manager
        own = manager.coordinator_id
        prefix = txid_prefix(check_coordinator_id(coordinator_id) if coordinator_id else own)
        now = manager.clock.monotonic()
        live = manager.live_transactions()
        entries = [
            LiveEntry(
                tx.txid,
                tx.state,
                max(now - tx.begun, 0.0),
                tuple(tx.participants),
                tx.owner,
                tx.request_id,
            )
            for tx in live[:limit]
        ]
        names = list(self._ports.names())
        answers = await asyncio.gather(
            *(self._ports.recover(p, prefix, self._rpc_timeout) for p in names),
            return_exceptions=True,
        )
        unreachable: list[str] = []
        prepared: dict[str, list[str]] = {}
        for participant, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, TwopcError):
                    raise answer
                unreachable.append(participant)
                continue
            for txid in answer:
                prepared.setdefault(txid, []).append(participant)
        for record in manager.open_commit_records():
            if record.txid.startswith(prefix):
                prepared.setdefault(record.txid, [])  # decided, phase 2 not done
        doubtful = sorted(t for t in prepared if manager.live_transaction(t) is None)
        in_doubt = [
            InDoubt(t, tuple(sorted(prepared[t])), manager.commit_record(t) is not None)
            for t in doubtful[:limit]
        ]
        return Listing(
            coordinator_id=own,
            draining=manager.draining,
            live_count=manager.live_count,
            live=entries,
            in_doubt=in_doubt,
            unreachable=unreachable,
            truncated=len(live) > limit or len(doubtful) > limit,
        )

    # --- show --------------------------------------------------------------------------------

    async def show(self, txid: str) -> Report:
        """Everything known of ``txid``: its state here, its COMMIT record, each agent's branch,
        and the audit records that name it."""
        manager = self._manager
        foreign = parse_txid(txid).coordinator_id != manager.coordinator_id
        tx = manager.live_transaction(txid)
        branches = await self._branches(txid)
        view = manager.view(txid)
        committed = [b.participant for b in branches if b.presence is Presence.COMMITTED]
        if view.presumed and committed:
            view = TransactionView(txid, TxState.COMMITTED, tuple(committed))
        age = manager.clock.monotonic() - tx.begun if tx is not None else 0.0
        return Report(
            view=view,
            foreign=foreign,
            live=tx is not None,
            age_s=max(age, 0.0),
            commit_record=manager.commit_record(txid),
            branches=branches,
            audits=[a for a in manager.audit_trail() if a.txid == txid],
        )

    def audits(self, txid: str = "", limit: int = 0) -> list[AuditRecord]:
        """The audit records remembered (the last ``audit_keep``), oldest first; only those of
        ``txid`` when given; the last ``limit`` (0: DEFAULT_LIST_LIMIT)."""
        trail = [a for a in self._manager.audit_trail() if not txid or a.txid == txid]
        return trail[-_limit(limit) :]

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, identity: str, reason: str = "") -> None:
        check_reason(reason, required=False)
        await self._audit(identity, "drain", "", "draining", reason)
        self._manager.drain()

    async def undrain(self, identity: str, reason: str = "") -> None:
        check_reason(reason, required=False)
        await self._audit(identity, "undrain", "", "admitting", reason)
        self._manager.undrain()

    # --- resolve -----------------------------------------------------------------------------

    async def resolve(self, txid: str, verdict: Verdict, reason: str, identity: str) -> Resolution:
        """Commits or aborts ``txid`` by hand, by the rules in this module's docstring.

        Raises:
            InvalidArgument: a malformed txid, a missing or bad reason.
            FailedPrecondition: the verdict contradicts a decision (or a committed branch).
            Unavailable: the decision is being made, or an agent could not be asked.
        """
        parse_txid(txid)
        check_reason(reason)
        with structlog.contextvars.bound_contextvars(txid=txid):
            try:
                act = await self._plan(txid, verdict, identity, reason)
            except TwopcError as refusal:
                log.warning("admin_resolve_refused", verdict=verdict.value, error=refusal.message)
                outcome = f"refused {verdict.value}: {refusal.message}"
                await self._audit(identity, "resolve", txid, outcome[:MAX_REASON], reason)
                raise
            await self._audit(identity, "resolve", txid, verdict.value, reason)
            log.warning("admin_resolve", verdict=verdict.value, reason=redact(reason))
            try:
                return await act()
            except TwopcError as failure:
                outcome = f"failed {verdict.value}: {failure.message}"
                await self._audit(identity, "resolve", txid, outcome[:MAX_REASON], reason)
                raise

    async def _plan(
        self, txid: str, verdict: Verdict, identity: str, reason: str
    ) -> Callable[[], Awaitable[Resolution]]:
        """Checks ``verdict`` against what is known of ``txid`` (a refusal raises) and returns
        the action that carries it out."""
        manager = self._manager
        if parse_txid(txid).coordinator_id != manager.coordinator_id:
            return await self._plan_foreign(txid, verdict)
        tx = manager.live_transaction(txid)
        if tx is not None:
            if tx.state is TxState.PREPARING:
                raise Unavailable(
                    f"the decision of {txid} is being made (preparing); try again in a moment",
                    txid=txid,
                )
            if tx.state in (TxState.COMMITTING, TxState.COMMITTED):
                if verdict is Verdict.ABORT:
                    raise _committed_refusal(txid, "its COMMIT decision is in the log")
                return lambda: self._wait_done(txid, tx.done.wait(), "phase 2 is under way")
            if tx.state is TxState.ABORTING or tx.state is TxState.ABORTED:
                if verdict is Verdict.COMMIT:
                    raise _presumed_refusal(txid, "it was decided ABORT")
                return lambda: self._wait_done(txid, tx.done.wait(), "its abort is under way")
            if verdict is Verdict.COMMIT:
                raise _presumed_refusal(txid, "it is active: no commit decision exists")
            abort = AbortReason.by_operator(identity, reason)

            async def abort_live() -> Resolution:
                state = await manager.abort_by_operator(txid, abort)
                return Resolution(txid, state, "aborted; its branches were rolled back")

            return abort_live
        record = manager.commit_record(txid)
        if record is not None:
            if verdict is Verdict.ABORT:
                raise _committed_refusal(
                    txid, f"its COMMIT record is in the log ({', '.join(record.participants)})"
                )
            return lambda: self._drive(record)
        if manager.view(txid).state is TxState.COMMITTED:
            if verdict is Verdict.ABORT:
                raise _committed_refusal(txid, "it committed (its END record is in the log)")
            return lambda: self._commit_left_over(txid)
        if verdict is Verdict.COMMIT:
            raise _presumed_refusal(txid, "no commit decision exists in the log")
        branches = await self._reachable_branches(txid)
        committed = [b.participant for b in branches if b.presence is Presence.COMMITTED]
        if committed:
            raise FailedPrecondition(
                f"refusing to abort {txid}: its branch committed on {', '.join(committed)} "
                "(a one-phase commit); aborting the rest cannot undo that",
                txid=txid,
            )
        targets = [b.participant for b in branches if b.presence in _ROLLBACK]
        return lambda: self._roll_back(txid, targets, claim=True)

    async def _plan_foreign(
        self, txid: str, verdict: Verdict
    ) -> Callable[[], Awaitable[Resolution]]:
        manager = self._manager
        record = manager.commit_record(txid)
        if record is not None:  # an operator decided it here already
            if verdict is Verdict.ABORT:
                raise _committed_refusal(txid, "an operator's COMMIT record for it is in the log")
            return lambda: self._drive(record)
        branches = await self._reachable_branches(txid)
        committed = [b.participant for b in branches if b.presence is Presence.COMMITTED]
        prepared = [b.participant for b in branches if b.presence is Presence.PREPARED]
        if verdict is Verdict.ABORT:
            if committed:
                raise FailedPrecondition(
                    f"refusing to abort {txid}: its branch committed on {', '.join(committed)}, "
                    "so its transaction committed; aborting the rest would break atomicity "
                    "(commit it instead)",
                    txid=txid,
                )
            return lambda: self._roll_back(txid, prepared, claim=False)
        if not prepared:
            if committed:
                return lambda: self._nothing(txid, TxState.COMMITTED, "no branch left prepared")
            raise FailedPrecondition(
                f"no prepared branch of {txid} on any agent: nothing to commit", txid=txid
            )
        decision = CommitRecord(txid, tuple(prepared))

        async def commit_foreign() -> Resolution:
            await manager.record_operator_commit(decision)
            return await self._drive(decision)

        return commit_foreign

    # --- the actions -------------------------------------------------------------------------

    async def _wait_done(self, txid: str, done: Awaitable[object], what: str) -> Resolution:
        try:
            await asyncio.wait_for(done, self._rpc_timeout)
        except TimeoutError:
            return Resolution(txid, self._manager.view(txid).state, f"{what}; not finished yet")
        return Resolution(txid, self._manager.view(txid).state, "finished")

    async def _drive(self, record: CommitRecord) -> Resolution:
        manager = self._manager
        if await manager.redrive(record):
            return Resolution(
                record.txid, TxState.COMMITTED, "phase 2 done: every branch committed"
            )
        if manager.commit_record(record.txid) is None:
            return Resolution(record.txid, TxState.COMMITTED, "committed (by phase 2 meanwhile)")
        return Resolution(
            record.txid,
            TxState.COMMITTING,
            "phase 2 did not finish (an agent could not be reached, or phase 2 is running); "
            "recovery keeps driving it",
        )

    async def _commit_left_over(self, txid: str) -> Resolution:
        branches = await self._reachable_branches(txid)
        for branch in branches:
            if branch.presence is Presence.PREPARED:
                await self._ports.commit(
                    branch.participant, txid, one_phase=False, timeout=self._rpc_timeout
                )
        return Resolution(txid, TxState.COMMITTED, "committed")

    async def _roll_back(
        self, txid: str, participants: Sequence[str], *, claim: bool
    ) -> Resolution:
        manager = self._manager
        if claim and not manager.claim_for_recovery(txid):
            raise Unavailable(f"transaction {txid} just began here; try again", txid=txid)
        try:
            for participant in participants:
                await self._ports.rollback(participant, txid, self._rpc_timeout)
        finally:
            if claim:
                manager.release_from_recovery(txid)
        if not participants:
            return Resolution(txid, TxState.ABORTED, "nothing prepared on any agent: nothing to do")
        return Resolution(txid, TxState.ABORTED, f"rolled back on {', '.join(participants)}")

    @staticmethod
    async def _nothing(txid: str, state: TxState, detail: str) -> Resolution:
        return Resolution(txid, state, detail)

    # --- helpers -----------------------------------------------------------------------------

    async def _branches(self, txid: str) -> list[Branch]:
        names = list(self._ports.names())
        answers = await asyncio.gather(
            *(self._ports.inspect(p, [txid], self._rpc_timeout) for p in names),
            return_exceptions=True,
        )
        branches = []
        for participant, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, TwopcError):
                    raise answer
                branches.append(Branch(participant, None, answer.message))
            else:
                branches.append(Branch(participant, answer.get(txid, Presence.UNKNOWN)))
        return branches

    async def _reachable_branches(self, txid: str) -> list[Branch]:
        branches = await self._branches(txid)
        unreachable = [b for b in branches if b.presence is None]
        if unreachable:
            raise Unavailable(
                f"cannot resolve {txid}: agent(s) "
                f"{', '.join(b.participant for b in unreachable)} could not be asked "
                f"({unreachable[0].error}); a branch there would be left behind; try again",
                txid=txid,
            )
        return branches

    async def _audit(
        self, identity: str, action: str, txid: str, outcome: str, reason: str
    ) -> None:
        record = AuditRecord(
            at_ms=self._manager.clock.wall_ms(),
            identity=identity,
            action=action,
            txid=txid,
            outcome=outcome,
            reason=reason,
        )
        await self._manager.record_audit(record)
        log.info("admin_audited", action=action, txid=txid or None, outcome=outcome)


_ROLLBACK = (Presence.PREPARED, Presence.ACTIVE)


def _limit(limit: int) -> int:
    if limit < 0 or limit > MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit must be between 0 and {MAX_LIST_LIMIT}, got {limit}")
    return limit or DEFAULT_LIST_LIMIT


def _committed_refusal(txid: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"refusing to abort {txid}: {why}; a logged decision is never reversed "
        "(resolve --commit drives its phase 2 now)",
        txid=txid,
    )


def _presumed_refusal(txid: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"refusing to commit {txid}: {why}; a transaction of this coordinator without a commit "
        "decision is presumed aborted, so only --abort is allowed",
        txid=txid,
    )
