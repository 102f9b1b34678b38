# -*- test-case-name: tests.test_mtasts -*-
"""
MTA-STS (RFC 8461): which MX hosts of a domain may be used, and with what
TLS, as the domain publishes it.

The rules followed, by section of RFC 8461:

 - 3.1 The TXT record at C{_mta-sts.<domain>}: the strings of one record
   are joined; records that do not begin with C{v=STSv1} are discarded; if
   not exactly one record is left, or it does not match the ABNF (fields
   C{name=value} separated by C{;} with optional white space, an C{id} of
   1 to 32 letters and digits), the domain has no live policy.
 - 3.2 The policy: C{key: value} lines ended by LF or CRLF; C{version}
   must be C{STSv1}, C{mode} one of C{enforce}, C{testing}, C{none}
   (case-sensitive, the ABNF's C{%s}); C{max_age} 0 to 31557600 seconds;
   one C{mx} line per pattern, at least one unless the mode is C{none};
   unknown keys are ignored; a repeated C{version}, C{mode} or C{max_age}
   is an error (the policy is ambiguous). Blank lines are tolerated.
 - 3.3 The fetch: C{GET https://mta-sts.<domain>/.well-known/mta-sts.txt}
   with Twisted's L{Agent}; the certificate must chain to a trusted root
   (the platform's, or a configured CA file for labs) and name
   C{mta-sts.<domain>}; only 200 is a policy, 3xx redirects are not
   followed, no HTTP caching; C{Content-Type} must be C{text/plain}
   (parameters allowed); the body is limited to 64 KiB (the transfer is
   aborted beyond) and the whole fetch to a timeout (one minute by
   default). The policy host's name is resolved by the node's own DNS
   resolver (A, then AAAA), never by the system's.
 - 3.3, 5.1 Discovery: a fresh cached policy whose id equals the TXT id is
   used without a fetch; a new id (or no cached policy) is fetched; if the
   fetch fails, a fresh cached policy is used, else the domain is treated
   as having none. A TXT record that disappeared does not end a fresh
   cached policy: it is used until C{max_age} runs out.
 - 3.3 Proactive refresh: L{MTASTS.refresh_cached} fetches again each
   cached policy older than a day (the node runs it from a timer).
 - Rate limit (advice of the MTA-STS drafts, "five minutes or longer per
   version ID"): after a failed fetch the same id is not fetched again for
   L{FETCH_RETRY} seconds, so that a dead policy host does not hold every
   delivery for the fetch timeout.
 - 4.1 MX patterns: an exact name, or C{*.} plus a name where C{*} stands
   for exactly one whole left-most label; compared case-insensitively,
   trailing dots ignored.
 - 5 Application (L{host_requirement}): C{enforce}: a host that matches no
   pattern is not used (no usable host: defer 4.7.5), and a used host needs
   STARTTLS and a certificate valid for its MX name (WebPKI); C{testing}:
   the same checks, reported only; C{none}: nothing.

Failures are kept with their RFC 8460 result type
(C{sts-policy-fetch-error}, C{sts-policy-invalid}, C{sts-webpki-invalid})
for TLS reporting.

A changed TXT id with a fresh cached policy: the new policy is fetched
before the delivery goes on (RFC 8461 5.1 "tryGetNewPolicy" comes before
the cache), because a new id usually comes with new MX hosts that the old
policy would refuse; concurrent callers share the fetch, and a failure
falls back to the cached policy. C{background_refresh=True} instead
answers with the cached policy at once and fetches behind it.

The cache is one JSON file per policy domain in a directory (format in
L{PolicyCache}), written atomically in a thread, read lazily in a thread.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import idna
from attrs import frozen
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from relaynet.delivery.mx import DNS_TIMEOUT, NEGATIVE_TTL
from relaynet.queue.spool import write_file_durably

_T = TypeVar("_T")

Mode = Literal["enforce", "testing", "none"]

MAX_AGE_LIMIT = 31557600
"""The largest C{max_age} (RFC 8461 3.2): a year of 365.25 days."""

MAX_POLICY_SIZE = 64 * 1024
"""The largest policy body fetched (RFC 8461 3.3 suggests 64 KB)."""

FETCH_TIMEOUT = 60.0
"""Seconds for a whole policy fetch, connect to last byte (RFC 8461 3.3)."""

FETCH_RETRY = 300.0
"""Seconds before an id whose fetch failed is fetched again."""

REFRESH_INTERVAL = 86400.0
"""Age after which L{MTASTS.refresh_cached} fetches a cached policy again (RFC 8461 3.3: daily)."""

POLICY_PATH = "/.well-known/mta-sts.txt"

FETCH_ERROR = "sts-policy-fetch-error"
"""RFC 8460 result type: the policy could not be retrieved."""

POLICY_INVALID = "sts-policy-invalid"
"""RFC 8460 result type: what was retrieved is not a valid policy."""

WEBPKI_INVALID = "sts-webpki-invalid"
"""RFC 8460 result type: the policy host's certificate did not validate."""

VALIDATION_FAILURE = "validation-failure"
"""RFC 8460 result type used for an MX host that matches no pattern."""

ENFORCE_DSN = "4.7.5"
"""The status of a message deferred because no MX host satisfies an enforce policy."""

_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_TXT_DELIM = re.compile(r"[ \t]*;[ \t]*")
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_POLICY_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?\Z")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


class PolicyError(ValueError):
    """A TXT record or policy text that does not follow RFC 8461; the message says why."""


class FetchError(Exception):
    """
    A policy could not be fetched or was not a policy.

    @ivar result_type: the RFC 8460 result type (L{FETCH_ERROR},
        L{POLICY_INVALID} or L{WEBPKI_INVALID}).
    @ivar detail: what happened, for logs and the report's
        C{failure-reason-code}.
    """

    def __init__(self, result_type: str, detail: str) -> None:
        super().__init__(f"{result_type}: {detail}")
        self.result_type = result_type
        self.detail = detail


# -- the pure part ------------------------------------------------------------


def _host_name(name: str) -> str | None:
    """C{name} lower case without a trailing dot if it is a DNS host name, else C{None}."""
    name = name.lower()
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return None
    if all(_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def normalise_domain(domain: str) -> str | None:
    """
    A policy domain as used in names and file names: IDNA A-labels, lower
    case, no trailing dot; C{None} if C{domain} is not a host name.
    """
    domain = domain.strip()
    domain = domain.removesuffix(".")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    return _host_name(domain)


def parse_sts_txt(records: Iterable[str]) -> str | None:
    """
    The policy id of the MTA-STS TXT records of a domain (RFC 8461 3.1).

    @param records: each TXT record at C{_mta-sts.<domain>}, its strings
        already joined.
    @return: the C{id}, or C{None} if not exactly one record begins with
        C{v=STSv1} or that record is not valid.
    """
    sts = [r for r in records if re.match(r"v=STSv1(?:[ \t]*;|[ \t]*\Z)", r)]
    if len(sts) != 1:
        return None
    try:
        return _sts_id(sts[0])
    except PolicyError:
        return None


def _sts_id(record: str) -> str:
    """The id of one C{v=STSv1} record, or raises L{PolicyError}."""
    fields = _TXT_DELIM.split(record.rstrip(" \t"))
    if fields and fields[-1] == "":
        fields.pop()  # a final ";" is allowed
    if fields[0] != "v=STSv1" or len(fields) < 2:
        raise PolicyError(f"not an STSv1 record: {record!r}")
    found: str | None = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            raise PolicyError(f"bad field {field!r}")
        if name == "id":
            if found is not None:
                raise PolicyError("more than one id")
            if not _ID.match(value):
                raise PolicyError(f"bad id {value!r}: 1 to 32 letters and digits")
            found = value
    if found is None:
        raise PolicyError("no id")
    return found


@frozen
class Policy:
    """
    A parsed MTA-STS policy (RFC 8461 3.2).

    @ivar mode: C{"enforce"}, C{"testing"} or C{"none"}.
    @ivar max_age: seconds the policy may be cached from its fetch.
    @ivar mx: the MX patterns, lower case, without trailing dots.
    @ivar text: the policy as fetched (for the cache and for TLS reports'
        C{policy-string}).
    """

    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    text: str = ""

    def matches(self, mx_host: str) -> bool:
        """
        Whether C{mx_host} matches one of the patterns (RFC 8461 4.1): an
        exact name, or C{*.suffix} where C{*} is exactly one left-most
        label. Case and a trailing dot do not matter.
        """
        host = mx_host.lower()
        host = host.removesuffix(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_policy(text: str) -> Policy:
    """
    Parse a policy body (RFC 8461 3.2).

    @param text: the body, lines ended by LF or CRLF.
    @return: the L{Policy}, its C{text} being C{text}.
    @raise PolicyError: the body is not a valid STSv1 policy; the message
        names the line.
    """
    single: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        key, colon, value = line.partition(":")
        if not colon or not _POLICY_KEY.match(key):
            raise PolicyError(f"line {number}: expected 'key: value', got {line!r}")
        value = value.strip(" \t")
        if not _POLICY_VALUE.match(value):
            raise PolicyError(f"line {number}: bad value for {key}: {value!r}")
        if key == "mx":
            pattern = value.lower()
            pattern = pattern.removesuffix(".")
            base = pattern.removeprefix("*.")
            if _host_name(base) != base or not base:
                raise PolicyError(f"line {number}: bad mx pattern {value!r}")
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            if key in single:
                raise PolicyError(f"line {number}: {key} given twice")
            single[key] = value
    if "version" not in single:
        raise PolicyError("no version")
    if single["version"] != "STSv1":
        raise PolicyError(f"version {single['version']!r} is not STSv1")
    mode = single.get("mode")
    if mode is None:
        raise PolicyError("no mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    raw_age = single.get("max_age")
    if raw_age is None:
        raise PolicyError("no max_age")
    if not re.fullmatch(r"[0-9]{1,10}", raw_age):
        raise PolicyError(f"max_age {raw_age!r} is not a number of seconds")
    max_age = int(raw_age)
    if max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age} is over {MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise PolicyError(f"no mx pattern in mode {mode}")
    return Policy(mode=mode, max_age=max_age, mx=tuple(mx), text=text)  # type: ignore[arg-type]


@frozen
class HostRequirement:
    """
    What a policy asks of one MX host (RFC 8461 section 5).

    @ivar usable: whether the host may be used at all (C{False}: an enforce
        policy whose patterns it does not match; skip it, and if no host is
        usable defer with L{ENFORCE_DSN}).
    @ivar verify_name: the name the certificate must be valid for (the MX
        host name, against the WebPKI trust), or C{None}: no check.
    @ivar require_tls: STARTTLS is required (no STARTTLS, a failed handshake
        or a certificate not valid for C{verify_name}: do not deliver to it).
    @ivar report_only: C{testing} mode: check C{verify_name} and STARTTLS,
        report failures, deliver anyway.
    @ivar reason: a sentence for logs and events.
    @ivar failure: an RFC 8460 result type when the host already fails the
        policy (no pattern matched), else C{None}.
    """

    usable: bool
    verify_name: str | None
    require_tls: bool
    report_only: bool
    reason: str
    failure: str | None = None


def host_requirement(policy: Policy | None, mx_host: str) -> HostRequirement:
    """
    Whether C{mx_host} may be used under C{policy} and what TLS it needs.

    @param policy: the domain's policy, or C{None} when it has none.
    @param mx_host: the MX host name (not an address).
    """
    host = mx_host.lower().rstrip(".")
    if policy is None:
        return HostRequirement(True, None, False, False, "no MTA-STS policy")
    if policy.mode == "none":
        return HostRequirement(True, None, False, False, "MTA-STS mode none")
    matched = policy.matches(host)
    if policy.mode == "enforce":
        if not matched:
            return HostRequirement(
                False, None, True, False,
                f"MX host {host} matches no MTA-STS pattern ({', '.join(policy.mx)})",
                VALIDATION_FAILURE,
            )
        return HostRequirement(True, host, True, False, f"MTA-STS enforce: TLS verified for {host}")
    if not matched:
        return HostRequirement(
            True, host, False, True,
            f"MX host {host} matches no MTA-STS pattern ({', '.join(policy.mx)}); testing mode, reported only",
            VALIDATION_FAILURE,
        )
    return HostRequirement(True, host, False, True, f"MTA-STS testing: TLS for {host} checked, reported only")


# -- fetching -----------------------------------------------------------------


def load_trust(ca_file: Path | str | None) -> Any:
    """
    The trust root for policy hosts: the certificates of C{ca_file} (PEM,
    for labs and tests), or the platform's trust store.

    @raise PolicyError: C{ca_file} cannot be read or holds no certificate.
    """
    if ca_file is None:
        return ssl.platformTrust()
    try:
        pem = Path(ca_file).read_bytes()
    except OSError as e:
        raise PolicyError(f"cannot read CA file {ca_file}: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    try:
        certs = [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise PolicyError(f"cannot load CA file {ca_file}: {e}") from None
    if not certs:
        raise PolicyError(f"no certificate in CA file {ca_file}")
    return ssl.trustRootFromCertificates(certs)


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    """
    TLS to C{host}: its addresses from a L{twisted.names} resolver (A, then
    AAAA), tried in turn; SNI and certificate check for C{host}.
    """

    def __init__(
        self, reactor: IReactorTCP, resolver: Any, host: str, port: int,
        creator: IOpenSSLClientConnectionCreator, dns_timeout: tuple[float, ...],
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._creator = creator
        self._dns_timeout = dns_timeout

    @inlineCallbacks
    def _addresses(self) -> Generator[Deferred[Any], Any, list[tuple[int, str]]]:
        out: list[tuple[int, str]] = []
        errors: list[str] = []
        for qtype, method in ((dns.A, "lookupAddress"), (dns.AAAA, "lookupIPV6Address")):
            try:
                answers, _, _ = yield getattr(self._resolver, method)(self._host, self._dns_timeout)
            except defer.CancelledError:
                raise
            except Exception as e:
                errors.append(f"{dns.QUERY_TYPES.get(qtype, qtype)}: {type(e).__name__}")
                continue
            for a in answers:
                if a.type == qtype:
                    family = socket.AF_INET if qtype == dns.A else socket.AF_INET6
                    out.append((qtype, socket.inet_ntop(family, a.payload.address)))
        if not out:
            raise DNSLookupError(f"no address for {self._host} ({'; '.join(errors) or 'no A or AAAA record'})")
        return out

    @inlineCallbacks
    def _connect(self, factory: Any) -> Generator[Deferred[Any], Any, Any]:
        addresses = yield self._addresses()
        last: BaseException | None = None
        for qtype, address in addresses:
            tcp: IStreamClientEndpoint
            if qtype == dns.A:
                tcp = TCP4ClientEndpoint(self._reactor, address, self._port)
            else:
                tcp = TCP6ClientEndpoint(self._reactor, address, self._port)
            try:
                protocol = yield wrapClientTLS(self._creator, tcp).connect(factory)
            except ConnectError as e:
                last = e
                continue
            return protocol
        assert last is not None
        raise last

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Connect C{protocolFactory} over TLS to the first address that answers."""
        return self._connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class _PolicyHostEndpoints:
    """Endpoints for the L{Agent}: only C{https://mta-sts.<domain>/...}."""

    def __init__(self, fetcher: PolicyFetcher) -> None:
        self._fetcher = fetcher

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if uri.scheme != b"https" or not host.startswith("mta-sts."):
            raise FetchError(FETCH_ERROR, f"refusing to connect to {uri.toBytes()!r}")
        f = self._fetcher
        creator = ssl.optionsForClientTLS(
            host, trustRoot=f.trust, extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )
        return _ResolvedTLSEndpoint(f.reactor, f.resolver, host, f.port, creator, f.dns_timeout)


class _BodyCollector(Protocol):
    """Collects a response body up to C{limit} bytes, else stops the transfer."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done.errback(FetchError(FETCH_ERROR, f"policy body larger than {self._limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class _Discard(Protocol):
    """Stops the transfer of a body we do not want."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _tls_failure(failure: Failure) -> str | None:
    """The TLS error inside an Agent failure, if any (certificate, name, handshake)."""
    pending = [failure.value]
    while pending:
        e = pending.pop()
        if isinstance(e, (SSL.Error, VerificationError)):
            return f"{type(e).__name__}: {e}"
        if isinstance(e, Failure):
            pending.append(e.value)
        for r in getattr(e, "reasons", None) or ():
            pending.append(r.value if isinstance(r, Failure) else r)
    return None


class PolicyFetcher:
    """
    Fetches C{https://mta-sts.<domain>/.well-known/mta-sts.txt} (RFC 8461 3.3).

    @ivar reactor: connects (L{IReactorTCP}).
    @ivar resolver: a L{twisted.names} resolver (as
        L{relaynet.delivery.attempt.system_resolver} returns) for the
        policy host's addresses.
    @ivar trust: the trust root (L{load_trust}).
    @ivar port: the HTTPS port (443; labs and tests use another).
    """

    log = Logger()

    def __init__(
        self, reactor: Any, resolver: Any, trust: Any = None, port: int = 443,
        timeout: float = FETCH_TIMEOUT, clock: IReactorTime | None = None,
        max_size: int = MAX_POLICY_SIZE, dns_timeout: tuple[float, ...] = DNS_TIMEOUT,
    ) -> None:
        """
        @param trust: from L{load_trust}; C{None}: the platform's trust store.
        @param timeout: seconds for the whole fetch.
        @param clock: times the fetch (default: C{reactor}).
        @param max_size: the largest body accepted, in bytes.
        """
        self.reactor = reactor
        self.resolver = resolver
        self.trust = trust if trust is not None else ssl.platformTrust()
        self.port = port
        self.timeout = timeout
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.max_size = max_size
        self.dns_timeout = dns_timeout
        self._agent = Agent.usingEndpointFactory(
            reactor, _PolicyHostEndpoints(self), pool=HTTPConnectionPool(reactor, persistent=False),
        )

    def fetch(self, domain: str) -> Deferred[Policy]:
        """
        Fetch and parse the policy of C{domain} (normalised, see
        L{normalise_domain}).

        @return: a Deferred firing with the L{Policy}, or failing with
            L{FetchError}.
        """
        url = f"https://mta-sts.{domain}{POLICY_PATH}"
        d = self._get(url)

        def timed_out(result: object, timeout: float) -> object:
            # Whatever the cancelled step failed with (CancelledError,
            # ConnectingCancelledError, ...), it was the timeout.
            raise FetchError(FETCH_ERROR, f"{url}: no complete answer within {timeout:g} s")

        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=timed_out)

        def classify(failure: Failure) -> Failure:
            if failure.check(FetchError):
                return failure
            if (tls := _tls_failure(failure)) is not None:
                error = FetchError(WEBPKI_INVALID, f"{url}: {tls}")
            else:
                error = FetchError(FETCH_ERROR, f"{url}: {_describe(failure)}")
            return Failure(error)

        d.addErrback(classify)
        return d

    @inlineCallbacks
    def _get(self, url: str) -> Generator[Deferred[Any], Any, Policy]:
        response: IResponse = yield self._agent.request(
            b"GET", url.encode("ascii"),
            Headers({b"user-agent": [b"relaynet MTA-STS"], b"accept": [b"text/plain"]}),
        )
        if response.code != 200:
            location = response.headers.getRawHeaders(b"location") or [b""]
            response.deliverBody(_Discard())
            if 300 <= response.code < 400:
                raise FetchError(FETCH_ERROR, (
                    f"{url}: HTTP {response.code} redirect to {location[0].decode('latin-1')!r}"
                    " not followed (RFC 8461 3.3)"
                ))
            raise FetchError(FETCH_ERROR, f"{url}: HTTP {response.code}, not 200")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "text/plain":
            response.deliverBody(_Discard())
            raise FetchError(POLICY_INVALID, f"{url}: Content-Type {ctype!r}, not text/plain")
        if response.length is not UNKNOWN_LENGTH and int(response.length) > self.max_size:
            response.deliverBody(_Discard())
            raise FetchError(FETCH_ERROR, f"{url}: policy body of {response.length} bytes, over {self.max_size}")
        done: Deferred[bytes] = Deferred(lambda _: collector.transport.stopProducing())  # type: ignore[union-attr]
        collector = _BodyCollector(done, self.max_size)
        response.deliverBody(collector)
        body: bytes = yield done
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FetchError(POLICY_INVALID, f"{url}: not UTF-8 ({e.reason} at {e.start})") from None
        try:
            return parse_policy(text)
        except PolicyError as e:
            raise FetchError(POLICY_INVALID, f"{url}: {e}") from None


def _describe(failure: Failure) -> str:
    e = failure.value
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) if isinstance(r, Failure) else str(r) for r in reasons)
    return f"{type(e).__name__}: {e}"


# -- the cache ----------------------------------------------------------------


@frozen
class CachedPolicy:
    """
    A policy as kept on disk.

    @ivar domain: the policy domain.
    @ivar policy_id: the TXT id the policy was fetched for.
    @ivar policy: the parsed policy (its C{text} is what is stored).
    @ivar fetched: when it was fetched (the clock's seconds, POSIX time in production).
    @ivar expires: C{fetched + max_age}.
    """

    domain: str
    policy_id: str
    policy: Policy
    fetched: float
    expires: float

    def to_json(self) -> bytes:
        """The file's content."""
        return json.dumps({
            "format": 1, "domain": self.domain, "id": self.policy_id, "policy": self.policy.text,
            "fetched": self.fetched, "expires": self.expires,
        }, indent=1, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> CachedPolicy:
        """
        Read a file's content.

        @raise PolicyError: it is not a cache file of format 1 or its policy
            no longer parses.
        """
        try:
            raw = json.loads(data.decode("utf-8"))
            if raw["format"] != 1:
                raise PolicyError(f"unknown format {raw['format']!r}")
            return cls(
                domain=str(raw["domain"]), policy_id=str(raw["id"]), policy=parse_policy(str(raw["policy"])),
                fetched=float(raw["fetched"]), expires=float(raw["expires"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise PolicyError(f"bad cache file: {e}") from None


def _in_thread(reactor: Any) -> Callable[[Callable[[], Any]], Deferred[Any]]:
    def run(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    return run


class PolicyCache:
    """
    One JSON file per policy domain, C{<directory>/<domain>.json}::

        {"domain": "example.com", "expires": 1767225600.0, "fetched": 1766620800.0,
         "format": 1, "id": "20260101T000000", "policy": "version: STSv1\\r\\n..."}

    written as the spool writes envelopes (a temporary file, fsync, rename,
    fsync of the directory), always in a thread. Writes for one domain are
    applied in order.

    @param directory: e.g. C{<spool>/mta-sts}; made when first written.
    @param run_in_thread: runs a blocking callable, returns a Deferred of its result.
    """

    log = Logger()

    def __init__(self, directory: Path, run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]) -> None:
        self.directory = Path(directory)
        self._run = run_in_thread
        self._last_write: dict[str, Deferred[None]] = {}

    def run_in_thread(self, work: Callable[[], _T]) -> Deferred[_T]:
        """Run blocking C{work} as this cache does (in a thread)."""
        return self._run(work)

    def domains(self) -> list[str]:
        """The domains with a cache file (blocking: call it in a thread)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")]

    def path(self, domain: str) -> Path:
        """The file of C{domain} (a normalised domain: letters, digits, C{-}, C{.})."""
        return self.directory / f"{domain}.json"

    def load(self, domain: str) -> Deferred[CachedPolicy | None]:
        """
        The cached policy of C{domain}, expired or not, or C{None} (no file,
        or a file that does not parse: logged, then ignored).
        """
        path = self.path(domain)

        def read() -> CachedPolicy | None:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            entry = CachedPolicy.from_json(data)
            if entry.domain != domain:
                raise PolicyError(f"file is for {entry.domain}")
            return entry

        def bad(failure: Failure) -> None:
            self.log.warn("MTA-STS cache file {path} ignored: {why}", path=str(path), why=failure.getErrorMessage())
            return None

        d: Deferred[CachedPolicy | None] = maybeDeferred(self._run, read)
        d.addErrback(bad)
        return d

    def store(self, entry: CachedPolicy) -> Deferred[None]:
        """Write C{entry} durably, after any earlier write for its domain."""
        data = entry.to_json()
        return self._chain(entry.domain, lambda: self._write(entry.domain, data))

    def discard(self, domain: str) -> Deferred[None]:
        """Remove the file of C{domain} (an expired policy), if any."""

        def remove() -> None:
            try:
                self.path(domain).unlink()
            except FileNotFoundError:
                pass

        return self._chain(domain, remove)

    def _chain(self, domain: str, work: Callable[[], None]) -> Deferred[None]:
        """Run C{work} in a thread after the domain's earlier work; its own outcome only."""
        result: Deferred[None] = Deferred()
        previous = self._last_write.get(domain)
        link: Deferred[None] = Deferred()
        self._last_write[domain] = link

        def step() -> None:
            inner: Deferred[None] = maybeDeferred(self._run, work)

            def fire(outcome: object) -> None:
                if self._last_write.get(domain) is link:
                    del self._last_write[domain]
                link.callback(None)
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(None)

            inner.addBoth(fire)

        if previous is None:
            step()
        else:
            previous.addCallback(lambda _: step())
        return result

    def _write(self, domain: str, data: bytes) -> None:
        write_file_durably(self.path(domain), data)


# -- the manager ----------------------------------------------------------------


@frozen
class Failed:
    """
    Why no new policy could be had for a domain, for TLS reports (RFC 8460).

    @ivar result_type: L{FETCH_ERROR}, L{POLICY_INVALID} or L{WEBPKI_INVALID}.
    @ivar detail: what happened.
    @ivar policy_id: the TXT id whose policy was wanted.
    @ivar when: the clock's seconds at the failure.
    """

    result_type: str
    detail: str
    policy_id: str
    when: float


Source = Literal["cache", "fetched", "none"]


@frozen
class PolicyState:
    """
    The MTA-STS policy to apply to a delivery for C{domain}.

    @ivar policy: the policy, or C{None}: deliver as if the domain had none.
    @ivar source: C{"fetched"} (just now), C{"cache"} or C{"none"}.
    @ivar policy_id: the id of C{policy} (C{None} without one).
    @ivar expires: when C{policy} expires (C{None} without one).
    @ivar failure: the last failed fetch for the domain's current TXT id, if
        any (then C{policy} is the cached one, or C{None}).
    """

    domain: str
    policy: Policy | None
    source: Source
    policy_id: str | None = None
    expires: float | None = None
    failure: Failed | None = None

    def requirement(self, mx_host: str) -> HostRequirement:
        """L{host_requirement} for C{mx_host} under this state's policy."""
        return host_requirement(self.policy, mx_host)


@frozen
class _TXTAnswer:
    policy_id: str | None
    expires: float


class MTASTS:
    """
    MTA-STS policies for MX delivery: TXT lookup, fetch, cache (RFC 8461
    sections 3 and 5; the choices are in the module docstring).

    @param resolver: a L{twisted.names} resolver (the node's, as
        L{relaynet.delivery.attempt.system_resolver} returns), for the
        C{_mta-sts} TXT records and the policy host's addresses.
    @param cache_dir: where the cache files are (e.g. C{<spool>/mta-sts}).
    @param reactor: connects, runs threads; its clock unless C{clock} is given.
    @param ca_file: trust only these CAs for policy hosts (labs, tests);
        C{None}: the platform's trust store.
    @param port: the policy hosts' HTTPS port.
    @param timeout: seconds for a whole fetch.
    @param clock: time for expiry, TTLs and timeouts.
    @param run_in_thread: runs blocking file work; default: the reactor's thread pool.
    @param fetcher: replaces the HTTPS fetcher (C{fetch(domain) ->
        Deferred[Policy]} failing with L{FetchError}).
    @param background_refresh: with a fresh cached policy and a new TXT id,
        answer with the cached policy at once and fetch behind it.
    @param retry_after: seconds before a failed id is fetched again.
    @raise PolicyError: C{ca_file} cannot be loaded.
    """

    log = Logger()

    def __init__(
        self, resolver: Any, cache_dir: Path, reactor: Any, ca_file: Path | str | None = None,
        port: int = 443, timeout: float = FETCH_TIMEOUT, clock: IReactorTime | None = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        fetcher: Any = None, background_refresh: bool = False, retry_after: float = FETCH_RETRY,
        dns_timeout: tuple[float, ...] = DNS_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.fetcher = fetcher if fetcher is not None else PolicyFetcher(
            reactor, resolver, load_trust(ca_file), port=port, timeout=timeout, clock=self.clock,
            dns_timeout=dns_timeout,
        )
        self.cache = PolicyCache(cache_dir, run_in_thread or _in_thread(reactor))
        self.background_refresh = background_refresh
        self.retry_after = retry_after
        self.dns_timeout = dns_timeout
        self._memory: dict[str, CachedPolicy | None] = {}
        self._txt: dict[str, _TXTAnswer] = {}
        self._failures: dict[str, Failed] = {}
        self._waiting: dict[str, list[Deferred[PolicyState]]] = {}
        self._fetching: dict[str, Deferred[PolicyState]] = {}
        self.fetches = 0
        """How many fetches were started (for tests and metrics)."""

    def policy_for(self, domain: str) -> Deferred[PolicyState]:
        """
        The policy to apply to a delivery to C{domain}'s MX hosts. Never
        fails; concurrent calls for one domain share one lookup and fetch.
        """
        name = normalise_domain(domain)
        if name is None:
            return defer.succeed(PolicyState(domain, None, "none"))
        d: Deferred[PolicyState] = Deferred()
        waiters = self._waiting.get(name)
        if waiters is not None:
            waiters.append(d)
            return d
        self._waiting[name] = [d]

        def unexpected(failure: Failure) -> PolicyState:
            self.log.failure("MTA-STS lookup for {domain} failed", failure, domain=name)
            return PolicyState(name, None, "none")

        def answer(state: PolicyState) -> None:
            for waiter in self._waiting.pop(name):
                waiter.callback(state)

        work = self._resolve(name)
        work.addErrback(unexpected)
        work.addCallback(answer)
        return d

    def _state(
        self, domain: str, cached: CachedPolicy | None, source: Source = "cache", failure: Failed | None = None,
    ) -> PolicyState:
        if cached is None:
            return PolicyState(domain, None, "none", failure=failure)
        return PolicyState(domain, cached.policy, source, cached.policy_id, cached.expires, failure)

    @inlineCallbacks
    def _resolve(self, domain: str) -> Generator[Deferred[Any], Any, PolicyState]:
        cached = yield self._cached(domain)
        txt = yield self._lookup_txt(domain)
        if txt.policy_id is None:
            # No live policy (RFC 8461 3.3: a fresh cached one still applies).
            return self._state(domain, cached)
        if cached is not None and cached.policy_id == txt.policy_id:
            self._failures.pop(domain, None)
            return self._state(domain, cached)
        failed = self._failures.get(domain)
        if (
            failed is not None and failed.policy_id == txt.policy_id
            and self.clock.seconds() < failed.when + self.retry_after
        ):
            return self._state(domain, cached, failure=failed)
        fetching = self._fetch(domain, txt.policy_id)
        if cached is not None and self.background_refresh:
            return self._state(domain, cached)
        state: PolicyState = yield _copy(fetching)
        return state

    def _cached(self, domain: str) -> Deferred[CachedPolicy | None]:
        """The domain's cached policy if fresh (read from disk the first time)."""
        if domain in self._memory:
            return defer.succeed(self._fresh(domain, self._memory[domain]))

        def loaded(entry: CachedPolicy | None) -> CachedPolicy | None:
            if domain not in self._memory:  # a fetch may have stored one meanwhile
                self._memory[domain] = entry
            return self._fresh(domain, self._memory[domain])

        return self.cache.load(domain).addCallback(loaded)

    def _fresh(self, domain: str, entry: CachedPolicy | None) -> CachedPolicy | None:
        if entry is not None and entry.expires <= self.clock.seconds():
            self.log.info(
                "MTA-STS policy of {domain} (id {id}) expired", domain=domain, id=entry.policy_id,
            )
            self._memory[domain] = None
            self.cache.discard(domain).addErrback(
                lambda f: self.log.failure("cannot remove expired MTA-STS policy", f)
            )
            return None
        return entry

    @inlineCallbacks
    def _lookup_txt(self, domain: str) -> Generator[Deferred[Any], Any, _TXTAnswer]:
        """The TXT id at C{_mta-sts.<domain>}, cached for the records' TTL."""
        now = self.clock.seconds()
        hit = self._txt.get(domain)
        if hit is not None and hit.expires > now:
            return hit
        name = f"_mta-sts.{domain}"
        try:
            answers, authority, _ = yield self.resolver.lookupText(name, self.dns_timeout)
        except Exception as e:
            from twisted.names import error

            if isinstance(e, (error.DNSNameError, error.AuthoritativeDomainError)):
                answer = _TXTAnswer(None, now + NEGATIVE_TTL)
                self._txt[domain] = answer
                return answer
            # A transient error: not cached, treated as "no live policy".
            self.log.info("MTA-STS TXT lookup {name} failed: {why}", name=name, why=type(e).__name__)
            return _TXTAnswer(None, now)
        records = [a for a in answers if a.type == dns.TXT]
        texts = [b"".join(a.payload.data).decode("utf-8", "replace") for a in records]
        if records:
            ttl = float(min(a.ttl for a in records))
        else:
            ttl = min([NEGATIVE_TTL] + [float(min(a.ttl, a.payload.minimum)) for a in authority if a.type == dns.SOA])
        answer = _TXTAnswer(parse_sts_txt(texts), now + min(ttl, 86400.0))
        self._txt[domain] = answer
        return answer

    def _fetch(self, domain: str, policy_id: str) -> Deferred[PolicyState]:
        """Fetch (once at a time per domain) and cache the policy for C{policy_id}."""
        running = self._fetching.get(domain)
        if running is not None:
            return running
        self.fetches += 1
        d = self._fetch_and_store(domain, policy_id)
        self._fetching[domain] = d

        def finished(result: Any) -> Any:
            del self._fetching[domain]
            return result

        d.addBoth(finished)
        return d

    @inlineCallbacks
    def _fetch_and_store(self, domain: str, policy_id: str) -> Generator[Deferred[Any], Any, PolicyState]:
        try:
            policy: Policy = yield self.fetcher.fetch(domain)
        except Exception as raised:
            if isinstance(raised, FetchError):
                e = raised
            else:
                self.log.failure("MTA-STS fetch for {domain} went wrong", domain=domain)
                e = FetchError(FETCH_ERROR, f"{type(raised).__name__}: {raised}")
            now = self.clock.seconds()
            failed = self._failures[domain] = Failed(e.result_type, e.detail, policy_id, now)
            cached = self._fresh(domain, self._memory.get(domain))
            # RFC 8461 3.3: alert on a failed refresh unless the cached mode is none.
            if cached is None or cached.policy.mode != "none":
                self.log.warn(
                    "MTA-STS policy fetch for {domain} (id {id}) failed: {result_type}: {detail}",
                    domain=domain, id=policy_id, result_type=e.result_type, detail=e.detail,
                )
            return self._state(domain, cached, failure=failed)
        now = self.clock.seconds()
        entry = CachedPolicy(domain, policy_id, policy, now, now + policy.max_age)
        self._memory[domain] = entry
        self._failures.pop(domain, None)
        try:
            yield self.cache.store(entry)
        except Exception:
            # The policy applies anyway; it is only not kept over a restart.
            self.log.failure("cannot write the MTA-STS cache for {domain}", domain=domain)
        return self._state(domain, entry, "fetched")

    @inlineCallbacks
    def refresh_cached(self, interval: float = REFRESH_INTERVAL) -> Generator[Deferred[Any], Any, list[PolicyState]]:
        """
        Proactive refresh (RFC 8461 3.3: "MTAs SHOULD proactively refresh
        cached policies before they expire", once a day): every cached
        policy fetched more than C{interval} seconds ago whose domain still
        publishes a TXT record is fetched again, one domain at a time (a
        failure keeps the cached policy, as in L{policy_for}). The node calls
        this from a timer, e.g. hourly.

        @return: a Deferred firing with the states of the domains fetched.
        """
        listed: list[str] = yield maybeDeferred(self.cache.run_in_thread, self.cache.domains)
        done: list[PolicyState] = []
        for domain in sorted(set(listed) | {d for d, e in self._memory.items() if e is not None}):
            cached = yield self._cached(domain)
            if cached is None or cached.fetched + interval > self.clock.seconds():
                continue
            self._txt.pop(domain, None)  # ask DNS now, not from the TTL cache
            txt = yield self._lookup_txt(domain)
            failed = self._failures.get(domain)
            if txt.policy_id is None or (
                failed is not None and failed.policy_id == txt.policy_id
                and self.clock.seconds() < failed.when + self.retry_after
            ):
                continue
            state = yield _copy(self._fetch(domain, txt.policy_id))
            done.append(state)
        return done


def _copy(d: Deferred[_T]) -> Deferred[_T]:
    """A Deferred firing with C{d}'s result, without taking it from C{d}'s other users."""
    out: Deferred[_T] = Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(relay)
    return out


__all__ = [
    "CachedPolicy", "ENFORCE_DSN", "FETCH_ERROR", "FETCH_RETRY", "FETCH_TIMEOUT", "Failed", "FetchError",
    "HostRequirement", "MAX_AGE_LIMIT", "MAX_POLICY_SIZE", "MTASTS", "POLICY_INVALID", "Policy",
    "PolicyCache", "PolicyError", "PolicyFetcher", "PolicyState", "REFRESH_INTERVAL", "VALIDATION_FAILURE",
    "WEBPKI_INVALID",
    "host_requirement", "load_trust", "normalise_domain", "parse_policy", "parse_sts_txt",
]
