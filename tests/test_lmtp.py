"""
Tests for L{relaynet.delivery.lmtp}: LMTP delivery (RFC 2033).

Two tiers:

 - in process: the real L{LMTPAgent} and L{LMTPSession} on a
   L{MemoryReactorClock}, connected over L{twisted.test.iosim} to
   L{FakeLMTPServer} (a scripted LMTP server that answers once per accepted
   recipient after the final dot), through L{Delivery} so that each reply
   is checked as the recipient's L{Outcome}; and the queue core, for the
   DSNs those outcomes give;
 - real (C{slow}): a private Dovecot (C{dovecot -F} with its own config,
   base_dir, state_dir, users file and Maildirs under the test's directory,
   listening on a UNIX socket and on a loopback TCP port, one user over
   quota so that Dovecot answers 452 after the dot for that user alone)
   behind a real relaynet node (C{twistd relaynet},
   L{harness.nodeproc.NodeProcess}) whose route is C{action = "lmtp"}. Skipped, with the reason, only when Dovecot's LMTP
   server is not installed (C{make peers} installs it) or we are not root.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relaynet.config import NodeConfig, parse_config
from relaynet.delivery.attempt import Delivery
from relaynet.delivery.client import BodySender, DeliveryResult
from relaynet.delivery.lmtp import LMTPAgent, lmtp_name
from relaynet.delivery.routing import RoutingTable
from relaynet.queue.core import Outcome, QueueCore
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.queue.states import OutcomeEvent, RecipientStatus
from relaynet.testing import accept_connection, make_queue_entry

SENDER = "sender@example.org"
MESSAGE = b"From: sender@example.org\r\nTo: a@mail.test\r\nSubject: lmtp\r\n\r\nHello.\r\n"
TIMEOUTS = dict(
    connect_timeout=11.0, helo_timeout=13.0, mail_timeout=17.0, rcpt_timeout=19.0,
    data_timeout=23.0, data_block_timeout=29.0, data_done_timeout=31.0,
)
LMTP_HOP = "tcp:127.0.0.1:24"
BACKUP_HOP = "tcp:127.0.0.2:24"


def node_config(*hops: str) -> NodeConfig:
    """A node whose domain C{mail.test} goes to LMTP servers C{hops} (priority order)."""
    return parse_config({
        "node": {"hostname": "relay.test"},
        "outbound": TIMEOUTS,
        "route": [{"domains": ["mail.test"], "action": "lmtp",
                   "next_hops": [{"endpoint": h, "priority": 10 * (i + 1)} for i, h in enumerate(hops)]}],
    }, source="<test>")


class FakeLMTPServer(Protocol):
    """
    A scripted LMTP server: LHLO, MAIL, RCPT, DATA and, after the final dot,
    one reply per accepted recipient (RFC 2033 4.2).

    @ivar rcpt: the RCPT reply for an address (default C{250 2.1.5 OK}).
    @ivar after_dot: replies after the dot, used in order, one per accepted
        recipient (default C{250 2.0.0 <addr> Saved}).
    @ivar drop_after: close the connection after this many body lines.
    @ivar silent_after_dot: send no reply after the dot at all.
    @ivar reads: every read, as it arrived.
    @ivar commands: the command lines.
    @ivar body: the message as received, dot-stuffing removed.
    @ivar raw_body: the DATA lines as they came over the wire.
    """

    transport: Any

    def __init__(
        self, extensions: tuple[bytes, ...] = (b"8BITMIME", b"ENHANCEDSTATUSCODES", b"PIPELINING"),
        rcpt: dict[str, bytes] | None = None, after_dot: list[bytes] | None = None,
        mail: bytes = b"250 2.1.0 OK", greeting: bytes = b"220 lmtp.test Dovecot ready.",
        drop_after: int | None = None, silent_after_dot: bool = False,
    ) -> None:
        self.extensions = extensions
        self.rcpt = rcpt or {}
        self.after_dot = list(after_dot or [])
        self.mail = mail
        self.greeting = greeting
        self.drop_after = drop_after
        self.silent_after_dot = silent_after_dot
        self.reads: list[bytes] = []
        self.commands: list[bytes] = []
        self.accepted: list[str] = []
        self.body: bytes | None = None
        self.raw_body: list[bytes] = []
        self._data: list[bytes] | None = None
        self._buf = b""
        self.lost = False

    def connectionMade(self) -> None:
        self._send(self.greeting)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self._buf += data
        for _ in range(100000):
            if self.transport.disconnecting:
                return
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                return
            line, self._buf = self._buf[:nl], self._buf[nl + 2:]
            if self._data is not None:
                self._data_line(line)
            else:
                self._command(line)

    def _data_line(self, line: bytes) -> None:
        assert self._data is not None
        if line == b".":
            self.body = b"".join(x + b"\r\n" for x in self._data)
            self._data = None
            if self.silent_after_dot:
                return
            for addr in self.accepted:
                self._send(self.after_dot.pop(0) if self.after_dot else b"250 2.0.0 <%s> Saved" % addr.encode())
            return
        self.raw_body.append(line)
        self._data.append(line[1:] if line.startswith(b".") else line)
        if self.drop_after is not None and len(self._data) >= self.drop_after:
            self.transport.loseConnection()

    def _command(self, line: bytes) -> None:
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"LHLO":
            lines = [b"lmtp.test", *self.extensions]
            self._send(b"\r\n".join(
                b"250%s%s" % (b" " if i == len(lines) - 1 else b"-", t) for i, t in enumerate(lines)
            ))
        elif verb == b"MAIL":
            self._send(self.mail)
        elif verb == b"RCPT":
            addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            reply = self.rcpt.get(addr, b"250 2.1.5 OK")
            if self.mail.startswith(b"2") and reply.startswith(b"2"):
                self.accepted.append(addr)
            self._send(reply if self.mail.startswith(b"2") else b"503 5.5.1 MAIL needed first")
        elif verb == b"DATA":
            if self.accepted:
                self._data = []
                self._send(b"354 OK")
            else:
                self._send(b"503 5.5.1 No valid recipients")
        elif verb == b"QUIT":
            self._send(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self._send(b"502 5.5.2 Unknown command")


class Run:
    """One delivery attempt through L{Delivery} and a real L{LMTPAgent} on a fake reactor."""

    def __init__(self, tmp_path: Path, rcpts: tuple[str, ...], message: bytes = MESSAGE,
                 hops: tuple[str, ...] = (LMTP_HOP,), **params: Any) -> None:
        self.reactor = MemoryReactorClock()
        config = node_config(*hops)
        self.entry = make_queue_entry(tmp_path, message, SENDER, rcpts, params or None)
        self.agent = LMTPAgent(self.reactor, lambda: config)
        table = RoutingTable(config)
        self.delivery = Delivery(lambda: table, NoOutbound(), NoMailboxes(), lambda: None,
                                 shuffle=lambda h: None, lmtp=self.agent)
        self.result: list[Any] = []
        self.delivery.attempt(self.entry, list(self.entry.envelope.recipients)).addBoth(self.result.append)

    def serve(self, server: FakeLMTPServer, index: int = -1) -> Any:
        """Complete the last connection made to C{server}; move every byte."""
        _client, pump = accept_connection(self.reactor, server, index)
        pump.flush()
        return pump

    def outcomes(self) -> dict[str, Outcome]:
        [result] = self.result
        assert isinstance(result, list), result
        return {o.address: o for o in result}


class NoOutbound:
    def deliver(self, *a: Any, **kw: Any) -> Deferred[list[DeliveryResult]]:
        raise AssertionError("an LMTP route must not use the SMTP client")


class NoMailboxes:
    def deliver(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("an LMTP route must not write local mailboxes")


# -- per-recipient replies ---------------------------------------------------


def test_one_reply_per_recipient_after_the_dot(tmp_path: Path) -> None:
    """
    After the final dot each accepted recipient gets its own reply, in RCPT
    order: 2xx delivered (final delivery, naming the LMTP server), 4xx
    deferred, 5xx bounced with the server's text; a recipient refused at
    RCPT keeps that refusal.
    """
    # The refused recipient is between two accepted ones: it gets no reply after the dot.
    run = Run(tmp_path, ("a@mail.test", "nobody@mail.test", "b@mail.test", "c@mail.test"))
    server = FakeLMTPServer(
        rcpt={"nobody@mail.test": b"550 5.1.1 <nobody@mail.test> User doesn't exist: nobody@mail.test"},
        # Replies that do not name their recipient: only their order says whose they are.
        after_dot=[b"250 2.0.0 Saved", b"452 4.2.2 Mailbox is full", b"552 5.2.2 Quota exceeded"],
    )
    run.serve(server)
    out = run.outcomes()
    a, b, c, nobody = (out[x] for x in ("a@mail.test", "b@mail.test", "c@mail.test", "nobody@mail.test"))
    assert (a.status, a.event, a.dsn, a.remote) == (
        RecipientStatus.DELIVERED, OutcomeEvent.DELIVERED, "2.0.0", "127.0.0.1:24")
    assert a.diagnostic == "250 2.0.0 Saved"
    assert (b.status, b.dsn, b.diagnostic) == (RecipientStatus.DEFERRED, "4.2.2", "452 4.2.2 Mailbox is full")
    assert (c.status, c.dsn, c.code, c.text) == (RecipientStatus.BOUNCED, "5.2.2", 552, "Quota exceeded")
    assert (nobody.status, nobody.dsn) == (RecipientStatus.BOUNCED, "5.1.1")
    assert nobody.diagnostic == "550 5.1.1 <nobody@mail.test> User doesn't exist: nobody@mail.test"
    assert server.commands[0] == b"LHLO relay.test"
    assert server.commands[-1] == b"QUIT" and server.lost


def test_rcpt_452_defers_only_that_recipient(tmp_path: Path) -> None:
    """A 452 at RCPT defers its recipient; the others are delivered in the same session."""
    run = Run(tmp_path, ("a@mail.test", "full@mail.test", "b@mail.test"))
    server = FakeLMTPServer(rcpt={"full@mail.test": b"452 4.2.2 <full@mail.test> Quota exceeded"})
    run.serve(server)
    out = run.outcomes()
    assert [out[x].status for x in ("a@mail.test", "full@mail.test", "b@mail.test")] == [
        RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, RecipientStatus.DELIVERED]
    assert out["full@mail.test"].dsn == "4.2.2"
    assert out["b@mail.test"].diagnostic == "250 2.0.0 <b@mail.test> Saved"


@pytest.mark.parametrize("reply, status", [
    (b"550 5.7.1 Sender refused", RecipientStatus.BOUNCED),
    (b"451 4.3.0 Try again", RecipientStatus.DEFERRED),
])
@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_mail_applies_to_every_recipient(
    tmp_path: Path, reply: bytes, status: RecipientStatus, pipelining: bool,
) -> None:
    """A refused MAIL is every recipient's answer (5xx bounced, 4xx deferred); no DATA is sent."""
    run = Run(tmp_path, ("a@mail.test", "b@mail.test"))
    ext = (b"PIPELINING",) if pipelining else ()
    server = FakeLMTPServer(extensions=ext, mail=reply)
    run.serve(server)
    out = run.outcomes()
    assert {o.status for o in out.values()} == {status}
    assert {o.code for o in out.values()} == {int(reply[:3])}
    assert server.body is None


def test_pipelining_sends_the_transaction_in_one_write(tmp_path: Path) -> None:
    """With PIPELINING, MAIL, every RCPT and DATA arrive in one read."""
    run = Run(tmp_path, ("a@mail.test", "b@mail.test"))
    server = FakeLMTPServer()
    run.serve(server)
    assert b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@mail.test>\r\nRCPT TO:<b@mail.test>\r\nDATA\r\n" in server.reads
    assert all(o.status is RecipientStatus.DELIVERED for o in run.outcomes().values())


def test_without_pipelining_each_reply_is_awaited(tmp_path: Path) -> None:
    """Without PIPELINING, one command per read; when every RCPT is refused, no DATA."""
    run = Run(tmp_path, ("x@mail.test", "y@mail.test"))
    server = FakeLMTPServer(extensions=(b"ENHANCEDSTATUSCODES",), rcpt={
        "x@mail.test": b"550 5.1.1 no x", "y@mail.test": b"550 5.1.1 no y"})
    run.serve(server)
    assert [r for r in server.reads if r.startswith((b"MAIL", b"RCPT", b"DATA"))] == [
        b"MAIL FROM:<sender@example.org>\r\n", b"RCPT TO:<x@mail.test>\r\n", b"RCPT TO:<y@mail.test>\r\n"]
    assert [o.diagnostic for o in run.outcomes().values()] == ["550 5.1.1 no x", "550 5.1.1 no y"]


# -- the body ----------------------------------------------------------------

TRICKY = (
    b".first line starts with a dot\r\n\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"a line\r\n"
    b". dot space\r\n"
    b"last line without a dot\r\n"
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 2**16])
def test_dot_stuffing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """
    Every line-initial dot is doubled on the wire, on the first line and
    across chunk boundaries alike (trap 16): the server reads back exactly
    the stored message, and a lone dot in it never ends DATA early.
    """
    monkeypatch.setattr(BodySender, "CHUNK", chunk)
    run = Run(tmp_path, ("a@mail.test",), message=TRICKY)
    server = FakeLMTPServer()
    run.serve(server)
    assert server.body == TRICKY
    assert server.raw_body[:3] == [b"..first line starts with a dot", b"", b".."]
    assert run.outcomes()["a@mail.test"].status is RecipientStatus.DELIVERED


def test_message_without_final_crlf_is_terminated(tmp_path: Path) -> None:
    """A stored message that does not end in CRLF gets one before the final dot."""
    run = Run(tmp_path, ("a@mail.test",), message=b"Subject: x\r\n\r\nno newline")
    server = FakeLMTPServer()
    run.serve(server)
    assert server.body == b"Subject: x\r\n\r\nno newline\r\n"


def test_eight_bit_message_to_a_server_without_8bitmime_bounces(tmp_path: Path) -> None:
    """An 8-bit message is not sent to a server that does not offer 8BITMIME (RFC 6152)."""
    run = Run(tmp_path, ("a@mail.test",), message=b"Subject: x\r\n\r\n\xc3\xa9\r\n", body="8BITMIME")
    server = FakeLMTPServer(extensions=(b"PIPELINING",))
    run.serve(server)
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.dsn) == (RecipientStatus.BOUNCED, "5.6.3")
    assert not any(c.startswith(b"MAIL") for c in server.commands)


def test_eight_bit_message_says_so(tmp_path: Path) -> None:
    """MAIL carries BODY=8BITMIME (and SIZE when offered) for an 8-bit message."""
    run = Run(tmp_path, ("a@mail.test",), message=b"Subject: x\r\n\r\n\xc3\xa9\r\n", body="8BITMIME")
    server = FakeLMTPServer(extensions=(b"PIPELINING", b"8BITMIME", b"SIZE 1000"))
    run.serve(server)
    [mail] = [c for c in server.commands if c.startswith(b"MAIL")]
    assert mail.endswith(b" BODY=8BITMIME") and b" SIZE=" in mail
    assert server.body == b"Subject: x\r\n\r\n\xc3\xa9\r\n"


# -- failures ----------------------------------------------------------------


def test_connection_refused_defers(tmp_path: Path) -> None:
    """A refused connection defers every recipient with 4.4.1, naming the server."""
    run = Run(tmp_path, ("a@mail.test", "b@mail.test"))
    _h, _p, factory, _t, _b = run.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    out = run.outcomes()
    assert {(o.status, o.dsn) for o in out.values()} == {(RecipientStatus.DEFERRED, "4.4.1")}
    assert out["a@mail.test"].diagnostic.startswith("connect to 127.0.0.1:24:")
    assert "refused" in out["a@mail.test"].diagnostic


def test_connect_timeout_defers(tmp_path: Path) -> None:
    """No connection within connect_timeout: deferred 4.4.1, "timed out"."""
    run = Run(tmp_path, ("a@mail.test",))
    run.reactor.advance(TIMEOUTS["connect_timeout"] - 0.5)
    assert run.result == []
    run.reactor.advance(1)
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.dsn, o.diagnostic) == (
        RecipientStatus.DEFERRED, "4.4.1", "connect to 127.0.0.1:24: timed out")


def test_failover_to_the_next_lmtp_server(tmp_path: Path) -> None:
    """A server that cannot be reached (or refuses the session) moves the recipients on to the next one."""
    run = Run(tmp_path, ("a@mail.test",), hops=(LMTP_HOP, BACKUP_HOP))
    _h, _p, factory, _t, _b = run.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert [c[0] for c in run.reactor.tcpClients] == ["127.0.0.1", "127.0.0.2"]
    run.serve(FakeLMTPServer())
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.remote) == (RecipientStatus.DELIVERED, "127.0.0.2:24")
    assert [t[0] for t in o.tried] == ["127.0.0.1:24"]


def test_refused_greeting_defers_and_fails_over(tmp_path: Path) -> None:
    """A 554 greeting is about the session: transient (421), and the next server is tried."""
    run = Run(tmp_path, ("a@mail.test",), hops=(LMTP_HOP, BACKUP_HOP))
    run.serve(FakeLMTPServer(greeting=b"554 5.3.2 Not now"))
    run.serve(FakeLMTPServer(greeting=b"554 5.3.2 Not now either"))
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.code, o.dsn) == (RecipientStatus.DEFERRED, 421, "4.3.2")
    assert "greeting" in o.diagnostic and len(o.tried) == 1


def test_server_dropping_mid_data_defers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The server closes the connection while the body is being sent: every
    accepted recipient is deferred (4.4.2); one refused at RCPT keeps its bounce.
    """
    monkeypatch.setattr(BodySender, "CHUNK", 64)
    body = b"Subject: big\r\n\r\n" + b"x" * 60 + b"\r\n" * 1 + b"".join(b"line %d\r\n" % i for i in range(200))
    run = Run(tmp_path, ("a@mail.test", "b@mail.test", "nobody@mail.test"), message=body)
    server = FakeLMTPServer(drop_after=3, rcpt={"nobody@mail.test": b"550 5.1.1 unknown"})
    client, pump = accept_connection(run.reactor, server)
    # iosim reports a close only once no bytes move, and a pull producer
    # always has more: deliver the server's close by hand, mid-body.
    for _ in range(1000):
        if server.transport.disconnecting:
            break
        pump.pump()
    assert client._state == "body"
    pump.serverIO.disconnected = pump.clientIO.disconnecting = True
    pump.clientIO.reportDisconnect()
    out = run.outcomes()
    for x in ("a@mail.test", "b@mail.test"):
        assert (out[x].status, out[x].dsn) == (RecipientStatus.DEFERRED, "4.4.2")
        assert "lost connection with 127.0.0.1:24" in out[x].diagnostic
        assert "sending the message" in out[x].diagnostic
    assert out["nobody@mail.test"].status is RecipientStatus.BOUNCED
    assert server.body is None


def test_connection_lost_between_replies_after_the_dot(tmp_path: Path) -> None:
    """A reply that came stands; the recipients whose reply never came are deferred."""
    run = Run(tmp_path, ("a@mail.test", "b@mail.test"))
    server = FakeLMTPServer(silent_after_dot=True)
    pump = run.serve(server)
    server._send(b"250 2.0.0 <a@mail.test> Saved")
    server.transport.loseConnection()
    pump.flush()
    out = run.outcomes()
    assert out["a@mail.test"].status is RecipientStatus.DELIVERED
    assert (out["b@mail.test"].status, out["b@mail.test"].dsn) == (RecipientStatus.DEFERRED, "4.4.2")
    assert "after the end of data" in out["b@mail.test"].diagnostic


def test_no_reply_after_the_dot_times_out(tmp_path: Path) -> None:
    """Each reply after the dot is awaited data_done_timeout at most: then deferred 4.4.2."""
    run = Run(tmp_path, ("a@mail.test",))
    server = FakeLMTPServer(silent_after_dot=True)
    pump = run.serve(server)
    run.reactor.advance(TIMEOUTS["data_done_timeout"] - 1)
    assert run.result == []
    run.reactor.advance(1)
    pump.flush()
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.dsn) == (RecipientStatus.DEFERRED, "4.4.2")
    assert "timeout talking to 127.0.0.1:24" in o.diagnostic and server.lost


@pytest.mark.parametrize("stage, timeout", [
    ("greeting", "helo_timeout"), ("lhlo", "helo_timeout"), ("mail", "mail_timeout"),
])
def test_silent_server_times_out_at_each_step(tmp_path: Path, stage: str, timeout: str) -> None:
    """A server that stops answering is given up on after that step's timeout."""
    run = Run(tmp_path, ("a@mail.test",))
    server = FakeLMTPServer(extensions=())
    if stage == "greeting":
        server.greeting = b""
        server._send = lambda line: None if line == b"" else server.transport.write(line + b"\r\n")  # type: ignore[method-assign]
    else:
        original = server._command

        def command(line: bytes) -> None:
            if line.upper().startswith(stage.upper().encode()):
                server.commands.append(line)
                return
            original(line)

        server._command = command  # type: ignore[method-assign]
    pump = run.serve(server)
    run.reactor.advance(TIMEOUTS[timeout] - 0.5)
    assert run.result == []
    run.reactor.advance(1)
    pump.flush()
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.dsn) == (RecipientStatus.DEFERRED, "4.4.2") and "timeout" in o.diagnostic


def test_garbled_reply_ends_the_session(tmp_path: Path) -> None:
    """A reply that is not a reply ends the session: deferred, nothing delivered."""
    run = Run(tmp_path, ("a@mail.test",))
    run.serve(FakeLMTPServer(greeting=b"HELLO THERE"))
    o = run.outcomes()["a@mail.test"]
    assert (o.status, o.dsn) == (RecipientStatus.DEFERRED, "4.5.0") and "garbled" in o.diagnostic


def test_concurrency_per_server(tmp_path: Path) -> None:
    """At most the route's concurrency sessions to one LMTP server; the rest wait their turn."""
    reactor = MemoryReactorClock()
    config = parse_config({
        "node": {"hostname": "relay.test"}, "outbound": TIMEOUTS,
        "route": [{"domains": ["mail.test"], "action": "lmtp", "next_hops": [LMTP_HOP], "concurrency": 2}],
    }, source="<test>")
    agent = LMTPAgent(reactor, lambda: config)
    results: list[Any] = []
    for i in range(3):
        entry = make_queue_entry(tmp_path / str(i), MESSAGE, SENDER, ("a@mail.test",))
        agent.deliver(LMTP_HOP, entry, list(entry.envelope.recipients), 2).addCallback(results.append)
    assert len(reactor.tcpClients) == 2
    _client, pump = accept_connection(reactor, FakeLMTPServer(), 0)
    pump.flush()
    assert len(results) == 1 and len(reactor.tcpClients) == 3


def test_lmtp_name() -> None:
    """TCP servers are named host:port; a UNIX socket this node's name and the path, as Postfix does."""
    assert lmtp_name("tcp:127.0.0.1:24", "relay.test") == "127.0.0.1:24"
    assert lmtp_name("unix:/run/dovecot/lmtp", "relay.test") == "relay.test[/run/dovecot/lmtp]"
    assert lmtp_name("unix:path=/run/lmtp:timeout=5", "relay.test") == "relay.test[/run/lmtp]"


def test_unix_endpoint(tmp_path: Path) -> None:
    """A unix: next hop connects to the socket; outcomes name it."""
    reactor = MemoryReactorClock()
    config = node_config("unix:/run/dovecot/lmtp")
    agent = LMTPAgent(reactor, lambda: config)
    entry = make_queue_entry(tmp_path, MESSAGE, SENDER, ("a@mail.test",))
    out: list[Any] = []
    agent.deliver("unix:/run/dovecot/lmtp", entry, list(entry.envelope.recipients)).addCallback(out.append)
    [(path, factory, _timeout, _check)] = reactor.unixClients
    assert path == "/run/dovecot/lmtp"
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    [[res]] = out
    assert res.remote == "relay.test[/run/dovecot/lmtp]" and res.enhanced == "4.4.1"


# -- the delivery stage and the queue core -------------------------------------


class FakeLMTP:
    """An L{ILMTP} that answers every recipient with a scripted code."""

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes = codes
        self.calls: list[tuple[str, list[str]]] = []

    def deliver(self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
                concurrency: int = 20) -> Deferred[list[DeliveryResult]]:
        self.calls.append((endpoint, [r.address for r in recipients]))
        enhanced = {250: "2.0.0", 452: "4.2.2", 550: "5.1.1"}
        return succeed([
            DeliveryResult(r.address, self.codes[r.address], enhanced[self.codes[r.address]],
                           f"<{r.address}> said so", "relay.test[/run/lmtp]")
            for r in recipients
        ])


class _Entry(QueueEntry):
    def open_message(self, skip: int = 0) -> Any:
        raise AssertionError("not read")


def test_lmtp_routes_go_to_the_lmtp_agent_and_map_to_dsns(tmp_path: Path) -> None:
    """
    Recipients of an lmtp route go to the injected LMTP agent (not the SMTP
    client); a 2xx is recorded as delivered (final delivery: a "delivered"
    DSN when NOTIFY=SUCCESS asks, naming the server), a 5xx bounces with a
    "failed" DSN carrying the server's reply, a 4xx is deferred (no DSN).
    """
    from relaynet.queue.spool import Envelope, QueueState

    config = node_config("unix:/run/lmtp")
    table = RoutingTable(config)
    lmtp = FakeLMTP({"a@mail.test": 250, "b@mail.test": 452, "c@mail.test": 550})
    delivery = Delivery(lambda: table, NoOutbound(), NoMailboxes(), lambda: None, lmtp=lmtp)
    rcpts = tuple(Recipient(a, "lmtp:mail.test", notify=("SUCCESS", "FAILURE"))
                  for a in ("a@mail.test", "b@mail.test", "c@mail.test"))
    entry = _Entry(Envelope("Q1", SENDER, rcpts, 1000.0), QueueState(), "/nonexistent", 0)
    out: list[Any] = []
    delivery.attempt(entry, rcpts).addCallback(out.append)
    [outcomes] = out
    assert lmtp.calls == [("unix:/run/lmtp", ["a@mail.test", "b@mail.test", "c@mail.test"])]
    core = QueueCore(RetryPolicy(jitter=0.0))
    core.add(entry, 1000.0)
    plan = core.begin("Q1", 1000.0)
    decision = core.finish(plan, outcomes, 1001.0)  # type: ignore[arg-type]
    notices = {n.action: n.reports for n in decision.notices}
    assert set(notices) == {"delivered", "failed"}
    [ok] = notices["delivered"]
    # Remote-MTA is a host name: the UNIX socket's host, as Postfix names it.
    assert (ok.address, ok.status, ok.remote_mta) == ("a@mail.test", "2.0.0", "relay.test")
    [bad] = notices["failed"]
    assert (bad.address, bad.status, bad.diagnostic) == ("c@mail.test", "5.1.1", "550 5.1.1 <c@mail.test> said so")
    states = entry.state.recipients
    assert [states[a].status for a in ("a@mail.test", "b@mail.test", "c@mail.test")] == [
        RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, RecipientStatus.BOUNCED]
    assert [e.name for e in decision.events] == ["delivered", "deferred", "bounced"]


def test_without_an_lmtp_agent_lmtp_routes_are_deferred(tmp_path: Path) -> None:
    """A Delivery built without an LMTP agent defers lmtp recipients (4.3.5), never loses them."""
    table = RoutingTable(node_config(LMTP_HOP))
    delivery = Delivery(lambda: table, NoOutbound(), NoMailboxes(), lambda: None)
    entry = make_queue_entry(tmp_path, MESSAGE, SENDER, ("a@mail.test",))
    out: list[Any] = []
    delivery.attempt(entry, list(entry.envelope.recipients)).addCallback(out.append)
    [[o]] = out
    assert (o.status, o.dsn) == (RecipientStatus.DEFERRED, "4.3.5")


def test_the_runner_builds_an_lmtp_agent(tmp_path: Path) -> None:
    """The node's queue runner gives its Delivery a real LMTP agent."""
    from relaynet.events import EventLog
    from relaynet.runner import QueueRunner
    from relaynet.testing import MemorySpool

    config = node_config(LMTP_HOP)
    runner = QueueRunner(config, MemorySpool(), EventLog(None, "n"), MemoryReactorClock(), None)  # type: ignore[arg-type]
    assert isinstance(runner.delivery.lmtp, LMTPAgent)


# -- a real Dovecot ------------------------------------------------------------

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVECOT_LMTP = Path("/usr/lib/dovecot/lmtp")


def dovecot_unavailable() -> str | None:
    """Why a private Dovecot LMTP server cannot run here, if it cannot."""
    if not (os.access(DOVECOT, os.X_OK) and DOVECOT_LMTP.exists()):
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd; make peers)"
    if os.geteuid() != 0:
        return "a private Dovecot must be started as root (it switches to the dovecot user)"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user} user (Debian's dovecot-core creates it)"
    return None


_DOVECOT_REASON = dovecot_unavailable()
requires_dovecot = pytest.mark.skipif(_DOVECOT_REASON is not None, reason=str(_DOVECOT_REASON))

DOVECOT_CONF = """\
# A private Dovecot: nothing of /etc/dovecot is read.
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = lmtp
ssl = no
listen = 127.0.0.1
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
mail_location = maildir:{dir}/mail/%u
# Quotas, so that one mailbox can be full: a full one is a 452 after the
# final dot for its recipient alone (quota_full_tempfail), a per-recipient
# reply (RFC 2033) from a real server.
mail_plugins = quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
}}
service lmtp {{
  unix_listener {dir}/lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""


class Dovecot:
    """
    A private Dovecot LMTP server in C{directory}, run in the foreground
    (C{dovecot -F -c CONF}) and stopped with SIGTERM.

    @ivar socket: its LMTP UNIX socket.
    @ivar port: its LMTP TCP port on 127.0.0.1.
    """

    def __init__(self, directory: Path, users: tuple[str, ...], full: tuple[str, ...] = ()) -> None:
        """
        @param users: the users (full addresses) it has.
        @param full: users whose quota (10 bytes) no message fits.
        """
        from harness.peers import allow_postfix_search, free_port

        directory.mkdir(parents=True, exist_ok=True)
        self.dir = allow_postfix_search(directory)  # o+x on the path: the lmtp process is user dovecot
        self.port = free_port()
        self.socket = self.dir / "lmtp"
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(DOVECOT_CONF.format(dir=self.dir, port=self.port))
        (self.dir / "users").write_text("".join(f"{u}::::::\n" for u in users) + "".join(
            f"{u}:::::::userdb_quota_rule=*:storage=10B\n" for u in full))
        (self.dir / "users").chmod(0o644)
        mail = self.dir / "mail"
        mail.mkdir()
        dovecot = pwd.getpwnam("dovecot")
        os.chown(mail, dovecot.pw_uid, dovecot.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dovecot:
        from harness.nodeproc import wait_for

        out = open(self.dir / "dovecot.out", "wb")
        try:
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
            )
        finally:
            out.close()
        wait_for(lambda: self._up(), 20.0, f"Dovecot LMTP on {self.socket} and port {self.port}:\n{self.log()}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"dovecot exited with {self.proc.returncode}:\n{self.log()}")
        if not self.socket.exists():
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def log(self) -> str:
        parts = []
        for name in ("dovecot.out", "dovecot.log"):
            try:
                parts.append((self.dir / name).read_text("utf-8", "replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)[-4000:]

    def maildir(self, user: str) -> mailbox.Maildir:
        """The user's Maildir (Dovecot creates it at the first delivery)."""
        return mailbox.Maildir(self.dir / "mail" / user, factory=None, create=False)

    def messages(self, user: str) -> list[bytes]:
        path = self.dir / "mail" / user
        if not (path / "new").is_dir():
            return []
        box = self.maildir(user)
        return [box.get_bytes(k) for k in sorted(box.keys())]


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    server = Dovecot(tmp_path / "dovecot", ("alice@mail.test", "bob@mail.test"), full=("carol@mail.test",))
    try:
        yield server.start()
    finally:
        server.stop()


NODE_TOML = """\
[node]
name = "{{name}}"
hostname = "relay.test"
spool = "{{spool}}"

[[listener]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true

[[route]]
domains = ["mail.test"]
action = "lmtp"
next_hops = ["{hop}"]
"""

BODY = "Hello Alice and Bob.\n.\n..two dots\n.leading dot\nGr\u00fc\u00dfe\n"


@requires_dovecot
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_relaynet_in_front_of_dovecot(tmp_path: Path, dovecot: Dovecot, transport: str) -> None:
    """
    A real node with an lmtp route to a real Dovecot: two users get the
    message in their Maildirs, byte for byte (dot-stuffing undone, 8-bit
    body intact); the unknown user is bounced 5.1.1 with Dovecot's "User
    doesn't exist" in a DSN back to the sender; a user whose mailbox is
    full gets Dovecot's 452 after the final dot and is deferred alone; the
    events say delivered, relay naming the LMTP server.
    """
    from harness.nodeproc import NodeProcess, maildir_new, wait_for

    hop = f"unix:{dovecot.socket}" if transport == "unix" else f"tcp:127.0.0.1:{dovecot.port}"
    node = NodeProcess(tmp_path / "node", NODE_TOML.format(hop=hop), name="lmtp")
    msg = EmailMessage()
    msg["From"] = "sender@localhost"
    msg["To"] = "alice@mail.test, carol@mail.test, bob@mail.test, nobody@mail.test"
    msg["Subject"] = "through LMTP"
    msg["Message-ID"] = "<lmtp-test@relay.test>"
    msg.set_content(BODY, cte="8bit")
    # carol (accepted at RCPT, over quota after the dot) is between alice and
    # bob: the replies after the dot are matched to recipients by RCPT order.
    rcpts = ["alice@mail.test", "carol@mail.test", "bob@mail.test", "nobody@mail.test"]
    with node:
        with smtplib.SMTP("127.0.0.1", node.port, local_hostname="client.test", timeout=30) as s:
            assert s.send_message(msg, to_addrs=rcpts) == {}
        got = wait_for(lambda: len(dovecot.messages("alice@mail.test")) == 1
                       and len(dovecot.messages("bob@mail.test")) == 1
                       and maildir_new(node.mailroot, "sender")
                       and {e.get("recipient") for e in node.events()} >= set(rcpts), 30.0,
                       f"two deliveries, a DSN and four outcomes:\n{node.log_tail()}\n{dovecot.log()}")
        assert got
        events = node.events()
    for user in ("alice@mail.test", "bob@mail.test"):
        [raw] = dovecot.messages(user)
        delivered = email.message_from_bytes(raw, policy=email.policy.default)
        assert delivered["Subject"] == "through LMTP"
        assert delivered["Message-ID"] == "<lmtp-test@relay.test>"
        # Dovecot's trace field names our LHLO; ours (intake) follows it.
        assert raw.startswith(b"Return-Path: <sender@localhost>\nReceived: from relay.test")
        assert b"with LMTP" in raw and b"by relay.test (relaynet) with ESMTP" in raw
        assert delivered.get_payload(decode=True) == BODY.encode("utf-8")
        # Maildir files have LF line ends: the body bytes as the sender wrote them.
        assert raw.endswith(BODY.encode("utf-8"))
    assert not (dovecot.dir / "mail" / "nobody@mail.test").exists()
    assert dovecot.messages("carol@mail.test") == []

    [dsn_path] = maildir_new(node.mailroot, "sender")
    dsn: Message = email.message_from_bytes(dsn_path.read_bytes())
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    per_rcpt = [b for b in blocks[1:] if b["Final-Recipient"]]
    assert [b["Final-Recipient"] for b in per_rcpt] == ["rfc822; nobody@mail.test"]
    [report] = per_rcpt
    assert (report["Action"], report["Status"]) == ("failed", "5.1.1")
    diagnostic = " ".join(report["Diagnostic-Code"].split())
    assert diagnostic.startswith("smtp; 550 5.1.1 <nobody@mail.test> User doesn't exist")

    name = f"relay.test[{dovecot.socket}]" if transport == "unix" else f"127.0.0.1:{dovecot.port}"
    by_rcpt = {e["recipient"]: e for e in events if e.get("recipient") in rcpts}
    assert {r: by_rcpt[r]["status"] for r in rcpts} == {
        "alice@mail.test": "delivered", "carol@mail.test": "deferred", "bob@mail.test": "delivered",
        "nobody@mail.test": "bounced"}
    assert {by_rcpt[r]["relay"] for r in rcpts} == {name}
    assert by_rcpt["alice@mail.test"]["dsn"] == "2.0.0"
    assert by_rcpt["carol@mail.test"]["dsn"] == "4.2.2"
    assert by_rcpt["carol@mail.test"]["diagnostic"].startswith("452 4.2.2 <carol@mail.test> Quota exceeded")
