"""The agent's database user, on a real MariaDB: the agent does all its work with exactly the
grants the README gives, and refuses to start (or warns, by setting) with any right beyond them.

Issue 10, finding 6: statements reach beyond the application when the agent's user can. The
agent checks its user at start (and again while it runs), so that the database itself keeps
every statement inside the configured schemas.
"""

from __future__ import annotations

import re

import pytest
from structlog.testing import capture_logs

from participants.agent import Agent
from participants.calls import StatementRequest
from tests.security.support import (
    DATABASE,
    MakeUser,
    readme_grants,
    refusal,
    root_rows,
    started,
    with_agent,
)
from twopc.errors import FailedPrecondition
from twopc.testing.playground.mariadb import MariaDBInstance
from twopc.txid import Xid
from twopc.votes import Vote

TABLE = "security_rows"


@pytest.fixture
def table(security_mariadb: MariaDBInstance) -> str:
    with security_mariadb.connect(DATABASE) as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INT PRIMARY KEY) ENGINE=InnoDB")
    return TABLE


def test_the_readme_grants_are_all_the_agent_needs(
    security_mariadb: MariaDBInstance, make_user: MakeUser, table: str
) -> None:
    root_rows(security_mariadb, "DROP TABLE IF EXISTS twopc_branch_marker")
    user = make_user(readme_grants())
    shown = root_rows(security_mariadb, f"SHOW GRANTS FOR {user.account}")
    assert [line for (line,) in shown if "USAGE" not in line] == [
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{DATABASE}`.* TO `{user.name}`@`127.0.0.1`",
        f"GRANT CREATE ON `{DATABASE}`.`twopc_branch_marker` TO `{user.name}`@`127.0.0.1`",
    ]

    async def everything(owner: Agent) -> None:
        insert = StatementRequest(f"INSERT INTO {table} (id) VALUES (%s)", [1])
        # XA START/END/PREPARE and the marker row, then XA RECOVER
        assert (await owner.prepare("sec.r-least-1", "eu", [insert], 1, 30_000)).vote is (
            Vote.PREPARED
        )
        assert [b.xid for b in await owner.recover("sec.")] == [Xid("sec.r-least-1", "eu")]
        # another agent of the same user commits it: it must KILL the owner's session (still
        # holding the branch), watch it leave PROCESSLIST, then XA COMMIT and read the marker
        other = await started(user)
        try:
            await other.commit("sec.r-least-1", "eu", one_phase=False)
        finally:
            await other.close()
        # the one-phase path, a rollback, and the marker's collection
        second = StatementRequest(f"INSERT INTO {table} (id) VALUES (%s)", [2])
        await owner.commit("sec.r-least-2", "eu", one_phase=True, statements=[second], sequence=1)
        await owner.execute("sec.r-least-3", "eu", [StatementRequest("SELECT 1", [])], 1, 30_000)
        await owner.rollback("sec.r-least-3", "eu")
        await owner.collect_markers()

    with_agent(user, everything)
    assert root_rows(security_mariadb, f"SELECT id FROM {table} ORDER BY id") == [(1,), (2,)]
    # Once the marker table exists, CREATE is not needed any more.
    marker = f"{DATABASE}.twopc_branch_marker"
    root_rows(security_mariadb, f"REVOKE CREATE ON {marker} FROM {user.account}")
    with_agent(user)


FORBIDDEN = [
    pytest.param(["GRANT FILE ON *.* TO {user}"], "FILE on *.*", id="file"),
    pytest.param(["GRANT SUPER ON *.* TO {user}"], "SUPER on *.*", id="super"),
    pytest.param(["GRANT PROCESS ON *.* TO {user}"], "PROCESS on *.*", id="process"),
    pytest.param(
        ["GRANT CONNECTION ADMIN ON *.* TO {user}"], "CONNECTION ADMIN on *.*", id="conn-admin"
    ),
    pytest.param(["GRANT SELECT ON *.* TO {user}"], "SELECT on *.*", id="select-everything"),
    pytest.param(["GRANT ALL ON *.* TO {user}"], "ALL PRIVILEGES on *.*", id="all"),
    pytest.param(["GRANT SELECT ON mysql.* TO {user}"], "SELECT on `mysql`.*", id="mysql"),
    pytest.param(
        ["GRANT SELECT ON mysql.global_priv TO {user}"],
        "SELECT on `mysql`.`global_priv`",
        id="mysql-global-priv",
    ),
    pytest.param(
        ["GRANT INSERT ON mysql.help_topic TO {user}"],
        "INSERT on `mysql`.`help_topic`",
        id="mysql-insert",
    ),
    pytest.param(["GRANT SELECT ON billing.* TO {user}"], "SELECT on `billing`.*", id="schema"),
    pytest.param(
        ["GRANT SELECT (amount) ON billing.invoices TO {user}"],
        "SELECT (`amount`) on `billing`.`invoices`",
        id="column-elsewhere",
    ),
    pytest.param(["GRANT SELECT ON `twopc%`.* TO {user}"], "a pattern", id="pattern"),
    pytest.param(
        ["GRANT CREATE, DROP, ALTER ON twopc.* TO {user}"],
        "CREATE, DROP, ALTER on `twopc`.*: not needed",
        id="ddl",
    ),
    pytest.param(
        ["GRANT SELECT ON twopc.* TO {user} WITH GRANT OPTION"],
        "the grant option on `twopc`.*",
        id="grant-option",
    ),
    pytest.param(
        [
            "CREATE ROLE IF NOT EXISTS billing_reader",
            "GRANT SELECT ON billing.* TO billing_reader",
            "GRANT billing_reader TO {user}",
        ],
        "role `billing_reader`",
        id="role",
    ),
]


@pytest.mark.parametrize(("extra", "named"), FORBIDDEN)
def test_the_agent_refuses_to_start_with_a_right_beyond_its_needs(
    make_user: MakeUser, extra: list[str], named: str
) -> None:
    message = refusal(make_user([*readme_grants(), *extra]))
    assert named in message
    assert "REVOKE" in message
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{DATABASE}`.* TO" in message  # the needs
    assert 'privilege_check = "warn"' in message


def test_a_grant_to_public_counts_as_the_users_own(
    security_mariadb: MariaDBInstance, make_user: MakeUser
) -> None:
    user = make_user(readme_grants())
    root_rows(security_mariadb, "GRANT SELECT ON billing.invoices TO PUBLIC")
    try:
        message = refusal(user)
    finally:
        root_rows(security_mariadb, "REVOKE SELECT ON billing.invoices FROM PUBLIC")
    assert "REVOKE SELECT ON `billing`.`invoices` FROM PUBLIC" in message
    assert "reaches schemas beyond those statements may touch: `billing`" in message


def test_with_privilege_check_warn_it_starts_and_says_what_is_wrong(make_user: MakeUser) -> None:
    user = make_user([*readme_grants(), "GRANT FILE ON *.* TO {user}"], privilege_check="warn")
    with capture_logs() as logs:
        with_agent(user)
    warnings = [e for e in logs if e["event"] == "database_checks_failed_warn_only"]
    assert len(warnings) == 1
    assert "FILE on *.*" in warnings[0]["problem"]
    assert any(e["event"] == "agent_ready" for e in logs)


def test_a_missing_right_on_the_marker_table_is_named_with_its_grant(
    security_mariadb: MariaDBInstance, make_user: MakeUser
) -> None:
    without_delete = [
        f"GRANT SELECT, INSERT, UPDATE ON {DATABASE}.* TO {{user}}",
        f"GRANT CREATE ON {DATABASE}.twopc_branch_marker TO {{user}}",
    ]
    message = refusal(make_user(without_delete))
    assert "no DELETE" in message
    assert f"GRANT DELETE ON `{DATABASE}`.`twopc_branch_marker` TO" in message

    root_rows(security_mariadb, "DROP TABLE IF EXISTS twopc_branch_marker")
    message = refusal(make_user(readme_grants()[:1]))  # no CREATE on the (missing) marker table
    assert f"GRANT CREATE ON `{DATABASE}`.`twopc_branch_marker` TO" in message
    assert not root_rows(
        security_mariadb,
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_NAME = 'twopc_branch_marker'",
    )


def test_a_right_granted_while_it_runs_stops_new_branches_until_revoked(
    security_mariadb: MariaDBInstance, make_user: MakeUser, table: str
) -> None:
    user = make_user(readme_grants())
    insert = [StatementRequest(f"INSERT INTO {table} (id) VALUES (7)", [])]

    async def run(agent: Agent) -> None:
        root_rows(security_mariadb, f"GRANT FILE ON *.* TO {user.account}")
        await agent.check_database()
        with pytest.raises(FailedPrecondition, match=r"refuses new branches: .*FILE on \*\.\*"):
            await agent.execute("sec.r-granted-1", "eu", insert, 1, 30_000)
        with pytest.raises(FailedPrecondition, match="refuses new branches"):
            await agent.prepare("sec.r-granted-2", "eu", insert, 1, 30_000)
        with pytest.raises(FailedPrecondition, match="refuses new branches"):
            await agent.commit("sec.r-granted-3", "eu", one_phase=True, statements=insert)
        assert root_rows(security_mariadb, f"SELECT id FROM {table}") == []

        root_rows(security_mariadb, f"REVOKE FILE ON *.* FROM {user.account}")
        await agent.check_database()
        await agent.commit("sec.r-granted-4", "eu", one_phase=True, statements=insert, sequence=1)

    with_agent(user, run)
    assert root_rows(security_mariadb, f"SELECT id FROM {table}") == [(7,)]


def test_the_user_the_agent_connects_as_is_the_one_checked(
    security_mariadb: MariaDBInstance, make_user: MakeUser
) -> None:
    """The check reads the grants of the session's own user (CURRENT_USER), not of a name from
    the configuration: a wildcard host account is judged as the server matched it."""
    user = make_user([*readme_grants(), "GRANT FILE ON *.* TO {user}"])
    message = refusal(user)
    assert re.search(rf"`{user.name}`@`127\.0\.0\.1`", message)
