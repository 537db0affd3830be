"""One throwaway MariaDB server (a "region") on 127.0.0.1, for the demo, tests and fault harnesses.

The settings keep what proto/PROTOCOL.md relies on (its MariaDB section) and start fast: durable
commits (``innodb_flush_log_at_trx_commit=1``), no binlog, no performance schema, small caches
and an 8M redo log, so that initialising a data directory takes well under a second and a start
~0.1 s.

Typical use::

    db = MariaDBInstance("eu", tmp_path / "eu")
    db.start()                      # initialises base_dir/data first when needed
    with db.connect() as conn: ...
    db.kill(signal.SIGKILL)
    db.wait_stopped(5)
    subprocess.Popen(db.command_line(), start_new_session=True, ...)  # a harness restarts it
    db.wait_ready(10)
    db.stop()

The server runs in a session of its own (terminal signals never reach it) and writes only to files
in ``base_dir``: ``data/``, ``tmp/``, ``err.log`` (the server's log), ``mariadbd.out`` (its stdout
and stderr), ``install-db.log`` and the pid file. It outlives the Python process that started it
unless someone stops it.

Errors (the playground's own, not twopc's: they report a broken test machine, not a transaction)::

    PlaygroundError
    ├── MariaDBNotInstalled     mariadbd or mariadb-install-db missing: run deploy/setup.sh
    ├── MariaDBInitFailed       mariadb-install-db failed
    ├── MariaDBStartFailed      the server died or did not answer in time
    └── MariaDBNotRunning       a signal for a server that is not running

Waits that run out raise the built-in ``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql

from participants.grants import least_grants, quote_name
from twopc.sql_guard import DEFAULT_MARKER_TABLE
from twopc.testing.playground.ports import LOOPBACK, free_port

__all__ = [
    "AGENT_PASSWORD_ENV",
    "AGENT_USER",
    "LOCK_WAITS_PASSWORD_ENV",
    "LOCK_WAITS_USER",
    "RELAY_USER",
    "SEARCH_DIRS",
    "MariaDBBinaries",
    "MariaDBInitFailed",
    "MariaDBInstance",
    "MariaDBNotInstalled",
    "MariaDBNotRunning",
    "MariaDBStartFailed",
    "PlaygroundError",
    "create_agent_user",
    "create_lock_waits_user",
    "create_relay_user",
    "find_binaries",
    "log_tail",
    "start_all",
]

#: The database user the playground's agents run as (``create_agent_user``), and the variable
#: that hands them its password (the agent's default ``mysql_password_env``).
AGENT_USER = "twopc_agent"
AGENT_PASSWORD_ENV = "TWOPC_MYSQL_PASSWORD"  # noqa: S105 (a variable name)
#: The user the playground's agents read lock waits as (PROCESS only), and its password's variable.
LOCK_WAITS_USER = "twopc_lockwait"
RELAY_USER = "twopc_relay"  # twopc relay's account: SELECT and DELETE on the outbox only
LOCK_WAITS_PASSWORD_ENV = "TWOPC_LOCK_WAITS_PASSWORD"  # noqa: S105 (a variable name)

#: Where ``find_binaries`` looks after PATH (Debian puts mariadbd in /usr/sbin, often not on PATH).
SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/mysql/bin", "/usr/local/mysql/scripts")

_SETUP_HINT = "run deploy/setup.sh (it installs the mariadb-server package)"
_POLL_INTERVAL = 0.02  # seconds between readiness probes; a start takes ~0.1 s
_PROBE_TIMEOUT = 1  # seconds, for each readiness probe
_TAIL_LINES = 25
_EMPTY = "    (empty)"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on BSDs
_PORT_ATTEMPTS = 3  # a port picked by free_port() can be taken before mariadbd binds it


class PlaygroundError(Exception):
    """Root of the playground's errors: the local test cluster could not be set up or driven."""


class MariaDBNotInstalled(PlaygroundError):
    """``mariadbd`` or ``mariadb-install-db`` is missing; ``deploy/setup.sh`` installs them."""


class MariaDBInitFailed(PlaygroundError):
    """``mariadb-install-db`` failed; the message carries the end of its output."""


class MariaDBStartFailed(PlaygroundError):
    """The server exited while starting, or did not answer in time; the message carries the end
    of its error log."""


class MariaDBNotRunning(PlaygroundError):
    """A signal was meant for a server that is not running."""


class _PortTaken(MariaDBStartFailed):
    """mariadbd could not bind its port (another process took it since it was picked)."""


@dataclass(frozen=True)
class MariaDBBinaries:
    """Where the server binaries are.

    Attributes:
        mariadbd: the server.
        install_db: ``mariadb-install-db``, which creates a data directory.
        basedir: passed as ``--basedir`` when set (tarball installs outside /usr need it).
    """

    mariadbd: Path
    install_db: Path
    basedir: Path | None = None

    def check(self) -> None:
        """Raise ``MariaDBNotInstalled`` unless both binaries exist and are executable."""
        missing = [str(p) for p in (self.mariadbd, self.install_db) if not _is_executable(p)]
        if missing:
            raise MariaDBNotInstalled(
                f"MariaDB binaries not found or not executable: {', '.join(missing)}; {_SETUP_HINT}"
            )


def find_binaries(path: str | None = None) -> MariaDBBinaries:
    """Find ``mariadbd`` and ``mariadb-install-db`` on ``path``, then in ``SEARCH_DIRS``.

    Args:
        path: a PATH-style list of directories; the process's PATH when None.

    Raises:
        MariaDBNotInstalled: either binary is missing; the message says to run deploy/setup.sh.
    """
    if path is None:
        path = os.environ.get("PATH", os.defpath)
    search = os.pathsep.join([path, *SEARCH_DIRS])
    mariadbd = shutil.which("mariadbd", path=search)
    install_db = shutil.which("mariadb-install-db", path=search)
    if mariadbd is None or install_db is None:
        missing = [
            name
            for name, found in (("mariadbd", mariadbd), ("mariadb-install-db", install_db))
            if found is None
        ]
        raise MariaDBNotInstalled(
            f"{' and '.join(missing)} not found on PATH or in {', '.join(SEARCH_DIRS)}; "
            f"{_SETUP_HINT}"
        )
    install_path = Path(install_db)
    prefix = install_path.parent.parent
    basedir = prefix if prefix == Path("/usr/local/mysql") else None
    return MariaDBBinaries(mariadbd=Path(mariadbd), install_db=install_path, basedir=basedir)


class MariaDBInstance:
    """One MariaDB server with its own data directory, port and logs under ``base_dir``.

    The object holds no connection; it can drive a server that an outside harness restarted with
    ``command_line()`` (it finds the process through the pid file). Not thread-safe: drive each
    instance from one thread at a time (``start_all`` gives each its own).

    Args:
        name: a label for messages (the region's name).
        base_dir: a directory the instance owns; created when missing.
        port: the TCP port on 127.0.0.1; 0 picks a free one now (and another one at start if
            something took it in the meantime).
        buffer_pool: ``innodb_buffer_pool_size``; at least 6M, and 32M or more for anything
            that is measured.
        binaries: where the server is; ``find_binaries()`` when None (looked up at first use).
        extra_args: more server options, appended after the defaults (so they win), e.g.
            ``["--log-bin", "--sync-binlog=1"]``; a public attribute, read at each start.
        user: the system user the server runs as when this process is root (``--user``), who
            is then made owner of ``base_dir``; root when None. Ignored for anyone else (the
            server runs as this process's user). Galera nodes need ``"mysql"``: as root, the
            rsync state transfer drops to ``nobody`` and cannot write the data directory.
    """

    def __init__(
        self,
        name: str,
        base_dir: Path,
        port: int = 0,
        *,
        buffer_pool: str = "32M",
        binaries: MariaDBBinaries | None = None,
        extra_args: Sequence[str] = (),
        user: str | None = None,
    ) -> None:
        self.name = name
        self.base_dir = Path(base_dir).absolute()
        self.buffer_pool = buffer_pool
        self.extra_args = tuple(extra_args)
        self._auto_port = port == 0
        self._port = port or free_port()
        self._binaries = binaries
        self._as_root = os.geteuid() == 0
        self._user = user
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"MariaDBInstance({self.name!r}, {self.address}, {str(self.base_dir)!r})"

    # -- where things are ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self._port}"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        """The Unix socket; in /tmp under a name derived from ``base_dir`` when the natural path
        would be too long for a socket address."""
        natural = self.base_dir / "mysqld.sock"
        if len(os.fsencode(natural)) <= _MAX_SOCKET_PATH:
            return natural
        digest = hashlib.sha256(os.fsencode(self.base_dir)).hexdigest()[:16]
        return Path("/tmp") / f"twopc-mariadb-{digest}.sock"  # noqa: S108  # short, per base_dir

    @property
    def tmp_dir(self) -> Path:
        """The server's ``--tmpdir``: bootstraps that share /tmp collide on temporary tables."""
        return self.base_dir / "tmp"

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "mysqld.pid"

    @property
    def error_log(self) -> Path:
        return self.base_dir / "err.log"

    @property
    def output_log(self) -> Path:
        """The server's stdout and stderr (little goes there: it writes to ``error_log``)."""
        return self.base_dir / "mariadbd.out"

    @property
    def install_log(self) -> Path:
        return self.base_dir / "install-db.log"

    @property
    def binaries(self) -> MariaDBBinaries:
        if self._binaries is None:
            self._binaries = find_binaries()
        return self._binaries

    @property
    def is_initialized(self) -> bool:
        return self._initialized_marker.exists()

    @property
    def _initialized_marker(self) -> Path:
        return self.base_dir / "initialized"

    # -- lifecycle ----------------------------------------------------------------------------

    def initialize(self, timeout: float = 120.0) -> None:
        """Create the data directory with ``mariadb-install-db``, unless that was done already.

        A data directory left by an interrupted initialisation is removed and created again.

        Raises:
            MariaDBNotInstalled: the binaries are missing.
            MariaDBInitFailed: mariadb-install-db failed or took longer than ``timeout``.
        """
        if self.is_initialized:
            return
        binaries = self.binaries
        binaries.check()
        self._make_dirs()
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        argv = [
            str(binaries.install_db),
            "--no-defaults",  # must come first
            f"--datadir={self.data_dir}",
            *self._user_args(),
            *self._basedir_args(),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *self._server_settings(),
        ]
        with self.install_log.open("wb") as log:
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                    start_new_session=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as err:
                raise MariaDBInitFailed(
                    f"{self.name}: mariadb-install-db did not finish within {timeout} s; "
                    f"last lines of {self.install_log}:\n{log_tail(self.install_log)}"
                ) from err
        if result.returncode != 0:
            raise MariaDBInitFailed(
                f"{self.name}: mariadb-install-db exited with {result.returncode}; "
                f"last lines of {self.install_log}:\n{log_tail(self.install_log)}"
            )
        self._initialized_marker.touch()

    def command_line(self) -> list[str]:
        """The exact argv that ``start()`` runs; a harness can restart the server with it."""
        return [
            str(self.binaries.mariadbd),
            "--no-defaults",  # must come first
            f"--datadir={self.data_dir}",
            *self._user_args(),
            *self._basedir_args(),
            f"--port={self._port}",
            f"--bind-address={self.host}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.error_log}",
            "--max-connections=500",
            *self._server_settings(),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> int:
        """Initialise if needed, spawn the server detached, and wait until ``SELECT 1`` answers.

        Returns:
            The server's pid.

        Raises:
            MariaDBNotInstalled: the binaries are missing.
            MariaDBInitFailed: the data directory could not be created.
            MariaDBStartFailed: the server is already running, exited while starting, or did not
                answer within ``timeout`` (it is killed then); the message ends with the
                server's error log from this start.
        """
        running = self.pid()
        if running is not None:
            raise MariaDBStartFailed(f"{self.name}: already running (pid {running})")
        self.binaries.check()
        self.initialize()
        deadline = time.monotonic() + timeout
        retries = _PORT_ATTEMPTS - 1 if self._auto_port else 0
        for _ in range(retries):
            try:
                return self._start_once(deadline, timeout)
            except _PortTaken:
                self._port = free_port()
        return self._start_once(deadline, timeout)

    def pid(self) -> int | None:
        """The running server's pid, or None.

        The child this object spawned, else the pid in the pid file when that process is alive
        (not a zombie) and runs on this data directory.
        """
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None  # reaped; a harness may have started another one since
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _is_alive(pid) and self._runs_here(pid):
            return pid
        return None

    def is_running(self) -> bool:
        """True while the server process exists, also while it is stopped by SIGSTOP."""
        return self.pid() is not None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server answers ``SELECT 1``: for a server that a harness started with
        ``command_line()`` (``start()`` waits by itself).

        Raises:
            TimeoutError: no answer within ``timeout`` seconds.
            MariaDBStartFailed: another server (another data directory) answers on the port.
        """
        deadline = time.monotonic() + timeout
        while not self._answers():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: no answer to SELECT 1 on {self.address} within {timeout} s; "
                    f"last lines of {self.error_log}:\n{log_tail(self.error_log)}"
                )
            time.sleep(min(_POLL_INTERVAL, remaining))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server (SIGKILL, SIGSTOP, SIGCONT, SIGTERM, ...).

        Raises:
            MariaDBNotRunning: there is no server process.
        """
        pid = self.pid()
        if pid is None:
            raise MariaDBNotRunning(f"{self.name}: not running")
        try:
            os.kill(pid, sig)
        except ProcessLookupError as err:
            raise MariaDBNotRunning(f"{self.name}: pid {pid} exited before the signal") from err

    def wait_stopped(self, timeout: float) -> None:
        """Wait until the server process has exited (returns at once if it is not running).

        Raises:
            TimeoutError: it still runs after ``timeout`` seconds.
        """
        pid = self.pid()
        if pid is not None:
            self._wait_exit(pid, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down with SIGTERM; SIGKILL it if it has not exited after ``timeout``.

        A server stopped with SIGSTOP is continued so that it sees the SIGTERM. Does nothing when
        the server is not running.
        """
        pid = self.pid()
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGCONT):
            _signal(pid, sig)
        try:
            self._wait_exit(pid, timeout)
        except TimeoutError:
            _signal(pid, signal.SIGKILL)
            self._wait_exit(pid, timeout)
        self.pid()  # reaps our child

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.Connection:
        """A new connection as root over TCP, with autocommit on (XA needs it).

        Keyword arguments go to ``pymysql.connect`` and override the defaults.
        """
        options: dict[str, Any] = {
            "host": self.host,
            "port": self._port,
            "user": "root",
            "password": "",
            "database": database,
            "autocommit": True,
            "connect_timeout": 5,
            # Plain, as the server is: PyMySQL otherwise builds an SSL context with the
            # system's CA bundle for every connection (about 30 ms of CPU here).
            "ssl_disabled": True,
        }
        options.update(kwargs)
        return pymysql.connect(**options)

    # -- internals ----------------------------------------------------------------------------

    def _server_settings(self) -> list[str]:
        """Options shared by mariadb-install-db's bootstrap and the server."""
        return [
            f"--tmpdir={self.tmp_dir}",
            f"--innodb-buffer-pool-size={self.buffer_pool}",
            "--innodb-log-file-size=8M",  # written in full at init: 96M costs a second
            "--innodb-log-buffer-size=2M",
            "--innodb-flush-log-at-trx-commit=1",  # durable, whatever the default becomes
            "--innodb-use-native-aio=0",  # no io_uring/libaio: containers often refuse them
            "--key-buffer-size=1M",
            "--aria-pagecache-buffer-size=1M",
            "--skip-log-bin",
            "--performance-schema=OFF",
            "--skip-name-resolve",
        ]

    def _user_args(self) -> list[str]:
        # mariadbd refuses to run as root unless told to; as anyone else --user would fail.
        return [f"--user={self._user or 'root'}"] if self._as_root else []

    def _make_dirs(self) -> None:
        """``base_dir`` and ``tmp_dir``, owned by ``user`` when the server drops to it (it
        writes its pid file, socket and error log there)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root and self._user not in (None, "root"):
            for path in (self.base_dir, self.tmp_dir):
                shutil.chown(path, self._user)

    def _basedir_args(self) -> list[str]:
        basedir = self.binaries.basedir
        return [f"--basedir={basedir}"] if basedir is not None else []

    def _start_once(self, deadline: float, timeout: float) -> int:
        self._make_dirs()
        offsets = (_size(self.error_log), _size(self.output_log))
        with self.output_log.open("ab") as output:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
            )
        self._proc = proc
        try:
            return self._wait_started(proc, offsets, deadline, timeout)
        except BaseException:
            if proc.poll() is None:  # do not leave a half-started server behind
                proc.kill()
                proc.wait()
            self._proc = None
            raise

    def _wait_started(
        self,
        proc: subprocess.Popen[bytes],
        offsets: tuple[int, int],
        deadline: float,
        timeout: float,
    ) -> int:
        while True:
            returncode = proc.poll()
            if returncode is not None:
                logs = self._logs_since(offsets)
                if self._auto_port and "Address already in use" in logs:
                    raise _PortTaken(f"{self.name}: port {self._port} taken:\n{logs}")
                raise MariaDBStartFailed(
                    f"{self.name}: mariadbd exited with {returncode} while starting; {logs}"
                )
            if self._answers():
                return proc.pid
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MariaDBStartFailed(
                    f"{self.name}: no answer to SELECT 1 on {self.address} within {timeout} s "
                    f"(server killed); {self._logs_since(offsets)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):  # ends early if it dies
                proc.wait(timeout=min(_POLL_INTERVAL, remaining))

    def _logs_since(self, offsets: tuple[int, int]) -> str:
        """What this start wrote to the error log (and to stdout/stderr, if anything)."""
        text = f"last lines of {self.error_log}:\n{log_tail(self.error_log, offsets[0])}"
        output = log_tail(self.output_log, offsets[1])
        if output != _EMPTY:
            text += f"\nlast lines of {self.output_log}:\n{output}"
        return text

    def _answers(self) -> bool:
        """True when our server answers ``SELECT 1``; raises if another server holds the port."""
        try:
            conn = self.connect(  # read/write timeouts too: a frozen server accepts but is mute
                connect_timeout=_PROBE_TIMEOUT,
                read_timeout=_PROBE_TIMEOUT,
                write_timeout=_PROBE_TIMEOUT,
            )
        except pymysql.MySQLError:
            return False
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1, @@datadir")
                row = cursor.fetchone()
        except pymysql.MySQLError:
            return False
        finally:
            conn.close()
        if row is None or row[0] != 1:
            return False
        if Path(str(row[1])).resolve() != self.data_dir.resolve():
            raise MariaDBStartFailed(
                f"{self.name}: another server (datadir {row[1]}) answers on {self.address}"
            )
        return True

    def _runs_here(self, pid: int) -> bool:
        """Whether ``pid`` is a server on this data directory (guards against a reused pid)."""
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return not Path("/proc/self").exists()  # no procfs: trust the pid file
        except OSError:
            return False
        return os.fsencode(f"--datadir={self.data_dir}") in args

    def _wait_exit(self, pid: int, timeout: float) -> None:
        proc = self._proc
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                raise TimeoutError(
                    f"{self.name}: pid {pid} still running after {timeout} s"
                ) from err
            self._proc = None
            return
        if not _wait_pidfd(pid, timeout):
            raise TimeoutError(f"{self.name}: pid {pid} still running after {timeout} s")


def start_all(instances: Sequence[MariaDBInstance], timeout: float = 30.0) -> list[int]:
    """Initialise (where needed) and start ``instances`` in parallel; return their pids.

    If any fails, the ones that started are stopped again and the first error is raised (the
    others are attached to it as notes).
    """
    if not instances:
        return []
    with ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix="mariadb") as pool:
        futures = [pool.submit(instance.start, timeout) for instance in instances]
    errors = [err for err in (f.exception() for f in futures) if err is not None]
    if errors:
        for instance, future in zip(instances, futures, strict=True):
            if future.exception() is None:
                instance.stop()
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other!r}")
        raise first
    return [future.result() for future in futures]


def create_lock_waits_user(
    conn: pymysql.Connection,
    password: str,
    *,
    user: str = LOCK_WAITS_USER,
    host: str = LOOPBACK,
) -> str:
    """Creates (or re-creates) the user an agent reads lock waits as (``lock_waits_user``):
    PROCESS, which shows INNODB_LOCK_WAITS and INNODB_TRX, and nothing else (no right on any
    schema), so that the agent's own user keeps its least privileges. Returns the account."""
    account = f"{quote_name(user)}@{quote_name(host)}"
    with conn.cursor() as cursor:
        cursor.execute(
            f"CREATE OR REPLACE USER {account.replace('%', '%%')} IDENTIFIED BY %s", [password]
        )
        cursor.execute(f"GRANT PROCESS ON *.* TO {account}")
    return account


def create_relay_user(
    conn: pymysql.Connection, password: str, database: str, *, host: str = LOOPBACK
) -> str:
    """Creates (or re-creates) the account ``twopc relay`` reads the outbox as: SELECT and
    DELETE on ``database``'s ``twopc_outbox``, nothing else. Returns the account."""
    account = f"{quote_name(RELAY_USER)}@{quote_name(host)}"
    with conn.cursor() as cursor:
        cursor.execute(
            f"CREATE OR REPLACE USER {account.replace('%', '%%')} IDENTIFIED BY %s", [password]
        )
        cursor.execute(f"GRANT SELECT, DELETE ON {quote_name(database)}.twopc_outbox TO {account}")
    return account


def create_agent_user(
    conn: pymysql.Connection,
    password: str,
    database: str,
    *,
    user: str = AGENT_USER,
    host: str = LOOPBACK,
    marker_table: str = DEFAULT_MARKER_TABLE,
    lock_waits: bool = False,
) -> str:
    """Creates (or re-creates, with this password) the database user an agent runs as, with the
    least privileges it needs on ``database`` and nothing else: rows of ``database``'s tables,
    and CREATE on its marker table (``participants.grants.least_grants``). No FILE, no SUPER,
    nothing on ``mysql.*`` or on any other schema. ``conn`` is a root connection. Returns the
    account as written in SQL (```twopc_agent`@`127.0.0.1```). ``lock_waits``: PROCESS too,
    for an agent that reports lock waits (``report_lock_waits``)."""
    account = f"{quote_name(user)}@{quote_name(host)}"
    with conn.cursor() as cursor:
        # The account may hold a host pattern's '%': doubled, since the password is a parameter.
        cursor.execute(
            f"CREATE OR REPLACE USER {account.replace('%', '%%')} IDENTIFIED BY %s", [password]
        )
        grants = least_grants(account, [database], database, marker_table, lock_waits=lock_waits)
        for statement in grants:
            cursor.execute(statement)
    return account


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile, as the caller wants
        os.kill(pid, sig)


def _is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs, or it exited just now: the next look will tell
    state = stat.rpartition(")")[2].split()[0]  # the command name may contain spaces
    return state not in {"Z", "X"}


def _wait_pidfd(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (not necessarily our child) exits; False if it still runs at timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): look every few ms
        return _poll_exit(pid, timeout)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return bool(readable) or not _is_alive(pid)


def _poll_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(path: Path, offset: int = 0, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` from byte ``offset`` on (a placeholder if empty)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError as err:
        return f"    (cannot read {path}: {err})"
    kept = text.splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept) if kept else _EMPTY
