"""The agent's Prometheus metrics. One ``CollectorRegistry`` per agent, never the global one. No
label carries a txid: RPC methods, status codes and branch states only.

=====================================  ==========================================================
``twopc_agent_call_seconds``           histogram per ``method`` (Execute, Prepare, Commit,
                                       CommitMany, Rollback, Recover, Inspect), pipelined calls
                                       included
``twopc_agent_call_errors_total``      calls answered with an error, by ``method`` and ``code``
``twopc_agent_lock_wait_edges_reported_total``  wait-for edges answered to WaitsFor
``twopc_agent_branch_lock_hold_seconds``  histogram: a committed branch's first statement to its
                                       XA COMMIT (how long it held its row locks)
``twopc_agent_pool_in_use``            gauge: pooled sessions lent out (and being reset)
``twopc_agent_pool_waiters``           gauge: checkouts waiting for a free session
``twopc_agent_pool_idle``              gauge: connections kept idle
``twopc_agent_pool_capacity``          gauge: pool_size + pool_overflow
``twopc_agent_branches``               gauge per ``state``: active, prepared
``twopc_agent_database_up``            gauge: 1 while the last probe of the database answered
``twopc_agent_accepting_branches``     gauge: 0 while a safety check refuses new branches
``twopc_agent_serving``                gauge: 1 while its gRPC health is SERVING
=====================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from participants.agent import Agent
from participants.xa import SessionPool
from twopc.observability import LATENCY_BUCKETS

__all__ = ["AgentMetrics"]

METHODS = (
    "Execute",
    "Prepare",
    "Commit",
    "CommitMany",
    "Rollback",
    "Recover",
    "Inspect",
    "WaitsFor",
)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._seconds = Histogram(
            "twopc_agent_call_seconds",
            "Participant calls, by method, from request to answer",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._errors = Counter(
            "twopc_agent_call_errors",
            "Participant calls answered with an error, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self._edges = Counter(
            "twopc_agent_lock_wait_edges_reported",
            "Wait-for edges (a branch waiting on a lock holder) answered to the coordinator",
            registry=self.registry,
        )
        self._lock_hold = Histogram(
            "twopc_agent_branch_lock_hold_seconds",
            "Committed branches, from their first statement to their XA COMMIT",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._by_method = {m: self._seconds.labels(m) for m in METHODS}

    def branch_lock_hold(self, seconds: float) -> None:
        self._lock_hold.observe(seconds)

    def lock_wait_edges_reported(self, count: int) -> None:
        self._edges.inc(count)

    def call(self, method: str, seconds: float, error_code: str = "") -> None:
        child = self._by_method.get(method)
        if child is None:
            return
        child.observe(seconds)
        if error_code:
            self._errors.labels(method, error_code).inc()

    def watch(
        self,
        agent: Agent,
        pool: SessionPool,
        *,
        database_up: Callable[[], bool],
        serving: Callable[[], bool],
    ) -> None:
        """Adds the gauges read from the agent, its pool and its health at each scrape."""
        self.registry.register(_StateCollector(agent, pool, database_up, serving))


class _StateCollector(Collector):
    def __init__(
        self,
        agent: Agent,
        pool: SessionPool,
        database_up: Callable[[], bool],
        serving: Callable[[], bool],
    ) -> None:
        self._agent = agent
        self._pool = pool
        self._database_up = database_up
        self._serving = serving

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Read from the metrics thread: plain reads of the loop's counters.
        pool = self._pool
        for name, help_text, value in (
            ("in_use", "Pooled sessions lent out, and being reset", pool.in_use),
            ("waiters", "Checkouts waiting for a free session", pool.waiting),
            ("idle", "Connections kept idle", pool.idle),
            ("capacity", "pool_size + pool_overflow", pool.capacity),
        ):
            yield GaugeMetricFamily(f"twopc_agent_pool_{name}", help_text, value=value)
        active, prepared = self._agent.counts()
        branches = GaugeMetricFamily(
            "twopc_agent_branches", "Live branches, by state", labels=["state"]
        )
        branches.add_metric(["active"], active)
        branches.add_metric(["prepared"], prepared)
        yield branches
        yield GaugeMetricFamily(
            "twopc_agent_database_up",
            "1 while the last probe of the database answered",
            value=1 if self._database_up() else 0,
        )
        yield GaugeMetricFamily(
            "twopc_agent_accepting_branches",
            "0 while a safety check (privileges, table engines) refuses new branches",
            value=0 if self._agent.refusing else 1,
        )
        yield GaugeMetricFamily(
            "twopc_agent_serving",
            "1 while the agent's gRPC health is SERVING",
            value=1 if self._serving() else 0,
        )
