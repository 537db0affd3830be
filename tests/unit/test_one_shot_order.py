"""The order of one-shot prepares: fixed, or adaptive on the share of deadlock victims."""

from __future__ import annotations

import pytest

from coordinator.engine.one_shot_order import OneShotOrder, Switch


def run(order: OneShotOrder, now: float, count: int, victims: int = 0) -> list[bool]:
    """``count`` one-shot transactions prepared at ``now``, ``victims`` of them aborted."""
    chosen = [order.choose(now)[0] for _ in range(count)]
    for _ in range(victims):
        order.victim()
    return chosen


@pytest.mark.parametrize(("mode", "ordered"), [("parallel", False), ("ordered", True)])
def test_a_fixed_order_never_changes(mode: str, ordered: bool) -> None:
    order = OneShotOrder(mode)
    assert run(order, 0.0, 50, victims=50) == [ordered] * 50
    assert order.choose(5.0) == (ordered, None)


def test_unknown_orders_are_refused() -> None:
    with pytest.raises(ValueError, match="parallel, ordered, adaptive"):
        OneShotOrder("sorted")


def test_adaptive_orders_once_victims_reach_their_share_and_goes_back_after_the_hold() -> None:
    order = OneShotOrder("adaptive", hold_s=10.0, victim_share=0.05)
    assert run(order, 0.0, 100, victims=4) == [False] * 100  # 4 %: below the share
    assert order.choose(1.0) == (False, None)  # the window measured 101: no switch
    run(order, 1.5, 99, victims=5)  # 5 of 100 in this window
    assert order.choose(2.1) == (True, Switch(True, 5, 100))
    assert run(order, 5.0, 50, victims=3) == [True] * 50  # ordered: not measured
    assert order.choose(12.0) == (True, None)
    assert order.choose(12.2) == (False, Switch(False))  # the hold is over
    assert order.choose(12.3) == (False, None)


def test_adaptive_needs_a_window_and_a_sample() -> None:
    order = OneShotOrder("adaptive", victim_share=0.05, window_s=1.0, min_sample=20)
    run(order, 0.0, 10, victims=10)
    assert order.choose(5.0) == (False, None)  # 11 transactions: too few to judge
    assert run(order, 5.0, 9) == [False] * 9  # 20 now
    assert order.choose(5.1) == (True, Switch(True, 10, 20))
    fresh = OneShotOrder("adaptive", victim_share=0.05, window_s=1.0, min_sample=20)
    run(fresh, 0.0, 40, victims=40)
    assert fresh.choose(0.5) == (False, None)  # a sample, but not a second of it yet
