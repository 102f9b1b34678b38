# -*- test-case-name: tests.test_soak -*-
"""
C{relaynet lab soak TOPOLOGY --minutes M}: a soak that checks itself.

It brings the lab up (or reattaches to it, as C{lab up} does), then for C{M}
minutes:

 - sends a steady mixed load (L{Load}): sizes spread log-uniformly from 1 KB
   to 1 MB, 1 to 50 recipients per message (mostly few), each recipient of
   one of three kinds (L{recipient_kind}): an ordinary mailbox of the last
   hop, an unknown user of the last hop (C{soak-nouser-N@DOMAIN}: its RCPT
   gets C{550 5.1.1} there, so a DSN must come back to the sender), or a
   mailbox of C{soak-defer.DOMAIN} that the last hop answers with C{451
   4.7.1} while a "defer window" is closed and delivers once it opens
   (L{LastHop}): deferred, then delivered;
 - runs a seeded schedule of faults (L{Faults}): C{kill -9} and restart,
   link cuts (netns labs), and, in labs started with C{--power-fs}, power
   cuts and a full disk on one node (C{relaynet.lab.chaos.power_cut} and
   C{disk_full}; skipped with one line when this relaynet has none);
 - samples every node's peak memory (L{MemorySampler}).

Then it repairs what is broken, opens the defer window, drains (bounded:
until no queue has a message to move), runs the C{lab check} logic over the
messages it sent and prints a report (L{SoakReport}) whose last line is the
verdict; the exit status follows it. The report also goes to
C{<labdir>/soak-RUN.json}.

The last hop's extra mailboxes and the defer route are an overlay on its
generated C{node.toml}, applied with a configuration reload (SIGHUP, waited
for until the node and each of its workers has reloaded) and removed again
once the soak has drained; the original is kept as C{node.toml.soak-orig}
meanwhile, so an interrupted soak is undone by the next one.

The schedule (fault times, kinds, targets) and every message's size and
recipients come from the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

from attrs import define, field, frozen

from relaynet.config import load_config
from relaynet.lab import check, control, netns, procs
from relaynet.lab.observe import EventIndex, lab_events
from relaynet.lab.traffic import percentile
from relaynet.lab.state import Lab, LabError, node_alive, pid_state
from relaynet.lab.soakcli import FAULT_KINDS
from relaynet.lab.tomlw import dumps
from relaynet.lab.traffic import QUEUED_AS, _close, _transaction, read_sent

Say = Callable[[str], None]

MAX_RECIPIENTS = 50
MIN_SIZE = 1024
MAX_SIZE = 1024 * 1024
USER_PREFIX = "soak-r"
NOUSER_PREFIX = "soak-nouser-"
DEFER_LABEL = "soak-defer"
RELOAD_TIMEOUT = 15.0
POLL = 0.05


def _quiet(msg: str) -> None:
    pass


# -- the load: pure choices --------------------------------------------------


def recipient_kind(address: str) -> str:
    """
    What the last hop does with a soak recipient: C{"5xx"} (an unknown user:
    refused, a DSN comes back), C{"4xx"} (deferred while the defer window is
    closed) or C{"ok"}.
    """
    local, _, domain = address.lower().rpartition("@")
    if local.startswith(NOUSER_PREFIX):
        return "5xx"
    if domain.startswith(DEFER_LABEL + "."):
        return "4xx"
    return "ok"


def pick_size(rng: random.Random) -> int:
    """A message size, log-uniform from 1 KB to 1 MB (most small, some large)."""
    return round(math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))


def pick_count(rng: random.Random) -> int:
    """Recipients of one message: 1-3 mostly, up to 15 often, up to 50 sometimes."""
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 3)
    if r < 0.9:
        return rng.randint(4, 15)
    return rng.randint(16, MAX_RECIPIENTS)


def pick_recipients(rng: random.Random, domain: str, p5xx: float = 0.05, p4xx: float = 0.05) -> list[str]:
    """
    Distinct recipients of one message at the last hop's C{domain}: each an
    ordinary soak mailbox, or with probability C{p5xx} an unknown user, or
    with C{p4xx} a mailbox of the deferring domain.
    """
    picked = rng.sample(range(1, MAX_RECIPIENTS + 1), pick_count(rng))
    out = []
    for i in picked:
        r = rng.random()
        if r < p5xx:
            out.append(f"{NOUSER_PREFIX}{i:02d}@{domain}")
        elif r < p5xx + p4xx:
            out.append(f"{USER_PREFIX}{i:02d}@{DEFER_LABEL}.{domain}")
        else:
            out.append(f"{USER_PREFIX}{i:02d}@{domain}")
    return out


_LINE = b"The quick brown fox jumps over the lazy dog, soak after soak. 0123456789\r\n"


def soak_message(message_id: str, sender: str, recipients: Sequence[str], size: int, run: str, seq: int) -> bytes:
    """
    A message of about C{size} bytes (headers included): CRLF lines of at
    most 78 octets, the C{To:} field folded, so that any number of
    recipients and any size make a valid message.
    """
    to = ",\r\n ".join(f"<{r}>" for r in recipients)
    head = (
        f"From: <{sender}>\r\nTo: {to}\r\n"
        f"Subject: soak message {seq} of run {run}\r\nDate: {formatdate(localtime=True)}\r\n"
        f"Message-ID: {message_id}\r\nX-Lab-Run: {run}\r\nX-Lab-Seq: {seq}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode("ascii")
    body_len = max(len(_LINE), size - len(head))
    full, rest = divmod(body_len, len(_LINE))
    body = _LINE * full + (b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b"")
    return head + body


def soak_users() -> list[str]:
    """The mailboxes the overlay adds to the last hop."""
    return [f"{USER_PREFIX}{i:02d}" for i in range(1, MAX_RECIPIENTS + 1)]


# -- the last hop's overlay --------------------------------------------------


def overlay_config(data: Mapping[str, Any], domain: str, open_window: bool) -> dict[str, Any]:
    """
    The last hop's node config with the soak's mailboxes and defer route.

    @param data: its generated config (parsed C{node.toml}).
    @param domain: the local domain the soak sends to.
    @param open_window: whether C{soak-defer.DOMAIN} is delivered (a local
        domain) or deferred (a C{reject} route with C{451 4.7.1}).
    """
    out: dict[str, Any] = json.loads(json.dumps(data))
    local = out.setdefault("local", {})
    local["users"] = list(local.get("users", [])) + [u for u in soak_users() if u not in local.get("users", [])]
    defer = f"{DEFER_LABEL}.{domain}"
    if open_window:
        local["domains"] = list(local.get("domains", [])) + [defer]
    out["route"] = [{"domains": [defer], "action": "reject", "code": 451, "enhanced": "4.7.1",
                     "text": "soak: deferred on purpose, try again later"}] + list(out.get("route", []))
    return out


class LastHop:
    """
    The node that delivers the soak's domain, and its overlay: apply, open
    or close the defer window, restore. Each change rewrites C{node.toml}
    (atomically) and reloads the running node, waiting (bounded) for its
    C{reload} event; a node that is down reads the file when it starts.
    """

    def __init__(self, lab: Lab, name: str, domain: str, say: Say = _quiet) -> None:
        self.lab = lab
        self.name = name
        self.domain = domain
        self.say = say
        rec = lab.node(name)
        self.config = Path(rec["config"])
        self.saved = self.config.with_name(self.config.name + ".soak-orig")
        self.admin = load_config(self.config).admin_endpoint
        self.open = False
        self.toggles = 0

    def apply(self, open_window: bool) -> None:
        """
        Write the overlay (from the original config) and reload.

        @raise LabError: the node refused the new configuration or did not
            reload in time.
        """
        if not self.saved.exists():
            tmp = self.saved.with_suffix(".tmp")
            tmp.write_bytes(self.config.read_bytes())
            os.replace(tmp, self.saved)
        original = tomllib.loads(self.saved.read_text("utf-8"))
        data = overlay_config(original, self.domain, open_window)
        self._write(dumps(data, "Generated by 'relaynet lab up', with the overlay of a running"
                                " 'relaynet lab soak'\n(the original: node.toml.soak-orig)."))
        self.open = open_window
        self.toggles += 1

    def restore(self) -> None:
        """Put the original config back (if the overlay is on) and reload."""
        if not self.saved.exists():
            return
        self._write(self.saved.read_text("utf-8"))
        self.saved.unlink()

    def _write(self, text: str) -> None:
        tmp = self.config.with_suffix(".toml.tmp")
        tmp.write_text(text, "utf-8")
        os.replace(tmp, self.config)
        self._reload()

    def _reload(self) -> None:
        rec = self.lab.node(self.name)
        pid = rec.get("pid")
        if not node_alive(pid, rec["config"]):
            return  # it reads the file when it starts
        assert pid is not None
        since = time.time()
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            if self._reloaded(since) or not node_alive(pid, rec["config"]):
                return
            time.sleep(POLL)
        raise LabError(f"node {self.name} did not reload its configuration within {RELOAD_TIMEOUT:.0f}s")

    def _reloaded(self, since: float) -> bool:
        """
        Whether the node, and each of its workers that runs, has reloaded
        since C{since} (its admin API's status; a worker being restarted
        reads the file as it starts). A node with workers used to be taken
        as reloaded at its first C{reload} event, one worker's.

        @raise LabError: the node refused the configuration.
        """
        from relaynet.admin.queuecli import AdminClient, AdminError

        try:
            status = AdminClient(self.admin).request("GET", "/api/status")
        except (AdminError, OSError):
            return False  # not answering yet
        reloads = [status.get("last_reload")] + [w.get("last_reload") for w in status.get("workers", []) if w["up"]]
        for r in reloads:
            if r and r["time"] >= since and r.get("status") == "refused":
                raise LabError(f"node {self.name} refused the soak's configuration: {r.get('error')}")
        return all(r and r["time"] >= since for r in reloads)


def last_hop(lab: Lab, recipients: Sequence[str]) -> tuple[str, str]:
    """
    The node delivering the domain of the topology's first traffic recipient,
    and that domain.

    @raise LabError: no node has it as a local domain.
    """
    if not recipients:
        raise LabError("the topology's [lab.traffic] names no recipients: the soak sends to their domain")
    domain = recipients[0].rpartition("@")[2].lower()
    for name, rec in lab.nodes.items():
        if domain in [d.lower() for d in rec.get("domains", [])]:
            return name, domain
    raise LabError(f"no node of lab {lab.name} delivers {domain} (the domain of {recipients[0]})")


# -- memory ------------------------------------------------------------------


def read_memory(pid: int) -> tuple[int, int] | None:
    """C{(VmHWM, VmRSS)} of a process in KiB, or L{None} when it is gone."""
    hwm = rss = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    if hwm is None or rss is None:
        return None
    return hwm, rss


@define
class NodeMemory:
    """
    Peak memory of one node over the soak.

    @ivar peaks: pid -> its highest VmHWM seen (KiB); a restart adds a pid.
    @ivar last_rss: the node's VmRSS at the last sample (KiB).
    """

    peaks: dict[int, int] = field(factory=dict)
    last_rss: int = 0

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def to_json(self) -> dict[str, Any]:
        return {"peak_kib": self.peak, "processes": len(self.peaks), "restarts": max(0, len(self.peaks) - 1),
                "last_rss_kib": self.last_rss, "per_pid_peak_kib": {str(p): k for p, k in self.peaks.items()}}


class MemorySampler:
    """
    Sample every node's C{/proc/PID/status} (VmHWM, VmRSS) every C{every}
    seconds in a thread of its own, following restarts (new pids).
    """

    def __init__(self, lab: Lab, every: float = 1.0) -> None:
        self.lab = lab
        self.every = every
        self.nodes: dict[str, NodeMemory] = {n: NodeMemory() for n in lab.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-memory", daemon=True)
        self._lock = threading.Lock()

    def sample(self) -> None:
        for name, rec in list(self.lab.nodes.items()):
            pid = rec.get("pid")
            if not pid or not node_alive(pid, rec["config"]):
                continue
            mem = read_memory(pid)
            if mem is None:
                continue
            with self._lock:
                m = self.nodes.setdefault(name, NodeMemory())
                m.peaks[pid] = max(m.peaks.get(pid, 0), mem[0])
                m.last_rss = mem[1]

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()


# -- faults ------------------------------------------------------------------


def available_faults(lab: Lab, wanted: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """
    The fault kinds of C{wanted} this lab and this relaynet can do, and why
    each other one is skipped.
    """
    from relaynet.lab import chaos

    ok: list[str] = []
    skipped: dict[str, str] = {}
    for kind in wanted:
        if kind == "kill":
            ok.append(kind)
        elif kind == "link":
            if lab.data.get("netns"):
                ok.append(kind)
            else:
                skipped[kind] = "link cuts need a lab started with 'lab up --netns'"
        elif kind in ("power", "disk"):
            func = "power_cut" if kind == "power" else "disk_full"
            if not hasattr(chaos, func):
                skipped[kind] = f"this relaynet has no relaynet.lab.chaos.{func} yet"
            elif not power_fs(lab):
                skipped[kind] = "needs a lab started with 'lab up --power-fs'"
            else:
                ok.append(kind)
    return ok, skipped


def power_fs(lab: Lab) -> bool:
    """Whether the lab was started with C{lab up --power-fs}."""
    return bool(lab.data.get("power_fs") or lab.data.get("powerfs"))


@define
class FaultLog:
    """What the fault schedule did: one record per action, counts by kind."""

    actions: list[dict[str, Any]] = field(factory=list)
    skipped: dict[str, str] = field(factory=dict)
    errors: list[str] = field(factory=list)

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in FAULT_KINDS}
        for a in self.actions:
            if a.get("fault"):
                out[a["fault"]] = out.get(a["fault"], 0) + 1
        return out


class Faults:
    """
    The seeded fault schedule and the defer windows, run in one thread so
    that no reload meets a node that is being restarted. Everything broken
    is repaired by L{repair}.
    """

    def __init__(self, lab: Lab, kinds: Sequence[str], targets: Sequence[str], rng: random.Random,
                 interval: tuple[float, float], down: tuple[float, float], hop: LastHop | None,
                 defer_window: float, say: Say = _quiet) -> None:
        self.lab = lab
        self.kinds = list(kinds)
        self.targets = list(targets)
        self.rng = rng
        self.interval = interval
        self.down = down
        self.hop = hop
        self.defer_window = defer_window
        self.say = say
        self.log = FaultLog()
        self.children: list[subprocess.Popen[bytes]] = []
        self.broken: dict[str, dict[str, Any]] = {}
        self.links = [lk for lk in lab.data.get("links", [])
                      if lk["a"] in self.targets or lk["b"] in self.targets]
        if "link" in self.kinds and not self.links:
            self.kinds.remove("link")
            self.log.skipped["link"] = "no link touches the targets"

    def note(self, action: str, logged: bool = False, **kw: Any) -> None:
        """
        Record an action; append it to C{chaos.jsonl} unless C{logged} (the
        chaos function that did it wrote its own line there).
        """
        rec = {"time": round(time.time(), 6), "action": action, "soak": True, **kw}
        self.log.actions.append(rec)
        if not logged:
            with open(self.lab.chaos_path, "a", encoding="utf-8") as out:
                out.write(json.dumps(rec) + "\n")
        self.say(f"soak: {action} " + " ".join(f"{k}={v}" for k, v in kw.items() if k != "fault"))

    def run(self, until: float, stop: threading.Event) -> None:
        """Break, repair and toggle the defer window until C{until} (monotonic) or C{stop}."""
        next_fault = time.monotonic() + self.rng.uniform(*self.interval)
        next_toggle = time.monotonic() + self.defer_window
        for _ in range(1_000_000):
            now = time.monotonic()
            if stop.is_set() or now >= until:
                return
            if self.hop is not None and now >= next_toggle:
                self.hop.apply(not self.hop.open)
                self.note("defer window " + ("opened" if self.hop.open else "closed"), node=self.hop.name)
                next_toggle = now + self.defer_window
                continue
            if self.kinds and self.targets and now >= next_fault:
                try:
                    self.fault(stop, until)
                except LabError as e:
                    self.log.errors.append(str(e))
                    self.say(f"soak: fault failed: {e}")
                    self.repair()
                next_fault = time.monotonic() + self.rng.uniform(*self.interval)
                continue
            wake = min(until, next_fault if self.kinds and self.targets else until,
                       next_toggle if self.hop is not None else until)
            stop.wait(max(0.0, wake - time.monotonic()))

    def fault(self, stop: threading.Event, until: float) -> None:
        from relaynet.lab import chaos

        kind = self.rng.choice(self.kinds)
        down = self.rng.uniform(*self.down)
        if kind == "link":
            lk = self.rng.choice(self.links)
            control.set_link(self.lab, lk["a"], lk["b"], False)
            self.broken[f"link {lk['a']}-{lk['b']}"] = {"kind": "link", "a": lk["a"], "b": lk["b"]}
            self.note("cut", fault="link", link=f"{lk['a']}-{lk['b']}")
            stop.wait(down)
            self.repair()
            return
        node = self.rng.choice(self.targets)
        if not self.lab.alive(node):
            self.repair()
            return
        if kind == "kill":
            pids = self._kill9(node)
            self.broken[f"node {node}"] = {"kind": "node", "node": node}
            self.note("kill -9", fault="kill", node=node, pids=pids)
            stop.wait(down)
            self.repair()
        elif kind == "power":
            self.broken[f"node {node}"] = {"kind": "node", "node": node}
            undone = getattr(chaos, "power_cut")(self.lab, node, self.say)  # noqa: B009 (may not exist yet: mypy)
            self.note("power cut", logged=True, fault="power", node=node, undone=undone)
            self.repair()
        elif kind == "disk":
            getattr(chaos, "disk_full")(self.lab, node, True)  # noqa: B009 (may not exist yet: mypy)
            self.broken[f"disk {node}"] = {"kind": "disk", "node": node}
            self.note("disk full", logged=True, fault="disk", node=node)
            stop.wait(down)
            self.repair()

    def _kill9(self, node: str) -> list[int]:
        rec = self.lab.node(node)
        pids = procs.node_pids(rec)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Reap the ones we started (a restarted node is our child): until
        # then they are zombies whose pid files and locks look held.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for c in self.children:
                c.poll()
            if all(pid_state(p) is None for p in pids):
                break
            time.sleep(POLL)
        return pids

    def repair(self) -> None:
        """Restart killed nodes, restore cut links, free full disks (also after an error)."""
        from relaynet.lab import chaos

        for key, what in list(self.broken.items()):
            try:
                if what["kind"] == "node":
                    if not self.lab.alive(what["node"]):
                        t0 = time.monotonic()
                        pid = control.restart_node(self.lab, what["node"], children=self.children)
                        self.note("restart", node=what["node"], pid=pid, ready_after=round(time.monotonic() - t0, 3))
                elif what["kind"] == "link":
                    control.set_link(self.lab, what["a"], what["b"], True)
                    self.note("restore", link=f"{what['a']}-{what['b']}")
                elif what["kind"] == "disk":
                    getattr(chaos, "disk_full")(self.lab, what["node"], False)  # noqa: B009 (as above)
                    self.note("disk freed", logged=True, node=what["node"])
            except LabError as e:
                self.log.errors.append(f"repair {key}: {e}")
                self.say(f"soak: repair {key} failed: {e}")
                continue
            del self.broken[key]

    def close(self) -> None:
        """Collect the exit status of restarted nodes that died meanwhile."""
        for c in self.children:
            if c.poll() is not None:
                procs.reap(c)


# -- load --------------------------------------------------------------------


@define
class LoadSummary:
    """What the sender did."""

    run: str
    sent: int = 0
    recipients: int = 0
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(factory=dict)


class Load:
    """
    Steady mixed traffic to the entry nodes at C{rate} messages per second
    over C{concurrency} SMTP sessions, until C{until} (monotonic); every
    message a client saw acknowledged goes to C{sent.jsonl} as C{lab send}
    writes it. Sizes and recipients of message C{seq} come from
    C{random.Random(f"{seed}:{seq}")}.
    """

    def __init__(self, lab: Lab, entry: Sequence[str], sender: str, domain: str, rate: float,
                 concurrency: int, seed: int, timeout: float = 60.0) -> None:
        self.lab = lab
        self.entry = list(entry)
        self.sender = sender
        self.domain = domain
        self.rate = rate
        self.concurrency = concurrency
        self.seed = seed
        self.timeout = timeout
        self.summary = LoadSummary(run="soak-" + uuid.uuid4().hex[:8])
        self._lock = threading.Lock()
        self._seq = 0
        self._threads: list[threading.Thread] = []

    def start(self, until: float, stop: threading.Event) -> None:
        t0 = time.monotonic()
        out = open(self.lab.sent_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by join)
        self._out = out

        def take() -> int | None:
            with self._lock:
                if stop.is_set() or time.monotonic() >= until:
                    return None
                seq = self._seq
                self._seq += 1
                return seq

        def worker() -> None:
            conns: dict[str, Any] = {}
            entered: str | None = None
            try:
                for _ in range(10_000_000):
                    seq = take()
                    if seq is None:
                        return
                    wait = t0 + seq / self.rate - time.monotonic()
                    if wait > 0 and stop.wait(min(wait, max(0.0, until - time.monotonic()))):
                        return
                    if time.monotonic() >= until:
                        return
                    node = self.entry[seq % len(self.entry)]
                    rec = self.lab.nodes[node]
                    if rec.get("netns") != entered:
                        for c in conns.values():
                            _close(c)
                        conns.clear()
                        netns.enter(rec.get("netns"))
                        entered = rec.get("netns")
                    self._one(conns, node, rec, seq)
            finally:
                for c in conns.values():
                    _close(c)

        self._threads = [threading.Thread(target=worker, name=f"soak-send-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()

    def _one(self, conns: dict[str, Any], node: str, rec: Mapping[str, Any], seq: int) -> None:
        rng = random.Random(f"{self.seed}:{seq}")
        rcpts = pick_recipients(rng, self.domain)
        size = pick_size(rng)
        run = self.summary.run
        mid = f"<lab-{run}-{seq}@{self.lab.name}.lab.test>"
        data = soak_message(mid, self.sender, rcpts, size, run, seq)
        start = time.time()
        outcome, detail, accepted = _transaction(conns, node, rec, 0, self.sender, rcpts, data,
                                                 self.timeout, None, False)
        acked = time.time()
        with self._lock:
            s = self.summary
            s.sent += 1
            s.recipients += len(rcpts)
            s.bytes += len(data)
            if outcome == "accepted":
                s.accepted += 1
                m = QUEUED_AS.search(detail)
                self._out.write(json.dumps({
                    "message_id": mid, "time": round(acked, 6), "start": round(start, 6),
                    "sender": self.sender, "recipients": accepted,
                    "refused": [r for r in rcpts if r not in accepted], "node": node,
                    "queue_id": m.group(1) if m else None, "size": len(data), "run": run, "seq": seq,
                    "soak": True,
                }, separators=(",", ":")) + "\n")
                self._out.flush()
            else:
                if outcome == "refused":
                    s.refused += 1
                else:
                    s.failed += 1
                s.errors[detail[:80]] = s.errors.get(detail[:80], 0) + 1

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._out.close()


# -- the report --------------------------------------------------------------


@define
class SoakReport:
    """
    What a soak found, per (message, recipient) of the messages it had
    acknowledged. Each pair is one of: delivered once, bounced with a DSN,
    duplicated, in flight, lost; L{ok} also needs every bounce to be a
    C{5xx} recipient's and every C{5xx} recipient to have bounced.
    """

    lab: str = ""
    run: str = ""
    seed: int = 0
    minutes: float = 0.0
    rate: float = 0.0
    sent: int = 0
    sent_recipients: int = 0
    refused: int = 0
    failed: int = 0
    acknowledged: int = 0
    acknowledged_recipients: int = 0
    kinds: dict[str, int] = field(factory=dict)
    delivered: int = 0
    bounced_expected: int = 0
    bounced_unexpected: list[tuple[str, str]] = field(factory=list)
    delivered_unexpected: list[tuple[str, str]] = field(factory=list)
    deferred_then_delivered: int = 0
    deferred_then_delivered_4xx: int = 0
    lost: list[tuple[str, str]] = field(factory=list)
    duplicated: list[tuple[str, str, int]] = field(factory=list)
    in_flight: list[tuple[str, str]] = field(factory=list)
    latencies: list[float] = field(factory=list)
    latencies_4xx: list[float] = field(factory=list)
    latency_from_files: int = 0
    memory: dict[str, dict[str, Any]] = field(factory=dict)
    faults: dict[str, int] = field(factory=dict)
    faults_skipped: dict[str, str] = field(factory=dict)
    fault_errors: list[str] = field(factory=list)
    defer_windows: int = 0
    drain_seconds: float = 0.0
    drained: bool = False
    send_errors: dict[str, int] = field(factory=dict)
    check: dict[str, Any] = field(factory=dict)
    report_path: str = ""

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated or in flight, and every bounce expected."""
        return not (self.lost or self.duplicated or self.in_flight or self.bounced_unexpected
                    or self.delivered_unexpected)

    def verdict(self) -> str:
        """The last line: C{OK: ...} exactly when L{ok}, else C{FAIL: ...} naming each failing count."""
        if self.ok:
            return (f"OK: {self.delivered} delivered exactly once ({self.deferred_then_delivered} after a deferral),"
                    f" {self.bounced_expected} bounced as expected, nothing lost, no duplicate, nothing in flight")
        bad = []
        for n, what in ((len(self.lost), "lost"), (len(self.duplicated), "duplicated"),
                        (len(self.in_flight), "in flight after the drain"),
                        (len(self.bounced_unexpected), "bounced unexpectedly"),
                        (len(self.delivered_unexpected), "delivered although refused with 5xx")):
            if n:
                bad.append(f"{n} {what}")
        return "FAIL: " + ", ".join(bad)

    def to_json(self) -> dict[str, Any]:
        lat, lat4 = sorted(self.latencies), sorted(self.latencies_4xx)
        return {
            "ok": self.ok, "lab": self.lab, "run": self.run, "seed": self.seed, "minutes": self.minutes,
            "rate": self.rate, "sent": self.sent, "sent_recipients": self.sent_recipients,
            "refused": self.refused, "failed": self.failed, "send_errors": self.send_errors,
            "acknowledged": self.acknowledged, "acknowledged_recipients": self.acknowledged_recipients,
            "recipient_kinds": self.kinds, "delivered_once": self.delivered,
            "bounced_expected": self.bounced_expected, "bounced_unexpected": len(self.bounced_unexpected),
            "delivered_unexpected": len(self.delivered_unexpected),
            "deferred_then_delivered": self.deferred_then_delivered,
            "deferred_then_delivered_4xx": self.deferred_then_delivered_4xx,
            "lost": len(self.lost), "duplicated": len(self.duplicated), "in_flight": len(self.in_flight),
            "lost_ids": [{"message_id": m, "recipient": r} for m, r in self.lost],
            "duplicated_ids": [{"message_id": m, "recipient": r, "copies": n} for m, r, n in self.duplicated],
            "in_flight_ids": [{"message_id": m, "recipient": r} for m, r in self.in_flight],
            "bounced_unexpected_ids": [{"message_id": m, "recipient": r} for m, r in self.bounced_unexpected],
            "delivered_unexpected_ids": [{"message_id": m, "recipient": r} for m, r in self.delivered_unexpected],
            "latency": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                        "max": lat[-1] if lat else None, "count": len(lat),
                        "from_mailbox_file_times": self.latency_from_files},
            "latency_deferred_on_purpose": {"p50": percentile(lat4, 50), "p99": percentile(lat4, 99),
                                            "max": lat4[-1] if lat4 else None, "count": len(lat4)},
            "memory": self.memory, "faults": self.faults, "faults_skipped": self.faults_skipped,
            "fault_errors": self.fault_errors, "defer_windows": self.defer_windows,
            "drain_seconds": round(self.drain_seconds, 3), "drained": self.drained,
            "check": self.check, "verdict": self.verdict(),
        }

    def format(self, show: int = 10) -> str:
        """The report as text; its last line is L{verdict}."""
        def secs(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}s"

        lat, lat4 = sorted(self.latencies), sorted(self.latencies_4xx)
        k = self.kinds
        lines = [
            f"soak of lab {self.lab}: run {self.run}, seed {self.seed}, {self.minutes:g} min at {self.rate:g} msg/s",
            (f"sent:                     {self.sent} messages, {self.sent_recipients} recipients"
             f" ({self.refused} refused, {self.failed} failed at submission)"),
            (f"acknowledged (250):       {self.acknowledged} messages, {self.acknowledged_recipients} recipients"
             f" ({k.get('ok', 0)} ordinary, {k.get('4xx', 0)} deferred on purpose,"
             f" {k.get('5xx', 0)} refused on purpose)"),
            f"delivered exactly once:   {self.delivered}",
            f"bounced as expected:      {self.bounced_expected} (5xx at the last hop, DSN back to the sender)",
            (f"deferred then delivered:  {self.deferred_then_delivered} ({self.deferred_then_delivered_4xx}"
             " of them deferred on purpose with 4xx)"),
            f"bounced unexpectedly:     {len(self.bounced_unexpected)}",
            f"delivered despite 5xx:    {len(self.delivered_unexpected)}",
            f"lost:                     {len(self.lost)}",
            f"duplicated:               {len(self.duplicated)}",
            f"in flight after drain:    {len(self.in_flight)}",
            (f"latency 250 -> mailbox:   p50 {secs(percentile(lat, 50))}  p99 {secs(percentile(lat, 99))}"
             f"  max {secs(lat[-1] if lat else None)} ({len(lat)} deliveries"
             f"; deferred on purpose: p50 {secs(percentile(lat4, 50))}, p99 {secs(percentile(lat4, 99))})"),
            "peak memory (VmHWM):      " + ", ".join(
                f"{n} {m['peak_kib'] / 1024:.1f} MiB" + (f" ({m['restarts']} restart(s))" if m["restarts"] else "")
                for n, m in self.memory.items()),
            ("faults:                   " + ", ".join(f"{kind} {n}" for kind, n in self.faults.items())
             + f"; defer windows toggled {self.defer_windows} time(s)"),
        ]
        if self.latency_from_files:
            lines.append(f"  {self.latency_from_files} deliveries have no 'delivered' event (a power cut drops the"
                         " event lines not yet on disk): their latency is from the mailbox file's time, and"
                         " 'deferred then delivered' counts only deferrals the events still show")
        for kind, why in self.faults_skipped.items():
            lines.append(f"  skipped {kind}: {why}")
        for e in self.fault_errors[:show]:
            lines.append(f"  fault error: {e}")
        lines.append(f"drain:                    {self.drain_seconds:.1f}s, "
                     + ("queues empty" if self.drained else "queues still busy"))
        for title, items in (("lost", [f"{m} to {r}" for m, r in self.lost]),
                             ("duplicated", [f"{m} to {r}: {n} copies" for m, r, n in self.duplicated]),
                             ("in flight", [f"{m} to {r}" for m, r in self.in_flight]),
                             ("bounced unexpectedly", [f"{m} to {r}" for m, r in self.bounced_unexpected]),
                             ("delivered despite 5xx", [f"{m} to {r}" for m, r in self.delivered_unexpected])):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {i}" for i in items[:show]]
                if len(items) > show:
                    lines.append(f"  ... and {len(items) - show} more")
        if self.report_path:
            lines.append(f"report: {self.report_path}")
        lines.append(self.verdict())
        return "\n".join(lines)


def deferred_pairs(index: EventIndex) -> set[tuple[str, str]]:
    """(Message-ID, recipient) pairs that some hop deferred at least once."""
    out: set[tuple[str, str]] = set()
    for qid, outs in index.outcomes.items():
        rec = index.received.get(qid)
        mid = rec.get("message_id") if rec else None
        if not mid:
            continue
        for e in outs:
            if e.get("event") == "deferred" and e.get("recipient"):
                out.add((mid, str(e["recipient"]).lower()))
    return out


def first_deliveries(index: EventIndex) -> dict[tuple[str, str], float]:
    """(Message-ID, recipient) -> time of its first local delivery."""
    first: dict[tuple[str, str], float] = {}
    for qid, outs in index.outcomes.items():
        rec = index.received.get(qid)
        mid = rec.get("message_id") if rec else None
        if not mid:
            continue
        for e in outs:
            if e.get("event") == "delivered":
                key = (mid, str(e.get("recipient", "")).lower())
                t = float(e["time"])
                if key not in first or t < first[key]:
                    first[key] = t
    return first


def mailbox_times(ev: check.Evidence) -> dict[tuple[str, str], float]:
    """(Message-ID, recipient) -> the earliest modification time of its mailbox files."""
    out: dict[tuple[str, str], float] = {}
    for key, paths in ev.where.items():
        for path in paths:
            try:
                t = os.stat(path).st_mtime
            except OSError:
                continue
            out[key] = min(t, out.get(key, t))
    return out


def summarise(sent: Sequence[Mapping[str, Any]], ev: check.Evidence, index: EventIndex,
              report: SoakReport, file_times: Mapping[tuple[str, str], float] | None = None) -> SoakReport:
    """
    Fill C{report} from the acknowledged messages C{sent} (this soak's lines
    of C{sent.jsonl}), the mailboxes and queues (C{ev}) and the events.
    Pure: it reads nothing.

    @param file_times: (Message-ID, recipient) -> modification time of its
        mailbox file: the delivery time of a copy whose C{delivered} event
        is gone (a power cut loses event lines not yet on disk).
    """
    verified = check.verify(sent, ev, index)
    report.check = verified.to_json()
    lost = set(verified.lost)
    dups = {(m, r): n for m, r, n in verified.duplicated}
    flight = set(verified.in_flight)
    deferred = deferred_pairs(index)
    delivered_at = first_deliveries(index)
    seen: set[str] = set()
    for s in sent:
        mid = s["message_id"]
        if mid in seen:
            continue
        seen.add(mid)
        report.acknowledged += 1
        acked = float(s.get("time", s.get("start", 0.0)))
        for r in (a.lower() for a in s.get("recipients", [])):
            report.acknowledged_recipients += 1
            kind = recipient_kind(r)
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            key = (mid, r)
            if key in flight:
                report.in_flight.append(key)
            elif key in lost:
                report.lost.append(key)
            elif key in dups:
                report.duplicated.append((mid, r, dups[key]))
            elif ev.copies.get(key, 0) >= 1:
                if kind == "5xx":
                    report.delivered_unexpected.append(key)
                    continue
                report.delivered += 1
                if key in deferred:
                    report.deferred_then_delivered += 1
                    if kind == "4xx":
                        report.deferred_then_delivered_4xx += 1
                at = delivered_at.get(key)
                if at is None and file_times is not None and key in file_times:
                    at = file_times[key]
                    report.latency_from_files += 1
                if at is not None:
                    (report.latencies_4xx if kind == "4xx" else report.latencies).append(max(0.0, at - acked))
            elif kind == "5xx":
                report.bounced_expected += 1
            else:
                report.bounced_unexpected.append(key)
    report.latencies.sort()
    report.latencies_4xx.sort()
    return report


# -- the soak ----------------------------------------------------------------


@frozen
class SoakPlan:
    """The soak's settings (see C{relaynet lab soak -h})."""

    minutes: float
    rate: float = 1.0
    concurrency: int = 4
    seed: int = 0
    faults: tuple[str, ...] = FAULT_KINDS
    targets: tuple[str, ...] = ()
    interval: tuple[float, float] = (20.0, 40.0)
    down: tuple[float, float] = (1.0, 5.0)
    drain: float = 300.0
    defer_window: float = 30.0


def run_soak(lab: Lab, plan: SoakPlan, say: Say = _quiet) -> SoakReport:
    """
    Soak a running lab: load, faults and defer windows for C{plan.minutes},
    then repair, drain, check; write C{<labdir>/soak-RUN.json}.

    @raise LabError: a target is unknown, the lab has no node delivering the
        traffic's domain, or the last hop refused the overlay.
    """
    traffic = lab.data.get("traffic", {})
    entry = list(traffic.get("from") or [next(iter(lab.nodes))])
    hop_name, domain = last_hop(lab, list(traffic.get("recipients", [])))
    sender = str(traffic.get("sender", "lab@lab.test"))
    for t in plan.targets:
        lab.node(t)
    targets = list(plan.targets) or [n for n in lab.nodes if n not in entry]
    kinds, skipped = available_faults(lab, plan.faults)
    for kind, why in skipped.items():
        say(f"soak: skipping {kind} faults: {why}")
    rng = random.Random(plan.seed)
    hop = LastHop(lab, hop_name, domain, say)
    if hop.saved.exists():
        say(f"soak: an earlier soak left its overlay on {hop_name}: restoring it first")
        hop.restore()
    hop.apply(open_window=False)
    say(f"soak: {plan.minutes:g} min on lab {lab.name} (seed {plan.seed}): {plan.rate:g} msg/s to"
        f" {', '.join(entry)}, last hop {hop_name} ({domain}), faults: {', '.join(kinds) or 'none'}"
        f" on {', '.join(targets)}")
    memory = MemorySampler(lab)
    load = Load(lab, entry, sender, domain, plan.rate, plan.concurrency, plan.seed)
    faults = Faults(lab, kinds, targets, rng, plan.interval, plan.down, hop, plan.defer_window, say)
    faults.log.skipped.update(skipped)
    stop = threading.Event()
    until = time.monotonic() + plan.minutes * 60
    memory.start()
    load.start(until, stop)
    drained = False
    waited = 0.0
    interrupted = False
    try:
        faults.run(until, stop)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # Also on Ctrl-C: stop the load, repair what is broken, open the
        # defer window; only the drain is skipped then (the overlay stays
        # until the next soak, which removes it first).
        stop.set()
        load.join(120)
        faults.repair()
        try:
            if not hop.open:
                hop.apply(open_window=True)
                faults.note("defer window opened", node=hop_name)
            if not interrupted:
                say(f"soak: load done ({load.summary.accepted} acknowledged); draining (at most {plan.drain:g}s)")
                waited = check.wait_settled(lab.nodes, plan.drain)
                drained = check.busy_count(lab.nodes) == 0
        finally:
            faults.close()
            memory.stop()
    run = load.summary.run
    sent = [r for r in read_sent(lab.sent_path) if r.get("run") == run]
    stopped = [n for n in lab.nodes if not lab.alive(n)]
    ev = check.collect(lab.nodes, stopped)
    index = EventIndex(lab_events(lab.nodes), lab.endpoint_map())
    s = load.summary
    report = SoakReport(
        lab=lab.name, run=run, seed=plan.seed, minutes=plan.minutes, rate=plan.rate, sent=s.sent,
        sent_recipients=s.recipients, refused=s.refused, failed=s.failed, send_errors=dict(s.errors),
        memory={n: m.to_json() for n, m in memory.nodes.items()}, faults=faults.log.counts(),
        faults_skipped=dict(faults.log.skipped), fault_errors=list(faults.log.errors),
        defer_windows=hop.toggles, drain_seconds=waited, drained=drained,
    )
    summarise(sent, ev, index, report, mailbox_times(ev))
    if drained and not report.in_flight:
        hop.restore()
    else:
        say(f"soak: mail is still in flight: the overlay stays on {hop_name} (the next soak removes it)")
    path = lab.dir / f"{run}.json"
    report.report_path = str(path)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", "utf-8")
    return report


# -- command line ------------------------------------------------------------


def soak_command(args: argparse.Namespace) -> int:
    """C{relaynet lab soak} (its arguments: L{relaynet.lab.soakcli.add_soak_parser})."""
    import inspect

    from relaynet.lab.cli import _ranges, _say
    from relaynet.lab.topology import load_topology

    _ranges(args)
    topology = load_topology(args.topology)
    where = Lab(args.dir if args.dir is not None else Path("var") / "lab" / topology.name)
    earlier: dict[str, Any] = {}
    if where.exists():
        earlier = where.load().data
    use_netns = bool(args.netns or earlier.get("netns"))
    kw: dict[str, Any] = {}
    if "power_fs" in inspect.signature(control.up).parameters:
        kw["power_fs"] = bool(args.power_fs or earlier.get("power_fs"))
    elif args.power_fs:
        raise LabError("--power-fs is not available in this relaynet yet ('lab up --power-fs' has not landed)")
    lab, what = control.up(args.topology, where.dir, use_netns=use_netns, say=_say, **kw)
    _say(f"lab {lab.name}: {what} (dir {lab.dir})")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    plan = SoakPlan(
        minutes=args.minutes, rate=args.rate, concurrency=args.concurrency, seed=seed,
        faults=args.faults, targets=tuple(args.target or ()),
        interval=tuple(args.interval) if args.interval else (20.0, 40.0),
        down=tuple(args.down) if args.down else (1.0, 5.0),
        drain=args.drain, defer_window=args.defer_window,
    )
    report = run_soak(lab, plan, say=_say)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.format())
    sys.stdout.flush()
    return 0 if report.ok else 1
