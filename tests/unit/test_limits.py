"""The request limits (twopc.limits) and the settings that set them on each daemon."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig, load_coordinator_config
from participants.config import AgentConfig, load_agent_config
from twopc.api import twopc_pb2 as pb
from twopc.errors import InvalidArgument
from twopc.limits import DEFAULT_LIMITS, RequestLimits


def _statements(count: int, params: int = 0, sql: str = "SELECT 1") -> list[pb.Statement]:
    return [pb.Statement(sql=sql, params=[pb.Value()] * params) for _ in range(count)]


def test_a_request_at_every_limit_passes() -> None:
    limits = RequestLimits(max_statements=3, max_params=6, max_sql_length=24)
    limits.check(_statements(3, params=2), "this agent")


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        (
            _statements(4),
            "the request carries 4 statements, more than the 3 that this agent takes in one "
            "request (its max_statements setting); split the work into smaller requests",
        ),
        (_statements(2, params=4), "carries 8 parameters, more than the 6 that this agent"),
        (_statements(1, sql="S" * 25), "25 characters of SQL, more than the 24 that this agent"),
        (_statements(3, sql="SELECT 12"), "27 characters of SQL"),  # all statements together
    ],
)
def test_a_request_over_a_limit_is_refused(statements: list[pb.Statement], message: str) -> None:
    limits = RequestLimits(max_statements=3, max_params=6, max_sql_length=24)
    with pytest.raises(InvalidArgument) as caught:
        limits.check(statements, "this agent")
    assert message in caught.value.message


def test_the_defaults_and_the_daemons_agree() -> None:
    assert RequestLimits(1000, 65_535, 1024 * 1024) == DEFAULT_LIMITS
    assert CoordinatorConfig().request_limits() == DEFAULT_LIMITS
    assert AgentConfig().request_limits() == DEFAULT_LIMITS
    assert CoordinatorConfig().max_request_bytes == 16 * 1024 * 1024
    assert AgentConfig().max_request_bytes == 32 * 1024 * 1024  # above the coordinator's
    assert (AgentConfig().max_batch_txids, AgentConfig().max_timeout_ms) == (1024, 300_000)
    assert AgentConfig().max_timeout_ms == CoordinatorConfig().max_timeout_ms


def test_each_limit_is_a_setting() -> None:
    environ = {
        "TWOPC_AGENT_MAX_STATEMENTS": "5",
        "TWOPC_AGENT_MAX_PARAMS": "6",
        "TWOPC_AGENT_MAX_SQL_LENGTH": "7",
        "TWOPC_AGENT_MAX_BATCH_TXIDS": "300",
        "TWOPC_AGENT_MAX_TIMEOUT_MS": "60000",
        "TWOPC_AGENT_MAX_REQUEST_BYTES": "2097152",
    }
    agent = load_agent_config(None, environ)
    assert agent.request_limits() == RequestLimits(5, 6, 7)
    assert (agent.max_batch_txids, agent.max_timeout_ms) == (300, 60_000)
    assert agent.max_request_bytes == 2 * 1024 * 1024
    coordinator = load_coordinator_config(
        None,
        {
            "TWOPC_COORDINATOR_MAX_STATEMENTS": "8",
            "TWOPC_COORDINATOR_MAX_PARAMS": "9",
            "TWOPC_COORDINATOR_MAX_SQL_LENGTH": "10",
            "TWOPC_COORDINATOR_MAX_REQUEST_BYTES": "3145728",
        },
    )
    assert coordinator.request_limits() == RequestLimits(8, 9, 10)
    assert coordinator.max_request_bytes == 3 * 1024 * 1024


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_statements": 0}, "at least 1"),
        ({"max_params": 0}, "at least 1"),
        ({"max_batch_txids": 255}, "the coordinator commits up to 256 branches"),
        ({"max_timeout_ms": 1000}, "at most max_timeout_ms"),  # below default_timeout_ms
        ({"max_request_bytes": 1000}, "at least 1 MiB"),
    ],
)
def test_agent_limits_that_would_break_the_protocol_are_refused(
    settings: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AgentConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings", [{"max_sql_length": 0}, {"max_request_bytes": 65_536}], ids=str
)
def test_coordinator_limits_out_of_range_are_refused(settings: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least"):
        CoordinatorConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"one_shot_order": "random"}, "one_shot_order must be one of parallel, ordered, adaptive"),
        ({"one_shot_order": "adaptive", "deadlock_detect_ms": 0}, "set deadlock_detect_ms above"),
        ({"one_shot_order_hold_ms": 0}, "one_shot_order_hold_ms"),
        ({"one_shot_order_victim_pct": 0}, "one_shot_order_victim_pct"),
        ({"one_shot_order_victim_pct": 101}, "one_shot_order_victim_pct"),
    ],
)
def test_one_shot_order_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoordinatorConfig(**settings)  # type: ignore[arg-type]


def test_the_adaptive_order_reaches_the_engine_with_its_hold() -> None:
    engine = CoordinatorConfig(
        one_shot_order="adaptive", one_shot_order_hold_ms=2500, one_shot_order_victim_pct=12.5
    ).engine_settings()
    assert engine.one_shot_order == "adaptive"
    assert engine.contended_hold_s == 2.5
    assert engine.one_shot_victim_share == 0.125
