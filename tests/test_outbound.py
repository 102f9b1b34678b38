"""
Tests for L{relaynet.delivery.client}: the relay's SMTP client and its per-hop pool.

Three ways of talking to the client, all in memory and on a fake clock:

 - L{Wire}: one connection of a L{HopPool} (on a L{MemoryReactorClock}) over a
   L{StringTransport}; the test plays the server line by line and asserts on
   the bytes the client wrote;
 - L{Hop.serve}: every connection of a pool is completed to a scripted
   L{FakeSMTPServer} over L{twisted.test.iosim}, for pool behaviour
   (reuse, concurrency) and for bodies;
 - a full round trip to our own intake (L{RelayESMTP}) over iosim.

The tests named after a trap of C{shared/TWISTED-TRAPS.md} (16-20) also run
against the plain C{twisted.mail.smtp} client (L{TwistedClient}); there they
must fail (C{xfail(strict=True)}), which proves that each test sees the trap.
Tests marked C{xfail(strict=True, reason="BUG: ...")} expose defects of
L{relaynet.delivery.client} that are not fixed yet.
"""

from __future__ import annotations

import email
import email.policy
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import pytest
from attrs import define
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.mail import smtp

from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from relaynet.config import Outbound
from relaynet.smtp.datastream import DataScanner, DotStuffer
from relaynet.intake.server import RelayFactory
from relaynet.delivery.client import BodySender, ChunkSender, DeliveryResult, HopPool, OutboundManager, RelayClient, reply_status
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.testing import (
    FakeMessage,
    FakeSMTPServer,
    accept_connection,
    make_intake,
    make_queue_entry,
    spooled,
)

ENDPOINT = "tcp:mx.test:25"
HOP = "mx.test:25"
SENDER = "sender@example.org"
MESSAGE = (
    b"From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: test\r\n\r\nHello.\r\n"
)
GREETING = b"220 mx.test ESMTP fake\r\n"
ALL = (b"PIPELINING", b"SIZE 10240000", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"DSN", b"SMTPUTF8")
NO_PIPELINING = tuple(k for k in ALL if k != b"PIPELINING")
# Twisted's FileSender reads 16 KiB at a time; our BodySender is set to the
# same size in these tests (fixture below), so "at a chunk boundary" means the
# same offsets for both clients. Its logic does not depend on the size.
CHUNK = 2**14
TIMEOUTS = dict(
    connect_timeout=11.0, helo_timeout=13.0, mail_timeout=17.0, rcpt_timeout=19.0,
    data_timeout=23.0, data_block_timeout=29.0, data_done_timeout=31.0, reuse_idle_time=5.0,
)


def ehlo(*keywords: bytes) -> bytes:
    """An EHLO reply from C{mx.test} offering C{keywords}."""
    lines = [b"mx.test greets client.test", *keywords]
    return b"".join(
        b"250%s%s\r\n" % (b" " if i == len(lines) - 1 else b"-", text) for i, text in enumerate(lines)
    )


@pytest.fixture(autouse=True)
def _body_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BodySender, "CHUNK", CHUNK)


# -- harness ---------------------------------------------------------------


@implementer(ITLSTransport)
class WireTransport(StringTransport):
    """
    A L{StringTransport} that behaves a little more like TCP: it records each
    write, delivers C{connectionLost} on the next clock tick after the client
    closes, stops a registered producer then, can "start TLS", and pulls a
    registered pull producer (a C{BodySender}) when told to.

    @ivar writes: each C{write}, since the last L{Wire.take}.
    @ivar tls_context: what C{startTLS} was called with.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 40000),
            peerAddress=IPv4Address("TCP", "192.0.2.25", 25),
        )
        self.clock = clock
        self.writes: list[bytes] = []
        self.tls_context: object = None
        self.protocol: Any = None
        self.lost = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.clock.callLater(0, self.connection_lost)

    def connection_lost(self) -> None:
        """The connection is gone (the server closed it, or ours did)."""
        if self.lost:
            return
        self.lost = True
        self.disconnecting = True
        self.connected = False
        if self.producer is not None:
            self.producer.stopProducing()
        self.protocol.connectionLost(Failure(ConnectionDone("connection closed")))

    def startTLS(self, contextFactory: object) -> None:
        self.tls_context = contextFactory

    def drive(self) -> None:
        """Let a registered pull producer write until it is done."""
        while self.producer is not None and not self.streaming and not self.lost:
            self.producer.resumeProducing()


class Wire:
    """
    One client connection on a L{WireTransport}: the test is the server.

    @ivar client: the client protocol (a L{RelayClient} unless built otherwise).
    @ivar writes: the separate writes of the last L{reply}.
    """

    def __init__(self, clock: MemoryReactorClock, protocol: Any) -> None:
        self.clock = clock
        self.transport = WireTransport(clock)
        self.protocol = protocol
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        self.client = getattr(protocol, "_wrappedProtocol", protocol)
        self.writes: list[bytes] = []

    def take(self) -> bytes:
        """What the client wrote since the last call."""
        data = self.transport.value()
        self.writes = list(self.transport.writes)
        self.transport.clear()
        self.transport.writes.clear()
        return data

    def reply(self, data: bytes, drive: bool = True) -> bytes:
        """
        The server sends C{data} (one read); return what the client wrote in
        response (with a message body, if C{drive}).
        """
        self.take()
        self.protocol.dataReceived(data)
        if drive:
            self.transport.drive()
        return self.take()

    def greet(self, extensions: tuple[bytes, ...] = ALL) -> bytes:
        """Greeting and EHLO reply; return what the client wrote after EHLO."""
        assert self.reply(GREETING) == b"EHLO client.test\r\n"
        return self.reply(ehlo(*extensions))

    @property
    def closed(self) -> bool:
        """The client has closed (or aborted) the connection."""
        return bool(self.transport.disconnecting)


@define
class Outcome:
    """What a submitted job's Deferred gave."""

    results: list[DeliveryResult] | None = None
    failure: Failure | None = None
    calls: int = 0

    def done(self, results: list[DeliveryResult]) -> None:
        self.calls += 1
        self.results = results

    def failed(self, failure: Failure) -> None:
        self.calls += 1
        self.failure = failure

    @property
    def fired(self) -> bool:
        return self.calls > 0

    def by_address(self) -> dict[str, tuple[int, str]]:
        """C{address -> (code, enhanced)}."""
        assert self.failure is None, self.failure
        assert self.results is not None, "the job has no result yet"
        return {r.address: (r.code, r.enhanced) for r in self.results}


class Hop:
    """
    A L{HopPool} for C{mx.test:25} over a L{MemoryReactorClock}, and the
    means to complete the connections it asks for.

    @ivar servers: the L{FakeSMTPServer}s L{serve} connected, in order.
    @ivar max_in_flight: the most connections open or being opened at once
        that L{serve} saw.
    @ivar thread_work: work the pool handed to its "worker thread" (the 7-bit
        conversion) and not run yet; run at once while C{threads_immediate},
        else by L{run_threads}.
    """

    def __init__(self, tmp_path: Path, concurrency: int = 20, endpoint: str = ENDPOINT, **outbound: Any) -> None:
        self.source = tmp_path / "source"
        self.reactor = MemoryReactorClock()
        self.timeouts = Outbound(**{**TIMEOUTS, **outbound})
        self.thread_work: list[tuple[Callable[[], bytes], Deferred[bytes]]] = []
        self.threads_immediate = True
        self.pool = HopPool(
            endpoint, self.reactor, self.timeouts, "client.test", concurrency, run_in_thread=self.run_in_thread
        )
        self.servers: list[FakeSMTPServer] = []
        self.pumps: list[iosim.IOPump] = []
        self.max_in_flight = 0

    def run_in_thread(self, work: Callable[[], bytes]) -> Deferred[bytes]:
        """The pool's worker thread: queue C{work} (and run it now if C{threads_immediate})."""
        d: Deferred[bytes] = Deferred()
        self.thread_work.append((work, d))
        if self.threads_immediate:
            self.run_threads()
        return d

    def run_threads(self) -> int:
        """Run the queued thread work, in order; @return: how many items."""
        n = 0
        while self.thread_work and n < 1000:
            work, d = self.thread_work.pop(0)
            try:
                result = work()
            except Exception:  # noqa: BLE001 -- any error goes to the Deferred, as from a thread
                d.errback(Failure())
            else:
                d.callback(result)
            n += 1
        return n

    def entry(
        self,
        message: bytes = MESSAGE,
        recipients: tuple[str | Recipient, ...] = ("rcpt@example.net",),
        params: dict[str, Any] | None = None,
        sender: str = SENDER,
    ) -> QueueEntry:
        """A message committed to this hop's source spool."""
        return make_queue_entry(self.source, message, sender, recipients, params)

    def submit(self, entry: QueueEntry | None = None, **kw: Any) -> Outcome:
        """Submit C{entry} (default: a new one from C{kw}) to all its recipients."""
        if entry is None:
            entry = self.entry(**kw)
        out = Outcome()
        self.pool.submit(entry, list(entry.envelope.recipients)).addCallbacks(out.done, out.failed)
        return out

    @property
    def connects(self) -> int:
        """Connection attempts so far."""
        return len(self.reactor.tcpClients)

    def wire(self, index: int = -1) -> Wire:
        """Complete the C{index}th connection attempt on a L{WireTransport}."""
        factory = self.reactor.tcpClients[index][2]
        return Wire(self.reactor, factory.buildProtocol(IPv4Address("TCP", "192.0.2.25", 25)))

    def _in_flight(self) -> int:
        accepted = len(self.servers)
        return (self.connects - accepted) + sum(1 for s in self.servers if not s.lost)

    def step(self, make_server: Callable[[], FakeSMTPServer] = FakeSMTPServer) -> bool:
        """
        One round: complete the pending connection attempts to new servers
        from C{make_server}, move bytes on every open connection, run what is
        due on the clock.

        @return: whether anything happened.
        """
        moved = False
        self.max_in_flight = max(self.max_in_flight, self._in_flight())
        while len(self.servers) < self.connects:
            server = make_server()
            _, pump = accept_connection(self.reactor, server, len(self.servers))
            self.servers.append(server)
            self.pumps.append(pump)
            moved = True
        for pump in self.pumps:
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                continue
            self.max_in_flight = max(self.max_in_flight, self._in_flight())
            moved = pump.flush() or moved
        self.reactor.advance(0)
        return moved

    def serve(self, make_server: Callable[[], FakeSMTPServer] = FakeSMTPServer, rounds: int = 500) -> None:
        """L{step} until nothing happens any more."""
        for _ in range(rounds):
            if not self.step(make_server):
                return
        raise AssertionError(f"the connections never settled ({self.connects} connections)")


class TwistedClient(smtp.ESMTPClient):
    """
    The plain C{twisted.mail} client with one message to send: the baseline
    that the trap tests must fail on.
    """

    def __init__(
        self,
        message: bytes,
        recipients: tuple[bytes, ...] = (b"rcpt@example.net",),
        context: object = None,
        clock: Any = None,
    ) -> None:
        smtp.ESMTPClient.__init__(self, secret=None, contextFactory=context, identity=b"client.test")
        self.message = message
        self.recipients = recipients
        self.sent: list[tuple[int, bytes]] = []
        self._done = False
        if clock is not None:
            self.callLater = clock.callLater

    def getMailFrom(self) -> bytes | None:
        if self._done:
            return None
        self._done = True
        return SENDER.encode()

    def getMailTo(self) -> list[bytes]:
        return list(self.recipients)

    def getMailData(self) -> BytesIO:
        return BytesIO(self.message)

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: Any, log: Any) -> None:
        self.sent.append((code, resp))


def results_of(out: Outcome) -> dict[str, tuple[int, str]]:
    """C{address -> (code, enhanced)} of a job that has its results."""
    return out.by_address()


def assert_temporary(out: Outcome) -> None:
    """Every recipient got a temporary result: no reply (0) or 4xx, and 4.x.x."""
    assert out.results is not None, "the job has no result"
    for r in out.results:
        assert r.code == 0 or 400 <= r.code < 500, r
        assert r.enhanced.startswith("4."), r
        assert not r.ok and not r.permanent


# -- EHLO and the MAIL/RCPT parameters --------------------------------------


def test_ehlo_reply_is_parsed(tmp_path: Path) -> None:
    """
    The EHLO reply's first line is the server's name; each further line is a
    keyword (case-insensitive) with its parameters, recorded in C{peer_ext}.
    """
    hop = Hop(tmp_path)
    hop.submit()
    wire = hop.wire()
    assert wire.reply(GREETING) == b"EHLO client.test\r\n"
    wire.reply(b"250-mx.test Hello client.test\r\n250-size 1000\r\n250-8bitmime\r\n"
               b"250-AUTH PLAIN LOGIN\r\n250 Pipelining\r\n")
    assert wire.client.peer_ext == {
        b"SIZE": b"1000", b"8BITMIME": None, b"AUTH": b"PLAIN LOGIN", b"PIPELINING": None,
    }


def test_deprecated_tls_mode_still_maps_to_tls_mode(tmp_path: Path) -> None:
    """
    RelayClient assigns attributes with C{object.__setattr__} (ESMTPClient's
    own C{__setattr__} is a Python call per assignment); the deprecated
    C{tlsMode} still warns and reads and writes C{_tlsMode}, as there.
    """
    hop = Hop(tmp_path)
    hop.submit()
    client = hop.wire().client
    assert type(client).__setattr__ is object.__setattr__
    with pytest.warns(DeprecationWarning, match="tlsMode"):
        client.tlsMode = True
    assert client._tlsMode is True and "tlsMode" not in vars(client)
    with pytest.warns(DeprecationWarning, match="tlsMode"):
        assert client.tlsMode is True


def test_mail_parameters_when_offered(tmp_path: Path) -> None:
    """
    To a peer offering everything, MAIL carries SIZE (the stored size),
    BODY=8BITMIME and SMTPUTF8 as the message needs, RET and an xtext ENVID;
    each RCPT carries its NOTIFY and an xtext ORCPT.
    """
    hop = Hop(tmp_path)
    entry = hop.entry(
        message=MESSAGE.replace(b"Hello.", "Grüße.".encode()),
        sender="sénder@example.org",
        recipients=(
            Recipient("a@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;A+b=c d@example.net"),
            Recipient("b@example.net", notify=("NEVER",)),
            Recipient("c@example.net"),
        ),
        params={"body": "8BITMIME", "smtputf8": True, "ret": "HDRS", "envid": "id 1+2=3"},
    )
    hop.submit(entry)
    sent = hop.wire().greet(ALL)
    assert sent.split(b"\r\n") == [
        b"MAIL FROM:<s\xc3\xa9nder@example.org> SIZE=%d BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+201+2B2+3D3"
        % entry.envelope.size,
        b"RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bb+3Dc+20d@example.net",
        b"RCPT TO:<b@example.net> NOTIFY=NEVER",
        b"RCPT TO:<c@example.net>",
        b"DATA",
        b"",
    ]


def test_dsn_parameters_only_when_offered(tmp_path: Path) -> None:
    """
    Without DSN (and without SIZE) in the EHLO reply, MAIL carries neither
    RET/ENVID nor SIZE, and RCPT carries neither NOTIFY nor ORCPT.
    """
    hop = Hop(tmp_path)
    hop.submit(
        recipients=(Recipient("a@example.net", notify=("FAILURE",), orcpt="rfc822;a@example.net"),),
        params={"ret": "FULL", "envid": "xyz"},
    )
    sent = hop.wire().greet((b"PIPELINING", b"ENHANCEDSTATUSCODES"))
    assert sent == b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n"


def test_seven_bit_message_has_no_body_parameter(tmp_path: Path) -> None:
    """A message received without BODY=8BITMIME is sent without it, and the null sender as <>."""
    hop = Hop(tmp_path)
    hop.submit(sender="")
    sent = hop.wire().greet(ALL)
    assert sent.split(b"\r\n")[0] == b"MAIL FROM:<> SIZE=%d" % len(MESSAGE)


def test_reply_status() -> None:
    """
    A reply's enhanced code is taken from its first line when its class
    agrees with the reply code, otherwise one is made from the class.
    """
    assert reply_status(250, b"2.1.5 Ok") == ("2.1.5", "Ok")
    assert reply_status(550, b"5.1.1 <x@y>: unknown\n5.1.1 see docs") == ("5.1.1", "<x@y>: unknown 5.1.1 see docs")
    assert reply_status(550, b"No such user") == ("5.0.0", "No such user")
    assert reply_status(451, b"try later") == ("4.0.0", "try later")
    assert reply_status(250, b"Ok") == ("2.0.0", "Ok")
    assert reply_status(450, b"5.1.1 mismatch") == ("4.0.0", "5.1.1 mismatch")
    assert reply_status(421, b"") == ("4.0.0", "")


# -- pipelining ------------------------------------------------------------


@pytest.mark.parametrize("client", ["relaynet", pytest.param("twisted", marks=pytest.mark.xfail(
    strict=True, reason="twisted.mail trap 20: no client pipelining"))])
def test_pipelining_sends_transaction_in_one_write(tmp_path: Path, client: str) -> None:
    """
    With PIPELINING offered, MAIL, every RCPT and DATA leave in one write,
    before any reply to them.
    """
    rcpts = ("a@example.net", "b@example.net", "c@example.net")
    if client == "relaynet":
        hop = Hop(tmp_path)
        hop.submit(recipients=rcpts)
        wire = hop.wire()
    else:
        clock = MemoryReactorClock()
        wire = Wire(clock, TwistedClient(MESSAGE, tuple(r.encode() for r in rcpts), clock=clock))
    sent = wire.greet(ALL)
    assert len(wire.writes) == 1
    assert [line.split(b":")[0] for line in sent.split(b"\r\n")] == [
        b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"RCPT TO", b"DATA", b"",
    ]


def test_pipelined_replies_matched_in_order(tmp_path: Path) -> None:
    """
    Pipelined replies that arrive in one read are matched to the commands in
    order: the second RCPT's refusal goes to the second recipient, and the
    body follows the 354.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net", "c@example.net"))
    wire = hop.wire()
    wire.greet(ALL)
    body = wire.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@example.net>: unknown\r\n"
                      b"250 2.1.5 Ok\r\n354 go ahead\r\n")
    assert body == MESSAGE + b".\r\n"
    assert not out.fired
    assert wire.reply(b"250 2.0.0 queued as X\r\n") == b""
    assert results_of(out) == {
        "a@example.net": (250, "2.0.0"),
        "b@example.net": (550, "5.1.1"),
        "c@example.net": (250, "2.0.0"),
    }


def test_without_pipelining_each_reply_is_awaited(tmp_path: Path) -> None:
    """Without PIPELINING the client sends one command and waits for its reply."""
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    assert wire.greet(NO_PIPELINING) == b"MAIL FROM:<sender@example.org> SIZE=%d\r\n" % len(MESSAGE)
    assert wire.reply(b"250 2.1.0 Ok\r\n") == b"RCPT TO:<a@example.net>\r\n"
    assert wire.reply(b"250 2.1.5 Ok\r\n") == b"RCPT TO:<b@example.net>\r\n"
    assert wire.reply(b"250 2.1.5 Ok\r\n") == b"DATA\r\n"
    assert wire.reply(b"354 go ahead\r\n") == MESSAGE + b".\r\n"
    assert wire.reply(b"250 2.0.0 Ok\r\n") == b""
    assert results_of(out) == {"a@example.net": (250, "2.0.0"), "b@example.net": (250, "2.0.0")}


# -- per-recipient results (trap 19) -----------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_mixed_rcpt_replies_give_each_recipient_its_own_result(tmp_path: Path, pipelining: bool) -> None:
    """
    RCPT replies 250, 550 5.1.1 and 450 4.2.0, then 250 at the final dot: the
    accepted recipient gets the dot's reply, the others their own RCPT reply.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("ok@example.net", "gone@example.net", "full@example.net"))
    wire = hop.wire()
    wire.greet(ALL if pipelining else NO_PIPELINING)
    replies = [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 gone", b"450 4.2.0 mailbox full", b"354 go"]
    if pipelining:
        wire.reply(b"".join(r + b"\r\n" for r in replies))
    else:
        for r in replies:
            wire.reply(r + b"\r\n")
    wire.reply(b"250 2.0.0 queued\r\n")
    assert results_of(out) == {
        "ok@example.net": (250, "2.0.0"),
        "gone@example.net": (550, "5.1.1"),
        "full@example.net": (450, "4.2.0"),
    }
    texts = {r.address: r.text for r in out.results or []}
    assert texts == {"ok@example.net": "queued", "gone@example.net": "gone", "full@example.net": "mailbox full"}
    assert all(r.remote == HOP and r.dsn_peer for r in out.results or [])


def test_all_refused_without_pipelining_sends_no_data(tmp_path: Path) -> None:
    """
    Without pipelining, when every RCPT is refused the client does not send
    DATA, and each recipient has its own RCPT reply.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    wire.greet(NO_PIPELINING)
    wire.reply(b"250 2.1.0 Ok\r\n")
    wire.reply(b"550 5.1.1 a unknown\r\n")
    assert wire.reply(b"451 4.3.0 b later\r\n") == b""
    assert results_of(out) == {"a@example.net": (550, "5.1.1"), "b@example.net": (451, "4.3.0")}


@pytest.mark.parametrize("data_reply", [b"554 5.5.1 no valid recipients", b"354 go ahead"])
def test_all_refused_with_pipelining(tmp_path: Path, data_reply: bytes) -> None:
    """
    With pipelining and every RCPT refused, a refused DATA ends the
    transaction, and an accepted DATA gets an empty message (a lone dot, RFC
    2920 3.1) whose reply is disregarded; either way no body is sent and each
    recipient keeps its RCPT reply.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    wire.greet(ALL)
    sent = wire.reply(b"250 2.1.0 Ok\r\n550 5.1.1 a unknown\r\n550 5.7.1 b denied\r\n" + data_reply + b"\r\n")
    if data_reply.startswith(b"354"):
        assert sent == b".\r\n"
        assert not out.fired
        assert wire.reply(b"250 2.0.0 empty message queued\r\n") == b""
    else:
        assert sent == b""
    assert results_of(out) == {"a@example.net": (550, "5.1.1"), "b@example.net": (550, "5.7.1")}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_refused_mail_applies_to_every_recipient(tmp_path: Path, pipelining: bool) -> None:
    """A MAIL refused with 550 5.7.1 gives every recipient that reply."""
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    wire.greet(ALL if pipelining else NO_PIPELINING)
    if pipelining:
        sent = wire.reply(b"550 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                          b"503 5.5.1 need MAIL\r\n")
    else:
        sent = wire.reply(b"550 5.7.1 sender refused\r\n")
    assert sent == b""
    assert results_of(out) == {"a@example.net": (550, "5.7.1"), "b@example.net": (550, "5.7.1")}


def test_reply_without_enhanced_code_gets_one_from_its_class(tmp_path: Path) -> None:
    """
    From a peer that sends no enhanced codes, each result gets one made from
    its reply's class: 2.0.0, 4.0.0, 5.0.0.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net", "c@example.net"))
    wire = hop.wire()
    wire.greet((b"PIPELINING",))
    wire.reply(b"250 Ok\r\n250 Ok\r\n450 Mailbox busy\r\n550 No such user\r\n354 Go\r\n")
    wire.reply(b"250 Queued\r\n")
    assert results_of(out) == {
        "a@example.net": (250, "2.0.0"), "b@example.net": (450, "4.0.0"), "c@example.net": (550, "5.0.0"),
    }
    assert [r.diagnostic for r in out.results or []][2] == "550 5.0.0 No such user"


def test_reuse_after_refused_mail_resets_and_counts_afresh(tmp_path: Path) -> None:
    """
    On one connection: a delivered message, then one whose MAIL is refused,
    then one whose only RCPT is refused. The message after the refused MAIL
    starts with RSET; nothing carries over from earlier messages (trap 19's
    C{numOk}): with its only recipient refused, the third sends no DATA.
    """
    hop = Hop(tmp_path, concurrency=1)
    first = hop.submit(recipients=("a@example.net",))
    second = hop.submit(recipients=("b@example.net",))
    third = hop.submit(recipients=("c@example.net",))
    wire = hop.wire()
    wire.greet(NO_PIPELINING)
    wire.reply(b"250 2.1.0 Ok\r\n")
    wire.reply(b"250 2.1.5 Ok\r\n")
    wire.reply(b"354 go\r\n")
    assert wire.reply(b"250 2.0.0 queued\r\n").startswith(b"MAIL FROM:<sender@example.org>")
    assert wire.reply(b"550 5.7.1 not now\r\n") == b"RSET\r\n"
    assert wire.reply(b"250 2.0.0 Ok\r\n").startswith(b"MAIL FROM:")
    assert wire.reply(b"250 2.1.0 Ok\r\n") == b"RCPT TO:<c@example.net>\r\n"
    assert wire.reply(b"550 5.1.1 unknown\r\n") == b""
    assert results_of(first) == {"a@example.net": (250, "2.0.0")}
    assert results_of(second) == {"b@example.net": (550, "5.7.1")}
    assert results_of(third) == {"c@example.net": (550, "5.1.1")}
    assert hop.connects == 1


def test_pipelined_reuse_after_refused_mail(tmp_path: Path) -> None:
    """With pipelining, the RSET after a refused transaction leads the next pipelined batch."""
    hop = Hop(tmp_path, concurrency=1)
    first = hop.submit(recipients=("a@example.net",))
    second = hop.submit(recipients=("b@example.net",))
    wire = hop.wire()
    wire.greet(ALL)
    sent = wire.reply(b"550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert sent.split(b"\r\n")[:4] == [
        b"RSET", b"MAIL FROM:<sender@example.org> SIZE=%d" % len(MESSAGE), b"RCPT TO:<b@example.net>", b"DATA",
    ]
    assert len(wire.writes) == 1
    wire.reply(b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    wire.reply(b"250 2.0.0 queued\r\n")
    assert results_of(first) == {"a@example.net": (550, "5.7.1")}
    assert results_of(second) == {"b@example.net": (250, "2.0.0")}


def test_250_to_data_is_not_a_delivery(tmp_path: Path) -> None:
    """
    A (broken) peer that answers DATA with 250 has not received the message:
    no recipient may count as delivered.
    """
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(ALL)
    sent = wire.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 whatever\r\n")
    assert MESSAGE not in sent
    assert out.results is not None
    assert not any(r.ok for r in out.results)


def test_rcpt_refusal_survives_a_later_session_failure(tmp_path: Path) -> None:
    """
    A recipient refused with 550 5.1.1 at RCPT keeps that permanent result
    even if the connection then times out waiting for the final dot; the
    accepted recipient gets a temporary result.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("ok@example.net", "gone@example.net"))
    wire = hop.wire()
    wire.greet(ALL)
    wire.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 gone\r\n354 go\r\n")
    hop.reactor.advance(hop.timeouts.data_done_timeout)
    assert wire.closed
    assert out.results is not None
    by = {r.address: r for r in out.results}
    assert (by["gone@example.net"].code, by["gone@example.net"].enhanced) == (550, "5.1.1")
    assert not by["ok@example.net"].ok and not by["ok@example.net"].permanent


# -- what is never sent to a peer that cannot take it -------------------------


@pytest.mark.parametrize(
    ("params", "extensions", "enhanced"),
    [
        # (Converted by default, see test_eight_bit_is_converted_for_a_seven_bit_peer.)
        ({"body": "8BITMIME", "bounce": True}, tuple(k for k in ALL if k != b"8BITMIME"), "5.6.3"),
        ({"smtputf8": True, "body": "8BITMIME"}, tuple(k for k in ALL if k != b"SMTPUTF8"), "5.6.7"),
        ({}, (b"PIPELINING", b"SIZE 20"), "5.3.4"),
    ],
    ids=["8bit-to-7bit-peer", "smtputf8-to-ascii-peer", "over-peer-size"],
)
def test_message_the_peer_cannot_take_fails_permanently(
    tmp_path: Path, params: dict[str, Any], extensions: tuple[bytes, ...], enhanced: str
) -> None:
    """
    An 8-bit message to a peer without 8BITMIME (5.6.3), an SMTPUTF8 one to a
    peer without SMTPUTF8 (5.6.7), one larger than the peer's SIZE (5.3.4):
    the recipients fail permanently without MAIL being sent, and the next
    message on the connection goes normally. (The 8-bit one with
    C{[outbound] eight_bit = "bounce"}; a message queued before the intake
    recorded its content is taken as declared.)
    """
    params = dict(params)
    hop = Hop(tmp_path, concurrency=1, eight_bit="bounce" if params.pop("bounce", False) else "convert")
    bad = hop.submit(params=params, recipients=("a@example.net", "b@example.net"))
    good = hop.submit(message=b"Subject: s\r\n\r\nx\r\n", recipients=("c@example.net",))
    wire = hop.wire()
    sent = wire.greet(extensions)
    assert sent.count(b"MAIL FROM:") == 1
    assert b"RCPT TO:<c@example.net>" in sent and b"<a@example.net>" not in sent
    assert bad.results is not None
    assert [(r.address, r.enhanced, r.permanent) for r in bad.results] == [
        ("a@example.net", enhanced, True), ("b@example.net", enhanced, True),
    ]
    assert wire.reply(b"250 Ok\r\n250 Ok\r\n354 go\r\n") == b"Subject: s\r\n\r\nx\r\n.\r\n"
    wire.reply(b"250 2.0.0 queued\r\n")
    assert results_of(good) == {"c@example.net": (250, "2.0.0")}


def test_many_refused_messages_do_not_overflow_the_stack(tmp_path: Path) -> None:
    """
    Six hundred 8-bit messages queued for a peer without 8BITMIME all fail
    with 5.6.3 on one connection, without error (C{eight_bit = "bounce"}).
    """
    hop = Hop(tmp_path, concurrency=1, eight_bit="bounce")
    entry = hop.entry(params={"body": "8BITMIME"})
    outs = [hop.submit(entry) for _ in range(600)]
    wire = hop.wire()
    wire.greet((b"PIPELINING", b"ENHANCEDSTATUSCODES"))
    assert all(o.results is not None and o.results[0].enhanced == "5.6.3" for o in outs)


# -- dot-stuffing (trap 16) --------------------------------------------------


def lines_to(offset: int, nl: bytes, start: bytes = b"Subject: dots\r\n\r\n") -> bytes:
    """
    C{start} (with its line ends turned into C{nl}) then filler lines, exactly
    C{offset} bytes in all: the next line starts at C{offset}.
    """
    out = start.replace(b"\r\n", nl)
    width = 80
    while offset - len(out) > 2 * width:
        out += b"x" * (width - len(nl)) + nl
    rest = offset - len(out)
    half = rest // 2
    out += b"y" * (half - len(nl)) + nl + b"z" * (rest - half - len(nl)) + nl
    assert len(out) == offset
    return out


SMUGGLED = b"MAIL FROM:<evil@example.com>"

DOT_CASES: list[tuple[str, Callable[[bytes], bytes], bool]] = [
    ("first-line", lambda nl: b".Leading-Dot: the very first line" + nl + b"Subject: x" + nl + nl + b"b" + nl, True),
    ("text-at-16k", lambda nl: lines_to(CHUNK, nl) + b".dotted line at a chunk boundary" + nl + b"after" + nl, True),
    ("lone-dot-at-16k", lambda nl: lines_to(CHUNK, nl) + b"." + nl + SMUGGLED + nl + b"RCPT TO:<v@x>" + nl, True),
    ("every-16k", lambda nl: lines_to(CHUNK, nl) + b".a" + nl + lines_to(CHUNK - 2 - len(nl), nl, b"")
     + b".." + nl + lines_to(CHUNK - 2 - len(nl), nl, b"") + b"." + nl + b"end" + nl, True),
    ("lone-dot-mid-chunk", lambda nl: b"Subject: x" + nl + nl + b"before" + nl + b"." + nl + b"after" + nl, False),
    ("dot-line-last", lambda nl: b"Subject: x" + nl + nl + b"body" + nl + b"." + nl, False),
    ("line-end-across-16k", lambda nl: lines_to(CHUNK + 1, nl) + b".after a split line end" + nl, False),
]


def deliver_with_relaynet(tmp_path: Path, message: bytes) -> tuple[FakeSMTPServer, bytes]:
    """Send C{message} (stored CRLF) through a L{HopPool}; the server and the wire bytes."""
    hop = Hop(tmp_path)
    out = hop.submit(message=message)
    hop.serve()
    server = hop.servers[0]
    assert out.fired
    return server, b"".join(server.reads)


def deliver_with_twisted(message: bytes) -> tuple[FakeSMTPServer, bytes]:
    """Send C{message} (a file, as twisted.mail wants it) with L{TwistedClient}."""
    server = FakeSMTPServer()
    clock = Clock()
    client = TwistedClient(message, clock=clock)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client, clock=clock)
    pump.flush()
    return server, b"".join(server.reads)


@pytest.mark.parametrize(
    ("sender", "case"),
    [
        pytest.param(sender, name, id=f"{sender}-{name}", marks=[
            pytest.mark.xfail(strict=True, reason="twisted.mail trap 16")
        ] if sender == "twisted" and base_fails else [])
        for sender in ("relaynet", "twisted")
        for name, _, base_fails in DOT_CASES
    ],
)
def test_dot_stuffing(tmp_path: Path, sender: str, case: str) -> None:
    """
    Lines starting with a dot arrive intact wherever they are: on the first
    line, at the 16 KiB chunk boundaries of the file transfer, a lone dot
    there (which must not end DATA and let the next lines run as commands),
    mid-chunk, last, and after a line end split across chunks. The client
    is given the message as it stores it (relaynet: CRLF; twisted.mail: LF).
    """
    build = {name: b for name, b, _ in DOT_CASES}[case]
    if sender == "relaynet":
        message = build(b"\r\n")
        server, _ = deliver_with_relaynet(tmp_path, message)
        expected = message
    else:
        message = build(b"\n")
        server, _ = deliver_with_twisted(message)
        expected = message.replace(b"\n", b"\r\n")
    assert [m.data for m in server.messages] == [expected]
    assert not any(b"evil" in c for c in server.commands)


@pytest.mark.parametrize("sender", ["relaynet", pytest.param("twisted", marks=pytest.mark.xfail(
    strict=True, reason="twisted.mail trap 16: CRLF input goes out as \\r\\r\\n"))])
def test_crlf_message_is_not_doubled(tmp_path: Path, sender: str) -> None:
    """A message stored with CRLF line ends goes out with CRLF, never CR CR LF."""
    message = b"Subject: crlf\r\n\r\nline one\r\nline two\r\n"
    if sender == "relaynet":
        server, wire = deliver_with_relaynet(tmp_path, message)
    else:
        server, wire = deliver_with_twisted(message)
    assert b"\r\r\n" not in wire
    assert [m.data for m in server.messages] == [message]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 16])
def test_dot_stuffing_with_any_read_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_size: int) -> None:
    """Whatever size the file is read in, dots at every position come through intact."""
    monkeypatch.setattr(BodySender, "CHUNK", chunk_size)
    message = b".a\r\n.\r\n..\r\nx.\r\n\r\n.\r\n. .\r\n...\r\n.\r\n"
    server, _ = deliver_with_relaynet(tmp_path, message)
    assert [m.data for m in server.messages] == [message]


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.sampled_from([b"", b".", b"..", b".x", b"x", b"x.", b"\xc3\xa9", b". ", b"\r", b"MAIL FROM:<e@x>"]),
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 200), max_size=12),
)
def test_stuffed_body_reads_back_exactly(lines: list[bytes], cuts: list[int]) -> None:
    """
    The body path (L{DotStuffer} per chunk, then its terminator) read by the
    receiving side's L{DataScanner} gives back the message exactly, however
    the file reads split it, and nothing after the end of data.
    """
    message = b"".join(line + b"\r\n" for line in lines)
    points = sorted({c for c in cuts if c < len(message)} | {0, len(message)})
    stuffer = DotStuffer()
    wire = b"".join(stuffer.stuff(message[a:b]) for a, b in zip(points, points[1:])) + stuffer.terminator()
    body, rest = DataScanner(max_line_length=10_000).feed(wire)
    assert (body, rest) == (message, b"")


# -- STARTTLS (trap 17) --------------------------------------------------------


@pytest.mark.parametrize("client", ["relaynet", pytest.param("twisted", marks=pytest.mark.xfail(
    strict=True, reason="twisted.mail trap 17"))])
def test_starttls_discards_injected_plaintext(tmp_path: Path, client: str) -> None:
    """
    Plaintext that arrives with the 220 to STARTTLS (here a forged 250) is
    discarded: after TLS starts the client sends EHLO and waits for the real
    reply; its state machine never sees the injected line.
    """
    context = object()
    if client == "relaynet":
        hop = Hop(tmp_path)
        hop.submit()
        wire = hop.wire()
        wire.client.context = context
    else:
        clock = MemoryReactorClock()
        wire = Wire(clock, TwistedClient(MESSAGE, context=context, clock=clock))
    seen: list[bytes] = []
    real = wire.client.esmtpState_serverConfig

    def spy(code: int, resp: bytes) -> Any:
        seen.append(resp)
        return real(code, resp)

    wire.client.esmtpState_serverConfig = spy
    assert wire.reply(GREETING) == b"EHLO client.test\r\n"
    assert wire.reply(ehlo(b"STARTTLS", b"PIPELINING")) == b"STARTTLS\r\n"
    assert wire.reply(b"220 2.0.0 ready\r\n250 injected\r\n") == b"EHLO client.test\r\n"
    assert wire.transport.tls_context is context
    assert len(seen) == 1 and b"injected" not in seen[0]
    sent = wire.reply(ehlo(b"SIZE 1000000"))
    assert sent.startswith(b"MAIL FROM:<sender@example.org>")
    assert len(seen) == 2


# -- timeouts (trap 18) ------------------------------------------------------


@pytest.mark.parametrize("client", ["relaynet", pytest.param("twisted", marks=pytest.mark.xfail(
    strict=True, reason="twisted.mail trap 18: timeout = None"))])
def test_silent_server_is_dropped(tmp_path: Path, client: str) -> None:
    """A server that never sends its greeting is dropped after the greeting timeout."""
    if client == "relaynet":
        hop = Hop(tmp_path)
        hop.submit()
        wire = hop.wire()
        clock = hop.reactor
        limit = hop.timeouts.helo_timeout
    else:
        clock = MemoryReactorClock()
        wire = Wire(clock, TwistedClient(MESSAGE, clock=clock))
        limit = TIMEOUTS["helo_timeout"]
    clock.advance(limit - 0.5)
    assert not wire.closed
    clock.advance(3600)
    assert wire.closed


STAGES = {
    # stage: (server replies before going silent, which timeout, EHLO keywords)
    "MAIL-pipelined": ([], "mail_timeout", ALL),
    "MAIL": ([], "mail_timeout", NO_PIPELINING),
    "RCPT": ([b"250 2.1.0 Ok"], "rcpt_timeout", NO_PIPELINING),
    "RCPT-second": ([b"250 2.1.0 Ok", b"250 2.1.5 Ok"], "rcpt_timeout", NO_PIPELINING),
    "DATA": ([b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok"], "data_timeout", NO_PIPELINING),
    "body": ([b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok", b"354 go"], "data_block_timeout", NO_PIPELINING),
    "dot": ([b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok", b"354 go"], "data_done_timeout", NO_PIPELINING),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_silent_server_times_out_at_each_step(tmp_path: Path, stage: str) -> None:
    """
    A server that stops answering (after MAIL, RCPT, DATA, while the body
    does not drain, after the final dot) is dropped after that step's
    configured timeout; every recipient gets a temporary result, and no new
    connection is made.
    """
    replies, which, extensions = STAGES[stage]
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    wire.greet(extensions)
    for r in replies:
        wire.reply(r + b"\r\n", drive=stage != "body")
    limit = getattr(hop.timeouts, which)
    hop.reactor.advance(limit - 0.5)
    assert not wire.closed and not out.fired
    hop.reactor.advance(0.5)
    assert wire.closed
    assert_temporary(out)
    hop.reactor.advance(0)
    assert wire.transport.lost and hop.connects == 1


def test_transfer_resets_the_body_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The body timeout runs from the last chunk written, not from the 354."""
    monkeypatch.setattr(BodySender, "CHUNK", 8)
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(ALL)
    wire.reply(b"250 Ok\r\n250 Ok\r\n354 go\r\n", drive=False)
    for _ in range(len(MESSAGE) // 8):
        hop.reactor.advance(hop.timeouts.data_block_timeout - 1)
        wire.transport.producer.resumeProducing()
    assert not wire.closed and not out.fired


@pytest.mark.parametrize("failure", ["greeting-timeout", "greeting-554", "greeting-421", "closed"])
def test_failure_before_mail_fails_the_job_without_reconnecting(tmp_path: Path, failure: str) -> None:
    """
    When the session fails before any mail transaction (no greeting within
    the timeout, a 554 or 421 greeting, the server closing at once), the
    queued job gets a temporary result and no new connection is attempted.
    """
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    if failure == "greeting-timeout":
        hop.reactor.advance(hop.timeouts.helo_timeout)
    elif failure == "closed":
        wire.transport.connection_lost()
    else:
        wire.reply(b"554 5.7.1 go away\r\n" if failure == "greeting-554" else b"421 4.3.2 busy\r\n")
    hop.reactor.advance(0)
    assert wire.transport.lost
    assert_temporary(out)
    assert hop.connects == 1


def test_hop_refusing_every_session_is_not_reconnected_in_a_loop(tmp_path: Path) -> None:
    """
    Two jobs, two connections, and a hop that answers every greeting with
    554: both jobs get a temporary result after those connections fail, and
    no further connection is made.
    """
    hop = Hop(tmp_path)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(2)]
    for _ in range(10):
        hop.step(lambda: FakeSMTPServer(greeting=b"554 5.7.1 go away"))
    assert hop.connects <= 2
    for out in outs:
        assert_temporary(out)


def test_refused_helo_is_not_repeated(tmp_path: Path) -> None:
    """
    A server that refuses EHLO and then HELO gets no further HELO: the
    client gives up and the job gets a temporary result.
    """
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.reply(GREETING)
    assert wire.reply(b"502 5.5.2 no EHLO\r\n") == b"HELO client.test\r\n"
    assert b"HELO" not in wire.reply(b"550 5.7.1 no HELO either\r\n")
    hop.reactor.advance(0)
    assert_temporary(out)


def test_helo_fallback(tmp_path: Path) -> None:
    """
    A server that refuses EHLO gets HELO, then a plain transaction: no
    parameters, one command at a time (no extensions were offered).
    """
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.reply(GREETING)
    assert wire.reply(b"500 5.5.1 what\r\n") == b"HELO client.test\r\n"
    assert wire.reply(b"250 mx.test\r\n") == b"MAIL FROM:<sender@example.org>\r\n"
    wire.reply(b"250 Ok\r\n")
    wire.reply(b"250 Ok\r\n")
    assert wire.reply(b"354 go\r\n") == MESSAGE + b".\r\n"
    wire.reply(b"250 Ok\r\n")
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}


def test_connection_lost_mid_transaction(tmp_path: Path) -> None:
    """The server vanishing during a transaction gives every recipient 0 / 4.4.2, once."""
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    wire.greet(ALL)
    wire.transport.connection_lost()
    assert_temporary(out)
    assert {r.code for r in out.results or []} == {0}
    assert out.calls == 1 and hop.connects == 1


def test_garbage_reply_ends_the_session(tmp_path: Path) -> None:
    """A reply line that is not SMTP ends the session with a temporary result."""
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(ALL)
    wire.reply(b"HTTP/1.1 400 Bad Request\r\n")
    assert wire.closed
    assert_temporary(out)


# -- connecting --------------------------------------------------------------


def test_connect_failure_fails_every_queued_job(tmp_path: Path) -> None:
    """
    A refused connection fails every job queued for the hop at once, with
    4.4.1 and no reply code, and is not retried.
    """
    hop = Hop(tmp_path, concurrency=1)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(3)]
    assert hop.connects == 1
    factory = hop.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(hop.reactor.connectors[0], Failure(ConnectionRefusedError()))
    for o in outs:
        assert o.results is not None
        assert [(r.code, r.enhanced, r.remote) for r in o.results] == [(0, "4.4.1", HOP)]
        assert "connect to mx.test:25" in o.results[0].text
    hop.reactor.advance(60)
    assert hop.connects == 1


def test_connect_timeout(tmp_path: Path) -> None:
    """
    A connection attempt that hangs is given up after connect_timeout: the
    attempt is stopped, the job fails with 4.4.1, and nothing is retried.
    """
    hop = Hop(tmp_path)
    out = hop.submit()
    hop.reactor.advance(hop.timeouts.connect_timeout - 0.5)
    assert not out.fired
    hop.reactor.advance(0.5)
    assert out.results is not None
    assert [(r.code, r.enhanced, r.remote) for r in out.results] == [(0, "4.4.1", HOP)]
    assert hop.reactor.connectors[0].stoppedConnecting
    hop.reactor.advance(60)
    assert hop.connects == 1


def test_connect_timeout_says_so(tmp_path: Path) -> None:
    """The result of a connection attempt that timed out says that it timed out."""
    hop = Hop(tmp_path)
    out = hop.submit()
    hop.reactor.advance(hop.timeouts.connect_timeout)
    assert out.results is not None
    assert out.results[0].text == "connect to mx.test:25: timed out"


def test_source_address_is_bound(tmp_path: Path) -> None:
    """A route's source_address is the local address the connection is made from."""
    reactor = MemoryReactorClock()
    pool = HopPool("tcp:192.0.2.25:25", reactor, Outbound(), "client.test", source_address="192.0.2.7")
    pool.submit(make_queue_entry(tmp_path, MESSAGE), [Recipient("a@example.net")])
    host, port, _, _, bind = reactor.tcpClients[0]
    assert (host, port, bind) == ("192.0.2.25", 25, ("192.0.2.7", 0))


def test_ipv6_source_address(tmp_path: Path) -> None:
    """An IPv6 source address is bound for an IPv6 next hop."""
    reactor = MemoryReactorClock()
    pool = HopPool("tcp:2001\\:db8\\:\\:25:25", reactor, Outbound(), "client.test", source_address="2001:db8::7")
    pool.submit(make_queue_entry(tmp_path, MESSAGE), [Recipient("a@example.net")])
    assert reactor.tcpClients[0][4] == ("2001:db8::7", 0)


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [("tcp:mx.test:25", "mx.test:25"), ("tcp:host=mx.test:port=2525", "mx.test:2525"),
     ("tcp:192.0.2.1:25:timeout=5", "192.0.2.1:25")],
)
def test_hop_name(endpoint: str, name: str) -> None:
    """A hop is named C{host:port} in results and DSNs."""
    assert HopPool(endpoint, MemoryReactorClock(), Outbound(), "c").name == name


def test_ipv6_hop_name() -> None:
    """An IPv6 next hop's name carries its whole address and port."""
    name = HopPool("tcp:2001\\:db8\\:\\:1:25", MemoryReactorClock(), Outbound(), "c").name
    assert "2001:db8::1" in name and name.endswith(":25")


# -- connection reuse (trap 20) and concurrency --------------------------------


def test_one_connection_carries_many_messages(tmp_path: Path) -> None:
    """
    With reuse on, five jobs for one hop (concurrency 1) go over one
    connection as five transactions in turn, with no RSET between successful
    ones, then the idle connection QUITs.
    """
    hop = Hop(tmp_path, concurrency=1)
    outs = [hop.submit(message=MESSAGE + b"%d\r\n" % i, recipients=(f"r{i}@example.net",)) for i in range(5)]
    hop.serve()
    assert hop.connects == 1
    (server,) = hop.servers
    assert [m.rcpts for m in server.messages] == [[b"RCPT TO:<r%d@example.net>" % i] for i in range(5)]
    assert [m.data for m in server.messages] == [MESSAGE + b"%d\r\n" % i for i in range(5)]
    assert b"RSET" not in server.commands
    assert all(results_of(o) == {f"r{i}@example.net": (250, "2.0.0")} for i, o in enumerate(outs))
    assert not server.lost
    hop.reactor.advance(hop.timeouts.reuse_idle_time)
    hop.serve()
    assert server.commands[-1] == b"QUIT" and server.lost
    assert not hop.pool.clients


def test_idle_connection_is_reused_then_quits(tmp_path: Path) -> None:
    """
    A job submitted while a connection idles goes over that connection;
    the connection QUITs C{reuse_idle_time} after its last message.
    """
    hop = Hop(tmp_path)
    hop.submit()
    hop.serve()
    hop.reactor.advance(hop.timeouts.reuse_idle_time - 0.5)
    second = hop.submit()
    hop.serve()
    assert results_of(second) == {"rcpt@example.net": (250, "2.0.0")}
    assert hop.connects == 1 and len(hop.servers[0].messages) == 2
    hop.reactor.advance(hop.timeouts.reuse_idle_time - 0.5)
    hop.serve()
    assert b"QUIT" not in hop.servers[0].commands
    hop.reactor.advance(0.5)
    hop.serve()
    assert hop.servers[0].commands[-1] == b"QUIT"
    assert hop.servers[0].lost and not hop.pool.clients


def test_without_reuse_each_job_has_its_own_connection(tmp_path: Path) -> None:
    """
    With C{connection_reuse = false}, no connection carries more than one
    job, and each QUITs after its job; every job is delivered.
    """
    hop = Hop(tmp_path, connection_reuse=False)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(5)]
    hop.serve()
    assert sorted(m.rcpts[0] for s in hop.servers for m in s.messages) == [
        b"RCPT TO:<r%d@example.net>" % i for i in range(5)
    ]
    assert all(len(s.messages) <= 1 and s.commands[-1] == b"QUIT" and s.lost for s in hop.servers)
    assert all(o.results is not None and o.results[0].ok for o in outs)


@pytest.mark.parametrize("reuse", [True, False])
def test_closing_connection_opens_no_useless_one(tmp_path: Path, reuse: bool) -> None:
    """
    Two jobs, two connections, each to carry one message: when the first
    finishes and closes while the second is still waiting for its greeting,
    no third connection is made (the second will take the remaining job).
    """
    hop = Hop(tmp_path, connection_reuse=reuse, max_messages_per_connection=1)
    first = hop.submit(recipients=("a@example.net",))
    hop.submit(recipients=("b@example.net",))
    assert hop.connects == 2
    late = hop.wire(1)
    wire = hop.wire(0)
    wire.greet(ALL)
    wire.reply(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    wire.reply(b"250 2.0.0 queued\r\n")
    assert first.results is not None and first.results[0].ok
    wire.transport.connection_lost()
    hop.reactor.advance(0)
    assert hop.connects == 2
    assert late.reply(GREETING) == b"EHLO client.test\r\n"


def test_max_messages_per_connection(tmp_path: Path) -> None:
    """After C{max_messages_per_connection} messages a connection QUITs and a new one takes the rest."""
    hop = Hop(tmp_path, concurrency=1, max_messages_per_connection=2)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(5)]
    hop.serve()
    assert [len(s.messages) for s in hop.servers] == [2, 2, 1]
    assert all(o.results is not None and o.results[0].ok for o in outs)


@pytest.mark.parametrize("reuse", [True, False])
def test_concurrency_limit(tmp_path: Path, reuse: bool) -> None:
    """Ten jobs with concurrency 2: never more than two connections at once, and all delivered."""
    hop = Hop(tmp_path, concurrency=2, connection_reuse=reuse)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(10)]
    hop.serve()
    assert hop.max_in_flight <= 2
    assert sum(len(s.messages) for s in hop.servers) == 10
    assert all(o.results is not None and o.results[0].ok for o in outs)


def test_burst_uses_the_allowed_concurrency(tmp_path: Path) -> None:
    """Ten jobs submitted at once with concurrency 2 open two connections."""
    hop = Hop(tmp_path, concurrency=2)
    for i in range(10):
        hop.submit(recipients=(f"r{i}@example.net",))
    assert hop.connects == 2


def test_slow_start(tmp_path: Path) -> None:
    """
    A burst for a hop with a high concurrency opens only
    C{HopPool.INITIAL_CONCURRENCY} connections at first; all jobs are
    delivered, never over the concurrency.
    """
    hop = Hop(tmp_path, concurrency=20)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(30)]
    assert hop.connects == HopPool.INITIAL_CONCURRENCY
    hop.serve()
    assert hop.max_in_flight <= 20
    assert all(o.results is not None and o.results[0].ok for o in outs)


def test_close_quits_idle_connections(tmp_path: Path) -> None:
    """Closing the pool QUITs its idle connections at once."""
    hop = Hop(tmp_path)
    hop.submit()
    hop.serve()
    assert not hop.servers[0].lost
    hop.pool.close()
    hop.serve()
    assert hop.servers[0].commands[-1] == b"QUIT" and hop.servers[0].lost


def test_close_fails_queued_jobs(tmp_path: Path) -> None:
    """Closing the pool fails the jobs still waiting for a connection with 4.3.2."""
    hop = Hop(tmp_path, concurrency=1)
    outs = [hop.submit(recipients=(f"r{i}@example.net",)) for i in range(2)]
    hop.pool.close()
    for o in outs:
        assert o.results is not None
        assert [(r.code, r.enhanced) for r in o.results] == [(0, "4.3.2")]


def test_outbound_manager_keeps_one_pool_per_hop(tmp_path: Path) -> None:
    """The manager makes one pool per (endpoint, source address) and counts their connections."""
    reactor = MemoryReactorClock()
    manager = OutboundManager(reactor, Outbound(**TIMEOUTS), "client.test")
    entry = make_queue_entry(tmp_path, MESSAGE)
    manager.deliver(ENDPOINT, entry, [Recipient("a@example.net")], concurrency=1)
    manager.deliver(ENDPOINT, entry, [Recipient("b@example.net")], concurrency=1)
    manager.deliver("tcp:other.test:25", entry, [Recipient("c@example.net")])
    assert len(manager.pools) == 2 and len(reactor.tcpClients) == 2
    assert manager.pool(ENDPOINT) is manager.pool(ENDPOINT)


# -- a full round trip into our own intake -----------------------------------


def tricky_body() -> bytes:
    """
    About 200 KB: a first line starting with a dot, 8-bit text and raw
    octets, lone dots (one followed by SMTP commands), dot lines at every
    16 KiB boundary of the file, long-ish lines of varied length.
    """
    out = bytearray(
        b".Leading-Dot: the first line starts with a dot\r\n"
        b"From: sender@example.org\r\nTo: alice@localhost, bob@localhost\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    samples = [
        b".", b"..", b"...", b". dot space", b".\t", "Grüße, 日本語 — ünïcödé".encode(),
        b"\xff\xfe\x80 raw octets", b"MAIL FROM:<evil@example.com>", b"", b"x" * 990,
    ]
    i = 0
    boundary = CHUNK
    while len(out) < 200_000:
        room = boundary - len(out)
        if room == 0:
            out += b".at boundary %d\r\n" % (boundary // CHUNK)
            boundary += CHUNK
            continue
        line = samples[i % len(samples)] if i % 3 else b"line %d " % i + b"-" * (i * 37 % 700)
        i += 1
        if len(line) + 2 != room and len(line) + 2 > room - 3:
            # a filler line so that the next line starts exactly at the boundary
            line = b"p" * (room - 2)
        out += line + b"\r\n"
    return bytes(out)


def first_header_removed(message: bytes) -> bytes:
    """C{message} without its first header field (with its folded lines)."""
    end = 0
    while True:
        end = message.index(b"\r\n", end) + 2
        if message[end:end + 1] not in (b" ", b"\t"):
            return message[end:]


def test_round_trip_into_our_intake(tmp_path: Path) -> None:
    """
    A queued message with a tricky body (see L{tricky_body}) delivered by a
    L{HopPool} to our own intake (L{RelayESMTP}) over an in-memory
    connection: both recipients are accepted, and the receiving spool holds
    the same bytes after its own Received header, with the same envelope
    (sender, BODY, RET, ENVID, NOTIFY, ORCPT).
    """
    body = tricky_body()
    assert len(body) >= 200_000 and all(body[k * CHUNK:k * CHUNK + 1] == b"." for k in range(1, 12))
    intake, _ireactor, ipool = make_intake(tmp_path / "dest")
    hop = Hop(tmp_path)
    entry = hop.entry(
        message=body,
        recipients=(
            Recipient("alice@localhost", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Alice+tag=x@example.org"),
            Recipient("bob@localhost"),
        ),
        params={"body": "8BITMIME", "ret": "HDRS", "envid": "envelope id+1"},
    )
    out = hop.submit(entry)
    server = RelayFactory(intake, intake.config.listeners[0]).buildProtocol(None)
    client, pump = accept_connection(hop.reactor, server, 0, client_address=("127.0.0.1", 40001))
    assert isinstance(client, RelayClient)
    for _ in range(100):
        pump.flush()
        if not ipool.run_all() and out.fired:
            break
    assert results_of(out) == {"alice@localhost": (250, "2.0.0"), "bob@localhost": (250, "2.0.0")}
    (stored,) = spooled(intake.spool)
    assert stored.message.startswith(b"Received: from client.test ([127.0.0.1])")
    assert first_header_removed(stored.message) == body
    env = stored.envelope
    assert env.sender == SENDER
    assert [(r.address, r.notify, r.orcpt) for r in env.recipients] == [
        ("alice@localhost", ("SUCCESS", "FAILURE"), "rfc822;Alice+tag=x@example.org"),
        ("bob@localhost", None, None),
    ]
    assert (env.params["body"], env.params["ret"], env.params["envid"]) == ("8BITMIME", "HDRS", "envelope id+1")
    assert env.params["size"] == len(body)


def test_round_trip_refusals_from_our_intake(tmp_path: Path) -> None:
    """
    Our intake refusing one recipient (no such local user) and accepting the
    other: each gets its own result from the real server's replies.
    """
    intake, _ireactor, ipool = make_intake(tmp_path / "dest", toml='[local]\ndomains = ["localhost"]\ncatch_all = false\nusers = ["alice"]\n')
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("alice@localhost", "nobody@localhost"))
    server = RelayFactory(intake, intake.config.listeners[0]).buildProtocol(None)
    _, pump = accept_connection(hop.reactor, server, 0, client_address=("127.0.0.1", 40001))
    for _ in range(100):
        pump.flush()
        if not ipool.run_all() and out.fired:
            break
    assert results_of(out) == {"alice@localhost": (250, "2.0.0"), "nobody@localhost": (550, "5.1.1")}
    assert [m.envelope.recipients[0].address for m in spooled(intake.spool)] == ["alice@localhost"]


# -- SMTPUTF8 only when needed (RFC 6531 3.4) ----------------------------------

NO_UTF8 = tuple(k for k in ALL if k != b"SMTPUTF8")
NO_8BIT = tuple(k for k in ALL if k != b"8BITMIME")
UTF8_SUBJECT = "From: s@example.org\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHello.\r\n".encode()


def test_declared_smtputf8_ascii_message_goes_to_a_peer_without_it(tmp_path: Path) -> None:
    """
    A message that carried SMTPUTF8 on MAIL but whose envelope and header
    section are ASCII (the intake recorded C{content = "77"}) goes to a peer
    without SMTPUTF8, without the parameter, and is delivered (it used to
    bounce 5.6.7).
    """
    hop = Hop(tmp_path)
    out = hop.submit(params={"smtputf8": True, "content": "77"})
    hop.serve(lambda: FakeSMTPServer(NO_UTF8))
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    (msg,) = hop.servers[0].messages
    assert msg.mail == b"MAIL FROM:<sender@example.org> SIZE=%d" % len(MESSAGE)
    assert msg.data == MESSAGE


@pytest.mark.parametrize(
    ("message", "content", "sender", "rcpt"),
    [
        (UTF8_SUBJECT, "88", SENDER, "rcpt@example.net"),
        (MESSAGE, "77", "s\u00e9nder@example.org", "rcpt@example.net"),
        (MESSAGE, "77", SENDER, "r\u00e9cipient@example.net"),
        (MESSAGE, None, SENDER, "rcpt@example.net"),
    ],
    ids=["utf8-header", "utf8-sender", "utf8-recipient", "content-not-recorded"],
)
def test_message_that_needs_smtputf8_bounces_at_a_peer_without_it(
    tmp_path: Path, message: bytes, content: str | None, sender: str, rcpt: str
) -> None:
    """
    A message that needs SMTPUTF8 -- a UTF-8 header section, sender or
    recipient, or one queued before the intake recorded its content (taken
    as declared) -- fails permanently with 5.6.7 at a peer without
    SMTPUTF8, and no MAIL is sent for it.
    """
    hop = Hop(tmp_path)
    params: dict[str, Any] = {"smtputf8": True}
    if content is not None:
        params["content"] = content
    out = hop.submit(message=message, params=params, sender=sender, recipients=(rcpt,))
    hop.serve(lambda: FakeSMTPServer(NO_UTF8))
    assert out.results is not None
    (res,) = out.results
    assert (res.code, res.enhanced, res.permanent) == (554, "5.6.7", True)
    assert "does not support SMTPUTF8" in res.text
    assert not any(c.startswith(b"MAIL") for c in hop.servers[0].commands)


def test_declared_smtputf8_is_kept_for_a_peer_offering_it(tmp_path: Path) -> None:
    """To a peer offering SMTPUTF8, a message that declared it keeps the parameter, ASCII or not."""
    hop = Hop(tmp_path)
    ascii_out = hop.submit(params={"smtputf8": True, "content": "77"})
    utf8_out = hop.submit(message=UTF8_SUBJECT, params={"smtputf8": True, "content": "88", "body": "8BITMIME"})
    plain = hop.submit(params={"content": "77"})
    hop.serve()
    for out in (ascii_out, utf8_out, plain):
        assert [r.code for r in out.results or []] == [250]
    mails = [m.mail for s in hop.servers for m in s.messages]
    assert sum(m.endswith(b" SMTPUTF8") for m in mails) == 2, mails
    assert any(m.endswith(b" BODY=8BITMIME SMTPUTF8") for m in mails), mails


# -- 8-bit content for a peer without 8BITMIME (RFC 6152 3) ------------------

EIGHT_BIT_TEXT = "Gr\u00fc\u00dfe aus K\u00f6ln \u2603\r\n.leading dot\r\n.\r\nlast line\r\n"
ATTACHMENT = bytes(range(0x80, 0x100)).replace(b"\r", b"").replace(b"\n", b"") * 4
EIGHT_BIT_MESSAGE = (
    b"From: s@example.org\r\nTo: r@example.net\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + EIGHT_BIT_TEXT.encode()
    + b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + ATTACHMENT + b"\r\n--XX--\r\n"
)


def decoded_parts(data: bytes) -> list[tuple[str, bytes]]:
    """C{(content type, decoded payload)} of each leaf part of C{data}."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append((part.get_content_type(), payload))
    return out


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_eight_bit_is_converted_for_a_seven_bit_peer(tmp_path: Path, chunking: bool) -> None:
    """
    An 8-bit message (a UTF-8 text part, an 8-bit attachment) to a peer
    without 8BITMIME arrives converted: every octet 7-bit, no BODY=
    parameter, SIZE= the converted size, text quoted-printable and the
    attachment base64, and Python's C{email} decodes the same parts from it
    (the text's line breaks as such) -- over DATA and over BDAT.
    """
    hop = Hop(tmp_path)
    out = hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
    extensions = NO_8BIT + ((b"CHUNKING",) if chunking else ())
    hop.serve(lambda: ChunkingServer(extensions))
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    server = hop.servers[0]
    (msg,) = server.messages
    assert msg.data.isascii()
    assert msg.mail == b"MAIL FROM:<sender@example.org> SIZE=%d" % len(msg.data)
    assert b"BODY=" not in msg.mail
    assert [c for c in server.commands if c.startswith(b"BDAT")] == (
        [b"BDAT %d LAST" % len(msg.data)] if chunking else []
    )
    parsed = email.message_from_bytes(msg.data, policy=email.policy.compat32)
    text, attachment = [p for p in parsed.walk() if not p.is_multipart()]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    def normalised(data: bytes) -> list[tuple[str, bytes]]:
        # Text line breaks are the encoding's (CRLF on the wire) either way.
        return [(t, p.replace(b"\r\n", b"\n") if t.startswith("text/") else p) for t, p in decoded_parts(data)]

    assert normalised(msg.data) == normalised(EIGHT_BIT_MESSAGE)
    assert normalised(msg.data)[0][1].decode("utf-8").rstrip("\n") == EIGHT_BIT_TEXT.replace("\r\n", "\n").rstrip("\n")
    assert decoded_parts(msg.data)[1] == ("application/octet-stream", ATTACHMENT)
    assert parsed["Subject"] == "8bit" and parsed["To"] == "r@example.net"


def test_conversion_runs_in_the_worker_thread(tmp_path: Path) -> None:
    """
    The conversion is handed to the pool's worker thread: nothing is sent
    for the message until that work has run, then MAIL goes out.
    """
    hop = Hop(tmp_path)
    hop.threads_immediate = False
    out = hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
    wire = hop.wire()
    assert wire.greet(NO_8BIT) == b""
    assert len(hop.thread_work) == 1 and not out.fired
    hop.run_threads()
    sent = wire.take()
    assert sent.startswith(b"MAIL FROM:<sender@example.org> SIZE=") and b"BODY=" not in sent


def test_default_worker_thread_is_the_reactor_pool(tmp_path: Path) -> None:
    """Without an injected runner, the work goes to the reactor's thread pool (never the reactor)."""
    from relaynet.testing import ManualThreadPool, ThreadlessReactor

    threads = ManualThreadPool()

    class Reactor(ThreadlessReactor):
        def getThreadPool(self) -> ManualThreadPool:
            return threads

    pool = HopPool(ENDPOINT, Reactor(), Outbound(**TIMEOUTS), "client.test")
    got: list[bytes] = []
    pool.run_in_thread(lambda: b"converted").addCallback(got.append)
    assert got == [] and threads.pending == 1
    threads.run_all()
    assert got == [b"converted"]


def test_connection_lost_during_conversion(tmp_path: Path) -> None:
    """
    The connection dies while the message is being converted: its
    recipients are deferred (4.4.2), and the conversion's late result is
    dropped without writing anything.
    """
    hop = Hop(tmp_path)
    hop.threads_immediate = False
    out = hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
    wire = hop.wire()
    wire.greet(NO_8BIT)
    wire.transport.connection_lost()
    assert_temporary(out)
    assert out.calls == 1
    hop.run_threads()
    assert wire.take() == b"" and out.calls == 1


def test_eight_bit_header_cannot_be_converted(tmp_path: Path) -> None:
    """
    An 8-bit header field (UTF-8 Subject without SMTPUTF8) cannot be made
    7-bit: 5.6.3, a diagnostic naming the field, no MAIL; the next message
    on the connection goes normally.
    """
    hop = Hop(tmp_path, concurrency=1)
    bad = hop.submit(message=UTF8_SUBJECT, params={"body": "8BITMIME", "content": "88"})
    good = hop.submit(params={"content": "77"})
    hop.serve(lambda: FakeSMTPServer(NO_8BIT))
    assert bad.results is not None
    (res,) = bad.results
    assert (res.code, res.enhanced, res.permanent) == (554, "5.6.3", True)
    assert "cannot be converted to 7 bits" in res.text and "Subject" in res.text, res.text
    assert results_of(good) == {"rcpt@example.net": (250, "2.0.0")}
    assert len(hop.servers) == 1 and sum(c.startswith(b"MAIL") for c in hop.servers[0].commands) == 1


def test_eight_bit_bounce_option(tmp_path: Path) -> None:
    """C{[outbound] eight_bit = "bounce"}: no conversion, 5.6.3 with a diagnostic that says why."""
    hop = Hop(tmp_path, eight_bit="bounce")
    out = hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
    hop.serve(lambda: FakeSMTPServer(NO_8BIT))
    assert out.results is not None and [(r.enhanced, r.permanent) for r in out.results] == [("5.6.3", True)]
    assert "eight_bit = bounce" in out.results[0].text
    assert hop.thread_work == [] and not hop.servers[0].messages


@pytest.mark.parametrize("offers", [True, False], ids=["peer-8bitmime", "peer-7bit"])
def test_declared_8bitmime_with_7bit_content_is_sent_as_is(tmp_path: Path, offers: bool) -> None:
    """
    A message declared BODY=8BITMIME whose content is all 7-bit is sent
    unchanged, without conversion; BODY=8BITMIME only if the peer offers it.
    """
    hop = Hop(tmp_path)
    out = hop.submit(params={"body": "8BITMIME", "content": "77"})
    hop.serve(lambda: FakeSMTPServer(ALL if offers else NO_8BIT))
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    (msg,) = hop.servers[0].messages
    assert msg.data == MESSAGE and hop.thread_work == []
    assert msg.mail.endswith(b" BODY=8BITMIME") is offers


def test_converted_message_over_the_peer_size(tmp_path: Path) -> None:
    """The converted message is measured against the peer's SIZE: over it, 5.3.4, nothing sent."""
    hop = Hop(tmp_path)
    out = hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
    limit = len(EIGHT_BIT_MESSAGE) + 10  # the stored message fits; its conversion does not
    hop.serve(lambda: FakeSMTPServer((b"PIPELINING", b"SIZE %d" % limit)))
    assert out.results is not None
    assert [(r.enhanced, r.permanent) for r in out.results] == [("5.3.4", True)]
    assert "converted" in out.results[0].text
    assert not any(c.startswith(b"MAIL") for c in hop.servers[0].commands)


# -- CHUNKING: BDAT (RFC 3030) ---------------------------------------------------


class ChunkingServer(FakeSMTPServer):
    """
    A L{FakeSMTPServer} that also takes C{BDAT n [LAST]}: it reads exactly
    C{n} octets after the command line, whatever they are, and answers each
    chunk (scripted with the key C{b"BDAT"}, or 250; the LAST chunk's reply
    ends the message).

    @ivar chunks: C{(command line, octets)} of each chunk received.
    """

    def __init__(self, extensions: tuple[bytes, ...] = (*ALL, b"CHUNKING"), **kw: Any) -> None:
        super().__init__(extensions, **kw)
        self.chunks: list[tuple[bytes, bytes]] = []
        self._octets: int | None = None
        self._chunk = b""
        self._chunk_line = b""
        self._bdat: bytes | None = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self._buf += data
        for _ in range(len(self._buf) + 2):
            if self.transport.disconnecting:
                return
            if self._octets is not None:
                take, self._buf = self._buf[:self._octets], self._buf[self._octets:]
                self._chunk += take
                self._octets -= len(take)
                if self._octets:
                    return
                self._octets = None
                self._chunk_done()
                continue
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                return
            line, self._buf = self._buf[:nl], self._buf[nl + 2:]
            if self._data is not None:
                self._data_line(line)
            elif line.upper().startswith(b"BDAT "):
                self.commands.append(line)
                self._chunk_line, self._chunk = line, b""
                self._octets = int(line.split()[1])
                if self._octets == 0:
                    self._octets = None
                    self._chunk_done()
            else:
                if line.upper().startswith((b"RSET", b"MAIL")):
                    self._bdat = None
                self._command(line)

    def _chunk_done(self) -> None:
        line, chunk = self._chunk_line, self._chunk
        self.chunks.append((line, chunk))
        last = line.upper().endswith(b" LAST")
        found, reply = self._scripted(line)
        if not found:
            if self._mail is None or not self._rcpts:
                reply = b"503 5.5.1 Error: need RCPT command"
            elif last:
                reply = b"250 2.0.0 Ok: queued as FAKE%d" % (len(self.messages) + 1)
            else:
                reply = b"250 2.0.0 %d octets received" % len(chunk)
        if reply is not None and reply[:1] == b"2":
            self._bdat = (self._bdat or b"") + chunk
            if last:
                assert self._mail is not None
                self.messages.append(FakeMessage(self._mail, list(self._rcpts), self._bdat))
                self._mail, self._rcpts, self._bdat = None, [], None
        if reply is not None:
            self._send(reply)


CHUNKING = (*ALL, b"CHUNKING")
DOTTY = b"Subject: dots\r\n\r\n.first\r\n..two\r\n.\r\n.\r\nMAIL FROM:<evil@example.com>\r\nend\r\n"


def test_bdat_after_pipelined_mail_and_rcpt(tmp_path: Path) -> None:
    """
    To a peer offering CHUNKING and PIPELINING, a message of one chunk goes
    in the same write as MAIL and every RCPT (RFC 3030 4.2; no DATA): one
    C{BDAT n LAST} with exactly its octets, dot lines not stuffed; one round
    trip per message. The reply to it is each accepted recipient's result.
    """
    hop = Hop(tmp_path)
    out = hop.submit(message=DOTTY, recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    sent = wire.greet(CHUNKING)
    assert sent == (
        b"MAIL FROM:<sender@example.org> SIZE=%d\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\n"
        % len(DOTTY) + b"BDAT %d LAST\r\n" % len(DOTTY) + DOTTY
    )
    # In one write: apart, the commands woke the peer before the chunk was written.
    assert len(wire.writes) == 1, wire.writes
    assert wire.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n") == b""
    assert wire.reply(b"250 2.1.5 Ok\r\n") == b""
    assert not out.fired
    wire.reply(b"250 2.0.0 Ok: queued as X\r\n")
    assert results_of(out) == {"a@example.net": (250, "2.0.0"), "b@example.net": (250, "2.0.0")}


def test_pipelined_bdat_with_a_refused_recipient(tmp_path: Path) -> None:
    """One RCPT of two refused: it keeps its own reply, the other gets the chunk's."""
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    assert wire.greet(CHUNKING).endswith(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
    wire.reply(b"250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n250 2.1.5 Ok\r\n250 2.0.0 queued as Y\r\n")
    assert results_of(out) == {"a@example.net": (550, "5.1.1"), "b@example.net": (250, "2.0.0")}


def test_bdat_without_pipelining(tmp_path: Path) -> None:
    """Without PIPELINING: MAIL, then each RCPT, then BDAT, each after the previous reply."""
    hop = Hop(tmp_path)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    wire = hop.wire()
    assert wire.greet((b"CHUNKING", b"ENHANCEDSTATUSCODES")) == b"MAIL FROM:<sender@example.org>\r\n"
    assert wire.reply(b"250 Ok\r\n") == b"RCPT TO:<a@example.net>\r\n"
    assert wire.reply(b"550 5.1.1 no\r\n") == b"RCPT TO:<b@example.net>\r\n"
    assert wire.reply(b"250 Ok\r\n") == b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE
    wire.reply(b"250 2.0.0 queued\r\n")
    assert results_of(out) == {"a@example.net": (550, "5.1.1"), "b@example.net": (250, "2.0.0")}


def test_large_message_goes_in_1mib_chunks(tmp_path: Path) -> None:
    """
    A 2.5 MiB message with dot lines throughout goes as BDAT 1048576,
    BDAT 1048576, BDAT rest LAST: each command's size is the octets that
    follow it, and the peer gets the message byte for byte.
    """
    line = b"x" * 70 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + (b".\r\n.." + line) * (5 * 2**20 // (2 * len(line)))
    hop = Hop(tmp_path)
    out = hop.submit(message=body)
    hop.serve(ChunkingServer)
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    server = hop.servers[0]
    rest = len(body) - 2 * 2**20
    assert [c for c, _ in server.chunks] == [b"BDAT 1048576", b"BDAT 1048576", b"BDAT %d LAST" % rest]
    assert all(int(c.split()[1]) == len(octets) for c, octets in server.chunks)
    (msg,) = server.messages
    assert msg.data == body


@pytest.mark.parametrize(("reply", "expect"), [(b"452 4.3.1 full", (452, "4.3.1")), (b"554 5.6.0 bad", (554, "5.6.0"))])
def test_refused_middle_chunk_ends_the_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reply: bytes, expect: tuple[int, str]
) -> None:
    """
    A 4xx or 5xx to a middle chunk: no further chunk is sent, that reply is
    every accepted recipient's result (a recipient refused at RCPT keeps its
    own), and the next message on the connection starts with RSET.
    """
    monkeypatch.setattr(RelayClient, "BDAT_CHUNK", 10)
    hop = Hop(tmp_path, concurrency=1)
    out = hop.submit(recipients=("a@example.net", "gone@example.net"))
    nxt = hop.submit(message=b"Subject: s\r\n\r\nx\r\n")
    hop.serve(lambda: ChunkingServer(replies={
        b"BDAT": [b"250 2.0.0 10 octets", reply], b"RCPT TO:<gone@": b"550 5.1.1 unknown",
    }))
    assert results_of(out) == {"a@example.net": expect, "gone@example.net": (550, "5.1.1")}
    server = hop.servers[0]
    at = [i for i, c in enumerate(server.commands) if c.startswith(b"BDAT")]
    assert [server.commands[i] for i in at] == [b"BDAT 10", b"BDAT 10", b"BDAT 10", b"BDAT 7 LAST"]
    i = at[1]  # the refused chunk: the first message's last; the next message's two follow
    assert server.commands[i + 1] == b"RSET" and server.commands[i + 2].startswith(b"MAIL")
    assert results_of(nxt) == {"rcpt@example.net": (250, "2.0.0")}
    assert [m.data for m in server.messages] == [b"Subject: s\r\n\r\nx\r\n"]


def test_no_recipient_accepted_pipelined_chunk_is_refused(tmp_path: Path) -> None:
    """
    Every RCPT refused, the one chunk pipelined with them: the peer reads and
    refuses it (503), each recipient has its RCPT reply, and the next
    transaction starts with RSET.
    """
    hop = Hop(tmp_path, concurrency=1)
    out = hop.submit(recipients=("gone@example.net",))
    nxt = hop.submit()
    hop.serve(lambda: ChunkingServer(replies={b"RCPT TO:<gone@": b"550 5.1.1 unknown"}))
    assert results_of(out) == {"gone@example.net": (550, "5.1.1")}
    assert results_of(nxt) == {"rcpt@example.net": (250, "2.0.0")}
    server = hop.servers[0]
    assert [c.startswith(b"BDAT") for c in server.commands].count(True) == 2
    assert server.commands[server.commands.index(b"RCPT TO:<gone@example.net>") + 2] == b"RSET"
    assert len(server.messages) == 1


def test_no_recipient_accepted_sends_no_bdat_without_pipelining(tmp_path: Path) -> None:
    """Without PIPELINING, every RCPT refused: no BDAT at all; the next transaction starts with RSET."""
    hop = Hop(tmp_path, concurrency=1)
    out = hop.submit(recipients=("gone@example.net",))
    nxt = hop.submit()
    hop.serve(lambda: ChunkingServer((b"CHUNKING", b"ENHANCEDSTATUSCODES"),
                                     replies={b"RCPT TO:<gone@": b"550 5.1.1 unknown"}))
    assert results_of(out) == {"gone@example.net": (550, "5.1.1")}
    assert results_of(nxt) == {"rcpt@example.net": (250, "2.0.0")}
    cmds = hop.servers[0].commands
    assert sum(c.startswith(b"BDAT") for c in cmds) == 1
    assert cmds[cmds.index(b"RCPT TO:<gone@example.net>") + 1] == b"RSET"


def test_refused_mail_with_chunking(tmp_path: Path) -> None:
    """
    MAIL refused (the pipelined RCPTs and the chunk get 503): MAIL's reply
    for every recipient, nothing delivered, RSET before the next transaction.
    """
    hop = Hop(tmp_path, concurrency=1)
    out = hop.submit(recipients=("a@example.net", "b@example.net"))
    nxt = hop.submit()
    hop.serve(lambda: ChunkingServer(replies={b"MAIL": b"553 5.7.1 sender rejected"}))
    assert results_of(out) == {"a@example.net": (553, "5.7.1"), "b@example.net": (553, "5.7.1")}
    assert results_of(nxt) == {"rcpt@example.net": (553, "5.7.1")}
    assert hop.servers[0].messages == []
    assert hop.servers[0].commands.count(b"RSET") >= 1


@pytest.mark.parametrize("which", ["middle", "last"])
def test_chunk_reply_timeouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """
    A peer that never answers a chunk: a middle one times out after
    C{data_block_timeout}, the LAST after C{data_done_timeout}; the
    recipients are deferred (4.4.2) and the connection dropped.
    """
    monkeypatch.setattr(RelayClient, "BDAT_CHUNK", 40)
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(CHUNKING)
    sent = wire.reply(b"250 Ok\r\n250 Ok\r\n")
    assert sent.startswith(b"BDAT 40\r\n")
    timeout = hop.timeouts.data_block_timeout
    if which == "last":
        assert wire.reply(b"250 2.0.0 40 octets\r\n").startswith(b"BDAT %d LAST\r\n" % (len(MESSAGE) - 40))
        timeout = hop.timeouts.data_done_timeout
    hop.reactor.advance(timeout - 0.5)
    assert not out.fired and not wire.closed
    hop.reactor.advance(1)
    assert_temporary(out)
    assert wire.closed


def test_connection_lost_mid_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The connection drops while a chunk is being written (its sender
    registered and not done): the recipients are deferred (4.4.2), once.
    """
    monkeypatch.setattr(ChunkSender, "PIECE", 16)
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    assert wire.reply(GREETING) == b"EHLO client.test\r\n"
    first = wire.reply(ehlo(*CHUNKING), drive=False)
    assert wire.transport.producer is not None
    wire.transport.producer.resumeProducing()
    assert b"BDAT %d LAST\r\n" % len(MESSAGE) in first + wire.take()
    wire.transport.connection_lost()
    assert_temporary(out)
    assert out.calls == 1


def test_early_chunk_reply_waits_for_the_chunk_to_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A refusal that arrives while a chunk is still being written: the chunk
    is finished (the peer counts its octets), then no further chunk is sent
    and the refusal is the result.
    """
    monkeypatch.setattr(ChunkSender, "PIECE", 16)
    monkeypatch.setattr(RelayClient, "BDAT_CHUNK", 32)
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(CHUNKING)
    sent = wire.reply(b"250 Ok\r\n250 Ok\r\n", drive=False)
    assert wire.transport.producer is not None
    wire.transport.producer.resumeProducing()
    sent += wire.take()
    wire.protocol.dataReceived(b"452 4.3.1 no room\r\n")
    assert not out.fired
    wire.transport.drive()
    sent += wire.take()
    assert sent == b"BDAT 32\r\n" + MESSAGE[:32]
    assert results_of(out) == {"rcpt@example.net": (452, "4.3.1")}


def test_unexpected_reply_to_bdat(tmp_path: Path) -> None:
    """A 354 (or anything not 2xx/4xx/5xx) to BDAT is a protocol error: deferred, connection dropped."""
    hop = Hop(tmp_path)
    out = hop.submit()
    wire = hop.wire()
    wire.greet(CHUNKING)
    wire.reply(b"250 Ok\r\n250 Ok\r\n")
    wire.reply(b"354 go ahead\r\n")
    assert_temporary(out)
    assert out.results is not None and "BDAT" in out.results[0].text
    assert wire.closed


def test_chunking_can_be_turned_off(tmp_path: Path) -> None:
    """C{[outbound] chunking = false}: DATA, even to a peer offering CHUNKING."""
    hop = Hop(tmp_path, chunking=False)
    out = hop.submit(message=DOTTY)
    hop.serve(ChunkingServer)
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    cmds = hop.servers[0].commands
    assert b"DATA" in cmds and not any(c.startswith(b"BDAT") for c in cmds)
    assert hop.servers[0].messages[0].data == DOTTY


def test_empty_message_is_one_empty_last_chunk(tmp_path: Path) -> None:
    """A zero-octet message goes as C{BDAT 0 LAST}."""
    hop = Hop(tmp_path)
    out = hop.submit(message=b"")
    hop.serve(ChunkingServer)
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    assert hop.servers[0].chunks == [(b"BDAT 0 LAST", b"")]


def test_many_messages_with_bdat_on_one_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection reuse with BDAT: twenty multi-chunk messages, one connection, each byte-exact."""
    monkeypatch.setattr(RelayClient, "BDAT_CHUNK", 64)
    hop = Hop(tmp_path, concurrency=1)
    bodies = [b"Subject: %d\r\n\r\n" % i + b".\r\n" * i + b"y" * (50 * i) + b"\r\n" for i in range(20)]
    outs = [hop.submit(message=b) for b in bodies]
    hop.serve(ChunkingServer)
    assert all(results_of(o) == {"rcpt@example.net": (250, "2.0.0")} for o in outs)
    assert len(hop.servers) == 1
    assert [m.data for m in hop.servers[0].messages] == bodies


def test_transfer_debug_line(tmp_path: Path) -> None:
    """Each message sent leaves one debug log line saying how: method, chunks, octets, converted."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        hop = Hop(tmp_path)
        hop.submit(message=EIGHT_BIT_MESSAGE, params={"body": "8BITMIME", "content": "78"})
        hop.serve(lambda: ChunkingServer((b"PIPELINING", b"CHUNKING")))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    (line,) = [e for e in seen if e.get("log_format", "").startswith("transfer ")]
    (msg,) = hop.servers[0].messages
    assert (line["method"], line["chunks"], line["octets"], line["converted"], line["code"]) == (
        "BDAT", 1, len(msg.data), True, 250,
    )


def test_outbound_options_in_the_config() -> None:
    """
    C{[outbound] eight_bit} (convert | bounce, default convert) and
    C{chunking} (default true) are read, refused with the key's name when
    wrong, and written back by C{check-config}'s rendering.
    """
    import tomllib

    from relaynet.config import ConfigError, describe, parse_config

    assert (Outbound().eight_bit, Outbound().chunking) == ("convert", True)
    config = parse_config({"outbound": {"eight_bit": "bounce", "chunking": False}}, "node.toml")
    assert (config.outbound.eight_bit, config.outbound.chunking) == ("bounce", False)
    again = parse_config(tomllib.loads(describe(config)), "again.toml")
    assert again.outbound == config.outbound
    with pytest.raises(ConfigError) as e:
        parse_config({"outbound": {"eight_bit": "drop"}}, "node.toml")
    assert "outbound.eight_bit" in str(e.value) and "convert or bounce" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"outbound": {"chunking": "yes"}}, "node.toml")
    assert "outbound.chunking" in str(e.value)
