"""The file decision log: durability, group commit, the batch format, torn last batches,
corruption, compaction, errors."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
import time
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
from coordinator.decision_log._format import (
    HEADER,
    RecordType,
    encode_commit,
    encode_end,
    frame_batch,
    scan,
)
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


def test_a_lone_end_is_written_after_the_delay_without_an_fsync(tmp_path: Path) -> None:
    """ENDs are not forced: one that no commit follows is written after its delay, and the
    next commit's fsync (or close) makes it durable."""
    syncs = Syncs()
    end = encode_end(commit(1).txid)

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs, end_flush_delay=0.01)
        await log.record_commit(commit(1))
        syncs.synced.clear()
        synced_before = syncs.synced_bytes
        await log.record_end(commit(1).txid)
        deadline = time.monotonic() + 5
        while not log_path(tmp_path).read_bytes().endswith(end):
            assert time.monotonic() < deadline, "the END was never written"
            await asyncio.sleep(0.005)
        assert syncs.synced_bytes == synced_before, "an END alone must not cost an fsync"
        await log.record_commit(commit(2))
        assert syncs.synced_bytes == len(log_path(tmp_path).read_bytes())  # covered now
        await log.close()

    run(scenario())


def test_close_writes_buffered_ends(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs, end_flush_delay=3600)
        await log.record_commit(commit(1))
        await log.record_end(commit(1).txid)
        await log.close()

    run(scenario())
    assert syncs.synced_bytes == len(log_path(tmp_path).read_bytes()), "close syncs the ENDs"
    assert run(replay_of(tmp_path)) == Replay(ended={commit(1).txid})


# --- the format ---

BATCH_HEAD_SIZE = 20  # magic, body length, CRC32, sequence number
PAGE = 4096


def framed(sequence: int, *records: bytes) -> bytes:
    """A batch laid out by hand, as the format docstring describes it."""
    body = b"".join(records)
    crc = zlib.crc32(struct.pack("<IQ", len(body), sequence) + body)
    return b"\xffTPC" + struct.pack("<IIQ", len(body), crc, sequence) + body


def batches(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, sequence number) of every batch of a well-formed log, read by hand."""
    found = []
    at = len(HEADER)
    while at < len(data):
        length, sequence = struct.unpack_from("<4xI4xQ", data, at)
        end = at + BATCH_HEAD_SIZE + length
        assert data[at:end] == framed(sequence, data[at + BATCH_HEAD_SIZE : end])  # magic, CRC
        found.append((at, end, sequence))
        at = end
    return found


def sequences(directory: Path) -> list[int]:
    return [sequence for _, _, sequence in batches(log_path(directory).read_bytes())]


def test_a_batch_is_laid_out_as_documented() -> None:
    records = [encode_commit(commit(1)), encode_end(commit(1).txid)]
    assert frame_batch(7, records) == framed(7, *records)
    assert frame_batch(1, []) == framed(1)
    assert HEADER == b"TWOPCDL\n\x03\x00\x00\x00"


def test_each_write_is_one_batch_numbered_from_one(tmp_path: Path) -> None:
    run(write_log(tmp_path, [commit(1), commit(2), commit(3)], ended=set()))
    assert sequences(tmp_path) == [1, 2, 3]
    run(write_log(tmp_path, [commit(4)], ended=set()))
    assert sequences(tmp_path) == [1, 2, 3, 4]


def test_a_log_may_start_at_any_sequence_number(tmp_path: Path) -> None:
    log_path(tmp_path).write_bytes(
        HEADER + framed(41, encode_commit(commit(1))) + framed(42, encode_commit(commit(2)))
    )
    assert run(replay_of(tmp_path)).open_commits == [commit(1), commit(2)]
    run(write_log(tmp_path, [commit(3)], ended=set()))
    assert sequences(tmp_path) == [41, 42, 43]


# --- torn tails and corruption ---

RECORDS = [commit(1), commit(2), commit(3)]
BATCH_SIZE = BATCH_HEAD_SIZE + len(encode_commit(RECORDS[-1]))


def damaged_log(directory: Path, damage: Callable[[bytearray, int], None]) -> bytes:
    """Writes RECORDS (one batch each), applies ``damage(data, start of the last batch)`` and
    returns the file."""
    run(write_log(directory, RECORDS, ended=set()))
    data = bytearray(log_path(directory).read_bytes())
    assert len(data) == len(HEADER) + 3 * BATCH_SIZE
    damage(data, len(data) - BATCH_SIZE)
    log_path(directory).write_bytes(data)
    return bytes(data)


def assert_last_batch_cut(directory: Path, torn_bytes: int) -> None:
    replay = run(replay_of(directory))
    assert replay.open_commits == RECORDS[:-1]
    assert replay.torn_bytes == torn_bytes
    assert log_path(directory).stat().st_size == len(HEADER) + 2 * BATCH_SIZE
    run(write_log(directory, [commit(4)], ended=set()))
    assert run(replay_of(directory)).open_commits == [*RECORDS[:-1], commit(4)]
    assert sequences(directory) == [1, 2, 3]


@pytest.mark.parametrize("kept", range(BATCH_SIZE))
def test_a_torn_last_batch_is_cut(tmp_path: Path, kept: int) -> None:
    def cut(data: bytearray, last: int) -> None:
        del data[last + kept :]

    damaged_log(tmp_path, cut)
    assert_last_batch_cut(tmp_path, torn_bytes=kept)


@pytest.mark.parametrize("at", range(BATCH_SIZE))
def test_a_garbled_last_batch_is_cut(tmp_path: Path, at: int) -> None:
    def garble(data: bytearray, last: int) -> None:
        data[last + at] ^= 0xFF

    damaged_log(tmp_path, garble)
    assert_last_batch_cut(tmp_path, torn_bytes=BATCH_SIZE)


def test_a_last_batch_that_reached_the_disk_as_zeros_is_cut(tmp_path: Path) -> None:
    def zero(data: bytearray, last: int) -> None:
        data[last:] = bytes(BATCH_SIZE)

    damaged_log(tmp_path, zero)
    assert_last_batch_cut(tmp_path, torn_bytes=BATCH_SIZE)


@pytest.mark.parametrize("at", range(BATCH_SIZE))
def test_damage_in_the_middle_is_refused_and_left_alone(tmp_path: Path, at: int) -> None:
    middle = len(HEADER) + BATCH_SIZE

    def garble(data: bytearray, last: int) -> None:
        data[middle + at] ^= 0xFF

    before = damaged_log(tmp_path, garble)
    with pytest.raises(DecisionLogCorrupted, match=f"batch at byte {middle} is damaged") as caught:
        run(replay_of(tmp_path))
    assert str(log_path(tmp_path)) in caught.value.message
    assert f"good batch follows at byte {middle + BATCH_SIZE}" in caught.value.message
    assert log_path(tmp_path).read_bytes() == before


# A power loss during a write that spans several pages: one page of the last batch never reached
# the disk (it reads as zeros, or as bytes of an older version of the file) and later ones did.

EARLY = [commit(n) for n in range(3)] + [commit(100)]  # one batch each
BIG = [commit(n) for n in range(101, 400)]  # one batch of several pages


def write_big_batch(directory: Path, *, then: list[CommitRecord]) -> list[tuple[int, int, int]]:
    """Writes EARLY, then BIG as one batch, then ``then`` (one batch each); returns the batches."""
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(directory, fsync=syncs)
        for record in EARLY[:-1]:
            await log.record_commit(record)
        syncs.hold = lambda fd: True
        held = asyncio.create_task(log.record_commit(EARLY[-1]))
        await syncs.wait_held()
        syncs.hold = lambda fd: False
        big = [asyncio.create_task(log.record_commit(record)) for record in BIG]
        await asyncio.sleep(0)  # one loop turn: every new task queues its record and waits
        syncs.release.set()
        await asyncio.gather(held, *big)
        for record in then:
            await log.record_commit(record)
        await log.close()

    run(scenario())
    found = batches(log_path(directory).read_bytes())
    assert [sequence for _, _, sequence in found] == list(range(1, len(EARLY) + 2 + len(then)))
    big_start, big_end, _ = found[len(EARLY)]
    assert (big_end - 1) // PAGE - big_start // PAGE >= 4  # pages 0 to 3 of it come before its end
    return found


def lose_a_page(data: bytearray, start: int, page: int, fill: str) -> None:
    """Reverts the ``page``-th page (counted from the one holding ``start``) to zeros or to
    stale bytes, here the file's own beginning, complete with its older valid batches."""
    low = max(start, (start // PAGE + page) * PAGE)
    high = (start // PAGE + page + 1) * PAGE
    data[low:high] = bytes(high - low) if fill == "zeros" else data[: high - low]


@pytest.mark.parametrize("fill", ["zeros", "stale"])
@pytest.mark.parametrize("page", range(4))
def test_a_lost_page_in_the_last_batch_cuts_that_batch(
    tmp_path: Path, page: int, fill: str
) -> None:
    (*_, (start, end, _)) = write_big_batch(tmp_path, then=[])
    data = bytearray(log_path(tmp_path).read_bytes())
    lose_a_page(data, start, page, fill)
    last_page = (end - 1) // PAGE * PAGE
    assert data[last_page:] == log_path(tmp_path).read_bytes()[last_page:]  # the end arrived
    log_path(tmp_path).write_bytes(data)

    replay = run(replay_of(tmp_path))
    assert replay.open_commits == EARLY
    assert replay.torn_bytes == end - start
    assert log_path(tmp_path).read_bytes() == data[:start]
    run(write_log(tmp_path, [commit(1000)], ended=set()))
    assert run(replay_of(tmp_path)).open_commits == [*EARLY, commit(1000)]
    assert sequences(tmp_path) == list(range(1, len(EARLY) + 2))


@pytest.mark.parametrize("fill", ["zeros", "stale"])
@pytest.mark.parametrize("page", range(4))
def test_a_lost_page_in_an_earlier_batch_is_refused(tmp_path: Path, page: int, fill: str) -> None:
    (*_, (start, _, _), (after, _, _)) = write_big_batch(tmp_path, then=[commit(1000)])
    data = bytearray(log_path(tmp_path).read_bytes())
    lose_a_page(data, start, page, fill)
    log_path(tmp_path).write_bytes(data)

    with pytest.raises(DecisionLogCorrupted, match=f"batch at byte {start} is damaged") as caught:
        run(replay_of(tmp_path))
    assert f"good batch follows at byte {after}" in caught.value.message
    assert log_path(tmp_path).read_bytes() == data


@pytest.mark.parametrize(
    ("numbers", "bad"),
    [([1, 1], 1), ([1, 3], 1), ([2, 1], 1), ([1, 2, 3, 2], 3), ([0], 0), ([0, 1], 0)],
    ids=["repeated", "gap", "backwards", "backwards last", "zero", "zero first"],
)
def test_a_good_batch_out_of_sequence_is_corruption(
    tmp_path: Path, numbers: list[int], bad: int
) -> None:
    content = HEADER + b"".join(
        framed(number, encode_commit(commit(n))) for n, number in enumerate(numbers)
    )
    log_path(tmp_path).write_bytes(content)
    at = len(HEADER) + bad * BATCH_SIZE
    with pytest.raises(DecisionLogCorrupted, match=f"batch at byte {at} .* out of order"):
        run(replay_of(tmp_path))
    assert log_path(tmp_path).read_bytes() == content


def refused(directory: Path, content: bytes, match: str) -> None:
    log_path(directory).write_bytes(content)
    with pytest.raises(DecisionLogCorrupted, match=match):
        run(replay_of(directory))
    assert log_path(directory).read_bytes() == content


@pytest.mark.parametrize("last", [True, False], ids=["last batch", "middle batch"])
def test_a_damaged_record_in_a_good_batch_is_corruption(tmp_path: Path, last: bool) -> None:
    record = bytearray(encode_commit(commit(2)))
    record[-1] ^= 0xFF  # the record's own CRC fails; the batch's is computed over the damage
    batch = framed(2, encode_commit(commit(1)), bytes(record))
    at = len(HEADER) + BATCH_SIZE + BATCH_SIZE  # batch 1, then batch 2's head and first record
    content = HEADER + framed(1, encode_commit(commit(0))) + batch
    if not last:
        content += framed(3, encode_commit(commit(3)))
    refused(tmp_path, content, f"record at byte {at} is damaged .* its batch at byte")


@pytest.mark.parametrize("tail", [b"\x00", b"\x00" * 9, encode_commit(commit(2))[:-1]])
def test_a_good_batch_must_hold_whole_records(tmp_path: Path, tail: bytes) -> None:
    content = HEADER + framed(1, encode_commit(commit(1)) + tail)
    refused(tmp_path, content, f"record at byte {len(HEADER) + BATCH_SIZE} is damaged")


def test_an_unknown_record_type_is_corruption(tmp_path: Path) -> None:
    payload = b"\x00\x00"
    unknown = struct.pack("<IIB", len(payload), zlib.crc32(b"\x09" + payload), 9) + payload
    content = HEADER + framed(1, unknown) + framed(2, encode_commit(commit(1)))
    at = len(HEADER) + BATCH_HEAD_SIZE
    refused(tmp_path, content, f"unknown record type 9 at byte {at}")


@pytest.mark.parametrize(
    "header",
    [
        b"NOTALOG!\x02\x00\x00\x00",
        HEADER[:8] + struct.pack("<I", 4),
        HEADER[:5],
        b"\x00" * 12,
    ],
    ids=["magic", "newer version", "short", "zeros"],
)
def test_a_bad_header_is_refused_and_left_alone(tmp_path: Path, header: bytes) -> None:
    refused(tmp_path, header + framed(1, encode_commit(commit(1))), "not a decision log")


def test_a_log_of_the_first_format_is_refused_and_left_alone(tmp_path: Path) -> None:
    bare_records = encode_commit(commit(1)) + encode_end(commit(1).txid)
    content = HEADER[:8] + struct.pack("<I", 1) + bare_records
    refused(tmp_path, content, "not a decision log .* format version is 1, an older format")


# --- compaction ---


def assert_numbered_on(directory: Path, first_above: int) -> None:
    """The log's batches are numbered one after another, starting above ``first_above``."""
    numbers = sequences(directory)
    assert numbers[0] > first_above
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_compaction_keeps_exactly_the_open_commits(tmp_path: Path) -> None:
    records = [commit(n) for n in range(200)]
    ended = {record.txid for record in records if int(record.txid[3:], 16) % 3}
    written = len(HEADER) + sum(BATCH_HEAD_SIZE + len(encode_commit(r)) for r in records)
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
    assert_numbered_on(tmp_path, first_above=1)  # the first batch now is a compaction's
    replay = run(replay_of(tmp_path))
    assert replay.open_commits == [*still_open, commit(1000)]
    assert replay.ended <= ended
    assert not (tmp_path / f"{LOG_NAME}.tmp").exists()


def test_sequence_numbers_never_go_back_across_compactions(tmp_path: Path) -> None:
    last_numbers: list[int] = []

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, max_bytes=512)
        for n in range(100):
            await log.record_commit(commit(n))
            await log.record_end(commit(n).txid)
            numbers = sequences(tmp_path)  # the file before or after a compaction, both whole
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            last_numbers.append(numbers[-1])
        await log.close()

    run(scenario())
    assert last_numbers == sorted(set(last_numbers))
    assert sequences(tmp_path)[0] > 10  # several compactions ran


def test_a_compaction_with_nothing_open_writes_an_empty_batch(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(
            tmp_path, max_bytes=len(HEADER) + BATCH_SIZE, end_flush_delay=0.001, fsync=syncs
        )
        await log.record_commit(commit(1))  # batch 1: the log is just at max_bytes
        syncs.hold = lambda fd: os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
        await log.record_end(commit(1).txid)  # batch 2 goes past it: compaction, as batch 3
        await syncs.wait_held()
        syncs.release.set()
        await log.close()

    run(scenario())
    assert log_path(tmp_path).read_bytes() == HEADER + framed(3)
    assert run(replay_of(tmp_path)) == Replay()
    run(write_log(tmp_path, [commit(2)], ended=set()))
    assert sequences(tmp_path) == [3, 4]


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
    assert_numbered_on(tmp_path, first_above=1)


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
    assert sequences(tmp_path) == [1, 2]  # the undone batch left no number behind


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
