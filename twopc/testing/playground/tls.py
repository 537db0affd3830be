"""The playground's certificates: a throwaway CA and one certificate per party, in ``DIR/tls``.

Every party gets its own identity (its certificate's Common Name, ``twopc.identity``):

- ``coordinator``: the coordinator's certificate, served to clients and presented to the agents,
  which obey it alone;
- ``agent-<region>``: each agent's;
- ``proxy``: the fault proxy's control API;
- ``client``: the playground's own client (the tools, the tests, ``twopc tx``, the README's
  examples through the variables the playground prints);
- ``admin``: the operator, allowed the admin APIs (the daemons' Failpoints, the proxy's control);
- ``other-app``: another application, for hostile tests: a valid certificate of the same CA,
  with no rights beyond a client's.

Each certificate names ``localhost`` and ``127.0.0.1``, so it serves on loopback and through the
fault proxy's links alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twopc.testing.certs import CertificateAuthority
from twopc.tls import TlsConfig

__all__ = [
    "ADMIN",
    "CLIENT",
    "COORDINATOR",
    "OTHER_APP",
    "PROXY_IDENTITY",
    "ClusterTls",
    "agent_identity",
]

COORDINATOR = "coordinator"
CLIENT = "client"
ADMIN = "admin"
OTHER_APP = "other-app"
PROXY_IDENTITY = "proxy"
TLS_DIR = "tls"


def agent_identity(region: str) -> str:
    return f"agent-{region}"


@dataclass(frozen=True)
class ClusterTls:
    """The CA certificate and, per identity, a certificate and its key."""

    ca: Path
    identities: Mapping[str, tuple[Path, Path]]

    @classmethod
    def make(cls, directory: Path, regions: Sequence[str]) -> ClusterTls:
        """A new CA in ``directory / "tls"`` and a certificate for every party of a cluster
        with ``regions``."""
        ca = CertificateAuthority.create(directory / TLS_DIR)
        names = [COORDINATOR, *(agent_identity(r) for r in regions)]
        names += [PROXY_IDENTITY, CLIENT, ADMIN, OTHER_APP]
        issued = {name: ca.issue(name) for name in names}
        return cls(ca.cert_path, {n: (c.cert, c.key) for n, c in issued.items()})

    def config(self, identity: str) -> TlsConfig:
        """The TLS configuration of one party (mutual TLS with the playground's CA)."""
        try:
            cert, key = self.identities[identity]
        except KeyError:
            known = ", ".join(sorted(self.identities))
            raise KeyError(f"no identity {identity!r} in the playground; it has: {known}") from None
        return TlsConfig(cert=cert, key=key, ca=self.ca)

    def daemon_settings(self, identity: str) -> dict[str, str]:
        """The ``tls_*`` settings of the daemon that runs as ``identity``."""
        config = self.config(identity)
        return {"tls_cert": str(config.cert), "tls_key": str(config.key), "tls_ca": str(self.ca)}

    def as_json(self) -> dict[str, Any]:
        return {
            "ca": str(self.ca),
            "identities": {
                name: {"cert": str(cert), "key": str(key)}
                for name, (cert, key) in self.identities.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ClusterTls | None:
        if not data:
            return None
        return cls(
            Path(data["ca"]),
            {n: (Path(i["cert"]), Path(i["key"])) for n, i in data["identities"].items()},
        )
