# -*- test-case-name: tests.test_egress -*-
"""
Egress pools: the source addresses a route's (or a token's) connections
leave from, spread by weight, as a high-volume sender's dedicated IPs.

 - Spreading is smooth weighted round robin (the algorithm of nginx's
   upstream balancer): with weights 3 and 1 the addresses go A A B A, A A B
   A, ...; every address gets its share in every window of (sum of
   weights) connections, not only on average, and no random number is
   drawn. One L{EgressPool} per named pool, shared by every next hop, so
   the spread holds over all of the pool's connections.
 - An address that cannot be bound (C{EADDRNOTAVAIL}: not configured on
   this host; C{ConnectBindError}) is skipped for L{EgressPool.RETRY}
   seconds; the caller emits an C{egress_unavailable} event and tries the
   next address at once. When every address is out, the least recently
   failed one is tried again (mail never stops because of a pool).
 - L{EgressPool.used} counts the connections made from each address (the
   metrics' C{relaynet_egress_connections_total}).

Pure: no reactor, no socket; time is passed in.
"""

from __future__ import annotations

from typing import Sequence


class EgressPool:
    """
    The addresses of one pool and where the spreading is.

    @ivar RETRY: seconds an address that could not be bound is left out.
    """

    RETRY = 300.0

    def __init__(self, name: str, addresses: Sequence[tuple[str, int]]) -> None:
        """
        @param addresses: C{(address, weight)}, weights >= 1.
        @raise ValueError: no address, or a weight below 1.
        """
        if not addresses:
            raise ValueError(f"egress pool {name!r} has no address")
        if any(w < 1 for _, w in addresses):
            raise ValueError(f"egress pool {name!r}: weights are 1 or more")
        self.name = name
        self.addresses = tuple(addresses)
        self._current = {a: 0 for a, _ in self.addresses}
        self._down: dict[str, float] = {}
        self.used: dict[str, int] = {a: 0 for a, _ in self.addresses}

    def choose(self, now: float) -> str:
        """
        The address for the next connection (smooth weighted round robin over
        the addresses that are not left out at C{now}).
        """
        usable = [(a, w) for a, w in self.addresses if self._down.get(a, 0.0) <= now]
        if not usable:
            # Every address failed lately: the one that failed first goes again.
            return min(self._down, key=lambda a: self._down[a])
        total = sum(w for _, w in usable)
        for a, w in usable:
            self._current[a] += w
        best = max(usable, key=lambda aw: self._current[aw[0]])[0]
        self._current[best] -= total
        return best

    def connected(self, address: str) -> None:
        """A connection from C{address} was made."""
        self.used[address] = self.used.get(address, 0) + 1
        self._down.pop(address, None)

    def unavailable(self, address: str, now: float) -> None:
        """C{address} could not be bound: left out for L{RETRY} seconds."""
        self._down[address] = now + self.RETRY

    def down(self, now: float) -> list[str]:
        """The addresses left out at C{now}."""
        return sorted(a for a, until in self._down.items() if until > now)


__all__ = ["EgressPool"]
