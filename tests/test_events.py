"""
Tests for L{relaynet.events.EventLog}'s file: the lines of a reactor turn
written together (one C{os.write}), and the whole-line guarantee kept for a
batch. The text log and metrics of events are tested in
C{tests/test_metrics.py}, the full disk in C{tests/test_disk.py}.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from relaynet.events import EventLog
from relaynet.testing import EPOCH


def batched(path: Path) -> tuple[EventLog, Clock, list[dict[str, Any]]]:
    """An event log whose turns end when the test advances the clock; its error log lines."""
    clock = Clock()
    events = EventLog(path, "n1", clock=lambda: EPOCH, later=lambda f: clock.callLater(0, f))
    logged: list[dict[str, Any]] = []
    events.log = Logger(namespace="relaynet.events.EventLog", observer=LogPublisher(logged.append))
    return events, clock, logged


def queue_ids(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line)["queue_id"] for line in data.splitlines()]


class CountingWrite:
    """C{os.write}, counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        return self.real(fd, data)


def test_lines_of_a_turn_are_written_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    With C{later}, the events of a reactor turn reach the file at its end,
    in order, in one write; the next turn's in another.
    """
    path = tmp_path / "events.jsonl"
    events, clock, _ = batched(path)
    write = CountingWrite()
    monkeypatch.setattr(os, "write", write)
    try:
        for q in ("Q1", "Q2", "Q3"):
            events.emit("received", queue_id=q)
        assert queue_ids(path) == [] and write.calls == 0
        clock.advance(0)
        assert queue_ids(path) == ["Q1", "Q2", "Q3"] and write.calls == 1
        assert events.unsynced == 3
        events.emit("sent", queue_id="Q4")
        clock.advance(0)
        assert queue_ids(path) == ["Q1", "Q2", "Q3", "Q4"] and write.calls == 2
    finally:
        events.close()


def test_lines_are_written_at_once_past_the_batch_size(tmp_path: Path) -> None:
    """A turn's lines are written as soon as they pass L{EventLog.BATCH_BYTES}, not only at its end."""
    path = tmp_path / "events.jsonl"
    events, clock, _ = batched(path)
    events.BATCH_BYTES = 200
    try:
        events.emit("received", queue_id="Q1")
        assert queue_ids(path) == []
        events.emit("received", queue_id="Q2", diagnostic="d" * 200)
        assert queue_ids(path) == ["Q1", "Q2"]
        clock.advance(0)
        assert queue_ids(path) == ["Q1", "Q2"]
    finally:
        events.close()


def test_flush_and_close_write_what_is_pending(tmp_path: Path) -> None:
    """
    L{EventLog.flush} writes the turn's lines now (the node does so before
    each fsync, and at stop); L{EventLog.close} writes them too.
    """
    path = tmp_path / "events.jsonl"
    events, clock, _ = batched(path)
    events.emit("received", queue_id="Q1")
    events.flush()
    assert queue_ids(path) == ["Q1"] and events.unsynced == 1
    events.emit("received", queue_id="Q2")
    events.close()
    assert queue_ids(path) == ["Q1", "Q2"]
    clock.advance(0)  # the end of the turn finds nothing left to write
    assert queue_ids(path) == ["Q1", "Q2"]


def test_a_failed_batch_keeps_its_whole_lines_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A write error part way through a batch (ENOSPC) leaves the lines that
    were written whole, takes back the part of the line after them, and
    drops the rest of the batch's events, with one log line.
    """
    path = tmp_path / "events.jsonl"
    events, clock, logged = batched(path)
    real = os.write
    written: list[int] = []

    def short_then_full(fd: int, data: Any) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        first = bytes(data).index(b"\n") + 1
        written.append(real(fd, bytes(data)[: first + 10]))  # Q1, and 10 bytes of Q2
        return written[0]

    try:
        events.emit("received", queue_id="Q0")
        clock.advance(0)
        for q in ("Q1", "Q2", "Q3"):
            events.emit("received", queue_id=q)
        monkeypatch.setattr(os, "write", short_then_full)
        clock.advance(0)
        monkeypatch.setattr(os, "write", real)
        assert queue_ids(path) == ["Q0", "Q1"]
        assert events.dropped == 2 and events.unsynced == 2
        errors = [e for e in logged if e["log_level"].name == "error"]
        assert len(errors) == 1 and errors[0]["count"] == 2
        events.emit("received", queue_id="Q4")
        clock.advance(0)
        assert queue_ids(path) == ["Q0", "Q1", "Q4"]
    finally:
        events.close()


def test_without_later_each_line_is_written_at_once(tmp_path: Path) -> None:
    """No C{later} (tools, tests): each event is in the file when C{emit} returns."""
    path = tmp_path / "events.jsonl"
    events = EventLog(path, "n1", clock=lambda: EPOCH)
    try:
        events.emit("received", queue_id="Q1")
        assert queue_ids(path) == ["Q1"] and events.unsynced == 1
    finally:
        events.close()


def test_the_file_and_the_text_log_get_the_same_fields() -> None:
    """
    Fields that are C{None} are left out of both the JSON line and the text
    log event; the text log's format names exactly the fields it has.
    """
    logged: list[dict[str, Any]] = []
    events = EventLog(None, "n1", clock=lambda: EPOCH)
    events.log = Logger(namespace="relaynet.events.EventLog", observer=LogPublisher(logged.append))
    records: list[dict[str, Any]] = []
    events.observers.append(records.append)
    events.emit("received", queue_id="Q1", tls=None, size=5)
    events.emit("received", queue_id="Q2", tls="TLSv1.3 X", size=None)
    assert records == [
        {"time": EPOCH, "node": "n1", "event": "received", "queue_id": "Q1", "size": 5},
        {"time": EPOCH, "node": "n1", "event": "received", "queue_id": "Q2", "tls": "TLSv1.3 X"},
    ]
    assert [e["log_format"] for e in logged] == [
        "{event} queue_id={queue_id} size={size}", "{event} queue_id={queue_id} tls={tls}",
    ]
    assert [e["log_line"] for e in logged] == ["received queue_id=Q1 size=5", "received queue_id=Q2 tls=TLSv1.3 X"]
    # Exactly the event Logger.info would have made of the same arguments.
    for event, record in zip(logged, records):
        expected: list[dict[str, Any]] = []
        log = Logger(namespace=events.log.namespace, source=events.log.source, observer=expected.append)
        log.info(event["log_format"], log_line=event["log_line"], **record)
        assert {**event, "log_time": 0} == {**expected[0], "log_logger": events.log, "log_time": 0}


def test_the_text_log_event_names_the_event_log() -> None:
    """Through the class's logger, the text log event's namespace and source are the event log's."""
    logged: list[dict[str, Any]] = []
    events = EventLog(None, "n1", clock=lambda: EPOCH)
    events.observers.append(lambda record: None)
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(logged.append)
    try:
        events.emit("received", queue_id="Q1")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    mine = [e for e in logged if e.get("log_line") == "received queue_id=Q1"]
    assert len(mine) == 1
    assert mine[0]["log_namespace"] == "relaynet.events.EventLog" and mine[0]["log_source"] is events
