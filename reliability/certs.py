"""Certificates for mutual TLS: a CA that signs the server's and a client's certificate, and a second, unrelated
CA with a client certificate of its own (which the server must refuse). Made with `cryptography`; the one maker of
certificates for the campaigns and the test suite (tests/conftest.py's servers["tls"])."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _certificate(subject: str, key, issuer: x509.Certificate | None, issuer_key, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key=None) -> dict[str, Path]:
    paths = {"cert": directory / f"{name}.pem"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        paths["key"] = directory / f"{name}.key"
        paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def make_mtls(directory: Path) -> dict[str, Path]:
    """Under `directory`: ca.pem; server.pem/.key and client.pem/.key signed by it; rogue-ca.pem and
    rogue-client.pem/.key signed by another CA. Keys: ca, cert, key (server), client_cert, client_key,
    rogue_cert, rogue_key: common.start_server's `tls` (with client_cert it asks clients for a certificate)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("superweights reliability CA", ca_key, None, ca_key, ca=True)
    rogue_ca = _certificate("some other CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server = _write(directory, "server", _certificate("localhost", server_key, ca, ca_key, server=True), server_key)
    client = _write(directory, "client", _certificate("a client", client_key, ca, ca_key), client_key)
    rogue = _write(directory, "rogue-client", _certificate("a rogue client", rogue_key, rogue_ca, rogue_ca_key),
                   rogue_key)
    _write(directory, "rogue-ca", rogue_ca)
    return {"ca": _write(directory, "ca", ca)["cert"], "cert": server["cert"], "key": server["key"],
            "client_cert": client["cert"], "client_key": client["key"], "rogue_cert": rogue["cert"],
            "rogue_key": rogue["key"]}
