# -*- test-case-name: tests.test_cli -*-
"""
The C{relaynet} command.

    relaynet check-config [FILE]   validate a node config, print the effective one
    relaynet version
"""

from __future__ import annotations

import argparse
import sys

from relaynet import __version__
from relaynet.config import ConfigError, describe, load_config


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(describe(config))
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"relaynet {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the C{relaynet} command."""
    parser = argparse.ArgumentParser(
        prog="relaynet", description="relaynet: a store-and-forward SMTP relay network."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "check-config", help="validate a node config and print the effective configuration"
    )
    p.add_argument("file", nargs="?", help="node config (TOML); omitted: the embedded default")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the C{relaynet} console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
