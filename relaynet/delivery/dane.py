# -*- test-case-name: tests.test_dane -*-
"""
DANE for SMTP (RFC 7672; TLSA records: RFC 6698, RFC 7671, RFC 7218 names),
as Postfix's SMTP client applies it with C{smtp_dns_support_level = dnssec}
and C{smtp_tls_security_level = dane}.

Trust in DNS:
 - DNSSEC is not validated here. A configured, local, validating resolver
   does it, and an answer is I{secure} when its AD bit is set (RFC 4035
   section 3.2.3, RFC 6840 section 5.8). Queries ask for it: AD set in the
   query (RFC 6840 section 5.7) and EDNS0 with the DO bit (RFC 3225), as
   Postfix does. Without such a resolver, DANE is off: the AD bit of any
   other server means nothing.
 - A validating resolver answers SERVFAIL for bogus data. A SERVFAIL, a
   timeout or another error code for a TLSA lookup is a failed lookup: the
   delivery to that host defers (4.7.5); it never falls back to clear text
   or to unauthenticated TLS (RFC 7672 section 2.2).

When DANE applies (RFC 7672 section 2.2):
 - when the MX RRset was secure (section 2.2.1; the MX code asks
   L{DANE.mx_secure} and passes the answer to L{DANE.requirement_for}).
   The RFC allows (MAY) DANE for the hosts of an insecure MX RRset too;
   relaynet does not, unless the caller says the MX RRset was secure;
 - and the exchanger's address records were secure (L{DANE.requirement_for}
   asks: A and AAAA; of the two, those that answered must all be secure);
 - then the TLSA RRset is looked up at C{_PORT._tcp.HOST} (section 2.2.3).
   A secure answer with records: TLS is required and must match them. A
   secure NXDOMAIN or NODATA, or an insecure answer: no DANE for that host
   (the route's own TLS policy applies).
 - A CNAME at the TLSA name is followed by the resolver; the records at the
   end of the chain are used, secure only if the whole answer is. The
   address lookup's CNAME target (when secure) is a reference identifier
   besides the MX host name (section 3.2). The TLSA lookup at the expanded
   name first, which section 2.2.3 prefers, is not done.

Matching (RFC 7672 section 3, RFC 7671):
 - DANE-EE(3): the leaf certificate (selector 0) or its SubjectPublicKeyInfo
   (selector 1), compared in full (matching type 0) or by SHA2-256 (1) or
   SHA2-512 (2). No name check and no expiry check (section 3.1.1).
 - DANE-TA(2): a certificate of the presented chain, or its public key,
   matches; the leaf must chain to it by signatures through the presented
   certificates (each issuer a CA); the leaf and the certificates between it
   and the trust anchor must be within their validity period (the trust
   anchor's own dates are not checked: it is trusted by DNS, as a bare key
   in a C{2 1 0} record is); and the leaf must name the MX host (a DNS
   subjectAltName, or the common name when there is none; a wildcard only as
   the whole leftmost label) (sections 3.1.2 and 3.2). A C{2 1 0} record
   may carry a key that the server does not send as a certificate.
 - PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (section 3.1.3), as are
   unknown usages, selectors and matching types, and digests of the wrong
   length. Some usable records: one of them must match. Only unusable
   records: TLS is still required, without authentication (section 2.2).

The pieces:
 - L{TLSARecord} and L{match_chain} are pure: no reactor, no I/O.
 - L{ValidatingResolver} asks the resolver (UDP, TCP when the answer is
   truncated) and keeps answers for their TTL.
 - L{DANE.requirement_for} gives a host's L{DaneRequirement} before
   connecting; L{verify_chain} checks the certificate chain after the TLS
   handshake (L{peer_chain} takes it from a pyOpenSSL connection).
 - L{DaneClientTLS} is the client TLS options for STARTTLS under such a
   requirement: it runs L{verify_chain} inside the handshake and aborts it
   on a mismatch (L{DaneVerificationError}).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from io import BytesIO
from typing import Any, Final

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
)
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)
from twisted.names import dns, error
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

TLSA: Final = 52
"""The TLSA record type (RFC 6698 section 7.1)."""

# Certificate usages (RFC 6698 section 2.1.1, names from RFC 7218).
PKIX_TA: Final = 0
PKIX_EE: Final = 1
DANE_TA: Final = 2
DANE_EE: Final = 3
# Selectors.
SELECTOR_CERT: Final = 0
SELECTOR_SPKI: Final = 1
# Matching types, with the digest length each implies.
MATCH_FULL: Final = 0
MATCH_SHA256: Final = 1
MATCH_SHA512: Final = 2
_DIGEST_SIZE: Final = {MATCH_SHA256: 32, MATCH_SHA512: 64}

DSN: Final = "4.7.5"
"""The enhanced status code of a DANE failure (RFC 7672 section 2.2, RFC 3463: cryptographic failure)."""

NEGATIVE_TTL: Final = 300.0
"""The longest time a secure "no such name" or "no such record" answer is kept."""

MAX_TTL: Final = 86400.0
"""The longest time any answer is kept."""

DNS_TIMEOUT: Final = (1.0, 3.0)
"""Seconds to wait for each try of a query over UDP (then over TCP, the sum)."""

MAX_CACHED: Final = 10000
"""The most answers a L{ValidatingResolver} keeps."""

EDNS_PAYLOAD: Final = 1232
"""The UDP payload size announced with EDNS0 (the DNS flag day 2020 value)."""

_MAX_CHAIN: Final = 10


# -- TLSA records and matching (pure) --------------------------------------


@frozen
class TLSARecord:
    """
    One TLSA record (RFC 6698 section 2.1).

    @ivar usage: certificate usage: 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    @ivar selector: 0 the full certificate, 1 its SubjectPublicKeyInfo.
    @ivar mtype: matching type: 0 exact, 1 SHA2-256, 2 SHA2-512.
    @ivar data: the certificate association data.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: bytes) -> TLSARecord:
        """
        Parse a record's wire-format RDATA.

        @raise ValueError: it is shorter than four bytes.
        """
        if len(rdata) < 4:
            raise ValueError(f"TLSA RDATA of {len(rdata)} bytes is too short")
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @classmethod
    def from_text(cls, text: str) -> TLSARecord:
        """
        Parse presentation format: C{"3 1 1 0123abcd..."} (the data in
        hexadecimal, which may be split by white space).

        @raise ValueError: it does not parse.
        """
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"not a TLSA record: {text!r}")
        try:
            fields = [int(p) for p in parts[:3]]
            data = bytes.fromhex("".join(parts[3:]))
        except ValueError:
            raise ValueError(f"not a TLSA record: {text!r}") from None
        if not all(0 <= f <= 255 for f in fields):
            raise ValueError(f"not a TLSA record: {text!r}")
        return cls(fields[0], fields[1], fields[2], data)

    @classmethod
    def for_certificate(
        cls, der: bytes, usage: int = DANE_EE, selector: int = SELECTOR_SPKI, mtype: int = MATCH_SHA256,
    ) -> TLSARecord:
        """
        The record that matches the certificate C{der} (DER) with the given
        parameters: what a domain publishes (C{3 1 1} by default, the
        common choice, RFC 7672 section 3.1.1).
        """
        cert = x509.load_der_x509_certificate(der)
        return cls(usage, selector, mtype, _digest(mtype, _selected(cert, selector)))

    def to_rdata(self) -> bytes:
        """The wire-format RDATA."""
        return bytes([self.usage, self.selector, self.mtype]) + self.data

    def to_text(self) -> str:
        """Presentation format, C{"3 1 1 <hex>"}, for a zone file."""
        return f"{self.params} {self.data.hex()}"

    @property
    def params(self) -> str:
        """C{"3 1 1"}: how reasons name a record."""
        return f"{self.usage} {self.selector} {self.mtype}"

    @property
    def usable(self) -> bool:
        """
        Whether an SMTP client may use it: DANE-TA or DANE-EE (RFC 7672
        section 3.1.3), a known selector and matching type, a digest of the
        right length.
        """
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (SELECTOR_CERT, SELECTOR_SPKI):
            return False
        if self.mtype == MATCH_FULL:
            return bool(self.data)
        return _DIGEST_SIZE.get(self.mtype) == len(self.data)


@frozen
class MatchResult:
    """
    Whether a server's certificate chain satisfies its TLSA records.

    @ivar ok: it does (or there was nothing to check).
    @ivar reason: one line for DSNs and events, e.g. C{"TLSA 3 1 1 did not
        match the certificate of mx.example.test"}.
    @ivar record: the record that matched, if one did.
    @ivar dsn: C{"4.7.5"} when not C{ok}, else C{""}.
    @ivar result_type: when not C{ok}, the failure's result type for TLS
        reports (RFC 8460 section 4.3): C{certificate-host-mismatch},
        C{certificate-expired}, C{certificate-not-trusted},
        C{validation-failure} (no record matched) or C{dnssec-invalid}
        (the lookup failed); else C{""}.
    """

    ok: bool
    reason: str
    record: TLSARecord | None = None
    dsn: str = ""
    result_type: str = ""

    @classmethod
    def failed(cls, reason: str, result_type: str = "validation-failure") -> MatchResult:
        """A failure: C{dsn} 4.7.5."""
        return cls(False, reason, None, DSN, result_type)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == SELECTOR_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == MATCH_SHA256:
        return hashlib.sha256(data).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(data).digest()
    if mtype == MATCH_FULL:
        return data
    raise ValueError(f"unknown TLSA matching type {mtype}")


def _matches(record: TLSARecord, cert: x509.Certificate) -> bool:
    return _digest(record.mtype, _selected(cert, record.selector)) == record.data


def certificate_names(cert: x509.Certificate) -> list[str]:
    """
    The DNS names of C{cert}: its DNS subjectAltNames, or its common names
    when it has none (RFC 7672 section 3.2), lower case.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n.rstrip(".").lower() for n in names]


def name_matches(pattern: str, host: str) -> bool:
    """
    Whether the certificate name C{pattern} covers C{host}: equal (case
    folded, no trailing dot), or a wildcard C{*.rest} that stands for the
    whole leftmost label of C{host} (RFC 7672 section 3.2, RFC 6125
    section 6.4.3 as narrowed there).
    """
    pattern = pattern.rstrip(".").lower()
    host = host.rstrip(".").lower()
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        rest = pattern[2:]
        label, _, host_rest = host.partition(".")
        return bool(label) and "*" not in rest and rest.count(".") >= 1 and host_rest == rest
    return "*" not in pattern and pattern == host


def _signed_by(cert: x509.Certificate, key: Any) -> bool:
    """Whether C{key} (a public key) made C{cert}'s signature."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pss = cert.signature_algorithm_parameters
            pad = pss if isinstance(pss, padding.PSS) else padding.PKCS1v15()
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad, cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        elif isinstance(key, dsa.DSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, cert.signature_hash_algorithm)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, AssertionError):
        return False
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, anchor: bool = False) -> bool:
    """
    Whether C{issuer} issued C{cert} (names and signature), and may: a CA by
    its basic constraints, unless it is the trust anchor (trusted by DNS).
    """
    if cert.issuer != issuer.subject:
        return False
    if not anchor:
        try:
            if not issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return False
        except x509.ExtensionNotFound:
            return False
    return _signed_by(cert, issuer.public_key())


def _within_validity(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _match_ta(
    record: TLSARecord, certs: list[x509.Certificate], names: Sequence[str], now: datetime.datetime,
) -> tuple[str, str] | None:
    """
    Check a DANE-TA record against the chain: C{None} if it is satisfied,
    else C{(why not, RFC 8460 result type)}.
    """
    host = names[0]
    anchors = {i for i, c in enumerate(certs) if _matches(record, c)}
    bare_key: Any = None
    if record.selector == SELECTOR_SPKI and record.mtype == MATCH_FULL:
        try:
            bare_key = serialization.load_der_public_key(record.data)
        except (ValueError, TypeError):  # not a key we can use
            bare_key = None
    if not anchors and bare_key is None:
        return f"TLSA {record.params} did not match a certificate of the chain of {host}", "validation-failure"
    # Walk up from the leaf through the presented certificates.
    path = [0]
    while True:
        current = certs[path[-1]]
        if path[-1] in anchors:
            break
        if bare_key is not None and _signed_by(current, bare_key):
            break
        if len(path) > _MAX_CHAIN:
            return f"TLSA {record.params}: the chain of {host} is longer than {_MAX_CHAIN}", "certificate-not-trusted"
        issuer = next(
            (i for i, c in enumerate(certs) if i not in path and _issued_by(current, c, anchor=i in anchors)), None,
        )
        if issuer is None:
            why = (f"TLSA {record.params} matched, but the certificate of {host}"
                   f" does not chain to it ({_describe(current)} has no issuer in the chain)")
            return why, "certificate-not-trusted"
        path.append(issuer)
    # The trust anchor is trusted by DNS; the certificates below it must be in date.
    below = path[:-1] if path[-1] in anchors else path
    for i in below:
        if not _within_validity(certs[i], now):
            why = (f"TLSA {record.params} matched, but {_describe(certs[i])} in the chain of {host}"
                   f" is not valid at {now:%Y-%m-%d %H:%M:%S} UTC")
            return why, "certificate-expired"
    presented = certificate_names(certs[0])
    if not any(name_matches(p, n) for p in presented for n in names):
        why = (f"TLSA {record.params} matched, but the certificate of {host} does not name"
               f" {' or '.join(names)} (it names {', '.join(presented) or 'nothing'})")
        return why, "certificate-host-mismatch"
    return None


def match_chain(
    records: Iterable[TLSARecord],
    der_chain: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> MatchResult:
    """
    Whether a server's certificate chain satisfies its TLSA records (RFC
    7672 section 3). Pure: no I/O.

    @param records: the host's TLSA records; unusable ones are ignored.
    @param der_chain: the presented chain, DER, leaf first (as
        L{peer_chain} gives it).
    @param names: the reference identifiers for DANE-TA name checks, the MX
        host name first (the first also names the host in reasons).
    @param now: the time for DANE-TA validity checks (default: now, UTC).
    @return: C{ok} if a usable record matched. With no usable record at
        all, C{ok} too: TLS without authentication (RFC 7672 section 2.2).
    """
    names = [n.rstrip(".").lower() for n in names if n]
    host = names[0] if names else "the server"
    usable = [r for r in records if r.usable]
    if not usable:
        return MatchResult(True, f"all TLSA records of {host} are unusable: TLS without authentication")
    if not der_chain:
        return MatchResult.failed(f"{host} presented no certificate")
    try:
        certs = [x509.load_der_x509_certificate(bytes(d)) for d in der_chain]
    except ValueError as e:
        return MatchResult.failed(f"the certificate chain of {host} does not parse: {e}")
    when = now if now is not None else datetime.datetime.now(datetime.UTC)
    failures: list[tuple[str, str]] = []
    for record in usable:
        if record.usage == DANE_EE:
            if _matches(record, certs[0]):
                return MatchResult(True, f"TLSA {record.params} matched the certificate of {host}", record)
            failures.append((f"TLSA {record.params} did not match the certificate of {host}", "validation-failure"))
        else:
            why = _match_ta(record, certs, names or [host], when)
            if why is None:
                return MatchResult(True, f"TLSA {record.params} matched the trust anchor of {host}", record)
            failures.append(why)
    types = {t for _, t in failures}
    result_type = types.pop() if len(types) == 1 else "validation-failure"
    if len(failures) == 1:
        return MatchResult.failed(failures[0][0], result_type)
    return MatchResult.failed(
        f"no TLSA record matched for {host}: " + "; ".join(r for r, _ in failures), result_type)


# -- what the delivery code is told -----------------------------------------

NO_DANE: Final = "none"
"""No DANE for this host: the route's own TLS policy (and MTA-STS) applies."""
TLS_UNAUTHENTICATED: Final = "tls-unauthenticated"
"""TLS required, any certificate: the host's TLSA records are all unusable."""
MATCH: Final = "match"
"""TLS required, and the certificate chain must match the host's TLSA records."""
DEFER: Final = "defer"
"""Do not connect: a lookup failed (bogus or no answer); the delivery to this host defers, 4.7.5."""


@frozen
class DaneRequirement:
    """
    What DANE asks of one connection to an exchanger.

    @ivar kind: L{NO_DANE} (the route's own TLS policy applies),
        L{TLS_UNAUTHENTICATED} (STARTTLS or defer, certificate not checked:
        every TLSA record was unusable), L{MATCH} (STARTTLS or defer, and
        L{verify_chain} must accept the chain) or L{DEFER} (do not connect:
        defer with C{dsn} and C{reason}).
    @ivar host: the exchanger's host name.
    @ivar port: the port the TLSA records are for.
    @ivar records: the usable TLSA records (for L{MATCH}).
    @ivar names: the reference identifiers for DANE-TA (the host first).
    @ivar reason: one line for logs, events and DSNs.
    @ivar dsn: C{"4.7.5"} for L{DEFER}, else C{""}.
    """

    kind: str
    host: str
    port: int
    records: tuple[TLSARecord, ...] = ()
    names: tuple[str, ...] = ()
    reason: str = ""
    dsn: str = ""

    @property
    def tls_required(self) -> bool:
        """STARTTLS must succeed, else the delivery defers (4.7.5), never clear text."""
        return self.kind in (TLS_UNAUTHENTICATED, MATCH)

    @property
    def authenticated(self) -> bool:
        """The chain must be checked with L{verify_chain} after the handshake."""
        return self.kind == MATCH

    @property
    def deferred(self) -> bool:
        """Do not connect: the delivery to this host defers."""
        return self.kind == DEFER


def tlsa_name(host: str, port: int = 25) -> str:
    """The TLSA owner name for SMTP to C{host}: C{_25._tcp.mx.example} (RFC 7672 section 2.2.3)."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


def verify_chain(
    requirement: DaneRequirement,
    der_chain: Sequence[bytes],
    mx_host: str | None = None,
    now: datetime.datetime | None = None,
) -> MatchResult:
    """
    Check the chain a server presented against its requirement, after the
    TLS handshake (pure).

    @param der_chain: DER certificates, leaf first (L{peer_chain}).
    @param mx_host: the host name to check and name in reasons instead of
        C{requirement.host} (the other C{requirement.names}, CNAME targets,
        still count); by default C{requirement.names}.
    @return: C{ok} for L{NO_DANE} and L{TLS_UNAUTHENTICATED}; not C{ok} for
        L{DEFER}; for L{MATCH}, what L{match_chain} says.
    """
    if requirement.kind == NO_DANE:
        return MatchResult(True, requirement.reason or f"no DANE for {requirement.host}")
    if requirement.kind == TLS_UNAUTHENTICATED:
        return MatchResult(True, requirement.reason or f"TLS without authentication for {requirement.host}")
    if requirement.kind == DEFER:
        return MatchResult.failed(requirement.reason, "dnssec-invalid")
    if not any(r.usable for r in requirement.records):
        # Fail closed: a MATCH requirement without a usable record is a
        # caller's mistake, not "all unusable" (that is TLS_UNAUTHENTICATED).
        return MatchResult.failed(f"no usable TLSA record to check the certificate of {requirement.host}")
    names: tuple[str, ...] = requirement.names or (requirement.host,)
    if mx_host is not None:
        host = mx_host.rstrip(".").lower()
        names = (host,) + tuple(n for n in names if n not in (host, requirement.host))
    return match_chain(requirement.records, der_chain, names, now)


def peer_chain(connection: Any) -> list[bytes]:
    """
    The certificate chain a pyOpenSSL C{SSL.Connection} received (after its
    handshake), DER, leaf first; empty if there is none.

    With Twisted's TLS, C{connection} is C{transport.getHandle()} once the
    handshake is done.
    """
    chain = connection.get_peer_cert_chain(as_cryptography=True)
    if not chain:
        return []
    return [c.public_bytes(serialization.Encoding.DER) for c in chain]


class DaneVerificationError(Exception):
    """
    The certificate chain of a server did not satisfy its TLSA records; the
    TLS handshake was aborted.

    @ivar result: the L{MatchResult} (C{reason}, C{dsn} 4.7.5).
    """

    def __init__(self, result: MatchResult) -> None:
        super().__init__(result.reason)
        self.result = result


@implementer(IOpenSSLClientConnectionCreator)
class DaneClientTLS:
    """
    Client TLS options for one connection under a L{DaneRequirement} that
    requires TLS: for C{transport.startTLS(...)} after STARTTLS, or
    L{twisted.internet.endpoints.wrapClientTLS}.

    No PKIX validation (DANE replaces it; RFC 7672 section 3.1.3); SNI names
    the host, as RFC 7672 asks of DANE clients; TLS 1.2 at least. For L{MATCH}, the
    chain is checked by L{verify_chain} from OpenSSL's verification callback,
    so that a mismatch aborts the handshake before the client's Finished
    message, hence before any SMTP command is sent under TLS: the
    connection is lost with a L{DaneVerificationError} (as Twisted's own
    host name check fails a connection). For L{TLS_UNAUTHENTICATED}, any
    certificate is accepted.

    @ivar result: the L{MatchResult} of the last handshake (C{None} before;
        for L{TLS_UNAUTHENTICATED}, set when the handshake ends) for events.
    """

    def __init__(
        self,
        requirement: DaneRequirement,
        *,
        now: Callable[[], datetime.datetime] | None = None,
        options: ssl.CertificateOptions | None = None,
    ) -> None:
        """
        @param requirement: L{MATCH} or L{TLS_UNAUTHENTICATED}.
        @param now: the time for DANE-TA validity checks (default: the wall clock, UTC).
        @param options: the options to start from (default: no verification, TLS 1.2 at least).
        @raise ValueError: the requirement does not call for TLS.
        """
        if not requirement.tls_required:
            raise ValueError(f"DANE requirement {requirement.kind!r} does not call for TLS")
        self.requirement = requirement
        self._now = now
        self._options = options or ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self.result: MatchResult | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """The pyOpenSSL connection for C{tlsProtocol}, with SNI and the DANE check."""
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        try:
            connection.set_tlsext_host_name(self.requirement.host.encode("idna"))
        except UnicodeError:
            pass  # not a name SNI can carry; the check below does not depend on it
        if self.requirement.authenticated:
            checked: list[MatchResult] = []
            connection.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_callback(tlsProtocol, checked),
            )
            connection.set_info_callback(self._done_callback(tlsProtocol, checked))
        else:
            connection.set_verify(SSL.VERIFY_NONE)
            self.result = verify_chain(self.requirement, [])
        return connection

    def _judge(self, tlsProtocol: TLSMemoryBIOProtocol, chain: list[bytes], checked: list[MatchResult]) -> None:
        when = self._now() if self._now is not None else None
        result = verify_chain(self.requirement, chain, now=when)
        checked.append(result)
        self.result = result
        if not result.ok:
            tlsProtocol.failVerification(Failure(DaneVerificationError(result)))

    def _verify_callback(
        self, tlsProtocol: TLSMemoryBIOProtocol, checked: list[MatchResult],
    ) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
        def callback(connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            # OpenSSL's own verdict (no trust anchors here) is ignored. The
            # whole chain the server sent is known at the first call (OpenSSL
            # 3 keeps it in the session while verifying): it is judged then,
            # once, and the answer repeated for every certificate.
            if not checked:
                self._judge(tlsProtocol, peer_chain(connection), checked)
            return checked[0].ok

        return callback

    def _done_callback(
        self, tlsProtocol: TLSMemoryBIOProtocol, checked: list[MatchResult],
    ) -> Callable[[SSL.Connection, int, int], None]:
        def callback(connection: SSL.Connection, where: int, ret: int) -> None:
            # A guard: a handshake that ends with no chain judged (a resumed
            # session sends no certificate) is judged now, and fails closed
            # if there is nothing to judge. Twisted drops what the
            # application writes after the abort.
            if where & SSL.SSL_CB_HANDSHAKE_DONE and not checked:
                self._judge(tlsProtocol, peer_chain(connection), checked)

        return callback


# -- asking the validating resolver ------------------------------------------


class DNSSECLookupError(Exception):
    """
    A lookup through the validating resolver failed: SERVFAIL (what a
    validating resolver answers for bogus data), another error code, a
    timeout, or an answer that does not belong to the question.
    """


@frozen
class SecureAnswer:
    """
    An answer of the validating resolver.

    @ivar name: the name asked for (lower case, no trailing dot).
    @ivar qtype: the type asked for.
    @ivar secure: the AD bit was set: the resolver validated every record.
    @ivar rcode: C{dns.OK} or C{dns.ENAME} (NXDOMAIN).
    @ivar payloads: the records of C{qtype} in the answer (of the end of a
        CNAME chain, if there was one).
    @ivar canonical: the end of the CNAME chain (C{name} if none).
    @ivar ttl: seconds the answer may be kept.
    """

    name: str
    qtype: int
    secure: bool
    rcode: int
    payloads: tuple[Any, ...] = ()
    canonical: str = ""
    ttl: float = 0.0

    @property
    def exists(self) -> bool:
        """Whether there were records (not NXDOMAIN, not NODATA)."""
        return bool(self.payloads)


class _ADQuerier(dns.DNSDatagramProtocol):
    """A DNS client protocol whose queries ask for DNSSEC status: AD set, EDNS0 with DO."""

    def __init__(self, reactor: Any, dnssec_ok: bool, payload: int) -> None:
        # Stray datagrams (not an answer to a question asked) go to the controller, which drops them.
        super().__init__(_StreamController(), reactor=reactor)  # type: ignore[no-untyped-call]
        self._opt = _opt_record(dnssec_ok, payload)

    def writeMessage(self, message: dns.Message, address: tuple[str, int]) -> None:
        _mark(message, self._opt)
        super().writeMessage(message, address)


class _ADStreamQuerier(dns.DNSProtocol):
    """The same over TCP, one connection per question."""

    def __init__(self, controller: _StreamController, reactor: Any, dnssec_ok: bool, payload: int) -> None:
        super().__init__(controller, reactor=reactor)  # type: ignore[no-untyped-call]
        self._opt = _opt_record(dnssec_ok, payload)

    def writeMessage(self, message: dns.Message) -> None:
        _mark(message, self._opt)
        super().writeMessage(message)  # type: ignore[no-untyped-call]


class _StreamController:
    """What the DNS protocols report to: the end of a TCP connection; stray messages are dropped."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self, protocol: object) -> None:
        pass

    def connectionLost(self, protocol: object) -> None:
        self.lost.callback(None)

    def messageReceived(self, message: object, protocol: object, address: object = None) -> None:
        pass


def _opt_record(dnssec_ok: bool, payload: int) -> dns.RRHeader:
    # The OPT pseudo-record (RFC 6891 section 6.1.2): the class is the UDP
    # payload size, the TTL holds the DO bit (RFC 3225).
    return dns.RRHeader(name=b"", type=dns.OPT, cls=payload, ttl=0x8000 if dnssec_ok else 0,
                        payload=dns.UnknownRecord(b""))


def _mark(message: dns.Message, opt: dns.RRHeader) -> None:
    message.recDes = 1
    message.authenticData = 1
    message.additional = [opt]


_RCODE_NAMES: Final = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def _rcode_name(rcode: int) -> str:
    return _RCODE_NAMES.get(rcode, f"rcode {rcode}")


@frozen
class _Cached:
    expires: float
    answer: SecureAnswer


class ValidatingResolver:
    """
    Questions to one DNSSEC-validating resolver, read by its AD bit, with a
    TTL cache of the answers (failures are not kept).

    @param reactor: an L{IReactorUDP}, L{IReactorTCP} and L{IReactorTime}.
    @param server: C{(address, port)} of the resolver: a literal IP
        address, normally loopback (the AD bit is only worth the path to the
        resolver: RFC 4035 section 4.9.3).
    @param timeout: seconds to wait for each UDP try.
    @param dnssec_ok: set the EDNS0 DO bit too (not only AD in the query).
    @param payload: the UDP payload size announced with EDNS0.
    @param max_cached: the most answers kept (then expired ones are
        dropped, or all if none has expired).
    """

    def __init__(
        self,
        reactor: Any,
        server: tuple[str, int],
        timeout: Sequence[float] = DNS_TIMEOUT,
        dnssec_ok: bool = True,
        payload: int = EDNS_PAYLOAD,
        max_cached: int = MAX_CACHED,
    ) -> None:
        host, port = server
        ipaddress.ip_address(host)  # ValueError if it is not a literal address
        self.reactor = reactor
        self.server = (host, int(port))
        self.timeout = tuple(timeout)
        self.dnssec_ok = dnssec_ok
        self.payload = payload
        self._v6 = ":" in host
        self.max_cached = max_cached
        self._cache: dict[tuple[str, int], _Cached] = {}

    def __repr__(self) -> str:
        return f"<ValidatingResolver {self.server[0]}:{self.server[1]}>"

    def _now(self) -> float:
        return float(IReactorTime(self.reactor).seconds())

    def query(self, name: str, qtype: int) -> Deferred[SecureAnswer]:
        """
        Ask for C{qtype} records at C{name}.

        @return: a L{Deferred} firing with a L{SecureAnswer} (NOERROR or
            NXDOMAIN), or failing with L{DNSSECLookupError}.
        """
        name = name.rstrip(".").lower()
        hit = self._cache.get((name, qtype))
        if hit is not None and hit.expires > self._now():
            return succeed(hit.answer)
        return Deferred.fromCoroutine(self._ask(name, qtype))

    async def _ask(self, name: str, qtype: int) -> SecureAnswer:
        question = dns.Query(name, qtype, dns.IN)
        message = await self._udp(question)
        if message.trunc:
            message = await self._tcp(question)
        answer = self._read(name, qtype, message)
        if answer.ttl > 0:
            now = self._now()
            if len(self._cache) >= self.max_cached:
                self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
                if len(self._cache) >= self.max_cached:
                    self._cache.clear()
            self._cache[(name, qtype)] = _Cached(now + answer.ttl, answer)
        return answer

    async def _udp(self, question: dns.Query) -> dns.Message:
        protocol = _ADQuerier(self.reactor, self.dnssec_ok, self.payload)
        try:
            port = IReactorUDP(self.reactor).listenUDP(
                0, protocol, interface="::" if self._v6 else "", maxPacketSize=65535,
            )
        except CannotListenError as e:
            raise DNSSECLookupError(f"cannot open a UDP socket to ask the resolver: {e}") from None
        try:
            for seconds in self.timeout:
                try:
                    message: dns.Message = await protocol.query(self.server, [question], seconds)
                    return message
                except error.DNSQueryTimeoutError:
                    continue
                except OSError as e:  # sendto failed: no route, no such interface
                    raise DNSSECLookupError(
                        f"cannot ask the resolver {self.server[0]}:{self.server[1]}: {e}") from None
        finally:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        raise DNSSECLookupError(
            f"no answer from the resolver {self.server[0]}:{self.server[1]}"
            f" for {question.name} type {dns.QUERY_TYPES.get(question.type, question.type)}"
            f" within {sum(self.timeout):g}s"
        )

    async def _tcp(self, question: dns.Query) -> dns.Message:
        host, port = self.server
        endpoint_type = TCP6ClientEndpoint if self._v6 else TCP4ClientEndpoint
        reactor = IReactorTCP(self.reactor)
        endpoint = endpoint_type(reactor, host, port, timeout=max(1, int(sum(self.timeout))))
        controller = _StreamController()
        protocol = _ADStreamQuerier(controller, self.reactor, self.dnssec_ok, self.payload)
        try:
            await connectProtocol(endpoint, protocol)
        except (ConnectError, OSError) as e:
            raise DNSSECLookupError(f"cannot reach the resolver {host}:{port} over TCP: {e}") from None
        try:
            message: dns.Message = await protocol.query([question], sum(self.timeout))
            return message
        except error.DNSQueryTimeoutError:
            raise DNSSECLookupError(
                f"no answer over TCP from the resolver {host}:{port} for {question.name}"
                f" within {sum(self.timeout):g}s"
            ) from None
        finally:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
                await controller.lost

    def _read(self, name: str, qtype: int, message: dns.Message) -> SecureAnswer:
        asked = [(str(q.name).rstrip(".").lower(), q.type) for q in message.queries]
        if asked != [(name, qtype)]:
            raise DNSSECLookupError(f"the resolver answered another question ({asked}) than {name}")
        if message.rCode not in (dns.OK, dns.ENAME):
            why = " (bogus DNSSEC data or an unreachable server)" if message.rCode == dns.ESERVER else ""
            raise DNSSECLookupError(
                f"{_rcode_name(message.rCode)} from the resolver for {name}"
                f" type {dns.QUERY_TYPES.get(qtype, qtype)}{why}"
            )
        canonical = name
        for _ in range(len(message.answers)):
            step = next((a for a in message.answers
                         if a.type == dns.CNAME and str(a.name).rstrip(".").lower() == canonical), None)
            if step is None:
                break
            target: Any = step.payload
            canonical = str(target.name).rstrip(".").lower()
        records = [a for a in message.answers if a.type == qtype]
        if records:
            ttl = float(min(a.ttl for a in records))
        else:
            # RFC 2308 section 5: the SOA's minimum and TTL bound a negative answer.
            ttl = min([NEGATIVE_TTL] + [
                float(min(a.ttl, getattr(a.payload, "minimum", 0))) for a in message.authority if a.type == dns.SOA
            ])
        return SecureAnswer(
            name=name, qtype=qtype, secure=bool(message.authenticData),
            rcode=message.rCode, payloads=tuple(a.payload for a in records),
            canonical=canonical, ttl=min(ttl, MAX_TTL),
        )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _rdata(payload: Any) -> bytes:
    """The wire-format RDATA of a record (Twisted parses TLSA as an C{UnknownRecord}; any record can encode itself)."""
    out = BytesIO()
    payload.encode(out)
    return out.getvalue()


def parse_resolver(text: str, default_port: int = 53) -> tuple[str, int]:
    """
    Parse a resolver's address: C{"127.0.0.1"}, C{"127.0.0.1:5353"},
    C{"::1"} or C{"[::1]:5353"}.

    @raise ValueError: it is not a literal IP address (with a port).
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not an address: {text!r}")
        port = int(rest[1:]) if rest else default_port
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host, port = text, default_port
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"not a port: {port}")
    return host, port


# -- per exchanger ------------------------------------------------------------


class DANE:
    """
    DANE decisions for MX delivery, through one validating resolver.

    Before connecting to an exchanger, the delivery code asks
    L{requirement_for}; after the TLS handshake it calls L{verify_chain}
    with the presented chain (L{peer_chain}).

    @param resolver: the L{ValidatingResolver}.
    """

    def __init__(self, resolver: ValidatingResolver) -> None:
        self.resolver = resolver

    @classmethod
    def for_address(
        cls, reactor: Any, address: str, timeout: Sequence[float] = DNS_TIMEOUT,
    ) -> DANE:
        """
        DANE through the resolver at C{address} (C{"127.0.0.1"},
        C{"127.0.0.1:5353"}, C{"[::1]:53"}).

        @raise ValueError: C{address} is not a literal address.
        """
        return cls(ValidatingResolver(reactor, parse_resolver(address), timeout))

    def mx_secure(self, domain: str) -> Deferred[bool]:
        """
        Whether the MX RRset of C{domain} (or its secure absence, when the
        domain is its own implicit MX) was validated (RFC 7672 section
        2.2.1): DANE applies to its exchangers only then.

        @return: a L{Deferred} firing with C{True} or C{False}, or failing
            with L{DNSSECLookupError}.
        """
        return Deferred.fromCoroutine(self._secure(domain, dns.MX))

    def address_secure(self, host: str) -> Deferred[bool]:
        """
        Whether the address records of C{host} were validated (RFC 7672
        section 2.2): of the A and AAAA lookups that answered, each was
        secure; C{False} when some was insecure.

        @return: a L{Deferred} firing with C{True} or C{False}, or failing
            with L{DNSSECLookupError} when both lookups failed.
        """
        return Deferred.fromCoroutine(self._addresses(host))

    async def _secure(self, name: str, qtype: int) -> bool:
        answer = await self.resolver.query(name, qtype)
        return answer.secure

    async def _addresses(self, host: str) -> bool:
        secure, _ = await self._address_answers(host)
        return secure

    async def _address_answers(self, host: str) -> tuple[bool, tuple[str, ...]]:
        """C{(secure, canonical names)} of the host's A and AAAA answers."""
        answers: list[SecureAnswer] = []
        failures: list[DNSSECLookupError] = []
        asked = [self.resolver.query(host, qtype) for qtype in (dns.A, dns.AAAA)]  # both at once
        for d in asked:
            try:
                answers.append(await d)
            except DNSSECLookupError as e:
                failures.append(e)
        if not answers:
            raise failures[0]
        secure = all(a.secure for a in answers)
        canonical = tuple(dict.fromkeys(a.canonical for a in answers if a.exists and a.canonical))
        return secure, canonical

    def requirement_for(self, mx_host: str, port: int = 25, *, mx_secure: bool = True) -> Deferred[DaneRequirement]:
        """
        What DANE asks of a connection to C{mx_host} on C{port} (never fails).

        @param mx_secure: the MX RRset that named C{mx_host} was secure
            (L{mx_secure}); pass C{True} too for a configured next hop whose
            name the configuration gives.
        @return: a L{Deferred} firing with a L{DaneRequirement}: L{NO_DANE}
            when the MX RRset, the host's addresses or its TLSA RRset were
            insecure, or there is no TLSA record (secure NXDOMAIN or
            NODATA); L{DEFER} when a lookup failed; else L{MATCH} or
            L{TLS_UNAUTHENTICATED}.
        """
        return Deferred.fromCoroutine(self._requirement(mx_host.rstrip(".").lower(), int(port), mx_secure))

    async def _requirement(self, host: str, port: int, mx_secure: bool) -> DaneRequirement:
        try:
            return await self._decide(host, port, mx_secure)
        except Exception as e:  # noqa: BLE001 -- fail closed: an unforeseen error defers, it never skips DANE
            return DaneRequirement(DEFER, host, port, reason=f"DANE check for {host} failed: {e!r}", dsn=DSN)

    async def _decide(self, host: str, port: int, mx_secure: bool) -> DaneRequirement:
        name = tlsa_name(host, port)
        if _is_address(host):
            return DaneRequirement(NO_DANE, host, port, reason=f"no DANE for {host}: an address, not a host name")
        if not mx_secure:
            return DaneRequirement(NO_DANE, host, port, reason=f"no DANE for {host}: the MX lookup was not DNSSEC-secure")
        try:
            addresses_secure, canonical = await self._address_answers(host)
        except DNSSECLookupError as e:
            return DaneRequirement(DEFER, host, port, reason=f"address lookup for {host} failed: {e}", dsn=DSN)
        if not addresses_secure:
            return DaneRequirement(
                NO_DANE, host, port, reason=f"no DANE for {host}: its address records are not DNSSEC-secure",
            )
        try:
            answer = await self.resolver.query(name, TLSA)
        except DNSSECLookupError as e:
            return DaneRequirement(DEFER, host, port, reason=f"TLSA lookup for {name} failed: {e}", dsn=DSN)
        if not answer.secure:
            return DaneRequirement(NO_DANE, host, port, reason=f"no DANE for {host}: the TLSA lookup for {name} was not DNSSEC-secure")
        if not answer.exists:
            return DaneRequirement(NO_DANE, host, port, reason=f"no DANE for {host}: no TLSA record at {name}")
        records = []
        for payload in answer.payloads:
            try:
                records.append(TLSARecord.from_rdata(_rdata(payload)))
            except ValueError:
                continue  # malformed: unusable
        usable = tuple(r for r in records if r.usable)
        names = tuple(dict.fromkeys((host,) + canonical))
        if not usable:
            return DaneRequirement(
                TLS_UNAUTHENTICATED, host, port, names=names,
                reason=f"TLSA records at {name} are all unusable: TLS required, without authentication",
            )
        return DaneRequirement(
            MATCH, host, port, records=usable, names=names,
            reason=f"DANE for {host}: {len(usable)} usable TLSA record(s) at {name}",
        )

    @staticmethod
    def verify_chain(
        requirement: DaneRequirement, der_chain: Sequence[bytes], mx_host: str | None = None,
        now: datetime.datetime | None = None,
    ) -> MatchResult:
        """L{verify_chain} (module function), here for convenience."""
        return verify_chain(requirement, der_chain, mx_host, now)


__all__ = [
    "DANE",
    "DANE_EE",
    "DANE_TA",
    "DEFER",
    "DSN",
    "MATCH",
    "NO_DANE",
    "PKIX_EE",
    "PKIX_TA",
    "TLSA",
    "TLS_UNAUTHENTICATED",
    "DNSSECLookupError",
    "DaneClientTLS",
    "DaneRequirement",
    "DaneVerificationError",
    "MatchResult",
    "SecureAnswer",
    "TLSARecord",
    "ValidatingResolver",
    "certificate_names",
    "match_chain",
    "name_matches",
    "parse_resolver",
    "peer_chain",
    "tlsa_name",
    "verify_chain",
]
