"""The coordinator's ``identities`` setting and the agent's ``coordinator_ids``, as loaded from a
file and the environment, and the refusals they make."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.daemon import _log_identity_rules
from coordinator.identities import IdentityRules
from participants.config import AgentConfig, load_agent_config
from twopc.errors import InvalidArgument, PermissionDenied

PARTICIPANTS = {"eu": "127.0.0.1:7201", "us": "127.0.0.1:7202"}


def test_the_setting_is_a_table_of_lists(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[participants]\neu = "a:1"\nus = "b:1"\n\n[identities]\nshop = ["eu"]\nreports = ["*"]\n'
    )
    config = load_coordinator_config(path, {})
    assert config.identities == {"shop": ("eu",), "reports": ("*",)}
    overridden = load_coordinator_config(path, {"TWOPC_COORDINATOR_IDENTITIES": "shop=eu us"})
    assert overridden.identities == {"shop": ("eu", "us")}
    assert load_coordinator_config(None, {}).identities is None  # absent: open


def test_an_unknown_participant_or_a_mixed_star_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"identities\.shop names participant"):
        CoordinatorConfig(participants=PARTICIPANTS, identities={"shop": ("eu", "ap")})
    with pytest.raises(InvalidArgument, match="stands alone"):
        CoordinatorConfig(participants=PARTICIPANTS, identities={"shop": ("*", "eu")})


def test_who_may_use_what() -> None:
    rules = IdentityRules.from_setting({"shop": ["eu"], "reports": ["*"]}, PARTICIPANTS)
    rules.check_participants("shop", ["eu"])
    rules.check_participants("reports", ["eu", "us"])
    rules.check_participants(None, ["us"])  # plaintext: no identity, no rule
    with pytest.raises(PermissionDenied, match="identity 'shop' may not use participant 'us'"):
        rules.check_participants("shop", ["eu", "us"])
    with pytest.raises(PermissionDenied, match=r"identity 'other' .* identities setting"):
        rules.admit("other")
    open_rules = IdentityRules.from_setting(None, PARTICIPANTS)
    open_rules.check_participants("anyone", ["eu", "us"])


def test_an_agent_serves_c1_unless_told_otherwise(tmp_path: Path) -> None:
    assert AgentConfig().coordinator_ids == ("c1",)
    path = tmp_path / "agent.toml"
    path.write_text('coordinator_ids = ["c1", "c2"]\n')
    assert load_agent_config(path, {}).coordinator_ids == ("c1", "c2")
    with pytest.raises(ValueError, match="coordinator_ids is empty"):
        AgentConfig(coordinator_ids=())
    with pytest.raises(InvalidArgument, match="coordinator id"):
        AgentConfig(coordinator_ids=("C 1",))


def test_the_coordinator_says_at_start_who_may_use_what() -> None:
    cases = [
        (None, True, "identities_open", "info"),
        ({"shop": ("eu",)}, True, "identities", "info"),
        ({"shop": ("eu",)}, False, "identity_rules_off", "warning"),
    ]
    for identities, tls, event, level in cases:
        config = CoordinatorConfig(participants=PARTICIPANTS, identities=identities)
        with capture_logs() as logs:
            _log_identity_rules(config, tls)
        assert [(e["event"], e["log_level"]) for e in logs] == [(event, level)]
