"""
Security tests of relaynet's TLS (C{relaynet.smtp.tls}, the intake's STARTTLS and
implicit TLS, the outbound per-route policy).

In memory: C{relaynet gen-cert}'s lab CA and certificates, the protocol floor
and cipher list of both sides (real pyOpenSSL handshakes over
C{twisted.test.iosim}), service_identity name, CA and expiry checks of
C{verify} options (IPv4, DNS and IPv6 next hops), and the intake's STARTTLS
state machine over a fake TLS-capable transport.

Real processes (C{slow}): the STARTTLS injection (CVE-2011-0411 class) on a
raw socket, TLS in the C{Received:} header and the event log, the implicit-TLS
listener, a stalled handshake against the idle timeout, and two nodes with
C{verify} / C{required} / C{opportunistic} / C{none} routes between them, to
Postfix's C{smtp-sink} (no STARTTLS) and to next hops that offer STARTTLS and
then refuse it or botch the handshake.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_ip_address
from twisted.cred.portal import Portal
from twisted.internet import ssl as tssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from harness.nodeproc import HOST, NodeProcess, free_port, read_reply, relaynet_command, wait_for

from relaynet.intake.auth import RelayRealm, ScryptChecker
from relaynet.config import Outbound
from relaynet.intake.server import RelayESMTP, RelayFactory
from relaynet.delivery.client import HopPool
from harness.peers import SmtpSink
from relaynet.testing import make_intake, take_replies
from relaynet.smtp.tls import client_options, server_options

DELIVERY_TIMEOUT = 20.0

# Twisted hands pyOpenSSL X509/PKey objects to it (deprecated there, not our doing).
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


# -- the lab PKI ------------------------------------------------------------


def gen_cert(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    """Run C{relaynet gen-cert --dir DIRECTORY NAMES...}; it must succeed."""
    result = subprocess.run(
        [*relaynet_command(), "gen-cert", "--dir", str(directory), *names],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    Two lab CAs made by C{relaynet gen-cert}: C{ca} with a certificate for
    127.0.0.2 only (so 127.0.0.1 is a name mismatch) and one for mx.test, and
    an unrelated C{other} CA with its own certificate for 127.0.0.2.
    """
    base = tmp_path_factory.mktemp("pki")
    gen_cert(base / "ca", "127.0.0.2")
    gen_cert(base / "ca", "mx.test")
    gen_cert(base / "other", "127.0.0.2")
    return {
        "dir": base / "ca",
        "ca": base / "ca" / "ca.pem",
        "cert": base / "ca" / "127.0.0.2.pem",
        "key": base / "ca" / "127.0.0.2.key",
        "mx_cert": base / "ca" / "mx.test.pem",
        "mx_key": base / "ca" / "mx.test.key",
        "other_ca": base / "other" / "ca.pem",
        "other_cert": base / "other" / "127.0.0.2.pem",
        "other_key": base / "other" / "127.0.0.2.key",
    }


def test_gen_cert_makes_lab_ca_and_node_certificate(tmp_path: Path) -> None:
    """
    C{relaynet gen-cert} makes a CA once (reused later), and per-node
    certificates with the names as SANs (IP or DNS), signed by that CA, for
    server use; private keys are 0600.
    """
    d = tmp_path / "certs"
    gen_cert(d, "127.0.0.2", "hop.example.test")
    ca_pem = (d / "ca.pem").read_bytes()
    for key in ("ca.key", "127.0.0.2.key"):
        assert (d / key).stat().st_mode & 0o777 == 0o600, key
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    chain = x509.load_pem_x509_certificates((d / "127.0.0.2.pem").read_bytes())
    leaf = chain[0]
    assert chain[-1] == ca, "the certificate file carries the CA after the leaf"
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    assert san.get_values_for_type(x509.DNSName) == ["hop.example.test"]
    verify_certificate_ip_address(leaf, "127.0.0.2")
    with pytest.raises(VerificationError):
        verify_certificate_ip_address(leaf, "127.0.0.1")
    # A second node's certificate comes from the same CA.
    gen_cert(d, "127.0.0.3")
    assert (d / "ca.pem").read_bytes() == ca_pem
    second = x509.load_pem_x509_certificates((d / "127.0.0.3.pem").read_bytes())[0]
    second.verify_directly_issued_by(ca)


# -- in-memory TLS handshakes ---------------------------------------------


@implementer(IHandshakeListener)
class _Side(Protocol):
    def __init__(self) -> None:
        self.handshake_done = False
        self.reason: Any = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason


def handshake(client_tls: Any, server_tls: Any) -> tuple[bool, tuple[str, str] | None, str]:
    """
    Run one TLS handshake in memory, both sides through Twisted's
    C{TLSMemoryBIOProtocol} (as the node does).

    @return: C{(ok, (version, cipher) or None, why it failed)}.
    """
    sides: dict[str, _Side] = {}
    server_factory = TLSMemoryBIOFactory(
        server_tls, False, Factory.forProtocol(lambda: sides.setdefault("server", _Side()))
    )
    client_factory = TLSMemoryBIOFactory(
        client_tls, True, Factory.forProtocol(lambda: sides.setdefault("client", _Side()))
    )
    _, client, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None),
        greet=False,
    )
    pump.flush()
    c, s = sides["client"], sides["server"]
    if c.handshake_done and s.handshake_done and c.reason is None:
        conn = client.getHandle()
        return True, (conn.get_protocol_version_name(), conn.get_cipher_name()), ""
    why = " ".join(str(r.value) for r in (c.reason, s.reason) if r is not None)
    return False, None, why


class _RawContext(tssl.ContextFactory):
    """A pyOpenSSL context with chosen protocol versions (and a cert for servers)."""

    def __init__(
        self, low: int, high: int, cert: Path | None = None, key: Path | None = None,
        ciphers: bytes = b"ALL:@SECLEVEL=0",
    ) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(low)
        ctx.set_max_proto_version(high)
        ctx.set_cipher_list(ciphers)
        if cert is not None and key is not None:
            ctx.use_certificate_chain_file(str(cert).encode())
            ctx.use_privatekey_file(str(key).encode())
        self.ctx = ctx

    def getContext(self) -> SSL.Context:
        return self.ctx


def test_server_refuses_tls_below_1_2(pki: dict[str, Path]) -> None:
    """
    The listeners' TLS options (C{server_options}) refuse TLS 1.0/1.1 and
    accept 1.2 and 1.3. The same old client does get through to a server that
    allows 1.1, so the refusal is the server's floor.
    """
    server = server_options(pki["cert"], pki["key"])
    old_client = _RawContext(SSL.TLS1_VERSION, SSL.TLS1_1_VERSION)
    ok, _, why = handshake(old_client, server)
    assert not ok
    assert "protocol version" in why or "unsupported protocol" in why, why
    permissive = _RawContext(SSL.TLS1_VERSION, SSL.TLS1_1_VERSION, pki["cert"], pki["key"])
    assert handshake(_RawContext(SSL.TLS1_VERSION, SSL.TLS1_1_VERSION), permissive)[0]
    for version, name in ((SSL.TLS1_2_VERSION, "TLSv1.2"), (SSL.TLS1_3_VERSION, "TLSv1.3")):
        ok, info, why = handshake(_RawContext(version, version, ciphers=b"DEFAULT"), server)
        assert ok, why
        assert info is not None and info[0] == name


@pytest.mark.parametrize("policy", ["opportunistic", "required", "verify"])
def test_client_refuses_tls_below_1_2(pki: dict[str, Path], policy: str) -> None:
    """Outbound TLS (every policy that uses TLS) never settles for TLS 1.0/1.1."""
    old_server = _RawContext(SSL.TLS1_VERSION, SSL.TLS1_1_VERSION, pki["cert"], pki["key"])
    ok, info, _ = handshake(client_options(policy, "127.0.0.2", pki["ca"]), old_server)
    assert not ok, info
    # Control: the same options do complete a handshake with a modern server.
    ok, info, why = handshake(
        client_options(policy, "127.0.0.2", pki["ca"]), server_options(pki["cert"], pki["key"])
    )
    assert ok, why


def test_client_options_none_means_cleartext() -> None:
    assert client_options("none", "127.0.0.2") is None


_FORWARD_SECRET = re.compile(r"^(ECDHE|DHE)-")
_AEAD = re.compile(r"(GCM|CHACHA20-POLY1305|-CCM)")


def test_server_cipher_list_is_modern(pki: dict[str, Path]) -> None:
    """
    Every TLS 1.2 suite the listeners enable has forward secrecy (ECDHE/DHE)
    and an AEAD cipher (GCM, ChaCha20-Poly1305, CCM); TLS 1.3 suites are AEAD
    by definition.
    """
    ctx = server_options(pki["cert"], pki["key"]).getContext()
    suites = SSL.Connection(ctx, None).get_cipher_list()
    tls12 = [s for s in suites if not s.startswith("TLS_")]
    assert tls12, suites
    weak = [s for s in tls12 if not (_FORWARD_SECRET.match(s) and _AEAD.search(s))]
    assert weak == []


def test_server_refuses_cbc_sha1_suite(pki: dict[str, Path]) -> None:
    server = server_options(pki["cert"], pki["key"])
    cbc = _RawContext(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, ciphers=b"ECDHE-ECDSA-AES128-SHA")
    ok, info, _ = handshake(cbc, server)
    assert not ok, info


def test_verify_checks_name_and_ca(pki: dict[str, Path]) -> None:
    """
    C{verify} options accept the next hop only when its certificate chains to
    the configured CA and names the host (IP SAN or DNS SAN, through
    service_identity); C{required} encrypts without checking.
    """
    right = server_options(pki["cert"], pki["key"])
    assert handshake(client_options("verify", "127.0.0.2", pki["ca"]), right)[0]
    mismatch = handshake(client_options("verify", "127.0.0.1", pki["ca"]), right)
    assert not mismatch[0]
    mx = server_options(pki["mx_cert"], pki["mx_key"])
    assert handshake(client_options("verify", "mx.test", pki["ca"]), mx)[0]
    assert not handshake(client_options("verify", "other.test", pki["ca"]), mx)[0]
    assert not handshake(client_options("verify", "127.0.0.2", pki["ca"]), mx)[0]
    stranger = server_options(pki["other_cert"], pki["other_key"])
    assert not handshake(client_options("verify", "127.0.0.2", pki["ca"]), stranger)[0]
    # No CA bundle configured: the system trust store does not know the lab CA.
    assert not handshake(client_options("verify", "127.0.0.2", None), right)[0]
    # required: TLS, no certificate check.
    assert handshake(client_options("required", "127.0.0.1", None), stranger)[0]


def test_verify_uses_every_ca_of_the_bundle(pki: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki["other_ca"].read_bytes() + pki["ca"].read_bytes())
    right = server_options(pki["cert"], pki["key"])
    ok, _, why = handshake(client_options("verify", "127.0.0.2", bundle), right)
    assert ok, why


def test_verify_refuses_expired_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    """A next hop whose certificate (right CA, right name) has expired fails C{verify}."""
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = x509.load_pem_x509_certificate(pki["ca"].read_bytes())
    ca_key = serialization.load_pem_private_key((pki["dir"] / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]), False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    expired = server_options(tmp_path / "old.pem", tmp_path / "old.key")
    assert not handshake(client_options("verify", "127.0.0.2", pki["ca"]), expired)[0]
    assert handshake(client_options("required", "127.0.0.2", pki["ca"]), expired)[0]


def test_verify_route_to_ipv6_next_hop(tmp_path: Path) -> None:
    """A C{verify} route to an IPv6 next hop checks the certificate against the address."""
    gen_cert(tmp_path, "::1")
    pool = HopPool(
        r"tcp:\:\:1:2525", MemoryReactorClock(), Outbound(), "relay.test",
        tls_policy="verify", ca_file=tmp_path / "ca.pem",
    )
    server = server_options(tmp_path / "__1.pem", tmp_path / "__1.key")
    ok, _, why = handshake(pool.tls_context, server)
    assert ok, why


# -- the intake's STARTTLS in memory ---------------------------------------


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that says it can start TLS and records the call."""

    tls_context: Any = None
    tls_started_at: int | None = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_context = contextFactory
        self.tls_started_at = len(self.value())


INTAKE_TOML = """
[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
[[listener]]
endpoint = "tcp:2587:interface=127.0.0.1"
mode = "submission"
[[listener]]
endpoint = "tcp:2465:interface=127.0.0.1"
mode = "submissions"
[tls]
cert = "{cert}"
key = "{key}"
[auth]
password_file = "{passwd}"
"""


@pytest.fixture
def tls_intake(tmp_path: Path, pki: dict[str, Path]) -> Any:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    toml = INTAKE_TOML.format(cert=pki["cert"], key=pki["key"], passwd=passwd)
    intake, reactor, pool = make_intake(tmp_path / "spool", toml=toml)
    intake.tls = server_options(pki["cert"], pki["key"])
    intake.portal = Portal(RelayRealm(), [ScryptChecker(passwd, maybeDeferred)])
    return intake


def open_session(intake: Any, mode: str = "relay", tls_capable: bool = True) -> tuple[RelayESMTP, StringTransport]:
    listener = next(lst for lst in intake.config.listeners if lst.mode == mode)
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = RelayFactory(intake, listener).buildProtocol(addr)
    cls = TLSStringTransport if tls_capable else StringTransport
    transport = cls(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 2525))
    protocol.makeConnection(transport)
    assert take_replies(transport)[0][0] == 220
    return protocol, transport


def chat(protocol: RelayESMTP, transport: StringTransport, data: bytes) -> list[tuple[int, str]]:
    protocol.dataReceived(data)
    return take_replies(transport)


def ehlo_keywords(replies: list[tuple[int, str]]) -> list[str]:
    (code, text), = replies
    assert code == 250
    return [line.split()[0].upper() for line in text.split("\n")[1:]]


@pytest.mark.parametrize("mode", ["relay", "submission"])
def test_starttls_offered_once(tls_intake: Any, mode: str) -> None:
    """
    Relay and submission listeners offer STARTTLS when [tls] is set; once TLS
    is on it is neither offered nor accepted again.
    """
    p, t = open_session(tls_intake, mode)
    assert "STARTTLS" in ehlo_keywords(chat(p, t, b"EHLO client.test\r\n"))
    assert chat(p, t, b"STARTTLS now\r\n")[0][0] == 501
    assert chat(p, t, b"STARTTLS\r\n") == [(220, "2.0.0 Ready to start TLS")]
    assert t.tls_context is tls_intake.tls
    p.handshakeCompleted()
    assert "STARTTLS" not in ehlo_keywords(chat(p, t, b"EHLO client.test\r\n"))
    assert chat(p, t, b"STARTTLS\r\n")[0][0] == 503


def test_starttls_not_offered_without_certificate(tmp_path: Path) -> None:
    intake, _, _ = make_intake(tmp_path)
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    p = RelayFactory(intake, intake.config.listeners[0]).buildProtocol(addr)
    t = TLSStringTransport(peerAddress=addr)
    p.makeConnection(t)
    take_replies(t)
    assert "STARTTLS" not in ehlo_keywords(chat(p, t, b"EHLO client.test\r\n"))
    assert chat(p, t, b"STARTTLS\r\n")[0][0] in (502, 503)
    assert t.tls_context is None


def test_implicit_tls_listener_offers_auth_not_starttls(tls_intake: Any) -> None:
    p, t = open_session(tls_intake, "submissions")
    words = ehlo_keywords(chat(p, t, b"EHLO client.test\r\n"))
    assert "STARTTLS" not in words
    assert "AUTH" in words


def test_starttls_pipelined_plaintext_discarded_in_memory(tls_intake: Any) -> None:
    """
    Commands pipelined behind STARTTLS in the same read are discarded (they
    came in cleartext), and the session starts over: EHLO again, no MAIL.
    """
    p, t = open_session(tls_intake)
    chat(p, t, b"EHLO client.test\r\n")
    replies = chat(p, t, b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<a@localhost>\r\n")
    assert replies == [(220, "2.0.0 Ready to start TLS")]
    p.handshakeCompleted()
    assert chat(p, t, b"MAIL FROM:<a@x.test>\r\n")[0][0] == 503, "EHLO is needed again"
    assert ehlo_keywords(chat(p, t, b"EHLO client.test\r\n"))
    assert chat(p, t, b"RCPT TO:<a@localhost>\r\n")[0][0] == 503


def test_starttls_resets_transaction_in_memory(tls_intake: Any) -> None:
    p, t = open_session(tls_intake)
    chat(p, t, b"EHLO client.test\r\n")
    assert chat(p, t, b"MAIL FROM:<early@x.test>\r\n")[0][0] == 250
    assert chat(p, t, b"STARTTLS\r\n")[0][0] == 220
    p.handshakeCompleted()
    chat(p, t, b"EHLO client.test\r\n")
    assert chat(p, t, b"RCPT TO:<a@localhost>\r\n")[0][0] == 503
    assert chat(p, t, b"DATA\r\n")[0][0] == 503


def test_starttls_after_reload_removed_tls(tls_intake: Any) -> None:
    """
    A reload that removes [tls] while a session is open: its STARTTLS gets
    454 4.7.0 and no TLS is started, not a 220 and then a TLS start with no
    certificate; the session goes on in cleartext.
    """
    p, t = open_session(tls_intake)
    chat(p, t, b"EHLO client.test\r\n")
    tls_intake.tls = None  # what RelayNode.reload does without [tls]
    assert chat(p, t, b"STARTTLS\r\n") == [(454, "4.7.0 TLS not available due to temporary reason")]
    assert t.tls_started_at is None
    assert chat(p, t, b"MAIL FROM:<a@x.test>\r\n")[0][0] == 250


# -- real nodes -------------------------------------------------------------


def _token() -> str:
    return uuid.uuid4().hex[:10]


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ehlo(sock: Any, f: Any, name: bytes = b"client.test") -> tuple[int, list[bytes]]:
    sock.sendall(b"EHLO " + name + b"\r\n")
    return read_reply(f)


def events_of(node: NodeProcess, **match: Any) -> list[dict[str, Any]]:
    return [e for e in node.events() if all(e.get(k) == v for k, v in match.items())]


DOWN_TOML = """\
[node]
name = "down"
hostname = "down.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.2"
[[listener]]
endpoint = "tcp:IMPLICIT:interface=127.0.0.1"
mode = "submissions"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"

[local]
domains = ["localhost", "mismatch.test", "match.test", "opp.test", "none.test"]
catch_all = true
"""


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[NodeProcess]:
    """A TLS node (certificate for 127.0.0.2 only) listening on 127.0.0.1 and 127.0.0.2."""
    d = tmp_path_factory.mktemp("tls-down")
    (d / "passwd").write_text("")
    implicit = free_port()
    toml = (
        DOWN_TOML.replace("IMPLICIT", str(implicit))
        .replace("CERT", str(pki["cert"])).replace("KEY", str(pki["key"]))
    )
    node = NodeProcess(d, toml, name="down")
    node.implicit_port = implicit  # type: ignore[attr-defined]
    with node:
        yield node


@pytest.mark.slow
def test_starttls_injection_is_ignored(down: NodeProcess) -> None:
    """
    CVE-2011-0411: C{STARTTLS} and a C{MAIL FROM} in one write. After the
    handshake the server answers EHLO normally and a RCPT gets 503: the MAIL
    sent in cleartext behind STARTTLS was never executed.
    """
    with socket.create_connection((HOST, down.port), timeout=15) as raw:
        f = raw.makefile("rb")
        assert read_reply(f)[0] == 220
        assert b"STARTTLS" in b"\n".join(_ehlo(raw, f)[1])
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
        code, lines = read_reply(f)
        assert code == 220, lines
        tls = _unverified().wrap_socket(raw)
        tf = tls.makefile("rb")
        code, lines = _ehlo(tls, tf)
        assert code == 250 and lines[0].startswith(b"250-down.test"), lines
        assert not any(b"STARTTLS" in line for line in lines)
        tls.sendall(b"RCPT TO:<victim@localhost>\r\n")
        code, lines = read_reply(tf)
        assert code == 503, lines
        # Nothing else is waiting: the injected MAIL produced no reply at all.
        tls.sendall(b"NOOP\r\n")
        assert read_reply(tf)[0] == 250
        tls.sendall(b"QUIT\r\n")
        assert read_reply(tf)[0] == 221


@pytest.mark.slow
def test_starttls_resets_session_on_the_wire(down: NodeProcess) -> None:
    """RFC 3207 4.2: a MAIL given before STARTTLS does not survive it."""
    with socket.create_connection((HOST, down.port), timeout=15) as raw:
        f = raw.makefile("rb")
        read_reply(f)
        _ehlo(raw, f)
        raw.sendall(b"MAIL FROM:<early@x.test>\r\n")
        assert read_reply(f)[0] == 250
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(f)[0] == 220
        tls = _unverified().wrap_socket(raw)
        tf = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@x.test>\r\n")
        assert read_reply(tf)[0] == 503, "EHLO must be sent again after STARTTLS"
        assert _ehlo(tls, tf)[0] == 250
        tls.sendall(b"RCPT TO:<victim@localhost>\r\n")
        assert read_reply(tf)[0] == 503


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_old_tls_refused_on_the_wire(down: NodeProcess) -> None:
    ctx = _unverified()
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection((HOST, down.port), timeout=15) as raw:
        f = raw.makefile("rb")
        read_reply(f)
        _ehlo(raw, f)
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(f)[0] == 220
        with pytest.raises(ssl.SSLError, match="(?i)alert protocol version"):
            ctx.wrap_socket(raw)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_received_header_and_event_record_tls(down: NodeProcess, version: str) -> None:
    """
    A message received over TLS: our Received header says C{using <version>
    with cipher <cipher>}, exactly as negotiated, with protocol ESMTPS, and
    the C{received} event carries C{tls}.
    """
    ctx = _unverified()
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
    user = f"tls{_token()}"
    with smtplib.SMTP(HOST, down.port, timeout=30) as s:
        s.ehlo("tls.client")
        s.starttls(context=ctx)
        got_version, got_cipher = s.sock.version(), s.sock.cipher()[0]
        s.ehlo("tls.client")
        s.sendmail(f"{user}@client.test", [f"{user}@localhost"], b"Subject: tls\r\n\r\nhello\r\n")
    assert got_version == version
    (path,) = wait_for(lambda: down.maildir_new(user), DELIVERY_TIMEOUT, "local delivery")
    data = path.read_bytes()
    head = data.split(b"\n\n", 1)[0]  # a Maildir copy has LF lines
    received = re.search(rb"Received: .*?(?=\n[^ \t])", head, re.S)
    assert received, head
    text = re.sub(rb"\n[ \t]+", b" ", received.group(0)).decode()
    assert f"using {version} with cipher {got_cipher}" in text, text
    assert "with ESMTPS " in text, text
    (event,) = events_of(down, event="received", sender=f"{user}@client.test")
    assert event["tls"] == f"{version} {got_cipher}"
    assert event["protocol"] == "ESMTPS"


@pytest.mark.slow
def test_cleartext_message_has_no_tls_record(down: NodeProcess) -> None:
    user = f"clear{_token()}"
    with smtplib.SMTP(HOST, down.port, timeout=30) as s:
        s.sendmail(f"{user}@client.test", [f"{user}@localhost"], b"Subject: clear\r\n\r\nhi\r\n")
    (path,) = wait_for(lambda: down.maildir_new(user), DELIVERY_TIMEOUT, "local delivery")
    assert b"with cipher" not in path.read_bytes().split(b"\n\n", 1)[0]
    (event,) = events_of(down, event="received", sender=f"{user}@client.test")
    assert "tls" not in event


@pytest.mark.slow
def test_implicit_tls_listener_on_the_wire(down: NodeProcess) -> None:
    """
    The submissions (port 465 style) listener speaks TLS from the first byte:
    the greeting comes over TLS 1.2+, EHLO offers AUTH and not STARTTLS; a
    cleartext client gets no SMTP at all.
    """
    port = down.implicit_port  # type: ignore[attr-defined]
    with socket.create_connection((HOST, port), timeout=15) as raw:
        tls = _unverified().wrap_socket(raw)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tf = tls.makefile("rb")
        code, lines = read_reply(tf)
        assert code == 220 and b"down.test" in lines[0]
        code, lines = _ehlo(tls, tf)
        words = [line[4:].split()[0] for line in lines[1:]]
        assert b"AUTH" in words and b"STARTTLS" not in words, lines
        tls.sendall(b"MAIL FROM:<a@x.test>\r\n")
        assert read_reply(tf)[0] == 530
    with socket.create_connection((HOST, port), timeout=5) as plain:
        plain.sendall(b"EHLO plain.client\r\n")
        got = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < 4096:
            try:
                chunk = plain.recv(4096)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk
        assert not re.search(rb"(^|\n)(220|250)[ -]", got), got


STALL_TOML = """\
[node]
name = "stall"
hostname = "stall.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[[listener]]
endpoint = "tcp:IMPLICIT:interface=127.0.0.1"
mode = "submissions"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"

[limits]
idle_timeout = 1
"""


@pytest.fixture(scope="module")
def stall_node(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[NodeProcess]:
    """A TLS node with a one-second idle timeout."""
    d = tmp_path_factory.mktemp("tls-stall")
    (d / "passwd").write_text("")
    implicit = free_port()
    toml = (
        STALL_TOML.replace("IMPLICIT", str(implicit))
        .replace("CERT", str(pki["cert"])).replace("KEY", str(pki["key"]))
    )
    node = NodeProcess(d, toml, name="stall")
    node.implicit_port = implicit  # type: ignore[attr-defined]
    with node:
        yield node


def _closed_within(socks: list[socket.socket], seconds: float) -> list[bool]:
    """Read (and drop) whatever comes until each socket reaches EOF or the deadline."""
    deadline = time.monotonic() + seconds
    closed = [False] * len(socks)
    for i, s in enumerate(socks):
        while not closed[i]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                closed[i] = s.recv(4096) == b""
            except socket.timeout:
                break
            except OSError:
                closed[i] = True
    return closed


@pytest.mark.slow
def test_idle_timeout_applies_before_tls(stall_node: NodeProcess) -> None:
    """Control for the test below: a silent cleartext client is cut off (421 4.4.2)."""
    with socket.create_connection((HOST, stall_node.port), timeout=10) as s:
        assert _closed_within([s], 5.0) == [True]


@pytest.mark.slow
def test_stalled_tls_handshake_is_timed_out(stall_node: NodeProcess) -> None:
    """
    A client that says STARTTLS (or connects to the implicit-TLS port) and
    then sends nothing is disconnected once the idle timeout (1 s) passes.
    """
    starttls = socket.create_connection((HOST, stall_node.port), timeout=10)
    implicit = socket.create_connection((HOST, stall_node.implicit_port), timeout=10)  # type: ignore[attr-defined]
    with starttls, implicit, starttls.makefile("rb") as f:
        read_reply(f)
        _ehlo(starttls, f)
        starttls.sendall(b"STARTTLS\r\n")
        assert read_reply(f)[0] == 220
        assert _closed_within([starttls, implicit], 5.0) == [True, True]


# -- outbound TLS policy: two nodes and an smtp-sink ---------------------------


UP_TOML = """\
[node]
name = "up"
hostname = "up.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[relay]
trusted_networks = ["127.0.0.1/32"]

[tls]
ca_file = "CA"

[queue]
minimal_backoff = 3600
maximal_backoff = 3600

[outbound]
connect_timeout = 5
helo_timeout = 10
connection_reuse = false

[[route]]
domains = ["mismatch.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DOWN"]
tls = "verify"

[[route]]
domains = ["match.test"]
action = "relay"
next_hops = ["tcp:127.0.0.2:DOWN"]
tls = "verify"

[[route]]
domains = ["required.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:SINK"]
tls = "required"

[[route]]
domains = ["opp-plain.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:SINK"]
tls = "opportunistic"

[[route]]
domains = ["opp.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DOWN"]
tls = "opportunistic"

[[route]]
domains = ["opp-454.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:TRAP454"]
tls = "opportunistic"

[[route]]
domains = ["opp-broken.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:TRAPJUNK"]
tls = "opportunistic"

[[route]]
domains = ["none.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DOWN"]
tls = "none"
"""


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    """Postfix's smtp-sink: a real next hop that does not offer STARTTLS."""
    s = SmtpSink(tmp_path_factory.mktemp("tls-sink"), dump=True)
    try:
        s.start()
    except Exception as e:  # PeerUnavailable: postfix not installed
        pytest.skip(f"smtp-sink unavailable: {e}")
    yield s
    s.stop()


class StartTLSTrap:
    """
    A next hop that offers STARTTLS and then fails it: C{mode="454"} refuses
    it with 454, C{mode="junk"} says 220 and answers the handshake with
    cleartext junk. It records every command line it reads, so a client that
    falls back to cleartext after that is caught sending MAIL.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.commands: list[bytes] = []
        self.sessions = 0
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.sessions += 1
            with conn:
                conn.settimeout(10)
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"220 trap.test ESMTP\r\n")
        f = conn.makefile("rb")
        for _ in range(100):
            line = f.readline(4096)
            if not line:
                return
            line = line.rstrip(b"\r\n")
            self.commands.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-trap.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS" and self.mode == "454":
                conn.sendall(b"454 4.7.0 TLS not available due to temporary reason\r\n")
            elif verb == b"STARTTLS":
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                f.read1(4096)  # the ClientHello
                conn.sendall(b"this is not TLS\r\n" * 4)
                return
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def traps() -> Iterator[dict[str, StartTLSTrap]]:
    made = {"454": StartTLSTrap("454"), "junk": StartTLSTrap("junk")}
    yield made
    for trap in made.values():
        trap.close()


@pytest.fixture(scope="module")
def up(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path], down: NodeProcess,
    sink: SmtpSink, traps: dict[str, StartTLSTrap],
) -> Iterator[NodeProcess]:
    toml = (
        UP_TOML.replace("CA", str(pki["ca"])).replace("DOWN", str(down.port))
        .replace("SINK", str(sink.port)).replace("TRAP454", str(traps["454"].port))
        .replace("TRAPJUNK", str(traps["junk"].port))
    )
    with NodeProcess(tmp_path_factory.mktemp("tls-up"), toml, name="up") as node:
        yield node


def relay_through(up: NodeProcess, domain: str) -> tuple[str, str]:
    """Send one message through C{up} to C{domain}; @return: (sender, recipient)."""
    token = _token()
    sender, rcpt = f"{domain.split('.')[0]}-{token}@client.test", f"u{token}@{domain}"
    with smtplib.SMTP(HOST, up.port, timeout=30) as s:
        s.sendmail(sender, [rcpt], f"Subject: {token}\r\n\r\nbody {token}\r\n".encode())
    return sender, rcpt


def outcome(up: NodeProcess, sender: str) -> dict[str, Any]:
    return wait_for(
        lambda: next(
            (e for e in up.events() if e.get("sender") == sender
             and e["event"] in ("sent", "deferred", "bounced")), None,
        ),
        DELIVERY_TIMEOUT, f"an outcome for {sender}",
    )


@pytest.mark.slow
def test_verify_route_refuses_name_mismatch(up: NodeProcess, down: NodeProcess) -> None:
    """
    The next hop's certificate names 127.0.0.2, the route connects to
    127.0.0.1: the message is deferred with 4.7.5 and never reaches the next
    hop, neither over TLS nor in clear.
    """
    sender, rcpt = relay_through(up, "mismatch.test")
    event = outcome(up, sender)
    assert event["event"] == "deferred", event
    assert event["dsn"] == "4.7.5", event
    assert "tls" not in event
    assert events_of(down, event="received", sender=sender) == []
    assert down.maildir_new(rcpt.split("@")[0], "mismatch.test") == []
    assert (up.queue / "new").exists() and any(up.queue_files("new")), "still queued"


@pytest.mark.slow
def test_verify_route_delivers_over_tls_when_name_matches(up: NodeProcess, down: NodeProcess) -> None:
    sender, rcpt = relay_through(up, "match.test")
    event = outcome(up, sender)
    assert event["event"] == "sent", event
    assert re.fullmatch(r"TLSv1\.[23] \S+", event.get("tls") or ""), event
    received = wait_for(
        lambda: events_of(down, event="received", sender=sender), DELIVERY_TIMEOUT, "downstream"
    )
    assert received[0]["protocol"] == "ESMTPS"
    assert received[0]["tls"] == event["tls"]
    local, _, domain = rcpt.partition("@")
    (path,) = wait_for(lambda: down.maildir_new(local, domain), DELIVERY_TIMEOUT, "downstream delivery")
    assert f"using {event['tls'].split()[0]} with cipher".encode() in path.read_bytes()


@pytest.mark.slow
def test_required_route_without_starttls_defers(up: NodeProcess, sink: SmtpSink) -> None:
    """smtp-sink does not offer STARTTLS: a C{required} route defers, sends nothing."""
    before = sink.received()
    sender, _ = relay_through(up, "required.test")
    event = outcome(up, sender)
    assert event["event"] == "deferred", event
    assert event["dsn"].startswith("4."), event
    assert sink.received() == before
    assert not any(sender.encode() in p.read_bytes() for p in sink.dumped())


@pytest.mark.slow
def test_required_route_without_starttls_gives_security_status(up: NodeProcess) -> None:
    sender, _ = relay_through(up, "required.test")
    event = outcome(up, sender)
    assert event["event"] == "deferred"
    assert event["dsn"].startswith("4.7."), event


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["454", "junk"])
def test_opportunistic_never_falls_back_after_starttls_offered(
    up: NodeProcess, traps: dict[str, StartTLSTrap], mode: str
) -> None:
    """
    The next hop offers STARTTLS and then refuses it (454) or botches the
    handshake: the message is deferred; it is not sent in cleartext, on this
    connection or a new one.
    """
    trap = traps[mode]
    domain = {"454": "opp-454.test", "junk": "opp-broken.test"}[mode]
    sender, _ = relay_through(up, domain)
    event = outcome(up, sender)
    assert event["event"] == "deferred", event
    assert trap.sessions >= 1
    assert not any(c.upper().startswith((b"MAIL", b"RCPT", b"DATA")) for c in trap.commands), (
        trap.commands
    )


@pytest.mark.slow
def test_opportunistic_falls_back_only_when_starttls_not_offered(
    up: NodeProcess, down: NodeProcess, sink: SmtpSink
) -> None:
    sender, _ = relay_through(up, "opp-plain.test")
    event = outcome(up, sender)
    assert event["event"] == "sent" and "tls" not in event, event
    wait_for(lambda: any(sender.encode() in p.read_bytes() for p in sink.dumped()),
             DELIVERY_TIMEOUT, "the message at smtp-sink")
    sender, _ = relay_through(up, "opp.test")
    event = outcome(up, sender)
    assert event["event"] == "sent", event
    assert (event.get("tls") or "").startswith("TLSv1."), event
    received = wait_for(
        lambda: events_of(down, event="received", sender=sender), DELIVERY_TIMEOUT, "downstream"
    )
    assert received[0]["protocol"] == "ESMTPS"


@pytest.mark.slow
def test_none_route_never_starts_tls(up: NodeProcess, down: NodeProcess) -> None:
    sender, _ = relay_through(up, "none.test")
    event = outcome(up, sender)
    assert event["event"] == "sent" and "tls" not in event, event
    received = wait_for(
        lambda: events_of(down, event="received", sender=sender), DELIVERY_TIMEOUT, "downstream"
    )
    assert "tls" not in received[0]
    assert received[0]["protocol"] == "ESMTP"
