"""
A paced SMTP sender for the latency scenario.

It sends C{count} messages at a fixed rate over one connection (reopened if
the server closes it), each with a unique C{Message-ID}, and records for each
the C{CLOCK_MONOTONIC} time just before it wrote the final dot and the time
the C{250} came back.  The timestamping sink (L{stampsink}) records when the
message arrived at the end of the chain; the difference is the latency.

The schedule is fixed in advance (message I at C{start + I / rate}); when a
transaction runs late the next message goes at once, and the lateness is
recorded (C{max_lag}).
"""

from __future__ import annotations

import socket
import statistics
import time
from email.utils import formatdate


class SmtpError(RuntimeError):
    pass


class _Client:
    def __init__(self, host: str, port: int, helo: str, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")
        self.command(b"EHLO " + helo.encode(), b"250")

    def reply(self) -> bytes:
        lines = []
        for _ in range(100):
            line = self.file.readline(4096)
            if not line:
                raise SmtpError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)
        raise SmtpError("reply too long")

    def expect(self, code: bytes) -> bytes:
        r = self.reply()
        if not r.startswith(code):
            raise SmtpError(f"expected {code.decode()}, got {r[:200]!r}")
        return r

    def command(self, line: bytes, code: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect(code)

    def send(self, sender: str, recipient: str, message: bytes) -> tuple[float, float]:
        """
        @param message: CRLF lines, dot-stuffed, ending in CRLF.
        @return: (time of the final dot, time of the 250).
        """
        self.command(b"MAIL FROM:<" + sender.encode() + b">", b"250")
        self.command(b"RCPT TO:<" + recipient.encode() + b">", b"250")
        self.command(b"DATA", b"354")
        self.sock.sendall(message)
        t_dot = time.monotonic()
        self.sock.sendall(b".\r\n")
        self.expect(b"250")
        return t_dot, time.monotonic()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, SmtpError):
            pass
        self.sock.close()


def make_message(msgid: str, recipient: str, size: int, seq: int) -> bytes:
    """A message of about C{size} body bytes: 76-character lines of text."""
    head = (
        f"From: <bench@localhost>\r\nTo: <{recipient}>\r\nSubject: latency probe {seq}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: {msgid}\r\n\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789.,-+\r\n"
    body = line * max(1, size // len(line))
    return head + body


def paced_send(
    host: str,
    port: int,
    *,
    count: int,
    rate: float,
    size: int,
    recipient: str,
    tag: str,
    sender: str = "bench@localhost",
    helo: str = "latency.relaynet.test",
    timeout: float = 60.0,
) -> dict:
    """
    Send C{count} messages at C{rate} per second.

    @return: C{{"sent": [{msgid, t_dot, t_ok}], "max_lag", "seconds"}}.
    @raise SmtpError: on a refusal, or on a second connection failure in a row.
    """
    client = _Client(host, port, helo, timeout)
    sent = []
    max_lag = 0.0
    start = time.monotonic() + 0.05
    deadline = start + count / rate + max(60.0, timeout)
    try:
        for i in range(count):
            due = start + i / rate
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            else:
                max_lag = max(max_lag, now - due)
            if time.monotonic() > deadline:
                raise SmtpError(f"latency run over its deadline after {i} messages")
            msgid = f"<{tag}.{i}@latency.relaynet.test>"
            message = make_message(msgid, recipient, size, i)
            try:
                t_dot, t_ok = client.send(sender, recipient, message)
            except (OSError, SmtpError) as e:
                if isinstance(e, SmtpError) and "closed" not in str(e):
                    raise
                client.close()
                client = _Client(host, port, helo, timeout)
                t_dot, t_ok = client.send(sender, recipient, message)
            sent.append({"msgid": msgid, "t_dot": t_dot, "t_ok": t_ok})
    finally:
        client.close()
    return {"sent": sent, "max_lag": max_lag, "seconds": time.monotonic() - start}


def percentile(values: list[float], p: float) -> float | None:
    """
    The C{p}-th percentile (0-100) by linear interpolation between closest ranks.
    """
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def latency_stats(latencies: list[float]) -> dict:
    return {
        "n": len(latencies),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies) if latencies else None,
        "mean": statistics.fmean(latencies) if latencies else None,
    }
