# -*- test-case-name: tests.test_queue -*-
"""
The queue core, pure: the one owner of the state of every queued message.

No reactor, no disk, no clock of its own: each call takes the time it
concerns. The core holds the queued entries and knows which ones have an
attempt running. Everything that changes a message's state comes through
it -- an attempt beginning and its outcomes, an admin verb -- and comes out
as a L{Decision}: what to write (the state file, or the removal of the
message), which delivery status notifications to queue, which events to
emit, and when to attempt the message next. The runner
(L{relaynet.runner.QueueRunner}) carries decisions out, writing each
message's state one write at a time.

Admin verbs and attempts never race: C{hold} and C{release} change the
in-memory state at once (an attempt running meanwhile records its outcomes
into the same state, so the hold is kept); C{bounce} and C{delete} of a
message with an attempt running return L{BUSY}, and the runner applies them
once the attempt's outcomes are recorded, to the recipients that are still
pending then (a recipient is never both delivered and bounced).

The transitions of a recipient (L{RecipientStatus}), per attempt outcome::

    pending  --2xx-->  delivered | relayed        (final)
    pending  --5xx-->  bounced                    (final, DSN "failed")
    pending  --4xx-->  deferred --...--> as above (DSN "delayed" once, if due)
    any non-final --lifetime over--> bounced      (event "expired", 4.4.7)
    any non-final --admin bounce-->  bounced      (5.0.0)

A message leaves the queue when every recipient is final and every
delivery status notification it causes is queued. A notice that cannot be
queued (a full disk) is owed (L{QueueCore.unnotified}): the message stays,
deferred, and the notice goes with its next attempt.

The core also keeps what the status page, the metrics and the listings read
without walking the queue: a L{QueueTally} (counts by state, octets,
recipients by status, destinations, deferral reasons), taken out of before
and put back after every change of a message, and the messages in arrival
order (L{ArrivalOrder}), so that a page of a listing costs O(page).
"""

from __future__ import annotations

import enum
import re
import sys
from typing import Iterable, Iterator

from attrs import evolve, field, frozen

from relaynet.queue.bounce import RecipientReport, is_bounce_worthy, mta_name
from relaynet.queue.classify import BounceClass, Classifier
from relaynet.queue.ordering import ArrivalOrder, Key
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import QueueEntry, Recipient, RecipientState
from relaynet.queue.states import MessageState, OutcomeEvent, QueueTotals, RecipientStatus
from relaynet.queue.tally import QueueTally


@frozen
class Outcome:
    """
    The result of one attempt for one recipient.

    @ivar status: the recipient's new status.
    @ivar event: the event to log (C{expired} is a bounce by lifetime).
    @ivar dsn: the RFC 3463 status code.
    @ivar diagnostic: the reply or explanation, for DSNs and the event log.
    @ivar remote: the next hop that answered (C{"local"} for a Maildir).
    @ivar dsn_peer: the next hop took over DSN duties (it offered DSN).
    @ivar code: the SMTP reply code, when there was one.
    @ivar text: the reply's text, when there was one.
    @ivar tls: the TLS version of the session, if any.
    @ivar tried: C{(next hop, dsn, diagnostic)} of hops tried before the
        one that gave this outcome (failover).
    @ivar named: a transfer the next hop accepted and remembers by its name
        (relaynet's C{XTXN}): sent again after a crash that came before this
        outcome was recorded, it is recognised, not queued twice. Its
        recording may wait (L{relaynet.runner.QueueRunner._later}).
    """

    address: str
    status: RecipientStatus
    event: OutcomeEvent
    dsn: str
    diagnostic: str = ""
    remote: str | None = None
    dsn_peer: bool = False
    code: int = 0
    text: str = ""
    tls: str | None = None
    tried: tuple[tuple[str, str, str], ...] = ()
    named: bool = False

    @classmethod
    def deferred(
        cls, address: str, dsn: str, diagnostic: str, remote: str | None = None, code: int = 0,
        text: str = "",
    ) -> "Outcome":
        """A transient failure: retry later."""
        return cls(address, RecipientStatus.DEFERRED, OutcomeEvent.DEFERRED, dsn, diagnostic, remote,
                   code=code, text=text)

    @classmethod
    def bounced(
        cls, address: str, dsn: str, diagnostic: str, remote: str | None = None, code: int = 0,
        text: str = "",
    ) -> "Outcome":
        """A permanent failure: return to the sender."""
        return cls(address, RecipientStatus.BOUNCED, OutcomeEvent.BOUNCED, dsn, diagnostic, remote,
                   code=code, text=text)

    @classmethod
    def delivered(cls, address: str, diagnostic: str = "delivered to maildir") -> "Outcome":
        """Written into a local Maildir."""
        return cls(address, RecipientStatus.DELIVERED, OutcomeEvent.DELIVERED, "2.0.0", diagnostic, "local")


class Write(enum.Enum):
    """What a decision writes to the spool."""

    NOTHING = "nothing"
    STATE = "state"
    REMOVE = "remove"


@frozen
class Notice:
    """
    A delivery status notification to queue: one action (C{failed},
    C{delayed}, C{relayed}, C{delivered}) for some recipients of a message.
    """

    entry: QueueEntry
    action: str
    reports: tuple[RecipientReport, ...]


@frozen
class Event:
    """One event-log line: its name and fields (docs/events.md)."""

    name: str
    fields: dict[str, object] = field(factory=dict)


@frozen
class Decision:
    """
    What the runner must do for one message, in this order: queue the
    L{notices} (before the state that causes them is recorded: a crash can
    repeat a DSN, never lose one; one that cannot be queued is owed, see
    L{QueueCore.unnotified}), carry out L{write}, emit the L{events},
    then schedule the message at L{due} (a time; C{None}: do not schedule)
    or, if L{unschedule}, take it off the timetable.
    """

    queue_id: str
    entry: QueueEntry | None
    write: Write = Write.NOTHING
    notices: tuple[Notice, ...] = ()
    events: tuple[Event, ...] = ()
    due: float | None = None
    unschedule: bool = False
    ok: bool = True


BUSY = object()
"""Returned by L{QueueCore.bounce}/L{QueueCore.delete} while an attempt runs."""


@frozen
class Plan:
    """An attempt to make: the recipients still pending, at C{started}."""

    entry: QueueEntry
    recipients: tuple[Recipient, ...]
    started: float


_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9]+)")

#: The fields of an owed notice's report, as the state file keeps them (C{owed_notices}).
_REPORT_FIELDS = ("action", "status", "original_recipient", "remote_mta", "diagnostic", "last_attempt")

_ACTIONS = {
    RecipientStatus.BOUNCED: "failed",
    RecipientStatus.DELIVERED: "delivered",
    RecipientStatus.RELAYED: "relayed",
    RecipientStatus.DEFERRED: "delayed",
}


class QueueCore:
    """
    The queued messages of one node and the state machine of each.

    @ivar policy: the retry policy (backoff and lifetime).
    @ivar delay_warning: seconds after arrival at which a "delayed" DSN is
        sent once (0: never).
    @ivar classify: gives each failure its class (the C{class} of the
        C{deferred}, C{bounced} and C{expired} events).
    """

    def __init__(
        self, policy: RetryPolicy, delay_warning: float = 0.0, classify: Classifier | None = None,
    ) -> None:
        """
        @param policy: see L{QueueCore.policy}.
        @param delay_warning: see L{QueueCore.delay_warning}.
        @param classify: see L{QueueCore.classify} (the built-in rules by default).
        """
        self.policy = policy
        self.delay_warning = delay_warning
        self.classify = classify or Classifier()
        self._entries: dict[str, QueueEntry] = {}
        self._active: set[str] = set()
        # The arrival orders hold C{(arrival, queue id)} keys: one tuple per
        # message, the same object in the order of all and in its state's
        # (L{_out} hands it to L{_in}), and no key kept aside (a dict of
        # keys with sequence numbers was ~100 bytes a queued message).
        self._order = ArrivalOrder()
        self._by_state = {state: ArrivalOrder() for state in MessageState}
        #: The counters of the queue (read them, never change them).
        self.tally = QueueTally()

    # -- reading ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._entries

    def __iter__(self) -> Iterator[QueueEntry]:
        return iter(list(self._entries.values()))

    def oldest_first(self, state: str | None = None, after: Key | None = None) -> Iterator[QueueEntry]:
        """
        The queued messages (in queue state C{state}, or all) by arrival,
        then by queue id (for those arriving in the same microsecond),
        lazily: reading the first M costs O(M). Do not change the queue
        while iterating.

        @param after: only the messages after this key (a listing's cursor).
        """
        entries = self._entries
        order = self._by_state[MessageState(state)] if state else self._order
        for key in order if after is None else order.after(after):
            yield entries[key[1]]

    def count_after(self, state: str | None, after: Key) -> int:
        """How many messages L{oldest_first} would give for C{state} and C{after}, without walking them."""
        return (self._by_state[MessageState(state)] if state else self._order).count_after(after)

    def snapshot(self, state: str | None = None) -> list[Key]:
        """
        The keys of L{oldest_first} (C{(arrival, queue id)}) as a
        list made at once (a copy of pointers: about a millisecond per
        100,000 messages), for a worker thread to filter while the queue
        changes.
        """
        return (self._by_state[MessageState(state)] if state else self._order).keys()

    def get(self, queue_id: str) -> QueueEntry | None:
        """The queued message C{queue_id}, or C{None}."""
        return self._entries.get(queue_id)

    def state(self, entry: QueueEntry) -> MessageState:
        """The queue state of C{entry} (see L{MessageState})."""
        if entry.queue_id in self._active:
            return MessageState.ACTIVE
        if entry.state.held:
            return MessageState.HOLD
        if entry.state.owed_notices or any(
            s.status is RecipientStatus.DEFERRED for s in entry.state.recipients.values()
        ):
            return MessageState.DEFERRED
        return MessageState.INCOMING

    def counts(self) -> dict[str, int]:
        """Queued messages by L{MessageState} (from the counters: O(1))."""
        return dict(self.tally.states)

    def totals(self) -> QueueTotals:
        """Octets, recipients by status and the oldest message (from the counters)."""
        first = self._order.first()
        t = self.tally
        return QueueTotals(
            t.size, dict(t.recipients), None if first is None else first[0],
            oldest_id=None if first is None else first[1], messages=len(self._entries),
            pending=t.pending,
        )

    # -- keeping the counters ---------------------------------------------

    def _out(self, entry: QueueEntry) -> Key:
        """
        Take C{entry}'s share out of the counters and its state's order
        (before changing it).

        @return: its key, for L{_in} to put back.
        """
        state = self.state(entry)
        self.tally.count(entry, state, -1)
        return self._by_state[state].remove(_key(entry))

    def _in(self, entry: QueueEntry, key: Key) -> None:
        """Put C{entry}'s share back (after changing it, if it stays queued), under C{key}."""
        state = self.state(entry)
        self.tally.count(entry, state, 1)
        self._by_state[state].add(key)

    def _forget(self, queue_id: str) -> None:
        """Drop C{queue_id} from the entries and the arrival order (its share already out)."""
        self._order.remove(_key(self._entries.pop(queue_id)))

    # -- messages arriving -----------------------------------------------

    def add(self, entry: QueueEntry, now: float) -> float | None:
        """
        Take a committed or recovered message.

        @return: when to attempt it (now, or its recorded next attempt), or
            C{None} if it is held.
        """
        qid = entry.queue_id
        old = self._entries.get(qid)
        if old is not None:
            self._out(old)
            self._forget(qid)
        self._entries[qid] = entry
        key = _key(entry)
        self._order.add(key)
        self._in(entry, key)
        return self.due(entry, now)

    def due(self, entry: QueueEntry, now: float) -> float | None:
        """When to attempt C{entry}: now, or its recorded next attempt; C{None} if held."""
        if entry.state.held:
            return None
        due = entry.state.next_attempt
        return now if due is None else max(now, due)

    # -- attempts --------------------------------------------------------

    def begin(self, queue_id: str, now: float) -> Plan | Decision | None:
        """
        Start an attempt of C{queue_id}.

        @return: a L{Plan} to deliver; a L{Decision} when there is nothing to
            deliver (all recipients final: remove it; past its lifetime: it
            expires); C{None} when the message is gone, held, or already
            being attempted.
        """
        entry = self._entries.get(queue_id)
        if entry is None or queue_id in self._active or entry.state.held:
            return None
        pending = entry.pending_recipients()
        if not pending:
            self._out(entry)
            notices = self._owed(entry, {})
            self._forget(queue_id)
            return Decision(queue_id, entry, Write.REMOVE, notices, unschedule=True)
        if self.policy.expired(entry.envelope.arrival, now):
            outcomes = []
            for r in pending:
                st = entry.state.recipients.get(r.address)
                last = st.diagnostic if st is not None and st.diagnostic else "no attempt succeeded"
                outcomes.append(Outcome(
                    r.address, RecipientStatus.BOUNCED, OutcomeEvent.EXPIRED, "4.4.7",
                    f"delivery time expired (message queued for {int(now - entry.envelope.arrival)} s):"
                    f" last error: {last}", st.remote if st is not None else None,
                ))
            return self._apply(entry, outcomes, now)
        key = self._out(entry)
        self._active.add(queue_id)
        self._in(entry, key)
        return Plan(entry, tuple(pending), now)

    def finish(
        self, plan: Plan, outcomes: Iterable[Outcome], now: float, notify_failures: bool = True,
    ) -> Decision:
        """
        Record the outcomes of the attempt C{plan}.

        Recipients of the plan without an outcome are deferred (an attempt
        that lost track of a recipient must not lose the recipient).

        @param notify_failures: send DSNs for bounces (C{False} when the
            client was told of the refusal directly: cut-through).
        """
        entry = plan.entry
        current = self._entries.get(entry.queue_id)
        if current is None:
            self._active.discard(entry.queue_id)
        else:
            key = self._out(current)
            self._active.discard(entry.queue_id)
            self._in(current, key)
        by_addr = {o.address: o for o in outcomes}
        complete = [
            by_addr.get(r.address) or Outcome.deferred(
                r.address, "4.3.0", "internal error: the attempt gave no outcome for this recipient"
            )
            for r in plan.recipients
        ]
        if entry.queue_id not in self._entries:
            # Deleted while it ran (not possible through the runner, which
            # postpones deletes; kept safe for direct use).
            return Decision(entry.queue_id, None, ok=False)
        return self._apply(entry, complete, now, notify_failures, started=plan.started)

    # -- administration --------------------------------------------------

    def hold(self, queue_id: str) -> Decision:
        """Keep a message from being attempted until released (durably)."""
        entry = self._entries.get(queue_id)
        if entry is None:
            return Decision(queue_id, None, ok=False)
        key = self._out(entry)
        entry.state.held = True
        self._in(entry, key)
        return Decision(
            queue_id, entry, Write.STATE, unschedule=True,
            events=(Event("hold", {"queue_id": queue_id, "sender": entry.envelope.sender}),),
        )

    def release(self, queue_id: str, now: float) -> Decision:
        """Release a held message and attempt it now."""
        entry = self._entries.get(queue_id)
        if entry is None:
            return Decision(queue_id, None, ok=False)
        key = self._out(entry)
        entry.state.held = False
        entry.state.next_attempt = None
        self._in(entry, key)
        return Decision(
            queue_id, entry, Write.STATE, due=now,
            events=(Event("release", {"queue_id": queue_id, "sender": entry.envelope.sender}),),
        )

    def flush(self, queue_id: str, now: float) -> Decision:
        """Attempt a message now (unless it is held)."""
        entry = self._entries.get(queue_id)
        if entry is None or entry.state.held:
            return Decision(queue_id, entry, ok=False)
        return Decision(queue_id, entry, due=now)

    def delete(self, queue_id: str) -> Decision | object:
        """
        Remove a message without notifying anyone (C{postsuper -d}).

        @return: L{BUSY} while an attempt of it runs.
        """
        entry = self._entries.get(queue_id)
        if entry is None:
            return Decision(queue_id, None, ok=False)
        if queue_id in self._active:
            return BUSY
        self._out(entry)
        self._forget(queue_id)
        return Decision(
            queue_id, entry, Write.REMOVE, unschedule=True,
            events=(Event("deleted", {"queue_id": queue_id, "sender": entry.envelope.sender,
                                      "status": "deleted"}),),
        )

    def bounce(self, queue_id: str, reason: str, now: float) -> Decision | object:
        """
        Bounce every pending recipient now, with a DSN to the sender (5.0.0).

        @return: L{BUSY} while an attempt of it runs.
        """
        entry = self._entries.get(queue_id)
        if entry is None:
            return Decision(queue_id, None, ok=False)
        if queue_id in self._active:
            return BUSY
        outcomes = [Outcome.bounced(r.address, "5.0.0", reason) for r in entry.pending_recipients()]
        return evolve(self._apply(entry, outcomes, now), unschedule=True)

    # -- applying outcomes -----------------------------------------------

    def _apply(
        self, entry: QueueEntry, outcomes: list[Outcome], now: float, notify_failures: bool = True,
        started: float | None = None,
    ) -> Decision:
        env = entry.envelope
        qid = entry.queue_id
        rcpts = {r.address: r for r in env.recipients}
        warn = (
            self.delay_warning > 0
            and not entry.state.delay_warned
            and now - env.arrival >= self.delay_warning
        )
        reports: dict[str, list[RecipientReport]] = {}
        for o in outcomes:
            rcpt = rcpts.get(o.address)
            action = _ACTIONS.get(o.status, "")
            if o.status is RecipientStatus.RELAYED and o.dsn_peer:
                action = ""  # the next hop takes over DSN duties
            if o.status is RecipientStatus.BOUNCED and not notify_failures:
                action = ""
            if o.status is RecipientStatus.DEFERRED and not warn:
                action = ""
            if action and is_bounce_worthy(env.sender, rcpt.notify if rcpt else None, action):
                reports.setdefault(action, []).append(RecipientReport(
                    address=o.address, action=action, status=o.dsn,
                    original_recipient=rcpt.orcpt if rcpt else None,
                    # Only a host that answered is the Remote-MTA; a refusal or a
                    # connection failure is relaynet's own diagnostic.
                    remote_mta=mta_name(o.remote) if o.remote and o.remote != "local" and o.code else None,
                    diagnostic=o.diagnostic or None, last_attempt=now,
                ))
        if warn and "delayed" in reports:
            entry.state.delay_warned = True

        retry = False
        events = []
        current = self._entries.get(qid)
        key = self._out(current) if current is not None else None
        notices = self._owed(entry, reports)
        for o in outcomes:
            st = entry.state.recipients.setdefault(o.address, RecipientState())
            st.attempts += 1
            st.last_attempt = now
            # Shared strings: a hop that is down defers every message queued
            # for it with the same diagnostic, made anew for each.
            st.dsn = sys.intern(o.dsn)
            st.diagnostic = sys.intern(o.diagnostic) if o.diagnostic else None
            st.remote = sys.intern(o.remote) if o.remote else o.remote
            st.status = o.status
            retry = retry or o.status is RecipientStatus.DEFERRED
            events.append(Event(str(o.event), {
                "queue_id": qid, "sender": env.sender, "recipient": o.address,
                "relay": o.remote, "delay": round(now - env.arrival, 6), "dsn": o.dsn,
                "status": str(o.event), "diagnostic": o.diagnostic or None, "hops": env.hops,
                "tls": o.tls,
                "next_queue_id": queued_as(o.text) if o.status is RecipientStatus.RELAYED else None,
                "duration": round(now - started, 6) if started is not None else None,
                "tried": [{"relay": h, "dsn": d, "diagnostic": t} for h, d, t in o.tried] or None,
                "class": self._class(o),
            }))
        if not entry.pending_recipients():
            if current is not None:
                self._forget(qid)
            return Decision(qid, entry, Write.REMOVE, notices, tuple(events), unschedule=True)
        if current is not None and key is not None:
            self._in(current, key)
        due = None
        if retry:
            attempts = max(s.attempts for s in entry.state.recipients.values())
            delay = min(self.policy.delay(attempts),
                        max(0.0, env.arrival + self.policy.lifetime - now))
            entry.state.next_attempt = now + delay
            if not entry.state.held:
                due = now + delay
        return Decision(qid, entry, Write.STATE, notices, tuple(events), due=due)

    def _owed(self, entry: QueueEntry, reports: dict[str, list[RecipientReport]]) -> tuple[Notice, ...]:
        """
        The notices of C{reports} and those C{entry} owes from earlier
        (L{unnotified}), which are queued now: C{entry}'s debt is cleared.
        Call it with C{entry}'s share out of the counters.
        """
        owed = entry.state.owed_notices
        if owed:
            entry.state.owed_notices = None
            for address, fields in owed.items():
                report = RecipientReport(
                    address, str(fields["action"]), str(fields["status"]), fields.get("original_recipient"),
                    fields.get("remote_mta"), fields.get("diagnostic"), fields.get("last_attempt"),
                )
                reports.setdefault(report.action, []).append(report)
        return tuple(Notice(entry, action, tuple(reps)) for action, reps in reports.items())

    def unnotified(self, decision: Decision, failed: Iterable[Notice], now: float) -> Decision:
        """
        The notices C{failed} of C{decision} could not be queued (a full
        disk): the message owes them. It stays queued (or is taken back, if
        C{decision} removed it), in the deferred state, and its next attempt
        queues them (L{begin} or L{_apply}); until then its state file
        records them. A delay warning is simply not marked as sent, so a
        later attempt sends it if it is still due. As Postfix keeps a
        message whose bounce could not be logged: a notice is never lost;
        a crash may repeat one.

        @return: the decision to carry out instead of C{decision}'s write:
            the state recorded, the message attempted again at its due time
            (C{decision}'s, or after the minimal backoff if it had none).
        """
        entry = decision.entry
        assert entry is not None
        qid = entry.queue_id
        current = self._entries.get(qid)
        if current is None and decision.write is not Write.REMOVE:
            # Deleted while its notices were being queued: it owes nothing.
            return Decision(qid, entry, Write.NOTHING, ok=decision.ok)
        if current is not None:
            self._out(current)
            self._forget(qid)
        owed = dict(entry.state.owed_notices or {})
        for notice in failed:
            if notice.action == "delayed":
                entry.state.delay_warned = False
                continue
            for r in notice.reports:
                owed[r.address] = {k: getattr(r, k) for k in _REPORT_FIELDS}
        entry.state.owed_notices = owed or None
        due = decision.due
        if due is None and (owed or entry.pending_recipients()):
            due = now + self.policy.minimal_backoff
        if due is not None:
            entry.state.next_attempt = due
        due = self.add(entry, now)
        return Decision(qid, entry, Write.STATE, due=due)

    def _class(self, o: Outcome) -> str | None:
        """The bounce class of a failure (C{None} for a success)."""
        if o.status not in (RecipientStatus.BOUNCED, RecipientStatus.DEFERRED):
            return None
        kind: BounceClass = self.classify(o.dsn, o.code, o.diagnostic or o.text)
        return kind.value


def _key(entry: QueueEntry) -> Key:
    """
    C{entry}'s place in the arrival orders: by arrival time, then (for
    messages arriving in the same microsecond) by queue id.
    """
    env = entry.envelope
    return (env.arrival, env.queue_id)


def queued_as(text: str) -> str | None:
    """The next hop's queue id from its 250 text (Postfix and relaynet say "queued as ID")."""
    m = _QUEUED_AS.search(text or "")
    return m.group(1) if m else None
