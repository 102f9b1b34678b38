#!/usr/bin/env python3
"""
Durable accept rate of one SMTP hop: relaynet against Postfix.

Postfix's C{smtp-source} sends N messages of S bytes over C sessions in
parallel to a target; the rate is N divided by the wall-clock time
C{smtp-source} took, i.e. until the last C{250} after C{DATA}.  Both targets
answer C{250} only once the message is safely queued on disk (Postfix's
cleanup fsyncs the queue file; relaynet's spool commits before replying), so
this is the rate at which a hop takes over responsibility for mail.

Targets, each on its own loopback port:
  - postfix: a private Postfix instance (L{harness.peers.PostfixInstance})
    relaying everything to an C{smtp-sink}, so its queue drains; recipient
    C{user@sink.test}.
  - relaynet: a relaynet node started as a subprocess (C{--relaynet-cmd}),
    delivering C{user@localhost} into a Maildir.

Between runs the script waits (bounded) until the previous run's mail has
left the target -- Postfix's queue is empty and the sink has it all, or the
relaynet Maildir holds it all -- so runs do not overlap with background
delivery.  Targets alternate run by run; the report gives medians per
session count and the ratio relaynet/Postfix.

C{--rss-50mb} instead sends one 50 MiB message to the relaynet node and
reports its peak RSS (VmHWM) before and after.

Only loopback addresses are used.  Postfix needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procstat import tree_status_kb
from bench.systems import parse_workers, workers_setting
from harness.peers import (
    PeerUnavailable,
    PostfixInstance,
    SmtpSink,
    SmtpSourceError,
    allow_postfix_search,
    free_port,
    relayhost_for,
    run_smtp_source,
    wait_for_smtp,
)

REPO = Path(__file__).resolve().parent.parent

DEFAULT_RELAYNET_CMD = "{venv}/bin/twistd -n --pidfile= relaynet --config {config}"

CONFIG_TEMPLATE = """\
[node]
name = "bench"
hostname = "bench.relaynet.test"
spool = "{spool}"
{workers_line}
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"
mode = "relay"

[local]
mailroot = "{mailroot}"
domains = ["localhost"]
catch_all = true
"""

LIMITS_TEMPLATE = """
[limits]
max_message_size = {max_message_size}
"""

HELO = "source.relaynet.test"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


class PostfixTarget:
    """
    A private Postfix relaying to an smtp-sink.
    """

    name = "postfix"
    recipient = "user@sink.test"

    def __init__(self, workdir: Path):
        self.workdir = workdir / "postfix"
        self.sink = SmtpSink(self.workdir / "sink")
        self.instance: PostfixInstance | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sink.start()
        self.instance = PostfixInstance(
            self.workdir / "instance",
            port=free_port(),
            mode="relay",
            relayhost=relayhost_for(self.sink.host, self.sink.port),
            name=f"relaynet-bench-{os.getpid()}",
        )
        try:
            self.instance.start()
        except BaseException:
            self.sink.stop()
            raise

    @property
    def port(self) -> int:
        assert self.instance is not None
        return self.instance.port

    def count(self) -> int:
        """
        Messages that have left the hop: those the sink received.
        """
        return self.sink.received()

    def drain(self, expected: int, timeout: float) -> float:
        """
        Wait until the sink has C{expected} messages and the queue is empty.

        @return: seconds waited.
        @raise TimeoutError: if it does not drain in time.
        """
        assert self.instance is not None
        start = time.monotonic()
        self.sink.wait_received(expected, timeout=timeout)
        remaining = max(1.0, timeout - (time.monotonic() - start))
        self.instance.wait_queue_empty(timeout=remaining)
        return time.monotonic() - start

    def stop(self) -> None:
        try:
            if self.instance is not None:
                self.instance.stop()
        finally:
            self.sink.stop()

    def describe(self) -> dict:
        version = subprocess.run(
            ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
        return {"postfix_version": version, "relays_to": "smtp-sink"}


class RelaynetTarget:
    """
    A relaynet node run as a subprocess, delivering into a Maildir.
    """

    name = "relaynet"
    recipient = "user@localhost"

    def __init__(self, workdir: Path, command: str, max_message_size: int | None = None,
                 workers: int | str | None = None):
        self.workers = workers
        self.workdir = workdir / "relaynet"
        self.command_template = command
        self.max_message_size = max_message_size
        self.port = free_port()
        self.spool = self.workdir / "spool"
        self.mailroot = self.workdir / "mail"
        self.config = self.workdir / "node.toml"
        self.log_path = self.workdir / "node.log"
        self.process: subprocess.Popen | None = None
        self.peak_rss_kb: int | None = None
        self.command: list[str] = []

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = CONFIG_TEMPLATE.format(
            spool=self.spool, port=self.port, mailroot=self.mailroot,
            workers_line=workers_setting(self.workers),
        )
        if self.max_message_size:
            text += LIMITS_TEMPLATE.format(max_message_size=self.max_message_size)
        self.config.write_text(text)

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        values = {
            "venv": sys.prefix,
            "python": sys.executable,
            "config": str(self.config),
            "port": str(self.port),
            "workdir": str(self.workdir),
            "spool": str(self.spool),
            "mailroot": str(self.mailroot),
        }
        self.command = [arg.format(**values) for arg in shlex.split(self.command_template)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        log(f"relaynet: {shlex.join(self.command)}")
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"relaynet node exited with {self.process.returncode}:\n"
                    f"{tail(self.log_path)}"
                )
            try:
                wait_for_smtp("127.0.0.1", self.port, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(
                        f"relaynet node did not greet on 127.0.0.1:{self.port} "
                        f"within {timeout}s:\n{tail(self.log_path)}"
                    ) from None

    def count(self) -> int:
        """
        Messages that have left the hop: files in every Maildir under the
        mailroot (C{new}, C{cur}).
        """
        n = 0
        for dirpath, _dirs, files in os.walk(self.mailroot):
            p = Path(dirpath)
            if p.name in ("new", "cur") and p.parent.name == "Maildir":
                n += len(files)
        return n

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"relaynet node died:\n{tail(self.log_path)}")

    def drain(self, expected: int, timeout: float) -> float:
        """
        Wait until the Maildirs hold C{expected} messages.

        @return: seconds waited.
        @raise TimeoutError: if it does not drain in time.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            n = self.count()
            if n >= expected:
                return time.monotonic() - start
            self.check_alive()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"relaynet delivered {n} of {expected} within {timeout}s"
                )
            time.sleep(0.05)

    def hwm_kb(self) -> int | None:
        """C{VmHWM} of the node's process, summed with its workers' if it has any."""
        if self.process is None or self.process.poll() is not None:
            return None
        return tree_status_kb(self.process.pid, "VmHWM")

    def stop(self) -> None:
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            self.peak_rss_kb = self.hwm_kb()
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("relaynet: no exit 30s after SIGTERM; killing it")
                p.kill()
                p.wait(timeout=30)

    def describe(self) -> dict:
        return {"command": self.command, "config": self.config.read_text()}


def one_run(target, args, sessions: int) -> dict:
    """
    One measured smtp-source run against C{target}, then a bounded drain.
    """
    before = target.count()
    try:
        result = run_smtp_source(
            "127.0.0.1", target.port,
            messages=args.messages, sessions=sessions, size=args.size,
            recipient=target.recipient, helo=HELO,
            reuse_connection=args.reuse_connection, timeout=args.timeout,
        )
    except SmtpSourceError as e:
        # smtp-source stops at the first failure: how much got through is
        # unknown, so there is nothing exact to drain to.
        return {"target": target.name, "sessions": sessions, "error": str(e)}
    run = {
        "target": target.name,
        "sessions": sessions,
        "messages": result["messages"],
        "size": result["size"],
        "seconds": result["seconds"],
        "rate": result["rate"],
    }
    try:
        run["drain_seconds"] = target.drain(before + args.messages, args.drain_timeout)
    except TimeoutError as e:
        run["drain_error"] = str(e)
        log(f"  {target.name}: {e}")
    return run


def summarize(runs: list[dict], targets: list[str], sessions_list: list[int], args) -> list[dict]:
    rows = []
    for sessions in sessions_list:
        row: dict = {"sessions": sessions, "messages": args.messages, "size": args.size}
        for name in targets:
            rates = [
                r["rate"] for r in runs
                if r["target"] == name and r["sessions"] == sessions and "rate" in r
            ]
            row[name] = {
                "median": statistics.median(rates) if rates else None,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "runs": len(rates),
                "errors": sum(
                    1 for r in runs
                    if r["target"] == name and r["sessions"] == sessions and "error" in r
                ),
            }
        p = row.get("postfix", {}).get("median")
        q = row.get("relaynet", {}).get("median")
        row["ratio"] = q / p if p and q else None
        rows.append(row)
    return rows


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], targets: list[str]) -> None:
    header = ["sessions", "messages", "size"]
    for name in targets:
        header += [f"{name} msg/s", f"{name} min-max"]
    if len(targets) == 2:
        header.append("relaynet/postfix")
    lines = [header]
    for row in rows:
        line = [str(row["sessions"]), str(row["messages"]), str(row["size"])]
        for name in targets:
            t = row[name]
            line.append(fmt(t["median"]) + ("" if not t["errors"] else f" ({t['errors']} err)"))
            line.append(f"{fmt(t['min'], '.0f')}-{fmt(t['max'], '.0f')}")
        if len(targets) == 2:
            line.append(fmt(row["ratio"], ".2f"))
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    for i, l in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def bench_accept(args, workdir: Path) -> dict:
    sessions_list = args.sessions
    names = ["postfix", "relaynet"] if args.only is None else [args.only]
    targets = {}
    if "postfix" in names:
        targets["postfix"] = PostfixTarget(workdir)
    if "relaynet" in names:
        targets["relaynet"] = RelaynetTarget(workdir, args.relaynet_cmd, workers=args.workers)
    runs: list[dict] = []
    started = []
    try:
        for name in names:
            log(f"starting {name}")
            targets[name].start()
            started.append(targets[name])
        if args.warmup:
            for name in names:
                log(f"warm-up {name}: {args.warmup} messages")
                one_run(targets[name], argparse.Namespace(**{**vars(args), "messages": args.warmup}), 1)
        for rnd in range(args.rounds):
            for i, sessions in enumerate(sessions_list):
                # Alternate who goes first, run by run and round by round,
                # so drift (page cache, disk, thermal) hits both targets.
                order = names if (rnd + i) % 2 == 0 else list(reversed(names))
                for name in order:
                    run = one_run(targets[name], args, sessions)
                    run["round"] = rnd
                    runs.append(run)
                    if "error" in run:
                        log(f"round {rnd} {name:8} s={sessions:<3} ERROR {run['error']}")
                    else:
                        log(
                            f"round {rnd} {name:8} s={sessions:<3} "
                            f"{run['rate']:8.1f} msg/s ({run['seconds']:.2f}s, "
                            f"drain {run.get('drain_seconds', float('nan')):.2f}s)"
                        )
        relaynet = targets.get("relaynet")
        if relaynet is not None:
            relaynet.check_alive()
            relaynet.peak_rss_kb = relaynet.hwm_kb()
        describe = {name: t.describe() for name, t in targets.items()}
    finally:
        for t in reversed(started):
            t.stop()
    rows = summarize(runs, names, sessions_list, args)
    print()
    print(
        f"Durable accept rate, {args.messages} messages of {args.size} bytes per run, "
        f"median of {args.rounds} rounds"
        + (", connection reused (-d)" if args.reuse_connection else ", one connection per message")
    )
    print_table(rows, names)
    result = {"summary": rows, "runs": runs, "targets": describe}
    if "relaynet" in targets:
        kb = targets["relaynet"].peak_rss_kb
        result["relaynet_peak_rss_kb"] = kb
        print(f"\nrelaynet peak RSS (VmHWM): {fmt(kb and kb / 1024)} MiB")
    return result


def bench_rss(args, workdir: Path) -> dict:
    size = args.rss_size_mb * 1024 * 1024
    target = RelaynetTarget(workdir, args.relaynet_cmd, max_message_size=size + size // 10 + 65536,
                            workers=args.workers)
    target.start()
    try:
        before = target.hwm_kb()
        rss_before = tree_status_kb(target.process.pid, "VmRSS")
        line = b"X" * 76 + b"\r\n"
        body = line * (size // len(line) + 1)
        message = (
            b"From: bench@localhost\r\nTo: user@localhost\r\n"
            b"Subject: rss probe\r\nMessage-ID: <rss-probe@bench.relaynet.test>\r\n\r\n"
            + body
        )
        log(f"sending one {len(message) / 2**20:.1f} MiB message")
        t0 = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", target.port, local_hostname=HELO, timeout=args.timeout) as s:
            s.sendmail("bench@localhost", ["user@localhost"], message)
        accept_seconds = time.perf_counter() - t0
        del body, message
        after_accept = target.hwm_kb()
        try:
            drain = target.drain(1, args.drain_timeout)
        except TimeoutError as e:
            drain = None
            log(str(e))
        after_delivery = target.hwm_kb()
        target.check_alive()
    finally:
        target.stop()
    result = {
        "message_bytes": size,
        "accept_seconds": accept_seconds,
        "delivery_wait_seconds": drain,
        "vmhwm_kb_before": before,
        "vmrss_kb_before": rss_before,
        "vmhwm_kb_after_accept": after_accept,
        "vmhwm_kb_after_delivery": after_delivery,
        "increase_kb": (after_delivery - before) if before and after_delivery else None,
        "command": target.command,
    }
    mb = lambda kb: fmt(kb and kb / 1024)  # noqa: E731  (MiB)
    print(f"relaynet peak RSS with one {args.rss_size_mb} MiB message:")
    print(f"  before:          {mb(before)} MiB (VmHWM)")
    print(f"  after accept:    {mb(after_accept)} MiB  (accepted in {accept_seconds:.2f}s)")
    print(f"  after delivery:  {mb(after_delivery)} MiB")
    print(f"  increase:        {mb(result['increase_kb'])} MiB")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure the durable accept rate of one SMTP hop (relaynet vs a "
        "private Postfix) with Postfix's smtp-source, on loopback only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sessions", default="1,20",
                   help="comma-separated parallel session counts (smtp-source -s)")
    p.add_argument("--messages", type=int, default=2000,
                   help="messages per run (smtp-source -m)")
    p.add_argument("--size", type=int, default=5120,
                   help="payload bytes per message, headers excluded (smtp-source -l)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per target and session count; targets alternate")
    p.add_argument("--warmup", type=int, default=100,
                   help="unmeasured messages sent to each target first (0: none)")
    p.add_argument("--only", choices=["postfix", "relaynet"],
                   help="benchmark one target only")
    p.add_argument("--relaynet-cmd", default=DEFAULT_RELAYNET_CMD,
                   help="command starting a relaynet node in the foreground; "
                   "placeholders {venv} {python} {config} {port} {workdir} {spool} {mailroot}")
    p.add_argument("--reuse-connection", action="store_true",
                   help="send each session's messages over one connection (smtp-source -d)")
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="[node] workers of the relaynet node (RSS figures sum its processes)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds allowed for one smtp-source run")
    p.add_argument("--drain-timeout", type=float, default=300,
                   help="seconds allowed for a target to deliver a run's mail")
    p.add_argument("--json", metavar="PATH", help="write raw results as JSON here")
    p.add_argument("--workdir", metavar="DIR",
                   help="directory for instances; by default a new temporary one, removed at the end")
    p.add_argument("--keep-workdir", action="store_true",
                   help="do not remove the temporary directory (logs, spool)")
    p.add_argument("--rss-50mb", action="store_true",
                   help="instead: send one large message to relaynet, report peak RSS")
    p.add_argument("--rss-size-mb", type=int, default=50, help="size for --rss-50mb")
    args = p.parse_args(argv)
    try:
        args.sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        p.error("--sessions: comma-separated integers")
    if not args.sessions or min(args.sessions) < 1:
        p.error("--sessions: at least one positive count")
    for name in ("messages", "size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if args.rss_50mb and args.only == "postfix":
        p.error("--rss-50mb measures the relaynet node")
    args.workers = parse_workers(args.workers, p)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        workdir = Path(args.workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="relaynet-bench-"))
        temporary = not args.keep_workdir
    allow_postfix_search(workdir)
    log(f"workdir: {workdir}")
    started = time.time()
    try:
        if args.rss_50mb:
            result = bench_rss(args, workdir)
        else:
            result = bench_accept(args, workdir)
    except PeerUnavailable as e:
        log(f"cannot run: {e}")
        return 2
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    result["parameters"] = {
        k: v for k, v in vars(args).items() if k not in ("json",)
    }
    result["environment"] = {
        "started": started,
        "python": sys.version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    failed = any("error" in r for r in result.get("runs", ()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
