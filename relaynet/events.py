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
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from twisted.logger import Logger


class EventLog:
    """
    Append events to a JSON lines file (line-buffered: each event reaches the
    file with one C{write}; no fsync, events are diagnostics, not state).
    """

    log = Logger()

    def __init__(self, path: Path | None, node: str, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self._clock = clock
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self._file: TextIO | None = None
        if path is not None:
            self.open(path)

    def open(self, path: Path) -> None:
        """Append events to C{path} from now on (created with mode 0600)."""
        self.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event, and pass it to every observer (metrics, status)."""
        record = {"time": round(self._clock(), 6), "node": self.node, "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
