"""The fault proxy process in front of a real gRPC server, driven through its control API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.errors import DeadlineExceeded, NotFound, PermissionDenied, Unavailable
from twopc.serving import CHANNEL_OPTIONS
from twopc.testing.certs import CertificateAuthority
from twopc.testing.chaos.proxy_service import ProxyControl, main
from twopc.tls import TlsConfig

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


class EchoCoordinator(pb_grpc.CoordinatorServicer):
    """Answers GetTransaction with the txid it was asked about; nothing else."""

    def GetTransaction(
        self, request: pb.GetTransactionRequest, context: grpc.ServicerContext
    ) -> pb.TransactionInfo:
        return pb.TransactionInfo(txid=request.txid)


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    log: Path
    control: ProxyControl
    control_address: str
    tls: dict[str, TlsConfig]

    def events(self) -> list[dict[str, object]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def _certificates(directory: Path) -> dict[str, TlsConfig]:
    """The proxy's control certificate, an ``admin`` and a ``client`` identity, one CA."""
    ca = CertificateAuthority.create(directory / "tls")
    configs = {}
    for name in ("proxy", "admin", "client"):
        issued = ca.issue(name)
        configs[name] = TlsConfig(cert=issued.cert, key=issued.key, ca=ca.cert_path)
    return configs


@contextmanager
def proxy_process(tmp_path: Path, *links: str) -> Iterator[Proxy]:
    """A proxy whose control API runs mutual TLS and obeys the ``admin`` identity."""
    log = tmp_path / "proxy.log"
    tls = _certificates(tmp_path)
    command = [sys.executable, "-m", "twopc.testing.chaos.proxy_service", "--control", f"{HOST}:0"]
    command += [f"--tls-cert={tls['proxy'].cert}", f"--tls-key={tls['proxy'].key}"]
    command += [f"--tls-ca={tls['proxy'].ca}", "--admin-identity=admin"]
    for link in links:
        command += ["--link", link]
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=stderr, stderr=stderr)
    try:
        port = _wait_for_control_port(process, log)
        address = f"{HOST}:{port}"
        with ProxyControl(address, tls=tls["admin"]) as control:
            yield Proxy(process, log, control, address, tls)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def _wait_for_control_port(process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the proxy exited: {log.read_text()}"
        for line in log.read_text().splitlines():
            if '"proxy_listening"' in line:
                return int(json.loads(line)["control_port"])
        time.sleep(0.02)
    raise AssertionError(f"the proxy did not start listening: {log.read_text()}")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@dataclass
class Setup:
    proxy: Proxy
    stub: pb_grpc.CoordinatorStub


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = EchoCoordinator()  # type: ignore[abstract]  # serves GetTransaction only
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        link = f"coordinator={HOST}:0={HOST}:{port}"
        with proxy_process(tmp_path_factory.mktemp("proxy"), link) as proxy:
            listen = proxy.control.links()["coordinator"].listen
            with grpc.insecure_channel(listen, options=CHANNEL_OPTIONS) as channel:
                yield Setup(proxy, pb_grpc.CoordinatorStub(channel))
            proxy.control.heal()
            # The client closed its channel: the proxy closes both sides of that connection.
            wait_until(lambda: proxy.control.links()["coordinator"].connections == 0)
        assert proxy.process.returncode == 0
        problems = [e for e in proxy.events() if e["level"] not in ("debug", "info")]
        assert not problems
    finally:
        server.stop(grace=None).wait()


@pytest.fixture
def healed(setup: Setup) -> Iterator[Setup]:
    yield setup
    setup.proxy.control.heal()


def ask(stub: pb_grpc.CoordinatorStub, txid: str, *, wait: bool = False) -> pb.TransactionInfo:
    return stub.GetTransaction(pb.GetTransactionRequest(txid=txid), timeout=5, wait_for_ready=wait)


def test_calls_pass_through_and_are_counted(healed: Setup) -> None:
    assert ask(healed.stub, "t-1", wait=True).txid == "t-1"
    link = healed.proxy.control.links()["coordinator"]
    assert link.accepted >= 1
    assert link.connections == 1
    assert link.bytes_up > 0
    assert link.bytes_down > 0
    assert link.listen.startswith(f"{HOST}:")
    assert not link.listen.endswith(":0")


def test_cut_makes_calls_unavailable_and_heal_lets_the_channel_reconnect(healed: Setup) -> None:
    control = healed.proxy.control
    assert ask(healed.stub, "before", wait=True).txid == "before"
    link = control.set_fault("coordinator", cut=True)
    assert link.fault.cut
    assert link.connections == 0
    with pytest.raises(grpc.RpcError) as failed:
        ask(healed.stub, "during")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

    assert not control.heal("coordinator")["coordinator"].fault.cut
    assert ask(healed.stub, "after", wait=True).txid == "after"  # reconnects on the same port


def test_latency_applies_each_way(healed: Setup) -> None:
    ask(healed.stub, "warm", wait=True)
    started = time.monotonic()
    ask(healed.stub, "fast")
    fast = time.monotonic() - started
    healed.proxy.control.set_fault("coordinator", latency_ms=50)
    started = time.monotonic()
    assert ask(healed.stub, "slow").txid == "slow"
    slow = time.monotonic() - started
    assert slow >= 0.1, (fast, slow)  # 50 ms up, 50 ms down


def test_unknown_link_is_not_found_naming_the_known_ones(healed: Setup) -> None:
    with pytest.raises(NotFound, match="no link named 'nope'; known links: coordinator"):
        healed.proxy.control.set_fault("nope", cut=True)
    with pytest.raises(NotFound):
        healed.proxy.control.heal("nope")
    with pytest.raises(TypeError, match="no fault field 'latency'"):
        healed.proxy.control.set_fault("coordinator", latency=5)


def test_the_control_api_obeys_its_admin_identities_only(tmp_path: Path) -> None:
    """Another identity of the same CA is refused, naming the option to change, and so is a
    caller without TLS (it gets no connection)."""
    with proxy_process(tmp_path, f"a={HOST}:0={HOST}:9") as proxy:
        with (
            ProxyControl(proxy.control_address, tls=proxy.tls["client"]) as other,
            pytest.raises(PermissionDenied, match=r"identity 'client' may not .*--admin-identity"),
        ):
            other.set_fault("a", cut=True)
        with (
            ProxyControl(proxy.control_address, insecure=True, timeout=1) as plaintext,
            pytest.raises((Unavailable, DeadlineExceeded)),
        ):
            plaintext.links()
        assert not proxy.control.links()["a"].fault.cut
    denied = [e for e in proxy.events() if e["event"] == "permission_denied"]
    assert [(e["caller"], e["method"]) for e in denied] == [
        ("client", "/twopc.chaos.v1.FaultProxy/SetFault")
    ]


def test_sigterm_stops_the_proxy(tmp_path: Path) -> None:
    with proxy_process(tmp_path, f"a={HOST}:0={HOST}:9") as proxy:
        assert list(proxy.control.links()) == ["a"]
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
    assert "proxy_stopping" in [event["event"] for event in proxy.events()]


def test_bad_command_lines_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--control", f"{HOST}:0", "--link", "only-a-name"])
    assert exited.value.code == 2
    assert "NAME=LISTEN_HOST:PORT=UPSTREAM_HOST:PORT" in capsys.readouterr().err
