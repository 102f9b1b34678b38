"""
Disk faults (issue 16, item 2): a full file system (C{ENOSPC}), an C{fsync}
that fails (C{EIO}) and a read-only spool at start.

C{ENOSPC} comes from a real, small file system: a 512 KiB tmpfs mounted on a
directory the test creates and unmounted in its cleanup (the tests skip,
saying why, where C{mount} is not permitted). C{EIO} comes from fault
injection: C{os.fsync} replaced by one that fails. Work of the spool's
threads runs in the test's own thread (L{ManualThreadPool}); nothing sleeps.
"""

from __future__ import annotations

import errno
import mailbox
import json
import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed

from harness.nodeproc import DEFAULT_CONFIG, TWISTD, NodeProcess, free_port, wait_for
from relaynet.delivery.client import DeliveryResult
from relaynet.events import EventLog
from relaynet.node import NodeStartError, RelayNode
from relaynet.queue.spool import (
    Envelope,
    QueueEntry,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    SpoolFull,
)
from relaynet.queue.states import RecipientStatus
from relaynet.runner import QueueRunner
from relaynet.testing import (
    EPOCH,
    ManualThreadPool,
    ThreadlessReactor,
    connect,
    make_config,
    make_intake,
    take_replies,
)

TIMEOUT = 60.0


def _mount_tmpfs(where: Path, size: str = "512k") -> None:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {result.stdout.strip()}")


def _umount(where: Path) -> None:
    """Unmount C{where}; lazily if a file on it is still open (a failed test)."""
    if subprocess.run(["umount", str(where)], timeout=TIMEOUT, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], timeout=TIMEOUT, check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, mounted for the test."""
    where = tmp_path / "small"
    _mount_tmpfs(where)
    try:
        yield where
    finally:
        _umount(where)


class Filler:
    """Fills a file system with one file, and frees it again."""

    def __init__(self, where: Path) -> None:
        self.path = where / "filler"

    def fill(self) -> None:
        """Write until the file system is full (C{ENOSPC})."""
        block = b"x" * 4096
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    return
        finally:
            os.close(fd)

    def free(self) -> None:
        """Give the space back."""
        self.path.unlink()


def make_spool(root: Path) -> tuple[Spool, ManualThreadPool]:
    """A Maildir spool at C{root} whose thread work runs at once, in this thread."""
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    pool = ManualThreadPool(immediate=True)
    spool = Spool(root, reactor, pool, clock=reactor.seconds)  # type: ignore[arg-type]
    spool.prepare()
    return spool, pool


def result_of(d: object) -> object:
    """The result of a Deferred that has fired (a Failure if it failed)."""
    out: list[object] = []
    d.addBoth(out.append)  # type: ignore[attr-defined]
    assert out, "the Deferred has not fired"
    return out[0]


LOCAL = Recipient("b@localhost")


def commit(spool: Spool, rcpt: Recipient = LOCAL) -> QueueEntry:
    """Commit one message to C{rcpt}; its entry."""
    env = Envelope(
        queue_id=spool.new_id(), sender="a@localhost", recipients=(rcpt,), arrival=EPOCH,
    )
    writer = spool.begin(env)
    writer.write(b"Subject: s\r\n\r\nbody\r\n")
    entry = result_of(writer.commit(1))
    assert isinstance(entry, QueueEntry), entry
    return entry


def smtp_message(size: int) -> bytes:
    """A message of about C{size} octets, ending with the final dot."""
    line = b"x" * 78 + b"\r\n"
    return b"Subject: s\r\n\r\n" + line * (size // len(line) + 1) + b".\r\n"


@pytest.mark.parametrize("size", [200, 300 * 1024], ids=["small", "streamed"])
def test_full_disk_while_receiving(small_fs: Path, size: int) -> None:
    """
    With the spool's disk full, the end of DATA is answered C{452 4.3.1
    Insufficient system storage}, nothing is acknowledged and no partial
    file stays in C{tmp/} (a message small enough to stay in memory until
    the dot, and one streamed out in chunks); the session goes on, and once
    space returns the next message is accepted without a restart.
    """
    intake, _, pool = make_intake(small_fs)
    proto, transport = connect(intake)
    take_replies(transport)
    filler = Filler(small_fs)
    filler.fill()

    def send_message() -> list[tuple[int, str]]:
        proto.dataReceived(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
        proto.dataReceived(smtp_message(size))
        pool.run_all()
        return [(code, text.split(" ")[0]) for code, text in take_replies(transport)]

    proto.dataReceived(b"EHLO client.test\r\n")
    take_replies(transport)
    replies = send_message()
    assert replies[-1] == (452, "4.3.1"), replies
    assert intake.queued_entries == []
    assert list(intake.spool.tmp_dir.iterdir()) == []
    assert list(intake.spool.new_dir.iterdir()) == []

    filler.free()
    replies = send_message()
    assert replies[-1][0] == 250, replies
    assert len(intake.queued_entries) == 1
    assert [p.name for p in intake.spool.new_dir.iterdir()] == [intake.queued_entries[0].queue_id]


def test_full_disk_while_recording_state(small_fs: Path) -> None:
    """
    With the disk full, recording a message's delivery state fails with
    L{SpoolFull}; the state file recorded before is intact, no
    C{tmp/ID.state} is left, and the same state is recorded once space
    returns.
    """
    spool, _ = make_spool(small_fs / "queue")
    entry = commit(spool)
    entry.state.recipients["b@localhost"] = RecipientState(attempts=1)
    assert result_of(spool.record(entry)) is None
    before = (spool.state_dir / entry.queue_id).read_bytes()

    filler = Filler(small_fs)
    filler.fill()
    entry.state.recipients["b@localhost"] = RecipientState(
        status=RecipientStatus.DELIVERED, attempts=2, diagnostic="x" * 8000
    )
    failure = result_of(spool.record(entry))
    assert getattr(failure, "value", None).__class__ is SpoolFull, failure
    assert (spool.state_dir / entry.queue_id).read_bytes() == before
    assert list(spool.tmp_dir.iterdir()) == []

    filler.free()
    assert result_of(spool.record(entry)) is None
    [recovered] = list(spool.recover())
    assert recovered.state.recipients["b@localhost"].status is RecipientStatus.DELIVERED
    assert list(spool.tmp_dir.iterdir()) == []


class FailingFsync:
    """An C{os.fsync} that fails with C{EIO}, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, fd: int) -> None:
        self.calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_fsync_eio_while_receiving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    An C{fsync} of the queue file failing with C{EIO} means the data may be
    lost: the message is not acknowledged (C{451 4.3.0}), the file is
    removed from C{tmp/} and never renamed into C{new/}, and the fsync is
    not tried again on the same descriptor as if a retry could succeed.
    """
    intake, _, pool = make_intake(tmp_path)
    proto, transport = connect(intake)
    take_replies(transport)
    proto.dataReceived(b"EHLO client.test\r\n")
    proto.dataReceived(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    assert [c for c, _ in take_replies(transport)] == [250, 250, 250, 354]
    fsync = FailingFsync()
    monkeypatch.setattr(os, "fsync", fsync)
    proto.dataReceived(smtp_message(200))
    pool.run_all()
    replies = take_replies(transport)
    assert [(c, t.split(" ")[0]) for c, t in replies] == [(451, "4.3.0")], replies
    assert len(fsync.calls) == 1
    assert intake.queued_entries == []
    assert list(intake.spool.tmp_dir.iterdir()) == []
    assert list(intake.spool.new_dir.iterdir()) == []


def test_fsync_eio_while_recording_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    An C{fsync} of a new state file failing with C{EIO} fails the record
    with L{SpoolError}; the previous state file stays, the unsynced
    C{tmp/ID.state} is removed, not renamed over it.
    """
    spool, _ = make_spool(tmp_path / "queue")
    entry = commit(spool)
    assert result_of(spool.record(entry)) is None
    before = (spool.state_dir / entry.queue_id).read_bytes()
    entry.state.recipients["b@localhost"] = RecipientState(status=RecipientStatus.DELIVERED)
    monkeypatch.setattr(os, "fsync", FailingFsync())
    failure = result_of(spool.record(entry))
    assert isinstance(getattr(failure, "value", None), SpoolError), failure
    assert (spool.state_dir / entry.queue_id).read_bytes() == before
    assert list(spool.tmp_dir.iterdir()) == []


def test_event_log_never_half_a_line(small_fs: Path) -> None:
    """
    An event that does not fit on a full disk is dropped whole: the event
    log keeps only complete JSON lines (a partly written line is truncated
    away), and events are written again once space returns.
    """
    path = small_fs / "events.jsonl"
    events = EventLog(path, "n1", clock=lambda: EPOCH)
    try:
        events.emit("received", queue_id="Q1")
        before = path.read_bytes()
        filler = Filler(small_fs)
        filler.fill()
        # Larger than a page: part of it fits in the file's last page.
        events.emit("delivered", queue_id="Q2", diagnostic="d" * 20000)
        assert path.read_bytes() == before
        assert events.dropped == 1
        filler.free()
        events.emit("delivered", queue_id="Q3")
    finally:
        events.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line)["queue_id"] for line in lines[:-1]] == ["Q1", "Q3"]


def _read_only_spool(tmp_path: Path) -> Path:
    """A prepared spool on a tmpfs then remounted read-only."""
    where = tmp_path / "ro"
    _mount_tmpfs(where)
    spool = where / "spool"
    (spool / "mailboxes").mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-o", "remount,ro", str(where)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT, check=False,
    )
    if result.returncode != 0:
        _umount(where)
        pytest.skip(f"cannot remount a tmpfs read-only: {result.stdout.strip()}")
    return spool


def test_read_only_spool_start_error(tmp_path: Path) -> None:
    """
    A node whose spool is read-only fails to start with L{NodeStartError}
    (printed as one line by twistd), naming the spool and the reason.
    """
    spool = _read_only_spool(tmp_path)
    try:
        config = make_config(spool)
        node = RelayNode(config, ThreadlessReactor())
        with pytest.raises(NodeStartError) as info:
            node.startService()
    finally:
        _umount(tmp_path / "ro")
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write spool {spool}" in message
    assert "Read-only file system" in message


@pytest.mark.slow
def test_read_only_spool_twistd(tmp_path: Path) -> None:
    """
    C{twistd relaynet} on a read-only spool exits with status 1 and one line
    on stderr naming the spool, no traceback.
    """
    spool = _read_only_spool(tmp_path)
    try:
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "relaynet",
             "--listen", f"tcp:{free_port()}:interface=127.0.0.1", "--spool", str(spool)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=TIMEOUT, start_new_session=True, check=False,
        )
    finally:
        _umount(tmp_path / "ro")
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"cannot write spool {spool}" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


ROUTE = """
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:192.0.2.1:25"]

[queue]
minimal_backoff = 60
maximal_backoff = 600
"""


class DeferringHop:
    """A next hop (the runner's outbound agent) that answers 451 (or C{reply}) to every recipient."""

    def __init__(self, first: Callable[[], None], reply: tuple[int, str, str] = (451, "4.3.0", "try later")) -> None:
        """
        @param first: called as the first attempt starts.
        @param reply: the code, enhanced code and text of every answer.
        """
        self.attempts = 0
        self._first = first
        self._reply = reply

    def deliver(
        self, endpoint: str, entry: QueueEntry, recipients: list[Recipient],
        concurrency: int = 20, source_address: str | None = None, tls_policy: str = "none",
    ) -> Deferred[list[DeliveryResult]]:
        self.attempts += 1
        if self.attempts == 1:
            self._first()
        return succeed([DeliveryResult(r.address, *self._reply, "hop.test:25") for r in recipients])

    def close(self) -> None:
        pass

    def close_idle(self) -> None:
        pass


def attempted_as_the_disk_fills(
    small_fs: Path, reply: tuple[int, str, str] = (451, "4.3.0", "try later"),
) -> tuple[ThreadlessReactor, Spool, Filler, DeferringHop, QueueRunner, QueueEntry, list[dict[str, object]]]:
    """
    A runner over a Maildir spool on C{small_fs} with one message to
    b@x.test, attempted once: the hop answers C{reply} and fills the file
    system as the attempt starts. Also the runner's events.
    """
    reactor = ThreadlessReactor()
    reactor.advance(EPOCH)
    pool = ManualThreadPool(immediate=True)
    spool = Spool(small_fs / "queue", reactor, pool, clock=reactor.seconds)  # type: ignore[arg-type]
    spool.prepare()
    config = make_config(small_fs, toml=ROUTE)
    filler = Filler(small_fs)
    hop = DeferringHop(filler.fill, reply)
    events: list[dict[str, object]] = []
    log = EventLog(None, "t", clock=reactor.seconds)
    log.observers.append(events.append)
    runner = QueueRunner(config, spool, log, reactor, pool, outbound=hop, now=reactor.seconds)
    runner.start([])
    entry = commit(spool, Recipient("b@x.test", route="relay:*"))
    runner.enqueue(entry)
    reactor.advance(0)
    assert hop.attempts == 1
    return reactor, spool, filler, hop, runner, entry, events


def test_runner_records_outcome_after_full_disk(small_fs: Path) -> None:
    """
    When the disk is full as the runner records an attempt's outcome, the
    write fails, no C{tmp/ID.state} is left, and the runner tries the
    message again after the minimal backoff; once space is back, that
    attempt's write records both attempts (the first outcome was kept in
    memory, not lost).
    """
    reactor, spool, filler, hop, runner, entry, _ = attempted_as_the_disk_fills(small_fs)
    assert list(spool.tmp_dir.iterdir()) == []
    assert not (spool.state_dir / entry.queue_id).exists()

    filler.free()
    reactor.advance(60)
    assert hop.attempts == 2
    [recovered] = list(spool.recover())
    assert recovered.state.recipients["b@x.test"].attempts == 2
    assert list(spool.tmp_dir.iterdir()) == []
    runner.stopService()


def test_a_dsn_the_full_disk_refuses_is_owed_then_sent(small_fs: Path) -> None:
    """
    The next hop refuses the recipient as the disk fills up: neither the
    DSN (C{ENOSPC} from a real file system) nor the state can be written.
    The message stays queued, owing its DSN; tried again while the disk is
    full, its recipient is not tried again. Once there is space, the next
    attempt writes the DSN and removes the message, and the DSN reaches the
    sender's Maildir: a multipart/report whose delivery-status part the
    standard library's mailbox and email parsers read as the recipient's
    failure.
    """
    reactor, spool, filler, hop, runner, entry, events = attempted_as_the_disk_fills(
        small_fs, (550, "5.1.1", "no such user"))
    assert [e.queue_id for e in spool.recover()] == [entry.queue_id]
    assert [ev["event"] for ev in events] == ["bounced", "dsn_deferred"]

    reactor.advance(60)  # the disk is still full
    assert hop.attempts == 1 and entry.queue_id in runner
    assert [e.queue_id for e in spool.recover()] == [entry.queue_id]

    filler.free()
    reactor.advance(60)
    assert entry.queue_id not in runner
    reactor.advance(0)
    assert hop.attempts == 1  # the recipient was tried once
    assert list(spool.recover()) == []
    # The DSN went to the sender's mailbox (localhost is local).
    [dsn] = [ev for ev in events if ev["event"] == "dsn"]
    assert (dsn["original_queue_id"], dsn["recipient"], dsn["action"]) == (entry.queue_id, "a@localhost", "failed")
    [report] = list(mailbox.Maildir(runner.config.local.mailroot / "localhost" / "a" / "Maildir", create=False))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    per_message, per_recipient = status.get_payload()
    assert per_recipient["Final-Recipient"] == "rfc822; b@x.test"
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
    assert per_recipient["Remote-MTA"] == "dns; hop.test"
    runner.stopService()


def test_full_disk_replies_are_not_client_errors(small_fs: Path) -> None:
    """
    A C{452 4.3.1} for a full disk is the node's trouble, not the client's:
    it does not count toward C{max_errors}, so a client retrying in the same
    session is not cut off with C{421}.
    """
    intake, _, pool = make_intake(small_fs, config_overrides={"limits": {"max_errors": 2}})
    proto, transport = connect(intake)
    take_replies(transport)
    filler = Filler(small_fs)
    filler.fill()
    proto.dataReceived(b"EHLO client.test\r\n")
    take_replies(transport)
    for _ in range(4):
        proto.dataReceived(b"MAIL FROM:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
        proto.dataReceived(smtp_message(200))
        pool.run_all()
        codes = [code for code, _ in take_replies(transport)]
        assert codes == [250, 250, 354, 452], codes
    assert not transport.disconnecting
    filler.free()


@pytest.mark.slow
def test_full_disk_through_a_twistd_node(tmp_path: Path) -> None:
    """
    The same with a real node (C{twistd relaynet}, whose commit process
    writes small messages, docs/spool-format.md): with its spool's disk full,
    the end of DATA is answered C{452 4.3.1}, nothing of the message stays
    in the queue, the session goes on, and once space returns the next
    message is accepted and delivered, without a restart.
    """
    where = tmp_path / "small"
    _mount_tmpfs(where, size="4m")
    node = NodeProcess(tmp_path / "node", DEFAULT_CONFIG.replace('spool = "spool"', f'spool = "{where}"'),
                       name="full")
    try:
        with node:
            filler = Filler(where)
            with smtplib.SMTP("127.0.0.1", node.port, timeout=TIMEOUT) as s:
                s.ehlo("client.test")
                filler.fill()
                s.mail("a@localhost")
                s.rcpt("b@localhost")
                code, reply = s.data(b"Subject: full\r\n\r\nfirst\r\n")
                assert (code, reply.split()[0]) == (452, b"4.3.1"), (code, reply)
                queue = node.spool / "queue"
                assert list((queue / "new").iterdir()) == [] and list((queue / "tmp").iterdir()) == []
                filler.free()
                s.mail("a@localhost")
                s.rcpt("b@localhost")
                code, reply = s.data(b"Subject: room\r\n\r\nsecond\r\n")
                assert code == 250, reply
            (delivered,) = wait_for(lambda: node.maildir_new("b"), TIMEOUT, "the delivery")
            assert b"second" in delivered.read_bytes()
    finally:
        _umount(where)
