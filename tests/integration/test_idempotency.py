"""Every RPC of the protocol is idempotent: a retried request has the effect of one request and
gets the same answer. Driven with raw gRPC stubs, as a client library with its own retries would."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from tests.support import balance, markers, prepared, sleeping_sessions
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import CLIENT, COORDINATOR
from twopc.txid import Xid
from twopc.values import to_values


def statement(sql: str, *params: object) -> pb.Statement:
    return pb.Statement(sql=sql, params=to_values(params))


@pytest.fixture
def coordinator(live_cluster: Cluster) -> Iterator[pb_grpc.CoordinatorStub]:
    with live_cluster.channel(live_cluster.coordinator_address, identity=CLIENT) as channel:
        yield pb_grpc.CoordinatorStub(channel)


@pytest.fixture
def agent_us(live_cluster: Cluster) -> Iterator[pb_grpc.ParticipantStub]:
    with live_cluster.channel("agent-us", identity=COORDINATOR) as channel:
        yield pb_grpc.ParticipantStub(channel)


def test_coordinator_rpcs_retried(
    live_cluster: Cluster, coordinator: pb_grpc.CoordinatorStub, bank: int
) -> None:
    first = coordinator.Begin(pb.BeginRequest(timeout_ms=5000, request_id="idem-begin"))
    again = coordinator.Begin(pb.BeginRequest(timeout_ms=5000, request_id="idem-begin"))
    assert first.txid == again.txid
    txid = first.txid

    debit = pb.ExecuteRequest(
        txid=txid,
        participant="eu",
        sequence=1,
        statements=[statement("UPDATE accounts SET balance = balance - %s WHERE id = %s", 10, 0)],
    )
    credit = pb.ExecuteRequest(
        txid=txid,
        participant="us",
        sequence=1,
        statements=[statement("UPDATE accounts SET balance = balance + %s WHERE id = %s", 10, 0)],
    )
    for request in (debit, debit, credit, credit, credit):
        assert coordinator.Execute(request).results[0].affected_rows == 1

    gap = pb.ExecuteRequest(
        txid=txid,
        participant="eu",
        sequence=3,
        statements=[statement("SELECT balance FROM accounts WHERE id = 0")],
    )
    assert coordinator.Execute(gap).results[0].rows[0].values[0].int_value == 990
    stale = pb.ExecuteRequest(txid=txid, participant="eu", sequence=2, statements=gap.statements)
    with pytest.raises(grpc.RpcError) as caught:
        coordinator.Execute(stale)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "stale Execute" in caught.value.details()

    commits = [
        coordinator.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True)) for _ in range(3)
    ]
    assert {c.state for c in commits} == {pb.TRANSACTION_STATE_COMMITTED}
    assert balance(live_cluster, "eu", 0) == 990  # debited once, not twice
    assert balance(live_cluster, "us", 0) == 1010

    with pytest.raises(grpc.RpcError) as caught:
        coordinator.Rollback(pb.RollbackRequest(txid=txid))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION

    infos = [coordinator.GetTransaction(pb.GetTransactionRequest(txid=txid)) for _ in range(2)]
    assert all(i.outcome == pb.OUTCOME_COMMITTED for i in infos)


def test_rollback_retried(coordinator: pb_grpc.CoordinatorStub, bank: int) -> None:
    txid = coordinator.Begin(pb.BeginRequest(timeout_ms=5000)).txid
    coordinator.Execute(
        pb.ExecuteRequest(
            txid=txid,
            participant="ap",
            sequence=1,
            statements=[statement("UPDATE accounts SET balance = 0 WHERE id = 1")],
        )
    )
    states = [coordinator.Rollback(pb.RollbackRequest(txid=txid)).state for _ in range(3)]
    assert states == [pb.TRANSACTION_STATE_ABORTED] * 3
    with pytest.raises(grpc.RpcError) as caught:
        coordinator.Commit(pb.CommitRequest(txid=txid))
    assert caught.value.code() is grpc.StatusCode.ABORTED


def test_one_shot_retried_with_the_same_request_id_applies_once(
    live_cluster: Cluster, coordinator: pb_grpc.CoordinatorStub, bank: int
) -> None:
    request = pb.RunTransactionRequest(
        timeout_ms=5000,
        request_id="idem-run",
        wait_for_phase2=True,
        work=[
            pb.ParticipantStatements(
                participant="eu",
                statements=[statement("UPDATE accounts SET balance = balance - 1 WHERE id = 9")],
            ),
            pb.ParticipantStatements(
                participant="ap",
                statements=[statement("UPDATE accounts SET balance = balance + 1 WHERE id = 9")],
            ),
        ],
    )
    answers = [coordinator.RunTransaction(request) for _ in range(3)]
    assert len({a.txid for a in answers}) == 1
    assert balance(live_cluster, "eu", 9) == 999
    assert balance(live_cluster, "ap", 9) == 1001


def test_participant_rpcs_retried(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    txid = "elsewhere.r-idem-agent"  # not this coordinator's: its recovery keeps off
    work = [statement("UPDATE accounts SET balance = balance + 100 WHERE id = 4")]
    execute = pb.BranchExecuteRequest(
        txid=txid, participant="us", sequence=1, timeout_ms=10_000, statements=work
    )
    agent_us.Execute(execute)
    agent_us.Execute(execute)
    votes = [agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us")) for _ in range(2)]
    assert [v.vote for v in votes] == [pb.VOTE_PREPARED] * 2
    assert prepared(live_cluster) == {"us": [txid]}
    recovered = agent_us.Recover(pb.RecoverRequest(txid_prefix="elsewhere.r-idem"))
    assert [(b.txid, b.held_by_this_agent) for b in recovered.branches] == [(txid, True)]

    commit = pb.BranchCommitRequest(txid=txid, participant="us")
    assert agent_us.Commit(commit).already_committed is False
    assert agent_us.Commit(commit).already_committed is True
    assert balance(live_cluster, "us", 4) == 1100
    assert markers(live_cluster, txid) == {"us"}
    with pytest.raises(grpc.RpcError) as caught:
        agent_us.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    state = agent_us.Inspect(pb.InspectRequest(txids=[txid])).branches[0].state
    assert state == pb.BRANCH_STATE_COMMITTED


def test_participant_rollback_retried_and_misrouted_calls_refused(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    txid = "elsewhere.r-idem-agent-rb"
    agent_us.Execute(
        pb.BranchExecuteRequest(
            txid=txid,
            participant="us",
            sequence=1,
            timeout_ms=10_000,
            statements=[statement("UPDATE accounts SET balance = 0 WHERE id = 5")],
        )
    )
    agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us"))
    rollback = pb.BranchRollbackRequest(txid=txid, participant="us")
    assert agent_us.Rollback(rollback).already_rolled_back is False
    assert agent_us.Rollback(rollback).already_rolled_back is True
    assert balance(live_cluster, "us", 5) == 1000
    vote = agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us"))
    assert vote.vote == pb.VOTE_ABORT

    with pytest.raises(grpc.RpcError) as caught:
        agent_us.Execute(
            pb.BranchExecuteRequest(txid="c1.r-x", participant="eu", sequence=1, statements=[])
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "serves participant 'us', not 'eu'" in caught.value.details()


def test_rollback_that_overtakes_its_request_refuses_the_request_later(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    """A one-phase commit whose answer was lost is settled by a rollback; if the commit request
    is still on its way, it must not commit when it finally arrives."""
    txid = "elsewhere.r-overtaken"
    rollback = agent_us.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"))
    assert rollback.already_rolled_back is True
    late = pb.BranchCommitRequest(
        txid=txid,
        participant="us",
        one_phase=True,
        sequence=1,
        timeout_ms=10_000,
        statements=[statement("UPDATE accounts SET balance = balance + 1 WHERE id = 8")],
    )
    with pytest.raises(grpc.RpcError) as caught:
        agent_us.Commit(late)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    vote = agent_us.Prepare(
        pb.PrepareRequest(txid=txid, participant="us", sequence=1, statements=late.statements)
    )
    assert vote.vote == pb.VOTE_ABORT
    assert balance(live_cluster, "us", 8) == 1000
    assert markers(live_cluster, txid) == set()


def prepare_behind_the_agents_back(cluster: Cluster, txid: str) -> None:
    """A prepared branch of ``txid`` on us that the agent did not see being prepared (as when
    its connection broke while the server was still executing XA PREPARE)."""
    xid = Xid(txid, "us")
    with cluster.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute(f"XA START {xid.sql()}")
        cursor.execute("UPDATE accounts SET balance = balance + 500 WHERE id = 7")
        cursor.execute(f"XA END {xid.sql()}")
        cursor.execute(f"XA PREPARE {xid.sql()}")


@pytest.mark.parametrize("decision", ["rollback", "commit"])
def test_agent_memory_of_a_rolled_back_branch_does_not_hide_a_prepared_one(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int, decision: str
) -> None:
    """Found by the chaos harness: the agent remembered a branch as rolled back while the server
    held it prepared, answered every rollback 'already rolled back' and left it stuck."""
    txid = f"elsewhere.r-memory-{decision}"
    agent_us.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"))  # remembered
    prepare_behind_the_agents_back(live_cluster, txid)
    assert prepared(live_cluster) == {"us": [txid]}
    if decision == "rollback":
        agent_us.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"))
        assert balance(live_cluster, "us", 7) == 1000
    else:
        agent_us.Commit(pb.BranchCommitRequest(txid=txid, participant="us"))
        assert balance(live_cluster, "us", 7) == 1500
    assert prepared(live_cluster) == {}


def commit_behind_the_agents_back(cluster: Cluster, txid: str) -> None:
    """A branch of ``txid`` on us, with its marker, committed without the agent knowing (as a
    one-phase commit does that lands after the agent lost its connection and its database)."""
    xid = Xid(txid, "us")
    with cluster.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute(f"XA START {xid.sql()}")
        cursor.execute("UPDATE accounts SET balance = balance + 500 WHERE id = 3")
        cursor.execute(
            "INSERT INTO twopc_branch_marker (gtrid, bqual, owner_thread, agent_instance) "
            "VALUES (%s, %s, CONNECTION_ID(), %s)",
            [xid.gtrid, xid.bqual, "0" * 32],
        )
        cursor.execute(f"XA END {xid.sql()}")
        cursor.execute(f"XA COMMIT {xid.sql()} ONE PHASE")


def test_a_remembered_rollback_does_not_hide_a_commit_that_landed_later(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    """Found by the chaos run with seed 105 (I3 broken): a one-phase commit was landing when
    its database was SIGKILLed; the settling rollback could not reach the database but left the
    agent remembering the txid as rolled back; the client's retry was refused with that memory
    and reported ABORTED, while the first commit had landed."""
    txid = "elsewhere.r-landed-later"
    agent_us.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"))  # remembered
    commit_behind_the_agents_back(live_cluster, txid)
    retried = [statement("UPDATE accounts SET balance = balance + 1 WHERE id = 3")]
    reply = agent_us.Commit(
        pb.BranchCommitRequest(
            txid=txid,
            participant="us",
            one_phase=True,
            sequence=1,
            timeout_ms=10_000,
            statements=retried,
        )
    )
    assert reply.already_committed is True
    vote = agent_us.Prepare(
        pb.PrepareRequest(txid=txid, participant="us", sequence=1, statements=retried)
    )
    assert vote.vote == pb.VOTE_ALREADY_COMMITTED
    assert balance(live_cluster, "us", 3) == 1500  # the retry ran nothing


def test_commit_many_retried_answers_each_branch_on_its_own(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    txids = [f"elsewhere.r-many-{i}" for i in range(3)]
    for index, txid in enumerate(txids[:2]):
        agent_us.Execute(
            pb.BranchExecuteRequest(
                txid=txid,
                participant="us",
                sequence=1,
                timeout_ms=10_000,
                statements=[
                    statement("UPDATE accounts SET balance = balance + 1 WHERE id = %s", index)
                ],
            )
        )
        agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us"))
    request = pb.CommitManyRequest(participant="us", txids=txids)
    first = agent_us.CommitMany(request).outcomes
    again = agent_us.CommitMany(request).outcomes
    assert [o.txid for o in first] == txids
    assert [(o.error_code, o.already_committed) for o in first[:2]] == [("", False)] * 2
    assert [(o.error_code, o.already_committed) for o in again[:2]] == [("", True)] * 2
    assert first[2].error_code == "FAILED_PRECONDITION"  # never prepared: cannot commit
    assert balance(live_cluster, "us", 0) == 1001
    assert balance(live_cluster, "us", 1) == 1001
    assert markers(live_cluster, txids[0]) == {"us"}


def test_a_branch_whose_commit_the_database_lost_is_reported_not_declared_rolled_back(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    """MariaDB 10.11 can answer OK to an XA COMMIT racing with the KILL of the branch's owner and
    leave the transaction uncommitted, out of XA RECOVER, holding its marker row (see
    test_owner_kill_race.py). Asked to commit such a branch, the agent must not call it rolled
    back (FAILED_PRECONDITION: the coordinator would close its COMMIT record): it answers
    UNAVAILABLE and says to restart the database. Here a plain transaction holding the marker
    row uncommitted stands for the lost one."""
    txid = "elsewhere.r-lost-commit"
    xid = Xid(txid, "us")
    with live_cluster.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(
            "INSERT INTO twopc_branch_marker (gtrid, bqual, owner_thread, agent_instance) "
            "VALUES (%s, %s, CONNECTION_ID(), %s)",
            [xid.gtrid, xid.bqual, "0" * 32],
        )
        with pytest.raises(grpc.RpcError) as failed:
            agent_us.Commit(pb.BranchCommitRequest(txid=txid, participant="us"), timeout=20)
        cursor.execute("ROLLBACK")
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value
    assert "restart that database" in (failed.value.details() or "")


def test_a_caller_that_gives_up_mid_statement_leaves_the_branch_whole(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    """The agent's calls run on its event loop; a cancelled RPC must not cancel the work halfway
    (a statement cut off mid-answer would close the session and lose the branch). Retrying the
    same call gets the first answer, and the branch goes on to commit."""
    txid = "elsewhere.r-caller-gave-up"
    work = [
        statement("UPDATE accounts SET balance = balance + 7 WHERE id = 5"),
        statement("SELECT SLEEP(0.8)"),
    ]
    execute = pb.BranchExecuteRequest(
        txid=txid, participant="us", sequence=1, timeout_ms=20_000, statements=work
    )
    with pytest.raises(grpc.RpcError) as gave_up:
        agent_us.Execute(execute, timeout=0.2)
    assert gave_up.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    retried = agent_us.Execute(execute, timeout=10)  # waits for the first call, then its answer
    assert retried.results[0].affected_rows == 1
    vote = agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us"), timeout=10)
    assert vote.vote == pb.VOTE_PREPARED
    agent_us.Commit(pb.BranchCommitRequest(txid=txid, participant="us"), timeout=10)
    assert balance(live_cluster, "us", 5) == 1007
    assert markers(live_cluster, txid) == {"us"}


def test_a_pipeline_stream_broken_mid_prepare_leaves_the_branch_prepared(
    live_cluster: Cluster, agent_us: pb_grpc.ParticipantStub, bank: int
) -> None:
    """A prepare on the coordinator's stream runs to its end when the stream breaks under it
    (the coordinator restarted): a retried Prepare gets PREPARED, and the branch commits."""
    txid = "elsewhere.r-stream-broke"
    prepare = pb.PrepareRequest(
        txid=txid,
        participant="us",
        sequence=1,
        timeout_ms=20_000,
        statements=[
            statement("UPDATE accounts SET balance = balance + 9 WHERE id = 6"),
            statement("SELECT SLEEP(0.8)"),
        ],
    )
    hold_open = threading.Event()

    def requests() -> Iterator[pb.PipelineRequest]:
        yield pb.PipelineRequest(calls=[pb.PipelineCall(id=1, prepare=prepare)])
        hold_open.wait(30)

    stream = agent_us.Pipeline(requests())
    try:
        wait_until(lambda: sleeping_sessions(live_cluster, "us") == 1, 10, "the prepare running")
        stream.cancel()
    finally:
        hold_open.set()
    vote = agent_us.Prepare(pb.PrepareRequest(txid=txid, participant="us"), timeout=10)
    assert vote.vote == pb.VOTE_PREPARED
    agent_us.Commit(pb.BranchCommitRequest(txid=txid, participant="us"), timeout=10)
    assert balance(live_cluster, "us", 6) == 1009
    assert markers(live_cluster, txid) == {"us"}
