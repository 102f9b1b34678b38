# -*- test-case-name: tests.test_node -*-
"""
One relaynet node assembled as a C{twisted.application} service tree.

Start order: spool directories and crash recovery (before any listener, so
recovered messages are scheduled first), the queue runner, then one
L{StreamServerEndpointService} per listener. Stop order (SIGTERM): listeners
stop accepting, open sessions are closed with 421 or allowed to finish their
transaction (bounded grace), running deliveries finish, then the thread pool
and the event log close. No spool file is left half-written by a clean stop;
a crash is handled by recovery at the next start.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

import attrs

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from relaynet.intake.auth import RelayRealm, ScryptChecker
from relaynet.config import ConfigError, NodeConfig
from relaynet.events import EventLog
from relaynet.intake.server import Intake, RelayFactory, drain
from relaynet.smtp.netio import ReusePortEndpoint
from relaynet.runner import QueueRunner
from relaynet.queue.spool import Spool, makedirs_durable
from relaynet.smtp.tls import TLSConfigError, server_options


if TYPE_CHECKING:
    from relaynet.admin.metrics import NodeMetrics

LISTEN_BACKLOG = 256


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


class RelayNode(MultiService):
    """
    A relay node: intake listeners, spool, queue runner.

    @ivar ports: the listening ports once started (for tests: the real port
        number of C{tcp:0} listeners).
    """

    log = Logger()

    def __init__(
        self, config: NodeConfig, reactor: Any, threads: int = 16,
        run_as: tuple[int | None, int | None] = (None, None),
        load_config: Callable[[], NodeConfig] | None = None,
        log_observer: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.log_observer = log_observer
        self.metrics: NodeMetrics | None = None
        self.started_at: float | None = None
        self.last_reload: dict[str, Any] | None = None
        self.last_reload_error: str | None = None
        self._web: list[Any] = []
        self.run_as = run_as
        self.load_config = load_config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=2, maxthreads=threads, name=f"relaynet-{config.name}")
        self.commit_pool = ThreadPool(minthreads=2, maxthreads=threads, name=f"relaynet-{config.name}-commit")
        self.spool = Spool(config.queue_dir, reactor, self.pool, commit_pool=self.commit_pool)
        self.events: EventLog | None = None
        self.runner: QueueRunner | None = None
        self.intake: Intake | None = None
        self.ports: list[Any] = []
        self._listener_services: list[StreamServerEndpointService] = []

    def setServiceParent(self, parent: Any) -> Any:
        # twistd's AppLogger logs through the application's ILogObserver
        # component when there is one: ours applies [log] format and level.
        if self.log_observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

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
            for d in (self.config.spool, self.config.local.mailroot):
                for created in makedirs_durable(d):
                    os.chown(created, *owner)
                # Never follow a link: one planted in the spool by the
                # unprivileged user must not hand it a file of root's.
                for root, dirs, files in os.walk(d):
                    for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                        os.chown(name, *owner, follow_symlinks=False)
        self._add_listeners()
        super().privilegedStartService()

    def _add_listeners(self) -> None:
        if self.intake is not None:
            return
        self.intake = Intake(
            config=self.config, spool=self.spool, events=EventLog(None, self.config.name),
            reactor=self.reactor, tls=self._tls_options(), portal=self._portal(),
        )
        for listener in self.config.listeners:
            description = with_backlog(listener.endpoint)
            if listener.reuse_port:
                endpoint: Any = ReusePortEndpoint.from_string(self.reactor, description)
            else:
                endpoint = serverFromString(self.reactor, description)
            factory: Any = RelayFactory(self.intake, listener)
            if listener.mode == "submissions":
                factory = TLSMemoryBIOFactory(self.intake.tls, False, factory)
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
            svc.setServiceParent(self)
            self._listener_services.append(svc)

    def startService(self) -> None:
        config = self.config
        # Everything that can fail comes before the thread pool starts: its
        # threads would otherwise keep a failed twistd from exiting.
        makedirs_durable(config.spool)
        makedirs_durable(config.local.mailroot)
        self._add_listeners()
        assert self.intake is not None
        self.events = EventLog(config.event_log, config.name)
        self.spool.prepare()
        recovered = list(self.spool.recover())
        self.pool.start()
        self.commit_pool.start()
        try:
            self.runner = QueueRunner(config, self.spool, self.events, self.reactor, self.pool)
            self.intake.events = self.events
            self.intake.queued = self.runner.enqueue
            self.intake.cut_through = self.runner.cut_through
            self.runner.start(recovered)
            self._start_admin()
            self.log.info(
                "relaynet node {name} started; {count} queued message(s) recovered",
                name=config.name, count=len(recovered),
            )
            super().startService()
        except BaseException:
            self.pool.stop()
            self.commit_pool.stop()
            raise
        for svc, listener in zip(self._listener_services, config.listeners):
            # StreamServerEndpointService keeps the listening Deferred only in
            # this attribute; we read it to learn the bound port (tcp:0).
            svc._waitingForPort.addCallback(self._listening, listener.endpoint)  # type: ignore[union-attr]
        if self.load_config is not None:
            self._previous_hup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload)
            )

    def _start_admin(self) -> None:
        """
        Metrics observers, the status history and the admin web service(s).
        They read the queue, the sessions and this node only through the
        views of L{relaynet.admin.views}; this node is their L{NodeFacts}.
        """
        from relaynet.admin.adapters import IntakeSessions, RunnerQueue
        from relaynet.admin.api import AdminViews, web_service
        from relaynet.admin.metrics import NodeMetrics

        assert self.events is not None and self.runner is not None and self.intake is not None
        self.started_at = time.time()
        queue = RunnerQueue(self.runner)
        sessions = IntakeSessions(self.intake.sessions)
        if self.metrics is None:
            self.metrics = NodeMetrics(queue, sessions, self.reactor, name=self.config.name)
            self.spool.observe_commits(self.metrics.commit_batch)
        self.events.observers.append(self.metrics.observe)
        self.metrics.history.start()
        views = AdminViews(queue=queue, sessions=sessions, node=self, metrics=self.metrics)
        admin = self.config.admin
        if admin.enabled and not self._web:
            for endpoint, read_only in ((self.config.admin_endpoint, False), (admin.metrics_endpoint, True)):
                if endpoint:
                    svc = web_service(views, endpoint, self.reactor, read_only)
                    svc.setServiceParent(self)
                    self._web.append(svc)

    def reload(self) -> bool:
        """
        Re-read the configuration (SIGHUP): routing, limits, queue and
        outbound settings, TLS files and the password file take effect for new
        sessions and attempts; sessions in progress and the queue are not
        touched. An invalid new configuration is refused with a log line and
        the old one stays in force. Listener and spool changes need a restart.

        @return: whether the new configuration was applied.
        """
        if self.load_config is None or self.intake is None or self.runner is None:
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
            if self.events is not None:
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
        if self.log_observer is not None:
            self.log_observer.configure(new.log)
        self.last_reload_error = None
        self.last_reload = {"time": time.time(), "status": "reloaded", "source": new.source}
        self.log.info("Configuration reloaded from {source}", source=new.source)
        if self.events is not None:
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

    def _listening(self, port: Any, endpoint: str) -> Any:
        self.ports.append(port)
        self.log.info("Listening on {endpoint} ({address})", endpoint=endpoint, address=port.getHost())
        return port

    @inlineCallbacks
    def stopService(self) -> Any:
        if getattr(self, "_previous_hup", None) is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self.metrics is not None:
            self.metrics.history.stop()
        yield super().stopService()
        if self.intake is not None:
            yield drain(self.intake, self.reactor)
        if self.runner is not None:
            yield self.runner.stop()
        self.pool.stop()
        self.commit_pool.stop()
        if self.events is not None:
            self.events.close()
        self.log.info("relaynet node {name} stopped", name=self.config.name)
