"""The fault proxy as a process: links from the command line, the ``FaultProxy`` control API.

Command line (``twopc proxy`` takes the same arguments)::

    python -m twopc.testing.chaos.proxy_service --control 127.0.0.1:7300 \\
        --link client-coordinator=127.0.0.1:7101=127.0.0.1:7100 \\
        --link coordinator-agent-eu=127.0.0.1:7211=127.0.0.1:7201

Ports may be 0: the ``proxy_listening`` log line (JSON on stderr) names the control port, and
``ListLinks`` the links' bound addresses. The process runs until SIGTERM or SIGINT.

The control API runs mutual TLS (``--tls-cert``, ``--tls-key``, ``--tls-ca``) and obeys only the
identities given by ``--admin-identity``; ``--insecure-plaintext`` serves it in plaintext, to
anyone. The links relay TCP as it comes: TLS between the parts passes through them untouched
(the server's certificate must name the proxy's address too; the playground's name 127.0.0.1).

The control API: ``SetFault`` replaces a link's fault (see ``twopc.testing.chaos.proxy`` for the
semantics and the precedence of contradictory fields: cut > reset > half_open > blackhole >
latency/jitter/bandwidth; contradictions are applied by that precedence, not refused) and returns
once the fault holds. An unknown link name is NOT_FOUND, naming the known links; a cut link that
cannot re-bind its port when healed is UNAVAILABLE (it stays cut).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import structlog
from grpc import aio

from twopc.api import chaos_pb2 as cpb
from twopc.api import chaos_pb2_grpc as cpb_grpc
from twopc.errors import InvalidArgument, NotFound, Unavailable
from twopc.identity import AccessControl, ServiceRule
from twopc.logs import configure_logging
from twopc.serving import listen, new_server, wait_for_stop_signal
from twopc.status import abort_with, error_from_rpc
from twopc.testing.chaos.proxy import FaultSpec, LinkSpec, ProxyLink, split_host_port
from twopc.tls import TlsConfig, plaintext_warning

__all__ = [
    "FaultProxyServicer",
    "ProxyControl",
    "add_arguments",
    "fault_from_proto",
    "fault_to_proto",
    "link_to_proto",
    "main",
    "run",
    "serve_proxy",
]

Context = aio.ServicerContext[object, object]
log = structlog.get_logger("twopc.chaos.proxy")

_FAULT_FIELDS = tuple(cpb.Fault.DESCRIPTOR.fields_by_name)


def fault_from_proto(fault: cpb.Fault) -> FaultSpec:
    return FaultSpec(
        latency_ms=fault.latency_ms,
        jitter_ms=fault.jitter_ms,
        bandwidth_bytes_per_s=fault.bandwidth_bytes_per_s,
        blackhole=fault.blackhole,
        reset=fault.reset,
        half_open=fault.half_open,
        cut=fault.cut,
    )


def fault_to_proto(fault: FaultSpec) -> cpb.Fault:
    return cpb.Fault(
        latency_ms=fault.latency_ms,
        jitter_ms=fault.jitter_ms,
        bandwidth_bytes_per_s=fault.bandwidth_bytes_per_s,
        blackhole=fault.blackhole,
        reset=fault.reset,
        half_open=fault.half_open,
        cut=fault.cut,
    )


def link_to_proto(link: ProxyLink) -> cpb.Link:
    stats = link.stats()
    return cpb.Link(
        name=link.name,
        listen=link.listen_address,
        upstream=link.spec.upstream,
        fault=fault_to_proto(link.fault),
        connections=stats.connections,
        accepted=stats.accepted,
        bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down,
    )


class FaultProxyServicer(cpb_grpc.FaultProxyServicer):
    def __init__(self, links: Mapping[str, ProxyLink]) -> None:
        self._links = dict(links)

    async def ListLinks(self, request: cpb.ListLinksRequest, context: Context) -> cpb.LinkList:
        return cpb.LinkList(links=[link_to_proto(link) for link in self._links.values()])

    async def SetFault(self, request: cpb.SetFaultRequest, context: Context) -> cpb.Link:
        link = await self._link(request.name, context)
        await self._apply(link, fault_from_proto(request.fault), context)
        return link_to_proto(link)

    async def Heal(self, request: cpb.HealRequest, context: Context) -> cpb.LinkList:
        if request.name:
            links = [await self._link(request.name, context)]
        else:
            links = list(self._links.values())
        for link in links:
            await self._apply(link, FaultSpec(), context)
        return cpb.LinkList(links=[link_to_proto(link) for link in links])

    async def _link(self, name: str, context: Context) -> ProxyLink:
        link = self._links.get(name)
        if link is None:
            known = ", ".join(sorted(self._links)) or "none"
            await abort_with(context, NotFound(f"no link named {name!r}; known links: {known}"))
            raise AssertionError("abort_with returned")  # context.abort raises
        return link

    async def _apply(self, link: ProxyLink, fault: FaultSpec, context: Context) -> None:
        try:
            await link.set_fault(fault)
        except OSError as err:
            await abort_with(
                context,
                Unavailable(f"link {link.name}: cannot listen on {link.listen_address}: {err}"),
            )


async def serve_proxy(
    control: str,
    links: list[LinkSpec],
    tls: TlsConfig | None,
    admin_identities: Sequence[str] = (),
) -> None:
    """Runs the links and the control server until SIGTERM or SIGINT. The control API takes
    mutual TLS with ``tls`` and obeys ``admin_identities`` only; plaintext when ``tls`` is None.

    Raises:
        ValueError: two links share a name.
        OSError: an address cannot be bound.
    """
    names = [spec.name for spec in links]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"link names must be unique: {', '.join(duplicates)}")
    proxies = {spec.name: ProxyLink(spec) for spec in links}
    rules = {
        cpb.DESCRIPTOR.services_by_name["FaultProxy"].full_name: ServiceRule(
            tuple(admin_identities), "--admin-identity"
        )
    }
    server = new_server([AccessControl(rules, component="the fault proxy")] if tls else [])
    try:
        for link in proxies.values():
            await link.start()
        cpb_grpc.add_FaultProxyServicer_to_server(FaultProxyServicer(proxies), server)
        port = listen(server, control, tls)
        await server.start()
        log.info(
            "proxy_listening",
            control=f"{split_host_port(control)[0]}:{port}",
            control_port=port,
            links={
                name: f"{link.listen_address}->{link.spec.upstream}"
                for name, link in proxies.items()
            },
        )
        sig = await wait_for_stop_signal()
        log.info("proxy_stopping", signal=sig.name)
    finally:
        await server.stop(grace=1)
        for link in proxies.values():
            await link.close()


def _link_argument(text: str) -> LinkSpec:
    try:
        return LinkSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The proxy's options, for this module's command line and for ``twopc proxy``."""
    parser.add_argument(
        "--control",
        required=True,
        metavar="HOST:PORT",
        help="where the FaultProxy control API listens (port 0: any, see the log)",
    )
    parser.add_argument(
        "--link",
        dest="links",
        action="append",
        required=True,
        type=_link_argument,
        metavar="NAME=LISTEN_HOST:PORT=UPSTREAM_HOST:PORT",
        help="a link to proxy (repeat for more)",
    )
    parser.add_argument("--tls-cert", type=Path, help="the control API's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="its key (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="the CA that signed the callers' certificates")
    parser.add_argument(
        "--admin-identity",
        dest="admin_identities",
        action="append",
        default=[],
        metavar="NAME",
        help="an identity (certificate Common Name) that may call the control API (repeat)",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="serve the control API without TLS, to anyone who reaches it",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    parser.add_argument("--console", action="store_true", help="logs for people, not JSON")


def run(args: argparse.Namespace) -> int:
    """Runs the proxy as ``add_arguments`` parsed it; returns the exit status."""
    configure_logging(args.log_level, console=args.console, component="proxy")
    try:
        split_host_port(args.control)
        tls = _control_tls(args)
        asyncio.run(serve_proxy(args.control, list(args.links), tls, args.admin_identities))
    except (OSError, ValueError) as err:
        log.critical("proxy_cannot_start", error=str(err))
        return 2
    except InvalidArgument as err:
        log.critical("proxy_cannot_start", error=err.message)
        return 2
    return 0


def _control_tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.insecure_plaintext:
        log.warning("insecure_plaintext", warning=plaintext_warning(args.control, False))
        return None
    if not (args.tls_cert and args.tls_key and args.tls_ca):
        raise InvalidArgument(
            "the control API runs mutual TLS: give --tls-cert, --tls-key and --tls-ca (and "
            "--admin-identity), or --insecure-plaintext"
        )
    if not args.admin_identities:
        raise InvalidArgument("give --admin-identity: the identities that may control the proxy")
    tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
    tls.read()
    return tls


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twopc.testing.chaos.proxy_service",
        description="TCP fault proxy: forwards links and breaks them on request.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


class ProxyControl:
    """A blocking client of a proxy's control API, for test harnesses: mutual TLS with ``tls``
    (an admin identity of the proxy), or plaintext with ``insecure=True``.

    Errors come back as ``TwopcError`` classes (``NotFound`` for an unknown link, ``Unavailable``
    when the proxy cannot be reached within ``timeout`` seconds, ``PermissionDenied`` for an
    identity the proxy does not obey).
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        timeout: float = 5.0,
    ) -> None:
        if (tls is None) == (not insecure):
            raise InvalidArgument("ProxyControl: give tls=TlsConfig(...) or insecure=True")
        if tls is None:
            self._channel = grpc.insecure_channel(address)
        else:
            self._channel = grpc.secure_channel(
                address, tls.channel_credentials(), options=tls.channel_options()
            )
        self._stub = cpb_grpc.FaultProxyStub(self._channel)
        self._timeout = timeout

    def links(self) -> dict[str, cpb.Link]:
        """Every link by name: its bound address, fault and counters."""
        try:
            reply = self._stub.ListLinks(
                cpb.ListLinksRequest(), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return {link.name: link for link in reply.links}

    def set_fault(self, name: str, **fault_fields: int | bool) -> cpb.Link:
        """Replaces ``name``'s fault, e.g. ``set_fault("a", latency_ms=50, jitter_ms=10)``;
        no fields heal it. Returns once the fault holds.

        Raises:
            TypeError: a field that ``Fault`` does not have.
        """
        fault = cpb.Fault()
        for field, value in fault_fields.items():
            if field not in _FAULT_FIELDS:
                raise TypeError(f"no fault field {field!r}; fields: {', '.join(_FAULT_FIELDS)}")
            setattr(fault, field, value)
        try:
            return self._stub.SetFault(
                cpb.SetFaultRequest(name=name, fault=fault),
                timeout=self._timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def heal(self, name: str = "") -> dict[str, cpb.Link]:
        """Heals ``name``, or every link when it is empty; returns the healed links."""
        try:
            reply = self._stub.Heal(
                cpb.HealRequest(name=name), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return {link.name: link for link in reply.links}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ProxyControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
