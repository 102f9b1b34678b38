# -*- test-case-name: tests.test_tlsrpt -*-
"""
SMTP TLS Reporting (RFC 8460): what MX delivery saw of each policy
domain's TLS, counted per UTC day, written as the RFC's JSON report and
sent to the domain's C{rua} addresses.

The rules followed, by section of RFC 8460:

 - 3 The TXT record at C{_smtp._tls.<policy domain>} (L{parse_tlsrpt_txt}):
   the strings of one record are joined; records whose first field is not
   C{v=TLSRPTv1} are discarded (so C{v=TLSRPTv10} is another record); if not exactly one is left, the domain
   does not take reports. Fields are C{name=value} separated by C{;} with
   optional white space; C{rua} is required, a comma-separated list of
   URIs; unknown fields (C{name} of letters, digits, C{_-.}) are ignored;
   only C{mailto:} and C{https:} URIs are used, others are skipped.
 - 4.1 One report per policy domain per UTC day (00:00:00 to 23:59:59),
   sent after the day is over.
 - 4.3, 4.4 The JSON report (L{report_json}): C{organization-name},
   C{date-range} (C{start-datetime}, C{end-datetime}, RFC 3339 UTC),
   C{contact-info}, C{report-id}, C{policies}: per policy applied
   (C{policy-type} C{sts}, C{tlsa} or C{no-policy-found}, its
   C{policy-string} lines, C{policy-domain}, C{mx-host}) the
   C{summary} (C{total-successful-session-count},
   C{total-failure-session-count}) and C{failure-details} (C{result-type},
   C{sending-mta-ip}, C{receiving-mx-hostname}, C{receiving-ip},
   C{failed-session-count}, C{failure-reason-code}: our one-line reason).
   Absent values are left out, never sent as C{null}.
 - 4.3 Result types: L{RESULT_TYPES}, exactly the eleven of the RFC.
 - 5.1 File name C{<submitter>!<policy-domain>!<begin>!<end>!<unique>.json.gz}
   (POSIX seconds of the day's first and last second; C{unique}: letters
   and digits derived from the report id).
 - 5.2 The JSON is gzip-compressed (C{application/tlsrpt+gzip}) for both
   transports.
 - 5.3 By mail (L{report_message}): C{multipart/report;
   report-type="tlsrpt"}, a short C{text/plain} part, the report as an
   attachment named as 5.1 says; headers C{TLS-Report-Domain},
   C{TLS-Report-Submitter} and C{Subject: Report Domain: <d> Submitter:
   <s> Report-ID: <<id>>}. The message is handed to a C{submit} callable
   (the node's own queue). DKIM signing (5.3 asks for it, with
   C{s=tlsrpt} keys) is the egress route's business.
 - 5.4 By HTTPS: C{POST} of the compressed report with C{Content-Type:
   application/tlsrpt+gzip}, the server's certificate verified (the node's
   C{[tls] ca_file} or the system's trust store), a time limit; any 2xx
   is success.
 - 5.4, 6 A report that could not be delivered is tried again later (at
   most L{GIVE_UP_DAYS} days after its day); a TXT record that is not
   there means no report; a failed DNS lookup is tried again.

Recording (L{TLSReports.record}) only adds to counters in memory. A
periodic L{TLSReports.flush} writes each day and domain changed since the
last flush as its report file, C{<directory>/<YYYY-MM-DD>/<domain>.json}
(the RFC's JSON, with the organisation, contact and report id of the
configuration), in a thread, atomically (temporary file, fsync, rename,
fsync of the directory). L{TLSReports.load} reads today's files back at
start, so a restart loses at most one flush interval. Delivery
(L{TLSReportSender.send_due}) writes C{<domain>.sent} next to a report
(the URIs done, attempts, last error), so a restart does not send twice.

L{webpki_result} is the WebPKI check of MTA-STS (RFC 8461 4.2) as a result
type, for C{testing} mode, which delivers anyway and only reports.
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import gzip
import hashlib
import json
import os
import re
import io
import shutil
import ssl as stdlib_ssl
from collections.abc import Callable, Generator, Iterable, Sequence
from email.message import EmailMessage
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from attrs import field, frozen, validators
from cryptography import x509
from OpenSSL import crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from relaynet.delivery.mtasts import normalise_domain
from relaynet.delivery.mx import DNS_TIMEOUT
from relaynet.queue.spool import write_file_durably
from relaynet.smtp.tls import TLS_FLOOR, trust_root

# -- result types (RFC 8460 4.3) ------------------------------------------------

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

RESULT_TYPES = frozenset({
    STARTTLS_NOT_SUPPORTED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED, CERTIFICATE_NOT_TRUSTED,
    VALIDATION_FAILURE, TLSA_INVALID, DNSSEC_INVALID, DANE_REQUIRED, STS_POLICY_FETCH_ERROR,
    STS_POLICY_INVALID, STS_WEBPKI_INVALID,
})
"""The result types of RFC 8460 section 4.3 (4.3.1 to 4.3.4)."""

POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
"""The C{policy-type} values of RFC 8460 section 4.3."""

MEDIA_TYPE = "application/tlsrpt+gzip"
"""The compressed report's media type (RFC 8460 5.2, 6.4)."""

SEND_MODES = ("mail", "https", "both", "none")
"""How reports may be delivered (C{[tls_rpt] send})."""

MAX_FAILURE_ROWS = 1000
"""Distinct C{failure-details} rows kept per policy and day; further kinds count in the summary only."""

MAX_DETAIL = 200
"""Characters of a failure's reason kept (C{failure-reason-code})."""

GIVE_UP_DAYS = 3
"""Days after its day that a report not yet delivered is given up."""

KEEP_DAYS = 14
"""Days that report files are kept on disk."""

RETRY_AFTER = 3600.0
"""Seconds before a failed delivery (or DNS lookup) is tried again."""

POST_TIMEOUT = 60.0
"""Seconds for a whole HTTPS report delivery."""

_T = TypeVar("_T")

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")


def _result_type(instance: Any, attribute: Any, value: str | None) -> None:
    if value is not None and value not in RESULT_TYPES:
        raise ValueError(f"{value!r} is not an RFC 8460 result type")


def _day_of(seconds: float) -> str:
    """The UTC day, C{YYYY-MM-DD}, of POSIX C{seconds}."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


def day_range(day: str) -> tuple[int, int]:
    """
    The POSIX seconds of the first and the last second of the UTC C{day}
    (C{YYYY-MM-DD}).

    @raise ValueError: C{day} is not a date.
    """
    start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
    first = int(start.timestamp())
    return first, first + 86399


def _rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- one session's outcome --------------------------------------------------------


@frozen
class TLSResult:
    """
    The outcome of one SMTP session (or one MX host not connected to because
    of its policy) for TLS reporting.

    @ivar policy_domain: the recipient domain (RFC 8460 1.3, "Policy Domain").
    @ivar policy_type: C{"sts"}, C{"tlsa"} or C{"no-policy-found"}.
    @ivar policy_string: the MTA-STS policy's lines, or the TLSA records in
        presentation format; empty for C{no-policy-found}.
    @ivar mx_host: the MTA-STS C{mx} patterns, or the MX host of TLSA records.
    @ivar receiving_mx_hostname: the MX host name (C{None}: not known, e.g.
        a policy fetch failure).
    @ivar receiving_ip: the address connected to, if any.
    @ivar sending_ip: our source address, if known.
    @ivar result_type: C{None} for a successful session, else one of
        L{RESULT_TYPES}.
    @ivar detail: a one-line reason (C{failure-reason-code}).
    """

    policy_domain: str
    policy_type: str = field(validator=validators.in_(POLICY_TYPES))
    policy_string: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    sending_ip: str | None = None
    result_type: str | None = field(default=None, validator=_result_type)
    detail: str | None = None

    @classmethod
    def for_sts(cls, domain: str, policy_text: str, mx: Sequence[str], **kw: Any) -> TLSResult:
        """
        A result under an MTA-STS policy (C{policy_text}: its body as fetched,
        L{relaynet.delivery.mtasts.Policy.text}; C{mx}: its patterns).

        @param kw: the other fields of L{TLSResult}.
        """
        return cls(domain, "sts", sts_policy_strings(policy_text), tuple(mx), **kw)

    @classmethod
    def for_tlsa(cls, domain: str, mx_host: str, records: Iterable[str], **kw: Any) -> TLSResult:
        """
        A result under DANE: C{records} are the MX host's TLSA records in
        presentation format (L{relaynet.delivery.dane.TLSARecord.to_text}).
        """
        return cls(
            domain, "tlsa", tuple(records), (mx_host.rstrip(".").lower(),),
            receiving_mx_hostname=kw.pop("receiving_mx_hostname", mx_host), **kw,
        )

    @classmethod
    def no_policy(cls, domain: str, **kw: Any) -> TLSResult:
        """A result for a domain with neither MTA-STS nor DANE (C{no-policy-found})."""
        return cls(domain, "no-policy-found", **kw)


def sts_policy_strings(text: str) -> tuple[str, ...]:
    """An MTA-STS policy body as C{policy-string}: its lines, without CR/LF, blank ones left out."""
    return tuple(line.rstrip("\r") for line in text.split("\n") if line.strip(" \t\r"))


# -- aggregation ---------------------------------------------------------------------

_PolicyKey = tuple[str, tuple[str, ...], tuple[str, ...]]
_FailureKey = tuple[str, str | None, str | None, str | None, str | None]


class _PolicyCounts:
    """The counters of one policy on one day (RFC 8460 4.4 C{policies} item)."""

    def __init__(self) -> None:
        self.successes = 0
        self.failures = 0
        self.details: dict[_FailureKey, int] = {}

    def add_failure(self, key: _FailureKey, count: int = 1) -> None:
        self.failures += count
        if key in self.details or len(self.details) < MAX_FAILURE_ROWS:
            self.details[key] = self.details.get(key, 0) + count


class _DomainDay:
    """Everything counted for one policy domain on one UTC day."""

    def __init__(self) -> None:
        self.policies: dict[_PolicyKey, _PolicyCounts] = {}

    def counts(self, key: _PolicyKey) -> _PolicyCounts:
        found = self.policies.get(key)
        if found is None:
            found = self.policies[key] = _PolicyCounts()
        return found

    def merge_report(self, report: dict[str, Any]) -> None:
        """Add the counts of a report file (as L{report_json} writes it)."""
        for item in report["policies"]:
            pol = item["policy"]
            counts = self.counts((
                str(pol["policy-type"]), tuple(map(str, pol.get("policy-string", ()))),
                tuple(map(str, pol.get("mx-host", ()))),
            ))
            summary = item["summary"]
            counts.successes += int(summary["total-successful-session-count"])
            listed = 0
            for row in item.get("failure-details", ()):
                n = int(row["failed-session-count"])
                listed += n
                counts.add_failure((
                    str(row["result-type"]), row.get("sending-mta-ip"), row.get("receiving-mx-hostname"),
                    row.get("receiving-ip"), row.get("failure-reason-code"),
                ), n)
            counts.failures += int(summary["total-failure-session-count"]) - listed


def report_json(
    day: str, policy_domain: str, organization_name: str, contact_info: str, report_id: str,
    policies: dict[_PolicyKey, _PolicyCounts],
) -> dict[str, Any]:
    """
    The RFC 8460 section 4 report of one policy domain for one UTC day.

    @param day: C{YYYY-MM-DD}.
    @param policies: the counters (L{TLSReports.report_json} passes its own).
    @return: the JSON object, ready for L{json.dumps}.
    """
    first, last = day_range(day)
    out = []
    for (ptype, pstring, mx), counts in sorted(policies.items()):
        policy: dict[str, Any] = {"policy-type": ptype}
        if pstring:
            policy["policy-string"] = list(pstring)
        policy["policy-domain"] = policy_domain
        if mx:
            policy["mx-host"] = list(mx)
        item: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": counts.successes,
                "total-failure-session-count": counts.failures,
            },
        }
        if counts.details:
            rows = []
            for (rtype, sending, mx_name, receiving, detail), n in sorted(
                counts.details.items(), key=lambda kv: tuple("" if v is None else v for v in kv[0]),
            ):
                row: dict[str, Any] = {"result-type": rtype}
                if sending is not None:
                    row["sending-mta-ip"] = sending
                if mx_name is not None:
                    row["receiving-mx-hostname"] = mx_name
                if receiving is not None:
                    row["receiving-ip"] = receiving
                row["failed-session-count"] = n
                if detail is not None:
                    row["failure-reason-code"] = detail
                rows.append(row)
            item["failure-details"] = rows
        out.append(item)
    return {
        "organization-name": organization_name,
        "date-range": {"start-datetime": _rfc3339(first), "end-datetime": _rfc3339(last)},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": out,
    }


def report_file_name(submitter: str, policy_domain: str, day: str, report_id: str) -> str:
    """
    The RFC 8460 5.1 name of a compressed report:
    C{<submitter>!<policy-domain>!<begin>!<end>!<unique>.json.gz}.
    """
    first, last = day_range(day)
    unique = hashlib.sha256(report_id.encode("utf-8")).hexdigest()[:12]
    return f"{submitter}!{policy_domain}!{first}!{last}!{unique}.json.gz"


def compress(report: dict[str, Any]) -> bytes:
    """The report as gzip-compressed JSON (RFC 8460 5.2); reproducible (no time stamp)."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write C{data} to C{path}: temporary file, fsync, rename, fsync of the directory."""
    write_file_durably(path, data)


def _after(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing (with C{None}) when C{d} fires, leaving C{d}'s result alone."""
    out: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(relay)
    return out


class TLSReports:
    """
    Daily TLS report counters per policy domain, kept on disk.

    @param directory: e.g. C{<spool>/tls-rpt}; one subdirectory per UTC day.
    @param clock: its C{seconds()} (POSIX time) decides the day of a result.
    @param run_in_thread: runs a blocking callable, returns a Deferred of
        its result (file work only ever runs there).
    @param organization_name: C{organization-name} of the reports.
    @param contact_info: C{contact-info} (an address or URI).
    @param submitter: our host name (report ids, file names, mail headers).
    @param unique: a tag making report ids unique between several writers
        with one submitter (e.g. worker processes; each needs its own
        C{directory}).
    """

    log = Logger()

    def __init__(
        self, directory: Path, clock: IReactorTime,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]], *,
        organization_name: str = "", contact_info: str = "", submitter: str = "localhost",
        unique: str = "",
    ) -> None:
        self.directory = Path(directory)
        self.clock = clock
        self._run = run_in_thread
        self.organization_name = organization_name
        self.contact_info = contact_info
        self.submitter = submitter
        self.unique = unique
        self._days: dict[str, dict[str, _DomainDay]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._lock = DeferredLock()
        self._loaded: Deferred[None] | None = None
        self._flushed = False
        self.recorded = 0
        """Results recorded since start (for tests and metrics)."""

    # -- recording (reactor thread, no I/O) --

    def record(self, result: TLSResult) -> None:
        """
        Count C{result} under today's (UTC) report of its policy domain.
        Cheap: memory only; L{flush} writes it.
        """
        domain = normalise_domain(result.policy_domain)
        if domain is None:
            self.log.info("TLS report result for {domain!r} ignored: not a domain", domain=result.policy_domain)
            return
        day = _day_of(self.clock.seconds())
        domains = self._days.setdefault(day, {})
        entry = domains.get(domain)
        if entry is None:
            entry = domains[domain] = _DomainDay()
        counts = entry.counts((result.policy_type, result.policy_string, result.mx_host))
        if result.result_type is None:
            counts.successes += 1
        else:
            detail = result.detail
            if detail is not None:
                detail = " ".join(detail.split())[:MAX_DETAIL]
            mx_name = result.receiving_mx_hostname
            if mx_name is not None:
                mx_name = mx_name.rstrip(".").lower()
            counts.add_failure((result.result_type, result.sending_ip, mx_name, result.receiving_ip, detail))
        self._dirty.add((day, domain))
        self.recorded += 1

    def report_id(self, day: str, policy_domain: str) -> str:
        """The report id of C{policy_domain}'s report for C{day}: the same after a restart."""
        tag = f".{self.unique}" if self.unique else ""
        return f"{day}.{policy_domain}{tag}@{self.submitter}"

    def report_json(
        self, day: str, policy_domain: str, organization_name: str | None = None,
        contact_info: str | None = None, report_id: str | None = None,
    ) -> dict[str, Any]:
        """
        The RFC 8460 report of C{policy_domain} for C{day}, as counted in
        memory (L{report_json}); the other arguments default to this
        object's settings and L{report_id}.
        """
        entry = self._days.get(day, {}).get(policy_domain, _DomainDay())
        return report_json(
            day, policy_domain,
            self.organization_name if organization_name is None else organization_name,
            self.contact_info if contact_info is None else contact_info,
            self.report_id(day, policy_domain) if report_id is None else report_id,
            entry.policies,
        )

    def run_in_thread(self, work: Callable[[], _T]) -> Deferred[_T]:
        """Run blocking C{work} as this object does its file work (in a thread)."""
        d: Deferred[_T] = maybeDeferred(self._run, work)
        return d

    def path(self, day: str, policy_domain: str) -> Path:
        """The report file of C{policy_domain} for C{day}."""
        return self.directory / day / f"{policy_domain}.json"

    # -- disk (threads) --

    def load(self) -> Deferred[None]:
        """
        Read today's report files back (in a thread) and add their counts to
        what is in memory. Call once, at start, before the first L{flush}
        (which waits for it); after a flush it does nothing (the files then
        hold what memory holds: adding them again would count twice).
        """
        if self._loaded is not None:
            return self._loaded
        if self._flushed:
            self._loaded = succeed(None)
            return self._loaded
        day = _day_of(self.clock.seconds())
        directory = self.directory / day

        def read() -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                return found
            for name in names:
                if not name.endswith(".json") or name.startswith("."):
                    continue
                try:
                    found[name[:-5]] = json.loads((directory / name).read_bytes())
                except (OSError, ValueError) as e:
                    self.log.warn("TLS report file {path} ignored: {why}", path=str(directory / name), why=e)
            return found

        def merge(found: dict[str, dict[str, Any]]) -> None:
            domains = self._days.setdefault(day, {})
            for domain, report in found.items():
                entry = domains.setdefault(domain, _DomainDay())
                try:
                    entry.merge_report(report)
                except (KeyError, TypeError, ValueError) as e:
                    self.log.warn("TLS report file for {domain} ({day}) ignored: {why}", domain=domain, day=day, why=e)
                    continue
                self._dirty.add((day, domain))

        d: Deferred[None] = maybeDeferred(self._run, read).addCallback(merge)
        self._loaded = d
        return d

    def flush(self) -> Deferred[None]:
        """
        Write every report changed since the last flush (in a thread,
        atomically), then forget the counters of days before today. One
        flush at a time; a flush called during another runs after it.
        """
        self._flushed = True
        loaded = _after(self._loaded) if self._loaded is not None else succeed(None)

        def flush_once() -> Deferred[None]:
            dirty, self._dirty = self._dirty, set()
            today = _day_of(self.clock.seconds())
            writes = [
                (self.path(day, domain), json.dumps(self.report_json(day, domain), indent=1).encode("utf-8"))
                for day, domain in sorted(dirty)
            ]

            def write() -> None:
                for path, data in writes:
                    _write_atomically(path, data)

            def written(_: object) -> None:
                for day in [d for d in self._days if d < today]:
                    if not any(k[0] == day for k in self._dirty):
                        del self._days[day]

            def failed(failure: Failure) -> Failure:
                self._dirty |= dirty
                return failure

            return maybeDeferred(self._run, write).addCallbacks(written, failed)

        return loaded.addCallback(lambda _: self._lock.run(flush_once))

    def complete_reports(self, now: float) -> list[tuple[str, str]]:
        """
        C{(day, policy domain)} of every report file of a day before
        C{now}'s (blocking: call it in a thread).
        """
        today = _day_of(now)
        out: list[tuple[str, str]] = []
        try:
            days = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        for day in days:
            if not _DAY.match(day) or day >= today:
                continue
            for name in sorted(os.listdir(self.directory / day)):
                if name.endswith(".json") and not name.startswith("."):
                    out.append((day, name[:-5]))
        return out

    def prune(self, now: float, keep_days: int = KEEP_DAYS) -> None:
        """Remove the day directories older than C{keep_days} (blocking: call it in a thread)."""
        cut = _day_of(now - keep_days * 86400.0)
        try:
            days = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for day in days:
            if _DAY.match(day) and day < cut:
                shutil.rmtree(self.directory / day, ignore_errors=True)


# -- where reports go (RFC 8460 3) ------------------------------------------------------


def parse_tlsrpt_txt(records: Iterable[str]) -> tuple[str, ...] | None:
    """
    The C{rua} URIs of a domain's C{_smtp._tls} TXT records (RFC 8460 3).

    @param records: each record's strings already joined.
    @return: the URIs in order (C{mailto:} and C{https:} only, the others
        left out), or C{None} when the domain takes no reports (not exactly
        one C{v=TLSRPTv1} record, or it does not parse, or it has no
        C{rua}).
    """
    ours = [r for r in records if _FIELD_DELIM.split(r, 1)[0] == "v=TLSRPTv1"]
    if len(ours) != 1:
        return None
    fields = _FIELD_DELIM.split(ours[0].rstrip(" \t"))
    if fields[-1] == "":
        fields.pop()
    rua: list[str] | None = None
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            return None
        if name == "rua":
            if rua is not None:
                return None
            uris = [u.strip(" \t") for u in value.split(",")]
            if not all(uris):
                return None
            rua = [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
        elif not _EXT_NAME.match(name) or not _EXT_VALUE.match(value):
            return None
    if rua is None or not rua:
        return None
    return tuple(rua)


def mailto_address(uri: str) -> str | None:
    """The address of a C{mailto:} URI (percent-decoded, query left out), or C{None}."""
    if not uri.lower().startswith("mailto:"):
        return None
    address = unquote(uri[7:].split("?", 1)[0]).strip()
    if address.count("@") != 1 or any(c in address for c in " <>\r\n,"):
        return None
    local, domain = address.split("@")
    return address if local and domain else None


# -- the mail (RFC 8460 5.3) ------------------------------------------------------------


def report_message(
    report: dict[str, Any], policy_domain: str, submitter: str, sender: str,
    recipients: Sequence[str], now: float,
) -> bytes:
    """
    The report as a mail (RFC 8460 5.3), CRLF line ends.

    @param report: the JSON object (L{report_json}).
    @param sender: the C{From:} address.
    @param recipients: the C{To:} addresses.
    @param now: POSIX seconds for C{Date:}.
    """
    report_id = str(report["report-id"])
    start = datetime.datetime.strptime(report["date-range"]["start-datetime"], "%Y-%m-%dT%H:%M:%SZ")
    day = start.strftime("%Y-%m-%d")
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    msg["Subject"] = f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["Message-ID"] = email.utils.make_msgid("tlsrpt", domain=submitter)
    msg["TLS-Report-Domain"] = policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter}\n"
        f"for {policy_domain}, {report['date-range']['start-datetime']} to "
        f"{report['date-range']['end-datetime']}.\n",
        charset="us-ascii", cte="7bit",
    )
    msg.add_attachment(
        compress(report), maintype="application", subtype="tlsrpt+gzip",
        filename=report_file_name(submitter, policy_domain, day, report_id),
    )
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


# -- HTTPS (RFC 8460 5.4) -------------------------------------------------------------


class _Discard(Protocol):
    """Takes a response body and drops the connection (the pool is not persistent)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _ReportEndpoints:
    """HTTPS endpoints for report URIs: TLS with the host name verified against C{trust}."""

    def __init__(
        self, reactor: Any, trust: Any, timeout: float,
        connect: Callable[[str, int], IStreamClientEndpoint] | None,
    ) -> None:
        self.reactor = reactor
        self.trust = trust
        self.timeout = timeout
        self.connect = connect

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        from twisted.web.error import SchemeNotSupported

        if uri.scheme != b"https":
            raise SchemeNotSupported(f"not https: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        tcp = (
            self.connect(host, uri.port) if self.connect is not None
            else HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        )
        options = ssl.optionsForClientTLS(
            host, trustRoot=self.trust, extraCertificateOptions={"raiseMinimumTo": TLS_FLOOR},
        )
        return wrapClientTLS(options, tcp)


class DeliveryError(Exception):
    """A report could not be delivered to one URI (tried again later)."""


# -- sending ---------------------------------------------------------------------------


@frozen
class Delivery:
    """
    The delivery state of one report, C{<domain>.sent} beside it.

    @ivar delivered: the URIs it was delivered to.
    @ivar attempts: delivery rounds so far.
    @ivar done: nothing more to do (delivered, no C{rua}, or given up).
    @ivar note: the last error, or why it is done.
    """

    delivered: tuple[str, ...] = ()
    attempts: int = 0
    done: bool = False
    note: str = ""

    def to_json(self) -> bytes:
        """The file's content."""
        return json.dumps({
            "format": 1, "delivered": list(self.delivered), "attempts": self.attempts,
            "done": self.done, "note": self.note,
        }, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Delivery:
        """
        Read a file's content.

        @raise ValueError: not a state file of format 1.
        """
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != 1:
            raise ValueError("not a TLS report state file of format 1")
        return cls(tuple(map(str, raw["delivered"])), int(raw["attempts"]), bool(raw["done"]), str(raw["note"]))


class TLSReportSender:
    """
    Delivers the reports of complete days (RFC 8460 5).

    @param reports: the L{TLSReports} whose files are sent.
    @param resolver: a L{twisted.names} resolver for C{_smtp._tls} TXT records.
    @param reactor: connects (HTTPS) and is the clock unless C{clock} is given.
    @param submit: C{submit(sender, recipients, message) -> Deferred}: queue
        a mail (the node's own queue); its failure means "try again later".
    @param mode: one of L{SEND_MODES}.
    @param report_sender: the envelope sender and C{From:} of mailed reports.
    @param ca_file: trust for HTTPS report servers (C{None}: the system's).
    @param timeout: seconds for one HTTPS delivery.
    @param retry_after: seconds before a failed report is tried again.
    @param connect: replaces the TCP part of HTTPS connections,
        C{connect(host, port) -> endpoint} (tests, labs); TLS and the name
        check stay.
    @param agent: replaces the whole HTTP agent.
    """

    log = Logger()

    def __init__(
        self, reports: TLSReports, resolver: Any, reactor: Any,
        submit: Callable[[str, list[str], bytes], Deferred[Any]], *,
        mode: str = "mail", report_sender: str = "postmaster@localhost", ca_file: Path | None = None,
        timeout: float = POST_TIMEOUT, retry_after: float = RETRY_AFTER, clock: IReactorTime | None = None,
        connect: Callable[[str, int], IStreamClientEndpoint] | None = None, agent: Any = None,
        dns_timeout: tuple[float, ...] = DNS_TIMEOUT, give_up_days: int = GIVE_UP_DAYS,
        keep_days: int = KEEP_DAYS,
    ) -> None:
        if mode not in SEND_MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(SEND_MODES)}")
        self.reports = reports
        self.resolver = resolver
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.submit = submit
        self.mode = mode
        self.report_sender = report_sender
        self.timeout = timeout
        self.retry_after = retry_after
        self.dns_timeout = dns_timeout
        self.give_up_days = give_up_days
        self.keep_days = keep_days
        self._ca_file = ca_file
        self._reactor = reactor
        self._connect = connect
        self._agent = agent
        self._next_try: dict[tuple[str, str], float] = {}
        self._lock = DeferredLock()

    def _https_agent(self) -> Any:
        if self._agent is None:
            self._agent = Agent.usingEndpointFactory(
                self._reactor, _ReportEndpoints(self._reactor, trust_root(self._ca_file), self.timeout, self._connect),
                pool=HTTPConnectionPool(self._reactor, persistent=False),
            )
        return self._agent

    @inlineCallbacks
    def rua_for(self, domain: str) -> Generator[Deferred[Any], Any, tuple[str, ...] | None]:
        """
        The C{rua} URIs of C{domain} (L{parse_tlsrpt_txt}), or C{None}: it
        takes no reports.

        @raise Exception: the lookup failed for another reason than the
            name not existing (try again later).
        """
        from twisted.names import error

        name = f"_smtp._tls.{domain}"
        try:
            answers, _, _ = yield self.resolver.lookupText(name, self.dns_timeout)
        except (error.DNSNameError, error.AuthoritativeDomainError):
            return None
        texts = [b"".join(a.payload.data).decode("utf-8", "replace") for a in answers if a.type == dns.TXT]
        return parse_tlsrpt_txt(texts)

    def send_due(self, now: float | None = None) -> Deferred[dict[tuple[str, str], Delivery]]:
        """
        Flush, then deliver every report of a day before today's that is not
        yet done and not waiting for a retry; remove old report files.

        @param now: POSIX seconds (default: the clock's).
        @return: a Deferred firing with C{(day, domain) -> L{Delivery}} for
            the reports tried; it does not fail.
        """
        when = self.clock.seconds() if now is None else now
        return self._lock.run(self._send_due, when)

    @inlineCallbacks
    def _send_due(self, now: float) -> Generator[Deferred[Any], Any, dict[tuple[str, str], Delivery]]:
        reports = self.reports
        tried: dict[tuple[str, str], Delivery] = {}
        try:
            yield reports.flush()
        except Exception:  # noqa: BLE001 -- any failure: logged, tried again later
            self.log.failure("TLS report flush failed before sending")
        if self.mode == "none":
            return tried
        due = yield reports.run_in_thread(lambda: reports.complete_reports(now))
        for day, domain in due:
            key = (day, domain)
            if self._next_try.get(key, 0.0) > now:
                continue
            state = yield reports.run_in_thread(partial(self._read_state, day, domain))
            if state.done:
                continue
            try:
                state = yield self._deliver(day, domain, state, now)
            except Exception as e:  # noqa: BLE001 -- any failure: logged, tried again later
                self.log.warn("TLS report {day} {domain} not sent: {why}; tried again later",
                              day=day, domain=domain, why=f"{type(e).__name__}: {e}")
                state = Delivery(state.delivered, state.attempts + 1, False, f"{type(e).__name__}: {e}")
            if not state.done:
                if _day_of(now - self.give_up_days * 86400.0) > day:
                    state = Delivery(state.delivered, state.attempts, True, f"given up: {state.note}")
                else:
                    self._next_try[key] = now + self.retry_after
            else:
                self._next_try.pop(key, None)
            tried[key] = state
            data = state.to_json()
            path = self._state_path(day, domain)
            try:
                yield reports.run_in_thread(partial(_write_atomically, path, data))
            except Exception:  # noqa: BLE001 -- any failure: logged, tried again later
                self.log.failure("TLS report state {path} not written", path=str(path))
        try:
            yield reports.run_in_thread(lambda: reports.prune(now, self.keep_days))
        except Exception:  # noqa: BLE001 -- any failure: logged, tried again later
            self.log.failure("TLS report pruning failed")
        return tried

    def _state_path(self, day: str, domain: str) -> Path:
        return self.reports.directory / day / f"{domain}.sent"

    def _read_state(self, day: str, domain: str) -> Delivery:
        try:
            return Delivery.from_json(self._state_path(day, domain).read_bytes())
        except FileNotFoundError:
            return Delivery()
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warn("TLS report state of {day} {domain} unreadable ({why}): sending", day=day, domain=domain, why=e)
            return Delivery()

    @inlineCallbacks
    def _deliver(
        self, day: str, domain: str, state: Delivery, now: float,
    ) -> Generator[Deferred[Any], Any, Delivery]:
        path = self.reports.path(day, domain)
        report = json.loads((yield self.reports.run_in_thread(path.read_bytes)))
        rua = yield self.rua_for(domain)
        if rua is None:
            return Delivery(state.delivered, state.attempts + 1, True, f"no TLSRPT record at _smtp._tls.{domain}")
        wanted = [
            u for u in rua
            if (mailto_address(u) is not None and self.mode in ("mail", "both"))
            or (u.lower().startswith("https:") and self.mode in ("https", "both"))
        ]
        if not wanted:
            return Delivery(
                state.delivered, state.attempts + 1, True, f"no rua usable with send = {self.mode}: {', '.join(rua)}",
            )
        delivered = list(state.delivered)
        errors = []
        mail_to = [u for u in wanted if u.lower().startswith("mailto:") and u not in delivered]
        addresses = [a for a in (mailto_address(u) for u in mail_to) if a is not None]
        if addresses:
            message = report_message(report, domain, self.reports.submitter, self.report_sender, addresses, now)
            try:
                yield maybeDeferred(self.submit, self.report_sender, addresses, message)
                delivered += mail_to
                self.log.info("TLS report {id} queued to {to}", id=report["report-id"], to=", ".join(addresses))
            except Exception as e:  # noqa: BLE001 -- any failure: logged, tried again later
                errors.append(f"mail: {type(e).__name__}: {e}")
        for uri in [u for u in wanted if u.lower().startswith("https:") and u not in delivered]:
            try:
                yield self.post(uri, compress(report))
                delivered.append(uri)
                self.log.info("TLS report {id} posted to {uri}", id=report["report-id"], uri=uri)
            except Exception as e:  # noqa: BLE001 -- any failure: logged, tried again later
                errors.append(f"{uri}: {type(e).__name__}: {e}")
        done = all(u in delivered for u in wanted)
        note = "; ".join(errors) if errors else "delivered"
        return Delivery(tuple(delivered), state.attempts + 1, done, note)

    def post(self, uri: str, body: bytes) -> Deferred[None]:
        """
        C{POST} a compressed report to C{uri} (RFC 8460 5.4): certificate
        verified, within C{timeout}.

        @raise DeliveryError: (in the Deferred) the server did not answer 2xx.
        """
        parts = urlsplit(uri)
        if parts.scheme.lower() != "https" or not parts.hostname:
            raise DeliveryError(f"not an https URI: {uri!r}")
        d: Deferred[IResponse] = self._https_agent().request(
            b"POST", uri.encode("ascii"),
            Headers({b"content-type": [MEDIA_TYPE.encode("ascii")], b"user-agent": [b"relaynet TLSRPT"]}),
            FileBodyProducer(io.BytesIO(body)),
        )

        def answered(response: IResponse) -> None:
            response.deliverBody(_Discard())
            if not 200 <= response.code < 300:
                raise DeliveryError(f"HTTP {response.code}")

        d2: Deferred[None] = d.addCallback(answered)
        d2.addTimeout(self.timeout, self.clock)
        return d2


# -- the service -------------------------------------------------------------------------


class TLSReportService(Service):
    """
    Runs reporting in a node: loads today's counts at start, flushes every
    C{flush_interval} seconds and at stop, and (with a sender) sends due
    reports every C{send_interval} seconds.
    """

    log = Logger()

    def __init__(
        self, reports: TLSReports, clock: IReactorTime, flush_interval: float = 60.0,
        sender: TLSReportSender | None = None, send_interval: float = 3600.0,
    ) -> None:
        self.reports = reports
        self.sender = sender
        self.clock = clock
        self.flush_interval = flush_interval
        self.send_interval = send_interval
        self._loops: list[LoopingCall] = []

    def _loop(self, interval: float, work: Callable[[], Deferred[Any]], what: str) -> None:
        def step() -> Deferred[None]:
            def failed(failure: Failure) -> None:
                self.log.failure("TLS report {what} failed", failure, what=what)

            return maybeDeferred(work).addCallbacks(lambda _: None, failed)

        loop = LoopingCall(step)
        loop.clock = self.clock
        loop.start(interval, now=False)
        self._loops.append(loop)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        self.reports.load().addErrback(lambda f: self.log.failure("TLS report files not read back", f))
        self._loop(self.flush_interval, self.reports.flush, "flush")
        if self.sender is not None:
            sender = self.sender
            self._loop(self.send_interval, sender.send_due, "sending")

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        d = self.reports.flush()
        d.addErrback(lambda f: self.log.failure("TLS report flush at stop failed", f))
        return d


# -- WebPKI (RFC 8461 4.2) as a result type ----------------------------------------------


def _store(ca_file: Path | None) -> crypto.X509Store:
    store = crypto.X509Store()
    if ca_file is not None:
        store.load_locations(str(ca_file))
        return store
    paths = stdlib_ssl.get_default_verify_paths()
    cafile = paths.cafile if paths.cafile and os.path.exists(paths.cafile) else None
    capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
    if cafile is None and capath is None:
        raise OSError("no system trust store found")
    store.load_locations(cafile, capath)
    return store


_EXPIRED_CODES = frozenset({9, 10, 11, 12})
"""OpenSSL: certificate not yet valid, expired, CRL not yet valid, CRL expired."""


def webpki_result(
    der_chain: Sequence[bytes], name: str, ca_file: Path | None = None,
    now: datetime.datetime | None = None,
) -> str | None:
    """
    Whether a server's chain is valid for C{name} under the WebPKI, as an
    RFC 8460 result type (for MTA-STS C{testing} mode, which delivers
    anyway and reports).

    @param der_chain: DER certificates, leaf first
        (L{relaynet.delivery.dane.peer_chain}).
    @param name: the MX host name the certificate must name.
    @param ca_file: the trust (PEM bundle); C{None}: the system's store.
    @param now: check validity at this time (default: now).
    @return: C{None} when the chain verifies and names C{name}; else
        L{CERTIFICATE_EXPIRED}, L{CERTIFICATE_NOT_TRUSTED} or
        L{CERTIFICATE_HOST_MISMATCH}.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    if not der_chain:
        return CERTIFICATE_NOT_TRUSTED
    try:
        certs = [x509.load_der_x509_certificate(d) for d in der_chain]
    except ValueError:
        return CERTIFICATE_NOT_TRUSTED
    store = _store(ca_file)
    if now is not None:
        store.set_time(now)
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(certs[0]), [crypto.X509.from_cryptography(c) for c in certs[1:]],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        return CERTIFICATE_EXPIRED if e.errors and e.errors[0] in _EXPIRED_CODES else CERTIFICATE_NOT_TRUSTED
    try:
        verify_certificate_hostname(certs[0], name.rstrip(".").lower())
    except (VerificationError, CertificateError):
        return CERTIFICATE_HOST_MISMATCH
    return None


def tls_failure_result(error: BaseException | Failure) -> str:
    """
    The RFC 8460 result type of a failed TLS handshake (best effort), for a
    session's L{TLSResult}.

    @param error: the exception (or L{Failure}) the connection failed with;
        wrapped ones (C{reasons} of Twisted's connection errors) are looked
        into.
    @return: a DANE mismatch's own result type
        (L{relaynet.delivery.dane.DaneVerificationError}); a name not in the
        certificate (service_identity): L{CERTIFICATE_HOST_MISMATCH}; an
        OpenSSL verification failure: L{CERTIFICATE_EXPIRED} when it says
        so, else L{CERTIFICATE_NOT_TRUSTED} (OpenSSL 3 often says only
        "certificate verify failed": judging the chain after the handshake
        with L{webpki_result} is exact); anything else:
        L{VALIDATION_FAILURE}.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    from relaynet.delivery.dane import DaneVerificationError

    pending: list[Any] = [error]
    while pending:
        e = pending.pop()
        if isinstance(e, Failure):
            pending.append(e.value)
            continue
        if isinstance(e, DaneVerificationError):
            return e.result.result_type or VALIDATION_FAILURE
        if isinstance(e, VerificationError):
            return CERTIFICATE_HOST_MISMATCH
        if isinstance(e, SSL.Error):
            text = str(e).lower()
            if "expired" in text or "not yet valid" in text:
                return CERTIFICATE_EXPIRED
            if "verify failed" in text or "unknown ca" in text or "self-signed" in text or "self signed" in text:
                return CERTIFICATE_NOT_TRUSTED
        pending.extend(getattr(e, "reasons", None) or ())
    return VALIDATION_FAILURE


__all__ = [
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_HOST_MISMATCH",
    "CERTIFICATE_NOT_TRUSTED",
    "DANE_REQUIRED",
    "DNSSEC_INVALID",
    "MEDIA_TYPE",
    "POLICY_TYPES",
    "RESULT_TYPES",
    "SEND_MODES",
    "STARTTLS_NOT_SUPPORTED",
    "STS_POLICY_FETCH_ERROR",
    "STS_POLICY_INVALID",
    "STS_WEBPKI_INVALID",
    "TLSA_INVALID",
    "VALIDATION_FAILURE",
    "Delivery",
    "DeliveryError",
    "TLSReportSender",
    "TLSReportService",
    "TLSReports",
    "TLSResult",
    "compress",
    "day_range",
    "mailto_address",
    "parse_tlsrpt_txt",
    "report_file_name",
    "report_json",
    "report_message",
    "sts_policy_strings",
    "tls_failure_result",
    "webpki_result",
]
