# -*- test-case-name: tests.test_lab -*-
"""
C{relaynet lab ...} subcommands.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_lab_parser(sub: Any) -> None:
    """Register C{relaynet lab} and its subcommands on C{sub}."""
    p = sub.add_parser("lab", help="run and drive lab topologies (see topologies/)")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    p.add_subparsers(dest="lab_command", metavar="LAB-COMMAND")


def _unused(args: argparse.Namespace) -> int:
    return 0
