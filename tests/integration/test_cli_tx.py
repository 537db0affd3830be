"""``twopc tx`` as a user runs it: where it finds the coordinator, lookups by txid and by request
id, and an exit status of its own when no record of the transaction exists anywhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import run_twopc, transfer_sql
from twopc.client import Client, TlsConfig, TransactionAborted
from twopc.testing.playground.cluster import STATE_FILE, Cluster

ROOT = Path(__file__).resolve().parents[2]


def twopc_tx(
    *arguments: str,
    cwd: Path,
    coordinator_env: str | None = None,
    tls: TlsConfig | None = None,
) -> subprocess.CompletedProcess[str]:
    """``twopc tx`` in ``cwd``, with ``TWOPC_COORDINATOR`` and the ``TWOPC_TLS_*`` variables
    set from ``coordinator_env`` and ``tls`` only."""
    return run_twopc("tx", *arguments, cwd=cwd, coordinator=coordinator_env, tls=tls)


def fields(stdout: str) -> dict[str, str]:
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in stdout.splitlines())
    }


@pytest.fixture
def committed(client: Client, bank: int) -> str:
    """The request id of a committed transfer."""
    client.run(
        {"eu": transfer_sql(-3, 1), "us": transfer_sql(3, 1)},
        request_id="cli-tx-committed",
        wait_for_phase2=True,
    )
    return "cli-tx-committed"


def test_by_request_id_with_the_address_in_the_environment(
    live_cluster: Cluster, committed: str, tmp_path: Path
) -> None:
    done = twopc_tx(
        "--request-id",
        committed,
        cwd=tmp_path,
        coordinator_env=live_cluster.coordinator_address,
        tls=live_cluster.client_tls(),
    )
    assert done.returncode == 0, done.stderr
    answer = fields(done.stdout)
    assert answer["txid"] == f"{live_cluster.coordinator_id}.r-{committed}"
    assert answer["request id"] == committed
    assert answer["state"] == "COMMITTED"
    assert answer["outcome"] == "COMMITTED"
    assert answer["participants"] == "eu, us"


def test_by_txid_with_the_address_from_the_playground_state_file(
    live_cluster: Cluster, committed: str, tmp_path: Path
) -> None:
    """Run where ``twopc playground`` was started: its state file names the coordinator and
    the client's certificate."""
    (tmp_path / ".twopc-playground").mkdir()
    state = json.loads(live_cluster.state_path.read_text())
    (tmp_path / ".twopc-playground" / STATE_FILE).write_text(json.dumps(state))
    txid = f"{live_cluster.coordinator_id}.r-{committed}"
    done = twopc_tx(txid, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert fields(done.stdout)["outcome"] == "COMMITTED"


def test_an_aborted_transaction_is_found(
    live_cluster: Cluster, client: Client, bank: int, tmp_path: Path
) -> None:
    with pytest.raises(TransactionAborted):
        client.run(
            {"eu": transfer_sql(1, 1), "us": [("INSERT INTO accounts VALUES (1, 0)", [])]},
            request_id="cli-tx-aborted",
        )
    done = twopc_tx(
        "--request-id",
        "cli-tx-aborted",
        cwd=tmp_path,
        coordinator_env=live_cluster.coordinator_address,
        tls=live_cluster.client_tls(),
    )
    assert done.returncode == 0, done.stderr
    answer = fields(done.stdout)
    assert answer["outcome"] == "ABORTED"
    assert "Duplicate entry" in answer["reason"]


@pytest.mark.parametrize("by", ["txid", "request-id"])
def test_no_record_anywhere_has_an_exit_status_of_its_own(
    live_cluster: Cluster, tmp_path: Path, by: str
) -> None:
    """A mistyped but well-formed id: the coordinator presumes abort, and no participant knows
    it. That is said as such, not as an ordinary ABORTED."""
    lookup = (
        [f"{live_cluster.coordinator_id}.r-never-ran"]
        if by == "txid"
        else ["--request-id", "never-ran"]
    )
    done = twopc_tx(
        *lookup,
        cwd=tmp_path,
        coordinator_env=live_cluster.coordinator_address,
        tls=live_cluster.client_tls(),
    )
    assert done.returncode == 3, done.stdout + done.stderr
    answer = fields(done.stdout)
    assert answer["txid"] == f"{live_cluster.coordinator_id}.r-never-ran"
    assert answer["record"] == "none, on the coordinator or on any participant"
    assert "nothing of it is committed" in answer["meaning"]
    assert "state" not in answer
    assert "outcome" not in answer


def test_failures_and_wrong_usage(live_cluster: Cluster, tmp_path: Path) -> None:
    address = live_cluster.coordinator_address
    tls = live_cluster.client_tls()
    malformed = twopc_tx("not-a-txid", cwd=tmp_path, coordinator_env=address, tls=tls)
    assert malformed.returncode == 1
    assert "InvalidArgument" in malformed.stderr
    assert f"(coordinator {address}, from $TWOPC_COORDINATOR; TLS from $TWOPC_TLS_CERT" in (
        malformed.stderr
    )
    elsewhere = twopc_tx("elsewhere.r-x", cwd=tmp_path, coordinator_env=address, tls=tls)
    assert elsewhere.returncode == 1
    assert "NotFound" in elsewhere.stderr
    both = twopc_tx("c1.r-x", "--request-id", "x", cwd=tmp_path, coordinator_env=address, tls=tls)
    assert both.returncode == 2
    neither = twopc_tx(cwd=tmp_path, coordinator_env=address, tls=tls)
    assert neither.returncode == 2


def test_no_certificate_no_lookup(live_cluster: Cluster, tmp_path: Path) -> None:
    """Without a certificate it says what to set; in plaintext the coordinator will not talk."""
    address = live_cluster.coordinator_address
    bare = twopc_tx("c1.r-x", cwd=tmp_path, coordinator_env=address)
    assert bare.returncode == 2
    assert "no TLS configuration: set TWOPC_TLS_CERT, TWOPC_TLS_KEY and TWOPC_TLS_CA" in (
        bare.stderr
    )
    plaintext = twopc_tx("c1.r-x", "--insecure", cwd=tmp_path, coordinator_env=address)
    assert plaintext.returncode == 1
    assert "Unavailable" in plaintext.stderr
    assert "TLS from --insecure" in plaintext.stderr
