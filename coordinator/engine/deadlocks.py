"""Lock cycles across participants: found in the agents' wait-for edges, and broken.

T1 prepares in eu holding row a and waits in us for row b, which T2 holds after preparing in us
while T2 waits in eu for a: neither database sees a cycle, and without this both would wait for a
deadline or a lock wait timeout. Each agent reports which of its branches waits on which
(``WaitsFor``: waiter txid -> holder txid, with how long the waiter has waited); the detector
joins every agent's edges into one graph, finds each cycle and picks one victim per cycle, which
the manager aborts (``TransactionManager.break_deadlock``). The functions here are pure; the
``DeadlockDetector`` polls the agents through the ``ParticipantPort`` (no grpc here).

Safety: a victim is only ever a transaction that is not decided (ACTIVE, or PREPARING before its
votes are counted); one with a COMMIT record is never aborted (the manager refuses it, and the
decider checks for a victim before it counts the votes, in the same event loop step).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from coordinator.engine.ports import EngineMetrics, ParticipantPort, WaitEdge

__all__ = ["Cycle", "DeadlockDetector", "WaitEdge", "find_victims"]

log = structlog.get_logger("twopc.coordinator.deadlocks")


@dataclass(frozen=True)
class Cycle:
    """A cycle of waits: ``edges[i].holder == edges[i + 1].waiter``, the last back to the
    first."""

    edges: tuple[WaitEdge, ...]

    @property
    def txids(self) -> tuple[str, ...]:
        return tuple(edge.waiter for edge in self.edges)

    @property
    def youngest_wait_ms(self) -> int:
        """How long the most recent of its waits has lasted: the cycle exists since then."""
        return min(edge.waited_ms for edge in self.edges)

    def describe(self) -> str:
        return ", ".join(
            f"{edge.waiter} waits on {edge.holder} in {edge.participant}" for edge in self.edges
        )


def _find_cycle(graph: Mapping[str, Sequence[WaitEdge]]) -> Cycle | None:
    """One cycle of the graph (waiter -> its edges), or None when there is none. Iterative
    depth-first search: white (unseen), grey (on the path), black (done)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[WaitEdge] = []
        on_path = {start: 0}
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, index = stack[-1]
            edges = graph.get(node, ())
            if index >= len(edges):
                stack.pop()
                done.add(node)
                on_path.pop(node, None)
                if path:
                    path.pop()
                continue
            stack[-1] = (node, index + 1)
            edge = edges[index]
            if edge.holder in on_path:
                first = on_path[edge.holder]
                return Cycle((*path[first:], edge))
            if edge.holder in done or edge.holder not in graph:
                continue
            on_path[edge.holder] = len(path) + 1
            path.append(edge)
            stack.append((edge.holder, 0))
    return None


def find_victims(
    edges: Iterable[WaitEdge],
    begun: Mapping[str, float],
    breaking: Collection[str] = (),
) -> list[tuple[Cycle, str]]:
    """Every cycle of the wait-for graph, each with its victim, until no cycle is left.

    Only transactions in ``begun`` (txid -> when it began) may be victims: this coordinator's,
    not yet decided. An edge to an unknown holder ("" : a detached prepared branch, another
    client's session) belongs to no cycle. The victim of a cycle is its youngest candidate (the
    latest begun; the larger txid on a tie): an old transaction is then never aborted for a
    younger one, so the oldest transaction of the system always makes progress, and the one
    thrown away has done the least work. Removing the victim removes every cycle through it; the
    search goes on in what is left. A cycle through a victim chosen earlier (``breaking``: its
    rollbacks are on their way) is being broken already: it is not reported, and gets no second
    victim. A cycle with no candidate (other coordinators' transactions
    only) is reported with victim "" and one of its edges dropped, so that the rest is searched.
    """
    graph: dict[str, list[WaitEdge]] = {}
    for edge in edges:
        if edge.holder and edge.holder != edge.waiter:
            graph.setdefault(edge.waiter, []).append(edge)
    found: list[tuple[Cycle, str]] = []
    while True:
        cycle = _find_cycle(graph)
        if cycle is None:
            return found
        late = [txid for txid in cycle.txids if txid in breaking]
        if late:
            _remove(graph, late[0])
            continue
        candidates = [txid for txid in cycle.txids if txid in begun]
        if not candidates:
            found.append((cycle, ""))
            first = cycle.edges[0]
            graph[first.waiter] = [e for e in graph[first.waiter] if e != first]
            continue
        victim = max(candidates, key=lambda txid: (begun[txid], txid))
        found.append((cycle, victim))
        _remove(graph, victim)


def _remove(graph: dict[str, list[WaitEdge]], txid: str) -> None:
    graph.pop(txid, None)
    for waiter in list(graph):
        graph[waiter] = [e for e in graph[waiter] if e.holder != txid]


class DeadlockDetector:
    """Polls the agents for lock waits while some transaction of this coordinator has had a
    call in flight for ``threshold_s``, and breaks every cycle found.

    Args:
        ports: the agents.
        waiting: participants of the transactions waiting ``threshold_s`` or longer, the
            begin time of every transaction that may be a victim, and the victims being
            aborted (``TransactionManager.waiting``).
        break_deadlock: aborts a victim (txid, its cycle described, how long the cycle has
            existed in seconds, the participants where it waits), without awaiting; False when
            it could not (decided meanwhile).
        threshold_s: how long a call runs before its transaction counts as waiting.
        interval_s: the pause between two looks while nothing waits that long.
    """

    def __init__(
        self,
        ports: ParticipantPort,
        waiting: Callable[[float], tuple[set[str], dict[str, float], set[str]]],
        break_deadlock: Callable[[str, str, float, Sequence[str]], bool],
        *,
        threshold_s: float,
        rpc_timeout_s: float,
        metrics: EngineMetrics,
    ) -> None:
        self._ports = ports
        self._waiting = waiting
        self._break = break_deadlock
        self._threshold_s = threshold_s
        self._rpc_timeout_s = rpc_timeout_s
        self._metrics = metrics

    async def look(self) -> int:
        """One pass: asks the agents where transactions wait, and breaks every cycle; the
        number of victims. No RPC when no transaction has waited ``threshold_s``."""
        participants, begun, breaking = self._waiting(self._threshold_s)
        if not participants:
            return 0
        min_wait_ms = int(self._threshold_s * 1000)
        answers = await asyncio.gather(
            *(
                self._ports.waits_for(p, min_wait_ms, self._rpc_timeout_s)
                for p in sorted(participants)
            ),
            return_exceptions=True,
        )
        edges: list[WaitEdge] = []
        for participant, answer in zip(sorted(participants), answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("waits_for_failed", participant=participant, error=str(answer))
                continue
            edges.extend(answer)
        victims = 0
        for cycle, victim in find_victims(edges, begun, breaking):
            self._metrics.deadlock_found()
            if not victim:
                log.warning("deadlock_without_victim", cycle=cycle.describe())
                continue
            # The cycle exists since its most recent wait began.
            wait_s = cycle.youngest_wait_ms / 1000
            waits_on = [edge.participant for edge in cycle.edges if edge.waiter == victim]
            if self._break(victim, cycle.describe(), wait_s, waits_on):
                victims += 1
        return victims
