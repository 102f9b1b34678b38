# -*- test-case-name: tests.test_suppression -*-
"""
C{relaynet suppress}: the suppression list of a running node, through its
admin API (C{/api/suppression}, C{docs/admin-api.md}); changes apply at
once, no restart. The usage is in L{DESCRIPTION}; the formats in
C{docs/suppression.md}.

Like C{relaynet queue} (L{relaynet.admin.queuecli}, whose client it uses),
only the standard library talks HTTP here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, TextIO

from relaynet.admin.queuecli import AdminClient, AdminError, admin_endpoint_of, table
from relaynet.config import ConfigError
from relaynet.queue.classify import CLASSES

DESCRIPTION = """\
The suppression list of a running node (docs/suppression.md): recipients
refused at RCPT with 550 5.1.1, added by hard invalid-recipient bounces or
by hand.

  relaynet suppress list [--json]
  relaynet suppress add ADDRESS [--reason R] [--class C] [--expires DAYS]   (0 days: never expires)
  relaynet suppress remove ADDRESS...
  relaynet suppress import FILE            (- for stdin; CSV with a header, JSON lines, or one address a line)
  relaynet suppress export [FILE] [--format csv|jsonl]   (default: stdout, CSV)

Every command takes --config FILE (the node's config; its admin endpoint is
used) or --admin ENDPOINT (unix:/path/admin.sock, tcp:127.0.0.1:8025).

Exit status: 0 done; 1 the node refused (not suppressed, invalid entry);
2 usage, config or file error; 3 the node cannot be reached.
"""

#: Bytes of JSON per import request (the admin API reads bodies up to 64 KiB).
IMPORT_BATCH_BYTES = 48 * 1024


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def format_entries(result: dict[str, Any]) -> str:
    """The list as a table, with a count line."""
    entries = result["entries"]
    if not entries:
        return "The suppression list is empty."
    rows = [[e["address"], e["class"], e["source"], _when(e["time"]), _when(e.get("expires")),
             (e.get("reason") or "")[:80]] for e in entries]
    text = table(rows, ["ADDRESS", "CLASS", "SOURCE", "ADDED (UTC)", "EXPIRES", "REASON"])
    by = ", ".join(f"{k} {v}" for k, v in result.get("by_source", {}).items())
    return text + f"\n-- {result['count']} suppressed ({by})"


def _batches(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for r in records:
        n = len(json.dumps(r)) + 2
        if out[-1] and size + n > IMPORT_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(r)
        size += n
    return out


def run(args: argparse.Namespace, client: AdminClient, out: TextIO, stdin: TextIO) -> int:
    """Run one C{relaynet suppress} subcommand; @return: the exit status."""
    cmd = args.suppress_command
    if cmd == "list":
        result = client.request("GET", "/api/suppression")
        out.write((json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_entries(result)) + "\n")
        return 0
    if cmd == "add":
        body: dict[str, Any] = {"address": args.address, "class": args.kind}
        if args.reason:
            body["reason"] = args.reason
        if args.expires is not None:
            body["expires_days"] = args.expires
        result = client.request("POST", "/api/suppression", body)
        out.write(f"{result['address']} suppressed, expires {_when(result.get('expires'))}\n")
        return 0
    if cmd == "remove":
        for address in args.address:
            result = client.request("DELETE", "/api/suppression/" + urllib.parse.quote(address, safe="@"))
            out.write(f"{result['address']} removed\n")
        return 0
    if cmd == "import":
        try:
            text = stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
            from relaynet.queue.suppression import parse_import_records

            records = [r for _, r in parse_import_records(text)]
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"{args.file}: {e}") from None
        total = 0
        for batch in _batches(records):
            if batch:
                total += client.request("POST", "/api/suppression/import", {"entries": batch})["imported"]
        out.write(f"{total} address(es) imported\n")
        return 0
    if cmd == "export":
        entries = client.request("GET", "/api/suppression")["entries"]
        from relaynet.queue.suppression import export_csv, export_jsonl

        data = export_jsonl(entries) if args.format == "jsonl" else export_csv(entries)
        if args.file in (None, "-"):
            out.write(data)
        else:
            try:
                Path(args.file).write_text(data, encoding="utf-8")
            except OSError as e:
                raise UsageError(f"{args.file}: {e.strerror}") from None
            print(f"{len(entries)} address(es) written to {args.file}", file=sys.stderr)
        return 0
    raise UsageError(f"unknown command {cmd!r}")


class UsageError(Exception):
    """A usage, file or config problem: exit status 2."""


def _main(args: argparse.Namespace) -> int:
    if not getattr(args, "suppress_command", None):
        args.suppress_parser.print_help()
        return 2
    for name, default in (("config", None), ("admin", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        client = AdminClient(admin_endpoint_of(args))
        return run(args, client, sys.stdout, sys.stdin)
    except (ConfigError, ValueError, UsageError) as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 2
    except AdminError as e:
        print(f"relaynet: {e.message}", file=sys.stderr)
        return 3 if e.status == 0 else 1


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (never expires) or more")
    return value


def add_suppress_parser(sub: Any) -> None:
    """Register C{relaynet suppress} and its subcommands on C{sub}."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="the node's config file (default: the embedded default)")
    common.add_argument("--admin", default=argparse.SUPPRESS,
                        help="the admin endpoint instead (unix:/path/admin.sock or tcp:127.0.0.1:PORT)")
    p = sub.add_parser(
        "suppress", parents=[common], help="a running node's suppression list: list, add, remove, import, export",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=_main, suppress_parser=p)
    q = p.add_subparsers(dest="suppress_command", metavar="SUPPRESS-COMMAND")
    s = q.add_parser("list", parents=[common], help="the suppressed addresses")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON")
    s = q.add_parser("add", parents=[common], help="suppress an address")
    s.add_argument("address")
    s.add_argument("--reason", help="why (shown in list and in suppressed events)")
    s.add_argument("--class", dest="kind", choices=CLASSES, default=CLASSES[0],
                   help="the bounce class recorded (default invalid-recipient)")
    s.add_argument("--expires", type=_days, help="days until it expires (0: never; default [suppression] expiry_days)")
    s = q.add_parser("remove", parents=[common], help="stop suppressing addresses")
    s.add_argument("address", nargs="+")
    s = q.add_parser("import", parents=[common], help="add the addresses of a file (CSV, JSON lines, plain)")
    s.add_argument("file", help="the file, or - for stdin")
    s = q.add_parser("export", parents=[common], help="write the list (CSV or JSON lines)")
    s.add_argument("file", nargs="?", help="the file (default: stdout)")
    s.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="default csv")
