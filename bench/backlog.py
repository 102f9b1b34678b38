"""
The scale test of issues 7 and 15: a large backlog on one relaynet node.

  1. One node (C{[node] workers = --workers}: a supervisor and its workers,
     each with a shard of the spool) whose next hop is down (a loopback
     port nobody listens on) takes N messages from C{smtp-source}; they all
     end up deferred.
  2. RSS of all the node's processes (the supervisor and every worker),
     and how long C{relaynet queue summary} and C{relaynet queue list
     --limit 20} take (while the mail arrives and with the whole backlog
     queued).
  3. Restart: how long until the node greets again (the first C{220}), and
     until its admin API reports the whole backlog (recovery of every
     shard, done in the background).
  4. The next hop comes back (C{smtp-sink}); C{relaynet queue flush}; how
     fast the backlog drains, against the rate of the same node relaying the
     same kind of mail with its next hop up all along (measured after).

The node is watched through its admin API (one socket, C{<spool>/admin.sock},
whether it has workers or not: the supervisor's aggregates every shard, with
the same JSON as a single node's).

Run it as C{relaynet bench backlog} (or C{python -m bench.backlog} from the checkout's root);
C{--messages 100000}, the default, takes ~6 min on 2 cores; C{--messages 1000000} is the
issue-15 row (C{--estimate} prints the expected minutes). Everything is on 127.0.0.1 in a
temporary directory. Prints a report and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from bench.procstat import tree_pids, tree_status_kb
from bench.systems import HOST, ROUTE, RelaynetNode, _wait, log, parse_workers, usable_cpus
from harness.peers import SmtpSink, free_port, run_smtp_source
from relaynet.admin.queuecli import AdminClient, AdminError
from relaynet.config import default_admin_endpoint

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


# Paces for the estimate (2-core VM, 5 KB, 20 sessions): messages per second.
_PACE = {"accept_down": 700.0, "drain": 2000.0, "steady": 700.0, "recover": 12000.0, "list_ids": 30000.0,
         "list_table": 12000.0}


def estimate_seconds(messages: int) -> float:
    """Seconds a run of C{messages} should take on the 2-core reference VM."""
    return (messages / _PACE["accept_down"] + messages / _PACE["drain"]
            + min(messages, 20000) / _PACE["steady"] + messages / _PACE["recover"]
            + messages / _PACE["list_ids"] + messages / _PACE["list_table"] + 30.0)


def scaled(base: float, messages: int, per_second: float) -> float:
    """A bound of at least C{base} seconds, longer for C{messages} at C{per_second}."""
    return max(base, 3 * messages / per_second)


class AdminProbe:
    """
    The node's admin API, read directly over its socket: C{GET
    /api/summary}'s C{messages} (a counter on a node and on a supervisor,
    which sums its workers') and C{GET /api/status}.
    """

    def __init__(self, spool: Path, timeout: float = 30.0) -> None:
        self.client = AdminClient(default_admin_endpoint(spool), timeout=timeout)

    def queued(self) -> int | None:
        """Messages queued, or L{None} while the node does not answer."""
        try:
            return int(self.client.request("GET", "/api/summary", query={"top": 1})["messages"])
        except (AdminError, KeyError, TypeError, ValueError):
            return None

    def status(self) -> dict | None:
        try:
            return self.client.request("GET", "/api/status")
        except AdminError:
            return None


class RssPeak(threading.Thread):
    """
    Samples the summed C{VmRSS} of a process tree (a supervisor and its
    workers) every C{interval} seconds; L{take} returns the peak since the
    last call (the true peak of the sum, where the sum of each process's
    C{VmHWM} only bounds it).
    """

    def __init__(self, root: Callable[[], int | None], interval: float = 1.0) -> None:
        super().__init__(name="rss-peak", daemon=True)
        self.root = root
        self.interval = interval
        self.peak_kb = 0
        self.processes = 0
        self.stopped = threading.Event()

    def sample(self) -> None:
        pid = self.root()
        kb = tree_status_kb(pid, "VmRSS") if pid else None
        if kb is not None:
            self.peak_kb = max(self.peak_kb, kb)
            self.processes = max(self.processes, len(tree_pids(pid)))

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampling hiccup must not end the run
                pass

    def take(self) -> int:
        self.sample()
        peak, self.peak_kb = self.peak_kb, 0
        return peak


def run(args: argparse.Namespace, workdir: Path) -> dict:
    n = args.messages
    result: dict = {"messages": n, "sessions": args.sessions, "size": args.size,
                    "workers": args.workers, "usable_cpus": usable_cpus()}
    hop_port = free_port(HOST)
    node = RelaynetNode(
        workdir / "node", "backlog", free_port(HOST), ROUTE.format(domains='"*"', port=hop_port),
        backlog=256, queue_settings=BACKLOG_QUEUE, workers=args.workers,
    )
    sink = SmtpSink(workdir / "sink", port=hop_port)
    admin = AdminProbe(node.spool)
    rss = RssPeak(node.pid)
    node.start()
    rss.start()
    try:
        pid = node.pid()
        assert pid is not None
        result["processes"] = len(node.pids())
        result["status"] = admin.status()
        log(f"backlog: node with {result['processes']} process(es), "
            f"{workers_up(result['status'])}; injecting {n} messages, next hop down")
        probes: list[dict] = []
        sent: dict = {}

        def inject() -> None:
            try:
                sent["result"] = run_smtp_source(
                    HOST, node.port, messages=n, sessions=args.sessions, size=args.size,
                    recipient="user@sink.test", helo="source.bench.test", timeout=scaled(3600, n, 100),
                )
            except Exception as e:  # reported below, with smtp-source's own words
                sent["error"] = e

        sender = threading.Thread(target=inject, name="smtp-source", daemon=True)
        sender.start()
        # While the mail arrives: the admin commands stay usable.
        cli_timeout = scaled(120, n, 5000)
        while sender.is_alive():
            t_sum, _ = queue_cli(node.config, "summary", timeout=cli_timeout)
            t_list, _ = queue_cli(node.config, "list", "--limit", "20", timeout=cli_timeout)
            probes.append({"queued": admin.queued(), "summary_s": t_sum, "list20_s": t_list})
            sender.join(min(5.0, max(1.0, n / 20000)))
        if "error" in sent:
            raise RuntimeError(f"smtp-source failed: {sent['error']}")
        accept_rate = sent["result"]["rate"]
        _wait(lambda: (admin.queued() or 0) >= n, 120, "every message in the admin API's summary",
              interval=0.2)
        result["accept_rate"] = accept_rate
        result["admin_while_receiving"] = {
            "probes": len(probes),
            "summary_max_s": max((p["summary_s"] for p in probes), default=None),
            "list20_max_s": max((p["list20_s"] for p in probes), default=None),
        }
        result["rss_kb"] = tree_status_kb(pid, "VmRSS")
        result["hwm_kb"] = tree_status_kb(pid, "VmHWM")
        result["rss_peak_kb"] = rss.take()
        t_sum, _ = queue_cli(node.config, "summary", timeout=cli_timeout)
        t_list, _ = queue_cli(node.config, "list", "--limit", "20", timeout=cli_timeout)
        # Listing every message is the costliest request: its own peak,
        # sampled every 50 ms (the transient can last less than a second).
        listing_rss = RssPeak(node.pid, interval=0.05)
        listing_rss.start()
        try:
            t_all, out_all = queue_cli(node.config, "list", "--ids", timeout=cli_timeout)
        finally:
            listing_rss.stopped.set()
        ids_peak = max(listing_rss.take(), rss.take())
        listed = len(out_all.split())
        del out_all
        # And the table of every message (pages of 5,000 with summaries).
        table_rss = RssPeak(node.pid, interval=0.05)
        table_rss.start()
        try:
            t_table, out_table = queue_cli(node.config, "list", timeout=cli_timeout)
        finally:
            table_rss.stopped.set()
        result["admin_full"] = {
            "summary_s": t_sum, "list20_s": t_list, "list_all_ids_s": t_all,
            "listed": listed,
            "rss_peak_kb": ids_peak,
            "list_all_table_s": t_table, "table_lines": out_table.count("\n"),
            "table_rss_peak_kb": max(table_rss.take(), rss.take()),
        }
        del out_table
        log(f"backlog: {admin.queued()} queued; RSS (all processes) {result['rss_kb'] / 1024:.0f} MiB, "
            f"peak {result['rss_peak_kb'] / 1024:.0f} MiB; summary {t_sum:.2f} s, list --ids {t_all:.2f} s")

        log("backlog: restarting the node")
        node.stop()
        t0 = time.monotonic()
        node.start(timeout=scaled(300, n, 5000), wait_workers=False)
        greet = time.monotonic() - t0
        node.wait_workers_up(scaled(300, n, 5000))
        all_up = time.monotonic() - t0
        _wait(lambda: (admin.queued() or 0) >= n, scaled(300, n, 5000), "the backlog in the admin API",
              interval=0.1)
        all_known = time.monotonic() - t0
        result["restart"] = {"greeting_s": greet, "workers_up_s": all_up, "all_known_s": all_known,
                             "rss_kb": tree_status_kb(node.pid(), "VmRSS"),
                             "processes": len(node.pids()), "status": admin.status()}
        log(f"backlog: greeting {greet:.2f} s after start, every worker up after {all_up:.2f} s, "
            f"backlog known after {all_known:.2f} s")

        log("backlog: next hop up, flush")
        sink.start()
        rss.take()  # the drain's peak from here on (the restart's is in result["restart"])
        t0 = time.monotonic()
        queue_cli(node.config, "flush", timeout=cli_timeout)
        drained = _wait(lambda: admin.queued() == 0, max(args.drain_timeout, scaled(0, n, 500)),
                        "the backlog to drain", interval=0.1)
        took = time.monotonic() - t0
        # The admin API's count drops when a message is done; its files go
        # a moment later (removals are batched): wait for them (bounded)
        # before counting what is left on disk, outside the drain's time.
        try:
            _wait(lambda: node.queued() == 0, 30.0, "the drained messages' queue files to go", interval=0.1)
        except TimeoutError as e:  # reported as files_left below
            log(f"backlog: {e}")
        result["drain"] = {"seconds": took, "rate": n / took,
                           "sink_received": sink.received(), "waited": drained,
                           "files_left": node.queued(),
                           "hwm_kb": tree_status_kb(node.pid(), "VmHWM"),
                           "rss_peak_kb": rss.take()}
        log(f"backlog: drained in {result['drain']['seconds']:.1f} s "
            f"({result['drain']['rate']:.0f} msg/s)")

        # The same node, next hop up all along: the steady relaying rate.
        steady_n = min(n, 20000)
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
        rss.stopped.set()
        node.stop()
        sink.stop()


def workers_up(status: dict | None) -> str:
    """C{workers 2 (2 up, 0 restarts)} from C{GET /api/status}, or C{no workers}."""
    workers = (status or {}).get("workers")
    if not isinstance(workers, list):
        return "no workers (one process)" if status else "no status"
    up = sum(1 for w in workers if w.get("up"))
    restarts = sum(int(w.get("restarts") or 0) for w in workers)
    return f"status: workers {len(workers)} ({up} up, {restarts} restarts)"


def workers_text(workers: int | str | None, cpus: int) -> str:
    if workers is None:
        return "the node's default workers"
    return f'workers = "auto" ({cpus} usable CPUs)' if workers == "auto" else f"workers = {workers}"


def targets(r: dict) -> list[tuple[str, str, bool]]:
    """
    The issue-15 row "1,000,000 queued on one node, next hop down", as
    (what, measured, met) for this run (whatever its size).
    """
    rs, d = r["restart"], r["drain"]
    rss = max(r.get("rss_peak_kb") or 0, d.get("rss_peak_kb") or 0, rs.get("rss_kb") or 0)
    return [
        ("RSS, all processes, < 1.5 GB", f"{rss / 1024:.0f} MiB peak", rss < 1.5 * 1024 * 1024),
        ("first 220 after restart < 2 s", f"{rs['greeting_s']:.2f} s", rs["greeting_s"] < 2.0),
        ("full recovery < 120 s", f"{rs['all_known_s']:.1f} s", rs["all_known_s"] < 120.0),
        ("drain >= 2x the steady relay rate", f"{r['drain_vs_steady']:.2f}x", r["drain_vs_steady"] >= 2.0),
    ]


def report(r: dict) -> str:
    mib = lambda kb: "-" if kb is None else f"{kb / 1024:.0f} MiB"  # noqa: E731
    a, f, rs, d = r["admin_while_receiving"], r["admin_full"], r["restart"], r["drain"]
    lines = [
        f"relaynet backlog: {r['messages']} x {r['size']} B messages, {r['sessions']} sessions, next hop down; "
        f"node with {workers_text(r.get('workers'), r.get('usable_cpus') or 1)}: "
        f"{r.get('processes', '-')} process(es), {workers_up(r.get('restart', {}).get('status'))} at the end",
        f"  accepted at {r['accept_rate']:.0f} msg/s while the hop was down",
        f"  RSS of all processes with the backlog queued: {mib(r['rss_kb'])} (sampled peak {mib(r['rss_peak_kb'])}, "
        f"sum of VmHWM {mib(r['hwm_kb'])}); after restart {mib(rs['rss_kb'])}",
        f"  admin while receiving ({a['probes']} probes): summary <= {a['summary_max_s']:.2f} s, "
        f"list --limit 20 <= {a['list20_max_s']:.2f} s",
        f"  admin with the backlog: summary {f['summary_s']:.2f} s, list --limit 20 {f['list20_s']:.2f} s, "
        f"list --ids (all {f['listed']}) {f['list_all_ids_s']:.2f} s"
        + (f", sampled peak RSS {mib(f['rss_peak_kb'])}" if f.get("rss_peak_kb") else "")
        + (f"; list (the table, {f['table_lines']} lines) {f['list_all_table_s']:.2f} s, sampled peak RSS "
           f"{mib(f['table_rss_peak_kb'])}" if "list_all_table_s" in f else ""),
        f"  restart: first 220 after {rs['greeting_s']:.2f} s, every worker up after "
        f"{rs.get('workers_up_s', rs['greeting_s']):.2f} s, whole backlog known (recovered) after "
        f"{rs['all_known_s']:.2f} s",
        f"  drain after flush: {d['seconds']:.1f} s, {d['rate']:.0f} msg/s; steady relaying "
        f"{r['steady_delivered_rate']:.0f} msg/s; ratio {r['drain_vs_steady']:.2f}; "
        f"sampled peak RSS while draining {mib(d['rss_peak_kb'])}",
        "  issue 15 targets (for 1,000,000 queued):",
    ]
    for what, measured, met in targets(r):
        lines.append(f"    {what:36} {measured:>12}  {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relaynet bench backlog", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000,
                   help="messages in the backlog (default 100000; the issue-15 row: 1000000)")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="[node] workers of the node (default auto: one per usable CPU)")
    p.add_argument("--drain-timeout", type=float, default=1800)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--estimate", action="store_true", help="print the expected minutes and exit")
    args = p.parse_args(argv)
    for name in ("messages", "sessions", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    args.workers = parse_workers(args.workers, p)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    est = estimate_seconds(args.messages) * max(1.0, os.getloadavg()[0] / usable_cpus() / 3.0)
    log(f"relaynet bench backlog: {args.messages} messages, {workers_text(args.workers, usable_cpus())}; "
        f"estimate: about {est / 60:.1f} min")
    if args.estimate:
        print(f"{est / 60:.1f}")
        return 0
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
