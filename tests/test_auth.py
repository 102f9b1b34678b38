"""
Security tests of SMTP AUTH and submission (RFC 6409, RFC 4954):
C{relaynet.intake.auth} (scrypt password file, the twisted.cred checker,
C{relaynet passwd}) and the intake's submission behaviour.

In memory (a L{relaynet.testing} intake, the reactor's clock for exact
timing): AUTH required before MAIL on submission listeners (530 5.7.0), PLAIN
and LOGIN offered and accepted only over TLS, sender ownership (553 5.7.1),
failed attempts delayed and counted per client with a disconnect at the limit,
credentials never in a log.

Real process (C{slow}): a node with a STARTTLS submission listener and an
implicit-TLS one, a password file made by C{relaynet passwd}; smtplib logs in
and sends; three wrong passwords are delayed, then 421; no credential in
node.log, events.jsonl or the spool.
"""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThreadPool
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from harness.nodeproc import HOST, NodeProcess, free_port, read_reply, relaynet_command, wait_for

from relaynet.intake.auth import (
    IRelayUser, RelayRealm, ScryptChecker, hash_password, may_send_as, read_password_file,
    verify_password,
)
from relaynet.intake.server import RelayESMTP, RelayFactory
from relaynet.testing import ManualThreadPool, make_intake, spooled, take_replies
from relaynet.smtp.tls import generate_ca, generate_cert, server_options

PASSWORD = "correct horse battery staple"
WRONG = "Tr0ub4dor&3-wrong"
DELIVERY_TIMEOUT = 20.0

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}")


# -- passwords ----------------------------------------------------------------


def test_hash_password_is_salted_scrypt() -> None:
    one, two = hash_password(PASSWORD, ln=4), hash_password(PASSWORD, ln=4)
    assert one != two, "each hash has its own salt"
    for stored in (one, two):
        assert stored.startswith("$scrypt$ln=4,r=8,p=1$")
        assert PASSWORD not in stored
        assert verify_password(PASSWORD, stored)
        assert not verify_password(WRONG, stored)
        assert not verify_password(PASSWORD.upper(), stored)
    assert hash_password(PASSWORD).startswith("$scrypt$ln=14,"), "the default cost is scrypt's N=2^14"


@pytest.mark.parametrize("stored", [
    "", "plain-text-password", "$scrypt$", "$md5$ln=4,r=8,p=1$AAAA$AAAA",
    "$scrypt$ln=99,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA", "$scrypt$ln=4$AAAA$AAAA",
    "$scrypt$ln=x,r=8,p=1$AAAA$AAAA",
])
def test_verify_password_refuses_malformed_hashes(stored: str) -> None:
    assert verify_password(PASSWORD, stored) is False
    assert verify_password(stored, stored) is False


def run_passwd(path: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*relaynet_command(), "passwd", str(path), user, "--password-stdin"],
        input=password + "\n", capture_output=True, text=True, timeout=60,
    )


def test_passwd_command_manages_the_file(tmp_path: Path) -> None:
    """
    C{relaynet passwd FILE USER --password-stdin}: creates the file 0600 with
    salted scrypt hashes (never the password), adds users, replaces a user's
    hash, refuses bad user names and empty passwords.
    """
    path = tmp_path / "passwd"
    old = os.umask(0o022)
    try:
        assert run_passwd(path, "alice", PASSWORD).returncode == 0
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert run_passwd(path, "bob@example.org", WRONG).returncode == 0
    text = path.read_text()
    assert PASSWORD not in text and WRONG not in text
    assert b64(PASSWORD).decode() not in text
    users = read_password_file(path)
    assert set(users) == {"alice", "bob@example.org"}
    assert verify_password(PASSWORD, users["alice"])
    assert verify_password(WRONG, users["bob@example.org"])
    first = users["alice"]
    assert run_passwd(path, "alice", "new password").returncode == 0
    users = read_password_file(path)
    assert len(users) == 2 and users["alice"] != first
    assert verify_password("new password", users["alice"])
    assert not verify_password(PASSWORD, users["alice"])
    assert path.stat().st_mode & 0o777 == 0o600
    for bad_user in ("bad:name", "with space"):
        result = run_passwd(path, bad_user, PASSWORD)
        assert result.returncode != 0
        assert PASSWORD not in result.stdout + result.stderr
    assert run_passwd(path, "carol", "").returncode != 0
    assert set(read_password_file(path)) == {"alice", "bob@example.org"}


def write_users(path: Path, users: dict[str, str]) -> None:
    """A password file with cheap (ln=4) hashes, so tests stay fast."""
    path.write_text("".join(f"{u}:{hash_password(p, ln=4)}\n" for u, p in users.items()))


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_checker_and_portal(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_users(path, {"alice": PASSWORD})
    portal = Portal(RelayRealm(), [ScryptChecker(path, maybeDeferred)])

    def login(user: str, password: str) -> Any:
        return _result(portal.login(UsernamePassword(user.encode(), password.encode()), None, IRelayUser))

    iface, avatar, logout = login("alice", PASSWORD)
    assert iface is IRelayUser and avatar == "alice"
    assert login("alice", WRONG).check(UnauthorizedLogin)
    assert login("mallory", PASSWORD).check(UnauthorizedLogin)
    assert login("ALICE", PASSWORD).check(UnauthorizedLogin)
    # The file is re-read when it changes.
    write_users(path, {"alice": "changed"})
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert login("alice", PASSWORD).check(UnauthorizedLogin)
    assert login("alice", "changed")[1] == "alice"


@pytest.mark.parametrize("user, sender, allowed", [
    ("alice", "alice@example.org", True),
    ("alice", "ALICE@Example.ORG", True),
    ("alice", "anything@alias.test", True),
    ("alice", "bob@example.org", False),
    ("alice", "alice@example.org.evil.test", False),
    ("alice", "", False),
    ("bob@example.org", "bob@example.org", True),
    ("bob@example.org", "alice@example.org", False),
    ("carol", "carol@example.org", False),
])
def test_may_send_as(user: str, sender: str, allowed: bool) -> None:
    senders = {"alice": ("alice@example.org", "@alias.test")}
    assert may_send_as(user, sender, senders) is allowed


# -- the intake, in memory ---------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("auth-certs")
    ca, ca_key = generate_ca(d)
    return generate_cert(d, ca, ca_key, ["relay.test"])


AUTH_TOML = """
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
max_failures = 3
failure_delay = 0.2
[auth.senders]
alice = ["alice@example.org", "@alias.test"]
[[route]]
domains = ["remote.test"]
action = "relay"
next_hops = ["tcp:192.0.2.25:25"]
"""

UNTRUSTED = "10.9.8.7"


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS" (and records the context)."""

    tls_context: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_context = contextFactory


class Submission:
    """An in-memory intake with AUTH, and sessions on its listeners."""

    def __init__(self, tmp_path: Path, certs: tuple[Path, Path], checker: Any = None) -> None:
        self.passwd = tmp_path / "passwd"
        write_users(self.passwd, {"alice": PASSWORD, "bob@example.org": WRONG + "bob"})
        toml = AUTH_TOML.format(cert=certs[0], key=certs[1], passwd=self.passwd)
        self.intake, self.reactor, self.pool = make_intake(tmp_path / "spool", toml=toml)
        self.intake.tls = server_options(*certs)
        self.hash_pool = ManualThreadPool(immediate=True)
        if checker is None:
            checker = ScryptChecker(
                self.passwd, lambda f: deferToThreadPool(self.reactor, self.hash_pool, f)  # type: ignore[arg-type]
            )
        self.intake.portal = Portal(RelayRealm(), [checker])

    def session(self, mode: str = "submissions", ip: str = UNTRUSTED) -> "Session":
        listener = next(lst for lst in self.intake.config.listeners if lst.mode == mode)
        addr = IPv4Address("TCP", ip, 40000)
        protocol = RelayFactory(self.intake, listener).buildProtocol(addr)
        transport = TLSStringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        return Session(self, protocol, transport)


class Session:
    def __init__(self, sub: Submission, protocol: RelayESMTP, transport: StringTransport) -> None:
        self.sub = sub
        self.protocol = protocol
        self.transport = transport
        self.greeting = take_replies(transport)

    def send(self, data: bytes) -> list[tuple[int, str]]:
        self.protocol.dataReceived(data)
        return take_replies(self.transport)

    def cmd(self, line: bytes) -> tuple[int, str]:
        replies = self.send(line + b"\r\n")
        assert len(replies) == 1, replies
        return replies[0]

    def ehlo(self) -> list[str]:
        code, text = self.cmd(b"EHLO client.test")
        assert code == 250
        return text.split("\n")[1:]

    def starttls(self) -> None:
        assert self.cmd(b"STARTTLS")[0] == 220
        self.protocol.handshakeCompleted()

    def login(self, user: str = "alice", password: str = PASSWORD) -> tuple[int, str]:
        return self.cmd(b"AUTH PLAIN " + plain(user, password))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.fixture
def sub(tmp_path: Path, certs: tuple[Path, Path]) -> Submission:
    return Submission(tmp_path, certs)


@pytest.mark.parametrize("mode", ["submission", "submissions"])
def test_mail_requires_auth_on_submission_listeners(sub: Submission, mode: str) -> None:
    s = sub.session(mode, ip="127.0.0.1")  # even from a trusted network
    s.ehlo()
    if mode == "submission":
        s.starttls()
        s.ehlo()
    assert s.cmd(b"MAIL FROM:<alice@example.org>") == (530, "5.7.0 Authentication required")
    assert s.cmd(b"RCPT TO:<x@localhost>")[0] == 503
    assert s.login() == (235, "2.7.0 Authentication successful")
    assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 250


def test_relay_listener_does_not_require_auth(sub: Submission) -> None:
    s = sub.session("relay", ip="127.0.0.1")
    s.ehlo()
    assert s.cmd(b"MAIL FROM:<anyone@example.org>")[0] == 250


@pytest.mark.parametrize("mode", ["submission", "relay"])
def test_auth_only_over_tls(sub: Submission, mode: str) -> None:
    """
    Before STARTTLS, AUTH is neither advertised nor accepted (538 5.7.11),
    even with the right password; after it, exactly PLAIN and LOGIN are.
    """
    s = sub.session(mode)
    words = s.ehlo()
    assert not any(w.upper().startswith("AUTH") for w in words), words
    assert "STARTTLS" in words
    code, text = s.login()
    assert (code, text.split()[0]) == (538, "5.7.11")
    if mode == "submission":
        assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 530
    s.starttls()
    words = s.ehlo()
    assert [w for w in words if w.upper().startswith("AUTH")] == ["AUTH PLAIN LOGIN"]
    assert s.login()[0] == 235


def test_auth_pipelined_behind_starttls_is_ignored(sub: Submission) -> None:
    """
    CVE-2011-0411 with credentials: an AUTH (and a MAIL) pipelined behind
    STARTTLS in the same read came in cleartext and counts for nothing.
    """
    s = sub.session("submission")
    s.ehlo()
    replies = s.send(
        b"STARTTLS\r\nAUTH PLAIN " + plain("alice", PASSWORD) + b"\r\nMAIL FROM:<alice@example.org>\r\n"
    )
    assert replies == [(220, "2.0.0 Ready to start TLS")]
    s.protocol.handshakeCompleted()
    s.ehlo()
    assert s.protocol.auth_user is None
    assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 530


@pytest.mark.parametrize("dialogue", ["plain-initial", "plain-continued", "login-initial", "login-continued"])
def test_plain_and_login_succeed(sub: Submission, dialogue: str) -> None:
    s = sub.session()
    s.ehlo()
    if dialogue == "plain-initial":
        assert s.cmd(b"AUTH PLAIN " + plain("alice", PASSWORD))[0] == 235
    elif dialogue == "plain-continued":
        assert s.cmd(b"AUTH PLAIN") == (334, "")
        assert s.cmd(plain("alice", PASSWORD))[0] == 235
    elif dialogue == "login-initial":
        assert s.cmd(b"AUTH LOGIN " + b64("alice")) == (334, "UGFzc3dvcmQ6")
        assert s.cmd(b64(PASSWORD))[0] == 235
    else:
        assert s.cmd(b"AUTH LOGIN") == (334, "VXNlcm5hbWU6")
        assert s.cmd(b64("alice")) == (334, "UGFzc3dvcmQ6")
        assert s.cmd(b64(PASSWORD))[0] == 235
    assert s.protocol.auth_user == "alice"
    assert not any(w.startswith("AUTH") for w in s.ehlo())
    assert s.login()[0] == 503, "no second AUTH"
    # Authenticated: may relay from an untrusted address.
    assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 250
    assert s.cmd(b"RCPT TO:<friend@remote.test>")[0] == 250
    assert s.cmd(b"DATA")[0] == 354
    s.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    sub.pool.run_all()
    (code, text), = take_replies(s.transport)
    assert code == 250, text
    (msg,) = spooled(sub.intake.spool)
    assert msg.envelope.client["auth"] == "alice"
    assert b"with ESMTPSA" in msg.message.split(b"\r\n\r\n")[0]


def test_unauthenticated_untrusted_client_cannot_relay(sub: Submission) -> None:
    s = sub.session("relay")
    s.ehlo()
    assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 250
    assert s.cmd(b"RCPT TO:<friend@remote.test>")[0:1] == (554,)


@pytest.mark.parametrize("line, code", [
    (b"AUTH CRAM-MD5", 504),
    (b"AUTH DIGEST-MD5", 504),
    (b"AUTH GSSAPI", 504),
    (b"AUTH XOAUTH2 " + b64("x"), 504),
    (b"AUTH", 504),
    (b"AUTH PLAIN !!!not-base64!!!", 501),
    (b"AUTH PLAIN " + b64("only-one-part"), 501),
    (b"AUTH PLAIN " + b64(b"\0alice\0\xff\xfe"), 501),
    (b"AUTH LOGIN ====", 501),
])
def test_bad_auth_commands_get_replies(sub: Submission, line: bytes, code: int) -> None:
    """Malformed or unsupported AUTH gets a reply; the session stays usable."""
    s = sub.session()
    s.ehlo()
    assert s.cmd(line)[0] == code
    assert s.cmd(b"NOOP")[0] == 250
    assert s.login()[0] == 235


def test_auth_cancelled_with_star(sub: Submission) -> None:
    s = sub.session()
    s.ehlo()
    assert s.cmd(b"AUTH LOGIN")[0] == 334
    assert s.cmd(b"*")[0] == 501
    assert s.cmd(b"NOOP")[0] == 250
    assert s.login()[0] == 235


def test_auth_refused_inside_a_transaction(sub: Submission) -> None:
    s = sub.session("relay", ip="127.0.0.1")
    s.ehlo()
    s.starttls()
    s.ehlo()
    assert s.cmd(b"MAIL FROM:<x@example.org>")[0] == 250
    assert s.login()[0] == 503


@pytest.mark.parametrize("sender, code", [
    (b"<alice@example.org>", 250),
    (b"<Alice@EXAMPLE.org>", 250),
    (b"<someone@alias.test>", 250),
    (b"<bob@example.org>", 553),
    (b"<alice@example.org.evil.test>", 553),
    (b"<>", 553),
])
def test_authenticated_sender_must_be_owned(sub: Submission, sender: bytes, code: int) -> None:
    s = sub.session()
    s.ehlo()
    assert s.login()[0] == 235
    got, text = s.cmd(b"MAIL FROM:" + sender)
    assert got == code, text
    if code == 553:
        assert text.startswith("5.7.1 ")


def test_user_without_senders_entry_sends_as_itself(sub: Submission) -> None:
    s = sub.session()
    s.ehlo()
    assert s.login("bob@example.org", WRONG + "bob")[0] == 235
    assert s.cmd(b"MAIL FROM:<alice@example.org>")[0] == 553
    assert s.cmd(b"MAIL FROM:<bob@example.org>")[0] == 250


def test_failed_auth_is_delayed_then_disconnects(sub: Submission) -> None:
    """
    failure_delay 0.2, max_failures 3: each failure's reply is held back at
    least 0.2 s (measured on the intake's clock), the first two are 535 5.7.8,
    the third is 421 4.7.0 and the connection closes (three different wrong
    passwords: three guesses).
    """
    s = sub.session()
    s.ehlo()
    expected = [(535, "5.7.8"), (535, "5.7.8"), (421, "4.7.0")]
    for attempt, (code, enhanced) in enumerate(expected, start=1):
        assert s.send(b"AUTH PLAIN " + plain("alice", f"{WRONG}{attempt}") + b"\r\n") == []
        sub.reactor.advance(0.199)
        assert take_replies(s.transport) == [], "answered before failure_delay"
        waited = 0.199
        replies: list[tuple[int, str]] = []
        while not replies and waited < 0.2 * attempt + 1e-9:
            sub.reactor.advance(0.001)
            waited += 0.001
            replies = take_replies(s.transport)
        assert replies, f"no reply to attempt {attempt} after {waited:.3f}s"
        ((got, text),) = replies
        assert (got, text.split()[0]) == (code, enhanced)
        assert waited >= 0.2
    assert s.closed


def test_unknown_user_fails_like_wrong_password(sub: Submission) -> None:
    """No user enumeration: an unknown user gets the same delayed 535."""
    s = sub.session()
    s.ehlo()
    assert s.send(b"AUTH PLAIN " + plain("mallory", PASSWORD) + b"\r\n") == []
    sub.reactor.advance(0.2)
    assert take_replies(s.transport) == [(535, "5.7.8 Error: authentication failed")]


def test_input_waits_during_failure_delay(sub: Submission) -> None:
    """Commands pipelined behind a failing AUTH are answered after it, in order."""
    s = sub.session()
    s.ehlo()
    replies = s.send(b"AUTH PLAIN " + plain("alice", WRONG) + b"\r\nMAIL FROM:<alice@example.org>\r\n")
    assert replies == []
    sub.reactor.advance(0.2)
    assert [c for c, _ in take_replies(s.transport)] == [535, 530]


def test_failures_counted_per_client_across_connections(sub: Submission) -> None:
    """
    Failures count per client address, across its sessions: two different
    wrong passwords in one session, then one in the next is the third (421);
    another address is not affected.
    """
    bad = b"AUTH PLAIN " + plain("alice", WRONG) + b"\r\n"
    first = sub.session(ip="10.0.0.5")
    first.ehlo()
    for n in range(2):
        first.send(b"AUTH PLAIN " + plain("alice", f"{WRONG}{n}") + b"\r\n")
        sub.reactor.advance(1.0)
        assert take_replies(first.transport)[0][0] == 535
    first.protocol.connectionLost(None)  # type: ignore[arg-type]
    again = sub.session(ip="10.0.0.5")
    again.ehlo()
    again.send(bad)
    sub.reactor.advance(1.0)
    assert take_replies(again.transport)[0][0] == 421
    assert again.closed
    other = sub.session(ip="10.0.0.6")
    other.ehlo()
    other.send(bad)
    sub.reactor.advance(1.0)
    assert take_replies(other.transport)[0][0] == 535
    assert not other.closed


def _fail(s: "Session", data: bytes, sub: Submission) -> tuple[int, str]:
    """Send one failing AUTH step, run out the failure delay, return the reply."""
    replies = s.send(data)
    sub.reactor.advance(5.0)
    ((code, text),) = replies + take_replies(s.transport)
    return code, text


def test_plain_then_login_with_same_credentials_is_one_failure(sub: Submission) -> None:
    """
    smtplib's C{login()} tries PLAIN, then LOGIN after a 535, with the same
    user and password: in one session that is one failed guess. Two such
    sessions (C{lab send -n 2}) count two failures out of three and both get
    535 5.7.8, not 421.
    """
    for n in (1, 2):
        s = sub.session()
        s.ehlo()
        assert _fail(s, b"AUTH PLAIN " + plain("alice", WRONG) + b"\r\n", sub)[0] == 535
        assert s.cmd(b"AUTH LOGIN " + b64("alice"))[0] == 334
        code, text = _fail(s, b64(WRONG) + b"\r\n", sub)
        assert (code, text.split()[0]) == (535, "5.7.8"), (n, code, text)
        assert not s.closed
        assert sub.intake.auth_failures[UNTRUSTED] == n
        s.protocol.connectionLost(None)  # type: ignore[arg-type]


def test_different_passwords_in_one_session_each_count(sub: Submission) -> None:
    """
    A brute-forcer is still cut off: three different wrong passwords in one
    session, alternating mechanisms, are three failures: 535, 535, then 421
    4.7.0 and the connection closes. Repeating a failed password in between
    does not reset or dodge the count.
    """
    s = sub.session()
    s.ehlo()
    assert _fail(s, b"AUTH PLAIN " + plain("alice", WRONG + "1") + b"\r\n", sub)[0] == 535
    assert _fail(s, b"AUTH PLAIN " + plain("alice", WRONG + "1") + b"\r\n", sub)[0] == 535
    assert s.cmd(b"AUTH LOGIN " + b64("alice"))[0] == 334
    assert _fail(s, b64(WRONG + "2") + b"\r\n", sub)[0] == 535
    assert sub.intake.auth_failures[UNTRUSTED] == 2
    code, text = _fail(s, b"AUTH PLAIN " + plain("alice", WRONG + "3") + b"\r\n", sub)
    assert (code, text.split()[0]) == (421, "4.7.0")
    assert s.closed


def test_same_password_for_another_user_is_another_guess(sub: Submission) -> None:
    """The guess is the user name with the password: one password tried on two users counts twice."""
    s = sub.session()
    s.ehlo()
    assert _fail(s, b"AUTH PLAIN " + plain("alice", WRONG) + b"\r\n", sub)[0] == 535
    assert _fail(s, b"AUTH PLAIN " + plain("bob@example.org", WRONG) + b"\r\n", sub)[0] == 535
    assert sub.intake.auth_failures[UNTRUSTED] == 2


class BrokenChecker:
    """A credentials checker whose back end fails (unreadable file, I/O error)."""

    from twisted.cred.credentials import IUsernamePassword

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, creds: Any) -> Deferred[bytes]:
        return fail(OSError(13, "Permission denied", "passwd"))


def test_checker_error_is_a_temporary_failure(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    """
    A checker failure that is ours (password file unreadable) answers 454 4.7.0
    (RFC 4954 temporary failure) and does not count against the client.
    """
    sub = Submission(tmp_path, certs, checker=BrokenChecker())
    s = sub.session()
    s.ehlo()
    replies = s.send(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
    sub.reactor.advance(5)
    ((code, text),) = replies + take_replies(s.transport)
    assert (code, text.split()[0]) == (454, "4.7.0")
    assert sub.intake.auth_failures.get(UNTRUSTED, 0) == 0


def test_auth_disabled_by_reload_mid_exchange(sub: Submission) -> None:
    """
    A reload that turns AUTH off (no password file: no portal) between the
    steps of AUTH LOGIN answers the password with 454 4.7.0, and the session
    goes on; it does not raise from C{dataReceived} and lose the connection.
    """
    s = sub.session()
    s.ehlo()
    assert s.cmd(b"AUTH LOGIN")[0] == 334
    assert s.cmd(b64("alice"))[0] == 334
    sub.intake.portal = None  # what RelayNode.reload does without [auth]
    code, text = s.cmd(b64(PASSWORD))
    assert (code, text.split()[0]) == (454, "4.7.0")
    assert not s.protocol.authenticated
    assert s.cmd(b"NOOP")[0] == 250
    assert not s.closed


def secret_forms(*passwords: str, users: tuple[str, ...] = ("alice",)) -> list[bytes]:
    """A password in clear and in every base64 form AUTH carries it in."""
    forms: list[bytes] = []
    for p in passwords:
        forms += [p.encode(), b64(p)]
        for u in users:
            forms += [plain(u, p), plain(u, p, authzid=u)]
    return forms


def test_credentials_never_logged_in_memory(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    """
    Everything logged through twisted.logger while clients log in (PLAIN,
    LOGIN), fail, and hit a broken back end, plus the event log, has no
    password in any form.
    """
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        sub = Submission(tmp_path, certs)
        sub.intake.events.observers.append(logged.append)
        s = sub.session()
        s.ehlo()
        assert s.send(b"AUTH LOGIN " + b64("alice") + b"\r\n" + b64(WRONG) + b"\r\n")[0][0] == 334
        sub.reactor.advance(1)
        assert [c for c, _ in take_replies(s.transport)] == [535]
        s.send(b"AUTH PLAIN " + plain("alice", WRONG) + b"\r\n")
        sub.reactor.advance(1)
        assert [c for c, _ in take_replies(s.transport)] == [535]
        assert s.login()[0] == 235
        s.cmd(b"MAIL FROM:<alice@example.org>")
        s.cmd(b"RCPT TO:<x@localhost>")
        s.cmd(b"DATA")
        s.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        sub.pool.run_all()
        (tmp_path / "b").mkdir()
        broken = Submission(tmp_path / "b", certs, checker=BrokenChecker())
        b = broken.session()
        b.ehlo()
        b.send(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
        broken.reactor.advance(5)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any(e.get("event") == "received" for e in logged), "the events were observed"
    texts = []
    for event in logged:
        texts.append(repr(event))
        if "log_format" in event:
            texts.append(formatEvent(event))
        if event.get("log_failure") is not None:
            texts.append(event["log_failure"].getTraceback())
    blob = "\n".join(texts).encode("utf-8", "replace")
    for form in secret_forms(PASSWORD, WRONG):
        assert form not in blob, form


# -- a real node ----------------------------------------------------------------


NODE_TOML = """\
[node]
name = "sub"
hostname = "sub.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
mode = "submission"
[[listener]]
endpoint = "tcp:IMPLICIT:interface=127.0.0.1"
mode = "submissions"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"
max_failures = 3
failure_delay = 0.2
[auth.senders]
alice = ["alice@example.org"]

[local]
domains = ["localhost"]
catch_all = true
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]) -> Iterator[NodeProcess]:
    d = tmp_path_factory.mktemp("auth-node")
    assert run_passwd(d / "passwd", "alice", PASSWORD).returncode == 0
    implicit = free_port()
    toml = (
        NODE_TOML.replace("IMPLICIT", str(implicit)).replace("CERT", str(certs[0]))
        .replace("KEY", str(certs[1]))
    )
    n = NodeProcess(d, toml, name="sub")
    n.implicit_port = implicit  # type: ignore[attr-defined]
    with n:
        yield n


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _token() -> str:
    return uuid.uuid4().hex[:10]


def _message(token: str) -> bytes:
    return f"From: alice@example.org\r\nSubject: {token}\r\n\r\nbody {token}\r\n".encode()


@pytest.mark.slow
def test_submission_end_to_end(node: NodeProcess) -> None:
    """
    smtplib against the node: no AUTH before STARTTLS, PLAIN and LOGIN after
    it, and over the implicit-TLS port; the messages are delivered with
    protocol ESMTPSA and the user recorded; a foreign sender gets 553 5.7.1.
    """
    users = []
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.ehlo("sub.client")
        assert not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("alice@example.org", ["x@localhost"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 530
        s.starttls(context=_unverified())
        s.ehlo("sub.client")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        s.login("alice", PASSWORD)  # PLAIN
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("bob@example.org", ["x@localhost"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 553 and refused.value.smtp_error.startswith(b"5.7.1")
        s.rset()
        token = _token()
        s.sendmail("alice@example.org", [f"p{token}@localhost"], _message(token))
        users.append(f"p{token}")
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.starttls(context=_unverified())
        s.ehlo("sub.client")
        s.user, s.password = "alice", PASSWORD
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235
        token = _token()
        s.sendmail("alice@example.org", [f"l{token}@localhost"], _message(token))
        users.append(f"l{token}")
    with smtplib.SMTP_SSL(HOST, node.implicit_port, timeout=30, context=_unverified()) as s:  # type: ignore[attr-defined]
        s.ehlo("sub.client")
        assert not s.has_extn("starttls")
        s.login("alice", PASSWORD)
        token = _token()
        s.sendmail("alice@example.org", [f"i{token}@localhost"], _message(token))
        users.append(f"i{token}")
        implicit_tls = s.sock.version()
    for user in users:
        (path,) = wait_for(lambda: node.maildir_new(user), DELIVERY_TIMEOUT, f"delivery to {user}")
        head = path.read_bytes().split(b"\n\n")[0]
        assert b"with ESMTPSA" in head
        assert b"using TLSv1." in head
        if user.startswith("i"):
            assert f"using {implicit_tls} with cipher".encode() in head
    received = [e for e in node.events() if e["event"] == "received"]
    assert len(received) >= 3 and all(e.get("auth") == "alice" for e in received)


def _tls_session(port: int, source: str) -> tuple[ssl.SSLSocket, Any]:
    raw = socket.create_connection((HOST, port), timeout=15, source_address=(source, 0))
    f = raw.makefile("rb")
    assert read_reply(f)[0] == 220
    raw.sendall(b"EHLO bad.client\r\n")
    read_reply(f)
    raw.sendall(b"STARTTLS\r\n")
    assert read_reply(f)[0] == 220
    tls = _unverified().wrap_socket(raw)
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO bad.client\r\n")
    assert read_reply(tf)[0] == 250
    return tls, tf


@pytest.mark.slow
def test_auth_failures_delayed_and_disconnected_end_to_end(node: NodeProcess) -> None:
    """
    Three different wrong passwords (failure_delay 0.2, max_failures 3), from a fresh
    client address: 535, 535, then 421 and the connection is closed; no reply
    comes sooner than 0.2 s after its AUTH.
    """
    tls, tf = _tls_session(node.port, "127.0.0.77")
    codes = []
    with tls:
        for n in range(3):
            start = time.monotonic()
            tls.sendall(b"AUTH PLAIN " + plain("alice", f"{WRONG}{n}") + b"\r\n")
            code, lines = read_reply(tf)
            elapsed = time.monotonic() - start
            codes.append(code)
            assert elapsed >= 0.2, (code, elapsed)
        try:
            rest = tf.read(1)
        except (ssl.SSLError, OSError):
            rest = b""  # closed without a TLS close_notify: closed all the same
        assert rest == b"", "the connection is closed after the 421"
    assert codes == [535, 535, 421]


@pytest.mark.slow
def test_smtplib_wrong_password_is_535_in_every_session(node: NodeProcess) -> None:
    """
    C{smtplib.SMTP.login} with a wrong password (it tries PLAIN, then LOGIN
    after the 535) in two sessions from one client address, as C{relaynet lab
    send --password wrong -n 2} does: both end in 535 5.7.8, not 421 (each
    session is one failed guess out of max_failures 3). The right password
    then logs in.
    """
    for _ in range(2):
        with smtplib.SMTP(HOST, node.port, timeout=30, source_address=("127.0.0.79", 0)) as s:
            s.starttls(context=_unverified())
            s.ehlo("sub.client")
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                s.login("alice", WRONG)
            assert failed.value.smtp_code == 535
            assert failed.value.smtp_error.startswith(b"5.7.8")
            assert s.noop()[0] == 250, "the session goes on"
    with smtplib.SMTP(HOST, node.port, timeout=30, source_address=("127.0.0.79", 0)) as s:
        s.starttls(context=_unverified())
        s.ehlo("sub.client")
        assert s.login("alice", PASSWORD)[0] == 235


@pytest.mark.slow
def test_credentials_never_reach_a_log(node: NodeProcess) -> None:
    """
    After successful (PLAIN, LOGIN) and failed AUTH with known passwords,
    node.log, the twistd output, events.jsonl and every spool file are free of
    the passwords in clear and in base64.
    """
    tls, tf = _tls_session(node.port, "127.0.0.78")
    with tls:
        tls.sendall(b"AUTH LOGIN " + b64("alice") + b"\r\n")
        assert read_reply(tf)[0] == 334
        tls.sendall(b64(WRONG) + b"\r\n")
        assert read_reply(tf)[0] == 535
        tls.sendall(b"AUTH PLAIN " + plain("alice", PASSWORD) + b"\r\n")
        assert read_reply(tf)[0] == 235
        token = _token()
        for line in (b"MAIL FROM:<alice@example.org>", f"RCPT TO:<c{token}@localhost>".encode(), b"DATA"):
            tls.sendall(line + b"\r\n")
            assert read_reply(tf)[0] in (250, 354)
        tls.sendall(_message(token) + b".\r\n")
        assert read_reply(tf)[0] == 250
    wait_for(lambda: node.maildir_new(f"c{token}"), DELIVERY_TIMEOUT, "delivery")
    wait_for(lambda: f"c{token}@localhost" in node.log_text(), DELIVERY_TIMEOUT, "the log to catch up")
    files = [node.log_path, node.out_path, node.events_path]
    files += [p for p in node.spool.rglob("*") if p.is_file()]
    forms = secret_forms(PASSWORD, WRONG)
    for path in files:
        data = path.read_bytes()
        for form in forms:
            assert form not in data, (path, form)
