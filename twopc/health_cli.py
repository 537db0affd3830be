"""``twopc health``: one gRPC health check (``grpc.health.v1.Health/Check``), for exec probes.

    twopc health --address HOST:PORT [--service NAME]
                 [--tls-cert FILE --tls-key FILE --tls-ca FILE [--tls-server-name NAME]
                  | --insecure-plaintext] [--timeout S] [--alive]

Kubelet's own gRPC probe speaks no TLS, and both daemons serve mutual TLS only: a probe runs
this command in the daemon's container, with the daemon's own certificate (health is open to
every identity the CA vouches for, ``twopc.observability.OPEN_RULES``).

It prints one line and exits with:

- 0 (``SERVING``): the service answers SERVING;
- 1 (``NOT_SERVING``): the server answered, and not SERVING: NOT_SERVING (a coordinator before
  its first recovery pass, draining or stopping), a service it does not know, or a refusal;
- 2 (``UNREACHABLE``): no answer: nothing listens, the TLS handshake failed, the deadline
  passed, or a TLS file cannot be read (argparse's wrong usage is 2 as well: not healthy).

``--alive`` is for liveness and startup probes: any answer of the health service is 0, so that
a daemon that is up but not SERVING (a coordinator draining, or still in its first recovery
pass; an agent whose database is out of reach) is taken out of its Service by the readiness
probe and not restarted; no answer is still 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twopc.errors import InvalidArgument
from twopc.tls import TlsConfig

__all__ = [
    "DEFAULT_SERVICE",
    "NOT_SERVING",
    "SERVING",
    "UNREACHABLE",
    "HealthAnswer",
    "add_arguments",
    "check",
    "run",
]

SERVING = 0
NOT_SERVING = 1
UNREACHABLE = 2
#: The coordinator's own service (``coordinator.daemon.COORDINATOR_SERVICE``; not imported from
#: there: the command must not load the daemon). An agent's is ``twopc.v1.Participant``.
DEFAULT_SERVICE = "twopc.v1.Coordinator"

EXIT_STATUS = f"""\
exit status:
  {SERVING}  SERVING
  {NOT_SERVING}  the server answered, and not SERVING (NOT_SERVING, an unknown service, a refusal)
  {UNREACHABLE}  no answer (nothing listens, TLS handshake failed, timeout, a TLS file unreadable)
with --alive, every answer is {SERVING}: the daemon is up (for liveness and startup probes)
"""

# Codes that mean the server was never heard: the others are answers (NOT_FOUND: an unknown
# service; UNIMPLEMENTED: no health service; PERMISSION_DENIED; ...).
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class HealthAnswer:
    """The outcome of one check: the exit status and the line to print."""

    status: int
    message: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "One gRPC health check of a twopc daemon (grpc.health.v1 Check), for exec probes: "
        "mutual TLS with the given certificate, or plaintext."
    )
    parser.epilog = EXIT_STATUS
    parser.add_argument("--address", required=True, metavar="HOST:PORT", help="the daemon")
    parser.add_argument(
        "--service",
        default=DEFAULT_SERVICE,
        metavar="NAME",
        help="the service to ask about (default: %(default)s; an agent's: twopc.v1.Participant; "
        '"": the server as a whole)',
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="the certificate to present")
    parser.add_argument("--tls-key", metavar="FILE", help="its key")
    parser.add_argument("--tls-ca", metavar="FILE", help="the CA of the daemon's certificate")
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the daemon's certificate must carry, when it is not HOST (e.g. a probe "
        "that dials 127.0.0.1)",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="plaintext: for a daemon run with insecure_plaintext = true",
    )
    parser.add_argument(
        "--alive",
        action="store_true",
        help="exit 0 on any answer (SERVING or not): for liveness and startup probes, which must "
        "not restart a daemon that is draining or recovering",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds to wait for the answer, connection included (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``twopc health`` with parsed ``args``; prints one line; returns the exit status."""
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    tls_given = all(files)
    if (args.insecure_plaintext and any(files)) or not (args.insecure_plaintext or tls_given):
        print(
            "twopc health: give --tls-cert, --tls-key and --tls-ca (mutual TLS), or "
            "--insecure-plaintext (one of them)",
            file=sys.stderr,
        )
        return UNREACHABLE
    tls = (
        None
        if args.insecure_plaintext
        else TlsConfig(*files, server_name=args.tls_server_name or None)
    )
    answer = check(args.address, args.service, tls, args.timeout)
    status = SERVING if args.alive and answer.status == NOT_SERVING else answer.status
    print(answer.message, file=sys.stdout if status == SERVING else sys.stderr)
    return status


def check(address: str, service: str, tls: TlsConfig | None, timeout: float) -> HealthAnswer:
    """Asks the health service at ``address`` about ``service``: mutual TLS with ``tls``,
    plaintext when it is None; at most ``timeout`` seconds, connecting included."""
    what = f"{service or '(server)'} at {address}"
    try:
        credentials = tls.channel_credentials() if tls is not None else None
    except InvalidArgument as err:
        return HealthAnswer(UNREACHABLE, f"UNREACHABLE: {what}: {err.message}")
    options = tls.channel_options() if tls is not None else []
    channel = (
        grpc.insecure_channel(address, options=options)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=False,
            )
        except grpc.RpcError as err:
            # The sync stub raises an RpcError that is also a grpc.Call (as twopc.status reads it).
            code_of, details_of = getattr(err, "code", None), getattr(err, "details", None)
            code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
            details = (details_of() if callable(details_of) else None) or str(err)
            details = " ".join(details.split())  # one line
            if code in _NO_ANSWER:
                return HealthAnswer(UNREACHABLE, f"UNREACHABLE: {what}: {code.name}: {details}")
            if code is grpc.StatusCode.NOT_FOUND:
                return HealthAnswer(NOT_SERVING, f"UNKNOWN SERVICE: {what}: {details}")
            return HealthAnswer(NOT_SERVING, f"NOT_SERVING: {what}: {code.name}: {details}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return HealthAnswer(SERVING, f"SERVING: {what}")
    return HealthAnswer(NOT_SERVING, f"{status}: {what}")
