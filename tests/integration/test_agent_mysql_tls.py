"""TLS between the agent and its database (``mysql_ssl_ca``, ``mysql_ssl_cert``,
``mysql_ssl_key``), on a MariaDB server of its own that serves TLS with a throwaway CA."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from participants.config import AgentConfig
from participants.daemon import build_agent, build_pool
from participants.grants import least_grants
from participants.mysql_tls import CR_SSL_CONNECTION_ERROR, mysql_ssl_context
from participants.xa import DbError
from twopc.errors import Unavailable
from twopc.failpoints import Failpoints
from twopc.sql_guard import DEFAULT_MARKER_TABLE as MARKER_TABLE
from twopc.testing.certs import CertificateAuthority
from twopc.testing.playground.mariadb import MariaDBInstance, create_agent_user

X509_USER = "twopc_x509"
# A refused connection's socket is closed by the event loop after the refusal, and the test's
# loop ends at once (a daemon's runs on): collected in the test that refused it, it is no
# finding of another's. The agent's code is not excused: it keeps its loop running.
loop_closed_early = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def refused(work: Callable[[], Awaitable[object]]) -> BaseException:
    """The error ``work`` raises in a fresh event loop; what it left for the loop to close is
    collected here."""
    try:
        asyncio.run(work())  # type: ignore[arg-type]
    except Exception as err:
        return err
    finally:
        gc.collect()
    raise AssertionError("it was not refused")


@pytest.fixture(scope="module")
def tls_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBInstance, Path]]:
    """A MariaDB server whose certificate the CA in the returned directory signed; with a user
    that must present a client certificate (``REQUIRE X509``)."""
    directory = tmp_path_factory.mktemp("mysql-tls")
    ca = CertificateAuthority.create(directory / "tls")
    server = ca.issue("mariadb")
    ca.issue("agent")
    instance = MariaDBInstance(
        "tls",
        directory / "db",
        extra_args=[
            f"--ssl-cert={server.cert}",
            f"--ssl-key={server.key}",
            f"--ssl-ca={ca.cert_path}",
        ],
    )
    instance.start()
    try:
        with instance.connect() as conn, conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS twopc")
            cursor.execute(f"CREATE USER IF NOT EXISTS '{X509_USER}'@'%' REQUIRE X509")
            # Both users hold the least privileges: the agent refuses to start with more.
            for grant in least_grants(f"`{X509_USER}`@`%`", ["twopc"], "twopc", MARKER_TABLE):
                cursor.execute(grant)
        with instance.connect() as conn:
            create_agent_user(conn, "", "twopc", host="%")
        yield instance, directory / "tls"
    finally:
        instance.stop(timeout=30)


async def session_status_async(config: AgentConfig) -> dict[str, Any]:
    """The agent started on ``config`` (its checks and marker table over the pool), then the TLS
    status of one of its sessions."""
    agent = build_agent(config, {}, Failpoints())
    await agent.start()
    pool = build_pool(config, {})
    session = await pool.session()
    try:
        output = await session.execute("SHOW SESSION STATUS LIKE 'Ssl_%'")
    finally:
        session.release()
        pool.dispose()
        await agent.close()
    return {str(name): value for name, value in output.rows}


def session_status(config: AgentConfig) -> dict[str, Any]:
    return asyncio.run(session_status_async(config))


def test_the_agent_talks_to_its_database_over_verified_tls(
    tls_mariadb: tuple[MariaDBInstance, Path],
) -> None:
    instance, tls = tls_mariadb
    config = AgentConfig(
        name="eu", mysql_host=instance.host, mysql_port=instance.port, mysql_ssl_ca=tls / "ca.pem"
    )
    status = session_status(config)
    assert str(status["Ssl_version"]).startswith("TLSv1.")
    assert status["Ssl_cipher"]


@loop_closed_early
def test_a_client_certificate_logs_in_a_user_that_requires_one(
    tls_mariadb: tuple[MariaDBInstance, Path],
) -> None:
    instance, tls = tls_mariadb
    base: dict[str, Any] = {
        "name": "eu",
        "mysql_host": instance.host,
        "mysql_port": instance.port,
        "mysql_user": X509_USER,
        "mysql_ssl_ca": tls / "ca.pem",
    }
    with_certificate = AgentConfig(
        **base, mysql_ssl_cert=tls / "agent.pem", mysql_ssl_key=tls / "agent.key"
    )
    assert session_status(with_certificate)["Ssl_version"]
    error = refused(lambda: session_status_async(AgentConfig(**base)))
    assert isinstance(error, Unavailable)
    assert "Access denied for user 'twopc_x509'" in error.message


@loop_closed_early
def test_a_database_without_tls_is_refused_before_the_login(
    scratch_mariadb: MariaDBInstance, tls_mariadb: tuple[MariaDBInstance, Path]
) -> None:
    """The driver alone would carry on in plaintext."""
    _, tls = tls_mariadb
    config = AgentConfig(
        name="eu",
        mysql_host=scratch_mariadb.host,
        mysql_port=scratch_mariadb.port,
        mysql_ssl_ca=tls / "ca.pem",
    )
    error = refused(build_pool(config, {}).session)
    assert isinstance(error, DbError)
    assert error.errno == CR_SSL_CONNECTION_ERROR
    assert "does not offer TLS, which mysql_ssl_ca requires" in error.message


@loop_closed_early
def test_a_database_certificate_of_another_ca_is_refused(
    tls_mariadb: tuple[MariaDBInstance, Path], tmp_path: Path
) -> None:
    instance, _ = tls_mariadb
    other = CertificateAuthority.create(tmp_path)
    config = AgentConfig(
        name="eu", mysql_host=instance.host, mysql_port=instance.port, mysql_ssl_ca=other.cert_path
    )
    error = refused(build_pool(config, {}).session)
    assert isinstance(error, DbError)
    assert error.errno == CR_SSL_CONNECTION_ERROR
    assert error.message.startswith(f"TLS with the database at {instance.address} failed")
    assert "CERTIFICATE_VERIFY_FAILED" in error.message


def test_tls_settings_that_do_not_fit_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set both or neither"):
        mysql_ssl_context(tmp_path / "ca.pem", cert=tmp_path / "agent.pem")
    with pytest.raises(ValueError, match="needs mysql_ssl_ca"):
        mysql_ssl_context(None, cert=tmp_path / "agent.pem", key=tmp_path / "agent.key")
    assert mysql_ssl_context(None) is None
