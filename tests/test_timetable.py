"""Tests for L{relaynet.queue.timetable.Timetable}, on a L{task.Clock}."""

from __future__ import annotations

from twisted.internet.task import Clock

from relaynet.queue.timetable import Timetable


class Harness:
    def __init__(self, room: int = 1000) -> None:
        self.clock = Clock()
        self.fired: list[str] = []
        self.room = room
        self.table = Timetable(self.clock, self.fire, lambda: self.room > 0)

    def fire(self, key: str) -> None:
        self.fired.append(key)
        self.room -= 1


def test_fires_in_due_order_with_one_timer() -> None:
    """Keys fire when due, earliest first, from a single reactor timer."""
    h = Harness()
    h.table.set("c", 30)
    h.table.set("a", 10)
    h.table.set("b", 20)
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(9.9)
    assert h.fired == []
    h.clock.advance(0.1)
    assert h.fired == ["a"]
    h.clock.advance(25)
    assert h.fired == ["a", "b", "c"]
    assert len(h.table) == 0 and h.clock.getDelayedCalls() == []


def test_reschedule_and_cancel() -> None:
    """A new time replaces the old one; a cancelled key never fires."""
    h = Harness()
    h.table.set("a", 10)
    h.table.set("b", 10)
    h.table.set("a", 50)
    h.table.cancel("b")
    assert "b" not in h.table and h.table.due("a") == 50
    h.clock.advance(10)
    assert h.fired == []
    h.clock.advance(40)
    assert h.fired == ["a"]


def test_due_now_fires_at_once() -> None:
    h = Harness()
    h.table.set("a", 0)
    assert h.fired == ["a"]


def test_metered_by_ready() -> None:
    """
    Due keys wait while there is no room, and C{kick} starts them as room
    appears, oldest due first (a flush of a large queue starts a few at a time).
    """
    h = Harness(room=2)
    for i in range(5):
        h.table.set(f"m{i}", 0)
    assert h.fired == ["m0", "m1"] and len(h.table) == 3
    h.room = 1
    h.table.kick()
    assert h.fired == ["m0", "m1", "m2"]
    h.room = 10
    h.clock.advance(100)  # no timer for keys already due: only kick starts them
    assert h.fired == ["m0", "m1", "m2"]
    h.table.kick()
    assert h.fired == ["m0", "m1", "m2", "m3", "m4"]


def test_stale_entries_do_not_accumulate() -> None:
    """Rescheduling one key many times keeps the heap near the number of keys."""
    h = Harness()
    h.table.set("other", 1e6)
    for i in range(10_000):
        h.table.set("a", 100 + i)
        h.table.kick()
    assert len(h.table._heap) < 200
    h.clock.advance(100 + 9_999)
    assert h.fired == ["a"]


def test_clear_stops_the_timer() -> None:
    h = Harness()
    h.table.set("a", 5)
    h.table.clear()
    assert h.clock.getDelayedCalls() == [] and len(h.table) == 0
    h.clock.advance(10)
    assert h.fired == []
