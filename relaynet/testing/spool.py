# -*- test-case-name: tests.test_spool -*-
"""
L{MemorySpool}: the queue of L{relaynet.queue.spool.Spool} without a disk, a
thread or a reactor, for tests and in-process networks of nodes.

It keeps the Maildir spool's contract (C{tests/test_spool.py} runs the same
contract tests against both) and what a file would keep: the envelope and the
recorded state are stored as the JSON text the queue and state files hold,
taken when L{MemorySpool.begin} and L{MemorySpool.record} are called, so a
later change to an entry in memory is not "on disk" until it is recorded
again, and an envelope that would not serialise fails here as it does there.

Completion: by default every operation (a commit, a record, a removal) takes
effect, and its Deferred fires, before the call returns. With
C{immediate=False} operations wait in a queue, in order, until the test runs
them (L{MemorySpool.run_one}, L{MemorySpool.run_all}): nothing is durable and
no Deferred fires until then, like a commit waiting for its fsync. The test
can then L{crash<MemorySpool.crash>} the spool and "restart" a node over it
(L{MemorySpool.prepare}, L{MemorySpool.recover}) to see only what was made
durable.
"""

from __future__ import annotations

import io
import json
from collections import deque
from typing import Callable, Iterator, TypeVar

from attrs import define, evolve, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from relaynet.queue.spool import (
    CONTENT_PLACEHOLDER,
    DIGEST_PLACEHOLDER,
    BoundedReader,
    Envelope,
    QueueEntry,
    QueueIds,
    QueueState,
    SpoolError,
    SpoolWriter,
    apply_due_hint,
)

__all__ = ["MemoryQueueEntry", "MemorySpool", "MemorySpoolWriter"]

_T = TypeVar("_T")

_START = 1_750_000_000.0
"""The default clock's fixed time (the same as L{relaynet.testing.EPOCH})."""


def _json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)


@define
class MemoryQueueEntry(QueueEntry):
    """
    A L{QueueEntry} of a L{MemorySpool}: the message is held in memory.

    Its C{path} (C{memory:ID}) names no file; code that opens C{path} itself
    instead of calling L{open_message} cannot read it.

    @ivar data: the stored message, our C{Received:} header first.
    """

    data: bytes = field(default=b"", repr=False, kw_only=True)

    def open_message(self, skip: int = 0) -> BoundedReader:
        """
        Read the stored message, from C{skip} bytes after its first byte,
        bounded to its recorded size.
        """
        f = io.BytesIO(self.data)
        f.seek(self.body_offset + skip)
        return BoundedReader(f, self.envelope.size - skip)


@define
class _Stored:
    """What a queue file and its state file would hold."""

    envelope_json: str
    size: int
    hops: int
    data: bytes
    state_json: str | None = None
    due_hint: float | None = None


class MemorySpoolWriter:
    """
    One message being received into a L{MemorySpool}; created by
    L{MemorySpool.begin}. The interface of L{SpoolWriter}: nothing is ever
    waiting to be written, so L{pending} stays 0 and L{drained} is never
    called.

    @ivar size: message bytes written so far.
    @ivar pending: always 0.
    @ivar drained: kept for the interface; never called.
    """

    FLUSH_AT = SpoolWriter.FLUSH_AT

    def __init__(self, spool: MemorySpool, envelope: Envelope, envelope_json: str) -> None:
        self.spool = spool
        self.envelope = envelope
        self._envelope_json = envelope_json
        self._chunks: list[bytes] = []
        self._closed: str | None = None
        self.size = 0
        self.pending = 0
        self.drained: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        """
        Append message bytes.

        @raise SpoolError: after a commit or an abort, or once the spool
            crashed or was prepared again.
        """
        if self._closed is not None:
            raise SpoolError(f"write {self._closed}")
        self._chunks.append(data)
        self.size += len(data)

    def abort(self) -> None:
        """Drop the message: nothing of it is kept."""
        if self._closed is None:
            self._close("after commit or abort")

    def commit(self, hops: int, digest: str | None = None, content: str | None = None) -> Deferred[QueueEntry]:
        """
        Make the message durable.

        @param hops: C{Received:} fields in the message, ours included.
        @param digest: fills the envelope's C{params.digest} placeholder, as
            L{SpoolWriter.commit} does; C{content} the C{params.content} one.
        @return: a Deferred firing with a L{MemoryQueueEntry} once the message
            is durable (at once, or when the test runs the spool's queue);
            failing with L{SpoolError} if the writer is closed or the spool
            is L{broken<MemorySpool.broken>}, after which nothing is kept.
        """
        if self._closed is not None:
            return fail(SpoolError(f"commit {self._closed}"))
        data = b"".join(self._chunks)
        self._close("after commit or abort")
        envelope, envelope_json = self.envelope, self._envelope_json
        for key, value, placeholder in (("digest", digest, DIGEST_PLACEHOLDER),
                                        ("content", content, CONTENT_PLACEHOLDER)):
            if value is None or envelope.params.get(key) != placeholder:
                continue
            if len(value) != len(placeholder):
                return fail(SpoolError(f"params.{key} takes {len(placeholder)} characters"))
            envelope = evolve(envelope, params={**envelope.params, key: value})
            envelope_json = envelope_json.replace(f'"{key}":"{placeholder}"', f'"{key}":"{value}"', 1)
        return self.spool._commit(envelope, envelope_json, data, hops)

    def _close(self, why: str) -> None:
        self._closed = why
        self._chunks = []
        self.spool._writers.discard(self)


class MemorySpool:
    """
    An in-memory spool with the public interface of
    L{relaynet.queue.spool.Spool}; see the module docstring for when its
    operations complete.

    @ivar immediate: operations take effect (and their Deferreds fire) before
        the call returns; if C{False}, they wait for L{run_one}/L{run_all}.
    @ivar broken: if set, a reason: commits, records and removals run while
        it is set fail with L{SpoolError} (a full or failing disk), and
        change nothing.
    """

    def __init__(
        self,
        clock: Callable[[], float] = lambda: _START,
        immediate: bool = True,
        suffix: str = "0000",
    ) -> None:
        """
        @param clock: the time queue ids are made from (a fixed time by
            default; ids stay unique and ordered whatever it returns).
        @param immediate: see L{immediate}.
        @param suffix: appended to every queue id (a Maildir spool appends
            four random hex digits); alphanumeric. Give each node of a test
            network its own to keep their ids apart.
        """
        if not suffix.isalnum():
            raise ValueError(f"queue id suffix must be alphanumeric: {suffix!r}")
        self.immediate = immediate
        self.broken: str | None = None
        self._ids = QueueIds(clock, suffix)
        self._clock = clock
        self._committed: dict[str, _Stored] = {}
        self._writers: set[MemorySpoolWriter] = set()
        self._queue: deque[Callable[[], None]] = deque()
        self._observers: list[Callable[[int], None]] = []
        self._commits = 0

    # -- the interface of Spool --------------------------------------------

    def new_id(self) -> str:
        """
        A fresh queue id, rendered as a Maildir spool renders it (base 30 of
        the clock's microseconds times 1000 plus a counter): unique in this
        spool, ordered (as strings too) and safe as a file name.
        """
        return self._ids.next()

    def prepare(self) -> None:
        """
        Start (again) over what is durable: close every writer not committed
        yet, as a Maildir spool empties its C{tmp/}.
        """
        for writer in list(self._writers):
            writer._close("after the spool was prepared again")

    def recover(self) -> Iterator[MemoryQueueEntry]:
        """
        Yield every committed message not removed, in queue id order, with
        its last recorded state (a fresh copy each time: changing a recovered
        entry changes nothing stored until it is recorded).
        """
        now = self._clock()
        for queue_id in sorted(self._committed):
            stored = self._committed[queue_id]
            entry = self._entry(queue_id, stored)
            if stored.due_hint is not None:
                apply_due_hint(entry.state, stored.due_hint, now)
            yield entry

    def begin(self, envelope: Envelope) -> MemorySpoolWriter:
        """
        Start receiving a message.

        @raise TypeError: the envelope does not serialise to JSON.
        """
        writer = MemorySpoolWriter(self, envelope, _json(envelope.to_json()))
        self._writers.add(writer)
        return writer

    def record(self, entry: QueueEntry) -> Deferred[None]:
        """
        Durably replace the recorded state of C{entry} with C{entry.state} as
        it is now (later changes to it are not recorded).

        @return: a Deferred firing once the state is durable; failing with
            L{SpoolError} if the spool is L{broken}.
        """
        entry.state_written = True
        text = _json(entry.state.to_json())
        queue_id = entry.queue_id

        def write() -> None:
            self._check()
            stored = self._committed.get(queue_id)
            if stored is not None:  # A Maildir spool drops orphan state files at start.
                stored.state_json = text

        return self._submit(write)

    def hint_due(self, entry: QueueEntry, when: float) -> None:
        """
        Keep C{when} as C{entry}'s due-time hint for L{recover}, as a queue
        file's modification time (L{relaynet.queue.spool.Spool.hint_due}):
        at once, never failing (a broken spool drops it).
        """
        stored = self._committed.get(entry.queue_id)
        if stored is not None and self.broken is None:
            stored.due_hint = when

    def flush_hints(self) -> Deferred[None]:
        """Hints are kept at once here: nothing to write."""
        return succeed(None)

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        """
        Retire C{entry}: L{recover} no longer yields it.

        @return: a Deferred firing once it is gone; failing with L{SpoolError}
            if the spool is L{broken}.
        """
        queue_id = entry.queue_id

        def unlink() -> None:
            self._check()
            self._committed.pop(queue_id, None)

        return self._submit(unlink)

    def count(self) -> int:
        """Committed messages not removed."""
        return len(self._committed)

    def observe_commits(self, observer: Callable[[int], None]) -> None:
        """
        Call C{observer} with the batch size of every group commit: here
        every commit is a batch of one.
        """
        self._observers.append(observer)

    @property
    def group_commit_stats(self) -> tuple[int, int]:
        """C{(flushes, messages committed by them)}: both the number of commits."""
        return self._commits, self._commits

    # -- for tests ----------------------------------------------------------

    @property
    def pending(self) -> int:
        """Operations waiting for L{run_one} (always 0 when L{immediate})."""
        return len(self._queue)

    def run_one(self) -> bool:
        """
        Complete the oldest waiting operation and fire its Deferred.

        @return: C{False} if none was waiting.
        """
        if not self._queue:
            return False
        self._queue.popleft()()
        return True

    def run_all(self) -> int:
        """
        Complete waiting operations in order, including those queued
        meanwhile (by callbacks), until none is left.

        @return: how many were completed.
        """
        n = 0
        while self.run_one():
            n += 1
        return n

    def crash(self) -> None:
        """
        Lose what a crash would lose: operations not completed yet (their
        Deferreds never fire) and messages not committed (their writers
        refuse further use). What is durable stays; a node started over this
        spool (L{prepare}, then L{recover}) sees exactly that. The objects of
        the crashed node must not be used afterwards.
        """
        self._queue.clear()
        for writer in list(self._writers):
            writer._close("after the spool crashed")

    # -- inside --------------------------------------------------------------

    def _check(self) -> None:
        if self.broken is not None:
            raise SpoolError(self.broken)

    def _entry(self, queue_id: str, stored: _Stored) -> MemoryQueueEntry:
        envelope = Envelope.from_json(json.loads(stored.envelope_json), size=stored.size, hops=stored.hops)
        state = QueueState() if stored.state_json is None else QueueState.from_json(json.loads(stored.state_json))
        return MemoryQueueEntry(
            envelope=envelope,
            state=state,
            path=f"memory:{queue_id}",
            body_offset=0,
            state_written=stored.state_json is not None,
            recovered=True,
            data=stored.data,
        )

    def _commit(self, envelope: Envelope, envelope_json: str, data: bytes, hops: int) -> Deferred[QueueEntry]:
        queue_id = envelope.queue_id

        def durable() -> QueueEntry:
            self._check()
            if queue_id in self._committed:
                raise SpoolError(f"queue id {queue_id} is already committed")
            self._committed[queue_id] = _Stored(envelope_json, len(data), hops, data)
            self._commits += 1
            for observer in self._observers:
                observer(1)
            return MemoryQueueEntry(
                envelope=evolve(envelope, size=len(data), hops=hops),
                state=QueueState(),
                path=f"memory:{queue_id}",
                body_offset=0,
                state_written=False,
                data=data,
            )

        return self._submit(durable)

    def _submit(self, operation: Callable[[], _T]) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()

        def run() -> None:
            try:
                result = operation()
            except Exception:
                d.errback(Failure())
            else:
                d.callback(result)

        if self.immediate:
            run()
        else:
            self._queue.append(run)
        return d
