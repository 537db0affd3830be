"""The file decision log: durability, group commit, torn tails, corruption, compaction, errors."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
import zlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from coordinator.decision_log import (
    CommitRecord,
    DecisionLogCorrupted,
    DecisionLogFailed,
    DecisionLogFull,
    Replay,
)
from coordinator.decision_log._format import HEADER, RecordType, encode_commit, encode_end, scan
from coordinator.decision_log.file_log import LOG_NAME, FileDecisionLog

T = TypeVar("T")
DEADLINE = 10.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, DEADLINE))


def commit(n: int, *participants: str) -> CommitRecord:
    return CommitRecord(f"c1.{n:032x}", participants or ("region-a", "region-b"))


class Syncs:
    """An fsync that counts its calls, can fail, and can hold its caller until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.failure: OSError | None = None
        self.hold: Callable[[int], bool] = lambda fd: False
        self.held = threading.Event()
        self.release = threading.Event()
        self.synced_bytes = 0
        self.synced = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        if self.hold(fd):
            self.held.set()
            self.release.wait(DEADLINE)
        size = os.fstat(fd).st_size
        os.fdatasync(fd)
        self.synced_bytes = size
        self.synced.set()

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.held.wait, DEADLINE), "no fsync arrived"

    async def wait_synced(self) -> None:
        assert await asyncio.to_thread(self.synced.wait, DEADLINE), "no fsync returned"


async def reopen(directory: Path, **options: Any) -> tuple[FileDecisionLog, Replay]:
    log = FileDecisionLog(directory, **options)
    return log, await log.open()


async def replay_of(directory: Path) -> Replay:
    log, replay = await reopen(directory)
    await log.close()
    return replay


async def write_log(directory: Path, records: list[CommitRecord], ended: set[str]) -> None:
    log, _ = await reopen(directory)
    for record in records:
        await log.record_commit(record)
        if record.txid in ended:
            await log.record_end(record.txid)
    await log.close()


def log_path(directory: Path) -> Path:
    return directory / LOG_NAME


# --- round trips ---


def test_a_missing_directory_becomes_an_empty_log(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    assert run(replay_of(directory)) == Replay()
    assert log_path(directory).read_bytes() == HEADER


def test_an_empty_file_is_a_new_log(tmp_path: Path) -> None:
    log_path(tmp_path).write_bytes(b"")
    assert run(replay_of(tmp_path)) == Replay()
    assert log_path(tmp_path).read_bytes() == HEADER


def test_commits_and_ends_survive_close_and_open(tmp_path: Path) -> None:
    records = [commit(1), commit(2, "r-ü"), commit(3, "a", "b", "c"), commit(4)]
    run(write_log(tmp_path, records, ended={commit(2).txid, commit(4).txid}))
    replay = run(replay_of(tmp_path))
    assert replay.open_commits == [records[0], records[2]]
    assert replay.ended == {commit(2).txid, commit(4).txid}
    assert replay.torn_bytes == 0


def test_open_commits_keep_log_order(tmp_path: Path) -> None:
    records = [commit(n) for n in (5, 3, 9, 1, 7)]

    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        for record in records:
            await log.record_commit(record)
        await log.record_end(commit(9).txid)
        assert log.open_commits() == [commit(5), commit(3), commit(1), commit(7)]
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).open_commits == [commit(5), commit(3), commit(1), commit(7)]


def test_a_reopened_log_knows_its_open_commits(tmp_path: Path) -> None:
    run(write_log(tmp_path, [commit(1), commit(2)], ended={commit(1).txid}))

    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        assert log.open_commits() == [commit(2)]
        await log.record_end(commit(2).txid)
        assert log.open_commits() == []
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).ended == {commit(1).txid, commit(2).txid}


def test_a_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        with pytest.raises(DecisionLogFailed, match="in use by another process"):
            await reopen(tmp_path)
        await log.close()
        await (await reopen(tmp_path))[0].close()  # the lock went with the first log

    run(scenario())


def test_a_leftover_compaction_file_is_removed(tmp_path: Path) -> None:
    (tmp_path / f"{LOG_NAME}.tmp").write_bytes(b"half a compaction")
    run(replay_of(tmp_path))
    assert not (tmp_path / f"{LOG_NAME}.tmp").exists()


def test_a_closed_log_takes_no_records(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        await log.close()
        await log.close()
        with pytest.raises(RuntimeError, match="closed"):
            await log.record_commit(commit(1))

    run(scenario())


# --- group commit ---


def test_concurrent_commits_share_fsyncs(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs)
        before = syncs.calls
        await asyncio.gather(*(log.record_commit(commit(n)) for n in range(200)))
        assert syncs.calls - before <= 20
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).open_commits == [commit(n) for n in range(200)]


def test_no_commit_returns_before_the_fsync_that_covers_it(tmp_path: Path) -> None:
    syncs = Syncs()
    path = log_path(tmp_path)

    async def commit_and_check(log: FileDecisionLog, record: CommitRecord) -> None:
        await log.record_commit(record)
        assert record.txid.encode() in path.read_bytes()[: syncs.synced_bytes]

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs)
        before = syncs.calls
        syncs.hold = lambda fd: True
        first = asyncio.create_task(commit_and_check(log, commit(0)))
        await syncs.wait_held()
        rest = [asyncio.create_task(commit_and_check(log, commit(n))) for n in range(1, 200)]
        await asyncio.sleep(0)  # one loop turn: every new task queues its record and waits
        assert not any(task.done() for task in (first, *rest))
        assert syncs.calls - before == 1
        syncs.hold = lambda fd: False
        syncs.release.set()
        await asyncio.gather(first, *rest)
        assert syncs.calls - before == 2  # the 199 queued during the first fsync: one batch
        await log.close()

    run(scenario())


def test_ends_ride_with_the_next_commit(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs, end_flush_delay=3600)
        await log.record_commit(commit(1))
        before = syncs.calls
        await log.record_end(commit(1).txid)
        assert syncs.calls == before  # not forced
        await log.record_commit(commit(2))
        assert syncs.calls == before + 1
        data = log_path(tmp_path).read_bytes()
        assert scan(data).records == [
            (RecordType.COMMIT, [commit(1).txid, "region-a", "region-b"]),
            (RecordType.END, [commit(1).txid]),
            (RecordType.COMMIT, [commit(2).txid, "region-a", "region-b"]),
        ]
        await log.close()

    run(scenario())


def test_a_lone_end_is_written_after_the_delay(tmp_path: Path) -> None:
    syncs = Syncs()
    end = encode_end(commit(1).txid)

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs, end_flush_delay=0.01)
        await log.record_commit(commit(1))
        syncs.synced.clear()
        await log.record_end(commit(1).txid)
        await syncs.wait_synced()  # nothing but the END's delay can cause this fsync
        data = log_path(tmp_path).read_bytes()
        assert data.endswith(end)
        assert syncs.synced_bytes == len(data)
        await log.close()

    run(scenario())


def test_close_writes_buffered_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = await reopen(tmp_path, end_flush_delay=3600)
        await log.record_commit(commit(1))
        await log.record_end(commit(1).txid)
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)) == Replay(ended={commit(1).txid})


# --- torn tails and corruption ---

RECORDS = [commit(1), commit(2), commit(3)]
RECORD_SIZE = len(encode_commit(RECORDS[-1]))


def damaged_log(directory: Path, damage: Callable[[bytearray, int], None]) -> bytes:
    """Writes RECORDS, applies ``damage(data, start of the last record)`` and returns the file."""
    run(write_log(directory, RECORDS, ended=set()))
    data = bytearray(log_path(directory).read_bytes())
    damage(data, len(data) - RECORD_SIZE)
    log_path(directory).write_bytes(data)
    return bytes(data)


def assert_last_record_cut(directory: Path, torn_bytes: int) -> None:
    replay = run(replay_of(directory))
    assert replay.open_commits == RECORDS[:-1]
    assert replay.torn_bytes == torn_bytes
    assert log_path(directory).stat().st_size == len(HEADER) + 2 * RECORD_SIZE
    run(write_log(directory, [commit(4)], ended=set()))
    assert run(replay_of(directory)).open_commits == [*RECORDS[:-1], commit(4)]


@pytest.mark.parametrize("kept", range(RECORD_SIZE))
def test_a_torn_last_record_is_cut(tmp_path: Path, kept: int) -> None:
    def cut(data: bytearray, last: int) -> None:
        del data[last + kept :]

    damaged_log(tmp_path, cut)
    assert_last_record_cut(tmp_path, torn_bytes=kept)


@pytest.mark.parametrize("at", range(RECORD_SIZE))
def test_a_garbled_last_record_is_cut(tmp_path: Path, at: int) -> None:
    def garble(data: bytearray, last: int) -> None:
        data[last + at] ^= 0xFF

    damaged_log(tmp_path, garble)
    assert_last_record_cut(tmp_path, torn_bytes=RECORD_SIZE)


@pytest.mark.parametrize("at", range(RECORD_SIZE))
def test_damage_in_the_middle_is_refused_and_left_alone(tmp_path: Path, at: int) -> None:
    middle = len(HEADER) + RECORD_SIZE

    def garble(data: bytearray, last: int) -> None:
        data[middle + at] ^= 0xFF

    before = damaged_log(tmp_path, garble)
    with pytest.raises(DecisionLogCorrupted, match=f"at byte {middle} is damaged") as caught:
        run(replay_of(tmp_path))
    assert str(log_path(tmp_path)) in caught.value.message
    assert log_path(tmp_path).read_bytes() == before


@pytest.mark.parametrize(
    "header",
    [b"NOTALOG!\x01\x00\x00\x00", HEADER[:8] + struct.pack("<I", 2), HEADER[:5], b"\x00" * 12],
    ids=["magic", "newer version", "short", "zeros"],
)
def test_a_bad_header_is_refused_and_left_alone(tmp_path: Path, header: bytes) -> None:
    content = header + encode_commit(commit(1))
    log_path(tmp_path).write_bytes(content)
    with pytest.raises(DecisionLogCorrupted, match="not a decision log"):
        run(replay_of(tmp_path))
    assert log_path(tmp_path).read_bytes() == content


def test_an_unknown_record_type_is_corruption(tmp_path: Path) -> None:
    payload = b"\x00\x00"
    unknown = struct.pack("<IIB", len(payload), zlib.crc32(b"\x09" + payload), 9) + payload
    content = HEADER + unknown + encode_commit(commit(1))
    log_path(tmp_path).write_bytes(content)
    with pytest.raises(DecisionLogCorrupted, match=f"unknown record type 9 at byte {len(HEADER)}"):
        run(replay_of(tmp_path))
    assert log_path(tmp_path).read_bytes() == content


# --- compaction ---


def test_compaction_keeps_exactly_the_open_commits(tmp_path: Path) -> None:
    records = [commit(n) for n in range(200)]
    ended = {record.txid for record in records if int(record.txid[3:], 16) % 3}
    written = len(HEADER) + sum(len(encode_commit(r)) for r in records)
    still_open = [record for record in records if record.txid not in ended]

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, max_bytes=1024)
        for record in records:
            await log.record_commit(record)
            if record.txid in ended:
                await log.record_end(record.txid)
        assert log.open_commits() == still_open
        await log.record_commit(commit(1000))
        await log.close()

    run(scenario())
    assert log_path(tmp_path).stat().st_size < written / 2
    replay = run(replay_of(tmp_path))
    assert replay.open_commits == [*still_open, commit(1000)]
    assert replay.ended <= ended
    assert not (tmp_path / f"{LOG_NAME}.tmp").exists()


def test_commits_wait_for_a_compaction_and_are_kept(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, max_bytes=len(HEADER) + 1, fsync=syncs)
        syncs.hold = lambda fd: os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
        await log.record_commit(commit(1))  # the log is now past max_bytes: compaction starts
        await syncs.wait_held()
        waiting = [asyncio.create_task(log.record_commit(commit(n))) for n in range(2, 50)]
        await asyncio.sleep(0)  # one loop turn: every new task queues its record and waits
        assert not any(task.done() for task in waiting)
        syncs.release.set()
        await asyncio.gather(*waiting)
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).open_commits == [commit(n) for n in range(1, 50)]


# --- errors ---


def names_the_log(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").endswith(LOG_NAME)


class FullDisk:
    """``os.write`` on a disk that fills up: one short write, then ENOSPC, for the log only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self._real_write = os.write
        self._short_write_done = False
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not (self.full and names_the_log(fd)):
            return self._real_write(fd, data)
        if not self._short_write_done and len(data) > 1:
            self._short_write_done = True
            return self._real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_fails_the_batch_and_the_log_stays_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(monkeypatch)

    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        await log.record_commit(commit(1))
        size = log_path(tmp_path).stat().st_size
        disk.full = True
        results = await asyncio.gather(
            *(log.record_commit(commit(n)) for n in (2, 3, 4)), return_exceptions=True
        )
        for n, result in zip((2, 3, 4), results, strict=True):
            assert isinstance(result, DecisionLogFull)
            assert "not committed" in result.message
            assert str(log_path(tmp_path)) in result.message
            assert result.txid == commit(n).txid
        assert log_path(tmp_path).stat().st_size == size  # the short write was cut off
        disk.full = False
        await log.record_commit(commit(5))
        assert log.open_commits() == [commit(1), commit(5)]
        await log.close()

    run(scenario())
    replay = run(replay_of(tmp_path))
    assert replay.open_commits == [commit(1), commit(5)]
    assert replay.torn_bytes == 0


def test_a_write_that_cannot_be_undone_fails_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(monkeypatch)

    def broken_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def scenario() -> None:
        log, _ = await reopen(tmp_path)
        disk.full = True
        monkeypatch.setattr(os, "ftruncate", broken_truncate)
        with pytest.raises(DecisionLogFailed, match="cutting the partial write"):
            await log.record_commit(commit(1))
        with pytest.raises(DecisionLogFailed):
            await log.record_commit(commit(2))
        await log.close()

    run(scenario())


def test_a_failed_fsync_poisons_the_log(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs)
        await log.record_commit(commit(1))
        syncs.failure = OSError(errno.EIO, os.strerror(errno.EIO))
        results = await asyncio.gather(
            *(log.record_commit(commit(n)) for n in (2, 3)), return_exceptions=True
        )
        assert all(isinstance(result, DecisionLogFailed) for result in results)
        syncs.failure = None
        with pytest.raises(DecisionLogFailed, match="Stop the coordinator"):
            await log.record_commit(commit(4))
        with pytest.raises(DecisionLogFailed, match="Stop the coordinator"):
            await log.record_end(commit(1).txid)
        await log.close()

    run(scenario())
    assert commit(1) in run(replay_of(tmp_path)).open_commits
