"""
Injection over HTTP against injection over SMTP, into one relaynet node, in
one run (issue 14).

One node (a real C{twistd relaynet} process, L{harness.nodeproc.NodeProcess},
C{[node] workers = 1} unless C{--workers}) with an SMTP listener and an
C{[http_api]} listener. The same message (C{--size} octets, an RFC 5322 text
with a unique Message-ID per copy) is sent C{--messages} times over C{--clients}
concurrent clients, alternately:

  - http: C{POST /api/v1/messages} with C{{"sender", "recipients", "message"}},
    one HTTP/1.1 keep-alive connection per client;
  - smtp: C{MAIL}, C{RCPT}, C{DATA} on one SMTP session per client (no
    pipelining), the message dot-stuffed.

Both clients are the same asyncio loop in this process, so their own cost is
alike. Both answers come only after the spool commit (201 / 250). The rate is
messages / wall-clock time from the first request to the last answer. CPU per
1000 messages is the node's CPU (C{/proc/PID/stat}, every thread) from the
start of a run until its mail is delivered (local Maildir), so it counts
intake and delivery; delivery is the same for both (and runs while the
clients send: the "while sending" column is nearly all of it). Between runs the script
waits until the Maildir holds every message. Rounds alternate http, smtp,
http, ...; the report gives the medians.

    python -m bench.http_inject                       # 5 KB, 20 clients, 2000 messages, 3 rounds
    python -m bench.http_inject --messages 500 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procstat import NodeProbe
from harness.nodeproc import HOST, NodeProcess, free_port, wait_for
from relaynet.intake.http import add_token

SENDER = "bench@example.org"
RECIPIENT = "user@localhost"


def make_message(size: int, tag: str) -> bytes:
    """A text message of about C{size} octets, CRLF lines of 76 characters."""
    head = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench {tag}\r\n"
            f"Message-ID: <{tag}@bench.test>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


async def _http_client(port: int, token: str, bodies: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    head = (f"POST /api/v1/messages HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\n").encode()
    for body in bodies:
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        reply = await reader.readexactly(length)
        if not status.startswith(b"HTTP/1.1 201"):
            raise RuntimeError(f"HTTP: {status!r} {reply!r}")
    writer.close()


async def _smtp_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def _smtp_client(port: int, messages: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    await _smtp_reply(reader)
    writer.write(b"EHLO bench.test\r\n")
    await _smtp_reply(reader)
    for msg in messages:
        for cmd, want in ((f"MAIL FROM:<{SENDER}>".encode(), b"250"), (f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
                          (b"DATA", b"354")):
            writer.write(cmd + b"\r\n")
            reply = await _smtp_reply(reader)
            if not reply.startswith(want):
                raise RuntimeError(f"SMTP {cmd!r}: {reply!r}")
        stuffed = msg.replace(b"\r\n.", b"\r\n..")
        writer.write(stuffed + b".\r\n")
        reply = await _smtp_reply(reader)
        if not reply.startswith(b"250"):
            raise RuntimeError(f"SMTP DATA: {reply!r}")
    writer.write(b"QUIT\r\n")
    await _smtp_reply(reader)
    writer.close()


def run_once(kind: str, node: NodeProcess, http_port: int, token: str, args: argparse.Namespace,
             round_no: int, delivered_before: int) -> dict[str, Any]:
    """One run: send, time, wait for delivery; @return: the figures."""
    tags = [f"{kind}-{round_no}-{i}" for i in range(args.messages)]
    messages = [make_message(args.size, t) for t in tags]
    per_client = [messages[i::args.clients] for i in range(args.clients)]
    if kind == "http":
        work = [[json.dumps({"sender": SENDER, "recipients": [RECIPIENT], "message": m.decode()}).encode()
                 for m in chunk] for chunk in per_client]
    probe = NodeProbe(lambda: node.pid, children=False, tree=True)
    cpu0 = probe.cpu_seconds() or 0.0

    async def go() -> None:
        if kind == "http":
            await asyncio.gather(*(_http_client(http_port, token, w) for w in work))
        else:
            await asyncio.gather(*(_smtp_client(node.port, c) for c in per_client))

    started = time.monotonic()
    asyncio.run(go())
    elapsed = time.monotonic() - started
    cpu_inject = (probe.cpu_seconds() or 0.0) - cpu0
    want = delivered_before + args.messages
    wait_for(lambda: len(node.maildir_new("user")) >= want, 120, f"{want} messages delivered")
    cpu_all = (probe.cpu_seconds() or 0.0) - cpu0
    return {
        "kind": kind, "round": round_no, "messages": args.messages, "seconds": round(elapsed, 3),
        "rate": round(args.messages / elapsed, 1),
        "cpu_per_1000_inject": round(cpu_inject * 1000 / args.messages, 3),
        "cpu_per_1000": round(cpu_all * 1000 / args.messages, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_inject", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--size", type=int, default=5120, help="message size, octets (default 5120)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per protocol, alternating (default 3)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured messages of each kind first")
    parser.add_argument("--workers", default="1", help="[node] workers (default 1)")
    parser.add_argument("--json", help="write the runs and medians here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relaynet-httpbench-") as tmp:
        d = Path(tmp)
        http_port = free_port()
        token = add_token(d / "tokens", "bench", ["example.org"])
        extra = (f'\n[http_api]\nendpoint = "tcp:{http_port}:interface=127.0.0.1"\ntokens_file = "tokens"\n'
                 f"max_request_size = {max(1_000_000, 4 * args.size)}\n")
        toml = (f'[node]\nname = "{{name}}"\nhostname = "relay.test"\nspool = "spool"\nworkers = {args.workers}\n\n'
                '[[listener]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n\n'
                '[local]\ndomains = ["localhost"]\ncatch_all = true\n' + extra)
        node = NodeProcess(d, config_toml=toml, name="httpbench")
        runs: list[dict[str, Any]] = []
        with node:
            delivered = 0
            if args.warmup:
                warm = argparse.Namespace(**{**vars(args), "messages": args.warmup})
                for kind in ("http", "smtp"):
                    run_once(kind, node, http_port, token, warm, -1, delivered)
                    delivered += args.warmup
            for r in range(args.rounds):
                for kind in (("http", "smtp") if r % 2 == 0 else ("smtp", "http")):
                    run = run_once(kind, node, http_port, token, args, r, delivered)
                    delivered += args.messages
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr)
    medians = {}
    for kind in ("http", "smtp"):
        mine = [r for r in runs if r["kind"] == kind]
        medians[kind] = {k: statistics.median(r[k] for r in mine)
                         for k in ("rate", "cpu_per_1000_inject", "cpu_per_1000")}
    print(f"injection into one relaynet node: {args.messages} messages of {args.size} octets per run, "
          f"{args.clients} concurrent clients, {args.rounds} rounds, workers = {args.workers}, "
          f"{platform.machine()} {platform.system()}")
    print(f"{'':6} {'msg/s':>9} {'CPU s/1000 (while sending)':>27} {'CPU s/1000 (until delivered)':>29}")
    for kind in ("http", "smtp"):
        m = medians[kind]
        print(f"{kind:6} {m['rate']:>9.1f} {m['cpu_per_1000_inject']:>27.3f} {m['cpu_per_1000']:>29.3f}")
    print(f"http/smtp: rate {medians['http']['rate'] / medians['smtp']['rate']:.2f}x, "
          f"CPU (to delivered) {medians['http']['cpu_per_1000'] / medians['smtp']['cpu_per_1000']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
