"""
The durability contract, tested on a real node process: C{kill -9} at random
moments while clients send, then recovery. Every message a client saw a 250
for must end up in the Maildir, byte-identical (at least once; duplicates only
from the crash window between delivery and recording it); nothing partial is
ever visible in C{queue/new} or a Maildir's C{new/}; C{queue/tmp} is cleaned.
"""

from __future__ import annotations

import hashlib
import random
import smtplib
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from relaynet.queue.spool import SpoolWriter

from harness.nodeproc import (
    HOST, QUEUE_ID, NodeProcess, RawClient, parse_message, split_delivered, wait_for,
)

pytestmark = pytest.mark.slow

THREADS = 4
KILLS = 6
PER_THREAD_MAX = 2000
RUN_LIMIT = 60.0  # seconds: hard bound on the client threads
DRAIN_TIMEOUT = 30.0
USER = "user"
COPY = "copy"  # a second recipient: outcomes are per recipient
RECIPIENTS = (USER, COPY)


def make_message(client: int, seq: int, run: str) -> tuple[str, bytes]:
    """A small message with a unique Message-ID and a checksum line at the end."""
    mid = f"<dur-{run}-{client}-{seq}@test>"
    rnd = random.Random(f"{run}-{client}-{seq}")
    lines = [
        ("%02d " % i + "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(60)))
        .encode()
        for i in range(6)
    ]
    lines.insert(3, b".a line that gets dot-stuffed")
    body = b"\r\n".join(lines) + b"\r\n"
    checksum = hashlib.sha256(body).hexdigest().encode()
    msg = (
        f"Message-ID: {mid}\r\nFrom: c{client}@example.org\r\nTo: {USER}@localhost\r\n"
        f"Subject: durability {client}/{seq}\r\n\r\n".encode()
        + body
        + b"checksum: " + checksum + b"\r\n"
    )
    return mid, msg


def body_checksum_ok(msg: bytes) -> bool:
    """
    The last line is C{checksum: <sha256 of the body before it>}, the body
    as sent (CRLF lines; a Maildir copy stores LF lines).
    """
    head, sep, body = msg.replace(b"\r\n", b"\n").partition(b"\n\n")
    if not sep:
        return False
    payload, _, last = body.rstrip(b"\n").rpartition(b"\n")
    if not last.startswith(b"checksum: "):
        return False
    sent = payload.replace(b"\n", b"\r\n") + b"\r\n"
    return hashlib.sha256(sent).hexdigest().encode() == last[len(b"checksum: "):]


class Sender(threading.Thread):
    """Sends sequential messages, reconnecting (bounded by time) after errors."""

    def __init__(self, index: int, port: int, run: str, stop: threading.Event) -> None:
        super().__init__(name=f"sender-{index}", daemon=True)
        self.index = index
        self.port = port
        self.run_id = run
        self.stop = stop
        self.attempted: dict[str, bytes] = {}
        self.acked: dict[str, str] = {}  # Message-ID -> queue id
        self.failures = Counter()
        self.lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + RUN_LIMIT
        smtp: smtplib.SMTP | None = None
        seq = 0
        while not self.stop.is_set() and seq < PER_THREAD_MAX and time.monotonic() < deadline:
            if smtp is None:
                try:
                    smtp = smtplib.SMTP(HOST, self.port, timeout=5)
                    smtp.ehlo(f"sender{self.index}.test")
                except (OSError, smtplib.SMTPException):
                    self.failures["connect"] += 1
                    smtp = None
                    self.stop.wait(0.02)  # node down: retry soon (bounded by deadline)
                    continue
            seq += 1
            mid, msg = make_message(self.index, seq, self.run_id)
            with self.lock:
                self.attempted[mid] = msg
            try:
                code, resp = smtp.mail(f"c{self.index}@example.org")
                for rcpt in RECIPIENTS:
                    if code == 250:
                        code, resp = smtp.rcpt(f"{rcpt}@localhost")
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


def test_kill9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    run = uuid.uuid4().hex[:8]
    node = NodeProcess(tmp_path, name="chaos")
    node.start()
    stop = threading.Event()
    senders = [Sender(i, node.port, run, stop) for i in range(THREADS)]
    tmp_leftovers = 0
    try:
        for s in senders:
            s.start()
        for k in range(KILLS):
            # Let traffic flow after each (re)start, then crash at a random moment.
            base = sum(s.acked_count() for s in senders)
            wait_for(lambda: sum(s.acked_count() for s in senders) > base, 15.0,
                     f"an acknowledged message after start {k + 1}")
            time.sleep(rng.uniform(0.05, 0.5))  # the random kill moment, not a sync
            node.kill9()
            tmp_leftovers += len(node.queue_files("tmp"))
            if k < KILLS - 1:
                node.start()
        stop.set()
        for s in senders:
            s.join(timeout=20.0)
            assert not s.is_alive(), f"{s.name} did not stop"
        # Recovery.
        node.start()
        wait_for(lambda: not node.queue_files("new"), DRAIN_TIMEOUT, "queue/new to drain")
        wait_for(lambda: not node.queue_files("tmp"), 5.0, "queue/tmp to be empty")
        assert node.queue_files("corrupt") == [], "a committed queue file was incomplete"
        assert node.queue_files("state") == []
    finally:
        stop.set()
        node.__exit__(None, None, None)

    attempted: dict[str, bytes] = {}
    acked: dict[str, str] = {}
    failures: Counter = Counter()
    for s in senders:
        attempted.update(s.attempted)
        acked.update(s.acked)
        failures.update(s.failures)

    report = [f"seed={seed} attempted={len(attempted)} acked={len(acked)}"]
    lost: list[str] = []
    maildir_tmp = 0
    for rcpt in RECIPIENTS:
        maildir = node.mailroot / "localhost" / rcpt / "Maildir"
        copies: Counter = Counter()
        received_ids: dict[str, set[bytes]] = {}
        for p in sorted((maildir / "new").iterdir()) + sorted((maildir / "cur").iterdir()):
            data = p.read_bytes()
            fields, rest = split_delivered(data)
            lines = data.count(b"\n")
            size = f",S={len(data)},W={len(data) + lines}"
            assert p.name.endswith(size), f"sizes in the name disagree: {p}"
            parsed = parse_message(rest)
            assert not parsed.defects, (p, parsed.defects)
            mid = parsed["Message-ID"]
            assert mid in attempted, f"{p} holds a message no client sent: {mid!r}"
            sent = attempted[mid].replace(b"\r\n", b"\n")  # Maildir copies have LF lines
            assert rest == sent, f"{p} is not the message {mid} as sent (partial?)"
            assert body_checksum_ok(rest), f"{p}: checksum line missing or wrong"
            assert fields["delivered-to"] == f"{rcpt}@localhost".encode()
            copies[mid] += 1
            received_ids.setdefault(mid, set()).add(fields["received"])
        lost += [f"{mid} to {rcpt}" for mid in acked if copies[mid] == 0]
        for mid, qid in acked.items():
            if copies[mid]:
                assert any(f" id {qid}".encode() in r for r in received_ids[mid]), (mid, qid)
        duplicates = sum(n - 1 for n in copies.values() if n > 1)
        unacked_delivered = sum(1 for mid in copies if mid not in acked)
        maildir_tmp += len(list((maildir / "tmp").iterdir()))
        report.append(
            f"{rcpt}: delivered-distinct={len(copies)} duplicates={duplicates} "
            f"delivered-without-250={unacked_delivered}"
        )
    report.append(
        f"queue/tmp-leftovers-at-kill={tmp_leftovers} maildir/tmp-leftovers={maildir_tmp} "
        f"client-failures={dict(failures)}"
    )
    print("\n" + "\n".join(report))
    assert not lost, f"{len(lost)} acknowledged deliveries lost, e.g. {lost[:5]} (seed {seed})"
    assert len(acked) >= KILLS, "too little traffic for the test to mean anything"
    assert len(set(acked.values())) == len(acked), "a queue id was given to two messages"
    # The "received" event is written before the 250 leaves the node.
    logged = {
        e["queue_id"] for e in node.events(strict=False) if e.get("event") == "received"
    }
    print(f"events.jsonl lines cut by a crash: {node.bad_event_lines}")
    missing_events = sorted(set(acked.values()) - logged)
    assert not missing_events, f"acknowledged but no received event: {missing_events[:5]}"


def _partial(user: str) -> tuple[bytes, bytes]:
    """
    The first part of a message's data, never finished: larger than what the
    spool keeps in memory (L{SpoolWriter.FLUSH_AT}), so part of it reaches
    queue/tmp while DATA is still open.
    """
    mid, msg = make_message(99, 1, f"half-{user}")
    filler = (b"x" * 76 + b"\r\n") * (2 * SpoolWriter.FLUSH_AT // 78)
    return mid.encode(), msg + filler


def _send_sentinel(node: NodeProcess, user: str) -> bytes:
    msg = f"Message-ID: <sentinel-{user}@test>\r\nSubject: sentinel\r\n\r\nafter\r\n".encode()
    with smtplib.SMTP(HOST, node.port, timeout=15) as s:
        s.ehlo("sentinel.test")
        s.sendmail("a@example.org", [f"{user}@localhost"], msg)
    wait_for(lambda: node.maildir_new(user), 20.0, f"the sentinel for {user}")
    return msg


def _assert_only_sentinel(node: NodeProcess, user: str, sentinel: bytes, mid: bytes) -> None:
    wait_for(lambda: not node.queue_files("new"), 20.0, "queue/new to drain")
    files = node.maildir_new(user)
    assert len(files) == 1, files
    assert split_delivered(files[0].read_bytes())[1] == sentinel.replace(b"\r\n", b"\n")
    for ev in node.events():
        assert ev.get("message_id") != mid.decode(), f"half-sent message was accepted: {ev}"


def test_half_sent_data_then_disconnect_leaves_nothing(tmp_path: Path) -> None:
    user = "half" + uuid.uuid4().hex[:8]
    mid, partial = _partial(user)
    with NodeProcess(tmp_path, name="half") as node:
        c = RawClient(node.port)
        try:
            c.start_data(f"{user}@localhost".encode())
            c.sock.sendall(partial)
            wait_for(lambda: node.queue_files("tmp"), 5.0, "the in-progress file in queue/tmp")
        finally:
            c.close()  # the client goes away in the middle of DATA
        wait_for(lambda: not node.queue_files("tmp"), 10.0,
                 "the aborted message to be removed from queue/tmp")
        assert node.queue_files("new") == []
        sentinel = _send_sentinel(node, user)
        _assert_only_sentinel(node, user, sentinel, mid)


def test_kill9_in_data_is_cleaned_at_restart(tmp_path: Path) -> None:
    user = "crash" + uuid.uuid4().hex[:8]
    mid, partial = _partial(user)
    with NodeProcess(tmp_path, name="crash-data") as node:
        c = RawClient(node.port)
        try:
            c.start_data(f"{user}@localhost".encode())
            c.sock.sendall(partial)
            wait_for(lambda: node.queue_files("tmp"), 5.0, "the in-progress file in queue/tmp")
            node.kill9()
            code, lines = c.reply()
            assert code == 0, (code, lines)  # no reply at all: the process is gone
        finally:
            c.close()
        assert len(node.queue_files("tmp")) == 1  # the crash left it behind...
        assert node.queue_files("new") == []
        node.start()
        assert node.queue_files("tmp") == []  # ...and recovery removed it before listening
        assert node.queue_files("new") == []
        sentinel = _send_sentinel(node, user)
        _assert_only_sentinel(node, user, sentinel, mid)


def _queue_file(envelope: bytes, message: bytes) -> bytes:
    """A queue file in the documented format (header record, envelope line, bytes)."""
    header = b"RELAYNET-QUEUE 1 %010d %012d %04d\n" % (len(envelope), len(message), 1)
    return header + envelope + b"\n" + message


@pytest.mark.parametrize(
    "envelope",
    [
        b'{"version":1,"queue_id":"3CCC0000000000BAD"}',  # keys missing
        b"[1, 2, 3]",  # JSON, but not an object
    ],
    ids=["missing-keys", "not-an-object"],
)
def test_invalid_envelope_is_moved_aside_at_recovery(tmp_path: Path, envelope: bytes) -> None:
    """
    A queue file whose envelope is JSON but not an envelope must not keep the
    node from starting: recovery moves it to queue/corrupt/ like any other
    corrupt queue file, and the node goes on accepting and delivering mail.
    """
    node = NodeProcess(tmp_path, name="bad-envelope", start_timeout=8.0)
    (node.queue / "new").mkdir(parents=True)
    bad = node.queue / "new" / "3CCC0000000000BAD"
    bad.write_bytes(_queue_file(envelope, b"Subject: x\r\n\r\nx\r\n"))
    with node:
        # The queue is recovered in the background once the node listens.
        wait_for(lambda: node.queue_files("corrupt"), 10, "the corrupt queue file moved aside")
        assert [p.name for p in node.queue_files("corrupt")] == [bad.name]
        assert node.queue_files("new") == []
        user = "after" + uuid.uuid4().hex[:8]
        sentinel = _send_sentinel(node, user)
        assert split_delivered(node.maildir_new(user)[0].read_bytes())[1] == sentinel.replace(b"\r\n", b"\n")
