"""The coordinator's configuration: one frozen value, loaded once at start (file, then TWOPC_*)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from coordinator.engine.admission import (
    ADMISSION_MAX_IN_FLIGHT,
    ADMISSION_QUEUE_MS,
    RateLimits,
)
from coordinator.engine.manager import EngineSettings
from coordinator.engine.one_shot_order import ONE_SHOT_ORDERS
from coordinator.identities import IdentityRules
from twopc.errors import InvalidArgument
from twopc.limits import RequestLimits
from twopc.observability import split_metrics_listen
from twopc.settings import load_settings
from twopc.tls import TlsConfig, daemon_tls
from twopc.txid import check_coordinator_id, check_participant_name

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

ENV_PREFIX = "TWOPC_COORDINATOR_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator.

    ``participants`` maps each participant (region) name to its agent's address, host:port.

    ``admin_failpoints`` (test tooling, default false): also serve the ``twopc.chaos.v1.Failpoints``
    RPC on ``listen``, which arms and lists failpoints at run time (see ``twopc.failpoints``);
    when false, its calls get UNIMPLEMENTED. With TLS only ``admin_identities`` may call it; in
    plaintext whoever reaches the port can crash or stall the coordinator: never enable it in
    production.

    Transport: mutual TLS on ``listen`` and on the calls to agents, with ``tls_cert`` and
    ``tls_key`` (this coordinator's certificate: its identity towards the agents) and ``tls_ca``
    (the CA that signed the clients' and the agents' certificates). ``insecure_plaintext``
    turns TLS off, and with it every identity rule. ``admin_identities``: the identities
    (certificate Common Names, ``twopc.identity``) allowed the admin APIs.

    The operator's API (``twopc.v1.Admin``, ``twopc admin``) is served with TLS to
    ``admin_identities`` alone. In plaintext it is not served (UNIMPLEMENTED) unless
    ``admin_plaintext`` is true: then whoever reaches the port may resolve transactions and
    drain the coordinator. ``audit_keep``: the operator's audit records the decision log keeps
    across compactions (the last ones), and that the API shows.

    Per identity (all moot with ``insecure_plaintext``: there is no identity then):
    ``identities`` maps each identity allowed the client API to the participants it may use
    (``["*"]``: all; ``coordinator.identities``); absent, every identity the CA vouches for may
    use every participant. A transaction belongs to the identity that began it, and request ids
    are per identity. ``max_active_per_identity`` bounds an identity's live transactions and
    ``max_sessions_per_identity`` its open branches on one participant (each holds a pooled
    session of that participant's agent: keep it below the agents' pool_size + pool_overflow);
    over either, RESOURCE_EXHAUSTED. ``max_idle_ms``: an interactive transaction with no call
    for that long is rolled back (0: never), releasing its sessions.
    """

    coordinator_id: str = "c1"
    listen: str = "127.0.0.1:7100"
    data_dir: Path = Path("twopc-coordinator")
    participants: Mapping[str, str] = field(default_factory=dict)
    default_timeout_ms: int = 10_000
    max_timeout_ms: int = 300_000
    max_active: int = 10_000
    # Bounds on one client request (twopc.limits), each refused with InvalidArgument before
    # anything starts; and the largest gRPC message taken (larger: RESOURCE_EXHAUSTED), which
    # bounds string and bytes values. The agents' must be at least these.
    max_statements: int = 1000
    max_params: int = 65_535
    max_sql_length: int = 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    rpc_timeout_s: float = 10.0
    recovery_interval_s: float = 2.0
    reaper_interval_s: float = 0.2
    # Lock cycles across participants (coordinator.engine.deadlocks): the agents are asked who
    # waits on whom once a call of a transaction has run deadlock_detect_ms, every
    # deadlock_poll_ms while one has; 0 turns detection off.
    deadlock_detect_ms: int = 5
    deadlock_poll_ms: int = 10
    # "parallel" (default), "ordered" or "adaptive": how a one-shot transaction's branches are
    # prepared (EngineSettings.one_shot_order). Ordered prevents lock cycles of one-shot
    # transactions on hot rows, at one more round trip per participant; adaptive is parallel,
    # and ordered for one_shot_order_hold_ms once deadlock victims reach
    # one_shot_order_victim_pct of the one-shot transactions (it needs deadlock_detect_ms > 0
    # and agents with report_lock_waits).
    one_shot_order: str = "parallel"
    one_shot_order_hold_ms: int = 10_000
    one_shot_order_victim_pct: float = 5.0
    phase2_attempts: int = 8
    # A circuit breaker per participant (coordinator.engine.breakers): breaker_failures failed
    # Execute, Prepare or Commit calls in a row (agent unreachable, deadline passed, database
    # down) within breaker_window_ms open it, and new transactions touching that participant fail
    # at once with UNAVAILABLE; after breaker_open_ms, breaker_probes transactions are let
    # through, and the first answer closes it. 0 failures: no breakers. Phase 2 and recovery
    # never wait on it.
    breaker_failures: int = 5
    breaker_window_ms: int = 10_000
    breaker_open_ms: int = 2_000
    breaker_probes: int = 1
    finished_memory: int = 100_000
    log_max_bytes: int = 64 * 1024 * 1024
    # Where decisions are logged: "file" (in data_dir) or a SQLAlchemy URL of a MariaDB/MySQL or
    # PostgreSQL database without a password (coordinator.decision_log.sql_log); the password is
    # read from the environment variable named by decision_log_password_env ("": none).
    decision_log: str = "file"
    decision_log_password_env: str = ""
    # More host:port of the same MariaDB/MySQL store (a Galera cluster's other nodes), tried in
    # turn when the URL's host does not answer (coordinator.decision_log.store_hosts).
    decision_log_hosts: tuple[str, ...] = ()
    # On the SQL log, this coordinator acts for coordinator_id only while it holds the id's
    # lease in the store (coordinator.lease_keeper): ``member`` is its name there ("": the
    # host's name), ``lease_ms`` how long a lease lasts without renewal (renewed every third).
    member: str = ""
    lease_ms: int = 3000
    # A member of a group (coordinator.group) looks every takeover_interval_ms for peers' ids
    # whose lease expired, takes them over and resolves what they left in doubt.
    takeover: bool = True
    takeover_interval_ms: int = 500
    # On the SQL log, each request id is claimed in the store (coordinator.request_claims) so
    # that a retry on any member gets the first outcome; claims older than
    # request_retention_s are deleted every request_gc_interval_s (as agents keep markers).
    request_retention_s: int = 7 * 24 * 3600
    request_gc_interval_s: float = 3600.0
    log_level: str = "info"
    admin_failpoints: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure_plaintext: bool = False
    admin_identities: tuple[str, ...] = ()
    admin_plaintext: bool = False
    audit_keep: int = 1000
    identities: Mapping[str, tuple[str, ...]] | None = None
    max_active_per_identity: int = 1000
    max_sessions_per_identity: int = 48
    max_idle_ms: int = 30_000
    # Admission of new transactions (Begin, RunTransaction; coordinator.engine.admission):
    # rate_limit_per_s per identity (0: none; a plaintext caller is one identity), bursts of
    # rate_limit_burst (0: one second's worth), rate_limits an identity's own rate (0: none);
    # at most admission_max_in_flight begun and undecided (0: no cap), the rest waiting up to
    # admission_queue_ms, else shed. Refusals are RESOURCE_EXHAUSTED with a retry-after.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 0
    rate_limits: Mapping[str, float] = field(default_factory=dict)
    admission_max_in_flight: int = ADMISSION_MAX_IN_FLIGHT
    admission_queue_ms: int = ADMISSION_QUEUE_MS
    # Prometheus metrics over HTTP (twopc.observability): "" is off. Beyond loopback, HTTPS with
    # client certificates of tls_ca, or plain HTTP with insecure_plaintext.
    metrics_listen: str = ""
    # Each finished span as a JSON line (needs opentelemetry-sdk): for a look, and the tests.
    trace_file: Path | None = None

    def __post_init__(self) -> None:
        check_coordinator_id(self.coordinator_id)
        for name in self.participants:
            check_participant_name(name)
        object.__setattr__(self, "participants", MappingProxyType(dict(self.participants)))
        if self.identities is not None:
            frozen = {k: tuple(v) for k, v in self.identities.items()}
            object.__setattr__(self, "identities", MappingProxyType(frozen))
        self.identity_rules()  # checks them
        if self.max_active_per_identity < 1 or self.max_sessions_per_identity < 1:
            raise ValueError("max_active_per_identity and max_sessions_per_identity must be >= 1")
        if self.one_shot_order not in ONE_SHOT_ORDERS:
            raise ValueError(
                f"one_shot_order must be one of {', '.join(ONE_SHOT_ORDERS)}, got "
                f"{self.one_shot_order!r}"
            )
        if self.one_shot_order == "adaptive" and self.deadlock_detect_ms <= 0:
            raise ValueError(
                "one_shot_order = 'adaptive' follows the victims of the deadlock detector: "
                "set deadlock_detect_ms above 0, or choose 'parallel' or 'ordered'"
            )
        if not 0 < self.one_shot_order_victim_pct <= 100:
            raise ValueError(
                f"one_shot_order_victim_pct ({self.one_shot_order_victim_pct}) must be above 0 "
                "and at most 100"
            )
        if not 300 <= self.lease_ms <= 600_000:
            raise ValueError(f"lease_ms ({self.lease_ms}) must be between 300 and 600000")
        if not 50 <= self.takeover_interval_ms <= 600_000:
            raise ValueError(
                f"takeover_interval_ms ({self.takeover_interval_ms}) must be between 50 and 600000"
            )
        if self.request_retention_s < 60 or self.request_gc_interval_s <= 0:
            raise ValueError(
                f"request_retention_s ({self.request_retention_s}) must be at least 60 and "
                f"request_gc_interval_s ({self.request_gc_interval_s}) above 0"
            )
        if self.one_shot_order_hold_ms < 1:
            raise ValueError(
                f"one_shot_order_hold_ms ({self.one_shot_order_hold_ms}) must be at least 1"
            )
        if self.breaker_failures < 0:
            raise ValueError(
                f"breaker_failures ({self.breaker_failures}) must be 0 (no breakers) or more"
            )
        if self.breaker_failures and not (
            self.breaker_window_ms >= 1 and self.breaker_open_ms >= 1 and self.breaker_probes >= 1
        ):
            raise ValueError(
                f"breaker_window_ms ({self.breaker_window_ms}), breaker_open_ms "
                f"({self.breaker_open_ms}) and breaker_probes ({self.breaker_probes}) must be at "
                "least 1 (or set breaker_failures = 0 to turn the breakers off)"
            )
        if self.max_idle_ms < 0:
            raise ValueError(f"max_idle_ms ({self.max_idle_ms}) must be 0 (no limit) or more")
        object.__setattr__(self, "rate_limits", MappingProxyType(_rates(self.rate_limits)))
        self.admission_limits()  # checks them
        if self.admission_max_in_flight < 0:
            raise ValueError(
                f"admission_max_in_flight ({self.admission_max_in_flight}) must be 0 (no cap) "
                "or more"
            )
        if not 0 <= self.admission_queue_ms <= 60_000:
            raise ValueError(
                f"admission_queue_ms ({self.admission_queue_ms}) must be between 0 and 60000"
            )
        self.request_limits()  # checks them
        if self.audit_keep < 1:
            raise ValueError(f"audit_keep ({self.audit_keep}) must be at least 1")
        if self.max_request_bytes < 1024 * 1024:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be at least 1 MiB")
        if self.metrics_listen:
            split_metrics_listen(self.metrics_listen)
        self.decision_log_url()  # checks it

    def decision_log_url(self) -> URL | None:
        """The SQL store of the decision log, its driver filled in; None for the file log.

        Raises:
            ValueError: not ``file`` nor a MariaDB/MySQL or PostgreSQL URL, a password in the
                URL, or a bad ``decision_log_password_env``.
        """
        env = self.decision_log_password_env
        if env and not _ENV_NAME.fullmatch(env):
            raise ValueError(
                f"decision_log_password_env must name an environment variable (A-Z, 0-9, _), "
                f"got {env!r}"
            )
        if self.decision_log == "file":
            return None
        try:
            from coordinator.decision_log.sql_log import store_url  # noqa: PLC0415
        except ImportError as err:
            raise ValueError(
                "decision_log is a URL, but SQLAlchemy is not installed: pip install "
                f"'twopc[coordinator,sql-log]' ({err})"
            ) from err
        try:
            url = store_url(self.decision_log)
        except ValueError as err:
            raise ValueError(f"decision_log must be 'file' or a store URL: {err}") from None
        if url.password is not None:
            raise ValueError(
                "decision_log must not carry a password (the configuration is no place for it): "
                "remove it from the URL and name the environment variable that holds it in "
                "decision_log_password_env"
            )
        if self.decision_log_hosts:
            if url.get_backend_name() == "postgresql":
                raise ValueError(
                    "decision_log_hosts is for MariaDB/MySQL stores; PostgreSQL takes several "
                    "hosts in the URL itself (postgresql://user@/db?host=h1:5432&host=h2:5432)"
                )
            from coordinator.decision_log.store_hosts import parse_hosts  # noqa: PLC0415

            parse_hosts(self.decision_log_hosts)
        return url

    def store_engine_options(self, environ: Mapping[str, str]) -> dict[str, object]:
        """``create_engine`` options for the SQL store's connections: a connection factory that
        tries ``decision_log_hosts`` in turn when there are any, none otherwise."""
        url = self.decision_log_url()
        if url is None or not self.decision_log_hosts:
            return {}
        from coordinator.decision_log.sql_log import asks_for_tls, connect_args  # noqa: PLC0415
        from coordinator.decision_log.store_hosts import failover_creator  # noqa: PLC0415

        password = self.decision_log_password(environ)
        if password is not None:
            url = url.set(password=password)
        driver_args = connect_args(postgres=False, timeout_s=10.0, tls=asks_for_tls(url))
        return {"creator": failover_creator(url, self.decision_log_hosts, driver_args)}

    def decision_log_password(self, environ: Mapping[str, str]) -> str | None:
        """The SQL store's password from the environment; None when none is configured.

        Raises:
            InvalidArgument: ``decision_log_password_env`` names a variable that is not set.
        """
        env = self.decision_log_password_env
        if not env or self.decision_log == "file":
            return None
        if env not in environ:
            raise InvalidArgument(
                f"decision_log_password_env is {env}, but the environment has no {env}: set it "
                "to the store user's password"
            )
        return environ[env]

    def identity_rules(self) -> IdentityRules:
        """Raises InvalidArgument when ``identities`` names an unknown participant."""
        return IdentityRules.from_setting(
            self.identities, self.participants, component=f"coordinator {self.coordinator_id}"
        )

    def admission_limits(self) -> RateLimits:
        """Raises ValueError for a negative or non-finite rate or burst."""
        return RateLimits(self.rate_limit_per_s, self.rate_limit_burst, dict(self.rate_limits))

    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.max_statements, self.max_params, self.max_sql_length)

    def tls(self) -> TlsConfig | None:
        """The coordinator's TLS; None with ``insecure_plaintext``.

        Raises:
            InvalidArgument: TLS is on and a setting is missing or a file unreadable, or the
                Failpoints API is served to no one.
        """
        tls = daemon_tls(
            self.tls_cert,
            self.tls_key,
            self.tls_ca,
            insecure_plaintext=self.insecure_plaintext,
            who="coordinator",
        )
        if tls is not None and self.admin_failpoints and not self.admin_identities:
            raise InvalidArgument(
                "admin_failpoints = true, but admin_identities is empty: nobody could call the "
                "Failpoints API; list the identities allowed it"
            )
        return tls

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(
            coordinator_id=self.coordinator_id,
            default_timeout_ms=self.default_timeout_ms,
            max_timeout_ms=self.max_timeout_ms,
            max_active=self.max_active,
            rpc_timeout_s=self.rpc_timeout_s,
            phase2_attempts=self.phase2_attempts,
            finished_memory=self.finished_memory,
            audit_keep=self.audit_keep,
            max_active_per_identity=self.max_active_per_identity,
            max_sessions_per_identity=self.max_sessions_per_identity,
            max_idle_ms=self.max_idle_ms,
            one_shot_order=self.one_shot_order,
            contended_hold_s=self.one_shot_order_hold_ms / 1000,
            one_shot_victim_share=self.one_shot_order_victim_pct / 100,
            admin_identities=tuple(self.admin_identities),
            rate_limits=self.admission_limits(),
            admission_max_in_flight=self.admission_max_in_flight,
            admission_queue_ms=self.admission_queue_ms,
            breaker_failures=self.breaker_failures,
            breaker_window_ms=self.breaker_window_ms,
            breaker_open_ms=self.breaker_open_ms,
            breaker_probes=self.breaker_probes,
        )


def _rates(rates: Mapping[str, object]) -> dict[str, float]:
    """``rate_limits`` as numbers (the environment gives them as text: ``shop=50,batch=5``)."""
    parsed = {}
    for identity, rate in rates.items():
        try:
            parsed[identity] = float(rate)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(
                f"rate_limits: the rate of identity {identity!r} must be a number, got {rate!r}"
            ) from None
    return parsed


def load_coordinator_config(
    path: Path | None, environ: Mapping[str, str] = os.environ
) -> CoordinatorConfig:
    config = load_settings(CoordinatorConfig, path, environ, ENV_PREFIX)
    config.decision_log_password(environ)  # checks that the variable is set
    return config
