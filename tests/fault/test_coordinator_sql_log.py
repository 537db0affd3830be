"""The coordinator on the SQL decision log (MariaDB and PostgreSQL): a crash right after the COMMIT
decision was written leaves the decision in the store, and the restarted coordinator replays it
from there and commits every branch; a store out of reach at start stops the daemon with a clear
error (exit 3), its password never shown."""

from __future__ import annotations

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
