"""
End-to-end tests of a real C{twistd -n relaynet} process: SMTP in over
loopback (smtplib, raw sockets, swaks), Maildir files out, the command line,
signals, the embedded default config and a 50 MB message.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import mailbox
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from harness.nodeproc import (
    DEFAULT_CONFIG, HOST, QUEUE_ID, TWISTD, NodeProcess, NodeStartError, RawClient, free_port, port_is_free,
    relaynet_command, split_delivered, wait_for,
)

from relaynet.delivery.mailbox import crlf_to_lf
from relaynet.queue.spool import read_queue_file

pytestmark = pytest.mark.slow

DELIVERY_TIMEOUT = 20.0
SWAKS = shutil.which("swaks")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """One node shared by the tests that do not stop or signal it."""
    with NodeProcess(tmp_path_factory.mktemp("e2e-node"), name="e2e") as n:
        yield n


def _token() -> str:
    return uuid.uuid4().hex[:12]


def send(port: int, sender: str, rcpts: list[str], msg: bytes,
         mail_options: tuple[str, ...] = ()) -> tuple[int, bytes]:
    """One transaction with smtplib; @return: the reply to the final dot."""
    with smtplib.SMTP(HOST, port, timeout=30) as s:
        s.ehlo("e2e.client")
        code, resp = s.mail(sender, list(mail_options))
        assert code == 250, (code, resp)
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, (r, code, resp)
        return s.data(msg)


def queue_id_of(code: int, resp: bytes) -> str:
    line = b"%d %s" % (code, resp)
    m = QUEUE_ID.match(line)
    assert m, f"250 reply not of the form '250 2.0.0 Ok: queued as ID': {line!r}"
    return m.group(1).decode()


NL = b"\n"


def lf(msg: bytes) -> bytes:
    """C{msg} as a Maildir file holds it: LF line ends."""
    return msg.replace(b"\r\n", b"\n")


def delivered_one(n: NodeProcess, user: str, timeout: float = DELIVERY_TIMEOUT) -> Path:
    files = wait_for(lambda: n.maildir_new(user), timeout, f"delivery to {user}@localhost")
    assert len(files) == 1, files
    return files[0]


def assert_queue_new_complete(n: NodeProcess) -> None:
    """Every file in queue/new is a whole queue file (header, envelope, all bytes)."""
    for p in n.queue_files("new"):
        env, offset = read_queue_file(p)
        assert p.stat().st_size == offset + env.size, f"half-written queue file {p}"


# ---------------------------------------------------------------------------
# Byte-exact delivery
# ---------------------------------------------------------------------------


def message_with_headers(token: str) -> bytes:
    long_line = b"L" * 998  # 998 octets + CRLF: the longest line RFC 5321 allows
    return (
        b"Message-ID: <e2e-" + token.encode() + b"@test>\r\n"
        b"From: Alice <a@example.org>\r\n"
        b"To: u1@localhost, u2@localhost\r\n"
        b"Subject: byte exact\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".leading dot\r\n"
        b"..two leading dots\r\n"
        b".\r\n"
        b". \r\n"
        b"From the start of a line\r\n"
        b"8-bit: \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xff\xfe\x80\r\n"
        b"trailing blanks   \t\r\n"
        b"\r\n"
        b"\r\n"
        + long_line + b"\r\n"
        b"last line .\r\n"
    )


def message_without_colon(token: str) -> bytes:
    return (
        b"This first line has no colon " + token.encode() + b"\r\n"
        b"Message-ID: <e2e-nocolon-" + token.encode() + b"@test>\r\n"
        b"\r\n"
        b".\r\n"
        b"..\r\n"
        b"body \xe4\xf6\xfc\r\n"
    )


@pytest.mark.parametrize("make", [message_with_headers, message_without_colon])
def test_two_local_users_byte_identical(node: NodeProcess, make) -> None:
    token = _token()
    users = [f"u1{token}", f"u2{token}"]
    msg = make(token)
    code, resp = send(
        node.port, "a@example.org", [f"{u}@localhost" for u in users], msg,
        ("BODY=8BITMIME",),
    )
    assert code == 250, (code, resp)
    qid = queue_id_of(code, resp)
    for user in users:
        path = delivered_one(node, user)
        data = path.read_bytes()
        fields, rest = split_delivered(data)
        assert fields["return-path"] == b"<a@example.org>"
        assert fields["delivered-to"] == f"{user}@localhost".encode()
        assert f" id {qid}".encode() in fields["received"], fields["received"]
        assert b"\r" not in data, "a Maildir file has LF line ends"
        assert rest == lf(msg), "delivered message differs from what was sent"
        assert path.name.endswith(f",S={len(data)},W={len(data) + data.count(NL)}"), path.name


def test_maildir_file_read_by_independent_readers(node: NodeProcess) -> None:
    """
    A delivered file is a standard Maildir message with LF line ends
    (maildir(5), Dovecot, Postfix's local): Python's C{mailbox.Maildir} lists
    and reads it and the C{email} parser sees the trace fields, the headers
    and the body, with no CR anywhere.
    """
    token = _token()
    user = f"mbox{token}"
    body = "line one\r\n\r\n.dot line\r\nlast line\r\n"
    msg = f"Message-ID: <mbox-{token}@test>\r\nSubject: reader {token}\r\n\r\n{body}".encode()
    assert send(node.port, "a@example.org", [f"{user}@localhost"], msg)[0] == 250
    path = delivered_one(node, user)
    md = mailbox.Maildir(path.parent.parent, factory=None, create=False)
    (key,) = md.keys()
    got = md[key]
    assert got["Return-Path"] == "<a@example.org>"
    assert got["Delivered-To"] == f"{user}@localhost"
    assert got["Subject"] == f"reader {token}"
    assert got["Message-ID"] == f"<mbox-{token}@test>"
    assert got.get_payload() == body.replace("\r\n", "\n")
    raw = md.get_bytes(key)
    assert b"\r" not in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert not parsed.defects
    assert parsed.get_content() == body.replace("\r\n", "\n")
    assert parsed["Received"] is not None


def _state(n: NodeProcess, qid: str) -> dict | None:
    """The parsed state file of C{qid}, or C{None} while there is none."""
    import json

    try:
        return json.loads((n.queue / "state" / qid).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _delivered_events(n: NodeProcess, qid: str) -> list[dict]:
    return [e for e in n.events(strict=False)
            if e.get("queue_id") == qid and e["event"] == "delivered"]


def test_local_delivery_repeated_after_crash_writes_one_copy(tmp_path: Path) -> None:
    """
    A local delivery repeated after a crash that came after the Maildir copy
    was fsynced but before the state file recorded the outcome finds the copy
    it wrote: the node records the recipient as delivered and retires the
    message, and the mailbox still holds exactly one copy.

    The crash window is rebuilt on disk: the first attempt is made to fail
    (C{Maildir/new} is a file), which records a deferred state; with that
    queue file and state saved, the node delivers; then it is killed and
    the queue file and the old state file are put back, as a power loss
    between the copy and the state write leaves them.
    """
    import json

    with NodeProcess(tmp_path, name="once") as n:
        user = f"once{_token()}"
        box = n.mailroot / "localhost" / user / "Maildir"
        box.mkdir(parents=True)
        (box / "new").write_bytes(b"not a directory")
        msg = b"Subject: exactly once\r\nMessage-ID: <once@test>\r\n\r\nonce\r\n"
        code, resp = send(n.port, "a@example.org", [f"{user}@localhost"], msg)
        assert code == 250, (code, resp)
        qid = queue_id_of(code, resp)
        state = wait_for(
            lambda: (st := _state(n, qid)) and st["recipients"].get(f"{user}@localhost")
            and st["recipients"][f"{user}@localhost"]["status"] == "deferred" and st,
            DELIVERY_TIMEOUT, f"a deferred state for {qid}",
        )
        queue_file = (n.queue / "new" / qid).read_bytes()
        n.kill9()

        # Let the next attempt run at once and succeed.
        state["next_attempt"] = 0
        old_state = json.dumps(state)
        (n.queue / "state" / qid).write_text(old_state)
        (box / "new").unlink()
        n.start()
        wait_for(lambda: not n.queue_files("new") and _delivered_events(n, qid),
                 DELIVERY_TIMEOUT, f"{qid} delivered and retired")
        [copy] = n.maildir_new(user)
        n.kill9()

        # The crash window: the copy is in the Maildir, the spool is as it
        # was before the outcome was recorded.
        (n.queue / "new" / qid).write_bytes(queue_file)
        (n.queue / "state" / qid).write_text(old_state)
        n.start()
        wait_for(lambda: not n.queue_files("new") and len(_delivered_events(n, qid)) == 2,
                 DELIVERY_TIMEOUT, f"{qid} delivered and retired again")
        assert _delivered_events(n, qid)[-1]["recipient"] == f"{user}@localhost"
        assert n.maildir_new(user) == [copy]
        assert list((box / "cur").iterdir()) == []
        md = mailbox.Maildir(box, factory=None, create=False)
        [got] = list(md)
        assert got["Subject"] == "exactly once"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_crlf_to_lf_across_chunk_boundaries(size: int) -> None:
    """
    The streaming conversion gives the same bytes whatever the chunk size,
    a CRLF split between two chunks included; a CR not before an LF stays.
    """
    data = b"a\r\nb\r\n\r\nc\rd\r\n\r"
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    assert b"".join(crlf_to_lf(chunks)) == b"a\nb\n\nc\rd\n\r"


def test_queue_id_in_reply_received_and_events(node: NodeProcess) -> None:
    token = _token()
    user = f"ev{token}"
    mid = f"<ev-{token}@test>"
    msg = f"Message-ID: {mid}\r\nSubject: events\r\n\r\nhello\r\n".encode()
    code, resp = send(node.port, "s@example.org", [f"{user}@localhost"], msg)
    assert code == 250
    line = b"250 " + resp
    assert re.fullmatch(rb"250 2\.0\.0 Ok: queued as [0-9A-Z]+", line), line
    qid = queue_id_of(code, resp)

    fields, rest = split_delivered(delivered_one(node, user).read_bytes())
    assert re.search(rb"\bid " + qid.encode() + rb"\b", fields["received"]), fields["received"]
    assert rest == lf(msg)

    def events_for():
        evs = [e for e in node.events() if e.get("queue_id") == qid]
        kinds = {e["event"] for e in evs}
        return evs if {"received", "delivered"} <= kinds else None

    evs = wait_for(events_for, DELIVERY_TIMEOUT, f"received+delivered events for {qid}")
    received = [e for e in evs if e["event"] == "received"]
    assert len(received) == 1, evs
    assert received[0]["message_id"] == mid
    assert received[0]["sender"] == "s@example.org"
    assert received[0]["recipients"] == [f"{user}@localhost"]
    delivered = [e for e in evs if e["event"] == "delivered"]
    assert [e["recipient"] for e in delivered] == [f"{user}@localhost"]


# ---------------------------------------------------------------------------
# swaks
# ---------------------------------------------------------------------------


def run_swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    if SWAKS is None:
        pytest.skip("swaks is not installed (apt-get install swaks, or `make peers`)")
    return subprocess.run(
        [SWAKS, "--server", f"{HOST}:{port}", "--from", "a@example.org",
         "--timeout", "20", *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("extra", [(), ("--pipeline",)], ids=["plain", "pipeline"])
def test_swaks_delivers(node: NodeProcess, extra: tuple[str, ...]) -> None:
    token = _token()
    user = f"swaks{token}"
    r = run_swaks(node.port, "--to", f"{user}@localhost",
                  "--header", f"Subject: swaks {token}", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"<-\s+250 2\.0\.0 Ok: queued as [0-9A-Z]+", r.stdout), r.stdout
    if extra:
        assert "PIPELINING" in r.stdout
    data = delivered_one(node, user).read_bytes()
    assert f"Subject: swaks {token}".encode() in data


def test_swaks_unroutable_domain_refused(node: NodeProcess) -> None:
    r = run_swaks(node.port, "--to", "nobody@example.com")
    assert r.returncode != 0, r.stdout
    assert re.search(r"<\*\*\s+55[04] ", r.stdout), r.stdout
    assert "queued as" not in r.stdout
    for p in node.queue_files("new"):
        env, _ = read_queue_file(p)
        assert all(rc.address != "nobody@example.com" for rc in env.recipients), p


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def test_twistd_help_lists_options(tmp_path: Path) -> None:
    r = subprocess.run([str(TWISTD), "relaynet", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for opt in ("--config", "--listen", "--spool"):
        assert opt in r.stdout, r.stdout


BAD_TOML = '[node]\nname = "x"\n\n[limits]\nmax_message_size = 1000000\nfrobnicate = 3\n'
GOOD_TOML = (
    '[node]\nname = "checked"\nspool = "sp"\n\n[[listener]]\n'
    'endpoint = "tcp:2599:interface=127.0.0.1"\n\n[limits]\nmax_message_size = 123456\n'
)


def test_twistd_unknown_key_fails_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    r = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "relaynet", "--config", str(bad)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert str(bad) in out, out
    assert "limits.frobnicate" in out, out
    assert not (tmp_path / "var").exists()


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD_TOML)
    r = subprocess.run([*relaynet_command(), "check-config", str(good)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'name = "checked"' in r.stdout
    assert "max_message_size = 123456" in r.stdout
    assert "tcp:2599:interface=127.0.0.1" in r.stdout
    assert str(tmp_path / "sp") in r.stdout  # relative to the file's directory
    assert "max_recipients = 1000" in r.stdout  # defaults are shown too

    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    r = subprocess.run([*relaynet_command(), "check-config", str(bad)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert str(bad) in r.stderr and "limits.frobnicate" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------


def assert_clean_exit(n: NodeProcess, rc: int) -> None:
    """
    twistd re-raises the stopping signal after a clean shutdown (Twisted
    >= 17), so a SIGTERM-stopped node exits with 0 or -SIGTERM; the log tells
    a clean stop from a crash.
    """
    assert rc in (0, -signal.SIGTERM), f"exit status {rc}:\n{n.log_tail()}"
    assert "relaynet node" in n.log_text() and "stopped" in n.log_text(), n.log_tail()
    assert "Traceback" not in n.log_text(), n.log_tail()


def test_sigterm_idle_session_gets_421(tmp_path: Path) -> None:
    with NodeProcess(tmp_path, name="term-idle") as n:
        c = RawClient(n.port)
        try:
            assert c.cmd(b"EHLO idle.client")[0] == 250
            n.signal(signal.SIGTERM)
            code, lines = c.reply()
            assert code == 421, lines
            assert lines[0].startswith(b"421 4.3.2"), lines
            assert c.reply() == (0, [])  # then the server closes
        finally:
            c.close()
        rc = n.wait_exit(5.0)
        assert_clean_exit(n, rc)


def _sigterm_seen(n: NodeProcess) -> bool:
    return "Received SIGTERM" in n.log_text()


def test_sigterm_during_data_completes_or_leaves_nothing(tmp_path: Path) -> None:
    token = _token()
    user = f"mid{token}"
    msg_head = f"Message-ID: <mid-{token}@test>\r\nSubject: mid-DATA\r\n\r\n".encode()
    msg_tail = b"".join(b"line %04d of the body\r\n" % i for i in range(200))
    with NodeProcess(tmp_path, name="term-data") as n:
        c = RawClient(n.port)
        try:
            c.start_data(f"{user}@localhost".encode())
            c.sock.sendall(msg_head + msg_tail[: len(msg_tail) // 2])
            n.signal(signal.SIGTERM)
            wait_for(lambda: _sigterm_seen(n), 10.0, "the node to log SIGTERM")
            try:
                c.sock.sendall(msg_tail[len(msg_tail) // 2:] + b".\r\n")
            except OSError:
                pass
            code, lines = c.reply()
            assert code in (250, 421, 0), (code, lines)
            qid = None
            if code == 250:
                qid = queue_id_of(250, lines[0][4:])
                follow = c.reply()
                assert follow[0] in (421, 0), follow
        finally:
            c.close()
        rc = n.wait_exit(15.0)
        print(f"\nSIGTERM in DATA: client got {code}, queue id {qid}, node exit status {rc}")
        assert_clean_exit(n, rc)
        assert_queue_new_complete(n)
        assert n.queue_files("tmp") == [], "clean stop left files in queue/tmp"
        queued = [p.name for p in n.queue_files("new")]
        delivered = n.maildir_new(user)
        if qid is None:
            assert queued == [] and delivered == [], (queued, delivered)
            return
        assert queued == [qid] or len(delivered) == 1, (qid, queued, delivered)
        # After a restart the message is delivered, exactly once.
        n.start()
        wait_for(lambda: not n.queue_files("new"), DELIVERY_TIMEOUT, "the queue to drain")
        files = n.maildir_new(user)
        assert len(files) == 1, files
        assert split_delivered(files[0].read_bytes())[1] == lf(msg_head + msg_tail)


def test_sigterm_with_stalled_data_is_bounded(tmp_path: Path) -> None:
    """A client that stalls in DATA cannot keep the node from stopping."""
    user = f"stall{_token()}"
    with NodeProcess(tmp_path, name="term-stall") as n:
        c = RawClient(n.port, timeout=30.0)
        try:
            c.start_data(f"{user}@localhost".encode())
            # More than the spool holds in memory (SpoolWriter.FLUSH_AT): part is on disk.
            c.sock.sendall(b"Subject: stalled\r\n\r\n" + b"part of a body\r\n" * 20000)
            wait_for(lambda: n.queue_files("tmp"), 5.0, "the in-progress queue file")
            n.signal(signal.SIGTERM)
            rc = n.wait_exit(20.0)
            code, lines = c.reply()
            assert code in (421, 0), (code, lines)
        finally:
            c.close()
        assert_clean_exit(n, rc)
        assert n.queue_files("new") == []
        assert n.queue_files("tmp") == []
        assert n.maildir_new(user) == []


def test_startup_failure_exits_nonzero(tmp_path: Path) -> None:
    """
    A node that cannot start (here: its event log path is a directory) must
    exit non-zero with the reason in its log, not hang without a listener.
    """
    n = NodeProcess(tmp_path, name="cannot-start", start_timeout=10.0)
    n.events_path.mkdir(parents=True)
    with pytest.raises(NodeStartError) as info:
        n.start()
    try:
        assert "exited with" in str(info.value), (
            "the node neither listened nor exited within 10 s:\n" + str(info.value)
        )
        assert n.proc is not None and n.proc.returncode not in (0, None)
        assert "events.jsonl" in str(info.value)
    finally:
        n.__exit__(None, None, None)


# ---------------------------------------------------------------------------
# The embedded default config
# ---------------------------------------------------------------------------


def test_default_config_in_empty_directory(tmp_path: Path) -> None:
    if not port_is_free(2525):
        pytest.skip("127.0.0.1:2525 is in use; the default-config test needs it")
    work = tmp_path / "empty"
    work.mkdir()
    n = NodeProcess(work, bare=True)
    try:
        n.start()
    except NodeStartError as e:
        if "Address already in use" in str(e):
            pytest.skip("127.0.0.1:2525 was taken by another process meanwhile")
        raise
    with n:
        assert n.port == 2525
        msg = b"Subject: default config\r\n\r\nhello from the default\r\n"
        code, resp = send(2525, "a@example.org", ["user@localhost"], msg)
        assert code == 250, (code, resp)
        box = work / "var/relaynet/mailboxes/localhost/user/Maildir/new"
        files = wait_for(lambda: list(box.glob("*")), DELIVERY_TIMEOUT, f"a file in {box}")
        assert len(files) == 1
        assert split_delivered(files[0].read_bytes())[1] == lf(msg)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_listen_and_spool_options_on_ipv6_loopback(tmp_path: Path) -> None:
    """C{twistd -n relaynet --listen tcp6:...::1 --spool DIR}, no config file."""
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    port = free_port("::1")
    args = ("--listen", f"tcp6:{port}:interface=\\:\\:1", "--spool", "myspool")
    with NodeProcess(tmp_path, bare=True, port=port, host="::1", node_args=args) as n:
        assert n.spool == tmp_path / "myspool"
        msg = b"Subject: over IPv6\r\n\r\nhello\r\n"
        with smtplib.SMTP("::1", port, timeout=30) as s:
            s.ehlo("v6.client")
            s.sendmail("a@example.org", ["v6user@localhost"], msg)
        files = wait_for(lambda: n.maildir_new("v6user"), DELIVERY_TIMEOUT, "delivery over ::1")
        fields, rest = split_delivered(files[0].read_bytes())
        assert rest == lf(msg)
        assert b"[IPv6:::1]" in fields["received"], fields["received"]
        assert not (tmp_path / "var").exists(), "--spool was not used for the spool"


# ---------------------------------------------------------------------------
# A 50 MB message
# ---------------------------------------------------------------------------

BIG = 50 * 1024 * 1024


def big_message(token: str) -> bytes:
    head = f"Message-ID: <big-{token}@test>\r\nSubject: fifty megabytes\r\n\r\n".encode()
    # 80-octet lines; every 997th starts with a dot (stuffed on the wire).
    lines = []
    for i in range((BIG - len(head)) // 80):
        prefix = b"." if i % 997 == 0 else b"x"
        lines.append(prefix + b"%08d" % i + b"-" * 69 + b"\r\n")
    body = b"".join(lines)
    pad = BIG - len(head) - len(body)
    return head + body + (b"y" * (pad - 2) + b"\r\n" if pad >= 2 else b"")


def test_fifty_megabyte_message(tmp_path: Path) -> None:
    token = _token()
    msg = big_message(token)
    assert len(msg) == BIG
    digest = hashlib.sha256(lf(msg)).hexdigest()
    with NodeProcess(tmp_path, name="big",
                     extra_toml="\n[limits]\nmax_message_size = 60000000\n") as n:
        # Warm up (first session, first delivery), then measure.
        code, _ = send(n.port, "a@example.org", ["warm@localhost"], b"Subject: w\r\n\r\nw\r\n")
        assert code == 250
        delivered_one(n, "warm")
        before = n.vm_hwm_kib()
        code, resp = send(n.port, "a@example.org", ["big@localhost"], msg)
        assert code == 250, (code, resp)
        path = delivered_one(n, "big", timeout=60.0)
        after = n.vm_hwm_kib()
        data = path.read_bytes()
        fields, rest = split_delivered(data)
        assert len(rest) == BIG - msg.count(b"\r\n")
        assert hashlib.sha256(rest).hexdigest() == digest
        assert path.name.endswith(f",S={len(data)},W={len(data) + data.count(NL)}")
        assert path.stat().st_size == len(data)
        growth_mb = (after - before) / 1024
        print(f"\nnode VmHWM before {before} KiB, after {after} KiB: +{growth_mb:.1f} MiB "
              f"for a {BIG // (1024 * 1024)} MiB message")
        assert growth_mb < 40, f"node peak RSS grew by {growth_mb:.1f} MiB"


# -- several nodes behind one port (SO_REUSEPORT) ----------------------------

REUSE_PORT_CONFIG = DEFAULT_CONFIG.replace(
    'endpoint = "tcp:{port}:interface=127.0.0.1"\n',
    'endpoint = "tcp:{port}:interface=127.0.0.1"\nreuse_port = true\n',
)


def test_nodes_share_a_port_with_reuse_port(tmp_path: Path) -> None:
    """
    Two nodes, each with its own spool, listen on one port with
    C{reuse_port = true}: the kernel spreads forty connections between them,
    both take mail, and every message is delivered exactly once.
    """
    assert "reuse_port = true" in REUSE_PORT_CONFIG
    port = free_port()
    user = f"share{_token()}"
    with NodeProcess(tmp_path / "a", REUSE_PORT_CONFIG, port=port, name="share-a") as a, \
            NodeProcess(tmp_path / "b", REUSE_PORT_CONFIG, port=port, name="share-b") as b:
        # The port greets as soon as the first node listens: wait for the second's own word.
        wait_for(lambda: "Listening on" in b.log_text(), 30.0, "the second node to listen")
        for i in range(40):
            with smtplib.SMTP(HOST, port, timeout=30) as s:
                s.sendmail("a@example.org", [f"{user}@localhost"],
                           f"Subject: {i}\r\nMessage-ID: <share-{i}@test>\r\n\r\nx\r\n".encode())
        wait_for(lambda: len(a.maildir_new(user)) + len(b.maildir_new(user)) >= 40, 30.0,
                 "forty deliveries across the two nodes")
        got_a, got_b = a.maildir_new(user), b.maildir_new(user)
        assert got_a and got_b, (len(got_a), len(got_b))
        ids = sorted(re.search(rb"Message-ID: <(share-\d+)@test>", p.read_bytes()).group(1)
                     for p in got_a + got_b)
        assert ids == sorted(b"share-%d" % i for i in range(40))


def test_second_node_on_a_port_needs_reuse_port(tmp_path: Path) -> None:
    """Without C{reuse_port}, a second node cannot listen where the first one does."""
    port = free_port()
    with NodeProcess(tmp_path / "a", port=port, name="alone"):
        second = NodeProcess(tmp_path / "b", port=port, name="second")
        try:
            second.start()  # returns on the first node's greeting
            assert second.proc is not None
            rc = second.proc.wait(timeout=30)
            assert rc != 0
            assert "Address already in use" in second.log_text()
        finally:
            second.__exit__(None, None, None)
