"""The sale's tables, their reset, and the facts read back from both regions.

Orders are keyed by the buyer's purchase id (``buy_id``) without a unique index, so that an
order applied twice shows as two rows (``doubled``) instead of an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twopc.outbox import INBOX_DDL, INBOX_TABLE, OUTBOX_DDL, OUTBOX_TABLE
from twopc.testing.playground.cluster import Cluster

__all__ = ["SKU", "Facts", "Shop"]

SKU = 1
_SCHEMA_STOCK = (
    "CREATE TABLE IF NOT EXISTS sale_stock (sku INT PRIMARY KEY, qty BIGINT NOT NULL, "
    "version BIGINT NOT NULL, CONSTRAINT stock_left CHECK (qty >= 0)) ENGINE=InnoDB",
    OUTBOX_DDL,  # the queue mode's outbox: twopc's own, read by twopc's relay
)
_SCHEMA_WALLETS = (
    "CREATE TABLE IF NOT EXISTS sale_wallets (id INT PRIMARY KEY, balance BIGINT NOT NULL, "
    "CONSTRAINT funds_left CHECK (balance >= 0)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS sale_orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "buy_id CHAR(32) NOT NULL, buyer INT NOT NULL, created_ms BIGINT NOT NULL, "
    "applied_ms BIGINT NOT NULL, KEY by_buy (buy_id)) ENGINE=InnoDB",
    INBOX_DDL,  # the queue mode's consumer: each order applied once (first_delivery)
)


@dataclass(frozen=True)
class Facts:
    """What the databases say after (or during) a sale."""

    stock_left: int
    sold: int  # units gone from the stock row
    orders: int  # order rows in the wallet region
    distinct_orders: int
    paid: int  # money gone from the wallets

    @property
    def doubled(self) -> int:
        return self.orders - self.distinct_orders


class Shop:
    def __init__(
        self, cluster: Cluster, regions: Sequence[str], *, wallets: int, price: int
    ) -> None:
        self.cluster = cluster
        self.stock_region, self.wallet_region = regions[0], regions[1]
        self.wallets = wallets
        self.price = price
        self.initial_stock = 0
        self.initial_wallet = 0

    def setup(self) -> None:
        self._run(self.stock_region, _SCHEMA_STOCK)
        self._run(self.wallet_region, _SCHEMA_WALLETS)

    def reset(self, stock: int, wallet_balance: int) -> None:
        self.initial_stock = stock
        self.initial_wallet = wallet_balance
        self._run(
            self.stock_region,
            [
                "DELETE FROM sale_stock",
                f"TRUNCATE TABLE {OUTBOX_TABLE}",
                f"INSERT INTO sale_stock (sku, qty, version) VALUES ({SKU}, {stock}, 0)",
            ],
        )
        self._run(
            self.wallet_region,
            [
                "DELETE FROM sale_wallets",
                "TRUNCATE TABLE sale_orders",
                f"TRUNCATE TABLE {INBOX_TABLE}",
            ],
        )
        with self.cluster.mysql(self.wallet_region) as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO sale_wallets (id, balance) VALUES (%s, %s)",
                [(i, wallet_balance) for i in range(self.wallets)],
            )

    def facts(self) -> Facts:
        with self.cluster.mysql(self.stock_region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT qty FROM sale_stock WHERE sku = %s", [SKU])
            row = cursor.fetchone()
            left = int(row[0]) if row else 0
        with self.cluster.mysql(self.wallet_region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT COUNT(*), COUNT(DISTINCT buy_id) FROM sale_orders")
            orders, distinct = (int(v) for v in _row(cursor))
            cursor.execute("SELECT COALESCE(SUM(balance), 0) FROM sale_wallets")
            balance = int(_row(cursor)[0])
        return Facts(
            stock_left=left,
            sold=self.initial_stock - left,
            orders=orders,
            distinct_orders=distinct,
            paid=self.initial_wallet * self.wallets - balance,
        )

    def order_lags_ms(self) -> list[int]:
        """Per order: from the stock region's commit (``created_ms``) to the wallet region's."""
        with self.cluster.mysql(self.wallet_region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT applied_ms - created_ms FROM sale_orders")
            return [int(row[0]) for row in cursor.fetchall()]

    def _run(self, region: str, statements: Sequence[str]) -> None:
        with self.cluster.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 20")
            for statement in statements:
                cursor.execute(statement)


def _row(cursor: Any) -> tuple[Any, ...]:
    row = cursor.fetchone()
    assert row is not None, "an aggregate returns a row"
    return tuple(row)
