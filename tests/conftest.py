"""Shared fixtures: a real three-region cluster (MariaDB + agent per region, a coordinator).

The cluster is started once per session, with mutual TLS on every gRPC hop (the playground's
certificates; ``cluster.client(identity)`` and ``cluster.channel(target, identity=...)`` connect
as one of its identities). After every test that uses it, every component is
checked alive (and restarted from its recorded command line when a test killed it), and every
prepared branch must be gone: a test that leaves one behind fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sql_stores import Stores, reachable_tmp_dir
from twopc.client import Client, RetryPolicy
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.invariants import prepared_branches

REGIONS = ("eu", "us", "ap")

# Fast recovery and reaping so that fault tests settle in well under a second.
COORDINATOR_SETTINGS = {"recovery_interval_s": 0.5, "reaper_interval_s": 0.1, "rpc_timeout_s": 3.0}
AGENT_SETTINGS = {"reaper_interval_s": 0.1, "pool_size": 8, "lock_wait_timeout_s": 5}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster")
    cluster = Cluster.create(
        directory,
        REGIONS,
        coordinator_settings=COORDINATOR_SETTINGS,
        agent_settings=AGENT_SETTINGS,
    )
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down(timeout=10)


@pytest.fixture(scope="session")
def sql_stores() -> Iterator[Stores]:
    """The SQL decision log's stores: a MariaDB and a PostgreSQL, each started on first use and
    stopped at the end of the session."""
    base = reachable_tmp_dir("twopc-sql-stores-")
    stores = Stores(base)
    try:
        yield stores
    finally:
        stores.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def live_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The session cluster, brought back to health and checked clean after the test."""
    yield cluster
    for component in cluster.components.values():
        failpoints = component.env.pop("TWOPC_FAILPOINTS", None)
        if failpoints is not None and component.alive():
            cluster.kill(component.name)
    for name in [f"mariadb-{r}" for r in REGIONS] + [f"agent-{r}" for r in REGIONS]:
        if not cluster.component(name).alive():
            cluster.restart(name)
    if not cluster.component("coordinator").alive():
        cluster.restart("coordinator")
    wait_until(
        lambda: not any(prepared_branches(cluster).values()),
        15.0,
        "every prepared branch resolved after the test",
        interval=0.05,
    )


@pytest.fixture
def client(live_cluster: Cluster) -> Iterator[Client]:
    policy = RetryPolicy(attempts=20, initial_backoff=0.05, max_backoff=0.5, deadline=15.0)
    with live_cluster.client(retry_policy=policy) as c:
        yield c


@pytest.fixture
def bank(live_cluster: Cluster) -> int:
    """Fresh accounts in every region (ids 0-9, balance 1000); returns the total."""
    return create_accounts(live_cluster, 10)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        relative = Path(str(item.fspath)).relative_to(here)
        kind = relative.parts[0]
        if kind in ("integration", "fault", "security"):
            item.add_marker(getattr(pytest.mark, kind))
