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
from typing import Any, Callable

import attrs

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from relaynet.auth import RelayRealm, ScryptChecker
from relaynet.config import ConfigError, NodeConfig
from relaynet.events import EventLog
from relaynet.intake import Intake, RelayFactory, drain
from relaynet.runner import QueueRunner
from relaynet.spool import Spool, makedirs_durable
from relaynet.tls import TLSConfigError, server_options


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
    ) -> None:
        super().__init__()
        self.config = config
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
                for root, dirs, files in os.walk(d):
                    for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                        os.chown(name, *owner)
        self._add_listeners()
        super().privilegedStartService()

    def _add_listeners(self) -> None:
        if self.intake is not None:
            return
        self.intake = Intake(
            config=self.config, spool=self.spool, events=EventLog(None, self.config.name),
            reactor=self.reactor, tls=self._tls_options(),
        )
        for listener in self.config.listeners:
            endpoint = serverFromString(self.reactor, listener.endpoint)
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
        portal = self._portal()
        self.pool.start()
        self.commit_pool.start()
        try:
            self.runner = QueueRunner(config, self.spool, self.events, self.reactor, self.pool)
            self.intake.events = self.events
            self.intake.queued = self.runner.enqueue
            self.intake.cut_through = self.runner.cut_through
            self.intake.portal = portal
            self.runner.start(recovered)
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
            return False
        if new.listeners != old.listeners or new.spool != old.spool:
            self.log.warn("Listener and spool changes need a restart; keeping the old ones")
            new = attrs.evolve(new, listeners=old.listeners, spool=old.spool)
        self.config = new
        self.intake.config = new
        self.intake.tls = tls
        self.intake.portal = portal
        self.runner.reconfigure(new)
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
