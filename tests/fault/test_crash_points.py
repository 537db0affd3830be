"""Every crash point of proto/PROTOCOL.md, in each component where it applies: one deterministic
case each.

A transfer between two regions runs as an interactive transaction (Begin, Execute on eu, Execute
on us, Commit waiting for phase 2). The armed component SIGKILLs itself at the point (proving the
point was reached). While it is down, the state the crash left is pinned: which regions hold a
prepared branch of the transfer, and whether the coordinator's decision log holds its COMMIT
record without END. The component is started again from its recorded command line, and recovery
runs. Then, on the databases: the transfer is applied in both regions or in neither, as the point
dictates; what the client saw agrees; nothing stays prepared; the money is all there; and recovery
finished its work: the decision log holds no open COMMIT record of the transfer, and
GetTransaction answers its final state (COMMITTED, not COMMITTING).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from coordinator.decision_log._format import RecordType, check_header, scan
from coordinator.decision_log.file_log import LOG_NAME
from tests.support import markers, prepared
from twopc.client import (
    Client,
    Outcome,
    RetryPolicy,
    TransactionAborted,
    TransactionState,
    TwopcError,
)
from twopc.testing.playground.bank import total_balance
from twopc.testing.playground.cluster import Cluster, wait_until

T = TypeVar("T")

BOTH, NEITHER = frozenset({"eu", "us"}), frozenset[str]()
US = frozenset({"us"})  # the transfer's second region: its branch is prepared and committed last


@dataclass(frozen=True)
class CrashPoint:
    failpoint: str
    component: str
    applied: frozenset[str]  # where the transfer ends up applied after recovery
    # Where its branch is prepared while the crashed component is down (None: not pinned).
    # Both prepared after the COMMIT record means no XA COMMIT went out before it (I4).
    prepared_at_crash: frozenset[str] | None = None
    # Whether the decision log holds its COMMIT record without END while the crashed component
    # is down: recovery has a commit to finish (None: not pinned).
    logged_at_crash: bool | None = None

    def __str__(self) -> str:
        return self.failpoint


CRASH_POINTS = [
    CrashPoint("coordinator.after_begin", "coordinator", NEITHER, NEITHER, False),
    # eu's branch is active, not prepared: the agent's reaper rolls it back at its deadline.
    CrashPoint("coordinator.after_execute", "coordinator", NEITHER, NEITHER, False),
    # The first vote came in; the other prepare was on its way and lands: both prepared.
    CrashPoint("coordinator.mid_prepare", "coordinator", NEITHER, BOTH, False),
    CrashPoint("coordinator.before_commit_record", "coordinator", NEITHER, BOTH, False),
    CrashPoint("coordinator.after_commit_record", "coordinator", BOTH, BOTH, True),
    # eu committed; us's XA COMMIT was never sent: recovery must commit us's prepared branch.
    CrashPoint("coordinator.mid_commit", "coordinator", BOTH, US, True),
    # Every branch committed, END not written: only re-driving the open record finishes it.
    CrashPoint("coordinator.before_end_record", "coordinator", BOTH, NEITHER, True),
    # The crash cuts us's connection (its active branch dies with it); the coordinator aborts.
    CrashPoint("agent.mid_statement", "agent-us", NEITHER, NEITHER, False),
    CrashPoint("agent.after_end", "agent-us", NEITHER, NEITHER, False),
    # us's branch is prepared and outlives its connection; eu's is rolled back at once.
    CrashPoint("agent.after_prepare", "agent-us", NEITHER, US, False),
    # Both committed; phase 2 cannot hear from us, so the COMMIT record stays open meanwhile.
    CrashPoint("agent.after_commit", "agent-us", BOTH, NEITHER, True),
]
TIMEOUT_S = 2.0  # a branch orphaned by a coordinator crash waits this long for its reaper
SETTLE_S = 10.0
PIN_S = 5.0  # a prepare or rollback on its way when the component died lands within this


def open_commits(cluster: Cluster) -> set[str]:
    """The txids whose COMMIT record has no END in the coordinator's decision log, read from
    its file with the log's own scanner. Safe while the coordinator runs: a batch being
    written reads as a torn last batch and is left out, as the coordinator would cut it."""
    path = Path(cluster.component("coordinator").data_dir) / LOG_NAME
    data = path.read_bytes()
    problem = check_header(data)
    assert not problem, f"{path}: {problem}"
    found = scan(data)
    assert found.resumes_at is None, f"{path} is damaged at byte {found.bad_offset}"
    still: set[str] = set()
    for kind, strings in found.records:
        if kind is RecordType.COMMIT:
            still.add(strings[0])
        else:
            still.discard(strings[0])
    return still


def settles(read: Callable[[], T], expected: T, what: str, timeout: float = SETTLE_S) -> None:
    """Waits until ``read()`` gives ``expected``; else fails showing what it gives."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: read() == expected, timeout, what)
    assert read() == expected, what


def no_commit_left_open(cluster: Cluster) -> None:
    """Waits until the decision log holds no open COMMIT record. A phase 2 in the background
    (an earlier test's last transfer) writes its END within moments; a coordinator armed at a
    phase-2 point and restarted before that would re-drive the record and die there, in
    another transaction than the one under test."""
    settles(lambda: open_commits(cluster), set[str](), "every COMMIT record ended before arming")


def pin_crash_state(cluster: Cluster, point: CrashPoint, txid: str) -> None:
    """Checks what ``point`` left while its component is down: the prepared branches of
    ``txid`` and whether its COMMIT record is open in the decision log."""
    assert point.prepared_at_crash is not None, f"{point}: prepared_at_crash is not pinned"
    assert point.logged_at_crash is not None, f"{point}: logged_at_crash is not pinned"
    expected = {region: [txid] for region in sorted(point.prepared_at_crash)}
    settles(lambda: prepared(cluster), expected, f"{point}: prepared branches at the crash", PIN_S)
    logged = txid in open_commits(cluster)
    assert logged == point.logged_at_crash, f"{point}: an open COMMIT record at the crash"
    assert prepared(cluster) == expected, f"{point}: the prepared branches held while down"


def check_recovered(cluster: Cluster, client: Client, point: CrashPoint, txid: str) -> None:
    """Recovery finished ``txid``: no open COMMIT record of it in the decision log, and
    GetTransaction answers its final state."""
    settles(lambda: txid in open_commits(cluster), False, f"{point}: the COMMIT record ended")
    final = TransactionState.COMMITTED if point.applied == BOTH else TransactionState.ABORTED
    # PENDING is the honest answer while an orphaned branch waits for its deadline.
    settles(lambda: client.get_transaction(txid).state, final, f"{point}: GetTransaction")
    expected = Outcome.COMMITTED if point.applied == BOTH else Outcome.ABORTED
    assert client.get_transaction(txid).outcome is expected, f"{point}: I6"


@pytest.fixture
def impatient(live_cluster: Cluster) -> Iterator[Client]:
    policy = RetryPolicy(attempts=2, initial_backoff=0.05, deadline=1.0)
    with live_cluster.client(retry_policy=policy, rpc_timeout=5) as c:
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
    no_commit_left_open(live_cluster)
    component = live_cluster.component(point.component)
    component.env["TWOPC_FAILPOINTS"] = f"{point.failpoint}=crash"
    live_cluster.kill(point.component)
    live_cluster.restart(point.component)

    txid, seen = transfer(impatient, 40)
    wait_until(lambda: not component.alive(), 10, f"{point.component} dying at {point}")
    pin_crash_state(live_cluster, point, txid)
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
        check_recovered(live_cluster, client, point, txid)
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
