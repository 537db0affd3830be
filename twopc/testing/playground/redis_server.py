"""One throwaway Redis server on 127.0.0.1, for the flash sale's stock gate.

It keeps nothing on disk (no RDB snapshot, no AOF): the gate it serves is a cache of the
database's stock, re-seeded from the database after a restart, so a restart is allowed to lose
everything, and the flash sale tests exactly that.

Typical use::

    redis = RedisInstance(Path(tempfile.mkdtemp()))
    redis.start()
    redis.url            # redis://127.0.0.1:<port>/0
    redis.kill()         # SIGKILL: the gate's counters are gone
    redis.start()
    redis.stop()
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from twopc.testing.playground.mariadb import PlaygroundError
from twopc.testing.playground.ports import LOOPBACK, free_port

__all__ = ["RedisInstance", "RedisNotInstalled"]


class RedisNotInstalled(PlaygroundError):
    """No ``redis-server`` on PATH: ``deploy/setup.sh`` installs it."""


class RedisInstance:
    def __init__(self, base_dir: Path, port: int = 0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled(
                "redis-server is not installed; run deploy/setup.sh (it installs the "
                "distribution's redis-server package)"
            )
        self._binary = binary
        self.base_dir = base_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Starts the server (a stopped or killed one again, empty) and waits until it answers."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self._binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.base_dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_file),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                raise PlaygroundError(f"redis-server exited at start; see {self.log_file}")
            if time.monotonic() > deadline:
                raise PlaygroundError(f"redis-server did not answer within {timeout:g} s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig``; SIGKILL (and SIGTERM) wait for the process to be gone."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self._process.wait(timeout=30)

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._process.terminate()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None
