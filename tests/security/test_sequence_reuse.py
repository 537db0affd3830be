"""A reused sequence number with other statements is refused, not answered with the first result
(issue 10, finding 11, second half).

An Execute repeats its sequence number when it is retried, and is answered with its first answer
without running again. Another Execute under a used number, with other SQL, got that first
answer too: the caller believed work had run that never ran. Now the coordinator and each agent
compare a digest of the statements and parameters: the same, a retry (the first answer); other,
InvalidArgument, with the transaction as it was.
"""

from __future__ import annotations

import grpc
import pytest

from tests.security.hostile import (
    agent,
    branch_state,
    code,
    coordinator,
    details,
    new_txid,
    refused,
    statement,
)
from tests.support import balance
from twopc.api import twopc_pb2 as pb
from twopc.testing.playground.cluster import Cluster


def _add(amount: int) -> pb.Statement:
    return statement(
        "UPDATE accounts SET balance = balance + %s WHERE id = %s",
        pb.Value(int_value=amount),
        pb.Value(int_value=6),
    )


SELECT_BALANCE = statement("SELECT balance FROM accounts WHERE id = 6")
OTHER_WORK = [
    pytest.param([_add(100)], id="other-parameters"),
    pytest.param([statement("UPDATE accounts SET balance = balance + 1 WHERE id = 6")], id="sql"),
    pytest.param([_add(1), _add(1)], id="one-more-statement"),
    pytest.param([SELECT_BALANCE], id="a-read"),
]


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("other", OTHER_WORK)
def test_an_agent_refuses_a_used_sequence_for_other_work(
    live_cluster: Cluster, other: list[pb.Statement]
) -> None:
    txid = new_txid(live_cluster)
    with agent(live_cluster, "eu") as stub:

        def execute(sequence: int, statements: list[pb.Statement]) -> pb.BranchExecuteResponse:
            request = pb.BranchExecuteRequest(
                txid=txid, participant="eu", sequence=sequence, timeout_ms=10_000
            )
            request.statements.extend(statements)
            return stub.Execute(request, timeout=10)

        first = execute(1, [_add(1)])
        error = refused(lambda: execute(1, other))
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert "sequence 1 on eu was used already, for other statements or parameters" in details(
            error
        )
        assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_ACTIVE
        assert execute(1, [_add(1)]) == first  # a retry: the first answer, nothing run again
        after = execute(2, [SELECT_BALANCE])
        stub.Commit(pb.BranchCommitRequest(txid=txid, participant="eu", one_phase=True))
    assert after.results[0].rows[0].values[0].int_value == 1001
    assert balance(live_cluster, "eu", 6) == 1001


@pytest.mark.usefixtures("bank")
def test_an_agent_refuses_a_retried_one_shot_prepare_with_other_statements(
    live_cluster: Cluster,
) -> None:
    txid = new_txid(live_cluster)

    def prepare(statements: list[pb.Statement]) -> pb.PrepareResponse:
        request = pb.PrepareRequest(txid=txid, participant="eu", sequence=1, timeout_ms=10_000)
        request.statements.extend(statements)
        return stub.Prepare(request, timeout=10)

    with agent(live_cluster, "eu") as stub:
        try:
            assert prepare([_add(1)]).vote == pb.VOTE_PREPARED
            error = refused(lambda: prepare([_add(100)]))
            assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
            assert "sequence 1 on eu was used already" in details(error)
            assert prepare([_add(1)]).vote == pb.VOTE_PREPARED  # the retry
        finally:
            stub.Rollback(pb.BranchRollbackRequest(txid=txid, participant="eu"), timeout=10)
    assert balance(live_cluster, "eu", 6) == 1000


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("other", OTHER_WORK)
def test_the_coordinator_refuses_a_used_sequence_for_other_work(
    live_cluster: Cluster, other: list[pb.Statement]
) -> None:
    with coordinator(live_cluster) as stub:
        txid = stub.Begin(pb.BeginRequest(timeout_ms=10_000), timeout=10).txid

        def execute(sequence: int, statements: list[pb.Statement]) -> pb.ExecuteResponse:
            request = pb.ExecuteRequest(txid=txid, participant="eu", sequence=sequence)
            request.statements.extend(statements)
            return stub.Execute(request, timeout=10)

        first = execute(1, [_add(1)])
        error = refused(lambda: execute(1, other))
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        message = details(error)
        assert "Execute sequence 1 on participant 'eu' ran already" in message
        assert "the transaction is as it was" in message
        assert execute(1, [_add(1)]) == first
        execute(2, [_add(10)])
        answer = stub.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)
    assert answer.state == pb.TRANSACTION_STATE_COMMITTED
    assert balance(live_cluster, "eu", 6) == 1011
