"""
Tests for L{relaynet.smtp.netio.send_now} over real loopback TCP connections, and
for the outbound L{relaynet.delivery.client.BodySender}.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from relaynet.smtp.netio import send_now
from relaynet.delivery.client import BodySender
from relaynet.queue.spool import BoundedReader


class Collector(Protocol):
    """Gathers what it receives; fires C{done} once C{expect} bytes arrived."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expect and not self.done.called:
            self.done.callback(bytes(self.received))


class SendNowTests(TestCase):
    @inlineCallbacks
    def connect(self, expect: int):  # type: ignore[no-untyped-def]
        """A loopback connection: (our transport, the peer's collector)."""
        collector = Collector(expect)
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: collector), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connected: Deferred[Protocol] = Deferred()

        class Sender(Protocol):
            def connectionMade(self) -> None:
                connected.callback(self)

        factory = ClientFactory.forProtocol(Sender)
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        sender = yield connected
        self.addCleanup(sender.transport.abortConnection)
        return sender.transport, collector

    @inlineCallbacks
    def test_small_write_leaves_nothing_queued(self):  # type: ignore[no-untyped-def]
        """A reply-sized write goes straight to the socket: the transport queues nothing."""
        transport, peer = yield self.connect(5)
        send_now(transport, b"250 x")
        self.assertEqual((transport._tempDataBuffer, transport.dataBuffer), ([], b""))
        self.assertEqual((yield peer.done), b"250 x")

    @inlineCallbacks
    def test_large_writes_keep_their_order(self):  # type: ignore[no-untyped-def]
        """
        What the socket does not take is queued in the transport, and later
        writes queue behind it: everything arrives, in order.
        """
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB, more than a socket buffer
        transport, peer = yield self.connect(len(big) + 4)
        send_now(transport, big)
        self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
        send_now(transport, b"tail")
        received = yield peer.done
        self.assertEqual(received, big + b"tail")

    def test_other_transports_get_a_plain_write(self) -> None:
        """Anything but a plain TCP connection is written to as usual."""
        t = StringTransport()
        send_now(t, b"abc")
        self.assertEqual(t.value(), b"abc")


class Consumer(StringTransport):
    """
    Records each write separately. (A real transport pulls a registered pull
    producer at once and after each drained write; the tests pull by hand.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def reader(tmp_path: Path, data: bytes, size: int | None = None) -> BoundedReader:
    path = tmp_path / "msg"
    path.write_bytes(data)
    return BoundedReader(open(path, "rb"), len(data) if size is None else size)


def test_small_body_and_marker_in_one_write(tmp_path: Path) -> None:
    """A message below the chunk size goes out dot-stuffed, its end marker in the same write."""
    consumer = Consumer()
    done = BodySender(reader(tmp_path, b"Subject: s\r\n\r\n.dot\r\n"), consumer, lambda: None).start()
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"Subject: s\r\n\r\n..dot\r\n.\r\n"]
    assert done.called and consumer.producer is None


def test_chunks_are_pulled(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A larger message is written one chunk per pull, progress reported each time."""
    monkeypatch.setattr(BodySender, "CHUNK", 4)
    consumer = Consumer()
    progress = []
    done = BodySender(reader(tmp_path, b"ab\r\n.c\r\n"), consumer, lambda: progress.append(1)).start()
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"ab\r\n"] and not done.called
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"ab\r\n", b"..c\r\n.\r\n"] and done.called
    assert len(progress) == 2


def test_truncated_queue_file_fails(tmp_path: Path) -> None:
    """A queue file shorter than its recorded size fails the transfer; no end marker is sent."""
    consumer = Consumer()
    done = BodySender(reader(tmp_path, b"short\r\n", size=100), consumer, lambda: None).start()
    consumer.producer.resumeProducing()
    consumer.producer.resumeProducing()
    failures = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(OSError)
    assert b"".join(consumer.writes) == b"short\r\n"
