# -*- test-case-name: tests.test_queue -*-
"""
The names of queue states, defined once.

A recipient's status is what the spool records per recipient
(L{RecipientStatus}); a message's queue state is what C{relaynet queue}
shows (L{MessageState}, derived, never stored); an outcome's event is what
the event log says happened in one attempt (L{OutcomeEvent}). All three are
C{StrEnum}s: their members are the strings written to disk, JSON and logs.
L{QueueTotals} is what the queue reports of itself for metrics and summaries.

This module imports attrs only (no Twisted): C{relaynet queue} and the admin
views read it cheaply.
"""

from __future__ import annotations

import enum
from typing import Mapping

from attrs import field, frozen


class RecipientStatus(enum.StrEnum):
    """
    The recorded status of one recipient of a queued message.

    C{pending}: not attempted yet; C{deferred}: the last attempt failed
    transiently (retry later); C{delivered}: written into a local Maildir;
    C{relayed}: a next hop took it; C{bounced}: failed permanently (or
    expired, or returned by the administrator).
    """

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    BOUNCED = "bounced"

    @property
    def final(self) -> bool:
        """Nothing more is to be done for a recipient in this status."""
        return self in _FINAL


_FINAL = frozenset({RecipientStatus.DELIVERED, RecipientStatus.RELAYED, RecipientStatus.BOUNCED})
FINAL_STATUSES: tuple[RecipientStatus, ...] = tuple(sorted(_FINAL))
"""The statuses that end a recipient's life in the queue."""


class MessageState(enum.StrEnum):
    """
    The queue state of a message, as C{relaynet queue} and the admin API
    show it (Postfix's queue names): C{active} (an attempt is running),
    C{hold}, C{deferred} (some recipient was deferred), C{incoming} (not
    attempted yet).
    """

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"


class OutcomeEvent(enum.StrEnum):
    """The event one attempt's outcome logs for a recipient (docs/events.md)."""

    DELIVERED = "delivered"
    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"


@frozen
class QueueTotals:
    """
    Totals over every queued message, for the metrics.

    @ivar size: octets of the queued messages (their envelope sizes).
    @ivar recipients: recipients of the queued messages by status (C{pending}
        when never attempted, then C{deferred}, C{delivered}...: the statuses
        of the state files); a final recipient counts until its message
        leaves the queue.
    @ivar oldest_arrival: the arrival time (seconds since the epoch) of the
        oldest queued message; C{None} when the queue is empty.
    @ivar oldest_id: the queue id of that message.
    @ivar messages: how many messages are queued.
    @ivar pending: recipients not final yet (pending or deferred).
    """

    size: int = 0
    recipients: Mapping[str, int] = field(factory=dict)
    oldest_arrival: float | None = None
    oldest_id: str | None = None
    messages: int = 0
    pending: int = 0
