"""The blocking client: ``Client`` and its ``Transaction``."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TypeAlias, TypeVar

import grpc

from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client._common import (
    DEFAULT_RPC_TIMEOUT,
    AdmissionHold,
    ChannelOption,
    ConflictRetry,
    ExitAction,
    Result,
    RetryPolicy,
    RetryTracker,
    RunResult,
    StatementLike,
    TransactionCore,
    TransactionInfo,
    TransactionState,
    Work,
    begin_request,
    channel_options_with,
    get_transaction_request,
    info_from_pb,
    logger,
    request_id_or_new,
    retry_request_id,
    run_outcome_unknown,
    run_request,
    run_result_from_pb,
    with_txid,
)
from twopc.client._endpoints import Endpoints, describe, parse_endpoints
from twopc.client._outbox import no_outbox, outbox_message
from twopc.errors import FailedPrecondition, TwopcError
from twopc.status import error_from_rpc, is_transport_failure
from twopc.tls import TlsConfig, client_transport
from twopc.tracing import outgoing_metadata

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

# The method of a stub that a call sends (a string: grpc's classes are not generic at run time).
Pick: TypeAlias = "Callable[[pb_grpc.CoordinatorStub], grpc.UnaryUnaryMultiCallable[Req, Resp]]"


class Client:
    """A blocking client of a twopc coordinator, or of a coordinator group, over one long-lived
    gRPC channel per endpoint.

    Thread-safe (one ``Client`` may serve many threads); a ``Transaction`` is not.

    Give exactly one of ``tls``, ``credentials`` or ``insecure=True``: the coordinator runs
    mutual TLS unless it is set to plaintext.

    With several endpoints (the members of a coordinator group), a call not bound to an
    interactive transaction (``run``, ``begin``, ``get_transaction``) that fails as the retry
    policy retries (UNAVAILABLE, DEADLINE_EXCEEDED) is retried on the next endpoint, round the
    list, with the same request id, within the policy's attempts and deadline; each move is
    logged at WARNING. The client then stays on the endpoint that answered (``endpoint``) until
    it fails. The calls of an interactive transaction go to the endpoint that began it
    (``Transaction.endpoint``) and never move: if that member is gone, the transaction is lost
    (the group rolls its branches back), and a commit whose answer was lost raises
    ``OutcomeUnknown``: ``get_transaction``, which any member answers, tells its outcome.

    Args:
        target: the coordinator's address, ``host:port``; or the members of a group: a list of
            addresses, or one string of them separated by commas; or one gRPC target URI such as
            ``dns:///name:port``, a DNS name whose addresses are the members, resolved by gRPC
            (one channel, gRPC's pick_first policy: it moves to another address when the one in
            use fails, and the SDK's retries ride on that).
        tls: this client's certificate and key, and the CA of the coordinator's certificate
            (``TlsConfig.from_env()`` reads them from ``TWOPC_TLS_CERT``, ``TWOPC_TLS_KEY`` and
            ``TWOPC_TLS_CA``). The certificate's Common Name is the client's identity.
        insecure: a plaintext channel, for a coordinator run with ``insecure_plaintext``
            (logged as a warning).
        credentials: gRPC channel credentials made by the caller, in place of ``tls``.
        channel_options: gRPC channel options added to (and overriding) the defaults.
        retry_policy: how requests whose answer was lost are retried.
        rpc_timeout: the gRPC deadline of each request, in seconds.
        conflict_retries: runs a transaction again (``run``, ``run_in_transaction``) when it
            lost a lock conflict (``TransactionConflict``); None (the default): never.
        outbox: the participant whose database holds the ``twopc_outbox`` table, where
            ``Transaction.publish`` writes its messages (None: publish must name one).
        sleep: waits between retries (replaceable in tests).
        clock: a monotonic clock in seconds, for the retry deadline (replaceable in tests).
        random: a float in [0, 1) for the jitter of conflict retries (replaceable in tests).
        honor_retry_after: after the coordinator refused a new transaction with a retry-after
            hint (``ResourceExhausted.retry_after_s``: a rate limit, shedding under overload),
            refuse new transactions (``begin``, ``run``) here, with the same error, until the
            hint has passed, without sending them (the default). False: send every one.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[ChannelOption] = (),
        retry_policy: RetryPolicy | None = None,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        conflict_retries: ConflictRetry | None = None,
        outbox: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
        honor_retry_after: bool = True,
    ) -> None:
        endpoints = parse_endpoints(target)
        self._target = describe(endpoints)
        secure, tls_options = client_transport(
            tls=tls, credentials=credentials, insecure=insecure, what=f"Client({self._target})"
        )
        if secure is None:
            logger.warning(
                "%s(%s, insecure=True): plaintext, no TLS: requests, results and the caller's "
                "identity travel unprotected",
                "Client",
                self._target,
            )
        self._credentials = secure
        self._options = channel_options_with([*tls_options, *channel_options])
        self._endpoints = Endpoints(endpoints)
        # After a commit's answers were lost: one GetTransaction on each endpoint, no waits.
        self._lookups = RetryPolicy(attempts=len(endpoints), initial_backoff=0.0, max_backoff=0.0)
        # One channel per endpoint, made at its first call; the lock guards the two dicts.
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, pb_grpc.CoordinatorStub] = {}
        self._channels_lock = threading.Lock()
        self._retry = retry_policy or RetryPolicy()
        self._rpc_timeout = rpc_timeout
        self._conflict_retries = conflict_retries
        self.outbox = outbox
        self._sleep = sleep
        self._clock = clock
        self._random = random
        self._hold = AdmissionHold(clock) if honor_retry_after else None
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._target})"

    @property
    def endpoint(self) -> str:
        """The endpoint that calls not bound to a transaction go to: the last one that answered,
        or the next after the last one that failed."""
        return self._endpoints.all[self._endpoints.current]

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint, in the order given."""
        return self._endpoints.all

    def close(self) -> None:
        """Closes the channels; calls in flight fail. Idempotent."""
        with self._channels_lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels.values())
        for channel in channels:
            channel.close()

    # ---------------------------------------------------------------------------------------------

    def begin(self, *, timeout: float | None = None, request_id: str | None = None) -> Transaction:
        """Starts an interactive transaction.

        Args:
            timeout: seconds the transaction may take from Begin to its commit decision (None:
                the coordinator's default).
            request_id: idempotency key (1-40 of ``[A-Za-z0-9_-]``); a fresh one when None, so
                that a retried Begin never starts a second transaction.

        Raises:
            InvalidArgument: a bad timeout or request_id.
            PermissionDenied: the coordinator does not let this client's identity do it.
            Unavailable, DeadlineExceeded: no answer, after retries (also when the TLS
                handshake fails: a certificate the coordinator does not trust, or the reverse).
        """
        return self._begin(timeout, request_id, wait_for_phase2=False)

    @contextlib.contextmanager
    def transaction(
        self,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        wait_for_phase2: bool = False,
    ) -> Iterator[Transaction]:
        """Begins a transaction for a ``with`` block: committed when the block ends normally,
        rolled back (and the exception re-raised) when it raises. ``wait_for_phase2`` is passed
        to that commit."""
        with self._begin(timeout, request_id, wait_for_phase2) as tx:
            yield tx

    def run(
        self,
        work: Work,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        wait_for_phase2: bool = False,
    ) -> RunResult:
        """Runs a one-shot transaction: every participant's statements and the commit, in one
        request.

        Args:
            work: participant name -> its statements (``"SQL"`` or ``("SQL", params)``), in order.
            timeout: seconds for the whole transaction (None: the coordinator's default).
            request_id: idempotency key; a fresh one when None. Retries (by the SDK, or by the
                caller after ``OutcomeUnknown``) with the same key get the same answer.
            wait_for_phase2: answer only once every branch committed.

        Raises:
            InvalidArgument: a statement is refused (DDL, SET, several in one string, ...): the
                message names it; nothing was started.
            TransactionAborted: a statement failed or a participant voted no (StatementFailed
                carries ``mysql_errno``).
            OutcomeUnknown: no answer after retries; it carries ``request_id``.
        """
        first = request_id_or_new(request_id)
        started = self._clock()
        failures = 0
        while True:
            rid = retry_request_id(first, failures) if failures else first
            request = run_request(work, timeout, rid, wait_for_phase2)
            try:
                response = self._call("RunTransaction", lambda s: s.RunTransaction, request)
            except TwopcError as error:
                if is_transport_failure(error):
                    raise run_outcome_unknown(error, rid) from error
                failures += 1
                delay = self._conflict_delay(error, failures, started)
                if delay is None:
                    raise
                self._sleep(delay)
                continue
            return run_result_from_pb(request, response)

    def run_in_transaction(
        self,
        work: Callable[[Transaction], T],
        *,
        timeout: float | None = None,
        wait_for_phase2: bool = False,
    ) -> T:
        """Runs ``work`` in an interactive transaction and commits it; with ``conflict_retries``,
        runs it again in a new transaction when the transaction lost a lock conflict
        (``TransactionConflict``, from a statement or from the commit). ``work`` must be safe to
        run again: it sees only its own transaction's effects. Returns what ``work`` returned.

        Raises:
            TransactionConflict: the last try lost a conflict too.
            TwopcError: as ``begin``, ``execute`` and ``commit`` raise.
        """
        started = self._clock()
        failures = 0
        while True:
            try:
                with self.transaction(timeout=timeout, wait_for_phase2=wait_for_phase2) as tx:
                    return work(tx)
            except TwopcError as error:
                failures += 1
                delay = self._conflict_delay(error, failures, started)
                if delay is None:
                    raise
            self._sleep(delay)

    def _conflict_delay(self, error: TwopcError, failures: int, started: float) -> float | None:
        if self._conflict_retries is None:
            return None
        elapsed = self._clock() - started
        return self._conflict_retries.delay_after(error, failures, elapsed, self._random)

    def get_transaction(
        self, txid: str | None = None, *, request_id: str | None = None
    ) -> TransactionInfo:
        """The state and outcome of a transaction, by its txid or by the request_id given to
        ``begin``/``run``.

        Raises:
            NotFound: the coordinator knows no such transaction.
        """
        request = get_transaction_request(txid, request_id)
        info = self._call("GetTransaction", lambda s: s.GetTransaction, request, txid=txid or "")
        return info_from_pb(info)

    # ---------------------------------------------------------------------------------------------

    def _stub(self, index: int, txid: str) -> pb_grpc.CoordinatorStub:
        """The stub of the endpoint at ``index``, its channel made at the first call."""
        with self._channels_lock:
            if self._closed:
                raise FailedPrecondition(f"the client of {self._target} is closed", txid=txid)
            stub = self._stubs.get(index)
            if stub is None:
                target = self._endpoints.all[index]
                if self._credentials is None:
                    channel = grpc.insecure_channel(target, options=self._options)
                else:
                    channel = grpc.secure_channel(target, self._credentials, options=self._options)
                self._channels[index] = channel
                stub = self._stubs[index] = pb_grpc.CoordinatorStub(channel)
            return stub

    def _call(
        self,
        method: str,
        pick: Pick[Req, Resp],
        request: Req,
        *,
        txid: str = "",
        policy: RetryPolicy | None = None,
        endpoint: int | None = None,
    ) -> Resp:
        """Sends ``request``, again on transport failures as ``policy`` (the client's by
        default) allows; every gRPC error comes out as a ``TwopcError`` raised from it.

        With ``endpoint`` (an interactive transaction's call) every try goes to that endpoint;
        without, the first goes to the current endpoint and each retry to the next one.
        """
        return self._send(method, pick, request, txid=txid, policy=policy, endpoint=endpoint)[0]

    def _send(
        self,
        method: str,
        pick: Pick[Req, Resp],
        request: Req,
        *,
        txid: str,
        policy: RetryPolicy | None,
        endpoint: int | None,
    ) -> tuple[Resp, int]:
        """``_call``, and the index of the endpoint that answered."""
        tracker = RetryTracker(policy or self._retry, self._clock, method, txid)
        # The caller's trace context (OpenTelemetry, when installed), the same on every try.
        trace_context = outgoing_metadata()
        index = self._endpoints.current if endpoint is None else endpoint
        if self._hold is not None:
            self._hold.check(method)
        while True:
            callable_ = pick(self._stub(index, txid))
            try:
                response = callable_(request, timeout=self._rpc_timeout, metadata=trace_context)
            except grpc.RpcError as rpc_error:
                error = with_txid(error_from_rpc(rpc_error), txid)
                if self._hold is not None:
                    self._hold.note(method, error)
                delay = tracker.next_delay(error)
                if endpoint is None and is_transport_failure(error):
                    index = self._endpoints.failed(index, method, error)
                if delay is None:
                    raise tracker.final(error) from rpc_error
            else:
                if endpoint is None:
                    self._endpoints.answered(index)
                return response, index
            self._sleep(delay)

    def _begin(
        self, timeout: float | None, request_id: str | None, wait_for_phase2: bool
    ) -> Transaction:
        rid = request_id_or_new(request_id)
        response, index = self._send(
            "Begin",
            lambda s: s.Begin,
            begin_request(timeout, rid),
            txid="",
            policy=None,
            endpoint=None,
        )
        core = TransactionCore(response, rid, wait_for_phase2, self._endpoints.all[index])
        return Transaction(self, core, index)

    def _lookup(self, txid: str) -> TransactionInfo | None:
        """GetTransaction tried once on each endpoint, no waits: None when it fails on all."""
        try:
            request = get_transaction_request(txid, None)
            info = self._call(
                "GetTransaction",
                lambda s: s.GetTransaction,
                request,
                txid=txid,
                policy=self._lookups,
            )
            return info_from_pb(info)
        except TwopcError as error:
            logger.warning(
                "GetTransaction after a lost commit answer failed (txid=%s): %s",
                txid,
                type(error).__name__,
            )
            return None


class Transaction:
    """An interactive transaction, from ``Client.begin`` or ``Client.transaction``.

    As a context manager it commits on a normal exit and rolls back on an exception (which it
    re-raises; a failing rollback is logged, never raised over it). After ``commit`` or
    ``rollback`` the transaction refuses further statements (FailedPrecondition).
    """

    def __init__(self, client: Client, core: TransactionCore, endpoint: int) -> None:
        self._client = client
        self._core = core
        self._endpoint = endpoint

    @property
    def txid(self) -> str:
        return self._core.txid

    @property
    def endpoint(self) -> str:
        """The endpoint of the member that began it, where all its calls go."""
        return self._core.endpoint

    @property
    def request_id(self) -> str:
        """The idempotency key its Begin was sent with."""
        return self._core.request_id

    @property
    def timeout(self) -> float:
        """Seconds from Begin to the commit decision, as the coordinator set it."""
        return self._core.timeout

    @property
    def state(self) -> TransactionState:
        """ACTIVE; after commit COMMITTING or COMMITTED; after a rollback or an abort ABORTED (or
        ABORTING); PREPARING when the commit got no answer (outcome unknown)."""
        return self._core.state

    def __repr__(self) -> str:
        return f"Transaction({self.txid!r}, {self.state.name})"

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action = self._core.exit_action(failed=exc is not None)
        if action is ExitAction.COMMIT:
            self.commit(wait_for_phase2=self._core.exit_wait_for_phase2)
        elif action is ExitAction.ROLLBACK:
            self._rollback_quietly()
        elif action is ExitAction.ROLLBACK_AND_RAISE:
            self._rollback_quietly()
            raise self._core.in_doubt_error()

    def execute(self, participant: str, sql: str, params: Sequence[object] = ()) -> Result:
        """Runs one statement on ``participant``.

        Raises:
            StatementFailed: the statement failed; the transaction is rolled back everywhere.
            TransactionAborted: the transaction was rolled back (e.g. its timeout passed).
            InvalidArgument: twopc refuses the statement; the transaction is as it was.
            FailedPrecondition: the transaction is committed or rolled back already.
            Unavailable, DeadlineExceeded: no answer after retries; the transaction can then
                only be rolled back.
        """
        return self.execute_many(participant, [(sql, params)])[0]

    def execute_many(self, participant: str, statements: Sequence[StatementLike]) -> list[Result]:
        """Runs statements on ``participant`` in one request; raises as ``execute`` does."""
        request = self._core.execute_request(participant, statements)
        try:
            response = self._client._call(
                "Execute", lambda s: s.Execute, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            self._core.execute_failed(error)
            raise
        return self._core.execute_done(request, response)

    def publish(
        self,
        queue: str,
        body: bytes | str,
        *,
        key: str | None = None,
        participant: str | None = None,
    ) -> str:
        """Publishes a message to ``queue`` if and when this transaction commits, never if it
        aborts: a row of the outbox table on ``participant`` (default: the client's
        ``outbox``), which ``twopc relay`` sends to RabbitMQ after the commit.

        Returns:
            The message's id, ``<txid>.<n>``: a consumer drops a delivery whose id it has seen
            (the relay may send a message again after a crash).

        Raises:
            InvalidArgument: no outbox participant, an empty queue name, a body over 1 MiB.
            What ``execute`` raises.
        """
        target = participant or self._client.outbox
        if not target:
            raise no_outbox(self.txid)
        message = outbox_message(self.txid, self._core.next_message(), queue, body, key)
        self.execute(target, message.sql, message.params)
        return message.message_id

    def commit(self, *, wait_for_phase2: bool = False) -> TransactionState:
        """Two-phase commit of everything executed.

        Returns:
            COMMITTING (decided, durably; phase 2 runs on) or, with ``wait_for_phase2``,
            COMMITTED.

        Raises:
            TransactionAborted: a participant voted no; nothing was committed.
            OutcomeUnknown: no answer after retries, and GetTransaction could not tell either.
            FailedPrecondition: committed or rolled back already.
        """
        request = self._core.commit_request(wait_for_phase2)
        try:
            response = self._client._call(
                "Commit", lambda s: s.Commit, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            info = self._client._lookup(self.txid) if is_transport_failure(error) else None
            return self._core.commit_failed(error, info)
        return self._core.commit_done(response)

    def rollback(self) -> TransactionState:
        """Rolls back; does nothing when the transaction is rolled back already.

        Raises:
            FailedPrecondition: the transaction is committed.
        """
        request = self._core.rollback_request()
        if request is None:
            return self._core.state
        try:
            response = self._client._call(
                "Rollback", lambda s: s.Rollback, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            self._core.rollback_failed(error)
            raise
        return self._core.rollback_done(response)

    def _rollback_quietly(self) -> None:
        try:
            self.rollback()
        except Exception as error:  # best effort: the block's own error matters more
            logger.warning(
                "rollback of %s failed: %s; the coordinator rolls it back at its timeout",
                self.txid,
                type(error).__name__,
            )
