# -*- test-case-name: tests.test_tlspolicy -*-
"""
The TLS an MX delivery must have, per exchanger: DANE (RFC 7672) where the
recipient domain's DNSSEC-signed zone publishes TLSA records, else the
domain's MTA-STS policy (RFC 8461), else the route's own C{tls} setting.

 - DANE first: RFC 8461 section 2 ("senders who implement DANE ... SHOULD
   NOT apply MTA-STS to hosts with valid TLSA records"), as Postfix and
   Exim order them. A host with a secure TLSA RRset gets
   L{relaynet.delivery.dane.DaneClientTLS}: STARTTLS required, the chain
   checked against the records inside the handshake. A failed DNSSEC
   lookup (the validating resolver's SERVFAIL) skips the host, deferred
   4.7.5: never clear text, never unauthenticated TLS instead.
 - Then MTA-STS: in C{enforce} mode a host matching no C{mx} pattern is not
   used (deferred 4.7.5 if no host is usable), and the others need
   STARTTLS with a certificate valid for the MX host name (WebPKI: the
   node's C{[tls] ca_file} or the system's trust store); no STARTTLS, a
   failed handshake or a bad certificate defers (4.7.5) and the next host is
   tried. C{testing} and C{none} change nothing about delivery.
 - Without either, the route's C{tls} applies (C{none}, C{opportunistic},
   C{required}, C{verify}).

L{OutboundSecurity.decide} gives a L{HopDecision} per exchanger name;
L{HopTLS} is what the SMTP client needs for one connection (it is part of
the connection pool's identity).
"""

from __future__ import annotations

from typing import Any, Sequence

from attrs import frozen
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from relaynet.delivery import dane as _dane
from relaynet.delivery.dane import DANE, DaneClientTLS, DaneRequirement, DNSSECLookupError
from relaynet.delivery.mtasts import MTASTS, PolicyState
from relaynet.delivery.tlsrpt import DNSSEC_INVALID, VALIDATION_FAILURE, TLSReports, TLSResult
from relaynet.smtp.tls import TLS_FLOOR, trust_root

DSN = "4.7.5"
"""RFC 3463: cryptographic failure (RFC 7672 and RFC 8461 defer with it)."""


@frozen
class HopTLS:
    """
    What a connection to one MX host must have, beyond the route's policy.

    @ivar policy: C{"dane"} (chain checked against TLSA records),
        C{"dane-unauthenticated"} (TLS required, every TLSA record
        unusable) or C{"mta-sts"} (TLS required, certificate valid for
        C{host}).
    @ivar host: the MX host name: SNI, and the name the certificate must have.
    @ivar dane: the DANE requirement (for the two C{dane} policies).
    """

    policy: str
    host: str
    dane: DaneRequirement | None = None

    @property
    def label(self) -> str:
        """How events name it, after the TLS version: C{DANE}, C{MTA-STS}."""
        return {"dane": "DANE", "dane-unauthenticated": "DANE, TLSA unusable", "mta-sts": "MTA-STS"}[self.policy]

    def context(self, ca_file: Any = None) -> Any:
        """
        The client TLS options for STARTTLS.

        @param ca_file: the trust for MTA-STS (the node's C{[tls] ca_file};
            C{None}: the system's).
        """
        if self.dane is not None:
            return DaneClientTLS(self.dane)
        return ssl.optionsForClientTLS(
            self.host, trustRoot=trust_root(ca_file),
            extraCertificateOptions={"raiseMinimumTo": TLS_FLOOR},
        )


@frozen
class ReportContext:
    """
    What a TLS report (RFC 8460) says about sessions with one MX host: the
    policy that applied to it.

    @ivar policy_type: C{"sts"}, C{"tlsa"} or C{"no-policy-found"}.
    @ivar policy_string: the MTA-STS policy's lines, or the TLSA records.
    @ivar mx_patterns: the MTA-STS policy's C{mx} patterns.
    @ivar mx_host: the exchanger's name.
    @ivar testing: MTA-STS C{testing}: the certificate is checked after the
        handshake and a failure is reported, not enforced.
    """

    policy_domain: str
    policy_type: str
    policy_string: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    mx_host: str = ""
    testing: bool = False

    def result(
        self, result_type: str | None = None, detail: str | None = None,
        receiving_ip: str | None = None, sending_ip: str | None = None,
    ) -> TLSResult:
        """The L{TLSResult} of one session (C{result_type} C{None}: success)."""
        return TLSResult(
            self.policy_domain, self.policy_type, self.policy_string, self.mx_patterns,
            self.mx_host or None, receiving_ip, sending_ip, result_type, detail,
        )


@frozen
class HopDecision:
    """
    How to treat one exchanger.

    @ivar tls: L{HopTLS} to use, or C{None}: the route's own policy.
    @ivar skip: why not to connect at all (deferred, L{DSN}), or C{None}.
    @ivar note: the policy that applied, for events (C{"MTA-STS testing"}).
    @ivar report: what its sessions count under in TLS reports.
    """

    tls: HopTLS | None = None
    skip: str | None = None
    note: str | None = None
    report: ReportContext | None = None


@frozen
class DomainDecision:
    """
    The decisions for one recipient domain's exchangers.

    @ivar hosts: exchanger name -> L{HopDecision}.
    @ivar failure: the whole domain defers with this reason (the MX lookup
        could not be DNSSEC-validated: bogus, or no answer), or C{None}.
    @ivar sts: the MTA-STS state that applied (C{None}: MTA-STS is off).
    """

    hosts: dict[str, HopDecision]
    failure: str | None = None
    sts: PolicyState | None = None


class OutboundSecurity:
    """
    DANE and MTA-STS for MX delivery, either of them optional.

    @param mtasts: the MTA-STS policies (C{None}: MTA-STS off).
    @param dane: DANE through a validating resolver (C{None}: DANE off;
        it is off without C{[dns] dnssec_resolver}).
    @param reports: TLS reporting (C{[tls_rpt]}): hosts ruled out and
        failed policy fetches are counted here, and each decision carries
        the L{ReportContext} its sessions are counted under.
    """

    log = Logger()

    def __init__(self, mtasts: MTASTS | None, dane: DANE | None, reports: TLSReports | None = None) -> None:
        self.mtasts = mtasts
        self.dane = dane
        self.reports = reports

    @inlineCallbacks
    def decide(self, domain: str, exchangers: Sequence[str], port: int) -> Any:
        """
        The L{DomainDecision} for delivering to C{domain} through
        C{exchangers} (names, in the order to try) on C{port}.
        """
        sts: PolicyState | None = None
        if self.mtasts is not None:
            sts = yield self.mtasts.policy_for(domain)
        mx_secure = False
        if self.dane is not None:
            try:
                mx_secure = yield self.dane.mx_secure(domain)
            except DNSSECLookupError as e:
                return DomainDecision(
                    {}, f"the MX lookup for {domain} could not be DNSSEC-validated: {e}", sts,
                )
        if self.reports is not None and sts is not None and sts.failure is not None:
            # The policy could not be fetched (RFC 8460 4.3.2): counted once
            # per delivery, under the cached policy when one applied.
            ctx = _sts_context(domain, sts, "") or ReportContext(domain, "no-policy-found")
            self.reports.record(ctx.result(sts.failure.result_type, sts.failure.detail))
        hosts: dict[str, HopDecision] = {}
        for name in exchangers:
            if name in hosts:
                continue
            req: DaneRequirement | None = None
            if self.dane is not None:
                req = yield self.dane.requirement_for(name, port, mx_secure=mx_secure)
            hosts[name] = d = _decision(domain, name, req, sts)
            if d.skip is not None and d.report is not None and self.reports is not None:
                failure = DNSSEC_INVALID if d.report.policy_type == "tlsa" else VALIDATION_FAILURE
                self.reports.record(d.report.result(failure, d.skip))
        return DomainDecision(hosts, None, sts)


def _sts_context(domain: str, sts: PolicyState, name: str, testing: bool = False) -> ReportContext | None:
    if sts.policy is None:
        return None
    return ReportContext(
        domain, "sts", tuple(sts.policy.text.splitlines()), tuple(sts.policy.mx), name, testing,
    )


def _decision(domain: str, name: str, req: DaneRequirement | None, sts: PolicyState | None) -> HopDecision:
    """DANE over MTA-STS over the route's policy, for one exchanger."""
    if req is not None and req.kind in (_dane.MATCH, _dane.TLS_UNAUTHENTICATED, _dane.DEFER):
        tlsa = ReportContext(domain, "tlsa", tuple(r.to_text() for r in req.records), (), name)
        if req.deferred:
            return HopDecision(skip=req.reason, report=tlsa)
        policy = "dane" if req.kind == _dane.MATCH else "dane-unauthenticated"
        return HopDecision(HopTLS(policy, name, req), report=tlsa)
    if sts is None or sts.policy is None or sts.policy.mode == "none":
        return HopDecision(report=ReportContext(domain, "no-policy-found", mx_host=name))
    need = sts.requirement(name)
    if not need.usable:
        return HopDecision(
            skip=f"MTA-STS policy of {sts.domain} (enforce): {need.reason}", report=_sts_context(domain, sts, name),
        )
    if need.require_tls and need.verify_name:
        return HopDecision(HopTLS("mta-sts", need.verify_name), report=_sts_context(domain, sts, name))
    testing = sts.policy.mode == "testing"
    return HopDecision(note=f"MTA-STS {sts.policy.mode}", report=_sts_context(domain, sts, name, testing))


__all__ = ["DSN", "DomainDecision", "HopDecision", "HopTLS", "OutboundSecurity", "ReportContext"]
