"""
Tests for the admin web service (L{relaynet.admin.api}), the C{relaynet queue}
command (L{relaynet.admin.queuecli}) and the C{[admin]}/C{[log]} configuration.

 - pure helpers: ages, the C{mailq}-like summary, the C{qshape}-like
   histogram, the routing table as JSON, endpoint parsing;
 - the resource tree with twisted.web's L{DummyRequest} over fake views of
   the queue, the sessions and the node (L{relaynet.admin.views}), no node:
   routing of API paths, errors, the CSRF and DNS-rebinding guards, the
   status page (chart, routing table, next-hop health, escaping);
 - slow: real C{twistd -n relaynet} nodes with messages deferred to a dead
   next hop (a loopback port bound but not listening), driven with every
   C{relaynet queue} command in a subprocess, effects checked in the spool,
   the event log and the API; reload by SIGHUP and by the API with a valid and
   an invalid config; SIGTERM leaves the queue as it was.
"""

from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import subprocess
import sys
import io
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator

import pytest
from attrs import define, field
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.web.resource import getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from relaynet.config import ConfigError, NodeConfig, describe, load_config, parse_config
from relaynet.admin.api import (
    AdminViews, ApiError, StatusPage, make_site, render_status, routes_json, shape, summarize,
    web_service,
)
from relaynet.admin.metrics import NodeMetrics
from relaynet.admin import queuecli
from relaynet.admin.queuecli import AdminClient, AdminError
from relaynet.admin.text import parse_age
from relaynet.admin.views import QueueTotals
from relaynet.smtp.netio import EndpointService

from harness.nodeproc import HOST, NodeProcess, RawClient, free_port, maildir_new, relaynet_command, wait_for

TIMEOUT = 20.0


# -- pure helpers -------------------------------------------------------------


def item(qid: str, age: float, rcpts: list[tuple[str, str]], sender: str = "s@s.example",
         size: int = 100, state: str = "deferred", diagnostic: str = "421 try later") -> dict[str, Any]:
    """A queue listing item as L{relaynet.queue.listing.entry_summary} makes them."""
    return {
        "queue_id": qid, "state": state, "sender": sender, "size": size, "age": age,
        "arrival": 1000.0 - age,
        "recipients": [
            {"address": a, "status": st, "attempts": 1, "dsn": "4.4.1",
             "diagnostic": diagnostic if st == "deferred" else None}
            for a, st in rcpts
        ],
    }


def test_parse_age() -> None:
    """Seconds, or a number with s, m, h or d; anything else is refused."""
    assert parse_age("90") == 90
    assert parse_age("1.5m") == 90
    assert parse_age(" 2h ") == 7200
    assert parse_age("1d") == 86400
    for bad in ("", "m", "-5", "5w", "1e3"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_queue_command_parses_ages_without_twisted() -> None:
    """
    C{relaynet queue} reads C{--min-age} and C{--state} with the shared text
    helpers and state names: parsing its arguments imports neither Twisted
    nor the admin API.
    """
    code = (
        "import argparse, sys\n"
        "from relaynet.admin.queuecli import add_queue_parser\n"
        "p = argparse.ArgumentParser(); add_queue_parser(p.add_subparsers())\n"
        "args = p.parse_args(['queue', 'list', '--min-age', '5m', '--state', 'hold'])\n"
        "assert (args.min_age, args.state) == ('5m', 'hold')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('twisted', 'prometheus', 'relaynet.admin'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "['relaynet.admin', 'relaynet.admin.queuecli', 'relaynet.admin.text', 'relaynet.admin.views']"
    )


def test_summary() -> None:
    """Counts, octets, pending recipients, oldest, top destinations and deferral reasons."""
    items = [
        item("A", 600, [("a@x.test", "deferred"), ("b@x.test", "deferred"), ("c@y.test", "delivered")]),
        item("B", 30, [("d@y.test", "deferred")], size=50, diagnostic="connection refused"),
        item("C", 5, [("e@x.test", "pending")], state="incoming", size=7),
    ]
    s = summarize(items)
    assert s["messages"] == 3 and s["bytes"] == 157 and s["recipients"] == 4
    assert s["states"] == {"incoming": 1, "active": 0, "deferred": 2, "hold": 0}
    assert s["oldest"] == {"queue_id": "A", "arrival": 400.0, "age": 600}
    assert s["destinations"] == [
        {"domain": "x.test", "recipients": 3, "messages": 2},
        {"domain": "y.test", "recipients": 1, "messages": 1},
    ]
    assert s["deferral_reasons"] == [
        {"reason": "421 try later", "recipients": 2}, {"reason": "connection refused", "recipients": 1},
    ]
    assert summarize([])["oldest"] is None
    assert len(summarize(items, top=1)["destinations"]) == 1


def test_shape_buckets_like_qshape() -> None:
    """Buckets 5, 10, 20 ... minutes; a message counts once per pending domain; TOTAL first."""
    items = [
        item("A", 60, [("a@x.test", "deferred"), ("b@x.test", "deferred")]),  # 1 min
        item("B", 7 * 60, [("c@y.test", "deferred"), ("d@x.test", "deferred")]),  # 7 min
        item("C", 3 * 86400, [("e@x.test", "deferred")]),  # beyond the last bound
        item("D", 60, [("f@z.test", "delivered")]),  # nothing pending: not counted
    ]
    s = shape(items)
    assert s["columns"] == ["5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    rows = {r["domain"]: r for r in s["rows"]}
    assert s["rows"][0]["domain"] == "TOTAL"
    assert rows["TOTAL"]["counts"][:2] == [1, 1] and rows["TOTAL"]["counts"][-1] == 1
    assert rows["TOTAL"]["total"] == 3
    assert rows["x.test"]["counts"][:2] == [1, 1] and rows["x.test"]["total"] == 3
    assert rows["y.test"]["counts"][1] == 1
    assert "z.test" not in rows
    small = shape(items, buckets=3, scale=1, by="sender", top=1)
    assert small["columns"] == ["1", "2", "2+"]
    assert small["rows"][1] == {"domain": "s.example", "total": 3, "counts": [0, 1, 2]}
    with pytest.raises(ValueError):
        shape(items, buckets=1)


def test_routes_json() -> None:
    """The routing table with next hops by priority and the name events use for each."""
    config = parse_config({
        "local": {"domains": ["example.org"]},
        "route": [
            {"domains": ["a.test"], "action": "relay", "next_hops": [
                {"endpoint": "tcp:192.0.2.2:25", "priority": 20}, "tcp:192.0.2.1:2525"]},
            {"domains": ["*"], "action": "mx"},
            {"domains": ["spam.test"], "action": "reject", "code": 554, "text": "go away"},
        ],
    })
    t = routes_json(config)
    assert t["local_domains"] == ["example.org"]
    r0, r1, r2 = t["routes"]
    assert [h["name"] for h in r0["next_hops"]] == ["192.0.2.1:2525", "192.0.2.2:25"]
    assert r0["ack"] == "queued" and r1["mx_port"] == 25
    assert r2["reply"] == "554 5.7.1 go away"


def test_admin_config_defaults_and_validation(tmp_path: Path) -> None:
    """
    The default admin endpoint is a 0600 socket in the spool; TCP must be
    loopback, errors name the key; relative socket paths are relative to the
    file; describe() round-trips [admin] and [log].
    """
    c = parse_config({"node": {"spool": str(tmp_path / "sp")}})
    assert c.admin_endpoint == f"unix:{tmp_path / 'sp' / 'admin.sock'}:mode=600"
    assert c.admin.enabled and c.log.format == "text" and c.log.level == "info"
    for ep in ("tcp:8025", "tcp:8025:interface=0.0.0.0", "tcp:8025:interface=192.0.2.1",
               "tcp6:8025:interface=\\:\\:", "ssl:8025:interface=127.0.0.1", "tcp:x:interface=127.0.0.1"):
        with pytest.raises(ConfigError) as e:
            parse_config({"admin": {"endpoint": ep}})
        assert e.value.key == "admin.endpoint", ep
    with pytest.raises(ConfigError) as e:
        parse_config({"admin": {"endpoint": "unix:/" + "x" * 120}})
    assert "107 bytes" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"node": {"spool": "/" + "y" * 110}})
    assert e.value.key == "admin.endpoint" and "default" in e.value.problem
    assert parse_config({"admin": {"endpoint": "tcp6:8025:interface=\\:\\:1"}}).admin.endpoint
    assert parse_config({"admin": {"metrics_endpoint": "tcp:9125"}}).admin.metrics_endpoint == "tcp:9125"
    for key, bad in (("format", "xml"), ("level", "loud")):
        with pytest.raises(ConfigError) as e:
            parse_config({"log": {key: bad}})
        assert e.value.key == f"log.{key}"
    p = tmp_path / "node.toml"
    p.write_text('[admin]\nendpoint = "unix:run/admin.sock:mode=660"\n[log]\nformat = "json"\nlevel = "warn"\n')
    c = load_config(p)
    assert c.admin_endpoint == f"unix:{tmp_path / 'run' / 'admin.sock'}:mode=660"
    q = tmp_path / "again.toml"
    q.write_text(describe(c))
    again = load_config(q)
    assert again.admin == c.admin and again.log == c.log


def test_check_config_of_contrib_sample() -> None:
    """contrib/node.toml (the documented intra-org sample) passes check-config."""
    sample = Path(__file__).parent.parent / "contrib" / "node.toml"
    result = subprocess.run([*relaynet_command(), "check-config", str(sample)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "[admin]" in result.stdout and "[log]" in result.stdout


def test_admin_client_endpoints() -> None:
    """The client understands the server endpoint forms of the config, client forms and URLs."""
    assert AdminClient("unix:/run/relaynet/admin.sock:mode=600").unix_path == "/run/relaynet/admin.sock"
    assert AdminClient("unix:/a\\:b.sock").unix_path == "/a:b.sock"
    c = AdminClient("tcp:8025:interface=127.0.0.1")
    assert (c.unix_path, c.host, c.port) == (None, "127.0.0.1", 8025)
    c = AdminClient("tcp6:8025:interface=\\:\\:1")
    assert (c.host, c.port) == ("::1", 8025)
    c = AdminClient("tcp:127.0.0.2:9000")
    assert (c.host, c.port) == ("127.0.0.2", 9000)
    c = AdminClient("http://localhost:8080")
    assert (c.host, c.port) == ("localhost", 8080)
    for bad in ("tcp:0:interface=127.0.0.1", "ssl:443", "unix:"):
        with pytest.raises(ValueError):
            AdminClient(bad)


class PagedNode:
    """An L{AdminClient} stand-in: C{GET /api/queue} answered from C{items} as a node pages them."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = sorted(items, key=lambda i: (i["arrival"], i["queue_id"]))
        self.queries: list[dict[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        assert (method, path) == ("GET", "/api/queue") and query is not None
        self.queries.append(query)
        rest = self.items
        if query.get("after"):
            arrival, qid = query["after"].split(":")
            rest = [i for i in rest if (i["arrival"], i["queue_id"]) > (float(arrival), qid)]
        if query["limit"] < 0:
            raise AdminError(400, "limit must be a non-negative integer")
        return {"count": len(rest), "messages": rest[:query["limit"]]}


def test_queue_list_table_pages_through_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{queue list} prints its table a page at a time: one page prints as
    one L{table} (the whole listing's widths); more keep the first page's
    widths (a wider cell widens its own line only), in order, with one
    footer counting them all; C{--limit} stops it; a limit the node
    refuses is its error.
    """
    items = [item(f"Q{k}", 600 - k, [(f"r{k}@x.test", "deferred")]) for k in range(7)]
    items[5]["sender"] = "a-much-longer-sender@somewhere.example"
    rows = queuecli.list_rows(sorted(items, key=lambda i: i["arrival"]))
    one = queuecli.table(rows, queuecli.LIST_HEADER, queuecli.LIST_RIGHT) + "\n" + queuecli.list_footer(7, 7, 700)
    node = PagedNode(items)
    out = io.StringIO()
    assert queuecli.list_table(node, {"state": None}, None, out) == {"missing_shards": []}
    assert out.getvalue() == one + "\n" and len(node.queries) == 1
    monkeypatch.setattr(queuecli, "LIST_PAGE", 2)
    node, out = PagedNode(items), io.StringIO()
    queuecli.list_table(node, {"state": None}, None, out)
    lines = out.getvalue().splitlines()
    assert [q["limit"] for q in node.queries] == [2, 2, 2, 2] and "after" not in node.queries[0]
    assert [line.split() for line in lines] == [line.split() for line in one.splitlines()]
    first = sorted(items, key=lambda i: i["arrival"])[:2]
    assert lines[:3] == queuecli.table(queuecli.list_rows(first), queuecli.LIST_HEADER, queuecli.LIST_RIGHT).splitlines()
    wide = next(line for line in lines if "a-much-longer" in line)
    assert len(wide) > len(lines[1])
    assert all(len(line) == len(lines[1]) for line in lines[1:-1] if line != wide)
    assert lines[-1] == "-- 7 message(s), 700 bytes"
    node, out = PagedNode(items), io.StringIO()
    queuecli.list_table(node, {}, 3, out)
    assert [line.split()[0] for line in out.getvalue().splitlines()[1:-1]] == ["Q0", "Q1", "Q2"]
    assert out.getvalue().splitlines()[-1] == "-- 3 of 7 message(s), 300 bytes"
    assert [q["limit"] for q in node.queries] == [2, 1]
    out = io.StringIO()
    queuecli.list_table(PagedNode([]), {}, None, out)
    assert out.getvalue() == "The queue is empty.\n"
    out = io.StringIO()
    queuecli.list_table(PagedNode(items), {}, 0, out)
    assert out.getvalue() == ""
    with pytest.raises(AdminError):
        queuecli.list_table(PagedNode(items), {}, -1, io.StringIO())
    with pytest.raises(AdminError):
        queuecli.list_ids(PagedNode(items), {}, -1, io.StringIO())


def test_queue_list_json_pages_through_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{queue list --json} writes, a page at a time, the very text that
    C{json.dumps(indent=2)} makes of the whole answer; a node with workers
    gets its C{missing_shards} last; an empty queue is an empty list.
    """
    items = [item(f"Q{k}", 600 - k, [(f"r{k}@x.test", "deferred")]) for k in range(5)]
    items[1]["sender"] = "b\u00e9\u2028\"x\"@s.example"  # a line separator: not a line of the JSON
    whole = {"count": 5, "messages": sorted(items, key=lambda i: i["arrival"])}
    for page in (1000, 2, 1):
        monkeypatch.setattr(queuecli, "LIST_PAGE", page)
        out = io.StringIO()
        assert queuecli.list_json(PagedNode(items), {}, None, out) == {"missing_shards": []}
        assert out.getvalue() == json.dumps(whole, indent=2, ensure_ascii=False) + "\n"
    out = io.StringIO()
    queuecli.list_json(PagedNode(items), {}, 3, out)
    assert json.loads(out.getvalue()) == {"count": 5, "messages": whole["messages"][:3]}

    class Workers(PagedNode):
        def request(self, *a: Any, **kw: Any) -> Any:
            return {**super().request(*a, **kw), "missing_shards": [2] if len(self.queries) == 2 else []}

    out = io.StringIO()
    assert queuecli.list_json(Workers(items), {}, None, out) == {"missing_shards": [2]}
    assert out.getvalue() == json.dumps({**whole, "missing_shards": [2]}, indent=2, ensure_ascii=False) + "\n"
    for node in (PagedNode([]), Workers([])):
        out = io.StringIO()
        queuecli.list_json(node, {}, None, out)
        empty = {"count": 0, "messages": [], **({"missing_shards": []} if isinstance(node, Workers) else {})}
        assert out.getvalue() == json.dumps(empty, indent=2) + "\n"


def test_unreachable_node_exit_status(tmp_path: Path) -> None:
    """No node on the socket: exit status 3 and a message naming the socket."""
    sock = tmp_path / "none.sock"
    result = subprocess.run([*relaynet_command(), "queue", "--admin", f"unix:{sock}", "list"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert str(sock) in result.stderr


# -- the resource tree over fake views, with DummyRequest -----------------------


class FakeQueue:
    """A L{QueueView} over listing items (the fake's entries are its items), recording calls."""

    def __init__(self) -> None:
        self.items = [
            item("Q1", 120, [("a@dead.test", "deferred")], diagnostic="connect to 127.0.0.1:9: <refused>"),
            item("Q2", 30, [("b@x.test", "pending")], state="incoming"),
        ]
        #: Queue ids whose actions answer False while they stay queued (an old runner, mid-attempt).
        self.busy: set[str] = set()
        #: Queue ids whose actions wait for the test to fire them (a runner applying them after an attempt).
        self.later: dict[str, Deferred[bool]] = {}
        self.calls: list[tuple[Any, ...]] = []

    def __contains__(self, queue_id: str) -> bool:
        return any(i["queue_id"] == queue_id for i in self.items)

    def counts(self) -> dict[str, int]:
        return {"incoming": 1, "active": 0, "deferred": 1, "hold": 0}

    def totals(self) -> QueueTotals:
        return QueueTotals(size=sum(i["size"] for i in self.items), recipients={"deferred": 1, "pending": 1},
                           oldest_arrival=min(i["arrival"] for i in self.items))

    def matching(self, state: str | None = None, sender: str | None = None, recipient: str | None = None,
                 domain: str | None = None, min_age: float | None = None) -> list[Any]:
        filters = {"state": state, "sender": sender, "recipient": recipient, "domain": domain, "min_age": min_age}
        self.calls.append(("list", filters))
        return [i for i in self.items if not state or i["state"] == state]

    def summaries(self, entries: list[Any]) -> list[dict[str, Any]]:
        return list(entries)

    def page(self, limit: int | None, after: Any = None, **filters: Any) -> Deferred[tuple[int, list[Any]]]:
        entries = self.matching(**filters)
        return succeed((len(entries), entries if limit is None else entries[:limit]))

    def collect(self, each: Any, state: str | None = None, sender: str | None = None, recipient: str | None = None,
                domain: str | None = None, min_age: float | None = None) -> Deferred[None]:
        for i in self.list(state, sender, recipient, domain, min_age):
            each(i)
        return succeed(None)

    def summary(self, top: int = 10) -> dict[str, Any]:
        self.calls.append(("summary", top))
        return summarize(self.items, top)

    def list(self, state: str | None = None, sender: str | None = None, recipient: str | None = None,
             domain: str | None = None, min_age: float | None = None) -> list[dict[str, Any]]:
        return self.summaries(self.matching(state, sender, recipient, domain, min_age))

    def show(self, qid: str) -> Deferred[dict[str, Any]] | None:
        return succeed({**self.items[0], "headers": "Subject: x\r\n"}) if qid in self else None

    def flush(self, qid: str | None = None, domain: str | None = None) -> int:
        self.calls.append(("flush", qid, domain))
        return 1 if qid else 2

    def reroute(self, qid: str | None = None, domain: str | None = None) -> int:
        self.calls.append(("reroute", qid, domain))
        return 3

    def _act(self, name: str, qid: str, *rest: Any) -> Deferred[bool]:
        self.calls.append((name, qid, *rest))
        if qid in self.later:
            return self.later[qid]
        return succeed(qid in self and qid not in self.busy)

    def hold(self, qid: str) -> Deferred[bool]:
        return self._act("hold", qid)

    def release(self, qid: str) -> Deferred[bool]:
        return self._act("release", qid)

    def delete(self, qid: str) -> Deferred[bool]:
        return self._act("delete", qid)

    def bounce(self, qid: str, reason: str = "default") -> Deferred[bool]:
        return self._act("bounce", qid, reason)


@define
class FakeSessions:
    """A L{SessionsView}: two relay sessions, one of them over TLS."""

    open: dict[tuple[str, bool], int] = field(factory=lambda: {("relay", False): 1, ("relay", True): 1})

    def count(self) -> int:
        return sum(self.open.values())

    def by_mode_and_tls(self) -> dict[tuple[str, bool], int]:
        return dict(self.open)


@define
class FakeFacts:
    """A L{NodeFacts} whose reload succeeds unless told otherwise."""

    config: NodeConfig = field(factory=lambda: parse_config({
        "node": {"name": "fake<node>"},
        "route": [{"domains": ["dead.test"], "action": "relay", "next_hops": ["tcp:127.0.0.1:9"]},
                  {"domains": ["idle.test"], "action": "relay", "next_hops": ["tcp:127.0.0.1:10"]}],
    }))
    started_at: float | None = 1.0
    last_reload: dict[str, Any] | None = None
    last_reload_error: str | None = None
    reload_ok: bool = True

    def reload(self) -> bool:
        if not self.reload_ok:
            self.last_reload_error = "node.toml: queue.minimal_backoff: must be positive"
        return self.reload_ok


@define
class Fakes:
    """The views the web service is given, as fakes; the next hop 127.0.0.1:9 is failing."""

    queue: FakeQueue = field(factory=FakeQueue)
    sessions: FakeSessions = field(factory=FakeSessions)
    node: FakeFacts = field(factory=FakeFacts)
    clock: Clock = field(factory=Clock)
    metrics: NodeMetrics = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.metrics = NodeMetrics(self.queue, self.sessions, self.clock, name=self.node.config.name)
        for _ in range(3):
            self.metrics.observe({"event": "deferred", "relay": "127.0.0.1:9", "recipient": "a@dead.test",
                                  "diagnostic": "connect to 127.0.0.1:9: <refused>"})

    def views(self) -> AdminViews:
        return AdminViews(queue=self.queue, sessions=self.sessions, node=self.node, metrics=self.metrics)


def start(fakes: Fakes, method: str, path: str, body: Any = None, *, host: str | None = "127.0.0.1:8025",
          ctype: str = "application/json", unix: bool = False, read_only: bool = False,
          args: dict[str, str] | None = None) -> DummyRequest:
    """Render one request through the whole site; @return: the request, perhaps not finished yet."""
    site = make_site(fakes.views(), read_only=read_only)
    segments = [s.encode() for s in path.lstrip("/").split("/")]
    req = DummyRequest(segments)
    req.method = method.encode()
    req.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
    if host is not None:
        req.requestHeaders.addRawHeader(b"host", host.encode())
    if method == "POST":
        req.requestHeaders.addRawHeader(b"content-type", ctype.encode())
        req.content = BytesIO(json.dumps(body).encode() if body is not None else b"")
    if unix:
        req.getHost = lambda: UNIXAddress(b"/run/admin.sock")  # type: ignore[method-assign]
    resource = getChildForRequest(site.resource, req)
    result = resource.render(req)
    if isinstance(result, bytes):
        req.write(result)
        req.finish()
    return req


def response(req: DummyRequest) -> tuple[int, Any]:
    """A finished request's status and body (JSON, or text)."""
    assert req.finished, "the response was not finished"
    data = b"".join(req.written)
    status = req.responseCode or 200
    ctype_out = (req.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
    if ctype_out.startswith(b"application/json"):
        return status, json.loads(data)
    return status, data.decode()


def request(fakes: Fakes, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    """Render one request that answers at once; @return: (status, JSON or text)."""
    return response(start(fakes, method, path, body, **kw))


def test_api_reads() -> None:
    """status, queue (with filters), one message, summary, shape, routes, hops, history."""
    fakes = Fakes()
    status, body = request(fakes, "GET", "/api/status")
    assert status == 200 and body["node"] == "fake<node>" and body["queue"]["deferred"] == 1
    assert body["sessions"] == 2 and body["started"] == 1.0 and body["last_reload"] is None
    status, body = request(fakes, "GET", "/api/queue", args={"state": "incoming", "min_age": "1m"})
    assert status == 200 and body["count"] == 1 and body["messages"][0]["queue_id"] == "Q2"
    assert fakes.queue.calls[-1] == ("list", {"state": "incoming", "sender": None, "recipient": None,
                                              "domain": None, "min_age": 60.0})
    status, body = request(fakes, "GET", "/api/queue", args={"limit": "1"})
    assert body["count"] == 2 and [m["queue_id"] for m in body["messages"]] == ["Q1"]
    status, body = request(fakes, "GET", "/api/queue/Q1")
    assert status == 200 and body["headers"] == "Subject: x\r\n"
    status, body = request(fakes, "GET", "/api/summary")
    assert body["messages"] == 2 and body["destinations"][0]["domain"] == "dead.test"
    status, body = request(fakes, "GET", "/api/shape", args={"buckets": "3", "scale": "1"})
    assert body["columns"] == ["1", "2", "2+"]
    status, body = request(fakes, "GET", "/api/routes")
    assert body["routes"][0]["next_hops"][0]["name"] == "127.0.0.1:9"
    status, body = request(fakes, "GET", "/api/hops")
    hops = {h["next_hop"]: h for h in body["hops"]}
    assert hops["127.0.0.1:9"]["state"] == "failing" and hops["127.0.0.1:10"]["state"] == "unknown"
    status, body = request(fakes, "GET", "/api/history")
    assert status == 200 and body["interval"] == 10 and len(body["samples"]) == 1


def test_api_actions() -> None:
    """Each action reaches the queue with its target; answers say what was done."""
    fakes = Fakes()
    calls = fakes.queue.calls
    assert request(fakes, "POST", "/api/queue/flush", {}) == (200, {"flushed": 2})
    assert calls[-1] == ("flush", None, None)
    assert request(fakes, "POST", "/api/queue/flush", {"domain": "dead.test"}) == (200, {"flushed": 2})
    assert calls[-1] == ("flush", None, "dead.test")
    assert request(fakes, "POST", "/api/queue/Q1/flush", None) == (200, {"flushed": 1})
    assert request(fakes, "POST", "/api/queue/reroute", {"domain": "x.test"}) == (200, {"rerouted": 3})
    assert request(fakes, "POST", "/api/queue/Q1/hold") == (200, {"queue_id": "Q1", "held": True})
    assert request(fakes, "POST", "/api/queue/Q1/release") == (200, {"queue_id": "Q1", "released": True})
    assert request(fakes, "POST", "/api/queue/Q2/bounce", {"reason": "spam run"}) == (
        200, {"queue_id": "Q2", "bounced": True})
    assert calls[-1] == ("bounce", "Q2", "spam run")
    assert request(fakes, "POST", "/api/queue/Q1/bounce", {}) == (200, {"queue_id": "Q1", "bounced": True})
    assert calls[-1] == ("bounce", "Q1", "default")
    assert request(fakes, "DELETE", "/api/queue/Q2") == (200, {"queue_id": "Q2", "deleted": True})
    assert request(fakes, "POST", "/api/reload") == (200, {"reloaded": True, "config": "<default>"})


def test_action_applied_after_a_running_attempt() -> None:
    """
    A queue may apply an action on a message being delivered once the
    attempt is over: the API answers then, with what was done.
    """
    fakes = Fakes()
    later: Deferred[bool] = Deferred()
    fakes.queue.later["Q1"] = later
    req = start(fakes, "POST", "/api/queue/Q1/hold")
    assert not req.finished and fakes.queue.calls[-1] == ("hold", "Q1")
    later.callback(True)
    assert response(req) == (200, {"queue_id": "Q1", "held": True})


def test_api_errors() -> None:
    """404 unknown message or path, 405 wrong method, 409 busy, 400 bad input, 422 refused reload."""
    fakes = Fakes()
    assert request(fakes, "POST", "/api/queue/NOPE/hold")[0] == 404
    assert request(fakes, "POST", "/api/queue/NOPE/flush")[0] == 404
    assert request(fakes, "GET", "/api/queue/NOPE")[0] == 404
    assert request(fakes, "GET", "/api/queue/bad%2Fid")[0] == 400
    assert request(fakes, "GET", "/api/nothing")[0] == 404
    assert request(fakes, "GET", "/api/queue/Q1/hold")[0] == 405
    assert request(fakes, "POST", "/api/status")[0] == 405
    assert request(fakes, "GET", "/api/queue/flush")[0] == 405
    assert request(fakes, "POST", "/api/queue/Q1")[0] == 405
    assert request(fakes, "POST", "/api/queue/Q1/explode")[0] == 404
    assert not [c for c in fakes.queue.calls if c[0] != "list"], "nothing reached the queue"
    fakes.queue.busy.add("Q1")
    status, body = request(fakes, "POST", "/api/queue/Q1/delete")
    assert status == 409 and "being delivered" in body["error"]
    assert request(fakes, "GET", "/api/queue", args={"state": "lost"})[0] == 400
    assert request(fakes, "GET", "/api/queue", args={"min_age": "soon"})[0] == 400
    assert request(fakes, "GET", "/api/queue", args={"limit": "-1"})[0] == 400
    assert request(fakes, "POST", "/api/queue/flush", {"queue_id": "Q1", "domain": "x"})[0] == 400
    assert request(fakes, "POST", "/api/queue/flush", {"domain": 5})[0] == 400
    assert request(fakes, "POST", "/api/queue/Q2/bounce", {"reason": "two\nlines"})[0] == 400
    fakes.node.reload_ok = False
    status, body = request(fakes, "POST", "/api/reload")
    assert status == 422 and "queue.minimal_backoff" in body["error"]


def test_message_gone_before_the_action_is_404() -> None:
    """A message that leaves the queue before its action runs answers 404, not 409."""
    fakes = Fakes()
    later: Deferred[bool] = Deferred()
    fakes.queue.later["Q1"] = later
    req = start(fakes, "POST", "/api/queue/Q1/delete")
    fakes.queue.items = fakes.queue.items[1:]
    later.callback(False)
    assert response(req)[0] == 404


def test_failure_in_handler_is_500() -> None:
    """An unexpected exception answers 500 with JSON (and is logged), not a traceback page."""
    fakes = Fakes()
    fakes.queue.hold = lambda qid: fail(RuntimeError("disk on fire"))  # type: ignore[method-assign]
    status, body = request(fakes, "POST", "/api/queue/Q1/hold")
    assert status == 500 and "disk on fire" in body["error"]


def test_guards() -> None:
    """
    POST must be application/json (no cross-site form posts); over TCP the
    Host must be loopback (no DNS rebinding); a UNIX socket needs no Host.
    """
    fakes = Fakes()
    status, body = request(fakes, "POST", "/api/queue/flush", {}, ctype="text/plain")
    assert status == 415 and fakes.queue.calls == []
    assert request(fakes, "GET", "/api/status", host="evil.example:8025")[0] == 421
    assert request(fakes, "GET", "/", host="evil.example")[0] == 421
    assert request(fakes, "GET", "/api/status", host=None)[0] == 421
    for ok in ("localhost:8025", "[::1]:8025", "127.0.0.7"):
        assert request(fakes, "GET", "/api/status", host=ok)[0] == 200, ok
    assert request(fakes, "GET", "/api/status", host=None, unix=True)[0] == 200


def test_read_only_site_has_no_api() -> None:
    """The metrics site serves /metrics and the page to any Host, and no /api."""
    fakes = Fakes()
    assert request(fakes, "GET", "/api/status", read_only=True, host="scraper.example")[0] == 404
    status, text = request(fakes, "GET", "/metrics", read_only=True, host="scraper.example")
    assert status == 200 and "relaynet_next_hop_up" in text
    assert 'relaynet_smtp_sessions{mode="relay",tls="yes"} 1.0' in text
    assert "relaynet_queue_bytes 200.0" in text
    assert request(fakes, "GET", "/", read_only=True, host="scraper.example")[0] == 200


def test_status_page() -> None:
    """The page has the two SVG charts, the routing table, hop health, and escapes what it shows."""
    fakes = Fakes()
    status, page = request(fakes, "GET", "/")
    assert status == 200
    assert page.count("<svg") == 2 and "Queue depth" in page and "Throughput" in page
    assert 'id="routes"' in page and "dead.test" in page and "tcp:127.0.0.1:9" in page
    assert re.search(r"127\.0\.0\.1:9</code></td>\s*<td><span class=\"state failing\">failing", page)
    assert re.search(r"127\.0\.0\.1:10</code></td>\s*<td><span class=\"state unknown\">unknown", page)
    assert '<div class="v">2</div><div class="k">sessions</div>' in page
    assert "fake&lt;node&gt;" in page and "fake<node>" not in page
    assert "&lt;refused&gt;" in page and "<refused>" not in page
    assert request(fakes, "GET", "/nothing/here")[0] == 404
    assert StatusPage(fakes.views()).render_GET(DummyRequest([b""])).startswith(b"<!DOCTYPE html>")


def test_status_chart_plots_history() -> None:
    """Samples become polyline points inside the chart."""
    fakes = Fakes()
    metrics, clock = fakes.metrics, fakes.clock
    for i in range(6):
        metrics.observe({"event": "received", "size": 1})
        clock.advance(10)
        metrics.history.sample()
    page = render_status(fakes.views(), clock.seconds())
    line = re.search(r'data-series="received" points="([^"]+)"', page)
    assert line is not None and len(line.group(1).split()) == 6  # whole intervals only
    line = re.search(r'data-series="queued" points="([^"]+)"', page)
    assert line is not None and len(line.group(1).split()) == 7  # and the depth now


def test_web_service_listens_and_stops() -> None:
    """The admin site listens on its endpoint while the service runs."""
    reactor = MemoryReactor()
    svc = web_service(Fakes().views(), "tcp:8025:interface=127.0.0.1", reactor)
    svc.startService()
    ((port, factory, _, interface),) = reactor.tcpServers
    assert (port, interface) == (8025, "127.0.0.1") and isinstance(factory, Site)
    outcome: list[object] = []
    svc.stopService().addBoth(outcome.append)
    assert not svc.running and outcome == [None]


@implementer(IStreamServerEndpoint)
class RefusingEndpoint:
    """An endpoint that cannot listen: its address is in use."""

    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("127.0.0.1", 8025, OSError("address in use")))


def test_web_service_that_cannot_listen_fails_to_start() -> None:
    """
    An admin endpoint that cannot be bound raises from startService (the node
    does not start without its admin site), instead of being logged only.
    """
    svc = EndpointService(RefusingEndpoint(), make_site(Fakes().views()), "the admin site")
    with pytest.raises(CannotListenError):
        svc.startService()
    assert not svc.running
    assert svc.stopService().called


def test_api_error_class() -> None:
    e = ApiError(404, "gone")
    assert (e.status, e.message, str(e)) == (404, "gone", "gone")


# -- real nodes ----------------------------------------------------------------


NODE_TOML = """\
[node]
name = "{name}"
hostname = "{name}.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["localhost"]
catch_all = true

ROUTES

[queue]
minimal_backoff = 3600
maximal_backoff = 7200
delay_warning = 0

[outbound]
connect_timeout = 5
ADMIN
"""

DEAD_ROUTE = """\
[[route]]
domains = ["dead.test", "*.dead.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DEAD"]
"""

LOCAL_ROUTE = """\
[[route]]
domains = ["dead.test", "*.dead.test"]
action = "local"
"""


def node_toml(dead: int, routes: str = DEAD_ROUTE, admin: str = "") -> str:
    return NODE_TOML.replace("ROUTES", routes.replace("DEAD", str(dead))).replace("ADMIN", admin)


def rewrite(node: NodeProcess, text: str) -> None:
    """Replace a running node's config file (filling in its port and name)."""
    assert node.config_path is not None
    node.config_path.write_text(text.replace("{port}", str(node.port)).replace("{name}", "reload"))


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    s = socket.socket()
    s.bind((HOST, 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def qnode(tmp_path_factory: pytest.TempPathFactory, dead_port: int) -> Iterator[NodeProcess]:
    """One node (admin API on the default socket in its spool) for the queue command tests."""
    with NodeProcess(tmp_path_factory.mktemp("queue-node"), node_toml(dead_port), name="queue") as n:
        yield n


_QUEUED = re.compile(rb"queued as ([0-9A-Z]+)")


def send(node: NodeProcess, sender: str, rcpts: list[str], subject: str = "test") -> str:
    """One message; @return: its queue id."""
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.ehlo("control.test")
        assert s.mail(sender)[0] == 250
        for r in rcpts:
            assert s.rcpt(r)[0] == 250, r
        code, resp = s.data(f"Subject: {subject}\r\nFrom: <{sender}>\r\n\r\nhello\r\n".encode())
    assert code == 250, resp
    m = _QUEUED.search(resp)
    assert m, resp
    return m.group(1).decode()


def events(node: NodeProcess, kind: str, qid: str | None = None) -> list[dict[str, Any]]:
    return [e for e in node.events() if e["event"] == kind and (qid is None or e.get("queue_id") == qid)]


def wait_events(node: NodeProcess, kind: str, qid: str, n: int = 1) -> list[dict[str, Any]]:
    return wait_for(lambda: (lambda es: es if len(es) >= n else None)(events(node, kind, qid)),
                    TIMEOUT, f"{n} {kind} event(s) of {qid}")


def wait_deferred(node: NodeProcess, qid: str, attempts: int = 1) -> dict[str, Any]:
    """
    Wait until the node itself lists C{qid} as deferred (its attempt recorded
    and finished) with C{attempts} attempts on each deferred recipient.
    """
    client = AdminClient(node.config.admin_endpoint)

    def ready() -> dict[str, Any] | None:
        try:
            m = client.request("GET", f"/api/queue/{qid}")
        except AdminError:
            return None
        deferred = [r for r in m["recipients"] if r["status"] == "deferred"]
        ok = m["state"] == "deferred" and deferred and all(r["attempts"] == attempts for r in deferred)
        return m if ok else None

    return wait_for(ready, TIMEOUT, f"{qid} deferred after {attempts} attempt(s)")


def queue(node: NodeProcess, *args: str, stdin: str | None = None, code: int = 0) -> str:
    """Run C{relaynet queue --config NODE ARGS}; check the exit status; @return: stdout."""
    result = subprocess.run(
        [*relaynet_command(), "queue", "--config", str(node.config_path), *args],
        capture_output=True, text=True, timeout=30, input=stdin,
    )
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    return result.stdout + result.stderr


def qjson(node: NodeProcess, *args: str) -> Any:
    return json.loads(queue(node, *args, "--json"))


def listed(node: NodeProcess, *args: str) -> set[str]:
    return {m["queue_id"] for m in qjson(node, "list", *args)["messages"]}


def state_file(node: NodeProcess, qid: str) -> dict[str, Any]:
    return json.loads((node.queue / "state" / qid).read_text())


@pytest.mark.slow
def test_queue_list_and_filters(qnode: NodeProcess) -> None:
    """list shows deferred messages; each filter narrows it; tables, --ids and --json agree."""
    m1 = send(qnode, "alice@a.example", ["x@dead.test"])
    m2 = send(qnode, "bob@b.example", ["y@sub.dead.test", "carol@localhost"])
    m3 = send(qnode, "alice@a.example", ["z@dead.test", "w@dead.test"])
    mine = {m1, m2, m3}
    for qid in mine:
        wait_deferred(qnode, qid)
    result = qjson(qnode, "list")
    by_id = {m["queue_id"]: m for m in result["messages"]}
    assert mine <= set(by_id) and result["count"] == len(result["messages"])
    assert all(by_id[q]["state"] == "deferred" for q in mine)
    assert listed(qnode, "--sender", "ALICE@a.example") & mine == {m1, m3}
    assert listed(qnode, "--domain", "sub.dead.test") & mine == {m2}
    assert listed(qnode, "--recipient", "z@") & mine == {m3}
    assert listed(qnode, "--state", "deferred") & mine == mine
    assert listed(qnode, "--state", "hold") & mine == set()
    assert listed(qnode, "--min-age", "1h") & mine == set()
    assert len(qjson(qnode, "list", "--limit", "1")["messages"]) == 1
    text = queue(qnode, "list")
    assert text.startswith("QUEUE ID") and all(q in text for q in mine)
    assert re.search(rf"{m2}\s+deferred\s+\d+\s+\S+\s+bob@b\.example\s+y@sub\.dead\.test \(deferred\) \+1", text)
    assert set(queue(qnode, "list", "--ids", "--sender", "bob@b.example").split()) & mine == {m2}
    queue(qnode, "list", "--state", "lost", code=2)


@pytest.mark.slow
def test_queue_show(qnode: NodeProcess, dead_port: int) -> None:
    """show: envelope, per-recipient state and attempts, next hop, last error, headers."""
    qid = send(qnode, "dave@d.example", ["y@sub.dead.test", "carol@localhost"], subject="show-me")
    wait_deferred(qnode, qid)
    wait_events(qnode, "delivered", qid)
    m = qjson(qnode, "show", qid)
    assert m["queue_id"] == qid and m["sender"] == "dave@d.example" and m["state"] == "deferred"
    assert [r["address"] for r in m["envelope"]["recipients"]] == ["y@sub.dead.test", "carol@localhost"]
    rcpts = {r["address"]: r for r in m["recipients"]}
    assert rcpts["carol@localhost"]["status"] == "delivered"
    y = rcpts["y@sub.dead.test"]
    assert (y["status"], y["attempts"], y["dsn"], y["remote"]) == ("deferred", 1, "4.4.1", f"127.0.0.1:{dead_port}")
    assert "refused" in y["diagnostic"].lower()
    assert "Subject: show-me" in m["headers"] and m["next_attempt"] > m["arrival"] + 3000
    text = queue(qnode, "show", qid)
    assert "recipients:" in text and "headers:" in text and "Subject: show-me" in text
    assert re.search(r"y@sub\.dead\.test\s+deferred\s+1\s+4\.4\.1", text)
    assert "no message NOPE" in queue(qnode, "show", "NOPE", code=1)


@pytest.mark.slow
def test_queue_hold_and_release(qnode: NodeProcess) -> None:
    """hold is durable and stops delivery; release attempts the message at once."""
    qid = send(qnode, "h@h.example", ["held@dead.test"])
    wait_deferred(qnode, qid)
    assert f"{qid}: held" in queue(qnode, "hold", qid)
    assert state_file(qnode, qid)["held"] is True
    assert qid in listed(qnode, "--state", "hold")
    assert events(qnode, "hold", qid)
    # A flush of a held message says why nothing happened, and the printed
    # release command reaches the same node when pasted as printed.
    said = queue(qnode, "flush", qid)
    assert "not flushed: the message is held; release it first with: " in said, said
    hint = said.split("release it first with: ", 1)[1].strip()
    assert hint.split()[-4:] == ["--config", str(qnode.config_path), "release", qid] or hint.endswith(f"release {qid}")
    assert f"{qid}: released" in queue(qnode, "release", qid)
    wait_events(qnode, "release", qid)
    wait_deferred(qnode, qid, 2)
    wait_for(lambda: state_file(qnode, qid)["recipients"]["held@dead.test"]["attempts"] == 2, TIMEOUT,
             "the second attempt recorded")
    assert state_file(qnode, qid)["held"] is False
    assert qid in listed(qnode, "--state", "deferred")


@pytest.mark.slow
def test_queue_flush(qnode: NodeProcess) -> None:
    """flush one id, one domain, or everything: each flushed message is attempted again now."""
    a = send(qnode, "f@f.example", ["a@dead.test"])
    b = send(qnode, "f@f.example", ["b@flush.dead.test"])
    wait_deferred(qnode, a)
    wait_deferred(qnode, b)
    assert f"{a}: flushed" in queue(qnode, "flush", a)
    wait_deferred(qnode, a, 2)
    assert len(events(qnode, "deferred", b)) == 1
    assert qjson(qnode, "flush", "--domain", "flush.dead.test")["flushed"] == 1
    wait_deferred(qnode, b, 2)
    assert re.search(r"flush: \d+ message\(s\) scheduled", queue(qnode, "flush"))
    wait_deferred(qnode, a, 3)
    wait_deferred(qnode, b, 3)
    assert state_file(qnode, a)["recipients"]["a@dead.test"]["attempts"] >= 3


@pytest.mark.slow
def test_queue_delete(qnode: NodeProcess) -> None:
    """delete removes queue and state files without notice; ids may come from stdin."""
    ids = [send(qnode, "d@localhost", [f"del{i}@dead.test"]) for i in range(3)]
    for qid in ids:
        wait_deferred(qnode, qid)
    assert f"{ids[0]}: deleted" in queue(qnode, "delete", ids[0])
    assert f"{ids[0]}: no message" in queue(qnode, "delete", ids[0], code=1)
    result = json.loads(queue(qnode, "delete", "-", "--json", stdin=f"{ids[1]}\n{ids[2]}\n"))
    assert [r["deleted"] for r in result["results"]] == [True, True]
    for qid in ids:
        assert not (qnode.queue / "new" / qid).exists()
        assert not (qnode.queue / "state" / qid).exists()
        assert events(qnode, "deleted", qid)
        assert not events(qnode, "dsn", qid)
    assert set(ids) & listed(qnode) == set()
    assert maildir_new(qnode.mailroot, "d") == []


@pytest.mark.slow
def test_queue_bounce(qnode: NodeProcess) -> None:
    """bounce returns the message to its sender now, with a DSN carrying the reason."""
    qid = send(qnode, "bounceme@localhost", ["gone@dead.test"], subject="return me")
    wait_deferred(qnode, qid)
    assert f"{qid}: bounced" in queue(qnode, "bounce", qid, "--reason", "returned by the postmaster")
    (ev,) = wait_events(qnode, "bounced", qid)
    assert ev["recipient"] == "gone@dead.test" and ev["dsn"] == "5.0.0"
    assert not (qnode.queue / "new" / qid).exists()
    dsn = wait_for(lambda: maildir_new(qnode.mailroot, "bounceme"), TIMEOUT, "the DSN")
    text = dsn[0].read_text("utf-8", "replace")
    assert "returned by the postmaster" in text and "gone@dead.test" in text and "return me" in text
    assert "no message" in queue(qnode, "bounce", qid, code=1)


@pytest.mark.slow
def test_queue_summary_and_shape(qnode: NodeProcess, dead_port: int) -> None:
    """summary and shape agree with list: counts, octets, destinations, reasons, age buckets."""
    ids = [send(qnode, "s@s.example", [f"s{i}@sum.dead.test"]) for i in range(2)]
    for qid in ids:
        wait_deferred(qnode, qid)
    listing = qjson(qnode, "list")["messages"]
    s = qjson(qnode, "summary", "--top", "50")
    assert s["messages"] == len(listing) and s["bytes"] == sum(m["size"] for m in listing)
    dests = {d["domain"]: d for d in s["destinations"]}
    assert dests["sum.dead.test"] == {"domain": "sum.dead.test", "recipients": 2, "messages": 2}
    assert any(f"127.0.0.1:{dead_port}" in r["reason"] for r in s["deferral_reasons"])
    assert s["oldest"]["queue_id"] == min(listing, key=lambda m: m["arrival"])["queue_id"]
    text = queue(qnode, "summary")
    assert "DESTINATION" in text and "sum.dead.test" in text and "DEFERRAL REASON" in text
    sh = qjson(qnode, "shape")
    rows = {r["domain"]: r for r in sh["rows"]}
    pending = [m for m in listing if any(r["status"] not in ("delivered", "relayed", "bounced")
                                         for r in m["recipients"])]
    assert rows["TOTAL"]["total"] == len(pending) == rows["TOTAL"]["counts"][0]
    assert rows["sum.dead.test"]["counts"][0] == 2
    text = queue(qnode, "shape")
    assert re.search(r"^DOMAIN\s+T\s+5\s+10\s+20 .* 1280\+$", text, re.M)
    assert re.search(r"^sum\.dead\.test\s+2\s+2\s+0", text, re.M)
    by_sender = {r["domain"]: r for r in qjson(qnode, "shape", "--by", "sender")["rows"]}
    assert by_sender["s.example"]["total"] == 2


@pytest.mark.slow
def test_reload_reroute_and_drain(tmp_path: Path, dead_port: int) -> None:
    """
    With the admin API on a loopback TCP port: SIGHUP with a new routing table
    and C{queue reroute} deliver deferred mail by the new route; an invalid
    config is refused (by SIGHUP and by the API) with the old one kept; a valid
    one is applied by the API; the status page shows the chart and the table;
    SIGTERM leaves a deferred message in the queue for the next start.
    """
    admin_port = free_port()
    admin = f'\n[admin]\nendpoint = "tcp:{admin_port}:interface=127.0.0.1"\n'
    with NodeProcess(tmp_path, node_toml(dead_port, admin=admin), name="reload") as node:
        assert node.config_path is not None
        client = AdminClient(node.config.admin_endpoint)
        a = send(node, "r@r.example", ["a@dead.test"])
        b = send(node, "r@r.example", ["b@dead.test"])
        wait_deferred(node, a)
        wait_deferred(node, b)

        def reloads(status: str) -> int:
            return sum(e.get("status") == status for e in events(node, "reload"))

        # A valid new table by SIGHUP; queued mail keeps waiting until rerouted,
        # and a session open across the reload carries on.
        session = RawClient(node.port)
        assert session.cmd(b"EHLO across.reload")[0] == 250
        rewrite(node, node_toml(dead_port, LOCAL_ROUTE, admin))
        node.signal(signal.SIGHUP)
        wait_for(lambda: reloads("reloaded") == 1, TIMEOUT, "the SIGHUP reload")
        try:
            assert session.cmd(b"MAIL FROM:<r@r.example>")[0] == 250
            assert session.cmd(b"RCPT TO:<kept@dead.test>")[0] == 250
            assert session.cmd(b"DATA")[0] == 354
            assert session.cmd(b"Subject: across\r\n\r\nhi\r\n.")[0] == 250
        finally:
            session.close()
        wait_for(lambda: maildir_new(node.mailroot, "kept", "dead.test"), TIMEOUT, "the session's message")
        assert client.request("GET", "/api/routes")["routes"][0]["action"] == "local"
        assert "need a restart" not in node.log_text()
        assert {a, b} <= listed(node)
        assert f"{a}: rerouted" in queue(node, "reroute", a)
        wait_for(lambda: maildir_new(node.mailroot, "a", "dead.test"), TIMEOUT, "a@dead.test delivered")
        # In the mailbox is not yet out of the queue (its outcome is recorded after).
        wait_for(lambda: a not in listed(node), TIMEOUT, "the queue to drop a")
        assert qjson(node, "reroute", "--domain", "dead.test")["rerouted"] == 1
        wait_for(lambda: maildir_new(node.mailroot, "b", "dead.test"), TIMEOUT, "b@dead.test delivered")
        wait_for(lambda: not {a, b} & listed(node), TIMEOUT, "the queue to drop both")

        # An invalid config by SIGHUP: refused, logged, the old one stays.
        rewrite(node, node_toml(dead_port, LOCAL_ROUTE, admin).replace(
            "minimal_backoff = 3600", "minimal_backoff = -1"))
        node.signal(signal.SIGHUP)
        wait_for(lambda: reloads("refused") == 1, TIMEOUT, "the refused SIGHUP reload")
        assert re.search(r"Reload refused, the old configuration stays in force: .*node\.toml: "
                         r"queue\.minimal_backoff: must be positive", node.log_text())
        assert client.request("GET", "/api/routes")["routes"][0]["action"] == "local"
        c = send(node, "r@r.example", ["c@dead.test"])
        wait_events(node, "delivered", c)
        # ... and by the API.
        with pytest.raises(AdminError) as e:
            client.request("POST", "/api/reload", {})
        assert e.value.status == 422 and "queue.minimal_backoff" in e.value.message
        assert reloads("refused") == 2

        # A valid one by the API: back to the dead next hop.
        rewrite(node, node_toml(dead_port, DEAD_ROUTE, admin))
        assert client.request("POST", "/api/reload", {})["reloaded"] is True
        assert client.request("GET", "/api/routes")["routes"][0]["action"] == "relay"
        d = send(node, "r@r.example", ["d@dead.test"])
        wait_deferred(node, d)
        # The metrics count the event, which may follow the state the API shows.
        wait_events(node, "deferred", d)

        page = client.get_text("/")
        assert "<svg" in page and "Queue depth" in page and 'id="routes"' in page
        assert f"tcp:127.0.0.1:{dead_port}" in page and "dead.test, *.dead.test" in page
        assert re.search(rf"127\.0\.0\.1:{dead_port}</code></td>\s*<td><span class=\"state failing\"", page)
        status = client.request("GET", "/api/status")
        assert status["last_reload"]["status"] == "reloaded" and status["queue"]["deferred"] == 1

        # The admin site answers only to a loopback Host over TCP.
        with socket.create_connection((HOST, admin_port), timeout=10) as s:
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: rebind.example\r\nConnection: close\r\n\r\n")
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 421")

        # SIGTERM drains and keeps the queue; the next start has the message.
        # (twistd >= 17 exits with 0 or re-raises the signal: -SIGTERM)
        assert node.terminate() in (0, -signal.SIGTERM)
        assert "relaynet node reload stopped" in node.log_text()
        assert (node.queue / "new" / d).exists()
        node.start()
        assert qjson(node, "show", d)["recipients"][0]["status"] == "deferred"
        assert d in listed(node, "--state", "deferred")
