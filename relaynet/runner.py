# -*- test-case-name: tests.test_runner -*-
"""
The queue runner: orchestration, nothing else.

It joins the stages of the middle of a node: the L{QueueCore} (which owns
every message's state and decides), the L{Timetable} (when each message is
due), attempt slots (how many attempts run at once), the L{Delivery} stage
(one attempt), and the L{Spool} (durable writes). For every decision of the
core it carries out, in order: queue the DSNs the decision asks for, write
the message's state (or remove it), emit the events, schedule it.

Writes for one message are serialised: each waits for the previous write
of the same queue id, and each writes the state as it is when it runs, so
an admin C{hold} during an attempt and the attempt's outcomes never write
one state file at once (they did: two writers renaming one C{tmp/ID.state}
corrupted files and lost holds).

A transfer that a relaynet next hop accepted and remembers by name is
recorded a little later, in a batch with the others of that time
(L{QueueRunner._later}); every other outcome at once.

A message is attempted as soon as it is committed (no waiting for a queue
scan) and again when its retry time comes. Any exception in an attempt
defers that message alone, with the ordinary backoff; the attempt slot is
always given back and the timetable kicked.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from typing import Any, Callable, Iterable, TypeVar

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaynet.config import NodeConfig
from relaynet.delivery.attempt import Delivery, ThreadedMailboxes, system_resolver
from relaynet.delivery.client import SUSPENDED, OutboundManager
from relaynet.delivery.dane import DANE
from relaynet.delivery.dkim import Signer
from relaynet.delivery.mtasts import MTASTS
from relaynet.delivery.tlspolicy import OutboundSecurity
from relaynet.delivery.tlsrpt import TLSReports, TLSReportSender, TLSReportService
from relaynet.delivery.lmtp import LMTPAgent
from relaynet.delivery.routing import Route, RoutingTable
from relaynet.events import EventLog
from relaynet.queue import listing
from relaynet.queue.bounce import build_dsn, split_headers
from relaynet.queue.core import Decision, Notice, Outcome, Plan, QueueCore, Write
from relaynet.queue.ordering import Key
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import Envelope, QueueEntry, Recipient, Spool
from relaynet.queue.suppression import SuppressionList, classifier_for, suppression_settings
from relaynet.queue.states import QueueTotals, RecipientStatus
from relaynet.queue.timetable import Timetable
from relaynet.queue.window import TransferWindow


Entries = list[QueueEntry]
Summaries = list[dict[str, Any]]

#: Messages summarised per reactor turn by L{QueueRunner.collect}.
COLLECT_SLICE = 1000

#: Seconds between two reads of the suppression list's file by a worker (the others' changes).
SUPPRESSION_REFRESH = 5.0

#: Seconds the recording of a named transfer's outcome waits (L{QueueRunner._later}).
SETTLE_DELAY = 0.02

T = TypeVar("T")


class SerialWrites:
    """
    Runs jobs one at a time per key: a job starts when the previous job of
    the same key has finished (successfully or not).
    """

    def __init__(self) -> None:
        self._tails: dict[str, Deferred[None]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def run(self, key: str, job: Callable[[], Any]) -> Deferred[Any]:
        """Run C{job()} after every earlier job of C{key}; fire with its result."""
        previous = self._tails.get(key)
        finished: Deferred[None] = Deferred()
        self._tails[key] = finished
        out: Deferred[Any] = Deferred()

        def go(_: object = None) -> None:
            d = maybeDeferred(job)

            def done(result: object) -> None:
                if self._tails.get(key) is finished:
                    del self._tails[key]
                finished.callback(None)
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(result)

            d.addBoth(done)

        if previous is None:
            go()
        else:
            previous.addCallback(go)
        return out


PACE_TICK = 0.1
"""Seconds between the refills of a paced runner (L{QueueRunner.pace})."""


class QueueRunner(Service):
    """
    Schedules and performs delivery attempts for one node's queue, and is
    the queue view the admin API and metrics read.
    """

    log = Logger()

    def __init__(
        self,
        config: NodeConfig,
        spool: Any,
        events: EventLog,
        reactor: Any,
        threadpool: ThreadPool,
        outbound: Any = None,
        now: Callable[[], float] = time.time,
        resolver: Any = None,
        delivery: Delivery | None = None,
        window: TransferWindow | None = None,
        suppression: SuppressionList | None = None,
        settle_delay: float = SETTLE_DELAY,
    ) -> None:
        """
        @param spool: a L{Spool} (or L{relaynet.testing.MemorySpool}).
        @param threadpool: runs local deliveries and DSN composition.
        @param outbound: the outbound agent (an L{OutboundManager} made from
            C{config} when not given).
        @param now: the wall clock (arrival times are wall-clock seconds).
        @param resolver: the MX resolver (made from C{[dns]} on first use).
        @param delivery: the delivery stage (made from the above when not given).
        @param window: the transfers accepted from relaynet upstreams; a
            message that came by one is journalled there before it is removed.
        @param suppression: the suppression list (by default
            C{<spool>/suppression.jsonl} with a disk spool, in memory with
            another); recipients whose delivery fails permanently with a
            class of C{[suppression] classes} are added to it.
        @param settle_delay: seconds the outcome of a named transfer waits
            to be recorded (L{_later}); C{0} records it in the next reactor turn.
        """
        self.config = config
        self.spool = spool
        self.window = window
        self.events = events
        self.reactor = reactor
        self.pool = threadpool
        self.now = now
        self.table = RoutingTable(config)
        settings = suppression_settings(config)
        self.core = QueueCore(_retry_policy(config), config.queue.delay_warning, classifier_for(settings))
        if suppression is None:
            suppression = SuppressionList(
                config.spool / "suppression.jsonl" if isinstance(spool, Spool) else None, now=now,
                run_in_thread=lambda work: deferToThreadPool(reactor, threadpool, work),
                expiry_days=settings.expiry_days,
            )
        #: The suppression list (the intake and the admin API read it).
        self.suppression = suppression
        self._suppression_refresh: LoopingCall | None = None
        self.outbound = outbound or OutboundManager(
            reactor, config.outbound, config.outbound.helo_name or config.hostname, config.tls.ca_file,
            events=events, signer=Signer.from_settings(config.dkim),
        )
        if isinstance(self.outbound, OutboundManager):
            self.outbound.configure_egress(config.egress)
            self.outbound.configure_shaping(config.shaping, _shaping_share(config))
        if isinstance(self.outbound, OutboundManager) and self.outbound.flush is None:
            # A next hop that reopens flushes the mail it deferred while down.
            self.outbound.flush = self.flush_ids
        self._resolver = resolver
        self.tls_reports, self.tls_report_service = self._tls_reporting(config)
        if isinstance(self.outbound, OutboundManager):
            self.outbound.tls_reports = self.tls_reports
        self.delivery = delivery or Delivery(
            lambda: self.table, self.outbound,
            ThreadedMailboxes(reactor, threadpool, lambda: self.config.local),
            self.resolver, lmtp=LMTPAgent(reactor, lambda: self.config), security=self.security,
        )
        self._security: OutboundSecurity | None = None
        self._slots = 0
        self._attempts: dict[str, Deferred[list[Outcome]]] = {}
        self._settling: list[tuple[Deferred[list[Outcome]], list[Outcome]]] = []
        self._settle_call: Any = None
        self._settle_delay = settle_delay
        self._writes = SerialWrites()
        self._timetable = Timetable(reactor, self._fire, self._has_slot)
        self._started = False
        # Pacing (L{pace}): attempts a second, those left in this tick, the refill.
        self._pace_rate: float | None = None
        self._tokens = 0.0
        self._pacer: LoopingCall | None = None

    # -- lifecycle -------------------------------------------------------

    def load(self, entries: Iterable[QueueEntry]) -> None:
        """
        Take over recovered messages (before or after starting). Once
        started, the due ones are scheduled as they come, in one go: they
        fire from the next reactor turn on, in due-time order, while the
        rest of the queue is still being recovered (a batch at a time).
        """
        now = self.now()
        scheduled: list[tuple[str, float]] = []
        for entry in entries:
            due = self.core.add(entry, now)
            if self._started and due is not None:
                scheduled.append((entry.queue_id, due - now))
        if scheduled:
            self._timetable.set_many(scheduled)

    def schedule_all(self) -> None:
        """Schedule every queued message by its state (at start, for what was loaded before)."""
        now = self.now()
        for entry in self.core:
            self._schedule_by_state(entry, now)

    def start(self, entries: Iterable[QueueEntry] = ()) -> None:
        """Take over recovered messages and begin delivering."""
        self.load(entries)
        self._started = True
        self.schedule_all()

    def pace(self, rate: float | None) -> None:
        """
        Start at most C{rate} attempts a second from the timetable, in
        due-time order as always (L{None}: as many as there are slots, at
        once). A node paces its attempts while it recovers its queue
        (L{relaynet.node.RECOVERY_ATTEMPT_RATE}).
        """
        self._stop_pacer()
        self._pace_rate = rate
        if rate is None:
            self._tokens = 0.0
            self._timetable.kick()
            return
        self._tokens = rate * PACE_TICK
        loop = self._pacer = LoopingCall(self._refill)
        loop.clock = self.reactor
        loop.start(PACE_TICK, now=False)

    def _stop_pacer(self) -> None:
        if self._pacer is not None and self._pacer.running:
            self._pacer.stop()
        self._pacer = None

    def _refill(self) -> None:
        """A pacing tick: one tick's worth of attempts may start (none saved up)."""
        if self._pace_rate is not None:
            self._tokens = self._pace_rate * PACE_TICK
            self._timetable.kick()

    def stop(self) -> Deferred[None]:
        """Stop scheduling; the Deferred fires when running attempts are done."""
        self._started = False
        self._stop_pacer()
        self._timetable.clear()
        self.outbound.close()
        if self._settle_call is not None:
            # What waits to be recorded is recorded now, not after the delay.
            self._settle_call.cancel()
            self._settle()
        if self._suppression_refresh is not None:
            if self._suppression_refresh.running:
                self._suppression_refresh.stop()
            self._suppression_refresh = None
        running = [self._after(d) for d in self._attempts.values()]
        # Suppression entries asked for so far reach the file before the node stops.
        running.append(self.suppression.flushed().addErrback(lambda _: None))
        return gatherResults(running).addCallback(lambda _: None)

    def startService(self) -> None:
        """Begin delivering what L{load} gave (a child service of the node); read the suppression list."""
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        self.suppression.load().addErrback(
            lambda f: self.log.failure("Could not read the suppression list", f))
        if self.config.shard is not None and self._suppression_refresh is None:
            # The workers of a node share the list's file: each takes what
            # the others wrote (their bounces, the admin API) every few seconds.
            def refresh() -> Deferred[Any]:
                return self.suppression.refresh().addErrback(
                    lambda f: self.log.failure("Could not read the suppression list", f))

            loop = self._suppression_refresh = LoopingCall(refresh)
            loop.clock = self.reactor
            loop.start(SUPPRESSION_REFRESH, now=False)
        if not self._started:
            self.start()

    def stopService(self) -> Deferred[None]:
        """Stop scheduling and wait for running attempts."""
        super().stopService()  # type: ignore[no-untyped-call]  # unannotated in Twisted 26.10
        return self.stop()

    def reconfigure(self, config: NodeConfig) -> None:
        """Use a new configuration (SIGHUP): routing, limits, retry policy."""
        self.config = config
        self.table = RoutingTable(config)
        self.core.policy = _retry_policy(config)
        self.core.delay_warning = config.queue.delay_warning
        settings = suppression_settings(config)
        self.core.classify = classifier_for(settings)
        self.suppression.expiry_days = settings.expiry_days
        if isinstance(self.outbound, OutboundManager):
            self.outbound.timeouts = config.outbound
            self.outbound.ca_file = config.tls.ca_file
            self.outbound.signer = Signer.from_settings(config.dkim)
            self.outbound.configure_egress(config.egress)
            self.outbound.configure_shaping(config.shaping, _shaping_share(config))
            self.outbound.close_idle()
        self._security = None

    def _tls_reporting(self, config: NodeConfig) -> tuple[TLSReports | None, TLSReportService | None]:
        """
        TLS reporting (C{[tls_rpt]}, RFC 8460): the counters, and the
        service that writes them to C{<spool>/tls-rpt} (C{tls-rpt.K} in
        worker K) and sends the finished days' reports. Not reloaded: a
        change needs a restart.
        """
        settings = config.tls_rpt
        if not settings.enabled:
            return None, None
        shard = config.shard or 0
        reports = TLSReports(
            config.spool / ("tls-rpt" if not shard else f"tls-rpt.{shard}"), self.reactor,
            lambda work: deferToThreadPool(self.reactor, self.pool, work),
            organization_name=settings.organization_name, contact_info=settings.contact_info,
            submitter=settings.submitter or config.hostname, unique=str(shard) if shard else "",
        )
        sender = None
        if settings.send != "none":
            sender = TLSReportSender(
                reports, self.resolver(), self.reactor, self.submit_local, mode=settings.send,
                report_sender=settings.report_sender or f"postmaster@{config.hostname}",
                ca_file=config.tls.ca_file,
            )
        return reports, TLSReportService(
            reports, self.reactor, settings.flush_interval, sender, send_interval=settings.send_interval,
        )

    @inlineCallbacks
    def submit_local(self, sender: str, recipients: list[str], data: bytes) -> Any:
        """
        Queue a message the node itself writes (a TLS report) to
        C{recipients}, as a DSN is queued: committed (fsync), then delivered
        by the routing table. A TLS report (C{params["tlsrpt"]}) goes
        whatever DANE or MTA-STS say (RFC 8460 5.3).

        @return: a Deferred firing with the new L{QueueEntry}.
        """
        rcpts = []
        for address in recipients:
            route = self.table.route(address)
            rcpts.append(Recipient(address=address, route=str(getattr(route, "name", ""))))
        env = Envelope(
            queue_id=self.spool.new_id(), sender=sender, recipients=tuple(rcpts), arrival=self.now(),
            params={"body": None if data.isascii() else "8BITMIME", "tlsrpt": True},
            client={"protocol": "local", "helo": self.config.hostname, "ip": "127.0.0.1"},
            node=self.config.name,
        )
        writer = self.spool.begin(env)
        writer.write(data)
        new = yield writer.commit(hops=0)
        self.events.emit("received", queue_id=new.queue_id, sender=sender, recipients=list(recipients),
                         size=len(data), protocol="local", client="127.0.0.1")
        self.enqueue(new)
        return new

    def refresh_sts(self) -> Deferred[Any] | None:
        """Refresh the cached MTA-STS policies fetched more than a day ago (RFC 8461 3.3), if MTA-STS is in use."""
        security = self._security
        if security is None or security.mtasts is None:
            return None
        return security.mtasts.refresh_cached().addErrback(
            lambda f: self.log.failure("MTA-STS policy refresh failed", f))

    def security(self) -> OutboundSecurity | None:
        """
        DANE (with C{[dns] dnssec_resolver}) and MTA-STS (C{[mta_sts]}) for
        mx routes, made on first use (and again after a reload); C{None}
        when both are off.
        """
        config = self.config
        if self._security is None and (config.mta_sts.enabled or config.dnssec_resolver or self.tls_reports):
            mtasts = None
            if config.mta_sts.enabled:
                mtasts = MTASTS(
                    self.resolver(), config.spool / "mta-sts", self.reactor, ca_file=config.tls.ca_file,
                    port=config.mta_sts.policy_port, timeout=config.mta_sts.fetch_timeout,
                    background_refresh=config.mta_sts.refresh == "background",
                )
            dane = None
            if config.dnssec_resolver is not None:
                host, port = config.dnssec_resolver
                dane = DANE.for_address(self.reactor, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self._security = OutboundSecurity(mtasts, dane, self.tls_reports)
        return self._security

    def resolver(self) -> Any:
        """The DNS resolver: C{[dns].servers}, else the system's."""
        if self._resolver is None:
            self._resolver = system_resolver(self.reactor, self.config.dns_servers)
        return self._resolver

    # -- messages arriving -----------------------------------------------

    def enqueue(self, entry: QueueEntry) -> None:
        """
        A message was just committed: deliver it now, or as soon as an
        attempt slot is free. It waits in the timetable's lane of new mail:
        while older mail is due too (a recovered backlog, retries), the two
        take free slots in turn, new mail first, as in Postfix.
        """
        now = self.now()
        due = self.core.add(entry, now)
        if self._started and due is not None:
            if due <= now:
                self._timetable.arrive(entry.queue_id)
            else:
                self._schedule(entry.queue_id, due)

    def cut_through(self, entry: QueueEntry) -> Deferred[tuple[int, str, str]]:
        """
        Deliver a just-committed message at once and derive the reply to the
        client's final dot from the next hops' answers (C{ack = "cut-through"}):
        every recipient accepted: 250; every recipient refused permanently: the
        next hop's 5xx, and the message is dropped without a bounce (the client
        has the refusal); anything else (deferrals, mixed results, no next hop
        reachable): 250, and the message stays queued (store-and-forward).
        """
        self.core.add(entry, self.now())
        qid = entry.queue_id
        d = self._attempt(qid, cut_through=True)

        def reply(outcomes: list[Outcome]) -> tuple[int, str, str]:
            if outcomes and all(o.status is RecipientStatus.BOUNCED and o.code >= 500 for o in outcomes):
                o = outcomes[0]
                return o.code, o.dsn, f"{o.text} (from {o.remote})"
            if outcomes and all(o.status in (RecipientStatus.RELAYED, RecipientStatus.DELIVERED)
                                for o in outcomes):
                o = outcomes[0]
                return 250, "2.0.0", f"Ok: queued as {qid}; relayed: {o.code} {o.dsn} {o.text}".rstrip()
            return 250, "2.0.0", f"Ok: queued as {qid}"

        return d.addCallback(reply)

    # -- attempts --------------------------------------------------------

    def flush_ids(self, queue_ids: Iterable[str], limit: int | None = None) -> int:
        """
        Attempt these messages now, up to C{limit} of those still queued and
        not held (a next hop that was down reopened, or its probe is due);
        the attempt slots bound how many run at once.

        @return: how many were flushed.
        """
        n = 0
        now = self.now()
        for qid in queue_ids:
            if limit is not None and n >= limit:
                break
            if qid not in self.core or qid in self._attempts:
                continue
            decision = self.core.flush(qid, now)
            if decision.ok:
                self._reschedule(decision)
                n += 1
        return n

    def _has_slot(self) -> bool:
        if self._pace_rate is not None and self._tokens < 1:
            return False
        return self._slots < self.config.queue.concurrency

    def _schedule(self, queue_id: str, due: float) -> None:
        self._timetable.set(queue_id, max(0.0, due - self.now()))

    def _fire(self, queue_id: str) -> None:
        if not self._started:
            return
        if self._pace_rate is not None:
            self._tokens -= 1
        running = self._attempts.get(queue_id)
        if running is not None:
            # Due while its last attempt is still being recorded (a due time
            # that passed during the write: a short backoff behind a slow
            # disk or a DSN). Attempted now, it would only wait for that
            # attempt, and the timetable has let go of it: the message stayed
            # deferred, never tried again until a restart (the lab soak found
            # one). Scheduled again once that attempt is over instead.
            self._after(running).addCallback(lambda _: self._resume(queue_id))
            return
        self._attempt(queue_id)

    def _resume(self, queue_id: str) -> None:
        """Schedule C{queue_id} by its state if nothing else has (after an attempt that outlived its due time)."""
        entry = self.core.get(queue_id)
        if entry is None or not self._started or queue_id in self._timetable or queue_id in self._attempts:
            return
        self._schedule_by_state(entry, self.now())

    def _schedule_by_state(self, entry: QueueEntry, now: float) -> None:
        """Schedule C{entry} for when its state says it is due, if it is due at all."""
        due = self.core.due(entry, now)
        if due is not None:
            self._schedule(entry.queue_id, due)

    def _attempt(self, queue_id: str, cut_through: bool = False) -> Deferred[list[Outcome]]:
        """
        Attempt C{queue_id} now (unless one is running: then wait for it).

        @return: fires with the outcomes once they are recorded; never fails.
        """
        running = self._attempts.get(queue_id)
        if running is not None:
            return self._after(running).addCallback(lambda _: [])
        try:
            plan = self.core.begin(queue_id, self.now())
        except Exception:
            self.log.failure("Could not begin an attempt of {queue_id}", queue_id=queue_id)
            return succeed([])
        if plan is None:
            return succeed([])
        if isinstance(plan, Decision):
            return self._carry_out(plan).addCallback(lambda _: [])
        self._slots += 1
        held = True

        def give_back() -> None:
            # The slot is for the delivery; the recording does without it.
            nonlocal held
            if held:
                held = False
                self._slots -= 1
                if self._started:
                    self._timetable.kick()  # a slot is free: start what is due

        def delivered(outcomes: list[Outcome]) -> Deferred[list[Outcome]]:
            give_back()
            ended = self.now()
            if cut_through or not self._started or not outcomes or not all(o.named for o in outcomes):
                return self._finish(outcomes, plan, cut_through, ended)
            return self._later(outcomes).addCallback(self._finish, plan, cut_through, ended)

        d = maybeDeferred(self.delivery.attempt, plan.entry, plan.recipients)
        d.addErrback(self._attempt_failed, plan)
        d.addCallback(delivered)
        self._attempts[queue_id] = d

        def done(result: object) -> object:
            give_back()
            self._attempts.pop(queue_id, None)
            if plan.entry.fresh is not None:
                # The first attempt is over: later ones read the queue file.
                self.spool.drop_fresh(plan.entry)
            if isinstance(result, Failure):
                self.log.failure("Recording the attempt of {queue_id} failed", result, queue_id=queue_id)
                result = []
            return result

        d.addBoth(done)
        return d

    def _later(self, outcomes: list[Outcome]) -> Deferred[list[Outcome]]:
        """
        C{outcomes}, every one a named transfer (L{Outcome.named}), given
        back C{settle_delay} (by default L{SETTLE_DELAY}) later, with those
        of every other attempt that ended meanwhile.

        When a relaynet next hop writes its C{250}, this node wakes at once,
        usually on the next hop's CPU, and records the outcome (the core's
        decision, the transfer window's journal, the unlink, the events)
        before the next hop gets that CPU back to relay the message on: a
        middle hop of three lost about 0.2 ms per message to it, on a light
        load (bench/README, "The relay between hops, timed inside the
        nodes"). Recorded a little later, in one batch (one unlink request,
        one journal write), the work is out of the message's way and costs
        less. Only named transfers wait: a crash in the meantime sends them
        again, and the next hop recognises them. The message keeps its place
        in C{_attempts} until it is recorded (no second attempt; C{delete}
        and C{bounce} wait for it), not its attempt slot. L{stop} records them at once.
        """
        d: Deferred[list[Outcome]] = Deferred()
        self._settling.append((d, outcomes))
        if self._settle_call is None:
            self._settle_call = self.reactor.callLater(self._settle_delay, self._settle)
        return d

    def _settle(self) -> None:
        """Record the outcomes that L{_later} kept."""
        self._settle_call = None
        batch, self._settling = self._settling, []
        for d, outcomes in batch:
            d.callback(outcomes)

    def _attempt_failed(self, failure: Failure, plan: Plan) -> list[Outcome]:
        """An attempt that raised defers its message alone."""
        self.log.failure("Delivery attempt of {queue_id} failed", failure, queue_id=plan.entry.queue_id)
        text = f"internal error: {failure.getErrorMessage()}"
        return [Outcome.deferred(r.address, "4.3.0", text) for r in plan.recipients]

    def _finish(self, outcomes: list[Outcome], plan: Plan, cut_through: bool, ended: float) -> Deferred[list[Outcome]]:
        """Record C{outcomes} of an attempt that ended at C{ended} (its events' C{delay} and C{duration} end there)."""
        refused = cut_through and bool(outcomes) and all(
            o.status is RecipientStatus.BOUNCED and o.code >= 500 for o in outcomes
        )
        decision = self.core.finish(plan, outcomes, ended, notify_failures=not refused)
        if (decision.write is Write.STATE and not decision.notices and outcomes
                and all(o.diagnostic.startswith(SUSPENDED) for o in outcomes)):
            # Every recipient was deferred without contacting anyone (its next
            # hop is down): nothing worth an fsync happened. The state stays
            # in memory and goes to disk with the next write of the message;
            # its due time is left as a hint (the queue file's modification
            # time, not fsynced, as Postfix keeps a deferred message's), so
            # that a restart does not make all such mail due at once, to be
            # deferred again. A crash that loses the hint only does that.
            decision = evolve(decision, write=Write.NOTHING)
            if decision.due is not None and decision.entry is not None:
                self.spool.hint_due(decision.entry, decision.due)
        return self._carry_out(decision).addCallback(lambda _: outcomes)

    # -- carrying out decisions ------------------------------------------

    def _carry_out(self, decision: Decision) -> Deferred[bool]:
        """
        DSNs, then the write (serialised per message), then events, then
        the timetable. Fires with C{decision.ok} once written.
        """
        qid = decision.queue_id
        if decision.unschedule:
            self._timetable.cancel(qid)
        entry = decision.entry
        if decision.write is Write.NOTHING or entry is None:
            self._emit(decision)
            self._reschedule(decision)
            return succeed(decision.ok)

        # What is written: the decision's state, or, if a notice could not
        # be queued, the state that owes it (QueueCore.unnotified).
        carried = decision
        unqueued: list[Notice] = []

        def write() -> Deferred[Any]:
            d = self._notify(decision.notices)

            def store(failed: list[Notice]) -> Any:
                nonlocal carried
                if failed:
                    unqueued.extend(failed)
                    carried = self.core.unnotified(decision, failed, self.now())
                    return None if carried.write is Write.NOTHING else self.spool.record(entry)
                if decision.write is Write.REMOVE:
                    rd: Deferred[Any] = succeed(None)
                    if self.window is not None:
                        window = self.window
                        rd.addCallback(lambda _: window.retire(entry.envelope))
                    return rd.addCallback(lambda _: self.spool.remove(entry))
                return self.spool.record(entry)

            return d.addCallback(store)

        d = self._writes.run(qid, write)

        def owed() -> None:
            if unqueued and carried.write is not Write.NOTHING:
                due = carried.due
                self.events.emit(
                    "dsn_deferred", queue_id=qid, sender=entry.envelope.sender,
                    actions=sorted({n.action for n in unqueued}),
                    recipients=[r.address for n in unqueued for r in n.reports],
                    retry_after=None if due is None else round(max(0.0, due - self.now()), 3),
                )

        def written(_: object) -> bool:
            self._emit(decision)
            owed()
            self._reschedule(carried)
            return decision.ok

        def failed(f: Failure) -> bool:
            # The state stays in memory; the next write of this message
            # records it. Retry the message later rather than never.
            self.log.failure("Could not record the state of {queue_id}", f, queue_id=qid)
            self._emit(decision)
            owed()
            if carried.write is Write.REMOVE and entry is not None and qid not in self.core:
                # Its file is still queued (a full disk kept the window's
                # journal or the unlink from happening): the message stays
                # known, with its recipients' outcomes in memory, so that a
                # later attempt removes it. Forgotten, it would sit in the
                # queue until a restart recovered and delivered it again.
                self.core.add(entry, self.now())
            if qid in self.core and self._started:
                self._schedule(qid, self.now() + self.core.policy.minimal_backoff)
            return False

        return d.addCallbacks(written, failed)

    def _emit(self, decision: Decision) -> None:
        for event in decision.events:
            self.events.emit(event.name, **event.fields)
            if event.name == "bounced":
                self._suppress(event.fields)

    def _suppress(self, bounce: dict[str, Any]) -> None:
        """
        Put the recipient of a C{bounced} event on the suppression list if
        its failure was permanent (5.x.x) and of a class C{[suppression]}
        names (an invalid recipient, by default).
        """
        settings = suppression_settings(self.config)
        kind, dsn, recipient = bounce.get("class"), str(bounce.get("dsn") or ""), bounce.get("recipient")
        if not (settings.enabled and kind in settings.classes and dsn.startswith("5") and recipient):
            return
        try:
            entry = self.suppression.add(
                str(recipient), reason=f"{dsn} {bounce.get('diagnostic') or ''}".strip()[:500],
                kind=str(kind), source="bounce",
            )
        except Exception:
            self.log.failure("Could not suppress {recipient}", recipient=recipient)
            return
        self.events.emit(
            "suppression_added", queue_id=bounce.get("queue_id"), recipient=entry.address,
            sender=bounce.get("sender"), dsn=dsn, reason=entry.reason, source="bounce", expires=entry.expires,
            **{"class": entry.kind},
        )

    def _reschedule(self, decision: Decision) -> None:
        if decision.due is not None and self._started and decision.queue_id in self.core:
            self._schedule(decision.queue_id, decision.due)

    @inlineCallbacks
    def _notify(self, notices: tuple[Notice, ...]) -> Any:
        """
        Queue C{notices}, each a DSN message of its own.

        @return: (a Deferred firing with) those that could not be queued.
        """
        unqueued = []
        for notice in notices:
            try:
                yield self._send_dsn(notice)
            except Exception:
                self.log.failure("Could not queue a DSN for {queue_id}; it is owed and tried again",
                                 queue_id=notice.entry.queue_id)
                unqueued.append(notice)
        return unqueued

    @inlineCallbacks
    def _send_dsn(self, notice: Notice) -> Any:
        entry, reports = notice.entry, list(notice.reports)
        env = entry.envelope
        route = self.table.route(env.sender)
        if not isinstance(route, Route):
            self.log.warn(
                "Cannot return a DSN for {queue_id} to <{sender}>: {reply}",
                queue_id=entry.queue_id, sender=env.sender, reply=route.text,
            )
            return
        ret_full = env.params.get("ret") != "HDRS"
        hostname = self.config.hostname
        now = self.now()

        def compose() -> bytes:
            with entry.open_message() as f:
                headers, body_start = split_headers(f.read(1 << 20))
            body = entry.open_message(skip=body_start) if ret_full else None
            try:
                return build_dsn(
                    reporting_mta=hostname, sender=env.sender, original_headers=headers,
                    original_body=body, reports=reports, arrival=env.arrival,
                    envid=env.params.get("envid"), queue_id=entry.queue_id, now=now,
                )
            finally:
                if body is not None:
                    body.close()

        data = yield deferToThreadPool(self.reactor, self.pool, compose)
        dsn_env = Envelope(
            queue_id=self.spool.new_id(),
            sender="",
            recipients=(Recipient(address=env.sender, route=route.name),),
            arrival=now,
            params={"body": None if data.isascii() else "8BITMIME",
                    "smtputf8": not env.sender.isascii()},
            client={"protocol": "local", "helo": hostname, "ip": "127.0.0.1",
                    "dsn_for": entry.queue_id},
            node=self.config.name,
        )
        writer = self.spool.begin(dsn_env)
        writer.write(data)
        new = yield writer.commit(hops=0)
        self.events.emit(
            "dsn", queue_id=new.queue_id, sender="", recipient=env.sender,
            original_queue_id=entry.queue_id, action=notice.action,
        )
        self.enqueue(new)

    def _after(self, running: Deferred[Any]) -> Deferred[None]:
        """A Deferred firing (with C{None}) when C{running} has."""
        d: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        running.addBoth(fire)
        return d

    # -- the queue view (relaynet queue ..., the admin API, metrics) ----

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self.core

    def counts(self) -> dict[str, int]:
        """Queued messages by state (the core's counters: no walk)."""
        return self.core.counts()

    def totals(self) -> QueueTotals:
        """Octets, recipients by status, the oldest arrival (the core's counters)."""
        return self.core.totals()

    def summary(self, top: int = 10) -> dict[str, Any]:
        """The summary of the whole queue (C{GET /api/summary}) from the core's counters."""
        return listing.summary(self.core, self.now(), top)

    def page(
        self, limit: int | None, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
        after: Key | None = None,
    ) -> Deferred[tuple[int, Entries]]:
        """
        How many messages L{matching} would return, and the first C{limit}
        of them, oldest first; nothing is sorted. With no filter but
        C{state}, at once and in O(limit) (the count is a counter). Filters
        on the envelope walk a snapshot of the queue's order in a worker
        thread (L{listing.scan}): the reactor only copies the order's
        pointers and builds the page. C{after} is a cursor (see
        L{listing.page}): the page and the count start after it.
        """
        now = self.now()
        if not listing.by_envelope(sender, recipient, domain, min_age):
            return succeed(listing.page(self.core, now, limit, state, after=after))
        keys = self.core.snapshot(state)
        if after is not None:
            del keys[:bisect_right(keys, after)]
        core = self.core

        def found(entries: Entries) -> tuple[int, Entries]:
            shown = entries if limit is None else entries[:limit]
            return len(entries), [e for e in shown if core.get(e.queue_id) is e]

        d = deferToThreadPool(
            self.reactor, self.pool, listing.scan, core, keys, now, sender, recipient, domain, min_age,
        )
        return d.addCallback(found)

    def collect(
        self, each: Callable[[dict[str, Any]], object], state: str | None = None,
        sender: str | None = None, recipient: str | None = None, domain: str | None = None,
        min_age: float | None = None,
    ) -> Deferred[None]:
        """
        Call C{each} with the summary of every message L{list} would return,
        oldest first, in slices of L{COLLECT_SLICE} messages, one slice per
        reactor turn (C{callLater(0)}), so that a filtered summary or a shape
        of a long queue never holds the reactor for more than a slice (about
        10 ms): intake and attempts run between slices. The messages are
        those of a snapshot of the queue's order taken at once; each is read
        when its slice runs (one that left by then is left out).
        """
        core, now = self.core, self.now()

        def summarise(chunk: list[Key]) -> None:
            for entry in listing.scan(core, chunk, now, sender, recipient, domain, min_age):
                each(listing.entry_summary(entry, core.state(entry), now))

        return self._in_slices(core.snapshot(state), COLLECT_SLICE, summarise)

    def _in_slices(self, items: list[T], size: int, work: Callable[[list[T]], object]) -> Deferred[None]:
        """
        Call C{work} with C{items} C{size} at a time, the first slice at once
        and each next one on a later reactor turn (C{callLater(0)}), so that
        a walk over a long queue never holds the reactor for more than a
        slice. Fires once all are done, or fails with C{work}'s exception.
        """
        done: Deferred[None] = Deferred()

        def step(start: int) -> None:
            try:
                work(items[start:start + size])
            except BaseException:
                done.errback()
                return
            if start + size < len(items):
                self.reactor.callLater(0, step, start + size)
            else:
                done.callback(None)

        step(0)
        return done

    def list(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> Summaries:
        """
        Summaries of queued messages, oldest first, filtered by state,
        sender or recipient (substring, case-insensitive), recipient domain
        and minimum age in seconds.
        """
        return self.summaries(self.matching(state, sender, recipient, domain, min_age))

    def matching(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> Entries:
        """
        The queued messages L{list} would show, oldest first, without building
        their summaries (a listing of 20 out of 100,000 builds 20).
        """
        return listing.matching(self.core, self.now(), state, sender, recipient, domain, min_age)

    def summaries(self, entries: Entries) -> Summaries:
        """The admin API's summary of each of C{entries}."""
        return listing.summaries(self.core, entries, self.now())

    def show(self, queue_id: str) -> Deferred[dict[str, Any]] | None:
        """
        The summary of one message plus its header section (read in a worker
        thread); C{None} if there is no such message.
        """
        entry = self.core.get(queue_id)
        if entry is None:
            return None

        def headers() -> str:
            with entry.open_message() as f:
                head, _ = split_headers(f.read(256 * 1024))
            return head.decode("utf-8", "replace")

        d = deferToThreadPool(self.reactor, self.pool, headers)
        summary = listing.entry_summary(entry, self.core.state(entry), self.now())
        summary["envelope"] = entry.envelope.to_json()
        return d.addCallback(lambda h: {**summary, "headers": h})

    FLUSH_BATCH = 5000
    """Messages a flush handles per reactor turn: a queue-wide flush of a big queue does not stall intake."""

    def flush(self, queue_id: str | None = None, domain: str | None = None) -> Deferred[int]:
        """
        Attempt queued messages now (all, one, or those for a domain). Next
        hops that are down get their probe now.

        The messages are taken L{FLUSH_BATCH} at a time, one batch per
        reactor turn (a flush of 500,000 messages in one go held the reactor
        for seconds); a queue that fits in one batch is flushed at once.

        @return: fires with how many were flushed.
        """
        if isinstance(self.outbound, OutboundManager):
            self.outbound.probe_down_hops()
        if queue_id is not None:
            return succeed(self._flush_batch(listing.selected(self.core, queue_id, None)))
        # A snapshot of the queue (references only): what arrives meanwhile
        # is attempted anyway, what leaves meanwhile is skipped.
        flushed = [0]

        def flush(batch: list[QueueEntry]) -> None:
            if domain is not None:
                batch = listing.for_domain(batch, domain)
            flushed[0] += self._flush_batch(batch)

        return self._in_slices(list(self.core), self.FLUSH_BATCH, flush).addCallback(lambda _: flushed[0])

    def _flush_batch(self, entries: Iterable[QueueEntry]) -> int:
        n = 0
        now = self.now()
        core = self.core
        for entry in entries:
            qid = entry.queue_id
            if qid not in core:
                continue  # gone since the flush began
            decision = core.flush(qid, now)
            if decision.ok:
                self._reschedule(decision)
                n += 1
        return n

    def reroute(self, queue_id: str | None = None, domain: str | None = None) -> Deferred[int]:
        """
        Route queued messages again with the current table: routes are looked
        up at each attempt, so this is a flush.
        """
        return self.flush(queue_id, domain)

    def hold(self, queue_id: str) -> Deferred[bool]:
        """
        Keep a message from being attempted until released (durably). During
        an attempt the hold applies at once; the attempt's outcomes are
        recorded with it.
        """
        return self._carry_out(self.core.hold(queue_id))

    def release(self, queue_id: str) -> Deferred[bool]:
        """Release a held message and attempt it now."""
        return self._carry_out(self.core.release(queue_id, self.now()))

    def delete(self, queue_id: str) -> Deferred[bool]:
        """
        Remove a message without notifying anyone (C{postsuper -d}); during
        an attempt, once the attempt's outcomes are recorded.
        """
        return self._when_idle(queue_id, lambda: self.core.delete(queue_id))

    def bounce(self, queue_id: str, reason: str = "message returned by the administrator") -> Deferred[bool]:
        """
        Bounce every pending recipient now, with a DSN to the sender (5.0.0);
        during an attempt, once its outcomes are recorded (to the recipients
        still pending then).
        """
        return self._when_idle(queue_id, lambda: self.core.bounce(queue_id, reason, self.now()))

    def _when_idle(self, queue_id: str, decide: Callable[[], Decision | object]) -> Deferred[bool]:
        """Carry out C{decide()} now, or after the running attempt if it says L{BUSY}."""
        decision = decide()
        if isinstance(decision, Decision):
            return self._carry_out(decision)
        running = self._attempts.get(queue_id)
        if running is None:  # BUSY without a running attempt: cannot happen
            return succeed(False)
        return self._after(running).addCallback(lambda _: self._when_idle(queue_id, decide))


def _shaping_share(config: NodeConfig) -> int:
    """How many processes share the [shaping] limits: the workers, in a worker; else 1."""
    return config.worker_count if config.shard is not None else 1


def _retry_policy(config: NodeConfig) -> RetryPolicy:
    q = config.queue
    return RetryPolicy(minimal_backoff=q.minimal_backoff, maximal_backoff=q.maximal_backoff, lifetime=q.lifetime)
