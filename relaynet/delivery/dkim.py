# -*- test-case-name: tests.test_dkim -*-
"""
DKIM signing of mail as it leaves the organisation (RFC 6376, RFC 8463),
with dkimpy, the reference Python implementation.

 - Keys: one or more per signing domain, each with its selector; RSA
   (RFC 8301: at least 1024 bits, 2048 advised; rsa-sha256) or Ed25519
   (RFC 8463: ed25519-sha256). Every key of the domain signs, so a domain
   with an RSA and an Ed25519 key is dual-signed (RFC 8463 section 6: a
   verifier that knows only RSA still finds a signature it can check).
   Key files are PEM (PKCS#8, or the traditional RSA form OpenDKIM's
   C{opendkim-genkey} writes); L{load_key} reads them once, at
   configuration time, so that a key that cannot be read stops the node
   with one line instead of failing mail later.
 - The signing domain is the domain of the From: header field's address
   (DMARC alignment), or what the signing table maps it to (C{"*.example.org"
   = "example.org"}: the parent's key signs for the subdomains, which
   relaxed alignment accepts). A message with no From:, several From:
   fields or several addresses, or a domain without a key goes unsigned;
   L{Signer.sign} says why (the caller emits an event).
 - Canonicalisation relaxed/relaxed (RFC 6376 3.4.2, 3.4.4): survives the
   header refolding and whitespace changes of later hops.
 - Signed fields: those of RFC 6376 5.4.1's list that are present, in their
   order, and From, Subject and To once more than they occur ("over-signing",
   RFC 6376 8.15): a field of those names added later, even where there was
   none, breaks the signature, so nobody can add a second From: or a
   Subject: to a signed message. Trace fields (Received, Return-Path) are
   never signed: later hops add them.
 - No C{l=} (a body length tag lets anyone append to the body), no C{x=}.

Signing is pure: L{Signer.sign} takes the message's bytes, exactly as they
will be sent (after any 7-bit conversion: a conversion after signing would
break the body hash), and returns the header fields to put in front of
them. It reads no file and does no I/O; it is CPU work (hashing the body,
one RSA or Ed25519 signature per key), so the delivery code runs it in a
worker thread.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import fnmatch
import time
from typing import Any, Callable, Iterable, Sequence

import threading

from attrs import frozen
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relaynet.dkimkeys import (
    ED25519, RSA, KeyFileError, SigningKey, generate_key, load_key, signing_key, zone_record,
)

OVERSIGNED = (b"from", b"subject", b"to")
"""Signed once more than they occur (RFC 6376 8.15)."""


def dkimpy() -> Any:
    """
    The C{dkim} module (dkimpy), imported on first use: a node without
    C{[[dkim.keys]]} never loads it, nor the dnspython and PyNaCl it
    imports (about 160 modules, 4 MiB of every process). A node with keys
    imports it when its L{Signer} is made, and a supervisor before it forks
    its workers, so that they share it (L{relaynet.supervisor.prepare_to_fork}).
    """
    import dkim

    return dkim


def signed_fields() -> frozenset[bytes]:
    """The header fields signed when present (RFC 6376 5.4.1's list, and L{OVERSIGNED})."""
    return frozenset(dkimpy().DKIM.SHOULD) | frozenset(OVERSIGNED)


@frozen
class Signed:
    """
    What signing one message gave.

    @ivar fields: the C{DKIM-Signature} header fields to put in front of the
        message (CRLF line ends), or C{b""} when it goes unsigned.
    @ivar from_domain: the From: address's domain, if there was one.
    @ivar domain: the signing domain (C{d=}), or C{None} when unsigned.
    @ivar selectors: the selectors of the signatures made.
    @ivar unsigned: why the message goes unsigned, or C{None}.
    """

    fields: bytes
    from_domain: str | None
    domain: str | None = None
    selectors: tuple[str, ...] = ()
    unsigned: str | None = None


def from_domain(message: bytes) -> tuple[str | None, str | None]:
    """
    The domain of the From: header field's single address.

    @return: C{(domain, None)}, or C{(None, why not)}.
    """
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    values = parsed.get_all("From") or []
    if not values:
        return None, "no From: header field"
    if len(values) > 1:
        return None, "more than one From: header field"
    addresses = [a for _, a in email.utils.getaddresses([str(values[0])]) if a]
    if len(addresses) != 1:
        return None, f"From: holds {len(addresses)} addresses, not one"
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    if not domain or "@" not in addresses[0]:
        return None, "From: address has no domain"
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None, f"From: domain {domain!r} is not a valid domain name"
    return domain, None


_RSA_KEYS: dict[int, rsa.RSAPrivateKey] = {}
"""Our RSA keys by modulus, for L{_rsa_sign}."""
_PURE_RSA_SIGN: Callable[[Any, Any], Any] | None = None
"""dkimpy's own signing step, once L{_use_openssl_for} has taken its place."""
_PATCH = threading.Lock()


def _rsa_sign(digest: Any, private_key: Any) -> bytes:
    """
    dkimpy's RSASSA-PKCS1-v1_5 signing step, done by OpenSSL (through
    C{cryptography}) for our own keys: dkimpy does it with Python integers,
    6.3 ms of the 7.1 ms a 5 KB message took to sign with RSA-2048, against
    0.26 ms here (bench/README.md, "The dkim rows"). The signature is the
    same (PKCS#1 v1.5 is deterministic); dkimpy still canonicalises, hashes
    and builds the header. Any other key or hash: dkimpy's own code.
    """
    key = _RSA_KEYS.get(int(private_key.get("modulus") or 0)) if isinstance(private_key, dict) else None
    if key is None or getattr(digest, "name", None) != "sha256":
        assert _PURE_RSA_SIGN is not None
        return bytes(_PURE_RSA_SIGN(digest, private_key))
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def _use_openssl_for(keys: Iterable[SigningKey]) -> None:
    """Register our RSA keys with L{_rsa_sign}, and put it in dkimpy's place (once)."""
    global _PURE_RSA_SIGN
    dkim = dkimpy()
    with _PATCH:
        if _PURE_RSA_SIGN is None:
            _PURE_RSA_SIGN = dkim.RSASSA_PKCS1_v1_5_sign
        for k in keys:
            if k.algorithm == RSA:
                key = serialization.load_pem_private_key(k.private, password=None)
                assert isinstance(key, rsa.RSAPrivateKey)
                _RSA_KEYS[key.private_numbers().public_numbers.n] = key
        dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


class Signer:
    """
    Signs messages with the keys of their From: domain.

    @ivar keys: per signing domain, its keys in the order their signatures
        are added.
    """

    def __init__(
        self, keys: Iterable[SigningKey], signing_table: Sequence[tuple[str, str]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        @param signing_table: C{(pattern, signing domain)} pairs, first match
            wins: an exact domain, C{*.domain} (any subdomain) or C{*}
            (every domain).
        @param clock: unused by dkimpy today (it reads C{time.time} for
            C{t=}); kept for the day it takes one.
        """
        self.keys: dict[str, list[SigningKey]] = {}
        for k in keys:
            self.keys.setdefault(k.domain.lower(), []).append(k)
        _use_openssl_for(k for ks in self.keys.values() for k in ks)
        self._signed = signed_fields()
        self.signing_table = tuple((p.lower(), d.lower()) for p, d in signing_table)
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Any) -> "Signer | None":
        """
        The signer of a node's C{[dkim]} (a L{relaynet.config.DKIMSettings}),
        or C{None} when it has no keys.
        """
        if not settings.keys:
            return None
        return cls(settings.keys, settings.signing_table)

    def domain_for(self, from_domain: str) -> str | None:
        """The signing domain for mail from C{from_domain}, or C{None}."""
        for pattern, domain in self.signing_table:
            if from_domain == pattern or pattern == "*" or (
                pattern.startswith("*.") and fnmatch.fnmatchcase(from_domain, pattern)
            ):
                return domain
        return from_domain if from_domain in self.keys else None

    def sign(self, message: bytes) -> Signed:
        """
        Sign C{message} (CRLF line ends, as sent) with every key of its
        signing domain. Blocking CPU work: run it in a worker thread.
        """
        domain_from, why = from_domain(message)
        if domain_from is None:
            return Signed(b"", None, unsigned=why)
        domain = self.domain_for(domain_from)
        keys = self.keys.get(domain or "", [])
        if domain is None or not keys:
            return Signed(b"", domain_from, unsigned=f"no DKIM key for {domain or domain_from}")
        fields = []
        dkim = dkimpy()
        for key in keys:
            signer = dkim.DKIM(message, signature_algorithm=key.algorithm.encode(), linesep=b"\r\n")
            include = [name for name, _ in signer.headers if name.lower() in self._signed]
            include += list(OVERSIGNED)
            value = signer.sign(
                key.selector.encode("ascii"), domain.encode("ascii"), key.private,
                canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
            )
            if not value.endswith(b"\r\n"):
                value += b"\r\n"
            fields.append(value)
        # Each signs the message as it is (no signature signs another).
        return Signed(b"".join(fields), domain_from, domain, tuple(k.selector for k in keys))


__all__ = [
    "ED25519", "RSA", "KeyFileError", "Signed", "Signer", "SigningKey", "from_domain",
    "generate_key", "load_key", "signing_key", "zone_record",
]
