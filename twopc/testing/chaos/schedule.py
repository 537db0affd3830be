"""Fault schedules: which fault hits which part of the cluster when, planned from a seed.

Pure: the same seed, duration and targets always give the same schedule. Faults overlap at most
``max_concurrent`` at a time, never two on the same target nor on two nodes of a group's store
(that would be the store's quorum lost, a fault for the operator: README), and every fault ends
(is healed) before the run does. Whatever the seed, a schedule long enough for them holds the
faults that a run must not miss: a SIGKILL of the coordinator, of an agent and of a database
(and with a group, of a store node, and a member's slowed clock), a link cut and 50 ms of
latency on a link (as far as the kinds and targets asked for allow); random faults fill the
time around them.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


class FaultKind(enum.Enum):
    KILL = "kill"  # SIGKILL a process; started again from its command line after a while
    STOP = "stop"  # SIGSTOP, then SIGCONT: a frozen process, connections left open
    RESTART = "restart"  # SIGTERM (graceful stop), then start again
    LATENCY = "latency"  # added latency (with jitter) on a link
    CUT = "cut"  # a link refuses and drops connections, then heals
    HALF_OPEN = "half_open"  # a link stops forwarding but keeps connections open, then heals
    BLACKHOLE = "blackhole"  # a link swallows bytes, then heals
    RESET = "reset"  # a link resets its connections (instant)
    FAILPOINT = "failpoint"  # a failpoint armed on a daemon, then disarmed
    SLOW_CLOCK = "slow_clock"  # a group member restarted with its clocks at 0.3x, then healed


PROCESS_FAULTS = (FaultKind.KILL, FaultKind.STOP, FaultKind.RESTART)
LINK_FAULTS = (
    FaultKind.LATENCY,
    FaultKind.CUT,
    FaultKind.HALF_OPEN,
    FaultKind.BLACKHOLE,
    FaultKind.RESET,
)

# Failpoints worth arming at random, with the specs that make them bite but not every time.
COORDINATOR_FAILPOINTS = (
    "coordinator.mid_prepare",
    "coordinator.before_commit_record",
    "coordinator.after_commit_record",
    "coordinator.mid_commit",
    "coordinator.before_end_record",
)
AGENT_FAILPOINTS = ("agent.after_end", "agent.after_prepare", "agent.after_commit")
FAILPOINT_SPECS = ("1*crash", "20%3*return(unavailable)", "30%5*sleep(300)")


@dataclass(frozen=True)
class Targets:
    """What a schedule may hit: process names (``coordinator``, ``coordinator-2``, ...,
    ``agent-eu``, ``mariadb-eu``, a group's store nodes ``store-1``, ...) and proxy link names
    (``client-coordinator``, ``coordinator-agent-eu``, ``coordinator-2-store``, ...)."""

    processes: tuple[str, ...]
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class FaultEvent:
    at: float  # seconds from the start of the run
    duration: float  # how long until it is healed (0 for instant faults)
    kind: FaultKind
    target: str
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def ends(self) -> float:
        return self.at + self.duration

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"{self.kind.value} {self.target} for {self.duration:.1f}s {extra}".rstrip()

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


def plan(
    seed: int,
    duration: float,
    targets: Targets,
    *,
    kinds: Sequence[FaultKind] = tuple(FaultKind),
    mean_gap: float = 4.0,
    max_concurrent: int = 2,
    settle: float = 5.0,
) -> list[FaultEvent]:
    """A schedule for a run of ``duration`` seconds; nothing is injected in the last ``settle``
    seconds, so that the workload ends on a healthy cluster before it is checked."""
    rng = random.Random(seed)
    usable = [k for k in kinds if _has_targets(k, targets)]
    if not usable:
        return []
    horizon = duration - settle
    events = _required(rng, horizon, targets, usable)
    now = rng.uniform(0.5, mean_gap)
    while now < horizon:
        kind = rng.choice(usable)
        target = rng.choice(_targets_for(kind, targets))
        length = min(_duration(kind, rng), max(horizon - now, 0.0))
        if _fits(events, now, now + length, target, max_concurrent):
            events.append(FaultEvent(now, length, kind, target, _detail(kind, target, rng)))
        now += rng.expovariate(1.0 / mean_gap)
    return sorted(events, key=lambda e: e.at)


def _required(
    rng: random.Random, horizon: float, targets: Targets, usable: Sequence[FaultKind]
) -> list[FaultEvent]:
    """The faults no run may miss, spread evenly over the run (one at a time)."""
    wanted: list[tuple[FaultKind, tuple[str, ...], dict[str, object]]] = []
    if FaultKind.KILL in usable:
        for prefix in ("coordinator", "agent-", "mariadb-", "store-", "relay", "rabbitmq"):
            choices = tuple(t for t in targets.processes if t.startswith(prefix))
            if choices:
                wanted.append((FaultKind.KILL, choices, {}))
    members = tuple(t for t in targets.processes if t.startswith("coordinator"))
    if FaultKind.SLOW_CLOCK in usable and len(members) > 1:
        wanted.append((FaultKind.SLOW_CLOCK, members, {}))
    if targets.links and FaultKind.CUT in usable:
        wanted.append((FaultKind.CUT, targets.links, {}))
    if targets.links and FaultKind.LATENCY in usable:
        wanted.append((FaultKind.LATENCY, targets.links, {"latency_ms": 50, "jitter_ms": 10}))
    slot = horizon / (len(wanted) + 1) if wanted else 0.0
    events = []
    for index, (kind, choices, detail) in enumerate(wanted):
        target = rng.choice(choices)
        length = min(_duration(kind, rng), slot * 0.8)
        events.append(FaultEvent(slot * (index + 0.5), length, kind, target, detail))
    return [e for e in events if e.duration > 0 or e.kind is FaultKind.RESET]


def _fits(
    events: Sequence[FaultEvent], start: float, end: float, target: str, max_concurrent: int
) -> bool:
    """A fault over [start, end) on ``target`` keeps every instant within the limits."""
    overlapping = [e for e in events if e.at < end + 0.5 and start < e.ends + 0.5]
    if any(e.target == target for e in overlapping):
        return False
    if target.startswith("store-") and any(e.target.startswith("store-") for e in overlapping):
        return False  # one store node at a time: two of three would take the store's quorum
    points = [start] + [e.at for e in overlapping if start <= e.at < end]
    return all(
        sum(1 for e in overlapping if e.at <= p < max(e.ends, e.at + 1e-9)) < max_concurrent
        for p in points
    )


def _has_targets(kind: FaultKind, targets: Targets) -> bool:
    return bool(_targets_for(kind, targets))


def _targets_for(kind: FaultKind, targets: Targets) -> tuple[str, ...]:
    if kind in LINK_FAULTS:
        return targets.links
    if kind is FaultKind.FAILPOINT:  # the daemons with failpoints: not the databases, the relay
        return tuple(
            t
            for t in targets.processes
            if not t.startswith(("mariadb", "store-", "relay", "rabbitmq"))
        )
    if kind is FaultKind.SLOW_CLOCK:  # a group's members: a lease must not trust one clock
        members = tuple(t for t in targets.processes if t.startswith("coordinator"))
        return members if len(members) > 1 else ()
    return targets.processes


def _duration(kind: FaultKind, rng: random.Random) -> float:
    if kind is FaultKind.RESET:
        return 0.0
    if kind in (FaultKind.KILL, FaultKind.RESTART):
        return rng.uniform(0.2, 3.0)  # down time before the restart
    if kind is FaultKind.STOP:
        return rng.uniform(0.5, 4.0)
    if kind is FaultKind.SLOW_CLOCK:
        return rng.uniform(4.0, 10.0)  # long enough for its lease to lapse a few times
    return rng.uniform(1.0, 6.0)


def _detail(kind: FaultKind, target: str, rng: random.Random) -> dict[str, object]:
    if kind is FaultKind.LATENCY:
        latency = rng.choice((5, 20, 50, 50, 100))
        return {"latency_ms": latency, "jitter_ms": latency // 5}
    if kind is FaultKind.FAILPOINT:
        names = COORDINATOR_FAILPOINTS if target.startswith("coordinator") else AGENT_FAILPOINTS
        return {"name": rng.choice(names), "spec": rng.choice(FAILPOINT_SPECS)}
    return {}
