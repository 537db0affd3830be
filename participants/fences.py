"""Fencing: the highest lease epoch seen per coordinator id, kept durably, and older ones refused.

In a coordinator group (issue 12) a coordinator id is held under a lease whose epoch grows by one
at every acquisition; each call that changes a branch carries the caller's epoch. The agent keeps
the highest epoch it has seen per id and refuses, with ``Fenced``, a call that carries a lower
one: it comes from a member that lost the id (paused, cut off, its clock slow) and must not
prepare, commit or roll back anything more. Epoch 0 is a coordinator without a lease (the file
log): accepted while no member of a group has used the id.

Raising an id's epoch, before the call that carries the new one goes on:
1. the new epoch is written to the database, durably (a row of the marker table, below), so that
   an agent restarted after it still refuses the older epoch;
2. the branches of that id that are still active here (executing, never prepared) are rolled
   back: their coordinator was deposed, and nobody can ever prepare them;
3. the calls of older epochs still running are waited for (at most ``drain_timeout_s``), so that
   nothing an older epoch started lands after the new holder looked (its Recover lists what is
   prepared only once they are done).
Calls at the new epoch that arrive meanwhile wait for the same steps.

Where the epochs live: rows of the marker table, so that the agent needs no table or grant more
than it has. A fence row's gtrid is ``epoch/<coordinator id>`` (a txid never holds a '/', so no
marker lookup can find it) and its bqual the epoch as 8 bytes, big-endian: rows are only ever
inserted, and the highest epoch of an id is its greatest bqual. Marker collection keeps them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager

from structlog.typing import FilteringBoundLogger

from participants.admin import AdminSessions
from twopc.errors import FailedPrecondition, Fenced, InvalidArgument, Unavailable

__all__ = ["FENCE_GTRID_PREFIX", "Fences"]

FENCE_GTRID_PREFIX = b"epoch/"
_MAX_EPOCH = 2**63 - 1  # BIGINT-sized: an epoch grows by one per lease acquisition


class Fences:
    """The epochs (see the module's docstring).

    Args:
        participant: the agent's name, for messages.
        marker_table: the table the fence rows live in.
        admin: sessions for the agent's own commands.
        instance_id: the agent's instance id (written with each fence row).
        served: the coordinator ids this agent serves: only theirs get fence rows.
        abort_active: rolls back the active branches of a coordinator id (step 2).
        log: the agent's logger.
        drain_timeout_s: how long step 3 waits for older calls before it answers Unavailable.
    """

    def __init__(
        self,
        *,
        participant: str,
        marker_table: str,
        admin: AdminSessions,
        instance_id: str,
        served: Collection[str],
        abort_active: Callable[[str], Awaitable[int]],
        log: FilteringBoundLogger,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self._participant = participant
        self._table = marker_table
        self._admin = admin
        self._instance_id = instance_id
        self._served = frozenset(served)
        self._abort_active = abort_active
        self._log = log
        self._drain_timeout_s = drain_timeout_s
        self._highest: dict[str, int] = {}  # refused below this
        self._settled: dict[str, int] = {}  # the epoch whose steps 1-3 are done
        self._raising: dict[str, asyncio.Lock] = {}
        self._running: Counter[tuple[str, int]] = Counter()
        self._ended = asyncio.Condition()

    async def load(self) -> None:
        """Reads the highest epoch of every id from the database (at start)."""
        async with self._admin.session() as session:
            output = await session.execute(
                f"SELECT gtrid, MAX(bqual) FROM `{self._table}` WHERE gtrid LIKE %s GROUP BY gtrid",
                [FENCE_GTRID_PREFIX + b"%"],
            )
        for gtrid, bqual in output.rows:
            coordinator_id = bytes(gtrid)[len(FENCE_GTRID_PREFIX) :].decode("ascii")
            epoch = int.from_bytes(bytes(bqual), "big")
            self._highest[coordinator_id] = self._settled[coordinator_id] = epoch
        if self._highest:
            self._log.info("fences_loaded", epochs=dict(self._highest))

    def highest(self, coordinator_id: str) -> int:
        return self._highest.get(coordinator_id, 0)

    def epochs(self) -> dict[str, int]:
        """The highest epoch of every id that has one."""
        return dict(self._highest)

    @asynccontextmanager
    async def admitted(
        self, coordinator_id: str, epoch: int, txid: str = ""
    ) -> AsyncIterator[None]:
        """The block runs as a call of ``coordinator_id`` at ``epoch``.

        Raises:
            Fenced: the epoch is below the highest seen for the id.
            InvalidArgument: the epoch is out of range.
            Unavailable: the epoch is new and could not be made durable, or calls of an older
                epoch are still running (the caller retries).
        """
        await self._admit(coordinator_id, epoch, txid)
        key = (coordinator_id, epoch)
        self._running[key] += 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
                async with self._ended:
                    self._ended.notify_all()

    async def _admit(self, coordinator_id: str, epoch: int, txid: str) -> None:
        if epoch == self._highest.get(coordinator_id, 0) == self._settled.get(coordinator_id, 0):
            return  # the common case: no await, no write
        if not 0 <= epoch <= _MAX_EPOCH:
            raise InvalidArgument(f"epoch {epoch} is out of range (0 to {_MAX_EPOCH})", txid=txid)
        self._refuse_if_older(coordinator_id, epoch, txid)
        if coordinator_id not in self._served:
            raise FailedPrecondition(
                f"participant {self._participant} does not serve coordinator id "
                f"{coordinator_id} (its coordinator_ids setting), so it keeps no lease epoch for "
                "it; add the id there to let a group member act for it",
                txid=txid,
            )
        lock = self._raising.setdefault(coordinator_id, asyncio.Lock())
        async with lock:
            self._refuse_if_older(coordinator_id, epoch, txid)
            if epoch > self._highest.get(coordinator_id, 0):
                await self._write(coordinator_id, epoch)
                previous = self._highest.get(coordinator_id, 0)
                self._highest[coordinator_id] = epoch
                aborted = await self._abort_active(coordinator_id)
                self._log.warning(
                    "fence_raised",
                    coordinator_id=coordinator_id,
                    epoch=epoch,
                    previous_epoch=previous,
                    active_branches_rolled_back=aborted,
                )
            if self._settled.get(coordinator_id, 0) < epoch:
                await self._drain(coordinator_id, epoch, txid)
                self._settled[coordinator_id] = epoch

    def _refuse_if_older(self, coordinator_id: str, epoch: int, txid: str) -> None:
        highest = self._highest.get(coordinator_id, 0)
        if epoch < highest:
            raise Fenced(
                f"participant {self._participant} refuses a call for coordinator id "
                f"{coordinator_id} at lease epoch {epoch}: epoch {highest} of that id has been "
                "seen here, so the caller lost the id to another member of its group and must "
                "step down (the id's holder finishes its transactions)",
                txid=txid,
            )

    async def _write(self, coordinator_id: str, epoch: int) -> None:
        gtrid = FENCE_GTRID_PREFIX + coordinator_id.encode("ascii")
        async with self._admin.session() as session:
            await session.execute(
                f"INSERT IGNORE INTO `{self._table}` (gtrid, bqual, owner_thread, agent_instance) "
                "VALUES (%s, %s, 0, %s)",
                [gtrid, epoch.to_bytes(8, "big"), self._instance_id],
            )

    async def _drain(self, coordinator_id: str, epoch: int, txid: str) -> None:
        def drained() -> bool:
            return not any(c == coordinator_id and e < epoch for c, e in self._running)

        try:
            async with asyncio.timeout(self._drain_timeout_s):
                async with self._ended:
                    await self._ended.wait_for(drained)
        except TimeoutError:
            older = sorted(e for c, e in self._running if c == coordinator_id and e < epoch)
            raise Unavailable(
                f"participant {self._participant} raised coordinator id {coordinator_id} to "
                f"epoch {epoch}, but calls at epoch(s) {older} are still running after "
                f"{self._drain_timeout_s:g} s; retry",
                txid=txid,
            ) from None
