"""The SDK's failover across a coordinator group's members: two fake coordinators (the servicer
of ``test_client``), each on a real gRPC server of its own, as endpoints A and B of one client.

A call not bound to an interactive transaction moves to the next endpoint when the current one
fails as the retry policy retries, with the same request; the client stays where it was
answered; an interactive transaction's calls never move. Sleeping and the clock are fakes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from tests.unit.test_client import LOST, FakeCoordinator, FakeTime, ServerThread
from twopc.api import twopc_pb2 as pb
from twopc.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    RetryPolicy,
    TransactionState,
    Unavailable,
)
from twopc.client._endpoints import Endpoints, parse_endpoints

T = TypeVar("T")
WORK = {"eu": [("UPDATE accounts SET balance = balance - %s WHERE id = %s", [5, 1])]}


class Member:
    """One fake coordinator and its server."""

    def __init__(self) -> None:
        self.fake = FakeCoordinator()
        self.server = ServerThread(self.fake)
        self.server.start()
        self.target = self.server.target


@pytest.fixture(scope="module")
def members() -> Iterator[tuple[Member, Member]]:
    a, b = Member(), Member()
    yield a, b
    a.server.stop()
    b.server.stop()


@pytest.fixture
def a(members: tuple[Member, Member]) -> Member:
    members[0].fake.reset()
    return members[0]


@pytest.fixture
def b(members: tuple[Member, Member]) -> Member:
    members[1].fake.reset()
    return members[1]


@pytest.fixture(scope="module")
def gone() -> str:
    """The address of a coordinator that was there and is gone: its port refuses connections."""
    server = ServerThread(FakeCoordinator())
    server.start()
    server.stop()
    return server.target


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def group_client(targets: list[str] | str, fake_time: FakeTime, **kwargs: Any) -> Client:
    return Client(targets, insecure=True, sleep=fake_time.sleep, clock=fake_time.clock, **kwargs)


@pytest.fixture
def client(a: Member, b: Member, fake_time: FakeTime) -> Iterator[Client]:
    with group_client([a.target, b.target], fake_time) as c:
        yield c


def failovers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "twopc.client"
        and r.levelno == logging.WARNING
        and "failing over" in r.getMessage()
    ]


# --------------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------------


def test_endpoints_as_a_list_or_a_comma_separated_string() -> None:
    assert parse_endpoints("h1:7100") == ("h1:7100",)
    assert parse_endpoints("h1:7100, h2:7100 ,h3:7100") == ("h1:7100", "h2:7100", "h3:7100")
    assert parse_endpoints(["h1:7100", "h2:7100"]) == ("h1:7100", "h2:7100")
    assert parse_endpoints(("dns:///coordinators.internal:7100",)) == (
        "dns:///coordinators.internal:7100",
    )
    # gRPC's own address lists are one target, resolved by gRPC.
    assert parse_endpoints("ipv4:10.0.0.1:7100,10.0.0.2:7100") == (
        "ipv4:10.0.0.1:7100,10.0.0.2:7100",
    )


@pytest.mark.parametrize("target", ["", " ", "h1:7100,,h2:7100", "h1:7100,", [], ["h1:1", "h1:1"]])
def test_bad_endpoints_are_refused(target: str | list[str]) -> None:
    with pytest.raises(InvalidArgument):
        parse_endpoints(target)
    with pytest.raises(InvalidArgument):
        Client(target, insecure=True)


def test_one_endpoint_works_as_before(a: Member, fake_time: FakeTime) -> None:
    with group_client(a.target, fake_time) as c:
        assert repr(c) == f"Client({a.target!r})"
        assert c.endpoint == a.target
        assert c.endpoints == (a.target,)
        c.run(WORK)
    assert a.fake.count("RunTransaction") == 1


def test_the_client_names_all_its_endpoints(a: Member, b: Member, fake_time: FakeTime) -> None:
    with group_client(f"{a.target},{b.target}", fake_time) as c:
        assert repr(c) == f"Client({[a.target, b.target]!r})"
        assert c.endpoints == (a.target, b.target)
        assert c.endpoint == a.target  # the first, until it fails


def test_calls_failing_on_the_same_endpoint_at_once_move_it_one_step() -> None:
    endpoints = Endpoints(["a", "b", "c"])
    error = Unavailable("down")
    assert endpoints.failed(0, "Begin", error) == 1
    assert endpoints.failed(0, "Begin", error) == 1  # another call saw a fail too: no skip to c
    assert endpoints.failed(1, "Begin", error) == 2
    assert endpoints.failed(2, "Begin", error) == 0  # round the list
    endpoints.answered(2)
    assert endpoints.current == 2


def test_concurrent_failures_move_the_endpoint_once() -> None:
    endpoints = Endpoints(["a", "b", "c"])
    start = threading.Barrier(8)
    seen: list[int] = []

    def fail() -> None:
        start.wait()
        seen.append(endpoints.failed(0, "RunTransaction", Unavailable("down")))

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [1] * 8
    assert endpoints.current == 1


# --------------------------------------------------------------------------------------------------
# Failover of calls not bound to a transaction
# --------------------------------------------------------------------------------------------------


def test_unavailable_run_lands_on_the_next_endpoint_with_the_same_request_id(
    client: Client, a: Member, b: Member, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    a.fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE)
    result = client.run(WORK, request_id="transfer-1")
    assert [r.request_id for r in a.fake.requests["RunTransaction"]] == ["transfer-1"]
    assert [r.request_id for r in b.fake.requests["RunTransaction"]] == ["transfer-1"]
    assert result.txid == b.fake.by_request["transfer-1"]
    assert client.endpoint == b.target
    assert fake_time.sleeps == [0.05]  # the policy's schedule, unchanged
    (message,) = failovers(caplog)
    assert a.target in message
    assert b.target in message
    assert "RunTransaction" in message
    assert "Unavailable: injected UNAVAILABLE" in message


def test_a_lost_answer_is_asked_again_of_the_next_member_with_the_same_request(
    client: Client, a: Member, b: Member
) -> None:
    """The answer from A is lost after A ran it: the retry on B carries the same request id, so
    that the group answers it with A's outcome (group-wide request ids) instead of running it
    again."""
    a.fake.add_error("RunTransaction", LOST, after=True)
    client.run(WORK, request_id="transfer-2")
    (on_a,) = a.fake.requests["RunTransaction"]
    (on_b,) = b.fake.requests["RunTransaction"]
    assert on_a == on_b  # the very same request, field for field


def test_a_stopped_member_fails_over(gone: str, b: Member, fake_time: FakeTime) -> None:
    with group_client([gone, b.target], fake_time) as c:
        tx = c.begin(request_id="order-7")
        assert tx.endpoint == b.target
        assert c.endpoint == b.target
        tx.execute("eu", "SELECT 1")
        tx.commit()
    assert [r.request_id for r in b.fake.requests["Begin"]] == ["order-7"]
    assert b.fake.count("Execute") == 1
    assert b.fake.count("Commit") == 1


def test_the_client_stays_on_the_endpoint_that_answered(
    client: Client, a: Member, b: Member, fake_time: FakeTime
) -> None:
    a.fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    b.fake.add_error("GetTransaction", NotFound("no transaction c1.x"))  # an answer all the same
    with pytest.raises(NotFound):
        client.get_transaction("c1.x")
    # A is fine again, but the client stays on B until B fails.
    for n in range(3):
        client.run(WORK, request_id=f"sticky-{n}")
        client.begin().commit()
    assert a.fake.count("RunTransaction") == 0
    assert a.fake.count("Begin") == 0
    assert b.fake.count("RunTransaction") == 3
    assert b.fake.count("Begin") == 3
    # B fails: round the list, back to A, and A it is from then on.
    b.fake.add_error("Begin", grpc.StatusCode.UNAVAILABLE)
    tx = client.begin()
    assert tx.endpoint == a.target
    client.run(WORK)
    assert client.endpoint == a.target
    assert a.fake.count("RunTransaction") == 1


def test_deadline_exceeded_fails_over_too(client: Client, a: Member, b: Member) -> None:
    a.fake.add_error("Begin", grpc.StatusCode.DEADLINE_EXCEEDED)
    tx = client.begin()
    assert tx.endpoint == b.target
    assert a.fake.requests["Begin"][0].request_id == b.fake.requests["Begin"][0].request_id


def test_other_errors_do_not_fail_over(client: Client, a: Member, b: Member) -> None:
    a.fake.add_error("GetTransaction", NotFound("no transaction c1.y"))
    with pytest.raises(NotFound):
        client.get_transaction("c1.y")
    assert b.fake.count("GetTransaction") == 0
    assert client.endpoint == a.target


def test_failover_keeps_to_the_policys_attempts_round_the_list(
    a: Member, b: Member, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    a.fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE, times=2)
    b.fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE, times=2)
    policy = RetryPolicy(attempts=3)
    with group_client([a.target, b.target], fake_time, retry_policy=policy) as c:
        with pytest.raises(OutcomeUnknown) as raised:
            c.run(WORK, request_id="transfer-3")
        assert raised.value.request_id == "transfer-3"
        # A, B, A: three tries in all; the last failure moved the client on to B.
        assert a.fake.count("RunTransaction") == 2
        assert b.fake.count("RunTransaction") == 1
        assert fake_time.sleeps == [0.05, 0.1]
        assert c.endpoint == b.target
    assert len(failovers(caplog)) == 3


def test_failover_keeps_to_the_policys_deadline(a: Member, b: Member, fake_time: FakeTime) -> None:
    a.fake.add_error("Begin", grpc.StatusCode.UNAVAILABLE, times=50)
    b.fake.add_error("Begin", grpc.StatusCode.UNAVAILABLE, times=50)
    policy = RetryPolicy(attempts=100, initial_backoff=0.05, multiplier=2.0, deadline=0.4)
    with (
        group_client([a.target, b.target], fake_time, retry_policy=policy) as c,
        pytest.raises(Unavailable),
    ):
        c.begin()
    assert fake_time.sleeps == pytest.approx([0.05, 0.1, 0.2])
    assert a.fake.count("Begin") == 2
    assert b.fake.count("Begin") == 2


# --------------------------------------------------------------------------------------------------
# Interactive transactions stay on their member
# --------------------------------------------------------------------------------------------------


def test_an_interactive_transactions_execute_does_not_move(
    client: Client, a: Member, b: Member, fake_time: FakeTime
) -> None:
    tx = client.begin()
    assert tx.endpoint == a.target
    a.fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE, times=5)
    with pytest.raises(Unavailable) as raised:
        tx.execute("eu", "UPDATE t SET x = 1")
    assert a.fake.count("Execute") == 5  # every try on A, the member that began it
    assert b.fake.count("Execute") == 0
    message = raised.value.message
    assert tx.txid in message
    assert a.target in message
    assert "the transaction is lost" in message
    assert "rolls its branches back" in message
    assert client.endpoint == a.target  # a transaction's calls never move the client either
    tx.rollback()
    assert [r.txid for r in a.fake.requests["Rollback"]] == [tx.txid]
    assert b.fake.count("Rollback") == 0


def test_a_transaction_begun_after_a_failover_stays_on_its_member(
    client: Client, a: Member, b: Member
) -> None:
    a.fake.add_error("Begin", grpc.StatusCode.UNAVAILABLE)
    with client.transaction() as tx:
        b.fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE)  # retried on B, not on A
        tx.execute("eu", "SELECT 1")
    assert tx.endpoint == b.target
    assert tx.state is TransactionState.COMMITTING
    assert b.fake.count("Execute") == 2
    assert b.fake.count("Commit") == 1
    assert a.fake.count("Execute") == a.fake.count("Commit") == 0


def test_a_lost_commit_is_looked_up_on_another_member(client: Client, a: Member, b: Member) -> None:
    tx = client.begin()
    a.fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
    a.fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    b.fake.add_response(
        "GetTransaction",
        pb.TransactionInfo(
            txid=tx.txid, state=pb.TRANSACTION_STATE_COMMITTING, outcome=pb.OUTCOME_COMMITTED
        ),
    )
    assert tx.commit() is TransactionState.COMMITTING
    assert a.fake.count("Commit") == 5
    assert b.fake.count("Commit") == 0
    assert [r.txid for r in b.fake.requests["GetTransaction"]] == [tx.txid]


def test_a_lost_commit_that_no_member_can_tell_is_outcome_unknown(
    client: Client, a: Member, b: Member
) -> None:
    tx = client.begin()
    a.fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
    a.fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    b.fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(OutcomeUnknown) as raised:
        tx.commit()
    assert raised.value.txid == tx.txid
    assert a.target in raised.value.message
    assert "any member of the group" in raised.value.message
    assert a.fake.count("GetTransaction") == b.fake.count("GetTransaction") == 1


# --------------------------------------------------------------------------------------------------
# DNS: one name, several addresses, one channel (gRPC resolves and picks)
# --------------------------------------------------------------------------------------------------


def test_a_dns_name_is_one_endpoint_resolved_by_grpc(b: Member, fake_time: FakeTime) -> None:
    port = b.target.rsplit(":", 1)[1]
    with group_client(f"dns:///localhost:{port}", fake_time) as c:
        assert c.endpoints == (f"dns:///localhost:{port}",)
        c.run(WORK)
    assert b.fake.count("RunTransaction") == 1


# --------------------------------------------------------------------------------------------------
# asyncio
# --------------------------------------------------------------------------------------------------


def run_async(
    targets: list[str],
    fake_time: FakeTime,
    body: Callable[[AsyncClient], Coroutine[Any, Any, T]],
) -> T:
    async def main() -> T:
        async with AsyncClient(
            targets, insecure=True, sleep=fake_time.async_sleep, clock=fake_time.clock
        ) as c:
            return await body(c)

    return asyncio.run(main())


def test_async_failover_is_sticky_and_keeps_the_request_id(
    a: Member, b: Member, fake_time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    a.fake.add_error("RunTransaction", grpc.StatusCode.UNAVAILABLE)

    async def body(c: AsyncClient) -> tuple[str, str]:
        await c.run(WORK, request_id="async-1")
        moved_to = c.endpoint
        await c.run(WORK, request_id="async-2")
        info = await c.get_transaction(request_id="async-2")
        return moved_to, info.txid

    moved_to, txid = run_async([a.target, b.target], fake_time, body)
    assert moved_to == b.target
    assert [r.request_id for r in a.fake.requests["RunTransaction"]] == ["async-1"]
    assert [r.request_id for r in b.fake.requests["RunTransaction"]] == ["async-1", "async-2"]
    assert txid == b.fake.by_request["async-2"]
    assert b.fake.count("GetTransaction") == 1
    (message,) = failovers(caplog)
    assert a.target in message
    assert b.target in message


def test_async_stopped_member_and_execute_does_not_move(
    gone: str, a: Member, fake_time: FakeTime
) -> None:
    async def body(c: AsyncClient) -> tuple[str, str]:
        tx = await c.begin()  # the first endpoint is gone: begun on A
        a.fake.add_error("Execute", grpc.StatusCode.UNAVAILABLE, times=5)
        with pytest.raises(Unavailable, match="the transaction is lost"):
            await tx.execute("eu", "SELECT 1")
        await tx.rollback()
        return tx.endpoint, c.endpoint

    tx_endpoint, client_endpoint = run_async([gone, a.target], fake_time, body)
    assert tx_endpoint == client_endpoint == a.target
    assert a.fake.count("Begin") == 1
    assert a.fake.count("Execute") == 5
    assert a.fake.count("Rollback") == 1


def test_async_lost_commit_is_looked_up_on_another_member(
    a: Member, b: Member, fake_time: FakeTime
) -> None:
    async def body(c: AsyncClient) -> TransactionState:
        tx = await c.begin()
        a.fake.add_error("Commit", grpc.StatusCode.UNAVAILABLE, times=5)
        a.fake.add_error("GetTransaction", grpc.StatusCode.UNAVAILABLE)
        b.fake.add_response(
            "GetTransaction",
            pb.TransactionInfo(
                txid=tx.txid, state=pb.TRANSACTION_STATE_COMMITTED, outcome=pb.OUTCOME_COMMITTED
            ),
        )
        return await tx.commit()

    assert run_async([a.target, b.target], fake_time, body) is TransactionState.COMMITTED
    assert b.fake.count("Commit") == 0
    assert b.fake.count("GetTransaction") == 1
