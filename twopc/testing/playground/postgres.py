"""One throwaway PostgreSQL server on 127.0.0.1, for the SQL decision log's tests and benchmark.

``initdb`` and ``postgres`` refuse to run as root: as root they run as the ``postgres`` user
(``runuser``), in a base directory that user owns. The server listens on a free TCP port and keeps
its Unix socket in the base directory; ``trust`` authentication for the superuser ``postgres``
on loopback. Durable commits (``fsync``, ``synchronous_commit`` on: the defaults).

Typical use::

    pg = PostgresInstance(Path(tempfile.mkdtemp()))
    pg.start()
    pg.url("twopc_log")      # postgresql://postgres@127.0.0.1:<port>/twopc_log
    pg.stop()
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from twopc.testing.playground.mariadb import PlaygroundError
from twopc.testing.playground.ports import LOOPBACK, free_port

__all__ = ["BIN_DIRS", "PostgresInstance", "PostgresNotInstalled", "PostgresStartFailed"]

#: Where the server binaries are looked for (Debian's versioned directories, newest first).
BIN_DIRS = tuple(
    sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
)
_POLL_INTERVAL = 0.02


class PostgresNotInstalled(PlaygroundError):
    """initdb or postgres is missing: run deploy/setup.sh (it installs the postgresql package)."""


class PostgresStartFailed(PlaygroundError):
    """initdb failed, or the server exited while starting or did not answer in time."""


def _find_bin_dir() -> Path:
    for directory in BIN_DIRS:
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).parent
    raise PostgresNotInstalled(
        "PostgreSQL's initdb and postgres not found in /usr/lib/postgresql/*/bin or on PATH; "
        "run deploy/setup.sh (it installs the postgresql package)"
    )


class PostgresInstance:
    """A PostgreSQL server with its own data directory and port under ``base_dir``.

    Args:
        base_dir: a directory the instance owns (made over to the ``postgres`` user when this
            process is root); it must be reachable by that user (not under a 0700 directory
            of root's).
    """

    def __init__(self, base_dir: Path, port: int = 0) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.port = port or free_port()
        self._bin = _find_bin_dir()
        self._as_root = os.geteuid() == 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"

    def _command(self, *argv: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def initialize(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            user = pwd.getpwnam("postgres")
            os.chown(self.base_dir, user.pw_uid, user.pw_gid)
        result = subprocess.run(
            self._command(
                str(self._bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",  # a throwaway cluster: its later commits are durable, not initdb
                "-E",
                "UTF8",
            ),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresStartFailed(
                f"initdb exited with {result.returncode}: {result.stderr.decode()[-2000:]}"
            )

    def start(self, timeout: float = 30.0) -> None:
        """Initialises if needed, starts the server, waits until it answers.

        Raises:
            PostgresStartFailed: it exited while starting or did not answer within ``timeout``.
        """
        self.initialize()
        with self.log_file.open("ab") as output:
            self._proc = subprocess.Popen(
                self._command(
                    str(self._bin / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-h",
                    LOOPBACK,
                    "-k",
                    str(self.base_dir),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                ),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Waits until ``SELECT 1`` answers, at most ``timeout`` seconds (the server is stopped
        then); between probes it waits on the process, so that an exit ends the wait at once."""
        deadline = time.monotonic() + timeout
        while not self._answers():
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                raise PostgresStartFailed(f"postgres exited with {proc.returncode}; {self._tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise PostgresStartFailed(f"no answer within {timeout} s; {self._tail()}")
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=min(_POLL_INTERVAL, remaining))

    def _answers(self) -> bool:
        import psycopg  # noqa: PLC0415  # only the SQL log's tests and benchmark need it

        try:
            with psycopg.connect(self.url(), connect_timeout=1) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def _tail(self) -> str:
        try:
            return f"last lines of {self.log_file}:\n{self.log_file.read_text()[-2000:]}"
        except OSError:
            return f"{self.log_file} unreadable"

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT); SIGKILL after ``timeout``. Does nothing when not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # runuser forwards the signal to postgres
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def create_database(self, name: str) -> str:
        """Creates database ``name`` and returns its URL."""
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
