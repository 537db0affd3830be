"""Mutual TLS and identities without a cluster: the certificate tool, ``TlsConfig``, the daemons'
TLS settings, and ``AccessControl`` on an in-process gRPC server with a stand-in servicer."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import structlog
from grpc import aio
from structlog.testing import capture_logs

from coordinator.config import load_coordinator_config
from participants.config import AgentConfig, load_agent_config
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.cli import client_tls_files
from twopc.client import AsyncClient, Client, InvalidArgument, PermissionDenied, TlsConfig
from twopc.identity import AccessControl, ServiceRule, peer_identity
from twopc.serving import channel, listen, new_server
from twopc.status import error_from_rpc
from twopc.testing.certs import CertificateAuthority
from twopc.tls import daemon_tls

T = TypeVar("T")
PARTICIPANT = pb.DESCRIPTOR.services_by_name["Participant"].full_name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with ``coordinator``, ``other-app`` and an expired ``old``; and a second CA, in
    ``other/``, with its own ``coordinator``."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory)
    ca.issue("coordinator")
    ca.issue("other-app")
    ca.issue("agent", ["localhost", "127.0.0.1", "agent-eu.internal"])
    ca.issue("old", valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), days=1)
    CertificateAuthority.create(directory / "other").issue("coordinator")
    return directory


def tls(pki: Path, name: str, ca: Path | None = None) -> TlsConfig:
    return TlsConfig(cert=pki / f"{name}.pem", key=pki / f"{name}.key", ca=ca or pki / "ca.pem")


# --- TlsConfig and the SDK -----------------------------------------------------------------------


def test_tls_from_the_environment() -> None:
    assert TlsConfig.from_env({}) is None
    env = {"TWOPC_TLS_CERT": "c.pem", "TWOPC_TLS_KEY": "c.key", "TWOPC_TLS_CA": "ca.pem"}
    assert TlsConfig.from_env(env) == TlsConfig(Path("c.pem"), Path("c.key"), Path("ca.pem"))
    named = TlsConfig.from_env({**env, "TWOPC_TLS_SERVER_NAME": "coordinator.internal"})
    assert named is not None
    assert named.channel_options() == [("grpc.ssl_target_name_override", "coordinator.internal")]
    with pytest.raises(InvalidArgument, match="TWOPC_TLS_KEY, TWOPC_TLS_CA not set"):
        TlsConfig.from_env({"TWOPC_TLS_CERT": "c.pem"})


def test_a_client_needs_tls_or_an_explicit_insecure(pki: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"no TLS configuration.*insecure=True"):
        Client("127.0.0.1:1")
    with pytest.raises(InvalidArgument, match="not several"):
        Client("127.0.0.1:1", tls=tls(pki, "coordinator"), insecure=True)
    with pytest.raises(InvalidArgument, match=r"TLS key file .*missing\.key"):
        Client("127.0.0.1:1", tls=TlsConfig(pki / "coordinator.pem", pki / "missing.key", pki))

    async def async_client() -> None:
        AsyncClient("127.0.0.1:1")

    with pytest.raises(InvalidArgument, match="no TLS configuration"):
        asyncio.run(async_client())


def test_a_plaintext_client_is_logged_as_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="twopc.client"),
        Client("127.0.0.1:1", insecure=True),
    ):
        pass
    assert "insecure=True): plaintext, no TLS" in caplog.text


def test_twopc_tx_finds_its_certificate(tmp_path: Path) -> None:
    env = {"TWOPC_TLS_CERT": "c.pem", "TWOPC_TLS_KEY": "c.key", "TWOPC_TLS_CA": "ca.pem"}
    assert client_tls_files(False, env, tmp_path)[0] == {
        "cert": "c.pem",
        "key": "c.key",
        "ca": "ca.pem",
    }
    assert client_tls_files(True, env, tmp_path) == (None, "--insecure")
    with pytest.raises(ValueError, match="no TLS configuration"):
        client_tls_files(False, {}, tmp_path)
    state = tmp_path / ".twopc-playground" / "state.json"
    state.parent.mkdir()
    state.write_text('{"client_tls": {"cert": "p.pem", "key": "p.key", "ca": "pca.pem"}}')
    files, source = client_tls_files(False, {}, tmp_path)
    assert files == {"cert": "p.pem", "key": "p.key", "ca": "pca.pem"}
    assert "state.json" in source
    state.write_text('{"client_tls": null, "plaintext": true}')
    assert client_tls_files(False, {}, tmp_path)[0] is None


# --- the daemons' settings -----------------------------------------------------------------------


def test_daemons_run_tls_unless_told_otherwise(pki: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"tls_cert, tls_key, tls_ca not set.*twopc certs"):
        daemon_tls(None, None, None, insecure_plaintext=False, who="agent")
    with pytest.raises(InvalidArgument, match=r"TLS cert file .*nothing\.pem"):
        daemon_tls(
            pki / "nothing.pem", pki / "old.key", pki / "ca.pem", insecure_plaintext=False, who="x"
        )
    assert daemon_tls(None, None, None, insecure_plaintext=True, who="agent") is None
    assert daemon_tls(
        pki / "agent.pem", pki / "agent.key", pki / "ca.pem", insecure_plaintext=False, who="agent"
    ) == tls(pki, "agent")


def test_tls_settings_from_file_and_environment(pki: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'tls_cert = "{pki / "agent.pem"}"\ntls_key = "{pki / "agent.key"}"\n'
        f'tls_ca = "{pki / "ca.pem"}"\ncoordinator_identities = ["coordinator"]\n'
    )
    config = load_agent_config(path, {"TWOPC_AGENT_ADMIN_IDENTITIES": "admin, ops"})
    assert config.coordinator_identities == ("coordinator",)
    assert config.admin_identities == ("admin", "ops")
    assert config.tls() == tls(pki, "agent")
    with pytest.raises(InvalidArgument, match=r"coordinator_identities is empty.*obey no one"):
        load_agent_config(path, {"TWOPC_AGENT_COORDINATOR_IDENTITIES": ""}).tls()
    with pytest.raises(InvalidArgument, match="admin_identities is empty"):
        load_agent_config(path, {"TWOPC_AGENT_ADMIN_FAILPOINTS": "true"}).tls()
    assert AgentConfig(insecure_plaintext=True).tls() is None
    coordinator = load_coordinator_config(None, {"TWOPC_COORDINATOR_INSECURE_PLAINTEXT": "1"})
    assert coordinator.tls() is None
    with pytest.raises(InvalidArgument, match="tls_cert, tls_key, tls_ca not set"):
        load_coordinator_config(None, {}).tls()


# --- AccessControl on a real server --------------------------------------------------------------


class _Agent(pb_grpc.ParticipantServicer):
    """Answers GetInfo with the caller's identity, as ``peer_identity`` reads it and as the
    logs carry it (``caller`` in the structlog context); a Pipeline answers each message."""

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.AgentInfo:
        logged = structlog.contextvars.get_contextvars().get("caller", "(none)")
        return pb.AgentInfo(participant=peer_identity(context) or "(none)", server_version=logged)

    async def Pipeline(  # type: ignore[override]
        self, requests: AsyncIterator[pb.PipelineRequest], context: Any
    ) -> None:
        async for _ in requests:
            await context.write(pb.PipelineResponse())


def with_agent(pki: Path, body: Callable[[str], Awaitable[T]]) -> T:
    """Runs ``body(address)`` against a stand-in agent that obeys ``coordinator`` only, behind
    ``AccessControl`` and mutual TLS, in a fresh event loop."""

    async def main() -> T:
        rules = {PARTICIPANT: ServiceRule(("coordinator",), "coordinator_identities")}
        server = new_server([AccessControl(rules, component="agent eu")])
        pb_grpc.add_ParticipantServicer_to_server(_Agent(), server)
        port = listen(server, "127.0.0.1:0", tls(pki, "agent"))
        await server.start()
        try:
            return await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    return asyncio.run(main())


async def get_info(address: str, tls: TlsConfig) -> str:
    """The identity the agent saw, checked to be the one its logs carry."""
    async with channel(address, tls) as ch:
        reply = await pb_grpc.ParticipantStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
    assert reply.server_version == reply.participant
    return reply.participant


def test_the_identity_is_the_certificates_common_name(pki: Path) -> None:
    with capture_logs() as logs:
        assert with_agent(pki, lambda a: get_info(a, tls(pki, "coordinator"))) == "coordinator"
    assert logs == []  # nothing refused, and no key material anywhere


def test_other_identities_are_refused_with_the_setting_to_change(pki: Path) -> None:
    with capture_logs() as logs, pytest.raises(grpc.RpcError) as raised:
        with_agent(pki, lambda a: get_info(a, tls(pki, "other-app")))
    error = error_from_rpc(raised.value)
    assert isinstance(error, PermissionDenied)
    assert error.message == (
        "identity 'other-app' may not call twopc.v1.Participant/GetInfo on agent eu: it obeys "
        "only coordinator (its setting coordinator_identities); present the certificate of one "
        "of them, or add 'other-app' to coordinator_identities if it should"
    )
    assert logs == [
        {
            "event": "permission_denied",
            "caller": "other-app",
            "method": "/twopc.v1.Participant/GetInfo",
            "log_level": "warning",
        }
    ]


def test_a_stream_is_refused_before_its_first_message(pki: Path) -> None:
    async def pipeline(address: str, identity: str) -> int:
        async with channel(address, tls(pki, identity)) as ch:
            call: Any = pb_grpc.ParticipantStub(ch).Pipeline(iter([pb.PipelineRequest()]))
            return len([answer async for answer in call])

    assert with_agent(pki, lambda a: pipeline(a, "coordinator")) == 1
    with pytest.raises(grpc.RpcError) as raised:
        with_agent(pki, lambda a: pipeline(a, "other-app"))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("caller", ["no certificate", "another CA", "expired", "plaintext"])
def test_callers_without_a_valid_certificate_fail_the_handshake(pki: Path, caller: str) -> None:
    async def call(address: str) -> grpc.StatusCode:
        if caller == "no certificate":
            credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
            ch = aio.secure_channel(address, credentials)
        elif caller == "plaintext":
            ch = aio.insecure_channel(address)
        else:
            ch = channel(
                address, tls(pki, "other/coordinator" if caller == "another CA" else "old")
            )
        async with ch:
            try:
                await pb_grpc.ParticipantStub(ch).GetInfo(pb.GetInfoRequest(), timeout=5)
            except grpc.RpcError as err:
                code: grpc.StatusCode = err.code()
            else:
                raise AssertionError(f"a caller with {caller} was answered")
        assert await get_info(address, tls(pki, "coordinator")) == "coordinator"  # it serves
        return code

    with capture_logs() as logs:
        assert with_agent(pki, call) is grpc.StatusCode.UNAVAILABLE  # no connection was made
    assert logs == []  # no call reached the server's code
