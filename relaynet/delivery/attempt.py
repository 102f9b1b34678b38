# -*- test-case-name: tests.test_delivery -*-
"""
One delivery attempt of one message: route the pending recipients, deliver
each group, and say what happened to each recipient as an L{Outcome}.

The attempt depends on four narrow interfaces, so that it runs in-process
in tests (C{task.Clock}, L{relaynet.testing.FakeSMTPServer} over C{iosim},
a fake resolver):

 - an L{IOutbound} agent that delivers to one next hop (the ESMTP client
   pool, L{relaynet.delivery.client.OutboundManager});
 - an L{ILMTP} agent that delivers to one LMTP server (RFC 2033,
   L{relaynet.delivery.lmtp.LMTPAgent});
 - an L{IMailboxes} writer that delivers into local Maildirs (in a worker
   thread, L{ThreadedMailboxes});
 - a DNS resolver (C{lookupMailExchange}, C{lookupAddress} and C{lookupIPV6Address} of
   L{twisted.internet.interfaces.IResolver}).

Recipients are grouped by their L{Route}: local ones go to the mailboxes,
relayed ones to the route's next hops in priority order (equal priorities
share the load, a transient failure moves the recipient on to the next hop:
failover), C{mx} ones to the MX hosts of their domain, C{lmtp} ones to the
route's LMTP servers (in the same priority order, with the same failover;
a 2xx there is final delivery: C{delivered}, not C{relayed}). An attempt never
fails: anything that raises inside a group (a broken resolver, a bug)
defers that group's recipients with C{4.3.0}, and the rest of the message
is unaffected.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Protocol, Sequence

from attrs import evolve
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaynet.config import LocalDelivery, NextHop, NodeConfig, RouteRule, split_endpoint
from relaynet.delivery.client import DeliveryResult
from relaynet.delivery.mailbox import LocalResult, deliver_local
from relaynet.delivery.mx import MXLookup, relay_name
from relaynet.delivery.tlspolicy import DSN as TLS_DSN, HopDecision, HopTLS, OutboundSecurity, ReportContext
from relaynet.delivery.routing import Refusal, Route, RouteKind, RoutingTable, order_hops
from relaynet.delivery.shaping import Destination, Shaper
from relaynet.queue.core import Outcome
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.queue.states import OutcomeEvent, RecipientStatus


class IOutbound(Protocol):
    """Delivers a message to some recipients through one next hop."""

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
        concurrency: int = 20, source_address: str | None = None, tls_policy: str = "none",
        auth: tuple[str, str] | None = None, auth_cleartext: bool = False, dkim: bool = False,
        hop_tls: HopTLS | None = None, tls_report: ReportContext | None = None, tls_name: str | None = None,
        source_pool: str | None = None, destination: Destination | None = None,
    ) -> Deferred[list[DeliveryResult]]:
        """
        One L{DeliveryResult} per recipient the hop was tried for.

        @param auth: the route's SMTP AUTH C{(username, password)}, if any.
        @param auth_cleartext: the route allows AUTH without TLS.
        @param dkim: the route signs (given only when it does).
        @param hop_tls: what DANE or MTA-STS asks of the connection (given
            only when something does).
        @param tls_report: what the session counts under in TLS reports
            (given only with C{[tls_rpt]}).
        @param tls_name: the name C{tls = "verify"} checks (given for MX hosts).
        @param source_pool: the route's C{[egress]} pool (given only when it has one).
        @param destination: the traffic-shaping destination (given only with
            C{[shaping]}: L{relaynet.delivery.shaping}).
        """


class ILMTP(Protocol):
    """Delivers a message to some recipients through one LMTP server."""

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient], concurrency: int = 20,
    ) -> Deferred[list[DeliveryResult]]:
        """One L{DeliveryResult} per recipient, from its own reply (RFC 2033)."""


class IMailboxes(Protocol):
    """Delivers a message into the local Maildirs of some recipients."""

    def deliver(self, entry: QueueEntry, addresses: list[str]) -> Deferred[list[LocalResult]]:
        """One L{LocalResult} per address, in order."""


class ThreadedMailboxes:
    """L{IMailboxes} writing with L{deliver_local} in a worker thread."""

    def __init__(self, reactor: Any, pool: ThreadPool, local: Callable[[], LocalDelivery]) -> None:
        """
        @param local: the C{[local]} settings in force (they change on reload).
        """
        self._reactor = reactor
        self._pool = pool
        self._local = local

    def deliver(self, entry: QueueEntry, addresses: list[str]) -> Deferred[list[LocalResult]]:
        return deferToThreadPool(self._reactor, self._pool, deliver_local, self._local(), entry, addresses)


def outcome_of(res: DeliveryResult) -> Outcome:
    """The L{Outcome} of a next hop's answer for one recipient."""
    if res.ok:
        status, event = RecipientStatus.RELAYED, OutcomeEvent.SENT
    elif res.permanent:
        status, event = RecipientStatus.BOUNCED, OutcomeEvent.BOUNCED
    else:
        status, event = RecipientStatus.DEFERRED, OutcomeEvent.DEFERRED
    return Outcome(
        res.address, status, event, res.enhanced, res.diagnostic, res.remote,
        # A refusal relaynet decided itself carries no reply code: the hop
        # said nothing, so it is not the DSN's Remote-MTA.
        res.dsn_peer and res.ok, 0 if res.local else res.code, res.text, res.tls,
        named=res.named and res.ok,
    )


def lmtp_outcome(res: DeliveryResult) -> Outcome:
    """
    The L{Outcome} of an LMTP server's answer for one recipient.

    A 2xx after the final dot means the message is in the mailbox: final
    delivery, recorded as C{delivered} (event C{delivered}, DSN action
    C{delivered} when NOTIFY=SUCCESS asks for one), naming the LMTP server
    as the relay. Not C{relayed}: that action (RFC 3464 2.3.3) is for a next
    hop that may not report delivery itself, and no LMTP server sends DSNs
    (Postfix's C{lmtp_assume_final}). 4xx or no reply: deferred; 5xx:
    bounced, the server's reply in the DSN.
    """
    if res.ok:
        return Outcome(
            res.address, RecipientStatus.DELIVERED, OutcomeEvent.DELIVERED, res.enhanced,
            res.diagnostic, res.remote, code=res.code, text=res.text,
        )
    make = Outcome.bounced if res.permanent else Outcome.deferred
    return make(res.address, res.enhanced, res.diagnostic, res.remote, res.code, res.text)


def local_outcome(res: LocalResult) -> Outcome:
    """The L{Outcome} of a local delivery to one recipient."""
    if res.ok:
        return Outcome.delivered(res.address)
    if res.permanent:
        return Outcome.bounced(res.address, res.dsn, res.diagnostic, remote="local")
    return Outcome.deferred(res.address, res.dsn, res.diagnostic, remote="local")


def refusal_outcome(address: str, refusal: Refusal) -> Outcome:
    """A recipient the routing table in force no longer routes."""
    text = f"{refusal.code} {refusal.enhanced} {refusal.text}"
    make = Outcome.bounced if refusal.permanent else Outcome.deferred
    return make(address, refusal.enhanced, text, code=refusal.code, text=refusal.text)


class Delivery:
    """
    Makes delivery attempts.

    @ivar routing: returns the routing table in force (a reload changes it,
        and queued mail follows: C{relaynet queue reroute} is a flush).
    """

    log = Logger()

    def __init__(
        self,
        routing: Callable[[], RoutingTable],
        outbound: IOutbound,
        mailboxes: IMailboxes,
        resolver: Callable[[], Any],
        shuffle: Callable[[list[Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        lmtp: ILMTP | None = None,
        security: Callable[[], OutboundSecurity | None] | None = None,
        shaper: Callable[[], Shaper | None] | None = None,
    ) -> None:
        """
        @param shaper: returns the traffic shaping in force (or C{None}); by
            default the outbound agent's C{shaper} attribute, if it has one
            (L{relaynet.delivery.client.OutboundManager.configure_shaping}).
        @param security: returns DANE and MTA-STS for C{mx} routes (or
            C{None}: the routes' own TLS policies only).
        @param resolver: returns the DNS resolver (created on first use).
        @param lmtp: delivers C{lmtp} routes (without one, their recipients
            are deferred: C{4.3.5}).
        @param shuffle: shuffles next hops and MX hosts of equal priority
            (tests inject one).
        @param clock: seconds, for the DNS cache's TTLs.
        """
        self.routing = routing
        self.outbound = outbound
        self.mailboxes = mailboxes
        self.lmtp = lmtp
        self._resolver = resolver
        self._shuffle = shuffle
        self._clock = clock
        self._security = security
        self._shaper: Callable[[], Shaper | None] = (
            shaper if shaper is not None else (lambda: getattr(self.outbound, "shaper", None))
        )
        self._mx: MXLookup | None = None
        self._order: Callable[[Sequence[NextHop]], list[NextHop]] = (
            order_hops if shuffle is None else (lambda hops: order_hops(hops, shuffle))
        )

    def attempt(self, entry: QueueEntry, recipients: Sequence[Recipient]) -> Deferred[list[Outcome]]:
        """
        Deliver C{entry} to C{recipients}; fires with one outcome per
        recipient, never with a failure.
        """
        table = self.routing()
        groups: dict[Route, list[Recipient]] = {}
        outcomes: list[Outcome] = []
        for r in recipients:
            route = table.route(r.address)
            if isinstance(route, Refusal):
                outcomes.append(refusal_outcome(r.address, route))
            else:
                groups.setdefault(route, []).append(r)
        parts = [self._guarded(entry, route, rcpts) for route, rcpts in groups.items()]
        d = gatherResults(parts, consumeErrors=True)
        return d.addCallback(lambda results: outcomes + [o for part in results for o in part])

    def _guarded(self, entry: QueueEntry, route: Route, rcpts: list[Recipient]) -> Deferred[list[Outcome]]:
        """Deliver one route's group; any exception defers the group alone."""

        def failed(f: Failure) -> list[Outcome]:
            self.log.failure(
                "Delivery of {queue_id} by route {route} failed", f,
                queue_id=entry.queue_id, route=route.name,
            )
            text = f"internal error: {f.type.__name__ if f.type else 'error'}: {f.getErrorMessage()}"
            return [Outcome.deferred(r.address, "4.3.0", text) for r in rcpts]

        d: Deferred[list[Outcome]]
        if route.kind is RouteKind.LOCAL:
            d = maybeDeferred(self.mailboxes.deliver, entry, [r.address for r in rcpts]).addCallback(
                lambda results: [local_outcome(res) for res in results]
            )
        elif route.kind is RouteKind.RELAY and self._shaper() is None:
            # The common case, straight to the hops: one generator less
            # than through _relay, which would only pass the result on.
            rule = route.rule
            assert rule is not None
            d = maybeDeferred(self._try_hops, entry, rule, self._order(rule.next_hops), rcpts)
        else:
            d = maybeDeferred(self._relay, entry, route, rcpts)
        return d.addErrback(failed)

    @inlineCallbacks
    def _relay(self, entry: QueueEntry, route: Route, rcpts: list[Recipient]) -> Any:
        rule = route.rule
        assert rule is not None
        if route.kind is RouteKind.LMTP:
            if self.lmtp is None:
                return [Outcome.deferred(r.address, "4.3.5", "no LMTP agent in this node") for r in rcpts]
            result = yield self._try_hops(entry, rule, self._order(rule.next_hops), rcpts, lmtp=True)
            return result
        if route.kind is RouteKind.MX:
            by_domain: dict[str, list[Recipient]] = {}
            for r in rcpts:
                by_domain.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
            out: list[Outcome] = []
            outbound = self.routing().config.outbound
            for domain, rs in by_domain.items():
                answer = yield self.mx().lookup(domain, rule.mx_port)
                if answer.failure is not None:
                    status, dsn, text = answer.failure
                    make = Outcome.deferred if status == "deferred" else Outcome.bounced
                    out += [make(r.address, dsn, text) for r in rs]
                    continue
                tries = answer.hops(rule.mx_port, outbound.mx_address_limit)
                names = [relay_name(ex, address, rule.mx_port) for ex, address, _ in tries]
                shaper = self._shaper()
                # Shaped by the domain, or by a rule matching its MX hosts.
                dest = shaper.destination(domain, [ex.name for ex, _, _ in tries]) if shaper is not None else None
                security = self._security() if self._security is not None else None
                if entry.envelope.params.get("tlsrpt"):
                    # A TLS report goes whatever TLS fails (RFC 8460 5.3).
                    security = None
                if security is None:
                    out += yield self._try_hops(
                        entry, rule, [hop for _, _, hop in tries], rs, names=names,
                        session_limit=outbound.mx_session_limit, tls_names=[ex.name for ex, _, _ in tries],
                        destination=dest,
                    )
                    continue
                decision = yield security.decide(domain, [ex.name for ex, _, _ in tries], rule.mx_port)
                if decision.failure is not None:
                    out += [Outcome.deferred(r.address, TLS_DSN, decision.failure) for r in rs]
                    continue
                usable, hop_tls, reports, skipped = [], [], [], []
                for (ex, _, hop), name in zip(tries, names):
                    d = decision.hosts.get(ex.name, HopDecision())
                    if d.skip is not None:
                        skipped.append((name, TLS_DSN, d.skip))
                    else:
                        usable.append((hop, name, ex.name))
                        hop_tls.append(d.tls)
                        reports.append(d.report if security.reports is not None else None)
                if not usable:
                    # Nowhere DANE or the domain's MTA-STS policy lets the
                    # mail go: deferred, never sent without the TLS asked for.
                    last = skipped[-1]
                    out += [
                        evolve(Outcome.deferred(r.address, TLS_DSN, last[2], last[0]), tried=tuple(skipped[:-1]))
                        for r in rs
                    ]
                    continue
                out += yield self._try_hops(
                    entry, rule, [hop for hop, _, _ in usable], rs, names=[n for _, n, _ in usable],
                    session_limit=outbound.mx_session_limit, hop_tls=hop_tls, skipped=skipped,
                    tls_reports=reports, tls_names=[x for _, _, x in usable], destination=dest,
                )
            return out
        shaper = self._shaper()
        if shaper is None:
            result = yield self._try_hops(entry, rule, self._order(rule.next_hops), rcpts)
            return result
        # Shaped: one transaction per destination (a recipient domain, or a
        # rule matching the domain or the next hops' host names).
        hosts = [_endpoint_host(h.endpoint) for h in rule.next_hops]
        by_dest: dict[tuple[str, ...], tuple[Destination, list[Recipient]]] = {}
        for r in rcpts:
            dest = shaper.destination(r.address.rpartition("@")[2].lower(), hosts)
            by_dest.setdefault(dest.key, (dest, []))[1].append(r)
        shaped: list[Outcome] = []
        for dest, rs in by_dest.values():
            shaped += yield self._try_hops(entry, rule, self._order(rule.next_hops), rs, destination=dest)
        return shaped

    @inlineCallbacks
    def _try_hops(
        self, entry: QueueEntry, rule: RouteRule, hops: list[NextHop], rcpts: list[Recipient],
        names: list[str] | None = None, session_limit: int = 0, lmtp: bool = False,
        hop_tls: Sequence[HopTLS | None] = (), skipped: Sequence[tuple[str, str, str]] = (),
        tls_reports: Sequence[ReportContext | None] = (), tls_names: Sequence[str] = (),
        destination: Destination | None = None,
    ) -> Any:
        """
        Try C{hops} in order until every recipient has a final answer.

        @param names: what to call each hop in events and DSNs (MX:
            C{mx.example[192.0.2.1]:25}); by default its C{host:port}.
        @param session_limit: stop after this many hops that answered in
            SMTP but deferred (0: no limit; Postfix's C{smtp_mx_session_limit}).
        @param lmtp: the hops are LMTP servers (L{ILMTP}; a 2xx is final delivery).
        @param hop_tls: per hop, what DANE or MTA-STS asks of its TLS (or C{None}).
        @param skipped: C{(hop, dsn, why)} of hops DANE or MTA-STS ruled
            out, for each recipient's C{tried}.
        @param tls_reports: per hop, what its session counts under in TLS reports.
        @param tls_names: per hop, the host name its certificate must have
            under C{tls = "verify"} (an MX host's name: its endpoint is an
            address); by default the endpoint's host.
        @param destination: the traffic-shaping destination of every hop
            (given to the outbound agent only when there is one).
        """
        remaining = list(rcpts)
        final: dict[str, Outcome] = {}
        last: dict[str, Outcome] = {}
        tried: dict[str, list[tuple[str, str, str]]] = {r.address: list(skipped) for r in rcpts} if skipped else {}
        sessions = 0
        judge = lmtp_outcome if lmtp else outcome_of
        # Keywords the same for every hop of this route and message, given
        # only when used (outbound agents without a feature need not know
        # its keyword): credentials, DKIM signing, the egress pool (the
        # injection token's, else the route's), the shaping destination.
        common: dict[str, Any] = {}
        if rule.auth is not None:
            common.update(auth=rule.auth, auth_cleartext=rule.auth_cleartext)
        if not lmtp and self._signs(rule):
            common["dkim"] = True
        pool = entry.envelope.params.get("source_pool") or rule.source_pool
        if pool is not None:
            common["source_pool"] = pool
        if destination is not None:
            common["destination"] = destination
        for i, hop in enumerate(hops):
            if session_limit and sessions >= session_limit:
                break
            if lmtp:
                assert self.lmtp is not None
                results = yield self.lmtp.deliver(hop.endpoint, entry, remaining, rule.concurrency)
            else:
                # Per hop: what DANE/MTA-STS ask of it, its TLS report
                # context, the name tls = "verify" checks.
                options = dict(common)
                if i < len(hop_tls) and hop_tls[i] is not None:
                    options["hop_tls"] = hop_tls[i]
                if i < len(tls_reports) and tls_reports[i] is not None:
                    options["tls_report"] = tls_reports[i]
                if rule.tls == "verify" and i < len(tls_names):
                    options["tls_name"] = tls_names[i]
                results = yield self.outbound.deliver(
                    hop.endpoint, entry, remaining, rule.concurrency, rule.source_address, rule.tls, **options
                )
            if names is not None:
                results = [evolve(r, remote=names[i]) for r in results]
            if any(r.code for r in results):
                sessions += 1
            by_addr = {r.address: r for r in results}
            still = []
            for r in remaining:
                res = by_addr.get(r.address)
                if res is None:
                    continue
                o = judge(res)
                if o.status is RecipientStatus.DEFERRED:
                    last[r.address] = o
                    still.append(r)
                    tried.setdefault(r.address, []).append((res.remote, o.dsn, o.diagnostic))
                else:
                    earlier = tried.get(r.address)
                    # attrs' evolve costs microseconds: only when it changes something.
                    final[r.address] = evolve(o, tried=tuple(earlier or ())) if earlier or o.tried else o
            remaining = still
            if not remaining:
                break
        for r in remaining:
            o = last.get(r.address) or Outcome.deferred(r.address, "4.4.1", "no next hop could be reached")
            # The final event names the last hop; the ones before it are in tried.
            final[r.address] = evolve(o, tried=tuple(tried.get(r.address, ()))[:-1])
        return [final[r.address] for r in rcpts if r.address in final]

    def _signs(self, rule: RouteRule) -> bool:
        """Whether C{rule}'s mail goes DKIM-signed: its C{dkim}, else C{[dkim] sign}."""
        return self._config().dkim.sign if rule.dkim is None else rule.dkim

    def mx(self) -> MXLookup:
        """The MX lookup (made on first use, over the resolver)."""
        if self._mx is None:
            self._mx = MXLookup.for_config(
                self._resolver(), self._clock, self._config, shuffle=self._shuffle or random.shuffle,
            )
        return self._mx

    def _config(self) -> NodeConfig:
        """The configuration in force (the routing table's)."""
        return self.routing().config


def _endpoint_host(endpoint: str) -> str:
    """The host of a next hop's endpoint string (for C{mx} shaping patterns)."""
    _, args, kw = split_endpoint(endpoint)
    return (kw.get("host") or (args[0] if args else "")).lower()


def system_resolver(reactor: Any, servers: Sequence[tuple[str, int]] = ()) -> Any:
    """
    The DNS resolver for MX delivery: C{servers} (C{[dns].servers}) if given,
    else the system's C{/etc/resolv.conf}. DNS only, as Postfix's
    C{smtp_host_lookup = dns}: C{/etc/hosts} has no MX records, and an
    exchanger's address comes from the same DNS as its MX.
    L{relaynet.delivery.mx.MXLookup} caches the answers for their TTL.
    """
    from twisted.names import client

    return client.Resolver(
        resolv=None if servers else "/etc/resolv.conf", servers=list(servers) or None, reactor=reactor
    )
