"""Request ids across a coordinator group on the SQL decision log (MariaDB): two members, ids c1
(A, the cluster's coordinator) and c2 (B), real processes and real signals, called through the
raw gRPC API (no SDK retry hides an UNAVAILABLE).

- Requests that A committed and aborted, retried with the same request ids on B after A was
  SIGKILLed and B took c1 over: B answers the committed outcome (the balances changed once) and
  TransactionAborted (nothing applied); GetTransaction of A's txid and of the request id on B
  tells the outcome; another identity learns nothing from B of either.
- A request that A committed, retried on B while A is only SIGSTOPped: UNAVAILABLE naming c1
  and member-a until B's takeover, then the committed outcome.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.fault.group_members import (
    REGIONS,
    Member,
    group_cluster,
    peer_member,
    restore_a,
)
from tests.sql_stores import Stores, rows
from tests.support import markers, transfer_sql
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client._common import run_request
from twopc.testing.playground.cluster import Cluster, wait_until

pytestmark = pytest.mark.fault

TAKEOVER_DEADLINE_S = 20.0
ACCOUNT = 3


@pytest.fixture(scope="module")
def store_url(sql_stores: Stores) -> str:
    return sql_stores.new_database("mariadb")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, store_url: str) -> Iterator[Cluster]:
    with group_cluster(tmp_path_factory, store_url) as cluster:
        yield cluster


@pytest.fixture
def peer(group: Cluster, tmp_path: Path) -> Iterator[Member]:
    """Member B: coordinator id c2, the same configuration as A's otherwise."""
    with peer_member(group, tmp_path) as member:
        yield member


@pytest.fixture(autouse=True)
def a_serving(group: Cluster) -> Iterator[None]:
    """A serving before and after each test (SIGCONTed, restarted, failpoints disarmed)."""
    yield
    restore_a(group)


def stub(group: Cluster, address: str, identity: str = "client") -> pb_grpc.CoordinatorStub:
    return pb_grpc.CoordinatorStub(group.channel(address, identity=identity))


def transfer(request_id: str, amount: int = 7) -> pb.RunTransactionRequest:
    return run_request(
        {"eu": transfer_sql(-amount, ACCOUNT), "us": transfer_sql(amount, ACCOUNT)},
        10,
        request_id,
        True,
    )


def failing_transfer(request_id: str) -> pb.RunTransactionRequest:
    """Fails on us (no such table): the transaction aborts, eu's change rolled back."""
    return run_request(
        {
            "eu": transfer_sql(-11, ACCOUNT),
            "us": [("UPDATE no_such_table SET balance = balance + %s WHERE id = %s", [11, 1])],
        },
        10,
        request_id,
        True,
    )


def balances(group: Cluster) -> tuple[int, int]:
    found = []
    for region in REGIONS:
        with group.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT balance FROM accounts WHERE id = %s", [ACCOUNT])
            (balance,) = cursor.fetchone()
            found.append(int(balance))
    return found[0], found[1]


def code_of(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    return call.code()  # type: ignore[no-any-return]


def takeover_done(member: Member) -> bool:
    return "takeover_finished" in member.text()


def test_requests_retried_on_a_peer_after_a_kill_get_their_first_outcome(
    group: Cluster, peer: Member, store_url: str
) -> None:
    a = stub(group, group.component("coordinator").address)
    before = balances(group)
    committed = a.RunTransaction(transfer("grp-committed"))
    assert committed.txid == "c1.r-grp-committed"
    with pytest.raises(grpc.RpcError) as aborted:
        a.RunTransaction(failing_transfer("grp-aborted"))
    assert code_of(aborted.value) is grpc.StatusCode.ABORTED
    after = balances(group)
    assert after == (before[0] - 7, before[1] + 7)
    assert len(rows(store_url, "SELECT txid FROM twopc_requests")) >= 2

    group.kill("coordinator")
    killed = time.monotonic()
    wait_until(lambda: takeover_done(peer), TAKEOVER_DEADLINE_S, "B taking c1 over")
    print(f"\nB took c1 over and freed it {time.monotonic() - killed:.2f} s after the kill")

    b = stub(group, peer.address)
    again = b.RunTransaction(transfer("grp-committed"))
    assert again.txid == "c1.r-grp-committed"
    assert again.state == pb.TRANSACTION_STATE_COMMITTED
    assert list(again.results) == []
    with pytest.raises(grpc.RpcError) as refused:
        b.RunTransaction(transfer("grp-aborted"))  # the same request id, now work that would run
    assert code_of(refused.value) is grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as begun:
        b.Begin(pb.BeginRequest(timeout_ms=5000, request_id="grp-committed"))
    assert code_of(begun.value) is grpc.StatusCode.FAILED_PRECONDITION
    assert "already ran as transaction c1.r-grp-committed" in (begun.value.details() or "")
    assert balances(group) == after, "each request applied once, the aborted one never"
    assert markers(group, "c1.r-grp-aborted") == set()

    by_txid = b.GetTransaction(pb.GetTransactionRequest(txid="c1.r-grp-committed"))
    by_request = b.GetTransaction(pb.GetTransactionRequest(request_id="grp-committed"))
    assert by_txid.outcome == by_request.outcome == pb.OUTCOME_COMMITTED
    assert by_request.txid == "c1.r-grp-committed"
    lost = b.GetTransaction(pb.GetTransactionRequest(request_id="grp-aborted"))
    assert (lost.txid, lost.outcome) == ("c1.r-grp-aborted", pb.OUTCOME_ABORTED)

    # Another identity: its own request id of that name is unused; A's txid is not found.
    other = stub(group, peer.address, identity="other-app")
    unused = other.GetTransaction(pb.GetTransactionRequest(request_id="grp-committed"))
    assert (unused.txid, unused.outcome, unused.presumed) == (
        "c2.r-grp-committed",
        pb.OUTCOME_ABORTED,
        True,
    )
    with pytest.raises(grpc.RpcError) as hidden:
        other.GetTransaction(pb.GetTransactionRequest(txid="c1.r-grp-committed"))
    with pytest.raises(grpc.RpcError) as unknown:
        other.GetTransaction(pb.GetTransactionRequest(txid="c1.r-never-used"))
    assert code_of(hidden.value) is code_of(unknown.value) is grpc.StatusCode.NOT_FOUND
    assert (hidden.value.details() or "").replace("c1.r-grp-committed", "X") == (
        unknown.value.details() or ""
    ).replace("c1.r-never-used", "X")


def test_a_request_retried_on_a_peer_while_its_member_is_paused_waits_for_the_takeover(
    group: Cluster, peer: Member
) -> None:
    a_component = group.component("coordinator")
    assert a_component.pid is not None
    a = stub(group, a_component.address)
    before = balances(group)
    assert a.RunTransaction(transfer("grp-paused")).txid == "c1.r-grp-paused"
    b = stub(group, peer.address)
    os.kill(a_component.pid, signal.SIGSTOP)
    paused = time.monotonic()
    refusals: list[str] = []
    answers: list[pb.RunTransactionResponse] = []
    try:

        def answered() -> bool:
            try:
                answers.append(b.RunTransaction(transfer("grp-paused"), timeout=10))
            except grpc.RpcError as err:
                refusals.append(f"{code_of(err).name}: {err.details()}")
                return False
            return True

        wait_until(answered, TAKEOVER_DEADLINE_S, "B answering once c1 is taken over", 0.1)
        took = time.monotonic() - paused
        assert "takeover_started" in peer.text()
    finally:
        os.kill(a_component.pid, signal.SIGCONT)
    print(f"\npaused member: B answered {took:.2f} s after SIGSTOP, {len(refusals)} refusals first")
    assert refusals, "B answered UNAVAILABLE while c1's lease was live"
    assert all(refusal.startswith("UNAVAILABLE: ") for refusal in refusals), refusals
    assert (
        "request grp-paused runs as c1.r-grp-paused on coordinator c1 (member member-a)"
        in refusals[0]
    )
    # COMMITTING when A's END had not reached the store yet (ENDs are not forced): B's
    # takeover then holds c1 and the COMMIT row still says committed.
    assert answers[0].txid == "c1.r-grp-paused"
    assert answers[0].state in (pb.TRANSACTION_STATE_COMMITTED, pb.TRANSACTION_STATE_COMMITTING)
    assert balances(group) == (before[0] - 7, before[1] + 7)
