"""
Exactly once between relaynet hops: L{relaynet.queue.window}, the digest
stamped into queue files, the C{XTXN} MAIL parameter, and a real node that
recognises a retransmission across a C{kill -9}.

The in-process network tests (C{tests/test_network.py}) drive the whole path
between two nodes (the upstream's client sending C{XTXN}, a crash before it
records the 250, the retransmission); here are the parts, and a real twistd
node checked from the outside with C{smtplib} and Python's C{mailbox}.
"""

from __future__ import annotations

import hashlib
import json
import mailbox
import re
import smtplib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from harness.nodeproc import RECOVERED, NodeProcess, wait_for
from relaynet.queue.spool import (
    DIGEST_LENGTH, DIGEST_PLACEHOLDER, Envelope, Recipient, Spool, read_queue_file,
)
from relaynet.queue.window import Transfer, TransferWindow
from relaynet.smtp.parse import CommandError, parse_mail
from relaynet.testing import EPOCH, ManualThreadPool, MemorySpool, ThreadlessReactor, replicate_queued


def transfer(origin: str = "up/Q1", digest: str = "a" * 32, rcpts: tuple[str, ...] = ("r@x.test",),
             queue_id: str = "L1", at: float = EPOCH) -> Transfer:
    return Transfer(origin, digest, frozenset(rcpts), queue_id, at)


class Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


def inline(f: Any) -> Deferred[Any]:
    """run_in_thread for tests: run at once."""
    try:
        return succeed(f())
    except Exception as e:  # pragma: no cover - surfaced by the test
        d: Deferred[Any] = Deferred()
        d.errback(e)
        return d


# -- the window in memory -----------------------------------------------------


def test_match_needs_the_same_bytes_and_covers_recipients() -> None:
    w = TransferWindow(None, 3600, 100, Clock())
    w.note(transfer(rcpts=("a@x.test", "b@x.test")))
    found = w.match("up/Q1", "a" * 32)
    assert found.queue_id == "L1" and found.all(["a@x.test"]) and found.all(["a@x.test", "b@x.test"])
    assert not found.all(["a@x.test", "c@x.test"])
    assert w.match("up/Q1", "b" * 32).queue_id is None  # other bytes: a different message
    assert w.match("up/Q2", "a" * 32).queue_id is None  # other transfer: never a duplicate


def test_window_forgets_by_age_and_by_count() -> None:
    clock = Clock()
    w = TransferWindow(None, 100, 2, clock)
    w.note(transfer("up/1", at=clock.now))
    clock.now += 60
    w.note(transfer("up/2", at=clock.now))
    w.note(transfer("up/3", at=clock.now))
    assert len(w) == 2 and w.match("up/1", "a" * 32).queue_id is None  # over the count
    clock.now += 101
    assert w.match("up/2", "a" * 32).queue_id is None and len(w) == 0  # over the age


def test_memory_journal_outlives_the_window() -> None:
    clock = Clock()
    journal: list[Transfer] = []
    env = Envelope("L9", "s@x.test", (Recipient("r@x.test"),), EPOCH,
                   params={"origin": "up/Q9", "digest": "c" * 32})
    w = TransferWindow(None, 3600, 10, clock, memory_journal=journal)
    w.note_envelope(env)
    w.retire(env)
    fresh = TransferWindow(None, 3600, 10, clock, memory_journal=journal)
    fresh.load()
    assert fresh.match("up/Q9", "c" * 32).queue_id == "L9"


# -- the journal on disk --------------------------------------------------------


def test_journal_is_written_before_removal_and_read_at_start(tmp_path: Path) -> None:
    clock = Clock()
    w = TransferWindow(tmp_path / "window", 7200, 100, clock, inline)
    w.load()
    env = Envelope("L1", "s@x.test", (Recipient("a@x.test"), Recipient("b@x.test")), EPOCH,
                   params={"origin": "up/Q1", "digest": "d" * 32})
    w.note_envelope(env)
    d = w.retire(env)
    assert d.called
    no_transfer = Envelope("L2", "s@x.test", (Recipient("a@x.test"),), EPOCH)
    assert w.retire(no_transfer).called  # nothing to journal
    (journal,) = (tmp_path / "window").iterdir()
    (line,) = journal.read_bytes().splitlines()
    assert json.loads(line)["recipients"] == ["a@x.test", "b@x.test"]
    # A crash tore the next append: the torn line is skipped.
    with open(journal, "ab") as f:
        f.write(b'{"origin":"up/Q2","dig')
    again = TransferWindow(tmp_path / "window", 7200, 100, clock, inline)
    assert again.load() == 1
    assert again.match("up/Q1", "d" * 32).all(["a@x.test", "b@x.test"])


def test_journal_files_older_than_the_window_are_deleted(tmp_path: Path) -> None:
    clock = Clock()
    w = TransferWindow(tmp_path / "w", 3600, 100, clock, inline)
    w.load()
    for qid, origin, later in (("L1", "u/1", 3 * 3600), ("L2", "u/2", 0)):
        env = Envelope(qid, "", (Recipient("a@x.test"),), EPOCH, params={"origin": origin, "digest": "e" * 32})
        w.note_envelope(env)
        w.retire(env)
        clock.now += later
    assert len(list((tmp_path / "w").iterdir())) == 1
    fresh = TransferWindow(tmp_path / "w", 3600, 100, clock, inline)
    assert fresh.load() == 1 and fresh.match("u/1", "e" * 32).queue_id is None


def test_journal_write_failure_fails_the_removal(tmp_path: Path) -> None:
    """A journal that cannot be written stops the removal (the message stays queued)."""
    (tmp_path / "w").write_text("not a directory")
    w = TransferWindow(tmp_path / "w", 3600, 100, Clock(), inline)
    env = Envelope("L1", "", (Recipient("a@x.test"),), EPOCH, params={"origin": "u/1", "digest": "e" * 32})
    w.note_envelope(env)
    d = w.retire(env)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and "SpoolError" in repr(failures[0].type)


def test_only_acknowledged_transfers_are_journalled(tmp_path: Path) -> None:
    """
    A transfer the window never held (a cut-through attempt refused it, so
    the client got the refusal, not a 250) leaves no record: sent again, it
    must be queued, not answered as a duplicate.
    """
    w = TransferWindow(tmp_path / "w", 3600, 100, Clock(), inline)
    w.load()
    env = Envelope("L1", "", (Recipient("a@x.test"),), EPOCH, params={"origin": "u/1", "digest": "e" * 32})
    assert w.retire(env).called
    assert list((tmp_path / "w").iterdir()) == [] and w.match("u/1", "e" * 32).queue_id is None


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """A crash tore the hour's last line: the next process starts its record on a line of its own."""
    clock = Clock()
    w = TransferWindow(tmp_path / "w", 7200, 100, clock, inline)
    w.load()
    hour = int(clock.now // 3600)
    (tmp_path / "w" / f"{hour}.jsonl").write_bytes(b'{"origin":"up/Q0","dig')
    env = Envelope("L1", "", (Recipient("a@x.test"),), EPOCH, params={"origin": "up/Q1", "digest": "d" * 32})
    w.note_envelope(env)
    w.retire(env)
    again = TransferWindow(tmp_path / "w", 7200, 100, clock, inline)
    assert again.load() == 1 and again.match("up/Q1", "d" * 32).queue_id == "L1"


# -- the digest stamped into the queue file -------------------------------------


@pytest.mark.parametrize("size", [100, 700_000])
def test_digest_is_written_into_the_queue_file(tmp_path: Path, size: int) -> None:
    """Small (one write at commit) and streamed (written in chunks, then stamped in place)."""
    reactor = ThreadlessReactor()
    pool = ManualThreadPool(immediate=True)
    spool = Spool(tmp_path / "q", reactor, pool, clock=lambda: EPOCH)  # type: ignore[arg-type]
    spool.prepare()
    env = Envelope(spool.new_id(), "s@x.test", (Recipient("r@x.test"),), EPOCH,
                   params={"origin": "up/Q1", "digest": DIGEST_PLACEHOLDER}, node="n")
    writer = spool.begin(env)
    body = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n"
    writer.write(body)
    digest = hashlib.sha256(body).hexdigest()[:DIGEST_LENGTH]
    d = writer.commit(1, digest)
    entry = d.result
    assert entry.envelope.params["digest"] == digest
    on_disk, offset = read_queue_file(Path(entry.path))
    assert on_disk.params["digest"] == digest and on_disk.params["origin"] == "up/Q1"
    assert Path(entry.path).read_bytes()[offset:] == body


def test_memory_spool_stamps_the_digest_too() -> None:
    spool = MemorySpool()
    env = Envelope(spool.new_id(), "s@x.test", (Recipient("r@x.test"),), EPOCH,
                   params={"origin": "up/Q1", "digest": DIGEST_PLACEHOLDER})
    writer = spool.begin(env)
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    writer.commit(1, "f" * 32)
    (recovered,) = spool.recover()
    assert recovered.envelope.params["digest"] == "f" * 32


# -- the MAIL parameter ----------------------------------------------------------


def test_xtxn_is_parsed_only_when_offered() -> None:
    req = parse_mail(b"FROM:<a@x.test> XTXN=hop1/ABC+2B", size_limit=None, transfer_allowed=True)
    assert req.transfer == "hop1/ABC+"
    with pytest.raises(CommandError) as e:
        parse_mail(b"FROM:<a@x.test> XTXN=hop1/ABC", size_limit=None)
    assert (e.value.code, e.value.enhanced) == (555, "5.5.4")
    with pytest.raises(CommandError) as e:
        parse_mail(b"FROM:<a@x.test> XTXN=no-slash", size_limit=None, transfer_allowed=True)
    assert (e.value.code, e.value.enhanced) == (501, "5.5.4")
    assert not req.again


def test_xtxnagain_goes_with_xtxn() -> None:
    """C{XTXNAGAIN}: no value, only beside C{XTXN}, only when offered."""
    req = parse_mail(b"FROM:<a@x.test> XTXN=hop1/ABC xtxnagain", size_limit=None, transfer_allowed=True)
    assert (req.transfer, req.again) == ("hop1/ABC", True)
    for bad, code in ((b"FROM:<a@x.test> XTXNAGAIN", 501), (b"FROM:<a@x.test> XTXN=hop1/A XTXNAGAIN=1", 501)):
        with pytest.raises(CommandError) as e:
            parse_mail(bad, size_limit=None, transfer_allowed=True)
        assert (e.value.code, e.value.enhanced) == (code, "5.5.4")
    with pytest.raises(CommandError) as e:
        parse_mail(b"FROM:<a@x.test> XTXN=hop1/ABC XTXNAGAIN", size_limit=None)
    assert (e.value.code, e.value.enhanced) == (555, "5.5.4")


# -- a real node ------------------------------------------------------------------

QUEUED = re.compile(r"queued as ([0-9A-Z]+)")


def offers_xtxn(port: int) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("upstream.test")
        return bool(s.has_extn("xtxn"))


def send(port: int, origin: str | None, body: bytes, rcpts: list[str], again: bool = False) -> tuple[int, str]:
    """
    One transfer, named C{origin} if given (C{XTXNAGAIN} too if C{again}),
    to a node offering C{XTXN AGAIN}; @return: the reply to its final dot.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("upstream.test")
        assert (s.esmtp_features.get("xtxn") or "").split() == ["AGAIN"], s.esmtp_features
        options = ([f"XTXN={origin}"] if origin else []) + (["XTXNAGAIN"] if again else [])
        code, text = s.mail("sender@src.test", options)
        assert code == 250, text
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        try:
            code, reply = s.data(body)
        except smtplib.SMTPDataError as e:
            error = e.smtp_error
            return e.smtp_code, error.decode() if isinstance(error, bytes) else error
        return code, reply.decode()


@pytest.mark.slow
def test_real_node_recognises_a_retransmission_across_kill_9(tmp_path: Path) -> None:
    """
    A real node: the same transfer (XTXN, bytes, recipient) sent again is
    answered 250 with the original queue id and delivered once, before and
    after the node is killed with -9 and restarted (by then the message has
    left the queue, so the journal remembers it); another transfer with the
    same bytes, and the same transfer with a new recipient, are delivered.
    Checked with Python's C{mailbox} and the event log.
    """
    body = b"From: <sender@src.test>\r\nSubject: once\r\nMessage-ID: <once@src.test>\r\n\r\nhello\r\n"
    with NodeProcess(tmp_path, name="window") as node:

        def journalled() -> list[str]:
            """The journal's origins, read with Python's json line by line."""
            origins = []
            for f in sorted((node.queue / "window").glob("*.jsonl")):
                for line in f.read_bytes().splitlines():
                    try:
                        origins.append(json.loads(line)["origin"])
                    except ValueError:
                        pass  # empty, or the torn end of a write cut by kill -9
            return origins

        # XTXN is offered from the first 220 on.
        assert offers_xtxn(node.port)
        code, reply = send(node.port, "hop0/QID1", body, ["user@localhost"])
        assert code == 250
        first = QUEUED.search(reply)
        assert first
        code, reply = send(node.port, "hop0/QID1", body, ["user@localhost"])
        assert code == 250 and first.group(1) in reply
        # Killed once the message has left the queue: only the journal holds
        # the transfer then. (Killed before, the queue holds it, and a
        # retransmission that came before the background recovery read it
        # back would be queued: it is not marked XTXNAGAIN. A fresh-clone CI
        # run on a loaded machine killed it that early.)
        wait_for(lambda: journalled() == ["hop0/QID1"], 20, "the first transfer in the journal")
        node.kill9()
        node.start()
        # XTXN is offered at once, while the queue is recovered in the
        # background (a retransmission not found meanwhile would get 451).
        assert offers_xtxn(node.port)
        code, reply = send(node.port, "hop0/QID1", body, ["user@localhost"])
        assert code == 250 and first.group(1) in reply, reply
        # Not duplicates: another transfer name; a recipient not yet accepted.
        assert send(node.port, "hop0/QID2", body, ["user@localhost"])[0] == 250
        assert send(node.port, "hop0/QID1", body, ["user@localhost", "other@localhost"])[0] == 250
        assert send(node.port, None, body, ["user@localhost"])[0] == 250
        box = mailbox.Maildir(node.mailroot / "localhost" / "user" / "Maildir", create=False)

        def settled() -> bool:
            return len(list(box.iterkeys())) >= 4 and len(node.maildir_new("other")) >= 1

        wait_for(settled, 20, "four copies for user, one for other")
        assert len(list(box.iterkeys())) == 4
        assert {box[k]["Message-ID"] for k in box.iterkeys()} == {"<once@src.test>"}
        events = [json.loads(line) for line in node.events_path.read_text().splitlines()]
        dups = [e for e in events if e["event"] == "duplicate"]
        assert len(dups) == 2 and {e["queue_id"] for e in dups} == {first.group(1)}

        # The journal: every transfer that left the queue, the one before
        # the kill and the two after.
        wait_for(lambda: len(journalled()) >= 3, 20, "three transfers in the journal")
        assert sorted(journalled()) == ["hop0/QID1", "hop0/QID1", "hop0/QID2"]


def fill_queue(queue_dir: Path, count: int, now: float, held: bool = True) -> None:
    """
    Add C{count} messages to the queue of a stopped node, as a node with a
    big queue has: held (nothing attempts them), or due at once.
    """
    env = Envelope(queue_id="", sender="bulk@src.test",
                   recipients=(Recipient("user@remote.test", route="relay:0"),), arrival=now, params={},
                   client={"ip": "127.0.0.1", "helo": "src.test", "protocol": "ESMTP"}, node="source")
    state = json.dumps({"version": 1, "next_attempt": None, "held": True, "delay_warned": False,
                        "recipients": {}}).encode() if held else None
    replicate_queued(queue_dir, env, lambda _: b"Subject: filler\r\n\r\n" + b"x" * 76 + b"\r\n", count,
                     now=now, state=state)


@pytest.mark.slow
def test_real_node_delivers_recovered_mail_while_it_still_reads_the_queue(tmp_path: Path) -> None:
    """
    A real node restarted on a queue of 20,000 messages due for a next hop
    that is up (Postfix's smtp-sink) delivers the ones it has read while it
    still reads the rest: its log shows C{sent} lines before its
    "recovered" line (the node wrote both in order, on its reactor), and
    the sink receives every message once the recovery is done.
    """
    from harness.peers import SMTP_SINK, SmtpSink, allow_postfix_search, free_port, missing_binaries

    if missing_binaries([SMTP_SINK]):
        pytest.skip("smtp-sink (Debian's postfix) is not installed")
    port = free_port()
    route = (f'[[route]]\ndomains = ["remote.test"]\naction = "relay"\n'
             f'[[route.next_hops]]\nendpoint = "tcp:127.0.0.1:{port}"\n')
    count = 20_000
    with NodeProcess(tmp_path, name="recovering", extra_toml=route) as node:
        node.terminate()
        fill_queue(node.queue, count, time.time(), held=False)
        with SmtpSink(allow_postfix_search(tmp_path) / "sink", port=port) as sink:
            mark = len(node.log_text())
            node.start()
            wait_for(lambda: RECOVERED.search(node.log_text()[mark:]), 120, "the queue recovered")
            log = node.log_text()[mark:]
            recovered = RECOVERED.search(log)
            assert recovered
            sent_before = log[:recovered.start()].count("] sent queue_id=")
            assert sent_before > 0, f"nothing was delivered while the queue was read: {recovered.group(0)}"
            sink.wait_received(count, timeout=180)
            wait_for(lambda: not node.queue_files("new"), 60, "the delivered queue files removed")
            assert sink.received() == count


@pytest.mark.slow
def test_real_node_delivers_new_mail_while_a_recovered_backlog_drains(tmp_path: Path) -> None:
    """
    A real node restarted on 20,000 messages due for one next hop (an
    smtp-sink) takes a new message for another destination (a second
    smtp-sink) once the backlog is read and being delivered, and delivers
    it long before the backlog is drained: new mail and the backlog take
    free slots in turn, as in Postfix. Before, it was attempted after every
    message of the backlog that was due before it. The two sinks' own
    counters tell the order.
    """
    from harness.peers import SMTP_SINK, SmtpSink, allow_postfix_search, free_port, missing_binaries

    if missing_binaries([SMTP_SINK]):
        pytest.skip("smtp-sink (Debian's postfix) is not installed")
    old_port, new_port = free_port(), free_port()
    route = (f'[[route]]\ndomains = ["remote.test"]\naction = "relay"\n'
             f'[[route.next_hops]]\nendpoint = "tcp:127.0.0.1:{old_port}"\n'
             f'[[route]]\ndomains = ["other.test"]\naction = "relay"\n'
             f'[[route.next_hops]]\nendpoint = "tcp:127.0.0.1:{new_port}"\n')
    count = 20_000
    base = allow_postfix_search(tmp_path)
    with NodeProcess(tmp_path, name="recovering", extra_toml=route) as node:
        node.terminate()
        fill_queue(node.queue, count, time.time(), held=False)
        with SmtpSink(base / "old", port=old_port) as old, SmtpSink(base / "new", port=new_port) as new:
            mark = len(node.log_text())
            node.start()
            wait_for(lambda: RECOVERED.search(node.log_text()[mark:]) and old.received() > 0, 120,
                     "the queue recovered and its delivery begun")
            with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:
                s.sendmail("sender@src.test", ["user@other.test"], b"Subject: new\r\n\r\nnew mail\r\n")
            left = count - old.received()
            assert left > count // 4, f"the backlog was drained before the new message came ({left} left)"
            new.wait_received(1, timeout=60)
            left_then = count - old.received()
            assert left_then > left // 2, (
                f"the new message waited for the backlog: {left} were left when it was accepted, "
                f"{left_then} when it was delivered")
            old.wait_received(count, timeout=180)
            wait_for(lambda: not node.queue_files("new"), 60, "the delivered queue files removed")
            assert old.received() == count and new.received() == 1


@pytest.mark.slow
def test_real_node_recovering_a_big_queue_names_transfers_and_makes_retransmissions_wait(
        tmp_path: Path) -> None:
    """
    A real node restarted on a queue of 40,000 messages answers its first
    220 at once and recovers the queue in the background. Meanwhile:
     - it offers XTXN, and a first transfer is queued (a new queue id) and
       remembered under its name: sent again after the recovery, it is
       recognised (the lab's power-cut test found such a transfer accepted
       unnamed during recovery, and queued twice);
     - a transfer made again (XTXNAGAIN) that it does not hold yet gets
       451 4.3.0 (it could be among the messages not read yet), and a reject
       event; the one that is in the queue gets 451 or, once read, 250 with
       its queue id: never a second copy.
    After the recovery, a transfer made again that it never took is queued.
    Mail for remote.test waits for a next hop that refuses: it stays queued.
    """
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    route = (f'[[route]]\ndomains = ["remote.test"]\naction = "relay"\n'
             f'[[route.next_hops]]\nendpoint = "tcp:127.0.0.1:{dead.getsockname()[1]}"\n')
    body = b"From: <sender@src.test>\r\nSubject: named\r\n\r\nhello\r\n"
    try:
        with NodeProcess(tmp_path, name="recovering", extra_toml=route) as node:
            code, reply = send(node.port, "up/QUEUED", body, ["user@remote.test"])
            assert code == 250, reply
            queued = QUEUED.search(reply)
            assert queued
            node.kill9()
            fill_queue(node.queue, 40_000, time.time())
            node.start()
            mark = len(node.log_text())
            unknown = send(node.port, "up/UNKNOWN", body, ["user@remote.test"], again=True)
            first = send(node.port, "up/FIRST", body, ["user@remote.test"])
            again = send(node.port, "up/QUEUED", body, ["user@remote.test"], again=True)
            recovered = RECOVERED.search(node.log_text()[mark:])
            assert recovered is None, f"the queue was recovered before the probes: {recovered}"
            assert unknown[0] == 451 and unknown[1].startswith("4.3.0 Try again later"), unknown
            assert first[0] == 250 and QUEUED.search(first[1]), first
            first_id = QUEUED.search(first[1]).group(1)  # type: ignore[union-attr]
            assert first_id != queued.group(1)
            assert again[0] == 451 or (again[0] == 250 and queued.group(1) in again[1]), again
            wait_for(lambda: RECOVERED.search(node.log_text()[mark:]), 120, "the queue recovered")
            for origin, qid in (("up/FIRST", first_id), ("up/QUEUED", queued.group(1))):
                code, reply = send(node.port, origin, body, ["user@remote.test"], again=True)
                assert code == 250 and qid in reply, (origin, reply)
            code, reply = send(node.port, "up/UNKNOWN", body, ["user@remote.test"], again=True)
            assert code == 250 and QUEUED.search(reply), reply
            events = node.events(strict=False)
            rejects = [e for e in events if e["event"] == "reject" and e.get("origin") == "up/UNKNOWN"]
            assert rejects and rejects[0]["code"] == 451 and rejects[0]["dsn"] == "4.3.0", rejects
            received = [e["queue_id"] for e in events if e["event"] == "received"]
            assert received.count(first_id) == 1 and received.count(queued.group(1)) == 1
            assert len(received) == 3, received  # QUEUED, FIRST, and UNKNOWN after the recovery
    finally:
        dead.close()
