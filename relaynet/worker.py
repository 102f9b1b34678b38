# -*- test-case-name: tests.test_workers -*-
"""
One worker of a node with workers: C{python -m relaynet.worker --shard K
--listeners N [twistd relaynet options]}, started by L{relaynet.supervisor}
and by nothing else.

A worker is a L{RelayNode} on shard K of the spool (L{worker_config}) that
serves the listening sockets it inherited (descriptors 3 .. 3+N-1, in listener
order), writes its log as JSON lines on its standard output (the supervisor
logs them), and stops as on SIGTERM when its standard input (a pipe from the
supervisor) closes: a supervisor that dies, even by C{kill -9}, takes its
workers with it, in order.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import attrs
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import FileLogObserver, Logger, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from relaynet.config import AdminSettings, ConfigError, NodeConfig, worker_admin_endpoint
from relaynet.hangup import hold_sighup
from relaynet.smtp.netio import FIRST_INHERITED_FD

log = Logger(namespace="relaynet.worker")


def worker_config(config: NodeConfig, shard: int) -> NodeConfig:
    """
    C{config} as worker C{shard} runs it: its shard of the queue, its lock, and
    its admin site on a private socket (the supervisor serves the node's).
    """
    admin = AdminSettings(enabled=True, endpoint=worker_admin_endpoint(config.spool, shard), metrics_endpoint=None)
    return attrs.evolve(config, shard=shard, admin=admin)


@implementer(IReadDescriptor)
class ParentWatch:
    """Stops the reactor when the supervisor's end of our standard input closes."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        if self.reactor.running:
            log.warn("The supervisor is gone: stopping")
            self.reactor.stop()


class WholeLines:
    """
    Standard output when it is the supervisor's log stream itself
    (C{--shared-log}: a file or terminal that the supervisor and the other
    workers write to as well): text gathers until L{flush}, which writes it
    in one C{write} -- whole lines, never a part of one that another process
    could split.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        if not self._parts:
            return
        data = "".join(self._parts).encode("utf-8", "backslashreplace")
        self._parts = []
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            pass  # a full disk: the lines are lost, and there is nowhere to say so


def main(argv: Sequence[str] | None = None) -> int:
    # A SIGHUP passed on while we start must not end us (its default action)
    # nor be lost: the node reloads once it has started.
    hold_sighup()
    parser = argparse.ArgumentParser(prog="relaynet.worker", add_help=False, allow_abbrev=False)
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--listeners", type=int, required=True)
    parser.add_argument("--log-lines", action="store_true")
    parser.add_argument("--shared-log", action="store_true")
    ours, rest = parser.parse_known_args(argv)

    from relaynet.tap import NodeLogObserver, Options, end_of_turn, json_log_line

    shard = ours.shard
    options = Options()
    try:
        options.parseOptions(rest)
    except SystemExit as e:
        print(f"{e}", file=sys.stderr)
        return 1
    node_observer = None
    if ours.log_lines:
        # Lines as the node's log has them ([log] format and level): the
        # supervisor writes them to its log as they come.
        from twisted.internet import reactor as clock

        out: Any = WholeLines(sys.stdout.fileno()) if ours.shared_log else sys.stdout
        node_observer = NodeLogObserver(out, options.config.log, worker=shard, later=end_of_turn(clock))
        globalLogBeginner.beginLoggingTo([node_observer], redirectStandardIO=False)
    else:
        # Events as JSON objects, for the supervisor to log through its own
        # observer (syslog, a custom twistd logger).
        globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, json_log_line)], redirectStandardIO=False)

    def load() -> NodeConfig:
        return worker_config(options.load(), shard)

    from twisted.internet import reactor

    from relaynet.node import NodeStartError, RelayNode

    try:
        config = worker_config(options.config, shard)
    except ConfigError as e:
        print(f"relaynet worker {shard}: {e}", file=sys.stderr)
        return 1
    fds = list(range(FIRST_INHERITED_FD, FIRST_INHERITED_FD + ours.listeners))
    node = RelayNode(config, reactor, load_config=load, inherited=fds, log_observer=node_observer,
                     commit_process=True)
    failed: list[str] = []

    def start() -> None:
        try:
            node.privilegedStartService()
            node.startService()
        except NodeStartError as e:
            failed.append(str(e))
            reactor.stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", node.stopService)

    reactor.addReader(ParentWatch(reactor))
    reactor.callWhenRunning(start)
    reactor.run()
    if node_observer is not None:
        node_observer.out.flush()
    sys.stdout.flush()  # the last lines (a flush the stopped reactor will not run)
    if failed:
        print(f"relaynet worker {shard}: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
