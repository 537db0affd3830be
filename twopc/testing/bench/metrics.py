"""What a benchmark cell measures, and the arithmetic behind each figure.

The pure parts (percentiles, ratios, parsing ``/proc`` text, the table) take text and numbers, so
that unit tests feed them captured samples; the few functions that read ``/proc`` or a file are
thin wrappers around them.

- **CPU** of a process: ``utime + stime`` of ``/proc/<pid>/stat`` (fields 14 and 15, in clock
  ticks, all threads), sampled at the start and the end of the measured window.
- **Peak RSS**: ``VmHWM`` of ``/proc/<pid>/status``, reset before each cell by writing ``5`` to
  ``/proc/<pid>/clear_refs`` (which needs the right to write it: root, or the process's owner).
- **fsyncs** of the decision log: one per batch that holds a COMMIT record (a batch of END
  records only is not forced) and one per compaction; counted by reading the file's batches as
  they are written.
- **TIME_WAIT**: sockets in state 06 in ``/proc/net/tcp`` and ``/proc/net/tcp6`` on the loopback
  address, counted only when one end is a port of the cluster (other processes on the machine
  use the loopback too).
"""

from __future__ import annotations

import math
import os
import re
import struct
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.decision_log._format import (
    BATCH_HEAD,
    BATCH_MAGIC,
    HEADER,
    RecordType,
    record_types,
)

__all__ = [
    "DEADLOCK",
    "LOCK_WAIT_TIMEOUT",
    "STUCK_S",
    "CellResult",
    "LogSyncs",
    "Scrape",
    "Tally",
    "TcpSocket",
    "contention_figures",
    "contention_rows",
    "count_time_wait",
    "cpu_seconds",
    "failure_kind",
    "format_contention",
    "format_table",
    "histogram_quantile",
    "in_time_wait",
    "parse_proc_net_tcp",
    "parse_prometheus_text",
    "parse_stat_ticks",
    "parse_vm_hwm_kb",
    "peak_rss_kb",
    "per_thousand",
    "percentile",
    "ratio",
    "reset_peak_rss",
    "scrape",
    "time_wait_by_name",
    "time_wait_sockets",
]

TCP_TIME_WAIT = 0x06
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- numbers -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct`` percentile (0-100) of ``values`` by linear interpolation between the closest
    ranks (numpy's default), or None when there are no values."""
    if not values:
        return None
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} is not between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def per_thousand(amount: float, transactions: int) -> float | None:
    """``amount`` per 1,000 transactions, or None when there were none."""
    if transactions <= 0:
        return None
    return amount * 1000 / transactions


DEADLOCK, LOCK_WAIT_TIMEOUT = "deadlock", "lock wait timeout"
STUCK_S = 1.0  # a transaction in flight at the window's end for this long is waiting
# MariaDB's error codes as a failure's text carries them: "1213 Deadlock found ..." from the
# driver, "statement 1 failed: (1205) [database message not logged]" in twopc's abort message.
_DEADLOCK_CODE = re.compile(r"(?<![\d.])1213(?![\d.])")
_LOCK_WAIT_CODE = re.compile(r"(?<![\d.])1205(?![\d.])")


def failure_kind(reason: str) -> str | None:
    """``DEADLOCK`` or ``LOCK_WAIT_TIMEOUT`` when ``reason`` (a failure's text, a MariaDB error
    as ``<code> <message>`` or twopc's abort message, which carries the branch's error) says
    so; None otherwise."""
    text = reason.lower()
    if _DEADLOCK_CODE.search(text) or "deadlock" in text:
        return DEADLOCK
    if _LOCK_WAIT_CODE.search(text) or "lock wait timeout" in text:
        return LOCK_WAIT_TIMEOUT
    return None


@dataclass
class Tally:
    """What one worker saw in the measured window (merged across workers afterwards).

    Attributes:
        attempts: transaction attempts started, retries included.
        committed: logical transactions that committed.
        conflicts: attempts rolled back by the workload itself and retried (optimistic locking).
        aborted: logical transactions that the system aborted (deadlock, lock wait timeout...).
        gave_up: logical transactions still in conflict after the last retry.
        unknown: logical transactions whose outcome the client did not learn.
        latencies_ms: per committed transaction, first attempt to commit, retries included.
        errors: a sample of the reasons for failures, by reason.
        deadlocks: failures the database (or twopc) reported as a deadlock.
        lock_wait_timeouts: failures that waited out ``innodb_lock_wait_timeout``.
        waited_out: transactions, committed or not, that waited out a timeout: a lock-wait
            timeout error, or as long as the transaction timeout or longer.
        stuck: transactions in flight at the window's end that had been running for
            ``STUCK_S`` or longer (waiting on a lock, typically): not in the other counts, which
            are of what ended in the window. (Each worker has one transaction in flight then;
            a healthy one is a few milliseconds old.)
    """

    attempts: int = 0
    committed: int = 0
    conflicts: int = 0
    aborted: int = 0
    gave_up: int = 0
    unknown: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    deadlocks: int = 0
    lock_wait_timeouts: int = 0
    waited_out: int = 0
    stuck: int = 0

    def note_outcome(self, reason: str | None, seconds: float, tx_timeout_s: float) -> None:
        """Counts one finished transaction that took ``seconds``: ``reason`` is why it failed
        (None: it committed)."""
        kind = failure_kind(reason) if reason is not None else None
        if kind == DEADLOCK:
            self.deadlocks += 1
        elif kind == LOCK_WAIT_TIMEOUT:
            self.lock_wait_timeouts += 1
        if kind == LOCK_WAIT_TIMEOUT or seconds >= tx_timeout_s:
            self.waited_out += 1

    @classmethod
    def merged(cls, tallies: Iterable[Tally]) -> Tally:
        """One tally of all of ``tallies``."""
        total = cls()
        for one in tallies:
            total.merge(one)
        return total

    def merge(self, other: Tally) -> None:
        self.deadlocks += other.deadlocks
        self.lock_wait_timeouts += other.lock_wait_timeouts
        self.waited_out += other.waited_out
        self.stuck += other.stuck
        self.attempts += other.attempts
        self.committed += other.committed
        self.conflicts += other.conflicts
        self.aborted += other.aborted
        self.gave_up += other.gave_up
        self.unknown += other.unknown
        self.latencies_ms.extend(other.latencies_ms)
        for reason, count in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + count

    def note_error(self, reason: str) -> None:
        reason = reason[:160]
        if reason in self.errors or len(self.errors) < 20:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    @property
    def abort_rate(self) -> float:
        """The share of attempts that did not commit (conflicts, aborts, unknowns)."""
        if self.attempts == 0:
            return 0.0
        return max(self.attempts - self.committed, 0) / self.attempts


# --- /proc ---------------------------------------------------------------------------------------


def parse_stat_ticks(stat: str) -> int:
    """``utime + stime`` in clock ticks from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so the
    fields are counted from the last ``)``: field 3 (state) is the first after it.
    """
    rest = stat.rsplit(")", 1)[1].split()
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15
    return utime + stime


PROC = Path("/proc")


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """CPU seconds (user + system, all threads) that ``pid`` used so far; None if it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return parse_stat_ticks(text) / CLOCK_TICKS


def parse_vm_hwm_kb(status: str) -> int | None:
    """``VmHWM`` (peak resident set, kB) from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def peak_rss_kb(pid: int, proc: Path = PROC) -> int | None:
    try:
        return parse_vm_hwm_kb((proc / str(pid) / "status").read_text())
    except OSError:
        return None


def reset_peak_rss(pid: int, proc: Path = PROC) -> bool:
    """Resets ``pid``'s ``VmHWM`` to its current RSS; False when that is not allowed."""
    try:
        (proc / str(pid) / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class TcpSocket:
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: int


def _ipv4(word: str) -> str:
    # /proc/net/tcp prints the address as the host-order u32 in hex: little-endian here.
    return ".".join(str(b) for b in bytes.fromhex(word)[::-1])


def _ipv6(text: str) -> str:
    # Four host-order u32 words; an IPv4-mapped address (::ffff:a.b.c.d) is shown as IPv4.
    raw = b"".join(struct.pack("<I", int(text[i : i + 8], 16)) for i in range(0, 32, 8))
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in raw[12:])
    if raw == b"\0" * 15 + b"\x01":
        return "::1"
    return raw.hex()


def _endpoint(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    ip = _ipv4(address) if len(address) == 8 else _ipv6(address)
    return ip, int(port, 16)


def parse_proc_net_tcp(text: str) -> list[TcpSocket]:
    """The sockets listed in the text of ``/proc/net/tcp`` or ``/proc/net/tcp6``."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local_ip, local_port = _endpoint(fields[1])
        remote_ip, remote_port = _endpoint(fields[2])
        sockets.append(TcpSocket(local_ip, local_port, remote_ip, remote_port, int(fields[3], 16)))
    return sockets


_LOOPBACK = ("127.0.0.1", "::1")


def in_time_wait(
    sockets: Iterable[TcpSocket], ports: Iterable[int] | None = None
) -> set[TcpSocket]:
    """Loopback sockets in TIME_WAIT; with ``ports``, only those with one end on one of them.

    A socket in TIME_WAIT is unique by its two ends for as long as it stays there (60 s on
    Linux), so the difference of two such sets is the sockets that entered TIME_WAIT in between,
    whatever expired meanwhile.
    """
    wanted = set(ports) if ports is not None else None
    return {
        sock
        for sock in sockets
        if sock.state == TCP_TIME_WAIT
        and sock.local_ip in _LOOPBACK
        and (wanted is None or sock.local_port in wanted or sock.remote_port in wanted)
    }


def count_time_wait(sockets: Iterable[TcpSocket], ports: Iterable[int] | None = None) -> int:
    """How many of ``sockets`` ``in_time_wait`` keeps."""
    return len(in_time_wait(sockets, ports))


def time_wait_by_name(sockets: Iterable[TcpSocket], names: Mapping[int, str]) -> dict[str, int]:
    """Loopback sockets in TIME_WAIT per name of the port at one of their ends (``names``: port ->
    name, e.g. a link or a component); sockets on none of the ports are not counted."""
    counts: dict[str, int] = {}
    for sock in sockets:
        if sock.state != TCP_TIME_WAIT or sock.local_ip not in _LOOPBACK:
            continue
        name = names.get(sock.local_port) or names.get(sock.remote_port)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def time_wait_sockets() -> list[TcpSocket]:
    sockets: list[TcpSocket] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            sockets.extend(parse_proc_net_tcp(Path(name).read_text()))
        except OSError:
            continue
    return sockets


# --- the decision log's fsyncs -------------------------------------------------------------------


class LogSyncs:
    """Counts the fsyncs of a decision log by reading its batches incrementally.

    The writer forces a batch if and only if it holds a COMMIT record (END-only batches ride on
    the next fsync), and a compaction forces the new file it writes. Batch heads and record types
    are read without checksums: a measure, not recovery. A replaced file (compaction) is read from
    its start.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._inode = -1
        self._offset = len(HEADER)
        self._syncs = 0

    def read(self) -> int:
        """fsyncs seen since this counter was made (the file's existing batches included)."""
        try:
            with self._path.open("rb") as file:
                inode = os.fstat(file.fileno()).st_ino
                size = os.fstat(file.fileno()).st_size
                replaced = self._inode != -1 and (inode != self._inode or size < self._offset)
                if replaced:
                    self._syncs += 1  # the compaction's own fsync of the new file
                if inode != self._inode or size < self._offset:
                    self._inode, self._offset = inode, len(HEADER)
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return self._syncs
        self._offset, synced = _walk_batches(data, self._offset, skip_first=replaced)
        self._syncs += synced
        return self._syncs


def _walk_batches(data: bytes, base: int, *, skip_first: bool = False) -> tuple[int, int]:
    """(offset after the last complete batch, how many complete batches hold a COMMIT) in
    ``data`` read from file offset ``base``; ``skip_first`` leaves out a compacted file's batch,
    which carries still-open COMMITs already counted."""
    at, synced = 0, 0
    first = True
    while at + BATCH_HEAD.size <= len(data):
        magic, length, _crc, _number = BATCH_HEAD.unpack_from(data, at)
        end = at + BATCH_HEAD.size + length
        if magic != BATCH_MAGIC or end > len(data):
            break
        body = data[at + BATCH_HEAD.size : end]
        if not (first and skip_first) and RecordType.COMMIT in record_types(body):
            synced += 1
        at, first = end, False
    return base + at, synced


# --- the daemons' Prometheus metrics: deadlocks and lock holds --------------------------------

# Counters and histograms the coordinator and the agents may serve (a daemon that does not, an
# older one, gives "n/a" in the report: the benchmark reads them, never requires them).
DEADLOCK_CYCLES = "twopc_deadlock_cycles_total"
DEADLOCK_VICTIMS = "twopc_deadlock_victims_total"
DEADLOCK_BREAK = "twopc_deadlock_break_seconds"
LOCK_HOLD = "twopc_agent_branch_lock_hold_seconds"
WATCHED = (DEADLOCK_CYCLES, DEADLOCK_VICTIMS, DEADLOCK_BREAK, LOCK_HOLD)


@dataclass(frozen=True)
class Scrape:
    """What one scrape of a Prometheus text endpoint gave: each sample summed over its labels
    (``le`` apart), and each histogram's cumulative buckets by upper bound."""

    samples: Mapping[str, float]
    buckets: Mapping[str, Mapping[float, float]]

    def plus(self, other: Scrape) -> Scrape:
        """Both scrapes summed (several agents' endpoints as one)."""
        samples = dict(self.samples)
        for name, value in other.samples.items():
            samples[name] = samples.get(name, 0.0) + value
        buckets = {name: dict(b) for name, b in self.buckets.items()}
        for name, bounds in other.buckets.items():
            mine = buckets.setdefault(name, {})
            for le, value in bounds.items():
                mine[le] = mine.get(le, 0.0) + value
        return Scrape(samples, buckets)


EMPTY_SCRAPE = Scrape({}, {})
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")


def parse_prometheus_text(text: str, wanted: Sequence[str] = WATCHED) -> Scrape:
    """The samples of the metric families ``wanted`` in Prometheus text exposition ``text``.

    ``name`` (a counter given as ``name`` or ``name_total``), ``name_count``, ``name_sum`` and
    ``name_bucket`` (by ``le``) are kept; the rest of the page is ignored, as are lines that do
    not parse."""
    roots = {w.removesuffix("_total") for w in wanted}
    samples: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value_text = match.group(1), match.group(2) or "", match.group(3)
        base = name
        for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
            if name.endswith(suffix):
                base = name.removesuffix(suffix)
                break
        if base not in roots or name.endswith("_created"):
            continue
        if name in roots and f"{name}_total" in wanted:
            name = f"{name}_total"  # a counter written without its suffix
        try:
            value = float(value_text)
        except ValueError:
            continue
        if name.endswith("_bucket"):
            le = _label(labels, "le")
            if le is None:
                continue
            bound = math.inf if le == "+Inf" else float(le)
            family = buckets.setdefault(base, {})
            family[bound] = family.get(bound, 0.0) + value
        else:
            samples[name] = samples.get(name, 0.0) + value
    return Scrape(samples, buckets)


def _label(labels: str, key: str) -> str | None:
    for pair in labels.split(","):
        name, _, value = pair.partition("=")
        if name.strip() == key:
            return value.strip().strip('"')
    return None


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile (0-1) of a histogram's cumulative ``buckets`` (upper bound -> count),
    interpolated linearly inside the bucket as Prometheus does; None when it holds nothing. A
    quantile in the ``+Inf`` bucket is the highest finite bound."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def _delta(before: Scrape, after: Scrape, name: str) -> float | None:
    if name not in after.samples:
        return None
    return after.samples[name] - before.samples.get(name, 0.0)


def _histogram_delta(before: Scrape, after: Scrape, family: str) -> dict[str, float | None] | None:
    count = _delta(before, after, f"{family}_count")
    if count is None:
        return None
    total = _delta(before, after, f"{family}_sum") or 0.0
    window = {
        le: value - before.buckets.get(family, {}).get(le, 0.0)
        for le, value in after.buckets.get(family, {}).items()
    }
    return {
        "count": count,
        "mean_s": total / count if count > 0 else None,
        "p99_s": histogram_quantile(0.99, window) if count > 0 else None,
    }


def contention_figures(
    coordinator: tuple[Scrape, Scrape] | None, agents: tuple[Scrape, Scrape] | None
) -> dict[str, Any]:
    """The deadlock and lock-hold figures of one measured window from the scrapes at its start
    and end (None: not scraped, e.g. a baseline, or the daemons serve no metrics). A figure the
    daemons do not serve is None ("n/a")."""
    coord_before, coord_after = coordinator or (EMPTY_SCRAPE, EMPTY_SCRAPE)
    agents_before, agents_after = agents or (EMPTY_SCRAPE, EMPTY_SCRAPE)
    return {
        "deadlock_cycles": _delta(coord_before, coord_after, DEADLOCK_CYCLES),
        "deadlock_victims": _delta(coord_before, coord_after, DEADLOCK_VICTIMS),
        "deadlock_break": _histogram_delta(coord_before, coord_after, DEADLOCK_BREAK),
        "agent_lock_hold": _histogram_delta(agents_before, agents_after, LOCK_HOLD),
    }


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """Scrapes one endpoint; an empty scrape when there is none (``url`` "") or it does not
    answer (the figures are then "n/a", not a failed cell)."""
    if not url:
        return EMPTY_SCRAPE
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (loopback http)
            return parse_prometheus_text(reply.read().decode("utf-8", "replace"))
    except OSError:
        return EMPTY_SCRAPE


# --- results -------------------------------------------------------------------------------------


@dataclass
class CellResult:
    """One system's run in one cell (workload, round trip, concurrency)."""

    workload: str
    system: str
    rtt_ms: int
    concurrency: int
    window_s: float
    tally: Tally
    cpu_s: dict[str, float | None]
    peak_rss_kb: dict[str, int | None]
    fsyncs: int | None
    time_wait: dict[str, Any]
    check: dict[str, Any]
    connections_opened: int | None = None
    twopc_ratio: dict[str, float | None] = field(default_factory=dict)
    floor_ms: float | None = None  # twopc's latency floor at this round trip (bench.floor)
    floor_ratio: dict[str, float | None] = field(default_factory=dict)
    # Which way the system's traffic went (bench.paths), and the bytes each proxy link carried
    # during the run (all zero when nothing crossed the proxy).
    path: str = ""
    proxy_bytes: dict[str, int] = field(default_factory=dict)
    # contention_figures of the measured window; empty: not scraped (a baseline).
    contention: dict[str, Any] = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.tally.committed / self.window_s if self.window_s > 0 else 0.0

    def latency(self, pct: float) -> float | None:
        return percentile(self.tally.latencies_ms, pct)

    @property
    def fsyncs_per_commit(self) -> float | None:
        if self.fsyncs is None:
            return None
        return ratio(self.fsyncs, self.tally.committed)

    def as_json(self) -> dict[str, Any]:
        tally = self.tally
        values = tally.latencies_ms
        return {
            "workload": self.workload,
            "system": self.system,
            "rtt_ms": self.rtt_ms,
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 3),
            "tps": round(self.tps, 1),
            "latency_ms": {
                "p50": _round(self.latency(50)),
                "p95": _round(self.latency(95)),
                "p99": _round(self.latency(99)),
                "mean": _round(sum(values) / len(values) if values else None),
                "max": _round(max(values) if values else None),
            },
            "attempts": tally.attempts,
            "committed": tally.committed,
            "conflicts": tally.conflicts,
            "aborted": tally.aborted,
            "gave_up": tally.gave_up,
            "unknown": tally.unknown,
            "abort_rate": round(tally.abort_rate, 4),
            "deadlocks": tally.deadlocks,
            "lock_wait_timeouts": tally.lock_wait_timeouts,
            "waited_out": tally.waited_out,
            "stuck_at_end": tally.stuck,
            "contention": self.contention,
            "path": self.path,
            "proxy_bytes": self.proxy_bytes,
            "errors": dict(sorted(tally.errors.items(), key=lambda item: -item[1])[:5]),
            "cpu_s_per_1k": {
                name: _round(per_thousand(seconds, tally.committed), 4)
                if seconds is not None
                else None
                for name, seconds in self.cpu_s.items()
            },
            "cpu_s": {name: _round(s, 3) for name, s in self.cpu_s.items()},
            "peak_rss_mb": {
                name: round(kb / 1024, 1) if kb is not None else None
                for name, kb in self.peak_rss_kb.items()
            },
            "fsyncs": self.fsyncs,
            "fsyncs_per_commit": _round(self.fsyncs_per_commit, 3),
            "time_wait": self.time_wait,
            "connections_opened": self.connections_opened,
            "check": self.check,
            "twopc_ratio": {k: _round(v, 3) for k, v in self.twopc_ratio.items()},
            "floor_ms": _round(self.floor_ms, 3),
            "floor_ratio": {k: _round(v, 3) for k, v in self.floor_ratio.items()},
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- the table -----------------------------------------------------------------------------------

_COLUMNS = (
    "workload",
    "rtt ms",
    "clients",
    "system",
    "tps",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "abort %",
    "CPU s/1k coord",
    "agents",
    "bench",
    "RSS MB coord",
    "agents",
    "fsync/commit",
    "new TIME_WAIT window/run",
    "twopc÷ tps",
    "twopc÷ p50",
    "p50÷floor",
    "p99÷floor",
)


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table_row(cell: Mapping[str, Any]) -> list[str]:
    """One row of the table from a cell's JSON (``CellResult.as_json``)."""
    latency = cell["latency_ms"]
    cpu = cell["cpu_s_per_1k"]
    rss = cell["peak_rss_mb"]
    tw = cell["time_wait"]
    ratios = cell.get("twopc_ratio") or {}
    floor = cell.get("floor_ratio") or {}
    return [
        cell["workload"],
        str(cell["rtt_ms"]),
        str(cell["concurrency"]),
        cell["system"],
        _fmt(cell["tps"], 0),
        _fmt(latency["p50"], 2),
        _fmt(latency["p95"], 2),
        _fmt(latency["p99"], 2),
        _fmt(cell["abort_rate"] * 100, 1),
        _fmt(cpu.get("coordinator"), 2),
        _fmt(cpu.get("agents"), 2),
        _fmt(cpu.get("bench"), 2),
        _fmt(rss.get("coordinator"), 0),
        _fmt(rss.get("agents"), 0),
        _fmt(cell["fsyncs_per_commit"], 2),
        f"+{tw.get('new_in_window', 0)}/+{tw.get('new_in_run', 0)}",
        _fmt(ratios.get("tps"), 2),
        _fmt(ratios.get("p50"), 2),
        _fmt(floor.get("p50"), 2),
        _fmt(floor.get("p99"), 2),
    ]


def format_table(cells: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table, a row per cell in the given order; numbers right-aligned."""
    return _markdown(list(_COLUMNS), [table_row(cell) for cell in cells], text_columns={0, 3})


def _markdown(header: list[str], body: list[list[str]], *, text_columns: set[int]) -> str:
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            value.ljust(width) if i in text_columns else value.rjust(width)
            for i, (value, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i in text_columns else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(rows[0]), line(rule)] + [line(row) for row in rows[1:]])


# --- the summary: one row per (workload, round trip, concurrency) ------------------------------

_SUMMARY_COLUMNS = (
    "workload",
    "rtt ms",
    "clients",
    "twopc tps",
    "direct-xa",
    "sqla-twophase",
    "local",
    "twopc÷direct tps",
    "twopc÷sqla tps",
    "twopc p50 / p99 ms",
    "direct-xa p50 ms",
    "twopc÷direct p50",
    "p50÷floor",
    "p99÷floor",
    "twopc abort %",
)


def _by_cell_key(
    cells: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, int, int], dict[str, Mapping[str, Any]]]:
    """Cells' JSON by (workload, round trip, concurrency), then by system, in run order."""
    groups: dict[tuple[str, int, int], dict[str, Mapping[str, Any]]] = {}
    for cell in cells:
        key = (cell["workload"], cell["rtt_ms"], cell["concurrency"])
        groups.setdefault(key, {})[cell["system"]] = cell
    return groups


def summary_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per (workload, round trip, concurrency), the systems side by side, from cells'
    JSON; groups without a twopc cell are left out."""
    rows = []
    for (workload, rtt, clients), by_system in _by_cell_key(cells).items():
        twopc = by_system.get("twopc")
        if twopc is None:
            continue
        direct = by_system.get("direct-xa", {})
        sqla = by_system.get("sqla-twophase", {})
        local = by_system.get("local", {})
        floor = twopc.get("floor_ratio") or {}
        latency = twopc["latency_ms"]
        rows.append(
            [
                workload,
                str(rtt),
                str(clients),
                _fmt(twopc["tps"], 0),
                _fmt(direct.get("tps"), 0),
                _fmt(sqla.get("tps"), 0),
                _fmt(local.get("tps"), 0),
                _fmt((direct.get("twopc_ratio") or {}).get("tps"), 2),
                _fmt((sqla.get("twopc_ratio") or {}).get("tps"), 2),
                f"{_fmt(latency['p50'], 1)} / {_fmt(latency['p99'], 1)}",
                _fmt((direct.get("latency_ms") or {}).get("p50"), 1),
                _fmt((direct.get("twopc_ratio") or {}).get("p50"), 2),
                _fmt(floor.get("p50"), 2),
                _fmt(floor.get("p99"), 2),
                _fmt(twopc["abort_rate"] * 100, 1),
            ]
        )
    return rows


def format_summary(cells: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``summary_rows``."""
    return _markdown(list(_SUMMARY_COLUMNS), summary_rows(cells), text_columns={0})


# --- what TLS costs: twopc with and without it, per (workload, round trip, concurrency) --------

_TLS_COLUMNS = (
    "workload",
    "rtt ms",
    "clients",
    "TLS tps",
    "plaintext tps",
    "TLS÷plaintext tps",
    "TLS p50 / p99 ms",
    "plaintext p50 / p99 ms",
    "CPU s/1k coord TLS / plain",
    "agents TLS / plain",
)


def tls_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per (workload, round trip, concurrency) that has both a ``twopc`` (mutual TLS)
    and a ``twopc-plaintext`` cell, from cells' JSON."""
    rows = []
    for (workload, rtt, clients), by_system in _by_cell_key(cells).items():
        tls, plain = by_system.get("twopc"), by_system.get("twopc-plaintext")
        if tls is None or plain is None:
            continue
        tls_cpu, plain_cpu = tls["cpu_s_per_1k"], plain["cpu_s_per_1k"]
        rows.append(
            [
                workload,
                str(rtt),
                str(clients),
                _fmt(tls["tps"], 0),
                _fmt(plain["tps"], 0),
                _fmt((plain.get("twopc_ratio") or {}).get("tps"), 2),
                f"{_fmt(tls['latency_ms']['p50'], 1)} / {_fmt(tls['latency_ms']['p99'], 1)}",
                f"{_fmt(plain['latency_ms']['p50'], 1)} / {_fmt(plain['latency_ms']['p99'], 1)}",
                f"{_fmt(tls_cpu.get('coordinator'), 2)} / {_fmt(plain_cpu.get('coordinator'), 2)}",
                f"{_fmt(tls_cpu.get('agents'), 2)} / {_fmt(plain_cpu.get('agents'), 2)}",
            ]
        )
    return rows


def format_tls_summary(cells: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``tls_rows``; empty when no cell ran twopc both ways."""
    rows = tls_rows(cells)
    return _markdown(list(_TLS_COLUMNS), rows, text_columns={0}) if rows else ""


# --- one-shot order: twopc parallel and ordered, per (workload, round trip, concurrency) --------

_ORDERS = (("parallel", "twopc"), ("ordered", "twopc-ordered"), ("adaptive", "twopc-adaptive"))
_ORDER_COLUMNS = (
    "workload",
    "rtt ms",
    "clients",
    "direct-xa tps",
    *(f"{order} tps" for order, _ in _ORDERS),
    *(f"{order}÷direct" for order, _ in _ORDERS),
    *(f"{order} p50 / p99 ms" for order, _ in _ORDERS),
    "not committed %, " + " / ".join(order for order, _ in _ORDERS),
)


def order_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per (workload, round trip, concurrency) that has a ``twopc`` cell (one-shot
    branches prepared in parallel) and a ``twopc-ordered`` or ``twopc-adaptive`` one, from
    cells' JSON; "-" for an order not run."""
    rows = []
    for (workload, rtt, clients), by_system in _by_cell_key(cells).items():
        runs = [by_system.get(system) for _, system in _ORDERS]
        if runs[0] is None or not any(runs[1:]):
            continue
        direct_tps = by_system.get("direct-xa", {}).get("tps")

        def latency(cell: Mapping[str, Any] | None) -> str:
            if cell is None:
                return "-"
            return f"{_fmt(cell['latency_ms']['p50'], 1)} / {_fmt(cell['latency_ms']['p99'], 1)}"

        rows.append(
            [
                workload,
                str(rtt),
                str(clients),
                _fmt(direct_tps, 0),
                *(_fmt(run["tps"] if run else None, 0) for run in runs),
                *(_fmt(ratio(run["tps"], direct_tps) if run else None, 2) for run in runs),
                *(latency(run) for run in runs),
                " / ".join(_fmt(run["abort_rate"] * 100 if run else None, 1) for run in runs),
            ]
        )
    return rows


def format_order_summary(cells: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``order_rows``; empty when no cell ran twopc in another order."""
    rows = order_rows(cells)
    return _markdown(list(_ORDER_COLUMNS), rows, text_columns={0}) if rows else ""


# --- contention: aborts, waits and deadlocks, one row per cell ---------------------------------

_CONTENTION_COLUMNS = (
    "workload",
    "rtt ms",
    "clients",
    "system",
    "tps",
    "p50 / p99 ms",
    "not committed %",
    "deadlock errors",
    "lock-wait timeouts",
    "waited out",
    "stuck at end",
    "cycles / victims",
    "break mean / p99 ms",
    "agent lock hold mean / p99 ms",
)


def _ms_pair(figure: Mapping[str, Any] | None) -> str:
    if not figure:
        return "n/a"
    mean, p99 = figure.get("mean_s"), figure.get("p99_s")
    return (
        f"{_fmt(mean * 1000 if mean is not None else None, 1)} / "
        f"{_fmt(p99 * 1000 if p99 is not None else None, 1)}"
    )


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def contention_rows(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per cell from cells' JSON: what contention cost it. The daemons' figures are
    "n/a" for the baselines and when the daemons do not serve them."""
    rows = []
    for cell in cells:
        figures = cell.get("contention") or {}
        latency = cell["latency_ms"]
        rows.append(
            [
                cell["workload"],
                str(cell["rtt_ms"]),
                str(cell["concurrency"]),
                cell["system"],
                _fmt(cell["tps"], 0),
                f"{_fmt(latency['p50'], 1)} / {_fmt(latency['p99'], 1)}",
                _fmt(cell["abort_rate"] * 100, 1),
                str(cell.get("deadlocks", 0)),
                str(cell.get("lock_wait_timeouts", 0)),
                str(cell.get("waited_out", 0)),
                str(cell.get("stuck_at_end", 0)),
                f"{_count(figures.get('deadlock_cycles'))} / "
                f"{_count(figures.get('deadlock_victims'))}",
                _ms_pair(figures.get("deadlock_break")),
                _ms_pair(figures.get("agent_lock_hold")),
            ]
        )
    return rows


def format_contention(cells: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``contention_rows``."""
    return _markdown(list(_CONTENTION_COLUMNS), contention_rows(cells), text_columns={0, 3})
