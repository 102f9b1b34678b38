#!/usr/bin/env python3
"""
relaynet bench: relaynet against Postfix, alternating, on the same work.

Scenarios (see bench/README.md):
  accept   one hop; smtp-source sends; accept rate (until the last 250) and
           delivered rate (until the sink counted the last message)
  chain3   three hops; end-to-end delivered rate
  latency  a paced sender (--latency-rate msg/s); time from the final dot to
           the arrival at a timestamping sink, through 1 and 3 hops; p50/p99
  hopdown  one hop; the accept rate of a node whose next hop is down (a
           loopback port nobody listens on) against one whose next hop is up,
           reported as the ratio down/up
  dkim     one hop, relaynet only; the CPU per 1000 messages of a node that
           DKIM-signs what it relays ([dkim], --dkim-keys) against one that
           does not, per size, reported as the ratio dkim/plain; every
           message must be signed (the node's dkim_signed events).  Runs
           only when named in --scenarios.

Relaynet nodes run with [node] workers = --workers (default "auto": one
worker process per usable CPU).

For every run the CPU seconds of the node processes and their peak PSS are
recorded.  Both systems run side by side; for each work item the system that
goes first alternates, item by item and round by round.  The table gives
medians over the rounds and the ratio relaynet/Postfix; --json gets every raw
run, --png a chart.

Run through `relaynet bench [options]` or, from the checkout's root,
`python -m bench.run [options]`,
as root (private Postfix instances), on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.latency import SmtpError, latency_stats, paced_send
from bench.procstat import PeakSampler, cpu_of
from bench.systems import (
    DKIM_KEY_SETS,
    DKIM_SENDER,
    HOPDOWN_POSTFIX,
    HOPDOWN_QUEUE_SETTINGS,
    HOST,
    SINK_DOMAIN,
    STAMP_DOMAIN,
    SYSTEMS,
    log,
    parse_workers,
    usable_cpus,
)
from relaynet.cli import Parser
from harness.peers import (
    PeerUnavailable,
    SmtpSourceError,
    allow_postfix_search,
    postfix_unavailable_reason,
    run_smtp_source,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SCENARIOS = ("accept", "chain3", "latency", "hopdown", "dkim")
DEFAULT_SCENARIOS = ("accept", "chain3", "latency", "hopdown")
"""What runs without C{--scenarios}: C{dkim} only when asked for."""
# The hopdown group's chains, in the order of the first round: each system
# with its next hop up, and with it down.
HOPDOWN_CHAINS = (("relaynet", False), ("relaynet", True), ("postfix", False), ("postfix", True))
SYSTEM_NAMES = ("relaynet", "postfix")
# The dkim group's chains (both relaynet, one hop, the same sender), in the
# order of the first round: without [dkim], and signing.
DKIM_CHAINS = ("plain", "dkim")
DKIM_EVENTS = ("dkim_signed", "dkim_unsigned")
HELO = "source.relaynet.test"

DEFAULTS = dict(
    rounds=3, messages=5000, chain_messages=2000, sizes="5120,102400", sessions="1,20,100",
    latency_messages=200, latency_rate=20.0, latency_size=5120, warmup=200,
    hopdown_size=5120, hopdown_sessions=20, dkim_sessions=20,
)
QUICK = dict(
    rounds=2, messages=250, chain_messages=None, sizes="5120,102400", sessions="1,20",
    latency_messages=40, latency_rate=20.0, latency_size=5120, warmup=50,
    hopdown_size=5120, hopdown_sessions=20, dkim_sessions=20,
)

# For the time estimate only: seconds per 1000 messages for one run of each
# system, added together, by (hops, size class, sessions), measured on a
# shared, busy 2-core VM (load average 6-11); the estimate is refined after every round.
_SECONDS_PER_1000 = {
    (1, "small", 1): 5.1, (1, "small", 20): 5.1, (1, "small", 100): 10.5,
    (1, "large", 1): 6.5, (1, "large", 20): 5.2, (1, "large", 100): 9.1,
    (3, "small", 1): 7.3, (3, "small", 20): 7.6, (3, "small", 100): 10.6,
    (3, "large", 1): 11.3, (3, "large", 20): 9.4, (3, "large", 100): 11.4,
}
_RUN_OVERHEAD = 1.0
_START_SECONDS = {"postfix": 2.5, "relaynet": 0.8}
_KEYGEN_SECONDS = 2.0  # relaynet dkim keygen: a Python start and an RSA-2048 key
# The dkim group's runs against _SECONDS_PER_1000 (a relaynet run and a
# Postfix run): two relaynet runs, one of them signing, which takes about
# five times the CPU of the plain one (RSA-2048, 5 KB; see bench/README.md).
_DKIM_PACE = 3.0


class Interrupted(BaseException):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


# -- planning ---------------------------------------------------------------


def plan(args) -> list[dict]:
    """
    The groups of work: one per hop count, each started once for both
    systems, with its work items (one run per system per round).
    """
    groups = []
    for hops, scenario in ((1, "accept"), (3, "chain3")):
        items = []
        if scenario in args.scenarios:
            n = args.messages if hops == 1 else args.chain_messages
            for size in args.sizes:
                for sessions in args.sessions:
                    items.append({"kind": "throughput", "scenario": scenario, "hops": hops,
                                  "size": size, "sessions": sessions, "messages": n})
        if "latency" in args.scenarios:
            items.append({"kind": "latency", "scenario": "latency", "hops": hops,
                          "size": args.latency_size, "messages": args.latency_messages,
                          "rate": args.latency_rate})
        if items:
            groups.append({"hops": hops, "kind": "systems", "items": items})
    if "hopdown" in args.scenarios:
        groups.append({"hops": 1, "kind": "hopdown", "items": [
            {"kind": "throughput", "scenario": "hopdown", "hops": 1, "size": args.hopdown_size,
             "sessions": args.hopdown_sessions, "messages": args.messages}]})
    if "dkim" in args.scenarios:
        groups.append({"hops": 1, "kind": "dkim", "items": [
            {"kind": "throughput", "scenario": "dkim", "hops": 1, "size": size,
             "sessions": args.dkim_sessions, "messages": args.messages} for size in args.sizes]})
    return groups


def group_chains(group: dict, args, workdir: Path) -> dict:
    """
    The chains of a group of work, by label, in the order of the first run:
    C{relaynet} and C{postfix}; for the C{hopdown} group each of them with
    its next hop up (C{relaynet/up}) and down (C{relaynet/down}); for the
    C{dkim} group relaynet without C{[dkim]} (C{relaynet/plain}) and
    signing with the keys of C{--dkim-keys} (C{relaynet/dkim}), both fed
    mail from L{DKIM_SENDER}, the domain the keys are for.
    """
    hops = group["hops"]

    def relaynet(**kw):
        return SYSTEMS["relaynet"](workdir, hops, backlog=args.relaynet_backlog,
                                   processes=args.relaynet_processes, workers=args.workers, **kw)

    if group.get("kind") == "dkim":
        return {f"relaynet/{variant}": relaynet(
            tag=f"-{variant}", sender=DKIM_SENDER,
            dkim_keys=DKIM_KEY_SETS[args.dkim_keys] if variant == "dkim" else ())
            for variant in DKIM_CHAINS}
    if group.get("kind") != "hopdown":
        return {"relaynet": relaynet(), "postfix": SYSTEMS["postfix"](workdir, hops)}
    chains = {}
    for name, down in HOPDOWN_CHAINS:
        tag = "-hopdown" if down else "-hopup"
        if name == "relaynet":
            chain = relaynet(next_hop_down=down, tag=tag, queue_settings=HOPDOWN_QUEUE_SETTINGS)
        else:
            chain = SYSTEMS["postfix"](workdir, hops, next_hop_down=down, tag=tag, main_cf=HOPDOWN_POSTFIX)
        chains[f"{name}/{'down' if down else 'up'}"] = chain
    return chains


def _size_class(size: int) -> str:
    return "small" if size <= 20000 else "large"


def estimate_pair(item: dict) -> float:
    """
    Seconds for one run of C{item} by each system (for C{hopdown}: by each
    of its four chains, the two with the next hop down not draining).
    """
    if item["kind"] == "latency":
        return 2 * (item["messages"] / item["rate"] + 0.5 + _RUN_OVERHEAD)
    sessions = min((1, 20, 100), key=lambda s: abs(s - item["sessions"]))
    per_1000 = _SECONDS_PER_1000[(item["hops"], _size_class(item["size"]), sessions)]
    if item["scenario"] == "hopdown":
        return 1.75 * item["messages"] / 1000 * per_1000 + 4 * _RUN_OVERHEAD
    if item["scenario"] == "dkim":
        return _DKIM_PACE * item["messages"] / 1000 * per_1000 + 2 * _RUN_OVERHEAD
    return item["messages"] / 1000 * per_1000 + 2 * _RUN_OVERHEAD


def _chains_in(group: dict) -> int:
    if group.get("kind") == "hopdown":
        return len(HOPDOWN_CHAINS)
    if group.get("kind") == "dkim":
        return len(DKIM_CHAINS)
    return len(SYSTEM_NAMES)


def start_seconds(group: dict) -> float:
    """Seconds to start and warm up every chain of C{group}."""
    if group.get("kind") == "dkim":
        # Two relaynet chains; the signing one makes its keys first.
        return len(DKIM_CHAINS) * (group["hops"] * _START_SECONDS["relaynet"] + 5.0) + _KEYGEN_SECONDS
    starts = group["hops"] * sum(_START_SECONDS.values()) + 2 * 5.0  # start + warm-up
    return starts * _chains_in(group) / len(SYSTEM_NAMES)


def estimate(groups: list[dict], args) -> float:
    """Seconds for the whole plan at the paces of C{_SECONDS_PER_1000} (not scaled for load)."""
    total = 0.0
    for g in groups:
        total += start_seconds(g)
        total += args.rounds * sum(estimate_pair(item) for item in g["items"])
    return total


# The table's paces hold up to about this many runnable tasks per CPU
# besides the bench (load average 6 on the 2-core VM they come from).
_REFERENCE_LOAD_PER_CPU = 3.0


def load_factor(loadavg: float | None = None, cpus: int | None = None) -> float:
    """
    How much slower than the table this machine is likely to run, from the
    1-minute load average: 1.0 up to C{_REFERENCE_LOAD_PER_CPU} runnable
    tasks per CPU, then in proportion (the bench gets a smaller share of the
    CPUs). Only a first guess: once runs start, the measured pace replaces it.
    """
    if loadavg is None:
        loadavg = os.getloadavg()[0]
    cpus = cpus or os.cpu_count() or 1
    return max(1.0, loadavg / cpus / _REFERENCE_LOAD_PER_CPU)


def time_left(total_est: float, done_est: float, elapsed: float) -> float:
    """
    Seconds left, at the pace measured so far: the table's estimate of the
    work not yet done, times how much longer than its estimate the work done
    took (elapsed / done_est). From the first run on, this follows the
    machine's real load, whatever the table says.
    """
    if done_est <= 0:
        return total_est
    return max(0.0, total_est - done_est) * elapsed / done_est


# -- runs -------------------------------------------------------------------


class _Watch(threading.Thread):
    """Polls a counter until it reaches a target; notes when (perf_counter)."""

    def __init__(self, read, target: int, timeout: float, interval: float = 0.01):
        super().__init__(name="sink-watch", daemon=True)
        self.read = read
        self.target = target
        self.timeout = timeout
        self.interval = interval
        self.reached_at: float | None = None
        self.last = 0
        self.cancelled = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.cancelled.is_set() and time.monotonic() < deadline:
            self.last = self.read()
            if self.last >= self.target:
                self.reached_at = time.perf_counter()
                return
            self.cancelled.wait(self.interval)


def throughput_run(chain, item: dict, args) -> dict:
    chain.check_alive()
    n = item["messages"]
    run = {"system": chain.name, "scenario": item["scenario"], "hops": chain.hops,
           "size": item["size"], "sessions": item["sessions"], "messages": n,
           "loadavg_before": os.getloadavg()[0]}
    if item["scenario"] == "hopdown":
        run["next_hop"] = "down" if chain.next_hop_down else "up"
    signing = item["scenario"] == "dkim"
    if signing:
        run["variant"] = dkim_variant(chain)
        run["sender"] = chain.sender
        events0 = chain.event_counts(DKIM_EVENTS)
    probes = chain.probes()
    before = chain.sink.received()
    watch = _Watch(chain.sink.received, before + n, args.smtp_timeout + args.drain_timeout)
    cpu0 = cpu_of(probes)
    with PeakSampler(probes, args.sample_interval) as sampler:
        t0 = time.perf_counter()
        if not chain.next_hop_down:  # with the hop down nothing reaches the sink
            watch.start()
        try:
            res = run_smtp_source(
                HOST, chain.entry_port, messages=n, sessions=item["sessions"], size=item["size"],
                recipient=f"user@{SINK_DOMAIN}", sender=chain.sender, helo=HELO,
                reuse_connection=args.reuse_connection, timeout=args.smtp_timeout,
            )
        except SmtpSourceError as e:
            watch.cancelled.set()
            run["error"] = str(e)[-1500:]
            res = None
        if res is not None:
            run["accept_seconds"] = res["seconds"]
            run["accept_rate"] = n / res["seconds"]
        if res is not None and not chain.next_hop_down:
            watch.join(args.drain_timeout + 5)
            watch.cancelled.set()
            if watch.reached_at is None:
                run["error"] = f"sink counted {watch.last - before} of {n} within the drain timeout"
            else:
                run["delivered_seconds"] = watch.reached_at - t0
                run["delivered_rate"] = n / run["delivered_seconds"]
        try:
            run["idle_wait"] = chain.wait_idle(args.drain_timeout)
        except TimeoutError as e:
            run.setdefault("error", str(e))
    cpu1 = cpu_of(probes)
    run.update(_cpu_fields(cpu0, cpu1, n))
    run["pss"] = sampler.result()
    run["peak_pss_kb"] = run["pss"]["peak_total_kb"]
    run["sink_total"] = chain.sink.received()
    if signing:
        events1 = chain.event_counts(DKIM_EVENTS)
        for name in DKIM_EVENTS:
            run[name] = events1[name] - events0[name]
        problem = dkim_problem(run)
        if problem:
            log(f"ERROR: {chain.workdir.name}: {problem}")
            run["error"] = problem + (f"; {run['error']}" if run.get("error") else "")
    return run


def dkim_variant(chain) -> str:
    """C{"dkim"} for a chain that signs, C{"plain"} for one that does not."""
    return "dkim" if getattr(chain, "dkim_keys", ()) else "plain"


def dkim_problem(run: dict) -> str | None:
    """
    What is wrong with the signing of a C{dkim} run, or L{None}: the signing
    chain must log one C{dkim_signed} event per message and no
    C{dkim_unsigned}; the plain one neither.
    """
    n, signed, unsigned = run["messages"], run.get("dkim_signed"), run.get("dkim_unsigned")
    if run.get("variant") == "dkim":
        if signed != n or unsigned:
            return (f"dkim: {signed} of {n} messages signed (dkim_signed events), "
                    f"{unsigned} dkim_unsigned: not every message was signed")
    elif signed or unsigned:
        return f"dkim: the plain chain logged {signed} dkim_signed, {unsigned} dkim_unsigned events"
    return None


def latency_run(chain, item: dict, args, tag: str) -> dict:
    chain.check_alive()
    n = item["messages"]
    run = {"system": chain.name, "scenario": "latency", "hops": chain.hops, "size": item["size"],
           "messages": n, "rate": item["rate"], "loadavg_before": os.getloadavg()[0]}
    probes = chain.probes()
    stamp = chain.stamp
    before = stamp.received()
    cpu0 = cpu_of(probes)
    # PSS before and after only: a sample every second delayed the messages
    # in flight, in both systems (bench/README.md, "PSS sampling and latency").
    with PeakSampler(probes, None) as sampler:
        try:
            res = paced_send(HOST, chain.entry_port, count=n, rate=item["rate"], size=item["size"],
                             recipient=f"user@{STAMP_DOMAIN}", tag=tag, timeout=args.smtp_timeout)
        except (OSError, SmtpError) as e:
            run["error"] = f"sender: {e}"
            res = None
        deadline = time.monotonic() + args.drain_timeout
        while stamp.received() < before + n and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            run["idle_wait"] = chain.wait_idle(args.drain_timeout)
        except TimeoutError as e:
            run.setdefault("error", str(e))
    cpu1 = cpu_of(probes)
    run.update(_cpu_fields(cpu0, cpu1, n))
    run["pss"] = sampler.result()
    run["peak_pss_kb"] = run["pss"]["peak_total_kb"]
    if res is not None:
        stamps = stamp.stamps()
        lat, acc = [], []
        for s in res["sent"]:
            acc.append(s["t_ok"] - s["t_dot"])
            if s["msgid"] in stamps:
                lat.append(stamps[s["msgid"]] - s["t_dot"])
        run["latency"] = latency_stats(lat)
        run["accept_latency"] = latency_stats(acc)
        run["missing"] = len(res["sent"]) - len(lat)
        run["max_lag"] = res["max_lag"]
        run["latencies"] = [round(x, 6) for x in lat]
        if run["missing"]:
            run.setdefault("error", f"{run['missing']} of {n} messages did not reach the sink")
    return run


def _cpu_fields(cpu0: dict, cpu1: dict, messages: int) -> dict:
    per_node = {}
    for name in cpu1:
        a, b = cpu0.get(name), cpu1.get(name)
        per_node[name] = None if a is None or b is None else round(b - a, 3)
    known = [v for v in per_node.values() if v is not None]
    total = sum(known) if known else None
    return {
        "cpu_seconds": total,
        "cpu_seconds_by_node": per_node,
        "cpu_per_1000": (total / messages * 1000) if total is not None and messages else None,
    }


def warm_up(chain, args, latency: bool) -> None:
    """
    Send C{--warmup} messages (and, with C{latency}, 10 latency probes) and
    wait until they have left.  With the next hop down they stay queued (and
    the first one tells the node that the hop is down).
    """
    if args.warmup <= 0:
        return
    before = chain.sink.received()
    events0 = chain.event_counts(DKIM_EVENTS)
    run_smtp_source(HOST, chain.entry_port, messages=args.warmup, sessions=min(10, args.warmup),
                    size=5120, recipient=f"user@{SINK_DOMAIN}", sender=chain.sender, helo=HELO,
                    timeout=args.smtp_timeout)
    if chain.next_hop_down:
        return
    chain.sink.wait_received(before + args.warmup, timeout=args.drain_timeout)
    if getattr(chain, "dkim_keys", ()):
        # Before anything is measured: a chain that does not sign every
        # message would measure nothing worth having.
        chain.wait_idle(args.drain_timeout)
        events1 = chain.event_counts(DKIM_EVENTS)
        signed, unsigned = (events1[k] - events0[k] for k in DKIM_EVENTS)
        if signed != args.warmup or unsigned:
            raise RuntimeError(f"{chain.workdir.name}: warm-up: {signed} of {args.warmup} messages "
                               f"DKIM-signed, {unsigned} unsigned (the node's events.jsonl); "
                               f"sender {chain.sender}")
    if latency:
        paced_send(HOST, chain.entry_port, count=10, rate=50, size=args.latency_size,
                   recipient=f"user@{STAMP_DOMAIN}", tag=f"warmup-{uuid.uuid4().hex[:8]}")
    chain.wait_idle(args.drain_timeout)


def describe_run(run: dict) -> str:
    system = run["system"] + (f"/{run['next_hop']}" if run.get("next_hop") else "") \
        + (f"/{run['variant']}" if run.get("variant") else "")
    head = f"{system:8} {run['scenario']:7} {run['hops']}h size={run['size']:<6}"
    if run["scenario"] == "latency":
        lat = run.get("latency") or {}
        body = (f"p50 {_ms(lat.get('p50'))} ms  p99 {_ms(lat.get('p99'))} ms"
                if lat.get("n") else "no latency")
    else:
        head += f" s={run['sessions']:<3}"
        body = f"accept {_f(run.get('accept_rate'))} msg/s  delivered {_f(run.get('delivered_rate'))} msg/s"
        if run.get("variant"):
            body += f"  signed {_f(run.get('dkim_signed'), 'd')}"
    tail = f"  cpu/1000 {_f(run.get('cpu_per_1000'), '.2f')} s  pss {_f((run.get('peak_pss_kb') or 0) / 1024)} MiB"
    if run.get("error"):
        tail += f"  ERROR {run['error'].splitlines()[0][:200]}"
    return f"{head} {body}{tail}"


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def execute(groups: list[dict], args, workdir: Path, deadline: float, runs: list[dict], described: dict,
            revivals: list[dict] | None = None) -> None:
    """
    Run every group; C{runs}, C{described} and C{revivals} (nodes started
    again, see L{revive}) fill as it goes (kept on errors).
    """
    revivals = [] if revivals is None else revivals
    total_runs = sum(len(g["items"]) * _chains_in(g) for g in groups) * args.rounds
    total_est = estimate(groups, args)
    done = 0
    done_est = 0.0
    t_begin = time.monotonic()
    for g in groups:
        hops = g["hops"]
        chains = group_chains(g, args, workdir)
        labels = tuple(chains)
        latency = any(item["kind"] == "latency" for item in g["items"])
        started = []
        try:
            for name in labels:
                log(f"starting {name}, {hops} hop(s)"
                    + (f" ({g['kind']})" if g.get("kind") in ("hopdown", "dkim") else ""))
                chains[name].start()
                started.append(chains[name])
                warm_up(chains[name], args, latency)
            done_est += start_seconds(g)
            code_at_start = _git_describe()
            idle = {name: chains[name].probes() for name in labels}
            idle_pss = {name: sum(p.pss_kb() for p in pr.values()) for name, pr in idle.items()}
            for rnd in range(args.rounds):
                for i, item in enumerate(g["items"]):
                    order = labels if (rnd + i) % 2 == 0 else tuple(reversed(labels))
                    for name in order:
                        chain = chains[name]
                        if time.monotonic() > deadline:
                            skipped = {"system": chain.name, "scenario": item["scenario"], "hops": hops,
                                       "size": item["size"], "sessions": item.get("sessions"),
                                       "round": rnd, "skipped": "--max-minutes reached"}
                            if item["scenario"] == "hopdown":
                                skipped["next_hop"] = "down" if chain.next_hop_down else "up"
                            if item["scenario"] == "dkim":
                                skipped["variant"] = dkim_variant(chain)
                            runs.append(skipped)
                            continue
                        t_run = time.monotonic()
                        revived = revive(chain, args, latency, revivals)
                        if item["kind"] == "latency":
                            tag = f"{name}-{hops}h-r{rnd}-{uuid.uuid4().hex[:8]}"
                            run = latency_run(chain, item, args, tag)
                        else:
                            run = throughput_run(chain, item, args)
                        run["round"] = rnd
                        run["order"] = order.index(name)
                        if revived:
                            run["nodes_restarted_before"] = revived
                        run["wall_seconds"] = time.monotonic() - t_run
                        runs.append(run)
                        done += 1
                        done_est += estimate_pair(item) / len(labels)
                        left = time_left(total_est, done_est, time.monotonic() - t_begin)
                        log(f"[{done}/{total_runs}] r{rnd} {describe_run(run)}; "
                            f"estimate: about {left / 60:.1f} min left at the pace so far")
                elapsed = time.monotonic() - t_begin
                if done_est:
                    left = time_left(total_est, done_est, elapsed)
                    log(f"-- round {rnd + 1}/{args.rounds} of {hops} hop(s) done; "
                        f"elapsed {elapsed / 60:.1f} min, estimate: about {left / 60:.1f} min left")
            for name in labels:
                d = chains[name].describe()
                d["idle_pss_kb"] = idle_pss[name]
                d["vm_hwm_kb"] = chains[name].hwm_kb()
                d["relaynet_git_at_start"] = code_at_start
                described[chains[name].workdir.name] = d
        finally:
            for chain in reversed(started):
                chain.stop()


MAX_REVIVALS = 2


def revive(chain, args, latency: bool, revivals: list[dict]) -> list[str]:
    """
    Before a run: if a node of C{chain} is no longer running (something
    outside the bench stopped it, or it died), start it again, warm it up and
    note it in C{revivals} (the report warns), up to L{MAX_REVIVALS} times
    per chain; then the run goes on as planned.

    @return: the names of the nodes started again.
    @raise RuntimeError: a node is dead and cannot (or may no more) be revived.
    """
    try:
        chain.check_alive()
        return []
    except RuntimeError as e:
        done = sum(1 for r in revivals if r["chain"] == chain.workdir.name)
        names = chain.restart_dead() if done < MAX_REVIVALS else []
        if not names:
            raise
        why = [line for line in str(e).splitlines()[1:] if "SIGTERM" in line or "rror" in line][:3]
        revivals.append({"chain": chain.workdir.name, "nodes": names, "time": time.time(), "log": why})
        log(f"warning: {chain.workdir.name}: {', '.join(names)} had stopped ({'; '.join(why) or 'no reason logged'}); "
            "started again")
        warm_up(chain, args, latency)
        return names


# -- summary ----------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _row(section, metric, unit, better, size, sessions, hops, values_by_system) -> dict:
    row = {"section": section, "metric": metric, "unit": unit, "better": better,
           "size": size, "sessions": sessions, "hops": hops}
    for name in SYSTEM_NAMES:
        row[name] = _stats(values_by_system.get(name, []))
    r, p = row["relaynet"]["median"], row["postfix"]["median"]
    row["ratio"] = r / p if r is not None and p else None
    return row


def hopdown_ratios(runs: list[dict], system: str) -> list[float]:
    """
    Per round, C{system}'s accept rate with the next hop down over its rate
    with the hop up (the two runs of a round ran one after the other).
    """
    rates: dict = {}
    for r in runs:
        if (r["system"] == system and r["scenario"] == "hopdown" and r.get("accept_rate")
                and not r.get("error")):
            rates.setdefault(r["round"], {})[r["next_hop"]] = r["accept_rate"]
    return [v["down"] / v["up"] for _, v in sorted(rates.items()) if "down" in v and "up" in v]


def summarize(runs: list[dict], args) -> list[dict]:
    ok = [r for r in runs if "skipped" not in r]
    rows = []

    def pick(pred, key):
        return {name: [key(r) for r in ok if r["system"] == name and pred(r) and key(r) is not None]
                for name in SYSTEM_NAMES}

    for scenario, hops in (("accept", 1), ("chain3", 3)):
        if scenario not in args.scenarios:
            continue
        for size in args.sizes:
            for sessions in args.sessions:
                sel = (lambda r, sc=scenario, sz=size, ss=sessions:
                       r["scenario"] == sc and r["size"] == sz and r.get("sessions") == ss)
                if scenario == "accept":
                    rows.append(_row(scenario, "accept rate", "msg/s", "higher", size, sessions, hops,
                                     pick(sel, lambda r: r.get("accept_rate"))))
                rows.append(_row(scenario, "delivered rate", "msg/s", "higher", size, sessions, hops,
                                 pick(sel, lambda r: r.get("delivered_rate"))))
    if "latency" in args.scenarios:
        for hops in (1, 3):
            sel = lambda r, h=hops: r["scenario"] == "latency" and r["hops"] == h  # noqa: E731
            for p in ("p50", "p99"):
                rows.append(_row("latency", p, "ms", "lower", args.latency_size, None, hops,
                                 pick(sel, lambda r, p=p: (r.get("latency") or {}).get(p) and
                                      r["latency"][p] * 1000)))
    if "hopdown" in args.scenarios:
        sel = lambda r: r["scenario"] == "hopdown"  # noqa: E731
        for hop in ("up", "down"):
            rows.append(_row("hopdown", f"accept rate, next hop {hop}", "msg/s", "higher",
                             args.hopdown_size, args.hopdown_sessions, 1,
                             pick(lambda r, h=hop: sel(r) and r.get("next_hop") == h,
                                  lambda r: r.get("accept_rate") if not r.get("error") else None)))
        rows.append(_row("hopdown", "accept down/up", "x", "higher", args.hopdown_size,
                         args.hopdown_sessions, 1, {name: hopdown_ratios(ok, name) for name in SYSTEM_NAMES}))
    for hops in sorted({r["hops"] for r in ok if r["scenario"] not in ("hopdown", "dkim")}):
        # Peak PSS of the whole chain in each round, then the median over rounds
        # (the hopdown and dkim scenarios' nodes are others: not counted).
        per_round = {}
        for name in SYSTEM_NAMES:
            peaks = {}
            for r in ok:
                if r["system"] == name and r["hops"] == hops and r.get("peak_pss_kb") \
                        and r["scenario"] not in ("hopdown", "dkim"):
                    peaks[r["round"]] = max(peaks.get(r["round"], 0), r["peak_pss_kb"])
            per_round[name] = [kb / 1024 for kb in peaks.values()]
        what = "peak PSS" if hops == 1 else f"peak PSS, sum of {hops}"
        rows.append(_row("memory", what, "MiB", "lower", None, None, hops, per_round))
    for scenario, hops in (("accept", 1), ("chain3", 3)):
        if scenario not in args.scenarios:
            continue
        for size in args.sizes:
            sel = lambda r, sc=scenario, sz=size: r["scenario"] == sc and r["size"] == sz  # noqa: E731
            rows.append(_row("cpu", f"{scenario}: CPU per 1000 msg", "s", "lower", size, None, hops,
                             pick(sel, lambda r: r.get("cpu_per_1000") if not r.get("error") else None)))
    return rows


# The dkim rows: (metric, unit, better, the run's key).
DKIM_METRICS = (
    ("CPU per 1000 msg", "s", "lower", "cpu_per_1000"),
    ("accept rate", "msg/s", "higher", "accept_rate"),
    ("delivered rate", "msg/s", "higher", "delivered_rate"),
)
DKIM_KEYS_TEXT = {"rsa": "RSA-2048", "ed25519": "Ed25519", "both": "RSA-2048 + Ed25519 (dual signing)"}


def dkim_summary(runs: list[dict], args) -> list[dict]:
    """
    The C{dkim} rows, per size: each metric of L{DKIM_METRICS} for the
    plain and the signing chain (medians over rounds), their ratio
    dkim/plain, the median of each round's ratio (C{paired}: the two runs
    of a round ran back to back), and for the CPU row the extra CPU of
    signing in milliseconds per message (the difference of the medians: s
    per 1000 messages is ms per message). Runs with an error (a message not
    signed among them) are left out.
    """
    ok = [r for r in runs if r["scenario"] == "dkim" and "skipped" not in r and not r.get("error")]
    rows = []
    for size in args.sizes:
        for metric, unit, better, key in DKIM_METRICS:
            by_round: dict[str, dict[int, float]] = {v: {} for v in DKIM_CHAINS}
            for r in ok:
                if r["size"] == size and r.get(key) is not None and r.get("variant") in by_round:
                    by_round[r["variant"]][r["round"]] = r[key]
            row = {"section": "dkim", "metric": metric, "unit": unit, "better": better, "size": size,
                   "sessions": args.dkim_sessions, "hops": 1, "keys": args.dkim_keys}
            for v in DKIM_CHAINS:
                row[v] = _stats(list(by_round[v].values()))
            plain, dkim = row["plain"]["median"], row["dkim"]["median"]
            row["ratio"] = dkim / plain if plain and dkim is not None else None
            row["paired"] = _stats([d / by_round["plain"][k] for k, d in sorted(by_round["dkim"].items())
                                    if by_round["plain"].get(k)])
            if key == "cpu_per_1000":
                row["extra_ms_per_message"] = dkim - plain if plain is not None and dkim is not None else None
            rows.append(row)
    return rows


def dkim_signing(runs: list[dict]) -> dict:
    """Per chain of the dkim scenario: messages sent and C{dkim_signed}/C{dkim_unsigned} events, over its runs."""
    out = {f"relaynet/{v}": {"messages": 0, "dkim_signed": 0, "dkim_unsigned": 0, "runs": 0}
           for v in DKIM_CHAINS}
    for r in runs:
        if r["scenario"] != "dkim" or "skipped" in r or r.get("variant") not in DKIM_CHAINS:
            continue
        d = out[f"relaynet/{r['variant']}"]
        d["runs"] += 1
        d["messages"] += r["messages"]
        for name in DKIM_EVENTS:
            d[name] += r.get(name) or 0
    return out


def format_dkim(rows: list[dict], signing: dict, args) -> str:
    """The dkim table, the extra CPU per message, and the signed counts."""
    header = ["size", "metric", "plain", "dkim", "dkim/plain", "paired", "better if", "spread", "runs"]
    lines = [header]
    for row in rows:
        spreads = [(row[v]["max"] - row[v]["min"]) / row[v]["median"] for v in DKIM_CHAINS if row[v]["median"]]
        spec = ".2f" if row["unit"] == "s" else ".1f"
        lines.append([
            _size(row["size"]), f"{row['metric']} ({row['unit']})",
            _f(row["plain"]["median"], spec), _f(row["dkim"]["median"], spec),
            _f(row["ratio"], ".2f"), _f(row["paired"]["median"], ".2f"),
            ">1" if row["better"] == "higher" else "<1",
            f"{max(spreads) * 100:.0f}%" if spreads else "-",
            f"{row['plain']['n']}+{row['dkim']['n']}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    title = (f"DKIM signing cost: relaynet without [dkim] (plain) and signing with "
             f"{DKIM_KEYS_TEXT[args.dkim_keys]} (dkim), 1 hop, {args.dkim_sessions} sessions, "
             f"{args.messages} messages per run, relaynet nodes with {describe_workers(args.workers)}; "
             f"medians of {args.rounds} alternating rounds; paired = median of each round's dkim/plain")
    out = [title]
    for k, line in enumerate(lines):
        cells = [c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    extra = [f"{_size(r['size'])} {r['extra_ms_per_message']:+.2f} ms" for r in rows
             if r.get("extra_ms_per_message") is not None]
    out.append("CPU of signing per message (dkim - plain, medians): " + (", ".join(extra) if extra else "-"))
    d, p = signing["relaynet/dkim"], signing["relaynet/plain"]
    out.append(f"signed (the nodes' events.jsonl): relaynet/dkim {d['dkim_signed']} dkim_signed of "
               f"{d['messages']} messages, {d['dkim_unsigned']} dkim_unsigned; relaynet/plain "
               f"{p['dkim_signed'] + p['dkim_unsigned']} dkim events")
    if d["dkim_signed"] != d["messages"] or d["dkim_unsigned"]:
        out.append(f"ERROR: {d['messages'] - d['dkim_signed']} message(s) of the signing chain went "
                   "unsigned: its figures are not the cost of signing every message")
    return "\n".join(out)


def format_table(rows: list[dict]) -> str:
    header = ["scenario", "metric", "hops", "size", "sess", "relaynet", "postfix", "relaynet/postfix",
              "better if", "spread", "runs"]
    lines = [header]
    for row in rows:
        spreads = []
        for name in SYSTEM_NAMES:
            s = row[name]
            if s["median"]:
                spreads.append((s["max"] - s["min"]) / s["median"])
        lines.append([
            row["section"],
            f"{row['metric']} ({row['unit']})",
            str(row["hops"]),
            _size(row["size"]),
            "-" if row["sessions"] is None else str(row["sessions"]),
            _f(row["relaynet"]["median"], ".2f" if row["unit"] in ("s", "x") else ".1f"),
            _f(row["postfix"]["median"], ".2f" if row["unit"] in ("s", "x") else ".1f"),
            _f(row["ratio"], ".2f"),
            ">1" if row["better"] == "higher" else "<1",
            f"{max(spreads) * 100:.0f}%" if spreads else "-",
            f"{row['relaynet']['n']}+{row['postfix']['n']}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def sizing(rows: list[dict]) -> dict:
    """
    Per-node figures for fleet sizing, from the one-hop rows: the best median
    delivered rate over the session counts, per size; the one-hop peak PSS;
    CPU seconds per 1000 messages.
    """
    out: dict = {}
    for name in SYSTEM_NAMES:
        d: dict = {"delivered_rate": {}, "cpu_per_1000": {}}
        for r in rows:
            m = r[name]["median"]
            if m is None or r["hops"] != 1:
                continue
            if r["section"] == "accept" and r["metric"] == "delivered rate":
                d["delivered_rate"][r["size"]] = max(d["delivered_rate"].get(r["size"], 0), m)
            elif r["section"] == "cpu":
                d["cpu_per_1000"][r["size"]] = m
            elif r["section"] == "memory":
                d["peak_pss_mib"] = m
        out[name] = d
    return out


def format_sizing(s: dict) -> str:
    lines = ["Per node, one hop (for sizing a fleet; see bench/README.md):"]
    for name in SYSTEM_NAMES:
        d = s.get(name) or {}
        parts = []
        for size in sorted(set(d.get("delivered_rate", {})) | set(d.get("cpu_per_1000", {}))):
            rate, cpu = d["delivered_rate"].get(size), d["cpu_per_1000"].get(size)
            parts.append(f"{_size(size)}: {_f(rate, '.0f')} msg/s delivered, {_f(cpu, '.2f')} CPU s/1000 msg")
        if d.get("peak_pss_mib") is not None:
            parts.append(f"peak PSS {d['peak_pss_mib']:.0f} MiB")
        lines.append(f"  {name:8} " + ("; ".join(parts) if parts else "-"))
    return "\n".join(lines)


# -- main -------------------------------------------------------------------


def _int_list(text: str, what: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{what}: comma-separated integers")
    if not values or min(values) < 1:
        p.error(f"{what}: positive integers")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="relaynet bench",
        description="Benchmark relaynet against private Postfix instances on the same work, "
        "alternating, on loopback (see bench/README.md). Needs root and Debian's postfix.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a look in a minute or two (explicit options still win)")
    p.add_argument("--rounds", type=int, help=f"runs per system and work item (default {DEFAULTS['rounds']})")
    p.add_argument("--messages", type=int,
                   help=f"messages per throughput run (default {DEFAULTS['messages']})")
    p.add_argument("--chain-messages", type=int,
                   help=f"messages per chain3 run (default {DEFAULTS['chain_messages']}; "
                   "with --quick or --messages alone: as --messages)")
    p.add_argument("--sizes", help=f"message sizes in bytes (default {DEFAULTS['sizes']})")
    p.add_argument("--sessions", help=f"concurrent smtp-source sessions (default {DEFAULTS['sessions']})")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"which of {','.join(SCENARIOS)} (default: {','.join(DEFAULT_SCENARIOS)}; "
                   "dkim only when named)")
    p.add_argument("--latency-messages", type=int,
                   help=f"messages per latency run (default {DEFAULTS['latency_messages']})")
    p.add_argument("--latency-rate", type=float,
                   help=f"messages per second in latency runs (default {DEFAULTS['latency_rate']:g})")
    p.add_argument("--latency-size", type=int,
                   help=f"message body bytes in latency runs (default {DEFAULTS['latency_size']})")
    p.add_argument("--warmup", type=int, help="unmeasured messages per system at start (default 200)")
    p.add_argument("--reuse-connection", action="store_true",
                   help="smtp-source -d: one connection per session instead of one per message")
    p.add_argument("--relaynet-backlog", type=int, metavar="N",
                   help="listen(2) backlog of the relaynet listeners (':backlog=N' in the endpoint); "
                   "default: the node's, 256")
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="[node] workers of every relaynet node: worker processes sharing its listeners, "
                   "each with a shard of the spool (default auto: one per usable CPU)")
    p.add_argument("--hopdown-size", type=int,
                   help=f"message bytes in the hopdown scenario (default {DEFAULTS['hopdown_size']})")
    p.add_argument("--hopdown-sessions", type=int,
                   help=f"smtp-source sessions in the hopdown scenario (default {DEFAULTS['hopdown_sessions']})")
    p.add_argument("--dkim-sessions", type=int,
                   help=f"smtp-source sessions in the dkim scenario (default {DEFAULTS['dkim_sessions']}; "
                   "its sizes are --sizes, its messages --messages)")
    p.add_argument("--dkim-keys", choices=tuple(DKIM_KEY_SETS), default="rsa",
                   help="the signing node's keys in the dkim scenario: rsa (RSA-2048, the default), "
                   "ed25519, or both (dual signing)")
    p.add_argument("--relaynet-processes", type=int, default=1, metavar="N",
                   help="relaynet nodes per hop, sharing its port (reuse_port = true), each with its "
                   "own spool: a node per core (default 1; figures are per hop, summed over its nodes)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="PSS sampling period of the rate runs, seconds (latency runs sample only before and after)")
    p.add_argument("--smtp-timeout", type=float, default=600, help="seconds allowed for one smtp-source run")
    p.add_argument("--drain-timeout", type=float, default=300,
                   help="seconds allowed for a run's mail to reach the sink and the queues to empty")
    p.add_argument("--max-minutes", type=float, default=45,
                   help="skip the remaining runs after this long (the report is still written)")
    p.add_argument("--json", metavar="PATH", help="raw results (default bench/results/bench-TIME.json)")
    p.add_argument("--png", metavar="PATH", help="chart (default: the JSON path with .png)")
    p.add_argument("--no-png", action="store_true", help="do not draw the chart")
    p.add_argument("--workdir", metavar="DIR", help="where instances live (default: a new temp dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory")
    p.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    args = p.parse_args(argv)
    explicit_messages = args.messages is not None
    explicit_chain = args.chain_messages is not None
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.sizes = _int_list(args.sizes, "--sizes", p) if isinstance(args.sizes, str) else args.sizes
    args.sessions = _int_list(args.sessions, "--sessions", p) if isinstance(args.sessions, str) else args.sessions
    if args.chain_messages is None or (args.quick or explicit_messages) and not explicit_chain:
        args.chain_messages = args.messages
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad or not args.scenarios:
        p.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    for name in ("rounds", "messages", "chain_messages", "latency_messages", "latency_size",
                 "relaynet_processes", "hopdown_size", "hopdown_sessions", "dkim_sessions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    args.workers = parse_workers(args.workers, p)
    if not 0 < args.latency_rate <= 1000:
        p.error("--latency-rate: between 0 and 1000")
    return args


def describe_workers(workers: int | str) -> str:
    """C{workers = "auto" (2 usable CPUs)} or C{workers = 2}: for the report's header."""
    if workers == "auto":
        return f'workers = "auto" ({usable_cpus()} usable CPUs)'
    return f"workers = {workers}"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size // 1024}K" if size % 1024 == 0 else str(size)


def row_label(r: dict) -> str:
    """A short name for a summary row, for the chart."""
    if r["section"] == "accept":
        bits = [r["metric"].replace(" rate", ""), "1 hop"]
    elif r["section"] == "chain3":
        bits = ["delivered", "3 hops"]
    elif r["section"] == "latency":
        bits = [f"latency {r['metric']}", f"{r['hops']} hop{'s' if r['hops'] > 1 else ''}"]
    elif r["section"] == "memory":
        bits = ["peak PSS", f"{r['hops']} hop{'s' if r['hops'] > 1 else ''}"]
    elif r["section"] == "hopdown":
        bits = [r["metric"].replace("accept rate, next hop", "accept, hop")]
    elif r["section"] == "dkim":
        bits = ["dkim", r["metric"].replace(" per 1000 msg", "/1000 msg")]
    else:
        bits = ["CPU/1000 msg", "1 hop" if r["hops"] == 1 else f"{r['hops']} hops"]
    if r["size"] and r["section"] != "latency":
        bits.append(_size(r["size"]))
    if r["sessions"]:
        bits.append(f"s={r['sessions']}")
    return " ".join(bits)


def draw_chart(path: Path, rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_rows = [r for r in rows if r["ratio"]]
    lat_rows = [r for r in rows if r["section"] == "latency"]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(5, 0.32 * len(ratio_rows) + 1.5)),
                             gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    labels, values, colors = [], [], []
    for r in ratio_rows:
        labels.append(row_label(r))
        values.append(r["ratio"])
        good = r["ratio"] >= 1 if r["better"] == "higher" else r["ratio"] <= 1
        colors.append("tab:green" if good else "tab:red")
    y = list(range(len(values)))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("relaynet / Postfix (median of rounds; green: relaynet better)")
    ax.set_title("Ratios")
    for yy, v in zip(y, values):
        ax.text(v, yy, f" {v:.2f}", va="center", fontsize=7)
    ax = axes[1]
    if lat_rows:
        groups = [f"{r['metric'].split()[-1]} {r['hops']} hop{'s' if r['hops'] > 1 else ''}" for r in lat_rows]
        x = list(range(len(groups)))
        w = 0.38
        for k, name in enumerate(SYSTEM_NAMES):
            vals = [r[name]["median"] or 0 for r in lat_rows]
            ax.bar([xx + (k - 0.5) * w for xx in x], vals, w, label=name)
        ax.set_xticks(x, groups)
        ax.set_ylabel("ms, final dot to arrival at the sink")
        ax.set_title(f"Latency at {args.latency_rate:g} msg/s")
        ax.legend()
    else:
        ax.axis("off")
    fig.suptitle(f"relaynet bench: relaynet vs Postfix, {args.rounds} alternating rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_describe() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        # Only the code the nodes run counts: relaynet/ and the twistd plugin.
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                                "--", "relaynet", "twisted"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `relaynet bench -- --quick`: the relaynet command passes the "--" on.
        argv = argv[1:]
    if argv[:1] == ["backlog"]:
        # `relaynet bench backlog ...`: the large-backlog scale test (relaynet only).
        from bench import backlog

        return backlog.main(argv[1:])
    args = parse_args(argv)
    groups = plan(args)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    factor = load_factor(load, cpus)
    est = estimate(groups, args) * factor
    runs_planned = sum(len(g["items"]) * _chains_in(g) for g in groups) * args.rounds
    log(f"relaynet bench: {runs_planned} runs ({args.rounds} rounds x 2 systems"
        + (", x2 for the next hop up and down in hopdown" if "hopdown" in args.scenarios else "")
        + ("; dkim: relaynet without and with signing" if "dkim" in args.scenarios else "") + "), "
        f"scenarios {','.join(args.scenarios)}; estimate: about {est / 60:.1f} min "
        f"(reference paces x{factor:.1f} for load average {load:.1f} on {cpus} CPUs; "
        f"refined from the measured pace after each run)")
    if args.estimate:
        print(f"{est / 60:.1f}")
        return 0
    log(f"relaynet nodes: {describe_workers(args.workers)}, {args.relaynet_processes} per hop")
    reason = postfix_unavailable_reason()
    if reason:
        log(f"cannot run: {reason}")
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else HERE / "results" / f"bench-{stamp}.json"
    png_path = None if args.no_png else (Path(args.png) if args.png else json_path.with_suffix(".png"))
    if args.workdir:
        workdir = Path(args.workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="relaynet-bench-"))
        temporary = not args.keep_workdir
    allow_postfix_search(workdir)
    log(f"workdir: {workdir}")
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    started = time.time()
    t0 = time.monotonic()
    environment = {
        "started": started, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "loadavg_start": os.getloadavg(),
        "relaynet_git": _git_describe(),
    }
    runs: list[dict] = []
    described: dict = {}
    revivals: list[dict] = []
    interrupted = None
    try:
        execute(groups, args, workdir, t0 + args.max_minutes * 60, runs, described, revivals)
    except PeerUnavailable as e:
        log(f"cannot run: {e}")
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = str(e) or "interrupted"
        log(f"interrupted: {interrupted}")
    except Exception as e:  # report what was measured before the failure
        import traceback

        traceback.print_exc()
        interrupted = f"error: {e}"
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    environment["loadavg_end"] = os.getloadavg()
    environment["relaynet_git_end"] = _git_describe()
    if environment["relaynet_git_end"] != environment["relaynet_git"]:
        log(f"warning: relaynet's code changed during the run ({environment['relaynet_git']} -> "
            f"{environment['relaynet_git_end']}); nodes started at different times may differ")
    rows = summarize(runs, args)
    table = format_table(rows) if rows else ""
    if table:
        print()
        print(f"relaynet bench: medians of {args.rounds} alternating rounds; "
              f"{args.messages} messages per accept run, {args.chain_messages} per chain3 run, "
              f"{args.latency_messages} at {args.latency_rate:g} msg/s per latency run; "
              + ("one connection per session" if args.reuse_connection else "one connection per message")
              + f"; relaynet nodes with {describe_workers(args.workers)}"
              + (f", {args.relaynet_processes} nodes per hop" if args.relaynet_processes > 1 else ""))
        print(table)
    dkim = None
    if "dkim" in args.scenarios:
        dkim_rows, signing = dkim_summary(runs, args), dkim_signing(runs)
        dkim = {"keys": args.dkim_keys, "sender": DKIM_SENDER, "rows": dkim_rows, "signing": signing,
                "table": format_dkim(dkim_rows, signing, args)}
        print()
        print(dkim["table"])
    size_figures = sizing(rows)
    if any(d["delivered_rate"] or d["cpu_per_1000"] for d in size_figures.values()):
        print()
        print(format_sizing(size_figures))
    for r in revivals:
        print(f"\nwarning: {r['chain']}: node(s) {', '.join(r['nodes'])} had stopped and were started again "
              f"at {time.strftime('%H:%M:%S', time.gmtime(r['time']))} UTC ({'; '.join(r['log']) or 'no reason logged'})")
    print(f"\nelapsed {elapsed / 60:.1f} min (first estimate {est / 60:.1f}); "
          f"load average {environment['loadavg_start'][0]:.2f} at start, {environment['loadavg_end'][0]:.2f} at end")
    result = {
        "parameters": {k: v for k, v in vars(args).items() if k not in ("json", "png")},
        "environment": environment,
        "estimate_seconds": est,
        "elapsed_seconds": elapsed,
        "interrupted": interrupted,
        "nodes_restarted": revivals,
        "systems": described,
        "summary": rows,
        "sizing": size_figures,
        "table": table,
        "dkim": dkim,
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"raw results: {json_path}")
    if png_path is not None and not any(r["ratio"] for r in rows) \
            and not any(r["section"] == "latency" for r in rows):
        log("no relaynet/Postfix figures (dkim only): no chart drawn")
        png_path = None
    if png_path is not None:
        try:
            draw_chart(png_path, rows, args)
            print(f"chart: {png_path}")
        except ImportError:
            log("matplotlib is not installed (pip install -e '.[bench]'): no chart drawn")
    failed = interrupted is not None or any(r.get("error") or r.get("skipped") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
