# -*- test-case-name: tests.test_queue -*-
"""
Reading the queue, pure: which queued messages match the admin's filters,
in which order, and the summary of each (the admin API's list items).
"""

from __future__ import annotations

from typing import Any, Iterable

from relaynet.queue.core import QueueCore
from relaynet.queue.spool import QueueEntry


def matching(
    core: QueueCore, now: float, state: str | None = None, sender: str | None = None,
    recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
) -> list[QueueEntry]:
    """
    The queued messages of C{core}, oldest first, filtered by state, sender
    or recipient (substring, case-insensitive), recipient domain and minimum
    age in seconds.
    """
    sender = sender.lower() if sender else None
    recipient = recipient.lower() if recipient else None
    domain = domain.lower() if domain else None
    out = []
    for entry in sorted(core, key=lambda e: e.envelope.arrival):
        env = entry.envelope
        if state and core.state(entry) != state:
            continue
        if sender and sender not in env.sender.lower():
            continue
        if recipient or domain:
            addrs = [r.address.lower() for r in env.recipients]
            if recipient and not any(recipient in a for a in addrs):
                continue
            if domain and not any(a.rpartition("@")[2] == domain for a in addrs):
                continue
        if min_age is not None and now - env.arrival < min_age:
            continue
        out.append(entry)
    return out


def selected(core: QueueCore, queue_id: str | None, domain: str | None) -> list[QueueEntry]:
    """
    What a flush or reroute acts on: one message, the messages with a
    pending recipient in C{domain}, or all.
    """
    if queue_id is not None:
        entry = core.get(queue_id)
        return [entry] if entry is not None else []
    entries = list(core)
    if domain is not None:
        d = domain.lower()
        entries = [
            e for e in entries
            if any(r.address.rpartition("@")[2].lower() == d for r in e.pending_recipients())
        ]
    return entries


def summaries(core: QueueCore, entries: Iterable[QueueEntry], now: float) -> list[dict[str, Any]]:
    """L{entry_summary} of each of C{entries}."""
    return [entry_summary(e, core.state(e), now) for e in entries]


def entry_summary(entry: QueueEntry, state: str, now: float) -> dict[str, Any]:
    """A JSON-able summary of one queued message (the admin API's list item)."""
    env = entry.envelope
    rcpts = []
    for r in env.recipients:
        st = entry.state.recipients.get(r.address)
        rcpts.append({
            "address": r.address,
            "status": str(st.status) if st else "pending",
            "attempts": st.attempts if st else 0,
            "dsn": st.dsn if st else None,
            "diagnostic": st.diagnostic if st else None,
            "remote": st.remote if st else None,
            "last_attempt": st.last_attempt if st else None,
        })
    return {
        "queue_id": env.queue_id,
        "state": str(state),
        "sender": env.sender,
        "recipients": rcpts,
        "size": env.size,
        "arrival": env.arrival,
        "age": round(now - env.arrival, 3),
        "next_attempt": entry.state.next_attempt,
        "held": entry.state.held,
        "hops": env.hops,
        "client": env.client,
    }
