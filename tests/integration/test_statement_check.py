"""A statement the guard refuses is answered the same way on every path, before anything starts.

The coordinator checks every statement of an Execute or a RunTransaction before its engine sees
the request: InvalidArgument naming the statement and the reason, no transaction begun for a
one-shot (so no record of it anywhere), no branch on any agent, and an interactive transaction
left as it was. One region (the one-phase path) and several answer alike. (The same statements
sent straight to an agent, on each of its entry paths: tests/security/test_statement_paths.py.)
"""

from __future__ import annotations

import itertools

import pytest

from tests.support import balance, prepared, transfer_sql
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import Client, InvalidArgument, TransactionState
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import COORDINATOR
from twopc.txid import txid_for_request

REFUSED = [
    pytest.param("CREATE TABLE made_by_a_client (id INT PRIMARY KEY)", "(DDL)", id="ddl"),
    pytest.param("ALTER TABLE accounts ADD COLUMN note TEXT", "(DDL)", id="alter"),
    pytest.param("SET autocommit = 1", "SET autocommit", id="set-autocommit"),
    pytest.param("XA END 'x'", "XA statements", id="xa"),
    pytest.param("UPDATE accounts SET balance = 0; COMMIT", "one statement", id="two-statements"),
    # Session state that would outlive the transaction on the agent's pooled session.
    pytest.param("SELECT GET_LOCK('hostile', 0)", "GET_LOCK is not allowed", id="get-lock"),
    pytest.param("SELECT balance INTO @v FROM accounts WHERE id = 1", "user variables", id="into"),
    pytest.param("SELECT @v := 1", "user variables", id="user-variable"),
    # Files on the database server.
    pytest.param("SELECT LOAD_FILE('/etc/passwd')", "LOAD_FILE is not allowed", id="load-file"),
    pytest.param("SELECT 1 INTO OUTFILE '/tmp/hostile'", "INTO OUTFILE", id="outfile"),
    # The agent's marker table.
    pytest.param("SELECT * FROM twopc_branch_marker", "bookkeeping", id="read-marker"),
    pytest.param("DELETE FROM `twopc_branch_marker`", "bookkeeping", id="delete-marker"),
]
_request_ids = itertools.count()


def branch_state(cluster: Cluster, region: str, txid: str) -> int:
    """What ``region``'s agent knows of ``txid``'s branch (a BranchState)."""
    with cluster.channel(f"agent-{region}", identity=COORDINATOR) as channel:
        answer = pb_grpc.ParticipantStub(channel).Inspect(
            pb.InspectRequest(txids=[txid]), timeout=10
        )
    return answer.branches[0].state


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("regions", [("eu",), ("eu", "us")], ids=["one-region", "two-regions"])
@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_a_refused_statement_in_a_one_shot_starts_nothing(
    live_cluster: Cluster, client: Client, regions: tuple[str, ...], sql: str, reason: str
) -> None:
    request_id = f"refused-{next(_request_ids)}"
    work = {region: transfer_sql(7, 1) for region in regions}
    last = regions[-1]
    work[last] = [*transfer_sql(7, 1), (sql, [])]
    with pytest.raises(InvalidArgument) as caught:
        client.run(work, timeout=5, request_id=request_id)
    message = caught.value.message
    assert f"statement 2 for participant {last!r} is refused" in message
    assert reason in message
    assert "no transaction was started" in message
    assert caught.value.txid == ""

    # No record anywhere: the coordinator never began it, and no agent has a branch of it.
    info = client.get_transaction(request_id=request_id)
    assert info.presumed
    assert info.participants == []
    txid = txid_for_request(live_cluster.coordinator_id, request_id)
    for region in live_cluster.regions:
        assert branch_state(live_cluster, region, txid) == pb.BRANCH_STATE_UNKNOWN
    assert not prepared(live_cluster)
    for region in regions:
        assert balance(live_cluster, region, 1) == 1000


@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_a_refused_statement_in_an_execute_leaves_the_transaction_usable(
    live_cluster: Cluster, client: Client, bank: int, sql: str, reason: str
) -> None:
    with client.transaction(timeout=10) as tx:
        tx.execute("eu", "UPDATE accounts SET balance = balance - 5 WHERE id = 3")
        with pytest.raises(InvalidArgument) as caught:
            # The first statement is fine, the second refused: neither runs.
            tx.execute_many("us", [*transfer_sql(100, 3), (sql, [])])
        message = caught.value.message
        assert "statement 2 for participant 'us' is refused" in message
        assert reason in message
        assert "the transaction is as it was" in message
        assert caught.value.txid == tx.txid
        assert branch_state(live_cluster, "us", tx.txid) == pb.BRANCH_STATE_UNKNOWN
        assert tx.state is TransactionState.ACTIVE
        tx.execute("us", "UPDATE accounts SET balance = balance + 5 WHERE id = 3")
    assert tx.state in (TransactionState.COMMITTING, TransactionState.COMMITTED)
    wait_until(lambda: balance(live_cluster, "us", 3) == 1005, 10, "phase 2 on us")
    assert balance(live_cluster, "eu", 3) == 995
