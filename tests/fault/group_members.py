"""A two-member coordinator group for the fault tests: the playground's coordinator is member A
(id c1), and ``start_peer`` starts member B (id c2) with A's configuration otherwise, both on a
MariaDB decision log, both real processes.

Shared by tests/fault/test_group_takeover.py, test_group_requests.py and test_sdk_failover.py;
each file keeps its own module-scoped cluster (their tests kill and pause members)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sql_stores import rows
from tests.support import prepared
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.ports import free_port

REGIONS = ("eu", "us")
LEASE_MS = 1500


@dataclass
class Member:
    process: subprocess.Popen[bytes]
    log: Path
    address: str

    def text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def group_cluster(
    tmp_path_factory: pytest.TempPathFactory, store_url: str, *, accounts: int = 10
) -> Iterator[Cluster]:
    """The playground with member A on ``store_url``; the agents serve c1 and c2."""
    cluster = Cluster.create(
        tmp_path_factory.mktemp("group"),
        REGIONS,
        coordinator_settings={
            "decision_log": store_url,
            "member": "member-a",
            "lease_ms": LEASE_MS,
            "takeover_interval_ms": 200,
            "recovery_interval_s": 0.5,
            "rpc_timeout_s": 3.0,
        },
        agent_settings={"reaper_interval_s": 0.1, "coordinator_ids": ["c1", "c2"]},
    )
    try:
        cluster.up()
        create_accounts(cluster, accounts)
        yield cluster
    finally:
        cluster.down(timeout=10)


@contextlib.contextmanager
def peer_member(group: Cluster, directory: Path) -> Iterator[Member]:
    """Member B: coordinator id c2, member-b, A's configuration otherwise; serving when
    yielded, stopped (SIGTERM, SIGKILL after 20 s) after."""
    a = group.component("coordinator")
    log = directory / "b.log"
    address = f"127.0.0.1:{free_port()}"
    env = {
        **a.env,
        "TWOPC_COORDINATOR_COORDINATOR_ID": "c2",
        "TWOPC_COORDINATOR_MEMBER": "member-b",
        "TWOPC_COORDINATOR_LISTEN": address,
        "TWOPC_COORDINATOR_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "TWOPC_FAILPOINTS": "",
    }
    # B's configuration file is a copy: the cluster finds its coordinator by command line.
    config = a.command.index("--config") + 1
    b_config = directory / "b.toml"
    shutil.copy(a.command[config], b_config)
    command = [*a.command[:config], str(b_config), *a.command[config + 1 :]]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=a.cwd, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT
        )
    member = Member(process, log, address)
    try:
        wait_until(lambda: "coordinator_listening" in member.text(), 30, "member B serving")
        yield member
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def restore_a(group: Cluster) -> None:
    """A serving again, without failpoints, and nothing left prepared (after a test that
    killed, paused or armed it)."""
    a = group.component("coordinator")
    a.env.pop("TWOPC_FAILPOINTS", None)
    if a.pid is not None and a.alive():
        os.kill(a.pid, signal.SIGCONT)
        group.kill("coordinator")
    group.restart("coordinator")
    wait_until(lambda: not prepared(group), 20, "nothing left prepared")


def lease(store_url: str, coordinator_id: str) -> tuple[str, int]:
    """(holder, epoch) of ``coordinator_id``'s lease row."""
    found = rows(
        store_url,
        f"SELECT holder, epoch FROM twopc_leases WHERE coordinator_id = '{coordinator_id}'",
    )
    return str(found[0][0]), int(found[0][1])
