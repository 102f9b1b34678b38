# -*- test-case-name: tests.test_scheduler -*-
"""
Retry policy, pure: how long to wait before the next delivery attempt.

Defaults follow Postfix: the first retry after C{minimal_backoff} (300 s), the
delay doubling with each attempt up to C{maximal_backoff} (4000 s), with
jitter so that messages deferred together do not come back together.
"""

from __future__ import annotations

import random
from typing import Callable

from attrs import frozen


@frozen
class RetryPolicy:
    """
    Exponential backoff with jitter.

    @ivar minimal_backoff: delay after the first failed attempt, seconds.
    @ivar maximal_backoff: the cap, seconds.
    @ivar jitter: fraction of the delay randomised (0.1: +-10%).
    @ivar lifetime: after this long in the queue a message expires, seconds.
    """

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    jitter: float = 0.1
    lifetime: float = 5 * 86400.0

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """
        The wait after C{attempts} failed attempts (C{attempts >= 1}).

        @param rand: a source of uniform numbers in [0, 1), injected by tests.
        """
        factor: int = 2 ** max(0, attempts - 1)
        base = self.minimal_backoff * factor
        base = min(base, self.maximal_backoff)
        return max(0.0, base * (1 + self.jitter * (2 * rand() - 1)))

    def expired(self, arrival: float, now: float) -> bool:
        """C{True} once a message that arrived at C{arrival} is past its lifetime."""
        return now - arrival >= self.lifetime
