"""The engine's rules per identity, against fakes (no gRPC: the servicer hands it the identity).

A transaction belongs to its owner (another identity's txid is NotFound on every call, with an
unknown txid's message); request ids are per owner; live transactions and open branches per
participant are bounded per owner; an ACTIVE transaction idle for ``max_idle_ms`` is rolled
back. A transaction without an owner (a plaintext coordinator) is bound by none of the rules
per identity.
"""

from __future__ import annotations

import asyncio

import pytest

from coordinator.engine.states import TxState
from tests.unit.fakes import FakeClock
from tests.unit.test_engine import READ, UNKNOWN_TXID, WRITE, make_env, scenario, until
from twopc.errors import InvalidArgument, NotFound, ResourceExhausted, TransactionAborted


@scenario
async def test_another_owners_transaction_is_not_found() -> None:
    env = make_env()
    tx = env.manager.begin(5_000, owner="a")
    await env.manager.execute(tx.txid, "eu", [WRITE], 1, owner="a")
    with pytest.raises(NotFound) as unknown:
        await env.manager.execute(UNKNOWN_TXID, "eu", [WRITE], 1, owner="b")
    expected = unknown.value.message.replace(UNKNOWN_TXID, tx.txid)
    calls = [
        env.manager.execute(tx.txid, "eu", [WRITE], 2, owner="b"),
        env.manager.commit(tx.txid, wait_for_phase2=True, owner="b"),
        env.manager.rollback(tx.txid, owner="b"),
        env.manager.lookup(tx.txid, owner="b"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.message == expected
    assert env.manager.view(tx.txid).owner == "a"
    assert await env.manager.commit(tx.txid, wait_for_phase2=True, owner="a") is TxState.COMMITTED
    # Finished, it is still the owner's alone.
    assert (await env.manager.lookup(tx.txid, owner="a")).owner == "a"
    with pytest.raises(NotFound):
        await env.manager.lookup(tx.txid, owner="b")
    with pytest.raises(NotFound):
        await env.manager.execute(tx.txid, "eu", [WRITE], 2, owner="b")


@scenario
async def test_request_ids_are_per_owner() -> None:
    env = make_env()
    first = env.manager.begin(5_000, "order-1", owner="a")
    assert first.txid == "c1.r-order-1"
    other = env.manager.begin(5_000, "order-1", owner="b")
    assert other.txid != first.txid
    assert env.manager.begin(5_000, "order-1", owner="b") is other
    assert env.manager.begin(5_000, "order-1", owner="a") is first
    assert (await env.manager.lookup_request("order-1", owner="b")).txid == other.txid
    # An identity that never used it is told what an unused request id tells.
    unused = await env.manager.lookup_request("order-1", owner="c")
    assert (unused.state, unused.presumed) == (TxState.ABORTED, True)
    assert env.ports.calls == []  # and no participant was asked about the first one's
    # RunTransaction's request ids: b's work runs as its own transaction.
    ran = await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, request_id="pay-1", owner="a")
    again = await env.manager.run(
        [("us", [WRITE])], timeout_ms=5_000, request_id="pay-1", owner="b"
    )
    assert again.txid != ran.txid
    assert env.ports.indexes_of("commit", again.txid, one_phase=True)


@scenario
async def test_live_transactions_per_owner_are_bounded() -> None:
    env = make_env(max_active_per_identity=2)
    held = [env.manager.begin(5_000, owner="a") for _ in range(2)]
    with pytest.raises(ResourceExhausted, match=r"identity 'a' .*max_active_per_identity = 2"):
        env.manager.begin(5_000, owner="a")
    with pytest.raises(ResourceExhausted):
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, owner="a")
    env.manager.begin(5_000, owner="b")  # another owner is not bound by a's
    for _ in range(3):
        env.manager.begin(5_000)  # nor is a transaction without an owner
    await env.manager.rollback(held[0].txid, owner="a")
    env.manager.begin(5_000, owner="a")  # a finished one counts no more


@scenario
async def test_open_branches_per_owner_and_participant_are_bounded() -> None:
    env = make_env(max_sessions_per_identity=2)
    txs = [env.manager.begin(5_000, owner="a") for _ in range(3)]
    for tx in txs[:2]:
        await env.manager.execute(tx.txid, "eu", [READ], 1, owner="a")
    calls = len(env.ports.calls)
    with pytest.raises(ResourceExhausted, match=r"identity 'a' .*'eu'.*max_sessions_per_identity"):
        await env.manager.execute(txs[2].txid, "eu", [READ], 1, owner="a")
    assert len(env.ports.calls) == calls  # nothing was sent
    assert txs[2].state is TxState.ACTIVE  # the transaction is as it was
    await env.manager.execute(txs[2].txid, "us", [READ], 1, owner="a")  # another participant
    with pytest.raises(ResourceExhausted):  # a one-shot is checked before it begins
        await env.manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=5_000, owner="a")
    await env.manager.rollback(txs[0].txid, owner="a")
    await env.manager.execute(txs[2].txid, "eu", [READ], 2, owner="a")  # a freed branch


@scenario
async def test_an_idle_transaction_is_rolled_back() -> None:
    env = make_env(max_idle_ms=1_000)
    idle = await env.open([("eu", WRITE)], timeout_ms=60_000)
    busy = await env.open([("us", WRITE)], timeout_ms=60_000)
    env.clock.advance(0.6)
    await env.manager.execute(busy.txid, "us", [WRITE], 2)
    env.clock.advance(0.6)
    assert await env.manager.reap_expired() == 1
    assert idle.state is TxState.ABORTED
    assert "max_idle_ms" in idle.abort_reason
    assert env.ports.indexes_of("rollback", idle.txid)
    assert busy.state is TxState.ACTIVE
    with pytest.raises(TransactionAborted):
        await env.manager.execute(idle.txid, "eu", [WRITE], 2)


class ManualClock(FakeClock):
    """A clock whose sleeps end only when the test moves time past them."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        until = self.now + seconds
        for _ in range(100_000):  # bounded: a test that forgets to advance fails, not hangs
            if self.now >= until:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"a {seconds} s sleep was never let through")


ONE_SHOT = [("eu", [WRITE]), ("us", [WRITE])]


async def _behind_on_phase_2(clock: FakeClock, owner: str = "a") -> tuple[object, list[object]]:
    """An engine whose ``owner`` holds its 2 sessions on eu in two transactions whose phase 2
    on eu is held: decided, answered (early), not finished."""
    env = make_env(max_sessions_per_identity=2, clock=clock)
    gates = [env.ports.hold("commit", "eu") for _ in range(2)]
    for _ in range(2):
        outcome = await env.manager.run(ONE_SHOT, timeout_ms=5_000, owner=owner)
        assert outcome.state is TxState.COMMITTING
    return env, gates


@scenario
async def test_a_one_shot_waits_for_its_owners_phase_2_rather_than_fail() -> None:
    clock = ManualClock()
    env, gates = await _behind_on_phase_2(clock)
    third = asyncio.create_task(env.manager.run(ONE_SHOT, timeout_ms=5_000, owner="a"))
    await until(lambda: bool(clock.sleeps), "the third one-shot waits")
    prepares = len(env.ports.calls_of("prepare"))
    assert not third.done()
    gates[0].release()  # one branch on eu ends: the third is admitted
    outcome = await third
    assert outcome.state in (TxState.COMMITTING, TxState.COMMITTED)
    assert len(env.ports.calls_of("prepare")) == prepares + 2
    gates[1].release()
    await env.drain()


@scenario
async def test_a_one_shot_waits_no_longer_than_its_timeout() -> None:
    clock = ManualClock()
    env, gates = await _behind_on_phase_2(clock)
    third = asyncio.create_task(env.manager.run(ONE_SHOT, timeout_ms=1_000, owner="a"))
    await until(lambda: bool(clock.sleeps), "the third one-shot waits")
    assert clock.sleeps == [1.0]
    clock.advance(1.0)
    with pytest.raises(ResourceExhausted, match="max_sessions_per_identity = 2"):
        await third
    prepares = len(env.ports.calls_of("prepare"))
    for gate in gates:
        gate.release()
    await env.drain()
    assert len(env.ports.calls_of("prepare")) == prepares  # nothing of it ran


@scenario
async def test_open_branches_are_refused_at_once_and_only_the_owners_backlog_waits() -> None:
    clock = ManualClock()
    env, gates = await _behind_on_phase_2(clock)
    # Another identity is not held up by a's backlog.
    assert (await env.manager.run(ONE_SHOT, timeout_ms=5_000, owner="b")).state in (
        TxState.COMMITTING,
        TxState.COMMITTED,
    )
    for gate in gates:
        gate.release()
    await env.drain()
    # b now holds its two eu sessions in open transactions: no phase 2 will free them.
    for _ in range(2):
        tx = env.manager.begin(5_000, owner="b")
        await env.manager.execute(tx.txid, "eu", [WRITE], 1, owner="b")
    with pytest.raises(ResourceExhausted):
        await env.manager.run(ONE_SHOT, timeout_ms=5_000, owner="b")
    assert clock.sleeps == []  # refused without waiting


@scenario
async def test_a_one_shot_with_a_timeout_out_of_range_is_refused_before_any_wait() -> None:
    env = make_env(max_timeout_ms=60_000)
    for timeout_ms in (-1, 60_001):
        with pytest.raises(InvalidArgument, match="timeout_ms must be between 0 and 60000"):
            await env.manager.run(ONE_SHOT, timeout_ms=timeout_ms, owner="a")
    assert env.ports.calls == []


@scenario
async def test_waiting_one_shots_are_admitted_first_come_first_served() -> None:
    clock = ManualClock()
    env, gates = await _behind_on_phase_2(clock)
    third = asyncio.create_task(env.manager.run(ONE_SHOT, timeout_ms=5_000, owner="a"))
    await until(lambda: len(clock.sleeps) == 1, "the third one-shot waits")
    fourth = asyncio.create_task(env.manager.run(ONE_SHOT, timeout_ms=5_000, owner="a"))
    await until(lambda: len(clock.sleeps) == 2, "the fourth one-shot waits")
    gates[0].release()  # one session freed: the first in line takes it
    first_in = await third
    gates[1].release()
    second_in = await fourth
    order = [c.txid for c in env.ports.calls_of("prepare", "eu")]
    assert order.index(first_in.txid) < order.index(second_in.txid)
    await env.drain()
