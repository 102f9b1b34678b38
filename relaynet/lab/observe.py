# -*- test-case-name: tests.test_lab -*-
"""
What a lab's nodes did, read from their files: every node's
C{<spool>/events.jsonl} (trace, link statistics), its queue directories and
C{/proc} (status).

Hops are linked through the C{sent} event: its C{diagnostic} is the next
hop's reply to the final dot, C{250 2.0.0 Ok: queued as NEXTID}, and
C{NEXTID} is the queue id of the next hop's C{received} event. A C{dsn}
event links a bounce to the notification it caused (C{original_queue_id}).

The functions that build results from events (L{EventIndex}, L{trace},
L{link_stats}) are pure; the readers around them only read files.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping

from attrs import define, field, frozen

from relaynet.config import shard_queue_dirs

QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
OUTCOMES = ("sent", "delivered", "deferred", "bounced", "expired")
NAMED_RELAY = re.compile(r"^[^\[\]]+\[([^\]]+)\]:(\d+)$")
"""C{mx1.dest.test[127.0.0.4]:2525}: an exchanger, its address and port (an MX route's relay)."""


def read_events(path: str | Path, node: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """
    The records of one C{events.jsonl}: complete lines only, lines that are
    not JSON skipped (a crash may cut the last line). C{node} fills a
    missing C{node} field. C{offset}: read from that byte on (a line start).
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n")[:-1]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            if node and "node" not in rec:
                rec["node"] = node
            out.append(rec)
    return out


def lab_events(nodes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every event of every node, in time order."""
    events: list[dict[str, Any]] = []
    for name, rec in nodes.items():
        for e in read_events(rec["events"], name):
            e["_node"] = name
            events.append(e)
    events.sort(key=lambda e: e.get("time", 0.0))
    return events


def normalise_message_id(mid: str) -> str:
    """C{<id>} with the brackets, whatever was given."""
    mid = mid.strip()
    if not mid.startswith("<"):
        mid = "<" + mid
    if not mid.endswith(">"):
        mid = mid + ">"
    return mid


def next_queue_id(event: Mapping[str, Any]) -> str | None:
    """The next hop's queue id named in a C{sent} event's reply, if any."""
    m = QUEUED_AS.search(str(event.get("diagnostic", "")))
    return m.group(1) if m else None


@define
class EventIndex:
    """
    Events of a whole lab, indexed for tracing.

    @ivar endpoints: C{host:port} -> node name, to name next hops.
    """

    events: list[dict[str, Any]]
    endpoints: Mapping[str, str] = field(factory=dict)
    received: dict[str, dict[str, Any]] = field(factory=dict)
    outcomes: dict[str, list[dict[str, Any]]] = field(factory=dict)
    dsns: dict[str, list[dict[str, Any]]] = field(factory=dict)
    by_message_id: dict[str, list[dict[str, Any]]] = field(factory=dict)
    parent: dict[str, str] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for e in self.events:
            kind = e.get("event")
            qid = e.get("queue_id")
            if not qid:
                continue
            if kind == "received":
                self.received[qid] = e
                if e.get("message_id"):
                    self.by_message_id.setdefault(e["message_id"], []).append(e)
            elif kind in OUTCOMES:
                self.outcomes.setdefault(qid, []).append(e)
                nxt = next_queue_id(e) if kind == "sent" else None
                if nxt:
                    self.parent[nxt] = qid
            elif kind == "dsn":
                orig = e.get("original_queue_id")
                if orig:
                    self.dsns.setdefault(orig, []).append(e)
                    self.parent[qid] = orig

    def node_of(self, relay: str | None) -> str | None:
        """
        The lab node listening at C{relay} (C{host:port}, or as an MX route
        names it, C{exchanger[address]:port}), if any.
        """
        if not relay:
            return None
        m = NAMED_RELAY.match(relay)
        if m:
            return self.endpoints.get(f"{m.group(1)}:{m.group(2)}")
        return self.endpoints.get(relay)

    def roots(self, message_id: str) -> list[dict[str, Any]]:
        """The C{received} events of a message that no other lab hop relayed (its entry points)."""
        return [e for e in self.by_message_id.get(message_id, []) if e["queue_id"] not in self.parent]


@frozen
class TraceRow:
    """
    One line of a trace: what one node did with its copy of the message.

    @ivar depth: 0 for the entry hop, +1 per hop; DSNs continue the count.
    @ivar next_hop: a node name, C{"mailbox <address>"}, or the raw relay.
    @ivar delay: seconds from arrival at this node to this outcome.
    """

    depth: int
    node: str
    arrival: float | None
    queue_id: str
    next_hop: str
    next_queue_id: str | None
    delay: float | None
    status: str
    detail: str
    time: float | None
    dsn: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "hop": self.depth + 1, "node": self.node, "arrival": self.arrival,
            "queue_id": self.queue_id, "next_hop": self.next_hop,
            "next_queue_id": self.next_queue_id, "delay": self.delay, "status": self.status,
            "detail": self.detail, "time": self.time, "dsn": self.dsn,
        }


def trace(index: EventIndex, message_id: str, limit: int = 1000) -> list[TraceRow]:
    """
    The path of a message through the lab, hop by hop (depth first, each
    hop's attempts in time order), followed through DSNs.

    @param limit: at most this many rows (guards against cycles).
    """
    rows: list[TraceRow] = []
    seen: set[str] = set()

    def walk(qid: str, depth: int, dsn: bool, created: float | None = None) -> None:
        if qid in seen or len(rows) >= limit:
            return
        seen.add(qid)
        rec = index.received.get(qid)
        outs = index.outcomes.get(qid, [])
        node = rec["_node"] if rec else (outs[0]["_node"] if outs else "?")
        # A DSN is made on the node, not received: it "arrives" when queued.
        arrival = rec.get("time") if rec else created
        if not outs:
            rows.append(TraceRow(depth, node, arrival, qid, "-", None, None, "queued",
                                 "no outcome recorded yet", None, dsn))
        for e in outs:
            kind = e["event"]
            nxt = next_queue_id(e) if kind == "sent" else None
            if kind == "delivered":
                hop = f"mailbox {e.get('recipient', '?')}"
            else:
                relay = e.get("relay")
                name = index.node_of(relay)
                hop = name or relay or "-"
                if name and relay and NAMED_RELAY.match(relay):
                    # An MX route: say which exchanger the node was.
                    hop = f"{name} = MX {relay.split('[', 1)[0]}"
            detail = str(e.get("diagnostic", ""))
            status = kind
            if kind in ("sent", "delivered", "bounced", "deferred") and e.get("dsn"):
                status = f"{kind} {e['dsn']}"
            rows.append(TraceRow(depth, node, arrival, qid, hop, nxt, e.get("delay"), status, detail,
                                 e.get("time"), dsn))
            if nxt and nxt not in index.received:
                rows.append(TraceRow(depth + 1, index.node_of(e.get("relay")) or "?", None, nxt, "-",
                                     None, None, "unrecorded",
                                     "the next hop acknowledged it but logged no received event", None, dsn))
                seen.add(nxt)
            elif nxt:
                walk(nxt, depth + 1, dsn)
        for d in index.dsns.get(qid, []):
            rows.append(TraceRow(depth, node, arrival, qid, f"DSN to {d.get('recipient', '?')}",
                                 d["queue_id"], None, f"dsn {d.get('action', '')}".strip(),
                                 "a delivery status notification was queued", d.get("time"), dsn))
            walk(d["queue_id"], depth + 1, True, d.get("time"))

    hosts = {ep.rpartition(":")[0]: node for ep, node in index.endpoints.items()}
    for root in sorted(index.roots(message_id), key=lambda e: e.get("time", 0.0)):
        depth = max(0, int(root.get("hops", 1)) - 1)
        sender = hosts.get(str(root.get("client", "")))
        if sender is not None:
            # Relayed by a lab node that logged no outcome for it: it was
            # killed between the next hop's 250 and recording it, and will
            # (or did) send the message again. The next hop recognises the
            # transfer by its XTXN name (a duplicate event) unless its
            # transfer window is off: then it is a second copy.
            rows.append(TraceRow(max(0, depth - 1), sender, None, "?", root["_node"], root["queue_id"], None,
                                 "unrecorded", f"relayed to {root['_node']} but no outcome logged "
                                 "(crashed before recording it: it sends it again)", None, False))
        walk(root["queue_id"], depth, False)
    return rows


def format_trace(message_id: str, rows: list[TraceRow]) -> str:
    """The trace as a table, times relative to the first arrival."""
    import datetime

    if not rows:
        return f"{message_id}: no node has a received event for this Message-ID"
    t0 = min((r.arrival for r in rows if r.arrival is not None), default=0.0)
    table = [("hop", "node", "arrived", "queue id", "next hop", "delay", "status")]
    for r in rows:
        arrived = "-"
        if r.arrival is not None:
            clock = datetime.datetime.fromtimestamp(r.arrival).strftime("%H:%M:%S.%f")[:-3]
            arrived = f"{clock} +{r.arrival - t0:.3f}s"
        nxt = r.next_hop + (f" ({r.next_queue_id})" if r.next_queue_id else "")
        delay = f"{r.delay:.3f}s" if r.delay is not None else "-"
        status = r.status + (f": {r.detail}" if r.status.startswith(("deferred", "bounced", "unrecorded", "queued")) and r.detail else "")
        hop = ("  " * r.depth) + str(r.depth + 1) + (" dsn" if r.dsn else "")
        table.append((hop, r.node, arrived, r.queue_id, nxt, delay, status))
    widths = [max(len(t[i]) for t in table) for i in range(6)]
    lines = [
        f"trace of {message_id}",
        "arrived: when the node acknowledged its copy (its 250), from the first node's 250;",
        "delay: from the start of the node's DATA (before its own 250) to the outcome, which for",
        "'sent' is the next hop's 250: so a hop's delay is the next hop's arrived minus its own,",
        "plus its own DATA-to-250 time (receiving the body, fsync).",
    ]
    for t in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(t[:6], widths)) + "  " + t[6])
    final = [r for r in rows if r.status.startswith("delivered")]
    if final:
        end = max(r.time or 0.0 for r in final)
        lines.append(f"delivered {len(final)} time(s); last delivery {end - t0:.3f}s after the first arrival,"
                     f" {max(r.depth for r in final) + 1} hop(s)")
    return "\n".join(lines)


@frozen
class LinkStat:
    """Messages relayed from one node to another, and how long they waited."""

    src: str
    dst: str
    count: int
    median_delay: float | None
    deferred: int = 0


def link_stats(index: EventIndex) -> list[LinkStat]:
    """
    Per (node, next hop): messages relayed (C{sent}), the median C{delay} of
    those (arrival at the node to acceptance by the next hop), and the
    failed attempts (C{deferred}) towards it.
    """
    delays: dict[tuple[str, str], list[float]] = {}
    deferred: dict[tuple[str, str], int] = {}
    for qid, outs in index.outcomes.items():
        for e in outs:
            dst = index.node_of(e.get("relay"))
            if dst is None:
                continue
            key = (e["_node"], dst)
            if e["event"] == "sent":
                delays.setdefault(key, []).append(float(e.get("delay", 0.0)))
            elif e["event"] == "deferred":
                deferred[key] = deferred.get(key, 0) + 1
    out = []
    for key in sorted(set(delays) | set(deferred)):
        d = delays.get(key, [])
        out.append(LinkStat(key[0], key[1], len(d), statistics.median(d) if d else None,
                            deferred.get(key, 0)))
    return out


# -- status ------------------------------------------------------------------


def queue_counts(spool: str | Path) -> dict[str, int]:
    """
    Messages in a node's queues (every shard's) by state: C{active} (no
    attempt recorded, or every recorded recipient pending), C{deferred},
    C{held}, plus C{receiving} (C{tmp/}) and C{corrupt}.
    """
    counts = {"active": 0, "deferred": 0, "held": 0, "receiving": 0, "corrupt": 0}
    for q in shard_queue_dirs(Path(spool)).values():
        try:
            names = os.listdir(q / "new")
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                state = json.loads((q / "state" / name).read_text("utf-8"))
            except (OSError, ValueError):
                counts["active"] += 1
                continue
            if state.get("held"):
                counts["held"] += 1
            elif any(r.get("status") == "deferred" for r in state.get("recipients", {}).values()):
                counts["deferred"] += 1
            else:
                counts["active"] += 1
        for sub, key in (("tmp", "receiving"), ("corrupt", "corrupt")):
            try:
                counts[key] += len([n for n in os.listdir(q / sub) if not n.endswith(".state")])
            except FileNotFoundError:
                pass
    return counts


def event_counts(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many events of each kind (received, sent, delivered, deferred, bounced, dsn, expired)."""
    counts = {k: 0 for k in ("received", "sent", "delivered", "deferred", "bounced", "dsn", "expired")}
    for e in events:
        kind = e.get("event")
        if kind in counts:
            counts[kind] += 1
    return counts


def _hex_addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw)), int(port, 16)
    return host, int(port, 16)


def sessions(pid: int | None, ports: Iterable[int]) -> dict[str, int] | None:
    """
    Live SMTP sessions of a node process, from C{/proc/PID/net/tcp} and its
    file descriptors: C{inbound} (established connections to one of its
    ports) and C{outbound} (its other established connections). L{None}
    when the process cannot be inspected.
    """
    if not pid:
        return None
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    ports = set(ports)
    inbound = outbound = 0
    for line in lines:
        f = line.split()
        if len(f) < 10 or f[3] != "01" or f[9] not in inodes:
            continue
        _, lport = _hex_addr(f[1])
        if lport in ports:
            inbound += 1
        else:
            outbound += 1
    return {"inbound": inbound, "outbound": outbound}
