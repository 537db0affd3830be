"""The transaction manager: presumed-abort two-phase commit over participant agents.

One asyncio task at a time touches a transaction's state (the event loop is single-threaded, and
every check-then-move below happens without an ``await`` in between). ``Transaction.lock``
serialises a client's calls on one transaction (a retried Execute waits for the first); Rollback and
the deadline reaper do not take it, so they can stop a statement that hangs.

The rules that make it correct (proto/PROTOCOL.md):
- The decision is COMMIT only if every branch voted PREPARED or READ_ONLY before the deadline.
- A COMMIT decision of a transaction with more than one participant is durable in the decision log
  before the first XA COMMIT is sent; phase 2 is retried until every branch acknowledged, then END.
- Nothing is rolled back that has a COMMIT record; everything without one may be.
- A transaction stays in the live table until its fate is sealed, so recovery never touches it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from coordinator.decision_log import (
    AuditRecord,
    CommitRecord,
    DecisionLog,
    DecisionLogFailed,
    DecisionLogFull,
)
from coordinator.engine.aborts import AbortReason
from coordinator.engine.admission import (
    ADMISSION_MAX_IN_FLIGHT,
    ADMISSION_QUEUE_MS,
    Admission,
    RateLimits,
)
from coordinator.engine.breakers import (
    Breakers,
    BreakerSettings,
    BreakerState,
    Move,
    ObservedParticipants,
)
from coordinator.engine.one_shot_order import OneShotOrder
from coordinator.engine.ports import (
    CommitReply,
    EngineMetrics,
    NoMetrics,
    ParticipantPort,
    Presence,
    RequestClaimPort,
    Results,
    Standing,
    Statements,
    Vote,
)
from coordinator.engine.states import Outcome, TxState, check_transition, outcome_of
from twopc.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TransactionAborted,
    TwopcError,
    Unavailable,
    is_transport_failure,
)
from twopc.failpoints import Failpoints
from twopc.logs import redact
from twopc.txid import new_txid, parse_txid, txid_for_request, txid_prefix

log = structlog.get_logger("twopc.coordinator")
_PRESUMED_ABORT = "no commit decision exists (presumed abort)"


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall_ms(self) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class EngineSettings:
    coordinator_id: str
    default_timeout_ms: int = 10_000
    max_timeout_ms: int = 300_000
    max_active: int = 10_000
    rpc_timeout_s: float = 10.0
    phase2_attempts: int = 8
    phase2_backoff_s: float = 0.05
    finished_memory: int = 100_000
    audit_keep: int = 1000
    # Per identity (owner); a transaction without one (plaintext) is bound by max_active alone.
    max_active_per_identity: int = 1000
    max_sessions_per_identity: int = 48  # open branches on one participant
    max_idle_ms: int = 30_000  # an ACTIVE transaction with no call for this long is rolled back
    # How a one-shot transaction's branches are prepared: "parallel" (all at once: one round
    # trip) or "ordered" (one after another in participant-name order, each only once the one
    # before voted PREPARED). Ordered, one-shot transactions take their locks in the same order
    # everywhere, so they cannot form a lock cycle across participants, at one more round trip
    # per participant. "adaptive": parallel, and ordered for ``contended_hold_s`` once deadlock
    # victims reach ``one_shot_victim_share`` of the one-shot transactions prepared in parallel
    # (``coordinator.engine.one_shot_order``).
    one_shot_order: str = "parallel"
    contended_hold_s: float = 10.0
    one_shot_victim_share: float = 0.05
    # Identities that may look up another member's transaction that no request id claimed (its
    # owner is not known there): the operators (admin_identities).
    admin_identities: tuple[str, ...] = ()
    # Admission of new transactions (coordinator.engine.admission): rate limits per identity,
    # and at most admission_max_in_flight begun and undecided (0: no cap), the rest waiting up
    # to admission_queue_ms for a slot, else shed.
    rate_limits: RateLimits = field(default_factory=RateLimits)
    admission_max_in_flight: int = ADMISSION_MAX_IN_FLIGHT
    admission_queue_ms: int = ADMISSION_QUEUE_MS
    # A circuit breaker per participant (coordinator.engine.breakers): breaker_failures
    # transport failures in a row within breaker_window_ms open it (0: no breakers); new
    # transactions touching it are refused at once for breaker_open_ms, then breaker_probes
    # are let through to close it again.
    breaker_failures: int = 5
    breaker_window_ms: int = 10_000
    breaker_open_ms: int = 2_000
    breaker_probes: int = 1

    def breaker_settings(self) -> BreakerSettings:
        return BreakerSettings(
            failures=self.breaker_failures,
            window_s=self.breaker_window_ms / 1000,
            open_s=self.breaker_open_ms / 1000,
            probes=self.breaker_probes,
        )


@dataclass
class Transaction:
    txid: str
    deadline: float
    timeout_ms: int
    request_id: str = ""
    # The identity that began it (the caller's certificate's Common Name); None without one (a
    # plaintext coordinator). Only its owner may use it, or see it.
    owner: str | None = None
    begun: float = 0.0  # the clock's monotonic time at Begin
    # When the client last called on it (monotonic): the reaper rolls back an ACTIVE one idle
    # for longer than max_idle_ms.
    last_call: float = 0.0
    # Participants whose branch counts against the owner's max_sessions_per_identity.
    sessions: set[str] = field(default_factory=set)
    state: TxState = TxState.ACTIVE
    participants: list[str] = field(default_factory=list)
    # Participants whose branch needs no rollback: voted READ_ONLY or ABORT, or rolled back.
    settled_branches: set[str] = field(default_factory=set)
    # Participants whose Prepare got no answer: they may have prepared, so they get a rollback.
    unreached: set[str] = field(default_factory=set)
    prepared: tuple[str, ...] = ()
    # Why the transaction was aborted: set by ``decide_abort``, the only way to ABORTING, so it
    # is there exactly when the outcome is ABORTED (an abort that turns out to be the commit of
    # an earlier attempt drops it again: see TransactionManager._roll_back).
    abort: AbortReason | None = None
    # An abort asked for while PREPARING (the client's Rollback). The decider owns a PREPARING
    # transaction, so nothing else may abort it: the decider applies this at the tally, unless a
    # participant's refusal explains the abort first, or the decision was COMMIT already.
    abort_request: AbortReason | None = None
    results: dict[str, Results] = field(default_factory=dict)
    # Per participant, the sequence number of the last Execute that ran there and a digest of
    # its statements: a retry under that number must carry the same statements.
    executed: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    counted: bool = False  # its outcome went to the metrics
    preparing_since: float = 0.0  # monotonic, when it moved to PREPARING
    executing_on: str = ""  # the participant of its Execute in flight ("" when none)
    # Its votes were counted (no await since): too late to make it a deadlock victim.
    tallied: bool = False
    one_shot: bool = False  # begun by RunTransaction
    # Chosen as the victim of a lock cycle (coordinator.engine.deadlocks): the abort reason the
    # client gets, whatever error the interrupted statement or prepare came back with.
    victim_of: AbortReason | None = None
    # Frees its admission slot (coordinator.engine.admission), called once, at its decision.
    on_decided: Callable[[], None] | None = None

    def move_to(self, target: TxState) -> None:
        check_transition(self.txid, self.state, target)
        self.state = target
        if target in (TxState.COMMITTING, TxState.ABORTING) or target.final:
            self.decided.set()
            self.release_admission()
        if target.final:
            self.done.set()

    def release_admission(self) -> None:
        """Frees its admission slot, once (at its decision, or when it leaves the live table
        undecided: a one-phase commit whose answer was lost)."""
        if self.on_decided is not None:
            on_decided, self.on_decided = self.on_decided, None
            on_decided()

    def decide_abort(self, reason: AbortReason) -> None:
        self.move_to(TxState.ABORTING)
        self.abort = reason

    @property
    def abort_reason(self) -> str:
        """What GetTransaction tells of the abort ("" when not aborted)."""
        return self.abort.message if self.abort is not None else ""

    def touch(self, participant: str) -> None:
        if participant not in self.participants:
            self.participants.append(participant)


@dataclass(frozen=True)
class _Ballot:
    """A participant's vote as the decider counts it; ``against`` says why an ABORT refuses."""

    vote: Vote
    results: Results = ()
    against: AbortReason | None = None


@dataclass(frozen=True)
class TransactionView:
    """What GetTransaction answers."""

    txid: str
    state: TxState
    participants: tuple[str, ...] = ()
    abort_reason: str = ""
    presumed: bool = False
    owner: str | None = None  # the identity that began it; None: none, or not known here

    @property
    def outcome(self) -> Outcome:
        return outcome_of(self.state)


@dataclass(frozen=True)
class _Claim:
    """What claiming a request id in the group's store found: ``view``, the final outcome of the
    transaction that it ran as elsewhere (None: run it here); ``inserted``, the txid that this
    call claimed it for (None when it claimed nothing new)."""

    view: TransactionView | None = None
    inserted: str | None = None


@dataclass(frozen=True)
class RunOutcome:
    txid: str
    state: TxState
    results: dict[str, Results]


FatalHandler = Callable[[BaseException], None]


class TransactionManager:
    def __init__(
        self,
        settings: EngineSettings,
        participants: ParticipantPort,
        decision_log: DecisionLog,
        *,
        clock: Clock | None = None,
        failpoints: Failpoints | None = None,
        on_fatal: FatalHandler | None = None,
        metrics: EngineMetrics | None = None,
        claims: RequestClaimPort | None = None,
    ) -> None:
        self.settings = settings
        # The group's record of request ids (coordinator.request_claims); None on the file log,
        # where a request id is known to this coordinator alone.
        self._claims = claims
        self.metrics: EngineMetrics = metrics or NoMetrics()
        self.coordinator_id = settings.coordinator_id
        self._log = decision_log
        self._clock: Clock = clock or SystemClock()
        # Every call to an agent tells its breaker how it went; new work asks it first.
        self._breakers = Breakers(
            settings.breaker_settings(),
            self._clock.monotonic,
            on_move=self._breaker_moved,
            on_refused=self.metrics.breaker_refused,
        )
        self._ports: ParticipantPort = (
            ObservedParticipants(participants, self._breakers)
            if self._breakers.settings.enabled
            else participants
        )
        self._failpoints = failpoints or Failpoints()
        self._on_fatal = on_fatal
        self._live: dict[str, Transaction] = {}
        self._finished: OrderedDict[str, TransactionView] = OrderedDict()
        self._open_commits: dict[str, CommitRecord] = {}
        self._phase2_running: set[str] = set()
        self._recovering: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False
        self._audits: deque[AuditRecord] = deque(maxlen=settings.audit_keep)
        # Quotas per identity: live transactions, and open branches per participant.
        self._active_by_owner: Counter[str] = Counter()
        self._sessions_by_owner: Counter[tuple[str, str]] = Counter()
        # One-shot transactions waiting for their owner's phase 2 to free sessions, and the
        # future that the next freed session of each owner resolves.
        # One-shot transactions waiting for their owner's phase 2 to free a session, in order:
        # each freed session wakes the first (not all: each would look through the live table).
        self._session_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        # (owner, request id) -> txid, for a request id that another identity held first (its
        # txid is then not the request id's own: see _txid_of_request).
        self._request_aliases: OrderedDict[tuple[str | None, str], str] = OrderedDict()
        # Transactions with a call on the agents in flight (an Execute, or the prepares): the
        # only ones that can wait for a lock, so the only ones the deadlock detector looks at.
        self._in_flight: dict[str, Transaction] = {}
        self._one_shot_order = OneShotOrder(
            settings.one_shot_order,
            hold_s=settings.contended_hold_s,
            victim_share=settings.one_shot_victim_share,
        )
        self.admission = Admission(
            settings.rate_limits,
            max_in_flight=settings.admission_max_in_flight,
            queue_ms=settings.admission_queue_ms,
            clock=self._clock,
            refused=self.metrics.admission_refused,
        )

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        replay = await self._log.open()
        if replay.torn_bytes:
            log.warning("decision_log_torn_tail_cut", bytes=replay.torn_bytes)
        for record in replay.open_commits:
            self._open_commits[record.txid] = record
        for txid in replay.ended:
            self._remember(TransactionView(txid, TxState.COMMITTED))
        self._audits.extend(replay.audits)
        log.info(
            "coordinator_started",
            coordinator_id=self.coordinator_id,
            open_commits=len(self._open_commits),
        )

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._log.close()

    # --- client operations -------------------------------------------------------------------

    # --- draining ------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True while the coordinator admits no new transaction (``drain``): Begin and
        RunTransaction get Unavailable; live transactions run to their end."""
        return self._draining

    def drain(self) -> None:
        self._draining = True
        log.warning("coordinator_draining", live=len(self._live))

    def undrain(self) -> None:
        self._draining = False
        log.info("coordinator_undrained", live=len(self._live))

    @property
    def live_count(self) -> int:
        """Transactions begun and not yet sealed."""
        return len(self._live)

    def live_transactions(self) -> list[Transaction]:
        """The transactions live in this process, oldest first."""
        return sorted(self._live.values(), key=lambda tx: tx.begun)

    def live_transaction(self, txid: str) -> Transaction | None:
        return self._live.get(txid)

    @property
    def clock(self) -> Clock:
        return self._clock

    # --- circuit breakers ----------------------------------------------------------------------

    def breaker_states(self) -> dict[str, BreakerState]:
        """Each participant's breaker state (CLOSED for all when breakers are off)."""
        return self._breakers.states(self._ports.names())

    def _breaker_moved(self, move: Move) -> None:
        level = log.warning if move.target is BreakerState.OPEN else log.info
        level(
            "breaker_moved",
            participant=move.participant,
            reason=redact(move.reason),
            **{"from": move.source.value, "to": move.target.value},
        )
        self.metrics.breaker_moved(move.participant, move.target.value)

    # --- audit records -----------------------------------------------------------------------

    async def record_audit(self, record: AuditRecord) -> None:
        """Makes an operator's action durable in the decision log, and remembers it (the last
        ``audit_keep``).

        Raises:
            DecisionLogFull: not written; the action must not be done.
            DecisionLogFailed: the process stops (as for a COMMIT record).
        """
        try:
            await self._log.record_audit(record)
        except DecisionLogFailed as err:
            self._fatal(err)
            raise
        self._audits.append(record)

    def audit_trail(self) -> list[AuditRecord]:
        """The audit records remembered, oldest first."""
        return list(self._audits)

    # --- client operations -------------------------------------------------------------------

    def begin(
        self, timeout_ms: int, request_id: str = "", *, owner: str | None = None
    ) -> Transaction:
        """A new transaction of ``owner``, or the one that ``owner``'s ``request_id`` named
        already.

        Raises:
            ResourceExhausted: the coordinator runs max_active transactions, or ``owner`` its
                max_active_per_identity (nothing was begun).
            Unavailable: the coordinator is draining (a new transaction only), or an earlier
                attempt of ``request_id`` is being recovered.
        """
        txid = self._txid_of_request(owner, request_id) if request_id else None
        if txid is not None:
            existing = self._live.get(txid)
            if existing is not None:
                existing.last_call = self._clock.monotonic()
                return existing
            if txid in self._recovering:
                raise Unavailable(
                    f"an earlier attempt of request {request_id} is being recovered; retry",
                    txid=txid,
                )
            if txid in self._finished or txid in self._open_commits:
                raise FailedPrecondition(
                    f"request {request_id} already ran as transaction {txid}, which has "
                    f"finished ({self.view(txid).state.value}); use a new request id",
                    txid=txid,
                )
        if self._draining:
            raise Unavailable(
                f"coordinator {self.coordinator_id} is draining: it admits no new transaction; "
                "use another coordinator (transactions begun here run to their end)"
            )
        self._check_timeout(timeout_ms)
        if len(self._live) >= self.settings.max_active:
            raise ResourceExhausted(
                f"the coordinator runs {len(self._live)} transactions, its max_active; retry later"
            )
        if owner is not None:
            running = self._active_by_owner[owner]
            if running >= self.settings.max_active_per_identity:
                raise ResourceExhausted(
                    f"identity {owner!r} runs {running} live transactions, its quota "
                    f"(max_active_per_identity = {self.settings.max_active_per_identity}); "
                    "finish some, or retry later (nothing was begun)"
                )
        if txid is None:
            txid = new_txid(self.coordinator_id, self._clock.wall_ms())
            if request_id:  # the request id's own txid is another identity's
                self._request_aliases[(owner, request_id)] = txid
                while len(self._request_aliases) > self.settings.finished_memory:
                    self._request_aliases.popitem(last=False)
        timeout_ms = timeout_ms or self.settings.default_timeout_ms
        now = self._clock.monotonic()
        tx = Transaction(
            txid=txid,
            deadline=now + timeout_ms / 1000,
            timeout_ms=timeout_ms,
            request_id=request_id,
            owner=owner,
            begun=now,
            last_call=now,
        )
        self._live[txid] = tx
        if owner is not None:
            self._active_by_owner[owner] += 1
        log.debug("transaction_begun", txid=txid)
        self._failpoints.hit("coordinator.after_begin")
        return tx

    def _txid_of_request(self, owner: str | None, request_id: str) -> str | None:
        """The txid that ``owner``'s ``request_id`` names; None when it names none yet and its
        own txid is held by another identity (a new one is then made).

        A request id's own txid is ``<coordinator id>.r-<request id>``, the same across
        restarts; the identity that uses it first owns it. Another identity's request under the
        same id gets a txid of its own (remembered as an alias), never the first one's.
        """
        alias = self._request_aliases.get((owner, request_id))
        if alias is not None:
            return alias
        txid = txid_for_request(self.coordinator_id, request_id)
        return txid if self._may_see(owner, self._owner_of(txid)) else None

    def _owner_of(self, txid: str) -> str | None:
        """The identity that owns ``txid`` as far as this coordinator knows (None: none, or not
        known: begun before a restart, or never)."""
        tx = self._live.get(txid)
        if tx is not None:
            return tx.owner
        known = self._finished.get(txid)
        return known.owner if known is not None else None

    @staticmethod
    def _may_see(caller: str | None, owner: str | None) -> bool:
        """Whether ``caller`` may use or see a transaction of ``owner``: its own, or one whose
        owner is not known (a plaintext caller has no identity, and every rule is off)."""
        return caller is None or owner is None or caller == owner

    def _unknown(self, txid: str) -> NotFound:
        """The answer for a txid this coordinator does not run, also given for another
        identity's (which must not learn that it exists)."""
        return NotFound(
            f"no live transaction {txid} on this coordinator (finished long ago, or begun before "
            "a restart of the coordinator, which aborted it)",
            txid=txid,
        )

    def _reserve_sessions(self, tx: Transaction, participants: Sequence[str]) -> None:
        """Counts ``tx``'s branches on ``participants`` against its owner's
        max_sessions_per_identity, all or none. ResourceExhausted (nothing counted) when one
        would go over."""
        owner = tx.owner
        new = [p for p in participants if p not in tx.sessions]
        if owner is None or not new:
            return
        limit = self.settings.max_sessions_per_identity
        for participant in new:
            held = self._sessions_by_owner[(owner, participant)]
            if held >= limit:
                raise ResourceExhausted(
                    f"identity {owner!r} holds {held} open branches on participant "
                    f"{participant!r}, its quota (max_sessions_per_identity = {limit}); finish "
                    "some, or retry later (nothing of this request ran)",
                    txid=tx.txid,
                )
        for participant in new:
            tx.sessions.add(participant)
            self._sessions_by_owner[(owner, participant)] += 1

    def _release_session(self, tx: Transaction, participant: str) -> None:
        if participant in tx.sessions and tx.owner is not None:
            tx.sessions.discard(participant)
            key = (tx.owner, participant)
            self._sessions_by_owner[key] -= 1
            if self._sessions_by_owner[key] <= 0:
                del self._sessions_by_owner[key]
            for waiter in self._session_waiters.get(tx.owner, ()):
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def _check_timeout(self, timeout_ms: int) -> None:
        if timeout_ms < 0 or timeout_ms > self.settings.max_timeout_ms:
            raise InvalidArgument(
                f"timeout_ms must be between 0 and {self.settings.max_timeout_ms}, got {timeout_ms}"
            )

    async def _sessions_for_one_shot(
        self, owner: str, participants: Sequence[str], timeout_ms: int
    ) -> int:
        """Checks ``owner``'s max_sessions_per_identity for a one-shot transaction on
        ``participants`` before it begins. When the quota is full only because of ``owner``'s
        transactions in phase 2 (decided: their branches end without the client doing
        anything), waits for them, within the transaction's timeout, rather than refusing:
        after early answers a busy client runs ahead of phase 2, and the backlog is the
        coordinator's to clear. Branches held by open transactions are refused at once, as
        they would be for an Execute. The timeout left for the transaction once admitted.

        Raises:
            ResourceExhausted: the quota stayed full (nothing begun).
        """
        self._check_timeout(timeout_ms)
        timeout_ms = timeout_ms or self.settings.default_timeout_ms
        deadline = self._clock.monotonic() + timeout_ms / 1000
        while True:
            probe = Transaction(txid="", deadline=0.0, timeout_ms=0, owner=owner)
            try:
                self._reserve_sessions(probe, participants)
            except ResourceExhausted:
                left = deadline - self._clock.monotonic()
                if left <= 0 or not self._phase2_frees_sessions(owner, participants):
                    raise
                await self._session_released(owner, left)
                continue
            for participant in participants:
                self._release_session(probe, participant)
            left_ms = math.ceil((deadline - self._clock.monotonic()) * 1000)
            return max(1, min(timeout_ms, left_ms))

    def _phase2_frees_sessions(self, owner: str, participants: Sequence[str]) -> bool:
        """Whether, on every participant where ``owner`` is at its quota, one of its branches
        belongs to a transaction in phase 2 (and so is bound to end), and ``owner`` does not
        already have a quota's worth of one-shot transactions waiting."""
        limit = self.settings.max_sessions_per_identity
        if len(self._session_waiters.get(owner, ())) >= limit:
            return False
        full = {p for p in participants if self._sessions_by_owner[(owner, p)] >= limit}
        for tx in self._live.values():
            if tx.owner == owner and tx.state in (TxState.COMMITTING, TxState.ABORTING):
                full -= tx.sessions
                if not full:
                    return True
        return not full

    async def _session_released(self, owner: str, timeout_s: float) -> None:
        """Returns when a branch of ``owner`` ends and wakes this waiter (the first in line),
        or after ``timeout_s``."""
        released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._session_waiters.setdefault(owner, deque())
        waiters.append(released)
        timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
        try:
            await asyncio.wait((released, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            waiters.remove(released)
            if not waiters:
                del self._session_waiters[owner]

    def _unlist(self, tx: Transaction) -> None:
        """Takes ``tx`` out of the live table and its owner's quotas."""
        if self._live.get(tx.txid) is not tx:
            return
        del self._live[tx.txid]
        tx.release_admission()
        for participant in list(tx.sessions):
            self._release_session(tx, participant)
        if tx.owner is not None:
            self._active_by_owner[tx.owner] -= 1
            if self._active_by_owner[tx.owner] <= 0:
                del self._active_by_owner[tx.owner]

    async def execute(
        self,
        txid: str,
        participant: str,
        statements: Statements,
        sequence: int,
        *,
        digest: bytes = b"",
        owner: str | None = None,
    ) -> Results:
        """Runs ``statements`` on ``participant``'s branch. ``digest`` (of the statements and
        their parameters) tells a retry (the last sequence number again, the same digest: the
        agent answers it with its first answer) from other work under a used number, which is
        refused with InvalidArgument (the transaction stays as it was). Another identity than
        ``owner``'s transaction is NotFound; a first branch on ``participant`` over the owner's
        max_sessions_per_identity ResourceExhausted (the transaction stays as it was)."""
        tx = self._live_transaction(txid, owner)
        self._check_participant(participant)
        if sequence < 1:
            raise InvalidArgument("Execute sequence numbers start at 1", txid=txid)
        if not statements:
            raise InvalidArgument("Execute needs at least one statement", txid=txid)
        async with tx.lock:
            tx.last_call = self._clock.monotonic()
            self._in_flight[tx.txid] = tx
            tx.executing_on = participant
            try:
                return await self._execute_locked(tx, participant, statements, sequence, digest)
            finally:
                tx.executing_on = ""
                self._in_flight.pop(tx.txid, None)
                tx.last_call = self._clock.monotonic()

    async def _execute_locked(
        self,
        tx: Transaction,
        participant: str,
        statements: Statements,
        sequence: int,
        digest: bytes,
    ) -> Results:
        """The body of ``execute``, under the transaction's lock."""
        txid = tx.txid
        self._require_active(tx)
        last = tx.executed.get(participant)
        if last is not None and last[0] == sequence and last[1] != digest:
            raise InvalidArgument(
                f"Execute sequence {sequence} on participant {participant!r} ran already, "
                "with other statements or parameters: a retry must repeat its call "
                "exactly; new work takes a new sequence number (nothing of this request "
                "ran; the transaction is as it was)",
                txid=txid,
            )
        remaining = self._remaining(tx)
        if remaining <= 0:
            await self._abort(tx, AbortReason.deadline())
            self._require_active(tx)
        if participant not in tx.participants:  # new work on it: its breaker may refuse it
            self._breakers.admit([participant], txid)
        self._reserve_sessions(tx, [participant])
        try:
            results = await self._ports.execute(
                participant,
                txid,
                statements,
                sequence,
                remaining,
                continues=participant in tx.participants,
            )
        except (InvalidArgument, FailedPrecondition, NotFound, ResourceExhausted):
            if participant not in tx.participants:
                self._release_session(tx, participant)
            raise  # refused before anything ran: the transaction is as it was
        except TwopcError as err:
            tx.touch(participant)
            if isinstance(err, TransactionAborted) or not is_transport_failure(err):
                tx.settled_branches.add(participant)  # the agent rolled its branch back
            await self._abort(tx, AbortReason.participant_failed(participant, err))
            # This abort's error, or that of an abort decided meanwhile (a rollback, the
            # deadline), or FailedPrecondition if an earlier attempt turned out committed.
            raise self._inactive_error(tx) from err
        tx.touch(participant)
        tx.executed[participant] = (sequence, digest)
        if tx.state is not TxState.ACTIVE:
            # Rolled back while the statement ran: the branch may have started after the
            # rollback reached the agent, so roll it back again.
            self._spawn(self._rollback_quietly(participant, txid))
            self._require_active(tx)
        await self._failpoints.ahit("coordinator.after_execute")
        return results

    async def commit(
        self, txid: str, *, wait_for_phase2: bool, owner: str | None = None
    ) -> TxState:
        tx = self._live.get(txid)
        if tx is not None and not self._may_see(owner, tx.owner):
            raise self._unknown(txid)
        if tx is None:
            return self._settled_state(await self.lookup(txid, owner))
        async with tx.lock:
            if tx.state is TxState.ACTIVE:
                await self._shielded(self._decide(tx, work=None))
        return await self._answer(tx, wait_for_phase2)

    async def rollback(self, txid: str, owner: str | None = None) -> TxState:
        tx = self._live.get(txid)
        if tx is not None and not self._may_see(owner, tx.owner):
            raise self._unknown(txid)
        if tx is None:
            view = await self.lookup(txid, owner)
            if view.outcome is Outcome.COMMITTED:
                raise FailedPrecondition(
                    f"transaction {txid} committed; it cannot roll back", txid=txid
                )
            if view.outcome is Outcome.PENDING:
                self._settled_state(view)  # raises Unavailable: the outcome is not known yet
            return TxState.ABORTED
        if tx.state is TxState.ACTIVE:
            self._abort_now(tx, AbortReason.rolled_back())
            await self._shielded(self._roll_back(tx))
        elif tx.state is TxState.PREPARING:
            tx.abort_request = AbortReason.rolled_back()
        await tx.decided.wait()
        self._raise_if_in_doubt(tx)
        if outcome_of(tx.state) is Outcome.COMMITTED:
            raise FailedPrecondition(
                f"transaction {txid} committed; it cannot roll back", txid=txid
            )
        return TxState.ABORTED

    async def run(
        self,
        work: Sequence[tuple[str, Statements]],
        *,
        timeout_ms: int,
        request_id: str = "",
        wait_for_phase2: bool = False,
        owner: str | None = None,
    ) -> RunOutcome:
        """A one-shot transaction of ``owner``: every participant's statements and the commit
        together. Over ``owner``'s quotas: ResourceExhausted, nothing begun."""
        names = [participant for participant, _ in work]
        if not work:
            raise InvalidArgument("RunTransaction needs statements for at least one participant")
        if len(set(names)) != len(names):
            raise InvalidArgument("each participant may appear once in RunTransaction")
        for participant, statements in work:
            self._check_participant(participant)
            if not statements:
                raise InvalidArgument(f"no statements for participant {participant}")
        # Admitted (or shed) before anything else is looked at: in a group, the lookups below
        # read the store.
        admitted = await self._admit(owner, request_id)
        try:
            ran = await self._ran_already(request_id, owner) if request_id else None
            if ran is not None:
                self._unadmit(owner, admitted)
                return ran
            claim = await self._claim_request(request_id, owner) if request_id else _Claim()
        except BaseException:
            self._unadmit(owner, admitted)
            raise
        # A retry of a request that runs here is not new work (the breakers let it join).
        known = self._txid_of_request(owner, request_id) if request_id else None
        if claim.view is not None:  # it ran as another transaction, whose outcome is final
            self._unadmit(owner, admitted)
            return RunOutcome(claim.view.txid, self._settled_state(claim.view), {})
        try:
            # Before anything is begun or sent; not for a retry of a request that runs here
            # (begin answers it with its transaction): that one is not new work. After the
            # claim, so that a request id that ran already gets its outcome, not a refusal.
            if known is None or known not in self._live:
                self._breakers.admit(names, claim.inserted or "")
            if owner is not None:  # checked before anything is begun
                timeout_ms = await self._sessions_for_one_shot(owner, names, timeout_ms)
            tx = self.begin(timeout_ms, request_id, owner=owner)
        except TwopcError:
            self._unadmit(owner, admitted)
            await self._unclaim(claim, request_id, owner)
            raise
        except BaseException:  # cancelled while waiting for sessions
            self._unadmit(owner, admitted)
            raise
        self._hold_admission(tx, admitted)
        self._reserve_sessions(tx, names)  # no await since the check: it cannot fail now
        tx.one_shot = True
        async with tx.lock:
            if tx.state is TxState.ACTIVE:
                for participant in names:
                    tx.touch(participant)
                await self._shielded(self._decide(tx, work=dict(work)))
        state = await self._answer(tx, wait_for_phase2)
        return RunOutcome(tx.txid, state, dict(tx.results))

    async def _ran_already(self, request_id: str, owner: str | None) -> RunOutcome | None:
        """The outcome of ``owner``'s one-shot ``request_id`` when it has finished here (None
        when it has not run, or still runs).

        Raises:
            TransactionAborted: it ran, and was aborted.
        """
        known = self._txid_of_request(owner, request_id)
        if await self._claimed_by_another(known, owner):
            known = None  # another identity's, from before a restart (_claim_request)
        if (
            known is not None
            and known not in self._live
            and (known in self._finished or known in self._open_commits)
        ):
            view = self.view(known)
            if view.outcome is Outcome.ABORTED:
                raise TransactionAborted(view.abort_reason or "aborted", txid=known)
            return RunOutcome(known, view.state, {})
        return None

    def view(self, txid: str) -> TransactionView:
        """What this coordinator knows of a transaction without asking the agents."""
        tx = self._live.get(txid)
        if tx is not None:
            return TransactionView(
                tx.txid, tx.state, tuple(tx.participants), tx.abort_reason, owner=tx.owner
            )
        if txid in self._open_commits:
            return TransactionView(txid, TxState.COMMITTING, self._open_commits[txid].participants)
        known = self._finished.get(txid)
        if known is not None:
            return known
        return TransactionView(txid, TxState.ABORTED, presumed=True)

    async def lookup(self, txid: str, owner: str | None = None) -> TransactionView:
        """GetTransaction: memory and the decision log first, then the participants' markers.
        Another identity's transaction than ``owner``'s is NotFound, as an unknown one is to
        Execute."""
        parsed = parse_txid(txid)
        if parsed.coordinator_id != self.coordinator_id and self._claims is not None:
            return await self._lookup_elsewhere(txid, owner)
        if parsed.coordinator_id != self.coordinator_id:
            raise NotFound(
                f"transaction {txid} belongs to coordinator {parsed.coordinator_id!r}, "
                f"not to this one ({self.coordinator_id!r})",
                txid=txid,
            )
        view = self.view(txid)
        if not self._may_see(owner, view.owner):
            raise self._unknown(txid)
        if view.owner is None and await self._claimed_by_another(txid, owner):
            raise self._unknown(txid)  # its owner is not known here (a restart): the store's is
        if not view.presumed:
            return view
        return await self._lookup_on_participants(txid)

    async def lookup_request(self, request_id: str, owner: str | None = None) -> TransactionView:
        """GetTransaction by ``owner``'s request id. One that another identity used (and this
        one did not) is answered as one that nobody used, without asking the participants.

        In a group (a claims port), a request id that this member does not know is looked up in
        the store: one that ran as another member's transaction is answered as ``lookup``
        answers that transaction's txid."""
        txid = self._txid_of_request(owner, request_id)
        if await self._claimed_by_another(txid, owner):
            txid = None  # the request id's own txid is another identity's (before a restart)
        if self._claims is not None and not self._known_here(txid):
            held = await self._claims.claimed(owner, request_id)
            if held is not None and held != txid:
                if self._known_here(held):
                    return await self.lookup(held, owner)
                return await self._settled_elsewhere(held, request_id)
        if txid is None:
            return TransactionView(
                txid_for_request(self.coordinator_id, request_id),
                TxState.ABORTED,
                abort_reason=_PRESUMED_ABORT,
                presumed=True,
            )
        return await self.lookup(txid, owner)

    def request_txid(self, request_id: str, owner: str | None = None) -> str:
        """The txid that ``owner``'s request id names (its own txid when none yet)."""
        return self._txid_of_request(owner, request_id) or txid_for_request(
            self.coordinator_id, request_id
        )

    # --- request ids across a coordinator group -------------------------------------------------

    async def begin_request(
        self, timeout_ms: int, request_id: str = "", *, owner: str | None = None
    ) -> Transaction:
        """Begin as the client API calls it: ``begin``, after claiming ``request_id`` in the
        group's store when this member does not know it (nothing else differs without a claims
        port, or without a request id).

        Raises:
            FailedPrecondition: the request ran already as another member's transaction, which
                has finished (its outcome is in the message).
            Unavailable: it runs as another member's transaction, whose coordinator id is
                live or due for a takeover; or the store did not answer (nothing begun).
            ResourceExhausted, Unavailable: as ``begin``.
        """
        admitted = await self._admit(owner, request_id)
        try:
            claim = await self._claim_request(request_id, owner) if request_id else _Claim()
        except BaseException:
            self._unadmit(owner, admitted)
            raise
        view = claim.view
        if view is not None:
            self._unadmit(owner, admitted)
            if view.outcome is Outcome.PENDING:
                self._settled_state(view)  # raises Unavailable: the outcome is not known yet
            raise FailedPrecondition(
                f"request {request_id} already ran as transaction {view.txid}, which has "
                f"finished ({view.state.value}); use a new request id",
                txid=view.txid,
            )
        try:
            tx = self.begin(timeout_ms, request_id, owner=owner)
        except TwopcError:
            self._unadmit(owner, admitted)
            await self._unclaim(claim, request_id, owner)
            raise
        self._hold_admission(tx, admitted)
        return tx

    async def _admit(self, owner: str | None, request_id: str) -> float | None:
        """Admits a new transaction of ``owner`` (its rate limit, the overload guard); None,
        admitting nothing, for a retry of a request this coordinator runs or ran already,
        which is never refused here (``begin`` answers it).

        Raises:
            ResourceExhausted: refused, with a retry-after hint (nothing begun).
        """
        if not self.admission.enabled:
            return None  # nothing to count (the default)
        if request_id and self._known_here(self._txid_of_request(owner, request_id)):
            return None
        return await self.admission.admit(owner)

    def _unadmit(self, owner: str | None, admitted: float | None) -> None:
        """Gives back the admission of a transaction that was not begun after all."""
        if admitted is not None:
            self.admission.cancel(owner, admitted)

    def _hold_admission(self, tx: Transaction, admitted: float | None) -> None:
        """``tx`` holds the admission slot taken at ``admitted`` until its decision (another
        call of the same request that began it first keeps its own)."""
        if admitted is None:
            return
        if tx.on_decided is not None or tx.state is not TxState.ACTIVE:
            self.admission.cancel(tx.owner, admitted)
            return
        tx.on_decided = lambda: self.admission.release(admitted)

    def _known_here(self, txid: str | None) -> bool:
        """Whether this member runs, ran or recovers ``txid`` as far as its memory tells."""
        return txid is not None and (
            txid in self._live
            or txid in self._finished
            or txid in self._open_commits
            or txid in self._recovering
        )

    async def _claim_request(self, request_id: str, owner: str | None) -> _Claim:
        """Claims ``owner``'s ``request_id`` in the group's store for the txid that ``begin``
        will give it, before anything of it runs, unless this member knows the request already
        (``begin`` then answers it as before). When another transaction holds the claim, its
        final outcome (``_settled_elsewhere``: Unavailable while another member may still
        decide it)."""
        claims = self._claims
        if claims is None:
            return _Claim()
        txid = self._txid_of_request(owner, request_id)
        if self._known_here(txid):
            if await self._claimed_by_another(txid, owner):
                txid = None  # the request id's own txid is another identity's (before a restart)
            else:
                return _Claim()
        # A txid not known here is not looked up first: a claim of it that another identity's
        # request id holds already is refused by the store (held None below).
        candidate = txid or new_txid(self.coordinator_id, self._clock.wall_ms())
        held = await claims.claim(owner, request_id, candidate)
        if held is None:  # the request id's own txid answers another identity's request id
            candidate = new_txid(self.coordinator_id, self._clock.wall_ms())
            held = await claims.claim(owner, request_id, candidate)
        if held is None:
            raise Unavailable(
                f"request {request_id} could not be claimed in the group's store; retry"
            )
        if held == candidate:
            if held != txid_for_request(self.coordinator_id, request_id):
                self._alias(owner, request_id, held)
            return _Claim(inserted=held)
        if self._known_here(held):  # an earlier attempt here, under a fresh txid
            self._alias(owner, request_id, held)
            return _Claim()
        return _Claim(view=await self._settled_elsewhere(held, request_id))

    async def _claimed_by_another(self, txid: str | None, owner: str | None) -> bool:
        """Whether the group's store says that ``txid``, whose owner this member does not know
        (begun before a restart, or never), is another identity's than ``owner``'s. Only such
        txids are looked up: the store is not read when the owner is known here."""
        if self._claims is None or txid is None or owner is None:
            return False
        if self._owner_of(txid) is not None:
            return False
        return await self._claims.claimed_by(txid, owner) is False

    async def _unclaim(self, claim: _Claim, request_id: str, owner: str | None) -> None:
        """Drops the claim made for a request that was refused before anything of it ran, so
        that a retry elsewhere is not sent back here; a failure to is logged (the claim then
        stays, and a retry elsewhere learns the transaction's presumed outcome once this member
        is gone)."""
        txid = claim.inserted
        if self._claims is None or txid is None or self._known_here(txid):
            return
        try:
            await self._claims.unclaim(owner, request_id, txid)
        except TwopcError as err:
            log.warning("request_unclaim_failed", txid=txid, error=err.message)

    def _alias(self, owner: str | None, request_id: str, txid: str) -> None:
        self._request_aliases[(owner, request_id)] = txid
        while len(self._request_aliases) > self.settings.finished_memory:
            self._request_aliases.popitem(last=False)

    async def _lookup_elsewhere(self, txid: str, owner: str | None) -> TransactionView:
        """GetTransaction of another coordinator id's ``txid``. Only its owner sees it: the
        identity of its request id's claim; one without a claim (begun with no request id) has
        no owner known here, and is shown to the admin identities and plaintext callers only.
        Everyone else gets the same NotFound, claimed or not, so that no identity learns of
        another's transactions."""
        coordinator_id = parse_txid(txid).coordinator_id
        if owner is not None and owner not in self.settings.admin_identities:
            assert self._claims is not None
            if not await self._claims.claimed_by(txid, owner):
                raise NotFound(
                    f"transaction {txid} belongs to coordinator {coordinator_id!r}, not to this "
                    f"one ({self.coordinator_id!r}); another member tells only the outcome of "
                    "your own request ids: ask a member acting for that id",
                    txid=txid,
                )
        return await self._settled_elsewhere(txid)

    async def _settled_elsewhere(self, txid: str, request_id: str = "") -> TransactionView:
        """The outcome of ``txid``, a transaction that this member does not run, from the
        group's store and the participants' markers.

        Another coordinator id's transaction may still be decided by the member acting for it
        while that id's lease is live, or expired but naming a holder (a takeover is due):
        Unavailable, naming the member. Once the id is freed (a takeover resolved all it left)
        or held by this member, nobody decides it any more (the log and the agents are fenced
        on the new epoch): its open COMMIT record in the store says committed; without one the
        markers tell (committed if a branch committed; else presumed aborted).

        Raises:
            Unavailable: the id is live or due, the store or a participant did not answer.
        """
        claims = self._claims
        assert claims is not None
        coordinator_id = parse_txid(txid).coordinator_id
        if coordinator_id != self.coordinator_id:
            where = await claims.standing(coordinator_id)
            if where.standing is not Standing.RESOLVED:
                what = f"request {request_id} runs as {txid}" if request_id else f"{txid} runs"
                due = (
                    " (its lease expired: a takeover is due)"
                    if where.standing is Standing.DUE
                    else ""
                )
                raise Unavailable(
                    f"{what} on coordinator {coordinator_id} (member {where.holder}){due}; "
                    f"retry (there, or here once {coordinator_id}'s transactions are resolved)",
                    txid=txid,
                )
        if await claims.has_commit(coordinator_id, txid):
            return TransactionView(txid, TxState.COMMITTING)
        return await self._lookup_on_participants(txid)

    # --- the decision ------------------------------------------------------------------------

    async def _decide(self, tx: Transaction, work: dict[str, Statements] | None) -> None:
        """Phase 1 and the decision. ``work`` carries one-shot statements per participant."""
        if tx.state is not TxState.ACTIVE:
            return  # a rollback or the reaper decided first (this runs a loop step later)
        started = self._clock.monotonic()
        try:
            await self._decide_now(tx, work)
        finally:
            self.metrics.commit_decided(self._clock.monotonic() - started)

    async def _decide_now(self, tx: Transaction, work: dict[str, Statements] | None) -> None:
        if not tx.participants:
            tx.move_to(TxState.COMMITTED)
            self._retire(tx)
            return
        if self._remaining(tx) <= 0:
            await self._abort(tx, AbortReason.deadline(" before commit"))
            return
        tx.move_to(TxState.PREPARING)
        tx.preparing_since = self._clock.monotonic()
        if len(tx.participants) == 1:
            await self._commit_one_phase(tx, (work or {}).get(tx.participants[0], ()))
            return
        self._in_flight[tx.txid] = tx
        try:
            if work is not None and self._prepares_in_order():
                ballots = await self._prepare_in_order(tx, work)
            else:
                ballots = await asyncio.gather(
                    *(self._prepare_one(tx, p, (work or {}).get(p, ())) for p in tx.participants)
                )
        finally:
            self._in_flight.pop(tx.txid, None)
        # From here on no deadlock victim is chosen among the votes' owner (break_deadlock): a
        # victim chosen before was marked with no await in between, and is aborted below.
        tx.tallied = True
        # A fault injected here is handled below as a failed write of the COMMIT record.
        fault = await self._fault_at("coordinator.before_commit_record")
        prepared, committed_earlier, refusal = self._tally(tx, ballots)
        reason = tx.victim_of or refusal or tx.abort_request
        if committed_earlier:
            await self._seal_committed_earlier(tx)
        elif reason is not None:
            await self._abort(tx, reason)
        elif not prepared:
            tx.move_to(TxState.COMMITTED)  # every branch read-only: nothing to commit
            self._retire(tx)
        elif fault:
            await self._abort(tx, AbortReason.log_write_failed(fault))
        else:
            await self._commit(tx, CommitRecord(tx.txid, tuple(prepared)))

    def _tally(
        self, tx: Transaction, ballots: Sequence[_Ballot]
    ) -> tuple[list[str], bool, AbortReason | None]:
        """The participants that prepared; whether a branch committed under an earlier attempt
        (which outranks any no); and why the commit is refused, if it is: a refused request
        outranks the other refusals, and among those the last participant's speaks."""
        prepared = []
        committed_earlier = False
        refusal: AbortReason | None = None
        refused_by_reachable = False
        for participant, ballot in zip(tx.participants, ballots, strict=True):
            if ballot.results:
                tx.results[participant] = ballot.results
            if ballot.vote is Vote.PREPARED:
                prepared.append(participant)
            elif participant not in tx.unreached:
                tx.settled_branches.add(participant)  # finished by the agent itself
                refused_by_reachable |= ballot.vote is Vote.ABORT
            committed_earlier |= ballot.vote is Vote.ALREADY_COMMITTED
            if ballot.against is not None and (
                refusal is None or not refusal.outranks_others or ballot.against.outranks_others
            ):
                refusal = ballot.against
        # A request-id transaction refused only by participants that could not be reached may
        # have committed there under an earlier attempt (before a restart of this coordinator):
        # its abort is no answer to give the client.
        if refusal is not None and tx.request_id and tx.unreached and not refused_by_reachable:
            refusal = refusal.maybe_committed_earlier(tx.request_id)
        return prepared, committed_earlier, refusal

    async def _seal_committed_earlier(self, tx: Transaction) -> None:
        """A retried request whose first attempt committed: undo this attempt, report COMMITTED
        (no ABORTING in between: the outcome is COMMITTED, known now)."""
        await asyncio.gather(
            *(
                self._rollback_quietly(p, tx.txid)
                for p in tx.participants
                if p not in tx.settled_branches
            )
        )
        tx.move_to(TxState.COMMITTED)
        self._retire(tx)

    async def _commit(self, tx: Transaction, record: CommitRecord) -> None:
        """The COMMIT decision: durable first, then phase 2 (in the background)."""
        tx.prepared = record.participants
        try:
            await self._log.record_commit(record)
        except DecisionLogFull as err:
            reason = f"the decision log could not be written: {err.message}"
            await self._abort(tx, AbortReason.log_write_failed(reason))
            return
        except DecisionLogFailed as err:
            self._fatal(err)
            raise
        self._open_commits[tx.txid] = record
        # Phase 2 is this task's from the moment the decision is durable: recovery, which
        # drives the open COMMIT records nobody drives, must not drive this one meanwhile.
        self._phase2_running.add(tx.txid)
        tx.move_to(TxState.COMMITTING)
        log.debug("commit_decided", txid=tx.txid, participants=list(tx.prepared))
        try:
            await self._failpoints.ahit("coordinator.after_commit_record")
        finally:  # decided: phase 2 runs even when the failpoint raises (a lost answer)
            self._spawn(self._phase2(tx, record))

    async def _prepare_in_order(
        self, tx: Transaction, work: dict[str, Statements]
    ) -> list[_Ballot]:
        """Prepares a one-shot transaction's branches one after another, in participant-name
        order, each once the one before voted PREPARED (or READ_ONLY). After a no, a chosen
        deadlock victim or an abort request, the rest are not started: their ballot is an ABORT
        with no reason of its own, and no branch exists there to roll back. Returns the ballots
        in ``tx.participants`` order, as ``_tally`` reads them."""
        ballots: dict[str, _Ballot] = {}
        for participant in sorted(tx.participants):
            if (
                tx.victim_of is not None
                or tx.abort_request is not None
                or any(b.vote not in (Vote.PREPARED, Vote.READ_ONLY) for b in ballots.values())
            ):
                ballots[participant] = _Ballot(Vote.ABORT)
                continue
            ballots[participant] = await self._prepare_one(
                tx, participant, work.get(participant, ())
            )
        return [ballots[p] for p in tx.participants]

    async def _prepare_one(
        self, tx: Transaction, participant: str, statements: Statements
    ) -> _Ballot:
        remaining = self._remaining(tx)
        if remaining <= 0:
            return _Ballot(Vote.ABORT, against=AbortReason.deadline(" before prepare"))
        started = self._clock.monotonic()
        try:
            reply = await self._ports.prepare(
                participant, tx.txid, statements, 1 if statements else 0, remaining
            )
        except TwopcError as err:
            self.metrics.prepare_answered(participant, self._clock.monotonic() - started)
            if is_transport_failure(err):
                tx.unreached.add(participant)
            return _Ballot(Vote.ABORT, against=AbortReason.prepare_failed(participant, err))
        self.metrics.prepare_answered(participant, self._clock.monotonic() - started)
        if reply.vote is Vote.ABORT:
            no = AbortReason.voted_no(participant, reply.reason, reply.mysql_errno)
            return _Ballot(Vote.ABORT, reply.results, no)
        fault = await self._fault_at("coordinator.mid_prepare")
        if fault:  # as if the vote were lost: the branch may be prepared
            tx.unreached.add(participant)
            return _Ballot(Vote.ABORT, against=AbortReason.unreachable(participant, fault))
        return _Ballot(reply.vote, reply.results)

    async def _commit_one_phase(self, tx: Transaction, statements: Statements) -> None:
        participant = tx.participants[0]
        try:
            reply: CommitReply = await self._ports.commit(
                participant,
                tx.txid,
                one_phase=True,
                statements=statements,
                sequence=1 if statements else 0,
                timeout=self._remaining(tx),
            )
        except TwopcError as err:
            if is_transport_failure(err):
                # The commit may have happened: find out from the marker before answering.
                await self._settle_unknown_one_phase(tx, participant, err)
                return
            tx.settled_branches.add(participant)
            await self._abort(tx, AbortReason.participant_failed(participant, err))
            return
        if reply.results:
            tx.results[participant] = reply.results
        tx.move_to(TxState.COMMITTED)
        self._retire(tx)

    async def _settle_unknown_one_phase(
        self, tx: Transaction, participant: str, err: TwopcError
    ) -> None:
        """The one-phase commit's answer was lost: it may have committed, may still be on its
        way, or may never arrive. A rollback settles it: the agent refuses to roll back a branch
        that committed, and after rolling back (or finding nothing) it refuses the txid for good,
        so a request still in flight cannot commit after this answer."""
        try:
            await self._ports.rollback(participant, tx.txid, self.settings.rpc_timeout_s)
        except FailedPrecondition:
            tx.move_to(TxState.COMMITTED)
            self._retire(tx)
            return
        except TwopcError as again:
            # Unreachable: the agent rolls the branch back at its deadline unless it committed;
            # GetTransaction reads the marker. Leave it in doubt.
            self._retire_in_doubt(tx)
            raise Unavailable(
                f"the one-phase commit on {participant} did not answer ({err.message}) and the "
                f"agent cannot be asked ({again.message}); look the outcome of {tx.txid} up later",
                txid=tx.txid,
            ) from err
        tx.settled_branches.add(participant)
        await self._abort(tx, AbortReason.unreachable(participant, err.message))

    # --- phase 2 -----------------------------------------------------------------------------

    async def _phase2(self, tx: Transaction | None, record: CommitRecord) -> None:
        try:
            if await self.drive_commit(record) and tx is not None:
                tx.move_to(TxState.COMMITTED)
        finally:
            self._phase2_running.discard(record.txid)
            if tx is not None:
                self._retire(tx)
                tx.done.set()  # COMMITTING stays the answer; recovery finishes phase 2

    async def drive_commit(self, record: CommitRecord) -> bool:
        """Sends XA COMMIT to every branch of a decided transaction until all acknowledged, then
        writes END. False when some branch could not be reached (recovery tries again later)."""
        pending = list(record.participants)
        backoff = self.settings.phase2_backoff_s
        for attempt in range(self.settings.phase2_attempts):
            if attempt == 0 and self._failpoints.spec("coordinator.mid_commit"):
                staged = await self._commit_first_alone(record.txid, pending)
                if staged is None:
                    return False
                replies = staged
            else:
                replies = await self._send_commits(record.txid, pending)
            still = []
            for participant, reply in zip(pending, replies, strict=True):
                if isinstance(reply, FailedPrecondition):
                    log.error(
                        "heuristic_hazard",
                        txid=record.txid,
                        participant=participant,
                        error=reply.message,
                    )
                elif isinstance(reply, BaseException):
                    if not isinstance(reply, TwopcError):
                        raise reply
                    still.append(participant)
                    if attempt == 0:
                        log.warning(
                            "phase2_retry",
                            txid=record.txid,
                            participant=participant,
                            error=reply.message,
                        )
            pending = still
            if not pending or attempt == self.settings.phase2_attempts - 1:
                break
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        if pending:
            log.warning("phase2_incomplete", txid=record.txid, participants=pending)
            return False
        fault = await self._fault_at("coordinator.before_end_record")
        if fault:  # as if END were lost: recovery drives the commit again
            log.warning("phase2_stopped", txid=record.txid, error=fault)
            return False
        try:
            await self._log.record_end(record.txid)
        except DecisionLogFailed as err:
            self._fatal(err)
            raise
        self._open_commits.pop(record.txid, None)
        self._remember(TransactionView(record.txid, TxState.COMMITTED, record.participants))
        return True

    async def _send_commits(
        self, txid: str, participants: Sequence[str]
    ) -> list[CommitReply | BaseException]:
        """Phase 2's XA COMMIT to each of ``participants``, all at once; an error in place of
        each reply that did not come."""
        return await asyncio.gather(
            *(
                self._ports.commit(p, txid, one_phase=False, timeout=self.settings.rpc_timeout_s)
                for p in participants
            ),
            return_exceptions=True,
        )

    async def _commit_first_alone(
        self, txid: str, participants: Sequence[str]
    ) -> list[CommitReply | BaseException] | None:
        """Phase 2's first attempt while ``coordinator.mid_commit`` is armed: the first branch's
        XA COMMIT alone, the point once that branch acknowledged, then the others' XA COMMITs
        (the messages of an unarmed phase 2, in two steps), so that a crash there leaves one
        branch committed and the others prepared. None when the point stopped phase 2 (its
        ``return(kind)``: recovery finishes the commit)."""
        first = await self._send_commits(txid, participants[:1])
        if first and not isinstance(first[0], BaseException):
            fault = await self._fault_at("coordinator.mid_commit")
            if fault:
                log.warning("phase2_stopped", txid=txid, error=fault)
                return None
        return first + await self._send_commits(txid, participants[1:])

    # --- abort -------------------------------------------------------------------------------

    def _abort_now(self, tx: Transaction, reason: AbortReason) -> bool:
        """Decides ABORT at once, with no await, so that nothing can decide otherwise in
        between. False when the transaction was decided already (or is being decided by a
        commit that owns it: a PREPARING transaction is aborted only by its decider)."""
        if tx.state not in (TxState.ACTIVE, TxState.PREPARING):
            return False
        if tx.txid in self._open_commits:
            raise AssertionError(f"refusing to roll back {tx.txid}: it has a COMMIT record")
        # A deadlock victim's statement came back interrupted: the client learns of the cycle.
        reason = tx.victim_of or reason
        tx.decide_abort(reason)
        log.info(
            "transaction_aborted",
            txid=tx.txid,
            cause=reason.cause.value,
            reason=redact(reason.message),
        )
        return True

    async def _abort(self, tx: Transaction, reason: AbortReason) -> None:
        """Decides ABORT (no log write) and rolls back every branch that may hold something;
        when it was decided already, waits for that decision's end."""
        if self._abort_now(tx, reason):
            await self._roll_back(tx)
        else:
            await tx.done.wait()

    async def _roll_back(self, tx: Transaction) -> None:
        """Phase 2 of an abort: rollbacks to every branch that may hold something. An agent that
        refuses because the branch committed proves that an earlier attempt of this txid (a
        retried request id) committed: then the transaction's outcome is COMMITTED."""
        targets = [p for p in tx.participants if p not in tx.settled_branches]
        refusals = await asyncio.gather(*(self._rollback_quietly(p, tx.txid) for p in targets))
        if any(refusals):
            log.warning("committed_by_an_earlier_attempt", txid=tx.txid)
            tx.abort = None  # not aborted after all
            tx.move_to(TxState.COMMITTED)
        elif tx.state is TxState.ABORTING:
            tx.move_to(TxState.ABORTED)
        self._retire(tx)

    async def _rollback_quietly(self, participant: str, txid: str) -> bool:
        """Rolls a branch back; True only when the agent refused because it committed."""
        try:
            await self._ports.rollback(participant, txid, self.settings.rpc_timeout_s)
        except FailedPrecondition as err:
            log.warning("rollback_refused", txid=txid, participant=participant, error=err.message)
            return True
        except TwopcError as err:
            # Left to the agent's deadline reaper (active branch) or to recovery (prepared).
            log.warning("rollback_failed", txid=txid, participant=participant, error=err.message)
        return False

    # --- lock cycles across participants (coordinator.engine.deadlocks) -------------------------

    def _prepares_in_order(self) -> bool:
        """Whether a one-shot transaction's branches are prepared one after another now."""
        ordered, switch = self._one_shot_order.choose(self._clock.monotonic())
        if switch is not None and switch.ordered:
            log.info(
                "one_shot_prepares_ordered",
                reason="deadlock victims across participants",
                victims=switch.victims,
                of_transactions=switch.transactions,
                for_s=self.settings.contended_hold_s,
            )
        elif switch is not None:
            log.info("one_shot_prepares_parallel", after_s=self.settings.contended_hold_s)
        if self._one_shot_order.mode == "adaptive":
            self.metrics.one_shot_prepared(ordered=ordered)
        return ordered

    def waiting(self, threshold_s: float) -> tuple[set[str], dict[str, float], set[str]]:
        """For the deadlock detector: the participants of the transactions whose call (an
        Execute, or the prepares) has run ``threshold_s`` or longer; when each transaction
        that may be a victim began (ACTIVE, or PREPARING with several participants and votes
        not yet counted) among those with a call in flight; and the victims still being
        aborted."""
        now = self._clock.monotonic()
        participants: set[str] = set()
        begun: dict[str, float] = {}
        breaking: set[str] = set()
        # Only a transaction with a call in flight can wait, so only those can be in a cycle.
        for tx in self._in_flight.values():
            if tx.victim_of is not None:
                breaking.add(tx.txid)
            elif tx.state is TxState.ACTIVE:
                begun[tx.txid] = tx.begun
                if tx.executing_on and now - tx.last_call >= threshold_s:
                    participants.add(tx.executing_on)
            elif self._may_be_victim(tx):
                begun[tx.txid] = tx.begun
                if now - tx.preparing_since >= threshold_s:
                    participants.update(tx.participants)
        return participants, begun, breaking

    def _may_be_victim(self, tx: Transaction) -> bool:
        """A PREPARING transaction the detector may still abort: its votes are not counted, and
        it has several participants (a one-phase commit may have committed already)."""
        return (
            tx.state is TxState.PREPARING
            and not tx.tallied
            and tx.victim_of is None
            and len(tx.participants) > 1
            and tx.txid not in self._open_commits
        )

    def break_deadlock(
        self, txid: str, cycle: str, waited_s: float, waits_on: Sequence[str] = ()
    ) -> bool:
        """Aborts ``txid``, the victim of a lock cycle (described by ``cycle``), and rolls its
        branches back at once: an agent interrupts a statement of it blocked in a lock wait
        (KILL QUERY) before XA ROLLBACK, which frees its locks for the others of the cycle.

        Never awaits before the victim is marked, so nothing decides it otherwise in between:
        an ACTIVE victim is decided ABORT here; a PREPARING one is marked (``victim_of``) before
        its votes are counted, and its decider aborts it whatever the votes (the rollbacks sent
        here may reach branches that voted PREPARED: that is safe, as no COMMIT record can be
        written for it). A decided transaction (COMMIT record, or votes counted) is never
        touched. ``waits_on``: the participants where the victim waits, rolled back too (an
        Execute in flight has not added its participant yet). False when ``txid`` could not be
        aborted (decided or gone meanwhile)."""
        tx = self._live.get(txid)
        if tx is None:
            return False
        reason = AbortReason.deadlock(cycle)
        if tx.one_shot:
            self._one_shot_order.victim()
        if tx.state is TxState.ACTIVE:
            tx.victim_of = reason
            if not self._abort_now(tx, reason):
                return False
            self._spawn(self._roll_back(tx))
            for participant in waits_on:
                if participant not in tx.participants:
                    self._spawn(self._rollback_quietly(participant, txid))
        elif self._may_be_victim(tx):
            tx.victim_of = reason
            log.info("deadlock_victim_marked", txid=txid, cycle=cycle)
            for participant in tx.participants:
                if participant not in tx.settled_branches:
                    self._spawn(self._rollback_quietly(participant, txid))
        else:
            return False
        self.metrics.deadlock_victim(waited_s)
        return True

    async def reap_expired(self) -> int:
        """Aborts ACTIVE transactions past their deadline, and those that no call used for
        max_idle_ms (one in the middle of a call is not idle)."""
        now = self._clock.monotonic()
        idle_s = self.settings.max_idle_ms / 1000

        def reason(tx: Transaction) -> AbortReason | None:
            if now > tx.deadline:
                return AbortReason.deadline()
            if idle_s and not tx.lock.locked() and now - tx.last_call > idle_s:
                return AbortReason.idle(self.settings.max_idle_ms)
            return None

        expired = []
        for tx in list(self._live.values()):
            why = reason(tx) if tx.state is TxState.ACTIVE else None
            if why is not None and self._abort_now(tx, why):
                expired.append(tx)
        await asyncio.gather(*(self._roll_back(tx) for tx in expired))
        return len(expired)

    # --- the operator's hand (coordinator.engine.admin) ---------------------------------------

    async def abort_by_operator(self, txid: str, reason: AbortReason) -> TxState:
        """Aborts a live ACTIVE transaction (``twopc admin resolve --abort``) and rolls its
        branches back; an aborting one is waited for.

        Raises:
            NotFound: not live here.
            Unavailable: PREPARING: its decision is being made; try again.
            FailedPrecondition: decided COMMIT.
        """
        tx = self._live.get(txid)
        if tx is None:
            raise NotFound(f"transaction {txid} is not live on this coordinator", txid=txid)
        if tx.state is TxState.PREPARING:
            raise Unavailable(
                f"the decision of {txid} is being made (preparing); try again in a moment",
                txid=txid,
            )
        if outcome_of(tx.state) is Outcome.COMMITTED:
            raise FailedPrecondition(
                f"transaction {txid} has a commit decision ({tx.state.value}); it cannot be "
                "aborted",
                txid=txid,
            )
        if tx.state is TxState.ACTIVE:
            self._abort_now(tx, reason)
            await self._shielded(self._roll_back(tx))
        await tx.done.wait()
        return tx.state

    async def record_operator_commit(self, record: CommitRecord) -> None:
        """Writes an operator's COMMIT decision for a transaction that no coordinator here
        decided (another coordinator's stray branches); recovery drives it from now on, here
        and after a restart.

        Raises:
            DecisionLogFull: not written.
            DecisionLogFailed: the process stops.
        """
        try:
            await self._log.record_commit(record)
        except DecisionLogFailed as err:
            self._fatal(err)
            raise
        self._open_commits[record.txid] = record
        log.warning("operator_commit_decided", txid=record.txid, participants=record.participants)

    # --- recovery support --------------------------------------------------------------------

    def claim_for_recovery(self, txid: str) -> bool:
        """Reserves ``txid`` for recovery; False when it is live here (recovery keeps off)."""
        if txid in self._live:
            return False
        self._recovering.add(txid)
        return True

    def release_from_recovery(self, txid: str) -> None:
        self._recovering.discard(txid)

    def commit_record(self, txid: str) -> CommitRecord | None:
        return self._open_commits.get(txid)

    def open_commit_records(self) -> list[CommitRecord]:
        """Every COMMIT record without END, phase 2 running or not."""
        return list(self._open_commits.values())

    def open_commits_to_drive(self) -> list[CommitRecord]:
        return [r for t, r in self._open_commits.items() if t not in self._phase2_running]

    async def redrive(self, record: CommitRecord) -> bool:
        if record.txid in self._phase2_running:
            return False
        self._phase2_running.add(record.txid)
        try:
            return await self.drive_commit(record)
        finally:
            self._phase2_running.discard(record.txid)

    @property
    def participants(self) -> ParticipantPort:
        return self._ports

    @property
    def in_doubt_count(self) -> int:
        """Transactions decided COMMIT whose branches have not all acknowledged yet (a COMMIT
        record without END): phase 2 or recovery still has to reach some branch."""
        return len(self._open_commits)

    @property
    def prefix(self) -> str:
        return txid_prefix(self.coordinator_id)

    # --- helpers -----------------------------------------------------------------------------

    async def _answer(self, tx: Transaction, wait_for_phase2: bool) -> TxState:
        await (tx.done.wait() if wait_for_phase2 else tx.decided.wait())
        self._raise_if_in_doubt(tx)
        if tx.abort is not None:
            raise tx.abort.client_error(tx.txid)
        return tx.state

    async def _lookup_on_participants(self, txid: str) -> TransactionView:
        names = list(self._ports.names())
        answers = await asyncio.gather(
            *(self._ports.inspect(p, [txid], self.settings.rpc_timeout_s) for p in names),
            return_exceptions=True,
        )
        unreachable = []
        holding = []
        active = []
        for participant, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                unreachable.append(participant)
                continue
            presence = answer.get(txid, Presence.UNKNOWN)
            if presence is Presence.COMMITTED:
                return TransactionView(txid, TxState.COMMITTED, (participant,))
            if presence is Presence.ACTIVE:
                active.append(participant)
            if presence is Presence.PREPARED:
                holding.append(participant)
        if active:
            # An unprepared branch of a transaction this coordinator no longer runs: a one-phase
            # commit sent before a crash may still land, or the agent rolls it back at its deadline.
            return TransactionView(
                txid,
                TxState.PREPARING,
                tuple(active),
                f"a branch is still active on {', '.join(active)}",
            )
        if unreachable:
            raise Unavailable(
                f"cannot tell the outcome of {txid}: participant(s) {', '.join(unreachable)} "
                "did not answer; ask again later",
                txid=txid,
            )
        reason = _PRESUMED_ABORT
        if holding:
            reason += f"; branches on {', '.join(holding)} are being rolled back"
        return TransactionView(txid, TxState.ABORTED, tuple(holding), reason, presumed=True)

    @staticmethod
    def _raise_if_in_doubt(tx: Transaction) -> None:
        if outcome_of(tx.state) is Outcome.PENDING:
            raise Unavailable(
                f"the outcome of {tx.txid} is not known yet (a one-phase commit did not "
                "answer); look it up later",
                txid=tx.txid,
            )

    def _settled_state(self, view: TransactionView) -> TxState:
        """The state to answer a Commit with, for a transaction no longer live here."""
        if view.outcome is Outcome.ABORTED:
            raise TransactionAborted(view.abort_reason or "aborted", txid=view.txid)
        if view.outcome is Outcome.PENDING:
            raise Unavailable(
                f"the outcome of {view.txid} is not known yet: {view.abort_reason}; ask again",
                txid=view.txid,
            )
        return view.state

    def _live_transaction(self, txid: str, owner: str | None = None) -> Transaction:
        tx = self._live.get(txid)
        if tx is not None:
            if not self._may_see(owner, tx.owner):
                raise self._unknown(txid)
            return tx
        parse_txid(txid)
        known = self._finished.get(txid)
        if known is not None and not self._may_see(owner, known.owner):
            raise self._unknown(txid)
        if known is not None and known.outcome is Outcome.ABORTED:
            raise TransactionAborted(
                f"transaction {txid} was aborted: {known.abort_reason}", txid=txid
            )
        if known is not None or txid in self._open_commits:
            raise FailedPrecondition(f"transaction {txid} has committed", txid=txid)
        raise self._unknown(txid)

    def _require_active(self, tx: Transaction) -> None:
        if tx.state is not TxState.ACTIVE:
            raise self._inactive_error(tx, f"transaction {tx.txid} was aborted: {tx.abort_reason}")

    @staticmethod
    def _inactive_error(tx: Transaction, abort_message: str = "") -> TwopcError:
        """Why ``tx`` takes no more statements: its abort's error (with ``abort_message`` in
        place of the reason's, if given), or FailedPrecondition."""
        if tx.abort is not None:
            return tx.abort.client_error(tx.txid, abort_message)
        return FailedPrecondition(
            f"transaction {tx.txid} is {tx.state.value}; it takes no more statements", txid=tx.txid
        )

    def _check_participant(self, participant: str) -> None:
        if participant not in self._ports.names():
            known = ", ".join(sorted(self._ports.names()))
            raise NotFound(f"unknown participant {participant!r}; this coordinator knows: {known}")

    def _remaining(self, tx: Transaction) -> float:
        return tx.deadline - self._clock.monotonic()

    def _retire(self, tx: Transaction) -> None:
        """Moves a transaction whose fate is sealed out of the live table."""
        if tx.txid in self._phase2_running:
            return
        self._unlist(tx)
        outcome = outcome_of(tx.state)
        self._count(tx, "unknown" if outcome is Outcome.PENDING else outcome.value)
        if tx.abort is not None and not tx.abort.conclusive and tx.state is TxState.ABORTED:
            return  # not an outcome to repeat: lookups and retries ask the participants
        self._remember(
            TransactionView(
                tx.txid, tx.state, tuple(tx.participants), tx.abort_reason, owner=tx.owner
            )
        )

    def _retire_in_doubt(self, tx: Transaction) -> None:
        """A one-phase commit whose answer was lost: only the participant's marker can tell."""
        self._unlist(tx)
        self._count(tx, "unknown")
        tx.decided.set()
        tx.done.set()

    def _count(self, tx: Transaction, outcome: str) -> None:
        """Reports a transaction's outcome to the metrics, once."""
        if not tx.counted:
            tx.counted = True
            self.metrics.transaction_finished(outcome)

    def _remember(self, view: TransactionView) -> None:
        self._finished[view.txid] = view
        self._finished.move_to_end(view.txid)
        while len(self._finished) > self.settings.finished_memory:
            self._finished.popitem(last=False)

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _fault_at(self, failpoint: str) -> str:
        """Hits ``failpoint``; the message of the error that a ``return(kind)`` term raised there
        (the caller handles it as a failure of the step next to the point), or ""."""
        try:
            await self._failpoints.ahit(failpoint)
        except TwopcError as err:
            return err.message
        return ""

    async def _shielded(self, work: Awaitable[None]) -> None:
        """Runs ``work`` to its end even if the caller's RPC is cancelled: a decision half-made
        (a COMMIT record written, its phase 2 not started) must never be abandoned."""
        await asyncio.shield(self._spawn(work))

    def _fatal(self, err: BaseException) -> None:
        log.critical("decision_log_failed", error=str(err))
        if self._on_fatal is not None:
            self._on_fatal(err)
