"""Oversized requests are refused before any of their work is done (issue 10, finding 8).

CommitMany with 20,000 unknown txids held an agent for 6 s; 1M parameters or 300k statements in
one Execute for 2-3 s (8 s here), and every transaction of the region waited. Each daemon now
bounds statements, parameters and characters of SQL per request, txids per CommitMany and
Inspect, and the size of a gRPC message, with InvalidArgument (RESOURCE_EXHAUSTED for the
message, from gRPC) naming the limit and its setting; the defaults are the ones checked here.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.security.hostile import (
    agent,
    branch_state,
    code,
    coordinator,
    details,
    new_request_id,
    new_txid,
    refused,
    statement,
)
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.txid import txid_for_request

SELECT_1 = statement("SELECT 1")
MANY_STATEMENTS = [SELECT_1] * 300_000


def _many_params(count: int) -> pb.Statement:
    sql = "SELECT 1 FROM DUAL WHERE 1 IN (" + ",".join(["%s"] * count) + ")"
    return pb.Statement(sql=sql, params=[pb.Value(int_value=i) for i in range(count)])


MANY_PARAMS = _many_params(1_000_000)
LONG_SQL = statement("SELECT 1 " + " " * 1024 * 1024)  # 1 MiB and 9 characters
OVERSIZED = {  # each the smallest request over its limit, and what the refusal says
    "statements": (
        [SELECT_1] * 1001,
        "1001 statements, more than the 1000 that {who} takes in one request (its "
        "max_statements setting)",
    ),
    "parameters": (
        [_many_params(40_000), _many_params(25_536)],
        "65536 parameters, more than the 65535 that {who} takes in one request (its "
        "max_params setting)",
    ),
    "sql": (
        [LONG_SQL],
        "1048585 characters of SQL, more than the 1048576 that {who} takes in one request "
        "(its max_sql_length setting)",
    ),
}


def _branch_calls(
    stub: pb_grpc.ParticipantStub, txid: str, statements: list[pb.Statement]
) -> dict[str, Callable[[], object]]:
    return {
        "execute": lambda: stub.Execute(
            pb.BranchExecuteRequest(
                txid=txid, participant="eu", sequence=1, timeout_ms=10_000, statements=statements
            ),
            timeout=30,
        ),
        "prepare": lambda: stub.Prepare(
            pb.PrepareRequest(
                txid=txid, participant="eu", sequence=1, timeout_ms=10_000, statements=statements
            ),
            timeout=30,
        ),
        "one-phase-commit": lambda: stub.Commit(
            pb.BranchCommitRequest(
                txid=txid,
                participant="eu",
                one_phase=True,
                sequence=1,
                timeout_ms=10_000,
                statements=statements,
            ),
            timeout=30,
        ),
    }


@pytest.mark.parametrize("path", ["execute", "prepare", "one-phase-commit"])
@pytest.mark.parametrize(
    ("statements", "message"),
    [
        pytest.param(
            MANY_STATEMENTS, "300000 statements, more than the 1000", id="300k-statements"
        ),
        pytest.param([MANY_PARAMS], "1000000 parameters, more than the 65535", id="1M-params"),
        *(pytest.param(*OVERSIZED[kind], id=f"{kind}-just-over") for kind in OVERSIZED),
    ],
)
def test_an_agent_refuses_an_oversized_request_before_any_work(
    live_cluster: Cluster, path: str, statements: list[pb.Statement], message: str
) -> None:
    txid = new_txid(live_cluster)
    with agent(live_cluster, "eu") as stub:
        error = refused(_branch_calls(stub, txid, statements)[path])
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert message.format(who="this agent") in details(error)
    assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN


@pytest.mark.parametrize("count", [20_000, 1025])
def test_an_agent_refuses_an_oversized_batch_of_txids(live_cluster: Cluster, count: int) -> None:
    txids = [new_txid(live_cluster) for _ in range(count)]
    expected = (
        f"carries {count} txids, more than the 1024 that this agent takes in one call (its "
        "max_batch_txids setting)"
    )
    with agent(live_cluster, "eu") as stub:
        for call, name in [
            (
                lambda: stub.CommitMany(pb.CommitManyRequest(participant="eu", txids=txids)),
                "Commit",
            ),
            (lambda: stub.Inspect(pb.InspectRequest(txids=txids)), "Inspect"),
        ]:
            error = refused(call)
            assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
            assert name in details(error)
            assert expected in details(error)
        # The limit, and not more: a batch of 1024 is answered.
        answer = stub.Inspect(pb.InspectRequest(txids=txids[:1024]), timeout=30)
    assert {b.state for b in answer.branches} == {pb.BRANCH_STATE_UNKNOWN}


def test_an_agent_refuses_a_message_over_its_size_limit(live_cluster: Cluster) -> None:
    txid = new_txid(live_cluster)
    blob = pb.Value(bytes_value=b"\x00" * (32 * 1024 * 1024))
    with agent(live_cluster, "eu") as stub:
        error = refused(
            lambda: stub.Execute(
                pb.BranchExecuteRequest(
                    txid=txid,
                    participant="eu",
                    sequence=1,
                    statements=[statement("SELECT LENGTH(%s)", blob)],
                ),
                timeout=30,
            )
        )
    assert code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details(error)
    assert "33554432" in details(error)
    assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN


@pytest.mark.parametrize("kind", list(OVERSIZED))
def test_the_coordinator_refuses_an_oversized_execute_and_the_transaction_goes_on(
    live_cluster: Cluster, kind: str
) -> None:
    statements, message = OVERSIZED[kind]
    with coordinator(live_cluster) as stub:
        txid = stub.Begin(pb.BeginRequest(timeout_ms=10_000), timeout=10).txid
        error = refused(
            lambda: stub.Execute(
                pb.ExecuteRequest(txid=txid, participant="eu", sequence=1, statements=statements),
                timeout=30,
            )
        )
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert message.format(who="the coordinator") in details(error)
        assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN
        stub.Execute(
            pb.ExecuteRequest(txid=txid, participant="eu", sequence=2, statements=[SELECT_1]),
            timeout=10,
        )
        assert stub.Commit(pb.CommitRequest(txid=txid), timeout=10).state in (
            pb.TRANSACTION_STATE_COMMITTED,
            pb.TRANSACTION_STATE_COMMITTING,
        )


@pytest.mark.parametrize("kind", list(OVERSIZED))
def test_the_coordinator_counts_a_one_shot_across_its_participants(
    live_cluster: Cluster, kind: str
) -> None:
    """Each participant's part is within the limits; together they are not."""
    statements, message = OVERSIZED[kind]
    half = len(statements) // 2 or 1
    parts = {"eu": statements[:half], "us": statements[half:]}
    if kind == "sql":  # one statement: two halves of it
        half_sql = statement("SELECT 1 " + " " * (512 * 1024))
        parts = {"eu": [half_sql], "us": [half_sql]}
        message = "1048594 characters of SQL, more than the 1048576"
    request_id = new_request_id("oversized")
    work = [pb.ParticipantStatements(participant=p, statements=s) for p, s in parts.items()]
    with coordinator(live_cluster) as stub:
        error = refused(
            lambda: stub.RunTransaction(
                pb.RunTransactionRequest(request_id=request_id, timeout_ms=10_000, work=work),
                timeout=30,
            )
        )
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert message.format(who="the coordinator") in details(error)
        info = stub.GetTransaction(pb.GetTransactionRequest(request_id=request_id), timeout=10)
    assert info.presumed
    txid = txid_for_request(live_cluster.coordinator_id, request_id)
    for region in ("eu", "us"):
        assert branch_state(live_cluster, region, txid) == pb.BRANCH_STATE_UNKNOWN


def test_the_coordinator_refuses_a_message_over_its_size_limit(live_cluster: Cluster) -> None:
    blob = pb.Value(bytes_value=b"\x00" * (16 * 1024 * 1024))
    work = [pb.ParticipantStatements(participant="eu", statements=[statement("SELECT %s", blob)])]
    with coordinator(live_cluster) as stub:
        error = refused(
            lambda: stub.RunTransaction(pb.RunTransactionRequest(work=work), timeout=30)
        )
    assert code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details(error)
    assert "16777216" in details(error)
