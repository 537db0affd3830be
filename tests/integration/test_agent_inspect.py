"""What an agent answers to Inspect: the server's word over its own memory of a rollback.

A chaos run (seed 3, 2 regions, the relay's faults in the draw) found a one-phase transfer
committed on its database while the coordinator's lookup answered "aborted": the commit's
connection broke under a cut link, the coordinator's rollback reached the agent, which wrote a
tombstone (to refuse the request if it was still on its way) and could not reach the server;
Inspect then answered the tombstone. An agent in this process, on a throwaway MariaDB.
"""

from __future__ import annotations

import asyncio

from coordinator.engine.ports import Presence
from participants.agent import Agent
from participants.branches import BranchState, FinishedBranch
from participants.calls import StatementRequest
from participants.config import AgentConfig
from participants.daemon import build_pool
from tests.support import AGENT_ENVIRON
from twopc.testing.playground.mariadb import AGENT_USER, MariaDBInstance

REGION = "eu"
TABLE = "inspect_rows"


def _agent(database: MariaDBInstance) -> Agent:
    config = AgentConfig(
        name=REGION,
        mysql_host=database.host,
        mysql_port=database.port,
        mysql_user=AGENT_USER,
        coordinator_ids=("inspect",),
    )
    return Agent(config, build_pool(config, AGENT_ENVIRON))


def test_a_tombstone_does_not_hide_a_commit_that_landed(scratch_mariadb: MariaDBInstance) -> None:
    with scratch_mariadb.connect("twopc") as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id INT AUTO_INCREMENT PRIMARY KEY)")
    landed, rolled_back = "inspect.r-landed", "inspect.r-rolled-back"

    async def scenario() -> dict[str, object]:
        agent = _agent(scratch_mariadb)
        await agent.start()
        try:
            insert = [StatementRequest(f"INSERT INTO {TABLE} () VALUES ()", [])]
            await agent.commit(landed, REGION, one_phase=True, statements=insert, sequence=1)
            # What a rollback that could not reach the server leaves: a tombstone.
            agent._registry.remember(
                landed, FinishedBranch(BranchState.ROLLED_BACK, "rolled back on request", False)
            )
            await agent.execute(rolled_back, REGION, insert, 1, 30_000)
            await agent.rollback(rolled_back, REGION)
            return await agent.inspect([landed, rolled_back])
        finally:
            await agent.close()

    answers = asyncio.run(scenario())
    assert answers == {landed: Presence.COMMITTED, rolled_back: Presence.ROLLED_BACK}
