"""``twopc certs``: the throwaway CA and the certificates it issues."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twopc.cli import main as cli_main
from twopc.testing.certs import CertificateAuthority, CertsError


def test_issued_certificates_carry_the_name_the_hosts_and_a_private_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    issued = ca.issue("agent", ["localhost", "127.0.0.1", "agent-eu.internal"])
    certificate = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == "agent"
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "agent-eu.internal"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=7, minutes=5)  # short-lived by default
    assert certificate.issuer == CertificateAuthority.load(tmp_path)._certificate.subject
    for key in (issued.key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(issued.cert.stat().st_mode) == 0o644


def test_an_expired_certificate_can_be_made_on_purpose(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    issued = ca.issue("old", valid_from=start, days=1, directory=tmp_path / "elsewhere")
    certificate = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert certificate.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert issued.cert.parent == tmp_path / "elsewhere"
    with pytest.raises(CertsError, match="plain name"):
        ca.issue("../escape")


def test_twopc_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    assert cli_main(["certs", "init", str(directory)]) == 0
    assert cli_main(["certs", "init", str(directory)]) == 1  # a CA is there: not replaced
    assert "--force" in capsys.readouterr().err
    assert cli_main(["certs", "issue", str(directory), "app", "--san", "10.0.0.7"]) == 0
    certificate = x509.load_pem_x509_certificate((directory / "app.pem").read_bytes())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert stat.S_IMODE((directory / "app.key").stat().st_mode) == 0o600
    assert cli_main(["certs", "issue", str(tmp_path / "none"), "app"]) == 1
    assert "twopc certs init" in capsys.readouterr().err
