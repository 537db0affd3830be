"""The blocking client: ``Client`` and its ``Transaction``."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar

import grpc

from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client._common import (
    DEFAULT_RPC_TIMEOUT,
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
from twopc.errors import FailedPrecondition, TwopcError
from twopc.status import error_from_rpc, is_transport_failure
from twopc.tls import TlsConfig, client_transport
from twopc.tracing import outgoing_metadata

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_NO_RETRY = RetryPolicy(attempts=1)


class Client:
    """A blocking client of a twopc coordinator, over one long-lived gRPC channel.

    Thread-safe (one ``Client`` may serve many threads); a ``Transaction`` is not.

    Give exactly one of ``tls``, ``credentials`` or ``insecure=True``: the coordinator runs
    mutual TLS unless it is set to plaintext.

    Args:
        target: the coordinator's address, ``host:port``.
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
        sleep: waits between retries (replaceable in tests).
        clock: a monotonic clock in seconds, for the retry deadline (replaceable in tests).
        random: a float in [0, 1) for the jitter of conflict retries (replaceable in tests).
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Iterable[ChannelOption] = (),
        retry_policy: RetryPolicy | None = None,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        conflict_retries: ConflictRetry | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
    ) -> None:
        secure, tls_options = client_transport(
            tls=tls, credentials=credentials, insecure=insecure, what=f"Client({target!r})"
        )
        options = channel_options_with([*tls_options, *channel_options])
        if secure is None:
            logger.warning(
                "%s(%r, insecure=True): plaintext, no TLS: requests, results and the caller's "
                "identity travel unprotected",
                "Client",
                target,
            )
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, secure, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._target = target
        self._retry = retry_policy or RetryPolicy()
        self._rpc_timeout = rpc_timeout
        self._conflict_retries = conflict_retries
        self._sleep = sleep
        self._clock = clock
        self._random = random
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
        return f"Client({self._target!r})"

    def close(self) -> None:
        """Closes the channel; calls in flight fail. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

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
                response = self._call("RunTransaction", self._stub.RunTransaction, request)
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
        info = self._call("GetTransaction", self._stub.GetTransaction, request, txid=txid or "")
        return info_from_pb(info)

    # ---------------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        callable_: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        txid: str = "",
        retry: bool = True,
    ) -> Resp:
        """Sends ``request``, again on transport failures as the retry policy allows; every gRPC
        error comes out as a ``TwopcError`` raised from it."""
        if self._closed:
            raise FailedPrecondition(f"the client of {self._target} is closed", txid=txid)
        policy = self._retry if retry else _NO_RETRY
        tracker = RetryTracker(policy, self._clock, method, txid)
        # The caller's trace context (OpenTelemetry, when installed), the same on every try.
        trace_context = outgoing_metadata()
        while True:
            try:
                return callable_(request, timeout=self._rpc_timeout, metadata=trace_context)
            except grpc.RpcError as rpc_error:
                error = with_txid(error_from_rpc(rpc_error), txid)
                delay = tracker.next_delay(error)
                if delay is None:
                    raise error from rpc_error
            self._sleep(delay)

    def _begin(
        self, timeout: float | None, request_id: str | None, wait_for_phase2: bool
    ) -> Transaction:
        rid = request_id_or_new(request_id)
        response = self._call("Begin", self._stub.Begin, begin_request(timeout, rid))
        return Transaction(self, TransactionCore(response, rid, wait_for_phase2))

    def _lookup(self, txid: str) -> TransactionInfo | None:
        """One GetTransaction, no retries: None when it fails too."""
        try:
            request = get_transaction_request(txid, None)
            info = self._call(
                "GetTransaction", self._stub.GetTransaction, request, txid=txid, retry=False
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

    def __init__(self, client: Client, core: TransactionCore) -> None:
        self._client = client
        self._core = core

    @property
    def txid(self) -> str:
        return self._core.txid

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
                "Execute", self._client._stub.Execute, request, txid=self.txid
            )
        except TwopcError as error:
            self._core.execute_failed(error)
            raise
        return self._core.execute_done(request, response)

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
                "Commit", self._client._stub.Commit, request, txid=self.txid
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
                "Rollback", self._client._stub.Rollback, request, txid=self.txid
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
