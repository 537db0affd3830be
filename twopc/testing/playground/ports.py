"""TCP ports on the loopback interface: free ones, and the interactive playground's fixed ones.

``twopc playground`` puts its parts on fixed ports when they are free, so that the README's
examples and ``twopc tx`` find it at ``127.0.0.1:7100`` without being told: the coordinator on
7100, the agent of the n-th region on 7201 + n, its MariaDB on 3307 + n. A port that is taken
is replaced by a free one. Tests and the other tools (demo, chaos, bench) always take free
ports: nothing may depend on a fixed port being free.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

__all__ = [
    "AGENT_PORT",
    "COORDINATOR_PORT",
    "DATABASE_PORT",
    "LOOPBACK",
    "free_port",
    "is_free",
    "port_or_free",
]

LOOPBACK = "127.0.0.1"
COORDINATOR_PORT = 7100
AGENT_PORT = 7201  # the first region's; the n-th region's is AGENT_PORT + n
DATABASE_PORT = 3307  # the same for the databases (3306 is left to a MariaDB of the system)


# Ports below this are left alone: system services and the playground's fixed ports live there.
_LOWEST_PICK = 10000
# Ports of servers a developer's machine commonly runs (RabbitMQ's, Erlang's, ...): never picked.
_SERVICE_PORTS = frozenset({15672, 25672, 27017, 11211})
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_ATTEMPTS = 200

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def _candidates() -> range:
    """The ports to pick from: below the kernel's ephemeral range, or above it.

    A port bound to port 0 comes from the ephemeral range, the same range every outgoing
    connection takes its source port from: between picking it and binding it, a client's
    connection could take it (a clean-clone CI run lost an agent that way). Outside that range
    only a server that binds it explicitly can."""
    low, high = _ephemeral_range()
    if low - _LOWEST_PICK >= 4096:
        return range(_LOWEST_PICK, low)
    if 65535 - high >= 4096:
        return range(high + 1, 65536)
    return range(0)


def _kernel_pick(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The port is drawn at random outside the kernel's ephemeral range (see ``_candidates``) and
    never twice from one process. Another process may still bind it before the caller does:
    callers that can retry on "address in use" should.
    """
    candidates = _candidates()
    if candidates:
        for _ in range(_ATTEMPTS):
            port = random.choice(candidates)
            with _handed_out_lock:
                if port in _handed_out or port in _SERVICE_PORTS:
                    continue
                if is_free(port, host, reuse_address=False):
                    _handed_out.add(port)
                    return port
    return _kernel_pick(host)


def is_free(port: int, host: str = LOOPBACK, *, reuse_address: bool = True) -> bool:
    """True when nothing listens on (or holds) ``host:port`` at this moment.

    By default the test binds as the servers do (gRPC and MariaDB set SO_REUSEADDR), so that
    connections of a stopped server still in TIME_WAIT do not make its port look taken.
    ``free_port`` asks without it: a fresh pick should be free of any connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_or_free(preferred: int | None, host: str = LOOPBACK) -> int:
    """``preferred`` when it is free right now, else a free port the kernel picks."""
    if preferred is not None and is_free(preferred, host):
        return preferred
    return free_port(host)
