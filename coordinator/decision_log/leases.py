"""Leases on coordinator ids, kept in the decision log's store (table ``twopc_leases``).

A member of a coordinator group may act for a coordinator id (decide, write its decision log,
drive its phase 2) only while it holds that id's lease. The row says who holds it (``holder``,
the member's name), the ``epoch`` of that holding, and when it ends, ``expires_at``, in the
STORE's clock: every comparison with "now" is made by the store in SQL (``UTC_TIMESTAMP(6)`` on
MariaDB/MySQL, ``clock_timestamp()`` on PostgreSQL), never with a member's clock.

- ``acquire`` takes an id that is free, expired, or already held by the same member, and gives
  it the next epoch: every acquisition, a restarted member's included, is a new epoch; only
  ``renew`` keeps one. The decision log is fenced on (holder, epoch) (``SqlDecisionLog``'s
  ``lease``), so a member that lost the id, or an earlier incarnation of the same member, can no
  longer write.
- ``renew`` extends a live lease, only for its holder at its epoch.
- ``release`` ends a lease now (a clean hand-over: the next ``acquire`` succeeds at once); with
  ``free`` it also clears the holder, saying that nothing is left in doubt.
- ``held`` and ``expired`` list the rows, so that a member finds ids to take over: the expired
  ones that still name a holder; ``row`` reads one id's (where it stands, for request ids
  retried on another member: ``coordinator.request_claims``).

Each operation is one store transaction, on a connection of its own.

Errors (``twopc.errors``)::

    FailedPrecondition
     └── LeaseError                the store's rows decided
          ├── LeaseHeld            another member holds a live lease (acquire)
          └── LeaseLost            not this holder's any more, or past its deadline (renew)
    Unavailable
     └── LeaseStoreUnavailable     no answer from the store: outcome unknown

The member never trusts its own clock to extend a lease: a ``Lease`` carries a local deadline,
the monotonic time at which the successful acquire or renew was SENT plus ``lease_ms`` times
(1 - ``margin``); the store's expiry, computed later by the store, is never earlier (unless the
member's clock runs faster than the store's by more than the margin). After that deadline the
member must treat the lease as lost, whatever the store says later: ``Lease.valid`` is false and
``renew`` refuses without asking the store. A member whose clock runs slow believes in its lease
too long, and gains nothing: the store expires it, a peer takes the id with the next epoch, and
the fence refuses the slow member's writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from coordinator.decision_log._sql_schema import MEMBER_LENGTH, ensure_schema
from coordinator.decision_log.sql_log import (
    is_deadlock,
    shown,
    store_engine,
    store_url,
)
from twopc.errors import FailedPrecondition, Unavailable

__all__ = [
    "Lease",
    "LeaseError",
    "LeaseHeld",
    "LeaseLost",
    "LeaseRow",
    "LeaseStoreUnavailable",
    "SqlLeases",
]

log = structlog.get_logger("twopc.coordinator.leases")

_ATTEMPTS = 5  # deadlocks and serialization failures between concurrent acquires are retried


class LeaseError(FailedPrecondition):
    """Root of the lease errors that the store's rows decide."""


class LeaseHeld(LeaseError):
    """Another member holds a live lease on the id; the message names it and when it ends
    (``holder`` and ``epoch`` too)."""

    def __init__(self, message: str, *, holder: str = "", epoch: int = 0) -> None:
        super().__init__(message)
        self.holder = holder
        self.epoch = epoch


class LeaseLost(LeaseError):
    """The lease is no longer this member's (another holder or epoch, expired in the store, or
    past its local deadline): the member must stop acting for the id at once."""


class LeaseStoreUnavailable(Unavailable):
    """The store could not be reached or did not answer: the outcome of an acquire or renew is
    unknown, so the member must act as if it had no lease (its local deadline still runs)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A lease this member holds, as of its last successful acquire or renew.

    Attributes:
        coordinator_id: the id.
        holder: this member's name.
        epoch: the holding's epoch (the decision log is fenced on it).
        lease_ms: the length asked for.
        deadline: local monotonic seconds after which the lease must be taken as lost.
        expires_at: the store's expiry (UTC, the store's clock), for messages only.
    """

    coordinator_id: str
    holder: str
    epoch: int
    lease_ms: int
    deadline: float
    expires_at: datetime.datetime

    def valid(self, now: float) -> bool:
        """Whether the lease may still be acted on at local monotonic time ``now``."""
        return now < self.deadline


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseRow:
    """One row of ``twopc_leases`` as the store shows it, with its time left by the store's
    clock (0 when expired)."""

    coordinator_id: str
    holder: str
    epoch: int
    expires_at: datetime.datetime
    remaining_ms: int


class SqlLeases:
    """The leases in a decision-log store (see the module's docstring).

    Args:
        url: the store, as for ``SqlDecisionLog``; its password from ``password``.
        password: the store user's password (None: none, or the URL's).
        margin: the part of each lease that the local deadline gives up (0 <= margin < 1), for
            the member's clock running faster than the store's and for the time between the
            store's "now" and the answer's arrival.
        timeout_s: connect and statement timeout.
        clock: monotonic seconds (the local deadlines).
        engine_options: more keyword arguments for ``sqlalchemy.create_engine``.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        password: str | None = None,
        margin: float = 0.2,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        engine_options: Mapping[str, Any] | None = None,
        idle_in_transaction_s: int | None = None,
    ) -> None:
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self._url = store_url(url)
        if password is not None:
            self._url = self._url.set(password=password)
        self._name = shown(self._url)
        self._margin = margin
        self._clock = clock
        self._postgres = self._url.get_backend_name() == "postgresql"
        self._engine: Engine = store_engine(
            self._url,
            timeout_s=timeout_s,
            engine_options=engine_options,
            idle_in_transaction_s=idle_in_transaction_s,
            poolclass=NullPool,
        )
        self._schema_ready = False
        # The store's "now" (UTC) and "now + :ms milliseconds", per dialect.
        if self._postgres:
            self._now = "clock_timestamp()"
            self._later = "clock_timestamp() + make_interval(secs => :ms / 1000.0)"
        else:
            self._now = "UTC_TIMESTAMP(6)"
            self._later = "UTC_TIMESTAMP(6) + INTERVAL :ms * 1000 MICROSECOND"

    async def acquire(self, coordinator_id: str, member: str, lease_ms: int) -> Lease:
        """Takes the id with the next epoch: when it is free, expired by the store's clock, or
        held by ``member`` itself (a restart: its earlier incarnation is fenced off).

        Raises:
            LeaseHeld: another member holds a live lease.
            LeaseStoreUnavailable: the store did not answer; the outcome is unknown.
        """
        _check(coordinator_id, member, lease_ms)
        return await asyncio.to_thread(self._acquire, coordinator_id, member, lease_ms)

    async def renew(self, lease: Lease) -> Lease:
        """Extends the lease by its ``lease_ms`` from the store's now, at the same epoch.

        Raises:
            LeaseLost: past the local deadline (the store is not asked), expired in the store,
                or the row shows another holder or epoch.
            LeaseStoreUnavailable: the store did not answer; the member keeps the old deadline.
        """
        if not lease.valid(self._clock()):
            raise LeaseLost(
                f"the lease of {lease.holder} on coordinator id {lease.coordinator_id} (epoch "
                f"{lease.epoch}) passed its local deadline: it is taken as lost"
            )
        return await asyncio.to_thread(self._renew, lease)

    async def release(self, lease: Lease, *, free: bool = False) -> bool:
        """Ends the lease now, so that the next ``acquire`` (epoch + 1) succeeds at once.
        Released, the row keeps its holder: the id is expired, and a peer takes it over to
        resolve what the holder left (``expired``). ``free`` clears the holder too: nothing is
        left to resolve, so no peer takes it over. Returns False when the lease was no longer
        this holder's at this epoch (nothing done).

        Raises:
            LeaseStoreUnavailable: the store did not answer.
        """
        return await asyncio.to_thread(self._release, lease, free)

    async def held(self) -> list[LeaseRow]:
        """The live leases by the store's clock, by coordinator id."""
        return [row for row in await asyncio.to_thread(self._rows) if row.remaining_ms > 0]

    async def expired(self) -> list[LeaseRow]:
        """The leases expired (or released) by the store's clock whose holder may have left
        something in doubt: ids to take over. Freed ids (no holder) are not among them."""
        return [
            row
            for row in await asyncio.to_thread(self._rows)
            if row.remaining_ms <= 0 and row.holder
        ]

    async def row(self, coordinator_id: str) -> LeaseRow | None:
        """The id's row by the store's clock (freed, expired or live); None when it has none."""
        rows = await asyncio.to_thread(self._rows, coordinator_id)
        return rows[0] if rows else None

    @property
    def name(self) -> str:
        """The store, password hidden, for messages."""
        return self._name

    def close(self) -> None:
        self._engine.dispose()

    # --- in worker threads ---

    def _acquire(self, coordinator_id: str, member: str, lease_ms: int) -> Lease:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._engine.connect() as conn:
                    self._ready(conn)
                    sent = self._clock()
                    return self._acquire_in(conn, coordinator_id, member, lease_ms, sent)
            except DBAPIError as err:
                if attempt < _ATTEMPTS and is_deadlock(err):
                    continue
                raise self._unavailable("acquire", coordinator_id, err) from err
            except SQLAlchemyError as err:
                raise self._unavailable("acquire", coordinator_id, err) from err
        raise AssertionError("unreachable")

    def _acquire_in(
        self, conn: Connection, coordinator_id: str, member: str, lease_ms: int, sent: float
    ) -> Lease:
        key = {"id": coordinator_id}
        # A free row first (epoch 0, long expired), so that the locking read below always finds
        # one: concurrent acquirers then queue on its row lock instead of racing to INSERT. (On
        # MariaDB, INSERT IGNORE's duplicate check takes a shared lock, so two acquirers can
        # deadlock upgrading it to FOR UPDATE's: the victim is retried, ``_ATTEMPTS``.)
        if self._postgres:
            insert = (
                "INSERT INTO twopc_leases (coordinator_id, holder, epoch, expires_at) "
                "VALUES (:id, '', 0, '1970-01-01 00:00:00+00') ON CONFLICT DO NOTHING"
            )
        else:
            insert = (
                "INSERT IGNORE INTO twopc_leases (coordinator_id, holder, epoch, expires_at) "
                "VALUES (:id, '', 0, '1970-01-01 00:00:00')"
            )
        conn.execute(text(insert), key)
        holder, epoch, expires_at, remaining_ms = conn.execute(
            text(
                "SELECT holder, epoch, expires_at, "
                f"{self._remaining_ms('expires_at')} AS remaining_ms "
                "FROM twopc_leases WHERE coordinator_id = :id FOR UPDATE"
            ),
            key,
        ).one()
        if remaining_ms > 0 and holder != member:
            conn.rollback()
            raise LeaseHeld(
                f"coordinator id {coordinator_id} is held by {holder} (epoch {epoch}) until "
                f"{_utc(expires_at).isoformat()} by the store's clock ({remaining_ms} ms from "
                f"now); {member} cannot acquire it before then",
                holder=str(holder),
                epoch=int(epoch),
            )
        taken = conn.execute(
            text(
                f"UPDATE twopc_leases SET holder = :member, epoch = :epoch, "
                f"expires_at = {self._later} WHERE coordinator_id = :id"
            ),
            {**key, "member": member, "epoch": epoch + 1, "ms": lease_ms},
        )
        assert taken.rowcount == 1  # the row is locked (FOR UPDATE) by this transaction
        new_expiry = conn.execute(
            text("SELECT expires_at FROM twopc_leases WHERE coordinator_id = :id"), key
        ).scalar_one()
        conn.commit()
        lease = Lease(
            coordinator_id=coordinator_id,
            holder=member,
            epoch=epoch + 1,
            lease_ms=lease_ms,
            deadline=self._deadline(sent, lease_ms),
            expires_at=_utc(new_expiry),
        )
        log.info(
            "lease_acquired",
            coordinator_id=coordinator_id,
            holder=member,
            epoch=lease.epoch,
            previous_holder=holder or None,
            previous_live=remaining_ms > 0,
        )
        return lease

    def _renew(self, lease: Lease) -> Lease:
        key = {"id": lease.coordinator_id, "holder": lease.holder, "epoch": lease.epoch}
        try:
            with self._engine.connect() as conn:
                sent = self._clock()
                # The store's clock decides: an expired lease is not renewed, even when nobody
                # took it yet (its holder's local deadline has passed too, unless its clock is
                # slow, and then it must not gain from it).
                renewed = conn.execute(
                    text(
                        f"UPDATE twopc_leases SET expires_at = {self._later} "
                        "WHERE coordinator_id = :id AND holder = :holder AND epoch = :epoch "
                        f"AND expires_at > {self._now}"
                    ),
                    {**key, "ms": lease.lease_ms},
                )
                if renewed.rowcount != 1:
                    now_row = conn.execute(
                        text(
                            "SELECT holder, epoch, "
                            f"{self._remaining_ms('expires_at')} AS remaining_ms "
                            "FROM twopc_leases WHERE coordinator_id = :id"
                        ),
                        key,
                    ).one_or_none()
                    conn.rollback()
                    raise LeaseLost(_lost(lease, now_row))
                expires_at = conn.execute(
                    text("SELECT expires_at FROM twopc_leases WHERE coordinator_id = :id"), key
                ).scalar_one()
                conn.commit()
        except SQLAlchemyError as err:
            raise self._unavailable("renew", lease.coordinator_id, err) from err
        return dataclasses.replace(
            lease, deadline=self._deadline(sent, lease.lease_ms), expires_at=_utc(expires_at)
        )

    def _release(self, lease: Lease, free: bool) -> bool:
        holder = ", holder = ''" if free else ""
        try:
            with self._engine.begin() as conn:
                released = conn.execute(
                    text(
                        f"UPDATE twopc_leases SET expires_at = {self._now}{holder} "
                        "WHERE coordinator_id = :id AND holder = :holder AND epoch = :epoch"
                    ),
                    {"id": lease.coordinator_id, "holder": lease.holder, "epoch": lease.epoch},
                )
        except SQLAlchemyError as err:
            raise self._unavailable("release", lease.coordinator_id, err) from err
        done = released.rowcount == 1
        log.info(
            "lease_released" if done else "lease_release_too_late",
            coordinator_id=lease.coordinator_id,
            holder=lease.holder,
            epoch=lease.epoch,
            free=free,
        )
        return done

    def _rows(self, coordinator_id: str | None = None) -> list[LeaseRow]:
        """Every row, or ``coordinator_id``'s."""
        where = "WHERE coordinator_id = :id " if coordinator_id is not None else ""
        try:
            with self._engine.connect() as conn:
                self._ready(conn)
                found = conn.execute(
                    text(
                        "SELECT coordinator_id, holder, epoch, expires_at, "
                        f"{self._remaining_ms('expires_at')} AS remaining_ms "
                        f"FROM twopc_leases {where}ORDER BY coordinator_id"
                    ),
                    {"id": coordinator_id},
                ).all()
                conn.commit()
        except SQLAlchemyError as err:
            raise self._unavailable("list", "*", err) from err
        return [
            LeaseRow(row[0], row[1], row[2], _utc(row[3]), max(0, int(row[4]))) for row in found
        ]

    def _ready(self, conn: Connection) -> None:
        if not self._schema_ready:
            ensure_schema(conn, self._name)
            self._schema_ready = True

    def _remaining_ms(self, column: str) -> str:
        """SQL: the milliseconds from the store's now to ``column`` (negative when past)."""
        if self._postgres:
            return f"floor(extract(epoch from ({column} - clock_timestamp())) * 1000)::bigint"
        return f"floor(timestampdiff(MICROSECOND, UTC_TIMESTAMP(6), {column}) / 1000)"

    def _deadline(self, sent: float, lease_ms: int) -> float:
        return sent + lease_ms * (1 - self._margin) / 1000

    def _unavailable(self, what: str, coordinator_id: str, err: SQLAlchemyError) -> Exception:
        reason = (
            f"{type(err.orig).__name__}: {err.orig}"
            if isinstance(err, DBAPIError) and err.orig is not None
            else f"{type(err).__name__}: {err}"
        )
        log.warning("lease_store_unavailable", operation=what, store=self._name, error=reason)
        return LeaseStoreUnavailable(
            f"lease {what} for coordinator id {coordinator_id} in {self._name} failed: {reason}; "
            "its outcome is unknown: act as if the lease were not held"
        )


def _check(coordinator_id: str, member: str, lease_ms: int) -> None:
    if not member or len(member) > MEMBER_LENGTH:
        raise ValueError(f"a member's name has 1 to {MEMBER_LENGTH} characters, got {member!r}")
    if not coordinator_id or not coordinator_id.isascii() or len(coordinator_id) > 64:
        raise ValueError(f"a coordinator id has 1 to 64 ASCII characters, got {coordinator_id!r}")
    if lease_ms <= 0:
        raise ValueError(f"lease_ms must be positive, got {lease_ms}")


def _lost(lease: Lease, row: Any) -> str:
    what = (
        f"the lease of {lease.holder} on coordinator id {lease.coordinator_id} "
        f"(epoch {lease.epoch})"
    )
    if row is None:
        return f"{what} is gone: the store has no row for the id"
    holder, epoch, remaining_ms = row
    if holder != lease.holder or epoch != lease.epoch:
        return f"{what} was taken over: the store shows {holder} at epoch {epoch}"
    return f"{what} expired by the store's clock {-remaining_ms} ms ago"


def _utc(value: datetime.datetime) -> datetime.datetime:
    """The store's timestamps as aware UTC (MariaDB's DATETIME comes back naive, in UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)
