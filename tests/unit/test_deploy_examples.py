"""The example configurations in deploy/examples load as the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from participants.config import AgentConfig, load_agent_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_coordinator_example_loads() -> None:
    config = load_coordinator_config(EXAMPLES / "coordinator.toml", environ={})
    assert dict(config.participants) == {"eu": "db-eu.internal:7201", "us": "db-us.internal:7201"}
    assert config.data_dir == Path("/var/lib/twopc/coordinator")
    assert (config.tls_cert, config.tls_ca) == (
        Path("/etc/twopc/tls/coordinator.pem"),
        Path("/etc/twopc/tls/ca.pem"),
    )
    assert (config.insecure_plaintext, config.admin_identities) == (False, ("ops",))


def test_agent_example_loads_and_the_environment_wins() -> None:
    environ = {"TWOPC_AGENT_POOL_SIZE": "64", "TWOPC_MYSQL_PASSWORD": "s3cret"}
    config = load_agent_config(EXAMPLES / "agent-eu.toml", environ=environ)
    assert (config.name, config.mysql_database, config.pool_size) == ("eu", "shop", 64)
    assert config.tls_key == Path("/etc/twopc/tls/agent-eu.key")
    assert (config.insecure_plaintext, config.coordinator_identities) == (False, ("coordinator",))
    assert config.mysql_password(environ) == "s3cret"


def test_participants_mapping_from_the_environment() -> None:
    config = load_coordinator_config(
        None, environ={"TWOPC_COORDINATOR_PARTICIPANTS": "eu=h1:7201, us=h2:7201"}
    )
    assert dict(config.participants) == {"eu": "h1:7201", "us": "h2:7201"}


@pytest.mark.parametrize(
    ("command", "lock_wait", "read"), [(10.0, 10, 120.0), (5.0, 10, 120.0), (130.0, 10, 120.0)]
)
def test_command_timeout_must_outlast_a_lock_wait_and_not_the_read_timeout(
    command: float, lock_wait: int, read: float
) -> None:
    with pytest.raises(ValueError, match="mysql_command_timeout_s"):
        AgentConfig(
            mysql_command_timeout_s=command,
            lock_wait_timeout_s=lock_wait,
            mysql_read_timeout_s=read,
        )


def test_ci_runs_the_setup_then_exactly_the_test_command_the_readme_gives() -> None:
    root = EXAMPLES.parents[1]
    readme = (root / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    readme_command = section.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    commands = [
        line.strip()
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["deploy/setup.sh", readme_command]


def test_statement_schemas_default_to_the_agents_database_and_come_from_the_environment() -> None:
    assert AgentConfig(mysql_database="shop").statement_schemas == ("shop",)
    environ = {"TWOPC_AGENT_MYSQL_DATABASE": "shop", "TWOPC_AGENT_SCHEMAS": "shop, catalog"}
    assert load_agent_config(None, environ=environ).statement_schemas == ("shop", "catalog")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"schemas": ("catalog",)}, "must include mysql_database"),
        ({"schemas": ("twopc", "mysql")}, "no system schema"),
        ({"schemas": ("twopc", "shop;drop")}, "letters, digits"),
        ({"privilege_check": "ignore"}, "'refuse' or 'warn'"),
        ({"nontransactional_tables": "off"}, "'refuse' or 'warn'"),
        ({"safety_check_interval_s": 0.0}, "safety_check_interval_s"),
    ],
)
def test_the_database_check_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentConfig(**settings)  # type: ignore[arg-type]
