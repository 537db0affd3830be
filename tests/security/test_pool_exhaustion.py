"""An agent whose pool is all in use answers a new branch RESOURCE_EXHAUSTED, naming the settings
that bound it, with nothing started (it used to answer UNAVAILABLE, "could not start the
branch: (0) no free database connection", which the coordinator took for an unreachable agent
and aborted the whole transaction)."""

from __future__ import annotations

import pytest

from participants.agent import Agent
from participants.calls import StatementRequest
from tests.security.support import MakeUser, readme_grants, with_agent
from twopc.errors import ResourceExhausted
from twopc.votes import Presence

SELECT = [StatementRequest("SELECT 1", [])]


def test_a_full_pool_is_resource_exhausted_and_starts_nothing(make_user: MakeUser) -> None:
    user = make_user(readme_grants(), pool_size=1, pool_overflow=0, pool_checkout_timeout_s=0.3)

    async def work(agent: Agent) -> None:
        await agent.execute("sec.r-pool-holder", "eu", SELECT, 1, 30_000)
        for start in (
            lambda: agent.execute("sec.r-pool-late", "eu", SELECT, 1, 30_000),
            lambda: agent.prepare("sec.r-pool-late", "eu", SELECT, 1, 30_000),
        ):
            with pytest.raises(ResourceExhausted) as refused:
                await start()
            message = refused.value.message
            assert "pool_size + pool_overflow" in message
            assert "pool_checkout_timeout_s" in message
            assert "nothing was started" in message
        await agent.rollback("sec.r-pool-holder", "eu")
        states = await agent.inspect(["sec.r-pool-late"])
        assert states["sec.r-pool-late"] is Presence.UNKNOWN

    with_agent(user, work)
