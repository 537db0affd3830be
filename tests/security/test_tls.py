"""Mutual TLS and identities on the real daemons of the session cluster (issue 10).

- A caller without a certificate, with one from another CA, with an expired one, or in
  plaintext gets no connection to the coordinator or to an agent, and nothing it sent is done.
- A caller with a valid certificate of the same CA but not the coordinator's identity (another
  application, or the application itself) is refused by every agent: it cannot finish anyone's
  branch (finding 1 of the issue), and the transaction it attacked commits whole.
- The coordinator's admin API (Failpoints) obeys its admin identities only.
- A daemon runs in plaintext only when ``insecure_plaintext`` says so, and then says it loudly.

Every outcome is checked on MariaDB (balances, marker rows, XA RECOVER).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from tests.support import balance, markers, prepared, transfer_sql
from twopc.api import chaos_pb2 as chaos_pb
from twopc.api import chaos_pb2_grpc as chaos_grpc
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import Client, NotFound, Outcome, TransactionState
from twopc.testing.certs import CertificateAuthority
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.mariadb import AGENT_PASSWORD_ENV
from twopc.testing.playground.ports import LOOPBACK, free_port
from twopc.testing.playground.tls import ADMIN, CLIENT, COORDINATOR, OTHER_APP
from twopc.tls import TlsConfig
from twopc.values import to_values

ROOT = Path(__file__).resolve().parents[2]
CALLERS = ["no certificate", "another CA", "expired", "plaintext"]
PAUSED = "coordinator.after_commit_record"


# --- callers without a valid certificate -----------------------------------------------------


@pytest.fixture(scope="module")
def strangers(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    """Certificates that name the coordinator but must not be trusted: one from another CA, and
    one from the playground's own CA that has expired."""
    assert cluster.tls is not None
    directory = tmp_path_factory.mktemp("strangers")
    forged = CertificateAuthority.create(directory / "forger").issue(COORDINATOR)
    expired = CertificateAuthority.load(cluster.tls.ca.parent).issue(
        COORDINATOR,
        valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
        days=1,
        directory=directory / "expired",
    )
    return {
        "another CA": TlsConfig(forged.cert, forged.key, cluster.tls.ca),
        "expired": TlsConfig(expired.cert, expired.key, cluster.tls.ca),
    }


def stranger_channel(
    cluster: Cluster, strangers: dict[str, TlsConfig], target: str, caller: str
) -> grpc.Channel:
    address = cluster.component(target).address
    assert cluster.tls is not None
    if caller == "plaintext":
        return grpc.insecure_channel(address)
    if caller == "no certificate":  # it trusts the server, and shows nothing of its own
        return grpc.secure_channel(
            address, grpc.ssl_channel_credentials(cluster.tls.ca.read_bytes())
        )
    return grpc.secure_channel(address, strangers[caller].channel_credentials())


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    code: grpc.StatusCode = raised.value.code()
    return code


@pytest.mark.parametrize("caller", CALLERS)
def test_the_coordinator_refuses_callers_without_a_valid_certificate(
    live_cluster: Cluster, strangers: dict[str, TlsConfig], client: Client, caller: str
) -> None:
    request_id = f"stranger-{caller.replace(' ', '-')}"
    with stranger_channel(live_cluster, strangers, "coordinator", caller) as channel:
        begin = pb_grpc.CoordinatorStub(channel).Begin
        code = refused(lambda: begin(pb.BeginRequest(request_id=request_id), timeout=5))
    assert code is grpc.StatusCode.UNAVAILABLE  # the handshake failed: no call was made
    info = client.get_transaction(request_id=request_id)  # the coordinator serves the others
    assert (info.outcome, info.presumed, list(info.participants)) == (Outcome.ABORTED, True, [])


@pytest.mark.parametrize("caller", CALLERS)
def test_an_agent_refuses_callers_without_a_valid_certificate(
    live_cluster: Cluster, strangers: dict[str, TlsConfig], bank: int, caller: str
) -> None:
    txid = f"{live_cluster.coordinator_id}.r-stranger-{caller.replace(' ', '-')}"
    request = pb.BranchExecuteRequest(
        txid=txid,
        participant="eu",
        sequence=1,
        timeout_ms=30_000,
        statements=[
            pb.Statement(
                sql="UPDATE accounts SET balance = balance + %s WHERE id = %s",
                params=to_values([500, 1]),
            )
        ],
    )
    with stranger_channel(live_cluster, strangers, "agent-eu", caller) as channel:
        execute = pb_grpc.ParticipantStub(channel).Execute
        assert refused(lambda: execute(request, timeout=5)) is grpc.StatusCode.UNAVAILABLE
    with live_cluster.channel("agent-eu", identity=COORDINATOR) as channel:
        known = pb_grpc.ParticipantStub(channel).Inspect(pb.InspectRequest(txids=[txid]))
    assert [b.state for b in known.branches] == [pb.BRANCH_STATE_UNKNOWN]
    assert balance(live_cluster, "eu", 1) == 1000


# --- identities of the same CA that are not the coordinator ------------------------------------


def attack_branches(cluster: Cluster, txid: str, identity: str) -> list[grpc.StatusCode]:
    """Finding 1, as ``identity``: list the prepared branches of coordinator c1 on every agent
    and roll back us's; commit eu's in one phase (which would commit it alone if it were
    active). Returns the status of each call."""
    codes = []
    calls = [
        ("us", lambda s: s.Recover(pb.RecoverRequest(txid_prefix="c1."), timeout=5)),
        (
            "us",
            lambda s: s.Rollback(pb.BranchRollbackRequest(txid=txid, participant="us"), timeout=5),
        ),
        (
            "eu",
            lambda s: s.Commit(
                pb.BranchCommitRequest(txid=txid, participant="eu", one_phase=True), timeout=5
            ),
        ),
        ("eu", lambda s: s.Inspect(pb.InspectRequest(txids=[txid]), timeout=5)),
    ]
    for region, call in calls:
        with cluster.channel(f"agent-{region}", identity=identity) as channel:
            stub = pb_grpc.ParticipantStub(channel)
            codes.append(refused(lambda c=call, s=stub: c(s)))  # type: ignore[misc]
    return codes


def agent_log(cluster: Cluster, region: str) -> list[dict[str, Any]]:
    lines = Path(cluster.component(f"agent-{region}").log).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_only_the_coordinator_can_finish_an_active_branch(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """The deterministic form of finding 1: on a live transaction, Commit(one_phase=True) on one
    agent and Rollback on the other, by another application and by the application itself."""
    with client.transaction(timeout=20) as tx:
        tx.execute("eu", "UPDATE accounts SET balance = balance - %s WHERE id = %s", [70, 4])
        tx.execute("us", "UPDATE accounts SET balance = balance + %s WHERE id = %s", [70, 4])
        for identity in (OTHER_APP, CLIENT):
            assert set(attack_branches(live_cluster, tx.txid, identity)) == {
                grpc.StatusCode.PERMISSION_DENIED
            }
    assert tx.state in (TransactionState.COMMITTING, TransactionState.COMMITTED)
    wait_until(lambda: markers(live_cluster, tx.txid) == {"eu", "us"}, 10, "both halves applied")
    assert (balance(live_cluster, "eu", 4), balance(live_cluster, "us", 4)) == (930, 1070)
    denied = [e for e in agent_log(live_cluster, "us") if e.get("event") == "permission_denied"]
    assert [e["method"].rsplit("/", 1)[1] for e in denied if e["caller"] == OTHER_APP][-2:] == [
        "Recover",
        "Rollback",
    ]


PARTICIPANT = pb.DESCRIPTOR.services_by_name["Participant"]


def status_of_empty_call(channel: grpc.Channel, method: Any) -> grpc.StatusCode:
    """Calls ``method`` (a method descriptor) with an empty request; the status it fails with."""
    path = f"/{PARTICIPANT.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    kwargs: dict[str, Any] = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": message_factory.GetMessageClass(method.output_type).FromString,
    }
    if method.client_streaming:
        stream = channel.stream_stream(path, **kwargs)
        return refused(lambda: list(stream(iter([request]), timeout=5)))
    unary = channel.unary_unary(path, **kwargs)
    return refused(lambda: unary(request, timeout=5))


@pytest.mark.parametrize("identity", [OTHER_APP, CLIENT, ADMIN])
def test_every_participant_method_refuses_every_identity_but_the_coordinators(
    live_cluster: Cluster, identity: str
) -> None:
    """Each method of the Participant API, read from its descriptor (so that a method added
    later, such as WaitsFor for the deadlock detector, is covered the day it is added), called
    by an identity that is not the agent's coordinator: PERMISSION_DENIED, before any handler."""
    with live_cluster.channel("agent-eu", identity=identity) as channel:
        for method in PARTICIPANT.methods:
            code = status_of_empty_call(channel, method)
            assert code is grpc.StatusCode.PERMISSION_DENIED, (method.name, code)
    assert "WaitsFor" in [m.name for m in PARTICIPANT.methods]


@pytest.fixture
def failpoints(live_cluster: Cluster) -> Iterator[chaos_grpc.FailpointsStub]:
    """The coordinator restarted with its Failpoints API (for the admin identity); restarted
    without it afterwards."""
    coordinator = live_cluster.component("coordinator")
    coordinator.env["TWOPC_COORDINATOR_ADMIN_FAILPOINTS"] = "1"
    live_cluster.restart("coordinator")
    try:
        with live_cluster.channel("coordinator", identity=ADMIN) as channel:
            yield chaos_grpc.FailpointsStub(channel)
    finally:
        coordinator.env.pop("TWOPC_COORDINATOR_ADMIN_FAILPOINTS", None)
        live_cluster.restart("coordinator")


def arm(failpoints: chaos_grpc.FailpointsStub, spec: str) -> None:
    """Arms the point that holds phase 2 back (re-arming releases a paused call)."""
    failpoints.Set(chaos_pb.SetFailpointRequest(name=PAUSED, spec=spec), timeout=5)


def fired(failpoints: chaos_grpc.FailpointsStub) -> int:
    answer = failpoints.List(chaos_pb.ListFailpointsRequest(), timeout=5)
    return next(p.fired for p in answer.failpoints if p.name == PAUSED)


def test_a_decided_transaction_commits_whole_while_strangers_try_to_roll_it_back(
    live_cluster: Cluster, failpoints: chaos_grpc.FailpointsStub, client: Client, bank: int
) -> None:
    """Finding 1 as it was found: Recover, then Rollback of each listed branch, while phase 2
    is held back (the COMMIT decision is durable, both branches prepared)."""
    arm(failpoints, "1*pause")
    txid = f"{live_cluster.coordinator_id}.r-attacked"
    with ThreadPoolExecutor(max_workers=1) as pool:
        work = {"eu": transfer_sql(-25, 5), "us": transfer_sql(25, 5)}
        commit = pool.submit(client.run, work, timeout=10, request_id="attacked")
        wait_until(lambda: fired(failpoints) == 1, 10, "phase 2 held back")
        assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}
        for identity in (OTHER_APP, CLIENT):
            assert set(attack_branches(live_cluster, txid, identity)) == {
                grpc.StatusCode.PERMISSION_DENIED
            }
        assert prepared(live_cluster) == {"eu": [txid], "us": [txid]}
        arm(failpoints, "")
        commit.result(timeout=10)
    wait_until(lambda: markers(live_cluster, txid) == {"eu", "us"}, 10, "phase 2")
    assert (balance(live_cluster, "eu", 5), balance(live_cluster, "us", 5)) == (975, 1025)
    assert client.get_transaction(txid).outcome is Outcome.COMMITTED


def test_the_admin_api_obeys_the_admin_identities_only(
    live_cluster: Cluster, failpoints: chaos_grpc.FailpointsStub
) -> None:
    request = chaos_pb.SetFailpointRequest(name=PAUSED, spec="crash")
    for identity in (CLIENT, OTHER_APP, COORDINATOR):
        with live_cluster.channel("coordinator", identity=identity) as channel:
            stub = chaos_grpc.FailpointsStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Set(request, timeout=5)
        assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"identity {identity!r} may not call twopc.chaos.v1.Failpoints/Set" in (
            raised.value.details() or ""
        )
        assert "admin_identities" in (raised.value.details() or "")
    listed = failpoints.List(chaos_pb.ListFailpointsRequest(), timeout=5)
    assert all(not p.spec for p in listed.failpoints)  # nothing was armed


# --- plaintext only when set -----------------------------------------------------------------


def run_daemon(
    kind: str, config: Path, environ: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "twopc.cli", kind, "--config", str(config)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(environ or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def agent_config(cluster: Cluster, path: Path, listen: str, extra: str) -> Path:
    database = cluster.component("mariadb-eu").address.rsplit(":", 1)[1]
    path.write_text(f'name = "eu"\nlisten = "{listen}"\nmysql_port = {database}\n{extra}')
    return path


def coordinator_config(cluster: Cluster, path: Path, listen: str, extra: str) -> Path:
    path.write_text(
        f'coordinator_id = "c7"\nlisten = "{listen}"\ndata_dir = "{path.parent / "data"}"\n'
        f"{extra}\n[participants]\n"
        f'eu = "{cluster.component("agent-eu").address}"\n'
    )
    return path


@pytest.mark.parametrize("kind", ["coordinator", "agent"])
def test_a_daemon_without_certificates_does_not_start_in_plaintext(
    live_cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    make = coordinator_config if kind == "coordinator" else agent_config
    listen = f"{LOOPBACK}:{free_port()}"
    daemon = run_daemon(kind, make(live_cluster, tmp_path / "config.toml", listen, ""))
    try:
        output, _ = daemon.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        output, _ = daemon.communicate(timeout=30)
        raise AssertionError(f"the {kind} started without certificates: {output}") from None
    assert daemon.returncode == 2, output
    (event,) = [e for e in events(output) if e["event"].endswith("_cannot_start")]
    assert event["error"].startswith("tls_cert, tls_key, tls_ca not set")
    assert "insecure_plaintext = true" in event["error"]


@pytest.mark.parametrize("kind", ["coordinator", "agent"])
def test_insecure_plaintext_serves_plaintext_and_says_so(
    live_cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    make = coordinator_config if kind == "coordinator" else agent_config
    listen = f"{LOOPBACK}:{free_port()}"
    # The agent reaches its database as the playground's agents do: the least-privilege user.
    password = live_cluster.component("agent-eu").env[AGENT_PASSWORD_ENV]
    daemon = run_daemon(
        kind,
        make(live_cluster, tmp_path / "config.toml", listen, "insecure_plaintext = true"),
        {AGENT_PASSWORD_ENV: password},
    )
    try:
        with grpc.insecure_channel(listen) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            if kind == "agent":
                info = pb_grpc.ParticipantStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
                assert info.participant == "eu"
            else:
                with Client(listen, insecure=True) as plaintext, pytest.raises(NotFound):
                    plaintext.get_transaction("elsewhere.r-x")
    finally:
        daemon.terminate()
        output, _ = daemon.communicate(timeout=60)
    (warning,) = [e for e in events(output) if e["event"] == "insecure_plaintext"]
    assert warning["level"] == "warning"
    assert warning["warning"].startswith(
        f"INSECURE: insecure_plaintext = true, TLS is off on {listen}"
    )
