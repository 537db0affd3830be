"""``twopc certs``: a throwaway certificate authority and the certificates of a twopc cluster.

For the playground, tests, demos and trials, not for production (use your organisation's CA
there): the CA's key sits in a file next to the certificates it signs.

    twopc certs init DIR                                  DIR/ca.pem, DIR/ca.key
    twopc certs issue DIR NAME [--san HOST_OR_IP ...]     DIR/NAME.pem, DIR/NAME.key

Every certificate is valid for a short time (``--days``, 7 by default; the CA 30). Its subject
Common Name is ``NAME``: that is the **identity** the daemons see when it is presented as a
client certificate (``twopc.identity``). It serves both as a server and as a client certificate
(the coordinator is both), and names the hosts it may serve in its subject alternative names:
``localhost`` and ``127.0.0.1`` unless ``--san`` says otherwise. Keys are ECDSA P-256, written
with mode 0600; an existing file is replaced.

From Python (the playground and the tests use this)::

    ca = CertificateAuthority.create(directory)
    ca.issue("coordinator")                                  # -> IssuedCertificate(cert, key)
    ca.issue("old", valid_from=now - 2 days, days=1)         # already expired
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "DEFAULT_SANS",
    "LEAF_DAYS",
    "CertificateAuthority",
    "CertsError",
    "IssuedCertificate",
    "add_arguments",
    "run",
]

CA_DAYS = 30
LEAF_DAYS = 7
DEFAULT_SANS = ("localhost", "127.0.0.1")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid a little before now: clocks differ


class CertsError(Exception):
    """A CA or a certificate that cannot be made or read (the message says which file)."""


@dataclass(frozen=True)
class IssuedCertificate:
    name: str
    cert: Path
    key: Path


class CertificateAuthority:
    """A CA on disk: ``ca.pem`` and ``ca.key`` in ``directory``, which also receives what it
    issues."""

    def __init__(
        self, directory: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.directory = directory
        self._certificate = certificate
        self._key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        name: str = "twopc throwaway CA",
        days: float = CA_DAYS,
        now: datetime.datetime | None = None,
    ) -> CertificateAuthority:
        """Makes a new CA in ``directory`` (created, mode 0700), replacing one that is there."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start = (now or _now()) - _CLOCK_SKEW
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _CLOCK_SKEW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_key(directory / CA_KEY, key)
        _write_public(directory / CA_CERT, certificate.public_bytes(serialization.Encoding.PEM))
        return cls(directory, certificate, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            certificate = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as err:
            raise CertsError(
                f"no usable CA in {directory} ({err}); make one with: twopc certs init {directory}"
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertsError(f"{directory / CA_KEY} is not an EC key made by twopc certs")
        return cls(directory, certificate, key)

    def issue(
        self,
        name: str,
        sans: Sequence[str] = DEFAULT_SANS,
        *,
        days: float = LEAF_DAYS,
        valid_from: datetime.datetime | None = None,
        directory: Path | None = None,
    ) -> IssuedCertificate:
        """Issues a certificate for ``name`` (its Common Name, the identity), for server and
        client use, valid for the hosts ``sans`` (DNS names or IP addresses) from ``valid_from``
        (default: now, less a few minutes for clock skew) for ``days``. Writes
        ``NAME.pem`` and ``NAME.key`` (0600) into ``directory`` (default: the CA's)."""
        if not name or "/" in name or name.startswith("."):
            raise CertsError(f"certificate name {name!r}: give a plain name, e.g. coordinator")
        if name == "ca":
            raise CertsError("certificate name 'ca' is the CA's own")
        target = directory or self.directory
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        start = valid_from if valid_from is not None else _now() - _CLOCK_SKEW
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        issued = IssuedCertificate(name, target / f"{name}.pem", target / f"{name}.key")
        _write_key(issued.key, key)
        _write_public(issued.cert, certificate.public_bytes(serialization.Encoding.PEM))
        return issued


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _general_name(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not text or any(c.isspace() for c in text):
        raise CertsError(f"--san {text!r}: give a DNS name or an IP address")
    return x509.DNSName(text)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes ``data`` to ``path`` with ``mode`` from the first byte (never readable by others
    for a moment), replacing the file atomically."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # the umask may have narrowed it: public files are meant readable
    finally:
        os.close(fd)
    os.replace(scratch, path)


# --- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="certs_action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="make a throwaway CA: DIR/ca.pem and DIR/ca.key")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--days", type=float, default=CA_DAYS, help="validity (default %(default)s)")
    init.add_argument(
        "--force", action="store_true", help="replace a CA already in DIR (its certificates die)"
    )
    issue = actions.add_parser(
        "issue", help="a certificate signed by DIR's CA: DIR/NAME.pem and DIR/NAME.key"
    )
    issue.add_argument("dir", type=Path, metavar="DIR")
    issue.add_argument("name", metavar="NAME", help="its Common Name: the identity the daemons see")
    issue.add_argument(
        "--san",
        action="append",
        default=None,
        metavar="HOST_OR_IP",
        help="a host name or IP address it may serve (repeat; default: localhost, 127.0.0.1)",
    )
    issue.add_argument(
        "--days", type=float, default=LEAF_DAYS, help="validity (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.certs_action == "init" and (directory / CA_KEY).exists() and not args.force:
        print(
            f"twopc certs: {directory} already holds a CA; --force replaces it (every "
            "certificate it issued stops being trusted)",
            file=sys.stderr,
        )
        return 1
    try:
        if args.certs_action == "init":
            ca = CertificateAuthority.create(directory, days=args.days)
            print(f"CA: {ca.cert_path} (key {directory / CA_KEY}, mode 0600)")
            print(f"next: twopc certs issue {directory} coordinator (and one per agent, client)")
            return 0
        ca = CertificateAuthority.load(directory)
        issued = ca.issue(args.name, tuple(args.san or DEFAULT_SANS), days=args.days)
    except CertsError as err:
        print(f"twopc certs: {err}", file=sys.stderr)
        return 1
    print(f"{issued.name}: certificate {issued.cert}, key {issued.key} (mode 0600)")
    print(f"  identity (Common Name): {issued.name}; trust: {ca.cert_path}")
    return 0
