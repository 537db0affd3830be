"""Transaction ids and the XA XIDs that carry them on MySQL.

A txid is ``<coordinator id>.<suffix>``: the prefix tells recovery whose branches it may touch.
The suffix is ``<12 hex of ms time><20 hex random>`` for a fresh transaction, or ``r-<request id>``
when the client gave an idempotency key, so that a request retried after a coordinator restart
names the same transaction. On MySQL the XID is (FORMAT_ID, gtrid = txid, bqual = participant
name), written as hex literals: XA statements take no placeholders, and XA RECOVER hands the bytes
back for an exact match.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from twopc.errors import InvalidArgument

FORMAT_ID = 0x74706331  # "tpc1": tells our XA branches from anyone else's on a shared server
MAX_XID_PART = 64

_COORDINATOR_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_PARTICIPANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SUFFIX = re.compile(r"[0-9a-f]{32}|r-[A-Za-z0-9_-]{1,40}")
_TXID = re.compile(r"[a-z0-9][a-z0-9-]{0,19}\.(?:[0-9a-f]{32}|r-[A-Za-z0-9_-]{1,40})")
MAX_TXID = 63  # 20 characters of coordinator id, the dot, "r-" and 40 of request id
_PREFIX = re.compile(rf"[A-Za-z0-9._-]{{0,{MAX_TXID}}}")


def shown(text: str, limit: int) -> str:
    """``text`` quoted for a message when it is at most ``limit`` characters of printable ASCII;
    otherwise what is wrong with it, without echoing it: a hostile value may be a megabyte, or
    hold a newline or a NUL that must reach no log line and no gRPC header."""
    if len(text) > limit:
        return f"a value of {len(text)} characters (at most {limit})"
    for index, char in enumerate(text):
        if not " " <= char <= "~":
            return f"a value whose character {index + 1} is U+{ord(char):04X}"
    return repr(text)


def check_coordinator_id(coordinator_id: str) -> str:
    if not _COORDINATOR_ID.fullmatch(coordinator_id):
        raise InvalidArgument(
            f"coordinator id {shown(coordinator_id, 40)} must be 1-20 characters of a-z, 0-9 "
            "and '-', starting with a letter or digit"
        )
    return coordinator_id


def check_participant_name(name: str) -> str:
    if not _PARTICIPANT.fullmatch(name):
        raise InvalidArgument(
            f"participant name {shown(name, 40)} must be 1-32 characters of a-z, 0-9, '_' and "
            "'-', starting with a letter or digit"
        )
    return name


def check_request_id(request_id: str) -> str:
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(
            f"request id {shown(request_id, 60)} must be 1-40 characters of A-Z, a-z, 0-9, '_' "
            "and '-'"
        )
    return request_id


def check_txid_prefix(prefix: str) -> str:
    """A prefix of txids to list (Recover): empty, or characters that a txid may hold."""
    if not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(
            f"txid prefix {shown(prefix, 70)} must be at most {MAX_TXID} characters of a-z, A-Z, "
            "0-9, '.', '_' and '-'"
        )
    return prefix


def is_txid(text: str) -> bool:
    """Whether ``text`` has the form of a txid (cheap: for deciding what may be echoed)."""
    return _TXID.fullmatch(text) is not None


def new_txid(coordinator_id: str, now_ms: int) -> str:
    """A fresh transaction id, unique forever and roughly ordered by time."""
    return f"{coordinator_id}.{now_ms & 0xFFFFFFFFFFFF:012x}{secrets.token_hex(10)}"


def txid_for_request(coordinator_id: str, request_id: str) -> str:
    """The transaction id that a client's idempotency key names on this coordinator."""
    return f"{coordinator_id}.r-{check_request_id(request_id)}"


def txid_prefix(coordinator_id: str) -> str:
    return f"{coordinator_id}."


@dataclass(frozen=True)
class ParsedTxid:
    coordinator_id: str
    suffix: str


def parse_txid(txid: str) -> ParsedTxid:
    """Splits a txid; InvalidArgument when it is not one of ours in form."""
    coordinator_id, dot, suffix = txid.partition(".")
    if not dot or not _COORDINATOR_ID.fullmatch(coordinator_id) or not _SUFFIX.fullmatch(suffix):
        raise InvalidArgument(
            f"{shown(txid, MAX_TXID)} is not a twopc transaction id (<coordinator id>.<32 hex "
            "digits> or <coordinator id>.r-<request id>)"
        )
    return ParsedTxid(coordinator_id, suffix)


@dataclass(frozen=True)
class Xid:
    """An XA transaction identifier of one branch: gtrid = txid, bqual = participant name."""

    txid: str
    branch: str

    @property
    def gtrid(self) -> bytes:
        return self.txid.encode("ascii")

    @property
    def bqual(self) -> bytes:
        return self.branch.encode("ascii")

    def sql(self) -> str:
        """The XID as it is written in XA statements: X'gtrid',X'bqual',formatID."""
        return f"X'{self.gtrid.hex()}',X'{self.bqual.hex()}',{FORMAT_ID}"

    @classmethod
    def from_recover_row(cls, format_id: int, gtrid_length: int, data: bytes) -> Xid | None:
        """The XID of an XA RECOVER row, or None if the branch is not twopc's."""
        if format_id != FORMAT_ID:
            return None
        try:
            gtrid = data[:gtrid_length].decode("ascii")
            bqual = data[gtrid_length:].decode("ascii")
        except UnicodeDecodeError:
            return None
        return cls(gtrid, bqual)
