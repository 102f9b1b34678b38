# -*- test-case-name: tests.test_dkim -*-
"""
DKIM keys (RFC 6376 3.6, RFC 8463): reading a private key file, making a
new one, and the DNS record that publishes its public half.

At the ground layer: the configuration reads the keys when it loads (a key
that cannot be read is an error of the configuration, so the node does not
start), and the signer (L{relaynet.delivery.dkim}) uses them.
"""

from __future__ import annotations

import base64
from pathlib import Path

from attrs import field, frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"

MIN_RSA_BITS = 1024
"""RFC 8301 section 3.2: verifiers ignore RSA keys below 1024 bits."""

class KeyFileError(ValueError):
    """A DKIM key file cannot be read or is not a usable private key."""


@frozen
class SigningKey:
    """
    One DKIM key: the domain it signs for, its selector, and the private
    key in the form dkimpy takes.

    @ivar algorithm: L{RSA} or L{ED25519}.
    @ivar private: PEM (RSA) or the base64 of the raw 32-byte seed (Ed25519).
    @ivar record: the DNS TXT record to publish at
        C{<selector>._domainkey.<domain>}.
    """

    domain: str
    selector: str
    key_file: Path
    algorithm: str
    private: bytes = field(repr=False, eq=False)
    record: str = field(eq=False)

    @property
    def record_name(self) -> str:
        """Where L{record} goes: C{<selector>._domainkey.<domain>.}"""
        return f"{self.selector}._domainkey.{self.domain}."


def load_key(path: Path, domain: str, selector: str) -> SigningKey:
    """
    Read the private key at C{path} for C{domain} and C{selector}.

    @raise KeyFileError: unreadable, not a PEM private key, or neither RSA
        nor Ed25519, or an RSA key below L{MIN_RSA_BITS}.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {e}") from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm and others
        raise KeyFileError(f"{path}: {e}") from None
    return signing_key(key, domain, selector, Path(path))


def signing_key(key: object, domain: str, selector: str, path: Path) -> SigningKey:
    """A L{SigningKey} from a C{cryptography} private key object."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{path}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} (RFC 8301)")
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey(domain, selector, path, RSA, private, _record("rsa", public))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey(domain, selector, path, ED25519, base64.b64encode(raw), _record("ed25519", public))
    raise KeyFileError(f"{path}: a {type(key).__name__}; DKIM keys are RSA or Ed25519")


def _record(kind: str, public: bytes) -> str:
    """The TXT record of a public key (RFC 6376 3.6.1; RFC 8463 4: the raw 32 bytes)."""
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def generate_key(algorithm: str = "rsa", bits: int = 2048) -> bytes:
    """
    A new private key as PEM (PKCS#8): C{algorithm} C{"rsa"} (of C{bits}
    bits) or C{"ed25519"}.
    """
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}: rsa or ed25519")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def zone_record(key: SigningKey) -> str:
    """
    L{SigningKey.record} as a zone file line: the value split into quoted
    strings of at most 255 octets (RFC 1035 3.3.14; an RSA-2048 record is
    longer than one string may be).
    """
    value = key.record
    parts = [value[i:i + 255] for i in range(0, len(value), 255)]
    return f"{key.record_name} IN TXT " + " ".join(f'"{p}"' for p in parts)


__all__ = [
    "ED25519", "MIN_RSA_BITS", "RSA", "KeyFileError", "SigningKey", "generate_key", "load_key",
    "signing_key", "zone_record",
]
