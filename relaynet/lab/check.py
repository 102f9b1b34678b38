# -*- test-case-name: tests.test_lab -*-
"""
C{lab check}: was every message a client saw acknowledged delivered exactly
once, or bounced with a DSN to its sender?

The promises are C{<labdir>/sent.jsonl} (written by C{lab send}). The
evidence is every node's Maildirs (C{<mailroot>/<domain>/<user>/Maildir/
{new,cur}}): a delivered copy is matched by its C{Message-ID} and its
C{Delivered-To}; a DSN (C{multipart/report; report-type=delivery-status})
counts for the recipients it reports C{Action: failed} for, and for the
original C{Message-ID} it returns. Messages still in some node's queue are
"in flight", not lost. The events give end-to-end latencies.

L{verify} is pure: it takes the promises and the scanned evidence.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from attrs import define, field

from relaynet.lab.observe import EventIndex
from relaynet.lab.traffic import percentile

HEADER_LIMIT = 65536
_MID = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_DELIVERED_TO = re.compile(rb"^delivered-to[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_REPORT = re.compile(rb"^content-type[ \t]*:[ \t]*multipart/report", re.IGNORECASE | re.MULTILINE)
_FINAL = re.compile(rb"^final-recipient[ \t]*:[ \t]*[^;\r\n]*;[ \t]*([^\r\n]+)", re.IGNORECASE | re.MULTILINE)
_ACTION = re.compile(rb"^action[ \t]*:[ \t]*([a-z]+)", re.IGNORECASE | re.MULTILINE)


@define
class Evidence:
    """
    What the lab's nodes hold.

    @ivar copies: (Message-ID, delivered-to address) -> number of Maildir files.
    @ivar failed: (original Message-ID, recipient) -> number of DSNs reporting failure.
    @ivar queued: Message-IDs in some node's queue (in flight).
    @ivar where: (Message-ID, address) -> the mailbox files holding copies.
    """

    copies: dict[tuple[str, str], int] = field(factory=dict)
    failed: dict[tuple[str, str], int] = field(factory=dict)
    queued: set[str] = field(factory=set)
    where: dict[tuple[str, str], list[str]] = field(factory=dict)
    message_ids: set[str] = field(factory=set)


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


def scan_queue(spool: str | Path, ev: Evidence) -> None:
    """Add the Message-IDs of the messages queued in a node's spool."""
    new = Path(spool) / "queue" / "new"
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
        if m:
            ev.queued.add(m.group(1).decode("utf-8", "replace"))


def collect(nodes: Mapping[str, Mapping[str, Any]]) -> Evidence:
    """Scan every node's mailboxes and queue."""
    ev = Evidence()
    for rec in nodes.values():
        root = Path(rec["mailroot"])
        for box in root.glob("*/*/Maildir"):
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(box / sub)
                except FileNotFoundError:
                    continue
                for name in names:
                    scan_mailbox_file(box / sub / name, ev)
        scan_queue(rec["spool"], ev)
    return ev


@define
class CheckReport:
    """
    The verdict of C{lab check}.

    Counts are per (message, recipient) pair, except C{messages}.
    """

    messages: int = 0
    recipients: int = 0
    delivered_once: int = 0
    bounced: int = 0
    duplicated: list[tuple[str, str, int]] = field(factory=list)
    lost: list[tuple[str, str]] = field(factory=list)
    in_flight: list[tuple[str, str]] = field(factory=list)
    unexpected: list[str] = field(factory=list)
    latencies: list[float] = field(factory=list)
    waited: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.in_flight

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "ok": self.ok, "messages": self.messages, "recipients": self.recipients,
            "delivered_once": self.delivered_once, "bounced": self.bounced,
            "duplicated": len(self.duplicated), "lost": len(self.lost),
            "in_flight": len(self.in_flight), "unexpected": len(self.unexpected),
            "duplicated_ids": [{"message_id": m, "recipient": r, "copies": n} for m, r, n in self.duplicated],
            "lost_ids": [{"message_id": m, "recipient": r} for m, r in self.lost],
            "in_flight_ids": [{"message_id": m, "recipient": r} for m, r in self.in_flight],
            "unexpected_ids": self.unexpected,
            "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
            "latency_max": lat[-1] if lat else None, "waited": round(self.waited, 3),
        }

    def format(self, show: int = 20) -> str:
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
        for title, items in (("lost", [f"{m} to {r}" for m, r in self.lost]),
                             ("duplicated", [f"{m} to {r}: {n} copies" for m, r, n in self.duplicated]),
                             ("in flight", [f"{m} to {r}" for m, r in self.in_flight])):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {i}" for i in items[:show]]
                if len(items) > show:
                    lines.append(f"  ... and {len(items) - show} more")
        lines.append("OK: nothing lost" if self.ok else "FAILED: " + (
            f"{len(self.lost)} lost" if self.lost else f"{len(self.in_flight)} still in flight"))
        return "\n".join(lines)


def verify(sent: Iterable[Mapping[str, Any]], ev: Evidence,
           index: EventIndex | None = None) -> CheckReport:
    """
    Match every acknowledged (message, recipient) against the evidence.

    A recipient counts as delivered when a copy carries its address in
    C{Delivered-To}; copies of the message under other addresses (aliases)
    make up for recipients not matched that way.
    """
    report = CheckReport()
    acked: set[str] = set()
    starts: dict[str, float] = {}
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
        for r in rcpts:
            report.recipients += 1
            n = ev.copies.get((mid, r), 0)
            if n == 0 and spare > 0:
                n, spare = 1, spare - 1
            if n == 1:
                report.delivered_once += 1
            elif n > 1:
                report.duplicated.append((mid, r, n))
            elif ev.failed.get((mid, r)):
                report.bounced += 1
            elif mid in ev.queued:
                report.in_flight.append((mid, r))
            else:
                report.lost.append((mid, r))
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


def wait_settled(nodes: Mapping[str, Mapping[str, Any]], timeout: float, poll: float = 0.1) -> float:
    """
    Poll (bounded) until no node has a message queued (what is still being
    received is not acknowledged yet: its sender holds it).

    @return: seconds waited (C{timeout} when it did not settle).
    """
    from relaynet.lab.observe import queue_counts

    start = time.monotonic()
    deadline = start + timeout
    while True:
        busy = 0
        for rec in nodes.values():
            c = queue_counts(rec["spool"])
            busy += c["active"] + c["deferred"]
        if busy == 0 or time.monotonic() >= deadline:
            return time.monotonic() - start
        time.sleep(poll)
