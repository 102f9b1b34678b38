# -*- test-case-name: tests.test_lab -*-
"""
C{lab check}: was every message a client saw acknowledged delivered exactly
once, or bounced with a DSN to its sender?

The promises are C{<labdir>/sent.jsonl} (written by C{lab send}). The
evidence is every node's Maildirs (C{<mailroot>/<domain>/<user>/Maildir/
{new,cur}}): a delivered copy is matched by its C{Message-ID} and its
C{Delivered-To}; a DSN (C{multipart/report; report-type=delivery-status})
counts for the recipients it reports C{Action: failed} for, and for the
original C{Message-ID} it returns. A recipient still pending in some node's
queue is "in flight", whether or not a copy was already delivered (a node that
relayed it but died before recording that sends it again): not lost, not done
either. Queues are read from disk (C{new/} and C{state/} of each spool's
C{queue/}, and of C{queue.1/}, ... of a node with workers), so the mail a
stopped node holds counts too. The events give
end-to-end latencies.

The verdict's last line and C{lab check}'s exit status come from the same
L{CheckReport.ok}: it holds only when nothing is lost, duplicated or in flight.

L{verify} is pure: it takes the promises and the scanned evidence.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

from attrs import define, field, frozen

from relaynet.config import shard_queue_dirs
from relaynet.lab.observe import EventIndex
from relaynet.lab.state import spool_on_disk
from relaynet.lab.traffic import percentile

HEADER_LIMIT = 65536
_MID = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_DELIVERED_TO = re.compile(rb"^delivered-to[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_REPORT = re.compile(rb"^content-type[ \t]*:[ \t]*multipart/report", re.IGNORECASE | re.MULTILINE)
_FINAL = re.compile(rb"^final-recipient[ \t]*:[ \t]*[^;\r\n]*;[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_ACTION = re.compile(rb"^action[ \t]*:[ \t]*([a-z]+)", re.IGNORECASE | re.MULTILINE)
_FINAL_STATUSES = frozenset({"delivered", "relayed", "bounced"})


@frozen
class Holder:
    """
    A node's queue holding a message.

    @ivar node: the node's name.
    @ivar stopped: whether the node is not running (its mail cannot move
        until it is started).
    @ivar pending: the (lower-cased) recipients not final in its queue
        state, or L{None} when it has no readable state (every recipient).
    """

    node: str
    stopped: bool = False
    pending: frozenset[str] | None = None

    def holds(self, recipient: str) -> bool:
        """Whether this queue still has C{recipient} (lower-cased) to do."""
        return self.pending is None or recipient in self.pending


@define
class Evidence:
    """
    What the lab's nodes hold.

    @ivar copies: (Message-ID, delivered-to address) -> number of Maildir files.
    @ivar failed: (original Message-ID, recipient) -> number of DSNs reporting failure.
    @ivar queued: Message-ID -> the queues holding it with some recipient
        not final (in flight).
    @ivar where: (Message-ID, address) -> the mailbox files holding copies.
    """

    copies: dict[tuple[str, str], int] = field(factory=dict)
    failed: dict[tuple[str, str], int] = field(factory=dict)
    queued: dict[str, list[Holder]] = field(factory=dict)
    where: dict[tuple[str, str], list[str]] = field(factory=dict)
    message_ids: set[str] = field(factory=set)

    def queued_per_node(self) -> dict[str, int]:
        """Node name -> how many messages its queue holds unfinished."""
        counts: dict[str, int] = {}
        for holders in self.queued.values():
            for node in {h.node for h in holders}:
                counts[node] = counts.get(node, 0) + 1
        return counts


def _header_section(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[: i + len(sep)]
    return data


def scan_mailbox_file(path: Path, ev: Evidence) -> None:
    """Add one Maildir file to the evidence (a copy, or a DSN)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_LIMIT)
    except OSError:
        return
    section = _header_section(head)
    if _REPORT.search(section):
        try:
            data = path.read_bytes()
        except OSError:
            return
        _scan_dsn(data, section, ev)
        return
    m = _MID.search(section)
    d = _DELIVERED_TO.search(section)
    if not m:
        return
    mid = m.group(1).decode("utf-8", "replace")
    to = d.group(1).decode("utf-8", "replace").strip().strip("<>").lower() if d else ""
    ev.copies[(mid, to)] = ev.copies.get((mid, to), 0) + 1
    ev.where.setdefault((mid, to), []).append(str(path))
    ev.message_ids.add(mid)


def _scan_dsn(data: bytes, section: bytes, ev: Evidence) -> None:
    own = _MID.search(section)
    rest = data[len(section):]
    originals = [m.group(1).decode("utf-8", "replace") for m in _MID.finditer(rest)]
    if own:
        originals = [o for o in originals if o != own.group(1).decode("utf-8", "replace")]
    if not originals:
        return
    original = originals[0]
    for block in re.split(rb"\r?\n\r?\n", rest):
        f = _FINAL.search(block)
        a = _ACTION.search(block)
        if f and a and a.group(1).lower() == b"failed":
            rcpt = f.group(1).decode("utf-8", "replace").strip().strip("<>").lower()
            ev.failed[(original, rcpt)] = ev.failed.get((original, rcpt), 0) + 1


def _pending(state_path: Path) -> frozenset[str] | None:
    """The recipients a queue state file has not finished (L{None}: no usable state)."""
    try:
        state = json.loads(state_path.read_text("utf-8"))
        rcpts = state["recipients"]
        return frozenset(a.lower() for a, r in rcpts.items() if r.get("status") not in _FINAL_STATUSES)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def scan_queue(spool: str | Path, ev: Evidence, node: str = "", stopped: bool = False) -> None:
    """
    Add the messages queued in a node's spool (read from disk, so that a
    stopped node's count too) with their unfinished recipients.

    @param node: the node's name, recorded in each L{Holder}.
    @param stopped: whether that node is not running.
    """
    # A node with workers keeps a queue per shard: the soak's drain read
    # queue/ alone, and took a message deferred in queue.1/ for lost.
    for queue in shard_queue_dirs(Path(spool)).values():
        _scan_one_queue(queue, ev, node, stopped)


def _scan_one_queue(queue: Path, ev: Evidence, node: str, stopped: bool) -> None:
    new = queue / "new"
    try:
        names = os.listdir(new)
    except FileNotFoundError:
        return
    for name in names:
        try:
            with open(new / name, "rb") as f:
                head = f.read(HEADER_LIMIT)
        except OSError:
            continue
        # Envelope first (one JSON line after the 48-octet header record), then the message.
        nl = head.find(b"\n", 48)
        m = _MID.search(_header_section(head[nl + 1:])) if nl >= 0 else None
        if not m:
            continue
        pending = _pending(queue / "state" / name)
        if pending is not None and not pending:
            continue  # every recipient final: the file is about to go
        ev.queued.setdefault(m.group(1).decode("utf-8", "replace"), []).append(
            Holder(node, stopped, pending))


def collect(nodes: Mapping[str, Mapping[str, Any]], stopped: Collection[str] = ()) -> Evidence:
    """
    Scan every node's mailboxes and queue.

    @param nodes: node name -> its lab record (C{mailroot}, C{spool}).
    @param stopped: the names of the nodes that are not running.
    """
    ev = Evidence()
    for name, rec in nodes.items():
        for path in mailbox_files(rec):
            scan_mailbox_file(path, ev)
        scan_queue(spool_on_disk(rec), ev, name, name in stopped)
    return ev


_POLICY = re.compile(r"\(([^()]+)\)$")


def tls_used(nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """
    Per node, the TLS each delivery it relayed (its C{sent} events) used:
    the policy that decided it (C{DANE}, C{MTA-STS}: the C{(...)} at the end
    of the event's C{tls}), C{TLS} (the route's own policy) or C{no TLS}.
    """
    out: dict[str, dict[str, int]] = {}
    for name, rec in nodes.items():
        try:
            f = open(rec["events"], "rb")
        except (OSError, KeyError):
            continue
        with f:
            for line in f:
                if b'"event":"sent"' not in line and b'"event": "sent"' not in line:
                    continue
                try:
                    tls = json.loads(line).get("tls")
                except ValueError:
                    continue
                m = _POLICY.search(tls) if tls else None
                label = m.group(1) if m else ("TLS" if tls else "no TLS")
                counts = out.setdefault(name, {})
                counts[label] = counts.get(label, 0) + 1
    return out


def mailbox_files(rec: Mapping[str, Any]) -> Iterator[Path]:
    """Every message file in the Maildirs (C{new} and C{cur}) of a node's lab record C{rec}."""
    for box in Path(rec["mailroot"]).glob("*/*/Maildir"):
        for sub in ("new", "cur"):
            try:
                names = os.listdir(box / sub)
            except FileNotFoundError:
                continue
            for fname in names:
                yield box / sub / fname


@define
class CheckReport:
    """
    The verdict of C{lab check}.

    Counts are per (message, recipient) pair, except C{messages}. Each pair
    is in exactly one of: delivered once, bounced, duplicated, in flight,
    lost.

    @ivar in_flight_where: (Message-ID, recipient) -> the nodes whose queue
        still holds it, and how many copies were already delivered.
    @ivar stopped: stopped node -> messages in flight that it holds.
    @ivar start_command: the command that starts the stopped nodes (shown
        with them), or L{None}.
    @ivar allow_duplicates: duplicates do not make the verdict fail
        (C{--allow-duplicates}).
    """

    messages: int = 0
    recipients: int = 0
    delivered_once: int = 0
    bounced: int = 0
    duplicated: list[tuple[str, str, int]] = field(factory=list)
    lost: list[tuple[str, str]] = field(factory=list)
    in_flight: list[tuple[str, str]] = field(factory=list)
    in_flight_where: dict[tuple[str, str], tuple[list[str], int]] = field(factory=dict)
    stopped: dict[str, int] = field(factory=dict)
    start_command: str | None = None
    allow_duplicates: bool = False
    unexpected: list[str] = field(factory=list)
    latencies: list[float] = field(factory=list)
    waited: float = 0.0
    dkim: Any = None
    """A L{relaynet.lab.dkimcheck.DKIMReport} when some node signs, else None."""
    tls_used: dict[str, dict[str, int]] = field(factory=dict)
    """Per node, the TLS its relayed deliveries used (L{tls_used}): label -> count."""

    @property
    def ok(self) -> bool:
        """
        Whether nothing is lost, in flight, or duplicated (unless
        C{allow_duplicates}): the exit status and the last line follow it.
        """
        return (
            not self.lost and not self.in_flight and (self.allow_duplicates or not self.duplicated)
            and (self.dkim is None or self.dkim.ok)
        )

    def verdict(self) -> str:
        """
        The last line: C{OK: ...} exactly when L{ok}, else C{FAIL: ...}
        naming every count that fails.
        """
        if self.ok:
            parts = [f"{self.delivered_once} delivered exactly once"]
            if self.bounced:
                parts.append(f"{self.bounced} bounced with a DSN to the sender")
            if self.duplicated:
                parts.append(f"{len(self.duplicated)} duplicated (allowed)")
            if self.dkim is not None:
                parts.append(f"{self.dkim.verified} DKIM-verified")
            return "OK: " + ", ".join(parts + ["nothing lost", "nothing in flight"])
        bad = []
        if self.lost:
            bad.append(f"{len(self.lost)} lost")
        if self.duplicated:
            bad.append(f"{len(self.duplicated)} duplicated" + (" (allowed)" if self.allow_duplicates else ""))
        if self.in_flight:
            flight = f"{len(self.in_flight)} in flight"
            if self.stopped:
                flight += " (held by stopped " + ", ".join(sorted(self.stopped)) + ")"
            bad.append(flight)
        if self.dkim is not None and self.dkim.failed:
            bad.append(f"{len(self.dkim.failed)} failed DKIM verification")
        if self.dkim is not None and self.dkim.unsigned:
            bad.append(f"{len(self.dkim.unsigned)} left a signing node unsigned")
        return "FAIL: " + ", ".join(bad)

    def stopped_note(self) -> str | None:
        """
        What the stopped nodes hold and how to start them (their mail moves
        only then), or L{None} when no stopped node holds any.
        """
        if not self.stopped:
            return None
        held = ", ".join(f"{n} holds {k} message(s)" for n, k in sorted(self.stopped.items()))
        note = f"stopped: {held}; they move only once started"
        return note + (f": {self.start_command}" if self.start_command else "")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-able values (C{lab check --json})."""
        lat = sorted(self.latencies)
        return {
            "ok": self.ok, "messages": self.messages, "recipients": self.recipients,
            "delivered_once": self.delivered_once, "bounced": self.bounced,
            "duplicated": len(self.duplicated), "lost": len(self.lost),
            "in_flight": len(self.in_flight), "unexpected": len(self.unexpected),
            "duplicated_ids": [{"message_id": m, "recipient": r, "copies": n} for m, r, n in self.duplicated],
            "lost_ids": [{"message_id": m, "recipient": r} for m, r in self.lost],
            "in_flight_ids": [
                {"message_id": m, "recipient": r, "nodes": self.in_flight_where.get((m, r), ([], 0))[0],
                 "copies": self.in_flight_where.get((m, r), ([], 0))[1]}
                for m, r in self.in_flight
            ],
            "stopped_nodes": dict(sorted(self.stopped.items())), "start_command": self.start_command,
            "unexpected_ids": self.unexpected,
            "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
            "latency_max": lat[-1] if lat else None, "waited": round(self.waited, 3),
            "dkim": None if self.dkim is None else self.dkim.to_json(),
            "tls_used": self.tls_used,
            "verdict": self.verdict(),
        }

    def format(self, show: int = 20) -> str:
        """The report as text; its last line is L{verdict}."""
        lat = sorted(self.latencies)
        lines = [
            f"acknowledged:            {self.messages} messages, {self.recipients} recipient deliveries",
            f"delivered exactly once:  {self.delivered_once}",
            f"bounced, DSN to sender:  {self.bounced}",
            f"duplicated:              {len(self.duplicated)}",
            f"in flight (queued):      {len(self.in_flight)}",
            f"lost:                    {len(self.lost)}",
        ]
        if self.unexpected:
            lines.append(f"delivered but never acknowledged to the client: {len(self.unexpected)}"
                         " (the client lost the reply; not a loss)")
        if lat:
            lines.append(f"end-to-end latency:      p50 {percentile(lat, 50):.3f}s  p99 {percentile(lat, 99):.3f}s"
                         f"  max {lat[-1]:.3f}s ({len(lat)} deliveries)")

        def flight(m: str, r: str) -> str:
            nodes, copies = self.in_flight_where.get((m, r), ([], 0))
            where = ", ".join(f"{n} (stopped)" if n in self.stopped else n for n in nodes)
            return f"{m} to {r}: queued at {where}" + (f"; {copies} copy already delivered" if copies == 1 else
                                                        f"; {copies} copies already delivered" if copies else "")

        for title, items in (("lost", [f"{m} to {r}" for m, r in self.lost]),
                             ("duplicated", [f"{m} to {r}: {n} copies" for m, r, n in self.duplicated]),
                             ("in flight", [flight(m, r) for m, r in self.in_flight])):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {i}" for i in items[:show]]
                if len(items) > show:
                    lines.append(f"  ... and {len(items) - show} more")
        if self.dkim is not None:
            lines += self.dkim.lines(show)
        for node, used in sorted(self.tls_used.items()):
            lines.append(f"TLS used by {node}:" + " " * max(1, 16 - len(node)) + ", ".join(
                f"{label} {n}" for label, n in sorted(used.items(), key=lambda kv: (-kv[1], kv[0]))))
        note = self.stopped_note()
        if note:
            lines.append(note)
        lines.append(self.verdict())
        return "\n".join(lines)


def verify(sent: Iterable[Mapping[str, Any]], ev: Evidence,
           index: EventIndex | None = None) -> CheckReport:
    """
    Match every acknowledged (message, recipient) against the evidence.

    A recipient counts as delivered when a copy carries its address in
    C{Delivered-To}; copies of the message under other addresses (aliases)
    make up for recipients not matched that way. A recipient some queue
    still holds unfinished is in flight, even with a copy delivered: that
    queue will send it again.
    """
    report = CheckReport()
    acked: set[str] = set()
    starts: dict[str, float] = {}
    stopped: dict[str, set[str]] = {}
    for s in sent:
        mid = s["message_id"]
        if mid in acked:
            continue
        acked.add(mid)
        starts[mid] = float(s.get("start", s.get("time", 0.0)))
        report.messages += 1
        rcpts = [r.lower() for r in s.get("recipients", [])]
        spare = sum(n for (m, to), n in ev.copies.items() if m == mid and to not in rcpts) \
            if any((mid, r) not in ev.copies for r in rcpts) else 0
        holders = ev.queued.get(mid, [])
        for r in rcpts:
            report.recipients += 1
            n = ev.copies.get((mid, r), 0)
            if n == 0 and spare > 0:
                n, spare = 1, spare - 1
            holding = [h for h in holders if h.holds(r)
                       or (h.pending is not None and not h.pending & set(rcpts))]
            if holding:
                report.in_flight.append((mid, r))
                report.in_flight_where[(mid, r)] = (sorted({h.node for h in holding}), n)
                for h in holding:
                    if h.stopped:
                        stopped.setdefault(h.node, set()).add(mid)
            elif n == 1:
                report.delivered_once += 1
            elif n > 1:
                report.duplicated.append((mid, r, n))
            elif ev.failed.get((mid, r)):
                report.bounced += 1
            else:
                report.lost.append((mid, r))
    report.stopped = {node: len(mids) for node, mids in stopped.items()}
    report.unexpected = sorted(
        m for m in ev.message_ids - acked if m.startswith("<lab-")
    )
    if index is not None:
        report.latencies = delivery_latencies(index, starts)
    return report


def delivery_latencies(index: EventIndex, starts: Mapping[str, float]) -> list[float]:
    """
    Seconds from the start of each acknowledged message's SMTP transaction
    to its first local delivery (per message and recipient).
    """
    first: dict[tuple[str, str], float] = {}
    for qid, outs in index.outcomes.items():
        rec = index.received.get(qid)
        if rec is None:
            continue
        mid: str | None = rec.get("message_id")
        if mid is None or mid not in starts:
            continue
        for e in outs:
            if e["event"] == "delivered":
                key = (mid, str(e.get("recipient", "")))
                t = float(e["time"])
                if key not in first or t < first[key]:
                    first[key] = t
    return sorted(t - starts[mid] for (mid, _), t in first.items())


def busy_count(nodes: Mapping[str, Mapping[str, Any]]) -> int:
    """
    Messages that can still move: active or deferred in any node's queue,
    stopped nodes' included (read from disk); held ones wait for an
    administrator and are not counted.
    """
    from relaynet.lab.observe import queue_counts

    busy = 0
    for rec in nodes.values():
        c = queue_counts(spool_on_disk(rec))
        busy += c["active"] + c["deferred"]
    return busy


def wait_settled(nodes: Mapping[str, Mapping[str, Any]], timeout: float, poll: float = 0.1) -> float:
    """
    Poll (bounded) until no node has a message queued (what is still being
    received is not acknowledged yet: its sender holds it). The queues of
    stopped nodes count too: their mail moves only once they are started
    (by someone else meanwhile, e.g. C{lab up} or C{lab chaos}).

    @return: seconds waited (C{timeout} when it did not settle).
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if busy_count(nodes) == 0 or time.monotonic() >= deadline:
            return time.monotonic() - start
        time.sleep(poll)
