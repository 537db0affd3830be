"""Leases on coordinator ids and the SQL decision log fenced on them, against a real MariaDB and a
real PostgreSQL: acquire, renew, release and their epochs; the store's clock deciding expiry;
a deposed writer's records refused; the race between a takeover and a batch in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

from coordinator.decision_log import (
    AuditRecord,
    CommitRecord,
    DecisionLogFenced,
    DecisionLogFull,
)
from coordinator.decision_log.leases import (
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseStoreUnavailable,
    SqlLeases,
)
from coordinator.decision_log.sql_log import (
    IDLE_IN_TRANSACTION_S,
    SqlDecisionLog,
    connect_args,
    store_url,
)
from tests.sql_stores import (
    HELD_COMMIT_IDLE_S,
    KINDS,
    CutProxy,
    Stores,
    lock_waits,
    proxy_to,
    rows,
    via,
)

T = TypeVar("T")
SHORT_MS = 300  # a lease that expires within the test
IN_FLIGHT_MS = 1500  # one that outlasts starting a batch on a loaded machine, then expires
LONG_MS = 60_000  # a lease that does not


def run(coro: Coroutine[Any, Any, T], deadline: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, deadline))


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(kind: str, sql_stores: Stores) -> str:
    return sql_stores.new_database(kind)


@pytest.fixture
def proxy(kind: str, sql_stores: Stores) -> Iterator[CutProxy]:
    with proxy_to(sql_stores.port(kind)) as made:
        yield made


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    """Waits for ``condition`` (polled), failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def expired_in_store(leases: SqlLeases, coordinator_id: str) -> None:
    async def expired() -> bool:
        return coordinator_id in {row.coordinator_id for row in await leases.expired()}

    await until(expired, f"the lease on {coordinator_id} to expire in the store")


def commit(coordinator_id: str, n: int) -> CommitRecord:
    return CommitRecord(f"{coordinator_id}.{n:08x}", ("region-a", "region-b"))


async def replay_of(url: str, lease: Lease) -> list[str]:
    log = SqlDecisionLog(url, coordinator_id=lease.coordinator_id, lease=lease)
    replay = await log.open()
    await log.close()
    return [record.txid for record in replay.open_commits]


# --- acquire, renew, release -------------------------------------------------------------------


def test_acquiring_a_free_id_gives_epoch_1_and_a_local_deadline_from_the_send(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        leases = SqlLeases(url, margin=0.2, clock=clock)
        lease = await leases.acquire("c1", "member-a", LONG_MS)
        assert (lease.coordinator_id, lease.holder, lease.epoch) == ("c1", "member-a", 1)
        assert lease.deadline == pytest.approx(clock.now + LONG_MS * 0.8 / 1000)
        assert lease.valid(clock.now)
        clock.now = lease.deadline
        assert not lease.valid(clock.now)
        [held] = await leases.held()
        assert (held.coordinator_id, held.holder, held.epoch) == ("c1", "member-a", 1)
        assert 0.9 * LONG_MS < held.remaining_ms <= LONG_MS
        assert held.expires_at == lease.expires_at
        assert await leases.expired() == []
        leases.close()

    run(scenario())
    assert rows(url, "SELECT coordinator_id, holder, epoch FROM twopc_leases") == [
        ("c1", "member-a", 1)
    ]


def test_the_local_deadline_counts_from_the_send_not_from_the_answer(
    url: str, proxy: CutProxy
) -> None:
    """The acquire's COMMIT is held on its way to the store: the answer comes late, and the
    local deadline must still count from before the request was sent."""

    async def scenario() -> None:
        leases = SqlLeases(
            via(url, proxy.port), margin=0.2, idle_in_transaction_s=HELD_COMMIT_IDLE_S
        )
        await leases.held()  # the schema check's COMMIT is not the one held
        before = time.monotonic()
        proxy.hold_commits = True
        acquiring = asyncio.create_task(leases.acquire("c1", "member-a", LONG_MS))

        async def held() -> bool:
            return proxy.commits_held == 1

        await until(held, "the acquire's COMMIT to reach the proxy")
        sent_by = time.monotonic()
        await asyncio.sleep(0.2)  # the answer comes late (a delay, not synchronization)
        proxy.release_commits()
        lease = await acquiring
        length = LONG_MS * 0.8 / 1000
        assert before + length <= lease.deadline <= sent_by + length
        leases.close()

    run(scenario())


def test_an_id_held_by_another_member_is_refused_naming_the_holder(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        await leases.acquire("c1", "member-a", LONG_MS)
        with pytest.raises(LeaseHeld, match=r"c1 is held by member-a \(epoch 1\) until ") as held:
            await leases.acquire("c1", "member-b", LONG_MS)
        assert "by the store's clock" in held.value.message
        assert [(r.holder, r.epoch) for r in await leases.held()] == [("member-a", 1)]
        leases.close()

    run(scenario())


@pytest.mark.parametrize("row", ["new", "released"])
def test_members_acquiring_a_free_id_at_once_get_one_winner(url: str, row: str) -> None:
    """Eight members race for an id, new or released (on MariaDB their INSERT IGNOREs then FOR
    UPDATEs can deadlock: the losers retry): exactly one gets the next epoch, the others are
    told who holds it."""

    async def scenario() -> None:
        members = [SqlLeases(url) for _ in range(8)]
        await members[0].held()  # the tables exist: the race is on the row, not the schema
        epoch = 1
        if row == "released":
            await members[0].release(await members[0].acquire("c1", "earlier", LONG_MS))
            epoch = 2
        results = await asyncio.gather(
            *(leases.acquire("c1", f"member-{n}", LONG_MS) for n, leases in enumerate(members)),
            return_exceptions=True,
        )
        won = [result for result in results if isinstance(result, Lease)]
        assert len(won) == 1, results
        assert won[0].epoch == epoch
        for result in results:
            if not isinstance(result, Lease):
                assert isinstance(result, LeaseHeld), result
                assert f"held by {won[0].holder} (epoch {epoch})" in result.message
        for leases in members:
            leases.close()

    run(scenario())


def test_held_and_expired_list_the_ids_by_the_store_clock(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        await leases.acquire("live", "member-a", LONG_MS)
        await leases.release(await leases.acquire("released", "member-a", LONG_MS))
        await leases.acquire("short", "member-b", SHORT_MS)
        await expired_in_store(leases, "short")
        assert [(r.coordinator_id, r.holder) for r in await leases.held()] == [("live", "member-a")]
        expired = await leases.expired()
        assert [(r.coordinator_id, r.holder, r.remaining_ms) for r in expired] == [
            ("released", "member-a", 0),
            ("short", "member-b", 0),
        ]
        leases.close()

    run(scenario())


def test_an_expired_lease_is_taken_with_the_next_epoch(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        first = await leases.acquire("c1", "member-a", SHORT_MS)
        with pytest.raises(LeaseHeld):
            await leases.acquire("c1", "member-b", SHORT_MS)
        await expired_in_store(leases, "c1")
        assert await leases.held() == []
        second = await leases.acquire("c1", "member-b", LONG_MS)
        assert (second.holder, second.epoch) == ("member-b", first.epoch + 1)
        leases.close()

    run(scenario())


def test_a_restarted_member_gets_the_next_epoch_and_its_old_incarnation_is_fenced(
    url: str,
) -> None:
    async def scenario() -> None:
        before = SqlLeases(url)
        old = await before.acquire("c1", "member-a", LONG_MS)
        old_log = SqlDecisionLog(url, coordinator_id="c1", lease=old)
        await old_log.open()
        await old_log.record_commit(commit("c1", 1))
        after = SqlLeases(url)  # the same member, restarted: its lease is still live
        new = await after.acquire("c1", "member-a", LONG_MS)
        assert new.epoch == old.epoch + 1
        with pytest.raises(DecisionLogFenced):
            await old_log.record_commit(commit("c1", 2))
        with pytest.raises(LeaseLost, match="the store shows member-a at epoch 2"):
            await before.renew(old)
        await old_log.close()
        assert await replay_of(url, new) == [commit("c1", 1).txid]
        before.close()
        after.close()

    run(scenario())


def test_renewing_keeps_the_epoch_and_keeps_others_out_past_the_first_expiry(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        lease = await leases.acquire("c1", "member-a", SHORT_MS)
        first_expiry = lease.expires_at
        ends = time.monotonic() + 3 * SHORT_MS / 1000
        while time.monotonic() < ends:
            lease = await leases.renew(lease)
            assert lease.epoch == 1
            await asyncio.sleep(SHORT_MS / 1000 / 6)  # the renewal period, not synchronization
        assert lease.expires_at > first_expiry
        with pytest.raises(LeaseHeld):
            await leases.acquire("c1", "member-b", SHORT_MS)
        leases.close()

    run(scenario())


def test_renewing_after_a_takeover_fails_even_with_a_clock_that_says_the_lease_is_live(
    url: str,
) -> None:
    stopped = FakeClock()  # member a's clock does not move: its local deadline never passes

    async def scenario() -> None:
        a = SqlLeases(url, clock=stopped)
        b = SqlLeases(url)
        old = await a.acquire("c1", "member-a", SHORT_MS)
        await expired_in_store(b, "c1")
        assert old.valid(stopped())
        with pytest.raises(LeaseLost, match="expired by the store's clock"):
            await a.renew(old)
        taken = await b.acquire("c1", "member-b", LONG_MS)
        assert taken.epoch == 2
        with pytest.raises(LeaseLost, match="taken over: the store shows member-b at epoch 2"):
            await a.renew(old)
        assert [(r.holder, r.epoch) for r in await b.held()] == [("member-b", 2)]
        a.close()
        b.close()

    run(scenario())


def test_a_lease_past_its_local_deadline_is_lost_without_asking_the_store(url: str) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        leases = SqlLeases(url, clock=clock)
        lease = await leases.acquire("c1", "member-a", LONG_MS)
        clock.now = lease.deadline + 0.001
        with pytest.raises(LeaseLost, match="passed its local deadline"):
            await leases.renew(lease)
        assert [(r.holder, r.epoch) for r in await leases.held()] == [("member-a", 1)]
        leases.close()

    run(scenario())


def test_a_release_hands_the_id_over_at_once(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        lease = await leases.acquire("c1", "member-a", LONG_MS)
        assert await leases.release(lease)
        assert [r.coordinator_id for r in await leases.expired()] == ["c1"]
        taken = await leases.acquire("c1", "member-b", LONG_MS)
        assert (taken.holder, taken.epoch) == ("member-b", 2)
        assert not await leases.release(lease)  # too late: member-b holds it
        assert [(r.holder, r.epoch) for r in await leases.held()] == [("member-b", 2)]
        leases.close()

    run(scenario())


def test_a_slow_member_clock_does_not_keep_a_lease_past_the_store_expiry(url: str) -> None:
    """Member a's clock runs 100 times slower than real time: by its own reckoning its lease
    lasts 100 times longer. The store expires it on time, a peer takes the id, and a's renew
    and writes are refused."""
    start = time.monotonic()

    def slow() -> float:
        return start + (time.monotonic() - start) / 100

    async def scenario() -> None:
        a = SqlLeases(url, clock=slow)
        b = SqlLeases(url)
        lease = await a.acquire("c1", "member-a", SHORT_MS)
        log = SqlDecisionLog(url, coordinator_id="c1", lease=lease)
        await log.open()
        await log.record_commit(commit("c1", 1))
        await expired_in_store(b, "c1")
        assert lease.valid(slow()), "the slow clock still believes in the lease"
        taken = await b.acquire("c1", "member-b", LONG_MS)
        with pytest.raises(LeaseLost):
            await a.renew(lease)
        with pytest.raises(DecisionLogFenced):
            await log.record_commit(commit("c1", 2))
        await log.close()
        assert await replay_of(url, taken) == [commit("c1", 1).txid]
        a.close()
        b.close()

    run(scenario())


def test_a_store_out_of_reach_is_unavailable_and_the_password_is_in_no_message(
    url: str, proxy: CutProxy
) -> None:
    secret = "not-in-any-message-9"

    async def scenario() -> None:
        leases = SqlLeases(via(url, proxy.port), password=secret, timeout_s=1)
        proxy.cut()
        with capture_logs() as logs, pytest.raises(LeaseStoreUnavailable) as caught:
            await leases.acquire("c1", "member-a", LONG_MS)
        assert "outcome is unknown" in caught.value.message
        assert secret not in caught.value.message
        assert secret not in repr(logs)
        assert any(entry["event"] == "lease_store_unavailable" for entry in logs)
        leases.close()

    run(scenario())


# --- the fence ---------------------------------------------------------------------------------


def test_a_deposed_writer_fails_fenced_and_nothing_of_it_is_in_the_store(url: str) -> None:
    async def scenario() -> None:
        a = SqlLeases(url)
        b = SqlLeases(url)
        lease = await a.acquire("c1", "member-a", SHORT_MS)
        log = SqlDecisionLog(url, coordinator_id="c1", lease=lease, end_flush_delay=0.001)
        await log.open()
        await log.record_commit(commit("c1", 1))
        await log.record_commit(commit("c1", 2))
        await expired_in_store(b, "c1")
        # Expired by the store's clock, not taken over yet: the holder writes nothing more.
        results = await asyncio.gather(
            *(log.record_commit(commit("c1", n)) for n in (3, 4, 5)), return_exceptions=True
        )
        for n, result in zip((3, 4, 5), results, strict=True):
            assert isinstance(result, DecisionLogFenced), result
            assert isinstance(result, DecisionLogFull)  # the transaction aborts
            assert result.txid == commit("c1", n).txid
            assert "member-a at epoch 1, expired by the store's clock" in result.message
        taken = await b.acquire("c1", "member-b", LONG_MS)
        with pytest.raises(DecisionLogFenced, match="takes no more records"):
            await log.record_commit(commit("c1", 7))
        with pytest.raises(DecisionLogFenced):
            await log.record_audit(AuditRecord(1, "admin", "drain", "", "commit", "r"))
        await log.record_end(commit("c1", 1).txid)  # dropped: the new holder re-drives it
        await log.close()
        assert await replay_of(url, taken) == [commit("c1", n).txid for n in (1, 2)]
        a.close()
        b.close()

    run(scenario())
    assert rows(url, "SELECT count(*) FROM twopc_audits") == [(0,)]


def test_opening_a_log_under_a_lease_that_was_taken_over_is_refused(url: str) -> None:
    async def scenario() -> None:
        leases = SqlLeases(url)
        old = await leases.acquire("c1", "member-a", LONG_MS)
        await leases.release(old)
        await leases.acquire("c1", "member-b", LONG_MS)
        log = SqlDecisionLog(url, coordinator_id="c1", lease=old)
        with pytest.raises(DecisionLogFenced, match="the store shows member-b at epoch 2"):
            await log.open()
        await log.close()
        leases.close()

    run(scenario())


def test_a_batch_in_flight_commits_before_the_takeover_and_its_replay_has_it(
    url: str, kind: str, proxy: CutProxy
) -> None:
    """The old holder's batch has taken the fence's lock and its COMMIT is held on the way to
    the store; a takeover starts meanwhile. The takeover must wait for the batch's lock, so that
    the new holder's replay, read after its acquire, holds the batch's record."""

    async def scenario() -> None:
        a = SqlLeases(url)
        b = SqlLeases(url)
        lease = await a.acquire("c1", "member-a", IN_FLIGHT_MS)
        log = SqlDecisionLog(
            via(url, proxy.port),
            coordinator_id="c1",
            lease=lease,
            timeout_s=HELD_COMMIT_IDLE_S,  # its COMMIT is held: no watchdog may end it
            idle_in_transaction_s=HELD_COMMIT_IDLE_S,
        )
        await log.open()
        proxy.hold_commits = True
        written = asyncio.create_task(log.record_commit(commit("c1", 1)))  # the lease is live

        async def held() -> bool:
            return proxy.commits_held == 1

        await until(held, "the batch's COMMIT to reach the proxy")
        await expired_in_store(b, "c1")  # while the batch's COMMIT is held
        takeover = asyncio.create_task(b.acquire("c1", "member-b", LONG_MS))

        async def waits_or_done() -> bool:
            return takeover.done() or await asyncio.to_thread(lock_waits, url, kind) > 0

        await until(waits_or_done, "the takeover to wait for the batch's lock (or to finish)")
        replay_then: list[str] | None = None
        if takeover.done():  # not blocked: the fence took no lock; read as the new holder would
            replay_then = await replay_of(url, takeover.result())
        proxy.release_commits()
        await written  # acknowledged to the old holder
        taken = await takeover
        assert replay_then is None, f"the takeover committed first and its replay: {replay_then}"
        assert await replay_of(url, taken) == [commit("c1", 1).txid]
        await log.close()
        a.close()
        b.close()

    run(scenario())


def test_a_takeover_in_flight_commits_before_the_batch_and_the_batch_fails_fenced(
    url: str, kind: str, proxy: CutProxy
) -> None:
    """The takeover has updated the lease row and its COMMIT is held; the old holder's batch
    starts meanwhile: its fence waits for the takeover, then sees the new epoch and fails."""

    async def scenario() -> None:
        a = SqlLeases(url)
        b = SqlLeases(  # its COMMIT is held: neither its client nor the store may give up
            via(url, proxy.port),
            timeout_s=HELD_COMMIT_IDLE_S,
            idle_in_transaction_s=HELD_COMMIT_IDLE_S,
        )
        lease = await a.acquire("c1", "member-a", SHORT_MS)
        log = SqlDecisionLog(url, coordinator_id="c1", lease=lease)
        await log.open()
        await expired_in_store(b, "c1")  # b's schema check done: its next COMMIT is the acquire's
        proxy.hold_commits = True
        takeover = asyncio.create_task(b.acquire("c1", "member-b", LONG_MS))

        async def held() -> bool:
            return proxy.commits_held == 1

        await until(held, "the takeover's COMMIT to reach the proxy")
        written = asyncio.create_task(log.record_commit(commit("c1", 1)))

        async def waits_or_done() -> bool:
            return written.done() or await asyncio.to_thread(lock_waits, url, kind) > 0

        await until(waits_or_done, "the batch to wait for the takeover's lock (or to finish)")
        proxy.release_commits()
        taken = await takeover
        with pytest.raises(DecisionLogFenced):
            await written
        assert await replay_of(url, taken) == []
        await log.close()
        a.close()
        b.close()

    run(scenario())


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_commits_during_a_takeover_are_either_replayed_or_fenced(
    url: str, round_: int
) -> None:
    """32 tasks commit without pause on the old holder while its lease expires and another
    member takes the id over: every commit acknowledged to the old holder is in the new
    holder's replay, every one refused is not, and none that started after the takeover
    returned is acknowledged."""
    cid = f"race{round_}"

    async def scenario() -> None:
        a = SqlLeases(url)
        b = SqlLeases(url)
        lease = await a.acquire(cid, "member-a", 1000)
        log = SqlDecisionLog(url, coordinator_id=cid, lease=lease, timeout_s=5)
        await log.open()
        acked: list[tuple[str, bool]] = []
        fenced: list[str] = []
        taken_over = asyncio.Event()

        async def writer(w: int) -> None:
            after = 0
            for i in range(1_000_000):
                record = commit(cid, w * 1_000_000 + i)
                after_takeover = taken_over.is_set()
                after += after_takeover
                if after > 3:
                    return  # three commits acknowledged after the takeover: the test fails
                try:
                    await log.record_commit(record)
                except DecisionLogFenced:
                    fenced.append(record.txid)
                    return
                acked.append((record.txid, after_takeover))

        writers = [asyncio.create_task(writer(w)) for w in range(32)]

        async def some_acked() -> bool:
            return len(acked) >= 64

        await until(some_acked, "64 commits acknowledged before the takeover")
        while True:
            try:
                taken = await b.acquire(cid, "member-b", LONG_MS)
                break
            except LeaseHeld:
                await asyncio.sleep(0.005)  # retrying a refused acquire, as a member would
        taken_over.set()
        await asyncio.gather(*writers)
        await log.close()
        replay = await replay_of(url, taken)
        assert [txid for txid, after in acked if after] == []
        assert len(fenced) == 32  # every writer ran into the fence
        assert set(replay) == {txid for txid, _ in acked}
        assert not set(replay) & set(fenced)
        a.close()
        b.close()

    run(scenario(), deadline=60)


def test_a_holder_paused_inside_a_store_transaction_keeps_no_takeover_out(
    url: str, kind: str
) -> None:
    """A member paused in the middle of a store transaction (SIGSTOP between its fence's
    UPDATE and its COMMIT) holds the lease row's lock; the store ends that transaction once it
    has been idle IDLE_IN_TRANSACTION_S, so that a takeover's acquire goes on, instead of
    waiting for as long as the member stays paused."""

    async def scenario() -> None:
        a, b = SqlLeases(url), SqlLeases(url)
        await a.acquire("c1", "member-a", SHORT_MS)
        engine = create_engine(
            store_url(url),
            poolclass=NullPool,
            connect_args=connect_args(postgres=kind == "postgresql", timeout_s=5),
        )
        paused = engine.connect()  # the member's connection, its transaction left open
        paused.execute(text("UPDATE twopc_leases SET epoch = epoch WHERE coordinator_id = 'c1'"))
        try:
            await expired_in_store(b, "c1")
            started = time.monotonic()
            taken = await b.acquire("c1", "member-b", LONG_MS)
            waited = time.monotonic() - started
            assert taken.epoch == 2
            assert waited < IDLE_IN_TRANSACTION_S + 3, f"the acquire waited {waited:.1f} s"
        finally:
            with contextlib.suppress(Exception):
                paused.close()
            engine.dispose()
            a.close()
            b.close()

    run(scenario(), deadline=IDLE_IN_TRANSACTION_S + 20)
