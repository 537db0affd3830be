"""Admission of new transactions (coordinator.engine.admission), with fake clocks: token buckets
per identity (rate, burst, refill, isolation, overrides), the overload guard (cap, FIFO queue,
shedding at once or after ``queue_ms``, a waiter that goes away), refusals (messages, retry-after,
metrics, one log line per identity per second), the engine admitting only new transactions, the
settings, and the retry-after's round trip over gRPC metadata.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from structlog.testing import capture_logs

from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.engine.admission import (
    ANONYMOUS,
    Admission,
    OverloadGuard,
    RateLimiter,
    RateLimits,
    Shed,
    TokenBucket,
)
from coordinator.engine.states import TxState
from tests.unit.fakes import FakeClock
from tests.unit.test_engine import WRITE, make_env, scenario, until
from tests.unit.test_engine_group_requests import WORK as GROUP_WORK
from tests.unit.test_engine_group_requests import make_group
from twopc.errors import DeadlineExceeded, ResourceExhausted, TwopcError, Unavailable
from twopc.status import RETRY_AFTER_KEY, error_from_rpc, status_code, trailing_metadata


class ManualClock:
    """A clock that moves only when the test advances it; ``sleep`` waits until then."""

    def __init__(self) -> None:
        self.now = 100.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, woken))
        await woken

    @property
    def sleeping(self) -> int:
        return sum(not woken.done() for _, woken in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, woken in list(self._sleepers):
            if due <= self.now and not woken.done():
                woken.set_result(None)


# --- token buckets ----------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_one_token_per_interval() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)  # the next token in 1/rate
    assert bucket.take(0.05) == pytest.approx(0.05)  # half of it has come back
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) == pytest.approx(0.1)


def test_a_bucket_refills_to_its_burst_and_no_further() -> None:
    bucket = TokenBucket(rate=2.0, burst=2, now=0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    later = 3600.0  # an hour quiet
    assert [bucket.take(later) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take(later) > 0
    bucket.give_back(later)
    assert bucket.take(later) == 0.0


def test_identities_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(RateLimits(per_s=1.0, burst=2))
    assert [limiter.take("flood", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("flood", 0.0) == pytest.approx(1.0)
    assert limiter.take("shop", 0.0) == 0.0  # untouched by flood's
    assert limiter.take(None, 0.0) == 0.0  # a plaintext caller is one identity, anonymous
    assert limiter.take(None, 0.0) == 0.0
    assert limiter.take(None, 0.0) > 0


def test_overrides_set_an_identitys_own_rate_or_none() -> None:
    limits = RateLimits(per_s=1.0, overrides={"batch": 5.0, "ops": 0.0, ANONYMOUS: 2.0})
    limiter = RateLimiter(limits)
    assert sum(limiter.take("batch", 0.0) == 0 for _ in range(10)) == 5  # burst: 1 s worth
    assert all(limiter.take("ops", 0.0) == 0 for _ in range(1000))  # 0: no limit
    assert sum(limiter.take(None, 0.0) == 0 for _ in range(10)) == 2
    assert sum(limiter.take("other", 0.0) == 0 for _ in range(10)) == 1
    assert not RateLimits().active
    assert RateLimits(overrides={"batch": 1.0}).active


def test_full_buckets_are_forgotten_when_there_are_many() -> None:
    limiter = RateLimiter(RateLimits(per_s=1.0))
    for number in range(4096):
        limiter.take(f"caller-{number}", 0.0)
    limiter.take("late", 10.0)  # every other bucket is full again by now
    assert len(limiter) == 1


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ({"per_s": -1.0}, "rate_limit_per_s"),
        ({"per_s": float("nan")}, "rate_limit_per_s"),
        ({"burst": -1}, "rate_limit_burst"),
        ({"overrides": {"a": -2.0}}, "identity 'a'"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimits(**limits)  # type: ignore[arg-type]


# --- the overload guard -----------------------------------------------------------------------


@scenario
async def test_the_guard_admits_up_to_its_cap_and_queues_first_come_first_served() -> None:
    clock = ManualClock()
    guard = OverloadGuard(max_in_flight=2, queue_ms=100, clock=clock)
    held = [await guard.admit(), await guard.admit()]
    assert guard.in_flight == 2
    order: list[str] = []

    async def wait(name: str) -> None:
        await guard.admit()
        order.append(name)

    waiting = [asyncio.create_task(wait(n)) for n in ("first", "second")]
    await until(lambda: guard.queued == 2, "two queued")
    clock.advance(0.01)
    guard.release(held[0])
    await until(lambda: order == ["first"], "the first admitted")
    guard.release(held[1])
    await asyncio.gather(*waiting)
    assert order == ["first", "second"]
    assert (guard.in_flight, guard.queued) == (2, 0)  # slots handed over, not freed


@scenario
async def test_a_transaction_still_queued_after_queue_ms_is_shed() -> None:
    clock = ManualClock()
    guard = OverloadGuard(max_in_flight=1, queue_ms=100, clock=clock)
    await guard.admit()
    waiting = asyncio.create_task(guard.admit())
    await until(lambda: guard.queued == 1 and clock.sleeping == 1, "queued, its timer set")
    clock.advance(0.099)
    await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(0.002)
    with pytest.raises(Shed) as shed:
        await waiting
    assert shed.value.retry_after_s >= 0.1
    assert (guard.in_flight, guard.queued) == (1, 0)


@scenario
async def test_one_that_would_wait_longer_than_queue_ms_is_shed_at_once() -> None:
    clock = ManualClock()
    guard = OverloadGuard(max_in_flight=2, queue_ms=100, clock=clock)
    first = await guard.admit()
    await guard.admit()
    clock.advance(1.0)
    guard.release(first)  # held 1 s: a queued one would wait about 0.5 s per place
    await guard.admit()
    with pytest.raises(Shed) as shed:
        await guard.admit()  # no await on a timer: refused before it queues
    assert guard.queued == 0
    assert shed.value.retry_after_s == pytest.approx(0.5)
    no_queue = OverloadGuard(max_in_flight=1, queue_ms=0, clock=clock)
    await no_queue.admit()
    with pytest.raises(Shed):
        await no_queue.admit()


@scenario
async def test_a_waiter_that_goes_away_keeps_no_slot() -> None:
    clock = ManualClock()
    guard = OverloadGuard(max_in_flight=1, queue_ms=1000, clock=clock)
    held = await guard.admit()
    waiting = asyncio.create_task(guard.admit())
    await until(lambda: guard.queued == 1, "queued")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert guard.queued == 0
    guard.release(held)
    assert guard.in_flight == 0


@scenario
async def test_a_guard_without_a_cap_counts_nothing() -> None:
    guard = OverloadGuard(max_in_flight=0, queue_ms=50, clock=ManualClock())
    for _ in range(10_000):
        await guard.admit()
    assert (guard.in_flight, guard.queued) == (0, 0)


# --- refusals ---------------------------------------------------------------------------------


@scenario
async def test_refusals_say_why_when_to_retry_and_are_counted() -> None:
    clock = ManualClock()
    refused: list[str] = []
    admission = Admission(
        RateLimits(per_s=5.0, burst=1, overrides={"batch": 2.0}),
        max_in_flight=1,
        queue_ms=0,
        clock=clock,
        refused=refused.append,
    )
    await admission.admit("shop")
    with pytest.raises(ResourceExhausted) as rate:
        await admission.admit("shop")
    assert rate.value.retry_after_s == pytest.approx(0.2)
    assert rate.value.message == (
        "rate limit of identity 'shop': over 5 new transactions per second "
        "(rate_limit_per_s = 5, burst 1); retry after 200 ms (nothing was begun)"
    )
    with pytest.raises(ResourceExhausted) as shed:
        await admission.admit("batch")  # its token is given back: shedding is not its fault
    assert shed.value.message.startswith(
        "coordinator overloaded, shedding new transactions: 1 begun and undecided, 0 waiting "
        "(admission_max_in_flight = 1, admission_queue_ms = 0); retry after "
    )
    assert shed.value.retry_after_s > 0
    admission.release(clock.now)
    await admission.admit("batch")
    admission.release(clock.now)
    with pytest.raises(ResourceExhausted, match=r"its entry in rate_limits = 2"):
        await admission.admit("batch")
    assert refused == ["rate_limit", "overload", "rate_limit"]


@scenario
async def test_refusals_are_logged_once_per_identity_per_second() -> None:
    clock = ManualClock()
    admission = Admission(RateLimits(per_s=1.0), max_in_flight=0, queue_ms=0, clock=clock)
    await admission.admit("flood")
    await admission.admit("shop")
    with capture_logs() as logs:
        for _ in range(100):
            for caller in ("flood", "shop"):
                with pytest.raises(ResourceExhausted):
                    await admission.admit(caller)
            clock.advance(0.001)  # 0.1 s in all: not one token back
        clock.advance(0.95)
        await admission.admit("flood")
        with pytest.raises(ResourceExhausted):
            await admission.admit("flood")
    lines = [(e["caller"], e["refused_since_last_line"]) for e in logs]
    assert lines == [("flood", 0), ("shop", 0), ("flood", 99)]
    assert {e["event"] for e in logs} == {"transaction_refused"}
    assert {e["log_level"] for e in logs} == {"warning"}


# --- in the engine ----------------------------------------------------------------------------


@scenario
async def test_the_engine_sheds_new_transactions_only() -> None:
    env = make_env(admission_max_in_flight=1, admission_queue_ms=0)
    admitted = await env.manager.begin_request(5_000, "order-1", owner="a")
    await env.manager.execute(admitted.txid, "eu", [WRITE], 1, owner="a")
    for new in (
        env.manager.begin_request(5_000, owner="b"),
        env.manager.run([("eu", [WRITE])], timeout_ms=5_000, owner="b"),
    ):
        with pytest.raises(ResourceExhausted, match="shedding new transactions"):
            await new
    # The admitted transaction's calls are never refused, nor is a retry of its Begin.
    assert await env.manager.begin_request(5_000, "order-1", owner="a") is admitted
    await env.manager.execute(admitted.txid, "us", [WRITE], 1, owner="a")
    assert (await env.manager.lookup(admitted.txid, owner="a")).state is TxState.ACTIVE
    state = await env.manager.commit(admitted.txid, wait_for_phase2=False, owner="a")
    assert state in (TxState.COMMITTING, TxState.COMMITTED)
    # Its decision freed the slot (phase 2 holds none).
    assert env.manager.admission.in_flight == 0
    ran = await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, owner="b")
    assert ran.state is TxState.COMMITTED
    assert env.manager.admission.in_flight == 0


@scenario
async def test_an_abort_frees_the_slot_and_a_refused_begin_takes_none() -> None:
    env = make_env(
        admission_max_in_flight=2,
        admission_queue_ms=0,
        max_active_per_identity=1,
        rate_limits=RateLimits(per_s=1.0, burst=2),
    )
    first = await env.manager.begin_request(5_000, owner="a")
    with pytest.raises(ResourceExhausted, match="max_active_per_identity"):
        await env.manager.begin_request(5_000, owner="a")
    assert env.manager.admission.in_flight == 1  # the refused Begin gave its slot back
    await env.manager.rollback(first.txid, owner="a")
    assert env.manager.admission.in_flight == 0
    second = await env.manager.begin_request(5_000, owner="a")  # and its token: no time passed
    await env.manager.rollback(second.txid, owner="a")
    with pytest.raises(TwopcError):
        await env.manager.run([("nowhere", [WRITE])], timeout_ms=5_000, owner="a")
    assert env.manager.admission.in_flight == 0


@scenario
async def test_in_a_group_a_new_transaction_is_shed_before_the_store_is_read() -> None:
    group = make_group(admission_max_in_flight=1, admission_queue_ms=0)
    held = await group.c1.begin_request(5_000, "order-1", owner="a")  # claimed in the store
    group.claims.down = True  # any read of the store would fail Unavailable
    with pytest.raises(ResourceExhausted, match="shedding new transactions"):
        await group.c1.run(GROUP_WORK, timeout_ms=5_000, request_id="pay-1", owner="a")
    with pytest.raises(ResourceExhausted, match="shedding new transactions"):
        await group.c1.begin_request(5_000, "order-2", owner="a")
    assert await group.c1.begin_request(5_000, "order-1", owner="a") is held  # its retry


@scenario
async def test_a_one_phase_commit_left_in_doubt_frees_its_slot() -> None:
    env = make_env(admission_max_in_flight=1, admission_queue_ms=0)
    tx = await env.manager.begin_request(5_000, owner="a")
    await env.manager.execute(tx.txid, "eu", [WRITE], 1, owner="a")
    env.ports.fail("commit", "eu", DeadlineExceeded("deadline exceeded"), after=True)
    env.ports.fail("rollback", "eu", Unavailable("agent eu is unreachable"))
    with pytest.raises(Unavailable, match="look the outcome"):
        await env.manager.commit(tx.txid, wait_for_phase2=False, owner="a")
    assert tx.state is TxState.PREPARING  # never decided here: the agent's marker tells
    assert env.manager.admission.in_flight == 0
    await env.manager.begin_request(5_000, owner="a")


@scenario
async def test_the_engine_rate_limits_each_identity_on_its_own() -> None:
    env = make_env(rate_limits=RateLimits(per_s=1.0, burst=2), clock=FakeClock())
    for _ in range(2):
        await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, owner="flood")
    with pytest.raises(ResourceExhausted, match="rate limit of identity 'flood'") as refused:
        await env.manager.begin_request(5_000, owner="flood")
    assert refused.value.retry_after_s == pytest.approx(1.0)
    await env.manager.run([("eu", [WRITE])], timeout_ms=5_000, owner="shop")
    env.clock.advance(1.0)
    await env.manager.begin_request(5_000, owner="flood")


# --- settings ---------------------------------------------------------------------------------


def test_admission_settings_reach_the_engine(tmp_path: object) -> None:
    environ = {
        "TWOPC_COORDINATOR_INSECURE_PLAINTEXT": "true",
        "TWOPC_COORDINATOR_RATE_LIMIT_PER_S": "20",
        "TWOPC_COORDINATOR_RATE_LIMIT_BURST": "40",
        "TWOPC_COORDINATOR_RATE_LIMITS": "batch=2.5,ops=0",
        "TWOPC_COORDINATOR_ADMISSION_MAX_IN_FLIGHT": "128",
        "TWOPC_COORDINATOR_ADMISSION_QUEUE_MS": "20",
    }
    settings = load_coordinator_config(None, environ).engine_settings()
    assert settings.rate_limits == RateLimits(20.0, 40, {"batch": 2.5, "ops": 0.0})
    assert (settings.admission_max_in_flight, settings.admission_queue_ms) == (128, 20)
    default = CoordinatorConfig(insecure_plaintext=True).engine_settings()
    assert not default.rate_limits.active


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"rate_limit_per_s": -1.0}, "rate_limit_per_s"),
        ({"rate_limit_burst": -5}, "rate_limit_burst"),
        ({"rate_limits": {"batch": "fast"}}, "identity 'batch' must be a number"),
        ({"rate_limits": {"batch": -1}}, "identity 'batch'"),
        ({"admission_max_in_flight": -1}, "admission_max_in_flight"),
        ({"admission_queue_ms": 60_001}, "admission_queue_ms"),
    ],
)
def test_bad_admission_settings_are_refused(settings: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(insecure_plaintext=True, **settings)  # type: ignore[arg-type]


# --- on the wire ------------------------------------------------------------------------------


class _Refused(grpc.RpcError):
    def __init__(self, error: TwopcError) -> None:
        self._error = error

    def code(self) -> grpc.StatusCode:
        return status_code(self._error)

    def details(self) -> str:
        return self._error.message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return trailing_metadata(self._error)


def test_the_retry_after_travels_in_milliseconds_rounded_up() -> None:
    refused = ResourceExhausted("retry after 120 ms", retry_after_s=0.1201)
    assert dict(trailing_metadata(refused))[RETRY_AFTER_KEY] == "121"
    back = error_from_rpc(_Refused(refused))
    assert type(back) is ResourceExhausted
    assert back.retry_after_s == pytest.approx(0.121)
    assert back.message == "retry after 120 ms"
    plain = error_from_rpc(_Refused(ResourceExhausted("the pool is full")))
    assert plain.retry_after_s == 0.0  # type: ignore[attr-defined]
    assert RETRY_AFTER_KEY not in dict(trailing_metadata(ResourceExhausted("full")))
