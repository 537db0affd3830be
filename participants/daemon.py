"""``twopc agent``: the participant agent daemon."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from participants.agent import Agent
from participants.config import AgentConfig, load_agent_config
from participants.metrics import AgentMetrics
from participants.mysql_tls import mysql_ssl_context
from participants.servicer import ParticipantServicer
from participants.xa import SessionPool
from twopc import tracing
from twopc.api import chaos_pb2, twopc_pb2
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import FailedPrecondition, InvalidArgument, Unavailable
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

_STARTUP_PATIENCE_S = 60.0
_CLOSE_BUDGET_S = 5.0  # for agent.close() at shutdown, after the gRPC grace period

log = structlog.get_logger("twopc.agent")
PARTICIPANT_SERVICE = twopc_pb2.DESCRIPTOR.services_by_name["Participant"].full_name
FAILPOINTS_SERVICE = chaos_pb2.DESCRIPTOR.services_by_name["Failpoints"].full_name


def build_agent(config: AgentConfig, environ: Mapping[str, str], failpoints: Failpoints) -> Agent:
    return Agent(
        config,
        build_pool(config, environ),
        failpoints=failpoints,
        lock_waits_pool=build_lock_waits_pool(config, environ),
    )


def build_lock_waits_pool(config: AgentConfig, environ: Mapping[str, str]) -> SessionPool | None:
    """One session of ``lock_waits_user`` (PROCESS only), for reading lock waits; None when the
    agent reads them as ``mysql_user`` or not at all."""
    if not (config.report_lock_waits and config.lock_waits_user):
        return None
    return build_pool(
        config,
        environ,
        user=config.lock_waits_user,
        password=config.lock_waits_password(environ),
        size=1,
        own_database=False,  # it holds no right on any schema
    )


def build_pool(
    config: AgentConfig,
    environ: Mapping[str, str],
    *,
    user: str = "",
    password: str | None = None,
    size: int = 0,
    own_database: bool = True,
) -> SessionPool:
    """The agent's pool of database sessions, as ``config`` sets it up (as another ``user``,
    with ``size`` sessions and no overflow, for the lock waits' reader)."""
    return SessionPool(
        host=config.mysql_host,
        port=config.mysql_port,
        user=user or config.mysql_user,
        password=config.mysql_password(environ) if password is None else password,
        database=config.mysql_database if own_database else None,
        pool_size=size or config.pool_size,
        overflow=0 if size else config.pool_overflow,
        checkout_timeout=config.pool_checkout_timeout_s,
        connect_timeout=config.mysql_connect_timeout_s,
        read_timeout=config.mysql_read_timeout_s,
        command_timeout=config.mysql_command_timeout_s,
        lock_wait_timeout=config.lock_wait_timeout_s,
        idle_timeout=config.session_idle_timeout_s,
        ssl_context=mysql_ssl_context(
            config.mysql_ssl_ca, config.mysql_ssl_cert, config.mysql_ssl_key
        ),
    )


async def start_agent(agent: Agent, patience: float = _STARTUP_PATIENCE_S) -> None:
    """Starts the agent, waiting for its database to come up (it may be restarting too)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            await agent.start()
        except Unavailable as err:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"database of participant {agent.name} unreachable for {patience:.0f} s: {err}"
                ) from err
            log.warning("database_unreachable", error=str(err))
            await asyncio.sleep(0.5)
        else:
            return


def access_control(config: AgentConfig) -> AccessControl:
    """Who may call the agent: the Participant API only its coordinators
    (``coordinator_identities``), the admin API (Failpoints) only ``admin_identities``, health
    and reflection every identity the CA vouches for."""
    return AccessControl(
        {
            PARTICIPANT_SERVICE: ServiceRule(
                config.coordinator_identities, "coordinator_identities"
            ),
            FAILPOINTS_SERVICE: ServiceRule(config.admin_identities, "admin_identities"),
            **OPEN_RULES,
        },
        component=f"agent {config.name}",
    )


async def serve(
    agent: Agent, config: AgentConfig, failpoints: Failpoints, tls: TlsConfig | None
) -> None:
    server = new_server(
        [access_control(config)] if tls is not None else [],
        max_request_bytes=config.max_request_bytes,
    )
    # Without metrics_listen nothing is measured.
    metrics = AgentMetrics() if config.metrics_listen else None
    health = Health(PARTICIPANT_SERVICE)
    probe = _DatabaseProbe()
    if metrics is not None:
        agent.observe_lock_hold(metrics.branch_lock_hold)
        metrics.watch(
            agent, agent.pool, database_up=lambda: probe.up, serving=lambda: health.serving
        )
    servicer = ParticipantServicer(agent, metrics=metrics)
    pb_grpc.add_ParticipantServicer_to_server(servicer, server)
    services = [PARTICIPANT_SERVICE]
    if config.admin_failpoints:
        add_failpoint_admin(server, failpoints)
        services.append(FAILPOINTS_SERVICE)
    add_health_and_reflection(server, health, services)
    await _update_health(agent, health, probe)  # the agent started: its database answered
    port = listen(server, config.listen, tls)
    exporter = metrics_server(config.metrics_listen, metrics.registry, tls) if metrics else None
    if exporter is not None and not exporter.https and not is_loopback(exporter.host):
        log.warning("metrics_plaintext", address=exporter.address)
    await server.start()
    log.info(
        "agent_listening",
        address=config.listen,
        port=port,
        tls=tls is not None,
        coordinator_identities=list(config.coordinator_identities),
        admin_identities=list(config.admin_identities),
        mysql_tls=config.mysql_ssl_ca is not None,
        metrics_address=exporter.address if exporter is not None else None,
        metrics_https=exporter.https if exporter is not None else None,
    )
    reaper = asyncio.create_task(_reap(agent, config))
    collector = asyncio.create_task(_collect_markers(agent, config))
    checker = asyncio.create_task(_check_database(agent, config))
    watcher = asyncio.create_task(_watch_health(agent, config, health, probe))
    try:
        sig = await wait_for_stop_signal()
        log.info("agent_stopping", signal=sig.name)
    finally:
        await health.shutting_down()
        reaper.cancel()
        collector.cancel()
        checker.cancel()
        watcher.cancel()
        servicer.stop()
        await server.stop(grace=5)
        if exporter is not None:
            exporter.close()
        try:
            # Bounded: closing may be stuck in a database call on a dead link. Prepared
            # branches are durable on the server either way; active ones are rolled back by it
            # when the process's connections close.
            await asyncio.wait_for(agent.close(), timeout=_CLOSE_BUDGET_S)
        except TimeoutError:
            log.warning("agent_close_timed_out", budget_s=_CLOSE_BUDGET_S)


class _DatabaseProbe:
    """The last answer of the health probe: does the database answer?"""

    def __init__(self) -> None:
        self.up = True


async def _update_health(agent: Agent, health: Health, probe: _DatabaseProbe) -> None:
    """SERVING while the database answers and no safety check refuses new branches."""
    serving = probe.up and not agent.refusing
    if await health.set(serving):
        log.info("health_changed", serving=serving, database_up=probe.up, refusing=agent.refusing)


async def _watch_health(
    agent: Agent, config: AgentConfig, health: Health, probe: _DatabaseProbe
) -> None:
    """Probes the database every ``health_check_interval_s`` (bounded by the connect and
    command timeouts) and updates the health status."""
    while True:
        await asyncio.sleep(config.health_check_interval_s)
        try:
            probe.up = await agent.database_reachable()
        except Exception:
            log.exception("health_probe_failed")
            probe.up = False
        await _update_health(agent, health, probe)


async def _reap(agent: Agent, config: AgentConfig) -> None:
    while True:
        await asyncio.sleep(config.reaper_interval_s)
        try:
            await agent.reap_expired()
        except Exception:
            log.exception("housekeeping_failed")


async def _collect_markers(agent: Agent, config: AgentConfig) -> None:
    """A task of its own: a marker DELETE stuck on a dead link (up to the command timeout)
    must not hold up the deadline reaper."""
    while True:
        try:
            await agent.collect_markers()
        except Unavailable as err:
            log.warning("marker_gc_failed", error=str(err))
        except Exception:
            log.exception("marker_gc_failed")
        await asyncio.sleep(config.marker_gc_interval_s)


async def _check_database(agent: Agent, config: AgentConfig) -> None:
    """A task of its own, like the marker collection: a check stuck on a dead link must not
    hold up the reaper. A check that cannot run leaves the last verdict in place."""
    while True:
        await asyncio.sleep(config.safety_check_interval_s)
        try:
            await agent.check_database()
        except Unavailable as err:
            log.warning("database_check_failed", error=str(err))
        except Exception:
            log.exception("database_check_failed")


def main(config_path: Path | None, environ: Mapping[str, str] = os.environ) -> int:
    try:
        config = load_agent_config(config_path, environ)
    except (InvalidArgument, ValueError) as err:
        print(f"twopc agent: {err}")
        return 2
    configure_logging(config.log_level, component=f"agent:{config.name}")
    try:
        failpoints = Failpoints.from_env(environ)  # after the logging setup: arming is logged
        tls = config.tls()
    except InvalidArgument as err:
        log.error("agent_cannot_start", error=err.message)
        return 2
    if tls is None:
        ignored = any((config.tls_cert, config.tls_key, config.tls_ca))
        log.warning("insecure_plaintext", warning=plaintext_warning(config.listen, ignored))
    if config.trace_file is not None:
        try:
            tracing.export_to_file(config.trace_file, f"twopc-agent-{config.name}")
        except (RuntimeError, OSError) as err:
            log.error("agent_cannot_start", error=f"trace_file: {err}")
            return 2
    try:
        agent = build_agent(config, environ, failpoints)
    except (OSError, ValueError) as err:  # the database's TLS files (mysql_ssl_*)
        log.error("agent_cannot_start", error=f"TLS to the database: {err}")
        return 2
    code = 0

    async def run() -> None:
        nonlocal code
        try:
            await start_agent(agent)
        except (FailedPrecondition, Unavailable) as err:
            log.error("agent_cannot_start", error=err.message)
            code = 2
            return
        await serve(agent, config, failpoints, tls)

    try:
        run_daemon(run())
    except Exception:
        log.exception("agent_stopped_with_error")
        code = 1
    # Calls still waiting on a database read (a cut link) would hold the process until their
    # read timeout, with the port already closed: neither serving nor gone. Everything that
    # matters is done (branches rolled back or left prepared, logs written).
    sys.stderr.flush()
    os._exit(code)
