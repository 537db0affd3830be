"""Who waits on whom on this agent's server: the edges the coordinator joins to find lock cycles
across participants (its ``coordinator.engine.deadlocks``).

No database sees a cycle that runs through two servers (T1 holds a row in eu and waits in us for
one that T2 holds, T2 waits in eu for T1's): each server sees one wait, and it lasts until a
deadline or innodb_lock_wait_timeout. The agent knows which of its sessions runs which branch,
and which branch has a statement in flight and since when; the server knows who blocks whom
(``information_schema.INNODB_LOCK_WAITS`` joined with ``INNODB_TRX``, whose thread ids are
sessions: see MARIADB-XA.md, "Who waits on whom"). Reading those needs PROCESS; the agent asks
only when one of its branches has run a statement for ``min_wait_ms`` at least, so that an agent
where nothing waits runs no SQL at all, and always on an admin session, never a branch's.

A holder that is none of this agent's live branches (a prepared branch left by an earlier life of
the agent, whose thread id is 0, or another client's session) is reported with an empty txid:
nothing the coordinator can abort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from structlog.typing import FilteringBoundLogger

from participants.admin import AdminSessions
from participants.branches import BranchRegistry
from participants.xa import DbError
from twopc.errors import Unavailable

__all__ = ["LockWaits", "WaitReport"]

# Each waiting transaction with each transaction that blocks it, by server session.
_LOCK_WAITS_SQL = (
    "SELECT r.trx_mysql_thread_id, b.trx_mysql_thread_id, b.trx_state "
    "FROM information_schema.INNODB_LOCK_WAITS w "
    "JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id "
    "JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id"
)
ER_SPECIFIC_ACCESS_DENIED = 1227  # the user lacks PROCESS


@dataclass(frozen=True)
class WaitReport:
    waiter_txid: str
    holder_txid: str  # "" when the holder is none of this agent's branches
    holder_thread_id: int
    holder_state: str
    waited_ms: int


class LockWaits:
    def __init__(
        self,
        *,
        participant: str,
        enabled: bool,
        registry: BranchRegistry,
        admin: AdminSessions,
        clock: Callable[[], float],
        log: FilteringBoundLogger,
    ) -> None:
        self._name = participant
        self._enabled = enabled
        self._registry = registry
        self._admin = admin
        self._clock = clock
        self._log = log
        self._denied = False  # PROCESS refused once: logged once, and asked no more

    async def report(self, min_wait_ms: int) -> list[WaitReport]:
        """The lock waits of this agent's branches whose statement has run ``min_wait_ms`` at
        least. No SQL when there is none (or reporting is off)."""
        if not self._enabled or self._denied:
            return []
        now = self._clock()
        threshold = min_wait_ms / 1000
        waiting = {
            branch.session.thread_id: (branch.txid, now - branch.running_since)
            for branch in self._registry.live()
            if branch.running_statement
            and branch.session is not None
            and now - branch.running_since >= threshold
        }
        if not waiting:
            return []
        try:
            async with self._admin.session() as admin:
                output = await admin.execute(_LOCK_WAITS_SQL)
        except Unavailable as err:
            cause = err.__cause__
            if not isinstance(cause, DbError) or cause.errno != ER_SPECIFIC_ACCESS_DENIED:
                raise
            self._denied = True
            self._log.warning(
                "lock_waits_not_readable",
                reason="the agent's database user lacks PROCESS: lock cycles across "
                "participants are not broken until a lock wait timeout",
            )
            return []
        # Every live branch with a session: holders are often prepared branches, not running.
        by_thread = {
            branch.session.thread_id: branch.txid
            for branch in self._registry.live()
            if branch.session is not None
        }
        reports = []
        for waiter_thread, holder_thread, holder_state in output.rows:
            found = waiting.get(int(waiter_thread or 0))
            if found is None:
                continue  # not one of ours, or not waiting long enough yet
            waiter_txid, waited = found
            holder_txid = by_thread.get(int(holder_thread or 0), "")
            if holder_txid == waiter_txid:
                continue
            reports.append(
                WaitReport(
                    waiter_txid,
                    holder_txid,
                    int(holder_thread or 0),
                    str(holder_state or ""),
                    int(waited * 1000),
                )
            )
        return reports
