# -*- test-case-name: tests.test_lab -*-
"""
C{make demo}: bring up the C{chain3} lab (four real C{twistd} nodes, each on
its own loopback address), send a batch of messages through it, trace one of
them across every hop, show each node's status, draw the topology as SVG,
check that every acknowledged message was delivered exactly once, and tear
the lab down and remove its directory (C{--keep} leaves it running and says
how to stop it).

Every step is a C{relaynet lab} command, printed before it runs the way it
can be pasted here (L{relaynet.hints}), so the demo doubles as a walk
through C{docs/lab.md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "chain3.toml"


def _run(*args: str | Path) -> int:
    from relaynet.cli import main as relaynet
    from relaynet.hints import command

    print(f"\n$ {command(*args)}", flush=True)
    return relaynet([str(a) for a in args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relaynet.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="var/lab/chain3", help="lab directory (default var/lab/chain3)")
    parser.add_argument("--topology", default=str(TOPOLOGY), help="topology file (default chain3)")
    parser.add_argument("-n", "--count", type=int, default=100, help="messages to send (default 100)")
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    args = parser.parse_args(argv)
    if not Path(args.topology).exists():
        print(f"demo: {args.topology} not found (run from a source checkout)", file=sys.stderr)
        return 1

    where: list[str | Path] = ["--dir", Path(args.dir)]
    topology = Path(args.topology)
    picture = Path(args.dir).parent / f"{Path(args.dir).name}-demo.svg"
    from relaynet.lab.state import Lab

    old = Lab(args.dir)
    if old.exists():
        old.load()
        if not any(old.alive(n) for n in old.nodes):
            # A lab from an earlier demo, stopped: start afresh rather than
            # mixing its messages into this run's numbers.
            _run("lab", "down", *where, "--clean")
    if _run("lab", "up", topology, *where) != 0:
        return 1
    failed = 0
    try:
        failed |= _run("lab", "send", *where, "-n", str(args.count), "--wait", "60")
        failed |= _run("lab", "trace", *where, "--last")
        failed |= _run("lab", "status", *where)
        failed |= _run("lab", "draw", *where, "-o", picture)
        failed |= _run("lab", "check", *where, "--wait", "30")
    finally:
        if args.keep:
            from relaynet.hints import command

            print("\ndemo: the lab is still running; try:")
            print(f"  $ {command('lab', 'chaos', *where, '--duration', '5', '--send', '150', '--rate', '30')}")
            print(f"  $ {command('lab', 'check', *where, '--wait', '30')}")
            print("stop it (and remove its directory) with:")
            print(f"  $ {command('lab', 'down', *where, '--clean')}")
        else:
            # Leave no lab behind: a later 'lab up' starts afresh, and
            # commands without --dir do not have to choose.
            _run("lab", "down", *where, "--clean")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
