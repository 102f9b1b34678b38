"""
Client-side SMTP AUTH toward a smarthost (issue 12 item 3): a relay or mx
route with C{auth_file} authenticates after EHLO (and after STARTTLS and the
second EHLO) with PLAIN (RFC 4616) if offered, else LOGIN (RFC 4954).

In memory (a L{HopPool} on a L{MemoryReactorClock}, the test playing the
server line by line on a L{Wire}): the mechanism chosen, no credentials
outside TLS unless the route allows cleartext, a refused AUTH defers (never
bounces) with a C{SASL authentication failed} diagnostic and an
C{auth_failed} event, and the pool opens no new connection to the hop during
its penalty; the password appears in no event, log or result.

Real processes (C{slow}):
 - relaynet node A, with a C{tls = "verify"} route and C{auth_file}, to
   relaynet node B's submission listener (STARTTLS, AUTH from a password
   file): delivered; with a wrong password, deferred with B's 535;
 - relaynet node A to a private Postfix instance whose AUTH is Cyrus SASL
   (an independent SASL server: C{smtpd_sasl_type = cyrus}, a private sasldb
   made by C{saslpasswd2}, PLAIN and LOGIN over STARTTLS, relaying only for
   authenticated clients): delivered into Postfix's Maildir, Postfix's log
   names the SASL user; a wrong password is refused by Cyrus (535) and the
   message is deferred.
"""

from __future__ import annotations

import base64
import inspect
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

import relaynet.runner
from harness.nodeproc import HOST, NodeProcess, wait_for
from harness.peers import PostfixInstance, allow_postfix_search, free_port, postfix_unavailable_reason
from relaynet.config import Outbound
from relaynet.delivery.attempt import IOutbound
from relaynet.delivery.client import DeliveryResult, HopPool, OutboundManager, credentials_id
from relaynet.intake.auth import hash_password
from relaynet.smtp.tls import generate_ca, generate_cert
from relaynet.testing import make_queue_entry

from test_outbound import ALL, GREETING, MESSAGE, SENDER, TIMEOUTS, Outcome, Wire, ehlo

USER = "smart@relay.test"
PASSWORD = "s3cret-Horse-battery"
WRONG = "not-the-password"
ENDPOINT = "tcp:mx.test:25"
HOP = "mx.test:25"
PENALTY = 120.0


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


class Events:
    """Records what a pool emits (an L{relaynet.events.EventLog} stand-in)."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, **fields: Any) -> None:
        self.emitted.append((name, fields))


class AuthHop:
    """A L{HopPool} with credentials for C{mx.test:25}, and its connections."""

    def __init__(
        self, tmp_path: Path, tls: str = "required", cleartext: bool = False,
        auth: tuple[str, str] | None = (USER, PASSWORD), concurrency: int = 20,
    ) -> None:
        self.source = tmp_path / "source"
        self.reactor = MemoryReactorClock()
        self.events = Events()
        self.pool = HopPool(
            ENDPOINT, self.reactor, Outbound(**TIMEOUTS), "client.test", concurrency,
            tls_policy=tls, auth=auth, auth_cleartext=cleartext, auth_penalty=PENALTY,
            events=self.events,
        )
        self.written: list[bytes] = []
        self.wires: list[Wire] = []

    def submit(self, *recipients: str) -> Outcome:
        entry = make_queue_entry(self.source, MESSAGE, SENDER, recipients or ("rcpt@example.net",))
        out = Outcome()
        self.pool.submit(entry, list(entry.envelope.recipients)).addCallbacks(out.done, out.failed)
        return out

    @property
    def connects(self) -> int:
        return len(self.reactor.tcpClients)

    def wire(self, index: int = -1) -> Wire:
        factory = self.reactor.tcpClients[index][2]
        wire = Wire(self.reactor, factory.buildProtocol(IPv4Address("TCP", "192.0.2.25", 25)))
        self.wires.append(wire)
        return wire

    def say(self, wire: Wire, data: bytes) -> bytes:
        """The server sends C{data}; what the client wrote back."""
        sent = wire.reply(data)
        self.written.append(sent)
        return sent

    def to_auth(self, wire: Wire, offered: bytes = b"AUTH PLAIN LOGIN") -> bytes:
        """Greeting, EHLO with STARTTLS, TLS, EHLO offering C{offered}: the AUTH line."""
        assert self.say(wire, GREETING) == b"EHLO client.test\r\n"
        assert self.say(wire, ehlo(*ALL, b"STARTTLS")) == b"STARTTLS\r\n"
        assert self.say(wire, b"220 2.0.0 Ready to start TLS\r\n") == b"EHLO client.test\r\n"
        return self.say(wire, ehlo(*ALL, offered))


def finish_transaction(hop: AuthHop, wire: Wire, sent: bytes) -> None:
    """After AUTH: the pipelined transaction goes out; accept it."""
    assert sent.startswith(b"MAIL FROM:<sender@example.org>"), sent
    assert b"RCPT TO:<rcpt@example.net>" in sent and sent.endswith(b"DATA\r\n")
    hop.say(wire, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    hop.say(wire, b"250 2.0.0 Ok: queued as X1\r\n")


def only(out: Outcome) -> DeliveryResult:
    assert out.results is not None and len(out.results) == 1, out
    return out.results[0]


# -- mechanisms ---------------------------------------------------------------


def test_plain_is_preferred_and_sent_inside_tls(tmp_path: Path) -> None:
    """
    Offered PLAIN and LOGIN after STARTTLS, the client sends C{AUTH PLAIN}
    with the RFC 4616 initial response (empty authzid, user, password), and
    on 235 sends the message.
    """
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    sent = hop.to_auth(wire, b"AUTH LOGIN PLAIN")
    assert sent.startswith(b"AUTH PLAIN ")
    assert base64.b64decode(sent.split()[2]) == f"\0{USER}\0{PASSWORD}".encode()
    finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Authentication successful\r\n"))
    assert only(out).ok and not only(out).auth_failed
    assert hop.events.emitted == []


def test_login_when_plain_is_not_offered(tmp_path: Path) -> None:
    """Without PLAIN: C{AUTH LOGIN}, the user name and the password, each base64."""
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    assert hop.to_auth(wire, b"AUTH LOGIN CRAM-MD5") == b"AUTH LOGIN\r\n"
    assert hop.say(wire, b"334 VXNlcm5hbWU6\r\n") == b64(USER) + b"\r\n"
    assert hop.say(wire, b"334 UGFzc3dvcmQ6\r\n") == b64(PASSWORD) + b"\r\n"
    finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Authentication successful\r\n"))
    assert only(out).ok


def test_plain_without_initial_response_and_old_auth_form(tmp_path: Path) -> None:
    """
    A server offering only the old C{AUTH=PLAIN} keyword that answers the
    initial response with an empty 334 gets the credentials again; a further
    challenge is cancelled with C{*} and the mail deferred.
    """
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    assert hop.to_auth(wire, b"AUTH=PLAIN").startswith(b"AUTH PLAIN ")
    assert hop.say(wire, b"334 \r\n") == b64(f"\0{USER}\0{PASSWORD}") + b"\r\n"
    assert hop.say(wire, b"334 bW9yZT8=\r\n") == b"*\r\n"
    assert hop.say(wire, b"501 5.7.0 cancelled\r\n") == b"QUIT\r\n"
    res = only(out)
    assert res.auth_failed and res.enhanced == "4.7.0" and not res.permanent
    assert "unexpected challenge" in res.diagnostic


def test_without_credentials_no_auth_is_sent(tmp_path: Path) -> None:
    """A route without credentials never says AUTH, even when it is offered."""
    hop = AuthHop(tmp_path, auth=None)
    out = hop.submit()
    wire = hop.wire()
    finish_transaction(hop, wire, hop.to_auth(wire))
    assert only(out).ok


# -- no credentials outside TLS -------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_no_auth_without_tls(tmp_path: Path, tls: str) -> None:
    """
    A hop that offers AUTH but no STARTTLS gets no credentials: the message
    is deferred with 4.7.0 and a diagnostic that says why, the session ends
    with QUIT, and nothing of the credentials was written.
    """
    hop = AuthHop(tmp_path, tls=tls)
    out = hop.submit()
    wire = hop.wire()
    assert hop.say(wire, GREETING) == b"EHLO client.test\r\n"
    assert hop.say(wire, ehlo(*ALL, b"AUTH PLAIN LOGIN")) == b"QUIT\r\n"
    res = only(out)
    assert (res.code, res.enhanced, res.auth_failed) == (0, "4.7.0", True)
    assert "offered no STARTTLS" in res.diagnostic and "auth_cleartext" in res.diagnostic
    written = b"".join(hop.written)
    assert b"AUTH" not in written and b64(PASSWORD) not in written and PASSWORD.encode() not in written


def test_tls_none_route_with_credentials_asks_for_starttls(tmp_path: Path) -> None:
    """With credentials, a route with C{tls = "none"} still uses STARTTLS when offered."""
    hop = AuthHop(tmp_path, tls="none")
    out = hop.submit()
    wire = hop.wire()
    assert hop.to_auth(wire).startswith(b"AUTH PLAIN ")
    finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Ok\r\n"))
    assert only(out).ok


def test_required_tls_not_offered(tmp_path: Path) -> None:
    """C{tls = "required"}: a hop without STARTTLS is deferred (4.7.4) before any AUTH."""
    hop = AuthHop(tmp_path, tls="required")
    out = hop.submit()
    wire = hop.wire()
    hop.say(wire, GREETING)
    hop.say(wire, ehlo(*ALL, b"AUTH PLAIN"))
    hop.reactor.advance(0)
    wire.transport.connection_lost()
    res = only(out)
    assert res.enhanced == "4.7.4" and "TLS is required" in res.diagnostic
    assert b"AUTH" not in b"".join(hop.written)


def test_cleartext_allowed_by_the_route(tmp_path: Path) -> None:
    """C{auth_cleartext = true} (loopback, tests): AUTH without TLS."""
    hop = AuthHop(tmp_path, tls="none", cleartext=True)
    out = hop.submit()
    wire = hop.wire()
    assert hop.say(wire, GREETING) == b"EHLO client.test\r\n"
    sent = hop.say(wire, ehlo(*ALL, b"AUTH PLAIN LOGIN"))
    assert sent == b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}") + b"\r\n"
    finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Ok\r\n"))
    assert only(out).ok


@pytest.mark.parametrize("offered, why", [
    (None, "offered no AUTH"),
    (b"AUTH CRAM-MD5 DIGEST-MD5", "no mechanism available (offered: CRAM-MD5 DIGEST-MD5"),
])
def test_hop_without_usable_auth_defers(tmp_path: Path, offered: bytes | None, why: str) -> None:
    """A hop that offers no AUTH, or only mechanisms we do not use, defers 4.7.0 (no MAIL)."""
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    assert hop.say(wire, GREETING) == b"EHLO client.test\r\n"
    assert hop.say(wire, ehlo(*ALL, b"STARTTLS")) == b"STARTTLS\r\n"
    hop.say(wire, b"220 2.0.0 Ready\r\n")
    assert hop.say(wire, ehlo(*ALL, *([offered] if offered else []))) == b"QUIT\r\n"
    res = only(out)
    assert res.auth_failed and res.enhanced == "4.7.0" and why in res.diagnostic
    assert res.diagnostic.startswith("SASL authentication failed")
    assert b"MAIL" not in b"".join(hop.written)


def test_refused_ehlo_does_not_fall_back_to_helo(tmp_path: Path) -> None:
    """With credentials there is no HELO fallback (HELO has no AUTH): deferred."""
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    hop.say(wire, GREETING)
    assert not hop.say(wire, b"502 5.5.2 EHLO not implemented\r\n").startswith(b"HELO")
    hop.reactor.advance(0)
    wire.transport.connection_lost()
    res = only(out)
    assert not res.ok and not res.permanent


# -- refused credentials: deferred, and a penalty for the hop -------------------


@pytest.mark.parametrize("reply, enhanced", [
    (b"535 5.7.8 Error: authentication failed: authentication failure", "4.7.8"),
    (b"535 Authentication credentials invalid", "4.0.0"),
    (b"454 4.7.0 Temporary authentication failure", "4.7.0"),
])
def test_refused_auth_defers_and_the_hop_is_not_hammered(tmp_path: Path, reply: bytes, enhanced: str) -> None:
    """
    535 (or a 4xx) to AUTH: the message is deferred, never bounced, with
    "SASL authentication failed; server mx.test:25 said: 535 ..."; an
    C{auth_failed} event names the hop and user (no password); the session
    QUITs. During the penalty no new connection is attempted: jobs are
    deferred at once with the same diagnostic. After it, a job connects
    again.
    """
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    hop.to_auth(wire)
    assert hop.say(wire, reply + b"\r\n") == b"QUIT\r\n"
    res = only(out)
    code = int(reply[:3])
    assert res.code == 0 and not res.permanent and res.auth_failed
    assert res.enhanced == enhanced
    assert res.diagnostic == f"SASL authentication failed; server {HOP} said: {reply.decode()}"
    assert code in (535, 454)
    [(name, fields)] = hop.events.emitted
    assert name == "auth_failed"
    assert fields["relay"] == HOP and fields["auth_user"] == USER and fields["dsn"] == enhanced
    assert fields["diagnostic"] == res.diagnostic and fields["retry_after"] == PENALTY
    assert hop.connects == 1

    hop.reactor.advance(PENALTY - 1)
    later = [hop.submit(f"r{i}@example.net") for i in range(3)]
    hop.reactor.advance(0)
    assert hop.connects == 1, "no new connection during the penalty"
    for o in later:
        r = only(o)
        assert r.auth_failed and r.diagnostic == res.diagnostic and not r.permanent

    hop.reactor.advance(1)
    after = hop.submit()
    assert hop.connects == 2 and not after.fired
    wire2 = hop.wire()
    hop.to_auth(wire2)
    finish_transaction(hop, wire2, hop.say(wire2, b"235 2.7.0 Ok\r\n"))
    assert only(after).ok
    assert len(hop.events.emitted) == 1


def test_concurrent_connections_stop_at_the_first_refusal(tmp_path: Path) -> None:
    """
    Two connections set up at once: when the first one's AUTH is refused,
    the second does not send its credentials (it QUITs after EHLO), so the
    hop sees one failed login, not one per connection.
    """
    hop = AuthHop(tmp_path)
    outs = [hop.submit(f"r{i}@example.net") for i in range(2)]
    assert hop.connects == 2
    first, second = hop.wire(0), hop.wire(1)
    for w in (first, second):
        hop.say(w, GREETING)
        hop.say(w, ehlo(*ALL, b"STARTTLS"))
        hop.say(w, b"220 2.0.0 Ready\r\n")
    assert hop.say(first, ehlo(*ALL, b"AUTH PLAIN")).startswith(b"AUTH PLAIN")
    hop.say(first, b"535 5.7.8 Error: authentication failed\r\n")
    assert all(o.fired and only(o).auth_failed for o in outs)
    assert hop.say(second, ehlo(*ALL, b"AUTH PLAIN")) == b"QUIT\r\n"
    assert len(hop.events.emitted) == 1 and hop.connects == 2


def test_authenticated_connection_keeps_working_during_a_penalty(tmp_path: Path) -> None:
    """
    A connection that did authenticate carries queued mail even while the
    pool is in its penalty (another connection's AUTH was refused).
    """
    hop = AuthHop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    hop.to_auth(wire)
    finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Ok\r\n"))
    assert only(out).ok
    hop.pool.auth_failed("4.7.8", "SASL authentication failed; server mx.test:25 said: 535 5.7.8 no")
    again = hop.submit()
    assert hop.connects == 1
    finish_transaction(hop, wire, wire.take() or b"".join(wire.writes))
    assert only(again).ok


# -- secrets ------------------------------------------------------------------


def test_password_never_in_events_logs_or_results(tmp_path: Path) -> None:
    """
    Through a successful login and a refused one: the password (plain or in
    base64) is in no emitted event, no log event, no result, not in the
    client's transcript of the session nor in the pool's key.
    """
    logged: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observer)
    try:
        hop = AuthHop(tmp_path)
        ok = hop.submit()
        wire = hop.wire()
        hop.to_auth(wire, b"AUTH LOGIN")
        hop.say(wire, b"334 VXNlcm5hbWU6\r\n")
        hop.say(wire, b"334 UGFzc3dvcmQ6\r\n")
        finish_transaction(hop, wire, hop.say(wire, b"235 2.7.0 Ok\r\n"))
        transcript = wire.client.log.str()
        refused = AuthHop(tmp_path / "refused")
        bad = refused.submit()
        wire2 = refused.wire()
        refused.to_auth(wire2)
        refused.say(wire2, b"535 5.7.8 Error: authentication failed\r\n")
        transcript += wire2.client.log.str()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert only(ok).ok and only(bad).auth_failed
    assert any("auth_failed" in line for line in logged)
    manager = OutboundManager(MemoryReactorClock(), Outbound(), "client.test")
    manager.pool(ENDPOINT, auth=(USER, PASSWORD))
    haystack = "\n".join([
        *logged, repr(hop.events.emitted), repr(refused.events.emitted), repr(ok.results),
        repr(bad.results),
        transcript.decode("latin-1"), repr(list(manager.pools)),
    ])
    for secret in (PASSWORD, b64(PASSWORD).decode(), b64(f"\0{USER}\0{PASSWORD}").decode()):
        assert secret not in haystack


def test_pool_key_includes_the_credentials(tmp_path: Path) -> None:
    """
    Other credentials (a reload that changed the auth file) get another pool,
    so new connections; the same ones share it; the key shows no password.
    """
    manager = OutboundManager(MemoryReactorClock(), Outbound(), "client.test")
    plain = manager.pool(ENDPOINT, tls_policy="verify")
    one = manager.pool(ENDPOINT, tls_policy="verify", auth=(USER, PASSWORD))
    assert manager.pool(ENDPOINT, tls_policy="verify", auth=(USER, PASSWORD)) is one
    other = manager.pool(ENDPOINT, tls_policy="verify", auth=(USER, WRONG))
    clear = manager.pool(ENDPOINT, tls_policy="verify", auth=(USER, PASSWORD), auth_cleartext=True)
    assert len({id(plain), id(one), id(other), id(clear)}) == 4
    assert one.auth == (USER, PASSWORD) and other.auth == (USER, WRONG)
    assert credentials_id((USER, PASSWORD)) != credentials_id((USER, WRONG))
    assert all(PASSWORD not in repr(k) and WRONG not in repr(k) for k in manager.pools)


# -- real processes -------------------------------------------------------------

# The delivery stage (relaynet/delivery/attempt.py) passes a route's
# credentials to the outbound agent; without that, the real tests cannot work.
WIRED = "auth" in inspect.signature(IOutbound.deliver).parameters
needs_wiring = pytest.mark.skipif(
    not WIRED, reason="relaynet/delivery/attempt.py does not pass the route's auth to outbound.deliver yet"
)

# The runner gives the outbound agent its event log (auth_failed events).
WIRED_EVENTS = "events=events" in inspect.getsource(relaynet.runner)

REAL_USER = "smart"
DELIVERY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and a certificate for 127.0.0.1 that it signed."""
    d = tmp_path_factory.mktemp("smarthost-pki")
    ca, ca_key = generate_ca(d)
    cert, key = generate_cert(d, ca, ca_key, ["127.0.0.1"])
    return {"ca": ca, "cert": cert, "key": key}


def write_auth(path: Path, user: str, password: str) -> Path:
    """A route's auth file, as the README says: C{user:password}, mode 0600."""
    path.write_text(f"{user}:{password}\n")
    path.chmod(0o600)
    return path


def client_toml(ca: Path, routes: dict[str, tuple[int, str]]) -> str:
    """Node A: trusts loopback; one C{tls = "verify"} route with C{auth_file} per domain."""
    text = f"""\
[node]
name = "a"
hostname = "a.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[relay]
trusted_networks = ["127.0.0.1/32"]

[tls]
ca_file = "{ca}"

[queue]
minimal_backoff = 3600
maximal_backoff = 3600

[outbound]
connect_timeout = 5
helo_timeout = 10
"""
    for domain, (port, auth_file) in routes.items():
        text += f"""
[[route]]
domains = ["{domain}"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{port}"]
tls = "verify"
auth_file = "{auth_file}"
"""
    return text


def send(node: NodeProcess, sender: str, rcpt: str) -> str:
    """Submit one message to C{node}; its token (in the subject and body)."""
    token = uuid.uuid4().hex[:12]
    msg = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {token}\r\n\r\nbody {token}\r\n".encode()
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg)
    return token


def event_for(node: NodeProcess, name: str, rcpt: str) -> dict[str, Any]:
    return wait_for(
        lambda: next((e for e in node.events() if e["event"] == name and e.get("recipient") == rcpt), None),
        DELIVERY_TIMEOUT, f"a {name} event for {rcpt} in {node.dir}",
    )


def assert_no_password(node: NodeProcess, *passwords: str) -> None:
    """No password (plain or base64) in the node's log, events or spool."""
    texts = [node.log_text()]
    for path in node.spool.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    blob = "\n".join(texts)
    for p in passwords:
        for form in (p, b64(p).decode(), b64(f"\0{REAL_USER}\0{p}").decode()):
            assert form not in blob, f"a credential is in {node.dir}"


SUBMISSION_TOML = """\
[node]
name = "smarthost"
hostname = "smarthost.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
mode = "submission"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"
max_failures = 5
failure_delay = 0.2
[auth.senders]
smart = ["@a.test"]

[local]
domains = ["b.test", "wrong.test"]
catch_all = true
"""


@pytest.mark.slow
@needs_wiring
def test_relaynet_to_relaynet_submission_with_auth(tmp_path: Path, pki: dict[str, Path]) -> None:
    """
    Node A relays through node B's submission listener (STARTTLS, AUTH
    required before MAIL) on a C{tls = "verify"} route with C{auth_file}:
    the message is delivered at B, which records A's login; with a wrong
    password the message stays queued at A, deferred with B's 535 as
    "SASL authentication failed; server 127.0.0.1:PORT said: 535 ...", and
    an C{auth_failed} line is logged. No password reaches a log, event or
    spool file of either node.
    """
    bdir = tmp_path / "b"
    bdir.mkdir()
    (bdir / "passwd").write_text(f"{REAL_USER}:{hash_password(PASSWORD, ln=4)}\n")
    btoml = SUBMISSION_TOML.replace("CERT", str(pki["cert"])).replace("KEY", str(pki["key"]))
    adir = tmp_path / "a"
    adir.mkdir()
    with NodeProcess(bdir, btoml, name="smarthost") as b:
        write_auth(adir / "good.auth", REAL_USER, PASSWORD)
        write_auth(adir / "wrong.auth", REAL_USER, WRONG)
        atoml = client_toml(pki["ca"], {"b.test": (b.port, "good.auth"), "wrong.test": (b.port, "wrong.auth")})
        with NodeProcess(adir, atoml, name="a") as a:
            token = send(a, "x@a.test", "u1@b.test")
            (path,) = wait_for(lambda: b.maildir_new("u1", "b.test"), DELIVERY_TIMEOUT, "delivery at B")
            assert token.encode() in path.read_bytes()
            sent = event_for(a, "sent", "u1@b.test")
            assert sent["relay"] == f"127.0.0.1:{b.port}" and sent.get("tls")
            received = [e for e in b.events() if e["event"] == "received"]
            assert [e.get("auth") for e in received] == [REAL_USER]

            send(a, "x@a.test", "u2@wrong.test")
            deferred = event_for(a, "deferred", "u2@wrong.test")
            assert deferred["diagnostic"].startswith(
                f"SASL authentication failed; server 127.0.0.1:{b.port} said: 535 5.7.8"
            ), deferred
            assert deferred["dsn"] == "4.7.8"
            assert not b.maildir_new("u2", "wrong.test")
            assert "auth_failed" in a.log_text()
            if WIRED_EVENTS:
                [failed] = [e for e in a.events() if e["event"] == "auth_failed"]
                assert failed["relay"] == f"127.0.0.1:{b.port}" and failed["auth_user"] == REAL_USER
            assert not any(e["event"] == "bounced" for e in a.events())
            assert_no_password(a, PASSWORD, WRONG)
        assert_no_password(b, PASSWORD, WRONG)


# -- an independent SASL server: Postfix with Cyrus SASL ------------------------

SASLPASSWD2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"


class SaslPostfix(PostfixInstance):
    """
    A private Postfix whose smtpd offers STARTTLS (with C{tlsmgr}, which
    Postfix's TLS needs) and AUTH through Cyrus SASL from a private sasldb.
    """

    def master_cf_text(self) -> str:
        row = "%-22s %-10s %-3s %-3s %-3s %-6s %-3s %s\n" % ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr")
        return super().master_cf_text() + row


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """A directory Postfix's daemons can reach, not under pytest's (see test_interop)."""
    d = Path(tempfile.mkdtemp(prefix="relaynet-sasl-"))
    try:
        yield allow_postfix_search(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sasl_postfix(base: Path, pki: dict[str, Path], mechanisms: str) -> SaslPostfix:
    """
    Postfix on a free loopback port delivering C{pf.test} and
    C{pfwrong.test} into its Maildir, relaying only for SASL-authenticated
    clients (AUTH only over TLS), with Cyrus SASL: C{pwcheck_method: auxprop}
    from a private sasldb (C{saslpasswd2 -f}) with user C{smart} in realm
    C{pf.test}.
    """
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not os.access(SASLPASSWD2, os.X_OK):
        pytest.skip("saslpasswd2 not installed (apt-get install sasl2-bin libsasl2-modules; make peers)")
    postfix = pwd.getpwnam("postfix")
    sasl = base / "sasl"
    sasl.mkdir()
    sasl.chmod(0o755)
    sasldb = sasl / "sasldb2"
    made = subprocess.run(
        [SASLPASSWD2, "-f", str(sasldb), "-p", "-c", "-u", "pf.test", REAL_USER],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=30,
    )
    assert made.returncode == 0, made.stderr
    os.chown(sasldb, 0, postfix.pw_gid)
    sasldb.chmod(0o640)
    pf = SaslPostfix(
        base / "postfix", port=free_port(), mode="local", local_domains=["pf.test", "pfwrong.test"],
        main_cf={
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(pki["cert"]),
            "smtpd_tls_key_file": str(pki["key"]),
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(base / "postfix" / "etc" / "sasl"),
            "smtpd_sasl_local_domain": "pf.test",
            # Only an authenticated client may send here, loopback or not.
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
        },
    )
    # Debian's Postfix reads Cyrus's smtpd.conf from $config_directory/sasl
    # (whatever cyrus_sasl_config_path says): the instance's own directory.
    conf_dir = pf.config_dir / "sasl"
    conf_dir.mkdir(parents=True)
    conf_dir.chmod(0o755)
    (conf_dir / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\nmech_list: {mechanisms}\n"
    )
    (conf_dir / "smtpd.conf").chmod(0o644)
    return pf


@pytest.mark.slow
@needs_wiring
@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
def test_relaynet_to_postfix_with_cyrus_sasl(
    tmp_path: Path, pki: dict[str, Path], peer_dir: Path, mechanisms: str
) -> None:
    """
    Node A relays to a private Postfix whose AUTH is Cyrus SASL (an
    independent SASL server; it offers C{mechanisms}, only after STARTTLS,
    and relays for authenticated clients only): the message is delivered into
    Postfix's Maildir and Postfix logs the SASL login (PLAIN when offered,
    else LOGIN). A wrong password gets Cyrus's 535 and the message is
    deferred at A, not bounced.
    """
    with sasl_postfix(peer_dir, pki, mechanisms) as pf:
        adir = tmp_path / "a"
        adir.mkdir()
        write_auth(adir / "good.auth", REAL_USER, PASSWORD)
        write_auth(adir / "wrong.auth", REAL_USER, WRONG)
        atoml = client_toml(pki["ca"], {"pf.test": (pf.port, "good.auth"), "pfwrong.test": (pf.port, "wrong.auth")})
        with NodeProcess(adir, atoml, name="a") as a:
            token = send(a, "x@a.test", "user@pf.test")
            sent = event_for(a, "sent", "user@pf.test")
            assert sent["relay"] == f"127.0.0.1:{pf.port}" and sent.get("tls"), sent
            wait_for(pf.delivered_count, DELIVERY_TIMEOUT, "delivery into Postfix's Maildir")
            stored = [p.read_bytes() for sub in ("new", "cur") for p in (pf.maildir / sub).glob("*")]
            assert any(token.encode() in data for data in stored)
            method = "PLAIN" if "PLAIN" in mechanisms else "LOGIN"
            login = f"sasl_method={method}, sasl_username={REAL_USER}@pf.test"
            wait_for(lambda: login in pf.log_tail(400), DELIVERY_TIMEOUT, f"{login!r} in Postfix's log")

            send(a, "x@a.test", "user@pfwrong.test")
            deferred = event_for(a, "deferred", "user@pfwrong.test")
            assert deferred["diagnostic"].startswith(
                f"SASL authentication failed; server 127.0.0.1:{pf.port} said: 535 5.7.8"
            ), deferred
            assert deferred["dsn"] == "4.7.8"
            assert f"SASL {method} authentication failed" in pf.log_tail(400)
            assert not any(e["event"] == "bounced" for e in a.events())
            assert_no_password(a, PASSWORD, WRONG)
