"""A real 3-node MariaDB Galera cluster (twopc/testing/playground/galera.py), started once for the
module (~10 s): rows replicate to every node; a SIGKILLed node leaves the others writable within
a few seconds and rejoins Synced, with the rows written meanwhile, after ``restart``; two nodes
writing one row make one of them fail certification (1213). Readers set ``wsrep_sync_wait`` so
that they see every write committed before their read (Galera applies on the other nodes
asynchronously)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import sqlalchemy

from tests.sql_stores import HELD_COMMIT_IDLE_S, reachable_tmp_dir
from twopc.testing.playground.galera import GaleraCluster, GaleraNotInstalled

DATABASE = "galera_test"
#: A SIGKILLed node stalls commits until it is dropped from the view: ~2.2 s with the cluster's
#: short EVS timeouts (2.1 s measured here), ~6 s without them.
WRITABLE_WITHIN = 5.0
CERTIFICATION_FAILURE = 1213  # ER_LOCK_DEADLOCK


@pytest.fixture(scope="module")
def cluster() -> Iterator[GaleraCluster]:
    base = reachable_tmp_dir("twopc-galera-")  # the nodes run as mysql: pytest's tmp is 0700
    made = GaleraCluster(base)
    try:
        made.start()
        with made.connect(1) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")  # DDL replicates (TOI)
        yield made
    finally:
        made.stop()  # also after a failed start or test: no server outlives the module
        shutil.rmtree(base, ignore_errors=True)


def causal(cluster: GaleraCluster, i: int, **kwargs: Any) -> pymysql.Connection:
    """A connection to node ``i`` whose reads wait until the node applied every write the
    cluster committed before them."""
    conn = cluster.connect(i, DATABASE, **kwargs)
    with conn.cursor() as cursor:
        cursor.execute("SET SESSION wsrep_sync_wait = 1")
    return conn


def ids(cluster: GaleraCluster, i: int, table: str) -> list[int]:
    with causal(cluster, i) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} ORDER BY id")
        return [int(row[0]) for row in cursor.fetchall()]


def wsrep_status(cluster: GaleraCluster, i: int) -> tuple[str, int]:
    with cluster.connect(i) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name IN "
            "('wsrep_local_state_comment', 'wsrep_cluster_size')"
        )
        values = {str(name).lower(): str(value) for name, value in cursor.fetchall()}
    return values["wsrep_local_state_comment"], int(values["wsrep_cluster_size"])


def process_state(pid: int) -> str:
    """The one-letter state in /proc (``T`` when stopped by a signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_missing_provider_is_reported_before_anything_starts(tmp_path: Path) -> None:
    cluster = GaleraCluster(tmp_path / "galera", provider=tmp_path / "libgalera_smm.so")
    with pytest.raises(GaleraNotInstalled, match=r"deploy/setup\.sh.*galera-4"):
        cluster.start()
    assert not (tmp_path / "galera").exists()
    assert cluster.pids == {1: None, 2: None, 3: None}


def test_every_node_is_synced_in_a_cluster_of_three(cluster: GaleraCluster) -> None:
    assert all(pid is not None for pid in cluster.pids.values())
    assert len(set(cluster.ports.values())) == 3
    for i in (1, 2, 3):
        assert wsrep_status(cluster, i) == ("Synced", 3)


def test_a_row_written_on_node_1_is_read_on_nodes_2_and_3(cluster: GaleraCluster) -> None:
    engine = sqlalchemy.create_engine(cluster.url(1, DATABASE))
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE replicated (id INT PRIMARY KEY)"))
            conn.execute(sqlalchemy.text("INSERT INTO replicated VALUES (1), (2)"))
    finally:
        engine.dispose()
    assert ids(cluster, 2, "replicated") == [1, 2]
    assert ids(cluster, 3, "replicated") == [1, 2]


def test_conflicting_writes_on_two_nodes_fail_one_certification(
    cluster: GaleraCluster,
) -> None:
    with cluster.connect(1, DATABASE) as setup, setup.cursor() as cursor:
        cursor.execute("CREATE TABLE contended (id INT PRIMARY KEY, v INT NOT NULL)")
        cursor.execute("INSERT INTO contended VALUES (1, 0)")
    first = causal(cluster, 1, autocommit=False)
    second = causal(cluster, 2, autocommit=False)
    try:
        # Each node locks the row locally only: neither waits for the other.
        with first.cursor() as cursor:
            cursor.execute("UPDATE contended SET v = v + 1 WHERE id = 1")
        with second.cursor() as cursor:
            cursor.execute("UPDATE contended SET v = v + 10 WHERE id = 1")
        first.commit()  # certified first: it wins, and aborts node 2's local transaction
        with pytest.raises(pymysql.err.OperationalError) as raised:
            second.commit()
        assert raised.value.args[0] == CERTIFICATION_FAILURE
    finally:
        first.close()
        second.close()
    for i in (1, 2, 3):
        with causal(cluster, i) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT v FROM contended WHERE id = 1")
            assert cursor.fetchone() == (1,)


def test_a_killed_node_leaves_the_others_writable_and_rejoins_after_restart(
    cluster: GaleraCluster,
) -> None:
    with cluster.connect(1, DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE during_outage (id INT PRIMARY KEY, node INT NOT NULL)")
    try:
        killed_at = time.monotonic()
        cluster.kill(3)
        assert cluster.pids[3] is None
        # One commit on each survivor; each stalls until node 3 is out of the view, then goes
        # through (a read timeout well past the bound, so that a stall is measured, not cut).
        for i, row_id in ((1, 1), (2, 2)):
            with cluster.connect(i, DATABASE, read_timeout=30) as conn, conn.cursor() as cursor:
                cursor.execute("INSERT INTO during_outage VALUES (%s, %s)", [row_id, i])
        writable_after = time.monotonic() - killed_at
        assert writable_after < WRITABLE_WITHIN, f"survivors writable after {writable_after} s"
        assert wsrep_status(cluster, 1) == ("Synced", 2)
        with cluster.connect(1, DATABASE) as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO during_outage VALUES (%s, 1)", [(n,) for n in range(3, 11)]
            )

        cluster.restart(3)  # recovers its position, catches up by IST, waits for Synced
        cluster.wait_synced(timeout=10)
        assert wsrep_status(cluster, 3) == ("Synced", 3)
        assert ids(cluster, 3, "during_outage") == list(range(1, 11))
        with cluster.connect(3, DATABASE) as conn, conn.cursor() as cursor:  # writable again
            cursor.execute("INSERT INTO during_outage VALUES (11, 3)")
        assert ids(cluster, 1, "during_outage") == list(range(1, 12))
    finally:
        if cluster.pids[3] is None:  # leave the module's cluster whole for whatever follows
            cluster.restart(3)


def test_a_paused_node_is_stopped_and_catches_up_when_resumed(cluster: GaleraCluster) -> None:
    with cluster.connect(1, DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE across_pause (id INT PRIMARY KEY)")
    pid = cluster.pids[3]
    assert pid is not None
    cluster.pause(3)
    try:
        assert process_state(pid) == "T"
    finally:
        cluster.resume(3)
    assert process_state(pid) != "T"
    with cluster.connect(1, DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO across_pause VALUES (1)")
    cluster.wait_synced(timeout=30)
    assert ids(cluster, 3, "across_pause") == [1]


# --- the decision log's fence on Galera: the log on one node, a takeover on another -----------


def test_a_takeover_on_another_node_fences_the_old_holders_log(cluster: GaleraCluster) -> None:
    """The old holder writes its decision log through node 1 with 16 tasks without pause; a peer
    acquires the id through node 2. Row locks are not shared between Galera nodes, but the
    fence's write to the lease row makes the two conflict in certification: every commit
    acknowledged to the old holder is in the new holder's replay (read through node 2), every
    one refused is not, and none that started after the acquire returned is acknowledged."""
    from coordinator.decision_log import DecisionLogFenced  # noqa: PLC0415
    from coordinator.decision_log.leases import (  # noqa: PLC0415
        LeaseHeld,
        LeaseStoreUnavailable,
        SqlLeases,
    )
    from coordinator.decision_log.sql_log import SqlDecisionLog  # noqa: PLC0415
    from tests.integration.test_leases import LONG_MS, commit, replay_of, run, until  # noqa: PLC0415

    node1, node2 = cluster.url(1, DATABASE), cluster.url(2, DATABASE)
    cid = "galera-race"

    async def scenario() -> None:
        a, b = SqlLeases(node1), SqlLeases(node2)
        lease = await a.acquire(cid, "member-a", 1000)
        log = SqlDecisionLog(node1, coordinator_id=cid, lease=lease, timeout_s=10)
        await log.open()
        acked: list[tuple[str, bool]] = []
        fenced: list[str] = []
        taken_over = asyncio.Event()

        async def writer(w: int) -> None:
            for i in range(100_000):
                record = commit(cid, w * 100_000 + i)
                after_takeover = taken_over.is_set()
                try:
                    await log.record_commit(record)
                except DecisionLogFenced:
                    fenced.append(record.txid)
                    return
                acked.append((record.txid, after_takeover))
                if after_takeover:
                    return  # acknowledged after the takeover: the test fails below

        writers = [asyncio.create_task(writer(w)) for w in range(16)]

        async def some_acked() -> bool:
            return len(acked) >= 32

        await until(some_acked, "32 commits acknowledged before the takeover", within=30)
        while True:
            try:
                taken = await b.acquire(cid, "member-b", LONG_MS)
                break
            except (LeaseHeld, LeaseStoreUnavailable):  # a member tries again, as here
                await asyncio.sleep(0.005)
        taken_over.set()
        await asyncio.gather(*writers)
        await log.close()
        replay = await replay_of(node2, taken)
        assert [txid for txid, after in acked if after] == []
        assert len(fenced) == 16
        assert set(replay) == {txid for txid, _ in acked}
        a.close()
        b.close()

    run(scenario(), deadline=90)


def test_a_batch_in_flight_on_one_node_loses_to_a_takeover_on_another(
    cluster: GaleraCluster,
) -> None:
    """The old holder's batch (through node 1) has passed its fence and its COMMIT is held on
    the way; a peer acquires the id through node 2 meanwhile, which no row lock stops, and reads
    its replay. Released, the batch's COMMIT fails certification against the acquire: the
    record is refused (fenced), never acknowledged, and so never missing from the replay."""
    from coordinator.decision_log import DecisionLogFenced  # noqa: PLC0415
    from coordinator.decision_log.leases import SqlLeases  # noqa: PLC0415
    from coordinator.decision_log.sql_log import SqlDecisionLog  # noqa: PLC0415
    from tests.integration.test_leases import (  # noqa: PLC0415
        IN_FLIGHT_MS,
        LONG_MS,
        commit,
        expired_in_store,
        replay_of,
        run,
        until,
    )
    from tests.sql_stores import proxy_to, via  # noqa: PLC0415

    node1, node2 = cluster.url(1, DATABASE), cluster.url(2, DATABASE)

    async def scenario() -> None:
        with proxy_to(cluster.node_ports(1).client) as proxy:
            a, b = SqlLeases(node1), SqlLeases(node2)
            lease = await a.acquire("held", "member-a", IN_FLIGHT_MS)
            log = SqlDecisionLog(
                via(node1, proxy.port),
                coordinator_id="held",
                lease=lease,
                timeout_s=HELD_COMMIT_IDLE_S,  # its COMMIT is held: no watchdog may end it
                idle_in_transaction_s=HELD_COMMIT_IDLE_S,
            )
            await log.open()
            proxy.hold_commits = True
            written = asyncio.create_task(log.record_commit(commit("held", 1)))  # lease live

            async def held() -> bool:
                return proxy.commits_held == 1

            await until(held, "the batch's COMMIT to reach the proxy")
            await expired_in_store(b, "held")  # while the batch's COMMIT is held
            taken = await b.acquire("held", "member-b", LONG_MS)
            replay = await replay_of(node2, taken)
            proxy.release_commits()
            with pytest.raises(DecisionLogFenced):
                await written
            assert replay == []
            assert await replay_of(node2, taken) == []
            await log.close()
            a.close()
            b.close()

    run(scenario(), deadline=60)
