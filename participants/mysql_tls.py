"""TLS between the agent and its database (the agent's settings ``mysql_ssl_*``).

With ``mysql_ssl_ca`` set, every connection the agent opens must run TLS: the server's
certificate is verified against that CA and must name ``mysql_host``. The driver alone would fall
back to plaintext when the server does not offer TLS (and send the login over it); the agent
refuses such a server before it authenticates, with CR_SSL_CONNECTION_ERROR (2026).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiomysql
import pymysql
from pymysql.constants import CLIENT

__all__ = ["CR_SSL_CONNECTION_ERROR", "TlsRequiredConnection", "mysql_ssl_context"]

CR_SSL_CONNECTION_ERROR = 2026


def mysql_ssl_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """The TLS context of the agent's database connections; None (plaintext) without ``ca``.

    Raises:
        ValueError: a client certificate without its key (or the reverse), or without a CA.
        OSError, ssl.SSLError: a file that cannot be read or is not a certificate or key.
    """
    if (cert is None) != (key is None):
        raise ValueError("mysql_ssl_cert and mysql_ssl_key go together: set both or neither")
    if ca is None:
        if cert is not None:
            raise ValueError("mysql_ssl_cert needs mysql_ssl_ca (the CA of the server)")
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


class TlsRequiredConnection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
    """An aiomysql connection that refuses, before sending its login, a server that does not
    offer TLS when it was given a TLS context (aiomysql would go on in plaintext); and that
    says why a TLS handshake failed (aiomysql says only "Can't connect")."""

    async def _connect(self) -> None:
        try:
            await super()._connect()
        except pymysql.err.OperationalError as err:
            if isinstance(err.__cause__, ssl.SSLError):
                raise pymysql.err.OperationalError(
                    CR_SSL_CONNECTION_ERROR,
                    f"TLS with the database at {self._host}:{self._port} failed: {err.__cause__}",
                ) from err.__cause__
            raise

    async def _request_authentication(self) -> None:
        if self._ssl_context is not None and not self.server_capabilities & CLIENT.SSL:
            raise pymysql.err.OperationalError(
                CR_SSL_CONNECTION_ERROR,
                f"the database at {self._host}:{self._port} does not offer TLS, which "
                "mysql_ssl_ca requires (start it with ssl_cert, ssl_key and ssl_ca)",
            )
        await super()._request_authentication()
