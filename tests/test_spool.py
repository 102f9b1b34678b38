"""
Tests for L{relaynet.queue.spool.Spool} (the Maildir spool) and
L{relaynet.testing.spool.MemorySpool}.

L{_SpoolContractMixin} is the contract both keep (commit, recover, record,
remove, abort, queue ids, crash and restart); it runs against the Maildir
spool on a temporary directory, whose thread pool is a L{ManualThreadPool}
run by the test, and against the memory spool in both of its modes. The
Maildir spool's own tests (file layout, fsync order, C{tmp/} cleanup, corrupt
files, group commit) follow, then the memory spool's.

Nothing here uses the global reactor or waits for time to pass; the one test
with real threads (group commit) waits on events, with timeouts.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import relaynet.queue.spool as spool_module
from relaynet.queue.spool import (
    DUE_HINT_LIMIT,
    HEADER_LEN,
    BoundedReader,
    Envelope,
    GroupSync,
    QueueEntry,
    QueueState,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    SpoolWriter,
    read_queue_file,
)
from relaynet.testing import EPOCH, ManualThreadPool, MemorySpool, ThreadlessReactor
from relaynet.testing.spool import MemoryQueueEntry

AnySpool = Union[Spool, MemorySpool]

if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object

MESSAGE = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\nSubject: s\r\n\r\nbody\r\n"


def envelope(spool: AnySpool, *rcpts: str, **params: Any) -> Envelope:
    """An envelope with a fresh queue id of C{spool}, for C{rcpts}."""
    return Envelope(
        queue_id=spool.new_id(),
        sender="sender@example.org",
        recipients=tuple(Recipient(r, route="relay:0") for r in (rcpts or ("a@localhost",))),
        arrival=EPOCH,
        params={"body": "8BITMIME", "size": 1234, **params},
        client={"ip": "127.0.0.1", "helo": "client.test", "protocol": "ESMTP"},
        node="n1",
    )


def read_all(entry: QueueEntry, skip: int = 0) -> bytes:
    """The message of C{entry}, from C{skip} on."""
    with entry.open_message(skip) as f:
        return f.read()


class _SpoolContractMixin(_Base):
    """
    What every spool promises. A subclass provides L{make_spool}, L{settle}
    and L{crash_and_restart}, and says with L{completes_at_once} whether
    operations complete before the call returns.

    @ivar now: the time the spool's clock returns.
    """

    completes_at_once = False

    spool: AnySpool
    now: float

    def make_spool(self) -> AnySpool:
        """A new, prepared spool over this test's storage, with clock C{self.now}."""
        raise NotImplementedError()

    def settle(self) -> None:
        """Complete every operation the spool has started."""
        raise NotImplementedError()

    def crash_and_restart(self) -> AnySpool:
        """
        Lose what a crash loses (operations not completed, messages not
        committed), then start a new spool over the same storage, prepared.
        """
        raise NotImplementedError()

    def setUp(self) -> None:
        self.now = EPOCH
        self.spool = self.make_spool()

    def clock(self) -> float:
        return self.now

    def needs_deferred_completion(self) -> None:
        if self.completes_at_once:
            raise SkipTest("this spool completes every operation at once")

    def commit(self, *rcpts: str, message: bytes = MESSAGE, hops: int = 1) -> QueueEntry:
        """Commit C{message} for C{rcpts} and settle."""
        writer = self.spool.begin(envelope(self.spool, *rcpts))
        writer.write(message)
        d = writer.commit(hops)
        self.settle()
        return self.successResultOf(d)

    def recovered(self, spool: AnySpool | None = None) -> list[QueueEntry]:
        return list((spool or self.spool).recover())

    # -- commit and recover --------------------------------------------------

    def test_commit_then_recover(self) -> None:
        """
        A committed message is recovered, after a restart too, with its
        envelope (size and hop count filled in), its bytes, and no state.
        """
        env = envelope(self.spool, "a@localhost", "b@example.net")
        writer = self.spool.begin(env)
        writer.write(MESSAGE[:10])
        writer.write(MESSAGE[10:])
        self.assertEqual(writer.size, len(MESSAGE))
        d = writer.commit(hops=3)
        self.settle()
        entry = self.successResultOf(d)
        self.assertEqual(entry.queue_id, env.queue_id)
        self.assertEqual((entry.envelope.size, entry.envelope.hops), (len(MESSAGE), 3))
        self.assertEqual(entry.state, QueueState())
        for spool in (self.spool, self.crash_and_restart()):
            [got] = self.recovered(spool)
            self.assertEqual(got.envelope, entry.envelope)
            self.assertEqual(got.envelope.params, {"body": "8BITMIME", "size": 1234})
            self.assertEqual(read_all(got), MESSAGE)
            self.assertEqual(got.state, QueueState())
            self.assertEqual(
                [r.address for r in got.pending_recipients()], ["a@localhost", "b@example.net"]
            )

    def test_recovered_envelope_as_json_keeps_it(self) -> None:
        """
        A recovered envelope is what its JSON keeps: MAIL parameters set to
        C{None} are left out and lists come back as tuples.
        """
        writer = self.spool.begin(envelope(self.spool, ret=None, notify=["SUCCESS", "FAILURE"]))
        writer.write(MESSAGE)
        writer.commit(1)
        self.settle()
        [got] = self.recovered()
        self.assertEqual(
            got.envelope.params, {"body": "8BITMIME", "size": 1234, "notify": ("SUCCESS", "FAILURE")}
        )

    def test_envelope_must_serialise(self) -> None:
        """An envelope that does not serialise to JSON is refused when the message begins."""
        with self.assertRaises(TypeError):
            self.spool.begin(envelope(self.spool, odd=object()))

    def test_open_message(self) -> None:
        """
        C{open_message(skip)} reads the stored message from C{skip} on,
        bounded to its size, both from the committed entry and a recovered one.
        """
        entry = self.commit()
        [recovered] = self.recovered()
        for e in (entry, recovered):
            self.assertEqual(read_all(e), MESSAGE)
            self.assertEqual(read_all(e, skip=5), MESSAGE[5:])
            with e.open_message(2) as f:
                self.assertEqual(f.remaining, len(MESSAGE) - 2)
                self.assertEqual(f.read(3), MESSAGE[2:5])
                self.assertEqual(f.remaining, len(MESSAGE) - 5)

    def test_large_message(self) -> None:
        """A message larger than the writer's flush threshold is kept byte for byte."""
        writer = self.spool.begin(envelope(self.spool))
        line = b"y" * 78 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (3 * writer.FLUSH_AT // len(line))
        for i in range(0, len(body), 65536):
            writer.write(body[i : i + 65536])
        d = writer.commit(hops=1)
        self.settle()
        self.assertEqual(self.successResultOf(d).envelope.size, len(body))
        [got] = self.recovered(self.crash_and_restart())
        self.assertEqual(read_all(got), body)

    def test_empty_message(self) -> None:
        """A message of no bytes commits and recovers as one."""
        entry = self.commit(message=b"")
        self.assertEqual(entry.envelope.size, 0)
        [got] = self.recovered(self.crash_and_restart())
        self.assertEqual(read_all(got), b"")

    def test_several_messages(self) -> None:
        """
        Several messages are recovered in queue id (arrival) order, each with
        its own bytes; removing one leaves the others.
        """
        entries = []
        for i in range(5):
            entries.append(self.commit(f"r{i}@localhost", message=b"Subject: %d\r\n\r\n" % i))
            self.now += 0.25
        got = self.recovered(self.crash_and_restart())
        self.assertEqual([e.queue_id for e in got], [e.queue_id for e in entries])
        self.assertEqual([read_all(e) for e in got], [b"Subject: %d\r\n\r\n" % i for i in range(5)])
        self.assertEqual(self.spool.count(), 5)
        d = self.spool.remove(got[2])
        self.settle()
        self.successResultOf(d)
        self.assertEqual(
            [e.queue_id for e in self.recovered()], [entries[i].queue_id for i in (0, 1, 3, 4)]
        )
        self.assertEqual(self.spool.count(), 4)

    def test_commit_fires_only_when_durable(self) -> None:
        """
        A commit's Deferred fires only once the message is durable: a crash
        before that loses the message, which was never acknowledged.
        """
        self.needs_deferred_completion()
        writer = self.spool.begin(envelope(self.spool))
        writer.write(MESSAGE)
        d = writer.commit(hops=1)
        self.assertNoResult(d)
        self.assertEqual(self.recovered(self.crash_and_restart()), [])
        self.assertEqual(self.spool.count(), 0)

    def test_uncommitted_message_is_lost_on_restart(self) -> None:
        """A message begun but not committed is gone after a restart; committed ones stay."""
        kept = self.commit()
        writer = self.spool.begin(envelope(self.spool))
        writer.write(b"x" * (writer.FLUSH_AT + 10))
        self.settle()
        spool = self.crash_and_restart()
        self.assertEqual([e.queue_id for e in self.recovered(spool)], [kept.queue_id])
        self.assertEqual(spool.count(), 1)

    # -- writers -------------------------------------------------------------

    def test_abort_leaves_nothing(self) -> None:
        """An aborted message is not recovered, counted or committable."""
        writer = self.spool.begin(envelope(self.spool))
        writer.write(b"x" * (writer.FLUSH_AT + 10))
        self.settle()
        writer.abort()
        self.settle()
        self.failureResultOf(writer.commit(1), SpoolError)
        self.assertEqual((self.recovered(), self.spool.count()), ([], 0))
        self.assertEqual(self.recovered(self.crash_and_restart()), [])

    def test_writer_is_finished_by_commit(self) -> None:
        """After a commit, writing or committing again is a L{SpoolError}; an abort changes nothing."""
        writer = self.spool.begin(envelope(self.spool))
        writer.write(MESSAGE)
        d = writer.commit(1)
        with self.assertRaises(SpoolError):
            writer.write(b"more")
        self.failureResultOf(writer.commit(1), SpoolError)
        writer.abort()
        self.settle()
        self.successResultOf(d)
        [got] = self.recovered()
        self.assertEqual(read_all(got), MESSAGE)

    # -- state ---------------------------------------------------------------

    def test_record_then_recover(self) -> None:
        """
        A recorded state is recovered with the message: per-recipient
        outcomes, next attempt, held and delay-warned flags, the notices
        the message owes.
        """
        entry = self.commit("a@localhost", "b@localhost", "c@localhost")
        self.assertFalse(entry.state_written)
        entry.state = QueueState(
            recipients={
                "a@localhost": RecipientState(status="delivered", attempts=1, last_attempt=EPOCH + 1),
                "b@localhost": RecipientState(
                    status="deferred", attempts=2, last_attempt=EPOCH + 2, dsn="4.2.0",
                    diagnostic="mailbox full", remote="mx.test[192.0.2.1]",
                ),
            },
            next_attempt=EPOCH + 600.5,
            held=True,
            delay_warned=True,
            owed_notices={"a@localhost": {
                "action": "delivered", "status": "2.0.0", "original_recipient": "rfc822;a@localhost",
                "remote_mta": None, "diagnostic": "delivered to maildir", "last_attempt": EPOCH + 1,
            }},
        )
        d = self.spool.record(entry)
        self.assertTrue(entry.state_written)
        self.settle()
        self.successResultOf(d)
        for spool in (self.spool, self.crash_and_restart()):
            [got] = self.recovered(spool)
            self.assertEqual(got.state, entry.state)
            self.assertTrue(got.state_written)
            self.assertEqual([r.address for r in got.pending_recipients()], ["b@localhost", "c@localhost"])

    def test_record_takes_the_state_of_the_call(self) -> None:
        """
        C{record} keeps the state as it is when called, as a file written
        then would: a later change, not recorded, is not recovered.
        """
        entry = self.commit()
        entry.state.recipients["a@localhost"] = RecipientState(status="deferred", attempts=1)
        d = self.spool.record(entry)
        entry.state.recipients["a@localhost"].attempts = 7
        entry.state.held = True
        self.settle()
        self.successResultOf(d)
        [got] = self.recovered(self.crash_and_restart())
        self.assertEqual(got.state, QueueState(recipients={"a@localhost": RecipientState("deferred", 1)}))

    def test_recorded_twice_keeps_the_last(self) -> None:
        """Recording again replaces the recorded state."""
        entry = self.commit()
        entry.state.recipients["a@localhost"] = RecipientState(status="deferred", attempts=1)
        self.spool.record(entry)
        entry.state.recipients["a@localhost"] = RecipientState(status="deferred", attempts=2)
        entry.state.next_attempt = EPOCH + 60
        self.spool.record(entry)
        self.settle()
        [got] = self.recovered(self.crash_and_restart())
        self.assertEqual(got.state.recipients["a@localhost"].attempts, 2)
        self.assertEqual(got.state.next_attempt, EPOCH + 60)

    def test_record_not_completed_is_lost_in_a_crash(self) -> None:
        """A crash before a record completes leaves the state recorded before it."""
        self.needs_deferred_completion()
        entry = self.commit()
        entry.state.recipients["a@localhost"] = RecipientState(status="deferred", attempts=1)
        self.spool.record(entry)
        self.settle()
        entry.state.recipients["a@localhost"] = RecipientState(status="delivered", attempts=2)
        d = self.spool.record(entry)
        self.assertNoResult(d)
        [got] = self.recovered(self.crash_and_restart())
        self.assertEqual(got.state.recipients["a@localhost"], RecipientState("deferred", 1))

    def test_recovered_entries_are_copies(self) -> None:
        """Changing a recovered entry changes nothing stored until it is recorded."""
        self.commit()
        [got] = self.recovered()
        got.state.held = True
        got.state.recipients["a@localhost"] = RecipientState(status="delivered")
        [again] = self.recovered()
        self.assertEqual(again.state, QueueState())

    # -- due-time hints ------------------------------------------------------

    def hinted(self, hint: float, state: QueueState | None = None) -> QueueState:
        """The state recovered after a restart for a message given C{state} (recorded) and C{hint}."""
        entry = self.commit("a@localhost")
        if state is not None:
            entry.state = state
            d = self.spool.record(entry)
            self.settle()
            self.successResultOf(d)
        self.spool.hint_due(entry, hint)
        written = self.spool.flush_hints()
        self.settle()
        self.successResultOf(written)
        [got] = [e for e in self.recovered(self.crash_and_restart()) if e.queue_id == entry.queue_id]
        return got.state

    def test_a_due_hint_delays_a_recovered_message(self) -> None:
        """
        A due-time hint (a deferral not worth a state write: a next hop
        known down) is the recovered message's next attempt when nothing
        recorded makes it due later; the recorded state is not rewritten.
        """
        got = self.hinted(EPOCH + 600)
        self.assertEqual(got.next_attempt, EPOCH + 600)
        self.assertEqual(got.recipients, {})
        later = self.hinted(EPOCH + 600, QueueState(next_attempt=EPOCH + 900))
        self.assertEqual(later.next_attempt, EPOCH + 900)

    def test_a_due_hint_never_makes_a_message_due_sooner_nor_releases_it(self) -> None:
        """
        A hint already passed, or further ahead than L{DUE_HINT_LIMIT} (a
        clock set back), is ignored; a held message stays held.
        """
        self.assertIsNone(self.hinted(EPOCH - 5).next_attempt)
        self.assertIsNone(self.hinted(EPOCH + DUE_HINT_LIMIT + 1).next_attempt)
        held = self.hinted(EPOCH + 600, QueueState(held=True))
        self.assertTrue(held.held)
        self.assertIsNone(held.next_attempt)

    # -- remove --------------------------------------------------------------

    def test_remove_then_recover(self) -> None:
        """A removed message, recorded or not, is no longer recovered or counted."""
        first = self.commit()
        second = self.commit()
        second.state.recipients["a@localhost"] = RecipientState(status="delivered", attempts=1)
        self.spool.record(second)
        self.settle()
        d1, d2 = self.spool.remove(first), self.spool.remove(second)
        self.settle()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual((self.recovered(), self.spool.count()), ([], 0))
        self.assertEqual(self.recovered(self.crash_and_restart()), [])

    def test_count(self) -> None:
        """C{count} is the number of committed messages not removed."""
        self.assertEqual(self.spool.count(), 0)
        entries = [self.commit() for _ in range(3)]
        self.assertEqual(self.spool.count(), 3)
        self.spool.remove(entries[0])
        self.settle()
        self.assertEqual(self.spool.count(), 2)

    # -- queue ids and commit statistics ------------------------------------

    def test_ids_unique_and_ordered(self) -> None:
        """
        Queue ids made as the clock advances are unique, alphanumeric (safe
        as file names) and sort in the order they were made.
        """
        ids = []
        for _ in range(3000):
            ids.append(self.spool.new_id())
            self.now += 0.00001
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)
        self.assertTrue(all(i.isalnum() for i in ids))

    def test_ids_unique_several_per_tick(self) -> None:
        """Several ids made in one tick of the clock are all different."""
        ids = []
        for i in range(3000):
            ids.append(self.spool.new_id())
            if i % 7 == 6:
                self.now += 0.00001
        self.assertEqual(len(set(ids)), len(ids))

    def test_ids_unique_when_the_clock_stands_still(self) -> None:
        """
        More than a thousand ids made at one instant (a fake clock that
        stands still) are all different, and ordered.
        """
        ids = [self.spool.new_id() for _ in range(2500)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)

    def test_commit_observers(self) -> None:
        """
        Observers of group commits see batches that add up to the messages
        committed, and the statistics count them.
        """
        batches: list[int] = []
        self.spool.observe_commits(batches.append)
        flushes0, synced0 = self.spool.group_commit_stats
        for _ in range(3):
            self.commit()
        flushes, synced = self.spool.group_commit_stats
        self.assertEqual((sum(batches), synced - synced0), (3, 3))
        self.assertEqual(flushes - flushes0, len(batches))


# -- the Maildir spool ----------------------------------------------------------


class MaildirSpoolContractTests(_SpoolContractMixin, SynchronousTestCase):
    """The contract, kept by the Maildir spool on a temporary directory."""

    def make_spool(self) -> Spool:
        tmp = tempfile.mkdtemp(prefix="relaynet-spool-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.root = Path(tmp) / "queue"
        return self._open()

    def _open(self) -> Spool:
        self.reactor = ThreadlessReactor()
        self.pool = ManualThreadPool()
        spool = Spool(self.root, self.reactor, self.pool, clock=self.clock)  # type: ignore[arg-type]
        spool.prepare()
        return spool

    def settle(self) -> None:
        self.pool.run_all()

    def crash_and_restart(self) -> Spool:
        # The old pool's queued jobs are never run: the process died.
        self.spool = self._open()
        return self.spool


class MaildirSpoolTests(SynchronousTestCase):
    """What only the Maildir spool does: files, fsyncs, recovery from a crash's debris."""

    def setUp(self) -> None:
        tmp = tempfile.mkdtemp(prefix="relaynet-spool-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.root = Path(tmp) / "queue"
        self.reactor = ThreadlessReactor()
        self.pool = ManualThreadPool()
        self.spool = Spool(self.root, self.reactor, self.pool, clock=lambda: EPOCH)  # type: ignore[arg-type]
        self.spool.prepare()

    def ls(self, directory: str) -> list[str]:
        return sorted(os.listdir(self.root / directory))

    def commit(self, *rcpts: str) -> QueueEntry:
        writer = self.spool.begin(envelope(self.spool, *rcpts))
        writer.write(b"Subject: s\r\n\r\nbody\r\n")
        d = writer.commit(hops=1)
        self.pool.run_all()
        return self.successResultOf(d)

    def test_queued_messages_of_one_client_share_its_mapping(self) -> None:
        """
        Messages from one client, each on a connection of its own (another
        port), keep one C{client} mapping between them in memory, as
        committed and as recovered; each still shows its own port (in
        C{client}, in the queue file and in its JSON), and its queue id is
        not made an interned string by the paths of its files.
        """
        entries = []
        for port in (40001, 40002):
            env = evolve(envelope(self.spool, "a@localhost"),
                         client={"ip": "127.0.0.1", "port": port, "helo": "c.test", "protocol": "ESMTP"})
            writer = self.spool.begin(env)
            writer.write(b"Subject: s\r\n\r\nbody\r\n")
            d = writer.commit(hops=1)
            self.pool.run_all()
            entry = self.successResultOf(d)
            self.spool.record(entry)
            self.pool.run_all()
            entries.append(entry)
        recovered = list(self.spool.recover())
        for a, b in (entries, recovered):
            self.assertIs(a.envelope._client, b.envelope._client)
            self.assertEqual([a.envelope.client["port"], b.envelope.client["port"]], [40001, 40002])
            self.assertEqual(a.envelope.to_json()["client"]["port"], 40001)
        self.assertEqual(read_queue_file(Path(entries[1].path))[0].client["port"], 40002)
        for entry in entries + recovered:
            qid = entry.queue_id
            self.assertIsNot(sys.intern("".join(qid)), qid)

    def test_fresh_message_bytes_kept_for_the_first_attempt(self) -> None:
        """
        A message committed whole from memory keeps its bytes with its entry
        (its first attempt sends them without reading the file on the
        reactor), within L{Spool.FRESH_BUDGET}: reading it gives what the
        file holds, with no file opened; C{drop_fresh} and C{remove} let go.
        A message that does not fit the budget, or streamed out in chunks,
        is read from its file.
        """
        body = b"Subject: s\r\n\r\nbody\r\n"
        entry = self.commit("a@localhost")
        self.assertEqual(entry.fresh, body)
        self.assertEqual(self.spool.fresh_bytes, len(body))
        os.rename(entry.path, str(entry.path) + ".aside")  # not read while fresh
        self.assertEqual(read_all(entry), body)
        self.assertEqual(read_all(entry, skip=9), body[9:])
        os.rename(str(entry.path) + ".aside", entry.path)
        self.spool.drop_fresh(entry)
        self.assertIsNone(entry.fresh)
        self.assertEqual(self.spool.fresh_bytes, 0)
        self.assertEqual(read_all(entry), body)

        self.spool.FRESH_BUDGET = len(body) + 1
        first, second = self.commit("a@localhost"), self.commit("b@localhost")
        self.assertEqual((first.fresh, second.fresh), (body, None))
        self.spool.remove(first)
        self.assertEqual(self.spool.fresh_bytes, 0)

        self.spool.FRESH_BUDGET = 10 * SpoolWriter.FLUSH_AT
        big = b"x" * (SpoolWriter.FLUSH_AT + 10)
        writer = self.spool.begin(envelope(self.spool, "c@localhost"))
        writer.write(big)
        d = writer.commit(hops=1)
        self.pool.run_all()
        streamed = self.successResultOf(d)
        self.assertIsNone(streamed.fresh)
        self.assertEqual(read_all(streamed), big)

    def test_directories(self) -> None:
        """C{prepare} creates C{tmp/}, C{new/} and C{state/}, mode 0700."""
        for d in ("", "tmp", "new", "state"):
            self.assertEqual(os.stat(self.root / d).st_mode & 0o777, 0o700)

    def test_commit_layout(self) -> None:
        """
        A committed message is one file in C{new/}, mode 0600: a fixed header
        record with the final size and hop count, the JSON envelope, then the
        bytes.
        """
        env = envelope(self.spool, "a@localhost", "b@localhost")
        w = self.spool.begin(env)
        w.write(b"Received: x\r\n")
        w.write(b"Subject: s\r\n\r\nbody\r\n")
        d = w.commit(hops=2)
        self.pool.run_all()
        entry = self.successResultOf(d)
        self.assertEqual(self.ls("tmp"), [])
        self.assertEqual(self.ls("new"), [env.queue_id])
        raw = (self.root / "new" / env.queue_id).read_bytes()
        self.assertTrue(raw.startswith(b"RELAYNET-QUEUE 1 "))
        parsed, offset = read_queue_file(Path(entry.path))
        self.assertEqual(parsed.size, len(b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"))
        self.assertEqual(parsed.hops, 2)
        self.assertEqual([r.address for r in parsed.recipients], ["a@localhost", "b@localhost"])
        self.assertEqual(raw[offset:], b"Received: x\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(json.loads(raw[HEADER_LEN : offset - 1])["version"], 1)
        self.assertEqual(os.stat(entry.path).st_mode & 0o777, 0o600)

    def test_commit_order(self) -> None:
        """
        A commit fsyncs the file in C{tmp/}, renames it into C{new/}, fsyncs
        C{new/}, and only then fires (in a worker thread's job: nothing
        happens before the pool runs it).
        """
        events: list[tuple[str, ...]] = []
        self.record_disk_calls(events)
        w = self.spool.begin(envelope(self.spool))
        qid = w.envelope.queue_id
        w.write(b"Subject: s\r\n\r\nbody\r\n")
        w.commit(hops=1).addCallback(lambda _: events.append(("fired",)))
        self.assertEqual((events, self.ls("tmp"), self.ls("new")), ([], [], []))
        self.pool.run_all()
        self.assertEqual(
            events,
            [
                ("fsync", f"tmp/{qid}"),
                ("rename", f"tmp/{qid}", f"new/{qid}"),
                ("fsync_dir", "new"),
                ("fired",),
            ],
        )

    def test_record_order(self) -> None:
        """
        A state is written to C{tmp/ID.state}, fsynced, renamed to
        C{state/ID}, C{state/} is fsynced, and only then does C{record} fire.
        """
        entry = self.commit()
        events: list[tuple[str, ...]] = []
        self.record_disk_calls(events)
        entry.state.held = True
        self.spool.record(entry).addCallback(lambda _: events.append(("fired",)))
        self.assertEqual(events, [])
        self.pool.run_all()
        qid = entry.queue_id
        self.assertEqual(
            events,
            [
                ("fsync", f"tmp/{qid}.state"),
                ("rename", f"tmp/{qid}.state", f"state/{qid}"),
                ("fsync_dir", "state"),
                ("fired",),
            ],
        )
        self.assertEqual(json.loads((self.root / "state" / qid).read_bytes())["held"], True)

    def record_disk_calls(self, events: list[tuple[str, ...]]) -> None:
        """Record C{os.fsync}, C{os.rename} and directory fsyncs (paths relative to the queue)."""
        real_fsync, real_rename = os.fsync, os.rename

        def rel(path: str | os.PathLike[str]) -> str:
            return os.path.relpath(path, self.root)

        def fsync(fd: int) -> None:
            events.append(("fsync", rel(os.readlink(f"/proc/self/fd/{fd}"))))
            real_fsync(fd)

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            events.append(("rename", rel(src), rel(dst)))
            real_rename(src, dst)

        def fsync_dir(path: Path | str) -> None:
            events.append(("fsync_dir", rel(path)))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                real_fsync(fd)
            finally:
                os.close(fd)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        self.patch(spool_module, "fsync_dir", fsync_dir)

    def test_failed_directory_fsync_takes_the_file_back(self) -> None:
        """
        If C{new/} cannot be fsynced, the rename may not be durable: the
        commit fails with L{SpoolError} and the file is taken back out of
        C{new/} (and removed), so it is neither acknowledged nor delivered.
        """
        def fsync_dir(path: Path | str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spool_module, "fsync_dir", fsync_dir)
        w = self.spool.begin(envelope(self.spool))
        w.write(b"x\r\n")
        d = w.commit(hops=1)
        self.pool.run_all()
        self.failureResultOf(d, SpoolError)
        self.assertEqual((self.ls("tmp"), self.ls("new")), ([], []))

    def test_small_message_touches_no_file_before_commit(self) -> None:
        """
        Below the flush threshold nothing is created until the commit (no
        file operation on the reactor thread), and an abort leaves nothing.
        """
        w = self.spool.begin(envelope(self.spool))
        w.write(b"Subject: s\r\n\r\n" + b"x" * 1000 + b"\r\n")
        self.assertEqual((self.pool.pending, self.ls("tmp")), (0, []))
        w.abort()
        self.pool.run_all()
        self.assertEqual(self.ls("tmp"), [])

    def test_large_message_streams_in_chunks(self) -> None:
        """
        A message larger than the flush threshold is written out in chunks
        by worker-thread jobs while it arrives (memory stays bounded:
        L{SpoolWriter.pending} counts what is not written yet, and
        L{SpoolWriter.drained} fires when it falls to zero), and commits byte
        for byte.
        """
        w = self.spool.begin(envelope(self.spool))
        drained: list[int] = []
        w.drained = lambda: drained.append(w.pending)
        line = b"y" * 78 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (3 * w.FLUSH_AT // len(line))
        for i in range(0, len(body), 65536):
            w.write(body[i : i + 65536])
        self.assertGreater(w.pending, 2 * w.FLUSH_AT)
        self.assertEqual(self.ls("tmp"), [])
        self.pool.run_all()
        self.assertEqual((w.pending, drained), (0, [0]))
        self.assertEqual(self.ls("tmp"), [w.envelope.queue_id])
        d = w.commit(hops=3)
        self.pool.run_all()
        entry = self.successResultOf(d)
        env, offset = read_queue_file(Path(entry.path))
        self.assertEqual((env.size, env.hops), (len(body), 3))
        self.assertEqual(Path(entry.path).read_bytes()[offset:], body)
        self.assertEqual(self.ls("tmp"), [])

    def test_abort_after_chunks(self) -> None:
        """Aborting a message some chunks of which are on disk removes them."""
        w = self.spool.begin(envelope(self.spool))
        w.write(b"z" * (w.FLUSH_AT + 1))
        self.pool.run_all()
        self.assertEqual(self.ls("tmp"), [w.envelope.queue_id])
        w.abort()
        self.pool.run_all()
        self.assertEqual((self.ls("tmp"), self.ls("new")), ([], []))

    def test_chunk_write_error_fails_commit(self) -> None:
        """
        A chunk that cannot be written (here: C{tmp/} is gone) fails the
        commit with L{SpoolError}; nothing reaches C{new/}.
        """
        w = self.spool.begin(envelope(self.spool))
        os.rmdir(self.root / "tmp")
        w.write(b"z" * (w.FLUSH_AT + 1))
        w.write(b"more\r\n")
        d = w.commit(hops=1)
        self.pool.run_all()
        self.failureResultOf(d, SpoolError)
        self.assertEqual(self.ls("new"), [])

    def test_commit_failure_is_spool_error(self) -> None:
        """
        When the rename into C{new/} fails, the commit fails with L{SpoolError}
        and nothing is left behind.
        """
        w = self.spool.begin(envelope(self.spool))
        w.write(b"x\r\n")
        os.rmdir(self.root / "new")
        d = w.commit(hops=1)
        self.pool.run_all()
        self.failureResultOf(d, SpoolError)
        self.assertEqual(self.ls("tmp"), [])

    def test_prepare_removes_tmp(self) -> None:
        """A crash leaves files in C{tmp/}; preparing the spool removes them."""
        (self.root / "tmp" / "3CCCN42PG65JPB717").write_bytes(b"half a message")
        (self.root / "tmp" / "3CCCN42PG65JPB717.state").write_bytes(b"{")
        (self.root / "tmp" / "leftover.d").mkdir()
        spool2 = Spool(self.root, self.reactor, self.pool)  # type: ignore[arg-type]
        spool2.prepare()
        self.assertEqual(self.ls("tmp"), [])
        self.assertEqual(list(spool2.recover()), [])

    def test_recover_moves_corrupt_files_and_drops_orphan_states(self) -> None:
        """
        Recovery returns each committed message with its recorded state;
        state files without a queue file go; queue files that do not parse
        are moved aside to C{corrupt/}; an unreadable state file counts as
        no state.
        """
        entry = self.commit("a@localhost", "b@localhost")
        entry.state.recipients["a@localhost"] = RecipientState(status="delivered", attempts=1)
        self.spool.record(entry)
        other = self.commit()
        self.pool.run_all()
        (self.root / "state" / other.queue_id).write_text("{not json")
        (self.root / "state" / "ORPHAN").write_text("{}")
        (self.root / "new" / "BROKEN").write_bytes(b"garbage")
        (self.root / "new" / "TRUNCATED").write_bytes(
            (self.root / "new" / entry.queue_id).read_bytes()[: HEADER_LEN + 5]
        )
        recovered = list(Spool(self.root, self.reactor, self.pool).recover())  # type: ignore[arg-type]
        self.assertEqual([e.queue_id for e in recovered], [entry.queue_id, other.queue_id])
        self.assertEqual([r.address for r in recovered[0].pending_recipients()], ["b@localhost"])
        self.assertEqual(recovered[1].state, QueueState())
        self.assertEqual(self.ls("state"), [entry.queue_id, other.queue_id])
        self.assertEqual(self.ls("corrupt"), ["BROKEN", "TRUNCATED"])

    def test_remove_unlinks_both_files(self) -> None:
        """Removing an entry unlinks its queue and state files."""
        entry = self.commit()
        entry.state = QueueState(recipients={"a@localhost": RecipientState(status="deferred")})
        self.spool.record(entry)
        self.pool.run_all()
        self.assertEqual(self.ls("state"), [entry.queue_id])
        d = self.spool.remove(entry)
        self.pool.run_all()
        self.successResultOf(d)
        self.assertEqual((self.ls("new"), self.ls("state")), ([], []))

    def test_group_sync_shares_flushes(self) -> None:
        """
        Callers of L{GroupSync.sync} in parallel threads share directory
        flushes: while one flush runs, every caller reaching it waits and the
        next flush serves them all (here 20 callers, 2 flushes). Each caller
        speaks for as many messages as it says (2 here): the observers and
        the statistics count messages.

        The first flush is held until the 19 other callers wait for it, so
        the batching does not depend on timing.
        """
        n = 20
        group = GroupSync(self.root / "new")
        waiting = threading.Semaphore(0)
        group._cond = _CountingCondition(waiting)
        real_fsync_dir = spool_module.fsync_dir
        gate_problems: list[str] = []
        first = threading.Lock()

        def fsync_dir(path: Path | str) -> None:
            if first.acquire(blocking=False):
                for _ in range(n - 1):
                    if not waiting.acquire(timeout=30):
                        gate_problems.append("the other callers did not reach the flush")
                        break
            real_fsync_dir(path)

        self.patch(spool_module, "fsync_dir", fsync_dir)
        batches: list[int] = []
        group.observers.append(batches.append)
        threads = [threading.Thread(target=group.sync, args=(2,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertEqual(gate_problems, [])
        self.assertEqual((group.flushes, group.synced), (2, 2 * n))
        self.assertEqual(sorted(batches), [2, 2 * (n - 1)])

    def test_commits_gather_while_jobs_run(self) -> None:
        """
        Commits made while the commit jobs are busy gather for one job: of 20
        commits made together, the first two start a job each
        (the two jobs of the commit threads); the other 18 wait and are written, renamed
        and flushed by one job once a thread is free -- 3 jobs and 3
        directory flushes for 20 messages, each acknowledged only after the
        flush that covers it.
        """
        n = 20
        batches: list[int] = []
        self.spool.observe_commits(batches.append)
        ds = []
        for i in range(n):
            w = self.spool.begin(envelope(self.spool))
            w.write(b"Subject: %d\r\n\r\nx\r\n" % i)
            ds.append(w.commit(hops=1))
        self.assertEqual(self.pool.pending, self.spool._thread_commits.jobs)
        self.pool.run_one()
        # The first job's message is durable; the 18 waiting went to one new job.
        self.assertEqual([d.called for d in ds[:3]], [True, False, False])
        self.assertEqual(self.pool.pending, 2)
        self.pool.run_all()
        entries = [self.successResultOf(d) for d in ds]
        self.assertEqual(self.pool.ran, 3)
        self.assertEqual(self.spool.group_commit_stats, (3, n))
        self.assertEqual(sorted(batches), [1, 1, n - 2])
        self.assertEqual(self.ls("new"), sorted(e.queue_id for e in entries))
        self.assertEqual(self.ls("tmp"), [])

    def test_one_failed_commit_leaves_its_batch_alone(self) -> None:
        """
        In a job of several commits, one whose file cannot be renamed fails
        alone (L{SpoolError}, nothing of it left); the others of its job are
        committed.
        """
        ds = []
        for i in range(5):
            w = self.spool.begin(envelope(self.spool))
            w.write(b"Subject: %d\r\n\r\nx\r\n" % i)
            ds.append((w.envelope.queue_id, w.commit(hops=1)))
        bad = ds[3][0]
        real_rename = os.rename

        def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if os.fspath(src).endswith(bad):
                raise OSError(28, "No space left on device")
            real_rename(src, dst)

        self.patch(os, "rename", rename)
        self.pool.run_all()
        self.failureResultOf(ds[3][1], SpoolError)
        good = [qid for qid, d in ds if qid != bad]
        for qid, d in ds:
            if qid != bad:
                self.assertEqual(self.successResultOf(d).queue_id, qid)
        self.assertEqual((self.ls("new"), self.ls("tmp")), (sorted(good), []))

    def test_failed_directory_fsync_fails_its_whole_batch(self) -> None:
        """
        If the flush of C{new/} after a job of several commits fails, none of
        them is acknowledged, and every file of the job is taken back out.
        """
        ds = []
        for i in range(5):
            w = self.spool.begin(envelope(self.spool))
            w.write(b"Subject: %d\r\n\r\nx\r\n" % i)
            ds.append(w.commit(hops=1))

        def fsync_dir(path: Path | str) -> None:
            raise OSError(5, "Input/output error")

        self.patch(spool_module, "fsync_dir", fsync_dir)
        self.pool.run_all()
        for d in ds:
            self.failureResultOf(d, SpoolError)
        self.assertEqual((self.ls("tmp"), self.ls("new")), ([], []))


class _QueueingReactor(ThreadlessReactor):
    """Keeps calls made from worker threads for the test's thread to run."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._calls: list[Callable[[], object]] = []

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        with self._lock:
            self._calls.append(lambda: callable(*args, **kwargs))

    def run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call in calls:
            call()


class _CountingCondition(threading.Condition):
    """A condition that releases C{waiting} each time a thread starts to wait on it."""

    def __init__(self, waiting: threading.Semaphore) -> None:
        super().__init__()
        self._waiting = waiting

    def wait(self, timeout: float | None = None) -> bool:
        self._waiting.release()
        return super().wait(timeout)


# -- the memory spool -------------------------------------------------------------


class MemorySpoolContractTests(_SpoolContractMixin, SynchronousTestCase):
    """The contract, kept by a memory spool whose operations wait for the test."""

    def make_spool(self) -> MemorySpool:
        return MemorySpool(clock=self.clock, immediate=False)

    def settle(self) -> None:
        assert isinstance(self.spool, MemorySpool)
        self.spool.run_all()

    def crash_and_restart(self) -> MemorySpool:
        assert isinstance(self.spool, MemorySpool)
        self.spool.crash()
        self.spool.prepare()
        return self.spool


class ImmediateMemorySpoolContractTests(MemorySpoolContractTests):
    """The contract, kept by a memory spool that completes everything at once."""

    completes_at_once = True

    def make_spool(self) -> MemorySpool:
        return MemorySpool(clock=self.clock)

    def settle(self) -> None:
        assert isinstance(self.spool, MemorySpool)
        self.assertEqual(self.spool.pending, 0)


class MemorySpoolTests(SynchronousTestCase):
    """What only the memory spool does: its modes, crash and failure injection."""

    def commit(self, spool: MemorySpool, message: bytes = MESSAGE) -> Deferred[QueueEntry]:
        writer = spool.begin(envelope(spool))
        writer.write(message)
        return writer.commit(hops=1)

    def test_immediate_by_default(self) -> None:
        """By default a commit, a record and a removal have fired when the call returns."""
        spool = MemorySpool()
        entry = self.successResultOf(self.commit(spool))
        self.assertIsInstance(entry, MemoryQueueEntry)
        self.assertIsNone(self.successResultOf(spool.record(entry)))
        self.assertIsNone(self.successResultOf(spool.remove(entry)))
        self.assertEqual(spool.pending, 0)

    def test_manual_operations_run_in_order(self) -> None:
        """
        With C{immediate=False} operations wait, in the order made, until
        C{run_one} or C{run_all} completes them; work queued by a callback
        runs in the same C{run_all}.
        """
        spool = MemorySpool(immediate=False)
        order: list[str] = []

        def committed(entry: QueueEntry, name: str) -> QueueEntry:
            order.append(name)
            return entry

        def record(entry: QueueEntry) -> Deferred[None]:
            return spool.record(entry).addCallback(lambda _: order.append("record 2"))

        d1 = self.commit(spool).addCallback(committed, "commit 1")
        self.commit(spool).addCallback(committed, "commit 2").addCallback(record)
        self.assertEqual((spool.pending, spool.count(), order), (2, 0, []))
        self.assertTrue(spool.run_one())
        self.assertEqual((order, spool.count()), (["commit 1"], 1))
        self.assertEqual(spool.run_all(), 2)
        self.assertEqual(order, ["commit 1", "commit 2", "record 2"])
        self.assertFalse(spool.run_one())
        self.successResultOf(d1)

    def test_crash_closes_open_writers(self) -> None:
        """After a crash a writer of the dead node refuses to write or commit."""
        spool = MemorySpool()
        writer = spool.begin(envelope(spool))
        writer.write(b"part")
        spool.crash()
        with self.assertRaises(SpoolError):
            writer.write(b"more")
        self.failureResultOf(writer.commit(1), SpoolError)
        self.assertEqual(list(spool.recover()), [])

    def test_crash_drops_waiting_operations(self) -> None:
        """Operations waiting at a crash are never completed: their Deferreds never fire."""
        spool = MemorySpool(immediate=False)
        d = self.commit(spool)
        spool.crash()
        self.assertEqual((spool.pending, spool.run_all()), (0, 0))
        self.assertNoResult(d)

    def test_broken(self) -> None:
        """
        While C{broken} is set, commits, records and removals fail with
        L{SpoolError} and change nothing; afterwards the spool works again.
        """
        spool = MemorySpool()
        entry = self.successResultOf(self.commit(spool))
        spool.broken = "No space left on device"
        failure = self.failureResultOf(self.commit(spool), SpoolError)
        self.assertEqual(str(failure.value), "No space left on device")
        entry.state.held = True
        self.failureResultOf(spool.record(entry), SpoolError)
        self.failureResultOf(spool.remove(entry), SpoolError)
        [got] = spool.recover()
        self.assertEqual((got.state.held, spool.count()), (False, 1))
        spool.broken = None
        self.successResultOf(self.commit(spool))
        self.assertEqual(spool.count(), 2)

    def test_duplicate_queue_id(self) -> None:
        """Committing a second message under a queue id already committed fails."""
        spool = MemorySpool()
        env = envelope(spool)
        for expect_ok in (True, False):
            w = spool.begin(env)
            w.write(MESSAGE)
            d = w.commit(1)
            if expect_ok:
                self.successResultOf(d)
            else:
                self.failureResultOf(d, SpoolError)

    def test_entries_name_no_file(self) -> None:
        """An entry's path names no file: its message is read with C{open_message}."""
        spool = MemorySpool()
        entry = self.successResultOf(self.commit(spool))
        self.assertEqual(entry.path, f"memory:{entry.queue_id}")
        self.assertFalse(os.path.exists(entry.path))

    def test_writer_interface(self) -> None:
        """A writer never has bytes waiting to be written (no flow control needed)."""
        spool = MemorySpool()
        writer = spool.begin(envelope(spool))
        writer.write(b"x" * (3 * writer.FLUSH_AT))
        self.assertEqual((writer.pending, writer.size), (0, 3 * writer.FLUSH_AT))

    def test_id_suffix(self) -> None:
        """Each spool's ids end in its suffix, which must be alphanumeric."""
        a, b = MemorySpool(suffix="A1"), MemorySpool(suffix="B2")
        self.assertTrue(a.new_id().endswith("A1") and b.new_id().endswith("B2"))
        self.assertNotEqual(a.new_id(), b.new_id())
        with self.assertRaises(ValueError):
            MemorySpool(suffix="../x")


def test_bounded_reader_over_bytes() -> None:
    """L{BoundedReader} works over L{io.BytesIO}: at most C{size} bytes, then EOF."""
    f = io.BytesIO(b"0123456789")
    f.seek(3)
    reader = BoundedReader(f, 5)
    assert (reader.read(2), reader.remaining) == (b"34", 3)
    assert (reader.read(), reader.read(), reader.remaining) == (b"567", b"", 0)
    with BoundedReader(io.BytesIO(b"abc"), 10) as r:
        assert r.read(None) == b"abc"


def test_recovery_keeps_the_state_of_a_message_committed_meanwhile(tmp_path: Path) -> None:
    """
    The node recovers in the background while it accepts mail: a message
    committed (and its state recorded) while recover() is still running is
    not an orphan, and its state file stays (found by the power-loss test:
    deleting it lost the record of a local delivery).
    """
    reactor = ThreadlessReactor()
    pool = ManualThreadPool(immediate=True)
    spool = Spool(tmp_path / "q", reactor, pool, clock=lambda: EPOCH)  # type: ignore[arg-type]
    spool.prepare()
    old = spool.begin(envelope(spool, "a@localhost"))
    old.write(MESSAGE)
    old_entry = old.commit(1).result  # type: ignore[attr-defined]
    recovery = spool.recover()
    assert next(recovery).queue_id == old_entry.queue_id
    new = spool.begin(envelope(spool, "b@localhost"))
    new.write(MESSAGE)
    entry = new.commit(1).result  # type: ignore[attr-defined]
    spool.record(entry)
    assert list(recovery) == []
    assert (spool.state_dir / entry.queue_id).exists()


def test_due_hints_gather_for_a_second_into_one_job(tmp_path: Path) -> None:
    """
    Hints given within L{DueHints.DELAY} are written by one job, one job at
    a time (those given meanwhile wait for the next, a delay later); a file
    gone meanwhile is skipped; C{flush} writes what is gathered at once.
    """
    from twisted.internet.task import Clock

    from relaynet.queue.spool import DueHints

    clock = Clock()
    jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def run(f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        jobs.append((f, d))
        return d

    def finish() -> None:
        f, d = jobs.pop(0)
        d.callback(f())

    files = [tmp_path / f"q{i}" for i in range(4)]
    for f in files:
        f.write_bytes(b"x")
    hints = DueHints(run, clock.callLater)
    hints.submit(str(files[0]), EPOCH + 100)
    hints.submit(str(tmp_path / "gone"), EPOCH + 100)
    hints.submit(str(files[1]), EPOCH + 200)
    assert jobs == []
    clock.advance(DueHints.DELAY)
    assert len(jobs) == 1
    hints.submit(str(files[2]), EPOCH + 300)
    finish()
    assert files[0].stat().st_mtime == EPOCH + 100 and files[1].stat().st_mtime == EPOCH + 200
    assert hints.written == 2 and jobs == []
    clock.advance(DueHints.DELAY)
    finish()
    assert files[2].stat().st_mtime == EPOCH + 300
    hints.submit(str(files[3]), EPOCH + 400)
    flushed = hints.flush()
    assert len(jobs) == 1 and not clock.getDelayedCalls()
    finish()
    assert flushed.called and files[3].stat().st_mtime == EPOCH + 400 and hints.written == 4
