"""SIGKILL at the protocol's crash points, then recovery, checked on the databases.

A failpoint armed through a component's environment makes the process SIGKILL itself at an exact
point (no cleanup, no flush); the component is then started again from the command line in the
state file, as an operator or a supervisor would. After recovery: each transfer is applied in
both regions or in neither (marker rows), nothing stays prepared, and the money is all there.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from coordinator.client import (
    Client,
    Outcome,
    OutcomeUnknown,
    RetryPolicy,
    TransactionAborted,
    TwopcError,
)
from coordinator.playground.bank import total_balance
from coordinator.playground.cluster import Cluster, wait_until
from tests.support import balance, markers, prepare_on_agent, prepared, transfer_sql

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
    with Client(live_cluster.coordinator_address, retry_policy=policy, rpc_timeout=5) as c:
        yield c


def transfer(client: Client, request_id: str, amount: int = 25) -> None:
    client.run(
        {"eu": transfer_sql(-amount, 1), "us": transfer_sql(amount, 1)},
        timeout=5,
        request_id=request_id,
    )


def wait_recovered(cluster: Cluster) -> None:
    wait_until(lambda: not prepared(cluster), RECOVERY_DEADLINE_S, "recovery of every branch")


def test_coordinator_killed_before_the_commit_record_rolls_back_everywhere(
    live_cluster: Cluster, impatient: Client, client: Client, bank: int
) -> None:
    arm(live_cluster, "coordinator", "coordinator.before_commit_record")
    with pytest.raises(OutcomeUnknown):
        transfer(impatient, "crash-before-record")
    wait_dead(live_cluster, "coordinator")
    txid = f"{live_cluster.coordinator_id}.r-crash-before-record"
    assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}, "both branches voted yes"

    disarm_and_restart(live_cluster, "coordinator")
    wait_recovered(live_cluster)
    assert markers(live_cluster, txid) == set()
    assert balance(live_cluster, "eu", 1) == 1000
    assert balance(live_cluster, "us", 1) == 1000
    assert total_balance(live_cluster) == bank
    info = client.get_transaction(request_id="crash-before-record")
    assert info.outcome is Outcome.ABORTED
    assert info.presumed


def test_coordinator_killed_after_the_commit_record_commits_everywhere(
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


def test_coordinator_killed_part_way_through_phase_two(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    arm(live_cluster, "coordinator", "coordinator.mid_commit")
    with pytest.raises(TwopcError):
        client.run(
            {"eu": transfer_sql(-5, 2), "us": transfer_sql(5, 2)},
            timeout=5,
            request_id="crash-mid-commit",
            wait_for_phase2=True,
        )
    wait_dead(live_cluster, "coordinator")
    disarm_and_restart(live_cluster, "coordinator")
    wait_recovered(live_cluster)
    txid = f"{live_cluster.coordinator_id}.r-crash-mid-commit"
    assert markers(live_cluster, txid) == {"eu", "us"}
    assert total_balance(live_cluster) == bank


def test_agent_killed_after_xa_prepare_is_rolled_back_by_recovery(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    arm(live_cluster, "agent-us", "agent.after_prepare")
    with pytest.raises(TransactionAborted, match="us"):
        transfer(client, "agent-crash-after-prepare")
    wait_dead(live_cluster, "agent-us")
    txid = f"{live_cluster.coordinator_id}.r-agent-crash-after-prepare"
    # The branch was durably prepared before the agent died, and nobody can finish it yet.
    assert prepared(live_cluster) == {"us": [txid]}
    disarm_and_restart(live_cluster, "agent-us")
    wait_recovered(live_cluster)
    assert markers(live_cluster, txid) == set()
    assert balance(live_cluster, "us", 1) == 1000
    assert total_balance(live_cluster) == bank
    assert client.get_transaction(txid).outcome is Outcome.ABORTED


def test_agent_killed_after_xa_commit_before_its_reply(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    arm(live_cluster, "agent-us", "agent.after_commit")
    result = client.run(
        {"eu": transfer_sql(-3, 3), "us": transfer_sql(3, 3)},
        timeout=5,
        request_id="agent-crash-after-commit",
    )
    wait_dead(live_cluster, "agent-us")
    disarm_and_restart(live_cluster, "agent-us")
    wait_recovered(live_cluster)
    assert markers(live_cluster, result.txid) == {"eu", "us"}
    assert balance(live_cluster, "us", 3) == 1003
    assert total_balance(live_cluster) == bank
    wait_until(
        lambda: client.get_transaction(result.txid).outcome is Outcome.COMMITTED, 5, "lookup"
    )


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
