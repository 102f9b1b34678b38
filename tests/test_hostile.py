"""
Hostile and careless clients against a real node (issue 16, item 6): a
C{twistd -n relaynet} process on loopback, driven with raw sockets (one
C{sendall} per pipelined group, so the node sees the group in one read) and
with independent clients (swaks, Postfix's smtp-source).

What C{tests/test_intake.py} and C{tests/test_security.py} prove in memory,
here over real sockets and the real process:

 - improper pipelining (C{[limits] forbid_unauth_pipelining}, Postfix's
   smtpd_forbid_unauth_pipelining): message bytes before the 354, and
   commands after one that must end a pipelined group, get 554 5.5.0 and
   the connection is closed, nothing queued; with the rule off the same bytes
   are a message; an authenticated client is exempt (our documented choice:
   Postfix has no such exemption); proper pipelining (swaks C{--pipeline})
   and a lock-step client (smtp-source) are accepted;
 - recipient overshoot (C{recipient_overshoot_limit}): 452 4.5.3 for the
   excess, the session and transaction kept, the queued envelope holding
   exactly C{max_recipients}; one 452 too many beyond C{max_errors} is 421;
 - slow clients: 200 sessions trickling a byte a second and 50 idle ones do
   not keep a new client from its 220 and 250, the node's resident memory
   stays bounded, and the idle ones get 421 4.4.2 at C{idle_timeout};
 - over TLS the node's own close is a close: the intake unregisters itself
   as the transport's producer first (Twisted's TLS layer holds its
   close_notify and the close until then), and a client that does not answer
   the close_notify is cut off after a grace period.

Every wait has a deadline (socket timeouts, C{select}, L{wait_for}); the
paced writer of the slow-client test is a C{select} loop.

Messages for C{held.test} are relayed to a next hop that refuses connections,
so each accepted transaction stays in C{queue/new/} with its envelope.
"""

from __future__ import annotations

import base64
import json
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest

from harness.nodeproc import HOST, NodeProcess, free_port, read_reply, wait_for
from harness.peers import SMTP_SOURCE, missing_binaries, run_smtp_source
from relaynet.intake.auth import hash_password
from relaynet.smtp.tls import generate_ca, generate_cert

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

READ_TIMEOUT = 10.0
T = TypeVar("T")
PASSWORD = "correct horse battery staple"
MAX_RECIPIENTS = 100
OVERSHOOT = 1000
MAX_ERRORS = 20
IDLE_TIMEOUT = 3.0

MESSAGE = b"From: a@example.org\r\nSubject: hostile\r\n\r\nbody line\r\n"

NODE_TOML = """\
[node]
name = "{name}"
hostname = "relay.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
[[listener]]
endpoint = "tcp:SUBMISSIONS:interface=127.0.0.1"
mode = "submissions"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"
[auth.senders]
alice = ["alice@example.org"]

[local]
domains = ["localhost"]
catch_all = true

[[route]]
domains = ["held.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DEAD"]

[limits]
max_recipients = MAX_RECIPIENTS
recipient_overshoot_limit = OVERSHOOT
max_errors = MAX_ERRORS
idle_timeout = IDLE
forbid_unauth_pipelining = FORBID
"""


def node_toml(d: Path, *, forbid: bool = True, idle: float = 60.0) -> tuple[str, int]:
    """
    The config of a test node in C{d} (certificate and password file made
    there): a relay listener on C{{port}} and an implicit-TLS submission
    listener, with alice's password; C{held.test} relayed to a dead port.

    @return: the TOML and the submission port.
    """
    ca, ca_key = generate_ca(d)
    cert, key = generate_cert(d, ca, ca_key, ["relay.test"])
    (d / "passwd").write_text(f"alice:{hash_password(PASSWORD, ln=4)}\n")
    submissions = free_port()
    replacements = {
        "SUBMISSIONS": str(submissions), "DEAD": str(free_port()), "CERT": str(cert),
        "KEY": str(key), "MAX_RECIPIENTS": str(MAX_RECIPIENTS), "OVERSHOOT": str(OVERSHOOT),
        "MAX_ERRORS": str(MAX_ERRORS), "IDLE": str(idle), "FORBID": str(forbid).lower(),
    }
    toml = NODE_TOML
    for token, value in replacements.items():
        toml = toml.replace(token, value)
    return toml, submissions


class HostileNode(NodeProcess):
    """A test node that also listens for implicit TLS on C{submissions_port}."""

    submissions_port = 0


def start_node(d: Path, name: str, *, forbid: bool = True, idle: float = 60.0) -> HostileNode:
    toml, submissions = node_toml(d, forbid=forbid, idle=idle)
    node = HostileNode(d, toml, name=name)
    node.submissions_port = submissions
    node.start()
    return node


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileNode]:
    """A node with the defaults of a public relay: improper pipelining refused."""
    node = start_node(tmp_path_factory.mktemp("hostile-strict"), "strict")
    with node:
        yield node


@pytest.fixture(scope="module")
def lax(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileNode]:
    """The same node with C{forbid_unauth_pipelining = false}."""
    node = start_node(tmp_path_factory.mktemp("hostile-lax"), "lax", forbid=False)
    with node:
        yield node


# -- a raw client ---------------------------------------------------------------


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


Reply = tuple[int, list[bytes]]


class Wire:
    """
    An SMTP client on a raw socket (implicit TLS with C{tls}). C{send} writes
    bytes as given, in one C{sendall}; every read waits at most
    C{READ_TIMEOUT} (a timeout fails the test).
    """

    def __init__(self, port: int, *, tls: bool = False, source: str = HOST) -> None:
        sock = socket.create_connection((HOST, port), timeout=READ_TIMEOUT,
                                        source_address=(source, 0))
        if tls:
            sock = _unverified().wrap_socket(sock)
        self.sock = sock
        self.f = sock.makefile("rb")
        self.greeting = read_reply(self.f)
        assert self.greeting[0] == 220, self.greeting

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[Reply]:
        """The next C{n} replies; a C{(0, [])} for each one the close cut off."""
        out = []
        for _ in range(n):
            try:
                out.append(read_reply(self.f))
            except (ConnectionResetError, BrokenPipeError):
                out.append((0, []))
        return out

    def cmd(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.replies(1)[0]

    def at_eof(self) -> bool:
        """The node closed the connection (EOF within the deadline, no more replies)."""
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:
            return True

    def auth(self) -> None:
        assert self.cmd(b"EHLO hostile.client")[0] == 250
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
        code, lines = self.cmd(b"AUTH PLAIN " + token)
        assert code == 235, lines

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def coded(replies: list[Reply]) -> list[tuple[int, str]]:
    """C{(code, enhanced status code)} of each reply (its last line)."""
    return [(c, lines[-1][4:].split(b" ", 1)[0].decode() if lines else "") for c, lines in replies]


def queued_id(reply: Reply) -> str:
    code, lines = reply
    assert code == 250 and b"queued as " in lines[-1], reply
    return lines[-1].rsplit(b" ", 1)[1].decode()


def queue_ids(node: NodeProcess) -> set[str]:
    return {p.name for p in node.queue_files("new")}


def envelope(node: NodeProcess, queue_id: str) -> dict[str, Any]:
    """The envelope of C{queue/new/ID} (docs/spool-format.md: the second line, JSON)."""
    record: dict[str, Any] = json.loads((node.queue / "new" / queue_id).read_bytes().split(b"\n", 2)[1])
    return record


def transaction(rcpt: str = "user@held.test", sender: str = "a@example.org") -> bytes:
    """MAIL, RCPT, DATA, the message and the final dot."""
    return (
        f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode() + MESSAGE + b".\r\n"
    )


# -- improper pipelining ----------------------------------------------------------


@pytest.mark.slow
def test_content_before_354_refused_then_accepted_when_allowed(
    strict: HostileNode, lax: HostileNode
) -> None:
    """
    MAIL, RCPT, DATA and the message with its final dot in one write (the
    body sent before the 354: a spam engine, or SMTP smuggling's way to get
    body lines read as commands): MAIL and RCPT are answered, DATA gets
    554 5.5.0 instead of 354, the node closes the connection and queues
    nothing. The same bytes to a node with C{forbid_unauth_pipelining =
    false} are one queued message.
    """
    before = queue_ids(strict)
    with Wire(strict.port) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        c.send(transaction() + b"QUIT\r\n")
        replies = c.replies(3)
        assert coded(replies) == [(250, "2.1.0"), (250, "2.1.5"), (554, "5.5.0")], replies
        assert b"synchronization" in replies[2][1][-1]
        assert c.at_eof()
    assert queue_ids(strict) == before
    assert strict.queue_files("tmp") == [], "the half-begun queue file is removed"

    before = queue_ids(lax)
    with Wire(lax.port) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        c.send(transaction() + b"QUIT\r\n")
        replies = c.replies(5)
        assert [code for code, _ in replies] == [250, 250, 354, 250, 221], replies
        queue_id = queued_id(replies[3])
        assert c.at_eof()
    assert queue_ids(lax) - before == {queue_id}
    env = envelope(lax, queue_id)
    assert [r["address"] for r in env["recipients"]] == ["user@held.test"]


GROUP_ENDING = [
    pytest.param(b"", b"EHLO hostile.client\r\n", b"MAIL FROM:<a@example.org>\r\n", id="EHLO"),
    pytest.param(b"", b"HELO hostile.client\r\n", b"MAIL FROM:<a@example.org>\r\n", id="HELO"),
    pytest.param(b"EHLO hostile.client\r\n", b"NOOP\r\n", b"MAIL FROM:<a@example.org>\r\n", id="NOOP"),
    pytest.param(b"EHLO hostile.client\r\n", b"VRFY user@held.test\r\n", b"QUIT\r\n", id="VRFY"),
    pytest.param(b"EHLO hostile.client\r\n", b"EHLO again.client\r\n", b"RSET\r\n", id="EHLO-again"),
]


@pytest.mark.slow
@pytest.mark.parametrize("setup, last, after", GROUP_ENDING)
def test_command_after_a_group_ending_command_refused(
    strict: HostileNode, setup: bytes, last: bytes, after: bytes
) -> None:
    """
    A command sent in the same write after one that must end a pipelined
    group (RFC 2920 3.1; the set Postfix marks SMTPD_CMD_FLAG_LAST: HELO,
    EHLO, NOOP, VRFY, DATA): that command is not run, the reply is 554
    5.5.0 and the node closes the connection, whatever follows.
    """
    with Wire(strict.port) as c:
        if setup:
            assert c.cmd(setup.rstrip(b"\r\n"))[0] == 250
        c.send(last + after)
        replies = c.replies(1)
        assert coded(replies) == [(554, "5.5.0")], replies
        assert c.at_eof()


NOT_GROUP_ENDING = [
    pytest.param(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@held.test>\r\nRSET\r\nQUIT\r\n",
                 [250, 250, 250, 250, 221], id="RSET-MAIL-RCPT"),
    pytest.param(b"HELP\r\nRSET\r\nQUIT\r\n", [214, 250, 221], id="HELP"),
    pytest.param(b"QUIT\r\nNOOP\r\n", [221], id="QUIT"),
]


@pytest.mark.slow
@pytest.mark.parametrize("group, expected", NOT_GROUP_ENDING)
def test_commands_that_may_be_followed_are_accepted(
    strict: HostileNode, group: bytes, expected: list[int]
) -> None:
    """
    After EHLO, RSET, MAIL, RCPT and HELP may be followed in the same group,
    and QUIT is answered 221 (what a client sends after QUIT is not run):
    as with Postfix, which does not flag QUIT although RFC 2920 lists it.
    """
    with Wire(strict.port) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        c.send(group)
        assert [code for code, _ in c.replies(len(expected))] == expected
        assert c.at_eof()


@pytest.mark.slow
def test_authenticated_client_is_exempt(strict: HostileNode) -> None:
    """
    On the implicit-TLS submission listener, a client that has not
    authenticated and pipelines past NOOP gets 554 5.5.0 and is dropped (so
    the rule holds over TLS as well); after AUTH PLAIN, the same client
    pipelining NOOP, MAIL, RCPT, DATA, its message (before the 354) and QUIT
    in one write gets every reply and its message queued, as docs/config.md
    says ("a client that has not authenticated"). Postfix does not exempt
    authenticated clients (smtpd.c checks no SASL state); this is ours.
    """
    sub = strict.submissions_port
    with Wire(sub, tls=True) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        c.send(b"NOOP\r\nMAIL FROM:<alice@example.org>\r\n")
        assert coded(c.replies(1)) == [(554, "5.5.0")]
        # That the node then closes a TLS session: test_tls_session_closed_by_the_node.

    before = queue_ids(strict)
    with Wire(sub, tls=True) as c:
        c.auth()
        c.send(b"NOOP\r\n" + transaction(sender="alice@example.org") + b"QUIT\r\n")
        replies = c.replies(6)
        assert [code for code, _ in replies] == [250, 250, 250, 354, 250, 221], replies
        queue_id = queued_id(replies[4])
    assert queue_ids(strict) - before == {queue_id}
    env = envelope(strict, queue_id)
    assert env["client"]["auth"] == "alice"
    assert env["client"]["protocol"] == "ESMTPSA"


class BareTLS:
    """
    A TLS client over a memory BIO: it sees the TLS close_notify and the TCP
    close apart, and never answers a close_notify (a careless or hostile
    client that just stops).
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=READ_TIMEOUT)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _unverified().wrap_bio(self.incoming, self.outgoing)
        self._pump(self.tls.do_handshake)
        self.buffer = b""
        self.close_notify = False

    def _pump(self, op: Callable[[], T]) -> T:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("TCP closed") from None
                self.incoming.write(data)
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self._pump(lambda: self.tls.write(data))

    def reply(self) -> Reply:
        """One reply; C{(0, [])} once the node sent its close_notify."""
        lines: list[bytes] = []
        while True:
            while b"\n" not in self.buffer:
                try:
                    chunk = self._pump(lambda: self.tls.read(65536))
                except ssl.SSLZeroReturnError:
                    chunk = b""
                if not chunk:  # the ssl module's read() gives b"" after a close_notify
                    self.close_notify = True
                    return 0, lines
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            lines.append(line.rstrip(b"\r"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def tcp_closed_within(self, seconds: float) -> float | None:
        """Seconds until the node closed the TCP connection, or L{None} if it did not in time."""
        start = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return None
        return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()


#: How long, at most, the node waits for a closing client
#: (C{relaynet.intake.server._CLOSE_GRACE}).
CLOSE_GRACE = 5.0


@pytest.mark.slow
def test_tls_session_closed_by_the_node(strict: HostileNode) -> None:
    """
    Over TLS, the node's own close after 554 5.5.0 really closes: the
    client gets the TLS close_notify right after the 554, and a client that
    never answers it is cut off (TCP closed) within CLOSE_GRACE + 2 s, so it
    cannot keep its connection slot (max_connections, max_connections_per_ip)
    after the node has said goodbye. (Twisted's TLSMemoryBIOProtocol sends
    close_notify only once no producer is registered, then waits for the
    client's close_notify.)
    """
    c = BareTLS(strict.submissions_port)
    try:
        assert c.reply()[0] == 220
        c.send(b"EHLO hostile.client\r\n")
        assert c.reply()[0] == 250
        c.send(b"NOOP\r\nMAIL FROM:<alice@example.org>\r\n")
        assert coded([c.reply()]) == [(554, "5.5.0")]
        c.sock.settimeout(5.0)
        try:
            assert c.reply() == (0, []) and c.close_notify
        except TimeoutError:
            raise AssertionError("no close_notify within 5 s of the 554") from None
        took = c.tcp_closed_within(CLOSE_GRACE + 2.0)
        assert took is not None, "a client ignoring the close_notify is never cut off"
    finally:
        c.close()


def _swaks_pipeline_missing() -> str | None:
    if shutil.which("swaks") is None:
        return "swaks not installed (make peers)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_swaks_pipeline_missing() is not None, reason=str(_swaks_pipeline_missing()))
def test_swaks_pipelining_is_accepted(strict: HostileNode) -> None:
    """
    swaks C{--pipeline}, a client that really pipelines (MAIL, RCPT, DATA in
    one write once EHLO offered PIPELINING), is not taken for an improper
    one: exit 0, the message queued, no 554.
    """
    before = queue_ids(strict)
    result = subprocess.run(
        ["swaks", "--server", f"{HOST}:{strict.port}", "--helo", "swaks.client",
         "--from", "a@example.org", "--to", "one@held.test,two@held.test", "--pipeline",
         "--timeout", "20"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "250-PIPELINING" in out, out
    assert " 554 " not in out, out
    # swaks sent MAIL, both RCPTs and DATA before reading any of their replies.
    lines = out.splitlines()
    sent = [i for i, line in enumerate(lines) if line.startswith(" -> ")]
    mail = next(i for i in sent if lines[i].startswith(" -> MAIL FROM"))
    data = next(i for i in sent if lines[i] == " -> DATA")
    assert all(lines[i].startswith(" -> ") for i in range(mail, data + 1)), lines[mail:data + 1]
    (new,) = queue_ids(strict) - before
    assert f"queued as {new}" in out, out
    assert [r["address"] for r in envelope(strict, new)["recipients"]] == [
        "one@held.test", "two@held.test"]


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_binaries([SMTP_SOURCE])), reason="smtp-source not installed")
def test_smtp_source_is_accepted(strict: HostileNode) -> None:
    """
    Postfix's smtp-source (which waits for every reply: its man page lists
    "No SMTP command pipelining support"), 20 messages over 4 sessions, 5 per
    connection: no 554, all 20 queued.
    """
    before = queue_ids(strict)
    run_smtp_source(HOST, strict.port, messages=20, sessions=4, size=200,
                    sender="source@example.org", recipient="source@held.test",
                    reuse_connection=True, timeout=60)
    new = queue_ids(strict) - before
    assert len(new) == 20, new


# -- recipient overshoot ------------------------------------------------------------


def _rcpts(n: int) -> bytes:
    return b"".join(b"RCPT TO:<u%04d@held.test>\r\n" % i for i in range(n))


@pytest.mark.slow
def test_recipient_overshoot_on_the_wire(strict: HostileNode) -> None:
    """
    With max_recipients 100, recipient_overshoot_limit 1000 and max_errors
    20: 1,119 pipelined RCPTs (the overshoot limit plus 19 that count as
    errors) get 100 × 250 then 1,019 × 452 4.5.3; the session stays open,
    DATA gets 354 and the message is queued with exactly the first 100
    recipients. One recipient more in another session is the 20th error:
    421 4.7.0, the connection closed, nothing queued.
    """
    excess = OVERSHOOT + MAX_ERRORS - 1
    before = queue_ids(strict)
    with Wire(strict.port) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        assert c.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
        c.send(_rcpts(MAX_RECIPIENTS + excess))
        replies = coded(c.replies(MAX_RECIPIENTS + excess))
        assert replies[:MAX_RECIPIENTS] == [(250, "2.1.5")] * MAX_RECIPIENTS
        assert replies[MAX_RECIPIENTS:] == [(452, "4.5.3")] * excess
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        queue_id = queued_id(c.replies(1)[0])
        assert c.cmd(b"QUIT")[0] == 221
    assert queue_ids(strict) - before == {queue_id}
    addresses = [r["address"] for r in envelope(strict, queue_id)["recipients"]]
    assert addresses == [f"u{i:04d}@held.test" for i in range(MAX_RECIPIENTS)]

    with Wire(strict.port) as c:
        assert c.cmd(b"EHLO hostile.client")[0] == 250
        assert c.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
        c.send(_rcpts(MAX_RECIPIENTS + excess + 1) + b"DATA\r\n")
        # The 20th error is answered, then 421 follows it.
        replies = coded(c.replies(MAX_RECIPIENTS + excess + 2))
        assert replies[MAX_RECIPIENTS:] == [(452, "4.5.3")] * (excess + 1) + [(421, "4.7.0")]
        assert c.at_eof()
    assert queue_ids(strict) - before == {queue_id}


# -- slow clients --------------------------------------------------------------------


SLOW = 200
IDLE_SESSIONS = 50
#: VmRSS growth allowed with every slow and idle session connected, per
#: session (measured: under 4 KiB; socket buffers are the kernel's).
RSS_PER_SESSION_KIB = 64
NEW_CLIENT_BOUND = 3.0


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def _fresh_message(port: int) -> tuple[float, float, str]:
    """A new client: seconds to its 220, seconds to its 250 after the dot, queue id."""
    start = time.monotonic()
    with Wire(port) as c:
        greeted = time.monotonic() - start
        c.send(b"EHLO fresh.client\r\n")
        assert c.replies(1)[0][0] == 250
        for line in (b"MAIL FROM:<fresh@example.org>", b"RCPT TO:<fresh@held.test>", b"DATA"):
            assert c.cmd(line)[0] in (250, 354)
        c.send(MESSAGE + b".\r\n")
        queue_id = queued_id(c.replies(1)[0])
        done = time.monotonic() - start
        assert c.cmd(b"QUIT")[0] == 221
    return greeted, done, queue_id


@pytest.mark.slow
def test_slow_and_idle_clients(tmp_path: Path) -> None:
    """
    200 sessions each sending one byte a second (100 trickling a command
    line, 100 a message body inside DATA) and 50 idle ones (25 silent since
    the greeting, 25 since EHLO), on a node with idle_timeout 3 s:

     - a new client is greeted and gets its message queued within 3 s,
       twice (right after they all connected, and after the idle ones left);
     - the node's VmRSS grows by less than 64 KiB a session;
     - each idle session gets 421 4.4.2 and EOF between idle_timeout and
       idle_timeout + 2 s after its last byte;
     - so does each session trickling a command line that never ends: the
       idle timer runs per command line, not per byte (as Postfix's
       smtpd_per_record_deadline), so it cannot hold its slot forever;
     - the sessions trickling a message body inside DATA (data_timeout, per
       read) are not closed meanwhile (so the checks above ran with them
       connected);
     - once every client has gone, no partial message is left in C{tmp/}.
    """
    node = start_node(tmp_path / "node", "slow", idle=IDLE_TIMEOUT)
    socks: list[socket.socket] = []
    try:
        with node:
            base_rss = vm_rss_kib(node.pid)
            trickle_cmd: list[socket.socket] = []
            trickle_data: list[socket.socket] = []
            idle: dict[socket.socket, float] = {}
            command = b"NOOP " + b"x" * 4000
            body = b"X-Slow: " + b"z" * 4000
            for i in range(SLOW + IDLE_SESSIONS):
                s = socket.create_connection((HOST, node.port), timeout=READ_TIMEOUT)
                socks.append(s)
                f = s.makefile("rb")
                assert read_reply(f)[0] == 220
                if i < SLOW // 2:
                    s.sendall(command[:1])
                    trickle_cmd.append(s)
                    idle[s] = time.monotonic()  # its last complete line: the greeting's
                elif i < SLOW:
                    for line in (b"EHLO slow.client", b"MAIL FROM:<slow@example.org>",
                                 b"RCPT TO:<slow@held.test>", b"DATA"):
                        s.sendall(line + b"\r\n")
                        assert read_reply(f)[0] in (250, 354)
                    s.sendall(body[:1])
                    trickle_data.append(s)
                else:
                    if i % 2:
                        s.sendall(b"EHLO idle.client\r\n")
                        assert read_reply(f)[0] == 250
                    idle[s] = time.monotonic()
                f.close()
            trickling = trickle_data
            sent = 1
            dropped: dict[socket.socket, tuple[float, bytes]] = {}

            def tick() -> None:
                nonlocal sent
                # A command trickler whose 421 has arrived gets no more bytes
                # (a byte to a closed socket draws a reset that would drop the
                # unread 421).
                waiting = [s for s in trickle_cmd if s.fileno() >= 0 and s not in dropped]
                answered, _, _ = select.select(waiting, [], [], 0) if waiting else ([], [], [])
                for s in waiting:
                    if s not in answered:
                        try:
                            s.sendall(command[sent:sent + 1])
                        except OSError:
                            pass  # cut off at idle_timeout, as it should be
                for s in trickle_data:
                    s.sendall(body[sent:sent + 1])
                sent += 1

            tick()
            rss = vm_rss_kib(node.pid)
            greeted, done, first_id = _fresh_message(node.port)
            assert greeted < NEW_CLIENT_BOUND and done < NEW_CLIENT_BOUND, (greeted, done)

            # Trickle a byte a second until every idle session has been closed.
            pending: dict[socket.socket, bytes] = {s: b"" for s in idle}
            deadline = time.monotonic() + IDLE_TIMEOUT + 5
            next_tick = time.monotonic() + 1.0
            while pending:
                now = time.monotonic()
                assert now < deadline, f"{len(pending)} idle sessions still open"
                if now >= next_tick:
                    tick()
                    rss = max(rss, vm_rss_kib(node.pid))
                    next_tick += 1.0
                ready, _, _ = select.select(list(pending) + trickling, [], [],
                                            max(0.0, min(next_tick, deadline) - now))
                for s in ready:
                    assert s in pending, "a trickling session got a reply or was closed"
                    chunk = s.recv(4096)
                    if chunk:
                        pending[s] += chunk
                    else:
                        dropped[s] = (time.monotonic(), pending.pop(s))
            for s, (when, data) in dropped.items():
                assert data.startswith(b"421 4.4.2 ") and data.endswith(b"\r\n"), data
                assert data.count(b"\r\n") == 1, data
                elapsed = when - idle[s]
                assert IDLE_TIMEOUT - 0.2 <= elapsed <= IDLE_TIMEOUT + 2.0, elapsed

            # The trickling sessions are all still there.
            tick()
            ready, _, _ = select.select(trickling, [], [], 0.2)
            assert ready == [], "a trickling session was closed"
            growth = rss - base_rss
            assert growth < (SLOW + IDLE_SESSIONS) * RSS_PER_SESSION_KIB, (base_rss, rss)
            greeted, done, second_id = _fresh_message(node.port)
            assert greeted < NEW_CLIENT_BOUND and done < NEW_CLIENT_BOUND, (greeted, done)
            assert {first_id, second_id} <= queue_ids(node)

            for s in socks:
                s.close()
            socks.clear()
            wait_for(lambda: node.queue_files("tmp") == [], 10, "partial messages removed")
    finally:
        for s in socks:
            s.close()
