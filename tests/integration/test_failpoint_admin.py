"""The Failpoints admin RPC on real daemons: arming a coordinator's failpoints at run time.

The coordinator is restarted with ``TWOPC_COORDINATOR_ADMIN_FAILPOINTS=1`` for these tests and
restarted without it afterwards (its armed points die with the process). Every outcome is checked
on the databases: balances, marker rows and XA RECOVER.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import pytest

from tests.support import balance, markers, prepared, transfer_sql
from twopc.api import chaos_pb2 as chaos_pb
from twopc.api import chaos_pb2_grpc as chaos_grpc
from twopc.client import Client, Outcome, TransactionAborted, TransactionState
from twopc.failpoints import FAILPOINTS
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import ADMIN

ADMIN_ENV = "TWOPC_COORDINATOR_ADMIN_FAILPOINTS"
POINT = "coordinator.before_commit_record"
STALL_S = 0.5  # how long a paused transaction is watched not finishing


def restart(cluster: Cluster, name: str) -> None:
    if cluster.component(name).alive():
        cluster.kill(name)
    cluster.restart(name)


@pytest.fixture
def admin(live_cluster: Cluster) -> Iterator[chaos_grpc.FailpointsStub]:
    """The coordinator restarted with the admin RPC on; restarted without it afterwards."""
    coordinator = live_cluster.component("coordinator")
    coordinator.env[ADMIN_ENV] = "1"
    restart(live_cluster, "coordinator")
    try:
        with live_cluster.channel("coordinator", identity=ADMIN) as channel:
            yield chaos_grpc.FailpointsStub(channel)
    finally:
        coordinator.env.pop(ADMIN_ENV, None)
        restart(live_cluster, "coordinator")


def arm(admin: chaos_grpc.FailpointsStub, name: str, spec: str) -> dict[str, chaos_pb.Failpoint]:
    answer = admin.Set(chaos_pb.SetFailpointRequest(name=name, spec=spec), timeout=5)
    return {f.name: f for f in answer.failpoints}


def listed(admin: chaos_grpc.FailpointsStub) -> dict[str, chaos_pb.Failpoint]:
    answer = admin.List(chaos_pb.ListFailpointsRequest(), timeout=5)
    return {f.name: f for f in answer.failpoints}


def transfer(amount: int, account: int) -> dict[str, list[tuple[str, list[int]]]]:
    return {"eu": transfer_sql(-amount, account), "us": transfer_sql(amount, account)}


def test_return_before_the_commit_record_aborts_with_nothing_applied(
    live_cluster: Cluster, admin: chaos_grpc.FailpointsStub, client: Client, bank: int
) -> None:
    armed = arm(admin, POINT, "return(unavailable)")
    assert list(armed) == list(FAILPOINTS)
    assert armed[POINT].spec == "return(unavailable)"

    with pytest.raises(TransactionAborted, match=f"failpoint {POINT} fired") as caught:
        client.run(transfer(40, 2), timeout=5, request_id="fp-return")

    txid = caught.value.txid
    assert txid == f"{live_cluster.coordinator_id}.r-fp-return"
    assert markers(live_cluster, txid) == set()
    assert not prepared(live_cluster)
    assert balance(live_cluster, "eu", 2) == 1000
    assert balance(live_cluster, "us", 2) == 1000
    assert client.get_transaction(txid).outcome is Outcome.ABORTED
    point = listed(admin)[POINT]
    assert (point.spec, point.hits, point.fired) == ("return(unavailable)", 1, 1)


def test_pause_stalls_a_transaction_until_the_point_is_disarmed(
    live_cluster: Cluster, admin: chaos_grpc.FailpointsStub, client: Client, bank: int
) -> None:
    arm(admin, POINT, "1*pause")
    txid = f"{live_cluster.coordinator_id}.r-fp-pause"
    with ThreadPoolExecutor(max_workers=1) as pool:
        commit = pool.submit(client.run, transfer(15, 3), timeout=5, request_id="fp-pause")
        wait_until(lambda: listed(admin)[POINT].fired == 1, 10, "the transaction pausing")
        # Stalled: its commit does not finish, both branches stay prepared, no XA COMMIT.
        with pytest.raises(FutureTimeout):
            commit.result(timeout=STALL_S)
        assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}
        assert markers(live_cluster, txid) == set()
        # The coordinator still answers while that one task waits.
        assert client.get_transaction(txid).outcome is Outcome.PENDING

        released = arm(admin, POINT, "")
        assert released[POINT].spec == ""
        result = commit.result(timeout=10)

    assert result.txid == txid
    assert result.state in (TransactionState.COMMITTING, TransactionState.COMMITTED)
    wait_until(lambda: markers(live_cluster, txid) == {"eu", "us"}, 5, "phase 2")
    assert balance(live_cluster, "eu", 3) == 985
    assert balance(live_cluster, "us", 3) == 1015
    point = listed(admin)[POINT]
    assert (point.spec, point.hits, point.fired) == ("", 1, 1)


def test_bad_names_and_specs_are_invalid_arguments(admin: chaos_grpc.FailpointsStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        arm(admin, "coordinator.before_commit_recrod", "pause")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert POINT in (caught.value.details() or "")

    with pytest.raises(grpc.RpcError) as caught:
        arm(admin, POINT, "2*return(unavailable)->explode")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'explode'" in (caught.value.details() or "")
    assert listed(admin)[POINT].spec == ""


@pytest.mark.parametrize("name", ["coordinator", "agent-eu"])
def test_daemons_without_the_setting_answer_unimplemented(live_cluster: Cluster, name: str) -> None:
    component = live_cluster.component(name)
    assert component.env.get(ADMIN_ENV) is None
    with live_cluster.channel(name, identity=ADMIN) as channel:
        stub = chaos_grpc.FailpointsStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(chaos_pb.ListFailpointsRequest(), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as caught:
            stub.Set(chaos_pb.SetFailpointRequest(name=POINT, spec="crash"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
