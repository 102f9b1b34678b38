# -*- test-case-name: tests.test_counters -*-
"""
Counters over the whole queue, kept up to date as messages change.

The status page, C{/metrics} and C{relaynet queue summary} show totals of
the queue: messages by queue state, octets, recipients by status,
destination domains and deferral reasons. Walking 100,000 entries for each
request stalled the reactor (and so intake) for up to half a second; the
queue core (L{relaynet.queue.core.QueueCore}) instead takes a message's
share out of a L{QueueTally} before it changes the message and puts it back
after, so a request reads counters.

A message's share (L{QueueTally.count}) depends only on its queue state,
its envelope and its recorded recipient states, which only the core
changes. C{tests/test_counters.py} recomputes the counters by walking the
queue after random operations and compares.
"""

from __future__ import annotations

import heapq

from relaynet.queue.spool import QueueEntry
from relaynet.queue.states import MessageState, RecipientStatus

#: A deferral reason is the first 200 characters of the last diagnostic.
REASON_LENGTH = 200


def domain_of(address: str) -> str:
    """The destination domain a summary counts C{address} under."""
    return address.rpartition("@")[2].lower() or "(none)"


def reason_of(diagnostic: str | None, dsn: str | None) -> str:
    """The deferral reason a summary counts a deferred recipient under."""
    return (diagnostic or dsn or "unknown")[:REASON_LENGTH]


class QueueTally:
    """
    Totals over the queued messages.

    @ivar states: messages by L{MessageState} (every state, zeros included).
    @ivar size: octets of the queued messages.
    @ivar recipients: recipients of queued messages by status (a final
        recipient counts until its message leaves); only non-zero statuses.
    @ivar pending: recipients not final yet (pending or deferred).
    @ivar destinations: by destination domain of the non-final recipients,
        C{[recipients, messages]}; only domains with some.
    @ivar reasons: deferred recipients by L{reason_of}; only non-zero.
    """

    def __init__(self) -> None:
        self.states: dict[str, int] = {str(s): 0 for s in MessageState}
        self.size = 0
        self.recipients: dict[str, int] = {}
        self.pending = 0
        self.destinations: dict[str, list[int]] = {}
        self.reasons: dict[str, int] = {}

    def count(self, entry: QueueEntry, state: MessageState, sign: int) -> None:
        """
        Add (C{sign} 1) or take out (-1) the share of C{entry} in state
        C{state}. Taking out must see the entry as it was when it was added.
        """
        self.states[state] += sign
        env = entry.envelope
        self.size += sign * env.size
        recorded = entry.state.recipients
        seen: set[str] = set()
        for r in env.recipients:
            st = recorded.get(r.address)
            status = st.status if st is not None else RecipientStatus.PENDING
            _bump(self.recipients, str(status), sign)
            if status.final:
                continue
            self.pending += sign
            d = domain_of(r.address)
            row = self.destinations.get(d)
            if row is None:
                row = self.destinations[d] = [0, 0]
            row[0] += sign
            if d not in seen:
                seen.add(d)
                row[1] += sign
            if not row[0]:
                del self.destinations[d]
            if status is RecipientStatus.DEFERRED and st is not None:
                _bump(self.reasons, reason_of(st.diagnostic, st.dsn), sign)

    def top_destinations(self, n: int) -> list[tuple[str, int, int]]:
        """
        The C{n} domains with the most non-final recipients: C{(domain,
        recipients, messages)}, most first, then by name. Costs O(domains),
        not O(messages).
        """
        rows = heapq.nsmallest(n, self.destinations.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return [(d, v[0], v[1]) for d, v in rows]

    def top_reasons(self, n: int) -> list[tuple[str, int]]:
        """The C{n} most frequent deferral reasons: C{(reason, recipients)}; O(reasons)."""
        return heapq.nsmallest(n, self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))


def _bump(counts: dict[str, int], key: str, sign: int) -> None:
    n = counts.get(key, 0) + sign
    if n:
        counts[key] = n
    else:
        del counts[key]
