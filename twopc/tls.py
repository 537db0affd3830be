"""Mutual TLS between the parts of twopc: one certificate, key and CA bundle per side.

Every gRPC hop runs mutual TLS by default: the server presents its certificate and requires the
caller's, both signed by the configured CA. The caller's certificate is its identity
(``twopc.identity``). The SDK takes a ``TlsConfig``::

    from twopc import Client, TlsConfig

    tls = TlsConfig(cert="client.pem", key="client.key", ca="ca.pem")
    with Client("coordinator.internal:7100", tls=tls) as client: ...

or ``TlsConfig.from_env()``, which reads ``TWOPC_TLS_CERT``, ``TWOPC_TLS_KEY`` and ``TWOPC_TLS_CA``
(and ``TWOPC_TLS_SERVER_NAME``, see below). The daemons build theirs from their configuration
(``tls_cert``, ``tls_key``, ``tls_ca``). ``twopc certs`` makes throwaway ones.

The server's certificate must name the host the client dials (a DNS name or an IP address in its
subject alternative names). ``server_name`` makes the client expect another name instead (the
``grpc.ssl_target_name_override`` channel option): for a server reached through a relay or by an
address its certificate does not list.

This module needs grpcio only (it is part of ``pip install twopc``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from twopc.errors import InvalidArgument

__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "ENV_SERVER_NAME",
    "TlsConfig",
]

ENV_CERT = "TWOPC_TLS_CERT"
ENV_KEY = "TWOPC_TLS_KEY"
ENV_CA = "TWOPC_TLS_CA"
ENV_SERVER_NAME = "TWOPC_TLS_SERVER_NAME"


@dataclass(frozen=True, init=False)
class TlsConfig:
    """One side of a mutual TLS connection.

    Attributes:
        cert: this side's certificate (PEM; a chain, leaf first, is accepted).
        key: its private key (PEM, unencrypted; keep it mode 0600).
        ca: the CA certificate(s) (PEM) that must have signed the other side's certificate.
        server_name: client side only: the name the server's certificate must carry, when it is
            not the host of the address dialled.

    Paths may be given as strings. The files are read when credentials are made (a client or a
    daemon starting), so a missing one is reported then, by name.
    """

    cert: Path
    key: Path
    ca: Path
    server_name: str | None

    def __init__(
        self,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
        server_name: str | None = None,
    ) -> None:
        object.__setattr__(self, "cert", Path(cert))
        object.__setattr__(self, "key", Path(key))
        object.__setattr__(self, "ca", Path(ca))
        object.__setattr__(self, "server_name", server_name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig | None:
        """The configuration ``TWOPC_TLS_CERT``, ``TWOPC_TLS_KEY`` and ``TWOPC_TLS_CA`` give
        (``TWOPC_TLS_SERVER_NAME`` optional); None when none of the three is set.

        Raises:
            InvalidArgument: some of the three are set, not all.
        """
        env = os.environ if environ is None else environ
        values = {name: env.get(name, "") for name in (ENV_CERT, ENV_KEY, ENV_CA)}
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise InvalidArgument(
                f"{', '.join(missing)} not set: mutual TLS needs {ENV_CERT}, {ENV_KEY} and "
                f"{ENV_CA} together"
            )
        return cls(
            cert=Path(values[ENV_CERT]),
            key=Path(values[ENV_KEY]),
            ca=Path(values[ENV_CA]),
            server_name=env.get(ENV_SERVER_NAME) or None,
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """The certificate, key and CA bundle, as bytes.

        Raises:
            InvalidArgument: a file cannot be read (the message names it).
        """
        return self._read("cert", self.cert), self._read("key", self.key), self._read("ca", self.ca)

    @staticmethod
    def _read(what: str, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InvalidArgument(f"TLS {what} file {path}: {err.strerror or err}") from err
        if b"-----BEGIN" not in data:
            raise InvalidArgument(f"TLS {what} file {path} holds no PEM data")
        return data

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a client channel: presents ``cert``, trusts servers signed by ``ca``."""
        cert, key, ca = self.read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a server: presents ``cert`` and requires every caller to present a
        certificate signed by ``ca`` (a caller without one fails the handshake)."""
        cert, key, ca = self.read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """The channel options this side needs (the server name override, when set)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def daemon_tls(
    cert: Path | None, key: Path | None, ca: Path | None, *, insecure_plaintext: bool, who: str
) -> TlsConfig | None:
    """A daemon's TLS, from its settings ``tls_cert``, ``tls_key``, ``tls_ca`` and
    ``insecure_plaintext``: None (plaintext) only when ``insecure_plaintext`` is set.

    Raises:
        InvalidArgument: TLS is on and a setting is missing or names a file that cannot be read.
    """
    if insecure_plaintext:
        return None
    given = {"tls_cert": cert, "tls_key": key, "tls_ca": ca}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise InvalidArgument(
            f"{', '.join(missing)} not set: the {who} runs mutual TLS unless told otherwise. Set "
            "tls_cert, tls_key and tls_ca (twopc certs init DIR, then twopc certs issue DIR NAME, "
            "makes throwaway ones), or insecure_plaintext = true to run without TLS and without "
            "identities (test setups only)"
        )
    tls = TlsConfig(cert=Path(str(cert)), key=Path(str(key)), ca=Path(str(ca)))
    tls.read()  # a missing or unreadable file is reported now, by name
    return tls


def plaintext_warning(listen: str, ignored: bool) -> str:
    """What a daemon run with ``insecure_plaintext`` logs at start, loudly."""
    return (
        f"INSECURE: insecure_plaintext = true, TLS is off on {listen} and on the calls this "
        "daemon makes. Nothing is encrypted or authenticated: anyone who reaches the port can "
        "call every API (finish branches, arm failpoints) and no identity rule applies. For test "
        "setups only" + ("; tls_cert, tls_key and tls_ca are set and ignored" if ignored else "")
    )


def client_transport(
    *,
    tls: TlsConfig | None,
    credentials: grpc.ChannelCredentials | None,
    insecure: bool,
    what: str,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """The credentials (None: plaintext) and extra channel options of an SDK client given
    exactly one of ``tls``, ``credentials`` or ``insecure=True``.

    Raises:
        InvalidArgument: none or several of them given.
    """
    given = [name for name, on in (("tls", tls), ("credentials", credentials)) if on is not None]
    given += ["insecure=True"] if insecure else []
    if len(given) > 1:
        raise InvalidArgument(f"{what}: give one of {', '.join(given)}, not several")
    if not given:
        raise InvalidArgument(
            f"{what}: no TLS configuration. The coordinator requires mutual TLS: pass "
            "tls=TlsConfig(cert=..., key=..., ca=...) (TlsConfig.from_env() reads "
            f"{ENV_CERT}, {ENV_KEY} and {ENV_CA}; twopc playground prints them), or "
            "insecure=True for a coordinator run with insecure_plaintext = true"
        )
    if tls is not None:
        return tls.channel_credentials(), tls.channel_options()
    return credentials, []
