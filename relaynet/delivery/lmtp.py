# -*- test-case-name: tests.test_lmtp -*-
"""
LMTP delivery (RFC 2033): hand a message to a mailbox server (Dovecot,
Cyrus) over TCP or a UNIX socket, as Postfix's C{lmtp} client does.

An LMTP session is an ESMTP session with two differences that matter
here: it opens with C{LHLO}, and after the final dot the server sends
I{one reply per accepted recipient}, in the order of the RCPT commands
(RFC 2033 section 4.2), because it stores the message into each mailbox
separately. Each of those replies is that recipient's result: a quota
problem for one mailbox defers that recipient alone.

L{LMTPSession} is a small client of its own rather than a subclass of
C{twisted.mail.smtp.ESMTPClient}: the per-recipient replies after the dot
are the point, and Twisted's client has one reply per transaction there
(trap 19 of C{shared/TWISTED-TRAPS.md}); it reuses the relay client's body
sender (L{relaynet.delivery.client.BodySender}: dot-stuffing right across
chunks and on the first line, trap 16, from the stored CRLF message) and
its reply parser (L{relaynet.delivery.client.reply_status}).

 - PIPELINING (RFC 2033 requires servers to offer it): MAIL, every RCPT and
   DATA go out in one write; without it, one command per reply.
 - Every step has a timeout, from C{[outbound]}: the greeting and LHLO
   C{helo_timeout}, MAIL C{mail_timeout}, RCPT C{rcpt_timeout}, DATA
   C{data_timeout}, each block of the body C{data_block_timeout}, each
   reply after the dot C{data_done_timeout}; connecting
   C{connect_timeout}.
 - One connection per delivery attempt, closed with QUIT once every
   recipient has its reply; at most the route's C{concurrency} sessions per
   LMTP server at a time (L{LMTPAgent}).
 - Failures: a connection that cannot be made defers every recipient
   (C{4.4.1}); a timeout or a connection lost before a recipient's reply
   defers it (C{4.4.2}: whatever the server said before stands); a refused
   greeting or LHLO defers (it is about the session, not the recipients);
   a refused MAIL applies to every recipient (4xx deferred, 5xx bounced);
   RCPT and post-dot replies apply to their own recipient.

The results are L{DeliveryResult}s, one per recipient, never a failure;
L{relaynet.delivery.attempt} turns them into outcomes (2xx: C{delivered},
final delivery).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredSemaphore, TimeoutError as DeferredTimeout
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaynet.config import NodeConfig, Outbound, split_endpoint
from relaynet.delivery.downgrade import has_eight_bit, needs_smtputf8
from relaynet.delivery.client import BodySender, DeliveryResult, reply_status
from relaynet.config import hop_name
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.smtp.netio import no_delay, send_now

MAX_LINE = 4096
"""Longest reply line we read (RFC 5321 4.5.3.1.5 says 512 octets)."""

MAX_REPLY_LINES = 200
"""Most lines of one multi-line reply."""


def lmtp_name(endpoint: str, hostname: str) -> str:
    """
    What events and DSNs call an LMTP server: C{host:port} for TCP (as a
    relay next hop), C{hostname[/path/to/socket]} for a UNIX socket (as
    Postfix's C{relay=} does; C{hostname} is this node's).
    """
    kind, args, kw = split_endpoint(endpoint)
    if kind == "unix":
        path = kw.get("path") or (args[0] if args else "?")
        return f"{hostname}[{path}]"
    return hop_name(endpoint)


def _addr(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


@define
class LMTPJob:
    """
    One message to some of its recipients over one LMTP session.

    @ivar results: the result of each recipient known so far, by address.
    """

    entry: QueueEntry
    recipients: list[Recipient]
    name: str
    results: dict[str, DeliveryResult] = field(factory=dict)
    deferred: Deferred[list[DeliveryResult]] = field(factory=Deferred)

    def result(self, address: str, code: int, enhanced: str, text: str) -> None:
        """Record C{address}'s result (the first one given stands)."""
        self.results.setdefault(address, DeliveryResult(address, code, enhanced, text, self.name))

    def reply(self, address: str, code: int, resp: bytes) -> None:
        """Record C{address}'s result from an LMTP reply."""
        enhanced, text = reply_status(code, resp)
        self.result(address, code, enhanced, text)

    def finish(self, code: int = 0, enhanced: str = "4.4.2", text: str = "no reply") -> None:
        """
        Fire with one result per recipient: those without one get this one
        (C{code} 0: no reply, transient).
        """
        if self.deferred.called:
            return
        for r in self.recipients:
            self.result(r.address, code, enhanced, text)
        self.deferred.callback([self.results[r.address] for r in self.recipients])


class LMTPSession(Protocol):
    """
    One LMTP session delivering one L{LMTPJob}, then QUIT.

    @ivar extensions: the LHLO keywords the server offered (upper case),
        with their parameters.
    """

    log = Logger()
    transport: Any

    def __init__(self, job: LMTPJob, clock: Any, timeouts: Outbound, lhlo_name: bytes) -> None:
        """
        @param clock: an C{IReactorTime} for the step timeouts.
        @param timeouts: the C{[outbound]} settings in force.
        @param lhlo_name: the name to send with C{LHLO}.
        """
        self.job = job
        self.clock = clock
        self.timeouts = timeouts
        self.lhlo_name = lhlo_name
        self.extensions: dict[bytes, bytes | None] = {}
        self._buffer = b""
        self._lines: list[bytes] = []
        self._state = "greeting"
        self._pending: deque[tuple[str, Recipient | None]] = deque()
        self._unsent: deque[tuple[bytes, float, str]] = deque()
        self._accepted: list[Recipient] = []
        self._mail: tuple[int, bytes] | None = None
        self._pipelined = False
        self._timer: IDelayedCall | None = None
        self._waiting_for = "the greeting"
        self._sender: BodySender | None = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._arm(self.timeouts.helo_timeout, "the greeting")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._state not in ("quit", "done"):
            stage = {
                "body": "while sending the message",
                "dot": "after the end of data",
            }.get(self._state, f"waiting for {self._waiting_for}")
            self.job.finish(0, "4.4.2", f"lost connection with {self.job.name} {stage}")
        self._state = "done"
        sender, self._sender = self._sender, None
        if sender is not None:
            # A transport stops its producer itself; a fake one may not.
            sender.stopProducing()

    def _end(self, code: int, enhanced: str, text: str) -> None:
        """A fault that ends the session: recipients without a result get this one."""
        self._disarm()
        self._state = "done"
        self.job.finish(code, enhanced, text)
        if self.transport is not None:
            self.transport.abortConnection()

    # -- timeouts --------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._waiting_for = what
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._state == "quit":
            self._state = "done"
            self.transport.abortConnection()
            return
        what = "sending the message" if self._state == "body" else f"waiting for {self._waiting_for}"
        self._end(0, "4.4.2", f"timeout talking to {self.job.name} ({what})")

    # -- replies ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._state != "done":
            nl = self._buffer.find(b"\r\n")
            if nl < 0:
                if len(self._buffer) > MAX_LINE:
                    self._end(0, "4.5.0", f"{self.job.name} sent an over-long reply line")
                break
            line, self._buffer = self._buffer[:nl], self._buffer[nl + 2:]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_LINE:
            self._end(0, "4.5.0", f"{self.job.name} sent an over-long reply line")
            return
        code, sep = line[:3], line[3:4]
        if not (code.isdigit() and sep in (b"", b" ", b"-")) or (
            self._lines and code != self._lines[0][:3]
        ):
            shown = line[:80].decode("utf-8", "replace")
            self._end(0, "4.5.0", f"{self.job.name} sent a garbled reply: {shown!r}")
            return
        self._lines.append(line)
        if sep == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._end(0, "4.5.0", f"{self.job.name} sent a reply of over {MAX_REPLY_LINES} lines")
            return
        lines, self._lines = self._lines, []
        self._reply(int(code), b"\n".join(x[4:] for x in lines))

    def _reply(self, code: int, resp: bytes) -> None:
        state = self._state
        if state == "greeting":
            if code == 220:
                self._send(b"LHLO " + self.lhlo_name, self.timeouts.helo_timeout, "the reply to LHLO")
                self._state = "lhlo"
            else:
                self._session_refused(code, resp, "greeting")
        elif state == "lhlo":
            if 200 <= code < 300:
                self._capabilities(resp)
                self._begin()
            else:
                self._session_refused(code, resp, "LHLO refused")
        elif state in ("transaction", "dot"):
            self._transaction_reply(code, resp)
        elif state == "body":
            self._end(0, "4.5.0", f"{self.job.name} replied while the message was being sent")
        elif state == "quit":
            self._state = "done"
            self._disarm()
            self.transport.loseConnection()

    def _session_refused(self, code: int, resp: bytes, what: str) -> None:
        """
        The greeting or LHLO was refused: about the session, not the
        recipients, so transient whatever its class (the next LMTP server is
        tried, or the attempt is retried).
        """
        enhanced, text = reply_status(code, resp)
        if not 400 <= code < 500:
            code, enhanced = 421, "4" + enhanced[1:]
        self._end(code, enhanced, f"{what}: {text}")

    def _capabilities(self, resp: bytes) -> None:
        self.extensions = {}
        for line in resp.split(b"\n")[1:]:
            parts = line.split(None, 1)
            if parts:
                self.extensions[parts[0].upper()] = parts[1] if len(parts) > 1 else None

    # -- the transaction -------------------------------------------------

    def _unsendable(self) -> tuple[str, str] | None:
        """
        Why the server cannot take this message, if it cannot: 8-bit content
        without 8BITMIME (RFC 6152; not converted: this is final delivery),
        a UTF-8 envelope or header section without SMTPUTF8 (RFC 6531),
        larger than its SIZE. A message that merely declared BODY=8BITMIME
        or SMTPUTF8 but does not need it goes as it is (as the relay client).
        """
        env = self.job.entry.envelope
        ext = self.extensions
        name = self.job.name
        if has_eight_bit(env) and b"8BITMIME" not in ext:
            return "5.6.3", f"{name} does not support 8BITMIME; 8-bit message not sent (RFC 6152)"
        if needs_smtputf8(env, [r.address for r in self.job.recipients]) and b"SMTPUTF8" not in ext:
            return "5.6.7", f"{name} does not support SMTPUTF8, and the message needs it (RFC 6531)"
        if b"SIZE" in ext:
            try:
                limit = int((ext[b"SIZE"] or b"0").split()[0])
            except (ValueError, IndexError):
                limit = 0
            if limit and env.size > limit:
                return "5.3.4", f"message size {env.size} exceeds the limit {limit} of {name}"
        return None

    def _begin(self) -> None:
        """Send MAIL, RCPT per recipient, DATA (in one write with PIPELINING)."""
        problem = self._unsendable()
        if problem is not None:
            self.job.finish(554, *problem)
            self._quit()
            return
        env = self.job.entry.envelope
        ext = self.extensions
        mail = b"MAIL FROM:" + _addr(env.sender)
        if b"SIZE" in ext:
            mail += b" SIZE=%d" % env.size
        if b"8BITMIME" in ext and (has_eight_bit(env) or env.params.get("body") == "8BITMIME"):
            mail += b" BODY=8BITMIME"
        if b"SMTPUTF8" in ext and env.params.get("smtputf8"):
            mail += b" SMTPUTF8"
        t = self.timeouts
        commands: list[tuple[bytes, float, str]] = [(mail, t.mail_timeout, "the reply to MAIL")]
        self._pending = deque([("MAIL", None)])
        for r in self.job.recipients:
            commands.append((b"RCPT TO:" + _addr(r.address), t.rcpt_timeout, "the reply to RCPT"))
            self._pending.append(("RCPT", r))
        commands.append((b"DATA", t.data_timeout, "the reply to DATA"))
        self._pending.append(("DATA", None))
        self._state = "transaction"
        self._pipelined = b"PIPELINING" in ext
        if self._pipelined:
            self._arm(t.mail_timeout, "the replies to MAIL, RCPT and DATA")
            send_now(self.transport, b"".join(c + b"\r\n" for c, _, _ in commands))
        else:
            self._unsent = deque(commands[1:])
            self._send(*commands[0])

    def _send(self, line: bytes, timeout: float, what: str) -> None:
        self._arm(timeout, what)
        send_now(self.transport, line + b"\r\n")

    def _send_next(self) -> None:
        """Without PIPELINING: the next command of the transaction."""
        if self._pipelined or not self._unsent:
            return
        self._send(*self._unsent.popleft())

    def _transaction_reply(self, code: int, resp: bytes) -> None:
        if not self._pending:
            self._end(0, "4.5.0", f"{self.job.name} sent a reply nobody asked for")
            return
        kind, rcpt = self._pending.popleft()
        ok = 200 <= code < 300
        if self._pipelined and self._pending:
            # The next reply is due within its own step's time.
            self._arm(self._step_timeout(self._pending[0][0]), f"the reply to {self._pending[0][0]}")
        if kind == "MAIL":
            self._mail = (code, resp)
            if ok:
                self._send_next()
                return
            # A refused sender: every recipient gets that reply.
            for r in self.job.recipients:
                self.job.reply(r.address, code, resp)
            if not self._pipelined:
                self._complete()
            return
        mail_ok = self._mail is not None and 200 <= self._mail[0] < 300
        if kind == "RCPT":
            assert rcpt is not None
            if mail_ok:
                if ok:
                    self._accepted.append(rcpt)
                else:
                    self.job.reply(rcpt.address, code, resp)
            if not self._pipelined:
                if self._unsent and self._unsent[0][0] == b"DATA" and not self._accepted:
                    self._complete()
                    return
                self._send_next()
            return
        if kind == "DATA":
            if code == 354 and mail_ok and self._accepted:
                self._send_body()
            elif code == 354:
                # DATA accepted though no recipient was (RFC 2033 4.2 says a
                # server answers 503): nothing is to be delivered, and an
                # empty message would get no reply to wait for. Drop it.
                self._end(0, "4.5.0", f"{self.job.name} accepted DATA without recipients")
            elif mail_ok and self._accepted:
                if 400 <= code < 600:
                    for r in self._accepted:
                        self.job.reply(r.address, code, resp)
                    self._complete()
                else:
                    self._end(0, "4.5.0", f"{self.job.name} answered DATA with {code}")
            else:
                self._complete()
            return
        if kind == "DOT":
            assert rcpt is not None
            if 200 <= code < 600:
                self.job.reply(rcpt.address, code, resp)
            else:
                self.job.result(rcpt.address, 0, "4.5.0", f"{self.job.name} answered the data with {code}")
            if self._pending:
                self._arm(self.timeouts.data_done_timeout, "the reply to the end of data")
            else:
                self._complete()

    def _step_timeout(self, kind: str) -> float:
        t = self.timeouts
        return {"MAIL": t.mail_timeout, "RCPT": t.rcpt_timeout, "DATA": t.data_timeout}.get(
            kind, t.data_done_timeout
        )

    def _send_body(self) -> None:
        self._state = "body"
        self._arm(self.timeouts.data_block_timeout, "the server to read the message")
        try:
            f = self.job.entry.open_message()
        except OSError as e:
            self._end(0, "4.3.0", f"cannot read queue file: {e}")
            return

        def sent(_: object) -> None:
            f.close()
            self._sender = None
            if self._state != "body":
                return
            self._state = "dot"
            # One reply per accepted recipient, in RCPT order (RFC 2033 4.2).
            self._pending = deque(("DOT", r) for r in self._accepted)
            self._arm(self.timeouts.data_done_timeout, "the reply to the end of data")

        def failed(reason: Failure) -> None:
            f.close()
            self._sender = None
            if self._state != "body":
                return
            if reason.check(ConnectionError):
                # The transport stopped the sender: the connection is gone.
                self._end(0, "4.4.2", f"lost connection with {self.job.name} while sending the message")
            else:
                self._end(0, "4.3.0", f"cannot read queue file: {reason.value}")

        def progress() -> None:
            self._arm(self.timeouts.data_block_timeout, "the server to read the message")

        self._sender = BodySender(f, self.transport, progress)
        self._sender.start().addCallbacks(sent, failed)

    def _complete(self) -> None:
        """Every recipient has its result: report, then QUIT."""
        self.job.finish()
        self._quit()

    def _quit(self) -> None:
        self._state = "quit"
        self._pending.clear()
        self._send(b"QUIT", self.timeouts.helo_timeout, "the reply to QUIT")


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, build: Callable[[], LMTPSession]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> LMTPSession:
        p = self._build()
        p.factory = self
        return p


class LMTPAgent:
    """
    Delivers to LMTP servers: one session per delivery attempt, at most
    C{concurrency} sessions per server at once (Postfix's
    C{lmtp_destination_concurrency_limit}; the rest wait their turn).
    """

    log = Logger()

    def __init__(
        self, reactor: Any, config: Callable[[], NodeConfig],
        endpoint: Callable[[str], Any] | None = None,
    ) -> None:
        """
        @param reactor: connects and times.
        @param config: the node configuration in force: C{[outbound]}
            timeouts, and the LHLO name (C{helo_name}, else the hostname).
        @param endpoint: makes a client endpoint from an endpoint string
            (default C{clientFromString} over C{reactor}; tests inject one).
        """
        self.reactor = reactor
        self._config = config
        self._endpoint = endpoint or (lambda s: clientFromString(reactor, s))
        self._limits: dict[tuple[str, int], DeferredSemaphore] = {}
        self.sessions = 0

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient], concurrency: int = 20,
    ) -> Deferred[list[DeliveryResult]]:
        """
        Deliver C{entry} to C{recipients} through the LMTP server at C{endpoint}.

        @return: fires with one L{DeliveryResult} per recipient, in order; never fails.
        """
        key = (endpoint, concurrency)
        sem = self._limits.get(key)
        if sem is None:
            sem = self._limits[key] = DeferredSemaphore(concurrency)
        return sem.run(self._session, endpoint, entry, list(recipients))

    def _session(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
    ) -> Deferred[list[DeliveryResult]]:
        config = self._config()
        timeouts = config.outbound
        helo = (timeouts.helo_name or config.hostname).encode("ascii", "replace")
        job = LMTPJob(entry, recipients, lmtp_name(endpoint, config.hostname))
        try:
            ep = self._endpoint(endpoint)
        except Exception as e:  # a bad endpoint string (config checks them)
            job.finish(0, "4.3.5", f"cannot use LMTP endpoint {endpoint!r}: {e}")
            return job.deferred
        self.sessions += 1
        d = ep.connect(_Factory(lambda: LMTPSession(job, self.reactor, timeouts, helo)))
        d.addTimeout(timeouts.connect_timeout, self.reactor)

        def failed(reason: Failure) -> None:
            if reason.check(DeferredTimeout, ConnectingCancelledError):
                text = f"connect to {job.name}: timed out"
            else:
                text = f"connect to {job.name}: {reason.getErrorMessage()}"
            job.finish(0, "4.4.1", text)

        d.addCallbacks(lambda _: None, failed)
        return job.deferred


__all__ = ["LMTPAgent", "LMTPJob", "LMTPSession", "lmtp_name"]
