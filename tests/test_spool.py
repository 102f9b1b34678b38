"""
Tests for L{relaynet.queue.spool}: the commit protocol, recovery and group commit,
on real files with a real thread pool.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from relaynet.queue.spool import (
    HEADER_LEN,
    Envelope,
    QueueState,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    read_queue_file,
)


def waitFor(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """A Deferred firing once C{predicate()} holds, polled on the reactor; fails after C{timeout}."""
    from twisted.internet.task import deferLater

    @inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("condition not reached within %ss" % timeout)
            yield deferLater(reactor, 0.005, lambda: None)

    return poll()


def envelope(spool: Spool, *rcpts: str) -> Envelope:
    return Envelope(
        queue_id=spool.new_id(),
        sender="sender@example.org",
        recipients=tuple(Recipient(r) for r in (rcpts or ("a@localhost",))),
        arrival=1700000000.0,
        params={"body": "8BITMIME"},
        client={"ip": "127.0.0.1"},
        node="n1",
    )


class SpoolTests(TestCase):
    def setUp(self) -> None:
        tmp = tempfile.mkdtemp(prefix="relaynet-spool-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.root = Path(tmp) / "queue"
        self.pool = ThreadPool(minthreads=1, maxthreads=8)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.spool = Spool(self.root, reactor, self.pool)
        self.spool.prepare()

    @inlineCallbacks
    def test_commit_layout(self):  # type: ignore[no-untyped-def]
        """
        A committed message is one file in C{new/}: a fixed header record with
        the final size and hop count, the JSON envelope, then the bytes.
        """
        env = envelope(self.spool, "a@localhost", "b@localhost")
        w = self.spool.begin(env)
        w.write(b"Received: x\r\n")
        w.write(b"Subject: s\r\n\r\nbody\r\n")
        entry = yield w.commit(hops=2)
        self.assertEqual(os.listdir(self.root / "tmp"), [])
        self.assertEqual(os.listdir(self.root / "new"), [env.queue_id])
        raw = (self.root / "new" / env.queue_id).read_bytes()
        self.assertTrue(raw.startswith(b"RELAYNET-QUEUE 1 "))
        parsed, offset = read_queue_file(entry.path)
        self.assertEqual(parsed.size, len(b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"))
        self.assertEqual(parsed.hops, 2)
        self.assertEqual([r.address for r in parsed.recipients], ["a@localhost", "b@localhost"])
        self.assertEqual(raw[offset:], b"Received: x\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(json.loads(raw[HEADER_LEN : offset - 1])["version"], 1)
        self.assertEqual(os.stat(entry.path).st_mode & 0o777, 0o600)
        with entry.open_message() as f:
            self.assertEqual(f.read(), raw[offset:])

    def test_abort(self) -> None:
        """An aborted message leaves nothing in C{tmp/} or C{new/}."""
        w = self.spool.begin(envelope(self.spool))
        w.write(b"partial")
        w.abort()
        self.assertEqual(os.listdir(self.root / "tmp"), [])
        self.assertEqual(os.listdir(self.root / "new"), [])

    def test_small_message_touches_no_file_before_commit(self) -> None:
        """
        Below the flush threshold nothing is created until the commit (no
        file operation on the reactor thread), and an abort leaves nothing.
        """
        w = self.spool.begin(envelope(self.spool))
        w.write(b"Subject: s\r\n\r\n" + b"x" * 1000 + b"\r\n")
        self.assertEqual(os.listdir(self.root / "tmp"), [])
        w.abort()
        self.assertEqual(os.listdir(self.root / "tmp"), [])

    @inlineCallbacks
    def test_large_message_streams_in_chunks(self):  # type: ignore[no-untyped-def]
        """
        A message larger than the flush threshold is written out in chunks
        while it arrives (memory stays bounded; L{SpoolWriter.drained} fires
        when the chunks are on disk) and commits byte for byte.
        """
        w = self.spool.begin(envelope(self.spool))
        drained = []
        w.drained = lambda: drained.append(w.pending)
        line = b"y" * 78 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (3 * w.FLUSH_AT // len(line))
        for i in range(0, len(body), 65536):
            w.write(body[i : i + 65536])
            self.assertLess(w.pending, 2 * w.FLUSH_AT + 65536)
        yield waitFor(lambda: drained and len(os.listdir(self.root / "tmp")) == 1)
        self.assertEqual(drained[-1], 0)
        entry = yield w.commit(hops=3)
        env, offset = read_queue_file(entry.path)
        self.assertEqual((env.size, env.hops), (len(body), 3))
        self.assertEqual(Path(entry.path).read_bytes()[offset:], body)
        self.assertEqual(os.listdir(self.root / "tmp"), [])

    @inlineCallbacks
    def test_abort_after_chunks(self):  # type: ignore[no-untyped-def]
        """Aborting a message some chunks of which are on disk removes them."""
        w = self.spool.begin(envelope(self.spool))
        w.write(b"z" * (w.FLUSH_AT + 1))
        yield waitFor(lambda: len(os.listdir(self.root / "tmp")) == 1)
        w.abort()
        yield waitFor(lambda: os.listdir(self.root / "tmp") == [])
        self.assertEqual(os.listdir(self.root / "new"), [])

    @inlineCallbacks
    def test_chunk_write_error_fails_commit(self):  # type: ignore[no-untyped-def]
        """
        A chunk that cannot be written (here: C{tmp/} is gone) fails the
        commit with L{SpoolError}; nothing reaches C{new/}.
        """
        w = self.spool.begin(envelope(self.spool))
        os.rmdir(self.root / "tmp")
        w.write(b"z" * (w.FLUSH_AT + 1))
        w.write(b"more\r\n")
        yield self.assertFailure(w.commit(hops=1), SpoolError)
        self.assertEqual(os.listdir(self.root / "new"), [])

    def test_recovery_removes_tmp(self) -> None:
        """A crash leaves files in C{tmp/}; preparing the spool removes them."""
        (self.root / "tmp" / "3CCCN42PG65JPB717").write_bytes(b"half a message")
        (self.root / "tmp" / "3CCCN42PG65JPB717.state").write_bytes(b"{")
        spool2 = Spool(self.root, reactor, self.pool)
        spool2.prepare()
        self.assertEqual(os.listdir(self.root / "tmp"), [])
        self.assertEqual(list(spool2.recover()), [])

    @inlineCallbacks
    def test_recover_with_state(self):  # type: ignore[no-untyped-def]
        """
        Recovery returns each committed message with its recorded per-recipient
        state; orphan state files go; corrupt queue files are moved aside.
        """
        entry = yield self._commit("a@localhost", "b@localhost")
        entry.state.recipients["a@localhost"] = RecipientState(status="delivered", attempts=1)
        yield self.spool.record(entry)
        (self.root / "state" / "ORPHAN").write_text("{}")
        (self.root / "new" / "BROKEN").write_bytes(b"garbage")
        recovered = list(Spool(self.root, reactor, self.pool).recover())
        self.assertEqual([e.queue_id for e in recovered], [entry.queue_id])
        self.assertEqual(
            [r.address for r in recovered[0].pending_recipients()], ["b@localhost"]
        )
        self.assertFalse((self.root / "state" / "ORPHAN").exists())
        self.assertTrue((self.root / "corrupt" / "BROKEN").exists())

    @inlineCallbacks
    def test_remove(self):  # type: ignore[no-untyped-def]
        """Removing an entry unlinks its queue and state files."""
        entry = yield self._commit()
        entry.state = QueueState(recipients={"a@localhost": RecipientState(status="deferred")})
        yield self.spool.record(entry)
        yield self.spool.remove(entry)
        self.assertEqual(os.listdir(self.root / "new"), [])
        self.assertEqual(os.listdir(self.root / "state"), [])

    @inlineCallbacks
    def test_group_commit(self):  # type: ignore[no-untyped-def]
        """
        Fifty messages committed together share directory flushes: fewer
        flushes than messages, and every message is durable in C{new/}.
        """
        before = self.spool.group_commit_stats
        writers = []
        for i in range(50):
            w = self.spool.begin(envelope(self.spool))
            w.write(b"Subject: %d\r\n\r\nx\r\n" % i)
            writers.append(w)
        entries = yield gatherResults([w.commit(hops=1) for w in writers])
        flushes, synced = self.spool.group_commit_stats
        self.assertEqual(synced - before[1], 50)
        self.assertLess(flushes - before[0], 50)
        self.assertEqual(len(os.listdir(self.root / "new")), 50)
        self.assertEqual(len({e.queue_id for e in entries}), 50)

    @inlineCallbacks
    def test_commit_failure_is_spool_error(self):  # type: ignore[no-untyped-def]
        """
        When the rename into C{new/} fails, the commit fails with L{SpoolError}
        and nothing is left behind.
        """
        w = self.spool.begin(envelope(self.spool))
        w.write(b"x\r\n")
        os.rmdir(self.root / "new")
        yield self.assertFailure(w.commit(hops=1), SpoolError)
        self.assertEqual(os.listdir(self.root / "tmp"), [])

    def test_ids_unique_and_ordered(self) -> None:
        """Queue ids are unique and safe as file names."""
        ids = [self.spool.new_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), 2000)
        self.assertTrue(all(i.isalnum() for i in ids))

    def _commit(self, *rcpts: str):  # type: ignore[no-untyped-def]
        w = self.spool.begin(envelope(self.spool, *rcpts))
        w.write(b"Subject: s\r\n\r\nbody\r\n")
        return w.commit(hops=1)
