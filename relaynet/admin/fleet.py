# -*- test-case-name: tests.test_fleet -*-
"""
The admin site of a node with workers (C{[node] workers = N}): one admin
endpoint and one read-only metrics endpoint for the whole node, in the
supervisor, over the admin sites of its workers.

Each worker is a full node owning a shard of the spool and serves the normal
admin site (L{relaynet.admin.api}) on a private socket. This site serves the
same URLs with the same JSON schema (so C{relaynet queue} works unchanged),
answering each request by asking the workers -- all of them at once, through
one persistent L{HTTPConnectionPool}, each request bounded by
L{WORKER_TIMEOUT} -- and merging their answers:

 - C{/api/status}: the supervisor's own facts (name, pid, config, started,
   listeners, admin endpoint, last reload), the workers' queue counts and
   sessions summed, and C{workers}: C{{shard, pid, up, started, restarts}}.
 - C{/api/queue}: counts summed; the pages merged by arrival (each worker
   lists oldest first; equal arrivals by queue id), cut to C{limit}.
 - C{/api/queue/ID} and the verbs on one message (also a flush or reroute
   with a C{queue_id}): every worker is asked; the one that does not answer
   404 gives the answer.
 - C{POST /api/queue/flush} and C{reroute}: the counts summed.
 - C{/api/summary} and C{/api/shape}: counts summed, per domain and per
   reason too; the workers are asked for every row (L{ALL_ROWS}) and the
   top rows chosen after summing, so the merged top is exact (a worker's
   top 10 need not hold the node's).
 - C{/api/routes}: the supervisor's configuration.
 - C{/api/hops}: per next hop, counts summed, the last times the latest,
   the deferral streak and the state of the worker that heard from the hop
   last; the hop-state cache's C{connection} is C{up} if some worker
   connects to it (C{down_shards} lists those that do not).
 - C{/api/history}: the samples summed point by point, aligned from the
   newest (each worker's last sample is the interval in progress) back.
 - C{POST /api/reload}: every worker reloads; if all that answered did, the
   supervisor re-reads its own configuration and passes the reload on to
   the workers that did not answer (L{FleetFacts.reloaded}); a refusal is
   answered 422 with that worker's error.

A worker that is down (no pid: being restarted) or does not answer in time
(or answers 5xx) is left out: aggregated answers carry C{missing_shards}
(always present, C{[]} when all answered), the status page says so, and a
verb on a message that no worker answering has is answered 503 ("shard K is
not answering; try again"), not 404, while some shard is missing.

C{/metrics} scrapes every worker and exposes, per metric and label set:

 ============================================ ======= =======================
 metric                                       merge   why
 ============================================ ======= =======================
 counters, histograms (buckets, _sum,         sum     events of disjoint
 _count), queue and session gauges                    shards add up
 C{*_created}                                 min     the first worker's start
 C{relaynet_build_info}                       max     the same labels on every
                                                      worker: 1
 C{relaynet_queue_oldest_seconds}             max     the oldest of all shards
 C{relaynet_next_hop_up}                      max     up when some worker's
                                                      last answer was not a
                                                      deferral
 C{relaynet_next_hop_consecutive_deferrals}   min     the streak every worker
                                                      has at least
 C{relaynet_next_hop_reachable}               max     reachable when some
                                                      worker connects to it
 ============================================ ======= =======================

(a metric not in the table is summed), plus C{relaynet_workers} (workers
configured), C{relaynet_workers_up} (workers that answered this scrape) and
C{relaynet_worker_up{shard="K"}} (1 answered, 0 missing). A missing
worker's series are simply absent from the sums: counters of a restarted
worker start again from 0, which C{rate()} reads as a counter reset.
"""

from __future__ import annotations

import heapq
import json
import time
import urllib.parse
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from attrs import Factory, define, frozen
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as StreamProtocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from relaynet.admin.api import (
    _QUEUE_ID, HOP_STATE_FIELDS, ApiError, JsonAPI, PageResource, ShapeBuilder, StatusData, SummaryBuilder,
    _arg, _int_arg, _target, bounce_reason, guarded_site, hop_entries, list_cursor, query_filters, render_page,
    routes_json, shape_builder, status_json,
)
from relaynet.admin.metrics import HopHealth, Sample
from relaynet.admin.text import human_age
from relaynet.admin.views import STATES, NodeIdentity
from relaynet.config import split_endpoint
from relaynet.queue.window import PeerAnswer
from relaynet.smtp.netio import EndpointService

#: Seconds a worker has to answer one request.
WORKER_TIMEOUT = 30.0
#: Seconds the other workers have to say whether they hold a transfer (a
#: final dot waits for them, rarely: only for a transfer made again).
PEER_TIMEOUT = 5.0
#: The longest answer read from a worker (a listing of many messages is long).
MAX_ANSWER = 256 << 20
#: The C{top} asked of each worker for summaries: every row, so that the merged top is exact.
ALL_ROWS = 1_000_000
#: How far back the workers' histories go (L{relaynet.admin.metrics.History}'s span).
HISTORY_SPAN = 1800.0
#: How each metric family is merged (L{merge_metrics}); others are summed.
METRIC_MERGE = {
    "relaynet_build_info": "max",
    "relaynet_queue_oldest_seconds": "max",
    "relaynet_next_hop_up": "max",
    "relaynet_next_hop_consecutive_deferrals": "min",
    "relaynet_next_hop_reachable": "max",
}
_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": lambda a, b: a + b, "min": min, "max": max}


@frozen
class WorkerLink:
    """
    One worker as the supervisor knows it.

    @ivar shard: which shard of the spool it owns.
    @ivar endpoint: the endpoint of its admin site (C{unix:/spool/worker-0.sock};
        a server endpoint string is read as the client one).
    @ivar pid: its process id; C{None} while it is down or being restarted.
    @ivar started: when it started (C{time.time()}).
    @ivar restarts: how many times it was restarted.
    """

    shard: int
    endpoint: str
    pid: int | None
    started: float | None
    restarts: int


class FleetFacts(NodeIdentity, Protocol):
    """
    What the fleet site reads of the supervisor: who the node is (its
    configuration, start, last reload) and its workers.
    """

    def workers(self) -> list[WorkerLink]:
        """The workers, one per shard."""

    def reloaded(self, missing: list[int]) -> None:
        """
        Every worker that answered reloaded: re-read the supervisor's own
        configuration, and pass the reload (SIGHUP) to the workers of the
        C{missing} shards that run (one still starting reloads once it has
        started; one that was being restarted reads the file as it starts).
        """


def client_endpoint(endpoint: str) -> str:
    """
    The client endpoint string that reaches a server endpoint (C{unix:PATH:mode=600}
    -> C{unix:path=PATH}, C{tcp:PORT:interface=IP} -> C{tcp:host=IP:port=PORT});
    a client string is returned as it is.
    """
    kind, args, kw = split_endpoint(endpoint)

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    if kind == "unix":
        path = args[0] if args else kw.get("path") or kw.get("address") or ""
        return f"unix:path={esc(path)}"
    if kind in ("tcp", "tcp6") and "host" not in kw and len(args) < 2:
        host = kw.get("interface") or ("::1" if kind == "tcp6" else "127.0.0.1")
        port = args[0] if args else kw.get("port", "")
        return f"tcp:host={esc(host)}:port={port}"
    return endpoint


@frozen
class Answer:
    """One worker's answer: its HTTP status and body (JSON decoded, or text)."""

    shard: int
    status: int
    body: Any

    def error(self) -> str:
        """The error message of an error answer."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return str(self.body["error"])
        return f"HTTP {self.status}"


@frozen
class Gathered:
    """
    What the workers answered to one request.

    @ivar links: the workers as they were when asked.
    @ivar answers: the answers, by shard.
    @ivar missing: the shards that did not answer (down, timed out, 5xx), sorted.
    """

    links: list[WorkerLink]
    answers: list[Answer]
    missing: list[int]

    def ok(self) -> list[Answer]:
        """
        The answers, all 200.

        @raise ApiError: a worker refused the request (the first refusal).
        """
        for a in self.answers:
            if a.status != 200:
                raise ApiError(a.status, a.error())
        return self.answers


@implementer(IBodyProducer)
class _JsonBody:
    """A request body of a few bytes, written at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data) if data else UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Body(StreamProtocol):
    """Collects a response body of at most C{limit} octets into C{done}."""

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.stop()
            if not self.done.called:
                self.done.errback(ValueError(f"the answer is longer than {self.limit} octets"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def stop(self) -> None:
        """Abandon the response: its connection is closed, not reused."""
        producer = self.transport  # a TransportProxyProducer: stopping it closes the connection
        if producer is not None:
            producer.stopProducing()  # type: ignore[attr-defined]


def _read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """
    The body of C{response}; cancelling the Deferred closes the connection
    (L{readBody}'s canceller cannot: the transport an L{Agent} response
    gives has no C{abortConnection}).
    """
    protocol: _Body | None = None

    def cancel(d: Deferred[bytes]) -> None:
        if protocol is not None:
            protocol.stop()

    done: Deferred[bytes] = Deferred(cancel)
    protocol = _Body(done, limit)
    response.deliverBody(protocol)
    return done


@implementer(IAgentEndpointFactory)
class _WorkerEndpoints:
    """
    The endpoint of each worker's admin site, for an L{Agent}: a worker is
    addressed as C{http://localhost:<shard + 1>/} (one pool key per shard;
    a C{Host:} the worker's site accepts over TCP too).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.endpoints: dict[int, str] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = clientFromString(self.reactor, client_endpoint(self.endpoints[uri.port - 1]))
        return endpoint


class WorkerClient:
    """
    Asks the workers' admin sites, concurrently, through one persistent
    connection pool; each request is abandoned after C{timeout} seconds.
    """

    log = Logger()

    def __init__(self, facts: FleetFacts | None, reactor: Any, timeout: float = WORKER_TIMEOUT) -> None:
        """
        @param facts: the workers, for L{gather} (C{None}: L{call} only).
        """
        self.facts = facts
        self.reactor = reactor
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self._endpoints = _WorkerEndpoints(reactor)
        self.agent = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self.pool)

    def call(
        self, link: WorkerLink, method: str, path: str, query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Deferred[Answer]:
        """One request to one worker; fails if it cannot be made or times out."""
        self._endpoints.endpoints[link.shard] = link.endpoint
        url = f"http://localhost:{link.shard + 1}{path}"
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        if q:
            url += "?" + urllib.parse.urlencode(q)
        headers = Headers({b"accept": [b"application/json"]})
        producer = None
        if method == "POST":
            headers.addRawHeader(b"content-type", b"application/json")
            producer = _JsonBody(json.dumps(dict(body or {})).encode("utf-8"))
        d: Deferred[Any] = self.agent.request(method.encode("ascii"), url.encode("ascii"), headers, producer)

        def received(response: Any) -> Deferred[Answer]:
            ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]

            def decoded(raw: bytes) -> Answer:
                if ctype.startswith(b"application/json"):
                    return Answer(link.shard, response.code, json.loads(raw) if raw.strip() else {})
                return Answer(link.shard, response.code, raw.decode("utf-8", "replace"))

            return _read_body(response, MAX_ANSWER).addCallback(decoded)

        d.addCallback(received)
        d.addTimeout(self.timeout, self.reactor)
        return d

    def gather(
        self, method: str, path: str, query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Deferred[Gathered]:
        """The same request to every worker that is up, at once; never fails."""
        assert self.facts is not None
        links = sorted(self.facts.workers(), key=lambda w: w.shard)
        up = [w for w in links if w.pid is not None]
        missing = [w.shard for w in links if w.pid is None]
        calls = [self.call(w, method, path, query, body) for w in up]

        def done(results: list[tuple[bool, Any]]) -> Gathered:
            answers = []
            for link, (ok, result) in zip(up, results):
                if ok and result.status < 500:
                    answers.append(result)
                    continue
                missing.append(link.shard)
                why = result.error() if ok else result.getErrorMessage()
                self.log.warn("Worker {shard} did not answer {method} {path}: {why}",
                              shard=link.shard, method=method, path=path, why=why)
            return Gathered(links, answers, sorted(missing))

        return DeferredList(calls, consumeErrors=True).addCallback(done)

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


class PeerWindows:
    """
    A worker's way to the transfer windows of the other workers of its node
    (their own sites, C{GET /api/transfer}): a transfer that an upstream
    makes again may come to another worker than the first time, since every
    worker accepts on the same sockets.
    """

    log = Logger()

    def __init__(self, endpoints: Mapping[int, str], reactor: Any, timeout: float = PEER_TIMEOUT) -> None:
        """
        @param endpoints: the other workers' admin site endpoints, by shard.
        """
        self.links = [WorkerLink(shard, endpoint, None, None, 0) for shard, endpoint in sorted(endpoints.items())]
        self.client = WorkerClient(None, reactor, timeout)

    def lookup(self, origin: str, digest: str, recipients: list[str]) -> Deferred[PeerAnswer]:
        """
        The queue id under which another worker accepted the transfer
        C{origin} with these bytes for every one of C{recipients}, if one
        did; else the workers that could not tell (still recovering their
        queue: 503; not answering, or any other answer than 200 or 404).
        Never fails.
        """
        query = {"origin": origin, "digest": digest}
        calls = [self.client.call(link, "GET", "/api/transfer", query) for link in self.links]

        def found(results: list[tuple[bool, Any]]) -> PeerAnswer:
            unsure: list[int] = []
            for link, (ok, answer) in zip(self.links, results):
                if not ok:
                    self.log.warn("Worker {shard} did not say whether it holds transfer {origin}: {why}",
                                  shard=link.shard, origin=origin, why=answer.getErrorMessage())
                    unsure.append(link.shard)
                    continue
                body = answer.body
                if answer.status == 200 and isinstance(body, dict) and isinstance(body.get("queue_id"), str):
                    if set(recipients) <= set(body.get("recipients") or ()):
                        return PeerAnswer(str(body["queue_id"]))
                elif answer.status != 404:
                    self.log.warn("Worker {shard} could not tell whether it holds transfer {origin}: {status} {body}",
                                  shard=link.shard, origin=origin, status=answer.status, body=body)
                    unsure.append(link.shard)
            return PeerAnswer(None, tuple(unsure))

        return DeferredList(calls, consumeErrors=True).addCallback(found)

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        return self.client.close()


# -- merging (pure) ---------------------------------------------------------


def merge_pages(pages: Iterable[Sequence[dict[str, Any]]], limit: int | None) -> list[dict[str, Any]]:
    """
    Listing pages (each oldest first) as one, in the workers' order: by
    arrival, then queue id (so that a page's last item is a cursor for the
    next, C{after}).
    """
    merged = heapq.merge(*pages, key=lambda m: (m["arrival"], m["queue_id"]))
    out: list[dict[str, Any]] = []
    for m in merged:
        if limit is not None and len(out) >= limit:
            break
        out.append(m)
    return out


def merge_summaries(summaries: Iterable[dict[str, Any]], top: int) -> dict[str, Any]:
    """
    Summaries of disjoint queues (each with every row) as the summary of
    their union, with C{top} rows per list chosen as a node chooses them.
    """
    b = SummaryBuilder()
    for s in summaries:
        b.messages += s["messages"]
        b.size += s["bytes"]
        b.pending += s["recipients"]
        for k, v in s["states"].items():
            b.states[k] = b.states.get(k, 0) + v
        oldest = s["oldest"]
        if oldest is not None and (b.oldest is None or oldest["arrival"] < b.oldest["arrival"]):
            b.oldest = dict(oldest)
        for d in s["destinations"]:
            row = b.dests.setdefault(d["domain"], {"recipients": 0, "messages": 0})
            row["recipients"] += d["recipients"]
            row["messages"] += d["messages"]
        for r in s["deferral_reasons"]:
            b.reasons[r["reason"]] = b.reasons.get(r["reason"], 0) + r["recipients"]
    return b.result(top)


def merge_shapes(shapes: Iterable[dict[str, Any]], builder: ShapeBuilder, top: int | None) -> dict[str, Any]:
    """Shapes of disjoint queues (every row, made with C{builder}'s parameters) as one."""
    for s in shapes:
        for row in s["rows"]:
            if row["domain"] == "TOTAL":
                target = builder.total
            else:
                target = builder.rows.setdefault(row["domain"], [0] * builder.buckets)
            for i, n in enumerate(row["counts"][: builder.buckets]):
                target[i] += n
    return builder.result(top)


_SAMPLE_SUMS = ("depth", "deferred", "hold", "received", "delivered", "deferrals", "bounced")


def merge_history(histories: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    Histories of the workers (samples oldest first, the last one the
    interval in progress) summed point by point, aligned from the newest
    back: a point's time and interval are the latest and longest of its
    samples; a worker with a shorter history adds nothing to older points.
    """
    n = max((len(h) for h in histories), default=0)
    out = []
    for back in range(n, 0, -1):
        group = [h[len(h) - back] for h in histories if len(h) >= back]
        point: dict[str, Any] = {
            "time": max(s["time"] for s in group), "interval": max(s["interval"] for s in group),
        }
        for key in _SAMPLE_SUMS:
            point[key] = sum(s.get(key, 0) for s in group)
        out.append(point)
    return out


_CONNECTION_RANK = {"up": 0, "probing": 1, "down": 2}


def _latest(entries: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The entry with the latest time C{key}."""
    return max(entries, key=lambda e: -1.0 if e.get(key) is None else e[key])


def _newest(entries: Sequence[dict[str, Any]], key: str) -> float | None:
    """The latest time C{key} of C{entries}, C{None} if none has one."""
    times = [e[key] for e in entries if e.get(key) is not None]
    return max(times) if times else None


def merge_hops(
    lists: Sequence[tuple[int, Sequence[dict[str, Any]]]],
) -> tuple[list[HopHealth], dict[str, dict[str, Any]], dict[str, list[int]]]:
    """
    The workers' C{/api/hops} entries, C{(shard, hops)}, merged per next hop.

    @return: the health of each hop by name (counts summed, times the
        latest, the deferral streak and last error of the worker that heard
        from it last), its hop-state cache entry (C{up} if some worker's is
        up, else C{probing}, else C{down}: the earliest end of a down time,
        suspended jobs summed) and the shards whose connection to it is not
        up.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    down: dict[str, list[int]] = {}
    for shard, hops in lists:
        for h in hops:
            by_name.setdefault(h["next_hop"], []).append(h)
            if h.get("connection") not in (None, "up"):
                down.setdefault(h["next_hop"], []).append(shard)
    health: list[HopHealth] = []
    states: dict[str, dict[str, Any]] = {}
    for name in sorted(by_name):
        entries = by_name[name]
        last = _latest(entries, "last_attempt")
        failed = _latest(entries, "last_failure")
        health.append(HopHealth(
            name=name, sent=sum(e["sent"] for e in entries), deferred=sum(e["deferred"] for e in entries),
            bounced=sum(e["bounced"] for e in entries), consecutive_deferrals=last["consecutive_deferrals"],
            last_attempt=_newest(entries, "last_attempt"), last_success=_newest(entries, "last_success"),
            last_failure=_newest(entries, "last_failure"), last_error=failed.get("last_error"),
        ))
        known = [e for e in entries if e.get("connection") is not None]
        if not known:
            continue
        best = min(known, key=lambda e: _CONNECTION_RANK.get(e["connection"], 2))
        if best["connection"] == "up":
            states[name] = {k: None for k in HOP_STATE_FIELDS} | {"connection": "up", "suspended": 0}
            continue
        ends = [e["down_until"] for e in known if e.get("down_until") is not None]
        first = min(known, key=lambda e: e.get("down_since") or float("inf"))
        states[name] = {
            "connection": best["connection"], "down_since": first.get("down_since"),
            "down_until": min(ends) if ends else None, "down_reason": first.get("down_reason"),
            "suspended": sum(e.get("suspended") or 0 for e in known),
        }
    return health, states, {k: sorted(v) for k, v in down.items()}


@define
class _Family:
    type: str
    documentation: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = Factory(dict)


def merge_metrics(texts: Iterable[str]) -> dict[str, _Family]:
    """
    The workers' expositions merged per metric and label set by
    L{METRIC_MERGE} (C{*_created}: min; others: sum).

    @raise ValueError: a text is not in the Prometheus text format.
    """
    return merge_families(list(text_string_to_metric_families(text)) for text in texts)


def merge_families(scrapes: Iterable[Iterable[Metric]]) -> dict[str, _Family]:
    """L{merge_metrics} of scrapes already parsed."""
    families: dict[str, _Family] = {}
    for scrape in scrapes:
        for fam in scrape:
            rule = "min" if fam.name.endswith("_created") else METRIC_MERGE.get(fam.name, "sum")
            entry = families.setdefault(fam.name, _Family(fam.type, fam.documentation))
            for s in fam.samples:
                key = (s.name, tuple(s.labels.items()))
                prev = entry.samples.get(key)
                entry.samples[key] = s.value if prev is None else _COMBINE[rule](prev, s.value)
    return families


class _MergedCollector(Collector):
    """The merged families and the workers' gauges, for one scrape."""

    def __init__(self, families: Mapping[str, _Family], links: Sequence[WorkerLink], missing: Sequence[int]) -> None:
        self.families = families
        self.links = links
        self.missing = set(missing)

    def collect(self) -> Iterator[Metric]:
        for name, fam in self.families.items():
            m = Metric(name, fam.documentation, fam.type)
            for (sname, labels), value in fam.samples.items():
                m.add_sample(sname, dict(labels), value)
            yield m
        yield GaugeMetricFamily("relaynet_workers", "Worker processes configured", value=len(self.links))
        up = [w for w in self.links if w.shard not in self.missing]
        yield GaugeMetricFamily("relaynet_workers_up", "Workers that answered this scrape", value=len(up))
        each = GaugeMetricFamily("relaynet_worker_up", "1 when the worker answered this scrape", labels=["shard"])
        for w in self.links:
            each.add_metric([str(w.shard)], 0 if w.shard in self.missing else 1)
        yield each


def exposition(gathered: Gathered) -> bytes:
    """The merged metrics of the workers' scrapes, in the Prometheus text format."""
    scrapes, missing = [], list(gathered.missing)
    for a in gathered.answers:
        try:
            if a.status != 200 or not isinstance(a.body, str):
                raise ValueError(a.error())
            scrapes.append(list(text_string_to_metric_families(a.body)))
        except ValueError:
            missing.append(a.shard)
    registry = CollectorRegistry()
    registry.register(_MergedCollector(merge_families(scrapes), gathered.links, missing))
    return generate_latest(registry)


# -- the API ----------------------------------------------------------------


def _forwarded(request: Request, *names: str) -> dict[str, str | None]:
    return {n: _arg(request, n) for n in names}


_FILTERS = ("state", "sender", "recipient", "domain", "min_age")


class FleetAPI(JsonAPI):
    """C{/api/...} of a node with workers, over their admin sites."""

    def __init__(self, facts: FleetFacts, client: WorkerClient) -> None:
        JsonAPI.__init__(self)
        self.facts = facts
        self.client = client

    # -- reading, for the API and the status page ----------------------------

    def node_status(self) -> Deferred[dict[str, Any]]:
        """C{/api/status} of the node: the supervisor's facts, the workers' figures."""

        def merged(g: Gathered) -> dict[str, Any]:
            queue = {s: 0 for s in STATES}
            sessions = 0
            for a in g.ok():
                for k, v in a.body["queue"].items():
                    queue[k] = queue.get(k, 0) + v
                sessions += a.body["sessions"]
            reloads = {a.shard: a.body.get("last_reload") for a in g.ok()}
            return {
                **status_json(self.facts, queue, sessions),
                "workers": [
                    {"shard": w.shard, "pid": w.pid, "up": w.pid is not None and w.shard not in g.missing,
                     "started": w.started, "restarts": w.restarts, "last_reload": reloads.get(w.shard)}
                    for w in g.links
                ],
                "missing_shards": g.missing,
            }

        return self.client.gather("GET", "/api/status").addCallback(merged)

    def node_summary(self, filters: Mapping[str, Any], top: int) -> Deferred[dict[str, Any]]:
        """C{/api/summary} of the node: C{filters} as the query gives them (text)."""

        def merged(g: Gathered) -> dict[str, Any]:
            return {**merge_summaries((a.body for a in g.ok()), top), "missing_shards": g.missing}

        return self.client.gather("GET", "/api/summary", {**filters, "top": ALL_ROWS}).addCallback(merged)

    def node_hops(self) -> Deferred[tuple[list[HopHealth], dict[str, dict[str, Any]], dict[str, list[int]], list[int]]]:
        """The merged next hops (L{merge_hops}) and the missing shards."""

        def merged(g: Gathered) -> Any:
            return (*merge_hops([(a.shard, a.body["hops"]) for a in g.ok()]), g.missing)

        return self.client.gather("GET", "/api/hops").addCallback(merged)

    def node_history(self) -> Deferred[dict[str, Any]]:
        """C{/api/history} of the node (L{merge_history})."""

        def merged(g: Gathered) -> dict[str, Any]:
            answers = g.ok()
            interval = max((a.body["interval"] for a in answers), default=10)
            return {"interval": interval, "samples": merge_history([a.body["samples"] for a in answers]),
                    "missing_shards": g.missing}

        return self.client.gather("GET", "/api/history").addCallback(merged)

    # -- the handlers ----------------------------------------------------------

    def status(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        return self.node_status()

    def list(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        query_filters(request)  # 400 here, not from every worker
        list_cursor(request)
        limit = _int_arg(request, "limit", None)

        def merged(g: Gathered) -> dict[str, Any]:
            answers = g.ok()
            return {
                "count": sum(a.body["count"] for a in answers),
                "messages": merge_pages([a.body["messages"] for a in answers], limit),
                "missing_shards": g.missing,
            }

        query = {**_forwarded(request, *_FILTERS, "ids", "after"), "limit": limit}
        return self.client.gather("GET", "/api/queue", query).addCallback(merged)

    def summary(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        query_filters(request)
        top = _int_arg(request, "top", 10) or 10
        return self.node_summary(_forwarded(request, *_FILTERS), top)

    def shape(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        query_filters(request)
        top = _int_arg(request, "top", None)
        builder = shape_builder(request)

        def merged(g: Gathered) -> dict[str, Any]:
            answers = g.ok()
            destinations = [dict(d, shard=a.shard) for a in answers for d in a.body.get("destinations", [])]
            return {**merge_shapes((a.body for a in answers), builder, top), "destinations": destinations,
                    "missing_shards": g.missing}

        query = {**_forwarded(request, *_FILTERS), "by": builder.by, "buckets": builder.buckets,
                 "scale": builder.scale}
        return self.client.gather("GET", "/api/shape", query).addCallback(merged)

    def routes(self, request: Request, body: Any) -> dict[str, Any]:
        return routes_json(self.facts.config)

    def hops(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        def shown(merged: Any) -> dict[str, Any]:
            health, states, down, missing = merged
            entries = hop_entries(health, states)
            for e in entries:
                e["down_shards"] = down.get(e["next_hop"], [])
            return {"hops": entries, "missing_shards": missing}

        return self.node_hops().addCallback(shown)

    def history(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        return self.node_history()

    # -- acting ----------------------------------------------------------------

    def _one(self, queue_id: str, method: str, path: str, body: Mapping[str, Any] | None = None) -> Deferred[Any]:
        """
        A request about one message to every worker: the answer of the one
        that does not answer 404.
        """
        if not _QUEUE_ID.match(queue_id):
            raise ApiError(400, f"{queue_id!r} is not a queue id")

        def picked(g: Gathered) -> Any:
            for a in g.answers:
                if a.status == 200:
                    return a.body
            for a in g.answers:
                if a.status != 404:
                    raise ApiError(a.status, a.error())
            if g.missing:
                shards = ", ".join(str(k) for k in g.missing)
                raise ApiError(503, f"shard {shards} is not answering; try again")
            raise ApiError(404, f"no message {queue_id} in the queue")

        return self.client.gather(method, path, body=body).addCallback(picked)

    def show(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "GET", f"/api/queue/{queue_id}")

    def _attempt_now(self, body: dict[str, Any], verb: str, key: str) -> Deferred[Any]:
        queue_id, _domain = _target(body)  # validated here; the workers read the domain
        if queue_id is not None:
            return self._one(queue_id, "POST", f"/api/queue/{verb}", {"queue_id": queue_id})

        def summed(g: Gathered) -> dict[str, Any]:
            return {key: sum(a.body[key] for a in g.ok()), "missing_shards": g.missing}

        return self.client.gather("POST", f"/api/queue/{verb}", body=body).addCallback(summed)

    def flush(self, request: Request, body: dict[str, Any]) -> Deferred[Any]:
        return self._attempt_now(body, "flush", "flushed")

    def reroute(self, request: Request, body: dict[str, Any]) -> Deferred[Any]:
        return self._attempt_now(body, "reroute", "rerouted")

    def flush_one(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/flush")

    def reroute_one(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/reroute")

    def hold(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/hold")

    def release(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/release")

    def delete(self, request: Request, body: Any, queue_id: str) -> Deferred[Any]:
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/delete")

    def bounce(self, request: Request, body: dict[str, Any], queue_id: str) -> Deferred[Any]:
        reason = bounce_reason(body)
        return self._one(queue_id, "POST", f"/api/queue/{queue_id}/bounce", {"reason": reason} if reason else {})

    # The suppression list is one file shared by the workers (each re-reads
    # what the others wrote): one worker answers for the node.

    def _suppression(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Deferred[Any]:
        links = sorted((w for w in self.facts.workers() if w.pid is not None), key=lambda w: w.shard)
        if not links:
            raise ApiError(503, "no worker is answering; try again")

        def answered(a: Answer) -> Any:
            if a.status != 200:
                raise ApiError(a.status, a.error())
            return a.body

        return self.client.call(links[0], method, path, body=body).addCallback(answered)

    def suppression_list(self, request: Request, body: Any) -> Deferred[Any]:
        return self._suppression("GET", "/api/suppression")

    def suppression_show(self, request: Request, body: Any, address: str) -> Deferred[Any]:
        return self._suppression("GET", "/api/suppression/" + urllib.parse.quote(address, safe="@"))

    def suppression_add(self, request: Request, body: dict[str, Any]) -> Deferred[Any]:
        return self._suppression("POST", "/api/suppression", body)

    def suppression_import(self, request: Request, body: dict[str, Any]) -> Deferred[Any]:
        return self._suppression("POST", "/api/suppression/import", body)

    def suppression_remove(self, request: Request, body: Any, address: str) -> Deferred[Any]:
        return self._suppression("DELETE", "/api/suppression/" + urllib.parse.quote(address, safe="@"))

    def reload(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        """
        Every worker reloads; if all that answer did, the supervisor re-reads
        its own configuration. A worker that is down reads the file when it
        is started again.
        """

        def reloaded(g: Gathered) -> Deferred[dict[str, Any]]:
            for a in g.answers:
                if a.status != 200:
                    raise ApiError(a.status, a.error())
            if not g.answers:
                raise ApiError(503, "no worker is answering; try again")

            def answer(_: None) -> dict[str, Any]:
                return {"reloaded": True, "config": self.facts.config.source, "workers": len(g.answers),
                        "missing_shards": g.missing}

            return maybeDeferred(self.facts.reloaded, g.missing).addCallback(answer)

        return self.client.gather("POST", "/api/reload", body={}).addCallback(reloaded)


# -- /metrics and the status page ---------------------------------------------


class FleetMetrics(Resource):
    """C{/metrics}: every worker's metrics merged (see the module docstring)."""

    isLeaf = True
    log = Logger()

    def __init__(self, client: WorkerClient) -> None:
        Resource.__init__(self)
        self.client = client

    def render_GET(self, request: Request) -> Any:
        _answer_later(request, self.client.gather("GET", "/metrics").addCallback(exposition),
                      CONTENT_TYPE_LATEST.encode(), self.log)
        return NOT_DONE_YET


def _answer_later(request: Request, d: Deferred[bytes], ctype: bytes, log: Logger) -> None:
    """Write what C{d} gives as the response (a 500 if it fails), unless the client left."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def ok(data: bytes) -> None:
        if not gone:
            request.setHeader(b"content-type", ctype)
            request.setHeader(b"cache-control", b"no-store")
            request.write(data)
            request.finish()

    def failed(f: Failure) -> None:
        log.failure("Rendering {path} failed", f, path=request.path)
        if not gone:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(f"internal error: {f.getErrorMessage()}\n".encode())
            request.finish()

    d.addCallbacks(ok, failed)


def _workers_section(workers: Sequence[dict[str, Any]], now: float) -> str:
    rows = []
    for w in workers:
        state = "up" if w["up"] else ("down" if w["pid"] is None else "failing")
        word = "up" if w["up"] else ("down" if w["pid"] is None else "not answering")
        uptime = human_age(now - w["started"]) if w["started"] and w["pid"] is not None else "-"
        rows.append(
            f"<tr><td class=\"n\">{w['shard']}</td><td class=\"n\">{w['pid'] or '-'}</td>"
            f"<td><span class=\"state {state}\">{word}</span></td><td>{uptime}</td>"
            f"<td class=\"n\">{w['restarts']}</td></tr>"
        )
    return (
        '<section id="workers"><h2>Workers</h2><table><thead><tr><th>shard</th><th>pid</th>'
        "<th>state</th><th>uptime</th><th>restarts</th></tr></thead><tbody>" + "".join(rows)
        + '</tbody></table><div class="muted">each worker owns one shard of the queue; the figures on '
        "this page are of all of them together</div></section>"
    )


class FleetStatusPage(PageResource):
    """C{/}: the status page of the node, its workers' figures together."""

    log = Logger()

    def __init__(self, api: FleetAPI, clock: Callable[[], float] = time.time) -> None:
        PageResource.__init__(self, clock)
        self.api = api

    def page(self, request: Request) -> Any:
        _answer_later(request, self.rendered(), b"text/html; charset=utf-8", self.log)
        return NOT_DONE_YET

    def rendered(self) -> Deferred[bytes]:
        """The page, once the workers answered (or did not)."""
        api = self.api
        empty = {s: None for s in _FILTERS}
        parts: list[Deferred[Any]] = [api.node_status(), api.node_summary(empty, 8), api.node_history(),
                                      api.node_hops()]
        d: Deferred[list[Any]] = gatherResults(parts, consumeErrors=True)

        def render(results: list[Any]) -> bytes:
            status, summary, history, (health, states, _down, hop_missing) = results
            now = self.clock()
            missing = sorted({*status["missing_shards"], *summary["missing_shards"],
                              *history["missing_shards"], *hop_missing})
            notes = []
            if missing:
                notes.append(f"shard {', '.join(map(str, missing))} not answering: "
                             "the figures below are of the other shards only")
            fields = Sample.__attrs_attrs__
            points = [Sample(**{f.name: p[f.name] for f in fields}) for p in history["samples"]]
            config = api.facts.config
            data = StatusData(
                config=config, pid=status["pid"], started=status["started"], summary=summary,
                sessions=status["sessions"], interval=history["interval"],
                span=HISTORY_SPAN,
                samples=points[:-1], points=points, hops=health, hop_states=states,
                sections=[_workers_section(status["workers"], now)], notes=notes,
            )
            return render_page(data, now).encode("utf-8")

        return d.addCallback(render)


def make_fleet_site(facts: FleetFacts, client: WorkerClient, read_only: bool = False, reactor: Any = None) -> Site:
    """The resource tree of L{relaynet.admin.api.make_site}, over the workers."""
    api = FleetAPI(facts, client)
    return guarded_site({b"": FleetStatusPage(api), b"metrics": FleetMetrics(client)},
                        None if read_only else api, reactor)


class _FleetService(EndpointService):
    """The fleet site on its endpoint; its pooled connections to the workers close with it."""

    def __init__(self, endpoint: Any, site: Site, what: str, client: WorkerClient) -> None:
        EndpointService.__init__(self, endpoint, site, what)
        self.client = client

    def stopService(self) -> Deferred[None]:
        d = EndpointService.stopService(self)

        def close(result: Any) -> Deferred[Any]:
            return self.client.close().addCallback(lambda _: result)

        return d.addBoth(close)


def fleet_web_service(facts: FleetFacts, endpoint: str, reactor: Any, read_only: bool = False) -> IService:
    """
    The admin site of a node with workers (or, C{read_only}, its metrics
    site) listening on C{endpoint}: L{relaynet.admin.api.web_service}'s
    tree over the workers' admin sites.
    """
    client = WorkerClient(facts, reactor)
    site = make_fleet_site(facts, client, read_only, reactor)
    what = f"{endpoint} ({'metrics' if read_only else 'admin'} site of the workers)"
    return _FleetService(serverFromString(reactor, endpoint), site, what, client)
