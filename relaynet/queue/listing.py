# -*- test-case-name: tests.test_queue -*-
"""
Reading the queue, pure: which queued messages match the admin's filters,
in which order, and the summary of each (the admin API's list items).

Nothing here sorts the queue: the core keeps its messages in arrival order,
all and per queue state (L{QueueCore.oldest_first}), and its counters up to
date (L{QueueCore.tally}). A page of an unfiltered listing, or one filtered
by state only, costs O(page) (the count is a counter); the summary of the
whole queue costs O(distinct domains and deferral reasons). Filters on the
envelope (sender, recipient, domain, age) are for L{scan}, which reads only
what never changes and so may run in a worker thread on a L{snapshot
<QueueCore.snapshot>}.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator

from relaynet.queue.core import QueueCore
from relaynet.queue.ordering import Key
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
    return list(_filtered(core, now, state, sender, recipient, domain, min_age))


def page(
    core: QueueCore, now: float, limit: int | None, state: str | None = None, sender: str | None = None,
    recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
    after: Key | None = None,
) -> tuple[int, list[QueueEntry]]:
    """
    How many queued messages match (see L{matching}) and the first C{limit}
    of them (all when C{None}), oldest first. With no filter but C{state},
    the count is the core's counter and the page costs O(limit) (plus the
    messages of other states before them).

    @param after: a cursor, the key C{(arrival, queue id)} of the last
        message of the previous page: only the messages after it count and
        are listed (found by a binary search, not a walk).
    """
    found = _filtered(core, now, state, sender, recipient, domain, min_age, after)
    if by_envelope(sender, recipient, domain, min_age) or limit is None:
        entries = list(found)
        return len(entries), entries if limit is None else entries[:limit]
    if after is not None:
        count = core.count_after(state, after)
    else:
        count = core.tally.states.get(state, 0) if state else len(core)
    return count, list(islice(found, limit))


def by_envelope(
    sender: str | None = None, recipient: str | None = None, domain: str | None = None,
    min_age: float | None = None,
) -> bool:
    """Whether a listing filters on the envelope (then it walks: see L{scan})."""
    return bool(sender or recipient or domain or min_age is not None)


def scan(
    core: QueueCore, keys: Iterable[Key], now: float, sender: str | None = None,
    recipient: str | None = None, domain: str | None = None, min_age: float | None = None,
) -> list[QueueEntry]:
    """
    The messages of C{keys} (a L{QueueCore.snapshot}, in order) that are
    still queued and match the envelope filters of L{matching}.

    Safe in a worker thread while the reactor changes the queue: it reads
    each message with one dictionary lookup and then only its envelope,
    which never changes (a message that leaves meanwhile is skipped, one
    that arrives is not seen).
    """
    sender = sender.lower() if sender else None
    recipient = recipient.lower() if recipient else None
    domain = domain.lower() if domain else None
    get = core.get
    out = []
    for arrival, qid in keys:
        if min_age is not None and now - arrival < min_age:
            break  # in order: every later one is younger
        entry = get(qid)
        if entry is None or not _envelope_matches(entry, sender, recipient, domain):
            continue
        out.append(entry)
    return out


def _envelope_matches(entry: QueueEntry, sender: str | None, recipient: str | None, domain: str | None) -> bool:
    env = entry.envelope
    if sender and sender not in env.sender.lower():
        return False
    if recipient or domain:
        addrs = [r.address.lower() for r in env.recipients]
        if recipient and not any(recipient in a for a in addrs):
            return False
        if domain and not any(a.rpartition("@")[2] == domain for a in addrs):
            return False
    return True


def summary(core: QueueCore, now: float, top: int = 10) -> dict[str, Any]:
    """
    The C{mailq}-like summary of the whole queue (C{GET /api/summary}, the
    status page) from the core's counters: no walk over the messages.
    """
    totals = core.totals()
    return {
        "messages": totals.messages,
        "bytes": totals.size,
        "recipients": totals.pending,
        "states": core.counts(),
        "oldest": None if totals.oldest_arrival is None else {
            "queue_id": totals.oldest_id, "arrival": totals.oldest_arrival,
            "age": round(now - totals.oldest_arrival, 3),
        },
        "destinations": [
            {"domain": d, "recipients": r, "messages": m} for d, r, m in core.tally.top_destinations(top)
        ],
        "deferral_reasons": [{"reason": r, "recipients": n} for r, n in core.tally.top_reasons(top)],
    }


def _filtered(
    core: QueueCore, now: float, state: str | None, sender: str | None,
    recipient: str | None, domain: str | None, min_age: float | None, after: Key | None = None,
) -> Iterator[QueueEntry]:
    sender = sender.lower() if sender else None
    recipient = recipient.lower() if recipient else None
    domain = domain.lower() if domain else None
    for entry in core.oldest_first(state, after):
        if min_age is not None and now - entry.envelope.arrival < min_age:
            return  # oldest first: every later one is younger
        if _envelope_matches(entry, sender, recipient, domain):
            yield entry


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
        entries = for_domain(entries, domain)
    return entries


def for_domain(entries: Iterable[QueueEntry], domain: str) -> list[QueueEntry]:
    """Those of C{entries} with a pending recipient in C{domain}."""
    d = domain.lower()
    return [
        e for e in entries
        if any(r.address.rpartition("@")[2].lower() == d for r in e.pending_recipients())
    ]


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
