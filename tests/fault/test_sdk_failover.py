"""The SDK's failover on a real coordinator group: two members, ids c1 (A, the cluster's
coordinator) and c2 (B), real processes on a MariaDB decision log, one ``Client`` given both.

The client runs transfers through A (the first endpoint); A is SIGKILLed; the next ``run()``
fails over to B within the retry policy's deadline, and the transfers after it stay on B. An
interactive transaction begun on A stays there: its next call says the transaction is lost, and
nothing of it is applied. The balances show every acknowledged transfer exactly once.

The group is tests/fault/group_members.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.group_members import (
    Member,
    group_cluster,
    peer_member,
)
from tests.sql_stores import Stores
from tests.support import prepared, transfer_sql
from twopc.client import Client, OutcomeUnknown, RetryPolicy, Unavailable
from twopc.testing.playground.bank import INITIAL_BALANCE
from twopc.testing.playground.cluster import Cluster, wait_until

pytestmark = pytest.mark.fault

ACCOUNTS = 10
TRANSFER_ACCOUNTS = 9  # accounts 0-8 take the transfers; 9 is the lost transaction's
LOST_ACCOUNT = 9
# Failover needs no takeover: a new request goes to B as soon as A refuses connections.
POLICY = RetryPolicy(attempts=6, initial_backoff=0.05, max_backoff=0.5, deadline=5.0)


@pytest.fixture(scope="module")
def store_url(sql_stores: Stores) -> str:
    return sql_stores.new_database("mariadb")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, store_url: str) -> Iterator[Cluster]:
    with group_cluster(tmp_path_factory, store_url, accounts=ACCOUNTS) as cluster:
        yield cluster


@pytest.fixture
def peer(group: Cluster, tmp_path: Path) -> Iterator[Member]:
    """Member B: coordinator id c2, the same configuration as A's otherwise."""
    with peer_member(group, tmp_path) as member:
        yield member


def balances(group: Cluster, region: str) -> dict[int, int]:
    with group.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT id, balance FROM accounts")
        return {int(account): int(balance) for account, balance in cursor.fetchall()}


def test_a_client_of_both_members_carries_on_through_the_survivor(
    group: Cluster, peer: Member, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="twopc.client")
    a_address = group.coordinator_address
    tls = group.client_tls()
    applied: dict[int, str] = {}  # transfer k (k moves k from eu to us, account k % 9) -> txid

    def transfer(client: Client, k: int, account: int | None = None) -> str:
        """Transfer k, of k from eu to us on ``account`` (k % 9 by default); an unknown outcome
        is settled by looking it up (any member answers)."""
        request_id = f"failover-{k}"
        account = k % TRANSFER_ACCOUNTS if account is None else account
        work = {"eu": transfer_sql(-k, account), "us": transfer_sql(k, account)}
        try:
            txid = client.run(work, timeout=10, request_id=request_id).txid
        except OutcomeUnknown:
            info = client.get_transaction(request_id=request_id)
            if info.outcome.name != "COMMITTED":
                return ""
            txid = info.txid
        applied[k] = txid
        return txid

    with Client(
        [a_address, peer.address],
        tls=tls,
        insecure=tls is None,
        retry_policy=POLICY,
        rpc_timeout=10,
    ) as client:
        for k in range(1, 11):
            assert transfer(client, k).startswith("c1."), "A, the first endpoint, runs them"
        assert client.endpoint == a_address

        # An interactive transaction on A, left open across A's death.
        tx = client.begin(timeout=30)
        assert tx.endpoint == a_address
        tx.execute("eu", *transfer_sql(-1000, LOST_ACCOUNT)[0])

        group.kill("coordinator")  # SIGKILL, waits until A is gone
        killed = time.monotonic()
        txid = transfer(client, 11)
        took = time.monotonic() - killed
        print(f"\nSIGKILLed member: the next run() answered through the peer after {took:.2f} s")
        assert txid.startswith("c2."), "B ran it"
        assert took < POLICY.deadline
        assert client.endpoint == peer.address
        assert any(
            r.levelno == logging.WARNING
            and "failing over" in r.getMessage()
            and a_address in r.getMessage()
            and peer.address in r.getMessage()
            for r in caplog.records
        )

        # The transaction begun on A does not move to B: it is lost with A.
        with pytest.raises(Unavailable, match="the transaction is lost") as raised:
            tx.execute("us", *transfer_sql(1000, LOST_ACCOUNT)[0])
        assert a_address in raised.value.message
        with pytest.raises(Unavailable):
            tx.rollback()

        for k in range(12, 21):
            assert transfer(client, k).startswith("c2."), "the client stays on B"

        # B takes c1 over and rolls back what A left (the lost transaction's branch and its row
        # lock): the lost transaction's account takes a transfer again.
        wait_until(lambda: "takeover_finished" in peer.text(), 20, "B taking c1 over")
        assert transfer(client, 21, account=LOST_ACCOUNT).startswith("c2.")

    assert sorted(applied) == list(range(1, 22)), "every transfer acknowledged"
    wait_until(lambda: not prepared(group), 20, "nothing left prepared")
    expected_eu = dict.fromkeys(range(ACCOUNTS), INITIAL_BALANCE)
    expected_us = dict(expected_eu)
    for k in applied:
        account = LOST_ACCOUNT if k == 21 else k % TRANSFER_ACCOUNTS
        expected_eu[account] -= k
        expected_us[account] += k
    # Each acknowledged transfer exactly once, and nothing of the lost transaction.
    assert balances(group, "eu") == expected_eu
    assert balances(group, "us") == expected_us
