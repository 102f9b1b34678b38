"""
DANE for SMTP (RFC 7672; C{relaynet/delivery/dane.py}).

Four tiers:
 - matching (L{match_chain}, L{verify_chain}), pure: certificates made here
   with C{cryptography}, no reactor;
 - the certificate chain read from a real pyOpenSSL handshake over memory
   BIOs (L{peer_chain}), as the delivery code will read it;
 - L{DaneClientTLS} in real TLS handshakes on loopback;
 - lookups against a real validating resolver on loopback (marked slow:
   real peers): zones signed here with C{ldns-signzone}
   (L{harness.dnssec.sign_zone}), served by NSD (L{harness.dns.NSDServer})
   and validated by a private Unbound (L{harness.dnssec.UnboundServer}) that
   trusts their DS records.

The Twisted side runs on private reactors, iterated until each Deferred
fires (bounded), never the global one.

The zones: C{dane.test} (signed, trusted), C{plain.test} (unsigned: insecure),
C{expired.test} (signed with signatures that expired in 2020: bogus, Unbound
answers SERVFAIL), C{wrongkey.test} (validly signed, but Unbound trusts
another key: bogus) and C{_tcp.mxb.dane.test} (a signed child of
C{dane.test} with expired signatures: the exchanger's address is secure but
its TLSA RRset is bogus).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.names import dns
from twisted.python.failure import Failure
from zope.interface import implementer

from harness.dns import NSDServer, free_dns_port, zone_text
from harness.dnssec import UnboundServer, query, sign_zone, unavailable_reason
from relaynet.delivery import dane
from relaynet.delivery.dane import (
    DANE,
    DEFER,
    MATCH,
    NO_DANE,
    TLS_UNAUTHENTICATED,
    DaneClientTLS,
    DaneRequirement,
    DaneVerificationError,
    DNSSECLookupError,
    TLSARecord,
    ValidatingResolver,
    match_chain,
    name_matches,
    parse_resolver,
    peer_chain,
    tlsa_name,
    verify_chain,
)

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)

#: Bound on each wait for a Deferred of the resolver tests.
TIMEOUT = 15.0


# -- certificates ------------------------------------------------------------


@define
class Issued:
    """A certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, issuer: Issued | None = None, not_before: datetime.datetime = NOW - 300 * DAY,
            not_after: datetime.datetime = NOW + 300 * DAY) -> Issued:
    """A CA certificate: self-signed, or issued by C{issuer} (an intermediate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(names: list[str], issuer: Issued | None = None, cn: str | None = None,
              not_before: datetime.datetime = NOW - 30 * DAY,
              not_after: datetime.datetime = NOW + 30 * DAY) -> Issued:
    """A server certificate for C{names} (DNS subjectAltNames; none if empty), issued by C{issuer} or self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(cn or (names[0] if names else "no-san"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def spki(c: Issued) -> bytes:
    return c.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    """One CA with an intermediate, leaves for mx.example.test, and strangers."""
    root = make_ca("Test Root")
    inter = make_ca("Test Intermediate", issuer=root)
    other_ca = make_ca("Other CA")
    return {
        "root": root,
        "inter": inter,
        "other_ca": other_ca,
        "leaf": make_leaf(["mx.example.test"], issuer=root),
        "deep": make_leaf(["mx.example.test"], issuer=inter),
        "wild": make_leaf(["*.example.test"], issuer=root),
        "wrong_name": make_leaf(["elsewhere.test"], issuer=root),
        "cn_only": make_leaf([], issuer=root, cn="mx.example.test"),
        "expired": make_leaf(["mx.example.test"], issuer=root, not_before=NOW - 90 * DAY, not_after=NOW - DAY),
        "foreign": make_leaf(["mx.example.test"], issuer=other_ca),
        "self": make_leaf(["mx.example.test"]),
        "stranger": make_leaf(["mx.example.test"]),
    }


HOST = "mx.example.test"


def check(records: list[TLSARecord], chain: list[Issued], names: list[str] | None = None) -> dane.MatchResult:
    return match_chain(records, [c.der for c in chain], names or [HOST], now=NOW)


# -- TLSA records ---------------------------------------------------------------


def test_record_text_and_wire_forms() -> None:
    """A record parses from presentation and wire format and writes both back."""
    r = TLSARecord.from_text("3 1 1 " + "AB" * 16 + " " + "cd" * 16)
    assert (r.usage, r.selector, r.mtype) == (3, 1, 1)
    assert r.data == bytes.fromhex("ab" * 16 + "cd" * 16)
    assert TLSARecord.from_rdata(r.to_rdata()) == r
    assert TLSARecord.from_text(r.to_text()) == r
    assert r.params == "3 1 1"
    for bad in ("3 1 1", "3 1 x ab", "300 1 1 ab", "3 1 1 zz"):
        with pytest.raises(ValueError):
            TLSARecord.from_text(bad)
    with pytest.raises(ValueError):
        TLSARecord.from_rdata(b"\x03\x01\x01")


@pytest.mark.parametrize("text, usable", [
    ("3 1 1 " + "00" * 32, True),
    ("2 0 2 " + "00" * 64, True),
    ("3 0 0 00", True),
    ("3 1 1 " + "00" * 31, False),  # a SHA-256 digest of the wrong length
    ("3 1 2 " + "00" * 32, False),
    ("0 0 1 " + "00" * 32, False),  # PKIX-TA: unusable for SMTP (RFC 7672 section 3.1.3)
    ("1 1 1 " + "00" * 32, False),  # PKIX-EE
    ("4 1 1 " + "00" * 32, False),  # unknown usage
    ("3 2 1 " + "00" * 32, False),  # unknown selector
    ("3 1 3 " + "00" * 32, False),  # unknown matching type
])
def test_usable_records(text: str, usable: bool) -> None:
    """Only DANE-TA and DANE-EE with known selectors, matching types and digest sizes are usable."""
    assert TLSARecord.from_text(text).usable is usable


def test_tlsa_name_and_resolver_address() -> None:
    """The TLSA owner name is _PORT._tcp.HOST; resolver addresses are literal IPs with an optional port."""
    assert tlsa_name("MX.Example.Test.", 25) == "_25._tcp.mx.example.test"
    assert tlsa_name("mx.example.test", 2525) == "_2525._tcp.mx.example.test"
    assert parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("::1") == ("::1", 53)
    assert parse_resolver("[::1]:5353") == ("::1", 5353)
    for bad in ("localhost", "resolver.example:53", "127.0.0.1:0", "[::1", "1.2.3"):
        with pytest.raises(ValueError):
            parse_resolver(bad)


@pytest.mark.parametrize("pattern, host, ok", [
    ("mx.example.test", "MX.example.test.", True),
    ("*.example.test", "mx.example.test", True),
    ("*.example.test", "a.mx.example.test", False),
    ("*.example.test", "example.test", False),
    ("*.test", "example.test", False),  # no wildcard over a single remaining label
    ("m*.example.test", "mx.example.test", False),
    ("mx.example.test", "mx2.example.test", False),
])
def test_name_matching(pattern: str, host: str, ok: bool) -> None:
    """Certificate names match exactly or by a whole-leftmost-label wildcard (RFC 7672 section 3.2)."""
    assert name_matches(pattern, host) is ok


# -- DANE-EE (3) ------------------------------------------------------------------


@pytest.mark.parametrize("selector, mtype", [(1, 1), (0, 1), (1, 2), (1, 0), (0, 0), (0, 2)])
def test_dane_ee_matches(pki: dict[str, Issued], selector: int, mtype: int) -> None:
    """3 S M: the leaf's certificate or public key, exact or by SHA-256/SHA-512, matches."""
    record = TLSARecord.for_certificate(pki["leaf"].der, 3, selector, mtype)
    result = check([record], [pki["leaf"], pki["root"]])
    assert result.ok, result.reason
    assert result.record == record
    assert result.dsn == ""


def test_dane_ee_selector_one_is_the_public_key(pki: dict[str, Issued]) -> None:
    """3 1 0 is the SubjectPublicKeyInfo in DER; 3 0 0 is the whole certificate."""
    assert TLSARecord.for_certificate(pki["leaf"].der, 3, 1, 0).data == spki(pki["leaf"])
    assert TLSARecord.for_certificate(pki["leaf"].der, 3, 0, 0).data == pki["leaf"].der


@pytest.mark.parametrize("selector, mtype", [(1, 1), (0, 1), (1, 2), (1, 0)])
def test_dane_ee_does_not_match_another_certificate(pki: dict[str, Issued], selector: int, mtype: int) -> None:
    """3 S M of another key fails, and the reason names the record and the host."""
    record = TLSARecord.for_certificate(pki["stranger"].der, 3, selector, mtype)
    result = check([record], [pki["leaf"], pki["root"]])
    assert not result.ok
    assert result.reason == f"TLSA 3 {selector} {mtype} did not match the certificate of {HOST}"
    assert (result.dsn, result.result_type) == ("4.7.5", "validation-failure")


def test_dane_ee_ignores_names_and_dates(pki: dict[str, Issued]) -> None:
    """DANE-EE checks neither the name nor the validity period (RFC 7672 section 3.1.1)."""
    for leaf in ("wrong_name", "expired", "self"):
        result = check([TLSARecord.for_certificate(pki[leaf].der)], [pki[leaf]])
        assert result.ok, (leaf, result.reason)


def test_dane_ee_is_about_the_leaf_only(pki: dict[str, Issued]) -> None:
    """A DANE-EE record of the CA does not match a chain whose leaf is another certificate."""
    result = check([TLSARecord.for_certificate(pki["root"].der, 3, 1, 1)], [pki["leaf"], pki["root"]])
    assert not result.ok


def test_any_usable_record_may_match(pki: dict[str, Issued]) -> None:
    """With several records (a key rollover), one match is enough."""
    records = [TLSARecord.for_certificate(pki["stranger"].der), TLSARecord.for_certificate(pki["leaf"].der)]
    assert check(records, [pki["leaf"]]).ok
    both_wrong = [TLSARecord.for_certificate(pki["stranger"].der),
                  TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)]
    result = check(both_wrong, [pki["foreign"], pki["other_ca"]])
    assert not result.ok
    assert result.reason.startswith(f"no TLSA record matched for {HOST}: TLSA 3 1 1 did not match")
    assert "TLSA 2 0 1 did not match a certificate of the chain" in result.reason


# -- DANE-TA (2) ------------------------------------------------------------------


@pytest.mark.parametrize("selector, mtype", [(0, 1), (1, 1), (0, 2), (1, 2), (0, 0), (1, 0)])
def test_dane_ta_in_the_chain(pki: dict[str, Issued], selector: int, mtype: int) -> None:
    """2 S M of the CA sent in the chain, a leaf it issued naming the MX host: match."""
    record = TLSARecord.for_certificate(pki["root"].der, 2, selector, mtype)
    result = check([record], [pki["leaf"], pki["root"]])
    assert result.ok, result.reason
    assert result.reason == f"TLSA 2 {selector} {mtype} matched the trust anchor of {HOST}"


def test_dane_ta_through_an_intermediate(pki: dict[str, Issued]) -> None:
    """The leaf chains to the trust anchor through an intermediate, sent in any order; the intermediate may be the TA."""
    root_record = TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)
    assert check([root_record], [pki["deep"], pki["inter"], pki["root"]]).ok
    assert check([root_record], [pki["deep"], pki["root"], pki["inter"]]).ok
    inter_record = TLSARecord.for_certificate(pki["inter"].der, 2, 1, 1)
    assert check([inter_record], [pki["deep"], pki["inter"]]).ok
    # Without the intermediate the leaf cannot be chained to the root.
    result = check([root_record], [pki["deep"], pki["root"]])
    assert not result.ok
    assert "does not chain to it" in result.reason


def test_dane_ta_key_not_sent_as_a_certificate(pki: dict[str, Issued]) -> None:
    """2 1 0 carries the TA's key itself: the server need not send the TA certificate."""
    record = TLSARecord(2, 1, 0, spki(pki["root"]))
    assert check([record], [pki["leaf"]]).ok
    assert check([record], [pki["deep"], pki["inter"]]).ok
    assert not check([record], [pki["foreign"]]).ok


def test_dane_ta_wrong_name_fails(pki: dict[str, Issued]) -> None:
    """2 x x: the leaf must name the MX host; the reason says which names it has."""
    for selector, mtype in ((0, 1), (1, 1), (1, 2)):
        record = TLSARecord.for_certificate(pki["root"].der, 2, selector, mtype)
        result = check([record], [pki["wrong_name"], pki["root"]])
        assert not result.ok
        assert result.reason == (
            f"TLSA 2 {selector} {mtype} matched, but the certificate of {HOST} does not name {HOST}"
            " (it names elsewhere.test)"
        )
        assert (result.dsn, result.result_type) == ("4.7.5", "certificate-host-mismatch")


def test_dane_ta_names(pki: dict[str, Issued]) -> None:
    """A wildcard covers the host; the CN counts only without DNS subjectAltNames; any reference identifier may match."""
    record = TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)
    assert check([record], [pki["wild"], pki["root"]]).ok
    assert check([record], [pki["cn_only"], pki["root"]]).ok
    # The host reached through a CNAME: the expanded name is a reference identifier too.
    assert check([record], [pki["wrong_name"], pki["root"]], names=["alias.example.test", "elsewhere.test"]).ok
    assert not check([record], [pki["leaf"], pki["root"]], names=["mx.other.test"]).ok


def test_dane_ta_not_in_the_chain_fails(pki: dict[str, Issued]) -> None:
    """A TA record matching no certificate of the chain fails (its key is not given in full)."""
    record = TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)
    result = check([record], [pki["leaf"]])
    assert not result.ok
    assert result.reason == f"TLSA 2 0 1 did not match a certificate of the chain of {HOST}"


def test_dane_ta_sent_but_not_the_issuer_fails(pki: dict[str, Issued]) -> None:
    """The TA certificate is sent, but the leaf was issued by another CA: no chain, no match."""
    record = TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)
    result = check([record], [pki["foreign"], pki["root"]])
    assert not result.ok
    assert "does not chain to it" in result.reason
    assert result.result_type == "certificate-not-trusted"
    # A forged leaf: the root's name as issuer, another key's signature.
    forged = make_leaf([HOST], issuer=Issued(pki["root"].cert, pki["other_ca"].key))
    assert not check([record], [forged, pki["root"]]).ok


def test_dane_ta_checks_dates_below_the_anchor(pki: dict[str, Issued]) -> None:
    """With DANE-TA an expired leaf fails (RFC 7672 section 3.1.2); the same leaf passes a DANE-EE record."""
    record = TLSARecord.for_certificate(pki["root"].der, 2, 0, 1)
    result = check([record], [pki["expired"], pki["root"]])
    assert not result.ok
    assert "is not valid at 2026-06-01" in result.reason
    assert result.result_type == "certificate-expired"
    assert check([TLSARecord.for_certificate(pki["expired"].der)], [pki["expired"], pki["root"]]).ok


def test_dane_ta_issuer_must_be_a_ca(pki: dict[str, Issued]) -> None:
    """An intermediate must be a CA (basic constraints); the trust anchor itself is trusted by DNS."""
    parent = pki["self"]  # not a CA
    child = make_leaf([HOST], issuer=parent)
    grandchild = make_leaf([HOST], issuer=child)
    assert not check([TLSARecord.for_certificate(parent.der, 2, 0, 1)], [grandchild, child, parent]).ok
    assert check([TLSARecord.for_certificate(parent.der, 2, 0, 1)], [child, parent]).ok


# -- unusable records -------------------------------------------------------------


def test_pkix_usages_are_unusable(pki: dict[str, Issued]) -> None:
    """PKIX-TA/EE records matching the chain are ignored: with a non-matching DANE-EE record, the chain fails."""
    records = [TLSARecord.for_certificate(pki["leaf"].der, 1, 1, 1),
               TLSARecord.for_certificate(pki["root"].der, 0, 0, 1),
               TLSARecord.for_certificate(pki["stranger"].der, 3, 1, 1)]
    result = check(records, [pki["leaf"], pki["root"]])
    assert not result.ok
    assert result.reason == f"TLSA 3 1 1 did not match the certificate of {HOST}"


def test_all_unusable_means_tls_without_authentication(pki: dict[str, Issued]) -> None:
    """Only unusable records: TLS is required but any certificate is accepted (RFC 7672 section 2.2)."""
    records = [TLSARecord.for_certificate(pki["leaf"].der, 1, 1, 1), TLSARecord(3, 1, 1, b"short"),
               TLSARecord(3, 7, 1, b"\0" * 32)]
    result = check(records, [pki["stranger"]])
    assert result.ok
    assert result.reason == f"all TLSA records of {HOST} are unusable: TLS without authentication"


def test_no_certificate_or_garbage_fails(pki: dict[str, Issued]) -> None:
    """An empty chain or one that does not parse fails."""
    record = TLSARecord.for_certificate(pki["leaf"].der)
    assert match_chain([record], [], [HOST]).reason == f"{HOST} presented no certificate"
    garbage = match_chain([record], [b"\x30\x03\x02\x01\x00"], [HOST])
    assert not garbage.ok
    assert "does not parse" in garbage.reason


def test_verify_chain_by_requirement(pki: dict[str, Issued]) -> None:
    """verify_chain: no DANE and all-unusable accept anything, defer refuses, match checks the records."""
    chain = [pki["leaf"].der, pki["root"].der]
    assert verify_chain(DaneRequirement(NO_DANE, HOST, 25), chain).ok
    assert verify_chain(DaneRequirement(TLS_UNAUTHENTICATED, HOST, 25), []).ok
    deferred = verify_chain(DaneRequirement(DEFER, HOST, 25, reason="TLSA lookup failed", dsn="4.7.5"), chain)
    assert (deferred.ok, deferred.reason, deferred.dsn) == (False, "TLSA lookup failed", "4.7.5")
    assert deferred.result_type == "dnssec-invalid"
    ta = DaneRequirement(MATCH, HOST, 25, records=(TLSARecord.for_certificate(pki["root"].der, 2, 0, 1),),
                         names=(HOST,))
    assert verify_chain(ta, chain, now=NOW).ok
    assert not verify_chain(ta, [pki["wrong_name"].der, pki["root"].der], now=NOW).ok
    # mx_host overrides the name checked (and named in reasons).
    assert not verify_chain(ta, chain, mx_host="mx.other.test", now=NOW).ok
    # A MATCH requirement without a usable record fails closed (it is not "all unusable").
    assert not verify_chain(DaneRequirement(MATCH, HOST, 25, records=(TLSARecord(1, 1, 1, b"\0" * 32),)), chain).ok
    assert DaneRequirement(MATCH, HOST, 25).tls_required and DaneRequirement(MATCH, HOST, 25).authenticated
    assert DaneRequirement(TLS_UNAUTHENTICATED, HOST, 25).tls_required
    assert not DaneRequirement(NO_DANE, HOST, 25).tls_required
    assert DaneRequirement(DEFER, HOST, 25).deferred


# -- the chain from a real TLS handshake ------------------------------------------


def _handshake(server_chain: list[Issued]) -> SSL.Connection:
    """A pyOpenSSL client and server over memory BIOs, shaken hands; the client's connection."""
    leaf = server_chain[0]
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate(leaf.cert)
    sctx.use_privatekey(leaf.key)
    for extra in server_chain[1:]:
        sctx.add_extra_chain_cert(extra.cert)
    cctx = SSL.Context(SSL.TLS_METHOD)
    cctx.set_verify(SSL.VERIFY_NONE)  # DANE checks the chain itself, after the handshake
    server, client = SSL.Connection(sctx, None), SSL.Connection(cctx, None)
    server.set_accept_state()
    client.set_connect_state()
    client.set_tlsext_host_name(HOST.encode())
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if client.get_peer_certificate() is not None and server.get_state_string() == b"SSL negotiation finished successfully":
            break
    return client


def test_peer_chain_from_a_handshake(pki: dict[str, Issued]) -> None:
    """peer_chain gives the server's chain as DER, leaf first, ready for verify_chain."""
    client = _handshake([pki["deep"], pki["inter"]])
    chain = peer_chain(client)
    assert chain == [pki["deep"].der, pki["inter"].der]
    requirement = DaneRequirement(MATCH, HOST, 25, records=(TLSARecord.for_certificate(pki["inter"].der, 2, 1, 1),))
    assert verify_chain(requirement, chain, now=NOW).ok
    ee = DaneRequirement(MATCH, HOST, 25, records=(TLSARecord.for_certificate(pki["leaf"].der),))
    assert verify_chain(ee, chain).reason == f"TLSA 3 1 1 did not match the certificate of {HOST}"


def test_peer_chain_without_a_certificate() -> None:
    """No chain (no handshake yet): an empty list, and a DANE match fails."""

    class NoChain:
        def get_peer_cert_chain(self, as_cryptography: bool = False) -> None:
            return None

    assert peer_chain(NoChain()) == []


# -- DANE in a real TLS handshake (loopback, private reactor) ----------------------


@implementer(IHandshakeListener)
class _Client(Protocol):
    """Records whether the TLS handshake completed and why the connection ended."""

    def __init__(self) -> None:
        self.handshake = False
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


def _wait(reactor: Any, d: Deferred[Any], timeout: float = TIMEOUT) -> Any:
    """Iterate C{reactor} until C{d} fires (at most C{timeout} seconds); its result, or raise its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    end = time.monotonic() + timeout
    while not out:
        if time.monotonic() > end:
            raise AssertionError(f"no result within {timeout} s")
        reactor.iterate(0.01)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def tls_server(pki: dict[str, Issued]) -> Iterator[Callable[[list[Issued]], tuple[Any, int]]]:
    """Start a TLS server on loopback presenting a given chain (leaf first); stopped at the end."""
    reactor = EPollReactor()
    ports: list[Any] = []

    def start(chain: list[Issued]) -> tuple[Any, int]:
        options = CertificateOptions(
            privateKey=chain[0].key,  # type: ignore[arg-type]
            certificate=chain[0].cert,  # type: ignore[arg-type]
            extraCertChain=[c.cert for c in chain[1:]],  # type: ignore[misc]
        )
        port = reactor.listenSSL(0, Factory.forProtocol(Protocol), options, interface="127.0.0.1")
        ports.append(port)
        return reactor, port.getHost().port

    yield start
    for port in ports:
        stopped = port.stopListening()
        if stopped is not None:
            _wait(reactor, stopped)


def _connect(reactor: Any, port: int, options: DaneClientTLS) -> _Client:
    client = _Client()
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    _wait(reactor, connectProtocol(endpoint, client))
    _wait(reactor, client.lost)
    return client


def test_tls_handshake_matching_record(pki: dict[str, Issued], tls_server: Any) -> None:
    """DaneClientTLS with a matching 2 1 1 record: the handshake completes; the result names the record."""
    reactor, port = tls_server([pki["deep"], pki["inter"]])
    record = TLSARecord.for_certificate(pki["inter"].der, 2, 1, 1)
    options = DaneClientTLS(DaneRequirement(MATCH, HOST, 25, records=(record,), names=(HOST,)), now=lambda: NOW)
    client = _connect(reactor, port, options)
    assert client.handshake
    assert options.result is not None and options.result.ok and options.result.record == record


def test_tls_handshake_mismatch_is_aborted(pki: dict[str, Issued], tls_server: Any) -> None:
    """A record of another key: the handshake is aborted, the connection lost with DaneVerificationError (4.7.5)."""
    reactor, port = tls_server([pki["leaf"], pki["root"]])
    options = DaneClientTLS(DaneRequirement(
        MATCH, HOST, 25, records=(TLSARecord.for_certificate(pki["stranger"].der),), names=(HOST,)))
    client = _connect(reactor, port, options)
    assert not client.handshake
    assert client.reason is not None
    error = client.reason.value
    assert isinstance(error, DaneVerificationError)
    assert error.result.reason == f"TLSA 3 1 1 did not match the certificate of {HOST}"
    assert error.result.dsn == "4.7.5"
    assert options.result == error.result


def test_handshake_without_a_judged_chain_fails_closed(pki: dict[str, Issued]) -> None:
    """The guard: a handshake that ends before any chain was judged (a resumed session) is judged then, and fails."""

    class FakeTLS:
        failure: Failure | None = None

        def failVerification(self, reason: Failure) -> None:
            self.failure = reason

    class NoChain:
        def get_peer_cert_chain(self, as_cryptography: bool = False) -> None:
            return None

    options = DaneClientTLS(DaneRequirement(MATCH, HOST, 25, records=(TLSARecord.for_certificate(pki["leaf"].der),)))
    tls = FakeTLS()
    done = options._done_callback(tls, [])  # type: ignore[arg-type]
    done(NoChain(), SSL.SSL_CB_HANDSHAKE_DONE, 1)  # type: ignore[arg-type]
    assert tls.failure is not None and tls.failure.check(DaneVerificationError)
    assert options.result == dane.MatchResult.failed(f"{HOST} presented no certificate")


def test_tls_handshake_all_unusable(pki: dict[str, Issued], tls_server: Any) -> None:
    """TLS without authentication: any certificate completes the handshake; no-DANE and defer make no options."""
    reactor, port = tls_server([pki["stranger"]])
    options = DaneClientTLS(DaneRequirement(TLS_UNAUTHENTICATED, HOST, 25))
    assert _connect(reactor, port, options).handshake
    for kind in (NO_DANE, DEFER):
        with pytest.raises(ValueError):
            DaneClientTLS(DaneRequirement(kind, HOST, 25))


# -- a real validating resolver -----------------------------------------------------

_MISSING = unavailable_reason()
requires_dnssec = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


@define
class Lab:
    """NSD serving the zones, Unbound validating them, the certificates the TLSA records name, a private reactor."""

    nsd: NSDServer
    unbound: UnboundServer
    certs: dict[str, Issued]
    reactor: Any = field(factory=EPollReactor)

    def wait(self, d: Deferred[Any], timeout: float = TIMEOUT) -> Any:
        """Iterate the private reactor until C{d} fires (at most C{timeout} seconds); its result, or raise its failure."""
        return _wait(self.reactor, d, timeout)

    def resolver(self, port: int | None = None, timeout: tuple[float, ...] = (2.0, 2.0)) -> ValidatingResolver:
        return ValidatingResolver(self.reactor, ("127.0.0.1", self.unbound.port if port is None else port), timeout)

    def dane(self, port: int | None = None) -> DANE:
        return DANE(self.resolver(port))


def _zones(base: Path, certs: dict[str, Issued], many: list[Issued]) -> tuple[dict[str, str], list[str]]:
    """The zone texts for NSD and the trust anchors (DS lines) for Unbound."""
    ee = TLSARecord.for_certificate(certs["mx"].der).to_text()
    full = [TLSARecord.for_certificate(c.der, 3, 0, 0).to_text() for c in many]
    # The bogus child: signed, its DS in dane.test, its signatures long expired.
    child = sign_zone(base, "_tcp.mxb.dane.test", zone_text("_tcp.mxb.dane.test", [f"_25 TLSA {ee}"]),
                      inception="20200101", expiration="20200201")
    secure = sign_zone(base, "dane.test", zone_text("dane.test", [
        "@ MX 10 mx",
        "mx A 127.0.0.2",
        "mx AAAA ::2",
        f"_25._tcp.mx TLSA {ee}",
        "other A 127.0.0.3",  # no TLSA: NXDOMAIN
        "nodata A 127.0.0.4",
        "_25._tcp.nodata TXT \"not a TLSA record\"",  # the name exists: NODATA
        "bad A 127.0.0.5",
        f"_25._tcp.bad TLSA {TLSARecord.for_certificate(certs['stranger'].der).to_text()}",
        "ta A 127.0.0.6",
        f"_25._tcp.ta TLSA {TLSARecord.for_certificate(certs['ca'].der, 2, 0, 1).to_text()}",
        "alias CNAME ta",
        f"_25._tcp.alias TLSA {TLSARecord.for_certificate(certs['ca'].der, 2, 0, 1).to_text()}",
        "pkix A 127.0.0.7",
        f"_25._tcp.pkix TLSA {TLSARecord.for_certificate(certs['ca'].der, 1, 0, 1).to_text()}",
        "many A 127.0.0.8",
        *[f"_25._tcp.many TLSA {r}" for r in full],
        "mxb A 127.0.0.9",
        "_tcp.mxb NS ns._tcp.mxb",
        "ns._tcp.mxb A 127.0.0.1",
        child.ds,
        f"_2525._tcp.mx TLSA {ee}",
    ]))
    expired = sign_zone(base, "expired.test", zone_text("expired.test", [
        "@ MX 10 mx", "mx A 127.0.0.10", f"_25._tcp.mx TLSA {ee}",
    ]), inception="20200101", expiration="20200201")
    plain = zone_text("plain.test", ["@ MX 10 mx", "mx A 127.0.0.11", f"_25._tcp.mx TLSA {ee}"])
    # Signed with valid signatures, but the resolver trusts another key: bogus too.
    wrongkey_text = zone_text("wrongkey.test", ["@ MX 10 mx", "mx A 127.0.0.12", f"_25._tcp.mx TLSA {ee}"])
    decoy = sign_zone(base / "decoy", "wrongkey.test", wrongkey_text)
    wrongkey = sign_zone(base, "wrongkey.test", wrongkey_text)
    zones = {"dane.test": secure.text, "_tcp.mxb.dane.test": child.text,
             "expired.test": expired.text, "plain.test": plain, "wrongkey.test": wrongkey.text}
    return zones, [secure.ds, expired.ds, decoy.ds]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    base = tmp_path_factory.mktemp("dane")
    ca = make_ca("DANE Test CA", not_before=datetime.datetime.now(datetime.UTC) - DAY,
                 not_after=datetime.datetime.now(datetime.UTC) + 30 * DAY)
    now = datetime.datetime.now(datetime.UTC)
    certs = {
        "mx": make_leaf(["mx.dane.test"], not_before=now - DAY, not_after=now + 30 * DAY),
        "ta_leaf": make_leaf(["ta.dane.test"], issuer=ca, not_before=now - DAY, not_after=now + 30 * DAY),
        "ca": ca,
        "stranger": make_leaf(["bad.dane.test"]),
    }
    many = [make_leaf([f"many{i}.dane.test"], not_before=now - DAY, not_after=now + 30 * DAY) for i in range(4)]
    zones, anchors = _zones(base, certs, many)
    certs.update({f"many{i}": c for i, c in enumerate(many)})
    with NSDServer(base / "nsd", zones) as nsd:
        stubs = {origin: nsd.port for origin in ("dane.test", "expired.test", "plain.test", "wrongkey.test")}
        with UnboundServer(base / "unbound", stubs, anchors, probe="dane.test") as unbound:
            lab = Lab(nsd, unbound, certs)
            yield lab
            # Nothing of ours is left on the private reactor: no UDP port, no TCP connection.
            assert not [r for r in lab.reactor.getReaders() if r is not getattr(lab.reactor, "waker", None)]
            assert not lab.reactor.getWriters()


def _der(lab: Lab, *names: str) -> list[bytes]:
    return [lab.certs[n].der for n in names]


@pytest.mark.slow
@requires_dnssec
class TestValidatingResolver:
    """Answers of Unbound (validating) and NSD (not validating), read by their AD bit."""

    def test_harness_resolver_validates(self, lab: Lab) -> None:
        """The private Unbound sets AD for the signed zone, not for the unsigned one, and SERVFAILs the bogus one."""
        good = query(lab.unbound.port, "_25._tcp.mx.dane.test", dane.TLSA)
        assert good is not None and good.rCode == dns.OK and good.authenticData and good.answers
        plain = query(lab.unbound.port, "_25._tcp.mx.plain.test", dane.TLSA)
        assert plain is not None and plain.rCode == dns.OK and not plain.authenticData and plain.answers
        bogus = query(lab.unbound.port, "_25._tcp.mx.expired.test", dane.TLSA)
        assert bogus is not None and bogus.rCode == dns.ESERVER
        outside = query(lab.unbound.port, "example.com", dns.A)
        assert outside is not None and outside.rCode != dns.OK  # the root is a stub on loopback: no Internet

    def test_secure_answer_with_records(self, lab: Lab) -> None:
        """A TLSA query through Unbound: secure (AD), the records of the zone."""
        answer = lab.wait(lab.resolver().query("_25._tcp.mx.dane.test", dane.TLSA))
        assert answer.secure and answer.rcode == dns.OK
        assert [TLSARecord.from_rdata(p.data) for p in answer.payloads] == [TLSARecord.for_certificate(lab.certs["mx"].der)]
        assert 0 < answer.ttl <= 300

    def test_secure_denials(self, lab: Lab) -> None:
        """No TLSA record: secure NXDOMAIN (no such name) and secure NODATA (the name has other records)."""
        r = lab.resolver()
        nx = lab.wait(r.query("_25._tcp.other.dane.test", dane.TLSA))
        assert (nx.secure, nx.rcode, nx.exists) == (True, dns.ENAME, False)
        nodata = lab.wait(r.query("_25._tcp.nodata.dane.test", dane.TLSA))
        assert (nodata.secure, nodata.rcode, nodata.exists) == (True, dns.OK, False)

    def test_unsigned_zone_is_insecure(self, lab: Lab) -> None:
        """An unsigned zone under no trust anchor: records, no AD."""
        answer = lab.wait(lab.resolver().query("_25._tcp.mx.plain.test", dane.TLSA))
        assert answer.exists and not answer.secure

    def test_bogus_zone_fails(self, lab: Lab) -> None:
        """Expired signatures: Unbound answers SERVFAIL, the lookup fails."""
        with pytest.raises(DNSSECLookupError, match="SERVFAIL from the resolver for _25._tcp.mx.expired.test"):
            lab.wait(lab.resolver().query("_25._tcp.mx.expired.test", dane.TLSA))

    def test_trust_anchor_mismatch_fails(self, lab: Lab) -> None:
        """A zone signed with a key the resolver does not trust (its DS names another key): SERVFAIL."""
        with pytest.raises(DNSSECLookupError, match="SERVFAIL"):
            lab.wait(lab.resolver().query("_25._tcp.mx.wrongkey.test", dane.TLSA))
        assert lab.wait(lab.dane().requirement_for("mx.wrongkey.test")).kind == DEFER

    @pytest.mark.parametrize("dnssec_ok", [True, False])
    def test_ad_in_the_query_is_enough(self, lab: Lab, dnssec_ok: bool) -> None:
        """Unbound sets AD for a query with AD set, with or without EDNS0's DO bit (RFC 6840 section 5.7)."""
        r = ValidatingResolver(lab.reactor, ("127.0.0.1", lab.unbound.port), (2.0,), dnssec_ok=dnssec_ok)
        assert lab.wait(r.query("_25._tcp.mx.dane.test", dane.TLSA)).secure

    def test_authoritative_server_never_sets_ad(self, lab: Lab) -> None:
        """NSD asked directly (it does not validate): the same signed records, no AD, so insecure."""
        answer = lab.wait(lab.resolver(lab.nsd.port).query("_25._tcp.mx.dane.test", dane.TLSA))
        assert answer.exists and not answer.secure

    def test_truncated_answer_is_asked_again_over_tcp(self, lab: Lab) -> None:
        """Four full certificates (3 0 0) do not fit a 1232-byte UDP answer: TC, then TCP, all records, secure."""
        asked_over_tcp: list[str] = []

        class Recording(ValidatingResolver):
            async def _tcp(self, question: dns.Query) -> dns.Message:
                asked_over_tcp.append(str(question.name))
                return await super()._tcp(question)

        r = Recording(lab.reactor, ("127.0.0.1", lab.unbound.port), (2.0,))
        answer = lab.wait(r.query("_25._tcp.many.dane.test", dane.TLSA))
        assert asked_over_tcp == ["_25._tcp.many.dane.test"]
        assert answer.secure
        assert sorted(TLSARecord.from_rdata(p.data).data for p in answer.payloads) == sorted(
            lab.certs[f"many{i}"].der for i in range(4))

    def test_answers_are_cached(self, lab: Lab) -> None:
        """A second question within the TTL is answered from the cache."""
        r = lab.resolver()
        first = lab.wait(r.query("_25._tcp.mx.dane.test", dane.TLSA))
        assert lab.wait(r.query("_25._tcp.MX.dane.test.", dane.TLSA)) is first
        # The cache is bounded: at the bound, what has not expired is dropped too.
        small = ValidatingResolver(lab.reactor, ("127.0.0.1", lab.unbound.port), (2.0,), max_cached=2)
        for host in ("mx", "bad", "ta"):
            lab.wait(small.query(f"{host}.dane.test", dns.A))
        assert len(small._cache) <= 2

    def test_no_answer_is_a_failure(self, lab: Lab) -> None:
        """Nothing answers at the resolver's address: the lookup fails after the configured tries."""
        silent = free_dns_port()
        r = ValidatingResolver(lab.reactor, ("127.0.0.1", silent), timeout=(0.1, 0.1))
        with pytest.raises(DNSSECLookupError, match=f"no answer from the resolver 127.0.0.1:{silent}"):
            lab.wait(r.query("_25._tcp.mx.dane.test", dane.TLSA))


@pytest.mark.slow
@requires_dnssec
class TestRequirement:
    """DANE.requirement_for and verify_chain against the real resolver."""

    def test_matching_tlsa_record(self, lab: Lab) -> None:
        """mx.dane.test: secure MX, secure addresses, a 3 1 1 record; its certificate matches, another does not."""
        d = lab.dane()
        assert lab.wait(d.mx_secure("dane.test")) is True
        assert lab.wait(d.address_secure("mx.dane.test")) is True
        req = lab.wait(d.requirement_for("mx.dane.test", 25, mx_secure=True))
        assert req.kind == MATCH and req.tls_required and req.authenticated
        assert req.records == (TLSARecord.for_certificate(lab.certs["mx"].der),)
        ok = d.verify_chain(req, _der(lab, "mx"))
        assert ok.ok, ok.reason
        wrong = verify_chain(req, _der(lab, "stranger"))
        assert not wrong.ok
        assert wrong.reason == "TLSA 3 1 1 did not match the certificate of mx.dane.test"
        assert wrong.dsn == "4.7.5"

    def test_non_matching_tlsa_record(self, lab: Lab) -> None:
        """bad.dane.test publishes a record of another key: the host's own certificate fails."""
        req = lab.wait(lab.dane().requirement_for("bad.dane.test"))
        assert req.kind == MATCH
        assert not verify_chain(req, _der(lab, "mx")).ok
        assert verify_chain(req, _der(lab, "stranger")).ok

    def test_dane_ta_with_names(self, lab: Lab) -> None:
        """ta.dane.test: 2 0 1 of the CA; the leaf it issued for ta.dane.test matches, through the CNAME alias too."""
        d = lab.dane()
        req = lab.wait(d.requirement_for("ta.dane.test"))
        assert req.kind == MATCH
        assert verify_chain(req, _der(lab, "ta_leaf", "ca")).ok
        assert not verify_chain(req, _der(lab, "ta_leaf")).ok  # the TA certificate must be sent
        alias = lab.wait(d.requirement_for("alias.dane.test"))
        assert alias.names == ("alias.dane.test", "ta.dane.test")
        assert verify_chain(alias, _der(lab, "ta_leaf", "ca")).ok

    def test_port_in_the_tlsa_name(self, lab: Lab) -> None:
        """The TLSA name carries the route's port: _2525._tcp.mx has a record, _2526 has none."""
        d = lab.dane()
        assert lab.wait(d.requirement_for("mx.dane.test", 2525)).kind == MATCH
        none = lab.wait(d.requirement_for("mx.dane.test", 2526))
        assert none.kind == NO_DANE
        assert none.reason == "no DANE for mx.dane.test: no TLSA record at _2526._tcp.mx.dane.test"

    def test_no_tlsa_records_means_no_dane(self, lab: Lab) -> None:
        """Secure NXDOMAIN and NODATA at the TLSA name: no DANE (the route's own TLS policy applies)."""
        d = lab.dane()
        for host in ("other.dane.test", "nodata.dane.test"):
            req = lab.wait(d.requirement_for(host))
            assert req.kind == NO_DANE and not req.tls_required, (host, req)

    def test_all_unusable(self, lab: Lab) -> None:
        """pkix.dane.test has only a PKIX-EE record: TLS required, not authenticated."""
        req = lab.wait(lab.dane().requirement_for("pkix.dane.test"))
        assert req.kind == TLS_UNAUTHENTICATED and req.tls_required and not req.authenticated
        assert verify_chain(req, _der(lab, "stranger")).ok

    def test_insecure_zone_means_no_dane(self, lab: Lab) -> None:
        """plain.test is unsigned: its MX is insecure and so are its host's addresses; no DANE either way."""
        d = lab.dane()
        assert lab.wait(d.mx_secure("plain.test")) is False
        assert lab.wait(d.address_secure("mx.plain.test")) is False
        req = lab.wait(d.requirement_for("mx.plain.test", mx_secure=True))
        assert req.kind == NO_DANE
        assert req.reason == "no DANE for mx.plain.test: its address records are not DNSSEC-secure"
        insecure_mx = lab.wait(d.requirement_for("mx.dane.test", mx_secure=False))
        assert insecure_mx.kind == NO_DANE
        assert insecure_mx.reason == "no DANE for mx.dane.test: the MX lookup was not DNSSEC-secure"

    def test_bogus_zone_defers(self, lab: Lab) -> None:
        """expired.test: every lookup is SERVFAIL; the delivery defers 4.7.5, never clear text."""
        d = lab.dane()
        with pytest.raises(DNSSECLookupError):
            lab.wait(d.mx_secure("expired.test"))
        req = lab.wait(d.requirement_for("mx.expired.test"))
        assert req.kind == DEFER and req.deferred and req.dsn == "4.7.5"
        assert req.reason.startswith("address lookup for mx.expired.test failed: SERVFAIL")
        assert not verify_chain(req, _der(lab, "mx")).ok

    def test_bogus_tlsa_rrset_defers(self, lab: Lab) -> None:
        """mxb.dane.test: a secure address, but its TLSA RRset is in a child zone with expired signatures."""
        d = lab.dane()
        assert lab.wait(d.address_secure("mxb.dane.test")) is True
        req = lab.wait(d.requirement_for("mxb.dane.test"))
        assert req.kind == DEFER and req.dsn == "4.7.5"
        assert req.reason.startswith(
            "TLSA lookup for _25._tcp.mxb.dane.test failed: SERVFAIL from the resolver"), req.reason

    def test_not_validating_resolver_means_no_dane(self, lab: Lab) -> None:
        """Pointed at NSD (authoritative, no validation, no AD): every answer is insecure, so no DANE."""
        d = lab.dane(lab.nsd.port)
        assert lab.wait(d.mx_secure("dane.test")) is False
        assert lab.wait(d.requirement_for("mx.dane.test")).kind == NO_DANE

    def test_resolver_down_defers(self, lab: Lab) -> None:
        """No resolver answering: defer, 4.7.5."""
        d = DANE(ValidatingResolver(lab.reactor, ("127.0.0.1", free_dns_port()), timeout=(0.1,)))
        req = lab.wait(d.requirement_for("mx.dane.test"))
        assert req.kind == DEFER and req.dsn == "4.7.5"

    def test_address_literal_means_no_dane(self, lab: Lab) -> None:
        """A next hop given as an address has no TLSA base domain: no DANE, nothing looked up."""
        d = DANE(ValidatingResolver(lab.reactor, ("127.0.0.1", free_dns_port()), timeout=(0.1,)))
        for host in ("192.0.2.1", "[2001:db8::1]"):
            assert lab.wait(d.requirement_for(host)).kind == NO_DANE

    def test_for_address(self, lab: Lab) -> None:
        """DANE.for_address parses the configured resolver address."""
        d = DANE.for_address(lab.reactor, f"127.0.0.1:{lab.unbound.port}")
        assert d.resolver.server == ("127.0.0.1", lab.unbound.port)
        assert lab.wait(d.requirement_for("mx.dane.test")).kind == MATCH

