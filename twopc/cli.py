"""``twopc``: one command for the daemons, the local playground, the demo and lookups.

twopc coordinator --config coordinator.toml     run the coordinator daemon
twopc agent --config agent.toml                 run a participant agent daemon
twopc relay --config relay.toml                 publish the outbox's committed messages to
                                                RabbitMQ (next to the outbox's database)
twopc playground [--regions eu,us,ap]           start a throwaway local cluster with the README's
                                                example tables (Ctrl-C stops it)
twopc playground --down                         stop the cluster that the state file names
twopc playground --restart NAME | --kill NAME   restart / signal one component of it
twopc demo                                      bank transfers across regions, a coordinator
                                                SIGKILL mid-run, recovery, invariants checked
twopc chaos [--duration S] [--seed N]           transfers on a proxied playground while kills,
                                                freezes, latency, cuts and failpoints hit it;
                                                a JSON report, a PNG timeline, exit 1 if an
                                                invariant broke
twopc proxy --control ADDR --link N=LISTEN=UP   the TCP fault proxy (the playground runs it)
twopc bench [--workloads ...] [--concurrency ...] twopc against direct XA, SQLAlchemy two-phase
                                                sessions and plain local commits, side by side
twopc bench-recovery [--in-doubt N]             time to resolve N in-doubt transactions after
                                                a coordinator SIGKILL and restart
twopc bench-log [--writers 1,8,64]              the decision log on a file, MariaDB and
                                                PostgreSQL, side by side
twopc bench-group [--clients 32] [--members 3]  a coordinator group on a 3-node Galera store
                                                against one coordinator on its file log
twopc bench-takeover [--rounds 5]               seconds from a group member's SIGKILL to its
                                                in-doubt transactions resolved by a peer
twopc flash-sale [--buyers 32] [--outage]        one hot item sold across two regions: twopc
                                                pessimistic and optimistic, a Redis gate, a
                                                message queue with an outbox, side by side
twopc bench-overload [--load 3]                 committed throughput and p99 at 3x the
                                                sustainable load, shedding on and off
twopc tx TXID | --request-id ID                 a transaction's state and outcome
twopc admin list | show TXID | audit            the operator's view: live and in-doubt
                                                transactions, one in full, the audit records
twopc admin resolve TXID (--commit|--abort) --reason TEXT
                                                commit or abort one by hand (audited)
twopc admin drain | undrain                     stop / resume admitting new transactions
twopc certs init DIR | issue DIR NAME           a throwaway CA and certificates (mutual TLS)
twopc health --address HOST:PORT [--tls-* ...]  one gRPC health check, for exec probes: exit 0
                                                SERVING, 1 not serving, 2 no answer

`pip install twopc` runs `twopc tx` and `twopc admin`; every other command needs an extra (it
says which).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from twopc import admin_cli

DEFAULT_PLAYGROUND_DIR = Path(".twopc-playground")
# twopc.testing.playground.cluster.STATE_FILE, not imported from there: that needs pymysql.
PLAYGROUND_STATE_FILE = "state.json"
COORDINATOR_ENV = "TWOPC_COORDINATOR"
DEFAULT_COORDINATOR = "127.0.0.1:7100"
# twopc.tls's names, not imported from there: it needs grpc, and the parser imports nothing.
ENV_CERT, ENV_KEY, ENV_CA = "TWOPC_TLS_CERT", "TWOPC_TLS_KEY", "TWOPC_TLS_CA"

# `twopc tx` exit statuses.
TX_FOUND = 0
TX_LOOKUP_FAILED = 1
TX_USAGE = 2  # argparse's
TX_NO_RECORD = 3
TX_EXIT_STATUS = f"""\
exit status:
  {TX_FOUND}  the transaction is known: its state and outcome are printed
     (COMMITTED, ABORTED or PENDING)
  {TX_LOOKUP_FAILED}  the lookup failed (coordinator unreachable, a malformed id, a txid of another
     coordinator); the reason is on stderr
  {TX_USAGE}  wrong usage
  {TX_NO_RECORD}  no record of the transaction exists, neither on the coordinator nor on any
     participant: if it ever ran, nothing of it is committed (presumed abort); check the id

the coordinator: --coordinator, else ${COORDINATOR_ENV}, else the playground's state file in
{DEFAULT_PLAYGROUND_DIR}/ (in the current directory), else {DEFAULT_COORDINATOR}

mutual TLS: ${ENV_CERT}, ${ENV_KEY} and ${ENV_CA}, else the playground's client certificate
(its state file), else none: --insecure for a coordinator run with insecure_plaintext
"""


@dataclass(frozen=True)
class _Command:
    help: str
    extra: str | None  # what `pip install 'twopc[EXTRA]'` adds for it; None: the base install
    # For the test tools: the module whose add_arguments() defines the command's arguments. It
    # is imported only when the command is named on the command line (it needs the extra).
    arguments: str | None = None


_COMMANDS = {
    "coordinator": _Command("run the coordinator daemon", "coordinator"),
    "agent": _Command("run a participant agent daemon", "agent"),
    "relay": _Command("publish the outbox's committed messages to RabbitMQ", "relay"),
    "playground": _Command("a throwaway cluster on this machine", "playground"),
    "demo": _Command("bank transfers with a coordinator crash mid-run", "playground"),
    "chaos": _Command(
        "fault injection with an invariant check", "chaos", "twopc.testing.chaos.runner"
    ),
    "proxy": _Command("the TCP fault proxy", "playground", "twopc.testing.chaos.proxy_service"),
    "bench": _Command(
        "twopc against the alternatives, side by side", "bench", "twopc.testing.bench.runner"
    ),
    "bench-recovery": _Command(
        "time to resolve in-doubt transactions after a coordinator crash",
        "bench",
        "twopc.testing.bench.recovery",
    ),
    "bench-log": _Command(
        "the decision log on a file, MariaDB and PostgreSQL, side by side",
        "bench",
        "twopc.testing.bench.log_stores",
    ),
    "bench-group": _Command(
        "a coordinator group on Galera against one coordinator on its file log",
        "bench",
        "twopc.testing.bench.group",
    ),
    "bench-takeover": _Command(
        "time from a group member's SIGKILL to its in-doubt transactions resolved",
        "bench",
        "twopc.testing.bench.takeover",
    ),
    "flash-sale": _Command(
        "a flash sale across two regions: twopc, a Redis gate and a message queue",
        "flash-sale",
        "twopc.testing.flash_sale.runner",
    ),
    "bench-overload": _Command(
        "throughput and latency at several times the sustainable load, shedding on and off",
        "bench",
        "twopc.testing.bench.overload",
    ),
    "tx": _Command("look a transaction up", None),
    "admin": _Command(
        "the operator's view and hand: list, show, resolve, drain, undrain, audit", None
    ),
    "certs": _Command(
        "a throwaway CA and certificates for mutual TLS", "playground", "twopc.testing.certs"
    ),
    # Run in a daemon's container by its probes: the coordinator's and the agent's extras both
    # have the health client (grpcio-health-checking).
    "health": _Command(
        "one gRPC health check, for exec probes (exit 0 SERVING, 1 not serving, 2 no answer)",
        "coordinator",
        "twopc.health_cli",
    ),
}


class MissingExtra(Exception):
    """A command's dependencies are not installed."""


@contextlib.contextmanager
def _needs_extra(command: str) -> Iterator[None]:
    """Turns a missing third-party module, met while importing what ``command`` runs, into a
    message that names the extra to install."""
    try:
        yield
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        extra = _COMMANDS[command].extra
        if not missing or missing in ("twopc", "coordinator", "participants") or extra is None:
            raise
        raise MissingExtra(
            f"twopc {command} needs {missing}, which is not installed: install the "
            f"{extra!r} extra, e.g. pip install 'twopc[{extra}]' (from a checkout: "
            f"pip install '.[{extra}]')"
        ) from err


def _parser(named: str | None = None) -> argparse.ArgumentParser:
    """The command line parser. It imports nothing beyond the standard library: the arguments of
    the test tools (their modules need their extras) are added only for ``named``."""
    parser = argparse.ArgumentParser(
        prog="twopc",
        description="Two-phase commit across MySQL/MariaDB regions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {
        name: commands.add_parser(
            name,
            help=command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, command in _COMMANDS.items()
    }

    for name in ("coordinator", "agent", "relay"):
        subparsers[name].add_argument(
            "--config",
            type=Path,
            help="TOML configuration file (environment variables override it)",
        )

    playground = subparsers["playground"]
    playground.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_PLAYGROUND_DIR,
        help="where data, logs and the state file go (default: %(default)s)",
    )
    playground.add_argument(
        "--regions", default="eu,us,ap", help="comma-separated region names (default: %(default)s)"
    )
    action = playground.add_mutually_exclusive_group()
    action.add_argument("--down", action="store_true", help="stop the running playground")
    action.add_argument(
        "--restart",
        metavar="NAME",
        help="restart one component (a running one is stopped first: SIGTERM, SIGKILL after 10 s)",
    )
    action.add_argument("--kill", metavar="NAME", help="send a signal to one component")
    action.add_argument(
        "--detach", action="store_true", help="start the cluster and return (stop it with --down)"
    )
    playground.add_argument("--signal", default="KILL", help="signal for --kill (default: KILL)")
    playground.add_argument(
        "--proxied",
        action="store_true",
        help="put a fault proxy on every hop (the state file lists the links)",
    )
    playground.add_argument(
        "--coordinators",
        type=int,
        default=1,
        help="coordinators: above 1, a group (ids c1, c2, ...) sharing one decision log, each "
        "taking over the ids of members that stop (default: %(default)s)",
    )
    playground.add_argument(
        "--log-store",
        choices=("file", "galera"),
        default=None,
        help="where decisions are logged: 'file' (one coordinator's data directory) or "
        "'galera', a 3-node MariaDB Galera cluster on loopback (nodes store-1..store-3) "
        "(default: file for one coordinator, galera for a group)",
    )
    playground.add_argument(
        "--no-examples",
        action="store_true",
        help="leave the databases empty (default: the README's example tables stock, orders "
        "and accounts, with a few rows, in every region)",
    )

    demo = subparsers["demo"]
    demo.add_argument("--dir", type=Path, default=Path(".twopc-demo"))
    demo.add_argument("--transfers", type=int, default=600)
    demo.add_argument("--workers", type=int, default=8)
    demo.add_argument("--accounts", type=int, default=50, help="accounts per region")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster running and its directory in place (without it both go, unless "
        "the demo fails: then the directory stays, for its logs)",
    )

    tx = subparsers["tx"]
    tx.epilog = TX_EXIT_STATUS
    tx.add_argument("txid", nargs="?", help="the transaction id")
    tx.add_argument(
        "--request-id", metavar="ID", help="look it up by the request id given to begin/run"
    )
    _coordinator_options(tx)

    admin = subparsers["admin"]
    admin.description = (
        "The operator's view and hand on a coordinator. The caller must be one of its "
        f"admin_identities: TLS from ${ENV_CERT}, ${ENV_KEY} and ${ENV_CA}, else the "
        "playground's admin identity (its state file)."
    )
    admin.epilog = admin_cli.EXIT_STATUS
    admin_cli.add_arguments(admin, _coordinator_options)

    if named is not None and named in _COMMANDS and _COMMANDS[named].arguments:
        with _needs_extra(named):
            module = importlib.import_module(str(_COMMANDS[named].arguments))
        module.add_arguments(subparsers[named])
    return parser


def _coordinator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        metavar="ADDR",
        help=f"host:port (default: ${COORDINATOR_ENV}, the playground, {DEFAULT_COORDINATOR})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no TLS: for a coordinator run with insecure_plaintext = true",
    )


def _named_command(argv: Sequence[str]) -> str | None:
    """The command named on the command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = _named_command(arguments)
    try:
        args = _parser(command).parse_args(arguments)
        if args.command == "tx":
            return _tx(args, environ)
        if args.command == "admin":
            coordinator = coordinator_address(args.coordinator, environ, Path.cwd())
            state = Path.cwd() / DEFAULT_PLAYGROUND_DIR / PLAYGROUND_STATE_FILE
            return admin_cli.run(args, environ, coordinator, state)
        with _needs_extra(args.command):
            run = _runner(args.command)
    except MissingExtra as err:
        print(err, file=sys.stderr)
        return 1
    return run(args)


def _runner(command: str) -> Callable[[argparse.Namespace], int]:
    """What runs ``command``, imported now (ModuleNotFoundError when its extra is missing)."""
    if command == "coordinator":
        from coordinator.daemon import main as run_coordinator

        return lambda args: run_coordinator(args.config)
    if command == "agent":
        from participants.daemon import main as run_agent

        return lambda args: run_agent(args.config)
    if command == "relay":
        from participants.relay import main as run_relay

        return lambda args: run_relay(args.config)
    if command == "playground":
        from twopc.testing.playground.command import playground

        return playground
    if command == "demo":
        from twopc.testing.playground.demo import run_demo

        return run_demo
    if command == "chaos":
        from twopc.testing.chaos.runner import run as run_chaos

        return run_chaos
    if command == "bench":
        from twopc.testing.bench.runner import run as run_bench

        return run_bench
    if command == "bench-recovery":
        from twopc.testing.bench.recovery import run as run_bench_recovery

        return run_bench_recovery
    if command == "bench-log":
        from twopc.testing.bench.log_stores import run as run_bench_log

        return run_bench_log
    if command == "bench-group":
        from twopc.testing.bench.group import run as run_bench_group

        return run_bench_group
    if command == "bench-takeover":
        from twopc.testing.bench.takeover import run as run_bench_takeover

        return run_bench_takeover
    if command == "flash-sale":
        from twopc.testing.flash_sale.runner import run as run_flash_sale

        return run_flash_sale
    if command == "bench-overload":
        from twopc.testing.bench.overload import run as run_bench_overload

        return run_bench_overload
    if command == "proxy":
        from twopc.testing.chaos.proxy_service import run as run_proxy

        return run_proxy
    if command == "certs":
        from twopc.testing.certs import run as run_certs

        return run_certs
    if command == "health":
        from twopc.health_cli import run as run_health

        return run_health
    raise AssertionError(command)


# --- twopc tx ------------------------------------------------------------------------------------


def coordinator_address(
    given: str | None, environ: Mapping[str, str], cwd: Path
) -> tuple[str, str]:
    """The coordinator to ask, and where that address came from: ``given`` (--coordinator),
    else $TWOPC_COORDINATOR, else the client address in the playground's state file under
    ``cwd``, else 127.0.0.1:7100."""
    if given:
        return given, "--coordinator"
    if environ.get(COORDINATOR_ENV):
        return environ[COORDINATOR_ENV], f"${COORDINATOR_ENV}"
    state = cwd / DEFAULT_PLAYGROUND_DIR / PLAYGROUND_STATE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        address = json.loads(state.read_text())["client_address"]
        if isinstance(address, str) and address:
            return address, f"the playground's {DEFAULT_PLAYGROUND_DIR / PLAYGROUND_STATE_FILE}"
    return DEFAULT_COORDINATOR, f"the default; give --coordinator or set ${COORDINATOR_ENV}"


def client_tls_files(
    insecure: bool, environ: Mapping[str, str], cwd: Path
) -> tuple[dict[str, str] | None, str]:
    """The certificate, key and CA (``{"cert", "key", "ca"}``) ``twopc tx`` presents, and where
    they came from: none with ``--insecure``; else $TWOPC_TLS_CERT, $TWOPC_TLS_KEY and
    $TWOPC_TLS_CA when one is set; else the playground's client certificate, from its state
    file under ``cwd`` (none when its daemons run in plaintext).

    Raises:
        ValueError: no TLS configuration found (the message says what to set).
    """
    if insecure:
        return None, "--insecure"
    if any(environ.get(name) for name in (ENV_CERT, ENV_KEY, ENV_CA)):
        files = {"cert": environ.get(ENV_CERT, ""), "key": environ.get(ENV_KEY, "")}
        files["ca"] = environ.get(ENV_CA, "")
        return files, f"${ENV_CERT}, ${ENV_KEY}, ${ENV_CA}"
    state = cwd / DEFAULT_PLAYGROUND_DIR / PLAYGROUND_STATE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads(state.read_text())
        where = f"the playground's {DEFAULT_PLAYGROUND_DIR / PLAYGROUND_STATE_FILE}"
        if recorded.get("plaintext"):
            return None, f"{where} (plaintext)"
        files = recorded["client_tls"]
        if all(isinstance(files.get(k), str) for k in ("cert", "key", "ca")):
            return {k: files[k] for k in ("cert", "key", "ca")}, where
    raise ValueError(
        f"no TLS configuration: set {ENV_CERT}, {ENV_KEY} and {ENV_CA} (a client certificate, "
        "its key, and the CA of the coordinator's), run from where the playground runs, or "
        "give --insecure for a coordinator run with insecure_plaintext = true"
    )


def _tx(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if (args.txid is None) == (args.request_id is None):
        print("twopc tx: give a TXID or --request-id ID (one of them)", file=sys.stderr)
        return TX_USAGE
    address, source = coordinator_address(args.coordinator, environ, Path.cwd())
    try:
        files, tls_source = client_tls_files(args.insecure, environ, Path.cwd())
    except ValueError as err:
        print(f"twopc tx: {err}", file=sys.stderr)
        return TX_USAGE
    from twopc.client import Client, RetryPolicy, TlsConfig
    from twopc.errors import TwopcError

    logging.getLogger("twopc.client").setLevel(logging.ERROR)  # the error is said below, once

    tls = (
        None
        if files is None
        else TlsConfig(Path(files["cert"]), Path(files["key"]), Path(files["ca"]))
    )

    def failed(err: TwopcError) -> int:
        print(
            f"twopc tx: {type(err).__name__}: {err.message} "
            f"(coordinator {address}, from {source}; TLS from {tls_source})",
            file=sys.stderr,
        )
        return TX_LOOKUP_FAILED

    # A lookup by hand: a few quick retries, then say what failed.
    try:
        client = Client(
            address,
            tls=tls,
            insecure=tls is None,
            retry_policy=RetryPolicy(attempts=3, deadline=5.0),
        )
    except TwopcError as err:  # a TLS file that cannot be read
        return failed(err)
    with client:
        try:
            info = client.get_transaction(args.txid, request_id=args.request_id)
        except TwopcError as err:
            return failed(err)
    print(f"txid:         {info.txid}")
    if args.request_id is not None:
        print(f"request id:   {args.request_id}")
    if info.presumed and not info.participants:
        print("record:       none, on the coordinator or on any participant")
        print("meaning:      if it ever ran, nothing of it is committed (presumed abort);")
        print("              check the id")
        return TX_NO_RECORD
    print(f"state:        {info.state.name}")
    print(f"outcome:      {info.outcome.name}{' (presumed abort)' if info.presumed else ''}")
    if info.participants:
        print(f"participants: {', '.join(info.participants)}")
    if info.abort_reason:
        print(f"reason:       {info.abort_reason}")
    return TX_FOUND


if __name__ == "__main__":
    sys.exit(main())
