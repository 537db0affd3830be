"""Nothing of one transaction meets the next on an agent's pooled session (issue 10, finding 7).

A GET_LOCK taken in one transaction stayed held after it, and ``SELECT ... INTO @v`` could be
read by a later transaction, whoever sent it: the agent's sessions are pooled. The statement
guard now refuses user-level locks and user variables (tests/security/test_statement_paths.py).
What the guard cannot see (a stored function or a trigger that takes a lock or sets a variable,
an INSERT's LAST_INSERT_ID) is undone by the agent: it resets such a session (MariaDB's
COM_RESET_CONNECTION) before it returns to the pool, and sets the pool's session settings again.

The functions below are a DBA's, created for the test: a client can call them, and they do what
the guard refuses in a client's own SQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import AGENT_SETTINGS
from twopc.client import Client, Transaction
from twopc.testing.playground.cluster import DATABASE, Cluster, wait_until
from twopc.testing.playground.mariadb import AGENT_USER
from twopc.values import SqlValue

LOCK = "twopc-security-lock"
REGION = "eu"
SETTINGS = (
    "@@innodb_lock_wait_timeout, @@wait_timeout, @@autocommit, @@sql_mode, "
    "@@character_set_client, @@character_set_connection, @@character_set_results, "
    "@@collation_connection, @@tx_isolation"
)


@pytest.fixture(scope="module")
def functions(cluster: Cluster) -> Iterator[None]:
    ddl = [
        "CREATE OR REPLACE FUNCTION take_lock(name VARCHAR(64)) RETURNS INT "
        "RETURN GET_LOCK(name, 0)",
        "CREATE OR REPLACE FUNCTION remember(v INT) RETURNS INT BEGIN SET @remembered = v; "
        "RETURN v; END",
        "CREATE OR REPLACE FUNCTION recall() RETURNS INT RETURN @remembered",
        "CREATE TABLE IF NOT EXISTS numbered (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
    ]
    # The DBA lets the agent's least-privilege user call them, as an application's DBA would.
    grants = [
        f"GRANT EXECUTE ON FUNCTION {DATABASE}.{name} TO {AGENT_USER}@'127.0.0.1'"
        for name in ("take_lock", "remember", "recall")
    ]
    with cluster.mysql(REGION) as conn, conn.cursor() as cursor:
        for statement in [*ddl, *grants]:
            cursor.execute(statement)
    yield
    with cluster.mysql(REGION) as conn, conn.cursor() as cursor:
        for name in ("take_lock", "remember", "recall"):
            cursor.execute(f"DROP FUNCTION IF EXISTS {name}")
        cursor.execute("DROP TABLE IF EXISTS numbered")


def run(client: Client, sql: str) -> tuple[SqlValue, ...]:
    """``sql`` (a one-row SELECT) in a transaction of its own on the region; its row, and the
    id of the database session that ran it last."""
    with client.transaction(timeout=10) as tx:
        result = tx.execute(REGION, f"{sql}, CONNECTION_ID()")
    return result.rows[0]


def run_on_session(client: Client, sql: str, session: SqlValue) -> tuple[SqlValue, ...]:
    """``sql`` run on database session ``session`` once the agent's pool lends it again.

    The pool lends its most recently returned session first, so a session returned while another
    transaction runs can sit under the one in use for ever. Transactions held open at once, one
    more than the pool keeps idle, make the pool lend every idle session; this repeats until
    ``session`` is among them (its reset may still be running when a round starts)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held: list[Transaction] = []
        try:
            for _ in range(AGENT_SETTINGS["pool_size"] + 1):
                tx = client.begin(timeout=10)
                held.append(tx)
                row = tx.execute(REGION, f"{sql}, CONNECTION_ID()").rows[0]
                if row[-1] == session:
                    return row[:-1]
        finally:
            for tx in held:
                tx.rollback()
    raise AssertionError(f"the agent's pool never lent session {session} again")


def lock_holder(cluster: Cluster) -> SqlValue:
    with cluster.mysql(REGION) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT IS_USED_LOCK(%s)", [LOCK])
        row = cursor.fetchone()
    return row[0] if row else None


@pytest.mark.usefixtures("functions")
def test_a_lock_taken_by_a_function_is_released_when_the_transaction_ends(
    live_cluster: Cluster, client: Client
) -> None:
    taken, session = run(client, f"SELECT take_lock('{LOCK}')")
    assert taken == 1
    # Held by the agent's session until the pool resets it, which it does as soon as the
    # session is back: without the reset, the idle session would hold it for good.
    wait_until(lambda: lock_holder(live_cluster) is None, 5.0, "the lock released")
    # And the next transaction on that session can take it again.
    assert run_on_session(client, f"SELECT take_lock('{LOCK}')", session) == (1,)
    wait_until(lambda: lock_holder(live_cluster) is None, 5.0, "the lock released again")


@pytest.mark.usefixtures("functions")
def test_a_user_variable_set_by_a_function_is_gone_for_the_next_transaction(
    client: Client,
) -> None:
    remembered, session = run(client, "SELECT remember(42)")
    assert remembered == 42
    assert run_on_session(client, "SELECT recall()", session) == (None,)


@pytest.mark.usefixtures("functions")
def test_an_inserts_last_insert_id_is_gone_for_the_next_transaction(client: Client) -> None:
    with client.transaction(timeout=10) as tx:
        tx.execute(REGION, "INSERT INTO numbered (v) VALUES (1)")
        inserted, session = tx.execute(REGION, "SELECT LAST_INSERT_ID(), CONNECTION_ID()").rows[0]
    assert isinstance(inserted, int)
    assert inserted > 0
    assert run_on_session(client, "SELECT LAST_INSERT_ID()", session) == (0,)


@pytest.mark.usefixtures("functions")
def test_a_reset_session_has_the_settings_of_a_new_one(client: Client) -> None:
    """COM_RESET_CONNECTION takes session variables back to the global values: the pool sets
    its own again (lock wait timeout, idle timeout, sql_mode, character set, autocommit)."""
    *before, session = run(client, f"SELECT {SETTINGS}")
    assert before[:3] == [5, 600, 1]  # the cluster's agents: lock_wait_timeout_s = 5
    assert before[4:8] == ["utf8mb4", "utf8mb4", "utf8mb4", "utf8mb4_general_ci"]
    assert run_on_session(client, "SELECT remember(7)", session) == (7,)
    assert list(run_on_session(client, f"SELECT {SETTINGS}", session)) == before
