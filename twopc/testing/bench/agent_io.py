"""Micro-benchmark of an agent's database I/O: CPU per branch, by I/O model, in one run.

Run as ``python -m twopc.testing.bench.agent_io --port 3306``. Each round runs the same branches
(a one-trip prepare: XA START, an UPDATE, the marker INSERT, XA END, XA PREPARE; then XA COMMIT)
from ``--concurrency`` concurrent callers on an asyncio loop, two ways:

* ``thread``: blocking PyMySQL calls handed to a thread pool, one hop per database call (the
  agent up to 4df172a);
* ``loop``: the agent's own ``participants.xa`` sessions, aiomysql on the event loop.

It prints, per model, the median over the rounds of throughput, this process's CPU per branch
(user + system) and the p50/p99 of a branch, then the ratio to ``thread``. The database is
``--database`` on the given server (created; its two tables are dropped and made again).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pymysql
from pymysql.constants import CLIENT

from participants.xa import Session, SessionPool

_ACCOUNTS = 10_000


@dataclass(frozen=True)
class Round:
    model: str
    tps: float
    cpu_us: float
    p50_ms: float
    p99_ms: float


def _statements(n: int) -> tuple[str, str]:
    xid = f"'agent-io-{n}'"
    prepare = (
        f"XA START {xid}; UPDATE accounts SET balance = balance + 1 WHERE id = {n % _ACCOUNTS}; "
        f"INSERT INTO markers (id) VALUES ({xid}); XA END {xid}; XA PREPARE {xid}"
    )
    return prepare, f"XA COMMIT {xid}"


def _setup(host: str, port: int, database: str) -> None:
    conn = pymysql.connect(host=host, port=port, user="root", autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        cursor.execute(f"USE `{database}`")
        cursor.execute("DROP TABLE IF EXISTS accounts, markers")
        cursor.execute("CREATE TABLE accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
        cursor.execute("CREATE TABLE markers (id VARCHAR(64) PRIMARY KEY)")
        cursor.execute(f"INSERT INTO accounts SELECT seq, 0 FROM seq_0_to_{_ACCOUNTS - 1}")
    conn.close()


async def _callers(
    concurrency: int, numbers: Iterator[int], end: int, branch: Callable[[int], Awaitable[None]]
) -> list[float]:
    latencies: list[float] = []

    async def caller() -> None:
        for n in numbers:
            if n >= end:
                return
            started = time.perf_counter()
            await branch(n)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


async def _threaded(args: argparse.Namespace, numbers: Iterator[int], end: int) -> list[float]:
    connections: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(args.concurrency):
        connections.put_nowait(
            pymysql.connect(
                host=args.host,
                port=args.port,
                user="root",
                database=args.database,
                autocommit=True,
                client_flag=CLIENT.MULTI_STATEMENTS,
            )
        )
    loop = asyncio.get_running_loop()
    workers = ThreadPoolExecutor(args.concurrency + 4)

    def run(conn: Any, sql: str) -> None:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            while cursor.nextset():
                pass

    async def branch(n: int) -> None:
        prepare, commit = _statements(n)
        conn = await connections.get()
        await loop.run_in_executor(workers, run, conn, prepare)
        await loop.run_in_executor(workers, run, conn, commit)
        connections.put_nowait(conn)

    try:
        return await _callers(args.concurrency, numbers, end, branch)
    finally:
        workers.shutdown()
        while not connections.empty():
            connections.get_nowait().close()


async def _on_loop(args: argparse.Namespace, numbers: Iterator[int], end: int) -> list[float]:
    pool = SessionPool(
        host=args.host,
        port=args.port,
        user="root",
        password="",
        database=args.database,
        pool_size=args.concurrency,
        overflow=0,
        checkout_timeout=30,
        connect_timeout=5,
        read_timeout=30,
        lock_wait_timeout=10,
        idle_timeout=600,
        command_timeout=30,
    )

    async def branch(n: int) -> None:
        prepare, commit = _statements(n)
        session: Session = await pool.session()
        await session.script([prepare])
        await session.command(commit)
        session.release()

    try:
        return await _callers(args.concurrency, numbers, end, branch)
    finally:
        pool.dispose()


_MODELS = {"thread": _threaded, "loop": _on_loop}


def _round(model: str, args: argparse.Namespace, first: int) -> Round:
    numbers = itertools.count(first)
    before, started = os.times(), time.perf_counter()
    latencies = asyncio.run(_MODELS[model](args, numbers, first + args.branches))
    elapsed, after = time.perf_counter() - started, os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    latencies.sort()
    return Round(
        model,
        tps=args.branches / elapsed,
        cpu_us=cpu / args.branches * 1e6,
        p50_ms=latencies[len(latencies) // 2] * 1e3,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1e3,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3306)
    parser.add_argument("--database", default="twopc_agent_io_bench")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--branches", type=int, default=3000, help="per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    _setup(args.host, args.port, args.database)
    rounds: dict[str, list[Round]] = {model: [] for model in _MODELS}
    first = 0
    for _ in range(args.rounds):
        for model in _MODELS:  # interleaved: the machine's drift hits both alike
            rounds[model].append(_round(model, args, first))
            first += args.branches
    print(
        f"{args.branches} branches per model per round, {args.concurrency} concurrent callers, "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'model':8} {'branches/s':>10} {'CPU µs/branch':>14} {'p50 ms':>8} {'p99 ms':>8}")
    baseline = statistics.median(r.cpu_us for r in rounds["thread"])
    for model, results in rounds.items():
        cpu = statistics.median(r.cpu_us for r in results)
        print(
            f"{model:8} {statistics.median(r.tps for r in results):10.0f} {cpu:14.0f} "
            f"{statistics.median(r.p50_ms for r in results):8.2f} "
            f"{statistics.median(r.p99_ms for r in results):8.2f}   "
            f"CPU {cpu / baseline:.2f}x thread"
        )


if __name__ == "__main__":
    main()
