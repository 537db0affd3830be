"""The ``twopc.chaos.v1.Failpoints`` service: arms, changes and lists the failpoints of a running
daemon (coordinator or agent).

Test tooling: a daemon serves it only when its configuration sets ``admin_failpoints = true``;
otherwise its calls get UNIMPLEMENTED. Anyone who reaches the port can then crash or stall the
process, so never enable it where the port is reachable by others.
"""

from __future__ import annotations

from grpc import aio

from twopc.api import chaos_pb2 as chaos_pb
from twopc.api import chaos_pb2_grpc as chaos_grpc
from twopc.errors import TwopcError
from twopc.failpoints import Failpoints
from twopc.status import abort_with

__all__ = ["FailpointAdmin", "add_failpoint_admin"]

Context = aio.ServicerContext[object, object]


class FailpointAdmin(chaos_grpc.FailpointsServicer):
    """Serves one process's ``Failpoints``. Both calls answer with every known point."""

    def __init__(self, failpoints: Failpoints) -> None:
        self._failpoints = failpoints

    async def Set(
        self, request: chaos_pb.SetFailpointRequest, context: Context
    ) -> chaos_pb.FailpointList:
        """Arms ``name`` with ``spec`` (empty: disarms); INVALID_ARGUMENT for an unknown name or
        a bad spec, naming what is wrong."""
        try:
            self._failpoints.set(request.name, request.spec)
        except TwopcError as err:
            await abort_with(context, err)
        return self._list()

    async def List(
        self, request: chaos_pb.ListFailpointsRequest, context: Context
    ) -> chaos_pb.FailpointList:
        return self._list()

    def _list(self) -> chaos_pb.FailpointList:
        return chaos_pb.FailpointList(
            failpoints=[
                chaos_pb.Failpoint(name=s.name, spec=s.spec, hits=s.hits, fired=s.fired)
                for s in self._failpoints.snapshot()
            ]
        )


def add_failpoint_admin(server: aio.Server, failpoints: Failpoints) -> None:
    chaos_grpc.add_FailpointsServicer_to_server(FailpointAdmin(failpoints), server)
