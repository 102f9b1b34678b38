"""
Local delivery into Maildirs, in process: exactly one copy per mailbox per
message, even when a delivery is repeated after a crash that came before
its outcome was recorded (issue 16, item 3).
"""

from __future__ import annotations

import mailbox
import os
import re
from pathlib import Path

from relaynet.config import LocalDelivery
from relaynet.delivery.mailbox import (
    copy_unique, deliver_local, find_copy, maildir_for, write_maildir_copy,
)
from relaynet.queue.spool import Envelope, QueueEntry, QueueState, Recipient

MESSAGE = b"Subject: once\r\nMessage-ID: <once@test>\r\n\r\nhello\r\n"


def make_entry(tmp_path: Path, queue_id: str, message: bytes = MESSAGE,
               recipients: tuple[str, ...] = ("bob@localhost",)) -> QueueEntry:
    """A queue entry whose queue file holds just C{message} (body offset 0)."""
    path = tmp_path / f"queue-{queue_id}"
    path.write_bytes(message)
    envelope = Envelope(
        queue_id=queue_id, sender="alice@example.org",
        recipients=tuple(Recipient(r) for r in recipients), arrival=1.0,
        size=len(message),
    )
    return QueueEntry(envelope, QueueState(), str(path), 0)


def files(maildir: Path) -> list[Path]:
    """Every message file in C{maildir}'s C{new/} and C{cur/}."""
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def test_repeated_delivery_writes_one_copy(tmp_path: Path) -> None:
    """
    Writing the same message to the same mailbox twice (a delivery repeated
    after a crash before the outcome was recorded) leaves one file, and the
    second call returns that file.
    """
    entry = make_entry(tmp_path, "QID1abcd")
    box = tmp_path / "mail" / "Maildir"
    first = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    second = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    assert files(box) == [first]
    assert second == first
    assert first.read_bytes() == (
        b"Return-Path: <alice@example.org>\nDelivered-To: bob@localhost\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    )


def test_file_name_carries_queue_id_mailbox_hash_and_sizes(tmp_path: Path) -> None:
    """
    The file name is C{<secs>.R<queue id>_<8 hex>.<host>,S=<size>,W=<size
    with CRLF>}; the S= field is the file's size.
    """
    entry = make_entry(tmp_path, "QID2abcd")
    box = tmp_path / "Maildir"
    path = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    m = re.fullmatch(r"(\d+)\.(RQID2abcd_[0-9a-f]{8})\.([^/:]+),S=(\d+),W=(\d+)", path.name)
    assert m, path.name
    assert m.group(2) == copy_unique("QID2abcd", "bob@localhost")
    size = path.stat().st_size
    assert int(m.group(4)) == size
    assert int(m.group(5)) == size + path.read_bytes().count(b"\n")


def test_different_message_same_content_gets_its_own_copy(tmp_path: Path) -> None:
    """
    Two messages with identical bytes but different queue ids are two
    deliveries: two files.
    """
    box = tmp_path / "Maildir"
    a = write_maildir_copy(box, make_entry(tmp_path, "QIDAaaaa"), "alice@example.org", "bob@localhost")
    b = write_maildir_copy(box, make_entry(tmp_path, "QIDBbbbb"), "alice@example.org", "bob@localhost")
    assert a != b
    assert files(box) == sorted([a, b])
    assert a.read_bytes() == b.read_bytes()


def test_copy_moved_to_cur_with_flags_is_found(tmp_path: Path) -> None:
    """
    A copy a mail reader moved to C{cur/} (renamed with C{:2,<flags>}) is
    found again: repeating the delivery writes nothing and returns it.
    """
    entry = make_entry(tmp_path, "QID3abcd")
    box = tmp_path / "Maildir"
    first = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    moved = box / "cur" / (first.name + ":2,RS")
    os.rename(first, moved)
    assert find_copy(box, copy_unique("QID3abcd", "bob@localhost")) == moved
    again = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    assert again == moved
    assert files(box) == [moved]
    md = mailbox.Maildir(box, factory=None, create=False)
    [msg] = list(md)
    assert isinstance(msg, mailbox.MaildirMessage)
    assert msg.get_subdir() == "cur" and msg.get_flags() == "RS"


def test_copy_deleted_by_user_is_delivered_again(tmp_path: Path) -> None:
    """
    A copy the user deleted is not remembered: repeating the delivery writes
    it again (documented in docs/spool-format.md).
    """
    entry = make_entry(tmp_path, "QID4abcd")
    box = tmp_path / "Maildir"
    first = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    first.unlink()
    again = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    assert files(box) == [again]


def test_other_mailbox_or_other_name_shape_is_not_a_match(tmp_path: Path) -> None:
    """
    The check matches the whole unique part: another mailbox's copy of the
    same message, or a file whose name merely contains the queue id, is not
    taken for this mailbox's copy.
    """
    entry = make_entry(tmp_path, "QID5abcd")
    box = tmp_path / "Maildir"
    other = write_maildir_copy(box, entry, "alice@example.org", "carol@localhost")
    (box / "new" / "123.M1P2Q3RQID5abcd.host").write_bytes(b"Subject: x\n\n")
    mine = write_maildir_copy(box, entry, "alice@example.org", "bob@localhost")
    assert mine != other
    assert len(files(box)) == 3


def test_deliver_local_twice_with_aliases_one_copy_per_mailbox(tmp_path: Path) -> None:
    """
    Running the whole local delivery of a message twice (the runner's retry
    after a crash), with two recipients that are aliases of one mailbox plus
    another user, leaves one copy per mailbox, reported delivered each time;
    Python's C{mailbox.Maildir} reads every file.
    """
    local = LocalDelivery(
        mailroot=tmp_path / "mailroot", domains=("localhost",), catch_all=True,
        aliases={"postmaster": ("bob",)},
    )
    rcpts = ("bob@localhost", "postmaster@localhost", "carol@localhost")
    entry = make_entry(tmp_path, "QID6abcd", recipients=rcpts)
    first = deliver_local(local, entry, list(rcpts))
    second = deliver_local(local, entry, list(rcpts))
    assert [r.ok for r in first] == [True, True, True]
    assert [r.mailboxes for r in second] == [r.mailboxes for r in first]
    for user in ("bob", "carol"):
        box = maildir_for(local, "localhost", user)
        [path] = files(box)
        md = mailbox.Maildir(box, factory=None, create=False)
        [msg] = list(md)
        assert msg["Delivered-To"] == f"{user}@localhost"
        assert msg["Subject"] == "once"
