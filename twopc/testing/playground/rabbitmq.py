"""One throwaway RabbitMQ node on 127.0.0.1, for the flash sale's queue and the outbox relay.

The node gets its own name (``twopc-<port>@localhost``), AMQP port, distribution port and
directories, so it runs beside a system RabbitMQ (which keeps ``/etc/rabbitmq``'s settings: this
node reads its own configuration and an empty environment file instead). The distribution's
``/usr/sbin/rabbitmq-server`` wrapper switches to the ``rabbitmq`` user when run as root; the node
is started from the real script under ``/usr/lib/rabbitmq/bin`` as whoever runs it, with
``HOME`` in its directory (its Erlang cookie). The ``guest`` user may log in over loopback.

Messages are durable: queues declared durable and persistent messages survive a SIGKILL of the
node (the flash sale's and the outbox's invariants depend on it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from twopc.testing.playground.mariadb import PlaygroundError
from twopc.testing.playground.ports import LOOPBACK, free_port

__all__ = ["RabbitMQInstance", "RabbitMQNotInstalled", "amqp_answers"]

_SCRIPT_DIRS = (Path("/usr/lib/rabbitmq/bin"),)


class RabbitMQNotInstalled(PlaygroundError):
    """No RabbitMQ server scripts: ``deploy/setup.sh`` installs the distribution's package."""


def _server_script() -> str:
    for directory in _SCRIPT_DIRS:
        script = directory / "rabbitmq-server"
        if script.exists():
            return str(script)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RabbitMQNotInstalled(
            "rabbitmq-server is not installed; run deploy/setup.sh (it installs the "
            "distribution's rabbitmq-server package)"
        )
    return found


def amqp_answers(address: str) -> bool:
    """An AMQP 0-9-1 protocol header sent to ``address`` is answered (Connection.Start)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as conn:
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            return len(conn.recv(8)) > 0
    except OSError:
        return False


class RabbitMQInstance:
    def __init__(self, base_dir: Path, port: int = 0) -> None:
        self._script = _server_script()
        self.base_dir = base_dir
        self.port = port or free_port()
        self.dist_port = free_port()
        self.node_name = f"twopc-{self.port}@localhost"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/%2F"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    def command(self) -> list[str]:
        return [self._script]

    def environment(self) -> dict[str, str]:
        """The node's variables (over the caller's environment), its files written."""
        base = self.base_dir
        (base / "mnesia").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {LOOPBACK}:{self.port}\nloopback_users = none\n"
        )
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        return {
            "HOME": str(base),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": LOOPBACK,
        }

    def start(self, timeout: float = 60.0) -> None:
        """Starts the node (a stopped or killed one again, with its durable queues) and waits
        until it takes AMQP connections."""
        out = (self.base_dir / "server.out").open("ab") if self.base_dir.exists() else None
        if out is None:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            out = (self.base_dir / "server.out").open("ab")
        with out:
            self._process = subprocess.Popen(
                self.command(),
                env={**os.environ, **self.environment()},
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its Erlang processes in one group, killed together
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                raise PlaygroundError(
                    f"rabbitmq-server exited at start; see {self.base_dir / 'server.out'}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise PlaygroundError(f"rabbitmq-server did not answer within {timeout:g} s")
            time.sleep(0.1)

    def _answers(self) -> bool:
        return amqp_answers(f"{LOOPBACK}:{self.port}")

    def server_pid(self) -> int | None:
        """The pid of the node's Erlang VM (beam.smp), a descendant of the start script."""
        if self._process is None:
            return None
        parents: dict[int, int] = {}
        names: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                name, rest = (entry / "stat").read_text().rsplit(")", 1)
            except OSError:
                continue
            parents[int(entry.name)] = int(rest.split()[1])
            names[int(entry.name)] = name.split("(", 1)[1]
        for pid, name in names.items():
            ancestor = parents.get(pid)
            while name.startswith("beam") and ancestor:
                if ancestor == self._process.pid:
                    return pid
                ancestor = parents.get(ancestor)
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the node's process group; SIGKILL and SIGTERM wait until it is
        gone. (The shared epmd daemon is not in the group.)"""
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
            deadline = time.monotonic() + 30
            while self._answers() and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        if self._process is None:
            return
        self.kill(signal.SIGTERM)
        self._process = None
