"""Who is calling, and who may call what.

**A caller's identity is the subject Common Name (CN) of its client certificate**, as the TLS
handshake verified it against the server's CA (``tls_ca``): ``CN=coordinator`` is the identity
``coordinator``. ``twopc certs issue DIR NAME`` puts NAME there. The CN is used rather than a
subject alternative name because those name hosts (every twopc certificate carries
``127.0.0.1`` or a host name there, so that it can also serve), while the CN names the party
(as Kubernetes and MySQL's ``REQUIRE SUBJECT`` do). An identity is only as good as the CA: give
each daemon a CA that signs certificates for twopc's parties alone.

``peer_identity(context)`` reads it in any handler, from the call's auth context. It is the one
function to use for per-identity rules (the coordinator's ``identities``, participants per
identity, in ``coordinator/identities.py``; ownership of transactions and per-identity quotas in
its engine, which the servicer hands the identity)::

    identity = peer_identity(context)   # "client"; None on a plaintext server

``AccessControl`` is the server interceptor both daemons and the fault proxy install when they run
with TLS. For every call it reads the identity, binds it as ``caller`` in the structlog context
(every log line of the call carries it; nothing of the certificate or key is logged), and checks
the service's rule: a service without a rule, or an identity the rule does not list, gets
PERMISSION_DENIED with a message that names the identity, the rule and the setting that lists
who may call. With ``insecure_plaintext`` there is no identity and no interceptor: anyone who
reaches the port may call anything.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc
import structlog
from grpc import aio

from twopc.errors import PermissionDenied
from twopc.status import abort_with

__all__ = ["IDENTITY_PROPERTY", "AccessControl", "ServiceRule", "peer_identity"]

#: The auth-context property that holds the identity.
IDENTITY_PROPERTY = "x509_common_name"

Context = aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
if TYPE_CHECKING:  # generic in the type stubs only
    _Interceptor: TypeAlias = aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = aio.ServerInterceptor
log = structlog.get_logger("twopc.access")


def peer_identity(context: grpc.ServicerContext | Context) -> str | None:
    """The identity of the caller of the RPC that ``context`` belongs to: the Common Name of
    its verified client certificate. None when the call did not come over TLS (a server run
    with ``insecure_plaintext``); "" for a certificate without a Common Name."""
    properties = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    values = properties.get(IDENTITY_PROPERTY)
    if not values:
        return "" if properties.get("x509_pem_cert") else None
    return values[0].decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ServiceRule:
    """Who may call one gRPC service.

    Attributes:
        identities: the identities allowed; None allows every identity the CA vouches for.
        setting: the configuration key that lists them, named in a refusal (how to fix it).
    """

    identities: Collection[str] | None
    setting: str = ""

    def allows(self, identity: str) -> bool:
        return bool(identity) and (self.identities is None or identity in self.identities)


class AccessControl(_Interceptor):
    """Binds each call's identity into the logs and enforces ``rules``.

    Args:
        rules: full service name (``twopc.v1.Participant``) -> its rule. A service not listed is
            refused to everyone.
        component: how the server names itself in a refusal (``agent eu``).
    """

    def __init__(self, rules: Mapping[str, ServiceRule], *, component: str) -> None:
        self._rules = dict(rules)
        self._component = component
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler: Handler | None = await continuation(handler_call_details)
            if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
                return cast("Handler", None)
            wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _refusal(self, method: str, identity: str | None) -> PermissionDenied | None:
        """Why ``identity`` may not call ``method``; None when it may."""
        service, _, name = method.lstrip("/").partition("/")
        rule = self._rules.get(service)
        if rule is not None and identity and rule.allows(identity):
            return None
        if not identity:
            return PermissionDenied(
                f"{self._component} refuses {service}/{name}: the caller's certificate has no "
                "Common Name, which is twopc's identity (twopc certs issue DIR NAME sets it)"
            )
        if rule is None:
            return PermissionDenied(
                f"{self._component} serves {service} to no identity (caller {identity!r})"
            )
        allowed = ", ".join(sorted(rule.identities or ())) or "no identity"
        return PermissionDenied(
            f"identity {identity!r} may not call {service}/{name} on {self._component}: it "
            f"obeys only {allowed} (its setting {rule.setting}); present the certificate of one "
            f"of them, or add {identity!r} to {rule.setting} if it should"
        )

    def _wrap(self, method: str, handler: Handler) -> Handler:
        refusal = self._refusal

        async def admit(context: Context) -> str:
            """The caller's identity; a caller that may not call ``method`` gets
            PERMISSION_DENIED (``abort_with`` raises)."""
            identity = peer_identity(context)
            error = refusal(method, identity)
            if error is not None:
                log.warning("permission_denied", caller=identity, method=method)
                await abort_with(context, error)
            assert identity is not None  # refusal() lets no call without an identity through
            return identity

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            # gRPC tells streaming handlers that are async generators from coroutines that write
            # through the context by their type: the guard keeps the type.
            if inspect.isasyncgenfunction(behaviour):

                async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                    # Bound for good: each call runs in a task, and a context, of its own (a
                    # reset across the generator's yields could run in another context).
                    structlog.contextvars.bind_contextvars(caller=await admit(context))
                    async for response in behaviour(request, context):
                        yield response

                return streaming

            async def call(request: Any, context: Context) -> Any:
                identity = await admit(context)
                with structlog.contextvars.bound_contextvars(caller=identity):
                    return await behaviour(request, context)

            return call

        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **options)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **options)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), **options)
