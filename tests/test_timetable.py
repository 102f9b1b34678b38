"""Tests for L{relaynet.queue.timetable.Timetable}, on a L{task.Clock}."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger

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


# -- stale heap tuples are bounded -------------------------------------------


def heap_bound(table: Timetable) -> int:
    """How many heap tuples a timetable may hold for its live keys."""
    return max(64, 2 * len(table))


@pytest.mark.parametrize("step", [10.0, -10.0], ids=["later", "earlier"])
def test_rescheduling_many_keys_keeps_the_heap_bounded(step: float) -> None:
    """
    Rescheduling 1000 keys five times, later or earlier, while an earlier
    key stays due first, leaves a heap of the order of the live keys (not
    6000 tuples, 5000 of them stale), and every key still fires once, at its
    last time.
    """
    h = Harness(room=10_000)
    h.table.set("first", 1)
    worst = 0
    for round in range(5):
        for i in range(1000):
            h.table.set(f"k{i}", 500 + round * step + i * 0.01)
            worst = max(worst, len(h.table._heap) - heap_bound(h.table))
    assert worst <= 0
    assert len(h.table._heap) <= heap_bound(h.table)
    h.clock.advance(1)
    assert h.fired == ["first"]
    h.clock.advance(1000)
    assert sorted(h.fired[1:]) == sorted(f"k{i}" for i in range(1000))
    assert len(h.table) == 0 and h.table._heap == [] and h.clock.getDelayedCalls() == []


def test_cancelling_most_keys_shrinks_the_heap() -> None:
    """Cancelled keys' tuples do not stay in the heap once they outnumber the live ones."""
    h = Harness()
    h.table.set("first", 1)
    for i in range(1000):
        h.table.set(f"k{i}", 100 + i)
    for i in range(990):
        h.table.cancel(f"k{i}")
    assert len(h.table) == 11
    assert len(h.table._heap) <= heap_bound(h.table)
    h.clock.advance(2000)
    assert h.fired == ["first"] + [f"k{i}" for i in range(990, 1000)]


def test_keys_due_at_one_instant_fire_in_key_order() -> None:
    """Keys due at the same instant fire in key order, whatever order they were set in."""
    h = Harness()
    for key in ("q3", "q1", "q2"):
        h.table.set(key, 5)
    h.clock.advance(5)
    assert h.fired == ["q1", "q2", "q3"]


def test_heap_rebuilt_while_firing() -> None:
    """
    A rebuild of the heap caused by C{fire} (which reschedules keys) does
    not lose the keys the same kick still has to fire.
    """
    h = Harness()
    for i in range(50):
        h.table.set(f"due{i:02d}", 10)
    for j in range(100):
        h.table.set(f"later{j}", 1000 + j)

    def fire(key: str) -> None:
        h.fired.append(key)
        if key.startswith("due"):
            for j in range(100):
                h.table.set(f"later{j}", 990 + j)

    h.table._fire = fire
    h.clock.advance(10)
    assert h.fired == [f"due{i:02d}" for i in range(50)]
    assert len(h.table._heap) <= heap_bound(h.table)
    assert h.table.due("later0") == 1000
    h.clock.advance(1100)
    assert h.fired[50:] == [f"later{j}" for j in range(100)]


# -- a kick leaves no key without a timer -------------------------------------


def test_fire_raising_does_not_stop_later_keys() -> None:
    """
    If C{fire} raises for one key, the error is logged with the key and the
    timetable carries on: other keys due now fire, and later keys fire at
    their time (the timer is armed again).
    """
    h = Harness()
    logged: list[dict[str, Any]] = []
    h.table.log = Logger(observer=logged.append)

    def fire(key: str) -> None:
        h.fired.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    h.table._fire = fire
    h.table.set("bad", 10)
    h.table.set("good", 10)
    h.table.set("later", 20)
    h.clock.advance(10)
    assert h.fired == ["bad", "good"]
    h.clock.advance(10)
    assert h.fired == ["bad", "good", "later"]
    [event] = logged
    assert event["key"] == "bad" and event["log_failure"].check(RuntimeError)


def test_fire_raising_when_set_due_now() -> None:
    """A key set due now whose C{fire} raises neither raises to the caller nor stops the timer."""
    h = Harness()
    h.table.log = Logger(observer=lambda event: None)

    def fire(key: str) -> None:
        h.fired.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    h.table._fire = fire
    h.table.set("later", 5)
    h.table.set("bad", 0)
    assert h.fired == ["bad"]
    h.clock.advance(5)
    assert h.fired == ["bad", "later"]


def test_key_due_during_a_kick_still_fires() -> None:
    """
    A key that falls due while earlier keys fire (time passes on a real
    clock) fires too, and keys after it keep their timer. (It was left in
    the heap with no timer: due, so not waited for; not due when the loop
    looked, so not fired.)
    """
    h = Harness()

    def fire(key: str) -> None:
        h.fired.append(key)
        h.clock.rightNow += 1.0  # firing takes a second (without running timers)

    h.table._fire = fire
    h.table.set("a", 10)
    h.table.set("b", 10.5)
    h.table.set("c", 30)
    h.clock.advance(10)
    h.clock.advance(0)
    assert h.fired == ["a", "b"]
    h.clock.advance(30)
    assert h.fired == ["a", "b", "c"]


def test_cancel_of_the_last_key_while_firing() -> None:
    """
    C{fire} cancelling the last other key empties the timetable (C{clear})
    in the middle of a kick; keys set afterwards, in the same C{fire} or
    later, still fire at their time.
    """
    h = Harness()

    def fire(key: str) -> None:
        h.fired.append(key)
        if key == "a":
            h.table.cancel("b")
            assert len(h.table) == 0
            h.table.set("c", 5)

    h.table._fire = fire
    h.table.set("a", 10)
    h.table.set("b", 20)
    h.clock.advance(10)
    assert h.fired == ["a"] and h.table.due("c") == 15
    h.clock.advance(5)
    assert h.fired == ["a", "c"]
    h.table.set("d", 1)
    h.clock.advance(1)
    assert h.fired == ["a", "c", "d"]


def test_fire_setting_a_key_due_now() -> None:
    """A key that C{fire} sets due now fires in the same kick, if there is room."""
    h = Harness()

    def fire(key: str) -> None:
        h.fired.append(key)
        if key == "a":
            h.table.set("again", 0)

    h.table._fire = fire
    h.table.set("a", 10)
    h.clock.advance(10)
    assert h.fired == ["a", "again"]


def test_due_key_without_room_gets_no_timer() -> None:
    """
    A due key waits for C{kick} while there is no room (no timer spins);
    a later key keeps its own timer.
    """
    h = Harness(room=0)
    h.table.set("a", 0)
    h.table.set("b", 50)
    assert h.fired == []
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == []
    h.room = 5
    h.table.kick()
    assert h.fired == ["a"]
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [50]
    h.clock.advance(50)
    assert h.fired == ["a", "b"]


def test_one_kick_fires_at_most_fire_per_turn_keys() -> None:
    """
    Keys whose attempts end at once (a next hop known to be down) give their
    room back while the kick runs: one kick still fires at most
    C{FIRE_PER_TURN} of them, and the rest on the next reactor turns, so a
    restart with a backlog of such messages all due does not hold the
    reactor until every one has fired.
    """
    clock = Clock()
    fired: list[str] = []
    room = [False]
    table = Timetable(clock, fired.append, lambda: room[0])
    table.FIRE_PER_TURN = 100
    for i in range(250):
        table.set(f"K{i:03}", 0.0)
    assert fired == []  # no room yet
    room[0] = True
    table.kick()
    assert fired == [f"K{i:03}" for i in range(100)]
    # The rest on a timer due at once (a later reactor turn).
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == clock.seconds()
    clock.advance(0)
    assert fired == [f"K{i:03}" for i in range(250)] and len(table) == 0
    assert not clock.getDelayedCalls()


def test_set_many_fires_nothing_before_the_next_turn() -> None:
    """
    C{set_many} (a batch of recovered messages) schedules every key as
    C{set} would, but fires none while it runs: the due ones fire from a
    timer due at once (the next reactor turn), in due order; a later one at
    its time.
    """
    clock = Clock()
    fired: list[str] = []
    table = Timetable(clock, fired.append, lambda: True)
    table.set_many([("late", 5.0), ("b", 0.0), ("a", -3.0), ("c", 0.0)])
    assert fired == [] and len(table) == 4
    assert [c.getTime() for c in clock.getDelayedCalls()] == [0.0]
    clock.advance(0)
    assert fired == ["a", "b", "c"]
    clock.advance(5)
    assert fired == ["a", "b", "c", "late"] and not clock.getDelayedCalls()


def test_new_mail_and_older_due_mail_fire_in_turn_new_first() -> None:
    """
    While older keys are due (a recovered backlog), keys that C{arrive}
    (mail just accepted) fire in turn with them, new mail first, as
    Postfix's queue manager takes one incoming and one deferred message in
    turn; each lane keeps its own order. Without the lane, new mail fired
    after every older due key.
    """
    h = Harness(room=0)
    for i in range(5):
        h.table.set(f"old{i}", 0)
    h.clock.advance(1)
    h.table.arrive("new0")
    h.table.arrive("new1")
    assert h.fired == []  # no room: both lanes wait
    h.room = 6
    h.table.kick()
    assert h.fired == ["new0", "old0", "new1", "old1", "old2", "old3"]
    h.room = 10
    h.table.kick()
    assert h.fired[6:] == ["old4"] and len(h.table) == 0


def test_new_mail_fires_at_once_when_there_is_room() -> None:
    """
    With room, a key that arrives fires in the same call (no reactor turn
    in between: the hot path of every accepted message); a later key of the
    heap keeps its timer.
    """
    h = Harness()
    h.table.set("later", 30)
    h.table.arrive("new")
    assert h.fired == ["new"]
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [30]


def test_new_mail_waits_for_room_without_a_timer_then_fires_first() -> None:
    """
    Without room, new mail waits (no timer spins) and fires at the next kick
    with room, ahead of older due keys; a new key not yet due in the heap
    (a key set for later) does not overtake.
    """
    h = Harness(room=0)
    h.table.set("old", 0)
    h.table.set("later", 60)
    h.table.arrive("new")
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == []
    h.room = 1
    h.table.kick()
    assert h.fired == ["new"]
    h.room = 1
    h.table.kick()
    assert h.fired == ["new", "old"]
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [60]


def test_new_mail_rescheduled_or_cancelled_leaves_its_lane() -> None:
    """
    A key that arrived and is then set for later (a hold, a shaping delay)
    fires at its new time only, once; one cancelled never fires; C{clear}
    empties the lane of new mail too.
    """
    h = Harness(room=0)
    h.table.arrive("moved")
    h.table.arrive("gone")
    h.table.arrive("stays")
    h.table.set("moved", 10)
    h.table.cancel("gone")
    assert h.table.due("moved") == 10 and "gone" not in h.table
    h.room = 10
    h.table.kick()
    assert h.fired == ["stays"]
    h.clock.advance(10)
    assert h.fired == ["stays", "moved"] and len(h.table) == 0
    h.room = 0
    h.table.arrive("x")
    h.table.clear()
    h.room = 1
    h.table.kick()
    assert h.fired == ["stays", "moved"] and len(h.table) == 0


def test_a_lane_of_new_mail_with_stale_tuples_is_rebuilt() -> None:
    """
    New mail cancelled over and over while there is no room (an admin
    deleting what arrives) leaves no more than a bounded number of stale
    tuples; the live keys keep their lanes and their order.
    """
    h = Harness(room=0)
    for i in range(3):
        h.table.set(f"old{i}", 0)
    for i in range(1000):
        h.table.arrive(f"n{i}")
        if i % 10:
            h.table.cancel(f"n{i}")
    live = len(h.table)
    assert live == 3 + 100
    assert len(h.table._fresh) + len(h.table._heap) <= max(Timetable.COMPACT_MIN, 2 * live) + 1
    h.room = 6
    h.table.kick()
    assert h.fired == ["n0", "old0", "n10", "old1", "n20", "old2"]
    h.room = 1000
    h.table.kick()
    assert h.fired[6:] == [f"n{i}" for i in range(30, 1000, 10)] and len(h.table) == 0
