# -*- test-case-name: tests.test_node -*-
"""
The queue runner: takes committed messages and delivers them.

A message is attempted as soon as it is committed (no waiting for a queue
scan), and again when its retry time comes. Local recipients are delivered
into Maildirs in worker threads. After each attempt the outcomes are recorded
durably (state file) before anything else happens; a message whose recipients
are all final is removed from the spool.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relaynet.config import NodeConfig
from relaynet.events import EventLog
from relaynet.mailbox import LocalResult, deliver_local
from relaynet.scheduler import RetryPolicy
from relaynet.spool import QueueEntry, RecipientState, Spool


class QueueRunner:
    """
    Schedules and performs delivery attempts for one node's queue.

    @ivar entries: queued messages by queue id.
    """

    log = Logger()

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        events: EventLog,
        reactor: Any,
        threadpool: ThreadPool,
        policy: RetryPolicy = RetryPolicy(),
        concurrency: int = 8,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.events = events
        self.reactor: IReactorTime = reactor
        self._threads_reactor: IReactorFromThreads = reactor
        self.pool = threadpool
        self.policy = policy
        self.now = now
        self.entries: dict[str, QueueEntry] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._busy: dict[str, Deferred[None]] = {}
        self._sem = DeferredSemaphore(concurrency)
        self._running = False

    def start(self, entries: list[QueueEntry]) -> None:
        """Take over recovered messages and begin delivering."""
        self._running = True
        for entry in entries:
            self.entries[entry.queue_id] = entry
            due = entry.state.next_attempt
            delay = 0.0 if due is None else max(0.0, due - self.now())
            if not entry.state.held:
                self._schedule(entry, delay)

    def stop(self) -> Deferred[None]:
        """Stop scheduling; the Deferred fires when running attempts are done."""
        self._running = False
        for t in self._timers.values():
            if t.active():
                t.cancel()
        self._timers.clear()
        running = list(self._busy.values())
        if not running:
            return succeed(None)
        from twisted.internet.defer import gatherResults

        return gatherResults(running, consumeErrors=True).addBoth(lambda _: None)

    def enqueue(self, entry: QueueEntry) -> None:
        """A message was just committed: deliver it now."""
        self.entries[entry.queue_id] = entry
        if self._running:
            self._attempt(entry)

    def _schedule(self, entry: QueueEntry, delay: float) -> None:
        qid = entry.queue_id
        old = self._timers.pop(qid, None)
        if old is not None and old.active():
            old.cancel()
        self._timers[qid] = self.reactor.callLater(delay, self._fire, qid)

    def _fire(self, qid: str) -> None:
        self._timers.pop(qid, None)
        entry = self.entries.get(qid)
        if entry is not None and self._running:
            self._attempt(entry)

    def _attempt(self, entry: QueueEntry) -> None:
        qid = entry.queue_id
        if qid in self._busy:
            return
        d = self._sem.run(self._deliver, entry)
        self._busy[qid] = d

        def done(result: object) -> None:
            self._busy.pop(qid, None)
            if hasattr(result, "getTraceback"):
                self.log.failure("Delivery attempt of {queue_id} failed", result, queue_id=qid)  # type: ignore[arg-type]
                if self._running and qid in self.entries:
                    self._schedule(entry, self.policy.minimal_backoff)

        d.addBoth(done)

    def _deliver(self, entry: QueueEntry) -> Deferred[None]:
        pending = entry.pending_recipients()
        local = [r.address for r in pending if r.route == "local"]
        if not local:
            return succeed(None)
        d: Deferred[list[LocalResult]] = deferToThreadPool(
            self._threads_reactor, self.pool, deliver_local, self.config.local, entry, local
        )
        d.addCallback(self._record, entry)
        return d

    def _record(self, results: list[LocalResult], entry: QueueEntry) -> Deferred[None]:
        now = self.now()
        env = entry.envelope
        retry = False
        for res in results:
            st = entry.state.recipients.setdefault(res.address, RecipientState())
            st.attempts += 1
            st.last_attempt = now
            st.dsn = res.dsn
            st.diagnostic = res.diagnostic or None
            if res.ok:
                st.status = "delivered"
                event = "delivered"
            elif res.permanent:
                st.status = "bounced"
                event = "bounced"
            else:
                st.status = "deferred"
                event = "deferred"
                retry = True
            self.events.emit(
                event, queue_id=entry.queue_id, sender=env.sender, recipient=res.address,
                relay="local", delay=round(now - env.arrival, 6), dsn=res.dsn,
                status=event, diagnostic=res.diagnostic or None,
            )
        if not entry.pending_recipients():
            self.entries.pop(entry.queue_id, None)
            return self.spool.remove(entry)
        if retry:
            attempts = max(s.attempts for s in entry.state.recipients.values())
            delay = self.policy.delay(attempts)
            entry.state.next_attempt = now + delay
            d = self.spool.record(entry)
            d.addCallback(lambda _: self._running and self._schedule(entry, delay))
            return d
        return self.spool.record(entry)
