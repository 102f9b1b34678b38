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

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relaynet.config import NodeConfig
from relaynet.events import EventLog
from relaynet.intake import Intake, RelayFactory, drain
from relaynet.runner import QueueRunner
from relaynet.spool import Spool


class RelayNode(MultiService):
    """
    A relay node: intake listeners, spool, queue runner.

    @ivar ports: the listening ports once started (for tests: the real port
        number of C{tcp:0} listeners).
    """

    log = Logger()

    def __init__(self, config: NodeConfig, reactor: Any, threads: int = 16) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=2, maxthreads=threads, name=f"relaynet-{config.name}")
        self.spool = Spool(config.queue_dir, reactor, self.pool)
        self.events: EventLog | None = None
        self.runner: QueueRunner | None = None
        self.intake: Intake | None = None
        self.ports: list[Any] = []
        self._listener_services: list[StreamServerEndpointService] = []

    def startService(self) -> None:
        config = self.config
        config.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.local.mailroot.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pool.start()
        self.events = EventLog(config.event_log, config.name)
        self.spool.prepare()
        recovered = list(self.spool.recover())
        self.runner = QueueRunner(config, self.spool, self.events, self.reactor, self.pool)
        self.intake = Intake(
            config=config, spool=self.spool, events=self.events, reactor=self.reactor,
            queued=self.runner.enqueue, cut_through=self.runner.cut_through,
        )
        self.runner.start(recovered)
        self.log.info(
            "relaynet node {name} started; {count} queued message(s) recovered",
            name=config.name, count=len(recovered),
        )
        for listener in config.listeners:
            endpoint = serverFromString(self.reactor, listener.endpoint)
            svc = StreamServerEndpointService(endpoint, RelayFactory(self.intake, listener))
            svc._raiseSynchronously = True
            svc.setServiceParent(self)
            self._listener_services.append(svc)
        super().startService()
        for svc, listener in zip(self._listener_services, config.listeners):
            # StreamServerEndpointService keeps the listening Deferred only in
            # this attribute; we read it to learn the bound port (tcp:0).
            svc._waitingForPort.addCallback(self._listening, listener.endpoint)  # type: ignore[union-attr]

    def _listening(self, port: Any, endpoint: str) -> Any:
        self.ports.append(port)
        self.log.info("Listening on {endpoint} ({address})", endpoint=endpoint, address=port.getHost())
        return port

    @inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        if self.intake is not None:
            yield drain(self.intake, self.reactor)
        if self.runner is not None:
            yield self.runner.stop()
        self.pool.stop()
        if self.events is not None:
            self.events.close()
        self.log.info("relaynet node {name} stopped", name=self.config.name)
