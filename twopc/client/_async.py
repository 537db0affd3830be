"""The asyncio client: ``AsyncClient`` and its ``AsyncTransaction``.

The same behaviour as ``_sync`` (see there and ``_common``); only the waiting differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TypeAlias, TypeVar

import grpc
from grpc import aio

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

# The method of a stub that a call sends (a string: the async stub class exists for type
# checkers only, and grpc's classes are not generic at run time).
Pick: TypeAlias = "Callable[[pb_grpc.CoordinatorAsyncStub], aio.UnaryUnaryMultiCallable[Req, Resp]]"


class AsyncClient:
    """An asyncio client of a twopc coordinator, or of a coordinator group, over one long-lived
    ``grpc.aio`` channel per endpoint, with the same failover as ``Client``.

    Create it inside the event loop that uses it (``async with AsyncClient(...) as client``).
    Arguments as for ``Client``; ``sleep`` is a coroutine function (``asyncio.sleep``).
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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = random.random,
        honor_retry_after: bool = True,
    ) -> None:
        endpoints = parse_endpoints(target)
        self._target = describe(endpoints)
        secure, tls_options = client_transport(
            tls=tls,
            credentials=credentials,
            insecure=insecure,
            what=f"AsyncClient({self._target})",
        )
        if secure is None:
            logger.warning(
                "%s(%s, insecure=True): plaintext, no TLS: requests, results and the caller's "
                "identity travel unprotected",
                "AsyncClient",
                self._target,
            )
        self._credentials = secure
        self._options = channel_options_with([*tls_options, *channel_options])
        self._endpoints = Endpoints(endpoints)
        # After a commit's answers were lost: one GetTransaction on each endpoint, no waits.
        self._lookups = RetryPolicy(attempts=len(endpoints), initial_backoff=0.0, max_backoff=0.0)
        # One channel per endpoint, made at its first call (in the event loop that uses it).
        self._channels: dict[int, aio.Channel] = {}
        self._stubs: dict[int, pb_grpc.CoordinatorAsyncStub] = {}
        self._retry = retry_policy or RetryPolicy()
        self._rpc_timeout = rpc_timeout
        self._conflict_retries = conflict_retries
        self.outbox = outbox
        self._sleep = sleep
        self._clock = clock
        self._random = random
        self._hold = AdmissionHold(clock) if honor_retry_after else None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self._target})"

    @property
    def endpoint(self) -> str:
        """The endpoint that calls not bound to a transaction go to (see ``Client.endpoint``)."""
        return self._endpoints.all[self._endpoints.current]

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint, in the order given."""
        return self._endpoints.all

    async def close(self) -> None:
        """Closes the channels; calls in flight are cancelled. Idempotent."""
        if not self._closed:
            self._closed = True
            for channel in list(self._channels.values()):
                await channel.close(None)

    # ---------------------------------------------------------------------------------------------

    async def begin(
        self,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncTransaction:
        """Starts an interactive transaction (see ``Client.begin``)."""
        return await self._begin(timeout, request_id, wait_for_phase2=False)

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        wait_for_phase2: bool = False,
    ) -> AsyncIterator[AsyncTransaction]:
        """Begins a transaction for an ``async with`` block (see ``Client.transaction``)."""
        async with await self._begin(timeout, request_id, wait_for_phase2) as tx:
            yield tx

    async def run(
        self,
        work: Work,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        wait_for_phase2: bool = False,
    ) -> RunResult:
        """Runs a one-shot transaction (see ``Client.run``)."""
        first = request_id_or_new(request_id)
        started = self._clock()
        failures = 0
        while True:
            rid = retry_request_id(first, failures) if failures else first
            request = run_request(work, timeout, rid, wait_for_phase2)
            try:
                response = await self._call("RunTransaction", lambda s: s.RunTransaction, request)
            except TwopcError as error:
                if is_transport_failure(error):
                    raise run_outcome_unknown(error, rid) from error
                failures += 1
                delay = self._conflict_delay(error, failures, started)
                if delay is None:
                    raise
                await self._sleep(delay)
                continue
            return run_result_from_pb(request, response)

    async def run_in_transaction(
        self,
        work: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        timeout: float | None = None,
        wait_for_phase2: bool = False,
    ) -> T:
        """Runs ``await work(tx)`` in an interactive transaction and commits it, again in a new
        transaction after a lost lock conflict as ``conflict_retries`` allows (see
        ``Client.run_in_transaction``)."""
        started = self._clock()
        failures = 0
        while True:
            try:
                async with self.transaction(timeout=timeout, wait_for_phase2=wait_for_phase2) as tx:
                    return await work(tx)
            except TwopcError as error:
                failures += 1
                delay = self._conflict_delay(error, failures, started)
                if delay is None:
                    raise
            await self._sleep(delay)

    def _conflict_delay(self, error: TwopcError, failures: int, started: float) -> float | None:
        if self._conflict_retries is None:
            return None
        elapsed = self._clock() - started
        return self._conflict_retries.delay_after(error, failures, elapsed, self._random)

    async def get_transaction(
        self, txid: str | None = None, *, request_id: str | None = None
    ) -> TransactionInfo:
        """The state and outcome of a transaction (see ``Client.get_transaction``)."""
        request = get_transaction_request(txid, request_id)
        info = await self._call(
            "GetTransaction", lambda s: s.GetTransaction, request, txid=txid or ""
        )
        return info_from_pb(info)

    # ---------------------------------------------------------------------------------------------

    def _stub(self, index: int, txid: str) -> pb_grpc.CoordinatorAsyncStub:
        """The stub of the endpoint at ``index``, its channel made at the first call."""
        if self._closed:
            raise FailedPrecondition(f"the client of {self._target} is closed", txid=txid)
        stub = self._stubs.get(index)
        if stub is None:
            target = self._endpoints.all[index]
            if self._credentials is None:
                channel = aio.insecure_channel(target, options=self._options)
            else:
                channel = aio.secure_channel(target, self._credentials, options=self._options)
            self._channels[index] = channel
            stub = self._stubs[index] = pb_grpc.CoordinatorStub(channel)
        return stub

    async def _call(
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
        default) allows, failing over as ``Client._call`` does; every gRPC error comes out as a
        ``TwopcError`` raised from it."""
        sent = await self._send(method, pick, request, txid=txid, policy=policy, endpoint=endpoint)
        return sent[0]

    async def _send(
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
                response = await callable_(
                    request, timeout=self._rpc_timeout, metadata=trace_context
                )
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
            await self._sleep(delay)

    async def _begin(
        self, timeout: float | None, request_id: str | None, wait_for_phase2: bool
    ) -> AsyncTransaction:
        rid = request_id_or_new(request_id)
        response, index = await self._send(
            "Begin",
            lambda s: s.Begin,
            begin_request(timeout, rid),
            txid="",
            policy=None,
            endpoint=None,
        )
        core = TransactionCore(response, rid, wait_for_phase2, self._endpoints.all[index])
        return AsyncTransaction(self, core, index)

    async def _lookup(self, txid: str) -> TransactionInfo | None:
        """GetTransaction tried once on each endpoint, no waits: None when it fails on all."""
        try:
            request = get_transaction_request(txid, None)
            info = await self._call(
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


class AsyncTransaction:
    """An interactive transaction of an ``AsyncClient`` (see ``Transaction``)."""

    def __init__(self, client: AsyncClient, core: TransactionCore, endpoint: int) -> None:
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
        """As ``Transaction.state``."""
        return self._core.state

    def __repr__(self) -> str:
        return f"AsyncTransaction({self.txid!r}, {self.state.name})"

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        action = self._core.exit_action(failed=exc is not None)
        if action is ExitAction.COMMIT:
            await self.commit(wait_for_phase2=self._core.exit_wait_for_phase2)
        elif action is ExitAction.ROLLBACK:
            await self._rollback_quietly()
        elif action is ExitAction.ROLLBACK_AND_RAISE:
            await self._rollback_quietly()
            raise self._core.in_doubt_error()

    async def execute(self, participant: str, sql: str, params: Sequence[object] = ()) -> Result:
        """Runs one statement on ``participant`` (see ``Transaction.execute``)."""
        return (await self.execute_many(participant, [(sql, params)]))[0]

    async def execute_many(
        self, participant: str, statements: Sequence[StatementLike]
    ) -> list[Result]:
        """Runs statements on ``participant`` in one request."""
        request = self._core.execute_request(participant, statements)
        try:
            response = await self._client._call(
                "Execute", lambda s: s.Execute, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            self._core.execute_failed(error)
            raise
        return self._core.execute_done(request, response)

    async def publish(
        self,
        queue: str,
        body: bytes | str,
        *,
        key: str | None = None,
        participant: str | None = None,
    ) -> str:
        """Publishes a message when this transaction commits (see ``Transaction.publish``)."""
        target = participant or self._client.outbox
        if not target:
            raise no_outbox(self.txid)
        message = outbox_message(self.txid, self._core.next_message(), queue, body, key)
        await self.execute(target, message.sql, message.params)
        return message.message_id

    async def commit(self, *, wait_for_phase2: bool = False) -> TransactionState:
        """Two-phase commit of everything executed (see ``Transaction.commit``)."""
        request = self._core.commit_request(wait_for_phase2)
        try:
            response = await self._client._call(
                "Commit", lambda s: s.Commit, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            info = await self._client._lookup(self.txid) if is_transport_failure(error) else None
            return self._core.commit_failed(error, info)
        return self._core.commit_done(response)

    async def rollback(self) -> TransactionState:
        """Rolls back; does nothing when rolled back already (see ``Transaction.rollback``)."""
        request = self._core.rollback_request()
        if request is None:
            return self._core.state
        try:
            response = await self._client._call(
                "Rollback", lambda s: s.Rollback, request, txid=self.txid, endpoint=self._endpoint
            )
        except TwopcError as error:
            self._core.rollback_failed(error)
            raise
        return self._core.rollback_done(response)

    async def _rollback_quietly(self) -> None:
        try:
            await self.rollback()
        except Exception as error:  # best effort: the block's own error matters more
            logger.warning(
                "rollback of %s failed: %s; the coordinator rolls it back at its timeout",
                self.txid,
                type(error).__name__,
            )
