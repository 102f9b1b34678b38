# -*- test-case-name: tests.test_lab -*-
"""
C{lab chaos}: for a bounded time, C{kill -9} random target nodes and start
them again (or, in a C{--netns} lab with C{links}, cut random links and
restore them), while traffic flows. Every action is appended to
C{<labdir>/chaos.jsonl}. Whatever it broke is repaired before it returns
(unless told not to restart), also on Ctrl-C.

The schedule (which target, how long to wait, how long it stays down) comes
from an injected L{random.Random}, so a seed replays it.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
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
    """

    targets: Sequence[str]
    duration: float
    interval: tuple[float, float] = (1.0, 3.0)
    down: tuple[float, float] = (0.5, 2.0)
    restart: bool = True
    max_actions: int = 0
    start_after: float = 0.0
    links: bool = False


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
