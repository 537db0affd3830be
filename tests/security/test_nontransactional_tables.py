"""Non-transactional tables (issue 10, finding 6): a write to an Aria, MyISAM or MEMORY table in
a branch stays when the branch rolls back, so an aborted transaction would stay applied there.
MariaDB gives no sign of it before XA PREPARE (only Aria warns, at PREPARE), so it cannot be
caught per branch in time: the agent refuses to start next to such a table in the schemas its
statements may touch, and starts no new branch when a later check finds one. Each case is
checked on MariaDB itself."""

from __future__ import annotations

from collections.abc import Iterator

import pymysql
import pytest
from structlog.testing import capture_logs

from participants.agent import Agent
from participants.calls import StatementRequest
from tests.security.support import DATABASE, MakeUser, readme_grants, refusal, root_rows, with_agent
from twopc.errors import FailedPrecondition
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.mariadb import MariaDBInstance, PlaygroundError

TABLE = "audit_log"


@pytest.fixture
def audit_log(security_mariadb: MariaDBInstance) -> Iterator[str]:
    """An InnoDB table in the agent's database, dropped after the test."""
    root_rows(security_mariadb, f"DROP TABLE IF EXISTS {TABLE}")
    root_rows(security_mariadb, f"CREATE TABLE {TABLE} (id INT PRIMARY KEY) ENGINE=InnoDB")
    yield TABLE
    root_rows(security_mariadb, f"DROP TABLE IF EXISTS {TABLE}")


@pytest.mark.parametrize("engine", ["Aria", "MyISAM", "MEMORY"])
def test_the_agent_refuses_to_start_next_to_a_non_transactional_table(
    security_mariadb: MariaDBInstance, make_user: MakeUser, audit_log: str, engine: str
) -> None:
    root_rows(security_mariadb, f"ALTER TABLE {audit_log} ENGINE={engine}")
    message = refusal(make_user(readme_grants()))
    assert f"`{DATABASE}`.`{audit_log}` ({engine})" in message
    assert f"ALTER TABLE `{DATABASE}`.`{audit_log}` ENGINE=InnoDB" in message
    assert 'nontransactional_tables = "warn"' in message


def test_with_warn_it_starts_and_this_is_what_it_warns_of(
    security_mariadb: MariaDBInstance, make_user: MakeUser, audit_log: str
) -> None:
    """The hazard itself: an insert into an Aria table survives its branch's rollback."""
    root_rows(security_mariadb, f"ALTER TABLE {audit_log} ENGINE=Aria")
    user = make_user(readme_grants(), nontransactional_tables="warn")
    insert = [StatementRequest(f"INSERT INTO {audit_log} (id) VALUES (1)", [])]

    async def rolled_back(agent: Agent) -> None:
        await agent.execute("sec.r-aria-1", "eu", insert, 1, 30_000)
        await agent.rollback("sec.r-aria-1", "eu")

    with capture_logs() as logs:
        with_agent(user, rolled_back)
    (warning,) = [e for e in logs if e["event"] == "database_checks_failed_warn_only"]
    assert f"`{DATABASE}`.`{audit_log}` (Aria)" in warning["problem"]
    assert root_rows(security_mariadb, f"SELECT id FROM {audit_log}") == [(1,)]


def test_a_table_altered_while_it_runs_stops_new_branches_until_fixed(
    security_mariadb: MariaDBInstance, make_user: MakeUser, audit_log: str
) -> None:
    insert = [StatementRequest(f"INSERT INTO {audit_log} (id) VALUES (2)", [])]

    async def run(agent: Agent) -> None:
        root_rows(security_mariadb, f"ALTER TABLE {audit_log} ENGINE=Aria")
        await agent.check_database()
        with pytest.raises(FailedPrecondition, match=rf"`{audit_log}` \(Aria\)"):
            await agent.execute("sec.r-altered-1", "eu", insert, 1, 30_000)
        assert root_rows(security_mariadb, f"SELECT id FROM {audit_log}") == []

        root_rows(security_mariadb, f"ALTER TABLE {audit_log} ENGINE=InnoDB")
        await agent.check_database()
        await agent.execute("sec.r-altered-2", "eu", insert, 1, 30_000)
        await agent.rollback("sec.r-altered-2", "eu")

    with_agent(make_user(readme_grants()), run)
    assert root_rows(security_mariadb, f"SELECT id FROM {audit_log}") == []


def test_enforce_storage_engine_makes_the_server_refuse_other_engines(
    security_mariadb: MariaDBInstance,
) -> None:
    """What the README recommends to close the window between two checks."""
    root_rows(security_mariadb, "SET GLOBAL enforce_storage_engine = 'InnoDB'")
    try:
        with security_mariadb.connect(DATABASE) as conn, conn.cursor() as cursor:
            for sql in (
                f"CREATE TABLE {TABLE}_aria (id INT PRIMARY KEY) ENGINE=Aria",
                f"CREATE TABLE {TABLE}_memory (id INT PRIMARY KEY) ENGINE=MEMORY",
            ):
                with pytest.raises(pymysql.err.OperationalError) as caught:
                    cursor.execute(sql)
                assert caught.value.args[0] == 1290
    finally:
        root_rows(security_mariadb, "SET GLOBAL enforce_storage_engine = NULL")


def test_a_playground_agent_refuses_to_start_next_to_a_non_transactional_table(
    live_cluster: Cluster,
) -> None:
    """The real daemon, as the playground runs it: it exits, saying why."""
    agent = live_cluster.component("agent-eu")
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY) ENGINE=Aria")
    try:
        with open(agent.log, "rb") as log:
            log.seek(0, 2)
            with pytest.raises(PlaygroundError, match="exited while starting"):
                live_cluster.restart("agent-eu", timeout=30)
            said = log.read().decode()
        assert "agent_cannot_start" in said
        assert f"`twopc`.`{TABLE}` (Aria)" in said
    finally:
        with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        live_cluster.restart("agent-eu")
