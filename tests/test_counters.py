"""
Tests for the queue's counters (L{relaynet.queue.tally}) and arrival order
(L{relaynet.queue.ordering}): kept up to date by the queue core through every
transition, they must always equal what a walk over the queue finds. The walk
lives here only; the node reads the counters.
"""

from __future__ import annotations

import io
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relaynet.admin.api import summarize
from relaynet.queue import listing
from relaynet.queue.core import BUSY, Decision, Outcome, Plan, QueueCore
from relaynet.queue.ordering import ArrivalOrder
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import (
    BoundedReader,
    Envelope,
    QueueEntry,
    QueueState,
    Recipient,
    RecipientState,
)
from relaynet.queue.states import MessageState, OutcomeEvent, RecipientStatus
from relaynet.queue.tally import domain_of, reason_of

T0 = 1_750_000_000.0
POLICY = RetryPolicy(minimal_backoff=300, maximal_backoff=4000, jitter=0.0, lifetime=86400)
DOMAINS = ("a.test", "B.test", "c.test", "")
REASONS = ("connect to 192.0.2.1:25: Connection refused", "451 4.7.1 greylisted", "x" * 300, "")


class _Entry(QueueEntry):
    def open_message(self, skip: int = 0) -> BoundedReader:
        data = b"Subject: x\r\n\r\nbody\r\n"[skip:]
        return BoundedReader(io.BytesIO(data), len(data))  # type: ignore[arg-type]


def walked(core: QueueCore) -> dict[str, Any]:
    """The counters, recomputed the slow way: a walk over every queued message."""
    states = {str(s): 0 for s in MessageState}
    recipients: dict[str, int] = {}
    dests: dict[str, list[int]] = {}
    reasons: dict[str, int] = {}
    size = pending = 0
    for e in core:
        states[core.state(e)] += 1
        size += e.envelope.size
        seen = set()
        for r in e.envelope.recipients:
            s = e.state.recipients.get(r.address)
            status = s.status if s is not None else RecipientStatus.PENDING
            recipients[status] = recipients.get(status, 0) + 1
            if status.final:
                continue
            pending += 1
            row = dests.setdefault(domain_of(r.address), [0, 0])
            row[0] += 1
            if domain_of(r.address) not in seen:
                seen.add(domain_of(r.address))
                row[1] += 1
            if status is RecipientStatus.DEFERRED:
                assert s is not None
                reason = reason_of(s.diagnostic, s.dsn)
                reasons[reason] = reasons.get(reason, 0) + 1
    oldest = min(core, key=lambda e: (e.envelope.arrival, e.queue_id), default=None)
    return {
        "states": states, "size": size, "recipients": recipients, "pending": pending,
        "destinations": dests, "reasons": reasons, "messages": len(core),
        "oldest": None if oldest is None else oldest.envelope.arrival,
    }


def kept(core: QueueCore) -> dict[str, Any]:
    """The counters as the core keeps them."""
    t = core.tally
    totals = core.totals()
    return {
        "states": core.counts(), "size": totals.size, "recipients": dict(totals.recipients),
        "pending": totals.pending, "destinations": {d: list(v) for d, v in t.destinations.items()},
        "reasons": dict(t.reasons), "messages": totals.messages, "oldest": totals.oldest_arrival,
    }


def check(core: QueueCore, now: float = T0) -> None:
    assert kept(core) == walked(core)
    ordered = list(core.oldest_first())
    assert sorted(e.queue_id for e in ordered) == sorted(e.queue_id for e in core)
    arrivals = [e.envelope.arrival for e in ordered]
    assert arrivals == sorted(arrivals)
    for state in MessageState:
        in_state = list(core.oldest_first(state))
        assert [e.queue_id for e in in_state] == [e.queue_id for e in ordered if core.state(e) is state]


def check_readers(core: QueueCore, now: float) -> None:
    """The summary and the pages read from counters equal what the walk over every message gave."""
    everything = listing.summaries(core, listing.matching(core, now), now)
    for top in (1, 3, 10):
        assert listing.summary(core, now, top) == summarize(everything, top)
    for state in (None, *MessageState):
        every = [e for e in sorted(core, key=lambda e: (e.envelope.arrival, e.queue_id)) if not state or core.state(e) == state]
        for limit in (0, 1, 5, None):
            count, shown = listing.page(core, now, limit, state)
            assert count == len(every)
            assert [e.queue_id for e in shown] == [e.queue_id for e in every[:limit]]
        # Paged with a cursor (the last message of each page): the same messages, once each.
        paged: list[QueueEntry] = []
        after = None
        for _ in range(len(every) // 3 + 2):
            count, shown = listing.page(core, now, 3, state, after=after)
            assert count == len(every) - len(paged)
            paged += shown
            if len(shown) < 3:
                break
            after = (shown[-1].envelope.arrival, shown[-1].queue_id)
        assert paged == every
    for state in (None, MessageState.DEFERRED):
        count, shown = listing.page(core, now, 2, state, domain="a.test", min_age=1)
        every = [e for e in listing.matching(core, now, state) if now - e.envelope.arrival >= 1
                 and any(domain_of(r.address) == "a.test" for r in e.envelope.recipients)]
        assert (count, shown) == (len(every), every[:2])
        assert listing.scan(core, core.snapshot(state), now, domain="a.test", min_age=1) == every
        assert listing.scan(core, core.snapshot(state), now, sender="SRC", recipient="U1@") == [
            e for e in listing.matching(core, now, state) if any(r.address.startswith("u1@") for r in e.envelope.recipients)
        ]


def outcome(rng: random.Random, address: str) -> Outcome | None:
    kind = rng.choice(["relayed", "delivered", "deferred", "deferred", "bounced", "missing"])
    if kind == "missing":
        return None  # the core defers a recipient the attempt forgot
    if kind == "relayed":
        return Outcome(address, RecipientStatus.RELAYED, OutcomeEvent.SENT, "2.0.0", "250 ok", "hop:25", code=250)
    if kind == "delivered":
        return Outcome.delivered(address)
    if kind == "deferred":
        return Outcome.deferred(address, rng.choice(["4.4.1", "4.7.1"]), rng.choice(REASONS), "hop:25")
    return Outcome.bounced(address, "5.1.1", rng.choice(REASONS), "hop:25", code=550)


def new_entry(rng: random.Random, n: int, now: float, recovered: bool = False) -> QueueEntry:
    rcpts = tuple(
        Recipient(f"u{i}@{rng.choice(DOMAINS)}", "relay:*") for i in range(rng.randint(1, 4))
    )
    arrival = now - rng.choice([0, 0, 0, 5, 3600, 2 * 86400])  # some arrive out of order, some expired
    env = Envelope(f"Q{n}", "s@src.test", rcpts, arrival, size=rng.randint(0, 5000))
    state = QueueState(held=rng.random() < 0.1)
    if recovered:  # a recovered message has recorded outcomes
        for r in rcpts:
            if rng.random() < 0.5:
                state.recipients[r.address] = RecipientState(
                    status=rng.choice(["pending", "deferred", "relayed"]), attempts=1,  # type: ignore[arg-type]
                    diagnostic=rng.choice(REASONS) or None, dsn="4.4.1",
                )
    return _Entry(env, state, f"/nonexistent/Q{n}", 0)


def unnotified(rng: random.Random, core: QueueCore, decision: Decision | None, now: float) -> None:
    """Now and then, some notices of C{decision} could not be queued (a full disk): the message owes them."""
    if decision is not None and decision.entry is not None and decision.notices and rng.random() < 0.5:
        core.unnotified(decision, rng.sample(decision.notices, rng.randint(1, len(decision.notices))), now)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 120))
def test_counters_equal_a_walk_after_random_operations(seed: int, steps: int) -> None:
    """
    After any sequence of adds (new, recovered, re-added), attempts begun and
    finished (any outcomes, forgotten recipients), expiries, holds, releases,
    deletes and bounces, and notices that could not be queued (owed), the
    kept counters and order equal a walk's.
    """
    rng = random.Random(seed)
    core = QueueCore(POLICY, delay_warning=rng.choice([0.0, 60.0]))
    plans: dict[str, Plan] = {}
    now = T0
    n = 0
    for _ in range(steps):
        now += rng.choice([0, 1, 600])
        ids = [e.queue_id for e in core]
        op = rng.choice(["add", "add", "recover", "readd", "begin", "begin", "finish", "finish",
                         "hold", "release", "delete", "bounce", "flush"])
        qid = rng.choice(ids) if ids else "none"
        if op in ("add", "recover"):
            n += 1
            core.add(new_entry(rng, n, now, recovered=op == "recover"), now)
        elif op == "readd" and ids:
            old = core.get(qid)
            assert old is not None
            again = _Entry(old.envelope, QueueState(held=rng.random() < 0.5), old.path, 0)
            core.add(again, now)
        elif op == "begin":
            got = core.begin(qid, now + rng.choice([0, 0, 2 * 86400]))
            if isinstance(got, Plan):
                plans[qid] = got
            else:
                assert got is None or isinstance(got, Decision)
                unnotified(rng, core, got, now)
        elif op == "finish" and plans:
            plan = plans.pop(rng.choice(sorted(plans)))
            outs = [o for o in (outcome(rng, r.address) for r in plan.recipients) if o is not None]
            unnotified(rng, core, core.finish(plan, outs, now), now)
        elif op == "hold":
            core.hold(qid)
        elif op == "release":
            core.release(qid, now)
        elif op == "delete":
            if core.delete(qid) is not BUSY:
                plans.pop(qid, None)
        elif op == "bounce":
            got = core.bounce(qid, "returned", now)
            if got is not BUSY:
                plans.pop(qid, None)
                assert isinstance(got, Decision)
                unnotified(rng, core, got, now)
        elif op == "flush":
            core.flush(qid, now)
        check(core)
        if rng.random() < 0.2:
            check_readers(core, now)
    for plan in list(plans.values()):
        core.finish(plan, [], now)
        check(core)
    check_readers(core, now)


def test_top_destinations_and_reasons() -> None:
    """The tops are by count, then by name, and count a message once per domain."""
    core = QueueCore(POLICY)
    rcpts = tuple(Recipient(a, "relay:*") for a in ("a@x.test", "b@x.test", "c@y.test"))
    core.add(_Entry(Envelope("Q1", "s@s", rcpts, T0, size=10), QueueState(), "/x", 0), T0)
    core.add(_Entry(Envelope("Q2", "s@s", rcpts[2:], T0 + 1, size=5), QueueState(), "/x", 0), T0)
    assert core.tally.top_destinations(10) == [("x.test", 2, 1), ("y.test", 2, 2)]
    assert core.tally.top_destinations(1) == [("x.test", 2, 1)]
    plan = core.begin("Q2", T0 + 2)
    assert isinstance(plan, Plan)
    core.finish(plan, [Outcome.deferred("c@y.test", "4.4.1", "refused")], T0 + 2)
    assert core.tally.top_reasons(5) == [("refused", 1)]
    totals = core.totals()
    assert (totals.messages, totals.size, totals.pending, totals.oldest_id) == (2, 15, 4, "Q1")


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=400))
def test_arrival_order_is_sorted(ops: list[tuple[bool, int]]) -> None:
    """L{ArrivalOrder} stays sorted through adds and removes that split and empty blocks."""
    order = ArrivalOrder()
    present: set[tuple[float, str]] = set()
    seq = 0
    for add, value in ops:
        if add or not present:
            for _ in range(value % 7 + 1):  # bursts, so that blocks split
                seq += 1
                key = (float(value % 50), f"Q{seq:05d}")
                order.add(key)
                present.add(key)
        else:
            key = sorted(present)[value % len(present)]
            order.remove(key)
            present.discard(key)
        assert list(order) == sorted(present)
        assert len(order) == len(present)
        assert order.first() == (min(present) if present else None)
        # A cursor at, between and past the keys: what follows it, and how many.
        for cursor in ((float(value % 50), f"Q{seq // 2:05d}"), (float(value % 50), ""), (-1.0, ""), (99.0, "")):
            later = [k for k in sorted(present) if k > cursor]
            assert list(order.after(cursor)) == later and order.count_after(cursor) == len(later)


def test_arrival_order_splits_large_blocks() -> None:
    """Thousands of keys, in and out of order, then removed: always sorted."""
    order = ArrivalOrder()
    keys = [(float(i % 977), f"Q{i:05d}") for i in range(5000)]
    for k in keys:
        order.add(k)
    assert list(order) == sorted(keys)
    for k in keys[::2]:
        order.remove(k)
    assert list(order) == sorted(keys[1::2])


# -- the runner's views: slices and threads, never the whole queue at once -----


class _InlinePool:
    """A thread pool that runs each job at once (the job's code is what a worker thread runs)."""

    def __init__(self) -> None:
        self.jobs = 0

    def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
        self.jobs += 1
        on_result(True, f(*a, **kw))


def _runner(n: int) -> tuple[Any, Any, _InlinePool]:
    from twisted.internet.task import Clock

    from relaynet.config import parse_config
    from relaynet.events import EventLog
    from relaynet.runner import QueueRunner

    clock = Clock()
    clock.advance(T0)
    clock.callFromThread = lambda f, *a, **kw: f(*a, **kw)  # type: ignore[attr-defined]
    config = parse_config({"node": {"name": "t"}})
    pool = _InlinePool()
    runner = QueueRunner(config, None, EventLog(None, "t", clock=clock.seconds), clock, pool,
                         outbound=object(), now=clock.seconds)
    rng = random.Random(7)
    runner.load(new_entry(rng, i, T0) for i in range(n))
    return runner, clock, pool


def test_collect_runs_a_slice_per_reactor_turn() -> None:
    """
    A filtered summary's or a shape's messages are summarised a slice of
    C{COLLECT_SLICE} per reactor turn, and come out as L{list} gives them.
    """
    from relaynet.runner import COLLECT_SLICE

    runner, clock, _ = _runner(2 * COLLECT_SLICE + 5)
    items: list[Any] = []
    done: list[Any] = []
    runner.collect(items.append, domain="a.test").addCallback(done.append)
    [later] = clock.getDelayedCalls()  # one slice done, the next one scheduled
    assert not done and later.args == (COLLECT_SLICE,)
    assert 0 < len(items) <= COLLECT_SLICE
    clock.advance(0)
    assert done and items == runner.list(domain="a.test")
    held: list[Any] = []
    runner.collect(held.append, state="hold").addCallback(done.append)
    clock.advance(0)
    assert len(done) == 2 and held == runner.list(state="hold")


def test_page_with_envelope_filters_runs_in_a_thread() -> None:
    """
    A page filtered on the envelope is matched in a worker thread; a page
    by state only is not, and counts with the counter.
    """
    runner, clock, pool = _runner(300)
    pages: list[Any] = []
    runner.page(5, domain="c.test").addCallback(pages.append)
    every = runner.matching(domain="c.test")
    assert pool.jobs == 1 and pages == [(len(every), every[:5])]
    runner.page(3, state="incoming").addCallback(pages.append)
    every = runner.matching(state="incoming")
    assert pool.jobs == 1 and pages[1] == (len(every), every[:3])
    # With a cursor, in the thread too: the page and the count start after it.
    every = runner.matching(domain="c.test")
    cursor = (every[4].envelope.arrival, every[4].queue_id)
    runner.page(5, domain="c.test", after=cursor).addCallback(pages.append)
    assert pool.jobs == 2 and pages[2] == (len(every) - 5, every[5:10])
