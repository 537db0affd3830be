"""The circuit breaker per participant: its table of moves, its refusals, its settings, and how
the engine asks it (against fakes, with a fake clock: no sleeping)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import grpc
import pytest
import structlog.testing

from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.engine.breakers import (
    TRANSITIONS,
    Breaker,
    BreakerEvent,
    Breakers,
    BreakerSettings,
    BreakerState,
    Move,
    ObservedParticipants,
    is_breaker_failure,
)
from coordinator.engine.manager import EngineSettings, TransactionManager
from coordinator.metrics import CoordinatorMetrics
from tests.unit.fakes import FakeClock, FakeParticipants, InMemoryDecisionLog
from tests.unit.test_engine_group_requests import FakeClaims
from tests.unit.test_shared import FakeRpcError
from twopc.client._common import RetryPolicy, RetryTracker
from twopc.errors import (
    CircuitOpen,
    DeadlineExceeded,
    FailedPrecondition,
    Fenced,
    InvalidArgument,
    StatementFailed,
    TransactionAborted,
    TransactionConflict,
    TwopcError,
    Unavailable,
    is_transport_failure,
)
from twopc.status import error_from_rpc, trailing_metadata

SETTINGS = BreakerSettings(failures=3, window_s=10.0, open_s=2.0, probes=1)
DOWN = Unavailable("agent us is unreachable")
WRITE = "UPDATE accounts SET balance = balance + 1 WHERE id = 1"


def make(settings: BreakerSettings = SETTINGS) -> tuple[Breaker, FakeClock, list[Move]]:
    clock = FakeClock()
    moves: list[Move] = []
    return Breaker("us", settings, clock.monotonic, moves.append), clock, moves


def put_in(state: BreakerState, breaker: Breaker, clock: FakeClock) -> None:
    """Brings a fresh breaker to ``state`` through its own events."""
    if state is BreakerState.CLOSED:
        return
    for _ in range(SETTINGS.failures):
        breaker.failed("Unavailable: agent us is unreachable")
    if state is BreakerState.HALF_OPEN:
        clock.advance(SETTINGS.open_s)
        assert breaker.refusal() is None
    assert breaker.state is state


def fire(event: BreakerEvent, breaker: Breaker, clock: FakeClock) -> None:
    """Makes ``event`` happen to ``breaker``, as the engine would (TRIP outside CLOSED: a run of
    failures, each one a FAILURE there)."""
    if event is BreakerEvent.SUCCESS:
        breaker.succeeded()
    elif event is BreakerEvent.FAILURE:
        breaker.failed("DeadlineExceeded: no answer in 1.0 s")
    elif event is BreakerEvent.TRIP:
        for _ in range(SETTINGS.failures):
            breaker.failed("DeadlineExceeded: no answer in 1.0 s")
    else:
        clock.advance(SETTINGS.open_s)
        breaker.refusal()


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in BreakerState for e in BreakerEvent}


CL, OP, HO = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
S, F, T, E = (
    BreakerEvent.SUCCESS,
    BreakerEvent.FAILURE,
    BreakerEvent.TRIP,
    BreakerEvent.OPEN_ELAPSED,
)
# The table as the issue describes it, written out here so that a change to it fails a test.
EXPECTED = [
    (CL, S, CL), (CL, F, CL), (CL, T, OP), (CL, E, CL),
    (OP, S, CL), (OP, F, OP), (OP, T, OP), (OP, E, HO),
    (HO, S, CL), (HO, F, OP), (HO, T, OP), (HO, E, HO),
]  # fmt: skip


def test_the_table_is_the_expected_one() -> None:
    assert {(state, event): target for state, event, target in EXPECTED} == TRANSITIONS


@pytest.mark.parametrize(("state", "event", "target"), EXPECTED)
def test_every_state_and_event(
    state: BreakerState, event: BreakerEvent, target: BreakerState
) -> None:
    breaker, clock, moves = make()
    put_in(state, breaker, clock)
    moves.clear()
    fire(event, breaker, clock)
    assert breaker.state is target
    assert [(m.source, m.target) for m in moves] == ([] if target is state else [(state, target)])


def test_failures_open_it_only_in_a_row_and_within_the_window() -> None:
    breaker, clock, moves = make()
    breaker.failed("Unavailable: a")
    breaker.failed("Unavailable: b")
    breaker.succeeded()  # the agent answered: the count starts again
    breaker.failed("Unavailable: c")
    breaker.failed("Unavailable: d")
    assert breaker.state is BreakerState.CLOSED
    clock.advance(SETTINGS.window_s + 0.1)  # c and d are out of the window now
    breaker.failed("Unavailable: e")
    assert breaker.state is BreakerState.CLOSED
    breaker.failed("Unavailable: f")
    breaker.failed("Unavailable: g")
    assert breaker.state is BreakerState.OPEN
    assert moves == [
        Move(
            "us",
            BreakerState.CLOSED,
            BreakerState.OPEN,
            "3 failures in a row within 10000 ms",
        )
    ]


def test_an_open_breaker_refuses_with_the_reason_and_the_next_probe() -> None:
    breaker, clock, _ = make()
    put_in(BreakerState.OPEN, breaker, clock)
    clock.advance(0.5)
    refusal = breaker.refusal("c1.tx")
    assert isinstance(refusal, CircuitOpen)
    assert isinstance(refusal, Unavailable)  # UNAVAILABLE on the wire
    assert refusal.txid == "c1.tx"
    assert refusal.message == (
        "participant 'us' is failing: its circuit breaker is open after 3 failures in a row "
        "within 10000 ms (last failure: Unavailable: agent us is unreachable); new transactions "
        "touching us are refused, nothing of this one ran; the next probe is let through in "
        "1500 ms (breaker_open_ms = 2000); transactions on other participants are not affected"
    )


def test_half_open_lets_its_probes_through_then_refuses_until_an_outcome() -> None:
    breaker, clock, _ = make(dataclasses.replace(SETTINGS, probes=2))
    for _ in range(3):
        breaker.failed("Unavailable: down")
    clock.advance(SETTINGS.open_s)
    for _ in range(2):
        assert breaker.refusal() is None
        breaker.admitted()
    refusal = breaker.refusal()
    assert refusal is not None
    assert "half open (a probe is under way)" in refusal.message
    assert "in 2000 ms" in refusal.message
    # No outcome came (the probes were refused elsewhere before reaching the agent): after
    # another open period, probes go again.
    clock.advance(SETTINGS.open_s)
    assert breaker.refusal() is None


def test_a_failed_probe_reopens_it_for_another_period() -> None:
    breaker, clock, moves = make()
    put_in(BreakerState.HALF_OPEN, breaker, clock)
    breaker.admitted()
    breaker.failed("Unavailable: still down")
    assert breaker.state is BreakerState.OPEN
    assert moves[-1].reason == "a call failed while probing (Unavailable: still down)"
    clock.advance(SETTINGS.open_s - 0.01)
    refusal = breaker.refusal()
    assert refusal is not None
    assert "in 10 ms" in refusal.message
    clock.advance(0.01)
    assert breaker.refusal() is None


def test_failures_while_open_do_not_lengthen_the_open_period() -> None:
    breaker, clock, _ = make()
    put_in(BreakerState.OPEN, breaker, clock)
    clock.advance(1.5)
    breaker.failed("Unavailable: phase 2 retry")  # phase 2 keeps trying while it is open
    clock.advance(0.5)
    assert breaker.refusal() is None
    assert breaker.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (Unavailable("agent unreachable"), True),
        (Unavailable("database down: connection lost"), True),
        (DeadlineExceeded("no answer"), True),
        (StatementFailed("Duplicate entry", mysql_errno=1062), False),
        (TransactionConflict("deadlock", mysql_errno=1213), False),
        (TransactionAborted("voted no"), False),
        (Fenced("epoch superseded"), False),
        (InvalidArgument("bad statement"), False),
        (ValueError("not a twopc error"), False),
        (CircuitOpen("another coordinator's breaker"), False),
    ],
)
def test_what_counts_as_a_failure(error: BaseException, failure: bool) -> None:
    assert is_breaker_failure(error) is failure


def test_the_sdk_raises_a_refusal_at_once_without_retrying_it() -> None:
    breaker, clock, _ = make()
    put_in(BreakerState.OPEN, breaker, clock)
    refusal = breaker.refusal()
    assert refusal is not None
    metadata = trailing_metadata(refusal)
    back = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, refusal.message, metadata))
    assert type(back) is CircuitOpen
    assert not is_transport_failure(back)  # an answer: nothing lost, nothing ran
    tracker = RetryTracker(RetryPolicy(), clock.monotonic, "RunTransaction")
    assert tracker.next_delay(back) is None
    assert tracker.next_delay(Unavailable("connection refused")) is not None


def test_answers_that_are_errors_close_it_and_cancellations_tell_nothing() -> None:
    clock = FakeClock()
    breakers = Breakers(SETTINGS, clock.monotonic)
    for _ in range(3):
        breakers.observe("us", DOWN)
    assert breakers.states(["us"]) == {"us": BreakerState.OPEN}
    breakers.observe("us", asyncio.CancelledError())
    assert breakers.states(["us"]) == {"us": BreakerState.OPEN}
    breakers.observe("us", StatementFailed("Unknown column", mysql_errno=1054))
    assert breakers.states(["us", "eu"]) == {"us": BreakerState.CLOSED, "eu": BreakerState.CLOSED}


def test_calls_that_do_not_wait_for_the_agent_are_not_watched() -> None:
    """Rollback, Recover, Inspect and WaitsFor fail at once while gRPC waits to reconnect
    (also for a while after the agent is back): they tell the breaker nothing."""
    ports = FakeParticipants(("eu", "us"))
    breakers = Breakers(dataclasses.replace(SETTINGS, failures=1), FakeClock().monotonic)
    observed = ObservedParticipants(ports, breakers)

    async def body() -> None:
        ports.down.add("us")
        for call in (
            observed.rollback("us", "c1.tx", 1.0),
            observed.recover("us", "c1.", 1.0),
            observed.inspect("us", ["c1.tx"], 1.0),  # (the fake's WaitsFor never fails)
        ):
            with pytest.raises(Unavailable):
                await call
        assert breakers.states(["us"]) == {"us": BreakerState.CLOSED}
        with pytest.raises(Unavailable):
            await observed.execute("us", "c1.tx", [WRITE], 1, 1.0)
        assert breakers.states(["us"]) == {"us": BreakerState.OPEN}
        ports.down.discard("us")
        await observed.recover("us", "c1.", 1.0)
        await observed.waits_for("us", 5, 1.0)
        assert breakers.states(["us"]) == {"us": BreakerState.OPEN}
        with pytest.raises(FailedPrecondition):  # phase 2 answered, if with an error
            await observed.commit("us", "c1.tx", one_phase=False, timeout=1.0)
        assert breakers.states(["us"]) == {"us": BreakerState.CLOSED}

    run_in_loop(body)


def test_admit_asks_every_participant_before_taking_a_probe() -> None:
    clock = FakeClock()
    refused: list[str] = []
    breakers = Breakers(SETTINGS, clock.monotonic, on_refused=refused.append)
    for _ in range(3):
        breakers.observe("eu", DOWN)
    clock.advance(SETTINGS.open_s)
    for _ in range(3):
        breakers.observe("us", DOWN)
    with pytest.raises(CircuitOpen, match="participant 'us'"):
        breakers.admit(["eu", "us"])
    assert refused == ["us"]
    breakers.admit(["eu"])  # eu's probe was not taken by the refused transaction
    with pytest.raises(CircuitOpen, match=r"participant 'eu' .* half open"):
        breakers.admit(["eu"])


def test_no_breakers_with_zero_failures() -> None:
    breakers = Breakers(dataclasses.replace(SETTINGS, failures=0), FakeClock().monotonic)
    for _ in range(10):
        breakers.observe("us", DOWN)
    breakers.admit(["us"])
    assert breakers.states(["us"]) == {"us": BreakerState.CLOSED}


# --- settings ----------------------------------------------------------------------------------


def test_the_settings_reach_the_engine() -> None:
    environ = {
        "TWOPC_COORDINATOR_BREAKER_FAILURES": "7",
        "TWOPC_COORDINATOR_BREAKER_WINDOW_MS": "5000",
        "TWOPC_COORDINATOR_BREAKER_OPEN_MS": "250",
        "TWOPC_COORDINATOR_BREAKER_PROBES": "2",
    }
    engine = load_coordinator_config(None, environ).engine_settings()
    assert engine.breaker_settings() == BreakerSettings(7, 5.0, 0.25, 2)
    defaults = CoordinatorConfig().engine_settings().breaker_settings()
    assert defaults == BreakerSettings(5, 10.0, 2.0, 1) == EngineSettings("c1").breaker_settings()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"breaker_failures": -1}, "breaker_failures .* must be 0 .no breakers. or more"),
        ({"breaker_window_ms": 0}, "must be at least 1 .or set breaker_failures = 0"),
        ({"breaker_open_ms": -5}, "breaker_open_ms .-5."),
        ({"breaker_probes": 0}, "breaker_probes .0. must be at least 1"),
    ],
)
def test_bad_breaker_settings_are_refused(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoordinatorConfig(**settings)  # type: ignore[arg-type]


def test_zero_failures_turns_the_other_settings_off() -> None:
    CoordinatorConfig(breaker_failures=0, breaker_probes=0, breaker_open_ms=0)


# --- in the engine -----------------------------------------------------------------------------


def engine(**overrides: int) -> tuple[TransactionManager, FakeParticipants, FakeClock]:
    ports = FakeParticipants(("eu", "us"))
    clock = FakeClock()
    settings = EngineSettings(
        "c1",
        rpc_timeout_s=1.0,
        phase2_attempts=2,
        **{"breaker_failures": 2, "breaker_open_ms": 1000, **overrides},  # type: ignore[arg-type]
    )
    manager = TransactionManager(
        settings,
        ports,
        InMemoryDecisionLog(ports.calls),
        clock=clock,
        metrics=CoordinatorMetrics(),
    )
    return manager, ports, clock


def run_in_loop(body: Callable[[], object]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), 5.0)  # type: ignore[arg-type]

    asyncio.run(main())


def metric(manager: TransactionManager, name: str, labels: dict[str, str]) -> float | None:
    assert isinstance(manager.metrics, CoordinatorMetrics)
    return manager.metrics.registry.get_sample_value(name, labels)


def test_run_is_refused_before_anything_is_sent_and_probes_close_it() -> None:
    manager, ports, clock = engine()

    async def body() -> None:
        ports.down.add("us")
        # Two prepares fail (the rollbacks of their branches fail too, and do not count).
        for _ in range(2):
            with pytest.raises(TwopcError):
                await manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=1000)
        assert manager.breaker_states()["us"] is BreakerState.OPEN
        sent = len(ports.calls)
        with pytest.raises(CircuitOpen, match="participant 'us' is failing"):
            await manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=1000)
        assert len(ports.calls) == sent, "nothing sent to eu nor us"
        assert manager.live_count == 0
        assert (await manager.run([("eu", [WRITE])], timeout_ms=1000)).state.value == "committed"
        assert metric(manager, "twopc_breaker_fast_failures_total", {"participant": "us"}) == 1
        ports.down.discard("us")
        clock.advance(1.0)
        with structlog.testing.capture_logs() as logs:
            await manager.run([("us", [WRITE])], timeout_ms=1000)
        assert manager.breaker_states()["us"] is BreakerState.CLOSED
        moved = [e for e in logs if e["event"] == "breaker_moved"]
        assert [(e["from"], e["to"]) for e in moved] == [
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        assert all(e["participant"] == "us" and e["reason"] for e in moved)
        for to, count in (("open", 1), ("half_open", 1), ("closed", 1)):
            labels = {"participant": "us", "to": to}
            assert metric(manager, "twopc_breaker_transitions_total", labels) == count

    run_in_loop(body)


def test_the_first_execute_on_a_participant_is_refused_the_next_ones_are_not() -> None:
    manager, ports, _ = engine()

    async def body() -> None:
        tx = manager.begin(5000)
        await manager.execute(tx.txid, "us", [WRITE], 1)
        ports.down.add("us")
        for _ in range(2):
            with pytest.raises(TwopcError):
                await manager.run([("us", [WRITE])], timeout_ms=1000)
        assert manager.breaker_states()["us"] is BreakerState.OPEN
        with pytest.raises(CircuitOpen, match="participant 'us' is failing"):
            await manager.execute(manager.begin(5000).txid, "us", [WRITE], 1)
        # tx touched us before it opened: its next statement goes (and fails on its own).
        with pytest.raises(TwopcError) as failed:
            await manager.execute(tx.txid, "us", [WRITE], 2)
        assert "circuit breaker" not in failed.value.message

    run_in_loop(body)


def test_phase2_of_a_decided_commit_is_not_refused_and_closes_it() -> None:
    manager, ports, _ = engine(breaker_failures=1)

    async def body() -> None:
        ports.fail("commit", "us", DOWN, times=2)  # phase 2 to us fails twice
        outcome = await manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=1000)
        assert outcome.state.value == "committing"
        while manager._background:
            await asyncio.gather(*list(manager._background), return_exceptions=True)
        assert manager.breaker_states()["us"] is BreakerState.OPEN
        assert manager.in_doubt_count == 1
        assert manager.open_commits_to_drive()
        assert await manager.redrive(manager.open_commits_to_drive()[0])  # not refused
        assert manager.in_doubt_count == 0
        assert manager.breaker_states()["us"] is BreakerState.CLOSED  # the agent answered

    run_in_loop(body)


def test_a_request_id_is_answered_before_the_breaker_and_a_refusal_unclaims_it() -> None:
    ports = FakeParticipants(("eu", "us"))
    claims = FakeClaims()
    members = [
        TransactionManager(
            EngineSettings(coordinator_id, breaker_failures=1),
            ports,
            InMemoryDecisionLog(),
            clock=FakeClock(),
            claims=claims,
        )
        for coordinator_id in ("c1", "c2")
    ]
    work = [("eu", [WRITE]), ("us", [WRITE])]

    async def body() -> None:
        c1, c2 = members
        done = await c1.run(work, timeout_ms=1000, request_id="pay-1", owner="a")
        ports.down.add("us")
        with pytest.raises(TwopcError):
            await c1.run([("us", [WRITE])], timeout_ms=1000)
        with pytest.raises(TwopcError):
            await c2.run([("us", [WRITE])], timeout_ms=1000)
        assert c1.breaker_states()["us"] is BreakerState.OPEN
        assert c2.breaker_states()["us"] is BreakerState.OPEN
        # The retries of a request that ran get its outcome, here and on another member.
        again = await c1.run(work, timeout_ms=1000, request_id="pay-1", owner="a")
        assert again.txid == done.txid
        elsewhere = await c2.run(work, timeout_ms=1000, request_id="pay-1", owner="a")
        assert elsewhere.txid == done.txid
        # A new request is refused, and its claim dropped: a retry elsewhere is not sent here.
        with pytest.raises(CircuitOpen) as refusal:
            await c1.run(work, timeout_ms=1000, request_id="pay-2", owner="a")
        assert refusal.value.txid == "c1.r-pay-2"
        assert await claims.claimed("a", "pay-2") is None

    run_in_loop(body)


def test_a_retry_of_a_request_running_here_joins_it_open_breaker_or_not() -> None:
    manager, ports, _ = engine(breaker_failures=1)

    async def body() -> None:
        gate = ports.hold("prepare", "us")
        first = asyncio.ensure_future(
            manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=1000, request_id="pay-3")
        )
        await gate.entered.wait()
        manager._breakers.observe("us", DOWN)  # another transaction's call failed meanwhile
        assert manager.breaker_states()["us"] is BreakerState.OPEN
        retry = asyncio.ensure_future(
            manager.run([("eu", [WRITE]), ("us", [WRITE])], timeout_ms=1000, request_id="pay-3")
        )
        gate.release()
        outcomes = await asyncio.gather(first, retry)
        assert {o.txid for o in outcomes} == {"c1.r-pay-3"}
        assert all(o.state.value in ("committed", "committing") for o in outcomes)
        assert len(ports.calls_of("prepare", txid="c1.r-pay-3")) == 2  # once on each, not twice

    run_in_loop(body)


def test_a_refusal_after_a_lost_try_is_no_answer_about_the_request() -> None:
    """The SDK's RunTransaction whose first try's answer was lost, its retry refused by a
    breaker: that first try may have run, so the client must not learn "nothing ran"."""
    clock = FakeClock()
    tracker = RetryTracker(RetryPolicy(), clock.monotonic, "RunTransaction")
    lost = Unavailable("connection reset")
    assert tracker.next_delay(lost) is not None
    refusal = CircuitOpen("participant 'us' is failing: ...", txid="c1.r-pay")
    assert tracker.next_delay(refusal) is None
    final = tracker.final(refusal)
    assert type(final) is Unavailable
    assert is_transport_failure(final)  # RunTransaction raises OutcomeUnknown with its request id
    assert "an earlier try of this request got no answer" in final.message
    assert final.txid == "c1.r-pay"
    first_try = RetryTracker(RetryPolicy(), clock.monotonic, "RunTransaction")
    assert first_try.next_delay(refusal) is None
    assert first_try.final(refusal) is refusal
