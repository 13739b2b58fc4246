"""Throwaway certificates for the TLS tests, made with the `cryptography` package: a CA, a server certificate it
signed (for localhost and 127.0.0.1), a client certificate it signed, and a client certificate from another CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest

x509 = pytest.importorskip("cryptography.x509", reason="the TLS tests make certificates with cryptography")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402 - after the skip above
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by another CA
    stranger_key: Path


def make_certs(out: Path) -> Certs:
    ca_key, ca_cert = _ca("moecluster test CA")
    other_key, other_cert = _ca("someone else's CA")
    server_key, server_cert = _leaf("localhost", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH, server=True)
    client_key, client_cert = _leaf("test client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger_key, stranger_cert = _leaf("stranger", other_key, other_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca": _cert_pem(ca_cert),
        "server_cert": _cert_pem(server_cert),
        "server_key": _key_pem(server_key),
        "client_cert": _cert_pem(client_cert),
        "client_key": _key_pem(client_key),
        "stranger_cert": _cert_pem(stranger_cert),
        "stranger_key": _key_pem(stranger_key),
    }
    for name, pem in files.items():
        (out / f"{name}.pem").write_bytes(pem)
    return Certs(**{name: out / f"{name}.pem" for name in files})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(common_name: str, ca_key, ca_cert, usage, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
