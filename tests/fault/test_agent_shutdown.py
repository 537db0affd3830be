"""An agent stops promptly on SIGTERM even while a statement of a branch is still running.

Found by the chaos run with seed 105: a graceful restart of an agent whose thread was stuck in a
database read waited a minute for the branch, then lingered until the read timed out, with its
port already closed: neither serving nor gone, so nothing restarted it."""

from __future__ import annotations

import signal
import threading
import time

import grpc

from tests.support import sleeping_sessions, transfer_sql
from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.client import Client
from twopc.testing.playground.cluster import Cluster, wait_until
from twopc.testing.playground.tls import COORDINATOR


def test_agent_stops_promptly_on_sigterm_with_a_statement_still_running(
    live_cluster: Cluster,
) -> None:
    agent = live_cluster.component("agent-us")
    errors: list[grpc.RpcError] = []

    def long_statement() -> None:
        with live_cluster.channel("agent-us", identity=COORDINATOR) as channel:
            try:
                pb_grpc.ParticipantStub(channel).Execute(
                    pb.BranchExecuteRequest(
                        txid="elsewhere.r-shutdown",
                        participant="us",
                        sequence=1,
                        timeout_ms=120_000,
                        statements=[pb.Statement(sql="SELECT SLEEP(60)")],
                    ),
                    timeout=90,
                )
            except grpc.RpcError as err:
                errors.append(err)

    caller = threading.Thread(target=long_statement)
    caller.start()
    wait_until(lambda: sleeping_sessions(live_cluster, "us") == 1, 10, "the statement running")

    asked = time.monotonic()
    agent.send(signal.SIGTERM)
    wait_until(lambda: not agent.alive(), 20, "the agent exiting after SIGTERM")
    assert time.monotonic() - asked < 15
    caller.join(timeout=30)
    assert errors, "the interrupted call fails; it does not hang"
    wait_until(lambda: sleeping_sessions(live_cluster, "us") == 0, 10, "the session ended")


def test_agent_with_an_open_pipeline_stops_at_once_on_sigterm(
    live_cluster: Cluster, client: Client, bank: int
) -> None:
    """The coordinator keeps a Pipeline stream open to every agent. On SIGTERM the agent ends
    the stream itself once its work in flight is answered, instead of waiting out the server's
    grace period for a call that never ends."""
    client.run({"eu": transfer_sql(-1, 3), "us": transfer_sql(1, 3)}, timeout=5)  # stream open
    agent = live_cluster.component("agent-us")
    asked = time.monotonic()
    agent.send(signal.SIGTERM)
    wait_until(lambda: not agent.alive(), 20, "the agent exiting after SIGTERM")
    assert time.monotonic() - asked < 3, "the open stream held the agent's shutdown"
