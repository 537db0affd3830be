"""Lock cycles across participants: the graph, the cycles, the victims (pure), and the engine's
side: a victim is aborted even mid-prepare, with the retryable error, and a decided transaction
is never touched."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.engine.deadlocks import DeadlockDetector, WaitEdge, find_victims
from coordinator.engine.ports import NoMetrics
from coordinator.engine.states import TxState
from tests.unit.test_engine import WRITE, make_env, scenario
from twopc.errors import TransactionConflict


def edge(waiter: str, holder: str, where: str = "eu", ms: int = 10) -> WaitEdge:
    return WaitEdge(waiter, holder, where, ms)


def test_no_cycle_no_victim() -> None:
    edges = [edge("a", "b"), edge("b", "c"), edge("a", "c", "us")]
    assert find_victims(edges, {"a": 1, "b": 2, "c": 3}) == []


def test_two_region_cycle_aborts_the_youngest() -> None:
    edges = [edge("t1", "t2", "us", 40), edge("t2", "t1", "eu", 7)]
    [(cycle, victim)] = find_victims(edges, {"t1": 1.0, "t2": 2.0})
    assert victim == "t2"
    assert set(cycle.txids) == {"t1", "t2"}
    assert cycle.youngest_wait_ms == 7
    assert "t1 waits on t2 in us" in cycle.describe()
    # The other way round in age: the other victim.
    [(_, victim)] = find_victims(edges, {"t1": 3.0, "t2": 2.0})
    assert victim == "t1"


def test_a_tie_in_age_goes_to_the_larger_txid() -> None:
    [(_, victim)] = find_victims([edge("a", "b"), edge("b", "a")], {"a": 1.0, "b": 1.0})
    assert victim == "b"


def test_every_cycle_is_broken_and_one_victim_breaks_two() -> None:
    # x is in both a-x and x-c cycles; being the youngest it breaks both at once.
    edges = [edge("a", "x"), edge("x", "a"), edge("x", "c"), edge("c", "x"), edge("d", "e")]
    edges += [edge("e", "f"), edge("f", "d")]  # a third cycle of three, apart
    found = find_victims(edges, {"a": 1, "c": 2, "x": 9, "d": 3, "e": 5, "f": 4})
    assert sorted(victim for _, victim in found) == ["e", "x"]


def test_unknown_holders_and_outsiders_are_never_victims() -> None:
    # "" is a holder the agent cannot name (a detached prepared branch): no cycle through it.
    assert find_victims([edge("a", ""), edge("b", "a")], {"a": 1, "b": 2}) == []
    # A cycle of another coordinator's transactions only: reported, with no victim.
    found = find_victims([edge("o1", "o2"), edge("o2", "o1")], {})
    assert [victim for _, victim in found] == [""]
    # A victim already being aborted: its cycle gets no second victim.
    assert find_victims([edge("a", "b"), edge("b", "a")], {"a": 1}, breaking={"b"}) == []


def test_the_oldest_of_a_long_cycle_survives() -> None:
    ring = [edge(f"t{i}", f"t{(i + 1) % 6}", "eu" if i % 2 else "us") for i in range(6)]
    begun = {f"t{i}": float(i) for i in range(6)}
    [(cycle, victim)] = find_victims(ring, begun)
    assert victim == "t5"
    assert len(cycle.edges) == 6


@scenario
async def test_a_preparing_victim_is_aborted_even_when_every_branch_prepared() -> None:
    """The detector marks the victim before the votes are counted: the decider aborts it with
    the retryable error, and the rollbacks reach every branch; nothing is logged."""
    env = make_env(["eu", "us"])
    old = env.manager.begin(5_000)
    env.clock.now += 1
    gate = env.ports.hold("prepare", "us")
    running = asyncio.create_task(
        env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000)
    )
    await gate.entered.wait()
    [young] = [tx for tx in env.manager.live_transactions() if tx.txid != old.txid]
    assert young.state is TxState.PREPARING
    env.clock.now += 0.05
    participants, begun, breaking = env.manager.waiting(0.005)
    assert participants == {"eu", "us"}
    assert set(begun) == {young.txid}  # old has no call in flight: it waits for nothing
    assert breaking == set()
    assert env.manager.break_deadlock(young.txid, "the cycle", 0.01)
    assert not env.manager.break_deadlock(young.txid, "again", 0.01)  # once only
    gate.release()  # the held prepare answers PREPARED after all
    with pytest.raises(TransactionConflict, match="the cycle"):
        await running
    await env.drain()
    assert env.log.attempts == []
    assert {c.participant for c in env.ports.calls_of("rollback")} == {"eu", "us"}


@scenario
async def test_a_transaction_whose_votes_are_counted_is_never_a_victim() -> None:
    env = make_env(["eu", "us"])
    gate = env.log.hold_next_commit()
    running = asyncio.create_task(
        env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000)
    )
    await gate.entered.wait()
    [tx] = env.manager.live_transactions()
    assert tx.tallied
    assert not env.manager.break_deadlock(tx.txid, "too late", 0.01)
    gate.release()
    outcome = await running
    assert outcome.state in (TxState.COMMITTING, TxState.COMMITTED)
    assert env.ports.calls_of("rollback") == []


@scenario
async def test_an_active_victim_mid_statement_is_aborted_with_the_cycle_named() -> None:
    env = make_env(["eu", "us"])
    tx = await env.open([("eu", WRITE)])
    gate = env.ports.hold("execute", "us")
    executing = asyncio.create_task(env.manager.execute(tx.txid, "us", [WRITE], 2))
    await gate.entered.wait()
    assert env.manager.break_deadlock(tx.txid, "t waits on u in us", 0.01)
    gate.release()
    with pytest.raises(TransactionConflict, match="t waits on u in us"):
        await executing
    await env.drain()
    assert tx.state is TxState.ABORTED


@scenario
async def test_an_execute_in_flight_is_looked_for_where_it_runs() -> None:
    """An Execute on a participant the transaction has not used yet: the detector asks that
    participant (the transaction's own list does not have it before the answer)."""
    env = make_env(["eu", "us"])
    tx = await env.open([("eu", WRITE)])
    hold = env.ports.hold("execute", "us")
    executing = asyncio.create_task(env.manager.execute(tx.txid, "us", [WRITE], 2))
    await hold.entered.wait()
    assert env.manager.waiting(0.005)[0] == set()  # not for long enough yet
    env.clock.now += 0.01
    participants, begun, _ = env.manager.waiting(0.005)
    assert participants == {"us"}
    assert set(begun) == {tx.txid}
    hold.release()
    await executing
    assert env.manager.waiting(0.005) == (set(), {}, set())


@scenario
async def test_the_detector_asks_only_when_something_waits_and_breaks_the_cycle() -> None:
    env = make_env(["eu", "us"])
    detector = DeadlockDetector(
        env.ports,
        env.manager.waiting,
        env.manager.break_deadlock,
        threshold_s=0.005,
        rpc_timeout_s=1.0,
        metrics=NoMetrics(),
    )
    assert await detector.look() == 0
    assert env.ports.calls_of("waits_for") == []  # nothing in flight: no RPC at all
    t1 = await env.open([("eu", WRITE)])
    env.clock.now += 1
    t2 = await env.open([("us", WRITE)])
    hold_1 = env.ports.hold("execute", "us")
    hold_2 = env.ports.hold("execute", "eu")
    e1 = asyncio.create_task(env.manager.execute(t1.txid, "us", [WRITE], 2))
    e2 = asyncio.create_task(env.manager.execute(t2.txid, "eu", [WRITE], 2))
    await hold_1.entered.wait()
    await hold_2.entered.wait()
    env.ports.waits = {
        "us": [WaitEdge(t1.txid, t2.txid, "us", 20)],
        "eu": [WaitEdge(t2.txid, t1.txid, "eu", 10)],
    }
    env.clock.now += 0.02
    assert await detector.look() == 1
    hold_1.release()
    hold_2.release()
    await e1
    with pytest.raises(TransactionConflict):
        await e2
    await env.drain()
    assert t2.state is TxState.ABORTED
    assert t1.state is TxState.ACTIVE
