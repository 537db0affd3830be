"""The benchmark's workloads: what one logical transaction does, the schema, and a check after.

- ``transfer2``: move 1-50 from an account in one region to an account in the other (the first
  two regions, either way round); two writing branches.
- ``transfer3``: move a + b from an account in one region to one account in each of the two
  others (the first three regions); three writing branches.
- ``flash-pessimistic``: a flash sale: lock the one hot stock row in the first region with
  ``SELECT ... FOR UPDATE``, decrement it, and insert an order row in the second region. All
  statements are known up front: a one-shot transaction.
- ``flash-optimistic``: read the stock row's version without a lock, decrement it with
  ``UPDATE ... WHERE version = <read version>``, and insert the order. 0 rows updated is a
  conflict: roll back and try again (a new transaction), at most ``max_retries`` more times.
  Interactive, since the decision comes in the middle.
- ``read-mostly``: 90 % read-only transactions reading an account in each of the first two
  regions, 10 % ``transfer2``.
- ``transfer2-hot``: ``transfer2`` between the first ``hot_accounts`` accounts of each region
  only (4 by default): every transaction contends for a few rows. The branches run in the
  regions' order whichever way the money goes (a fixed order: the baselines, which send one
  branch after the other, cannot wait on each other in a cycle; twopc sends them at once).
- ``flash-sale-2region``: a flash sale across two regions: lock the hot stock row in the first
  region (``SELECT ... FOR UPDATE``) and take one unit, then in the second debit the buyer's
  wallet (``wallets``, ``accounts`` of them) by the price and insert the order. One-shot, stock
  branch first.

The accounts (``accounts``, 10,000 per region by default) and the stock (``stock`` in the first
region, ``orders`` in the second) are InnoDB tables in the cluster's database, set up once and reset
before each system's run through root connections. ``check`` tells whether the money (or the
stock) was conserved: sum of balances unchanged; units sold = order rows = version bumps (and,
for ``flash-sale-2region``, the wallets paid exactly the price of each unit sold).

Contended transactions fail: a deadlock or a lock-wait timeout aborts the transaction, which is
counted as not committed and not retried (the next transaction is a new one), for every system
alike: the report shows the aborts rather than hiding them behind retries.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from twopc.testing.bench.metrics import Tally
from twopc.testing.bench.systems import TxFailed, Work, Worker
from twopc.testing.playground.cluster import Cluster

__all__ = [
    "WORKLOADS",
    "FlashOptimistic",
    "FlashPessimistic",
    "FlashSale2Region",
    "ReadMostly",
    "Transfer2",
    "Transfer2Hot",
    "Transfer3",
    "Workload",
    "make_workload",
    "regions_needed",
]

INITIAL_BALANCE = 1000
INITIAL_STOCK = 10**12
HOT_SKU = 1
HOT_ACCOUNTS = 4
INITIAL_WALLET = 10**12
PRICE = 7
# Schema changes and resets wait at most this long for a lock (a leftover branch must not hang
# the run).
_RESET_LOCK_WAIT_S = 20

ACCOUNTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accounts "
    "(id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"
)
STOCK_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS stock "
    "(sku INT PRIMARY KEY, qty BIGINT NOT NULL, version BIGINT NOT NULL) ENGINE=InnoDB"
)
WALLETS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS wallets (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"
)
ORDERS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "sku INT NOT NULL, customer INT NOT NULL) ENGINE=InnoDB"
)

DEBIT = "UPDATE accounts SET balance = balance - %s WHERE id = %s"
CREDIT = "UPDATE accounts SET balance = balance + %s WHERE id = %s"
READ_BALANCE = "SELECT balance FROM accounts WHERE id = %s"


def _admin(
    cluster: Cluster,
    region: str,
    statements: Sequence[str | tuple[str, Sequence[object]]],
    *,
    rows: tuple[str, Sequence[Sequence[object]]] | None = None,
) -> None:
    """Runs ``statements`` on ``region`` as root, then inserts ``rows`` (``(sql, rows)``)."""
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute(f"SET SESSION lock_wait_timeout = {_RESET_LOCK_WAIT_S}")
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {_RESET_LOCK_WAIT_S}")
        for statement in statements:
            sql, params = (statement, None) if isinstance(statement, str) else statement
            cursor.execute(sql, params)
        if rows is not None:
            cursor.executemany(rows[0], rows[1])


def _scalar(cluster: Cluster, region: str, sql: str) -> int:
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class Workload(ABC):
    """A workload over the first ``regions_needed`` of ``regions`` (the cluster's, in order)."""

    name: ClassVar[str]
    regions_needed: ClassVar[int] = 2

    def __init__(
        self,
        regions: Sequence[str],
        *,
        accounts: int = 10_000,
        max_retries: int = 20,
        hot_accounts: int = HOT_ACCOUNTS,
    ):
        if len(regions) < self.regions_needed:
            raise ValueError(f"{self.name} needs {self.regions_needed} regions, got {regions}")
        if hot_accounts < 1 or accounts < 1:
            raise ValueError("accounts and hot accounts must be at least 1")
        self.regions = list(regions[: self.regions_needed])
        self.accounts = accounts
        self.max_retries = max_retries
        self.hot_accounts = min(hot_accounts, accounts)

    @abstractmethod
    def setup(self, cluster: Cluster) -> None:
        """Creates the tables (idempotent)."""

    @abstractmethod
    def reset(self, cluster: Cluster) -> None:
        """Puts the data back to its initial state."""

    @abstractmethod
    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        """Runs one logical transaction, counting attempts and conflicts in ``tally``.

        Raises:
            TxFailed: it did not commit (``kind`` aborted, unknown or gave_up).
        """

    @abstractmethod
    def check(self, cluster: Cluster) -> dict[str, Any]:
        """``{"ok": bool, ...}``: whether what the workload conserves was conserved."""


class _Accounts(Workload):
    def setup(self, cluster: Cluster) -> None:
        for region in self.regions:
            _admin(cluster, region, [ACCOUNTS_SCHEMA])

    def reset(self, cluster: Cluster) -> None:
        rows = [(i, INITIAL_BALANCE) for i in range(self.accounts)]
        for region in self.regions:
            _admin(
                cluster,
                region,
                ["DELETE FROM accounts"],
                rows=("INSERT INTO accounts (id, balance) VALUES (%s, %s)", rows),
            )

    def check(self, cluster: Cluster) -> dict[str, Any]:
        expected = INITIAL_BALANCE * self.accounts * len(self.regions)
        total = sum(
            _scalar(cluster, r, "SELECT COALESCE(SUM(balance), 0) FROM accounts")
            for r in self.regions
        )
        return {"ok": total == expected, "total_balance": total, "expected": expected}

    def transfer_work(self, rng: random.Random, regions: Sequence[str]) -> Work:
        source, *targets = rng.sample(list(regions), len(regions))
        amounts = [rng.randint(1, 50) for _ in targets]
        work: dict[str, list[tuple[str, list[int]]]] = {
            source: [(DEBIT, [sum(amounts), rng.randrange(self.accounts)])]
        }
        for target, amount in zip(targets, amounts, strict=True):
            work[target] = [(CREDIT, [amount, rng.randrange(self.accounts)])]
        return work


class Transfer2(_Accounts):
    """A transfer across every one of the workload's regions."""

    name = "transfer2"

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        work = self.transfer_work(rng, self.regions)
        tally.attempts += 1
        worker.run(work)


class Transfer2Hot(_Accounts):
    """``transfer2`` between the first ``hot_accounts`` accounts of each region, branches in the
    regions' order."""

    name = "transfer2-hot"

    def hot_transfer_work(self, rng: random.Random) -> Work:
        source = rng.choice(self.regions)
        amount = rng.randint(1, 50)
        return {
            region: [
                (DEBIT if region == source else CREDIT, [amount, rng.randrange(self.hot_accounts)])
            ]
            for region in self.regions  # a fixed order, whichever way the money goes
        }

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        work = self.hot_transfer_work(rng)
        tally.attempts += 1
        worker.run(work)


class Transfer3(Transfer2):
    name = "transfer3"
    regions_needed = 3


class ReadMostly(_Accounts):
    name = "read-mostly"
    read_share = 0.9

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        if rng.random() < self.read_share:
            work: Work = {
                region: [(READ_BALANCE, [rng.randrange(self.accounts)])] for region in self.regions
            }
        else:
            work = self.transfer_work(rng, self.regions)
        tally.attempts += 1
        worker.run(work)


class _Flash(Workload):
    @property
    def stock_region(self) -> str:
        return self.regions[0]

    @property
    def orders_region(self) -> str:
        return self.regions[1]

    def setup(self, cluster: Cluster) -> None:
        _admin(cluster, self.stock_region, [STOCK_SCHEMA])
        _admin(cluster, self.orders_region, [ORDERS_SCHEMA])

    def reset(self, cluster: Cluster) -> None:
        _admin(
            cluster,
            self.stock_region,
            [
                "DELETE FROM stock",
                (
                    "INSERT INTO stock (sku, qty, version) VALUES (%s, %s, 0)",
                    [HOT_SKU, INITIAL_STOCK],
                ),
            ],
        )
        _admin(cluster, self.orders_region, ["TRUNCATE TABLE orders"])

    def check(self, cluster: Cluster) -> dict[str, Any]:
        with cluster.mysql(self.stock_region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT qty, version FROM stock WHERE sku = %s", [HOT_SKU])
            row = cursor.fetchone()
        qty, version = (int(row[0]), int(row[1])) if row else (INITIAL_STOCK, -1)
        orders = _scalar(cluster, self.orders_region, "SELECT COUNT(*) FROM orders")
        sold = INITIAL_STOCK - qty
        return {
            "ok": sold == orders == version,
            "sold": sold,
            "orders": orders,
            "version": version,
        }


class FlashPessimistic(_Flash):
    name = "flash-pessimistic"

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        work: Work = {
            self.stock_region: [
                ("SELECT qty FROM stock WHERE sku = %s FOR UPDATE", [HOT_SKU]),
                (
                    "UPDATE stock SET qty = qty - 1, version = version + 1 WHERE sku = %s",
                    [HOT_SKU],
                ),
            ],
            self.orders_region: [
                (
                    "INSERT INTO orders (sku, customer) VALUES (%s, %s)",
                    [HOT_SKU, rng.randrange(1_000_000)],
                )
            ],
        }
        tally.attempts += 1
        worker.run(work)


class FlashOptimistic(_Flash):
    name = "flash-optimistic"

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        customer = rng.randrange(1_000_000)
        for _ in range(self.max_retries + 1):
            tally.attempts += 1
            tx = worker.begin()
            try:
                read = tx.execute(
                    self.stock_region, "SELECT qty, version FROM stock WHERE sku = %s", [HOT_SKU]
                )
                version = read.rows[0][1]
                updated = tx.execute(
                    self.stock_region,
                    "UPDATE stock SET qty = qty - 1, version = version + 1 "
                    "WHERE sku = %s AND version = %s",
                    [HOT_SKU, version],
                )
                if updated.affected_rows == 0:
                    tx.rollback()
                    tally.conflicts += 1
                    continue
                tx.execute(
                    self.orders_region,
                    "INSERT INTO orders (sku, customer) VALUES (%s, %s)",
                    [HOT_SKU, customer],
                )
                tx.commit()
            except BaseException:
                tx.rollback()
                raise
            return
        raise TxFailed("gave_up", f"still in conflict after {self.max_retries} retries")


class FlashSale2Region(_Flash):
    """The hot stock row in the first region, the buyers' wallets and orders in the second."""

    name = "flash-sale-2region"

    def setup(self, cluster: Cluster) -> None:
        super().setup(cluster)
        _admin(cluster, self.orders_region, [WALLETS_SCHEMA])

    def reset(self, cluster: Cluster) -> None:
        super().reset(cluster)
        _admin(
            cluster,
            self.orders_region,
            ["DELETE FROM wallets"],
            rows=(
                "INSERT INTO wallets (id, balance) VALUES (%s, %s)",
                [(i, INITIAL_WALLET) for i in range(self.accounts)],
            ),
        )

    def sale_work(self, rng: random.Random) -> Work:
        buyer = rng.randrange(self.accounts)
        return {
            self.stock_region: [
                ("SELECT qty FROM stock WHERE sku = %s FOR UPDATE", [HOT_SKU]),
                (
                    "UPDATE stock SET qty = qty - 1, version = version + 1 WHERE sku = %s",
                    [HOT_SKU],
                ),
            ],
            self.orders_region: [
                ("UPDATE wallets SET balance = balance - %s WHERE id = %s", [PRICE, buyer]),
                ("INSERT INTO orders (sku, customer) VALUES (%s, %s)", [HOT_SKU, buyer]),
            ],
        }

    def step(self, worker: Worker, rng: random.Random, tally: Tally) -> None:
        work = self.sale_work(rng)
        tally.attempts += 1
        worker.run(work)

    def check(self, cluster: Cluster) -> dict[str, Any]:
        result = super().check(cluster)
        paid = INITIAL_WALLET * self.accounts - _scalar(
            cluster, self.orders_region, "SELECT COALESCE(SUM(balance), 0) FROM wallets"
        )
        result["paid"] = paid
        result["ok"] = result["ok"] and paid == PRICE * result["sold"]
        return result


_KINDS: dict[str, type[Workload]] = {
    kind.name: kind
    for kind in (
        Transfer2,
        Transfer3,
        FlashPessimistic,
        FlashOptimistic,
        ReadMostly,
        Transfer2Hot,
        FlashSale2Region,
    )
}
WORKLOADS = tuple(_KINDS)


def make_workload(
    name: str,
    regions: Sequence[str],
    *,
    accounts: int = 10_000,
    max_retries: int = 20,
    hot_accounts: int = HOT_ACCOUNTS,
) -> Workload:
    """The workload called ``name`` (one of ``WORKLOADS``).

    Raises:
        ValueError: an unknown name, or too few regions for it.
    """
    if name not in _KINDS:
        raise ValueError(f"unknown workload {name!r}; the workloads are {', '.join(WORKLOADS)}")
    return _KINDS[name](
        regions, accounts=accounts, max_retries=max_retries, hot_accounts=hot_accounts
    )


def regions_needed(names: Sequence[str]) -> int:
    """How many regions the workloads called ``names`` need together."""
    return max(_KINDS[name].regions_needed for name in names)
