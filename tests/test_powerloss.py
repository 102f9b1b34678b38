"""
Power-loss tests on powerfs (C{relaynet.lab.powerfs}): a FUSE file system
that drops, on C{cut}, every write not fsynced and every directory operation
whose directory was not fsynced since (docs/power-loss.md).

First the file system itself, including the negative controls that prove a
cut really loses what was not made durable. Then the durability contract on
a real node whose spool is on powerfs: clients send while the node is
power-cut (SIGKILL, cut, restart) at random moments; every message a client
saw a 250 for must be in the spool or in the Maildir, byte-exact, exactly
once in the mailbox, and nothing half-written may be visible.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import smtplib
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from harness.nodeproc import (
    HOST, QUEUE_ID, NodeProcess, free_port, parse_message, split_delivered, wait_for,
)
from relaynet.lab.powerfs import (
    STASH, Journal, PowerFS, PowerFSError, PowerOperations, send, unavailable_reason,
)
from relaynet.queue.spool import CorruptQueueFile, read_queue_file

_WHY = unavailable_reason()
needs_fuse = pytest.mark.skipif(_WHY is not None, reason=f"powerfs cannot mount here: {_WHY}")


@pytest.fixture
def pfs(tmp_path: Path) -> Iterator[PowerFS]:
    fs = PowerFS.start(tmp_path / "backing", tmp_path / "mnt", log=tmp_path / "powerfs.log")
    try:
        yield fs
    finally:
        fs.stop()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, sync: bool, flags: int = os.O_CREAT | os.O_EXCL) -> None:
    fd = os.open(path, os.O_WRONLY | flags, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


# -- the file system --------------------------------------------------------------


@needs_fuse
def test_write_without_fsync_is_lost(pfs: PowerFS) -> None:
    """
    Negative control: a file written but never fsynced in a synced directory
    comes back empty after a cut; one whose directory was not synced either
    is gone.
    """
    m = pfs.mount
    _write(m / "named", b"data never synced", sync=False)
    _fsync_dir(m)
    _write(m / "unnamed", b"neither", sync=False)
    assert pfs.cut() >= 2
    assert (m / "named").read_bytes() == b""
    assert not (m / "unnamed").exists()


@needs_fuse
def test_rename_without_directory_fsync_is_undone(pfs: PowerFS) -> None:
    """
    Negative control: a synced file renamed into another directory without
    an fsync of either directory is back under its old name after a cut, and
    not under the new one.
    """
    m = pfs.mount
    (m / "tmp").mkdir()
    (m / "new").mkdir()
    _fsync_dir(m)
    _write(m / "tmp" / "x", b"message", sync=True)
    _fsync_dir(m / "tmp")
    os.rename(m / "tmp" / "x", m / "new" / "x")
    assert pfs.cut() >= 2
    assert os.listdir(m / "new") == []
    assert (m / "tmp" / "x").read_bytes() == b"message"


@needs_fuse
def test_spool_commit_pattern_survives(pfs: PowerFS) -> None:
    """
    The spool's commit (write in tmp/, fsync, rename into new/, fsync new/)
    survives a cut; the name in tmp/ was never durable; a state file
    replaced by rename with both fsyncs keeps its new content.
    """
    m = pfs.mount
    for d in ("tmp", "new", "state"):
        (m / d).mkdir()
    _fsync_dir(m)
    _write(m / "tmp" / "ID", b"queue file", sync=True)
    os.rename(m / "tmp" / "ID", m / "new" / "ID")
    _fsync_dir(m / "new")
    _write(m / "tmp" / "ID.state", b'{"v": 1}', sync=True)
    os.rename(m / "tmp" / "ID.state", m / "state" / "ID")
    _fsync_dir(m / "state")
    _write(m / "tmp" / "ID.state", b'{"v": 2}', sync=True)
    os.rename(m / "tmp" / "ID.state", m / "state" / "ID")  # no fsync of state/: undone
    pfs.cut()
    assert (m / "new" / "ID").read_bytes() == b"queue file"
    assert (m / "state" / "ID").read_bytes() == b'{"v": 1}'
    assert os.listdir(m / "tmp") == []


@needs_fuse
def test_unlink_append_and_overwrite_are_undone(pfs: PowerFS) -> None:
    """
    An unlink without a directory fsync comes back with the file's synced
    content; an append goes back to the synced length; an overwrite of
    synced bytes goes back to them.
    """
    m = pfs.mount
    _write(m / "gone", b"keep me", sync=True)
    _write(m / "log", b"line 1\n", sync=True)
    _write(m / "state", b"old state", sync=True)
    _fsync_dir(m)
    os.unlink(m / "gone")
    _write(m / "log", b"line 2\n", sync=False, flags=os.O_APPEND)
    _write(m / "state", b"NEW", sync=False, flags=0)
    assert (m / "state").read_bytes() == b"NEW state"
    assert pfs.cut() == 3
    assert (m / "gone").read_bytes() == b"keep me"
    assert (m / "log").read_bytes() == b"line 1\n"
    assert (m / "state").read_bytes() == b"old state"
    assert pfs.stats()["undone"] == 3


@needs_fuse
def test_enospc_and_eio_fsync(pfs: PowerFS) -> None:
    """enospc makes writes and creates fail; eio-fsync makes fsync fail; both switch off."""
    m = pfs.mount
    _write(m / "f", b"x", sync=True)
    pfs.enospc(True)
    with pytest.raises(OSError) as e:
        _write(m / "g", b"y", sync=False)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        _write(m / "f", b"y", sync=False, flags=os.O_APPEND)
    assert e.value.errno == errno.ENOSPC
    pfs.enospc(False)
    pfs.eio_fsync(True)
    with pytest.raises(OSError) as e:
        _write(m / "h", b"z", sync=True)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        _fsync_dir(m)
    assert e.value.errno == errno.EIO
    pfs.eio_fsync(False)
    _fsync_dir(m)
    stats = pfs.stats()
    assert stats["enospc_errors"] == 2 and stats["eio_errors"] == 2
    with pytest.raises(PowerFSError):
        send(pfs.control, "bogus")


@needs_fuse
def test_makedirs_durable_makes_a_directory_left_by_a_crash_durable(pfs: PowerFS) -> None:
    """
    A directory that a crashed run created (mkdir, killed before the fsync
    of its parent) exists when the node starts again; makedirs_durable must
    make it durable too, or a power cut later takes it away with every
    message fsynced into it.
    """
    from relaynet.queue.spool import fsync_dir, makedirs_durable

    m = pfs.mount
    (m / "spool").mkdir()  # the crashed run: no fsync of the mount's root after it
    makedirs_durable(m / "spool" / "queue" / "new")
    _write(m / "spool" / "queue" / "new" / "ID", b"acknowledged", sync=True)
    fsync_dir(m / "spool" / "queue" / "new")
    pfs.cut()
    assert (m / "spool" / "queue" / "new" / "ID").read_bytes() == b"acknowledged"


@needs_fuse
def test_transfer_window_journal_left_by_a_crash_is_made_durable(pfs: PowerFS) -> None:
    """
    An hour's transfer-window journal file that a crashed run created
    (before its directory was fsynced) must have its name made durable by
    the next run's first append, or a power cut takes away records that
    were fsynced into it (and a retransmission is queued twice).
    """
    import time as _time

    from relaynet.queue.spool import fsync_dir
    from relaynet.queue.window import TransferWindow

    m = pfs.mount
    (m / "window").mkdir()
    fsync_dir(m)
    now = _time.time()
    hour = int(now // 3600)
    _write(m / "window" / f"{hour}.jsonl", b"", sync=True)  # the crashed run: no fsync of window/
    w = TransferWindow(m / "window", span=86400, limit=1000, clock=lambda: now)
    w._append(hour, b'{"record": 1}\n')
    pfs.cut()
    assert (m / "window" / f"{hour}.jsonl").read_bytes() == b'{"record": 1}\n'


@needs_fuse
def test_event_log_survives_a_power_cut_but_for_its_last_lines(pfs: PowerFS) -> None:
    """
    The event log is fsynced at open and by the node's periodic sync (found
    by lab soak: never fsynced, it went back to empty at each power cut):
    a cut takes the lines written since the last sync, not the file.
    """
    from relaynet.events import EventLog

    m = pfs.mount
    (m / "spool").mkdir()
    _fsync_dir(m)
    log = EventLog(m / "spool" / "events.jsonl", "n")
    log.emit("received", queue_id="A")
    assert log.unsynced == 1
    log.sync()  # what the node's one-second timer does in a worker thread
    log.emit("received", queue_id="B")
    pfs.cut()
    log.close()
    lines = (m / "spool" / "events.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["queue_id"] for line in lines] == ["A"]


# -- the journal alone (no FUSE: runs everywhere) --------------------------------------


class Ops:
    """L{PowerOperations} over a backing directory, called as FUSE would (paths C{/a/b})."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.j = Journal(str(root))
        self.ops = PowerOperations(self.j)

    def write(self, path: str, data: bytes, sync: bool = False, create: bool = True) -> None:
        o = self.ops
        fh = o.create(path, 0o600, os.O_WRONLY | os.O_CREAT) if create else o.open(path, os.O_WRONLY)
        try:
            o.write(path, data, 0 if create else os.fstat(fh).st_size, fh)
            if sync:
                o.fsync(path, 0, fh)
        finally:
            o.release(path, fh)

    def read(self, path: str) -> bytes:
        return (self.root / path.lstrip("/")).read_bytes()

    def names(self, path: str = "/") -> list[str]:
        return sorted(n for n in self.ops.readdir(path, 0) if n not in (".", ".."))


def test_journal_undoes_a_tree_made_without_parent_fsync(tmp_path: Path) -> None:
    """
    A directory created without an fsync of its parent is gone after a cut,
    with everything in it, even files and names synced inside it; the stash
    is never listed.
    """
    t = Ops(tmp_path / "b")
    t.ops.mkdir("/d", 0o700)
    t.write("/d/f", b"synced", sync=True)
    t.ops.fsyncdir("/d", 0, 0)
    assert t.names() == ["d"]
    assert t.j.cut() >= 1
    assert t.names() == [] and sorted(os.listdir(t.root)) == [STASH]


def test_journal_undoes_rmdir_unlink_link_and_replace(tmp_path: Path) -> None:
    """
    Undone by a cut: an rmdir (after unlinking the files in it), a hard
    link, and a rename over an existing file (the old content returns).
    """
    t = Ops(tmp_path / "b")
    t.ops.mkdir("/d", 0o700)
    t.write("/d/f", b"in d", sync=True)
    t.write("/state", b"old", sync=True)
    t.ops.fsyncdir("/d", 0, 0)
    t.ops.fsyncdir("/", 0, 0)
    assert t.j.stats()["dirty_names"] == 0
    t.ops.unlink("/d/f")
    t.ops.rmdir("/d")
    t.ops.link("/again", "/state")
    t.write("/tmp.state", b"new", sync=True)
    t.ops.rename("/tmp.state", "/state")
    assert t.read("/state") == b"new"
    t.j.cut()
    assert t.names() == ["d", "state"]
    assert t.read("/d/f") == b"in d"
    assert t.read("/state") == b"old"
    with pytest.raises(OSError) as e:
        t.ops.rename("/d", "/e")
    assert e.value.errno == errno.EXDEV  # directory renames are not modelled


def test_journal_forgets_what_was_made_durable(tmp_path: Path) -> None:
    """
    A name created and removed again before any fsync leaves no record; an
    fsync of the file and of its directory leave nothing to undo.
    """
    t = Ops(tmp_path / "b")
    t.write("/x", b"gone again")
    t.ops.unlink("/x")
    assert t.j.stats()["dirty_names"] == 0
    t.write("/y", b"kept", sync=True)
    t.ops.fsyncdir("/", 0, 0)
    assert (t.j.stats()["dirty_names"], t.j.stats()["dirty_files"], t.j.stats()["stash_links"]) == (0, 0, 0)
    assert t.j.cut() == 0
    assert t.read("/y") == b"kept"


# -- a real node on powerfs --------------------------------------------------------

THREADS = 4
CUTS = (8, 12)
PER_THREAD_MAX = 3000
RUN_LIMIT = 90.0  # seconds: hard bound on the client threads
DRAIN_TIMEOUT = 120.0  # seconds; a loaded machine (CI next to benchmarks) needed more than 40
USER = "user"
FAR = "far@queued.test"  # a relay route to a closed port: stays queued

NODE_CONFIG = """\
[node]
name = "{name}"
hostname = "relay.test"
spool = "SPOOL"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true

[[route]]
domains = ["queued.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:CLOSED"]

[queue]
minimal_backoff = 1
maximal_backoff = 2
delay_warning = 0

[outbound]
connect_timeout = 2
"""


def make_message(client: int, seq: int, run: str) -> tuple[str, bytes]:
    """A small message with a unique Message-ID and a checksum of the body as its last line."""
    mid = f"<power-{run}-{client}-{seq}@test>"
    rnd = random.Random(f"{run}-{client}-{seq}")
    # One in ten is larger than the spool keeps in memory (256 KiB): it
    # streams into queue/tmp while DATA arrives, and its header record is
    # rewritten in place at the final dot.
    count = rnd.randint(4500, 5000) if rnd.random() < 0.1 else rnd.randint(2, 40)
    lines = [
        ("%02d " % (i % 100) + "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(60)))
        .encode()
        for i in range(count)
    ]
    lines.insert(1, b".a line that gets dot-stuffed")
    body = b"\r\n".join(lines) + b"\r\n"
    msg = (
        f"Message-ID: {mid}\r\nFrom: c{client}@example.org\r\nTo: {USER}@localhost\r\n"
        f"Subject: power {client}/{seq}\r\n\r\n".encode()
        + body + b"checksum: " + hashlib.sha256(body).hexdigest().encode() + b"\r\n"
    )
    return mid, msg


def checksum_ok(msg: bytes) -> bool:
    """The last line is C{checksum: <sha256 of the body before it, CRLF lines>}."""
    _, sep, body = msg.replace(b"\r\n", b"\n").partition(b"\n\n")
    payload, _, last = body.rstrip(b"\n").rpartition(b"\n")
    if not sep or not last.startswith(b"checksum: "):
        return False
    sent = payload.replace(b"\n", b"\r\n") + b"\r\n"
    return hashlib.sha256(sent).hexdigest().encode() == last[len(b"checksum: "):]


class Sender(threading.Thread):
    """Sends messages one after another, reconnecting (bounded by time) after errors."""

    def __init__(self, index: int, node: NodeProcess, run: str, stop: threading.Event) -> None:
        super().__init__(name=f"sender-{index}", daemon=True)
        self.index = index
        self.node = node
        self.run_id = run
        self.stop = stop
        self.attempted: dict[str, bytes] = {}
        self.recipients: dict[str, list[str]] = {}
        self.acked: dict[str, str] = {}  # Message-ID -> queue id
        self.failures: Counter[str] = Counter()
        self.lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + RUN_LIMIT
        smtp: smtplib.SMTP | None = None
        seq = 0
        while not self.stop.is_set() and seq < PER_THREAD_MAX and time.monotonic() < deadline:
            if smtp is None:
                try:
                    smtp = smtplib.SMTP(HOST, self.node.port, timeout=10)
                    smtp.ehlo(f"sender{self.index}.test")
                except (OSError, smtplib.SMTPException):
                    self.failures["connect"] += 1
                    smtp = None
                    self.stop.wait(0.02)  # node down: try again soon (bounded by the deadline)
                    continue
            seq += 1
            mid, msg = make_message(self.index, seq, self.run_id)
            rcpts = [f"{USER}@localhost"] + ([FAR] if seq % 2 == 0 else [])
            with self.lock:
                self.attempted[mid] = msg
                self.recipients[mid] = rcpts
            try:
                code, resp = smtp.mail(f"c{self.index}@example.org")
                for rcpt in rcpts:
                    if code == 250:
                        code, resp = smtp.rcpt(rcpt)
                if code == 250:
                    code, resp = smtp.data(msg)
            except (OSError, smtplib.SMTPException):
                self.failures["session"] += 1
                try:
                    smtp.close()
                except OSError:
                    pass
                smtp = None
                continue
            if code == 250:
                m = QUEUE_ID.match(b"250 " + resp)
                assert m, resp
                with self.lock:
                    self.acked[mid] = m.group(1).decode()
            else:
                self.failures[str(code)] += 1
                try:
                    smtp.rset()
                except (OSError, smtplib.SMTPException):
                    smtp.close()
                    smtp = None
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


def _queue(node: NodeProcess) -> dict[str, tuple[bytes, dict[str, str]]]:
    """
    Queue id -> (stored message, recipient -> recorded status) of every
    queue file in C{queue/new}, checking each is complete and each state
    file is JSON.
    """
    out = {}
    for p in node.queue_files("new"):
        try:
            envelope, offset = read_queue_file(p)
        except CorruptQueueFile as e:
            raise AssertionError(f"a half-written queue file is visible: {e}") from None
        data = p.read_bytes()
        assert len(data) == offset + envelope.size, f"{p}: {len(data)} bytes, header says {offset + envelope.size}"
        status = {}
        state = node.queue / "state" / p.name
        if state.exists():
            raw = state.read_bytes()
            try:
                st = json.loads(raw)
            except ValueError:
                raise AssertionError(f"state file {state} is not JSON: {raw[:80]!r}") from None
            status = {a: s["status"] for a, s in st["recipients"].items()}
        out[p.name] = (data[offset:], status)
    for p in node.queue_files("state"):
        json.loads(p.read_bytes())
    return out


def _local_pending(node: NodeProcess) -> int:
    """Queue files whose local recipient has no final outcome recorded yet."""
    try:
        queue = _queue(node)
    except FileNotFoundError:
        return 1  # a file went away while we read: still moving
    return sum(1 for _, status in queue.values() if status.get(f"{USER}@localhost") != "delivered")


@needs_fuse
@pytest.mark.slow
def test_power_cuts_lose_no_acknowledged_message(tmp_path: Path) -> None:
    """
    Clients send (to a local mailbox, half of the messages also to a relay
    route whose next hop is down, so they stay queued) while the node is
    power-cut 8 to 12 times at random moments: SIGKILL, powerfs cut,
    restart. After a final drain every acknowledged message is in the
    Maildir exactly once, byte-exact, and each one with the queued recipient
    is still in queue/new, byte-exact, with its state file JSON; nothing
    partial is visible in queue/new or the Maildir.
    """
    rng = random.Random()
    seed = int(os.environ.get("POWERLOSS_SEED", random.randrange(1 << 30)))
    rng.seed(seed)
    cuts = rng.randint(*CUTS)
    run = uuid.uuid4().hex[:8]
    pfs = PowerFS.start(tmp_path / "backing", tmp_path / "spool", log=tmp_path / "powerfs.log")
    stop = threading.Event()
    node: NodeProcess | None = None
    senders: list[Sender] = []
    undone: list[int] = []
    try:
        config = NODE_CONFIG.replace("SPOOL", str(pfs.mount)).replace("CLOSED", str(free_port()))
        node = NodeProcess(tmp_path / "node", config_toml=config, name="power")
        node.start()
        senders = [Sender(i, node, run, stop) for i in range(THREADS)]
        for s in senders:
            s.start()
        for k in range(cuts):
            base = sum(s.acked_count() for s in senders)
            wait_for(lambda: sum(s.acked_count() for s in senders) > base, 20.0,
                     f"an acknowledged message after start {k + 1}")
            stop.wait(rng.uniform(0.02, 0.6))  # the random moment of the cut (not a sync)
            node.kill9()  # the process is gone (reaped) before the cut
            undone.append(pfs.cut())
            node.start()
        stop.set()
        for s in senders:
            s.join(timeout=30.0)
            assert not s.is_alive(), f"{s.name} did not stop"
        wait_for(lambda: _local_pending(node) == 0, DRAIN_TIMEOUT, "every local delivery to be recorded")
        # A last cut after the drain: what was recorded stays.
        node.kill9()
        undone.append(pfs.cut())
        node.start()
        wait_for(lambda: _local_pending(node) == 0, DRAIN_TIMEOUT, "every local delivery to be recorded")
        queue = _queue(node)
        assert node.queue_files("corrupt") == [], "a committed queue file was incomplete"
        node.terminate()
        stats = pfs.stats()
    finally:
        stop.set()
        if node is not None:
            node.__exit__(None, None, None)
        pfs.stop()

    attempted: dict[str, bytes] = {}
    acked: dict[str, str] = {}
    recipients: dict[str, list[str]] = {}
    failures: Counter[str] = Counter()
    for s in senders:
        attempted.update(s.attempted)
        acked.update(s.acked)
        recipients.update(s.recipients)
        failures.update(s.failures)

    # The Maildir: complete copies only, each a message some client sent,
    # each acknowledged one exactly once.
    # (read in the backing directory: powerfs is unmounted by now)
    maildir = pfs.backing / node.mailroot.relative_to(pfs.mount) / "localhost" / USER / "Maildir"
    copies: Counter[str] = Counter()
    for p in sorted((maildir / "new").iterdir()) + sorted((maildir / "cur").iterdir()):
        data = p.read_bytes()
        lines = data.count(b"\n")
        assert p.name.endswith(f",S={len(data)},W={len(data) + lines}"), f"partial copy? {p}"
        fields, rest = split_delivered(data)
        mid = parse_message(rest)["Message-ID"]
        assert mid in attempted, f"{p} holds a message no client sent: {mid!r}"
        assert rest == attempted[mid].replace(b"\r\n", b"\n"), f"{p} is not {mid} as sent"
        assert checksum_ok(rest), f"{p}: checksum wrong"
        copies[mid] += 1
    lost_local = [mid for mid in acked if copies[mid] == 0]
    duplicated = {mid: n for mid, n in copies.items() if n > 1}

    # The spool: every acknowledged message for the queued recipient is
    # still there, byte-exact.
    lost_queued = []
    for mid, qid in acked.items():
        if FAR not in recipients[mid]:
            continue
        if qid not in queue:
            lost_queued.append(mid)
            continue
        stored, status = queue[qid]
        assert stored.endswith(attempted[mid]), f"queue file {qid} is not {mid} as sent"
        assert status.get(f"{USER}@localhost") == "delivered", (qid, status)

    report = (
        f"seed={seed} cuts={cuts}+1 undone={undone} (total {sum(undone)}) attempted={len(attempted)}"
        f" acked={len(acked)} lost-local={len(lost_local)} lost-queued={len(lost_queued)}"
        f" duplicated={sum(n - 1 for n in duplicated.values())}"
        f" delivered-without-250={sum(1 for m in copies if m not in acked)} queued={len(queue)}"
        f" client-failures={dict(failures)} powerfs={stats}"
    )
    print("\n" + report)
    Path(os.environ.get("POWERLOSS_REPORT", os.devnull)).write_text(report + "\n")
    assert not lost_local, f"acknowledged, not delivered: {lost_local[:5]} ({report})"
    assert not lost_queued, f"acknowledged, not queued: {lost_queued[:5]} ({report})"
    assert not duplicated, f"copies in the mailbox more than once: {list(duplicated.items())[:5]} ({report})"
    assert len(acked) >= cuts, f"too little traffic for the test to mean anything ({report})"
    assert len(set(acked.values())) == len(acked), "a queue id was given to two messages"
    assert sum(undone) > 0, "no cut undid anything: the test did not test power loss"


# -- a lab on powerfs ---------------------------------------------------------------


def test_power_cut_needs_a_power_fs_lab(tmp_path: Path) -> None:
    """power_cut and disk_full refuse a lab not started with --power-fs, saying how to start one."""
    from relaynet.lab import chaos
    from relaynet.lab.state import Lab, LabError

    lab = Lab(tmp_path)
    lab.data = {"name": "t", "topology": str(tmp_path / "t.toml"), "nodes": {"a": {"config": "x"}}}
    for act in (lambda: chaos.power_cut(lab, "a"), lambda: chaos.disk_full(lab, "a", True)):
        with pytest.raises(LabError, match="--power-fs"):
            act()


@needs_fuse
@pytest.mark.slow
def test_lab_power_fs_chain3(tmp_path: Path) -> None:
    """
    lab up --power-fs mounts a powerfs on every node's spool; power cuts of
    hop2 and a full disk on hop1 (chaos.power_cut, chaos.disk_full) while
    lab send runs lose no acknowledged message (lab check); lab down
    unmounts every powerfs and ends its process.
    """
    import subprocess
    import sys

    from relaynet.lab import chaos
    from relaynet.lab.powerfs import is_mounted
    from relaynet.lab.state import Lab

    root = Path(__file__).resolve().parent.parent
    script = Path(sys.executable).parent / "relaynet"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "relaynet.cli"]
    labdir = tmp_path / "lab"

    def run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=tmp_path)

    # chain3 on addresses and a port of its own: labs on the default ones
    # (127.0.0.2.., 2525) that other test runs start meanwhile would answer
    # for its nodes.
    rnd = random.Random()
    topology = tmp_path / "chain3.toml"
    text = (root / "topologies" / "chain3.toml").read_text()
    assert 'first_address = "127.0.0.2"' in text and "port = 2525" in text
    topology.write_text(
        text.replace('first_address = "127.0.0.2"',
                     f'first_address = "127.{rnd.randint(1, 254)}.{rnd.randint(1, 254)}.2"')
        .replace("port = 2525", f"port = {rnd.randint(20000, 40000)}")
    )
    up = run("lab", "up", str(topology), "--dir", str(labdir), "--power-fs")
    lab = Lab(labdir)
    try:
        assert up.returncode == 0, up.stderr
        lab.load()
        assert lab.data["power_fs"] is True
        mounts = {n: rec["powerfs"]["mount"] for n, rec in lab.nodes.items()}
        assert all(is_mounted(m) and m == lab.nodes[n]["spool"] for n, m in mounts.items()), mounts
        sender = subprocess.Popen(
            [*cli, "lab", "send", "--dir", str(labdir), "-n", "120", "--rate", "40", "--json", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path,
        )
        undone = []
        try:
            wait_for(lambda: labdir.joinpath("sent.jsonl").exists(), 20.0, "the first acknowledged message")
            undone.append(chaos.power_cut(lab, "hop2", print))
            chaos.disk_full(lab, "hop1", True)
            undone.append(chaos.power_cut(lab, "hop2", print))
            chaos.disk_full(lab, "hop1", False)
            undone.append(chaos.power_cut(lab, "hop1", print))
            out, err = sender.communicate(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.communicate(timeout=10)
        summary = json.loads(out)
        assert summary["accepted"] > 0, (summary, err)
        check = run("lab", "check", "--dir", str(labdir), "--wait", "60", "--json")
        report = json.loads(check.stdout)
        print(f"lab power cuts undid {undone}; send {summary['accepted']} accepted,"
              f" {summary['refused']} refused; check {report['verdict'] if 'verdict' in report else report}")
        assert check.returncode == 0, report
        assert report["lost"] == 0 and report["duplicated"] == 0, report
        actions = [json.loads(line)["action"] for line in (labdir / "chaos.jsonl").read_text().splitlines()]
        assert actions.count("power cut") == 3 and "disk full" in actions and "disk freed" in actions
    finally:
        down = run("lab", "down", "--dir", str(labdir))
    assert down.returncode == 0, down.stderr
    print(down.stdout)
    # (SIGTERM when a mount namespace made meanwhile holds a copy of the mount)
    assert len(re.findall(r"powerfs (unmounted|stopped \(SIGTERM\))$", down.stdout, re.M)) == 4, down.stdout
    lab.load()
    for name, rec in lab.nodes.items():
        assert not is_mounted(rec["powerfs"]["mount"]), name
        assert rec["powerfs"]["pid"] is None

    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""  # gone meanwhile

    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(labdir) in cmdline(pid)]
    assert not left, f"processes of the lab still running: {left}"
