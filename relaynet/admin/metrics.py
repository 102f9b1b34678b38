# -*- test-case-name: tests.test_metrics -*-
"""
What a node has been doing, for operators: Prometheus metrics, next-hop
health and a short history of queue depth and throughput.

L{NodeMetrics} is fed by the node's event log (every event dict passes
through L{NodeMetrics.observe}) and by the spool's group commits; gauges that
describe the present (queue depth, open sessions, next-hop state) are read at
scrape time from the views it is given (L{relaynet.admin.views}), never from
the runner or the intake (the hop-state cache is read through the queue
runner's outbound manager, L{outbound_hop_states}). Each node has its own
L{CollectorRegistry}: the global one of C{prometheus_client} is never used.
The metric names are documented in C{docs/operations.md}.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping

from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relaynet import __version__
from relaynet.admin.adapters import outbound_destination_states, outbound_hop_states
from relaynet.admin.views import QueueStats, SessionsView

#: Delivery outcomes of a recipient, as event names.
RESULTS = ("sent", "delivered", "deferred", "bounced", "expired")
#: Outcomes after which a recipient has left the queue.
FINAL = ("sent", "delivered", "bounced", "expired")
#: A next hop with this many deferrals in a row (no success between) is failing.
FAILING_AFTER = 3
#: Distinct destination domains with their own label; later ones count as "other".
DOMAIN_LABELS = 200

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RESIDENCE_BUCKETS = (0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0)
HOP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def tls_version(value: Any) -> str:
    """The protocol version of an event's C{tls} field (C{"TLSv1.3 CIPHER"}), or C{none}."""
    if not value:
        return "none"
    return str(value).split()[0]


@define
class HopHealth:
    """
    How one next hop (C{host:port}, as events name it) has been answering.

    @ivar consecutive_deferrals: deferrals since the last success.
    @ivar last_error: the diagnostic of the last deferral or bounce.
    """

    name: str
    sent: int = 0
    deferred: int = 0
    bounced: int = 0
    consecutive_deferrals: int = 0
    last_attempt: float | None = None
    last_success: float | None = None
    last_failure: float | None = None
    last_error: str | None = None

    @property
    def state(self) -> str:
        """
        C{unknown} (no outcome names it: not tried yet, or only tried before
        another hop of its route gave the final answer, see below), C{up}
        (its last answer took the message, or
        refused it for good: it is answering), C{deferring} (its last attempt
        was deferred) or C{failing} (L{FAILING_AFTER} or more deferrals in a
        row).
        """
        if self.last_attempt is None:
            return "unknown"
        if self.consecutive_deferrals == 0:
            return "up"
        if self.consecutive_deferrals < FAILING_AFTER:
            return "deferring"
        return "failing"

    def record(self, event: str, when: float, diagnostic: str | None) -> None:
        """Count one recipient's outcome at this hop."""
        self.last_attempt = when
        if event in ("sent", "delivered"):
            self.sent += 1
            self.consecutive_deferrals = 0
            self.last_success = when
        elif event == "deferred":
            self.deferred += 1
            self.consecutive_deferrals += 1
            self.last_failure = when
            self.last_error = diagnostic
        else:
            self.bounced += 1
            self.consecutive_deferrals = 0
            self.last_failure = when
            self.last_error = diagnostic

    def to_json(self) -> dict[str, Any]:
        return {
            "next_hop": self.name, "state": self.state, "sent": self.sent,
            "deferred": self.deferred, "bounced": self.bounced,
            "consecutive_deferrals": self.consecutive_deferrals,
            "last_attempt": self.last_attempt, "last_success": self.last_success,
            "last_failure": self.last_failure, "last_error": self.last_error,
        }


@define
class Sample:
    """
    One point of the status page's chart: the queue at C{time}, and what
    happened during the C{interval} seconds before it.
    """

    time: float
    interval: float
    depth: int
    deferred: int
    hold: int
    received: int = 0
    delivered: int = 0
    deferrals: int = 0
    bounced: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time, "interval": self.interval, "depth": self.depth,
            "deferred": self.deferred, "hold": self.hold, "received": self.received,
            "delivered": self.delivered, "deferrals": self.deferrals, "bounced": self.bounced,
        }


@define
class History:
    """
    Queue depth and throughput over the last C{span} seconds, one L{Sample}
    every C{interval} seconds.

    @ivar depth: returns the queue's L{counts<QueueStats.counts>}.
    """

    clock: IReactorTime
    depth: Callable[[], Mapping[str, int]]
    interval: float = 10.0
    span: float = 1800.0
    samples: deque[Sample] = field(init=False)
    _counts: dict[str, int] = field(init=False, factory=dict)
    _since: float = field(init=False, default=0.0)
    _loop: LoopingCall | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.samples = deque(maxlen=max(1, int(self.span / self.interval)))
        self._since = self.clock.seconds()

    def count(self, what: str) -> None:
        """Count one event of kind C{received}, C{delivered}, C{deferrals} or C{bounced}."""
        self._counts[what] = self._counts.get(what, 0) + 1

    def _current(self) -> Sample:
        now = self.clock.seconds()
        c = self.depth()
        return Sample(
            time=now, interval=max(now - self._since, 0.0),
            depth=sum(c.values()), deferred=c.get("deferred", 0), hold=c.get("hold", 0),
            **self._counts,
        )

    def sample(self) -> Sample:
        """Close the current interval: append its sample and start a new one."""
        s = self._current()
        self.samples.append(s)
        self._counts = {}
        self._since = s.time
        return s

    def points(self) -> list[Sample]:
        """The samples so far plus the interval in progress (its counts so far)."""
        return [*self.samples, self._current()]

    def start(self) -> None:
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def zero_session_series(modes: Iterable[str]) -> list[tuple[str, bool]]:
    """
    The C{(mode, TLS)} keys of C{relaynet_smtp_sessions} that are exported
    even with no session open, so that a dashboard reads 0, not "no data":
    both TLS states for C{relay} and C{submission} listeners (STARTTLS), only
    TLS for C{submissions} (implicit TLS).

    @param modes: the modes of the configured listeners.
    """
    keys: list[tuple[str, bool]] = []
    for mode in sorted(set(modes)):
        keys.extend((mode, tls) for tls in ((True,) if mode == "submissions" else (False, True)))
    return keys


@define
class DomainHealth:
    """Final outcomes of one domain's recipients since the node started (the status page's list health)."""

    domain: str
    delivered: int = 0
    bounced: int = 0
    classes: dict[str, int] = field(factory=dict)

    @property
    def total(self) -> int:
        """Recipients with a final outcome."""
        return self.delivered + self.bounced

    @property
    def bounce_rate(self) -> float:
        """Bounced (and expired) over every final outcome (0 with none)."""
        return self.bounced / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        """As the status page and the API read it."""
        return {"domain": self.domain, "delivered": self.delivered, "bounced": self.bounced,
                "bounce_rate": round(self.bounce_rate, 4), "classes": dict(self.classes)}


@define
class ListHealth:
    """
    Bounce rates by sending domain and by destination domain: final
    outcomes (delivered or relayed, bounced or expired) and the classes of
    the bounces. At most C{limit} domains of each side are kept; later ones
    count under C{other} (bounded memory and label sets).
    """

    limit: int = DOMAIN_LABELS
    senders: dict[str, DomainHealth] = field(factory=dict)
    destinations: dict[str, DomainHealth] = field(factory=dict)

    def record(self, sender_domain: str, destination: str, bounced: bool, kind: str | None) -> None:
        """One final outcome."""
        for table, domain in ((self.senders, sender_domain), (self.destinations, destination)):
            if domain not in table and len(table) >= self.limit:
                domain = "other"
            h = table.get(domain)
            if h is None:
                h = table[domain] = DomainHealth(domain)
            if bounced:
                h.bounced += 1
                k = kind or "other"
                h.classes[k] = h.classes.get(k, 0) + 1
            else:
                h.delivered += 1

    def top(self, side: str, n: int = 10) -> list[DomainHealth]:
        """The C{n} domains of C{side} (C{sender}, C{destination}) with most bounces, then most outcomes."""
        table = self.senders if side == "sender" else self.destinations
        return sorted(table.values(), key=lambda h: (-h.bounced, -h.total, h.domain))[:n]


def suppression_counts(queue: object) -> Callable[[], Mapping[str, int]]:
    """
    The live entries of a queue runner's suppression list by source, read
    when called (C{{}} for a queue without one).
    """

    def read() -> Mapping[str, int]:
        counts = getattr(getattr(queue, "suppression", None), "counts", None)
        return dict(counts()) if callable(counts) else {}

    return read


def destination_families(states: Iterable[Mapping[str, Any]]) -> list[GaugeMetricFamily]:
    """The traffic-shaping gauges (L{relaynet.delivery.shaping.Destination.snapshot})."""
    paused = GaugeMetricFamily(
        "relaynet_destination_paused",
        "1 while a destination is paused by a throttling reply, 2 while slowed, else 0", labels=["destination"])
    tokens = GaugeMetricFamily(
        "relaynet_destination_tokens", "Tokens in a destination's rate bucket", labels=["destination"])
    conns = GaugeMetricFamily(
        "relaynet_destination_connections", "Connections open to a destination", labels=["destination"])
    throttles = GaugeMetricFamily(
        "relaynet_destination_throttles", "Throttling replies that paused or slowed a destination since start",
        labels=["destination"])
    for st in states:
        name = str(st["destination"])
        paused.add_metric([name], {"open": 0, "paused": 1, "slowed": 2}.get(str(st["state"]), 0))
        if st.get("tokens") is not None:
            tokens.add_metric([name], float(st["tokens"]))
        conns.add_metric([name], int(st["connections"]))
        throttles.add_metric([name], int(st["throttles"]))
    return [paused, tokens, conns, throttles]


class _PresentCollector(Collector):
    """Gauges read at scrape time: the queue, the sessions, the next hops."""

    def __init__(self, metrics: "NodeMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queue, sessions = self.metrics.queue, self.metrics.sessions
        q = GaugeMetricFamily("relaynet_queue_messages", "Queued messages by state", labels=["state"])
        for state, n in sorted(queue.counts().items()):
            q.add_metric([state], n)
        yield q
        totals = queue.totals()
        yield GaugeMetricFamily("relaynet_queue_bytes", "Octets of queued messages", value=totals.size)
        rcpts = GaugeMetricFamily(
            "relaynet_queue_recipients", "Recipients of queued messages by status", labels=["status"]
        )
        for status, n in sorted(totals.recipients.items()):
            rcpts.add_metric([status], n)
        yield rcpts
        oldest = 0.0 if totals.oldest_arrival is None else max(0.0, self.metrics.now() - totals.oldest_arrival)
        yield GaugeMetricFamily("relaynet_queue_oldest_seconds", "Age of the oldest queued message", value=oldest)
        open_ = GaugeMetricFamily(
            "relaynet_smtp_sessions", "Open SMTP sessions by listener mode and TLS", labels=["mode", "tls"]
        )
        counts = dict.fromkeys(zero_session_series(self.metrics.listener_modes()), 0)
        counts.update(sessions.by_mode_and_tls())
        for (mode, tls), n in sorted(counts.items()):
            open_.add_metric([mode, "yes" if tls else "no"], n)
        yield open_
        up = GaugeMetricFamily(
            "relaynet_next_hop_up", "1 when the next hop's last answer was not a deferral", labels=["next_hop"]
        )
        streak = GaugeMetricFamily(
            "relaynet_next_hop_consecutive_deferrals", "Deferrals since the hop's last success",
            labels=["next_hop"],
        )
        for name, hop in sorted(self.metrics.hops.items()):
            up.add_metric([name], 1 if hop.state == "up" else 0)
            streak.add_metric([name], hop.consecutive_deferrals)
        yield up
        yield streak
        reachable = GaugeMetricFamily(
            "relaynet_next_hop_reachable",
            "0 while the hop-state cache has the next hop down (no connection tried, its mail deferred at once)",
            labels=["next_hop"],
        )
        rank = {"up": 1, "probing": 0, "down": 0}
        seen: dict[str, int] = {}
        for st in self.metrics.hop_states():
            name = str(st.get("relay"))
            seen[name] = min(seen.get(name, 1), rank.get(str(st.get("state")), 0))
        for name, value in sorted(seen.items()):
            reachable.add_metric([name], value)
        yield reachable
        yield from destination_families(self.metrics.destination_states())
        suppressed = GaugeMetricFamily(
            "relaynet_suppression_entries", "Addresses on the suppression list by source", labels=["source"],
        )
        for source, n in sorted(self.metrics.suppression().items()):
            suppressed.add_metric([source], n)
        yield suppressed
        egress = CounterMetricFamily(
            "relaynet_egress_connections", "Connections made from each address of an egress pool",
            labels=["pool", "source"],
        )
        use = getattr(getattr(self.metrics.queue, "outbound", None), "egress_use", None)
        for (pool, source), n in sorted((use() if callable(use) else {}).items()):
            egress.add_metric([pool, source], n)
        yield egress


class NodeMetrics:
    """
    The metrics, next-hop health and history of one node.

    @ivar queue: the queue's counts and totals, read at scrape time and by
        the history.
    @ivar sessions: the open SMTP sessions, read at scrape time.
    @ivar registry: this node's own Prometheus registry.
    @ivar hops: L{HopHealth} by next-hop name.
    """

    log = Logger()

    def __init__(
        self, queue: QueueStats, sessions: SessionsView, clock: IReactorTime, name: str = "relaynet",
        now: Callable[[], float] = time.time, history_interval: float = 10.0,
        history_span: float = 1800.0, domain_labels: int = DOMAIN_LABELS,
        listener_modes: Callable[[], Iterable[str]] = lambda: (),
        hop_states: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        suppression: Callable[[], Mapping[str, int]] | None = None,
        destination_states: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    ) -> None:
        """
        @param clock: schedules the history's samples.
        @param name: the node's name, in C{relaynet_build_info}.
        @param now: the wall clock, for the age of the oldest message.
        @param listener_modes: the modes of the listeners in force, read at
            scrape time (a reload may change them): each gets
            C{relaynet_smtp_sessions} series at 0 while it has no session.
        @param hop_states: the hop-state cache of the next hops
            (C{OutboundManager.hop_states}), read at scrape time; by
            default L{outbound_hop_states} of C{queue}.
        """
        self.queue = queue
        self.hop_states = hop_states or outbound_hop_states(queue)
        self.destination_states = destination_states or outbound_destination_states(queue)
        self.suppression = suppression or suppression_counts(queue)
        self.health = ListHealth(domain_labels)
        self._senders: set[str] = set()
        self.sessions = sessions
        self.listener_modes = listener_modes
        self.now = now
        self.hops: dict[str, HopHealth] = {}
        self.history = History(clock, queue.counts, history_interval, history_span)
        self._children: dict[tuple[Any, tuple[Any, ...]], Any] = {}
        self._domains: set[str] = set()
        self._domain_labels = domain_labels
        r = self.registry = CollectorRegistry()
        Info("relaynet_build", "relaynet version and node name", registry=r).info(
            {"version": __version__, "node": name}
        )
        self.received = Counter(
            "relaynet_messages_received", "Messages accepted (250 sent after the fsync)",
            ["protocol"], registry=r,
        )
        self.received_bytes = Counter(
            "relaynet_received_bytes", "Octets of accepted messages", registry=r
        )
        self.refused = Counter(
            "relaynet_smtp_refusals", "Refused recipients and messages by stage and status code",
            ["stage", "dsn"], registry=r,
        )
        self.attempts = Counter(
            "relaynet_delivery_attempts",
            "Recipient delivery outcomes by result and next hop", ["result", "next_hop"], registry=r,
        )
        self.domains = Counter(
            "relaynet_domain_deliveries",
            "Recipient delivery outcomes by destination domain (the list-health signal)",
            ["domain", "result"], registry=r,
        )
        self.tls = Counter(
            "relaynet_tls_messages", "Messages received (in) and recipients relayed (out) by TLS version",
            ["direction", "version"], registry=r,
        )
        self.dsns = Counter("relaynet_dsn", "Delivery status notifications queued", ["action"], registry=r)
        self.admin = Counter(
            "relaynet_admin_actions", "Queue administration actions", ["action"], registry=r
        )
        self.reloads = Counter(
            "relaynet_config_reloads", "Configuration reloads by result", ["result"], registry=r
        )
        self.failures = Counter(
            "relaynet_failures", "Failed recipient outcomes (deferred, bounced, expired) by bounce class",
            ["result", "class"], registry=r,
        )
        self.sender_deliveries = Counter(
            "relaynet_sender_domain_deliveries",
            "Final recipient outcomes by sending domain (bounce rate: bounced+expired over all)",
            ["domain", "result"], registry=r,
        )
        self.sender_bounces = Counter(
            "relaynet_sender_domain_bounces", "Bounced and expired recipients by sending domain and bounce class",
            ["domain", "class"], registry=r,
        )
        self.destination_bounces = Counter(
            "relaynet_destination_bounces", "Bounced and expired recipients by destination domain and bounce class",
            ["domain", "class"], registry=r,
        )
        self.suppressed = Counter(
            "relaynet_suppressed_recipients", "Recipients refused because they are on the suppression list",
            ["stage"], registry=r,
        )
        self.suppression_added = Counter(
            "relaynet_suppression_added", "Addresses put on the suppression list by bounces, by class",
            ["class"], registry=r,
        )
        self.ack = Histogram(
            "relaynet_intake_ack_seconds", "Final dot to 250 (spool write and fsync)",
            buckets=ACK_BUCKETS, registry=r,
        )
        self.residence = Histogram(
            "relaynet_queue_residence_seconds",
            "Arrival to leaving the queue, per recipient, by final result",
            ["result"], buckets=RESIDENCE_BUCKETS, registry=r,
        )
        self.hop_time = Histogram(
            "relaynet_hop_delivery_seconds",
            "Duration of the delivery attempt the next hop accepted, per recipient",
            ["next_hop"], buckets=HOP_BUCKETS, registry=r,
        )
        self.batches = Histogram(
            "relaynet_spool_commit_batch_size", "Messages made durable by one directory fsync",
            buckets=BATCH_BUCKETS, registry=r,
        )
        r.register(_PresentCollector(self))

    # -- inputs ----------------------------------------------------------

    def _child(self, metric: Any, *values: Any) -> Any:
        """
        C{metric.labels(*values)}, kept: prometheus_client's C{labels} checks
        and converts its values and takes a lock on every call, and an
        event counts in up to eight series (py-spy: a third of the cost of
        an event).
        """
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, event: dict[str, Any]) -> None:
        """An L{EventLog} observer: count one event."""
        kind = event.get("event")
        if kind == "received":
            self._child(self.received, event.get("protocol") or "unknown").inc()
            self.received_bytes.inc(event.get("size") or 0)
            self._child(self.tls, "in", tls_version(event.get("tls"))).inc()
            if isinstance(event.get("ack_delay"), (int, float)):
                self.ack.observe(event["ack_delay"])
            self.history.count("received")
        elif kind == "reject":
            self._child(self.refused, str(event.get("stage", "unknown")), str(event.get("dsn", "unknown"))).inc()
        elif kind in RESULTS:
            self._delivery(kind, event)
        elif kind == "dsn":
            self._child(self.dsns, str(event.get("action", "unknown"))).inc()
        elif kind in ("hold", "release", "deleted"):
            self._child(self.admin, kind).inc()
        elif kind == "reload":
            self._child(self.reloads, str(event.get("status", "reloaded"))).inc()
        elif kind == "suppressed":
            self._child(self.suppressed, str(event.get("stage") or "unknown")).inc()
        elif kind == "suppression_added":
            self._child(self.suppression_added, str(event.get("class") or "other")).inc()

    def _delivery(self, kind: str, event: dict[str, Any]) -> None:
        hop = str(event.get("relay") or "none")
        self._child(self.attempts, kind, hop).inc()
        for earlier in event.get("tried") or ():
            # Hops that deferred before the one named (failover) count too.
            ehop = str(earlier.get("relay") or "none")
            self._child(self.attempts, "deferred", ehop).inc()
            self.hops.setdefault(ehop, HopHealth(ehop)).record(
                "deferred", event.get("time") or self.now(), earlier.get("diagnostic")
            )
        destination = self._domain(event.get("recipient"))
        self._child(self.domains, destination, kind).inc()
        klass = str(event.get("class") or "other")
        if kind in ("deferred", "bounced", "expired"):
            self._child(self.failures, kind, klass).inc()
        if kind in FINAL:
            sender = self._sender_domain(event.get("sender"))
            bounced = kind in ("bounced", "expired")
            self._child(self.sender_deliveries, sender, kind).inc()
            if bounced:
                self._child(self.sender_bounces, sender, klass).inc()
                self._child(self.destination_bounces, destination, klass).inc()
            self.health.record(sender, destination, bounced, klass if bounced else None)
        delay = event.get("delay")
        if kind in FINAL and isinstance(delay, (int, float)):
            self._child(self.residence, kind).observe(delay)
        duration = event.get("duration")
        if kind == "sent" and isinstance(duration, (int, float)):
            self._child(self.hop_time, hop).observe(duration)
        if kind == "sent":
            self._child(self.tls, "out", tls_version(event.get("tls"))).inc()
        if event.get("relay"):
            when = event.get("time") or self.now()
            self.hops.setdefault(hop, HopHealth(hop)).record(kind, when, event.get("diagnostic"))
        self.history.count(
            {"sent": "delivered", "delivered": "delivered", "deferred": "deferrals"}.get(kind, "bounced")
        )

    def _domain(self, address: Any) -> str:
        domain = str(address or "").rpartition("@")[2].lower() or "none"
        if domain in self._domains:
            return domain
        if len(self._domains) < self._domain_labels:
            self._domains.add(domain)
            return domain
        return "other"

    def _sender_domain(self, address: Any) -> str:
        """The sending domain's label (C{<>} for the null sender), bounded as L{_domain}."""
        if not address:
            return "<>"
        domain = str(address).rpartition("@")[2].lower() or "none"
        if domain in self._senders:
            return domain
        if len(self._senders) < self._domain_labels:
            self._senders.add(domain)
            return domain
        return "other"

    def commit_batch(self, size: int) -> None:
        """A L{Spool.observe_commits} observer: one group commit of C{size} messages."""
        self.batches.observe(size)

    # -- outputs ---------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def hop_health(self, configured: Iterable[str] = ()) -> list[HopHealth]:
        """
        Health of every next hop seen in events, plus C{configured} ones not
        named by any outcome yet (C{unknown}), by name.

        Events carry the outcome of an attempt, named after the hop that gave
        it: when a route fails over, the hops tried before are not named, so
        a down primary shows only through its failover hop's outcomes.
        """
        out = dict(self.hops)
        for name in configured:
            out.setdefault(name, HopHealth(name))
        return [out[k] for k in sorted(out)]
