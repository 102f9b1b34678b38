# -*- test-case-name: tests.test_outbound -*-
"""
The client side: Twisted's ESMTP client, subclassed into a relay's delivery
agent, and a connection pool per next hop.

L{RelayClient} keeps C{ESMTPClient}'s greeting/EHLO/STARTTLS/AUTH machinery and
reply parser, and replaces the mail transaction (traps 16-20 of
C{shared/TWISTED-TRAPS.md}):

 - MAIL carries SIZE, BODY=8BITMIME, SMTPUTF8 and DSN parameters when the peer
   offers them; RCPT carries NOTIFY/ORCPT; with PIPELINING, MAIL, every RCPT
   and DATA go out in one write;
 - a message that needs SMTPUTF8 (a non-ASCII envelope or header section,
   L{relaynet.delivery.downgrade.needs_smtputf8}) is never sent to a peer
   without it (5.6.7, RFC 6531); one that merely declared it goes there
   without the parameter (RFC 6531 3.4);
 - a message with 8-bit content goes to a peer without 8BITMIME converted to
   7-bit MIME in a worker thread (L{relaynet.delivery.downgrade.to_seven_bit},
   RFC 6152 3), or bounces (5.6.3) where it cannot be converted (8-bit
   header fields) or C{[outbound] eight_bit = "bounce"}; one over the peer's
   SIZE fails permanently (5.3.4);
 - on a route that signs (C{[dkim]}), the message is DKIM-signed in a
   worker thread just before it is sent, after any 7-bit conversion, so
   that what the peer gets is what was signed
   (L{relaynet.delivery.dkim.Signer}); a message whose From: domain has no
   key goes unsigned, with a C{dkim_unsigned} event;
 - to a peer offering CHUNKING the message goes in C{BDAT} chunks of up to
   L{RelayClient.BDAT_CHUNK} octets (RFC 3030), without dot-stuffing, one
   chunk in flight at a time (a message of one chunk pipelined with MAIL and
   RCPT when the peer offers PIPELINING: one round trip); otherwise with DATA, dot-stuffed correctly
   across read boundaries and on its first line (trap 16);
 - plaintext that arrived with the 220 to STARTTLS is discarded (trap 17);
 - every step has a timeout (RFC 5321 4.5.3.2), and a failure never triggers
   an immediate reconnect (trap 18);
 - each recipient gets its own result from its own RCPT reply or from the
   reply to the final dot (trap 19);
 - one connection carries many messages in turn (trap 20: connection reuse);
 - with a route's credentials, the client authenticates (RFC 4954: PLAIN,
   RFC 4616, if offered, else LOGIN) only inside TLS unless the route allows
   cleartext; a refused AUTH defers the mail and stops new connections to the
   hop for L{HopPool.AUTH_PENALTY} seconds (see L{HopPool}).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import warnings
from collections import deque
from typing import Any, Callable, Protocol

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectBindError, ConnectingCancelledError
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.interfaces import IHandshakeListener, IPullProducer, ITCPTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from relaynet.config import Outbound, hop_name, split_endpoint
from relaynet.delivery.dkim import Signed, Signer
from relaynet.delivery.dane import DaneVerificationError
from relaynet.delivery.egress import EgressPool
from relaynet.delivery.shaping import Destination, Shaper, ShapingSettings
from relaynet.delivery.tlspolicy import HopTLS, ReportContext
from relaynet.delivery.tlsrpt import STARTTLS_NOT_SUPPORTED, tls_failure_result, webpki_result
from relaynet.delivery.downgrade import ConversionError, has_eight_bit, needs_smtputf8, to_seven_bit
from relaynet.smtp.datastream import DotStuffer
from relaynet.smtp.netio import no_delay, send_now
from relaynet.smtp.parse import xtext_encode
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.smtp.tls import client_options, connection_info

#: How the diagnostic of a recipient deferred by a down next hop begins
#: (Postfix's words), followed by the failure that put the hop down.
SUSPENDED = "delivery temporarily suspended: "

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@frozen
class DeliveryResult:
    """
    The outcome of one recipient at one next hop.

    @ivar code: the SMTP reply code (C{0} for no reply: connection problems).
    @ivar enhanced: an RFC 3463 status.
    @ivar text: the reply text (or what went wrong).
    @ivar remote: the next hop, for DSNs and events.
    @ivar dsn_peer: the peer supports DSN (so it reports success itself).
    @ivar tls: the TLS version and cipher of the session, if any.
    @ivar auth_failed: the route's SMTP AUTH failed at this hop (or was not
        possible: no TLS, no AUTH, no usable mechanism), so the recipient was
        deferred without a mail transaction: something for an administrator.
    @ivar local: relaynet decided this itself before sending (the hop lacks
        SMTPUTF8 or 8BITMIME, or its SIZE is too small): the hop said
        nothing, so it is no DSN's Remote-MTA.
    @ivar named: the transaction named its transfer (relaynet's C{XTXN}):
        if the next hop accepted it, it remembers it and recognises it if
        it is sent again (L{relaynet.queue.core.Outcome.named}).
    """

    address: str
    code: int
    enhanced: str
    text: str
    remote: str
    dsn_peer: bool = False
    tls: str | None = None
    auth_failed: bool = False
    local: bool = False
    named: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def diagnostic(self) -> str:
        """The reply as a DSN Diagnostic-Code would show it."""
        if self.code and not self.local:
            return f"{self.code} {self.enhanced} {self.text}"
        return self.text


def reply_status(code: int, resp: bytes) -> tuple[str, str]:
    """
    Split a reply text into its enhanced code and text; invent a code from the
    reply class when the peer sent none.
    """
    first = resp.split(b"\n", 1)[0]
    m = _ENHANCED.match(first)
    text = b" ".join(resp.split(b"\n")).decode("utf-8", "replace")
    if m and m.group(1) == str(code // 100).encode():
        return m.group(0).strip().decode(), text[m.end():].strip() if m.end() <= len(text) else text
    cls = code // 100
    default = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(cls, "4.0.0")
    return default, text


@define
class Job:
    """One message to some of its recipients, waiting for a connection."""

    entry: QueueEntry
    recipients: list[Recipient]
    deferred: Deferred[list[DeliveryResult]] = field(factory=Deferred)

    def fail(self, code: int, enhanced: str, text: str, remote: str, auth_failed: bool = False,
             local: bool = False) -> None:
        if not self.deferred.called:
            self.deferred.callback([
                DeliveryResult(r.address, code, enhanced, text, remote, auth_failed=auth_failed, local=local)
                for r in self.recipients
            ])


@frozen
class _Plan:
    """
    How one message goes to the connected hop (decided from its EHLO reply).

    @ivar smtputf8: MAIL carries C{SMTPUTF8}.
    @ivar body8: MAIL carries C{BODY=8BITMIME}.
    @ivar convert: the 7-bit conversion is sent instead of the stored message.
    @ivar chunking: BDAT instead of DATA.
    @ivar sign: the message goes DKIM-signed (by the pool's signer).
    """

    smtputf8: bool
    body8: bool
    convert: bool
    chunking: bool
    sign: bool = False


class _Reader(Protocol):
    """What the body senders read from: a L{BoundedReader} or L{_BytesReader}."""

    def read(self, n: int | None = -1) -> bytes: ...

    @property
    def remaining(self) -> int: ...

    def close(self) -> None: ...


class _BytesReader:
    """A message held in memory (a converted one), read like a queue file."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        piece = self._data[self._pos:end]
        self._pos = end
        return piece

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def close(self) -> None:
        pass


def _prepared_copy(entry: QueueEntry, convert: bool, signer: Signer | None) -> tuple[bytes, Signed | None]:
    """
    The stored message as it is to be sent: converted to 7 bits if
    C{convert}, then DKIM-signed if C{signer} (blocking: run in a worker
    thread).

    @return: the message and what signing gave (C{None} without a signer).
    @raise ConversionError: it cannot be converted (8-bit header fields).
    @raise OSError: the queue file cannot be read, or is short.
    """
    with entry.open_message() as f:
        data = f.read()
    if len(data) != entry.envelope.size:
        raise OSError("queue file shorter than its recorded size")
    if convert:
        data = to_seven_bit(data)
    if signer is None:
        return data, None
    signed = signer.sign(data)
    return (signed.fields + data if signed.fields else data), signed


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


def _addr(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


_TLSMODE_DEPRECATED = "tlsMode attribute of twisted.mail.smtp.ESMTPClient is deprecated since Twisted 13.0"


@implementer(IHandshakeListener)
class RelayClient(smtp.ESMTPClient):
    """
    One outbound connection to one next hop; takes jobs from its L{HopPool}
    until there are none (or reuse is off), then QUITs.
    """

    transport: ITCPTransport | None

    debug = False
    #: The largest BDAT chunk (RFC 3030): memory per connection is bounded by
    #: the body senders' reads, not by this.
    BDAT_CHUNK = 1024 * 1024
    # No Logger here: SMTPClient.__init__ sets self.log to its transcript of
    # the session (a LineLog), which would hide one.

    # ESMTPClient defines __setattr__ in Python only to turn the deprecated
    # 'tlsMode' into '_tlsMode' (with a warning); every other assignment
    # (code, resp and a dozen more per message) paid a Python call for it
    # (py-spy: 1.7% of the reactor thread). The plain one, and a property
    # for that one name, do the same.
    __setattr__ = object.__setattr__

    @property
    def tlsMode(self) -> bool:
        warnings.warn(_TLSMODE_DEPRECATED, category=DeprecationWarning, stacklevel=2)
        return self._tlsMode

    @tlsMode.setter
    def tlsMode(self, value: bool) -> None:
        warnings.warn(_TLSMODE_DEPRECATED, category=DeprecationWarning, stacklevel=2)
        self._tlsMode = value

    def __init__(self, pool: "HopPool") -> None:
        smtp.ESMTPClient.__init__(
            self, secret=None, contextFactory=pool.tls_context, identity=pool.helo_name
        )
        # DANE and MTA-STS enforce require TLS whatever the route says.
        self.requireTransportSecurity = pool.tls_policy in ("required", "verify") or pool.hop_tls is not None
        # With credentials, never fall back to HELO (it has no AUTH).
        self.requireAuthentication = pool.auth is not None
        self.authenticated = False
        self._auth_step = ""
        self.tls_info: str | None = None
        self.pool = pool
        self.timeouts = pool.timeouts
        # SMTPClient's timeout is a float or None (its class value is None,
        # whence Twisted's inferred type); callLater is TimeoutMixin's clock,
        # meant to be replaced, though Twisted types it as a method.
        self.timeout = pool.timeouts.helo_timeout  # type: ignore[assignment]
        self.callLater = pool.reactor.callLater  # type: ignore[method-assign]
        self.peer_ext: dict[bytes, bytes | None] = {}
        self.job: Job | None = None
        self._pending: deque[tuple[str, Recipient | None]] = deque()
        self._rcpt_results: dict[str, DeliveryResult] = {}
        self._rcpt_job: Job | None = None
        self._accepted: list[Recipient] = []
        self._mail_reply: tuple[int, bytes] | None = None
        self._sent = 0
        self._needs_rset = False
        self._quitting = False
        self.session_error: tuple[int, str, str] | None = None
        # The greeting refused the session (the hop is down, as when refused).
        self.greeting_refused = False
        # The current transaction: how it goes, the converted message (None:
        # the queue file), the BDAT reader, chunks sent, a chunk being
        # written, a chunk reply that came before its chunk was all written.
        self._plan: _Plan | None = None
        self._payload: bytes | None = None
        self._reader: _Reader | None = None
        self._chunks = 0
        self._chunk_writing = False
        self._early_reply: tuple[str, int, bytes] | None = None
        self._in_next = False
        self._again = False

    # -- connection and capabilities -------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        smtp.ESMTPClient.connectionMade(self)
        self.pool.connected(self)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self.peer_ext = {}
        for line in resp.splitlines()[1:]:
            parts = line.split(None, 1)
            if parts:
                self.peer_ext[parts[0].upper()] = parts[1] if len(parts) > 1 else None
        if b"STARTTLS" not in self.peer_ext and not self._tlsMode and not self.requireTransportSecurity:
            # MTA-STS testing: no STARTTLS is a failure to report, not to enforce.
            ctx = self.pool.tls_report
            if ctx is not None and ctx.testing:
                self.pool.report_tls(self, STARTTLS_NOT_SUPPORTED, "no STARTTLS offered")
        smtp.ESMTPClient.esmtpState_serverConfig(self, code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        # Anything the server sent after its 220 came in cleartext; it must not
        # be read as if it had come over TLS (trap 17).
        self.clearLineBuffer()
        smtp.ESMTPClient.esmtpState_starttls(self, code, resp)

    def handshakeCompleted(self) -> None:
        info = connection_info(self.transport)
        self.tls_info = f"{info[0]} {info[1]}" if info else "TLS"
        if self.pool.hop_tls is not None:
            # The policy that decided this session's TLS, for events (the
            # handshake got here: the certificate passed its check).
            self.tls_info += f" ({self.pool.hop_tls.label})"
        ctx = self.pool.tls_report
        if ctx is not None:
            failure = None
            if ctx.testing:
                # MTA-STS testing: the certificate judged now, reported only.
                try:
                    from relaynet.delivery.dane import peer_chain

                    chain = peer_chain(self.transport.getHandle())  # type: ignore[union-attr]
                    failure = webpki_result(chain, ctx.mx_host, self.pool.ca_file)
                except Exception as e:  # noqa: BLE001 - a report, never a reason to fail the session
                    failure = tls_failure_result(e)
            self.pool.report_tls(self, failure, None if failure is None else f"certificate of {ctx.mx_host}")

    # -- SMTP AUTH (RFC 4954) ----------------------------------------------

    def authenticate(self, code: int, resp: bytes, items: Any) -> None:
        """
        After EHLO (and after STARTTLS and the second EHLO): authenticate with
        the route's credentials, if it has some, then start sending.

        Credentials go out only inside TLS, unless the route says
        C{auth_cleartext}. PLAIN (RFC 4616) is used if the hop offers it,
        else LOGIN. Anything that stops authentication defers the queued
        mail and puts the hop's pool in its penalty (L{HopPool.auth_failed}).
        """
        # Greeting and EHLO went through: a hop that was down is up again.
        self.pool.hop.up()
        creds = self.pool.auth
        if creds is None:
            self.smtpState_from(code, resp)
            return
        name = self.pool.name
        blocked = self.pool.auth_blocked()
        if blocked is not None:
            # Another connection's AUTH was refused meanwhile: do not try again.
            self._auth_failure(*blocked, penalize=False)
            return
        if not self._tlsMode and not self.pool.auth_cleartext:
            self._auth_failure(
                "4.7.0",
                f"SASL authentication not attempted: {name} offered no STARTTLS, and the"
                " route's credentials are sent only over TLS (auth_cleartext is off)",
            )
            return
        offered = self._auth_mechanisms()
        if offered is None:
            self._auth_failure("4.7.0", f"SASL authentication failed; server {name} offered no AUTH")
            return
        user, password = creds
        self._expected = range(0, 1000)  # type: ignore[assignment]  # as in quit()
        self._okresponse = self._failresponse = self._auth_reply
        self.setTimeout(self.timeouts.helo_timeout)
        if b"PLAIN" in offered:
            self._auth_step = "PLAIN"
            self._send_secret(b"AUTH PLAIN ", _b64(f"\0{user}\0{password}"))
        elif b"LOGIN" in offered:
            self._auth_step = "LOGIN"
            self.sendLine(b"AUTH LOGIN")
        else:
            mechs = " ".join(sorted(m.decode("ascii", "replace") for m in offered)) or "none"
            self._auth_failure(
                "4.7.0",
                f"SASL authentication failed; cannot authenticate to server {name}:"
                f" no mechanism available (offered: {mechs}; relaynet uses PLAIN or LOGIN)",
            )

    def _auth_mechanisms(self) -> set[bytes] | None:
        """The SASL mechanisms of the EHLO reply (also the old C{AUTH=} form)."""
        found: set[bytes] | None = None
        for key, value in self.peer_ext.items():
            if key == b"AUTH":
                words = (value or b"").split()
            elif key.startswith(b"AUTH="):
                words = [key[5:], *(value or b"").split()]
            else:
                continue
            found = (found or set()) | {w.upper() for w in words}
        return found

    def _send_secret(self, prefix: bytes, secret: bytes) -> None:
        """Send a line that carries credentials: never into a transcript."""
        assert self.transport is not None
        self.transport.write(prefix + secret + b"\r\n")

    def _auth_reply(self, code: int, resp: bytes) -> None:
        """A reply during the AUTH exchange."""
        assert self.pool.auth is not None
        user, password = self.pool.auth
        step, name = self._auth_step, self.pool.name
        if code == 235:
            self._auth_step = ""
            self.authenticated = True
            self.smtpState_from(code, resp)
            return
        if code == 334 and step in ("PLAIN", "LOGIN", "LOGIN-USER"):
            # PLAIN: a server that wanted no initial response asks for it.
            if step == "PLAIN":
                self._auth_step = "SENT"
                self._send_secret(b"", _b64(f"\0{user}\0{password}"))
            elif step == "LOGIN":
                self._auth_step = "LOGIN-USER"
                self._send_secret(b"", _b64(user))
            else:
                self._auth_step = "SENT"
                self._send_secret(b"", _b64(password))
            return
        if code == 334:
            # A challenge after the password: cancel (RFC 4954 4), then fail.
            self._auth_step = "CANCELLED"
            self.sendLine(b"*")
            return
        if step == "CANCELLED":
            self._auth_failure("4.7.0", f"SASL authentication failed; server {name} sent an unexpected challenge")
            return
        # Deferred, never bounced (Postfix's smtp_sasl_auth_soft_bounce): the
        # status keeps the server's detail in class 4; the diagnostic quotes
        # the whole reply.
        enhanced = reply_status(code, resp)[0]
        enhanced = "4" + enhanced[1:] if 400 <= code < 600 else "4.7.0"
        said = " ".join(line.strip() for line in resp.decode("utf-8", "replace").splitlines())
        self._auth_failure(enhanced, f"SASL authentication failed; server {name} said: {code} {said}".rstrip())

    def _auth_failure(self, enhanced: str, text: str, penalize: bool = True) -> None:
        """
        Authentication failed (or cannot be done): defer the queued mail, put
        the pool in its penalty, and end the session politely.
        """
        self._auth_step = ""
        if self.session_error is None:
            self.session_error = (0, enhanced, text)
        if penalize:
            self.pool.auth_failed(enhanced, text)
        self.quit()

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        """Fall back to HELO after a refused EHLO, once: a refused HELO ends it."""
        smtp.ESMTPClient.smtpState_helo(self, code, resp)
        self._failresponse = self._helo_refused

    def _helo_refused(self, code: int, resp: bytes) -> None:
        enhanced, text = reply_status(code, resp)
        self._end_connection(code, enhanced, f"HELO refused: {text}")

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        self.greeting_refused = True
        if 400 <= code < 500:
            self.pool.reply_seen(self, code, resp)
        enhanced, text = reply_status(code, resp)
        self._end_connection(code if code >= 400 else 421, enhanced, f"greeting: {text}")

    def sendError(self, exc: Exception) -> None:
        if isinstance(exc, smtp.TLSRequiredError):
            if self.pool.hop_tls is not None:
                self.pool.report_tls(self, STARTTLS_NOT_SUPPORTED, "no STARTTLS offered")
                # RFC 7672 2.2, RFC 8461 5: not delivered to this host, 4.7.5.
                self._end_connection(
                    0, "4.7.5", f"{self.pool.hop_tls.label} requires TLS, but {self.pool.hop_tls.host}"
                    f" ({self.pool.name}) did not offer STARTTLS")
                return
            self._end_connection(0, "4.7.4", f"TLS is required, but was not offered by {self.pool.name}")
            return
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", b"")
        if isinstance(resp, str):
            resp = resp.encode("utf-8", "replace")
        if code >= 400:
            if code < 500:
                self.pool.reply_seen(self, code, resp)
            enhanced, text = reply_status(code, resp)
        else:
            code, enhanced, text = 0, "4.4.2", resp.decode("utf-8", "replace") or str(exc)
        self._end_connection(code, enhanced, text)

    def timeoutConnection(self) -> None:
        self._end_connection(0, "4.4.2", f"timeout talking to {self.pool.name}")

    def _end_connection(self, code: int, enhanced: str, text: str) -> None:
        """A fault that ends the session: fail the current job, drop the line."""
        job, self.job = self.job, None
        self._close_reader()
        if code and not (400 <= code < 600):
            code = 0
        if self.session_error is None:
            self.session_error = (code, enhanced, text)
        if code >= 500 and job is not None and self._mail_reply is None:
            # A 5xx greeting/EHLO refusal is about the session, not the
            # recipients: treat it as transient so failover/retry happen.
            code, enhanced = 421, "4" + enhanced[1:]
        if job is not None:
            self._fail_job(job, code, enhanced, text)
        self._quitting = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        smtp.ESMTPClient.connectionLost(self, reason)
        job, self.job = self.job, None
        self._close_reader()
        why = f"lost connection with {self.pool.name}"
        if reason is not None and reason.check(SSL.Error, VerificationError, DaneVerificationError):
            hop_tls = self.pool.hop_tls
            policy = f" ({hop_tls.label})" if hop_tls is not None else ""
            peer = f"{hop_tls.host} ({self.pool.name})" if hop_tls is not None else self.pool.name
            why = f"TLS with {peer} failed{policy}: {reason.getErrorMessage()}"
            self.pool.report_tls(self, tls_failure_result(reason), reason.getErrorMessage())
        enhanced = "4.7.5" if "TLS" in why else "4.4.2"
        if self.session_error is None and not self._quitting:
            self.session_error = (0, enhanced, why)
        if job is not None:
            self._fail_job(job, 0, enhanced, why)
        self.pool.disconnected(self)

    def _fail_job(self, job: Job, code: int, enhanced: str, text: str) -> None:
        """
        The session failed mid-transaction: recipients already refused at RCPT
        keep their own (possibly permanent) result; the others get this one.
        """
        if job.deferred.called:
            return
        if any(kind in ("DOT", "LAST") for kind, _ in self._pending):
            # The whole message was sent and its reply never came: the next
            # hop may hold it. A later attempt says so (XTXNAGAIN).
            job.entry.recovered = True
        known = self._rcpt_results if job is self._rcpt_job else {}
        job.deferred.callback([
            known.get(r.address) or DeliveryResult(r.address, code, enhanced, text, self.pool.name)
            for r in job.recipients
        ])

    # -- transactions ----------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Entry point after EHLO/TLS/AUTH and after each message: next job."""
        self._next()

    def _next(self, first: Job | None = None) -> None:
        """
        Start C{first}, or the next sendable job, or idle, or QUIT (a loop,
        not recursion: a job refused here, or whose conversion fails at
        once, makes the loop go round again rather than call itself).
        """
        if self._in_next:
            # Called back from inside the loop (a job's result ran code that
            # ended here): the loop goes round once more.
            if first is not None:
                self.pool.queue.appendleft(first)
            self._again = True
            return
        self._in_next = True
        try:
            while not self._quitting:
                job, first = first, None
                if job is None and (self.pool.reuse or self._sent == 0):
                    if self._sent < self.pool.max_messages:
                        job = self.pool.take(self)
                if job is None:
                    # A fresh connection waits (idle) for a token even without reuse.
                    if (self.pool.reuse or self._sent == 0) and self._sent < self.pool.max_messages:
                        self.pool.idle(self)
                        return
                    self.quit()
                    return
                plan = self._plan_for(job)
                if plan is None:
                    continue
                self._again = False
                self._start_job(job, plan)
                if not self._again:
                    return
        finally:
            self._in_next = False

    def _plan_for(self, job: Job) -> _Plan | None:
        """
        How C{job} goes to this peer; or fail it permanently, without sending
        anything, if the peer cannot take it: it needs SMTPUTF8 and the peer
        lacks it (RFC 6531, 5.6.7), it is 8-bit, the peer lacks 8BITMIME and
        C{[outbound] eight_bit} says bounce (RFC 6152, 5.6.3), or it is larger
        than the peer's SIZE (5.3.4; a converted message is measured once
        converted).

        @return: the plan, or C{None} if the job was refused.
        """
        env = job.entry.envelope
        ext = self.peer_ext
        params = env.params
        remote = self.pool.name
        problem = None
        smtputf8 = bool(params.get("smtputf8"))
        if smtputf8 and b"SMTPUTF8" not in ext:
            # Only a message that needs it stops here; one that merely
            # declared it goes without the parameter (RFC 6531 3.4).
            smtputf8 = False
            if needs_smtputf8(env, [r.address for r in job.recipients]):
                problem = (
                    "5.6.7",
                    (f"{remote} does not support SMTPUTF8, and the message needs it"
                     " (non-ASCII address or header section; RFC 6531)"),
                )
        eight = has_eight_bit(env)
        offers8 = b"8BITMIME" in ext
        convert = eight and not offers8
        if problem is None and convert and self.timeouts.eight_bit == "bounce":
            problem = (
                "5.6.3",
                (f"{remote} does not support 8BITMIME; 8-bit message not sent"
                 " ([outbound] eight_bit = bounce; RFC 6152)"),
            )
        if problem is None and not convert:
            problem = self._too_big(env.size)
        if problem is not None:
            job.fail(554, problem[0], problem[1], remote, local=True)
            self._sent += 1
            return None
        return _Plan(
            smtputf8=smtputf8,
            body8=offers8 and (eight or params.get("body") == "8BITMIME"),
            convert=convert,
            chunking=b"CHUNKING" in ext and self.timeouts.chunking,
            sign=self.pool.signer is not None,
        )

    def _too_big(self, size: int) -> tuple[str, str] | None:
        """The 5.3.4 refusal if C{size} octets exceed the peer's SIZE."""
        if b"SIZE" not in self.peer_ext:
            return None
        try:
            limit = int((self.peer_ext[b"SIZE"] or b"0").split()[0])
        except (ValueError, IndexError):
            limit = 0
        if limit and size > limit:
            return ("5.3.4", f"message size {size} exceeds the limit {limit} of {self.pool.name}")
        return None

    def quit(self) -> None:
        """End the session politely."""
        self._quitting = True
        self.job = None
        self._close_reader()
        self.setTimeout(self.timeouts.helo_timeout)
        # Any reply: SMTPClient assigns a range itself, though its inferred
        # type is the list[int] of its first assignment.
        self._expected = range(0, 1000)  # type: ignore[assignment]
        self._okresponse = self._failresponse = self.smtpState_disconnect
        # Sent now, not queued for the next reactor pass: at a node's stop
        # the reactor ends without writing what is queued, and the peer
        # saw the connection drop without QUIT.
        send_now(self.transport, b"QUIT\r\n")

    def start(self, job: Job) -> None:
        """Send one message to its recipients on this connection."""
        self._next(job)

    def _start_job(self, job: Job, plan: _Plan) -> None:
        """Send C{job} as planned: at once, or once converted to 7 bits and/or signed."""
        if not plan.convert and not plan.sign:
            self._begin(job, plan, None)
            return
        # The connection is taken meanwhile (self.job); if it ends before
        # the conversion does, the job gets its result from that.
        self.job = job
        signer = self.pool.signer if plan.sign else None
        d = maybeDeferred(self.pool.run_in_thread, lambda: _prepared_copy(job.entry, plan.convert, signer))
        d.addCallbacks(
            lambda prepared: self._converted(job, plan, *prepared),
            lambda reason: self._conversion_failed(job, plan, reason),
        )

    def _converted(self, job: Job, plan: _Plan, data: bytes, signed: Signed | None) -> None:
        if self.job is not job or self._quitting:
            return
        if signed is not None:
            self.pool.dkim_event(job, signed)
        problem = self._too_big(len(data))
        if problem is not None:
            self.job = None
            how = " (converted to 7 bits)" if plan.convert else " (DKIM-signed)"
            job.fail(554, problem[0], problem[1] + how, self.pool.name, local=True)
            self._sent += 1
            self._next()
            return
        self._begin(job, plan, data)

    def _conversion_failed(self, job: Job, plan: _Plan, reason: Failure) -> None:
        if self.job is not job or self._quitting:
            return
        self.job = None
        remote = self.pool.name
        if reason.check(ConversionError):
            job.fail(
                554, "5.6.3",
                f"{remote} does not support 8BITMIME, and the 8-bit message cannot be"
                f" converted to 7 bits: {reason.getErrorMessage()} (RFC 6152)", remote, local=True,
            )
        else:
            what = "convert the message to 7 bits" if plan.convert else "sign the message"
            self.pool.log.failure(
                "preparing {queue_id} for {relay}", reason, queue_id=job.entry.queue_id, relay=remote,
            )
            job.fail(0, "4.3.0", f"cannot {what} for {remote}: {reason.getErrorMessage()}", remote)
        self._sent += 1
        self._next()

    def _begin(self, job: Job, plan: _Plan, payload: bytes | None) -> None:
        """
        Send MAIL, RCPT... and (without CHUNKING) DATA for C{job}; C{payload}
        is the converted message, or C{None} to send the queue file.
        """
        self.job = job
        self._plan = plan
        self._payload = payload
        self._chunks = 0
        self._chunk_writing = False
        self._early_reply = None
        env = job.entry.envelope
        ext = self.peer_ext
        params = env.params
        dsn = b"DSN" in ext
        mail = b"MAIL FROM:" + _addr(env.sender)
        if b"SIZE" in ext:
            mail += b" SIZE=%d" % (env.size if payload is None else len(payload))
        if plan.body8:
            mail += b" BODY=8BITMIME"
        if plan.smtputf8:
            mail += b" SMTPUTF8"
        if dsn and params.get("ret"):
            mail += b" RET=" + params["ret"].encode()
        if dsn and params.get("envid"):
            mail += b" ENVID=" + xtext_encode(params["envid"]).encode()
        if self._names_transfer(job):
            # A relaynet next hop: name the transfer, so that sending it again
            # (we crashed before recording its 250) is recognised there.
            mail += b" XTXN=" + xtext_encode(f"{env.node}/{env.queue_id}").encode()
            if job.entry.recovered and b"AGAIN" in (ext[b"XTXN"] or b"").upper().split():
                # ... by whichever of its workers took it the first time.
                mail += b" XTXNAGAIN"
        lines = [mail]
        self._pending = deque([("MAIL", None)])
        for r in job.recipients:
            rcpt = b"RCPT TO:" + _addr(r.address)
            if dsn and r.notify:
                rcpt += b" NOTIFY=" + ",".join(r.notify).encode()
            if dsn and r.orcpt:
                addr_type, _, orig = r.orcpt.partition(";")
                rcpt += b" ORCPT=" + addr_type.encode() + b";" + xtext_encode(orig).encode()
            lines.append(rcpt)
            self._pending.append(("RCPT", r))
        if not plan.chunking:
            # With BDAT the first chunk waits for the RCPT replies.
            lines.append(b"DATA")
            self._pending.append(("DATA", None))
        self._rcpt_results = {}
        self._rcpt_job = job
        self._accepted = []
        self._mail_reply = None
        self._expected = range(0, 1000)  # type: ignore[assignment]  # as in quit()
        self._okresponse = self._failresponse = self._on_reply
        if self._needs_rset:
            self._pending.appendleft(("RSET", None))
            lines.insert(0, b"RSET")
            self._needs_rset = False
        self._pipelined = b"PIPELINING" in ext
        self.setTimeout(self.timeouts.mail_timeout)
        if self._pipelined:
            commands = b"".join(line + b"\r\n" for line in lines)
            size = env.size if payload is None else len(payload)
            if plan.chunking and size <= self.BDAT_CHUNK:
                # A message of one chunk goes in the same round trip as MAIL
                # and RCPT (RFC 3030 4.2: BDAT may be pipelined; the server
                # reads the chunk whatever its replies to MAIL and RCPT):
                # one round trip per message, not two. And in the same
                # write: sent apart, the commands woke the next hop, which
                # took this CPU to read them before the chunk was even
                # written (0.3 ms per hop at light load).
                self._send_chunk(job, commands)
            else:
                send_now(self.transport, commands)
        else:
            self._unsent = deque(lines[1:])
            self.sendLine(lines[0])

    def _send_next(self) -> None:
        """Without PIPELINING: send the next command of the transaction."""
        if self._pipelined or not self._unsent:
            return
        line = self._unsent.popleft()
        self.setTimeout(self.timeouts.data_timeout if line == b"DATA" else self.timeouts.rcpt_timeout)
        self.sendLine(line)

    def _on_reply(self, code: int, resp: bytes) -> None:
        job = self.job
        if job is None or not self._pending:
            return
        if 400 <= code < 500:
            self.pool.reply_seen(self, code, resp)
        kind, rcpt = self._pending.popleft()
        ok = 200 <= code < 300
        chunking = self._plan is not None and self._plan.chunking
        if kind == "RSET":
            self._send_next()
            return
        if kind == "MAIL":
            self._mail_reply = (code, resp)
            if ok:
                self._send_next()
                return
            self._needs_rset = True
            if not self._pipelined:
                self._complete(code, resp)
            return
        mail_code, mail_resp = self._mail_reply or (0, b"")
        mail_ok = 200 <= mail_code < 300
        if kind == "RCPT":
            assert rcpt is not None
            if mail_ok:
                if ok:
                    self._accepted.append(rcpt)
                else:
                    enhanced, text = reply_status(code, resp)
                    self._rcpt_results[rcpt.address] = DeliveryResult(
                        rcpt.address, code, enhanced, text, self.pool.name,
                        b"DSN" in self.peer_ext, self.tls_info,
                    )
            if chunking and not self._pending:
                # The last RCPT reply: BDAT if a recipient was accepted
                # (RFC 3030 needs no empty transaction to end), else done.
                if mail_ok and self._accepted:
                    self._send_chunk(job)
                else:
                    self._needs_rset = True
                    self._complete(*((code, resp) if mail_ok else (mail_code, mail_resp)))
                return
            if not self._pipelined:
                if self._unsent and self._unsent[0] == b"DATA" and not self._accepted:
                    self._needs_rset = True
                    self._complete(code, resp)
                    return
                self._send_next()
            return
        if kind == "DATA":
            if code == 354 and mail_ok and self._accepted:
                self._send_body(job)
            elif code == 354:
                # Pipelined DATA accepted though no recipient was: end an empty
                # message (RFC 2920 3.1) and disregard its reply.
                self._pending.append(("EMPTY", None))
                self.sendLine(b".")
            elif mail_ok and self._accepted and not 400 <= code < 600:
                # Neither 354 nor a refusal: no body was sent, so nothing was
                # delivered. A protocol error, transient.
                self._end_connection(0, "4.5.0", f"{self.pool.name} answered DATA with {code}")
            else:
                self._needs_rset = True
                self._complete(*((code, resp) if mail_ok else (mail_code, mail_resp)))
            return
        if kind == "EMPTY":
            self._needs_rset = True
            self._complete(*((0, b"") if mail_ok else (mail_code, mail_resp)))
            return
        if kind in ("BDAT", "LAST"):
            if self._chunk_writing:
                # A reply before its chunk was all written: the peer must
                # still read the whole chunk, so finish writing it first.
                self._early_reply = (kind, code, resp)
                return
            self._chunk_reply(job, kind, code, resp)
            return
        if kind == "DOT":
            self._log_transfer(job, code)
            self._complete(code, resp)

    # -- the body: DATA -----------------------------------------------------

    def _open_reader(self, job: Job) -> _Reader:
        """The message to send: the converted copy, or the queue file."""
        if self._payload is not None:
            return _BytesReader(self._payload)
        return job.entry.open_message()

    def _send_body(self, job: Job) -> None:
        self.setTimeout(self.timeouts.data_block_timeout)
        try:
            f = self._open_reader(job)
        except OSError as e:
            self._end_connection(0, "4.3.0", f"cannot read queue file: {e}")
            return

        def sent(_: object) -> None:
            f.close()
            self.setTimeout(self.timeouts.data_done_timeout)
            self._pending.append(("DOT", None))

        def failed(reason: Failure) -> None:
            f.close()
            self._end_connection(0, "4.4.2", f"error sending message body: {reason.value}")

        BodySender(f, self.transport, self.resetTimeout).start().addCallbacks(sent, failed)

    # -- the body: BDAT (RFC 3030) -----------------------------------------

    def _send_chunk(self, job: Job, commands: bytes = b"") -> None:
        """
        Send the next C{BDAT} chunk of up to L{BDAT_CHUNK} octets (the last
        one C{BDAT n LAST}), after C{commands} (the transaction's pipelined
        MAIL and RCPT, for its first chunk), and wait for its reply: one
        chunk in flight.
        Its writing is timed by C{data_block_timeout} (reset as it
        progresses), the wait for a reply by C{data_block_timeout}, the
        reply to the last chunk by C{data_done_timeout}.
        """
        reader = self._reader
        if reader is None:
            try:
                reader = self._reader = self._open_reader(job)
            except OSError as e:
                self._end_connection(0, "4.3.0", f"cannot read queue file: {e}")
                return
        size = min(self.BDAT_CHUNK, reader.remaining)
        last = size == reader.remaining
        self._chunks += 1
        self._pending.append(("LAST" if last else "BDAT", None))
        self._chunk_writing = True
        self.setTimeout(self.timeouts.data_block_timeout)
        header = commands + b"BDAT %d%s\r\n" % (size, b" LAST" if last else b"")

        def sent(_: object) -> None:
            self._chunk_writing = False
            if last:
                self._close_reader()
            if self.job is not job:
                return
            self.setTimeout(self.timeouts.data_done_timeout if last else self.timeouts.data_block_timeout)
            early, self._early_reply = self._early_reply, None
            if early is not None:
                self._chunk_reply(job, *early)

        def failed(reason: Failure) -> None:
            self._chunk_writing = False
            self._close_reader()
            if reason.check(OSError) and not reason.check(ConnectionError):
                # Part of the chunk is out and the rest cannot be read: the
                # session cannot go on (the peer counts octets).
                self._end_connection(0, "4.3.0", f"cannot read queue file: {reason.value}")
            else:
                self._end_connection(0, "4.4.2", f"error sending message body: {reason.value}")

        ChunkSender(reader, size, header, self.transport, self.resetTimeout).start().addCallbacks(sent, failed)

    def _chunk_reply(self, job: Job, kind: str, code: int, resp: bytes) -> None:
        """The reply to a chunk: the next chunk, or the transaction's end."""
        if kind == "LAST" and (200 <= code < 300 or 400 <= code < 600):
            mail_code, mail_resp = self._mail_reply or (0, b"")
            if not 200 <= mail_code < 300:
                # Pipelined with MAIL, which was refused: that is the answer.
                self._needs_rset = True
                code, resp = mail_code, mail_resp
            elif not self._accepted:
                # Pipelined, and every RCPT was refused: each recipient has
                # its own reply; the chunk's refusal (503/554) is not news.
                self._needs_rset = True
            self._log_transfer(job, code)
            self._complete(code, resp)
        elif kind == "BDAT" and 200 <= code < 300:
            self._send_chunk(job)
        elif kind == "BDAT" and 400 <= code < 600:
            # A refused chunk ends the transaction; no further chunk is
            # sent (RFC 3030 2), and the next one starts with RSET.
            self._close_reader()
            self._needs_rset = True
            self._log_transfer(job, code)
            self._complete(code, resp)
        else:
            self._end_connection(0, "4.5.0", f"{self.pool.name} answered BDAT with {code}")

    def _names_transfer(self, job: Job) -> bool:
        """Whether C{job}'s transaction names its transfer (XTXN): a relaynet next hop, a named node."""
        return b"XTXN" in self.peer_ext and bool(job.entry.envelope.node)

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _log_transfer(self, job: Job, code: int) -> None:
        """One debug line per message sent: how it went (DATA or BDAT, converted)."""
        plan = self._plan
        size = job.entry.envelope.size if self._payload is None else len(self._payload)
        self.pool.log.debug(
            "transfer queue_id={queue_id} relay={relay} method={method} chunks={chunks}"
            " octets={octets} converted={converted} signed={signed} smtputf8={smtputf8}"
            " body8={body8} reply={code}",
            queue_id=job.entry.queue_id, relay=self.pool.name,
            method="BDAT" if plan is not None and plan.chunking else "DATA",
            chunks=self._chunks, octets=size, converted=plan is not None and plan.convert,
            signed=plan is not None and plan.sign,
            smtputf8=plan is not None and plan.smtputf8, body8=plan is not None and plan.body8,
            code=code,
        )

    def _complete(self, code: int, resp: bytes) -> None:
        """The transaction is over: one result per recipient, then the next job."""
        job, self.job = self.job, None
        self._close_reader()
        self._payload = None
        if job is None:
            return
        self._pending.clear()
        dsn = b"DSN" in self.peer_ext
        enhanced, text = reply_status(code, resp) if code else ("4.4.2", "no reply")
        results = []
        named = self._names_transfer(job)
        for r in job.recipients:
            res = self._rcpt_results.get(r.address)
            if res is None:
                if code:
                    res = DeliveryResult(r.address, code, enhanced, text, self.pool.name, dsn, self.tls_info)
                else:
                    res = DeliveryResult(
                        r.address, 0, "4.4.2", "no recipient accepted", self.pool.name, dsn, self.tls_info
                    )
            if named:
                res = evolve(res, named=True)
            results.append(res)
        self._sent += 1
        job.deferred.callback(results)
        self.setTimeout(self.timeouts.mail_timeout)
        self._next()


@implementer(IPullProducer)
class _Sender:
    """
    What L{ChunkSender} and L{BodySender} share: a pull producer on the
    connection that writes a message from a reader and fires a Deferred
    once the last octet is written (or fails it if the connection goes).
    """

    _LOST = "connection lost while sending"

    def __init__(self, reader: _Reader, consumer: Any, progress: Any) -> None:
        self._reader = reader
        self._consumer = consumer
        self._progress = progress
        self._done: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        """Register with the consumer; fires once everything is written."""
        done: Deferred[None] = Deferred()
        self._done = done
        self._consumer.registerProducer(self, False)
        return done

    def resumeProducing(self) -> None:
        raise NotImplementedError  # each sender writes its own way

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        done = self._done
        if done is not None:
            self._finish()
            done.errback(Failure(ConnectionError(self._LOST)))

    def _finish(self) -> None:
        self._done = None
        self._consumer.unregisterProducer()


class ChunkSender(_Sender):
    """
    Send one BDAT chunk: its command line and then C{size} octets of the
    message as they are (no dot-stuffing: RFC 3030), read L{PIECE} octets
    per reactor pass, the command joined to the first piece.

    @ivar PIECE: bytes read per pass; bounds memory per connection.
    """

    PIECE = 256 * 1024
    _LOST = "connection lost while sending a BDAT chunk"

    def __init__(self, reader: _Reader, size: int, header: bytes, consumer: Any, progress: Any) -> None:
        super().__init__(reader, consumer, progress)
        self._left = size
        self._header = header

    def resumeProducing(self) -> None:
        done = self._done
        if done is None:
            return
        try:
            piece = self._reader.read(min(self.PIECE, self._left))
            if not piece and self._left:
                raise OSError("queue file shorter than its recorded size")
        except OSError as e:
            self._finish()
            done.errback(e)
            return
        self._left -= len(piece)
        self._progress()
        data, self._header = self._header + piece, b""
        if self._left == 0:
            self._finish()
            send_now(self._consumer, data)
            done.callback(None)
        else:
            self._consumer.write(data)


class BodySender(_Sender):
    """
    Send a stored message as the body of DATA: dot-stuffed, in chunks of up
    to L{CHUNK} bytes, the end-of-data marker joined to the last chunk.

    C{twisted.protocols.basic.FileSender} sends 16 KiB per reactor pass and
    the marker in a write of its own: a 100 KB message took eight sends and
    eight passes; here it is one read, one stuffing pass and one write.

    @ivar CHUNK: bytes read per pass; bounds memory per connection.
    """

    CHUNK = 256 * 1024
    _LOST = "connection lost while sending the body"

    def __init__(self, reader: _Reader, consumer: Any, progress: Any) -> None:
        super().__init__(reader, consumer, progress)
        self._stuffer = DotStuffer()

    def resumeProducing(self) -> None:
        done = self._done
        if done is None:
            return
        try:
            chunk = self._reader.read(self.CHUNK)
            last = self._reader.remaining == 0
            if not chunk and not last:
                raise OSError("queue file shorter than its recorded size")
        except OSError as e:
            self._finish()
            done.errback(e)
            return
        self._progress()
        data = self._stuffer.stuff(chunk)
        if last:
            data += self._stuffer.terminator()
            self._finish()
            send_now(self._consumer, data)
            done.callback(None)
        else:
            self._consumer.write(data)


class _Factory(ClientFactory):
    # One factory per connection: Twisted's "Starting/Stopping factory" lines
    # would be two log lines per outbound connection (the events say more).
    noisy = False

    def __init__(self, pool: "HopPool") -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> RelayClient:
        p = RelayClient(self.pool)
        p.factory = self
        return p


class HopState:
    """
    Whether one next hop is up or down: the hop-state cache, like the
    "dead host" state of Postfix's queue manager ("delivery temporarily
    suspended: connect to X: Connection refused").

    A hop goes down when a connection to it cannot be made (refused, no
    route, C{connect_timeout}) or its greeting refuses the session, while no
    other connection to it is up. While it is down no connection is tried:
    its pools defer every job at once with C{4.4.1} "delivery temporarily
    suspended: " and the first failure, and failover moves the recipients on
    to the route's next hop. When the down time expires, one probe
    connection is allowed (other jobs of the probing pool wait for it,
    those of other pools are deferred); a probe that fails puts the hop
    down again for twice as long (up to L{MAX_FACTOR} times C{down_time});
    the first session that gets through its greeting and EHLO reopens it.

    The queue ids deferred while it was down (up to L{REMEMBER}) are kept:
    when the down time expires, one of them is flushed to be the probe
    (without waiting for new mail); when the hop reopens, all of them are
    flushed (C{flush}), so they do not wait for their own backoff.

    @ivar down_until: when the down time ends (C{None}: up).
    @ivar diagnostic: the failure that put it down.
    """

    log = Logger()
    MAX_FACTOR = 10
    REMEMBER = 10000

    def __init__(
        self, name: str, reactor: Any, down_time: float, events: Any = None,
        flush: Callable[[list[str], int | None], int] | None = None,
    ) -> None:
        """
        @param down_time: the first down time in seconds (C{0}: never down).
        @param flush: C{flush(queue_ids, limit)} attempts up to C{limit}
            (C{None}: all) of those still queued now; returns how many.
        """
        self.name = name
        self.reactor = reactor
        self.down_time = down_time
        self.events = events
        self.flush = flush
        self.down_until: float | None = None
        self.since = 0.0
        self.interval = 0.0
        self.diagnostic = ""
        self.probing = False
        self.suspended = 0
        self.deferred: dict[str, None] = {}
        self._timer: Any = None

    @property
    def down(self) -> bool:
        """The hop is marked down (its down time may have expired: a probe is due)."""
        return self.down_until is not None

    def blocked(self) -> bool:
        """Down and its down time not over: no connection may be tried."""
        return self.down_until is not None and self.reactor.seconds() < self.down_until

    def remember(self, job: "Job") -> None:
        """C{job}'s message is deferred while the hop is down: flush it when it reopens."""
        if self.down_until is None:
            return
        qid = job.entry.queue_id
        if qid not in self.deferred and len(self.deferred) < self.REMEMBER:
            self.deferred[qid] = None

    def suspend(self, job: "Job", remote: str) -> None:
        """Defer C{job} without a connection attempt: the hop is down."""
        self.suspended += 1
        self.remember(job)
        job.fail(0, "4.4.1", SUSPENDED + self.diagnostic, remote)

    def failed(self, diagnostic: str) -> None:
        """A connection failed with no other one up: down (again)."""
        if not self.down_time:
            return
        now = self.reactor.seconds()
        was_down = self.down_until is not None
        if was_down and not self.probing:
            return  # already down (other connections opened with the first failing)
        if was_down:
            self.interval = min(self.interval * 2, self.down_time * self.MAX_FACTOR)
        else:
            self.interval = self.down_time
            self.since = now
            self.diagnostic = diagnostic
        self.probing = False
        self.down_until = now + self.interval
        self._arm()
        if not was_down:
            self.log.warn(
                "hop_down relay={relay}: {diagnostic}; no connection to it for {down:.0f} s",
                relay=self.name, diagnostic=diagnostic, down=self.interval,
            )
            if self.events is not None:
                self.events.emit("hop_down", relay=self.name, diagnostic=diagnostic,
                                 retry_after=self.interval)
        else:
            self.log.info(
                "hop_down relay={relay}: probe failed ({diagnostic}); down for {down:.0f} s",
                relay=self.name, diagnostic=diagnostic, down=self.interval,
            )

    def up(self) -> None:
        """A session got through: reopen the hop and flush what it deferred."""
        if self.down_until is None:
            return
        down_for = self.reactor.seconds() - self.since
        self.down_until = None
        self.probing = False
        self.interval = 0.0
        self._cancel()
        ids, self.deferred = list(self.deferred), {}
        self.log.info("hop_up relay={relay} after {down_for:.0f} s; {n} deferred messages flushed",
                      relay=self.name, down_for=down_for, n=len(ids))
        if self.events is not None:
            self.events.emit("hop_up", relay=self.name, down_for=round(down_for, 3),
                             suspended=self.suspended, flushed=len(ids))
        self.suspended = 0
        if ids and self.flush is not None:
            # Not from inside the pool's bookkeeping: on the next turn.
            self.reactor.callLater(0, self.flush, ids, None)

    def _arm(self) -> None:
        self._cancel()
        assert self.down_until is not None
        self._timer = self.reactor.callLater(
            max(0.0, self.down_until - self.reactor.seconds()), self._expired
        )

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        """The down time is over: make a deferred message the probe."""
        self._timer = None
        if self.flush is None or self.down_until is None:
            return
        ids = list(self.deferred)
        for qid in ids:
            # Flushed ones that are gone (delivered by another hop, deleted) are forgotten.
            if self.flush([qid], 1):
                return
            del self.deferred[qid]

    def probe_now(self) -> None:
        """
        End the down time now (an administrator's flush, as Postfix's
        C{postqueue -f} unthrottles dead destinations): the next job is the
        probe. A failing probe still doubles the down time.
        """
        if self.down_until is not None and not self.probing:
            self.down_until = self.reactor.seconds()
            self._cancel()

    def snapshot(self) -> dict[str, Any]:
        """The state for the admin API and metrics."""
        if self.down_until is None:
            return {"relay": self.name, "state": "up"}
        return {
            "relay": self.name, "state": "probing" if self.probing else "down",
            "since": self.since, "until": self.down_until, "diagnostic": self.diagnostic,
            "suspended": self.suspended,
        }

    def close(self) -> None:
        self._cancel()


class HopPool:
    """
    The connections to one next hop: a queue of jobs, up to C{concurrency}
    connections, each carrying jobs in turn, idle ones kept for
    C{reuse_idle_time} seconds (like Postfix's connection cache).

    A connection attempt that fails while no connection to the hop is up fails
    every queued job at once (the hop is down: the scheduler fails over or
    defers); it is never retried immediately (trap 18).

    With credentials (C{auth}), each connection authenticates before its
    first message. When that fails -- the hop refuses them (535), answers
    AUTH with a 4xx, offers no AUTH, no usable mechanism, or no TLS while
    the route needs it -- the queued jobs are deferred with the reason and
    C{auth_failed}, an C{auth_failed} event is emitted, and the pool opens no
    new connection to the hop for C{auth_penalty} seconds: every job submitted
    meanwhile is deferred at once with the same diagnostic (connections that
    did authenticate keep carrying mail). The messages get their normal
    queue retries; the hop sees at most one failed login per penalty, not
    one per message (as Postfix's SASL soft bounce with its dead-host time).
    A reload forgets the pools, and with them the penalty.

    @ivar AUTH_PENALTY: the default penalty, the queue's default minimal
        backoff.
    """

    log = Logger()
    INITIAL_CONCURRENCY = 5
    AUTH_PENALTY = 300.0
    #: The traffic-shaping destination (a class default too: pools built
    #: without __init__ in tests have none).
    destination: Destination | None = None

    def __init__(
        self,
        endpoint: str,
        reactor: Any,
        timeouts: Outbound,
        helo_name: str,
        concurrency: int = 20,
        source_address: str | None = None,
        tls_policy: str = "none",
        ca_file: Any = None,
        auth: tuple[str, str] | None = None,
        auth_cleartext: bool = False,
        auth_penalty: float | None = None,
        events: Any = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        hop: HopState | None = None,
        signer: Signer | None = None,
        hop_tls: HopTLS | None = None,
        tls_report: ReportContext | None = None,
        tls_reports: Any = None,
        tls_name: str | None = None,
        egress: EgressPool | None = None,
        destination: Destination | None = None,
    ) -> None:
        """
        @param destination: the traffic-shaping state of the destination
            this pool delivers to (L{relaynet.delivery.shaping}), shared by
            every pool to it: jobs start only with its tokens, connections
            open only within its limit, its throttling replies pause it.
        @param egress: the pool of source addresses its connections leave
            from, one chosen per connection (instead of C{source_address}).
        @param run_in_thread: runs blocking work (the 7-bit conversion and
            the DKIM signing of a message) off the reactor thread; by
            default in the reactor's thread pool. Tests inject one.
        @param signer: DKIM-signs every message sent through this pool.
        @param hop_tls: what DANE or MTA-STS asks of the connections (then
            STARTTLS is required whatever C{tls_policy} says, and its
            certificate check replaces the route's).
        @param tls_report: what this host's sessions count under in TLS
            reports (RFC 8460), recorded in C{tls_reports} (a
            L{relaynet.delivery.tlsrpt.TLSReports}).
        @param tls_name: the host name C{tls_policy = "verify"} checks the
            certificate for (an MX host's name); by default the endpoint's host.
        @param hop: the hop's up/down state, shared by every pool to the
            same endpoint (by default its own, with C{timeouts.hop_down_time}).
        @param auth: C{(username, password)} for SMTP AUTH, or C{None}.
        @param auth_cleartext: send them even without TLS (loopback, tests).
        @param auth_penalty: seconds without new connections after a failed
            AUTH (default L{AUTH_PENALTY}).
        @param events: an L{relaynet.events.EventLog} (anything with
            C{emit(name, **fields)}) for the C{auth_failed} event, or C{None}.
        """
        self.endpoint = endpoint
        self.name = hop_name(endpoint)
        self.hop = hop or HopState(self.name, reactor, timeouts.hop_down_time, events)
        self.tls_policy = tls_policy
        self.auth = auth
        self.auth_cleartext = auth_cleartext
        self.auth_penalty = self.AUTH_PENALTY if auth_penalty is None else auth_penalty
        self.events = events
        self._run_in_thread = run_in_thread
        self.signer = signer
        self.hop_tls = hop_tls
        self.tls_report = tls_report if tls_reports is not None else None
        self.tls_reports = tls_reports
        self.ca_file = ca_file
        # (until, dsn, diagnostic) of the last failed AUTH.
        self._auth_block: tuple[float, str, str] | None = None
        # Credentials go only over TLS: a route with tls = "none" still asks
        # for STARTTLS (it may still send them in clear with auth_cleartext).
        context_policy = tls_policy
        if auth is not None and tls_policy == "none" and not auth_cleartext:
            context_policy = "opportunistic"
        self.tls_context = (
            hop_tls.context(ca_file) if hop_tls is not None else
            client_options(context_policy, tls_name or self.name.rpartition(":")[0].strip("[]"), ca_file)
        )
        self.reactor = reactor
        self.timeouts = timeouts
        self.helo_name = helo_name.encode("ascii", "replace")
        self.concurrency = concurrency
        self.reuse = timeouts.connection_reuse
        self.egress = egress
        self._endpoints: dict[str | None, Any] = {}
        self._plain_endpoint = endpoint
        self._endpoint = self._endpoint_from(source_address)
        self.queue: deque[Job] = deque()
        self.clients: set[RelayClient] = set()
        self._starting: set[RelayClient] = set()
        # Postfix-like slow start: a few connections at first, one more per
        # finished transaction, up to the route's concurrency; back to the
        # start after the hop failed.
        self._initial = min(concurrency, self.INITIAL_CONCURRENCY)
        self._limit = self._initial
        self._idle: dict[RelayClient, Any] = {}
        self._connecting = 0
        self.connections_made = 0
        self.destination = destination
        if destination is not None:
            destination.attach(self)

    # -- traffic shaping (relaynet.delivery.shaping) -----------------------

    @property
    def max_messages(self) -> int:
        """Messages per connection: C{[outbound]}'s, or the destination's if lower."""
        most = self.timeouts.max_messages_per_connection
        d = self.destination
        if d is not None and d.messages_per_connection:
            most = min(most, d.messages_per_connection)
        return most

    def connection_count(self) -> int:
        """Connections open and being opened."""
        return len(self.clients) + self._connecting

    def shaping_changed(self) -> None:
        """Tokens came, a connection closed, or the destination was released."""
        self._kick()

    def defer_queued(self) -> None:
        """
        The destination is paused: defer every queued job (remembered, so
        flushed at the release) and QUIT the idle connections.
        """
        d = self.destination
        assert d is not None
        while self.queue:
            job = self.queue.popleft()
            d.remember(job.entry.queue_id)
            d.deferred += 1
            job.fail(0, d.enhanced, d.suspended_diagnostic(), self.name)
        self.close_idle()

    def reply_seen(self, client: RelayClient, code: int, resp: bytes) -> None:
        """A 4xx reply from the hop: the destination's throttles may pause or slow it."""
        d = self.destination
        if d is None:
            return
        enhanced, text = reply_status(code, resp)
        if d.reply(code, enhanced, text, self.name) and client.job is not None:
            # The message the reply was about goes again at the release.
            d.remember(client.job.entry.queue_id)

    def run_in_thread(self, work: Callable[[], Any]) -> Deferred[Any]:
        """Run C{work} in a worker thread; its result, in the reactor thread."""
        if self._run_in_thread is not None:
            return self._run_in_thread(work)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)

    def report_tls(self, client: RelayClient, result_type: str | None, detail: str | None) -> None:
        """Count one session of C{client} in the TLS reports (C{result_type} C{None}: success)."""
        ctx = self.tls_report
        if ctx is None or self.tls_reports is None:
            return
        peer = host = None
        try:
            peer = client.transport.getPeer().host  # type: ignore[union-attr]
            host = client.transport.getHost().host  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - addresses are optional in a report
            pass
        self.tls_reports.record(ctx.result(result_type, detail, peer, host))

    def dkim_event(self, job: Job, signed: Signed) -> None:
        """
        The event of signing C{job}'s message: C{dkim_signed} (the domain and
        selectors), or C{dkim_unsigned} (why not: no key for the From:
        domain, no usable From:).
        """
        if self.events is None:
            return
        if signed.unsigned is None:
            self.events.emit(
                "dkim_signed", queue_id=job.entry.queue_id, relay=self.name,
                domain=signed.domain, selectors=list(signed.selectors),
            )
        else:
            self.events.emit(
                "dkim_unsigned", queue_id=job.entry.queue_id, relay=self.name,
                from_domain=signed.from_domain, reason=signed.unsigned,
            )

    def submit(self, entry: QueueEntry, recipients: list[Recipient]) -> Deferred[list[DeliveryResult]]:
        """Queue delivery of C{entry} to C{recipients} through this hop."""
        job = Job(entry, list(recipients))
        if self.destination is not None:
            self.destination.attach(self)
            refused = self.destination.admit(entry.queue_id)
            if refused is not None:
                # Paused, or more waiting than the rate lets go soon: deferred
                # now (and flushed later), never a long wait in an attempt slot.
                job.fail(0, refused[0], refused[1], self.name)
                return job.deferred
        self.queue.append(job)
        self._kick()
        return job.deferred

    def _kick(self) -> None:
        dest = self.destination
        if dest is not None and dest.paused:
            if self.queue or self._idle:
                self.defer_queued()
            return
        while self.queue and self._idle:
            if dest is not None and not dest.may_start():
                break  # no token yet: the destination wakes the pool
            client, timer = self._idle.popitem()
            if timer.active():
                timer.cancel()
            client.start(self.queue.popleft())
            if dest is not None:
                dest.job_started()
        if self.queue and self.hop.down and not self.clients:
            # The hop is down: no connection while its down time lasts; then
            # one probe (its jobs wait for it; other pools' are deferred).
            if self.hop.blocked() or (self.hop.probing and not self._connecting):
                while self.queue:
                    self.hop.suspend(self.queue.popleft(), self.name)
                return
            if not self._connecting:
                self.hop.probing = True
                self._connect()
            return
        if self.queue and self.auth_blocked() is not None:
            # No new connection during the penalty; a busy connection that
            # did authenticate takes the queue, else it is deferred now.
            if not any(c.authenticated and not c._quitting for c in self.clients):
                self._fail_auth_blocked()
            return
        # Connections being set up will each take a job: count them before
        # opening more, and open no more than the slow-start limit allows.
        need = len(self.queue) - self._connecting - len(self._starting) - len(self._idle)
        room = self._limit - len(self.clients) - self._connecting
        if dest is not None:
            shared = dest.connection_room()
            if shared is not None:
                room = min(room, shared)
            if dest.bucket is not None:
                # No more connections than tokens to use them (one at least).
                need = min(need, max(1, int(dest.bucket.tokens)))
        for _ in range(max(0, min(need, room))):
            self._connect()

    def _endpoint_from(self, source: str | None) -> Any:
        """The client endpoint to the hop, bound to C{source} (cached)."""
        ep = self._endpoints.get(source)
        if ep is None:
            text = self._plain_endpoint
            if source and text.split(":", 1)[0] in ("tcp", "tcp6") and "bindAddress" not in text:
                text += ":bindAddress=" + source.replace(":", "\\:")
            ep = self._endpoints[source] = clientFromString(self.reactor, text)
        return ep

    def _connect(self, tries: int = 0) -> None:
        source = None
        endpoint = self._endpoint
        if self.egress is not None:
            source = self.egress.choose(self.reactor.seconds())
            endpoint = self._endpoint_from(source)
        self._connecting += 1
        d = endpoint.connect(_Factory(self))
        d.addTimeout(self.timeouts.connect_timeout, self.reactor)

        def done(_: object) -> None:
            self._connecting -= 1
            if self.egress is not None and source is not None:
                self.egress.connected(source)

        def failed(reason: Failure) -> None:
            self._connecting -= 1
            egress = self.egress
            if egress is not None and source is not None and reason.check(ConnectBindError):
                # Not this hop's fault: the address is not ours to bind.
                # Left out for a while, and the next one tried at once.
                egress.unavailable(source, self.reactor.seconds())
                if self.events is not None:
                    self.events.emit(
                        "egress_unavailable", pool=egress.name, source=source, relay=self.name,
                        error=reason.getErrorMessage(), retry_after=egress.RETRY,
                    )
                if tries + 1 < len(egress.addresses):
                    self._connect(tries + 1)
                    return
            if reason.check(DeferredTimeout, ConnectingCancelledError):
                text = f"connect to {self.name}: timed out"
            else:
                text = f"connect to {self.name}: {reason.getErrorMessage()}"
            if not self.clients:
                self.hop.failed(text)
            if not self.clients and not self._connecting:
                self._limit = self._initial
                while self.queue:
                    job = self.queue.popleft()
                    self.hop.remember(job)
                    job.fail(0, "4.4.1", text, self.name)

        d.addCallbacks(done, failed)

    def connected(self, client: RelayClient) -> None:
        self.clients.add(client)
        self._starting.add(client)
        self.connections_made += 1

    def disconnected(self, client: RelayClient) -> None:
        """
        A connection ended. If it failed before carrying any message (greeting
        refused, EHLO or TLS failed, dropped) and it was the only one, the hop
        is unusable now: fail the queued jobs rather than reconnect at once.
        """
        self.clients.discard(client)
        self._starting.discard(client)
        timer = self._idle.pop(client, None)
        if timer is not None and timer.active():
            timer.cancel()
        if client.session_error is not None and client._sent == 0:
            self._limit = self._initial
        if self.destination is not None and self.destination.max_connections:
            # A connection to the destination is free: any of its pools may open one.
            self.reactor.callLater(0, self.destination.kick)
        if client.greeting_refused and not self.clients:
            error = client.session_error
            self.hop.failed(f"host {self.name} refused to talk to me: {error[2] if error else 'greeting'}")
        elif self.hop.probing and client._sent == 0 and not self.clients and not self._connecting:
            # The probe connected but broke before its EHLO: still down.
            error = client.session_error
            self.hop.failed(error[2] if error else f"lost connection with {self.name}")
        if not self.queue:
            return
        if self.auth_blocked() is not None:
            # In the AUTH penalty: no reconnecting; the queue is deferred
            # with the AUTH diagnostic unless an authenticated one takes it.
            self._kick()
            return
        error = client.session_error
        if error is not None and client._sent == 0:
            # The hop refused or broke a session before any message: do not
            # reconnect now. Other live connections carry the queue; with none
            # left, the queued jobs fail (deferred, retried with backoff).
            if self.clients or self._connecting:
                return
            code, enhanced, text = error
            if code >= 500 or not code:
                code, enhanced = 0, "4" + enhanced[1:]
            while self.queue:
                job = self.queue.popleft()
                self.hop.remember(job)
                job.fail(code, enhanced, text, self.name)
            return
        self._kick()

    def auth_blocked(self) -> tuple[str, str] | None:
        """C{(dsn, diagnostic)} while the pool is in its AUTH penalty, else C{None}."""
        block = self._auth_block
        if block is None:
            return None
        if self.reactor.seconds() >= block[0]:
            self._auth_block = None
            return None
        return block[1], block[2]

    def _fail_auth_blocked(self) -> None:
        blocked = self.auth_blocked()
        assert blocked is not None
        while self.queue:
            self.queue.popleft().fail(0, blocked[0], blocked[1], self.name, auth_failed=True)

    def auth_failed(self, enhanced: str, diagnostic: str) -> None:
        """
        A connection could not authenticate: start the penalty, tell the
        administrator (an C{auth_failed} event: never the password), and
        defer what is queued.
        """
        self._auth_block = (self.reactor.seconds() + self.auth_penalty, enhanced, diagnostic)
        self._limit = self._initial
        user = self.auth[0] if self.auth is not None else None
        self.log.warn(
            "auth_failed relay={relay} auth_user={auth_user} dsn={dsn}: {diagnostic};"
            " no new connection to it for {penalty:.0f} s",
            relay=self.name, auth_user=user, dsn=enhanced, diagnostic=diagnostic,
            penalty=self.auth_penalty,
        )
        if self.events is not None:
            self.events.emit(
                "auth_failed", relay=self.name, auth_user=user, dsn=enhanced,
                diagnostic=diagnostic, retry_after=self.auth_penalty,
            )
        self._kick()

    def take(self, client: RelayClient) -> Job | None:
        """The next job for C{client}, if any."""
        self._starting.discard(client)
        self.hop.up()
        if client._sent and self._limit < self.concurrency:
            self._limit += 1
        if not self.queue:
            return None
        if self.destination is not None:
            if not self.destination.may_start():
                return None  # no token yet (or paused): it idles until one comes
            job = self.queue.popleft()
            self.destination.job_started()
            return job
        return self.queue.popleft()

    def idle(self, client: RelayClient) -> None:
        """C{client} has nothing to do: keep it briefly for reuse."""
        self._starting.discard(client)
        self.hop.up()
        dest = self.destination
        if dest is not None and (dest.paused or (dest.max_connections and dest.others_waiting(self))):
            # Paused; or another pool of the destination waits for a
            # connection this one would keep idle: it goes.
            client.quit()
            return
        self._idle[client] = self.reactor.callLater(
            self.timeouts.reuse_idle_time, self._expire, client
        )

    def _expire(self, client: RelayClient) -> None:
        if self._idle.pop(client, None) is not None:
            client.quit()

    def close_idle(self) -> None:
        """QUIT idle connections; running ones finish what they carry."""
        for client, timer in list(self._idle.items()):
            if timer.active():
                timer.cancel()
            client.quit()
        self._idle.clear()

    def close(self) -> None:
        """QUIT idle connections and fail queued jobs (node stopping)."""
        for client, timer in list(self._idle.items()):
            if timer.active():
                timer.cancel()
            client.quit()
        self._idle.clear()
        while self.queue:
            self.queue.popleft().fail(0, "4.3.2", "node shutting down", self.name)


def credentials_id(auth: tuple[str, str] | None) -> str | None:
    """
    An identity for credentials that does not reveal the password: the
    user name and a keyed digest of both (a pool key, safe to show).
    """
    if auth is None:
        return None
    digest = hmac.new(_ID_KEY, f"{auth[0]}\0{auth[1]}".encode("utf-8"), hashlib.sha256)
    return f"{auth[0]}#{digest.hexdigest()[:16]}"


# Keys the digests of credentials_id: they mean nothing outside this process.
_ID_KEY = os.urandom(32)


class OutboundManager:
    """All hop pools of a node, created on first use."""

    def __init__(
        self, reactor: Any, timeouts: Outbound, helo_name: str, ca_file: Any = None,
        events: Any = None, auth_penalty: float | None = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        flush: Callable[[list[str], int | None], int] | None = None,
        signer: Signer | None = None,
        tls_reports: Any = None,
    ) -> None:
        """
        @param tls_reports: where sessions under a L{ReportContext} are
            counted (a L{relaynet.delivery.tlsrpt.TLSReports}), or C{None}.
        @param events: where the pools emit C{auth_failed}, C{hop_down},
            C{hop_up} and C{dkim_signed}/C{dkim_unsigned} events (an
            L{relaynet.events.EventLog}), or C{None}.
        @param signer: signs what goes by the routes that sign (L{deliver}'s
            C{dkim}); settable (a reload makes a new one).
        @param auth_penalty: see L{HopPool}.
        @param run_in_thread: see L{HopPool}.
        @param flush: see L{HopState} (the queue runner's; settable later).
        """
        self.reactor = reactor
        self.timeouts = timeouts
        self.helo_name = helo_name
        self.ca_file = ca_file
        self.events = events
        self.auth_penalty = auth_penalty
        self.run_in_thread = run_in_thread
        self.signer = signer
        self.tls_reports = tls_reports
        self.egress_pools: dict[str, EgressPool] = {}
        """The C{[egress]} pools by name (set from the configuration)."""
        self.pools: dict[tuple[Any, ...], HopPool] = {}
        # Per endpoint, shared by its pools; kept across reloads.
        self.hops: dict[str, HopState] = {}
        self.flush = flush
        self.shaper: Shaper | None = None
        """The traffic shaping of C{[shaping]} (L{configure_shaping}), or C{None}."""

    def configure_shaping(self, settings: ShapingSettings | None, share: int = 1) -> None:
        """
        The C{[shaping]} settings of a (new) configuration (C{None}: no
        shaping). Destinations whose key stays keep their state (tokens,
        pause, deferred ids) under the new limits; the pools made from now
        on use them (a reload forgets the pools, L{close_idle}).

        @param share: the worker processes that share the limits
            (C{config.worker_count} in a worker, 1 without workers): each
            allows its fraction of every rate, burst and connection limit.
        """
        if settings is None:
            if self.shaper is not None:
                self.shaper.close()
            self.shaper = None
            return
        if self.shaper is None:
            self.shaper = Shaper(
                settings, self.reactor, self.events,
                lambda ids, limit: self.flush(ids, limit) if self.flush is not None else 0,
                log=HopPool.log, share=share,
            )
        else:
            self.shaper.configure(settings)

    def destination_states(self) -> list[dict[str, Any]]:
        """Every shaped destination's state (for the admin API, status page and metrics)."""
        return self.shaper.snapshot() if self.shaper is not None else []

    def hop(self, endpoint: str) -> HopState:
        """The up/down state of the next hop at C{endpoint}."""
        h = self.hops.get(endpoint)
        if h is None:
            h = self.hops[endpoint] = HopState(
                hop_name(endpoint), self.reactor, self.timeouts.hop_down_time, self.events,
                lambda ids, limit: self.flush(ids, limit) if self.flush is not None else 0,
            )
        h.down_time = self.timeouts.hop_down_time
        return h

    def probe_down_hops(self) -> None:
        """End the down time of every down hop (see L{HopState.probe_now})."""
        for h in self.hops.values():
            h.probe_now()

    def hop_states(self) -> list[dict[str, Any]]:
        """Every known next hop's state (for the admin API and metrics)."""
        return [h.snapshot() for h in self.hops.values()]

    def pool(
        self, endpoint: str, concurrency: int = 20, source_address: str | None = None,
        tls_policy: str = "none", auth: tuple[str, str] | None = None, auth_cleartext: bool = False,
        dkim: bool = False, hop_tls: HopTLS | None = None, tls_report: ReportContext | None = None,
        tls_name: str | None = None, source_pool: str | None = None, destination: Destination | None = None,
    ) -> HopPool:
        """
        The pool for a hop with these settings. Credentials are part of its
        identity (by a digest, never the password itself): other credentials
        for the same hop, after a reload, use other connections.

        @param dkim: its messages are signed (when there is a signer).
        @param hop_tls: what DANE or MTA-STS asks of this host's connections.
        @param tls_report: what its sessions count under in TLS reports.
        @param source_pool: the egress pool its connections leave from.
        @param destination: the shaping destination it delivers to (part of
            its identity: each destination counts its own connections).
        """
        signs = dkim and self.signer is not None
        egress = self.egress_pools.get(source_pool) if source_pool else None
        if self.tls_reports is None:
            tls_report = None
        key = (
            endpoint, source_address, tls_policy, credentials_id(auth), auth_cleartext, signs, hop_tls, tls_report,
            tls_name, egress.name if egress is not None else None,
            destination.key if destination is not None else None,
        )
        p = self.pools.get(key)
        if p is None:
            p = self.pools[key] = HopPool(
                endpoint, self.reactor, self.timeouts, self.helo_name, concurrency, source_address,
                tls_policy, self.ca_file, auth, auth_cleartext, self.auth_penalty, self.events,
                self.run_in_thread, self.hop(endpoint), self.signer if signs else None, hop_tls,
                tls_report, self.tls_reports, tls_name, egress, destination,
            )
        return p

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
        concurrency: int = 20, source_address: str | None = None, tls_policy: str = "none",
        auth: tuple[str, str] | None = None, auth_cleartext: bool = False, dkim: bool = False,
        hop_tls: HopTLS | None = None, tls_report: ReportContext | None = None, tls_name: str | None = None,
        source_pool: str | None = None, destination: Destination | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        """
        Deliver C{entry} to C{recipients} through the hop at C{endpoint}.

        @param auth: the route's C{(username, password)} for SMTP AUTH.
        @param auth_cleartext: the route allows AUTH without TLS.
        @param dkim: the route signs (with L{signer}).
        @param hop_tls: what DANE or MTA-STS asks of the connection.
        @param tls_report: what the session counts under in TLS reports.
        @param tls_name: the name C{tls_policy = "verify"} checks (an MX host's).
        @param source_pool: the C{[egress]} pool the connection leaves from.
        @param destination: the shaping destination (L{shaper}'s), if shaped.
        """
        return self.pool(
            endpoint, concurrency, source_address, tls_policy, auth, auth_cleartext, dkim, hop_tls, tls_report,
            tls_name, source_pool, destination,
        ).submit(entry, recipients)

    def configure_egress(self, specs: Any) -> None:
        """
        The C{[egress]} pools of a (new) configuration: a pool whose
        addresses did not change keeps its spreading and its counts.
        """
        pools = {}
        for spec in specs:
            old = self.egress_pools.get(spec.name)
            same = old is not None and old.addresses == tuple(spec.addresses)
            pools[spec.name] = old if same and old is not None else EgressPool(spec.name, spec.addresses)
        self.egress_pools = pools

    def egress_use(self) -> dict[tuple[str, str], int]:
        """Connections made per C{(pool, source address)} (for metrics)."""
        return {(p.name, a): n for p in self.egress_pools.values() for a, n in p.used.items()}

    def close(self) -> None:
        for p in self.pools.values():
            p.close()
        for h in self.hops.values():
            h.close()
        if self.shaper is not None:
            self.shaper.close()

    def close_idle(self) -> None:
        """Forget the pools (new settings apply to new connections); idle ones QUIT."""
        for p in self.pools.values():
            p.close_idle()
        self.pools = {}

    @property
    def connections_made(self) -> int:
        return sum(p.connections_made for p in self.pools.values())


__all__ = [
    "BodySender", "ChunkSender", "DeliveryResult", "RelayClient", "HopPool", "OutboundManager",
    "reply_status", "Job", "credentials_id", "HopState", "SUSPENDED",
]
