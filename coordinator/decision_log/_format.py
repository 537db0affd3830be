"""The on-disk format of the decision log: encoding records and scanning a log file.

A file is a header, then records::

    header:  magic b"TWOPCDL\\n" | u32 format version
    record:  u32 payload length | u32 CRC32 of (type byte + payload) | u8 type | payload

Integers are little-endian. A payload is a sequence of UTF-8 strings, each prefixed by its u16
byte length: COMMIT holds the txid then each participant, END holds the txid. Length-prefixed
strings rather than JSON: a record is half the size, needs no escaping, encodes with one
``b"".join`` on the hot path and decodes without a parser that could accept more than we write.

Record types are never skipped: a reader that skipped a record it did not understand (a heuristic
decision, say) would drop it at the next compaction. A future record type comes with a new format
version, which an older reader refuses as a whole; an unknown type under the current version is
corruption.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

from coordinator.decision_log import CommitRecord

FORMAT_VERSION = 1
MAGIC = b"TWOPCDL\n"
HEADER = MAGIC + struct.pack("<I", FORMAT_VERSION)

# A record larger than this is taken for a garbage length field: no COMMIT comes near it.
MAX_PAYLOAD = 1 << 20

_RECORD_HEAD = struct.Struct("<IIB")
_STRING_LENGTH = struct.Struct("<H")
_MAX_STRING = 0xFFFF


class RecordType(enum.IntEnum):
    # 0 is never a type, so that a run of zero bytes (unwritten blocks) never reads as a record.
    COMMIT = 1
    END = 2


class FormatError(Exception):
    """A record whose checksum holds but whose content is not what any writer of ours writes."""


def encode_commit(record: CommitRecord) -> bytes:
    return _encode(RecordType.COMMIT, (record.txid, *record.participants))


def encode_end(txid: str) -> bytes:
    return _encode(RecordType.END, (txid,))


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
        records: (type, strings) of every good record, in log order.
        good_end: offset just past the last good record.
        bad_offset: offset of the first bad record, or None if the file ends cleanly.
        resumes_at: offset of a good record found after ``bad_offset`` (corruption in the
            middle), or None if nothing good follows it (a torn tail).
    """

    records: list[tuple[RecordType, list[str]]] = field(default_factory=list)
    good_end: int = len(HEADER)
    bad_offset: int | None = None
    resumes_at: int | None = None


def _record_at(data: bytes, at: int) -> tuple[int, int] | None:
    """(type byte, end offset) of a record at ``at`` whose length fits and whose CRC holds."""
    if at + _RECORD_HEAD.size > len(data):
        return None
    length, crc, kind = _RECORD_HEAD.unpack_from(data, at)
    end = at + _RECORD_HEAD.size + length
    if length > MAX_PAYLOAD or end > len(data):
        return None
    checked = memoryview(data)[at + _RECORD_HEAD.size - 1 : end]
    if zlib.crc32(checked) != crc:
        return None
    return kind, end


def check_header(data: bytes) -> str:
    """Why ``data`` does not start with a header of ours, or "" if it does."""
    if len(data) < len(HEADER) or not data.startswith(MAGIC):
        return f"it does not start with the decision-log magic {MAGIC!r}"
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    if version != FORMAT_VERSION:
        return f"its format version is {version}; this twopc reads version {FORMAT_VERSION}"
    return ""


def scan(data: bytes) -> Scan:
    """Reads every record after the header (which the caller has checked).

    Raises:
        FormatError: a record's checksum holds but its type or payload is not ours (its
            message names the offset).
    """
    result = Scan()
    at = len(HEADER)
    while at < len(data):
        found = _record_at(data, at)
        if found is None:
            result.bad_offset = at
            result.resumes_at = next(
                (later for later in range(at + 1, len(data)) if _record_at(data, later)), None
            )
            return result
        kind, end = found
        result.records.append(_decode(data, at, kind, end))
        at = result.good_end = end
    return result


def _decode(data: bytes, at: int, kind: int, end: int) -> tuple[RecordType, list[str]]:
    try:
        record_type = RecordType(kind)
    except ValueError:
        raise FormatError(f"unknown record type {kind} at byte {at}") from None
    try:
        strings = _decode_strings(data[at + _RECORD_HEAD.size : end])
    except FormatError as err:
        raise FormatError(f"{record_type.name} record at byte {at}: {err}") from None
    wanted_ok = len(strings) >= 1 if record_type is RecordType.COMMIT else len(strings) == 1
    if not wanted_ok:
        raise FormatError(f"{record_type.name} record at byte {at} holds {len(strings)} strings")
    return record_type, strings
