"""A coordinator group: members take over the ids of peers that stopped renewing their lease.

Every member of a group holds its own coordinator id under a lease in the shared SQL store
(``lease_keeper``). When a member dies, is paused, or is cut off from the store, its lease
expires by the store's clock. Each member looks for such ids every ``interval_s``; the first to
find one acquires it (the next epoch: ``decision_log.leases``), and resolves what its holder
left in doubt with the same code the holder's own restart would run: a ``TransactionManager``
for that id replays the id's decision log (fenced on the new epoch), and ``Recovery`` drives
every COMMIT record without an END and rolls back every other prepared branch of the id. Its
agent clients carry the new epoch, so its first call to each agent raises the id's fence there:
from then on the agent refuses the deposed member, and rolls back the branches it left active.

Once a pass is clean (every agent answered, nothing left) the member frees the id (no holder:
nobody needs to look again) and closes what it opened; the id's own member, when it comes back,
acquires it at once. A pass that is not clean keeps the lease and tries again, and gives the id
up (released, still naming a holder, so that any member takes it again) after
``hold_s``, so that the id's own member, restarted meanwhile, is not kept out for long.

A member that stops cleanly releases its own id (``LeaseKeeper.release``) without freeing it: a
peer takes it over at once and finishes what it left (scale-down included).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from coordinator.agents import AgentClients
from coordinator.decision_log import DecisionLog
from coordinator.decision_log.leases import (
    Lease,
    LeaseHeld,
    LeaseRow,
    LeaseStoreUnavailable,
    SqlLeases,
)
from coordinator.engine.manager import EngineSettings, TransactionManager
from coordinator.engine.recovery import Recovery
from coordinator.lease_keeper import LeaseKeeper

__all__ = ["GroupTakeover", "TakeoverResult"]

log = structlog.get_logger("twopc.coordinator.group")


@dataclass(frozen=True)
class TakeoverResult:
    coordinator_id: str
    epoch: int
    committed: int
    rolled_back: int
    clean: bool
    seconds: float


class GroupTakeover:
    """Takes over expired ids of the group (see the module's docstring).

    Args:
        leases: the store's leases.
        own_id: this member's own coordinator id (never taken over here).
        member: this member's name (the holder it writes).
        lease_ms: the length of a takeover's lease.
        settings: the engine's settings for this member (its coordinator id is replaced).
        new_agents: agent clients acting for (coordinator id, epoch), with an on_fenced hook.
        new_log: the SQL decision log of a coordinator id, fenced on a lease, with an on_fenced
            hook (called from the log's writer thread).
        rpc_timeout_s: the timeout of each call to an agent.
        interval_s: how often expired ids are looked for.
        hold_s: how long a takeover that cannot finish keeps the id before it gives it up.
    """

    def __init__(
        self,
        leases: SqlLeases,
        *,
        own_id: str,
        member: str,
        lease_ms: int,
        settings: EngineSettings,
        new_agents: Callable[[str, int, Callable[[str], None]], AgentClients],
        new_log: Callable[[Lease, Callable[[str], None]], DecisionLog],
        rpc_timeout_s: float,
        interval_s: float,
        hold_s: float = 30.0,
    ) -> None:
        self._leases = leases
        self._own_id = own_id
        self._member = member
        self._lease_ms = lease_ms
        self._settings = settings
        self._new_agents = new_agents
        self._new_log = new_log
        self._rpc_timeout_s = rpc_timeout_s
        self._interval_s = interval_s
        self._hold_s = hold_s

    async def run(self) -> None:
        """Looks for expired ids every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.look_once()
            except Exception:
                log.exception("takeover_look_failed")

    async def look_once(self) -> list[TakeoverResult]:
        """Takes over every expired id of a peer found now, one after another."""
        try:
            expired = await self._leases.expired()
        except LeaseStoreUnavailable as err:
            log.warning("takeover_store_unavailable", error=err.message)
            return []
        done = []
        for row in expired:
            if row.coordinator_id == self._own_id:
                continue
            result = await self._take_over(row)
            if result is not None:
                done.append(result)
        return done

    async def _take_over(self, row: LeaseRow) -> TakeoverResult | None:
        started = time.monotonic()
        coordinator_id = row.coordinator_id
        try:
            lease = await self._leases.acquire(coordinator_id, self._member, self._lease_ms)
        except LeaseHeld:
            return None  # a peer was quicker, or the id's member came back
        except LeaseStoreUnavailable as err:
            log.warning(
                "takeover_store_unavailable", coordinator_id=coordinator_id, error=err.message
            )
            return None
        lost = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_lost(reason: str) -> None:
            log.warning("takeover_lease_lost", coordinator_id=coordinator_id, reason=reason)
            lost.set()

        def on_lost_threadsafe(reason: str) -> None:  # the log's writer thread
            loop.call_soon_threadsafe(on_lost, reason)

        keeper = LeaseKeeper(
            self._leases,
            coordinator_id=coordinator_id,
            member=self._member,
            lease_ms=self._lease_ms,
            on_lost=on_lost,
        )
        keeper.keep(lease)
        log.warning(
            "takeover_started",
            coordinator_id=coordinator_id,
            epoch=lease.epoch,
            previous_holder=row.holder,
            previous_epoch=row.epoch,
        )
        agents = self._new_agents(coordinator_id, lease.epoch, on_lost)
        # A takeover only recovers: no breakers (they never refuse recovery; their moves would
        # only be logged twice, beside this member's own).
        settings = dataclasses.replace(
            self._settings, coordinator_id=coordinator_id, breaker_failures=0
        )
        manager = TransactionManager(
            settings,
            agents,
            self._new_log(lease, on_lost_threadsafe),
            on_fatal=lambda err: on_lost(f"its decision log failed: {err}"),
        )
        clean = False
        committed = rolled_back = 0
        try:
            await manager.start()
            recovery = Recovery(manager, rpc_timeout=self._rpc_timeout_s)
            deadline = time.monotonic() + self._hold_s
            while not lost.is_set():
                report = await recovery.run_once()
                committed += report.redriven + report.committed
                rolled_back += report.rolled_back
                if report.clean and not manager.open_commits_to_drive():
                    clean = True
                    break
                if time.monotonic() > deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self._interval_s)
        except Exception:
            log.exception("takeover_failed", coordinator_id=coordinator_id, epoch=lease.epoch)
        finally:
            with contextlib.suppress(Exception):
                await manager.close()
            with contextlib.suppress(Exception):
                await agents.close()
            await keeper.release(free=clean and not lost.is_set())
        result = TakeoverResult(
            coordinator_id,
            lease.epoch,
            committed,
            rolled_back,
            clean and not lost.is_set(),
            time.monotonic() - started,
        )
        log.warning(
            "takeover_finished" if result.clean else "takeover_gave_up",
            coordinator_id=coordinator_id,
            epoch=lease.epoch,
            committed=committed,
            rolled_back=rolled_back,
            seconds=round(result.seconds, 3),
        )
        return result
