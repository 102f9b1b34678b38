# -*- test-case-name: tests.test_lab -*-
"""
C{lab chaos}: for a bounded time, C{kill -9} random target nodes and start
them again (or, in a C{--netns} lab with C{links}, cut random links and
restore them; or, in a C{--power-fs} lab with C{power_cut}, cut their power:
C{kill -9}, then drop whatever their spool had not fsynced), while traffic
flows. Every action is appended to
C{<labdir>/chaos.jsonl}. Whatever it broke is repaired before it returns
(unless told not to restart), also on Ctrl-C.

The schedule (which target, how long to wait, how long it stays down) comes
from an injected L{random.Random}, so a seed replays it.

L{power_cut} and L{disk_full} act on one node of a C{--power-fs} lab at
once (C{relaynet lab soak} calls them).
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from attrs import define, field

from relaynet.lab import control, procs
from relaynet.lab.state import Lab, LabError


@define
class ChaosPlan:
    """
    What to break, how often and for how long.

    @ivar targets: nodes that may be killed (node mode), or whose links may be
        cut (links mode; empty: every link).
    @ivar interval: seconds between the end of one action and the next, drawn
        uniformly from C{[min, max]}.
    @ivar down: seconds a node stays dead / a link stays cut.
    @ivar restart: start killed nodes again (C{False}: leave them dead).
    @ivar max_actions: stop after this many actions (0: no limit).
    @ivar start_after: seconds to wait before the first action.
    @ivar power_cut: a node action is a power cut (C{kill -9}, then the
        node's powerfs drops what was not fsynced), not a plain C{kill -9};
        the lab must run with C{--power-fs}.
    """

    targets: Sequence[str]
    duration: float
    interval: tuple[float, float] = (1.0, 3.0)
    down: tuple[float, float] = (0.5, 2.0)
    restart: bool = True
    max_actions: int = 0
    start_after: float = 0.0
    links: bool = False
    power_cut: bool = False


@define
class ChaosLog:
    """What chaos did."""

    actions: list[dict[str, Any]] = field(factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for a in self.actions if a["action"] == kind)


def run(lab: Lab, plan: ChaosPlan, rng: random.Random, stop: threading.Event | None = None,
        say: Callable[[str], None] = lambda s: None) -> ChaosLog:
    """
    Break and repair the lab for C{plan.duration} seconds.

    @param stop: set it to end early (repairs still happen).
    @raise LabError: a target is unknown, or links mode without netns.
    """
    stop = stop or threading.Event()
    for t in plan.targets:
        lab.node(t)
    links = lab.data.get("links", [])
    if plan.links:
        if not lab.data.get("netns"):
            raise LabError("cutting links needs a lab started with 'lab up --netns'; "
                           "without it chaos can only kill nodes")
        if plan.targets:
            links = [lk for lk in links if lk["a"] in plan.targets or lk["b"] in plan.targets]
        if not links:
            raise LabError("no link to cut")
    elif not plan.targets:
        raise LabError("no target nodes: give --target NODE (or [lab.chaos] targets in the topology)")
    if plan.power_cut:
        if plan.links:
            raise LabError("--power-cut cuts nodes' power, --links cuts links: choose one")
        for t in plan.targets:
            _powerfs(lab, t)
    log = ChaosLog()
    children: list[subprocess.Popen[bytes]] = []
    out = open(lab.chaos_path, "a", encoding="utf-8")
    broken: dict[str, Any] = {}

    def note(action: str, **kw: Any) -> None:
        rec = {"time": round(time.time(), 6), "action": action, **kw}
        log.actions.append(rec)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        say(f"chaos: {action} " + " ".join(f"{k}={v}" for k, v in kw.items()))

    def repair() -> None:
        for key, what in list(broken.items()):
            if what["kind"] == "node":
                t0 = time.monotonic()
                pid = control.restart_node(lab, what["node"], children=children)
                note("restart", node=what["node"], pid=pid, ready_after=round(time.monotonic() - t0, 3))
            else:
                control.set_link(lab, what["a"], what["b"], True)
                note("restore", link=f"{what['a']}-{what['b']}")
            del broken[key]

    deadline = time.monotonic() + plan.duration
    actions = 0
    try:
        if plan.start_after and stop.wait(min(plan.start_after, plan.duration)):
            return log
        while time.monotonic() < deadline and not stop.is_set():
            if plan.max_actions and actions >= plan.max_actions:
                break
            if plan.links:
                lk = rng.choice(links)
                control.set_link(lab, lk["a"], lk["b"], False)
                broken[f"{lk['a']}-{lk['b']}"] = {"kind": "link", "a": lk["a"], "b": lk["b"]}
                note("cut", link=f"{lk['a']}-{lk['b']}")
            else:
                node = rng.choice(list(plan.targets))
                if not lab.alive(node):
                    # Left dead by an earlier action (restart = false): nothing to kill.
                    actions += 1
                    continue
                pids = control.kill_node(lab, node)
                for c in children:
                    c.poll()  # reap the ones we started and just killed
                broken[node] = {"kind": "node", "node": node}
                if plan.power_cut:
                    # kill_node waited until the processes were gone: now
                    # nothing of the node writes, and the cut is a power loss.
                    note("power cut", node=node, pids=pids, undone=_cut(lab, node))
                else:
                    note("kill -9", node=node, pids=pids)
            actions += 1
            down = rng.uniform(*plan.down)
            stop.wait(max(0.0, min(down, deadline - time.monotonic())))
            if plan.restart or plan.links:
                repair()
            elif not plan.links:
                broken.clear()
            pause = rng.uniform(*plan.interval)
            stop.wait(max(0.0, min(pause, deadline - time.monotonic())))
    finally:
        try:
            if plan.restart or plan.links:
                repair()
        finally:
            out.close()
            for c in children:
                # Restarted nodes are our children: collect the ones that
                # died meanwhile; the live ones are left running.
                if c.poll() is not None:
                    procs.reap(c)
    return log


def _powerfs(lab: Lab, name: str) -> dict[str, Any]:
    """
    The powerfs record of node C{name}.

    @raise LabError: the lab was not started with C{--power-fs}.
    """
    rec = lab.node(name)
    if not lab.data.get("power_fs") or not rec.get("powerfs"):
        from relaynet.hints import command

        raise LabError(
            f"lab {lab.name} was not started with --power-fs: power cuts and full disks need a spool on"
            f" powerfs; stop it ({command('lab', 'down', '--dir', lab.dir)}) and start it with"
            f" {command('lab', 'up', Path(lab.data.get('topology', 'TOPOLOGY')), '--dir', lab.dir, '--power-fs')}"
        )
    pfs: dict[str, Any] = rec["powerfs"]
    return pfs


def _send(lab: Lab, name: str, line: str) -> str:
    from relaynet.lab.powerfs import PowerFSError, send

    pfs = _powerfs(lab, name)
    try:
        return send(pfs["control"], line)
    except PowerFSError as e:
        raise LabError(f"node {name}: {e} (is its powerfs running? 'lab up' mounts it again)") from None


def _cut(lab: Lab, name: str) -> int:
    """Tell node C{name}'s powerfs to drop what was not fsynced; @return: records undone."""
    return int(_send(lab, name, "cut"))


def power_cut(lab: Lab, name: str, say: Callable[[str], None] = lambda s: None) -> int:
    """
    Cut the power of node C{name} of a C{--power-fs} lab: C{kill -9} its
    processes and wait until they are gone, make its powerfs drop every write
    and directory operation not fsynced, start it again and wait for its
    EHLO. Appended to C{chaos.jsonl}.

    @return: the powerfs journal records undone by the cut.
    @raise LabError: the lab was not started with C{--power-fs}, its powerfs
        does not answer, or the node did not come up again.
    """
    _powerfs(lab, name)
    t0 = time.monotonic()
    pids = control.kill_node(lab, name)
    undone = _cut(lab, name)
    say(f"chaos: power cut node={name} pids={pids} undone={undone}")
    pid = control.restart_node(lab, name)
    ready = round(time.monotonic() - t0, 3)
    say(f"chaos: restart node={name} pid={pid} ready_after={ready}")
    with open(lab.chaos_path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"time": round(time.time(), 6), "action": "power cut", "node": name,
                              "pids": pids, "undone": undone, "pid": pid, "ready_after": ready}) + "\n")
    return undone


def disk_full(lab: Lab, name: str, on: bool) -> None:
    """
    Fill (C{on}) or free the disk of node C{name}'s spool in a C{--power-fs}
    lab: while full, its powerfs fails every write and create with ENOSPC.
    Appended to C{chaos.jsonl}.

    @raise LabError: the lab was not started with C{--power-fs}, or its
        powerfs does not answer.
    """
    _send(lab, name, f"enospc {'on' if on else 'off'}")
    with open(lab.chaos_path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"time": round(time.time(), 6), "action": "disk full" if on else "disk freed",
                              "node": name}) + "\n")
