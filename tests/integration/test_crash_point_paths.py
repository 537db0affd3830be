"""The agent's crash points sit on the path production runs, and arming one changes nothing there
but a pause: the same SQL statements reach the server in the same order, armed or not.

Each flow runs twice on an agent in this process, against a throwaway MariaDB whose general log
records what every session sent: once with no point armed, once with all four agent points
armed (``print``, or a ``sleep`` that yields to the event loop). The statements of the branch's
session are compared, and so are the round trips they went in: unarmed, the one-trip prepare is
one round trip; armed, it is cut at each point and still the one-trip path (a step-by-step
prepare would send XA START and each statement alone). Every point must have fired where it
applies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from participants.agent import Agent
from participants.calls import StatementRequest
from participants.config import AgentConfig
from participants.daemon import build_pool
from tests.support import AGENT_ENVIRON
from twopc.failpoints import Failpoints
from twopc.testing.playground.mariadb import AGENT_USER, MariaDBInstance
from twopc.txid import Xid
from twopc.votes import Vote

REGION = "eu"
TABLE = "crash_point_paths"
POINTS = ("agent.mid_statement", "agent.after_end", "agent.after_prepare", "agent.after_commit")
STATEMENTS = [
    StatementRequest(f"INSERT INTO {TABLE} (v) VALUES (1)", []),
    StatementRequest(f"UPDATE {TABLE} SET v = v + 1 WHERE v < 0", []),  # writes nothing
]
START, S1, S2 = "XA START <xid>", STATEMENTS[0].sql, STATEMENTS[1].sql
MARKER, END, PREPARE, COMMIT = "<marker>", "XA END <xid>", "XA PREPARE <xid>", "XA COMMIT <xid>"
ONE_PHASE = "XA COMMIT <xid> ONE PHASE"

Flow = Callable[[Agent, str], Awaitable[None]]


async def one_trip_prepare(agent: Agent, txid: str) -> None:
    vote = await agent.prepare(txid, REGION, STATEMENTS, 1, 30_000)
    assert vote.vote is Vote.PREPARED, vote
    await agent.commit(txid, REGION, one_phase=False)


async def step_by_step_prepare(agent: Agent, txid: str) -> None:
    await agent.execute(txid, REGION, STATEMENTS, 1, 30_000)
    vote = await agent.prepare(txid, REGION, [], 0, 30_000)
    assert vote.vote is Vote.PREPARED, vote
    await agent.commit(txid, REGION, one_phase=False)


async def one_phase_commit(agent: Agent, txid: str) -> None:
    await agent.commit(txid, REGION, one_phase=True, statements=STATEMENTS, sequence=1)


# flow -> (its round trips unarmed, its round trips armed, how often each point fires)
FLOWS: dict[str, tuple[Flow, list[list[str]], list[list[str]], dict[str, int]]] = {
    "one_trip_prepare": (
        one_trip_prepare,
        [[START, S1, S2, MARKER, END, PREPARE], [COMMIT]],
        [[START], [S1], [S2, MARKER, END], [PREPARE], [COMMIT]],
        dict(zip(POINTS, (2, 1, 1, 1), strict=True)),
    ),
    "step_by_step_prepare": (
        step_by_step_prepare,
        [[START], [S1], [S2], [MARKER, END, PREPARE], [COMMIT]],
        [[START], [S1], [S2], [MARKER, END], [PREPARE], [COMMIT]],
        dict(zip(POINTS, (2, 1, 1, 1), strict=True)),
    ),
    "one_phase_commit": (
        one_phase_commit,
        [[START], [S1], [S2], [MARKER, END, ONE_PHASE]],
        [[START], [S1], [S2], [MARKER, END], [ONE_PHASE]],
        dict(zip(POINTS, (2, 1, 0, 1), strict=True)),
    ),
}


@pytest.fixture(scope="module")
def database(scratch_mariadb: MariaDBInstance) -> MariaDBInstance:
    with scratch_mariadb.connect("twopc") as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
    return scratch_mariadb


@pytest.mark.parametrize("action", ["print", "sleep(20)"])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_arming_a_point_changes_no_statement(
    database: MariaDBInstance, flow: str, action: str
) -> None:
    run, unarmed_trips, armed_trips, fired = FLOWS[flow]
    config = AgentConfig(
        name=REGION,
        mysql_host=database.host,
        mysql_port=database.port,
        mysql_user=AGENT_USER,
        coordinator_ids=("paths",),
    )
    failpoints = Failpoints()
    tag = f"{flow.replace('_', '-')}-{action[:5]}"
    unarmed, armed = f"paths.r-{tag}-unarmed", f"paths.r-{tag}-armed"

    async def both() -> None:
        agent = Agent(config, build_pool(config, AGENT_ENVIRON), failpoints=failpoints)
        await agent.start()
        try:
            await run(agent, unarmed)
            assert all(point.fired == 0 for point in failpoints.snapshot())
            for point in POINTS:
                failpoints.set(point, action)
            await run(agent, armed)
        finally:
            await agent.close()

    asyncio.run(both())

    assert _shape(_sent(database, unarmed)) == unarmed_trips
    assert _shape(_sent(database, armed)) == armed_trips
    assert _flat(_sent(database, armed)) == _flat(_sent(database, unarmed))
    assert {p.name: p.fired for p in failpoints.snapshot() if p.name in POINTS} == fired


def _sent(database: MariaDBInstance, txid: str) -> list[list[str]]:
    """What the session of ``txid``'s branch sent, from its XA START to the last statement that
    names the branch: one list of statements per round trip, the branch's XID and its gtrid
    written as placeholders (so that two runs compare)."""
    xid = Xid(txid, REGION)
    hexed = xid.gtrid.hex()
    with database.connect() as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT thread_id FROM mysql.general_log WHERE command_type = 'Query' "
            "AND argument LIKE %s",
            [f"%XA START X'{hexed}'%"],
        )
        rows = cursor.fetchall()
        assert len(rows) == 1, f"{txid} started {len(rows)} times"
        cursor.execute(
            "SELECT argument FROM mysql.general_log WHERE command_type = 'Query' "
            "AND thread_id = %s",
            [rows[0][0]],
        )
        sent = [_text(row[0]) for row in cursor.fetchall()]
    first = next(i for i, query in enumerate(sent) if f"XA START X'{hexed}'" in query)
    last = max(i for i, query in enumerate(sent) if hexed in query)
    return [
        [s.strip().replace(xid.sql(), "<xid>").replace(hexed, "<gtrid>") for s in query.split(";")]
        for query in sent[first : last + 1]
    ]


def _shape(trips: list[list[str]]) -> list[list[str]]:
    """``trips`` with the marker row's INSERT (it names the agent instance) as ``<marker>``."""
    return [
        [MARKER if s.startswith("INSERT INTO `twopc_branch_marker`") else s for s in trip]
        for trip in trips
    ]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _flat(trips: list[list[str]]) -> list[str]:
    return [statement for trip in trips for statement in trip]
