"""Conversion between Python values and the wire's typed ``Value``, in both directions.

Used by the SDK (parameters out, rows in) and by the agent (parameters in, rows out), so that a
value crosses twopc unchanged: ints stay ints, Decimals stay exact, bytes stay bytes.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from twopc.api import twopc_pb2 as pb
from twopc.errors import InvalidArgument

SqlValue: TypeAlias = (
    bool | int | float | str | bytes | decimal.Decimal | dt.datetime | dt.date | dt.timedelta | None
)

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
_TIME = re.compile(r"(-?)(\d+):(\d{2}):(\d{2})(?:\.(\d{1,6}))?")


def to_value(value: object) -> pb.Value:
    """Encodes one Python value; InvalidArgument for a type SQL has no place for."""
    if value is None:
        return pb.Value(null_value=pb.NULL_VALUE)
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return pb.Value(int_value=value)
        if 0 <= value <= _UINT64_MAX:
            return pb.Value(uint_value=value)
        raise InvalidArgument(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return pb.Value(double_value=value)
    if isinstance(value, str):
        return pb.Value(text_value=value)
    if isinstance(value, bytes | bytearray | memoryview):
        return pb.Value(bytes_value=bytes(value))
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidArgument(f"decimal {value} is not a finite number")
        return pb.Value(decimal_value=str(value))
    if isinstance(value, dt.datetime):
        return pb.Value(datetime_value=value.isoformat(sep=" "))
    if isinstance(value, dt.date):
        return pb.Value(date_value=value.isoformat())
    if isinstance(value, dt.timedelta):
        return pb.Value(time_value=_format_time(value))
    raise InvalidArgument(f"cannot send a value of type {type(value).__name__} as a SQL parameter")


def from_value(value: pb.Value) -> SqlValue:
    """Decodes one wire value; InvalidArgument for a malformed one."""
    kind = value.WhichOneof("kind")
    try:
        match kind:
            case None | "null_value":
                return None
            case "int_value":
                return value.int_value
            case "uint_value":
                return value.uint_value
            case "double_value":
                return value.double_value
            case "text_value":
                return value.text_value
            case "bytes_value":
                return value.bytes_value
            case "bool_value":
                return value.bool_value
            case "decimal_value":
                return decimal.Decimal(value.decimal_value)
            case "datetime_value":
                return dt.datetime.fromisoformat(value.datetime_value)
            case "date_value":
                return dt.date.fromisoformat(value.date_value)
            case "time_value":
                return _parse_time(value.time_value)
    except (ValueError, decimal.InvalidOperation) as err:
        raise InvalidArgument(f"malformed {kind}: {err}") from err
    raise InvalidArgument(f"unknown value kind {kind}")


def to_values(values: Iterable[object]) -> list[pb.Value]:
    return [to_value(v) for v in values]


def from_values(values: Sequence[pb.Value]) -> list[SqlValue]:
    return [from_value(v) for v in values]


def _format_time(value: dt.timedelta) -> str:
    micros = abs(value) // dt.timedelta(microseconds=1)
    seconds, micro = divmod(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    sign = "-" if value < dt.timedelta(0) else ""
    text = f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{text}.{micro:06d}" if micro else text


def _parse_time(text: str) -> dt.timedelta:
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not [-]HH:MM:SS[.ffffff]")
    sign, hours, minutes, seconds, fraction = match.groups()
    value = dt.timedelta(
        hours=int(hours),
        minutes=int(minutes),
        seconds=int(seconds),
        microseconds=int((fraction or "0").ljust(6, "0")),
    )
    return -value if sign else value
