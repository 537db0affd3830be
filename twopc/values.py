"""Conversion between Python values and the wire's typed ``Value``, in both directions.

Used by the SDK (parameters out, rows in) and by the agent (parameters in, rows out), so that a
value crosses twopc unchanged: ints stay ints, Decimals stay exact, bytes stay bytes.

Only values that MySQL/MariaDB can hold pass, both ways; anything else is ``InvalidArgument``
before any work is done with it (the agent decodes every parameter before its branch is touched,
and the coordinator checks them before it relays a request):

- a double must be finite (MySQL has no NaN or infinity);
- a decimal must be finite, written in at most ``MAX_DECIMAL_TEXT`` characters, with at most
  ``MAX_DECIMAL_DIGITS`` digits in all and ``MAX_DECIMAL_SCALE`` after the point when written
  out in fixed point (MariaDB's widest DECIMAL(65,38)). The bound matters: a parameter is sent to
  the server written out in fixed point, so ``1e500000000`` would be half a gigabyte of zeros;
- a TIME lies within MySQL's range, -838:59:59.999999 to 838:59:59.999999;
- a date or datetime is at most ``MAX_TEMPORAL_TEXT`` characters before it is parsed;
- a string or bytes value is at most ``MAX_VALUE_BYTES`` long (MariaDB's default
  ``max_allowed_packet``: no statement carrying a larger one reaches a default server).
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from twopc.api import twopc_pb2 as pb
from twopc.errors import InvalidArgument

SqlValue: TypeAlias = (
    bool | int | float | str | bytes | decimal.Decimal | dt.datetime | dt.date | dt.timedelta | None
)

MAX_DECIMAL_DIGITS = 65
MAX_DECIMAL_SCALE = 38
MAX_DECIMAL_TEXT = 100
MAX_TEMPORAL_TEXT = 40
MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_TIME = dt.timedelta(hours=838, minutes=59, seconds=59, microseconds=999_999)

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
_TIME = re.compile(r"(-?)(\d{1,3}):([0-5]\d):([0-5]\d)(?:\.(\d{1,6}))?")


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
        return pb.Value(double_value=_check_double(value))
    if isinstance(value, str):
        return pb.Value(text_value=value)
    if isinstance(value, bytes | bytearray | memoryview):
        return pb.Value(bytes_value=bytes(value))
    if isinstance(value, decimal.Decimal):
        return pb.Value(decimal_value=str(_check_decimal(value)))
    if isinstance(value, dt.datetime):
        return pb.Value(datetime_value=value.isoformat(sep=" "))
    if isinstance(value, dt.date):
        return pb.Value(date_value=value.isoformat())
    if isinstance(value, dt.timedelta):
        return pb.Value(time_value=_format_time(_check_time(value)))
    raise InvalidArgument(f"cannot send a value of type {type(value).__name__} as a SQL parameter")


def from_value(value: pb.Value) -> SqlValue:
    """Decodes one wire value; InvalidArgument for a malformed one, or one that MySQL cannot
    hold (see the module's docstring), before any costly work is done with it."""
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
                return _check_double(value.double_value)
            case "text_value":
                return _check_size(value.text_value, "string")
            case "bytes_value":
                return _check_size(value.bytes_value, "bytes value")
            case "bool_value":
                return value.bool_value
            case "decimal_value":
                return _check_decimal(
                    decimal.Decimal(_short(value.decimal_value, MAX_DECIMAL_TEXT))
                )
            case "datetime_value":
                return dt.datetime.fromisoformat(_short(value.datetime_value, MAX_TEMPORAL_TEXT))
            case "date_value":
                return dt.date.fromisoformat(_short(value.date_value, MAX_TEMPORAL_TEXT))
            case "time_value":
                return _check_time(_parse_time(_short(value.time_value, MAX_TEMPORAL_TEXT)))
    except (ValueError, decimal.InvalidOperation) as err:
        raise InvalidArgument(f"malformed {kind}: {err}") from err
    raise InvalidArgument(f"unknown value kind {kind}")


def to_values(values: Iterable[object]) -> list[pb.Value]:
    return [to_value(v) for v in values]


def from_values(values: Sequence[pb.Value]) -> list[SqlValue]:
    """Decodes parameters; InvalidArgument naming the first refused one (1-based)."""
    decoded = []
    for index, value in enumerate(values, 1):
        try:
            decoded.append(from_value(value))
        except InvalidArgument as err:
            raise InvalidArgument(f"parameter {index}: {err.message}") from None
    return decoded


def check_values(values: Sequence[pb.Value]) -> None:
    """What ``from_values`` refuses, refused the same way (the coordinator relays parameters
    without decoding them, and checks them with this first)."""
    from_values(values)


def _short(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters; checked before it is parsed."""
    if len(text) > limit:
        raise ValueError(f"{len(text)} characters, more than {limit}")
    return text


def _check_size(value: str | bytes, what: str) -> str | bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"{what} of {len(value)} characters, more than the {MAX_VALUE_BYTES} a parameter "
            "may have"
        )
    return value


def _check_double(value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(
            f"double {value} is not a finite number (MySQL stores no NaN or infinity)"
        )
    return value


def _check_decimal(value: decimal.Decimal) -> decimal.Decimal:
    """``value`` if MySQL/MariaDB can hold it: finite, and at most DECIMAL(65,38) in fixed point
    (which is how it is written into the statement: this bounds that text)."""
    if not value.is_finite():
        raise InvalidArgument(f"decimal {value} is not a finite number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    digits = len(value.as_tuple().digits)
    scale = max(-exponent, 0)
    whole = max(digits + exponent, 0)
    if scale > MAX_DECIMAL_SCALE or whole + scale > MAX_DECIMAL_DIGITS:
        raise InvalidArgument(
            f"decimal with {whole} digits before the point and {scale} after it: at most "
            f"{MAX_DECIMAL_DIGITS} digits in all and {MAX_DECIMAL_SCALE} after the point "
            "(MySQL's widest DECIMAL); send a double for larger or smaller magnitudes"
        )
    return value


def _check_time(value: dt.timedelta) -> dt.timedelta:
    if abs(value) > MAX_TIME:
        raise InvalidArgument(
            f"TIME value {_format_time(value)} is outside MySQL's range "
            "-838:59:59.999999 to 838:59:59.999999"
        )
    return value


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
