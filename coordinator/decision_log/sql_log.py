"""The decision log in a SQL database (MariaDB/MySQL or PostgreSQL), with group commit.

The same ``DecisionLog`` as ``file_log``, kept in tables (``_sql_schema``) through SQLAlchemy
Core: pymysql for ``mysql://`` and ``mariadb://`` URLs, psycopg 3 for ``postgresql://``.

Group commit: one writer thread owns one store connection. Callers on the event loop queue their
records and wait on a future; the thread takes everything queued and writes it in ONE store
transaction (DELETE the ended rows, INSERT the commits, INSERT the audits and delete the audits
past ``audit_keep``), then COMMITs it (one durable write on the store) and settles every future of
the batch at once. Records queued while a transaction is in flight form the next batch. No
``record_commit`` returns before the store transaction holding its row committed. END records
are not forced: they ride with the next batch, or are written on their own after
``end_flush_delay`` (on PostgreSQL with ``synchronous_commit`` off for that transaction: the next
forced COMMIT covers it). An ENDed transaction's row is deleted: that is this log's compaction,
so ``Replay.ended`` is always empty and ``Replay.torn_bytes`` always 0.

Order: each batch's rows take the next numbers of a per-coordinator sequence (``seq``), which
starts above the highest number in the tables when the log opens; the open commits are replayed
in that order. Numbers of deleted rows may be reused after a restart; the order of the rows that
exist never changes.

Errors, and why they split the way they do:

- Anything that fails *before* the COMMIT statement is sent (no connection, a refused INSERT, a
  connection lost mid-batch) rolls the store transaction back: none of the batch's rows can be in
  the log, so each caller gets ``DecisionLogFull`` and its transaction aborts (presumed abort),
  and the next batch starts on a new connection. A connection found dead at the first statement
  (a store restart, an idle timeout) is replaced once, at once, before the batch is given up.
- A failure *of* the COMMIT (connection lost, timeout while waiting for the answer) leaves the
  outcome unknown: the rows may be durable on the store or not. Answering ``DecisionLogFull``
  could abort a transaction whose COMMIT decision is in fact durable, and recovery would then
  commit the branches that the caller was told were aborted; answering success could lose a
  decision. So the log fails (``DecisionLogFailed``): the process stops and its restart reads the
  tables, which then say what survived.
- A batch of END records only never fails the log: a DELETE is idempotent, so its ENDs go back to
  the queue and ride with the next batch; meanwhile their commits merely stay open (re-driven
  idempotently after a restart).

Fencing (issue 12): a log given a ``lease`` (``leases.Lease``: coordinator id, holder, epoch)
starts every store transaction, the replay of ``open()`` included, with ``_fence``: an UPDATE of
that id's row in ``twopc_leases`` that matches only the log's holder and epoch and moves the
row's expiry on by one microsecond (a real change: see Galera below). When it matches no row,
the transaction is rolled back, every record of the batch fails with ``DecisionLogFenced``
(nothing of it is in the store) and the log refuses every later record (state FENCED); ENDs are
dropped (the new holder re-drives those commits, idempotently). The write is what makes a
takeover safe: an ``acquire`` (an UPDATE of the same row) and a batch are serialized on that
row, so either the batch commits first, and the new holder's replay, read after its acquire,
holds its rows, or the acquire does, and the batch's UPDATE waits for it, then matches nothing
and fails. A record is never acknowledged to the old holder and missed by the new one's replay.
On a Galera cluster the batch and the acquire may run on different nodes, where row locks do
not wait for each other; the conflict is settled at COMMIT instead: the two writes to the lease
row fail certification for whichever is ordered second, and an acquire applied on the batch's
node aborts the batch if it still holds the row (a brute-force abort). Either way the server
answers 1213 and has rolled the loser back: an acquire is retried, and so is a batch, whose
fence then sees the new epoch (tested on a 3-node cluster, ``tests/integration/test_galera.py``).
Galera commits in certification order on every node, so a replay read after the acquire
committed holds every batch certified before it.
The fence checks expiry too, by the store's clock: a holder whose lease ran out writes nothing
more even before anyone takes the id, so that a takeover's acquire does not race with its
batches (on Galera a stream of them could otherwise keep winning certification). Renewing, and
stopping at the local deadline, is the caller's (``leases``).

A log without a lease is not fenced (a single coordinator): two coordinators with the same id on
one store would then replay, and end, each other's decisions.

Why a writer thread rather than SQLAlchemy's asyncio extension: it is the file log's design
(measured there to be the fastest with one caller and even at high concurrency), it keeps the
plain synchronous drivers, and the one connection and its transaction belong to one thread, so
that "was the COMMIT sent?" is decided in one place, not across awaits that can be cancelled.

States: NEW --open()--> OPEN --close()--> CLOSED, OPEN --COMMIT of unknown outcome--> FAILED
--close()--> CLOSED, and OPEN --fenced--> FENCED --close()--> CLOSED. Only OPEN takes records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from coordinator.decision_log import (
    AuditRecord,
    CommitRecord,
    DecisionLogCorrupted,
    DecisionLogFailed,
    DecisionLogFenced,
    DecisionLogFull,
    Replay,
)
from coordinator.decision_log._sql_schema import (
    AUDITS,
    COMMITS,
    LEASES,
    TXID_LENGTH,
    ensure_schema,
)

if TYPE_CHECKING:
    from coordinator.decision_log.leases import Lease

__all__ = [
    "SqlDecisionLog",
    "asks_for_tls",
    "connect_args",
    "is_deadlock",
    "shown",
    "store_engine",
    "store_url",
]

log = structlog.get_logger("twopc.coordinator.decision_log")

_DRIVERS = {"mysql": "pymysql", "mariadb": "pymysql", "postgresql": "psycopg"}
_DELETE_CHUNK = 500  # txids per DELETE ... IN (...)


def store_url(text: str | URL) -> URL:
    """The SQLAlchemy URL of a decision-log store, its driver filled in.

    ``mysql://`` and ``mariadb://`` get pymysql, ``postgresql://`` psycopg (3); an explicit
    driver must be that one.

    Raises:
        ValueError: not a URL, another database, another driver, or no database name.
    """
    try:
        url = make_url(text)
    except ArgumentError as err:
        raise ValueError(f"not a SQLAlchemy URL: {err}") from err
    backend = url.get_backend_name()
    if backend not in _DRIVERS:
        raise ValueError(
            f"the decision log's store must be MariaDB/MySQL or PostgreSQL "
            f"(mariadb://, mysql://, postgresql://), got {backend}://"
        )
    driver = url.get_driver_name() if "+" in url.drivername else ""
    if driver and driver != _DRIVERS[backend]:
        raise ValueError(
            f"the decision log talks to {backend} through {_DRIVERS[backend]}, not {driver}"
        )
    if not url.database:
        raise ValueError(f"the store URL names no database: {shown(url)}")
    return url.set(drivername=f"{backend}+{_DRIVERS[backend]}")


def shown(url: URL) -> str:
    """The URL for messages: its password hidden."""
    return url.render_as_string(hide_password=True)


def connect_args(
    *,
    postgres: bool,
    timeout_s: float,
    tls: bool = False,
    idle_in_transaction_s: int | None = None,
) -> dict[str, Any]:
    """The driver's connect arguments that bound each wait on the store by ``timeout_s``.

    On MariaDB/MySQL, TLS is what the URL asks for (``?ssl_ca=...``, ``tls``): without it the
    connection is plain. PyMySQL would otherwise try TLS "if the server offers it", without
    checking the server's certificate, and build a new SSL context with the system's CA bundle
    for every connection: 50-150 ms of CPU each on this machine, which made the lease renewals
    and the takeover's look, a new connection each, the largest cost of a group member.

    ``idle_in_transaction_s`` (default ``IDLE_IN_TRANSACTION_S``): the store ends a transaction
    of these connections idle that long (tests that hold a COMMIT on its way ask for more)."""
    seconds = max(1, round(timeout_s))
    idle = IDLE_IN_TRANSACTION_S if idle_in_transaction_s is None else idle_in_transaction_s
    if postgres:
        # libpq has no read timeout: unacknowledged data (tcp_user_timeout) and keepalives
        # find a dead peer; the writer's watchdog, a server that stalls.
        return {
            "connect_timeout": seconds,
            "tcp_user_timeout": seconds * 1000,
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "options": f"-c idle_in_transaction_session_timeout={idle * 1000}",
        }
    plain = {} if tls else {"ssl_disabled": True}
    return {
        "connect_timeout": seconds,
        "read_timeout": seconds,
        "write_timeout": seconds,
        "charset": "utf8mb4",
        # The limit is MariaDB's (inside /*M! */): MySQL, which has none, runs the rest alone.
        "init_command": (
            f"SET @twopc_store = 1/*M! , SESSION idle_transaction_timeout = {idle} */"
        ),
        **plain,
    }


# A member paused (SIGSTOP, a frozen VM) in the middle of a store transaction keeps that
# transaction's row locks, the lease row's among them (the log's fence, a renewal), and a
# takeover's acquire would wait for them for as long as the member stays paused. The store ends
# a transaction idle that long and frees its locks: the member's COMMIT then fails, and it stops.
IDLE_IN_TRANSACTION_S = 5


def store_engine(
    url: URL,
    *,
    timeout_s: float,
    engine_options: Mapping[str, Any] | None = None,
    idle_in_transaction_s: int | None = None,
    **pool: Any,
) -> Engine:
    """An engine for a store's own connections (leases, request claims): its driver's connect
    arguments (``connect_args``), the pool options ``pool`` (e.g. ``poolclass=NullPool``) and
    ``engine_options`` (e.g. a failover ``creator``) last."""
    postgres = url.get_backend_name() == "postgresql"
    return create_engine(
        url,
        connect_args=connect_args(
            postgres=postgres,
            timeout_s=timeout_s,
            tls=asks_for_tls(url),
            idle_in_transaction_s=idle_in_transaction_s,
        ),
        **pool,
        **dict(engine_options or {}),
    )


def asks_for_tls(url: URL) -> bool:
    """Whether a MariaDB/MySQL store URL asks for TLS (any ``ssl_*`` query parameter)."""
    return any(key.startswith("ssl") for key in url.query)


_ATTEMPTS = 5  # a batch chosen as a deadlock victim (against a lease acquire) is retried


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    FAILED = "failed"
    FENCED = "fenced"
    CLOSED = "closed"


class SqlDecisionLog:
    """A ``DecisionLog`` in the tables of a SQL store (see the module's docstring).

    ``record_end`` must be called only after ``record_commit`` of the same txid returned. A
    caller cancelled while waiting in ``record_commit`` does not withdraw its record: it may
    still become durable, so its transaction's outcome is unknown, not aborted.

    Args:
        url: the store, a SQLAlchemy URL (``store_url``); its password, if any, comes from
            ``password``, never from the URL as configured.
        coordinator_id: the key of this coordinator's rows.
        password: the store user's password (None: none, or the URL's).
        end_flush_delay: END records ride with the next batch, or are written on their own
            after this many seconds at the latest.
        audit_keep: how many of the last AUDIT records are kept (older rows are deleted in the
            batch that writes a newer one), and ``Replay.audits`` holds at most.
        timeout_s: connect timeout, and how long the statements of a batch, then its COMMIT,
            may wait for the store's answer (pymysql's read/write timeouts; on PostgreSQL a
            watchdog thread that shuts the socket down, and ``tcp_user_timeout``).
        on_sync: called from the writer thread after each forced store transaction, with the
            number of COMMIT records it carried and the seconds its COMMIT took (the metrics);
            it must be quick and must not raise.
        clock: monotonic seconds, for ``on_sync``.
        engine_options: more keyword arguments for ``sqlalchemy.create_engine``.
        lease: the lease this log writes under (``leases.Lease``, of ``coordinator_id``): every
            store transaction is fenced on its holder and epoch. None: not fenced.
        on_fenced: called once, from the writer thread, when a batch finds the fence moved
            (with the reason), before any record's caller is answered: the member steps down.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        coordinator_id: str,
        password: str | None = None,
        end_flush_delay: float = 0.05,
        audit_keep: int = 1000,
        timeout_s: float = 10.0,
        on_sync: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        engine_options: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
        on_fenced: Callable[[str], None] | None = None,
        idle_in_transaction_s: int | None = None,
    ) -> None:
        if audit_keep < 1:
            raise ValueError(f"audit_keep must be at least 1, got {audit_keep}")
        self._idle_in_transaction_s = idle_in_transaction_s
        self._url = store_url(url)
        if password is not None:
            self._url = self._url.set(password=password)
        self._name = f"{shown(self._url)} (coordinator {coordinator_id})"
        if lease is not None and lease.coordinator_id != coordinator_id:
            raise ValueError(
                f"the lease is on coordinator id {lease.coordinator_id}, not {coordinator_id}"
            )
        # (holder, epoch) of the fence, or None
        self._fenced_on = None if lease is None else (lease.holder, lease.epoch)
        self._on_fenced = on_fenced
        self._coordinator_id = coordinator_id
        self._end_flush_delay = end_flush_delay
        self._audit_keep = audit_keep
        self._timeout_s = timeout_s
        self._on_sync = on_sync
        self._clock = clock
        self._engine_options = dict(engine_options or {})
        self._postgres = self._url.get_backend_name() == "postgresql"
        self._state = _State.NEW
        self._failure = ""
        self._open: dict[str, CommitRecord] = {}
        self._end_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        # Shared with the writer thread, under _wakeup's lock.
        self._wakeup = threading.Condition(threading.Lock())
        self._queue = _Batch()
        self._flush_due = False
        self._stopping = False
        # Touched by the writer thread only, once open() has returned.
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._seq = 0
        self._audit_seqs: deque[int] = deque()
        # libpq has no read timeout: on PostgreSQL a watchdog ends a batch that waits too long.
        self._watchdog = _Watchdog(timeout_s) if self._postgres else _NoWatchdog()

    @property
    def name(self) -> str:
        """The store (password hidden) and the coordinator id, for messages."""
        return self._name

    async def open(self) -> Replay:
        """Creates the tables when missing, reads this coordinator's rows, starts the writer.

        Raises:
            DecisionLogCorrupted: the tables are of another schema version.
            DecisionLogFailed: the store could not be reached or read.
            DecisionLogFenced: the log's lease is not (or no longer) the one in the store.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"decision log {self._name} was already opened")
        self._loop = asyncio.get_running_loop()
        replay = await asyncio.to_thread(self._open_store)
        self._state = _State.OPEN
        self._writer = threading.Thread(
            target=self._run_writer, name=f"decision-log {self._coordinator_id}", daemon=True
        )
        self._writer.start()
        log.info(
            "decision_log_opened",
            store=shown(self._url),
            coordinator_id=self._coordinator_id,
            open_commits=len(replay.open_commits),
            audits=len(replay.audits),
        )
        return replay

    async def record_commit(self, record: CommitRecord) -> None:
        """Returns once the store transaction holding the record committed; concurrent calls
        share one store transaction.

        Raises:
            DecisionLogFull: the record is not in the log; the transaction must abort.
            DecisionLogFenced: (a DecisionLogFull) the same, and the lease is lost: the member
                must stop acting for this coordinator id.
            DecisionLogFailed: durability unknown; the caller must stop the process.
            ValueError: the txid is longer than the column (128 characters) or not ASCII.
        """
        loop = self._check_open()
        _check_txid(record.txid)
        row = {
            "coordinator_id": self._coordinator_id,
            "txid": record.txid,
            "participants": json.dumps(list(record.participants), ensure_ascii=False),
        }
        waiter = loop.create_future()
        with self._wakeup:
            self._queue.commits.append((record.txid, row, waiter))
            self._wakeup.notify()
        await waiter
        self._open[record.txid] = record

    async def record_audit(self, record: AuditRecord) -> None:
        """Returns once the store transaction holding the audit record committed.

        Raises:
            DecisionLogFull: the record is not in the log.
            DecisionLogFailed: durability unknown; the caller must stop the process.
        """
        loop = self._check_open()
        row = {"coordinator_id": self._coordinator_id, **dataclasses.asdict(record)}
        waiter = loop.create_future()
        with self._wakeup:
            self._queue.audits.append((record.txid, row, waiter))
            self._wakeup.notify()
        await waiter

    async def record_end(self, txid: str) -> None:
        """Queues the deletion of ``txid``'s row: done with the next batch, or within
        ``end_flush_delay`` seconds. Not forced, so nothing is raised when it fails: the commit
        stays open in the store and is re-driven (idempotently) after a restart. On a fenced
        log, nothing is done: the id's new holder re-drives the commit.

        Raises:
            DecisionLogFailed: the log failed earlier.
        """
        if self._state is _State.FENCED:
            return
        loop = self._check_open()
        self._open.pop(txid, None)
        with self._wakeup:
            self._queue.ends.append(txid)
        if self._end_timer is None:
            self._end_timer = loop.call_later(self._end_flush_delay, self._flush_ends)

    def open_commits(self) -> list[CommitRecord]:
        """Durable COMMIT records without END (as recorded through this object), in log order."""
        return list(self._open.values())

    async def close(self) -> None:
        """Writes what is queued, stops the writer and closes the connection. Idempotent."""
        if self._state in (_State.NEW, _State.CLOSED):
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED  # no call may queue behind the writer's last batch
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._state is _State.FAILED:
            raise DecisionLogFailed(self._failure)
        if self._state is _State.FENCED:
            raise DecisionLogFenced(self._failure)
        if self._state is not _State.OPEN or self._loop is None:
            raise RuntimeError(f"decision log {self._name} is {self._state.value}, not open")
        return self._loop

    def _flush_ends(self) -> None:
        self._end_timer = None
        with self._wakeup:
            self._flush_due = True
            self._wakeup.notify()

    # --- opening (in a worker thread, before the writer starts) ---

    def _open_store(self) -> Replay:
        self._engine = create_engine(
            self._url,
            poolclass=NullPool,  # the writer holds its one connection itself
            connect_args=self._connect_args(),
            **self._engine_options,
        )
        try:
            with self._engine.connect() as conn:
                ensure_schema(conn, self._name)
                try:
                    self._fence(conn)
                except _Fenced as fenced:
                    conn.rollback()
                    raise DecisionLogFenced(
                        f"cannot open the decision log in {self._name}: {fenced}"
                    ) from None
                replay = self._read(conn)
        except (DecisionLogCorrupted, DecisionLogFenced):
            self._engine.dispose()
            raise
        except SQLAlchemyError as err:
            self._engine.dispose()
            raise DecisionLogFailed(
                f"cannot open the decision log in {self._name}: {_reason(err)}"
            ) from err
        return replay

    def _connect_args(self) -> dict[str, Any]:
        return connect_args(
            postgres=self._postgres,
            timeout_s=self._timeout_s,
            tls=asks_for_tls(self._url),
            idle_in_transaction_s=self._idle_in_transaction_s,
        )

    def _read(self, conn: Connection) -> Replay:
        mine = self._coordinator_id
        commits = conn.execute(
            select(COMMITS.c.txid, COMMITS.c.participants, COMMITS.c.seq)
            .where(COMMITS.c.coordinator_id == mine)
            .order_by(COMMITS.c.seq)
        ).all()
        audit_rows = conn.execute(
            select(AUDITS).where(AUDITS.c.coordinator_id == mine).order_by(AUDITS.c.seq)
        ).all()
        conn.commit()
        replay = Replay()
        for txid, participants, _ in commits:
            try:
                names = json.loads(participants)
            except ValueError:
                names = None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DecisionLogCorrupted(
                    f"the decision log in {self._name} holds a COMMIT row for {txid} whose "
                    f"participants are not a JSON list of names: {participants!r}"
                )
            record = CommitRecord(txid, tuple(names))
            replay.open_commits.append(record)
            self._open[txid] = record
        for row in audit_rows[-self._audit_keep :]:
            replay.audits.append(
                AuditRecord(
                    at_ms=row.at_ms,
                    identity=row.identity,
                    action=row.action,
                    txid=row.txid,
                    outcome=row.outcome,
                    reason=row.reason,
                )
            )
        self._audit_seqs.extend(row.seq for row in audit_rows)
        self._seq = max([0, *(row[2] for row in commits), *self._audit_seqs])
        return replay

    # --- the writer thread ---

    def _run_writer(self) -> None:
        while True:
            with self._wakeup:
                while not (
                    self._queue.commits or self._queue.audits or self._flush_due or self._stopping
                ):
                    self._wakeup.wait()
                stop = self._stopping
                batch, self._queue = self._queue, _Batch()
                self._flush_due = False
            # An unexpected error (a bug) fails the log rather than leave callers waiting forever.
            try:
                failure = self._write_batch(batch, last=stop) if not batch.empty() else None
            except Exception as err:
                failure = self._fail(f"writing the decision log {self._name} failed ({err!r})", err)
            waiting = batch.commits + batch.audits
            if waiting and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                    self._loop.call_soon_threadsafe(_settle, waiting, failure)
            if stop:
                self._drop_connection()
                self._watchdog.stop()
                if self._engine is not None:
                    self._engine.dispose()
                return

    def _write_batch(self, batch: _Batch, *, last: bool = False) -> _Failure | None:
        if self._state is _State.FAILED:
            return _Failure(DecisionLogFailed, self._failure, None)
        if self._state is _State.FENCED:
            return _Failure(DecisionLogFenced, self._failure, None)
        forced = bool(batch.commits or batch.audits)
        seq = self._seq
        commit_rows = []
        for _, row, _ in batch.commits:
            seq += 1
            commit_rows.append({**row, "seq": seq})
        audit_rows = []
        for _, row, _ in batch.audits:
            seq += 1
            audit_rows.append({**row, "seq": seq})
        audit_seqs = [*self._audit_seqs, *(row["seq"] for row in audit_rows)]
        trim_to = audit_seqs[-self._audit_keep - 1] if len(audit_seqs) > self._audit_keep else None
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                conn = self._connection()
                self._watchdog.arm(_socket_of(conn))
                self._fence(conn)
                if not forced and self._postgres:
                    # ENDs are not forced: the next forced COMMIT's WAL flush covers this one.
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                self._write_rows(conn, batch.ends, commit_rows, audit_rows, trim_to)
            except _Fenced as fenced:
                self._drop_connection()  # the store rolls the transaction back
                return self._fence_failed(batch, str(fenced))
            except SQLAlchemyError as err:
                self._drop_connection()
                stale = isinstance(err, DBAPIError) and err.connection_invalidated
                if attempt == 1 and stale:
                    continue  # a dead connection, nothing sent in it: once more on a new one
                if attempt < _ATTEMPTS and isinstance(err, DBAPIError) and is_deadlock(err):
                    # Chosen as a deadlock victim against a lease acquire: rolled back, so the
                    # batch is tried again (its fence then sees the acquire's outcome).
                    continue
                return self._not_written(batch, err, last=last)
            started = self._clock()
            self._watchdog.arm(_socket_of(conn))  # the COMMIT gets a timeout of its own
            try:
                conn.commit()
            except SQLAlchemyError as err:
                self._drop_connection()
                if attempt < _ATTEMPTS and isinstance(err, DBAPIError) and is_deadlock(err):
                    # The COMMIT was refused, not lost: a Galera node that certified a
                    # conflicting write first (a lease acquire on another node) rolls this
                    # transaction back and says so. Nothing is durable: try again.
                    continue
                if not forced:
                    self._requeue_ends(batch.ends, err, last=last)
                    return None
                return self._fail(
                    f"the COMMIT of a batch of {len(batch.commits)} decision(s) to {self._name} "
                    f"failed ({_reason(err)}), so whether they are durable is unknown",
                    err,
                )
            break
        self._watchdog.disarm()
        if forced and self._on_sync is not None:
            self._on_sync(len(batch.commits), self._clock() - started)
        self._seq = seq
        self._audit_seqs.extend(row["seq"] for row in audit_rows)
        if trim_to is not None:
            while self._audit_seqs and self._audit_seqs[0] <= trim_to:
                self._audit_seqs.popleft()
        return None

    def _fence(self, conn: Connection) -> None:
        """The first statement of every store transaction (with a lease): an UPDATE of the lease
        row that only this holder at this epoch matches, while it is live by the store's clock,
        held until the transaction ends, so
        that no takeover can commit between this check and the batch's COMMIT (see the module's
        docstring). It moves the expiry on by 1 µs, so that Galera certifies it.

        Raises:
            _Fenced: the row shows another holder or epoch, or is gone.
        """
        if self._fenced_on is None:
            return
        holder, epoch = self._fenced_on
        if self._postgres:
            later, now = "expires_at + interval '1 microsecond'", "clock_timestamp()"
        else:
            later, now = "expires_at + INTERVAL 1 MICROSECOND", "UTC_TIMESTAMP(6)"
        touched = conn.execute(
            text(
                f"UPDATE twopc_leases SET expires_at = {later} "
                "WHERE coordinator_id = :id AND holder = :holder AND epoch = :epoch "
                f"AND expires_at > {now}"
            ),
            {"id": self._coordinator_id, "holder": holder, "epoch": epoch},
        )
        if touched.rowcount == 1:
            return
        row = conn.execute(
            select(LEASES.c.holder, LEASES.c.epoch).where(
                LEASES.c.coordinator_id == self._coordinator_id
            )
        ).one_or_none()
        shows = "no lease row" if row is None else f"{row.holder} at epoch {row.epoch}"
        if row is not None and (row.holder, row.epoch) == (holder, epoch):
            shows += ", expired by the store's clock"
        raise _Fenced(
            f"{holder} no longer holds coordinator id {self._coordinator_id} at epoch "
            f"{epoch}: the store shows {shows}"
        )

    def _fence_failed(self, batch: _Batch, why: str) -> _Failure:
        self._failure = (
            f"{why}; the batch was rolled back: nothing of it is in the log, and this log takes "
            "no more records. This member must stop acting for the id"
        )
        self._state = _State.FENCED
        log.error(
            "decision_log_fenced",
            store=self._name,
            commits=len(batch.commits),
            audits=len(batch.audits),
            ends_dropped=len(batch.ends),
            error=self._failure,
        )
        if self._on_fenced is not None:
            # Called here, in the writer thread, before any caller learns that its record
            # failed: a member that steps down (stops its process) then acts on nothing more.
            self._on_fenced(self._failure)
        return _Failure(DecisionLogFenced, self._failure, None)

    def _write_rows(
        self,
        conn: Connection,
        ends: list[str],
        commits: list[dict[str, Any]],
        audits: list[dict[str, Any]],
        trim_to: int | None,
    ) -> None:
        mine = self._coordinator_id
        for start in range(0, len(ends), _DELETE_CHUNK):
            chunk = ends[start : start + _DELETE_CHUNK]
            conn.execute(
                COMMITS.delete().where(COMMITS.c.coordinator_id == mine, COMMITS.c.txid.in_(chunk))
            )
        if commits:
            conn.execute(COMMITS.insert(), commits)
        if audits:
            conn.execute(AUDITS.insert(), audits)
        if trim_to is not None:
            conn.execute(
                AUDITS.delete().where(AUDITS.c.coordinator_id == mine, AUDITS.c.seq <= trim_to)
            )

    def _connection(self) -> Connection:
        if self._conn is None:
            assert self._engine is not None
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        """Forgets the connection after an error (or at the end): its transaction, if any, is
        rolled back by the store when the connection closes."""
        self._watchdog.disarm()  # before the socket can close: the watchdog must not touch its fd
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            conn.invalidate()
        with contextlib.suppress(SQLAlchemyError):
            conn.close()

    def _not_written(self, batch: _Batch, err: SQLAlchemyError, *, last: bool) -> _Failure | None:
        self._requeue_ends(batch.ends, err, last=last)
        if not (batch.commits or batch.audits):
            return None
        what = f"{len(batch.commits)} commit decision(s)"
        if batch.audits:
            what += f" and {len(batch.audits)} audit record(s)"
        log.warning(
            "decision_log_batch_not_written",
            store=self._name,
            commits=len(batch.commits),
            audits=len(batch.audits),
            error=_reason(err),
        )
        return _Failure(
            DecisionLogFull,
            f"could not write {what} to {self._name}: {_reason(err)}; nothing of it was "
            "committed in the store: a transaction whose commit was not written was not "
            "committed and must abort, an action whose audit record was not written was not "
            "done; the log is still usable",
            err,
        )

    def _requeue_ends(self, ends: list[str], err: SQLAlchemyError, *, last: bool) -> None:
        """ENDs whose DELETE may not have been committed ride with the next batch (a DELETE
        done twice is harmless)."""
        if not ends:
            return
        log.warning(
            "decision_log_ends_not_written",
            store=self._name,
            ends=len(ends),
            error=_reason(err),
            retried=not last,
        )
        if last:
            return  # closing: their commits stay open and are re-driven after a restart
        with self._wakeup:
            self._queue.ends[:0] = ends

    def _fail(self, what: str, err: BaseException) -> _Failure:
        self._failure = (
            f"{what}; the log can no longer tell which decisions are durable. Stop the "
            "coordinator: its restart re-reads the store to learn which commits survived"
        )
        self._state = _State.FAILED
        log.critical("decision_log_failed", store=self._name, error=self._failure)
        return _Failure(DecisionLogFailed, self._failure, err)


def is_deadlock(err: DBAPIError) -> bool:
    """A deadlock (MySQL 1213) or a serialization failure (PostgreSQL 40001, 40P01)."""
    orig: Any = err.orig
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] == 1213


def _socket_of(conn: Connection) -> int:
    """The file descriptor of a psycopg connection's socket; -1 for other drivers."""
    dbapi: Any = conn.connection.dbapi_connection
    pgconn = getattr(dbapi, "pgconn", None)
    return int(pgconn.socket) if pgconn is not None else -1


class _NoWatchdog:
    """pymysql bounds every wait itself (read and write timeouts)."""

    def arm(self, fd: int) -> None:
        pass

    def disarm(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _Watchdog(_NoWatchdog):
    """Shuts a connection's socket down when the writer waits on it longer than ``timeout_s``
    (a store that stalls, SIGSTOPped or overloaded, with its TCP stack still answering): the
    driver's wait then fails, and the batch with it (``DecisionLogFull`` before the COMMIT was
    sent, ``DecisionLogFailed`` during it). Only ``shutdown`` on a duplicate of the descriptor:
    the driver keeps its own, and the writer disarms before it closes the connection, so the
    watchdog never touches a descriptor that was reused."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._wakeup = threading.Condition(threading.Lock())
        self._armed: tuple[float, int] | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, fd: int) -> None:
        if fd < 0:
            return
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="decision-log watchdog", daemon=True
                )
                self._thread.start()
            self._armed = (time.monotonic() + self._timeout_s, fd)
            self._wakeup.notify()

    def disarm(self) -> None:
        with self._wakeup:
            self._armed = None

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._armed = None
            self._wakeup.notify()

    def _run(self) -> None:
        with self._wakeup:
            while not self._stopped:
                if self._armed is None:
                    self._wakeup.wait()
                    continue
                deadline, fd = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakeup.wait(remaining)
                    continue
                self._armed = None
                log.warning("decision_log_store_stalled", seconds=self._timeout_s)
                with contextlib.suppress(OSError):
                    duplicate = socket.socket(fileno=os.dup(fd))
                    try:
                        duplicate.shutdown(socket.SHUT_RDWR)
                    finally:
                        duplicate.close()


def _check_txid(txid: str) -> None:
    if len(txid) > TXID_LENGTH or not txid.isascii():
        raise ValueError(
            f"txid {txid[:80]!r} does not fit the SQL decision log: at most {TXID_LENGTH} ASCII "
            "characters"
        )


def _reason(err: BaseException) -> str:
    """The driver's message, without SQLAlchemy's statement and parameters."""
    if isinstance(err, DBAPIError) and err.orig is not None:
        return f"{type(err.orig).__name__}: {err.orig}".strip()
    return f"{type(err).__name__}: {err}"


@dataclasses.dataclass(slots=True)
class _Batch:
    """Records queued for one store transaction, in log order."""

    # (txid, row, waiter)
    commits: list[tuple[str, dict[str, Any], asyncio.Future[None]]] = dataclasses.field(
        default_factory=list
    )
    audits: list[tuple[str, dict[str, Any], asyncio.Future[None]]] = dataclasses.field(
        default_factory=list
    )
    ends: list[str] = dataclasses.field(default_factory=list)

    def empty(self) -> bool:
        return not (self.commits or self.audits or self.ends)


class _Fenced(Exception):
    """The fence found another holder or epoch (internal: becomes DecisionLogFenced)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """Why a batch failed; each waiter gets its own exception, naming its transaction."""

    kind: type[DecisionLogFull | DecisionLogFailed]  # DecisionLogFenced is a DecisionLogFull
    message: str
    cause: BaseException | None

    def exception(self, txid: str) -> Exception:
        error = self.kind(self.message, txid=txid)
        error.__cause__ = self.cause
        return error


def _settle(
    waiting: list[tuple[str, dict[str, Any], asyncio.Future[None]]], failure: _Failure | None
) -> None:
    for txid, _, waiter in waiting:
        if waiter.done():
            continue  # its caller was cancelled
        if failure is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failure.exception(txid))
