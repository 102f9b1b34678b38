"""
In-process measurement of queue recovery: time and memory per queued message.

    .venv/bin/python bench/recovery.py --messages 100000 200000 400000

For each N it builds (once, kept under C{--dir}) a spool of N queue files of
about C{--size} octets: one file is written through the real commit path
(L{relaynet.queue.spool.SpoolWriter}), with an envelope like the intake's,
and copied under fresh queue ids; every C{--state-every}th message also gets
a state file (a deferred recipient). Then, in a fresh process per N, it
recovers the spool as a node does (L{Spool.recover} in batches of
C{RECOVERY_BATCH}, each handed to L{QueueRunner.load}, which schedules what
is due as found, with a reactor turn between batches; unpaced, where the
node paces its attempts while it recovers, so that their whole cost shows;
the next hop never answers) and reports:
seconds per phase, the RSS it added per queued message, the cyclic GC's
collections and time (by generation), and, with C{--tracemalloc}, the
Python heap per message. C{--profile FILE} writes a cProfile of the child.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if "--src" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve()))
else:
    sys.path.insert(0, str(HERE.parent))

ROUTE = """
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:192.0.2.1:25"]

[queue]
concurrency = 100
"""


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(spool_dir: Path, n: int, size: int, state_every: int) -> None:
    """Write a spool of C{n} messages under C{spool_dir} (skipped if already there)."""
    from relaynet.queue.spool import Envelope, QueueState, Recipient, RecipientState
    from relaynet.queue.states import RecipientStatus
    from relaynet.testing import EPOCH, replicate_queued

    marker = spool_dir / "built.json"
    want = {"messages": n, "size": size, "state_every": state_every}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    if spool_dir.exists():
        subprocess.run(["rm", "-rf", str(spool_dir)], check=True)
    envelope = Envelope(
        queue_id="",
        sender="sender@source.bench.test",
        recipients=(Recipient("user@sink.test", route="relay:*"),),
        arrival=EPOCH,
        params={"size": None, "body": None, "smtputf8": False, "ret": None, "envid": None,
                "origin": None, "digest": None, "content": "--"},
        client={"helo": "source.bench.test", "ip": "127.0.0.1", "port": 40000, "protocol": "ESMTP",
                "listener": "tcp:2525:interface=127.0.0.1", "tls": None, "auth": None},
        node="backlog",
    )
    body = b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n"

    def data(queue_id: str) -> bytes:
        received = (b"Received: from source.bench.test (127.0.0.1) by relay.bench.test with ESMTP id "
                    + queue_id.encode() + b"; Thu, 1 Jan 2026 00:00:00 +0000\r\n")
        return received + body * max(1, (size - len(received)) // len(body))

    state = QueueState(recipients={"user@sink.test": RecipientState(
        status=RecipientStatus.DEFERRED, attempts=1, last_attempt=EPOCH + 1, dsn="4.4.1",
        diagnostic="connect to tcp:192.0.2.1:25 failed: Connection refused", remote="tcp:192.0.2.1:25",
    )}, next_attempt=EPOCH + 60)
    state_bytes = json.dumps(state.to_json(), separators=(",", ":")).encode()
    t0 = time.monotonic()
    file_size = replicate_queued(spool_dir, envelope, data, n, now=EPOCH, hops=1, content="77",
                                 state=state_bytes if state_every else None, state_every=state_every)
    os.sync()
    marker.write_text(json.dumps(want))
    print(f"built {n} messages of {file_size} octets in {time.monotonic() - t0:.1f} s under {spool_dir}",
          file=sys.stderr)


class GcMeter:
    """Collections and seconds of the cyclic GC, by generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.seconds[g] += time.perf_counter() - self._t


def measure(
    spool_dir: Path, n: int, trace: bool, profile: str | None, hop_down: bool = False, drain: bool = False,
) -> dict[str, Any]:
    """Recover C{spool_dir} as a node does; the figures."""
    import itertools

    from relaynet.events import EventLog
    from relaynet.node import RECOVERY_BATCH
    from relaynet.queue.spool import Spool
    from relaynet.runner import QueueRunner
    from relaynet.testing import EPOCH, ManualThreadPool, ThreadlessReactor, make_config
    from twisted.internet.defer import Deferred, succeed

    class DeadHop:
        """A next hop that never answers (or, if C{down}, defers at once, as a hop known down)."""

        def __init__(self, down: bool) -> None:
            self.down = down
            self.up = False  # the drain: every attempt delivered at once

        def deliver(self, endpoint: str, entry: Any, recipients: list[Any], *args: Any, **kw: Any) -> Deferred[Any]:
            from relaynet.delivery.client import SUSPENDED, DeliveryResult
            if self.up:
                return succeed([DeliveryResult(r.address, 250, "2.0.0", "250 2.0.0 Ok", endpoint)
                                for r in recipients])
            if not self.down:
                return Deferred()
            return succeed([DeliveryResult(r.address, 0, "4.4.1", SUSPENDED + "connect to " + endpoint
                                           + " failed: Connection refused", endpoint) for r in recipients])

        def close(self) -> None:
            pass

    reactor = ThreadlessReactor()
    reactor.advance(EPOCH + 120)
    pool = ManualThreadPool()
    config = make_config(spool_dir.parent / "cfg", toml=ROUTE)
    spool = Spool(spool_dir, reactor, pool, clock=reactor.seconds)  # type: ignore[arg-type]
    hop = DeadHop(hop_down)
    runner = QueueRunner(config, spool, EventLog(None, "bench", clock=reactor.seconds), reactor, pool,
                         outbound=hop, now=reactor.seconds)
    runner.start([])
    gc.collect()
    meter = GcMeter()
    base_rss = rss_kb()
    if trace:
        import tracemalloc
        tracemalloc.start()
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:  # what RelayNode._recover does about the GC (absent from older trees)
        from relaynet.node import RECOVERY_FREEZE_FROM, settle_heap
    except ImportError:
        RECOVERY_FREEZE_FROM, settle_heap = None, None
    t0 = time.perf_counter()
    c0 = time.process_time()
    entries = spool.recover()
    read = load = sched = 0.0
    count = 0
    # The loop of RelayNode._recover, in one thread (reading and loading in turn).
    while True:
        a = time.perf_counter()
        batch = list(itertools.islice(entries, RECOVERY_BATCH))
        b = time.perf_counter()
        read += b - a
        if not batch:
            break
        runner.load(batch)
        count += len(batch)
        if RECOVERY_FREEZE_FROM is not None and count >= RECOVERY_FREEZE_FROM:
            gc.freeze()
        c = time.perf_counter()
        load += c - b
        # The reactor turn between two batches: attempts of what is due.
        reactor.advance(0)
        pool.run_all()
        sched += time.perf_counter() - c
    del batch
    # What is still due once all is read fires a turn at a time.
    a = time.perf_counter()
    for _ in range(count // 100 + 10):
        if not reactor.getDelayedCalls() or min(dc.getTime() for dc in reactor.getDelayedCalls()) > reactor.seconds():
            break
        reactor.advance(0)
        pool.run_all()
    b = time.perf_counter()
    sched += b - a
    if settle_heap is not None and RECOVERY_FREEZE_FROM is not None and count >= RECOVERY_FREEZE_FROM:
        settle_heap()
    settle = time.perf_counter() - b
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)  # type: ignore[arg-type]
    gc_at_end = (list(meter.count), list(meter.seconds))
    result: dict[str, Any] = {
        "messages": count, "seconds": total, "cpu_s": cpu, "read_s": read, "load_s": load,
        "schedule_s": sched, "settle_s": settle,
        "gc_collections": gc_at_end[0], "gc_s": [round(s, 3) for s in gc_at_end[1]],
        "attempts_running": len(runner._attempts), "timetable": len(runner._timetable),
    }
    if trace:
        import tracemalloc
        current, _ = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        result["heap_per_message"] = current / max(count, 1)
        top = snap.statistics("lineno")[:12]
        result["heap_top"] = [f"{s.size / max(count, 1):7.1f} B/msg  {s.traceback[0]}" for s in top]
    gc.collect()
    queued_rss = rss_kb()
    result["rss_per_message"] = (queued_rss - base_rss) * 1024 / max(count, 1)
    result["gc_objects"] = len(gc.get_objects()) + gc.get_freeze_count()
    if drain:
        # The next hop is back: a flush of the whole queue, every attempt
        # delivered at once; the peak RSS on the way (sampled per turn).
        hop.up = True
        (spool_dir / "built.json").unlink(missing_ok=True)  # its files go: built again next time
        peak = queued_rss
        t0 = time.perf_counter()
        done: list[int] = []
        runner.flush().addCallback(done.append)
        for _ in range(100 * n + 1000):
            if not len(runner.core) and done:
                break
            reactor.advance(0)
            pool.run_all()
            peak = max(peak, rss_kb())
        result["drain_s"] = time.perf_counter() - t0
        result["drain_left"] = len(runner.core)
        result["drain_peak_rss_over_queued_kb"] = peak - queued_rss
        result["drain_peak_per_message"] = (peak - base_rss) * 1024 / max(count, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    p.add_argument("--dir", type=Path, default=Path("/tmp/relaynet-bench-recovery"))
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--state-every", type=int, default=100)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--hop-down", action="store_true",
                   help="the next hop defers every attempt at once (as one known down): the recovery attempts"
                        " every message, and the memory is that of a queue of deferred messages")
    p.add_argument("--drain", action="store_true",
                   help="then the next hop comes back: a flush of the whole queue, each attempt delivered at"
                        " once (the spool's files are removed: the spool is built again next time); peak RSS")
    p.add_argument("--profile", help="cProfile output (with one --messages value; .N appended)")
    p.add_argument("--src", type=Path, help="the source tree whose relaynet to measure (default: this one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="one JSON line per N")
    args = p.parse_args(argv)
    if args.child:
        (n,) = args.messages
        r = measure(args.dir / f"spool-{n}", n, args.tracemalloc, args.profile, args.hop_down, args.drain)
        print(json.dumps(r))
        return 0
    rows = []
    for n in args.messages:
        build(args.dir / f"spool-{n}", n, args.size, args.state_every)
        cmd = [sys.executable, __file__, "--child", "--messages", str(n), "--dir", str(args.dir)]
        if args.tracemalloc:
            cmd.append("--tracemalloc")
        if args.hop_down:
            cmd.append("--hop-down")
        if args.drain:
            cmd.append("--drain")
        if args.profile:
            cmd += ["--profile", f"{args.profile}.{n}"]
        if args.src:
            cmd += ["--src", str(args.src)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        print(f"N={r['messages']:>8}  total {r['seconds']:7.2f} s ({r['seconds'] / r['messages'] * 1e6:5.1f} us/msg)"
              f"  cpu {r['cpu_s']:7.2f} s  read {r['read_s']:6.2f}  load {r['load_s']:6.2f}"
              f"  schedule {r['schedule_s']:5.2f}  settle {r['settle_s']:5.2f}"
              f"  gc {sum(r['gc_s']):6.2f} s {r['gc_collections']}"
              f"  RSS {r['rss_per_message']:6.0f} B/msg  objects {r['gc_objects']}", flush=True)
        if "drain_s" in r:
            print(f"   drain {r['drain_s']:.2f} s ({r['drain_left']} left), peak RSS {r['drain_peak_rss_over_queued_kb'] / 1024:.0f}"
                  f" MiB over the queued node's ({r['drain_peak_per_message']:.0f} B/msg in all)", flush=True)
        if "heap_per_message" in r:
            print(f"   heap {r['heap_per_message']:.0f} B/msg (tracemalloc):")
            for line in r["heap_top"]:
                print("     " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
