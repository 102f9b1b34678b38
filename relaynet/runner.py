# -*- test-case-name: tests.test_forwarding -*-
"""
The queue runner: takes committed messages and delivers them.

A message is attempted as soon as it is committed (no waiting for a queue
scan), and again when its retry time comes. For each attempt the pending
recipients are grouped by route: local ones are written into Maildirs in a
worker thread; relayed ones go to the route's next hops in priority order
(equal priorities share the load, a transient failure moves the recipient on
to the next hop: failover), or to the MX hosts of an C{mx} route.

Outcomes per recipient: 2xx done; 4xx, connection failure or timeout:
deferred with exponential backoff (L{RetryPolicy}); 5xx: bounced. A message
past its lifetime bounces with 4.4.7. Delivery status notifications (RFC 3464)
are queued before the outcome that causes them is recorded, and the outcome is
recorded durably (state file, or removal of the message) before anything else
happens, so a crash can only repeat an attempt or a DSN, never lose one.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from attrs import evolve, frozen
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaynet.delivery.bounce import RecipientReport, build_dsn, is_bounce_worthy, split_headers
from relaynet.config import NextHop, NodeConfig, RouteRule
from relaynet.events import EventLog
from relaynet.delivery.mailbox import deliver_local
from relaynet.delivery.client import DeliveryResult, OutboundManager
from relaynet.delivery.routing import Route, RouteKind, RoutingTable, order_hops
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import Envelope, QueueEntry, Recipient, RecipientState, Spool
from relaynet.queue.timetable import Timetable


@frozen
class Outcome:
    """
    The result of one attempt for one recipient.

    @ivar status: C{delivered} (local), C{relayed}, C{deferred} or C{bounced}.
    @ivar event: the event name: C{delivered}, C{sent}, C{deferred},
        C{bounced} or C{expired}.
    """

    address: str
    status: str
    event: str
    dsn: str
    diagnostic: str = ""
    remote: str | None = None
    dsn_peer: bool = False
    code: int = 0
    text: str = ""
    tls: str | None = None
    tried: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_result(cls, res: DeliveryResult) -> "Outcome":
        status, event = (
            ("relayed", "sent") if res.ok
            else ("bounced", "bounced") if res.permanent
            else ("deferred", "deferred")
        )
        return cls(
            res.address, status, event, res.enhanced, res.diagnostic, res.remote,
            res.dsn_peer and res.ok, res.code, res.text, res.tls,
        )


class QueueRunner:
    """
    Schedules and performs delivery attempts for one node's queue.

    @ivar entries: queued messages by queue id.
    """

    log = Logger()

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        events: EventLog,
        reactor: Any,
        threadpool: ThreadPool,
        outbound: OutboundManager | None = None,
        now: Callable[[], float] = time.time,
        resolver: Any = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.events = events
        self.reactor = reactor
        self.pool = threadpool
        q = config.queue
        self.policy = RetryPolicy(
            minimal_backoff=q.minimal_backoff, maximal_backoff=q.maximal_backoff, lifetime=q.lifetime
        )
        self.now = now
        self.outbound = outbound or OutboundManager(
            reactor, config.outbound, config.outbound.helo_name or config.hostname, config.tls.ca_file
        )
        self._resolver = resolver
        self.entries: dict[str, QueueEntry] = {}
        self._busy: dict[str, Deferred[list[Outcome]]] = {}
        self._sem = DeferredSemaphore(q.concurrency)
        self._timetable = Timetable(reactor, self._fire, lambda: self._sem.tokens > 0)
        self._running = False

    # -- lifecycle -------------------------------------------------------

    def start(self, entries: list[QueueEntry]) -> None:
        """Take over recovered messages and begin delivering."""
        self._running = True
        for entry in entries:
            self.entries[entry.queue_id] = entry
            due = entry.state.next_attempt
            delay = 0.0 if due is None else max(0.0, due - self.now())
            if not entry.state.held:
                self._schedule(entry, delay)

    def stop(self) -> Deferred[None]:
        """Stop scheduling; the Deferred fires when running attempts are done."""
        self._running = False
        self._timetable.clear()
        self.outbound.close()
        running = list(self._busy.values())
        if not running:
            return succeed(None)
        return gatherResults(running, consumeErrors=True).addBoth(lambda _: None)

    def enqueue(self, entry: QueueEntry) -> None:
        """
        A message was just committed: deliver it now, or as soon as an
        attempt slot is free (it waits in the timetable, like any due message).
        """
        self.entries[entry.queue_id] = entry
        if self._running:
            self._schedule(entry, 0)

    def cut_through(self, entry: QueueEntry) -> Deferred[tuple[int, str, str]]:
        """
        Deliver a just-committed message at once and derive the reply to the
        client's final dot from the next hops' answers (C{ack = "cut-through"}):
        every recipient accepted: 250; every recipient refused permanently: the
        next hop's 5xx, and the message is dropped without a bounce (the client
        has the refusal); anything else (deferrals, mixed results, no next hop
        reachable): 250, and the message stays queued (store-and-forward).
        """
        self.entries[entry.queue_id] = entry
        d = self._attempt(entry, cut_through=True)
        qid = entry.queue_id

        def reply(outcomes: list[Outcome]) -> tuple[int, str, str]:
            if outcomes and all(o.status == "bounced" and o.code >= 500 for o in outcomes):
                o = outcomes[0]
                return o.code, o.dsn, f"{o.text} (from {o.remote})"
            if outcomes and all(o.status in ("relayed", "delivered") for o in outcomes):
                o = outcomes[0]
                return 250, "2.0.0", f"Ok: queued as {qid}; relayed: {o.code} {o.dsn} {o.text}".rstrip()
            return 250, "2.0.0", f"Ok: queued as {qid}"

        return d.addCallback(reply)

    # -- administration (relaynet queue ..., the admin API) -------------

    def list(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[dict[str, Any]]:
        """
        Summaries of queued messages, oldest first, filtered by state,
        sender or recipient (substring, case-insensitive), recipient domain
        and minimum age in seconds.
        """
        return self.summaries(self.matching(state, sender, recipient, domain, min_age))

    def matching(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[QueueEntry]:
        """
        The queued messages L{list} would show, oldest first, without building
        their summaries (a listing of 20 out of 100,000 builds 20).
        """
        now = self.now()
        sender = sender.lower() if sender else None
        recipient = recipient.lower() if recipient else None
        domain = domain.lower() if domain else None
        out = []
        for entry in sorted(self.entries.values(), key=lambda e: e.envelope.arrival):
            env = entry.envelope
            if state and entry_state(entry, entry.queue_id in self._busy) != state:
                continue
            if sender and sender not in env.sender.lower():
                continue
            if recipient or domain:
                addrs = [r.address.lower() for r in env.recipients]
                if recipient and not any(recipient in a for a in addrs):
                    continue
                if domain and not any(a.rpartition("@")[2] == domain for a in addrs):
                    continue
            if min_age is not None and now - env.arrival < min_age:
                continue
            out.append(entry)
        return out

    def summaries(self, entries: list[QueueEntry]) -> list[dict[str, Any]]:
        """L{entry_summary} of each of C{entries}."""
        now = self.now()
        return [entry_summary(e, e.queue_id in self._busy, now) for e in entries]

    def show(self, queue_id: str) -> Deferred[dict[str, Any]] | None:
        """
        The summary of one message plus its header section (read in a worker
        thread); C{None} if there is no such message.
        """
        entry = self.entries.get(queue_id)
        if entry is None:
            return None

        def headers() -> str:
            with entry.open_message() as f:
                head, _ = split_headers(f.read(256 * 1024))
            return head.decode("utf-8", "replace")

        d = deferToThreadPool(self.reactor, self.pool, headers)
        summary = entry_summary(entry, queue_id in self._busy, self.now())
        summary["envelope"] = entry.envelope.to_json()
        return d.addCallback(lambda h: {**summary, "headers": h})

    def _select(self, queue_id: str | None, domain: str | None) -> list[QueueEntry]:
        if queue_id is not None:
            entry = self.entries.get(queue_id)
            return [entry] if entry is not None else []
        entries = list(self.entries.values())
        if domain is not None:
            d = domain.lower()
            entries = [
                e for e in entries
                if any(r.address.rpartition("@")[2].lower() == d for r in e.pending_recipients())
            ]
        return entries

    def flush(self, queue_id: str | None = None, domain: str | None = None) -> int:
        """Attempt queued messages now (all, one, or those for a domain); return how many."""
        n = 0
        for entry in self._select(queue_id, domain):
            if not entry.state.held:
                self._schedule(entry, 0)
                n += 1
        return n

    @inlineCallbacks
    def hold(self, queue_id: str) -> Any:
        """Keep a message from being attempted until released (durably)."""
        entry = self.entries.get(queue_id)
        if entry is None:
            return False
        entry.state.held = True
        self._timetable.cancel(queue_id)
        yield self.spool.record(entry)
        self.events.emit("hold", queue_id=queue_id, sender=entry.envelope.sender)
        return True

    @inlineCallbacks
    def release(self, queue_id: str) -> Any:
        """Release a held message and attempt it now."""
        entry = self.entries.get(queue_id)
        if entry is None:
            return False
        entry.state.held = False
        entry.state.next_attempt = None
        yield self.spool.record(entry)
        self.events.emit("release", queue_id=queue_id, sender=entry.envelope.sender)
        if self._running:
            self._schedule(entry, 0)
        return True

    @inlineCallbacks
    def delete(self, queue_id: str) -> Any:
        """Remove a message without notifying anyone (C{postsuper -d})."""
        entry = self.entries.get(queue_id)
        if entry is None or queue_id in self._busy:
            return False
        self.entries.pop(queue_id, None)
        self._timetable.cancel(queue_id)
        yield self.spool.remove(entry)
        self.events.emit("deleted", queue_id=queue_id, sender=entry.envelope.sender, status="deleted")
        return True

    @inlineCallbacks
    def bounce(self, queue_id: str, reason: str = "message returned by the administrator") -> Any:
        """Bounce every pending recipient now, with a DSN to the sender (5.0.0)."""
        entry = self.entries.get(queue_id)
        if entry is None or queue_id in self._busy:
            return False
        self._timetable.cancel(queue_id)
        outcomes = [
            Outcome(r.address, "bounced", "bounced", "5.0.0", reason) for r in entry.pending_recipients()
        ]
        yield self._record(entry, outcomes)
        return True

    def reroute(self, queue_id: str | None = None, domain: str | None = None) -> int:
        """
        Route queued messages again with the current table: routes are looked
        up at each attempt, so this is a flush that also releases nothing.
        """
        return self.flush(queue_id, domain)

    def reconfigure(self, config: NodeConfig) -> None:
        """Use a new configuration (SIGHUP): routing, limits, retry policy."""
        self.config = config
        q = config.queue
        self.policy = RetryPolicy(
            minimal_backoff=q.minimal_backoff, maximal_backoff=q.maximal_backoff, lifetime=q.lifetime
        )
        self.outbound.timeouts = config.outbound
        self.outbound.ca_file = config.tls.ca_file
        self.outbound.close_idle()

    def counts(self) -> dict[str, int]:
        """Queued messages by state."""
        out = {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
        for qid, entry in self.entries.items():
            out[entry_state(entry, qid in self._busy)] += 1
        return out

    def _schedule(self, entry: QueueEntry, delay: float) -> None:
        self._timetable.set(entry.queue_id, delay)

    def _fire(self, qid: str) -> None:
        entry = self.entries.get(qid)
        if entry is not None and self._running:
            self._attempt(entry)

    def _attempt(self, entry: QueueEntry, cut_through: bool = False) -> Deferred[list[Outcome]]:
        qid = entry.queue_id
        if qid in self._busy:
            return self._busy[qid]
        d = self._sem.run(self._deliver, entry, cut_through)
        self._busy[qid] = d

        def done(result: object) -> object:
            self._busy.pop(qid, None)
            if isinstance(result, Failure):
                self.log.failure("Delivery attempt of {queue_id} failed", result, queue_id=qid)
                if self._running and qid in self.entries:
                    self._schedule(entry, self.policy.minimal_backoff)
                result = []
            if self._running:
                self._timetable.kick()  # a slot is free: start what is due
            return result

        d.addBoth(done)
        return d

    # -- one attempt -----------------------------------------------------

    @inlineCallbacks
    def _deliver(self, entry: QueueEntry, cut_through: bool = False) -> Any:
        now = self.now()
        pending = entry.pending_recipients()
        if not pending:
            yield self.spool.remove(entry)
            self.entries.pop(entry.queue_id, None)
            return []
        if self.policy.expired(entry.envelope.arrival, now):
            outcomes = []
            for r in pending:
                st = entry.state.recipients.get(r.address)
                last = st.diagnostic if st and st.diagnostic else "no attempt succeeded"
                outcomes.append(Outcome(
                    r.address, "bounced", "expired", "4.4.7",
                    f"delivery time expired (message queued for {int(now - entry.envelope.arrival)} s):"
                    f" last error: {last}", st.remote if st else None,
                ))
        else:
            groups: dict[Route, list[Recipient]] = {}
            outcomes = []
            for r in pending:
                route, refusal = self.route_for(r.address)
                if route is None:
                    assert refusal is not None
                    outcomes.append(refusal)
                else:
                    groups.setdefault(route, []).append(r)
            parts = []
            for route, rcpts in groups.items():
                if route.kind is RouteKind.LOCAL:
                    parts.append(self._local(entry, rcpts))
                else:
                    parts.append(self._relay_route(entry, route, rcpts))
            results = yield gatherResults(parts, consumeErrors=True)
            outcomes += [o for part in results for o in part]
        refused = cut_through and outcomes and all(
            o.status == "bounced" and o.code >= 500 for o in outcomes
        )
        yield self._record(entry, outcomes, notify_failures=not refused, started=now)
        return outcomes

    def _local(self, entry: QueueEntry, rcpts: list[Recipient]) -> Deferred[list[Outcome]]:
        d = deferToThreadPool(
            self.reactor, self.pool, deliver_local, self.config.local, entry, [r.address for r in rcpts]
        )

        def convert(results: list[Any]) -> list[Outcome]:
            out = []
            for res in results:
                if res.ok:
                    out.append(Outcome(res.address, "delivered", "delivered", "2.0.0", "delivered to maildir", "local"))
                elif res.permanent:
                    out.append(Outcome(res.address, "bounced", "bounced", res.dsn, res.diagnostic, "local"))
                else:
                    out.append(Outcome(res.address, "deferred", "deferred", res.dsn, res.diagnostic, "local"))
            return out

        return d.addCallback(convert)

    def route_for(self, address: str) -> tuple[Route | None, Outcome | None]:
        """
        Route a recipient with the routing table in force now (so a changed
        table, after a reload, applies to queued mail; C{relaynet queue
        reroute} is a flush). Relay permission was settled at acceptance.

        @return: C{(route, None)}, or C{(None, outcome)} when the recipient
            can no longer be routed (the outcome bounces or defers it).
        """
        route = RoutingTable(self.config).route(address)
        if isinstance(route, Route):
            return route, None
        status = "bounced" if route.permanent else "deferred"
        return None, Outcome(address, status, status, route.enhanced,
                             f"{route.code} {route.enhanced} {route.text}", code=route.code, text=route.text)

    @inlineCallbacks
    def _relay_route(self, entry: QueueEntry, route: Route, rcpts: list[Recipient]) -> Any:
        rule = route.rule
        assert rule is not None and rule.action in ("relay", "mx")
        if rule.action == "mx":
            by_domain: dict[str, list[Recipient]] = {}
            for r in rcpts:
                by_domain.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
            out = []
            for domain, rs in by_domain.items():
                hops_or_error = yield self._mx_hops(domain, rule)
                if isinstance(hops_or_error, tuple):
                    status, dsn, text = hops_or_error
                    out += [Outcome(r.address, status, status if status == "deferred" else "bounced",
                                    dsn, text) for r in rs]
                else:
                    out += yield self._try_hops(entry, rule, hops_or_error, rs)
            return out
        result = yield self._try_hops(entry, rule, order_hops(rule.next_hops), rcpts)
        return result

    @inlineCallbacks
    def _try_hops(
        self, entry: QueueEntry, rule: RouteRule, hops: list[NextHop], rcpts: list[Recipient]
    ) -> Any:
        remaining = list(rcpts)
        final: dict[str, Outcome] = {}
        last: dict[str, Outcome] = {}
        tried: dict[str, list[tuple[str, str, str]]] = {}
        for hop in hops:
            results = yield self.outbound.deliver(
                hop.endpoint, entry, remaining, rule.concurrency, rule.source_address, rule.tls
            )
            by_addr = {r.address: r for r in results}
            still = []
            for r in remaining:
                res = by_addr.get(r.address)
                if res is None:
                    continue
                o = Outcome.from_result(res)
                if o.status == "deferred":
                    last[r.address] = o
                    still.append(r)
                    tried.setdefault(r.address, []).append((res.remote, o.dsn, o.diagnostic))
                else:
                    final[r.address] = evolve(o, tried=tuple(tried.get(r.address, ())))
            remaining = still
            if not remaining:
                break
        for r in remaining:
            o = last.get(r.address) or Outcome(
                r.address, "deferred", "deferred", "4.4.1", "no next hop could be reached"
            )
            # The final event names the last hop; the ones before it are in tried.
            final[r.address] = evolve(o, tried=tuple(tried.get(r.address, ()))[:-1])
        return [final[r.address] for r in rcpts if r.address in final]

    def _mx_hops(self, domain: str, rule: RouteRule) -> Deferred[Any]:
        """
        The next hops for C{domain} from DNS: MX records by preference (RFC
        5321 5.1), the domain's own address when it has no MX, nothing for a
        null MX (RFC 7505).

        @return: a Deferred firing with a list of L{NextHop}, or with
            C{(status, dsn, text)} when there is nowhere to go.
        """
        from twisted.names import dns, error

        resolver = self.resolver()

        @inlineCallbacks
        def lookup() -> Any:
            try:
                answers, _, _ = yield resolver.lookupMailExchange(domain)
            except error.DNSNameError:
                return ("bounced", "5.1.2", f"Host or domain name not found: {domain}")
            except Exception as e:
                return ("deferred", "4.4.3", f"DNS lookup of MX {domain} failed: {e.__class__.__name__}")
            mxs = sorted(
                (a.payload.preference, str(a.payload.name)) for a in answers if a.type == dns.MX
            )
            if len(mxs) == 1 and mxs[0][1] in ("", "."):
                return ("bounced", "5.1.10", f"{domain} accepts no mail (null MX)")
            if not mxs:
                mxs = [(0, domain)]
            hops = []
            for pref, host in mxs:
                try:
                    ip = yield resolver.getHostByName(host)
                except Exception:
                    continue
                literal = ip.replace(":", "\\:")
                hops.append(NextHop(endpoint=f"tcp:{literal}:{rule.mx_port}", priority=pref))
            if not hops:
                return ("deferred", "4.4.3", f"no address for the mail exchangers of {domain}")
            return order_hops(hops)

        return lookup()

    def resolver(self) -> Any:
        """The DNS resolver: C{[dns].servers}, else the system's."""
        if self._resolver is None:
            from twisted.names import client

            servers = list(self.config.dns_servers) or None
            self._resolver = client.createResolver(servers=servers, reactor=self.reactor)
        return self._resolver

    # -- recording and notifications ------------------------------------

    @inlineCallbacks
    def _record(
        self, entry: QueueEntry, outcomes: list[Outcome], notify_failures: bool = True,
        started: float | None = None,
    ) -> Any:
        now = self.now()
        env = entry.envelope
        by_addr = {r.address: r for r in env.recipients}
        reports: dict[str, list[RecipientReport]] = {}
        warn = (
            self.config.queue.delay_warning > 0
            and not entry.state.delay_warned
            and now - env.arrival >= self.config.queue.delay_warning
        )
        for o in outcomes:
            rcpt = by_addr.get(o.address)
            notify = rcpt.notify if rcpt else None
            action = {"bounced": "failed", "delivered": "delivered", "relayed": "relayed",
                      "deferred": "delayed"}[o.status]
            if o.status == "relayed" and o.dsn_peer:
                action = ""  # the next hop takes over DSN duties
            if o.status == "bounced" and not notify_failures:
                action = ""
            if o.status == "deferred" and not warn:
                action = ""
            if action and is_bounce_worthy(env.sender, notify, action):
                reports.setdefault(action, []).append(RecipientReport(
                    address=o.address, action=action, status=o.dsn,
                    original_recipient=rcpt.orcpt if rcpt else None,
                    remote_mta=o.remote if o.remote and o.remote != "local" else None,
                    diagnostic=o.diagnostic or None, last_attempt=now,
                ))
        for action, reps in reports.items():
            try:
                yield self._send_dsn(entry, reps)
            except Exception:
                self.log.failure("Could not queue a DSN for {queue_id}", queue_id=entry.queue_id)
        if warn and "delayed" in reports:
            entry.state.delay_warned = True

        retry = False
        for o in outcomes:
            st = entry.state.recipients.setdefault(o.address, RecipientState())
            st.attempts += 1
            st.last_attempt = now
            st.dsn = o.dsn
            st.diagnostic = o.diagnostic or None
            st.remote = o.remote
            st.status = o.status
            retry = retry or o.status == "deferred"
            self.events.emit(
                o.event, queue_id=entry.queue_id, sender=env.sender, recipient=o.address,
                relay=o.remote, delay=round(now - env.arrival, 6), dsn=o.dsn, status=o.event,
                diagnostic=o.diagnostic or None, hops=env.hops, tls=o.tls,
                next_queue_id=_queued_as(o.text) if o.status == "relayed" else None,
                duration=round(now - started, 6) if started is not None else None,
                tried=[{"relay": h, "dsn": d, "diagnostic": t} for h, d, t in o.tried] or None,
            )
        if not entry.pending_recipients():
            self.entries.pop(entry.queue_id, None)
            yield self.spool.remove(entry)
            return
        if retry:
            attempts = max(s.attempts for s in entry.state.recipients.values())
            delay = min(self.policy.delay(attempts), max(0.0, env.arrival + self.policy.lifetime - now))
            entry.state.next_attempt = now + delay
            yield self.spool.record(entry)
            if self._running and not entry.state.held:
                self._schedule(entry, delay)
            return
        yield self.spool.record(entry)

    @inlineCallbacks
    def _send_dsn(self, entry: QueueEntry, reports: list[RecipientReport]) -> Any:
        env = entry.envelope
        route = RoutingTable(self.config).route(env.sender)
        if not isinstance(route, Route):
            self.log.warn(
                "Cannot return a DSN for {queue_id} to <{sender}>: {reply}",
                queue_id=entry.queue_id, sender=env.sender, reply=route.text,
            )
            return
        ret_full = env.params.get("ret") != "HDRS"
        config = self.config

        def compose() -> bytes:
            with entry.open_message() as f:
                headers, body_start = split_headers(f.read(1 << 20))
            body = entry.open_message(skip=body_start) if ret_full else None
            try:
                return build_dsn(
                    reporting_mta=config.hostname, sender=env.sender, original_headers=headers,
                    original_body=body, reports=reports, arrival=env.arrival,
                    envid=env.params.get("envid"), queue_id=entry.queue_id, now=self.now(),
                )
            finally:
                if body is not None:
                    body.close()

        data = yield deferToThreadPool(self.reactor, self.pool, compose)
        dsn_env = Envelope(
            queue_id=self.spool.new_id(),
            sender="",
            recipients=(Recipient(address=env.sender, route=route.name),),
            arrival=self.now(),
            params={"body": None if data.isascii() else "8BITMIME",
                    "smtputf8": not env.sender.isascii()},
            client={"protocol": "local", "helo": config.hostname, "ip": "127.0.0.1",
                    "dsn_for": entry.queue_id},
            node=config.name,
        )
        writer = self.spool.begin(dsn_env)
        writer.write(data)
        new = yield writer.commit(hops=0)
        self.events.emit(
            "dsn", queue_id=new.queue_id, sender="", recipient=env.sender,
            original_queue_id=entry.queue_id, action=reports[0].action,
        )
        self.enqueue(new)


_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9]+)")


def _queued_as(text: str) -> str | None:
    """The next hop's queue id from its 250 text (Postfix and relaynet say "queued as ID")."""
    m = _QUEUED_AS.search(text or "")
    return m.group(1) if m else None


def entry_state(entry: QueueEntry, busy: bool) -> str:
    """
    The queue state of a message, as C{relaynet queue} shows it: C{active}
    (an attempt is running), C{hold}, C{deferred} (some recipient was
    deferred), or C{incoming} (not attempted yet).
    """
    if busy:
        return "active"
    if entry.state.held:
        return "hold"
    if any(s.status == "deferred" for s in entry.state.recipients.values()):
        return "deferred"
    return "incoming"


def entry_summary(entry: QueueEntry, busy: bool, now: float) -> dict[str, Any]:
    """A JSON-able summary of one queued message (the admin API's list item)."""
    env = entry.envelope
    rcpts = []
    for r in env.recipients:
        st = entry.state.recipients.get(r.address)
        rcpts.append({
            "address": r.address,
            "status": st.status if st else "pending",
            "attempts": st.attempts if st else 0,
            "dsn": st.dsn if st else None,
            "diagnostic": st.diagnostic if st else None,
            "remote": st.remote if st else None,
            "last_attempt": st.last_attempt if st else None,
        })
    return {
        "queue_id": env.queue_id,
        "state": entry_state(entry, busy),
        "sender": env.sender,
        "recipients": rcpts,
        "size": env.size,
        "arrival": env.arrival,
        "age": round(now - env.arrival, 3),
        "next_attempt": entry.state.next_attempt,
        "held": entry.state.held,
        "hops": env.hops,
        "client": env.client,
    }
