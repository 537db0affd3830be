"""A coordinator group on the SQL decision log (MariaDB): two members, ids c1 (A, the cluster's
coordinator) and c2 (B), real processes and real signals.

- A SIGKILLed member's in-doubt transaction is finished by its peer, which takes the id over once
  its lease expires, and frees the id again: the member restarted takes it back at once.
- A member SIGSTOPped in the middle of phase 2, past its lease: the peer takes its id over and
  finishes the commit; SIGCONTed, the old member commits and rolls back nothing more (the agents
  refuse its epoch) and steps down.
- A member stopped cleanly hands its id over: the peer takes it at once (no lease to wait out)
  and rolls back what it left prepared.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.group_members import (
    REGIONS,
    Member,
    group_cluster,
    lease,
    peer_member,
    restore_a,
)
from tests.fault.test_crash_recovery import wait_dead
from tests.sql_stores import Stores, rows
from tests.support import markers, prepare_on_agent, prepared, transfer_sql
from twopc.client import OutcomeUnknown, RetryPolicy
from twopc.testing.playground.cluster import Cluster, Component, wait_until

pytestmark = pytest.mark.fault

TAKEOVER_DEADLINE_S = 20.0  # a bound for the test; the figure of record is printed


@pytest.fixture(scope="module")
def store_url(sql_stores: Stores) -> str:
    return sql_stores.new_database("mariadb")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, store_url: str) -> Iterator[Cluster]:
    with group_cluster(tmp_path_factory, store_url) as cluster:
        yield cluster


@pytest.fixture
def peer(group: Cluster, tmp_path: Path) -> Iterator[Member]:
    """Member B: coordinator id c2, the same configuration as A's otherwise."""
    with peer_member(group, tmp_path) as member:
        yield member


@pytest.fixture(autouse=True)
def a_serving(group: Cluster) -> Iterator[None]:
    """A serving before and after each test (SIGCONTed, restarted, failpoints disarmed)."""
    yield
    restore_a(group)


def restart_a_with(group: Cluster, failpoints: str) -> Component:
    a = group.component("coordinator")
    a.env["TWOPC_FAILPOINTS"] = failpoints
    if a.alive():
        group.kill("coordinator")
    group.restart("coordinator")
    return a


def fence_epoch(group: Cluster, region: str, coordinator_id: str) -> int:
    """The highest epoch ``region``'s agent keeps for ``coordinator_id`` (its fence rows)."""
    with group.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT MAX(bqual) FROM twopc.twopc_branch_marker WHERE gtrid = %s",
            [f"epoch/{coordinator_id}".encode()],
        )
        (found,) = cursor.fetchone()
    return int.from_bytes(found, "big") if found is not None else 0


def transfer(group: Cluster, request_id: str) -> None:
    policy = RetryPolicy(attempts=1, deadline=1.0)
    with group.client(retry_policy=policy, rpc_timeout=10) as client:
        client.run(
            {"eu": transfer_sql(-5, 1), "us": transfer_sql(5, 1)},
            timeout=10,
            request_id=request_id,
        )


def test_a_killed_members_decision_is_finished_by_its_peer(
    group: Cluster, peer: Member, store_url: str
) -> None:
    a = restart_a_with(group, "coordinator.after_commit_record=crash")
    _, epoch_before = lease(store_url, "c1")
    with pytest.raises(OutcomeUnknown):
        transfer(group, "killed-member")
    wait_dead(group, "coordinator")
    killed = time.monotonic()
    txid = "c1.r-killed-member"
    assert prepared(group) == {"eu": [txid], "us": [txid]}

    wait_until(lambda: markers(group, txid) == set(REGIONS), TAKEOVER_DEADLINE_S, "B's takeover")
    resolved_s = time.monotonic() - killed
    print(
        f"\nSIGKILLed member: its in-doubt transaction committed {resolved_s:.2f} s after the kill"
    )
    assert "takeover_started" in peer.text()
    wait_until(lambda: "takeover_finished" in peer.text(), 10, "B freeing c1")
    holder, epoch = lease(store_url, "c1")
    assert (holder, epoch) == ("", epoch_before + 1), "B took c1 at the next epoch and freed it"
    assert {fence_epoch(group, r, "c1") for r in REGIONS} == {epoch_before + 1}
    assert not rows(store_url, f"SELECT txid FROM twopc_commits WHERE txid = '{txid}'")
    # A comes back and takes c1 at once (freed: no lease to wait out), at the epoch after B's.
    a.env.pop("TWOPC_FAILPOINTS", None)
    group.restart("coordinator")
    assert lease(store_url, "c1") == ("member-a", epoch_before + 2)


def test_a_member_paused_in_phase_2_commits_nothing_after_its_peer_took_over(
    group: Cluster, peer: Member, store_url: str
) -> None:
    # A commits eu, then its phase 2 sleeps before us: it is paused right there.
    a = restart_a_with(group, "coordinator.mid_commit=1*sleep(4000)")
    assert a.pid is not None
    _, epoch_a = lease(store_url, "c1")
    txid = "c1.r-paused-member"
    transfer(group, "paused-member")  # answered once decided: phase 2 runs in the background
    wait_until(lambda: markers(group, txid) == {"eu"}, 10, "A committing eu")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: markers(group, txid) == set(REGIONS), TAKEOVER_DEADLINE_S, "takeover")
        wait_until(lambda: "takeover_finished" in peer.text(), 10, "B freeing c1")
        assert {fence_epoch(group, r, "c1") for r in REGIONS} == {epoch_a + 1}
    finally:
        os.kill(a.pid, signal.SIGCONT)
    wait_until(lambda: not a.alive(), 15, "A stepping down")
    a_log = Path(a.log).read_text()
    assert "lease_lost_stepping_down" in a_log
    # Whatever A sent after SIGCONT (its commit of us) was refused, or never left.
    assert "commit_decided" not in a_log.split("lease_lost_stepping_down")[-1]
    assert lease(store_url, "c1")[1] == epoch_a + 1, "A wrote no lease after B's"


def test_a_member_stopped_cleanly_hands_its_id_over_at_once(
    group: Cluster, peer: Member, store_url: str
) -> None:
    """A stops (SIGTERM) with a branch prepared that it never decided (a branch an agent holds
    under A's id, prepared straight through the agent's API): B takes c1 without waiting for a
    lease to run out, rolls the branch back and frees the id."""
    # A's own recovery would roll the branch back at its next pass: held at its failpoint.
    restart_a_with(group, "coordinator.recovery=pause")
    txid = "c1.r-left-prepared"
    prepare_on_agent(group, "eu", txid, -1, 2, epoch=lease(store_url, "c1")[1])
    assert prepared(group) == {"eu": [txid]}
    started = time.monotonic()
    group.stop("coordinator")
    wait_until(lambda: not prepared(group), TAKEOVER_DEADLINE_S, "B rolling the branch back")
    took = time.monotonic() - started
    print(f"\nclean hand-over: the branch rolled back {took:.2f} s after SIGTERM")
    wait_until(lambda: "takeover_finished" in peer.text(), 10, "B freeing c1")
    assert markers(group, txid) == set()
    assert lease(store_url, "c1")[0] == ""
    wait_dead(group, "coordinator")
