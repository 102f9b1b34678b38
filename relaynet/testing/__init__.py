# -*- test-case-name: tests.test_intake -*-
"""
Public test helpers: run the relay intake in memory, deterministically.

 - L{ManualThreadPool} stands in for L{twisted.python.threadpool.ThreadPool}
   under L{twisted.internet.threads.deferToThreadPool}: work is queued and run
   by the test, in the test's thread, when it says so.
 - L{ThreadlessReactor} is a L{MemoryReactorClock} whose C{callFromThread}
   calls at once (the "threads" of a L{ManualThreadPool} are the test's own).
 - L{make_config}, L{make_intake} and L{connect} build a node's intake over a
   real on-disk L{Spool} and one L{RelayESMTP} session over a
   L{StringTransport}; L{send}, L{take_replies} and L{take_lines} talk to it.
 - L{spooled} reads back what was committed to the spool's C{new/}.

Nothing here touches the global reactor, a socket or a real thread.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import tomllib
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

from attrs import define, evolve, field, frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaynet.config import Listener, NodeConfig, parse_config
from relaynet.events import EventLog
from relaynet.intake.server import Intake, RelayESMTP, RelayFactory
from relaynet.queue.spool import Envelope, QueueEntry, Spool, read_queue_file
from relaynet.testing.spool import MemorySpool

__all__ = [
    "EPOCH", "ManualThreadPool", "MemorySpool", "PumpedReactor", "RecordingIntake", "Reply", "SpooledMessage",
    "ThreadlessReactor", "connect", "make_config", "make_intake", "send",
    "replicate_queued", "spooled", "take_lines", "take_replies",
]

EPOCH = 1_750_000_000.0
"""Where the clock of L{make_intake}'s reactor starts (a fixed, realistic time)."""

Reply = tuple[int, str]
"""One SMTP reply: its code and its text (lines of a multi-line reply joined by C{\\n})."""

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\Z", re.DOTALL)


class ManualThreadPool:
    """
    A stand-in for L{twisted.python.threadpool.ThreadPool} that runs work only
    when the test asks, in the test's own thread.

    @ivar immediate: if C{True}, work runs as soon as it is submitted.
    @ivar started: L{start} was called and L{stop} was not, for tests that
        check the pool's lifecycle.
    @ivar ran: how many work items have been run so far.
    """

    def __init__(self, immediate: bool = False) -> None:
        """
        @param immediate: see L{ManualThreadPool.immediate}.
        """
        self.immediate = immediate
        self.started = False
        self.ran = 0
        self._queue: deque[tuple[Callable[[bool, Any], object] | None, Callable[[], Any]]] = deque()

    def start(self) -> None:
        """Nothing to start; records that the pool is started."""
        self.started = True

    def stop(self) -> None:
        """Nothing to stop; queued work stays queued."""
        self.started = False

    @property
    def pending(self) -> int:
        """The number of work items queued and not yet run."""
        return len(self._queue)

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        """
        Queue C{func(*args, **kw)}; once run, C{onResult} gets C{(True, result)}
        or C{(False, Failure)}, as from a real thread pool.
        """
        self._queue.append((onResult, lambda: func(*args, **kw)))
        if self.immediate:
            self.run_all()

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Queue C{func(*args, **kw)}, ignoring its result."""
        self.callInThreadWithCallback(None, func, *args, **kw)

    def run_one(self) -> bool:
        """
        Run the oldest queued work item and deliver its result.

        @return: C{False} if nothing was queued.
        """
        if not self._queue:
            return False
        on_result, work = self._queue.popleft()
        try:
            result = work()
            ok = True
        except BaseException:
            result = Failure()
            ok = False
        self.ran += 1
        if on_result is not None:
            on_result(ok, result)
        return True

    def run_all(self) -> int:
        """
        Run queued work in order, including work queued while running, until
        none is left.

        @return: how many items were run.
        """
        n = 0
        while self.run_one():
            n += 1
        return n


@implementer(IReactorFromThreads)
class ThreadlessReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} for code that hands work to a thread pool: with a
    L{ManualThreadPool} the "thread" is the caller's, so C{callFromThread}
    calls at once.
    """

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        """Call C{callable(*args, **kwargs)} now."""
        callable(*args, **kwargs)


class PumpedReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} for code that hands work to a real thread pool:
    C{callFromThread} from a worker thread queues the call, and the test's
    thread runs the queued calls with L{drain}. Real threads do the work
    (files really race), results are handled in one thread, and no global
    reactor runs.
    """

    def __init__(self) -> None:
        MemoryReactorClock.__init__(self)
        self._from_threads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = queue.Queue()
        self._owner = threading.get_ident()

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue the call for L{drain} (call at once from the test's own thread)."""
        if threading.get_ident() == self._owner:
            callable(*args, **kwargs)
        else:
            self._from_threads.put((callable, args, kwargs))

    def drain(self, *pools: ThreadPool, deadline: float = 10.0) -> int:
        """
        Run the calls the threads queue, until C{pools} are idle and nothing
        is queued.

        @return: how many calls were run.
        @raise AssertionError: the threads did not finish within C{deadline}
            seconds.
        """
        end = time.monotonic() + deadline
        ran = 0
        while time.monotonic() < end:
            try:
                f, args, kw = self._from_threads.get(timeout=0.005)
            except queue.Empty:
                busy = any(p.q.qsize() or p.working for p in pools)
                if not busy and self._from_threads.empty():
                    return ran
                continue
            f(*args, **kw)
            ran += 1
        raise AssertionError(f"worker threads did not finish within {deadline} s")

    def run_until(self, done: Callable[[], bool], deadline: float = 10.0) -> bool:
        """
        Turn the reactor (the timers due now, then the calls the threads
        queue) until C{done()} holds, for at most C{deadline} seconds, while
        threads may still be busy (L{drain} waits for them to be idle).

        @return: whether C{done()} holds.
        """
        end = time.monotonic() + deadline
        while not done() and time.monotonic() < end:
            self.advance(0)
            try:
                f, args, kw = self._from_threads.get(timeout=0.005)
            except queue.Empty:
                continue
            f(*args, **kw)
        return done()


@define
class RecordingIntake(Intake):
    """
    An L{Intake} that records every durable L{QueueEntry} it is told about.

    @ivar queued_entries: entries passed to C{queued}, in order.
    """

    queued_entries: list[QueueEntry] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.queued = self.queued_entries.append


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_config(
    tmp_path: Path,
    config_overrides: Mapping[str, Any] | None = None,
    toml: str | None = None,
) -> NodeConfig:
    """
    A node configuration for tests: node C{test}, hostname C{relay.test},
    spool under C{tmp_path}, local domain C{localhost} with a catch-all, and
    trusted network C{127.0.0.0/8}.

    @param toml: TOML text merged over those defaults (tables merge key by key).
    @param config_overrides: parsed-TOML data merged over the result, e.g.
        C{{"limits": {"max_hops": 3}}}.
    @raise relaynet.config.ConfigError: the result is not a valid configuration.
    """
    data: dict[str, Any] = {
        "node": {"name": "test", "hostname": "relay.test", "spool": str(tmp_path)},
        "local": {"domains": ["localhost"], "catch_all": True},
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
    }
    if toml is not None:
        data = _merge(data, tomllib.loads(toml))
    if config_overrides is not None:
        data = _merge(data, config_overrides)
    return parse_config(data, source="<test>", base=tmp_path)


def make_intake(
    tmp_path: Path,
    config_overrides: Mapping[str, Any] | None = None,
    toml: str | None = None,
) -> tuple[RecordingIntake, ThreadlessReactor, ManualThreadPool]:
    """
    Build an intake over a real spool on disk under C{tmp_path}.

    The reactor's clock starts at L{EPOCH} and is also the spool's and the
    intake's clock. Commits wait for the returned pool: nothing is durable
    (and no 250 is sent) until the test runs it.

    @param config_overrides: see L{make_config}.
    @param toml: see L{make_config}.
    @return: C{(intake, reactor, pool)}; C{intake.queued_entries} lists what
        was acknowledged.
    """
    config = make_config(tmp_path, config_overrides, toml)
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    pool = ManualThreadPool()
    # A ManualThreadPool is not a ThreadPool, but does what deferToThreadPool uses.
    spool = Spool(config.queue_dir, reactor, pool, clock=reactor.seconds)  # type: ignore[arg-type]
    spool.prepare()
    intake = RecordingIntake(
        config=config,
        spool=spool,
        events=EventLog(None, config.name, clock=reactor.seconds),
        reactor=reactor,
        now=reactor.seconds,
    )
    return intake, reactor, pool


def _address(peer: tuple[str, int] | IAddress) -> IAddress:
    if isinstance(peer, tuple):
        host, port = peer
        kind = IPv6Address if ":" in host else IPv4Address
        return kind("TCP", host, port)
    return peer


def connect(
    intake: Intake,
    listener: Listener | None = None,
    peer: tuple[str, int] | IAddress = ("127.0.0.1", 40000),
) -> tuple[RelayESMTP, StringTransport]:
    """
    Open one SMTP session on C{intake}, as a client at C{peer} would.

    @param listener: the listener it arrives on (default: the first configured).
    @param peer: C{(host, port)} (an IPv4 or IPv6 TCP address) or any address.
    @return: the connected protocol (the greeting is already written) and its
        transport.
    """
    if listener is None:
        listener = intake.config.listeners[0]
    address = _address(peer)
    protocol = RelayFactory(intake, listener).buildProtocol(address)
    transport = StringTransport(
        peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 2525)
    )
    protocol.makeConnection(transport)
    return protocol, transport


def take_lines(transport: StringTransport) -> list[bytes]:
    """
    Read and clear the complete lines written to C{transport} (without their
    CRLF). An incomplete last line stays in the transport.
    """
    data: bytes = transport.value()
    transport.clear()
    *lines, tail = data.split(b"\r\n")
    if tail:
        transport.write(tail)
    return lines


def take_replies(transport: StringTransport) -> list[Reply]:
    """
    Read and clear the complete replies written to C{transport}.

    @raise ValueError: a line is not C{NNN text} / C{NNN-text}, or the lines
        of a multi-line reply disagree on their code.
    """
    replies: list[Reply] = []
    code: int | None = None
    texts: list[str] = []
    unfinished: list[bytes] = []
    for line in take_lines(transport):
        m = _REPLY_LINE.match(line)
        if m is None:
            raise ValueError(f"not an SMTP reply line: {line!r}")
        this = int(m.group(1))
        if code is not None and this != code:
            raise ValueError(f"multi-line reply changes code: {line!r}")
        code = this
        texts.append(m.group(3).decode("utf-8", "replace"))
        unfinished.append(line)
        if m.group(2) == b" ":
            replies.append((code, "\n".join(texts)))
            code, texts, unfinished = None, [], []
    if unfinished:
        # An unfinished multi-line reply: keep it for the next read.
        rest = transport.value()
        transport.clear()
        transport.write(b"".join(line + b"\r\n" for line in unfinished) + rest)
    return replies


def send(protocol: RelayESMTP, transport: StringTransport, data: bytes) -> list[Reply]:
    """
    Deliver C{data} to C{protocol} as one read and return the replies written
    by then (read and cleared from C{transport}).
    """
    protocol.dataReceived(data)
    return take_replies(transport)


@frozen
class SpooledMessage:
    """
    A message committed to a spool's C{new/}.

    @ivar path: its queue file.
    @ivar envelope: its envelope, with size and hop count from the header record.
    @ivar message: the stored message, our C{Received:} header first.
    """

    path: Path
    envelope: Envelope
    message: bytes

    @property
    def queue_id(self) -> str:
        """The queue id, which is also the file name."""
        return self.envelope.queue_id


def spooled(spool: Spool) -> list[SpooledMessage]:
    """
    Read every queue file in C{spool}'s C{new/}, in queue id (arrival) order.

    @raise relaynet.queue.spool.CorruptQueueFile: a file there is not a queue file.
    """
    out = []
    for path in sorted(spool.new_dir.iterdir()):
        envelope, offset = read_queue_file(path)
        out.append(SpooledMessage(path, envelope, path.read_bytes()[offset:]))
    return out


def replicate_queued(
    queue_dir: Path, envelope: Envelope, data: Callable[[str], bytes], count: int, *, now: float,
    hops: int = 1, content: str | None = None, state: bytes | None = None, state_every: int = 1,
) -> int:
    """
    A big queue, fast, as a stopped node would leave it: one message
    committed through L{Spool} under C{queue_dir} (C{envelope} with a queue
    id of the spool's, C{data(queue_id)} its bytes), its queue file then
    copied under C{count} more of the spool's queue ids (the committed one
    removed), every C{state_every}th with C{state} as its state file.
    Nothing is fsynced.

    @return: the size of one queue file.
    """
    reactor = ThreadlessReactor()
    reactor.advance(now)
    spool = Spool(queue_dir, reactor, ManualThreadPool(immediate=True), clock=reactor.seconds)  # type: ignore[arg-type]
    spool.prepare()
    queue_id = spool.new_id()
    writer = spool.begin(evolve(envelope, queue_id=queue_id))
    writer.write(data(queue_id))
    done: list[Any] = []
    writer.commit(hops, content=content).addBoth(done.append)
    if not isinstance(done[0], QueueEntry):
        done[0].raiseException()
    template = Path(done[0].path).read_bytes()
    os.unlink(done[0].path)
    old = queue_id.encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(count):
        qid = spool.new_id()
        assert len(qid) == len(queue_id), (qid, queue_id)
        fd = os.open(spool.new_dir / qid, flags, 0o600)
        try:
            os.write(fd, template.replace(old, qid.encode()))
        finally:
            os.close(fd)
        if state is not None and state_every and i % state_every == 0:
            fd = os.open(queue_dir / "state" / qid, flags, 0o600)
            try:
                os.write(fd, state)
            finally:
                os.close(fd)
    return len(template)


# -- the client side: queued messages, a scripted next hop ------------------
#
# Helpers for testing L{relaynet.delivery.client}: a real queue file made from bytes,
# a fake SMTP server that answers by script, and a way to complete a
# connection that a L{MemoryReactor} recorded.

from twisted.internet.protocol import Protocol, connectionDone  # noqa: E402
from twisted.internet.testing import MemoryReactor  # noqa: E402

from relaynet.queue.spool import Recipient  # noqa: E402

__all__ += ["FakeMessage", "FakeSMTPServer", "accept_connection", "make_queue_entry"]


def make_queue_entry(
    directory: Path,
    message: bytes,
    sender: str = "sender@example.org",
    recipients: tuple[str | Recipient, ...] = ("rcpt@example.net",),
    params: Mapping[str, Any] | None = None,
) -> QueueEntry:
    """
    Commit C{message} to a real spool under C{directory}, as the intake would
    (without adding a C{Received:} field), and return its L{QueueEntry}.

    The commit runs at once: the spool uses an immediate L{ManualThreadPool}
    and a L{ThreadlessReactor}. Several entries may share one directory.

    @param message: the message bytes exactly as they are to be stored.
    @param recipients: addresses, or L{Recipient}s (for NOTIFY/ORCPT).
    @param params: the envelope's ESMTP MAIL parameters (C{size}, C{body},
        C{smtputf8}, C{ret}, C{envid}).
    @raise relaynet.queue.spool.SpoolError: the message could not be stored.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    pool = ManualThreadPool(immediate=True)
    # A ManualThreadPool is not a ThreadPool, but does what deferToThreadPool uses.
    spool = Spool(Path(directory), reactor, pool, clock=reactor.seconds)  # type: ignore[arg-type]
    spool.prepare()
    envelope = Envelope(
        queue_id=spool.new_id(),
        sender=sender,
        recipients=tuple(r if isinstance(r, Recipient) else Recipient(r, route="relay:0") for r in recipients),
        arrival=EPOCH,
        params=dict(params or {}),
        client={"ip": "127.0.0.1", "helo": "source.test", "protocol": "ESMTP"},
        node="source",
    )
    writer = spool.begin(envelope)
    writer.write(message)
    outcome: list[Any] = []
    writer.commit(hops=1).addBoth(outcome.append)
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, QueueEntry)
    return result


@define
class FakeMessage:
    """
    One message a L{FakeSMTPServer} received.

    @ivar mail: the C{MAIL} command line.
    @ivar rcpts: the accepted C{RCPT} command lines.
    @ivar data: the message, dot-unstuffed, CRLF line ends, without the
        terminating C{.<CRLF>}.
    """

    mail: bytes
    rcpts: list[bytes]
    data: bytes


DEFAULT_EXTENSIONS = (
    b"PIPELINING", b"SIZE 10240000", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"DSN", b"SMTPUTF8",
)
"""What a L{FakeSMTPServer} offers in its EHLO reply unless told otherwise."""


class FakeSMTPServer(Protocol):
    """
    A scripted SMTP next hop: it answers every command with a plausible
    default reply unless C{replies} says otherwise, and records what it got.

    C{replies} maps a key to a reply. A key is matched, case-insensitively,
    as a prefix of the command line (C{b"RCPT"}, C{b"RCPT TO:<bad@x>"}; the
    longest matching key wins); the key C{b"."} is the reply to the end of
    data. A reply is the reply's bytes without the final CRLF (lines of a
    multi-line reply joined by CRLF), C{None} to never answer, or a list of
    those used once each, in order (then the default applies again).

    @ivar reads: every read, as it arrived.
    @ivar commands: every command line, in order, without CRLF.
    @ivar messages: the messages received.
    @ivar lost: the connection is gone.
    """

    # iosim's FakeTransport or a StringTransport: a transport with the
    # disconnecting flag of Twisted's own transports, which no Twisted
    # interface declares.
    transport: Any

    def __init__(
        self,
        extensions: tuple[bytes, ...] = DEFAULT_EXTENSIONS,
        replies: Mapping[bytes, bytes | None | list[bytes | None]] | None = None,
        greeting: bytes | None = b"220 mx.test ESMTP fake",
        hostname: bytes = b"mx.test",
    ) -> None:
        """
        @param extensions: the EHLO keywords (with their parameters).
        @param replies: scripted replies (see above).
        @param greeting: the greeting; C{None} for none at all.
        """
        self.extensions = tuple(extensions)
        self.replies: dict[bytes, Any] = {
            k.upper(): list(v) if isinstance(v, list) else v for k, v in (replies or {}).items()
        }
        self.greeting = greeting
        self.hostname = hostname
        self.reads: list[bytes] = []
        self.commands: list[bytes] = []
        self.messages: list[FakeMessage] = []
        self.lost = False
        self._buf = b""
        self._data: list[bytes] | None = None
        self._mail: bytes | None = None
        self._rcpts: list[bytes] = []

    def connectionMade(self) -> None:
        if self.greeting is not None:
            self._send(self.greeting)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True

    def _send(self, reply: bytes) -> None:
        self.transport.write(reply + b"\r\n")

    def _scripted(self, key: bytes) -> tuple[bool, bytes | None]:
        upper = key.upper()
        for k in sorted(self.replies, key=len, reverse=True):
            if not upper.startswith(k) or (k == b"." and upper != b"."):
                continue
            value = self.replies[k]
            if isinstance(value, list):
                if not value:
                    continue
                return True, value.pop(0)
            return True, value
        return False, None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self._buf += data
        while not self.transport.disconnecting:
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 2 :]
            if self._data is not None:
                self._data_line(line)
            else:
                self._command(line)

    def _data_line(self, line: bytes) -> None:
        assert self._data is not None
        if line != b".":
            self._data.append(line[1:] if line.startswith(b".") else line)
            return
        data = b"".join(part + b"\r\n" for part in self._data)
        assert self._mail is not None
        self.messages.append(FakeMessage(self._mail, list(self._rcpts), data))
        self._data, self._mail, self._rcpts = None, None, []
        found, reply = self._scripted(b".")
        if not found:
            reply = b"250 2.0.0 Ok: queued as FAKE%d" % len(self.messages)
        if reply is not None:
            self._send(reply)

    def _command(self, line: bytes) -> None:
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        found, reply = self._scripted(line)
        if not found:
            reply = self._default(verb)
        if reply is None:
            return
        ok = reply[:1] == b"2"
        if verb == b"MAIL" and ok:
            self._mail, self._rcpts = line, []
        elif verb == b"RCPT" and ok:
            self._rcpts.append(line)
        elif verb == b"DATA" and reply[:3] == b"354":
            self._data = []
        elif verb in (b"RSET", b"EHLO", b"HELO"):
            self._mail, self._rcpts = None, []
        self._send(reply)
        if verb == b"QUIT":
            self.transport.loseConnection()

    def _default(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            lines = [self.hostname, *self.extensions]
            return b"\r\n".join(
                b"250%s%s" % (b" " if i == len(lines) - 1 else b"-", text) for i, text in enumerate(lines)
            )
        if verb == b"HELO":
            return b"250 " + self.hostname
        if verb == b"MAIL":
            return b"250 2.1.0 Ok"
        if verb == b"RCPT":
            return b"250 2.1.5 Ok" if self._mail is not None else b"503 5.5.1 Error: need MAIL command"
        if verb == b"DATA":
            if self._mail is None:
                return b"503 5.5.1 Error: need MAIL command"
            if not self._rcpts:
                return b"554 5.5.1 Error: no valid recipients"
            return b"354 End data with <CR><LF>.<CR><LF>"
        if verb in (b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok"
        if verb == b"QUIT":
            return b"221 2.0.0 Bye"
        if verb == b"STARTTLS":
            return b"220 2.0.0 Ready to start TLS"
        return b"502 5.5.2 Error: command not recognized"


def accept_connection(
    reactor: MemoryReactor,
    server: Any,
    index: int = -1,
    client_address: tuple[str, int] = ("192.0.2.1", 40000),
    server_address: tuple[str, int] = ("192.0.2.25", 25),
) -> tuple[Any, Any]:
    """
    Complete a connection that C{reactor.connectTCP} recorded, to C{server},
    over an in-memory L{twisted.test.iosim} pair.

    @param index: which of C{reactor.tcpClients} to complete.
    @param server: the server side's protocol, e.g. a L{FakeSMTPServer} or a
        L{RelayESMTP}.
    @return: the client's protocol (unwrapped from the endpoint's wrapper) and
        the L{twisted.test.iosim.IOPump} that moves bytes between the two (its
        clock is C{reactor}, when C{reactor} has one). Nothing is moved yet.
    """
    from twisted.test import iosim

    _host, _port, factory, _timeout, _bind = reactor.tcpClients[index]
    caddr = _address(client_address)
    saddr = _address(server_address)
    client = factory.buildProtocol(saddr)
    pump = iosim.connect(
        server, iosim.FakeTransport(server, True, saddr, caddr),
        client, iosim.FakeTransport(client, False, caddr, saddr),
        greet=False, clock=reactor if hasattr(reactor, "advance") else None,
    )
    # The endpoint's wrapper keeps the real protocol in a private attribute
    # (Twisted 26.10); tests want the protocol itself.
    return getattr(client, "_wrappedProtocol", client), pump
