"""The agent's edge to MySQL/MariaDB: pooled aiomysql sessions, XA statements, driver errors.

Everything driver-specific stays in this module; the rest of the agent sees
``Session`` objects and ``DbError``. XIDs are written as hex literals (XA statements take no
placeholders). Sessions run with autocommit on: with pymysql's default autocommit off,
XA START fails with XAER_OUTSIDE after any earlier statement.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomysql
import pymysql
from pymysql.charset import charset_by_name
from pymysql.constants import CLIENT, COMMAND

from participants.mysql_tls import TlsRequiredConnection
from twopc.txid import Xid
from twopc.values import SqlValue

# MySQL error numbers the agent acts on.
ER_DUP_ENTRY = 1062
ER_QUERY_INTERRUPTED = 1317
ER_XAER_NOTA = 1397
ER_XAER_INVAL = 1398
ER_XAER_RMFAIL = 1399
ER_XA_RBROLLBACK = 1402
ER_XAER_DUPID = 1440
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ER_NO_SUCH_THREAD = 1094
_CONNECTION_LOST = {0, 2003, 2006, 2013, 2014, 2045, 2055}
COM_RESET_CONNECTION = 0x1F  # not among PyMySQL's COMMAND constants
CHARSET = "utf8mb4"


class DbError(Exception):
    """A statement failed on the server. ``errno`` is the MySQL error number."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"({errno}) {message}")
        self.errno = errno
        self.message = message


class ConnectionLost(DbError):
    """The connection to the server broke: what the server did with the last statement is
    unknown."""


class PoolExhausted(DbError):
    """Every session of the agent's pool is in use (held by open branches) and none came free
    in time: the database was not asked anything."""


class BatchFailed(Exception):
    """A statement of a batch failed: ``completed`` statements ran before it, ``error`` is its
    error (the server runs none of the statements after it)."""

    def __init__(self, completed: int, error: DbError) -> None:
        super().__init__(f"statement {completed + 1} of the batch failed: {error}")
        self.completed = completed
        self.error = error


@dataclass(frozen=True)
class StatementOutput:
    affected_rows: int
    last_insert_id: int
    columns: list[str]
    rows: list[tuple[Any, ...]]


async def _output_of(cursor: Any) -> StatementOutput:
    """The output of the statement whose result the cursor holds."""
    columns = [d[0] for d in cursor.description] if cursor.description else []
    rows = list(await cursor.fetchall()) if columns else []
    affected = 0 if columns else max(cursor.rowcount, 0)
    return StatementOutput(affected, cursor.lastrowid or 0, columns, rows)


def check_rows(output: StatementOutput, max_rows: int) -> None:
    """``max_rows`` > 0 makes a larger result an error (nothing is cut)."""
    if max_rows and len(output.rows) > max_rows:
        raise DbError(
            0,
            f"result has {len(output.rows)} rows, more than the agent's max_result_rows "
            f"({max_rows}); add a LIMIT or narrow the query",
        )


def translate(err: Exception) -> DbError:
    """A pymysql exception as a ``DbError`` (``ConnectionLost`` when the link is gone)."""
    args: tuple[object, ...] = getattr(err, "args", ())
    errno = args[0] if args and isinstance(args[0], int) else 0
    message = str(args[1]) if len(args) > 1 else str(err)
    if isinstance(err, pymysql.err.InterfaceError | OSError) or errno in _CONNECTION_LOST:
        return ConnectionLost(errno, message or "connection to the database lost")
    return DbError(errno, message)


_DRIVER_ERRORS = (pymysql.err.MySQLError, OSError)
_TIMED_OUT = "Lost connection to MySQL server during query (timed out)"
T = TypeVar("T")
Pause = Callable[[], Awaitable[None]]
Pauses = Mapping[int, Pause]  # index of a statement -> a hook awaited before it is sent


def _parts(count: int, pauses: Pauses | None) -> list[tuple[int, int]]:
    """The (start, end) slices of ``count`` statements, cut before each paused index."""
    cuts = sorted(pauses or ())
    if cuts and not 0 < cuts[0] <= cuts[-1] < count:
        raise ValueError(f"pauses at {cuts} fall outside a batch of {count} statements")
    return list(itertools.pairwise([0, *cuts, count]))


class Session:
    """One pooled connection, used for one XA branch at a time or for administration. Its I/O
    runs on the event loop (aiomysql); a call that outlives its timeout closes the connection
    and raises ``ConnectionLost``, as a blocking driver's socket timeout would."""

    def __init__(
        self,
        conn: aiomysql.Connection,
        pool: SessionPool,
        *,
        read_timeout: float,
        command_timeout: float | None,
    ) -> None:
        self._conn = conn
        self._pool = pool
        self.thread_id: int = conn.thread_id()
        self._read_timeout = read_timeout
        self._command_timeout = command_timeout
        self._commands = 0
        self._returned = False
        # Set before a statement that may leave state on the session beyond its transaction
        # (the statement guard's ``session_state``): the pool then resets the session when it
        # comes back (see ``SessionPool.give_back``).
        self.reset_when_released = False

    @contextlib.contextmanager
    def commands(self) -> Iterator[None]:
        """Twopc's own commands get ``command_timeout`` instead of the read timeout that client
        statements need (they may run long)."""
        self._commands += 1
        try:
            yield
        finally:
            self._commands -= 1

    @property
    def _timeout(self) -> float:
        if self._commands and self._command_timeout is not None:
            return self._command_timeout
        return self._read_timeout

    async def _io(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await work()
        except TimeoutError:
            # The statement's answer is lost or late: the connection cannot carry another.
            self._conn.close()
            raise ConnectionLost(2013, _TIMED_OUT) from None
        except _DRIVER_ERRORS as err:
            raise translate(err) from err
        except RuntimeError as err:
            if not _transport_gone(self._conn):
                raise
            # uvloop refuses to write on a transport the peer has closed (asyncio ignores it)
            self._conn.close()
            raise ConnectionLost(2013, f"Lost connection to MySQL server ({err})") from err
        except BaseException:
            self._conn.close()  # cancelled mid-statement: where the protocol stands is unknown
            raise

    async def execute(
        self, sql: str, params: Sequence[SqlValue] | None = None, *, max_rows: int = 0
    ) -> StatementOutput:
        """Runs one statement. ``max_rows`` > 0 makes a larger result an error (nothing is cut)."""

        bound = self.bind(sql, params or ())

        async def run() -> StatementOutput:
            cursor = _Cursor(self._conn)
            await cursor.execute(bound)
            return await _output_of(cursor)

        output = await self._io(run)
        check_rows(output, max_rows)
        return output

    def bind(self, sql: str, params: Sequence[SqlValue]) -> str:
        """``sql`` with its ``%s`` placeholders replaced by literals, as ``execute`` sends it."""
        if not params:
            return sql
        return sql % tuple(_literal(value) for value in params)

    async def batch(
        self, statements: Sequence[str], pauses: Pauses | None = None
    ) -> list[StatementOutput]:
        """Runs bound statements in one round trip and returns the output of each. Each must be
        a single statement without its terminating ``;``; they are sent one per line, so that a
        trailing ``--`` or ``#`` comment ends where its statement does. Raises ``BatchFailed``
        at the first that fails; the server runs none after it.

        ``pauses`` maps a statement's index to a hook awaited before that statement is sent:
        the batch then goes in parts, cut at each index, with the hook in between. The
        statements sent, and their order, are the same with or without pauses; without any,
        it is one round trip. An error the hook raises leaves the batch there (the statements
        before it ran), and is raised as it is."""
        outputs: list[StatementOutput] = []
        for start, end in _parts(len(statements), pauses):

            async def run(part: Sequence[str] = statements[start:end]) -> None:
                cursor = _Cursor(self._conn)
                await cursor.execute("\n;\n".join(part))
                outputs.append(await _output_of(cursor))
                while await cursor.nextset():
                    outputs.append(await _output_of(cursor))

            try:
                await self._io(run)
            except DbError as err:
                raise BatchFailed(len(outputs), err) from err
            if len(outputs) != end:  # the guard splits statements as the server does
                raise BatchFailed(
                    len(outputs),
                    DbError(0, f"the server ran {len(outputs)} statements of {len(statements)}"),
                )
            if pauses and end in pauses:
                await pauses[end]()
        return outputs

    async def script(self, statements: Sequence[str], pauses: Pauses | None = None) -> None:
        """Runs statements of twopc's own (literals only, no parameters) in one round trip.
        The server stops at the first that fails, and that error is raised. ``pauses`` as for
        ``batch``."""
        with self.commands():
            for start, end in _parts(len(statements), pauses):

                async def run(part: Sequence[str] = statements[start:end]) -> None:
                    cursor = _Cursor(self._conn)
                    await cursor.execute("; ".join(part))
                    while await cursor.nextset():
                        pass

                await self._io(run)
                if pauses and end in pauses:
                    await pauses[end]()

    async def xa(self, command: str, xid: Xid, suffix: str = "") -> None:
        """``XA <command> <xid> [suffix]``, e.g. ``xa("COMMIT", xid, "ONE PHASE")``."""
        await self.command(f"XA {command} {xid.sql()} {suffix}".rstrip())

    def sever(self) -> None:
        """Drops the connection now: a read waiting on it fails at once (2013) instead of
        waiting for its timeout. The server sees the connection go when the FIN reaches it.
        The session is unusable afterwards."""
        writer = self._conn._writer
        if writer is not None:
            writer.transport.abort()

    async def command(self, sql: str) -> None:
        """One statement of twopc's own, under the command timeout (see ``commands``)."""
        with self.commands():
            await self.execute(sql)

    def release(self) -> None:
        """Returns the connection to the pool (only when no branch is attached to it). Every
        session checked out ends with ``release`` or ``discard``, once: nothing else gives its
        slot back to the pool."""
        if not self._returned:
            self._returned = True
            self._pool.give_back(self._conn, broken=False, reset=self.reset_when_released)

    def discard(self) -> None:
        """Closes the connection for good: the server detaches (prepared) or rolls back (active)
        whatever branch it held."""
        if not self._returned:
            self._returned = True
            self._pool.give_back(self._conn, broken=True)


class _Cursor(aiomysql.Cursor):  # type: ignore[misc]  # aiomysql has no type information
    """aiomysql's cursor without its SHOW WARNINGS after a statement that left warnings: a round
    trip more, and Python warnings that say nothing to an operator (a note from CREATE TABLE
    IF NOT EXISTS). PyMySQL, which the agent used before, stopped doing it in 1.0."""

    async def _show_warnings(self, conn: object) -> None:
        return None


def _literal(value: SqlValue) -> str:
    """A value as an SQL literal, as PyMySQL's ``Connection.escape`` writes it (aiomysql's
    ``escape`` fails on bytes with PyMySQL 1.2, so it is not used). Sessions run without
    NO_BACKSLASH_ESCAPES, so backslash escaping is right."""
    if isinstance(value, str):
        return "'" + pymysql.converters.escape_string(value) + "'"
    if isinstance(value, bytes | bytearray):
        return f"X'{value.hex()}'"
    return str(pymysql.converters.escape_item(value, "utf8mb4"))


def _transport_gone(conn: aiomysql.Connection) -> bool:
    writer = conn._writer
    return writer is None or writer.transport.is_closing()


def _unusable(conn: aiomysql.Connection) -> bool:
    """True when an idle connection cannot carry a statement: closed here, or the server closed
    it (EOF) or sent what nobody asked for. Seen without a round trip: the event loop has read
    whatever arrived."""
    reader = conn._reader
    if conn.closed or reader is None:
        return True
    return bool(reader.at_eof() or reader._buffer)


async def _reset(conn: aiomysql.Connection, settings: str) -> None:
    """COM_RESET_CONNECTION, then ``settings`` again, in one round trip (both commands are
    written before either answer is read; the server runs them in order). The reset ends the
    session's state as a new connection has none: user variables, user-level locks, temporary
    tables, prepared statements, LAST_INSERT_ID, session variables (back to the global values,
    which is why ``settings`` follow). aiomysql has no call for it: the packets are its own."""
    await conn._execute_command(COM_RESET_CONNECTION, b"")
    await conn._execute_command(COMMAND.COM_QUERY, settings)
    conn._next_seq_id = 1  # each answer opens a packet sequence of its own
    await conn._read_ok_packet()
    conn._next_seq_id = 1
    await conn._read_ok_packet()


class SessionPool:
    """A pool of aiomysql connections set up for XA: ``pool_size`` kept idle at most, up to
    ``overflow`` more opened under load and closed when returned, a checkout waits up to
    ``checkout_timeout`` for a free one. (aiomysql's own pool has no checkout timeout and keeps
    overflow connections; this one keeps the SQLAlchemy QueuePool behaviour the agent had.)

    A session that ran a statement that may have left state on it (a user variable or a lock
    set by a stored function or a trigger, an INSERT's LAST_INSERT_ID: see
    ``Session.reset_when_released``) is reset before it is idle again, so that nothing of one
    transaction meets the next. The reset runs after the release, off the caller's path; its
    slot is free once it is done (about 100 us: one round trip, 60 us of the agent's CPU)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str | None,
        pool_size: int,
        overflow: int,
        checkout_timeout: float,
        connect_timeout: float,
        read_timeout: float,
        lock_wait_timeout: int,
        idle_timeout: int,
        command_timeout: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._read_timeout = read_timeout
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._checkout_timeout = checkout_timeout
        self._pool_size = pool_size
        self._capacity = pool_size + overflow
        self._slots: asyncio.Semaphore | None = None  # made on the loop, at first use
        self.in_use = 0  # slots taken: sessions lent out, and connections being reset
        self.waiting = 0  # checkouts waiting for a free slot
        self._idle: collections.deque[aiomysql.Connection] = collections.deque()
        self._resetting: dict[asyncio.Future[None], aiomysql.Connection] = {}
        # sql_mode: the statement guard lexes quotes as MySQL does by default; the two modes
        # that change quoting are removed so that the server splits statements the same way.
        init = (
            f"SET SESSION innodb_lock_wait_timeout = {int(lock_wait_timeout)}, "
            f"wait_timeout = {int(idle_timeout)}, "
            "sql_mode = REPLACE(REPLACE(@@SESSION.sql_mode, 'NO_BACKSLASH_ESCAPES', ''), "
            "'ANSI_QUOTES', '')"
        )
        # What a reset (COM_RESET_CONNECTION) takes back to the global values, set again: the
        # connection's character set and collation as the handshake set them, autocommit, and
        # the settings above.
        collation = charset_by_name(CHARSET).collation  # type: ignore[attr-defined]  # untyped
        self._settings_after_reset = (
            f"SET NAMES {CHARSET} COLLATE {collation}, SESSION autocommit = 1, "
            + init.removeprefix("SET SESSION ")
        )
        self._connect_args: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "db": database,
            "autocommit": True,
            "charset": CHARSET,
            "connect_timeout": connect_timeout,
            "program_name": "twopc-agent",
            "init_command": init,
            # For Session.script: twopc's own statements in one round trip. Client SQL is
            # still one statement per call (the statement guard refuses ';').
            "client_flag": CLIENT.MULTI_STATEMENTS,
            "ssl": ssl_context,  # TLS required when given (participants.mysql_tls)
        }

    async def session(self) -> Session:
        """A pooled session. An idle connection that the server has closed (it restarted) is
        seen without a round trip; then every idle one is dropped, since they all went the
        same way. Raises ``DbError`` when none is free in time or the server cannot be
        reached (``ConnectionLost``)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._capacity)
        self.waiting += 1
        try:
            async with asyncio.timeout(self._checkout_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolExhausted(
                0,
                f"all {self._capacity} database sessions of the agent's pool (pool_size + "
                "pool_overflow) are in use, held by open branches, and none came free within "
                f"{self._checkout_timeout:g} s (pool_checkout_timeout_s)",
            ) from None
        finally:
            self.waiting -= 1
        self.in_use += 1
        try:
            conn = self._idle_connection() or await self._connect()
        except BaseException:
            self._free_slot()
            raise
        return Session(
            conn, self, read_timeout=self._read_timeout, command_timeout=self._command_timeout
        )

    def _idle_connection(self) -> aiomysql.Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if not _unusable(conn):
                return conn
            conn.close()
            self.reset()
        return None

    async def _connect(self) -> aiomysql.Connection:
        conn = TlsRequiredConnection(**self._connect_args)
        try:
            # The whole handshake, not only the TCP connect (all that aiomysql bounds): on a
            # link that swallows bytes the greeting never comes.
            async with asyncio.timeout(self._connect_timeout):
                await conn._connect()
        except TimeoutError:
            conn.close()
            raise ConnectionLost(2003, "Can't connect to MySQL server (timed out)") from None
        except _DRIVER_ERRORS as err:
            conn.close()
            raise translate(err) from err
        except RuntimeError as err:
            # the server closed the connection at once (it is starting or stopping): uvloop's
            # transport then has no socket for aiomysql's keepalive setting, or refuses a write
            conn.close()
            raise ConnectionLost(2003, f"Can't connect to MySQL server ({err})") from err
        except BaseException:
            conn.close()
            raise
        return conn

    def give_back(self, conn: aiomysql.Connection, *, broken: bool, reset: bool = False) -> None:
        """Takes a connection back: idle again, or closed. With ``reset``, it is reset first
        (in a task of its own) and its slot is free once that is done."""
        if broken or _unusable(conn) or len(self._idle) >= self._pool_size:
            conn.close()
        elif reset:
            self._resetting[asyncio.ensure_future(self._reset_then_keep(conn))] = conn
            return
        else:
            self._idle.append(conn)
        self._free_slot()

    async def _reset_then_keep(self, conn: aiomysql.Connection) -> None:
        task = asyncio.current_task()
        done = False
        try:
            async with asyncio.timeout(self._command_timeout or self._read_timeout):
                await _reset(conn, self._settings_after_reset)
            done = True
        except Exception:  # noqa: S110 (a connection in an unknown state is closed, below)
            pass
        finally:
            # The slot goes back once, by whoever takes the connection out of ``_resetting``:
            # here, or ``dispose`` (which may cancel this task before it ever ran).
            if task is not None and self._resetting.pop(task, None) is not None:
                if done and not _unusable(conn) and len(self._idle) < self._pool_size:
                    self._idle.append(conn)
                else:
                    conn.close()
                self._free_slot()

    @property
    def capacity(self) -> int:
        """The most sessions at once: ``pool_size`` kept, ``overflow`` more under load."""
        return self._capacity

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _free_slot(self) -> None:
        if self._slots is not None:
            self.in_use -= 1
            self._slots.release()

    def reset(self) -> None:
        """Drops every idle connection (the database restarted: they are all dead)."""
        while self._idle:
            self._idle.pop().close()

    def dispose(self) -> None:
        """Closes every connection the pool holds, those being reset included."""
        self.reset()
        while self._resetting:
            task, conn = self._resetting.popitem()
            conn.close()
            task.cancel()
            self._free_slot()


# --- administration: what a session can ask the server about branches ---------------------------


async def prepared_xids(session: Session) -> list[Xid]:
    """Our prepared branches on the server (XA RECOVER, filtered on our format id)."""
    output = await session.execute("XA RECOVER")
    xids = []
    for format_id, gtrid_length, _bqual_length, data in output.rows:
        xid = Xid.from_recover_row(int(format_id), int(gtrid_length), bytes(data))
        if xid is not None:
            xids.append(xid)
    return xids


async def committed_markers(session: Session, table: str, txids: Sequence[str]) -> set[str]:
    """The txids among ``txids`` whose marker row is committed (so their branch committed)."""
    if not txids:
        return set()
    marks = ", ".join(["%s"] * len(txids))
    output = await session.execute(
        f"SELECT gtrid FROM `{table}` WHERE gtrid IN ({marks})",
        [t.encode("ascii") for t in txids],
    )
    return {bytes(row[0]).decode("ascii") for row in output.rows}


async def marker_owner(session: Session, table: str, xid: Xid) -> int | None:
    """The session id that wrote the (uncommitted) marker of a prepared branch: its owner.

    A dirty read: the marker row of a prepared branch is visible only at READ UNCOMMITTED.
    """
    await session.execute("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
    output = await session.execute(
        f"SELECT owner_thread FROM `{table}` WHERE gtrid = %s AND bqual = %s",
        [xid.gtrid, xid.bqual],
    )
    return int(output.rows[0][0]) if output.rows else None


async def kill(session: Session, thread_id: int, *, query_only: bool) -> None:
    """KILL [QUERY] a session; a session that is already gone is not an error."""
    try:
        await session.command(f"KILL {'QUERY ' if query_only else ''}{int(thread_id)}")
    except DbError as err:
        if err.errno != ER_NO_SUCH_THREAD:
            raise


async def session_exists(session: Session, thread_id: int) -> bool:
    output = await session.execute(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", [thread_id]
    )
    return bool(output.rows[0][0])


_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def durable_xa_problem(version: str) -> str | None:
    """Why a server of this version cannot be used (its XA PREPARE is not durable), or None."""
    match = _VERSION.match(version)
    if match is None:
        return f"cannot read the server version {version!r}"
    numbers = tuple(int(part) for part in match.groups())
    if "mariadb" in version.lower():
        if numbers < (10, 5, 0):
            return (
                f"MariaDB {version} does not keep prepared XA branches across a disconnect or a "
                "restart; twopc needs MariaDB 10.5 or newer"
            )
    elif numbers < (5, 7, 7):
        return (
            f"MySQL {version} does not keep prepared XA branches across a disconnect or a "
            "restart; twopc needs MySQL 5.7.7 or newer"
        )
    return None


def marker_insert(table: str, xid: Xid, agent_instance: str) -> str:
    """The marker row's INSERT, as literals only (XIDs in hex; the instance id is hex too). Its
    owner is the session that runs it: the branch's own."""
    return (
        f"INSERT INTO `{table}` (gtrid, bqual, owner_thread, agent_instance) "
        f"VALUES (X'{xid.gtrid.hex()}', X'{xid.bqual.hex()}', CONNECTION_ID(), "
        f"'{agent_instance}')"
    )


def marker_table_ddl(table: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS `{table}` (
    gtrid VARBINARY(64) NOT NULL,
    bqual VARBINARY(64) NOT NULL,
    owner_thread BIGINT UNSIGNED NOT NULL,
    agent_instance CHAR(32) NOT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (gtrid, bqual),
    KEY created_at (created_at)
) ENGINE=InnoDB"""
