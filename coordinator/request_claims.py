"""Request ids across a coordinator group: which transaction each identity's request id ran as,
kept in the decision log's store (table ``twopc_requests``), for any member to read.

A member claims a request id (Begin or RunTransaction with one) for its own txid BEFORE anything
of it runs: one INSERT keyed by (owner, request id), the owner stored as the sha256 hex of its
identity (``owner_hash``: fixed length, and the store holds no certificate names). The claim
that got there first holds; every later one gets its txid back (``claim``), so a request retried
on another member learns where it ran and is never run twice. A txid answers one request of one
identity (a unique index): the request id's own txid, ``<coordinator id>.r-<request id>``,
already claimed by another identity makes ``claim`` answer None, and the member claims again
with a fresh txid.

``SqlRequestClaims`` is the engine's ``RequestClaimPort`` on the store: the claims, the lease
rows (``SqlLeases``) that say whether another coordinator id's member may still decide (live, or
expired and due for a takeover) or nobody will any more (freed, or held by this member), and the
open COMMIT rows of ``twopc_commits``. Rows older than a retention (7 days by default, as the
agents keep their markers) are deleted by ``collect``.

Each operation is one store transaction, on a pooled connection (a claim comes with every
transaction that has a request id), run in a worker thread (``asyncio.to_thread``). Errors
(``twopc.errors``)::

    Unavailable
     └── ClaimStoreUnavailable   the store did not answer (nothing may run without its claim)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    delete,
    insert,
    literal_column,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from coordinator.decision_log._sql_schema import COMMITS, REQUESTS, ensure_schema
from coordinator.decision_log.leases import LeaseRow, SqlLeases
from coordinator.decision_log.sql_log import (
    is_deadlock,
    shown,
    store_engine,
    store_url,
)
from coordinator.engine.ports import IdStanding, Standing
from twopc.errors import Unavailable

__all__ = [
    "DEFAULT_RETENTION_S",
    "ClaimStoreUnavailable",
    "SqlRequestClaims",
    "owner_hash",
    "standing_of",
]

log = structlog.get_logger("twopc.coordinator.requests")

DEFAULT_RETENTION_S = 7 * 24 * 3600
_ATTEMPTS = 5  # deadlocks between concurrent claims (two unique indexes) are retried
_MAX_BATCH = 256  # claims in one store transaction
_POOL_SIZE = 4  # connections kept: the worker threads that claim at once, mostly
_POOL_OVERFLOW = 16
_POOL_RECYCLE_S = 300
T = TypeVar("T")


class ClaimStoreUnavailable(Unavailable):
    """The store could not be reached or did not answer: nothing of the request may run."""


def owner_hash(owner: str | None) -> str:
    """The owner as ``twopc_requests`` keys it: the sha256 hex of its identity (a plaintext
    caller, with none, as the empty identity: identities are never empty)."""
    return hashlib.sha256((owner or "").encode("utf-8")).hexdigest()


def standing_of(row: LeaseRow | None, member: str) -> IdStanding:
    """Where a coordinator id stands for ``member``, from its lease row: LIVE while another
    member's lease runs; DUE when expired still naming a holder (a takeover is due, or one
    gave up); RESOLVED when freed (no holder: a takeover resolved everything), held live by
    ``member`` itself, or without a row (no member ever held it: nobody decides for it)."""
    if row is None or not row.holder:
        return IdStanding(Standing.RESOLVED)
    if row.remaining_ms > 0:
        return IdStanding(Standing.RESOLVED if row.holder == member else Standing.LIVE, row.holder)
    return IdStanding(Standing.DUE, row.holder)


@dataclasses.dataclass
class _Waiting:
    """A claim waiting for its batch."""

    owner: str
    request_id: str
    txid: str
    answer: asyncio.Future[str | None]


class SqlRequestClaims:
    """The group's request claims in a decision-log store (see the module's docstring).

    Args:
        url: the store, as for ``SqlDecisionLog``; its password from ``password``.
        leases: the store's leases (their rows tell where a coordinator id stands).
        member: this member's name (a lease it holds is its own).
        password: the store user's password (None: none, or the URL's).
        timeout_s: connect and statement timeout.
        engine_options: more keyword arguments for ``sqlalchemy.create_engine``.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        leases: SqlLeases,
        member: str,
        password: str | None = None,
        timeout_s: float = 5.0,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._url = store_url(url)
        if password is not None:
            self._url = self._url.set(password=password)
        self._name = shown(self._url)
        self._leases = leases
        self._member = member
        self._postgres = self._url.get_backend_name() == "postgresql"
        # Pooled: a claim comes with every transaction that has a request id (the SDK gives
        # each one), and a connection per claim would cost more than the claim. A connection
        # that broke is dropped by the pool (and a store with several hosts fails over).
        self._engine: Engine = store_engine(
            self._url,
            timeout_s=timeout_s,
            engine_options=engine_options,
            pool_size=_POOL_SIZE,
            max_overflow=_POOL_OVERFLOW,
            pool_recycle=_POOL_RECYCLE_S,
        )
        self._schema_ready = False
        # The store's now (UTC), never a member's clock.
        self._now: ColumnElement[Any] = literal_column(
            "clock_timestamp()" if self._postgres else "UTC_TIMESTAMP(6)"
        )
        # Claims waiting for the next batch, and the task writing batches while there are any.
        self._waiting: list[_Waiting] = []
        self._writing: asyncio.Task[None] | None = None

    # --- the engine's port ---

    async def claim(self, owner: str | None, request_id: str, txid: str) -> str | None:
        """The txid that holds ``owner``'s ``request_id``: ``txid`` when this call inserted the
        claim, the earlier claim's otherwise; None when ``txid`` holds another identity's
        request id (nothing written). One store transaction; a concurrent claim of the same key
        is resolved by reading the winner's row.

        Raises:
            ClaimStoreUnavailable: the store did not answer (claimed or not: unknown).
        """
        waiting = _Waiting(
            owner_hash(owner), request_id, txid, asyncio.get_running_loop().create_future()
        )
        self._waiting.append(waiting)
        if self._writing is None:
            self._writing = asyncio.create_task(self._write_claims())
        return await waiting.answer

    async def _write_claims(self) -> None:
        """Writes the claims waiting, as many as there are, in one store transaction each time,
        until none waits: a claim never waits for a timer, only for the batch in flight."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:_MAX_BATCH], self._waiting[_MAX_BATCH:]
                try:
                    held = await self._run("claim", self._claim_many, batch)
                except ClaimStoreUnavailable as err:
                    for waiting in batch:
                        if not waiting.answer.done():
                            waiting.answer.set_exception(type(err)(err.message))
                    continue
                for waiting in batch:
                    if not waiting.answer.done():
                        waiting.answer.set_result(held.get((waiting.owner, waiting.request_id)))
        finally:
            self._writing = None

    async def claimed(self, owner: str | None, request_id: str) -> str | None:
        """The txid that ``owner``'s ``request_id`` was claimed for, or None."""
        return await self._run("read", self._claimed, owner_hash(owner), request_id)

    async def unclaim(self, owner: str | None, request_id: str, txid: str) -> None:
        """Deletes the claim of ``owner``'s ``request_id`` if ``txid`` holds it."""
        await self._run("unclaim", self._unclaim, owner_hash(owner), request_id, txid)

    async def claimed_by(self, txid: str, owner: str | None) -> bool | None:
        """Whether ``txid``'s claim is ``owner``'s; None when ``txid`` has none."""
        found = await self._run("read", self._owner_of, txid)
        return None if found is None else found == owner_hash(owner)

    async def standing(self, coordinator_id: str) -> IdStanding:
        """Where ``coordinator_id`` stands (``standing_of`` its lease row)."""
        row = await self._leases.row(coordinator_id)
        return standing_of(row, self._member)

    async def has_commit(self, coordinator_id: str, txid: str) -> bool:
        """Whether ``coordinator_id``'s log holds an open COMMIT record of ``txid``."""
        return await self._run("read", self._has_commit, coordinator_id, txid)

    # --- housekeeping ---

    async def collect(self, retention_s: float = DEFAULT_RETENTION_S) -> int:
        """Deletes the claims older than ``retention_s`` by the store's clock; how many went.
        A request retried after that is not recognised on another member (the agents' markers,
        kept as long by default, are gone by then too)."""
        return await self._run("collect", self._collect, retention_s)

    @property
    def name(self) -> str:
        """The store, password hidden, for messages."""
        return self._name

    def close(self) -> None:
        self._engine.dispose()

    # --- in worker threads ---

    async def _run(self, what: str, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._attempt, what, work, *args)

    def _attempt(self, what: str, work: Callable[..., T], *args: Any) -> T:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._engine.connect() as conn:
                    if not self._schema_ready:
                        ensure_schema(conn, self._name)
                        self._schema_ready = True
                    return work(conn, *args)
            except DBAPIError as err:
                if attempt < _ATTEMPTS and is_deadlock(err):
                    continue
                raise self._unavailable(what, err) from err
            except SQLAlchemyError as err:
                raise self._unavailable(what, err) from err
        raise AssertionError("unreachable")

    def _claim_many(
        self, conn: Connection, batch: Sequence[_Waiting]
    ) -> dict[tuple[str, str], str]:
        """Inserts the claims that are free, then reads who holds each key: ours where the
        insert took, the earlier claim's where the key was claimed already; no entry where the
        txid holds another identity's request id (the insert was skipped, nothing written)."""
        rows = [{"owner_hash": w.owner, "request_id": w.request_id, "txid": w.txid} for w in batch]
        if self._postgres:
            statement = postgresql.insert(REQUESTS).values(created_at=self._now)
            conn.execute(statement.on_conflict_do_nothing(), rows)
        else:
            conn.execute(insert(REQUESTS).values(created_at=self._now).prefix_with("IGNORE"), rows)
        keys = sorted({(w.owner, w.request_id) for w in batch})
        found = conn.execute(
            select(REQUESTS.c.owner_hash, REQUESTS.c.request_id, REQUESTS.c.txid).where(
                tuple_(REQUESTS.c.owner_hash, REQUESTS.c.request_id).in_(keys)
            )
        ).all()
        conn.commit()
        held = {(str(o), str(r)): str(t) for o, r, t in found}
        for waiting in batch:
            if (waiting.owner, waiting.request_id) not in held:
                log.info("request_txid_taken", txid=waiting.txid)  # another identity's request
        return held

    @staticmethod
    def _claimed(conn: Connection, owner: str, request_id: str) -> str | None:
        found = conn.execute(
            select(REQUESTS.c.txid).where(
                and_(REQUESTS.c.owner_hash == owner, REQUESTS.c.request_id == request_id)
            )
        ).scalar()
        conn.commit()
        return None if found is None else str(found)

    @staticmethod
    def _unclaim(conn: Connection, owner: str, request_id: str, txid: str) -> None:
        conn.execute(
            delete(REQUESTS).where(
                and_(
                    REQUESTS.c.owner_hash == owner,
                    REQUESTS.c.request_id == request_id,
                    REQUESTS.c.txid == txid,
                )
            )
        )
        conn.commit()

    @staticmethod
    def _owner_of(conn: Connection, txid: str) -> str | None:
        found = conn.execute(select(REQUESTS.c.owner_hash).where(REQUESTS.c.txid == txid)).scalar()
        conn.commit()
        return None if found is None else str(found)

    @staticmethod
    def _has_commit(conn: Connection, coordinator_id: str, txid: str) -> bool:
        found = conn.execute(
            select(COMMITS.c.txid).where(
                and_(COMMITS.c.coordinator_id == coordinator_id, COMMITS.c.txid == txid)
            )
        ).first()
        conn.commit()
        return found is not None

    def _collect(self, conn: Connection, retention_s: float) -> int:
        if self._postgres:
            cutoff = "clock_timestamp() - make_interval(secs => :s)"
        else:
            cutoff = "UTC_TIMESTAMP(6) - INTERVAL :s SECOND"
        gone = conn.execute(
            text(f"DELETE FROM twopc_requests WHERE created_at < {cutoff}"),
            {"s": int(retention_s)},
        )
        conn.commit()
        if gone.rowcount:
            log.info("request_claims_collected", rows=gone.rowcount)
        return int(gone.rowcount)

    def _unavailable(self, what: str, err: SQLAlchemyError) -> ClaimStoreUnavailable:
        reason = (
            f"{type(err.orig).__name__}: {err.orig}"
            if isinstance(err, DBAPIError) and err.orig is not None
            else f"{type(err).__name__}: {err}"
        )
        log.warning("request_claims_unavailable", operation=what, store=self._name, error=reason)
        return ClaimStoreUnavailable(
            f"request claim {what} in {self._name} failed: {reason}; nothing of the request "
            "ran: retry"
        )
