"""
Issue 15's missing real-peer tests, with real C{twistd relaynet} processes and
Debian's Postfix on loopback:

 - pipelined BDAT (b879631) against a private Postfix that refuses every RCPT,
   or the MAIL, of one message: the refusal bounces, and the next message on
   the same connection starts with RSET and is delivered;
 - a node with C{workers = 2} relaying 200 messages from concurrent
   C{smtp-source} sessions to a private Postfix: each arrives once, both
   workers took part, the queue ends empty;
 - a node with workers whose supervisor logs to syslog (C{twistd --syslog},
   caught on a private /dev/log in a private mount namespace): the workers'
   events reach syslog from the supervisor; that they name their worker there
   is an expected failure (see its reason).

Every wait polls for its effect with a deadline (L{harness.nodeproc.wait_for}).
Tests skip, with the reason, when Postfix cannot run here (binaries missing,
not root), or a private mount namespace cannot be made (not root, no unshare).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import HOST, NodeProcess, stop_node, wait_for, worker_pids
from harness.peers import (
    PostfixInstance,
    allow_postfix_search,
    postfix_unavailable_reason,
)

try:
    from test_forwarding import (
        Net,
        distinct_ports,
        events,
        hop,
        make_message,
        parse_dsn,
        route,
        send,
        token,
        wait_event,
        wait_mail,
    )
except ImportError:  # tests/ became a package
    from tests.test_forwarding import (  # type: ignore[no-redef]
        Net,
        distinct_ports,
        events,
        hop,
        make_message,
        parse_dsn,
        route,
        send,
        token,
        wait_event,
        wait_mail,
    )

pytestmark = pytest.mark.slow

_POSTFIX_REASON = postfix_unavailable_reason()
requires_postfix = pytest.mark.skipif(_POSTFIX_REASON is not None, reason=str(_POSTFIX_REASON))

#: Bound on every wait for Postfix (it hands over in well under a second here).
POSTFIX_TIMEOUT = 30.0


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """A directory Postfix's daemons can reach, not under pytest's (see test_interop)."""
    d = Path(tempfile.mkdtemp(prefix="relaynet-wkinterop-"))
    try:
        yield allow_postfix_search(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path / "nodes")
    try:
        yield n
    finally:
        n.close()


# -- 1. pipelined BDAT against a Postfix that refuses ------------------------


class RefusingPostfix(PostfixInstance):
    """
    A private Postfix delivering C{pf.test} into its Maildir that refuses, by
    texthash access maps, the recipients C{refused*@pf.test} at RCPT and the
    sender C{badsender@src.test} at MAIL (C{smtpd_delay_reject = no}), and
    logs every command of a loopback client (C{debug_peer_list}).
    """

    def __init__(self, base_dir: Path, port: int) -> None:
        etc = Path(base_dir) / "etc"
        super().__init__(
            base_dir, port=port, mode="local", local_domains=["pf.test"],
            main_cf={
                "smtpd_delay_reject": "no",
                "smtpd_sender_restrictions": f"check_sender_access texthash:{etc}/senders",
                "smtpd_recipient_restrictions": f"check_recipient_access texthash:{etc}/recipients",
                "debug_peer_list": "127.0.0.1",
            },
        )

    def _write_config(self) -> None:
        super()._write_config()
        for name, text in (
            ("senders", "badsender@src.test REJECT sender refused by the test map\n"),
            ("recipients", (
                "refused1@pf.test REJECT recipient refused by the test map\n"
                "refused2@pf.test REJECT recipient refused by the test map\n"
            )),
        ):
            path = self.config_dir / name
            path.write_text(text)
            path.chmod(0o644)

    def sessions(self) -> list[list[str]]:
        """
        The finished sessions smtpd logged, each as the client's commands in
        order (C{debug_peer_list} lines C{< unknown[127.0.0.1]: CMD}), from a
        C{connect from} to the C{disconnect from} of the same smtpd process.
        """
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return []
        running: dict[str, list[str]] = {}
        done: list[list[str]] = []
        for line in text.splitlines():
            m = re.search(r"/smtpd\[(\d+)\]: (.*)$", line)
            if not m:
                continue
            pid, rest = m.groups()
            if rest.startswith("connect from "):
                running[pid] = []
            elif (c := re.match(r"< \S+\[127\.0\.0\.1\]: (.*)$", rest)) and pid in running:
                running[pid].append(c.group(1))
            elif rest.startswith("disconnect from ") and pid in running:
                done.append(running.pop(pid))
        return done


@requires_postfix
@pytest.mark.parametrize("refused", ["rcpt", "mail"])
def test_pipelined_bdat_refused_then_next_message_on_the_same_connection(
    net: Net, peer_dir: Path, refused: str
) -> None:
    """
    The node sends a one-chunk message as C{BDAT n LAST} in the same write as
    MAIL and RCPT to a real Postfix (PIPELINING, CHUNKING). When Postfix
    refuses every RCPT (C{refused="rcpt"}) or the MAIL (C{"mail"}), it still
    reads the chunk and refuses it; the node bounces the message with the
    RCPT's (or the MAIL's) own reply, and the next message over the same
    connection starts with RSET and is delivered, with no protocol error in
    Postfix's log.
    """
    port, pf_port = distinct_ports(2)
    pf = RefusingPostfix(peer_dir / "postfix", pf_port)
    node = net.add(
        "relay", port, local=["src.test"],
        # One connection to Postfix, kept between the two messages.
        routes=[route(["pf.test"], [hop(pf_port)], concurrency=1)],
        outbound={"reuse_idle_time": 20},
    )
    if refused == "rcpt":
        bad_sender, bad_rcpts = "sender@src.test", ["refused1@pf.test", "refused2@pf.test"]
    else:
        bad_sender, bad_rcpts = "badsender@src.test", ["good@pf.test"]
    with pf:
        node.start()
        bad, bad_mid = make_message(token(), bad_sender, bad_rcpts[0])
        code, resp = send(node.port, bad_sender, bad_rcpts, bad)
        assert code == 250, resp
        bad_qid = wait_event(node, "received", net, message_id=bad_mid)["queue_id"]
        bounced = [wait_event(node, "bounced", net, queue_id=bad_qid, recipient=r) for r in bad_rcpts]
        good, good_mid = make_message(token(), "sender@src.test", "good@pf.test")
        code, resp = send(node.port, "sender@src.test", ["good@pf.test"], good)
        assert code == 250, resp
        good_qid = wait_event(node, "received", net, message_id=good_mid)["queue_id"]
        sent = wait_event(node, "sent", net, queue_id=good_qid, recipient="good@pf.test")
        try:
            wait_for(pf.delivered_count, POSTFIX_TIMEOUT, "delivery by Postfix")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
        (dsn_path,) = wait_mail(node, bad_sender.split("@")[0], "src.test", net=net)
        # The node's connection ends with the node; Postfix logs the session.
        node.terminate()
        try:
            wait_for(lambda: [s for s in pf.sessions() if any(c.startswith("BDAT") for c in s)],
                     POSTFIX_TIMEOUT, "the node's session ended in Postfix's log")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail(200)}") from None
        log = pf.log_path.read_text("utf-8", "replace")
        sessions = [s for s in pf.sessions() if any(c.startswith("BDAT") for c in s)]
    dialogue = "\n".join(
        line for line in log.splitlines()
        if re.search(r"smtpd\[\d+\]: ([<>] |(dis)?connect |warning|lost|improper)", line)
    )
    describe = f"\n--- postfix's side of the dialogue:\n{dialogue}\n{net.describe()}"

    # The refused message bounced with Postfix's own reply to each refused
    # command (not the chunk's 554/503), once per recipient.
    for r, ev in zip(bad_rcpts, bounced):
        assert ev["dsn"] == "5.7.1" and ev["diagnostic"].startswith("554"), ev
        what = "Recipient" if refused == "rcpt" else "Sender"
        assert f"{what} address rejected" in ev["diagnostic"], ev
    _, blocks, _ = parse_dsn(dsn_path.read_bytes())
    assert sorted(str(b["Final-Recipient"]).split(";")[-1].strip() for b in blocks) == sorted(bad_rcpts)
    # The good one: delivered at the first attempt, nothing deferred.
    assert sent["dsn"] == "2.0.0" and sent["diagnostic"].startswith("250"), sent
    assert not events(node, "deferred"), describe
    assert pf.delivered_count() == 1
    (path,) = [p for sub in ("new", "cur") for p in (pf.maildir / sub).glob("*")]
    assert f"Message-ID: {good_mid}".encode() in path.read_bytes()

    # One session carried both transactions; RSET before the second MAIL.
    # The chunk was pipelined: Postfix offered PIPELINING and CHUNKING, and
    # the node sent BDAT although every RCPT (or the MAIL) was refused, which
    # it does only when it sent the chunk before reading those replies.
    assert len(sessions) == 1, describe
    assert re.search(r"> \S+: 250-PIPELINING$", log, re.MULTILINE) and re.search(r"> \S+: 250 CHUNKING$", log, re.MULTILINE)
    (cmds,) = sessions
    # The node's SIGTERM ends the idle connection with QUIT.
    verbs = [c.split()[0].upper() for c in cmds]
    rcpt_verbs = ["RCPT"] * len(bad_rcpts)
    assert verbs == ["EHLO", "MAIL", *rcpt_verbs, "BDAT", "RSET", "MAIL", "RCPT", "BDAT", "QUIT"], describe
    assert all(c.endswith(" LAST") for c in cmds if c.startswith("BDAT")), cmds
    assert not re.search(r"improper command pipelining|lost connection after|timeout after", log), describe
    summary = re.findall(r"disconnect from \S+\[127\.0\.0\.1\] (ehlo=1 .*)$", log, re.MULTILINE)
    mails = "mail=2" if refused == "rcpt" else "mail=1/2"
    rcpts = f"rcpt=1/{len(bad_rcpts) + 1}"
    assert any(f" {mails} " in s and f" {rcpts} " in s and " bdat=1/2 " in s and " rset=1 " in s
               and " quit=1 " in s for s in summary), describe


# -- 2. a node with workers relaying to Postfix ------------------------------

WORKERS_CONFIG = """\
[node]
name = "{name}"
hostname = "relay.test"
spool = "spool"
workers = 2

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["src.test"]
catch_all = true

[queue]
minimal_backoff = 0.5
maximal_backoff = 1

[[route]]
domains = ["pf.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:PF_PORT"]
"""

MESSAGES = 200


def two_workers(supervisor: int) -> dict[int, int]:
    """C{worker_pids(supervisor)} once both workers run, else empty."""
    pids = worker_pids(supervisor)
    return pids if len(pids) == 2 else {}


def maildir_messages(pf: PostfixInstance) -> list[bytes]:
    return [p.read_bytes() for sub in ("new", "cur") for p in sorted((pf.maildir / sub).glob("*"))]


def header(data: bytes, name: bytes) -> bytes | None:
    """The first C{name:} field of C{data}'s header (unfolded enough for these)."""
    head = data.split(b"\n\n", 1)[0]
    m = re.search(rb"(?mi)^" + re.escape(name) + rb":[ \t]*(.*)$", head)
    return m.group(1).strip() if m else None


@requires_postfix
def test_workers_relay_to_postfix_each_message_once(tmp_path: Path, peer_dir: Path) -> None:
    """
    A node with C{workers = 2} relays to a private Postfix (delivering
    C{pf.test} into its Maildir) the 200 messages C{smtp-source} sends over
    8 concurrent sessions, each with its own recipient (C{-N}): Postfix
    delivers each exactly once, both workers accepted and relayed some (a
    queue id ends with its shard), nothing was deferred, and the node's queue
    (both shards) ends empty.
    """
    from harness.peers import run_smtp_source
    from relaynet.admin.queuecli import AdminClient

    (pf_port,) = distinct_ports(1)
    pf = PostfixInstance(peer_dir / "postfix", port=pf_port, mode="local", local_domains=["pf.test"])
    node = NodeProcess(tmp_path / "node", WORKERS_CONFIG.replace("PF_PORT", str(pf_port)), name="wk")
    try:
        with pf:
            node.start()
            wait_for(lambda: two_workers(node.pid), 20, "two workers")
            run_smtp_source(
                HOST, node.port, messages=MESSAGES, sessions=8, size=300,
                sender="sender@src.test", recipient="user@pf.test", helo="client.test",
                unique_recipients=True, timeout=60,
            )
            try:
                wait_for(lambda: pf.delivered_count() >= MESSAGES, POSTFIX_TIMEOUT, f"{MESSAGES} deliveries")
                pf.wait_queue_empty(timeout=POSTFIX_TIMEOUT)
            except (AssertionError, TimeoutError) as e:
                raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
            client = AdminClient(f"unix:{node.spool / 'admin.sock'}")
            listed = wait_for(lambda: (r := client.request("GET", "/api/queue"))["count"] == 0 and r,
                              POSTFIX_TIMEOUT, "the node's queue empty")
            status = client.request("GET", "/api/status")
            delivered = maildir_messages(pf)
            evs = node.events()
    finally:
        stop_node(node)

    # Each message arrived once: 200 files, 200 different recipients (-N
    # numbers them) and Message-IDs.
    assert len(delivered) == MESSAGES
    rcpts = [header(m, b"Delivered-To") or b"" for m in delivered]
    assert len(set(rcpts)) == MESSAGES, sorted(r for r in rcpts if rcpts.count(r) > 1)
    assert all(r.endswith(b"user@pf.test") for r in rcpts), rcpts[:5]
    mids = [header(m, b"Message-Id") for m in delivered]
    assert None not in mids and len(set(mids)) == MESSAGES
    assert all(b"by relay.test (relaynet)" in m.split(b"\n\n", 1)[0] for m in delivered)

    # Both workers accepted and relayed: a queue id ends with its shard.
    received = [e for e in evs if e["event"] == "received"]
    sent = [e for e in evs if e["event"] == "sent"]
    assert len(received) == MESSAGES and len({e["queue_id"] for e in received}) == MESSAGES
    assert len(sent) == MESSAGES and {e["queue_id"] for e in sent} == {e["queue_id"] for e in received}
    assert {e["queue_id"][-2:] for e in received} == {"00", "01"}
    assert {e["queue_id"][-2:] for e in sent} == {"00", "01"}
    assert all(e["relay"] == f"{HOST}:{pf_port}" and e["dsn"] == "2.0.0" for e in sent)
    assert not [e for e in evs if e["event"] in ("deferred", "bounced")]
    assert sorted(e["recipient"] for e in sent) == sorted(r.decode() for r in rcpts)

    # The queue is empty, in both shards.
    assert listed["count"] == 0
    assert [w["shard"] for w in status["workers"]] == [0, 1]
    for shard in ("queue", "queue.1"):
        assert not list((node.spool / shard / "new").iterdir()), shard


# -- 3. worker logging when the supervisor logs to syslog ---------------------

#: Run inside a private mount namespace (C{unshare -m}, private propagation:
#: nothing is visible outside it, and it ends with its last process): a tmpfs
#: over /dev with the few device nodes a node uses bound in from the real one,
#: and /dev/log a symbolic link to the test's datagram socket. The C library's
#: syslog(3) writes to /dev/log, a fixed path, so this is the one way to catch
#: what C{twistd --syslog} sends without touching the host.
PRIVATE_DEV_LOG = r"""set -e
mount --rbind /dev "$STAGE"
mount -t tmpfs -o mode=755,size=64k relaynet-test-dev /dev
for n in null zero full random urandom tty; do touch /dev/$n; mount --bind "$STAGE/$n" /dev/$n; done
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
ln -s "$LOGSOCK" /dev/log
umount -l "$STAGE"
exec "$@"
"""

SYSLOG_PREFIX = "relaynet-wk"


class SyslogServer:
    """
    A private syslog "daemon": a unix datagram socket that records each
    datagram with the pid of the process that sent it (C{SO_PASSCRED}), read
    by a thread so that a sender never blocks on a full socket (syslog(3)
    blocks then, and so would the node's reactor).
    """

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.records: list[tuple[int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="syslog-server", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import socket
        import struct

        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            pid = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", value[:12])[0]
            self.records.append((pid, data.decode("utf-8", "replace")))

    def lines(self, pid: int | None = None) -> list[str]:
        """The messages received (from C{pid} only, if given)."""
        return [text for p, text in list(self.records) if pid is None or p == pid]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class SyslogNode(NodeProcess):
    """
    A node run as C{twistd -n --syslog --prefix=relaynet-wk relaynet ...}
    (no log file) in a private mount namespace whose /dev/log is C{log_socket}.
    """

    def __init__(self, tmp_path: Path, config_toml: str, log_socket: Path) -> None:
        super().__init__(tmp_path, config_toml, name="w")
        self.log_socket = log_socket
        self.stage = self.dir / "real-dev"
        self.stage.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        cmd = [c for c in super().command() if not c.startswith("--logfile=")]
        at = cmd.index("relaynet")
        cmd[at:at] = ["--syslog", f"--prefix={SYSLOG_PREFIX}"]
        return [
            "env", f"STAGE={self.stage}", f"LOGSOCK={self.log_socket}",
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", PRIVATE_DEV_LOG, "sh", *cmd,
        ]


SYSLOG_CONFIG = """\
[node]
name = "{name}"
hostname = "relay.test"
spool = "spool"
workers = 2

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true
"""


def _unshare_reason() -> str | None:
    if os.geteuid() != 0:
        return "a private mount namespace (unshare --mount) needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    return None


requires_unshare = pytest.mark.skipif(_unshare_reason() is not None, reason=str(_unshare_reason()))


def send_until_both_shards(port: int) -> dict[str, str]:
    """
    Send batches of 8 concurrent one-message sessions until each of the two
    workers has accepted one (bounded); @return: shard ("00", "01") -> a
    queue id it gave.
    """
    import smtplib
    import threading

    ids: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=30) as s:
            s.ehlo()
            s.mail("sender@localhost")
            s.rcpt("bob@localhost")
            code, reply = s.data(f"Subject: syslog {i}\r\n\r\nbody {i}\r\n".encode())
            assert code == 250, reply
            qid = reply.decode().rsplit(" ", 1)[1]
            with lock:
                ids.setdefault(qid[-2:], qid)

    for batch in range(10):
        threads = [threading.Thread(target=one, args=(batch * 8 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if {"00", "01"} <= ids.keys():
            return ids
    raise AssertionError(f"80 sessions all went to one worker: {ids}")


@pytest.fixture
def syslog_run(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """
    Start a node with two workers under C{twistd --syslog}, wait until both
    workers serve, have each accept (and deliver locally) a message, and stop
    the node: @return: what syslog received, and the pids and queue ids.
    """
    from relaynet.admin.queuecli import AdminClient, AdminError

    server = SyslogServer(tmp_path / "log.sock")
    node = SyslogNode(tmp_path / "node", SYSLOG_CONFIG, server.path)
    try:
        node.start()
        supervisor = node.pid
        workers = wait_for(lambda: two_workers(supervisor), 20, "two workers")

        def serving(k: int) -> bool:
            try:
                status = AdminClient(f"unix:{node.spool / f'worker-{k}.sock'}").request("GET", "/api/status")
            except AdminError:
                return False
            return bool(status["pid"] > 0)

        def delivered(qid: str) -> bool:
            return any(e["event"] == "delivered" and e["queue_id"] == qid for e in node.events())

        for k in (0, 1):
            wait_for(functools.partial(serving, k), 30, f"worker {k}'s admin socket")
        argv = {k: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split() for k, pid in workers.items()}
        ids = send_until_both_shards(node.port)
        for qid in ids.values():
            wait_for(functools.partial(delivered, qid), 20, f"the delivery of {qid}")
        node.terminate()
        # twistd's last line: whatever the supervisor logged before is read.
        wait_for(lambda: any("Server Shut Down." in line for line in server.lines()), 20, "twistd's last line")
        yield {"server": server, "supervisor": supervisor, "workers": workers, "argv": argv, "ids": ids,
               "node": node}
    finally:
        stop_node(node)
        server.close()


@requires_unshare
def test_worker_events_reach_syslog_through_the_supervisor(syslog_run: dict[str, Any]) -> None:
    """
    With C{twistd --syslog}, the supervisor has no log stream: its workers
    run without C{--log-lines}, send their events as JSON on stdout, and the
    supervisor logs them as its own. Every syslog message comes from the
    supervisor's pid, under its C{--prefix}, formatted (no raw JSON): among
    them each worker's C{received} and C{delivered} events of a message it
    accepted, and the supervisor's own lines about its workers.
    """
    server: SyslogServer = syslog_run["server"]
    supervisor = syslog_run["supervisor"]
    workers = syslog_run["workers"]
    describe = "\n".join(f"{pid}: {text}" for pid, text in server.records)
    # The JSON path: workers are not asked for formatted lines.
    for k, argv in syslog_run["argv"].items():
        assert b"relaynet.worker" in argv and b"--log-lines" not in argv, (k, argv)
    # Only the supervisor writes to syslog; workers never do.
    assert {pid for pid, _ in server.records} == {supervisor}, describe
    lines = server.lines(supervisor)
    assert all(re.match(rf"<\d+>\w{{3}} [ \d]\d \d\d:\d\d:\d\d {SYSLOG_PREFIX}: ", line) for line in lines), describe
    assert not [line for line in lines if "{" in line.split(": ", 1)[1][:3]], describe
    for qid in syslog_run["ids"].values():
        for event in ("received", "delivered"):
            assert [line for line in lines if f"] {event} queue_id={qid} " in line], (event, qid, describe)
    for k, pid in workers.items():
        assert any(f"Worker {k} started (pid {pid})" in line for line in lines), describe
        assert any(f"Worker {k} (pid {pid}) stopped (exit status 0)" in line for line in lines), describe


@requires_unshare
def test_worker_lines_in_syslog_name_their_worker(syslog_run: dict[str, Any]) -> None:
    """
    In syslog, a worker's event line names the worker that logged it (as the
    text log has C{.../wK} and the JSON log C{"worker": K}): the C{received}
    line of a message worker K accepted says C{/wK} or C{worker K}.
    """
    lines = syslog_run["server"].lines(syslog_run["supervisor"])
    for shard, qid in syslog_run["ids"].items():
        k = int(shard, 16)
        (line,) = [line for line in lines if f"] received queue_id={qid} " in line]
        assert re.search(rf"(/w{k}\b|\bworker[ =]{k}\b)", line), line
