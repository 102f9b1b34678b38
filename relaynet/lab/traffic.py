# -*- test-case-name: tests.test_lab -*-
"""
C{lab send}: submit N messages to lab nodes with L{smtplib}, from worker
threads (one SMTP session each, reused from message to message), and record
every message a client saw acknowledged (C{250} naming a queue id) in
C{<labdir>/sent.jsonl}, which C{lab check} verifies.

Each message has a unique C{Message-ID} (C{<lab-RUN-N@NAME.lab.test>}) and
C{X-Lab-Run}/C{X-Lab-Seq} headers. A message whose transaction fails
(refused, connection lost, no reply) is counted but not recorded: nothing was
promised for it.
"""

from __future__ import annotations


import json
import math
import random
import re
import smtplib
import sys
import threading
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from attrs import define, field

from relaynet.lab import netns

QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


@define
class SendSummary:
    """Counts and timing of one C{lab send}."""

    run: str
    requested: int
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    partial: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(factory=dict)
    latencies: list[float] = field(factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "run": self.run, "requested": self.requested, "accepted": self.accepted,
            "refused": self.refused, "failed": self.failed, "partial": self.partial,
            "seconds": round(self.seconds, 3), "rate": round(self.rate, 1), "errors": self.errors,
            "accept_latency_p50": percentile(lat, 50), "accept_latency_p99": percentile(lat, 99),
        }


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The C{p}th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return None
    # The epsilon keeps float error (0.29 * 100) from moving a whole rank up.
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values) - 1e-9) - 1))
    return float(sorted_values[k])


def build_message(message_id: str, sender: str, recipients: Sequence[str], size: int,
                  run: str, seq: int) -> bytes:
    """A message of about C{size} bytes (headers included), CRLF line ends."""
    # One recipient per line of a folded To: field (many recipients would
    # otherwise make a line over 1000 octets, refused 554 5.6.0).
    to = ",\r\n ".join(f"<{r}>" for r in recipients)
    head = (
        f"From: <{sender}>\r\nTo: {to}\r\n"
        f"Subject: lab message {seq} of run {run}\r\nDate: {formatdate(localtime=True)}\r\n"
        f"Message-ID: {message_id}\r\nX-Lab-Run: {run}\r\nX-Lab-Seq: {seq}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode("ascii")
    line = b"The quick brown fox jumps over the lazy dog, hop after hop. 0123456789\r\n"
    body_len = max(len(line), size - len(head))
    # Whole lines only: a cut after a line's CR would leave a bare CR (550 5.5.2).
    body = line * max(1, round(body_len / len(line)))
    return head + body


class Progress:
    """A text progress bar on a terminal (stderr); silent elsewhere."""

    def __init__(self, total: int, out: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.total = total
        self.out = out
        self.enabled = out.isatty() if enabled is None else enabled
        self._last = 0.0
        self.start = time.monotonic()

    def update(self, s: SendSummary, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        done = s.accepted + s.refused + s.failed
        width = 30
        filled = int(width * done / self.total) if self.total else width
        rate = s.accepted / (now - self.start) if now > self.start else 0.0
        self.out.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"accepted {s.accepted} refused {s.refused} failed {s.failed} {rate:7.1f} msg/s"
        )
        self.out.flush()

    def finish(self, s: SendSummary) -> None:
        if self.enabled:
            self.update(s, force=True)
            self.out.write("\n")
            self.out.flush()


def send(
    nodes: Mapping[str, Mapping[str, Any]],
    sent_path: Path,
    *,
    lab_name: str,
    count: int,
    entry: Sequence[str],
    sender: str,
    recipients: Sequence[str],
    size: int = 2048,
    concurrency: int = 8,
    rotate: bool = False,
    rate: float = 0.0,
    duration: float = 0.0,
    timeout: float = 30.0,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    port_index: int = 0,
    login: tuple[str, str] | None = None,
    starttls: bool = False,
    rng: random.Random | None = None,
) -> SendSummary:
    """
    Send C{count} messages and wait for every worker (each SMTP step is
    bounded by C{timeout}).

    @param nodes: the lab's node records (address, ports, netns).
    @param entry: nodes to submit to, taken in turn message by message.
    @param rotate: each message goes to one of C{recipients} in turn (else
        to all of them).
    @param rate: at most this many messages per second overall (0: as fast
        as possible).
    @param duration: stop starting new messages after this many seconds (0:
        no limit).
    @param stop: set to stop early.
    @param port_index: which listener of the entry node (0: its relay port).
    @param login: C{(user, password)} for SMTP AUTH (after STARTTLS).
    @return: the counts; acknowledged messages are appended to C{sent_path}.
    """
    run = uuid.uuid4().hex[:10]
    summary = SendSummary(run=run, requested=count)
    lock = threading.Lock()
    next_seq = iter(range(count))
    stop = stop or threading.Event()
    t0 = time.monotonic()
    rng = rng or random.Random()
    sent_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(sent_path, "a", encoding="utf-8")

    def take() -> int | None:
        with lock:
            if stop.is_set() or (duration and time.monotonic() - t0 >= duration):
                return None
            return next(next_seq, None)

    def record(_entry_node: str, rec: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(rec, separators=(",", ":")) + "\n")
            out.flush()

    def note_error(kind: str) -> None:
        with lock:
            summary.errors[kind] = summary.errors.get(kind, 0) + 1

    def worker() -> None:
        conns: dict[str, smtplib.SMTP] = {}
        entered: str | None = None
        try:
            while True:
                seq = take()
                if seq is None:
                    return
                if rate > 0:
                    wait = t0 + seq / rate - time.monotonic()
                    if wait > 0 and stop.wait(wait):
                        return
                node = entry[seq % len(entry)]
                rec = nodes[node]
                ns = rec.get("netns")
                if ns != entered:
                    if entered is not None:
                        for c in conns.values():
                            _close(c)
                        conns.clear()
                    netns.enter(ns)
                    entered = ns
                rcpts = [recipients[seq % len(recipients)]] if rotate else list(recipients)
                mid = f"<lab-{run}-{seq}@{lab_name}.lab.test>"
                data = build_message(mid, sender, rcpts, size, run, seq)
                start = time.time()
                outcome, detail, accepted = _transaction(conns, node, rec, port_index, sender, rcpts, data,
                                                        timeout, login, starttls)
                acked = time.time()
                with lock:
                    if outcome == "accepted":
                        summary.accepted += 1
                        summary.latencies.append(acked - start)
                        if len(accepted) < len(rcpts):
                            summary.partial += 1
                    elif outcome == "refused":
                        summary.refused += 1
                    else:
                        summary.failed += 1
                if outcome == "accepted":
                    m = QUEUED_AS.search(detail)
                    record(node, {
                        "message_id": mid, "time": round(acked, 6), "start": round(start, 6),
                        "sender": sender, "recipients": accepted,
                        "refused": [r for r in rcpts if r not in accepted],
                        "node": node, "queue_id": m.group(1) if m else None, "size": len(data),
                        "run": run, "seq": seq,
                    })
                else:
                    note_error(detail[:80])
                if progress is not None:
                    with lock:
                        progress.update(summary)
        finally:
            for c in conns.values():
                _close(c)

    threads = [threading.Thread(target=worker, name=f"lab-send-{i}", daemon=True)
               for i in range(max(1, min(concurrency, count)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(timeout + 5)
    finally:
        out.close()
    summary.seconds = time.monotonic() - t0
    if progress is not None:
        progress.finish(summary)
    return summary


def _close(c: smtplib.SMTP) -> None:
    try:
        c.quit()
    except (OSError, smtplib.SMTPException):
        try:
            c.close()
        except OSError:
            pass


def _connect(rec: Mapping[str, Any], port: int, timeout: float, login: tuple[str, str] | None,
             starttls: bool) -> smtplib.SMTP:
    c = smtplib.SMTP(rec["address"], port, timeout=timeout, local_hostname="lab-send.lab.test")
    code, _ = c.ehlo()
    if code != 250:
        raise smtplib.SMTPHeloError(code, b"EHLO refused")
    if starttls or login:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        c.starttls(context=ctx)
        c.ehlo()
    if login:
        c.login(*login)
    return c


def _transaction(conns: dict[str, smtplib.SMTP], node: str, rec: Mapping[str, Any], port_index: int,
                 sender: str, rcpts: list[str], data: bytes, timeout: float,
                 login: tuple[str, str] | None, starttls: bool) -> tuple[str, str, list[str]]:
    """
    One SMTP transaction, reusing the session to C{node} when there is one.

    @return: C{(outcome, reply or error, accepted recipients)}; outcome is
        C{accepted}, C{refused} (an SMTP error reply) or C{failed} (no usable
        reply: connection refused or lost, timeout).
    """
    for attempt in (0, 1):
        c = conns.get(node)
        fresh = c is None
        stage = "connect"
        try:
            if c is None:
                c = conns[node] = _connect(rec, rec["ports"][port_index], timeout, login, starttls)
            else:
                stage = "rset"
                c.rset()
            stage = "mail"
            code, resp = c.mail(sender)
            if code != 250:
                return "refused", f"MAIL {code} {resp.decode(errors='replace')}", []
            accepted = []
            last = ""
            for r in rcpts:
                code, resp = c.rcpt(r)
                if code in (250, 251):
                    accepted.append(r)
                else:
                    last = f"RCPT {code} {resp.decode(errors='replace')}"
            if not accepted:
                c.rset()
                return "refused", last, []
            stage = "data"
            code, resp = c.data(data)
            text = resp.decode(errors="replace")
            if code == 250:
                return "accepted", text, accepted
            return "refused", f"DATA {code} {text}", []
        except smtplib.SMTPServerDisconnected as e:
            conns.pop(node, None)
            if c is not None:
                _close(c)
            # A reused session may have been closed while idle: retry once on
            # a new session, only when it broke before the transaction began.
            if fresh or attempt == 1 or stage != "rset":
                return "failed", f"disconnected: {e}", []
        except smtplib.SMTPResponseException as e:
            conns.pop(node, None)
            if c is not None:
                _close(c)
            return "refused", f"{e.smtp_code} {e.smtp_error.decode(errors='replace') if isinstance(e.smtp_error, bytes) else e.smtp_error}", []
        except (OSError, smtplib.SMTPException) as e:
            conns.pop(node, None)
            if c is not None:
                _close(c)
            return "failed", f"{type(e).__name__}: {e}", []
    return "failed", "unreachable", []


def read_sent(path: Path) -> list[dict[str, Any]]:
    """The acknowledged messages recorded in C{sent.jsonl} (complete lines only)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
