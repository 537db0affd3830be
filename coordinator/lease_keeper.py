"""Holding this coordinator's id under a lease in the SQL store (``decision_log.leases``).

A coordinator on the SQL decision log acts for its id only while it holds the id's lease: it
acquires the lease before it reads its log (waiting, not serving, while another member holds
it), renews it every third of ``lease_ms``, and stops the process the moment it cannot (the
lease lost to another member, or its local deadline passed while the store did not answer): a
member that may have been replaced must not decide anything more. Its log is fenced on the
lease's epoch, so whatever it still tries to write after a takeover fails in the store. A clean
stop releases the lease, so that the next member takes over at once.

The member's name (``member``, default the host's name) is what the store records as holder: a
coordinator restarted on the same host takes its id back at once, with the next epoch, which
fences off anything its earlier incarnation could still try.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from coordinator.decision_log import DecisionLogFailed
from coordinator.decision_log.leases import (
    Lease,
    LeaseError,
    LeaseHeld,
    LeaseStoreUnavailable,
    SqlLeases,
)

__all__ = ["LeaseKeeper"]

log = structlog.get_logger("twopc.coordinator.lease")


class LeaseKeeper:
    def __init__(
        self,
        leases: SqlLeases,
        *,
        coordinator_id: str,
        member: str,
        lease_ms: int,
        on_lost: Callable[[str], None],
    ) -> None:
        self._leases = leases
        self._coordinator_id = coordinator_id
        self._member = member
        self._lease_ms = lease_ms
        self._on_lost = on_lost
        self.lease: Lease | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def acquire(self) -> Lease:
        """The id's lease, once this member has it, renewed from then on: waits while another
        member holds a live one (logged once per holding).

        Raises:
            DecisionLogFailed: the store did not answer (the daemon stops with exit 3, as when
                its log cannot be opened).
        """
        told: tuple[str, int] | None = None
        while True:
            try:
                self.lease = await self._leases.acquire(
                    self._coordinator_id, self._member, self._lease_ms
                )
            except LeaseStoreUnavailable as err:
                raise DecisionLogFailed(
                    f"cannot open the decision log in {self._leases.name}: the lease of "
                    f"coordinator id {self._coordinator_id} could not be asked for "
                    f"({err.message})"
                ) from err
            except LeaseHeld as err:
                if (err.holder, err.epoch) != told:
                    log.warning(
                        "lease_waiting",
                        coordinator_id=self._coordinator_id,
                        member=self._member,
                        reason=err.message,
                    )
                    told = (err.holder, err.epoch)
                await asyncio.sleep(self._lease_ms / 3000)
                continue
            log.info(
                "lease_acquired",
                coordinator_id=self._coordinator_id,
                member=self._member,
                epoch=self.lease.epoch,
                lease_ms=self._lease_ms,
            )
            self.keep(self.lease)
            return self.lease

    def keep(self, lease: Lease) -> None:
        """Renews ``lease`` (acquired by the caller) from now on."""
        self.lease = lease
        self._renewing = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Renews every third of the lease; calls ``on_lost`` (which stops the process) when
        the lease is lost or its local deadline passes."""
        assert self.lease is not None
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                self.lease = await self._leases.renew(self.lease)
            except LeaseStoreUnavailable as err:
                log.warning("lease_renewal_failed", error=err.message, epoch=self.lease.epoch)
            except LeaseError as err:
                self._on_lost(err.message)
                return
            except Exception as err:  # a renewal that cannot be judged: the lease is not held
                self._on_lost(f"renewing the lease failed unexpectedly ({err!r})")
                return

    async def release(self, *, free: bool = False) -> None:
        """Hands the id over (best effort: an unreleased lease expires). Released, the id is
        taken over at once by a peer, which resolves what it left in doubt; ``free`` says that
        nothing is left (a takeover that finished), so no peer needs to look."""
        if self._renewing is not None:
            self._renewing.cancel()
        if self.lease is None:
            return
        try:
            await self._leases.release(self.lease, free=free)
        except Exception as err:  # the stop goes on; the lease expires by itself
            log.warning("lease_release_failed", error=str(err))
