"""A MariaDB server of this tier's own, and database users made for one test each.

An agent in this process is started against it as a user with exactly the grants a test gives,
so that what the agent accepts and refuses is seen on the server itself; root stays the tests'
own, for setting up and checking.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pytest

from participants.config import AgentConfig
from tests.security.support import DATABASE, OTHER_SCHEMA, DbUser, MakeUser
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV, MariaDBInstance

PASSWORD = "security-tier-password"
_users = itertools.count()


@pytest.fixture(scope="session")
def security_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    """A throwaway MariaDB server with the agent's database ``twopc`` and another schema,
    ``billing``, holding a row that no agent may read."""
    instance = MariaDBInstance("security", tmp_path_factory.mktemp("security-mariadb"))
    instance.start()
    try:
        with instance.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {OTHER_SCHEMA}")
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {OTHER_SCHEMA}.invoices "
                "(id INT PRIMARY KEY, amount INT) ENGINE=InnoDB"
            )
            cursor.execute(f"REPLACE INTO {OTHER_SCHEMA}.invoices VALUES (1, 100)")
        yield instance
    finally:
        instance.stop(timeout=30)


@pytest.fixture
def make_user(security_mariadb: MariaDBInstance) -> Iterator[MakeUser]:
    """Creates users with the given GRANT statements (``{user}`` stands for the account); each
    is dropped after the test."""
    made: list[str] = []

    def make(grants: Sequence[str], **settings: object) -> DbUser:
        name = f"agent_{next(_users)}"
        account = f"'{name}'@'127.0.0.1'"
        with security_mariadb.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE USER {account} IDENTIFIED BY %s", [PASSWORD])
            made.append(account)
            for grant in grants:
                cursor.execute(grant.format(user=account))
        config = AgentConfig(
            name="eu",
            mysql_host=security_mariadb.host,
            mysql_port=security_mariadb.port,
            mysql_user=name,
            mysql_database=DATABASE,
            **{"pool_size": 4, "coordinator_ids": ("c1", "sec"), **settings},  # type: ignore[arg-type]
        )
        return DbUser(name, account, config, {AGENT_PASSWORD_ENV: PASSWORD})

    yield make
    with security_mariadb.connect() as conn, conn.cursor() as cursor:
        for account in made:
            cursor.execute(f"DROP USER IF EXISTS {account}")
