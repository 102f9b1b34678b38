# -*- test-case-name: tests.test_lab -*-
"""
Node processes of a lab: each node is C{twistd -n relaynet --config
<labdir>/<node>/node.toml}, started detached (a session of its own) so it
outlives the command that started it, and found again through C{/proc}.

Every wait here is bounded and polls; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from relaynet.lab import netns
from relaynet.lab.state import cmdline, node_alive, pid_state

POLL = 0.05
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def twistd_command() -> list[str]:
    """C{twistd} of this Python environment."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def node_command(rec: Mapping[str, Any]) -> list[str]:
    """The command line that runs the node described by C{rec}."""
    d = Path(rec["dir"])
    cmd = [
        *twistd_command(), "-n", f"--pidfile={d / 'twistd.pid'}", f"--logfile={d / 'node.log'}",
        "relaynet", "--config", rec["config"],
    ]
    if rec.get("netns"):
        cmd = netns.command_prefix(rec["netns"]) + cmd
    return cmd


def spawn(rec: Mapping[str, Any]) -> subprocess.Popen[bytes]:
    """
    Start the node of C{rec} detached: its own session, stdin from
    C{/dev/null}, stdout and stderr appended to C{<node>/node.out}.
    """
    d = Path(rec["dir"])
    pidfile = d / "twistd.pid"
    try:
        old = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        old = None
    if old is not None and not node_alive(old, rec["config"]):
        # twistd refuses to start while the pid in its pidfile exists, and a
        # node killed by us may linger as a zombie: the file is stale.
        pidfile.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(d / "node.out", "ab") as out:
        return subprocess.Popen(
            node_command(rec), cwd=d, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def smtp_host(rec: Mapping[str, Any]) -> str:
    """The address the lab's own commands use to reach a node."""
    return str(rec["address"])


def ehlo_ok(rec: Mapping[str, Any], timeout: float = 2.0) -> bool:
    """Whether the node answers C{EHLO} with 250 on its relay port (one try)."""

    def probe() -> bool:
        try:
            with smtplib.SMTP(smtp_host(rec), rec["ports"][0], timeout=timeout,
                              local_hostname="lab.probe") as s:
                code, _ = s.ehlo()
                return code == 250
        except (OSError, smtplib.SMTPException):
            return False

    return netns.run_in(rec.get("netns"), probe, timeout=timeout * 3 + 5)


def log_tail(rec: Mapping[str, Any], lines: int = 8) -> str:
    """The last lines of the node's log and output."""
    out = []
    for name in ("node.log", "node.out"):
        try:
            text = (Path(rec["dir"]) / name).read_text("utf-8", "replace")
        except OSError:
            continue
        out += [f"  {name}: {line}" for line in text.splitlines()[-lines:]]
    return "\n".join(out)


def wait_ready(recs: Mapping[str, Mapping[str, Any]], procs: Mapping[str, subprocess.Popen[bytes]],
               timeout: float = START_TIMEOUT) -> dict[str, str]:
    """
    Poll until every node answers EHLO, one exits, or C{timeout} passes.

    @return: node -> problem, for the nodes that did not come up (empty: all up).
    """
    pending = set(recs)
    problems: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for name in sorted(pending):
            p = procs.get(name)
            if p is not None and p.poll() is not None:
                problems[name] = f"exited with status {p.returncode}:\n{log_tail(recs[name])}"
                pending.discard(name)
            elif ehlo_ok(recs[name], timeout=1.0):
                pending.discard(name)
        if not pending:
            break
        if time.monotonic() >= deadline:
            for name in pending:
                problems[name] = f"no EHLO answer within {timeout:.0f}s:\n{log_tail(recs[name])}"
            break
        time.sleep(POLL)
    return problems


def node_pids(rec: Mapping[str, Any]) -> list[int]:
    """
    Every live process running this node: its recorded pid, its pidfile's
    pid, and any process whose command line names its config.
    """
    config = rec["config"]
    found = set()
    candidates = [rec.get("pid")]
    try:
        candidates.append(int((Path(rec["dir"]) / "twistd.pid").read_text().strip()))
    except (OSError, ValueError):
        pass
    for pid in candidates:
        if pid and node_alive(pid, config):
            found.add(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            if pid not in found and config in cmdline(pid) and node_alive(pid, config):
                found.add(pid)
    return sorted(found)


def _wait_gone(pids: Iterable[int], config: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while True:
        left = [p for p in left if node_alive(p, config)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL)


def reap(proc: subprocess.Popen[bytes] | None) -> None:
    """Collect the exit status of a child we started (no zombie left)."""
    if proc is not None:
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass


def stop(rec: Mapping[str, Any], timeout: float = STOP_TIMEOUT) -> str:
    """
    Stop a node: SIGTERM, wait (bounded), then SIGKILL.

    @return: what happened (C{"not running"}, C{"stopped"}, C{"killed"}).
    @raise OSError: the processes could not be ended.
    """
    pids = node_pids(rec)
    if not pids:
        return "not running"
    helpers = descendants(pids)
    _signal(pids, signal.SIGTERM)
    left = _wait_gone(pids, rec["config"], timeout)
    how = "stopped"
    if left:
        _signal(left, signal.SIGKILL)
        left = _wait_gone(left, rec["config"], 5.0)
        if left:
            raise OSError(f"node {rec['name']}: pid(s) {left} survived SIGKILL")
        how = "killed"
    _end_helpers(rec, helpers)
    return how


def _signal(pids: Iterable[int], sig: int) -> None:
    """Send C{sig} to each of C{pids} (one already gone is fine)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def descendants(pids: Iterable[int]) -> dict[int, bytes]:
    """
    The live descendants of C{pids} (a node's workers and commit
    processes): pid -> its start time (C{/proc/PID/stat}), which tells it
    from a later process given the same pid.
    """
    children: dict[int, list[int]] = {}
    started: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in (b"Z", b"X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        started[int(entry)] = fields[19]
    found: dict[int, bytes] = {}
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = started[child]
                todo.append(child)
    return found


def _same_process_alive(pid: int, started: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in (b"Z", b"X") and fields[19] == started


def _end_helpers(rec: Mapping[str, Any], helpers: Mapping[int, bytes], timeout: float = 5.0) -> None:
    """
    Wait (bounded) until a stopped node's helper processes are gone too,
    SIGKILL those left. A commit process ends at the end of its input or
    with its parent (C{PR_SET_PDEATHSIG}), and on its way out unlinks the
    queue files it kept for reuse (C{queue/recycled/}): C{lab down --clean}
    removing the directory beside it failed with C{ENOENT} (seen once).
    """
    for attempt in (timeout, 5.0):
        deadline = time.monotonic() + attempt
        left = dict(helpers)
        while left:
            left = {p: t for p, t in left.items() if _same_process_alive(p, t)}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(POLL)
        if not left:
            return
        _signal(left, signal.SIGKILL)
        helpers = left
    raise OSError(f"node {rec['name']}: helper pid(s) {sorted(helpers)} survived SIGKILL")


def kill9(rec: Mapping[str, Any]) -> list[int]:
    """
    C{kill -9} the node's processes and wait (bounded) until they are gone.

    @return: the pids killed.
    """
    pids = node_pids(rec)
    helpers = descendants(pids)
    _signal(pids, signal.SIGKILL)
    _wait_gone(pids, rec["config"], 5.0)
    # Until its parent reaps it, a killed process is a zombie that kill(pid, 0)
    # still finds, and lock files naming it (twistd's pid file, the node's
    # socket locks) look held: wait (bounded) until it is really gone.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)  # our own child: reap it here
            except ChildProcessError:
                pass
        if all(pid_state(p) is None for p in pids):
            break
        time.sleep(POLL)
    _end_helpers(rec, helpers)
    return pids


def port_ok(host: str, port: int) -> bool:
    """Whether C{port} can be bound on C{host} now (with SO_REUSEADDR, as Twisted does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    """A port free on C{host} now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- powerfs (lab up --power-fs) -------------------------------------------------


def powerfs_pids(rec: Mapping[str, Any]) -> list[int]:
    """
    Every live powerfs process serving the node's spool: its recorded pid,
    and any process whose command line runs C{relaynet.lab.powerfs} on the
    node's mount point.
    """
    pfs = rec.get("powerfs")
    if not pfs:
        return []
    mount = pfs["mount"]
    found = set()

    def ours(pid: int) -> bool:
        st = pid_state(pid)
        if st is None or st in ("Z", "X"):
            return False
        cmd = cmdline(pid)
        return "relaynet.lab.powerfs" in cmd and mount in cmd

    if pfs.get("pid") and ours(pfs["pid"]):
        found.add(pfs["pid"])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in found and ours(int(entry)):
            found.add(int(entry))
    return sorted(found)


def start_powerfs(rec: dict[str, Any], timeout: float = START_TIMEOUT) -> int:
    """
    Mount the node's powerfs (detached: it outlives the command) unless it
    runs already, and record its pid in C{rec["powerfs"]}.

    @return: its pid.
    @raise OSError: it did not come up (the message names its log).
    """
    from relaynet.lab.powerfs import PowerFS, PowerFSError, is_mounted

    pfs = rec["powerfs"]
    running = powerfs_pids(rec)
    if running and is_mounted(pfs["mount"]):
        pfs["pid"] = running[0]
        return running[0]
    stop_powerfs(rec)
    try:
        fs = PowerFS.start(pfs["backing"], pfs["mount"], pfs["control"], log=pfs["log"], detach=True,
                           timeout=timeout)
    except PowerFSError as e:
        raise OSError(f"node {rec['name']}: {e}") from None
    assert fs.pid is not None
    pfs["pid"] = fs.pid
    return fs.pid


def stop_powerfs(rec: dict[str, Any], timeout: float = STOP_TIMEOUT) -> str:
    """
    Unmount the node's powerfs and wait (bounded) until its process is gone
    (SIGKILL after C{timeout}).

    @return: what happened (C{"not running"}, C{"unmounted"}, C{"stopped
        (SIGTERM)"}, C{"killed"}).
    """
    from relaynet.lab.powerfs import is_mounted, unmount

    pfs = rec.get("powerfs")
    if not pfs:
        return "not running"
    pids = powerfs_pids(rec)
    mounted = is_mounted(pfs["mount"])
    said = unmount(pfs["mount"], timeout)
    how = "unmounted" if pids or mounted else "not running"
    started = time.monotonic()
    deadline = started + timeout
    signalled = False
    while True:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)  # our child: reap it
            except ChildProcessError:
                pass
        left = [p for p in pids if pid_state(p) not in (None, "Z", "X")]
        if not left:
            break
        if not signalled and time.monotonic() >= started + 1.0:
            # Still serving a second after the unmount: the file system is
            # still mounted elsewhere (a lazy unmount waits for its last
            # user; a mount namespace made meanwhile, e.g. by 'ip netns
            # exec', holds a copy). libfuse ends its loop on SIGTERM.
            _signal(left, signal.SIGTERM)
            signalled = True
            how = "stopped (SIGTERM)"
        if time.monotonic() >= deadline:
            _signal(left, signal.SIGKILL)
            unmount(pfs["mount"], timeout)
            how = "killed"
            break
        time.sleep(POLL)
    if said:
        how += f" (fusermount3: {said})"
    pfs["pid"] = None
    return how
