"""``twopc bench-overload``'s arithmetic: what counts as committed in a phase, whose latency
counts, and the table it prints."""

from __future__ import annotations

from twopc.testing.bench.overload import Phase, _Attempt, _summary, format_table


def test_a_phase_counts_commits_within_it_and_the_latency_of_admitted_ones() -> None:
    done = [
        _Attempt(0.0, 0.1, "committed"),
        _Attempt(0.5, 0.9, "committed"),
        _Attempt(0.9, 1.5, "committed"),  # answered after the phase: no throughput, latency yes
        _Attempt(0.2, 0.201, "refused"),  # no latency: it was not admitted
        _Attempt(0.3, 0.5, "TransactionAborted"),
    ]
    phase = _summary(Phase("shedding", 1.0), done, 0.0, 1.0, (2.0, 0.5))
    assert (phase.committed, phase.tps, phase.refused) == (2, 2.0, 1)
    assert phase.failed == {"TransactionAborted": 1}
    assert phase.p50_ms == 300.0  # of 100, 400, 600 and 200 ms
    assert phase.p99_ms is not None
    assert 590 < phase.p99_ms <= 600
    assert (phase.coordinator_cpu_s, phase.bench_cpu_s) == (2.0, 0.5)
    phase.ratio, phase.offered_per_s = 0.5, 900.0
    table = format_table([phase])
    assert "| shedding | 900/s open | 2 | 0.50 | 300.0 |" in table
    assert "TransactionAborted 1" in table
