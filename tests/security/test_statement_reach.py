"""Statements reach no further than the application (issue 10, finding 6), through the
coordinator and straight to an agent: the playground's agents run as a least-privilege user, so
the database refuses what the statement guard lets through. Checked on MariaDB as root."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc
import pymysql
import pytest

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import Client, InvalidArgument, StatementFailed
from twopc.testing.playground.cluster import DATABASE, Cluster
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV, AGENT_USER
from twopc.testing.playground.tls import COORDINATOR

ER_TABLEACCESS_DENIED = 1142
_ids = itertools.count()


@pytest.fixture
def billing(live_cluster: Cluster) -> Iterator[str]:
    """A schema beside the agent's on ``eu``, with a row: ``billing.invoices``."""
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("CREATE DATABASE IF NOT EXISTS billing")
        cursor.execute("CREATE TABLE IF NOT EXISTS billing.invoices (id INT PRIMARY KEY, v INT)")
        cursor.execute("REPLACE INTO billing.invoices VALUES (1, 100)")
    yield "billing.invoices"
    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("DROP DATABASE billing")


def on_agent(cluster: Cluster, sql: str) -> pb.BranchExecuteResponse:
    """``sql`` straight to eu's agent, as a caller that skips the coordinator; its branch is
    rolled back afterwards."""
    txid = f"{cluster.coordinator_id}.r-reach-{next(_ids)}"
    with cluster.channel("agent-eu", identity=COORDINATOR) as channel:
        agent = pb_grpc.ParticipantStub(channel)
        try:
            return agent.Execute(
                pb.BranchExecuteRequest(
                    txid=txid,
                    participant="eu",
                    sequence=1,
                    timeout_ms=10_000,
                    statements=[pb.Statement(sql=sql)],
                ),
                timeout=10,
            )
        finally:
            agent.Rollback(pb.BranchRollbackRequest(txid=txid, participant="eu"), timeout=10)


def test_the_agents_connect_as_the_least_privilege_user(
    live_cluster: Cluster, client: Client
) -> None:
    asked = client.run(
        {region: [("SELECT CURRENT_USER()", [])] for region in live_cluster.regions}, timeout=10
    )
    users = {region: results[0].scalar() for region, results in asked.results.items()}
    assert users == dict.fromkeys(live_cluster.regions, f"{AGENT_USER}@127.0.0.1")
    for region in live_cluster.regions:
        with live_cluster.mysql(region) as conn, conn.cursor() as cursor:
            cursor.execute(f"SHOW GRANTS FOR '{AGENT_USER}'@'127.0.0.1'")
            grants = [line for (line,) in cursor.fetchall() if "USAGE" not in line]
        assert grants == [
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON `twopc`.* TO `{AGENT_USER}`@`127.0.0.1`",
            f"GRANT CREATE ON `twopc`.`twopc_branch_marker` TO `{AGENT_USER}`@`127.0.0.1`",
        ], region


def test_load_file_is_refused_and_would_give_nothing(live_cluster: Cluster, client: Client) -> None:
    """Two walls: the statement guard refuses LOAD_FILE on every path, and behind it the agent's
    database user has no FILE right, so the server would answer NULL."""
    sql = "SELECT LOAD_FILE('/etc/passwd')"
    with pytest.raises(InvalidArgument, match="LOAD_FILE"):
        client.run({"eu": [(sql, [])]}, timeout=10)
    with pytest.raises(InvalidArgument, match="LOAD_FILE"):
        client.run({"eu": [(sql, [])], "us": [(sql, [])]}, timeout=10)
    with client.transaction(timeout=10) as tx, pytest.raises(InvalidArgument, match="LOAD_FILE"):
        tx.execute("ap", sql)
    with pytest.raises(grpc.RpcError) as refused:
        on_agent(live_cluster, sql)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    agent = live_cluster.component("agent-eu")
    host, port = live_cluster.component("mariadb-eu").address.rsplit(":", 1)
    with (
        pymysql.connect(
            host=host,
            port=int(port),
            user=AGENT_USER,
            password=agent.env[AGENT_PASSWORD_ENV],
            database=DATABASE,
            connect_timeout=5,
        ) as conn,
        conn.cursor() as cursor,
    ):
        cursor.execute(sql)
        assert cursor.fetchall() == ((None,),)


READS_BEYOND = [
    pytest.param("SELECT COUNT(*) FROM mysql.global_priv", id="mysql-global-priv"),
    pytest.param("SELECT User, Host FROM mysql.user", id="mysql-user"),
    pytest.param("SELECT v FROM billing.invoices", id="other-schema"),
    pytest.param(
        "SELECT a.id FROM accounts a JOIN billing.invoices b ON b.id = a.id", id="joined-in"
    ),
    pytest.param(
        "UPDATE accounts SET balance = (SELECT v FROM billing.invoices LIMIT 1) WHERE id = 1",
        id="read-in-a-write",
    ),
    pytest.param(
        "INSERT INTO mysql.help_topic (help_topic_id, name, help_category_id, description, "
        "example, url) VALUES (99999, 'twopc', 1, '', '', '')",
        id="insert-mysql",
    ),
    pytest.param("DELETE FROM billing.invoices", id="delete-other-schema"),
]


@pytest.mark.usefixtures("bank")
@pytest.mark.parametrize("sql", READS_BEYOND)
def test_mysql_and_other_schemas_are_out_of_reach(
    live_cluster: Cluster, client: Client, billing: str, sql: str
) -> None:
    with pytest.raises(StatementFailed) as one_region:
        client.run({"eu": [(sql, [])]}, timeout=10)
    assert one_region.value.mysql_errno == ER_TABLEACCESS_DENIED, one_region.value.message
    with pytest.raises(StatementFailed) as two_regions:
        client.run({"us": [("SELECT 1", [])], "eu": [(sql, [])]}, timeout=10)
    assert two_regions.value.mysql_errno == ER_TABLEACCESS_DENIED
    with pytest.raises(grpc.RpcError) as direct:
        on_agent(live_cluster, sql)
    assert direct.value.code() == grpc.StatusCode.ABORTED
    assert "command denied" in str(direct.value.details())

    with live_cluster.mysql("eu") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM mysql.help_topic WHERE help_topic_id = 99999")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT id, v FROM billing.invoices")
        assert cursor.fetchall() == ((1, 100),)


def test_information_schema_shows_the_agents_schema_only(
    live_cluster: Cluster, client: Client, billing: str
) -> None:
    result = client.run(
        {
            "eu": [
                ("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY 1", []),
                (
                    "SELECT COUNT(*) FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA IN ('mysql', 'billing')",
                    [],
                ),
                (
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER <> %s",
                    [AGENT_USER],
                ),
            ]
        },
        timeout=10,
    )
    schemata, tables, others = result.results["eu"]
    assert schemata.rows == [("information_schema",), ("twopc",)]
    assert tables.scalar() == 0
    assert others.scalar() == 0  # other users' sessions (root's, the server's) are not shown
