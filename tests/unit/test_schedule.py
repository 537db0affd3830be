"""Fault schedules: reproducible from the seed, bounded, and aimed at the right targets."""

from __future__ import annotations

import pytest

from twopc.testing.chaos.schedule import (
    LINK_FAULTS,
    FaultKind,
    Targets,
    plan,
)

TARGETS = Targets(
    processes=("coordinator", "agent-eu", "agent-us", "mariadb-eu", "mariadb-us"),
    links=("client-coordinator", "coordinator-agent-eu", "agent-eu-mariadb"),
)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert plan(7, 300, TARGETS) == plan(7, 300, TARGETS)
    assert plan(7, 300, TARGETS) != plan(8, 300, TARGETS)


@pytest.mark.parametrize("seed", range(20))
def test_faults_are_bounded_in_number_target_and_time(seed: int) -> None:
    duration, settle, limit = 120.0, 5.0, 2
    events = plan(seed, duration, TARGETS, max_concurrent=limit, settle=settle)
    assert events, "a two-minute run gets faults"
    for event in events:
        assert event.at > 0
        assert event.ends <= duration - settle
        assert event.duration >= 0
        if event.kind in LINK_FAULTS:
            assert event.target in TARGETS.links
        else:
            assert event.target in TARGETS.processes
        if event.kind is FaultKind.FAILPOINT:
            assert not event.target.startswith("mariadb")
            assert {"name", "spec"} <= set(event.detail)
        if event.kind is FaultKind.RESET:
            assert event.duration == 0
    for event in events:
        overlapping = [e for e in events if e.at <= event.at < e.ends]
        assert len(overlapping) <= limit
        same_target = [e for e in overlapping if e.target == event.target and e is not event]
        assert not same_target, f"two faults at once on {event.target}"


def test_only_the_kinds_asked_for() -> None:
    events = plan(3, 200, TARGETS, kinds=[FaultKind.KILL, FaultKind.CUT])
    assert {e.kind for e in events} == {FaultKind.KILL, FaultKind.CUT}


def test_link_faults_need_links() -> None:
    no_links = Targets(processes=("coordinator",))
    events = plan(3, 200, no_links, kinds=[FaultKind.CUT, FaultKind.KILL])
    assert {e.kind for e in events} == {FaultKind.KILL}
    assert plan(3, 200, no_links, kinds=[FaultKind.CUT]) == []


@pytest.mark.parametrize("seed", range(30))
def test_every_schedule_kills_each_kind_of_process_cuts_a_link_and_adds_50ms(seed: int) -> None:
    events = plan(seed, 300, TARGETS)
    killed = {e.target.split("-")[0] for e in events if e.kind is FaultKind.KILL}
    assert killed == {"coordinator", "agent", "mariadb"}
    assert any(e.kind is FaultKind.CUT for e in events)
    assert any(e.kind is FaultKind.LATENCY and e.detail["latency_ms"] == 50 for e in events)


GROUP = Targets(
    processes=(
        "coordinator",
        "coordinator-2",
        "coordinator-3",
        "agent-eu",
        "mariadb-eu",
        "store-1",
        "store-2",
        "store-3",
    ),
    links=("coordinator-agent-eu", "coordinator-store", "coordinator-2-store"),
)


@pytest.mark.parametrize("seed", range(10))
def test_a_group_schedule_kills_a_store_node_and_slows_a_members_clock(seed: int) -> None:
    events = plan(seed, 300, GROUP)
    killed = {e.target for e in events if e.kind is FaultKind.KILL}
    assert any(t.startswith("store-") for t in killed)
    slowed = [e for e in events if e.kind is FaultKind.SLOW_CLOCK]
    assert slowed
    assert all(e.target.startswith("coordinator") for e in slowed)
    failpoints = [e for e in events if e.kind is FaultKind.FAILPOINT]
    assert not any(e.target.startswith(("store-", "mariadb")) for e in failpoints)
    on_store = [e for e in events if e.target.startswith("store-")]
    for one in on_store:  # never two store nodes at once: the store would lose its quorum
        assert not [
            e for e in on_store if e is not one and e.at < one.ends + 0.5 and one.at < e.ends + 0.5
        ]


def test_one_coordinator_gets_no_slowed_clock() -> None:
    """A slowed clock tests that a lease does not trust one member's clock: without a peer to
    take the id over there is nothing to test."""
    events = plan(1, 300, TARGETS, kinds=(FaultKind.SLOW_CLOCK, FaultKind.KILL))
    assert events
    assert not [e for e in events if e.kind is FaultKind.SLOW_CLOCK]


def test_every_fault_kind_has_a_colour_on_the_timeline() -> None:
    from twopc.testing.chaos.report import _COLOURS  # noqa: PLC0415

    assert set(_COLOURS) == set(FaultKind)
