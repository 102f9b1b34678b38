# -*- test-case-name: tests.test_e2e -*-
"""
Local delivery (the MDA): copy a queued message into users' Maildirs.

Each copy lands in C{<mailroot>/<domain>/<user>/Maildir/new/} as a standard
Maildir file (maildir(5), mutt, Dovecot, Postfix's local and virtual), with
C{Return-Path:} and C{Delivered-To:} prepended and the message as stored
except for line ends: the queue keeps SMTP's CRLF, a Maildir file has LF (the
Maildir convention; tools that read it as a plain file mis-handle CRLF). The
conversion streams in chunks (a CR that ends a chunk waits for the next one),
so a large message is never whole in memory. The file name carries
C{,S=<octets in the file>,W=<octets with CRLF line ends>} (Dovecot's sizes).
The file is written in C{tmp/}, fsynced, renamed into C{new/} and the
directory fsynced before the delivery counts as done.

Exactly once per mailbox: the unique part of the file name,
C{R<queue id>_<hash of the mailbox>} (L{copy_unique}), is the same at every
attempt of a message to a mailbox. A copy written and fsynced before a crash
that came before the queue's state file recorded the outcome is found again
in C{new/} or C{cur/} (L{find_copy}) and counts as the delivery instead of
a second copy.

Every function here blocks: the queue runner calls them in a worker thread.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator

from attrs import frozen

from relaynet.config import LocalDelivery
from relaynet.delivery.routing import resolve_local
from relaynet.queue.committer import write_all
from relaynet.queue.spool import QueueEntry, fsync_dir, makedirs_durable

_counter = itertools.count()


@frozen
class LocalResult:
    """
    The outcome of local delivery to one envelope recipient.

    @ivar ok: delivered to every mailbox it expands to.
    @ivar permanent: a failure that retrying will not fix (unknown user).
    @ivar mailboxes: the Maildir files written.
    """

    address: str
    ok: bool
    permanent: bool = False
    dsn: str = "2.0.0"
    diagnostic: str = ""
    mailboxes: tuple[str, ...] = ()


def maildir_for(local: LocalDelivery, domain: str, user: str) -> Path:
    """The Maildir of C{user@domain}."""
    return local.mailroot / domain / user / "Maildir"


def ensure_maildir(path: Path) -> None:
    """
    Create a Maildir (tmp, new, cur; mode 0700) if missing, durably (each new
    directory's parent is fsynced).
    """
    if (path / "new").is_dir() and (path / "tmp").is_dir() and (path / "cur").is_dir():
        return
    for sub in ("tmp", "new", "cur"):
        makedirs_durable(path / sub)


def _host_part(hostname: str | None) -> str:
    return (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")


def unique_name(hostname: str | None = None) -> str:
    """
    A Maildir file name: C{<secs>.M<usecs>P<pid>Q<n>.<host>}, unique across
    processes and deliveries (the pid is read at call time, not import time).
    L{write_maildir_copy} uses it for the file in C{tmp/}.
    """
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_counter)}.{_host_part(hostname)}"


def copy_unique(queue_id: str, mailbox: str) -> str:
    """
    The unique part (between the first two dots) of the Maildir file name of
    message C{queue_id}'s copy for C{mailbox}: C{R<queue id>_<8 hex digits
    of SHA-256 of the mailbox>}. The same at every attempt, so a repeated
    delivery finds the copy it wrote before (L{find_copy}); unique across
    messages (queue ids are) and mailboxes. Queue ids and hex digits hold no
    C{.}, C{/} or C{:}.

    @param queue_id: the message's queue id.
    @param mailbox: the mailbox, C{user@domain}.
    """
    digest = hashlib.sha256(mailbox.encode("utf-8")).hexdigest()[:8]
    return f"R{queue_id}_{digest}"


def copy_name(unique: str, size: int, wire_size: int, hostname: str | None = None) -> str:
    """
    The name in C{new/} of a copy: C{<secs>.<unique>.<host>,S=<size>,W=<wire_size>}.
    """
    return f"{int(time.time())}.{unique}.{_host_part(hostname)},S={size},W={wire_size}"


def find_copy(maildir: Path, unique: str) -> Path | None:
    """
    Find a file whose unique part is C{unique} in C{maildir}'s C{new/} or
    C{cur/} (where a reader moves it, adding C{:2,<flags>}), whatever its
    time part, host and size fields. A copy the user deleted is not found.

    Lists both directories (names only, no C{stat}): a blocking call, for a
    worker thread.

    @return: the file's path, or C{None}.
    """
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                for item in it:
                    parts = item.name.split(".", 2)
                    if len(parts) == 3 and parts[1] == unique:
                        return maildir / sub / item.name
        except FileNotFoundError:
            continue
    return None


def _quote_path(address: str) -> str:
    return f"<{address}>"


#: Octets read from the queue file at a time.
CHUNK = 1 << 20


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """
    Turn CRLF line ends into LF in a stream of chunks, whatever their
    boundaries: a CR at the end of a chunk is held back until the next chunk
    shows whether an LF follows. A CR not followed by LF is kept.

    @param chunks: the bytes, in order.
    @return: the converted bytes, in chunks.
    """
    held = b""
    for chunk in chunks:
        if not chunk:
            continue
        data = held + chunk
        held = b""
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        yield data.replace(b"\r\n", b"\n")
    if held:
        yield held


def _read_chunks(path: str | Path, offset: int, size: int) -> Iterator[bytes]:
    with open(path, "rb") as src:
        src.seek(offset)
        remaining = size
        while remaining > 0:
            chunk = src.read(min(remaining, CHUNK))
            if not chunk:
                raise OSError(f"queue file {path} is shorter than its recorded size")
            remaining -= len(chunk)
            yield chunk


def write_maildir_copy(
    maildir: Path, entry: QueueEntry, sender: str, delivered_to: str, may_exist: bool = True
) -> Path:
    """
    Write one durable copy of C{entry}'s message into C{maildir}, unless a
    copy of it for C{delivered_to} is already there (L{find_copy}): a
    delivery repeated after a crash that came before its outcome was
    recorded. The directory holding that copy is fsynced (the crash may
    have come between the rename and the fsync of C{new/}) and it counts as
    the delivery.

    @param may_exist: whether an earlier attempt may have written the copy;
        if not, the mailbox is not listed (C{cur/} is the user's whole
        mailbox: no listing per delivery on the common path).
    @return: the path of the file (in C{new/}, or where the copy was found).
    @raise OSError: on any I/O failure (nothing is left in C{new/} then).
    """
    ensure_maildir(maildir)
    unique = copy_unique(entry.queue_id, delivered_to)
    found = find_copy(maildir, unique) if may_exist else None
    if found is not None:
        fsync_dir(found.parent)
        return found
    name = unique_name()
    tmp = maildir / "tmp" / name
    prefix = (
        f"Return-Path: {_quote_path(sender)}\nDelivered-To: {delivered_to}\n"
    ).encode("utf-8")
    size = 0
    lines = prefix.count(b"\n")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, prefix)
        size += len(prefix)
        for piece in crlf_to_lf(_read_chunks(entry.path, entry.body_offset, entry.envelope.size)):
            write_all(fd, piece)
            size += len(piece)
            lines += piece.count(b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    final = maildir / "new" / copy_name(unique, size, size + lines)
    os.rename(tmp, final)
    fsync_dir(maildir / "new")
    return final


def deliver_local(
    local: LocalDelivery, entry: QueueEntry, addresses: list[str]
) -> list[LocalResult]:
    """
    Deliver C{entry} to the local recipients C{addresses}.

    A mailbox reached through two recipients (aliases) gets one copy, in
    this attempt or any later one (L{write_maildir_copy} finds a copy an
    earlier attempt wrote).

    @return: one L{LocalResult} per address, in order.
    """
    results = []
    done: dict[tuple[str, str], Path] = {}
    sender = entry.envelope.sender
    # Only a message recovered at start or attempted before can have a copy
    # in a mailbox already; a first attempt need not list the mailboxes.
    may_exist = entry.recovered or any(st.attempts for st in entry.state.recipients.values())
    for address in addresses:
        localpart, _, domain = address.rpartition("@")
        boxes = resolve_local(local, localpart, domain)
        if not boxes:
            results.append(
                LocalResult(address, ok=False, permanent=True, dsn="5.1.1",
                            diagnostic="user unknown")
            )
            continue
        written = []
        try:
            for dom, user in boxes:
                if (dom, user) not in done:
                    done[(dom, user)] = write_maildir_copy(
                        maildir_for(local, dom, user), entry, sender, f"{user}@{dom}", may_exist
                    )
                written.append(str(done[(dom, user)]))
        except OSError as e:
            results.append(
                LocalResult(address, ok=False, permanent=False, dsn="4.2.0",
                            diagnostic=f"cannot write mailbox: {e.strerror or e}")
            )
            continue
        results.append(LocalResult(address, ok=True, mailboxes=tuple(written)))
    return results
