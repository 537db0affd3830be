"""The gRPC face of the operator's API (``twopc.v1.Admin``): protobuf in, ``Operator`` calls,
protobuf out. The daemon serves it to ``admin_identities`` alone (``daemon.access_control``);
the caller's identity is what the audit records name."""

from __future__ import annotations

from grpc import aio

from coordinator.engine.admin import (
    AuditRecord,
    Branch,
    Operator,
    Verdict,
)
from coordinator.engine.ports import Presence
from coordinator.servicer import STATES, guard, transaction_info
from twopc.api import admin_pb2 as pb
from twopc.api import admin_pb2_grpc as pb_grpc
from twopc.api import twopc_pb2
from twopc.errors import InvalidArgument
from twopc.identity import peer_identity
from twopc.txid import parse_txid

__all__ = ["AdminServicer"]

Context = aio.ServicerContext[object, object]

_BRANCH_STATES = {
    Presence.UNKNOWN: twopc_pb2.BRANCH_STATE_UNKNOWN,
    Presence.ACTIVE: twopc_pb2.BRANCH_STATE_ACTIVE,
    Presence.PREPARED: twopc_pb2.BRANCH_STATE_PREPARED,
    Presence.COMMITTED: twopc_pb2.BRANCH_STATE_COMMITTED,
    Presence.ROLLED_BACK: twopc_pb2.BRANCH_STATE_ROLLED_BACK,
}
_VERDICTS = {pb.RESOLUTION_COMMIT: Verdict.COMMIT, pb.RESOLUTION_ABORT: Verdict.ABORT}


def audit_entry(record: AuditRecord) -> pb.AuditEntry:
    return pb.AuditEntry(
        at_ms=record.at_ms,
        identity=record.identity,
        action=record.action,
        txid=record.txid,
        outcome=record.outcome,
        reason=record.reason,
    )


def _branch(branch: Branch) -> pb.BranchReport:
    state = (
        _BRANCH_STATES[branch.presence]
        if branch.presence is not None
        else twopc_pb2.BRANCH_STATE_UNSPECIFIED
    )
    return pb.BranchReport(participant=branch.participant, state=state, error=branch.error)


def _txid(txid: str) -> str:
    if not txid:
        raise InvalidArgument("txid is required")
    parse_txid(txid)
    return txid


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, operator: Operator) -> None:
        self._operator = operator

    async def List(self, request: pb.AdminListRequest, context: Context) -> pb.AdminListResponse:
        async def run() -> pb.AdminListResponse:
            found = await self._operator.listing(request.limit, request.coordinator_id)
            return pb.AdminListResponse(
                coordinator_id=found.coordinator_id,
                draining=found.draining,
                live_count=found.live_count,
                live=[
                    pb.LiveTransaction(
                        txid=e.txid,
                        state=STATES[e.state],
                        age_ms=int(e.age_s * 1000),
                        participants=list(e.participants),
                        holder=e.holder or "",
                        request_id=e.request_id,
                    )
                    for e in found.live
                ],
                in_doubt=[
                    pb.InDoubtTransaction(
                        txid=d.txid, prepared_on=list(d.prepared_on), commit_logged=d.commit_logged
                    )
                    for d in found.in_doubt
                ],
                unreachable=found.unreachable,
                truncated=found.truncated,
            )

        return await guard(context, "", run, "twopc.v1.Admin/List")

    async def Show(self, request: pb.AdminShowRequest, context: Context) -> pb.AdminShowResponse:
        async def run() -> pb.AdminShowResponse:
            report = await self._operator.show(_txid(request.txid))
            record = report.commit_record
            return pb.AdminShowResponse(
                info=transaction_info(report.view),
                live=report.live,
                foreign=report.foreign,
                holder=report.view.owner or "",
                age_ms=int(report.age_s * 1000),
                commit_logged=record is not None,
                decision_participants=list(record.participants) if record is not None else [],
                branches=[_branch(b) for b in report.branches],
                audit=[audit_entry(a) for a in report.audits],
            )

        return await guard(context, request.txid, run, "twopc.v1.Admin/Show")

    async def Resolve(
        self, request: pb.AdminResolveRequest, context: Context
    ) -> pb.AdminResolveResponse:
        async def run() -> pb.AdminResolveResponse:
            verdict = _VERDICTS.get(request.resolution)
            if verdict is None:
                raise InvalidArgument("resolution must be COMMIT or ABORT")
            done = await self._operator.resolve(
                _txid(request.txid), verdict, request.reason, peer_identity(context) or ""
            )
            return pb.AdminResolveResponse(
                txid=done.txid, state=STATES[done.state], detail=done.detail
            )

        return await guard(context, request.txid, run, "twopc.v1.Admin/Resolve")

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.DrainResponse:
        async def run() -> pb.DrainResponse:
            await self._operator.drain(peer_identity(context) or "", request.reason)
            return self._drain_state()

        return await guard(context, "", run, "twopc.v1.Admin/Drain")

    async def Undrain(self, request: pb.DrainRequest, context: Context) -> pb.DrainResponse:
        async def run() -> pb.DrainResponse:
            await self._operator.undrain(peer_identity(context) or "", request.reason)
            return self._drain_state()

        return await guard(context, "", run, "twopc.v1.Admin/Undrain")

    async def Audit(self, request: pb.AuditRequest, context: Context) -> pb.AuditResponse:
        async def run() -> pb.AuditResponse:
            txid = _txid(request.txid) if request.txid else ""
            entries = self._operator.audits(txid, request.limit)
            return pb.AuditResponse(entries=[audit_entry(a) for a in entries])

        return await guard(context, request.txid, run, "twopc.v1.Admin/Audit")

    def _drain_state(self) -> pb.DrainResponse:
        listing = self._operator.manager
        return pb.DrainResponse(draining=listing.draining, live_count=listing.live_count)
