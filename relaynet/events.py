# -*- test-case-name: tests.test_metrics -*-
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
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger


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

    def __init__(
        self, path: Path | None, node: str, clock: Callable[[], float] = time.time,
        background: bool = False,
    ) -> None:
        """
        @param background: write the lines in a thread of the event log's
            own (a node), not in the thread that emits them: on ext4 an
            append can wait for the journal commit that the spool's fsyncs
            start (57 us per event on average, in a profile of a node at 20
            sessions), and the reactor must not. Lines keep their order and
            stay whole; those emitted together are written in one
            C{os.write}. L{sync} and L{close} write everything emitted before
            them first.
        """
        self.node = node
        self._clock = clock
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self._fd: int | None = None
        self.dropped = 0
        self.unsynced = 0
        self._background = background
        self._lines: queue.SimpleQueue[bytes | threading.Event | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._errors: list[str] = []
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
        if self._background:
            self._writer = threading.Thread(
                target=self._write_lines, args=(self._fd,), name="relaynet-events", daemon=True
            )
            self._writer.start()

    def _settle(self) -> None:
        """Wait until the writer thread has written every line emitted so far (blocking)."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            done = threading.Event()
            self._lines.put(done)
            done.wait()

    def sync(self) -> None:
        """
        Make the lines emitted so far durable (blocking: call from a worker
        thread). An error is logged, never raised: events are diagnostics.
        """
        fd = self._fd
        if fd is None:
            return
        self._settle()
        try:
            os.fsync(fd)
        except OSError as e:
            self.log.error("Event log: fsync failed: {error}", error=str(e))

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event, and pass it to every observer (metrics, status)."""
        record = {"time": round(self._clock(), 6), "node": self.node, "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        if self._errors:
            self._report_errors()
        if self._fd is not None:
            line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
            if self._writer is not None:
                self._lines.put(line)
                self.unsynced += 1
            else:
                self._append(self._fd, line)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:
                self.log.failure("Event observer failed")
        keys = [k for k in record if k not in ("time", "node", "event")]
        # The line is built here once; the node's text log writes it as is
        # (log_line) instead of running Twisted's generic formatter on the
        # format string: ~20 us less per event, two events per message.
        self.log.info(
            "{event} " + " ".join(f"{k}={{{k}}}" for k in keys),
            log_line=" ".join([event] + [f"{k}={record[k]}" for k in keys]),
            **record,
        )

    def _append(self, fd: int, line: bytes) -> None:
        """
        Write C{line} whole to the end of the file, or not at all (dropping
        the event with a log line).
        """
        error = self._write_whole(fd, line, 1)
        if error is None:
            self.unsynced += 1
        else:
            self.log.error("{error}", error=error)

    def _write_whole(self, fd: int, data: bytes, lines: int) -> str | None:
        """
        Write C{data} (C{lines} whole lines) to the end of the file, or none
        of it: the lines are dropped (counted in L{dropped}).

        @return: what went wrong, or L{None}.
        """
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
            return None
        except OSError as e:
            self.dropped += lines
            what = f"Event log: {lines} event(s) dropped, cannot write: {e}"
            if written:
                # O_APPEND: the partial write is the file's tail.
                try:
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                except OSError as e2:
                    what += f"; cannot remove a partial line: {e2}"
            return what

    def _write_lines(self, fd: int) -> None:
        """
        The writer thread: write what L{emit} queued, in order, every line
        queued meanwhile in one write. Errors are logged by the next
        L{emit}, on its thread (log observers need not be thread-safe).
        """
        lines = self._lines
        while True:
            item = lines.get()
            batch: list[bytes] = []
            markers: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    batch.append(item)
                if stop:
                    break
                try:
                    item = lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    error = self._write_whole(fd, b"".join(batch), len(batch))
                except Exception as e:  # never let the thread die: emit would queue forever
                    self.dropped += len(batch)
                    error = f"Event log: {len(batch)} event(s) dropped: {e!r}"
                if error is not None:
                    self._errors.append(error)
            for marker in markers:
                marker.set()
            if stop:
                return

    def _report_errors(self) -> None:
        errors, self._errors = self._errors, []
        for error in errors:
            self.log.error("{error}", error=error)

    def close(self) -> None:
        """Stop writing events to a file (after writing every line emitted so far)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self._lines.put(None)
            writer.join()
        if self._errors:
            self._report_errors()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
