"""
Tests for L{relaynet.intake.server}: the SMTP server side of the relay.

Every test talks SMTP bytes to a L{RelayESMTP} over a C{StringTransport},
with a L{relaynet.testing.ManualThreadPool} standing in for the spool's
threads, and looks at effects: the replies on the wire, the queue files in
C{new/} (and C{tmp/}), their envelopes.

The tests named after a trap of C{shared/TWISTED-TRAPS.md} also run against a
plain C{twisted.mail.smtp.ESMTP} with the smallest equivalent delivery
(L{CollectingDelivery}); there they must fail (C{xfail(strict=True)}), which
proves that each such test can see the trap.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThreadPool
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from relaynet.events import EventLog
from relaynet.intake.server import drain
from relaynet.queue.spool import SpoolWriter
from relaynet.testing import (
    ManualThreadPool,
    Reply,
    ThreadlessReactor,
    connect,
    make_config,
    make_intake,
    spooled,
    take_replies,
)

HOST = "relay.test"
ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |\Z)")
QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-Z]+)\Z")
UNTRUSTED = ("10.1.2.3", 50000)

def lenient(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """
    C{overrides} with C{[limits] forbid_unauth_pipelining = false} unless they
    say otherwise: most tests here send EHLO and the next commands in one
    read for brevity, which a strict server refuses (see the tests of
    improper pipelining, which turn it back on).
    """
    merged = dict(overrides or {})
    merged["limits"] = {"forbid_unauth_pipelining": False, **merged.get("limits", {})}
    return merged


Stored = tuple[tuple[str, ...], bytes]
"""A delivered message: its recipients and its bytes without our trace header."""


# -- the two servers under test -------------------------------------------


class Harness:
    """
    One SMTP session under test and the pool that runs its asynchronous work.

    @ivar enhanced_codes: the server advertises ENHANCEDSTATUSCODES, so
        L{expect} also checks the enhanced codes it is given.
    """

    enhanced_codes = True
    protocol: Any
    transport: StringTransport
    reactor: ThreadlessReactor
    pool: ManualThreadPool

    def _connected(self) -> None:
        self.greeting = take_replies(self.transport)

    def send(self, data: bytes) -> list[Reply]:
        """Deliver C{data} as one read; the replies written by then."""
        self.protocol.dataReceived(data)
        return take_replies(self.transport)

    def settle(self) -> list[Reply]:
        """Run all queued pool work; the replies written by then."""
        self.pool.run_all()
        return take_replies(self.transport)

    def step(self) -> list[Reply]:
        """Run one queued pool work item; the replies written by then."""
        assert self.pool.run_one(), "no pool work was queued"
        return take_replies(self.transport)

    def chat(self, data: bytes) -> list[Reply]:
        """Send C{data} and settle: every reply it leads to."""
        return self.send(data) + self.settle()

    def advance(self, seconds: float) -> list[Reply]:
        """Move the clock on; the replies written by then."""
        self.reactor.advance(seconds)
        return take_replies(self.transport)

    def lose(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionLost("client went away")))

    @property
    def closed(self) -> bool:
        """The server has closed (or is closing) the connection."""
        return bool(self.transport.disconnecting)

    def stored(self) -> list[Stored]:
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        """Names of partial message files (the spool's C{tmp/})."""
        return []

    def begin_data(self, rcpts: Sequence[str] = ("b@localhost",)) -> None:
        """EHLO, MAIL, RCPT..., DATA, each answered as expected."""
        cmds = b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n" + b"".join(
            b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts
        )
        replies = self.chat(cmds)
        assert [c for c, _ in replies] == [250, 250] + [250] * len(rcpts), replies
        assert [c for c, _ in self.chat(b"DATA\r\n")] == [354]


class RelayHarness(Harness):
    """Our L{RelayESMTP} on a real spool."""

    @classmethod
    def open(
        cls,
        tmp_path: Path,
        config_overrides: Mapping[str, Any] | None = None,
        peer: tuple[str, int] | IAddress = ("127.0.0.1", 40000),
        toml: str | None = None,
    ) -> "RelayHarness":
        self = cls()
        self.intake, self.reactor, self.pool = make_intake(tmp_path, lenient(config_overrides), toml)
        self.protocol, self.transport = connect(self.intake, peer=peer)
        self._connected()
        return self

    def stored(self) -> list[Stored]:
        return [
            (tuple(r.address for r in m.envelope.recipients), without_trace(m.message))
            for m in spooled(self.intake.spool)
        ]

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.intake.spool.tmp_dir.iterdir())

    def new_ids(self) -> list[str]:
        return sorted(p.name for p in self.intake.spool.new_dir.iterdir())


@implementer(smtp.IMessage)
class CollectedMessage:
    """An C{IMessage} that stores its lines once the pool has run."""

    def __init__(self, delivery: "CollectingDelivery", recipient: str) -> None:
        self.delivery = delivery
        self.recipient = recipient
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Any:
        data = b"".join(line + b"\r\n" for line in self.lines)
        item = ((self.recipient,), data)
        h = self.delivery.harness
        return deferToThreadPool(h.reactor, h.pool, self.delivery.messages.append, item)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class CollectingDelivery:
    """
    The minimal delivery for C{twisted.mail.smtp.ESMTP}: every sender is
    accepted, recipients in local domains too, others are refused as a
    Twisted user would (C{SMTPBadRcpt} with a bytes reply); messages collect
    their lines and are stored asynchronously, like our commit.
    """

    def __init__(self, harness: "TwistedHarness", local_domains: Sequence[str]) -> None:
        self.harness = harness
        self.local = {d.encode() for d in local_domains}
        self.messages: list[Stored] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from client by " + HOST.encode() + b"; Thu, 1 Jan 1970 00:00:00 +0000"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], CollectedMessage]:
        if user.dest.domain not in self.local:
            raise smtp.SMTPBadRcpt(user, 554, b"5.7.1 Relay access denied")
        return lambda: CollectedMessage(self, str(user.dest))


class TwistedHarness(Harness):
    """
    C{twisted.mail.smtp.ESMTP} configured like our node: host name, idle
    timeout (copied by hand, as C{SMTPFactory} never does) on our clock, and
    a line limit of C{limits.max_line_length}.
    """

    enhanced_codes = False

    @classmethod
    def open(
        cls,
        tmp_path: Path,
        config_overrides: Mapping[str, Any] | None = None,
        peer: tuple[str, int] | IAddress = ("127.0.0.1", 40000),
        toml: str | None = None,
    ) -> "TwistedHarness":
        self = cls()
        config = make_config(tmp_path, config_overrides, toml)
        self.reactor, self.pool = ThreadlessReactor(), ManualThreadPool()
        self.delivery = CollectingDelivery(self, config.local.domains)
        proto = smtp.ESMTP()
        proto.delivery = self.delivery
        proto.host = config.hostname
        proto.timeout = config.limits.idle_timeout
        proto.MAX_LENGTH = config.limits.max_line_length
        proto.callLater = self.reactor.callLater
        address = IPv4Address("TCP", *peer) if isinstance(peer, tuple) else peer
        self.protocol, self.transport = proto, StringTransport(peerAddress=address)
        proto.makeConnection(self.transport)
        self._connected()
        return self

    def stored(self) -> list[Stored]:
        return [(rcpts, without_trace(data)) for rcpts, data in self.delivery.messages]


def both(trap: int) -> pytest.MarkDecorator:
    """Run a test on our server and (expected to fail) on twisted.mail's."""
    return pytest.mark.parametrize(
        "server",
        [
            pytest.param(RelayHarness, id="relaynet"),
            pytest.param(
                TwistedHarness, id="twisted",
                marks=pytest.mark.xfail(strict=True, reason=f"twisted.mail trap {trap}"),
            ),
        ],
    )


@pytest.fixture
def relay(tmp_path: Path) -> RelayHarness:
    """A session with our server, default configuration, trusted client."""
    return RelayHarness.open(tmp_path)


# -- helpers ---------------------------------------------------------------


TRACE = re.compile(
    rb"Received: .*?; [A-Z][a-z]{2}, [0-9]{1,2} [A-Z][a-z]{2} [0-9]{4} [0-9:]{8} [-+][0-9]{4}\r\n",
    re.DOTALL,
)


def without_trace(message: bytes) -> bytes:
    """
    C{message} without the server's C{Received:} field, which ends with its
    date (so a message whose first line starts with white space, which looks
    like a continuation, is cut right).
    """
    m = TRACE.match(message)
    assert m is not None, message[:200]
    return message[m.end() :]


def codes(replies: list[Reply]) -> list[int]:
    """The reply codes of C{replies}."""
    return [code for code, _ in replies]


def expect(h: Harness, replies: list[Reply], expected: Sequence[int | tuple[int, str]]) -> None:
    """
    C{replies} have the C{expected} codes; where an enhanced status code is
    given too, and the server advertises them, the reply starts with it.
    """
    assert codes(replies) == [e if isinstance(e, int) else e[0] for e in expected], replies
    for (code, text), e in zip(replies, expected):
        if isinstance(e, tuple) and h.enhanced_codes:
            assert text.startswith(e[1] + " "), (code, text, e)


def queued_id(reply: Reply) -> str:
    """The queue id of a C{250 2.0.0 Ok: queued as ID} reply (asserting it is one)."""
    code, text = reply
    m = QUEUED.match(text)
    assert code == 250 and m is not None, reply
    return m.group(1)


def enhanced_ok(reply: Reply) -> bool:
    """Every line of C{reply} starts with an RFC 3463 code of the reply's class."""
    code, text = reply
    for line in text.split("\n"):
        m = ENHANCED.match(line)
        if m is None or int(m.group(1)) != code // 100:
            return False
    return True


def session_reply_ok(reply: Reply) -> bool:
    """
    A reply of our server is well formed: an enhanced code of its class,
    except the greeting, the EHLO/HELO greeting line(s) and 354.
    """
    code, text = reply
    if code in (220, 354) or (code == 250 and text.split("\n")[0] == HOST):
        return True
    return enhanced_ok(reply)


MESSAGE = b"Subject: test\r\n\r\nHello.\r\n"
PARTNER_ROUTE = """
[[route]]
domains = ["partner.example", "*.partner.example"]
action = "relay"
next_hops = ["tcp:192.0.2.1:25"]
"""


# -- the helpers of relaynet.testing ----------------------------------------


def test_manual_thread_pool_runs_on_demand() -> None:
    """
    ManualThreadPool runs work only when asked, in order, including work
    queued while running, and reports results and failures as a thread pool
    does, so deferToThreadPool works over it.
    """
    reactor, pool = ThreadlessReactor(), ManualThreadPool()
    order: list[str] = []
    results: list[object] = []

    def first() -> str:
        order.append("first")
        deferToThreadPool(reactor, pool, order.append, "nested")
        return "one"

    deferToThreadPool(reactor, pool, first).addCallback(results.append)
    deferToThreadPool(reactor, pool, lambda: 1 / 0).addErrback(
        lambda f: results.append(f.type)
    )
    assert order == [] and pool.pending == 2
    assert pool.run_one()
    assert order == ["first"] and results == ["one"] and pool.pending == 2
    assert pool.run_all() == 2
    assert order == ["first", "nested"] and results == ["one", ZeroDivisionError]
    assert not pool.run_one()


def test_manual_thread_pool_immediate() -> None:
    """With immediate=True, work runs as soon as it is submitted."""
    pool = ManualThreadPool(immediate=True)
    pool.start()
    seen: list[tuple[bool, object]] = []
    pool.callInThreadWithCallback(lambda ok, r: seen.append((ok, r)), pow, 2, 5)
    assert seen == [(True, 32)] and pool.pending == 0
    pool.stop()


def test_take_replies_parses_and_keeps_partial() -> None:
    """
    take_replies joins multi-line replies, keeps an unfinished reply (or
    line) for the next read, and refuses what is not an SMTP reply.
    """
    t = StringTransport()
    t.write(b"250-relay.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n221 2.0.0 Bye\r\n214-2.0.0 a\r\n21")
    assert take_replies(t) == [(250, "relay.test\nPIPELINING\nSIZE 10"), (221, "2.0.0 Bye")]
    t.write(b"4 2.0.0 b\r\n")
    assert take_replies(t) == [(214, "2.0.0 a\n2.0.0 b")]
    t.write(b"hello\r\n")
    with pytest.raises(ValueError):
        take_replies(t)


# -- greeting, EHLO, HELO --------------------------------------------------


def test_greeting(relay: RelayHarness) -> None:
    """The server greets with one 220 reply naming its host name."""
    assert relay.greeting == [(220, f"{HOST} ESMTP relaynet")]


def test_ehlo_lists_extensions(tmp_path: Path) -> None:
    """
    EHLO answers 250 with the host name first, then PIPELINING, SIZE with the
    configured limit, ENHANCEDSTATUSCODES and 8BITMIME.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_message_size": 123456}})
    [(code, text)] = h.send(b"EHLO client.test\r\n")
    lines = text.split("\n")
    assert code == 250
    assert lines[0] == HOST
    for ext in ("PIPELINING", "SIZE 123456", "ENHANCEDSTATUSCODES", "8BITMIME"):
        assert ext in lines[1:]


def test_helo(relay: RelayHarness) -> None:
    """HELO answers 250 and allows a transaction."""
    assert relay.send(b"HELO client.test\r\n") == [(250, HOST)]
    expect(relay, relay.send(b"MAIL FROM:<a@localhost>\r\n"), [(250, "2.1.0")])


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO", b"helo", b"EHLO   "])
def test_helo_needs_argument(relay: RelayHarness, verb: bytes) -> None:
    """HELO or EHLO without a host name is 501 5.5.4, and MAIL still needs one."""
    expect(relay, relay.send(verb + b"\r\n"), [(501, "5.5.4")])
    expect(relay, relay.send(b"MAIL FROM:<a@localhost>\r\n"), [(503, "5.5.1")])


def test_non_ascii_helo_name(relay: RelayHarness) -> None:
    """A non-ASCII EHLO argument is accepted; the session goes on."""
    assert codes(relay.send(b"EHLO caf\xc3\xa9.example\r\n")) == [250]
    assert codes(relay.send(b"MAIL FROM:<a@localhost>\r\n")) == [250]


def test_not_accepting(tmp_path: Path) -> None:
    """A node that stopped accepting answers a new connection 421 4.3.2 and closes it."""
    intake, _, _ = make_intake(tmp_path)
    intake.accepting = False
    _, transport = connect(intake)
    [(code, text)] = take_replies(transport)
    assert (code, text[:6]) == (421, "4.3.2 ")
    assert transport.disconnecting


# -- enhanced status codes -------------------------------------------------


def test_every_reply_has_an_enhanced_code(tmp_path: Path) -> None:
    """
    Across a long session of good and bad commands, every reply but the 220
    greeting, the EHLO/HELO 250 and the 354 carries an RFC 3463 enhanced
    status code whose class equals the reply's first digit, on every line.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_errors": 100}})
    script = [
        b"MAIL FROM:<a@localhost>", b"HELO", b"EHLO", b"RCPT TO:<b@localhost>", b"DATA",
        b"NOOP", b"HELP", b"VRFY", b"VRFY b@localhost", b"EXPN staff", b"FOO bar",
        b"", b"\xff\xfe", b"NOOP\x00", b"X" * 3000, b"STARTTLS", b"AUTH PLAIN",
        b"EHLO client.test",
        b"RCPT TO:<b@localhost>", b"DATA", b"MAIL FROM:a@localhost",
        b"MAIL FROM:<a@localhost> BOGUS=1", b"MAIL FROM:<a@localhost> SIZE=99999999999",
        b"MAIL FROM:<a@localhost> BODY=BINARYMIME", b"MAIL FROM:<\xc3\xa9@localhost>",
        b"MAIL FROM:<a@localhost> SIZE=100", b"MAIL FROM:<c@localhost>", b"DATA",
        b"RCPT TO:b@localhost", b"RCPT TO:<b@localhost> FOO=1", b"RCPT TO:<>",
        b"RCPT TO:<x@elsewhere.example>", b"RCPT TO:<b@localhost>", b"DATA x",
        b"DATA", b"Subject: one\r\n\r\nbody\r\n.",
        b"MAIL FROM:<a@localhost>", b"RCPT TO:<b@localhost>", b"DATA", b"bare\nLF\r\n.",
        b"MAIL FROM:<a@localhost>", b"RCPT TO:<b@localhost>", b"RSET", b"DATA",
        b"HELO client.test", b"QUIT",
    ]
    seen: list[Reply] = list(h.greeting)
    for line in script:
        replies = h.chat(line + b"\r\n")
        assert replies, line
        seen += replies
    assert h.closed
    assert {c for c, _ in seen} >= {214, 221, 250, 252, 354, 500, 501, 502, 503, 550, 552, 554, 555}
    bad = [r for r in seen if not session_reply_ok(r)]
    assert bad == []


# -- command sequence and simple commands --------------------------------


@both(8)
def test_missing_commands(server: type[Harness], tmp_path: Path) -> None:
    """
    MAIL before HELO/EHLO is 503 5.5.1; NOOP is 250, VRFY 252, HELP 214.
    """
    h = server.open(tmp_path)
    expect(h, h.send(b"MAIL FROM:<a@localhost>\r\n"), [(503, "5.5.1")])
    expect(h, h.send(b"NOOP\r\n"), [(250, "2.0.0")])
    expect(h, h.send(b"VRFY b@localhost\r\n"), [(252, "2.0.0")])
    expect(h, h.send(b"HELP\r\n"), [(214, "2.0.0")])


def test_sequence_errors(relay: RelayHarness) -> None:
    """
    RCPT before MAIL and DATA before MAIL are 503 5.5.1; DATA without an
    accepted recipient is 554 5.5.1; a nested MAIL is 503 5.5.1.
    """
    h = relay
    h.send(b"EHLO client.test\r\n")
    expect(h, h.send(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])
    expect(h, h.send(b"DATA\r\n"), [(503, "5.5.1")])
    expect(h, h.send(b"MAIL FROM:<a@localhost>\r\n"), [(250, "2.1.0")])
    expect(h, h.send(b"DATA\r\n"), [(554, "5.5.1")])
    expect(h, h.send(b"MAIL FROM:<c@localhost>\r\n"), [(503, "5.5.1")])
    expect(h, h.send(b"RCPT TO:<b@localhost>\r\n"), [(250, "2.1.5")])


@pytest.mark.parametrize("reset", [b"RSET", b"HELO client.test", b"EHLO client.test"])
def test_reset_clears_transaction(relay: RelayHarness, reset: bytes) -> None:
    """RSET (and a new HELO/EHLO) ends the transaction: a following RCPT is 503."""
    h = relay
    assert codes(h.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")) == [250, 250]
    assert codes(h.send(b"RCPT TO:<b@localhost>\r\n")) == [250]
    assert codes(h.send(reset + b"\r\n")) == [250]
    expect(h, h.send(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])
    expect(h, h.send(b"DATA\r\n"), [(503, "5.5.1")])


def test_simple_commands(relay: RelayHarness) -> None:
    """NOOP 250 2.0.0, VRFY 252 2.0.0, VRFY alone 501, HELP 214, EXPN and unknown verbs 502 5.5.2."""
    h = relay
    expect(h, h.send(b"NOOP\r\n"), [(250, "2.0.0")])
    expect(h, h.send(b"VRFY someone\r\n"), [(252, "2.0.0")])
    expect(h, h.send(b"VRFY\r\n"), [(501, "5.5.4")])
    expect(h, h.send(b"HELP\r\n"), [(214, "2.0.0")])
    expect(h, h.send(b"EXPN staff\r\n"), [(502, "5.5.2")])
    expect(h, h.send(b"FROBNICATE\r\n"), [(502, "5.5.2")])
    expect(h, h.send(b"\r\n"), [(500, "5.5.2")])


# -- CHUNKING / BDAT (RFC 3030) ------------------------------------------------


def open_txn(h: RelayHarness, rcpts: Sequence[str] = ("b@localhost",)) -> None:
    replies = h.chat(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n"
                     + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts))
    assert codes(replies) == [250, 250] + [250] * len(rcpts), replies


def test_chunking_is_offered_and_bdat_stores_chunks_as_they_are(relay: RelayHarness) -> None:
    """CHUNKING in EHLO; chunks (split anywhere, a line-initial dot kept) make one message, 250 once durable."""
    h = relay
    assert any("CHUNKING" in text for _, text in h.chat(b"EHLO client.test\r\n"))
    open_txn(h)
    message = b"Subject: chunks\r\n\r\n.not stuffed\r\nline two\r\n"
    expect(h, h.chat(b"BDAT 20\r\n" + message[:20]), [(250, "2.0.0")])
    replies = h.chat(b"BDAT %d LAST\r\n" % (len(message) - 20) + message[20:])
    expect(h, replies, [(250, "2.0.0")])
    queued_id(replies[0])
    assert h.stored() == [(("b@localhost",), message)]


def test_bdat_pipelined_in_one_write(relay: RelayHarness) -> None:
    """MAIL, RCPT, two chunks and QUIT in one write: every reply in order, one message."""
    h = relay
    h.chat(b"EHLO client.test\r\n")
    replies = h.chat(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n")
    assert codes(replies) == [250, 250, 250, 250, 221], replies
    assert h.stored() == [(("b@localhost",), b"abc")]


def test_replies_before_a_pipelined_bdat_last_go_with_its_reply(relay: RelayHarness) -> None:
    """
    MAIL, RCPT and BDAT LAST in one write: the replies to MAIL and RCPT are
    held until the message is durable and go with its 250, in one write
    (RFC 2920 3.1 lets a server send the replies of a group as a unit).
    """
    h = relay
    h.chat(b"EHLO client.test\r\n")
    writes: list[bytes] = []
    real_write = h.transport.write
    h.transport.write = lambda data: (writes.append(data), real_write(data))[1]  # type: ignore[method-assign]
    assert h.send(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nBDAT 3 LAST\r\nabc") == []
    assert codes(h.settle()) == [250, 250, 250]
    assert len(writes) == 1, writes
    assert h.stored() == [(("b@localhost",), b"abc")]
    # DATA's 354 is never held (RFC 2920 3.1), nor the replies before it.
    assert codes(h.chat(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")) == [250, 250, 354]


@pytest.mark.parametrize(("setup", "expected"), [
    (b"", (503, "5.5.1")),                                   # no MAIL
    (b"MAIL FROM:<a@localhost>\r\n", (554, "5.5.1")),        # no recipient
])
def test_refused_bdat_chunk_is_read_and_dropped(relay: RelayHarness, setup: bytes, expected: tuple[int, str]) -> None:
    """A refused chunk's octets are read (never run as commands): the next command works."""
    h = relay
    h.chat(b"EHLO client.test\r\n" + setup)
    replies = h.chat(b"BDAT 12 LAST\r\nQUIT\r\nNOOP\r\nNOOP\r\n")
    expect(h, replies, [expected, (250, "2.0.0")])
    assert not h.closed and h.stored() == []


def test_data_after_bdat_and_rset(relay: RelayHarness) -> None:
    """DATA after BDAT in one transaction is 503; RSET drops the chunks: nothing stored, nothing left."""
    h = relay
    open_txn(h)
    expect(h, h.chat(b"BDAT 4\r\nabcd"), [(250, "2.0.0")])
    expect(h, h.chat(b"DATA\r\n"), [(503, "5.5.1")])
    expect(h, h.chat(b"RSET\r\n"), [(250, "2.0.0")])
    assert h.stored() == [] and h.leftovers() == []
    open_txn(h)
    assert codes(h.chat(b"DATA\r\n")) == [354]


def test_bdat_too_big_and_bare_lf(tmp_path: Path) -> None:
    """Over max_message_size: 552 5.3.4 at the chunk; bare LF: 550 5.5.2 at LAST; later chunks refused too."""
    h = RelayHarness.open(tmp_path, {"limits": {"max_message_size": 1000}})
    open_txn(h)
    expect(h, h.chat(b"BDAT 1500\r\n" + b"x" * 1500), [(552, "5.3.4")])
    expect(h, h.chat(b"BDAT 2 LAST\r\nok"), [(552, "5.3.4")])
    open_txn(h)
    expect(h, h.chat(b"BDAT 9 LAST\r\nbare\nlf\r\n"), [(550, "5.5.2")])
    assert h.stored() == [] and h.leftovers() == []


def test_trickle_between_bdat_chunks_is_cut_off(tmp_path: Path) -> None:
    """Between BDAT chunks the idle timer runs per command line too: a byte-a-second trickle ends in 421."""
    h = RelayHarness.open(tmp_path, {"limits": {"idle_timeout": 30}})
    open_txn(h)
    expect(h, h.chat(b"BDAT 4\r\nabcd"), [(250, "2.0.0")])
    replies = []
    for _ in range(40):
        replies += h.send(b"N")
        replies += h.advance(1)
    assert codes(replies) == [421] and h.closed, replies
    assert h.settle() == [] and h.leftovers() == []


def test_bdat_without_a_size_ends_the_session(relay: RelayHarness) -> None:
    """The octets after a BDAT with no size cannot be told from commands: 501, then 421 and close."""
    h = relay
    open_txn(h)
    expect(h, h.chat(b"BDAT many LAST\r\nRCPT TO:<evil@localhost>\r\n"), [(501, "5.5.4"), (421, "4.7.0")])
    assert h.closed and h.stored() == []


def test_quit(relay: RelayHarness) -> None:
    """QUIT is answered 221 2.0.0 and the server closes; pipelined commands after it are ignored."""
    expect(relay, relay.send(b"QUIT\r\nNOOP\r\n"), [(221, "2.0.0")])
    assert relay.closed
    assert relay.send(b"NOOP\r\n") == []


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"MAIL FROM:a@localhost", (501, "5.5.4")),
        (b"MAIL FROM <a@localhost>", (501, "5.5.4")),
        (b"MAIL TO:<a@localhost>", (501, "5.5.4")),
        (b"MAIL FROM:<a@localhost", (501, "5.1.7")),
        (b"MAIL FROM:<a@@localhost>", (501, "5.1.7")),
        (b"MAIL FROM:<a@localhost>x", (501, "5.5.4")),
        (b"MAIL FROM:<a@localhost> BOGUS=1", (555, "5.5.4")),
        (b"MAIL FROM:<a@localhost> SIZE=abc", (501, "5.5.4")),
        (b"MAIL FROM:<a@localhost> SIZE=99999999999", (552, "5.3.4")),
        (b"MAIL FROM:<a@localhost> SIZE=10240001", (552, "5.3.4")),
        (b"MAIL FROM:<\xc3\xa9@localhost>", (553, "5.6.7")),
        (b"MAIL FROM:<a\x00@localhost>", (501, "5.5.2")),
    ],
)
def test_mail_refused(relay: RelayHarness, command: bytes, expected: tuple[int, str]) -> None:
    """A MAIL with bad syntax or parameters is refused with the right code; no transaction starts."""
    relay.send(b"EHLO client.test\r\n")
    expect(relay, relay.send(command + b"\r\n"), [expected])
    expect(relay, relay.send(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"RCPT TO:b@localhost", (501, "5.5.4")),
        (b"RCPT TO:<>", (501, "5.1.3")),
        (b"RCPT TO:<b@localhost> FOO=1", (555, "5.5.4")),
        (b"RCPT TO:<b@localhost> NOTIFY=SOMETIMES", (501, "5.5.4")),
    ],
)
def test_rcpt_refused(relay: RelayHarness, command: bytes, expected: tuple[int, str]) -> None:
    """A RCPT with bad syntax is refused; the transaction stays open."""
    assert codes(relay.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")) == [250, 250]
    expect(relay, relay.send(command + b"\r\n"), [expected])
    expect(relay, relay.send(b"RCPT TO:<b@localhost>\r\n"), [(250, "2.1.5")])


def test_esmtp_parameters_need_ehlo(relay: RelayHarness) -> None:
    """After HELO (not EHLO), MAIL parameters are refused with 555 5.5.4."""
    relay.send(b"HELO client.test\r\n")
    expect(relay, relay.send(b"MAIL FROM:<a@localhost> SIZE=10\r\n"), [(555, "5.5.4")])
    expect(relay, relay.send(b"MAIL FROM:<a@localhost> SMTPUTF8\r\n"), [(555, "5.5.4")])
    expect(relay, relay.send(b"MAIL FROM:<a@localhost>\r\n"), [(250, "2.1.0")])


@both(9)
def test_esmtp_parameters_enforced(server: type[Harness], tmp_path: Path) -> None:
    """
    EHLO advertises SIZE with the configured limit; a SIZE= over it is
    refused 552 5.3.4 at MAIL, an unknown parameter 555 5.5.4; a SIZE= under
    it is accepted.
    """
    h = server.open(tmp_path, {"limits": {"max_message_size": 5000}})
    [(code, text)] = h.send(b"EHLO client.test\r\n")
    assert code == 250 and "SIZE 5000" in text.split("\n")
    expect(h, h.send(b"MAIL FROM:<a@localhost> SIZE=5001\r\n"), [(552, "5.3.4")])
    expect(h, h.send(b"MAIL FROM:<a@localhost> BOGUS=1\r\n"), [(555, "5.5.4")])
    expect(h, h.send(b"MAIL FROM:<a@localhost> SIZE=5000\r\n"), [(250, "2.1.0")])


def test_smtputf8(tmp_path: Path) -> None:
    """
    With SMTPUTF8 on MAIL, UTF-8 addresses are accepted and stored as given
    (the domain as A-labels), and the protocol is recorded as UTF8SMTP.
    """
    h = RelayHarness.open(tmp_path, toml=PARTNER_ROUTE)
    assert codes(h.chat(b"EHLO client.test\r\nMAIL FROM:<\xc3\xa9@localhost> SMTPUTF8\r\n")) == [250, 250]
    expect(h, h.chat(b"RCPT TO:<j\xc3\xb6rg@partner.example>\r\n"), [(250, "2.1.5")])
    expect(h, h.chat(b"RCPT TO:<b@b\xc3\xbccher.partner.example>\r\n"), [(250, "2.1.5")])
    h.chat(b"DATA\r\n")
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    [m] = spooled(h.intake.spool)
    assert m.envelope.sender == "\u00e9@localhost"
    assert [r.address for r in m.envelope.recipients] == [
        "j\u00f6rg@partner.example", "b@xn--bcher-kva.partner.example",
    ]
    assert m.envelope.params["smtputf8"] is True
    assert m.envelope.client["protocol"] == "UTF8SMTP"


def test_too_many_recipients(tmp_path: Path) -> None:
    """Past limits.max_recipients, RCPT is 452 4.5.3; the accepted ones are kept."""
    h = RelayHarness.open(tmp_path, {"limits": {"max_recipients": 100}})
    h.chat(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")
    replies = h.chat(b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(101)))
    assert codes(replies) == [250] * 100 + [452]
    assert replies[-1][1].startswith("4.5.3 ")
    h.chat(b"DATA\r\n")
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    [(rcpts, _)] = h.stored()
    assert len(rcpts) == 100


# -- policy ----------------------------------------------------------------


@both(10)
def test_refused_recipient_is_answered(server: type[Harness], tmp_path: Path) -> None:
    """
    A client outside the trusted networks that names a non-local domain gets
    554 5.7.1 (no open relay), and the session goes on: a local recipient is
    then accepted.

    Of trap 10 only this part is reachable here: our intake has no
    C{IMessage} to raise from, and its 421s always close (see
    L{test_too_many_errors}, L{test_idle_timeout}).
    """
    h = server.open(tmp_path, peer=UNTRUSTED)
    assert codes(h.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")) == [250, 250]
    expect(h, h.send(b"RCPT TO:<x@elsewhere.example>\r\n"), [(554, "5.7.1")])
    expect(h, h.send(b"RCPT TO:<b@localhost>\r\n"), [(250, "2.1.5")])


def test_trusted_client_unrouted_domain(relay: RelayHarness) -> None:
    """A trusted client naming a domain no route covers gets 550 5.1.2."""
    relay.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")
    expect(relay, relay.send(b"RCPT TO:<x@elsewhere.example>\r\n"), [(550, "5.1.2")])


def test_trusted_client_relays_to_route(tmp_path: Path) -> None:
    """
    A trusted client may send to a relay route's domain; the route is
    recorded by its identity (action and patterns), which a reload that
    reorders the rules does not change.
    """
    h = RelayHarness.open(
        tmp_path,
        toml=PARTNER_ROUTE,
    )
    h.begin_data(["x@partner.example"])
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    [m] = spooled(h.intake.spool)
    assert [(r.address, r.route) for r in m.envelope.recipients] == [("x@partner.example", "relay:partner.example,*.partner.example")]


def test_local_users(tmp_path: Path) -> None:
    """Without a catch-all, an unknown local user is 550 5.1.1 and a known one 250."""
    h = RelayHarness.open(tmp_path, {"local": {"catch_all": False, "users": ["alice"]}})
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")
    expect(h, h.send(b"RCPT TO:<bob@localhost>\r\n"), [(550, "5.1.1")])
    expect(h, h.send(b"RCPT TO:<alice@localhost>\r\n"), [(250, "2.1.5")])


def test_postmaster_without_domain(relay: RelayHarness) -> None:
    """RCPT TO:<postmaster> is accepted and stored as postmaster at the first local domain."""
    relay.send(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")
    expect(relay, relay.send(b"RCPT TO:<Postmaster>\r\n"), [(250, "2.1.5")])
    relay.send(b"DATA\r\n")
    queued_id(relay.chat(MESSAGE + b".\r\n")[0])
    [(rcpts, _)] = relay.stored()
    assert rcpts == ("Postmaster@localhost",)


# -- accepting messages ----------------------------------------------------


def test_commit_before_ack(relay: RelayHarness) -> None:
    """
    The 250 after the final dot is sent only once the spool's commit work has
    run: before, nothing is in new/ (a small message is not even in tmp/: its
    file is created by the commit job, off the reactor thread) and no reply
    is written; after, C{250 2.0.0 Ok: queued as ID} names the file new/ID, and
    the intake was told about the entry.
    """
    h = relay
    h.begin_data()
    assert h.send(MESSAGE + b".\r\n") == []
    assert h.new_ids() == []
    assert h.leftovers() == []
    assert h.pool.pending > 0
    [reply] = h.settle()
    qid = queued_id(reply)
    assert h.new_ids() == [qid]
    assert h.leftovers() == []
    assert [e.queue_id for e in h.intake.queued_entries] == [qid]


def test_transactions_get_own_queue_ids(relay: RelayHarness) -> None:
    """Several transactions in one session: each gets its own queue id and file."""
    h = relay
    h.send(b"EHLO client.test\r\n")
    ids = []
    for i in range(3):
        replies = h.chat(
            b"MAIL FROM:<a@localhost>\r\nRCPT TO:<r%d@localhost>\r\nDATA\r\n" % i
            + b"Subject: %d\r\n\r\nbody %d\r\n.\r\n" % (i, i)
        )
        assert codes(replies) == [250, 250, 354, 250]
        ids.append(queued_id(replies[-1]))
    assert len(set(ids)) == 3
    assert h.new_ids() == sorted(ids)
    by_id = {m.queue_id: m for m in spooled(h.intake.spool)}
    for i, qid in enumerate(ids):
        m = by_id[qid]
        assert [r.address for r in m.envelope.recipients] == [f"r{i}@localhost"]
        assert without_trace(m.message) == b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)


def test_envelope(tmp_path: Path) -> None:
    """
    The queue file's envelope records the sender, the recipients in RCPT
    order (a repeated one once), MAIL parameters, the client (HELO name, IP,
    port, protocol, listener), the node, the arrival time, the size and the hop
    count.
    """
    h = RelayHarness.open(tmp_path, peer=("127.0.0.9", 41234))
    h.send(b"EHLO client.test\r\n")
    h.chat(b"MAIL FROM:<a@localhost> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x+2By\r\n")
    h.chat(b"RCPT TO:<b@localhost> NOTIFY=FAILURE,DELAY\r\nRCPT TO:<c@localhost>\r\n")
    assert codes(h.chat(b"RCPT TO:<b@localhost>\r\nDATA\r\n")) == [250, 354]
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    [m] = spooled(h.intake.spool)
    env = m.envelope
    assert env.sender == "a@localhost"
    assert [(r.address, r.route, r.notify) for r in env.recipients] == [
        ("b@localhost", "local", ("FAILURE", "DELAY")),
        ("c@localhost", "local", None),
    ]
    assert env.params == {"size": 100, "body": "8BITMIME", "smtputf8": False, "ret": "HDRS", "envid": "x+y",
                          "content": "77"}
    # Read back from the queue file; in memory, unset (None) values are left out.
    assert env.client == {
        "helo": "client.test", "ip": "127.0.0.9", "port": 41234, "protocol": "ESMTP",
        "listener": "tcp:2525:interface=127.0.0.1",
    }
    assert env.node == "test"
    assert env.arrival == h.reactor.seconds()
    assert env.size == len(m.message)
    assert env.hops == 1


def test_received_header(tmp_path: Path) -> None:
    """
    Our Received: header is prepended: it names the HELO name, the client IP
    as a literal, our host name, the protocol, the queue id and (with one
    recipient) the recipient, and its lines end in CRLF.
    """
    h = RelayHarness.open(tmp_path, peer=("127.0.0.5", 40000))
    h.begin_data()
    qid = queued_id(h.chat(MESSAGE + b".\r\n")[0])
    [m] = spooled(h.intake.spool)
    trace = m.message[: len(m.message) - len(MESSAGE)]
    assert m.message.endswith(MESSAGE)
    text = trace.decode()
    assert re.fullmatch(
        r"Received: from client\.test \(\[127\.0\.0\.5\]\)\r\n"
        rf"\tby relay\.test \(relaynet\) with ESMTP id {qid}\r\n"
        r"\tfor <b@localhost>; [^\r\n]+\r\n",
        text,
    ), text


@both(13)
def test_message_stored_byte_exact(server: type[Harness], tmp_path: Path) -> None:
    """
    The stored message is the client's, byte for byte, after our Received:
    header: a first line without a colon gets nothing inserted before it,
    dot-stuffed lines are unstuffed, 8-bit bytes and whitespace are kept.
    """
    h = server.open(tmp_path)
    h.begin_data()
    wire = (
        b"hello world, no colon here\r\n"
        b"..leading dot\r\n"
        b"caf\xc3\xa9 \t\r\n"
        b"\r\n"
        b"...\r\n"
        b"Subject: not a header any more\r\n"
    )
    expect(h, h.chat(wire + b".\r\n"), [(250, "2.0.0")])
    assert h.stored() == [
        (
            ("b@localhost",),
            b"hello world, no colon here\r\n.leading dot\r\ncaf\xc3\xa9 \t\r\n\r\n..\r\n"
            b"Subject: not a header any more\r\n",
        )
    ]


@both(1)
def test_one_message_per_transaction(server: type[Harness], tmp_path: Path) -> None:
    """A transaction with several recipients is stored once, with all of them."""
    h = server.open(tmp_path)
    h.begin_data(["b@localhost", "c@localhost", "d@localhost"])
    expect(h, h.chat(MESSAGE + b".\r\n"), [(250, "2.0.0")])
    assert h.stored() == [(("b@localhost", "c@localhost", "d@localhost"), MESSAGE)]


def test_repeated_recipient_stored_once(relay: RelayHarness) -> None:
    """A recipient named twice is accepted twice but stored once."""
    relay.begin_data(["b@localhost", "b@localhost"])
    queued_id(relay.chat(MESSAGE + b".\r\n")[0])
    assert relay.stored() == [(("b@localhost",), MESSAGE)]


def test_empty_message(relay: RelayHarness) -> None:
    """A message with no content at all (DATA then the dot) is accepted; only our header is stored."""
    relay.begin_data()
    queued_id(relay.chat(b".\r\n")[0])
    assert relay.stored() == [(("b@localhost",), b"")]


@both(2)
def test_pipelining_waits_for_commit(server: type[Harness], tmp_path: Path) -> None:
    """
    With PIPELINING, two whole transactions and QUIT sent in two writes are
    answered in order: nothing after the first message's dot is answered
    until that message is durable, the second transaction's replies follow
    the first 250, and QUIT closes only after both 250s. Both messages are
    stored.
    """
    h = server.open(tmp_path)
    h.send(b"EHLO client.test\r\n")
    first = b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n"
    expect(h, h.send(first), [250, 250, 250, 354])
    second = (
        b"Subject: one\r\n\r\nfirst\r\n.\r\n"
        b"MAIL FROM:<a@localhost>\r\nRCPT TO:<d@localhost>\r\nDATA\r\n"
        b"Subject: two\r\n\r\nsecond\r\n.\r\n"
        b"QUIT\r\n"
    )
    assert h.send(second) == []
    assert not h.closed
    replies: list[Reply] = []
    while not replies:
        replies = h.step()
    expect(h, replies, [(250, "2.0.0"), (250, "2.1.0"), (250, "2.1.5"), 354])
    assert not h.closed
    expect(h, h.settle(), [(250, "2.0.0"), (221, "2.0.0")])
    assert h.closed
    assert h.stored() == [
        (("b@localhost", "c@localhost"), b"Subject: one\r\n\r\nfirst\r\n"),
        (("d@localhost",), b"Subject: two\r\n\r\nsecond\r\n"),
    ]


def test_pipelined_reply_ids_match_files(relay: RelayHarness) -> None:
    """Pipelined transactions: each queued-as id in the replies names its own file."""
    h = relay
    data = b"EHLO client.test\r\n" + b"".join(
        b"MAIL FROM:<a@localhost>\r\nRCPT TO:<r%d@localhost>\r\nDATA\r\nbody %d\r\n.\r\n" % (i, i)
        for i in range(4)
    )
    replies = h.chat(data + b"QUIT\r\n")
    assert codes(replies) == [250] + [250, 250, 354, 250] * 4 + [221]
    ids = [queued_id(r) for r in replies[4:-1:4]]
    by_id = {m.queue_id: m for m in spooled(h.intake.spool)}
    assert sorted(by_id) == sorted(ids)
    for i, qid in enumerate(ids):
        assert without_trace(by_id[qid].message) == b"body %d\r\n" % i


def test_backpressure_while_committing(relay: RelayHarness) -> None:
    """
    While a reply is outstanding, pipelined input is held; past a bound the
    transport is paused, and resumed once the commit is done; every held
    command is then answered.
    """
    h = relay
    h.begin_data()
    noop = b"NOOP " + b"x" * 1000 + b"\r\n"
    assert h.send(MESSAGE + b".\r\n" + noop * 300) == []
    assert h.transport.producerState == "paused"
    replies = h.settle()
    assert h.transport.producerState == "producing"
    queued_id(replies[0])
    assert codes(replies[1:]) == [250] * 300


def test_commit_failure_is_transient(relay: RelayHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A storage failure while making the message durable is answered 451 4.3.0
    (retry later), not 5xx; nothing is left in new/ or tmp/, and the session
    goes on.
    """
    h = relay
    h.begin_data()
    assert h.send(MESSAGE + b".\r\n") == []

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fsync)
    expect(h, h.settle(), [(451, "4.3.0")])
    monkeypatch.undo()
    assert h.new_ids() == [] and h.leftovers() == []
    assert h.intake.queued_entries == []
    expect(h, h.chat(b"NOOP\r\n"), [(250, "2.0.0")])


def test_disk_error_while_receiving(relay: RelayHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A write error while the body streams to disk: the rest of the data is
    still read (never run as commands), the final dot gets 451 4.3.0, and
    no file is left in new/ or tmp/.
    """
    h = relay
    h.begin_data()

    def write(self: SpoolWriter, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpoolWriter, "write", write)
    assert h.send(b"Subject: x\r\n\r\nRSET\r\nQUIT\r\n") == []
    expect(h, h.chat(b".\r\n"), [(451, "4.3.0")])
    assert h.new_ids() == [] and h.leftovers() == []
    assert not h.closed


def test_cannot_create_queue_file(relay: RelayHarness, tmp_path: Path) -> None:
    """
    If the queue file cannot be created (it is created off the reactor
    thread, at the final dot for a small message), the dot is answered
    451 4.3.0, nothing is queued and the transaction ends.
    """
    h = relay
    h.chat(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\n")
    h.intake.spool.tmp_dir = tmp_path / "missing"
    expect(h, h.chat(b"DATA\r\n"), [354])
    expect(h, h.chat(b"Subject: x\r\n\r\nbody\r\n.\r\n"), [(451, "4.3.0")])
    assert h.new_ids() == [] and h.intake.queued_entries == []
    expect(h, h.chat(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])


# -- size and line limits --------------------------------------------------


def test_message_size_limit(tmp_path: Path) -> None:
    """
    A message of exactly limits.max_message_size octets is accepted; one
    octet more is refused 552 5.3.4 after the final dot (not before), with
    nothing in new/ or tmp/.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_message_size": 1000}})
    line = b"x" * 98 + b"\r\n"
    h.begin_data()
    assert h.send(line * 10) == []
    queued_id(h.chat(b".\r\n")[0])
    h.begin_data()
    assert h.send(line * 10) == []
    assert h.send(b"y\r\n" * 300) == []
    expect(h, h.chat(b".\r\n"), [(552, "5.3.4")])
    assert len(h.new_ids()) == 1 and h.leftovers() == []
    expect(h, h.chat(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])


def test_data_line_length_limit(relay: RelayHarness) -> None:
    """A line of limits.max_line_length octets (CRLF included) is accepted; one more is 554 5.6.0."""
    relay.begin_data()
    queued_id(relay.chat(b"x" * 998 + b"\r\n.\r\n")[0])
    relay.begin_data()
    expect(relay, relay.chat(b"x" * 999 + b"\r\n.\r\n"), [(554, "5.6.0")])
    assert len(relay.stored()) == 1 and relay.leftovers() == []


LONG_THEN_COMMANDS = [
    b"Subject: x\r\n", b"\r\n", b"a" * 2000 + b"\r\n", b"RSET\r\n",
    b"MAIL FROM:<evil@x>\r\n", b"RCPT TO:<b@localhost>\r\n", b"DATA\r\n", b"more\r\n",
]


@both(4)
@pytest.mark.parametrize("split", [False, True], ids=["one-read", "read-per-line"])
def test_long_data_line_keeps_data_mode(server: type[Harness], tmp_path: Path, split: bool) -> None:
    """
    An over-long line in DATA, followed by lines that look like commands: the
    commands are not run (no replies at all), the message is refused with
    554 5.6.0 after the final dot, nothing is stored, and the session is back
    in command mode with no transaction.
    """
    h = server.open(tmp_path)
    h.begin_data()
    pieces = LONG_THEN_COMMANDS if split else [b"".join(LONG_THEN_COMMANDS)]
    for piece in pieces:
        assert h.send(piece) == []
    expect(h, h.chat(b".\r\n"), [(554, "5.6.0")])
    assert h.stored() == [] and h.leftovers() == []
    expect(h, h.chat(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])


@both(4)
def test_long_command_line(server: type[Harness], tmp_path: Path) -> None:
    """
    A command line over limits.max_command_length is answered 500 5.5.2 and
    the session goes on, with the commands after it in the same read.
    """
    h = server.open(tmp_path)
    expect(h, h.send(b"HELO " + b"x" * 3000 + b"\r\nHELO client.test\r\n"), [(500, "5.5.2"), 250])
    assert not h.closed


@both(4)
def test_endless_line_one_reply(server: type[Harness], tmp_path: Path) -> None:
    """
    A megabyte without a line end, in many reads, is discarded as it comes
    and answered with one 500 once the line ends; the next command works.
    """
    h = server.open(tmp_path)
    for _ in range(16):
        assert h.send(b"z" * 65536) == []
    expect(h, h.send(b"\r\nHELO client.test\r\n"), [(500, "5.5.2"), 250])


def test_command_length_boundary(tmp_path: Path) -> None:
    """
    limits.max_command_length counts the whole line with its CRLF, as RFC 5321
    4.5.3.1.4 does for 512: a line of exactly that many octets is accepted, one
    octet more is 500 5.5.2.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_command_length": 512}})
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    expect(h, h.send(ok), [(250, "2.0.0")])
    too_long = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    expect(h, h.send(too_long), [(500, "5.5.2")])


# -- SMTP smuggling: bare CR and LF ------------------------------------------

SMUGGLED = {
    "lf-dot-lf": b"x\n.\nMAIL FROM:<evil@x>\nRCPT TO:<b@localhost>\nDATA\n",
    "cr-dot-cr": b"x\r.\rMAIL FROM:<evil@x>\r\n",
    "lf-dot-crlf": b"x\n.\r\nMAIL FROM:<evil@x>\r\n",
    "crlf-dot-lf": b"x\r\n.\nMAIL FROM:<evil@x>\r\n",
    "crlf-dot-cr": b"x\r\n.\rMAIL FROM:<evil@x>\r\n",
    "cr-dot-crlf": b"x\r.\r\nMAIL FROM:<evil@x>\r\n",
    "bare-lf-line": b"x\nplain\r\n",
}


@both(5)
@pytest.mark.parametrize("payload", list(SMUGGLED.values()), ids=list(SMUGGLED))
def test_bare_newlines_in_data(server: type[Harness], tmp_path: Path, payload: bytes) -> None:
    """
    A bare LF or CR in DATA never ends a line or the data: after the real
    CRLF.CRLF the message is refused with 550 5.5.2, nothing is stored, and
    the smuggled MAIL was never run (a RCPT then is 503).
    """
    h = server.open(tmp_path)
    h.begin_data()
    assert h.send(b"Subject: s\r\n\r\n" + payload) == []
    expect(h, h.chat(b"more\r\n.\r\n"), [(550, "5.5.2")])
    assert h.stored() == [] and h.leftovers() == []
    expect(h, h.chat(b"RCPT TO:<b@localhost>\r\n"), [(503, "5.5.1")])


def test_bare_lf_ends_command_lines(relay: RelayHarness) -> None:
    """Outside DATA, a command line may end in a bare LF (as with Postfix)."""
    assert codes(relay.chat(b"EHLO client.test\nMAIL FROM:<a@localhost>\nRCPT TO:<b@localhost>\n")) == [
        250, 250, 250,
    ]


# -- odd bytes in commands -----------------------------------------------------


@both(11)
def test_non_ascii_and_nul_in_commands(server: type[Harness], tmp_path: Path) -> None:
    """
    Command lines with non-ASCII or NUL bytes each get one 5xx reply, raise
    nothing, and the session goes on.
    """
    h = server.open(tmp_path)
    for line in [
        b"\xff\xfe", b"NO\xffOP", b"NOOP\x00", b"\x00", b"\x00MAIL FROM:<a@localhost>",
        b"RCPT\xa0TO:<b@localhost>", b"\xc3\xa9HLO x", b"MAIL FROM:<\xff@localhost>",
    ]:
        replies = h.send(line + b"\r\n")
        assert len(replies) == 1 and 500 <= replies[0][0] < 600, (line, replies)
    expect(h, h.send(b"HELO client.test\r\n"), [250])


# -- hops, errors, timeouts, lost connections --------------------------------


@pytest.mark.parametrize("count, accepted", [(2, True), (3, False)])
def test_hop_limit(tmp_path: Path, count: int, accepted: bool) -> None:
    """
    With limits.max_hops = 3, a message already carrying 3 Received: fields
    (4 with ours) is refused 554 5.4.6 with nothing stored; with 2 it is
    accepted and its hop count is 3.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_hops": 3}})
    h.begin_data()
    headers = b"".join(b"Received: from h%d by h%d; date\r\n" % (i, i + 1) for i in range(count))
    replies = h.chat(headers + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
    if accepted:
        queued_id(replies[0])
        [m] = spooled(h.intake.spool)
        assert m.envelope.hops == 3
    else:
        expect(h, replies, [(554, "5.4.6")])
        assert h.stored() == [] and h.leftovers() == []


def test_received_in_body_not_counted(tmp_path: Path) -> None:
    """Received: lines after the header section do not count as hops."""
    h = RelayHarness.open(tmp_path, {"limits": {"max_hops": 3}})
    h.begin_data()
    queued_id(h.chat(b"Subject: x\r\n\r\n" + b"Received: quoted\r\n" * 5 + b".\r\n")[0])


def test_too_many_errors(tmp_path: Path) -> None:
    """After limits.max_errors error replies the server says 421 4.7.0 and closes."""
    h = RelayHarness.open(tmp_path, {"limits": {"max_errors": 3}})
    replies = h.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    expect(h, replies, [(502, "5.5.2"), (502, "5.5.2"), (502, "5.5.2"), (421, "4.7.0")])
    assert h.closed
    assert h.send(b"NOOP\r\n") == []


def test_4xx_errors_count(tmp_path: Path) -> None:
    """
    As docs/config.md says, 4xx replies count toward limits.max_errors too:
    a client going on past the recipient limit (452 4.5.3) beyond
    limits.recipient_overshoot_limit more recipients is cut off.
    """
    h = RelayHarness.open(tmp_path, {"limits": {
        "max_errors": 3, "max_recipients": 100, "recipient_overshoot_limit": 2,
    }})
    h.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    ok = h.send(b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(100)))
    assert set(codes(ok)) == {250}
    replies = h.send(b"RCPT TO:<x@localhost>\r\n" * 5)
    assert codes(replies) == [452, 452, 452, 452, 452, 421]
    assert h.closed


def test_recipient_overshoot_is_not_an_error(tmp_path: Path) -> None:
    """
    Like Postfix (smtpd_recipient_overshoot_limit), up to
    limits.recipient_overshoot_limit recipients past max_recipients get 452
    4.5.3 without counting toward max_errors: 150 excess recipients with
    max_errors 20 do not end the session, and the message goes to the
    accepted 100. The count starts again with each transaction.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"max_errors": 20, "max_recipients": 100}})
    h.chat(b"EHLO c\r\n")
    for _ in range(2):
        h.chat(b"MAIL FROM:<a@b.test>\r\n")
        replies = h.chat(b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(250)))
        assert codes(replies) == [250] * 100 + [452] * 150
        assert all(text.startswith("4.5.3 ") for _, text in replies[100:])
        assert not h.closed
        assert codes(h.chat(b"DATA\r\n")) == [354]
        queued_id(h.chat(MESSAGE + b".\r\n")[0])
    assert [len(rcpts) for rcpts, _ in h.stored()] == [100, 100]


def test_idle_timeout(tmp_path: Path) -> None:
    """
    A session silent for limits.idle_timeout gets 421 4.4.2 and is closed;
    every command restarts the timer.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"idle_timeout": 30}})
    assert h.advance(29) == []
    h.send(b"NOOP\r\n")
    assert h.advance(29) == []
    assert not h.closed
    expect(h, h.advance(2), [(421, "4.4.2")])
    assert h.closed


def test_trickled_command_does_not_reset_the_idle_timer(tmp_path: Path) -> None:
    """
    A client that sends a command one byte at a time, never ending it, is
    timed out idle_timeout after its last complete line (421 4.4.2): bytes
    without a line end do not restart the timer, so it cannot hold a
    session slot forever.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"idle_timeout": 30}})
    for byte in b"NOOPNOOPNOOPNOOPNOOP":
        assert h.send(bytes([byte])) == []
        assert h.advance(1.4) == []
    assert not h.closed
    expect(h, h.advance(2.5), [(421, "4.4.2")])
    assert h.closed


@both(14)
def test_data_timeout(server: type[Harness], tmp_path: Path) -> None:
    """
    Inside DATA the (longer) limits.data_timeout applies, not the idle one;
    when it expires mid-message the client gets 421, the connection is
    closed, nothing is stored and no partial file is left.
    """
    h = server.open(tmp_path, {"limits": {"idle_timeout": 30, "data_timeout": 120}})
    h.begin_data()
    assert h.send(b"Subject: half\r\n\r\nhalf a mess") == []
    assert h.advance(60) == []
    assert not h.closed
    expect(h, h.advance(61), [(421, "4.4.2")])
    assert h.closed
    assert h.settle() == []
    assert h.stored() == [] and h.leftovers() == []
    h.lose()
    assert h.stored() == [] and h.leftovers() == []


def test_idle_timeout_restored_after_data(tmp_path: Path) -> None:
    """After the message, the idle timeout applies again."""
    h = RelayHarness.open(tmp_path, {"limits": {"idle_timeout": 30, "data_timeout": 120}})
    h.begin_data()
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    expect(h, h.advance(31), [(421, "4.4.2")])


@pytest.mark.parametrize("cut_through", [False, True], ids=["commit", "cut-through"])
def test_no_timeout_while_server_busy(tmp_path: Path, cut_through: bool) -> None:
    """
    While the server is still making a message durable (or, with cut-through,
    relaying it) the client is waiting on us, not idle: no 421 is sent
    however long that takes, and the client gets its 250.
    """
    h = RelayHarness.open(tmp_path, {"limits": {"idle_timeout": 30}}, toml=CUT_THROUGH_ROUTE)
    relayed = fake_cut_through(h)
    h.begin_data(["x@partner.example" if cut_through else "b@localhost"])
    assert h.send(MESSAGE + b".\r\n") == []  # the commit is queued
    if cut_through:
        assert h.settle() == []  # durable, now relaying
    replies = h.advance(31)
    for d in relayed:
        d.callback((250, "2.0.0", "Ok: queued as X; relayed"))
    replies += h.settle()
    expect(h, replies, [(250, "2.0.0")])


CUT_THROUGH_ROUTE = """
[[route]]
domains = ["partner.example"]
action = "relay"
ack = "cut-through"
next_hops = ["tcp:192.0.2.1:25"]
"""


def fake_cut_through(h: RelayHarness) -> list[Deferred[tuple[int, str, str]]]:
    """Give the intake a cut-through delivery whose outcomes the test fires."""
    pending: list[Deferred[tuple[int, str, str]]] = []

    def cut_through(entry: Any) -> Deferred[tuple[int, str, str]]:
        d: Deferred[tuple[int, str, str]] = Deferred()
        pending.append(d)
        return d

    h.intake.cut_through = cut_through
    return pending


@pytest.mark.parametrize(
    "outcome",
    [(250, "2.0.0", "Ok: queued as X; relayed: 250 2.0.0 Ok"), (550, "5.1.1", "No such user (from hop)")],
    ids=["relayed", "refused"],
)
def test_cut_through_reply(tmp_path: Path, outcome: tuple[int, str, str]) -> None:
    """
    On a cut-through route the reply to the final dot waits for the relay
    attempt and is the one it gives; pipelined commands wait for it too.
    Local recipients are not cut through.
    """
    h = RelayHarness.open(tmp_path, toml=CUT_THROUGH_ROUTE)
    relayed = fake_cut_through(h)
    h.begin_data(["x@partner.example"])
    assert h.chat(MESSAGE + b".\r\nNOOP\r\n") == []
    assert len(relayed) == 1 and h.intake.queued_entries == []
    relayed[0].callback(outcome)
    expect(h, take_replies(h.transport), [(outcome[0], outcome[1]), (250, "2.0.0")])
    h.begin_data(["b@localhost"])
    queued_id(h.chat(MESSAGE + b".\r\n")[0])
    assert len(relayed) == 1 and len(h.intake.queued_entries) == 1


@both(14)
def test_ehlo_from_unix_socket(server: type[Harness], tmp_path: Path) -> None:
    """A client on a UNIX socket (no IP address) can EHLO and send a message."""
    h = server.open(tmp_path, peer=UNIXAddress(b"/run/relaynet.sock"))
    h.begin_data()
    expect(h, h.chat(MESSAGE + b".\r\n"), [(250, "2.0.0")])
    assert h.stored() == [(("b@localhost",), MESSAGE)]


def test_connection_lost_in_data(relay: RelayHarness) -> None:
    """
    A connection lost mid-DATA, after part of a large message was written
    out to tmp/, leaves nothing in new/ and nothing in tmp/.
    """
    relay.begin_data()
    relay.send(b"Subject: x\r\n\r\n" + (b"x" * 78 + b"\r\n") * (SpoolWriter.FLUSH_AT // 80 + 1) + b"part")
    assert relay.settle() == []
    assert len(relay.leftovers()) == 1
    relay.lose()
    assert relay.settle() == []
    assert relay.new_ids() == [] and relay.leftovers() == []


def test_connection_lost_during_commit(relay: RelayHarness) -> None:
    """
    A client that goes away after its final dot while the commit runs: the
    message was complete, so it is queued (the client will retry: a duplicate
    is better than a loss); no reply is written to the dead connection.
    """
    relay.begin_data()
    relay.send(MESSAGE + b".\r\n")
    relay.protocol.connectionLost(Failure(ConnectionDone()))
    assert relay.settle() == []
    assert len(relay.new_ids()) == 1 and relay.leftovers() == []


class FailingEventLog(EventLog):
    """An event log on a full disk."""

    def emit(self, event: str, **fields: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def _fail_event_log(h: RelayHarness) -> None:
    h.intake.events = FailingEventLog(None, "test")


def _fail_scheduler(h: RelayHarness) -> None:
    def queued(entry: Any) -> None:
        h.intake.queued_entries.append(entry)
        raise RuntimeError("scheduler bug")

    h.intake.queued = queued


@pytest.mark.parametrize("breakage", [_fail_event_log, _fail_scheduler], ids=["event-log", "scheduler"])
def test_one_reply_when_bookkeeping_fails(
    tmp_path: Path, breakage: Callable[[RelayHarness], None]
) -> None:
    """
    Once the message is durable, the final dot gets exactly one reply, the
    250 naming the queued file, even when writing the "received" event (the
    event log is diagnostics) or telling the scheduler fails afterwards.
    """
    h = RelayHarness.open(tmp_path)
    breakage(h)
    h.begin_data()
    replies = h.chat(MESSAGE + b".\r\n") + h.chat(b"NOOP\r\n")
    assert len(replies) == 2, replies
    assert h.new_ids() == [queued_id(replies[0])]
    assert replies[1] == (250, "2.0.0 Ok")


def test_received_event_is_written_before_the_250(tmp_path: Path) -> None:
    """
    The node's event log writes a reactor turn's lines at the end of the
    turn; the 250 after the final dot is sent before that, so the intake
    writes the pending lines first: a client holding its 250 finds the
    received event in events.jsonl (found by tests/test_security.py, which
    reads the file right after the reply).
    """
    h = RelayHarness.open(tmp_path)
    path = tmp_path / "events.jsonl"
    turn_end: list[Callable[[], None]] = []  # never run: the turn has not ended
    h.intake.events = EventLog(path, "test", later=turn_end.append)
    h.begin_data()
    replies = h.chat(MESSAGE + b".\r\n")
    assert [code for code, _ in replies] == [250]
    lines = path.read_text().splitlines()
    assert [line for line in lines if queued_id(replies[0]) in line and '"received"' in line]
    assert turn_end  # the end of the turn would have written it otherwise
    h.intake.events.close()


# -- draining -----------------------------------------------------------------


def test_drain_idle_session(relay: RelayHarness) -> None:
    """
    Draining closes an idle session at once with 421 4.3.2, refuses new
    sessions, and fires once the sessions are gone.
    """
    h = relay
    done = drain(h.intake, h.reactor, grace=10)
    expect(h, take_replies(h.transport), [(421, "4.3.2")])
    assert h.closed
    late_protocol, late = connect(h.intake)
    assert codes(take_replies(late)) == [421] and late.disconnecting
    fired: list[object] = []
    done.addCallback(fired.append)
    h.lose()
    h.advance(0.1)
    assert fired == []
    late_protocol.connectionLost(Failure(ConnectionDone()))
    h.advance(0.1)
    assert fired == [None]


def test_drain_lets_transaction_finish(relay: RelayHarness) -> None:
    """
    A session in DATA when draining starts may finish its message: it gets
    its 250, then 421 4.3.2, and pipelined commands after the dot are not run.
    """
    h = relay
    h.begin_data()
    drain(h.intake, h.reactor, grace=10)
    assert take_replies(h.transport) == []
    assert h.send(MESSAGE + b".\r\nMAIL FROM:<a@localhost>\r\n") == []
    replies = h.settle()
    expect(h, replies, [(250, "2.0.0"), (421, "4.3.2")])
    assert h.closed
    assert h.new_ids() == [queued_id(replies[0])]


def test_drain_deadline_drops_unfinished_message(relay: RelayHarness) -> None:
    """
    A message still arriving when the grace period ends is dropped: the
    client gets 421, the connection is aborted, nothing is in new/ or tmp/.
    """
    h = relay
    h.begin_data()
    h.send(b"Subject: x\r\n\r\npart")
    done = drain(h.intake, h.reactor, grace=10)
    fired: list[object] = []
    done.addCallback(fired.append)
    expect(h, h.advance(10.1), [(421, "4.3.2")])
    assert h.transport.disconnected and fired == [None]
    h.lose()
    assert h.new_ids() == [] and h.leftovers() == []


def test_drain_deadline_during_commit(relay: RelayHarness) -> None:
    """
    A message whose commit is still running when the grace period ends is
    either acknowledged with 250 or not queued at all: as drain promises,
    an unacknowledged message is never committed after the deadline.
    """
    h = relay
    h.begin_data()
    assert h.send(MESSAGE + b".\r\n") == []
    drain(h.intake, h.reactor, grace=10)
    replies = h.advance(10.1)
    if h.transport.disconnected:
        h.lose()  # aborted: what is written from now on never reaches the client
        h.settle()
    else:
        replies += h.settle()
    acked = [QUEUED.match(t).group(1) for c, t in replies if c == 250 and QUEUED.match(t)]
    assert h.new_ids() == acked
    assert [e.queue_id for e in h.intake.queued_entries] == acked


def test_drain_closes_after_rset(relay: RelayHarness) -> None:
    """
    A session in a transaction when draining starts is closed with 421 as
    soon as that transaction ends, also when it ends with RSET: no new
    transaction starts on a draining node.
    """
    h = relay
    h.chat(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")
    drain(h.intake, h.reactor, grace=10)
    assert take_replies(h.transport) == []
    expect(h, h.chat(b"RSET\r\nMAIL FROM:<a@localhost>\r\n"), [(250, "2.0.0"), (421, "4.3.2")])
    assert h.closed


# -- properties ------------------------------------------------------------

TRANSACTION = (
    b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
    b"Subject: fuzz\r\n\r\nbody\r\n.\r\n"
)
TOKENS = [
    b"EHLO client.test\r\n", b"HELO client.test\r\n", b"MAIL FROM:<a@localhost>\r\n",
    b"MAIL FROM:<a@localhost> SIZE=20\r\n", b"RCPT TO:<b@localhost>\r\n",
    b"RCPT TO:<x@elsewhere.example>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"VRFY x\r\n", b"HELP\r\n", b"Subject: fuzz\r\n", b"Received: x\r\n", b"\r\n", b".\r\n",
    b"\r\n.\r\n", b"..\r\n", b"\r", b"\n", b"\x00", b"\xff", b"\n.\n", b"y" * 1500, TRANSACTION,
]


@settings(
    max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    pieces=st.lists(
        st.one_of(st.sampled_from(TOKENS), st.just(TRANSACTION), st.binary(max_size=12)), max_size=30
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=80), max_size=40),
    settle_after=st.lists(st.booleans(), max_size=40),
    max_errors=st.sampled_from([3, 20, 10_000]),
)
def test_arbitrary_input(
    pieces: list[bytes], cuts: list[int], settle_after: list[bool], max_errors: int
) -> None:
    """
    Any byte stream, in any chunking, with the commit work run at any
    points: nothing raises, every reply is well formed (an enhanced code of
    its class), the session stays responsive (CRLF.CRLF then NOOP gets a final
    250) unless it was closed, and the files in new/ are exactly those named
    by "queued as" replies (and handed to the scheduler), with nothing left
    in tmp/.
    """
    data = b"".join(pieces)
    chunks = []
    for n in cuts:
        if not data:
            break
        chunks.append(data[:n])
        data = data[n:]
    if data:
        chunks.append(data)
    with tempfile.TemporaryDirectory() as tmp:
        h = RelayHarness.open(Path(tmp), {"limits": {"max_errors": max_errors}})
        replies = list(h.greeting)
        for i, chunk in enumerate(chunks):
            replies += h.send(chunk)
            if i < len(settle_after) and settle_after[i]:
                replies += h.settle()
        replies += h.settle()
        closed_before_probe = h.closed
        replies += h.chat(b"\r\n.\r\nNOOP\r\n")
        assert all(session_reply_ok(r) for r in replies), replies
        if not closed_before_probe and not h.closed:
            assert replies[-1] == (250, "2.0.0 Ok")
        ids = [QUEUED.match(t).group(1) for c, t in replies if c == 250 and QUEUED.match(t)]
        assert sorted(ids) == h.new_ids()
        assert [e.queue_id for e in h.intake.queued_entries] == ids
        assert h.leftovers() == []
        event(f"messages queued: {min(len(ids), 2)}{'+' if len(ids) > 2 else ''}")
        event(f"closed: {h.closed}")
        h.lose()


body_line = st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.one_of(body_line, st.sampled_from([b".", b"..", b". ", b""])), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=60),
)
def test_any_body_round_trips(lines: list[bytes], cuts: list[int]) -> None:
    """
    Any message of CRLF-ended lines (without NUL, which is refused), dot-stuffed
    by the client and cut into any reads, is stored exactly as the client
    meant it.
    """
    message = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    wire += b".\r\n"
    with tempfile.TemporaryDirectory() as tmp:
        h = RelayHarness.open(Path(tmp))
        h.begin_data()
        replies: list[Reply] = []
        for n in cuts:
            if not wire:
                break
            replies += h.send(wire[:n])
            wire = wire[n:]
        replies += h.chat(wire)
        assert len(replies) == 1
        queued_id(replies[0])
        assert h.stored() == [(("b@localhost",), message)]


def test_slow_disk_pauses_the_session(relay: RelayHarness) -> None:
    """
    A large message whose chunks are not written yet (the disk is behind):
    past 512 KiB outstanding the session stops reading from the socket, and
    resumes once the chunks are written; the message is then whole.
    """
    h = relay
    h.begin_data()
    line = b"y" * 78 + b"\r\n"
    block = line * (64 * 1024 // len(line))
    sent = b"Subject: big\r\n\r\n"
    h.send(sent)
    for _ in range(40):  # up to 2.5 MiB, none of it written by the pool yet
        if h.transport.producerState == "paused":
            break
        h.send(block)
        sent += block
    assert h.transport.producerState == "paused"
    assert len(sent) < 1024 * 1024
    h.settle()
    assert h.transport.producerState == "producing"
    expect(h, h.chat(b".\r\n"), [(250, "2.0.0")])
    assert h.stored() == [(("b@localhost",), sent)]


# -- improper pipelining (Postfix's smtpd_forbid_unauth_pipelining) ---------


STRICT = {"limits": {"forbid_unauth_pipelining": True}}


@pytest.mark.parametrize("first, after", [
    (b"EHLO client.test\r\n", b"MAIL FROM:<a@localhost>\r\n"),
    (b"HELO client.test\r\n", b"MAIL FROM:<a@localhost>\r\n"),
    (b"NOOP\r\n", b"MAIL FROM:<a@localhost>\r\n"),
    (b"VRFY b@localhost\r\n", b"NOOP\r\n"),
])
def test_input_after_a_last_command_is_refused(tmp_path: Path, first: bytes, after: bytes) -> None:
    """
    A client that has not authenticated and sends more after a command that
    must end a pipelined group (RFC 2920 3.1: EHLO, HELO, NOOP, VRFY) gets
    554 5.5.0 instead of that command's reply, and is disconnected, as with
    Postfix's smtpd_forbid_unauth_pipelining; nothing after it runs.
    """
    h = RelayHarness.open(tmp_path, STRICT)
    if not first.startswith((b"EHLO", b"HELO")):
        h.chat(b"EHLO client.test\r\n")
    replies = h.send(first + after)
    expect(h, replies, [(554, "5.5.0")])
    assert "synchronization" in replies[0][1]
    assert h.closed


def test_body_sent_before_354_is_refused(tmp_path: Path) -> None:
    """
    Message bytes sent with DATA, before the 354 (the SMTP-smuggling and
    spam-engine pattern): 554 5.5.0, no 354, the connection closed and
    nothing queued; the pipelined MAIL and RCPT before DATA were answered.
    """
    h = RelayHarness.open(tmp_path, STRICT)
    h.chat(b"EHLO client.test\r\n")
    replies = h.chat(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n" + MESSAGE + b".\r\n")
    expect(h, replies, [(250, "2.1.0"), (250, "2.1.5"), (554, "5.5.0")])
    assert h.closed
    assert h.stored() == [] and h.leftovers() == []


def test_proper_pipelining_is_accepted(tmp_path: Path) -> None:
    """
    What RFC 2920 allows stays allowed with the rule on: MAIL, RCPTs and DATA
    in one group (DATA last), the body after the 354, and the next
    transaction pipelined right after the final dot.
    """
    h = RelayHarness.open(tmp_path, STRICT)
    h.chat(b"EHLO client.test\r\n")
    replies = h.chat(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@localhost>\r\nDATA\r\n")
    assert codes(replies) == [250, 250, 250, 354]
    replies = h.chat(MESSAGE + b".\r\nMAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    assert codes(replies) == [250, 250, 250, 354]
    queued_id(replies[0])
    queued_id(h.chat(MESSAGE + b".\r\nQUIT\r\n")[0])
    assert len(h.stored()) == 2


def test_pipelining_rule_can_be_turned_off(tmp_path: Path) -> None:
    """With C{forbid_unauth_pipelining = false}, EHLO and MAIL in one read are both answered."""
    h = RelayHarness.open(tmp_path, {"limits": {"forbid_unauth_pipelining": False}})
    assert codes(h.chat(b"EHLO client.test\r\nMAIL FROM:<a@localhost>\r\n")) == [250, 250]
    assert not h.closed
