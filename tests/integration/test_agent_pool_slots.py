"""Every way a branch can end gives its pooled session back: afterwards the agent's pool lends all
of its slots (pool_size + overflow) at once, without waiting.

Nothing gives a dropped session's slot back behind the code's back (sessions have no finaliser):
the code that holds a session releases or discards it, and a branch's session leaves the branch
only that way. Each case drives one path, mostly a failure, on a real MariaDB against an agent in
this process, checks the outcome it must have (so that it runs the path it names), then the pool.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pymysql
import pytest

from participants.agent import Agent
from participants.calls import StatementRequest
from participants.config import AgentConfig
from participants.daemon import build_pool
from participants.xa import SessionPool
from tests.support import AGENT_ENVIRON
from twopc.errors import StatementFailed, TransactionAborted, Unavailable
from twopc.failpoints import Failpoints
from twopc.testing.playground.mariadb import AGENT_USER, MariaDBInstance
from twopc.txid import Xid
from twopc.votes import Vote

REGION = "eu"
POOL_SIZE, OVERFLOW = 2, 1
CHECKOUT_PATIENCE_S = 1.0  # all slots free: every checkout is immediate (a connect at most)
TABLE = "pool_slots"
LOCKED_ROW = 1_000_000  # a row a case locks from outside, to make an agent statement wait
MAX_ROWS = 5  # the agent's max_result_rows here
TOO_MANY_ROWS = "SELECT CHARACTER_SET_NAME FROM information_schema.CHARACTER_SETS"

INSERT = StatementRequest(f"INSERT INTO {TABLE} (v) VALUES (1)", [])
MISSING = StatementRequest("INSERT INTO no_such_table (v) VALUES (1)", [])
SLOW = StatementRequest("SELECT SLEEP(5)", [])  # outlives the read timeout: the link is lost
READ = StatementRequest(f"SELECT COUNT(*) FROM {TABLE}", [])
MANY = StatementRequest(TOO_MANY_ROWS, [])


@pytest.fixture(scope="module")
def database(scratch_mariadb: MariaDBInstance) -> MariaDBInstance:
    with scratch_mariadb.connect("twopc") as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(f"CREATE TABLE {TABLE} (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        cursor.execute(f"INSERT INTO {TABLE} (id, v) VALUES ({LOCKED_ROW}, 0)")
    return scratch_mariadb


@dataclass
class Case:
    """One case's agent, and what it needs to drive the database around it."""

    name: str
    db: MariaDBInstance
    config: AgentConfig
    failpoints: Failpoints = field(default_factory=Failpoints)
    skew: float = 0.0  # added to the agents' clock: deadlines pass without waiting
    agents: list[tuple[Agent, SessionPool]] = field(default_factory=list)

    def clock(self) -> float:
        return time.monotonic() + self.skew

    def txid(self, n: int = 1) -> str:
        tag = f"{self.name[:24]}-{zlib.crc32(self.name.encode()):08x}"  # request ids: 40 at most
        return f"slots.r-{tag}-{n}"

    def xid(self, n: int = 1) -> Xid:
        return Xid(self.txid(n), REGION)

    def raw(self) -> pymysql.Connection:
        return self.db.connect("twopc")

    async def new_agent(self) -> Agent:
        pool = build_pool(self.config, AGENT_ENVIRON)
        agent = Agent(self.config, pool, clock=self.clock, failpoints=self.failpoints)
        await agent.start()
        self.agents.append((agent, pool))
        return agent


Scenario = Callable[[Case, Agent], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(run: Scenario) -> Scenario:
    SCENARIOS[run.__name__] = run
    return run


async def prepare(agent: Agent, txid: str, *statements: StatementRequest) -> Vote:
    return (await agent.prepare(txid, REGION, list(statements), 1, 30_000)).vote


async def execute(agent: Agent, txid: str, sequence: int, *statements: StatementRequest) -> None:
    await agent.execute(txid, REGION, list(statements), sequence, 30_000)


# --- paths that end well --------------------------------------------------------------------------


@scenario
async def one_trip_prepared_then_committed(case: Case, agent: Agent) -> None:
    assert await prepare(agent, case.txid(), INSERT) is Vote.PREPARED
    await agent.commit(case.txid(), REGION, one_phase=False)


@scenario
async def one_trip_read_only(case: Case, agent: Agent) -> None:
    assert await prepare(agent, case.txid(), READ) is Vote.READ_ONLY


@scenario
async def step_by_step_prepared_then_rolled_back(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, INSERT)
    assert await prepare(agent, case.txid()) is Vote.PREPARED
    assert await agent.rollback(case.txid(), REGION) is False


@scenario
async def step_by_step_read_only(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, READ)
    assert await prepare(agent, case.txid()) is Vote.READ_ONLY


@scenario
async def one_phase_commit(case: Case, agent: Agent) -> None:
    result = await agent.commit(case.txid(), REGION, one_phase=True, statements=[INSERT])
    assert not result.already_committed


# --- a statement fails ----------------------------------------------------------------------------


@scenario
async def statement_error_step_by_step(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, INSERT)
    with pytest.raises(StatementFailed, match="statement 1 failed"):
        await execute(agent, case.txid(), 2, MISSING)


@scenario
async def statement_error_one_trip(case: Case, agent: Agent) -> None:
    assert await prepare(agent, case.txid(), INSERT, MISSING) is Vote.ABORT


@scenario
async def statement_error_one_phase(case: Case, agent: Agent) -> None:
    with pytest.raises(StatementFailed):
        await agent.commit(case.txid(), REGION, one_phase=True, statements=[MISSING])


@scenario
async def too_many_rows_step_by_step(case: Case, agent: Agent) -> None:
    with pytest.raises(StatementFailed, match="max_result_rows"):
        await execute(agent, case.txid(), 1, MANY)


@scenario
async def too_many_rows_one_trip_after_prepare(case: Case, agent: Agent) -> None:
    # The rows are counted once the trip is back, the branch prepared: it is rolled back.
    vote = await agent.prepare(case.txid(), REGION, [INSERT, MANY], 1, 30_000)
    assert (vote.vote, "max_result_rows" in vote.reason) == (Vote.ABORT, True)


# --- the connection is lost -----------------------------------------------------------------------


@scenario
async def lost_connection_step_by_step(case: Case, agent: Agent) -> None:
    with pytest.raises(StatementFailed, match="Lost connection"):
        await execute(agent, case.txid(), 1, INSERT, SLOW)


@scenario
async def lost_connection_one_trip(case: Case, agent: Agent) -> None:
    vote = await agent.prepare(case.txid(), REGION, [INSERT, SLOW], 1, 30_000)
    assert (vote.vote, vote.reason) == (Vote.ABORT, "lost the database during prepare")


# --- the deadline passes --------------------------------------------------------------------------


@scenario
async def deadline_before_a_statement(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, INSERT)
    case.skew += 3600
    with pytest.raises(TransactionAborted, match="deadline passed"):
        await execute(agent, case.txid(), 2, INSERT)


@scenario
async def deadline_before_prepare(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, INSERT)
    case.skew += 3600
    assert await prepare(agent, case.txid()) is Vote.ABORT


@scenario
async def deadline_reaped(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(), 1, INSERT)
    case.skew += 3600
    assert await agent.reap_expired() == 1


@scenario
async def deadline_interrupts_a_waiting_statement(case: Case, agent: Agent) -> None:
    wait = StatementRequest(f"UPDATE {TABLE} SET v = v + 1 WHERE id = {LOCKED_ROW}", [])
    with case.raw() as holder, holder.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(f"SELECT v FROM {TABLE} WHERE id = {LOCKED_ROW} FOR UPDATE")
        waiting = asyncio.ensure_future(execute(agent, case.txid(), 1, wait))
        await _until(lambda: _running(case, wait.sql) == 1, "the agent's statement waiting")
        case.skew += 31  # past the deadline (30 s), not past the time to sever the link
        await agent.reap_expired()  # busy: KILL QUERY now, rolled back by the statement's call
        with pytest.raises(StatementFailed, match="deadline passed during a statement"):
            await waiting
        cursor.execute("ROLLBACK")


# --- the one-trip prepare fails at each step ------------------------------------------------------


@scenario
async def one_trip_start_refused(case: Case, agent: Agent) -> None:
    with case.raw() as other, other.cursor() as cursor:
        cursor.execute(f"XA START {case.xid().sql()}")  # the XID is taken
        vote = await agent.prepare(case.txid(), REGION, [INSERT], 1, 30_000)
        assert (vote.vote, "already exists" in vote.reason) == (Vote.ABORT, True)
        cursor.execute(f"XA END {case.xid().sql()}")
        cursor.execute(f"XA ROLLBACK {case.xid().sql()}")


@scenario
async def step_by_step_start_refused(case: Case, agent: Agent) -> None:
    with case.raw() as other, other.cursor() as cursor:
        cursor.execute(f"XA START {case.xid().sql()}")
        with pytest.raises(TransactionAborted, match="already exists"):
            await execute(agent, case.txid(), 1, INSERT)
        cursor.execute(f"XA END {case.xid().sql()}")
        cursor.execute(f"XA ROLLBACK {case.xid().sql()}")


@scenario
async def one_trip_marker_exists(case: Case, agent: Agent) -> None:
    # A marker committed by an earlier attempt of the txid: the trip stops at the marker.
    with case.raw() as other, other.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO `{case.config.marker_table}` (gtrid, bqual, owner_thread, "
            "agent_instance) VALUES (%s, %s, 0, 'earlier')",
            [case.xid().gtrid, case.xid().bqual],
        )
    assert await prepare(agent, case.txid(), INSERT) is Vote.ALREADY_COMMITTED


def _fails_at(point: str) -> Scenario:
    async def run(case: Case, agent: Agent) -> None:
        case.failpoints.set(point, "1*return(unavailable)")
        with pytest.raises(Unavailable, match=f"failpoint {point} fired"):
            await prepare(agent, case.txid(), INSERT, INSERT)
        # The coordinator rolls back a branch that did not vote.
        assert await agent.rollback(case.txid(), REGION) is False

    run.__name__ = f"one_trip_fails_at_{point.removeprefix('agent.')}"
    return run


for _point in ("agent.mid_statement", "agent.after_end", "agent.after_prepare"):
    scenario(_fails_at(_point))


# --- a prepared branch finished from another session ----------------------------------------------


@scenario
async def rollback_from_another_agent(case: Case, agent: Agent) -> None:
    assert await prepare(agent, case.txid(), INSERT) is Vote.PREPARED
    other = await case.new_agent()
    assert await other.rollback(case.txid(), REGION) is False  # kills the owner's session
    # The owner learns it when the coordinator's retry reaches it: its session is dead.
    assert await agent.rollback(case.txid(), REGION) is True


@scenario
async def commit_from_another_agent(case: Case, agent: Agent) -> None:
    assert await prepare(agent, case.txid(), INSERT) is Vote.PREPARED
    other = await case.new_agent()
    assert not (await other.commit(case.txid(), REGION, one_phase=False)).already_committed
    assert (await agent.commit(case.txid(), REGION, one_phase=False)).already_committed


@scenario
async def closed_with_branches(case: Case, agent: Agent) -> None:
    await execute(agent, case.txid(1), 1, INSERT)
    assert await prepare(agent, case.txid(2), INSERT) is Vote.PREPARED
    await agent.close()
    # Left prepared, for recovery to finish once the server has seen the session go.
    await _until(lambda: _rolled_back(case, case.xid(2)), "the prepared branch detached")


# --- the test -------------------------------------------------------------------------------------


@pytest.fixture
def config(database: MariaDBInstance) -> AgentConfig:
    return AgentConfig(
        name=REGION,
        mysql_host=database.host,
        mysql_port=database.port,
        mysql_user=AGENT_USER,
        pool_size=POOL_SIZE,
        pool_overflow=OVERFLOW,
        coordinator_ids=("slots",),
        mysql_read_timeout_s=1.5,
        mysql_command_timeout_s=1.5,
        lock_wait_timeout_s=1,
        max_result_rows=MAX_ROWS,
    )


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_slot_comes_back(database: MariaDBInstance, config: AgentConfig, name: str) -> None:
    case = Case(name, database, config)

    async def run() -> None:
        agent = await case.new_agent()
        try:
            await SCENARIOS[name](case, agent)
            for _, pool in case.agents:
                await _all_slots_free(pool)
        finally:
            for each, _ in case.agents:
                await each.close(patience=0.1)

    asyncio.run(run())
    with case.raw() as conn, conn.cursor() as cursor:
        cursor.execute("XA RECOVER")
        assert not [row for row in cursor.fetchall() if b"slots." in bytes(row[3])]


async def _all_slots_free(pool: SessionPool) -> None:
    sessions = []
    try:
        async with asyncio.timeout(CHECKOUT_PATIENCE_S):
            while len(sessions) < POOL_SIZE + OVERFLOW:
                sessions.append(await pool.session())
        # The metrics' gauges (twopc_agent_pool_in_use, _waiters) agree, whatever happened.
        assert (pool.in_use, pool.waiting) == (POOL_SIZE + OVERFLOW, 0)
    except TimeoutError:
        raise AssertionError(
            f"only {len(sessions)} of {POOL_SIZE + OVERFLOW} pool slots free: a session was "
            "neither released nor discarded"
        ) from None
    finally:
        for session in sessions:
            session.release()
    assert pool.in_use == 0, "the pool's count of sessions in use missed a way back"


def _running(case: Case, sql: str) -> int:
    """How many sessions of the server are running ``sql`` now."""
    with case.raw() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = %s", [sql])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _rolled_back(case: Case, xid: Xid) -> bool:
    """XA ROLLBACK from a connection of the test's own; False while the branch's session is
    still there for the server (it answers XAER_NOTA then)."""
    with case.raw() as conn, conn.cursor() as cursor:
        try:
            cursor.execute(f"XA ROLLBACK {xid.sql()}")
        except pymysql.err.OperationalError as err:
            if err.args[0] == 1397:
                return False
            raise
    return True


async def _until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
