# -*- test-case-name: tests.test_workers -*-
"""
A node with workers (C{[node] workers = N}, C{"auto"}): the C{twistd relaynet}
process supervises N worker processes, as Postfix's master runs its smtpd,
qmgr and smtp processes, so that one node uses every core.

Workers are forks of the supervisor (L{ForkedWorker}), not new
interpreters: they start from the modules the supervisor has imported, on
memory pages they share with it and with each other until written, so a
node with two workers costs about half of three separate interpreters. A
worker's process title says which it is (C{relaynet.worker --shard K ...}).

The supervisor owns what makes the workers one node:

  - the listening sockets: bound once, here (before twistd drops
    privileges: ports below 1024), and passed to every worker at spawn
    (descriptors 3, 4, ... in listener order); every worker accepts on the
    same sockets, so a connection waiting in the backlog of a worker that
    dies is taken by another;
  - the spool lock (C{<spool>/node.lock}); each worker K holds the lock of
    its own shard, the queue C{<spool>/queue} (K = 0) or C{<spool>/queue.K},
    and recovers it at its start: a worker killed with C{kill -9} is
    replaced (after a backoff: 0.5 s, doubling up to 30 s while it keeps
    dying within 30 s of its start) and its replacement recovers the shard;
  - one admin endpoint and one C{/metrics} over every shard
    (L{relaynet.admin.fleet}): each worker serves its own admin site on a
    private socket, C{<spool>/worker-K.sock}, that the supervisor's site
    reads and acts through;
  - one log: workers format their lines as the supervisor's log has them
    (C{[log]} format and level, with C{/wK} or C{"worker": K}) and write
    them to the supervisor's log stream itself when it is a file or a
    terminal (L{shareable_log_fd}), or on their standard output for the
    supervisor to write; without a log stream (syslog, a custom logger)
    they send their events as JSON lines that the supervisor logs through
    its own observer;
  - signals: SIGHUP re-reads the configuration here (an invalid one is
    refused once, here) and is passed to every worker; SIGTERM stops in
    order: the supervisor closes its copies of the listening sockets (no
    worker is started any more), every worker is sent SIGTERM and stops as
    a node does (listeners, sessions, deliveries), after
    L{STOP_GRACE} seconds a worker still running is killed, then the admin
    site stops and the lock is released.

A worker watches its standard input, a pipe from the supervisor: if the
supervisor dies (even by C{kill -9}) the worker stops as on SIGTERM.

Shards are a matter of the spool: when C{workers} is lowered, the mail of
the shards no worker owns any more is moved into the remaining ones at the
next start, before any worker starts (L{adopt_orphan_shards}).
"""

from __future__ import annotations

import errno
import gc
import importlib
import io
import json
import os
import signal
import socket
import stat
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import attrs

import twisted.internet
from setproctitle import setproctitle
from twisted.application.service import IService, MultiService, Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.process import Process, reapProcessHandlers
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogBeginner, globalLogPublisher
from twisted.python.failure import Failure

from relaynet.admin.fleet import WorkerLink, fleet_web_service
from relaynet.config import ConfigError, NodeConfig, split_endpoint, worker_admin_endpoint
from relaynet.queue.shards import adopt_orphan_shards
from relaynet.node import (
    LISTEN_BACKLOG, NodeStartError, attach_log_observer, disk_problem, listen_problem, lock_spool, own_spool,
)
from relaynet.hangup import hold_sighup, install_sighup
from relaynet.smtp.netio import FIRST_INHERITED_FD, tcp_listening_socket
from relaynet.queue.spool import makedirs_durable

STOP_GRACE = 60.0
"""Seconds a worker has to stop after SIGTERM before it is killed."""
RESTART_MIN, RESTART_MAX = 0.5, 30.0
"""Backoff before a worker that died is started again (doubling while it dies young)."""
STABLE_AFTER = 30.0
"""A worker that ran this long before dying is restarted after the shortest backoff."""
INHERITABLE_KINDS = ("tcp", "tcp6", "unix")

def inheritable(config: NodeConfig) -> bool:
    """Whether every listener is a socket the supervisor can bind and pass on."""
    return all(split_endpoint(lst.endpoint)[0] in INHERITABLE_KINDS for lst in config.listeners)


def bind_listener(endpoint: str, backlog: int, reuse_port: bool = False) -> socket.socket:
    """
    Bind and listen on a C{tcp:}, C{tcp6:} or C{unix:} server endpoint string,
    as Twisted's endpoint would (interface, backlog, a UNIX socket's mode), and
    return the socket (non-blocking, for the workers to adopt).

    @param reuse_port: with C{SO_REUSEPORT} (the listener's C{reuse_port}:
        several nodes, each with its workers, on one port).

    @raise OSError: it cannot listen (address in use, ...).
    """
    kind, args, kw = split_endpoint(endpoint)
    backlog = int(kw.get("backlog", backlog))
    if kind == "unix":
        path = args[0] if args else kw["address"]
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, int(kw.get("mode", "666"), 8))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    else:
        port = int(args[0] if args else kw.get("port", "0"))
        interface = kw.get("interface", "")
        family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
        if not interface:
            interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sock = tcp_listening_socket(family, interface, port, backlog, reuse_port)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    """Remove a UNIX socket file nobody listens on any more (left by a crash)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def worker_log_event(shard: int, line: bytes) -> dict[str, Any]:
    """
    A worker's log line (a JSON object from L{relaynet.tap.json_log_line}) as a
    log event of the supervisor, with C{worker=shard}; a line that is not one
    (a traceback printed by Python) is logged as an error, as is.
    """
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        return {
            "log_time": time.time(), "log_level": LogLevel.error, "log_namespace": "relaynet.worker",
            "log_format": "{log_line}", "log_line": f"worker {shard}: {text}", "worker": shard,
            "log_system": f"relaynet.worker/w{shard}",
        }
    try:
        level = LogLevel.levelWithName(str(rec.pop("level", "info")))
    except InvalidLogLevelError:
        level = LogLevel.info
    message = rec.pop("text")
    traceback = rec.pop("traceback", None)
    if traceback:
        message = f"{message}\n{traceback}"
    when = rec.pop("time", None)
    event = {k: v for k, v in rec.items() if not k.startswith("log_")}
    namespace = f"{rec.get('namespace') or 'relaynet.worker'}/w{shard}"
    event.update(
        log_time=when if isinstance(when, (int, float)) else time.time(), log_level=level,
        # log_system too: syslog and other classic observers print only
        # "[system] text", and would not say which worker logged the line.
        log_namespace=namespace, log_system=namespace,
        log_format="{log_line}", log_line=message, worker=shard,
    )
    event.pop("namespace", None)
    return event


WORKER_MODULE = "relaynet.worker"
"""The module a worker runs (C{main(argv)}), named, not imported: it is a higher layer."""


_LEFT_BEHIND: list[Any] = []


def prepare_to_fork(config: NodeConfig) -> None:
    """
    Before the first worker is forked: import what a worker runs, and move
    every object alive now (modules, classes, functions: nearly all of a
    worker's memory at rest) into the collector's permanent generation, so
    that neither this process's collections nor the workers' touch them.
    The pages they lie on stay shared between the supervisor and every
    worker (copy-on-write) instead of being copied into each.

    What a worker imports only for a feature (dkimpy, for C{[[dkim.keys]]})
    is imported here when C{config} has the feature: a node without it
    does not carry it.
    """
    importlib.import_module(WORKER_MODULE)
    if config.dkim.keys:
        importlib.import_module("dkim")
    gc.collect()
    gc.freeze()


class ForkedWorker(Process):
    """
    A worker started as a fork of the supervisor, without exec: the same
    fork, descriptors and process watching as C{reactor.spawnProcess}
    (L{Process}), but the child, instead of exec'ing a new interpreter that
    would import everything again into memory of its own, starts from this
    process's modules (see L{prepare_to_fork}) and runs the worker in place
    (L{become_worker}).
    """

    def __init__(self, reactor: Any, args: list[str], proto: ProcessProtocol, child_fds: dict[int, Any]) -> None:
        self.worker_args = args
        Process.__init__(
            self, reactor, sys.executable, [sys.executable, "-m", WORKER_MODULE, *args],
            dict(os.environ), None, proto, childFDs=child_fds,
        )

    def _trySpawnInsteadOfFork(self, *args: Any) -> bool:
        return False

    def _execChild(self, path: Any, uid: Any, gid: Any, executable: Any, args: Any, environment: Any) -> None:
        os._exit(become_worker(self.worker_args))


def become_worker(args: list[str]) -> int:
    """
    In a forked child (descriptors already in place: 0-2 the pipes to the
    supervisor, the listening sockets from 3): leave the supervisor's state
    behind as an exec would, then run the worker's C{main(args)}; its exit
    status.

    Left behind: the supervisor's reactor (its epoll and waker descriptors
    are closed already; a new reactor is installed by the worker), its
    processes to reap, its signal handlers and wakeup descriptor, its log
    observers and redirected standard streams, and the garbage collector
    disabled for the fork.
    """
    gc.enable()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # What a new interpreter starts with (the fork reset them to default).
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    hold_sighup()
    # The old reactor is kept alive: finalising it would close descriptor
    # numbers of its own that are now the worker's (its epoll's, say).
    _LEFT_BEHIND.append(sys.modules.pop("twisted.internet.reactor", None))
    if "reactor" in vars(twisted.internet):
        delattr(twisted.internet, "reactor")
    reapProcessHandlers.clear()
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered: Any = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buffered,
            encoding="utf-8", errors="backslashreplace", line_buffering=fd == 2,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.excepthook = sys.__excepthook__
    # No observer of the supervisor's: logging begins again, as in a new process.
    for observer in list(globalLogPublisher._observers):
        globalLogPublisher.removeObserver(observer)
    warnings.showwarning = getattr(warnings, "_showwarning_orig", warnings.showwarning)
    globalLogBeginner.__init__(globalLogPublisher, sys.stderr, sys, warnings)  # type: ignore[misc]
    sys.argv = [WORKER_MODULE, *args]
    try:
        setproctitle(" ".join([WORKER_MODULE, *args]))
    except Exception:
        pass
    try:
        code = importlib.import_module(WORKER_MODULE).main(args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except Exception:
        # As an interpreter prints an uncaught exception (the supervisor
        # logs our stderr), not Twisted's "Upon execvpe" of a failed exec.
        traceback.print_exc()
        code = 1
    for out in (sys.stdout, sys.stderr):
        try:
            out.flush()
        except (OSError, ValueError):
            pass
    return int(code)


def shareable_log_fd(out: Any) -> int | None:
    """
    The descriptor of the supervisor's log stream C{out} if its workers may
    write their log lines to it directly, or L{None}.

    A regular file or a terminal (C{twistd -n} with its output in a file, or
    on a terminal) may be shared: each worker writes whole lines, a turn's
    lines in one C{write} (L{relaynet.worker.WholeLines}), and Linux keeps
    the writes of processes sharing a file's offset from overlapping. The
    supervisor then no longer reads, decodes and writes again every line of
    its workers (about 8% of a node's CPU under load). Not shared: a pipe
    or socket (journald, a log collector: a write of more than C{PIPE_BUF}
    bytes may interleave with another's), and twistd's own log file (a
    C{LogFile} the supervisor rotates: workers would go on writing to the
    rotated file).
    """
    if out is None or out is not sys.stdout:
        return None
    try:
        fd = out.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISREG(mode) or stat.S_ISCHR(mode) else None


class WorkerProtocol(ProcessProtocol):
    """One worker process: its log lines in, its end out."""

    def __init__(self, supervisor: "Supervisor", shard: int) -> None:
        self.supervisor = supervisor
        self.shard = shard
        self.started = time.time()
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def makeConnection(self, transport: Any) -> None:
        self.pid = getattr(transport, "pid", None)
        ProcessProtocol.makeConnection(self, transport)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self._buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > 65536:  # a runaway line: log what came so far
            lines.append(rest)
            rest = b""
        self._buffers[fd] = rest
        self._deliver(fd, lines)

    def _deliver(self, fd: int, lines: list[bytes]) -> None:
        """Whole lines of the worker's stdout (formatted log lines, or JSON events) or stderr."""
        if fd == 1 and self.supervisor.log_out is not None:
            if lines:
                self.supervisor.write_log(b"\n".join(lines) + b"\n")
            return
        for line in lines:
            if line.strip():
                self.supervisor.worker_logged(self.shard, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest.strip():
                self._deliver(fd, [rest])
        self._buffers = {}
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class Supervisor(MultiService):
    """
    The C{twistd relaynet} process of a node with workers (see the module).

    @ivar sockets: the listening sockets, in listener order, once bound.
    """

    log = Logger(namespace="relaynet.supervisor")

    def __init__(
        self, config: NodeConfig, reactor: Any, argv: list[str],
        load_config: Callable[[], NodeConfig] | None = None,
        run_as: tuple[int | None, int | None] = (None, None),
        log_observer: Any = None,
        fork: bool = True,
    ) -> None:
        """
        @param argv: the options a worker gets besides its shard (the same
            C{--config}, C{--listen} and C{--spool} as this process).
        @param fork: start workers as forks of this process (L{ForkedWorker}),
            or, if false, as new interpreters (C{python -m relaynet.worker}).
        """
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.argv = argv
        self.load_config = load_config
        self.run_as = run_as
        self.log_observer = log_observer
        self.count = config.worker_count
        # Where our log goes (stdout, a twistd log file): workers format
        # their lines as ours are and we write them there; without one
        # (syslog, a custom logger) they send events as JSON to log here.
        self.log_out: Any = None if log_observer is None else getattr(log_observer, "out", None)
        # Our log stream's descriptor when workers may write their lines to
        # it themselves (see L{shareable_log_fd}); otherwise they come
        # through a pipe and we write them.
        self.log_fd = shareable_log_fd(self.log_out)
        self.sockets: list[socket.socket] = []
        self.procs: dict[int, WorkerProtocol] = {}
        self.restarts: dict[int, int] = {}
        self.started_at: float | None = None
        self.last_reload: dict[str, Any] | None = None
        self.last_reload_error: str | None = None
        self._failures: dict[int, int] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._stopping = False
        self._lock_fd: int | None = None
        self._web: list[IService] = []
        self._previous_hup: Any = None
        self.fork = fork
        self._forked_once = False

    # -- start -----------------------------------------------------------

    @property
    def ports(self) -> list[tuple[str, int]]:
        """The (address, port) of each TCP listening socket (tests: C{tcp:0})."""
        out = []
        for s in self.sockets:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                host, port = s.getsockname()[:2]
                out.append((host, port))
        return out

    def setServiceParent(self, parent: Any) -> Any:
        attach_log_observer(parent, self.log_observer)
        return MultiService.setServiceParent(self, parent)

    def privilegedStartService(self) -> None:
        """Take the spool, bind the listeners (as root if twistd starts as root)."""
        uid, gid = self.run_as
        owner = None
        if uid is not None or gid is not None:
            owner = (-1 if uid is None else uid, -1 if gid is None else gid)
            own_spool(self.config, owner)
        try:
            makedirs_durable(self.config.spool)
            self._lock_fd = lock_spool(self.config.spool)
            if owner is not None:
                os.fchown(self._lock_fd, *owner)
        except OSError as e:
            raise NodeStartError(disk_problem(e, self.config.spool)) from e
        for listener in self.config.listeners:
            try:
                sock = bind_listener(listener.endpoint, LISTEN_BACKLOG, listener.reuse_port)
            except OSError as e:
                self._close_sockets()
                kind, args, kw = split_endpoint(listener.endpoint)
                problem = ierror.CannotListenError(
                    kw.get("interface", "") if kind != "unix" else (args[0] if args else ""),
                    (args[0] if args else kw.get("port", "")) if kind != "unix" else "", e,
                )
                raise NodeStartError(listen_problem(problem, listener.endpoint)) from e
            if owner is not None and sock.family == socket.AF_UNIX:
                os.chown(sock.getsockname(), *owner)
            self.sockets.append(sock)
            self.log.info("Listening on {what} ({address})", what=listener.endpoint,
                          address=sock.getsockname())
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        if not self.sockets:
            self.privilegedStartService()
        try:
            moved = adopt_orphan_shards(self.config.spool, self.count)
        except OSError as e:
            raise NodeStartError(disk_problem(e, self.config.spool)) from e
        if moved:
            self.log.warn("{count} queued message(s) of shards beyond workers = {n} moved into the others",
                          count=moved, n=self.count)
        self.started_at = time.time()
        if self.config.admin.enabled:
            self._start_admin()
        MultiService.startService(self)
        for shard in range(self.count):
            self._spawn(shard)
        self.log.info("relaynet node {name} started with {n} workers", name=self.config.name, n=self.count)
        if self.load_config is not None:
            self._previous_hup = install_sighup(self.reactor, self.reload)

    def _start_admin(self) -> None:
        for endpoint, read_only in ((self.config.admin_endpoint, False), (self.config.admin.metrics_endpoint, True)):
            if endpoint:
                web = fleet_web_service(self, endpoint, self.reactor, read_only)
                web.setServiceParent(self)
                self._web.append(web)

    def _spawn(self, shard: int) -> None:
        self._respawns.pop(shard, None)
        if self._stopping:
            return
        proto = WorkerProtocol(self, shard)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        log_options = ["--log-lines"] if self.log_out is not None else []
        if self.log_fd is not None:
            self.log_out.flush()
            child_fds[1] = self.log_fd
            log_options.append("--shared-log")
        for i, sock in enumerate(self.sockets):
            child_fds[FIRST_INHERITED_FD + i] = sock.fileno()
        args = [
            "--shard", str(shard), "--listeners", str(len(self.sockets)), *log_options, *self.argv,
        ]
        # A SIGHUP (a reload) sent while the worker starts waits, blocked,
        # for the handler it installs first thing (hold_sighup).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            if self.fork:
                if not self._forked_once:
                    prepare_to_fork(self.config)
                    self._forked_once = True
                ForkedWorker(self.reactor, args, proto, child_fds)
            else:
                for fd in child_fds.values():
                    if isinstance(fd, int):
                        os.set_inheritable(fd, True)
                argv = [sys.executable, "-m", WORKER_MODULE, *args]
                self.reactor.spawnProcess(proto, sys.executable, argv, env=dict(os.environ), childFDs=child_fds)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self.procs[shard] = proto
        self.log.info("Worker {shard} started (pid {pid})", shard=shard, pid=proto.pid)

    def worker_logged(self, shard: int, line: bytes) -> None:
        globalLogPublisher(worker_log_event(shard, line))

    def write_log(self, lines: bytes) -> None:
        """Whole log lines of a worker, formatted there: into our log as they are."""
        out = self.log_out
        if out is None:
            return
        out.write(lines.decode("utf-8", "replace"))
        out.flush()

    def worker_ended(self, proto: WorkerProtocol, reason: Failure) -> None:
        shard = proto.shard
        if self.procs.get(shard) is proto:
            del self.procs[shard]
        value = reason.value
        status = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        how = f"killed by signal {sig}" if sig else f"exit status {status}"
        if self._stopping:
            self.log.info("Worker {shard} (pid {pid}) stopped ({how})", shard=shard, pid=proto.pid, how=how)
            return
        lived = time.time() - proto.started
        failures = 0 if lived >= STABLE_AFTER else self._failures.get(shard, 0) + 1
        self._failures[shard] = failures
        delay = min(RESTART_MAX, RESTART_MIN * 2 ** max(0, failures - 1))
        self.restarts[shard] = self.restarts.get(shard, 0) + 1
        self.log.warn(
            "Worker {shard} (pid {pid}) ended ({how}) after {lived:.1f} s; restarting it in {delay:.1f} s",
            shard=shard, pid=proto.pid, how=how, lived=lived, delay=delay,
        )
        self._respawns[shard] = self.reactor.callLater(delay, self._spawn, shard)

    # -- what the admin site reads (relaynet.admin.fleet.FleetFacts) -------------

    def workers(self) -> list[WorkerLink]:
        out = []
        for shard in range(self.count):
            proto = self.procs.get(shard)
            out.append(WorkerLink(
                shard=shard, endpoint=worker_admin_endpoint(self.config.spool, shard).replace(":mode=600", ""),
                pid=None if proto is None else proto.pid,
                started=None if proto is None else proto.started,
                restarts=self.restarts.get(shard, 0),
            ))
        return out

    def reloaded(self, missing: list[int]) -> None:
        """
        Every worker that answered reloaded (through the admin API): re-read
        ours too, and send SIGHUP to the running workers that did not answer
        (still starting, say: each reloads once it has started).
        """
        if not self._reload_self():
            return
        for shard in missing:
            proto = self.procs.get(shard)
            if proto is not None:
                self._signal(proto, signal.SIGHUP)

    # -- signals ---------------------------------------------------------------

    def reload(self) -> bool:
        """
        SIGHUP: re-read the configuration; if it is valid, pass SIGHUP to
        every worker (each reloads as a node does); if not, log it once and
        keep the old one everywhere.
        """
        if not self._reload_self():
            return False
        for proto in list(self.procs.values()):
            self._signal(proto, signal.SIGHUP)
        return True

    def _reload_self(self) -> bool:
        if self.load_config is None:
            return False
        try:
            new = self.load_config()
        except (ConfigError, OSError) as e:
            self.log.error("Reload refused, the old configuration stays in force: {error}", error=str(e))
            self.last_reload_error = str(e)
            self.last_reload = {"time": time.time(), "status": "refused", "error": str(e)}
            return False
        old = self.config
        if new.worker_count != self.count or new.listeners != old.listeners or new.spool != old.spool:
            self.log.warn("Changes of workers, listeners and spool need a restart; keeping the old ones")
        self.config = attrs.evolve(
            new, listeners=old.listeners, spool=old.spool, admin=old.admin, workers=old.workers
        )
        self.last_reload_error = None
        self.last_reload = {"time": time.time(), "status": "reloaded", "source": new.source}
        if self.log_observer is not None:
            self.log_observer.configure(new.log)
        return True

    def _signal(self, proto: WorkerProtocol, sig: int) -> None:
        transport = proto.transport
        if transport is None:
            return
        try:
            transport.signalProcess(sig)
        except ierror.ProcessExitedAlready:
            pass
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    # -- stop ------------------------------------------------------------------

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    @inlineCallbacks
    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        Service.stopService(self)
        self._stopping = True
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        # No worker is started any more: the sockets live on in the workers
        # until each stops listening.
        self._close_sockets()
        procs = list(self.procs.values())
        for proto in procs:
            self._signal(proto, signal.SIGTERM)
        if procs:
            ended = DeferredList([p.ended for p in procs])
            timer = self.reactor.callLater(STOP_GRACE, self._kill_rest)
            yield ended
            if timer.active():
                timer.cancel()
        for web in self._web:
            yield maybeDeferred(web.stopService)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.log.info("relaynet node {name} stopped", name=self.config.name)

    def _kill_rest(self) -> None:
        for proto in list(self.procs.values()):
            self.log.warn("Worker {shard} (pid {pid}) did not stop in {grace:.0f} s; killing it",
                          shard=proto.shard, pid=proto.pid, grace=STOP_GRACE)
            self._signal(proto, signal.SIGKILL)
