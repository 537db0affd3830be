"""``twopc coordinator``: the coordinator daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from grpc import aio

from coordinator.admin import AdminServicer
from coordinator.agents import AgentClients
from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.decision_log import DecisionLog, DecisionLogCorrupted, DecisionLogFailed
from coordinator.decision_log.file_log import FileDecisionLog
from coordinator.engine.admin import Operator
from coordinator.engine.deadlocks import DeadlockDetector
from coordinator.engine.manager import TransactionManager
from coordinator.engine.recovery import Recovery
from coordinator.metrics import CoordinatorMetrics
from coordinator.servicer import CoordinatorServicer
from twopc import tracing
from twopc.api import admin_pb2, admin_pb2_grpc, chaos_pb2, twopc_pb2
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import InvalidArgument
from twopc.failpoint_admin import add_failpoint_admin
from twopc.failpoints import Failpoints
from twopc.identity import AccessControl, ServiceRule
from twopc.logs import configure_logging
from twopc.observability import (
    OPEN_RULES,
    Health,
    add_health_and_reflection,
    is_loopback,
    metrics_server,
)
from twopc.serving import listen, new_server, run_daemon, wait_for_stop_signal
from twopc.tls import TlsConfig, plaintext_warning

if TYPE_CHECKING:  # the SQL log's modules are an optional extra, imported when configured
    from coordinator.decision_log.leases import Lease, SqlLeases
    from coordinator.group import GroupTakeover
    from coordinator.lease_keeper import LeaseKeeper
    from coordinator.request_claims import SqlRequestClaims

log = structlog.get_logger("twopc.coordinator")
COORDINATOR_SERVICE = twopc_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
FAILPOINTS_SERVICE = chaos_pb2.DESCRIPTOR.services_by_name["Failpoints"].full_name
_HEALTH_POLL_S = 0.25  # how soon a change of manager.draining shows in the health status


def _die(err: BaseException) -> None:
    """The decision log cannot tell what is durable any more: stop now, so that the restart
    learns from the log which decisions survived (continuing could contradict one)."""
    log.critical("stopping_after_log_failure", error=str(err))
    os.kill(os.getpid(), signal.SIGKILL)


def access_control(config: CoordinatorConfig) -> AccessControl:
    """Who may call the coordinator: the client API, health and reflection are open to every
    identity the CA vouches for (the client API then applies ``identities``); the admin APIs
    (Admin, Failpoints) to ``admin_identities`` only."""
    return AccessControl(
        {
            COORDINATOR_SERVICE: ServiceRule(None),
            ADMIN_SERVICE: ServiceRule(config.admin_identities, "admin_identities"),
            FAILPOINTS_SERVICE: ServiceRule(config.admin_identities, "admin_identities"),
            **OPEN_RULES,
        },
        component=f"coordinator {config.coordinator_id}",
    )


def build_decision_log(
    config: CoordinatorConfig,
    environ: Mapping[str, str],
    metrics: CoordinatorMetrics | None,
    lease: Lease | None = None,
    on_fenced: Callable[[str], None] | None = None,
) -> DecisionLog:
    """The file log in ``data_dir``, or the SQL log that ``decision_log`` names (its password
    from the environment; the store is named in logs without it)."""
    on_sync = metrics.log_synced if metrics is not None else None
    url = config.decision_log_url()
    if url is None:
        return FileDecisionLog(
            config.data_dir,
            max_bytes=config.log_max_bytes,
            audit_keep=config.audit_keep,
            on_sync=on_sync,
        )
    from coordinator.decision_log.sql_log import SqlDecisionLog  # noqa: PLC0415  # optional extra

    log.info(
        "decision_log_store",
        store=url.render_as_string(hide_password=True),
        password_env=config.decision_log_password_env or None,
    )
    return SqlDecisionLog(
        url,
        coordinator_id=config.coordinator_id,
        password=config.decision_log_password(environ),
        engine_options=config.store_engine_options(environ),
        audit_keep=config.audit_keep,
        on_sync=on_sync,
        lease=lease,
        on_fenced=on_fenced,
    )


def _step_down(reason: str) -> None:
    """This member lost its coordinator id's lease (its renewal failed, the store's fence
    moved, or an agent refused its epoch): another member may be acting for the id now, so this
    one must decide nothing more. Stop at once (the log and the agents are fenced: whatever it
    could still try would be refused)."""
    log.critical("lease_lost_stepping_down", reason=reason)
    os.kill(os.getpid(), signal.SIGKILL)


async def _keep_lease(
    config: CoordinatorConfig, environ: Mapping[str, str]
) -> tuple[SqlLeases, LeaseKeeper] | None:
    """On the SQL log: the store's leases, and this member's lease on its coordinator id,
    acquired (waiting while another member holds it); None on the file log."""
    url = config.decision_log_url()
    if url is None:
        return None
    # The SQL log's modules come with an optional extra: imported only when configured.
    from coordinator.decision_log.leases import SqlLeases  # noqa: PLC0415
    from coordinator.lease_keeper import LeaseKeeper  # noqa: PLC0415

    leases = SqlLeases(
        url,
        password=config.decision_log_password(environ),
        engine_options=config.store_engine_options(environ),
    )
    keeper = LeaseKeeper(
        leases,
        coordinator_id=config.coordinator_id,
        member=_member(config),
        lease_ms=config.lease_ms,
        on_lost=_step_down,
    )
    try:
        await keeper.acquire()
    except BaseException:
        leases.close()
        raise
    return leases, keeper


def _member(config: CoordinatorConfig) -> str:
    return config.member or socket.gethostname()


def _group_takeover(
    config: CoordinatorConfig,
    environ: Mapping[str, str],
    tls: TlsConfig | None,
    leases: SqlLeases,
) -> GroupTakeover:
    """The takeover of peers' expired ids (``coordinator.group``), with agent clients and
    decision logs like this member's own."""
    from coordinator.group import GroupTakeover  # noqa: PLC0415  # the SQL log's extra

    def new_agents(
        coordinator_id: str, epoch: int, on_fenced: Callable[[str], None]
    ) -> AgentClients:
        return AgentClients(
            config.participants,
            tls,
            coordinator_id=coordinator_id,
            epoch=epoch,
            on_fenced=on_fenced,
        )

    def new_log(lease: Lease, on_fenced: Callable[[str], None]) -> DecisionLog:
        peer = dataclasses.replace(config, coordinator_id=lease.coordinator_id)
        return build_decision_log(peer, environ, None, lease=lease, on_fenced=on_fenced)

    return GroupTakeover(
        leases,
        own_id=config.coordinator_id,
        member=_member(config),
        lease_ms=config.lease_ms,
        settings=config.engine_settings(),
        new_agents=new_agents,
        new_log=new_log,
        rpc_timeout_s=config.rpc_timeout_s,
        interval_s=config.takeover_interval_ms / 1000,
    )


def _request_claims(
    config: CoordinatorConfig, environ: Mapping[str, str], leases: SqlLeases
) -> SqlRequestClaims:
    """The group's request claims in the SQL log's store (``coordinator.request_claims``)."""
    from coordinator.request_claims import SqlRequestClaims  # noqa: PLC0415  # the SQL extra

    return SqlRequestClaims(
        config.decision_log_url() or "",
        leases=leases,
        member=_member(config),
        password=config.decision_log_password(environ),
        engine_options=config.store_engine_options(environ),
    )


async def _collect_claims_forever(
    claims: SqlRequestClaims, retention_s: int, interval_s: float
) -> None:
    while True:
        try:
            await claims.collect(retention_s)
        except Exception:
            log.exception("request_claims_collect_failed")
        await asyncio.sleep(interval_s)


async def serve(
    config: CoordinatorConfig,
    failpoints: Failpoints,
    tls: TlsConfig | None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    # Without metrics_listen nothing is measured (the engine's metrics port records nothing).
    metrics = CoordinatorMetrics() if config.metrics_listen else None
    health = Health(COORDINATOR_SERVICE)
    await health.set(False)  # until the first recovery pass has finished
    held = await _keep_lease(config, environ)
    lease = held[1].lease if held is not None else None
    agents = AgentClients(
        config.participants,
        tls,
        coordinator_id=config.coordinator_id,
        epoch=lease.epoch if lease is not None else 0,
        on_fenced=_step_down,
    )
    decision_log = build_decision_log(
        config, environ, metrics, lease=lease, on_fenced=_step_down if lease else None
    )
    claims = _request_claims(config, environ, held[0]) if held is not None else None
    manager = TransactionManager(
        config.engine_settings(),
        agents,
        decision_log,
        failpoints=failpoints,
        on_fatal=_die,
        metrics=metrics,
        claims=claims,
    )
    if metrics is not None:
        metrics.watch(manager, lambda: health.serving)
    await manager.start()
    server = _grpc_server(config, manager, failpoints, tls, health)
    port = listen(server, config.listen, tls)
    exporter = metrics_server(config.metrics_listen, metrics.registry, tls) if metrics else None
    if exporter is not None and not exporter.https and not is_loopback(exporter.host):
        log.warning("metrics_plaintext", address=exporter.address)
    await server.start()
    log.info(
        "coordinator_listening",
        address=config.listen,
        port=port,
        participants=dict(config.participants),
        tls=tls is not None,
        admin_identities=list(config.admin_identities),
        admin_api=tls is not None or config.admin_plaintext,
        metrics_address=exporter.address if exporter is not None else None,
        metrics_https=exporter.https if exporter is not None else None,
        one_shot_order=config.one_shot_order,
        deadlock_detect_ms=config.deadlock_detect_ms,
    )
    _log_identity_rules(config, tls is not None)
    recovery = Recovery(manager, rpc_timeout=config.rpc_timeout_s, failpoints=failpoints)
    tasks = _background(config, manager, recovery, agents, health)
    if held is not None and config.takeover:
        tasks.append(asyncio.create_task(_group_takeover(config, environ, tls, held[0]).run()))
    if claims is not None:
        tasks.append(
            asyncio.create_task(
                _collect_claims_forever(
                    claims, config.request_retention_s, config.request_gc_interval_s
                )
            )
        )
    try:
        sig = await wait_for_stop_signal()
        log.info("coordinator_stopping", signal=sig.name)
    finally:
        await health.shutting_down()
        for task in tasks:
            task.cancel()
        await server.stop(grace=5)
        await manager.close()
        if claims is not None:
            claims.close()
        if held is not None:
            leases, keeper = held
            # Released, not freed: a peer takes the id over at once and resolves whatever
            # this member leaves in doubt (a transaction it was preparing, say).
            await keeper.release()
            leases.close()
        await agents.close()
        if exporter is not None:
            exporter.close()


def _grpc_server(
    config: CoordinatorConfig,
    manager: TransactionManager,
    failpoints: Failpoints,
    tls: TlsConfig | None,
    health: Health,
) -> aio.Server:
    """The gRPC server with its services: the client API, Admin (over TLS, or when
    admin_plaintext is set), Failpoints (when admin_failpoints is set), health, reflection."""
    server = new_server(
        [access_control(config)] if tls is not None else [],
        max_request_bytes=config.max_request_bytes,
    )
    rules = config.identity_rules()
    servicer = CoordinatorServicer(manager, limits=config.request_limits(), rules=rules)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    services = [COORDINATOR_SERVICE]
    if tls is not None or config.admin_plaintext:
        operator = Operator(manager, rpc_timeout=config.rpc_timeout_s)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(operator), server)
        services.append(ADMIN_SERVICE)
    if config.admin_failpoints:
        add_failpoint_admin(server, failpoints)
        services.append(FAILPOINTS_SERVICE)
    add_health_and_reflection(server, health, services)
    return server


def _background(
    config: CoordinatorConfig,
    manager: TransactionManager,
    recovery: Recovery,
    agents: AgentClients,
    health: Health,
) -> list[asyncio.Task[None]]:
    """The daemon's periodic work: recovery, the reaper, health, the deadlock detector."""
    tasks = [
        asyncio.create_task(recovery.run_forever(config.recovery_interval_s)),
        asyncio.create_task(_reap_forever(manager, config.reaper_interval_s)),
        asyncio.create_task(_keep_health(manager, recovery, health)),
    ]
    if config.deadlock_detect_ms > 0:
        detector = DeadlockDetector(
            agents,
            manager.waiting,
            manager.break_deadlock,
            threshold_s=config.deadlock_detect_ms / 1000,
            # An agent out of reach must not hold up the detection of cycles elsewhere for long.
            rpc_timeout_s=min(config.rpc_timeout_s, 1.0),
            metrics=manager.metrics,
        )
        tasks.append(asyncio.create_task(_detect_forever(detector, config.deadlock_poll_ms)))
    return tasks


async def _keep_health(manager: TransactionManager, recovery: Recovery, health: Health) -> None:
    """SERVING once the first recovery pass has finished (what a crash left in doubt has been
    looked at), and while the coordinator is not draining; NOT_SERVING otherwise."""
    while True:
        serving = recovery.passes > 0 and not manager.draining
        if await health.set(serving):
            log.info(
                "health_changed",
                serving=serving,
                recovery_passes=recovery.passes,
                draining=manager.draining,
            )
        await asyncio.sleep(_HEALTH_POLL_S)


def _log_identity_rules(config: CoordinatorConfig, tls: bool) -> None:
    """Says at start who may use which participants, and what the quotas are."""
    quotas = {
        "max_active_per_identity": config.max_active_per_identity,
        "max_sessions_per_identity": config.max_sessions_per_identity,
        "max_idle_ms": config.max_idle_ms,
    }
    if not tls:
        log.warning(
            "identity_rules_off",
            detail="insecure_plaintext: callers have no identity, so the identities setting, "
            "ownership of transactions and the per-identity quotas do not apply",
            max_idle_ms=config.max_idle_ms,
        )
    elif config.identities is None:
        log.info(
            "identities_open",
            detail="no identities setting: every identity the CA vouches for may use every "
            "participant; list them in identities to restrict",
            **quotas,
        )
    else:
        log.info(
            "identities",
            identities={k: list(v) for k, v in config.identities.items()},
            **quotas,
        )


async def _detect_forever(detector: DeadlockDetector, interval_ms: int) -> None:
    while True:
        await asyncio.sleep(interval_ms / 1000)
        try:
            await detector.look()
        except Exception:
            log.exception("deadlock_detector_failed")


async def _reap_forever(manager: TransactionManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await manager.reap_expired()
        except Exception:
            log.exception("reaper_failed")


def main(config_path: Path | None, environ: Mapping[str, str] = os.environ) -> int:
    try:
        config = load_coordinator_config(config_path, environ)
    except (InvalidArgument, ValueError) as err:
        print(f"twopc coordinator: {err}")
        return 2
    configure_logging(config.log_level, component=f"coordinator:{config.coordinator_id}")
    try:
        failpoints = Failpoints.from_env(environ)  # after the logging setup: arming is logged
        tls = config.tls()
    except InvalidArgument as err:
        log.critical("coordinator_cannot_start", error=err.message)
        return 2
    if tls is None:
        ignored = any((config.tls_cert, config.tls_key, config.tls_ca))
        log.warning("insecure_plaintext", warning=plaintext_warning(config.listen, ignored))
        if config.admin_plaintext:
            log.warning(
                "insecure_admin_api",
                warning="INSECURE: admin_plaintext = true serves the Admin API (resolve, "
                f"drain) in plaintext on {config.listen} to whoever reaches it",
            )
    if config.trace_file is not None:
        try:
            tracing.export_to_file(config.trace_file, f"twopc-coordinator-{config.coordinator_id}")
        except (RuntimeError, OSError) as err:
            log.critical("coordinator_cannot_start", error=f"trace_file: {err}")
            return 2
    try:
        run_daemon(serve(config, failpoints, tls, environ))
    except DecisionLogCorrupted as err:
        log.critical("decision_log_corrupted", error=err.message)
        return 3
    except DecisionLogFailed as err:  # at start: e.g. the SQL store out of reach
        log.critical("decision_log_unavailable", error=err.message)
        return 3
    except OSError as err:
        log.critical("coordinator_cannot_start", error=str(err))
        return 2
    return 0
