"""``twopc bench-group``: a coordinator group on Galera against one coordinator on its file log.

One run, the same workload, the same machine, one after the other on fresh playgrounds:

1. ``single``: one coordinator logging to a file (fsync), two regions;
2. ``group``: ``--members`` coordinators (3 by default) sharing a decision log on a 3-node
   MariaDB Galera cluster on loopback, each member writing through its own node, the clients
   spread over the members (client i uses member i mod N).

The workload is the benchmark's ``transfer2`` (a one-shot transfer between two regions, random
accounts of ``--accounts``), run closed-loop by ``--clients`` threads for ``--duration`` seconds
after ``--warmup``. Printed per configuration: committed transfers per second, p50/p99 latency,
failures, and CPU milliseconds per transfer by group of processes (coordinators, agents, the
regions' MariaDBs, the store's Galera nodes, this process), so that one sees where a 2-core
machine's time goes; then the group's throughput as a ratio of the single coordinator's. No
fault proxy sits anywhere: both configurations reach everything directly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from twopc.logs import configure_logging
from twopc.testing.bench.metrics import cpu_seconds, percentile
from twopc.testing.bench.runner import _attempt
from twopc.testing.bench.systems import Endpoints, Twopc, Worker
from twopc.testing.bench.workloads import Transfer2
from twopc.testing.playground.cluster import DATABASE, Cluster

__all__ = ["add_arguments", "main", "run"]


@dataclass
class Measured:
    config: str
    members: int
    clients: int
    seconds: float
    committed: int = 0
    failed: int = 0
    tps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms_per_tx: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    conserved: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="client threads (default 32)")
    parser.add_argument("--members", type=int, default=3, help="the group's size (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--regions", default="eu,us")
    parser.add_argument("--accounts", type=int, default=10_000, help="accounts per region")
    parser.add_argument("--dir", type=Path, default=Path(".twopc-bench-group"))
    parser.add_argument("--out", type=Path, default=None, help="a directory for the JSON report")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    configure_logging("warning", console=True)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()][:2]
    base: Path = args.dir.resolve()
    shutil.rmtree(base, ignore_errors=True)
    started = datetime.now(UTC)
    results = []
    for config, members in (("single", 1), ("group", args.members)):
        say(f"{config}: {members} coordinator(s), {'Galera' if members > 1 else 'file'} log")
        results.append(_measure(base / config, config, members, regions, args))
        say(_row(results[-1]))
    say("\n" + format_table(results))
    data = {
        "started": started.isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": [asdict(r) for r in results],
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench-group.json").write_text(json.dumps(data, indent=2) + "\n")
        (args.out / "bench-group.md").write_text(format_table(results) + "\n")
        say(f"report: {args.out / 'bench-group.json'}")
    return 0 if all(r.conserved for r in results) else 1


def _measure(
    directory: Path, config: str, members: int, regions: Sequence[str], args: argparse.Namespace
) -> Measured:
    cluster = Cluster.create(
        directory,
        regions,
        metrics=False,
        coordinators=members,
        log_store="galera" if members > 1 else "file",
        agent_settings={"pool_size": 3 * args.clients + 16, "pool_overflow": 32},
    )
    cluster.up()
    try:
        workload = Transfer2(regions, accounts=args.accounts)
        workload.setup(cluster)
        workload.reset(cluster)
        systems = [
            Twopc(
                Endpoints(
                    coordinator=address,
                    databases={},
                    database=DATABASE,
                    coordinator_tls=cluster.client_tls(),
                ),
                wait_for_phase2=False,
            )
            for address in cluster.member_addresses
        ]
        workers = [systems[i % len(systems)].worker() for i in range(args.clients)]
        measured = _drive(
            cluster,
            workload=workload,
            workers=workers,
            config=config,
            members=members,
            args=args,
        )
        for system in systems:
            system.close()
        measured.conserved = bool(workload.check(cluster)["ok"])
        return measured
    finally:
        cluster.down()
        cluster.remove_store()


def _drive(
    cluster: Cluster,
    *,
    workload: Transfer2,
    workers: Sequence[Worker],
    config: str,
    members: int,
    args: argparse.Namespace,
) -> Measured:
    stop = threading.Event()
    window: dict[str, float] = {}
    latencies: list[list[float]] = [[] for _ in workers]
    failures: list[list[str]] = [[] for _ in workers]

    def loop(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while not stop.is_set():
            began = time.monotonic()
            _, failed, _ = _attempt(workload, workers[index], rng)
            ended = time.monotonic()
            if window and window["t0"] <= began and ended <= window["t1"]:
                if failed is None:
                    latencies[index].append(ended - began)
                else:
                    failures[index].append(failed.split(":", 1)[0][:60])

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)  # a benchmark's warm-up, not synchronisation
    cpu_before = _cpu(cluster)
    window["t0"] = time.monotonic()
    window["t1"] = window["t0"] + args.duration
    time.sleep(args.duration)  # the measured window
    cpu_after = _cpu(cluster)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    done = [latency for per in latencies for latency in per]
    failed = [reason for per in failures for reason in per]
    committed = len(done)
    result = Measured(config, members, len(workers), args.duration, committed, len(failed))
    result.tps = committed / args.duration
    result.p50_ms = _ms(percentile(done, 50))
    result.p99_ms = _ms(percentile(done, 99))
    result.cpu_ms_per_tx = {
        group: round(1000 * (cpu_after[group] - cpu_before[group]) / max(committed, 1), 3)
        for group in cpu_after
    }
    result.errors = {reason: failed.count(reason) for reason in sorted(set(failed))}
    return result


def _cpu(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far by group of processes."""
    groups: dict[str, list[int | None]] = {
        "coordinators": [cluster.components[m].pid for m in cluster.members],
        "agents": [cluster.components[f"agent-{r}"].pid for r in cluster.regions],
        "mariadb": [cluster.components[f"mariadb-{r}"].pid for r in cluster.regions],
        "galera": list(cluster.store.pids.values()) if cluster.store is not None else [],
        "bench": [os.getpid()],
    }
    return {
        group: sum(cpu_seconds(pid) or 0.0 for pid in pids if pid is not None)
        for group, pids in groups.items()
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _row(r: Measured) -> str:
    return (
        f"  {r.config}: {r.tps:,.0f} tps, p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, "
        f"{r.failed} failed, conserved {r.conserved}, CPU ms/tx {r.cpu_ms_per_tx}"
    )


def format_table(results: Sequence[Measured]) -> str:
    single = next((r for r in results if r.members == 1), None)
    groups = ("coordinators", "agents", "mariadb", "galera", "bench")
    lines = [
        "| configuration | clients | tps | ratio | p50 ms | p99 ms | failed | "
        + " | ".join(f"CPU {g} ms/tx" for g in groups)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(groups),
    ]
    for r in results:
        ratio = f"{r.tps / single.tps:.2f}x" if single is not None and single.tps else "-"
        name = "1 coordinator, file log" if r.members == 1 else f"{r.members} members, Galera log"
        cpu = " | ".join(f"{r.cpu_ms_per_tx.get(g, 0.0):.2f}" for g in groups)
        lines.append(
            f"| {name} | {r.clients} | {r.tps:,.0f} | {ratio} | {r.p50_ms} | {r.p99_ms} | "
            f"{r.failed} | {cpu} |"
        )
    total = {r.config: sum(r.cpu_ms_per_tx.values()) for r in results}
    lines.append("")
    lines.append(
        "CPU per transfer, all processes: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in total.items())
        + f" (one run each, {os.cpu_count()} cores)"
    )
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twopc bench-group", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
