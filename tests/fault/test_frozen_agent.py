"""A prepared branch held by a frozen agent (SIGSTOP: its database session stays alive, so every
other session gets XAER_NOTA) is finished by a replacement agent, which finds the owner session
through the branch's marker row and kills it. Without that, the branch and its row locks would
stay stuck until the server's wait_timeout (hours)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import grpc
import pymysql
import pytest

from tests.support import balance, markers, prepare_on_agent, prepared
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.ports import free_port
from twopc.testing.playground.tls import COORDINATOR


@pytest.fixture
def replacement(live_cluster: Cluster) -> Iterator[pb_grpc.ParticipantStub]:
    """agent-eu frozen with SIGSTOP, and a second agent for the same database on another port."""
    frozen = live_cluster.component("agent-eu")
    address = f"127.0.0.1:{free_port()}"
    frozen.send(signal.SIGSTOP)
    process = subprocess.Popen(
        frozen.command,
        cwd=frozen.cwd,
        env={
            **os.environ,
            **frozen.env,
            "TWOPC_AGENT_LISTEN": address,
            # the frozen agent still holds its metrics port
            "TWOPC_AGENT_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with live_cluster.channel(address, identity=COORDINATOR) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield pb_grpc.ParticipantStub(channel)
    finally:
        process.terminate()
        process.wait(timeout=30)
        frozen.send(signal.SIGCONT)


def lock_is_free(cluster: Cluster, account: int) -> bool:
    with cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
        try:
            cursor.execute("SELECT balance FROM accounts WHERE id = %s FOR UPDATE", [account])
        except pymysql.err.OperationalError:
            return False
    return True


@pytest.mark.parametrize("decision", ["commit", "rollback"])
def test_replacement_agent_frees_a_branch_held_by_a_frozen_one(
    live_cluster: Cluster, bank: int, decision: str, request: pytest.FixtureRequest
) -> None:
    # Another coordinator's txid: this cluster's coordinator keeps off it (its recovery would
    # roll back a branch of its own that has no commit record before the test looks).
    txid = f"elsewhere.r-frozen-{decision}"
    prepare_on_agent(live_cluster, "eu", txid, amount=77, account=6)
    assert not lock_is_free(live_cluster, 6)
    # The replacement is asked directly, as a coordinator would ask it after taking over the
    # region; the frozen agent can answer nobody.
    agent: pb_grpc.ParticipantStub = request.getfixturevalue("replacement")
    if decision == "commit":
        reply = agent.Commit(pb.BranchCommitRequest(txid=txid, participant="eu"))
        assert reply.already_committed is False
    else:
        undone = agent.Rollback(pb.BranchRollbackRequest(txid=txid, participant="eu"))
        assert undone.already_rolled_back is False
    assert "eu" not in prepared(live_cluster)
    assert lock_is_free(live_cluster, 6)
    assert markers(live_cluster, txid) == ({"eu"} if decision == "commit" else set())
    assert balance(live_cluster, "eu", 6) == (1077 if decision == "commit" else 1000)
