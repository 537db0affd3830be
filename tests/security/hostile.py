"""A hostile caller's tools: raw gRPC stubs to the coordinator and the agents of a cluster (no SDK
checks anything on the way), and what a test reads back to prove that nothing started."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest

from twopc.api import twopc_pb2 as pb
from twopc.api import twopc_pb2_grpc as pb_grpc
from twopc.testing.playground.cluster import Cluster
from twopc.testing.playground.tls import CLIENT, COORDINATOR

# Room for the oversized requests the tests send (the daemons, not the channel, must refuse).
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_ids = itertools.count(1)


def _channel(cluster: Cluster, address: str, identity: str) -> grpc.Channel:
    tls = cluster.client_tls(identity)
    if tls is None:
        return grpc.insecure_channel(address, options=_OPTIONS)
    options = [*tls.channel_options(), *_OPTIONS]
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


@contextmanager
def agent(cluster: Cluster, region: str) -> Iterator[pb_grpc.ParticipantStub]:
    """The Participant API of ``region``'s agent as the coordinator's identity reaches it: what
    the agent itself refuses from a caller it obeys (strangers get no further than TLS:
    tests/security/test_tls.py)."""
    address = cluster.component(f"agent-{region}").address
    with _channel(cluster, address, COORDINATOR) as channel:
        yield pb_grpc.ParticipantStub(channel)


@contextmanager
def coordinator(cluster: Cluster) -> Iterator[pb_grpc.CoordinatorStub]:
    """The Coordinator API as an application's identity reaches it."""
    with _channel(cluster, cluster.coordinator_address, CLIENT) as channel:
        yield pb_grpc.CoordinatorStub(channel)


def new_txid(cluster: Cluster) -> str:
    """A txid of the cluster's coordinator that nothing has used."""
    return f"{cluster.coordinator_id}.{secrets.token_hex(16)}"


def new_request_id(what: str) -> str:
    return f"hostile-{what}-{next(_ids)}-{secrets.token_hex(4)}"


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The error status that ``call`` ended with (it must end with one)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()  # type: ignore[attr-defined, no-any-return]


def details(error: grpc.RpcError) -> str:
    return str(error.details())  # type: ignore[attr-defined]


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def branch_state(cluster: Cluster, region: str, txid: str) -> int:
    """What ``region``'s agent knows of ``txid``'s branch (a BranchState)."""
    with agent(cluster, region) as stub:
        answer = stub.Inspect(pb.InspectRequest(txids=[txid]), timeout=10)
    return answer.branches[0].state


def live_branches(cluster: Cluster, region: str) -> int:
    """Active plus prepared branches that ``region``'s agent holds."""
    with agent(cluster, region) as stub:
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    return info.active_branches + info.prepared_branches


def statement(sql: str, *params: pb.Value) -> pb.Statement:
    return pb.Statement(sql=sql, params=list(params))
