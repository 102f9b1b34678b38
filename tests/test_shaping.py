"""
Tests for L{relaynet.delivery.shaping}: traffic shaping per destination.

 - pure: the token bucket on a L{Clock}, rule and throttle matching, the
   C{[shaping]} settings and their errors, a reload keeping state;
 - the connection pool (L{tests.test_outbound.Hop}: a L{HopPool} on a
   L{MemoryReactorClock} completed to L{FakeSMTPServer}s over iosim): jobs
   beyond the rate deferred and remembered, flushed as tokens come;
   connections across pools of one destination; messages per connection;
   a 421 pausing the destination and its release;
 - over real sockets (trial, the real reactor): a L{QueueRunner} relaying
   to a loopback receiver limited to 5 messages a second (burst 5) for more
   than 10 s: at most 10 messages in any second, all of them arrive; then a
   421: no transaction starts during the pause, and everything arrives after.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from relaynet import zones
from relaynet.config import ConfigError, TableReader, parse_config
from relaynet.delivery.attempt import Delivery
from relaynet.delivery.client import DeliveryResult, HopPool
from relaynet.delivery.routing import RoutingTable
from relaynet.delivery.shaping import (
    Destination,
    Rate,
    Shaper,
    ShapingRule,
    ShapingSettings,
    ThrottleRule,
    TokenBucket,
    describe_shaping,
    parse_shaping,
)
from relaynet.events import EventLog
from relaynet.queue.spool import Envelope, QueueEntry, QueueState, Recipient
from relaynet.queue.states import RecipientStatus
from relaynet.testing import FakeSMTPServer, make_config
from relaynet.testing.spool import MemorySpool
from tests.test_outbound import Hop, Outcome

# -- helpers -----------------------------------------------------------------


class Events:
    """An C{emit(name, **fields)} recorder."""

    def __init__(self) -> None:
        self.all: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, **fields: Any) -> None:
        self.all.append((name, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [f for n, f in self.all if n == name]


class Flusher:
    """The runner's C{flush_ids}: records flushed ids (each one flushable once)."""

    def __init__(self) -> None:
        self.flushed: list[tuple[str, float]] = []
        self.clock: Any = None

    def __call__(self, ids: list[str], limit: int | None) -> int:
        n = 0
        for qid in ids:
            if limit is not None and n >= limit:
                break
            self.flushed.append((qid, self.clock.seconds() if self.clock else 0.0))
            n += 1
        return n


def settings_from(toml: str, source: str = "node.toml") -> ShapingSettings:
    data = tomllib.loads(toml)
    top = TableReader(source, "", data)
    return parse_shaping(top.sub("shaping"))


# -- pure: the token bucket ----------------------------------------------------


def test_rate_parsing() -> None:
    """Rates are N/s, N/m, N/h; anything else is refused."""
    assert Rate.parse("10/s") == Rate(10, 1.0)
    assert Rate.parse("600 / min").text == "600/m"
    assert Rate.parse("3600/h").per_second == 1.0
    for bad in ("10", "0/s", "-1/s", "10/d", "x/s", ""):
        with pytest.raises(ValueError):
            Rate.parse(bad)


def test_token_bucket_never_gives_more_than_rate_plus_burst() -> None:
    """
    A bucket of 5 at 5/s, asked every 10 ms for 20 s: every second of the
    run it gives at most 10 (5 + the burst), and about 5 in steady state.
    """
    clock = Clock()
    bucket = TokenBucket(5.0, 5, clock.seconds)
    taken: list[float] = []
    for _ in range(2000):
        if bucket.take():
            taken.append(clock.seconds())
        clock.advance(0.01)
    assert len(taken) == pytest.approx(5 + 5 * 20, abs=2)
    for t in taken:
        window = [x for x in taken if t <= x < t + 1.0]
        assert len(window) <= 10, (t, window)
    # Steady state: 5 a second.
    assert len([x for x in taken if 10.0 <= x < 11.0]) == 5


def test_token_bucket_wait_and_change() -> None:
    """C{wait} says when the next token comes; a new size keeps the tokens, up to it."""
    clock = Clock()
    bucket = TokenBucket(2.0, 2, clock.seconds)
    assert bucket.take() and bucket.take() and not bucket.take()
    assert bucket.wait() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.wait() == 0.0 and bucket.take()
    clock.advance(10)
    bucket.change(1.0, 1)
    assert bucket.tokens == 1.0


# -- pure: matching --------------------------------------------------------------


RULES = """
[shaping.default]
max_connections = 3
throttle = [{ code = 421, pause = 30 }]

[[shaping.rule]]
name = "google"
mx = ["*.google.com"]
rate = "600/m"
burst = 20

[[shaping.rule]]
domains = ["example.com", "*.example.org"]
rate = "10/s"
messages_per_connection = 5
max_connections = 2
throttle = [{ enhanced = "4.7", pause = 120 }, { pattern = "(?i)too fast", pause = 10, rate = "1/s" }]
"""


def test_rules_match_domain_or_mx_and_the_default_is_per_domain() -> None:
    """
    The first rule that matches wins (one destination per rule, whatever
    the domain: every domain hosted by Google shares one); others get the
    default, one destination per recipient domain.
    """
    shaper = Shaper(settings_from(RULES), Clock())
    gmail = shaper.destination("gmail.com", ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"])
    hosted = shaper.destination("customer.example", ["aspmx.l.google.com."])
    assert gmail is hosted and gmail.name == "google" and gmail.rule.rate == Rate(600, 60.0)
    ex = shaper.destination("Example.COM", ["mx.other.net"])
    assert ex.name == "rule[1]" and ex is shaper.destination("sub.example.org")
    assert shaper.destination("example.org").name == "example.org"  # *.x: strict subdomains
    a, b = shaper.destination("a.test", ["mx.a.test"]), shaper.destination("b.test", ["mx.a.test"])
    assert a is not b and (a.name, b.name) == ("a.test", "b.test")
    assert a.rule.max_connections == 3 and a.rule.rate is None and a.bucket is None


def test_throttle_matching() -> None:
    """Code, enhanced-code prefix by parts, and text pattern must all match; never a 5xx or 2xx."""
    t = ThrottleRule.make(60, code=421)
    assert t.matches(421, "4.7.0", "try later") and not t.matches(450, "4.7.0", "x")
    e = ThrottleRule.make(60, enhanced="4.7")
    assert e.matches(451, "4.7.28", "rate") and e.matches(450, "4.7.1", "x")
    assert not e.matches(451, "4.70.1", "x") and not e.matches(550, "5.7.1", "x")
    p = ThrottleRule.make(60, pattern="(?i)too many")
    assert p.matches(450, "4.2.1", "Too many messages") and not p.matches(250, "2.0.0", "too many")
    both = ThrottleRule.make(60, code=451, pattern="busy")
    assert both.matches(451, "4.3.0", "server busy") and not both.matches(451, "4.3.0", "later")
    rule = settings_from(RULES).rules[1]
    hit = rule.throttle_for(450, "4.2.1", "slow down, too fast")
    assert hit is not None and hit.rate == Rate(1, 1.0) and hit.pause == 10


def test_settings_defaults_and_round_trip() -> None:
    """No throttle list: 421 and 4.7.x pause for 60 s; describe() reads back the same."""
    s = settings_from("[shaping.default]\nrate = '10/s'\n")
    assert s.default.bucket_size == 10
    assert [(t.code, t.enhanced, t.pause) for t in s.default.throttle] == [(421, None, 60.0), (None, "4.7", 60.0)]
    full = settings_from(RULES)
    again = settings_from("\n".join(describe_shaping(full)))
    assert again == full


@pytest.mark.parametrize("toml, key", [
    ("[[shaping.rule]]\ndomains = ['a.test']\nrate = '10/d'", "shaping.rule[0].rate"),
    ("[[shaping.rule]]\nrate = '10/s'", "shaping.rule[0].domains"),
    ("[[shaping.rule]]\ndomains = ['a..test']", "shaping.rule[0].domains[0]"),
    ("[shaping.default]\nburst = 5", "shaping.default.burst"),
    ("[shaping.default]\nmax_connections = -1", "shaping.default.max_connections"),
    ("[shaping.default]\nthrottle = [{ pause = 5 }]", "shaping.default.throttle[0].code"),
    ("[shaping.default]\nthrottle = [{ code = 550 }]", "shaping.default.throttle[0].code"),
    ("[shaping.default]\nthrottle = [{ pattern = '(' }]", "shaping.default.throttle[0].pattern"),
    ("[shaping.default]\nthrottle = [{ code = 421, pause = 0 }]", "shaping.default.throttle[0].pause"),
    ("[shaping.default]\nrates = '1/s'", "shaping.default.rates"),
    ("[[shaping.rule]]\nname = 'x'\ndomains = ['a.test']\n[[shaping.rule]]\nname = 'x'\ndomains = ['b.test']",
     "shaping.rule[1].name"),
])
def test_settings_errors_name_file_and_key(toml: str, key: str) -> None:
    """Every error names the file and the key."""
    with pytest.raises(ConfigError) as e:
        settings_from(toml)
    assert (e.value.source, e.value.key) == ("node.toml", key), str(e.value)


# -- pure: pause, release, reload -----------------------------------------------------


def test_throttle_pauses_and_releases_by_itself() -> None:
    """
    A 421 pauses the destination (event C{throttled}); jobs are refused
    with the suspended diagnostic and remembered; at the end of the pause
    it is released (event C{released}) and the remembered ids are flushed.
    """
    clock, events, flusher = Clock(), Events(), Flusher()
    flusher.clock = clock
    shaper = Shaper(settings_from("[shaping.default]\nthrottle = [{ code = 421, pause = 30 }]"), clock, events, flusher)
    d = shaper.destination("example.com")
    assert d.admit("Q1") is None
    assert not d.reply(450, "4.2.0", "mailbox busy", "mx:25")
    assert d.reply(421, "4.7.0", "Try again later", "mx.example.com[192.0.2.1]:25")
    assert d.paused and not d.may_start() and d.connection_room() == 0
    dsn, why = d.admit("Q2") or ("", "")
    assert dsn == "4.7.0"
    assert why.startswith("delivery temporarily suspended: example.com throttled: 421 4.7.0 Try again later (until ")
    (t,) = events.named("throttled")
    assert t["destination"] == "example.com" and t["pause"] == 30 and t["until"] == 30.0
    assert t["reply"] == "421 4.7.0 Try again later"
    assert d.snapshot()["state"] == "paused" and d.snapshot()["reason"] == "421 4.7.0 Try again later"
    clock.advance(29.9)
    assert d.paused and not flusher.flushed and not events.named("released")
    clock.advance(0.1)
    assert not d.paused and d.admit("Q3") is None
    (r,) = events.named("released")
    assert r["destination"] == "example.com" and r["paused_for"] == 30.0
    assert [q for q, _ in flusher.flushed] == ["Q2"]


def test_slow_down_instead_of_pause() -> None:
    """A throttle with a rate slows the destination to it for the pause, then the old rate returns."""
    clock = Clock()
    settings = settings_from(
        "[shaping.default]\nrate = '10/s'\nthrottle = [{ code = 451, pause = 5, rate = '1/s' }]")
    d = Shaper(settings, clock).destination("example.com")
    assert d.reply(451, "4.3.2", "slow down", "mx:25")
    assert not d.paused and d.snapshot()["state"] == "slowed" and d.rate == Rate(1, 1.0)
    assert d.may_start() and not d.may_start()  # a bucket of 1 at 1/s
    clock.advance(5)
    assert d.rate == Rate(10, 1.0) and d.snapshot()["state"] == "open"


def test_reload_keeps_state_of_unchanged_keys() -> None:
    """
    A reload keeps a destination whose key stays (its pause, tokens and
    remembered ids) under its new limits; one whose rule went away is
    forgotten, and what it remembered is flushed.
    """
    clock, flusher = Clock(), Flusher()
    toml = "[[shaping.rule]]\nname = 'big'\ndomains = ['big.test']\nrate = '{}/s'\n"
    shaper = Shaper(settings_from(toml.format(2)), clock, flush=flusher)
    big, small = shaper.destination("big.test"), shaper.destination("small.test")
    assert big.may_start() and big.may_start() and not big.may_start()
    small.reply(421, "4.7.0", "later", "mx:25")
    small.remember("Q9")
    shaper.configure(settings_from(toml.format(50)))
    assert shaper.destination("big.test") is big and big.rate == Rate(50, 1.0)
    assert not big.may_start()  # the tokens it had: none, until they accrue
    assert shaper.destination("small.test") is small and small.paused
    shaper.configure(settings_from("[[shaping.rule]]\nname = 'other'\ndomains = ['small.test']\n"))
    assert shaper.destination("big.test") is not big
    assert shaper.destination("small.test") is not small
    assert ("big", "rule") == (big.name, big.key[0])
    assert [q for q, _ in flusher.flushed] == []  # big remembered nothing
    shaper.configure(ShapingSettings())
    clock.advance(100)  # no timers of forgotten destinations fire into anything
    small.close()


def test_snapshot_and_worker_share() -> None:
    """
    What the views read of a destination; with the limits shared by 4
    workers, each allows a quarter of the rate, burst and connections.
    """
    clock = Clock()
    shaper = Shaper(settings_from(RULES), clock)
    d = shaper.destination("example.com")
    d.reply(451, "4.7.1", "go away", "mx:25")
    (snap,) = [x for x in shaper.snapshot() if x["destination"] == "rule[1]"]
    assert snap["state"] == "paused" and snap["until"] == 120.0 and snap["reason"] == "451 4.7.1 go away"
    assert (snap["rate"], snap["tokens"], snap["burst"], snap["max_connections"]) == ("10/s", 10.0, 10, 2)
    assert snap["throttles"] == 1 and snap["connections"] == 0
    quarter = Shaper(settings_from(RULES), clock, share=4).destination("example.com")
    assert quarter.bucket is not None and (quarter.bucket.rate, quarter.bucket.size) == (2.5, 3)
    assert quarter.connection_room() == 1


# -- the delivery attempt ------------------------------------------------------------


class ShapedHops:
    """An outbound agent that accepts everything and records the destination of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], Destination | None]] = []

    def deliver(self, endpoint: str, entry: QueueEntry, recipients: list[Recipient], concurrency: int = 20,
                source_address: str | None = None, tls_policy: str = "none",
                destination: Destination | None = None, **kw: Any) -> Deferred[list[DeliveryResult]]:
        self.calls.append((endpoint, [r.address for r in recipients], destination))
        return succeed([DeliveryResult(r.address, 250, "2.0.0", "ok", endpoint) for r in recipients])


def shaped_attempt(shaper: Shaper | None, resolver: Any, *rcpts: str) -> ShapedHops:
    table = RoutingTable(parse_config({
        "route": [
            {"domains": ["a.test", "b.test"], "action": "relay", "next_hops": ["tcp:smarthost.test:25"]},
            {"domains": ["*"], "action": "mx"},
        ],
    }, source="<test>"))
    hops = ShapedHops()
    delivery = Delivery(lambda: table, hops, None, lambda: resolver,  # type: ignore[arg-type]
                        shuffle=lambda h: None, shaper=lambda: shaper)
    env = Envelope("Q1", "s@src.test", tuple(Recipient(r) for r in rcpts), 0.0)
    out: list[Any] = []
    delivery.attempt(QueueEntry(env, QueueState(), "/nonexistent", 0), [Recipient(r) for r in rcpts]).addBoth(
        out.append)
    [result] = out
    assert isinstance(result, list) and all(o.status is RecipientStatus.RELAYED for o in result), result
    return hops


def test_attempt_passes_the_destination_by_mx_host_or_domain() -> None:
    """
    An mx route's destination is matched after the MX lookup: two domains
    whose MX hosts are under C{*.provider.test} share the rule's
    destination; a relay route's recipients go in one transaction per
    destination; without shaping no destination is passed.
    """
    resolver = zones.resolver({
        "one.test": ["@ MX 10 mx1.provider.test."], "two.test": ["@ MX 10 mx2.provider.test."],
        "own.test": ["@ MX 10 mx", "mx A 192.0.2.30"],
        "provider.test": ["mx1 A 192.0.2.10", "mx2 A 192.0.2.20"],
    })
    shaper = Shaper(settings_from("[[shaping.rule]]\nname = 'provider'\nmx = ['*.provider.test']\n"), Clock())
    hops = shaped_attempt(shaper, resolver, "u@one.test", "v@two.test", "w@own.test")
    dests = {rcpts[0]: d for _, rcpts, d in hops.calls}
    assert dests["u@one.test"] is dests["v@two.test"] and dests["u@one.test"] is not None
    assert dests["u@one.test"].name == "provider"
    own = dests["w@own.test"]
    assert own is not None and own.name == "own.test"
    hops = shaped_attempt(shaper, None, "x@a.test", "y@b.test", "z@a.test")
    assert sorted((rcpts, d.name if d else None) for _, rcpts, d in hops.calls) == [
        (["x@a.test", "z@a.test"], "a.test"), (["y@b.test"], "b.test")]
    hops = shaped_attempt(None, None, "x@a.test", "y@b.test")
    assert [(rcpts, d) for _, rcpts, d in hops.calls] == [(["x@a.test", "y@b.test"], None)]


# -- the connection pool ----------------------------------------------------------


def shaped_hop(tmp_path: Path, toml: str, concurrency: int = 20, **outbound: Any,
               ) -> tuple[Hop, Destination, Events, Flusher]:
    """A L{Hop} whose pool delivers to destination C{example.net} shaped by C{toml}."""
    hop = Hop(tmp_path, **outbound)
    events, flusher = Events(), Flusher()
    flusher.clock = hop.reactor
    shaper = Shaper(settings_from(toml), hop.reactor, events, flusher)
    dest = shaper.destination("example.net")
    hop.pool = HopPool(
        "tcp:mx.test:25", hop.reactor, hop.timeouts, "client.test", concurrency,
        run_in_thread=hop.run_in_thread, destination=dest,
    )
    return hop, dest, events, flusher


def test_jobs_beyond_the_rate_are_deferred_remembered_and_flushed(tmp_path: Path) -> None:
    """
    At 2/s with a burst of 2: of 10 messages submitted at once, 4 may wait
    in the pool (2 tokens now, a burst's worth more); the other 6 are
    deferred at once ("rate limited") and remembered. Messages start only
    with tokens (2 at once, then one each 0.5 s); the remembered ones are
    flushed (here: submitted again, as the runner would) as room comes,
    never more than the room: none is deferred twice, and all arrive.
    """
    hop, dest, _, flusher = shaped_hop(tmp_path, "[shaping.default]\nrate = '2/s'\nburst = 2\n")
    entries = {e.queue_id: e for e in (hop.entry() for _ in range(10))}
    outs = {qid: hop.submit(e) for qid, e in entries.items()}
    deferred = [qid for qid, o in outs.items() if o.fired]
    assert len(deferred) == 6
    for qid in deferred:
        (r,) = outs[qid].results or []
        assert (r.code, r.enhanced, r.text) == (0, "4.4.5", "rate limited: example.net, 2/s")
    assert list(dest.remembered) == deferred
    again: dict[str, Outcome] = {}

    def resubmit(ids: list[str], limit: int | None) -> int:
        for qid in ids[:limit]:
            flusher.flushed.append((qid, hop.reactor.seconds()))
            hop.reactor.callLater(0, lambda q=qid: again.__setitem__(q, hop.submit(entries[q])))
        return len(ids[:limit])

    dest.flush = resubmit
    hop.serve()
    sent = lambda: sum(len(s.messages) for s in hop.servers)
    assert sent() == 2
    times = [0.0, 0.0]
    for _ in range(60):
        hop.reactor.advance(0.1)
        hop.serve()
        while sent() > len(times):
            times.append(hop.reactor.seconds())
    assert sent() == 10 and all(o.fired for o in outs.values())
    assert times[2] == pytest.approx(0.5, abs=0.11) and times[3] == pytest.approx(1.0, abs=0.11)
    for t in times:
        assert sum(1 for x in times if t <= x < t + 1.0) <= 4, times
    assert sorted(q for q, _ in flusher.flushed) == sorted(deferred) and not dest.remembered
    assert all(o.by_address() == {"rcpt@example.net": (250, "2.0.0")} for o in again.values())
    # Nothing flushed before there was room for it.
    assert min(t for _, t in flusher.flushed) >= 0.5


def test_max_connections_is_shared_by_the_pools_of_a_destination(tmp_path: Path) -> None:
    """Two pools (two MX hosts) of one destination with max_connections = 1 never have two connections."""
    hop, dest, _, _ = shaped_hop(tmp_path, "[shaping.default]\nmax_connections = 1\n")
    other = HopPool("tcp:mx2.test:25", hop.reactor, hop.timeouts, "client.test", 20,
                    run_in_thread=hop.run_in_thread, destination=dest)
    a = hop.submit()
    e = hop.entry()
    b = Outcome()
    other.submit(e, list(e.envelope.recipients)).addCallbacks(b.done, b.failed)
    assert hop.connects == 1 and dest.connections() == 1
    hop.serve()
    # The first pool's connection is not kept idle while the other waits.
    assert a.fired and b.fired and hop.connects == 2
    assert b.by_address() == {"rcpt@example.net": (250, "2.0.0")}
    assert hop.max_in_flight == 1


def test_few_connections_hold_few_attempt_slots(tmp_path: Path) -> None:
    """
    With max_connections = 1 (and no rate) two jobs may wait; the others
    are deferred at once ("connection limit") and flushed one by one as
    jobs leave for the connection.
    """
    hop, _, _, flusher = shaped_hop(tmp_path, "[shaping.default]\nmax_connections = 1\n")
    entries = {e.queue_id: e for e in (hop.entry() for _ in range(5))}
    outs = {qid: hop.submit(e) for qid, e in entries.items()}
    deferred = [qid for qid, o in outs.items() if o.fired]
    assert len(deferred) == 3
    (r,) = outs[deferred[0]].results or []
    assert (r.enhanced, r.text) == ("4.4.5", "connection limit: example.net, 1 connections busy")
    assert not flusher.flushed
    hop.serve()
    assert 1 <= len(flusher.flushed) <= 2 and flusher.flushed[0][0] == deferred[0]
    assert hop.max_in_flight == 1


def test_messages_per_connection(tmp_path: Path) -> None:
    """A destination's messages_per_connection below [outbound]'s: a new connection after it."""
    hop, _, _, _ = shaped_hop(tmp_path, "[shaping.default]\nmessages_per_connection = 2\n", concurrency=1)
    outs = [hop.submit() for _ in range(5)]
    for _ in range(5):
        hop.serve()
        hop.reactor.advance(0.1)
    assert all(o.fired for o in outs)
    assert [len(s.messages) for s in hop.servers] == [2, 2, 1]


def test_421_pauses_the_destination_and_it_resumes(tmp_path: Path) -> None:
    """
    A 421 to MAIL pauses the destination: queued and new jobs are deferred
    at once with the suspended diagnostic (no connection is made), and
    remembered with the one the 421 was about; at the end of the pause they
    are flushed, and mail goes again.
    """
    hop, dest, events, flusher = shaped_hop(tmp_path, "[shaping.default]\nthrottle = [{ code = 421, pause = 30 }]\n")
    first = hop.entry()
    out = hop.submit(first)
    hop.serve(lambda: FakeSMTPServer(replies={b"MAIL": [b"421 4.7.0 Too many messages, slow down"]}))
    assert out.by_address() == {"rcpt@example.net": (421, "4.7.0")}
    (t,) = events.named("throttled")
    assert t["relay"] == "mx.test:25" and t["until"] == 30.0
    connects = hop.connects
    later = hop.entry()
    out2 = hop.submit(later)
    assert out2.results is not None
    assert out2.results[0].text.startswith("delivery temporarily suspended: example.net throttled: 421 4.7.0 Too many")
    hop.serve()
    assert hop.connects == connects and sum(len(s.messages) for s in hop.servers) == 0
    assert set(dest.remembered) == {first.queue_id, later.queue_id}
    hop.reactor.advance(29)
    assert not flusher.flushed
    hop.reactor.advance(1)
    assert {q for q, _ in flusher.flushed} == {first.queue_id, later.queue_id}
    assert len(events.named("released")) == 1
    again = hop.submit(later)
    hop.serve()
    assert again.by_address() == {"rcpt@example.net": (250, "2.0.0")}


def test_421_greeting_pauses_the_destination(tmp_path: Path) -> None:
    """A 421 greeting is a throttling reply too: the destination pauses, the queued jobs are deferred."""
    hop, dest, events, _ = shaped_hop(tmp_path, "[shaping.default]\nthrottle = [{ code = 421, pause = 10 }]\n",
                                      hop_down_time=0)
    outs = [hop.submit() for _ in range(3)]
    hop.serve(lambda: FakeSMTPServer(greeting=b"421 4.7.0 mx.test busy, try later"))
    assert all(o.fired for o in outs) and dest.paused
    (t,) = events.named("throttled")
    assert t["reply"] == "421 4.7.0 mx.test busy, try later"
    assert len(dest.remembered) == 3
    hop.reactor.advance(10)
    assert not dest.paused and len(events.named("released")) == 1


def test_outbound_manager_keeps_shaping_across_a_reload(tmp_path: Path) -> None:
    """
    configure_shaping again (a reload) keeps the destinations and their
    pause; the pools made after it use the same destination; None turns
    shaping off.
    """
    from relaynet.delivery.client import OutboundManager

    hop = Hop(tmp_path)
    manager = OutboundManager(hop.reactor, hop.timeouts, "client.test")
    manager.configure_shaping(settings_from("[shaping.default]\nrate = '1/s'\n"))
    assert manager.shaper is not None
    d = manager.shaper.destination("example.net")
    d.reply(421, "4.7.0", "later", "mx:25")
    manager.configure_shaping(settings_from("[shaping.default]\nrate = '2/s'\n"))
    assert manager.shaper.destination("example.net") is d and d.paused and d.rule.rate == Rate(2, 1.0)
    manager.close_idle()
    pool = manager.pool("tcp:mx.test:25", destination=d)
    assert pool.destination is d and manager.pool("tcp:mx.test:25") is not pool
    assert [s["destination"] for s in manager.destination_states()] == ["example.net"]
    manager.configure_shaping(None)
    assert manager.shaper is None and manager.destination_states() == []


# -- over real sockets ------------------------------------------------------------


class Sink(LineReceiver):
    """A loopback SMTP receiver that timestamps each transaction; may answer one MAIL with 421."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.data: list[bytes] | None = None
        self.mail_at = 0.0
        self.factory.open += 1  # type: ignore[attr-defined]
        self.sendLine(b"220 sink.test ESMTP")

    def connectionLost(self, reason: Any = None) -> None:
        f: SinkFactory = self.factory  # type: ignore[assignment]
        f.open -= 1
        f.changed()

    def lineReceived(self, line: bytes) -> None:
        f: SinkFactory = self.factory  # type: ignore[assignment]
        if self.data is not None:
            if line == b".":
                f.received.append((self.mail_at, time.monotonic()))
                self.data = None
                self.sendLine(b"250 2.0.0 Ok")
                f.changed()
            else:
                self.data.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-sink.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES")
        elif verb == b"MAIL":
            if f.refuse_next:
                f.refuse_next = False
                f.refused_at = time.monotonic()
                self.sendLine(b"421 4.7.0 Too many messages, slow down")
                self.transport.loseConnection()
                f.changed()
                return
            self.mail_at = time.monotonic()
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            self.data = []
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 2.0.0 Ok")


class SinkFactory(Factory):
    protocol = Sink

    def __init__(self) -> None:
        self.received: list[tuple[float, float]] = []
        self.refuse_next = False
        self.refused_at: float | None = None
        self.open = 0
        self._waiters: list[tuple[Any, Deferred[None]]] = []

    def changed(self) -> None:
        for cond, d in list(self._waiters):
            if cond():
                self._waiters.remove((cond, d))
                d.callback(None)

    def until(self, cond: Any, timeout: float) -> Deferred[None]:
        """Fires when C{cond()} holds; fails after C{timeout} seconds."""
        d: Deferred[None] = Deferred()
        if cond():
            d.callback(None)
            return d
        self._waiters.append((cond, d))
        return d.addTimeout(timeout, global_reactor)


class RealSocketShaping(unittest.TestCase):
    """The must-show test over real sockets, in-process with the real reactor."""

    N = 5
    BURST = 5
    PAUSE = 3.0
    timeout = 60  # type: ignore[assignment]

    @defer.inlineCallbacks
    def test_rate_holds_every_second_and_421_pauses(self) -> Any:
        """
        60 messages queued at once for a destination limited to 5/s with a
        burst of 5: they arrive over more than 10 s, at most 10 in any
        second (a window starting at each arrival), and all of them; then
        the receiver answers one MAIL with 421: no transaction starts for
        the pause, and the 15 messages queued then all arrive after it.
        """
        sink = SinkFactory()
        port = yield TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(sink)
        tmp = Path(tempfile.mkdtemp(prefix="shaping-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        config = make_config(tmp, toml=f"""
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{port.getHost().port}"]
[queue]
minimal_backoff = 600
maximal_backoff = 600
[outbound]
hop_down_time = 0
[admin]
enabled = false
""")
        from relaynet.runner import QueueRunner

        events: list[dict[str, Any]] = []
        log = EventLog(None, "t")
        log.observers.append(events.append)
        spool = MemorySpool(clock=time.time)
        runner = QueueRunner(config, spool, log, global_reactor, global_reactor.getThreadPool())
        runner.outbound.configure_shaping(ShapingSettings(ShapingRule(
            rate=Rate(self.N, 1.0), burst=self.BURST,
            throttle=(ThrottleRule.make(self.PAUSE, code=421),),
        )))
        runner.start([])

        @defer.inlineCallbacks
        def stop() -> Any:
            yield runner.stop()  # idle connections QUIT
            yield sink.until(lambda: sink.open == 0, 10)
            yield port.stopListening()

        self.addCleanup(stop)

        def queue(n: int) -> None:
            for i in range(n):
                env = Envelope(spool.new_id(), "sender@example.org",
                               (Recipient(f"r{i}@dest.test", "relay:*"),), time.time())
                writer = spool.begin(env)
                writer.write(b"Subject: shaped\r\n\r\nbody\r\n")
                out: list[Any] = []
                writer.commit(hops=1).addBoth(out.append)
                (entry,) = out
                assert isinstance(entry, QueueEntry), entry
                runner.enqueue(entry)

        queue(60)
        yield sink.until(lambda: len(sink.received) >= 60, 40)
        arrivals = sorted(at for _, at in sink.received)
        self.assertGreaterEqual(arrivals[-1] - arrivals[0], 10.0)
        worst = max(sum(1 for x in arrivals if t <= x < t + 1.0) for t in arrivals)
        self.assertLessEqual(worst, self.N + self.BURST, arrivals)
        self.assertTrue(any(e["event"] == "deferred" and "rate limited: dest.test, 5/s" in e.get("diagnostic", "")
                            for e in events))

        # The 421: the destination pauses, then resumes.
        sink.refuse_next = True
        before = len(sink.received)
        queue(15)
        yield sink.until(lambda: len(sink.received) >= before + 15, 30)
        assert sink.refused_at is not None
        started = [m for m, _ in sink.received[before:]]
        during = [m - sink.refused_at for m in started if sink.refused_at < m < sink.refused_at + self.PAUSE - 0.05]
        self.assertEqual(during, [])
        self.assertTrue(any(m > sink.refused_at + self.PAUSE - 0.05 for m in started))
        throttled = [e for e in events if e["event"] == "throttled"]
        released = [e for e in events if e["event"] == "released"]
        self.assertEqual(len(throttled), 1, throttled)
        self.assertEqual(throttled[0]["destination"], "dest.test")
        self.assertEqual(len(released), 1, released)
