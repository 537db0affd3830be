"""``twopc flash-sale``: the sale in every mode on one playground, its figures and its picture.

Each mode runs on the same data, reset before it: ``--stock`` units of one item in the first
region, ``--wallets`` wallets in the second, ``--buyers`` buyer threads, each a stream of buyers
(a new one as soon as the last had an answer), until ``--after-s`` after the first "sold out"
answer (the crowd that keeps coming after a sell-out) or the mode's ``--duration``. The gate mode
kills Redis (SIGKILL) once a third of the stock is sold and starts it again empty. The queue mode
waits, after its buyers, until every order sold has reached the wallet region (at most 60 s).

With ``--outage`` a second run follows: a stock too large to sell out, ``--outage-duration`` s
per mode, the wallet region's database SIGKILLed ``--outage-at`` s in and restarted
``--outage-s`` s later. It shows what each mode does while a region is down.

Per mode the report gives: orders and orders per second (while stock lasted), p50/p99 of a
purchase as the buyer sees it, "sold out" answers per second after the sell-out and their
p50/p99, the answers (bought, sold out, failed, unknown), oversell,
orders lost (a unit sold or a purchase acknowledged without its order) or doubled, money taken
without an order; for the queue mode the lag from the stock region's commit to the order in the
wallet region (p50/p99) and the most orders visible in one region only at a sampled moment.
And per mode the machine: TIME_WAIT sockets before and after (flat: no connection per
transaction), and the cores each process used, CPU- or I/O-bound (``machine``).
Exit status 1 when an invariant broke (oversell, lost, doubled, money).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pika
import pymysql

from participants.relay import OutboxRelay, RelayConfig
from twopc.client import Client, RetryPolicy
from twopc.logs import configure_logging
from twopc.testing.flash_sale.gate import StockGate
from twopc.testing.flash_sale.machine import CpuMeter, bound, time_wait
from twopc.testing.flash_sale.modes import (
    MODES,
    ORDERS_QUEUE,
    Mode,
    Outcome,
    gated,
    optimistic,
    pessimistic,
    queued,
)
from twopc.testing.flash_sale.outbox import Consumer
from twopc.testing.flash_sale.shop import SKU, Shop
from twopc.testing.playground.cluster import DATABASE, Cluster
from twopc.testing.playground.rabbitmq import RabbitMQInstance
from twopc.testing.playground.redis_server import RedisInstance

__all__ = ["ModeResult", "add_arguments", "run"]

_DRAIN_S = 60.0
_SAMPLE_S = 0.1
_FAILED_PAUSE_S = 0.01  # a refused buyer tries again after this (not a hot spin)
_TX_TIMEOUT_S = 5.0
CORES = os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default="all", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--buyers", type=int, default=32, help="buyer threads (default 32)")
    parser.add_argument("--stock", type=int, default=1000, help="units on sale (default 1000)")
    parser.add_argument("--wallets", type=int, default=1000, help="buyers' wallets (default 1000)")
    parser.add_argument("--price", type=int, default=7)
    parser.add_argument("--duration", type=float, default=30.0, help="at most, per mode (s)")
    parser.add_argument(
        "--after-s",
        type=float,
        default=3.0,
        help="buyers keep coming this long after the first sold-out answer (default 3)",
    )
    parser.add_argument("--outage", action="store_true", help="also the wallet-region outage run")
    parser.add_argument("--outage-duration", type=float, default=20.0)
    parser.add_argument("--outage-at", type=float, default=5.0)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--regions", default="eu,us", help="stock region, wallet region")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path(".twopc-flash-sale"))
    parser.add_argument("--out", type=Path, default=None, help="JSON, Markdown and PNG go here")


@dataclass
class ModeResult:
    mode: str
    run: str  # "sale" or "outage"
    buyers: int
    stock: int
    seconds: float = 0.0  # from the start to the last order (or the mode's end)
    orders: int = 0
    orders_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    sold_out_p50_ms: float | None = None  # a "sold out" answer, as the buyer waits for it
    sold_out_p99_ms: float | None = None
    sold_out_per_s: float = 0.0  # "sold out" answers per second after the sell-out
    answers: dict[str, int] = field(default_factory=dict)
    oversell: int = 0
    lost: int = 0
    doubled: int = 0
    unpaid_or_overpaid: int = 0
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    max_one_region_only: int = 0
    events: list[str] = field(default_factory=list)
    time_wait: tuple[int, int] = (0, 0)  # TIME_WAIT sockets at the start and the end
    cpu: dict[str, float] = field(default_factory=dict)  # process -> cores used on average
    bound: dict[str, str] = field(default_factory=dict)  # process -> "CPU" | "I/O"
    # (s, units sold in the stock region, orders in the wallet region), sampled
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.oversell == self.lost == self.doubled == self.unpaid_or_overpaid == 0


class _Sale:
    """One mode's run: the buyers, the sampler, the faults on a schedule."""

    def __init__(
        self, env: _Environment, mode: Mode, *, run: str, stock: int, duration: float
    ) -> None:
        self.env = env
        self.mode = mode
        self.stock = stock
        self.duration = duration
        self.after_s = env.args.after_s
        self.result = ModeResult(mode.value, run, env.args.buyers, stock)
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._acknowledged: set[str] = set()
        self._answers: dict[str, int] = {}
        self._last_order_at = 0.0
        self._sold_out_latencies: list[float] = []
        self._sold_out_at: float | None = None
        self._stop = threading.Event()
        self._started = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _until(self, deadline: float) -> float:
        """The buyers stop at the mode's deadline, or ``after_s`` after the first sold out."""
        sold_out_at = self._sold_out_at
        return deadline if sold_out_at is None else min(deadline, sold_out_at + self.after_s)

    def go(self, buy: Callable[[str, int], Outcome], faults: Callable[[_Sale], None]) -> None:
        rngs = [random.Random(self.env.args.seed * 1000 + n) for n in range(self.env.args.buyers)]
        self._started = time.monotonic()
        buyers = [
            threading.Thread(target=self._buyer, args=(buy, rng), daemon=True) for rng in rngs
        ]
        sampler = threading.Thread(target=self._sample, daemon=True)
        fault = threading.Thread(target=faults, args=(self,), daemon=True)
        for thread in (*buyers, sampler, fault):
            thread.start()
        deadline = self._started + self.duration
        for thread in buyers:
            thread.join(max(deadline - time.monotonic(), 0) + _TX_TIMEOUT_S + 5)
        self._stop.set()
        fault.join(120)
        sampler.join(5)

    def bought(self) -> int:
        return self._answers.get(Outcome.BOUGHT.value, 0)

    def _buyer(self, buy: Callable[[str, int], Outcome], rng: random.Random) -> None:
        deadline = self._started + self.duration
        while not self._stop.is_set() and time.monotonic() < self._until(deadline):
            buy_id = uuid.uuid4().hex
            began = time.monotonic()
            outcome = buy(buy_id, rng.randrange(self.env.args.wallets))
            took = time.monotonic() - began
            with self._lock:
                self._answers[outcome.value] = self._answers.get(outcome.value, 0) + 1
                if outcome is Outcome.BOUGHT:
                    self._latencies.append(took)
                    self._acknowledged.add(buy_id)
                    self._last_order_at = time.monotonic() - self._started
                if outcome is Outcome.SOLD_OUT:
                    self._sold_out_latencies.append(took)
                    if self._sold_out_at is None:
                        self._sold_out_at = time.monotonic()
            if outcome not in (Outcome.BOUGHT, Outcome.SOLD_OUT):
                self._stop.wait(_FAILED_PAUSE_S)

    def _sample(self) -> None:
        """Orders so far, and how many are visible in one region only (sold, no order yet)."""
        shop = self.env.shop
        worst = 0
        with contextlib.ExitStack() as stack:
            while not self._stop.is_set():
                try:
                    stock = stack.enter_context(self.env.connect(shop.stock_region))
                    wallets = stack.enter_context(self.env.connect(shop.wallet_region))
                    while not self._stop.wait(_SAMPLE_S):
                        sold = self.stock - _scalar(
                            stock, "SELECT qty FROM sale_stock WHERE sku = %s", SKU
                        )
                        orders = _scalar(wallets, "SELECT COUNT(DISTINCT buy_id) FROM sale_orders")
                        worst = max(worst, sold - orders)
                        self.result.timeline.append((round(self.elapsed(), 2), sold, orders))
                except pymysql.MySQLError:
                    stack.close()  # a region down (the outage run): look again later
                    self._stop.wait(_SAMPLE_S)
        self.result.max_one_region_only = worst

    def finish(self, consumer: Consumer | None) -> ModeResult:
        shop = self.env.shop
        result = self.result
        if consumer is not None:
            deadline = time.monotonic() + _DRAIN_S
            while time.monotonic() < deadline:
                facts = shop.facts()
                if facts.distinct_orders >= facts.sold:
                    break
                time.sleep(0.05)
        facts = shop.facts()
        with self._lock:
            latencies = sorted(self._latencies)
            sold_out = sorted(self._sold_out_latencies)
            sold_out_window = (
                time.monotonic() - self._sold_out_at if self._sold_out_at is not None else 0.0
            )
            acknowledged = set(self._acknowledged)
            result.answers = dict(self._answers)
            result.seconds = round(self._last_order_at or self.elapsed(), 3)
        in_wallets = self.env.order_ids()
        result.orders = facts.distinct_orders
        result.orders_per_s = round(facts.distinct_orders / max(result.seconds, 1e-3), 1)
        result.p50_ms = _percentile(latencies, 0.50)
        result.p99_ms = _percentile(latencies, 0.99)
        result.sold_out_p50_ms = _percentile(sold_out, 0.50)
        result.sold_out_p99_ms = _percentile(sold_out, 0.99)
        if sold_out_window > 0:
            result.sold_out_per_s = round(len(sold_out) / min(sold_out_window, self.after_s), 1)
        result.oversell = max(0, facts.sold - self.stock) + max(0, -facts.stock_left)
        result.lost = max(0, facts.sold - facts.distinct_orders) + len(acknowledged - in_wallets)
        result.doubled = facts.doubled
        result.unpaid_or_overpaid = abs(facts.paid - shop.price * facts.distinct_orders)
        if self.mode is Mode.QUEUE:
            lags = sorted(shop.order_lags_ms())
            result.lag_p50_ms = _percentile([lag / 1000 for lag in lags], 0.50)
            result.lag_p99_ms = _percentile([lag / 1000 for lag in lags], 0.99)
        return result


class _Environment:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, shop: Shop) -> None:
        self.args = args
        self.cluster = cluster
        self.shop = shop
        self.redis: RedisInstance | None = None
        self.rabbitmq: RabbitMQInstance | None = None
        tls = cluster.client_tls()
        self.client = Client(
            cluster.coordinator_address,
            tls=tls,
            insecure=tls is None,
            retry_policy=RetryPolicy(attempts=2, initial_backoff=0.05, deadline=2.0),
            rpc_timeout=_TX_TIMEOUT_S + 2,
        )

    @contextlib.contextmanager
    def connect(self, region: str, *, autocommit: bool = True) -> Any:
        conn = self.connection(region, autocommit=autocommit)
        try:
            yield conn
        finally:
            conn.close()

    def connection(self, region: str, *, autocommit: bool = False) -> Any:
        host, port = self.cluster.component(f"mariadb-{region}").address.rsplit(":", 1)
        return pymysql.connect(
            host=host,
            port=int(port),
            user="root",
            database=DATABASE,
            autocommit=autocommit,
            connect_timeout=2,
            read_timeout=10,
            write_timeout=10,
            ssl_disabled=True,
        )

    def pids(self) -> dict[str, int]:
        """The processes whose CPU a mode measures: the daemons, the servers, this one."""
        pids = {
            name: component.pid
            for name, component in self.cluster.components.items()
            if component.pid is not None and component.kind in ("coordinator", "agent", "mariadb")
        }
        if self.redis is not None and self.redis.pid is not None:
            pids["redis"] = self.redis.pid
        if self.rabbitmq is not None and (beam := self.rabbitmq.server_pid()) is not None:
            pids["rabbitmq"] = beam
        pids["sale"] = os.getpid()  # the buyers, the relay, the consumer, the sampler
        return pids

    def ports(self) -> set[int]:
        """The ports the run's servers listen on."""
        ports = {
            int(component.address.rsplit(":", 1)[1])
            for component in self.cluster.components.values()
        }
        ports |= {server.port for server in (self.redis, self.rabbitmq) if server is not None}
        return ports

    def order_ids(self) -> set[str]:
        with self.connect(self.shop.wallet_region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT buy_id FROM sale_orders")
            return {str(row[0]) for row in cursor.fetchall()}

    def stock_in_database(self) -> int:
        with self.connect(self.shop.stock_region) as conn:
            return _scalar(conn, "SELECT qty FROM sale_stock WHERE sku = %s", SKU)

    def relay_config(self) -> RelayConfig:
        """twopc's relay on the stock region's outbox, as root (a throwaway server)."""
        host, port = self.cluster.component(f"mariadb-{self.shop.stock_region}").address.rsplit(
            ":", 1
        )
        assert self.rabbitmq is not None
        return RelayConfig(
            mysql_host=host,
            mysql_port=int(port),
            mysql_user="root",
            mysql_database=DATABASE,
            amqp_url=self.rabbitmq.url,
            poll_ms=5,
            retry_ms=100,
            timeout_s=3.0,
        )

    def purge_queue(self) -> None:
        assert self.rabbitmq is not None
        connection = pika.BlockingConnection(pika.URLParameters(self.rabbitmq.url))
        try:
            channel = connection.channel()
            channel.queue_declare(ORDERS_QUEUE, durable=True)
            channel.queue_purge(ORDERS_QUEUE)
        finally:
            connection.close()

    def close(self) -> None:
        self.client.close()


def _run_mode(
    env: _Environment, mode: Mode, *, run: str, stock: int, duration: float
) -> ModeResult:
    env.shop.reset(stock, wallet_balance=env.shop.price * 10**6)
    sale = _Sale(env, mode, run=run, stock=stock, duration=duration)
    relay: OutboxRelay | None = None
    relaying: threading.Thread | None = None
    consumer: Consumer | None = None
    gate: StockGate | None = None
    if mode is Mode.QUEUE:
        env.purge_queue()
        assert env.rabbitmq is not None
        relay = OutboxRelay(env.relay_config())
        relaying = threading.Thread(target=relay.run, name="outbox-relay", daemon=True)
        consumer = Consumer(
            lambda: env.connection(env.shop.wallet_region),
            env.rabbitmq.url,
            ORDERS_QUEUE,
            env.shop.price,
        )
        relaying.start()
        consumer.start()
        buy = queued(env.shop, lambda: env.connection(env.shop.stock_region))
    elif mode is Mode.GATE:
        assert env.redis is not None
        gate = StockGate(env.redis.url, f"stock:{SKU}", env.stock_in_database)
        gate.clear()
        buy = gated(env.client, env.shop, _TX_TIMEOUT_S, gate)
    elif mode is Mode.OPTIMISTIC:
        buy = optimistic(env.client, env.shop, _TX_TIMEOUT_S)
    else:
        buy = pessimistic(env.client, env.shop, _TX_TIMEOUT_S)
    faults = _outage(env) if run == "outage" else _redis_restart(env) if gate else _no_faults
    meter = CpuMeter(env.pids())
    ports = env.ports()
    time_wait_before = time_wait(ports)
    meter.start()
    try:
        sale.go(buy, faults)
        shares = meter.stop()
        sale.result.time_wait = (time_wait_before, time_wait(ports))
        sale.result.cpu = shares
        sale.result.bound = {name: bound(name, share, CORES) for name, share in shares.items()}
        result = sale.finish(consumer)
    finally:
        if relay is not None and relaying is not None:
            relay.stop()
            relaying.join(10)
        if consumer is not None:
            consumer.stop()
        if gate is not None:
            result_seeds = gate.seeds
            gate.close()
    if gate is not None:
        sale.result.events.append(f"gate seeded from the database {result_seeds} times")
    if relay is not None and consumer is not None:
        sale.result.events.append(
            f"relay published {relay.published} ({relay.errors} errors); consumer applied "
            f"{consumer.applied}, skipped {consumer.duplicates} duplicates, "
            f"{consumer.refused} refused, {consumer.errors} errors"
        )
    return result


def _no_faults(sale: _Sale) -> None:
    return


def _redis_restart(env: _Environment) -> Callable[[_Sale], None]:
    """SIGKILL Redis once a third of the stock is sold; start it again, empty."""

    def fault(sale: _Sale) -> None:
        while not sale._stop.wait(0.01):
            if sale.bought() >= sale.stock // 3:
                assert env.redis is not None
                env.redis.kill()
                env.redis.start()
                sale.result.events.append(
                    f"Redis SIGKILLed and restarted empty at {sale.elapsed():.2f} s "
                    f"({sale.bought()} bought)"
                )
                return

    return fault


def _outage(env: _Environment) -> Callable[[_Sale], None]:
    def fault(sale: _Sale) -> None:
        name = f"mariadb-{env.shop.wallet_region}"
        if sale._stop.wait(env.args.outage_at):
            return
        env.cluster.kill(name)
        sale.result.events.append(f"{name} SIGKILLed at {sale.elapsed():.2f} s")
        sale._stop.wait(env.args.outage_s)
        env.cluster.restart(name, timeout=120)
        sale.result.events.append(f"{name} answering again at {sale.elapsed():.2f} s")

    return fault


def run(args: argparse.Namespace) -> int:
    configure_logging("warning", console=True)
    modes = [Mode(m) for m in (MODES if args.modes == "all" else args.modes.split(","))]
    regions = [r.strip() for r in args.regions.split(",") if r.strip()][:2]
    directory: Path = args.dir.resolve()
    shutil.rmtree(directory, ignore_errors=True)
    cluster = Cluster.create(
        directory,
        regions,
        metrics=False,
        agent_settings={"pool_size": 2 * args.buyers + 16},
        coordinator_settings={"max_sessions_per_identity": 2 * args.buyers + 8},
    )
    print(f"twopc flash-sale: a playground in {directory} ({', '.join(regions)})", flush=True)
    cluster.up()
    shop = Shop(cluster, regions, wallets=args.wallets, price=args.price)
    env = _Environment(args, cluster, shop)
    results: list[ModeResult] = []
    try:
        shop.setup()
        if Mode.GATE in modes:
            env.redis = RedisInstance(directory / "redis")
            env.redis.start()
        if Mode.QUEUE in modes:
            env.rabbitmq = RabbitMQInstance(directory / "rabbitmq")
            env.rabbitmq.start()
        for mode in modes:
            results.append(
                _run_mode(env, mode, run="sale", stock=args.stock, duration=args.duration)
            )
            print(_line(results[-1]), flush=True)
        if args.outage:
            for mode in modes:
                results.append(
                    _run_mode(env, mode, run="outage", stock=10**9, duration=args.outage_duration)
                )
                print(_line(results[-1]), flush=True)
    finally:
        env.close()
        if env.redis is not None:
            env.redis.stop()
        if env.rabbitmq is not None:
            env.rabbitmq.stop()
        cluster.down()
    summary = summarize(results)
    print(summary)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "flash-sale.json").write_text(
            json.dumps([asdict(r) for r in results], indent=2) + "\n"
        )
        (args.out / "flash-sale.md").write_text(summary + "\n")
        from twopc.testing.flash_sale.plot import plot  # noqa: PLC0415 (matplotlib, lazily)

        plot(results, args.out / "flash-sale.png")
    return 0 if all(r.ok for r in results) else 1


def _line(r: ModeResult) -> str:
    lag = f"  lag p50 {r.lag_p50_ms} p99 {r.lag_p99_ms} ms" if r.lag_p50_ms is not None else ""
    return (
        f"{r.run:6} {r.mode:16} {r.orders:7} orders {r.orders_per_s:8.1f}/s  p50 {r.p50_ms} "
        f"p99 {r.p99_ms} ms  answers {r.answers}  oversell {r.oversell} lost {r.lost} "
        f"doubled {r.doubled}{lag}  one-region-only max {r.max_one_region_only}  "
        f"{'ok' if r.ok else 'INVARIANT BROKEN'}"
    )


def summarize(results: Sequence[ModeResult]) -> str:
    lines = [
        "| run | mode | orders | orders/s | purchase p50 / p99 ms | sold out: answers/s, "
        "p50 / p99 ms | failed | unknown | oversell | lost | doubled | queue lag p50 / p99 ms "
        "| in one region only (max) |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lag = f"{r.lag_p50_ms} / {r.lag_p99_ms}" if r.lag_p50_ms is not None else "-"
        sold_out = (
            f"{r.sold_out_per_s:,.0f}/s, {r.sold_out_p50_ms} / {r.sold_out_p99_ms}"
            if r.sold_out_p50_ms is not None
            else "-"
        )
        lines.append(
            f"| {r.run} | {r.mode} | {r.orders:,} | {r.orders_per_s:,.1f} | {r.p50_ms} / "
            f"{r.p99_ms} | {sold_out} | {r.answers.get('failed', 0):,} | "
            f"{r.answers.get('unknown', 0)} | {r.oversell} | {r.lost} | {r.doubled} | {lag} | "
            f"{r.max_one_region_only} |"
        )
    lines += ["", "| run | mode | TIME_WAIT start / end | cores used (CPU- or I/O-bound) |"]
    lines.append("|---|---|---|---|")
    for r in results:
        cpu = ", ".join(f"{name} {share:.2f} ({r.bound[name]})" for name, share in r.cpu.items())
        lines.append(f"| {r.run} | {r.mode} | {r.time_wait[0]} / {r.time_wait[1]} | {cpu} |")
    lines.append("")
    for r in results:
        for event in r.events:
            lines.append(f"- {r.run} {r.mode}: {event}")
    return "\n".join(lines)


def _scalar(conn: Any, sql: str, *params: object) -> int:
    with conn.cursor() as cursor:
        cursor.execute(sql, params or None)
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _percentile(sorted_seconds: Sequence[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    if len(sorted_seconds) == 1:
        return round(sorted_seconds[0] * 1000, 2)
    cuts = statistics.quantiles(sorted_seconds, n=100, method="inclusive")
    return round(cuts[min(int(q * 100), 99) - 1] * 1000, 2)
