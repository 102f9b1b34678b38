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
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from attrs import field, frozen

if TYPE_CHECKING:
    # Types only: relaynet.config may import this module (for parse_shaping).
    from relaynet.config import TableReader

#: How the diagnostic of a recipient deferred by a paused destination
#: begins (the same words as a down next hop's).
SUSPENDED = "delivery temporarily suspended: "

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h|sec|second|min|minute|hour)\s*$", re.IGNORECASE)


@frozen
class Rate:
    """
    A message rate: C{count} per C{per} seconds.

    @ivar text: as configured, normalised (C{"10/s"}).
    """

    count: int
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    @property
    def text(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per]
        return f"{self.count}/{unit}"

    @classmethod
    def parse(cls, text: str) -> Rate:
        """
        C{"10/s"}, C{"600/m"}, C{"3600/h"} (also C{/sec}, C{/min}, C{/hour}).

        @raise ValueError: anything else, or a count of 0.
        """
        m = _RATE.match(text)
        if m is None:
            raise ValueError(f"{text!r} is not a rate like '10/s', '600/m' or '3600/h'")
        count = int(m.group(1))
        if count <= 0:
            raise ValueError("the count must be positive")
        return cls(count, _UNITS[m.group(2)[0].lower()])


def domain_matches(pattern: str, domain: str) -> bool:
    """C{"*"}, C{"*.sub.example"} (strict subdomains) or an exact domain (as routing's)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def _parts_prefix(prefix: str, enhanced: str) -> bool:
    """C{"4.7"} is a prefix of C{"4.7.28"} by whole parts (not of C{"4.70.1"})."""
    want = [p for p in prefix.split(".") if p]
    have = enhanced.split(".")
    return len(want) <= len(have) and have[: len(want)] == want


@frozen
class ThrottleRule:
    """
    A reply that pauses (or slows) a destination.

    @ivar code: the reply code that matches (C{None}: any).
    @ivar enhanced: a prefix of the RFC 3463 code, by parts (C{None}: any).
    @ivar pattern: a regular expression searched in the reply text (C{None}: any).
    @ivar pause: for how long, in seconds.
    @ivar rate: slow down to this rate for C{pause} instead of stopping.
    """

    pause: float
    code: int | None = None
    enhanced: str | None = None
    pattern: str | None = None
    rate: Rate | None = None
    _regex: re.Pattern[str] | None = field(default=None, eq=False, repr=False, alias="regex")

    @classmethod
    def make(cls, pause: float, code: int | None = None, enhanced: str | None = None,
             pattern: str | None = None, rate: Rate | None = None) -> ThrottleRule:
        """One with its pattern compiled. @raise re.error: a bad pattern."""
        return cls(pause, code, enhanced, pattern, rate, regex=re.compile(pattern) if pattern else None)

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        """Whether the reply C{code enhanced text} matches (only 4xx replies ever do)."""
        if not 400 <= code < 500:
            return False
        if self.code is not None and code != self.code:
            return False
        if self.enhanced is not None and not _parts_prefix(self.enhanced, enhanced):
            return False
        return self._regex is None or self._regex.search(f"{code} {enhanced} {text}") is not None


DEFAULT_THROTTLE = (ThrottleRule.make(60.0, code=421), ThrottleRule.make(60.0, enhanced="4.7"))


@frozen
class ShapingRule:
    """
    The limits of one destination (a rule of C{[[shaping.rule]]}, or
    C{[shaping.default]}).

    @ivar name: in events and views.
    @ivar domains: recipient domain patterns it matches.
    @ivar mx: MX host name patterns it matches (any of the MX hosts; for a
        C{relay} route, its next hops' host names).
    @ivar max_connections: at once, across all hops (0: no limit).
    @ivar messages_per_connection: then the connection QUITs (0: C{[outbound]}'s).
    @ivar rate: messages started per unit of time (C{None}: no limit).
    @ivar burst: the token bucket's size.
    @ivar throttle: replies that pause or slow it, the first matching wins.
    """

    name: str = "default"
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()
    max_connections: int = 0
    messages_per_connection: int = 0
    rate: Rate | None = None
    burst: int = 0
    throttle: tuple[ThrottleRule, ...] = DEFAULT_THROTTLE

    def matches(self, domain: str, mx_hosts: Sequence[str]) -> bool:
        if any(domain_matches(p, domain) for p in self.domains):
            return True
        return any(domain_matches(p, h.lower().rstrip(".")) for p in self.mx for h in mx_hosts)

    @property
    def bucket_size(self) -> int:
        """C{burst}, or one second's worth of the rate (at least 1)."""
        if self.burst:
            return self.burst
        return max(1, math.ceil(self.rate.per_second)) if self.rate is not None else 0

    def throttle_for(self, code: int, enhanced: str, text: str) -> ThrottleRule | None:
        for t in self.throttle:
            if t.matches(code, enhanced, text):
                return t
        return None

    @property
    def limits(self) -> tuple[Any, ...]:
        """What a reload compares to keep a destination's state."""
        return (self.max_connections, self.messages_per_connection, self.rate, self.burst, self.throttle)


@frozen
class ShapingSettings:
    """The C{[shaping]} table: the default and the rules, in order."""

    default: ShapingRule = ShapingRule()
    rules: tuple[ShapingRule, ...] = ()


def _pattern(t: TableReader, name: str, value: str, i: int) -> str:
    p = value.strip().lower().rstrip(".")
    body = p.removeprefix("*.")
    if p != "*" and (not body or "*" in body or " " in body or ".." in body):
        raise t.error(f"{name}[{i}]", f"{value!r} is not a domain, '*.domain' or '*'")
    return p


def _parse_rate(t: TableReader, name: str) -> Rate | None:
    text = t.get(name, str, None)
    if text is None:
        return None
    try:
        return Rate.parse(text)
    except ValueError as e:
        raise t.error(name, str(e)) from None


def _parse_throttle(t: TableReader) -> tuple[ThrottleRule, ...]:
    items = t.get("throttle", list, None)
    if items is None:
        return DEFAULT_THROTTLE
    out = []
    for i, item in enumerate(items):
        r = type(t)(t.source, f"{t.key('throttle')}[{i}]", item)
        code = r.get("code", int, None, lambda v: None if 400 <= v < 500 else "must be a 4xx reply code")
        enhanced = r.get(
            "enhanced", str, None,
            lambda v: None if re.fullmatch(r"4(\.\d{1,3}){0,2}", v) else "must be like '4.7' or '4.7.1'",
        )
        pattern = r.get("pattern", str, None)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise r.error("pattern", f"not a regular expression: {e}") from None
        pause = float(r.get("pause", (int, float), 60.0, lambda v: None if v > 0 else "must be positive"))
        rate = _parse_rate(r, "rate")
        if code is None and enhanced is None and pattern is None:
            raise r.error("code", "a throttle entry needs code, enhanced or pattern")
        r.finish()
        out.append(ThrottleRule.make(pause, code, enhanced, pattern, rate))
    return tuple(out)


def _parse_limits(t: TableReader, name: str, matching: bool) -> ShapingRule:
    domains = tuple(_pattern(t, "domains", d, i) for i, d in enumerate(t.strings("domains", ()))) if matching else ()
    mx = tuple(_pattern(t, "mx", d, i) for i, d in enumerate(t.strings("mx", ()))) if matching else ()
    if matching and not domains and not mx:
        raise t.error("domains", "a rule needs domains or mx patterns")
    non_negative = (lambda v: None if v >= 0 else "must not be negative")
    rule = ShapingRule(
        name=name, domains=domains, mx=mx,
        max_connections=t.get("max_connections", int, 0, non_negative),
        messages_per_connection=t.get("messages_per_connection", int, 0, non_negative),
        rate=_parse_rate(t, "rate"),
        burst=t.get("burst", int, 0, lambda v: None if v > 0 else "must be positive"),
        throttle=_parse_throttle(t),
    )
    if rule.burst and rule.rate is None:
        raise t.error("burst", "needs a rate")
    t.finish()
    return rule


def parse_shaping(table: TableReader) -> ShapingSettings:
    """
    The C{[shaping]} table (see the module docstring).

    @param table: C{top.sub("shaping")} of L{relaynet.config.parse_config}.
    @raise relaynet.config.ConfigError: naming the file and the key (C{shaping.rule[0].rate}).
    """
    default = _parse_limits(table.sub("default"), "default", matching=False)
    rules: list[ShapingRule] = []
    for i, item in enumerate(table.get("rule", list, [])):
        r = type(table)(table.source, f"{table.key('rule')}[{i}]", item)
        name = r.get("name", str, f"rule[{i}]", lambda v: None if v.strip() else "must not be empty")
        if name == "default" or any(x.name == name for x in rules):
            raise r.error("name", f"{name!r} is used twice")
        rules.append(_parse_limits(r, name, matching=True))
    table.finish()
    return ShapingSettings(default, tuple(rules))


def describe_shaping(settings: ShapingSettings) -> list[str]:
    """TOML lines for C{relaynet check-config} (loading them gives the same settings)."""

    def limits(rule: ShapingRule) -> list[str]:
        out = []
        if rule.max_connections:
            out.append(f"max_connections = {rule.max_connections}")
        if rule.messages_per_connection:
            out.append(f"messages_per_connection = {rule.messages_per_connection}")
        if rule.rate is not None:
            out.append(f'rate = "{rule.rate.text}"')
        if rule.burst:
            out.append(f"burst = {rule.burst}")
        items = []
        for t in rule.throttle:
            parts = [f"pause = {t.pause!r}"]
            if t.code is not None:
                parts.append(f"code = {t.code}")
            if t.enhanced is not None:
                parts.append(f'enhanced = "{t.enhanced}"')
            if t.pattern is not None:
                parts.append("pattern = " + '"' + t.pattern.replace("\\", "\\\\").replace('"', '\\"') + '"')
            if t.rate is not None:
                parts.append(f'rate = "{t.rate.text}"')
            items.append("{ " + ", ".join(parts) + " }")
        out.append(f"throttle = [{', '.join(items)}]")
        return out

    def strings(values: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = ["[shaping.default]", *limits(settings.default), ""]
    for rule in settings.rules:
        lines += ["[[shaping.rule]]", f'name = "{rule.name}"']
        if rule.domains:
            lines.append(f"domains = {strings(rule.domains)}")
        if rule.mx:
            lines.append(f"mx = {strings(rule.mx)}")
        lines += [*limits(rule), ""]
    return lines


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
