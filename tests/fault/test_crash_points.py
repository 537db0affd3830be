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


# --- The same agent crash points on the one-shot path ---------------------------------------------
# client.run sends each region's statements with the prepare, so the agent runs its one-trip
# prepare (XA START, the statements, the marker, XA END and XA PREPARE in one round trip): the
# points must be hit inside it, as production runs it. A single-region run is a one-phase commit.

US_ONLY = frozenset({"us"})


@dataclass(frozen=True)
class OneShotCrash:
    failpoint: str
    regions: tuple[str, ...]  # where the run has statements
    applied: frozenset[str]  # where the run ends up applied after recovery
    # Where a branch is prepared while agent-us is down: us as the crash left it (nothing touches
    # its database until its agent is back), eu as the coordinator leaves it meanwhile.
    prepared_while_down: frozenset[str]

    def __str__(self) -> str:
        return self.failpoint if len(self.regions) > 1 else f"{self.failpoint}-one-phase"


ONE_SHOT_CRASHES = [
    OneShotCrash("agent.mid_statement", ("eu", "us"), NEITHER, NEITHER),
    OneShotCrash("agent.after_end", ("eu", "us"), NEITHER, NEITHER),
    OneShotCrash("agent.after_prepare", ("eu", "us"), NEITHER, US_ONLY),
    OneShotCrash("agent.after_commit", ("eu", "us"), BOTH, NEITHER),
    OneShotCrash("agent.after_commit", ("us",), US_ONLY, NEITHER),
]


def one_shot_transfer(client: Client, crash: OneShotCrash, request_id: str) -> str:
    """Moves 40 from account 1 in eu to account 1 in us (or, in us alone, from account 1 to
    account 2) in one request; returns what the client saw."""
    if len(crash.regions) > 1:
        work = {
            "eu": [("UPDATE accounts SET balance = balance - 40 WHERE id = 1", [])],
            "us": [("UPDATE accounts SET balance = balance + 40 WHERE id = 1", [])],
        }
    else:
        work = {
            "us": [
                ("UPDATE accounts SET balance = balance - 40 WHERE id = 1", []),
                ("UPDATE accounts SET balance = balance + 40 WHERE id = 2", []),
            ]
        }
    try:
        client.run(work, timeout=TIMEOUT_S, request_id=request_id)
    except TransactionAborted:
        return "aborted"
    except TwopcError:
        return "unknown"
    return "committed"


@pytest.mark.parametrize("crash", ONE_SHOT_CRASHES, ids=str)
def test_crash_point_on_the_one_shot_path(
    live_cluster: Cluster, impatient: Client, client: Client, bank: int, crash: OneShotCrash
) -> None:
    agent = live_cluster.component("agent-us")
    agent.env["TWOPC_FAILPOINTS"] = f"{crash.failpoint}=crash"
    live_cluster.kill(agent.name)
    live_cluster.restart(agent.name)

    request_id = f"one-shot-{crash}".replace(".", "-")
    txid = f"{live_cluster.coordinator_id}.r-{request_id}"  # the txid a request id names
    seen = one_shot_transfer(impatient, crash, request_id)
    wait_until(lambda: not agent.alive(), 10, f"agent-us dying at {crash}")
    wait_until(
        lambda: prepared(live_cluster) == {r: [txid] for r in crash.prepared_while_down},
        SETTLE_S,
        f"prepared only in {sorted(crash.prepared_while_down)} while agent-us is down",
    )
    # An XA COMMIT that the agent sent before dying landed; nothing else did.
    assert ("us" in markers(live_cluster, txid)) == ("us" in crash.applied)
    agent.env.pop("TWOPC_FAILPOINTS")
    live_cluster.restart(agent.name)

    wait_until(lambda: not prepared(live_cluster), SETTLE_S, "recovery of every branch")
    wait_until(
        lambda: markers(live_cluster, txid) in (set(), set(crash.applied)),
        SETTLE_S,
        "phase 2 finishing",
    )
    assert markers(live_cluster, txid) == set(crash.applied), f"{crash}: I1 or recovery"
    assert total_balance(live_cluster) == bank, "I7 conservation"
    if seen == "committed":
        assert crash.applied, "I2: the client saw COMMITTED"
    if seen == "aborted":
        assert not crash.applied, "I3: the client saw ABORTED"
    wait_until(
        lambda: client.get_transaction(txid).outcome is not Outcome.PENDING,
        SETTLE_S,
        "the outcome becoming known",
    )
    info = client.get_transaction(txid)
    expected = Outcome.COMMITTED if crash.applied else Outcome.ABORTED
    assert info.outcome is expected, f"I6: lookup says {info.outcome.name}"
    # No lock is left behind: the same rows take a new run at once.
    client.run(
        {
            "eu": [("UPDATE accounts SET balance = balance - 1 WHERE id = 1", [])],
            "us": [
                ("UPDATE accounts SET balance = balance + 1 WHERE id = 1", []),
                ("UPDATE accounts SET balance = balance + 0 WHERE id = 2", []),
            ],
        },
        timeout=5,
    )
