"""
The commit process (relaynet.queue.committer) and the node's end of it
(relaynet.queue.spool.CommitProcess): messages made durable in C{new/} by
another process, with the spool's commit contract.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from relaynet.queue import committer
from relaynet.queue.spool import (
    CommitBatch,
    CommitProcess,
    Envelope,
    PendingCommit,
    Recipient,
    Spool,
    SpoolError,
    read_queue_file,
)


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    for name in ("tmp", "new", "recycled"):
        (tmp_path / name).mkdir()
    return tmp_path / "tmp", tmp_path / "new"


def _kept(tmp: Path) -> list[str]:
    """The files kept for reuse beside C{tmp} (in C{recycled/})."""
    return os.listdir(tmp.parent / "recycled")


def _items(tmp: Path, new: Path, *names: str) -> list[tuple[bytes, bytes, memoryview]]:
    return [
        (os.fsencode(tmp / n), os.fsencode(new / n), memoryview(f"message {n}\r\n".encode()))
        for n in names
    ]


def test_commit_writes_renames_and_reports_each(tmp_path: Path) -> None:
    """Each message lands in new/ with its bytes, mode 0600; tmp/ is left empty."""
    tmp, new = _dirs(tmp_path)
    assert committer.commit(_items(tmp, new, "A", "B")) == [None, None]
    assert sorted(os.listdir(new)) == ["A", "B"] and os.listdir(tmp) == []
    assert (new / "B").read_bytes() == b"message B\r\n"
    assert stat.S_IMODE((new / "A").stat().st_mode) == 0o600


def test_a_failed_message_fails_alone(tmp_path: Path) -> None:
    """A message whose tmp file exists already (O_EXCL) fails; the others of the batch commit."""
    tmp, new = _dirs(tmp_path)
    (tmp / "B").write_bytes(b"someone else's")
    results = committer.commit(_items(tmp, new, "A", "B", "C"))
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError) and results[1].errno == errno.EEXIST
    assert sorted(os.listdir(new)) == ["A", "C"]


def test_failed_directory_fsync_takes_every_renamed_file_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    If new/ cannot be fsynced, the renames may not be durable: every message
    of the batch fails with the error, and none of their files is left.
    """
    tmp, new = _dirs(tmp_path)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results = committer.commit(_items(tmp, new, "A", "B"))
    assert [getattr(r, "errno", None) for r in results] == [errno.EIO, errno.EIO]
    assert os.listdir(new) == [] and os.listdir(tmp) == []


def test_requests_and_replies_round_trip() -> None:
    items = [("/q/tmp/A", "/q/new/A", b"x" * 10), ("/q/tmp/\u00e9", "/q/new/\u00e9", b"")]
    decoded = committer.decode_batch(committer.encode_batch(items))
    assert [(t, n, bytes(d)) for t, n, d in decoded] == [
        (os.fsencode(t), os.fsencode(n), d) for t, n, d in items
    ]
    results = committer.decode_results(committer.encode_results([None, OSError(errno.ENOSPC, "No space left")]))
    assert results[0] is None
    assert isinstance(results[1], OSError) and (results[1].errno, results[1].strerror) == (errno.ENOSPC, "No space left")
    with pytest.raises(ValueError):
        committer.decode_batch(committer.encode_batch(items)[:-3])
    with pytest.raises(ValueError):
        committer.decode_results(b"\x00")


def test_unlink_requests(tmp_path: Path) -> None:
    """An unlink request: each path gone, one already gone is fine, another error reported."""
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    paths = [str(tmp_path / "a"), str(tmp_path / "never"), str(tmp_path / "dir")]
    decoded = committer.decode_unlinks(committer.encode_unlinks(paths))
    assert decoded == [os.fsencode(p) for p in paths]
    results = committer.unlink(decoded)
    assert results[:2] == [None, None] and isinstance(results[2], OSError)
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    with pytest.raises(ValueError):
        committer.decode_unlinks(committer.encode_unlinks(paths)[:-1])
    with pytest.raises(ValueError):
        committer.decode_batch(committer.encode_unlinks(paths))


def _queue(tmp_path: Path) -> tuple[Path, Path, committer.Recycler]:
    tmp, new = _dirs(tmp_path)
    return tmp, new, committer.Recycler(limit=2, max_bytes=100)


def test_a_delivered_queue_file_is_written_over_by_the_next_commit(tmp_path: Path) -> None:
    """
    An unlinked queue file is kept in recycled/, and once new/ has been
    fsynced since (by the next commit), a commit writes over it: the same
    inode, only the new message's bytes (a shorter message truncates it),
    mode 0600, nothing left in recycled/ or tmp/.
    """
    tmp, new, recycler = _queue(tmp_path)
    long = [(os.fsencode(tmp / "A"), os.fsencode(new / "A"), memoryview(b"a" * 80))]
    assert committer.commit(long, recycler) == [None]
    inode = (new / "A").stat().st_ino
    assert recycler.unlink([os.fsencode(new / "A")]) == [None]
    assert os.listdir(new) == [] and len(_kept(tmp)) == 1 and recycler.kept == 1
    assert os.listdir(tmp) == []
    # A's removal from new/ is not durable yet: B gets a file of its own.
    assert committer.commit(_items(tmp, new, "B"), recycler) == [None]
    assert (new / "B").stat().st_ino != inode and recycler.kept == 1
    # B's commit fsynced new/: C is written over A's file.
    assert committer.commit(_items(tmp, new, "C"), recycler) == [None]
    assert sorted(os.listdir(new)) == ["B", "C"] and _kept(tmp) == [] and recycler.kept == 0
    assert os.listdir(tmp) == []
    assert (new / "C").read_bytes() == b"message C\r\n"
    assert (new / "C").stat().st_ino == inode
    assert stat.S_IMODE((new / "C").stat().st_mode) == 0o600


def test_what_is_not_kept(tmp_path: Path) -> None:
    """
    Only small queue files in new/ are kept, up to the limit; the rest
    (a large file, a state file, one past the limit) are unlinked as
    before, and a path already gone is fine.
    """
    tmp, new, recycler = _queue(tmp_path)
    (tmp_path / "state").mkdir()
    (new / "big").write_bytes(b"x" * 101)
    (tmp_path / "state" / "S").write_bytes(b"{}")
    for name in "CDE":
        (new / name).write_bytes(b"x")
    paths = [os.fsencode(p) for p in (new / "big", tmp_path / "state" / "S", new / "C", new / "D", new / "E", new / "gone")]
    assert recycler.unlink(paths) == [None] * 6
    assert os.listdir(new) == [] and os.listdir(tmp_path / "state") == []
    assert len(_kept(tmp)) == 2 and recycler.kept == 2
    recycler.purge()
    assert _kept(tmp) == [] and recycler.kept == 0


def test_a_full_disk_gives_the_kept_files_back_and_tries_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, new, recycler = _queue(tmp_path)
    for name in "CD":
        (new / name).write_bytes(b"x")
        recycler.unlink([os.fsencode(new / name)])
    real = committer.write_all
    failures = []

    def write_all(fd: int, data: Any) -> None:
        if not failures:
            failures.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(committer, "write_all", write_all)
    assert committer.commit(_items(tmp, new, "A"), recycler) == [None]
    assert failures and recycler.kept == 0 and _kept(tmp) == []
    assert os.listdir(new) == ["A"] and os.listdir(tmp) == []
    # Without kept files, a full disk is the message's error.
    failures.clear()
    results = committer.commit(_items(tmp, new, "B"), recycler)
    assert getattr(results[0], "errno", None) == errno.ENOSPC
    assert os.listdir(new) == ["A"] and os.listdir(tmp) == []


def test_a_start_empties_recycled(tmp_path: Path) -> None:
    """
    Kept files left by a commit process killed with its node (no purge) are
    removed by the next start, like tmp/'s leftovers; new/ is untouched.
    """
    spool = Spool(tmp_path / "queue", reactor, ThreadPool(minthreads=0, maxthreads=1))
    spool.prepare()
    (spool.recycled_dir / "123-1").write_bytes(b"a delivered message")
    (spool.new_dir / "Q1").write_bytes(b"not touched")
    spool.prepare()
    assert os.listdir(spool.recycled_dir) == [] and os.listdir(spool.tmp_dir) == []
    assert os.listdir(spool.new_dir) == ["Q1"]


def _serving(idle: float) -> tuple[Any, Any, Any]:
    """serve() in a thread: (ask(payload) -> results, end() -> exit status, wait_for(predicate))."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(committer.serve(requests_r, replies_w, idle=idle)))
    t.start()

    def ask(payload: bytes) -> list[OSError | None]:
        os.write(requests_w, _frame(payload))
        return committer.decode_results(_read_frame(replies_r))

    def end() -> int:
        os.close(requests_w)
        t.join(timeout=30)
        for fd in (requests_r, replies_r, replies_w):
            os.close(fd)
        assert not t.is_alive()
        return status[0]

    def wait_for(predicate: Any) -> None:
        deadline = threading.Event()
        for _ in range(1500):
            if predicate():
                return
            deadline.wait(0.02)
        raise AssertionError("not within 30 s")

    return ask, end, wait_for


def test_serve_keeps_delivered_files_and_unlinks_them_at_the_end(tmp_path: Path) -> None:
    tmp, new = _dirs(tmp_path)
    ask, end, _ = _serving(idle=600)
    assert ask(committer.encode_batch([(str(tmp / "A"), str(new / "A"), b"x")])) == [None]
    assert ask(committer.encode_unlinks([str(new / "A")])) == [None]
    assert len(_kept(tmp)) == 1 and os.listdir(new) == []
    assert ask(committer.encode_batch([(str(tmp / "B"), str(new / "B"), b"y")])) == [None]
    assert ask(committer.encode_unlinks([str(new / "B")])) == [None]
    assert len(_kept(tmp)) == 2  # A was kept after new/'s last fsync: not written over
    assert ask(committer.encode_batch([(str(tmp / "C"), str(new / "C"), b"z")])) == [None]
    assert len(_kept(tmp)) == 1  # C over A (B's commit fsynced new/)
    assert ask(committer.encode_unlinks([str(new / "C")])) == [None]
    assert end() == 0
    assert _kept(tmp) == [] and os.listdir(tmp) == [] and os.listdir(new) == []


def test_serve_unlinks_kept_files_when_idle(tmp_path: Path) -> None:
    tmp, new = _dirs(tmp_path)
    ask, end, wait_for = _serving(idle=0.2)
    assert ask(committer.encode_batch([(str(tmp / "A"), str(new / "A"), b"x")])) == [None]
    assert ask(committer.encode_unlinks([str(new / "A")])) == [None]
    # No request for 0.2 s: the kept file goes, the process still serving.
    wait_for(lambda: _kept(tmp) == [])
    assert ask(committer.encode_batch([(str(tmp / "C"), str(new / "C"), b"x")])) == [None]
    assert end() == 0
    assert os.listdir(new) == ["C"]


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _read_frame(fd: int) -> bytes:
    head = committer._read_exact(fd, 4)
    assert head is not None
    body = committer._read_exact(fd, struct.unpack("!I", head)[0])
    assert body is not None
    return body


def test_serve_answers_each_request_in_order_and_ends_with_its_input(tmp_path: Path) -> None:
    tmp, new = _dirs(tmp_path)
    ask, end, _ = _serving(idle=committer.RECYCLE_IDLE)
    for name in ("A", "B", "C"):
        assert ask(committer.encode_batch([(str(tmp / name), str(new / name), b"x")])) == [None]
    assert ask(committer.encode_unlinks([str(new / "C")])) == [None]
    assert end() == 0
    assert sorted(os.listdir(new)) == ["A", "B"]


def test_serve_refuses_a_broken_request_and_stops_for_a_new_parent() -> None:
    r, w = os.pipe()
    try:
        os.write(w, struct.pack("!I", committer.MAX_FRAME + 1))
        assert committer.serve(r, w) == 2
        # Our parent is not who the node said: it died; stop before reading.
        assert committer.serve(r, w, parent=os.getppid() + 1) == 0
    finally:
        os.close(r)
        os.close(w)


def _envelope(spool: Spool) -> Envelope:
    return Envelope(
        queue_id=spool.new_id(), sender="a@example.com", recipients=(Recipient("b@example.net", route="relay:0"),),
        arrival=1.0, client={"ip": "127.0.0.1", "helo": "c.test", "protocol": "ESMTP"}, node="n1",
    )


class CommitProcessTests(TestCase):
    """A spool committing through a real commit process, on the real reactor."""

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="relaynet-committer-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-committer")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.spool = Spool(root / "queue", reactor, self.pool)
        self.spool.prepare()
        self.batches: list[int] = []
        self.spool.observe_commits(self.batches.append)
        self.committer = CommitProcess(reactor, self.spool._in_thread)
        self.committer.start()
        self.spool.use_commit_process(self.committer)
        self.addCleanup(self.committer.stop)

    def commit(self, text: bytes) -> "Deferred[Any]":
        w = self.spool.begin(_envelope(self.spool))
        w.write(text)
        return w.commit(hops=1)

    def ls(self, name: str) -> list[str]:
        return sorted(os.listdir(self.spool.root / name))

    @inlineCallbacks
    def until_ended(self) -> Any:
        """Wait (30 s at most) until the node has seen its commit process end."""
        for _ in range(3000):
            if not self.committer.alive:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("the commit process was not seen to end within 30 s")

    @inlineCallbacks
    def test_commits_go_through_the_process(self) -> Any:
        """
        Messages committed together are durable in new/ when their Deferreds
        fire, byte for byte, counted by the process's directory flushes.
        """
        results = yield DeferredList([self.commit(b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(5)],
                                     fireOnOneErrback=True)
        entries = [entry for _, entry in results]
        self.assertEqual(self.ls("new"), sorted(e.queue_id for e in entries))
        self.assertEqual(self.ls("tmp"), [])
        envelope, _ = read_queue_file(entries[3].path)
        self.assertEqual(envelope.queue_id, entries[3].queue_id)
        self.assertEqual(sum(self.batches), 5)
        self.assertEqual((self.committer.synced, self.spool.group_commit_stats[1]), (5, 5))
        self.assertTrue(self.committer.flushes <= 5)

    @inlineCallbacks
    def test_batches_larger_than_the_pipe(self) -> Any:
        """
        Batches of several messages just under the process's limit (more
        than a pipe holds: written partly at once, the rest by the
        transport) arrive whole: every queue file holds its message byte
        for byte.
        """
        line = b"y" * 78 + b"\r\n"
        bodies = [b"Subject: %d\r\n\r\n" % i + line * (60 * 1024 // len(line)) for i in range(12)]
        results = yield DeferredList([self.commit(body) for body in bodies], fireOnOneErrback=True)
        for body, (_, entry) in zip(bodies, results):
            with entry.open_message() as f:
                self.assertTrue(f.read().endswith(body))
        # They went through the process (three or four to a batch), not the threads.
        self.assertEqual(self.committer.synced, 12)
        self.assertTrue(self.committer.flushes < 12)

    @inlineCallbacks
    def test_a_batch_the_process_leaves_unanswered_fails_and_leaves_nothing(self) -> Any:
        """
        The process is killed with a batch out: the commit fails with
        SpoolError and none of its files stays; the spool then commits in
        threads, and says so once in the log.
        """
        assert self.committer.transport is not None
        pid = self.committer.transport.pid
        d = self.commit(b"Subject: lost\r\n\r\nx\r\n")
        os.kill(pid, signal.SIGKILL)
        yield self.assertFailure(d, SpoolError)
        self.assertFalse(self.committer.alive)
        self.assertEqual((self.ls("new"), self.ls("tmp")), ([], []))
        entry = yield self.commit(b"Subject: after\r\n\r\nx\r\n")
        self.assertEqual(self.ls("new"), [entry.queue_id])

    @inlineCallbacks
    def test_commits_waiting_when_the_process_dies_go_to_the_threads(self) -> Any:
        """
        The process is killed with one batch out and more commits waiting
        behind it: the batch out fails (451 for its client), the waiting
        ones are committed by the threads.
        """
        assert self.committer.transport is not None
        pid = self.committer.transport.pid
        out = self.commit(b"Subject: out\r\n\r\nx\r\n")
        waiting = [self.commit(b"Subject: w%d\r\n\r\nx\r\n" % i) for i in range(2)]
        os.kill(pid, signal.SIGKILL)
        yield self.assertFailure(out, SpoolError)
        entries = yield DeferredList(waiting, fireOnOneErrback=True)
        self.assertEqual(self.ls("new"), sorted(entry.queue_id for _, entry in entries))
        self.assertEqual(self.committer.synced, 0)

    @inlineCallbacks
    def test_removals_go_through_the_process(self) -> Any:
        """Retired messages' files are unlinked by the process, with their state files."""
        entries = yield DeferredList([self.commit(b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)],
                                     fireOnOneErrback=True)
        first, second, third = [entry for _, entry in entries]
        yield self.spool.record(second)
        assert self.committer.transport is not None
        pid = self.committer.transport.pid
        before = Path(f"/proc/{pid}/io").read_text()
        yield DeferredList([self.spool.remove(first), self.spool.remove(second)], fireOnOneErrback=True)
        self.assertEqual(self.ls("new"), [third.queue_id])
        self.assertEqual(self.ls("state"), [])
        # The process did it: its count of system calls moved.
        self.assertNotEqual(Path(f"/proc/{pid}/io").read_text(), before)

    @inlineCallbacks
    def test_the_process_commits_over_delivered_files(self) -> Any:
        """
        A delivered message's queue file is kept by the process and the next
        commit is written over it: same inode, the new message's bytes only.
        """
        first = yield self.commit(b"Subject: first\r\n\r\n" + b"x" * 500 + b"\r\n")
        inode = os.stat(first.path).st_ino
        yield self.spool.remove(first)
        self.assertEqual(self.ls("new"), [])
        self.assertEqual(len(self.ls("recycled")), 1)
        self.assertEqual(self.ls("tmp"), [])
        # The first commit after the removal fsyncs new/; the next writes over.
        between = yield self.commit(b"Subject: between\r\n\r\nx\r\n")
        self.assertNotEqual(os.stat(between.path).st_ino, inode)
        second = yield self.commit(b"Subject: second\r\n\r\nshort\r\n")
        self.assertEqual(os.stat(second.path).st_ino, inode)
        self.assertEqual(self.ls("recycled"), [])
        reader = second.open_message()
        try:
            self.assertEqual(reader.read(), b"Subject: second\r\n\r\nshort\r\n")
        finally:
            reader.close()
        # Read back from the file itself, not from the entry's memory.
        recovered = [e for e in self.spool.recover() if e.queue_id == second.queue_id]
        self.assertEqual(len(recovered), 1)
        reader = recovered[0].open_message()
        try:
            self.assertEqual(reader.read(), b"Subject: second\r\n\r\nshort\r\n")
        finally:
            reader.close()
        self.assertEqual(os.path.getsize(second.path), recovered[0].body_offset + second.envelope.size)

    @inlineCallbacks
    def test_removals_left_unanswered_are_done_in_a_thread(self) -> Any:
        """The process is killed with an unlink out: the files are unlinked all the same."""
        entry = yield self.commit(b"Subject: gone\r\n\r\nx\r\n")
        assert self.committer.transport is not None
        pid = self.committer.transport.pid
        d = self.spool.remove(entry)
        os.kill(pid, signal.SIGKILL)
        yield d
        # Done by the process before it died, or by a thread after.
        yield self.until_ended()
        self.assertEqual(self.ls("new"), [])

    @inlineCallbacks
    def test_stop_ends_the_process_after_its_batches(self) -> Any:
        d = self.commit(b"Subject: last\r\n\r\nx\r\n")
        stopped = self.committer.stop()
        entry = yield d
        yield stopped
        self.assertFalse(self.committer.alive)
        self.assertEqual(self.ls("new"), [entry.queue_id])


def test_a_batch_for_the_process_takes_up_to_its_bytes() -> None:
    """
    A job of the commit process takes queued messages up to max_bytes of
    data (at least one, however large): the rest wait for the next job.
    """
    jobs: list[tuple[list[int], Deferred[list[BaseException | None]]]] = []

    def run(batch: list[PendingCommit]) -> Deferred[list[BaseException | None]]:
        d: Deferred[list[BaseException | None]] = Deferred()
        jobs.append(([len(c.data or b"") for c in batch], d))
        return d

    batches = CommitBatch(run, jobs=1, max_bytes=10)
    done = [batches.submit(PendingCommit("t", "n", b"x" * size, lambda: None, lambda: None))
            for size in (6, 6, 3, 20, 1)]
    for _ in range(3):
        sizes, d = jobs[-1]
        d.callback([None] * len(sizes))
    assert [sizes for sizes, _ in jobs] == [[6], [6, 3], [20], [1]]
    jobs[-1][1].callback([None])
    assert all(d.called for d in done)


class CommitProcessStopTests(TestCase):
    """Stopping a commit process that does not end (its disk hangs)."""

    @inlineCallbacks
    def test_stop_kills_a_process_that_does_not_end(self) -> Any:
        """
        A process that ignores the end of its input (here: stopped with
        SIGSTOP) is killed after STOP_TIMEOUT, and stop() fires.
        """
        from twisted.internet.task import Clock

        clock = Clock()

        class ClockedReactor:
            """The real reactor's processes, a fake clock's timers."""

            def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
                return reactor.spawnProcess(*args, **kwargs)

            def callLater(self, *args: Any, **kwargs: Any) -> Any:
                return clock.callLater(*args, **kwargs)

        committer_process = CommitProcess(ClockedReactor(), lambda f: Deferred())
        committer_process.start()
        assert committer_process.transport is not None
        pid = committer_process.transport.pid
        os.kill(pid, signal.SIGSTOP)
        stopped = committer_process.stop()
        self.assertFalse(stopped.called)
        clock.advance(CommitProcess.STOP_TIMEOUT)
        yield stopped
        self.assertFalse(committer_process.alive)

