"""``twopc bench-overload``: committed throughput and latency at several times the sustainable
load, with the coordinator shedding new transactions and without, in one run.

On one fresh playground (two regions, mutual TLS, one client identity whose own quotas are
raised out of the way, so that only the overload guard refuses anything):

1. ``max``: the sustainable maximum, closed loop, no cap: for each of ``--clients`` (e.g.
   16,48) that many asyncio workers run one-shot transfers (``transfer2``) back to back for
   ``--seconds``; the best committed transactions per second is the maximum.
2. ``shedding``: the coordinator restarted with ``admission_max_in_flight = --max-in-flight``
   (``admission_queue_ms = --queue-ms``); an open loop, arrivals at ``--load`` times the
   maximum, evenly spaced, for ``--seconds``, whatever the answers (each arrival is a task of
   its own). The SDK honours the retry-after of a refusal (its default): new transactions
   within the hint are refused by the client, unsent.
3. ``shedding, every request sent``: the same with ``honor_retry_after=False``: every refusal
   costs the coordinator a request.
4. ``no shedding``: the coordinator restarted without a cap, the same arrivals (last: it
   leaves a backlog behind on the agents and databases).

Per phase: the arrival rate reached, committed transactions per second over the phase (those
answered within it), their ratio to the maximum, p50/p99 of the admitted transactions (every
arrival not refused with a retry-after, until its answer, committed or not), refusals, and
failures by kind. Transactions carry a ``--timeout`` deadline; an arrival unanswered
``--timeout`` + 5 s after the phase ended is counted unanswered. The SDK retries nothing (one
attempt per arrival: a retry in an open loop only adds load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from twopc import AsyncClient, ResourceExhausted, RetryPolicy, TwopcError
from twopc.logs import configure_logging
from twopc.testing.bench.metrics import cpu_seconds, percentile
from twopc.testing.bench.workloads import Transfer2
from twopc.testing.playground.cluster import Cluster

__all__ = ["add_arguments", "main", "run"]

MAX_IN_FLIGHT_ENV = "TWOPC_COORDINATOR_ADMISSION_MAX_IN_FLIGHT"


@dataclass
class Phase:
    name: str
    seconds: float
    offered_per_s: float = 0.0  # arrivals per second reached (open loop), or 0 (closed loop)
    clients: int = 0  # closed loop
    arrivals: int = 0
    committed: int = 0
    tps: float = 0.0
    ratio: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    refused: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    coordinator_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0  # this process: the clients


@dataclass
class _Attempt:
    began: float
    ended: float = 0.0
    outcome: str = ""  # committed, refused, or the failure's kind
    retry_after_s: float = 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", default="16,48", help="closed-loop workers tried for the maximum"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="each phase's length")
    parser.add_argument("--load", type=float, default=3.0, help="times the maximum (open loop)")
    parser.add_argument("--max-in-flight", type=int, default=64, help="the cap while shedding")
    parser.add_argument("--queue-ms", type=int, default=50, help="admission_queue_ms")
    parser.add_argument("--timeout", type=float, default=5.0, help="each transaction's deadline")
    parser.add_argument("--regions", default="eu,us")
    parser.add_argument("--accounts", type=int, default=10_000, help="accounts per region")
    parser.add_argument("--dir", type=Path, default=Path(".twopc-bench-overload"))
    parser.add_argument("--out", type=Path, default=None, help="a directory for the JSON report")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    configure_logging("warning", console=True)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()][:2]
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    base: Path = args.dir.resolve()
    shutil.rmtree(base, ignore_errors=True)
    started = datetime.now(UTC)
    wall = time.monotonic()
    cluster = Cluster.create(
        base,
        regions,
        metrics=False,
        coordinator_settings={
            # Only the overload guard refuses: the identity's quotas are out of the way.
            "max_active_per_identity": 1_000_000,
            "max_sessions_per_identity": 1_000_000,
            "admission_max_in_flight": 0,  # until the shedding phases
            "admission_queue_ms": args.queue_ms,
        },
        agent_settings={"pool_size": 3 * max(clients) + 16, "pool_overflow": 64},
    )
    cluster.up()
    try:
        workload = Transfer2(regions, accounts=args.accounts)
        workload.setup(cluster)
        workload.reset(cluster)
        phases = asyncio.run(_phases(cluster, workload, clients, args))
        conserved = _conserved(cluster, workload)
    finally:
        cluster.down()
    say("\n" + format_table(phases))
    say(f"money conserved: {conserved}; whole run {time.monotonic() - wall:.1f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = {
            "started": started.isoformat(),
            "machine": {"cpus": os.cpu_count()},
            "settings": {k: str(v) for k, v in vars(args).items()},
            "phases": [asdict(p) for p in phases],
            "conserved": conserved,
        }
        (args.out / "bench-overload.json").write_text(json.dumps(data, indent=2) + "\n")
        (args.out / "bench-overload.md").write_text(format_table(phases) + "\n")
    return 0 if conserved else 1


async def _phases(
    cluster: Cluster, workload: Transfer2, clients: Sequence[int], args: argparse.Namespace
) -> list[Phase]:
    rng = random.Random(args.seed)

    def client_of(*, honor_retry_after: bool) -> AsyncClient:
        return AsyncClient(
            cluster.coordinator_address,
            tls=cluster.client_tls(),
            retry_policy=RetryPolicy(attempts=1),
            rpc_timeout=args.timeout + 5,
            honor_retry_after=honor_retry_after,
        )

    client = client_of(honor_retry_after=True)
    every = client_of(honor_retry_after=False)
    phases: list[Phase] = []
    try:
        # The maximum without a cap (a closed loop above the cap would only meet it).
        for count in clients:
            closed = await _closed_loop(cluster, client, workload, rng, count=count, args=args)
            phases.append(closed)
            say(_row(phases[-1]))
        best = max(p.tps for p in phases)
        rate = args.load * best
        await asyncio.to_thread(_restart_coordinator, cluster, str(args.max_in_flight))
        for name, sender in (("shedding", client), ("shedding, every request sent", every)):
            phases.append(
                await _open_loop(cluster, sender, workload, rng, rate=rate, name=name, args=args)
            )
            say(_row(phases[-1]))
        # Last, as it leaves a backlog on the agents and the databases behind.
        await asyncio.to_thread(_restart_coordinator, cluster, "0")
        phases.append(
            await _open_loop(
                cluster, client, workload, rng, rate=rate, name="no shedding", args=args
            )
        )
        say(_row(phases[-1]))
        for phase in phases:
            phase.ratio = phase.tps / best if best else None
    finally:
        await client.close()
        await every.close()
    return phases


def _restart_coordinator(cluster: Cluster, max_in_flight: str) -> None:
    for name in cluster.members:
        cluster.components[name].env[MAX_IN_FLIGHT_ENV] = max_in_flight
        cluster.restart(name)
    cluster.save()


async def _one(
    client: AsyncClient, workload: Transfer2, rng: random.Random, timeout: float
) -> _Attempt:
    attempt = _Attempt(time.monotonic())
    try:
        await client.run(workload.transfer_work(rng, workload.regions), timeout=timeout)
        attempt.outcome = "committed"
    except ResourceExhausted as err:
        attempt.outcome = "refused" if err.retry_after_s > 0 else "ResourceExhausted"
        attempt.retry_after_s = err.retry_after_s
    except TwopcError as err:
        attempt.outcome = type(err).__name__
    attempt.ended = time.monotonic()
    return attempt


async def _closed_loop(
    cluster: Cluster,
    client: AsyncClient,
    workload: Transfer2,
    rng: random.Random,
    *,
    count: int,
    args: argparse.Namespace,
) -> Phase:
    stop = time.monotonic() + args.seconds
    done: list[_Attempt] = []

    async def worker() -> None:
        while time.monotonic() < stop:
            attempt = await _one(client, workload, rng, args.timeout)
            done.append(attempt)
            if attempt.retry_after_s:  # a closed loop's client waits as it is told
                await asyncio.sleep(attempt.retry_after_s)

    cpu = _coordinator_cpu(cluster)
    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(count)))
    return _summary(
        Phase(f"max, closed loop {count}", args.seconds, clients=count),
        done,
        began,
        began + args.seconds,
        _since(cluster, cpu),
    )


async def _open_loop(
    cluster: Cluster,
    client: AsyncClient,
    workload: Transfer2,
    rng: random.Random,
    *,
    rate: float,
    name: str,
    args: argparse.Namespace,
) -> Phase:
    tasks: list[asyncio.Task[_Attempt]] = []
    cpu = _coordinator_cpu(cluster)
    began = time.monotonic()
    end = began + args.seconds
    count = int(rate * args.seconds)
    for index in range(count):
        delay = began + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival schedule, not synchronisation
        tasks.append(asyncio.create_task(_one(client, workload, rng, args.timeout)))
    arrived = time.monotonic() - began
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.monotonic()) + 0.1)
    used = _since(cluster, cpu)
    # The rest are answered (or time out) after the phase; their latency counts, their commits
    # do not (they are not the phase's throughput).
    if pending:
        await asyncio.wait(pending, timeout=args.timeout + 5)
    done = [t.result() for t in tasks if t.done() and not t.cancelled()]
    for task in tasks:
        task.cancel()
    phase = Phase(name, args.seconds, offered_per_s=round(count / max(arrived, 1e-9), 1))
    phase = _summary(phase, done, began, end, used)
    phase.arrivals = count
    phase.unanswered = count - len(done)
    return phase


def _since(cluster: Cluster, before: tuple[float, float]) -> tuple[float, float]:
    now = _coordinator_cpu(cluster)
    return now[0] - before[0], now[1] - before[1]


def _summary(
    phase: Phase, done: Sequence[_Attempt], began: float, end: float, cpu: tuple[float, float]
) -> Phase:
    committed = [a for a in done if a.outcome == "committed" and a.ended <= end]
    admitted = [a.ended - a.began for a in done if a.outcome != "refused"]
    phase.arrivals = len(done)
    phase.committed = len(committed)
    phase.tps = round(len(committed) / (end - began), 1)
    phase.p50_ms = _ms(percentile(admitted, 50))
    phase.p99_ms = _ms(percentile(admitted, 99))
    phase.refused = sum(1 for a in done if a.outcome == "refused")
    phase.failed = dict(
        Counter(a.outcome for a in done if a.outcome not in ("committed", "refused"))
    )
    phase.coordinator_cpu_s = round(cpu[0], 2)
    phase.bench_cpu_s = round(cpu[1], 2)
    return phase


def _coordinator_cpu(cluster: Cluster) -> tuple[float, float]:
    """CPU seconds so far of the coordinator, and of this process (the clients)."""
    pids = [cluster.components[m].pid for m in cluster.members]
    coordinator = sum(cpu_seconds(pid) or 0.0 for pid in pids if pid is not None)
    return coordinator, cpu_seconds(os.getpid()) or 0.0


def _conserved(cluster: Cluster, workload: Transfer2) -> bool:
    """Whether the money is conserved once every transaction is over (in-doubt ones resolved
    by recovery): looked at for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        if workload.check(cluster)["ok"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)  # polling the databases until recovery is done, with a deadline


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _row(p: Phase) -> str:
    load = f"{p.clients} clients" if p.clients else f"{p.offered_per_s:,.0f} arrivals/s"
    ratio = f"{p.ratio:.2f}x" if p.ratio is not None else "-"
    return (
        f"  {p.name}: {load}, {p.tps:,.0f} committed/s ({ratio}), p50 {p.p50_ms} ms, "
        f"p99 {p.p99_ms} ms, refused {p.refused}, failed {p.failed}, unanswered {p.unanswered}"
    )


def format_table(phases: Sequence[Phase]) -> str:
    lines = [
        "| phase | load | committed/s | ratio to max | p50 ms | p99 ms | refused | failed | "
        "CPU s coordinator / clients |",
        "|---|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for p in phases:
        load = f"{p.clients} clients" if p.clients else f"{p.offered_per_s:,.0f}/s open"
        ratio = f"{p.ratio:.2f}" if p.ratio is not None else "-"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(p.failed.items())) or "0"
        if p.unanswered:
            failed += f", unanswered {p.unanswered}"
        lines.append(
            f"| {p.name} | {load} | {p.tps:,.0f} | {ratio} | {p.p50_ms} | {p.p99_ms} | "
            f"{p.refused} | {failed} | {p.coordinator_cpu_s} / {p.bench_cpu_s} |"
        )
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twopc bench-overload", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
