"""Failpoints: the spec grammar, declared names, counters, every action, pause and release from
threads and tasks, and the unarmed path.

Nothing here crashes this process: ``crash`` fires only in a child process. Sleeps go to fake
sleep functions; pauses are released by the test, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from coordinator.engine.manager import EngineSettings, TransactionManager
from coordinator.engine.recovery import Recovery
from coordinator.engine.states import TxState
from participants.branches import BranchState
from tests.unit.fakes import FakeClock, FakeParticipants, InMemoryDecisionLog
from twopc.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    TransactionAborted,
    TwopcError,
    Unavailable,
)
from twopc.failpoints import (
    ENV_VAR,
    FAILPOINTS,
    SEED_ENV_VAR,
    Action,
    Failpoints,
    FailpointState,
    Term,
    parse_spec,
)

REPO = Path(__file__).resolve().parents[2]
POINT = "agent.after_prepare"
APOINT = "coordinator.before_commit_record"
DEADLINE_S = 10.0


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {DEADLINE_S} s")
        time.sleep(0.001)


async def await_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {DEADLINE_S} s")
        await asyncio.sleep(0.001)


def state(points: Failpoints, name: str) -> FailpointState:
    return next(s for s in points.snapshot() if s.name == name)


def outcomes(points: Failpoints, name: str, times: int) -> list[str]:
    """What ``times`` hits at ``name`` did: "-" nothing, else the error class raised."""
    seen = []
    for _ in range(times):
        try:
            points.hit(name)
        except TwopcError as err:
            seen.append(type(err).__name__)
        else:
            seen.append("-")
    return seen


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def points(slept: list[float]) -> Failpoints:
    async def fake_async_sleep(seconds: float) -> None:
        slept.append(seconds)

    return Failpoints(rng=random.Random(7), sleep=slept.append, async_sleep=fake_async_sleep)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def test_every_declared_name_is_hit_somewhere_and_every_hit_is_declared() -> None:
    sources = [
        REPO / "coordinator" / "engine" / "manager.py",
        REPO / "coordinator" / "engine" / "recovery.py",
        *sorted((REPO / "participants").glob("*.py")),
    ]
    used = set()
    for path in sources:
        used |= set(re.findall(r'(?:hit|_fault_at)\(\s*"([^"]+)"', path.read_text()))
        # The agent also names points as pauses of a round trip: {index: "agent.<point>"}.
        used |= set(re.findall(r'[:,=]\s*"(agent\.[a-z_]+)"', path.read_text()))
    assert used == set(FAILPOINTS)
    assert len(FAILPOINTS) == len(set(FAILPOINTS))


@pytest.mark.parametrize(
    "arm",
    [
        lambda p: p.set("coordinator.after_beginn", "crash"),
        lambda p: p.set("", "off"),
        lambda p: p.spec("agent.nowhere"),
        lambda p: Failpoints({"a": "crash"}),
        lambda p: Failpoints.from_env({ENV_VAR: "coordinator.after_begin=off;agent.typo=pause"}),
    ],
)
def test_unknown_names_are_refused_listing_the_known_ones(
    points: Failpoints, arm: Callable[[Failpoints], object]
) -> None:
    with pytest.raises(InvalidArgument, match="unknown failpoint") as caught:
        arm(points)
    assert all(name in caught.value.message for name in FAILPOINTS)


def test_snapshot_lists_every_known_point_in_order(points: Failpoints) -> None:
    points.set("agent.after_end", "2*off")
    snapshot = points.snapshot()
    assert [s.name for s in snapshot] == list(FAILPOINTS)
    assert {s.name: s.spec for s in snapshot if s.spec} == {"agent.after_end": "2*off"}
    assert points.spec("agent.after_end") == "2*off"
    assert points.spec("agent.after_commit") == ""


# --------------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "terms"),
    [
        ("", ()),
        ("   ", ()),
        ("off", (Term(Action.OFF),)),
        ("crash", (Term(Action.CRASH),)),
        ("sleep(200)", (Term(Action.SLEEP, "200"),)),
        ("pause", (Term(Action.PAUSE),)),
        ("return(unavailable)", (Term(Action.RETURN, "unavailable"),)),
        ("return(deadline)", (Term(Action.RETURN, "deadline"),)),
        ("print(hello world)", (Term(Action.PRINT, "hello world"),)),
        ("print", (Term(Action.PRINT),)),
        ("print()", (Term(Action.PRINT),)),
        ("50%3*crash", (Term(Action.CRASH, count=3, pct=50.0),)),
        ("12.5%sleep(1)", (Term(Action.SLEEP, "1", pct=12.5),)),
        ("100%off", (Term(Action.OFF, pct=100.0),)),
        (
            "2*return(unavailable)->off",
            (Term(Action.RETURN, "unavailable", count=2), Term(Action.OFF)),
        ),
        (
            " 1*pause -> 10%2*sleep(5)->print(x) ",
            (
                Term(Action.PAUSE, count=1),
                Term(Action.SLEEP, "5", count=2, pct=10.0),
                Term(Action.PRINT, "x"),
            ),
        ),
    ],
)
def test_valid_specs(spec: str, terms: tuple[Term, ...]) -> None:
    assert parse_spec(spec) == terms


@pytest.mark.parametrize(
    ("spec", "bad_term"),
    [
        ("explode", "explode"),
        ("sleep(x)", "sleep(x)"),
        ("sleep()", "sleep()"),
        ("sleep(1", "sleep(1"),
        ("sleep", "sleep"),
        ("sleep(-5)", "sleep(-5)"),
        ("sleep(\u00b2)", "sleep(\u00b2)"),
        ("sleep(1.5)", "sleep(1.5)"),
        ("\u0661*crash", "\u0661*crash"),
        ("return", "return"),
        ("return(nope)", "return(nope)"),
        ("crash(1)", "crash(1)"),
        ("pause(2)", "pause(2)"),
        ("off()", "off()"),
        ("0*crash", "0*crash"),
        ("0%crash", "0%crash"),
        ("101%crash", "101%crash"),
        ("50%", "50%"),
        ("3*", "3*"),
        ("*crash", "*crash"),
        ("%crash", "%crash"),
        ("3*50%crash", "3*50%crash"),
        ("50%%crash", "50%%crash"),
        ("-1*crash", "-1*crash"),
        ("Crash", "Crash"),
        ("crash->", ""),
        ("->crash", ""),
        ("off->->crash", ""),
        ("off->bogus(1)", "bogus(1)"),
        ("print(a->b)", "print(a"),
    ],
)
def test_parse_errors_name_the_bad_term(spec: str, bad_term: str) -> None:
    with pytest.raises(InvalidArgument, match=r"failpoint agent\.after_end: bad term") as caught:
        Failpoints().set("agent.after_end", spec)
    assert repr(bad_term) in caught.value.message
    assert repr(spec.strip()) in caught.value.message


def test_a_bad_spec_leaves_the_point_as_it_was(points: Failpoints) -> None:
    points.set(POINT, "1*off")
    with pytest.raises(InvalidArgument):
        points.set(POINT, "1*of")
    assert points.spec(POINT) == "1*off"


# --------------------------------------------------------------------------------------------------
# Semantics: counts, chains, percentages, counters
# --------------------------------------------------------------------------------------------------


def test_a_count_applies_that_many_times_then_the_next_term_takes_over(
    points: Failpoints,
) -> None:
    points.set(POINT, "2*return(unavailable)->1*return(internal)->off")
    assert outcomes(points, POINT, 6) == ["Unavailable", "Unavailable", "Internal", "-", "-", "-"]
    assert state(points, POINT) == FailpointState(POINT, points.spec(POINT), hits=6, fired=3)


def test_a_chain_that_runs_out_does_nothing(points: Failpoints) -> None:
    points.set(POINT, "1*return(aborted)")
    assert outcomes(points, POINT, 3) == ["TransactionAborted", "-", "-"]
    assert (state(points, POINT).hits, state(points, POINT).fired) == (3, 1)


def test_a_term_without_count_never_runs_out(points: Failpoints) -> None:
    points.set(POINT, "return(internal)->print(never)")
    with capture_logs() as logs:
        assert outcomes(points, POINT, 4) == ["Internal"] * 4
    assert logs == []


def test_off_counts_hits_but_never_fires(points: Failpoints) -> None:
    points.set(POINT, "off")
    assert outcomes(points, POINT, 5) == ["-"] * 5
    assert (state(points, POINT).hits, state(points, POINT).fired) == (5, 0)


def test_percentages_follow_the_seeded_random_and_keep_the_count_on_a_miss() -> None:
    seed = 20240601
    points = Failpoints(rng=random.Random(seed))
    points.set(POINT, "30%3*return(internal)->return(unavailable)")
    seen = outcomes(points, POINT, 40)
    # The same draws, replayed: a term applies when draw * 100 < pct; a miss does nothing and
    # leaves the count; after three applications the next term takes over (no more draws).
    replay, expected, left = random.Random(seed), [], 3
    for _ in range(40):
        if left == 0:
            expected.append("Unavailable")
        elif replay.random() * 100 < 30:
            left -= 1
            expected.append("Internal")
        else:
            expected.append("-")
    assert seen == expected
    assert seen.count("Internal") == 3
    assert "-" in seen, "some draws missed"
    assert state(points, POINT).fired == seen.count("Internal") + seen.count("Unavailable")
    assert state(points, POINT).hits == 40


def test_the_seed_from_the_environment_makes_runs_repeat() -> None:
    def run(seed: str) -> list[str]:
        points = Failpoints.from_env({ENV_VAR: f"{POINT}=50%return(internal)", SEED_ENV_VAR: seed})
        assert points.seed == int(seed)
        return outcomes(points, POINT, 64)

    assert run("42") == run("42")
    assert run("42") != run("43")
    with pytest.raises(InvalidArgument, match=SEED_ENV_VAR):
        Failpoints.from_env({SEED_ENV_VAR: "forty-two"})


def test_without_a_seed_one_is_drawn_and_kept() -> None:
    first, second = Failpoints(), Failpoints()
    assert isinstance(first.seed, int)
    assert first.seed != second.seed


def test_counters_survive_rearming_and_disarming(points: Failpoints) -> None:
    points.set(POINT, "1*return(internal)")
    outcomes(points, POINT, 2)
    points.set(POINT, "")
    outcomes(points, POINT, 5)  # not armed: not counted
    assert state(points, POINT) == FailpointState(POINT, "", hits=2, fired=1)
    points.set(POINT, "1*return(internal)")  # a fresh count
    assert outcomes(points, POINT, 2) == ["Internal", "-"]
    assert state(points, POINT) == FailpointState(POINT, "1*return(internal)", hits=4, fired=2)


# --------------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("unavailable", Unavailable),
        ("internal", Internal),
        ("aborted", TransactionAborted),
        ("deadline", DeadlineExceeded),
    ],
)
def test_return_raises_the_error_of_its_kind(
    points: Failpoints, kind: str, error: type[TwopcError]
) -> None:
    points.set(POINT, f"return({kind})")
    with pytest.raises(error) as caught:
        points.hit(POINT)
    assert type(caught.value) is error
    assert caught.value.message == f"failpoint {POINT} fired"
    points.set(APOINT, f"return({kind})")
    with pytest.raises(error, match=re.escape(f"failpoint {APOINT} fired")):
        asyncio.run(points.ahit(APOINT))


def test_sleep_uses_the_sleep_functions_it_was_given(
    points: Failpoints, slept: list[float]
) -> None:
    points.set(POINT, "sleep(250)")
    points.set(APOINT, "1*sleep(1500)->sleep(0)")
    points.hit(POINT)
    asyncio.run(points.ahit(APOINT))
    asyncio.run(points.ahit(APOINT))
    assert slept == [0.25, 1.5, 0.0]
    assert state(points, APOINT).fired == 2


def test_print_logs_its_message(points: Failpoints) -> None:
    points.set(POINT, "1*print(hello from the agent)->print")
    with capture_logs() as logs:
        points.hit(POINT)
        asyncio.run(points.ahit(POINT))
    printed = [e for e in logs if e["event"] == "failpoint_print"]
    assert [(e["failpoint"], e["message"]) for e in printed] == [
        (POINT, "hello from the agent"),
        (POINT, f"failpoint {POINT} fired"),
    ]
    assert state(points, POINT).fired == 2


def test_arming_is_logged_with_the_seed() -> None:
    points = Failpoints(rng=random.Random(1), seed=1)
    with capture_logs() as logs:
        points.set(POINT, "off")
        points.set(POINT, "")
        points.set(POINT, "")  # not armed: nothing to say
    assert [(e["event"], e.get("seed")) for e in logs] == [
        ("failpoint_armed", 1),
        ("failpoint_disarmed", None),
    ]


@pytest.mark.parametrize("how", ["hit", "ahit"])
def test_crash_sigkills_the_process(how: str) -> None:
    # Only ever in a child process: the point is that nothing runs after it.
    call = f"fp.hit({POINT!r})" if how == "hit" else f"asyncio.run(fp.ahit({POINT!r}))"
    code = (
        "import asyncio\n"
        "from twopc.failpoints import Failpoints\n"
        f"fp = Failpoints({{{POINT!r}: '1*crash'}})\n"
        "print('armed', flush=True)\n"
        f"{call}\n"
        "print('survived', flush=True)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert b"armed" in child.stdout
    assert b"survived" not in child.stdout


def test_from_env_bare_names_spacing_and_errors() -> None:
    env = {ENV_VAR: " coordinator.after_begin ; agent.after_end = 2*sleep(5)->off;agent.x;;"}
    with pytest.raises(InvalidArgument, match=re.escape(f"{ENV_VAR}: unknown failpoint 'agent.x'")):
        Failpoints.from_env(env)
    env = {ENV_VAR: " coordinator.after_begin ; agent.after_end = 2*sleep(5)->off;x.y=;;"}
    with pytest.raises(InvalidArgument, match=r"'x\.y'"):
        Failpoints.from_env(env)
    points = Failpoints.from_env({ENV_VAR: " coordinator.after_begin ; agent.after_end = 1*off;;"})
    assert {s.name: s.spec for s in points.snapshot() if s.spec} == {
        "coordinator.after_begin": "crash",  # a bare name crashes
        "agent.after_end": "1*off",
    }
    assert parse_spec(points.spec("coordinator.after_begin")) == (Term(Action.CRASH),)
    assert not any(s.spec for s in Failpoints.from_env({}).snapshot())
    assert not any(s.spec for s in Failpoints.from_env({ENV_VAR: " ; "}).snapshot())
    bad_spec = re.escape(f"{ENV_VAR}: failpoint agent.after_end: bad term 'bogus'")
    with pytest.raises(InvalidArgument, match=bad_spec):
        Failpoints.from_env({ENV_VAR: "agent.after_end=bogus"})


# --------------------------------------------------------------------------------------------------
# Concurrency: exact counts, pause and release
# --------------------------------------------------------------------------------------------------

THREADS = 8
HITS_PER_THREAD = 2_000


def hammer(points: Failpoints, name: str) -> int:
    """THREADS threads hit ``name`` HITS_PER_THREAD times each; returns how many raised."""
    raised = [0] * THREADS
    start = threading.Barrier(THREADS)

    def work(index: int) -> None:
        start.wait()
        for _ in range(HITS_PER_THREAD):
            try:
                points.hit(name)
            except TwopcError:
                raised[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    return sum(raised)


def test_counts_are_exact_under_eight_threads(points: Failpoints) -> None:
    points.set(POINT, "1000*return(unavailable)->off")
    assert hammer(points, POINT) == 1000
    assert state(points, POINT).hits == THREADS * HITS_PER_THREAD
    assert state(points, POINT).fired == 1000


def test_percentage_counts_are_exact_under_eight_threads(points: Failpoints) -> None:
    points.set(POINT, "25%700*return(internal)->2*return(internal)->off")
    assert hammer(points, POINT) == 702
    assert state(points, POINT).fired == 702
    assert state(points, POINT).hits == THREADS * HITS_PER_THREAD


def test_rearming_while_threads_hit_loses_no_count(points: Failpoints) -> None:
    points.set(POINT, "return(internal)")
    stop = threading.Event()

    def rearm() -> None:
        while not stop.is_set():
            points.set(POINT, "return(internal)")
            points.set(POINT, "off")

    flipper = threading.Thread(target=rearm)
    flipper.start()
    try:
        raised = hammer(points, POINT)
    finally:
        stop.set()
        flipper.join(DEADLINE_S)
    assert state(points, POINT).fired == raised
    assert state(points, POINT).hits == THREADS * HITS_PER_THREAD


@pytest.mark.parametrize("new_spec", ["", "off", "pause", "1*pause"])
def test_a_paused_thread_is_released_when_another_thread_sets_the_point(
    points: Failpoints, new_spec: str
) -> None:
    points.set(POINT, "1*pause")
    done = threading.Event()

    def paused() -> None:
        points.hit(POINT)
        done.set()

    thread = threading.Thread(target=paused)
    thread.start()
    wait_for(lambda: state(points, POINT).fired == 1, "the thread reaching the pause")
    assert not done.wait(0.05), "paused: it must not go on by itself"
    points.set(POINT, new_spec)  # from this thread, not the paused one
    assert done.wait(DEADLINE_S), "released"
    thread.join(DEADLINE_S)


def test_many_paused_threads_are_all_released(points: Failpoints) -> None:
    points.set(POINT, "pause")
    threads = [threading.Thread(target=points.hit, args=(POINT,)) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: state(points, POINT).fired == THREADS, "every thread pausing")
    assert all(t.is_alive() for t in threads)
    points.set(POINT, "")
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


def test_ahit_pause_stops_only_its_task_and_is_released_on_the_loop(points: Failpoints) -> None:
    async def scenario() -> None:
        points.set(APOINT, "1*pause")
        paused = asyncio.create_task(points.ahit(APOINT))
        await await_for(lambda: state(points, APOINT).fired == 1, "the task reaching the pause")
        # The loop goes on: other tasks run while the paused one waits.
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 20
        assert not paused.done()
        points.set(APOINT, "")  # as the admin RPC would, on the same loop
        await asyncio.wait_for(paused, DEADLINE_S)

    asyncio.run(scenario())


def test_ahit_pause_is_released_from_another_thread(points: Failpoints) -> None:
    async def scenario() -> None:
        points.set(APOINT, "pause")
        paused = [asyncio.create_task(points.ahit(APOINT)) for _ in range(3)]
        await await_for(lambda: state(points, APOINT).fired == 3, "the tasks reaching the pause")
        assert not any(t.done() for t in paused)
        setter = threading.Thread(target=points.set, args=(APOINT, "off"))
        setter.start()
        await asyncio.wait_for(asyncio.gather(*paused), DEADLINE_S)
        setter.join(DEADLINE_S)
        await points.ahit(APOINT)  # off now: passes
        assert state(points, APOINT).fired == 3

    asyncio.run(scenario())


def test_a_cancelled_paused_task_leaves_no_waiter(points: Failpoints) -> None:
    async def scenario() -> None:
        points.set(APOINT, "pause")
        paused = asyncio.create_task(points.ahit(APOINT))
        await await_for(lambda: state(points, APOINT).fired == 1, "the task reaching the pause")
        await asyncio.sleep(0)
        paused.cancel()
        with pytest.raises(asyncio.CancelledError):
            await paused
        assert points._armed[APOINT].async_waiters == []
        points.set(APOINT, "")  # nothing to wake, nothing fails

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# The unarmed path
# --------------------------------------------------------------------------------------------------


def test_unarmed_hits_touch_nothing_but_one_attribute(points: Failpoints) -> None:
    def must_not_run(name: str) -> None:
        raise AssertionError(f"_take({name!r}) on the unarmed path")

    points._take = must_not_run  # type: ignore[method-assign]
    for name in FAILPOINTS:
        points.hit(name)
        # ahit does not suspend either: the coroutine finishes on its first step.
        coroutine = points.ahit(name)
        with pytest.raises(StopIteration):
            coroutine.send(None)
    assert all(s.hits == 0 for s in points.snapshot())


def test_points_not_armed_pass_while_others_are(points: Failpoints) -> None:
    points.set("agent.after_end", "return(internal)")
    points.hit(POINT)
    asyncio.run(points.ahit(APOINT))
    assert state(points, POINT).hits == 0
    with pytest.raises(Internal):
        points.hit("agent.after_end")


# --------------------------------------------------------------------------------------------------
# The coordinator's points: return(kind) is handled as a failure of the step next to the point
# --------------------------------------------------------------------------------------------------

ENGINE_SETTINGS = EngineSettings(
    coordinator_id="c1",
    default_timeout_ms=10_000,
    max_timeout_ms=60_000,
    max_active=100,
    rpc_timeout_s=1.0,
    phase2_attempts=2,
    phase2_backoff_s=0.05,
    finished_memory=1_000,
)
WRITE = "UPDATE accounts SET balance = balance + 1 WHERE id = 1"
TWO_REGIONS = [("eu", [WRITE]), ("us", [WRITE])]


@dataclasses.dataclass
class Engine:
    ports: FakeParticipants
    log: InMemoryDecisionLog
    manager: TransactionManager
    points: Failpoints

    async def drain(self) -> None:
        while self.manager._background:
            await asyncio.gather(*list(self.manager._background), return_exceptions=True)

    def states(self, txid: str) -> set[BranchState | None]:
        return {self.ports.state(p, txid) for p in ("eu", "us")}


def engine(**specs: str) -> Engine:
    ports = FakeParticipants(("eu", "us"))
    log = InMemoryDecisionLog(ports.calls)
    points = Failpoints({f"coordinator.{k}": v for k, v in specs.items()})
    manager = TransactionManager(ENGINE_SETTINGS, ports, log, clock=FakeClock(), failpoints=points)
    return Engine(ports, log, manager, points)


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), DEADLINE_S))


def test_engine_return_before_the_commit_record_aborts_like_a_failed_log_write() -> None:
    async def scenario() -> None:
        env = engine(before_commit_record="1*return(unavailable)")
        with pytest.raises(TransactionAborted, match="before_commit_record fired") as caught:
            await env.manager.run(TWO_REGIONS, timeout_ms=5_000)
        assert env.log.attempts == []
        assert env.states(caught.value.txid) == {BranchState.ROLLED_BACK}
        outcome = await env.manager.run(TWO_REGIONS, timeout_ms=5_000)  # spent: commits
        await env.drain()
        assert env.states(outcome.txid) == {BranchState.COMMITTED}

    in_loop(scenario)


def test_engine_return_after_a_vote_aborts_and_rolls_the_prepared_branch_back() -> None:
    async def scenario() -> None:
        env = engine(mid_prepare="1*return(internal)")
        with pytest.raises(TransactionAborted, match="mid_prepare fired") as caught:
            await env.manager.run(TWO_REGIONS, timeout_ms=5_000)
        await env.drain()
        assert env.log.attempts == []
        assert env.states(caught.value.txid) == {BranchState.ROLLED_BACK}

    in_loop(scenario)


def test_engine_return_after_the_commit_record_loses_the_answer_not_the_commit() -> None:
    async def scenario() -> None:
        env = engine(after_commit_record="1*return(unavailable)")
        with pytest.raises(Unavailable, match="after_commit_record fired"):
            await env.manager.run(TWO_REGIONS, timeout_ms=5_000, request_id="lost-answer")
        await env.drain()
        txid = env.manager.request_txid("lost-answer")
        assert env.states(txid) == {BranchState.COMMITTED}
        assert env.log.ends == [txid]
        # The retried request is answered, not run again.
        again = await env.manager.run(TWO_REGIONS, timeout_ms=5_000, request_id="lost-answer")
        assert (again.txid, again.state) == (txid, TxState.COMMITTED)

    in_loop(scenario)


@pytest.mark.parametrize("point", ["mid_commit", "before_end_record"])
def test_engine_return_in_phase_2_leaves_the_commit_to_recovery(point: str) -> None:
    async def scenario() -> None:
        env = engine(**{point: "1*return(internal)"})
        outcome = await env.manager.run(TWO_REGIONS, timeout_ms=5_000, wait_for_phase2=True)
        assert outcome.state is TxState.COMMITTING
        assert env.log.ends == []
        assert env.manager.commit_record(outcome.txid) is not None
        report = await Recovery(env.manager, failpoints=env.points).run_once()
        assert report.redriven == 1
        assert env.states(outcome.txid) == {BranchState.COMMITTED}
        assert env.log.ends == [outcome.txid]

    in_loop(scenario)


def test_engine_return_in_recovery_leaves_the_record_for_the_next_pass() -> None:
    async def scenario() -> None:
        # Every branch committed, END not written: only the record's re-drive finishes it.
        env = engine(before_end_record="1*return(internal)", recovery="1*return(unavailable)")
        outcome = await env.manager.run(TWO_REGIONS, timeout_ms=5_000, wait_for_phase2=True)
        recovery = Recovery(env.manager, failpoints=env.points)
        first = await recovery.run_once()
        assert (first.redriven, first.left) == (0, 1)
        second = await recovery.run_once()
        assert second.redriven == 1
        assert env.states(outcome.txid) == {BranchState.COMMITTED}

    in_loop(scenario)


def test_engine_pause_before_the_commit_record_stalls_only_that_transaction() -> None:
    async def scenario() -> None:
        env = engine(before_commit_record="1*pause")
        stalled = asyncio.create_task(env.manager.run(TWO_REGIONS, timeout_ms=5_000))
        await await_for(
            lambda: state(env.points, "coordinator.before_commit_record").fired == 1,
            "the transaction reaching the pause",
        )
        assert not stalled.done()
        assert env.log.attempts == []
        # Another transaction goes through meanwhile (the point is spent).
        other = await env.manager.run(TWO_REGIONS, timeout_ms=5_000, wait_for_phase2=True)
        assert other.state is TxState.COMMITTED
        assert not stalled.done()
        env.points.set("coordinator.before_commit_record", "")
        outcome = await asyncio.wait_for(stalled, DEADLINE_S)
        await env.drain()
        assert env.states(outcome.txid) == {BranchState.COMMITTED}

    in_loop(scenario)
