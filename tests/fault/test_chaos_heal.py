"""The chaos harness heals everything before it checks the invariants: every link, every frozen
or dead process, every failpoint left armed by a run that stopped before its faults ended.

(A chaos run once died in heal_all: a failpoint still armed with crash killed a daemon right
after it had been checked alive. heal_all now disarms first and loops until nothing is down or
armed; that race depends on timing, so this test pins the healing itself.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import transfer_sql
from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.testing.chaos.injector import AppliedFault, Injector
from twopc.testing.chaos.proxy_service import ProxyControl
from twopc.testing.chaos.schedule import FaultEvent, FaultKind
from twopc.testing.playground.cluster import PROXY, Cluster
from twopc.testing.playground.tls import ADMIN


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster.create(
        tmp_path_factory.mktemp("proxied") / "cluster",
        ["eu", "us"],
        proxied=True,
        coordinator_settings={"admin_failpoints": True, "recovery_interval_s": 0.5},
        agent_settings={"admin_failpoints": True},
    )
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(timeout=10)


def armed(cluster: Cluster, daemon: str) -> list[str]:
    with cluster.channel(daemon, identity=ADMIN) as channel:
        listed = cpb_grpc.FailpointsStub(channel).List(cpb.ListFailpointsRequest(), timeout=5)
    return [p.name for p in listed.failpoints if p.spec]


def test_heal_all_leaves_every_process_up_every_link_healed_and_nothing_armed(
    proxied: Cluster, tmp_path: Path
) -> None:
    injector = Injector(proxied)
    faults = [
        FaultEvent(0, 5, FaultKind.CUT, "coordinator-agent-us"),
        FaultEvent(0, 5, FaultKind.STOP, "agent-eu"),
        FaultEvent(0, 5, FaultKind.KILL, "coordinator"),
        FaultEvent(
            0, 5, FaultKind.FAILPOINT, "agent-us", {"name": "agent.after_prepare", "spec": "crash"}
        ),
    ]
    for event in faults:
        injector._start(AppliedFault(event))  # started, never ended: the run stopped early
    assert armed(proxied, "agent-us") == ["agent.after_prepare"]
    assert not proxied.component("coordinator").alive()

    injector.heal_all()

    for name in ["coordinator", "agent-eu", "agent-us", "mariadb-eu", "mariadb-us"]:
        assert proxied.component(name).alive(), name
    assert armed(proxied, "agent-us") == []
    assert armed(proxied, "coordinator") == []
    links = ProxyControl(proxied.component(PROXY).address, tls=proxied.proxy_tls()).links()
    assert all(not link.fault.cut for link in links.values())
    with proxied.client() as client:  # and it all works again
        for region in ("eu", "us"):
            with proxied.mysql(region) as conn, conn.cursor() as cursor:
                cursor.execute(
                    "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY, "
                    "balance BIGINT NOT NULL)"
                )
                cursor.execute("REPLACE INTO accounts VALUES (1, 1000)")
        result = client.run({"eu": transfer_sql(-1, 1), "us": transfer_sql(1, 1)}, timeout=10)
    assert result.txid
