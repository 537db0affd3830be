"""The coordinator group's endpoints as the SDK sees them: which one a call goes to, and when it
fails over to the next. No I/O here: ``_sync`` and ``_async`` own the channels, one per endpoint.

A call not bound to an interactive transaction (RunTransaction, Begin, GetTransaction) starts at
the *current* endpoint. When it fails as the ``RetryPolicy`` retries (UNAVAILABLE,
DEADLINE_EXCEEDED), the current endpoint moves to the next one, round the list, and the retry goes
there with the very same request (the same request id): the group never applies a request id
twice. The endpoint that answers stays current (sticky) until it fails in turn. Calls of an
interactive transaction (Execute, Commit, Rollback) never move: they go to the member that began
it, whose id their txid names.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from twopc.client._common import logger
from twopc.errors import InvalidArgument, TwopcError

# gRPC target schemes whose own syntax is a comma-separated address list: one endpoint each.
_LIST_SCHEMES = ("ipv4:", "ipv6:")


def parse_endpoints(target: str | Sequence[str]) -> tuple[str, ...]:
    """The endpoints named by a client's ``target``: a list of ``host:port`` (or gRPC target
    URIs such as ``dns:///name:port``), or one string that lists them separated by commas.

    Raises:
        InvalidArgument: no endpoint, an empty one, or one given twice.
    """
    if isinstance(target, str):
        if target.startswith(_LIST_SCHEMES):
            items: Sequence[str] = [target]
        else:
            items = target.split(",")
    else:
        items = list(target)
    endpoints = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgument(f"an endpoint is a string, not a {type(item).__name__}")
        endpoint = item.strip()
        if not endpoint:
            raise InvalidArgument(f"an empty endpoint in {target!r}")
        if endpoint in endpoints:
            raise InvalidArgument(f"endpoint {endpoint!r} is given twice")
        endpoints.append(endpoint)
    if not endpoints:
        raise InvalidArgument("no endpoint given: name at least one coordinator, host:port")
    return tuple(endpoints)


def describe(endpoints: Sequence[str]) -> str:
    """How a client names its endpoints in its repr and messages: as it was given one, or a
    list."""
    return repr(endpoints[0]) if len(endpoints) == 1 else repr(list(endpoints))


class Endpoints:
    """The endpoints of a client and its current one; thread-safe.

    Indexes stand for endpoints: a call remembers the index it tried, so that two calls failing
    on the same endpoint at once move the current one a single step, not two.
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.all = tuple(endpoints)
        self._current = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.all)

    @property
    def current(self) -> int:
        """The index of the endpoint that calls not bound to a transaction go to."""
        return self._current

    def answered(self, index: int) -> None:
        """The endpoint at ``index`` answered: it becomes (or stays) the current one."""
        with self._lock:
            self._current = index

    def failed(self, index: int, method: str, error: TwopcError) -> int:
        """The endpoint at ``index`` failed ``method`` with ``error``, a transport failure: the
        current endpoint moves on to the next one unless another call moved it already.
        Returns the index to try next (the current one)."""
        with self._lock:
            if self._current != index or len(self.all) == 1:
                return self._current
            self._current = (index + 1) % len(self.all)
            moved_to = self._current
        logger.warning(
            "coordinator %s failed %s (%s: %s): failing over to %s",
            self.all[index],
            method,
            type(error).__name__,
            error.message,
            self.all[moved_to],
        )
        return moved_to
