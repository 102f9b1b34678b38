# -*- test-case-name: tests.test_committer -*-
"""
The commit process: makes a node's small messages durable in C{new/}, out
of the node's own process.

A spool's commit is file work: create C{tmp/ID}, write it, fsync it, close
it, rename it into C{new/}, fsync C{new/}. Done in the node's worker
threads, each of those calls releases and takes back the interpreter's
lock, so every message made the reactor thread and a commit thread hand
the lock to each other about ten times, each time a futex wake-up and a
context switch: on a loaded 2-core machine about a sixth of the node's CPU
(perf, 5 KB messages from 20 sessions) was spent on those hand-offs, not on
the disk or on SMTP. This process does the same calls with a lock of its
own: the reactor sends it a batch of messages down a pipe and reads one
reply per batch (L{relaynet.queue.spool.CommitProcess}), as Postfix's
smtpd hands a message to its cleanup process.

It imports the standard library only and runs as C{python -I -S
committer.py}: a small interpreter (a few MB), not a second node. It reads
requests on its standard input and answers on its standard output, in
order; it ends at the end of its input (the node closed the pipe) or, on
Linux, when its parent dies (C{PR_SET_PDEATHSIG}): a commit of a dead
node is never finished behind its replacement's back.

Framing: each request and each reply is a 4-byte big-endian length and that
many bytes (Twisted's C{Int32StringReceiver} framing). A request's first
byte says what it asks for: C{C} (commit) or C{U} (unlink).

A commit request is a batch of messages, each::

    <tmp path length:2> <new path length:2> <data length:4> tmp path, new path, data

and asks for, for each message: C{tmp} created (C{O_EXCL}, mode 0600),
C{data} written, fsynced, closed, renamed to C{new}; then one fsync of the
directory of the C{new} paths (of each, if they differ). A message whose own steps fail is cleaned
up (its C{tmp} file unlinked) and fails alone; if the directory fsync fails,
every renamed message of the batch is taken back out (renamed back and
unlinked) and fails with that error.

An unlink request is a list of paths, each C{<length:2> path}, to unlink
(a path already gone is fine): the queue files of delivered messages, whose
directory is not fsynced (docs/spool-format.md).

Recycling: a queue file this process unlinks for an unlink request (a path
C{<queue>/new/ID} of at most L{RECYCLE_MAX_BYTES}) is instead renamed into
C{<queue>/recycled/} as C{PID-N}, up to L{RECYCLE_FILES} of them, and a
later commit writes its message over one of them (from offset 0, then
truncated to its length) instead of creating C{tmp/ID}: the same write,
fsync, rename and directory fsync, but no inode to allocate and free, and
no blocks when the sizes are alike. Creating a file costs more than it
seems: ext4 without a journal (this project's own build machines) scans
every inode freed in the last few seconds before it reuses one
(C{recently_deleted}), and at a thousand messages a second that scan was
about 40% of this process's CPU (C{perf}); with a journal it still
allocates and frees an inode and its blocks per message. A kept file is
what an unlinked one would be: gone from the queue (C{new/} no longer
names it; recovery never reads C{recycled/}), and C{tmp/} still holds only
messages being received. Kept files are unlinked when no request came for
L{RECYCLE_IDLE} seconds, at the end of input, and all at once when a
commit finds the disk full (the commit is then tried again); a node's
start empties C{recycled/} in any case. Without a C{recycled/} directory
nothing is kept.

A kept file is written over only once C{new/} has been fsynced since it
was kept (by a commit: kept files wait for the next batch). Until then its
removal from C{new/} may not be durable: written over earlier, a power
loss could bring back C{new/OLD} holding another message's bytes (the
power-loss tests found it: a message delivered twice, another's state
lost).

The reply has, for each message or path in order::

    <errno:2> <message length:2> message

errno 0 (and an empty message) for a message that is durable in C{new/}, or
a path that is gone.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import struct
import sys

_ITEM = struct.Struct("!HHI")
_RESULT = struct.Struct("!HH")
_LENGTH = struct.Struct("!I")

#: The largest request: a batch of small messages (each below the spool's
#: flush threshold) never comes near it; a bigger length is a broken pipe.
MAX_FRAME = 256 * 1024 * 1024


#: Queue files kept for reuse (over every queue directory), the largest kept,
#: and the seconds without a request after which they are unlinked.
RECYCLE_FILES = 64
RECYCLE_MAX_BYTES = 256 * 1024
RECYCLE_IDLE = 5.0


COMMIT = b"C"
UNLINK = b"U"
_PATH = struct.Struct("!H")


def encode_batch_parts(items: list[tuple[str, str, bytes]]) -> list[bytes]:
    """
    A commit request (without its length prefix) for C{(tmp, new, data)}
    items, in parts to write one after the other: the messages' bytes are
    not copied into one string.
    """
    parts = [COMMIT]
    for tmp, new, data in items:
        t = os.fsencode(tmp)
        n = os.fsencode(new)
        parts.append(_ITEM.pack(len(t), len(n), len(data)) + t + n)
        parts.append(data)
    return parts


def encode_batch(items: list[tuple[str, str, bytes]]) -> bytes:
    """L{encode_batch_parts} joined."""
    return b"".join(encode_batch_parts(items))


def encode_unlinks(paths: list[str]) -> bytes:
    """An unlink request (without its length prefix)."""
    parts = [UNLINK]
    for path in paths:
        p = os.fsencode(path)
        parts.append(_PATH.pack(len(p)))
        parts.append(p)
    return b"".join(parts)


def decode_unlinks(payload: bytes | bytearray) -> list[bytes]:
    """The paths of an unlink request; L{ValueError} if it is malformed."""
    if payload[:1] != UNLINK:
        raise ValueError("not an unlink request")
    paths = []
    at = 1
    while at < len(payload):
        if at + _PATH.size > len(payload):
            raise ValueError("truncated path")
        (length,) = _PATH.unpack_from(payload, at)
        at += _PATH.size
        if at + length > len(payload):
            raise ValueError("truncated path")
        paths.append(bytes(payload[at:at + length]))
        at += length
    return paths


def decode_batch(payload: bytes | bytearray) -> list[tuple[bytes, bytes, memoryview]]:
    """The items of a commit request; L{ValueError} if it is malformed."""
    view = memoryview(payload)
    if view[:1] != COMMIT:
        raise ValueError("not a commit request")
    items = []
    at = 1
    while at < len(view):
        if at + _ITEM.size > len(view):
            raise ValueError("truncated item")
        lt, ln, ld = _ITEM.unpack_from(view, at)
        at += _ITEM.size
        end = at + lt + ln + ld
        if end > len(view):
            raise ValueError("truncated item")
        items.append((bytes(view[at:at + lt]), bytes(view[at + lt:at + lt + ln]), view[at + lt + ln:end]))
        at = end
    return items


def encode_results(results: list[OSError | None]) -> bytes:
    """A reply (without its length prefix)."""
    parts = []
    for error in results:
        if error is None:
            parts.append(_RESULT.pack(0, 0))
        else:
            text = (error.strerror or str(error)).encode("utf-8", "replace")[:1000]
            parts.append(_RESULT.pack(error.errno or 0xFFFF, len(text)))
            parts.append(text)
    return b"".join(parts)


def decode_results(payload: bytes) -> list[OSError | None]:
    """The results of a reply; L{ValueError} if it is malformed."""
    results: list[OSError | None] = []
    at = 0
    while at < len(payload):
        if at + _RESULT.size > len(payload):
            raise ValueError("truncated result")
        code, length = _RESULT.unpack_from(payload, at)
        at += _RESULT.size
        if code == 0:
            results.append(None)
        else:
            text = payload[at:at + length].decode("utf-8", "replace")
            results.append(OSError(code if code != 0xFFFF else None, text))
        at += length
    return results


def write_all(fd: int, data: bytes | memoryview) -> None:
    """C{os.write} until every byte of C{data} is written (the spool and the mailbox writer use it too)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Recycler:
    """
    The queue files of delivered messages kept in C{<queue>/recycled/} for
    new commits to write over (see the module's docstring).

    @ivar kept: how many files are kept, over every queue directory.
    """

    def __init__(self, limit: int = RECYCLE_FILES, max_bytes: int = RECYCLE_MAX_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.kept = 0
        # Per queue directory: kept files, oldest first, each (path, size,
        # the count of new/ fsyncs when it was kept); and that count.
        # (A list: at most RECYCLE_FILES long, and collections is one import more.)
        self._pools: dict[bytes, list[tuple[bytes, int, int]]] = {}
        self._syncs: dict[bytes, int] = {}
        self._serial = 0

    def keep(self, path: bytes) -> bool:
        """
        Take C{path} out of the queue into its C{recycled/} if it is a
        small queue file and there is room; C{False}: unlink it as usual.
        """
        if self.kept >= self.limit:
            return False
        directory, _ = os.path.split(path)
        queue, sub = os.path.split(directory)
        if sub != b"new":
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_bytes:
            return False
        self._serial += 1
        kept = os.path.join(queue, b"recycled", b"%d-%d" % (os.getpid(), self._serial))
        try:
            os.rename(path, kept)
        except OSError:
            return False
        self._pools.setdefault(queue, []).append((kept, st.st_size, self._syncs.get(queue, 0)))
        self.kept += 1
        return True

    def take(self, queue: bytes) -> tuple[bytes, int] | None:
        """
        A kept file of the queue directory C{queue} whose removal from
        C{new/} is durable, and its size, no longer kept; or C{None}.
        """
        pool = self._pools.get(queue)
        if not pool or pool[0][2] >= self._syncs.get(queue, 0):
            return None
        self.kept -= 1
        path, size, _ = pool.pop(0)
        return path, size

    def synced(self, queue: bytes) -> None:
        """C{<queue>/new/} was fsynced: the files kept until now may be written over."""
        self._syncs[queue] = self._syncs.get(queue, 0) + 1

    def purge(self) -> None:
        """Unlink every kept file."""
        pools, self._pools, self.kept = self._pools, {}, 0
        for pool in pools.values():
            for path, _, _ in pool:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def unlink(self, paths: "list[bytes]") -> list[OSError | None]:
        """An unlink request, keeping what it can."""
        results: list[OSError | None] = []
        for path in paths:
            if self.keep(path):
                results.append(None)
            else:
                results.extend(unlink([path]))
        return results


def _commit_one(tmp: bytes, new: bytes, data: memoryview, recycler: Recycler | None) -> OSError | None:
    """Make one message durable at C{new} (not yet its directory): C{None}, or the error."""
    kept = recycler.take(os.path.dirname(os.path.dirname(tmp))) if recycler is not None else None
    path, old_size, fd = tmp, 0, -1
    if kept is not None:
        try:
            fd = os.open(kept[0], os.O_WRONLY | os.O_CLOEXEC)
            path, old_size = kept
        except OSError:
            unlink([kept[0]])
    if fd < 0:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            return e
    try:
        try:
            write_all(fd, data)
            if old_size > len(data):
                os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, new)
    except OSError as e:
        # An fsync that failed (EIO) is never retried: the kernel may
        # have dropped the dirty pages. The file goes; the client sends again.
        try:
            os.unlink(path)
        except OSError:
            pass
        return e
    return None


def commit(items: list[tuple[bytes, bytes, memoryview]], recycler: Recycler | None = None) -> list[OSError | None]:
    """Carry out one request (see the module's docstring), over kept files if C{recycler} has some."""
    results: list[OSError | None] = []
    renamed: list[int] = []
    for tmp, new, data in items:
        error = _commit_one(tmp, new, data, recycler)
        if (
            error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT)
            and recycler is not None and recycler.kept
        ):
            # The kept files hold space: give it back, and try once more.
            recycler.purge()
            error = _commit_one(tmp, new, data, recycler)
        if error is not None:
            results.append(error)
            continue
        renamed.append(len(results))
        results.append(None)
    for directory in {os.path.dirname(items[i][1]) for i in renamed}:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if recycler is not None:
                recycler.synced(os.path.dirname(directory))
        except OSError as e:
            # The renames may not be durable: none is acknowledged.
            for i in renamed:
                if os.path.dirname(items[i][1]) != directory:
                    continue
                tmp, new, _ = items[i]
                try:
                    os.rename(new, tmp)
                except OSError:
                    pass
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                results[i] = e
    return results


def unlink(paths: "list[bytes] | list[str]") -> list[OSError | None]:
    """Carry out an unlink request: each path gone (already gone is fine)."""
    results: list[OSError | None] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            results.append(None)
        except OSError as e:
            results.append(e)
        else:
            results.append(None)
    return results


def _read_exact(fd: int, n: int) -> bytearray | None:
    """C{n} bytes from C{fd} (read into one buffer), or L{None} at the end of input."""
    buf = bytearray(n)
    view = memoryview(buf)
    at = 0
    while at < n:
        got = os.readv(fd, [view[at:]])
        if not got:
            return None
        at += got
    return buf


def _die_with_parent() -> None:
    """Ask Linux to kill us when our parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(rfd: int, wfd: int, parent: int | None = None, idle: float = RECYCLE_IDLE) -> int:
    """
    Answer requests from C{rfd} on C{wfd} until the end of input.

    @param parent: the node's pid: if we are no longer its child (it died
        before L{_die_with_parent} took effect), stop at once.
    @param idle: seconds without a request after which kept files go.
    @return: the exit status: 0 at the end of input, 2 for a broken request.
    """
    recycler = Recycler()
    try:
        while True:
            if parent is not None and os.getppid() != parent:
                return 0
            if recycler.kept and not select.select([rfd], [], [], idle)[0]:
                recycler.purge()
            head = _read_exact(rfd, _LENGTH.size)
            if head is None:
                return 0
            (length,) = _LENGTH.unpack(head)
            if length > MAX_FRAME:
                print(f"relaynet committer: request of {length} bytes refused", file=sys.stderr)
                return 2
            payload = _read_exact(rfd, length)
            if payload is None:
                return 0
            try:
                if payload[:1] == UNLINK:
                    results = recycler.unlink(decode_unlinks(payload))
                else:
                    results = commit(decode_batch(payload), recycler)
            except ValueError as e:
                print(f"relaynet committer: broken request: {e}", file=sys.stderr)
                return 2
            reply = encode_results(results)
            out = memoryview(_LENGTH.pack(len(reply)) + reply)
            while out:
                out = out[os.write(wfd, out):]
    finally:
        recycler.purge()


def main() -> int:
    # Signals for the node (a terminal's ^C, a reload, a stop) are not ours:
    # we end when the node closes our input, after the batch in hand.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else None
    _die_with_parent()
    return serve(0, 1, parent)


if __name__ == "__main__":
    sys.exit(main())
