# -*- test-case-name: tests.test_timetable -*-
"""
When each queued message is next due: one heap and one reactor timer for a
whole queue, instead of a C{DelayedCall} per message.

A deferred backlog of 100,000 messages held 100,000 C{DelayedCall}s (each an
object with its own dict and argument tuple, ~0.5 KB, and a slot in the
reactor's own heap); here a message costs one tuple (in the heap and in a
dict) and one dict entry.
The timetable also meters the firing: due messages wait in the heap until the
runner says it has room (C{ready}), so a flush of the whole queue starts as
many attempts as the runner runs at once, not 100,000 Deferreds.

New mail has a lane of its own (L{Timetable.arrive}): when both new mail and
older mail (retries, a recovered backlog, a flush) are due, they fire in
turn, new mail first, as Postfix's queue manager feeds its active queue one
message from its incoming queue and one from its deferred queue in turn
("when the system is under heavy load, favor new mail over old mail",
qmgr.c). Without it, a message accepted just after a restart on a backlog
of 1,000,000 due messages waited behind all of them: minutes.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class Timetable:
    """
    Due times by key (queue id), firing C{fire(key)} for keys that are due
    while C{ready()} holds.

    Rescheduling or cancelling a key leaves its old tuple behind, in the
    heap or in the lane of new mail (stale: it no longer matches C{_due});
    stale tuples are dropped when they reach the top or the front, and both
    are rebuilt from the live keys whenever together they hold more than 64
    tuples and more than twice as many as there are keys, so a queue whose
    messages are rescheduled again and again keeps a heap of the order of
    its size.

    A C{fire} that raises is logged and does not stop the others; after a
    kick the timer is always armed for the earliest key that is not due yet,
    or, if a key fell due while the kick ran and there is room, to kick again
    at once. A key that is due while there is no room waits for the next
    C{kick} (the runner kicks when an attempt ends) with no timer spinning.
    """

    log = Logger()

    COMPACT_MIN = 64
    """Below this many tuples (heap and lane of new mail) neither is ever rebuilt."""

    FIRE_PER_TURN = 500
    """
    Keys fired by one kick at most; the rest of what is due fires on the
    next reactor turns. Attempts that end at once (a next hop known to be
    down defers its mail without a connection) give their slot back while
    the kick runs: after a restart with a backlog of 500,000 such messages
    due, one kick fired them all, holding the reactor for about a hundred
    seconds (no admin request, no new session served meanwhile).
    """

    def __init__(self, clock: IReactorTime, fire: Callable[[str], None], ready: Callable[[], bool]) -> None:
        self._clock = clock
        self._fire = fire
        self._ready = ready
        # key -> its heap tuple C{(due, key)}: the same object, so
        # a key costs one tuple, and a heap tuple is live when it is the one
        # its key maps to.
        self._due: dict[str, tuple[float, str]] = {}
        # Changed in place only (a kick in progress reads it while fire()
        # may reschedule, cancel or clear).
        # Keys due at the same instant fire in key order: no sequence number
        # per key (an int object, 32 bytes a queued message). The reactor's
        # clock tells apart keys scheduled one after the other.
        self._heap: list[tuple[float, str]] = []
        # New mail (L{arrive}), due now, in order of arrival; its tuples are
        # live as the heap's are. Whose turn it is when both lanes have a
        # key due: new mail's first.
        self._fresh: deque[tuple[float, str]] = deque()
        self._fresh_turn = True
        self._timer: IDelayedCall | None = None
        self._firing = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def due(self, key: str) -> float | None:
        """When C{key} is due (reactor seconds), or C{None} if it is not scheduled."""
        slot = self._due.get(key)
        return None if slot is None else slot[0]

    def set(self, key: str, delay: float) -> None:
        """Make C{key} due C{delay} seconds from now (replacing an earlier time)."""
        slot = (self._clock.seconds() + max(0.0, delay), key)
        self._due[key] = slot
        heapq.heappush(self._heap, slot)
        self._compact()
        if delay <= 0:
            self.kick()
        else:
            self._arm()

    def arrive(self, key: str) -> None:
        """
        Make C{key}, a message just accepted, due now in the lane of new
        mail: while older keys are due too, the two lanes fire in turn, new
        mail first (see the module's docstring); it fires in this turn if
        there is room, as L{set} with no delay does.
        """
        slot = (self._clock.seconds(), key)
        self._due[key] = slot
        self._fresh.append(slot)
        self._compact()
        self.kick()

    def set_many(self, delays: Iterable[tuple[str, float]]) -> None:
        """
        Make each C{key} due C{delay} seconds from now, as L{set} does, but
        fire nothing now: what is due fires from the next reactor turn on
        (L{FIRE_PER_TURN} a turn). For a batch of recovered messages, whose
        loading is not held up by their attempts.
        """
        now = self._clock.seconds()
        due = self._due
        heap = self._heap
        for key, delay in delays:
            slot = (now + max(0.0, delay), key)
            due[key] = slot
            heapq.heappush(heap, slot)
        self._compact()
        self._arm()

    def cancel(self, key: str) -> None:
        """Forget C{key}'s due time (its heap tuple is dropped when reached)."""
        self._due.pop(key, None)
        if not self._due:
            self.clear()
        else:
            self._compact()

    def clear(self) -> None:
        """Forget everything and stop the timer."""
        self._due.clear()
        self._heap.clear()
        self._fresh.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def kick(self) -> None:
        """
        Fire the keys that are due, for as long as C{ready()} allows and up
        to L{FIRE_PER_TURN}, then arm the timer (at once if due keys are
        left). A C{fire} that raises is logged, with its key.
        """
        if self._firing:
            return
        self._firing = True
        fired = 0
        try:
            heap = self._heap
            fresh = self._fresh
            while fired < self.FIRE_PER_TURN:
                self._drop_stale()  # cancelled or rescheduled
                new = fresh[0] if fresh else None
                # Time passes while keys fire: read the clock for each.
                old = heap[0] if heap and heap[0][0] <= self._clock.seconds() else None
                if new is None and old is None:
                    break
                if not self._ready():
                    break
                if new is not None and (old is None or self._fresh_turn):
                    fresh.popleft()
                    key = new[1]
                    self._fresh_turn = False
                elif old is not None:
                    heapq.heappop(heap)
                    key = old[1]
                    self._fresh_turn = True
                else:  # pragma: no cover (new or old is set)
                    break
                del self._due[key]
                fired += 1
                try:
                    self._fire(key)
                except Exception:
                    self.log.failure("Firing {key} failed", key=key)
        finally:
            self._firing = False
            self._compact()
            self._arm()

    def _drop_stale(self) -> None:
        """Pop stale tuples off the top of the heap and the front of the lane of new mail."""
        due = self._due
        heap = self._heap
        while heap:
            top = heap[0]
            if due.get(top[1]) is top:
                break
            heapq.heappop(heap)
        fresh = self._fresh
        while fresh:
            first = fresh[0]
            if due.get(first[1]) is first:
                break
            fresh.popleft()

    def _compact(self) -> None:
        """Rebuild the heap (or the lane of new mail) from the live keys when stale tuples dominate it."""
        heap = self._heap
        fresh = self._fresh
        due = self._due
        held = len(heap) + len(fresh)
        if held <= self.COMPACT_MIN or held <= 2 * len(due):
            return
        live = [slot for slot in fresh if due.get(slot[1]) is slot]
        fresh.clear()
        fresh.extend(live)
        if live:
            new = {id(slot) for slot in live}
            heap[:] = [slot for slot in due.values() if id(slot) not in new]
        else:
            heap[:] = due.values()
        heapq.heapify(heap)

    def _arm(self) -> None:
        """
        Keep one timer: for the earliest due time still in the future, or at
        once for a key already due if there is room (a kick arms it when it
        is done).
        """
        if self._firing:
            return
        self._drop_stale()
        if not self._heap and not self._fresh:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        now = self._clock.seconds()
        earliest = now if self._fresh else self._heap[0][0]
        if earliest <= now and not self._ready():
            # Due already but no room: L{kick} runs when the runner has room.
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= earliest:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, earliest - now), self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.kick()
