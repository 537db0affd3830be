"""The coordinator's ``decision_log`` setting: file (default) or a store URL, checked at load; the
store's password from the environment only; the daemon builds the log it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from coordinator.config import CoordinatorConfig, load_coordinator_config
from coordinator.daemon import build_decision_log
from coordinator.decision_log.file_log import FileDecisionLog
from coordinator.decision_log.sql_log import SqlDecisionLog, store_url
from twopc.errors import InvalidArgument

PREFIX = "TWOPC_COORDINATOR_"


def load(tmp_path: Path, text: str, **environ: str) -> CoordinatorConfig:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return load_coordinator_config(path, environ)


def test_the_file_log_is_the_default(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.decision_log == "file"
    assert config.decision_log_url() is None
    assert isinstance(build_decision_log(config, {}, None), FileDecisionLog)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("mariadb://twopc@db.example:3306/twopc_log", "mariadb+pymysql"),
        ("mysql+pymysql://twopc@db/twopc_log", "mysql+pymysql"),
        ("postgresql://twopc@db/twopc_log", "postgresql+psycopg"),
        ("postgresql+psycopg://twopc@db/twopc_log?sslmode=require", "postgresql+psycopg"),
    ],
)
def test_a_store_url_gets_its_driver(tmp_path: Path, url: str, driver: str) -> None:
    config = load(tmp_path, f'decision_log = "{url}"\n')
    parsed = config.decision_log_url()
    assert parsed is not None
    assert parsed.drivername == driver
    log = build_decision_log(config, {}, None)
    assert isinstance(log, SqlDecisionLog)
    assert log.name.startswith(driver)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///x.db", "MariaDB/MySQL or PostgreSQL"),
        ("postgresql+psycopg2://u@db/x", "through psycopg, not psycopg2"),
        ("mysql+mysqldb://u@db/x", "through pymysql, not mysqldb"),
        ("mariadb://u@db", "names no database"),
        ("not a url", "'file' or a store URL"),
        ("mariadb://u:hunter2@db/x", "must not carry a password"),
    ],
)
def test_a_bad_store_url_is_refused_at_load(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        load(tmp_path, f'decision_log = "{url}"\n')
    assert "hunter2" not in caught.value.message


def test_the_password_comes_from_the_named_variable(tmp_path: Path) -> None:
    text = 'decision_log = "mariadb://twopc@db/x"\ndecision_log_password_env = "LOG_PW"\n'
    config = load(tmp_path, text, LOG_PW="s3cret-pw")
    with capture_logs() as logs:
        log = build_decision_log(config, {"LOG_PW": "s3cret-pw"}, None)
    assert isinstance(log, SqlDecisionLog)
    assert "s3cret-pw" not in log.name
    assert "s3cret-pw" not in repr(logs)
    assert log._url.password == "s3cret-pw"
    with pytest.raises(InvalidArgument, match="the environment has no LOG_PW"):
        load(tmp_path, text)


def test_settings_from_the_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "",
        **{
            f"{PREFIX}DECISION_LOG": "postgresql://twopc@db/x",
            f"{PREFIX}DECISION_LOG_PASSWORD_ENV": "PW",
            "PW": "p",
        },
    )
    assert str(config.decision_log_url()) == "postgresql+psycopg://twopc@db/x"


def test_the_password_variable_must_be_a_variable_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="must name an environment variable"):
        load(tmp_path, 'decision_log_password_env = "not a name"\n')


def test_store_url_keeps_a_given_driver() -> None:
    assert store_url("mariadb+pymysql://u@h/d").drivername == "mariadb+pymysql"
