"""What the security tier's tests share: the agent's database users they make, the README's
GRANTs, and agents started in this process as those users."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from participants.agent import Agent
from participants.config import AgentConfig
from participants.daemon import build_agent
from twopc.errors import FailedPrecondition
from twopc.failpoints import Failpoints
from twopc.testing.playground.mariadb import MariaDBInstance

DATABASE = "twopc"
OTHER_SCHEMA = "billing"  # a schema beyond the agent's: nothing may reach it
README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class DbUser:
    """A database user made for one test: ``account`` as SQL writes it, and an agent
    configuration (and the environment with its password) that connects as it."""

    name: str
    account: str
    config: AgentConfig
    environ: dict[str, str]


class MakeUser(Protocol):
    """``make_user``: a user with these GRANT statements (``{user}`` stands for the account),
    and an agent configuration for it (``settings`` over the defaults)."""

    def __call__(self, grants: Sequence[str], **settings: object) -> DbUser: ...


def readme_grants() -> list[str]:
    """The MariaDB GRANT statements of the README's section on the agent's user, for the
    database ``twopc`` and the user ``{user}``."""
    section = README.read_text().split("### The agent's database user", 1)[1]
    block = section.split("```sql\n", 1)[1].split("```", 1)[0]
    grants = [line.rstrip(";") for line in block.splitlines() if line.startswith("GRANT")]
    assert grants, "no GRANT statement in the README's section"
    return [g.replace("'twopc_agent'@'%'", "{user}").replace("shop", DATABASE) for g in grants]


async def started(user: DbUser) -> Agent:
    agent = build_agent(user.config, user.environ, Failpoints())
    try:
        await agent.start()
    except BaseException:
        await agent.close()
        raise
    return agent


def refusal(user: DbUser) -> str:
    """The message of the agent's refusal to start as ``user``."""

    async def start() -> str:
        with pytest.raises(FailedPrecondition) as caught:
            await (await started(user)).close()
        return caught.value.message

    return asyncio.run(start())


async def _nothing(agent: Agent) -> None:
    return None


def with_agent(user: DbUser, work: Callable[[Agent], Awaitable[None]] = _nothing) -> None:
    """Starts an agent as ``user``, runs ``work`` with it, and closes it."""

    async def run() -> None:
        agent = await started(user)
        try:
            await work(agent)
        finally:
            await agent.close()

    asyncio.run(run())


def root_rows(db: MariaDBInstance, sql: str) -> list[tuple[object, ...]]:
    """``sql`` run as root in the agent's database; its rows."""
    with db.connect(DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())
