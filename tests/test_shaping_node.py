"""
Traffic shaping in a real node process (C{twistd relaynet} with a C{[shaping]}
table) relaying to a loopback SMTP receiver in this process.
"""

from __future__ import annotations

import json
import smtplib
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import NodeProcess, relaynet_command, wait_for


class _Sink(socketserver.ThreadingTCPServer):
    """A loopback SMTP receiver: timestamps each transaction, may answer one MAIL with 421."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.lock = threading.Lock()
        self.received: list[tuple[float, float]] = []  # (MAIL at, final dot at)
        self.refuse_next = False
        self.refused_at: float | None = None


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _Sink

    def handle(self) -> None:
        def send(line: bytes) -> None:
            self.wfile.write(line + b"\r\n")
            self.wfile.flush()

        send(b"220 sink.test ESMTP")
        mail_at = 0.0
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                send(b"250-sink.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES")
            elif verb == b"MAIL":
                with self.server.lock:
                    refuse, self.server.refuse_next = self.server.refuse_next, False
                    if refuse:
                        self.server.refused_at = time.monotonic()
                if refuse:
                    send(b"421 4.7.0 Too many messages, slow down")
                    return
                mail_at = time.monotonic()
                send(b"250 2.1.0 Ok")
            elif verb == b"RCPT":
                send(b"250 2.1.5 Ok")
            elif verb == b"DATA":
                send(b"354 go")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                with self.server.lock:
                    self.server.received.append((mail_at, time.monotonic()))
                send(b"250 2.0.0 Ok")
            elif verb == b"QUIT":
                send(b"221 bye")
                return
            else:
                send(b"250 2.0.0 Ok")


def _send(port: int, n: int, first: int = 0) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for i in range(first, first + n):
            s.sendmail("app@sender.test", [f"u{i}@dest.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())


@pytest.mark.slow
def test_node_rate_limit_and_421_pause(tmp_path: Path) -> None:
    """
    A node with [shaping.default] rate = "5/s", burst = 5 relays 60
    messages to a loopback receiver: they arrive over more than 10 s, at most
    10 in any second, all of them; then the receiver answers one MAIL with
    421: no transaction starts for the 5 s pause (shown paused by
    C{relaynet queue shape} meanwhile), the 15 messages queued then
    all arrive after it, and the node logged one throttled and one released
    event for dest.test.
    """
    sink = _Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        node = NodeProcess(tmp_path / "sender", config_toml=f"""
[node]
name = "{{name}}"
hostname = "sender.test"
spool = "spool"
workers = 1
[[listener]]
endpoint = "tcp:{{port}}:interface=127.0.0.1"
[outbound]
hop_down_time = 0
[[route]]
domains = ["dest.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{sink.server_address[1]}"]
[shaping.default]
rate = "5/s"
burst = 5
throttle = [{{ code = 421, pause = 5 }}]
""", name="sender")
        with node:
            _send(node.port, 60)
            wait_for(lambda: len(sink.received) >= 60, 60, "60 messages at the receiver")
            arrivals = sorted(at for _, at in sink.received)
            assert arrivals[-1] - arrivals[0] >= 10.0, arrivals
            worst = max(sum(1 for x in arrivals if t <= x < t + 1.0) for t in arrivals)
            assert worst <= 10, [round(a - arrivals[0], 2) for a in arrivals]

            sink.refuse_next = True
            _send(node.port, 15, first=60)
            wait_for(lambda: sink.refused_at, 30, "the 421")
            # While paused: relaynet queue shape shows it (the admin API's /api/shape).
            out = subprocess.run([*relaynet_command(), "queue", "--config", str(node.config_path), "shape", "--json"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            (dest,) = [d for d in json.loads(out)["destinations"] if d["destination"] == "dest.test"]
            assert dest["state"] == "paused" and dest["reason"].startswith("421 4.7.0"), dest
            wait_for(lambda: len(sink.received) >= 75, 60, "15 more messages at the receiver")
            refused = sink.refused_at
            assert refused is not None
            started = [m for m, _ in sink.received[60:]]
            assert not [m for m in started if refused < m < refused + 5.0 - 0.05], started
            assert any(m >= refused + 5.0 - 0.05 for m in started)

            def events(name: str) -> list[dict[str, Any]]:
                return [e for e in node.events(strict=False) if e.get("event") == name]

            wait_for(lambda: events("released"), 10, "the released event")
            (throttled,) = events("throttled")
            assert throttled["destination"] == "dest.test" and throttled["reply"].startswith("421 4.7.0")
            assert [e["destination"] for e in events("released")] == ["dest.test"]
            # The receiver counts a message before its 250 reaches the node, which
            # logs "sent" only then: wait for the last ones with a deadline.
            wait_for(lambda: len(events("sent")) >= 75, 10, "75 sent events")
            assert len(events("sent")) == 75
    finally:
        sink.shutdown()
        sink.server_close()
