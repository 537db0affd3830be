"""The systems under test: twopc and the three baselines, behind one small transaction interface.

A workload is written once against ``Worker`` (one per benchmark thread, holding that thread's
connections, opened once and reused for every transaction) and the ``Tx`` it begins:

- ``Worker.run(work)``: a transaction whose statements are all known up front (one request to
  twopc's ``RunTransaction``); ``Worker.begin()``: an interactive one, for a decision in the middle.
- A transaction that did not commit raises ``TxFailed`` (``kind`` ``aborted``: nothing applied on
  the atomic systems; ``unknown``: the client does not know).

The systems:

- ``Twopc``: the SDK, through the coordinator (one ``Client``, thread-safe, shared by all
  workers: its one gRPC channel is the persistent connection), over mutual TLS.
  ``TwopcPlaintext`` is the same with every gRPC hop in plaintext (the daemons restarted with
  ``insecure_plaintext``): the two side by side give what TLS costs. ``TwopcOrdered`` is the
  same with the coordinator's ``one_shot_order = "ordered"``, ``TwopcAdaptive`` with
  ``"adaptive"`` (both asked for by name only).
- ``DirectXA``: XA driven from the benchmark process over one pymysql connection per region:
  XA START, the statements, XA END and XA PREPARE on each branch in turn, then XA COMMIT on each.
  A branch that only read is finished by ``XA COMMIT ... ONE PHASE`` when it ends (as twopc's
  READ_ONLY vote does), and a transaction with a single writing branch commits it in one phase.
  XIDs are hex literals with format id ``BENCH_FORMAT_ID``, not twopc's, so that twopc's recovery
  never touches them.
- ``SqlaTwoPhase``: SQLAlchemy ``Session(twophase=True)`` over one engine per region (pool sized to
  the concurrency), statements sent with ``exec_driver_sql``. SQLAlchemy's XIDs are strings,
  format id 1.
- ``Local``: plain autocommit statements on each region: no atomicity, the upper bound.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import pymysql
import sqlalchemy
from sqlalchemy.orm import Session, sessionmaker

from twopc.client import Client, OutcomeUnknown, RetryPolicy, TransactionAborted, TwopcError
from twopc.client import Transaction as TwopcTransaction
from twopc.tls import TlsConfig
from twopc.txid import FORMAT_ID

__all__ = [
    "BENCH_FORMAT_ID",
    "ONE_SHOT_ORDER",
    "SYSTEMS",
    "VARIANTS",
    "DirectXA",
    "Endpoints",
    "Local",
    "Rows",
    "SqlaTwoPhase",
    "System",
    "Twopc",
    "TwopcAdaptive",
    "TwopcOrdered",
    "TwopcPlaintext",
    "Tx",
    "TxFailed",
    "Work",
    "Worker",
    "make_system",
]

BENCH_FORMAT_ID = 0x62656E63  # "benc": the direct-XA baseline's branches
assert BENCH_FORMAT_ID != FORMAT_ID

Params: TypeAlias = Sequence[object]
Statement: TypeAlias = tuple[str, Params]
Work: TypeAlias = Mapping[str, Sequence[Statement]]

ABORTED, UNKNOWN = "aborted", "unknown"


class TxFailed(Exception):
    """A transaction that did not commit.

    Attributes:
        kind: ``aborted`` (rolled back; on the atomic systems nothing of it is applied) or
            ``unknown`` (the client cannot tell).
        reason: why, for the report.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Rows:
    """The result of one statement."""

    rows: list[tuple[Any, ...]]
    affected_rows: int


@dataclass(frozen=True)
class Endpoints:
    """Where the systems connect, and how.

    Attributes:
        coordinator: the coordinator's client address.
        databases: region -> ``host:port`` of that region's database as clients reach it (the
            proxy's ``client-mariadb-<region>`` link).
        database: the schema name.
        lock_wait_timeout_s: ``innodb_lock_wait_timeout`` of the baselines' sessions (the
            agents get the same).
        tx_timeout_s: twopc's transaction timeout; also the baselines' read timeout.
        coordinator_tls: the client's TLS towards the coordinator; None: plaintext.
    """

    coordinator: str
    databases: Mapping[str, str]
    database: str
    lock_wait_timeout_s: int = 10
    tx_timeout_s: float = 30.0
    coordinator_tls: TlsConfig | None = None


class Tx(ABC):
    """An interactive transaction: not thread-safe, used by the worker that began it."""

    @abstractmethod
    def execute(self, region: str, sql: str, params: Params = ()) -> Rows: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def rollback(self) -> None:
        """Rolls back; never raises (a failed rollback is the system's to clean up)."""


class Worker(ABC):
    """One benchmark thread's connections: ``connect`` opens them (before the clock starts),
    ``close`` releases them."""

    def connect(self) -> None:
        """Opens the worker's connections now rather than in its first transaction."""
        return

    @abstractmethod
    def begin(self) -> Tx: ...

    def run(self, work: Work) -> dict[str, list[Rows]]:
        """Runs ``work`` (region -> statements, in order) as one transaction and commits it."""
        tx = self.begin()
        results: dict[str, list[Rows]] = {}
        try:
            for region, statements in work.items():
                results[region] = [tx.execute(region, sql, params) for sql, params in statements]
            tx.commit()
        except BaseException:
            tx.rollback()
            raise
        return results

    def close(self) -> None:
        return None


class _Counter:
    """A thread-safe count (of database connections opened)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, *_: object) -> None:
        with self._lock:
            self.value += 1


class System(ABC):
    """A system under test: ``worker()`` is called once per thread, ``close()`` at the end."""

    name: ClassVar[str]
    #: Whether the coordinator and the agents do the work (their CPU is counted only then).
    uses_daemons: ClassVar[bool] = False

    @property
    def connections_opened(self) -> int | None:
        """Database connections the benchmark process opened for this system so far (None:
        not the benchmark's to open; twopc's agents pool theirs)."""
        return None

    @abstractmethod
    def worker(self) -> Worker: ...

    def close(self) -> None:
        return None


def _is_write(sql: str) -> bool:
    return not sql.lstrip()[:6].upper().startswith("SELECT")


def _mysql_reason(err: BaseException) -> str:
    args: tuple[Any, ...] = getattr(err, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return f"{args[0]} {args[1]}"
    return f"{type(err).__name__}: {err}"


# --- twopc ---------------------------------------------------------------------------------------


class Twopc(System):
    name = "twopc"
    uses_daemons = True

    def __init__(self, endpoints: Endpoints, *, wait_for_phase2: bool) -> None:
        self._timeout = endpoints.tx_timeout_s
        self._wait = wait_for_phase2
        policy = RetryPolicy(attempts=3, initial_backoff=0.05, max_backoff=0.5, deadline=5.0)
        tls = endpoints.coordinator_tls
        self._client = Client(
            endpoints.coordinator,
            tls=tls,
            insecure=tls is None,
            retry_policy=policy,
            rpc_timeout=self._timeout + 5,
        )

    def worker(self) -> Worker:
        return _TwopcWorker(self._client, self._timeout, self._wait)

    def close(self) -> None:
        self._client.close()


class TwopcPlaintext(Twopc):
    """``Twopc`` with TLS off on every gRPC hop (the endpoints give no TLS, and the daemons run
    with ``insecure_plaintext``)."""

    name = "twopc-plaintext"


class TwopcOrdered(Twopc):
    """``Twopc`` with the coordinator restarted with ``one_shot_order = "ordered"``: one-shot
    transactions prepare one participant after another, in name order, as the baselines do."""

    name = "twopc-ordered"


class TwopcAdaptive(Twopc):
    """``Twopc`` with the coordinator restarted with ``one_shot_order = "adaptive"``: parallel
    prepares, in order while the detector finds lock cycles."""

    name = "twopc-adaptive"


def _twopc_failure(err: TwopcError) -> TxFailed:
    if isinstance(err, OutcomeUnknown):
        return TxFailed(UNKNOWN, err.message)
    if isinstance(err, TransactionAborted):
        return TxFailed(ABORTED, err.message)
    return TxFailed(ABORTED, f"{type(err).__name__}: {err.message}")


def _rows(result: Any) -> Rows:
    return Rows([tuple(row) for row in result.rows], int(result.affected_rows))


class _TwopcWorker(Worker):
    def __init__(self, client: Client, timeout: float, wait: bool) -> None:
        self._client = client
        self._timeout = timeout
        self._wait = wait

    def begin(self) -> Tx:
        try:
            return _TwopcTx(self._client.begin(timeout=self._timeout), self._wait)
        except TwopcError as err:
            raise _twopc_failure(err) from err

    def run(self, work: Work) -> dict[str, list[Rows]]:
        try:
            result = self._client.run(work, timeout=self._timeout, wait_for_phase2=self._wait)
        except TwopcError as err:
            raise _twopc_failure(err) from err
        return {region: [_rows(r) for r in results] for region, results in result.results.items()}


class _TwopcTx(Tx):
    def __init__(self, tx: TwopcTransaction, wait: bool) -> None:
        self._tx = tx
        self._wait = wait

    def execute(self, region: str, sql: str, params: Params = ()) -> Rows:
        try:
            return _rows(self._tx.execute(region, sql, params))
        except TwopcError as err:
            raise _twopc_failure(err) from err

    def commit(self) -> None:
        try:
            self._tx.commit(wait_for_phase2=self._wait)
        except TwopcError as err:
            raise _twopc_failure(err) from err

    def rollback(self) -> None:
        with contextlib.suppress(TwopcError):  # else the coordinator rolls back at its deadline
            self._tx.rollback()


# --- direct XA -----------------------------------------------------------------------------------


def _connect(address: str, endpoints: Endpoints) -> Any:
    host, port = address.rsplit(":", 1)
    return pymysql.connect(
        host=host,
        port=int(port),
        user="root",
        password="",
        database=endpoints.database,
        autocommit=True,  # XA START refuses to run inside an implicit transaction
        connect_timeout=10,
        read_timeout=max(int(endpoints.tx_timeout_s), endpoints.lock_wait_timeout_s + 5),
        write_timeout=30,
        init_command=f"SET SESSION innodb_lock_wait_timeout = {endpoints.lock_wait_timeout_s}",
    )


class _Connections:
    """One pymysql connection per region, opened at first use and again after a broken one."""

    def __init__(self, endpoints: Endpoints, opened: _Counter) -> None:
        self._endpoints = endpoints
        self._opened = opened
        self._open: dict[str, Any] = {}

    def get(self, region: str) -> Any:
        conn = self._open.get(region)
        if conn is None:
            conn = self._open[region] = _connect(self._endpoints.databases[region], self._endpoints)
            self._opened.add()
        return conn

    def open_all(self) -> None:
        for region in self._endpoints.databases:
            self.get(region)

    def drop(self, region: str) -> None:
        conn = self._open.pop(region, None)
        if conn is not None:
            try:
                conn.close()
            except pymysql.err.Error:
                conn._force_close()  # already broken: just forget the socket

    def close(self) -> None:
        for region in list(self._open):
            self.drop(region)


def _query(conn: Any, sql: str, params: Params | None = None) -> Rows:
    with conn.cursor() as cursor:
        affected = cursor.execute(sql, params)
        rows = list(cursor.fetchall()) if cursor.description else []
    return Rows(rows, int(affected))


class DirectXA(System):
    name = "direct-xa"

    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._prefix = f"bench-{os.getpid()}"
        self._opened = _Counter()

    @property
    def connections_opened(self) -> int | None:
        return self._opened.value

    def worker(self) -> Worker:
        with self._lock:
            number = next(self._ids)
        return _DirectWorker(
            _Connections(self._endpoints, self._opened), f"{self._prefix}-{number}"
        )


class _DirectWorker(Worker):
    def __init__(self, connections: _Connections, prefix: str) -> None:
        self._connections = connections
        self._prefix = prefix
        self._sequence = 0

    def connect(self) -> None:
        self._connections.open_all()

    def begin(self) -> Tx:
        return _DirectTx(self._connections, f"{self._prefix}-{self._next()}")

    def run(self, work: Work) -> dict[str, list[Rows]]:
        # The statements of each branch, then its END and PREPARE, one branch after the other.
        tx = _DirectTx(self._connections, f"{self._prefix}-{self._next()}")
        writers = [r for r, statements in work.items() if any(_is_write(s) for s, _ in statements)]
        results: dict[str, list[Rows]] = {}
        try:
            for region, statements in work.items():
                results[region] = [tx.execute(region, sql, params) for sql, params in statements]
                if region not in writers:
                    tx.end_branch(region, one_phase=True)  # read only: out of phase 2
                elif len(writers) > 1:
                    tx.end_branch(region, one_phase=False)
                # else the only writer: it commits in one phase at the end
            tx.commit()
        except BaseException:
            tx.rollback()
            raise
        return results

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def close(self) -> None:
        self._connections.close()


_ACTIVE, _PREPARED, _DONE = "active", "prepared", "done"


class _DirectTx(Tx):
    def __init__(self, connections: _Connections, gtrid: str) -> None:
        self._connections = connections
        self._gtrid = gtrid.encode().hex()
        self._branches: dict[str, str] = {}  # region -> state, in the order they started
        self._writes: set[str] = set()

    def _xid(self, region: str) -> str:
        return f"X'{self._gtrid}',X'{region.encode().hex()}',{BENCH_FORMAT_ID}"

    def _xa(self, region: str, command: str, suffix: str = "") -> None:
        _query(self._connections.get(region), f"XA {command} {self._xid(region)}{suffix}")

    def execute(self, region: str, sql: str, params: Params = ()) -> Rows:
        try:
            if region not in self._branches:
                self._xa(region, "START")
                self._branches[region] = _ACTIVE
            elif self._branches[region] != _ACTIVE:
                raise RuntimeError(f"branch {region} is no longer active")
            if _is_write(sql):
                self._writes.add(region)
            return _query(self._connections.get(region), sql, params)
        except pymysql.err.MySQLError as err:
            self.rollback()
            raise TxFailed(ABORTED, _mysql_reason(err)) from err

    def end_branch(self, region: str, *, one_phase: bool) -> None:
        """XA END, then XA PREPARE, or XA COMMIT ... ONE PHASE when ``one_phase``."""
        if self._branches.get(region) != _ACTIVE:
            return
        try:
            self._xa(region, "END")
            if one_phase:
                self._xa(region, "COMMIT", " ONE PHASE")
                self._branches[region] = _DONE
            else:
                self._xa(region, "PREPARE")
                self._branches[region] = _PREPARED
        except pymysql.err.MySQLError as err:
            self.rollback()
            raise TxFailed(ABORTED, _mysql_reason(err)) from err

    def commit(self) -> None:
        active = [r for r, state in self._branches.items() if state == _ACTIVE]
        for region in active:
            if region not in self._writes:
                self.end_branch(region, one_phase=True)  # read only: out of phase 2
        writers = [r for r in active if r in self._writes]
        prepared = [r for r, state in self._branches.items() if state == _PREPARED]
        if len(writers) == 1 and not prepared:
            self.end_branch(writers[0], one_phase=True)
            return
        for region in writers:
            self.end_branch(region, one_phase=False)
        # Every writing branch is prepared: the decision is commit.
        for region, state in self._branches.items():
            if state == _PREPARED:
                self._commit_prepared(region)

    def _commit_prepared(self, region: str) -> None:
        reason = ""
        for _ in range(2):
            try:
                self._xa(region, "COMMIT")
            except pymysql.err.OperationalError as err:
                # A broken connection: the branch stays prepared and detaches once the server
                # sees the session gone; commit it from a new connection.
                self._connections.drop(region)
                reason = _mysql_reason(err)
                continue
            self._branches[region] = _DONE
            return
        raise TxFailed(UNKNOWN, f"XA COMMIT on {region} failed: {reason}")

    def rollback(self) -> None:
        for region, state in list(self._branches.items()):
            if state == _DONE:
                continue
            try:
                if state == _ACTIVE:
                    try:
                        self._xa(region, "END")
                    except pymysql.err.OperationalError as err:
                        if err.args[0] not in (1399, 1614, 1402):  # already idle or rolled back
                            raise
                self._xa(region, "ROLLBACK")
            except pymysql.err.OperationalError as err:
                if err.args[0] in (1397, 1402, 1613, 1614):  # gone already: rolled back
                    pass
                else:
                    self._connections.drop(region)  # the server rolls back an unprepared branch
            except pymysql.err.MySQLError:
                self._connections.drop(region)
            self._branches[region] = _DONE


# --- SQLAlchemy two-phase sessions ---------------------------------------------------------------


class SqlaTwoPhase(System):
    name = "sqla-twophase"

    def __init__(self, endpoints: Endpoints, concurrency: int) -> None:
        self._engines: dict[str, sqlalchemy.Engine] = {}
        self._opened = _Counter()
        for region, address in endpoints.databases.items():
            host, port = address.rsplit(":", 1)
            url = sqlalchemy.URL.create(
                "mysql+pymysql", username="root", host=host, port=int(port),
                database=endpoints.database,
            )  # fmt: skip
            self._engines[region] = sqlalchemy.create_engine(
                url,
                pool_size=concurrency,
                max_overflow=0,
                pool_timeout=60,
                connect_args={
                    "connect_timeout": 10,
                    "read_timeout": max(
                        int(endpoints.tx_timeout_s), endpoints.lock_wait_timeout_s + 5
                    ),
                    "init_command": (
                        f"SET SESSION innodb_lock_wait_timeout = {endpoints.lock_wait_timeout_s}"
                    ),
                },
            )
            sqlalchemy.event.listen(self._engines[region], "connect", self._opened.add)
        self._sessions = sessionmaker(twophase=True)

    @property
    def connections_opened(self) -> int | None:
        return self._opened.value

    def worker(self) -> Worker:
        return _SqlaWorker(self._sessions, self._engines)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()


class _SqlaWorker(Worker):
    def __init__(
        self, sessions: sessionmaker[Session], engines: Mapping[str, sqlalchemy.Engine]
    ) -> None:
        self._sessions = sessions
        self._engines = engines
        self._held: list[sqlalchemy.Connection] = []

    def connect(self) -> None:
        # One pooled connection per engine, held until the first transaction: every worker
        # holding one at the same time fills the pool up to the concurrency.
        self._held = [engine.connect() for engine in self._engines.values()]

    def _release(self) -> None:
        held, self._held = self._held, []
        for conn in held:
            conn.close()  # back to the pool

    def begin(self) -> Tx:
        self._release()
        return _SqlaTx(self._sessions(), self._engines)

    def close(self) -> None:
        self._release()


class _SqlaTx(Tx):
    def __init__(self, session: Session, engines: Mapping[str, sqlalchemy.Engine]) -> None:
        self._session = session
        self._engines = engines

    def execute(self, region: str, sql: str, params: Params = ()) -> Rows:
        try:
            conn = self._session.connection(bind_arguments={"bind": self._engines[region]})
            result = conn.exec_driver_sql(sql, tuple(params))
            rows = [tuple(row) for row in result.fetchall()] if result.returns_rows else []
            return Rows(rows, int(result.rowcount))
        except sqlalchemy.exc.SQLAlchemyError as err:
            self.rollback()
            raise TxFailed(ABORTED, _sqla_reason(err)) from err

    def commit(self) -> None:
        try:
            self._session.commit()
        except sqlalchemy.exc.SQLAlchemyError as err:
            self.rollback()
            raise TxFailed(ABORTED, _sqla_reason(err)) from err
        finally:
            self._session.close()

    def rollback(self) -> None:
        try:
            self._session.rollback()
        except sqlalchemy.exc.SQLAlchemyError:
            pass  # a broken connection: the pool discards it and the server rolls back
        finally:
            self._session.close()


def _sqla_reason(err: sqlalchemy.exc.SQLAlchemyError) -> str:
    orig = getattr(err, "orig", None)
    if isinstance(orig, BaseException):
        return _mysql_reason(orig)
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# --- plain local commits -------------------------------------------------------------------------


class Local(System):
    name = "local"

    def __init__(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._opened = _Counter()

    @property
    def connections_opened(self) -> int | None:
        return self._opened.value

    def worker(self) -> Worker:
        return _LocalWorker(_Connections(self._endpoints, self._opened))


class _LocalWorker(Worker):
    def __init__(self, connections: _Connections) -> None:
        self._connections = connections

    def connect(self) -> None:
        self._connections.open_all()

    def begin(self) -> Tx:
        return _LocalTx(self._connections)

    def close(self) -> None:
        self._connections.close()


class _LocalTx(Tx):
    """Each statement commits on its own: nothing to commit or roll back at the end."""

    def __init__(self, connections: _Connections) -> None:
        self._connections = connections

    def execute(self, region: str, sql: str, params: Params = ()) -> Rows:
        try:
            return _query(self._connections.get(region), sql, params)
        except pymysql.err.MySQLError as err:
            if isinstance(err, pymysql.err.OperationalError) and err.args[0] >= 2000:
                self._connections.drop(region)  # a client-side error: the connection is broken
            raise TxFailed(ABORTED, _mysql_reason(err)) from err

    def commit(self) -> None:
        return None

    def rollback(self) -> None:
        return None


# --- by name -------------------------------------------------------------------------------------

SYSTEMS = (Twopc.name, DirectXA.name, SqlaTwoPhase.name, Local.name)
# Asked for by name only (not part of "all"): twopc in another configuration.
VARIANTS = (TwopcOrdered.name, TwopcAdaptive.name)
# The coordinator's one_shot_order for each twopc system (the configuration file's for the
# others: parallel).
ONE_SHOT_ORDER = {TwopcOrdered.name: "ordered", TwopcAdaptive.name: "adaptive"}


def make_system(
    name: str, endpoints: Endpoints, *, concurrency: int, wait_for_phase2: bool
) -> System:
    """The system called ``name`` (one of ``SYSTEMS``).

    Raises:
        ValueError: an unknown name.
    """
    if name == Twopc.name:
        return Twopc(endpoints, wait_for_phase2=wait_for_phase2)
    if name == TwopcPlaintext.name:
        return TwopcPlaintext(endpoints, wait_for_phase2=wait_for_phase2)
    if name == TwopcOrdered.name:
        return TwopcOrdered(endpoints, wait_for_phase2=wait_for_phase2)
    if name == TwopcAdaptive.name:
        return TwopcAdaptive(endpoints, wait_for_phase2=wait_for_phase2)
    if name == DirectXA.name:
        return DirectXA(endpoints)
    if name == SqlaTwoPhase.name:
        return SqlaTwoPhase(endpoints, concurrency)
    if name == Local.name:
        return Local(endpoints)
    known = ", ".join((*SYSTEMS, *VARIANTS))
    raise ValueError(f"unknown system {name!r}; the systems are {known}")
