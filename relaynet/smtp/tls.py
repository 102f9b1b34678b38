# -*- test-case-name: tests.test_tls -*-
"""
TLS for both sides, with pyOpenSSL through Twisted's C{CertificateOptions} and
service_identity for host name checks, and a small lab CA (C{relaynet gen-cert})
made with C{cryptography}.

Server side: STARTTLS on relay and submission listeners and implicit TLS
(port 465 style); TLS 1.2 is the floor, and TLS 1.2 suites are limited to
forward-secret AEAD ones (L{SERVER_CIPHERS}).

Client side, a per-route policy:
 - C{none}: never STARTTLS;
 - C{opportunistic}: STARTTLS when offered, cleartext only when it is not
   offered (a failed handshake defers the message, it does not fall back);
 - C{required}: STARTTLS or defer, certificate not checked;
 - C{verify}: STARTTLS or defer, and the certificate must name the next hop's
   host, checked with service_identity against the route's CA bundle.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

TLS_FLOOR = ssl.TLSVersion.TLSv1_2
# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are all
# AEAD with forward secrecy and are not affected by this list).
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


class TLSConfigError(Exception):
    """A certificate or key cannot be loaded."""


def server_options(cert_file: Path, key_file: Path) -> ssl.CertificateOptions:
    """
    Server TLS options from PEM files (the certificate file may hold the
    chain after the leaf).

    @raise TLSConfigError: a file is missing or does not parse.
    """
    try:
        cert_pem = Path(cert_file).read_bytes()
        key_pem = Path(key_file).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        pcert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = [
            ssl.Certificate.loadPEM(block).original
            for block in _pem_blocks(cert_pem)[1:]
        ]
    except Exception as e:
        raise TLSConfigError(f"cannot load certificate {cert_file} / key {key_file}: {e}") from None
    return ssl.CertificateOptions(
        privateKey=pcert.privateKey.original,
        certificate=pcert.original,
        extraCertChain=chain or None,
        raiseMinimumTo=TLS_FLOOR,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
    )


def client_options(
    policy: str, hostname: str, ca_file: Path | None = None
) -> IOpenSSLClientConnectionCreator | ssl.CertificateOptions | None:
    """
    Client TLS options for a route's policy toward C{hostname}.

    @return: C{None} for policy C{none}; options that do not check the
        certificate for C{opportunistic} and C{required}; options that verify
        it against C{ca_file} (or the system trust store) and check the name
        with service_identity for C{verify}.
    """
    if policy == "none":
        return None
    if policy in ("opportunistic", "required"):
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=TLS_FLOOR)
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust_root(ca_file), extraCertificateOptions={
            "raiseMinimumTo": TLS_FLOOR,
        }
    )


def trust_root(ca_file: Path | None = None) -> Any:
    """
    The certificates of the PEM bundle C{ca_file} as a trust root, or the
    system's trust store when C{None}.

    @raise TLSConfigError: the bundle cannot be read or holds no certificate.
    """
    if ca_file is None:
        return ssl.platformTrust()
    try:
        certs = [ssl.Certificate.loadPEM(b) for b in _pem_blocks(Path(ca_file).read_bytes())]
    except Exception as e:
        raise TLSConfigError(f"cannot load CA bundle {ca_file}: {e}") from None
    if not certs:
        raise TLSConfigError(f"no certificate in CA bundle {ca_file}")
    return ssl.trustRootFromCertificates(certs)


def connection_info(transport: Any) -> tuple[str, str] | None:
    """
    C{(protocol version, cipher)} of a TLS transport after its handshake, e.g.
    C{("TLSv1.3", "TLS_AES_256_GCM_SHA384")}, or C{None}.
    """
    try:
        conn = transport.getHandle()
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
    except Exception:
        return None
    if not version or not cipher:
        return None
    return str(version), str(cipher)


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    out = []
    for part in pem.split(marker)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(part[start:] + marker + b"\n")
    return out


# -- relaynet gen-cert ------------------------------------------------------


def generate_ca(directory: Path, name: str | None = None, days: int = 3650) -> tuple[Path, Path]:
    """
    Make a self-signed CA in C{directory} (C{ca.pem}, C{ca.key}, mode 0600 for
    the key), or reuse the one there. Its name is unique by default (two labs'
    CAs with one name in one bundle would make OpenSSL pick the wrong one).

    @return: the paths of the certificate and the key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    import secrets

    name = name or f"relaynet lab CA {secrets.token_hex(4)}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def generate_cert(
    directory: Path, ca_cert: Path, ca_key: Path, names: list[str], days: int = 825
) -> tuple[Path, Path]:
    """
    Issue a server certificate for C{names} (DNS names or IP addresses, the
    first is the file name and the common name), signed by the CA.

    @return: the paths of C{<name>.pem} (leaf then CA) and C{<name>.key}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # The CA key file may hold any kind of private key, some of which
        # cannot sign (X25519, DH): sign() raises TypeError for those.
        .sign(ca_private, hashes.SHA256())  # type: ignore[arg-type]
    )
    stem = names[0].replace("*", "_").replace(":", "_")
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_key(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    return cert_path, key_path


def _write_key(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
