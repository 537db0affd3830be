"""Recovery: finishes what a crash (of the coordinator, an agent or a database) left in doubt.

Run at start and then periodically (proto/PROTOCOL.md, Recovery):
1. every COMMIT record without END is driven again (XA COMMIT on each branch is idempotent);
2. every prepared branch of ours that an agent lists is committed if it has a COMMIT record,
   committed too if its transaction is known here as committed (the listing predates phase 2,
   or a database lost a commit and brought the branch back prepared), skipped if its
   transaction is live in this process, and rolled back otherwise (presumed abort).
A crash during recovery is harmless: each step is idempotent and the next run starts over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from coordinator.decision_log import CommitRecord
from coordinator.engine.manager import TransactionManager
from coordinator.engine.states import TxState
from twopc.errors import FailedPrecondition, TwopcError
from twopc.failpoints import Failpoints

log = structlog.get_logger("twopc.recovery")


@dataclass
class RecoveryReport:
    redriven: int = 0
    committed: int = 0
    rolled_back: int = 0
    unreachable: int = 0
    left: int = 0

    @property
    def clean(self) -> bool:
        return not (self.unreachable or self.left)


class Recovery:
    def __init__(
        self,
        manager: TransactionManager,
        *,
        rpc_timeout: float = 10.0,
        concurrency: int = 64,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._manager = manager
        self._rpc_timeout = rpc_timeout
        self._limit = asyncio.Semaphore(concurrency)
        self._failpoints = failpoints or Failpoints()
        self._running = asyncio.Lock()
        self.passes = 0  # finished passes (the coordinator's health waits for the first)

    async def run_once(self) -> RecoveryReport:
        async with self._running:
            report = RecoveryReport()
            records = self._manager.open_commits_to_drive()
            done = await asyncio.gather(*(self._bounded_redrive(r) for r in records))
            report.redriven = sum(done)
            report.left += len(done) - sum(done)
            ports = self._manager.participants
            await asyncio.gather(*(self._resolve_prepared(p, report) for p in ports.names()))
            if report.redriven or report.committed or report.rolled_back or not report.clean:
                log.info("recovery_pass", **report.__dict__)
            self._manager.metrics.recovery_pass(
                clean=report.clean,
                committed=report.redriven + report.committed,
                rolled_back=report.rolled_back,
            )
            self.passes += 1
            return report

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("recovery_pass_failed")
            await asyncio.sleep(interval)

    async def _bounded_redrive(self, record: CommitRecord) -> bool:
        async with self._limit:
            try:
                await self._failpoints.ahit("coordinator.recovery")
            except TwopcError as err:
                log.warning("recovery_failed", txid=record.txid, error=err.message)
                return False
            return await self._manager.redrive(record)

    async def _resolve_prepared(self, participant: str, report: RecoveryReport) -> None:
        ports = self._manager.participants
        try:
            txids = await ports.recover(participant, self._manager.prefix, self._rpc_timeout)
        except TwopcError as err:
            report.unreachable += 1
            log.warning("recovery_agent_unreachable", participant=participant, error=err.message)
            return

        async def resolve(txid: str) -> None:
            async with self._limit:
                # Claimed right before acting, with no await in between: a transaction that is
                # live here is never touched, and none can start under this txid meanwhile.
                if not self._manager.claim_for_recovery(txid):
                    return
                try:
                    await self._failpoints.ahit("coordinator.recovery")
                    record = self._manager.commit_record(txid)
                    if record is not None:
                        if await self._manager.redrive(record):
                            report.committed += 1
                        else:
                            report.left += 1
                    elif self._manager.view(txid).state is TxState.COMMITTED:
                        # Known here as committed (its END is written): most often the listing
                        # predates phase 2 and the agent answers that it committed already; a
                        # branch prepared again (a database that lost a commit, then restarted)
                        # must commit too. Never a rollback.
                        await ports.commit(
                            participant, txid, one_phase=False, timeout=self._rpc_timeout
                        )
                    else:
                        await ports.rollback(participant, txid, self._rpc_timeout)
                        report.rolled_back += 1
                        log.info("recovery_rolled_back", txid=txid, participant=participant)
                except FailedPrecondition as err:
                    log.error(
                        "recovery_conflict", txid=txid, participant=participant, error=err.message
                    )
                    report.left += 1
                except TwopcError as err:
                    log.warning(
                        "recovery_failed", txid=txid, participant=participant, error=err.message
                    )
                    report.left += 1
                finally:
                    self._manager.release_from_recovery(txid)

        await asyncio.gather(*(resolve(t) for t in txids))
