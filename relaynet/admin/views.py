# -*- test-case-name: tests.test_control,tests.test_metrics -*-
"""
What the admin API, the status page and the metrics may read of a node: narrow
views they are given, never the node, its runner or its intake.

 - L{QueueStats}: how much is queued (the metrics' gauges, the status history).
 - L{QueueView}: L{QueueStats} plus listing and steering messages (the admin
   API and the status page, and so C{relaynet queue}).
 - L{SessionsView}: the open SMTP sessions.
 - L{NodeFacts}: who the node is, the configuration in force (L{NodeIdentity}),
   reloading it.
 - L{SuppressionView}: the suppression list (C{relaynet suppress}).

They are L{typing.Protocol}s: the queue runner provides L{QueueView} by
having its methods, the node provides L{NodeFacts} by having its attributes,
and tests give small fakes. L{relaynet.admin.adapters} adapts the intake.
L{QueueTotals} is the queue's (L{relaynet.queue.states}).

At run time this module imports only the queue's state names (attrs, no
Twisted), so C{relaynet queue} may read L{STATES} without importing Twisted
or prometheus_client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from relaynet.queue.states import MessageState, QueueTotals as QueueTotals

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from relaynet.config import NodeConfig
    from relaynet.queue.spool import QueueEntry
    from relaynet.queue.suppression import Suppression

#: The queue states of a message, as L{QueueStats.counts} and the API name them.
STATES: tuple[str, ...] = tuple(str(s) for s in MessageState)


class QueueStats(Protocol):
    """
    How much is queued: all the metrics read of the queue. Both are read
    from counters the queue keeps up to date: O(1), however long the queue.
    """

    def counts(self) -> Mapping[str, int]:
        """Queued messages by state: each of L{STATES}, zeros included."""

    def totals(self) -> QueueTotals:
        """Octets, recipients by status and the oldest arrival of the queue."""


class QueueView(QueueStats, Protocol):
    """
    The queue as the admin API sees it: L{QueueStats}, finding and describing
    messages, and acting on them. Filters are those of L{matching}.

    Actions on a message while an attempt of it runs may be applied after
    the attempt: their L{Deferred} fires then.
    """

    def __contains__(self, queue_id: str) -> bool:
        """Whether C{queue_id} is queued."""

    def matching(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[QueueEntry]:
        """
        Queued messages, oldest first, filtered by state, sender or recipient
        (substring, case-insensitive), recipient domain and minimum age in
        seconds.
        """

    def page(
        self, limit: int | None, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
        after: tuple[float, str] | None = None,
    ) -> Deferred[tuple[int, list[QueueEntry]]]:
        """
        How many messages L{matching} would return, and the first C{limit}
        of them (all if C{None}). With no filter but C{state} this costs
        O(limit), not O(queue); envelope filters run off the reactor. With
        C{after} (C{(arrival, queue id)} of a page's last message), only the
        messages after it are counted and listed.
        """

    def collect(
        self, each: Callable[[dict[str, Any]], object], state: str | None = None,
        sender: str | None = None, recipient: str | None = None, domain: str | None = None,
        min_age: float | None = None,
    ) -> Deferred[None]:
        """
        Call C{each} with the summary of every message L{list} would
        return, oldest first, a slice of messages per reactor turn, so that
        the reactor is never held for the whole queue (filtered summaries,
        shapes); the Deferred fires after the last.
        """

    def summary(self, top: int = 10) -> dict[str, Any]:
        """
        The summary of the whole queue (C{GET /api/summary} without filters;
        C{docs/admin-api.md}) with C{top} rows per list, from the queue's
        counters: no walk over the messages.
        """

    def summaries(self, entries: list[QueueEntry]) -> list[dict[str, Any]]:
        """The JSON summary of each of C{entries} (C{docs/admin-api.md})."""

    def list(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[dict[str, Any]]:
        """C{summaries(matching(...))}."""

    def show(self, queue_id: str) -> Deferred[dict[str, Any]] | None:
        """One message's summary with its envelope and headers; C{None} if not queued."""

    def flush(self, queue_id: str | None = None, domain: str | None = None) -> int | Deferred[int]:
        """Attempt messages now (one, a domain's, or all); @return: how many (a big queue: once all are taken)."""

    def reroute(self, queue_id: str | None = None, domain: str | None = None) -> int | Deferred[int]:
        """Route messages again with the table in force and attempt them; @return: how many."""

    def hold(self, queue_id: str) -> Deferred[bool]:
        """Keep a message from delivery (durably); C{False}: not queued."""

    def release(self, queue_id: str) -> Deferred[bool]:
        """Release a held message and attempt it now; C{False}: not queued."""

    def delete(self, queue_id: str) -> Deferred[bool]:
        """Remove a message without notice; C{False}: not queued."""

    def bounce(self, queue_id: str, reason: str = ...) -> Deferred[bool]:
        """Return a message to its sender now, with a DSN; C{False}: not queued."""


class SessionsView(Protocol):
    """The node's open SMTP sessions."""

    def count(self) -> int:
        """How many sessions are open."""

    def by_mode_and_tls(self) -> Mapping[tuple[str, bool], int]:
        """Open sessions by C{(listener mode, TLS up)}; only keys with sessions."""


class NodeIdentity(Protocol):
    """
    Who the node is and the configuration in force. Name, host name, config
    source, listeners, admin endpoint and routes are read from L{config},
    which a reload replaces. (A node with workers: the supervisor's.)
    """

    @property
    def config(self) -> NodeConfig:
        """The configuration in force now."""

    @property
    def started_at(self) -> float | None:
        """When the node started (seconds since the epoch)."""

    @property
    def last_reload(self) -> Mapping[str, Any] | None:
        """The last reload: C{time}, C{status} and C{source} or C{error}."""


class NodeFacts(NodeIdentity, Protocol):
    """L{NodeIdentity} of a node that reloads itself."""

    @property
    def last_reload_error(self) -> str | None:
        """Why the last reload was refused; C{None} after a successful one."""

    def reload(self) -> bool:
        """Re-read the configuration; @return: whether it was applied."""


class SuppressionView(Protocol):
    """
    The suppression list as the admin API changes it
    (L{relaynet.queue.suppression.SuppressionList} provides it). Changes
    apply at once in memory; L{flushed} fires once they are on disk.
    """

    expiry_days: float

    def __len__(self) -> int:
        """How many entries (expired ones not yet dropped included)."""

    def get(self, address: str) -> "Suppression | None":
        """The live entry of C{address}, or C{None}."""

    def entries(self) -> "list[Suppression]":
        """The live entries, by address."""

    def counts(self) -> dict[str, int]:
        """Live entries by source."""

    def add(
        self, address: str, reason: str = ..., kind: str = ..., source: str = ...,
        expires_days: float | None = None,
    ) -> "Suppression":
        """Suppress C{address} from now on."""

    def put_many(self, entries: "Iterable[Suppression]") -> int:
        """Keep each of C{entries} (an import); @return: how many."""

    def remove(self, address: str) -> bool:
        """Stop suppressing C{address}; @return: whether it was on the list."""

    def default_expiry(self, now: float, days: float | None = None) -> float | None:
        """When an entry added at C{now} expires by default."""

    def flushed(self) -> "Deferred[None]":
        """Fires once every change so far is on disk."""
