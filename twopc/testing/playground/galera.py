"""A throwaway MariaDB Galera cluster of N nodes on 127.0.0.1, for tests of a replicated store of
the coordinator's decision log (a Galera node can hold that log, never be an XA participant).

Each node is a ``MariaDBInstance`` (mariadb.py) with the wsrep options added: its own data
directory under ``base_dir/node<i>``, four free ports (client, group communication, incremental
state transfer, rsync state transfer), the lean test profile (``gcache.size=16M``, the 8M redo
log) and, by default, short EVS timeouts: a SIGKILLed node stalls the others' commits ~2.2 s
instead of ~6 s (measured on MariaDB 10.11 and galera-4 26.4 on 2 cores: 2.1 s here; a
start takes ~11 s, a restart after SIGKILL ~3.5 s). Nodes are numbered from 1, as Galera's
documentation and the logs do.

As root, every node runs as the ``mysql`` user (``mariadbd --user=mysql``) on directories it
owns: started as root, the rsync state transfer drops to ``nobody`` and cannot write the data
directory. ``base_dir`` must then be reachable by that user (pytest's ``tmp_path`` is under a
0700 directory of root's: use a ``tempfile.mkdtemp()`` made 0755).

Typical use::

    with GaleraCluster(base_dir) as cluster:     # start(): bootstrap node 1, join the others
        engine = sqlalchemy.create_engine(cluster.url(1, "twopc_log"))
        cluster.kill(3)                          # SIGKILL
        cluster.restart(3)                       # --wsrep-recover, then its recovered position
        cluster.pause(2); cluster.resume(2)      # SIGSTOP, SIGCONT
                                                 # stop(): every node, node 1 last

Errors (under the playground's ``PlaygroundError``)::

    MariaDBNotInstalled
    └── GaleraNotInstalled      no Galera provider or no rsync: run deploy/setup.sh
    MariaDBStartFailed
    └── GaleraStartFailed       a node did not start, join or recover
    GaleraNotSynced             (also a TimeoutError) not every node Synced in a full cluster
                                within the deadline
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pymysql

from twopc.testing.playground.mariadb import (
    MariaDBBinaries,
    MariaDBInstance,
    MariaDBNotInstalled,
    MariaDBStartFailed,
    PlaygroundError,
    find_binaries,
    log_tail,
)
from twopc.testing.playground.ports import LOOPBACK, free_port

__all__ = [
    "PROVIDER",
    "SHORT_EVS_TIMEOUTS",
    "GaleraCluster",
    "GaleraNotInstalled",
    "GaleraNotSynced",
    "GaleraPorts",
    "GaleraStartFailed",
]

#: The Galera 4 library Debian's galera-4 package installs.
PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")
#: Provider options that drop a dead node from the view in ~2 s instead of ~6 s (measured:
#: shorter ones risk evicting a node that is merely busy on a 2-core machine).
SHORT_EVS_TIMEOUTS = (
    "evs.keepalive_period=PT0.2S",
    "evs.inactive_check_period=PT0.2S",
    "evs.suspect_timeout=PT1S",
    "evs.inactive_timeout=PT2S",
    "evs.install_timeout=PT2S",
)

_SETUP_HINT = "run deploy/setup.sh (it installs the galera-4 and rsync packages)"
_USER = "mysql"
_SYNCED = "Synced"
_POLL_INTERVAL = 0.05  # seconds between status probes
_LEAVE_TIMEOUT = 5.0  # seconds for node 1 to see a stopping node leave (it takes ~0.1 s)
_PROBE_TIMEOUT = 1  # seconds, connect/read/write of each probe: a paused node must not hang it
_RECOVERED = re.compile(rb"WSREP: Recovered position:\s*([0-9a-fA-F-]{36}:-?\d+)")


class GaleraNotInstalled(MariaDBNotInstalled):
    """The Galera provider library or rsync (the state transfer's) is missing."""


class GaleraStartFailed(MariaDBStartFailed):
    """A node exited while starting, joining or recovering its position; the message carries
    the end of its error log."""


class GaleraNotSynced(PlaygroundError, TimeoutError):
    """Not every node reported Synced in a cluster of the expected size before the deadline;
    the message lists each node's last state and the end of the lagging nodes' error logs."""


@dataclass(frozen=True)
class GaleraPorts:
    """A node's ports on 127.0.0.1.

    Attributes:
        client: MariaDB's SQL port.
        group: group communication (``gmcast.listen_addr``), listed in every node's
            ``wsrep_cluster_address``.
        ist: incremental state transfer (``ist.recv_addr``).
        sst: the rsync state transfer's (``wsrep_sst_receive_address``).
    """

    client: int
    group: int
    ist: int
    sst: int

    @classmethod
    def pick(cls) -> GaleraPorts:
        return cls(client=free_port(), group=free_port(), ist=free_port(), sst=free_port())


@dataclass(frozen=True)
class _Status:
    state: str  # wsrep_local_state_comment, or why it could not be read
    size: int  # wsrep_cluster_size, 0 when unknown

    def __str__(self) -> str:
        return f"{self.state}, cluster size {self.size}"


class GaleraCluster:
    """N MariaDB Galera nodes on 127.0.0.1, each with its data directory under ``base_dir``.

    Nodes are numbered 1 to ``size``. The object holds no connection. Not thread-safe.

    Args:
        base_dir: a directory the cluster owns; created when missing. As root, it must be
            reachable by the ``mysql`` user.
        size: the number of nodes.
        short_timeouts: add ``SHORT_EVS_TIMEOUTS`` to the provider options.
        buffer_pool: each node's ``innodb_buffer_pool_size``.
        binaries: where the server is; ``find_binaries()`` when None.
        provider: the Galera library.
        extra_args: more server options for every node, after the others (so they win).
        ports: each node's ports (a cluster made again from a record of them); free ones when
            None.

    Raises:
        GaleraNotInstalled: (at ``start``) the provider or rsync is missing.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        short_timeouts: bool = True,
        buffer_pool: str = "32M",
        binaries: MariaDBBinaries | None = None,
        provider: Path = PROVIDER,
        extra_args: Sequence[str] = (),
        ports: Sequence[GaleraPorts] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.base_dir = Path(base_dir).absolute()
        self.size = size
        self.short_timeouts = short_timeouts
        self.provider = Path(provider)
        self._extra_args = tuple(extra_args)
        self._binaries = binaries
        if ports is not None and len(ports) != size:
            raise ValueError(f"{len(ports)} nodes' ports for a cluster of {size}")
        self._ports = (
            list(ports) if ports is not None else [GaleraPorts.pick() for _ in range(size)]
        )
        self._nodes = [
            MariaDBInstance(
                f"galera{i}",
                self.base_dir / f"node{i}",
                ports.client,
                buffer_pool=buffer_pool,
                binaries=binaries,
                user=_USER,
            )
            for i, ports in enumerate(self._ports, start=1)
        ]

    def __repr__(self) -> str:
        return f"GaleraCluster({self.size} nodes, {str(self.base_dir)!r})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where things are ---------------------------------------------------------------------

    @property
    def ports(self) -> dict[int, int]:
        """Each node's client (SQL) port, by node number."""
        return {i: ports.client for i, ports in enumerate(self._ports, start=1)}

    @property
    def pids(self) -> dict[int, int | None]:
        """Each node's server pid by node number; None for a node that is not running."""
        return {i: node.pid() for i, node in enumerate(self._nodes, start=1)}

    def node_ports(self, i: int) -> GaleraPorts:
        """All four ports of node ``i``."""
        return self._ports[self._index(i)]

    def node(self, i: int) -> MariaDBInstance:
        """Node ``i``'s server (its logs, ``connect()``, ``command_line()``)."""
        return self._nodes[self._index(i)]

    def url(self, i: int, database: str = "") -> str:
        """A SQLAlchemy URL for node ``i`` as root (no password)."""
        return f"mysql+pymysql://root@{LOOPBACK}:{self.node_ports(i).client}/{database}"

    def connect(self, i: int, database: str | None = None, **kwargs: Any) -> pymysql.Connection:
        """A new root connection to node ``i``, autocommit on (``MariaDBInstance.connect``)."""
        return self.node(i).connect(database, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Initialise the data directories, bootstrap node 1 (``--wsrep-new-cluster``), start
        the others one after the other (node 1 is the only donor: the rsync transfers are
        serial anyway), and wait until every node is Synced in a cluster of ``size``.

        After a clean ``stop()`` it starts the same cluster again (node 1, which left last,
        bootstraps it; the others catch up by IST). On any failure every node is stopped.

        Raises:
            GaleraNotInstalled: the provider, rsync or the MariaDB binaries are missing.
            MariaDBInitFailed: a data directory could not be created.
            GaleraStartFailed: a node exited or did not answer in time.
            GaleraNotSynced: the nodes did not all reach Synced within ``timeout``.
        """
        self._check_installed()
        deadline = time.monotonic() + timeout
        try:
            self._initialize_all()
            for i in range(1, self.size + 1):
                self._start_node(i, deadline, bootstrap=i == 1)
                self._wait(deadline, timeout, nodes=range(1, i + 1), size=i)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node cleanly (SIGTERM, SIGKILL after ``timeout``), paused ones too.

        One at a time from node N down to node 1, each once node 1 has seen the previous one
        leave: the last node to leave is the one that may bootstrap the cluster again
        (``safe_to_bootstrap`` in its grastate.dat). Two nodes leaving together can leave the
        last one in a non-primary component, and then no node may bootstrap.
        """
        for i in range(self.size, 1, -1):
            self.node(i).stop(timeout)
            self._wait_left(i)
        self.node(1).stop(timeout)

    def kill(self, i: int, timeout: float = 10.0) -> None:
        """SIGKILL node ``i`` and wait until its process is gone.

        Raises:
            MariaDBNotRunning: the node is not running.
            TimeoutError: it still runs after ``timeout`` seconds.
        """
        node = self.node(i)
        node.kill(signal.SIGKILL)
        node.wait_stopped(timeout)

    def pause(self, i: int, timeout: float = 10.0) -> None:
        """SIGSTOP node ``i`` and waits until the kernel shows it stopped (a process of many
        threads takes a moment to stop them all); ``resume`` continues it, ``stop`` does too."""
        self.node(i).kill(signal.SIGSTOP)
        pid = self.pids.get(i)
        deadline = time.monotonic() + timeout
        while pid is not None and _state(pid) not in ("T", "t", ""):
            if time.monotonic() > deadline:
                raise PlaygroundError(f"node {i} (pid {pid}) did not stop within {timeout:g} s")
            time.sleep(0.005)

    def resume(self, i: int) -> None:
        """SIGCONT node ``i``."""
        self.node(i).kill(signal.SIGCONT)

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start node ``i`` again after it was killed, the way the packaged scripts do: run the
        server with ``--wsrep-recover`` to read its last committed position from InnoDB, then
        start it with ``--wsrep-start-position`` at that position, so that it catches up by
        IST instead of a full state transfer. Waits until the node is Synced in a cluster of
        every running node.

        Raises:
            GaleraStartFailed: the node is running, recovery printed no position, or the node
                exited or did not answer in time.
            GaleraNotSynced: it did not reach Synced within ``timeout``.
        """
        node = self.node(i)
        if node.is_running():
            raise GaleraStartFailed(f"{node.name}: still running (pid {node.pid()})")
        deadline = time.monotonic() + timeout
        position = self._recover(i, deadline)
        self._start_node(i, deadline, start_position=position)
        running = sum(1 for pid in self.pids.values() if pid is not None)
        self._wait(deadline, timeout, nodes=[i], size=running)

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``wsrep_local_state_comment = Synced`` and
        ``wsrep_cluster_size = size``.

        Raises:
            GaleraNotSynced: not so after ``timeout`` seconds.
        """
        self._wait(time.monotonic() + timeout, timeout, nodes=range(1, self.size + 1))

    # -- internals ----------------------------------------------------------------------------

    def _index(self, i: int) -> int:
        if not 1 <= i <= self.size:
            raise IndexError(f"no node {i}: the nodes are numbered 1 to {self.size}")
        return i - 1

    def _check_installed(self) -> None:
        (self._binaries or find_binaries()).check()
        if not self.provider.is_file():
            raise GaleraNotInstalled(f"Galera provider {self.provider} not found; {_SETUP_HINT}")
        if shutil.which("rsync") is None:
            raise GaleraNotInstalled(f"rsync (the state transfer's) not on PATH; {_SETUP_HINT}")

    def _initialize_all(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self.size, thread_name_prefix="galera-init") as pool:
            for future in [pool.submit(node.initialize) for node in self._nodes]:
                future.result()

    def _wsrep_args(self, i: int, *, bootstrap: bool, start_position: str | None) -> list[str]:
        ports = self.node_ports(i)
        options = [
            f"gmcast.listen_addr=tcp://{LOOPBACK}:{ports.group}",
            f"ist.recv_addr={LOOPBACK}:{ports.ist}",
            "gcache.size=16M",  # lean: the default 128M is written out at the first start
            *(SHORT_EVS_TIMEOUTS if self.short_timeouts else ()),
        ]
        members = ",".join(f"{LOOPBACK}:{p.group}" for p in self._ports)
        return [
            "--wsrep-on=ON",
            f"--wsrep-provider={self.provider}",
            f"--wsrep-cluster-address=gcomm://{members}",
            f"--wsrep-node-address={LOOPBACK}:{ports.group}",
            f"--wsrep-node-name=node{i}",
            f"--wsrep-provider-options={';'.join(options)}",
            f"--wsrep-sst-receive-address={LOOPBACK}:{ports.sst}",
            "--wsrep-sst-method=rsync",
            "--binlog-format=ROW",
            "--innodb-autoinc-lock-mode=2",
            *(["--wsrep-new-cluster"] if bootstrap else []),
            *([f"--wsrep-start-position={start_position}"] if start_position else []),
            *self._extra_args,
        ]

    def _start_node(
        self,
        i: int,
        deadline: float,
        *,
        bootstrap: bool = False,
        start_position: str | None = None,
    ) -> None:
        node = self.node(i)
        node.extra_args = tuple(
            self._wsrep_args(i, bootstrap=bootstrap, start_position=start_position)
        )
        remaining = deadline - time.monotonic()
        try:
            # A joiner answers SELECT 1 only once its state transfer is done.
            node.start(timeout=max(remaining, 0.1))
        except MariaDBStartFailed as err:
            raise GaleraStartFailed(
                f"node {i} ({'bootstrap' if bootstrap else 'join'}) failed: {err}"
            ) from err
        finally:
            # Never again: a restart must join, not found a second cluster.
            node.extra_args = tuple(self._wsrep_args(i, bootstrap=False, start_position=None))

    def _recover(self, i: int, deadline: float) -> str:
        """Run node ``i`` with ``--wsrep-recover``; return the ``uuid:seqno`` it prints."""
        node = self.node(i)
        node.extra_args = tuple(self._wsrep_args(i, bootstrap=False, start_position=None))
        offset = _size(node.error_log)
        remaining = max(deadline - time.monotonic(), 0.1)
        with node.output_log.open("ab") as output:
            try:
                result = subprocess.run(
                    [*node.command_line(), "--wsrep-recover"],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=node.base_dir,
                    start_new_session=True,
                    timeout=remaining,
                    check=False,
                )
            except subprocess.TimeoutExpired as err:
                raise GaleraStartFailed(
                    f"node {i}: --wsrep-recover did not finish within {remaining:.1f} s; "
                    f"last lines of {node.error_log}:\n{log_tail(node.error_log, offset)}"
                ) from err
        found = _RECOVERED.findall(_read_from(node.error_log, offset))
        if result.returncode != 0 or not found:
            raise GaleraStartFailed(
                f"node {i}: --wsrep-recover exited with {result.returncode} "
                f"{'and printed no position' if not found else ''}; "
                f"last lines of {node.error_log}:\n{log_tail(node.error_log, offset)}"
            )
        return str(found[-1].decode())

    def _wait(
        self,
        deadline: float,
        timeout: float,
        *,
        nodes: Sequence[int] | range,
        size: int | None = None,
    ) -> None:
        """Wait until each of ``nodes`` is Synced in a cluster of ``size`` (default: all)."""
        expected = self.size if size is None else size
        while True:
            statuses = {i: self._status(i) for i in nodes}
            lagging = [i for i, s in statuses.items() if s.state != _SYNCED or s.size != expected]
            if not lagging:
                return
            dead = [i for i in lagging if not self.node(i).is_running()]
            if dead or time.monotonic() >= deadline:
                raise GaleraNotSynced(self._report(statuses, lagging, dead, expected, timeout))
            # A condition polled until a deadline; each probe is itself bounded (_PROBE_TIMEOUT).
            time.sleep(min(_POLL_INTERVAL, max(deadline - time.monotonic(), 0)))

    def _wait_left(self, i: int) -> None:
        """Wait (at most ``_LEAVE_TIMEOUT``) until node 1 sees a cluster without node ``i``.

        Best effort: a node 1 that is down, paused or out of the primary component ends it."""
        if not self.node(1).is_running():
            return
        deadline = time.monotonic() + _LEAVE_TIMEOUT
        while time.monotonic() < deadline:
            status = self._status(1)
            if status.size < i:  # 0 too: unreachable, or its status unreadable
                return
            time.sleep(_POLL_INTERVAL)  # polled until the deadline, each probe bounded

    def _report(
        self,
        statuses: dict[int, _Status],
        lagging: list[int],
        dead: list[int],
        expected: int,
        timeout: float,
    ) -> str:
        why = (
            f"node(s) {', '.join(map(str, dead))} exited" if dead else f"not so within {timeout} s"
        )
        lines = [f"expected every node Synced in a cluster of {expected}; {why}:"]
        lines += [f"  node {i}: {status}" for i, status in statuses.items()]
        for i in lagging:
            log = self.node(i).error_log
            lines.append(f"last lines of node {i}'s {log}:\n{log_tail(log)}")
        return "\n".join(lines)

    def _status(self, i: int) -> _Status:
        try:
            conn = self.connect(
                i,
                connect_timeout=_PROBE_TIMEOUT,
                read_timeout=_PROBE_TIMEOUT,
                write_timeout=_PROBE_TIMEOUT,
            )
        except pymysql.MySQLError as err:
            return _Status(f"unreachable ({err.args[-1]})", 0)
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('wsrep_local_state_comment', 'wsrep_cluster_size')"
                )
                values = {str(name).lower(): str(value) for name, value in cursor.fetchall()}
        except pymysql.MySQLError as err:
            return _Status(f"no status ({err.args[-1]})", 0)
        finally:
            conn.close()
        size = values.get("wsrep_cluster_size", "0")
        return _Status(
            values.get("wsrep_local_state_comment", "?"), int(size) if size.isdigit() else 0
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    """The one-letter state of ``pid`` in /proc ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""
