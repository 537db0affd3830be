"""Distributed transactions on real MariaDB regions, through the SDK, a real coordinator and agents.

Every outcome is checked on the databases themselves: balances, marker rows (which branch
committed) and XA RECOVER (nothing left prepared; the ``live_cluster`` fixture checks that too).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import balance, markers, prepared, transfer_sql
from twopc.client import (
    Client,
    InvalidArgument,
    NotFound,
    Outcome,
    StatementFailed,
    TransactionAborted,
    TransactionState,
)
from twopc.testing.playground.cluster import Cluster, wait_until

DUPLICATE_KEY = 1062


def test_commit_across_three_participants(live_cluster: Cluster, client: Client, bank: int) -> None:
    with client.transaction(timeout=5) as tx:
        before = tx.execute("eu", "SELECT balance FROM accounts WHERE id = %s", [1]).scalar()
        tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = %s", [30, 1])
        tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [10, 2])
        tx.execute("ap", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [20, 3])

    assert before == 1000
    assert tx.state in (TransactionState.COMMITTING, TransactionState.COMMITTED)
    wait_until(lambda: markers(live_cluster, tx.txid) == {"eu", "us", "ap"}, 5, "phase 2")
    assert balance(live_cluster, "eu", 1) == 970
    assert balance(live_cluster, "us", 2) == 1010
    assert balance(live_cluster, "ap", 3) == 1020
    info = client.get_transaction(tx.txid)
    assert info.outcome is Outcome.COMMITTED
    assert not prepared(live_cluster)
    log_file = Path(live_cluster.component("coordinator").data_dir) / "decisions.log"
    assert tx.txid.encode() in log_file.read_bytes(), "a 2PC commit decision is logged"


def test_commit_waiting_for_phase2_is_applied_when_it_returns(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=5)
    tx.execute("eu", "UPDATE accounts SET balance = balance - 5 WHERE id = 0")
    tx.execute("us", "UPDATE accounts SET balance = balance + 5 WHERE id = 0")
    assert tx.commit(wait_for_phase2=True) is TransactionState.COMMITTED
    assert markers(live_cluster, tx.txid) == {"eu", "us"}
    assert not prepared(live_cluster)


def test_exception_in_block_rolls_back_everywhere(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="changed my mind"),
        client.transaction(timeout=5) as tx,
    ):
        tx.execute("eu", "UPDATE accounts SET balance = balance - 7 WHERE id = 4")
        tx.execute("ap", "UPDATE accounts SET balance = balance + 7 WHERE id = 4")
        raise RuntimeError("changed my mind")

    assert balance(live_cluster, "eu", 4) == 1000
    assert balance(live_cluster, "ap", 4) == 1000
    assert markers(live_cluster, tx.txid) == set()
    assert client.get_transaction(tx.txid).outcome is Outcome.ABORTED


def test_explicit_rollback_releases_row_locks(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=30)
    tx.execute("us", "UPDATE accounts SET balance = 0 WHERE id = 5")
    tx.rollback()
    # The row lock is gone: another transaction updates the row at once (lock wait would be 5 s).
    started = time.monotonic()
    client.run({"us": transfer_sql(1, 5)}, timeout=5)
    assert time.monotonic() - started < 2.0
    assert balance(live_cluster, "us", 5) == 1001


def test_duplicate_key_in_one_branch_votes_no_and_aborts_everywhere(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    work = {
        "eu": transfer_sql(-50, 6),
        "us": [("INSERT INTO accounts (id, balance) VALUES (%s, %s)", [6, 1])],  # id 6 exists
        "ap": transfer_sql(50, 6),
    }
    with pytest.raises(TransactionAborted) as caught:
        client.run(work, timeout=5, request_id="dup-key-vote")
    assert isinstance(caught.value, StatementFailed)
    assert caught.value.mysql_errno == DUPLICATE_KEY
    assert "us" in caught.value.message
    txid = caught.value.txid
    assert txid
    assert markers(live_cluster, txid) == set()
    assert balance(live_cluster, "eu", 6) == 1000
    assert balance(live_cluster, "ap", 6) == 1000
    assert client.get_transaction(request_id="dup-key-vote").outcome is Outcome.ABORTED


def test_failed_statement_aborts_the_interactive_transaction(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=5)
    tx.execute("eu", "UPDATE accounts SET balance = balance - 1 WHERE id = 7")
    with pytest.raises(StatementFailed) as caught:
        tx.execute("us", "INSERT INTO accounts (id, balance) VALUES (7, 0)")
    assert caught.value.mysql_errno == DUPLICATE_KEY
    with pytest.raises(TransactionAborted):
        tx.commit()
    assert balance(live_cluster, "eu", 7) == 1000
    assert client.get_transaction(tx.txid).outcome is Outcome.ABORTED


def test_deadline_aborts_and_releases_locks(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=0.5)
    tx.execute("eu", "UPDATE accounts SET balance = 0 WHERE id = 8")
    wait_until(
        lambda: client.get_transaction(tx.txid).outcome is Outcome.ABORTED,
        5,
        "the coordinator's reaper aborting the expired transaction",
    )
    with pytest.raises(TransactionAborted, match="deadline"):
        tx.commit()
    started = time.monotonic()
    client.run({"eu": transfer_sql(1, 8)}, timeout=5)
    assert time.monotonic() - started < 2.0
    assert balance(live_cluster, "eu", 8) == 1001


def test_single_participant_takes_the_one_phase_path(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    result = client.run({"ap": transfer_sql(9, 9)}, timeout=5)
    assert result.state is TransactionState.COMMITTED  # no phase 2: done when it returns
    assert markers(live_cluster, result.txid) == {"ap"}
    assert balance(live_cluster, "ap", 9) == 1009
    log_file = Path(live_cluster.component("coordinator").data_dir) / "decisions.log"
    logged = log_file.read_bytes() if log_file.exists() else b""
    assert result.txid.encode() not in logged, "a one-phase commit must not write the log"


def test_one_shot_statements_ending_in_comments_or_terminators_commit(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """The agent sends a one-shot branch to its database in one batch, one statement per line:
    a trailing comment or ';' of a client statement must not swallow the XA commands after it."""
    result = client.run(
        {
            "eu": [
                ("SELECT balance FROM accounts WHERE id = %s; -- look first", [7]),
                ("UPDATE accounts SET balance = balance - %s WHERE id = %s -- take", [40, 7]),
            ],
            "us": [("UPDATE accounts SET balance = balance + %s WHERE id = %s; # give", [40, 7])],
        },
        timeout=5,
        wait_for_phase2=True,
    )
    assert result.results["eu"][0].rows == [(1000,)]
    assert result.results["eu"][1].affected_rows == 1
    assert result.results["us"][0].affected_rows == 1
    assert markers(live_cluster, result.txid) == {"eu", "us"}
    assert balance(live_cluster, "eu", 7) == 960
    assert balance(live_cluster, "us", 7) == 1040


def test_failing_statement_inside_a_one_shot_is_named_and_undoes_the_ones_before(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """The second of three statements fails: the first is rolled back with the branch, the
    third never runs, and the rows are free at once."""
    work = {
        "eu": [
            ("UPDATE accounts SET balance = balance - %s WHERE id = %s", [25, 8]),
            ("INSERT INTO accounts (id, balance) VALUES (%s, %s)", [8, 1]),  # id 8 exists
            ("UPDATE accounts SET balance = balance - %s WHERE id = %s", [25, 9]),
        ],
        "us": transfer_sql(50, 8),
    }
    with pytest.raises(StatementFailed) as caught:
        client.run(work, timeout=5)
    assert caught.value.mysql_errno == DUPLICATE_KEY
    assert "statement 2 failed" in caught.value.message
    assert markers(live_cluster, caught.value.txid) == set()
    assert balance(live_cluster, "eu", 8) == 1000
    assert balance(live_cluster, "eu", 9) == 1000
    assert balance(live_cluster, "us", 8) == 1000
    # Read once phase 2 is through: the answer comes when the decision is durable.
    client.run(
        {"eu": transfer_sql(1, 8), "us": transfer_sql(-1, 8)}, timeout=2, wait_for_phase2=True
    )
    assert balance(live_cluster, "eu", 8) == 1001


def test_read_only_branch_leaves_phase_two(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    result = client.run(
        {
            "eu": [("SELECT balance FROM accounts WHERE id = %s FOR UPDATE", [1])],
            "us": transfer_sql(3, 1),
        },
        timeout=5,
        wait_for_phase2=True,
    )
    assert result.results["eu"][0].rows == [(1000,)]
    assert markers(live_cluster, result.txid) == {"us"}  # the read-only branch wrote no marker
    assert balance(live_cluster, "us", 1) == 1003


def test_refused_statement_leaves_the_transaction_usable(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    tx = client.begin(timeout=5)
    tx.execute("eu", "UPDATE accounts SET balance = balance + 2 WHERE id = 2")
    for sql in (
        "XA COMMIT 'x'",
        "COMMIT",
        "SET autocommit = 1",
        "DROP TABLE accounts",
        "SELECT 1; SELECT 2",
        "DELETE FROM twopc_branch_marker",
    ):
        with pytest.raises(InvalidArgument):
            tx.execute("eu", sql)
    tx.execute("us", "UPDATE accounts SET balance = balance - 2 WHERE id = 2")
    tx.commit(wait_for_phase2=True)
    assert balance(live_cluster, "eu", 2) == 1002
    assert balance(live_cluster, "us", 2) == 998


def test_refused_statement_in_a_one_shot_is_invalid_argument_and_nothing_applies(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    # The coordinator refuses it before starting anything (tests/integration/test_statement_check).
    with pytest.raises(InvalidArgument, match="no transaction was started") as caught:
        client.run(
            {"eu": transfer_sql(-4, 5), "us": [("UPDATE accounts SET balance = 0; COMMIT", [])]},
            timeout=5,
        )
    assert caught.value.txid == ""
    assert balance(live_cluster, "eu", 5) == 1000


def test_unknown_participant_and_transaction_are_named(client: Client, bank: int) -> None:
    with pytest.raises(NotFound, match="unknown participant 'mars'"):
        client.run({"mars": transfer_sql(1, 1)}, timeout=5)
    tx = client.begin(timeout=5)
    with pytest.raises(NotFound, match="mars"):
        tx.execute("mars", "SELECT 1")
    tx.rollback()
    with pytest.raises(InvalidArgument, match="not a twopc transaction id"):
        client.get_transaction("not-a-txid")
    with pytest.raises(NotFound, match="belongs to coordinator 'elsewhere'"):
        client.get_transaction("elsewhere.r-x")
