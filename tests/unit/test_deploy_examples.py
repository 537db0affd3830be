"""The example configurations in deploy/examples load as the README says."""

from __future__ import annotations

from pathlib import Path

from coordinator.config import load_coordinator_config
from participants.config import load_agent_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_coordinator_example_loads() -> None:
    config = load_coordinator_config(EXAMPLES / "coordinator.toml", environ={})
    assert dict(config.participants) == {"eu": "db-eu.internal:7201", "us": "db-us.internal:7201"}
    assert config.data_dir == Path("/var/lib/twopc/coordinator")


def test_agent_example_loads_and_the_environment_wins() -> None:
    environ = {"TWOPC_AGENT_POOL_SIZE": "64", "TWOPC_MYSQL_PASSWORD": "s3cret"}
    config = load_agent_config(EXAMPLES / "agent-eu.toml", environ=environ)
    assert (config.name, config.mysql_database, config.pool_size) == ("eu", "shop", 64)
    assert config.mysql_password(environ) == "s3cret"


def test_participants_mapping_from_the_environment() -> None:
    config = load_coordinator_config(
        None, environ={"TWOPC_COORDINATOR_PARTICIPANTS": "eu=h1:7201, us=h2:7201"}
    )
    assert dict(config.participants) == {"eu": "h1:7201", "us": "h2:7201"}
