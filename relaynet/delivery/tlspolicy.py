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
class HopDecision:
    """
    How to treat one exchanger.

    @ivar tls: L{HopTLS} to use, or C{None}: the route's own policy.
    @ivar skip: why not to connect at all (deferred, L{DSN}), or C{None}.
    @ivar note: the policy that applied, for events (C{"MTA-STS testing"}).
    """

    tls: HopTLS | None = None
    skip: str | None = None
    note: str | None = None


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
    """

    log = Logger()

    def __init__(self, mtasts: MTASTS | None, dane: DANE | None) -> None:
        self.mtasts = mtasts
        self.dane = dane

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
        hosts: dict[str, HopDecision] = {}
        for name in exchangers:
            if name in hosts:
                continue
            req: DaneRequirement | None = None
            if self.dane is not None:
                req = yield self.dane.requirement_for(name, port, mx_secure=mx_secure)
            hosts[name] = _decision(name, req, sts)
        return DomainDecision(hosts, None, sts)


def _decision(name: str, req: DaneRequirement | None, sts: PolicyState | None) -> HopDecision:
    """DANE over MTA-STS over the route's policy, for one exchanger."""
    if req is not None and req.deferred:
        return HopDecision(skip=req.reason)
    if req is not None and req.kind == _dane.MATCH:
        return HopDecision(HopTLS("dane", name, req))
    if req is not None and req.kind == _dane.TLS_UNAUTHENTICATED:
        return HopDecision(HopTLS("dane-unauthenticated", name, req))
    if sts is None or sts.policy is None:
        return HopDecision()
    need = sts.requirement(name)
    if not need.usable:
        return HopDecision(skip=f"MTA-STS policy of {sts.domain} (enforce): {need.reason}")
    if need.require_tls and need.verify_name:
        return HopDecision(HopTLS("mta-sts", need.verify_name))
    return HopDecision(note=f"MTA-STS {sts.policy.mode}")


__all__ = ["DSN", "DomainDecision", "HopDecision", "HopTLS", "OutboundSecurity"]
