"""The operator's API (``twopc.v1.Admin``) on the real daemons, checked on MariaDB itself.

In-doubt transactions are made as a crash leaves them: a COMMIT record logged and both branches
prepared (``coordinator.after_commit_record=crash``), or a branch prepared with no decision (as
the coordinator, straight through the Participant API). The coordinator then runs with its
recovery held off (``coordinator.recovery=return(unavailable)``), so that what the operator sees
and does is not raced by recovery; the fixture's teardown restarts it without, and checks that
nothing stays prepared.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support import balance, markers, prepare_on_agent, prepared, transfer_sql
from twopc.api import admin_pb2 as pb
from twopc.api import admin_pb2_grpc as pb_grpc
from twopc.api import twopc_pb2, twopc_pb2_grpc
from twopc.client import Client, RetryPolicy, TwopcError
from twopc.testing.playground.cluster import TEST_COORDINATOR_ID as RETIRED
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import ADMIN, CLIENT

RECOVERY_OFF = "coordinator.recovery=return(unavailable)"
ONE_SHOT = twopc_pb2.RunTransactionRequest(
    work=[
        twopc_pb2.ParticipantStatements(
            participant="eu", statements=[twopc_pb2.Statement(sql="SELECT 1")]
        )
    ]
)
SETTLE_S = 10.0


def restart_coordinator(cluster: Cluster, failpoints: str | None) -> None:
    component = cluster.component("coordinator")
    if failpoints is None:
        component.env.pop("TWOPC_FAILPOINTS", None)
    else:
        component.env["TWOPC_FAILPOINTS"] = failpoints
    if component.alive():
        cluster.kill("coordinator")
    cluster.restart("coordinator")


@pytest.fixture
def admin(live_cluster: Cluster) -> Iterator[pb_grpc.AdminStub]:
    with live_cluster.channel("coordinator", identity=ADMIN) as channel:
        yield pb_grpc.AdminStub(channel)


def resolve(
    admin: pb_grpc.AdminStub, txid: str, resolution: int, reason: str = "OPS-1: test"
) -> pb.AdminResolveResponse:
    request = pb.AdminResolveRequest(txid=txid, resolution=resolution, reason=reason)
    answer: pb.AdminResolveResponse = admin.Resolve(request, timeout=30)
    return answer


def refused(admin: pb_grpc.AdminStub, txid: str, resolution: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        resolve(admin, txid, resolution)
    return raised.value


def crash_after_commit_record(cluster: Cluster, request_id: str) -> str:
    """A transfer of 25 from eu to us (account 3) whose COMMIT record is durable and whose
    branches are both prepared when the coordinator dies; returns its txid. The coordinator
    comes back with recovery held off."""
    restart_coordinator(cluster, "coordinator.after_commit_record=1*crash")
    impatient = RetryPolicy(attempts=1, deadline=5.0)
    with cluster.client(retry_policy=impatient) as client, pytest.raises(TwopcError):
        client.run({"eu": transfer_sql(-25, 3), "us": transfer_sql(25, 3)}, request_id=request_id)
    component = cluster.component("coordinator")
    wait_until(lambda: not component.alive(), 10, "the coordinator dying after the record")
    restart_coordinator(cluster, RECOVERY_OFF)
    txid = f"{cluster.coordinator_id}.r-{request_id}"
    assert prepared(cluster) == {"eu": [txid], "us": [txid]}
    return txid


def audit_of(admin: pb_grpc.AdminStub, txid: str) -> list[tuple[str, str, str, str]]:
    answer = admin.Audit(pb.AuditRequest(txid=txid), timeout=10)
    return [(e.identity, e.action, e.outcome.split(":")[0], e.reason) for e in answer.entries]


def test_list_shows_live_transactions_with_their_holder_and_in_doubt_ones(
    live_cluster: Cluster, admin: pb_grpc.AdminStub, bank: int
) -> None:
    decided = crash_after_commit_record(live_cluster, "admin-list-decided")
    undecided = f"{live_cluster.coordinator_id}.r-admin-list-undecided"
    prepare_on_agent(live_cluster, "ap", undecided, 5, 4)
    with live_cluster.client() as client:
        live = client.begin(timeout=30)
        live.execute("eu", "SELECT balance FROM accounts WHERE id = %s", [1])
        listing = admin.List(pb.AdminListRequest(), timeout=30)
        assert not listing.draining
        assert listing.live_count == 1
        [entry] = listing.live
        assert (entry.txid, entry.holder, list(entry.participants)) == (live.txid, CLIENT, ["eu"])
        assert entry.state == twopc_pb2.TRANSACTION_STATE_ACTIVE
        in_doubt = {d.txid: (list(d.prepared_on), d.commit_logged) for d in listing.in_doubt}
        assert in_doubt == {decided: (["eu", "us"], True), undecided: (["ap"], False)}
        assert not listing.unreachable
        small = admin.List(pb.AdminListRequest(limit=1), timeout=30)
        assert len(small.in_doubt) == 1
        assert small.truncated
        live.rollback()
    shown = admin.Show(pb.AdminShowRequest(txid=decided), timeout=30)
    assert shown.commit_logged
    assert list(shown.decision_participants) == ["eu", "us"]
    assert shown.info.state == twopc_pb2.TRANSACTION_STATE_COMMITTING
    states = {b.participant: b.state for b in shown.branches}
    assert states == {
        "eu": twopc_pb2.BRANCH_STATE_PREPARED,
        "us": twopc_pb2.BRANCH_STATE_PREPARED,
        "ap": twopc_pb2.BRANCH_STATE_UNKNOWN,
    }
    # Leave nothing in doubt: the teardown checks it.
    resolve(admin, decided, pb.RESOLUTION_COMMIT)
    resolve(admin, undecided, pb.RESOLUTION_ABORT)
    assert not prepared(live_cluster)


def test_resolve_never_goes_against_the_decision_and_is_audited_durably(
    live_cluster: Cluster, admin: pb_grpc.AdminStub, bank: int
) -> None:
    txid = crash_after_commit_record(live_cluster, "admin-resolve-decided")
    undecided = f"{live_cluster.coordinator_id}.r-admin-resolve-undecided"
    prepare_on_agent(live_cluster, "ap", undecided, 7, 2)

    # --abort of a logged commit: refused, nothing changes on MariaDB.
    error = refused(admin, txid, pb.RESOLUTION_ABORT)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "COMMIT record is in the log (eu, us)" in (error.details() or "")
    assert prepared(live_cluster) == {"eu": [txid], "us": [txid], "ap": [undecided]}
    assert (balance(live_cluster, "eu", 3), balance(live_cluster, "us", 3)) == (1000, 1000)
    assert markers(live_cluster, txid) == set()

    # --commit of it: phase 2 now, committed everywhere.
    done = resolve(admin, txid, pb.RESOLUTION_COMMIT, "OPS-2: commit the decided transfer")
    assert done.state == twopc_pb2.TRANSACTION_STATE_COMMITTED, done.detail
    assert markers(live_cluster, txid) == {"eu", "us"}
    assert (balance(live_cluster, "eu", 3), balance(live_cluster, "us", 3)) == (975, 1025)

    # No decision: presumed abort, so --commit is refused; --abort rolls it back.
    error = refused(admin, undecided, pb.RESOLUTION_COMMIT)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "presumed aborted" in (error.details() or "")
    assert prepared(live_cluster) == {"ap": [undecided]}
    done = resolve(admin, undecided, pb.RESOLUTION_ABORT, "OPS-3: stray branch")
    assert done.state == twopc_pb2.TRANSACTION_STATE_ABORTED
    assert not prepared(live_cluster)  # XA RECOVER is empty everywhere
    assert balance(live_cluster, "ap", 2) == 1000

    # A reason is required.
    with pytest.raises(grpc.RpcError) as raised:
        resolve(admin, undecided, pb.RESOLUTION_ABORT, reason=" ")
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # The audit records survive a SIGKILL and a restart.
    expected_decided = [
        (ADMIN, "resolve", "refused abort", "OPS-1: test"),
        (ADMIN, "resolve", "commit", "OPS-2: commit the decided transfer"),
    ]
    expected_undecided = [
        (ADMIN, "resolve", "refused commit", "OPS-1: test"),
        (ADMIN, "resolve", "abort", "OPS-3: stray branch"),
    ]
    live_cluster.kill("coordinator")
    restart_coordinator(live_cluster, None)
    assert audit_of(admin, txid) == expected_decided
    assert audit_of(admin, undecided) == expected_undecided
    shown = admin.Show(pb.AdminShowRequest(txid=txid), timeout=30)
    assert [(a.action, a.outcome.split(":")[0]) for a in shown.audit] == [
        ("resolve", "refused abort"),
        ("resolve", "commit"),
    ]
    assert shown.info.state == twopc_pb2.TRANSACTION_STATE_COMMITTED


def test_resolve_abort_of_a_live_transaction_tells_its_client_who_and_why(
    live_cluster: Cluster, admin: pb_grpc.AdminStub, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=30)
    tx.execute("eu", "UPDATE accounts SET balance = balance - 1 WHERE id = %s", [6])
    done = resolve(admin, tx.txid, pb.RESOLUTION_ABORT, "OPS-4: holds locks over lunch")
    assert done.state == twopc_pb2.TRANSACTION_STATE_ABORTED
    with pytest.raises(TwopcError, match="aborted by operator 'admin': OPS-4: holds locks"):
        tx.execute("eu", "SELECT 1")
    assert balance(live_cluster, "eu", 6) == 1000
    expected = [(ADMIN, "resolve", "abort", "OPS-4: holds locks over lunch")]
    assert audit_of(admin, tx.txid) == expected


def test_another_coordinators_stray_branch_is_concluded_with_a_reason(
    live_cluster: Cluster, admin: pb_grpc.AdminStub, bank: int
) -> None:
    """The Vitess ``conclude`` case: a decommissioned coordinator (``elsewhere``, an id the
    playground's agents serve beside this one) left prepared branches that this coordinator's
    recovery never touches. Commit writes the decision to this
    log first, then phase 2."""
    stray = f"{RETIRED}.r-admin-stray"
    prepare_on_agent(live_cluster, "eu", stray, -10, 8)
    prepare_on_agent(live_cluster, "us", stray, 10, 8)
    listing = admin.List(pb.AdminListRequest(coordinator_id=RETIRED), timeout=30)
    assert [(d.txid, list(d.prepared_on)) for d in listing.in_doubt] == [(stray, ["eu", "us"])]
    done = resolve(admin, stray, pb.RESOLUTION_COMMIT, "OPS-5: gone for good")
    assert done.state == twopc_pb2.TRANSACTION_STATE_COMMITTED, done.detail
    assert markers(live_cluster, stray) == {"eu", "us"}
    assert (balance(live_cluster, "eu", 8), balance(live_cluster, "us", 8)) == (990, 1010)
    error = refused(admin, stray, pb.RESOLUTION_ABORT)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_drain_refuses_new_transactions_while_live_ones_commit(
    live_cluster: Cluster, admin: pb_grpc.AdminStub, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=30)
    tx.execute("eu", "UPDATE accounts SET balance = balance - 5 WHERE id = %s", [9])
    tx.execute("us", "UPDATE accounts SET balance = balance + 5 WHERE id = %s", [9])
    try:
        drained = admin.Drain(pb.DrainRequest(reason="OPS-6: rolling restart"), timeout=10)
        assert drained.draining
        assert drained.live_count == 1
        with live_cluster.channel("coordinator", identity=CLIENT) as channel:
            stub = twopc_pb2_grpc.CoordinatorStub(channel)
            for call, request in (
                (stub.Begin, twopc_pb2.BeginRequest()),
                (stub.RunTransaction, ONE_SHOT),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    call(request, timeout=10)
                assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "is draining" in (raised.value.details() or "")
                assert "use another coordinator" in (raised.value.details() or "")
        listing = admin.List(pb.AdminListRequest(), timeout=30)
        assert listing.draining
        assert listing.live_count == 1
        tx.commit(wait_for_phase2=True)  # the live one finishes
        assert markers(live_cluster, tx.txid) == {"eu", "us"}
    finally:
        undrained = admin.Undrain(pb.DrainRequest(reason="OPS-6: done"), timeout=10)
    assert not undrained.draining
    client.run({"eu": transfer_sql(1, 9)})  # admitted again
    entries = admin.Audit(pb.AuditRequest(limit=2), timeout=10).entries
    assert [(e.action, e.outcome, e.reason) for e in entries] == [
        ("drain", "draining", "OPS-6: rolling restart"),
        ("undrain", "admitting", "OPS-6: done"),
    ]
