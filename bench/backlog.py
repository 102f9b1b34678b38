"""
The scale test of issue 7: a large backlog on one relaynet node.

  1. One node whose next hop is down (a loopback port nobody listens on)
     takes N messages from C{smtp-source}; they all end up deferred.
  2. Peak and current RSS of the node, and how long C{relaynet queue
     summary} and C{relaynet queue list --limit 20} take (while the mail
     arrives and with the whole backlog queued).
  3. Restart: how long until the node greets again, and until its admin API
     reports the whole backlog (the spool rescan).
  4. The next hop comes back (C{smtp-sink}); C{relaynet queue flush}; how
     fast the backlog drains, against the rate of the same node relaying the
     same kind of mail with its next hop up all along (measured after).

Run it as C{relaynet bench backlog} (or C{python -m bench.backlog} from the checkout's root);
C{--messages 100000}, the default, is the issue's figure (~6 min on 2 cores). Everything is on
127.0.0.1 in a temporary directory. Prints a report and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procstat import status_kb
from bench.systems import HOST, ROUTE, RelaynetNode, _wait, log
from harness.peers import SmtpSink, free_port, run_smtp_source

# Retries far apart: the backlog stays put until the flush, as an admin
# would have it while a next hop is down for maintenance.
BACKLOG_QUEUE = """\
delay_warning = 0
minimal_backoff = 3600
maximal_backoff = 3600"""


def queue_cli(config: Path, *args: str, timeout: float = 120.0) -> tuple[float, str]:
    """Run C{relaynet queue ARGS}; @return: (seconds, stdout)."""
    relaynet = Path(sys.executable).parent / "relaynet"
    cmd = [str(relaynet), "queue", "--config", str(config), *args] if relaynet.exists() else [
        sys.executable, "-m", "relaynet.cli", "queue", "--config", str(config), *args
    ]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[:500]}")
    return took, out.stdout


def queued_total(config: Path) -> int:
    _, out = queue_cli(config, "--json", "summary")
    data = json.loads(out)
    return int(data["messages"])


def run(args: argparse.Namespace, workdir: Path) -> dict:
    result: dict = {"messages": args.messages, "sessions": args.sessions, "size": args.size}
    hop_port = free_port(HOST)
    node = RelaynetNode(
        workdir / "node", "backlog", free_port(HOST), ROUTE.format(domains='"*"', port=hop_port),
        backlog=256, queue_settings=BACKLOG_QUEUE,
    )
    sink = SmtpSink(workdir / "sink", port=hop_port)
    node.start()
    try:
        pid = node.pid()
        assert pid is not None
        log(f"backlog: injecting {args.messages} messages, next hop down")
        probes: list[dict] = []
        sent: dict = {}

        def inject() -> None:
            try:
                sent["result"] = run_smtp_source(
                    HOST, node.port, messages=args.messages, sessions=args.sessions, size=args.size,
                    recipient="user@sink.test", helo="source.bench.test", timeout=3600,
                )
            except Exception as e:  # reported below, with smtp-source's own words
                sent["error"] = e

        sender = threading.Thread(target=inject, name="smtp-source", daemon=True)
        sender.start()
        # While the mail arrives: the admin commands stay usable.
        while sender.is_alive():
            t_sum, _ = queue_cli(node.config, "summary")
            t_list, _ = queue_cli(node.config, "list", "--limit", "20")
            probes.append({"queued": node.queued(), "summary_s": t_sum, "list20_s": t_list})
            sender.join(min(5.0, max(1.0, args.messages / 20000)))
        if "error" in sent:
            raise RuntimeError(f"smtp-source failed: {sent['error']}")
        accept_rate = sent["result"]["rate"]
        _wait(lambda: node.queued() >= args.messages, 120, "every message in queue/new")
        result["accept_rate"] = accept_rate
        result["admin_while_receiving"] = {
            "probes": len(probes),
            "summary_max_s": max((p["summary_s"] for p in probes), default=None),
            "list20_max_s": max((p["list20_s"] for p in probes), default=None),
        }
        result["rss_kb"] = status_kb(pid, "VmRSS")
        result["hwm_kb"] = status_kb(pid, "VmHWM")
        t_sum, _ = queue_cli(node.config, "summary")
        t_list, _ = queue_cli(node.config, "list", "--limit", "20")
        t_all, out_all = queue_cli(node.config, "list", "--ids")
        result["admin_full"] = {
            "summary_s": t_sum, "list20_s": t_list, "list_all_ids_s": t_all,
            "listed": len(out_all.split()),
        }
        log(f"backlog: {node.queued()} queued; RSS {result['rss_kb'] / 1024:.0f} MiB, "
            f"peak {result['hwm_kb'] / 1024:.0f} MiB; summary {t_sum:.2f} s, list --ids {t_all:.2f} s")

        log("backlog: restarting the node")
        node.stop()
        t0 = time.monotonic()
        node.start(timeout=300)
        greet = time.monotonic() - t0
        _wait(lambda: queued_total(node.config) >= args.messages, 300, "the backlog in the admin API",
              interval=0.2)
        result["restart"] = {"greeting_s": greet, "all_known_s": time.monotonic() - t0,
                             "rss_kb": status_kb(node.pid() or 0, "VmRSS")}
        log(f"backlog: greeting {greet:.2f} s after start, backlog known after "
            f"{result['restart']['all_known_s']:.2f} s")

        log("backlog: next hop up, flush")
        sink.start()
        t0 = time.monotonic()
        queue_cli(node.config, "flush")
        drained = _wait(lambda: node.queued() == 0, args.drain_timeout, "the backlog to drain")
        took = time.monotonic() - t0
        result["drain"] = {"seconds": took, "rate": args.messages / took,
                           "sink_received": sink.received(), "waited": drained,
                           "hwm_kb": status_kb(node.pid() or 0, "VmHWM")}
        log(f"backlog: drained in {result['drain']['seconds']:.1f} s "
            f"({result['drain']['rate']:.0f} msg/s)")

        # The same node, next hop up all along: the steady relaying rate.
        steady_n = min(args.messages, 20000)
        before = sink.received()
        t0 = time.monotonic()
        run_smtp_source(HOST, node.port, messages=steady_n, sessions=args.sessions, size=args.size,
                        recipient="user@sink.test", helo="source.bench.test", timeout=3600)
        sink.wait_received(before + steady_n, timeout=args.drain_timeout)
        steady = steady_n / (time.monotonic() - t0)
        result["steady_delivered_rate"] = steady
        result["drain_vs_steady"] = result["drain"]["rate"] / steady
        return result
    finally:
        node.stop()
        sink.stop()


def report(r: dict) -> str:
    mib = lambda kb: "-" if kb is None else f"{kb / 1024:.0f} MiB"  # noqa: E731
    a, f, rs, d = r["admin_while_receiving"], r["admin_full"], r["restart"], r["drain"]
    return "\n".join([
        f"relaynet backlog: {r['messages']} x {r['size']} B messages, {r['sessions']} sessions, next hop down",
        f"  accepted at {r['accept_rate']:.0f} msg/s while the hop was down",
        f"  RSS with the backlog queued: {mib(r['rss_kb'])} (peak {mib(r['hwm_kb'])}); after restart {mib(rs['rss_kb'])}",
        f"  admin while receiving ({a['probes']} probes): summary <= {a['summary_max_s']:.2f} s, "
        f"list --limit 20 <= {a['list20_max_s']:.2f} s",
        f"  admin with the backlog: summary {f['summary_s']:.2f} s, list --limit 20 {f['list20_s']:.2f} s, "
        f"list --ids (all {f['listed']}) {f['list_all_ids_s']:.2f} s",
        f"  restart: greeting after {rs['greeting_s']:.2f} s, whole backlog known after {rs['all_known_s']:.2f} s",
        f"  drain after flush: {d['seconds']:.1f} s, {d['rate']:.0f} msg/s; steady relaying "
        f"{r['steady_delivered_rate']:.0f} msg/s; ratio {r['drain_vs_steady']:.2f}; peak RSS {mib(d['hwm_kb'])}",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relaynet bench backlog", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--drain-timeout", type=float, default=1800)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep-workdir", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relaynet-backlog-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        r = run(args, workdir)
    finally:
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
