"""
Tests for L{relaynet.runner}: the runner carries out the queue core's
decisions -- one state write at a time per message, admin verbs during
attempts, failed attempts as deferrals -- in-process, with a fake next hop
whose answers the test gives.

The race tests run hundreds of admin hold/release/bounce calls against
messages whose attempt is in flight, in two ways: over a L{MemorySpool}
whose writes complete only when the test says (so overlapping writes of one
message are seen deterministically), and over the Maildir L{Spool} with a
real thread pool (so two writers of one state file would really race on
disk). Both fail on the runner before the queue core (whose hold/release
wrote the state file while the attempt's own write was under way).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaynet.delivery.client import DeliveryResult
from relaynet.events import EventLog
from relaynet.queue.spool import Envelope, QueueEntry, Recipient, Spool, SpoolFull
from relaynet.runner import PACE_TICK, SETTLE_DELAY, QueueRunner, SerialWrites
from relaynet.testing import EPOCH, ManualThreadPool, PumpedReactor, ThreadlessReactor, make_config
from relaynet.testing.spool import MemorySpool

ROUTE = """
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:192.0.2.1:25"]

[queue]
minimal_backoff = 60
maximal_backoff = 600
"""


class SlowHop:
    """
    A next hop (the runner's outbound agent) that answers only when the
    test says, and counts what it accepted.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[list[DeliveryResult]], QueueEntry, list[Recipient]]] = []
        self.accepted: Counter[tuple[str, str]] = Counter()
        self.raise_for: set[str] = set()

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
        concurrency: int = 20, source_address: str | None = None, tls_policy: str = "none",
    ) -> Deferred[list[DeliveryResult]]:
        if entry.queue_id in self.raise_for:
            raise RuntimeError("the outbound agent broke")
        d: Deferred[list[DeliveryResult]] = Deferred()
        self.pending.append((d, entry, list(recipients)))
        return d

    def answer(self, index: int, code: int, named: bool = False) -> None:
        """
        Answer the attempt at C{index} with C{code} for every recipient;
        C{named}: the transfer was named (XTXN), as with a relaynet next hop
        (every result of the transaction says so, accepted or not, as the
        SMTP client reports it).
        """
        d, entry, rcpts = self.pending.pop(index)
        enhanced = {250: "2.0.0", 451: "4.3.0", 550: "5.1.1"}[code]
        if code == 250:
            for r in rcpts:
                self.accepted[(entry.queue_id, r.address)] += 1
        d.callback([
            DeliveryResult(r.address, code, enhanced, "hop says so", "hop:25", named=named)
            for r in rcpts
        ])

    def close(self) -> None:
        pass

    def close_idle(self) -> None:
        pass


class WatchedSpool:
    """A spool wrapper counting writes of one message that overlap."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outstanding: Counter[str] = Counter()
        self.overlaps: list[str] = []
        self.failures: list[Failure] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _watch(self, qid: str, d: Deferred[None]) -> Deferred[None]:
        if self.outstanding[qid]:
            self.overlaps.append(qid)
        self.outstanding[qid] += 1

        def done(result: object) -> object:
            self.outstanding[qid] -= 1
            if isinstance(result, Failure):
                self.failures.append(result)
            return result

        return d.addBoth(done)

    def record(self, entry: QueueEntry) -> Deferred[None]:
        return self._watch(entry.queue_id, self.inner.record(entry))

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        return self._watch(entry.queue_id, self.inner.remove(entry))


def make_runner(tmp_path: Path, spool: Any, reactor: Any, pool: Any, toml: str = ROUTE,
                ) -> tuple[QueueRunner, SlowHop, list[dict[str, Any]]]:
    """A started runner over C{spool} relaying everything to a L{SlowHop}; its events."""
    config = make_config(tmp_path, toml=toml)
    hop = SlowHop()
    events: list[dict[str, Any]] = []
    log = EventLog(None, "t", clock=reactor.seconds)
    log.observers.append(events.append)
    runner = QueueRunner(config, spool, log, reactor, pool, outbound=hop, now=reactor.seconds)
    runner.start([])
    return runner, hop, events


def commit(spool: Any, qid_sender: str, rcpts: tuple[str, ...], now: float, run: Callable[[], None]) -> QueueEntry:
    env = Envelope(spool.new_id(), qid_sender, tuple(Recipient(r, "relay:*") for r in rcpts), now)
    writer = spool.begin(env)
    writer.write(b"Subject: race\r\n\r\nbody\r\n")
    out: list[Any] = []
    writer.commit(hops=1).addBoth(out.append)
    for _ in range(1000):
        if out:
            break
        run()
    [entry] = out
    assert isinstance(entry, QueueEntry), entry
    return entry


def _results(d: Deferred[Any], sink: list[Any]) -> None:
    d.addBoth(sink.append)


# -- serialised writes ----------------------------------------------------------


def test_serial_writes_run_one_at_a_time_per_key() -> None:
    """A job of a key starts only when the previous one of that key is done; other keys run freely."""
    serial = SerialWrites()
    started: list[str] = []
    gates: dict[str, Deferred[None]] = {}

    def job(name: str) -> Callable[[], Deferred[None]]:
        def run() -> Deferred[None]:
            started.append(name)
            gates[name] = Deferred()
            return gates[name]
        return run

    results: list[Any] = []
    _results(serial.run("a", job("a1")), results)
    _results(serial.run("a", job("a2")), results)
    _results(serial.run("b", job("b1")), results)
    assert started == ["a1", "b1"]
    gates["a1"].errback(Failure(OSError("disk")))
    assert started == ["a1", "b1", "a2"]  # a failure does not block the next job
    gates["a2"].callback(None)
    gates["b1"].callback(None)
    assert len(results) == 3 and isinstance(results[0], Failure)
    assert len(serial) == 0


# -- the races ------------------------------------------------------------------


def _race(runner: QueueRunner, spool: Any, hop: SlowHop, settle: Callable[[], None],
          rng: random.Random, messages: int, now: Callable[[], float]) -> dict[str, bool]:
    """
    Commit C{messages} messages, three at a time in flight, and while their
    attempts wait for the hop, run random hold/release/bounce calls and hop
    answers. Returns the hold each message should have at the end.
    """
    expected_hold: dict[str, bool] = {}
    admin_results: list[Any] = []
    for _ in range(messages // 3):
        batch = [commit(spool, "s@src.test", ("a@x.test", "b@y.test"), now(), settle) for _ in range(3)]
        for entry in batch:
            runner.enqueue(entry)
        settle()
        ops: list[tuple[str, str]] = []
        for entry in batch:
            ops += [(rng.choice(["hold", "release", "hold", "bounce", "settle"]), entry.queue_id)
                    for _ in range(rng.randint(1, 4))]
        ops += [("answer", "")] * len(batch)
        rng.shuffle(ops)
        for op, qid in ops:
            if op == "answer":
                if hop.pending:
                    hop.answer(rng.randrange(len(hop.pending)), rng.choice([250, 451]))
            elif op == "settle":
                settle()
            else:
                if op in ("hold", "release") and qid in runner:
                    expected_hold[qid] = op == "hold"
                d = getattr(runner, op)(qid)
                _results(d, admin_results)
        for _ in range(10):  # answer what a release started again
            settle()
            if not hop.pending:
                break
            while hop.pending:
                hop.answer(0, rng.choice([250, 451]))
        settle()
    failures = [r for r in admin_results if isinstance(r, Failure)]
    assert not failures, failures[0].getTraceback()
    return expected_hold


def _check(runner: QueueRunner, hop: SlowHop, events: list[dict[str, Any]],
           expected_hold: dict[str, bool], recovered: dict[str, QueueEntry]) -> None:
    # Each recipient at most once at the next hop, never both sent and bounced.
    assert all(n == 1 for n in hop.accepted.values()), [k for k, n in hop.accepted.items() if n > 1]
    bounced = {(e["queue_id"], e["recipient"]) for e in events if e["event"] == "bounced"}
    assert not bounced & set(hop.accepted), sorted(bounced & set(hop.accepted))[:3]
    # What the spool holds is what the runner holds, holds included.
    assert set(recovered) == {e.queue_id for e in runner.core}
    for qid, entry in recovered.items():
        if qid in expected_hold:
            assert entry.state.held == expected_hold[qid], qid
        live = runner.core.get(qid)
        assert live is not None and entry.state.held == live.state.held
        for r in entry.envelope.recipients:
            if (qid, r.address) in hop.accepted:
                assert entry.state.recipients[r.address].status == "relayed"


def test_admin_verbs_during_attempts_memory_spool(tmp_path: Path) -> None:
    """
    300 messages, hold/release/bounce at random while their attempts are in
    flight, the spool's writes completing in between: no message ever has
    two state writes outstanding, every hold is kept (in memory and in the
    spool), and each recipient reaches the next hop at most once and is
    never both relayed and bounced.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    inner = MemorySpool(clock=reactor.seconds, immediate=False)
    spool = WatchedSpool(inner)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    rng = random.Random(1150)

    def settle() -> None:
        for _ in range(rng.randint(0, 3)):
            inner.run_one()

    expected = _race(runner, spool, hop, settle, rng, 300, reactor.seconds)
    inner.run_all()
    assert spool.overlaps == [], f"{len(spool.overlaps)} overlapping writes, e.g. of {spool.overlaps[0]}"
    assert not spool.failures
    inner.crash()
    inner.prepare()
    recovered = {e.queue_id: e for e in inner.recover()}
    _check(runner, hop, events, expected, recovered)


def test_admin_verbs_during_attempts_maildir_spool_real_threads(tmp_path: Path) -> None:
    """
    The same race over the Maildir spool with four real worker threads:
    every state file on disk parses, no admin call fails (two writers of one
    state file made renames fail: HTTP 500 in the admin API), holds survive
    recovery, and each recipient reaches the next hop at most once.
    """
    reactor = PumpedReactor()
    reactor.advance(EPOCH)
    pool = ThreadPool(minthreads=4, maxthreads=4, name="test-race")
    pool.start()
    try:
        inner = Spool(tmp_path / "queue", reactor, pool, clock=reactor.seconds)
        inner.prepare()
        spool = WatchedSpool(inner)
        runner, hop, events = make_runner(tmp_path, spool, reactor, pool)
        rng = random.Random(2026)

        def settle() -> None:
            if rng.random() < 0.5:
                reactor.drain(pool)

        expected = _race(runner, spool, hop, settle, rng, 150, reactor.seconds)
        reactor.drain(pool)
        assert not spool.failures, spool.failures[0].getTraceback()
        # Every message had its first attempt (or left): none keeps its bytes in memory.
        assert inner.fresh_bytes == 0
        for p in (tmp_path / "queue" / "state").iterdir():
            json.loads(p.read_bytes())  # every state file parses
        assert not list((tmp_path / "queue" / "tmp").iterdir())
        recovered = {e.queue_id: e for e in Spool(tmp_path / "queue", reactor, pool).recover()}
        _check(runner, hop, events, expected, recovered)
    finally:
        pool.stop()


# -- failed attempts ----------------------------------------------------------------


def test_an_attempt_that_raises_defers_that_message_alone(tmp_path: Path) -> None:
    """
    An exception in an attempt defers its recipients (4.3.0) with the
    ordinary backoff; other messages are attempted and delivered meanwhile,
    and the attempt slot is given back.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True),
                                      ROUTE + "concurrency = 1\n")
    bad = commit(spool, "s@src.test", ("a@x.test",), reactor.seconds(), lambda: None)
    good = commit(spool, "s@src.test", ("b@y.test",), reactor.seconds(), lambda: None)
    hop.raise_for.add(bad.queue_id)
    runner.enqueue(bad)
    runner.enqueue(good)
    assert len(hop.pending) == 1  # the one slot was given back after the failure
    hop.answer(0, 250)
    assert good.queue_id not in runner
    st = bad.state.recipients["a@x.test"]
    assert (st.status, st.dsn) == ("deferred", "4.3.0") and "internal error" in (st.diagnostic or "")
    assert bad.state.next_attempt is not None
    assert 54 <= bad.state.next_attempt - reactor.seconds() <= 66  # minimal_backoff 60, +-10%
    reactor.advance(30)
    assert not hop.pending and bad.queue_id in runner  # not retried early
    hop.raise_for.clear()
    reactor.advance(40)
    assert len(hop.pending) == 1
    hop.answer(0, 250)
    assert bad.queue_id not in runner


def one_message_attempted(tmp_path: Path) -> tuple[ThreadlessReactor, MemorySpool, QueueRunner, SlowHop,
                                                 list[dict[str, Any]], QueueEntry]:
    """A runner over a L{MemorySpool} whose one message (to a@x.test) waits for the hop's answer."""
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    e = commit(spool, "s@src.test", ("a@x.test",), reactor.seconds(), lambda: None)
    runner.enqueue(e)
    return reactor, spool, runner, hop, events, e


def test_a_removal_the_disk_refuses_is_tried_again_without_delivering_again(tmp_path: Path) -> None:
    """
    The last recipient is accepted but removing the message fails (a full
    disk: the window's journal or the unlink): the message stays known to
    the runner, its file stays queued, and once the disk has room it is
    removed at its next attempt, not delivered again. (Found by the power
    and disk-full soak: the runner forgot the message, whose file then sat
    in the queue until a restart would deliver it a second time.)
    """
    reactor, spool, runner, hop, events, e = one_message_attempted(tmp_path)
    spool.broken = "No space left on device"
    hop.answer(0, 250)
    assert e.queue_id in runner and spool.count() == 1
    assert [ev["event"] for ev in events if ev.get("queue_id") == e.queue_id] == ["sent"]
    reactor.advance(61)  # minimal_backoff 60: tried again, the disk still full
    assert e.queue_id in runner and spool.count() == 1 and not hop.pending
    spool.broken = None
    reactor.advance(61)
    assert e.queue_id not in runner and spool.count() == 0
    assert not hop.pending and hop.accepted[(e.queue_id, "a@x.test")] == 1
    assert [ev["event"] for ev in events if ev.get("queue_id") == e.queue_id] == ["sent"]


class SlowRecordSpool:
    """A spool wrapper whose state writes wait until the test releases them (a slow disk)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held: list[tuple[QueueEntry, Deferred[None]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def record(self, entry: QueueEntry) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.held.append((entry, d))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for entry, d in held:
            self.inner.record(entry).chainDeferred(d)


def test_a_deferral_whose_due_time_passes_while_it_is_written_is_tried_again(tmp_path: Path) -> None:
    """
    A deferral is written, then scheduled; when its due time has passed by
    the time the write is done (a short backoff behind a slow disk or a
    DSN), the message fires while its attempt is still being recorded. It
    must be tried again once that attempt is over: it used to be dropped
    from the timetable and stay deferred, never tried, until a restart
    (the lab soak with minimal_backoff = 1 found one).
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = SlowRecordSpool(MemorySpool(clock=reactor.seconds))
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    e = commit(spool.inner, "s@src.test", ("a@x.test",), reactor.seconds(), lambda: None)
    runner.enqueue(e)
    hop.answer(0, 451)
    assert len(spool.held) == 1  # the deferral is being written ...
    reactor.advance(120)  # ... past its due time (minimal_backoff 60, +-10%)
    assert not hop.pending
    spool.release()
    reactor.advance(0)
    assert len(hop.pending) == 1, "the message was not tried again"
    hop.answer(0, 250)
    spool.release()
    assert e.queue_id not in runner and hop.accepted[(e.queue_id, "a@x.test")] == 1


@pytest.mark.parametrize("how", ["refused", "admin bounce"])
def test_a_dsn_the_disk_refuses_is_owed_not_lost(tmp_path: Path, how: str) -> None:
    """
    A recipient bounces (the hop refuses it, or the admin bounces the
    message) while the disk is full, so its DSN cannot be queued: the
    message stays queued, deferred, owing the DSN. Attempted again while
    the disk is still full, its recipient is not tried again (it has
    bounced) and the DSN stays owed; once the disk has room, the next
    attempt queues the DSN and removes the message. (Found by the power
    and disk-full soak: the runner logged the DSN as not queued and then
    removed the message, so the sender never heard of the failure.)
    """
    reactor, spool, runner, hop, events, e = one_message_attempted(tmp_path)
    qid = e.queue_id
    spool.broken = "No space left on device"
    if how == "refused":
        hop.answer(0, 550)
    else:
        hop.answer(0, 451)
        done: list[Any] = []
        runner.bounce(qid).addBoth(done.append)
        assert done == [False]  # not recorded: the disk is full
    [owed] = [ev for ev in events if ev["event"] == "dsn_deferred"]
    assert (owed["queue_id"], owed["recipients"], owed["actions"]) == (qid, ["a@x.test"], ["failed"])
    assert qid in runner and spool.count() == 1 and runner.counts()["deferred"] == 1
    reactor.advance(61)  # minimal_backoff 60: tried again, the disk still full
    assert qid in runner and spool.count() == 1 and not hop.pending
    assert not [ev for ev in events if ev["event"] == "dsn"]
    spool.broken = None
    reactor.advance(61)
    assert qid not in runner
    [dsn] = [ev for ev in events if ev["event"] == "dsn"]
    assert (dsn["original_queue_id"], dsn["action"], dsn["recipient"]) == (qid, "failed", "s@src.test")
    # Only the DSN is queued (and on its way to the hop); the bounced recipient was tried once.
    assert [entry.queue_id for entry in spool.recover()] == [dsn["queue_id"]]
    assert [(entry.queue_id, [r.address for r in rcpts]) for _, entry, rcpts in hop.pending] == [
        (dsn["queue_id"], ["s@src.test"])]


def test_an_owed_dsn_is_recorded_and_queued_after_a_restart(tmp_path: Path) -> None:
    """
    The DSN cannot be queued but the state can be recorded: the state
    file says which notice is owed, and a node restarted from it queues
    that DSN (the report the failure gave: status, diagnostic, Remote-MTA)
    and removes the message, without delivering anything again.
    """
    reactor, spool, runner, hop, events, e = one_message_attempted(tmp_path)
    qid = e.queue_id

    def full(notice: Any) -> Deferred[None]:
        return fail(SpoolFull("No space left on device"))

    runner._send_dsn = full  # type: ignore[method-assign]
    hop.answer(0, 550)
    assert qid in runner and not [ev for ev in events if ev["event"] == "dsn"]
    [recovered] = spool.recover()
    assert recovered.state.owed_notices == {"a@x.test": {
        "action": "failed", "status": "5.1.1", "original_recipient": None, "remote_mta": "hop",
        "diagnostic": "550 5.1.1 hop says so", "last_attempt": EPOCH,
    }}
    assert recovered.state.next_attempt == EPOCH + 60
    runner.stop()  # the node stops; another starts from the spool
    restarted, hop2, events2 = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    restarted.load([recovered])
    reactor.advance(61)
    assert qid not in restarted
    [dsn] = [ev for ev in events2 if ev["event"] == "dsn"]
    assert (dsn["original_queue_id"], dsn["action"]) == (qid, "failed")
    assert [entry.queue_id for entry in spool.recover()] == [dsn["queue_id"]]
    [(_, message, _)] = hop2.pending
    with message.open_message() as f:
        text = f.read()
    assert b"Diagnostic-Code: smtp; 550 5.1.1 hop says so" in text and b"Remote-MTA: dns; hop" in text
    assert not hop.pending and [ev["event"] for ev in events].count("dsn_deferred") == 1


def test_a_delete_the_disk_refuses_leaves_the_message_queued(tmp_path: Path) -> None:
    """A delete whose removal fails answers C{False} and the message stays listed, as on disk."""
    reactor, spool, runner, hop, events, e = one_message_attempted(tmp_path)
    hop.answer(0, 451)
    spool.broken = "No space left on device"
    result: list[Any] = []
    runner.delete(e.queue_id).addBoth(result.append)
    assert result == [False]
    assert e.queue_id in runner and spool.count() == 1
    spool.broken = None
    runner.delete(e.queue_id).addBoth(result.append)
    assert result == [False, True] and e.queue_id not in runner and spool.count() == 0


@pytest.mark.parametrize("verb", ["bounce", "delete"])
def test_bounce_or_delete_during_an_attempt_waits_for_it(tmp_path: Path, verb: str) -> None:
    """
    Bounce and delete during an attempt are applied when its outcomes are
    recorded, to the recipients still pending: a recipient the hop accepted
    is not bounced.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    e = commit(spool, "s@localhost", ("a@x.test",), reactor.seconds(), lambda: None)
    runner.enqueue(e)
    result: list[Any] = []
    getattr(runner, verb)(e.queue_id).addBoth(result.append)
    assert result == []  # waits for the attempt
    hop.answer(0, 250)
    assert result == [False]  # nothing left to bounce or delete: it was delivered
    assert [ev["event"] for ev in events if ev.get("queue_id") == e.queue_id] == ["sent"]


# -- recording later what a crash could not duplicate ---------------------------------

ONE_SLOT = ROUTE + "concurrency = 1\n"


def two_messages_one_slot(tmp_path: Path) -> tuple[ThreadlessReactor, MemorySpool, QueueRunner, SlowHop,
                                                  list[dict[str, Any]], QueueEntry, QueueEntry]:
    """A runner with one attempt slot and two messages: the first is being attempted, the second waits."""
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True), ONE_SLOT)
    first = commit(spool, "s@src.test", ("a@x.test",), reactor.seconds(), lambda: None)
    second = commit(spool, "s@src.test", ("b@x.test",), reactor.seconds(), lambda: None)
    runner.enqueue(first)
    runner.enqueue(second)
    reactor.advance(0)
    assert [entry.queue_id for _, entry, _ in hop.pending] == [first.queue_id]
    return reactor, spool, runner, hop, events, first, second


def test_recovered_messages_are_scheduled_as_loaded_in_due_time_order(tmp_path: Path) -> None:
    """
    A batch the recovery hands over after the start (C{load}) is scheduled
    at once, each message by its state: the due ones are attempted from the
    next reactor turn on (not inside C{load}, which returns so that the next
    batch is read), and every message in due-time order, not in the order
    found.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True), ONE_SLOT)
    found = [commit(spool, "s@src.test", (f"{name}@x.test",), reactor.seconds(), lambda: None)
             for name in ("in30", "in10", "now")]
    found[0].state.next_attempt = EPOCH + 30
    found[1].state.next_attempt = EPOCH + 10
    runner.load(found)
    assert hop.pending == [] and all(e.queue_id in runner for e in found)
    attempted: list[str] = []
    for step in (0, 10, 20):
        reactor.advance(step)
        [(_, entry, rcpts)] = hop.pending
        attempted.append(rcpts[0].address)
        hop.answer(0, 250)
    assert attempted == ["now@x.test", "in10@x.test", "in30@x.test"]
    reactor.advance(0)
    assert not any(e.queue_id in runner for e in found)


def test_new_mail_takes_turns_with_a_recovered_backlog(tmp_path: Path) -> None:
    """
    Mail accepted while a recovered backlog is due does not wait behind the
    whole backlog: the free slot goes to new mail and old mail in turn, new
    mail first (as Postfix's queue manager feeds its incoming and deferred
    queues in turn); each keeps its own order.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True), ONE_SLOT)
    backlog = [commit(spool, "s@src.test", (f"old{i}@x.test",), reactor.seconds(), lambda: None) for i in range(4)]
    runner.load(backlog)
    reactor.advance(0)
    reactor.advance(1)
    for name in ("new0", "new1"):
        runner.enqueue(commit(spool, "s@src.test", (f"{name}@x.test",), reactor.seconds(), lambda: None))
    attempted: list[str] = []
    for _ in range(6):
        [(_, entry, rcpts)] = hop.pending
        attempted.append(rcpts[0].address.split("@")[0])
        hop.answer(0, 250)
        reactor.advance(0)
    assert attempted == ["old0", "new0", "old1", "new1", "old2", "old3"]
    assert hop.pending == [] and len(sent(events)) == 6


def test_a_paced_runner_starts_so_many_attempts_a_second(tmp_path: Path) -> None:
    """
    Paced (as while a node recovers its queue), the runner starts at most
    its rate of attempts a second, a tick's worth at a time, in due-time
    order, free slots or not; unpaced again, the rest start at once.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    runner.pace(2 / PACE_TICK)  # two a tick
    found = [commit(spool, "s@src.test", (f"m{i}@x.test",), reactor.seconds(), lambda: None) for i in range(5)]
    runner.load(found)
    reactor.advance(0)
    assert len(hop.pending) == 2
    reactor.advance(PACE_TICK / 2)
    assert len(hop.pending) == 2  # nothing saved up, nothing before the tick
    reactor.advance(PACE_TICK / 2)
    assert len(hop.pending) == 4
    runner.pace(None)
    assert [rcpts[0].address for _, _, rcpts in hop.pending] == [f"m{i}@x.test" for i in range(5)]
    runner.stop()
    assert not reactor.getDelayedCalls()


def sent(events: list[dict[str, Any]]) -> list[str]:
    return [ev["queue_id"] for ev in events if ev["event"] == "sent"]


def test_a_named_transfer_is_recorded_later_its_slot_given_back_at_once(tmp_path: Path) -> None:
    """
    The next hop accepted a named transfer (it recognises it if it is sent
    again): the slot goes to the next message at once, and the outcome is
    recorded (the removal, the C{sent} event) C{SETTLE_DELAY} later, with the
    other outcomes of that time. Meanwhile the message is still queued, and
    a delete asked then waits for the recording.
    """
    reactor, spool, runner, hop, events, first, second = two_messages_one_slot(tmp_path)
    hop.answer(0, 250, named=True)
    reactor.advance(0)
    assert [entry.queue_id for _, entry, _ in hop.pending] == [second.queue_id]  # the slot is free
    assert first.queue_id in runner and spool.count() == 2 and sent(events) == []
    deleted: list[Any] = []
    runner.delete(first.queue_id).addBoth(deleted.append)
    hop.answer(0, 250, named=True)
    reactor.advance(SETTLE_DELAY / 2)
    assert deleted == [] and spool.count() == 2 and sent(events) == []
    reactor.advance(SETTLE_DELAY / 2)
    # Both recorded together; the delete found the message delivered.
    assert deleted == [False] and spool.count() == 0
    assert sent(events) == [first.queue_id, second.queue_id]
    # Their delay ends at the hop's answer (both came at the arrival time), not at the recording.
    assert [ev["delay"] for ev in events if ev["event"] == "sent"] == [0.0, 0.0]
    assert first.queue_id not in runner and second.queue_id not in runner


def test_an_outcome_a_crash_could_duplicate_is_recorded_at_once(tmp_path: Path) -> None:
    """
    A next hop that does not remember transfers by name (not relaynet: it
    would take a message sent again as a new one), and a refusal: recorded
    in the same turn as the answer, as before.
    """
    reactor, spool, runner, hop, events, first, second = two_messages_one_slot(tmp_path)
    hop.answer(0, 250)
    assert first.queue_id not in runner and spool.count() == 1 and sent(events) == [first.queue_id]
    reactor.advance(0)
    hop.answer(0, 550, named=True)  # named, but refused: a bounce, never delayed
    assert second.queue_id not in runner
    assert [ev["event"] for ev in events if ev.get("queue_id") == second.queue_id][:1] == ["bounced"]


def test_stop_records_waiting_outcomes_at_once(tmp_path: Path) -> None:
    """A node that stops records what waits to be recorded before it is done (no clock moves)."""
    reactor, spool, runner, hop, events, first, second = two_messages_one_slot(tmp_path)
    hop.answer(0, 250, named=True)
    reactor.advance(0)
    stopped: list[Any] = []
    runner.stop().addBoth(stopped.append)
    assert first.queue_id not in runner and sent(events) == [first.queue_id]
    assert stopped == []  # the second message's attempt is still running
    hop.answer(0, 451)
    assert stopped == [None]
    assert [e.queue_id for e in spool.recover()] == [second.queue_id]


def test_cut_through_replies_without_waiting_for_the_delay(tmp_path: Path) -> None:
    """With C{ack = "cut-through"} the client waits for the outcome: it is recorded at once."""
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    spool = MemorySpool(clock=reactor.seconds)
    runner, hop, events = make_runner(tmp_path, spool, reactor, ManualThreadPool(immediate=True))
    e = commit(spool, "s@src.test", ("a@x.test",), reactor.seconds(), lambda: None)
    replies: list[Any] = []
    runner.cut_through(e).addBoth(replies.append)
    hop.answer(0, 250, named=True)
    assert [r[0] for r in replies] == [250] and spool.count() == 0 and sent(events) == [e.queue_id]


# -- the same race through a real node's admin API -----------------------------------


@pytest.mark.slow
def test_admin_bursts_against_messages_in_flight_real_node(tmp_path: Path) -> None:
    """
    A real node relays 40 messages to a next hop that takes a second per
    DATA (Postfix's smtp-sink -w 1) while the test sends bursts of six
    concurrent hold and release calls on one message through the admin
    API: no call fails (the runner before the queue core answered HTTP 500
    to many: two writers renamed one tmp/ID.state), every state file on
    disk parses whenever it is read, and once everything is released each
    message reaches the next hop exactly once.
    """
    import smtplib
    from concurrent.futures import ThreadPoolExecutor

    from harness.nodeproc import HOST, NodeProcess, wait_for
    from harness.peers import SMTP_SINK, SmtpSink, allow_postfix_search, missing_binaries
    from relaynet.admin.queuecli import AdminClient, AdminError

    if missing_binaries([SMTP_SINK]):
        pytest.skip("smtp-sink (Debian's postfix) is not installed")
    rng = random.Random(646)
    with SmtpSink(allow_postfix_search(tmp_path) / "sink", extra_args=("-w", "1")) as sink:
        route = f"""
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{sink.port}"]

[queue]
minimal_backoff = 1
maximal_backoff = 2

[outbound]
# DATA, which the sink answers after a second (-w 1): the messages are
# still in flight while the admin bursts run (a BDAT pipelined with MAIL
# and RCPT is not delayed, and would relay them before they are listed).
chunking = false
"""
        with NodeProcess(tmp_path / "node", extra_toml=route, name="burst") as node:
            with smtplib.SMTP(HOST, node.port, timeout=30) as s:
                for i in range(40):
                    refused = s.sendmail("s@src.test", [f"r{i}@remote.test"],
                                         f"Subject: burst {i}\r\n\r\nhello\r\n")
                    assert not refused
            client = AdminClient(node.config.admin_endpoint)
            listed = [m["queue_id"] for m in client.request("GET", "/api/queue")["messages"]]
            failures: list[tuple[str, int, str]] = []
            torn = 0

            def call(qid: str, verb: str) -> None:
                try:
                    AdminClient(node.config.admin_endpoint).request("POST", f"/api/queue/{qid}/{verb}")
                except AdminError as e:
                    if e.status != 404:  # delivered meanwhile: fine
                        failures.append((verb, e.status, e.message))

            # Bursts: six calls on one message at once, as several admins
            # (or a script in a loop) would make them.
            with ThreadPoolExecutor(max_workers=6) as burst:
                for _ in range(60):
                    qid = rng.choice(listed)
                    list(burst.map(call, [qid] * 6, ["hold", "release"] * 3))
                    for p in list((node.queue / "state").iterdir()):
                        try:
                            data = p.read_bytes()
                        except FileNotFoundError:
                            continue
                        try:
                            json.loads(data)
                        except ValueError:
                            torn += 1
            for qid in listed:
                try:
                    client.request("POST", f"/api/queue/{qid}/release")
                except AdminError as e:
                    assert e.status == 404, e
            assert failures == [], failures[:5]
            assert torn == 0

            def outcomes() -> tuple[list[str], list[str]]:
                events = node.events()
                return (sorted(e["queue_id"] for e in events if e["event"] == "sent"),
                        sorted(e["queue_id"] for e in events if e["event"] == "received"))

            # Wait on the events themselves: a message leaves queue/new (an
            # unlink in a worker thread) before its "sent" event is written
            # at the end of a later reactor turn; waiting on an empty
            # queue/new saw 4 "sent" events still to come in one
            # fresh-clone CI run.
            def relayed() -> bool:
                sent, received = outcomes()
                return sink.received() >= 40 and len(received) == 40 and set(sent) >= set(received)

            wait_for(relayed, 120.0, "every message relayed")
            assert not list(node.queue.glob("new/*"))
            # Exactly once each, every message received (a message the
            # node relayed before the listing was taken is not among
            # listed: seen once in a fresh-clone CI run).
            sent, received = outcomes()
            assert len(received) == 40 and sent == received
            assert set(listed) <= set(sent)
            assert sink.received() == 40
