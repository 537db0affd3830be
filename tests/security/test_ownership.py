"""Transactions and request ids belong to the identity that began them (issue 10, finding 11a).

Two applications of the session cluster, ``client`` and ``other-app``, with certificates of the
same CA and the same rights: neither may execute in, commit, roll back or look up the other's
transaction (NOT_FOUND, the answer for a txid nobody began), and the same request id names a
transaction of each (``other-app`` never gets ``client``'s txid, or its outcome). Every outcome
is checked on MariaDB.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from tests.security.hostile import (
    _channel,
    code,
    details,
    new_request_id,
    new_txid,
    refused,
    statement,
)
from tests.support import balance
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.tls import CLIENT, OTHER_APP
from twopc.values import to_values


@contextmanager
def as_identity(cluster: Cluster, identity: str) -> Iterator[pb_grpc.CoordinatorStub]:
    with _channel(cluster, cluster.coordinator_address, identity) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def credit(account: int, amount: int) -> pb.Statement:
    return statement(
        "UPDATE accounts SET balance = balance + %s WHERE id = %s",
        *to_values([amount, account]),
    )


def test_another_identitys_transaction_is_not_found(live_cluster: Cluster, bank: int) -> None:
    with as_identity(live_cluster, CLIENT) as owner, as_identity(live_cluster, OTHER_APP) as thief:
        txid = owner.Begin(pb.BeginRequest(timeout_ms=30_000), timeout=10).txid
        owner.Execute(
            pb.ExecuteRequest(txid=txid, participant="eu", sequence=1, statements=[credit(3, 7)]),
            timeout=10,
        )
        unknown = new_txid(live_cluster)
        nobodys = refused(
            lambda: thief.Execute(
                pb.ExecuteRequest(
                    txid=unknown, participant="eu", sequence=1, statements=[credit(3, 100)]
                ),
                timeout=10,
            )
        )
        assert code(nobodys) == grpc.StatusCode.NOT_FOUND
        calls = {
            "Execute": lambda: thief.Execute(
                pb.ExecuteRequest(
                    txid=txid, participant="eu", sequence=2, statements=[credit(3, 100)]
                ),
                timeout=10,
            ),
            "Commit": lambda: thief.Commit(pb.CommitRequest(txid=txid), timeout=10),
            "Rollback": lambda: thief.Rollback(pb.RollbackRequest(txid=txid), timeout=10),
            "GetTransaction": lambda: thief.GetTransaction(
                pb.GetTransactionRequest(txid=txid), timeout=10
            ),
        }
        for name, call in calls.items():
            error = refused(call)
            assert code(error) == grpc.StatusCode.NOT_FOUND, name
            # Word for word the answer for a txid that nobody began: existence does not leak.
            assert details(error) == details(nobodys).replace(unknown, txid), name
        # The owner's transaction is untouched: it commits, with its own change alone.
        info = owner.GetTransaction(pb.GetTransactionRequest(txid=txid), timeout=10)
        assert info.state == pb.TRANSACTION_STATE_ACTIVE
        owner.Commit(pb.CommitRequest(txid=txid, wait_for_phase2=True), timeout=10)
    assert balance(live_cluster, "eu", 3) == 1007


def test_request_ids_are_per_identity(live_cluster: Cluster, bank: int) -> None:
    request_id = new_request_id("owned")
    with as_identity(live_cluster, CLIENT) as first, as_identity(live_cluster, OTHER_APP) as other:
        mine = first.Begin(pb.BeginRequest(request_id=request_id, timeout_ms=30_000), timeout=10)
        theirs = other.Begin(pb.BeginRequest(request_id=request_id, timeout_ms=30_000), timeout=10)
        assert theirs.txid != mine.txid  # its own new transaction, not the first one's
        again = other.Begin(pb.BeginRequest(request_id=request_id, timeout_ms=30_000), timeout=10)
        assert again.txid == theirs.txid  # and its retries find it
        assert first.Begin(pb.BeginRequest(request_id=request_id), timeout=10).txid == mine.txid
        other.Execute(
            pb.ExecuteRequest(
                txid=theirs.txid, participant="us", sequence=1, statements=[credit(4, 5)]
            ),
            timeout=10,
        )
        looked_up = other.GetTransaction(
            pb.GetTransactionRequest(request_id=request_id), timeout=10
        )
        assert looked_up.txid == theirs.txid
        assert looked_up.state == pb.TRANSACTION_STATE_ACTIVE
        first.Rollback(pb.RollbackRequest(txid=mine.txid), timeout=10)
        # The first identity's outcome is not the other's: its transaction still commits.
        other.Commit(pb.CommitRequest(txid=theirs.txid, wait_for_phase2=True), timeout=10)
        assert (
            first.GetTransaction(pb.GetTransactionRequest(request_id=request_id), timeout=10).state
            == pb.TRANSACTION_STATE_ABORTED
        )
    assert balance(live_cluster, "us", 4) == 1005


@pytest.mark.parametrize("order", ["client first", "other-app first"])
def test_one_shot_request_ids_are_per_identity(
    live_cluster: Cluster, bank: int, order: str
) -> None:
    """RunTransaction's request id: the second identity's work runs (it is not answered with
    the first one's outcome), once; each retry is answered with its own identity's outcome."""
    request_id = new_request_id("one-shot")
    identities = [CLIENT, OTHER_APP] if order == "client first" else [OTHER_APP, CLIENT]
    txids = []
    for identity in identities:
        with as_identity(live_cluster, identity) as stub:
            request = pb.RunTransactionRequest(
                request_id=request_id,
                wait_for_phase2=True,
                work=[pb.ParticipantStatements(participant="ap", statements=[credit(5, 10)])],
            )
            answer = stub.RunTransaction(request, timeout=15)
            assert answer.state == pb.TRANSACTION_STATE_COMMITTED
            assert stub.RunTransaction(request, timeout=15).txid == answer.txid  # a retry
            txids.append(answer.txid)
    assert txids[0] != txids[1]
    assert balance(live_cluster, "ap", 5) == 1020  # both ran, each once
