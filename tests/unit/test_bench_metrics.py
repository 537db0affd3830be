"""The benchmark's arithmetic: percentiles, ratios, /proc parsing, CPU ticks, the fsync counter
and the table, on captured samples (no processes, no databases)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from coordinator.decision_log import CommitRecord
from coordinator.decision_log._format import HEADER, encode_commit, encode_end, frame_batch
from twopc.testing.bench import metrics
from twopc.testing.bench.floor import Floor
from twopc.testing.bench.metrics import (
    CellResult,
    LogSyncs,
    Tally,
    count_time_wait,
    format_order_summary,
    format_summary,
    format_table,
    format_tls_summary,
    in_time_wait,
    order_rows,
    parse_proc_net_tcp,
    parse_stat_ticks,
    parse_vm_hwm_kb,
    per_thousand,
    percentile,
    ratio,
    summary_rows,
    time_wait_by_name,
    tls_rows,
)
from twopc.testing.bench.runner import _names, _with_tls_modes, add_ratios, apply_round_trip
from twopc.testing.playground.cluster import LinkPlan

# Captured from this kind of machine: a listener, two loopback sockets in TIME_WAIT (06) and an
# established one (01) on another address.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 10093 1 0000000056453db8 100 0 0 10 0
   9: 0100007F:DAFD 0100007F:BC2C 06 00000000:00000000 03:0000040C 00000000     0        0 0 3 000000005ffa29ac
  10: 0100007F:A5C0 0100007F:E88D 06 00000000:00000000 03:00000276 00000000     0        0 0 3 000000000df5c3bb
  11: 0F02000A:C3A6 0100A8C0:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5 1 0000000094df5179
"""  # noqa: E501  (kernel output, kept verbatim)

PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4850 1 000000001fd554a2 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:E868 0000000000000000FFFF00000100007F:D3F3 06 00000000:00000000 03:00000402 00000000     0        0 0 3 00000000ff1fd0a8
   3: 00000000000000000000000001000000:EE05 00000000000000000000000001000000:C422 06 00000000:00000000 03:0000040C 00000000     0        0 0 3 00000000b894acec
"""  # noqa: E501

# /proc/<pid>/stat of a process whose name holds a space and a parenthesis: utime 1234, stime 56.
PROC_STAT = (
    "4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 5000 0 0 0 1234 56 0 0 20 0 9 0 "
    "818308 3133440 417 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


# --- percentiles and ratios ----------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0


def test_percentile_does_not_need_sorted_input() -> None:
    assert percentile([30.0, 10.0, 20.0], 50) == 20.0


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 99) == 7.5


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_percentile_outside_0_100_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_ratio_divides() -> None:
    assert ratio(300.0, 600.0) == 0.5


@pytest.mark.parametrize(("numerator", "denominator"), [(1.0, 0.0), (None, 1.0), (1.0, None)])
def test_ratio_without_a_meaningful_denominator_is_none(
    numerator: float | None, denominator: float | None
) -> None:
    assert ratio(numerator, denominator) is None


def test_per_thousand_scales_to_1000_transactions() -> None:
    assert per_thousand(0.5, 250) == 2.0
    assert per_thousand(0.5, 0) is None


# --- tallies -------------------------------------------------------------------------------------


def test_abort_rate_counts_every_attempt_that_did_not_commit() -> None:
    tally = Tally(attempts=10, committed=6, conflicts=3, aborted=1)
    assert tally.abort_rate == pytest.approx(0.4)


def test_abort_rate_of_no_attempt_is_zero() -> None:
    assert Tally().abort_rate == 0.0


def test_tallies_merge() -> None:
    one = Tally(attempts=2, committed=1, conflicts=1, latencies_ms=[1.0], errors={"x": 1})
    two = Tally(attempts=3, committed=2, unknown=1, latencies_ms=[2.0, 3.0], errors={"x": 2})
    one.merge(two)
    assert (one.attempts, one.committed, one.conflicts, one.unknown) == (5, 3, 1, 1)
    assert one.latencies_ms == [1.0, 2.0, 3.0]
    assert one.errors == {"x": 3}


def test_error_reasons_are_capped() -> None:
    tally = Tally()
    for i in range(30):
        tally.note_error(f"reason {i}")
    tally.note_error("reason 0")
    assert len(tally.errors) == 20
    assert tally.errors["reason 0"] == 2


# --- CPU and memory from /proc -------------------------------------------------------------------


def test_stat_ticks_are_utime_plus_stime_counted_after_the_name() -> None:
    assert parse_stat_ticks(PROC_STAT) == 1234 + 56


def test_cpu_seconds_divide_ticks_by_the_clock_rate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(metrics, "CLOCK_TICKS", 100)
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(PROC_STAT)
    assert metrics.cpu_seconds(4242, proc=tmp_path) == pytest.approx(12.90)


def test_cpu_seconds_of_a_gone_process_is_none(tmp_path: Path) -> None:
    assert metrics.cpu_seconds(4242, proc=tmp_path) is None


def test_cpu_and_peak_rss_of_this_process_are_read() -> None:
    seconds = metrics.cpu_seconds(os.getpid())
    assert seconds is not None
    assert seconds >= 0
    peak = metrics.peak_rss_kb(os.getpid())
    assert peak is not None
    assert peak > 1000


def test_vm_hwm_is_read_in_kb() -> None:
    status = "Name:\tpython3\nVmPeak:\t  300000 kB\nVmHWM:\t   65536 kB\nVmRSS:\t   60000 kB\n"
    assert parse_vm_hwm_kb(status) == 65536
    assert parse_vm_hwm_kb("Name:\tkthreadd\n") is None


# --- sockets -------------------------------------------------------------------------------------


def test_proc_net_tcp_lines_are_decoded() -> None:
    sockets = parse_proc_net_tcp(PROC_NET_TCP)
    assert len(sockets) == 4
    first_wait = sockets[1]
    assert (first_wait.local_ip, first_wait.local_port) == ("127.0.0.1", 0xDAFD)
    assert (first_wait.remote_ip, first_wait.remote_port) == ("127.0.0.1", 0xBC2C)
    assert first_wait.state == 0x06
    assert sockets[3].local_ip == "10.0.2.15"
    assert sockets[3].remote_ip == "192.168.0.1"


def test_proc_net_tcp6_decodes_loopback_and_ipv4_mapped_addresses() -> None:
    sockets = parse_proc_net_tcp(PROC_NET_TCP6)
    assert sockets[0].local_ip == "::1"
    assert sockets[1].local_ip == "127.0.0.1"  # ::ffff:127.0.0.1
    assert sockets[1].local_port == 0xE868
    assert sockets[2].remote_ip == "::1"


def test_time_wait_counts_loopback_sockets_in_state_06() -> None:
    sockets = parse_proc_net_tcp(PROC_NET_TCP) + parse_proc_net_tcp(PROC_NET_TCP6)
    assert count_time_wait(sockets) == 4


def test_time_wait_can_be_limited_to_ports_at_either_end() -> None:
    sockets = parse_proc_net_tcp(PROC_NET_TCP)
    assert count_time_wait(sockets, ports={0xE88D}) == 1  # the remote end
    assert count_time_wait(sockets, ports={0xDAFD}) == 1  # the local end
    assert count_time_wait(sockets, ports={0x0CEA}) == 0  # a listener is not in TIME_WAIT


def test_new_time_wait_sockets_are_a_set_difference() -> None:
    before = in_time_wait(parse_proc_net_tcp(PROC_NET_TCP))
    after = in_time_wait(parse_proc_net_tcp(PROC_NET_TCP + PROC_NET_TCP6.split("\n", 1)[1]))
    assert len(after - before) == 2


def test_time_wait_by_name_of_the_port() -> None:
    sockets = parse_proc_net_tcp(PROC_NET_TCP)
    names = {0xE88D: "link client-mariadb-eu", 0xDAFD: "mariadb-eu"}
    assert time_wait_by_name(sockets, names) == {"link client-mariadb-eu": 1, "mariadb-eu": 1}


# --- the decision log's fsyncs -------------------------------------------------------------------


def _batch(sequence: int) -> bytes:
    return frame_batch(sequence, [encode_commit(CommitRecord(f"c1.t{sequence}", ("eu", "us")))])


def _end_batch(sequence: int) -> bytes:
    return frame_batch(sequence, [encode_end(f"c1.t{sequence}")])


def test_log_syncs_counts_complete_batches_that_hold_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    counter = LogSyncs(path)
    assert counter.read() == 0  # no file yet
    path.write_bytes(HEADER + _batch(1) + _batch(2))
    assert counter.read() == 2
    with path.open("ab") as file:
        file.write(_batch(3) + _batch(4)[:-3])  # the last one still being written
    assert counter.read() == 3
    with path.open("ab") as file:
        file.write(_batch(4)[-3:])
    assert counter.read() == 4


def test_log_syncs_leaves_out_end_only_batches(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    path.write_bytes(HEADER + _batch(1) + _end_batch(2) + _end_batch(3) + _batch(4))
    mixed = frame_batch(5, [encode_end("c1.t1"), encode_commit(CommitRecord("c1.t9", ("eu",)))])
    with path.open("ab") as file:
        file.write(mixed)
    assert LogSyncs(path).read() == 3


def test_log_syncs_counts_a_compaction_once(tmp_path: Path) -> None:
    path = tmp_path / "decisions.log"
    path.write_bytes(HEADER + b"".join(_batch(n) for n in range(1, 6)))
    counter = LogSyncs(path)
    assert counter.read() == 5
    scratch = tmp_path / "decisions.log.tmp"
    scratch.write_bytes(HEADER + _batch(6))  # compaction: a new file holding the open commits
    scratch.replace(path)
    assert counter.read() == 6
    with path.open("ab") as file:
        file.write(_batch(7))
    assert counter.read() == 7


# --- ratios across systems, the round trip, the table --------------------------------------------


def _cell(system: str, tps_committed: int, latencies: list[float]) -> CellResult:
    return CellResult(
        workload="transfer2",
        system=system,
        rtt_ms=0,
        concurrency=8,
        window_s=2.0,
        tally=Tally(attempts=tps_committed, committed=tps_committed, latencies_ms=list(latencies)),
        cpu_s={"coordinator": 0.5, "agents": 1.0, "mariadb": 0.2, "proxy": 0.1, "bench": 0.25},
        peak_rss_kb={"coordinator": 51200, "agents": 102400, "bench": 70000},
        fsyncs=150 if system == "twopc" else None,
        time_wait={"after_run": 3, "new_in_window": 0, "new_in_run": 16},
        check={"ok": True},
    )


def test_ratios_are_twopc_over_each_baseline() -> None:
    twopc = _cell("twopc", 200, [10.0] * 10)
    direct = _cell("direct-xa", 800, [2.5] * 10)
    add_ratios([twopc, direct])
    assert direct.twopc_ratio == {"tps": pytest.approx(0.25), "p50": pytest.approx(4.0)}
    assert twopc.twopc_ratio == {}
    assert twopc.floor_ratio == {}  # no floor measured


def test_floor_ratio_is_twopc_latency_over_the_sum_of_its_parts() -> None:
    twopc = _cell("twopc", 200, [52.0] * 98 + [78.0] * 2)
    add_ratios([twopc, _cell("direct-xa", 80, [200.0])], Floor(0.4, 50.6, 1.0))
    assert twopc.floor_ms == pytest.approx(52.0)
    assert twopc.floor_ratio["p50"] == pytest.approx(1.0)
    assert twopc.floor_ratio["p99"] == pytest.approx(1.5)
    assert twopc.as_json()["floor_ratio"] == {"p50": 1.0, "p99": 1.5}


def test_cell_json_has_per_thousand_cpu_and_fsyncs_per_commit() -> None:
    data = _cell("twopc", 200, [10.0, 20.0]).as_json()
    assert data["tps"] == 100.0
    assert data["cpu_s_per_1k"]["agents"] == 5.0  # 1.0 s over 200 transactions
    assert data["fsyncs_per_commit"] == 0.75
    assert data["peak_rss_mb"] == {"coordinator": 50.0, "agents": 100.0, "bench": 68.4}
    assert data["latency_ms"]["p50"] == 15.0


def test_table_has_a_header_a_rule_and_a_row_per_cell() -> None:
    cells = [_cell("twopc", 200, [10.0]), _cell("direct-xa", 800, [2.5])]
    add_ratios(cells, Floor(client_ms=0.5, agents_ms=3.5, fsync_ms=1.0))
    lines = format_table([c.as_json() for c in cells]).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| workload")
    assert set(lines[1]) <= {"|", "-", ":", " "}
    assert len({len(line) for line in lines}) == 1  # aligned columns
    direct = [field.strip() for field in lines[3].strip("|").split("|")]
    assert direct[3] == "direct-xa"
    assert direct[4] == "400"  # tps
    assert direct[-4:] == ["0.25", "4.00", "-", "-"]  # twopc's tps and p50 over direct XA's
    assert direct[-5] == "+0/+16"  # new TIME_WAIT sockets: window / run
    twopc = [field.strip() for field in lines[2].strip("|").split("|")]
    assert twopc[14] == "0.75"  # fsyncs per commit
    assert twopc[-4:] == ["-", "-", "2.00", "2.00"]  # p50 and p99 over the 5 ms floor


def test_twopc_runs_once_per_tls_mode_and_tls_is_priced_against_plaintext() -> None:
    assert _with_tls_modes(["twopc", "direct-xa"], ["on", "off"]) == (
        "twopc",
        "twopc-plaintext",
        "direct-xa",
    )
    assert _with_tls_modes(["direct-xa", "twopc"], ["off"]) == ("direct-xa", "twopc-plaintext")
    tls = _cell("twopc", 150, [12.0] * 10)
    plain = _cell("twopc-plaintext", 200, [9.0] * 10)
    add_ratios([tls, plain])
    assert plain.twopc_ratio == {"tps": pytest.approx(0.75), "p50": pytest.approx(12 / 9)}
    (row,) = tls_rows([tls.as_json(), plain.as_json()])
    assert row[:6] == ["transfer2", "0", "8", "75", "100", "0.75"]
    assert format_tls_summary([tls.as_json()]) == ""  # no plaintext run: no table
    alone = _cell("twopc-plaintext", 200, [9.0] * 10)
    add_ratios([alone, _cell("direct-xa", 400, [4.5] * 10)], Floor(1.0, 2.0, 1.5))
    assert alone.floor_ratio["p50"] == pytest.approx(2.0)  # the plaintext run, run alone


def test_ordered_twopc_is_asked_for_by_name_and_set_beside_parallel_twopc() -> None:
    known = ("twopc", "direct-xa")
    assert _names("all", known, "system", ("twopc-ordered",)) == ["twopc", "direct-xa"]
    assert _names("twopc,twopc-ordered", known, "system", ("twopc-ordered",)) == [
        "twopc",
        "twopc-ordered",
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="choose from twopc, direct-xa, twopc-or"):
        _names("twopc-sorted", known, "system", ("twopc-ordered",))
    parallel = _cell("twopc", 100, [20.0] * 10)
    ordered = _cell("twopc-ordered", 150, [10.0, 30.0] * 5)
    ordered.tally.attempts = 200  # 50 did not commit
    direct = _cell("direct-xa", 600, [4.0] * 10)
    (row,) = order_rows([c.as_json() for c in (parallel, ordered, direct)])
    assert row == [
        "transfer2", "0", "8", "300", "50", "75", "-", "0.17", "0.25", "-",
        "20.0 / 20.0", "20.0 / 30.0", "-", "0.0 / 25.0 / -",
    ]  # fmt: skip
    adaptive = _cell("twopc-adaptive", 120, [15.0] * 10)
    (row,) = order_rows([c.as_json() for c in (parallel, adaptive, direct)])
    assert row[4:7] == ["50", "-", "60"]
    assert format_order_summary([parallel.as_json(), direct.as_json()]) == ""


class _FakeProxy:
    def __init__(self) -> None:
        self.faults: dict[str, dict[str, int]] = {}

    def set_fault(self, name: str, **fields: int) -> None:
        self.faults[name] = fields


def test_round_trip_goes_half_each_way_on_the_remote_links_only() -> None:
    cluster = _LinksOnly(
        [
            LinkPlan("coordinator-agent-eu", "l1", "u1"),
            LinkPlan("agent-eu-mariadb", "l2", "u2"),
            LinkPlan("client-mariadb-eu", "l3", "u3"),
            LinkPlan("client-coordinator", "l4", "u4"),
        ]
    )
    proxy = _FakeProxy()
    apply_round_trip(proxy, cluster, 50)  # type: ignore[arg-type]
    assert proxy.faults == {
        "coordinator-agent-eu": {"latency_ms": 25, "jitter_ms": 0},
        "agent-eu-mariadb": {},
        "client-mariadb-eu": {"latency_ms": 25, "jitter_ms": 0},
        "client-coordinator": {},
    }
    apply_round_trip(proxy, cluster, 5)  # type: ignore[arg-type]
    assert proxy.faults["client-mariadb-eu"] == {"latency_ms": 2, "jitter_ms": 1}  # mean 2.5
    apply_round_trip(proxy, cluster, 0)  # type: ignore[arg-type]
    assert all(fault == {} for fault in proxy.faults.values())


class _LinksOnly:
    def __init__(self, links: list[LinkPlan]) -> None:
        self.links = links


def test_summary_puts_the_systems_of_a_cell_side_by_side() -> None:
    cells = [
        _cell("twopc", 200, [10.0] * 99 + [30.0]),
        _cell("direct-xa", 800, [2.5]),
        _cell("sqla-twophase", 400, [5.0]),
        _cell("local", 1000, [1.0]),
    ]
    add_ratios(cells, Floor(client_ms=1.0, agents_ms=3.0, fsync_ms=1.0))
    rows = summary_rows([c.as_json() for c in cells])
    assert rows == [
        [
            "transfer2",
            "0",
            "8",
            "100",  # 200 committed in a 2 s window
            "400",
            "200",
            "500",
            "0.25",
            "0.50",
            "10.0 / 10.2",  # p99 interpolated between the 99th and 100th samples
            "2.5",
            "4.00",
            "2.00",
            "2.04",
            "0.0",
        ]
    ]
    table = format_summary([c.as_json() for c in cells]).splitlines()
    assert len(table) == 3
    assert table[0].startswith("| workload")


def test_summary_leaves_out_cells_without_twopc() -> None:
    assert summary_rows([_cell("direct-xa", 800, [2.5]).as_json()]) == []
