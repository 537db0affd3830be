"""Lock cycles across regions while a component is SIGKILLed: the deadlock detector aborts only
undecided transactions, so every invariant holds (atomicity, no lost commit, no prepared branch
left, the money conserved, each outcome the clients saw right).

Hot transfers between eu and us, 4 accounts per region, 8 clients: cycles form all the time (one
transfer prepares in eu and waits in us while another does the reverse). In the middle, the
coordinator or the us agent is killed and started again.
"""

from __future__ import annotations

import threading

import pytest

from twopc.client import RetryPolicy
from twopc.testing.playground.bank import (
    Transfer,
    TransferWorkload,
    create_accounts,
    total_balance,
)
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.invariants import check_bank, prepared_branches, resolve_unknown

pytestmark = pytest.mark.timeout(120)

ACCOUNTS = 4
WORKERS = 8
BATCH = 40  # transfers finished before the kill, and again after the restart


@pytest.mark.parametrize("killed", ["coordinator", "agent-us"])
def test_cycles_while_a_component_is_killed_keep_every_invariant(
    live_cluster: Cluster, killed: str
) -> None:
    total = create_accounts(live_cluster, ACCOUNTS)
    policy = RetryPolicy(attempts=30, initial_backoff=0.05, max_backoff=0.5, deadline=20.0)
    with live_cluster.client(retry_policy=policy) as client:
        workload = TransferWorkload(
            client,
            coordinator_id=live_cluster.coordinator_id,
            regions=("eu", "us"),
            accounts=ACCOUNTS,
            seed=11,
            run_id=f"cyc-{killed}",
        )
        stop = threading.Event()
        runner = threading.Thread(
            target=workload.run, args=(10**6, WORKERS), kwargs={"stop": stop}, daemon=True
        )
        runner.start()
        try:
            # Cycles form often but not on a schedule: the kill waits for the first victim, so
            # that it lands while the detector is at work.
            wait_until(
                lambda: len(workload.transfers) >= BATCH and bool(_victims(workload.transfers)),
                40,
                "transfers and a broken cycle before the kill",
            )
            live_cluster.kill(killed)
            live_cluster.restart(killed)
            after = len(workload.transfers) + BATCH
            wait_until(lambda: len(workload.transfers) >= after, 40, "transfers after the restart")
        finally:
            stop.set()
            runner.join(timeout=30)
        wait_until(
            lambda: not any(prepared_branches(live_cluster).values()),
            20,
            "every prepared branch resolved",
            interval=0.05,
        )
        transfers = list(workload.transfers)
        resolved = resolve_unknown(client, transfers)
    verdicts = check_bank(
        live_cluster,
        transfers,
        expected_total=total,
        actual_total=total_balance(live_cluster),
        resolved=resolved,
    )
    broken = [str(v) for v in verdicts if not v.holds]
    assert not broken, broken
    victims = _victims(transfers)
    print(f"{len(transfers)} transfers, {len(victims)} deadlock victims, killed {killed}")
    assert victims, "no cycle was broken: the test did not exercise the detector"


def _victims(transfers: list[Transfer]) -> list[Transfer]:
    return [t for t in list(transfers) if "deadlock across participants" in (t.detail or "")]
