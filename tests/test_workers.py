"""
A node with workers (C{[node] workers = N}): one C{twistd relaynet} supervisor,
N worker processes sharing its listening sockets, each owning a shard of the
spool (relaynet/supervisor.py, relaynet/worker.py). Real processes, real
sockets, on loopback.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.forwarder import TcpForwarder, close
from harness.nodeproc import NodeProcess, read_greeting, stop_node, wait_for, worker_pids
from harness.peers import free_port
from relaynet.admin.queuecli import AdminClient, AdminError
from relaynet.queue.shards import adopt_orphan_shards

CONFIG = """\
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

# Mail for remote.test waits: its next hop is a loopback port nobody listens on.
HELD_ROUTE = """
[queue]
minimal_backoff = 3600
delay_warning = 0

[[route]]
domains = ["remote.test"]
action = "relay"
next_hops = [{{ endpoint = "tcp:127.0.0.1:{dead}" }}]
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def committers(parent: int) -> list[int]:
    """The commit processes (relaynet/queue/committer.py) whose parent is C{parent}."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"committer.py" in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def send(port: int, rcpt: str, token: str) -> str:
    """One message; the queue id of its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@localhost")
        s.rcpt(rcpt)
        code, reply = s.data(f"Subject: {token}\r\nMessage-ID: <{token}@test>\r\n\r\n{token}\r\n".encode())
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def when(value: Any, ok: bool) -> Any:
    """C{value} if C{ok}: a C{wait_for} predicate's answer."""
    return value if ok else None


def delivered_tokens(node: NodeProcess, user: str = "bob", domain: str = "localhost") -> list[str]:
    out = []
    for path in node.maildir_new(user, domain):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
                break
    return out


@pytest.fixture
def node(tmp_path: Path) -> Any:
    n = NodeProcess(tmp_path, CONFIG, name="w")
    yield n
    stop_node(n)


def status(node: NodeProcess) -> dict[str, Any]:
    return AdminClient(f"unix:{node.spool / 'admin.sock'}").request("GET", "/api/status")


def worker_status(node: NodeProcess, shard: int) -> dict[str, Any]:
    return AdminClient(f"unix:{node.spool / f'worker-{shard}.sock'}").request("GET", "/api/status")


def test_workers_share_the_port_each_with_its_shard(node: NodeProcess) -> None:
    node.start()
    pids = wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
    ids: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(15):
            qid = send(node.port, "bob@localhost", f"t{k}-{i}")
            with lock:
                ids.append(qid)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(ids) == 120 and len(set(ids)) == 120
    # A queue id ends with its shard's number (two hex digits).
    shards = {qid[-2:] for qid in ids}
    assert shards == {"00", "01"}, shards
    tokens = wait_for(lambda: when(t := delivered_tokens(node), len(t) >= 120), 60, "120 deliveries")
    assert sorted(tokens) == sorted(f"t{k}-{i}" for k in range(8) for i in range(15))
    assert (node.spool / "queue").is_dir() and (node.spool / "queue.1").is_dir()
    assert worker_pids(node.pid) == pids


def test_kill9_of_a_worker_under_load_loses_no_acknowledged_message(node: NodeProcess) -> None:
    node.start()
    pids = wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors = []

    def client(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 400:
            token = f"k{k}-{i}-{uuid.uuid4().hex[:6]}"
            i += 1
            try:
                send(node.port, "bob@localhost", token)
            except (OSError, smtplib.SMTPException, AssertionError) as e:
                errors.append(repr(e))  # the killed worker's sessions: not acknowledged
                continue
            with lock:
                acked.append(token)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 150, 60, "150 acknowledged messages")
        os.kill(pids[1], signal.SIGKILL)
        replaced = wait_for(
            lambda: (p := worker_pids(node.pid)).get(1) not in (None, pids[1]) and p, 30, "worker 1 replaced"
        )
        assert replaced[0] == pids[0]
        wait_for(lambda: len(acked) >= 400, 90, "400 acknowledged messages")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    # Every acknowledged message is delivered, once (the replacement
    # recovered shard 1 and delivered what the killed worker held).
    # (Waiting for as many deliveries as acknowledgements is not enough:
    # messages the killed worker committed without its 250 reaching the
    # client are delivered too, and can come before the last acknowledged.)
    want = sorted(acked)
    wanted = set(want)
    got = wait_for(lambda: when(t := delivered_tokens(node), wanted <= set(t)), 90,
                   f"{len(want)} deliveries")
    assert sorted(t for t in got if t in wanted) == want
    assert len(got) == len(set(got)), "a message was delivered twice"
    assert node.running()


def test_a_transfer_made_again_is_recognised_by_either_worker(node: NodeProcess) -> None:
    """
    Exactly once between relaynet hops with workers: a transfer made again
    (C{XTXN} with C{XTXNAGAIN}, as an upstream sends a message it recovered
    or attempted before) is answered 250 with the first queue id whichever
    worker accepts it: the one that took it looks in its own window, the
    other asks it over its site (C{GET /api/transfer}). Sent again 24
    times from 8 concurrent clients, both workers answer some (their text
    log lines name them); one copy is queued and delivered. Without the
    lookup, each one the other worker took was queued again.
    """
    node.start()
    wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
    body = b"Subject: again\r\nMessage-ID: <again@test>\r\n\r\nonce\r\n"

    def transfer(again: bool) -> str:
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:
            s.ehlo("upstream.test")
            assert (s.esmtp_features.get("xtxn") or "").split() == ["AGAIN"]
            assert s.mail("sender@localhost", ["XTXN=up/Q1"] + (["XTXNAGAIN"] if again else []))[0] == 250
            assert s.rcpt("bob@localhost")[0] == 250
            code, reply = s.data(body)
            assert code == 250, reply
            return reply.decode().rsplit(" ", 1)[1]

    # Until both workers have recovered their shards (their log lines say so), a
    # transfer made again that neither holds yet is answered 451: wait for them.
    for k in (0, 1):
        wait_for(lambda: re.search(rf"/w{k}\] relaynet node \S+: \d+ queued message\(s\) recovered",
                                   node.log_text()), 30, f"worker {k} recovered")
    first = transfer(False)
    answers: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(3):
            qid = transfer(True)
            with lock:
                answers.append(qid)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [first] * 24
    wait_for(lambda: delivered_tokens(node) == ["again"] or None, 30, "one delivery")
    dups = [e for e in node.events() if e["event"] == "duplicate"]
    assert len(dups) == 24 and {e["queue_id"] for e in dups} == {first}
    by_worker = {w: len(re.findall(rf"/w{w}#info\] duplicate queue_id={first}", node.log_text())) for w in (0, 1)}
    assert by_worker[0] and by_worker[1], by_worker
    received = [e for e in node.events() if e["event"] == "received" and e.get("message_id") == "<again@test>"]
    assert [e["queue_id"] for e in received] == [first]  # queued once


def smaps_kb(pid: int, field: str) -> int:
    """A field of C{/proc/PID/smaps_rollup} (kB)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/smaps_rollup")


def test_workers_are_forks_sharing_the_supervisors_memory(node: NodeProcess) -> None:
    """
    Workers are forked from the supervisor, not new interpreters: each
    shares dirty pages (the modules the supervisor imported, frozen before
    the fork) with it. A new interpreter shares no dirty page with
    anything (only clean ones: the executable and libraries). A worker
    replaced after C{kill -9} is a fork too, and each worker names itself.
    """
    node.start()
    pids = wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
    workers_up(node)
    for shard, pid in pids.items():
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
        assert title[:3] == [b"relaynet.worker", b"--shard", str(shard).encode()], title
        # Most of a worker's ~50 MiB at rest is the modules: well over 10 MiB shared.
        assert smaps_kb(pid, "Shared_Dirty") > 10 * 1024, (shard, Path(f"/proc/{pid}/smaps_rollup").read_text())
    # Each worker commits small messages through a commit process of its own.
    old_committers = {shard: committers(pid) for shard, pid in pids.items()}
    assert all(len(c) == 1 for c in old_committers.values()), old_committers
    os.kill(pids[0], signal.SIGKILL)
    replaced = wait_for(
        lambda: (p := worker_pids(node.pid)).get(0) not in (None, pids[0]) and p, 30, "worker 0 replaced"
    )
    workers_up(node)
    assert smaps_kb(replaced[0], "Shared_Dirty") > 10 * 1024
    # The killed worker's commit process died with it (PR_SET_PDEATHSIG);
    # its replacement has its own.
    wait_for(lambda: not alive(old_committers[0][0]), 30, "the killed worker's commit process gone")
    assert len(committers(replaced[0])) == 1 and alive(old_committers[1][0])
    token = f"f-{uuid.uuid4().hex[:8]}"
    send(node.port, "bob@localhost", token)
    wait_for(lambda: token in delivered_tokens(node), 30, "the delivery")


def workers_up(node: NodeProcess, count: int = 2) -> None:
    """Wait (bounded) until every worker answers on its admin socket."""
    def up(k: int) -> bool:
        try:
            return worker_status(node, k)["pid"] > 0
        except AdminError:
            return False

    for k in range(count):
        wait_for(lambda: up(k), 30, f"worker {k}'s admin socket")


def test_sighup_reaches_every_worker(node: NodeProcess) -> None:
    node.start()
    workers_up(node)
    before = [worker_status(node, k)["last_reload"] for k in (0, 1)]
    assert before == [None, None]
    text = node.config_path.read_text() + "\n[limits]\nmax_message_size = 4242\n"
    node.config_path.write_text(text)
    node.signal(signal.SIGHUP)
    for k in (0, 1):
        wait_for(lambda: (worker_status(node, k)["last_reload"] or {}).get("status") == "reloaded", 20,
                 f"worker {k} reloaded")
    # Whichever worker takes the connection, it applies the new limit.
    for _ in range(12):
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.esmtp_features["size"] == "4242"
    # An invalid configuration is refused once, by the supervisor; the
    # workers keep theirs (and are not asked).
    node.config_path.write_text(text + "\n[limits]\nnonsense = 1\n")
    node.signal(signal.SIGHUP)
    wait_for(lambda: "Reload refused" in node.log_text(), 20, "the refusal logged")
    assert [worker_status(node, k)["last_reload"]["status"] for k in (0, 1)] == ["reloaded", "reloaded"]


def test_a_sighup_while_the_workers_start_is_a_reload_once_they_have(node: NodeProcess) -> None:
    """
    A reload asked for while the workers are still starting (here: as soon
    as both exist, long before they serve) is carried out by each once it
    has started: before, a starting worker ignored the SIGHUP its supervisor
    passed on and kept its old configuration until the next one (a lab soak
    found a last hop refusing the users just added to it).
    """
    out = open(node.out_path, "ab")
    try:
        node.proc = subprocess.Popen(node.command(), cwd=node.dir, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
    wait_for(lambda: len(worker_pids(node.pid)) == 2, 20, "two workers forked", interval=0.001)
    node.signal(signal.SIGHUP)

    def reloaded(k: int) -> bool:
        try:
            return (worker_status(node, k)["last_reload"] or {}).get("status") == "reloaded"
        except (AdminError, OSError):
            return False  # not serving its site yet

    for k in (0, 1):
        wait_for(lambda: reloaded(k), 20, f"worker {k} reloaded")
    assert read_greeting(node.port, "127.0.0.1", timeout=5)
    assert node.running()


def test_hold_sighup_notes_a_hangup_for_install_sighup() -> None:
    """
    In-process: a SIGHUP before the reload handler is installed, or while
    SIGHUP was blocked (a supervisor blocks it while it forks a worker), is
    one reload as soon as the handler is.
    """
    from twisted.internet.task import Clock

    from relaynet.hangup import hold_sighup, install_sighup

    previous = signal.getsignal(signal.SIGHUP)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        os.kill(os.getpid(), signal.SIGHUP)  # waits, blocked
        hold_sighup()  # unblocks: noted
        os.kill(os.getpid(), signal.SIGHUP)  # noted again: still one reload
        reloads: list[int] = []
        clock = Clock()
        install_sighup(clock, lambda: reloads.append(1))
        assert reloads == []
        clock.advance(0)
        assert reloads == [1]
        clock.advance(60)
        assert reloads == [1]
        install_sighup(clock, lambda: reloads.append(2))  # nothing noted since
        clock.advance(0)
        assert reloads == [1]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        signal.signal(signal.SIGHUP, previous)


def test_sigterm_stops_the_workers_then_the_supervisor(node: NodeProcess) -> None:
    node.start()
    workers_up(node)
    pids = worker_pids(node.pid)
    their_committers = [c for pid in pids.values() for c in committers(pid)]
    assert len(their_committers) == 2
    send(node.port, "bob@localhost", "before-stop")
    assert node.terminate() in (0, -signal.SIGTERM)  # twistd ends with the signal
    for pid in pids.values():
        assert not alive(pid)
    for pid in their_committers:
        assert not alive(pid)
    log = node.log_text()
    stopped = [log.index(f"Worker {k} (pid {pids[k]}) stopped (exit status 0)") for k in (0, 1)]
    assert max(stopped) < log.rindex("relaynet node w stopped")
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", node.port, timeout=5)
    assert delivered_tokens(node) == ["before-stop"]


def test_workers_stop_when_the_supervisor_is_killed(node: NodeProcess) -> None:
    node.start()
    pids = wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
    node.kill9()
    for pid in pids.values():
        wait_for(lambda: not alive(pid), 30, f"worker pid {pid} gone")
    # Both shard locks were released: the node starts again at once.
    node.start()
    wait_for(lambda: len(worker_pids(node.pid)) == 2, 20, "two new workers")


def test_admin_covers_every_shard_and_fewer_workers_adopt_the_rest(tmp_path: Path) -> None:
    dead = free_port()
    node = NodeProcess(tmp_path, CONFIG + HELD_ROUTE.format(dead=dead), name="w")
    try:
        node.start()
        wait_for(lambda: len(worker_pids(node.pid)) == 2, 20, "two workers")
        ids = set()
        for i in range(40):
            ids.add(send(node.port, "carol@remote.test", f"held-{i}"))
        shards = {qid[-2:] for qid in ids}
        client = AdminClient(f"unix:{node.spool / 'admin.sock'}")
        listed = wait_for(
            lambda: when(r := client.request("GET", "/api/queue"), r["count"] == 40), 30, "40 listed"
        )
        assert {m["queue_id"] for m in listed["messages"]} == ids
        st = client.request("GET", "/api/status")
        assert st["queue"]["total"] if "total" in st["queue"] else sum(st["queue"].values()) >= 40
        assert [w["shard"] for w in st["workers"]] == [0, 1]
        # A verb finds the message in whichever shard holds it.
        for qid in sorted(ids)[:4]:
            assert client.request("POST", f"/api/queue/{qid}/hold")["held"] is True
        with pytest.raises(AdminError):
            client.request("GET", "/api/queue/NOSUCHID00")
        # /metrics: the sum over the shards, read by Prometheus' own parser.
        from prometheus_client.parser import text_string_to_metric_families

        conn = client._connection()
        conn.request("GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(conn.getresponse().read().decode())}
        received = [s for s in families["relaynet_messages_received"].samples if s.name.endswith("_total")]
        assert sum(s.value for s in received) == 40
        assert node.terminate() in (0, -signal.SIGTERM)  # twistd ends with the signal
        # Down to one worker: the mail of shard 1 moves into the queue at start.
        if len(shards) < 2:
            pytest.skip("all 40 messages went to one worker")  # pragma: no cover
        node.config_path.write_text(node.config_path.read_text().replace("workers = 2", "workers = 1"))
        node.start()
        assert not (node.spool / "queue.1").exists()
        listed = wait_for(
            lambda: when(r := client.request("GET", "/api/queue"), r["count"] == 40), 30, "40 after"
        )
        assert {m["queue_id"] for m in listed["messages"]} == ids
        held = client.request("GET", "/api/queue", query={"state": "hold"})
        assert held["count"] == 4
    finally:
        node._kill_quietly()


def _queue_file(root: Path, qid: str, state: bool) -> None:
    for sub in ("new", "state") if state else ("new",):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / qid).write_text(f"{sub} of {qid}")


def test_adopt_orphan_shards_moves_state_and_queue_files(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _queue_file(spool / "queue", "A00", True)
    _queue_file(spool / "queue.1", "B01", True)
    _queue_file(spool / "queue.2", "C02", False)
    _queue_file(spool / "queue.3", "D03", True)
    (spool / "queue.3" / "tmp").mkdir()
    (spool / "queue.3" / "tmp" / "partial").write_text("x")
    # A crash between the two renames of a move: the state is there already.
    (spool / "queue" / "state" / "E02").write_text("state of E02")
    _queue_file(spool / "queue.2", "E02", False)
    assert adopt_orphan_shards(spool, 2) == 3
    assert sorted(p.name for p in spool.iterdir()) == ["queue", "queue.1"]
    assert sorted(os.listdir(spool / "queue" / "new")) == ["A00", "C02", "E02"]
    assert sorted(os.listdir(spool / "queue.1" / "new")) == ["B01", "D03"]
    assert sorted(os.listdir(spool / "queue.1" / "state")) == ["B01", "D03"]
    assert (spool / "queue" / "state" / "E02").read_text() == "state of E02"
    assert (spool / "queue.1" / "state" / "D03").read_text() == "state of D03"
    assert adopt_orphan_shards(spool, 1) == 2
    assert sorted(p.name for p in spool.iterdir()) == ["queue"]
    assert adopt_orphan_shards(spool, 1) == 0


def test_worker_log_lines() -> None:
    """
    A worker formats its lines as the node's log has them, tagged with its
    shard; without a stream to write to (syslog), it sends JSON events that
    the supervisor logs as its own, with C{worker=K}.
    """
    import io
    import json as jsonlib

    from twisted.logger import LogLevel

    from relaynet.config import LogSettings
    from relaynet.supervisor import worker_log_event
    from relaynet.tap import NodeLogObserver, json_log_line

    out = io.StringIO()
    NodeLogObserver(out, LogSettings(), worker=3)({
        "log_namespace": "relaynet.events.EventLog", "log_level": LogLevel.info, "log_time": 0.0,
        "log_format": "x", "log_line": "received queue_id=Q",
    })
    assert "[relaynet.events.EventLog/w3#info] received queue_id=Q" in out.getvalue()
    out = io.StringIO()
    NodeLogObserver(out, LogSettings(format="json"), worker=3)({
        "log_namespace": "n", "log_level": LogLevel.warn, "log_time": 1.0, "log_format": "hi {x}", "x": 1,
    })
    assert jsonlib.loads(out.getvalue())["worker"] == 3
    line = json_log_line({"log_namespace": "relaynet.node", "log_level": LogLevel.warn, "log_time": 5.0,
                          "log_format": "disk {what}", "what": "full"})
    event = worker_log_event(1, line.encode())
    assert (event["log_level"], event["log_line"], event["worker"], event["what"]) == (LogLevel.warn, "disk full", 1, "full")
    assert event["log_namespace"] == "relaynet.node/w1" and event["log_time"] == 5.0
    junk = worker_log_event(2, b"Traceback (most recent call last):")
    assert junk["log_level"] == LogLevel.error and "worker 2: Traceback" in junk["log_line"]


class StdoutLogNode(NodeProcess):
    """C{twistd -n} with no C{--logfile}: the log goes to standard output, a file."""

    def command(self) -> list[str]:
        return [c for c in super().command() if not c.startswith("--logfile=")]

    def log_text(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""


def test_workers_write_their_lines_to_a_shared_log_file_whole(tmp_path: Path) -> None:
    """
    With the supervisor's log on standard output, a regular file, each
    worker writes its lines to that file itself (its descriptor 1 is the
    file, not a pipe to the supervisor), and every line in the file is
    whole: a timestamp, a system in brackets, no line cut by another
    process's, under concurrent load from both workers.
    """
    node = StdoutLogNode(tmp_path, CONFIG, name="w")
    try:
        node.start()
        pids = wait_for(lambda: (p := worker_pids(node.pid)) and len(p) == 2 and p, 20, "two workers")
        workers_up(node)
        for pid in pids.values():
            assert os.readlink(f"/proc/{pid}/fd/1") == str(node.out_path), os.readlink(f"/proc/{pid}/fd/1")
        tokens: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(25):
                token = f"s{k}-{i}"
                send(node.port, "bob@localhost", token)
                with lock:
                    tokens.append(token)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wait_for(lambda: len(delivered_tokens(node)) >= len(tokens), 60, "the deliveries")
        wait_for(lambda: node.log_text().count(" delivered queue_id=") >= len(tokens), 30, "the delivered lines")
        node.terminate()
    finally:
        node._kill_quietly()
    lines = node.log_text().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")
    bad = [line for line in lines if line and not line.startswith("\t") and not stamp.match(line)]
    assert not bad, bad[:5]
    assert any("/w0#info] received queue_id=" in line for line in lines)
    assert any("/w1#info] received queue_id=" in line for line in lines)
    assert any("[relaynet.supervisor.Supervisor#info] relaynet node w started with 2 workers" in line for line in lines)


def test_shareable_log_fd_only_for_a_file_or_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipes (journald, collectors) and twistd's rotated log file keep the relay through the supervisor."""
    import sys

    from relaynet.supervisor import shareable_log_fd
    from relaynet.worker import WholeLines

    assert shareable_log_fd(None) is None
    with open(tmp_path / "f", "w") as f:
        assert shareable_log_fd(f) is None  # a file, but not our standard output (twistd's LogFile)
        monkeypatch.setattr(sys, "stdout", f)
        assert shareable_log_fd(f) == f.fileno()
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert shareable_log_fd(pipe) is None
    os.close(r)
    out = os.open(tmp_path / "lines", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    lines = WholeLines(out)
    lines.write("one\n")
    lines.write("two\n")
    assert (tmp_path / "lines").read_text() == ""
    lines.flush()
    os.close(out)
    assert (tmp_path / "lines").read_text() == "one\ntwo\n"


def test_bind_listener_honours_reuse_port_and_mode(tmp_path: Path) -> None:
    """The supervisor binds as the listener says: SO_REUSEPORT when asked, a UNIX socket's mode."""
    import stat as statmod

    from relaynet.supervisor import bind_listener

    a = bind_listener("tcp:0:interface=127.0.0.1", 16, reuse_port=True)
    try:
        port = a.getsockname()[1]
        b = bind_listener(f"tcp:{port}:interface=127.0.0.1", 16, reuse_port=True)
        b.close()
        with pytest.raises(OSError):
            bind_listener(f"tcp:{port}:interface=127.0.0.1", 16).close()
    finally:
        a.close()
    path = tmp_path / "smtp.sock"
    u = bind_listener(f"unix:{path}:mode=640", 16)
    try:
        assert u.family == socket.AF_UNIX
        assert statmod.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        u.close()
    # A stale socket file (its listener gone) is replaced, as Twisted would.
    bind_listener(f"unix:{path}:mode=600", 16).close()


class ReplyCuttingProxy(TcpForwarder):
    """
    A TCP forwarder between two nodes that loses the reply to a transfer:
    when the next hop's final reply to a message (C{... queued as ID})
    comes and the transaction's C{MAIL} did not carry C{XTXNAGAIN}, it
    closes both connections instead of passing that reply on. The next hop
    has committed the message; its upstream never hears so, as when a link
    or a process dies at that instant. Transfers made again pass through.

    @ivar cut: the replies lost so far.
    """

    cut = 0

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        again = threading.Event()  # this connection's current MAIL carried XTXNAGAIN
        threading.Thread(target=self._commands, args=(client, upstream, again), daemon=True).start()
        threading.Thread(target=self._replies, args=(upstream, client, again), daemon=True).start()

    def _commands(self, src: socket.socket, dst: socket.socket, again: threading.Event) -> None:
        """Client to server: note each MAIL's XTXNAGAIN before passing it on."""
        try:
            for data, lines in received_lines(src):
                for line in lines:
                    if line[:10].upper() == b"MAIL FROM:":
                        (again.set if b" XTXNAGAIN" in line.upper() else again.clear)()
                dst.sendall(data)
        except OSError:
            pass
        close(src, dst)

    def _replies(self, src: socket.socket, dst: socket.socket, again: threading.Event) -> None:
        """Server to client, whole lines; a first transfer's final reply is lost."""
        try:
            for _, lines in received_lines(src):
                lost = [i for i, line in enumerate(lines) if b" queued as " in line and not again.is_set()]
                kept = lines[:lost[0]] if lost else lines
                dst.sendall(b"".join(line + b"\r\n" for line in kept))
                if lost:
                    with self._lock:
                        self.cut += 1
                    break
        except OSError:
            pass
        close(src, dst)


def received_lines(sock: socket.socket) -> Iterator[tuple[bytes, list[bytes]]]:
    """Each chunk read from C{sock}, with the lines it completes (without CRLF), until the peer closes."""
    rest = b""
    while data := sock.recv(65536):
        lines = (rest + data).split(b"\r\n")
        rest = lines.pop()
        yield data, lines


UPSTREAM = """\
[node]
name = "{name}"
hostname = "up.test"
spool = "spool"
workers = 1

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[queue]
minimal_backoff = 1
maximal_backoff = 2
delay_warning = 0

[[route]]
domains = ["dest.test"]
action = "relay"
next_hops = [{ endpoint = "tcp:127.0.0.1:PROXY" }]
"""


def test_a_transfer_whose_reply_was_lost_is_delivered_once_through_two_workers(tmp_path: Path) -> None:
    """
    The real path of C{XTXNAGAIN}: a relaynet node relays to a node with
    two workers, and the reply to each first transfer is lost after the
    next hop committed it (L{ReplyCuttingProxy}). The upstream, which
    cannot know whether the next hop holds the message, sends it again
    marked; whichever worker takes the retransmission answers 250 with the
    first copy's queue id (its own window, or the other worker's through
    C{GET /api/transfer}), and each message is delivered once. Without
    the mark after a lost reply, or without the lookup between workers, a
    retransmission reaching the other worker would be queued and delivered
    a second time.
    """
    node = NodeProcess(tmp_path / "next", CONFIG.replace('["localhost"]', '["dest.test"]'), name="next")
    node.start()
    for k in (0, 1):
        wait_for(lambda: re.search(rf"/w{k}\] relaynet node \S+: \d+ queued message\(s\) recovered",
                                   node.log_text()), 30, f"worker {k} recovered")
    proxy = ReplyCuttingProxy(node.port).start()
    up = NodeProcess(tmp_path / "up", UPSTREAM.replace("PROXY", str(proxy.port)), name="up")
    try:
        up.start()
        tokens = [f"lost-{i}-{uuid.uuid4().hex[:8]}" for i in range(16)]
        threads = [threading.Thread(target=send, args=(up.port, "bob@dest.test", t)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        def delivered() -> list[str]:
            return sorted(delivered_tokens(node, domain="dest.test"))

        wait_for(lambda: set(delivered()) == set(tokens) or None, 60, "every message delivered")
        # The upstream's queue empties once each retransmission got its 250.
        wait_for(lambda: not up.queue_files("new") or None, 30, "the upstream's queue empty")
        assert delivered() == sorted(tokens)  # once each
        assert proxy.cut == len(tokens)  # each first transfer's reply was lost
        events = node.events()
        received = {e["queue_id"] for e in events if e["event"] == "received"}
        dups = [e for e in events if e["event"] == "duplicate"]
        assert len(received) == len(tokens)
        assert len(dups) == len(tokens) and {e["queue_id"] for e in dups} == received
        # Some retransmissions reached the worker that does not hold the
        # message (a queue id ends with its shard's number, in hex).
        log = node.log_text()
        crossed = [qid for qid in received
                   if re.search(rf"/w{1 - int(qid[-2:], 16)}#info\] duplicate queue_id={qid}", log)]
        assert crossed, "no retransmission reached the other worker"
    finally:
        stop_node(up)
        stop_node(node)
        proxy.stop()
