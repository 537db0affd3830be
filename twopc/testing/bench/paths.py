"""Which way each system's traffic goes in a cell: straight to its peer, or through the proxy.

The rule is the same for every system. With no injected latency (0 ms) nothing sits in between:
the baselines connect to each MariaDB at its own address and twopc's coordinator reaches each
agent at its own address, so that no system pays for the proxy's CPU (about 0.5 ms of it per
direct-XA transaction, half of that baseline's budget, when the baselines went through it). With
a round trip to inject, the proxy carries every cross-region hop of every system: coordinator ->
agent for twopc (``coordinator-agent-<region>``), benchmark -> database for the baselines
(``client-mariadb-<region>``). The hops that stay inside one place in a real deployment
(benchmark -> coordinator, agent -> its database) are direct in every cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twopc.testing.playground.cluster import Cluster

__all__ = ["Paths", "choose_paths"]


@dataclass(frozen=True)
class Paths:
    """The addresses the systems use in one cell.

    Attributes:
        rtt_ms: the injected round trip they are for.
        agents: region -> where the coordinator reaches that region's agent.
        databases: region -> where the baselines reach that region's database.
        proxied: whether those addresses are the proxy's links (else the peers' own).
    """

    rtt_ms: int
    agents: Mapping[str, str]
    databases: Mapping[str, str]
    proxied: bool

    def describe(self) -> dict[str, str]:
        """Per kind of system, the way its cross-region traffic goes, for the report."""
        how = "through the proxy" if self.proxied else "direct, no proxy"
        return {
            "twopc": f"bench -> coordinator direct; coordinator -> agents {how} "
            f"({', '.join(f'{r} {a}' for r, a in self.agents.items())})",
            "baselines": f"bench -> mariadb {how} "
            f"({', '.join(f'{r} {a}' for r, a in self.databases.items())})",
        }


def choose_paths(cluster: Cluster, rtt_ms: int) -> Paths:
    """The addresses for a cell with ``rtt_ms`` of injected round trip on ``cluster`` (made by
    ``runner.create_cluster``).

    Raises:
        ValueError: a round trip to inject on a cluster without the links that carry it.
    """
    own = {
        region: (
            cluster.component(f"agent-{region}").address,
            cluster.component(f"mariadb-{region}").address,
        )
        for region in cluster.regions
    }
    if rtt_ms == 0:
        return Paths(
            rtt_ms,
            {r: agent for r, (agent, _) in own.items()},
            {r: db for r, (_, db) in own.items()},
            proxied=False,
        )
    links = {link.name: link.listen for link in cluster.links}
    try:
        agents = {r: links[f"coordinator-agent-{r}"] for r in cluster.regions}
        databases = {r: links[f"client-mariadb-{r}"] for r in cluster.regions}
    except KeyError as err:
        raise ValueError(f"{rtt_ms} ms to inject, but the cluster has no link {err}") from None
    return Paths(rtt_ms, agents, databases, proxied=True)
