"""The invariant checker of ``twopc chaos`` and ``twopc demo`` on broken states made by hand.

Two throwaway MariaDB servers ("eu" and "us"), no agent, no coordinator: each test lays out the
bank as the workload does (accounts in every region, a marker row in every branch that changed
data) and then breaks it the way a faulty protocol would, with XA branches written by hand under
twopc's format id. ``check_bank`` reads the databases and judges, exactly as the commands call it;
each verdict must break on the states that break its invariant and hold on every other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import pytest

from participants.xa import marker_table_ddl
from twopc.testing.playground.bank import (
    ABORTED,
    COMMITTED,
    UNKNOWN,
    Transfer,
    create_accounts,
    total_balance,
)
from twopc.testing.playground.cluster import DATABASE
from twopc.testing.playground.invariants import (
    MARKER_TABLE,
    Verdict,
    check_bank,
    prepared_branches,
)
from twopc.testing.playground.mariadb import MariaDBInstance, start_all
from twopc.txid import FORMAT_ID, Xid, txid_for_request

REGIONS = ("eu", "us")
ACCOUNTS = 4
I1, I2, I3, I5, I6, I7 = (
    "I1 atomicity",
    "I2 no lost commit",
    "I3 honest abort",
    "I5 liveness",
    "I6 unknown outcomes resolvable",
    "I7 conservation",
)


class Servers:
    """The regions' databases, as the checker reads them (``Databases``)."""

    def __init__(self, instances: dict[str, MariaDBInstance]) -> None:
        self._instances = instances

    @property
    def regions(self) -> Sequence[str]:
        return list(self._instances)

    @contextlib.contextmanager
    def mysql(self, region: str) -> Iterator[pymysql.Connection]:
        conn = self._instances[region].connect(database=DATABASE)
        try:
            yield conn
        finally:
            conn.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base: Path = tmp_path_factory.mktemp("invariants")
    instances = {r: MariaDBInstance(r, base / r, buffer_pool="8M") for r in REGIONS}
    start_all(list(instances.values()))
    try:
        for instance in instances.values():
            with instance.connect() as conn, conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}`")
                cursor.execute(f"USE `{DATABASE}`")
                cursor.execute(marker_table_ddl(MARKER_TABLE))
        yield Servers(instances)
    finally:
        for instance in instances.values():
            instance.stop(timeout=30)


@dataclass
class Bank:
    """A fresh bank in both regions, and what its clients saw."""

    servers: Servers
    expected_total: int
    transfers: list[Transfer] = field(default_factory=list)
    resolved: dict[str, str] = field(default_factory=dict)

    def transfer(self, outcome: str, *, source: str = "eu", target: str = "us") -> Transfer:
        request_id = f"t{len(self.transfers)}"
        made = Transfer(
            request_id=request_id,
            txid=txid_for_request("c1", request_id),
            source=(source, 1),
            target=(target, 2),
            amount=10,
            outcome=outcome,
        )
        self.transfers.append(made)
        return made

    def branch(self, transfer: Transfer, region: str, *, commit: bool = True) -> None:
        """The transfer's branch in ``region`` as an agent runs it: its share of the transfer
        and its marker row, XA prepared, then committed (or left prepared, detached)."""
        xid = Xid(transfer.txid, region)
        with self.servers.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(f"XA START {xid.sql()}")
            for (where, account), amount in (
                (transfer.source, -transfer.amount),
                (transfer.target, transfer.amount),
            ):
                if where == region:
                    cursor.execute(
                        "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                        [amount, account],
                    )
            cursor.execute(
                f"INSERT INTO {MARKER_TABLE} (gtrid, bqual, owner_thread, agent_instance) "
                "VALUES (%s, %s, CONNECTION_ID(), %s)",
                [xid.gtrid, xid.bqual, "0" * 32],
            )
            cursor.execute(f"XA END {xid.sql()}")
            cursor.execute(f"XA PREPARE {xid.sql()}")
            if commit:
                cursor.execute(f"XA COMMIT {xid.sql()}")

    def apply(self, transfer: Transfer) -> None:
        for region in dict.fromkeys(transfer.regions):
            self.branch(transfer, region)

    def check(self) -> list[Verdict]:
        return check_bank(
            self.servers,
            self.transfers,
            expected_total=self.expected_total,
            actual_total=total_balance(self.servers),
            resolved=self.resolved,
        )


def _roll_back_everything_prepared(servers: Servers) -> None:
    for region in servers.regions:
        with servers.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute("XA RECOVER FORMAT='SQL'")  # any branch, ours or not: ready literals
            for _format_id, _gtrid_length, _bqual_length, literal in cursor.fetchall():
                cursor.execute(f"XA ROLLBACK {literal}")


@pytest.fixture
def bank(servers: Servers) -> Iterator[Bank]:
    """A bank with nothing broken yet: transfers of every kind, each applied as its client
    was told (COMMITTED everywhere, ABORTED nowhere, UNKNOWN as the lookup answers)."""
    _roll_back_everything_prepared(servers)
    for region in servers.regions:
        with servers.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(f"DELETE FROM {MARKER_TABLE}")
    made = Bank(servers, create_accounts(servers, ACCOUNTS))
    made.apply(made.transfer(COMMITTED))
    made.apply(made.transfer(COMMITTED, source="us", target="eu"))
    made.apply(made.transfer(COMMITTED, source="us", target="us"))  # one region: one phase
    made.transfer(ABORTED)
    committed, aborted = made.transfer(UNKNOWN), made.transfer(UNKNOWN)
    made.apply(committed)
    made.resolved |= {committed.txid: COMMITTED, aborted.txid: ABORTED}
    yield made
    _roll_back_everything_prepared(servers)


def broken(verdicts: Sequence[Verdict]) -> dict[str, list[str]]:
    assert [v.name for v in verdicts] == [I1, I2, I3, I5, I6, I7]
    return {v.name: v.offenders for v in verdicts if not v.holds}


def test_a_clean_bank_keeps_every_invariant(bank: Bank) -> None:
    # A prepared branch that is not twopc's (another format id) is none of the checker's business.
    with bank.servers.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute("XA START 'someone-else', 'us', 1")
        cursor.execute("UPDATE accounts SET balance = balance WHERE id = 3")
        cursor.execute("INSERT INTO accounts VALUES (99, 0)")
        cursor.execute("XA END 'someone-else', 'us', 1")
        cursor.execute("XA PREPARE 'someone-else', 'us', 1")
    assert prepared_branches(bank.servers) == {"eu": [], "us": []}
    assert broken(bank.check()) == {}


def test_a_transfer_applied_in_one_region_only_breaks_atomicity(bank: Bank) -> None:
    half = bank.transfer(COMMITTED)
    bank.branch(half, "eu")  # the debit; the credit in us never committed
    # The client was told COMMITTED (I2), and the debit alone destroyed money (I7).
    assert broken(bank.check()) == {I1: [half.txid], I2: [half.txid], I7: []}


def test_a_commit_applied_nowhere_breaks_no_lost_commit(bank: Bank) -> None:
    lost = bank.transfer(COMMITTED)
    assert broken(bank.check()) == {I2: [lost.txid]}


def test_an_abort_applied_everywhere_breaks_honest_abort(bank: Bank) -> None:
    phantom = bank.transfer(ABORTED)
    bank.apply(phantom)
    assert broken(bank.check()) == {I3: [phantom.txid]}


def test_a_prepared_branch_left_behind_breaks_liveness(bank: Bank) -> None:
    left, pending = bank.transfer(ABORTED), bank.transfer(UNKNOWN)
    bank.branch(left, "eu", commit=False)  # prepared, its connection gone: XA RECOVER lists it
    bank.branch(pending, "us", commit=False)
    bank.resolved[pending.txid] = ABORTED  # what presumed abort will make of it
    assert prepared_branches(bank.servers) == {"eu": [left.txid], "us": [pending.txid]}
    # Prepared is not committed: no marker is visible, no balance has moved yet.
    assert broken(bank.check()) == {I5: [f"eu:{left.txid}", f"us:{pending.txid}"]}


def test_money_changed_outside_any_transfer_breaks_conservation(bank: Bank) -> None:
    with bank.servers.mysql("us") as conn, conn.cursor() as cursor:
        cursor.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 0")
    verdicts = bank.check()
    assert broken(verdicts) == {I7: []}
    assert verdicts[-1].detail == f"total {bank.expected_total + 1}, expected {bank.expected_total}"


@pytest.mark.parametrize("applied", [True, False], ids=["applied-said-aborted", "not-applied"])
def test_an_unknown_outcome_resolved_to_the_wrong_answer_breaks_i6(
    bank: Bank, applied: bool
) -> None:
    unknown = bank.transfer(UNKNOWN)
    if applied:
        bank.apply(unknown)
    bank.resolved[unknown.txid] = ABORTED if applied else COMMITTED
    assert broken(bank.check()) == {I6: [unknown.txid]}


def test_the_checker_reads_only_twopc_branches_with_the_one_parser(bank: Bank) -> None:
    """A branch under twopc's format id whose bytes are no twopc XID is not twopc's either."""
    with bank.servers.mysql("eu") as conn, conn.cursor() as cursor:
        xid = f"X'ff00', X'6575', {FORMAT_ID}"
        cursor.execute(f"XA START {xid}")
        cursor.execute("INSERT INTO accounts VALUES (98, 0)")
        cursor.execute(f"XA END {xid}")
        cursor.execute(f"XA PREPARE {xid}")
    assert prepared_branches(bank.servers) == {"eu": [], "us": []}
