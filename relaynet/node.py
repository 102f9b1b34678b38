# -*- test-case-name: tests.test_node -*-
"""
One relaynet node assembled as a C{twisted.application} service tree.

The node builds its parts once and wires them by what they offer, not by
back-references: the intake hands committed messages to the runner's
C{enqueue}; the admin site and the metrics read the runner as a queue view,
the intake's sessions as a sessions view, and the node as its facts.

Its child services, in start order: the two thread pools, the queue runner,
the metrics history, the admin web site(s), then one L{EndpointService} per
SMTP listener (bound before twistd drops privileges). Before any of them
starts, the spool directories are made (what a crash left in C{tmp/} is
removed) and the transfer window is read; once they listen, the queue is
recovered in the background (L{RelayNode._recover}), and recovered messages
are scheduled as they are found, while new mail is accepted.

Stop order (SIGTERM) is explicit, one after the other: listeners stop
accepting, open sessions are closed with 421 or allowed to finish their
transaction (bounded grace), the admin site stops, running deliveries
finish, then the history, the thread pools and the event log. No spool
file is left half-written by a clean stop; a crash is handled by recovery
at the next start.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from relaynet.intake.auth import RelayRealm, ScryptChecker
from relaynet.intake.http import api_site
from relaynet.hangup import install_sighup
from relaynet.config import ConfigError, NodeConfig, worker_admin_endpoint
from relaynet.events import EventLog
from relaynet.intake.server import Intake, RelayFactory, drain
from relaynet.smtp.netio import AdoptedEndpoint, EndpointService, ReusePortEndpoint
from relaynet.runner import QueueRunner
from relaynet.queue.shards import adopt_orphan_shards
from relaynet.queue.spool import CommitProcess, QueueEntry, Spool, makedirs_durable
from relaynet.queue.window import TransferWindow
from relaynet.smtp.tls import TLSConfigError, server_options

from relaynet.admin.adapters import IntakeSessions
from relaynet.admin.api import AdminViews, web_service
from relaynet.admin.fleet import PeerWindows
from relaynet.admin.metrics import NodeMetrics
from relaynet.admin.webhooks import Webhook

LISTEN_BACKLOG = 256
SPOOL_LOCK = "node.lock"


class NodeStartError(Exception):
    """
    The node cannot start, for a reason its operator can fix (the spool is
    in use by another node, a port is taken); the message is one line.
    """


def lock_spool(spool: Path, path: Path | None = None) -> int:
    """
    Take the spool's lock, C{<spool>/node.lock} (C{fcntl.flock}, held while
    the returned descriptor is open, released by the kernel when the process
    ends, even by C{kill -9}), and write our pid into it.

    @param path: another lock file in the spool (a worker's shard lock,
        L{NodeConfig.lock_file}).
    @return: the lock file's descriptor.
    @raise NodeStartError: another process holds it ("spool ... is in use by
        pid N").
    """
    path = path or spool / SPOOL_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # private like every spool file, whoever made it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise NodeStartError(f"spool {spool} is in use by pid {holder} (lock {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def listen_problem(e: CannotListenError, endpoint: str) -> str:
    """One line for a listener that cannot listen ("127.0.0.1:2525 is already in use")."""
    where = f"{e.interface or '*'}:{e.port}"
    error = e.socketError
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return f"{where} is already in use ({endpoint}: Address already in use)"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"cannot listen on {where} ({endpoint}): {reason}"


def disk_problem(e: OSError, spool: Path) -> str:
    """
    One line for a start-up check of the spool (or mailroot, event log) that
    failed: "cannot write spool /var/spool/relaynet: Read-only file system
    (/var/spool/relaynet/node.lock)".
    """
    reason = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename is not None else ""
    return f"cannot write spool {spool}: {reason}{where}"


def with_backlog(endpoint: str) -> str:
    """
    A TCP listener endpoint with a listen backlog of L{LISTEN_BACKLOG} unless
    it names one: Twisted's default (50) overflows under a hundred sessions
    connecting at once, which then wait for SYN retransmits (Postfix's smtpd
    listens with 100).
    """
    kind = endpoint.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={LISTEN_BACKLOG}"
    return endpoint


def attach_log_observer(parent: Any, observer: Any) -> None:
    """
    Make C{observer} twistd's log observer: twistd's AppLogger logs through
    the application's ILogObserver component when there is one (ours
    applies C{[log]} format and level).
    """
    if observer is not None and isinstance(parent, Componentized):
        if parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, observer)


def own_spool(config: NodeConfig, owner: tuple[int, int]) -> None:
    """
    Create the spool and the mailroot and give them, and everything in them,
    to C{owner} (the user twistd runs the node as after C{-u}/C{-g}).
    """
    for d in (config.spool, config.local.mailroot):
        for created in makedirs_durable(d):
            os.chown(created, *owner)
        # Never follow a link: one planted in the spool by the
        # unprivileged user must not hand it a file of root's.
        for root, dirs, files in os.walk(d):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, *owner, follow_symlinks=False)


class ThreadPoolService(Service):
    """A thread pool that runs while the service does."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()


EVENT_SYNC_INTERVAL = 1.0
RECOVERY_BATCH = 1000
"""Queue files the recovery's thread reads per batch it hands to the reactor (the runner, the window)."""

STS_REFRESH_INTERVAL = 3600.0
"""Seconds between looks for cached MTA-STS policies due for a refresh."""


RECOVERY_ATTEMPT_RATE = 500.0
"""
Attempts a second a node starts while it recovers its queue (per worker;
L{QueueRunner.pace}), at full speed once it is read. About a node's steady
relay rate: old mail moves from the first seconds; but the recovery's thread
keeps the process. Unpaced, a next hop known down (which defers each
recovered message at once) took the CPU the reading needed: 1,000,000
queued were known after 146 s instead of 52 (bench/README.md).
"""

RECOVERY_FREEZE_FROM = 10 * RECOVERY_BATCH
"""
From this many recovered messages on, the recovery keeps them out of the
cyclic GC's full collections (C{gc.freeze}, then L{settle_heap}); a small
queue costs the GC little.
"""


def settle_heap() -> None:
    """
    After a recovery: one full collection of the cyclic GC over everything,
    frozen meanwhile batch by batch (garbage cycles caught in a freeze are
    collected now), then freeze what is left: the queue as recovered and the
    node's own long-lived objects, which later full collections then skip
    (a frozen object is still freed when its last reference goes).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class LoopService(Service):
    """Runs C{start()} and C{stop()} (a periodic sampler) with the service."""

    def __init__(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def stopService(self) -> None:
        Service.stopService(self)
        self._stop()


class RelayNode(MultiService):
    """
    A relay node: intake listeners, spool, queue runner, admin site.

    @ivar ports: the listening SMTP ports once started (for tests: the real
        port number of C{tcp:0} listeners).
    """

    log = Logger()

    def __init__(
        self, config: NodeConfig, reactor: Any, threads: int = 16,
        run_as: tuple[int | None, int | None] = (None, None),
        load_config: Callable[[], NodeConfig] | None = None,
        log_observer: Any = None,
        inherited: list[int] | None = None,
        commit_process: bool = False,
    ) -> None:
        """
        @param inherited: listening sockets (descriptors, in listener order)
            to serve instead of binding the listeners: a worker's, passed on by
            its supervisor (L{relaynet.supervisor}).
        @param commit_process: commit small messages through a commit
            process (L{CommitProcess}; twistd's nodes and workers do), not in
            the commit threads (in-process tests).
        """
        MultiService.__init__(self)
        self.config = config
        self.inherited = inherited
        self.commit_process = commit_process
        self.committer: CommitProcess | None = None
        self.log_observer = log_observer
        self.started_at: float | None = None
        self.last_reload: dict[str, Any] | None = None
        self.last_reload_error: str | None = None
        self.run_as = run_as
        self.load_config = load_config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=2, maxthreads=threads, name=f"relaynet-{config.name}")
        self.commit_pool = ThreadPool(minthreads=2, maxthreads=threads, name=f"relaynet-{config.name}-commit")
        self.spool = Spool(config.queue_dir, reactor, self.pool, commit_pool=self.commit_pool, shard=config.shard)
        # The events of one reactor turn reach events.jsonl in one write, at
        # the end of the turn (after its replies), not one write per event.
        self.events = EventLog(None, config.name, later=lambda f: reactor.callLater(0, f))
        self.window = TransferWindow(
            config.queue_dir / "window", config.queue.duplicate_window,
            config.queue.duplicate_window_size, time.time,
            lambda f: deferToThreadPool(reactor, self.pool, f),
        )
        self.runner = QueueRunner(config, self.spool, self.events, reactor, self.pool, window=self.window)
        self.intake = Intake(
            config=config, spool=self.spool, events=self.events, reactor=reactor,
            queued=self.runner.enqueue, cut_through=self.runner.cut_through, window=self.window,
            suppression=self.runner.suppression,
        )
        # A worker of several: a transfer made again (XTXNAGAIN) may have
        # been accepted by another worker; it asks their own sites.
        self.peers: PeerWindows | None = None
        if config.shard is not None and config.worker_count > 1 and config.admin.enabled:
            self.peers = PeerWindows(
                {k: worker_admin_endpoint(config.spool, k) for k in range(config.worker_count) if k != config.shard},
                reactor,
            )
            self.intake.peer_transfers = self.peers.lookup
        sessions = IntakeSessions(self.intake.sessions)
        self.metrics = NodeMetrics(self.runner, sessions, reactor, name=config.name,
                                   listener_modes=lambda: [lst.mode for lst in self.config.listeners])
        self.spool.observe_commits(self.metrics.commit_batch)
        self.events.observers.append(self.metrics.observe)
        self._pools = [ThreadPoolService(self.pool), ThreadPoolService(self.commit_pool)]
        self._history = LoopService(self.metrics.history.start, self.metrics.history.stop)
        # About once a second, the event lines written meanwhile are fsynced
        # in a worker thread (a power loss takes a second of events, not the log).
        self._event_sync = TimerService(EVENT_SYNC_INTERVAL, self._sync_events)
        self._event_sync.clock = reactor
        self._web: list[IService] = []
        self._listeners: list[EndpointService] = []
        self._lock_fd: int | None = None
        self._stopping = False
        self.recovery: Any = None
        for svc in (*self._pools, self._event_sync, self.runner, self._history):
            svc.setServiceParent(self)
        if self.runner.tls_report_service is not None:
            self.runner.tls_report_service.setServiceParent(self)  # type: ignore[no-untyped-call]
        # Delivery webhooks: each observes the event log and keeps its own
        # durable outbox (<spool>/webhooks, webhooks.K in worker K).
        shard = config.shard or 0
        self.webhooks: list[Webhook] = []
        for hook in config.webhooks:
            w = Webhook(
                hook, config.spool / ("webhooks" if not shard else f"webhooks.{shard}"), reactor,
                lambda work: deferToThreadPool(reactor, self.pool, work), f"{config.name}-{shard}",
            )
            self.events.observers.append(w.observe)
            w.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.webhooks.append(w)
        # MTA-STS policies refreshed before they expire (RFC 8461 3.3: each
        # fetched again once a day, looked at hourly).
        refresh = TimerService(STS_REFRESH_INTERVAL, self.runner.refresh_sts)
        refresh.clock = reactor
        refresh.setServiceParent(self)
        if config.admin.enabled:
            views = AdminViews(queue=self.runner, sessions=sessions, node=self, metrics=self.metrics)
            for endpoint, read_only in ((config.admin_endpoint, False), (config.admin.metrics_endpoint, True)):
                if endpoint:
                    web = web_service(views, endpoint, reactor, read_only)
                    web.setServiceParent(self)
                    self._web.append(web)
        if config.http_api.endpoint:
            # The HTTP injection API (relaynet.intake.http): its own listener,
            # committing through the same spool, events and runner as SMTP.
            # Workers of one node share its port with SO_REUSEPORT.
            site = api_site(
                lambda: self.config, self.spool, self.events, self.runner.enqueue, self.intake.routing,
                reactor, lambda f, *a: deferToThreadPool(reactor, self.pool, f, *a),
                suppressed=self.intake.suppressed,
            )
            api_endpoint = config.http_api.endpoint
            if config.shard is not None and api_endpoint.split(":", 1)[0] in ("tcp", "tcp6"):
                http_endpoint: Any = ReusePortEndpoint.from_string(reactor, with_backlog(api_endpoint))
            else:
                http_endpoint = serverFromString(reactor, with_backlog(api_endpoint))
            web = EndpointService(http_endpoint, site, f"{api_endpoint} (HTTP API)")
            web.setServiceParent(self)
            self._web.append(web)

    @property
    def ports(self) -> list[Any]:
        """The listening SMTP ports (once listening)."""
        return [svc.port for svc in self._listeners if svc.port is not None]

    def setServiceParent(self, parent: Any) -> Any:
        attach_log_observer(parent, self.log_observer)
        return MultiService.setServiceParent(self, parent)

    def privilegedStartService(self) -> None:
        """
        Before twistd drops privileges (C{-u}/C{-g}): create the spool and the
        mailroot and give them to the user the node will run as, load the TLS
        key (it may be readable by root only), and bind the listeners (ports
        below 1024 need root).
        """
        uid, gid = self.run_as
        if uid is not None or gid is not None:
            owner = (-1 if uid is None else uid, -1 if gid is None else gid)
            own_spool(self.config, owner)
        try:
            self._lock(owner if uid is not None or gid is not None else None)
        except OSError as e:
            raise NodeStartError(disk_problem(e, self.config.spool)) from e
        self._add_listeners()
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as e:
            raise NodeStartError(self._listen_problem(e, self._listeners)) from e

    def _lock(self, owner: tuple[int, int] | None = None) -> None:
        """Take the spool lock (L{lock_spool}) once, before anything listens or recovers."""
        if self._lock_fd is not None:
            return
        makedirs_durable(self.config.spool)
        self._lock_fd = lock_spool(self.config.spool, self.config.lock_file)
        if owner is not None:
            os.fchown(self._lock_fd, *owner)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _listen_problem(self, e: CannotListenError, services: list[Any]) -> str:
        """L{listen_problem} naming the first of C{services} (in start order) not listening."""
        for svc in services:
            if isinstance(svc, EndpointService) and svc.port is None:
                return listen_problem(e, svc.what)
        return listen_problem(e, "a listener")

    def _add_listeners(self) -> None:
        if self._listeners:
            return
        self.intake.tls = self._tls_options()
        self.intake.portal = self._portal()
        for i, listener in enumerate(self.config.listeners):
            description = with_backlog(listener.endpoint)
            if self.inherited is not None:
                endpoint: Any = AdoptedEndpoint(self.reactor, self.inherited[i])
            elif listener.reuse_port:
                endpoint = ReusePortEndpoint.from_string(self.reactor, description)
            else:
                endpoint = serverFromString(self.reactor, description)
            factory: Any = RelayFactory(self.intake, listener)
            if listener.mode == "submissions":
                assert self.intake.tls is not None  # the config requires [tls] for it
                factory = TLSMemoryBIOFactory(self.intake.tls, False, factory)
            svc = EndpointService(endpoint, factory, listener.endpoint, privileged=True)
            svc.setServiceParent(self)
            self._listeners.append(svc)

    def startService(self) -> None:
        config = self.config
        # Everything that can fail comes before the thread pools start: their
        # threads would otherwise keep a failed twistd from exiting.
        try:
            makedirs_durable(config.spool)
            makedirs_durable(config.local.mailroot)
            self._lock()
        except OSError as e:
            raise NodeStartError(disk_problem(e, config.spool)) from e
        self._add_listeners()
        try:
            if config.shard is None:
                # Mail of the shards of a node that ran with workers.
                moved = adopt_orphan_shards(config.spool, 1)
                if moved:
                    self.log.warn("{count} queued message(s) of former worker shards moved into the queue",
                                  count=moved)
            self.events.open(config.event_log)
            self.spool.prepare()
            if self.commit_process:
                self._start_committer()
            self.window.load()
            # Nothing is read yet: the queue is recovered in the background,
            # once the node listens (a big queue does not delay the first 220).
            recovery = self.spool.recover()
        except OSError as e:
            raise NodeStartError(disk_problem(e, config.spool)) from e
        self.started_at = time.time()
        # Until the whole queue is known, a retransmission from a relaynet
        # upstream that the window does not hold yet cannot be told from a
        # first transfer: it is answered 451 meanwhile. XTXN stays offered,
        # so that the transfers accepted during recovery are named.
        self.window.complete = False
        try:
            MultiService.startService(self)
        except BaseException as e:
            self.pool.stop()
            self.commit_pool.stop()
            if isinstance(e, CannotListenError):
                raise NodeStartError(self._listen_problem(e, [*self._web, *self._listeners])) from e
            raise
        self.log.info("relaynet node {name} started; recovering the queue", name=config.name)
        self.recovery = self._recover(recovery)
        if self.load_config is not None:
            self._previous_hup = install_sighup(self.reactor, self.reload)

    def _start_committer(self) -> None:
        """Start the commit process; if it cannot start, the commit threads do its work."""
        committer = CommitProcess(self.reactor, lambda f: deferToThreadPool(self.reactor, self.pool, f))
        try:
            committer.start()
        except OSError as e:
            self.log.error("Cannot start the commit process, committing in threads: {error}", error=str(e))
            return
        self.committer = committer
        self.spool.use_commit_process(committer)

    @inlineCallbacks
    def _recover(self, entries: Iterator[QueueEntry]) -> Any:
        """
        Read the queue in a worker thread, a batch at a time, and hand each
        batch to the runner and the transfer window on the reactor as it is
        read (the thread goes on reading meanwhile): intake runs at full
        speed, and the due messages of each batch are scheduled as they are
        found. The runner attempts them, in due-time order, while the rest
        is read, L{RECOVERY_ATTEMPT_RATE} a second until all is read; the
        thread does not wait for those attempts.
        """
        started = self.reactor.seconds()
        count = 0
        failed = False

        def take(batch: list[QueueEntry]) -> None:
            # On the reactor, in the order the batches were read.
            nonlocal count, failed
            if failed or self._stopping:
                return
            try:
                for entry in batch:
                    self.window.note_envelope(entry.envelope)
                self.runner.load(batch)
            except Exception:
                failed = True
                self.log.failure("Recovering the queue failed after {count} message(s)", count=count)
                return
            count += len(batch)
            if count >= RECOVERY_FREEZE_FROM:
                # The recovered messages stay as long as they are queued:
                # out of the cyclic GC's way. Its full collections
                # otherwise walk every queued object, more often as the
                # queue grows (bench/recovery.py).
                gc.freeze()

        def read() -> None:
            # In the thread: stops at a stop, or when taking a batch failed.
            while not (self._stopping or failed):
                batch = list(itertools.islice(entries, RECOVERY_BATCH))
                if not batch:
                    return
                self.reactor.callFromThread(take, batch)

        self.runner.pace(RECOVERY_ATTEMPT_RATE)
        try:
            # Its result comes after every batch it handed over (one queue).
            yield deferToThreadPool(self.reactor, self.pool, read)
        except Exception:
            self.log.failure("Recovering the queue failed after {count} message(s)", count=count)
        finally:
            if not self._stopping:
                # Full speed now (a stopping node starts nothing more: the
                # runner's stop ends its pacing).
                self.runner.pace(None)
            self.window.complete = True
            if count >= RECOVERY_FREEZE_FROM:
                settle_heap()
        self.log.info(
            "relaynet node {name}: {count} queued message(s) recovered in {seconds:.2f} s",
            name=self.config.name, count=count, seconds=self.reactor.seconds() - started,
        )
        return count

    def _sync_events(self) -> Any:
        """Fsync the event log in a worker thread, if lines were written since the last time."""
        self.events.flush()
        if not self.events.unsynced:
            return None
        self.events.unsynced = 0
        return deferToThreadPool(self.reactor, self.pool, self.events.sync)

    def reload(self) -> bool:
        """
        Re-read the configuration (SIGHUP): routing, limits, queue and
        outbound settings, TLS files and the password file take effect for new
        sessions and attempts; sessions in progress and the queue are not
        touched. An invalid new configuration is refused with a log line and
        the old one stays in force. Listener and spool changes need a restart.

        @return: whether the new configuration was applied.
        """
        if self.load_config is None:
            return False
        old = self.config
        try:
            new = self.load_config()
            tls = self._tls_options(new)
            portal = self._portal(new)
        except (ConfigError, TLSConfigError, OSError) as e:
            self.log.error(
                "Reload refused, the old configuration stays in force: {error}", error=str(e)
            )
            self.last_reload_error = str(e)
            self.last_reload = {"time": time.time(), "status": "refused", "error": str(e)}
            self.events.emit("reload", status="refused", error=str(e))
            return False
        if new.listeners != old.listeners or new.spool != old.spool or new.admin != old.admin:
            self.log.warn("Listener, spool and [admin] changes need a restart; keeping the old ones")
            new = attrs.evolve(new, listeners=old.listeners, spool=old.spool, admin=old.admin)
        self.config = new
        self.intake.config = new
        self.intake.tls = tls
        self.intake.portal = portal
        self.runner.reconfigure(new)
        self.window.span = new.queue.duplicate_window
        self.window.limit = new.queue.duplicate_window_size
        if self.log_observer is not None:
            self.log_observer.configure(new.log)
        self.last_reload_error = None
        self.last_reload = {"time": time.time(), "status": "reloaded", "source": new.source}
        self.log.info("Configuration reloaded from {source}", source=new.source)
        self.events.emit("reload", source=new.source, status="reloaded")
        return True

    def _tls_options(self, config: NodeConfig | None = None) -> Any:
        tls = (config or self.config).tls
        if tls.cert is None or tls.key is None:
            return None
        return server_options(tls.cert, tls.key)

    def _portal(self, config: NodeConfig | None = None) -> Any:
        auth = (config or self.config).auth
        if auth.password_file is None:
            return None
        checker = ScryptChecker(
            auth.password_file, lambda f: deferToThreadPool(self.reactor, self.pool, f)
        )
        # Read the file now: before twistd drops privileges it may be
        # readable by root only; the checker keeps this copy if so.
        checker.users()
        return Portal(RelayRealm(), [checker])

    @inlineCallbacks
    def stopService(self) -> Any:
        if getattr(self, "_previous_hup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        Service.stopService(self)
        self._stopping = True
        # One after the other, not all at once as MultiService would: the
        # runner must outlive the sessions' last commits, the pools the runner.
        for svc in self._listeners:
            yield maybeDeferred(svc.stopService)
        yield drain(self.intake, self.reactor)
        if self.peers is not None:
            yield self.peers.close()
        for web in self._web:
            yield maybeDeferred(web.stopService)
        if self.recovery is not None:
            yield self.recovery  # the batch being read; no more after it
        yield self.runner.stopService()
        yield self.spool.flush_hints()  # before the pools stop
        self._history.stopService()
        yield maybeDeferred(self._event_sync.stopService)
        if self.committer is not None:
            # After the last commit (the sessions are drained); before the
            # pools, which clean up after a batch it would leave unanswered.
            yield self.committer.stop()
        for pool in reversed(self._pools):
            pool.stopService()
        self.events.flush()
        self.events.sync()  # the last second of events too (blocking, at stop)
        self.events.close()
        self._unlock()
        self.log.info("relaynet node {name} stopped", name=self.config.name)
