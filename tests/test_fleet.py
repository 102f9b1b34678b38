"""
Tests for the admin site of a node with workers (L{relaynet.admin.fleet}),
and for the hop-state cache in a node's own C{/api/hops} and C{/metrics}.

 - pure merges: pages, summaries (the merged top is exact), shapes,
   histories, next hops, metrics (sum, min, max by metric);
 - the guards of the site (415, 421) with twisted.web's L{DummyRequest};
 - live: three in-process L{RelayNode}s (the workers) with queued mail
   deferred to a dead next hop, each serving its admin site on a UNIX
   socket, and the fleet site over them, all on one private reactor (not
   the global one) run by the test until a condition holds or a bounded
   time passes. Requests are made by C{relaynet queue}'s own blocking
   client in a thread while the reactor runs, and once by the
   C{relaynet queue} command in a subprocess.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from attrs import define, field
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.python.failure import Failure
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from relaynet.admin.api import ShapeBuilder, shape, summarize
from relaynet.admin.fleet import (
    FleetFacts, PeerWindows, WorkerClient, WorkerLink, client_endpoint, fleet_web_service, make_fleet_site,
    merge_history, merge_hops, merge_metrics, merge_pages, merge_shapes, merge_summaries,
)
from relaynet.admin import queuecli
from relaynet.admin.queuecli import AdminClient, AdminError, add_queue_parser, run
from relaynet.config import NodeConfig, load_config
from relaynet.node import RelayNode
from relaynet.queue.spool import Envelope, Recipient, Spool
from relaynet.queue.window import PeerAnswer, Transfer
from relaynet.testing import ManualThreadPool, ThreadlessReactor

from harness.nodeproc import relaynet_command

TIMEOUT = 20.0


# -- pure merges ----------------------------------------------------------------


def item(qid: str, arrival: float, rcpts: list[str], reason: str = "connection refused") -> dict[str, Any]:
    """A listing item (L{relaynet.queue.listing.entry_summary}'s schema) with deferred recipients."""
    return {
        "queue_id": qid, "state": "deferred", "sender": "s@s.test", "size": 10, "arrival": arrival,
        "age": 1000.0 - arrival,
        "recipients": [{"address": a, "status": "deferred", "attempts": 1, "dsn": "4.4.1", "diagnostic": reason}
                       for a in rcpts],
    }


SHARDS = [
    [item("A1", 100, ["a@x.test"]), item("A2", 300, ["b@x.test", "c@y.test"]), item("A3", 500, ["d@x.test"])],
    [item("B1", 200, ["e@z.test"], "timeout"), item("B2", 300, ["f@y.test"]), item("B3", 400, ["g@z.test"])],
    [item("C1", 50, ["h@y.test"], "timeout"), item("C2", 600, ["i@z.test", "j@y.test"], "timeout")],
]


def test_merge_pages_in_arrival_order() -> None:
    """Pages of each shard, oldest first, merge oldest first; equal arrivals in shard order; cut at limit."""
    merged = merge_pages(SHARDS, None)
    assert [m["queue_id"] for m in merged] == ["C1", "A1", "B1", "A2", "B2", "B3", "A3", "C2"]
    assert [m["queue_id"] for m in merge_pages(SHARDS, 3)] == ["C1", "A1", "B1"]
    assert merge_pages([[], []], 5) == []


def test_merged_summary_is_the_summary_of_the_union() -> None:
    """
    Summaries of each shard (all rows) merge into exactly the summary of
    all the items, whatever C{top}; top rows chosen by shard and then merged
    would not be (the shards' first domains are x.test, z.test, y.test; the
    node's is y.test).
    """
    everything = [i for shard in SHARDS for i in shard]
    for top in (1, 2, 10):
        merged = merge_summaries([summarize(s, 1_000_000) for s in SHARDS], top)
        assert merged == summarize(everything, top)
    assert merge_summaries([summarize(s, 1_000_000) for s in SHARDS], 1)["destinations"] == [
        {"domain": "y.test", "recipients": 4, "messages": 4}]
    naive = merge_summaries([summarize(s, 1) for s in SHARDS], 1)
    assert naive["destinations"] != summarize(everything, 1)["destinations"]
    assert merge_summaries([], 5) == summarize([], 5)


def test_merged_shape_is_the_shape_of_the_union() -> None:
    """Shapes of each shard merge into the shape of all the items (TOTAL and domain rows), top included."""
    everything = [i for shard in SHARDS for i in shard]
    for top in (None, 1):
        merged = merge_shapes([shape(s, buckets=3, scale=5) for s in SHARDS], ShapeBuilder("recipient", 3, 5), top)
        assert merged == shape(everything, buckets=3, scale=5, top=top)


def test_history_sums_point_by_point_from_the_newest() -> None:
    """Samples are aligned from the newest back; a shorter history adds nothing to older points."""

    def sample(t: float, depth: int, received: int = 0) -> dict[str, Any]:
        return {"time": t, "interval": 10.0, "depth": depth, "deferred": depth, "hold": 0,
                "received": received, "delivered": 0, "deferrals": 0, "bounced": 0}

    a = [sample(10, 1), sample(20, 2, 1), sample(25, 3)]
    b = [sample(18, 5, 2), sample(24, 7)]
    merged = merge_history([a, b])
    assert [p["depth"] for p in merged] == [1, 7, 10]
    assert [p["time"] for p in merged] == [10, 20, 25]
    assert merged[1]["received"] == 3
    assert merge_history([]) == []


def test_hops_merge() -> None:
    """
    Counts add up, the latest times win, the streak is the one of the shard
    that heard from the hop last; the connection is up if some shard's is,
    and the shards that have it down are named.
    """

    def hop(sent: int, deferred: int, streak: int, last: float, connection: str | None,
            until: float | None = None) -> dict[str, Any]:
        return {"next_hop": "h:25", "state": "x", "sent": sent, "deferred": deferred, "bounced": 0,
                "consecutive_deferrals": streak, "last_attempt": last, "last_success": None,
                "last_failure": last, "last_error": f"error at {last}", "connection": connection,
                "down_since": None if until is None else until - 60, "down_until": until,
                "down_reason": None if until is None else "refused", "suspended": 2 if until else 0}

    health, states, down = merge_hops([
        (0, [hop(1, 4, 4, 100.0, "down", 500.0)]), (1, [hop(2, 1, 0, 90.0, "up")]),
        (2, [hop(0, 3, 3, 80.0, "down", 400.0)]),
    ])
    (h,) = health
    assert (h.sent, h.deferred, h.consecutive_deferrals, h.last_attempt) == (3, 8, 4, 100.0)
    assert h.state == "failing" and h.last_error == "error at 100.0"
    assert states["h:25"]["connection"] == "up" and down == {"h:25": [0, 2]}
    _, states, down = merge_hops([(0, [hop(1, 4, 4, 100.0, "down", 500.0)]),
                                  (2, [hop(0, 3, 3, 80.0, "down", 400.0)])])
    assert states["h:25"] == {"connection": "down", "down_since": 340.0, "down_until": 400.0,
                              "down_reason": "refused", "suspended": 4}
    _, states, _ = merge_hops([(0, [hop(1, 0, 0, 1.0, None)])])
    assert states == {}


WORKER_A = """\
# HELP relaynet_messages_received_total Messages
# TYPE relaynet_messages_received_total counter
relaynet_messages_received_total{protocol="ESMTP"} 3.0
# HELP relaynet_messages_received_created Messages
# TYPE relaynet_messages_received_created gauge
relaynet_messages_received_created{protocol="ESMTP"} 1000.0
# HELP relaynet_queue_oldest_seconds Age
# TYPE relaynet_queue_oldest_seconds gauge
relaynet_queue_oldest_seconds 50.0
# HELP relaynet_build_info relaynet version
# TYPE relaynet_build_info gauge
relaynet_build_info{node="n",version="1"} 1.0
# HELP relaynet_intake_ack_seconds ack
# TYPE relaynet_intake_ack_seconds histogram
relaynet_intake_ack_seconds_bucket{le="0.1"} 2.0
relaynet_intake_ack_seconds_bucket{le="+Inf"} 3.0
relaynet_intake_ack_seconds_count 3.0
relaynet_intake_ack_seconds_sum 0.5
# HELP relaynet_next_hop_consecutive_deferrals streak
# TYPE relaynet_next_hop_consecutive_deferrals gauge
relaynet_next_hop_consecutive_deferrals{next_hop="h:25"} 4.0
"""
WORKER_B = (WORKER_A.replace('protocol="ESMTP"} 3.0', 'protocol="ESMTP"} 4.0')
            .replace('"ESMTP"} 1000.0', '"ESMTP"} 900.0')
            .replace("oldest_seconds 50.0", "oldest_seconds 70.0")
            .replace('le="0.1"} 2.0', 'le="0.1"} 1.0')
            .replace('h:25"} 4.0', 'h:25"} 2.0'))


def test_metrics_merge_rules() -> None:
    """Counters and histograms add up; _created takes the earliest; the oldest age the largest; info stays 1."""
    fams = merge_metrics([WORKER_A, WORKER_B])

    def value(family: str, sample: str, **labels: str) -> float:
        return fams[family].samples[(sample, tuple(labels.items()))]

    assert value("relaynet_messages_received", "relaynet_messages_received_total", protocol="ESMTP") == 7
    assert value("relaynet_messages_received_created", "relaynet_messages_received_created", protocol="ESMTP") == 900
    assert value("relaynet_queue_oldest_seconds", "relaynet_queue_oldest_seconds") == 70
    assert value("relaynet_build_info", "relaynet_build_info", node="n", version="1") == 1
    assert value("relaynet_intake_ack_seconds", "relaynet_intake_ack_seconds_bucket", le="0.1") == 3
    assert value("relaynet_intake_ack_seconds", "relaynet_intake_ack_seconds_count") == 6
    assert value("relaynet_intake_ack_seconds", "relaynet_intake_ack_seconds_sum") == 1.0
    assert value("relaynet_next_hop_consecutive_deferrals", "relaynet_next_hop_consecutive_deferrals",
                 next_hop="h:25") == 2


def test_client_endpoints() -> None:
    """A worker's server endpoint string is read as the client one that reaches it."""
    assert client_endpoint("unix:/spool/worker-0.sock:mode=600") == "unix:path=/spool/worker-0.sock"
    assert client_endpoint("unix:/a\\:b.sock") == "unix:path=/a\\:b.sock"
    assert client_endpoint("tcp:8025:interface=127.0.0.1") == "tcp:host=127.0.0.1:port=8025"
    assert client_endpoint("unix:path=/x.sock") == "unix:path=/x.sock"
    assert client_endpoint("tcp:host=127.0.0.1:port=9") == "tcp:host=127.0.0.1:port=9"


# -- the guards, without workers ------------------------------------------------------


@define
class Facts:
    """A L{FleetFacts}: the workers the test gives, a count of reloads."""

    config: NodeConfig
    links: list[WorkerLink]
    started_at: float | None = field(factory=time.time)
    last_reload: dict[str, Any] | None = None
    reloads: int = 0
    reload_missing: list[int] | None = None

    def workers(self) -> list[WorkerLink]:
        return list(self.links)

    def reloaded(self, missing: list[int]) -> None:
        self.reloads += 1
        self.reload_missing = missing
        self.last_reload = {"time": time.time(), "status": "reloaded", "source": self.config.source}


def _facts_conform(f: Facts) -> FleetFacts:
    return f  # mypy checks that the fake is a FleetFacts


def render(site_facts: Facts, method: str, path: str, host: str, ctype: str = "application/json",
           read_only: bool = False) -> tuple[int, bytes]:
    """One request through the fleet site over (what looks like) TCP; it must answer at once."""
    client = WorkerClient(site_facts, ThreadlessReactor())
    site = make_fleet_site(site_facts, client, read_only)
    req = DummyRequest([s.encode() for s in path.lstrip("/").split("/")])
    req.method = method.encode()
    req.requestHeaders.addRawHeader(b"host", host.encode())
    if method == "POST":
        req.requestHeaders.addRawHeader(b"content-type", ctype.encode())
        req.content = io.BytesIO(b"{}")  # type: ignore[attr-defined]
    result = getChildForRequest(site.resource, req).render(req)
    if isinstance(result, bytes):
        req.write(result)
        req.finish()
    assert req.finished
    return req.responseCode or 200, b"".join(req.written)


def test_fleet_site_guards(tmp_path: Path) -> None:
    """
    The same guards as a node's admin site, before any worker is asked:
    a non-loopback C{Host:} over TCP (421), a POST that is not JSON (415),
    a bad queue id (400); the read-only site has no API.
    """
    from relaynet.testing import make_config

    facts = Facts(make_config(tmp_path), [WorkerLink(0, "unix:/nonexistent.sock", None, None, 0)])
    assert render(facts, "GET", "/api/status", "rebind.example")[0] == 421
    assert render(facts, "POST", "/api/queue/flush", "localhost:8025", ctype="text/plain")[0] == 415
    status, body = render(facts, "GET", "/api/queue/bad%id", "127.0.0.1")
    assert status == 400 and b"not a queue id" in body
    assert render(facts, "GET", "/api/nothing", "127.0.0.1")[0] == 404
    assert render(facts, "POST", "/api/status", "127.0.0.1")[0] == 405
    assert render(facts, "GET", "/api/status", "anything.example", read_only=True)[0] == 404
    routes = json.loads(render(facts, "GET", "/api/routes", "127.0.0.1")[1])
    assert routes["local_domains"] == ["localhost"]


# -- live: workers on a private reactor --------------------------------------------------


NODE_TOML = """\
[node]
name = "fleet"
hostname = "relay.test"
spool = "{spool}"

[local]
domains = ["localhost"]

[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"

[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:127.0.0.1:{dead}"]

[queue]
minimal_backoff = {backoff}
maximal_backoff = 7200
delay_warning = 0
"""


def queue_message(queue_dir: Path, arrival: float, sender: str, recipients: list[str]) -> str:
    """Commit a message that arrived at C{arrival} to the spool at C{queue_dir}; @return: its queue id."""
    reactor = ThreadlessReactor()
    reactor.advance(arrival)
    spool = Spool(queue_dir, reactor, ManualThreadPool(immediate=True),  # type: ignore[arg-type]
                  clock=reactor.seconds)
    spool.prepare()
    envelope = Envelope(
        queue_id=spool.new_id(), sender=sender,
        recipients=tuple(Recipient(r, route="relay:0") for r in recipients), arrival=arrival, params={},
        client={"ip": "127.0.0.1", "helo": "source.test", "protocol": "ESMTP"}, node="source",
    )
    writer = spool.begin(envelope)
    writer.write(f"Subject: {envelope.queue_id}\r\n\r\nhello\r\n".encode())
    done: list[Any] = []
    writer.commit(hops=1).addBoth(done.append)
    assert not isinstance(done[0], Failure), done
    return envelope.queue_id


#: Messages per shard: (seconds before now, sender, recipients). Arrivals interleave across shards;
#: the busiest domain of the node (y.test, 4) is no shard's busiest.
MAIL = [
    [(500, "a@one.test", ["a@x.test", "b@x.test", "c@x.test"]), (300, "b@one.test", ["d@y.test"]),
     (100, "c@one.test", ["e@y.test"])],
    [(400, "a@two.test", ["f@z.test", "g@z.test", "h@z.test"]), (200, "b@two.test", ["i@y.test"])],
    [(600, "a@three.test", ["j@y.test"]), (50, "b@three.test", ["k@w.test"])],
]


@define
class Fleet:
    """Three worker nodes and the fleet site over them, on one private reactor."""

    tmp: Path
    dead: int
    reactor: Any = field(factory=EPollReactor)
    nodes: list[RelayNode] = field(factory=list)
    ids: list[list[str]] = field(factory=list)
    facts: Facts | None = None
    services: list[Any] = field(factory=list)

    @property
    def sock(self) -> str:
        return str(self.tmp / "admin.sock")

    def config_path(self, shard: int) -> Path:
        return self.tmp / f"w{shard}" / "node.toml"

    def write_config(self, shard: int, backoff: int = 3600) -> None:
        path = self.config_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(NODE_TOML.format(spool=path.parent / "spool", dead=self.dead, backoff=backoff))

    def start(self) -> None:
        now = time.time()
        links = []
        for shard, mail in enumerate(MAIL):
            self.write_config(shard)
            path = self.config_path(shard)
            config = load_config(path)
            self.ids.append([queue_message(config.queue_dir, now - ago, sender, rcpts)
                             for ago, sender, rcpts in mail])
            node = RelayNode(config, self.reactor, threads=2, load_config=functools.partial(load_config, path))
            node.privilegedStartService()
            node.startService()
            self.nodes.append(node)
            links.append(WorkerLink(shard, config.admin_endpoint, 1000 + shard, now, 0))
        self.facts = Facts(load_config(self.config_path(0)), links)
        svc = fleet_web_service(self.facts, f"unix:{self.sock}:mode=600", self.reactor, False)
        svc.startService()
        self.services.append(svc)
        # Every message is recovered, attempted once and deferred (the next hop refuses).
        self.until(lambda: all(n.runner.counts()["deferred"] == len(m) for n, m in zip(self.nodes, MAIL)),
                   "every message deferred")
        # ... and the deferrals counted (the events follow the state the runner shows).
        self.until(lambda: all(sum(h.deferred for h in n.metrics.hops.values()) == sum(len(r) for _, _, r in m)
                               for n, m in zip(self.nodes, MAIL)), "every deferral counted")

    def until(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Run the reactor until C{condition()} is true (at most C{timeout} seconds)."""
        end = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            self.reactor.iterate(0.01)

    def wait(self, d: Deferred[Any], what: str) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        self.until(lambda: out, what)
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def blocking(self, f: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        """Call C{f} in a thread while the reactor runs; @return: its result (or raise its exception)."""
        out: list[tuple[bool, Any]] = []

        def call() -> None:
            try:
                out.append((True, f()))
            except BaseException as e:  # noqa: BLE001 -- handed to the test's thread
                out.append((False, e))

        t = threading.Thread(target=call, daemon=True)
        t.start()
        self.until(lambda: out, what, timeout)
        ok, result = out[0]
        if not ok:
            raise result
        return result

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, sock: str | None = None,
            **query: Any) -> Any:
        """One request to the fleet site (or another admin socket) with C{relaynet queue}'s client."""
        client = AdminClient(f"unix:{sock or self.sock}")
        return self.blocking(lambda: client.request(method, path, body, query), f"{method} {path}")

    def error(self, method: str, path: str, body: dict[str, Any] | None = None, **query: Any) -> AdminError:
        with pytest.raises(AdminError) as e:
            self.api(method, path, body, **query)
        return e.value

    def text(self, path: str) -> str:
        client = AdminClient(f"unix:{self.sock}")
        return str(self.blocking(lambda: client.get_text(path), f"GET {path}"))

    def queue_cli(self, *argv: str) -> tuple[int, str]:
        """C{relaynet queue ARGV} against the fleet site, in-process; @return: exit status and output."""
        parser = argparse.ArgumentParser()
        add_queue_parser(parser.add_subparsers())
        args = parser.parse_args(["queue", *argv])
        args.admin, args.config = f"unix:{self.sock}", None
        args.json = getattr(args, "json", False)
        out = io.StringIO()
        code = self.blocking(lambda: run(args, AdminClient(args.admin), out, io.StringIO()), " ".join(argv))
        return code, out.getvalue()

    def stop_node(self, shard: int) -> None:
        """
        Stop a worker as if its process ended: its admin site stops
        listening and the connections to it close (the fleet's pooled ones
        with them; an in-process node would keep serving those).
        """
        node = self.nodes[shard]
        if node.running:
            self.wait(node.stopService(), f"worker {shard} stopped")
        for svc in self.services:
            self.wait(svc.client.close(), "the pooled connections closed")

    def stop(self) -> None:
        for svc in self.services:
            if svc.running:
                self.wait(svc.stopService(), "the fleet site stopped")
        for shard in range(len(self.nodes)):
            self.stop_node(shard)
        self.reactor.disconnectAll()
        self.reactor.removeAll()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def fleet(tmp_path: Path, dead_port: int) -> Iterator[Fleet]:
    f = Fleet(tmp_path, dead_port)
    try:
        f.start()
        yield f
    finally:
        f.stop()


def all_ids(fleet: Fleet) -> list[str]:
    return [q for ids in fleet.ids for q in ids]


def test_status_sums_the_workers(fleet: Fleet) -> None:
    """The supervisor's facts, the queue counts and sessions of every worker summed, the workers listed."""
    status = fleet.api("GET", "/api/status")
    assert status["node"] == "fleet" and status["queue"]["deferred"] == 7
    assert status["queue"]["incoming"] == 0 and status["sessions"] == 0
    assert status["config"] == str(fleet.config_path(0))
    assert [(w["shard"], w["pid"], w["up"], w["restarts"]) for w in status["workers"]] == [
        (0, 1000, True, 0), (1, 1001, True, 0), (2, 1002, True, 0)]
    assert status["missing_shards"] == []


def test_list_merges_the_shards_in_arrival_order(fleet: Fleet) -> None:
    """
    The listing is every shard's, oldest first across shards, cut to
    C{limit} with the count of all; filters reach every worker.
    """
    listing = fleet.api("GET", "/api/queue")
    assert listing["count"] == 7 and listing["missing_shards"] == []
    arrivals = [m["arrival"] for m in listing["messages"]]
    assert arrivals == sorted(arrivals)
    assert {m["queue_id"] for m in listing["messages"]} == set(all_ids(fleet))
    oldest_first = [fleet.ids[2][0], fleet.ids[0][0], fleet.ids[1][0], fleet.ids[0][1]]
    page = fleet.api("GET", "/api/queue", limit=4)
    assert page["count"] == 7 and [m["queue_id"] for m in page["messages"]] == oldest_first
    # ids=1 (relaynet queue list --ids): each message as its id and arrival, in the same order.
    ids = fleet.api("GET", "/api/queue", ids="1")
    assert ids["count"] == 7 and ids["messages"] == [
        {"queue_id": m["queue_id"], "arrival": m["arrival"]} for m in listing["messages"]]
    y = fleet.api("GET", "/api/queue", domain="y.test")
    assert y["count"] == 4 and {m["queue_id"] for m in y["messages"]} == {
        fleet.ids[0][1], fleet.ids[0][2], fleet.ids[1][1], fleet.ids[2][0]}
    assert fleet.api("GET", "/api/queue", sender="two.test")["count"] == 2
    assert fleet.api("GET", "/api/queue", min_age="350")["count"] == 3
    assert fleet.error("GET", "/api/queue", state="lost").status == 400


def test_list_pages_with_a_cursor_across_shards(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{after} (the last item's arrival and queue id) pages through the
    merged listing: every message once, in order, the count of those after
    the cursor; C{relaynet queue list --ids} prints the whole listing a
    page at a time; a cursor that is not one is refused.
    """
    every = [m["queue_id"] for m in fleet.api("GET", "/api/queue", ids="1")["messages"]]
    seen: list[str] = []
    after = None
    for _ in range(5):
        page = fleet.api("GET", "/api/queue", ids="1", limit=2, **({"after": after} if after else {}))
        assert page["count"] == 7 - len(seen) and page["missing_shards"] == []
        seen += [m["queue_id"] for m in page["messages"]]
        if len(page["messages"]) < 2:
            break
        after = f"{page['messages'][-1]['arrival']!r}:{page['messages'][-1]['queue_id']}"
    assert seen == every and len(every) == 7
    y = fleet.api("GET", "/api/queue", domain="y.test", ids="1")["messages"]
    later = fleet.api("GET", "/api/queue", domain="y.test", ids="1", after=f"{y[1]['arrival']!r}:{y[1]['queue_id']}")
    assert later["count"] == 2 and later["messages"] == y[2:]

    requests: list[dict[str, Any]] = []
    request = AdminClient.request

    def counted(self: AdminClient, method: str, path: str, *a: Any, **kw: Any) -> Any:
        requests.append(dict(kw.get("query") or {}))
        return request(self, method, path, *a, **kw)

    monkeypatch.setattr(queuecli, "IDS_PAGE", 2)
    monkeypatch.setattr(AdminClient, "request", counted)
    code, out = fleet.queue_cli("list", "--ids")
    assert code == 0 and out.split() == every
    assert [q["limit"] for q in requests] == [2, 2, 2, 2] and "after" not in requests[0]
    del requests[:]
    code, out = fleet.queue_cli("list", "--ids", "--limit", "3")
    assert out.split() == every[:3] and [q["limit"] for q in requests] == [2, 1]
    # The table too, a page at a time, its last line counting every page.
    monkeypatch.setattr(queuecli, "LIST_PAGE", 2)
    del requests[:]
    code, out = fleet.queue_cli("list")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("QUEUE ID") and [line.split()[0] for line in lines[1:-1]] == every
    assert lines[-1].startswith("-- 7 message(s), ") and [q["limit"] for q in requests] == [2, 2, 2, 2]
    # And --json: the same document as the whole listing's, a page at a time.
    del requests[:]
    code, out = fleet.queue_cli("list", "--json")
    asked = [q["limit"] for q in requests]
    whole = fleet.api("GET", "/api/queue")

    def timeless(listing: dict[str, Any]) -> dict[str, Any]:
        return {**listing, "messages": [{k: v for k, v in m.items() if k != "age"} for m in listing["messages"]]}

    assert code == 0 and timeless(json.loads(out)) == timeless(whole)
    assert [m["queue_id"] for m in whole["messages"]] == every and asked == [2, 2, 2, 2]
    for bad in ("nope", "1.5", "inf:Q1", "1.5:../x", ":Q1"):
        assert fleet.error("GET", "/api/queue", after=bad).status == 400


def test_verbs_on_one_message_find_its_shard(fleet: Fleet) -> None:
    """show, hold, release, flush, bounce and delete reach the worker holding the message; others: 404."""
    qid = fleet.ids[1][1]
    shown = fleet.api("GET", f"/api/queue/{qid}")
    assert shown["queue_id"] == qid and f"Subject: {qid}" in shown["headers"]
    assert fleet.api("POST", f"/api/queue/{qid}/hold", {}) == {"queue_id": qid, "held": True}
    state = json.loads((fleet.nodes[1].config.queue_dir / "state" / qid).read_text())
    assert state["held"] is True
    assert fleet.nodes[1].runner.counts()["hold"] == 1
    assert fleet.api("GET", "/api/queue", state="hold")["messages"][0]["queue_id"] == qid
    assert fleet.api("POST", f"/api/queue/{qid}/release", {}) == {"queue_id": qid, "released": True}
    assert fleet.api("POST", f"/api/queue/{fleet.ids[0][0]}/flush", {}) == {"flushed": 1}
    assert fleet.api("POST", "/api/queue/flush", {"queue_id": fleet.ids[2][1]}) == {"flushed": 1}
    gone = fleet.ids[2][0]
    assert fleet.api("POST", f"/api/queue/{gone}/bounce", {"reason": "returned"}) == {
        "queue_id": gone, "bounced": True}
    fleet.until(lambda: gone not in fleet.nodes[2].runner, "the bounced message gone")
    deleted = fleet.ids[0][2]
    assert fleet.api("DELETE", f"/api/queue/{deleted}") == {"queue_id": deleted, "deleted": True}
    assert not (fleet.nodes[0].config.queue_dir / "new" / deleted).exists()
    assert fleet.error("GET", f"/api/queue/{deleted}").status == 404
    assert fleet.error("POST", "/api/queue/NOPE/hold", {}).status == 404
    assert fleet.error("GET", "/api/queue/bad%7Eid%21").status == 400
    # The bounce queued a DSN to a@three.test on shard 2 (it waits for the dead hop too).
    fleet.until(lambda: sum(n.runner.counts()["deferred"] for n in fleet.nodes) == 6, "the flushed ones deferred")
    assert fleet.api("GET", "/api/status")["queue"] == {"incoming": 0, "active": 0, "deferred": 6, "hold": 0}


def test_flush_and_reroute_sum_the_workers(fleet: Fleet) -> None:
    """A flush or reroute of all, or of a domain, is each worker's; the counts add up."""
    assert fleet.api("POST", "/api/queue/flush", {}) == {"flushed": 7, "missing_shards": []}
    fleet.until(lambda: all(n.runner.counts()["active"] == 0 for n in fleet.nodes), "the flush attempted")
    assert fleet.api("POST", "/api/queue/flush", {"domain": "y.test"})["flushed"] == 4
    fleet.until(lambda: all(n.runner.counts()["active"] == 0 for n in fleet.nodes), "the flush attempted")
    assert fleet.api("POST", "/api/queue/reroute", {"domain": "z.test"})["rerouted"] == 1
    assert fleet.error("POST", "/api/queue/flush", {"queue_id": "NOPE"}).status == 404


def test_summary_and_shape_merge(fleet: Fleet) -> None:
    """
    The summary and shape of the node are those of every queued message
    together: the top destination (y.test) is no single worker's top.
    """
    listing = fleet.api("GET", "/api/queue")["messages"]
    s = fleet.api("GET", "/api/summary", top=1)
    expected = summarize(listing, 1)
    assert s["destinations"] == [{"domain": "y.test", "recipients": 4, "messages": 4}]
    for key in ("messages", "bytes", "recipients", "states", "destinations", "deferral_reasons"):
        assert s[key] == expected[key], key
    assert s["oldest"]["queue_id"] == fleet.ids[2][0]
    filtered = fleet.api("GET", "/api/summary", sender="one.test")
    assert filtered["messages"] == 3 and filtered["recipients"] == 5
    sh = fleet.api("GET", "/api/shape", buckets=3, scale=5, top=2)
    assert sh["rows"] == shape(listing, buckets=3, scale=5, top=2)["rows"]
    assert sh["rows"][0] == {"domain": "TOTAL", "total": 7, "counts": [3, 3, 1]}  # 50 s to 600 s old
    assert fleet.error("GET", "/api/shape", buckets=1).status == 400


def test_hops_history_and_routes(fleet: Fleet) -> None:
    """
    Next hops merged (the dead hop's deferrals summed, its connection down
    on every shard, from each worker's hop-state cache), history summed,
    routes from the supervisor's config.
    """
    hop = f"127.0.0.1:{fleet.dead}"
    hops = {h["next_hop"]: h for h in fleet.api("GET", "/api/hops")["hops"]}
    dead = hops[hop]
    # The deferral streak (so the state) is the one of the worker that tried the hop last.
    latest = max((n.metrics.hops[hop] for n in fleet.nodes), key=lambda h: h.last_attempt or 0)
    assert dead["deferred"] == 11 and dead["consecutive_deferrals"] == latest.consecutive_deferrals
    assert dead["state"] == latest.state and dead["last_attempt"] == latest.last_attempt
    assert dead["connection"] == "down" and dead["down_shards"] == [0, 1, 2]
    assert dead["down_until"] > time.time() and "refused" in dead["down_reason"].lower()
    history = fleet.api("GET", "/api/history")
    assert history["samples"][-1]["depth"] == 7 and history["interval"] == 10
    routes = fleet.api("GET", "/api/routes")
    assert routes["routes"][0]["next_hops"][0]["name"] == hop


def test_a_node_shows_its_hop_state_cache(fleet: Fleet) -> None:
    """
    A single node's own C{/api/hops} and C{/metrics} show the hop-state
    cache: the dead next hop is down (C{relaynet_next_hop_reachable} 0),
    and the other fields of the entry are as before.
    """
    hop = f"127.0.0.1:{fleet.dead}"
    sock = str(fleet.nodes[0].config.queue_dir.parent / "admin.sock")
    hops = {h["next_hop"]: h for h in fleet.api("GET", "/api/hops", sock=sock)["hops"]}
    assert hops[hop]["connection"] == "down" and hops[hop]["deferred"] == 5
    assert hops[hop]["state"] == "failing" and hops[hop]["suspended"] >= 0
    text = str(fleet.blocking(lambda: AdminClient(f"unix:{sock}").get_text("/metrics"), "a worker's /metrics"))
    assert sample_values(text)[("relaynet_next_hop_reachable", (("next_hop", hop),))] == 0
    page = str(fleet.blocking(lambda: AdminClient(f"unix:{sock}").get_text("/"), "a worker's page"))
    assert '<span class="state failing">down</span>' in page


def sample_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def test_metrics_sum_the_workers(fleet: Fleet) -> None:
    """/metrics parses back: counters and queue gauges summed, the workers' gauges, the hop down."""
    hop = f"127.0.0.1:{fleet.dead}"
    m = sample_values(fleet.text("/metrics"))
    assert m[("relaynet_queue_messages", (("state", "deferred"),))] == 7
    assert m[("relaynet_queue_recipients", (("status", "deferred"),))] == 11
    assert m[("relaynet_delivery_attempts_total", (("next_hop", hop), ("result", "deferred")))] == 11
    assert m[("relaynet_domain_deliveries_total", (("domain", "y.test"), ("result", "deferred")))] == 4
    assert m[("relaynet_next_hop_reachable", (("next_hop", hop),))] == 0
    assert m[("relaynet_next_hop_consecutive_deferrals", (("next_hop", hop),))] == 2  # min: shard 2
    assert m[("relaynet_build_info", (("node", "fleet"), ("version", __import__("relaynet").__version__)))] == 1
    assert 550 <= m[("relaynet_queue_oldest_seconds", ())] < 660
    assert m[("relaynet_workers", ())] == 3 and m[("relaynet_workers_up", ())] == 3
    assert [m[("relaynet_worker_up", (("shard", str(k)),))] for k in range(3)] == [1, 1, 1]


def test_status_page(fleet: Fleet) -> None:
    """One page for the node: the workers table, the queue of all shards, the hop down."""
    page = fleet.text("/")
    assert 'id="workers"' in page and "<td class=\"n\">1002</td>" in page
    assert '<div class="v">7</div><div class="k">queued</div>' in page
    assert "y.test" in page and 'id="missing"' not in page
    assert '<span class="state failing">down</span>' in page


def test_a_worker_that_is_down(fleet: Fleet) -> None:
    """
    A stopped worker (its socket refuses) or one being restarted (no pid):
    answers carry the other shards and name the missing one; a message not
    found elsewhere is 503, not 404; /metrics marks the worker down.
    """
    fleet.stop_node(1)
    status = fleet.api("GET", "/api/status")
    assert status["missing_shards"] == [1] and status["queue"]["deferred"] == 5
    assert [w["up"] for w in status["workers"]] == [True, False, True]
    listing = fleet.api("GET", "/api/queue")
    assert listing["count"] == 5 and listing["missing_shards"] == [1]
    # relaynet queue list prints what it has and fails with one line.
    with pytest.raises(AdminError) as failed:
        fleet.queue_cli("list", "--ids")
    assert failed.value.status == 503 and "incomplete: worker shard(s) 1 did not answer" in failed.value.message
    for path in (f"/api/queue/{fleet.ids[1][0]}", "/api/queue/NOPE"):
        e = fleet.error("GET", path)
        assert e.status == 503 and "shard 1 is not answering; try again" in e.message
    assert fleet.api("GET", f"/api/queue/{fleet.ids[0][0]}")["queue_id"] == fleet.ids[0][0]
    assert fleet.api("POST", "/api/queue/flush", {})["flushed"] == 5
    m = sample_values(fleet.text("/metrics"))
    assert m[("relaynet_worker_up", (("shard", "1"),))] == 0 and m[("relaynet_workers_up", ())] == 2
    assert m[("relaynet_queue_messages", (("state", "deferred"),))] + \
        m[("relaynet_queue_messages", (("state", "active"),))] == 5
    assert "shard 1 not answering" in fleet.text("/")
    assert fleet.facts is not None
    fleet.facts.links[2] = WorkerLink(2, fleet.facts.links[2].endpoint, None, None, 1)
    status = fleet.api("GET", "/api/status")
    assert status["missing_shards"] == [1, 2] and status["workers"][2]["pid"] is None
    assert fleet.api("GET", "/api/summary")["messages"] == 3


def test_a_worker_that_does_not_answer_in_time(fleet: Fleet, tmp_path: Path) -> None:
    """A worker that accepts the connection but never answers is missing after the timeout."""
    assert fleet.facts is not None
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen(5)
    try:
        fleet.facts.links.append(WorkerLink(3, f"unix:{tmp_path / 'mute.sock'}", 4242, time.time(), 0))
        client = WorkerClient(fleet.facts, fleet.reactor, timeout=0.5)
        started = time.monotonic()
        g = fleet.wait(client.gather("GET", "/api/status"), "the gather")
        assert g.missing == [3] and [a.shard for a in g.answers] == [0, 1, 2]
        assert time.monotonic() - started < 5
        fleet.wait(client.close(), "the pool closed")
    finally:
        mute.close()


def test_peer_windows_say_who_holds_a_transfer_and_who_cannot_tell(fleet: Fleet) -> None:
    """
    A worker asks the others' sites (C{GET /api/transfer}) for a transfer
    made again: the one that holds it gives its queue id; none holding it
    is a plain no; a worker still recovering its queue (window not
    complete) answers 503 and one that is stopped does not answer: both
    are named as unsure, and the transfer then waits (451) rather than
    being queued a second time.
    """
    held = Transfer("up/Q1", "d" * 32, frozenset({"bob@x.test"}), "QID1", time.time())
    fleet.nodes[1].window.note(held)
    peers = PeerWindows({k: fleet.nodes[k].config.admin_endpoint for k in (1, 2)}, fleet.reactor, timeout=2.0)
    try:
        def ask(origin: str, recipients: list[str]) -> PeerAnswer:
            answer: PeerAnswer = fleet.wait(peers.lookup(origin, "d" * 32, recipients), f"the lookup of {origin}")
            return answer

        assert ask("up/Q1", ["bob@x.test"]) == PeerAnswer("QID1", ())
        assert ask("up/Q1", ["bob@x.test", "new@x.test"]) == PeerAnswer(None, ())
        assert ask("up/Q2", ["bob@x.test"]) == PeerAnswer(None, ())
        fleet.nodes[2].window.complete = False
        e = fleet.error("GET", "/api/transfer", sock=fleet.nodes[2].config.admin_endpoint.split(":", 1)[1],
                        origin="up/Q2", digest="d" * 32)
        assert e.status == 503 and "being recovered" in e.message
        assert ask("up/Q1", ["bob@x.test"]) == PeerAnswer("QID1", ())
        assert ask("up/Q2", ["bob@x.test"]) == PeerAnswer(None, (2,))
        fleet.nodes[2].window.complete = True
        fleet.stop_node(1)
        fleet.wait(peers.close(), "the pooled connections closed")  # as a process that ended closes them
        assert ask("up/Q1", ["bob@x.test"]) == PeerAnswer(None, (1,))
    finally:
        fleet.wait(peers.close(), "the pool closed")


def test_reload_fans_out(fleet: Fleet) -> None:
    """
    A reload reloads every worker and then the supervisor; a refusal by a
    worker is a 422 with its error, and the supervisor does not reload.
    """
    assert fleet.facts is not None
    for shard in range(3):
        fleet.write_config(shard, backoff=1800)
    answer = fleet.api("POST", "/api/reload", {})
    assert answer == {"reloaded": True, "config": str(fleet.config_path(0)), "workers": 3, "missing_shards": []}
    assert fleet.facts.reloads == 1
    assert all(n.config.queue.minimal_backoff == 1800 for n in fleet.nodes)
    # The status says which worker reloaded when.
    workers = fleet.api("GET", "/api/status")["workers"]
    assert [(w["last_reload"] or {}).get("status") for w in workers] == ["reloaded"] * 3
    fleet.config_path(2).write_text(fleet.config_path(2).read_text().replace("minimal_backoff = 1800",
                                                                             "minimal_backoff = -1"))
    e = fleet.error("POST", "/api/reload", {})
    assert e.status == 422 and "queue.minimal_backoff" in e.message and "old configuration stays" in e.message
    assert fleet.facts.reloads == 1
    # A worker down: the others and the supervisor reload, and the answer says which did not.
    fleet.write_config(2, backoff=1200)
    fleet.stop_node(1)
    answer = fleet.api("POST", "/api/reload", {})
    assert answer["workers"] == 2 and answer["missing_shards"] == [1] and fleet.facts.reloads == 2
    assert fleet.nodes[2].config.queue.minimal_backoff == 1200
    assert fleet.facts.reload_missing == [1]  # the supervisor passes the reload on to it (SIGHUP)


def test_relaynet_queue_works_against_the_fleet(fleet: Fleet) -> None:
    """C{relaynet queue} list, show, summary, hold and shape, unchanged, against the fleet's socket."""
    code, out = fleet.queue_cli("list")
    assert code == 0 and all(q in out for q in all_ids(fleet)) and "-- 7 message(s)" in out
    code, out = fleet.queue_cli("list", "--limit", "2", "--ids")
    assert out.split() == [fleet.ids[2][0], fleet.ids[0][0]]
    code, out = fleet.queue_cli("show", fleet.ids[1][0])
    assert code == 0 and "f@z.test" in out and "headers:" in out
    code, out = fleet.queue_cli("summary")
    assert code == 0 and out.startswith("7 message(s)") and "y.test" in out
    code, out = fleet.queue_cli("hold", fleet.ids[2][1], "NOPE")
    assert code == 1 and f"{fleet.ids[2][1]}: held" in out
    code, out = fleet.queue_cli("shape")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["TOTAL", "7"]
    # And the command itself, in a subprocess.
    proc = subprocess.Popen([*relaynet_command(), "queue", "--admin", f"unix:{fleet.sock}", "list", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fleet.until(lambda: proc.poll() is not None, "relaynet queue list")
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["count"] == 7
