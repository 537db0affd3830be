"""The daemons run under the kernel rule behind systemd's ``MemoryDenyWriteExecute=yes``, which
the units in deploy/systemd set: no memory both writable and executable (``PR_SET_MDWE``, the
same refusal, inherited by everything the process starts). grpc with TLS, uvloop, aiomysql,
prometheus-client and the OpenTelemetry SDK must all do without it."""

from __future__ import annotations

import ctypes
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import transfer_sql
from twopc.testing.playground.bank import create_accounts
from twopc.testing.playground.cluster import Cluster

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Runs Python with the rule set, then execs the real interpreter with the same arguments.
WRAPPER = f"""#!{sys.executable}
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    raise SystemExit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.environ["TWOPC_TEST_MDWE"] = str(libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0))
os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
"""


def _mdwe_supported() -> bool:
    """The kernel knows PR_GET_MDWE (Linux 6.3 and later)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+): the rule cannot be applied")
    directory = tmp_path_factory.mktemp("mdwe")
    wrapper = directory / "python-mdwe"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    cluster = Cluster.create(
        directory,
        ["eu", "us"],
        python=str(wrapper),
        coordinator_settings={"trace_file": str(directory / "spans.jsonl")},
    )
    try:
        cluster.up()
        create_accounts(cluster, 4)
        yield cluster
    finally:
        cluster.down(timeout=10)


def _refuses_write_execute(pid: int) -> bool:
    """The rule is in force in ``pid``: the wrapper set it and read it back before it became
    the daemon (the rule stays across exec), and said so in the daemon's environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return f"TWOPC_TEST_MDWE={PR_MDWE_REFUSE_EXEC_GAIN}".encode() in environ


def test_the_daemons_run_a_transaction_with_no_writable_executable_memory(
    cluster: Cluster,
) -> None:
    with cluster.client() as client:
        result = client.run({"eu": transfer_sql(-1, 1), "us": transfer_sql(1, 1)}, timeout=10)
    assert result.state.name in ("COMMITTING", "COMMITTED")
    for name in ("coordinator", "agent-eu", "agent-us"):
        component = cluster.components[name]
        assert component.alive(), name
        assert component.pid is not None
        assert _refuses_write_execute(component.pid), name
    assert (Path(cluster.directory) / "spans.jsonl").stat().st_size > 0  # the SDK exported
