"""AUDIT records in the decision log (format version 3): durable before acknowledged, checksummed,
cut when torn, read from a version 2 log (which is upgraded), kept across compactions, bounded."""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import pytest

from coordinator.decision_log import AuditRecord, CommitRecord, DecisionLogCorrupted, Replay
from coordinator.decision_log._format import (
    HEADER,
    encode_audit,
    encode_commit,
    encode_end,
    frame_batch,
    header,
)
from coordinator.decision_log.file_log import LOG_NAME
from tests.unit.test_decision_log import (
    BATCH_HEAD_SIZE,
    Syncs,
    commit,
    log_path,
    reopen,
    replay_of,
    run,
    sequences,
)


def audit(n: int, outcome: str = "abort") -> AuditRecord:
    return AuditRecord(
        at_ms=1_760_000_000_000 + n,
        identity="admin",
        action="resolve",
        txid=f"c1.{n:032x}",
        outcome=outcome,
        reason=f"ticket OPS-{n}: stray branch after a crash, ü",
    )


async def write(directory: Path, *items: CommitRecord | AuditRecord, **options: object) -> None:
    log, _ = await reopen(directory, **options)
    for item in items:
        if isinstance(item, AuditRecord):
            await log.record_audit(item)
        else:
            await log.record_commit(item)
    await log.close()


def test_audit_records_survive_close_and_open_in_order(tmp_path: Path) -> None:
    run(write(tmp_path, audit(1), commit(1), audit(2, "commit"), commit(2), audit(3)))
    replay = run(replay_of(tmp_path))
    assert replay.audits == [audit(1), audit(2, "commit"), audit(3)]
    assert replay.open_commits == [commit(1), commit(2)]


def test_an_audit_record_is_laid_out_as_documented() -> None:
    record = audit(7)
    fields = [
        str(record.at_ms),
        record.identity,
        record.action,
        record.txid,
        record.outcome,
        record.reason,
    ]
    payload = b"".join(struct.pack("<H", len(f.encode())) + f.encode() for f in fields)
    crc = zlib.crc32(bytes((3,)) + payload)
    assert encode_audit(record) == struct.pack("<IIB", len(payload), crc, 3) + payload


def test_no_audit_record_returns_before_the_fsync_that_covers_it(tmp_path: Path) -> None:
    syncs = Syncs()

    async def scenario() -> None:
        log, _ = await reopen(tmp_path, fsync=syncs)
        syncs.hold = lambda fd: True
        waiting = asyncio.create_task(log.record_audit(audit(1)))
        await syncs.wait_held()
        for _ in range(10):  # loop turns: nothing may settle the waiter while the fsync runs
            await asyncio.sleep(0)
        assert not waiting.done()
        syncs.release.set()
        await waiting
        assert syncs.synced_bytes == log_path(tmp_path).stat().st_size
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).audits == [audit(1)]


AUDIT_BATCH = BATCH_HEAD_SIZE + len(encode_audit(audit(2)))


@pytest.mark.parametrize("kept", range(0, AUDIT_BATCH, 7))
def test_a_torn_audit_batch_is_cut(tmp_path: Path, kept: int) -> None:
    run(write(tmp_path, audit(1), audit(2)))
    data = log_path(tmp_path).read_bytes()
    assert len(data) == len(HEADER) + 2 * AUDIT_BATCH
    log_path(tmp_path).write_bytes(data[: len(data) - AUDIT_BATCH + kept])
    replay = run(replay_of(tmp_path))
    assert replay.audits == [audit(1)]
    assert replay.torn_bytes == kept


@pytest.mark.parametrize("at", range(0, AUDIT_BATCH, 5))
def test_a_garbled_audit_batch_is_cut_when_last_and_refused_in_the_middle(
    tmp_path: Path, at: int
) -> None:
    run(write(tmp_path, audit(1), audit(2), audit(3)))
    data = bytearray(log_path(tmp_path).read_bytes())
    last, middle = len(data) - AUDIT_BATCH, len(HEADER) + AUDIT_BATCH
    torn = bytearray(data)
    torn[last + at] ^= 0xFF
    log_path(tmp_path).write_bytes(torn)
    assert run(replay_of(tmp_path)).audits == [audit(1), audit(2)]
    damaged = bytearray(log_path(tmp_path).read_bytes() + bytes(data[last:]))  # whole again
    damaged[middle + at] ^= 0xFF
    log_path(tmp_path).write_bytes(damaged)
    with pytest.raises(DecisionLogCorrupted, match=f"batch at byte {middle} is damaged"):
        run(replay_of(tmp_path))


def test_an_audit_record_with_a_bad_checksum_in_a_good_batch_is_corruption(
    tmp_path: Path,
) -> None:
    record = bytearray(encode_audit(audit(1)))
    record[-1] ^= 0xFF
    log_path(tmp_path).write_bytes(HEADER + frame_batch(1, [bytes(record)]))
    with pytest.raises(DecisionLogCorrupted, match="is damaged"):
        run(replay_of(tmp_path))


def raw_record(kind: int, *strings: str) -> bytes:
    payload = b"".join(struct.pack("<H", len(s.encode())) + s.encode() for s in strings)
    crc = zlib.crc32(bytes((kind,)) + payload)
    return struct.pack("<IIB", len(payload), crc, kind) + payload


@pytest.mark.parametrize(
    "strings",
    [("1", "admin", "resolve", "c1.r-x", "abort"), ("soon", "a", "b", "c", "d", "e"), ()],
    ids=["five fields", "time not digits", "empty"],
)
def test_an_audit_record_that_no_writer_writes_is_corruption(
    tmp_path: Path, strings: tuple[str, ...]
) -> None:
    log_path(tmp_path).write_bytes(HEADER + frame_batch(1, [raw_record(3, *strings)]))
    with pytest.raises(DecisionLogCorrupted, match="AUDIT record at byte"):
        run(replay_of(tmp_path))


# --- a log of format version 2 ---

V2 = header(2)


def test_a_version_2_log_is_read_and_upgraded_in_place(tmp_path: Path) -> None:
    batches = frame_batch(5, [encode_commit(commit(1)), encode_commit(commit(2))])
    batches += frame_batch(6, [encode_end(commit(1).txid)])
    log_path(tmp_path).write_bytes(V2 + batches + b"\xfftorn")  # a torn tail, too
    replay = run(replay_of(tmp_path))
    assert replay.open_commits == [commit(2)]
    assert replay.ended == {commit(1).txid}
    assert replay.torn_bytes == 5
    assert replay.audits == []
    # The same batches behind the new header; the torn tail gone.
    assert log_path(tmp_path).read_bytes() == HEADER + batches
    assert not (tmp_path / f"{LOG_NAME}.tmp").exists()
    run(write(tmp_path, audit(1), commit(3)))
    replay = run(replay_of(tmp_path))
    assert replay.audits == [audit(1)]
    assert replay.open_commits == [commit(2), commit(3)]
    assert sequences(tmp_path) == [5, 6, 7, 8]


def test_an_audit_record_in_a_version_2_log_is_corruption(tmp_path: Path) -> None:
    content = V2 + frame_batch(1, [encode_audit(audit(1))])
    log_path(tmp_path).write_bytes(content)
    with pytest.raises(DecisionLogCorrupted, match=r"AUDIT record .* format version 2"):
        run(replay_of(tmp_path))
    assert log_path(tmp_path).read_bytes() == content  # left alone


# --- compaction ---


def test_audit_records_survive_compactions(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = await reopen(tmp_path, max_bytes=1024, end_flush_delay=0.001)
        await log.record_audit(audit(1))
        for n in range(200):  # many compactions: every record here is ended
            await log.record_commit(commit(n))
            await log.record_end(commit(n).txid)
        await log.record_audit(audit(2, "commit"))
        for n in range(200, 400):
            await log.record_commit(commit(n))
            await log.record_end(commit(n).txid)
        await log.close()

    run(scenario())
    assert sequences(tmp_path)[0] > 10  # compactions ran
    assert log_path(tmp_path).stat().st_size < 4096
    replay = run(replay_of(tmp_path))
    assert replay.audits == [audit(1), audit(2, "commit")]


def test_only_the_last_audit_records_are_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        log, _ = await reopen(tmp_path, max_bytes=2048, audit_keep=3)
        for n in range(40):
            await log.record_audit(audit(n))
        for n in range(100):  # compactions after the audits
            await log.record_commit(commit(n))
            await log.record_end(commit(n).txid)
        await log.close()

    run(scenario())
    assert run(replay_of(tmp_path)).audits[-3:] == [audit(37), audit(38), audit(39)]
    replay = run(_replay_keeping(tmp_path, 3))
    assert replay.audits == [audit(37), audit(38), audit(39)]
    log_bytes = log_path(tmp_path).read_bytes()
    assert sum(1 for n in range(40) if audit(n).reason.encode() in log_bytes) == 3


async def _replay_keeping(directory: Path, keep: int) -> Replay:
    log, replay = await reopen(directory, audit_keep=keep)
    await log.close()
    return replay
