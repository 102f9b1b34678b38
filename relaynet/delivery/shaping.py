# -*- test-case-name: tests.test_shaping -*-
"""
Traffic shaping per destination: how fast, and over how many connections,
mail goes to one receiving site, and how it backs off when the site says so.

A I{destination} is a recipient domain, or the set of MX hosts it resolves
to, so that every domain hosted by one provider shares one limit (KumoMTA's
"site"; Postfix's per-destination concurrency and rate delay). The
C{[shaping]} configuration:

    [shaping.default]          # every destination no rule matches: one per recipient domain
    max_connections = 20       # at once, across every MX host and route (0: no limit)
    messages_per_connection = 100   # then QUIT and reconnect (0: [outbound]'s)
    rate = "10/s"              # token bucket: "N/s", "N/m", "N/h" (none: no limit)
    burst = 10                 # the bucket's size (default: one second's worth, at least 1)
    throttle = [               # replies that pause the destination (these two by default)
      { code = 421, pause = 60 },
      { enhanced = "4.7", pause = 60 },
    ]

    [[shaping.rule]]           # in order; the first that matches wins
    name = "google"            # its name in events and views (default "rule[0]")
    mx = ["*.google.com", "*.googlemail.com"]   # any MX host matches: one destination for them all
    domains = ["gmail.com"]    # or the recipient domain ("*.example": subdomains; "*")
    rate = "600/m"
    throttle = [{ code = 421, pause = 300 }, { pattern = "(?i)rate limit", pause = 120, rate = "1/s" }]

A throttle entry matches a reply from the destination's hosts (at the
greeting or to any command) when everything it gives matches: C{code} (the
reply code), C{enhanced} (a prefix of its RFC 3463 code, by whole parts:
C{"4.7"} matches C{4.7.0} and C{4.7.28}, not C{4.70.1}) and C{pattern} (a
regular expression searched in the reply text). A match I{pauses} the
destination for C{pause} seconds (no new message starts; queued ones are
deferred with "delivery temporarily suspended: ..."), or, with C{rate},
I{slows} it to that rate for that time. Either ends by itself: the
destination is released and the messages it deferred are flushed.

This module is pure: it owns the decisions and the state (a token bucket
on an injected clock, the pause, the deferred queue ids). The connection
pools of L{relaynet.delivery.client} ask it whether a job may start and a
connection may open, and report replies to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# The settings live in relaynet.config (the ground layer may import nothing
# of delivery/); the names are here too, for this module's users.
from relaynet.config import (  # noqa: F401 - re-exported
    Rate, ShapingRule, ShapingSettings, ThrottleRule, describe_shaping, domain_matches, parse_shaping,
)

#: How the diagnostic of a recipient deferred by a paused destination
#: begins (the same words as a down next hop's).
SUSPENDED = "delivery temporarily suspended: "


class TokenBucket:
    """
    Tokens accrue at C{rate} per second up to C{size}; one is taken per
    message started. It starts full. In any interval of C{t} seconds at most
    C{size + rate * t} are taken.
    """

    def __init__(self, rate: float, size: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.size = size
        self._clock = clock
        self._tokens = float(size)
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(float(self.size), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        return now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        # A little slack for float error: a token due "now" is there.
        if self._tokens >= 1.0 - 1e-9:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def wait(self) -> float:
        """Seconds until a token is there (0: now)."""
        self._refill()
        return 0.0 if self._tokens >= 1.0 - 1e-9 else (1.0 - self._tokens) / self.rate

    def change(self, rate: float, size: int) -> None:
        """New limits; the tokens there stay (up to the new size)."""
        self._refill()
        self.rate = rate
        self.size = size
        self._tokens = min(self._tokens, float(size))


class ShapedPool(Protocol):
    """What a L{Destination} asks of the connection pools that go to it."""

    queue: Any

    def connection_count(self) -> int:
        """Connections open and being opened."""

    def shaping_changed(self) -> None:
        """Tokens came, a connection closed, or the destination was paused or released: act on it."""

    def defer_queued(self) -> None:
        """The destination is paused: defer every queued job and close idle connections."""


class Destination:
    """
    The shaping state of one destination, shared by every connection pool
    that delivers to it: its token bucket, its pause, and the queue ids it
    deferred (flushed when it can take mail again).

    @ivar paused_until: when the pause (or slow-down) ends (C{None}: none).
    @ivar reason: the reply that caused it.
    @ivar slowed: the slow-down rate, if a throttle slows rather than pauses.
    """

    #: The most queue ids remembered for a flush.
    REMEMBER = 10000
    #: Seconds a remembered id that cannot be flushed yet (its attempt is
    #: still being recorded) is tried again.
    GRACE = 60.0
    #: Jobs that may wait in the pools per connection allowed (with
    #: C{max_connections} and no rate): the rest are deferred, so that a
    #: destination with few connections holds few attempt slots.
    WAIT_PER_CONNECTION = 2

    def __init__(
        self, key: tuple[str, ...], name: str, rule: ShapingRule, reactor: Any, events: Any = None,
        flush: Callable[[list[str], int | None], int] | None = None, log: Any = None, share: int = 1,
    ) -> None:
        """
        @param share: how many processes share the limits (C{[node]
            workers}, each shaping its own shard's mail): each one allows
            this fraction of the rate, burst and connections (rounded up).
        """
        self.key = key
        self.share = max(1, share)
        self.name = name
        self.rule = rule
        self.reactor = reactor
        self.events = events
        self.flush = flush
        self._log = log
        self.pools: list[ShapedPool] = []
        self.bucket: TokenBucket | None = None
        self.paused_until: float | None = None
        self.since = 0.0
        self.reason = ""
        self.enhanced = "4.4.1"
        self.slowed: Rate | None = None
        self.throttles = 0
        self.deferred = 0
        self.remembered: dict[str, float] = {}
        self._flushed: dict[str, float] = {}
        self._release: Any = None
        self._wake: Any = None
        self._apply_rate()

    # -- limits ------------------------------------------------------------

    @property
    def rate(self) -> Rate | None:
        """The rate in force (the slow-down's while slowed)."""
        if self.slowed is not None:
            return self.slowed if self.rule.rate is None or self.slowed.per_second < self.rule.rate.per_second \
                else self.rule.rate
        return self.rule.rate

    def _apply_rate(self) -> None:
        rate = self.rate
        if rate is None:
            self.bucket = None
            return
        size = self.rule.bucket_size if self.slowed is None else max(1, math.ceil(rate.per_second))
        size = max(1, math.ceil(min(size, self.rule.bucket_size or size) / self.share))
        per_second = rate.per_second / self.share
        if self.bucket is None:
            self.bucket = TokenBucket(per_second, size, self.reactor.seconds)
        else:
            self.bucket.change(per_second, size)

    def reconfigure(self, rule: ShapingRule) -> None:
        """New limits for the same destination (a reload): the state stays."""
        self.rule = rule
        self._apply_rate()
        self._kick()

    @property
    def messages_per_connection(self) -> int:
        return self.rule.messages_per_connection

    def attach(self, pool: ShapedPool) -> None:
        """C{pool} delivers to this destination (pools with nothing left are forgotten)."""
        self.pools = [p for p in self.pools if p.queue or p.connection_count()]
        if pool not in self.pools:
            self.pools.append(pool)

    def kick(self) -> None:
        """Let every pool act (a connection to the destination closed)."""
        self._kick()

    def queued(self) -> int:
        return sum(len(p.queue) for p in self.pools)

    def connections(self) -> int:
        return sum(p.connection_count() for p in self.pools)

    # -- decisions ---------------------------------------------------------

    @property
    def paused(self) -> bool:
        """No message may start (a pause, not a slow-down)."""
        return self.paused_until is not None and self.slowed is None

    def suspended_diagnostic(self) -> str:
        until = time.strftime("%H:%M:%S", time.gmtime(self.paused_until or 0))
        return f"{SUSPENDED}{self.name} throttled: {self.reason} (until {until} UTC)"

    def admit(self, queue_id: str) -> tuple[str, str] | None:
        """
        May a job of C{queue_id} wait in a pool for a token and a
        connection? C{None}: yes; else C{(dsn, diagnostic)} to defer it
        with (it is remembered, and flushed when the destination can take
        it: never a long wait in an attempt slot).
        """
        self._flushed.pop(queue_id, None)
        if self.paused:
            self.remember(queue_id)
            self.deferred += 1
            return self.enhanced, self.suspended_diagnostic()
        capacity = self.capacity()
        if capacity is None or self.queued() < capacity:
            return None
        self.remember(queue_id)
        self.deferred += 1
        rate = self.rate
        if self.bucket is not None and rate is not None:
            slowed = f" (slowed: {self.reason})" if self.slowed is not None else ""
            return "4.4.5", f"rate limited: {self.name}, {rate.text}{slowed}"
        return "4.4.5", f"connection limit: {self.name}, {self.max_connections} connections busy"

    @property
    def max_connections(self) -> int:
        """This process's connection limit (0: none)."""
        most = self.rule.max_connections
        return math.ceil(most / self.share) if most else 0

    def capacity(self) -> int | None:
        """
        How many jobs may wait in the pools: what the bucket lets go within
        about a burst's time (its tokens and its size), or
        L{WAIT_PER_CONNECTION} per connection allowed; C{None}: no limit.
        """
        if self.bucket is not None:
            return self.bucket.size + int(self.bucket.tokens)
        if self.max_connections:
            return self.max_connections * self.WAIT_PER_CONNECTION
        return None

    def job_started(self) -> None:
        """A queued job left for a connection: room for a remembered one."""
        if self.remembered and self.capacity() is not None:
            self._cancel("_wake")  # a later wake-up (waiting for room) comes now
            self._arm_wake()

    def others_waiting(self, pool: ShapedPool) -> bool:
        """Another pool of this destination has jobs waiting (for a connection)."""
        return any(p is not pool and p.queue for p in self.pools)

    def may_start(self) -> bool:
        """May a queued job start now? Takes a token if so; else a wake-up is set."""
        if self.paused:
            return False
        if self.bucket is None:
            return True
        if self.bucket.take():
            return True
        self._arm_wake()
        return False

    def connection_room(self) -> int | None:
        """How many more connections may open (C{None}: no limit)."""
        if self.paused:
            return 0
        if not self.max_connections:
            return None
        return max(0, self.max_connections - self.connections())

    def remember(self, queue_id: str) -> None:
        if queue_id not in self.remembered and len(self.remembered) < self.REMEMBER:
            self.remembered[queue_id] = self.reactor.seconds()
        self._arm_wake()

    # -- replies -----------------------------------------------------------

    def reply(self, code: int, enhanced: str, text: str, relay: str) -> bool:
        """
        A reply from a host of this destination; a throttle that matches
        pauses (or slows) it.

        @return: whether it paused now (the pools then defer their queues).
        """
        t = self.rule.throttle_for(code, enhanced, text)
        if t is None:
            return False
        now = self.reactor.seconds()
        until = now + t.pause
        if self.paused_until is not None and until <= self.paused_until:
            return False  # already paused for longer (other connections' replies)
        was = self.paused_until is not None
        self.paused_until = until
        if not was:
            self.since = now
        self.reason = f"{code} {enhanced} {text}".strip()
        self.enhanced = enhanced if enhanced.startswith("4.") else "4.4.1"
        self.slowed = t.rate
        self.throttles += 1
        self._apply_rate()
        self._cancel("_release")
        self._release = self.reactor.callLater(t.pause, self.release)
        if self._log is not None:
            self._log.warn(
                "throttled destination={destination} relay={relay}: {reply}; {how} for {pause:.0f} s",
                destination=self.name, relay=relay, reply=self.reason, pause=t.pause,
                how="slowed to " + t.rate.text if t.rate is not None else "paused",
            )
        if self.events is not None:
            self.events.emit(
                "throttled", destination=self.name, relay=relay, reply=self.reason, pause=t.pause,
                until=until, rate=t.rate.text if t.rate is not None else None,
            )
        if self.paused:
            for p in list(self.pools):
                p.defer_queued()
        return True

    def release(self) -> None:
        """The pause (or slow-down) is over: flush what it deferred."""
        self._cancel("_release")
        if self.paused_until is None:
            return
        paused_for = self.reactor.seconds() - self.since
        self.paused_until = None
        self.slowed = None
        self._apply_rate()
        if self._log is not None:
            self._log.info("released destination={destination} after {paused_for:.0f} s",
                           destination=self.name, paused_for=paused_for)
        if self.events is not None:
            self.events.emit(
                "released", destination=self.name, paused_for=round(paused_for, 3),
                deferred=self.deferred, remembered=len(self.remembered),
            )
        self.deferred = 0
        self._kick()
        self._wake_up()

    # -- wake-ups: tokens came, or the pause ended ----------------------------

    def _kick(self) -> None:
        for p in list(self.pools):
            p.shaping_changed()

    def _arm_wake(self) -> None:
        if self._wake is not None and self._wake.active():
            return
        if self.paused:
            return  # the release wakes it
        delay = self.bucket.wait() if self.bucket is not None else 0.0
        if delay <= 0 and self.bucket is not None:
            delay = 1.0 / self.bucket.rate
        self._wake = self.reactor.callLater(max(delay, 0.0), self._wake_up)

    def _wake_up(self) -> None:
        """Hand tokens to the waiting jobs, then flush remembered ids into the room left."""
        self._wake = None
        if self.paused:
            return
        self._kick()
        now = self.reactor.seconds()
        for qid, at in list(self._flushed.items()):
            if now - at > 5.0:
                del self._flushed[qid]  # flushed, but it never came back here
        busy = False
        if self.remembered and self.flush is not None:
            capacity = self.capacity()
            room = len(self.remembered) if capacity is None else capacity - self.queued() - len(self._flushed)
            for qid, at in list(self.remembered.items()):
                if room <= 0:
                    break
                # Counted as on its way before the flush: its attempt may
                # reach admit() inside the call.
                self._flushed[qid] = now
                del self.remembered[qid]
                if self.flush([qid], 1):
                    room -= 1
                    continue
                self._flushed.pop(qid, None)
                if now - at <= self.GRACE:
                    self.remembered[qid] = at  # busy (its attempt is still being recorded): later
                    busy = True
                # else gone (delivered, deleted), or busy for too long: its own retry takes it
        waiting = self.bucket is not None and self.queued() > 0
        self._cancel("_wake")  # one wake-up at a time (the kick may have armed one)
        if self.bucket is not None and (self.remembered or waiting):
            delay = max(self.bucket.wait(), 1.0 / self.bucket.rate)
            self._wake = self.reactor.callLater(delay, self._wake_up)
        elif self.remembered:
            # Ids still being recorded: again shortly; else when a job
            # leaves (job_started), or when flushed ones never came back.
            self._wake = self.reactor.callLater(0.5 if busy else 5.0, self._wake_up)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None and timer.active():
            timer.cancel()
        setattr(self, name, None)

    def close(self) -> None:
        self._cancel("_release")
        self._cancel("_wake")

    def idle(self) -> bool:
        """Nothing to keep: not paused, nothing remembered, no pool busy."""
        return (self.paused_until is None and not self.remembered
                and all(not p.queue and not p.connection_count() for p in self.pools))

    def snapshot(self) -> dict[str, Any]:
        """The state for the admin API, the status page and metrics."""
        rate = self.rate
        state = "paused" if self.paused else "slowed" if self.paused_until is not None else "open"
        return {
            "destination": self.name, "state": state,
            "until": self.paused_until, "since": self.since if self.paused_until is not None else None,
            "reason": self.reason if self.paused_until is not None else None,
            "rate": rate.text if rate is not None else None,
            "tokens": round(self.bucket.tokens, 3) if self.bucket is not None else None,
            "burst": self.bucket.size if self.bucket is not None else None,
            "connections": self.connections(), "max_connections": self.max_connections,
            "queued": self.queued(), "deferred": self.deferred, "remembered": len(self.remembered),
            "throttles": self.throttles,
        }


class Shaper:
    """
    Maps a delivery (recipient domain, MX hosts) to its L{Destination}:
    the first C{[[shaping.rule]]} that matches (one destination per rule),
    else the default (one per recipient domain). Destinations keep their
    state across a reload when their key stays.
    """

    #: Idle per-domain destinations beyond this are forgotten.
    MAX_IDLE = 10000

    def __init__(
        self, settings: ShapingSettings, reactor: Any, events: Any = None,
        flush: Callable[[list[str], int | None], int] | None = None, log: Any = None, share: int = 1,
    ) -> None:
        """
        @param flush: the runner's C{flush_ids(queue_ids, limit)}.
        @param share: see L{Destination} (C{[node] workers}; 1 without).
        """
        self.share = share
        self.settings = settings
        self.reactor = reactor
        self.events = events
        self._flush = flush
        self._log = log
        self.destinations: dict[tuple[str, ...], Destination] = {}

    def flush(self, ids: list[str], limit: int | None) -> int:
        return self._flush(ids, limit) if self._flush is not None else 0

    def set_flush(self, flush: Callable[[list[str], int | None], int] | None) -> None:
        self._flush = flush

    def lookup(self, domain: str, mx_hosts: Sequence[str] = ()) -> tuple[tuple[str, ...], str, ShapingRule]:
        """The key, name and limits of the destination for C{domain} with these MX hosts."""
        domain = domain.lower().rstrip(".")
        for rule in self.settings.rules:
            if rule.matches(domain, mx_hosts):
                return ("rule", rule.name, ",".join(rule.domains), ",".join(rule.mx)), rule.name, rule
        return ("domain", domain), domain, self.settings.default

    def destination(self, domain: str, mx_hosts: Sequence[str] = ()) -> Destination:
        """The destination of mail for C{domain} going to C{mx_hosts} (made on first use)."""
        key, name, rule = self.lookup(domain, mx_hosts)
        d = self.destinations.get(key)
        if d is None:
            if len(self.destinations) >= self.MAX_IDLE:
                self._prune()
            d = self.destinations[key] = Destination(
                key, name, rule, self.reactor, self.events, self.flush, self._log, self.share,
            )
        return d

    def _prune(self) -> None:
        for key, d in list(self.destinations.items()):
            if key[0] == "domain" and d.idle():
                d.close()
                del self.destinations[key]

    def configure(self, settings: ShapingSettings) -> None:
        """
        A reload: destinations whose key stays keep their state (tokens,
        pause, remembered ids) under the new limits; the others are
        released (what they deferred is flushed) and forgotten.
        """
        self.settings = settings
        rules: dict[tuple[str, ...], ShapingRule] = {
            ("rule", r.name, ",".join(r.domains), ",".join(r.mx)): r for r in settings.rules
        }
        for key, d in list(self.destinations.items()):
            rule = rules.get(key) if key[0] == "rule" else settings.default
            if rule is None:
                del self.destinations[key]
                d.close()
                if d.remembered:
                    self.flush(list(d.remembered), None)
                continue
            if rule.limits != d.rule.limits:
                d.reconfigure(rule)

    def snapshot(self) -> list[dict[str, Any]]:
        """
        The destinations of the rules, and the per-domain ones that are
        paused, busy or hold deferred messages (for views and metrics):
        paused and slowed ones first, then by name.
        """
        out = [d.snapshot() for d in self.destinations.values() if d.key[0] == "rule" or not d.idle()]
        return sorted(out, key=lambda s: (s["state"] == "open", s["destination"]))

    def close(self) -> None:
        for d in self.destinations.values():
            d.close()


__all__ = [
    "SUSPENDED",
    "Destination",
    "Rate",
    "Shaper",
    "ShapingRule",
    "ShapingSettings",
    "ThrottleRule",
    "TokenBucket",
    "describe_shaping",
    "parse_shaping",
]
