"""The coordinator on the SQL decision log (MariaDB and PostgreSQL): a crash right after the COMMIT
decision was written leaves the decision in the store, and the restarted coordinator replays it
from there and commits every branch; a store out of reach at start stops the daemon with a clear
error (exit 3), its password never shown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.test_crash_recovery import arm, disarm_and_restart, wait_dead, wait_recovered
from tests.sql_stores import KINDS, Stores, rows
from tests.support import ROOT, markers, prepared, transfer_sql
from twopc.client import Client, OutcomeUnknown, RetryPolicy
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.ports import free_port

pytestmark = pytest.mark.fault

REGIONS = ("eu", "us")


@pytest.fixture(scope="module", params=KINDS)
def store_url(request: pytest.FixtureRequest, sql_stores: Stores) -> str:
    return sql_stores.new_database(request.param)


@pytest.fixture(scope="module")
def sql_cluster(tmp_path_factory: pytest.TempPathFactory, store_url: str) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("sql-cluster"),
        REGIONS,
        coordinator_settings={
            "decision_log": store_url,
            "recovery_interval_s": 0.5,
            "rpc_timeout_s": 3.0,
        },
        agent_settings={"reaper_interval_s": 0.1, "pool_size": 4},
    )
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(timeout=10)


def open_rows(url: str) -> set[str]:
    return {str(txid) for (txid,) in rows(url, "SELECT txid FROM twopc_commits")}


def test_a_decision_in_the_store_survives_a_crash_and_is_carried_out(
    sql_cluster: Cluster, store_url: str
) -> None:
    create_accounts(sql_cluster, 10)
    assert not (Path(sql_cluster.component("coordinator").data_dir) / "decisions.log").exists()
    arm(sql_cluster, "coordinator", "coordinator.after_commit_record")
    policy = RetryPolicy(attempts=2, initial_backoff=0.05, deadline=1.0)
    with (
        sql_cluster.client(retry_policy=policy, rpc_timeout=5) as impatient,
        pytest.raises(OutcomeUnknown),
    ):
        impatient.run(
            {"eu": transfer_sql(-25, 1), "us": transfer_sql(25, 1)},
            timeout=5,
            request_id="sql-crash",
        )
    wait_dead(sql_cluster, "coordinator")
    txid = f"{sql_cluster.coordinator_id}.r-sql-crash"
    assert prepared(sql_cluster) == {"eu": [txid], "us": [txid]}
    assert open_rows(store_url) == {txid}, "the decision is in the store, not yet ended"

    disarm_and_restart(sql_cluster, "coordinator")
    wait_recovered(sql_cluster)
    assert markers(sql_cluster, txid) == set(REGIONS)
    wait_until(lambda: not open_rows(store_url), 10, "the END deleting the row")

    policy = RetryPolicy(attempts=20, initial_backoff=0.05, max_backoff=0.5, deadline=15.0)
    client: Client
    with sql_cluster.client(retry_policy=policy) as client:
        result = client.run({"eu": transfer_sql(-1, 2), "us": transfer_sql(1, 2)}, timeout=5)
        wait_until(lambda: markers(sql_cluster, result.txid) == set(REGIONS), 5, "phase 2")


def test_a_store_out_of_reach_at_start_stops_the_coordinator(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'listen = "127.0.0.1:{free_port()}"\n'
        "insecure_plaintext = true\n"
        f'decision_log = "postgresql://twopc@127.0.0.1:{free_port()}/nowhere"\n'
        'decision_log_password_env = "LOG_PASSWORD"\n'
        f'participants = {{ eu = "127.0.0.1:{free_port()}" }}\n'
    )
    env = {"PYTHONPATH": str(ROOT), "LOG_PASSWORD": "hidden-pw-42", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "twopc.cli", "coordinator", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "decision_log_unavailable" in done.stderr
    assert "cannot open the decision log in postgresql+psycopg://twopc:***@127.0.0.1" in done.stderr
    assert "hidden-pw-42" not in done.stderr + done.stdout


def test_a_member_that_lost_its_lease_steps_down_and_the_other_takes_over(
    sql_cluster: Cluster, store_url: str, tmp_path: Path
) -> None:
    """Coordinator A holds id c1's lease. B, started with the same id under another member name,
    waits. A is SIGSTOPped past its lease: B takes the id with the next epoch and serves. A is
    SIGCONTed: its renewal finds the lease lost and it stops at once (SIGKILL of itself). A
    restarted with its own member name waits until B stops and releases the id."""
    a = sql_cluster.component("coordinator")
    assert a.pid is not None
    b_log = tmp_path / "b.log"
    b_env = {
        **a.env,
        "TWOPC_COORDINATOR_MEMBER": "member-b",
        "TWOPC_COORDINATOR_LISTEN": f"127.0.0.1:{free_port()}",
        "TWOPC_COORDINATOR_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    # B's configuration file is a copy: the cluster finds its coordinator by command line.
    config = a.command.index("--config") + 1
    b_config = tmp_path / "b.toml"
    shutil.copy(a.command[config], b_config)
    b_command = [*a.command[:config], str(b_config), *a.command[config + 1 :]]
    with b_log.open("ab") as out:
        b = subprocess.Popen(
            b_command, cwd=a.cwd, env=os.environ | b_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: "lease_waiting" in b_log.read_text(), 20, "B waits for the lease")
        epochs_before = {int(e) for (e,) in rows(store_url, "SELECT epoch FROM twopc_leases")}
        os.kill(a.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: "coordinator_listening" in b_log.read_text(), 20, "B took the id")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        wait_until(lambda: not a.alive(), 10, "A stepping down")
        a_log = Path(a.log).read_text()
        assert "lease_lost_stepping_down" in a_log
        (holder, epoch) = rows(store_url, "SELECT holder, epoch FROM twopc_leases")[0]
        assert holder == "member-b"
        assert int(epoch) == max(epochs_before) + 1
        # A again, under its own member name: it waits while B holds the id.
        sql_cluster.restart("coordinator", wait=False)
        wait_until(
            lambda: Path(a.log).read_text().count("lease_waiting") > a_log.count("lease_waiting"),
            20,
            "A waits for B's lease",
        )
    finally:
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=20)
    # B released the id at its clean stop: A takes it at once and serves again.
    sql_cluster.wait_ready("coordinator", 20)
