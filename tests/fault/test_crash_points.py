"""Every crash point of PROTOCOL.md, in each component where it applies, one deterministic case.

A transfer between two regions runs as an interactive transaction (Begin, Execute on eu, Execute
on us, Commit waiting for phase 2). The armed component SIGKILLs itself at the point (proving the
point was reached), is started again from its recorded command line, and recovery runs. Then,
on the databases: the transfer is applied in both regions or in neither, as the point dictates;
what the client saw agrees; nothing stays prepared; the money is all there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import markers, prepared
from twopc.client import (
    Client,
    Outcome,
    RetryPolicy,
    TransactionAborted,
    TwopcError,
)
from twopc.testing.playground.bank import total_balance
from twopc.testing.playground.cluster import Cluster, wait_until

BOTH, NEITHER = frozenset({"eu", "us"}), frozenset()


@dataclass(frozen=True)
class CrashPoint:
    failpoint: str
    component: str
    applied: frozenset[str]  # where the transfer ends up applied after recovery
    # Where its branch is prepared while the crashed coordinator is down (None: not pinned).
    # Both prepared after the COMMIT record means no XA COMMIT went out before it (I4).
    prepared_at_crash: frozenset[str] | None = None

    def __str__(self) -> str:
        return self.failpoint


CRASH_POINTS = [
    CrashPoint("coordinator.after_begin", "coordinator", NEITHER),
    CrashPoint("coordinator.after_execute", "coordinator", NEITHER),
    CrashPoint("coordinator.mid_prepare", "coordinator", NEITHER),
    CrashPoint("coordinator.before_commit_record", "coordinator", NEITHER, BOTH),
    CrashPoint("coordinator.after_commit_record", "coordinator", BOTH, BOTH),
    CrashPoint("coordinator.mid_commit", "coordinator", BOTH),
    CrashPoint("coordinator.before_end_record", "coordinator", BOTH),
    CrashPoint("agent.mid_statement", "agent-us", NEITHER),
    CrashPoint("agent.after_end", "agent-us", NEITHER),
    CrashPoint("agent.after_prepare", "agent-us", NEITHER),
    CrashPoint("agent.after_commit", "agent-us", BOTH),
]
TIMEOUT_S = 2.0  # a branch orphaned by a coordinator crash waits this long for its reaper
SETTLE_S = 10.0


@pytest.fixture
def impatient(live_cluster: Cluster) -> Iterator[Client]:
    policy = RetryPolicy(attempts=2, initial_backoff=0.05, deadline=1.0)
    with Client(live_cluster.coordinator_address, retry_policy=policy, rpc_timeout=5) as c:
        yield c


def transfer(client: Client, amount: int) -> tuple[str, str]:
    """Runs the transfer; returns (txid or "", what the client saw)."""
    txid = ""
    try:
        tx = client.begin(timeout=TIMEOUT_S)
        txid = tx.txid
        tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = 1", [amount])
        tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = 1", [amount])
        tx.commit(wait_for_phase2=True)
    except TransactionAborted:
        return txid, "aborted"
    except TwopcError:
        return txid, "unknown"
    return txid, "committed"


@pytest.mark.parametrize("point", CRASH_POINTS, ids=str)
def test_crash_point(
    live_cluster: Cluster, impatient: Client, client: Client, bank: int, point: CrashPoint
) -> None:
    component = live_cluster.component(point.component)
    component.env["TWOPC_FAILPOINTS"] = f"{point.failpoint}=crash"
    live_cluster.kill(point.component)
    live_cluster.restart(point.component)

    txid, seen = transfer(impatient, 40)
    wait_until(lambda: not component.alive(), 10, f"{point.component} dying at {point}")
    if point.prepared_at_crash is not None:
        assert prepared(live_cluster) == {r: [txid] for r in point.prepared_at_crash}
    component.env.pop("TWOPC_FAILPOINTS")
    live_cluster.restart(point.component)

    # Recovery, and the agents' deadline reaper for branches left active, settle everything.
    wait_until(lambda: not prepared(live_cluster), SETTLE_S, "recovery of every branch")
    if txid:
        wait_until(
            lambda: markers(live_cluster, txid) in (set(), set(point.applied)),
            SETTLE_S,
            "phase 2 finishing",
        )
        assert markers(live_cluster, txid) == set(point.applied), f"{point}: I1 or recovery"
    else:
        assert point.applied == NEITHER
    assert total_balance(live_cluster) == bank, "I7 conservation"
    if seen == "committed":
        assert point.applied == BOTH, "I2: the client saw COMMITTED"
    if seen == "aborted":
        assert point.applied == NEITHER, "I3: the client saw ABORTED"
    if txid:
        # PENDING is the honest answer while an orphaned branch waits for its deadline.
        wait_until(
            lambda: client.get_transaction(txid).outcome is not Outcome.PENDING,
            SETTLE_S,
            "the outcome becoming known",
        )
        info = client.get_transaction(txid)
        expected = Outcome.COMMITTED if point.applied == BOTH else Outcome.ABORTED
        assert info.outcome is expected, f"I6: lookup says {info.outcome.name}"
    # No lock is left behind: the same rows take a new transfer at once.
    client.run(
        {
            "eu": [("UPDATE accounts SET balance = balance - 1 WHERE id = 1", [])],
            "us": [("UPDATE accounts SET balance = balance + 1 WHERE id = 1", [])],
        },
        timeout=5,
    )
