"""What every decision log must do, whatever keeps it: the file log, and the SQL log on a real
MariaDB and a real PostgreSQL (one of each per session, a fresh database per test).

Group commit is observed the same way on every backend: ``on_sync`` counts the forced writes (an
fsync, a store COMMIT), and a backend can hold its next durable write (the file's fsync blocks;
the store's table is locked by another session, so that the batch's INSERT waits).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import sqlalchemy

from coordinator.decision_log import AuditRecord, CommitRecord, DecisionLog, Replay
from coordinator.decision_log._format import RecordType, scan
from coordinator.decision_log.file_log import LOG_NAME, FileDecisionLog
from coordinator.decision_log.sql_log import SqlDecisionLog
from tests.sql_stores import Stores, peek_engine
from tests.unit.test_decision_log import DEADLINE, Syncs, commit, run


def audit(n: int) -> AuditRecord:
    at_ms = 1_760_000_000_000 + n
    return AuditRecord(at_ms, "admin", "resolve", f"c1.{n:032x}", "abort", f"#{n} ü")


class Backend(Protocol):
    name: str
    batches: int

    def new_log(self, **options: Any) -> DecisionLog: ...
    def durable(self, txid: str) -> bool: ...
    def end_written(self, txid: str) -> bool: ...
    def hold(self) -> None: ...
    async def wait_held(self) -> None: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


class _Counted:
    batches = 0

    def counted(self, commits: int, seconds: float) -> None:
        self.batches += 1


class FileBackend(_Counted):
    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.syncs = Syncs()

    def new_log(self, **options: Any) -> DecisionLog:
        return FileDecisionLog(self.directory, fsync=self.syncs, on_sync=self.counted, **options)

    def _bytes(self) -> bytes:
        return (self.directory / LOG_NAME).read_bytes()

    def durable(self, txid: str) -> bool:
        return txid.encode() in self._bytes()[: self.syncs.synced_bytes]

    def end_written(self, txid: str) -> bool:
        return (RecordType.END, [txid]) in scan(self._bytes()).records

    def hold(self) -> None:
        self.syncs.hold = lambda fd: True

    async def wait_held(self) -> None:
        await self.syncs.wait_held()

    def release(self) -> None:
        self.syncs.hold = lambda fd: False
        self.syncs.release.set()

    def close(self) -> None:
        pass


class SqlBackend(_Counted):
    def __init__(self, kind: str, url: str) -> None:
        self.name = kind
        self.url = url
        self.peek = peek_engine(url)
        self._blocker: sqlalchemy.Connection | None = None

    def new_log(self, **options: Any) -> DecisionLog:
        return SqlDecisionLog(self.url, coordinator_id="c1", on_sync=self.counted, **options)

    def _row(self, txid: str) -> bool:
        with self.peek.connect() as conn:
            found = conn.execute(
                sqlalchemy.text(
                    "SELECT 1 FROM twopc_commits WHERE coordinator_id = 'c1' AND txid = :t"
                ),
                {"t": txid},
            ).first()
        return found is not None

    def durable(self, txid: str) -> bool:
        return self._row(txid)  # visible to another session: committed

    def end_written(self, txid: str) -> bool:
        return not self._row(txid)

    def hold(self) -> None:
        """Another session locks the commits table against writes: the next INSERT waits."""
        conn = self.peek.connect()
        if self.name == "postgresql":
            conn.execute(sqlalchemy.text("LOCK TABLE twopc_commits IN EXCLUSIVE MODE"))
        else:
            conn.execute(sqlalchemy.text("LOCK TABLES twopc_commits READ"))
        self._blocker = conn

    async def wait_held(self) -> None:
        if self.name == "postgresql":
            query = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        else:
            query = (
                "SELECT count(*) FROM information_schema.processlist "
                "WHERE state LIKE 'Waiting for table%'"
            )
        deadline = time.monotonic() + DEADLINE
        while True:
            with self.peek.connect() as conn:
                if conn.execute(sqlalchemy.text(query)).scalar():
                    return
            assert time.monotonic() < deadline, "the writer never waited on the lock"
            await asyncio.sleep(0.005)

    def release(self) -> None:
        assert self._blocker is not None
        if self.name != "postgresql":
            self._blocker.execute(sqlalchemy.text("UNLOCK TABLES"))
        self._blocker.rollback()
        self._blocker.close()
        self._blocker = None

    def close(self) -> None:
        if self._blocker is not None:
            self.release()
        self.peek.dispose()


@pytest.fixture(params=["file", "mariadb", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: Backend
    if request.param == "file":
        made = FileBackend(tmp_path)
    else:
        stores: Stores = request.getfixturevalue("sql_stores")
        made = SqlBackend(request.param, stores.new_database(request.param))
    try:
        yield made
    finally:
        made.close()


async def opened(backend: Backend, **options: Any) -> tuple[DecisionLog, Replay]:
    log = backend.new_log(**options)
    return log, await log.open()


async def replay_of(backend: Backend, **options: Any) -> Replay:
    log, replay = await opened(backend, **options)
    await log.close()
    return replay


# --- round trips ---


def test_a_new_log_is_empty(backend: Backend) -> None:
    assert run(replay_of(backend)) == Replay()


def test_commits_and_ends_survive_close_and_open(backend: Backend) -> None:
    records = [commit(1), commit(2, "r-ü"), commit(3, "a", "b", "c"), commit(4)]
    ended = {commit(2).txid, commit(4).txid}

    async def scenario() -> None:
        log, _ = await opened(backend)
        for record in records:
            await log.record_commit(record)
            if record.txid in ended:
                await log.record_end(record.txid)
        await log.close()

    run(scenario())
    replay = run(replay_of(backend))
    assert replay.open_commits == [records[0], records[2]]
    assert replay.ended <= ended  # the SQL log deletes ended rows: it knows none
    assert replay.torn_bytes == 0


def test_open_commits_keep_decision_order(backend: Backend) -> None:
    records = [commit(n) for n in (5, 3, 9, 1, 7)]

    async def scenario() -> None:
        log, _ = await opened(backend)
        for record in records:
            await log.record_commit(record)
        await asyncio.gather(*(log.record_commit(commit(n)) for n in range(100, 150)))
        await log.record_end(commit(9).txid)
        assert log.open_commits()[:4] == [commit(5), commit(3), commit(1), commit(7)]
        await log.close()

    run(scenario())
    expected = [commit(5), commit(3), commit(1), commit(7)]
    replay = run(replay_of(backend))
    assert replay.open_commits[:4] == expected
    assert {r.txid for r in replay.open_commits[4:]} == {commit(n).txid for n in range(100, 150)}

    async def more() -> None:  # a reopened log numbers its decisions after the old ones
        log, _ = await opened(backend)
        await log.record_commit(commit(2))
        await log.close()

    run(more())
    assert run(replay_of(backend)).open_commits[-1] == commit(2)


def test_a_reopened_log_knows_its_open_commits(backend: Backend) -> None:
    async def first() -> None:
        log, _ = await opened(backend)
        await log.record_commit(commit(1))
        await log.record_commit(commit(2))
        await log.record_end(commit(1).txid)
        await log.close()

    async def second() -> None:
        log, _ = await opened(backend)
        assert log.open_commits() == [commit(2)]
        await log.record_end(commit(2).txid)
        assert log.open_commits() == []
        await log.close()

    run(first())
    run(second())
    assert run(replay_of(backend)).open_commits == []


def test_a_closed_log_takes_no_records(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend)
        await log.close()
        await log.close()
        with pytest.raises(RuntimeError, match="closed"):
            await log.record_commit(commit(1))
        with pytest.raises(RuntimeError, match="closed"):
            await log.record_audit(audit(1))

    run(scenario())


# --- group commit ---


def test_concurrent_commits_share_durable_writes(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend)
        before = backend.batches
        await asyncio.gather(*(log.record_commit(commit(n)) for n in range(200)))
        assert 1 <= backend.batches - before <= 20
        await log.close()

    run(scenario())
    assert run(replay_of(backend)).open_commits == [commit(n) for n in range(200)]


def test_no_commit_returns_before_the_durable_write_that_covers_it(backend: Backend) -> None:
    async def commit_and_check(log: DecisionLog, record: CommitRecord) -> None:
        await log.record_commit(record)
        assert backend.durable(record.txid)

    async def scenario() -> None:
        log, _ = await opened(backend)
        await log.record_commit(commit(1000))  # tables exist, writer warm
        before = backend.batches
        backend.hold()
        first = asyncio.create_task(commit_and_check(log, commit(0)))
        await backend.wait_held()
        rest = [asyncio.create_task(commit_and_check(log, commit(n))) for n in range(1, 200)]
        for _ in range(10):  # loop turns: every new task queues its record and waits
            await asyncio.sleep(0)
        assert not any(task.done() for task in (first, *rest))
        assert not backend.durable(commit(0).txid)
        assert backend.batches == before
        backend.release()
        await asyncio.gather(first, *rest)
        assert backend.batches - before == 2  # the 199 queued meanwhile: one batch
        await log.close()

    run(scenario())


def test_ends_ride_with_the_next_commit(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend, end_flush_delay=3600)
        await log.record_commit(commit(1))
        before = backend.batches
        await log.record_end(commit(1).txid)
        await asyncio.sleep(0.05)
        assert backend.batches == before  # not forced
        assert not backend.end_written(commit(1).txid)
        await log.record_commit(commit(2))
        assert backend.batches == before + 1
        assert backend.end_written(commit(1).txid)
        await log.close()

    run(scenario())


def test_a_lone_end_is_written_after_the_delay_unforced(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend, end_flush_delay=0.01)
        await log.record_commit(commit(1))
        before = backend.batches
        await log.record_end(commit(1).txid)
        deadline = time.monotonic() + 5
        while not backend.end_written(commit(1).txid):
            assert time.monotonic() < deadline, "the END was never written"
            await asyncio.sleep(0.005)
        assert backend.batches == before, "an END alone is not a forced write"
        await log.close()

    run(scenario())
    assert run(replay_of(backend)).open_commits == []


def test_close_writes_buffered_ends(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend, end_flush_delay=3600)
        await log.record_commit(commit(1))
        await log.record_commit(commit(2))
        await log.record_end(commit(1).txid)
        await log.close()

    run(scenario())
    assert backend.end_written(commit(1).txid)
    assert run(replay_of(backend)).open_commits == [commit(2)]


# --- audits ---


def test_audit_records_are_durable_and_survive_close_and_open(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend)
        await log.record_audit(audit(1))
        await log.record_commit(commit(1))
        await asyncio.gather(log.record_audit(audit(2)), log.record_commit(commit(2)))
        await log.close()

    run(scenario())
    replay = run(replay_of(backend))
    assert replay.audits == [audit(1), audit(2)]
    assert replay.open_commits == [commit(1), commit(2)]


def test_only_the_last_audit_records_are_kept(backend: Backend) -> None:
    async def scenario() -> None:
        log, _ = await opened(backend, audit_keep=3)
        for n in range(20):
            await log.record_audit(audit(n))
        await log.close()

    run(scenario())
    assert run(replay_of(backend, audit_keep=3)).audits == [audit(17), audit(18), audit(19)]
