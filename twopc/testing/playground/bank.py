"""A bank across regions: accounts in every region, transfers between accounts in two regions.

Each transfer is one one-shot transaction (debit in one region, credit in another) with its own
request id, so its txid is known before it is sent and its branches are traceable by their marker
rows whatever the client saw.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import pymysql

from twopc.client import Client, OutcomeUnknown, TransactionAborted
from twopc.errors import CircuitOpen, TwopcError
from twopc.txid import txid_for_request

INITIAL_BALANCE = 1000
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accounts "
    "(id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"
)

COMMITTED, ABORTED, UNKNOWN = "committed", "aborted", "unknown"


class Databases(Protocol):
    """Where the bank lives: a region's database, reached as root. A ``Cluster`` is one; so is
    anything else that can hand out such connections (a test's own MariaDB servers)."""

    @property
    def regions(self) -> Sequence[str]: ...

    def mysql(self, region: str) -> AbstractContextManager[pymysql.Connection]:
        """A connection with autocommit on, to the database that holds the accounts."""
        ...


@dataclass
class Transfer:
    request_id: str
    txid: str
    source: tuple[str, int]
    target: tuple[str, int]
    amount: int
    outcome: str = ""
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def regions(self) -> tuple[str, str]:
        return self.source[0], self.target[0]


def create_accounts(databases: Databases, per_region: int) -> int:
    """(Re)creates the accounts table in every region; returns the total of all balances."""
    for region in databases.regions:
        with databases.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(SCHEMA)
            cursor.execute("DELETE FROM accounts")
            cursor.executemany(
                "INSERT INTO accounts (id, balance) VALUES (%s, %s)",
                [(i, INITIAL_BALANCE) for i in range(per_region)],
            )
    return INITIAL_BALANCE * per_region * len(databases.regions)


def total_balance(databases: Databases) -> int:
    total = 0
    for region in databases.regions:
        with databases.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT COALESCE(SUM(balance), 0) FROM accounts")
            row = cursor.fetchone()
            total += int(row[0]) if row else 0
    return total


class TransferWorkload:
    """Runs transfers from several threads through the SDK, recording what each client saw."""

    def __init__(
        self,
        client: Client,
        *,
        coordinator_id: str,
        regions: Sequence[str],
        accounts: int,
        seed: int,
        run_id: str,
        local_share: float = 0.0,
    ) -> None:
        if len(regions) < 2:
            raise ValueError("transfers need at least two regions")
        self._local_share = local_share
        self._client = client
        self._coordinator_id = coordinator_id
        self._regions = list(regions)
        self._accounts = accounts
        self._seed = seed
        self.run_id = run_id
        self._next = 0
        self._lock = threading.Lock()
        self.transfers: list[Transfer] = []

    def plan(self, index: int) -> Transfer:
        rng = random.Random(self._seed * 1_000_003 + index)
        source_region, target_region = rng.sample(self._regions, 2)
        if rng.random() < self._local_share:
            target_region = source_region  # one participant: the one-phase path
        request_id = f"{self.run_id}-{index}"
        return Transfer(
            request_id=request_id,
            txid=txid_for_request(self._coordinator_id, request_id),
            source=(source_region, rng.randrange(self._accounts)),
            target=(target_region, rng.randrange(self._accounts)),
            amount=rng.randint(1, 50),
        )

    def run_one(self, transfer: Transfer, timeout: float = 5.0) -> Transfer:
        source_region, source_id = transfer.source
        target_region, target_id = transfer.target
        debit = (
            "UPDATE accounts SET balance = balance - %s WHERE id = %s",
            [transfer.amount, source_id],
        )
        credit = (
            "UPDATE accounts SET balance = balance + %s WHERE id = %s",
            [transfer.amount, target_id],
        )
        work: dict[str, list[tuple[str, list[int]]]] = {source_region: [debit]}
        work.setdefault(target_region, []).append(credit)
        transfer.started = time.monotonic()
        try:
            self._client.run(work, timeout=timeout, request_id=transfer.request_id)
            transfer.outcome = COMMITTED
        except TransactionAborted as err:
            transfer.outcome, transfer.detail = ABORTED, err.message
        except CircuitOpen as err:  # refused before anything began: nothing of it ran
            transfer.outcome, transfer.detail = ABORTED, err.message
        except OutcomeUnknown as err:
            transfer.outcome, transfer.detail = UNKNOWN, err.message
        except TwopcError as err:
            # Anything else left the transfer's fate open: counted unknown, resolved later.
            transfer.outcome, transfer.detail = UNKNOWN, f"{type(err).__name__}: {err.message}"
        transfer.ended = time.monotonic()
        return transfer

    def run(
        self,
        count: int,
        workers: int,
        *,
        stop: threading.Event | None = None,
        on_done: Callable[[Transfer], None] | None = None,
    ) -> list[Transfer]:
        """Runs ``count`` transfers on ``workers`` threads (or until ``stop`` is set)."""
        stop = stop or threading.Event()

        def worker() -> None:
            while not stop.is_set():
                with self._lock:
                    if self._next >= count:
                        return
                    index = self._next
                    self._next += 1
                transfer = self.run_one(self.plan(index))
                with self._lock:
                    self.transfers.append(transfer)
                if on_done is not None:
                    on_done(transfer)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.transfers
