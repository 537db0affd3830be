"""The coordinator's Prometheus metrics: the engine's ``EngineMetrics`` port, the decision log's
fsyncs, and gauges read at scrape time. One ``CollectorRegistry`` per coordinator, never the
global one. No label carries a txid: outcomes, results and participant names only.

==========================================  =====================================================
``twopc_coordinator_transactions_total``    sealed transactions, label ``outcome``: committed,
                                            aborted, unknown (a one-phase commit's lost answer)
``twopc_coordinator_commit_seconds``        histogram: a commit's start to its decision (phase 1
                                            and the decision log's write)
``twopc_coordinator_prepare_seconds``       histogram per ``participant``: Prepare round trips
``twopc_coordinator_recovery_passes_total`` label ``result``: clean, or unclean (an agent
                                            unreachable, a branch left in doubt)
``twopc_coordinator_recovered_total``       branches recovery finished, label ``action``:
                                            committed, rolled_back
``twopc_coordinator_live_transactions``     gauge: begun and not sealed
``twopc_coordinator_in_doubt_transactions`` gauge: decided COMMIT, not acknowledged by every
                                            branch yet (COMMIT record without END)
``twopc_coordinator_serving``               gauge: 1 while its health is SERVING
``twopc_decision_log_fsync_seconds``        histogram: each forced write's fsync
``twopc_decision_log_batch_commits``        histogram: COMMIT records per fsync (group commit)
``twopc_deadlock_cycles_total``             lock cycles across participants found
``twopc_deadlock_victims_total``            transactions aborted to break one
``twopc_deadlock_break_seconds``            histogram: the most recent wait of a cycle began ->
                                            its victim's abort sent
``twopc_one_shot_prepares_total``           one_shot_order = adaptive: one-shot transactions
                                            with several participants, by ``order`` (parallel,
                                            ordered while victims are many)
``twopc_coordinator_refused_total``         new transactions refused, label ``reason``:
                                            rate_limit (an identity's), overload (shed)
``twopc_coordinator_admitted_in_flight``    gauge: admitted, not yet decided (overload guard on)
``twopc_coordinator_admission_queue``       gauge: new transactions waiting for a slot
``twopc_breaker_state``                     gauge per ``participant``: its circuit breaker, 0
                                            closed, 1 half open, 2 open
``twopc_breaker_transitions_total``         breaker moves, labels ``participant``, ``to``
``twopc_breaker_fast_failures_total``       new transactions refused at once by an open
                                            breaker, label ``participant``
==========================================  =====================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.engine.manager import TransactionManager
from twopc.observability import LATENCY_BUCKETS

__all__ = ["CoordinatorMetrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OUTCOMES = ("committed", "aborted", "unknown")


class CoordinatorMetrics:
    """Implements ``coordinator.engine.ports.EngineMetrics`` over ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._transactions = Counter(
            "twopc_coordinator_transactions",
            "Transactions whose fate is sealed, by outcome",
            ["outcome"],
            registry=r,
        )
        self._by_outcome = {o: self._transactions.labels(o) for o in OUTCOMES}
        self._commit = Histogram(
            "twopc_coordinator_commit_seconds",
            "From a commit's start to its decision (phase 1 and the decision log's write)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._prepare = Histogram(
            "twopc_coordinator_prepare_seconds",
            "Prepare round trips, by participant",
            ["participant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._prepare_children: dict[str, Histogram] = {}
        passes = Counter(
            "twopc_coordinator_recovery_passes",
            "Recovery passes, by result (unclean: an agent unreachable or a branch left)",
            ["result"],
            registry=r,
        )
        self._clean, self._unclean = passes.labels("clean"), passes.labels("unclean")
        recovered = Counter(
            "twopc_coordinator_recovered",
            "Branches that recovery finished, by action",
            ["action"],
            registry=r,
        )
        self._committed, self._rolled_back = (
            recovered.labels("committed"),
            recovered.labels("rolled_back"),
        )
        self._fsync = Histogram(
            "twopc_decision_log_fsync_seconds",
            "The decision log's fsync of each forced batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "twopc_decision_log_batch_commits",
            "COMMIT records made durable by one fsync (group commit)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )

        self._cycles = Counter(
            "twopc_deadlock_cycles", "Lock cycles across participants found", registry=r
        )
        self._victims = Counter(
            "twopc_deadlock_victims", "Transactions aborted to break a lock cycle", registry=r
        )
        self._break = Histogram(
            "twopc_deadlock_break_seconds",
            "From the start of a lock cycle's most recent wait to its victim's abort",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        one_shot = Counter(
            "twopc_one_shot_prepares",
            "One-shot transactions with several participants under one_shot_order = adaptive, "
            "by how their branches were prepared",
            ["order"],
            registry=r,
        )
        self._one_shot = {
            ordered: one_shot.labels("ordered" if ordered else "parallel")
            for ordered in (False, True)
        }
        refused = Counter(
            "twopc_coordinator_refused",
            "New transactions refused (RESOURCE_EXHAUSTED with a retry-after), by reason: "
            "rate_limit (the identity's), overload (shed)",
            ["reason"],
            registry=r,
        )
        self._refused = {reason: refused.labels(reason) for reason in ("rate_limit", "overload")}

        self._breaker_moves = Counter(
            "twopc_breaker_transitions",
            "Moves of a participant's circuit breaker, by participant and new state",
            ["participant", "to"],
            registry=r,
        )
        self._breaker_refusals = Counter(
            "twopc_breaker_fast_failures",
            "New transactions refused at once because a participant's circuit breaker is open",
            ["participant"],
            registry=r,
        )

    # --- EngineMetrics -----------------------------------------------------------------------

    def breaker_moved(self, participant: str, to: str) -> None:
        self._breaker_moves.labels(participant, to).inc()

    def breaker_refused(self, participant: str) -> None:
        self._breaker_refusals.labels(participant).inc()

    def one_shot_prepared(self, *, ordered: bool) -> None:
        self._one_shot[ordered].inc()

    def admission_refused(self, reason: str) -> None:
        counter = self._refused.get(reason)
        if counter is not None:
            counter.inc()

    def deadlock_found(self) -> None:
        self._cycles.inc()

    def deadlock_victim(self, seconds: float) -> None:
        self._victims.inc()
        self._break.observe(seconds)

    def transaction_finished(self, outcome: str) -> None:
        counter = self._by_outcome.get(outcome)
        if counter is not None:
            counter.inc()

    def commit_decided(self, seconds: float) -> None:
        self._commit.observe(seconds)

    def prepare_answered(self, participant: str, seconds: float) -> None:
        child = self._prepare_children.get(participant)
        if child is None:
            child = self._prepare_children[participant] = self._prepare.labels(participant)
        child.observe(seconds)

    def recovery_pass(self, *, clean: bool, committed: int, rolled_back: int) -> None:
        (self._clean if clean else self._unclean).inc()
        if committed:
            self._committed.inc(committed)
        if rolled_back:
            self._rolled_back.inc(rolled_back)

    # --- the decision log (called from its writer thread) ------------------------------------

    def log_synced(self, commits: int, seconds: float) -> None:
        self._fsync.observe(seconds)
        self._batch.observe(commits)

    # --- read at scrape time -----------------------------------------------------------------

    def watch(self, manager: TransactionManager, serving: Callable[[], bool]) -> None:
        """Adds the gauges read from ``manager`` and ``serving`` (its health) at each scrape."""
        self.registry.register(_StateCollector(manager, serving))


class _StateCollector(Collector):
    def __init__(self, manager: TransactionManager, serving: Callable[[], bool]) -> None:
        self._manager = manager
        self._serving = serving

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Read from the metrics thread: each is one len() or attribute read of the loop's state.
        yield GaugeMetricFamily(
            "twopc_coordinator_live_transactions",
            "Transactions begun and not yet sealed",
            value=self._manager.live_count,
        )
        yield GaugeMetricFamily(
            "twopc_coordinator_in_doubt_transactions",
            "Transactions decided COMMIT whose branches have not all acknowledged yet",
            value=self._manager.in_doubt_count,
        )
        admission = self._manager.admission
        yield GaugeMetricFamily(
            "twopc_coordinator_admitted_in_flight",
            "New transactions admitted and not yet decided (with admission_max_in_flight)",
            value=admission.in_flight,
        )
        yield GaugeMetricFamily(
            "twopc_coordinator_admission_queue",
            "New transactions waiting for an admission slot",
            value=admission.queued,
        )
        yield GaugeMetricFamily(
            "twopc_coordinator_serving",
            "1 while the coordinator's gRPC health is SERVING",
            value=1 if self._serving() else 0,
        )
        breakers = GaugeMetricFamily(
            "twopc_breaker_state",
            "Each participant's circuit breaker: 0 closed, 1 half open, 2 open",
            labels=["participant"],
        )
        for participant, state in self._manager.breaker_states().items():
            breakers.add_metric([participant], state.level)
        yield breakers
