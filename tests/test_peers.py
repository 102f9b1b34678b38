"""
Tests for L{relaynet.peers}: private real Postfix instances, smtp-sink and
smtp-source, all on loopback.

The tests that run Postfix programs are skipped, with the reason shown by
C{pytest -ra}, only when the Postfix binaries are absent (or we are not
root, which the C{postfix} command requires).
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.peers import (
    PeerUnavailable,
    PostfixInstance,
    SmtpSink,
    SmtpSourceError,
    allow_postfix_search,
    free_port,
    missing_binaries,
    postfix_unavailable_reason,
    relayhost_for,
    run_smtp_source,
    wait_for_smtp,
    SMTP_SINK,
    SMTP_SOURCE,
)

_POSTFIX_REASON = postfix_unavailable_reason()
requires_postfix = pytest.mark.skipif(
    _POSTFIX_REASON is not None, reason=str(_POSTFIX_REASON)
)
_TOOLS_MISSING = missing_binaries([SMTP_SINK, SMTP_SOURCE])
requires_smtp_tools = pytest.mark.skipif(
    bool(_TOOLS_MISSING),
    reason="Postfix test tools not installed: %s" % (", ".join(_TOOLS_MISSING),),
)

CLIENT_NAME = "client.relaynet.test"


@pytest.fixture
def peer_dir(tmp_path: Path) -> Path:
    """
    A fresh directory that Postfix daemons (user C{postfix}) can reach.
    """
    return allow_postfix_search(tmp_path)


def _processes_under(path: Path) -> list[int]:
    """
    Live processes whose working directory is inside C{path}.
    """
    prefix = str(path) + os.sep
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % (entry,))
            with open("/proc/%s/stat" % (entry,), "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if (cwd + os.sep).startswith(prefix) and state != b"Z":
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """
    Whether C{pid} is a live process.  Postfix's master is a daemon, so once
    it exits it is a zombie of PID 1 until reaped: that counts as gone.
    """
    try:
        with open("/proc/%d/stat" % (pid,), "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != b"Z"


def _assert_stopped(instance: PostfixInstance, master: int | None) -> None:
    assert instance.processes() == []
    assert _processes_under(instance.base_dir) == []
    if master is not None:
        assert not _alive(master)


def _send(port: int, recipients: list[str], subject: str, body: str = "hello\n") -> None:
    msg = EmailMessage()
    msg["From"] = "sender@client.relaynet.test"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg.set_content(body)
    # local_hostname: never let smtplib resolve our own name.
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=30) as s:
        refused = s.send_message(msg, to_addrs=recipients)
    assert refused == {}


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_only_loopback() -> None:
    with pytest.raises(ValueError):
        free_port("192.0.2.1")
    with pytest.raises(ValueError):
        wait_for_smtp("example.com", 25, timeout=0.1)
    with pytest.raises(ValueError):
        relayhost_for("10.0.0.1", 25)


def test_relayhost_for() -> None:
    assert relayhost_for("127.0.0.1", 2525) == "[127.0.0.1]:2525"
    assert relayhost_for("::1", 2525) == "[ipv6:::1]:2525"


def test_wait_for_smtp_times_out() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_smtp("127.0.0.1", port, timeout=0.5)
    assert time.monotonic() - start < 5


def test_wait_for_smtp_rejects_non_220() -> None:
    """
    A server that greets with something other than 220 is not ready.
    """
    import threading

    answered = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()

        def serve() -> None:
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                with conn:
                    conn.sendall(b"554 5.3.2 not now\r\n")
                    answered.append(1)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with pytest.raises(TimeoutError) as e:
                wait_for_smtp("127.0.0.1", port, timeout=0.5)
        finally:
            stop.set()
            thread.join(10)
    assert answered
    assert "554" in str(e.value)


def test_peer_unavailable_is_a_skip() -> None:
    import unittest

    assert issubclass(PeerUnavailable, unittest.SkipTest)


def test_missing_postfix_raises_peer_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Without the postfix binary, starting an instance raises PeerUnavailable
    naming what is missing, and nothing is written.
    """
    import harness.peers as peers

    monkeypatch.setattr(peers, "POSTFIX", str(tmp_path / "no-postfix"))
    reason = postfix_unavailable_reason()
    assert reason is not None and "no-postfix" in reason
    instance = PostfixInstance(tmp_path / "postfix", port=free_port())
    with pytest.raises(PeerUnavailable) as e:
        instance.start()
    assert "no-postfix" in str(e.value)
    assert not (tmp_path / "postfix").exists()
    monkeypatch.setattr(peers, "SMTP_SOURCE", str(tmp_path / "no-smtp-source"))
    with pytest.raises(PeerUnavailable):
        run_smtp_source("127.0.0.1", 25, messages=1, sessions=1, size=1)


@pytest.mark.slow
@requires_smtp_tools
def test_smtp_source_to_sink(tmp_path: Path) -> None:
    """
    run_smtp_source delivers the requested number of messages, and the sink
    counts them.
    """
    with SmtpSink(tmp_path / "sink") as sink:
        assert sink.received() == 0
        result = run_smtp_source(
            sink.host, sink.port, messages=40, sessions=4, size=5120
        )
        assert result["messages"] == 40
        assert result["seconds"] > 0
        assert result["rate"] == pytest.approx(40 / result["seconds"])
        sink.wait_received(40, timeout=30)
        assert sink.received() == 40
        # Reusing connections (-d) sends the same count.
        run_smtp_source(
            sink.host, sink.port, messages=10, sessions=2, size=100,
            reuse_connection=True,
        )
        sink.wait_received(50, timeout=30)
    assert sink.process is not None and sink.process.returncode is not None


@pytest.mark.slow
@requires_smtp_tools
def test_smtp_sink_dump(tmp_path: Path) -> None:
    """
    With dump=True every message lands in its own file.
    """
    subject = "dump-%s" % (uuid.uuid4().hex,)
    with SmtpSink(tmp_path / "sink", dump=True) as sink:
        _send(sink.port, ["a@sink.test", "b@sink.test"], subject)
        sink.wait_received(1, timeout=30)
    (dumped,) = sink.dumped()
    text = dumped.read_text()
    assert "X-Rcpt-Args: <a@sink.test>" in text
    assert "X-Rcpt-Args: <b@sink.test>" in text
    assert subject in text


@pytest.mark.slow
@requires_smtp_tools
def test_smtp_source_surfaces_smtp_errors(tmp_path: Path) -> None:
    """
    An SMTP rejection or a refused connection raises SmtpSourceError with
    smtp-source's output.
    """
    with SmtpSink(tmp_path / "sink", extra_args=["-f", "MAIL"]) as sink:
        with pytest.raises(SmtpSourceError) as e:
            run_smtp_source(sink.host, sink.port, messages=2, sessions=1, size=10)
        assert e.value.returncode != 0
        assert "500" in e.value.output or "fatal" in e.value.output
    with pytest.raises(SmtpSourceError):
        run_smtp_source("127.0.0.1", free_port(), messages=1, sessions=1, size=10,
                        timeout=30)


@pytest.mark.slow
@requires_postfix
def test_postfix_relays_to_sink(peer_dir: Path) -> None:
    """
    A private Postfix instance accepts a message from smtplib and relays it
    to an smtp-sink, and leaves no process behind.
    """
    subject = "relay-%s" % (uuid.uuid4().hex,)
    with SmtpSink(peer_dir / "sink", dump=True) as sink:
        instance = PostfixInstance(
            peer_dir / "postfix",
            port=free_port(),
            mode="relay",
            relayhost=relayhost_for(sink.host, sink.port),
        )
        with instance:
            master = instance.master_pid()
            assert master is not None and instance.processes()
            assert wait_for_smtp(instance.host, instance.port).startswith("220 ")
            _send(instance.port, ["user@sink.test"], subject)
            sink.wait_received(1, timeout=60)
            instance.wait_queue_empty(timeout=30)
            assert instance.queue_count() == 0
            assert instance.log_path.is_file()
        _assert_stopped(instance, master)
    (dumped,) = sink.dumped()
    text = dumped.read_text()
    assert subject in text
    assert "X-Rcpt-Args: <user@sink.test>" in text
    # Postfix added its Received: header with our explicit myhostname.
    assert instance.myhostname in text
    log = instance.log_path.read_text()
    assert "status=sent" in log


@pytest.mark.slow
@requires_postfix
def test_postfix_queues_while_sink_is_down(peer_dir: Path) -> None:
    """
    queue_count sees mail that cannot be relayed yet.
    """
    port = free_port()
    instance = PostfixInstance(
        peer_dir / "postfix",
        port=free_port(),
        mode="relay",
        relayhost=relayhost_for("127.0.0.1", port),
    )
    with instance:
        master = instance.master_pid()
        _send(instance.port, ["user@sink.test"], "queued")
        deadline = time.monotonic() + 30
        while "status=deferred" not in instance.log_path.read_text():
            assert time.monotonic() < deadline, instance.log_tail()
            time.sleep(0.05)
        assert instance.queue_count() == 1
    _assert_stopped(instance, master)


@pytest.mark.slow
@requires_postfix
def test_postfix_local_and_sink_modes(peer_dir: Path) -> None:
    """
    Mode "local" delivers into its Maildir; mode "sink" queues and discards.
    Two instances run side by side.
    """
    local = PostfixInstance(peer_dir / "local", port=free_port(), mode="local")
    sink = PostfixInstance(peer_dir / "sink", port=free_port(), mode="sink")
    with local, sink:
        assert local.name != sink.name
        masters = (local.master_pid(), sink.master_pid())
        _send(local.port, ["user@localhost"], "local")
        _send(sink.port, ["user@elsewhere.test"], "sink")
        deadline = time.monotonic() + 30
        while local.delivered_count() < 1:
            assert time.monotonic() < deadline, local.log_tail()
            time.sleep(0.05)
        local.wait_queue_empty(timeout=30)
        sink.wait_queue_empty(timeout=30)
        (new,) = (local.maildir / "new").iterdir()
        assert "Subject: local" in new.read_text()
    _assert_stopped(local, masters[0])
    _assert_stopped(sink, masters[1])


@pytest.mark.slow
@requires_postfix
def test_postfix_restart_same_dir(peer_dir: Path) -> None:
    """
    An instance can be started again in the same directory.
    """
    instance = PostfixInstance(peer_dir / "postfix", port=free_port(), mode="sink")
    for _ in range(2):
        with instance:
            master = instance.master_pid()
            result = run_smtp_source(
                instance.host, instance.port, messages=5, sessions=2, size=1000
            )
            assert result["messages"] == 5
            instance.wait_queue_empty(timeout=30)
        _assert_stopped(instance, master)
    assert instance.log_path.read_text().count("status=sent") == 5 * 2


@pytest.mark.slow
@requires_postfix
def test_postfix_start_failure_reports_log(peer_dir: Path) -> None:
    """
    When smtpd's port is taken, start raises RuntimeError with the log tail
    and leaves nothing running.
    """
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        instance = PostfixInstance(peer_dir / "postfix", port=port, mode="sink",
                                   start_timeout=20)
        with pytest.raises(RuntimeError) as e:
            instance.start()
    assert "Address already in use" in str(e.value)
    _assert_stopped(instance, None)


@pytest.mark.slow
@requires_postfix
def test_unsearchable_base_dir(tmp_path: Path) -> None:
    """
    A base directory the postfix user cannot reach is reported clearly,
    before anything starts.
    """
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    instance = PostfixInstance(private / "postfix", port=free_port())
    with pytest.raises(RuntimeError) as e:
        instance.start()
    assert "allow_postfix_search" in str(e.value)
    assert not (private / "postfix").exists()


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@requires_postfix
@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no ::1 on this machine")
def test_postfix_ipv6_loopback(peer_dir: Path) -> None:
    """
    Instance and sink also work on ::1.
    """
    with SmtpSink(peer_dir / "sink", host="::1") as sink:
        instance = PostfixInstance(
            peer_dir / "postfix",
            host="::1",
            port=free_port("::1"),
            mode="relay",
            relayhost=relayhost_for("::1", sink.port),
        )
        with instance:
            master = instance.master_pid()
            result = run_smtp_source("::1", instance.port, messages=3, sessions=1,
                                     size=100, recipient="user@sink.test")
            assert result["messages"] == 3
            sink.wait_received(3, timeout=60)
            instance.wait_queue_empty(timeout=30)
        _assert_stopped(instance, master)
