# -*- test-case-name: tests.test_webhooks -*-
"""
Delivery webhooks (issue 14 item 4): every delivery event of the node is
POSTed as JSON to the configured URLs, in batches, signed, retried, and
durable: an event survives a restart until its receiver acknowledged it.

 - **Outbox.** Each webhook has its own append-only file
   (C{<spool>/webhooks/<name>.jsonl}; C{webhooks.K/} in worker K): the
   event observer only puts the event, with its id, on a list in memory;
   every C{flush_interval} the list is appended to the file and fsynced in
   a worker thread. Delivery reads the next batch from the file from the
   acknowledged offset (C{<name>.ack}, written durably after each 2xx), so
   memory stays bounded whatever the receiver does. A fully acknowledged
   file is truncated (compaction). The mail never waits for a webhook.
 - **Delivery.** One batch in flight per webhook, so a message's events
   arrive in the order they happened. Body: C{{"events": [...]}}, each
   event as in the event log (docs/events.md) plus C{id}, unique per node
   and increasing (C{<node>-<shard>-<n>}): the idempotency key. Headers:
   C{Content-Type: application/json}, C{X-Relaynet-Signature: sha256=<hex>}
   (HMAC-SHA256 of the body with the webhook's secret), C{X-Relaynet-Batch}
   (the first and last ids). A 2xx acknowledges the batch; anything else,
   or no answer within C{timeout}, is retried after a backoff that doubles
   from 1 s to 5 minutes.
 - **At least once.** An event is delivered again only if the node stopped
   (or crashed) between the receiver's 2xx and the acknowledgement's fsync;
   receivers drop repeated ids. Events written to memory but not yet to
   the file (at most C{flush_interval}) are lost by a crash, as the last
   second of the event log is (docs/events.md).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from relaynet.config import DELIVERY_EVENTS, WebhookSettings, parse_webhooks

MAX_BACKOFF = 300.0
COMPACT_OVER = 1 << 20
"""A fully acknowledged outbox larger than this is truncated."""


def signature(secret: bytes, body: bytes) -> str:
    """The C{X-Relaynet-Signature} value of C{body}: C{sha256=<hex HMAC>}."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Outbox:
    """
    The durable queue of one webhook: an append-only JSON lines file and the
    offset acknowledged so far. Every method that touches the disk runs in
    a worker thread (C{run_in_thread}), one at a time (a lock).
    """

    def __init__(self, directory: Path, name: str, run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]]) -> None:
        self.path = directory / f"{name}.jsonl"
        self.ack_path = directory / f"{name}.ack"
        self._run = run_in_thread
        self._lock = DeferredLock()
        self.pending: list[bytes] = []
        self.acked = 0
        self.size = 0
        self.last_id = 0

    def _locked(self, work: Callable[[], Any]) -> Deferred[Any]:
        return self._lock.run(lambda: self._run(work))

    def load(self) -> Deferred[None]:
        """Read the acknowledged offset and the last id back (at start)."""

        def read() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.acked = int(json.loads(self.ack_path.read_text("utf-8"))["offset"])
            except (OSError, ValueError, KeyError, TypeError):
                self.acked = 0
            try:
                self.size = self.path.stat().st_size
            except OSError:
                self.size = 0
            if self.size:
                with open(self.path, "rb") as f:
                    f.seek(max(0, self.size - 65536))
                    lines = f.read().splitlines()
                for line in reversed(lines):
                    try:
                        self.last_id = int(str(json.loads(line)["id"]).rsplit("-", 1)[1])
                        break
                    except (ValueError, KeyError, IndexError, TypeError):
                        continue
            self.acked = min(self.acked, self.size)

        return self._locked(read)

    def add(self, record: dict[str, Any], prefix: str) -> None:
        """Queue one event (reactor thread: memory only)."""
        self.last_id += 1
        line = json.dumps({"id": f"{prefix}-{self.last_id}", **record}, separators=(",", ":"), ensure_ascii=False)
        self.pending.append(line.encode("utf-8") + b"\n")

    def flush(self) -> Deferred[None]:
        """Append the queued events to the file and fsync it."""
        lines, self.pending = self.pending, []
        if not lines:
            return self._locked(lambda: None)
        data = b"".join(lines)

        def write() -> None:
            from relaynet.queue.spool import append_durably

            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_durably(self.path, data, 0o600)
            self.size += len(data)

        return self._locked(write)

    def batch(self, limit: int) -> Deferred[tuple[list[bytes], int]]:
        """The next (at most) C{limit} unacknowledged events and the offset after them."""

        def read() -> tuple[list[bytes], int]:
            if self.acked >= self.size:
                return [], self.acked
            out: list[bytes] = []
            offset = self.acked
            with open(self.path, "rb") as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith(b"\n") or len(out) >= limit:
                        break
                    out.append(line.rstrip(b"\n"))
                    offset += len(line)
            return out, offset

        return self._locked(read)

    def acknowledge(self, offset: int) -> Deferred[None]:
        """Record (durably) that everything before C{offset} was delivered; compact a drained file."""

        def write() -> None:
            from relaynet.queue.spool import write_file_durably

            if offset >= self.size and self.size > COMPACT_OVER:
                # Drained: start the file again (the ack first, so a crash in
                # between leaves an offset that is not beyond the file).
                write_file_durably(self.ack_path, b'{"offset": 0}')
                os.truncate(self.path, 0)
                self.size = 0
                self.acked = 0
                return
            write_file_durably(self.ack_path, json.dumps({"offset": offset}).encode())
            self.acked = offset

        return self._locked(write)

    @property
    def backlog(self) -> int:
        """Octets written and not yet acknowledged (for metrics)."""
        return self.size - self.acked


class _Drain(Protocol):
    def __init__(self, done: Deferred[None]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


class Webhook(Service):
    """
    One webhook in a node: observes the event log (an L{EventLog} observer),
    keeps its L{Outbox}, and delivers batches.
    """

    log = Logger()

    def __init__(
        self, settings: WebhookSettings, directory: Path, reactor: Any,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]], prefix: str,
        agent: Any = None, clock: IReactorTime | None = None,
    ) -> None:
        """
        @param prefix: the start of every event id (node name and shard).
        @param agent: an C{IAgent} (default: Twisted's, certificates checked
            against the system trust store).
        """
        self.settings = settings
        self.outbox = Outbox(directory, settings.name, run_in_thread)
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.prefix = prefix
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = agent or Agent(reactor, pool=self._pool)
        self.delivered = 0
        self.failures = 0
        self._backoff = 0.0
        self._timer: Any = None
        self._busy = False
        self._loaded: Deferred[None] | None = None
        self._early: list[dict[str, Any]] | None = []

    def observe(self, record: dict[str, Any]) -> None:
        """The event log's observer: queue the event if this webhook wants it."""
        if record.get("event") not in self.settings.events:
            return
        if self._early is not None:
            # The outbox is still being read back: ids are given after it,
            # so that they go on from the last one written before.
            self._early.append(record)
            return
        self.outbox.add(record, self.prefix)

    def _ready(self, _: object) -> None:
        early, self._early = self._early or [], None
        for record in early:
            self.outbox.add(record, self.prefix)
        self._schedule(0.0)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        self._loaded = self.outbox.load()
        self._loaded.addCallbacks(self._ready, self._log("reading the outbox"))

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = self.outbox.flush()
        closed = self._pool.closeCachedConnections()
        return d.addCallback(lambda _: closed)

    def _log(self, what: str) -> Callable[[Failure], None]:
        def failed(f: Failure) -> None:
            self.log.failure("Webhook {name}: {what} failed", f, name=self.settings.name, what=what)
        return failed

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            return
        self._timer = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        if self._busy:
            return
        self._busy = True
        d = self._cycle()
        d.addErrback(self._log("delivery"))

        def done(more: Any) -> None:
            self._busy = False
            if more is True:
                self._schedule(0.0)
            else:
                self._schedule(self._backoff or self.settings.flush_interval)

        d.addBoth(done)

    @inlineCallbacks
    def _cycle(self) -> Any:
        """Flush, then deliver one batch. @return: whether a full batch went (go on at once)."""
        yield self.outbox.flush()
        lines, offset = yield self.outbox.batch(self.settings.batch_size)
        if not lines:
            return False
        body = b'{"events":[' + b",".join(lines) + b"]}"
        first = json.loads(lines[0])["id"]
        last = json.loads(lines[-1])["id"]
        headers = Headers({
            b"content-type": [b"application/json"],
            b"user-agent": [b"relaynet webhook"],
            b"x-relaynet-signature": [signature(self.settings.secret, body).encode()],
            b"x-relaynet-batch": [f"{first}..{last}".encode()],
        })
        try:
            d = self.agent.request(b"POST", self.settings.url.encode("ascii"), headers,
                                   FileBodyProducer(io.BytesIO(body)))
            d.addTimeout(self.settings.timeout, self.clock)
            response: IResponse = yield d
            drained: Deferred[None] = Deferred()
            response.deliverBody(_Drain(drained))
            yield drained
            code = response.code
        except Exception as e:  # noqa: BLE001 - any failure is retried
            self._failed(f"{type(e).__name__}: {e}")
            return False
        if not 200 <= code < 300:
            self._failed(f"HTTP {code}")
            return False
        yield self.outbox.acknowledge(offset)
        self.delivered += len(lines)
        self._backoff = 0.0
        return len(lines) >= self.settings.batch_size

    def _failed(self, why: str) -> None:
        self.failures += 1
        self._backoff = min(MAX_BACKOFF, max(1.0, self._backoff * 2))
        self.log.warn(
            "Webhook {name}: delivery to {url} failed ({why}); retrying in {delay:g} s",
            name=self.settings.name, url=self.settings.url, why=why, delay=self._backoff,
        )


__all__ = ["DELIVERY_EVENTS", "Outbox", "Webhook", "WebhookSettings", "parse_webhooks", "signature"]
