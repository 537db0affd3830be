"""The agent's configuration: one frozen value, loaded once at start (file, then TWOPC_AGENT_*)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from twopc.errors import InvalidArgument
from twopc.settings import load_settings
from twopc.tls import TlsConfig, daemon_tls
from twopc.txid import check_participant_name

ENV_PREFIX = "TWOPC_AGENT_"


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one participant agent.

    The MySQL password is never written in the file: it comes from the variable that
    ``mysql_password_env`` names (TWOPC_MYSQL_PASSWORD by default).

    ``admin_failpoints`` (test tooling, default false): also serve the ``twopc.chaos.v1.Failpoints``
    RPC on ``listen``, which arms and lists failpoints at run time (see ``twopc.failpoints``);
    when false, its calls get UNIMPLEMENTED. With TLS only ``admin_identities`` may call it; in
    plaintext whoever reaches the port can crash or stall the agent: never enable it in
    production.

    Transport: mutual TLS on ``listen`` with ``tls_cert`` and ``tls_key`` (this agent's
    certificate) and ``tls_ca`` (the CA that signed the coordinators' certificates). The agent
    obeys only ``coordinator_identities`` (certificate Common Names, ``twopc.identity``): any
    other caller of the Participant API gets PERMISSION_DENIED. ``insecure_plaintext`` turns
    TLS off, and with it every identity rule.

    TLS to the database: ``mysql_ssl_ca`` turns it on and requires it (a server that does not
    offer TLS is refused); the server's certificate must be signed by that CA and name
    ``mysql_host``. ``mysql_ssl_cert`` and ``mysql_ssl_key`` add a client certificate, for a
    MySQL user created ``REQUIRE X509``.
    """

    name: str = "region"
    listen: str = "127.0.0.1:7201"
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password_env: str = "TWOPC_MYSQL_PASSWORD"  # noqa: S105 (a variable name)
    mysql_database: str = "twopc"
    mysql_connect_timeout_s: float = 5.0
    mysql_read_timeout_s: float = 120.0
    # twopc's own commands (XA END/PREPARE/COMMIT/ROLLBACK, the marker): a connection that
    # stops answering one of them is given up after this long, not after mysql_read_timeout_s,
    # so that a branch stuck in phase 2 on a dead link is freed in seconds.
    mysql_command_timeout_s: float = 15.0
    pool_size: int = 32
    pool_overflow: int = 32
    pool_checkout_timeout_s: float = 5.0
    max_branches: int = 2000
    default_timeout_ms: int = 30_000
    lock_wait_timeout_s: int = 10
    session_idle_timeout_s: int = 600
    max_result_rows: int = 10_000
    marker_table: str = "twopc_branch_marker"
    marker_retention_s: int = 7 * 24 * 3600
    reaper_interval_s: float = 0.2
    marker_gc_interval_s: float = 3600.0
    finished_branch_memory: int = 50_000
    log_level: str = "info"
    admin_failpoints: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_plaintext: bool = False
    coordinator_identities: tuple[str, ...] = ()
    admin_identities: tuple[str, ...] = ()
    mysql_ssl_ca: Path | None = None
    mysql_ssl_cert: Path | None = None
    mysql_ssl_key: Path | None = None

    def __post_init__(self) -> None:
        check_participant_name(self.name)
        if not self.marker_table.replace("_", "").isalnum():
            raise ValueError(f"marker_table {self.marker_table!r} must be letters, digits and '_'")
        if not self.mysql_database.replace("_", "").isalnum():
            raise ValueError(
                f"mysql_database {self.mysql_database!r} must be letters, digits and '_'"
            )
        if self.pool_size < 1 or self.max_branches < 1:
            raise ValueError("pool_size and max_branches must be at least 1")
        if self.marker_gc_interval_s <= 0 or self.reaper_interval_s <= 0:
            raise ValueError("marker_gc_interval_s and reaper_interval_s must be positive")
        if not self.lock_wait_timeout_s < self.mysql_command_timeout_s <= self.mysql_read_timeout_s:
            raise ValueError(
                f"mysql_command_timeout_s ({self.mysql_command_timeout_s}) must be above "
                f"lock_wait_timeout_s ({self.lock_wait_timeout_s}: the marker insert may wait "
                f"for a lock) and at most mysql_read_timeout_s ({self.mysql_read_timeout_s})"
            )

    def tls(self) -> TlsConfig | None:
        """The agent's TLS; None with ``insecure_plaintext``.

        Raises:
            InvalidArgument: TLS is on and a setting is missing, a file unreadable, or no
                coordinator identity is configured (the agent would obey no one).
        """
        tls = daemon_tls(
            self.tls_cert,
            self.tls_key,
            self.tls_ca,
            insecure_plaintext=self.insecure_plaintext,
            who="agent",
        )
        if tls is not None and not self.coordinator_identities:
            raise InvalidArgument(
                "coordinator_identities is empty: the agent would obey no one. List the "
                "identity of each coordinator that may call it (the Common Name of its "
                'certificate), e.g. coordinator_identities = ["coordinator"]'
            )
        if tls is not None and self.admin_failpoints and not self.admin_identities:
            raise InvalidArgument(
                "admin_failpoints = true, but admin_identities is empty: nobody could call the "
                "Failpoints API; list the identities allowed it"
            )
        return tls

    def mysql_password(self, environ: Mapping[str, str]) -> str:
        return environ.get(self.mysql_password_env, "")


def load_agent_config(path: Path | None, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    return load_settings(AgentConfig, path, environ, ENV_PREFIX)
