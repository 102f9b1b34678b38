# -*- test-case-name: tests.test_metrics -*-
"""
C{twistd relaynet}: options and service maker.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Callable, cast

import attrs
from twisted.logger import ILogObserver, LogLevel, Logger, formatEvent, formatTime, textFileLogObserver
from twisted.python import usage
from zope.interface import implementer

from relaynet.config import ConfigError, Listener, LogSettings, check_endpoint, load_config

_PRIORITY = {level: i for i, level in enumerate(LogLevel.iterconstants())}
_LEGACY_KEYS = frozenset(("message", "isError", "time", "format", "why", "failure", "printed", "system"))


class Options(usage.Options):
    """
    Options of C{twistd relaynet}.
    """

    synopsis = "[--config node.toml] [--listen ENDPOINT] [--spool DIR]"
    longdesc = (
        "Run one relaynet SMTP relay node. With no --config, an embedded default "
        "listens on tcp:2525:interface=127.0.0.1, queues under ./var/relaynet, "
        "relays only for loopback clients and delivers every user@localhost into "
        "./var/relaynet/mailboxes/localhost/<user>/Maildir/. [node] workers "
        "(default: one worker process per CPU) sets how many processes serve it."
    )
    optParameters = [
        ["config", "c", None, "Node configuration file (TOML); see docs/config.md."],
        ["listen", "l", None,
         "Listen on this endpoint instead of the configured listeners "
         "(e.g. tcp:2525:interface=127.0.0.1). May be given more than once."],
        ["spool", "s", None, "Spool directory, overriding [node].spool."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse the options; a usage error ends twistd with one line on
        stderr (twistd itself would print the whole usage text to stdout).
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd relaynet: {e} (see twistd relaynet --help)") from None

    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        """
        Load the configuration. An invalid one ends twistd with one line on
        stderr and exit status 1 (a L{usage.UsageError} would print the whole
        usage text to stdout first, burying the line that matters).
        """
        try:
            self.config = self.load()
        except ConfigError as e:
            raise SystemExit(f"twistd relaynet: {e}") from None

    def load(self) -> Any:
        """
        Load the configuration file and apply the command-line overrides
        (also what SIGHUP re-runs).

        @raise ConfigError: the file is invalid.
        """
        config = load_config(self["config"])
        for endpoint in self["listen"]:
            check_endpoint("<command line>", "--listen", endpoint, server=True)
        if self["listen"]:
            config = attrs.evolve(
                config, listeners=tuple(Listener(endpoint=e) for e in self["listen"])
            )
        if self["spool"]:
            from pathlib import Path

            spool = Path(self["spool"]).absolute()
            local = config.local
            if local.mailroot == config.spool / "mailboxes":
                local = attrs.evolve(local, mailroot=spool / "mailboxes")
            config = attrs.evolve(config, spool=spool, local=local)
        return config


def json_log_line(event: dict[str, Any]) -> str:
    """
    One log event as one JSON line: C{time}, C{level}, C{namespace}, C{text}
    (the formatted message), the event's own fields (C{queue_id}, C{sender},
    ...) and C{traceback} for failures.
    """
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": round(float(event.get("log_time") or 0), 6),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in out:
            continue
        out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"


@implementer(ILogObserver)
class NodeLogObserver:
    """
    The node's log observer: C{[log].format} text (twistd's usual lines) or
    JSON lines, events below C{[log].level} dropped. L{configure} applies a
    reloaded C{[log]} section.
    """

    def __init__(
        self, out: IO[str], settings: LogSettings, worker: int | None = None,
        later: Callable[[Callable[[], None]], Any] | None = None,
    ) -> None:
        """
        @param worker: the shard of the worker process logging (a node with
            workers): its lines say so (C{.../wK} after the namespace, or
            C{"worker": K} in JSON), and its supervisor writes them as they are.
        @param later: flush the lines of a reactor turn together, at its end
            (C{lambda f: reactor.callLater(0, f)}): one write, not one per
            line (a worker's pipe to its supervisor, under load). C{None}:
            each line is flushed as it is written.
        """
        self.out = out
        self.worker = worker
        self._later = later
        self._flush_pending = False
        self._text = textFileLogObserver(out)
        self._stamp_second: int | None = None
        self._stamp_text = "-"
        self.configure(settings)

    def configure(self, settings: LogSettings) -> None:
        self.format = settings.format
        self.level = LogLevel.levelWithName(settings.level)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if _PRIORITY.get(level, 1) < _PRIORITY[self.level]:
            return
        worker = self.worker
        if self.format == "json":
            self.out.write(json_log_line(event if worker is None else {**event, "worker": worker}))
            self._flush()
        elif "log_line" in event and "log_system" not in event and "log_failure" not in event:
            # A per-message event line, already formatted (relaynet.events):
            # the same text as Twisted's classic format, without its
            # generic formatter.
            namespace = event.get("log_namespace", "-")
            if worker is not None:
                namespace = f"{namespace}/w{worker}"
            line = event["log_line"].replace("\n", "\n\t")
            self.out.write(f"{self._stamp(event.get('log_time'))} [{namespace}#{level.name}] {line}\n")
            self._flush()
        elif worker is not None:
            system = event.get("log_system") or event.get("log_namespace", "-")
            self._text({**event, "log_system": f"{system}/w{worker}"})
        else:
            self._text(event)

    def _flush(self) -> None:
        if self._later is None:
            self.out.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self._later(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        self.out.flush()

    def _stamp(self, when: float | None) -> str:
        """Twisted's C{formatTime}, computed once per second."""
        if when is None:
            return "-"
        second = int(when)
        if second != self._stamp_second:
            self._stamp_second, self._stamp_text = second, formatTime(second)
        return self._stamp_text


def _log_output(parent: Any) -> IO[str] | None:
    """
    Where twistd would log (C{--logfile}, stdout with C{-n}), or C{None}
    when twistd's own choice must stand (C{--syslog}, C{--logger}, no twistd).
    """
    if not hasattr(parent, "get") or parent.get("syslog") or parent.get("logger"):
        return None
    name = parent.get("logfile")
    if name == "-" or (parent.get("nodaemon") and not name):
        return sys.stdout
    from twisted.python.logfile import LogFile

    # A LogFile is file-like enough for textFileLogObserver (write, flush);
    # Twisted does not annotate fromFullPath.
    return cast(IO[str], LogFile.fromFullPath(name or "twistd.log"))


def _one_line_start_errors(previous: Callable[..., Any]) -> Callable[..., Any]:
    """
    A C{sys.excepthook} for twistd: a L{NodeStartError} (port in use, spool
    locked, ...) raised out of twistd's start of the service tree is printed
    as one line on the real stderr (twistd has redirected C{sys.stderr} into
    the log by then) and logged; the process then exits with status 1, as
    for any uncaught exception. Anything else goes to C{previous}.

    twistd has no hook of its own: it lets an exception from
    C{privilegedStartService}/C{startService} escape (after removing its pid
    file and telling a daemon's parent), and Python prints it.
    """
    from relaynet.node import NodeStartError

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not isinstance(value, NodeStartError):
            previous(kind, value, tb)
            return
        line = f"twistd relaynet: {value}"
        Logger(namespace="relaynet.tap").critical("{line}", line=line)
        err = sys.__stderr__
        if err is not None:
            try:
                err.write(line + "\n")
                err.flush()
            except OSError:
                pass

    return hook


def makeService(options: Options) -> Any:
    """
    Build the node service from parsed options, and make a failure to start
    it one line on stderr (L{_one_line_start_errors}).
    """
    from twisted.internet import reactor

    from relaynet.hangup import hold_sighup
    from relaynet.node import RelayNode

    sys.excepthook = _one_line_start_errors(sys.excepthook)
    # A SIGHUP before the node (or supervisor) has started is a reload once it has.
    hold_sighup()

    parent = getattr(options, "parent", None) or {}
    run_as = (parent.get("uid"), parent.get("gid")) if hasattr(parent, "get") else (None, None)
    out = _log_output(parent)
    config = options.config
    # The lines of one reactor turn reach the log in one write, at the end
    # of the turn (after the turn's replies have gone out).
    observer = NodeLogObserver(out, config.log, later=end_of_turn(reactor)) if out is not None else None
    if config.worker_count > 1:
        from relaynet.supervisor import Supervisor, inheritable

        if inheritable(config):
            return Supervisor(
                config, reactor, worker_options(options), load_config=options.load,
                run_as=run_as, log_observer=observer,
            )
        if config.workers:
            raise SystemExit(
                f"twistd relaynet: {config.source}: node.workers = {config.workers} needs "
                "tcp:, tcp6: or unix: listeners (their sockets are shared by the workers)"
            )
        Logger(namespace="relaynet.tap").info(
            "workers = \"auto\": one process (a listener is not tcp:, tcp6: or unix:)"
        )
    return RelayNode(
        config, reactor, run_as=run_as, load_config=options.load, log_observer=observer,
        commit_process=True,
    )


def end_of_turn(reactor: Any) -> Callable[[Callable[[], None]], Any]:
    """
    A C{later} for L{NodeLogObserver}: run a flush at the end of the
    reactor's turn, or at once if the reactor is not running (start-up and
    shutdown lines).
    """

    def later(f: Callable[[], None]) -> Any:
        if reactor.running:
            return reactor.callLater(0, f)
        return f()

    return later


def worker_options(options: Options) -> list[str]:
    """The options of C{twistd relaynet} a worker gets too (its config and overrides)."""
    argv: list[str] = []
    if options["config"]:
        argv += ["--config", os.path.abspath(options["config"])]
    for endpoint in options["listen"]:
        argv += ["--listen", endpoint]
    if options["spool"]:
        argv += ["--spool", os.path.abspath(options["spool"])]
    return argv
