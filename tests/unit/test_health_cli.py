"""``twopc health`` against a real gRPC server on loopback that serves the daemons' health service
(``twopc.observability.Health``): SERVING, NOT_SERVING, an unknown service, no answer; in
plaintext and with mutual TLS; in-process and as the process a probe runs."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpc import aio

from twopc.cli import main
from twopc.health_cli import NOT_SERVING, SERVING, UNREACHABLE
from twopc.observability import Health, add_health_and_reflection
from twopc.serving import listen
from twopc.testing.certs import CertificateAuthority
from twopc.tls import TlsConfig

ROOT = Path(__file__).resolve().parents[2]
COORDINATOR = "twopc.v1.Coordinator"
T = TypeVar("T")


class HealthServer:
    """An asyncio gRPC server with the daemons' health service, on a loop in a thread of its own
    (the command under test blocks)."""

    def __init__(self, tls: TlsConfig | None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.health: Health = self.call(self._make_health())
        self.server: aio.Server = self.call(self._start(tls))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _make_health(self) -> Health:
        return Health(COORDINATOR)  # the servicer needs a running loop

    async def _start(self, tls: TlsConfig | None) -> aio.Server:
        server = aio.server()
        add_health_and_reflection(server, self.health, [COORDINATOR])
        self.port = listen(server, "127.0.0.1:0", tls)
        await server.start()
        return server

    def serving(self, serving: bool) -> None:
        self.call(self.health.set(serving))

    def close(self) -> None:
        self.call(self.server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a coordinator's certificate (localhost, 127.0.0.1), one that names
    coordinator.internal alone, and a probe's; another CA with its own probe."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory)
    ca.issue("coordinator")
    ca.issue("named", ["coordinator.internal"])
    ca.issue("probe")
    CertificateAuthority.create(directory / "other").issue("probe")
    return directory


def _tls(pki: Path, name: str) -> TlsConfig:
    return TlsConfig(pki / f"{name}.pem", pki / f"{name}.key", pki / "ca.pem")


def _tls_args(directory: Path, name: str, ca: Path) -> list[str]:
    return [
        "--tls-cert",
        str(directory / f"{name}.pem"),
        "--tls-key",
        str(directory / f"{name}.key"),
        "--tls-ca",
        str(ca),
    ]


@pytest.fixture
def plain() -> Iterator[HealthServer]:
    server = HealthServer(None)
    yield server
    server.close()


@pytest.fixture
def secure(pki: Path) -> Iterator[HealthServer]:
    server = HealthServer(_tls(pki, "coordinator"))
    yield server
    server.close()


def _health(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Runs ``twopc health`` in-process: its exit status and its one line (stdout or stderr)."""
    status = main(["health", *arguments])
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    assert len(lines) == 1, lines
    return status, lines[0]


# --- plaintext -----------------------------------------------------------------------------------


def test_serving(plain: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    plain.serving(True)
    status, line = _health(["--address", plain.address, "--insecure-plaintext"], capsys)
    assert (status, line) == (SERVING, f"SERVING: {COORDINATOR} at {plain.address}")
    status, line = _health(
        ["--address", plain.address, "--insecure-plaintext", "--service", ""], capsys
    )
    assert (status, line) == (SERVING, f"SERVING: (server) at {plain.address}")


def test_not_serving_before_recovery_and_while_stopping(
    plain: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["--address", plain.address, "--insecure-plaintext"]
    plain.serving(False)  # before the first recovery pass, or draining
    assert _health(arguments, capsys) == (
        NOT_SERVING,
        f"NOT_SERVING: {COORDINATOR} at {plain.address}",
    )
    plain.serving(True)
    assert _health(arguments, capsys)[0] == SERVING
    plain.call(plain.health.shutting_down())
    assert _health(arguments, capsys)[0] == NOT_SERVING


def test_alive_takes_any_answer_and_not_none(
    plain: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """For liveness: a draining or recovering daemon is up; one that does not answer is not."""
    plain.serving(False)
    arguments = ["--address", plain.address, "--insecure-plaintext", "--alive"]
    assert _health(arguments, capsys) == (
        SERVING,
        f"NOT_SERVING: {COORDINATOR} at {plain.address}",
    )
    address = f"127.0.0.1:{_free_port()}"
    status, _ = _health(["--address", address, "--insecure-plaintext", "--alive"], capsys)
    assert status == UNREACHABLE


def test_a_service_the_server_does_not_know_is_not_serving(
    plain: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    plain.serving(True)
    arguments = ["--address", plain.address, "--insecure-plaintext"]
    status, line = _health([*arguments, "--service", "twopc.v1.Participant"], capsys)
    assert status == NOT_SERVING
    assert line.startswith(f"UNKNOWN SERVICE: twopc.v1.Participant at {plain.address}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_nothing_listening_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    status, line = _health(["--address", address, "--insecure-plaintext"], capsys)
    assert status == UNREACHABLE
    assert line.startswith(f"UNREACHABLE: {COORDINATOR} at {address}: UNAVAILABLE: ")


def test_a_server_that_never_answers_is_unreachable_after_the_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A port that accepts connections and says nothing (a frozen daemon's backlog)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        status, line = _health(
            ["--address", address, "--insecure-plaintext", "--timeout", "0.5"], capsys
        )
        elapsed = time.monotonic() - started
    assert status == UNREACHABLE
    assert line.startswith(f"UNREACHABLE: {COORDINATOR} at {address}: DEADLINE_EXCEEDED: ")
    assert elapsed < 3, elapsed


@pytest.mark.parametrize(
    "extra",
    [[], ["--insecure-plaintext", "--tls-ca", "ca.pem"], ["--tls-cert", "c.pem"]],
    ids=["neither", "both", "part-of-tls"],
)
def test_tls_or_plaintext_must_be_chosen(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, line = _health(["--address", "127.0.0.1:1", *extra], capsys)
    assert status == UNREACHABLE
    assert "give --tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure-plaintext" in line


# --- mutual TLS ----------------------------------------------------------------------------------


def test_serving_over_mutual_tls(
    secure: HealthServer, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secure.serving(True)
    arguments = ["--address", secure.address, *_tls_args(pki, "probe", pki / "ca.pem")]
    assert _health(arguments, capsys) == (SERVING, f"SERVING: {COORDINATOR} at {secure.address}")
    secure.serving(False)
    assert _health(arguments, capsys)[0] == NOT_SERVING


def test_the_daemons_own_certificate_serves_as_the_probes(
    secure: HealthServer, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the manifests do: the probe presents the certificate the daemon serves."""
    secure.serving(True)
    arguments = ["--address", secure.address, *_tls_args(pki, "coordinator", pki / "ca.pem")]
    assert _health(arguments, capsys)[0] == SERVING


def test_the_server_name_when_the_certificate_does_not_name_the_address(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = HealthServer(_tls(pki, "named"))  # coordinator.internal only
    try:
        server.serving(True)
        arguments = ["--address", server.address, *_tls_args(pki, "probe", pki / "ca.pem")]
        status, line = _health(arguments, capsys)
        assert status == UNREACHABLE, line  # the handshake fails: 127.0.0.1 is not named
        named = [*arguments, "--tls-server-name", "coordinator.internal"]
        assert _health(named, capsys)[0] == SERVING
    finally:
        server.close()


@pytest.mark.parametrize("probe", ["other-ca", "plaintext"])
def test_a_probe_the_server_does_not_trust_is_unreachable(
    secure: HealthServer, pki: Path, capsys: pytest.CaptureFixture[str], probe: str
) -> None:
    secure.serving(True)
    if probe == "plaintext":
        arguments = ["--address", secure.address, "--insecure-plaintext", "--timeout", "1"]
    else:
        other = pki / "other"
        arguments = ["--address", secure.address, *_tls_args(other, "probe", other / "ca.pem")]
    status, line = _health(arguments, capsys)
    assert status == UNREACHABLE, line
    assert line.startswith(f"UNREACHABLE: {COORDINATOR} at {secure.address}: ")


def test_an_unreadable_tls_file_is_said(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--address", "127.0.0.1:1", *_tls_args(pki, "missing", pki / "ca.pem")]
    status, line = _health(arguments, capsys)
    assert status == UNREACHABLE
    assert "TLS cert file" in line
    assert "missing.pem" in line


# --- as the probe runs it ------------------------------------------------------------------------


def test_the_command_as_a_probe_runs_it(secure: HealthServer, pki: Path) -> None:
    """A process of its own, its exit status what kubelet reads."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    arguments = ["--address", secure.address, *_tls_args(pki, "coordinator", pki / "ca.pem")]

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "twopc.cli", "health", *arguments],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            env=environment,
        )

    secure.serving(True)
    done = probe()
    assert (done.returncode, done.stdout.strip()) == (
        SERVING,
        f"SERVING: {COORDINATOR} at {secure.address}",
    )
    secure.serving(False)
    done = probe()
    assert done.returncode == NOT_SERVING
    assert done.stderr.strip() == f"NOT_SERVING: {COORDINATOR} at {secure.address}"
