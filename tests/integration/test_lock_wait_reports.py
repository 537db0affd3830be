"""The agent's lock wait reports (WaitsFor) on a MariaDB of its own: no SQL at all while no branch
waits, the INNODB_LOCK_WAITS query on an admin session (never a branch's) once one does, edges
that name both ends by txid, and a holder that is no branch of the agent (another client's
session) reported as unknown with its session id. Statements are counted in the server's general
log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from participants.agent import Agent
from participants.calls import StatementRequest
from participants.config import AgentConfig
from participants.daemon import build_pool
from tests.support import AGENT_ENVIRON
from twopc.errors import TwopcError
from twopc.testing.playground.mariadb import AGENT_USER, LOOPBACK, MariaDBInstance
from twopc.txid import Xid

pytestmark = pytest.mark.timeout(30)

TABLE = "lock_wait_reports"
QUERY_MARK = "INNODB_LOCK_WAITS"


def _queries(database: MariaDBInstance) -> list[int]:
    """The session ids that sent the lock waits query, one per time sent."""
    with database.connect() as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT thread_id FROM mysql.general_log WHERE command_type = 'Query' "
            "AND argument LIKE %s AND argument NOT LIKE %s",
            [f"%{QUERY_MARK}%", "%general_log%"],
        )
        return [int(row[0]) for row in cursor.fetchall()]


@pytest.fixture
def database(scratch_mariadb: MariaDBInstance) -> Iterator[MariaDBInstance]:
    """The scratch server with two rows to wait for, and PROCESS for the agent's user (what
    report_lock_waits needs) during this test only: the fixture's other users run without."""
    account = f"`{AGENT_USER}`@`{LOOPBACK}`"
    with scratch_mariadb.connect("twopc") as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
        cursor.execute(f"INSERT INTO {TABLE} VALUES (1, 0), (2, 0)")
        cursor.execute(f"GRANT PROCESS ON *.* TO {account}")
    try:
        yield scratch_mariadb
    finally:
        with scratch_mariadb.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"REVOKE PROCESS ON *.* FROM {account}")


def test_lock_waits_are_read_only_when_a_branch_waits(database: MariaDBInstance) -> None:
    config = AgentConfig(
        name="eu",
        mysql_host=database.host,
        mysql_port=database.port,
        mysql_user=AGENT_USER,
        coordinator_ids=("waits",),
        report_lock_waits=True,
    )
    before = len(_queries(database))
    update = StatementRequest(f"UPDATE {TABLE} SET v = v + 1 WHERE id = %s", [1])

    async def scenario() -> tuple[list[object], list[object], int, float]:
        agent = Agent(config, build_pool(config, AGENT_ENVIRON))
        await agent.start()
        holder = database.connect("twopc")
        try:
            # A branch that holds row 1 and one that runs nothing: nobody waits, no SQL.
            await agent.execute("waits.r-holder", "eu", [update], 1, 30_000)
            idle = await agent.waits_for(0)
            assert idle == []
            assert len(_queries(database)) == before
            # A branch waits for the holder branch: both named.
            waiting = asyncio.create_task(
                agent.execute("waits.r-waiter", "eu", [update], 1, 30_000)
            )
            named = await _reported(agent)
            await agent.rollback("waits.r-holder", "eu")  # interrupts nothing: it is not running
            await waiting
            # Another client's session holds row 2: reported as an unknown holder.
            with holder.cursor() as cursor:
                cursor.execute("BEGIN")
                cursor.execute(f"SELECT v FROM {TABLE} WHERE id = 2 FOR UPDATE")
            other = StatementRequest(f"UPDATE {TABLE} SET v = v + 1 WHERE id = %s", [2])
            blocked = asyncio.create_task(agent.execute("waits.r-other", "eu", [other], 1, 30_000))
            unknown = await _reported(agent)
            # Rolling the waiting branch back interrupts its statement (KILL QUERY) at once.
            await agent.rollback("waits.r-other", "eu")
            started = time.monotonic()
            with pytest.raises(TwopcError):
                await blocked
            interrupted_in = time.monotonic() - started
            with holder.cursor() as cursor:
                cursor.execute("ROLLBACK")
            await agent.rollback("waits.r-waiter", "eu")
            return named, unknown, holder.thread_id(), interrupted_in
        finally:
            holder.close()
            await agent.close()

    named, unknown, holder_thread, interrupted_in = asyncio.run(scenario())
    assert interrupted_in < 1.0  # not innodb_lock_wait_timeout (10 s): KILL QUERY ended it
    assert [(e.waiter_txid, e.holder_txid) for e in named] == [("waits.r-waiter", "waits.r-holder")]  # type: ignore[attr-defined]
    assert [(e.waiter_txid, e.holder_txid, e.holder_thread_id) for e in unknown] == [  # type: ignore[attr-defined]
        ("waits.r-other", "", holder_thread)
    ]
    sessions = _queries(database)[before:]
    assert sessions, "the lock waits query was never sent"
    branches = {
        _branch_session(database, txid)
        for txid in ("waits.r-holder", "waits.r-waiter", "waits.r-other")
    }
    assert not branches & set(sessions), "the lock waits query ran on a branch's session"


def _branch_session(database: MariaDBInstance, txid: str) -> int:
    hexed = Xid(txid, "eu").gtrid.hex()
    with database.connect() as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT thread_id FROM mysql.general_log WHERE command_type = 'Query' "
            "AND argument LIKE %s",
            [f"%XA START X'{hexed}'%"],
        )
        [(thread,)] = cursor.fetchall()
        return int(thread)


async def _reported(agent: Agent) -> list[object]:
    """WaitsFor until it names an edge (InnoDB's view of lock waits lags by up to 0.1 s)."""
    for _ in range(100):
        edges = await agent.waits_for(0)
        if edges:
            return list(edges)
        await asyncio.sleep(0.02)
    raise AssertionError("no lock wait reported within 2 s")
