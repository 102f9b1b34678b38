# -*- test-case-name: tests.test_spool -*-
"""
The on-disk queue: a maildir with JSON envelopes and a durable commit.

Layout under the queue directory (see C{docs/spool-format.md}):

    tmp/ID        a message being received (never trusted after a crash)
    new/ID        a committed queue file: header record, envelope, message
    state/ID      per-recipient outcomes, replaced atomically after attempts
    tmp/ID.state  a state file being written

A queue file is::

    RELAYNET-QUEUE 1 <envelope length:10> <message size:12> <hops:4>\\n
    <envelope JSON, one line>\\n
    <message bytes exactly as stored: Received: first, CRLF line ends>

The header record has a fixed width so the final size and hop count can be
written in place once DATA ends (Postfix does the same with its size record).

Commit: the message gathers in memory (in chunks written by worker threads
once it grows large); at the final dot it joins a commit batch
(L{CommitBatch}: the messages whose final dot came while the previous batch
was out), whose job creates or completes each C{tmp/ID}, fills in the
header, fsyncs the file and renames it into C{new/}, then fsyncs C{new/}
once for the batch. Small messages are committed by the node's commit
process (L{CommitProcess}, L{relaynet.queue.committer}), the others (and
all, without one) by commit threads. No file operation runs on the reactor
thread. Only then does the returned Deferred fire (and the intake say 250).
"""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
import shutil
import struct
import sys
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from attrs import Converter, define, evolve, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.process import ProcessWriter
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relaynet.queue import committer as committer_module
from relaynet.queue.committer import write_all
from relaynet.queue.states import FINAL_STATUSES as FINAL_STATUSES, RecipientStatus

FORMAT_VERSION = 1
_MAGIC = b"RELAYNET-QUEUE"
HEADER_LEN = len(b"%s %d %010d %012d %04d\n" % (_MAGIC, FORMAT_VERSION, 0, 0, 0))
_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"

DIGEST_LENGTH = 32
"""Hex digits of the SHA-256 message digest kept per transfer (128 bits)."""

DIGEST_PLACEHOLDER = "-" * DIGEST_LENGTH
"""
What an envelope's C{params.digest} holds until the final dot: it has the
digest's width, so L{SpoolWriter.commit} fills it in place, as it does the
header record (see L{relaynet.queue.window}).
"""
CONTENT_PLACEHOLDER = "--"
"""
What C{params.content} holds until the final dot: two characters, C{7} or
C{8}, for the header section and the whole message (8-bit octets seen or
not); relaynet's SMTP client decides SMTPUTF8 and 8BITMIME by them.
"""
_STAMP_PLACEHOLDERS = {"digest": DIGEST_PLACEHOLDER, "content": CONTENT_PLACEHOLDER}



class SpoolError(Exception):
    """The spool could not store or read a message (a transient, 4xx failure)."""


class CorruptQueueFile(SpoolError):
    """A file in C{new/} does not parse as a queue file."""


class SpoolFull(SpoolError):
    """
    The spool's file system is full (C{ENOSPC}) or its quota is used up
    (C{EDQUOT}): a transient failure that ends by itself once space returns
    (the intake says C{452 4.3.1 Insufficient system storage}).
    """


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def spool_error(error: BaseException) -> SpoolError:
    """
    The L{SpoolError} for an error of a disk operation: L{SpoolFull} for
    C{ENOSPC} or C{EDQUOT}, C{error} itself if it is a L{SpoolError}.

    @param error: what the operation raised.
    """
    if isinstance(error, SpoolError):
        return error
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return SpoolFull(str(error))
    return SpoolError(str(error))


@frozen
class Recipient:
    """
    One envelope recipient.

    @ivar address: the mailbox, C{local@domain}.
    @ivar route: where it goes (C{local}, or a relay route's name).
    @ivar notify: RFC 3461 NOTIFY values, or C{None}.
    @ivar orcpt: RFC 3461 ORCPT, or C{None}.
    """

    address: str
    route: str = "local"
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "route": self.route,
            "notify": list(self.notify) if self.notify is not None else None,
            "orcpt": self.orcpt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipient":
        notify = data.get("notify")
        return cls(
            address=_intern(data["address"]),
            route=_intern(data.get("route", "local")),
            notify=tuple(notify) if notify is not None else None,
            orcpt=data.get("orcpt"),
        )


@frozen
class Envelope:
    """
    Everything about a message but its bytes.

    @ivar queue_id: the spool id, also named in the 250 reply.
    @ivar sender: the reverse path (C{""} for the null sender).
    @ivar recipients: accepted recipients, in RCPT order.
    @ivar arrival: arrival time (Unix seconds).
    @ivar params: ESMTP MAIL parameters (C{size}, C{body}, C{smtputf8},
        C{ret}, C{envid}).
    @ivar client: who sent it (C{helo}, C{ip}, C{port}, C{protocol}, ...).
    @ivar node: the name of the node that accepted it.
    @ivar size: message size in octets (as stored), filled at commit.
    @ivar hops: C{Received:} fields in the message (ours included).
    @ivar client_port: the client's port when it is kept apart from the
        rest of C{client} (as a queued message keeps it, see L{resident}),
        else C{None}; L{client} has it either way.
    """

    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    arrival: float
    params: dict[str, Any] = field(factory=dict)
    _client: dict[str, Any] = field(factory=dict, alias="client")
    node: str = ""
    size: int = 0
    hops: int = 0
    client_port: int | None = None

    @property
    def client(self) -> dict[str, Any]:
        """Who sent it: C{helo}, C{ip}, C{port}, C{protocol}, C{listener}, ..."""
        port = self.client_port
        if port is None:
            return self._client
        return {**self._client, "port": port}

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": [r.to_json() for r in self.recipients],
            "arrival": self.arrival,
            "params": self.params,
            "client": self.client,
            "node": self.node,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], size: int = 0, hops: int = 0) -> "Envelope":
        if data.get("version") != FORMAT_VERSION:
            raise CorruptQueueFile(f"unsupported envelope version {data.get('version')!r}")
        return cls(
            queue_id=data["queue_id"],
            sender=_intern(data["sender"]),
            recipients=tuple(Recipient.from_json(r) for r in data["recipients"]),
            arrival=float(data["arrival"]),
            params=_compact(data.get("params")),
            **_compact_client(data.get("client")),
            node=_intern(data.get("node", "")),
            size=size,
            hops=hops,
        )


def _intern(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


_SHARED_MAX = 4096
_shared: dict[tuple[Any, ...], dict[str, Any]] = {}


def _compact(data: dict[str, Any] | None) -> dict[str, Any]:
    """
    A params or client mapping as kept in memory for a queued message: keys
    and string values shared between messages, C{None} values left out (the
    code reads them with C{.get}). A queue of 100,000 messages then holds
    one copy of C{"listener"} or C{"127.0.0.1"}, not 100,000.

    Equal mappings are one dict: the params of most messages are alike, and
    so are the client mappings of one client (its port is kept apart: see
    L{_compact_client}). Recovery reads the queue in arrival order, so a
    cache of the last few thousand distinct mappings finds them. The in-memory params
    and client of an envelope are therefore never changed in place (nothing
    does: L{SpoolWriter.commit} evolves a new envelope with a new dict).
    """
    if not data:
        return _EMPTY
    out = {
        sys.intern(k): tuple(map(_intern, v)) if type(v) is list else _intern(v)
        for k, v in data.items()
        if v is not None
    }
    try:
        # With the types: 1, 1.0 and True are equal keys but not equal values.
        key = (*out.items(), *map(type, out.values()))
        shared = _shared.get(key)
    except TypeError:  # an unhashable value (a nested object): kept as it is
        return out
    if shared is not None:
        return shared
    if len(_shared) >= _SHARED_MAX:
        _shared.clear()
    _shared[key] = out
    return out


_EMPTY: dict[str, Any] = {}


def _compact_client(data: dict[str, Any] | None) -> dict[str, Any]:
    """
    The C{client} and C{client_port} arguments of a queued message's
    L{Envelope}: the port kept apart, so that the messages of one client
    share one mapping even when each came on a connection of its own (as
    C{smtp-source} and many senders do): a mapping per message was ~200
    bytes of a queued message's ~1.6 KB.
    """
    port = data.get("port") if data else None
    if type(port) is not int:
        return {"client": _compact(data)}
    assert data is not None
    rest = dict(data)
    del rest["port"]
    return {"client": _compact(rest), "client_port": port}


def resident(envelope: Envelope, size: int, hops: int) -> Envelope:
    """
    C{envelope} as a queued message keeps it in memory, with its final
    C{size} and C{hops}: as L{Envelope.from_json} reads it back at
    recovery (strings shared, C{None} values left out of C{params} and
    C{client}, lists made tuples), so a message costs the same whether it
    was just received or recovered.
    """
    return evolve(
        envelope,
        sender=_intern(envelope.sender),
        recipients=tuple(
            Recipient(_intern(r.address), _intern(r.route), r.notify, r.orcpt) for r in envelope.recipients
        ),
        params=_compact(envelope.params),
        **_compact_client(envelope.client),
        node=_intern(envelope.node),
        size=size,
        hops=hops,
    )


@define
class RecipientState:
    """
    The recorded outcome of delivery attempts for one recipient.

    @ivar status: see L{RecipientStatus}.
    @ivar remote: the next hop of the last attempt, if any.
    """

    status: RecipientStatus = field(default=RecipientStatus.PENDING, converter=RecipientStatus)
    attempts: int = 0
    last_attempt: float | None = None
    dsn: str | None = None
    diagnostic: str | None = None
    remote: str | None = None

    @property
    def final(self) -> bool:
        """Nothing more is to be done for this recipient."""
        return self.status.final


@define
class QueueState:
    """Per-recipient outcomes of one queued message, plus scheduling."""

    recipients: dict[str, RecipientState] = field(factory=dict)
    next_attempt: float | None = None
    held: bool = False
    delay_warned: bool = False
    #: Delivery status notifications owed for final recipients: address ->
    #: the report (C{RecipientReport}'s fields) of a notice that could not
    #: be queued (a full disk). The message stays queued until they are.
    owed_notices: dict[str, dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "version": FORMAT_VERSION,
            "next_attempt": self.next_attempt,
            "held": self.held,
            "delay_warned": self.delay_warned,
            "recipients": {
                a: {
                    "status": s.status, "attempts": s.attempts,
                    "last_attempt": s.last_attempt, "dsn": s.dsn, "diagnostic": s.diagnostic,
                    "remote": s.remote,
                }
                for a, s in self.recipients.items()
            },
        }
        if self.owed_notices:
            data["owed_notices"] = self.owed_notices
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QueueState":
        owed = data.get("owed_notices")
        return cls(
            recipients={a: RecipientState(**s) for a, s in data.get("recipients", {}).items()},
            next_attempt=data.get("next_attempt"),
            held=bool(data.get("held", False)),
            delay_warned=bool(data.get("delay_warned", False)),
            owed_notices={str(a): dict(r) for a, r in owed.items()} if owed else None,
        )


def _where(path: str | os.PathLike[str], entry: Any) -> str:
    """
    What a L{QueueEntry} keeps of its C{path}: the directory (shared by
    every entry in it, ending with a separator) when the file is named by
    the queue id, as queue files are, else the whole path.
    """
    path = os.fspath(path)
    directory, sep, name = path.rpartition(os.sep)
    if sep and name == entry.envelope.queue_id:
        return sys.intern(directory + sep)
    return path


@define
class QueueEntry:
    """
    A committed message: its envelope, recorded state and file.

    @ivar path: the queue file, a C{str} (given as a C{str} or a C{Path}).
        An entry keeps only its directory, shared by all, when the file is
        named by the queue id: a path per queued message costs ~110 bytes,
        a tenth of a queued message's memory.
    @ivar recovered: it may have been delivered without our knowing: read
        back from the spool at start (a crash may have come after a delivery
        and before its outcome was recorded), or an attempt lost its
        connection after sending the whole message, before the reply.
    """

    envelope: Envelope
    state: QueueState
    # mypy's attrs plugin knows no Converter(takes_self=True): path's type is Any to it.
    _where: str = field(alias="path", converter=Converter(_where, takes_self=True))  # type: ignore[misc]
    body_offset: int
    state_written: bool = True
    recovered: bool = False
    # The message bytes of a message just committed, kept for its first
    # attempt (Spool.FRESH_BUDGET), so that it is sent without reading the
    # queue file back on the reactor thread; Spool.drop_fresh lets go.
    fresh: bytes | None = field(default=None, eq=False, repr=False)

    @property
    def path(self) -> str:
        """The queue file."""
        where = self._where
        return where + self.envelope.queue_id if where.endswith(os.sep) else where

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    def pending_recipients(self) -> list[Recipient]:
        """Recipients that have no final outcome recorded yet."""
        out = []
        for r in self.envelope.recipients:
            st = self.state.recipients.get(r.address)
            if st is None or not st.final:
                out.append(r)
        return out

    def open_message(self, skip: int = 0) -> BoundedReader:
        """
        Open the stored message, positioned C{skip} bytes after its first byte,
        bounded to its recorded size (the bytes in memory if the entry still
        has them: no file I/O).
        """
        fresh = self.fresh
        if fresh is not None:
            view = io.BytesIO(fresh)
            view.seek(skip)
            return BoundedReader(view, self.envelope.size - skip)
        f = open(self.path, "rb")
        f.seek(self.body_offset + skip)
        return BoundedReader(f, self.envelope.size - skip)


class BoundedReader:
    """A file view that returns at most C{size} more bytes, then EOF."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int | None = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    @property
    def remaining(self) -> int:
        """Bytes still to be read."""
        return max(self._left, 0)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "BoundedReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _header(env_len: int, size: int, hops: int) -> bytes:
    return b"%s %d %010d %012d %04d\n" % (_MAGIC, FORMAT_VERSION, env_len, size, min(hops, 9999))


def read_queue_file(path: str | os.PathLike[str]) -> tuple[Envelope, int]:
    """
    Parse the header record and envelope of a queue file (blocking).

    One C{open}, one C{read} of the first 4 KiB (the header record and, but
    for a long recipient list, the envelope; more is read if it is longer)
    and one C{close}: recovery reads every queue file this way (with an
    C{fstat} too: L{read_queue_file_and_mtime}).

    @return: the envelope and the offset of the message's first byte.
    @raise CorruptQueueFile: the file is not a complete queue file.
    """
    envelope, offset, _ = read_queue_file_and_mtime(path)
    return envelope, offset


def read_queue_file_and_mtime(path: str | os.PathLike[str]) -> tuple[Envelope, int, float]:
    """
    L{read_queue_file}, and the file's modification time (a due-time hint
    if it is in the future: L{Spool.hint_due}).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mtime = os.fstat(fd).st_mtime
        data = os.read(fd, _FIRST_READ)
        head = data[:HEADER_LEN]
        parts = head.split()
        if len(head) != HEADER_LEN or len(parts) != 5 or parts[0] != _MAGIC:
            raise CorruptQueueFile(f"{path}: bad header record")
        try:
            env_len, size, hops = int(parts[2]), int(parts[3]), int(parts[4])
        except ValueError:
            raise CorruptQueueFile(f"{path}: bad header record") from None
        end = HEADER_LEN + env_len
        while len(data) < end:
            more = os.read(fd, end - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    raw = data[HEADER_LEN:end]
    if len(raw) != env_len:
        raise CorruptQueueFile(f"{path}: truncated envelope")
    try:
        loaded = json.loads(raw)
    except ValueError as e:
        raise CorruptQueueFile(f"{path}: envelope is not JSON: {e}") from None
    try:
        envelope = Envelope.from_json(loaded, size=size, hops=hops)
    except CorruptQueueFile:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptQueueFile(f"{path}: not an envelope: {e!r}") from None
    return envelope, HEADER_LEN + env_len + 1, mtime


DUE_HINT_LIMIT = 2 * 3600.0
"""
A due-time hint further ahead than this at recovery is ignored (a clock set
back would make every queue file's time look like one): about twice the
default C{[queue] maximal_backoff}.
"""


def apply_due_hint(state: QueueState, hint: float, now: float) -> None:
    """
    A recovered message's due-time hint (L{Spool.hint_due}): if it is
    ahead of C{now} (but not beyond L{DUE_HINT_LIMIT}) and the recorded
    state makes the message due sooner, it waits for the hint. Held
    messages stay held; a hint never makes a message due sooner.
    """
    if state.held or not now < hint <= now + DUE_HINT_LIMIT:
        return
    if state.next_attempt is None or state.next_attempt < hint:
        state.next_attempt = hint


class DueHints:
    """
    Due-time hints written as queue files' modification times
    (C{os.utime}) in a worker thread, without an C{fsync}, gathered for
    L{DELAY} seconds into one job: a next hop that is down defers each new
    message (a thousand a second at full rate), and a job per few hints
    cost the accept rate a tenth in its hand-offs. A hint that cannot be
    written (the message was removed meanwhile), or that a crash loses,
    only makes its message due sooner after a restart.
    """

    DELAY = 1.0
    """Seconds hints gather before they are written."""

    def __init__(
        self, run: Callable[[Callable[[], Any]], Deferred[Any]],
        call_later: Callable[[float, Callable[[], Any]], Any],
    ) -> None:
        """
        @param run: run a function in a worker thread.
        @param call_later: the reactor's C{callLater}.
        """
        self._run = run
        self._call_later = call_later
        self._queued: list[tuple[str, float]] = []
        self._timer: Any = None
        self._job: Deferred[None] | None = None
        self.written = 0

    def submit(self, path: str, when: float) -> None:
        self._queued.append((path, when))
        if self._timer is None and self._job is None:
            self._timer = self._call_later(self.DELAY, self._start)

    def flush(self) -> Deferred[None]:
        """Write the hints gathered so far now (at stop): fires once they are."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._job is not None:
            return self._job.addCallback(lambda _: self.flush())
        if not self._queued:
            return succeed(None)
        return self._start()

    def _start(self) -> Deferred[None]:
        self._timer = None
        batch, self._queued = self._queued, []

        def job() -> int:
            written = 0
            for path, when in batch:
                try:
                    os.utime(path, (when, when))
                    written += 1
                except OSError:
                    pass
            return written

        def done(result: Any) -> None:
            if isinstance(result, int):
                self.written += result
            self._job = None
            if self._queued and self._timer is None:
                self._timer = self._call_later(self.DELAY, self._start)

        job_done: Deferred[None] = self._run(job).addBoth(done)
        self._job = job_done
        return job_done


_FIRST_READ = 4096


def makedirs_durable(path: Path, mode: int = 0o700) -> list[Path]:
    """
    Create C{path} and missing parents like C{mkdir -p}, fsyncing the parent of
    each directory created, so the new directory survives a power loss. The
    parents of those that existed are fsynced too (errors ignored): a run
    killed between a mkdir and its parent's fsync leaves a directory whose
    entry a power loss can still undo, with everything fsynced into it since.

    @return: the directories created, outermost first.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            continue
        fsync_dir(d.parent)
        created.append(d)
    made = {d.absolute() for d in created}
    for d in [path.absolute(), *path.absolute().parents]:
        if d.parent != d and d not in made:
            try:
                fsync_dir(d.parent)
            except OSError:
                pass
    return created


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, making the renames and unlinks in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """
    Group commit of one directory's fsync, for worker threads: L{sync}
    blocks until a flush that started after the call has finished, and one
    flush serves every caller that arrived while the previous one ran. Many
    sessions finishing DATA together therefore share flushes, and each commit
    costs one thread hop, not two.

    @ivar flushes: flushes done.
    @ivar synced: callers served.
    @ivar observers: called (in the flushing worker thread) with each batch size.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False
        self._counted = 0
        self._counted_done = 0
        self._failures: list[tuple[int, int, OSError]] = []
        self.flushes = 0
        self.synced = 0
        self.observers: list[Callable[[int], None]] = []

    def sync(self, count: int = 1) -> None:
        """
        Make every rename or unlink done in the directory before this call
        durable (blocking; call from a worker thread).

        @param count: the messages this call makes durable (a caller may
            speak for several), for L{synced} and the observers.
        @raise OSError: the flush that covered this call failed.
        """
        with self._cond:
            self._requested += 1
            self._counted += count
            mine = self._requested
            while True:
                if self._done >= mine:
                    for lo, hi, err in self._failures:
                        if lo < mine <= hi:
                            raise err
                    return
                if not self._running:
                    self._running = True
                    low, cover = self._done, self._requested
                    counted = self._counted
                    break
                self._cond.wait()
        error: OSError | None = None
        try:
            fsync_dir(self._path)
        except OSError as e:
            error = e
        with self._cond:
            self._running = False
            self._done = cover
            batch = counted - self._counted_done
            self._counted_done = counted
            self.flushes += 1
            self.synced += batch
            if error is not None:
                self._failures = (self._failures + [(low, cover, error)])[-16:]
            self._cond.notify_all()
        for observer in self.observers:
            observer(batch)
        if error is not None:
            raise error


def append_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """
    Append C{data} to the file C{path} and fsync it (and its directory when
    the append created the file), blocking: a worker thread's work.
    """
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def write_file_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """
    Replace the file C{path} with C{data} so that a crash leaves the old
    file or the new one, never a part (blocking: a worker thread's work): a
    temporary file in the same directory, written and fsynced, renamed over
    C{path}, and the directory fsynced. The directory is made if missing.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


class UnlinkBatch:
    """
    Unlink files many requests per job (in the commit process, or a worker
    thread): while one job runs, new requests gather for the next. Files
    already gone are fine.
    """

    def __init__(self, run: Callable[[list[str]], Deferred[list[OSError | None]]]) -> None:
        """
        @param run: unlink the paths: a Deferred firing with one result per
            path (L{None}: gone).
        """
        self._run = run
        self._queued: list[tuple[list[str], Deferred[None]]] = []
        self._busy = False

    def submit(self, paths: list[str]) -> Deferred[None]:
        """
        @return: a Deferred firing once every path is unlinked, or failing with
            L{SpoolError} naming the first that could not be.
        """
        d: Deferred[None] = Deferred()
        self._queued.append((paths, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._queued = self._queued, []
        if not batch:
            self._busy = False
            return
        self._busy = True

        def done(results: Any) -> None:
            self._next()
            at = 0
            for paths, d in batch:
                if isinstance(results, list):
                    error = next((e for e in results[at:at + len(paths)] if e is not None), None)
                else:
                    error = results.value
                at += len(paths)
                if error is None:
                    d.callback(None)
                else:
                    d.errback(SpoolError(str(error)))

        self._run([p for paths, _ in batch for p in paths]).addBoth(done)


class PendingCommit:
    """
    One message waiting in a L{CommitBatch}: its paths and bytes (for the
    commit process) and the same work as two functions (for a commit
    thread): C{durable} (file written and fsynced, renamed into C{new/}; on
    failure it cleans up and raises) and C{undo} (take the renamed file back
    out).
    """

    __slots__ = ("tmp", "new", "data", "durable", "undo", "done")

    def __init__(
        self, tmp: str, new: str, data: bytes | None,
        durable: Callable[[], None], undo: Callable[[], None],
    ) -> None:
        self.tmp = tmp
        self.new = new
        self.data = data
        self.durable = durable
        self.undo = undo
        self.done: Deferred[None] = Deferred()


class CommitBatch:
    """
    Commit messages many per job: while L{jobs} jobs run, the commits
    arriving gather for the next, so under load one hand-off (to a thread
    or to the commit process, and back to the reactor) serves a batch of
    messages, not one, while a lone message on an idle spool starts at once.
    A job makes each of its messages durable in C{new/}, then fsyncs C{new/}
    once for them all; if that fails, none of them is acknowledged.

    @ivar jobs: jobs at once.
    """

    def __init__(
        self, run: Callable[[list[PendingCommit]], Deferred[list[BaseException | None]]], jobs: int,
        max_bytes: int | None = None,
    ) -> None:
        """
        @param run: start a job: a Deferred firing with one result per
            commit, in order (L{None}: durable; else the exception).
        @param max_bytes: a job takes commits up to this many message bytes
            (at least one commit), the rest wait for the next: the commit
            process gets its messages' bytes down a pipe, and copies of a
            whole burst of large messages would swell both processes.
        """
        self._run = run
        self.jobs = jobs
        self.max_bytes = max_bytes
        self._queued: list[PendingCommit] = []
        self._running = 0

    def submit(self, commit: PendingCommit) -> Deferred[None]:
        """
        @return: C{commit.done}: it fires once the message is durable in
            C{new/}, or fails with the exception that stopped it.
        """
        self._queued.append(commit)
        if self._running < self.jobs:
            self._next()
        return commit.done

    def _next(self) -> None:
        if self.max_bytes is None:
            batch, self._queued = self._queued, []
        else:
            size = 0
            taken = 0
            for commit in self._queued:
                if taken and size + len(commit.data or b"") > self.max_bytes:
                    break
                size += len(commit.data or b"")
                taken += 1
            batch, self._queued = self._queued[:taken], self._queued[taken:]
        if not batch:
            return
        self._running += 1

        def done(results: Any) -> None:
            self._running -= 1
            if not isinstance(results, list):
                results = [results.value] * len(batch)
            if self._queued:
                self._next()
            for commit, error in zip(batch, results):
                if error is None:
                    commit.done.callback(None)
                else:
                    commit.done.errback(error)

        self._run(batch).addBoth(done)


def thread_job(
    batch: list[PendingCommit], sync: GroupSync,
) -> Callable[[], list[BaseException | None]]:
    """
    A commit thread's job for C{batch}: each message's C{durable}, then one
    fsync of C{new/} (L{GroupSync}: shared with a job running beside it),
    or, if that fails, the C{undo} of each.
    """

    def work() -> list[BaseException | None]:
        results: list[BaseException | None] = []
        renamed = 0
        for commit in batch:
            try:
                commit.durable()
            except BaseException as e:
                results.append(e)
            else:
                results.append(None)
                renamed += 1
        if renamed:
            try:
                sync.sync(renamed)
            except BaseException as e:
                # The flush failed: the renames may not be durable, so none
                # of them is acknowledged; their files go back out.
                for i, commit in enumerate(batch):
                    if results[i] is None:
                        commit.undo()
                        results[i] = e
        return results

    return work


class CommitProcess(ProcessProtocol):
    """
    The node's end of its commit process (L{relaynet.queue.committer}): a
    small interpreter that makes small messages durable in C{new/} with the
    same file operations as a commit thread, but without taking the node's
    interpreter lock from the reactor thread at each of them. Batches go
    down its standard input; one reply per batch comes back, in order.

    If the process ends while batches are out, they fail with
    L{SpoolError} (their files, if any, are removed first: nothing was
    acknowledged), and L{alive} turns false: the spool commits in threads
    from then on.

    @ivar alive: the process runs and answers.
    @ivar flushes: batches that fsynced C{new/}.
    @ivar synced: messages those made durable.
    """

    log = Logger()

    def __init__(self, reactor: Any, run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]) -> None:
        self._reactor = reactor
        self._in_thread = run_in_thread
        # Requests sent and not answered yet, in order: (unlink?, what, count, Deferred).
        self._waiting: deque[tuple[bool, Any, int, Deferred[Any]]] = deque()
        self._buffer = b""
        self._ended: Deferred[None] | None = None
        self._closing = False
        self.alive = False
        self.flushes = 0
        self.synced = 0
        self.observers: list[Callable[[int], None]] = []

    def start(self) -> None:
        """Start the process (C{python -I -S committer.py PARENT})."""
        argv = [sys.executable, "-I", "-S", committer_module.__file__, str(os.getpid())]
        self._ended = Deferred()
        self._reactor.spawnProcess(self, sys.executable, argv, env={}, childFDs={0: "w", 1: "r", 2: 2})
        self.alive = True

    def run(self, batch: list[PendingCommit]) -> Deferred[list[BaseException | None]]:
        """Send C{batch}; the Deferred fires with its results."""
        items = []
        for c in batch:
            assert c.data is not None
            items.append((c.tmp, c.new, c.data))
        return self._request(committer_module.encode_batch_parts(items), len(batch), batch, False)

    def unlink(self, paths: list[str]) -> Deferred[list[OSError | None]]:
        """Unlink C{paths} (gone already is fine); the Deferred fires with a result per path."""
        return self._request([committer_module.encode_unlinks(paths)], len(paths), paths, True)

    def _request(self, payload: list[bytes], count: int, what: Any, unlinks: bool) -> Deferred[Any]:
        if not self.alive or self.transport is None:
            return fail(SpoolError("the commit process is not running"))
        d: Deferred[Any] = Deferred()
        self._waiting.append((unlinks, what, count, d))
        self._send([struct.pack("!I", sum(map(len, payload)))] + payload)
        return d

    def _send(self, parts: list[bytes]) -> None:
        """
        Write C{parts} to the process's input: at once when nothing is
        queued before them (one C{writev}), the rest through the transport.

        Twisted's process writer queues every write for the next reactor
        turn and arms and disarms the pipe in epoll around it (three
        C{epoll_ctl}s a request, and a turn of delay before the commit
        process even starts: measurable in a message's time to its 250).
        Reads the writer's buffers as L{relaynet.smtp.netio.send_now} reads
        a TCP transport's; anything unusual goes through the transport.
        """
        assert self.transport is not None
        writer = getattr(self.transport, "pipes", {}).get(0)
        if (
            type(writer) is ProcessWriter
            and writer.connected
            and not writer.disconnecting
            and not writer._tempDataBuffer
            and writer.offset == len(writer.dataBuffer)
        ):
            if len(parts) > 256:
                parts = [b"".join(parts)]
            try:
                sent = os.writev(writer.fd, parts)
            except OSError:
                # EAGAIN, or an error the writer will find and report itself.
                sent = 0
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts = parts[1:]
            if not parts:
                return
            if sent:
                parts = [parts[0][sent:]] + parts[1:]
        self.transport.writeSequence(parts)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from("!I", self._buffer)
            if len(self._buffer) < 4 + length:
                return
            payload, self._buffer = self._buffer[4:4 + length], self._buffer[4 + length:]
            if not self._waiting:
                self.log.error("The commit process answered a batch never sent")
                continue
            unlinks, what, count, d = self._waiting.popleft()
            try:
                results: list[BaseException | None] = list(committer_module.decode_results(payload))
            except ValueError as e:
                results = [SpoolError(f"broken reply from the commit process: {e}")] * count
            if len(results) != count:
                results = [SpoolError("the commit process answered for another request")] * count
            ok = sum(1 for r in results if r is None)
            if ok and not unlinks:
                self.flushes += 1
                self.synced += ok
                for observer in self.observers:
                    observer(ok)
            d.callback(results)

    def processEnded(self, reason: Any) -> None:
        self.alive = False
        if not self._closing:
            self.log.error(
                "The commit process ended ({reason}); committing in threads from now on",
                reason=reason.getErrorMessage(),
            )
        waiting, self._waiting = self._waiting, deque()
        for unlinks, what, _, d in waiting:
            if unlinks:
                # Unlinks are safe to do again: in a thread.
                self._in_thread(partial(committer_module.unlink, what)).chainDeferred(d)
            else:
                self._abandon(what, d)
        ended, self._ended = self._ended, None
        if ended is not None:
            ended.callback(None)

    def _abandon(self, batch: list[PendingCommit], d: Deferred[list[BaseException | None]]) -> None:
        """Fail the batch that got no answer, once none of its files is left."""
        paths = [p for c in batch for p in (c.new, c.tmp)]
        error = SpoolError("the commit process ended")
        self._in_thread(partial(committer_module.unlink, paths)).addBoth(lambda _: d.callback([error] * len(batch)))

    STOP_TIMEOUT = 30.0
    """Seconds L{stop} waits for the process to end before it kills it (a disk that hangs)."""

    def stop(self) -> Deferred[None]:
        """
        End the process (its input closed, after the batches out; killed if
        it has not ended after L{STOP_TIMEOUT}): fires when it has.
        """
        ended = self._ended
        if ended is None or not self.alive:
            return succeed(None)
        self._closing = True
        assert self.transport is not None
        self.transport.closeStdin()
        transport = self.transport

        def kill() -> None:
            self.log.error("The commit process did not end within {seconds:.0f} s; killing it",
                           seconds=self.STOP_TIMEOUT)
            try:
                transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

        timer = self._reactor.callLater(self.STOP_TIMEOUT, kill)
        d: Deferred[None] = Deferred()

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            d.callback(None)

        ended.addBoth(done)
        return d


class SpoolWriter:
    """
    One message being received. Created by L{Spool.begin}.

    No disk operation runs on the reactor thread: on ext4 even creating or
    appending to a file can wait for the journal commit that other sessions'
    fsyncs have started, and a py-spy profile of the accept path at 20
    sessions showed the reactor spending 60% of its samples in the
    C{open(O_CREAT)} of C{tmp/ID}. So the bytes gather in memory, up to
    L{FLUSH_AT}; a message that stays below it (most mail) is created,
    written, fsynced and renamed at the final dot, in a batch (L{CommitBatch})
    of the commit process or the commit threads. A larger one streams out in L{FLUSH_AT} chunks, written in
    order by jobs of the general pool, so memory per session stays bounded
    (L{pending} says how much has not reached the page cache yet, for flow
    control).

    @ivar size: message bytes written so far.
    @ivar drained: called (on the reactor thread) when L{pending} falls to
        zero after a chunk was written, so a paused sender can resume.
    """

    FLUSH_AT = 256 * 1024

    def __init__(self, spool: "Spool", envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.tmp_path = spool.tmp_prefix + envelope.queue_id
        self._env = json.dumps(envelope.to_json(), separators=(",", ":"), ensure_ascii=True).encode()
        # The header is rewritten with the final size and hop count at commit.
        self._chunks: list[bytes] = [_header(len(self._env), 0, 0), self._env + b"\n"]
        # Fixed-width values filled in at commit (see DIGEST_PLACEHOLDER).
        self._slots: dict[str, int] = {}
        for key, placeholder in _STAMP_PLACEHOLDERS.items():
            prefix = f'"{key}":"'.encode()
            at = self._env.find(prefix + placeholder.encode() + b'"')
            if at >= 0:
                self._slots[key] = at + len(prefix)
        self._buffered = 0
        self._fd: int | None = None
        self._created = False
        self._tail: Deferred[None] | None = None
        self._finished = False
        self.pending = 0
        self.size = 0
        self.drained: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        """Append message bytes (memory; a chunk is written out in a thread)."""
        if self._finished:
            raise SpoolError("write after commit or abort")
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self.pending += len(data)

        def out() -> None:
            try:
                self._open()
                assert self._fd is not None
                write_all(self._fd, data)
            except BaseException:
                self._discard()
                raise

        def written(result: Any) -> Any:
            self.pending -= len(data)
            if self.pending == 0 and self.drained is not None and not self._finished:
                self.drained()
            return result

        self._then(lambda: self.spool._in_thread(out)).addBoth(written)

    def _then(self, job: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """Run C{job} after every disk job already queued for this message."""
        if self._tail is None:
            d = job()
        else:
            d = self._tail.addCallback(lambda _: job())
        self._tail = d
        return d

    def _open(self) -> None:
        """Create C{tmp/ID} (worker thread)."""
        if not self._created:
            self._fd = os.open(
                self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            self._created = True

    def _discard(self) -> None:
        """Close and unlink C{tmp/ID} if it was created (worker thread)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._created:
            self._created = False
            self._unlink()

    def abort(self) -> None:
        """Drop the message: nothing of it stays on disk."""
        if self._finished:
            return
        self._finished = True
        self._chunks = []
        if self._tail is not None:
            # Whatever the chunk jobs did, undo it once they are done.
            self._tail.addBoth(lambda _: self.spool._in_thread(self._discard)).addErrback(
                lambda f: None
            )

    def commit(self, hops: int, digest: str | None = None, content: str | None = None) -> Deferred[QueueEntry]:
        """
        Make the message durable and visible in C{new/}.

        @param hops: C{Received:} fields in the message, ours included.
        @param digest: the message digest to write into the envelope's
            C{params.digest} placeholder (L{DIGEST_PLACEHOLDER}), if it has one.
        @param content: the same for C{params.content} (L{CONTENT_PLACEHOLDER}).
        @return: a Deferred firing with the L{QueueEntry} once file and directory
            are fsynced; failing with L{SpoolError} on any I/O error
            (L{SpoolFull} if the disk is full), after which nothing is left in
            C{new/} or C{tmp/}.
        """
        if self._finished:
            return fail(SpoolError("commit after commit or abort"))
        self._finished = True
        header = _header(len(self._env), self.size, hops)
        rewrite_header = self._tail is not None
        envelope = self.envelope
        stamps: list[tuple[int, bytes]] = []
        for key, value in (("digest", digest), ("content", content)):
            if value is None or key not in self._slots:
                continue
            if len(value) != len(_STAMP_PLACEHOLDERS[key]) or not value.isascii():
                return fail(SpoolError(f"params.{key} takes {len(_STAMP_PLACEHOLDERS[key])} ASCII characters"))
            stamps.append((self._slots[key], value.encode("ascii")))
            envelope = evolve(envelope, params={**envelope.params, key: value})
        if not rewrite_header:
            self._chunks[0] = header
            if stamps:
                env = bytearray(self._env)
                for at, stamp in stamps:
                    env[at:at + len(stamp)] = stamp
                self._chunks[1] = bytes(env) + b"\n"
        data = b"".join(self._chunks)
        self._chunks = []
        new_path = self.spool.new_prefix + self.envelope.queue_id

        def durable() -> None:
            try:
                self._open()
                fd = self._fd
                assert fd is not None
                write_all(fd, data)
                if rewrite_header:
                    os.pwrite(fd, header, 0)
                    for at, stamp in stamps:
                        os.pwrite(fd, stamp, HEADER_LEN + at)
                os.fsync(fd)
                self._fd = None
                os.close(fd)
                os.rename(self.tmp_path, new_path)
            except BaseException:
                self._discard()
                raise

        def undo() -> None:
            # The directory flush failed: the rename may not be durable, so
            # we must not acknowledge; take the file back out of new/.
            try:
                os.rename(new_path, self.tmp_path)
            except OSError:
                pass
            self._unlink()

        body_offset = HEADER_LEN + len(self._env) + 1
        spool = self.spool

        def committed(_: object) -> QueueEntry:
            entry = QueueEntry(
                envelope=resident(envelope, size=self.size, hops=hops),
                state=QueueState(),
                path=new_path,
                body_offset=body_offset,
                state_written=False,
            )
            if not rewrite_header and spool.fresh_bytes + self.size <= spool.FRESH_BUDGET:
                entry.fresh = data[body_offset:]
                spool.fresh_bytes += self.size
            return entry

        d = self._then(lambda: spool._commit(
            PendingCommit(self.tmp_path, new_path, None if rewrite_header else data, durable, undo)
        ))
        d.addCallback(committed)

        def wrap(failure: Any) -> Any:
            # An fsync that failed (EIO) is never retried on the same
            # descriptor: the kernel may have dropped the dirty pages and
            # would report success. The file is gone; the client sends again.
            raise spool_error(failure.value)

        d.addErrback(wrap)
        return d

    def _unlink(self) -> None:
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass


class QueueIds:
    """
    Fresh queue ids: base 30 of the clock's microseconds times 1000 (so
    1000 ids fit in one microsecond), never behind the last one -- a clock
    that stands still or is set back does not repeat an id or put one out
    of order -- plus a suffix that keeps the ids of two processes apart.
    Ordered as strings too, and safe as file names.
    """

    def __init__(self, clock: Callable[[], float], suffix: str) -> None:
        self._clock = clock
        self._suffix = suffix
        self._last = 0

    def next(self) -> str:
        """The next id."""
        n = self._last = max(int(self._clock() * 1_000_000) * 1000, self._last + 1)
        chars = []
        while n:
            n, r = divmod(n, len(_ID_ALPHABET))
            chars.append(_ID_ALPHABET[r])
        return "".join(reversed(chars)) + self._suffix


class Spool:
    """
    The maildir queue of one node.

    @ivar root: the queue directory.
    @ivar fresh_bytes: message bytes kept in memory for first attempts
        (L{QueueEntry.fresh}), at most L{FRESH_BUDGET}.
    """

    log = Logger()

    PROCESS_BATCH_BYTES = 256 * 1024
    """Message bytes a batch of the commit process takes at most (or one message)."""

    PROCESS_MAX_BYTES = SpoolWriter.FLUSH_AT
    """
    The largest message (queue file bytes) the commit process writes: every
    message received whole in memory (below L{SpoolWriter.FLUSH_AT}). A
    larger one streamed into C{tmp/} while it arrived, and is completed by
    the commit threads. History: 64 KiB until 2026-12-07, since copying
    100 KB messages down the pipe seemed to cost memory (both ends buffer a
    batch): bench, 100 KB from 100 sessions, peak PSS 117 MiB through the
    process against 104 MiB in threads, later 121-125 against 116-118 MiB.
    Measured again with the node's bytecode compiled (before, every node
    start compiled its modules, which left their own peaks in the heap):
    one node with two workers fed by C{smtp-source}, 2000 x 100 KB from 100
    sessions, 8 alternating pairs: mean peak PSS 115.3 MiB at 256 KiB
    against 115.2 at 64 KiB, the earlier difference gone; from 20 sessions
    (4 pairs) 652 against 567 msg/s, 2.14 against 2.54 CPU s per 1000
    messages: the interpreter-lock hand-offs of a thread commit cost more
    than the copy.
    """

    FRESH_BUDGET = 2 * 1024 * 1024
    """
    Bytes of just-committed messages kept in memory until their first
    attempt is over: the attempt sends them without reading the queue file
    back on the reactor thread (an open and reads that can wait behind the
    journal commits of the spool's fsyncs). Beyond it (a burst while the
    attempt slots are all busy), messages are read from their files.
    """

    def __init__(
        self,
        root: Path,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: Callable[[], float] = time.time,
        commit_pool: ThreadPool | None = None,
        shard: int | None = None,
    ) -> None:
        """
        @param shard: the worker's shard number (0-255) in a node with
            workers: its ids end with it (two hex digits), apart from every
            other shard's.
        """
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.new_dir = self.root / "new"
        self.state_dir = self.root / "state"
        self.recycled_dir = self.root / "recycled"
        self._reactor = reactor
        self._pool = threadpool
        self._commit_pool = commit_pool or threadpool
        self._clock = clock
        self._new_sync = GroupSync(self.new_dir)
        self._unlinks = UnlinkBatch(self._unlink_paths)
        self._hints = DueHints(self._in_thread, reactor.callLater)  # type: ignore[attr-defined]
        self._thread_commits = CommitBatch(
            lambda batch: self._in_commit_thread(thread_job(batch, self._new_sync)), jobs=2,
        )
        self._committer: CommitProcess | None = None
        self._process_commits: CommitBatch | None = None
        self.fresh_bytes = 0
        self._state_sync = GroupSync(self.state_dir)
        # Four random hex digits per process keep ids from two processes
        # sharing a spool apart (one getrandom at start, not one per message);
        # a worker's last two are its shard's number.
        if shard is None:
            suffix = secrets.token_hex(2).upper()
        else:
            suffix = secrets.token_hex(1).upper() + f"{shard:02X}"
        self._ids = QueueIds(clock, suffix)

    def _in_thread(self, f: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f)

    def _in_commit_thread(self, f: Callable[[], Any]) -> Deferred[Any]:
        """
        Commits have threads of their own: a 250 must not wait behind
        deliveries queued in the general pool.
        """
        return deferToThreadPool(self._reactor, self._commit_pool, f)

    def use_commit_process(self, committer: CommitProcess) -> None:
        """
        Commit small messages (up to L{PROCESS_MAX_BYTES}) through
        C{committer}, started, from now on, and remove retired messages'
        files through it; the larger ones, and all of them once it has
        ended, in the commit threads.
        """
        self._committer = committer
        committer.observers.extend(self._new_sync.observers)

        def run(batch: list[PendingCommit]) -> Deferred[list[BaseException | None]]:
            # Commits that were waiting when the process ended go to the threads.
            if committer.alive:
                return committer.run(batch)
            return self._in_commit_thread(thread_job(batch, self._new_sync))

        self._process_commits = CommitBatch(run, jobs=1, max_bytes=self.PROCESS_BATCH_BYTES)

    def _unlink_paths(self, paths: list[str]) -> Deferred[list[OSError | None]]:
        if self._committer is not None and self._committer.alive:
            return self._committer.unlink(paths)
        return self._in_thread(lambda: committer_module.unlink(paths))

    def _commit(self, commit: PendingCommit) -> Deferred[None]:
        if (
            commit.data is not None
            and len(commit.data) <= self.PROCESS_MAX_BYTES
            and self._process_commits is not None
        ):
            assert self._committer is not None
            if self._committer.alive:
                return self._process_commits.submit(commit)
        return self._thread_commits.submit(commit)

    def observe_commits(self, observer: Callable[[int], None]) -> None:
        """Call C{observer} with the batch size of every group commit of C{new/}."""
        self._new_sync.observers.append(observer)
        if self._committer is not None:
            self._committer.observers.append(observer)

    @property
    def group_commit_stats(self) -> tuple[int, int]:
        """C{(directory flushes, messages committed by them)} so far."""
        flushes, synced = self._new_sync.flushes, self._new_sync.synced
        if self._committer is not None:
            flushes += self._committer.flushes
            synced += self._committer.synced
        return flushes, synced

    def new_id(self) -> str:
        """
        A fresh queue id: time-ordered, unique within this spool, and safe as a
        file name (like Postfix's long queue ids).
        """
        return self._ids.next()

    def prepare(self) -> None:
        """
        Create the directories (mode 0700) and remove what a crash left in
        C{tmp/}, and the delivered files a commit process kept in
        C{recycled/}. Blocking; run before the node accepts connections.
        """
        for d in (self.root, self.tmp_dir, self.new_dir, self.state_dir, self.recycled_dir):
            makedirs_durable(d)
        for leftovers in (self.tmp_dir, self.recycled_dir):
            for p in leftovers.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            fsync_dir(leftovers)

    def recover(self) -> Iterator[QueueEntry]:
        """
        Yield every committed message with its recorded state (blocking), in
        queue id order (arrival order). State files without a queue file
        (left by a crash during removal) are removed; corrupt queue files are
        moved aside to C{corrupt/}.

        The directories are listed by name (no C{Path} per message), and a
        state file is read only for a message that had one when recovery
        began (most queued messages have none): a message costs one open,
        read and close.
        """
        new_dir = os.fspath(self.new_dir)
        prefix = new_dir + os.sep
        started = self._clock()
        names = os.listdir(new_dir)
        names.sort()
        with_state = set(os.listdir(self.state_dir))
        for name in names:
            path = prefix + name
            try:
                envelope, offset, mtime = read_queue_file_and_mtime(path)
            except CorruptQueueFile as e:
                self.log.error("Moving aside corrupt queue file: {error}", error=str(e))
                aside = self.root / "corrupt"
                aside.mkdir(mode=0o700, exist_ok=True)
                os.rename(path, aside / name)
                continue
            state = self._read_state(name) if name in with_state else QueueState()
            if mtime > started:
                apply_due_hint(state, mtime, started)
            yield QueueEntry(envelope, state, path, offset, recovered=True)
        del with_state
        listed = set(names)
        del names
        for p in self.state_dir.iterdir():
            # The queue file is looked for now, not in the listing above: the
            # node recovers in the background while it accepts mail, and a
            # message committed meanwhile has a state file of its own.
            if p.name not in listed and not (self.new_dir / p.name).exists():
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def _read_state(self, queue_id: str) -> QueueState:
        try:
            with open(self.state_prefix + queue_id, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return QueueState()
        try:
            return QueueState.from_json(json.loads(raw))
        except (ValueError, TypeError, KeyError):
            self.log.error("Ignoring unreadable state file for {queue_id}", queue_id=queue_id)
            return QueueState()

    def begin(self, envelope: Envelope) -> SpoolWriter:
        """
        Start receiving a message into C{tmp/}.

        @raise SpoolError: the temporary file cannot be created.
        """
        try:
            return SpoolWriter(self, envelope)
        except OSError as e:
            raise SpoolError(str(e)) from e

    def record(self, entry: QueueEntry) -> Deferred[None]:
        """
        Durably replace the state file of C{entry} with C{entry.state}
        (write C{tmp/ID.state}, fsync, rename over C{state/ID}, fsync
        C{state/}).

        @return: a Deferred firing once the state is durable, or failing with
            L{SpoolError} (L{SpoolFull} if the disk is full), after which the
            previous state file is intact and no C{tmp/ID.state} is left; the
            caller keeps the state in memory and records it again later.
        """
        entry.state_written = True
        data = json.dumps(entry.state.to_json(), separators=(",", ":")).encode()
        qid = entry.queue_id
        tmp = self.tmp_prefix + qid + ".state"
        final = self.state_prefix + qid

        def write() -> None:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, final)
            except OSError as e:
                # ENOSPC, EIO: the previous state file stays as it was, and
                # no partial tmp/ID.state is left to fill the disk further.
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise spool_error(e) from e
            try:
                self._state_sync.sync()
            except OSError as e:
                raise spool_error(e) from e

        return self._in_thread(write)

    def hint_due(self, entry: QueueEntry, when: float) -> None:
        """
        Leave C{when} as C{entry}'s due time for a recovery, without writing
        its state: the queue file's modification time, as Postfix keeps a
        deferred message's next retry (C{os.utime}, in a worker thread,
        batched, no C{fsync}). For a deferral that contacted nobody (a next
        hop known down), which is not worth a state write: without the
        hint, every such message was due at once after a restart, and was
        deferred again. A hint lost in a crash only makes the message due
        sooner; recovery never lets one make a message due sooner
        (L{apply_due_hint}).
        """
        self._hints.submit(entry.path, when)

    def flush_hints(self) -> Deferred[None]:
        """Write the due-time hints not written yet (at stop, after the last attempt)."""
        return self._hints.flush()

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        """
        Retire a message whose recipients are all final: unlink its queue file
        (then its state file). The directory is not flushed: if a power loss
        undid the unlink, the message would be delivered again (the
        at-least-once window), never lost; every removal saves a flush. The
        unlinks of messages finishing together share one job of a worker
        thread (an unlink on the reactor thread can wait for a journal commit).
        """
        self.drop_fresh(entry)
        paths: list[str] = [entry.path]
        if entry.state_written:
            paths.append(self.state_prefix + entry.queue_id)
        return self._unlinks.submit(paths)

    def drop_fresh(self, entry: QueueEntry) -> None:
        """
        Let go of the message bytes kept in memory with C{entry} (its first
        attempt is over): later attempts read the queue file.
        """
        fresh = entry.fresh
        if fresh is not None:
            entry.fresh = None
            self.fresh_bytes -= len(fresh)

    # A message's paths are made as strings, never through pathlib: a Path
    # interns each part (sys.intern), and interning the queue id kept by the
    # queued message made every id an entry of the interpreter's table of
    # interned strings (~60 bytes a queued message).

    @property
    def tmp_prefix(self) -> str:
        """C{tmp/} as a string ending with a separator."""
        return os.fspath(self.tmp_dir) + os.sep

    @property
    def new_prefix(self) -> str:
        """C{new/} as a string ending with a separator."""
        return os.fspath(self.new_dir) + os.sep

    @property
    def state_prefix(self) -> str:
        """C{state/} as a string ending with a separator."""
        return os.fspath(self.state_dir) + os.sep

    def count(self) -> int:
        """Committed messages on disk (blocking directory listing)."""
        return sum(1 for _ in os.scandir(self.new_dir))
