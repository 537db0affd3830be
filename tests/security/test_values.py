"""Parameters that MySQL cannot hold are refused where they are decoded, before any work (issue 10,
findings 2 and 9).

A decimal is written into the statement in fixed point, so ``1e500000000`` made an agent build
half a gigabyte of zeros and stall its region for seconds; NaN, infinities and a TIME beyond
MySQL's range made it fail with an internal "agent error", which aborted the transaction. Each is
now InvalidArgument: from the coordinator with nothing started, from an agent called directly
with no branch touched, and an interactive transaction stays usable on both.
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
    new_request_id,
    new_txid,
    refused,
    statement,
    trailing,
)
from tests.support import balance, prepared
from twopc.api import twopc_pb2 as pb
from twopc.status import TXID_KEY
from twopc.testing.playground.cluster import Cluster
from twopc.txid import txid_for_request

BOMB = pb.Value(decimal_value="1e500000000")

UNENCODABLE = [
    pytest.param(BOMB, "65 digits in all", id="decimal-exponent-bomb"),
    pytest.param(pb.Value(decimal_value="1e-39"), "38 after the point", id="decimal-tiny"),
    pytest.param(pb.Value(decimal_value="9" * 66), "65 digits in all", id="decimal-66-digits"),
    pytest.param(pb.Value(decimal_value="1" * 5000), "more than 100", id="decimal-long-text"),
    pytest.param(pb.Value(decimal_value="NaN"), "not a finite number", id="decimal-nan"),
    pytest.param(pb.Value(decimal_value="sNaN"), "not a finite number", id="decimal-snan"),
    pytest.param(pb.Value(decimal_value="Infinity"), "not a finite number", id="decimal-inf"),
    pytest.param(pb.Value(decimal_value="-Infinity"), "not a finite number", id="decimal-ninf"),
    pytest.param(pb.Value(double_value=float("nan")), "not a finite number", id="double-nan"),
    pytest.param(pb.Value(double_value=float("inf")), "not a finite number", id="double-inf"),
    pytest.param(pb.Value(double_value=float("-inf")), "not a finite number", id="double-ninf"),
    pytest.param(pb.Value(time_value="839:00:00"), "outside MySQL's range", id="time-839h"),
    pytest.param(pb.Value(time_value="-839:00:00"), "outside MySQL's range", id="time-neg"),
    pytest.param(pb.Value(time_value="99999999999999:00:00"), "malformed", id="time-overflow"),
    pytest.param(pb.Value(time_value="00:60:00"), "malformed", id="time-60-minutes"),
    pytest.param(pb.Value(datetime_value="2024-01-01 " + "0" * 100), "malformed", id="datetime"),
]

ADD_ONE = statement(
    "UPDATE accounts SET balance = balance + 1 WHERE id = %s", pb.Value(int_value=4)
)


def _bad(value: pb.Value) -> pb.Statement:
    return statement("SELECT 1 FROM accounts WHERE id = %s AND balance <> %s", pb.Value(), value)


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("regions", [("eu",), ("eu", "us")], ids=["one-region", "two-regions"])
def test_the_decimal_exponent_bomb_is_refused_by_the_coordinator_with_nothing_started(
    live_cluster: Cluster, regions: tuple[str, ...]
) -> None:
    request_id = new_request_id("bomb")
    work = [pb.ParticipantStatements(participant=r, statements=[ADD_ONE]) for r in regions]
    work[-1].statements.append(statement("SELECT %s", BOMB))
    with coordinator(live_cluster) as stub:
        error = refused(
            lambda: stub.RunTransaction(
                pb.RunTransactionRequest(request_id=request_id, timeout_ms=5000, work=work),
                timeout=10,
            )
        )
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        message = details(error)
        assert f"statement 2 for participant {regions[-1]!r} is refused" in message
        assert "parameter 1: decimal with 500000001 digits before the point" in message
        assert "no transaction was started" in message
        assert TXID_KEY not in trailing(error)
        info = stub.GetTransaction(pb.GetTransactionRequest(request_id=request_id), timeout=10)
    assert info.presumed
    assert not info.participants
    txid = txid_for_request(live_cluster.coordinator_id, request_id)
    for region in live_cluster.regions:
        assert branch_state(live_cluster, region, txid) == pb.BRANCH_STATE_UNKNOWN
    assert balance(live_cluster, "eu", 4) == 1000


def _entry_paths(txid: str, region: str, bad: pb.Statement) -> dict[str, object]:
    """Every request of the Participant API that carries statements, with ``bad`` among them."""
    return {
        "execute": pb.BranchExecuteRequest(
            txid=txid, participant=region, sequence=1, timeout_ms=5000, statements=[ADD_ONE, bad]
        ),
        "prepare": pb.PrepareRequest(
            txid=txid, participant=region, sequence=1, timeout_ms=5000, statements=[ADD_ONE, bad]
        ),
        "one-phase-commit": pb.BranchCommitRequest(
            txid=txid,
            participant=region,
            one_phase=True,
            sequence=1,
            timeout_ms=5000,
            statements=[ADD_ONE, bad],
        ),
    }


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("path", ["execute", "prepare", "one-phase-commit"])
@pytest.mark.parametrize(("value", "reason"), UNENCODABLE)
def test_an_agent_refuses_an_unencodable_parameter_before_touching_a_branch(
    live_cluster: Cluster, path: str, value: pb.Value, reason: str
) -> None:
    txid = new_txid(live_cluster)
    request = _entry_paths(txid, "eu", _bad(value))[path]
    with agent(live_cluster, "eu") as stub:
        call = {"execute": stub.Execute, "prepare": stub.Prepare, "one-phase-commit": stub.Commit}
        error = refused(lambda: call[path](request, timeout=10))
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "statement 2: parameter 2: " in details(error)
    assert reason in details(error)
    assert trailing(error).get(TXID_KEY) == txid
    assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN
    assert balance(live_cluster, "eu", 4) == 1000
    assert not prepared(live_cluster)


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize(("value", "reason"), UNENCODABLE)
def test_an_unencodable_parameter_leaves_a_branch_usable_on_the_agent(
    live_cluster: Cluster, value: pb.Value, reason: str
) -> None:
    txid = new_txid(live_cluster)

    def execute(sequence: int, *statements: pb.Statement) -> pb.BranchExecuteResponse:
        request = pb.BranchExecuteRequest(
            txid=txid, participant="eu", sequence=sequence, timeout_ms=10_000, statements=statements
        )
        return stub.Execute(request, timeout=10)

    with agent(live_cluster, "eu") as stub:
        execute(1, ADD_ONE)
        error = refused(lambda: execute(2, _bad(value)))
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in details(error)
        assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_ACTIVE
        execute(3, ADD_ONE)
        stub.Commit(pb.BranchCommitRequest(txid=txid, participant="eu", one_phase=True), timeout=10)
    assert balance(live_cluster, "eu", 4) == 1002


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize(("value", "reason"), UNENCODABLE)
def test_an_unencodable_parameter_leaves_a_transaction_usable_on_the_coordinator(
    live_cluster: Cluster, value: pb.Value, reason: str
) -> None:
    with coordinator(live_cluster) as stub:
        txid = stub.Begin(pb.BeginRequest(timeout_ms=10_000), timeout=10).txid

        def execute(sequence: int, region: str, *statements: pb.Statement) -> None:
            request = pb.ExecuteRequest(
                txid=txid, participant=region, sequence=sequence, statements=statements
            )
            stub.Execute(request, timeout=10)

        execute(1, "eu", ADD_ONE)
        error = refused(lambda: execute(1, "us", ADD_ONE, _bad(value)))
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert "statement 2 for participant 'us' is refused: parameter 2: " in details(error)
        assert reason in details(error)
        assert "the transaction is as it was" in details(error)
        assert branch_state(live_cluster, "us", txid) == pb.BRANCH_STATE_UNKNOWN
        execute(2, "us", ADD_ONE)
        answer = stub.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)
    assert answer.state == pb.TRANSACTION_STATE_COMMITTED
    assert balance(live_cluster, "eu", 4) == 1001
    assert balance(live_cluster, "us", 4) == 1001
