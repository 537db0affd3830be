"""The contended workloads' transactions, the way each system goes in a cell (direct at 0 ms,
through the proxy otherwise), and the contention figures: failure kinds, waited-out
transactions, the daemons' Prometheus metrics (present or not). Pure: no processes."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from twopc.testing.bench.metrics import (
    DEADLOCK,
    LOCK_WAIT_TIMEOUT,
    Scrape,
    Tally,
    contention_figures,
    contention_rows,
    failure_kind,
    histogram_quantile,
    parse_prometheus_text,
)
from twopc.testing.bench.paths import choose_paths
from twopc.testing.bench.workloads import (
    CREDIT,
    DEBIT,
    PRICE,
    WORKLOADS,
    FlashSale2Region,
    Transfer2Hot,
    make_workload,
    regions_needed,
)
from twopc.testing.playground.cluster import PARTICIPANTS_ENV, Cluster, Component, LinkPlan

REGIONS = ["eu", "us"]


# --- transfer2-hot -------------------------------------------------------------------------------


def test_hot_transfers_stay_on_the_hot_accounts_in_the_regions_order() -> None:
    workload = make_workload("transfer2-hot", REGIONS, accounts=10_000, hot_accounts=4)
    assert isinstance(workload, Transfer2Hot)
    rng = random.Random(7)
    sources, ids = set(), set()
    for _ in range(500):
        work = workload.hot_transfer_work(rng)
        assert list(work) == REGIONS  # a fixed order, whichever way the money goes
        (debit,) = [(r, s[0]) for r, s in work.items() if s[0][0] == DEBIT]
        (credit,) = [(r, s[0]) for r, s in work.items() if s[0][0] == CREDIT]
        assert debit[1][1][0] == credit[1][1][0], "the amount debited is the amount credited"
        assert 1 <= debit[1][1][0] <= 50
        sources.add(debit[0])
        ids |= {debit[1][1][1], credit[1][1][1]}
    assert sources == set(REGIONS), "money goes both ways"
    assert ids == {0, 1, 2, 3}, "every hot account and none other"


def test_hot_accounts_default_to_four_and_never_exceed_the_accounts() -> None:
    assert make_workload("transfer2-hot", REGIONS).hot_accounts == 4
    assert make_workload("transfer2-hot", REGIONS, accounts=2, hot_accounts=4).hot_accounts == 2
    with pytest.raises(ValueError, match="at least 1"):
        make_workload("transfer2-hot", REGIONS, hot_accounts=0)


# --- flash-sale-2region --------------------------------------------------------------------------


def test_a_two_region_sale_locks_the_stock_first_and_charges_the_buyer_with_the_order() -> None:
    workload = make_workload("flash-sale-2region", REGIONS, accounts=50)
    assert isinstance(workload, FlashSale2Region)
    rng = random.Random(3)
    for _ in range(100):
        work = workload.sale_work(rng)
        assert list(work) == REGIONS  # stock branch first
        lock, take = work["eu"]
        assert lock[0].endswith("FOR UPDATE")
        assert take[0].startswith("UPDATE stock")
        (charge, charge_args), (order, order_args) = work["us"]
        assert charge.startswith("UPDATE wallets")
        assert order.startswith("INSERT INTO orders")
        assert charge_args[0] == PRICE
        assert charge_args[1] == order_args[1], "the same buyer"
        assert 0 <= charge_args[1] < 50


def test_the_new_workloads_are_known_and_need_two_regions() -> None:
    assert {"transfer2-hot", "flash-sale-2region"} <= set(WORKLOADS)
    assert regions_needed(["transfer2-hot", "flash-sale-2region"]) == 2


# --- which way each system goes ------------------------------------------------------------------


def _cluster(tmp_path: Path) -> Cluster:
    components = {}
    for index, region in enumerate(REGIONS):
        for kind, port in (("mariadb", 3300), ("agent", 7200)):
            name = f"{kind}-{region}"
            components[name] = Component(
                name, kind, f"127.0.0.1:{port + index}", "", [], "", "", region=region
            )
    components["coordinator"] = Component(
        "coordinator", "coordinator", "127.0.0.1:7100", "", [], "", ""
    )
    links = [
        LinkPlan(f"{hop}-{region}", f"127.0.0.1:{base + index}", "")
        for index, region in enumerate(REGIONS)
        for hop, base in (("coordinator-agent", 9000), ("client-mariadb", 9100))
    ]
    return Cluster(tmp_path, REGIONS, components, links=links)


def test_at_0_ms_every_system_reaches_its_peers_directly(tmp_path: Path) -> None:
    paths = choose_paths(_cluster(tmp_path), 0)
    assert not paths.proxied
    assert paths.agents == {"eu": "127.0.0.1:7200", "us": "127.0.0.1:7201"}
    assert paths.databases == {"eu": "127.0.0.1:3300", "us": "127.0.0.1:3301"}
    described = paths.describe()
    assert "direct, no proxy" in described["twopc"]
    assert "direct, no proxy" in described["baselines"]


def test_with_latency_every_system_crosses_regions_through_the_proxy(tmp_path: Path) -> None:
    paths = choose_paths(_cluster(tmp_path), 50)
    assert paths.proxied
    assert paths.agents == {"eu": "127.0.0.1:9000", "us": "127.0.0.1:9001"}
    assert paths.databases == {"eu": "127.0.0.1:9100", "us": "127.0.0.1:9101"}
    assert "through the proxy" in paths.describe()["baselines"]


def test_latency_without_the_links_to_carry_it_is_refused(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    cluster.links = [link for link in cluster.links if link.name != "client-mariadb-us"]
    with pytest.raises(ValueError, match="client-mariadb-us"):
        choose_paths(cluster, 10)
    assert not choose_paths(cluster, 0).proxied


def test_the_coordinators_agent_addresses_follow_the_override(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    assert cluster.agent_addresses() == {"eu": "127.0.0.1:9000", "us": "127.0.0.1:9001"}
    direct = choose_paths(cluster, 0).agents
    cluster.components["coordinator"].env[PARTICIPANTS_ENV] = ",".join(
        f"{r}={a}" for r, a in direct.items()
    )
    assert cluster.agent_addresses() == direct
    # Already so: nothing to restart (nothing runs here; a restart would fail).
    assert cluster.use_agent_addresses(direct) is False


# --- failures, waits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("1213 Deadlock found when trying to get lock; try restarting transaction", DEADLOCK),
        ("1205 Lock wait timeout exceeded; try restarting transaction", LOCK_WAIT_TIMEOUT),
        ("branch us failed: (1205, 'Lock wait timeout exceeded')", LOCK_WAIT_TIMEOUT),
        (  # twopc's abort, as the coordinator words it (the database's message not logged)
            "participant us voted no: statement 1 failed: (1205) [database message not logged]; "
            "try restarting transaction on participant us; the transaction is rolled back",
            LOCK_WAIT_TIMEOUT,
        ),
        ("statement 1 failed: (1213) [database message not logged]", DEADLOCK),
        ("waited 12050 ms for 1.1205 s", None),
        ("aborted: deadlock victim (cycle eu -> us)", DEADLOCK),
        ("1062 Duplicate entry '1' for key 'PRIMARY'", None),
        ("OutcomeUnknown: coordinator unreachable", None),
    ],
)
def test_failure_kinds(reason: str, kind: str | None) -> None:
    assert failure_kind(reason) == kind


def test_waited_out_counts_lock_wait_timeouts_and_transactions_as_long_as_the_timeout() -> None:
    tally = Tally()
    tally.note_outcome(None, 0.01, 30.0)  # a quick commit
    tally.note_outcome(None, 30.0, 30.0)  # a commit after the whole timeout
    tally.note_outcome("1205 Lock wait timeout exceeded", 10.0, 30.0)
    tally.note_outcome("1213 Deadlock found", 0.2, 30.0)  # aborted at once: no wait
    assert (tally.waited_out, tally.lock_wait_timeouts, tally.deadlocks) == (2, 1, 1)
    other = Tally(stuck=3)
    other.note_outcome("1213 Deadlock found", 31.0, 30.0)
    merged = Tally.merged([tally, other])
    assert (merged.waited_out, merged.deadlocks, merged.stuck) == (3, 2, 3)


# --- the daemons' metrics ------------------------------------------------------------------------

COORDINATOR_PAGE = """\
# HELP twopc_deadlock_cycles_total Lock cycles found.
# TYPE twopc_deadlock_cycles_total counter
twopc_deadlock_cycles_total 5.0
twopc_deadlock_cycles_created 1.7e+09
# TYPE twopc_deadlock_victims_total counter
twopc_deadlock_victims_total{reason="cycle"} 4.0
twopc_deadlock_victims_total{reason="timeout"} 1.0
# TYPE twopc_deadlock_break_seconds histogram
twopc_deadlock_break_seconds_bucket{le="0.01"} 2.0
twopc_deadlock_break_seconds_bucket{le="0.1"} 4.0
twopc_deadlock_break_seconds_bucket{le="+Inf"} 5.0
twopc_deadlock_break_seconds_count 5.0
twopc_deadlock_break_seconds_sum 0.35
twopc_transactions_total{outcome="committed"} 1000.0
"""


def test_prometheus_text_keeps_the_watched_families_summed_over_labels() -> None:
    page = parse_prometheus_text(COORDINATOR_PAGE)
    assert page.samples == {
        "twopc_deadlock_cycles_total": 5.0,
        "twopc_deadlock_victims_total": 5.0,
        "twopc_deadlock_break_seconds_count": 5.0,
        "twopc_deadlock_break_seconds_sum": 0.35,
    }
    assert page.buckets == {"twopc_deadlock_break_seconds": {0.01: 2.0, 0.1: 4.0, math.inf: 5.0}}
    # A counter served without its _total suffix is the same figure.
    assert parse_prometheus_text("twopc_deadlock_cycles 2\n").samples == {
        "twopc_deadlock_cycles_total": 2.0
    }


def test_histogram_quantiles_interpolate_inside_the_bucket() -> None:
    buckets = {0.01: 2.0, 0.1: 4.0, math.inf: 5.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * 0.5 / 2)
    assert histogram_quantile(0.99, buckets) == 0.1  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_contention_figures_are_the_windows_differences() -> None:
    before = parse_prometheus_text(COORDINATOR_PAGE)
    after = parse_prometheus_text(
        COORDINATOR_PAGE.replace("cycles_total 5.0", "cycles_total 8.0")
        .replace('le="0.1"} 4.0', 'le="0.1"} 6.0')
        .replace('le="+Inf"} 5.0', 'le="+Inf"} 7.0')
        .replace("seconds_count 5.0", "seconds_count 7.0")
        .replace("seconds_sum 0.35", "seconds_sum 0.45")
    )
    lock_hold = parse_prometheus_text(
        "twopc_agent_branch_lock_hold_seconds_count 10\n"
        "twopc_agent_branch_lock_hold_seconds_sum 0.5\n"
    )
    agents_after = lock_hold.plus(lock_hold)  # two agents
    figures = contention_figures((before, after), (Scrape({}, {}), agents_after))
    assert figures["deadlock_cycles"] == 3.0
    assert figures["deadlock_victims"] == 0.0
    assert figures["deadlock_break"]["count"] == 2.0
    assert figures["deadlock_break"]["mean_s"] == pytest.approx(0.05)
    # Both of the window's breaks in (0.01, 0.1]: 0.01 + 0.09 * (0.99 * 2) / 2.
    assert figures["deadlock_break"]["p99_s"] == pytest.approx(0.0991)
    assert figures["agent_lock_hold"] == {"count": 20.0, "mean_s": 0.05, "p99_s": None}


def test_daemons_without_the_metrics_give_n_a_not_an_error() -> None:
    bare = parse_prometheus_text("twopc_transactions_total 3\n")
    figures = contention_figures((bare, bare), (bare, bare))
    assert figures == {
        "deadlock_cycles": None,
        "deadlock_victims": None,
        "deadlock_break": None,
        "agent_lock_hold": None,
    }
    cell = {
        "workload": "transfer2-hot",
        "rtt_ms": 0,
        "concurrency": 8,
        "system": "twopc",
        "tps": 28.6,
        "latency_ms": {"p50": 12.0, "p99": 9000.0},
        "abort_rate": 0.25,
        "deadlocks": 0,
        "lock_wait_timeouts": 3,
        "waited_out": 3,
        "stuck_at_end": 8,
        "contention": figures,
    }
    (row,) = contention_rows([cell, {**cell, "system": "direct-xa", "contention": {}}][:1])
    assert row[3:] == [
        "twopc", "29", "12.0 / 9,000.0", "25.0", "0", "3", "3", "8", "n/a / n/a", "n/a", "n/a",
    ]  # fmt: skip
    baseline = contention_rows([{**cell, "system": "direct-xa", "contention": {}}])[0]
    assert baseline[-3:] == ["n/a / n/a", "n/a", "n/a"]


def test_the_figures_read_what_prometheus_client_serves() -> None:
    # The exposition the daemons' library writes (counters with _total and _created, histograms
    # with buckets), not a hand-written page.
    from prometheus_client import (  # noqa: PLC0415 (only this test needs it)
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )

    registry = CollectorRegistry()
    cycles = Counter("twopc_deadlock_cycles", "cycles", registry=registry)
    victims = Counter("twopc_deadlock_victims", "victims", registry=registry)
    broken = Histogram(
        "twopc_deadlock_break_seconds", "break", buckets=(0.01, 0.1, 1.0), registry=registry
    )
    cycles.inc(2)
    before = parse_prometheus_text(generate_latest(registry).decode())
    cycles.inc(3)
    victims.inc(3)
    for seconds in (0.05, 0.05, 0.5):
        broken.observe(seconds)
    after = parse_prometheus_text(generate_latest(registry).decode())
    figures = contention_figures((before, after), None)
    assert figures["deadlock_cycles"] == 3.0
    assert figures["deadlock_victims"] == 3.0
    assert figures["deadlock_break"]["count"] == 3.0
    assert figures["deadlock_break"]["mean_s"] == pytest.approx(0.2)
    assert 0.1 < figures["deadlock_break"]["p99_s"] <= 1.0
    assert figures["agent_lock_hold"] is None
