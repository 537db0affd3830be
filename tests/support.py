"""What tests read straight from the databases: balances, marker rows, prepared branches."""

from __future__ import annotations

from coordinator.playground.cluster import Cluster
from coordinator.playground.invariants import committed_markers, prepared_branches


def balance(cluster: Cluster, region: str, account: int) -> int:
    with cluster.mysql(region) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT balance FROM accounts WHERE id = %s", [account])
        row = cursor.fetchone()
    assert row is not None, f"no account {account} in {region}"
    return int(row[0])


def markers(cluster: Cluster, txid: str) -> set[str]:
    """The regions where ``txid``'s branch committed."""
    return {region for region, txids in committed_markers(cluster, [txid]).items() if txid in txids}


def prepared(cluster: Cluster) -> dict[str, list[str]]:
    return {region: txids for region, txids in prepared_branches(cluster).items() if txids}


def transfer_sql(amount: int, account: int) -> list[tuple[str, list[int]]]:
    return [("UPDATE accounts SET balance = balance + %s WHERE id = %s", [amount, account])]
