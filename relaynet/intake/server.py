# -*- test-case-name: tests.test_intake -*-
"""
The server side: Twisted's ESMTP server, subclassed to be a correct relay intake.

L{RelayESMTP} keeps Twisted's command dispatch (C{do_*}/C{ext_*} through
C{lookupMethod}), reply writer, greeting and timeout machinery, and replaces
what C{twisted.mail.smtp} gets wrong (see C{shared/TWISTED-TRAPS.md}):

 - input is buffered by us, not by C{LineOnlyReceiver}: one command is handled
   at a time and the rest waits (and the transport is paused) while a reply is
   outstanding, so pipelining works with asynchronous steps (trap 2);
 - the DATA phase is a bulk byte scanner (L{DataScanner}): only CRLF.CRLF ends
   it, bare CR/LF and over-long lines are caught and the message refused after
   the final dot, never run as commands (traps 4, 5); the body is stored
   byte-exact, nothing inserted (trap 13);
 - one spool entry per transaction with every accepted recipient, streamed to
   disk (trap 1), acknowledged with 250 only once durable, and a storage failure
   is a 451, not a 550 (trap 3);
 - every reply carries an RFC 3463 enhanced status code, ESMTP parameters are
   parsed and enforced (SIZE, BODY, SMTPUTF8; unknown ones get 555), NOOP,
   VRFY, HELP exist, MAIL needs HELO/EHLO first (traps 8, 9, 10);
 - non-ASCII or NUL bytes in commands get a reply, not an exception (trap 11);
 - our own C{Received:} header (trap 12); separate idle and DATA timeouts,
   closing with 421, and no unguarded C{getPeer().host} (trap 14).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import re
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable

from attrs import define, field
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IHandshakeListener, IOpenSSLServerConnectionCreator, IPushProducer, ITLSTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from zope.interface import implementer

from relaynet.intake.auth import IRelayUser, may_send_as
from relaynet.config import Listener, NodeConfig
from relaynet.smtp.datastream import DataScanner
from relaynet.events import EventLog
from relaynet.smtp.netio import no_delay, send_now
from relaynet.delivery.routing import Route, RouteKind, RoutingTable
from relaynet.intake.policy import check_recipient, is_trusted
from relaynet.intake.sink import SinkAnswer, SinkRules
from relaynet.smtp.parse import CommandError, MailRequest, parse_mail, parse_rcpt
from relaynet.queue.spool import (
    CONTENT_PLACEHOLDER, DIGEST_LENGTH, DIGEST_PLACEHOLDER, Envelope, QueueEntry, Recipient, Spool, SpoolError,
    SpoolFull, SpoolWriter,
)
from relaynet.queue.suppression import Suppression, SuppressionList, suppression_settings
from relaynet.queue.window import PeerAnswer, TransferWindow
from relaynet.smtp.tls import connection_info

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer, IReactorTime

    class _SessionTransport(ITLSTransport, IConsumer, IPushProducer):
        """
        What a session's transport is (TCP, TLS over TCP, or a test's): one
        that takes our replies as a consumer and can pause the client's
        bytes. Twisted types a protocol's transport C{ITransport | None}.
        L{ITLSTransport.startTLS} is only called when the transport
        provides it (C{canStartTLS}).
        """

_VERB = re.compile(rb"[A-Za-z]{1,16}\Z")
_BDAT_ARGS = re.compile(rb"([0-9]{1,15})(?:[ \t]+(LAST))?", re.IGNORECASE)
_HELO_SAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_PAUSE_ABOVE = 256 * 1024
# Message bytes handed to the spool but not yet written out, above which the
# session stops reading: memory per session stays bounded when the disk is slow.
_DISK_BACKLOG = 512 * 1024
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Seconds a closing session may take (a TLS client answering our
# close_notify, a client reading our last reply) before it is cut off.
_CLOSE_GRACE = 5.0
# Commands that must end a pipelined group (RFC 2920 3.1; Postfix's
# SMTPD_CMD_FLAG_LAST): their outcome changes what the client may send next.
# STARTTLS is one too; it discards what follows it instead (RFC 3207 4.2).
_LAST_IN_GROUP = frozenset({b"HELO", b"EHLO", b"DATA", b"NOOP", b"VRFY"})

HELP_TEXT = (
    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
    "See RFC 5321; relaynet ESMTP relay",
)


@define
class Intake:
    """
    What every session of a node's listeners shares.

    @ivar queued: called with each L{QueueEntry} once it is durable.
    @ivar window: the transfers accepted from relaynet upstreams (C{XTXN}
        is offered while it is set and C{[queue].duplicate_window} is not 0).
    @ivar suppression: the suppression list: its recipients are refused at
        C{RCPT} (L{suppressed}) while C{[suppression] enabled}.
    @ivar peer_transfers: in a worker of a node with several, asks the other
        workers' windows for a transfer the upstream may have made before
        (C{XTXNAGAIN}): C{(origin, digest, recipients)} gives (a Deferred
        firing with) their L{PeerAnswer}: the queue id of the worker that
        accepted it for all of them, or the workers that could not tell;
        it never fails.
    """

    config: NodeConfig
    spool: Spool
    events: EventLog
    reactor: "IReactorTime"
    queued: Callable[[QueueEntry], object] = lambda entry: None
    cut_through: Callable[[QueueEntry], Deferred[tuple[int, str, str]]] | None = None
    now: Callable[[], float] = time.time
    tls: IOpenSSLServerConnectionCreator | None = None
    portal: Portal | None = None
    window: TransferWindow | None = None
    suppression: SuppressionList | None = None
    peer_transfers: Callable[[str, str, list[str]], Deferred[PeerAnswer]] | None = None
    sessions: set["RelayESMTP"] = field(factory=set)
    per_ip: dict[str, int] = field(factory=dict)
    auth_failures: dict[str, int] = field(factory=dict)
    accepting: bool = True
    _table: RoutingTable | None = field(default=None, init=False, repr=False)
    _sink: tuple[Any, SinkRules] | None = field(default=None, init=False, repr=False)

    def sink(self) -> SinkRules | None:
        """The test sink's rules (C{[sink]}), made again when the configuration changes; C{None}: a normal node."""
        rules = self.config.sink.rules
        if not rules:
            return None
        if self._sink is None or self._sink[0] is not rules:
            self._sink = (rules, SinkRules(rules))
        return self._sink[1]

    def routing(self) -> RoutingTable:
        """The routing table of the configuration in force (built once per configuration)."""
        if self._table is None or self._table.config is not self.config:
            self._table = RoutingTable(self.config)
        return self._table

    def suppressed(self, address: str) -> Suppression | None:
        """
        The suppression entry that refuses mail to C{address}, or C{None}
        (no list, C{[suppression] enabled = false}, not on it, expired). An
        in-memory lookup: any intake (SMTP, HTTP injection) may call it.
        """
        if self.suppression is None or not suppression_settings(self.config).enabled:
            return None
        return self.suppression.get(address)

    def transfers(self) -> TransferWindow | None:
        """
        The transfer window, if exactly-once between relaynet hops is on.
        While the node recovers its queue it is not yet L{complete
        <TransferWindow.complete>}.
        """
        if self.window is None or self.config.queue.duplicate_window <= 0:
            return None
        return self.window


@define
class Transaction:
    """One mail transaction: MAIL, its accepted RCPTs, then DATA."""

    mail: MailRequest
    recipients: list[Recipient] = field(factory=list)
    overshoot: int = 0


def ip_literal(ip: str) -> str:
    """C{[192.0.2.1]} or C{[IPv6:2001:db8::1]}, as in a Received header."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


@implementer(IHandshakeListener, IPushProducer)
class RelayESMTP(smtp.ESMTP):
    """
    One SMTP session of the relay intake.

    @ivar tls_info: C{(version, cipher)} once TLS is up.
    @ivar auth_user: the authenticated user name, if any.
    """

    log = Logger()
    noisy = False
    transport: _SessionTransport

    def __init__(self, intake: Intake, listener: Listener) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=None)
        self.intake = intake
        self.listener = listener
        limits = intake.config.limits
        self.limits = limits
        self.host = intake.config.hostname
        # SMTP's timeout is seconds (Twisted infers int from its class
        # value, 600); callLater is TimeoutMixin's clock, meant to be
        # replaced, though Twisted types it as a method.
        self.timeout = limits.idle_timeout  # type: ignore[assignment]
        self.callLater = intake.reactor.callLater  # type: ignore[method-assign, assignment]
        self._inbuf = b""
        self._waiting = False
        # Replies held back until the transaction's own (see _process).
        self._hold_replies = False
        self._processing = False
        self._out: list[bytes] = []
        self._closing = False
        self._paused = False
        self._write_blocked = False
        self._disk_blocked = False
        self._discarding = False
        self._errors = 0
        self._helo_name: str | None = None
        self._esmtp = False
        self._txn: Transaction | None = None
        self._scanner: DataScanner | None = None
        self._writer: SpoolWriter | None = None
        self._data_txn: Transaction | None = None
        # BDAT (RFC 3030): octets of the current chunk still to read (None:
        # not in a chunk), whether it is the LAST, and the reply it gets
        # instead of being stored when the transaction cannot take it.
        self._chunk_left: int | None = None
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error: tuple[int, str, str] | None = None
        self._bdat = False
        self._bdat_failed: tuple[int, str, str] | None = None
        self._digest: Any = None  # hashlib's sha256 of the DATA of a named transfer
        self._shutdown_after_reply = False
        self._normalize = limits.bare_newlines == "normalize"
        self.client_ip = "unknown"
        self.client_port = 0
        self.tls_info: tuple[str, str] | None = None
        self.auth_user: str | None = None
        self._auth: tuple[str, str | None] | None = None
        # Keyed digests of the credentials that failed in this session: the
        # same user and password again (smtplib falls back from PLAIN to
        # LOGIN after a 535) is the same guess, counted once.
        self._failed_guesses: set[bytes] = set()
        self._guess_key: bytes | None = None  # made at the first AUTH (a getrandom call)
        self._counted = False
        self._abort_call: Any = None
        self._producing = False
        self.startedTLS = listener.mode == "submissions"

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = str(getattr(peer, "host", "unknown"))
        self.client_port = int(getattr(peer, "port", 0) or 0)
        intake = self.intake
        no_delay(self.transport)
        intake.sessions.add(self)
        per_ip = intake.per_ip.get(self.client_ip, 0) + 1
        intake.per_ip[self.client_ip] = per_ip
        self._counted = True
        if not intake.accepting:
            self.reply(421, "4.3.2", f"{intake.config.hostname} Service shutting down")
            self._close()
            return
        if len(intake.sessions) > self.limits.max_connections:
            self.reply(421, "4.7.0", f"{intake.config.hostname} Error: too many connections")
            self._rejected("CONNECT", 421, "4.7.0", reason="max_connections")
            self._close()
            return
        if per_ip > self.limits.max_connections_per_ip and not is_trusted(intake.config, self.client_ip):
            # Trusted networks are exempt, as Postfix exempts $mynetworks
            # (smtpd_client_connection_limit_exceptions).
            self.reply(421, "4.7.0", f"{intake.config.hostname} Error: too many connections from {self.client_ip}")
            self._rejected("CONNECT", 421, "4.7.0", reason="max_connections_per_ip")
            self._close()
            return
        smtp.ESMTP.connectionMade(self)
        self.canStartTLS = intake.tls is not None and ITLSTransport.providedBy(self.transport)
        # We produce replies; the transport tells us when the client does not
        # read them (its send buffer fills): then we stop reading commands.
        self.transport.registerProducer(self, True)
        self._producing = True

    def pauseProducing(self) -> None:
        """The client is not reading our replies: stop taking its commands."""
        self._write_blocked = True
        self._flow()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._flow()
        self._process()

    def stopProducing(self) -> None:
        self._write_blocked = True

    def _flow(self) -> None:
        """
        Pause reading from the socket while commands pile up unprocessed (a
        reply of ours outstanding, or the client not reading its replies):
        there only the pile's size decides, as pausing the transport outright
        would also stall a TLS handshake under us. In DATA, also while the
        spool has more than L{_DISK_BACKLOG} of the message still to write.
        """
        want_pause = self._disk_blocked or (
            (self._write_blocked or self._waiting) and len(self._inbuf) > _PAUSE_ABOVE
        )
        if want_pause and not self._paused and not self._closing:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not want_pause and not self._closing:
            self._paused = False
            self.transport.resumeProducing()

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or implicit): note the version and cipher."""
        self.tls_info = connection_info(self.transport)

    def greeting(self) -> bytes:
        host: bytes = self.host  # SMTP.host, an unannotated property
        return host + b" ESMTP relaynet"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.intake.sessions.discard(self)
        if self._counted:
            self._counted = False
            left = self.intake.per_ip.get(self.client_ip, 1) - 1
            if left > 0:
                self.intake.per_ip[self.client_ip] = left
            else:
                self.intake.per_ip.pop(self.client_ip, None)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._scanner = None
        self._closing = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        smtp.ESMTP.connectionLost(self, reason)

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", f"{self.intake.config.hostname} Error: timeout exceeded")
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self.startedTLS and self.tls_info is None:
            # A TLS handshake that never finished: a clean close would wait
            # for it forever, holding the connection slot.
            self._closing = True
            self.setTimeout(None)
            self.transport.abortConnection()
            return
        self._close()

    def _close(self) -> None:
        self._send_replies()
        self._closing = True
        self._inbuf = b""
        self.setTimeout(None)
        # Twisted's TLS layer (TLSMemoryBIOProtocol.loseConnection) sends its
        # close_notify only once no producer is registered, then waits for
        # the client's; TCP waits until the client has read everything:
        # unregister, and cut off a client that does neither in time.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.intake.reactor.callLater(_CLOSE_GRACE, self.transport.abortConnection)

    @property
    def waiting(self) -> bool:
        """A reply of ours (commit, cut-through) is outstanding."""
        return self._waiting

    def abort(self) -> None:
        """Drop the session now: 421, discard any message being received."""
        self.reply(421, "4.3.2", f"{self.intake.config.hostname} Service shutting down")
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._scanner = None
        self._closing = True
        self.setTimeout(None)
        self.intake.sessions.discard(self)
        self.transport.abortConnection()

    @property
    def idle(self) -> bool:
        """No transaction, DATA or reply is in progress."""
        return self._txn is None and self._scanner is None and not self._waiting

    def shutdown(self) -> None:
        """
        The node is stopping: close now with 421 if idle, else right after the
        current transaction's reply.
        """
        if self._closing:
            return
        if self.idle:
            self.reply(421, "4.3.2", f"{self.intake.config.hostname} Service shutting down")
            self._close()
        else:
            self._shutdown_after_reply = True

    # -- replies ---------------------------------------------------------

    def reply(self, code: int, enhanced: str, text: str, error: bool = True) -> None:
        """
        Send one reply with its enhanced status code (RFC 2034/3463). Counts
        the client's errors (4xx and 5xx, but not our own local failures, 421
        and 451) and hangs up (421) after too many.

        @param error: C{False} for a 4xx/5xx reply that is not held against
            the client (a recipient within the overshoot limit).
        """
        if self._closing:
            return
        self.sendCode(code, f"{enhanced} {text}".encode("utf-8", "replace"))
        if error and code >= 400 and code not in (421, 451):
            self._errors += 1
            if self._errors >= self.limits.max_errors:
                self.sendCode(421, b"4.7.0 " + self.host + b" Error: too many errors")
                self._close()

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """
        Queue one reply, all its lines in one buffer. Replies made while
        input is being processed (a pipelined batch of commands) go out
        together at the end of the batch, in one send; others at once.
        """
        lines = message.splitlines() or [b""]
        prefix = b"%03d" % code
        out = b"".join([prefix + b"-" + line + b"\r\n" for line in lines[:-1]])
        self._out.append(out + prefix + b" " + lines[-1] + b"\r\n")
        if not self._processing:
            self._send_replies()

    def _send_replies(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            # The event log writes a turn's lines at its end; a reply sent
            # now (send_now) would leave before them. Events first: a client
            # that has its 250 finds the received event in events.jsonl.
            self.intake.events.flush()
            send_now(self.transport, data)

    # -- input -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if (self._scanner is not None and not self._bdat) or self._chunk_left is not None or b"\n" in data:
            # Between commands the idle timer runs per command line, not per
            # byte: a client trickling one byte a second into a command that
            # never ends is cut off after idle_timeout, and cannot hold a
            # session slot forever (Postfix's smtpd_per_record_deadline).
            self.resetTimeout()
        self._inbuf += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._inbuf and not self._waiting and not self._closing and not self._write_blocked:
                if self._chunk_left is not None:
                    take, self._inbuf = self._inbuf[: self._chunk_left], self._inbuf[self._chunk_left :]
                    self._chunk_left -= len(take)
                    self._chunk_received(take)
                    if self._chunk_left == 0:
                        self._chunk_done()
                    continue
                if self._scanner is not None and not self._bdat:
                    data, self._inbuf = self._inbuf, b""
                    self._data_received(data)
                    continue
                nl = self._inbuf.find(b"\n")
                if nl < 0:
                    if len(self._inbuf) >= self.limits.max_command_length:
                        self._discarding = True
                        self._inbuf = b""
                    break
                line, self._inbuf = self._inbuf[:nl], self._inbuf[nl + 1 :]
                if self._discarding or nl + 1 > self.limits.max_command_length:
                    self._discarding = False
                    self.reply(500, "5.5.2", "Error: command line too long")
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if self._auth is not None:
                    self._auth_response(line)
                else:
                    self._command(line)
                if self._shutdown_after_reply and self.idle:
                    self.shutdown()
        finally:
            self._processing = False
        if not self._hold_replies:
            self._send_replies()
        self._flow()

    def _command(self, line: bytes) -> None:
        parts = line.strip(b" \t").split(None, 1)
        if not parts:
            self.reply(500, "5.5.2", "Error: bad syntax")
            return
        verb = parts[0]
        arg = parts[1] if len(parts) == 2 else b""
        if not _VERB.match(verb):
            self.reply(502, "5.5.2", "Error: command not recognized")
            return
        if self._inbuf and verb.upper() in _LAST_IN_GROUP and self._forbid_pipelining():
            self._improper_pipelining(verb)
            return
        method = self.lookupMethod(verb) or self.do_UNKNOWN
        try:
            result = method(arg)
        except Exception:
            self.log.failure("Error handling {verb}", verb=verb.decode("ascii"))
            self.reply(451, "4.3.0", "Error: local error in processing")
            return
        # Most commands answer at once and return None: no isinstance check
        # then (Deferred is an ABC through Awaitable, so it is not cheap).
        if result is not None and isinstance(result, Deferred):
            self._wait_for(result)

    def _forbid_pipelining(self) -> bool:
        """Improper pipelining ends this session: it is on and the client has not authenticated."""
        return self.limits.forbid_unauth_pipelining and not self.authenticated

    def _improper_pipelining(self, verb: bytes) -> None:
        """
        The client sent more after a command that must be the last of a
        pipelined group (bytes after DATA before our 354, or after EHLO
        before its reply): as Postfix's smtpd_forbid_unauth_pipelining, the
        command is not run; 554 5.5.0 and close. Such a client does not wait
        for replies (a spam engine), or smuggles input (the first bytes of a
        body read as commands when DATA is refused).
        """
        self.log.info(
            "Improper command pipelining after {verb} from {client}: {input!r}",
            verb=verb.decode("ascii").upper(), client=self.client_ip, input=self._inbuf[:100],
        )
        self.reply(554, "5.5.0", "Error: SMTP protocol synchronization", error=False)
        self._rejected("PIPELINING", 554, "5.5.0", reason=f"input after {verb.decode('ascii').upper()}")
        self._inbuf = b""
        self._close()

    def _wait_for(self, d: Deferred[Any], hold_replies: bool = False) -> None:
        """
        Hold further input until C{d} fires (its callbacks send the reply). The
        idle timer is off meanwhile: the wait is ours, not the client's.

        @param hold_replies: the replies to the commands before it in this
            input (a pipelined MAIL and RCPT before C{BDAT LAST}) go with
            C{d}'s reply, in one write (RFC 2920 3.1: a server may buffer
            the replies to MAIL and RCPT and send them as a unit). Sent
            apart, they cost both ends a write, a wake-up and a read for
            replies the client cannot act on before the last one.
        """
        self._waiting = True
        self._hold_replies = hold_replies
        self.setTimeout(None)

        def resume(result: object) -> None:
            self._waiting = False
            self._hold_replies = False
            if not self._closing:
                self.setTimeout(self.limits.idle_timeout)
            if isinstance(result, Failure):
                self.log.failure("Unhandled error in a command", result)
                self.reply(451, "4.3.0", "Error: local error in processing")
            if self._shutdown_after_reply and self.idle:
                self.shutdown()
                return
            if not self._closing:
                self._process()

        d.addBoth(resume)

    # -- commands --------------------------------------------------------

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(502, "5.5.2", "Error: command not recognized")

    def _helo_arg(self, rest: bytes, verb: str) -> str | None:
        name = rest.strip().split(None, 1)[0] if rest.strip() else b""
        if not name:
            self.reply(501, "5.5.4", f"Syntax: {verb} hostname")
            return None
        return _HELO_SAFE.sub("?", name.decode("ascii", "replace"))[:255]

    def do_HELO(self, rest: bytes) -> None:
        name = self._helo_arg(rest, "HELO")
        if name is None:
            return
        self._end_bdat()
        self._helo_name, self._esmtp, self._txn = name, False, None
        self.sendCode(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        name = self._helo_arg(rest, "EHLO")
        if name is None:
            return
        self._end_bdat()
        self._helo_name, self._esmtp, self._txn = name, True, None
        lines = [self.host] + [k + (b" " + b" ".join(v) if v else b"") for k, v in self.extensions().items()]
        self.sendCode(250, b"\n".join(lines))

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.limits.max_message_size).encode()],
            b"ENHANCEDSTATUSCODES": None,
            b"8BITMIME": None,
            b"SMTPUTF8": None,
            b"DSN": None,
            b"CHUNKING": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self.intake.portal is not None and self.startedTLS and not self.authenticated:
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        if self.intake.transfers() is not None:
            # relaynet's own: the upstream names each transfer (MAIL ... XTXN=node/queue-id)
            # so that a retransmission is recognised (relaynet.queue.window);
            # AGAIN: it may say XTXNAGAIN when it may have made the transfer before.
            ext[b"XTXN"] = [b"AGAIN"]
        return ext

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS:
            self.reply(503, "5.5.1", "Error: TLS already active")
            return
        if not self.canStartTLS:
            self.reply(502, "5.5.1", "Error: command not implemented")
            return
        if rest.strip():
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        tls = self.intake.tls
        if tls is None:
            # A reload removed [tls] since this session began.
            self.reply(454, "4.7.0", "TLS not available due to temporary reason")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 4.2 and CVE-2011-0411: nothing sent before the handshake
        # counts, and the session starts over (chunks of a BDAT transaction too).
        self._end_bdat()
        self._inbuf = b""
        self._helo_name, self._esmtp, self._txn = None, False, None
        self._send_replies()
        self.transport.startTLS(tls)
        self.startedTLS = True

    def ext_AUTH(self, rest: bytes) -> Deferred[None] | None:
        if self.intake.portal is None:
            self.reply(503, "5.5.1", "Error: authentication not enabled")
            return None
        if not self.startedTLS:
            self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return None
        if self._helo_name is None or not self._esmtp:
            self.reply(503, "5.5.1", "Error: send EHLO first")
            return None
        if self.authenticated:
            self.reply(503, "5.5.1", "Error: already authenticated")
            return None
        if self._txn is not None:
            self.reply(503, "5.5.1", "Error: MAIL transaction in progress")
            return None
        parts = rest.split()
        mech = parts[0].upper() if parts else b""
        initial = parts[1] if len(parts) > 1 else None
        if mech == b"PLAIN":
            if initial is None:
                self._auth = ("PLAIN", None)
                self.sendCode(334, b"")
                return None
            return self._auth_plain(initial)
        if mech == b"LOGIN":
            if initial is None:
                self._auth = ("LOGIN", None)
                self.sendCode(334, b"VXNlcm5hbWU6")
                return None
            user = self._b64(initial)
            if user is None:
                return None
            self._auth = ("LOGIN", user)
            self.sendCode(334, b"UGFzc3dvcmQ6")
            return None
        self.reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        return None

    def _b64(self, data: bytes) -> str | None:
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            self._auth = None
            self.reply(501, "5.5.2", "Error: malformed authentication response")
            return None

    def _auth_response(self, line: bytes) -> None:
        assert self._auth is not None
        mech, user = self._auth
        if line.strip() == b"*":
            self._auth = None
            self.reply(501, "5.7.0", "Authentication aborted")
            return
        if mech == "PLAIN":
            self._auth = None
            d = self._auth_plain(line.strip())
        elif user is None:
            name = self._b64(line.strip())
            if name is not None:
                self._auth = ("LOGIN", name)
                self.sendCode(334, b"UGFzc3dvcmQ6")
            return
        else:
            self._auth = None
            password = self._b64(line.strip())
            d = None if password is None else self._login(user, password)
        if d is not None:
            self._wait_for(d)

    def _auth_plain(self, data: bytes) -> Deferred[None] | None:
        decoded = self._b64(data)
        if decoded is None:
            return None
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            self.reply(501, "5.5.2", "Error: malformed authentication response")
            return None
        authzid, user, password = parts
        if authzid and authzid != user:
            self.reply(535, "5.7.8", "Error: authentication failed")
            return None
        return self._login(user, password)

    def _login(self, user: str, password: str) -> Deferred[None] | None:
        portal = self.intake.portal
        if portal is None:
            # A reload turned AUTH off during this exchange.
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None
        creds = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        if self._guess_key is None:
            self._guess_key = os.urandom(16)
        guess = hmac.new(self._guess_key, creds.username + b"\0" + creds.password, hashlib.sha256).digest()
        d = portal.login(creds, None, IRelayUser)

        def ok(result: tuple[Any, str, Any]) -> None:
            self.authenticated = True
            self.auth_user = result[1]
            self.intake.auth_failures.pop(self.client_ip, None)
            self.reply(235, "2.7.0", "Authentication successful")

        def bad(failure: Failure) -> Deferred[None] | None:
            if not failure.check(UnauthorizedLogin):
                # Our fault (password file, thread pool...), not the client's:
                # a temporary failure that does not count against it.
                self.log.failure("Authentication error", failure)
                self.reply(454, "4.7.0", "Temporary authentication failure")
                return None
            # One failure per guess: a retry of credentials that already
            # failed in this session (another mechanism, same user and
            # password) tells the client nothing new and is not counted
            # again; every different password is.
            failures = self.intake.auth_failures.get(self.client_ip, 0)
            if guess not in self._failed_guesses or failures == 0:
                self._failed_guesses.add(guess)
                failures += 1
                self.intake.auth_failures[self.client_ip] = failures
            auth = self.intake.config.auth
            done: Deferred[None] = Deferred()

            self._rejected("AUTH", 535, "5.7.8")

            def answer() -> None:
                if failures >= auth.max_failures:
                    self.reply(421, "4.7.0", f"{self.intake.config.hostname} Error: too many failed authentications")
                    self._close()
                else:
                    self.reply(535, "5.7.8", "Error: authentication failed")
                done.callback(None)

            self.intake.reactor.callLater(auth.failure_delay * failures, answer)
            return done

        return d.addCallbacks(ok, bad)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_RSET(self, rest: bytes) -> None:
        self._end_bdat()
        self._txn = None
        self.reply(250, "2.0.0", "Ok")

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            self.reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self.reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, rest: bytes) -> None:
        self.sendCode(214, "\n".join(f"2.0.0 {t}" for t in HELP_TEXT).encode())

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def do_MAIL(self, rest: bytes) -> None:
        if self._helo_name is None:
            self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._txn is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if self.listener.mode in ("submission", "submissions") and not self.authenticated:
            self.reply(530, "5.7.0", "Authentication required")
            self._rejected("MAIL", 530, "5.7.0")
            return
        try:
            mail = parse_mail(
                rest, size_limit=self.limits.max_message_size, smtputf8_allowed=self._esmtp,
                transfer_allowed=self._esmtp and self.intake.transfers() is not None,
            )
            if not self._esmtp and (mail.size is not None or mail.body is not None):
                raise CommandError(555, "5.5.4", "ESMTP parameters need EHLO")
        except CommandError as e:
            self.reply(e.code, e.enhanced, e.text)
            if e.code == 552:
                self._rejected("MAIL", e.code, e.enhanced)
            return
        if self.auth_user is not None and not may_send_as(
            self.auth_user, str(mail.sender), self.intake.config.auth.senders
        ):
            self.reply(553, "5.7.1", f"<{mail.sender}>: Sender address rejected: not owned by user {self.auth_user}")
            self._rejected("MAIL", 553, "5.7.1", sender=str(mail.sender))
            return
        self._txn = Transaction(mail)
        self.reply(250, "2.1.0", "Ok")

    def do_RCPT(self, rest: bytes) -> Deferred[None] | None:
        txn = self._txn
        if txn is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return None
        try:
            req = parse_rcpt(rest, smtputf8=txn.mail.smtputf8)
        except CommandError as e:
            self.reply(e.code, e.enhanced, e.text)
            return None
        if len(txn.recipients) >= self.limits.max_recipients:
            # RFC 5321 4.5.3.1.10: the client sends the rest later. As
            # Postfix (smtpd_recipient_overshoot_limit), the excess counts
            # toward max_errors only beyond the overshoot limit, so the
            # transaction and its accepted recipients are not lost.
            txn.overshoot += 1
            self.reply(
                452, "4.5.3", "Error: too many recipients",
                error=txn.overshoot > self.limits.recipient_overshoot_limit,
            )
            return None
        box = req.recipient
        verdict = check_recipient(
            self.intake.config, box.local, box.domain, self.client_ip, self.authenticated,
            table=self.intake.routing(),
        )
        if not verdict.accepted:
            self.reply(verdict.code, verdict.enhanced, verdict.text)
            self._rejected("RCPT", verdict.code, verdict.enhanced, recipient=str(box))
            return None
        address = str(box)
        if not box.domain and self.intake.config.local.domains:
            address = f"{box.local}@{self.intake.config.local.domains[0]}"
        entry = self.intake.suppressed(address)
        if entry is not None:
            self._refuse_suppressed(txn, address, entry)
            return None
        recipient = Recipient(address=address, route=verdict.route.name if verdict.route else "local",
                              notify=req.notify, orcpt=req.orcpt)
        sink = self.intake.sink()
        if sink is not None:
            return self._sink_answer(txn, recipient, sink.decide(address))
        self._accept_recipient(txn, recipient)
        return None

    def _accept_recipient(self, txn: Transaction, recipient: Recipient) -> None:
        if all(r.address != recipient.address for r in txn.recipients):
            txn.recipients.append(recipient)
        self.reply(250, "2.1.5", "Ok")

    def _sink_answer(self, txn: Transaction, recipient: Recipient, answer: SinkAnswer) -> Deferred[None] | None:
        """
        A test sink's answer to this RCPT (C{[sink]}): accept, refuse, or a
        421 that ends the session, after the rule's delay (the session's
        next command waits for it, pipelined or not).
        """

        def answer_now() -> None:
            if answer.code is None:
                self._accept_recipient(txn, recipient)
                return
            self.reply(answer.code, answer.enhanced, answer.text)
            self._rejected("RCPT", answer.code, answer.enhanced, recipient=recipient.address, reason="sink rule")
            if answer.closes:
                self._close()

        if not answer.delay:
            answer_now()
            return None
        done: Deferred[None] = Deferred()

        def later() -> None:
            answer_now()
            done.callback(None)

        self.intake.reactor.callLater(answer.delay, later)
        return done

    def _refuse_suppressed(self, txn: Transaction, address: str, entry: Suppression) -> None:
        """
        C{550 5.1.1} for a recipient on the suppression list
        (L{Suppression.refusal}), and a C{suppressed} event.
        """
        self.reply(550, "5.1.1", entry.refusal(address))
        try:
            self.intake.events.emit(
                "suppressed", stage="RCPT", code=550, dsn="5.1.1", sender=str(txn.mail.sender),
                recipient=address, client=self.client_ip, helo=self._helo_name, status="suppressed",
                **entry.event_fields(),
            )
        except Exception:
            self.log.failure("Could not log a suppressed event")

    def do_DATA(self, rest: bytes) -> None:
        txn = self._txn
        if txn is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not txn.recipients:
            self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        if rest.strip():
            self.reply(501, "5.5.4", "Syntax: DATA")
            return
        if self._bdat:
            # RFC 3030 2: DATA and BDAT are not mixed in one transaction.
            self.reply(503, "5.5.1", "Error: DATA after BDAT in one transaction")
            return
        problem = self._begin_message(txn)
        if problem is not None:
            self._txn = None
            self.reply(*problem)
            return
        self.setTimeout(self.limits.data_timeout)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _begin_message(self, txn: Transaction) -> tuple[int, str, str] | None:
        """
        Start storing the message of C{txn} (DATA, or the first BDAT chunk):
        its envelope, our C{Received:} field, the scanner.

        @return: None, or the reply when the queue file cannot be made.
        """
        spool = self.intake.spool
        mail = txn.mail
        envelope = Envelope(
            queue_id=spool.new_id(),
            sender=str(mail.sender),
            recipients=tuple(txn.recipients),
            arrival=self.intake.now(),
            params={
                "size": mail.size, "body": mail.body, "smtputf8": mail.smtputf8,
                "ret": mail.ret, "envid": mail.envid,
                # Filled in at the final dot (SpoolWriter.commit), in place:
                # the transfer's digest, and whether the header section and
                # the message hold 8-bit octets (for SMTPUTF8 and 8BITMIME).
                "origin": mail.transfer,
                "digest": DIGEST_PLACEHOLDER if mail.transfer else None,
                "content": CONTENT_PLACEHOLDER,
            },
            client={
                "helo": self._helo_name, "ip": self.client_ip, "port": self.client_port,
                "protocol": self.protocol_name(mail.smtputf8), "listener": self.listener.endpoint,
                "tls": list(self.tls_info) if self.tls_info else None, "auth": self.auth_user,
            },
            node=self.intake.config.name,
        )
        try:
            writer = spool.begin(envelope)
            writer.write(self.received_header(envelope))
        except (SpoolError, OSError) as e:
            self.log.error("Cannot create queue file: {error}", error=str(e))
            return 451, "4.3.0", "Error: queue file write error"
        self._writer = writer
        self._data_txn = txn
        self._digest = hashlib.sha256() if mail.transfer else None
        self._scanner = DataScanner(
            max_line_length=self.limits.max_line_length, max_size=self.limits.max_message_size
        )
        return None

    def do_BDAT(self, rest: bytes) -> None:
        """
        C{BDAT size [LAST]} (RFC 3030): the next C{size} octets are a chunk
        of the message, as they are. Each chunk is read whatever happens (a
        refused one too, so its octets never run as commands); a chunk gets
        250 once read, the LAST one the transaction's reply, once durable.
        """
        m = _BDAT_ARGS.fullmatch(rest.strip())
        if m is None:
            # Without a size the octets that follow cannot be told from
            # commands: end the session rather than read a message as commands.
            self.reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
            self.reply(421, "4.7.0", f"{self.intake.config.hostname} Error: cannot find the end of the chunk")
            self._close()
            return
        size, last = int(m.group(1)), m.group(2) is not None
        txn = self._txn
        error: tuple[int, str, str] | None = None
        if not self._esmtp:
            error = (503, "5.5.1", "Error: send EHLO first")
        elif txn is None:
            error = (503, "5.5.1", "Error: need MAIL command")
        elif not txn.recipients:
            error = (554, "5.5.1", "Error: no valid recipients")
        elif self._bdat_failed is not None:
            error = self._bdat_failed
        elif not self._bdat:
            error = self._begin_message(txn)
            self._bdat = error is None
            if error is not None:
                self._bdat_failed = error
        self._chunk_left, self._chunk_size, self._chunk_last, self._chunk_error = size, size, last, error
        self.setTimeout(self.limits.data_timeout)
        if size == 0:
            self._chunk_done()

    def _chunk_received(self, data: bytes) -> None:
        """Octets of the current BDAT chunk: scanned and stored (or dropped, for a refused chunk)."""
        if self._chunk_error is not None or not data:
            return
        scanner = self._scanner
        assert scanner is not None
        self._store(scanner, scanner.feed_raw(data))
        if self._writer is not None and self._writer.pending > _DISK_BACKLOG:
            self._disk_blocked = True
            self._writer.drained = self._disk_drained

    def _chunk_done(self) -> None:
        """The current BDAT chunk is read: reply, and end the message after the LAST."""
        size, last, error = self._chunk_size, self._chunk_last, self._chunk_error
        self._chunk_left, self._chunk_error = None, None
        self._disk_blocked = False
        scanner = self._scanner
        if error is None and scanner is not None and not last and scanner.too_big:
            error = (552, "5.3.4", "Error: message file too big")
        if error is not None:
            self.reply(*error)
            self._rejected("BDAT", error[0], error[1], reason=error[2])
            if self._bdat:
                # The transaction has failed: its further chunks are refused too.
                self._bdat_failed = error
                if self._writer is not None:
                    self._writer.abort()
                    self._writer = None
            if last:
                self._end_bdat()
                self._txn = None
                if self._shutdown_after_reply:
                    self.shutdown()
                    return
            self.setTimeout(self.limits.idle_timeout)
            return
        if not last:
            self.setTimeout(self.limits.idle_timeout)
            self.reply(250, "2.0.0", f"{size} octets received", error=False)
            return
        assert scanner is not None
        self._store(scanner, scanner.feed_raw(b"", last=True))
        self._bdat = False
        self._end_of_message(scanner, "BDAT")

    def _end_bdat(self) -> None:
        """Forget a BDAT transaction (RSET, EHLO, its LAST chunk refused)."""
        if self._bdat and self._writer is not None:
            self._writer.abort()
        if self._bdat:
            self._writer, self._scanner, self._data_txn, self._digest = None, None, None, None
        self._bdat, self._bdat_failed = False, None

    def protocol_name(self, smtputf8: bool = False) -> str:
        """The C{with} protocol of RFC 3848 / RFC 6531 for the Received header."""
        base = ("UTF8SMTP" if smtputf8 else "ESMTP") if self._esmtp else "SMTP"
        suffix = ("S" if self.startedTLS else "") + ("A" if self.authenticated else "")
        if base == "SMTP" and not suffix:
            return "SMTP"
        if base == "SMTP":
            base = "ESMTP"
        return base + suffix

    def received_header(self, envelope: Envelope) -> bytes:
        """Our C{Received:} trace field (RFC 5321 4.4), folded, CRLF-ended."""
        rcpt = ""
        if len(envelope.recipients) == 1:
            rcpt = f"\r\n\tfor <{envelope.recipients[0].address}>"
        date = _received_date(envelope.arrival)
        tls = ""
        if self.tls_info:
            tls = f"\r\n\t(using {self.tls_info[0]} with cipher {self.tls_info[1]})"
        return (
            f"Received: from {self._helo_name} ({ip_literal(self.client_ip)})"
            f"{tls}\r\n"
            f"\tby {self.intake.config.hostname} (relaynet) with {envelope.client['protocol']}"
            f" id {envelope.queue_id}{rcpt}; {date}\r\n"
        ).encode("utf-8")

    # -- DATA ------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        body, rest = scanner.feed(data)
        writer = self._store(scanner, body)
        if rest is None:
            if writer is not None and writer.pending > _DISK_BACKLOG:
                # The disk is behind the network: stop reading until it catches up.
                self._disk_blocked = True
                writer.drained = self._disk_drained
            else:
                self._disk_blocked = False
            return
        self._disk_blocked = False
        self._inbuf = rest + self._inbuf
        self._end_of_message(scanner)

    def _store(self, scanner: DataScanner, body: bytes) -> SpoolWriter | None:
        """
        Hand message content to the spool (and the transfer digest); give up
        on storing once the message is sure to be refused.

        @return: the writer, or None once storing stopped.
        """
        writer = self._writer
        if body and self._normalize and (scanner.bare_lf or scanner.bare_cr):
            normalized = _BARE.sub(b"\r\n", body)
            scanner.size += len(normalized) - len(body)
            if scanner.size > scanner.max_size:
                scanner.too_big = True
            body = normalized
            scanner.bare_lf = scanner.bare_cr = False
        if writer is not None:
            if scanner.received_count + 1 > self.limits.max_hops or not scanner.ok:
                writer.abort()
                self._writer = writer = None
            elif body:
                if self._digest is not None:
                    self._digest.update(body)
                try:
                    writer.write(body)
                except (OSError, SpoolError) as e:
                    self.log.error("Queue file write failed: {error}", error=str(e))
                    writer.abort()
                    self._writer = writer = None
        return writer

    def _end_of_message(self, scanner: DataScanner, stage: str = "DATA") -> None:
        """The whole message is in (final dot, or BDAT LAST): refuse it, or make it durable."""
        writer = self._writer
        self._scanner = None
        self._writer = None
        txn, self._data_txn, self._txn = self._data_txn, None, None
        self.setTimeout(self.limits.idle_timeout)
        scanner.finish_headers()
        hops = scanner.received_count + 1
        refusal = self._refusal(scanner, hops)
        if refusal is not None or writer is None:
            if writer is not None:
                writer.abort()
            code, enhanced, text = refusal or (451, "4.3.0", "Error: queue file write error")
            self.reply(code, enhanced, text)
            self._rejected(stage, code, enhanced, reason=text)
            if self._shutdown_after_reply:
                self.shutdown()
            return
        assert txn is not None
        digest = None
        if self._digest is not None:
            digest = self._digest.hexdigest()[:DIGEST_LENGTH]
            self._digest = None
            if self._retransmission(txn, writer, digest, scanner.message_id, stage):
                return
        content = ("8" if scanner.eight_bit_headers else "7") + ("8" if scanner.eight_bit else "7")
        origin, ask = txn.mail.transfer, self.intake.peer_transfers
        if (digest is not None and origin is not None and txn.mail.again and ask is not None
                and self.intake.transfers() is not None):
            # Maybe made before, and accepted by another worker of this node.
            addresses = [r.address for r in txn.recipients]

            def decide(answer: PeerAnswer) -> Deferred[None] | None:
                if answer.queue_id is not None:
                    self._duplicate(txn, writer, answer.queue_id, scanner.message_id)
                    return None
                if answer.unsure:
                    workers = ", ".join(str(k) for k in answer.unsure)
                    self._undecided(txn, writer, stage, f"worker(s) {workers} of this node could not tell")
                    return None
                return self._commit(writer, hops, scanner.message_id, digest, content, chunked=stage == "BDAT")

            self._wait_for(ask(origin, digest, addresses).addCallback(decide), hold_replies=stage == "BDAT")
            return
        self._wait_for(
            self._commit(writer, hops, scanner.message_id, digest, content, chunked=stage == "BDAT"),
            hold_replies=stage == "BDAT",
        )

    def _disk_drained(self) -> None:
        self._disk_blocked = False
        self._flow()

    def _rejected(self, stage: str, code: int, enhanced: str, **fields: Any) -> None:
        """One C{reject} event per refused RCPT or message, for metrics and admins."""
        try:
            self.intake.events.emit(
                "reject", stage=stage, code=code, dsn=enhanced, client=self.client_ip,
                helo=self._helo_name, status="reject", **fields,
            )
        except Exception:
            self.log.failure("Could not log a reject event")

    def _refusal(self, scanner: DataScanner, hops: int) -> tuple[int, str, str] | None:
        if scanner.too_big:
            return 552, "5.3.4", "Error: message file too big"
        if scanner.bare_lf or scanner.bare_cr:
            return 550, "5.5.2", "Error: bare <CR> or <LF> received; lines must end with <CR><LF>"
        if scanner.long_line:
            return 554, "5.6.0", f"Error: line longer than {self.limits.max_line_length} octets"
        if scanner.nul:
            return 554, "5.6.0", "Error: message contains a NUL character"
        if hops > self.limits.max_hops:
            return 554, "5.4.6", f"Error: too many hops ({hops} Received headers)"
        return None

    def _retransmission(
        self, txn: Transaction, writer: SpoolWriter, digest: str, message_id: str | None, stage: str,
    ) -> bool:
        """
        Answer a transfer this node's window decides without queueing it
        (C{True}): one we already accepted, with the same bytes, for every
        one of these recipients, is acknowledged with the original queue id;
        one made again (C{XTXNAGAIN}) that the window does not hold while it
        is not complete waits (451). Anything else goes on (C{False}).
        """
        window = self.intake.transfers()
        origin = txn.mail.transfer
        if window is None or origin is None:
            return False
        found = window.match(origin, digest)
        if found.queue_id is not None and found.all(r.address for r in txn.recipients):
            self._duplicate(txn, writer, found.queue_id, message_id)
        elif txn.mail.again and not window.complete:
            # Made before, maybe: its first transfer may be in the part of
            # the queue not read yet. Queued again it could be a second copy.
            self._undecided(txn, writer, stage, "this node is still recovering its queue")
        else:
            return False
        if self._shutdown_after_reply:
            self.shutdown()
        return True

    def _undecided(self, txn: Transaction, writer: SpoolWriter, stage: str, why: str) -> None:
        """
        A transfer made again (C{XTXNAGAIN}) that may or may not have been
        accepted before: nothing is queued, and the upstream, which still
        holds the message, tries again later (451 4.3.0). Queueing it could
        make a second copy; refusing it for good would lose it.
        """
        writer.abort()
        text = f"Try again later: cannot tell yet whether transfer {txn.mail.transfer} was accepted before ({why})"
        self.reply(451, "4.3.0", text)
        self._rejected(stage, 451, "4.3.0", reason=text, origin=txn.mail.transfer)

    def _duplicate(self, txn: Transaction, writer: SpoolWriter, queue_id: str, message_id: str | None) -> None:
        """Acknowledge a transfer accepted before (as C{queue_id}, by this worker or another) without queueing it."""
        writer.abort()
        window = self.intake.window
        if window is not None:
            window.duplicates += 1
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        try:
            self.intake.events.emit(
                "duplicate", queue_id=queue_id, origin=txn.mail.transfer, message_id=message_id,
                sender=str(txn.mail.sender), recipients=[r.address for r in txn.recipients],
                client=self.client_ip, client_port=self.client_port, helo=self._helo_name,
            )
        except Exception:
            self.log.failure("Could not log the duplicate event of {queue_id}", queue_id=queue_id)

    def _commit(
        self, writer: SpoolWriter, hops: int, message_id: str | None, digest: str | None = None,
        content: str | None = None, chunked: bool = False,
    ) -> Deferred[None]:
        started = self.intake.reactor.seconds()
        d = maybeDeferred(writer.commit, hops, digest, content)

        def committed(entry: QueueEntry) -> Deferred[None] | None:
            # The message is durable: from here on nothing may turn into a
            # failure reply (the client would send it again).
            env = entry.envelope
            window = self.intake.window
            cut_through = self.intake.cut_through is not None and _wants_cut_through(self.intake.routing(), env)
            if window is not None and not cut_through:
                window.note_envelope(env)
            try:
                self.intake.events.emit(
                    "received", queue_id=entry.queue_id, message_id=message_id,
                    sender=env.sender, recipients=[r.address for r in env.recipients],
                    size=env.size, client=self.client_ip, client_port=self.client_port,
                    helo=self._helo_name, protocol=env.client.get("protocol"), hops=hops,
                    tls=" ".join(self.tls_info) if self.tls_info else None, auth=self.auth_user,
                    ack_delay=round(self.intake.reactor.seconds() - started, 6),
                    **({"chunking": True} if chunked else {}),
                )
            except Exception:
                self.log.failure("Could not log the received event of {queue_id}", queue_id=entry.queue_id)
            if cut_through:
                assert self.intake.cut_through is not None
                ok = (250, "2.0.0", f"Ok: queued as {entry.queue_id}")

                def fallback(failure: Failure) -> tuple[int, str, str]:
                    self.log.failure("Cut-through attempt failed", failure)
                    return ok

                def answer(r: tuple[int, str, str]) -> None:
                    if window is not None and 200 <= r[0] < 300:
                        # Only a transfer we acknowledge is one a retransmission
                        # may match (a refused one must be queued if sent again).
                        window.note_envelope(env)
                        if "relayed:" in r[2]:
                            # Relayed and removed already: remember it durably now.
                            window.retire(env).addErrback(
                                lambda f: self.log.failure("Transfer window journal", f))
                    self.reply(*r)

                return self.intake.cut_through(entry).addErrback(fallback).addCallback(answer)
            self.reply(250, "2.0.0", f"Ok: queued as {entry.queue_id}")
            try:
                self.intake.queued(entry)
            except Exception:
                self.log.failure("Could not schedule {queue_id}", queue_id=entry.queue_id)
            return None

        def failed(failure: Failure) -> None:
            self.log.failure("Queue commit failed", failure)
            if failure.check(SpoolFull):
                self.reply(452, "4.3.1", "Insufficient system storage", error=False)
                return
            self.reply(451, "4.3.0", "Error: queue file write error")

        return d.addCallbacks(committed, failed)


_DATES: dict[int, str] = {}


def _received_date(when: float) -> str:
    """
    C{formatdate(when, localtime=True)}, made once per second (it drops the
    fraction): the trace field's date costs a time zone lookup and a
    strftime, the same for every message of that second.
    """
    second = math.floor(when)
    date = _DATES.get(second)
    if date is None:
        date = formatdate(second, localtime=True)
        if len(_DATES) > 4:
            _DATES.clear()
        _DATES[second] = date
    return date


def _wants_cut_through(table: RoutingTable, env: Envelope) -> bool:
    """Every recipient is, by today's routing table, on a route with C{ack = "cut-through"}."""
    for r in env.recipients:
        route = table.route(r.address)
        if not isinstance(route, Route) or route.kind is RouteKind.LOCAL or route.ack != "cut-through":
            return False
    return True


class RelayFactory(smtp.SMTPFactory):
    """
    Builds L{RelayESMTP} sessions for one listener.
    """

    def __init__(self, intake: Intake, listener: Listener) -> None:
        smtp.SMTPFactory.__init__(self)
        self.intake = intake
        self.listener = listener
        self.domain = intake.config.hostname.encode("ascii", "replace")

    def buildProtocol(self, addr: Any) -> RelayESMTP:
        p = RelayESMTP(self.intake, self.listener)
        p.factory = self
        p.portal = self.portal
        return p


def drain(intake: Intake, reactor: "IReactorTime", grace: float = 10.0) -> Deferred[None]:
    """
    Stop intake: refuse new sessions, close idle ones with 421, let running
    transactions finish for up to C{grace} seconds, then close the rest with
    421. A session whose message is being committed (or cut through) at that
    moment is let finish, so that it gets its 250: an unacknowledged message is
    never committed after the deadline. Only if that takes another C{grace}
    seconds is it dropped too (the message may then be delivered and the
    client retry: a duplicate, never a loss).

    @return: a Deferred firing once every session is gone.
    """
    intake.accepting = False
    for s in list(intake.sessions):
        s.shutdown()
    if not intake.sessions:
        return succeed(None)
    done: Deferred[None] = Deferred()
    soft = reactor.seconds() + grace
    hard = soft + grace

    def check() -> None:
        if not intake.sessions:
            done.callback(None)
            return
        now = reactor.seconds()
        if now >= soft:
            for s in list(intake.sessions):
                if now >= hard or not s.waiting:
                    s.abort()
            if not intake.sessions:
                done.callback(None)
                return
        reactor.callLater(0.05, check)

    check()
    return done
