"""The package layout holds: the SDK installs and imports with its base dependencies only, and the
import contracts that ``lint-imports`` checks cover every shared module.

The contracts themselves (pyproject.toml, ``[tool.importlinter]``) run in deploy/test.sh.
"""

from __future__ import annotations

import importlib.metadata
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import twopc
from twopc.testing.certs import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The daemons' and the tools' dependencies: none of them may load with the SDK.
NOT_FOR_THE_SDK = (
    "structlog",
    "pymysql",
    "aiomysql",
    "sqlalchemy",
    "uvloop",
    "matplotlib",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
)
# Used by the SDK when installed (trace context, twopc.tracing), and absent from the base install:
# the base-install checks run without it.
OPTIONAL_FOR_THE_SDK = ("opentelemetry",)


def _contract(name_start: str) -> dict[str, object]:
    for contract in PYPROJECT["tool"]["importlinter"]["contracts"]:
        if contract["name"].startswith(name_start):
            return dict(contract)
    raise AssertionError(f"no import contract named {name_start!r}...")


def _distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def test_the_base_install_is_grpc_and_protobuf() -> None:
    base = {_distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert base == {"grpcio", "protobuf"}


def test_every_shared_module_is_under_the_contract() -> None:
    """A module added to ``twopc`` (outside the command, ``cli`` and ``admin_cli``, and the test
    tools) must not escape the rule that the SDK and the shared code import neither daemon."""
    shared = {
        f"twopc.{info.name}"
        for info in pkgutil.iter_modules(twopc.__path__)
        if info.name not in ("cli", "admin_cli", "testing")
    }
    contract = _contract("The SDK and the shared code")
    assert set(contract["source_modules"]) == shared  # type: ignore[arg-type]


def _requirements_closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need at run time, themselves included (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(_distribution_name(requirement))
    return seen


def _site_with_only(distributions: set[str], site: Path) -> None:
    """A directory that holds the installed files of ``distributions`` and nothing else."""
    site.mkdir()
    for name in distributions:
        files = importlib.metadata.files(name) or []
        tops = {Path(str(f)).parts[0] for f in files}
        for top in tops - {"__pycache__", "..", "bin"}:
            source = Path(str(importlib.metadata.distribution(name).locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


@pytest.fixture(scope="module")
def base_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that holds grpcio and protobuf (and what they need), and nothing else:
    ``pip install twopc``."""
    base = [_distribution_name(r) for r in PYPROJECT["project"]["dependencies"]]
    site = tmp_path_factory.mktemp("base") / "site"
    _site_with_only(_requirements_closure(base), site)
    return site


def _run_with_base_only(site: Path, program: str) -> subprocess.CompletedProcess[str]:
    """Runs ``program`` in a Python without its site-packages, with ``site`` and then the
    repository on its path, after checking that no dependency of the daemons or the tools is
    importable there."""
    prelude = f"""
import sys
sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]
for name in {NOT_FOR_THE_SDK + OPTIONAL_FOR_THE_SDK!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} is importable: the check would prove nothing")
"""
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + program],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


_LOADED = f"""
loaded = sorted(n for n in {NOT_FOR_THE_SDK!r} if n in sys.modules)
daemons = sorted(n for n in sys.modules if n.split(".")[0] in ("coordinator", "participants"))
print("loaded:", loaded, "daemons:", daemons)
"""


def test_the_sdk_runs_with_the_base_dependencies_only(base_site: Path) -> None:
    """``pip install twopc`` gives grpcio and protobuf: the SDK must import and build a client
    with those alone."""
    program = """
from twopc import AsyncClient, Client, OutcomeUnknown, RetryPolicy, TlsConfig, TransactionAborted
with Client("127.0.0.1:1", insecure=True, retry_policy=RetryPolicy(attempts=1)) as client:
    pass
"""
    done = _run_with_base_only(base_site, program + _LOADED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded: [] daemons: []"


def test_the_sdk_sends_no_trace_context_without_opentelemetry(base_site: Path) -> None:
    program = """
from twopc import tracing
print("tracing:", tracing.available(), tracing.outgoing_metadata())
parent = [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
with tracing.span("twopc.Coordinator/Begin", parent, txid="c1.r-x"):
    pass
"""
    done = _run_with_base_only(base_site, program + _LOADED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["tracing: False None", "loaded: [] daemons: []"]


def _twopc(arguments: list[str]) -> str:
    """A program that runs the ``twopc`` command and prints its exit status."""
    return f"""
from twopc.cli import main
try:
    status = main({arguments!r})
except SystemExit as exit:
    status = exit.code
print("exit status:", status)
"""


@pytest.mark.parametrize("arguments", [["--help"], ["tx", "--help"]])
def test_the_command_helps_with_the_base_dependencies_only(
    base_site: Path, arguments: list[str]
) -> None:
    done = _run_with_base_only(base_site, _twopc(arguments) + _LOADED)
    assert done.returncode == 0, done.stderr
    assert "usage: twopc" in done.stdout
    assert done.stdout.splitlines()[-2:] == ["exit status: 0", "loaded: [] daemons: []"]


def test_twopc_tx_runs_with_the_base_dependencies_only(base_site: Path, tmp_path: Path) -> None:
    """It gets as far as asking the coordinator (nothing listens on port 1), with mutual TLS
    from the environment."""
    ca = CertificateAuthority.create(tmp_path)
    client = ca.issue("client")
    environment = {"TWOPC_TLS_CERT": client.cert, "TWOPC_TLS_KEY": client.key}
    environment["TWOPC_TLS_CA"] = ca.cert_path
    program = f"import os\nos.environ.update({ {k: str(v) for k, v in environment.items()}!r})\n"
    program += _twopc(["tx", "--coordinator", "127.0.0.1:1", "c1.r-nothing"])
    done = _run_with_base_only(base_site, program + _LOADED)
    assert done.returncode == 0, done.stderr
    assert "twopc tx: Unavailable:" in done.stderr
    assert "(coordinator 127.0.0.1:1, from --coordinator; TLS from $TWOPC_TLS_CERT" in done.stderr
    assert done.stdout.splitlines()[-2:] == ["exit status: 1", "loaded: [] daemons: []"]


@pytest.mark.parametrize(
    ("arguments", "extra"),
    [
        (["coordinator", "--config", "coordinator.toml"], "coordinator"),
        (["agent"], "agent"),
        (["playground", "--detach"], "playground"),
        (["chaos", "--help"], "chaos"),
        (["bench", "--duration", "1"], "bench"),
        (["certs", "init", "somewhere"], "playground"),
        (["health", "--address", "127.0.0.1:1", "--insecure-plaintext"], "coordinator"),
    ],
)
def test_a_command_without_its_extra_names_the_extra(
    base_site: Path, arguments: list[str], extra: str
) -> None:
    done = _run_with_base_only(base_site, _twopc(arguments))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "exit status: 1"
    message = done.stderr.strip()
    assert message.startswith(f"twopc {arguments[0]} needs "), message
    assert f"pip install 'twopc[{extra}]'" in message
    assert "Traceback" not in message


@pytest.mark.parametrize("dependency", NOT_FOR_THE_SDK)
def test_the_sdk_contract_names_each_daemon_dependency(dependency: str) -> None:
    contract = _contract("The SDK needs grpcio and protobuf only")
    assert dependency in contract["forbidden_modules"]  # type: ignore[operator]


def test_the_playground_runs_the_daemons_of_this_checkout(tmp_path: Path) -> None:
    """The playground puts the checkout that holds it first on its daemons' PYTHONPATH: a test
    run in one checkout must not start the daemons of another (which an editable install in a
    shared virtual environment points to)."""
    from twopc.testing.playground.cluster import Cluster  # noqa: PLC0415 (pymysql: this test only)

    cluster = Cluster.create(tmp_path / "cluster", ["eu"])  # lays files out, starts nothing
    for name in ("agent-eu", "coordinator"):
        component = cluster.components[name]
        done = subprocess.run(
            [
                component.command[0],
                "-c",
                "import coordinator, participants, twopc; "
                "print(twopc.__file__, coordinator.__file__, participants.__file__)",
            ],
            cwd=component.cwd,
            env={"PATH": "/usr/bin:/bin", **component.env},
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        for module_file in done.stdout.split():
            assert Path(module_file).is_relative_to(ROOT), f"{name} imports {module_file}"
