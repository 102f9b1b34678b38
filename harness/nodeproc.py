"""
Run a relaynet node as a real C{twistd -n relaynet} subprocess, for tests.

L{NodeProcess} writes a node config into a test directory, starts
C{twistd -n --pidfile= --logfile=... relaynet --config FILE} there, waits for
the SMTP greeting and gives the test the port, the spool and the mailroot, plus
ways to crash (C{kill9}), stop (C{terminate}) and C{restart} the node.

Everything here is loopback-only and every wait is bounded: loops poll for an
event with a deadline, never sleep to synchronise.

Part of the test harness (not shipped). L{free_port} is L{harness.peers}'s and
L{port_is_free} is L{relaynet.lab.procs.port_ok}'s check; the rest
(L{wait_for}, L{read_greeting}, ...) exist only here.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from harness.peers import free_port as free_port  # re-exported: the tests import it from here
from relaynet.lab.procs import port_ok

T = TypeVar("T")

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
POLL = 0.02

RECOVERED = re.compile(r"relaynet node \S+: \d+ queued message\(s\) recovered in [\d.]+ s")
"""A node's log line once it has recovered its queue (each worker's, with workers)."""

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"


def relaynet_command() -> list[str]:
    """The C{relaynet} console script of this venv (or C{python -m relaynet.cli})."""
    script = BIN / "relaynet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "relaynet.cli"]


def port_is_free(port: int, host: str = HOST) -> bool:
    """
    C{True} if C{port} can be bound on C{host} now (with SO_REUSEADDR, as
    Twisted does): L{relaynet.lab.procs.port_ok}, arguments in the order the
    tests use.
    """
    return port_ok(host, port)


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = POLL
) -> T:
    """
    Poll C{predicate} until it returns something true, for at most C{timeout}
    seconds.

    @return: the true value.
    @raise AssertionError: naming C{what} when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def read_reply(f: Any) -> tuple[int, list[bytes]]:
    """
    Read one (possibly multi-line) SMTP reply from a socket file.

    @return: C{(code, lines)}; C{(0, [])} when the connection closed first.
    """
    lines: list[bytes] = []
    for _ in range(1000):
        line = f.readline(8192)
        if not line:
            return 0, lines
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            try:
                return int(line[:3]), lines
            except ValueError:
                return -1, lines
    raise AssertionError("reply with more than 1000 lines")


def read_greeting(port: int, host: str = HOST, timeout: float = 2.0) -> bytes | None:
    """Connect once, read the greeting, QUIT; the 220 line or C{None}."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            f = s.makefile("rb")
            code, lines = read_reply(f)
            if code != 220:
                return None
            try:
                s.sendall(b"QUIT\r\n")
                read_reply(f)
            except OSError:
                pass
            return lines[0]
    except OSError:
        return None


def maildir_new(mailroot: Path, user: str, domain: str = "localhost") -> list[Path]:
    """The files in C{user@domain}'s C{Maildir/new/}, sorted by name."""
    d = Path(mailroot) / domain / user / "Maildir" / "new"
    try:
        return sorted(p for p in d.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


def split_delivered(data: bytes) -> tuple[dict[str, bytes], bytes]:
    """
    Split a delivered Maildir file into the three trace fields a relaynet node
    adds (C{Return-Path:}, C{Delivered-To:}, our C{Received:}) and the rest.

    @return: C{({"return-path": ..., "delivered-to": ..., "received": ...}, rest)};
        the field values are unfolded raw bytes.
    @raise AssertionError: if the fields are missing or out of order.
    """
    fields: dict[str, bytes] = {}
    pos = 0
    for name in (b"Return-Path:", b"Delivered-To:", b"Received:"):
        assert data.startswith(name, pos), (
            f"expected {name!r} at offset {pos}, found {data[pos:pos + 60]!r}"
        )
        # Maildir files have LF line ends (relaynet.delivery.mailbox).
        end = data.index(b"\n", pos)
        value = data[pos + len(name):end]
        # Folded continuation lines (only our Received: is folded).
        while data[end + 1:end + 2] in (b" ", b"\t"):
            nxt = data.index(b"\n", end + 1)
            value += b" " + data[end + 1:nxt].strip()
            end = nxt
        fields[name[:-1].decode().lower()] = value.strip()
        pos = end + 1
    return fields, data[pos:]


def parse_message(data: bytes) -> email.message.EmailMessage:
    """Parse message bytes with the stdlib (never raises; problems land in C{.defects})."""
    return email.message_from_bytes(data, policy=email.policy.compat32)  # type: ignore[return-value]


class RawClient:
    """A line-level SMTP client on a socket, for mid-transaction tricks."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        code, lines = read_reply(self.f)
        assert code == 220, lines

    def cmd(self, line: bytes) -> tuple[int, list[bytes]]:
        self.sock.sendall(line + b"\r\n")
        return read_reply(self.f)

    def reply(self) -> tuple[int, list[bytes]]:
        try:
            return read_reply(self.f)
        except (ConnectionResetError, BrokenPipeError):
            return 0, []

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()

    def start_data(self, rcpt: bytes) -> None:
        assert self.cmd(b"EHLO raw.client")[0] == 250
        assert self.cmd(b"MAIL FROM:<a@example.org>")[0] == 250
        assert self.cmd(b"RCPT TO:<" + rcpt + b">")[0] == 250
        assert self.cmd(b"DATA")[0] == 354


QUEUE_ID = re.compile(rb"^250[ -]2\.0\.0 Ok: queued as ([0-9A-Z]+)$")


DEFAULT_CONFIG = """\
[node]
name = "{name}"
hostname = "relay.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true
"""


def single_worker(toml: str) -> str:
    """
    A node config with C{workers = 1} unless it names C{workers}: the tests
    that read a node's queue directory and pid are about one process (a node
    with workers has a shard per worker: tests/test_workers.py).
    """
    if re.search(r"(?m)^\s*workers\s*=", toml):
        return toml
    if re.search(r"(?m)^\[node\]\s*$", toml):
        return re.sub(r"(?m)^\[node\]\s*$", "[node]\nworkers = 1", toml, count=1)
    return "[node]\nworkers = 1\n" + toml


class NodeStartError(RuntimeError):
    """The node did not come up; the message carries the log tail."""


class NodeProcess:
    """
    A relaynet node running as C{twistd -n relaynet}, in directory C{tmp_path}.

    @param tmp_path: the node's directory (cwd of the process; config and log
        are written here).
    @param config_toml: the node config; C{None} for a default one (listener on
        C{port} at 127.0.0.1, spool C{tmp_path/spool}, local domain
        C{localhost} with catch-all). The tokens C{{port}}, C{{spool}} and
        C{{name}} in it are replaced (plain replacement, so TOML inline tables
        are fine).
    @param port: the listening port (default: a free one).
    @param bare: run C{twistd -n --pidfile= relaynet} with no C{--config} and no
        C{--logfile} at all (the embedded default: port 2525, C{./var/relaynet}),
        plus C{node_args}.
    @param host: the loopback address the node listens on (for the greeting poll).
    @param node_args: more C{twistd relaynet} options (C{--listen}, C{--spool}).
    @param extra_toml: appended to the default config (e.g. a C{[limits]} table).
    """

    def __init__(
        self,
        tmp_path: Path,
        config_toml: str | None = None,
        port: int | None = None,
        *,
        bare: bool = False,
        extra_toml: str = "",
        name: str = "nodeproc",
        start_timeout: float = START_TIMEOUT,
        host: str = HOST,
        node_args: tuple[str, ...] = (),
    ) -> None:
        assert host in ("127.0.0.1", "::1"), "loopback only"
        self.dir = Path(tmp_path).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bare = bare
        self.host = host
        self.node_args = tuple(node_args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "node.log"
        self.out_path = self.dir / "node.out"
        self.starts = 0
        self._auto_port = False
        self._template = ""
        self._name = name
        if bare:
            self.config_path: Path | None = None
            self.port = 2525 if port is None else port
            self.spool = self.dir / "var" / "relaynet"
            if "--spool" in self.node_args:
                self.spool = self.dir / self.node_args[self.node_args.index("--spool") + 1]
            self.mailroot = self.spool / "mailboxes"
            return
        # A port we picked may be taken by someone else before twistd binds
        # it; then start() picks another one (only before the first start).
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self._template = DEFAULT_CONFIG + extra_toml if config_toml is None else config_toml
        self._name = name
        self.config_path = self.dir / "node.toml"
        self._write_config()
        # The effective paths, as the node itself will compute them.
        from relaynet.config import load_config

        config = load_config(self.config_path)
        self.config = config
        self.spool = config.spool
        self.mailroot = config.local.mailroot

    def _write_config(self) -> None:
        assert self.config_path is not None
        text = (
            self._template.replace("{port}", str(self.port))
            .replace("{spool}", str(self.dir / "spool"))
            .replace("{name}", self._name)
        )
        self.config_path.write_text(single_worker(text), encoding="utf-8")

    # -- paths -----------------------------------------------------------

    @property
    def queue(self) -> Path:
        return self.spool / "queue"

    @property
    def events_path(self) -> Path:
        return self.spool / "events.jsonl"

    def queue_files(self, sub: str) -> list[Path]:
        """Files in C{queue/<sub>} (C{tmp}, C{new}, C{state}, C{corrupt})."""
        try:
            return sorted((self.queue / sub).iterdir())
        except FileNotFoundError:
            return []

    def maildir_new(self, user: str, domain: str = "localhost") -> list[Path]:
        return maildir_new(self.mailroot, user, domain)

    # -- process ---------------------------------------------------------

    def command(self) -> list[str]:
        if self.bare:
            return [str(TWISTD), "-n", "--pidfile=", "relaynet", *self.node_args]
        return [
            str(TWISTD), "-n", "--pidfile=", f"--logfile={self.log_path}",
            "relaynet", "--config", str(self.config_path), *self.node_args,
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "NodeProcess":
        """Start the node and wait (bounded) for its 220 greeting."""
        for attempt in range(3):
            try:
                return self._start_once()
            except NodeStartError as e:
                retry = (
                    self._auto_port and self.starts == 1 and attempt < 2
                    and "{port}" in self._template and "Address already in use" in str(e)
                )
                if not retry:
                    raise
                self.starts = 0
                self.port = free_port()
                self._write_config()
        raise AssertionError("unreachable")

    def _start_once(self) -> "NodeProcess":
        assert not self.running(), "node already running"
        log_mark = len(self.log_text())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        out = open(self.out_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.dir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        finally:
            out.close()
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise NodeStartError(
                    f"node exited with {self.proc.returncode} before greeting on port "
                    f"{self.port}:\n{self._tail_since(log_mark)}"
                )
            if read_greeting(self.port, self.host, timeout=1.0):
                return self
            if time.monotonic() >= deadline:
                self._kill_quietly()
                raise NodeStartError(
                    f"no 220 greeting on {self.host} port {self.port} within "
                    f"{self.start_timeout:.0f}s:\n{self._tail_since(log_mark)}"
                )
            time.sleep(0.05)

    def _wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_quietly()
            raise AssertionError(
                f"node pid {self.proc.pid} did not exit within {timeout:.1f}s:\n"
                f"{self.log_tail()}"
            ) from None

    def _kill_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass

    def kill9(self) -> int:
        """SIGKILL the node and reap it; @return: its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self._wait_exit(STOP_TIMEOUT)

    def signal(self, sig: int) -> None:
        """Send C{sig} to the node without waiting."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the node and wait (bounded) for it to exit; @return: its status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self._wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int:
        """Wait (bounded) for the node to exit by itself; @return: its status."""
        return self._wait_exit(timeout)

    def restart(self, crash: bool = False) -> "NodeProcess":
        """Stop (SIGTERM, or SIGKILL with C{crash}) if running, then start again."""
        if self.running():
            if crash:
                self.kill9()
            else:
                self.terminate()
        return self.start()

    # -- inspection ------------------------------------------------------

    def log_text(self) -> str:
        """The node's log (twistd log file and stdout/stderr)."""
        parts = []
        for p in (self.log_path, self.out_path):
            try:
                parts.append(p.read_text("utf-8", "replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def _tail_since(self, mark: int, lines: int = 40) -> str:
        return "\n".join(self.log_text()[mark:].splitlines()[-lines:])

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def vm_hwm_kib(self) -> int:
        """The node's peak resident set size (VmHWM) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def events(self, strict: bool = True) -> list[dict[str, Any]]:
        """
        The records of the node's events.jsonl (complete lines only).

        @param strict: raise on a line that is not JSON; else skip it (a crash
            can cut a line, and the next start appends after it).
        """
        import json

        try:
            raw = self.events_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        self.bad_event_lines = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                if strict:
                    raise
                self.bad_event_lines += 1
        return out

    # -- context manager -------------------------------------------------

    def __enter__(self) -> "NodeProcess":
        """Start the node unless it is already running."""
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill_quietly()


def worker_pids(supervisor: int) -> dict[int, int]:
    """The worker processes of a supervisor: shard -> pid (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            # A forked worker's title (setproctitle) is one string: words, not argv.
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and b"relaynet.worker" in argv and b"--shard" in argv:
            out[int(argv[argv.index(b"--shard") + 1])] = int(entry)
    return out


def stop_node(node: NodeProcess) -> None:
    """SIGKILL a node's supervisor and its workers, if any are left."""
    workers = worker_pids(node.proc.pid) if node.proc is not None else {}
    node._kill_quietly()
    for pid in workers.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
