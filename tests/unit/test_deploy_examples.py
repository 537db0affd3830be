"""The example configurations in deploy/examples load as the README says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from participants.config import AgentConfig, load_agent_config
from participants.relay import load_relay_config
from twopc.errors import InvalidArgument
from twopc.observability import is_loopback

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


# --- every example, the way a daemon loads it ----------------------------------------------

COORDINATOR_EXAMPLES = sorted(EXAMPLES.glob("coordinator*.toml"))
AGENT_EXAMPLES = sorted(EXAMPLES.glob("agent-*.toml"))
RELAY_EXAMPLE = EXAMPLES / "relay.toml"


def test_every_example_is_a_coordinator_or_an_agent_configuration() -> None:
    assert COORDINATOR_EXAMPLES
    assert len(AGENT_EXAMPLES) >= 2
    assert set(EXAMPLES.glob("*.toml")) == {*COORDINATOR_EXAMPLES, *AGENT_EXAMPLES, RELAY_EXAMPLE}


def test_the_relay_example_loads_with_its_secrets_from_the_environment() -> None:
    environ = {
        "TWOPC_RELAY_MYSQL_PASSWORD": "s3cret",
        "TWOPC_RELAY_AMQP_URL": "amqp://u:p@mq:5672/",
    }
    config = load_relay_config(RELAY_EXAMPLE, environ=environ)
    assert (config.mysql_user, config.mysql_password) == ("twopc_relay", "s3cret")
    assert config.broker == "mq:5672"  # what its logs name: never the URL with its password
    assert "password" not in RELAY_EXAMPLE.read_text().split("#")[0]
    host = config.metrics_listen.rsplit(":", 1)[0]
    assert host == "127.0.0.1", "the relay serves metrics on loopback only"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "mysql_database"),
        ({"mysql_database": "shop", "batch": "0"}, "batch"),
        ({"mysql_database": "shop", "metrics_listen": "0.0.0.0:9465"}, "loopback only"),
    ],
)
def test_the_relay_settings_are_checked(settings: dict[str, str], message: str) -> None:
    environ = {f"TWOPC_RELAY_{k.upper()}": v for k, v in settings.items()}
    with pytest.raises(InvalidArgument, match=message):
        load_relay_config(None, environ=environ)


def _host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


@pytest.mark.parametrize("path", COORDINATOR_EXAMPLES + AGENT_EXAMPLES, ids=lambda p: p.name)
def test_an_example_listens_beyond_loopback_only_with_tls(path: Path) -> None:
    """Loaded with the daemon's own loader: every address it listens on (gRPC and metrics)
    that is not loopback comes with its certificate, key and CA, and plaintext is off."""
    environ = {"TWOPC_MYSQL_PASSWORD": "s3cret"}
    loader = load_coordinator_config if path.name.startswith("coordinator") else load_agent_config
    config = loader(path, environ=environ)
    assert config.metrics_listen, "every example serves metrics"
    for address in (config.listen, config.metrics_listen):
        if not is_loopback(_host(address)):
            assert not config.insecure_plaintext, address
            assert None not in (config.tls_cert, config.tls_key, config.tls_ca), address


# --- the systemd units ----------------------------------------------------------------------------

UNITS = sorted((EXAMPLES.parent / "systemd").glob("*.service"))
HARDENING = {
    "User": "twopc",
    "Group": "twopc",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "LimitNOFILE": "65536",
}


def _service_section(unit: Path) -> dict[str, str]:
    """The [Service] section's keys (the last value of a key that repeats)."""
    keys: dict[str, str] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    return keys


def test_there_is_a_unit_per_daemon() -> None:
    assert [u.name for u in UNITS] == [
        "twopc-agent@.service",
        "twopc-coordinator-member@.service",
        "twopc-coordinator.service",
        "twopc-relay.service",
    ]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_a_unit_runs_its_daemon_hardened(unit: Path) -> None:
    service = _service_section(unit)
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{unit.name}: {key}={service.get(key)!r}"
    daemon = next(d for d in ("coordinator", "agent", "relay") if d in unit.name)
    assert service["ExecStart"].startswith(f"/opt/twopc/.venv/bin/twopc {daemon} --config ")


def test_the_coordinator_unit_may_write_its_data_dir_and_nothing_else() -> None:
    service = _service_section(EXAMPLES.parent / "systemd" / "twopc-coordinator.service")
    data_dir = str(load_coordinator_config(EXAMPLES / "coordinator.toml", environ={}).data_dir)
    assert service["StateDirectory"] == "twopc/coordinator"
    assert data_dir == "/var/lib/" + service["StateDirectory"]
    assert service["ReadWritePaths"] == data_dir
    agent = _service_section(EXAMPLES.parent / "systemd" / "twopc-agent@.service")
    assert "ReadWritePaths" not in agent
    assert "StateDirectory" not in agent


def test_a_group_members_unit_is_its_instance_and_writes_nothing() -> None:
    """twopc-coordinator-member@ID.service: the instance name is the member's coordinator id
    (set over its file, so that they cannot disagree), its file /etc/twopc/member-ID.toml, the
    store password from /etc/twopc/member-ID.env (required: the member refuses to start
    without it). Its log is in the store: no state directory, no writable path."""
    unit = EXAMPLES.parent / "systemd" / "twopc-coordinator-member@.service"
    service = _service_section(unit)
    assert service["ExecStart"] == (
        "/opt/twopc/.venv/bin/twopc coordinator --config /etc/twopc/member-%i.toml"
    )
    assert service["Environment"] == "TWOPC_COORDINATOR_COORDINATOR_ID=%i"
    assert service["EnvironmentFile"] == "/etc/twopc/member-%i.env"
    assert "StateDirectory" not in service
    assert "ReadWritePaths" not in service
    coordinator = _service_section(EXAMPLES.parent / "systemd" / "twopc-coordinator.service")
    for key in ("KillSignal", "TimeoutStopSec", "Restart", "UMask", "SystemCallFilter"):
        assert service[key] == coordinator[key], key
    # The instance becomes the coordinator id through the environment, as the daemon loads it.
    config = load_coordinator_config(
        EXAMPLES / "coordinator.toml",
        environ={service["Environment"].split("=", 1)[0]: "member-2"},
    )
    assert config.coordinator_id == "member-2"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def units_here(tmp_path: Path) -> list[Path]:
    """The units as they would be installed, with ExecStart pointing at this checkout's twopc
    (``verify`` checks that the program exists); the agent's template as an instance."""
    twopc = Path(sys.executable).parent / "twopc"
    installed = []
    for unit in UNITS:
        text = unit.read_text().replace("/opt/twopc/.venv/bin/twopc", str(twopc))
        target = tmp_path / unit.name.replace("@.service", "@eu.service")
        target.write_text(text)
        installed.append(target)
    return installed


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_accepts_the_units_without_a_warning(units_here: list[Path]) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, units_here)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=units_here[0].parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # an unknown key is only a warning there


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("index", range(len(UNITS)), ids=[u.name for u in UNITS])
def test_systemd_rates_the_units_exposure_low(units_here: list[Path], index: int) -> None:
    """``systemd-analyze security`` scores what a unit leaves exposed, 0 (nothing) to 10: at
    most 2.5 here (the agent scores 2.0, the coordinator and a group member 1.8)."""
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", str(units_here[index])],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=units_here[index].parent,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
