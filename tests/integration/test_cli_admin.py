"""``twopc admin`` as an operator runs it, in a subprocess against the session cluster: the
admin identity from the environment or from the playground's state file, tables and JSON, a
stray branch concluded, drain and undrain, and the refusals (no reason, another identity)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import prepare_on_agent, prepared, run_twopc
from twopc.client import Client
from twopc.testing.playground.cluster import TEST_COORDINATOR_ID as RETIRED
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.tls import ADMIN, CLIENT
from twopc.tls import TlsConfig

ROOT = Path(__file__).resolve().parents[2]


def twopc_admin(
    *arguments: str, cwd: Path, tls: TlsConfig | None, coordinator: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``twopc admin ARGUMENTS`` in ``cwd``, with the ``TWOPC_TLS_*`` variables from ``tls``
    only (none: the playground's state file under ``cwd``, if any)."""
    return run_twopc("admin", *arguments, cwd=cwd, coordinator=coordinator, tls=tls)


def as_admin(cluster: Cluster, cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return twopc_admin(
        *arguments,
        cwd=cwd,
        tls=cluster.client_tls(ADMIN),
        coordinator=cluster.coordinator_address,
    )


def test_list_and_show_as_a_table_and_as_json(
    live_cluster: Cluster, client: Client, bank: int, tmp_path: Path
) -> None:
    tx = client.begin(timeout=30)
    tx.execute("eu", "SELECT balance FROM accounts WHERE id = %s", [1])
    try:
        table = as_admin(live_cluster, tmp_path, "list")
        assert table.returncode == 0, table.stderr
        assert "admitting, 1 live" in table.stdout
        [row] = [line for line in table.stdout.splitlines() if tx.txid in line]
        assert row.split()[1:4] == ["ACTIVE", row.split()[2], CLIENT]
        answer = json.loads(as_admin(live_cluster, tmp_path, "list", "--json").stdout)
        assert [(t["txid"], t["holder"]) for t in answer["live"]] == [(tx.txid, CLIENT)]
        shown = as_admin(live_cluster, tmp_path, "show", tx.txid)
        assert shown.returncode == 0, shown.stderr
        assert f"txid:          {tx.txid}" in shown.stdout
        assert "holder:        client" in shown.stdout
        assert any(line.split()[:2] == ["eu", "ACTIVE"] for line in shown.stdout.splitlines())
    finally:
        tx.rollback()


def test_a_stray_branch_is_resolved_with_a_reason_and_audited(
    live_cluster: Cluster, bank: int, tmp_path: Path
) -> None:
    stray = f"{RETIRED}.r-cli-stray"
    prepare_on_agent(live_cluster, "us", stray, 3, 7)
    no_reason = as_admin(live_cluster, tmp_path, "resolve", stray, "--abort")
    assert no_reason.returncode == 2
    assert "--reason" in no_reason.stderr
    listed = as_admin(live_cluster, tmp_path, "list", "--coordinator-id", RETIRED)
    assert any(line.split()[:2] == [stray, "us"] for line in listed.stdout.splitlines())
    done = as_admin(
        live_cluster, tmp_path, "resolve", stray, "--abort", "--reason", "OPS-9: retired"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{stray}: ABORTED")
    assert not prepared(live_cluster)
    audit = as_admin(live_cluster, tmp_path, "audit", "--txid", stray, "--json")
    entries = json.loads(audit.stdout)["entries"]
    assert [(e["identity"], e["outcome"], e["reason"]) for e in entries] == [
        (ADMIN, "abort", "OPS-9: retired")
    ]


def test_drain_and_undrain_with_the_playgrounds_admin_identity(
    live_cluster: Cluster, client: Client, tmp_path: Path
) -> None:
    """No TWOPC_TLS_* set: run from where the playground's state file is, the command finds the
    coordinator and the admin identity there."""
    (tmp_path / ".twopc-playground").symlink_to(live_cluster.directory)
    try:
        drained = twopc_admin("drain", "--reason", "OPS-10", cwd=tmp_path, tls=None)
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.startswith("DRAINING")
        listed = twopc_admin("list", cwd=tmp_path, tls=None)
        assert "DRAINING (admits no new transaction)" in listed.stdout
    finally:
        undrained = twopc_admin("undrain", cwd=tmp_path, tls=None)
    assert undrained.returncode == 0, undrained.stderr
    assert undrained.stdout.startswith("admitting")
    client.run({"eu": [("SELECT 1", [])]})


def test_another_identity_is_refused_and_told_why(live_cluster: Cluster, tmp_path: Path) -> None:
    refused = twopc_admin(
        "drain",
        cwd=tmp_path,
        tls=live_cluster.client_tls(CLIENT),
        coordinator=live_cluster.coordinator_address,
    )
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr
    assert "admin_identities" in refused.stderr
    listed = as_admin(live_cluster, tmp_path, "list", "--json")
    assert not json.loads(listed.stdout).get("draining", False)
