"""Fencing at the agent (participants/fences.py), through its gRPC API on a real MariaDB: once a
coordinator id's lease epoch has been seen, every call of an older epoch that would change a
branch is refused with Fenced, across an agent restart too; raising the epoch rolls back the
older epoch's active branches (their locks go at once); the epoch is kept only for ids the agent
serves."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc
import pytest

from tests.support import prepare_on_agent
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import Fenced, TwopcError
from twopc.status import error_from_rpc
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import COORDINATOR, TEST_COORDINATOR_ID, Cluster

ID = TEST_COORDINATOR_ID  # served by the agents, recovered by no coordinator
_numbers = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(tmp_path_factory.mktemp("fences"), ["eu"])
    try:
        cluster.up()
        create_accounts(cluster, 10)
        yield cluster
    finally:
        cluster.down(timeout=10)


@pytest.fixture
def agent(cluster: Cluster) -> Iterator[pb_grpc.ParticipantStub]:
    with cluster.channel("agent-eu", identity=COORDINATOR) as channel:
        yield pb_grpc.ParticipantStub(channel)


def txid() -> str:
    return f"{ID}.r-fence-{next(_numbers)}"


def fence(cluster: Cluster, coordinator_id: str = ID) -> int:
    """The highest epoch the agent keeps for ``coordinator_id`` (read from its fence rows)."""
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT MAX(bqual) FROM twopc_branch_marker WHERE gtrid = %s",
            [f"epoch/{coordinator_id}".encode()],
        )
        (found,) = cursor.fetchone()
    return int.from_bytes(found, "big") if found is not None else 0


def refusal(call: object, request: object) -> TwopcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)  # type: ignore[operator]
    return error_from_rpc(caught.value)


def test_an_older_epoch_is_refused_once_a_newer_one_was_seen_and_after_a_restart(
    cluster: Cluster, agent: pb_grpc.ParticipantStub
) -> None:
    new = fence(cluster) + 2
    tx = txid()
    prepare_on_agent(cluster, "eu", tx, -1, 1, epoch=new)
    assert fence(cluster) == new, "the new epoch is in the database before the call went on"

    old = new - 1
    for call, request in (
        (agent.Commit, pb.BranchCommitRequest(txid=tx, participant="eu", epoch=old)),
        (agent.Rollback, pb.BranchRollbackRequest(txid=tx, participant="eu", epoch=old)),
        (agent.Prepare, pb.PrepareRequest(txid=tx, participant="eu", epoch=old)),
        (agent.Recover, pb.RecoverRequest(txid_prefix=f"{ID}.", epoch=old)),
    ):
        error = refusal(call, request)
        assert isinstance(error, Fenced), error
        assert error.code == "FAILED_PRECONDITION"
        assert f"epoch {new} of that id has been seen" in error.message
    outcome = agent.CommitMany(pb.CommitManyRequest(participant="eu", txids=[tx], epoch=old))
    assert outcome.outcomes[0].error_class == "Fenced"
    # Epoch 0 (a coordinator without a lease) is older than any: refused as well.
    assert isinstance(
        refusal(agent.Commit, pb.BranchCommitRequest(txid=tx, participant="eu")), Fenced
    )

    cluster.restart("agent-eu")
    with cluster.channel("agent-eu", identity=COORDINATOR) as channel:
        restarted = pb_grpc.ParticipantStub(channel)
        error = refusal(
            restarted.Commit, pb.BranchCommitRequest(txid=tx, participant="eu", epoch=old)
        )
        assert isinstance(error, Fenced), "the epoch outlived the agent's restart"
        restarted.Commit(pb.BranchCommitRequest(txid=tx, participant="eu", epoch=new))
        again = restarted.Commit(pb.BranchCommitRequest(txid=tx, participant="eu", epoch=new))
        assert again.already_committed


def test_a_newer_epoch_rolls_back_the_older_epochs_active_branches(
    cluster: Cluster, agent: pb_grpc.ParticipantStub
) -> None:
    old = fence(cluster) + 1
    tx = txid()
    agent.Execute(
        pb.BranchExecuteRequest(
            txid=tx,
            participant="eu",
            sequence=1,
            timeout_ms=60_000,
            epoch=old,
            statements=[pb.Statement(sql="UPDATE accounts SET balance = balance + 1 WHERE id = 3")],
        )
    )
    agent.Recover(pb.RecoverRequest(txid_prefix=f"{ID}.", epoch=old + 1))  # the new holder looks
    status = agent.Inspect(pb.InspectRequest(txids=[tx])).branches[0].state
    assert status in (pb.BRANCH_STATE_ROLLED_BACK, pb.BRANCH_STATE_UNKNOWN)
    # Its row lock went with it: another session updates the row without waiting.
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cursor.execute("UPDATE accounts SET balance = balance WHERE id = 3")
        conn.commit()
    error = refusal(
        agent.Execute,
        pb.BranchExecuteRequest(
            txid=tx, participant="eu", sequence=2, timeout_ms=1000, epoch=old, continues=True
        ),
    )
    assert isinstance(error, Fenced)


def test_an_epoch_is_kept_only_for_the_ids_the_agent_serves(
    cluster: Cluster, agent: pb_grpc.ParticipantStub
) -> None:
    stranger = "nobody.r-fence-stranger"
    error = refusal(
        agent.Rollback, pb.BranchRollbackRequest(txid=stranger, participant="eu", epoch=7)
    )
    assert error.code == "FAILED_PRECONDITION"
    assert not isinstance(error, Fenced)
    assert "does not serve coordinator id nobody" in error.message
    assert fence(cluster, "nobody") == 0
    # A Recover with an epoch names one id's prefix exactly.
    error = refusal(agent.Recover, pb.RecoverRequest(txid_prefix=f"{ID}.r-", epoch=fence(cluster)))
    assert error.code == "INVALID_ARGUMENT"
    # Without an epoch, a Recover is a listing: never refused for its epoch.
    agent.Recover(pb.RecoverRequest(txid_prefix=""))


def test_an_epoch_beyond_the_stores_range_is_refused_and_kept_nowhere(
    cluster: Cluster, agent: pb_grpc.ParticipantStub
) -> None:
    """A hostile (or broken) coordinator cannot fence its id for good with an epoch no lease
    can ever reach: past 2^63 - 1 (BIGINT) the call is refused and nothing is written."""
    before = fence(cluster)
    error = refusal(
        agent.Rollback,
        pb.BranchRollbackRequest(txid=txid(), participant="eu", epoch=2**64 - 1),
    )
    assert error.code == "INVALID_ARGUMENT"
    assert "out of range" in error.message
    assert fence(cluster) == before
