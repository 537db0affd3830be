"""The statement guard on every entry path of an agent, called directly (issue 10, finding 10).

Whoever reaches an agent's port can send statements on any of the calls that carry them:
Execute (starting a branch, or on a live one), Prepare with statements (the one-trip prepare of
a one-shot, unary or on the Pipeline stream; or after Executes, step by step) and the one-phase
Commit with statements. Removing the guard, or its protection of the marker table, from any one
of them fails a test here. Each refused statement is InvalidArgument with its reason, before
anything reaches the database: no branch starts, a live branch stays as it was and usable.
(Through the coordinator, on its three paths: tests/integration/test_statement_check.py, whose
list of refused statements this shares.)
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.integration.test_statement_check import REFUSED
from tests.security.hostile import (
    agent,
    branch_state,
    code,
    details,
    new_txid,
    refused,
    statement,
)
from tests.support import balance, prepared
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster

REGION = "eu"
ADD_ONE = statement("UPDATE accounts SET balance = balance + 1 WHERE id = 8")


def _pipeline_prepare(stub: pb_grpc.ParticipantStub, request: pb.PrepareRequest) -> None:
    """A Prepare on the agent's Pipeline stream, as the coordinator sends it; its error, if it
    answers one, raised as the unary call would."""
    calls = [pb.PipelineCall(id=1, prepare=request)]
    [answer] = [
        a for m in stub.Pipeline(iter([pb.PipelineRequest(calls=calls)])) for a in m.answers
    ]
    if answer.WhichOneof("result") == "error":
        raise _CallError(answer.error)


class _CallError(grpc.RpcError):
    def __init__(self, error: pb.CallError) -> None:
        super().__init__(error.message)
        self._error = error

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self._error.code]

    def details(self) -> str:
        return self._error.message

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _new_branch_calls(
    stub: pb_grpc.ParticipantStub, txid: str, statements: list[pb.Statement]
) -> dict[str, Callable[[], object]]:
    """The calls that would start a branch with ``statements``."""

    def prepare_request() -> pb.PrepareRequest:
        return pb.PrepareRequest(
            txid=txid, participant=REGION, sequence=1, timeout_ms=10_000, statements=statements
        )

    return {
        "execute": lambda: stub.Execute(
            pb.BranchExecuteRequest(
                txid=txid, participant=REGION, sequence=1, timeout_ms=10_000, statements=statements
            )
        ),
        "one-trip-prepare": lambda: stub.Prepare(prepare_request()),
        "pipeline-prepare": lambda: _pipeline_prepare(stub, prepare_request()),
        "one-phase-commit": lambda: stub.Commit(
            pb.BranchCommitRequest(
                txid=txid,
                participant=REGION,
                one_phase=True,
                sequence=1,
                timeout_ms=10_000,
                statements=statements,
            )
        ),
    }


def _nothing_ran(cluster: Cluster) -> None:
    """No effect of any refused statement: the lock free, no prepared branch, no money moved."""
    with cluster.mysql(REGION) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT IS_USED_LOCK('hostile')")
        assert cursor.fetchone() == (None,)
    assert not prepared(cluster)


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize(
    "path", ["execute", "one-trip-prepare", "pipeline-prepare", "one-phase-commit"]
)
@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_a_refused_statement_starts_no_branch_on_any_entry_path(
    live_cluster: Cluster, path: str, sql: str, reason: str
) -> None:
    txid = new_txid(live_cluster)
    with agent(live_cluster, REGION) as stub:
        error = refused(_new_branch_calls(stub, txid, [ADD_ONE, statement(sql)])[path])
    assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in details(error)
    assert branch_state(live_cluster, REGION, txid) == pb.BRANCH_STATE_UNKNOWN
    assert balance(live_cluster, REGION, 8) == 1000
    _nothing_ran(live_cluster)


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("path", ["execute", "prepare", "one-phase-commit"])
@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_a_refused_statement_leaves_a_live_branch_as_it_was(
    live_cluster: Cluster, path: str, sql: str, reason: str
) -> None:
    """On a branch that ran statements: a further Execute, a Prepare that brings statements
    (the step-by-step path), a one-phase Commit that brings statements."""
    txid = new_txid(live_cluster)
    refused_statements = [ADD_ONE, statement(sql)]
    with agent(live_cluster, REGION) as stub:
        stub.Execute(
            pb.BranchExecuteRequest(
                txid=txid, participant=REGION, sequence=1, timeout_ms=10_000, statements=[ADD_ONE]
            )
        )
        calls = {
            "execute": lambda: stub.Execute(
                pb.BranchExecuteRequest(
                    txid=txid, participant=REGION, sequence=2, statements=refused_statements
                )
            ),
            "prepare": lambda: stub.Prepare(
                pb.PrepareRequest(
                    txid=txid, participant=REGION, sequence=2, statements=refused_statements
                )
            ),
            "one-phase-commit": lambda: stub.Commit(
                pb.BranchCommitRequest(
                    txid=txid,
                    participant=REGION,
                    one_phase=True,
                    sequence=2,
                    statements=refused_statements,
                )
            ),
        }
        error = refused(calls[path])
        assert code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in details(error)
        assert branch_state(live_cluster, REGION, txid) == pb.BRANCH_STATE_ACTIVE
        stub.Commit(pb.BranchCommitRequest(txid=txid, participant=REGION, one_phase=True))
    assert balance(live_cluster, REGION, 8) == 1001
    _nothing_ran(live_cluster)
