"""The agent's configuration: one frozen value, loaded once at start (file, then TWOPC_AGENT_*)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from twopc.errors import InvalidArgument
from twopc.limits import RequestLimits
from twopc.observability import split_metrics_listen
from twopc.serving import MAX_MESSAGE_BYTES
from twopc.settings import load_settings
from twopc.tls import TlsConfig, daemon_tls
from twopc.txid import check_coordinator_id, check_participant_name

ENV_PREFIX = "TWOPC_AGENT_"
_POLICIES = ("refuse", "warn")
_SYSTEM_SCHEMAS = ("mysql", "information_schema", "performance_schema", "sys")


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one participant agent.

    The MySQL password is never written in the file: it comes from the variable that
    ``mysql_password_env`` names (TWOPC_MYSQL_PASSWORD by default).

    ``schemas``: the schemas statements may touch (default: ``mysql_database`` alone). The
    database enforces it: the agent starts only when its user can reach no other schema
    (``participants.safety``). ``privilege_check`` and ``nontransactional_tables``: "refuse"
    (the default: the agent does not start, and refuses new branches while a later check
    fails) or "warn" (it logs a warning and carries on). The checks run again every
    ``safety_check_interval_s``.

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

    ``coordinator_ids``: the coordinator ids (txid prefixes, ``<id>.``) whose transactions this
    agent serves (default ``("c1",)``, a coordinator's default id). A call that would start or
    prepare a branch of another id (Execute, Prepare, a one-phase Commit, the pipeline's
    prepares) is refused with FAILED_PRECONDITION before anything reaches MySQL: no branch of a
    coordinator that nobody recovers can start here. Rollback and Recover still take any txid
    (an operator's cleanup); prepared branches of other ids are logged at start and by the
    periodic checks (``foreign_prepared_branches``).

    TLS to the database: ``mysql_ssl_ca`` turns it on and requires it (a server that does not
    offer TLS is refused); the server's certificate must be signed by that CA and name
    ``mysql_host``. ``mysql_ssl_cert`` and ``mysql_ssl_key`` add a client certificate, for a
    MySQL user created ``REQUIRE X509``.
    """

    name: str = "region"
    listen: str = "127.0.0.1:7201"
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "twopc_agent"
    mysql_password_env: str = "TWOPC_MYSQL_PASSWORD"  # noqa: S105 (a variable name)
    mysql_database: str = "twopc"
    schemas: tuple[str, ...] = ()
    privilege_check: str = "refuse"
    nontransactional_tables: str = "refuse"
    safety_check_interval_s: float = 30.0
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
    # Lock waits reported to the coordinator (WaitsFor), which breaks lock cycles across
    # participants: a statement running longer than lock_wait_report_ms makes the agent read
    # information_schema.INNODB_LOCK_WAITS (its user then needs PROCESS, which the privilege
    # check allows only with this on). Off (the default: least privilege): WaitsFor answers
    # nothing, PROCESS is refused, and a cycle across participants lasts until a lock wait
    # timeout or the transaction's deadline.
    report_lock_waits: bool = False
    lock_wait_report_ms: int = 5
    # The database user that reads the lock waits: one holding PROCESS and nothing else, so that
    # mysql_user keeps the least privileges. "" reads them as mysql_user, which then needs
    # PROCESS (allowed by the privilege check only so). Its password comes from the variable
    # that lock_waits_password_env names; one connection of it is kept.
    lock_waits_user: str = ""
    lock_waits_password_env: str = "TWOPC_LOCK_WAITS_PASSWORD"  # noqa: S105 (a variable name)
    session_idle_timeout_s: int = 600
    max_result_rows: int = 10_000
    # Bounds on one request (twopc.limits), each refused with InvalidArgument before any work.
    # Keep each at least the coordinator's: it relays its clients' requests here.
    max_statements: int = 1000
    max_params: int = 65_535
    max_sql_length: int = 1024 * 1024
    max_batch_txids: int = 1024  # txids in one CommitMany or Inspect; the coordinator sends 256
    max_timeout_ms: int = 300_000  # a branch's timeout_ms; the coordinator's max_timeout_ms
    max_request_bytes: int = MAX_MESSAGE_BYTES  # gRPC messages received; larger: RESOURCE_EXHAUSTED
    # "auto": a branch's session is reset (COM_RESET_CONNECTION) before it returns to the pool
    # after a statement that may leave session state (sql_guard: a stored function, a
    # sequence, an INSERT); "always": after every branch (triggers on UPDATE or DELETE that set
    # user variables or take locks), for about 65 us more CPU per branch.
    reset_sessions: str = "auto"
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
    coordinator_ids: tuple[str, ...] = ("c1",)
    admin_identities: tuple[str, ...] = ()
    mysql_ssl_ca: Path | None = None
    mysql_ssl_cert: Path | None = None
    mysql_ssl_key: Path | None = None
    # Prometheus metrics over HTTP (twopc.observability): "" is off. Beyond loopback, HTTPS with
    # client certificates of tls_ca, or plain HTTP with insecure_plaintext.
    metrics_listen: str = ""
    # How often the database is probed (SELECT 1) for the gRPC health status.
    health_check_interval_s: float = 2.0
    # Each finished span as a JSON line (needs opentelemetry-sdk): for a look, and the tests.
    trace_file: Path | None = None

    def __post_init__(self) -> None:
        check_participant_name(self.name)
        if not self.coordinator_ids:
            raise ValueError(
                "coordinator_ids is empty: the agent would serve no coordinator; list the id "
                'of each coordinator that uses it, e.g. coordinator_ids = ["c1"]'
            )
        for coordinator_id in self.coordinator_ids:
            check_coordinator_id(coordinator_id)
        if not self.marker_table.replace("_", "").isalnum():
            raise ValueError(f"marker_table {self.marker_table!r} must be letters, digits and '_'")
        if not self.mysql_database.replace("_", "").isalnum():
            raise ValueError(
                f"mysql_database {self.mysql_database!r} must be letters, digits and '_'"
            )
        for schema in self.schemas:
            if not schema.replace("_", "").isalnum() or schema.lower() in _SYSTEM_SCHEMAS:
                raise ValueError(
                    f"schemas: {schema!r} must be letters, digits and '_', and no system schema"
                )
        if self.schemas and self.mysql_database not in self.schemas:
            raise ValueError(
                f"schemas must include mysql_database ({self.mysql_database!r}): the marker "
                "table is there"
            )
        for key in ("privilege_check", "nontransactional_tables"):
            if getattr(self, key) not in _POLICIES:
                raise ValueError(f"{key} must be 'refuse' or 'warn', not {getattr(self, key)!r}")
        if self.safety_check_interval_s <= 0:
            raise ValueError("safety_check_interval_s must be positive")
        if self.pool_size < 1 or self.max_branches < 1:
            raise ValueError("pool_size and max_branches must be at least 1")
        self.request_limits()  # checks them
        if self.reset_sessions not in ("auto", "always"):
            raise ValueError(f"reset_sessions must be auto or always, not {self.reset_sessions!r}")
        if self.max_batch_txids < 256:
            raise ValueError(
                f"max_batch_txids ({self.max_batch_txids}) must be at least 256: the "
                "coordinator commits up to 256 branches in one CommitMany"
            )
        if not 0 < self.default_timeout_ms <= self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) must be positive and at most "
                f"max_timeout_ms ({self.max_timeout_ms})"
            )
        if self.max_request_bytes < 1024 * 1024:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be at least 1 MiB")
        if self.marker_gc_interval_s <= 0 or self.reaper_interval_s <= 0:
            raise ValueError("marker_gc_interval_s and reaper_interval_s must be positive")
        if self.health_check_interval_s <= 0:
            raise ValueError("health_check_interval_s must be positive")
        if self.metrics_listen:
            split_metrics_listen(self.metrics_listen)
        if not self.lock_wait_timeout_s < self.mysql_command_timeout_s <= self.mysql_read_timeout_s:
            raise ValueError(
                f"mysql_command_timeout_s ({self.mysql_command_timeout_s}) must be above "
                f"lock_wait_timeout_s ({self.lock_wait_timeout_s}: the marker insert may wait "
                f"for a lock) and at most mysql_read_timeout_s ({self.mysql_read_timeout_s})"
            )

    @property
    def statement_schemas(self) -> tuple[str, ...]:
        """The schemas statements may touch."""
        return self.schemas or (self.mysql_database,)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_statements, self.max_params, self.max_sql_length)

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

    def lock_waits_password(self, environ: Mapping[str, str]) -> str:
        return environ.get(self.lock_waits_password_env, "")

    @property
    def process_for_lock_waits(self) -> bool:
        """Whether mysql_user itself needs PROCESS: lock waits reported, no user of their own."""
        return self.report_lock_waits and not self.lock_waits_user


def load_agent_config(path: Path | None, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    return load_settings(AgentConfig, path, environ, ENV_PREFIX)
