"""The small shared modules: txids and XIDs, typed values, settings, the server version check, the
driver error translation, failpoint parsing, and the error <-> gRPC status mapping.

All pure: no server, no network, no sleeping (no failpoint that crashes, pauses or sleeps fires).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import errno
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pymysql
import pytest

from coordinator.decision_log import DecisionLogFull
from coordinator.engine.states import IllegalTransition
from participants.xa import ConnectionLost, DbError, durable_xa_problem, translate
from twopc import errors
from twopc.api import twopc_pb2 as pb
from twopc.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatementFailed,
    TransactionAborted,
    TransactionConflict,
    TwopcError,
    Unavailable,
    error_for_code,
)
from twopc.failpoints import ENV_VAR, Failpoints
from twopc.settings import load_settings
from twopc.status import (
    ERROR_CLASS_KEY,
    MYSQL_ERRNO_KEY,
    TXID_KEY,
    error_from_rpc,
    status_code,
    trailing_metadata,
)
from twopc.txid import (
    FORMAT_ID,
    MAX_XID_PART,
    Xid,
    check_coordinator_id,
    check_participant_name,
    check_request_id,
    check_txid_prefix,
    is_txid,
    new_txid,
    parse_txid,
    shown,
    txid_for_request,
    txid_prefix,
)
from twopc.values import (
    MAX_VALUE_BYTES,
    SqlValue,
    check_values,
    from_value,
    from_values,
    to_value,
    to_values,
)

LONGEST_COORDINATOR = "c" + "-" * 18 + "9"  # 20 characters
LONGEST_REQUEST = "R" * 20 + "_" * 10 + "-" * 10  # 40 characters
LONGEST_PARTICIPANT = "p" + "_" * 30 + "9"  # 32 characters

# --------------------------------------------------------------------------------------------------
# txids and XIDs
# --------------------------------------------------------------------------------------------------


def test_new_txid_round_trip() -> None:
    now_ms = 0x0123456789AB
    txid = new_txid("c1", now_ms)
    parsed = parse_txid(txid)
    assert parsed.coordinator_id == "c1"
    assert len(parsed.suffix) == 32
    assert parsed.suffix.startswith("0123456789ab")
    assert txid.startswith(txid_prefix("c1"))
    assert new_txid("c1", now_ms) != txid  # random tail


def test_new_txid_keeps_48_bits_of_time() -> None:
    parsed = parse_txid(new_txid("c1", 2**48 + 5))
    assert parsed.suffix.startswith("000000000005")


def test_request_txid_round_trip() -> None:
    txid = txid_for_request("c1", "order-42_b")
    assert txid == "c1.r-order-42_b"
    parsed = parse_txid(txid)
    assert (parsed.coordinator_id, parsed.suffix) == ("c1", "r-order-42_b")


def test_longest_names_fit_in_an_xid() -> None:
    assert check_coordinator_id(LONGEST_COORDINATOR) == LONGEST_COORDINATOR
    assert check_request_id(LONGEST_REQUEST) == LONGEST_REQUEST
    assert check_participant_name(LONGEST_PARTICIPANT) == LONGEST_PARTICIPANT
    for txid in (
        txid_for_request(LONGEST_COORDINATOR, LONGEST_REQUEST),
        new_txid(LONGEST_COORDINATOR, 2**48 - 1),
    ):
        assert parse_txid(txid).coordinator_id == LONGEST_COORDINATOR
        xid = Xid(txid, LONGEST_PARTICIPANT)
        assert len(xid.gtrid) <= MAX_XID_PART
        assert len(xid.bqual) <= MAX_XID_PART


@pytest.mark.parametrize("coordinator_id", ["", "-c1", "C1", "c_1", "c.1", "c1 ", "é", "c" * 21])
def test_coordinator_id_rejections(coordinator_id: str) -> None:
    with pytest.raises(InvalidArgument, match="coordinator id"):
        check_coordinator_id(coordinator_id)


@pytest.mark.parametrize("request_id", ["", "a b", "a.b", "a/b", "é", "r" * 41])
def test_request_id_rejections(request_id: str) -> None:
    with pytest.raises(InvalidArgument, match="request id"):
        check_request_id(request_id)
    with pytest.raises(InvalidArgument):
        txid_for_request("c1", request_id)


@pytest.mark.parametrize("name", ["", "_eu", "-eu", "EU", "eu.west", "eu west", "p" * 33])
def test_participant_name_rejections(name: str) -> None:
    with pytest.raises(InvalidArgument, match="participant name"):
        check_participant_name(name)


@pytest.mark.parametrize(
    "txid",
    [
        "",
        "c1",
        "c1.",
        ".0123456789abcdef0123456789abcdef",
        "C1.0123456789abcdef0123456789abcdef",
        "c1.0123456789ABCDEF0123456789ABCDEF",
        "c1.0123456789abcdef0123456789abcde",
        "c1.0123456789abcdef0123456789abcdef0",
        "c1.r-",
        "c1.r-" + "a" * 41,
        "c1.r-a.b",
        "c1.x-abc",
        "c" * 21 + ".r-a",
    ],
)
def test_parse_txid_rejections(txid: str) -> None:
    with pytest.raises(InvalidArgument, match="not a twopc transaction id"):
        parse_txid(txid)
    assert not is_txid(txid)


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("c1.r-a", 63, "'c1.r-a'"),
        ("it's", 10, '"it\'s"'),
        ("", 10, "''"),
        ("a" * 11, 10, "a value of 11 characters (at most 10)"),
        ("c1.\nx", 63, "a value whose character 4 is U+000A"),
        ("c1.\x00", 63, "a value whose character 4 is U+0000"),
        ("c1.é", 63, "a value whose character 4 is U+00E9"),
        ("c1.\x7f", 63, "a value whose character 4 is U+007F"),
    ],
)
def test_hostile_ids_are_described_not_echoed(text: str, limit: int, expected: str) -> None:
    assert shown(text, limit) == expected


@pytest.mark.parametrize(
    ("check", "text"),
    [
        (parse_txid, "c1.\n" + "0" * 32),
        (check_request_id, "a\nb"),
        (check_request_id, "x" * 1_000_000),
        (check_participant_name, "eu\x00"),
        (check_coordinator_id, "c\u2028"),
        (check_txid_prefix, "c1.\n"),
        (check_txid_prefix, "c" * 100),
    ],
)
def test_id_checks_never_echo_what_they_refuse(check: Any, text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check(text)
    assert text not in caught.value.message
    assert len(caught.value.message) < 200


def test_txid_prefixes() -> None:
    for prefix in ("", "c1.", "c1.r-", txid_for_request("c1", "a")):
        assert check_txid_prefix(prefix) == prefix
    assert is_txid(txid_for_request("c1", "a"))
    assert is_txid(new_txid("c1", 1))


@pytest.mark.parametrize("txid", ["c1.\nabc", "c1.r-" + "a" * 100_000, "c1.r-é", "x"])
def test_only_a_txid_of_a_txids_form_goes_into_the_metadata(txid: str) -> None:
    metadata = dict(trailing_metadata(InvalidArgument("refused", txid=txid)))
    assert TXID_KEY not in metadata
    assert metadata[ERROR_CLASS_KEY] == "InvalidArgument"


def test_xid_sql_is_hex() -> None:
    xid = Xid("c1.r-a", "eu")
    assert xid.sql() == "X'63312e722d61',X'6575',1953522481"
    assert int.from_bytes(b"tpc1", "big") == FORMAT_ID


def test_xid_from_recover_row_round_trip() -> None:
    xid = Xid(txid_for_request("c1", "a"), "eu")
    row = (FORMAT_ID, len(xid.gtrid), xid.gtrid + xid.bqual)
    assert Xid.from_recover_row(*row) == xid


@pytest.mark.parametrize(
    ("format_id", "gtrid_length", "data"),
    [
        (1, 6, b"c1.r-aeu"),  # another application's XA branch on the same server
        (0, 6, b"c1.r-aeu"),
        (FORMAT_ID, 6, b"c1.r-\xffeu"),  # not ASCII: not ours
        (FORMAT_ID, 6, b"c1.r-a\xfe"),
    ],
)
def test_xid_from_recover_row_rejects_foreign_branches(
    format_id: int, gtrid_length: int, data: bytes
) -> None:
    assert Xid.from_recover_row(format_id, gtrid_length, data) is None


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

ROUND_TRIPS: list[tuple[SqlValue, str]] = [
    (None, "null_value"),
    (True, "bool_value"),
    (False, "bool_value"),
    (0, "int_value"),
    (-1, "int_value"),
    (2**63 - 1, "int_value"),
    (-(2**63), "int_value"),
    (2**63, "uint_value"),
    (2**64 - 1, "uint_value"),
    (1.5, "double_value"),
    (-0.0, "double_value"),
    ("", "text_value"),
    ("naïve 🙂", "text_value"),
    (b"", "bytes_value"),
    (b"\x00\xff\x80", "bytes_value"),
    (decimal.Decimal("12345678901234567890.123456789012345678"), "decimal_value"),
    (decimal.Decimal("1.10"), "decimal_value"),
    (decimal.Decimal("-0.00"), "decimal_value"),
    (decimal.Decimal("1E+2"), "decimal_value"),
    (decimal.Decimal("1E-30"), "decimal_value"),
    (dt.datetime(2024, 2, 29, 23, 59, 59, 123456), "datetime_value"),
    (dt.datetime(2024, 2, 29, 23, 59, 59, 1), "datetime_value"),
    (dt.datetime(1970, 1, 1), "datetime_value"),
    (dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), "datetime_value"),
    (dt.date(2024, 2, 29), "date_value"),
    (dt.date(1, 1, 1), "date_value"),
    (dt.timedelta(0), "time_value"),
    (dt.timedelta(hours=1, minutes=2, seconds=3), "time_value"),
    (-dt.timedelta(hours=25, minutes=1, seconds=2, microseconds=3), "time_value"),
    (-dt.timedelta(hours=838, minutes=59, seconds=59), "time_value"),  # MySQL TIME bounds
    (dt.timedelta(hours=838, minutes=59, seconds=59, microseconds=999999), "time_value"),
    (dt.timedelta(microseconds=-1), "time_value"),
    (dt.timedelta(days=3, microseconds=500000), "time_value"),
]


@pytest.mark.parametrize(("value", "kind"), ROUND_TRIPS, ids=repr)
def test_value_round_trip(value: SqlValue, kind: str) -> None:
    wire = to_value(value)
    assert wire.WhichOneof("kind") == kind
    back = from_value(pb.Value.FromString(wire.SerializeToString()))
    assert type(back) is type(value)
    assert back == value
    if isinstance(value, decimal.Decimal):
        assert str(back) == str(value)  # exact: same digits, same exponent


def test_negative_time_over_a_day_is_written_as_mysql_writes_it() -> None:
    wire = to_value(-dt.timedelta(hours=25, minutes=1, seconds=2, microseconds=3))
    assert wire.time_value == "-25:01:02.000003"


def test_bytes_like_values_arrive_as_bytes() -> None:
    assert from_value(to_value(bytearray(b"ab"))) == b"ab"
    assert from_value(to_value(memoryview(b"cd"))) == b"cd"


def test_values_lists_and_the_empty_value() -> None:
    values: list[SqlValue] = [1, "a", None, decimal.Decimal("2.50")]
    assert from_values(to_values(values)) == values
    assert from_value(pb.Value()) is None


@pytest.mark.parametrize(
    "value",
    [
        2**64,
        -(2**63) - 1,
        decimal.Decimal("NaN"),
        decimal.Decimal("sNaN"),
        decimal.Decimal("Infinity"),
        decimal.Decimal("-Infinity"),
        decimal.Decimal("1e500000000"),  # written out in fixed point, half a gigabyte
        decimal.Decimal("1e65"),  # 66 digits before the point
        decimal.Decimal("1e-39"),  # 39 after it
        decimal.Decimal("0e-39"),
        float("nan"),
        float("inf"),
        float("-inf"),
        dt.timedelta(hours=839),  # beyond MySQL's TIME
        -dt.timedelta(hours=839),
        object(),
        dt.time(1, 2, 3),
        [1, 2],
        {"a": 1},
        1 + 2j,
    ],
    ids=repr,
)
def test_value_rejections(value: object) -> None:
    with pytest.raises(InvalidArgument):
        to_value(value)


@pytest.mark.parametrize(
    "value",
    [
        decimal.Decimal("9" * 65),
        decimal.Decimal("-" + "9" * 27 + "." + "9" * 38),
        decimal.Decimal("1e64"),
        decimal.Decimal("1e-38"),
        decimal.Decimal("0e-38"),
        decimal.Decimal("1.5e-10"),
    ],
    ids=str,
)
def test_decimals_within_mysqls_widest_decimal_pass(value: decimal.Decimal) -> None:
    assert from_value(to_value(value)) == value


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (pb.Value(decimal_value="1e500000000"), "500000001 digits before the point"),
        (pb.Value(decimal_value="1" * 66), "at most 65 digits in all"),
        (pb.Value(decimal_value="1e-39"), "38 after the point"),
        (pb.Value(decimal_value="1" * 101), "101 characters, more than 100"),
        (pb.Value(decimal_value="NaN"), "not a finite number"),
        (pb.Value(decimal_value="-sNaN"), "not a finite number"),
        (pb.Value(decimal_value="Infinity"), "not a finite number"),
        (pb.Value(double_value=float("nan")), "not a finite number"),
        (pb.Value(double_value=float("-inf")), "not a finite number"),
        (pb.Value(time_value="839:00:00"), "outside MySQL's range"),
        (pb.Value(time_value="99999999999999:00:00"), "malformed time_value"),
        (pb.Value(time_value="12:60:00"), "malformed time_value"),
        (pb.Value(time_value="12:00:60"), "malformed time_value"),
        (pb.Value(datetime_value="2024-01-01 00:00:00" + " " * 30), "more than 40"),
        (pb.Value(date_value="2024-01-01" + "0" * 40), "more than 40"),
        (pb.Value(text_value="x" * (MAX_VALUE_BYTES + 1)), "more than the 16777216"),
        (pb.Value(bytes_value=b"x" * (MAX_VALUE_BYTES + 1)), "more than the 16777216"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_wire_values_mysql_cannot_hold_are_refused(wire: pb.Value, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        from_value(wire)


def test_a_refused_parameter_is_named_by_its_position() -> None:
    values = [pb.Value(int_value=1), pb.Value(double_value=float("nan"))]
    with pytest.raises(InvalidArgument, match=r"^parameter 2: double nan is not a finite"):
        from_values(values)
    with pytest.raises(InvalidArgument, match=r"^parameter 2: "):
        check_values(values)
    check_values([pb.Value(decimal_value="12.50"), pb.Value(time_value="-838:59:59.999999")])


@pytest.mark.parametrize(
    "wire",
    [
        pb.Value(decimal_value="twelve"),
        pb.Value(datetime_value="2024-13-01 00:00:00"),
        pb.Value(date_value="yesterday"),
        pb.Value(time_value="1:2"),
        pb.Value(time_value="01:02:03.1234567"),
    ],
    ids=str,
)
def test_malformed_wire_values_are_rejected(wire: pb.Value) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        from_value(wire)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------

PREFIX = "TWOPC_TEST_"


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str = "c1"
    port: int = 7000
    ratio: float = 0.5
    verbose: bool = False
    data_dir: Path = Path("/var/lib/twopc")
    peers: tuple[str, ...] = ()
    participants: dict[str, str] = dataclasses.field(default_factory=dict)
    limit: int | None = None


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_settings_defaults_without_file_or_environment() -> None:
    assert load_settings(Sample, None, {}, PREFIX) == Sample()


def test_settings_from_file_then_environment(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
name = "c7"
port = 7100
ratio = 2
verbose = true
data_dir = "/data"
peers = ["a", "b"]
limit = 3

[participants]
eu = "10.0.0.1:7001"
us = "10.0.0.2:7001"
""",
    )
    environ = {
        f"{PREFIX}PORT": "7200",
        f"{PREFIX}PEERS": " x, y ,,",
        f"{PREFIX}PARTICIPANTS": "ap=10.0.0.3:7001, eu = 10.0.0.9:7001",
        "TWOPC_TEST_UNRELATED_VARIABLE": "ignored",
        "PORT": "1",  # no prefix: not ours
    }
    settings = load_settings(Sample, path, environ, PREFIX)
    assert settings == Sample(
        name="c7",
        port=7200,
        ratio=2.0,
        verbose=True,
        data_dir=Path("/data"),
        peers=("x", "y"),
        participants={"ap": "10.0.0.3:7001", "eu": "10.0.0.9:7001"},
        limit=3,
    )
    assert isinstance(settings.ratio, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("Off", False)],
)
def test_settings_bool_from_environment(text: str, expected: bool) -> None:
    settings = load_settings(Sample, None, {f"{PREFIX}VERBOSE": text}, PREFIX)
    assert settings.verbose is expected


def test_settings_optional_from_environment() -> None:
    assert load_settings(Sample, None, {f"{PREFIX}LIMIT": ""}, PREFIX).limit is None
    assert load_settings(Sample, None, {f"{PREFIX}LIMIT": "5"}, PREFIX).limit == 5


def test_settings_unknown_key_names_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'name = "c1"\nporrt = 7000\n')
    with pytest.raises(InvalidArgument, match="porrt") as caught:
        load_settings(Sample, path, {}, PREFIX)
    assert str(path) in caught.value.message


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('port = "seven"', "port"),
        ("port = true", "port"),
        ('verbose = "yes"', "verbose"),
        ("name = 5", "name"),
        ('peers = "a,b"', "peers"),
        ("participants = [1]", "participants"),
        ("ratio = [1]", "ratio"),
    ],
)
def test_settings_wrong_type_in_file(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(InvalidArgument, match=key):
        load_settings(Sample, write_toml(tmp_path, toml), {}, PREFIX)


@pytest.mark.parametrize(
    ("variable", "text"),
    [("PORT", "seven"), ("VERBOSE", "maybe"), ("PARTICIPANTS", "eu"), ("RATIO", "")],
)
def test_settings_wrong_value_in_environment_names_the_variable(variable: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match=f"{PREFIX}{variable}"):
        load_settings(Sample, None, {f"{PREFIX}{variable}": text}, PREFIX)


def test_settings_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_settings(Sample, tmp_path / "missing.toml", {}, PREFIX)
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_settings(Sample, write_toml(tmp_path, "port = = 1"), {}, PREFIX)


# --------------------------------------------------------------------------------------------------
# Server versions whose XA PREPARE is durable
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "refused"),
    [
        ("10.4.32-MariaDB", True),
        ("10.4.99-MariaDB-log", True),
        ("10.5.0-MariaDB", False),
        ("10.5.23-MariaDB-log", False),
        ("10.11.6-MariaDB-1:10.11.6+maria~ubu2204", False),
        ("11.4.2-MariaDB", False),
        ("5.7.6", True),
        ("5.7.6-log", True),
        ("5.6.51", True),
        ("5.7.7", False),
        ("5.7.44-log", False),
        ("8.0.36", False),
        ("8.0.36-0ubuntu0.22.04.1", False),
    ],
)
def test_durable_xa_problem(version: str, refused: bool) -> None:
    problem = durable_xa_problem(version)
    if refused:
        assert problem is not None
        assert version in problem
        assert ("MariaDB 10.5" if "MariaDB" in version else "MySQL 5.7.7") in problem
    else:
        assert problem is None


def test_durable_xa_problem_with_an_unreadable_version() -> None:
    assert durable_xa_problem("unknown") == "cannot read the server version 'unknown'"


# --------------------------------------------------------------------------------------------------
# Driver errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "lost", "number"),
    [
        (pymysql.err.OperationalError(2013, "Lost connection to server during query"), True, 2013),
        (pymysql.err.OperationalError(2006, "MySQL server has gone away"), True, 2006),
        (pymysql.err.OperationalError(2003, "Can't connect to MySQL server"), True, 2003),
        (pymysql.err.InterfaceError(0, ""), True, 0),
        (pymysql.err.IntegrityError(1062, "Duplicate entry '1' for key 'PRIMARY'"), False, 1062),
        (pymysql.err.OperationalError(1213, "Deadlock found"), False, 1213),
        (pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"), False, 1205),
        (pymysql.err.OperationalError(1397, "XAER_NOTA: Unknown XID"), False, 1397),
    ],
    ids=repr,
)
def test_translate(error: Exception, lost: bool, number: int) -> None:
    translated = translate(error)
    assert isinstance(translated, ConnectionLost) is lost
    assert translated.errno == number
    assert translated.message
    if len(error.args) > 1 and error.args[1]:
        assert translated.message == error.args[1]


# --------------------------------------------------------------------------------------------------
# Failpoints (parsing only: nothing here crashes, pauses or sleeps)
# --------------------------------------------------------------------------------------------------


def test_unarmed_failpoints_are_no_ops() -> None:
    # The grammar, the names, the counters and every action: tests/unit/test_failpoints.py.
    Failpoints().hit("coordinator.after_begin")
    Failpoints({"coordinator.after_begin": "crash"}).hit("coordinator.mid_commit")
    Failpoints({"coordinator.after_begin": "sleep(0)"}).hit("coordinator.after_begin")
    assert not any(s.spec for s in Failpoints.from_env({ENV_VAR: "  "}).snapshot())


# --------------------------------------------------------------------------------------------------
# Errors <-> gRPC statuses
# --------------------------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """What a failed call raises on the client side (grpc.Call / AioRpcError alike)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str | None,
        metadata: Sequence[tuple[str, str | bytes]] | None = (),
    ) -> None:
        super().__init__(f"<RpcError of status {code.name}>")  # str() of a real one is never empty
        self._code = code
        self._details = details
        self._metadata = metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> Any:  # grpc-stubs: a tuple of (key, value) named tuples
        return self._metadata


def over_the_wire(error: TwopcError) -> FakeRpcError:
    return FakeRpcError(status_code(error), error.message, trailing_metadata(error))


SERVER_ERRORS: list[type[TwopcError]] = [
    TwopcError,
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    TransactionAborted,
    StatementFailed,
    TransactionConflict,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    Internal,
]


@pytest.mark.parametrize("cls", SERVER_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("txid", "mysql_errno"), [("c1.r-x", 1213), ("", 0)])
def test_status_round_trip(cls: type[TwopcError], txid: str, mysql_errno: int) -> None:
    error = cls("something went wrong", txid=txid, mysql_errno=mysql_errno)
    assert status_code(error) is grpc.StatusCode[cls.code]
    back = error_from_rpc(over_the_wire(error))
    assert type(back) is cls
    assert (back.message, back.txid, back.mysql_errno) == (error.message, txid, mysql_errno)


def test_a_lost_lock_conflict_without_the_class_name_is_still_retryable() -> None:
    """An ABORTED status that names no class (a proxy dropped the metadata) with MySQL's deadlock
    or lock wait timeout error number maps back to TransactionConflict; without one, to
    TransactionAborted."""
    for number in (1213, 1205):
        assert error_for_code("ABORTED", mysql_errno=number) is TransactionConflict
    assert error_for_code("ABORTED", mysql_errno=1062, statement_failed=True) is StatementFailed
    assert error_for_code("ABORTED") is TransactionAborted
    assert issubclass(TransactionConflict, TransactionAborted)
    assert TransactionConflict.code == "ABORTED"


def test_status_metadata_as_bytes() -> None:
    metadata = [
        (ERROR_CLASS_KEY, b"StatementFailed"),
        (TXID_KEY, b"c1.r-y"),
        (MYSQL_ERRNO_KEY, b"1"),
    ]
    back = error_from_rpc(FakeRpcError(grpc.StatusCode.ABORTED, "failed", metadata))
    assert type(back) is StatementFailed
    assert (back.txid, back.mysql_errno) == ("c1.r-y", 1)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DecisionLogFull("disk full"), ResourceExhausted),
        (IllegalTransition("no"), FailedPrecondition),
    ],
    ids=repr,
)
def test_error_classes_outside_the_errors_module_arrive_as_their_public_parent(
    error: TwopcError, expected: type[TwopcError]
) -> None:
    assert type(error_from_rpc(over_the_wire(error))) is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.CANCELLED, Unavailable),
        (grpc.StatusCode.UNKNOWN, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, Internal),
        (grpc.StatusCode.ABORTED, TransactionAborted),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.DATA_LOSS, TwopcError),
    ],
)
def test_statuses_without_metadata(code: grpc.StatusCode, expected: type[TwopcError]) -> None:
    back = error_from_rpc(FakeRpcError(code, "connection reset", None))
    assert type(back) is expected
    assert (back.message, back.txid, back.mysql_errno) == ("connection reset", "", 0)


def test_garbage_metadata_is_ignored() -> None:
    metadata = [(ERROR_CLASS_KEY, "NoSuchError"), (MYSQL_ERRNO_KEY, "-5")]
    back = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, None, metadata))
    assert type(back) is Unavailable
    assert back.mysql_errno == 0
    assert back.message == "<RpcError of status UNAVAILABLE>"  # no details: str(err)


# --------------------------------------------------------------------------------------------------
# Bugs found while writing these tests (they fail until the code is fixed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in (getattr(errors, n) for n in errors.__all__)
        if isinstance(c, type) and issubclass(c, TwopcError)
    ],
    ids=lambda c: c.__name__,
)
def test_error_from_rpc_gives_a_twopc_error_for_every_class_name(cls: type[TwopcError]) -> None:
    """Whatever class name the metadata carries, the SDK raises a TwopcError, never a TypeError."""
    rpc_error = FakeRpcError(grpc.StatusCode[cls.code], "oops", [(ERROR_CLASS_KEY, cls.__name__)])
    back = error_from_rpc(rpc_error)
    assert isinstance(back, TwopcError)
    assert back.message == "oops"


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    ],
    ids=repr,
)
def test_translate_treats_every_socket_error_as_a_lost_connection(error: OSError) -> None:
    """``Session.execute`` translates ``OSError`` too: an OS errno is not a MySQL error number."""
    translated = translate(error)
    assert isinstance(translated, DbError)
    assert isinstance(translated, ConnectionLost), f"{translated!r} is not a ConnectionLost"


def test_settings_refuse_a_fractional_number_for_an_integer(tmp_path: Path) -> None:
    """A value of the wrong type is an error (module docstring); 7000.9 is not silently 7000."""
    with pytest.raises(InvalidArgument, match="port"):
        load_settings(Sample, write_toml(tmp_path, "port = 7000.9"), {}, PREFIX)
