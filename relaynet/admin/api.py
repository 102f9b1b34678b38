# -*- test-case-name: tests.test_control -*-
"""
The node's web service on C{twisted.web}: the admin API (JSON under
C{/api/}), Prometheus metrics (C{/metrics}) and a server-rendered status page
(C{/}).

The admin site listens on C{[admin].endpoint}, a UNIX socket or a loopback TCP
port (the configuration refuses anything else). An optional read-only site
(C{[admin].metrics_endpoint}) serves only C{/metrics} and the status page.
The API schema is documented in C{docs/admin-api.md}; C{relaynet queue}
(L{relaynet.admin.queuecli}) is its client.

Requests to the admin site over TCP must name a loopback host in C{Host:}
(against DNS rebinding), and every C{POST} must be C{application/json} (a
web page cannot send that to another origin without a CORS preflight, which
is never answered).

Every resource reads the node through the L{AdminViews} it is given (the
queue, the sessions, the node's facts, its metrics), never the node itself.
The pure helpers L{summarize} and L{shape} touch no reactor; ages are read
and written by L{relaynet.admin.text}, which C{relaynet queue} shares.
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote

from attrs import field, frozen
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.application.service import IService
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relaynet import __version__
from relaynet.config import NodeConfig
from relaynet.admin.metrics import FAILING_AFTER, HopHealth, ListHealth, NodeMetrics, Sample
from relaynet.admin.text import human_age, parse_age
from relaynet.admin.views import STATES, NodeFacts, NodeIdentity, QueueView, SessionsView, SuppressionView
from relaynet.config import hop_name
from relaynet.queue.classify import CLASSES
from relaynet.queue.states import FINAL_STATUSES
from relaynet.queue.suppression import Suppression
from relaynet.queue.window import TransferWindow
from relaynet.smtp.netio import EndpointService

#: Version of the JSON schema in C{docs/admin-api.md}.
API_VERSION = 1
_QUEUE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@frozen
class AdminViews:
    """
    What the web service reads of a node (L{relaynet.admin.views}).

    @ivar queue: the queue, to list, show and act on messages.
    @ivar sessions: the open SMTP sessions.
    @ivar node: who the node is, its configuration, reload.
    @ivar metrics: the node's metrics, next-hop health and history.
    @ivar suppression: the suppression list (by default the queue's
        C{suppression}, the runner's list, if it has one).
    """

    queue: QueueView
    sessions: SessionsView
    node: NodeFacts
    metrics: NodeMetrics
    suppression: SuppressionView | None = None


class ApiError(Exception):
    """An API request failed: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- pure helpers ---------------------------------------------------------


def _pending(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in item["recipients"] if r["status"] not in FINAL_STATUSES]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() or "(none)"


def summarize(items: Iterable[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """
    A C{mailq}-like summary of queue listing items (L{entry_summary} dicts):
    message, octet and pending-recipient counts, counts by state, the oldest
    message, the top destination domains and the top deferral reasons.
    """
    builder = SummaryBuilder()
    for item in items:
        builder.add(item)
    return builder.result(top)


class SummaryBuilder:
    """L{summarize}, one item at a time (a queue walked in slices feeds it)."""

    def __init__(self) -> None:
        self.states = {s: 0 for s in STATES}
        self.dests: dict[str, dict[str, int]] = {}
        self.reasons: dict[str, int] = {}
        self.oldest: dict[str, Any] | None = None
        self.pending = 0
        self.messages = 0
        self.size = 0

    def add(self, item: dict[str, Any]) -> None:
        """Count one listing item."""
        self.messages += 1
        self.size += item["size"]
        self.states[item["state"]] = self.states.get(item["state"], 0) + 1
        if self.oldest is None or item["arrival"] < self.oldest["arrival"]:
            self.oldest = {"queue_id": item["queue_id"], "arrival": item["arrival"], "age": item["age"]}
        seen: set[str] = set()
        for r in _pending(item):
            self.pending += 1
            d = _domain(r["address"])
            row = self.dests.setdefault(d, {"recipients": 0, "messages": 0})
            row["recipients"] += 1
            if d not in seen:
                row["messages"] += 1
                seen.add(d)
            if r["status"] == "deferred":
                reason = (r.get("diagnostic") or r.get("dsn") or "unknown")[:200]
                self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def result(self, top: int = 10) -> dict[str, Any]:
        """The summary of the items added, C{top} rows per list."""
        top_dests = sorted(self.dests.items(), key=lambda kv: (-kv[1]["recipients"], kv[0]))[:top]
        top_reasons = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return {
            "messages": self.messages,
            "bytes": self.size,
            "recipients": self.pending,
            "states": dict(self.states),
            "oldest": self.oldest,
            "destinations": [{"domain": d, **v} for d, v in top_dests],
            "deferral_reasons": [{"reason": r, "recipients": n} for r, n in top_reasons],
        }


def shape(
    items: Iterable[dict[str, Any]], by: str = "recipient", buckets: int = 10,
    scale: float = 5.0, top: int | None = None,
) -> dict[str, Any]:
    """
    A C{qshape}-like age histogram by domain: one row per recipient (or
    sender) domain with its total and counts per age bucket, a C{TOTAL} row
    first. Bucket upper bounds are C{scale}, 2C{scale}, 4C{scale}... minutes;
    the last bucket is open. A message counts once per distinct domain of its
    pending recipients (C{by="sender"}: once, for its sender's domain).

    @param buckets: the number of buckets (at least 2).
    @param scale: the first bucket's bound in minutes.
    @raise ValueError: C{by}, C{buckets} or C{scale} is not valid.
    """
    builder = ShapeBuilder(by, buckets, scale)
    for item in items:
        builder.add(item)
    return builder.result(top)


class ShapeBuilder:
    """L{shape}, one item at a time (a queue walked in slices feeds it)."""

    def __init__(self, by: str = "recipient", buckets: int = 10, scale: float = 5.0) -> None:
        """@raise ValueError: see L{shape}."""
        if by not in ("recipient", "sender"):
            raise ValueError("by must be recipient or sender")
        if buckets < 2 or scale <= 0:
            raise ValueError("need at least 2 buckets and a positive scale")
        self.by = by
        self.buckets = buckets
        self.scale = scale
        self.bounds = [scale * 2 ** i for i in range(buckets - 1)]
        self.rows: dict[str, list[int]] = {}
        self.total = [0] * buckets

    def add(self, item: dict[str, Any]) -> None:
        """Count one listing item."""
        minutes = item["age"] / 60.0
        col = next((i for i, b in enumerate(self.bounds) if minutes < b), self.buckets - 1)
        pending = _pending(item)
        if not pending:
            return
        if self.by == "sender":
            domains = {_domain(item["sender"]) if item["sender"] else "(null sender)"}
        else:
            domains = {_domain(r["address"]) for r in pending}
        self.total[col] += 1
        for d in domains:
            self.rows.setdefault(d, [0] * self.buckets)[col] += 1

    def result(self, top: int | None = None) -> dict[str, Any]:
        """The histogram of the items added; only the C{top} busiest domains if given."""
        ordered = sorted(self.rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        if top is not None:
            ordered = ordered[:top]
        labels = [_num(b) for b in self.bounds] + [_num(self.bounds[-1]) + "+"]
        return {
            "by": self.by,
            "scale_minutes": self.scale,
            "columns": labels,
            "rows": [{"domain": "TOTAL", "total": sum(self.total), "counts": list(self.total)}]
            + [{"domain": d, "total": sum(c), "counts": c} for d, c in ordered],
        }


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def routes_json(config: NodeConfig) -> dict[str, Any]:
    """The routing table in force, as the API and the status page show it."""
    rules = []
    for i, rule in enumerate(config.routes):
        item: dict[str, Any] = {"index": i, "domains": list(rule.domains), "action": rule.action}
        if rule.action == "relay":
            item["next_hops"] = [
                {"endpoint": h.endpoint, "priority": h.priority, "name": hop_name(h.endpoint)}
                for h in sorted(rule.next_hops, key=lambda h: h.priority)
            ]
        if rule.action in ("relay", "mx"):
            item.update(ack=rule.ack, tls=rule.tls, concurrency=rule.concurrency)
        if rule.action == "mx":
            item["mx_port"] = rule.mx_port
        if rule.action == "reject":
            item["reply"] = f"{rule.code} {rule.enhanced} {rule.text}"
        rules.append(item)
    return {"local_domains": list(config.local.domains), "routes": rules}


def configured_hops(config: NodeConfig) -> list[str]:
    """The names of every next hop of the relay routes."""
    return sorted({hop_name(h.endpoint) for r in config.routes for h in r.next_hops})


def hop_reachability(states: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    The hop-state cache (L{relaynet.delivery.client.HopState.snapshot}s) by
    next-hop name: C{connection} (C{up}, C{down}: no connection is tried
    until C{down_until}, or C{probing}: one probe connection is being
    tried), C{down_since}, C{down_until}, C{down_reason} and C{suspended}
    (jobs deferred without a connection while down). Endpoints with the
    same name (C{host:port}) count as down if any of them is.
    """
    rank = {"up": 0, "probing": 1, "down": 2}
    out: dict[str, dict[str, Any]] = {}
    for st in states:
        name = str(st.get("relay"))
        entry: dict[str, Any] = {
            "connection": str(st.get("state", "up")), "down_since": st.get("since"),
            "down_until": st.get("until"), "down_reason": st.get("diagnostic"),
            "suspended": int(st.get("suspended") or 0),
        }
        if name not in out or rank.get(entry["connection"], 2) > rank.get(out[name]["connection"], 2):
            out[name] = entry
    return out


#: The fields L{hop_entries} adds to a hop's health, C{None} when the cache has no word on it.
HOP_STATE_FIELDS = ("connection", "down_since", "down_until", "down_reason", "suspended")


def hop_entries(hops: Iterable[HopHealth], states: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """
    C{GET /api/hops}'s entries: each hop's health (L{HopHealth.to_json})
    with its L{hop_reachability} fields (all C{None} for a hop the
    hop-state cache has not seen: no connection to it was tried yet).
    """
    out = []
    for hop in hops:
        state = states.get(hop.name)
        out.append({**hop.to_json(), **{k: None if state is None else state.get(k) for k in HOP_STATE_FIELDS}})
    return out


def _loopback_host(header: bytes | None) -> bool:
    """A C{Host:} header naming C{localhost} or a loopback address (with any port)."""
    if not header:
        return False
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the JSON API -----------------------------------------------------------


class JsonAPI(Resource):
    """
    C{/api/...}: one JSON object per response (errors: C{{"error": ...}}
    with a 4xx/5xx status). The paths, methods and their handlers are the
    same on a node (L{AdminAPI}) and on a supervisor of workers
    (L{relaynet.admin.fleet.FleetAPI}); a subclass gives the handlers. Each
    handler is called with the request, the JSON body (C{{}} unless
    C{POST}) and the path's queue id if any, and answers a JSON object, a
    L{Deferred} of one, or raises (or fails with) L{ApiError}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> Any:
        path = [p.decode("utf-8", "replace") for p in request.postpath or () if p]
        method = request.method.decode("ascii", "replace")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        try:
            handler, args = self._route(method, path)
            if method == "POST":
                body = _json_body(request)
            else:
                body = {}
        except ApiError as e:
            _write_json(request, e.status, {"error": e.message})
            return NOT_DONE_YET
        d = maybeDeferred(handler, request, body, *args)

        def ok(result: Any) -> None:
            if not gone:
                _write_json(request, 200, result)

        def failed(f: Failure) -> None:
            if isinstance(f.value, ApiError):
                status, message = f.value.status, f.value.message
            else:
                self.log.failure("Admin API {method} /api/{path} failed", f, method=method, path="/".join(path))
                status, message = 500, f"internal error: {f.getErrorMessage()}"
            if not gone:
                _write_json(request, status, {"error": message})

        d.addCallbacks(ok, failed)
        return NOT_DONE_YET

    def _route(self, method: str, path: list[str]) -> tuple[Callable[..., Any], list[str]]:
        get: dict[tuple[str, ...], Callable[..., Any]] = {
            ("status",): self.status, ("queue",): self.list, ("summary",): self.summary,
            ("shape",): self.shape, ("routes",): self.routes, ("hops",): self.hops,
            ("history",): self.history, ("transfer",): self.transfer,
        }
        post: dict[tuple[str, ...], Callable[..., Any]] = {
            ("queue", "flush"): self.flush, ("queue", "reroute"): self.reroute,
            ("reload",): self.reload,
        }
        actions = {
            "hold": self.hold, "release": self.release, "delete": self.delete,
            "bounce": self.bounce, "flush": self.flush_one, "reroute": self.reroute_one,
        }
        key = tuple(path)
        if path and path[0] == "suppression":
            return self._suppression_route(method, path)
        if method == "GET" and key in get:
            return get[key], []
        if method == "POST" and key in post:
            return post[key], []
        if key in get or key in post:
            raise ApiError(405, f"method {method} not allowed on /api/{'/'.join(path)}")
        if len(path) == 2 and path[0] == "queue" and method in ("GET", "DELETE"):
            return (self.show if method == "GET" else self.delete), [path[1]]
        if len(path) == 3 and path[0] == "queue" and path[2] in actions and method == "POST":
            return actions[path[2]], [path[1]]
        if (len(path) == 2 and path[0] == "queue") or (
            len(path) == 3 and path[0] == "queue" and path[2] in actions
        ):
            raise ApiError(405, f"method {method} not allowed on /api/{'/'.join(path)}")
        raise ApiError(404, f"no such API resource: /api/{'/'.join(path)}")

    def _suppression_route(self, method: str, path: list[str]) -> tuple[Callable[..., Any], list[str]]:
        """C{/api/suppression}, C{/api/suppression/import}, C{/api/suppression/ADDRESS}."""
        where = "/api/" + "/".join(path)
        if len(path) == 1:
            if method == "GET":
                return self.suppression_list, []
            if method == "POST":
                return self.suppression_add, []
        elif len(path) == 2 and path[1] == "import":
            if method == "POST":
                return self.suppression_import, []
        elif len(path) == 2:
            address = unquote(path[1])
            if method == "GET":
                return self.suppression_show, [address]
            if method == "DELETE":
                return self.suppression_remove, [address]
        else:
            raise ApiError(404, f"no such API resource: {where}")
        raise ApiError(405, f"method {method} not allowed on {where}")

    # -- the handlers, given by a subclass --------------------------------

    def suppression_list(self, request: Request, body: Any) -> Any:
        """C{GET /api/suppression}."""
        raise ApiError(501, "the suppression list is not served here (a supervisor of workers)")

    def suppression_show(self, request: Request, body: Any, address: str) -> Any:
        """C{GET /api/suppression/ADDRESS}."""
        raise ApiError(501, "the suppression list is not served here (a supervisor of workers)")

    def suppression_add(self, request: Request, body: dict[str, Any]) -> Any:
        """C{POST /api/suppression}."""
        raise ApiError(501, "the suppression list is not served here (a supervisor of workers)")

    def suppression_import(self, request: Request, body: dict[str, Any]) -> Any:
        """C{POST /api/suppression/import}."""
        raise ApiError(501, "the suppression list is not served here (a supervisor of workers)")

    def suppression_remove(self, request: Request, body: Any, address: str) -> Any:
        """C{DELETE /api/suppression/ADDRESS}."""
        raise ApiError(501, "the suppression list is not served here (a supervisor of workers)")

    def status(self, request: Request, body: Any) -> Any:
        """C{GET /api/status}."""
        raise NotImplementedError

    def list(self, request: Request, body: Any) -> Any:
        """C{GET /api/queue}."""
        raise NotImplementedError

    def show(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{GET /api/queue/ID}."""
        raise NotImplementedError

    def summary(self, request: Request, body: Any) -> Any:
        """C{GET /api/summary}."""
        raise NotImplementedError

    def shape(self, request: Request, body: Any) -> Any:
        """C{GET /api/shape}."""
        raise NotImplementedError

    def routes(self, request: Request, body: Any) -> Any:
        """C{GET /api/routes}."""
        raise NotImplementedError

    def hops(self, request: Request, body: Any) -> Any:
        """C{GET /api/hops}."""
        raise NotImplementedError

    def history(self, request: Request, body: Any) -> Any:
        """C{GET /api/history}."""
        raise NotImplementedError

    def transfer(self, request: Request, body: Any) -> Any:
        """C{GET /api/transfer}: a worker's own site answers it (L{AdminAPI.transfer})."""
        raise ApiError(404, "no such API resource: /api/transfer (a worker's own site answers it)")

    def flush(self, request: Request, body: dict[str, Any]) -> Any:
        """C{POST /api/queue/flush}."""
        raise NotImplementedError

    def reroute(self, request: Request, body: dict[str, Any]) -> Any:
        """C{POST /api/queue/reroute}."""
        raise NotImplementedError

    def reload(self, request: Request, body: Any) -> Any:
        """C{POST /api/reload}."""
        raise NotImplementedError

    def flush_one(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{POST /api/queue/ID/flush}."""
        raise NotImplementedError

    def reroute_one(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{POST /api/queue/ID/reroute}."""
        raise NotImplementedError

    def hold(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{POST /api/queue/ID/hold}."""
        raise NotImplementedError

    def release(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{POST /api/queue/ID/release}."""
        raise NotImplementedError

    def delete(self, request: Request, body: Any, queue_id: str) -> Any:
        """C{POST /api/queue/ID/delete} and C{DELETE /api/queue/ID}."""
        raise NotImplementedError

    def bounce(self, request: Request, body: dict[str, Any], queue_id: str) -> Any:
        """C{POST /api/queue/ID/bounce}."""
        raise NotImplementedError


class AdminAPI(JsonAPI):
    """The admin API of one node, over the L{AdminViews} it is given."""

    def __init__(self, views: AdminViews) -> None:
        JsonAPI.__init__(self)
        self.queue = views.queue
        self.sessions = views.sessions
        self.node = views.node
        self.metrics = views.metrics
        found = views.suppression or getattr(views.queue, "suppression", None)
        self.suppression: SuppressionView | None = found
        self.window: TransferWindow | None = getattr(views.queue, "window", None)

    # -- helpers -------------------------------------------------------

    def _queued(self, queue_id: str) -> None:
        """
        @raise ApiError: C{queue_id} is not a queue id (400) or is not
            queued (404).
        """
        if not _QUEUE_ID.match(queue_id):
            raise ApiError(400, f"{queue_id!r} is not a queue id")
        if queue_id not in self.queue:
            raise ApiError(404, f"no message {queue_id} in the queue")

    def _busy(self, queue_id: str) -> ApiError:
        return ApiError(409, f"message {queue_id} is being delivered right now; try again")

    # -- reading ---------------------------------------------------------

    def status(self, request: Request, body: Any) -> dict[str, Any]:
        return status_json(self.node, dict(self.queue.counts()), self.sessions.count())

    def transfer(self, request: Request, body: Any) -> dict[str, Any]:
        """
        C{GET /api/transfer?origin=NODE/ID&digest=D}: the transfer C{origin}
        with these bytes as this node's window holds it (its queue id and the
        recipients accepted for it); 404 if it does not; 503 if it does not
        hold it yet but may (the node is still recovering its queue). The
        other workers of a node ask it for a transfer made again
        (C{XTXNAGAIN}).
        """
        origin, digest = _arg(request, "origin"), _arg(request, "digest")
        if not origin or not digest:
            raise ApiError(400, "origin and digest are required")
        found = self.window.match(origin, digest) if self.window is not None else None
        if found is None or found.queue_id is None:
            if self.window is not None and not self.window.complete:
                raise ApiError(503, f"no transfer {origin} with those bytes known yet: the queue is being recovered")
            raise ApiError(404, f"no transfer {origin} with those bytes here")
        return {"origin": origin, "queue_id": found.queue_id, "recipients": sorted(found.covered)}

    def _filters(self, request: Request) -> dict[str, Any]:
        return query_filters(request)

    def list(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        limit = _int_arg(request, "limit", None)
        ids_only = _arg(request, "ids") in ("1", "true", "yes")
        after = list_cursor(request)

        def listed(found: tuple[int, Any]) -> dict[str, Any]:
            count, shown = found
            if ids_only:
                # Each message as its queue id and arrival (the order):
                # ~60 bytes, where a summary takes ~400.
                return {"count": count, "messages": [
                    {"queue_id": e.queue_id, "arrival": e.envelope.arrival} for e in shown
                ]}
            return {"count": count, "messages": self.queue.summaries(shown)}

        return self.queue.page(limit, **self._filters(request), after=after).addCallback(listed)

    def show(self, request: Request, body: Any, queue_id: str) -> Any:
        self._queued(queue_id)
        d = self.queue.show(queue_id)
        if d is None:
            raise ApiError(404, f"no message {queue_id} in the queue")
        return d

    def summary(self, request: Request, body: Any) -> dict[str, Any] | Deferred[dict[str, Any]]:
        filters = self._filters(request)
        top = _int_arg(request, "top", 10) or 10
        if not any(v is not None for v in filters.values()):
            return self.queue.summary(top)  # the queue's counters: no walk
        # Filtered: the matching messages are counted a slice per reactor turn.
        builder = SummaryBuilder()
        return self.queue.collect(builder.add, **filters).addCallback(lambda _: builder.result(top))

    def shape(self, request: Request, body: Any) -> Deferred[dict[str, Any]]:
        filters = self._filters(request)
        top = _int_arg(request, "top", None)
        builder = shape_builder(request)
        return self.queue.collect(builder.add, **filters).addCallback(
            lambda _: {**builder.result(top), "destinations": list(self.metrics.destination_states())})

    def routes(self, request: Request, body: Any) -> dict[str, Any]:
        return routes_json(self.node.config)

    def hops(self, request: Request, body: Any) -> dict[str, Any]:
        states = hop_reachability(self.metrics.hop_states())
        hops = self.metrics.hop_health([*configured_hops(self.node.config), *states])
        return {"hops": hop_entries(hops, states)}

    def history(self, request: Request, body: Any) -> dict[str, Any]:
        history = self.metrics.history
        return {"interval": history.interval, "samples": [s.to_json() for s in history.points()]}

    # -- acting ----------------------------------------------------------

    def flush(self, request: Request, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._attempt_now(body, self.queue.flush, "flush", "flushed")

    def flush_one(self, request: Request, body: Any, queue_id: str) -> Deferred[dict[str, Any]]:
        return self.flush(request, {"queue_id": queue_id})

    def reroute(self, request: Request, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return self._attempt_now(body, self.queue.reroute, "reroute", "rerouted")

    def _attempt_now(
        self, body: dict[str, Any], action: Callable[[str | None, str | None], Any],
        verb: str, key: str,
    ) -> Deferred[dict[str, Any]]:
        """Flush or reroute: one message, a domain's or all; answer how many (once all are taken)."""
        queue_id, domain = _target(body)
        if queue_id is not None:
            self._queued(queue_id)

        def done(n: int) -> dict[str, Any]:
            self.log.info("Admin {verb} of {target}: {count} message(s)",
                          verb=verb, target=queue_id or domain or "all", count=n)
            return {key: n}

        return maybeDeferred(action, queue_id, domain).addCallback(done)

    def reroute_one(self, request: Request, body: Any, queue_id: str) -> Deferred[dict[str, Any]]:
        return self.reroute(request, {"queue_id": queue_id})

    def _simple(
        self, action: str, queue_id: str, call: Callable[[], Deferred[bool]], key: str
    ) -> Deferred[dict[str, Any]]:
        """
        One action on one message; its answer once the action is done. (A
        queue that applies actions after a running attempt answers C{True}
        then; one that refuses them during an attempt answers C{False}
        with the message still queued: 409.)
        """
        self._queued(queue_id)

        def done(ok: bool) -> dict[str, Any]:
            if not ok:
                if queue_id in self.queue:
                    raise self._busy(queue_id)
                raise ApiError(404, f"no message {queue_id} in the queue")
            self.log.info("Admin {action} of {queue_id}", action=action, queue_id=queue_id)
            return {"queue_id": queue_id, key: True}

        return maybeDeferred(call).addCallback(done)

    def hold(self, request: Request, body: Any, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._simple("hold", queue_id, lambda: self.queue.hold(queue_id), "held")

    def release(self, request: Request, body: Any, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._simple("release", queue_id, lambda: self.queue.release(queue_id), "released")

    def delete(self, request: Request, body: Any, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._simple("delete", queue_id, lambda: self.queue.delete(queue_id), "deleted")

    def bounce(self, request: Request, body: dict[str, Any], queue_id: str) -> Deferred[dict[str, Any]]:
        reason = bounce_reason(body)
        if reason:
            return self._simple("bounce", queue_id, lambda: self.queue.bounce(queue_id, reason), "bounced")
        return self._simple("bounce", queue_id, lambda: self.queue.bounce(queue_id), "bounced")

    # -- the suppression list ------------------------------------------

    def _list(self) -> SuppressionView:
        if self.suppression is None:
            raise ApiError(404, "this node keeps no suppression list")
        return self.suppression

    def suppression_list(self, request: Request, body: Any) -> dict[str, Any]:
        sup = self._list()
        entries = sup.entries()
        return {"count": len(entries), "by_source": sup.counts(), "expiry_days": sup.expiry_days,
                "entries": [e.to_json() for e in entries]}

    def suppression_show(self, request: Request, body: Any, address: str) -> dict[str, Any]:
        entry = self._list().get(address)
        if entry is None:
            raise ApiError(404, f"{address} is not suppressed")
        return entry.to_json()

    def suppression_add(self, request: Request, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        sup = self._list()
        address, reason, kind = body.get("address"), body.get("reason", ""), body.get("class", CLASSES[0])
        days = body.get("expires_days")
        if not isinstance(address, str) or "@" not in address or any(c.isspace() for c in address.strip()):
            raise ApiError(400, "address: must be an address, local@domain")
        if not isinstance(reason, str):
            raise ApiError(400, "reason: must be a string")
        if kind not in CLASSES:
            raise ApiError(400, f"class: must be one of {', '.join(CLASSES)}")
        if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0):
            raise ApiError(400, "expires_days: must be a number of days, 0 or more (0: never)")
        entry = sup.add(address, reason=reason or "added by the administrator", kind=kind, source="admin",
                        expires_days=None if days is None else float(days))
        self.log.info("Admin suppression of {address}", address=entry.address)
        return sup.flushed().addCallback(lambda _: {"added": True, **entry.to_json()})

    def suppression_import(self, request: Request, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        sup = self._list()
        records = body.get("entries")
        if not isinstance(records, list):
            raise ApiError(400, "entries: must be an array of objects with an address")
        now = time.time()
        entries = []
        for i, record in enumerate(records):
            try:
                entries.append(Suppression.from_json(record, now, "import", sup.default_expiry(now)))
            except ValueError as e:
                raise ApiError(400, f"entries[{i}]: {e}") from None
        n = sup.put_many(entries)
        self.log.info("Admin import of {count} suppression entries", count=n)
        return sup.flushed().addCallback(lambda _: {"imported": n, "count": len(sup.entries())})

    def suppression_remove(self, request: Request, body: Any, address: str) -> Deferred[dict[str, Any]]:
        sup = self._list()
        if not sup.remove(address):
            raise ApiError(404, f"{address} is not suppressed")
        self.log.info("Admin removal of {address} from the suppression list", address=address)
        return sup.flushed().addCallback(lambda _: {"address": address.strip().strip("<>").lower(), "removed": True})

    def reload(self, request: Request, body: Any) -> dict[str, Any]:
        ok = self.node.reload()
        if not ok:
            error = self.node.last_reload_error or "reload not possible"
            raise ApiError(422, f"reload refused, the old configuration stays in force: {error}")
        return {"reloaded": True, "config": self.node.config.source}


def list_cursor(request: Request) -> tuple[float, str] | None:
    """
    The C{after} cursor of a listing request, C{ARRIVAL:QUEUE_ID} (the
    C{arrival} and C{queue_id} of the previous page's last item), as its
    ordering key; C{None} when absent.

    @raise ApiError: it is not of that form (400).
    """
    after = _arg(request, "after")
    if after is None:
        return None
    arrival, _, queue_id = after.rpartition(":")
    try:
        at = float(arrival)
    except ValueError:
        at = float("nan")
    if at != at or at in (float("inf"), float("-inf")) or not _QUEUE_ID.match(queue_id):
        raise ApiError(400, "after must be ARRIVAL:QUEUE_ID, the arrival and queue id of a listed message")
    return (at, queue_id)


def query_filters(request: Request) -> dict[str, Any]:
    """
    The queue filters of a request's query (C{state}, C{sender},
    C{recipient}, C{domain}, C{min_age} in seconds; C{None} when absent).

    @raise ApiError: a state or an age that is not valid (400).
    """
    state = _arg(request, "state")
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    min_age = _arg(request, "min_age")
    try:
        age = parse_age(min_age) if min_age is not None else None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return {
        "state": state, "sender": _arg(request, "sender"),
        "recipient": _arg(request, "recipient"), "domain": _arg(request, "domain"),
        "min_age": age,
    }


def status_json(node: NodeIdentity, queue: dict[str, int], sessions: int) -> dict[str, Any]:
    """
    C{GET /api/status}: who C{node} is (this process's pid), its queue
    counts by state and its open sessions.
    """
    config = node.config
    started = node.started_at
    return {
        "api_version": API_VERSION, "version": __version__, "node": config.name,
        "hostname": config.hostname, "pid": os.getpid(), "config": config.source,
        "started": started, "uptime": None if started is None else round(time.time() - started, 3),
        "listeners": [{"endpoint": lst.endpoint, "mode": lst.mode} for lst in config.listeners],
        "admin_endpoint": config.admin_endpoint,
        "queue": queue,
        "sessions": sessions,
        "last_reload": node.last_reload,
    }


def shape_builder(request: Request) -> ShapeBuilder:
    """
    A L{ShapeBuilder} with the request's C{by}, C{buckets} and C{scale}.

    @raise ApiError: one of them is not valid (400).
    """
    try:
        return ShapeBuilder(
            _arg(request, "by") or "recipient", _int_arg(request, "buckets", 10) or 10,
            float(_arg(request, "scale") or 5),
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def bounce_reason(body: Any) -> str | None:
    """
    The C{reason} of a bounce's body, if any.

    @raise ApiError: it is not one line of at most 500 characters (400).
    """
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500 or "\n" in reason):
        raise ApiError(400, "reason must be one line of text (at most 500 characters)")
    return reason


def _target(body: dict[str, Any]) -> tuple[str | None, str | None]:
    queue_id, domain = body.get("queue_id"), body.get("domain")
    for name, value in (("queue_id", queue_id), ("domain", domain)):
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string")
    if queue_id is not None and domain is not None:
        raise ApiError(400, "give queue_id or domain, not both")
    return queue_id, domain


def _arg(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    return values[-1].decode("utf-8", "replace") or None


def _int_arg(request: Request, name: str, default: int | None) -> int | None:
    value = _arg(request, name)
    if value is None:
        return default
    if not value.isdigit():
        raise ApiError(400, f"{name} must be a non-negative integer")
    return int(value)


def _json_body(request: Request) -> dict[str, Any]:
    ctype = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "POST bodies must be application/json")
    raw = request.content.read(1 << 16) if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _write_json(request: Request, status: int, obj: Any) -> None:
    data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.write(data)
    request.finish()


# -- metrics and the status page -------------------------------------------


class MetricsResource(Resource):
    """C{/metrics}: the node's registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: NodeMetrics) -> None:
        Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()


class PageResource(Resource):
    """C{/}: a server-rendered HTML page (L{page}); nothing is below it (404)."""

    isLeaf = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        Resource.__init__(self)
        self.clock = clock

    def render_GET(self, request: Request) -> Any:
        if request.postpath and any(request.postpath):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return self.page(request)

    def page(self, request: Request) -> Any:
        """The page's bytes, or C{NOT_DONE_YET} when it is written later."""
        raise NotImplementedError


class StatusPage(PageResource):
    """C{/}: the status page, one server-rendered HTML document."""

    def __init__(self, views: AdminViews, clock: Callable[[], float] = time.time) -> None:
        PageResource.__init__(self, clock)
        self.views = views

    def page(self, request: Request) -> bytes:
        return render_status(self.views, self.clock()).encode("utf-8")


class _Guard(Resource):
    """The admin site's root: refuses TCP requests whose C{Host:} is not loopback."""

    def __init__(self, check_host: bool) -> None:
        Resource.__init__(self)
        self.check_host = check_host

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        if self.check_host and not _is_unix(request) and not _loopback_host(request.getHeader(b"host")):
            return _Refused()
        return Resource.getChildWithDefault(self, path, request)

    def getChild(self, path: bytes, request: Request) -> Any:
        return notFound()


class _Refused(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        request.setResponseCode(421)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return b'{"error":"the admin site answers only to a loopback Host"}\n'


def _is_unix(request: Request) -> bool:
    return isinstance(request.getHost(), UNIXAddress)


class AdminSite(Site):
    """A site with no access log: scrapes every few seconds would flood the node's log."""

    noisy = False

    def __init__(self, resource: IResource, reactor: Any = None) -> None:
        Site.__init__(self, resource, reactor=reactor)

    def log(self, request: http.Request) -> None:
        pass


def make_site(views: AdminViews, read_only: bool = False, reactor: Any = None) -> Site:
    """
    The resource tree: C{/} (status page), C{/metrics} and, unless
    C{read_only}, C{/api/}.

    @param reactor: times the site's connections (C{None}: the global one).
    """
    return guarded_site({b"": StatusPage(views), b"metrics": MetricsResource(views.metrics)},
                        None if read_only else AdminAPI(views), reactor)


def guarded_site(children: Mapping[bytes, IResource], api: IResource | None, reactor: Any = None) -> Site:
    """
    A site of C{children} and, unless C{api} is C{None}, C{/api/}: the admin
    site (its TCP requests must name a loopback C{Host:}), or without an
    API the read-only site (any C{Host:}).
    """
    root = _Guard(check_host=api is not None)
    for name, child in children.items():
        root.putChild(name, child)
    if api is not None:
        root.putChild(b"api", api)
    site = AdminSite(root, reactor)
    site.displayTracebacks = False
    return site


def web_service(
    views: AdminViews, endpoint: str, reactor: IReactorCore, read_only: bool = False
) -> IService:
    """An L{EndpointService} listening on C{endpoint} with L{make_site}'s tree."""
    return EndpointService(
        serverFromString(reactor, endpoint), make_site(views, read_only, reactor), f"{endpoint} (admin site)"
    )


# -- rendering ------------------------------------------------------------

_E = html.escape

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header .meta{color:#b8c0d0;font-size:13px;margin-top:4px}
main{padding:16px 24px;max-width:1180px}
section{background:#fff;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.08);padding:12px 16px;margin:0 0 16px}
h2{font-size:15px;margin:0 0 10px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:10px;margin-bottom:16px}
.card{background:#fff;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.08);padding:10px 14px}
.card .v{font-size:22px;font-weight:600}.card .k{color:#5b6478;font-size:12px;text-transform:uppercase}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.charts>div{flex:1 1 460px;min-width:0}
svg.chart{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e6e8ec;vertical-align:top}
th{font-size:12px;color:#5b6478;text-transform:uppercase;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,Menlo,Consolas,monospace}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.up{background:#2e8540}.deferring{background:#d98c00}.failing{background:#c62828}.unknown{background:#8a93a6}
.err{color:#8a1c1c;font-size:12px}.muted{color:#8a93a6}
footer{padding:0 24px 24px;color:#8a93a6;font-size:12px}
footer a{color:#5b6478}
"""


def _ago(now: float, t: float | None) -> str:
    if t is None:
        return "never"
    return f"{human_age(now - t)} ago"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _nice(v: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least C{v} (and at least 1)."""
    if v <= 1:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * mag >= v:
            return float(m * mag)
    return float(10 * mag)


def svg_chart(
    title: str, now: float, span: float, points: Sequence[Sample],
    series: Sequence[tuple[str, str, Callable[[Sample], float]]],
    width: int = 560, height: int = 200, fill_first: bool = False, dashed: Sequence[str] = (),
) -> str:
    """
    A line chart as inline SVG: time on the x axis (the last C{span} seconds
    up to C{now}), one polyline per series C{(label, colour, value)}.
    """
    left, right, top_, bottom = 44, 10, 46, 24
    w, h = width - left - right, height - top_ - bottom
    values = [[fn(p) for p in points] for _, _, fn in series]
    ymax = _nice(max((v for vs in values for v in vs), default=0.0))
    start = now - span

    def x(t: float) -> float:
        return left + max(0.0, min(1.0, (t - start) / span)) * w

    def y(v: float) -> float:
        return top_ + h - (v / ymax) * h

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{_E(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#1d2330">{_E(title)}</text>',
    ]
    steps = 4 if ymax / 10 ** math.floor(math.log10(ymax)) == 2 else 5
    for i in range(steps + 1):
        v = ymax * i / steps
        yy = y(v)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + w}" y2="{yy:.1f}" stroke="#e6e8ec"/>')
        label = _num(round(v, 2))
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6478">{label}</text>')
    step = next((s for s in (60, 120, 300, 600, 1800) if span / s <= 6), 3600)
    k = 0
    while k * step <= span + 1e-6:
        t = now - k * step
        label = "now" if k == 0 else f"-{_num(k * step / 60)}m"
        out.append(f'<text x="{x(t):.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#5b6478">{label}</text>')
        out.append(f'<line x1="{x(t):.1f}" y1="{top_ + h}" x2="{x(t):.1f}" y2="{top_ + h + 4}" stroke="#8a93a6"/>')
        k += 1
    out.append(f'<line x1="{left}" y1="{top_ + h}" x2="{left + w}" y2="{top_ + h}" stroke="#8a93a6"/>')
    lx: float = left
    for label, colour, _ in series:
        out.append(f'<rect x="{lx:.1f}" y="25" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14:.1f}" y="34" font-size="12" fill="#1d2330">{_E(label)}</text>')
        lx += 7.5 * len(label) + 30
    for n, ((label, colour, _), vs) in enumerate(zip(series, values)):
        coords = [(x(p.time), y(v)) for p, v in zip(points, vs) if p.time >= start]
        if not coords:
            continue
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
        if fill_first and n == 0 and len(coords) > 1:
            base = top_ + h
            area = f"{coords[0][0]:.1f},{base} {pts} {coords[-1][0]:.1f},{base}"
            out.append(f'<polygon points="{area}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        dash = ' stroke-dasharray="6 4"' if label in dashed else ""
        out.append(f'<polyline class="series" data-series="{_E(label)}" points="{pts}" fill="none" '
                   f'stroke="{colour}" stroke-width="2" stroke-linejoin="round"{dash}/>')
        if len(coords) == 1:
            out.append(f'<circle cx="{coords[0][0]:.1f}" cy="{coords[0][1]:.1f}" r="3" fill="{colour}"/>')
    out.append("</svg>")
    return "\n".join(out)


def _per_minute(nominal: float, count: Callable[[Sample], int]) -> Callable[[Sample], float]:
    return lambda s: count(s) * 60.0 / max(s.interval, nominal)


@frozen
class StatusData:
    """
    What the status page shows: of one node (L{status_data}), or of a node's
    workers together (L{relaynet.admin.fleet}).

    @ivar pid: the process shown in the header.
    @ivar summary: the queue's summary (L{summarize}'s schema), top 8 rows.
    @ivar sessions: open SMTP sessions.
    @ivar interval: the history's nominal interval in seconds.
    @ivar span: how far back the history goes, in seconds.
    @ivar samples: the history's whole intervals, oldest first.
    @ivar points: C{samples} and the interval in progress.
    @ivar hops: next-hop health, by name.
    @ivar hop_states: the hop-state cache by next-hop name (L{hop_reachability}).
    @ivar sections: HTML sections shown above the chart (a supervisor's workers).
    @ivar notes: warnings shown above everything (shards not answering).
    @ivar health: bounce rates by sending and destination domain (the
        "list health" section; C{None}: not shown).
    @ivar suppressed: the suppression list's live entries by source.
    """

    config: NodeConfig
    pid: int
    started: float | None
    summary: dict[str, Any]
    sessions: int
    interval: float
    span: float
    samples: Sequence[Sample]
    points: Sequence[Sample]
    hops: Sequence[HopHealth]
    hop_states: Mapping[str, Mapping[str, Any]]
    sections: Sequence[str] = ()
    notes: Sequence[str] = ()
    health: ListHealth | None = None
    suppressed: Mapping[str, int] = field(factory=dict)
    destinations: Sequence[Mapping[str, Any]] = ()


def status_data(views: AdminViews) -> StatusData:
    """What the status page shows of the node seen through C{views}."""
    config = views.node.config
    metrics = views.metrics
    hist = metrics.history
    states = hop_reachability(metrics.hop_states())
    return StatusData(
        config=config, pid=os.getpid(), started=views.node.started_at,
        summary=views.queue.summary(top=8),  # the queue's counters: no walk
        sessions=views.sessions.count(), interval=hist.interval, span=hist.span,
        samples=list(hist.samples), points=hist.points(),
        hops=metrics.hop_health([*configured_hops(config), *states]), hop_states=states,
        health=metrics.health, suppressed=metrics.suppression(),
        destinations=list(metrics.destination_states()),
    )


def render_status(views: AdminViews, now: float) -> str:
    """The status page of the node seen through C{views}, at time C{now}."""
    return render_page(status_data(views), now)


def render_page(data: StatusData, now: float) -> str:
    """The status page showing C{data}, at time C{now}."""
    config = data.config
    summary = data.summary
    started = data.started
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="10">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>relaynet {_E(config.name)} status</title><style>{_CSS}</style></head><body>",
        f"<header><h1>relaynet node {_E(config.name)}</h1><div class=\"meta\">{_E(config.hostname)}"
        f" &middot; relaynet {_E(__version__)} &middot; pid {data.pid}"
        f" &middot; up {human_age(now - started) if started else '-'}"
        f" &middot; config {_E(config.source)}"
        f" &middot; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))}</div></header><main>",
    ]
    for note in data.notes:
        parts.append(f'<section class="err" id="missing">{_E(note)}</section>')
    oldest = summary["oldest"]
    cards = [
        ("queued", summary["messages"]), ("incoming", summary["states"]["incoming"]),
        ("active", summary["states"]["active"]), ("deferred", summary["states"]["deferred"]),
        ("hold", summary["states"]["hold"]), ("queue size", _size(summary["bytes"])),
        ("oldest", human_age(oldest["age"]) if oldest else "-"),
        ("sessions", data.sessions),
    ]
    parts.append('<div class="cards" id="counts">' + "".join(
        f'<div class="card"><div class="v">{_E(str(v))}</div><div class="k">{_E(k)}</div></div>'
        for k, v in cards
    ) + "</div>")
    parts.extend(data.sections)
    points = list(data.points)
    # The window grows with the history, from 5 minutes up to its span.
    first = min((p.time - p.interval for p in points), default=now)
    span = min(data.span, max(300.0, math.ceil((now - first) / 60) * 60))
    depth = svg_chart(
        "Queue depth (messages)", now, span, points,
        [("queued", "#3465a4", lambda s: s.depth), ("deferred", "#d98c00", lambda s: s.deferred),
         ("hold", "#8a93a6", lambda s: s.hold)],
        fill_first=True, dashed=("deferred", "hold"),
    )
    nominal = data.interval
    # Rates only over whole intervals: the one in progress would dip.
    rate = svg_chart(
        "Throughput (per minute)", now, span, list(data.samples) or points,
        [("received", "#3465a4", _per_minute(nominal, lambda s: s.received)),
         ("delivered", "#2e8540", _per_minute(nominal, lambda s: s.delivered)),
         ("deferred", "#d98c00", _per_minute(nominal, lambda s: s.deferrals)),
         ("bounced", "#c62828", _per_minute(nominal, lambda s: s.bounced))],
    )
    parts.append(
        f'<section id="chart"><h2>Last {int(span // 60)} minutes</h2>'
        f'<div class="charts"><div>{depth}</div><div>{rate}</div></div>'
        f'<div class="muted">one point every {_num(nominal)} s; the depth\'s last point is now</div>'
        "</section>"
    )
    parts.append(_routing_section(config))
    parts.append(_hops_section(data.hops, config, now, data.hop_states))
    if data.destinations:
        parts.append(_destinations_section(data.destinations, now))
    parts.append(_queue_section(summary))
    if data.health is not None:
        parts.append(_health_section(data.health, data.suppressed))
    parts.append(
        "</main><footer>Also: <a href=\"/metrics\">/metrics</a> (Prometheus) &middot; "
        "<code>relaynet queue summary</code> &middot; this page reloads every 10 s</footer></body></html>"
    )
    return "\n".join(parts)


def _routing_section(config: NodeConfig) -> str:
    table = routes_json(config)
    rows = []
    if table["local_domains"]:
        rows.append(
            f"<tr><td class=\"muted\">local</td><td>{_E(', '.join(table['local_domains']))}</td>"
            "<td>local</td><td>Maildir under the mailroot</td><td></td></tr>"
        )
    for r in table["routes"]:
        if r["action"] == "relay":
            target = "<br>".join(
                f"<code>{_E(h['endpoint'])}</code> <span class=\"muted\">priority {h['priority']}</span>"
                for h in r["next_hops"]
            )
        elif r["action"] == "mx":
            target = f"MX hosts of the domain, port {r['mx_port']}"
        elif r["action"] == "reject":
            target = f"<code>{_E(r['reply'])}</code>"
        else:
            target = "Maildir under the mailroot"
        extra = f"ack {_E(r['ack'])}, tls {_E(r['tls'])}" if "ack" in r else ""
        rows.append(
            f"<tr><td class=\"muted\">{r['index']}</td><td>{_E(', '.join(r['domains']))}</td>"
            f"<td>{_E(r['action'])}</td><td>{target}</td><td>{extra}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="5" class="muted">no routes</td></tr>')
    return (
        '<section id="routes"><h2>Routing table</h2><table><thead><tr><th>#</th><th>domains</th>'
        "<th>action</th><th>next hops</th><th>options</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></section>"
    )


def _connection_cell(state: Mapping[str, Any] | None, now: float) -> str:
    """The hop-state cache's word on a hop: up, or down until when and why."""
    if state is None:
        return '<span class="muted">-</span>'
    if state["connection"] == "up":
        return '<span class="state up">up</span>'
    until = state.get("down_until")
    when = f" for {human_age(until - now)}" if isinstance(until, (int, float)) and until > now else ""
    why = state.get("down_reason") or ""
    return (f'<span class="state failing">{_E(state["connection"])}</span>{when}'
            + (f'<div class="err">{_E(why[:300])}</div>' if why else ""))


def _hops_section(
    hops: Iterable[Any], config: NodeConfig, now: float, states: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    users: dict[str, list[str]] = {"local": ["local delivery"]}
    for i, rule in enumerate(config.routes):
        for h in rule.next_hops:
            users.setdefault(hop_name(h.endpoint), []).append(f"#{i}")
    rows = []
    for hop in hops:
        err = ""
        if hop.last_error and hop.state != "up":
            err = f"<div class=\"err\">{_E(hop.last_error[:300])} ({_ago(now, hop.last_failure)})</div>"
        elif hop.last_error:
            err = f"<div class=\"muted\">{_E(hop.last_error[:300])} ({_ago(now, hop.last_failure)})</div>"
        rows.append(
            f"<tr><td><code>{_E(hop.name)}</code></td>"
            f"<td><span class=\"state {hop.state}\">{hop.state}</span></td>"
            f"<td>{_connection_cell((states or {}).get(hop.name), now)}</td>"
            f"<td>{_E(' '.join(users.get(hop.name, [])) or '-')}</td>"
            f"<td class=\"n\">{hop.sent}</td><td class=\"n\">{hop.deferred}</td><td class=\"n\">{hop.bounced}</td>"
            f"<td>{_ago(now, hop.last_success)}</td><td>{err or '<span class=muted>-</span>'}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="9" class="muted">no next hops yet</td></tr>')
    return (
        '<section id="hops"><h2>Next hops</h2><table><thead><tr><th>next hop</th><th>state</th>'
        "<th>connections</th><th>routes</th><th>sent</th><th>deferred</th><th>bounced</th><th>last success</th>"
        "<th>last error</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        f'<div class="muted">counts are recipients since the node started; failing = {FAILING_AFTER} or more '
        "deferrals in a row; connections: down while the node tries no connection to the hop "
        "(its mail is deferred at once)</div></section>"
    )


def _destinations_section(states: Iterable[Mapping[str, Any]], now: float) -> str:
    """Traffic shaping ([shaping]): each destination's state, rate, tokens and connections."""
    rows = []
    for st in states:
        state = str(st["state"])
        until = st.get("until")
        why = _E(str(st.get("reason") or "")) or '<span class="muted">-</span>'
        left = f" ({_num(max(0.0, float(until) - now))} s left)" if until is not None else ""
        css = "down" if state == "paused" else "probing" if state == "slowed" else "up"
        tokens = "-" if st.get("tokens") is None else f"{float(st['tokens']):.1f} / {st['burst']}"
        conns = f"{st['connections']}" + (f" / {st['max_connections']}" if st.get("max_connections") else "")
        rows.append(
            f"<tr><td>{_E(str(st['destination']))}</td>"
            f"<td><span class=\"state {css}\">{_E(state)}</span>{left}</td>"
            f"<td>{_E(str(st.get('rate') or '-'))}</td><td class=\"n\">{tokens}</td>"
            f"<td class=\"n\">{conns}</td><td class=\"n\">{st['queued']}</td>"
            f"<td class=\"n\">{st['remembered']}</td><td class=\"n\">{st['throttles']}</td><td>{why}</td></tr>"
        )
    return (
        '<section id="destinations"><h2>Traffic shaping</h2><table><thead><tr><th>destination</th>'
        "<th>state</th><th>rate</th><th>tokens</th><th>connections</th><th>waiting</th><th>deferred</th>"
        "<th>throttles</th><th>reason</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        '<div class="muted">paused: a throttling reply stopped new mail to the destination until the time shown; '
        "deferred: messages waiting for room, flushed when it comes</div></section>"
    )


def _health_section(health: ListHealth, suppressed: Mapping[str, int], top: int = 10) -> str:
    """
    "List health": bounce rates by sending domain and by destination domain
    (final outcomes since the node started), the classes of the bounces,
    and the size of the suppression list.
    """

    def rows(side: str) -> str:
        out = []
        for h in health.top(side, top):
            classes = ", ".join(f"{k} {v}" for k, v in sorted(h.classes.items(), key=lambda kv: -kv[1]))
            warn = ' class="err"' if h.bounce_rate >= 0.05 and h.bounced >= 5 else ""
            out.append(
                f"<tr><td>{_E(h.domain)}</td><td class=\"n\">{h.delivered}</td><td class=\"n\">{h.bounced}</td>"
                f"<td class=\"n\"><span{warn}>{h.bounce_rate * 100:.1f}%</span></td>"
                f"<td>{_E(classes) or '<span class=muted>-</span>'}</td></tr>"
            )
        return "".join(out) or '<tr><td colspan="5" class="muted">no final outcomes yet</td></tr>'

    head = ("<thead><tr><th>{}</th><th>delivered</th><th>bounced</th><th>bounce rate</th>"
            "<th>bounce classes</th></tr></thead>")
    total = sum(suppressed.values())
    by = ", ".join(f"{k} {v}" for k, v in sorted(suppressed.items()) if v)
    return (
        '<section id="health"><h2>List health</h2><div class="charts"><div style="flex:1 1 420px">'
        f"<table>{head.format('sending domain')}<tbody>{rows('sender')}</tbody></table></div>"
        f'<div style="flex:1 1 420px"><table>{head.format("destination")}<tbody>{rows("destination")}'
        "</tbody></table></div></div>"
        f'<div class="muted">recipients since the node started (bounced includes expired); '
        f"suppression list: {total} address(es){' (' + _E(by) + ')' if by else ''}; "
        "<code>relaynet suppress list</code></div></section>"
    )


def _queue_section(summary: dict[str, Any]) -> str:
    dests = "".join(
        f"<tr><td>{_E(d['domain'])}</td><td class=\"n\">{d['messages']}</td><td class=\"n\">{d['recipients']}</td></tr>"
        for d in summary["destinations"]
    ) or '<tr><td colspan="3" class="muted">the queue is empty</td></tr>'
    reasons = "".join(
        f"<tr><td>{_E(r['reason'])}</td><td class=\"n\">{r['recipients']}</td></tr>"
        for r in summary["deferral_reasons"]
    ) or '<tr><td colspan="2" class="muted">none</td></tr>'
    return (
        '<section id="queue"><h2>Queue</h2><div class="charts"><div style="flex:1 1 340px">'
        "<table><thead><tr><th>destination</th><th>messages</th><th>recipients</th></tr></thead>"
        f"<tbody>{dests}</tbody></table></div><div style=\"flex:2 1 480px\"><table><thead><tr>"
        f"<th>deferral reason</th><th>recipients</th></tr></thead><tbody>{reasons}</tbody></table>"
        "</div></div></section>"
    )
