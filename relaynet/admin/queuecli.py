# -*- test-case-name: tests.test_control -*-
"""
C{relaynet queue}: inspect and steer a running node's queue through its admin
API (C{docs/admin-api.md}), like Postfix's C{mailq}, C{postqueue},
C{postsuper} and C{qshape}; the usage is in L{DESCRIPTION}.

Only the standard library talks HTTP here (L{http.client}, with a UNIX socket
connection class), so the command starts fast and needs no reactor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
import urllib.parse
from typing import Any, Iterable, Iterator, TextIO

from relaynet.config import ConfigError, load_config, split_endpoint
from relaynet.admin.text import human_age, human_size, parse_age
from relaynet.admin.views import STATES
from relaynet.queue.states import FINAL_STATUSES

TIMEOUT = 30.0

DESCRIPTION = """\
Inspect and steer a running node's queue through its admin API
(docs/admin-api.md), like Postfix's mailq, postsuper and qshape.

  relaynet queue list [--state S] [--sender S] [--recipient R] [--domain D] [--min-age AGE] [--ids]
  relaynet queue show QUEUE_ID
  relaynet queue flush [QUEUE_ID... | --domain D]     (no argument: the whole queue)
  relaynet queue hold|release|delete QUEUE_ID...      (- reads queue ids from stdin)
  relaynet queue bounce QUEUE_ID... [--reason TEXT]
  relaynet queue reroute [QUEUE_ID... | --domain D]
  relaynet queue summary [--top N]                    (mailq-like totals)
  relaynet queue shape [--state S] [--by sender] [--buckets N] [--scale MINUTES]

Every command takes --config FILE (the node's config; the admin endpoint is
read from it; default: the embedded default config, ./var/relaynet/admin.sock)
or --admin ENDPOINT (unix:/path/admin.sock, tcp:127.0.0.1:8025), and --json
(the API's JSON instead of tables).

Exit status: 0 done; 1 the node refused (no such message, busy, invalid
request); 2 usage or config error; 3 the node cannot be reached.
"""


class AdminError(Exception):
    """The admin API answered with an error (C{status}) or could not be reached (C{status} 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UNIXHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection over a UNIX stream socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """
    A small blocking client of the admin API.

    @param endpoint: a server endpoint string as in C{[admin].endpoint}
        (C{unix:PATH...}, C{tcp:PORT:interface=IP}), a client one
        (C{tcp:IP:PORT}) or an C{http://host:port} URL.
    """

    def __init__(self, endpoint: str, timeout: float = TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.unix_path: str | None = None
        self.host, self.port = "127.0.0.1", 0
        if endpoint.startswith("http://"):
            url = urllib.parse.urlsplit(endpoint)
            self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
            return
        kind, args, kw = split_endpoint(endpoint)
        if kind == "unix":
            self.unix_path = args[0] if args else kw.get("address") or kw.get("path")
            if not self.unix_path:
                raise ValueError(f"{endpoint!r}: no socket path")
        elif kind in ("tcp", "tcp6"):
            if len(args) >= 2:  # client form tcp:HOST:PORT
                self.host, port = args[0], args[1]
            else:
                self.host = kw.get("interface") or kw.get("host") or ("::1" if kind == "tcp6" else "127.0.0.1")
                port = args[0] if args else kw.get("port", "")
            if not port.isdigit() or int(port) == 0:
                raise ValueError(f"{endpoint!r}: no port to connect to")
            self.port = int(port)
        else:
            raise ValueError(f"{endpoint!r}: not a unix or tcp endpoint")

    def _connection(self) -> http.client.HTTPConnection:
        if self.unix_path is not None:
            return UNIXHTTPConnection(self.unix_path, self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, Any] | None = None) -> Any:
        """
        One API call.

        @return: the decoded JSON response.
        @raise AdminError: an error response, or no connection (status 0).
        """
        if query:
            q = {k: str(v) for k, v in query.items() if v is not None}
            if q:
                path += "?" + urllib.parse.urlencode(q)
        conn = self._connection()
        headers = {"Accept": "application/json"}
        data = None
        if method == "POST":
            data = json.dumps(body or {}).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as e:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise AdminError(
                0, f"cannot reach the node's admin API at {where} (is the node running?): {e}"
            ) from None
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {"error": raw.decode("utf-8", "replace").strip()}
        if resp.status >= 400:
            error = obj.get("error") if isinstance(obj, dict) else obj
            raise AdminError(resp.status, str(error or f"HTTP {resp.status} {resp.reason}"))
        return obj

    def get_text(self, path: str) -> str:
        """A non-JSON resource (C{/metrics}, C{/}) as text."""
        conn = self._connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as e:
            raise AdminError(0, f"cannot reach the node's admin API: {e}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise AdminError(resp.status, raw.decode("utf-8", "replace"))
        return raw.decode("utf-8", "replace")


# -- formatting -------------------------------------------------------------


def table(rows: list[list[str]], header: list[str], right: Iterable[int] = ()) -> str:
    """A plain text table: columns as wide as their widest cell."""
    widths = column_widths(rows, header)
    return "\n".join(table_lines([header, *rows], widths, right))


def column_widths(rows: list[list[str]], header: list[str]) -> list[int]:
    """The width of each column: its widest cell, the header's included."""
    return [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]


def table_lines(rows: list[list[str]], widths: list[int], right: Iterable[int] = ()) -> list[str]:
    """C{rows} as lines, each cell padded to its column's width (a wider one is not cut)."""
    right = set(right)
    return [
        "  ".join(
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
            for i, c in enumerate(row)
        ).rstrip()
        for row in rows
    ]


LIST_HEADER = ["QUEUE ID", "STATE", "SIZE", "AGE", "SENDER", "RECIPIENTS"]
LIST_RIGHT = (2, 3)


def list_rows(msgs: list[dict[str, Any]]) -> list[list[str]]:
    """The C{queue list} table's rows of C{msgs}."""
    rows = []
    for m in msgs:
        rcpts = m["recipients"]
        pending = [r for r in rcpts if r["status"] not in FINAL_STATUSES]
        first = (pending or rcpts or [None])[0]
        rdesc = ""
        if first is not None:
            rdesc = f"{first['address']} ({first['status']})"
            if len(rcpts) > 1:
                rdesc += f" +{len(rcpts) - 1}"
        rows.append([
            m["queue_id"], m["state"], human_size(m["size"]), human_age(m["age"]),
            m["sender"] or "<>", rdesc,
        ])
    return rows


def list_footer(shown: int, count: int, size: int) -> str:
    """The last line of the C{queue list} table."""
    of = f"{shown} of {count}" if shown != count else str(shown)
    return f"-- {of} message(s), {human_size(size)} bytes"


def format_show(m: dict[str, Any]) -> str:
    now = time.time()
    lines = [
        f"queue id:     {m['queue_id']}",
        f"state:        {m['state']}" + (" (held)" if m.get("held") else ""),
        f"sender:       <{m['sender']}>",
        f"size:         {m['size']} bytes",
        f"arrival:      {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m['arrival']))}"
        f" ({human_age(m['age'])} ago)",
        "next attempt: " + (
            "-" if not m.get("next_attempt")
            else time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m["next_attempt"]))
            + f" (in {human_age(m['next_attempt'] - now)})"
        ),
        f"hops:         {m.get('hops')}",
    ]
    client = m.get("client") or {}
    if client:
        lines.append("client:       " + " ".join(
            f"{k}={v}" for k, v in sorted(client.items()) if v is not None
        ))
    lines += ["", "recipients:"]
    rows = [
        [r["address"], r["status"], str(r["attempts"]), r.get("dsn") or "-",
         r.get("remote") or "-", (r.get("diagnostic") or "")[:100]]
        for r in m["recipients"]
    ]
    lines.append(table(rows, ["ADDRESS", "STATUS", "ATTEMPTS", "DSN", "NEXT HOP", "LAST ERROR"], right=(2,)))
    lines += ["", "headers:", m.get("headers", "").rstrip("\r\n").replace("\r\n", "\n")]
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    states = ", ".join(f"{k} {v}" for k, v in s["states"].items())
    lines = [
        f"{s['messages']} message(s), {human_size(s['bytes'])} bytes, "
        f"{s['recipients']} pending recipient(s) ({states})",
    ]
    if s["oldest"]:
        lines.append(f"oldest: {s['oldest']['queue_id']}, {human_age(s['oldest']['age'])} old")
    if s["destinations"]:
        lines += ["", table(
            [[d["domain"], str(d["messages"]), str(d["recipients"])] for d in s["destinations"]],
            ["DESTINATION", "MESSAGES", "RECIPIENTS"], right=(1, 2),
        )]
    if s["deferral_reasons"]:
        lines += ["", table(
            [[str(r["recipients"]), r["reason"]] for r in s["deferral_reasons"]],
            ["RECIPIENTS", "DEFERRAL REASON"], right=(0,),
        )]
    return "\n".join(lines)


def format_shape(s: dict[str, Any]) -> str:
    header = ["SENDER DOMAIN" if s["by"] == "sender" else "DOMAIN", "T", *s["columns"]]
    rows = [[r["domain"], str(r["total"]), *map(str, r["counts"])] for r in s["rows"]]
    text = table(rows, header, right=range(1, len(header)))
    dests = s.get("destinations") or []
    if not dests:
        return text
    lines = []
    for d in dests:
        until = "" if d.get("until") is None else time.strftime("%H:%M:%S", time.gmtime(d["until"]))
        tokens = "-" if d.get("tokens") is None else f"{d['tokens']:.1f}/{d['burst']}"
        lines.append([
            d["destination"], d["state"] + (f" until {until}" if until else ""), d.get("rate") or "-", tokens,
            str(d["connections"]), str(d["queued"]), str(d["remembered"]), d.get("reason") or "",
        ])
    shaping = table(lines, ["DESTINATION", "STATE", "RATE", "TOKENS", "CONN", "WAITING", "DEFERRED", "REASON"],
                    right=range(3, 7))
    return text + "\n\n" + shaping


# -- commands ---------------------------------------------------------------


def _ids(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    ids = list(args.queue_id)
    if ids == ["-"]:
        ids = [line.split()[0] for line in stdin if line.strip()]
    return ids


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "state": getattr(args, "state", None), "sender": getattr(args, "sender", None),
        "recipient": getattr(args, "recipient", None), "domain": getattr(args, "domain", None),
        "min_age": getattr(args, "min_age", None),
    }


def _missing_shards(result: Any) -> None:
    """
    A node with workers lists what every worker answered: if some did not
    (down, restarting, too slow), what was printed is incomplete: say so,
    and exit non-zero.
    """
    missing = result.get("missing_shards") if isinstance(result, dict) else None
    if missing:
        shards = ", ".join(str(k) for k in missing)
        raise AdminError(503, f"incomplete: worker shard(s) {shards} did not answer (the node's log says why)")


IDS_PAGE = 50_000
"""Queue ids asked for per request by C{queue list --ids}."""

LIST_PAGE = 5_000
"""Messages asked for per request by the C{queue list} table."""


def pages(
    client: AdminClient, query: dict[str, Any], limit: int | None, size: int, missing: set[int],
) -> Iterator[dict[str, Any]]:
    """
    The answers to C{GET /api/queue?query}, oldest first, up to C{limit}
    messages in all, C{size} a request: each request carries the previous
    page's last message as its cursor (C{after}), so neither the node nor
    this process ever holds the whole listing (a million ids in one answer
    took the node's RSS from 1411 to 1832 MiB). Messages that arrive while
    it runs may be listed (up to a page more than the first answer
    counted); one that leaves meanwhile may be too. The loop is bounded by
    the first answer's count. The worker shards that did not answer some
    page are added to C{missing}.
    """
    got, after, total = 0, None, None
    requests = 1
    while total is None or requests <= total // size + 2:
        want = size if limit is None else min(size, limit - got)
        if want <= 0 and total is not None:
            return  # (the first request is made whatever the limit: the node judges it, and counts)
        page = client.request("GET", "/api/queue", query={
            **query, "limit": want, **({"after": after} if after else {}),
        })
        msgs = page["messages"]
        got += len(msgs)
        missing.update(page.get("missing_shards") or ())
        if total is None:
            total = int(page["count"])
        yield page
        if not msgs or len(msgs) < want:
            return
        last = msgs[-1]
        after = f"{last['arrival']!r}:{last['queue_id']}"
        requests += 1


def list_ids(client: AdminClient, filters: dict[str, Any], limit: int | None, out: TextIO) -> dict[str, Any]:
    """
    Print the queue ids of a listing, one a line, oldest first, a page of
    L{IDS_PAGE} at a time (L{pages}).

    @return: C{{"missing_shards": [...]}}, the worker shards that did not
        answer some page.
    """
    missing: set[int] = set()
    for page in pages(client, {**filters, "ids": "1"}, limit, IDS_PAGE, missing):
        out.writelines(m["queue_id"] + "\n" for m in page["messages"])
    return {"missing_shards": sorted(missing)}


def list_table(client: AdminClient, filters: dict[str, Any], limit: int | None, out: TextIO) -> dict[str, Any]:
    """
    Print the C{queue list} table a page of L{LIST_PAGE} messages at a time
    (L{pages}), as C{mailq} streams its output: a listing that fits one page
    is one plain L{table}; a longer one keeps the first page's column widths
    (a wider cell later widens its own line only), and its last line counts
    every page.

    @return: C{{"missing_shards": [...]}}, as L{list_ids}.
    """
    missing: set[int] = set()
    widths: list[int] | None = None
    shown = size = count = 0
    for page in pages(client, filters, limit, LIST_PAGE, missing):
        msgs = page["messages"]
        if widths is None:
            count = int(page["count"])
            if not msgs:
                out.write("The queue is empty.\n" if count == 0 else "")
                break
        rows = list_rows(msgs)
        if widths is None:
            widths = column_widths(rows, LIST_HEADER)
            rows = [LIST_HEADER, *rows]
        out.writelines(line + "\n" for line in table_lines(rows, widths, LIST_RIGHT))
        shown += len(msgs)
        size += sum(m["size"] for m in msgs)
    if shown:
        out.write(list_footer(shown, count, size) + "\n")
    return {"missing_shards": sorted(missing)}


def list_json(client: AdminClient, filters: dict[str, Any], limit: int | None, out: TextIO) -> dict[str, Any]:
    """
    Print C{queue list --json}: the API's answer as one JSON document, the
    same text as C{json.dumps(answer, indent=2)} of one whole listing, but
    asked for and written a page of L{LIST_PAGE} at a time (L{pages}).
    The count is the first answer's; C{missing_shards} (a node with
    workers) closes it: the shards that did not answer some page.

    @return: C{{"missing_shards": [...]}}, as L{list_ids}.
    """
    missing: set[int] = set()
    items = 0
    fleet = None
    for page in pages(client, filters, limit, LIST_PAGE, missing):
        if fleet is None:
            out.write('{\n  "count": ' + _nested(page["count"], 1) + ',\n  "messages": [')
        fleet = "missing_shards" in page
        for m in page["messages"]:
            out.write((",\n    " if items else "\n    ") + _nested(m, 2))
            items += 1
    out.write("\n  ]" if items else "]")
    if fleet:
        out.write(',\n  "missing_shards": ' + _nested(sorted(missing), 1))
    out.write("\n}\n")
    return {"missing_shards": sorted(missing)}


def _nested(value: Any, level: int) -> str:
    """C{value} as C{json.dumps(..., indent=2)} writes it C{level} levels deep."""
    return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n" + "  " * level)


def run(args: argparse.Namespace, client: AdminClient, out: TextIO, stdin: TextIO) -> int:
    """Run one C{relaynet queue} subcommand; @return: the exit status."""
    cmd = args.queue_command

    def emit(obj: Any, text: str | None) -> None:
        if args.json:
            out.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        elif text:
            out.write(text + "\n")

    if cmd == "list":
        # --json: summaries whether or not --ids is given, as the API's answer.
        show = list_json if args.json else list_ids if args.ids else list_table
        _missing_shards(show(client, _filters(args), args.limit, out))
        return 0
    if cmd == "show":
        result = client.request("GET", f"/api/queue/{urllib.parse.quote(args.queue_id)}")
        emit(result, format_show(result))
        return 0
    if cmd == "summary":
        result = client.request("GET", "/api/summary", query={**_filters(args), "top": args.top})
        emit(result, format_summary(result))
        return 0
    if cmd == "shape":
        result = client.request("GET", "/api/shape", query={
            **_filters(args), "by": args.by, "buckets": args.buckets, "scale": args.scale, "top": args.top,
        })
        emit(result, format_shape(result))
        return 0
    if cmd in ("flush", "reroute"):
        ids = _ids(args, stdin)
        if ids and args.domain:
            raise AdminError(400, "give queue ids or --domain, not both")
        key = "flushed" if cmd == "flush" else "rerouted"
        if not ids:
            result = client.request("POST", f"/api/queue/{cmd}", {"domain": args.domain} if args.domain else {})
            emit(result, f"{cmd}: {result[key]} message(s) scheduled for delivery now")
            return 0
        return _each(args, client, ids, cmd, key, emit)
    if cmd in ("hold", "release", "delete", "bounce"):
        ids = _ids(args, stdin)
        if not ids:
            raise AdminError(400, f"{cmd} needs queue ids (or - to read them from stdin)")
        key = {"hold": "held", "release": "released", "delete": "deleted", "bounce": "bounced"}[cmd]
        return _each(args, client, ids, cmd, key, emit)
    raise AdminError(400, f"unknown command {cmd}")


def _each(args: argparse.Namespace, client: AdminClient, ids: list[str], cmd: str, key: str,
          emit: Any) -> int:
    results, status = [], 0
    body = {"reason": args.reason} if cmd == "bounce" and getattr(args, "reason", None) else {}
    for qid in ids:
        try:
            r = client.request("POST", f"/api/queue/{urllib.parse.quote(qid)}/{cmd}", body)
        except AdminError as e:
            if e.status == 0:
                raise
            status = 1
            results.append({"queue_id": qid, "error": e.message})
            if not args.json:
                print(f"relaynet: {qid}: {e.message}", file=sys.stderr)
            continue
        results.append(r)
        if not args.json:
            n = r.get(key)
            done = n if isinstance(n, bool) else bool(n)
            if done:
                emit(r, f"{qid}: {key}")
            else:
                emit(r, f"{qid}: not {key}: {_why_not(client, qid, cmd, args)}")
    if args.json:
        emit({"results": results}, None)
    return status


def _why_not(client: AdminClient, qid: str, cmd: str, args: argparse.Namespace) -> str:
    """
    Why a verb did nothing to a message, as far as its state tells: held
    (and how to release it), already in that state, or gone.
    """
    try:
        m = client.request("GET", f"/api/queue/{urllib.parse.quote(qid)}")
    except AdminError as e:
        if e.status == 404:
            return "no such message in the queue (delivered, bounced or deleted?)"
        return "nothing to do"
    if m.get("held"):
        if cmd == "hold":
            return "it is already held"
        return f"the message is held; release it first with: {_again(args, 'release', qid)}"
    if cmd == "release":
        return "it is not held"
    if m.get("state") == "active":
        return "a delivery attempt of it is running now"
    return "nothing to do"


def _again(args: argparse.Namespace, *words: str) -> str:
    """A C{relaynet queue} command line reaching the same node, to paste as printed."""
    from relaynet.hints import command

    if args.admin:
        return command("queue", "--admin", str(args.admin), *words)
    if args.config:
        return command("queue", "--config", args.config, *words)
    return command("queue", *words)


def admin_endpoint_of(args: argparse.Namespace) -> str:
    """The admin endpoint a command talks to: C{--admin}, else the one of C{--config}'s node."""
    if args.admin:
        return str(args.admin)
    config = load_config(args.config)
    if not config.admin.enabled:
        raise ConfigError(config.source, "admin.enabled", "the admin API is disabled on this node")
    return config.admin_endpoint


def _main(args: argparse.Namespace) -> int:
    if not getattr(args, "queue_command", None):
        args.queue_parser.print_help()
        return 2
    for name, default in (("config", None), ("admin", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        client = AdminClient(admin_endpoint_of(args))
    except (ConfigError, ValueError) as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, client, sys.stdout, sys.stdin)
    except AdminError as e:
        print(f"relaynet: {e.message}", file=sys.stderr)
        return 3 if e.status == 0 else 1


def _age(text: str) -> str:
    try:
        parse_age(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_queue_parser(sub: Any) -> None:
    """Register C{relaynet queue} and its subcommands on C{sub}."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="the node's config file (default: the embedded default)")
    common.add_argument("--admin", default=argparse.SUPPRESS,
                        help="the admin endpoint instead (unix:/path/admin.sock or tcp:127.0.0.1:PORT)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")
    p = sub.add_parser(
        "queue", parents=[common], help="inspect and steer a running node's queue (mailq, postsuper, qshape)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # No set_defaults for the common options: the parents share their actions,
    # and a default set here would overwrite a value given before the subcommand.
    p.set_defaults(func=_main, queue_parser=p)
    q = p.add_subparsers(dest="queue_command", metavar="QUEUE-COMMAND")

    def filters(s: argparse.ArgumentParser) -> None:
        s.add_argument("--state", choices=STATES)
        s.add_argument("--sender", help="sender contains this (case-insensitive)")
        s.add_argument("--recipient", help="a recipient contains this (case-insensitive)")
        s.add_argument("--domain", help="a recipient is in this domain")
        s.add_argument("--min-age", type=_age, help="at least this old: 90, 90s, 5m, 2h, 1d")

    s = q.add_parser("list", parents=[common], help="list queued messages (mailq)")
    filters(s)
    s.add_argument("--limit", type=int, help="show at most this many")
    s.add_argument("--ids", action="store_true", help="print only queue ids, one a line (for - of other commands)")
    s = q.add_parser("show", parents=[common], help="one message: envelope, recipients, attempts, headers")
    s.add_argument("queue_id")
    for name, text in (("flush", "attempt delivery now: all, some ids, or --domain"),
                       ("reroute", "route again with the current routing table and attempt now")):
        s = q.add_parser(name, parents=[common], help=text)
        s.add_argument("queue_id", nargs="*", help="queue ids (- reads them from stdin); none: all")
        s.add_argument("--domain", help="only messages with a pending recipient in this domain")
    for name, text in (("hold", "keep messages from delivery until released (postsuper -h)"),
                       ("release", "release held messages and attempt them now (postsuper -H)"),
                       ("delete", "remove messages without notice (postsuper -d)"),
                       ("bounce", "return messages to their senders now, with a DSN")):
        s = q.add_parser(name, parents=[common], help=text)
        s.add_argument("queue_id", nargs="+", help="queue ids (- reads them from stdin)")
        if name == "bounce":
            s.add_argument("--reason", help="the diagnostic in the DSN")
    s = q.add_parser("summary", parents=[common], help="counts, bytes, oldest, top destinations and deferral reasons")
    filters(s)
    s.add_argument("--top", type=int, default=10, help="rows per list (default 10)")
    s = q.add_parser("shape", parents=[common], help="age histogram by destination domain (qshape)")
    filters(s)
    s.add_argument("--by", choices=("recipient", "sender"), default="recipient",
                   help="recipient domains (default) or sender domains")
    s.add_argument("--buckets", type=int, default=10, help="number of age buckets (default 10)")
    s.add_argument("--scale", type=float, default=5, help="first bucket in minutes; each doubles (default 5)")
    s.add_argument("--top", type=int, help="only the N busiest domains")
