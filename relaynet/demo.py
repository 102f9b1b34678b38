"""
C{make demo}: start a node, push mail through it, show where it went.

Runs C{twistd -n relaynet} as a real process with a config in C{./var/demo},
sends a message with smtplib, waits for local delivery and prints the Maildir
file and the node's event log, then stops the node (C{--keep} leaves it
running and prints how to stop it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(64).startswith(b"220")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relaynet.demo", description=__doc__)
    parser.add_argument("--dir", default="var/demo", help="working directory of the demo node")
    parser.add_argument("--keep", action="store_true", help="leave the node running")
    args = parser.parse_args(argv)

    work = Path(args.dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = work / "node.toml"
    config.write_text(
        f"""# demo node written by `make demo`
[node]
name = "demo"
hostname = "demo.relaynet.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost", "demo.test"]
users = ["alice", "bob"]
[local.aliases]
postmaster = "alice"
"""
    )
    twistd = Path(sys.executable).parent / "twistd"
    log = work / "node.log"
    print(f"demo: starting node: {twistd} -n relaynet --config {config}")
    proc = subprocess.Popen(
        [str(twistd), "-n", f"--pidfile={work / 'twistd.pid'}", f"--logfile={log}",
         "relaynet", "--config", str(config)],
        cwd=work,
    )
    try:
        _wait(lambda: _listening(port) or proc.poll() is not None, 20, "the node to listen")
        if proc.poll() is not None:
            print(log.read_text() if log.exists() else "", file=sys.stderr)
            raise SystemExit("demo: the node did not start")
        print(f"demo: node listening on 127.0.0.1:{port}")

        msg = EmailMessage()
        msg["From"] = "carol@example.org"
        msg["To"] = "alice@demo.test, bob@demo.test"
        msg["Subject"] = "hello from the relaynet demo"
        msg["Message-ID"] = make_msgid(domain="demo.test")
        msg.set_content("This message went through one relaynet node.\n.A line with a dot.\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("demo-client")
            smtp.send_message(msg)
            code, reply = smtp.noop()
        print(f"demo: sent {msg['Message-ID']} to alice and bob")

        mailroot = work / "spool" / "mailboxes" / "demo.test"
        boxes = [mailroot / u / "Maildir" / "new" for u in ("alice", "bob")]
        _wait(lambda: all(b.is_dir() and any(b.iterdir()) for b in boxes), 20, "delivery")
        for box in boxes:
            for f in sorted(box.iterdir()):
                print(f"\n===== {f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f}")
                print(f.read_text(errors="replace"))
        events = work / "spool" / "events.jsonl"
        print("===== events (spool/events.jsonl)")
        for line in events.read_text().splitlines():
            e = json.loads(line)
            print(f"{e['event']:<10} {e.get('queue_id', '')} {e.get('recipient') or e.get('recipients')}"
                  f" {e.get('dsn', '')}")
    finally:
        if args.keep and proc.poll() is None:
            print(f"\ndemo: node still running (pid {proc.pid}); stop it with: kill {proc.pid}")
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            print("\ndemo: node stopped")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
