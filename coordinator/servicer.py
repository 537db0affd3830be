"""The gRPC face of the coordinator: protobuf in, ``TransactionManager`` calls, protobuf out.

Every Execute and RunTransaction is checked here, before the engine sees it: its size against
the request limits (``twopc.limits``), each statement by the statement guard, each parameter as
the agent will decode it (``twopc.values``). What is refused is answered InvalidArgument with
nothing started (no transaction begun, no agent called), on every path alike, and an interactive
transaction stays as it was. Participant names are checked before they are looked up or echoed,
and only a txid of a txid's form is echoed in an error.

Every call is made as the caller's identity (``twopc.identity.peer_identity``: None on a
plaintext coordinator, where no identity rule applies): the ``identities`` setting
(``coordinator.identities``) decides whether it may call at all and which participants it may
use, checked before anything starts (PERMISSION_DENIED); the engine binds each transaction, and
each request id, to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog
from grpc import aio

from coordinator.engine.manager import TransactionManager, TransactionView
from coordinator.engine.states import Outcome, TxState
from coordinator.identities import OPEN, IdentityRules
from twopc import tracing
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import Internal, InvalidArgument, TwopcError
from twopc.identity import peer_identity
from twopc.limits import DEFAULT_LIMITS, RequestLimits
from twopc.logs import redact
from twopc.sql_guard import DEFAULT_MARKER_TABLE, check_statement
from twopc.status import abort_with
from twopc.txid import check_participant_name, is_txid, parse_txid
from twopc.values import check_values

T = TypeVar("T")
Context = aio.ServicerContext[object, object]
log = structlog.get_logger("twopc.coordinator.rpc")

STATES = {
    TxState.ACTIVE: pb.TRANSACTION_STATE_ACTIVE,
    TxState.PREPARING: pb.TRANSACTION_STATE_PREPARING,
    TxState.COMMITTING: pb.TRANSACTION_STATE_COMMITTING,
    TxState.COMMITTED: pb.TRANSACTION_STATE_COMMITTED,
    TxState.ABORTING: pb.TRANSACTION_STATE_ABORTING,
    TxState.ABORTED: pb.TRANSACTION_STATE_ABORTED,
}
OUTCOMES = {
    Outcome.PENDING: pb.OUTCOME_PENDING,
    Outcome.COMMITTED: pb.OUTCOME_COMMITTED,
    Outcome.ABORTED: pb.OUTCOME_ABORTED,
}


def transaction_info(view: TransactionView) -> pb.TransactionInfo:
    return pb.TransactionInfo(
        txid=view.txid,
        state=STATES[view.state],
        outcome=OUTCOMES[view.outcome],
        participants=list(view.participants),
        abort_reason=view.abort_reason,
        presumed=view.presumed,
    )


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        manager: TransactionManager,
        *,
        limits: RequestLimits = DEFAULT_LIMITS,
        rules: IdentityRules = OPEN,
    ) -> None:
        self._manager = manager
        self._limits = limits
        self._rules = rules

    def _caller(self, context: Context) -> str | None:
        """The caller's identity, once the identities setting lets it use the client API
        (PermissionDenied otherwise, before anything starts)."""
        identity = peer_identity(context)
        self._rules.admit(identity)
        return identity

    async def Begin(self, request: pb.BeginRequest, context: Context) -> pb.BeginResponse:
        async def run() -> pb.BeginResponse:
            owner = self._caller(context)
            tx = await self._manager.begin_request(
                request.timeout_ms, request.request_id, owner=owner
            )
            tracing.set_txid(tx.txid)
            return pb.BeginResponse(txid=tx.txid, timeout_ms=tx.timeout_ms)

        return await _guard(context, "", run, "Begin")

    async def Execute(self, request: pb.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        async def run() -> pb.ExecuteResponse:
            owner = self._caller(context)
            check_participant_name(request.participant)  # before it is echoed
            self._rules.check_participants(owner, [request.participant])
            txid = _txid(request.txid)
            consequence = "nothing of this request ran; the transaction is as it was"
            self._limits.check(request.statements, "the coordinator")
            _check_statements(request.participant, request.statements, consequence, txid)
            results = await self._manager.execute(
                txid,
                request.participant,
                request.statements,
                request.sequence,
                digest=statements_digest(request.statements),
                owner=owner,
            )
            return pb.ExecuteResponse(results=results)  # type: ignore[arg-type]

        return await _guard(context, request.txid, run, "Execute")

    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.CommitResponse:
        async def run() -> pb.CommitResponse:
            owner = self._caller(context)
            state = await self._manager.commit(
                _txid(request.txid), wait_for_phase2=request.wait_for_phase2, owner=owner
            )
            return pb.CommitResponse(txid=request.txid, state=STATES[state])

        return await _guard(context, request.txid, run, "Commit")

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.RollbackResponse:
        async def run() -> pb.RollbackResponse:
            owner = self._caller(context)
            state = await self._manager.rollback(_txid(request.txid), owner)
            return pb.RollbackResponse(txid=request.txid, state=STATES[state])

        return await _guard(context, request.txid, run, "Rollback")

    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Context
    ) -> pb.TransactionInfo:
        async def run() -> pb.TransactionInfo:
            owner = self._caller(context)
            if request.txid and request.request_id:
                raise InvalidArgument("give txid or request_id, not both")
            if request.request_id:
                view = await self._manager.lookup_request(request.request_id, owner)
            else:
                view = await self._manager.lookup(_txid(request.txid), owner)
            return transaction_info(view)

        return await _guard(context, request.txid, run, "GetTransaction")

    async def RunTransaction(
        self, request: pb.RunTransactionRequest, context: Context
    ) -> pb.RunTransactionResponse:
        async def run() -> pb.RunTransactionResponse:
            owner = self._caller(context)
            for work in request.work:
                check_participant_name(work.participant)  # before it is echoed
            self._rules.check_participants(owner, [work.participant for work in request.work])
            self._limits.check(
                (statement for work in request.work for statement in work.statements),
                "the coordinator",
            )
            for work in request.work:
                _check_statements(
                    work.participant, work.statements, "nothing ran: no transaction was started"
                )
            outcome = await self._manager.run(
                [(w.participant, w.statements) for w in request.work],
                timeout_ms=request.timeout_ms,
                request_id=request.request_id,
                wait_for_phase2=request.wait_for_phase2,
                owner=owner,
            )
            tracing.set_txid(outcome.txid)
            return pb.RunTransactionResponse(
                txid=outcome.txid,
                state=STATES[outcome.state],
                results=[
                    pb.ParticipantResults(participant=p, results=r)  # type: ignore[arg-type]
                    for p, r in outcome.results.items()
                ],
            )

        return await _guard(context, "", run, "RunTransaction")


def _check_statements(
    participant: str, statements: Sequence[pb.Statement], consequence: str, txid: str = ""
) -> None:
    """InvalidArgument naming the first statement the guard refuses, or whose parameters an
    agent would refuse, and why.

    The agents check again (a caller may reach one directly, and only an agent knows its own
    marker table's name): this check makes the answer the same on every path, and sooner."""
    check_participant_name(participant)
    for index, statement in enumerate(statements, 1):
        try:
            check_statement(
                statement.sql,
                placeholders=len(statement.params),
                protected_tables=(DEFAULT_MARKER_TABLE,),
            )
            check_values(statement.params)
        except InvalidArgument as err:
            raise InvalidArgument(
                f"statement {index} for participant {participant!r} is refused: {err.message} "
                f"({consequence})",
                txid=txid,
            ) from None


def statements_digest(statements: Sequence[pb.Statement]) -> bytes:
    """A digest of an Execute's statements and parameters: a retry (the same sequence number)
    must carry the same, which the engine checks with this."""
    digest = hashlib.blake2b(digest_size=16)
    for statement in statements:
        data = statement.SerializeToString(deterministic=True)
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def _txid(txid: str) -> str:
    if not txid:
        raise InvalidArgument("txid is required")
    parse_txid(txid)  # InvalidArgument, echoing nothing that is not a txid's form
    return txid


async def _guard(context: Context, txid: str, run: Callable[[], Awaitable[T]], method: str) -> T:
    """Runs a handler with ``txid`` bound in the logs, in a span of its own named ``method``
    (``Begin`` is ``twopc.Coordinator/Begin``; another service's method is named in full), the
    child of the caller's trace context (``twopc.tracing``), and errors turned into statuses.
    Only a txid of a txid's form is bound or echoed: a hostile one may hold anything."""
    txid = txid if is_txid(txid) else ""
    error: TwopcError
    with (
        tracing.span(
            method if "/" in method else f"twopc.Coordinator/{method}",
            context.invocation_metadata(),
            txid=txid,
        ),
        structlog.contextvars.bound_contextvars(txid=txid or None),
    ):
        try:
            return await run()
        except TwopcError as err:
            err.txid = err.txid or txid
            if err.code in ("INTERNAL", "UNKNOWN"):
                log.error("rpc_failed", error=redact(err.message))
            error = err
        except Exception as err:
            log.exception("rpc_crashed")
            error = Internal(f"coordinator error: {type(err).__name__}: {err}", txid=txid)
        tracing.mark_error(error)
    await abort_with(context, error)
    raise AssertionError("unreachable: abort_with raises")


guard = _guard  # the same for the other services of the coordinator (coordinator.admin)
