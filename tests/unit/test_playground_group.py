"""The playground's coordinator group, as far as it is pure: member ids and names, the store
choices a cluster accepts, and the chaos targets that name a store node."""

from __future__ import annotations

import pytest

from twopc.testing.chaos.injector import store_node
from twopc.testing.playground.cluster import Cluster, group_ids, member_name
from twopc.testing.playground.mariadb import PlaygroundError


def test_members_are_named_and_numbered_from_the_first_id() -> None:
    assert group_ids("c1", 3) == ["c1", "c2", "c3"]
    assert group_ids("bench", 2) == ["bench", "bench-2"]
    assert [member_name(n) for n in (1, 2, 3)] == ["coordinator", "coordinator-2", "coordinator-3"]


@pytest.mark.parametrize(
    ("coordinators", "log_store", "message"),
    [
        (0, "file", "at least one coordinator"),
        (2, "file", "shares one decision log"),
        (1, "redis", "log_store must be one of file, galera"),
    ],
)
def test_a_group_needs_a_shared_store(
    tmp_path_factory: pytest.TempPathFactory, coordinators: int, log_store: str, message: str
) -> None:
    with pytest.raises(PlaygroundError, match=message):
        Cluster.create(
            tmp_path_factory.mktemp("c"), ["eu"], coordinators=coordinators, log_store=log_store
        )


def test_store_nodes_are_told_from_other_targets() -> None:
    assert store_node("store-2") == 2
    assert store_node("store-x") == 0
    assert store_node("coordinator-2") == 0
    assert store_node("mariadb-eu") == 0
