"""``twopc bench``: twopc against its baselines, side by side on one proxied playground.

For every workload, round trip and concurrency (a *cell*), each system runs in turn on the same
databases: the data is reset, the system's workers (threads, one context each) run for the
warm-up and then the measured window, the cluster is left to settle (nothing prepared), and the
workload's conservation check runs. The round trip is injected by the fault proxy: half of it each
way on every ``coordinator-agent-<region>`` and ``client-mariadb-<region>`` link (the benchmark
and the coordinator sit together, the regions are remote). Agents reach their databases and the
benchmark reaches the coordinator directly, with no proxy in between: those hops stay inside one
place in a real deployment, and a proxy hop would only add the proxy's CPU to twopc's bill.
With no round trip to inject (0 ms), no system goes through the proxy at all (``bench.paths``):
the baselines connect to each database directly and the coordinator is restarted with the
agents' own addresses; the proxy's byte counters of each run are in the report to show it.

Every gRPC hop runs mutual TLS, as the playground does. ``--tls on,off`` runs twopc both ways in
each cell (``twopc`` and ``twopc-plaintext``, the daemons restarted with ``insecure_plaintext``
in between), so that one run shows what TLS costs. ``--metrics off`` runs the daemons without
metrics (nothing measured, nothing served); a run with and one without show what they cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymysql

from coordinator.decision_log.file_log import LOG_NAME
from twopc.logs import configure_logging
from twopc.testing.bench.floor import Floor, measure_floor
from twopc.testing.bench.metrics import (
    STUCK_S,
    CellResult,
    LogSyncs,
    Scrape,
    Tally,
    contention_figures,
    cpu_seconds,
    format_contention,
    format_order_summary,
    format_summary,
    format_table,
    format_tls_summary,
    in_time_wait,
    peak_rss_kb,
    ratio,
    reset_peak_rss,
    scrape,
    time_wait_by_name,
    time_wait_sockets,
)
from twopc.testing.bench.paths import Paths, choose_paths
from twopc.testing.bench.systems import (
    BENCH_FORMAT_ID,
    ONE_SHOT_ORDER,
    SYSTEMS,
    VARIANTS,
    Endpoints,
    Local,
    System,
    Twopc,
    TwopcPlaintext,
    TxFailed,
    Worker,
    make_system,
)
from twopc.testing.bench.workloads import (
    HOT_ACCOUNTS,
    WORKLOADS,
    Workload,
    make_workload,
    regions_needed,
)
from twopc.testing.chaos.proxy_service import ProxyControl
from twopc.testing.playground.cluster import DATABASE, PROXY, STATE_FILE, Cluster, wait_until
from twopc.txid import Xid

__all__ = ["Bench", "Settings", "add_arguments", "apply_round_trip", "run"]

JSON_NAME, TABLE_NAME, PLOT_NAME = "bench.json", "bench.md", "bench.png"
SUMMARY_NAME = "bench-summary.md"
CONTENTION_NOTE = (
    "Not committed: share of attempts that did not commit (a deadlock or lock-wait timeout "
    "aborts the transaction; it is not retried). Waited out: transactions that failed with a "
    "lock-wait timeout or took the transaction timeout or longer. Stuck at end: "
    "transactions that had been running for 1 s or more when the measured window closed "
    "(they count nowhere else). "
    "Cycles, victims, break and "
    "lock hold: from the daemons' Prometheus metrics over the measured window (n/a: not "
    "served, or a baseline).\n\n"
)
# Bounds on every loop: transactions per worker per run, and how long the cluster may take to
# settle (twopc's phase 2 runs after its early answers) before a reset.
MAX_STEPS_PER_WORKER = 10_000_000
SETTLE_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 120.0  # for every worker to open its connections


def _names(
    text: str, known: Sequence[str], what: str, by_name_only: Sequence[str] = ()
) -> list[str]:
    """The names of a comma-separated list; "all" is every name of ``known`` (not those of
    ``by_name_only``, which must be named)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(known)
    choices = (*known, *by_name_only)
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}"
        )
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from err
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value, none negative")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads",
        default="all",
        type=lambda t: _names(t, WORKLOADS, "workload"),
        help=f"comma-separated, or all (default): {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--systems",
        default="all",
        type=lambda t: _names(t, SYSTEMS, "system", VARIANTS),
        help=f"comma-separated, or all (default): {', '.join(SYSTEMS)}; also "
        f"{', '.join(VARIANTS)} (twopc with one_shot_order = ordered, adaptive), by name only",
    )
    parser.add_argument(
        "--concurrency", default=[1, 8, 32], type=_ints, help="clients per cell (default 1,8,32)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="measured seconds per system per cell (default 10)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds before measuring (default 2)"
    )
    parser.add_argument(
        "--latency-ms",
        default=[0, 50],
        type=_ints,
        help="injected round trip per region in ms (default 0,50)",
    )
    parser.add_argument(
        "--tls",
        default=["on"],
        type=_tls_modes,
        help="twopc's gRPC hops with mutual TLS (on), in plaintext (off), or both in each cell, "
        "side by side (on,off; the daemons restart in between). Default: on",
    )
    parser.add_argument(
        "--metrics",
        choices=("on", "off"),
        default="on",
        help="the daemons measure and serve Prometheus metrics (on, as the playground does) or "
        "measure nothing (off): two runs side by side show what metrics cost. Default: on",
    )
    parser.add_argument(
        "--wait-phase2",
        action="store_true",
        help="twopc answers after phase 2 (default: early answer once the decision is durable)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report directory")
    parser.add_argument("--dir", type=Path, default=Path(".twopc-bench"), help="cluster directory")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--regions", default="eu,us,ap", help="region names, in order of use")
    parser.add_argument(
        "--accounts",
        type=int,
        default=10_000,
        help="accounts per region (fewer make transfers collide on row locks more often)",
    )
    parser.add_argument(
        "--hot-accounts",
        type=int,
        default=HOT_ACCOUNTS,
        help=f"accounts per region that transfer2-hot moves money between (default {HOT_ACCOUNTS})",
    )
    parser.add_argument(
        "--max-retries", type=int, default=20, help="flash-optimistic retries per order"
    )
    parser.add_argument(
        "--lock-wait-timeout", type=int, default=10, help="innodb_lock_wait_timeout, s"
    )
    parser.add_argument("--tx-timeout", type=float, default=30.0, help="transaction timeout, s")
    parser.add_argument("--seed", type=int, default=1)


def _tls_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"--tls {text!r}: give on, off, or on,off")
    return modes


def _with_tls_modes(systems: Sequence[str], modes: Sequence[str]) -> tuple[str, ...]:
    """``systems`` with twopc run once per TLS mode (``twopc``, ``twopc-plaintext``)."""
    variants = {"on": Twopc.name, "off": TwopcPlaintext.name}
    expanded: list[str] = []
    for system in systems:
        expanded += [variants[m] for m in modes] if system == Twopc.name else [system]
    return tuple(expanded)


@dataclass(frozen=True)
class Settings:
    workloads: tuple[str, ...]
    systems: tuple[str, ...]
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    rtt_ms: tuple[int, ...]
    wait_phase2: bool
    regions: tuple[str, ...]
    accounts: int
    max_retries: int
    lock_wait_timeout_s: int
    tx_timeout_s: float
    seed: int
    metrics: bool = True
    hot_accounts: int = HOT_ACCOUNTS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        all_regions = [r.strip() for r in args.regions.split(",") if r.strip()]
        needed = regions_needed(args.workloads)
        if len(all_regions) < needed:
            raise ValueError(f"the workloads need {needed} regions; --regions gives {all_regions}")
        if any(c < 1 for c in args.concurrency):
            raise ValueError("concurrency must be at least 1")
        hot_accounts = getattr(args, "hot_accounts", HOT_ACCOUNTS)
        if hot_accounts < 1:
            raise ValueError("--hot-accounts must be at least 1")
        return cls(
            workloads=tuple(args.workloads),
            systems=_with_tls_modes(args.systems, getattr(args, "tls", ["on"])),
            concurrency=tuple(args.concurrency),
            duration_s=args.duration,
            warmup_s=args.warmup,
            rtt_ms=tuple(args.latency_ms),
            wait_phase2=args.wait_phase2,
            regions=tuple(all_regions[:needed]),
            accounts=args.accounts,
            max_retries=args.max_retries,
            lock_wait_timeout_s=args.lock_wait_timeout,
            tx_timeout_s=args.tx_timeout,
            seed=args.seed,
            metrics=getattr(args, "metrics", "on") == "on",
            hot_accounts=hot_accounts,
        )


def create_cluster(directory: Path, settings: Settings) -> Cluster:
    """A proxied playground with a client link to each database, sized for the concurrency.

    Each agent's pool holds a connection for every branch that can be alive at once: with early
    answers a client starts its next transaction while phase 2 of the last one is still under
    way, and phase 2 is batched, so a few times the clients (twice left overflow connections
    opened and closed at 32 clients once agents got faster), plus the agent's own sessions. A
    smaller pool opens and
    closes overflow connections per branch (TIME_WAIT grows; at 32 clients that cost the agents
    40 % more CPU per transaction)."""
    return Cluster.create(
        directory,
        settings.regions,
        proxied=True,
        client_db_links=True,
        remote_links_only=True,
        metrics=settings.metrics,
        agent_settings={
            "pool_size": 3 * max(settings.concurrency) + 16,
            "pool_overflow": 32,
            "lock_wait_timeout_s": settings.lock_wait_timeout_s,
        },
    )


def apply_round_trip(proxy: ProxyControl, cluster: Cluster, rtt_ms: int) -> dict[str, int]:
    """Sets the injected latency of every link for a round trip of ``rtt_ms`` per region.

    Half the round trip each way (the proxy delays both directions); an odd round trip adds a
    uniform 0-1 ms jitter each way, so that its mean is right. Returns the per-link latency.
    """
    half, odd = divmod(rtt_ms, 2)
    applied = {}
    for link in cluster.links:
        remote = link.name.startswith(("coordinator-agent-", "client-mariadb-"))
        if remote and rtt_ms > 0:
            proxy.set_fault(link.name, latency_ms=half, jitter_ms=odd)
            applied[link.name] = half
        else:
            proxy.set_fault(link.name)
            applied[link.name] = 0
    return applied


def _cluster_ports(cluster: Cluster) -> dict[int, str]:
    """Port -> what listens on it: a component, or the proxy's end of a link."""
    named = [(c.address, name) for name, c in cluster.components.items()]
    named += [(link.listen, f"link {link.name}") for link in cluster.links]
    return {int(address.rsplit(":", 1)[1]): name for address, name in named}


@dataclass
class _RunPlan:
    """What every worker of one system's run shares. The window is set when every worker has
    connected (by the barrier's action, before any worker goes on)."""

    system: System
    workload: Workload
    stop: threading.Event
    ready: threading.Barrier
    t0: float = 0.0  # the measured window, on the bench's clock
    t1: float = 0.0


class Bench:
    """Runs every cell of ``settings`` on a running ``cluster`` (made by ``create_cluster``)."""

    def __init__(
        self,
        cluster: Cluster,
        settings: Settings,
        *,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self._say = say
        self._clock = clock
        self._sleep = sleep
        self._proxy = ProxyControl(cluster.component(PROXY).address, tls=cluster.proxy_tls())
        self._ports = _cluster_ports(cluster)
        self._log = LogSyncs(Path(cluster.component("coordinator").data_dir) / LOG_NAME)
        self._endpoints = Endpoints(
            coordinator=cluster.coordinator_address,
            databases={},  # per cell, from its Paths
            database=DATABASE,
            lock_wait_timeout_s=settings.lock_wait_timeout_s,
            tx_timeout_s=settings.tx_timeout_s,
        )
        self.cells: list[CellResult] = []
        self.injected: dict[int, dict[str, int]] = {}  # round trip -> link -> ms each way
        self.floors: dict[int, Floor] = {}  # round trip -> twopc's latency floor
        self.paths: dict[int, Paths] = {}  # round trip -> the addresses every system uses
        # One root connection per region for the checks between runs, kept open: a connection
        # per poll would fill TIME_WAIT with the harness's own sockets.
        self._admin_connections = contextlib.ExitStack()
        self._admin: dict[str, Any] = {}

    def run(self) -> list[CellResult]:
        s = self.settings
        try:
            for workload_name in s.workloads:
                workload = make_workload(
                    workload_name,
                    s.regions,
                    accounts=s.accounts,
                    max_retries=s.max_retries,
                    hot_accounts=s.hot_accounts,
                )
                workload.setup(self.cluster)
                for rtt in s.rtt_ms:
                    self.injected[rtt] = apply_round_trip(self._proxy, self.cluster, rtt)
                    paths = self.paths[rtt] = choose_paths(self.cluster, rtt)
                    if rtt not in self.floors:
                        for kind, how in paths.describe().items():
                            self._say(f"paths at {rtt} ms, {kind}: {how}")
                        # With TLS when twopc runs with it: the floor twopc's cell is held to;
                        # the agents reached the way the coordinator reaches them in the cell.
                        self.cluster.use_plaintext(Twopc.name not in s.systems)
                        self.floors[rtt] = measure_floor(self.cluster, paths.agents)
                        self._say(f"latency floor at {rtt} ms: {self.floors[rtt].as_json()}")
                    for concurrency in s.concurrency:
                        group = [
                            self.run_cell(workload, system, concurrency, rtt)
                            for system in s.systems
                        ]
                        add_ratios(group, self.floors[rtt])
                        self.cells.extend(group)
        finally:
            self._proxy.heal()
            self._admin_connections.close()
        return self.cells

    # --- one system in one cell -------------------------------------------------------------

    def run_cell(
        self, workload: Workload, system_name: str, concurrency: int, rtt: int
    ) -> CellResult:
        s = self.settings
        leftovers = self.settle()
        workload.reset(self.cluster)
        paths = self.paths[rtt]
        system = self._system(system_name, concurrency, paths)
        proxy_before = self._proxy_bytes()
        pids = self._pids(system)
        tw_start = in_time_wait(time_wait_sockets(), self._ports)
        rss_reset = all(reset_peak_rss(pid) for group in pids.values() for pid in group)
        tallies = [Tally() for _ in range(concurrency)]
        stop = threading.Event()

        def start_clock() -> None:
            plan.t0 = self._clock() + s.warmup_s
            plan.t1 = plan.t0 + s.duration_s

        ready = threading.Barrier(concurrency + 1, action=start_clock, timeout=CONNECT_TIMEOUT_S)
        plan = _RunPlan(system, workload, stop, ready)
        threads = [
            threading.Thread(
                target=self._work,
                args=(plan, tallies[i], f"{system_name}-{i}"),
                name=f"bench-{system_name}-{i}",
                daemon=True,
            )
            for i in range(concurrency)
        ]
        try:
            for thread in threads:
                thread.start()
            try:
                ready.wait()  # every worker connected: the warm-up starts
            except threading.BrokenBarrierError:
                raise RuntimeError(
                    f"{system_name}'s {concurrency} workers did not connect within "
                    f"{CONNECT_TIMEOUT_S:.0f} s"
                ) from None
            t0, t1 = plan.t0, plan.t1
            self._sleep(max(t0 - self._clock(), 0))
            cpu_before = self._cpu(pids)
            fsyncs_before = self._log.read() if system.uses_daemons else 0
            scrapes_before = self._scrape() if system.uses_daemons else None
            tw_before = in_time_wait(time_wait_sockets(), self._ports)
            self._sleep(max(t1 - self._clock(), 0))
            cpu_after = self._cpu(pids)
            fsyncs_after = self._log.read() if system.uses_daemons else 0
            scrapes_after = self._scrape() if system.uses_daemons else None
            tw_end = in_time_wait(time_wait_sockets(), self._ports)
            stop.set()
            deadline = self._clock() + s.tx_timeout_s + 15
            for thread in threads:
                thread.join(timeout=max(deadline - self._clock(), 0.1))
            stragglers = sum(t.is_alive() for t in threads)
            connections = system.connections_opened
        finally:
            stop.set()
            system.close()
        tw_after = in_time_wait(time_wait_sockets(), self._ports)
        rss = {group: self._peak_rss(p) for group, p in pids.items()}
        unsettled = self.settle()
        tally = Tally.merged(tallies)
        cpu = _cpu_used(cpu_before, cpu_after, daemons=system.uses_daemons)
        cell = CellResult(
            workload=workload.name,
            system=system_name,
            rtt_ms=rtt,
            concurrency=concurrency,
            window_s=t1 - t0,  # the workers count what ended in [t0, t1]
            tally=tally,
            cpu_s=cpu,
            peak_rss_kb={
                "coordinator": rss["coordinator"] if system.uses_daemons else None,
                "agents": rss["agents"] if system.uses_daemons else None,
                "bench": rss["bench"],
            },
            fsyncs=fsyncs_after - fsyncs_before if system.uses_daemons else None,
            time_wait={
                "after_run": len(tw_after),
                "new_in_window": len(tw_end - tw_before),
                "new_in_run": len(tw_after - tw_start),
                "new_in_window_by_port": time_wait_by_name(tw_end - tw_before, self._ports),
                "new_in_run_by_port": time_wait_by_name(tw_after - tw_start, self._ports),
            },
            connections_opened=connections,
            path=paths.describe()["twopc" if system.uses_daemons else "baselines"],
            proxy_bytes=self._proxy_bytes_since(proxy_before),
            contention=_contention(scrapes_before, scrapes_after),
            check={
                **workload.check(self.cluster),
                "prepared_left": unsettled,
                "prepared_before": leftovers,
                "stragglers": stragglers,
                "rss_reset": rss_reset,
                "load_1m": round(os.getloadavg()[0], 2),
            },
        )
        self._say(_progress(cell))
        return cell

    def _system(self, name: str, concurrency: int, paths: Paths) -> System:
        """The system ``name``, connected the way ``paths`` says; twopc's daemons first
        (re)started with TLS, or in plaintext for ``twopc-plaintext``, and the coordinator with
        the agents' addresses of ``paths`` and the one-shot order of the system
        (``ONE_SHOT_ORDER``), when they do not run so already."""
        if name in (Twopc.name, TwopcPlaintext.name, *VARIANTS):
            self.cluster.use_agent_addresses(None if paths.proxied else paths.agents)
            self.cluster.use_plaintext(name == TwopcPlaintext.name)
            self.cluster.use_one_shot_order(ONE_SHOT_ORDER.get(name, "parallel"))
        endpoints = replace(
            self._endpoints,
            databases=dict(paths.databases),
            coordinator_tls=self.cluster.client_tls(),
        )
        return make_system(
            name, endpoints, concurrency=concurrency, wait_for_phase2=self.settings.wait_phase2
        )

    def _work(self, plan: _RunPlan, tally: Tally, seed_name: str) -> None:
        """One worker thread: transactions until the window ends; those that ended inside it
        are counted in ``tally``."""
        system, workload, stop = plan.system, plan.workload, plan.stop
        rng = random.Random(f"{self.settings.seed}-{workload.name}-{seed_name}")
        worker = None
        try:
            worker = system.worker()
            worker.connect()
        except Exception as err:  # a worker that cannot start counts as failing, not as a crash
            tally.note_error(f"worker did not connect: {type(err).__name__}: {err}")
        try:
            plan.ready.wait()
        except threading.BrokenBarrierError:
            stop.set()
        if worker is None:
            return
        t0, t1 = plan.t0, plan.t1
        deadline = t1 + self.settings.tx_timeout_s
        try:
            for _ in range(MAX_STEPS_PER_WORKER):
                # The main thread stops the workers once it has sampled the window's end (so
                # that their closing connections are not counted in it); the deadline is a bound.
                if stop.is_set() or self._clock() >= deadline:
                    return
                began = self._clock()
                scratch, reason, unwrapped = _attempt(workload, worker, rng)
                if unwrapped:
                    stop.wait(0.01)  # no hot loop on a broken worker
                ended = self._clock()
                scratch.note_outcome(reason, ended - began, self.settings.tx_timeout_s)
                if reason is None:
                    scratch.committed += 1
                    scratch.latencies_ms.append((ended - began) * 1000)
                if t0 <= ended <= t1:
                    tally.merge(scratch)
                elif began <= t1 - STUCK_S and ended > t1:
                    tally.stuck += 1  # still waiting when the window closed
        finally:
            worker.close()

    # --- the cluster between runs -----------------------------------------------------------

    def settle(self) -> dict[str, int]:
        """Waits until no branch is prepared anywhere; returns what is left (per region) after
        ``SETTLE_TIMEOUT_S``, having rolled back the direct-XA baseline's leftovers."""
        try:
            wait_until(
                lambda: not any(self._prepared().values()),
                SETTLE_TIMEOUT_S,
                "every prepared branch finished",
                interval=0.05,
            )
        except TimeoutError:
            pass
        else:
            return {}
        left = self._prepared()
        for region in left:
            self._roll_back_direct_xa(region)
        named = {r: b[:3] for r, b in left.items() if b}
        self._say(
            f"  ! branches still prepared: { {r: len(b) for r, b in left.items()} } (e.g. {named})"
        )
        return {r: len(b) for r, b in left.items() if b}

    def _admin_connection(self, region: str) -> Any:
        conn = self._admin.get(region)
        if conn is None or not conn.open:
            conn = self._admin[region] = self._admin_connections.enter_context(
                self.cluster.mysql(region)
            )
        return conn

    def _prepared(self) -> dict[str, list[str]]:
        """Per region, every branch XA RECOVER lists: twopc's by txid, any other system's by
        its format id."""
        found: dict[str, list[str]] = {}
        for region in self.cluster.regions:
            try:
                with self._admin_connection(region).cursor() as cursor:
                    cursor.execute("XA RECOVER")
                    rows = cursor.fetchall()
            except pymysql.err.OperationalError:
                self._admin.pop(region, None)  # a broken connection: a new one next time
                raise
            found[region] = []
            for fmt, glen, _blen, data in rows:
                xid = Xid.from_recover_row(int(fmt), int(glen), bytes(data))
                found[region].append(xid.txid if xid is not None else f"format {int(fmt)}")
        return found

    def _roll_back_direct_xa(self, region: str) -> None:
        """Rolls back what the direct-XA baseline left prepared in ``region``. Its branches are
        not twopc's (``Xid`` does not describe them): the server writes out each XID, as XA
        ROLLBACK takes it (``XA RECOVER FORMAT='SQL'``), so no second parser of rows is needed."""
        with self._admin_connection(region).cursor() as cursor:
            cursor.execute("XA RECOVER FORMAT='SQL'")
            for fmt, _glen, _blen, xid_literal in cursor.fetchall():
                if int(fmt) == BENCH_FORMAT_ID:
                    cursor.execute(f"XA ROLLBACK {xid_literal}")

    def _pids(self, system: System) -> dict[str, list[int]]:
        def pid(name: str) -> list[int]:
            value = self.cluster.component(name).pid
            return [value] if value else []

        regions = self.cluster.regions
        daemons = system.uses_daemons
        return {
            "coordinator": pid("coordinator") if daemons else [],
            "agents": [p for r in regions for p in pid(f"agent-{r}")] if daemons else [],
            "mariadb": [p for r in regions for p in pid(f"mariadb-{r}")],
            "proxy": pid(PROXY),
            "bench": [os.getpid()],
        }

    def _proxy_bytes_since(self, before: dict[str, int]) -> dict[str, int]:
        after = self._proxy_bytes()
        return {name: after.get(name, 0) - value for name, value in before.items()}

    def _proxy_bytes(self) -> dict[str, int]:
        """Bytes each proxy link carried so far, both ways."""
        return {
            name: int(link.bytes_up + link.bytes_down) for name, link in self._proxy.links().items()
        }

    def _scrape(self) -> tuple[Scrape, Scrape]:
        """The coordinator's metrics, and the agents' summed."""
        coordinator = scrape(self.cluster.component("coordinator").metrics_url)
        agents = Scrape({}, {})
        for region in self.cluster.regions:
            agents = agents.plus(scrape(self.cluster.component(f"agent-{region}").metrics_url))
        return coordinator, agents

    @staticmethod
    def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
        return {group: sum(cpu_seconds(p) or 0.0 for p in plist) for group, plist in pids.items()}

    @staticmethod
    def _peak_rss(pids: list[int]) -> int | None:
        values = [v for v in (peak_rss_kb(p) for p in pids) if v is not None]
        return sum(values) if values else None


def _attempt(
    workload: Workload, worker: Worker, rng: random.Random
) -> tuple[Tally, str | None, bool]:
    """One logical transaction of ``workload``: its tally, why it failed (None: it committed),
    and whether the failure was a driver error the system did not wrap."""
    scratch = Tally()
    try:
        workload.step(worker, rng, scratch)
    except TxFailed as err:
        if err.kind == "unknown":
            scratch.unknown += 1
        elif err.kind == "gave_up":
            scratch.gave_up += 1
        else:
            scratch.aborted += 1
        scratch.note_error(err.reason)
        return scratch, err.reason, False
    except Exception as err:  # a driver error the system did not wrap: count it
        scratch.aborted += 1
        reason = f"{type(err).__name__}: {err}"
        scratch.note_error(reason)
        return scratch, reason, True
    return scratch, None, False


def _cpu_used(
    before: dict[str, float], after: dict[str, float], *, daemons: bool
) -> dict[str, float | None]:
    """CPU seconds per group of processes over the window; the daemons' count only when the
    system uses them."""
    used: dict[str, float | None] = {
        group: after[group] - before[group]
        for group in ("coordinator", "agents", "mariadb", "proxy", "bench")
    }
    if not daemons:
        used["coordinator"] = used["agents"] = 0.0
    return used


def _contention(
    before: tuple[Scrape, Scrape] | None, after: tuple[Scrape, Scrape] | None
) -> dict[str, Any]:
    if before is None or after is None:
        return {}
    return contention_figures((before[0], after[0]), (before[1], after[1]))


def add_ratios(group: Sequence[CellResult], floor: Floor | None = None) -> None:
    """On each baseline's cell of one (workload, round trip, concurrency): twopc ÷ it, for
    throughput and p50 latency; on twopc's cell, its p50 and p99 ÷ the latency floor. twopc is
    the run with TLS (the plaintext run is then one of the baselines: twopc ÷ it is what TLS
    costs), or the plaintext run when it ran alone."""
    twopc = next((c for c in group if c.system == Twopc.name), None)
    if twopc is None:
        twopc = next((c for c in group if c.system == TwopcPlaintext.name), None)
    if twopc is None:
        return
    if floor is not None:
        twopc.floor_ms = floor.total_ms
        twopc.floor_ratio = {
            "p50": ratio(twopc.latency(50), floor.total_ms),
            "p99": ratio(twopc.latency(99), floor.total_ms),
        }
    for cell in group:
        if cell is not twopc:
            cell.twopc_ratio = {
                "tps": ratio(twopc.tps, cell.tps),
                "p50": ratio(twopc.latency(50), cell.latency(50)),
            }


def _progress(cell: CellResult) -> str:
    def ms(value: float | None) -> str:
        return f"{value:8.2f}" if value is not None else "       -"

    check = "ok" if cell.check.get("ok") else f"CHECK FAILED {cell.check}"
    return (
        f"{cell.workload:<17} rtt {cell.rtt_ms:>3} ms  c {cell.concurrency:>4}  "
        f"{cell.system:<13} {cell.tps:>8.0f} tps  p50 {ms(cell.latency(50))}  "
        f"p99 {ms(cell.latency(99))} ms  not committed {cell.tally.abort_rate:6.1%}  "
        f"waited out {cell.tally.waited_out}  stuck {cell.tally.stuck}  {check}"
    )


# --- the command ---------------------------------------------------------------------------------


def report(
    bench: Bench, started: datetime, versions: dict[str, str], *, complete: bool = True
) -> dict[str, Any]:
    cells = [cell.as_json() for cell in bench.cells]
    return {
        "version": 1,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            **versions,
        },
        "settings": asdict(bench.settings),
        "injected_latency_ms_each_way": {str(k): v for k, v in bench.injected.items()},
        "latency_floor_ms": {str(k): v.as_json() for k, v in bench.floors.items()},
        "paths": {str(k): v.describe() for k, v in bench.paths.items()},
        "complete": complete,
        "cells": cells,
    }


def write_report(data: dict[str, Any], out: Path) -> tuple[Path, Path, Path | None]:
    """Writes ``bench.json``, ``bench.md`` and ``bench.png`` into ``out``; the plot's path is None
    when matplotlib is not installed (the figures and the checks do not need it)."""
    from twopc.testing.bench.plot import plot_cells  # noqa: PLC0415 (matplotlib: only here)

    out.mkdir(parents=True, exist_ok=True)
    paths = out / JSON_NAME, out / TABLE_NAME, out / PLOT_NAME
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    settings = data["settings"]
    header = (
        f"# twopc bench, {data['started_at']}\n\n"
        f"{settings['duration_s']} s measured after {settings['warmup_s']} s warm-up per system; "
        f"twopc {'waits for' if settings['wait_phase2'] else 'answers before'} phase 2. "
        "CPU in seconds per 1,000 committed transactions; RSS peak in MB; TIME_WAIT: sockets "
        "on the cluster's ports, growth during the measured window / over the whole run "
        "(connections the run's workers opened and closed); twopc÷: twopc's figure divided "
        "by this system's.\n\n"
    )
    for rtt, described in (data.get("paths") or {}).items():
        header += f"Paths at {rtt} ms: " + "; ".join(f"{k}: {v}" for k, v in described.items())
        header += ".\n\n"
    if not data["complete"]:
        header += "**Interrupted: these are the cells measured before the interruption.**\n\n"
    paths[1].write_text(header + format_table(data["cells"]) + "\n")
    tls_summary = format_tls_summary(data["cells"])
    if tls_summary:
        tls_summary = "\n\n## twopc with and without mutual TLS\n\n" + tls_summary
    order_summary = format_order_summary(data["cells"])
    if order_summary:
        order_summary = (
            "\n\n## twopc's one-shot branches prepared in parallel and in order\n\n" + order_summary
        )
    contention = "\n\n## Contention\n\n" + CONTENTION_NOTE + format_contention(data["cells"])
    (out / SUMMARY_NAME).write_text(
        header + format_summary(data["cells"]) + tls_summary + order_summary + contention + "\n"
    )
    title = f"twopc bench ({'wait for phase 2' if settings['wait_phase2'] else 'early answer'})"
    drawn = plot_cells(data["cells"], paths[2], title=title)
    return paths[0], paths[1], paths[2] if drawn else None


def _mariadb_version(cluster: Cluster) -> str:
    with cluster.mysql(cluster.regions[0]) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT VERSION()")
        row = cursor.fetchone()
    return str(row[0]) if row else ""


def run(args: argparse.Namespace) -> int:
    """Runs ``twopc bench`` as ``add_arguments`` parsed it; returns the exit status: 1 when an
    atomic system did not conserve the money or the stock, or a branch was left prepared."""
    configure_logging("warning", console=True)
    try:
        settings = Settings.from_args(args)
    except ValueError as err:
        print(f"twopc bench: {err}", file=sys.stderr)
        return 2
    directory: Path = args.dir.resolve()
    if (directory / STATE_FILE).exists():
        Cluster.load(directory).down()
        shutil.rmtree(directory)
    started = datetime.now(UTC)
    cluster = create_cluster(directory, settings)
    say(f"starting a proxied playground in {directory} ({', '.join(settings.regions)})")
    cluster.up()
    complete = False
    try:
        bench = Bench(cluster, settings, say=say)
        versions = {"mariadb": _mariadb_version(cluster)}
        cells = len(settings.workloads) * len(settings.rtt_ms) * len(settings.concurrency)
        say(
            f"{cells} cells x {len(settings.systems)} systems, "
            f"{settings.warmup_s + settings.duration_s:.0f} s each"
        )
        try:
            bench.run()
            complete = True
        except KeyboardInterrupt:
            say("interrupted: reporting what was measured")
    finally:
        if args.keep:
            say(f"cluster left running: twopc playground --dir {directory} --down")
        else:
            cluster.down()
    data = report(bench, started, versions, complete=complete)
    json_path, table_path, plot_path = write_report(data, args.out)
    say("\n" + format_table(data["cells"]))
    say("\n" + format_summary(data["cells"]))
    say("\n" + format_contention(data["cells"]))
    if tls_summary := format_tls_summary(data["cells"]):
        say("\ntwopc with and without mutual TLS:\n" + tls_summary)
    if order_summary := format_order_summary(data["cells"]):
        say("\ntwopc's one-shot branches in parallel and in order:\n" + order_summary)
    say(f"\nreport: {json_path}\ntable: {table_path}")
    if plot_path is None:
        say("warning: no plot drawn: matplotlib is not installed (pip install 'twopc[bench]')")
    else:
        say(f"plot: {plot_path}")
    # Plain local commits promise no atomicity: their check is for information only.
    broken = [
        c
        for c in data["cells"]
        if (not c["check"].get("ok") and c["system"] != Local.name) or c["check"]["prepared_left"]
    ]
    for cell in broken:
        say(f"check failed: {cell['workload']} {cell['system']} c={cell['concurrency']}")
    if not complete:
        return 130
    return 1 if broken else 0


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twopc.testing.bench.runner", description=__doc__
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
