"""Who waits on whom on this agent's server: the edges the coordinator joins to find lock cycles
across participants (its ``coordinator.engine.deadlocks``).

No database sees a cycle that runs through two servers (T1 holds a row in eu and waits in us for
one that T2 holds, T2 waits in eu for T1's): each server sees one wait, and it lasts until a
deadline or innodb_lock_wait_timeout. The agent knows which of its sessions runs which branch,
and which branch has a statement in flight and since when; the server knows who blocks whom
(``information_schema.INNODB_LOCK_WAITS`` joined with ``INNODB_TRX``, whose thread ids are
sessions: see MARIADB-XA.md, "Who waits on whom"). Reading those needs PROCESS; the agent asks
only when one of its branches has run a statement for ``min_wait_ms`` at least, so that an agent
where nothing waits runs no SQL at all, and always on an admin session, never a branch's. InnoDB
refreshes what those tables show only when nobody read them for 100 ms: the agent reads them at
most every ``CACHE_REFRESH_S``, so a cycle that forms while waits go on is seen within ~0.1 s,
and the first wait after a quiet spell at once.

A holder that is none of this agent's live branches (a prepared branch left by an earlier life of
the agent, whose thread id is 0, or another client's session) is reported with an empty txid:
nothing the coordinator can abort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
# InnoDB serves these tables from a cache that it refreshes only when nobody read it for 100 ms
# (trx0i_s.cc, CACHE_MIN_IDLE_TIME_NS): read more often, they never change again (measured:
# polled every 5 ms, a lock wait never showed up). So the agent reads them at most this often
# and answers from its last read in between (only for statements that began before it).
CACHE_REFRESH_S = 0.105


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
        # The last rows read, and when (the clock's time once they came back).
        self._rows: list[tuple[Any, ...]] = []
        self._read_at = -CACHE_REFRESH_S

    async def report(self, min_wait_ms: int) -> list[WaitReport]:
        """The lock waits of this agent's branches whose statement has run ``min_wait_ms`` at
        least. No SQL when there is none (or reporting is off)."""
        if not self._enabled or self._denied:
            return []
        now = self._clock()
        threshold = min_wait_ms / 1000
        waiting = {
            branch.session.thread_id: (
                branch.txid,
                branch.running_since,
                now - branch.running_since,
            )
            for branch in self._registry.live()
            if branch.running_statement
            and branch.session is not None
            and now - branch.running_since >= threshold
        }
        if not waiting:
            return []
        if now - self._read_at >= CACHE_REFRESH_S:
            await self._read()
        # Every live branch with a session: holders are often prepared branches, not running.
        by_thread = {
            branch.session.thread_id: branch.txid
            for branch in self._registry.live()
            if branch.session is not None
        }
        reports = []
        for waiter_thread, holder_thread, holder_state in self._rows:
            found = waiting.get(int(waiter_thread or 0))
            if found is None:
                continue  # not one of ours, or not waiting long enough yet
            waiter_txid, since, waited = found
            if since > self._read_at:
                continue  # a row of the session's earlier statement
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

    async def _read(self) -> None:
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
            self._rows = []
            return
        self._rows = list(output.rows)
        self._read_at = self._clock()
