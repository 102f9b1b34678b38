# -*- test-case-name: tests.test_lab -*-
"""
The lab directory and its state file, so that every C{relaynet lab} command
works from any shell:

    <labdir>/lab.json          topology, nodes, addresses, ports, pids, dirs
    <labdir>/lab.lock          held (flock) while a command changes lab.json
    <labdir>/sent.jsonl        every message a client saw acknowledged (lab send)
    <labdir>/chaos.jsonl       what lab chaos did, when
    <labdir>/topology.svg      lab draw
    <labdir>/<node>/node.toml  the generated node config
    <labdir>/<node>/spool/     its spool (queue, events.jsonl)
    <labdir>/<node>/mailboxes/ its mailroot
    <labdir>/<node>/node.log   twistd's log; node.out: stdout/stderr
    <labdir>/<node>/twistd.pid

Process checks go through C{/proc}: a pid counts as the node only when it
is alive, not a zombie, and its command line names the node's config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

STATE_VERSION = 1


class LabError(Exception):
    """A lab command cannot do what was asked; the message says why."""


def pid_state(pid: int | None) -> str | None:
    """The state letter of a process (C{R}, C{S}, C{Z}, ...) or L{None} if none."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    """The command line of a process (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def node_alive(pid: int | None, config: str) -> bool:
    """
    Whether C{pid} is a live (non-zombie) process running the node whose
    config is C{config}.
    """
    st = pid_state(pid)
    if st is None or st in ("Z", "X"):
        return False
    assert pid is not None
    return config in cmdline(pid)


class Lab:
    """
    A lab directory and its C{lab.json}.

    @ivar dir: the lab directory (absolute).
    @ivar data: the parsed C{lab.json} (empty before the first L{save}).
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).absolute()
        self.data: dict[str, Any] = {}

    @property
    def state_path(self) -> Path:
        return self.dir / "lab.json"

    @property
    def sent_path(self) -> Path:
        return self.dir / "sent.jsonl"

    @property
    def chaos_path(self) -> Path:
        return self.dir / "chaos.jsonl"

    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self) -> "Lab":
        """
        Read C{lab.json}.

        @raise LabError: there is none, or it is unreadable.
        """
        try:
            self.data = json.loads(self.state_path.read_text("utf-8"))
        except FileNotFoundError:
            from relaynet.hints import command

            raise LabError(
                f"no lab in {self.dir} (no lab.json): start one with {command('lab', 'up', 'TOPOLOGY')},"
                " or give its directory with --dir"
            ) from None
        except (OSError, ValueError) as e:
            raise LabError(f"cannot read {self.state_path}: {e}") from None
        if self.data.get("version") != STATE_VERSION:
            raise LabError(f"{self.state_path}: unknown state version {self.data.get('version')!r}")
        return self

    def save(self) -> None:
        """Write C{lab.json} atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data["version"] = STATE_VERSION
        self.data["updated"] = time.time()
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n", "utf-8")
        os.replace(tmp, self.state_path)

    @contextlib.contextmanager
    def locked(self, wait: float = 30.0) -> Iterator["Lab"]:
        """
        Hold the lab's lock (bounded wait), reloading C{lab.json} if it exists.

        @raise LabError: another command held it for longer than C{wait}.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lab.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LabError(f"another lab command holds {self.dir / 'lab.lock'}") from None
                    time.sleep(0.05)
            if self.exists():
                self.load()
            yield self
        finally:
            os.close(fd)

    # -- nodes ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.data.get("name", self.dir.name))

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        """Node name -> its record (address, ports, pid, dirs, ...), in topology order."""
        nodes: dict[str, dict[str, Any]] = self.data.setdefault("nodes", {})
        return nodes

    def node(self, name: str) -> dict[str, Any]:
        """
        @raise LabError: no such node in this lab.
        """
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.name} (nodes: {', '.join(self.nodes)})") from None

    def alive(self, name: str) -> bool:
        """Whether node C{name}'s recorded process is running."""
        rec = self.node(name)
        return node_alive(rec.get("pid"), rec["config"])

    def endpoint_map(self) -> dict[str, str]:
        """C{host:port} of every listener address of every node -> the node name."""
        out = {}
        for name, rec in self.nodes.items():
            hosts = [] if rec.get("netns") else [rec["address"]]
            for host in [*hosts, *rec.get("link_addresses", {}).values()]:
                for port in rec["ports"]:
                    out[f"{host}:{port}"] = name
        return out


def spool_on_disk(rec: Mapping[str, Any]) -> str:
    """
    Where a node's spool can be read now: its spool directory, or, for a
    C{--power-fs} node whose powerfs is not mounted (the lab is down), the
    backing directory that holds the same files.
    """
    pfs = rec.get("powerfs")
    if pfs and not os.path.ismount(rec["spool"]) and os.path.isdir(pfs["backing"]):
        return str(pfs["backing"])
    return str(rec["spool"])
