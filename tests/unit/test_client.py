"""The SDK (twopc.client) against a fake Coordinator servicer on a real gRPC server.

The fake runs on a ``grpc.aio`` server in a thread of its own (on 127.0.0.1, port 0) and is shared
by the blocking and the asyncio client. Like python-spanner's mock servicer it records every
request and fails the next calls of a method on demand (``add_error``), before doing the work or
after it (an answer lost on the way back). Sleeping and the clock are fakes: nothing here waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import decimal
import itertools
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio

import twopc
import twopc.client
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import (
    AsyncClient,
    AsyncTransaction,
    Client,
    ConflictRetry,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Outcome,
    OutcomeUnknown,
    Result,
    RetryPolicy,
    StatementFailed,
    Transaction,
    TransactionAborted,
    TransactionConflict,
    TransactionInfo,
    TransactionState,
    TwopcError,
    Unavailable,
    _common,
)
from twopc.client._common import retry_request_id
from twopc.errors import CircuitOpen
from twopc.status import abort_with
from twopc.values import to_values

T = TypeVar("T")
Fault = TwopcError | grpc.StatusCode

LOST = Unavailable("connection reset by peer")  # what a lost answer looks like to the client
RPC_TIMEOUT = 7.0

# --------------------------------------------------------------------------------------------------
# The fake coordinator
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeTx:
    txid: str
    state: pb.TransactionState.ValueType = pb.TRANSACTION_STATE_ACTIVE
    participants: list[str] = dataclasses.field(default_factory=list)
    abort_reason: str = ""


_OUTCOME_OF = {
    pb.TRANSACTION_STATE_ACTIVE: pb.OUTCOME_PENDING,
    pb.TRANSACTION_STATE_PREPARING: pb.OUTCOME_PENDING,
    pb.TRANSACTION_STATE_COMMITTING: pb.OUTCOME_COMMITTED,
    pb.TRANSACTION_STATE_COMMITTED: pb.OUTCOME_COMMITTED,
    pb.TRANSACTION_STATE_ABORTING: pb.OUTCOME_ABORTED,
    pb.TRANSACTION_STATE_ABORTED: pb.OUTCOME_ABORTED,
}


def echo_results(statements: Any) -> list[pb.StatementResult]:
    """One result per statement: a row holding its parameters as they arrived."""
    return [
        pb.StatementResult(
            affected_rows=1,
            last_insert_id=index + 1,
            columns=[f"p{i}" for i in range(len(st.params))],
            rows=[pb.Row(values=st.params)] if st.params else [],
        )
        for index, st in enumerate(statements)
    ]


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    """A Coordinator that keeps transactions in a dict and fails on demand."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, list[Any]] = defaultdict(list)
        self.time_remaining: dict[str, list[float | None]] = defaultdict(list)
        self.txs: dict[str, FakeTx] = {}
        self.by_request: dict[str, str] = {}
        self.runs = 0  # statements batches actually run (not answered from the replay cache)
        self._errors: dict[str, deque[tuple[Fault, bool]]] = defaultdict(deque)
        self._responses: dict[str, deque[Any]] = defaultdict(deque)
        self._answers: dict[tuple[object, ...], Any] = {}
        self._ids = itertools.count(1)

    # what tests call

    def add_error(self, method: str, error: Fault, *, times: int = 1, after: bool = False) -> None:
        """Fails the next ``times`` calls of ``method``: before doing anything, or (``after``)
        once the work is done, so that only the answer is lost."""
        self._errors[method].extend([(error, after)] * times)

    def add_response(self, method: str, response: Any) -> None:
        """The next call of ``method`` answers ``response`` (Execute, GetTransaction)."""
        self._responses[method].append(response)

    def count(self, method: str) -> int:
        return len(self.requests[method])

    # helpers

    async def _enter(self, method: str, request: Any, context: Any) -> None:
        self.requests[method].append(request)
        self.time_remaining[method].append(context.time_remaining())
        await self._maybe_fail(method, context, after=False)

    async def _maybe_fail(self, method: str, context: Any, *, after: bool) -> None:
        queue = self._errors[method]
        if not queue or queue[0][1] != after:
            return
        error, _ = queue.popleft()
        if isinstance(error, grpc.StatusCode):  # a bare status, as a proxy or grpc itself sends
            await context.abort(error, f"injected {error.name}")
        else:
            await abort_with(context, error)

    async def _tx(self, txid: str, context: Any) -> FakeTx:
        tx = self.txs.get(txid)
        if tx is None:
            await abort_with(context, NotFound(f"no transaction {txid}", txid=txid))
        assert tx is not None
        return tx

    # the service

    async def Begin(self, request: pb.BeginRequest, context: Any) -> pb.BeginResponse:
        await self._enter("Begin", request, context)
        txid = self.by_request.get(request.request_id) or f"c1.{next(self._ids):032x}"
        self.txs.setdefault(txid, FakeTx(txid))
        if request.request_id:
            self.by_request[request.request_id] = txid
        await self._maybe_fail("Begin", context, after=True)
        return pb.BeginResponse(txid=txid, timeout_ms=request.timeout_ms or 10_000)

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        await self._enter("Execute", request, context)
        key = ("Execute", request.txid, request.participant, request.sequence)
        if key not in self._answers:
            tx = await self._tx(request.txid, context)
            if tx.state != pb.TRANSACTION_STATE_ACTIVE:
                await abort_with(context, FailedPrecondition("not active", txid=tx.txid))
            if request.participant not in tx.participants:
                tx.participants.append(request.participant)
            self.runs += 1
            queued = self._responses["Execute"]
            self._answers[key] = (
                queued.popleft()
                if queued
                else pb.ExecuteResponse(results=echo_results(request.statements))
            )
        await self._maybe_fail("Execute", context, after=True)
        return self._answers[key]

    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        await self._enter("Commit", request, context)
        tx = await self._tx(request.txid, context)
        if tx.state == pb.TRANSACTION_STATE_ACTIVE:
            tx.state = (
                pb.TRANSACTION_STATE_COMMITTED
                if request.wait_for_phase2
                else pb.TRANSACTION_STATE_COMMITTING
            )
        elif _OUTCOME_OF[tx.state] != pb.OUTCOME_COMMITTED:
            await abort_with(context, TransactionAborted("aborted", txid=tx.txid))
        await self._maybe_fail("Commit", context, after=True)
        return pb.CommitResponse(txid=tx.txid, state=tx.state)

    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.RollbackResponse:
        await self._enter("Rollback", request, context)
        tx = await self._tx(request.txid, context)
        if _OUTCOME_OF[tx.state] == pb.OUTCOME_COMMITTED:
            await abort_with(context, FailedPrecondition("committed", txid=tx.txid))
        tx.state = pb.TRANSACTION_STATE_ABORTED
        await self._maybe_fail("Rollback", context, after=True)
        return pb.RollbackResponse(txid=tx.txid, state=tx.state)

    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Any
    ) -> pb.TransactionInfo:
        await self._enter("GetTransaction", request, context)
        if self._responses["GetTransaction"]:
            return self._responses["GetTransaction"].popleft()
        txid = request.txid or self.by_request.get(request.request_id, "")
        tx = await self._tx(txid, context)
        return pb.TransactionInfo(
            txid=tx.txid,
            state=tx.state,
            outcome=_OUTCOME_OF[tx.state],
            participants=tx.participants,
            abort_reason=tx.abort_reason,
            presumed=False,
        )

    async def RunTransaction(
        self, request: pb.RunTransactionRequest, context: Any
    ) -> pb.RunTransactionResponse:
        await self._enter("RunTransaction", request, context)
        key = ("RunTransaction", request.request_id)
        if key not in self._answers:
            txid = f"c1.r-{request.request_id}"
            state = (
                pb.TRANSACTION_STATE_COMMITTED
                if request.wait_for_phase2
                else pb.TRANSACTION_STATE_COMMITTING
            )
            participants = [work.participant for work in request.work]
            self.txs[txid] = FakeTx(txid, state, participants)
            self.by_request[request.request_id] = txid
            self.runs += 1
            self._answers[key] = pb.RunTransactionResponse(
                txid=txid,
                state=state,
                results=[
                    pb.ParticipantResults(
                        participant=work.participant, results=echo_results(work.statements)
                    )
                    for work in request.work
                ],
            )
        await self._maybe_fail("RunTransaction", context, after=True)
        return self._answers[key]


class ServerThread:
    """A ``grpc.aio`` server with the fake, on an event loop in a thread of its own."""

    def __init__(self, servicer: FakeCoordinator) -> None:
        self._servicer = servicer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-coordinator")
        self._server: aio.Server | None = None
        self.target = ""

    def start(self) -> None:
        self._thread.start()
        port = self._run(self._start())
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> int:
        self._server = aio.server()
        pb_grpc.add_CoordinatorServicer_to_server(self._servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def _stop(self) -> None:
        assert self._server is not None
        await self._server.stop(None)
        await self._server.wait_for_termination()


class FakeTime:
    """A clock that only sleeping moves; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, FakeCoordinator]]:
    servicer = FakeCoordinator()
    thread = ServerThread(servicer)
    thread.start()
    yield thread, servicer
    thread.stop()


@pytest.fixture
def fake(server: tuple[ServerThread, FakeCoordinator]) -> FakeCoordinator:
    servicer = server[1]
    servicer.reset()
    return servicer


@pytest.fixture
def target(server: tuple[ServerThread, FakeCoordinator]) -> str:
    return server[0].target


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def client(target: str, fake: FakeCoordinator, fake_time: FakeTime) -> Iterator[Client]:
    with Client(
        target, insecure=True, sleep=fake_time.sleep, clock=fake_time.clock, rpc_timeout=RPC_TIMEOUT
    ) as c:
        yield c


def run_async(
    target: str, fake_time: FakeTime, body: Callable[[AsyncClient], Coroutine[Any, Any, T]]
) -> T:
    """Runs ``body`` with an AsyncClient made (and closed) inside a fresh event loop."""

    async def main() -> T:
        async with AsyncClient(
            target,
            insecure=True,
            sleep=fake_time.async_sleep,
            clock=fake_time.clock,
            rpc_timeout=RPC_TIMEOUT,
        ) as async_client:
            return await body(async_client)

    return asyncio.run(main())


class Boom(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert twopc.client.__all__ == [
        "AsyncClient",
        "AsyncTransaction",
        "Client",
        "ConflictRetry",
        "DeadlineExceeded",
        "FailedPrecondition",
        "Internal",
        "InvalidArgument",
        "NotFound",
        "Outcome",
        "OutcomeUnknown",
        "PermissionDenied",
        "ResourceExhausted",
        "Result",
        "RetryPolicy",
        "RunResult",
        "StatementFailed",
        "TlsConfig",
        "Transaction",
        "TransactionAborted",
        "TransactionConflict",
        "TransactionInfo",
        "TransactionState",
        "TwopcError",
        "Unavailable",
    ]
    for name in twopc.client.__all__:
        assert getattr(twopc.client, name).__module__.startswith("twopc.")


def test_the_package_is_the_sdk() -> None:
    """``from twopc import Client`` and the rest: the package's face is the SDK, name for name."""
    assert twopc.__all__ == twopc.client.__all__
    for name in twopc.__all__:
        assert getattr(twopc, name) is getattr(twopc.client, name)


def test_every_wire_state_and_outcome_has_an_enum_member() -> None:
    states = [v for v in pb.TransactionState.values() if v != pb.TRANSACTION_STATE_UNSPECIFIED]
    assert {_common.state_from_pb(v) for v in states} == set(TransactionState)
    outcomes = [v for v in pb.Outcome.values() if v != pb.OUTCOME_UNSPECIFIED]
    assert {_common.outcome_from_pb(v) for v in outcomes} == set(Outcome)
    with pytest.raises(Internal):
        _common.state_from_pb(pb.TRANSACTION_STATE_UNSPECIFIED)


# --------------------------------------------------------------------------------------------------
# Interactive transactions (blocking)
# --------------------------------------------------------------------------------------------------


def test_with_block_commits_on_clean_exit(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction(timeout=5.0) as tx:
        assert tx.state is TransactionState.ACTIVE
        tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = %s", [5, 1])

    assert tx.state is TransactionState.COMMITTING
    (begin,) = fake.requests["Begin"]
    assert begin.timeout_ms == 5000
    assert len(begin.request_id) == 32
    assert tx.request_id == begin.request_id
    assert tx.timeout == 5.0
    (commit,) = fake.requests["Commit"]
    assert commit.txid == tx.txid
    assert not commit.wait_for_phase2
    assert fake.count("Rollback") == 0


def test_with_block_can_wait_for_phase2(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction(wait_for_phase2=True) as tx:
        tx.execute("eu", "SELECT 1")
    assert tx.state is TransactionState.COMMITTED
    assert fake.requests["Commit"][0].wait_for_phase2
    assert fake.requests["Begin"][0].timeout_ms == 0  # the coordinator's default


def test_with_block_rolls_back_on_exception_and_reraises_it(
    client: Client, fake: FakeCoordinator
) -> None:
    error = Boom("application bug")
    seen: list[Transaction] = []

    def block() -> None:
        with client.transaction() as tx:
            seen.append(tx)
            tx.execute("eu", "UPDATE t SET x = 1")
            raise error

    with pytest.raises(Boom) as raised:
        block()
    assert raised.value is error
    (tx,) = seen
    assert tx.state is TransactionState.ABORTED
    assert [r.txid for r in fake.requests["Rollback"]] == [tx.txid]
    assert fake.count("Commit") == 0


def test_failed_rollback_never_masks_the_original_exception(
    client: Client, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_error("Rollback", Internal("disk on fire"))
    with pytest.raises(Boom), client.transaction() as tx:
        raise Boom
    assert fake.count("Rollback") == 1
    assert any("rollback of " + tx.txid in r.getMessage() for r in caplog.records)


def test_explicit_commit_inside_the_block_ends_it(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction() as tx:
        tx.execute("eu", "SELECT 1")
        assert tx.commit(wait_for_phase2=True) is TransactionState.COMMITTED
    assert fake.count("Commit") == 1
    assert fake.count("Rollback") == 0
    assert tx.state is TransactionState.COMMITTED


def test_explicit_rollback_inside_the_block_ends_it(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction() as tx:
        tx.execute("eu", "SELECT 1")
        assert tx.rollback() is TransactionState.ABORTED
    assert fake.count("Commit") == 0
    assert fake.count("Rollback") == 1


def test_begin_without_with(client: Client, fake: FakeCoordinator) -> None:
    tx = client.begin(request_id="order-42")
    tx.execute("eu", "INSERT INTO t VALUES (%s)", [1])
    assert tx.commit() is TransactionState.COMMITTING
    assert fake.requests["Begin"][0].request_id == "order-42"
    assert tx.txid == fake.by_request["order-42"]


def test_use_after_commit_is_refused_locally(client: Client, fake: FakeCoordinator) -> None:
    tx = client.begin()
    tx.commit()
    with pytest.raises(FailedPrecondition, match="it is committed") as raised:
        tx.execute("eu", "SELECT 1")
    assert raised.value.txid == tx.txid
    with pytest.raises(FailedPrecondition):
        tx.commit()
    with pytest.raises(FailedPrecondition):
        tx.rollback()
    assert fake.count("Execute") == 0
    assert fake.count("Commit") == 1
    assert fake.count("Rollback") == 0


def test_use_after_rollback_is_refused_and_rollback_again_is_a_no_op(
    client: Client, fake: FakeCoordinator
) -> None:
    tx = client.begin()
    tx.rollback()
    with pytest.raises(TransactionAborted, match="aborted"):
        tx.execute("eu", "SELECT 1")
    with pytest.raises(TransactionAborted):
        tx.commit()
    assert tx.rollback() is TransactionState.ABORTED
    assert fake.count("Rollback") == 1


def test_execute_converts_parameters_and_rows(client: Client, fake: FakeCoordinator) -> None:
    params = [
        7,
        2**64 - 1,
        decimal.Decimal("-12.50"),
        b"\x00\xff",
        None,
        dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
        dt.date(2024, 1, 2),
        "héllo",
        True,
        1.5,
    ]
    with client.transaction() as tx:
        result = tx.execute("eu", "SELECT %s", params)

    kinds = [v.WhichOneof("kind") for v in fake.requests["Execute"][0].statements[0].params]
    assert kinds == [
        "int_value",
        "uint_value",
        "decimal_value",
        "bytes_value",
        "null_value",
        "datetime_value",
        "date_value",
        "text_value",
        "bool_value",
        "double_value",
    ]
    assert isinstance(result, Result)
    assert result.rows == [tuple(params)]
    assert result.columns == [f"p{i}" for i in range(len(params))]
    assert result.affected_rows == 1
    assert result.last_insert_id == 1
    assert result.scalar() == 7
    assert type(result.rows[0][2]) is decimal.Decimal


def test_execute_returns_what_the_coordinator_sent(client: Client, fake: FakeCoordinator) -> None:
    fake.add_response(
        "Execute",
        pb.ExecuteResponse(
            results=[
                pb.StatementResult(
                    affected_rows=0,
                    columns=["id", "balance"],
                    rows=[pb.Row(values=to_values([1, decimal.Decimal("10.00")]))],
                )
            ]
        ),
    )
    fake.add_response("Execute", pb.ExecuteResponse(results=[pb.StatementResult()]))
    with client.transaction() as tx:
        rows = tx.execute("eu", "SELECT id, balance FROM accounts WHERE id = %s", [1])
        empty = tx.execute("eu", "SELECT 1 WHERE FALSE")
    assert rows.rows == [(1, decimal.Decimal("10.00"))]
    assert rows.scalar() == 1
    assert empty.rows == []
    assert empty.scalar() is None


def test_execute_many_is_one_request(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction() as tx:
        results = tx.execute_many(
            "us", [("UPDATE a SET b = %s WHERE id = %s", [5, 2]), "DELETE FROM c"]
        )
    assert len(results) == 2
    assert results[0].rows == [(5, 2)]
    (request,) = fake.requests["Execute"]
    assert [s.sql for s in request.statements] == [
        "UPDATE a SET b = %s WHERE id = %s",
        "DELETE FROM c",
    ]


def test_sequence_numbers_count_per_participant(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction() as tx:
        for participant in ["eu", "eu", "us", "eu", "us"]:
            tx.execute(participant, "SELECT 1")
    sent = [(r.participant, r.sequence) for r in fake.requests["Execute"]]
    assert sent == [("eu", 1), ("eu", 2), ("us", 1), ("eu", 3), ("us", 2)]


def test_a_statement_refused_locally_uses_no_sequence_number(
    client: Client, fake: FakeCoordinator
) -> None:
    with client.transaction() as tx:
        with pytest.raises(InvalidArgument):
            tx.execute("eu", "SELECT %s", [object()])
        with pytest.raises(InvalidArgument, match="list or tuple"):
            tx.execute("eu", "SELECT %s", "abc")
        with pytest.raises(InvalidArgument, match="no statements"):
            tx.execute_many("eu", [])
        tx.execute("eu", "SELECT 1")
    assert [r.sequence for r in fake.requests["Execute"]] == [1]


def test_execute_retry_repeats_the_sequence_number(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Execute", LOST, after=True)  # ran, but the answer was lost
    with client.transaction() as tx:
        first = tx.execute("eu", "INSERT INTO t VALUES (%s)", [1])
        fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE)  # never arrived
        tx.execute("eu", "INSERT INTO t VALUES (%s)", [2])
    assert first.rows == [(1,)]
    assert [r.sequence for r in fake.requests["Execute"]] == [1, 1, 2, 2]
    assert fake.runs == 2  # the retried sequence 1 was answered, not run again
    assert fake_time.sleeps == [0.05, 0.05]
    assert tx.state is TransactionState.COMMITTING


def test_begin_retry_repeats_the_request_id(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Begin", grpc.StatusCode.UNAVAILABLE)
    fake.add_error("Begin", LOST, after=True)
    tx = client.begin()
    ids = [r.request_id for r in fake.requests["Begin"]]
    assert len(ids) == 3
    assert len(set(ids)) == 1
    assert len(fake.txs) == 1
    assert tx.txid == fake.by_request[ids[0]]
    assert fake_time.sleeps == [0.05, 0.1]


def test_backoff_grows_to_its_cap_then_gives_up(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    policy = RetryPolicy(attempts=6, initial_backoff=0.1, max_backoff=0.3, multiplier=2.0)
    fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE, times=6)
    with (
        Client(
            target,
            insecure=True,
            retry_policy=policy,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
        ) as c,
        pytest.raises(Unavailable) as raised,
    ):
        c.get_transaction("c1.x")
    assert fake_time.sleeps == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert fake.count("GetTransaction") == 6
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert raised.value.txid == "c1.x"


def test_retries_stop_at_the_deadline(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    policy = RetryPolicy(attempts=100, initial_backoff=0.05, multiplier=2.0, deadline=0.4)
    fake.add_error("GetTransaction", grpc.StatusCode.DEADLINE_EXCEEDED, times=100)
    with (
        Client(
            target,
            insecure=True,
            retry_policy=policy,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
        ) as c,
        pytest.raises(TwopcError),
    ):
        c.get_transaction("c1.x")
    assert fake_time.sleeps == pytest.approx([0.05, 0.1, 0.2])  # 0.35 s; 0.4 more would pass it


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TransactionAborted("participant us voted no"), TransactionAborted),
        (grpc.StatusCode.ABORTED, TransactionAborted),
        (InvalidArgument("only SELECT, INSERT, ..."), InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, twopc.client.ResourceExhausted),
    ],
)
def test_other_errors_are_never_retried(
    client: Client,
    fake: FakeCoordinator,
    fake_time: FakeTime,
    error: Fault,
    expected: type[TwopcError],
) -> None:
    tx = client.begin()
    fake.add_error("Commit", error)
    with pytest.raises(expected) as raised:
        tx.commit()
    assert fake.count("Commit") == 1
    assert fake.count("GetTransaction") == 0
    assert fake_time.sleeps == []
    assert raised.value.txid == tx.txid  # filled in by the SDK when the status had none
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_commit_abort_ends_the_transaction(client: Client, fake: FakeCoordinator) -> None:
    fake.add_error("Commit", TransactionAborted("participant us voted no"))
    with pytest.raises(TransactionAborted, match="voted no"), client.transaction() as tx:
        tx.execute("us", "UPDATE t SET x = 1")
    assert tx.state is TransactionState.ABORTED
    assert fake.count("Rollback") == 0


def test_statement_failure_carries_mysql_errno_and_is_not_retried(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Execute", StatementFailed("Duplicate entry", txid="", mysql_errno=1062))
    seen: list[Transaction] = []

    def block() -> None:
        with client.transaction() as tx:
            seen.append(tx)
            tx.execute("eu", "INSERT INTO t VALUES (%s)", [1])
            pytest.fail("not reached")

    with pytest.raises(StatementFailed) as raised:
        block()
    (tx,) = seen
    assert raised.value.mysql_errno == 1062
    assert raised.value.txid == tx.txid
    assert isinstance(raised.value, TransactionAborted)
    assert fake.count("Execute") == 1
    assert fake_time.sleeps == []
    # The coordinator rolled it back already: no Rollback sent, nothing more allowed.
    assert tx.state is TransactionState.ABORTED
    assert fake.count("Rollback") == 0
    with pytest.raises(TransactionAborted, match="Duplicate entry"):
        tx.execute("eu", "SELECT 1")


def test_invalid_statement_leaves_the_transaction_usable(
    client: Client, fake: FakeCoordinator
) -> None:
    fake.add_error("Execute", InvalidArgument("DROP is not allowed"))
    with client.transaction() as tx:
        with pytest.raises(InvalidArgument):
            tx.execute("eu", "DROP TABLE t")
        tx.execute("eu", "SELECT 1")
    assert tx.state is TransactionState.COMMITTING


def test_execute_without_answer_leaves_only_rollback(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE, times=5)
    tx = client.begin()
    with pytest.raises(Unavailable) as raised:
        tx.execute("eu", "UPDATE t SET x = 1")
    assert raised.value.txid == tx.txid
    assert len(fake_time.sleeps) == 4
    with pytest.raises(FailedPrecondition, match="roll it back"):
        tx.commit()
    with pytest.raises(FailedPrecondition):
        tx.execute("eu", "SELECT 1")
    assert tx.rollback() is TransactionState.ABORTED


def test_with_block_rolls_back_when_an_execute_got_no_answer(
    client: Client, fake: FakeCoordinator
) -> None:
    fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE, times=5)
    seen: list[Transaction] = []

    def block() -> None:
        with client.transaction() as tx:
            seen.append(tx)
            with contextlib.suppress(Unavailable):  # the application swallows the error...
                tx.execute("eu", "UPDATE t SET x = 1")
        # ... yet the block must not commit a transaction that may lack a statement

    with pytest.raises(TransactionAborted, match="no answer"):
        block()
    (tx,) = seen
    assert fake.count("Commit") == 0
    assert fake.count("Rollback") == 1
    assert tx.state is TransactionState.ABORTED


# --------------------------------------------------------------------------------------------------
# Commit whose answer is lost
# --------------------------------------------------------------------------------------------------


def test_commit_retried_and_answered(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Commit", LOST, after=True, times=2)
    tx = client.begin()
    assert tx.commit() is TransactionState.COMMITTING
    assert [r.txid for r in fake.requests["Commit"]] == [tx.txid] * 3
    assert fake.count("GetTransaction") == 0
    assert fake_time.sleeps == [0.05, 0.1]


def test_commit_answers_lost_then_get_transaction_says_committed(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Commit", LOST, after=True, times=5)
    with client.transaction(wait_for_phase2=True) as tx:
        tx.execute("eu", "UPDATE t SET x = 1")
    assert tx.state is TransactionState.COMMITTED
    assert fake.count("Commit") == 5
    assert [r.txid for r in fake.requests["GetTransaction"]] == [tx.txid]
    assert fake_time.sleeps == [0.05, 0.1, 0.2, 0.4]


def test_commit_answers_lost_then_get_transaction_says_aborted(
    client: Client, fake: FakeCoordinator
) -> None:
    fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
    tx = client.begin()
    fake.add_response(
        "GetTransaction",
        pb.TransactionInfo(
            txid=tx.txid,
            state=pb.TRANSACTION_STATE_ABORTED,
            outcome=pb.OUTCOME_ABORTED,
            abort_reason="deadline passed",
            presumed=True,
        ),
    )
    with pytest.raises(TransactionAborted, match="deadline passed") as raised:
        tx.commit()
    assert raised.value.txid == tx.txid
    assert isinstance(raised.value.__cause__, Unavailable)
    assert tx.state is TransactionState.ABORTED


def test_commit_outcome_unknown_carries_the_txid(client: Client, fake: FakeCoordinator) -> None:
    fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
    fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    tx = client.begin()
    with pytest.raises(OutcomeUnknown) as raised:
        tx.commit()
    assert raised.value.txid == tx.txid
    assert raised.value.request_id == tx.request_id
    assert isinstance(raised.value.__cause__, Unavailable)
    assert fake.count("GetTransaction") == 1  # one look, no retries
    assert tx.state is TransactionState.PREPARING
    with pytest.raises(FailedPrecondition, match="get_transaction"):
        tx.execute("eu", "SELECT 1")


def test_commit_outcome_unknown_while_still_pending(client: Client, fake: FakeCoordinator) -> None:
    fake.add_error("Commit", grpc.StatusCode.DEADLINE_EXCEEDED, times=5)
    tx = client.begin()
    with pytest.raises(OutcomeUnknown):
        tx.commit()  # the fake still says ACTIVE: PENDING is no answer
    assert fake.count("GetTransaction") == 1


# --------------------------------------------------------------------------------------------------
# One-shot transactions
# --------------------------------------------------------------------------------------------------


def test_run_sends_all_the_work_at_once(client: Client, fake: FakeCoordinator) -> None:
    result = client.run(
        {"eu": [("UPDATE a SET b = b - %s", [1])], "us": ["SELECT 1", ("UPDATE c", [2])]},
        timeout=5.0,
        wait_for_phase2=True,
    )
    (request,) = fake.requests["RunTransaction"]
    assert request.timeout_ms == 5000
    assert request.wait_for_phase2
    assert [(w.participant, len(w.statements)) for w in request.work] == [("eu", 1), ("us", 2)]
    assert result.txid == f"c1.r-{request.request_id}"
    assert result.state is TransactionState.COMMITTED
    assert result.results["eu"][0].rows == [(1,)]
    assert [r.rows for r in result.results["us"]] == [[], [(2,)]]


def test_run_retry_repeats_the_request_id(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", LOST, after=True)
    fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE)
    result = client.run({"eu": ["UPDATE t SET x = 1"]})
    ids = {r.request_id for r in fake.requests["RunTransaction"]}
    assert len(ids) == 1
    assert fake.count("RunTransaction") == 3
    assert fake.runs == 1
    assert result.state is TransactionState.COMMITTING
    assert fake_time.sleeps == [0.05, 0.1]


def test_a_breakers_refusal_is_raised_at_once_unless_an_earlier_try_was_lost(
    client: Client, target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    refusal = CircuitOpen("participant 'us' is failing: its circuit breaker is open")
    fake.add_error("RunTransaction", refusal)
    with pytest.raises(CircuitOpen):
        client.run({"us": ["UPDATE t SET x = 1"]})
    assert fake.count("RunTransaction") == 1  # not retried: nothing ran, the answer came
    # The first try ran and its answer was lost; the retry is refused: that tells nothing of
    # the first, so the caller gets OutcomeUnknown with the request id, blocking and async.
    fake.add_error("RunTransaction", LOST, after=True)
    fake.add_error("RunTransaction", refusal)
    with pytest.raises(OutcomeUnknown, match="an earlier try of this request got no answer"):
        client.run({"us": ["UPDATE t SET x = 1"]}, request_id="transfer-8")
    fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE)
    fake.add_error("RunTransaction", refusal)

    async def body(async_client: AsyncClient) -> None:
        with pytest.raises(OutcomeUnknown, match="an earlier try of this request got no answer"):
            await async_client.run({"us": ["UPDATE t SET x = 1"]}, request_id="transfer-9")

    run_async(target, fake_time, body)


def test_run_outcome_unknown_carries_the_request_id(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", LOST, after=True, times=5)
    with pytest.raises(OutcomeUnknown) as raised:
        client.run({"eu": ["UPDATE t SET x = 1"]}, request_id="transfer-7")
    assert raised.value.request_id == "transfer-7"
    assert isinstance(raised.value.__cause__, Unavailable)
    assert fake.count("RunTransaction") == 5
    assert fake_time.sleeps == [0.05, 0.1, 0.2, 0.4]
    # I6: the caller can find out what happened.
    info = client.get_transaction(request_id="transfer-7")
    assert info.outcome is Outcome.COMMITTED


def test_run_abort_is_raised_at_once(client: Client, fake: FakeCoordinator) -> None:
    fake.add_error("RunTransaction", StatementFailed("Deadlock found", mysql_errno=1213))
    with pytest.raises(StatementFailed) as raised:
        client.run({"eu": ["UPDATE t SET x = 1"]})
    assert raised.value.mysql_errno == 1213
    assert fake.count("RunTransaction") == 1


def test_bad_request_ids_are_refused_before_sending(client: Client, fake: FakeCoordinator) -> None:
    with pytest.raises(InvalidArgument):
        client.run({"eu": ["SELECT 1"]}, request_id="has space")
    with pytest.raises(InvalidArgument):
        client.begin(request_id="x" * 41)
    with pytest.raises(InvalidArgument):
        client.begin(timeout=-1)
    assert fake.count("RunTransaction") == 0
    assert fake.count("Begin") == 0


# --------------------------------------------------------------------------------------------------
# GetTransaction, the channel, logging
# --------------------------------------------------------------------------------------------------


def test_get_transaction_by_txid_and_by_request_id(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction(request_id="abc") as tx:
        tx.execute("eu", "SELECT 1")
        tx.execute("us", "SELECT 1")
    by_txid = client.get_transaction(tx.txid)
    assert by_txid == TransactionInfo(
        txid=tx.txid,
        state=TransactionState.COMMITTING,
        outcome=Outcome.COMMITTED,
        participants=["eu", "us"],
        abort_reason="",
        presumed=False,
    )
    assert client.get_transaction(request_id="abc") == by_txid
    assert fake.requests["GetTransaction"][1].request_id == "abc"


def test_get_transaction_errors(client: Client, fake: FakeCoordinator) -> None:
    with pytest.raises(NotFound) as raised:
        client.get_transaction("c1.nope")
    assert raised.value.txid == "c1.nope"
    with pytest.raises(InvalidArgument):
        client.get_transaction()
    with pytest.raises(InvalidArgument):
        client.get_transaction("c1.x", request_id="y")


def test_every_call_has_the_rpc_timeout(client: Client, fake: FakeCoordinator) -> None:
    with client.transaction() as tx:
        tx.execute("eu", "SELECT 1")
    client.get_transaction(tx.txid)
    for method in ("Begin", "Execute", "Commit", "GetTransaction"):
        (remaining,) = fake.time_remaining[method]
        assert remaining is not None
        assert remaining == pytest.approx(RPC_TIMEOUT, abs=1.0)  # 7 s, not grpc's "none"


def test_closed_client_refuses_calls(target: str, fake: FakeCoordinator) -> None:
    c = Client(target, insecure=True)
    c.close()
    c.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        c.begin()


def test_secure_channel_and_extra_options() -> None:
    credentials = grpc.ssl_channel_credentials()
    with Client(
        "127.0.0.1:1",
        credentials=credentials,
        channel_options=[("grpc.lb_policy_name", "pick_first")],
    ):
        pass
    options = dict(_common.channel_options_with([("grpc.keepalive_time_ms", 5_000)]))
    assert options["grpc.keepalive_time_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_retries_are_logged_without_parameter_values(
    client: Client, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="twopc.client")
    fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE)
    with client.transaction() as tx:
        tx.execute("eu", "UPDATE users SET email = %s", ["alice@example.com"])
    messages = [r.getMessage() for r in caplog.records if r.name == "twopc.client"]
    assert any("Execute failed (try 1 of 5" in m and tx.txid in m for m in messages)
    assert not any("alice@example.com" in m for m in caplog.text.splitlines())


def test_retry_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)
    assert RetryPolicy().delay_after(5, 0.0) is None
    assert RetryPolicy().delay_after(1, 0.0) == 0.05


# --------------------------------------------------------------------------------------------------
# The client-side state table: every (phase, operation) pair
# --------------------------------------------------------------------------------------------------

_ALLOWED = {
    (_common.Phase.ACTIVE, "execute"),
    (_common.Phase.ACTIVE, "commit"),
    (_common.Phase.ACTIVE, "rollback"),
    (_common.Phase.IN_DOUBT, "rollback"),
    (_common.Phase.OUTCOME_UNKNOWN, "rollback"),
    (_common.Phase.ABORTED, "rollback"),  # a no-op: nothing is sent
}


@pytest.mark.parametrize("phase", list(_common.Phase))
@pytest.mark.parametrize("operation", ["execute", "commit", "rollback"])
def test_state_table(phase: _common.Phase, operation: str) -> None:
    core = _common.TransactionCore(pb.BeginResponse(txid="c1.t", timeout_ms=1000), "rid")
    core.phase = phase
    build: dict[str, Callable[[], object]] = {
        "execute": lambda: core.execute_request("eu", ["SELECT 1"]),
        "commit": lambda: core.commit_request(False),
        "rollback": core.rollback_request,
    }
    if (phase, operation) in _ALLOWED:
        build[operation]()
    elif phase is _common.Phase.ABORTED:
        with pytest.raises(TransactionAborted):  # the outcome, not a usage error
            build[operation]()
    else:
        with pytest.raises(FailedPrecondition):
            build[operation]()


@pytest.mark.parametrize(
    ("phase", "failed", "action"),
    [
        (_common.Phase.ACTIVE, False, _common.ExitAction.COMMIT),
        (_common.Phase.ACTIVE, True, _common.ExitAction.ROLLBACK),
        (_common.Phase.IN_DOUBT, False, _common.ExitAction.ROLLBACK_AND_RAISE),
        (_common.Phase.IN_DOUBT, True, _common.ExitAction.ROLLBACK),
        *[
            (phase, failed, _common.ExitAction.NOTHING)
            for phase in (
                _common.Phase.COMMITTED,
                _common.Phase.ABORTED,
                _common.Phase.OUTCOME_UNKNOWN,
            )
            for failed in (False, True)
        ],
    ],
)
def test_exit_actions(phase: _common.Phase, failed: bool, action: _common.ExitAction) -> None:
    core = _common.TransactionCore(pb.BeginResponse(txid="c1.t"), "rid")
    core.phase = phase
    assert core.exit_action(failed=failed) is action


# --------------------------------------------------------------------------------------------------
# asyncio
# --------------------------------------------------------------------------------------------------


def test_async_with_block_commits(target: str, fake: FakeCoordinator, fake_time: FakeTime) -> None:
    async def body(c: AsyncClient) -> tuple[str, TransactionState, Result]:
        async with c.transaction(timeout=2.0) as tx:
            result = await tx.execute("eu", "SELECT %s", [decimal.Decimal("1.5")])
            await tx.execute_many("us", ["SELECT 1", ("SELECT %s", [b"x"])])
        return tx.txid, tx.state, result

    txid, state, result = run_async(target, fake_time, body)
    assert state is TransactionState.COMMITTING
    assert result.scalar() == decimal.Decimal("1.5")
    assert [r.txid for r in fake.requests["Commit"]] == [txid]
    assert [(r.participant, r.sequence) for r in fake.requests["Execute"]] == [("eu", 1), ("us", 1)]


def test_async_with_block_rolls_back_on_exception(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    error = Boom()

    async def body(c: AsyncClient) -> None:
        async with c.transaction() as tx:
            await tx.execute("eu", "SELECT 1")
            raise error

    with pytest.raises(Boom) as raised:
        run_async(target, fake_time, body)
    assert raised.value is error
    assert fake.count("Rollback") == 1
    assert fake.count("Commit") == 0


def test_async_begin_commit_and_use_after_commit(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    async def body(c: AsyncClient) -> TransactionState:
        tx = await c.begin()
        await tx.execute("eu", "SELECT 1")
        state = await tx.commit(wait_for_phase2=True)
        with pytest.raises(FailedPrecondition):
            await tx.execute("eu", "SELECT 1")
        with pytest.raises(FailedPrecondition):
            await tx.rollback()
        return state

    assert run_async(target, fake_time, body) is TransactionState.COMMITTED
    assert fake.count("Execute") == 1


def test_async_retries_reuse_request_id_and_sequence(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Begin", LOST, after=True)
    fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE, times=2)

    async def body(c: AsyncClient) -> None:
        async with c.transaction() as tx:
            await tx.execute("eu", "SELECT 1")

    run_async(target, fake_time, body)
    assert len({r.request_id for r in fake.requests["Begin"]}) == 1
    assert fake.count("Begin") == 2
    assert [r.sequence for r in fake.requests["Execute"]] == [1, 1, 1]
    assert fake_time.sleeps == [0.05, 0.05, 0.1]


def test_async_statement_failed_is_not_retried(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Execute", StatementFailed("Duplicate entry", mysql_errno=1062))

    async def body(c: AsyncClient) -> None:
        async with c.transaction() as tx:
            await tx.execute("eu", "INSERT INTO t VALUES (1)")

    with pytest.raises(StatementFailed) as raised:
        run_async(target, fake_time, body)
    assert raised.value.mysql_errno == 1062
    assert raised.value.txid
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert fake.count("Execute") == 1
    assert fake.count("Rollback") == 0
    assert fake_time.sleeps == []


def test_async_commit_lost_then_get_transaction(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Commit", LOST, after=True, times=5)

    async def body(c: AsyncClient) -> TransactionState:
        tx = await c.begin()
        return await tx.commit()

    assert run_async(target, fake_time, body) is TransactionState.COMMITTING
    assert fake.count("GetTransaction") == 1


def test_async_commit_outcome_unknown(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
    fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    txids: list[str] = []

    async def body(c: AsyncClient) -> None:
        async with c.transaction() as tx:
            txids.append(tx.txid)

    with pytest.raises(OutcomeUnknown) as raised:
        run_async(target, fake_time, body)
    assert raised.value.txid == txids[0]
    assert fake.count("Rollback") == 0


def test_async_run_and_get_transaction(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE)

    async def body(c: AsyncClient) -> TransactionInfo:
        result = await c.run({"eu": [("UPDATE t SET x = %s", [1])]}, request_id="r1")
        assert result.results["eu"][0].rows == [(1,)]
        return await c.get_transaction(request_id="r1")

    info = run_async(target, fake_time, body)
    assert info.outcome is Outcome.COMMITTED
    assert info.participants == ["eu"]
    assert [r.request_id for r in fake.requests["RunTransaction"]] == ["r1", "r1"]


def test_async_run_outcome_unknown(target: str, fake: FakeCoordinator, fake_time: FakeTime) -> None:
    fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE, times=5)

    async def body(c: AsyncClient) -> None:
        await c.run({"eu": ["UPDATE t SET x = 1"]})

    with pytest.raises(OutcomeUnknown) as raised:
        run_async(target, fake_time, body)
    sent = fake.requests["RunTransaction"]
    assert len(sent) == 5
    assert raised.value.request_id == sent[0].request_id
    assert fake_time.sleeps == [0.05, 0.1, 0.2, 0.4]


def test_async_errors_keep_their_class(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    async def body(c: AsyncClient) -> None:
        await c.get_transaction("c1.nope")

    with pytest.raises(NotFound) as raised:
        run_async(target, fake_time, body)
    assert raised.value.txid == "c1.nope"
    assert fake.count("GetTransaction") == 1


# --------------------------------------------------------------------------------------------------
# Retries of a transaction that lost a lock conflict (TransactionConflict): off by default, only
# that class, a new request id per try, exponential backoff with full jitter, within the attempts
# and the deadline.
# --------------------------------------------------------------------------------------------------

CONFLICT_WORK = {"eu": ["UPDATE t SET x = 1"], "us": ["UPDATE t SET x = 2"]}


class Dice:
    """``random`` for the jitter: the values given, in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def conflict() -> TransactionConflict:
    return TransactionConflict("deadlock across participants, chosen as the victim")


def make_client(
    target: str, fake_time: FakeTime, policy: ConflictRetry | None, dice: Dice
) -> Client:
    return Client(
        target,
        insecure=True,
        sleep=fake_time.sleep,
        clock=fake_time.clock,
        rpc_timeout=RPC_TIMEOUT,
        conflict_retries=policy,
        random=dice,
    )


@pytest.fixture
def dice() -> Dice:
    return Dice(0.5, 1.0, 0.0, 0.25, 0.999)


@pytest.fixture
def retrying(
    target: str, fake: FakeCoordinator, fake_time: FakeTime, dice: Dice
) -> Iterator[Client]:
    policy = ConflictRetry(attempts=4, initial_backoff=0.1, max_backoff=0.3, deadline=10)
    with make_client(target, fake_time, policy, dice) as c:
        yield c


def test_the_bounds_grow_exponentially_up_to_the_max() -> None:
    policy = ConflictRetry(initial_backoff=0.01, max_backoff=0.05, multiplier=2)
    assert [policy.bound(n) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.05, 0.05]


def test_full_jitter_spans_zero_to_the_bound() -> None:
    policy = ConflictRetry(attempts=10, initial_backoff=0.1, max_backoff=1.0, deadline=100)
    for roll in (0.0, 0.3, 0.999):
        delay = policy.delay_after(conflict(), 3, 0.0, lambda roll=roll: roll)
        assert delay == pytest.approx(roll * 0.4)
    # Only the retryable class, within the attempts and the deadline.
    assert policy.delay_after(StatementFailed("dup", mysql_errno=1062), 1, 0.0, lambda: 0.5) is None
    assert policy.delay_after(TransactionAborted("no"), 1, 0.0, lambda: 0.5) is None
    assert policy.delay_after(conflict(), 10, 0.0, lambda: 0.5) is None
    assert policy.delay_after(conflict(), 1, 99.99, lambda: 0.5) is None


def test_bad_policies_are_refused() -> None:
    for bad in ({"attempts": 0}, {"initial_backoff": -1}, {"multiplier": 0.5}, {"deadline": 0}):
        with pytest.raises(ValueError, match="must"):
            ConflictRetry(**bad)  # type: ignore[arg-type]


def test_retry_request_ids_are_new_valid_and_derived() -> None:
    assert retry_request_id("transfer-7", 2) == "transfer-7-r2"
    long = "x" * 40
    assert len(retry_request_id(long, 12)) == 40
    assert retry_request_id(long, 12).endswith("-r12")


def test_off_by_default(client: Client, fake: FakeCoordinator, fake_time: FakeTime) -> None:
    fake.add_error("RunTransaction", conflict())
    with pytest.raises(TransactionConflict):
        client.run(CONFLICT_WORK)
    assert fake.count("RunTransaction") == 1
    assert fake_time.sleeps == []


def test_run_retries_a_conflict_with_jittered_backoff_and_new_request_ids(
    retrying: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", conflict(), times=2)
    result = retrying.run(CONFLICT_WORK, request_id="transfer-9")
    assert result.txid
    assert fake.count("RunTransaction") == 3
    # Dice 0.5 then 1.0, bounds 0.1 then 0.2.
    assert fake_time.sleeps == pytest.approx([0.05, 0.2])
    ids = [r.request_id for r in fake.requests["RunTransaction"]]
    assert ids == ["transfer-9", "transfer-9-r1", "transfer-9-r2"]


def test_run_gives_up_after_the_attempts(
    retrying: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", conflict(), times=10)
    with pytest.raises(TransactionConflict):
        retrying.run(CONFLICT_WORK)
    assert fake.count("RunTransaction") == 4
    assert len(fake_time.sleeps) == 3


def test_other_aborts_are_not_retried(
    retrying: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", StatementFailed("Duplicate entry", mysql_errno=1062))
    with pytest.raises(StatementFailed):
        retrying.run(CONFLICT_WORK)
    fake.add_error("RunTransaction", TransactionAborted("rolled back"))
    with pytest.raises(TransactionAborted):
        retrying.run(CONFLICT_WORK)
    assert fake.count("RunTransaction") == 2
    assert fake_time.sleeps == []


def test_run_in_transaction_runs_the_work_again_in_a_new_transaction(
    retrying: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Execute", conflict())
    seen: list[str] = []

    def work(tx: Transaction) -> int:
        seen.append(tx.txid)
        tx.execute("eu", "UPDATE t SET x = 1")
        return 7

    assert retrying.run_in_transaction(work) == 7
    assert len(set(seen)) == 2  # two transactions
    assert fake.count("Begin") == 2
    assert fake.count("Commit") == 1
    assert fake_time.sleeps == pytest.approx([0.05])


def test_async_run_and_run_in_transaction_retry_too(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", conflict())
    fake.add_error("Execute", conflict())
    dice = Dice(0.5, 0.5)

    async def body(_: AsyncClient) -> None:
        policy = ConflictRetry(attempts=3, initial_backoff=0.1)
        async with AsyncClient(
            target,
            insecure=True,
            sleep=fake_time.async_sleep,
            clock=fake_time.clock,
            rpc_timeout=RPC_TIMEOUT,
            conflict_retries=policy,
            random=dice,
        ) as retrying:
            await retrying.run(CONFLICT_WORK)

            async def work(tx: AsyncTransaction) -> None:
                await tx.execute("eu", "UPDATE t SET x = 1")

            await retrying.run_in_transaction(work)

    run_async(target, fake_time, body)
    assert fake.count("RunTransaction") == 2
    assert fake.count("Begin") == 2
    assert fake_time.sleeps == pytest.approx([0.05, 0.05])


# --------------------------------------------------------------------------------------------------
# A refusal's retry-after (rate limits, shedding)
# --------------------------------------------------------------------------------------------------

SHED = twopc.client.ResourceExhausted(
    "coordinator overloaded, shedding new transactions; retry after 150 ms", retry_after_s=0.15
)


def test_new_transactions_are_held_for_a_refusals_retry_after(
    client: Client, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    begun = client.begin()
    fake.add_error("RunTransaction", SHED)
    with pytest.raises(twopc.client.ResourceExhausted) as refused:
        client.run({"eu": ["SELECT 1"]})
    assert refused.value.retry_after_s == pytest.approx(0.15)  # from the metadata
    assert "shedding new transactions" in refused.value.message
    fake_time.now += 0.1
    for new in (lambda: client.run({"eu": ["SELECT 1"]}), client.begin):
        with pytest.raises(twopc.client.ResourceExhausted) as held:
            new()
        assert "refused by the client, not sent" in held.value.message
        assert held.value.retry_after_s == pytest.approx(0.05)
    assert (fake.count("RunTransaction"), fake.count("Begin")) == (1, 1)  # neither was sent
    begun.execute("eu", "SELECT 1")  # a begun transaction's calls go on
    begun.commit()
    assert client.get_transaction(begun.txid).txid == begun.txid
    fake_time.now += 0.05
    client.run({"eu": ["SELECT 1"]})
    assert fake.count("RunTransaction") == 2


def test_an_async_client_holds_new_transactions_too(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("Begin", SHED)

    async def body(async_client: AsyncClient) -> None:
        for _ in range(2):
            with pytest.raises(twopc.client.ResourceExhausted):
                await async_client.begin()
        assert fake.count("Begin") == 1
        fake_time.now += 0.15
        tx = await async_client.begin()
        await tx.rollback()

    run_async(target, fake_time, body)
    assert fake.count("Begin") == 2


def test_a_client_told_not_to_honor_retry_after_sends_every_one(
    target: str, fake: FakeCoordinator, fake_time: FakeTime
) -> None:
    fake.add_error("RunTransaction", SHED, times=2)
    with Client(target, insecure=True, clock=fake_time.clock, honor_retry_after=False) as c:
        for _ in range(2):
            with pytest.raises(twopc.client.ResourceExhausted):
                c.run({"eu": ["SELECT 1"]})
        c.run({"eu": ["SELECT 1"]})
    assert fake.count("RunTransaction") == 3
