"""``twopc bench-log``: the decision log on each store, side by side in one run.

For the file log, the SQL log on MariaDB and the SQL log on PostgreSQL (throwaway servers started
here, durable settings: ``innodb_flush_log_at_trx_commit=1``, PostgreSQL's ``fsync`` and
``synchronous_commit`` on), at each concurrency (default 1, 8 and 64 writers): ``--count``
decisions per run, each a ``record_commit`` then a ``record_end`` as in steady state, bounded by
``--max-seconds`` per run (a run that reaches it stops there and says so). Prints commits/s, the
p50/p99 latency of ``record_commit`` and the COMMIT records per durable write (fsync or store
transaction: group commit's yield), as a Markdown table; ``--output`` writes it to a file too.

``--fenced`` writes the SQL logs under a lease on their coordinator id (``leases``): every
store transaction then starts with the fence's locking read of the lease row, and the table
shows what that costs (run once with, once without).

``--mariadb-url`` / ``--postgres-url`` measure existing stores instead (the database must exist;
the password, if any, from ``TWOPC_BENCH_STORE_PASSWORD``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from coordinator.decision_log import CommitRecord, DecisionLog
from coordinator.decision_log.file_log import FileDecisionLog
from coordinator.decision_log.leases import Lease, SqlLeases
from coordinator.decision_log.sql_log import SqlDecisionLog
from twopc.testing.playground.mariadb import MariaDBInstance
from twopc.testing.playground.postgres import PostgresInstance

__all__ = ["add_arguments", "main", "run"]

_PARTICIPANTS = ("region-a", "region-b")
_DATABASE = "twopc_bench_log"
PASSWORD_ENV = "TWOPC_BENCH_STORE_PASSWORD"  # noqa: S105 (a variable name)

HEADER = (
    "| store      | writers | commits | seconds | commits/s | p50 ms | p99 ms | records/write |\n"
    "|------------|---------|---------|---------|-----------|--------|--------|---------------|"
)


@dataclass(frozen=True)
class Result:
    store: str
    writers: int
    commits: int
    seconds: float
    latencies: list[float]
    writes: int
    cut_short: bool

    def row(self) -> str:
        cuts = statistics.quantiles(self.latencies, n=100) if len(self.latencies) > 1 else [0.0]
        p50, p99 = cuts[min(49, len(cuts) - 1)], cuts[-1]
        rate = self.commits / self.seconds if self.seconds else 0.0
        per_write = self.commits / self.writes if self.writes else 0.0
        note = " (time bound hit)" if self.cut_short else ""
        return (
            f"| {self.store:<10} | {self.writers:>7} | {self.commits:>7}{note} "
            f"| {self.seconds:>7.2f} | {rate:>9,.0f} | {p50 * 1e3:>6.2f} | {p99 * 1e3:>6.2f} "
            f"| {per_write:>13.1f} |"
        )


class _Writes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, commits: int, seconds: float) -> None:
        self.count += 1


async def measure(
    store: str,
    make_log: Callable[[Callable[[int, float], None]], DecisionLog],
    writers: int,
    count: int,
    max_seconds: float,
) -> Result:
    """``writers`` tasks record ``count`` decisions in all on a fresh log (or stop at
    ``max_seconds``)."""
    writes = _Writes()
    log = make_log(writes)
    await log.open()
    latencies: list[float] = []
    numbers = iter(range(count))
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(index: int) -> None:
        for n in numbers:
            if time.perf_counter() > deadline:
                return
            txid = f"b{writers}.{index:06x}{n:026x}"
            before = time.perf_counter()
            await log.record_commit(CommitRecord(txid, _PARTICIPANTS))
            latencies.append(time.perf_counter() - before)
            await log.record_end(txid)

    async with asyncio.TaskGroup() as group:
        for index in range(writers):
            group.create_task(worker(index))
    elapsed = time.perf_counter() - started
    await log.close()
    return Result(
        store, writers, len(latencies), elapsed, latencies, writes.count, len(latencies) < count
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--writers", default="1,8,64", help="comma-separated writer counts")
    parser.add_argument("--count", type=int, default=2000, help="decisions per run")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="bound of each run")
    parser.add_argument(
        "--stores", default="file,mariadb,postgresql", help="comma-separated: which stores"
    )
    parser.add_argument(
        "--directory", type=Path, default=Path(), help="where the file log and servers live"
    )
    parser.add_argument("--mariadb-url", default="", help="an existing MariaDB/MySQL store")
    parser.add_argument("--postgres-url", default="", help="an existing PostgreSQL store")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--fenced", action="store_true", help="SQL logs under a lease: the fence on every batch"
    )


def run(args: argparse.Namespace) -> int:
    # The logs' own lines (opened, ...) would interleave with the table: warnings only while
    # it runs, and the caller's logging as it was afterwards (run in-process, by the tests).
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        return _run(args)
    finally:
        structlog.configure(**saved)


def _run(args: argparse.Namespace) -> int:
    levels = [int(level) for level in args.writers.split(",")]
    stores = [store.strip() for store in args.stores.split(",") if store.strip()]
    unknown = set(stores) - {"file", "mariadb", "postgresql"}
    if unknown:
        print(f"unknown store(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    password = os.environ.get(PASSWORD_ENV)
    base = Path(tempfile.mkdtemp(prefix="twopc-bench-log-", dir=args.directory)).absolute()
    base.chmod(0o755)  # the postgres user must reach its directory
    servers: list[MariaDBInstance | PostgresInstance] = []
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"twopc bench-log: {args.count} decisions per run (bound {args.max_seconds:g} s), "
        f"{platform.node()}, {os.cpu_count()} CPUs, {when}",
        f"file log and servers in {base}",
        *(["SQL logs fenced on a lease (a locking read of its row in every batch)"] * args.fenced),
        "",
        HEADER,
    ]
    for line in lines:
        print(line, flush=True)
    try:
        urls: dict[str, str] = {}
        if "mariadb" in stores:
            urls["mariadb"] = args.mariadb_url or _start_mariadb(base, servers)
        if "postgresql" in stores:
            urls["postgresql"] = args.postgres_url or _start_postgres(base, servers)
        for level in levels:
            for store in stores:
                url = urls.get(store, "")
                lease = None
                if args.fenced and store != "file":
                    lease = asyncio.run(_acquire(url, password, f"bench{level}"))
                make = _maker(store, base / f"file-{level}", url, password, level, lease=lease)
                result = asyncio.run(measure(store, make, level, args.count, args.max_seconds))
                lines.append(result.row())
                print(lines[-1], flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")
    return 0


async def _acquire(url: str, password: str | None, coordinator_id: str) -> Lease:
    leases = SqlLeases(url, password=password)
    try:
        return await leases.acquire(coordinator_id, "twopc-bench-log", 3_600_000)
    finally:
        leases.close()


def _maker(
    store: str,
    directory: Path,
    url: str,
    password: str | None,
    level: int,
    *,
    lease: Lease | None,
) -> Callable[[Callable[[int, float], None]], DecisionLog]:
    def make(on_sync: Callable[[int, float], None]) -> DecisionLog:
        if store == "file":
            return FileDecisionLog(directory, on_sync=on_sync)
        return SqlDecisionLog(
            url, coordinator_id=f"bench{level}", password=password, on_sync=on_sync, lease=lease
        )

    return make


def _start_mariadb(base: Path, servers: list[MariaDBInstance | PostgresInstance]) -> str:
    server = MariaDBInstance("bench-log", base / "mariadb", buffer_pool="64M")
    server.start()
    servers.append(server)
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {_DATABASE}")
    return f"mariadb://root@127.0.0.1:{server.port}/{_DATABASE}"


def _start_postgres(base: Path, servers: list[MariaDBInstance | PostgresInstance]) -> str:
    server = PostgresInstance(base / "postgres")
    server.start()
    servers.append(server)
    return server.create_database(_DATABASE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twopc bench-log", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
