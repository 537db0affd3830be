"""Applies a fault schedule to a live playground cluster, and heals everything at the end.

Process faults are real signals (SIGKILL, SIGSTOP/SIGCONT, SIGTERM) and restarts from the
command lines in the state file; link faults go to the fault proxy's control API; failpoints to
the daemons' admin API. The control plane talks to each part directly, never through a faulty
link. Every fault is recorded with the times it really started and ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.testing.chaos.schedule import PROCESS_FAULTS, FaultEvent, FaultKind
from twopc.testing.playground.cluster import PROXY, RABBITMQ, RELAY, STORE_NODE, Cluster
from twopc.testing.playground.galera import GaleraCluster
from twopc.testing.playground.mariadb import PlaygroundError
from twopc.testing.playground.tls import ADMIN

log = structlog.get_logger("twopc.chaos")
_CONTROL_TIMEOUT_S = 5.0


@dataclass
class AppliedFault:
    event: FaultEvent
    started: float = 0.0  # seconds from the start of the run
    ended: float = 0.0
    note: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            **self.event.as_json(),
            "started": round(self.started, 3),
            "ended": round(self.ended, 3),
            "note": self.note,
        }


@dataclass
class Injector:
    cluster: Cluster
    began: float = field(default_factory=time.monotonic)
    applied: list[AppliedFault] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)  # the schedule has run out
    _stopped: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Process faults under way (their target is down or frozen on purpose), and the lock that
    # keeps the injector and the supervisor from starting one process twice.
    _faulted: set[str] = field(default_factory=set)
    _starting: threading.Lock = field(default_factory=threading.Lock)
    supervised: list[tuple[float, str]] = field(default_factory=list)  # (when, what) restarts

    def now(self) -> float:
        return time.monotonic() - self.began

    def run(self, schedule: Sequence[FaultEvent], stop: threading.Event) -> None:
        """Applies and heals the schedule's faults at their times, until done or ``stop``."""
        actions: list[tuple[float, int, Callable[[AppliedFault], None], AppliedFault]] = []
        for index, event in enumerate(schedule):
            record = AppliedFault(event)
            actions.append((event.at, index, self._start, record))
            actions.append((event.ends, index, self._end, record))
        actions.sort(key=lambda item: (item[0], item[1]))
        try:
            for at, _, action, record in actions:
                if stop.wait(max(at - self.now(), 0.0)):
                    return
                try:
                    action(record)
                except Exception as err:  # a fault that cannot be applied is reported, not fatal
                    log.warning("fault_action_failed", error=f"{type(err).__name__}: {err}")
        finally:
            self.done.set()

    def supervise(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Starts again, as systemd's Restart=always or Kubernetes would, every daemon that
        exited by itself (no fault of the schedule on it): a member that stepped down after
        losing its lease, a daemon that stopped on an error. Until ``stop``."""
        while not stop.wait(interval):
            for name in [*self.cluster.members, *(f"agent-{r}" for r in self.cluster.regions)]:
                with self._starting:
                    if name in self._faulted or self.cluster.component(name).alive():
                        continue
                    self.cluster.restart(name, wait=False)
                self.supervised.append((self.now(), name))
                log.info("supervisor_restarted", component=name, at=round(self.now(), 2))

    def heal_all(self, attempts: int = 5) -> None:
        """Every link healed, every process running and answering, every failpoint disarmed.

        Failpoints go first: one still armed with ``crash`` could kill a daemon that was just
        checked alive. A daemon that is down then is restarted and checked again, a bounded
        number of rounds."""
        if self.cluster.proxied:
            with self._channel(PROXY) as channel:
                cpb_grpc.FaultProxyStub(channel).Heal(cpb.HealRequest(), timeout=_CONTROL_TIMEOUT_S)
        for name in list(self._stopped):
            self._signal(name, signal.SIGCONT)
            self._stopped.discard(name)
        for name in self.cluster.members:
            if FAKETIME in self.cluster.component(name).env:
                self._slow_clock(name, slow=False)
        self._heal_store()
        members = self.cluster.members
        daemons = members + [f"agent-{r}" for r in self.cluster.regions]
        order = [f"mariadb-{r}" for r in self.cluster.regions] + daemons[len(members) :]
        order += members
        order += [name for name in (RABBITMQ, RELAY) if name in self.cluster.components]
        for _ in range(attempts):
            armed = False
            for name in daemons:
                if self.cluster.component(name).alive():
                    with contextlib.suppress(grpc.RpcError):
                        armed |= self._disarm_all(name)
            restarted = False
            for name in order:
                if not self.cluster.component(name).alive():
                    self.cluster.restart(name)
                    restarted = True
                elif not self._ensure_serving(name):
                    restarted = True
            if not restarted and not armed:
                return
        raise RuntimeError(f"the cluster did not settle after {attempts} healing rounds")

    # --- one fault ----------------------------------------------------------------------------

    def _start(self, record: AppliedFault) -> None:
        event = record.event
        record.started = self.now()
        with self._lock:
            self.applied.append(record)
        log.info("fault_start", fault=event.describe(), at=round(record.started, 2))
        kind, target = event.kind, event.target
        if kind in PROCESS_FAULTS or kind in (FaultKind.FAILPOINT, FaultKind.SLOW_CLOCK):
            self._faulted.add(target)
        if store_node(target) and kind in PROCESS_FAULTS:
            self._start_on_store(kind, target)
        elif kind is FaultKind.SLOW_CLOCK:
            self._slow_clock(target, slow=True)
        elif kind is FaultKind.KILL:
            self.cluster.kill(target, signal.SIGKILL)
        elif kind is FaultKind.RESTART:
            # Not waiting for it to exit: a graceful stop can take a while, and later faults
            # are due meanwhile; the fault's end SIGKILLs it if it still runs.
            self.cluster.kill(target, signal.SIGTERM, wait=False)
        elif kind is FaultKind.STOP:
            self.cluster.component(target).send(signal.SIGSTOP)
            self._stopped.add(target)
        elif kind is FaultKind.FAILPOINT:
            self._arm(target, str(event.detail["name"]), str(event.detail["spec"]))
        else:
            self._set_link(target, _link_fault(event))
        if kind is FaultKind.RESET:  # instant: reset what is open, then accept again
            self._set_link(target, cpb.Fault())
            record.ended = self.now()

    def _end(self, record: AppliedFault) -> None:
        event = record.event
        kind, target = event.kind, event.target
        if kind is FaultKind.RESET:
            return
        if store_node(target) and kind in PROCESS_FAULTS:
            self._end_on_store(kind, target, record)
        elif kind is FaultKind.SLOW_CLOCK:
            self._slow_clock(target, slow=False)
        elif kind in (FaultKind.KILL, FaultKind.RESTART):
            self._restart_if_down(target, record)
        elif kind is FaultKind.STOP:
            self.cluster.component(target).send(signal.SIGCONT)
            self._stopped.discard(target)
        elif kind is FaultKind.FAILPOINT:
            self._restart_if_down(target, record)
            self._arm(target, str(event.detail["name"]), "")
        else:
            self._set_link(target, cpb.Fault())
        self._faulted.discard(target)
        record.ended = self.now()
        log.info("fault_end", fault=event.describe(), at=round(record.ended, 2))

    # --- a member's clock --------------------------------------------------------------------

    def _slow_clock(self, name: str, *, slow: bool) -> None:
        """Restarts member ``name`` with every clock it reads (monotonic ones too, and its
        sleeps and timers) at ``SLOW_CLOCK_RATE`` of real time (libfaketime), or again without:
        it renews its lease too late and believes in it too long; the store's clock decides,
        a peer takes the id over, and the fences refuse what the slow member still tries."""
        component = self.cluster.component(name)
        if slow:
            component.env.update(slow_clock_env())
        else:
            for variable in slow_clock_env():
                component.env.pop(variable, None)
        with self._starting:
            self.cluster.restart(name, wait=False)

    # --- the group's store: nodes store-1 .. store-N of its Galera cluster ---------------------

    def _start_on_store(self, kind: FaultKind, target: str) -> None:
        store, node = self._store(), store_node(target)
        if kind is FaultKind.STOP:
            store.pause(node)
            self._stopped.add(target)
        else:  # KILL, and RESTART too: a Galera node is restarted from its recovered position
            store.kill(node)

    def _end_on_store(self, kind: FaultKind, target: str, record: AppliedFault) -> None:
        store, node = self._store(), store_node(target)
        if kind is FaultKind.STOP:
            store.resume(node)
            self._stopped.discard(target)
        else:
            store.restart(node)
            record.note = (record.note + " restarted").strip()

    def _heal_store(self) -> None:
        store = self.cluster.store
        if store is None:
            return
        for node, pid in store.pids.items():
            if pid is None:
                store.restart(node)
        store.wait_synced()

    def _store(self) -> GaleraCluster:
        if self.cluster.store is None:
            raise PlaygroundError("this cluster has no Galera store to fault")
        return self.cluster.store

    def _signal(self, name: str, sig: int) -> None:
        node = store_node(name)
        if node:
            pid = self._store().pids.get(node)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            self.cluster.component(name).send(sig)

    def _restart_if_down(self, name: str, record: AppliedFault) -> None:
        component = self.cluster.component(name)
        if component.alive() and record.event.kind is FaultKind.RESTART:
            # SIGTERM not obeyed by now: a supervisor would stop waiting too.
            self.cluster.kill(name, signal.SIGKILL)
            record.note = (record.note + " SIGTERM ignored, SIGKILLed").strip()
        with self._starting:
            if not component.alive():
                # Not waiting for it to answer: an agent waits for its database, whose own
                # restart may be the next action of this thread. heal_all() checks every part
                # at the end.
                self.cluster.restart(name, wait=False)
                record.note = (record.note + " restarted").strip()

    def _ensure_serving(self, name: str, patience: float = 15.0) -> bool:
        """True if ``name`` answers; a process that lives but does not answer within
        ``patience`` is SIGKILLed and started again (False then)."""
        try:
            self.cluster.wait_ready(name, patience)
        except (TimeoutError, PlaygroundError):
            log.warning("not_serving_restarting", component=name)
            if self.cluster.component(name).alive():
                self.cluster.kill(name, signal.SIGKILL)
            self.cluster.restart(name)
            return False
        return True

    # --- control plane ------------------------------------------------------------------------

    def _set_link(self, link: str, fault: cpb.Fault) -> None:
        """The fault on ``link``; on a member's store link, on its links to every store node
        (``<member>-store-<node>`` too): a member cut off from the store, not from one node."""
        names = [link]
        if link.endswith("-store"):
            names += [k.name for k in self.cluster.links if k.name.startswith(f"{link}-")]
        with self._channel(PROXY) as channel:
            stub = cpb_grpc.FaultProxyStub(channel)
            for name in names:
                stub.SetFault(
                    cpb.SetFaultRequest(name=name, fault=fault), timeout=_CONTROL_TIMEOUT_S
                )

    def _arm(self, daemon: str, name: str, spec: str) -> None:
        with self._channel(daemon) as channel:
            cpb_grpc.FailpointsStub(channel).Set(
                cpb.SetFailpointRequest(name=name, spec=spec), timeout=_CONTROL_TIMEOUT_S
            )

    def _disarm_all(self, daemon: str) -> bool:
        """Disarms every armed failpoint of ``daemon``; True if there was any."""
        with self._channel(daemon) as channel:
            stub = cpb_grpc.FailpointsStub(channel)
            listed = stub.List(cpb.ListFailpointsRequest(), timeout=_CONTROL_TIMEOUT_S)
            armed = [point.name for point in listed.failpoints if point.spec]
            for name in armed:
                stub.Set(cpb.SetFailpointRequest(name=name, spec=""), timeout=_CONTROL_TIMEOUT_S)
        return bool(armed)

    @contextlib.contextmanager
    def _channel(self, component: str) -> Iterator[grpc.Channel]:
        """A channel to ``component``'s admin API (Failpoints, the proxy's control), as the
        operator (the ``admin`` identity)."""
        with self.cluster.channel(component, identity=ADMIN) as channel:
            yield channel


def _link_fault(event: FaultEvent) -> cpb.Fault:
    kind = event.kind
    if kind is FaultKind.LATENCY:
        return cpb.Fault(
            latency_ms=int(str(event.detail.get("latency_ms", 50))),
            jitter_ms=int(str(event.detail.get("jitter_ms", 0))),
        )
    return cpb.Fault(
        cut=kind is FaultKind.CUT,
        half_open=kind is FaultKind.HALF_OPEN,
        blackhole=kind is FaultKind.BLACKHOLE,
        reset=kind is FaultKind.RESET,
    )


def store_node(name: str) -> int:
    """The node number of a store target (``store-2`` -> 2); 0 for any other target."""
    number = name.removeprefix(STORE_NODE)
    return int(number) if name.startswith(STORE_NODE) and number.isdigit() else 0


FAKETIME = "FAKETIME"
SLOW_CLOCK_RATE = 0.3


def faketime_library() -> str | None:
    """libfaketime's multi-threaded library, if installed (``deploy/setup.sh`` installs it)."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    return str(found[0]) if found else None


def slow_clock_env() -> dict[str, str]:
    """The environment of a process whose clocks run at ``SLOW_CLOCK_RATE`` of real time."""
    library = faketime_library()
    if library is None:
        raise PlaygroundError("libfaketime is not installed: run deploy/setup.sh")
    return {"LD_PRELOAD": library, FAKETIME: f"+0 x{SLOW_CLOCK_RATE}"}
