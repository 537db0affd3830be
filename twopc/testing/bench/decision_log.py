"""Micro-benchmark of the file decision log: durable decisions per second under concurrency.

Run as ``python -m twopc.testing.bench.decision_log --seconds 5 --concurrency 1,16,256``. Each run
opens a fresh log in a temporary directory under ``--directory`` (default: the current directory,
so that it measures the disk the coordinator would use, not a tmpfs), starts that many tasks which
each loop on ``record_commit`` then ``record_end`` (one COMMIT and one END per decision, as in
steady state), and prints decisions/s, the p50/p99 latency of ``record_commit`` and the fsyncs per
decision. The first row is the disk's floor in the same run: one ``os.write`` plus one
``os.fdatasync`` per record of the same size, from one thread, no event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.decision_log import CommitRecord, DecisionLog
from coordinator.decision_log._format import encode_commit
from coordinator.decision_log.file_log import FileDecisionLog

_PARTICIPANTS = ("region-a", "region-b")


@dataclass(frozen=True)
class Result:
    label: str
    concurrency: int
    decisions: int
    seconds: float
    latencies: list[float]
    fsyncs: int

    def row(self) -> str:
        cuts = statistics.quantiles(self.latencies, n=100) if len(self.latencies) > 1 else [0.0]
        p50, p99 = cuts[min(49, len(cuts) - 1)], cuts[-1]
        rate = self.decisions / self.seconds
        return (
            f"| {self.label:<22} | {self.concurrency:>11} | {rate:>11,.0f} "
            f"| {p50 * 1e3:>7.3f} | {p99 * 1e3:>7.3f} | {self.fsyncs / self.decisions:>15.4f} |"
        )


HEADER = (
    "| path                   | concurrency | decisions/s | p50 ms  | p99 ms  | fsyncs/decision |\n"
    "|------------------------|-------------|-------------|---------|---------|-----------------|"
)


def _txid(worker: int, n: int) -> str:
    return f"bench.{worker:06x}{n:026x}"


class _CountingSync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fdatasync(fd)


def raw_baseline(directory: Path, seconds: float) -> Result:
    """One write and one fdatasync per record, the way a log without group commit works."""
    record = encode_commit(CommitRecord(_txid(0, 0), _PARTICIPANTS))
    fd = os.open(directory / "raw.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    latencies = []
    try:
        started = time.perf_counter()
        deadline = started + seconds
        now = started
        while now < deadline:
            os.write(fd, record)
            os.fdatasync(fd)
            done = time.perf_counter()
            latencies.append(done - now)
            now = done
    finally:
        os.close(fd)
    return Result(
        "write+fdatasync (raw)", 1, len(latencies), now - started, latencies, len(latencies)
    )


async def measure(
    make_log: Callable[[Path, Callable[[int], None]], DecisionLog],
    directory: Path,
    concurrency: int,
    seconds: float,
    label: str = "FileDecisionLog",
) -> Result:
    """Runs ``concurrency`` tasks that record decisions on a fresh log for ``seconds``."""
    sync = _CountingSync()
    log = make_log(directory, sync)
    await log.open()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            txid = _txid(index, n)
            n += 1
            started = time.perf_counter()
            await log.record_commit(CommitRecord(txid, _PARTICIPANTS))
            latencies.append(time.perf_counter() - started)
            await log.record_end(txid)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for index in range(concurrency):
            group.create_task(worker(index))
    elapsed = time.perf_counter() - started
    await log.close()
    return Result(label, concurrency, len(latencies), elapsed, latencies, sync.calls)


def _file_log(directory: Path, fsync: Callable[[int], None]) -> DecisionLog:
    return FileDecisionLog(directory, fsync=fsync)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--concurrency", default="1,16,256", help="comma-separated task counts")
    parser.add_argument("--directory", type=Path, default=Path(), help="where to put the logs")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="twopc-bench-", dir=args.directory) as tmp:
        root = Path(tmp)
        print(f"decision log benchmark in {root.resolve()}, {args.seconds:g} s per run")
        print(HEADER)
        print(raw_baseline(root, args.seconds).row(), flush=True)
        for level in levels:
            run_dir = root / f"c{level}"
            result = asyncio.run(measure(_file_log, run_dir, level, args.seconds))
            print(result.row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
