"""The operator's API (``twopc.v1.Admin``) obeys ``admin_identities`` alone, and is not served
in plaintext unless ``admin_plaintext`` says so."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.security.test_tls import coordinator_config, events, run_daemon
from twopc.api import admin_pb2 as pb
from twopc.api import admin_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.ports import LOOPBACK, free_port
from twopc.testing.playground.tls import ADMIN, CLIENT, COORDINATOR, OTHER_APP

TXID = "c1.r-admin-access"


def calls(stub: pb_grpc.AdminStub) -> dict[str, Callable[[], Any]]:
    """Every Admin RPC, with a request it would carry out for an admin identity."""
    return {
        "List": lambda: stub.List(pb.AdminListRequest(), timeout=10),
        "Show": lambda: stub.Show(pb.AdminShowRequest(txid=TXID), timeout=10),
        "Resolve": lambda: stub.Resolve(
            pb.AdminResolveRequest(txid=TXID, resolution=pb.RESOLUTION_ABORT, reason="attack"),
            timeout=10,
        ),
        "Drain": lambda: stub.Drain(pb.DrainRequest(reason="attack"), timeout=10),
        "Undrain": lambda: stub.Undrain(pb.DrainRequest(reason="attack"), timeout=10),
        "Audit": lambda: stub.Audit(pb.AuditRequest(), timeout=10),
    }


def test_every_admin_rpc_refuses_identities_beyond_admin_identities(
    live_cluster: Cluster,
) -> None:
    with live_cluster.channel("coordinator", identity=ADMIN) as channel:
        admin = pb_grpc.AdminStub(channel)
        audited = len(admin.Audit(pb.AuditRequest(), timeout=10).entries)
        for identity in (CLIENT, OTHER_APP, COORDINATOR):
            with live_cluster.channel("coordinator", identity=identity) as theirs:
                for name, call in calls(pb_grpc.AdminStub(theirs)).items():
                    with pytest.raises(grpc.RpcError) as raised:
                        call()
                    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
                    details = raised.value.details() or ""
                    assert f"identity {identity!r} may not call twopc.v1.Admin/{name}" in details
                    assert "admin_identities" in details
        # Nothing they asked was done, or even audited.
        assert not admin.List(pb.AdminListRequest(), timeout=10).draining
        assert len(admin.Audit(pb.AuditRequest(), timeout=10).entries) == audited


@pytest.mark.parametrize("allowed", [False, True], ids=["plaintext", "admin_plaintext"])
def test_in_plaintext_the_admin_api_is_served_only_when_set(
    live_cluster: Cluster, tmp_path: Path, allowed: bool
) -> None:
    listen = f"{LOOPBACK}:{free_port()}"
    extra = "insecure_plaintext = true" + ("\nadmin_plaintext = true" if allowed else "")
    daemon = run_daemon(
        "coordinator", coordinator_config(live_cluster, tmp_path / "config.toml", listen, extra)
    )
    try:
        with grpc.insecure_channel(listen) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = pb_grpc.AdminStub(channel)
            if allowed:
                # Served: its agent (a TLS one) cannot be asked from plaintext, and says so.
                listing = stub.List(pb.AdminListRequest(), timeout=30)
                assert listing.coordinator_id == "c7"
                assert list(listing.unreachable) == ["eu"]
            else:
                with pytest.raises(grpc.RpcError) as raised:
                    stub.List(pb.AdminListRequest(), timeout=10)
                assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        daemon.terminate()
        try:
            output, _ = daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            output, _ = daemon.communicate(timeout=60)
    warned = [e for e in events(output) if e["event"] == "insecure_admin_api"]
    assert len(warned) == (1 if allowed else 0)
