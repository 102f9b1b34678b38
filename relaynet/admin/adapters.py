# -*- test-case-name: tests.test_control,tests.test_metrics -*-
"""
A node's parts seen through the views of L{relaynet.admin.views}.

 - L{IntakeSessions}: the intake's set of open sessions as a L{SessionsView}.
 - L{outbound_hop_states}: the hop-state cache of a queue runner's next hops.

The queue runner is a L{QueueView} as it is (the node gives it directly).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Protocol

from attrs import frozen


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


def outbound_destination_states(queue: object) -> Callable[[], list[dict[str, Any]]]:
    """
    The traffic-shaping destinations of a queue runner
    (C{queue.outbound.destination_states()}, L{relaynet.delivery.shaping}),
    read when called; C{[]} for a queue without them.
    """

    def read() -> list[dict[str, Any]]:
        states = getattr(getattr(queue, "outbound", None), "destination_states", None)
        return list(states()) if callable(states) else []

    return read


def outbound_hop_states(queue: object) -> Callable[[], list[dict[str, Any]]]:
    """
    The hop-state cache of the next hops of a queue runner: a callable that
    reads C{queue.outbound.hop_states()} (an
    L{OutboundManager<relaynet.delivery.client.OutboundManager>}'s
    L{HopState<relaynet.delivery.client.HopState>} snapshots) when called,
    or answers C{[]} for a queue without one (a fake, a runner with another
    outbound agent).
    """

    def read() -> list[dict[str, Any]]:
        states = getattr(getattr(queue, "outbound", None), "hop_states", None)
        return list(states()) if callable(states) else []

    return read
