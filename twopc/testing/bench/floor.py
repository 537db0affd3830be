"""The latency floor of a twopc commit, measured on the running cluster.

An early-answered one-shot commit cannot take less than one client round trip to the
coordinator, one round trip to the agents (execute and prepare travel in one message; the
slowest region counts) and one fsync of the decision log. Each part is measured here as the
median of a few probes, so that twopc's latency can be quoted as a ratio to what the hardware
and the injected network allow:

- the client round trip: a GetTransaction that the coordinator refuses at once (the txid names
  another coordinator), over the same link the benchmark's clients use;
- the agent round trip: GetInfo to each agent at the address the coordinator uses in the cell
  (``bench.paths``: its own with no injected latency, else its ``coordinator-agent-<region>``
  link, which carries the latency);
- the fsync: an ``fdatasync`` of a small append in the coordinator's data directory.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.tls import CLIENT, COORDINATOR

PROBES = 25
_OTHER_COORDINATORS_TXID = "floor-probe.r-probe"


@dataclass(frozen=True)
class Floor:
    client_ms: float
    agents_ms: float  # the slowest region's median
    fsync_ms: float

    @property
    def total_ms(self) -> float:
        return self.client_ms + self.agents_ms + self.fsync_ms

    def as_json(self) -> dict[str, float]:
        return {
            "client_ms": round(self.client_ms, 3),
            "agents_ms": round(self.agents_ms, 3),
            "fsync_ms": round(self.fsync_ms, 3),
            "total_ms": round(self.total_ms, 3),
        }


def measure_floor(
    cluster: Cluster, agents: Mapping[str, str] | None = None, probes: int = PROBES
) -> Floor:
    """The floor with the cluster's transport as it is (TLS, or plaintext), each agent reached
    at ``agents[region]`` (default: where the coordinator reaches it now)."""
    agents = agents if agents is not None else cluster.agent_addresses()
    with cluster.channel(cluster.coordinator_address, identity=CLIENT) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = pb.GetTransactionRequest(txid=_OTHER_COORDINATORS_TXID)

        def refused() -> None:
            try:
                stub.GetTransaction(request, timeout=5)
            except grpc.RpcError as err:
                if err.code() is not grpc.StatusCode.NOT_FOUND:
                    raise

        client_ms = _median_ms(refused, probes)
    agents_ms = max(_agent_round_trip_ms(cluster, agents[r], probes) for r in cluster.regions)
    fsync_ms = _fsync_ms(Path(cluster.component("coordinator").data_dir), probes)
    return Floor(client_ms, agents_ms, fsync_ms)


def _agent_round_trip_ms(cluster: Cluster, address: str, probes: int) -> float:
    with cluster.channel(address, identity=COORDINATOR) as channel:  # as the coordinator calls
        stub = pb_grpc.ParticipantStub(channel)
        return _median_ms(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=5), probes)


def _fsync_ms(directory: Path, probes: int) -> float:
    path = directory / "floor-probe.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:

        def append_and_sync() -> None:
            os.write(fd, b"x" * 64)
            os.fdatasync(fd)

        return _median_ms(append_and_sync, probes)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def _median_ms(probe: Callable[[], object], probes: int) -> float:
    probe()  # the first call pays for the connection
    samples = []
    for _ in range(probes):
        began = time.perf_counter()
        probe()
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)
