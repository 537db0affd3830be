"""Ids and timeouts from a hostile caller are checked before they are used or echoed (issue 10,
finding 9).

A txid with a newline, a non-ASCII character or a NUL was echoed into the trailing metadata of
the error, which gRPC then refused: the caller got INTERNAL "Invalid metadata"; a 1 MiB txid
overflowed the metadata limit (RESOURCE_EXHAUSTED). And an agent took any timeout_ms, so a
branch, its pooled session and its locks could be held for 49 days. Now each daemon answers
InvalidArgument, with a message that says what is wrong without repeating the garbage, before
anything starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.status import TXID_KEY
from twopc.testing.playground.cluster import Cluster

GARBAGE = [
    pytest.param("c1.\nabc", "character 4 is U+000A", id="newline"),
    pytest.param("c1.r-é", "character 6 is U+00E9", id="non-ascii"),
    pytest.param("c1.r-a\x00b", "character 7 is U+0000", id="nul"),
    pytest.param("c1.r-" + "a" * (1 << 20), "a value of 1048581 characters", id="one-mebibyte"),
]
SELECT_1 = statement("SELECT 1")


def _agent_calls(
    stub: pb_grpc.ParticipantStub, txid: str
) -> Iterator[tuple[str, Callable[[], object]]]:
    """Every Participant RPC that takes a txid, with ``txid``."""
    yield (
        "execute",
        lambda: stub.Execute(
            pb.BranchExecuteRequest(txid=txid, participant="eu", sequence=1, statements=[SELECT_1])
        ),
    )
    yield "prepare", lambda: stub.Prepare(pb.PrepareRequest(txid=txid, participant="eu"))
    yield (
        "one-shot prepare",
        lambda: stub.Prepare(
            pb.PrepareRequest(txid=txid, participant="eu", sequence=1, statements=[SELECT_1])
        ),
    )
    yield "commit", lambda: stub.Commit(pb.BranchCommitRequest(txid=txid, participant="eu"))
    yield (
        "one-phase commit",
        lambda: stub.Commit(
            pb.BranchCommitRequest(
                txid=txid, participant="eu", one_phase=True, sequence=1, statements=[SELECT_1]
            )
        ),
    )
    yield "rollback", lambda: stub.Rollback(pb.BranchRollbackRequest(txid=txid, participant="eu"))
    yield (
        "commit-many",
        lambda: stub.CommitMany(
            pb.CommitManyRequest(participant="eu", txids=["c1." + "0" * 32, txid])
        ),
    )
    yield "inspect", lambda: stub.Inspect(pb.InspectRequest(txids=[txid]))


def _assert_refused_without_echo(error: grpc.RpcError, what: str, garbage: str) -> None:
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT, details(error)
    message = details(error)
    assert what in message
    assert garbage not in message
    assert len(message) < 500
    assert TXID_KEY not in trailing(error)


@pytest.mark.parametrize(("txid", "what"), GARBAGE)
def test_an_agent_refuses_a_garbage_txid_on_every_call_without_echoing_it(
    live_cluster: Cluster, txid: str, what: str
) -> None:
    with agent(live_cluster, "eu") as stub:
        for name, call in _agent_calls(stub, txid):
            error = refused(call)
            _assert_refused_without_echo(error, what, txid)
            assert "is not a twopc transaction id" in details(error), name


@pytest.mark.parametrize(("txid", "what"), GARBAGE)
def test_an_agent_refuses_a_garbage_txid_on_its_pipeline(
    live_cluster: Cluster, txid: str, what: str
) -> None:
    with agent(live_cluster, "eu") as stub:
        calls = [pb.PipelineCall(id=7, prepare=pb.PrepareRequest(txid=txid, participant="eu"))]
        answers = list(stub.Pipeline(iter([pb.PipelineRequest(calls=calls)]), timeout=10))
    [answer] = [a for message in answers for a in message.answers]
    assert answer.id == 7
    assert answer.error.code == "INVALID_ARGUMENT"
    assert what in answer.error.message
    assert txid not in answer.error.message
    assert answer.error.txid == ""


@pytest.mark.parametrize(("name", "what"), [*GARBAGE, pytest.param("EU", "'EU'", id="upper")])
def test_an_agent_refuses_a_garbage_participant_name_without_echoing_it(
    live_cluster: Cluster, name: str, what: str
) -> None:
    txid = new_txid(live_cluster)
    with agent(live_cluster, "eu") as stub:
        error = refused(
            lambda: stub.Execute(
                pb.BranchExecuteRequest(txid=txid, participant=name, sequence=1, statements=[])
            )
        )
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert what in details(error)
    assert "participant name" in details(error)
    assert name not in details(error) or name == "EU"
    assert trailing(error).get(TXID_KEY) == txid
    assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN


@pytest.mark.parametrize(("txid", "what"), GARBAGE)
def test_the_coordinator_refuses_a_garbage_txid_without_echoing_it(
    live_cluster: Cluster, txid: str, what: str
) -> None:
    with coordinator(live_cluster) as stub:
        calls: list[Callable[[], object]] = [
            lambda: stub.Execute(
                pb.ExecuteRequest(txid=txid, participant="eu", sequence=1, statements=[SELECT_1])
            ),
            lambda: stub.Commit(pb.CommitRequest(txid=txid)),
            lambda: stub.Rollback(pb.RollbackRequest(txid=txid)),
            lambda: stub.GetTransaction(pb.GetTransactionRequest(txid=txid)),
        ]
        for call in calls:
            error = refused(call)
            _assert_refused_without_echo(error, what, txid)
            assert "is not a twopc transaction id" in details(error)


@pytest.mark.parametrize(("garbage", "what"), GARBAGE)
def test_the_coordinator_refuses_a_garbage_request_id_or_participant_without_echoing_it(
    live_cluster: Cluster, garbage: str, what: str
) -> None:
    with coordinator(live_cluster) as stub:
        txid = stub.Begin(pb.BeginRequest(timeout_ms=5000)).txid
        work = [pb.ParticipantStatements(participant="eu", statements=[SELECT_1])]
        for call, about in [
            (lambda: stub.Begin(pb.BeginRequest(request_id=garbage)), "request id"),
            (
                lambda: stub.RunTransaction(
                    pb.RunTransactionRequest(request_id=garbage, work=work)
                ),
                "request id",
            ),
            (
                lambda: stub.GetTransaction(pb.GetTransactionRequest(request_id=garbage)),
                "request id",
            ),
            (
                lambda: stub.Execute(
                    pb.ExecuteRequest(
                        txid=txid, participant=garbage, sequence=1, statements=[SELECT_1]
                    )
                ),
                "participant name",
            ),
            (
                lambda: stub.RunTransaction(
                    pb.RunTransactionRequest(
                        work=[pb.ParticipantStatements(participant=garbage, statements=[SELECT_1])]
                    )
                ),
                "participant name",
            ),
        ]:
            error = refused(call)
            assert code(error) == grpc.StatusCode.INVALID_ARGUMENT, details(error)
            assert about in details(error)
            assert what in details(error)
            assert garbage not in details(error)
            assert len(details(error)) < 500
        # The transaction that was begun is untouched by the refused Execute.
        assert stub.Commit(pb.CommitRequest(txid=txid)).state == pb.TRANSACTION_STATE_COMMITTED


HUGE = 4_294_967_295  # the largest uint32: 49 days


@pytest.mark.parametrize("path", ["execute", "prepare", "one-phase-commit"])
def test_an_agent_bounds_a_branch_timeout(live_cluster: Cluster, path: str) -> None:
    txid = new_txid(live_cluster)
    with agent(live_cluster, "eu") as stub:
        requests = {
            "execute": lambda: stub.Execute(
                pb.BranchExecuteRequest(
                    txid=txid, participant="eu", sequence=1, timeout_ms=HUGE, statements=[SELECT_1]
                )
            ),
            "prepare": lambda: stub.Prepare(
                pb.PrepareRequest(
                    txid=txid, participant="eu", sequence=1, timeout_ms=HUGE, statements=[SELECT_1]
                )
            ),
            "one-phase-commit": lambda: stub.Commit(
                pb.BranchCommitRequest(
                    txid=txid,
                    participant="eu",
                    one_phase=True,
                    sequence=1,
                    timeout_ms=HUGE,
                    statements=[SELECT_1],
                )
            ),
        }
        error = refused(requests[path])
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert f"timeout_ms {HUGE} is more than the 300000" in details(error)
    assert "max_timeout_ms" in details(error)
    assert branch_state(live_cluster, "eu", txid) == pb.BRANCH_STATE_UNKNOWN


def test_the_coordinator_bounds_a_transaction_timeout(live_cluster: Cluster) -> None:
    request_id = new_request_id("timeout")
    work = [pb.ParticipantStatements(participant="eu", statements=[SELECT_1])]
    with coordinator(live_cluster) as stub:
        for call in [
            lambda: stub.Begin(pb.BeginRequest(timeout_ms=HUGE)),
            lambda: stub.RunTransaction(
                pb.RunTransactionRequest(request_id=request_id, timeout_ms=HUGE, work=work)
            ),
        ]:
            error = refused(call)
            assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
            assert f"timeout_ms must be between 0 and 300000, got {HUGE}" in details(error)
