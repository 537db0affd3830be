"""The playground cleans up after itself, even when a part fails to start.

Regression: a cluster whose start failed half-way (under heavy load) had written no state file,
so nothing knew to stop the proxy and database it had already started; they ran on for good."""

from __future__ import annotations

from pathlib import Path

import pytest

from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.mariadb import PlaygroundError


def test_a_cluster_that_fails_to_start_leaves_nothing_running(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    cluster = Cluster.create(
        directory, ["eu"], proxied=True, coordinator_settings={"no_such_setting": 1}
    )
    with pytest.raises(PlaygroundError, match="coordinator exited while starting"):
        cluster.up(timeout=30)
    assert [c.name for c in cluster.components.values() if c.alive()] == []
    recorded = Cluster.load(directory)  # the state file names what was started
    assert recorded.components["mariadb-eu"].pid == cluster.components["mariadb-eu"].pid
