# -*- test-case-name: tests.test_soak -*-
"""
The arguments of C{relaynet lab soak}, apart from the soak itself
(L{relaynet.lab.soak}): building C{relaynet}'s parser must not import the
lab's control and DNS code, which every C{relaynet} command would pay for
(0.25 s of C{relaynet queue}'s start-up).
"""

from __future__ import annotations

import argparse
from typing import Any

FAULT_KINDS = ("kill", "power", "disk", "link")
"""The kinds of fault a soak can inject."""


def _fault_list(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {', '.join(bad)} (known: {', '.join(FAULT_KINDS)})")
    return kinds


def _soak(args: argparse.Namespace) -> int:
    from relaynet.lab.soak import soak_command

    return soak_command(args)


def add_soak_parser(lab_subparsers: Any) -> None:
    """
    Register C{relaynet lab soak} on the subparsers of C{relaynet lab}
    (C{relaynet.lab.cli.add_lab_parser} calls it).
    """
    from relaynet.lab.cli import (
        _guard,
        _number,
        _positive_int,
        _positive_seconds,
        _seconds,
    )

    s = lab_subparsers.add_parser(
        "soak", help="steady mixed load under a seeded fault schedule, then drain and check: a self-checking soak")
    s.add_argument("topology", help="topology file (TOML), e.g. topologies/chain3.toml")
    s.add_argument("--minutes", type=_number(float, 0, strict=True), default=10.0,
                   help="minutes of load and faults (default 10), before the drain")
    s.add_argument("--dir", help="lab directory (default ./var/lab/<topology name>, as lab up)")
    s.add_argument("--netns", action="store_true", help="start the lab with --netns (needed for link faults)")
    s.add_argument("--power-fs", action="store_true", help="start the lab with --power-fs (power and disk faults)")
    s.add_argument("--rate", type=_positive_seconds, default=1.0, help="messages per second (default 1)")
    s.add_argument("-c", "--concurrency", type=_positive_int, default=4, help="SMTP sessions (default 4)")
    s.add_argument("--seed", type=int, default=None, help="random seed: replays the load and the fault schedule")
    s.add_argument("--faults", type=_fault_list, default=FAULT_KINDS, metavar="KINDS",
                   help="comma-separated fault kinds: kill,power,disk,link (default all; those the lab"
                        " cannot do are skipped with one line)")
    s.add_argument("--target", action="append", metavar="NODE",
                   help="node faults may hit (repeatable; default every node but the entry)")
    s.add_argument("--interval", type=_seconds, nargs=2, metavar=("MIN", "MAX"),
                   help="seconds between faults (default 20 40)")
    s.add_argument("--down", type=_seconds, nargs=2, metavar=("MIN", "MAX"),
                   help="seconds a node stays dead, a link cut, a disk full (default 1 5)")
    s.add_argument("--drain", type=_seconds, default=300.0, metavar="S",
                   help="at most S seconds to wait for the queues to empty after the load (default 300)")
    s.add_argument("--defer-window", type=_positive_seconds, default=30.0, metavar="S",
                   help="the last hop defers soak-defer.DOMAIN for S seconds, then delivers it for S, ... (default 30)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.epilog = ("exit status: 0 only when nothing is lost, duplicated or in flight after the drain and every"
                " bounce was expected; 1 otherwise. The report also goes to <labdir>/soak-RUN.json")
    s.set_defaults(func=_guard(_soak))
