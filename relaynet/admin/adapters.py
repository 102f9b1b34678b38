# -*- test-case-name: tests.test_control,tests.test_metrics -*-
"""
A node's parts seen through the views of L{relaynet.admin.views}.

 - L{IntakeSessions}: the intake's set of open sessions as a L{SessionsView}.
 - L{RunnerQueue}: the L{QueueRunner} as a L{QueueView}. Transitional: its
   C{totals()} returns the runner's own C{QueueTotals} class; once it returns
   L{relaynet.admin.views.QueueTotals}, the node gives the runner itself and
   this class goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Protocol

from attrs import frozen

from relaynet.admin.views import QueueTotals

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from relaynet.queue.spool import QueueEntry
    from relaynet.runner import QueueRunner


class _Listener(Protocol):
    @property
    def mode(self) -> str: ...


class _Session(Protocol):
    """What L{IntakeSessions} reads of one SMTP session."""

    @property
    def listener(self) -> _Listener: ...

    @property
    def tls_info(self) -> tuple[str, str] | None: ...


@frozen
class IntakeSessions:
    """
    A L{SessionsView<relaynet.admin.views.SessionsView>} of a live collection
    of sessions (the intake's C{sessions} set, which sessions join and leave).
    """

    sessions: Collection[_Session]

    def count(self) -> int:
        """How many sessions are open."""
        return len(self.sessions)

    def by_mode_and_tls(self) -> dict[tuple[str, bool], int]:
        """Open sessions by C{(listener mode, TLS up)}."""
        out: dict[tuple[str, bool], int] = {}
        for s in list(self.sessions):
            key = (s.listener.mode, s.tls_info is not None)
            out[key] = out.get(key, 0) + 1
        return out


@frozen
class RunnerQueue:
    """
    A L{QueueView<relaynet.admin.views.QueueView>} of a L{QueueRunner}: its
    own methods, its totals as a L{QueueTotals}.
    """

    runner: QueueRunner

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self.runner

    def totals(self) -> QueueTotals:
        t = self.runner.totals()
        return QueueTotals(size=t.size, recipients=t.recipients, oldest_arrival=t.oldest_arrival)

    def counts(self) -> dict[str, int]:
        return self.runner.counts()

    def matching(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[QueueEntry]:
        return self.runner.matching(state, sender, recipient, domain, min_age)

    def summaries(self, entries: list[QueueEntry]) -> list[dict[str, Any]]:
        return self.runner.summaries(entries)

    def list(
        self, state: str | None = None, sender: str | None = None,
        recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    ) -> list[dict[str, Any]]:
        return self.runner.list(state, sender, recipient, domain, min_age)

    def show(self, queue_id: str) -> Deferred[dict[str, Any]] | None:
        return self.runner.show(queue_id)

    def flush(self, queue_id: str | None = None, domain: str | None = None) -> int:
        return self.runner.flush(queue_id, domain)

    def reroute(self, queue_id: str | None = None, domain: str | None = None) -> int:
        return self.runner.reroute(queue_id, domain)

    def hold(self, queue_id: str) -> Deferred[bool]:
        return self.runner.hold(queue_id)

    def release(self, queue_id: str) -> Deferred[bool]:
        return self.runner.release(queue_id)

    def delete(self, queue_id: str) -> Deferred[bool]:
        return self.runner.delete(queue_id)

    def bounce(self, queue_id: str, reason: str | None = None) -> Deferred[bool]:
        """With no C{reason}, the runner's own."""
        if reason is None:
            return self.runner.bounce(queue_id)
        return self.runner.bounce(queue_id, reason)
