# -*- test-case-name: tests.test_events,tests.test_metrics -*-
"""
The per-message event log: one JSON object per line, one line per event, plus
the same event through L{twisted.logger} for the node's text log.

Fields (see C{docs/events.md}): C{time}, C{node}, C{event} (C{received},
C{delivered}, C{deferred}, C{bounced}, ...), C{queue_id}, C{message_id},
C{sender}, C{recipient}, C{relay}, C{delay}, C{dsn}, C{status} and
event-specific extras. No message bodies, no credentials.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger, LogLevel


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""C{json.dumps} with these options, without making an encoder per call."""

_TEXT_FORMATS: dict[tuple[str, ...], str] = {}
"""The text log's format string of each set of event fields, made once."""


def _text_format(keys: tuple[str, ...]) -> str:
    text = "{event} " + " ".join(f"{k}={{{k}}}" for k in keys)
    if len(_TEXT_FORMATS) < 1024:
        _TEXT_FORMATS[keys] = text
    return text


class EventLog:
    """
    Append events to a JSON lines file: each event reaches the file as one
    whole line, written with C{os.write} on an C{O_APPEND} descriptor. Events
    are diagnostics, not state: no fsync per line; the node calls L{sync}
    from a worker thread about once a second when lines were written, so a
    power loss takes at most the last second of events, not the whole file
    (found by lab soak under power cuts: an event log never fsynced went
    back to empty at every cut).

    A line is never left half written: if the disk fills (or any other error
    occurs) part way through, the bytes of the line already written are
    truncated away and the event is dropped from the file, with one log
    line saying so; it still reaches the observers and the text log.

    @ivar dropped: events that could not be written to the file.
    """

    log = Logger()

    #: Characters of unwritten lines above which they are written at once.
    BATCH_BYTES = 64 * 1024

    def __init__(
        self, path: Path | None, node: str, clock: Callable[[], float] = time.time,
        later: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """
        @param later: how to run a function at the end of the current
            reactor turn (C{lambda f: reactor.callLater(0, f)}): the lines of
            a turn are then written together, in one C{os.write}; call
            L{flush} to write them sooner. C{None}: each line is written as
            it is emitted.
        """
        self.node = node
        self._clock = clock
        self._later = later
        self._pending: list[str] = []
        self._pending_chars = 0
        self._flush_armed = False
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self._fd: int | None = None
        self.dropped = 0
        self.unsynced = 0
        if path is not None:
            self.open(path)

    def open(self, path: Path) -> None:
        """Append events to C{path} from now on (created with mode 0600)."""
        self.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # The file itself survives a power loss from the start (at node start: blocking is fine).
        try:
            os.fsync(self._fd)
            dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError as e:
            self.log.error("Event log: cannot fsync {path}: {error}", path=str(path), error=str(e))

    def sync(self) -> None:
        """
        Make the lines written so far durable (blocking: call from a worker
        thread). An error is logged, never raised: events are diagnostics.
        """
        fd = self._fd
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as e:
            self.log.error("Event log: fsync failed: {error}", error=str(e))

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event, and pass it to every observer (metrics, status)."""
        record = {"time": round(self._clock(), 6), "node": self.node, "event": event}
        keys = []
        for k, v in fields.items():
            if v is not None:
                record[k] = v
                if k != "time" and k != "node":
                    keys.append(k)
        if self._fd is not None:
            self._queue(_encode(record) + "\n")
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                self.log.failure("Event observer failed")
        names = tuple(keys)
        text = _TEXT_FORMATS.get(names)
        if text is None:
            text = _text_format(names)
        # The line is built here once; the node's text log writes it as is
        # (log_line) instead of running Twisted's generic formatter on the
        # format string: ~20 us less per event, two events per message.
        # And it goes straight to the logger's observer, as Logger.info
        # would send it (the same event keys), without Logger.emit's
        # per-call check that the level is one of LogLevel's constants (a
        # sort of them, each time).
        log = self.log
        line = dict(record)
        line.update(
            log_line=" ".join([event] + [f"{k}={record[k]}" for k in keys]),
            log_logger=log, log_level=LogLevel.info, log_namespace=log.namespace,
            log_source=log.source, log_format=text, log_time=time.time(),
        )
        log.observer(line)

    def _queue(self, line: str) -> None:
        """
        Write C{line} now (no C{later}), or add it to the lines of this
        reactor turn, written together at its end (or once they pass
        L{BATCH_BYTES}).
        """
        if self._later is None:
            assert self._fd is not None
            self._append(self._fd, line.encode("utf-8"), 1)
            return
        self._pending.append(line)
        self._pending_chars += len(line)
        if self._pending_chars >= self.BATCH_BYTES:
            self.flush()
        elif not self._flush_armed:
            self._flush_armed = True
            self._later(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_armed = False
        self.flush()

    def flush(self) -> None:
        """
        Write the lines not written yet (reactor thread: the node flushes
        before each L{sync} and at stop, the SMTP intake before it sends a
        reply itself, ahead of the end of the turn).
        """
        if not self._pending:
            return
        lines, self._pending, self._pending_chars = self._pending, [], 0
        if self._fd is not None:
            self._append(self._fd, "".join(lines).encode("utf-8"), len(lines))

    def _append(self, fd: int, data: bytes, lines: int) -> None:
        """
        Write C{data} (C{lines} whole lines) to the end of the file; a line
        that cannot be written whole is not written at all (dropping its
        event, with a log line).
        """
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
            self.unsynced += lines
        except OSError as e:
            # The lines written whole stay; the part of a line after them is
            # taken back (O_APPEND and one writer: it is the file's tail).
            whole = data.rfind(b"\n", 0, written) + 1
            kept = data.count(b"\n", 0, whole)
            self.unsynced += kept
            self.dropped += lines - kept
            if written > whole:
                try:
                    os.ftruncate(fd, os.fstat(fd).st_size - (written - whole))
                except OSError as e2:
                    self.log.error(
                        "Event log: cannot remove a partial line: {error}", error=str(e2)
                    )
            if lines - kept == 1:
                self.log.error("Event log: event dropped, cannot write: {error}", error=str(e))
            else:
                self.log.error(
                    "Event log: {count} events dropped, cannot write: {error}",
                    count=lines - kept, error=str(e),
                )

    def close(self) -> None:
        """Stop writing events to a file (the lines not written yet are written first)."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
