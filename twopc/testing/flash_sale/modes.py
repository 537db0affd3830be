"""One purchase attempt in each of the sale's modes.

A mode is a callable ``buy(buy_id, buyer) -> Outcome``. The twopc modes go through the SDK (one
client shared by the buyers' threads); the queue mode through a plain connection per buyer to the
stock region's database. The answer comes when the buyer would see it: for twopc when the COMMIT
decision is durable, for the queue when the stock region's local COMMIT is (the order reaches the
wallet region later: that lag is measured apart).
"""

from __future__ import annotations

import contextlib
import enum
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pymysql

from twopc.client import Client
from twopc.errors import OutcomeUnknown, StatementFailed, TwopcError
from twopc.outbox import OUTBOX_TABLE
from twopc.testing.flash_sale.gate import GateDown, StockGate
from twopc.testing.flash_sale.shop import SKU, Shop

__all__ = [
    "MODES",
    "ORDERS_QUEUE",
    "Mode",
    "Outcome",
    "gated",
    "optimistic",
    "pessimistic",
    "queued",
]


class Outcome(enum.Enum):
    BOUGHT = "bought"
    SOLD_OUT = "sold_out"
    NO_FUNDS = "no_funds"
    FAILED = "failed"  # refused or aborted for another reason: the buyer may try again
    UNKNOWN = "unknown"  # no answer: the purchase may or may not have happened


class Mode(enum.Enum):
    PESSIMISTIC = "2pc-pessimistic"
    OPTIMISTIC = "2pc-optimistic"
    GATE = "gate-2pc"
    QUEUE = "mq-outbox"


MODES = tuple(mode.value for mode in Mode)
Buy = Callable[[str, int], Outcome]
_OPTIMISTIC_RETRIES = 10
ORDERS_QUEUE = "orders"
_READ_VERSION = "SELECT qty, version FROM sale_stock WHERE sku = %s"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pay_and_order_statements(
    shop: Shop, buy_id: str, buyer: int
) -> list[tuple[str, list[object]]]:
    return [
        ("UPDATE sale_wallets SET balance = balance - %s WHERE id = %s", [shop.price, buyer]),
        (
            "INSERT INTO sale_orders (buy_id, buyer, created_ms, applied_ms) "
            "VALUES (%s, %s, %s, %s)",
            [buy_id, buyer, _now_ms(), _now_ms()],
        ),
    ]


def _one_shot(
    client: Client, work: dict[str, list[tuple[str, list[object]]]], timeout: float
) -> Outcome:
    """Runs ``work`` in one one-shot transaction; a CHECK constraint's refusal names why."""
    try:
        client.run(work, timeout=timeout)
    except StatementFailed as err:
        if "stock_left" in err.message:
            return Outcome.SOLD_OUT
        if "funds_left" in err.message:
            return Outcome.NO_FUNDS
        return Outcome.FAILED  # a version conflict, a deadlock victim, ...
    except OutcomeUnknown:
        return Outcome.UNKNOWN
    except TwopcError:
        return Outcome.FAILED
    return Outcome.BOUGHT


def pessimistic(client: Client, shop: Shop, timeout: float) -> Buy:
    """One one-shot transaction: lock the stock row, take a unit, pay, write the order. The
    tables' CHECK constraints (stock and balance never below 0) refuse a sale that cannot be
    made, and the statement's error rolls the whole transaction back: one round trip, and the
    stock row is locked only from its SELECT ... FOR UPDATE to its XA COMMIT."""

    def buy(buy_id: str, buyer: int) -> Outcome:
        work: dict[str, list[tuple[str, list[object]]]] = {
            shop.stock_region: [
                ("SELECT qty FROM sale_stock WHERE sku = %s FOR UPDATE", [SKU]),
                (
                    "UPDATE sale_stock SET qty = qty - 1, version = version + 1 WHERE sku = %s",
                    [SKU],
                ),
            ],
            shop.wallet_region: _pay_and_order_statements(shop, buy_id, buyer),
        }
        return _one_shot(client, work, timeout)

    return buy


def optimistic(client: Client, shop: Shop, timeout: float) -> Buy:
    """Read the stock row's version without a lock (a read-only one-shot transaction), then one
    one-shot transaction whose UPDATE sets the version to NULL, which its NOT NULL column
    refuses, unless the version is still the one read: a conflict rolls everything back, and
    the buyer reads again, at most ``_OPTIMISTIC_RETRIES`` more times."""

    def attempt(buy_id: str, buyer: int) -> Outcome:
        try:
            read = client.run(
                {
                    shop.stock_region: [
                        ("SELECT qty, version FROM sale_stock WHERE sku = %s", [SKU])
                    ]
                },
                timeout=timeout,
            )
        except TwopcError:
            return Outcome.FAILED
        left, version = read.results[shop.stock_region][0].rows[0]
        if int(str(left)) <= 0:
            return Outcome.SOLD_OUT
        work: dict[str, list[tuple[str, list[object]]]] = {
            shop.stock_region: [
                (
                    "UPDATE sale_stock SET qty = qty - 1, "
                    "version = IF(version = %s, version + 1, NULL) WHERE sku = %s",
                    [version, SKU],
                )
            ],
            shop.wallet_region: _pay_and_order_statements(shop, buy_id, buyer),
        }
        return _one_shot(client, work, timeout)

    def buy(buy_id: str, buyer: int) -> Outcome:
        outcome = Outcome.FAILED
        for _ in range(_OPTIMISTIC_RETRIES + 1):
            outcome = attempt(buy_id, buyer)
            if outcome is not Outcome.FAILED:
                return outcome
        return outcome

    return buy


def gated(client: Client, shop: Shop, timeout: float, gate: StockGate) -> Buy:
    behind = pessimistic(client, shop, timeout)

    def buy(buy_id: str, buyer: int) -> Outcome:
        try:
            if not gate.take():
                return Outcome.SOLD_OUT  # answered by Redis alone
        except GateDown:
            return Outcome.FAILED
        outcome = behind(buy_id, buyer)
        if outcome is Outcome.SOLD_OUT:
            gate.sold_out()
        elif outcome in (Outcome.NO_FUNDS, Outcome.FAILED):
            gate.give_back()  # not committed: the unit is still in the database
        return outcome

    return buy


def queued(shop: Shop, connect_stock: Callable[[], Any]) -> Buy:
    """A local transaction in the stock region: the unit and a row of twopc's outbox table (the
    order, for the wallet region), or nothing."""
    local = threading.local()

    def buy(buy_id: str, buyer: int) -> Outcome:
        committing = False
        try:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = connect_stock()
            with conn.cursor() as cursor:
                took = cursor.execute(
                    "UPDATE sale_stock SET qty = qty - 1, version = version + 1 "
                    "WHERE sku = %s AND qty > 0",
                    [SKU],
                )
                if not took:
                    conn.rollback()
                    return Outcome.SOLD_OUT
                order = json.dumps({"buyer": buyer, "created_ms": _now_ms()}).encode()
                cursor.execute(
                    f"INSERT INTO {OUTBOX_TABLE} (message_id, queue, msg_key, body, created_ms) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [buy_id, ORDERS_QUEUE, str(buyer), order, _now_ms()],
                )
            committing = True
            conn.commit()
        except pymysql.err.OperationalError:
            local.conn = None
            # Lost in the COMMIT: the unit may be sold; the outbox row says which.
            return Outcome.UNKNOWN if committing else Outcome.FAILED
        except pymysql.MySQLError:
            _quietly(getattr(local, "conn", None) and local.conn.rollback)
            return Outcome.FAILED
        return Outcome.BOUGHT

    return buy


def _quietly(action: Callable[[], object] | None) -> None:
    if action is None:
        return
    with contextlib.suppress(Exception):  # best effort: the deadline rolls back anyway
        action()
