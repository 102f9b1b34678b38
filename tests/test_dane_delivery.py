"""
DANE (RFC 7672) end to end, the way a user meets it: real C{twistd -n
relaynet} nodes, a zone signed here with ldns (C{ldns-signzone}), served by
NSD and validated by a private Unbound (L{harness.dnssec}).

 - The receiving MX is a relaynet node on 127.0.0.1 with C{[tls] cert/key}
   (a leaf issued by a test CA, the chain in the file), delivering into
   Maildirs; a second MX node has no C{[tls]} (no STARTTLS offered).
 - The sending node has C{[dns] servers} and C{dnssec_resolver} both set to
   the Unbound, C{[mta_sts] enabled = false} (MTA-STS kept out of the
   picture) and C{mx} routes with C{tls = "opportunistic"}: whatever TLS the
   mail gets beyond that is DANE's doing.
 - Each test has its own recipient domain (a name under the signed zone
   C{dane.test}, or a zone of its own) whose MX record names a host at
   127.0.0.1; its TLSA record sits at C{_<mx_port>._tcp.<mx host>}.

Outcomes are read from the sending node's C{events.jsonl} (C{sent} with
its C{tls}, C{deferred} with C{dsn} and C{diagnostic}), from the MX nodes'
C{received} events (the TLS of the session that carried the message) and
from the MX Maildirs.

Everything is started once per module (one NSD, one Unbound, three nodes);
the tests of other C{[dns]} settings (no C{dnssec_resolver}, a resolver that
does not validate or does not answer, a reload) start a sending node of their
own, stopped when the test ends. No test sleeps: every wait polls with a
deadline.
"""

from __future__ import annotations

import datetime
import json
import signal
import smtplib
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.names import dns

from harness.dns import NSDServer, free_dns_port, zone_text
from harness.dnssec import UnboundServer, query, sign_zone, unavailable_reason
from harness.nodeproc import HOST, NodeProcess, single_worker, wait_for
from relaynet.delivery import dane
from relaynet.delivery.dane import TLSARecord

try:
    from test_dane import Issued, make_ca, make_leaf
except ImportError:  # tests/ became a package
    from tests.test_dane import Issued, make_ca, make_leaf  # type: ignore[no-redef]

_MISSING = unavailable_reason()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))]

#: Bound on every wait for an event or a message.
TIMEOUT = 20.0

DAY = datetime.timedelta(days=1)

#: Recipient domains delivered by the MX node with TLS (mx_port = its port).
TLS_DOMAINS = (
    "ok.dane.test", "bad.dane.test", "ta.dane.test", "tawrong.dane.test", "pkix.dane.test",
    "notlsa.dane.test", "tlsabogus.dane.test", "plain.test", "expired.test",
    "rollover.dane.test", "failover.dane.test", "skip.dane.test",
)
#: Recipient domains delivered by the MX node without TLS (their own route and port).
CLEAR_DOMAINS = ("notls.dane.test", "clear.dane.test")

#: Names the MX's certificate carries (for DANE-TA; DANE-EE ignores names).
CERT_NAMES = ["mx.ok.dane.test", "mx.ta.dane.test", "mx.pkix.dane.test"]


# -- the nodes ---------------------------------------------------------------------


def mx_config(domains: tuple[str, ...], tls: bool) -> str:
    """An MX node on 127.0.0.1: C{domains} delivered to Maildirs, STARTTLS iff C{tls}."""
    text = f"""\
[node]
name = "{{name}}"
hostname = "{{name}}.mx.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{{port}}:interface={HOST}"

[local]
domains = {json.dumps(list(domains))}
catch_all = true
"""
    if tls:
        text += '\n[tls]\ncert = "mx.pem"\nkey = "mx.key"\n'
    return text


def sender_config(resolver_port: int, tls_port: int, clear_port: int, dnssec_port: int | None = -1) -> str:
    """
    The sending node: DANE on (its resolver and validating resolver are the
    private Unbound), MTA-STS off, every domain by MX with opportunistic TLS;
    the no-STARTTLS MX's domains through a route of their own to its port.

    @param resolver_port: C{[dns] servers}.
    @param dnssec_port: C{[dns] dnssec_resolver} (C{-1}: C{resolver_port};
        C{None}: not set, DANE off).
    """
    if dnssec_port == -1:
        dnssec_port = resolver_port
    dnssec = "" if dnssec_port is None else f'dnssec_resolver = "{HOST}:{dnssec_port}"\n'
    return f"""\
[node]
name = "{{name}}"
hostname = "{{name}}.sender.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{{port}}:interface={HOST}"

[local]
domains = ["src.test"]
catch_all = true

[queue]
# One attempt per test: a deferred message is not retried while the module runs.
minimal_backoff = 600
maximal_backoff = 1200

[outbound]
connect_timeout = 5

[dns]
servers = ["{HOST}:{resolver_port}"]
{dnssec}
[mta_sts]
enabled = false

[[route]]
domains = {json.dumps(list(CLEAR_DOMAINS))}
action = "mx"
mx_port = {clear_port}
tls = "opportunistic"

[[route]]
domains = ["*"]
action = "mx"
mx_port = {tls_port}
tls = "opportunistic"
"""


def write_key_and_chain(directory: Path, leaf: Issued, ca: Issued) -> None:
    """C{mx.pem} (the leaf, then the CA: the chain a DANE-TA client needs) and C{mx.key}."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mx.pem").write_bytes(leaf.pem + ca.pem)
    key = leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    )
    (directory / "mx.key").write_bytes(key)
    (directory / "mx.key").chmod(0o600)


# -- the zones ---------------------------------------------------------------------


def tlsa(cert: Issued, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:
    return TLSARecord.for_certificate(cert.der, usage, selector, mtype).to_text()


def delegate(parent_label: str, child: Any) -> list[str]:
    """Records in C{dane.test} delegating the signed child zone C{child} (its NS, glue, DS)."""
    return [f"{parent_label} NS ns.{parent_label}", f"ns.{parent_label} A {HOST}", child.ds]


def build_zones(base: Path, certs: dict[str, Issued], tls_port: int, clear_port: int) -> tuple[dict[str, str], list[str]]:
    """
    The zones NSD serves and the trust anchors Unbound gets.

    C{dane.test} (signed, trusted) holds one recipient domain per case, each
    with its own MX host at 127.0.0.1; C{_tcp.mx.tlsabogus.dane.test} is a
    signed child with expired signatures (only that host's TLSA RRset is
    bogus); C{expired.test} is signed with expired signatures throughout
    (bogus); C{plain.test} is not signed (insecure).
    """
    mx, stranger, ca = certs["mx"], certs["stranger"], certs["ca"]

    def host(label: str, port: int, *records: str) -> list[str]:
        out = [f"{label} MX 10 mx.{label}", f"mx.{label} A {HOST}"]
        return out + [f"_{port}._tcp.mx.{label} TLSA {r}" for r in records]

    child = sign_zone(base, "_tcp.mx.tlsabogus.dane.test", zone_text("_tcp.mx.tlsabogus.dane.test", [
        f"_{tls_port} TLSA {tlsa(mx)}",
    ]), inception="20200101", expiration="20200201")
    secure = sign_zone(base, "dane.test", zone_text("dane.test", [
        *host("ok", tls_port, tlsa(mx)),
        *host("bad", tls_port, tlsa(stranger)),
        *host("ta", tls_port, tlsa(ca, 2, 0, 1)),
        *host("tawrong", tls_port, tlsa(ca, 2, 0, 1)),
        *host("pkix", tls_port, tlsa(mx, 1, 1, 1), tlsa(ca, 0, 0, 1)),
        *host("notlsa", tls_port),
        *host("notls", clear_port, tlsa(mx)),
        *host("clear", clear_port),
        *host("tlsabogus", tls_port),
        *delegate("_tcp.mx.tlsabogus", child),
        # A key rollover: the old key's record and the current one.
        *host("rollover", tls_port, tlsa(stranger), tlsa(mx)),
        # Two exchangers: the preferred one's record does not match, the other's does.
        "failover MX 10 mx1.failover", "failover MX 20 mx2.failover",
        f"mx1.failover A {HOST}", f"mx2.failover A {HOST}",
        f"_{tls_port}._tcp.mx1.failover TLSA {tlsa(stranger)}", f"_{tls_port}._tcp.mx2.failover TLSA {tlsa(mx)}",
        # Two exchangers: the preferred one's TLSA RRset is bogus, the other is ok.dane.test's.
        "skip MX 10 mx.tlsabogus", "skip MX 20 mx.ok",
    ]))
    expired = sign_zone(base, "expired.test", zone_text("expired.test", [
        "@ MX 10 mx", f"mx A {HOST}", f"_{tls_port}._tcp.mx TLSA {tlsa(mx)}",
    ]), inception="20200101", expiration="20200201")
    # The same shape as bad.dane.test (a record of another key), but unsigned.
    plain = zone_text("plain.test", ["@ MX 10 mx", f"mx A {HOST}", f"_{tls_port}._tcp.mx TLSA {tlsa(stranger)}"])
    zones = {"dane.test": secure.text, "_tcp.mx.tlsabogus.dane.test": child.text,
             "expired.test": expired.text, "plain.test": plain}
    return zones, [secure.ds, expired.ds]


# -- the module's lab -----------------------------------------------------------------


@attrs.define
class Lab:
    nsd: NSDServer
    unbound: UnboundServer
    mx: NodeProcess
    clear_mx: NodeProcess
    sender: NodeProcess
    certs: dict[str, Issued]
    base: Path

    def events(self, node: NodeProcess, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in node.events()
            if (event is None or e["event"] == event) and all(e.get(k) == v for k, v in match.items())
        ]

    def describe(self, sender: NodeProcess | None = None) -> str:
        parts = []
        for node in (sender or self.sender, self.mx, self.clear_mx):
            parts.append(f"--- {node._name} events:\n" + "\n".join(json.dumps(e) for e in node.events()[-15:]))
            parts.append(f"--- {node._name} log:\n{node.log_tail(20)}")
        parts.append(self.unbound.log_tail(15))
        return "\n".join(parts)

    def outcome(self, rcpt: str, sender: NodeProcess | None = None) -> dict[str, Any]:
        """The sending node's one delivery event for C{rcpt} (sent, deferred or bounced), polled."""
        node = sender or self.sender

        def final() -> list[dict[str, Any]]:
            return [e for e in self.events(node, recipient=rcpt)
                    if e["event"] in ("sent", "deferred", "bounced", "expired")]
        try:
            (event,) = wait_for(final, TIMEOUT, f"a delivery event for {rcpt}")
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"{e}\n{self.describe(node)}") from None
        return event

    def mailbox(self, node: NodeProcess, rcpt: str) -> list[Path]:
        user, _, domain = rcpt.partition("@")
        return node.maildir_new(user, domain)

    def received_at(self, node: NodeProcess, rcpt: str) -> list[dict[str, Any]]:
        """The MX node's C{received} events with C{rcpt} among the recipients."""
        return [e for e in self.events(node, "received") if rcpt in (e.get("recipients") or ())]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("danedelivery")
    now = datetime.datetime.now(datetime.UTC)
    ca = make_ca("DANE Delivery Test CA", not_before=now - DAY, not_after=now + 30 * DAY)
    certs = {
        "ca": ca,
        "mx": make_leaf(CERT_NAMES, issuer=ca, not_before=now - DAY, not_after=now + 30 * DAY),
        "stranger": make_leaf(["mx.bad.dane.test"], not_before=now - DAY, not_after=now + 30 * DAY),
    }
    started: list[Any] = []
    try:
        # The MX nodes first: their ports go into the TLSA owner names.
        write_key_and_chain(base / "mx", certs["mx"], ca)
        mx = NodeProcess(base / "mx", config_toml=mx_config(TLS_DOMAINS, tls=True), name="mx")
        started.append(mx)
        mx.start()
        clear_mx = NodeProcess(base / "clear-mx", config_toml=mx_config(CLEAR_DOMAINS, tls=False), name="clearmx")
        started.append(clear_mx)
        clear_mx.start()
        zones, anchors = build_zones(base / "zones", certs, mx.port, clear_mx.port)
        nsd = NSDServer(base / "nsd", zones)
        started.append(nsd)
        nsd.start()
        stubs = {origin: nsd.port for origin in ("dane.test", "expired.test", "plain.test")}
        unbound = UnboundServer(base / "unbound", stubs, anchors, probe="dane.test")
        started.append(unbound)
        unbound.start()
        sender = NodeProcess(base / "sender", config_toml=sender_config(unbound.port, mx.port, clear_mx.port),
                             name="sender")
        started.append(sender)
        sender.start()
        yield Lab(nsd, unbound, mx, clear_mx, sender, certs, base)
    finally:
        for proc in reversed(started):
            if isinstance(proc, NodeProcess):
                proc.__exit__(None, None, None)
            else:
                proc.stop()


@pytest.fixture
def other_sender(lab: Lab) -> Iterator[Any]:
    """
    Starts a sending node with another C{[dns]} (same routes as the main
    one) for one test: C{other_sender(name, servers_port, dnssec_port)};
    stopped at the end of the test.
    """
    nodes: list[NodeProcess] = []

    def start(name: str, resolver_port: int, dnssec_port: int | None) -> NodeProcess:
        node = NodeProcess(
            lab.base / name, name=name,
            config_toml=sender_config(resolver_port, lab.mx.port, lab.clear_mx.port, dnssec_port),
        )
        nodes.append(node)
        return node.start()

    try:
        yield start
    finally:
        for node in nodes:
            node.__exit__(None, None, None)


def send(lab: Lab, rcpt: str, sender: NodeProcess | None = None) -> str:
    """One message from s@src.test to C{rcpt} through the sending node; @return: its Message-ID."""
    tok = uuid.uuid4().hex[:16]
    mid = f"<{tok}@client.test>"
    msg = (
        f"From: <s@src.test>\r\nTo: <{rcpt}>\r\nSubject: dane {tok}\r\n"
        f"Message-ID: {mid}\r\nDate: {formatdate(localtime=True)}\r\n\r\nDANE test {tok}\r\n"
    ).encode()
    with smtplib.SMTP(HOST, (sender or lab.sender).port, local_hostname="client.test", timeout=30) as s:
        code, resp = s.ehlo()
        assert code == 250, resp
        s.mail("s@src.test")
        code, resp = s.rcpt(rcpt)
        assert code == 250, (code, resp)
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
    return mid


def assert_delivered(lab: Lab, node: NodeProcess, rcpt: str, mid: str) -> dict[str, Any]:
    """C{rcpt}'s message is in C{node}'s Maildir; @return: the MX's received event for it."""
    try:
        (path,) = wait_for(lambda: lab.mailbox(node, rcpt), TIMEOUT, f"{rcpt}'s message at the MX")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{lab.describe()}") from None
    assert mid.encode() in path.read_bytes()
    (received,) = lab.received_at(node, rcpt)
    return received


def assert_not_delivered(lab: Lab, node: NodeProcess, rcpt: str) -> None:
    """
    Nothing for C{rcpt} reached C{node}: no transaction (no C{received}
    event), no message. Checked after the sender's deferral, which comes
    only once its session with the MX has ended.
    """
    assert lab.mailbox(node, rcpt) == [], lab.describe()
    assert lab.received_at(node, rcpt) == [], lab.describe()


def secure_tlsa(lab: Lab, name: str) -> dns.Message:
    answer = query(lab.unbound.port, name, dane.TLSA)
    assert answer is not None and answer.rCode == dns.OK and answer.answers, answer
    return answer


# -- the cases ----------------------------------------------------------------------


def test_matching_dane_ee_record_delivers_over_authenticated_tls(lab: Lab) -> None:
    """
    ok.dane.test publishes TLSA 3 1 1 of the MX's key in a signed zone: the
    message is delivered, the sent event's tls says DANE, and the MX received
    it under TLS.
    """
    assert secure_tlsa(lab, f"_{lab.mx.port}._tcp.mx.ok.dane.test").authenticData
    rcpt = "user@ok.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["relay"] == f"mx.ok.dane.test[{HOST}]:{lab.mx.port}", event
    assert event["tls"].startswith("TLSv1.") and event["tls"].endswith("(DANE)"), event
    received = assert_delivered(lab, lab.mx, rcpt, mid)
    assert received["tls"], received
    assert received["protocol"].startswith("ESMTPS"), received


#: A secure TLSA RRset the MX's certificate does not satisfy: (domain, what the diagnostic must say).
FAILED_MATCHES = [
    # TLSA 3 1 1 of another key.
    pytest.param("bad.dane.test", "TLSA 3 1 1 did not match the certificate of mx.bad.dane.test", id="dane-ee"),
    # TLSA 2 0 1 of the CA that issued the MX's certificate, which does not name mx.tawrong.dane.test.
    pytest.param("tawrong.dane.test", "does not name mx.tawrong.dane.test", id="dane-ta-name"),
]

@pytest.mark.parametrize("domain, reason", FAILED_MATCHES)
def test_failed_match_defers_and_sends_nothing(lab: Lab, domain: str, reason: str) -> None:
    """
    The domain's secure TLSA records do not match the MX's certificate: the
    handshake is aborted and the message deferred with 4.7.5 (RFC 7672 2.2,
    RFC 3463) and a diagnostic naming DANE and the failed record; it reaches
    the MX neither in clear text nor over the unauthenticated TLS session
    (no transaction at the MX, its Maildir empty).
    """
    port = lab.mx.port
    assert secure_tlsa(lab, f"_{port}._tcp.mx.{domain}").authenticData
    rcpt = f"never@{domain}"
    send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, rcpt)
    assert event["relay"] == f"mx.{domain}[{HOST}]:{port}", event
    assert event["dsn"] == "4.7.5", event
    assert "DANE" in event["diagnostic"] and reason in event["diagnostic"], event


def test_no_starttls_under_dane_defers(lab: Lab) -> None:
    """
    notls.dane.test has a secure TLSA record but its MX offers no STARTTLS:
    deferred 4.7.5, naming DANE; clear.dane.test, the same MX without a
    TLSA record, gets its mail in clear text (the route is opportunistic:
    the refusal is DANE's).
    """
    rcpt = "user@notls.dane.test"
    send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.clear_mx, rcpt)
    assert event["dsn"] == "4.7.5", event
    assert "DANE requires TLS" in event["diagnostic"] and "did not offer STARTTLS" in event["diagnostic"], event

    control = "user@clear.dane.test"
    mid = send(lab, control)
    sent = lab.outcome(control)
    assert sent["event"] == "sent" and sent.get("tls") is None, sent
    received = assert_delivered(lab, lab.clear_mx, control, mid)
    assert not received.get("tls"), received


def test_insecure_zone_ignores_its_tlsa_records(lab: Lab) -> None:
    """
    plain.test is not signed; it publishes the same kind of non-matching
    record as bad.dane.test, but Unbound gives it without the AD bit: no
    DANE, the message goes out with the route's opportunistic TLS.
    """
    answer = query(lab.unbound.port, f"_{lab.mx.port}._tcp.mx.plain.test", dane.TLSA)
    assert answer is not None and answer.rCode == dns.OK and answer.answers and not answer.authenticData, answer
    rcpt = "user@plain.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["tls"] and "DANE" not in event["tls"], event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_bogus_zone_defers(lab: Lab) -> None:
    """
    expired.test is signed, its signatures expired in 2020: Unbound finds it
    bogus (SERVFAIL for every name). Deferred, nothing reaches the MX.
    """
    answer = query(lab.unbound.port, "expired.test", dns.MX)
    assert answer is not None and answer.rCode == dns.ESERVER, answer
    rcpt = "user@expired.test"
    send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, rcpt)
    # The MX lookup itself goes through the same validating resolver (the
    # node's [dns] servers) and fails first: a DNS failure, 4.4.3, as
    # Postfix defers a SERVFAIL. DANE's own check is not reached.
    assert event["dsn"] == "4.4.3", event
    assert "type=MX" in event["diagnostic"] and "server failure" in event["diagnostic"], event


def test_bogus_tlsa_rrset_defers(lab: Lab) -> None:
    """
    tlsabogus.dane.test: the MX and its address are secure, but the TLSA
    RRset is in a child zone with expired signatures: the host is skipped,
    deferred 4.7.5 (never clear text, never TLS without DANE).
    """
    name = f"_{lab.mx.port}._tcp.mx.tlsabogus.dane.test"
    answer = query(lab.unbound.port, name, dane.TLSA)
    assert answer is not None and answer.rCode == dns.ESERVER, answer
    rcpt = "user@tlsabogus.dane.test"
    send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, rcpt)
    assert event["dsn"] == "4.7.5", event
    assert f"TLSA lookup for {name} failed" in event["diagnostic"], event


def test_dane_ta_with_the_mx_name_delivers(lab: Lab) -> None:
    """
    ta.dane.test: TLSA 2 0 1 of the test CA; the MX sends its leaf (naming
    mx.ta.dane.test) and the CA: delivered, DANE.
    """
    rcpt = "user@ta.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["tls"].endswith("(DANE)"), event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_only_unusable_records_deliver_over_unauthenticated_tls(lab: Lab) -> None:
    """
    pkix.dane.test publishes only PKIX-EE and PKIX-TA records (unusable for
    SMTP, RFC 7672 3.1.3): TLS is still required, not authenticated;
    delivered, and the event says so.
    """
    rcpt = "user@pkix.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["tls"].endswith("(DANE, TLSA unusable)"), event
    received = assert_delivered(lab, lab.mx, rcpt, mid)
    assert received["tls"], received


def test_secure_zone_without_tlsa_uses_the_route_policy(lab: Lab) -> None:
    """
    notlsa.dane.test is signed but publishes no TLSA record (secure
    NXDOMAIN): no DANE, delivered with the route's opportunistic TLS.
    """
    answer = query(lab.unbound.port, f"_{lab.mx.port}._tcp.mx.notlsa.dane.test", dane.TLSA)
    assert answer is not None and answer.rCode == dns.ENAME and answer.authenticData, answer
    rcpt = "user@notlsa.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["tls"] and "DANE" not in event["tls"], event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_any_matching_record_of_a_rollover_delivers(lab: Lab) -> None:
    """rollover.dane.test publishes an old key's record and the current one's: delivered, DANE."""
    assert len(secure_tlsa(lab, f"_{lab.mx.port}._tcp.mx.rollover.dane.test").answers) == 2
    rcpt = "user@rollover.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["tls"].endswith("(DANE)"), event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_next_exchanger_after_a_failed_match(lab: Lab) -> None:
    """
    failover.dane.test: the preferred exchanger's certificate fails its TLSA
    record, the next one's matches: the message goes to the second, over
    DANE, and the event lists the first as tried (deferred).
    """
    rcpt = "user@failover.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["relay"] == f"mx2.failover.dane.test[{HOST}]:{lab.mx.port}", event
    assert event["tls"].endswith("(DANE)"), event
    (tried,) = event["tried"]
    assert tried["relay"] == f"mx1.failover.dane.test[{HOST}]:{lab.mx.port}", event
    assert tried["dsn"] == "4.7.5", event
    assert "TLSA 3 1 1 did not match the certificate of mx1.failover.dane.test" in tried["diagnostic"], event
    # One transaction at the MX: the first session ended in the handshake.
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_exchanger_with_bogus_tlsa_is_skipped(lab: Lab) -> None:
    """
    skip.dane.test: the preferred exchanger (mx.tlsabogus.dane.test) has a
    bogus TLSA RRset, so it is not connected to at all; the next one
    (mx.ok.dane.test) gets the message over DANE, and the event says why the
    first was skipped (4.7.5).
    """
    rcpt = "user@skip.dane.test"
    mid = send(lab, rcpt)
    event = lab.outcome(rcpt)
    assert event["event"] == "sent", event
    assert event["relay"] == f"mx.ok.dane.test[{HOST}]:{lab.mx.port}", event
    assert event["tls"].endswith("(DANE)"), event
    (tried,) = event["tried"]
    assert tried["relay"] == f"mx.tlsabogus.dane.test[{HOST}]:{lab.mx.port}", event
    assert tried["dsn"] == "4.7.5", event
    assert "TLSA lookup for" in tried["diagnostic"] and "failed" in tried["diagnostic"], event
    assert_delivered(lab, lab.mx, rcpt, mid)


# -- other resolver settings of the sending node --------------------------------------


def test_without_dnssec_resolver_dane_is_off(lab: Lab, other_sender: Any) -> None:
    """
    A sender without C{[dns] dnssec_resolver} (its DNS the same validating
    Unbound): DANE is off, bad.dane.test's non-matching record is not
    looked at, the message goes out with opportunistic TLS.
    """
    node = other_sender("nodane", lab.unbound.port, None)
    rcpt = "nodane@bad.dane.test"
    mid = send(lab, rcpt, node)
    event = lab.outcome(rcpt, node)
    assert event["event"] == "sent", event
    assert event["tls"] and "DANE" not in event["tls"], event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_resolver_that_does_not_validate_gives_no_dane(lab: Lab, other_sender: Any) -> None:
    """
    C{dnssec_resolver} pointed at NSD (authoritative, it never sets AD): the
    signed records come without AD, so they are not trusted; no DANE,
    bad.dane.test's mail goes out with opportunistic TLS.
    """
    answer = query(lab.nsd.port, f"_{lab.mx.port}._tcp.mx.bad.dane.test", dane.TLSA, recursion=False)
    assert answer is not None and answer.answers and not answer.authenticData, answer
    node = other_sender("nsdasvalidator", lab.unbound.port, lab.nsd.port)
    rcpt = "nonvalidating@bad.dane.test"
    mid = send(lab, rcpt, node)
    event = lab.outcome(rcpt, node)
    assert event["event"] == "sent", event
    assert event["tls"] and "DANE" not in event["tls"], event
    assert_delivered(lab, lab.mx, rcpt, mid)


def test_bogus_mx_rrset_seen_by_dane_defers_4_7_5(lab: Lab, other_sender: Any) -> None:
    """
    The sender's plain DNS is NSD (no validation: expired.test's MX is
    found) and its validating resolver is Unbound: DANE finds the MX RRset
    bogus and the domain is deferred 4.7.5 without a connection.
    """
    node = other_sender("plaindns", lab.nsd.port, lab.unbound.port)
    rcpt = "plaindns@expired.test"
    send(lab, rcpt, node)
    event = lab.outcome(rcpt, node)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, rcpt)
    assert event["dsn"] == "4.7.5", event
    assert "the MX lookup for expired.test could not be DNSSEC-validated" in event["diagnostic"], event


def test_validating_resolver_down_defers(lab: Lab, other_sender: Any) -> None:
    """
    C{dnssec_resolver} names a loopback port where nothing answers: the
    DNSSEC lookups fail, ok.dane.test's mail is deferred 4.7.5, not sent
    without DANE.
    """
    dead = free_dns_port()
    node = other_sender("deadvalidator", lab.unbound.port, dead)
    rcpt = "deadvalidator@ok.dane.test"
    send(lab, rcpt, node)
    event = lab.outcome(rcpt, node)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, rcpt)
    assert event["dsn"] == "4.7.5", event
    assert f"no answer from the resolver {HOST}:{dead}" in event["diagnostic"], event


def test_reload_turns_dane_on(lab: Lab, other_sender: Any) -> None:
    """
    A sender started without C{dnssec_resolver} delivers to bad.dane.test
    (no DANE); its configuration gains C{dnssec_resolver} and it is sent
    SIGHUP: the next message to bad.dane.test is deferred and never reaches
    the MX, although a connection to that MX made without DANE may still be
    idle in the connection cache.
    """
    node = other_sender("reloading", lab.unbound.port, None)
    before = "before-reload@bad.dane.test"
    mid = send(lab, before, node)
    assert lab.outcome(before, node)["event"] == "sent"
    assert_delivered(lab, lab.mx, before, mid)

    assert node.config_path is not None
    text = sender_config(lab.unbound.port, lab.mx.port, lab.clear_mx.port, lab.unbound.port)
    node.config_path.write_text(
        single_worker(text.replace("{port}", str(node.port)).replace("{name}", "reloading")), encoding="utf-8",
    )
    node.signal(signal.SIGHUP)
    (reload,) = wait_for(lambda: lab.events(node, "reload"), TIMEOUT, "the reload event")
    assert reload["status"] == "reloaded", reload

    after = "after-reload@bad.dane.test"
    send(lab, after, node)
    event = lab.outcome(after, node)
    assert event["event"] == "deferred", event
    assert_not_delivered(lab, lab.mx, after)
