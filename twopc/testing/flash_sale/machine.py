"""Machine-level figures of a run: TIME_WAIT sockets, and CPU per process.

- ``time_wait(ports)`` counts the TCP sockets in TIME_WAIT to or from the run's servers
  (``/proc/net/tcp`` and ``tcp6``): a client that opens a connection per transaction leaves one
  per transaction, so the count climbs with the load; pooled connections keep it flat.
- ``CpuMeter`` reads each process's user+system CPU time (``/proc/<pid>/stat``, with its
  children's threads) at the start and the end of a mode: CPU seconds over wall seconds is the
  share of one core it used. A Python process near one core (its GIL) or a server near the
  machine's cores is CPU-bound; one well below waits on I/O or on others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path

__all__ = ["CpuMeter", "bound", "time_wait"]

_TIME_WAIT = "06"
_TICKS = os.sysconf("SC_CLK_TCK")
CPU_BOUND_SHARE = 0.85  # of one core (a Python process) or of every core (a server)


def time_wait(ports: Collection[int]) -> int:
    """TIME_WAIT sockets with ``ports`` at either end (the run's servers: other programs on
    the machine do not count)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _TIME_WAIT:
                continue
            local, remote = (int(end.rsplit(":", 1)[1], 16) for end in fields[1:3])
            count += local in ports or remote in ports
    return count


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); here counted after the name's ")".
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuMeter:
    """CPU shares of named processes between ``start`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._start: dict[str, float] = {}
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._start = {
            name: seconds
            for name, pid in self._pids.items()
            if (seconds := _cpu_seconds(pid)) is not None
        }

    def stop(self) -> dict[str, float]:
        """Name -> cores used on average (1.0: one core all the time)."""
        wall = max(time.monotonic() - self._began, 1e-6)
        shares = {}
        for name, before in self._start.items():
            after = _cpu_seconds(self._pids[name])
            if after is not None:
                shares[name] = round((after - before) / wall, 2)
        return shares


def bound(name: str, share: float, cores: int) -> str:
    """ "CPU" when ``name`` used nearly all it can: one core for a Python process (the daemons,
    the buyers), every core for a server; else "I/O"."""
    limit = 1.0 if name in ("coordinator", "sale") or name.startswith("agent") else cores
    return "CPU" if share >= CPU_BOUND_SHARE * limit else "I/O"
