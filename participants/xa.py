"""The agent's edge to MySQL/MariaDB: pooled pymysql sessions, XA statements, driver errors.

Everything pymysql- and SQLAlchemy-specific stays in this module; the rest of the agent sees
``Session`` objects and ``DbError``. XIDs are written as hex literals (XA statements take no
placeholders). Sessions run with autocommit on: with pymysql's default autocommit off,
XA START fails with XAER_OUTSIDE after any earlier statement.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql
import sqlalchemy
from pymysql.constants import CLIENT
from sqlalchemy.pool import PoolProxiedConnection

from coordinator.txid import Xid
from coordinator.values import SqlValue

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


class DbError(Exception):
    """A statement failed on the server. ``errno`` is the MySQL error number."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"({errno}) {message}")
        self.errno = errno
        self.message = message


class ConnectionLost(DbError):
    """The connection to the server broke: what the server did with the last statement is
    unknown."""


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


def _output_of(cursor: Any) -> StatementOutput:
    """The output of the statement whose result the cursor holds."""
    columns = [d[0] for d in cursor.description] if cursor.description else []
    rows = list(cursor.fetchall()) if columns else []
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


class Session:
    """One pooled connection, used for one XA branch at a time or for administration."""

    def __init__(
        self, proxied: PoolProxiedConnection, command_timeout: float | None = None
    ) -> None:
        self._proxied = proxied
        self._conn: pymysql.connections.Connection[Any] = proxied.dbapi_connection  # type: ignore[assignment]
        self.thread_id: int = self._conn.thread_id()  # type: ignore[no-untyped-call]
        self._command_timeout = command_timeout

    @contextlib.contextmanager
    def commands(self) -> Iterator[None]:
        """Twopc's own commands get ``command_timeout`` instead of the read timeout that client
        statements need (they may run long). pymysql applies ``_read_timeout`` and
        ``_write_timeout`` at every socket read and write, so setting them around a call is
        enough; they have no public setter."""
        if self._command_timeout is None:
            yield
            return
        conn: Any = self._conn  # the timeouts are not in the type stubs
        saved = conn._read_timeout, conn._write_timeout
        conn._read_timeout = conn._write_timeout = self._command_timeout
        try:
            yield
        finally:
            conn._read_timeout, conn._write_timeout = saved

    def execute(
        self, sql: str, params: Sequence[SqlValue] | None = None, *, max_rows: int = 0
    ) -> StatementOutput:
        """Runs one statement. ``max_rows`` > 0 makes a larger result an error (nothing is cut)."""
        try:
            with self._conn.cursor() as cursor:
                cursor.execute(sql, tuple(params) if params else None)
                output = _output_of(cursor)
        except _DRIVER_ERRORS as err:
            raise translate(err) from err
        check_rows(output, max_rows)
        return output

    def bind(self, sql: str, params: Sequence[SqlValue]) -> str:
        """``sql`` with its ``%s`` placeholders replaced by literals, as ``execute`` sends it."""
        if not params:
            return sql
        with self._conn.cursor() as cursor:
            return str(cursor.mogrify(sql, tuple(params)))

    def batch(self, statements: Sequence[str]) -> list[StatementOutput]:
        """Runs bound statements in one round trip and returns the output of each. Each must be
        a single statement without its terminating ``;``; they are sent one per line, so that a
        trailing ``--`` or ``#`` comment ends where its statement does. Raises ``BatchFailed``
        at the first that fails; the server runs none after it."""
        outputs: list[StatementOutput] = []
        try:
            with self._conn.cursor() as cursor:
                cursor.execute("\n;\n".join(statements))
                outputs.append(_output_of(cursor))
                while cursor.nextset():
                    outputs.append(_output_of(cursor))
        except _DRIVER_ERRORS as err:
            raise BatchFailed(len(outputs), translate(err)) from err
        if len(outputs) != len(statements):  # the guard splits statements as the server does
            raise BatchFailed(
                len(outputs),
                DbError(0, f"the server ran {len(outputs)} statements of {len(statements)}"),
            )
        return outputs

    def script(self, statements: Sequence[str]) -> None:
        """Runs statements of twopc's own (literals only, no parameters) in one round trip.
        The server stops at the first that fails, and that error is raised."""
        try:
            with self.commands(), self._conn.cursor() as cursor:
                cursor.execute("; ".join(statements))
                while cursor.nextset():
                    pass
        except _DRIVER_ERRORS as err:
            raise translate(err) from err

    def xa(self, command: str, xid: Xid, suffix: str = "") -> None:
        """``XA <command> <xid> [suffix]``, e.g. ``xa("COMMIT", xid, "ONE PHASE")``."""
        self.command(f"XA {command} {xid.sql()} {suffix}".rstrip())

    def sever(self) -> None:
        """Shuts the connection's socket down, from any thread: a read blocked on it fails at
        once (pymysql raises 2013) instead of waiting for the read timeout. The server sees the
        connection go when the FIN reaches it. The session is unusable afterwards."""
        sock = getattr(self._conn, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def command(self, sql: str) -> None:
        """One statement of twopc's own, under the command timeout (see ``commands``)."""
        with self.commands():
            self.execute(sql)

    def closed_by_server(self) -> bool:
        """True when this idle connection's socket is readable: the server closed it (EOF) or
        sent what nobody asked for; either way it cannot carry a statement."""
        sock = getattr(self._conn, "_sock", None)
        if sock is None:
            return True
        try:
            poller = select.poll()  # not select(): it fails on descriptors past 1023
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def release(self) -> None:
        """Returns the connection to the pool (only when no branch is attached to it)."""
        self._proxied.close()

    def discard(self) -> None:
        """Closes the connection for good: the server detaches (prepared) or rolls back (active)
        whatever branch it held."""
        try:
            self._proxied.invalidate()
        finally:
            self._proxied.close()


class SessionPool:
    """A SQLAlchemy connection pool of pymysql connections set up for XA."""

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
    ) -> None:
        self._command_timeout = command_timeout
        # sql_mode: the statement guard lexes quotes as MySQL does by default; the two modes
        # that change quoting are removed so that the server splits statements the same way.
        init = (
            f"SET SESSION innodb_lock_wait_timeout = {int(lock_wait_timeout)}, "
            f"wait_timeout = {int(idle_timeout)}, "
            "sql_mode = REPLACE(REPLACE(@@SESSION.sql_mode, 'NO_BACKSLASH_ESCAPES', ''), "
            "'ANSI_QUOTES', '')"
        )

        def connect() -> Any:
            return pymysql.connect(
                host=host,
                port=port,
                user=user,
                password=password,
                database=database,
                autocommit=True,
                charset="utf8mb4",
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                write_timeout=read_timeout,
                program_name="twopc-agent",
                init_command=init,
                # For Session.script: twopc's own statements in one round trip. Client SQL is
                # still one statement per call (the statement guard refuses ';').
                client_flag=CLIENT.MULTI_STATEMENTS,
            )

        # The engine is used only for its pool; statements go straight to pymysql so that
        # nothing between us and the server adds round trips. No pre-ping (a round trip per
        # checkout): a stale connection shows itself at XA START, which is retried (reset()).
        self._engine = sqlalchemy.create_engine(
            "mysql+pymysql://",
            creator=connect,
            pool_size=pool_size,
            max_overflow=overflow,
            pool_timeout=checkout_timeout,
            pool_reset_on_return=None,
        )

    def session(self) -> Session:
        """A pooled session. An idle connection that the server has closed (it restarted) is
        seen without a round trip, by its socket being readable; then every idle one is
        dropped, since they all went the same way."""
        session = self._checkout()
        if session.closed_by_server():
            session.discard()
            self.reset()
            session = self._checkout()
        return session

    def _checkout(self) -> Session:
        try:
            return Session(self._engine.raw_connection(), self._command_timeout)
        except sqlalchemy.exc.TimeoutError as err:
            raise DbError(0, f"no free database connection in the agent's pool: {err}") from err
        except sqlalchemy.exc.DBAPIError as err:
            cause = err.orig if isinstance(err.orig, Exception) else err
            raise translate(cause) from err
        except _DRIVER_ERRORS as err:
            raise translate(err) from err

    def reset(self) -> None:
        """Drops every idle connection (the database restarted: they are all dead)."""
        self._engine.dispose()

    def dispose(self) -> None:
        self._engine.dispose()


# --- administration: what a session can ask the server about branches ---------------------------


def prepared_xids(session: Session) -> list[Xid]:
    """Our prepared branches on the server (XA RECOVER, filtered on our format id)."""
    output = session.execute("XA RECOVER")
    xids = []
    for format_id, gtrid_length, _bqual_length, data in output.rows:
        xid = Xid.from_recover_row(int(format_id), int(gtrid_length), bytes(data))
        if xid is not None:
            xids.append(xid)
    return xids


def committed_markers(session: Session, table: str, txids: Sequence[str]) -> set[str]:
    """The txids among ``txids`` whose marker row is committed (so their branch committed)."""
    if not txids:
        return set()
    marks = ", ".join(["%s"] * len(txids))
    output = session.execute(
        f"SELECT gtrid FROM `{table}` WHERE gtrid IN ({marks})",
        [t.encode("ascii") for t in txids],
    )
    return {bytes(row[0]).decode("ascii") for row in output.rows}


def marker_owner(session: Session, table: str, xid: Xid) -> int | None:
    """The session id that wrote the (uncommitted) marker of a prepared branch: its owner.

    A dirty read: the marker row of a prepared branch is visible only at READ UNCOMMITTED.
    """
    session.execute("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
    output = session.execute(
        f"SELECT owner_thread FROM `{table}` WHERE gtrid = %s AND bqual = %s",
        [xid.gtrid, xid.bqual],
    )
    return int(output.rows[0][0]) if output.rows else None


def kill(session: Session, thread_id: int, *, query_only: bool) -> None:
    """KILL [QUERY] a session; a session that is already gone is not an error."""
    try:
        session.command(f"KILL {'QUERY ' if query_only else ''}{int(thread_id)}")
    except DbError as err:
        if err.errno != ER_NO_SUCH_THREAD:
            raise


def session_exists(session: Session, thread_id: int) -> bool:
    output = session.execute(
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
