"""Bounds on the work one request may carry, checked by both daemons before any of it is done.

A request's cost grows with what it carries: each statement is lexed by the statement guard and
sent to the database, each parameter decoded and bound. Unbounded, one request of 300,000
statements or a million parameters holds an agent's event loop for seconds, and every other
transaction in its region with it. So each daemon refuses, with ``InvalidArgument`` and a
message naming the limit and its setting, a request that has more than:

- ``max_statements`` statements (a RunTransaction: all participants' together);
- ``max_params`` parameters, all statements together (65,535: MySQL's own limit on the
  placeholders of one prepared statement);
- ``max_sql_length`` characters of SQL, all statements together.

These are counted on the protobuf message, before a statement is lexed or a value decoded. The
defaults keep the worst request within about a tenth of a second of one core (measured on the
2-core development machine: the guard lexes about 20 MB of SQL per second; decoding and binding
a parameter costs 1 to 2 us). The gRPC message size (``max_request_bytes`` of each daemon) bounds
the rest: string and bytes values, and the bytes of a request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twopc.api import twopc_pb2 as pb
from twopc.errors import InvalidArgument

__all__ = ["DEFAULT_LIMITS", "RequestLimits"]


@dataclass(frozen=True)
class RequestLimits:
    max_statements: int = 1000
    max_params: int = 65_535
    max_sql_length: int = 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_statements, self.max_params, self.max_sql_length) < 1:
            raise ValueError("max_statements, max_params and max_sql_length must be at least 1")

    def check(self, statements: Iterable[pb.Statement], who: str) -> None:
        """InvalidArgument when ``statements`` (one request's) exceed a limit. ``who`` names the
        daemon whose settings these are ("this agent", "the coordinator")."""
        count = params = length = 0
        for statement in statements:
            count += 1
            params += len(statement.params)
            length += len(statement.sql)
        self._check(count, self.max_statements, "statements", "max_statements", who)
        self._check(params, self.max_params, "parameters", "max_params", who)
        self._check(length, self.max_sql_length, "characters of SQL", "max_sql_length", who)

    @staticmethod
    def _check(found: int, limit: int, what: str, setting: str, who: str) -> None:
        if found > limit:
            raise InvalidArgument(
                f"the request carries {found} {what}, more than the {limit} that {who} takes "
                f"in one request (its {setting} setting); split the work into smaller requests"
            )


DEFAULT_LIMITS = RequestLimits()
