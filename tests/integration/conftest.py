"""Fixtures for tests that drive an agent in this process against a MariaDB of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import AGENT_ENVIRON
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV, MariaDBInstance, create_agent_user


@pytest.fixture(scope="session")
def scratch_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    """A throwaway MariaDB server, no cluster around it, with a ``twopc`` database and the
    agent's least-privilege user (``AGENT_USER``, its password in ``AGENT_ENVIRON``). Its general
    log goes to the table ``mysql.general_log``: every statement each session sent, as sent (a
    multi-statement round trip is one row)."""
    instance = MariaDBInstance(
        "scratch",
        tmp_path_factory.mktemp("scratch-mariadb"),
        extra_args=["--general-log=1", "--log-output=TABLE"],
    )
    instance.start()
    try:
        with instance.connect() as conn, conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS twopc")
            create_agent_user(conn, AGENT_ENVIRON[AGENT_PASSWORD_ENV], "twopc")
        yield instance
    finally:
        instance.stop(timeout=30)
