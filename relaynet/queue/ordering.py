# -*- test-case-name: tests.test_counters -*-
"""
The queued messages in arrival order, kept sorted as they come and go.

A queue listing is oldest first: sorting 100,000 entries per request took
the reactor for a third of a second. L{ArrivalOrder} keeps the keys sorted
in blocks of a few hundred (a list of sorted lists, as C{sortedcontainers}
does): adding or removing one costs a binary search and a move within one
block, and reading the first M costs O(M). New messages arrive in time
order, so an add is nearly always an append to the last block.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from itertools import chain
from typing import Iterator

#: An ordering key: C{(arrival, queue id)}.
Key = tuple[float, str]

_LOAD = 512


class ArrivalOrder:
    """A sorted collection of L{Key}s, split into blocks of at most 2 x 512."""

    def __init__(self) -> None:
        self._blocks: list[list[Key]] = []
        self._maxes: list[Key] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: Key) -> None:
        """Insert C{key} (not already present)."""
        self._len += 1
        if not self._blocks:
            self._blocks.append([key])
            self._maxes.append(key)
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            i -= 1
            self._blocks[i].append(key)
            self._maxes[i] = key
        else:
            insort(self._blocks[i], key)
        block = self._blocks[i]
        if len(block) > 2 * _LOAD:
            self._blocks[i:i + 1] = [block[:_LOAD], block[_LOAD:]]
            self._maxes[i:i + 1] = [block[_LOAD - 1], block[-1]]

    def remove(self, key: Key) -> Key:
        """
        Remove C{key}; @raise KeyError: it is not present.

        @return: the key object that was held (equal to C{key}).
        """
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            raise KeyError(key)
        block = self._blocks[i]
        j = bisect_left(block, key)
        if j == len(block) or block[j] != key:
            raise KeyError(key)
        held = block[j]
        del block[j]
        self._len -= 1
        if not block:
            del self._blocks[i]
            del self._maxes[i]
        elif j == len(block):
            self._maxes[i] = block[-1]
        return held

    def first(self) -> Key | None:
        """The smallest key (the oldest message), or C{None}."""
        return self._blocks[0][0] if self._blocks else None

    def __iter__(self) -> Iterator[Key]:
        """The keys in order (do not add or remove while iterating)."""
        for block in self._blocks:
            yield from block

    def after(self, key: Key) -> Iterator[Key]:
        """The keys greater than C{key}, in order (do not add or remove while iterating)."""
        i = bisect_right(self._maxes, key)
        if i == len(self._blocks):
            return
        block = self._blocks[i]
        yield from block[bisect_right(block, key):]
        for block in self._blocks[i + 1:]:
            yield from block

    def count_after(self, key: Key) -> int:
        """How many keys are greater than C{key}: O(blocks), about 2,000 at 1,000,000 keys."""
        i = bisect_right(self._maxes, key)
        if i == len(self._blocks):
            return 0
        below = sum(len(b) for b in self._blocks[:i]) + bisect_right(self._blocks[i], key)
        return self._len - below

    def keys(self) -> list[Key]:
        """The keys in order, as a new list (copied at C speed)."""
        return list(chain.from_iterable(self._blocks))
