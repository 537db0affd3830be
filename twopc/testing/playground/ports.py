"""TCP ports on the loopback interface: free ones, and the interactive playground's fixed ones.

``twopc playground`` puts its parts on fixed ports when they are free, so that the README's
examples and ``twopc tx`` find it at ``127.0.0.1:7100`` without being told: the coordinator on
7100, the agent of the n-th region on 7201 + n, its MariaDB on 3307 + n. A port that is taken
is replaced by a free one. Tests and the other tools (demo, chaos, bench) always take free
ports: nothing may depend on a fixed port being free.
"""

from __future__ import annotations

import socket

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


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks the port (bind to port 0); the socket is closed again, so another process
    may take the port before the caller binds it. Callers that can retry on "address in use"
    should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on (or holds) ``host:port`` at this moment.

    The test binds as the servers do (gRPC and MariaDB set SO_REUSEADDR), so that connections
    of a stopped server still in TIME_WAIT do not make its port look taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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
