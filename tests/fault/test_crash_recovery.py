"""Crash cases beyond the matrix of crash points (test_crash_points.py): a request retried after
the coordinator died past its decision, a crash during recovery itself, and a database SIGKILLed
while it holds a prepared branch. Failpoints are armed through a component's environment; the
component is started again from the command line in the state file."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import balance, markers, prepare_on_agent, prepared, transfer_sql
from twopc.client import (
    Client,
    Outcome,
    OutcomeUnknown,
    RetryPolicy,
    TransactionAborted,
)
from twopc.testing.playground.bank import total_balance
from twopc.testing.playground.cluster import Cluster, wait_until

RECOVERY_DEADLINE_S = 10.0


def arm(cluster: Cluster, name: str, failpoint: str, *, wait: bool = True) -> None:
    """Restarts ``name`` with ``failpoint=crash`` armed (the fixture disarms it afterwards)."""
    component = cluster.component(name)
    component.env["TWOPC_FAILPOINTS"] = f"{failpoint}=crash"
    if component.alive():
        cluster.kill(name)
    cluster.restart(name, wait=wait)


def disarm_and_restart(cluster: Cluster, name: str) -> None:
    component = cluster.component(name)
    component.env.pop("TWOPC_FAILPOINTS", None)
    if component.alive():
        cluster.kill(name)
    cluster.restart(name)


def wait_dead(cluster: Cluster, name: str) -> None:
    wait_until(lambda: not cluster.component(name).alive(), 10, f"{name} dying at its failpoint")


@pytest.fixture
def impatient(live_cluster: Cluster) -> Iterator[Client]:
    """A client that gives up quickly when the coordinator is gone."""
    policy = RetryPolicy(attempts=2, initial_backoff=0.05, deadline=1.0)
    with live_cluster.client(retry_policy=policy, rpc_timeout=5) as c:
        yield c


def transfer(client: Client, request_id: str, amount: int = 25) -> None:
    client.run(
        {"eu": transfer_sql(-amount, 1), "us": transfer_sql(amount, 1)},
        timeout=5,
        request_id=request_id,
    )


def wait_recovered(cluster: Cluster) -> None:
    wait_until(lambda: not prepared(cluster), RECOVERY_DEADLINE_S, "recovery of every branch")


def test_request_retried_after_a_crash_past_the_commit_record_is_answered_not_rerun(
    live_cluster: Cluster, impatient: Client, client: Client, bank: int
) -> None:
    arm(live_cluster, "coordinator", "coordinator.after_commit_record")
    with pytest.raises(OutcomeUnknown):
        transfer(impatient, "crash-after-record")
    wait_dead(live_cluster, "coordinator")
    txid = f"{live_cluster.coordinator_id}.r-crash-after-record"
    assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}, "no XA COMMIT before recovery"

    disarm_and_restart(live_cluster, "coordinator")
    wait_recovered(live_cluster)
    assert markers(live_cluster, txid) == {"eu", "us"}
    assert balance(live_cluster, "eu", 1) == 975
    assert balance(live_cluster, "us", 1) == 1025
    assert total_balance(live_cluster) == bank
    assert client.get_transaction(txid).outcome is Outcome.COMMITTED
    # The client retrying its request after the restart is answered, not run a second time.
    transfer(client, "crash-after-record")
    assert balance(live_cluster, "us", 1) == 1025


def test_crash_during_recovery_then_recovery_again(
    live_cluster: Cluster, impatient: Client, bank: int
) -> None:
    arm(live_cluster, "coordinator", "coordinator.after_commit_record")
    with pytest.raises(OutcomeUnknown):
        transfer(impatient, "crash-in-recovery")
    wait_dead(live_cluster, "coordinator")
    # Dies on its first recovery step, maybe before it answers anything: not waited for.
    arm(live_cluster, "coordinator", "coordinator.recovery", wait=False)
    wait_dead(live_cluster, "coordinator")
    txid = f"{live_cluster.coordinator_id}.r-crash-in-recovery"
    assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}
    disarm_and_restart(live_cluster, "coordinator")
    wait_recovered(live_cluster)
    assert markers(live_cluster, txid) == {"eu", "us"}
    assert total_balance(live_cluster) == bank


def test_database_killed_with_a_prepared_branch(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """A branch prepared by a coordinator that then forgot it (no commit record): the MariaDB
    server is SIGKILLed and restarted; the branch survives with its lock, and recovery rolls it
    back once the agent reaches the server again."""
    txid = f"{live_cluster.coordinator_id}.r-db-kill-prepared"
    prepare_on_agent(live_cluster, "eu", txid, amount=500, account=4)
    live_cluster.kill("mariadb-eu", signal.SIGKILL)
    live_cluster.restart("mariadb-eu")
    wait_recovered(live_cluster)
    assert markers(live_cluster, txid) == set()
    assert balance(live_cluster, "eu", 4) == 1000
    client.run({"eu": transfer_sql(1, 4)}, timeout=5)  # the row is not locked any more
    assert balance(live_cluster, "eu", 4) == 1001


def test_first_transaction_after_a_database_restart_commits(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """The agent's pooled connections die with their database. The one-shot path takes a pooled
    connection straight into its batch (no XA START round trip to find it dead first): the
    pool must see a closed connection before using it, so no transaction pays for it."""

    def transfer(account: int) -> None:  # through phase 2: the total is read afterwards
        client.run(
            {"eu": transfer_sql(-1, account), "us": transfer_sql(1, account)},
            timeout=5,
            wait_for_phase2=True,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:  # eight idle connections in each pool
        list(pool.map(transfer, range(1, 9)))
    live_cluster.kill("mariadb-us", signal.SIGKILL)
    live_cluster.restart("mariadb-us")  # returns once the server takes connections
    result = client.run({"eu": transfer_sql(-3, 5), "us": transfer_sql(3, 5)}, timeout=5)
    wait_until(lambda: markers(live_cluster, result.txid) == {"eu", "us"}, 5, "phase 2")
    assert balance(live_cluster, "us", 5) == 1004
    assert total_balance(live_cluster) == bank


def test_statements_lost_with_a_restarted_agent_abort_the_transaction(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """Found by the Hypothesis state machine's author: an agent restarted between two Execute
    calls of one transaction started a fresh branch for the second, and the commit would then
    have applied it without the first."""
    tx = client.begin(timeout=10)
    tx.execute("us", "UPDATE accounts SET balance = balance + 100 WHERE id = 2")
    live_cluster.kill("agent-us")  # the server rolls its branch back
    live_cluster.restart("agent-us")
    with pytest.raises(TransactionAborted, match="lost the branch"):
        tx.execute("us", "UPDATE accounts SET balance = balance + 1 WHERE id = 3")
    assert balance(live_cluster, "us", 2) == 1000
    assert balance(live_cluster, "us", 3) == 1000
    assert client.get_transaction(tx.txid).outcome is Outcome.ABORTED
