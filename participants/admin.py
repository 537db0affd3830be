"""Sessions for the agent's own commands (XA RECOVER, marker reads, KILL, XA COMMIT/ROLLBACK of a
branch it does not hold): checked out for one block, and always given back when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from participants.xa import ConnectionLost, DbError, PoolExhausted, Session, SessionPool
from twopc.errors import Unavailable


class AdminSessions:
    def __init__(self, pool: SessionPool, participant: str) -> None:
        self._pool = pool
        self._participant = participant

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        """A pooled session for the block, under the command timeout. A database error that
        leaves the block becomes Unavailable: every caller can answer that, and the coordinator
        retries. The session is released when the block ends, or discarded when its connection
        broke."""
        try:
            session = await self._pool.session()
        except PoolExhausted as err:
            raise Unavailable(f"participant {self._participant}: {err.message}") from err
        except DbError as err:
            raise Unavailable(
                f"participant {self._participant} cannot reach its database: {err}"
            ) from err
        try:
            with session.commands():  # twopc's own statements only: the command timeout
                yield session
        except ConnectionLost as err:
            session.discard()
            raise Unavailable(
                f"participant {self._participant} lost its database during a command of its "
                f"own: {err}"
            ) from err
        except DbError as err:
            session.release()
            raise Unavailable(
                f"participant {self._participant}: its database refused a command of its own: {err}"
            ) from err
        except BaseException:
            session.release()
            raise
        else:
            session.release()
