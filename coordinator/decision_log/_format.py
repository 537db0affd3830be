"""The on-disk format of the decision log: framing batches, encoding records, scanning a file.

A file is a header, then batches; a batch is what the writer put down with one ``os.write`` and
made durable with one fsync::

    header:  magic b"TWOPCDL\\n" | u32 format version
    batch:   magic b"\\xffTPC" | u32 body length | u32 CRC32 | u64 sequence number | body
    body:    records, back to back (none in a compacted file without open commits)
    record:  u32 payload length | u32 CRC32 of (type byte + payload) | u8 type | payload

Integers are little-endian. A payload is a sequence of UTF-8 strings, each prefixed by its u16
byte length: COMMIT holds the txid then each participant, END holds the txid, AUDIT (version 3)
holds exactly six: the wall-clock time in ms as decimal digits, the identity that acted, the
action, the txid (or ""), the outcome chosen and the reason (``AuditRecord``). Length-prefixed
strings rather than JSON: a record is half the size, needs no escaping, encodes with one
``b"".join`` on the hot path and decodes without a parser that could accept more than we write.

Why batches: after a power loss, a write spanning several pages can reach the disk with an early
page missing (zeros, old bytes) and a later one present. Record checksums alone then show a bad
record followed by good ones, which is also what damage to acknowledged data looks like. A torn
write only ever damages the last batch, whose fsync never returned, so none of its decisions was
acknowledged: a damaged batch is cut if no valid batch with a higher sequence number follows it
anywhere in the file, and the file is refused if one does.

- The batch CRC covers the body length, the sequence number and the body, so a batch whose CRC
  holds was written whole, header included. Its records keep their own CRCs, which must then hold.
- Sequence numbers go up by exactly one per batch and carry on across compactions (a compacted
  file starts with the next number), so stale bytes of an earlier batch never pass for a later
  one; a valid batch out of sequence is corruption.
- The magic's first byte, 0xFF, never occurs in UTF-8: no txid or participant name contains it.

Record types are never skipped: a reader that skipped a record it did not understand (a heuristic
decision, say) would drop it at the next compaction. A future record type comes with a new format
version, which an older reader refuses as a whole; an unknown type under the current version is
corruption.

Versions: 2 framed records in batches (COMMIT, END). 3 adds AUDIT, the operator's actions
(``twopc admin``); its batches are framed as version 2's. A version 2 file is read (an AUDIT
record in it is corruption) and upgraded when opened: its header is rewritten as version 3's,
its batches kept byte for byte (``FileDecisionLog``). Version 1 (bare records) had no users; it is
refused, not read.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.decision_log import AuditRecord, CommitRecord

# 3: AUDIT records. 2: records framed in batches (read, and upgraded on open).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MAGIC = b"TWOPCDL\n"
_VERSION = struct.Struct("<I")


def header(version: int) -> bytes:
    return MAGIC + _VERSION.pack(version)


HEADER = header(FORMAT_VERSION)

BATCH_MAGIC = b"\xffTPC"
BATCH_HEAD = struct.Struct("<4sIIQ")  # magic, body length, CRC32, sequence number
_BATCH_CHECKED = struct.Struct("<IQ")  # the head's fields under the CRC: length, sequence

# A record larger than this is taken for a garbage length field: no COMMIT comes near it.
MAX_PAYLOAD = 1 << 20

_RECORD_HEAD = struct.Struct("<IIB")
_STRING_LENGTH = struct.Struct("<H")
_MAX_STRING = 0xFFFF


class RecordType(enum.IntEnum):
    # 0 is never a type, so that a run of zero bytes (unwritten blocks) never reads as a record.
    COMMIT = 1
    END = 2
    AUDIT = 3  # format version 3 on

    @property
    def since(self) -> int:
        """The first format version that holds this type."""
        return 3 if self is RecordType.AUDIT else 2


_AUDIT_FIELDS = 6


class FormatError(Exception):
    """Content whose checksum holds but which no writer of ours writes: corruption."""


def encode_commit(record: CommitRecord) -> bytes:
    return _encode(RecordType.COMMIT, (record.txid, *record.participants))


def encode_end(txid: str) -> bytes:
    return _encode(RecordType.END, (txid,))


def encode_audit(record: AuditRecord) -> bytes:
    if record.at_ms < 0:
        raise ValueError(f"an audit record's time cannot be negative ({record.at_ms})")
    return _encode(
        RecordType.AUDIT,
        (
            str(record.at_ms),
            record.identity,
            record.action,
            record.txid,
            record.outcome,
            record.reason,
        ),
    )


def decode_audit(strings: list[str]) -> AuditRecord:
    """The AuditRecord of an AUDIT record's strings (checked by ``scan``)."""
    at_ms, identity, action, txid, outcome, reason = strings
    return AuditRecord(int(at_ms), identity, action, txid, outcome, reason)


def frame_batch(sequence: int, records: Iterable[bytes]) -> bytes:
    """One batch holding ``records`` (encoded), to be written with one ``os.write``."""
    body = b"".join(records)
    crc = zlib.crc32(body, zlib.crc32(_BATCH_CHECKED.pack(len(body), sequence)))
    return BATCH_HEAD.pack(BATCH_MAGIC, len(body), crc, sequence) + body


def record_types(body: bytes) -> list[int]:
    """The type bytes of the records in a batch body, unchecked: for measuring, not for recovery."""
    kinds = []
    at = 0
    while at + _RECORD_HEAD.size <= len(body):
        length, _crc, kind = _RECORD_HEAD.unpack_from(body, at)
        kinds.append(kind)
        at += _RECORD_HEAD.size + length
    return kinds


def _encode(kind: RecordType, strings: tuple[str, ...]) -> bytes:
    parts = []
    for text in strings:
        raw = text.encode()
        if len(raw) > _MAX_STRING:
            raise ValueError(f"{text[:40]!r}... is {len(raw)} bytes; the log takes {_MAX_STRING}")
        parts.append(_STRING_LENGTH.pack(len(raw)))
        parts.append(raw)
    payload = b"".join(parts)
    crc = zlib.crc32(payload, zlib.crc32(bytes((kind,))))
    return _RECORD_HEAD.pack(len(payload), crc, kind) + payload


def _decode_strings(payload: bytes) -> list[str]:
    strings = []
    at = 0
    while at < len(payload):
        if at + _STRING_LENGTH.size > len(payload):
            raise FormatError("payload ends inside a string length")
        (size,) = _STRING_LENGTH.unpack_from(payload, at)
        at += _STRING_LENGTH.size
        if at + size > len(payload):
            raise FormatError("a string runs past the end of the payload")
        try:
            strings.append(payload[at : at + size].decode())
        except UnicodeDecodeError as err:
            raise FormatError(f"a string is not UTF-8: {err}") from err
        at += size
    return strings


@dataclass
class Scan:
    """What a scan found: records in log order and where the good part of the file ends.

    Attributes:
        records: (type, strings) of every record in the good batches, in log order.
        good_end: offset just past the last good batch.
        sequence: sequence number of the last good batch, 0 if there is none.
        bad_offset: offset of the first bad batch, or None if the file ends cleanly.
        resumes_at: offset of a good batch with a higher sequence number found after
            ``bad_offset`` (damage to an earlier batch, not a torn last write), or None.
    """

    records: list[tuple[RecordType, list[str]]] = field(default_factory=list)
    good_end: int = len(HEADER)
    sequence: int = 0
    bad_offset: int | None = None
    resumes_at: int | None = None


def _batch_at(data: bytes, at: int) -> tuple[int, int] | None:
    """(sequence number, end offset) of a batch at ``at`` that fits and whose CRC holds."""
    if at + BATCH_HEAD.size > len(data):
        return None
    magic, length, crc, sequence = BATCH_HEAD.unpack_from(data, at)
    end = at + BATCH_HEAD.size + length
    if magic != BATCH_MAGIC or end > len(data):
        return None
    body = memoryview(data)[at + BATCH_HEAD.size : end]
    if zlib.crc32(body, zlib.crc32(_BATCH_CHECKED.pack(length, sequence))) != crc:
        return None
    return sequence, end


def _later_batch(data: bytes, start: int, after_sequence: int) -> int | None:
    """Offset of the first good batch at or past ``start`` numbered above ``after_sequence``."""
    at = data.find(BATCH_MAGIC, start)
    while at != -1:
        found = _batch_at(data, at)
        if found is not None and found[0] > after_sequence:
            return at
        at = data.find(BATCH_MAGIC, at + 1)
    return None


def _record_at(data: bytes, at: int, limit: int) -> tuple[int, int] | None:
    """(type byte, end offset) of a record at ``at`` that ends by ``limit`` and whose CRC holds."""
    if at + _RECORD_HEAD.size > limit:
        return None
    length, crc, kind = _RECORD_HEAD.unpack_from(data, at)
    end = at + _RECORD_HEAD.size + length
    if length > MAX_PAYLOAD or end > limit:
        return None
    checked = memoryview(data)[at + _RECORD_HEAD.size - 1 : end]
    if zlib.crc32(checked) != crc:
        return None
    return kind, end


def header_version(data: bytes) -> int:
    """The format version in a header (``check_header`` has passed)."""
    (version,) = _VERSION.unpack_from(data, len(MAGIC))
    return int(version)


def check_header(data: bytes) -> str:
    """Why ``data`` does not start with a header of ours, or "" if it does."""
    if len(data) < len(HEADER) or not data.startswith(MAGIC):
        return f"it does not start with the decision-log magic {MAGIC!r}"
    version = header_version(data)
    if version < min(READABLE_VERSIONS):
        return (
            f"its format version is {version}, an older format that this twopc (version "
            f"{FORMAT_VERSION}) neither reads nor converts"
        )
    if version > FORMAT_VERSION:
        return (
            f"its format version is {version}; this twopc reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return ""


def scan(data: bytes, version: int = FORMAT_VERSION) -> Scan:
    """Reads every batch after the header (which the caller has checked; ``version`` is its
    format version: a record type it does not hold is corruption).

    Stops at the first batch whose head, length or CRC is bad, and looks past it for a good
    batch with a higher sequence number: ``resumes_at`` tells a torn last write (None) from
    damage to an earlier batch.

    Raises:
        FormatError: a batch whose CRC holds is out of sequence, or holds a record that is
            damaged or not ours (its message names the offset).
    """
    result = Scan()
    at = len(HEADER)
    while at < len(data):
        found = _batch_at(data, at)
        if found is None:
            result.bad_offset = at
            result.resumes_at = _later_batch(data, at + 1, result.sequence)
            return result
        sequence, end = found
        # The first batch may carry any number: a compacted file carries on from the old one.
        expected = result.sequence + 1 if result.sequence else None
        if sequence != expected and not (expected is None and sequence > 0):
            wanted = f"{expected}" if expected is not None else "a number above 0"
            raise FormatError(
                f"the batch at byte {at} has sequence number {sequence} where {wanted} was "
                "due: batches are out of order"
            )
        _decode_body(data, at, end, result.records, version)
        result.sequence = sequence
        at = result.good_end = end
    return result


def _decode_body(
    data: bytes, batch_at: int, end: int, into: list[tuple[RecordType, list[str]]], version: int
) -> None:
    at = batch_at + BATCH_HEAD.size
    while at < end:
        found = _record_at(data, at, end)
        if found is None:
            raise FormatError(
                f"the record at byte {at} is damaged (bad length or checksum) although the "
                f"checksum of its batch at byte {batch_at} holds"
            )
        kind, record_end = found
        into.append(_decode(data, at, kind, record_end, version))
        at = record_end


def _decode(
    data: bytes, at: int, kind: int, end: int, version: int
) -> tuple[RecordType, list[str]]:
    try:
        record_type = RecordType(kind)
    except ValueError:
        raise FormatError(f"unknown record type {kind} at byte {at}") from None
    if record_type.since > version:
        raise FormatError(
            f"{record_type.name} record at byte {at} in a log of format version {version}, "
            f"which has no such records (they came with version {record_type.since})"
        )
    try:
        strings = _decode_strings(data[at + _RECORD_HEAD.size : end])
    except FormatError as err:
        raise FormatError(f"{record_type.name} record at byte {at}: {err}") from None
    if record_type is RecordType.AUDIT:
        wanted_ok = len(strings) == _AUDIT_FIELDS and strings[0].isascii() and strings[0].isdigit()
    elif record_type is RecordType.COMMIT:
        wanted_ok = len(strings) >= 1
    else:
        wanted_ok = len(strings) == 1
    if not wanted_ok:
        raise FormatError(f"{record_type.name} record at byte {at} holds {len(strings)} strings")
    return record_type, strings
