# -*- test-case-name: tests.test_e2e -*-
"""
Local delivery (the MDA): copy a queued message into users' Maildirs.

Each copy lands in C{<mailroot>/<domain>/<user>/Maildir/new/} as a standard
Maildir file (mutt, Dovecot), with C{Return-Path:} and C{Delivered-To:}
prepended and the message bytes exactly as stored (CRLF line ends, as they came
over SMTP). The file is written in C{tmp/}, fsynced, renamed into C{new/} and
the directory fsynced before the delivery counts as done.

Every function here blocks: the queue runner calls them in a worker thread.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from attrs import frozen

from relaynet.config import LocalDelivery
from relaynet.delivery.routing import resolve_local
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


def unique_name(hostname: str | None = None) -> str:
    """
    A Maildir file name: C{<secs>.M<usecs>P<pid>Q<n>.<host>}, unique across
    processes and deliveries (the pid is read at call time, not import time).
    """
    now = time.time()
    host = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(_counter)}.{host}"


def _quote_path(address: str) -> str:
    return f"<{address}>"


def write_maildir_copy(
    maildir: Path, entry: QueueEntry, sender: str, delivered_to: str
) -> Path:
    """
    Write one durable copy of C{entry}'s message into C{maildir}.

    @return: the path of the file in C{new/}.
    @raise OSError: on any I/O failure (nothing is left in C{new/} then).
    """
    ensure_maildir(maildir)
    name = unique_name()
    tmp = maildir / "tmp" / name
    prefix = (
        f"Return-Path: {_quote_path(sender)}\r\nDelivered-To: {delivered_to}\r\n"
    ).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, prefix)
        with open(entry.path, "rb") as src:
            offset = entry.body_offset
            remaining = entry.envelope.size
            while remaining > 0:
                sent = os.sendfile(fd, src.fileno(), offset, min(remaining, 1 << 24))
                if sent == 0:
                    raise OSError(f"queue file {entry.path} is shorter than its recorded size")
                offset += sent
                remaining -= sent
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    size = len(prefix) + entry.envelope.size
    final = maildir / "new" / f"{name},S={size}"
    os.rename(tmp, final)
    fsync_dir(maildir / "new")
    return final


def deliver_local(
    local: LocalDelivery, entry: QueueEntry, addresses: list[str]
) -> list[LocalResult]:
    """
    Deliver C{entry} to the local recipients C{addresses}.

    A mailbox reached through two recipients (aliases) gets one copy.

    @return: one L{LocalResult} per address, in order.
    """
    results = []
    done: dict[tuple[str, str], Path] = {}
    sender = entry.envelope.sender
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
                        maildir_for(local, dom, user), entry, sender, f"{user}@{dom}"
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
