"""
Tests for L{relaynet.smtp.netio.send_now} and for the outbound
L{relaynet.delivery.client.BodySender}.

C{send_now} is tested on Twisted's real TCP transport class over one end of
a kernel socket pair, with a L{MemoryReactor} for its reactor: the socket
takes what its buffer holds, and the test plays the reactor's part (reading
the other end, calling C{doWrite} when the transport is armed for writing).
No global reactor, no port, no waiting.
"""

from __future__ import annotations

import io
import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relaynet.delivery.client import BodySender
from relaynet.queue.spool import BoundedReader
from relaynet.smtp.netio import send_now


class SendNowTests(SynchronousTestCase):
    def setUp(self) -> None:
        ours, self.peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        self.reactor = MemoryReactor()
        self.transport = tcp.Server(
            ours, Protocol(), ("127.0.0.1", 40000), None, 1, self.reactor  # type: ignore[arg-type]
        )

    def queued(self) -> bool:
        """The transport holds bytes the socket has not taken."""
        return bool(self.transport._tempDataBuffer) or self.transport.offset < len(self.transport.dataBuffer)

    def read_peer(self) -> bytes:
        """Everything the other end can read now."""
        out = bytearray()
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                return bytes(out)
            if not data:
                return bytes(out)
            out += data

    def pump(self) -> bytes:
        """
        Play the reactor: read the other end, and let the transport write
        while it is armed for writing, until nothing is queued.

        @return: what the other end read.
        """
        received = bytearray(self.read_peer())
        for _ in range(100_000):
            if self.transport not in self.reactor.writers:
                break
            self.transport.doWrite()
            received += self.read_peer()
        else:
            self.fail("the transport never emptied its buffer")
        return bytes(received)

    def test_small_write_leaves_nothing_queued(self) -> None:
        """
        A reply-sized write goes straight to the socket: the transport queues
        nothing and is not armed for writing.
        """
        send_now(self.transport, b"250 x")
        self.assertFalse(self.queued())
        self.assertNotIn(self.transport, self.reactor.writers)
        self.assertEqual(self.read_peer(), b"250 x")

    def test_large_writes_keep_their_order(self) -> None:
        """
        What the socket does not take is queued in the transport (armed for
        writing), and later writes queue behind it: everything arrives, in
        order.
        """
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB, more than a socket buffer
        send_now(self.transport, big)
        self.assertTrue(self.queued())
        self.assertIn(self.transport, self.reactor.writers)
        send_now(self.transport, b"tail")
        self.assertEqual(self.pump(), big + b"tail")
        self.assertFalse(self.queued())

    def test_write_after_queued_bytes_waits(self) -> None:
        """A small write behind queued bytes is not sent ahead of them."""
        self.transport.write(b"first")
        send_now(self.transport, b"second")
        self.assertEqual(self.read_peer(), b"")
        self.assertEqual(self.pump(), b"firstsecond")

    def test_closing_connection_gets_a_plain_write(self) -> None:
        """A connection being closed is written to as usual: queued, then sent."""
        self.transport.loseConnection()
        send_now(self.transport, b"221 bye")
        self.assertEqual(self.read_peer(), b"")
        self.transport.doWrite()
        self.assertEqual(self.read_peer(), b"221 bye")

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


def reader(data: bytes, size: int | None = None) -> BoundedReader:
    """A stored message of C{size} recorded bytes (default: all of C{data})."""
    return BoundedReader(io.BytesIO(data), len(data) if size is None else size)


def test_small_body_and_marker_in_one_write() -> None:
    """A message below the chunk size goes out dot-stuffed, its end marker in the same write."""
    consumer = Consumer()
    done = BodySender(reader(b"Subject: s\r\n\r\n.dot\r\n"), consumer, lambda: None).start()
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"Subject: s\r\n\r\n..dot\r\n.\r\n"]
    assert done.called and consumer.producer is None


def test_chunks_are_pulled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A larger message is written one chunk per pull, progress reported each time."""
    monkeypatch.setattr(BodySender, "CHUNK", 4)
    consumer = Consumer()
    progress: list[int] = []
    done = BodySender(reader(b"ab\r\n.c\r\n"), consumer, lambda: progress.append(1)).start()
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"ab\r\n"] and not done.called
    consumer.producer.resumeProducing()
    assert consumer.writes == [b"ab\r\n", b"..c\r\n.\r\n"] and done.called
    assert len(progress) == 2


def test_truncated_queue_file_fails() -> None:
    """A queue file shorter than its recorded size fails the transfer; no end marker is sent."""
    consumer = Consumer()
    done = BodySender(reader(b"short\r\n", size=100), consumer, lambda: None).start()
    consumer.producer.resumeProducing()
    consumer.producer.resumeProducing()
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(OSError)
    assert b"".join(consumer.writes) == b"short\r\n"
