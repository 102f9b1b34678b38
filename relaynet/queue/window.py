# -*- test-case-name: tests.test_window -*-
"""
Exactly once between relaynet hops: the window of transfers a node accepted
from relaynet upstreams.

A transfer can arrive twice: the upstream crashed after our C{250} and before
it recorded the delivery (or our C{250} never reached it), and it sends the
message again after its restart. Between two relaynet nodes the upstream
names the transfer in C{MAIL FROM} (C{XTXN=node/queue-id}, offered by our
C{EHLO} as C{XTXN}); we keep, for a bounded time and count, what we accepted
under that name: the digest of the message bytes as received, the recipients
and our queue id. A transfer that names one we hold, with the same bytes, and
only recipients we already accepted for it, is answered C{250} with the
original queue id and not queued again.

Never dropped: a message merely like one we hold -- same bytes under another
transfer name (a different transaction), or a recipient we did not accept
for it. Mail without C{XTXN} (other MTAs) is at-least-once, as before.

Durability: a queued message carries its transfer name and digest in its
envelope (C{params.origin}, C{params.digest}, committed with the message
before the C{250}), so recovery rebuilds the window from the spool. When
the message leaves the queue (delivered onwards, bounced, deleted), its
record is appended to a journal in C{<queue>/window/} and fsynced I{before}
the queue file is unlinked; the journal is one file per hour, and files
older than the window are deleted. See C{docs/spool-format.md}.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaynet.queue.spool import (
    DIGEST_LENGTH, DIGEST_PLACEHOLDER, Envelope, fsync_dir, makedirs_durable, spool_error,
)

_HOUR = 3600


@frozen
class Transfer:
    """
    One transfer accepted from a relaynet upstream.

    @ivar origin: the upstream's name for it (C{node/queue-id}).
    @ivar digest: the first L{DIGEST_LENGTH} hex digits of the SHA-256 of
        the message bytes as received (before our C{Received:} field).
    @ivar recipients: the recipients we accepted for it.
    @ivar queue_id: our queue id for it.
    @ivar at: when it was noted (Unix seconds); it is forgotten once older
        than the window.
    """

    origin: str
    digest: str
    recipients: frozenset[str]
    queue_id: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin, "digest": self.digest,
            "recipients": sorted(self.recipients), "queue_id": self.queue_id, "at": self.at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Transfer":
        return cls(
            origin=str(data["origin"]), digest=str(data["digest"]),
            recipients=frozenset(str(r) for r in data["recipients"]),
            queue_id=str(data["queue_id"]), at=float(data["at"]),
        )

    @classmethod
    def of(cls, envelope: Envelope, at: float) -> "Transfer | None":
        """The transfer a queued message came by, or None (no C{XTXN}, or no digest)."""
        origin = envelope.params.get("origin")
        digest = envelope.params.get("digest")
        if not origin or not digest or digest == DIGEST_PLACEHOLDER:
            return None
        return cls(
            origin=origin, digest=digest,
            recipients=frozenset(r.address for r in envelope.recipients),
            queue_id=envelope.queue_id, at=at,
        )


@frozen
class Match:
    """
    What the window knows of a transfer being received again.

    @ivar covered: the recipients already accepted for it (same bytes).
    @ivar queue_id: our queue id of the (latest) transfer that covered them.
    """

    covered: frozenset[str]
    queue_id: str | None

    def all(self, recipients: Iterable[str]) -> bool:
        """Every one of C{recipients} was already accepted."""
        return self.queue_id is not None and set(recipients) <= self.covered


@frozen
class PeerAnswer:
    """
    What the other workers of a node said of a transfer made again
    (C{XTXNAGAIN}) that the worker receiving it does not hold.

    @ivar queue_id: the queue id under which one of them accepted it for
        every recipient, or C{None}.
    @ivar unsure: the workers (shards) that could not tell: still recovering
        their queue, or not answering. Without a queue id, the transfer may
        have been accepted by one of them: it must wait, not be queued again.
    """

    queue_id: str | None = None
    unsure: tuple[int, ...] = ()


class TransferWindow:
    """
    The transfers accepted from relaynet upstreams in the last C{span}
    seconds (at most C{limit} of them), in memory, with the journal of
    those that left the queue.

    @param directory: the journal directory (C{<queue>/window}), or None
        for a journal in memory (C{memory_journal}; tests).
    @param run_in_thread: runs a blocking journal write off the reactor.
    @param memory_journal: without a directory, the list that stands for the
        journal (it outlives the window, as a file outlives a process).

    @ivar complete: every transfer of the window is known. A node clears it
        while it recovers its queue (the recovered envelopes are noted as they
        are read): a retransmission not found meanwhile may be one of those
        not yet read, and cannot be told from a first transfer.
    """

    log = Logger()

    def __init__(
        self,
        directory: Path | None,
        span: float,
        limit: int,
        clock: Callable[[], float],
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        memory_journal: list[Transfer] | None = None,
    ) -> None:
        self.directory = directory
        self._memory = memory_journal
        self.span = span
        self.limit = limit
        self._clock = clock
        self._run = run_in_thread
        self._by_origin: dict[str, list[Transfer]] = {}
        self._order: deque[Transfer] = deque()
        self._waiting: list[tuple[Transfer, Deferred[None]]] = []
        self._busy = False
        self._durable_hours: set[int] = set()
        self.duplicates = 0
        self.complete = True

    def __len__(self) -> int:
        return len(self._order)

    # -- memory ------------------------------------------------------------

    def note(self, transfer: Transfer) -> None:
        """Remember C{transfer} (accepted now, recovered, or read from the journal)."""
        self._by_origin.setdefault(transfer.origin, []).append(transfer)
        self._order.append(transfer)
        self._expire()

    def note_envelope(self, envelope: Envelope) -> None:
        """Remember the transfer a queued message came by, if it came by one."""
        transfer = Transfer.of(envelope, self._clock())
        if transfer is not None:
            self.note(transfer)

    def _expire(self) -> None:
        oldest = self._clock() - self.span
        order = self._order
        while order and (order[0].at < oldest or len(order) > self.limit):
            old = order.popleft()
            same = self._by_origin.get(old.origin)
            if same is not None:
                try:
                    same.remove(old)
                except ValueError:
                    pass
                if not same:
                    del self._by_origin[old.origin]

    def holds(self, queue_id: str, origin: str) -> bool:
        """The window has the transfer C{origin} as our C{queue_id}."""
        return any(t.queue_id == queue_id for t in self._by_origin.get(origin, ()))

    def match(self, origin: str, digest: str) -> Match:
        """What was already accepted under the transfer name C{origin} with these bytes."""
        self._expire()
        covered: set[str] = set()
        queue_id = None
        for t in self._by_origin.get(origin, ()):
            if t.digest == digest:
                covered |= t.recipients
                queue_id = t.queue_id
        return Match(frozenset(covered), queue_id)

    # -- journal -----------------------------------------------------------

    def retire(self, envelope: Envelope) -> Deferred[None]:
        """
        The message is about to leave the queue: make its transfer record
        durable in the journal first. Fires at once for a message that came
        by no transfer, or when the window has no journal.
        """
        transfer = Transfer.of(envelope, self._clock())
        if transfer is None or not self.holds(envelope.queue_id, transfer.origin):
            # Never acknowledged as this transfer (cut-through refused it):
            # nothing to remember, a retransmission must be queued.
            return succeed(None)
        if self.directory is None or self._run is None:
            if self._memory is not None:
                self._memory.append(transfer)
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((transfer, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._busy = False
            return
        self._busy = True
        assert self._run is not None
        lines = b"".join(
            json.dumps(t.to_json(), separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
            for t, _ in batch
        )
        hour = int(batch[-1][0].at // _HOUR)

        def done(result: object) -> None:
            self._next()
            error = result.value if isinstance(result, Failure) else None
            for _, d in batch:
                if error is None:
                    d.callback(None)
                else:
                    d.errback(spool_error(error))

        self._run(lambda: self._append(hour, lines)).addBoth(done)

    def _append(self, hour: int, lines: bytes) -> None:
        """Append C{lines} to the hour's journal file and fsync it (worker thread)."""
        assert self.directory is not None
        path = self.directory / f"{hour}.jsonl"
        # The first append of this process to an hour's file fsyncs the
        # directory even if the file exists: a run killed after creating it
        # may not have made its name durable.
        created = hour not in self._durable_hours
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if created and os.fstat(fd).st_size:
                # A crash may have torn the file's last line: start ours on a
                # line of its own, or the first record would be glued to it
                # and lost at load (an empty line is skipped there).
                lines = b"\n" + lines
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.directory)
            self._durable_hours.add(hour)
            self._prune(hour)

    def _prune(self, hour: int) -> None:
        """Delete journal files wholly older than the window (worker thread, or start)."""
        assert self.directory is not None
        first = int((hour * _HOUR - self.span) // _HOUR)
        for p in self.directory.iterdir():
            stem = p.name.removesuffix(".jsonl")
            if stem.isdigit() and int(stem) < first:
                try:
                    p.unlink()
                except OSError:
                    pass

    def load(self) -> int:
        """
        Create the journal directory and read the records still in the
        window (blocking; at start, before the spool is recovered). A torn
        last line (a crash during an append) is skipped.

        @return: the records read.
        """
        now = self._clock()
        read: list[Transfer] = []
        if self.directory is None:
            read = [t for t in self._memory or () if t.at >= now - self.span]
        else:
            makedirs_durable(self.directory)
            self._prune(int(now // _HOUR))
            for p in sorted(self.directory.iterdir()):
                if not p.name.endswith(".jsonl"):
                    continue
                for line in p.read_bytes().splitlines():
                    try:
                        t = Transfer.from_json(json.loads(line))
                    except (ValueError, TypeError, KeyError, AttributeError):
                        continue
                    if t.at >= now - self.span:
                        read.append(t)
        read.sort(key=lambda t: t.at)
        for t in read[-self.limit:] if self.limit else ():
            self.note(t)
        return len(read)


__all__ = ["DIGEST_LENGTH", "DIGEST_PLACEHOLDER", "Match", "PeerAnswer", "Transfer", "TransferWindow"]
