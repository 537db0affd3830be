"""Finishing a branch from a session other than its own, and the sessions that may still hold one.

A branch the agent does not hold (prepared in an earlier life of the agent, or its session broke)
is committed or rolled back from an admin session. When the server answers XAER_NOTA, the marker
row tells committed (present) from rolled back (absent); a branch still listed by XA RECOVER is
held by a live session (a frozen or partitioned agent): the marker names that session, which is
killed, and waited for, before the branch is finished. A commit made this way is checked where it
landed (the marker must be committed).

A session whose connection broke mid-PREPARE or mid-COMMIT and that could not be ended then is
doubtful: nothing is answered about its txid until it has ended (what the server shows before
that is not final).
"""

from __future__ import annotations

import asyncio

from structlog.typing import FilteringBoundLogger

from participants.admin import AdminSessions
from participants.branches import Clock
from participants.xa import (
    ER_XA_RBROLLBACK,
    ER_XAER_NOTA,
    DbError,
    Session,
    committed_markers,
    kill,
    marker_owner,
    prepared_xids,
    session_exists,
)
from twopc.errors import FailedPrecondition, TwopcError, Unavailable
from twopc.failpoints import Failpoints
from twopc.txid import Xid

KILL_SETTLE_S = 5.0


class Takeover:
    def __init__(
        self,
        *,
        participant: str,
        marker_table: str,
        admin: AdminSessions,
        clock: Clock,
        failpoints: Failpoints,
        log: FilteringBoundLogger,
    ) -> None:
        self._name = participant
        self._marker_table = marker_table
        self._admin = admin
        self._clock = clock
        self._failpoints = failpoints
        self._log = log
        # Sessions whose connection broke mid-PREPARE or mid-COMMIT and that could not be ended
        # then: txid -> server session id. Nothing is answered about that txid before it ends.
        self._doubtful: dict[str, int] = {}

    async def commit(self, xid: Xid) -> bool:
        """XA COMMIT from a pooled session; True if it had committed already."""
        return await self._finish_on_server(xid, "COMMIT")

    async def rollback(self, xid: Xid) -> bool:
        """XA ROLLBACK from a pooled session; True if there was nothing to roll back."""
        return await self._finish_on_server(xid, "ROLLBACK")

    async def committed(self, txid: str) -> bool:
        """Whether the branch's marker is committed. Asked before repeating a remembered
        rollback: the memory may come from a rollback recorded while the server could not be
        asked, and a commit started before it may have landed since (the server is the truth).
        Unavailable while a broken session of ``txid`` may still be committing."""
        async with self._admin.session() as admin:
            await self.settle_doubtful(admin, txid)
            return bool(await committed_markers(admin, self._marker_table, [txid]))

    def remember_doubtful(self, txid: str, thread_id: int) -> None:
        self._doubtful[txid] = thread_id

    async def settle_doubtful(self, admin: Session, txid: str) -> None:
        """Ends the broken session that may still be working on ``txid``, if there is one;
        Unavailable while it cannot be ended (what the server shows is not final yet)."""
        thread_id = self._doubtful.get(txid)
        if thread_id is None:
            return
        if not await self.end_session(admin, thread_id):
            raise Unavailable(
                f"a session of {txid} on {self._name} is still running after its connection "
                "broke; ask again later",
                txid=txid,
            )
        self._doubtful.pop(txid, None)

    async def end_session(self, admin: Session, thread_id: int) -> bool:
        """Kills server session ``thread_id`` (its connection broke mid-statement) and waits until
        the server is done with it, so that what it shows afterwards is final. False if the
        session is still there after the settle time."""
        await kill(admin, thread_id, query_only=False)
        deadline = self._clock() + KILL_SETTLE_S
        while await session_exists(admin, thread_id):
            if self._clock() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _finish_on_server(self, xid: Xid, command: str) -> bool:
        committing = command == "COMMIT"
        deadline = self._clock() + KILL_SETTLE_S
        async with self._admin.session() as session:
            await self.settle_doubtful(session, xid.txid)
            while True:
                try:
                    await session.xa(command, xid)
                except DbError as err:
                    if err.errno == ER_XA_RBROLLBACK and not committing:
                        return True
                    if err.errno not in (ER_XAER_NOTA, ER_XA_RBROLLBACK):
                        raise self._db_unavailable(xid, err) from err
                else:
                    if committing:
                        await self._check_commit_landed(session, xid)
                        await self._failpoints.ahit("agent.after_commit")
                    self._log.info("branch_finished_by_recovery", txid=xid.txid, how=command)
                    return False
                if await committed_markers(session, self._marker_table, [xid.txid]):
                    if committing:
                        return True
                    raise FailedPrecondition(
                        f"branch {xid.txid} on {self._name} committed; it cannot be rolled back",
                        txid=xid.txid,
                    )
                if xid not in await prepared_xids(session):
                    if not committing:
                        return True
                    # Neither prepared nor committed: unless its marker row is there,
                    # uncommitted, in a transaction the server lost track of.
                    await self._check_commit_landed(session, xid)
                    raise FailedPrecondition(
                        f"branch {xid.txid} is not prepared on {self._name} and left no commit "
                        "marker: it was rolled back, so it cannot commit (heuristic outcome)",
                        txid=xid.txid,
                    )
                await self._detach_from_owner(session, xid)
                if self._clock() > deadline:
                    raise Unavailable(
                        f"branch {xid.txid} on {self._name} is still held by another session",
                        txid=xid.txid,
                    )
                await asyncio.sleep(0.02)

    async def _detach_from_owner(self, session: Session, xid: Xid) -> None:
        """A prepared branch answered XAER_NOTA while XA RECOVER lists it: a live session (a frozen
        or cut-off agent) still owns it. Kill that session, found by the branch's marker row."""
        owner = await marker_owner(session, self._marker_table, xid)
        if owner is None or owner == session.thread_id:
            raise Unavailable(
                f"branch {xid.txid} on {self._name} is held by a session the agent cannot "
                "identify; it is finished once that session ends",
                txid=xid.txid,
            )
        if await session_exists(session, owner):
            # Waited for, not only killed: MariaDB 10.11 answers OK to an XA COMMIT that races
            # with the KILL of the branch's owner, and then leaves the transaction behind
            # uncommitted, its locks held, until the server restarts (about 1 in 10 tries when
            # the COMMIT follows the KILL at once; none in 400 once the owner has left the
            # processlist).
            self._log.warning("killing_branch_owner", txid=xid.txid, session=owner)
            if not await self.end_session(session, owner):
                raise Unavailable(
                    f"branch {xid.txid} on {self._name} is held by session {owner}, which has "
                    "not ended yet after KILL; ask again later",
                    txid=xid.txid,
                )

    async def _check_commit_landed(self, session: Session, xid: Xid) -> None:
        """After an XA COMMIT from a session other than the branch's own: its marker row must be
        committed now. If it is there but uncommitted (a dirty read sees it), the server lost the
        commit (see ``_detach_from_owner``):
        say so, and fail the call so that the coordinator keeps its COMMIT record and commits
        the branch again once the server has restarted (it is then prepared once more)."""
        if await committed_markers(session, self._marker_table, [xid.txid]):
            return
        if await marker_owner(session, self._marker_table, xid) is None:
            return  # no marker at all: a branch that twopc's agent did not write
        self._log.error(
            "commit_lost_by_database",
            txid=xid.txid,
            action="restart the database: the branch comes back prepared and recovery commits it",
        )
        raise Unavailable(
            f"the database of {self._name} holds the work of branch {xid.txid} uncommitted, in a "
            "transaction that is neither prepared nor committed (it lost an XA COMMIT, which it "
            "had answered OK); restart that database and recovery will commit the branch",
            txid=xid.txid,
        )

    def _db_unavailable(self, xid: Xid, err: DbError) -> TwopcError:
        return Unavailable(
            f"participant {self._name} could not finish branch {xid.txid}: {err}", txid=xid.txid
        )
