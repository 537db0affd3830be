"""``twopc admin``: the operator's command (the coordinator's ``twopc.v1.Admin`` API).

    twopc admin list [--limit N] [--coordinator-id ID]
    twopc admin show TXID
    twopc admin resolve TXID (--commit | --abort) --reason TEXT
    twopc admin drain [--reason TEXT] | undrain [--reason TEXT]
    twopc admin audit [--txid TXID] [--limit N]

Each takes ``--coordinator ADDR`` (as ``twopc tx``), ``--insecure`` and ``--json``. The caller's
identity must be one of the coordinator's ``admin_identities``: its certificate comes from
``$TWOPC_TLS_CERT``, ``$TWOPC_TLS_KEY`` and ``$TWOPC_TLS_CA``, else from the playground's state
file (its ``admin`` identity). Needs grpcio and protobuf only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Exit statuses.
OK = 0
FAILED = 1  # the coordinator refused or could not be reached; stderr says why
USAGE = 2

EXIT_STATUS = f"""\
exit status:
  {OK}  the coordinator answered (printed)
  {FAILED}  it refused (a decision the verdict contradicts, a caller not in its
     admin_identities, ...) or could not be reached; stderr says why
  {USAGE}  wrong usage, or no TLS configuration found
"""


def add_arguments(admin: argparse.ArgumentParser, common: Callable[[Any], None]) -> None:
    """The ``twopc admin`` subcommands; ``common`` adds --coordinator and --insecure."""
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        common(parser)
        parser.add_argument("--json", action="store_true", help="print the answer as JSON")
        return parser

    listing = action("list", "live transactions and in-doubt ones (prepared, no live owner)")
    listing.add_argument("--limit", type=int, default=0, help="at most N of each (default 1000)")
    listing.add_argument(
        "--coordinator-id",
        default="",
        metavar="ID",
        help="list the in-doubt branches of another coordinator id (a decommissioned one's)",
    )
    show = action("show", "everything known of one transaction, each agent's branch included")
    show.add_argument("txid")
    resolve = action(
        "resolve",
        "commit or abort a transaction by hand (never against a logged decision); audited",
    )
    resolve.add_argument("txid")
    verdict = resolve.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--commit", action="store_true", help="commit it")
    verdict.add_argument("--abort", action="store_true", help="abort it")
    resolve.add_argument("--reason", required=True, help="why (audited; required)")
    for name, what in (
        ("drain", "stop admitting new transactions; live ones finish"),
        ("undrain", "admit new transactions again"),
    ):
        action(name, what).add_argument("--reason", default="", help="why (audited)")
    audit = action("audit", "the audit records the coordinator keeps, oldest first")
    audit.add_argument("--txid", default="", help="only this transaction's")
    audit.add_argument("--limit", type=int, default=0, help="the last N (default 1000)")


def admin_tls_files(
    insecure: bool, environ: Mapping[str, str], state_file: Path
) -> tuple[dict[str, str] | None, str]:
    """The certificate, key and CA to present, and where they came from: none with
    ``--insecure``; $TWOPC_TLS_* when one is set; else the playground's ``admin`` identity.

    Raises:
        ValueError: none found (the message says what to set).
    """
    from twopc.tls import ENV_CA, ENV_CERT, ENV_KEY

    if insecure:
        return None, "--insecure"
    if any(environ.get(name) for name in (ENV_CERT, ENV_KEY, ENV_CA)):
        files = {"cert": environ.get(ENV_CERT, ""), "key": environ.get(ENV_KEY, "")}
        files["ca"] = environ.get(ENV_CA, "")
        return files, f"${ENV_CERT}, ${ENV_KEY}, ${ENV_CA}"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads(state_file.read_text())
        where = f"the playground's {state_file} (identity admin)"
        if recorded.get("plaintext"):
            return None, f"{where} (plaintext)"
        tls = recorded["tls"]
        admin = tls["identities"]["admin"]
        return {"cert": admin["cert"], "key": admin["key"], "ca": tls["ca"]}, where
    raise ValueError(
        f"no TLS configuration: set {ENV_CERT}, {ENV_KEY} and {ENV_CA} to an admin identity's "
        "certificate, its key and the coordinator's CA (one of its admin_identities), run from "
        "where the playground runs, or give --insecure for a coordinator run in plaintext with "
        "admin_plaintext = true"
    )


def run(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    coordinator: tuple[str, str],
    state_file: Path,
) -> int:
    """Runs ``args.action`` against ``coordinator`` (its address, and where that came from);
    ``state_file`` is the playground's, for its admin identity."""
    address, source = coordinator
    try:
        files, tls_source = admin_tls_files(args.insecure, environ, state_file)
    except ValueError as err:
        print(f"twopc admin: {err}", file=sys.stderr)
        return USAGE
    if args.action == "resolve" and not args.reason.strip():
        print("twopc admin resolve: --reason must say why (it is audited)", file=sys.stderr)
        return USAGE

    import grpc

    from twopc.api import admin_pb2 as pb
    from twopc.api import admin_pb2_grpc as pb_grpc
    from twopc.errors import TwopcError
    from twopc.tls import TlsConfig

    def failed(what: str) -> int:
        print(
            f"twopc admin {args.action}: {what} (coordinator {address}, from {source}; TLS from "
            f"{tls_source})",
            file=sys.stderr,
        )
        return FAILED

    try:
        if files is None:
            channel = grpc.insecure_channel(address)
        else:
            tls = TlsConfig(files["cert"], files["key"], files["ca"])
            channel = grpc.secure_channel(
                address, tls.channel_credentials(), options=tls.channel_options()
            )
    except TwopcError as err:  # a TLS file that cannot be read
        return failed(f"{type(err).__name__}: {err.message}")
    with channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            answer = _call(stub, pb, args)
        except grpc.RpcError as err:
            code = err.code().name if err.code() is not None else "UNKNOWN"
            return failed(f"{code}: {err.details()}")
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(
            json.dumps(
                MessageToDict(answer, preserving_proto_field_name=True), indent=2, sort_keys=True
            )
        )
        return OK
    for line in _render(args.action, answer):
        print(line)
    return OK


_TIMEOUT_S = 30.0


def _call(stub: Any, pb: Any, args: argparse.Namespace) -> Any:
    if args.action == "list":
        request = pb.AdminListRequest(limit=args.limit, coordinator_id=args.coordinator_id)
        return stub.List(request, timeout=_TIMEOUT_S)
    if args.action == "show":
        return stub.Show(pb.AdminShowRequest(txid=args.txid), timeout=_TIMEOUT_S)
    if args.action == "resolve":
        resolution = pb.RESOLUTION_COMMIT if args.commit else pb.RESOLUTION_ABORT
        request = pb.AdminResolveRequest(txid=args.txid, resolution=resolution, reason=args.reason)
        return stub.Resolve(request, timeout=_TIMEOUT_S)
    if args.action == "drain":
        return stub.Drain(pb.DrainRequest(reason=args.reason), timeout=_TIMEOUT_S)
    if args.action == "undrain":
        return stub.Undrain(pb.DrainRequest(reason=args.reason), timeout=_TIMEOUT_S)
    if args.action == "audit":
        return stub.Audit(pb.AuditRequest(txid=args.txid, limit=args.limit), timeout=_TIMEOUT_S)
    raise AssertionError(args.action)


# --- human-readable output -------------------------------------------------------------------


def _render(action: str, answer: Any) -> list[str]:
    from twopc.api import twopc_pb2

    def state(value: Any) -> str:
        return twopc_pb2.TransactionState.Name(value).removeprefix("TRANSACTION_STATE_")

    if action == "list":
        lines = [
            f"coordinator {answer.coordinator_id}: "
            f"{'DRAINING (admits no new transaction)' if answer.draining else 'admitting'}, "
            f"{answer.live_count} live"
        ]
        lines += ["", "live transactions:"]
        lines += _table(
            ["TXID", "STATE", "AGE", "HOLDER", "PARTICIPANTS", "REQUEST ID"],
            [
                [
                    t.txid,
                    state(t.state),
                    f"{t.age_ms / 1000:.1f}s",
                    t.holder or "-",
                    ",".join(t.participants) or "-",
                    t.request_id or "-",
                ]
                for t in answer.live
            ],
        )
        lines += ["", "in doubt (prepared branches that no live transaction owns):"]
        lines += _table(
            ["TXID", "PREPARED ON", "DECISION"],
            [
                [
                    d.txid,
                    ",".join(d.prepared_on) or "-",
                    "COMMIT logged"
                    if d.commit_logged
                    else "none (presumed abort)"
                    if d.txid.startswith(f"{answer.coordinator_id}.")
                    else "none here (another coordinator's)",
                ]
                for d in answer.in_doubt
            ],
        )
        if answer.unreachable:
            lines.append(f"agents that did not answer: {', '.join(answer.unreachable)}")
        if answer.truncated:
            lines.append("(more exist than --limit shows)")
        return lines
    if action == "show":
        info = answer.info
        outcome = twopc_pb2.Outcome.Name(info.outcome).removeprefix("OUTCOME_")
        lines = [
            f"txid:          {info.txid}",
            f"state:         {state(info.state)}",
            f"outcome:       {outcome}{' (presumed abort)' if info.presumed else ''}",
            f"live:          {'yes' if answer.live else 'no'}"
            + (f", {answer.age_ms / 1000:.1f}s old" if answer.live else ""),
            f"holder:        {answer.holder or '-'}",
            f"participants:  {', '.join(info.participants) or '-'}",
            "decision:      "
            + (
                f"COMMIT record in the log ({', '.join(answer.decision_participants)})"
                if answer.commit_logged
                else "no open COMMIT record"
            ),
        ]
        if answer.foreign:
            lines.append("note:          its txid belongs to another coordinator id")
        if info.abort_reason:
            lines.append(f"reason:        {info.abort_reason}")
        lines += ["", "branches:"]
        lines += _table(
            ["PARTICIPANT", "BRANCH", "ERROR"],
            [
                [
                    b.participant,
                    twopc_pb2.BranchState.Name(b.state).removeprefix("BRANCH_STATE_")
                    if b.state
                    else "?",
                    b.error or "",
                ]
                for b in answer.branches
            ],
        )
        lines += ["", "audit:", *_audit_table(answer.audit)]
        return lines
    if action == "resolve":
        return [f"{answer.txid}: {state(answer.state)} - {answer.detail}"]
    if action in ("drain", "undrain"):
        mode = "DRAINING: admits no new transaction" if answer.draining else "admitting"
        return [f"{mode}; {answer.live_count} live transaction(s)"]
    return _audit_table(answer.entries)


def _audit_table(entries: Sequence[Any]) -> list[str]:
    return _table(
        ["WHEN (UTC)", "WHO", "ACTION", "TXID", "OUTCOME", "REASON"],
        [
            [
                datetime.datetime.fromtimestamp(e.at_ms / 1000, datetime.UTC).strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
                e.identity or "-",
                e.action,
                e.txid or "-",
                e.outcome,
                e.reason or "-",
            ]
            for e in entries
        ],
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        ("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
        for row in [header, *rows]
    ]
