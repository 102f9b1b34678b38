# -*- test-case-name: tests.test_lab -*-
"""
C{relaynet lab ...}: run a relay network described by a topology file as real
processes on loopback, drive it, watch it, break it.

    relaynet lab up TOPOLOGY [--dir D] [--netns] [--power-fs]
                                                    start (or reattach to) a lab
    relaynet lab status [--json]                    per node: queue, counts, sessions
    relaynet lab send [-n N] [--from NODE] ...      submit N messages, record what was acknowledged
    relaynet lab trace MESSAGE-ID | --last          the path of one message, hop by hop
    relaynet lab check [--wait S]                   every acknowledged message delivered once?
    relaynet lab chaos [--duration S] ...           kill -9 / restart nodes, cut links (netns) or power (--power-cut)
    relaynet lab draw [-o FILE]                     SVG picture with per-link counts and latencies
    relaynet lab soak TOPOLOGY --minutes M          mixed load under faults, drain, check, report
    relaynet lab down [--clean]                     stop every node (and remove the lab with --clean)

Commands after C{up} find the lab by C{--dir}, by C{--lab NAME}
(C{./var/lab/NAME}), or as the only lab under C{./var/lab}. See C{docs/lab.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from relaynet.config import ConfigError
from relaynet.hints import command
from relaynet.lab.state import Lab, LabError, spool_on_disk


def _err(msg: str) -> None:
    print(f"relaynet lab: {msg}", file=sys.stderr)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _lab(args: argparse.Namespace) -> Lab:
    from relaynet.lab.control import open_lab

    if getattr(args, "lab", None) and not args.dir:
        return open_lab(Path("var") / "lab" / args.lab)
    return open_lab(args.dir, say=_say)


def _require_running(lab: Lab, names: list[str] | None = None) -> None:
    """
    @raise LabError: the lab is down (or node C{names} are), with the command
        that starts it.
    """
    down = [n for n in (names or list(lab.nodes)) if not lab.alive(n)]
    if not down:
        return
    start = command("lab", "up", Path(lab.data.get("topology", "TOPOLOGY")), "--dir", lab.dir)
    if not any(lab.alive(n) for n in lab.nodes):
        raise LabError(f"lab {lab.name} is down: start it with: {start}")
    raise LabError(f"node(s) {', '.join(down)} of lab {lab.name} are down: start them with: {start}")


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (LabError, ConfigError) as e:
            _err(str(e))
            return 1
        except OSError as e:
            # A file named on the command line or in the lab that cannot be
            # read or written: say which, in one line.
            _err(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
            return 1
        except KeyboardInterrupt:
            _err("interrupted")
            return 130
        except BrokenPipeError:
            # The reader went away (e.g. "| head"): not an error of ours.
            sys.stderr.close()
            return 0
        except Exception as e:
            # Still one line, never a traceback (RELAYNET_TRACEBACK=1 shows it).
            if os.environ.get("RELAYNET_TRACEBACK"):
                raise
            _err(f"unexpected error: {type(e).__name__}: {e} (RELAYNET_TRACEBACK=1 shows where)")
            return 1
    return run


class _OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are one line on stderr (usage is behind C{-h})."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} -h)\n")


def _number(kind: type, low: float, strict: bool) -> Any:
    """An argparse type: a number of C{kind} above (C{strict}) or at least C{low}."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value != value or value < low or (strict and value == low) or value in (float("inf"),):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'above' if strict else 'at least'} {low:g}")
        return value
    parse.__name__ = kind.__name__
    return parse


_count = _number(int, 0, strict=False)
_positive_int = _number(int, 0, strict=True)
_seconds = _number(float, 0, strict=False)
_positive_seconds = _number(float, 0, strict=True)


def _ranges(args: argparse.Namespace) -> None:
    for name in ("interval", "down"):
        pair = getattr(args, name, None)
        if pair and pair[0] > pair[1]:
            raise LabError(f"--{name} {pair[0]:g} {pair[1]:g}: MIN is above MAX")


# -- up / down ---------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from relaynet.lab import control

    power_fs = args.power_fs
    if power_fs is None:
        # Neither --power-fs nor --no-power-fs: a lab keeps the mode it ran in.
        from relaynet.lab.topology import load_topology

        where = Lab(args.dir if args.dir is not None else Path("var") / "lab" / load_topology(args.topology).name)
        power_fs = bool(where.exists() and where.load().data.get("power_fs"))
    t0 = time.monotonic()
    lab, what = control.up(args.topology, args.dir, use_netns=args.netns, timeout=args.timeout,
                           say=_say, power_fs=power_fs)
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps({"lab": lab.name, "dir": str(lab.dir), "result": what, "seconds": round(took, 3),
                          "nodes": _node_summaries(lab)}, indent=2))
        return 0
    verb = {
        "started": "is up", "reattached": "was already up: reattached (nothing started)",
        "restarted all": "was down: started every node again (configs and spools kept)",
    }.get(what, f"was partly down: {what}")
    print(f"lab {lab.name} {verb} in {took:.2f}s  (dir {lab.dir})"
          + ("; spools on powerfs: 'lab chaos --power-cut' cuts power" if lab.data.get("power_fs") else ""))
    print(control.table(lab))
    from relaynet.lab.traffic import read_sent

    earlier = len(read_sent(lab.sent_path)) if what != "reattached" else 0
    if earlier:
        print(f"{lab.sent_path.name} already lists {earlier} message(s) of earlier runs: 'lab check' verifies"
              " them too; to start afresh instead:")
        print(f"  $ {command('lab', 'down', '--clean', '--dir', lab.dir)}")
        print(f"  $ {command('lab', 'up', Path(args.topology), '--dir', lab.dir)}")
    print("next:")
    print(f"  $ {command('lab', 'send', '--dir', lab.dir)}")
    print(f"  $ {command('lab', 'down', '--dir', lab.dir)}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from relaynet.lab import control

    lab = _lab(args)
    for line in control.down(lab, clean=args.clean, say=_say):
        print(line)
    return 0


# -- status ------------------------------------------------------------------


def _node_summaries(lab: Lab) -> list[dict[str, Any]]:
    out = []
    for name, rec in lab.nodes.items():
        running = lab.alive(name)
        out.append({
            "name": name, "role": rec.get("role"), "address": rec["address"],
            "ports": rec["ports"], "modes": rec.get("modes"),
            "smtp": [f"{rec['address']}:{p}" for p in rec["ports"]],
            "netns": rec.get("netns"), "link_addresses": rec.get("link_addresses", {}),
            "pid": rec.get("pid") if running else None, "running": running,
            "dirs": {k: rec[k] for k in ("dir", "config", "spool", "mailroot", "events", "log", "pidfile")},
        })
    return out


def status_data(lab: Lab) -> dict[str, Any]:
    """Everything C{lab status --json} prints."""
    from relaynet.lab.observe import event_counts, queue_counts, read_events, sessions

    nodes = []
    for summary in _node_summaries(lab):
        rec = lab.nodes[summary["name"]]
        counts = event_counts(read_events(rec["events"]))
        summary.update({
            "queue": queue_counts(spool_on_disk(rec)),
            "events": counts,
            "delivered": counts["delivered"],
            "relayed": counts["sent"],
            "bounced": counts["bounced"],
            "sessions": sessions(summary["pid"], rec["ports"]),
        })
        nodes.append(summary)
    return {
        "lab": lab.name, "dir": str(lab.dir), "topology": lab.data.get("topology"),
        "netns": bool(lab.data.get("netns")), "created": lab.data.get("created"),
        "nodes": nodes, "links": lab.data.get("links", []),
        "sent": str(lab.sent_path),
    }


def _status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    data = status_data(lab)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("node", "pid", "smtp", "active", "deferred", "held", "received", "relayed",
             "delivered", "bounced", "attempts failed", "sessions in/out")]
    for n in data["nodes"]:
        q, e, s = n["queue"], n["events"], n["sessions"]
        rows.append((
            n["name"], str(n["pid"]) if n["running"] else "DOWN",
            ("netns " if n["netns"] else "") + n["smtp"][0],
            str(q["active"]), str(q["deferred"]), str(q["held"]), str(e["received"]), str(e["sent"]),
            str(e["delivered"]), str(e["bounced"]), str(e["deferred"]),
            f"{s['inbound']}/{s['outbound']}" if s else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"lab {data['lab']} in {data['dir']}" + (" (netns)" if data["netns"] else ""))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    cut = [f"{lk['a']}-{lk['b']}" for lk in data["links"] if not lk.get("up", True)]
    if cut:
        print("cut links: " + ", ".join(cut))
    return 0


# -- send --------------------------------------------------------------------


def _send_args(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    t = lab.data.get("traffic", {})
    entry = args.entry or t.get("from") or [next(iter(lab.nodes))]
    for e in entry:
        lab.node(e)
    recipients = args.to or t.get("recipients")
    if not recipients:
        raise LabError("no recipients: give --to ADDRESS")
    return {
        "count": args.count if args.count is not None else int(t.get("count", 100)),
        "entry": entry,
        "sender": args.sender or t.get("sender", "lab@lab.test"),
        "recipients": recipients,
        "size": args.size if args.size is not None else int(t.get("size", 2048)),
        "concurrency": args.concurrency if args.concurrency is not None else int(t.get("concurrency", 8)),
        "rotate": args.rotate or bool(t.get("rotate", False)),
        "rate": args.rate,
        "duration": args.duration,
    }


def _port_index(lab: Lab, entry: list[str], mode: str) -> int:
    indexes = {_mode_index(lab, e, mode) for e in entry}
    if len(indexes) > 1:
        raise LabError(f"the {mode} listeners of {', '.join(entry)} are not in the same place: "
                       "send to one node at a time")
    return indexes.pop()


def _mode_index(lab: Lab, node: str, mode: str) -> int:
    rec = lab.node(node)
    modes = rec.get("modes", ["relay"])
    if mode not in modes:
        raise LabError(f"node {node} has no {mode} listener (it has: {', '.join(modes)})")
    return int(modes.index(mode))


def submit_address(lab: Lab, node: str, mode: str = "relay") -> str:
    """
    C{host:port} of node C{node}'s listener of C{mode}: where C{lab send --port
    MODE} connects.

    @raise LabError: no such node, or it has no such listener.
    """
    rec = lab.node(node)
    return f"{rec['address']}:{rec['ports'][_mode_index(lab, node, mode)]}"


def run_send(lab: Lab, params: dict[str, Any], progress: bool, port_mode: str = "relay",
             login: tuple[str, str] | None = None, starttls: bool = False,
             stop: threading.Event | None = None) -> Any:
    """Run C{lab send} with resolved parameters; @return: its L{SendSummary}."""
    from relaynet.lab.traffic import Progress, send

    bar = Progress(params["count"], enabled=None if progress else False)
    return send(
        lab.nodes, lab.sent_path, lab_name=lab.name, progress=bar, stop=stop,
        port_index=_port_index(lab, params["entry"], port_mode), login=login, starttls=starttls,
        **params,
    )


def _send(args: argparse.Namespace) -> int:
    from relaynet.lab import check
    from relaynet.lab.observe import EventIndex, lab_events
    from relaynet.lab.traffic import percentile, read_sent

    lab = _lab(args)
    params = _send_args(lab, args)
    login = (args.user, args.password) if args.user else None
    if args.user and args.password is None:
        raise LabError("--user needs --password")
    _require_running(lab, params["entry"])
    where = ", ".join(f"{e} ({submit_address(lab, e, args.port)})" for e in params["entry"])
    if not args.json:
        _say(f"sending {params['count']} message(s) of {params['size']} bytes to {where}, "
             f"{params['concurrency']} session(s), from <{params['sender']}> to "
             f"{', '.join(params['recipients'])}{' (in turn)' if params['rotate'] else ''}")
    s = run_send(lab, params, progress=not args.no_progress and not args.json, port_mode=args.port,
                 login=login, starttls=args.starttls)
    result: dict[str, Any] = s.to_json()
    if args.wait:
        waited = check.wait_settled(lab.nodes, args.wait)
        ours = {r["message_id"]: float(r["start"]) for r in read_sent(lab.sent_path) if r.get("run") == s.run}
        lat = check.delivery_latencies(EventIndex(lab_events(lab.nodes), lab.endpoint_map()), ours)
        result.update({"waited": round(waited, 3), "delivered": len(lat),
                       "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99)})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"run {s.run}: {s.accepted} accepted, {s.refused} refused, {s.failed} failed"
              f" of {s.requested} in {s.seconds:.2f}s: {s.rate:.1f} msg/s accepted")
        if result.get("accept_latency_p50") is not None:
            print(f"time to 250: p50 {result['accept_latency_p50'] * 1000:.1f} ms,"
                  f" p99 {result['accept_latency_p99'] * 1000:.1f} ms")
        for err, n in sorted(s.errors.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {n} x {err}")
        if args.wait:
            if result["latency_p50"] is not None:
                print(f"delivered {result['delivered']} (waited {result['waited']:.2f}s): end-to-end latency"
                      f" p50 {result['latency_p50']:.3f}s, p99 {result['latency_p99']:.3f}s")
            else:
                print(f"nothing of this run delivered yet (waited {result['waited']:.2f}s)")
        print(f"recorded in {lab.sent_path}; verify with:")
        print(f"  $ {command('lab', 'check', '--dir', lab.dir)}")
    return 0 if s.accepted or not s.requested else 1


# -- trace -------------------------------------------------------------------


def _trace(args: argparse.Namespace) -> int:
    from relaynet.lab.observe import EventIndex, format_trace, lab_events, normalise_message_id, trace
    from relaynet.lab.traffic import read_sent

    lab = _lab(args)
    if args.message_id:
        mid = normalise_message_id(args.message_id)
    else:
        sent = read_sent(lab.sent_path)
        if not sent:
            raise LabError(f"nothing sent yet ({lab.sent_path} is empty): give a MESSAGE-ID")
        mid = sent[0 if args.first else -1]["message_id"]
    index = EventIndex(lab_events(lab.nodes), lab.endpoint_map())
    rows = trace(index, mid)
    if args.json:
        print(json.dumps({"message_id": mid, "hops": [r.to_json() for r in rows]}, indent=2))
    else:
        print(format_trace(mid, rows))
    return 0 if rows else 1


# -- check -------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from relaynet.lab import check
    from relaynet.lab.observe import EventIndex, lab_events
    from relaynet.lab.traffic import read_sent

    lab = _lab(args)
    sent = read_sent(lab.sent_path)
    start = command("lab", "up", Path(lab.data.get("topology", "TOPOLOGY")), "--dir", lab.dir)
    waited = 0.0
    if args.wait:
        stopped = [n for n in lab.nodes if not lab.alive(n)]
        held = {n: k for n, k in check.collect({n: lab.nodes[n] for n in stopped}, stopped)
                .queued_per_node().items() if k}
        if held:
            _say("waiting up to {:g}s, but stopped node(s) hold mail: {}; it moves only once they are"
                 " started: {}".format(args.wait, ", ".join(f"{n} ({k} message(s))" for n, k in held.items()),
                                       start))
        waited = check.wait_settled(lab.nodes, args.wait)
    stopped = [n for n in lab.nodes if not lab.alive(n)]
    ev = check.collect(lab.nodes, stopped)
    report = check.verify(sent, ev, EventIndex(lab_events(lab.nodes), lab.endpoint_map()))
    report.waited = waited
    report.allow_duplicates = args.allow_duplicates
    from relaynet.lab.dkimcheck import check_lab

    report.dkim = check_lab(lab.nodes, lab.data.get("dns"))
    report.tls_used = check.tls_used(lab.nodes)
    if report.stopped:
        report.start_command = start
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        waiting = ""
        if args.wait:
            settled = "queues empty" if check.busy_count(lab.nodes) == 0 else "queues still busy"
            waiting = f" (waited {waited:.2f}s: {settled})"
        print(f"lab {lab.name}: checked {lab.sent_path}{waiting}")
        print(report.format())
    return 0 if report.ok else 1


# -- chaos -------------------------------------------------------------------


def _chaos(args: argparse.Namespace) -> int:
    from relaynet.lab import chaos

    _ranges(args)
    lab = _lab(args)
    _require_running(lab)
    c = lab.data.get("chaos", {})
    links = args.links or (bool(c.get("links")) and bool(lab.data.get("netns")) and not args.power_cut)
    if args.power_cut and not lab.data.get("power_fs"):
        raise LabError(
            f"--power-cut needs a lab started with --power-fs: stop it ({command('lab', 'down', '--dir', lab.dir)})"
            f" and start it with {command('lab', 'up', Path(lab.data.get('topology', 'TOPOLOGY')), '--dir', lab.dir, '--power-fs')}"
        )
    plan = chaos.ChaosPlan(
        targets=args.target or c.get("targets") or [],
        duration=args.duration if args.duration is not None else float(c.get("duration", 15.0)),
        interval=tuple(args.interval) if args.interval else tuple(c.get("interval", (1.0, 3.0))),
        down=tuple(args.down) if args.down else tuple(c.get("down", (0.5, 2.0))),
        restart=False if args.no_restart else bool(c.get("restart", True)),
        max_actions=args.max_actions if args.max_actions is not None else int(c.get("max_actions", 0)),
        start_after=args.start_after if args.start_after is not None else float(c.get("start_after", 0.0)),
        links=links,
        power_cut=args.power_cut,
    )
    if not plan.targets and not plan.links:
        plan.targets = [n for n in lab.nodes if n not in lab.data.get("traffic", {}).get("from", [])]
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    stop = threading.Event()
    traffic: dict[str, Any] = {}
    sender = None
    if args.send:
        params = _send_args(lab, argparse.Namespace(
            entry=None, to=None, sender=None, size=None, concurrency=args.concurrency, rotate=False,
            count=args.send, rate=args.rate, duration=plan.duration,
        ))

        def drive() -> None:
            traffic["summary"] = run_send(lab, params, progress=False, stop=stop)

        sender = threading.Thread(target=drive, name="chaos-traffic", daemon=True)
        sender.start()
    what = f"links of {', '.join(plan.targets) or 'every node'}" if plan.links else ", ".join(plan.targets)
    _say(f"chaos for {plan.duration:.0f}s on {what} (seed {seed})")
    try:
        log = chaos.run(lab, plan, rng, stop=stop, say=_say)
    finally:
        stop.set()
        if sender is not None:
            sender.join(120)
    kills, cuts, power = log.count("kill -9"), log.count("cut"), log.count("power cut")
    undone = sum(int(a.get("undone", 0)) for a in log.actions if a["action"] == "power cut")
    print(f"chaos done: {kills} kill -9, " + (f"{power} power cut(s) ({undone} unsynced operation(s) undone), "
                                              if plan.power_cut else "")
          + f"{log.count('restart')} restart(s), {cuts} link cut(s),"
          f" {log.count('restore')} restored; log {lab.chaos_path}")
    kills += power
    if not plan.restart and kills:
        print("killed nodes were left down; restart them with:")
        print(f"  $ {command('lab', 'up', Path(lab.data.get('topology', 'TOPOLOGY')), '--dir', lab.dir)}")
    if "summary" in traffic:
        s = traffic["summary"]
        unsent = s.requested - s.accepted - s.refused - s.failed
        print(f"traffic: {s.accepted} accepted, {s.refused} refused, {s.failed} failed of {s.requested}"
              f" ({s.rate:.1f} msg/s)" + (f"; {unsent} not sent: chaos ended first (--duration)" if unsent > 0 else ""))
    return 0


# -- draw --------------------------------------------------------------------


def _draw(args: argparse.Namespace) -> int:
    from relaynet.lab.draw import render
    from relaynet.lab.observe import EventIndex, lab_events, link_stats

    lab = _lab(args)
    index = EventIndex(lab_events(lab.nodes), lab.endpoint_map())
    stats = link_stats(index)
    svg = render(
        f"lab {lab.name}" + (f": {lab.data['description']}" if lab.data.get("description") else ""),
        lab.nodes, lab.data.get("links", []), stats,
        entry=lab.data.get("traffic", {}).get("from", []), layout=lab.data.get("layout", "layers"),
        alive={n: lab.alive(n) for n in lab.nodes},
    )
    out = Path(args.output) if args.output else lab.dir / "topology.svg"
    out.write_text(svg, "utf-8")
    for s in stats:
        delay = f"{s.median_delay * 1000:.1f} ms" if s.median_delay is not None else "-"
        print(f"{s.src} -> {s.dst}: {s.count} relayed, median delay {delay}"
              + (f", {s.deferred} failed attempt(s)" if s.deferred else ""))
    print(f"wrote {out}")
    return 0


# -- parser ------------------------------------------------------------------


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help="the lab directory (default: the only lab under ./var/lab)")
    p.add_argument("--lab", help="the lab's name: same as --dir var/lab/NAME")


def add_lab_parser(sub: Any) -> None:
    """Register C{relaynet lab} and its subcommands on C{sub}."""
    p = sub.add_parser("lab", help="run and drive lab topologies (see topologies/ and docs/lab.md)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    p.error = _OneLineParser.error.__get__(p)
    lab = p.add_subparsers(dest="lab_command", metavar="LAB-COMMAND", parser_class=_OneLineParser)

    s = lab.add_parser("up", help="start every node of a topology (or reattach to a running lab)")
    s.add_argument("topology", help="topology file (TOML), e.g. topologies/chain3.toml")
    s.add_argument("--dir", help="lab directory (default ./var/lab/<topology name>)")
    s.add_argument("--netns", action="store_true",
                   help="one network namespace per node, joined by veth links (root and iproute2)")
    s.add_argument("--power-fs", dest="power_fs", action="store_true", default=None,
                   help="each node's spool on powerfs, a FUSE file system that can lose power"
                        " ('lab chaos --power-cut'; /dev/fuse and fusermount3); kept at later 'lab up's")
    s.add_argument("--no-power-fs", dest="power_fs", action="store_false",
                   help="a lab that ran with --power-fs: run it without (spools are kept)")
    s.add_argument("--timeout", type=_positive_seconds, default=30.0, help="seconds to wait for every EHLO (default 30)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_guard(_up))

    s = lab.add_parser("status", help="per node: pid, queue by state, delivered, bounced, live sessions")
    _where(s)
    s.add_argument("--json", action="store_true", help="the same plus addresses, ports, pids and dirs, as JSON")
    s.set_defaults(func=_guard(_status))

    s = lab.add_parser("send", help="submit N messages; record those acknowledged for 'lab check'")
    _where(s)
    s.add_argument("-n", "--count", type=_count, help="messages to send (default from the topology, else 100)")
    s.add_argument("--size", type=_positive_int, help="bytes per message, headers included (default 2048)")
    s.add_argument("-c", "--concurrency", type=_positive_int, help="SMTP sessions in parallel (default 8)")
    s.add_argument("--from", dest="entry", action="append", metavar="NODE",
                   help="node to submit to (repeat: taken in turn; default from the topology)")
    s.add_argument("--sender", help="envelope sender")
    s.add_argument("--to", action="append", metavar="ADDRESS", help="recipient (repeatable)")
    s.add_argument("--rotate", action="store_true", help="each message to one recipient, in turn")
    s.add_argument("--rate", type=_seconds, default=0.0, help="at most this many messages per second")
    s.add_argument("--duration", type=_seconds, default=0.0, help="stop starting messages after S seconds")
    s.add_argument("--wait", type=_seconds, default=0.0, metavar="S",
                   help="then wait up to S seconds for delivery and print end-to-end latency")
    s.add_argument("--port", default="relay", help="listener mode to submit to: relay (default), submission")
    s.add_argument("--user", help="SMTP AUTH user (implies STARTTLS)")
    s.add_argument("--password", help="SMTP AUTH password")
    s.add_argument("--starttls", action="store_true", help="STARTTLS before sending")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_guard(_send))

    s = lab.add_parser("trace", help="the path of one message, hop by hop, from every node's event log")
    _where(s)
    s.add_argument("message_id", nargs="?", help="Message-ID (with or without <>)")
    s.add_argument("--last", action="store_true", help="the last message 'lab send' recorded (the default)")
    s.add_argument("--first", action="store_true", help="the first message 'lab send' recorded")
    s.add_argument("--json", action="store_true", help="print the hops as JSON")
    s.set_defaults(func=_guard(_trace))

    s = lab.add_parser("check", help="was every acknowledged message delivered (or bounced) exactly once?")
    _where(s)
    s.add_argument("--wait", type=_seconds, default=0.0, metavar="S",
                   help="first wait up to S seconds for every queue to empty (stopped nodes' too)")
    s.add_argument("--allow-duplicates", action="store_true",
                   help="exit 0 despite duplicates (at-least-once after crashes)")
    s.epilog = ("exit status: 0 only when nothing is lost, duplicated (unless --allow-duplicates)"
                " or in flight; 1 otherwise")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=_guard(_check))

    s = lab.add_parser("chaos", help="kill -9 and restart random nodes, or cut links (netns), for a while")
    _where(s)
    s.add_argument("--duration", type=_seconds, help="seconds (default from the topology, else 15)")
    s.add_argument("--target", action="append", metavar="NODE",
                   help="node that may be killed (repeatable; default from the topology)")
    s.add_argument("--interval", type=_seconds, nargs=2, metavar=("MIN", "MAX"), help="seconds between actions")
    s.add_argument("--down", type=_seconds, nargs=2, metavar=("MIN", "MAX"), help="seconds a node/link stays down")
    s.add_argument("--no-restart", action="store_true", help="leave killed nodes down")
    s.add_argument("--max-actions", type=_count, help="at most this many kills/cuts")
    s.add_argument("--start-after", type=_seconds, help="seconds before the first action")
    s.add_argument("--links", action="store_true", help="cut and restore links instead (needs lab up --netns)")
    s.add_argument("--power-cut", action="store_true",
                   help="cut the power of nodes instead: kill -9, drop what their spool had not fsynced,"
                        " restart (needs lab up --power-fs)")
    s.add_argument("--seed", type=int, default=None, help="random seed (replays a schedule)")
    s.add_argument("--send", type=_count, default=0, metavar="N",
                   help="also send N messages meanwhile (topology's traffic defaults)")
    s.add_argument("--rate", type=_seconds, default=0.0, help="with --send: messages per second")
    s.add_argument("-c", "--concurrency", type=_positive_int, help="with --send: SMTP sessions")
    s.set_defaults(func=_guard(_chaos))

    s = lab.add_parser("draw", help="write the topology as SVG, links labelled with counts and latencies")
    _where(s)
    s.add_argument("-o", "--output", help="SVG file (default <labdir>/topology.svg)")
    s.set_defaults(func=_guard(_draw))

    from relaynet.lab.soakcli import add_soak_parser

    add_soak_parser(lab)

    s = lab.add_parser("down", help="stop every node (SIGTERM, then SIGKILL), remove namespaces, unmount powerfs")
    _where(s)
    s.add_argument("--clean", action="store_true", help="also delete the lab directory")
    s.set_defaults(func=_guard(_down))
