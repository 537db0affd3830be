"""A whole twopc cluster on one machine: one MariaDB and one agent per region, and a coordinator.

Every component is a real process in a session of its own, started from a command line that the
state file records (``state.json`` in the cluster's directory), so that an outside harness can kill
any part with a real signal and start it again exactly as the cluster did::

    {"version": 1, "directory": ..., "coordinator_id": "c1", "regions": ["eu", "us", "ap"],
     "database": "twopc", "client_address": "127.0.0.1:40001",
     "client_tls": {"cert": ..., "key": ..., "ca": ...}, "plaintext": false,
     "tls": {"ca": ..., "identities": {"client": {"cert": ..., "key": ...}, ...}},
     "links": [{"name": "coordinator-agent-eu", "listen": ..., "upstream": ...}, ...],
     "components": {
        "mariadb-eu": {"kind": "mariadb", "region": "eu", "address": "127.0.0.1:41234",
                       "pid": 1234, "data_dir": ..., "command": [...], "cwd": ..., "env": {...},
                       "log": ...},
        "agent-eu": {..., "metrics_address": "127.0.0.1:41250"}, ...,
        "coordinator": {..., "metrics_address": ...}, "proxy": {...}}}

``metrics_address`` is where a daemon serves its Prometheus metrics (plain HTTP on loopback,
``http://ADDRESS/metrics``; "" when the cluster was made without metrics).
``client_address`` is where the SDK connects (the proxy's end of the client link when the
cluster was made with fault proxies; ``links`` is empty otherwise).

Every gRPC hop runs mutual TLS (``twopc.testing.playground.tls``): ``tls`` holds the CA and the
certificate and key of each identity (``coordinator``, ``agent-<region>``, ``proxy``, ``client``,
``admin``, ``other-app``), and ``client_tls`` the three files a client uses
(``{"cert": ..., "key": ..., "ca": ...}``; null when the daemons run in plaintext, as
``plaintext`` then says). ``Cluster.channel`` and ``Cluster.client`` connect as an identity.

The ``proxy`` component's address is its FaultProxy control endpoint. Start a component again:
``subprocess.Popen(c["command"], cwd=c["cwd"], env=os.environ | c["env"])``
(or ``twopc playground --restart NAME``, which stops it first if it runs, and records the new
pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pymysql
from grpc import aio

from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import AsyncClient, Client
from twopc.outbox import OUTBOX_DDL
from twopc.testing.playground.galera import GaleraCluster, GaleraPorts
from twopc.testing.playground.mariadb import (
    AGENT_PASSWORD_ENV,
    AGENT_USER,
    LOCK_WAITS_PASSWORD_ENV,
    LOCK_WAITS_USER,
    RELAY_USER,
    MariaDBInstance,
    PlaygroundError,
    create_agent_user,
    create_lock_waits_user,
    create_relay_user,
)
from twopc.testing.playground.ports import (
    AGENT_PORT,
    COORDINATOR_PORT,
    DATABASE_PORT,
    LOOPBACK,
    free_port,
    port_or_free,
)
from twopc.testing.playground.rabbitmq import RabbitMQInstance, amqp_answers
from twopc.testing.playground.tls import (
    ADMIN,
    CLIENT,
    COORDINATOR,
    OTHER_APP,
    PROXY_IDENTITY,
    ClusterTls,
    agent_identity,
)
from twopc.tls import TlsConfig

STATE_FILE = "state.json"
DATABASE = "twopc"
PROXY = "proxy"
RABBITMQ = "rabbitmq"  # the outbox's broker, a component and its kind
RELAY = "relay"  # twopc relay, likewise
RELAY_LINK = "relay-rabbitmq"
RELAY_PASSWORD_ENV = "TWOPC_RELAY_MYSQL_PASSWORD"  # noqa: S105 (a variable's name)
# A second coordinator id that every agent serves and no coordinator runs: tests drive agents
# directly with its txids, which the cluster's coordinator's recovery never touches.
TEST_COORDINATOR_ID = "elsewhere"
DEFAULT_IDENTITIES: Mapping[str, Sequence[str]] = {CLIENT: ["*"], OTHER_APP: ["*"]}
CLIENT_LINK = "client-coordinator"
# Overrides the coordinator's participants table (its agents' addresses).
PARTICIPANTS_ENV = "TWOPC_COORDINATOR_PARTICIPANTS"
ONE_SHOT_ORDER_ENV = "TWOPC_COORDINATOR_ONE_SHOT_ORDER"
STOP_TIMEOUT_S = 10.0  # a graceful stop's bound: SIGKILL after it
# The directory that holds the ``twopc`` package (this file is twopc/testing/playground/cluster.py):
# the daemons get it first on PYTHONPATH, so that they run this checkout's code.
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class LinkPlan:
    """A fault-proxy link: the proxy accepts on ``listen`` and forwards to ``upstream``."""

    name: str
    listen: str
    upstream: str


@dataclass
class Component:
    name: str
    kind: str  # "mariadb" | "agent" | "coordinator"
    address: str
    data_dir: str
    command: list[str]
    cwd: str
    log: str
    env: dict[str, str] = field(default_factory=dict)
    region: str = ""
    pid: int | None = None
    # A daemon's Prometheus endpoint (its metrics_listen, host:port; plain HTTP on loopback);
    # "" when it serves none.
    metrics_address: str = ""

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics" if self.metrics_address else ""

    def spawn(self) -> int:
        """Starts the command in a new session, output appended to ``log``; returns the pid."""
        for child in list(_CHILDREN.values()):  # reaps each one that ended, noticed or not
            child.poll()
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _CHILDREN[process.pid] = process
        self.pid = process.pid
        return process.pid

    def alive(self) -> bool:
        return self.pid is not None and process_alive(self.pid)

    def send(self, sig: int) -> None:
        """Sends ``sig`` to the process; to a RabbitMQ node's whole process group (its start
        script and the Erlang VM under it)."""
        if self.pid is None:
            raise PlaygroundError(f"{self.name} has no recorded pid")
        with contextlib.suppress(ProcessLookupError):
            if self.kind == RABBITMQ:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)


# Popen objects of the processes this Python process started, so that dead ones get reaped.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Polls ``predicate`` until it is true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.1f} s")
        time.sleep(interval)


class Cluster:
    def __init__(
        self,
        directory: Path,
        regions: Sequence[str],
        components: Mapping[str, Component],
        coordinator_id: str = "c1",
        links: Sequence[LinkPlan] = (),
        *,
        tls: ClusterTls | None = None,
        plaintext: bool = False,
        store: GaleraCluster | None = None,
    ) -> None:
        self.directory = directory.resolve()
        self.store = store  # the group's decision-log store; None: the file log
        self.regions = list(regions)
        self.components = dict(components)
        self.coordinator_id = coordinator_id
        self.links = list(links)
        self.tls = tls
        # The daemons run with insecure_plaintext: always without certificates; the benchmark
        # switches a TLS cluster to plaintext and back (use_plaintext).
        self.plaintext = plaintext or tls is None

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        regions: Sequence[str],
        *,
        coordinator_id: str = "c1",
        coordinator_settings: Mapping[str, object] | None = None,
        agent_settings: Mapping[str, object] | None = None,
        identities: Mapping[str, Sequence[str]] | None = None,
        proxied: bool = False,
        client_db_links: bool = False,
        remote_links_only: bool = False,
        fixed_ports: bool = False,
        tls: bool = True,
        metrics: bool = True,
        python: str = sys.executable,
        coordinators: int = 1,
        log_store: str = "file",
        outbox: bool = False,
    ) -> Cluster:
        """Lays out directories, certificates and configuration files; starts nothing.

        With ``tls`` (the default), a throwaway CA and a certificate per party go in
        ``directory / "tls"`` and every gRPC hop runs mutual TLS: agents obey the
        ``coordinator`` identity alone, the admin APIs the ``admin`` identity. Without it every
        daemon runs with ``insecure_plaintext``.

        ``identities`` is the coordinator's setting of that name (identity -> the participants
        it may use, ``"*"`` for all): by default ``client`` and ``other-app`` may use every
        participant, and no other identity the client API. Each agent serves the coordinator id
        and ``elsewhere`` (``TEST_COORDINATOR_ID``: a coordinator id whose recovery runs
        nowhere, for tests that drive an agent directly); and an identity may hold three
        quarters of an agent's pool (``max_sessions_per_identity``), unless the settings say
        otherwise.

        Every port is a free one the kernel picks, unless ``fixed_ports`` (the interactive
        playground): then the coordinator's client address is 127.0.0.1:7100, the n-th region's
        agent listens on 7201 + n and its database on 3307 + n, each one that is free now (a
        taken one is replaced by a free port; the proxy's own ports are always free ones).

        With ``proxied``, a fault proxy sits on every hop: client -> coordinator
        (``client-coordinator``), coordinator -> each agent (``coordinator-agent-<region>``) and
        each agent -> its database (``agent-<region>-mariadb``). The daemons are configured with
        the proxy's addresses, and ``coordinator_address`` is the proxied one.

        With ``client_db_links`` as well, each region gets one more link,
        ``client-mariadb-<region>``, from a port of its own to that region's database, for
        clients that talk to the databases directly (the benchmark's baselines) through the same
        kind of link as the coordinator's. Without ``proxied`` it adds nothing.

        With ``remote_links_only`` as well, only the hops that cross regions in a real deployment
        go through the proxy (``coordinator-agent-<region>``, ``client-mariadb-<region>``); the
        client's hop to the coordinator and each agent's to its own database are direct, as they
        are when those parts sit side by side (the benchmark: a proxy hop costs CPU).

        With ``metrics`` (the default) each daemon serves Prometheus metrics on a free loopback
        port (its ``metrics_listen``), which the state file records as the component's
        ``metrics_address``; without it they measure nothing.

        ``coordinators`` above 1 makes a coordinator group (``coordinator.group``): members
        ``coordinator`` (id ``coordinator_id``), ``coordinator-2``, ... (ids ``c2``, ... with
        the default id, else ``<coordinator_id>-2``, ...), each holding its id under a lease
        and taking over those of peers that stop. A group needs a shared decision log:
        ``log_store = "galera"`` (the default for a group) runs a 3-node MariaDB Galera cluster
        on loopback (``galera.GaleraCluster``), member i writing through node ((i - 1) mod 3) +
        1. ``"file"`` is the single coordinator's log in its data directory.

        With ``outbox``, the first region's database holds the outbox table
        (``twopc.outbox.OUTBOX_DDL``), a RabbitMQ node runs as component ``rabbitmq`` and the
        relay (``twopc relay``, as a user that may only read and delete the outbox) as
        ``relay``; its link to the broker is ``relay-rabbitmq``, through the proxy when there
        is one. Clients publish with ``cluster.client(outbox=cluster.regions[0])``.
        """
        _check_group(coordinators, log_store)
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        certificates = ClusterTls.make(directory, regions) if tls else None
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(_REPO_ROOT)}
        components: dict[str, Component] = {}
        agents: dict[str, str] = {}
        links: list[LinkPlan] = []
        agent_password = secrets.token_hex(16)  # the agents' database user's (least privileges)
        lock_waits_password = secrets.token_hex(16)  # the lock waits' reader's (PROCESS only)

        def port(fixed: int) -> int:
            return port_or_free(fixed if fixed_ports else None)

        def metrics_address() -> str:
            return f"{LOOPBACK}:{free_port()}" if metrics else ""

        def proxied_hop(name: str) -> bool:
            local = name == CLIENT_LINK or (name.endswith("-mariadb") and name.startswith("agent-"))
            return proxied and not (remote_links_only and local)

        def through_proxy(name: str, upstream: str, listen_port: int | None = None) -> str:
            if not proxied_hop(name):
                return upstream
            link = LinkPlan(name, f"{LOOPBACK}:{listen_port or free_port()}", upstream)
            links.append(link)
            return link.listen

        member_ids = group_ids(coordinator_id, coordinators)
        direct_agents: dict[str, str] = {}
        store = _new_store(log_store)
        for index, region in enumerate(regions):
            base = directory / region
            base.mkdir(parents=True, exist_ok=True)
            db = MariaDBInstance(region, base / "mariadb", port(DATABASE_PORT + index))
            components[f"mariadb-{region}"] = Component(
                name=f"mariadb-{region}",
                kind="mariadb",
                region=region,
                address=db.address,
                data_dir=str(db.data_dir),
                command=db.command_line(),
                cwd=str(base),
                log=str(base / "mariadb" / "mariadbd.out"),
            )
            agent_address = f"{LOOPBACK}:{port(AGENT_PORT + index)}"
            agents[region] = through_proxy(f"coordinator-agent-{region}", agent_address)
            direct_agents[region] = agent_address
            database_address = through_proxy(f"agent-{region}-mariadb", db.address)
            if client_db_links:
                through_proxy(f"client-mariadb-{region}", db.address)
            config = base / "agent.toml"
            agent_metrics = metrics_address()
            _write_toml(
                config,
                {
                    "name": region,
                    "listen": agent_address,
                    "mysql_host": LOOPBACK,
                    "mysql_port": int(database_address.rsplit(":", 1)[1]),
                    "mysql_user": AGENT_USER,
                    "mysql_password_env": AGENT_PASSWORD_ENV,
                    "mysql_database": DATABASE,
                    "metrics_listen": agent_metrics,
                    **_transport_settings(
                        certificates,
                        agent_identity(region),
                        coordinator_identities=[COORDINATOR],
                    ),
                    "coordinator_ids": [*member_ids, TEST_COORDINATOR_ID],
                    # Lock cycles across regions are broken by the coordinator: the agents
                    # report lock waits, read as a user of PROCESS only.
                    "report_lock_waits": True,
                    "lock_waits_user": LOCK_WAITS_USER,
                    "lock_waits_password_env": LOCK_WAITS_PASSWORD_ENV,
                    **(agent_settings or {}),
                },
            )
            components[f"agent-{region}"] = Component(
                name=f"agent-{region}",
                kind="agent",
                region=region,
                address=agent_address,
                data_dir=str(base),
                command=[python, "-m", "twopc.cli", "agent", "--config", str(config)],
                cwd=str(base),
                log=str(base / "agent.log"),
                env={
                    **env,
                    AGENT_PASSWORD_ENV: agent_password,
                    LOCK_WAITS_PASSWORD_ENV: lock_waits_password,
                },
                metrics_address=agent_metrics,
            )
        components.update(
            _outbox_components(
                directory,
                components=components,
                region=regions[0],
                through_proxy=through_proxy,
                python=python,
                env=env,
            )
            if outbox
            else {}
        )
        # Clients connect to the proxy's end of the client link when there is one: that end takes
        # the fixed port then.
        client_port = port(COORDINATOR_PORT)
        address = f"{LOOPBACK}:{free_port() if proxied_hop(CLIENT_LINK) else client_port}"
        pool = _agent_pool(agent_settings or {})
        tables: dict[str, Mapping[str, object]] = {"participants": agents}
        if certificates is not None:
            tables["identities"] = {
                name: list(allowed) for name, allowed in (identities or DEFAULT_IDENTITIES).items()
            }
        shared = {
            "max_sessions_per_identity": max(1, pool * 3 // 4),
            **_transport_settings(certificates, COORDINATOR),
        }
        for component in _members(
            member_ids,
            directory=directory,
            first_address=address,
            direct_agents=direct_agents,
            store=store,
            through_proxy=through_proxy,
            settings=shared,
            metrics_address=metrics_address,
            overrides=coordinator_settings or {},
            tables=tables,
            python=python,
            env=env,
        ):
            components[component.name] = component
        through_proxy(CLIENT_LINK, address, client_port)
        if proxied:
            control = f"{LOOPBACK}:{free_port()}"
            link_args = [f"--link={k.name}={k.listen}={k.upstream}" for k in links]
            components[PROXY] = Component(
                name=PROXY,
                kind=PROXY,
                address=control,
                data_dir=str(directory),
                command=[
                    python,
                    "-m",
                    "twopc.cli",
                    "proxy",
                    f"--control={control}",
                    *link_args,
                    *_proxy_transport_args(certificates),
                ],
                cwd=str(directory),
                log=str(directory / "proxy.log"),
                env=dict(env),
            )
        return cls(
            directory, regions, components, coordinator_id, links, tls=certificates, store=store
        )

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        path = directory / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise PlaygroundError(f"no playground in {directory} (no {STATE_FILE})") from err
        components = {n: Component(**c) for n, c in state["components"].items()}
        links = [LinkPlan(**link) for link in state.get("links", [])]
        return cls(
            Path(state["directory"]),
            state["regions"],
            components,
            state["coordinator_id"],
            links,
            tls=ClusterTls.from_json(state.get("tls")),
            plaintext=bool(state.get("plaintext", False)),
            store=_store_from_json(state.get("store")),
        )

    # --- running ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def coordinator_address(self) -> str:
        """Where clients connect: through the proxy when there is one."""
        for link in self.links:
            if link.name == CLIENT_LINK:
                return link.listen
        return self.components["coordinator"].address

    @property
    def proxied(self) -> bool:
        return PROXY in self.components

    @property
    def members(self) -> list[str]:
        """The coordinators' component names: ``coordinator``, then ``coordinator-2``, ..."""
        return [n for n, c in self.components.items() if c.kind == "coordinator"]

    @property
    def member_addresses(self) -> list[str]:
        """Where clients reach each member (the first through the client link when proxied)."""
        return [self.coordinator_address] + [self.components[n].address for n in self.members[1:]]

    # --- connecting, as an identity --------------------------------------------------------------

    def client_tls(self, identity: str = CLIENT) -> TlsConfig | None:
        """The TLS configuration of ``identity`` towards the daemons; None when they run in
        plaintext."""
        if self.plaintext or self.tls is None:
            return None
        return self.tls.config(identity)

    def proxy_tls(self) -> TlsConfig | None:
        """The ``admin`` identity's TLS towards the fault proxy's control API (which keeps TLS
        when the benchmark switches the daemons to plaintext); None without certificates."""
        return self.tls.config(ADMIN) if self.tls is not None else None

    def _address(self, target: str) -> str:
        return self.components[target].address if target in self.components else target

    def channel(self, target: str, *, identity: str) -> grpc.Channel:
        """A blocking gRPC channel to a component (by name) or an address, as ``identity``
        (``client``, ``coordinator`` to call agents as the coordinator does, ``admin`` for the
        admin APIs, ``other-app``). Plaintext when the daemons run so."""
        address = self._address(target)
        tls = self.proxy_tls() if target == PROXY else self.client_tls(identity)
        if tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(
            address, tls.channel_credentials(), options=tls.channel_options()
        )

    def aio_channel(self, target: str, *, identity: str) -> aio.Channel:
        """``channel`` for asyncio."""
        address = self._address(target)
        tls = self.client_tls(identity)
        if tls is None:
            return aio.insecure_channel(address)
        return aio.secure_channel(address, tls.channel_credentials(), options=tls.channel_options())

    def client(self, identity: str = CLIENT, **kwargs: Any) -> Client:
        """An SDK ``Client`` of the coordinator (through the client link when proxied), as
        ``identity``; ``kwargs`` go to ``Client``."""
        tls = self.client_tls(identity)
        return Client(self.coordinator_address, tls=tls, insecure=tls is None, **kwargs)

    def async_client(self, identity: str = CLIENT, **kwargs: Any) -> AsyncClient:
        """``client`` for asyncio (make it inside the event loop that uses it)."""
        tls = self.client_tls(identity)
        return AsyncClient(self.coordinator_address, tls=tls, insecure=tls is None, **kwargs)

    def use_plaintext(self, plaintext: bool, timeout: float = 60.0) -> None:
        """Restarts the agents and the coordinator with TLS off (``insecure_plaintext`` from
        the environment, over their configuration files) or on again, when they do not run so
        already. For measuring what TLS costs; the proxy's control API keeps its TLS."""
        if plaintext == self.plaintext:
            return
        if not plaintext and self.tls is None:
            raise PlaygroundError("this cluster has no certificates: it runs in plaintext only")
        variables = {"agent": "TWOPC_AGENT_INSECURE_PLAINTEXT"}
        variables["coordinator"] = "TWOPC_COORDINATOR_INSECURE_PLAINTEXT"
        daemons = [f"agent-{r}" for r in self.regions] + self.members
        for name in daemons:
            component = self.components[name]
            if plaintext:
                component.env[variables[component.kind]] = "true"
            else:
                component.env.pop(variables[component.kind], None)
        self.plaintext = plaintext
        self.save()
        for name in daemons:
            self.restart(name, timeout=timeout)

    def use_one_shot_order(self, order: str, timeout: float = 60.0) -> bool:
        """Restarts the coordinator with ``one_shot_order = order`` (``parallel``, ``ordered``
        or ``adaptive``, through ``TWOPC_COORDINATOR_ONE_SHOT_ORDER`` over its configuration file)
        when it does not run so already; ``parallel`` is the configuration file's.

        Returns:
            Whether the coordinator was restarted.
        """
        wanted = None if order == "parallel" else order
        return self._restart_members_with(ONE_SHOT_ORDER_ENV, wanted, timeout)

    def _restart_members_with(self, variable: str, value: str | None, timeout: float) -> bool:
        """Restarts every member with ``variable`` set to ``value`` (None: unset) in its
        environment, when it does not run so already; whether any was restarted."""
        changed = []
        for name in self.members:
            component = self.components[name]
            if component.env.get(variable) == value:
                continue
            if value is None:
                component.env.pop(variable, None)
            else:
                component.env[variable] = value
            changed.append(name)
        if not changed:
            return False
        self.save()
        for name in changed:
            self.restart(name, timeout=timeout)
        return True

    def use_agent_addresses(
        self, addresses: Mapping[str, str] | None, timeout: float = 60.0
    ) -> bool:
        """Restarts the coordinator so that it reaches each agent at ``addresses`` (region ->
        host:port, through ``TWOPC_COORDINATOR_PARTICIPANTS`` over its configuration file), or
        at the configured ones again (None), when it does not already. The benchmark gives the
        agents' own addresses, past the proxy, for cells with no injected latency.

        Returns:
            Whether the coordinator was restarted.
        """
        wanted = ",".join(f"{r}={a}" for r, a in addresses.items()) if addresses else None
        return self._restart_members_with(PARTICIPANTS_ENV, wanted, timeout)

    def agent_addresses(self) -> dict[str, str]:
        """Where the coordinator reaches each agent now: region -> host:port (the proxy's end
        of its link, unless ``use_agent_addresses`` said otherwise)."""
        override = self.components["coordinator"].env.get(PARTICIPANTS_ENV)
        if override:
            return dict(pair.split("=", 1) for pair in override.split(","))
        links = {link.name: link.listen for link in self.links}
        return {
            region: links.get(
                f"coordinator-agent-{region}", self.components[f"agent-{region}"].address
            )
            for region in self.regions
        }

    def component(self, name: str) -> Component:
        try:
            return self.components[name]
        except KeyError:
            known = ", ".join(sorted(self.components))
            raise PlaygroundError(f"no component {name!r}; the cluster has: {known}") from None

    def up(self, timeout: float = 60.0) -> None:
        """Starts everything: databases, then agents, then the coordinator; each waited for.

        The state file is written before anything starts and as each part starts, so that
        ``twopc playground --down`` always knows what runs; if a part fails to start, what was
        started is stopped again before the error is raised."""
        self.save()
        try:
            if self.proxied:
                self.restart(PROXY, timeout=timeout)
            databases = [self.components[f"mariadb-{r}"] for r in self.regions]
            with ThreadPoolExecutor(max_workers=len(databases) + 2) as pool:
                started = [pool.submit(self._start_database, c, timeout) for c in databases]
                if self.store is not None:
                    started.append(pool.submit(self._start_store))
                if RABBITMQ in self.components:
                    started.append(pool.submit(self._start_broker, timeout))
                for future in started:
                    future.result()
            self.save()
            if RELAY in self.components:
                self.restart(RELAY, timeout=timeout)
            for region in self.regions:
                self.restart(f"agent-{region}", timeout=timeout)
            for name in self.members:
                self.restart(name, timeout=timeout)
        except BaseException:
            self.down(timeout=10)
            raise

    def _start_broker(self, timeout: float) -> None:
        self.restart(RABBITMQ, timeout=timeout, save=False)

    def _start_store(self) -> None:
        assert self.store is not None
        self.store.start()
        with self.store.connect(1) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{LOG_DATABASE}`")  # replicated

    def _start_database(self, component: Component, timeout: float) -> None:
        port = int(component.address.rsplit(":", 1)[1])
        instance = MariaDBInstance(component.region, Path(component.data_dir).parent, port)
        instance.initialize()
        component.command = instance.command_line()
        self.restart(component.name, timeout=timeout, save=False)
        with self.mysql(component.region, database="") as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}`")
            agent = self.components[f"agent-{component.region}"]
            create_agent_user(conn, agent.env[AGENT_PASSWORD_ENV], DATABASE)
            # The agents report lock waits (report_lock_waits) as a user of PROCESS only.
            create_lock_waits_user(conn, agent.env[LOCK_WAITS_PASSWORD_ENV])
            if RELAY in self.components and component.region == self.regions[0]:
                cursor.execute(f"USE `{DATABASE}`")
                cursor.execute(OUTBOX_DDL)
                create_relay_user(conn, self.components[RELAY].env[RELAY_PASSWORD_ENV], DATABASE)

    def restart(
        self,
        name: str,
        *,
        timeout: float = 60.0,
        save: bool = True,
        wait: bool = True,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> int:
        """Starts a component from its recorded command line and (unless ``wait`` is false)
        waits until it answers. A component that runs is stopped first (``stop``)."""
        component = self.component(name)
        if _pids_of(component):
            self.stop(name, stop_timeout)
        pid = component.spawn()
        if save:
            self.save()
        if wait:
            self.wait_ready(name, timeout)
        return pid

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """Stops a component gracefully: SIGTERM (and SIGCONT, in case it is frozen), then
        SIGKILL for a process still running after ``timeout`` s. Returns what was done to each
        process, e.g. ``["pid 123: SIGTERM, exited after 0.3 s"]`` (empty: nothing ran)."""
        pids = _pids_of(self.component(name))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)
        started = time.monotonic()
        deadline = started + timeout
        done = []
        for pid in pids:
            try:
                remaining = max(deadline - time.monotonic(), 0.1)
                wait_until(lambda p=pid: not process_alive(p), remaining, f"{name} exiting")
                done.append(f"pid {pid}: SIGTERM, exited after {time.monotonic() - started:.1f} s")
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_until(lambda p=pid: not process_alive(p), 10.0, f"{name} exiting")
                done.append(f"pid {pid}: still running {timeout:g} s after SIGTERM, SIGKILLed")
        return done

    def kill(self, name: str, sig: int = signal.SIGKILL, *, wait: bool = True) -> None:
        component = self.component(name)
        component.send(sig)
        if wait and sig in (signal.SIGKILL, signal.SIGTERM):
            wait_until(lambda: not component.alive(), 30.0, f"{name} exiting")

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        component = self.component(name)

        def ready() -> bool:
            if not component.alive():
                raise PlaygroundError(
                    f"{name} exited while starting; its log {component.log} ends with:\n"
                    + _tail(component.log)
                )
            if component.kind == "mariadb":
                return _database_answers(component)
            if component.kind == RABBITMQ:
                return amqp_answers(component.address)
            if component.kind == RELAY:
                return True  # alive; it has no port (its log says what it does)
            # Each asked as its own callers ask it: the agents obey the coordinator alone.
            identity = {"agent": COORDINATOR, PROXY: ADMIN}.get(component.kind, CLIENT)
            return _answers(component, self.channel(name, identity=identity))

        wait_until(ready, timeout, f"{name} answering on {component.address}", interval=0.05)

    def down(self, timeout: float = 30.0) -> None:
        """Stops every component: SIGTERM, then SIGKILL after ``timeout``."""
        order = self.members + [f"agent-{r}" for r in self.regions]
        order += [f"mariadb-{r}" for r in self.regions]
        order += [name for name in (RELAY, RABBITMQ) if name in self.components]
        order += [PROXY] if self.proxied else []
        for name in order:
            component = self.components[name]
            for pid in _pids_of(component):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in order:
            for pid in _pids_of(self.components[name]):
                remaining = deadline - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda p=pid: not process_alive(p), max(remaining, 0.1), name)
                if process_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    wait_until(lambda p=pid: not process_alive(p), 10.0, f"{name} exiting")
        if self.store is not None:
            self.store.stop()
        self.save()

    def remove_store(self) -> None:
        """Deletes the Galera store's directory (a temporary one, outside the cluster's), once
        the cluster is down."""
        if self.store is not None:
            shutil.rmtree(self.store.base_dir, ignore_errors=True)

    def save(self) -> None:
        state = {
            "version": 1,
            "directory": str(self.directory),
            "coordinator_id": self.coordinator_id,
            "regions": self.regions,
            "database": DATABASE,
            "client_address": self.coordinator_address,
            "client_tls": _files(self.client_tls(CLIENT)),
            "plaintext": self.plaintext,
            "tls": self.tls.as_json() if self.tls is not None else None,
            "links": [asdict(link) for link in self.links],
            "components": {n: asdict(c) for n, c in self.components.items()},
            "store": _store_as_json(self.store),
        }
        scratch = self.state_path.with_suffix(".tmp")
        scratch.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(scratch, self.state_path)

    # --- talking to the parts -----------------------------------------------------------------

    @contextlib.contextmanager
    def mysql(self, region: str, database: str = DATABASE) -> Iterator[pymysql.Connection]:
        """A root connection to a region's database (for schemas and checks, not for the
        workload, which goes through twopc)."""
        host, port = self.components[f"mariadb-{region}"].address.rsplit(":", 1)
        conn = pymysql.connect(
            host=host,
            port=int(port),
            user="root",
            password="",
            database=database,
            autocommit=True,
            connect_timeout=5,
            ssl_disabled=True,  # the playground's servers are plain (see MariaDB.connect)
        )
        try:
            yield conn
        finally:
            conn.close()


def _database_answers(component: Component) -> bool:
    host, port = component.address.rsplit(":", 1)
    try:
        pymysql.connect(
            host=host, port=int(port), user="root", connect_timeout=1, ssl_disabled=True
        ).close()
    except pymysql.err.MySQLError:
        return False
    return True


def _answers(component: Component, channel: grpc.Channel) -> bool:
    """True when a gRPC ``component`` answers through ``channel`` (closed here)."""
    with channel:
        try:
            if component.kind == PROXY:
                cpb_grpc.FaultProxyStub(channel).ListLinks(cpb.ListLinksRequest(), timeout=1)
            elif component.kind == "agent":
                pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=1)
            else:
                pb_grpc.CoordinatorStub(channel).GetTransaction(
                    pb.GetTransactionRequest(txid="readiness-probe.r-probe"), timeout=1
                )
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND
    return True


def _pids_of(component: Component) -> list[int]:
    """The recorded pid, and any process started from the same command line (a harness may
    have restarted the component without telling the state file)."""
    pids = {component.pid} if component.pid and process_alive(component.pid) else set()
    wanted = "\0".join(component.command).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().rstrip(b"\0") == wanted:
                    pids.add(int(entry.name))
            except OSError:
                continue
    return sorted(p for p in pids if process_alive(p))


def _transport_settings(
    certificates: ClusterTls | None, identity: str, **identities: Sequence[str]
) -> dict[str, object]:
    """A daemon's TLS settings and who it obeys: its certificate, the ``admin`` identity for
    its admin API, and ``identities`` (e.g. an agent's coordinator_identities); plaintext
    without certificates."""
    if certificates is None:
        return {"insecure_plaintext": True}
    return {
        **certificates.daemon_settings(identity),
        "admin_identities": [ADMIN],
        **{key: list(value) for key, value in identities.items()},
    }


def _proxy_transport_args(certificates: ClusterTls | None) -> list[str]:
    if certificates is None:
        return ["--insecure-plaintext"]
    config = certificates.config(PROXY_IDENTITY)
    return [
        f"--tls-cert={config.cert}",
        f"--tls-key={config.key}",
        f"--tls-ca={config.ca}",
        f"--admin-identity={ADMIN}",
    ]


def _files(tls: TlsConfig | None) -> dict[str, str] | None:
    if tls is None:
        return None
    return {"cert": str(tls.cert), "key": str(tls.key), "ca": str(tls.ca)}


def _write_toml(
    path: Path,
    values: Mapping[str, object],
    tables: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for table, entries in (tables or {}).items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in entries.items())
    path.write_text("\n".join(lines) + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


LOG_STORES = ("file", "galera")
STORE_NODE = "store-"  # the Galera store's nodes, as fault targets and in messages: store-1, ...
LOG_DATABASE = "twopc_log"  # the group's decision log, in the Galera store


def member_name(number: int) -> str:
    """The component name of the ``number``-th coordinator (from 1)."""
    return "coordinator" if number == 1 else f"coordinator-{number}"


def group_ids(first: str, size: int) -> list[str]:
    """The coordinator ids of a group of ``size`` whose first member is ``first``: c1, c2, ...
    when ``first`` is ``c1``, else ``first``, ``first-2``, ..."""
    if first == "c1":
        return [f"c{i}" for i in range(1, size + 1)]
    return [first] + [f"{first}-{i}" for i in range(2, size + 1)]


def _new_store(kind: str) -> GaleraCluster | None:
    """The group's store: a 3-node Galera cluster in a directory the ``mysql`` user can reach
    (the nodes run as that user: a root-only temporary directory would not do)."""
    if kind == "file":
        return None
    base = Path(tempfile.mkdtemp(prefix="twopc-galera-"))
    base.chmod(0o755)
    return GaleraCluster(base)


def _store_as_json(store: GaleraCluster | None) -> dict[str, Any] | None:
    if store is None:
        return None
    return {
        "kind": "galera",
        "base_dir": str(store.base_dir),
        "ports": [asdict(store.node_ports(i)) for i in range(1, store.size + 1)],
    }


def _store_from_json(state: Mapping[str, Any] | None) -> GaleraCluster | None:
    if state is None:
        return None
    ports = [GaleraPorts(**p) for p in state["ports"]]
    return GaleraCluster(Path(state["base_dir"]), len(ports), ports=ports)


def _check_group(coordinators: int, log_store: str) -> None:
    if coordinators < 1:
        raise PlaygroundError(f"a cluster needs at least one coordinator, not {coordinators}")
    if log_store not in LOG_STORES:
        raise PlaygroundError(
            f"log_store must be one of {', '.join(LOG_STORES)}, not {log_store!r}"
        )
    if coordinators > 1 and log_store == "file":
        raise PlaygroundError(
            "a coordinator group shares one decision log: give log_store = 'galera' (the file "
            "log belongs to one coordinator)"
        )


def _members(
    member_ids: Sequence[str],
    *,
    directory: Path,
    first_address: str,
    direct_agents: Mapping[str, str],
    store: GaleraCluster | None,
    through_proxy: Callable[[str, str], str],
    settings: Mapping[str, object],
    metrics_address: Callable[[], str],
    overrides: Mapping[str, object],
    tables: Mapping[str, Mapping[str, object]],
    python: str,
    env: Mapping[str, str],
) -> list[Component]:
    """The coordinators: the first on ``first_address`` with the cluster's links to the agents
    (``tables``' participants), each other one on a free port with links of its own
    (``coordinator-<n>-agent-<region>``), so that one member can be cut off alone; each
    member's link to its store node is ``<member>-store``, and to the other nodes, which it
    turns to when that one fails (``decision_log_hosts``), ``<member>-store-<node>``."""
    made = []
    for number, member_id in enumerate(member_ids, start=1):
        name = member_name(number)
        listen = first_address if number == 1 else f"{LOOPBACK}:{free_port()}"
        member_tables = dict(tables)
        if number > 1:
            member_tables["participants"] = {
                region: through_proxy(f"{name}-agent-{region}", direct)
                for region, direct in direct_agents.items()
            }
        store_address, alternates = "", []
        if store is not None:
            first = (number - 1) % store.size + 1
            node = store.node_ports(first).client
            store_address = through_proxy(f"{name}-store", f"{LOOPBACK}:{node}")
            alternates = [
                through_proxy(
                    f"{name}-store-{other}", f"{LOOPBACK}:{store.node_ports(other).client}"
                )
                for other in range(1, store.size + 1)
                if other != first
            ]
        made.append(
            _member(
                number,
                member_id,
                directory=directory,
                listen=listen,
                store_address=store_address,
                store_alternates=alternates,
                settings={**settings, "metrics_listen": metrics_address()},
                overrides=overrides,
                tables=member_tables,
                python=python,
                env=env,
            )
        )
    return made


def _member(
    number: int,
    member_id: str,
    *,
    directory: Path,
    listen: str,
    store_address: str,
    store_alternates: Sequence[str],
    settings: Mapping[str, object],
    overrides: Mapping[str, object],
    tables: Mapping[str, Mapping[str, object]],
    python: str,
    env: Mapping[str, str],
) -> Component:
    """The ``number``-th coordinator: its configuration file written, its component; its
    decision log in the Galera store at ``store_address`` (host:port, "": the file log)."""
    name = member_name(number)
    coordinator_dir = directory / name
    coordinator_dir.mkdir(parents=True, exist_ok=True)
    config = coordinator_dir / "coordinator.toml"
    group: dict[str, object] = {}
    if store_address:
        group = {
            "decision_log": f"mysql+pymysql://root@{store_address}/{LOG_DATABASE}",
            "decision_log_hosts": list(store_alternates),
            "member": f"member-{number}",
        }
    _write_toml(
        config,
        {
            "coordinator_id": member_id,
            "listen": listen,
            "data_dir": str(coordinator_dir / "data"),
            **settings,
            **group,
            **overrides,
        },
        tables=tables,
    )
    return Component(
        name=name,
        kind="coordinator",
        address=listen,
        data_dir=str(coordinator_dir / "data"),
        command=[python, "-m", "twopc.cli", "coordinator", "--config", str(config)],
        cwd=str(coordinator_dir),
        log=str(coordinator_dir / "coordinator.log"),
        env=dict(env),
        metrics_address=str(settings.get("metrics_listen", "")),
    )


def _agent_pool(settings: Mapping[str, object]) -> int:
    """How many sessions an agent may open: its pool and the pool's overflow."""
    return int(str(settings.get("pool_size", 32))) + int(str(settings.get("pool_overflow", 32)))


def _outbox_components(
    directory: Path,
    *,
    components: Mapping[str, Component],
    region: str,
    through_proxy: Callable[[str, str], str],
    python: str,
    env: Mapping[str, str],
) -> dict[str, Component]:
    """The outbox's RabbitMQ node and relay, the relay reading the outbox in ``region``."""
    database = components[f"mariadb-{region}"].address
    base = directory / "outbox"
    node = RabbitMQInstance(base / RABBITMQ)
    broker = Component(
        name=RABBITMQ,
        kind=RABBITMQ,
        address=f"{LOOPBACK}:{node.port}",
        data_dir=str(node.base_dir),
        command=node.command(),
        cwd=str(node.base_dir),
        log=str(node.base_dir / "server.out"),
        env=node.environment(),
    )
    broker_address = through_proxy(RELAY_LINK, broker.address)
    host, port = database.rsplit(":", 1)
    config = base / "relay.toml"
    _write_toml(
        config,
        {
            "mysql_host": host,
            "mysql_port": int(port),
            "mysql_user": RELAY_USER,
            "mysql_database": DATABASE,
            "poll_ms": 5,
            "retry_ms": 100,
            "timeout_s": 3.0,
        },
    )
    relay = Component(
        name=RELAY,
        kind=RELAY,
        address="",
        data_dir=str(base),
        command=[python, "-m", "twopc.cli", "relay", "--config", str(config)],
        cwd=str(base),
        log=str(base / "relay.log"),
        env={
            **env,
            RELAY_PASSWORD_ENV: secrets.token_hex(16),
            "TWOPC_RELAY_AMQP_URL": f"amqp://guest:guest@{broker_address}/%2F",
        },
    )
    return {RABBITMQ: broker, RELAY: relay}
