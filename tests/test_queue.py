"""
Tests for L{relaynet.queue.core}: the queue core's state machine, pure (no
reactor, no disk: entries are built in memory, time is a number).
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from relaynet.queue.listing import matching, selected, summaries
from relaynet.queue.core import BUSY, Decision, Outcome, Plan, QueueCore, Write, queued_as
from relaynet.queue.retry import RetryPolicy
from relaynet.queue.spool import BoundedReader, Envelope, QueueEntry, QueueState, Recipient, RecipientState
from relaynet.queue.states import FINAL_STATUSES, MessageState, OutcomeEvent, RecipientStatus

T0 = 1_750_000_000.0
POLICY = RetryPolicy(minimal_backoff=300, maximal_backoff=4000, jitter=0.0, lifetime=5 * 86400)


class _Entry(QueueEntry):
    def open_message(self, skip: int = 0) -> BoundedReader:
        data = b"Subject: x\r\n\r\nbody\r\n"[skip:]
        return BoundedReader(io.BytesIO(data), len(data))  # type: ignore[arg-type]


def entry(qid: str = "Q1", rcpts: tuple[str, ...] = ("a@x.test", "b@y.test"), sender: str = "s@src.test",
          notify: tuple[str, ...] | None = None, arrival: float = T0, held: bool = False) -> QueueEntry:
    env = Envelope(qid, sender, tuple(Recipient(r, "relay:*", notify=notify) for r in rcpts), arrival)
    return _Entry(env, QueueState(held=held), f"/nonexistent/{qid}", 0)


def core(delay_warning: float = 0.0) -> QueueCore:
    return QueueCore(POLICY, delay_warning)


def begin(c: QueueCore, qid: str, now: float = T0) -> Plan:
    plan = c.begin(qid, now)
    assert isinstance(plan, Plan), plan
    return plan


def relayed(address: str) -> Outcome:
    return Outcome(address, RecipientStatus.RELAYED, OutcomeEvent.SENT, "2.0.0", "250 2.0.0 Ok: queued as NEXT1",
                   "hop:25", code=250, text="2.0.0 Ok: queued as NEXT1")


def test_statuses_are_defined_once() -> None:
    """The final statuses are the enum's; a status compares equal to its string (the on-disk form)."""
    assert set(FINAL_STATUSES) == {"delivered", "relayed", "bounced"}
    assert RecipientStatus("deferred") is RecipientStatus.DEFERRED
    assert RecipientState(status="relayed").final  # type: ignore[arg-type]
    assert not RecipientState(status="deferred").final  # type: ignore[arg-type]


def test_new_message_is_due_now_and_incoming() -> None:
    """A committed message is due at once and shows as incoming; a held one is not scheduled."""
    c = core()
    e = entry()
    assert c.add(e, T0) == T0
    assert c.state(e) is MessageState.INCOMING
    assert c.add(entry("Q2", held=True), T0) is None


def test_recovered_message_keeps_its_due_time() -> None:
    """A recovered message is due at its recorded next attempt, or now if that has passed."""
    c = core()
    e = entry()
    e.state.next_attempt = T0 + 100
    assert c.add(e, T0) == T0 + 100
    assert c.add(e, T0 + 200) == T0 + 200


def test_all_delivered_removes_the_message() -> None:
    """Every recipient relayed: the message is removed, events name the next hop's queue id, no DSN."""
    c = core()
    c.add(entry(), T0)
    plan = begin(c, "Q1")
    assert c.state(plan.entry) is MessageState.ACTIVE
    d = c.finish(plan, [relayed("a@x.test"), relayed("b@y.test")], T0 + 2)
    assert d.write is Write.REMOVE and d.unschedule and not d.notices
    assert [e.name for e in d.events] == ["sent", "sent"]
    assert d.events[0].fields["next_queue_id"] == "NEXT1"
    assert d.events[0].fields["duration"] == 2.0
    assert "Q1" not in c


def test_deferral_schedules_a_retry_with_backoff() -> None:
    """A deferred recipient keeps the message, with the next attempt per the retry policy."""
    c = core()
    c.add(entry(), T0)
    plan = begin(c, "Q1")
    d = c.finish(plan, [relayed("a@x.test"), Outcome.deferred("b@y.test", "4.4.1", "connection refused")], T0)
    assert d.write is Write.STATE and d.due == T0 + 300
    e = c.get("Q1")
    assert e is not None and e.state.next_attempt == T0 + 300
    assert c.state(e) is MessageState.DEFERRED
    assert [r.address for r in e.pending_recipients()] == ["b@y.test"]
    plan = begin(c, "Q1", T0 + 300)
    assert [r.address for r in plan.recipients] == ["b@y.test"]
    d = c.finish(plan, [Outcome.deferred("b@y.test", "4.4.1", "again")], T0 + 300)
    assert d.due == T0 + 300 + 600


def test_retry_never_goes_past_the_lifetime() -> None:
    """The last retry is at the end of the lifetime, not after it."""
    c = QueueCore(RetryPolicy(minimal_backoff=300, maximal_backoff=4000, jitter=0.0, lifetime=400))
    c.add(entry(rcpts=("a@x.test",)), T0)
    d = c.finish(begin(c, "Q1", T0 + 350), [Outcome.deferred("a@x.test", "4.4.1", "x")], T0 + 350)
    assert d.due == T0 + 400


def test_missing_outcome_defers_the_recipient() -> None:
    """An attempt that gives no outcome for a recipient never loses it: it is deferred (4.3.0)."""
    c = core()
    c.add(entry(), T0)
    d = c.finish(begin(c, "Q1"), [relayed("a@x.test")], T0)
    e = c.get("Q1")
    assert d.write is Write.STATE and e is not None
    st = e.state.recipients["b@y.test"]
    assert st.status is RecipientStatus.DEFERRED and st.dsn == "4.3.0"


def test_permanent_failure_asks_for_a_dsn() -> None:
    """A 5xx bounces the recipient and asks for one 'failed' DSN naming it and the remote MTA."""
    c = core()
    c.add(entry(), T0)
    bounce = Outcome.bounced("b@y.test", "5.1.1", "550 5.1.1 unknown", remote="hop2.test:25", code=550)
    d = c.finish(begin(c, "Q1"), [relayed("a@x.test"), bounce], T0)
    assert d.write is Write.REMOVE
    [notice] = d.notices
    assert notice.action == "failed"
    [report] = notice.reports
    assert (report.address, report.status, report.remote_mta) == ("b@y.test", "5.1.1", "hop2.test")


def test_a_notice_not_queued_is_owed_until_the_next_attempt() -> None:
    """
    The 'failed' DSN of a message whose last recipient bounced could not be
    queued (L{QueueCore.unnotified}): the message is taken back, deferred,
    due after the minimal backoff, owing the notice; its next attempt
    queues the same report and removes it, attempting nobody.
    """
    c = core()
    c.add(entry(), T0)
    bounce = Outcome.bounced("b@y.test", "5.1.1", "550 5.1.1 unknown", remote="hop2.test:25", code=550)
    d = c.finish(begin(c, "Q1"), [relayed("a@x.test"), bounce], T0)
    assert d.write is Write.REMOVE and "Q1" not in c
    owing = c.unnotified(d, d.notices, T0)
    assert (owing.write, owing.due, owing.notices) == (Write.STATE, T0 + 300, ())
    e = c.get("Q1")
    assert e is not None and c.state(e) is MessageState.DEFERRED and c.counts()["deferred"] == 1
    assert e.state.owed_notices is not None and list(e.state.owed_notices) == ["b@y.test"]
    again = c.begin("Q1", T0 + 300)
    assert isinstance(again, Decision) and again.write is Write.REMOVE and "Q1" not in c
    assert [n.action for n in again.notices] == ["failed"]
    assert again.notices[0].reports == d.notices[0].reports
    assert e.state.owed_notices is None


def test_a_delay_warning_not_queued_is_sent_later() -> None:
    """A 'delayed' DSN that could not be queued is not marked as sent: the next deferral past the time sends it."""
    c = core(delay_warning=3600)
    c.add(entry(rcpts=("a@x.test",)), T0)
    defer = Outcome.deferred("a@x.test", "4.4.1", "down")
    d = c.finish(begin(c, "Q1", T0 + 3700), [defer], T0 + 3700)
    assert [n.action for n in d.notices] == ["delayed"]
    owing = c.unnotified(d, d.notices, T0 + 3700)
    assert owing.due == d.due
    e = c.get("Q1")
    assert e is not None and not e.state.delay_warned and e.state.owed_notices is None
    assert [n.action for n in c.finish(begin(c, "Q1", T0 + 9000), [defer], T0 + 9000).notices] == ["delayed"]


def test_a_message_deleted_while_its_notice_was_queued_owes_nothing() -> None:
    """An admin delete between the attempt and its DSN's failure wins: the message is not taken back."""
    c = core()
    c.add(entry(), T0)
    bounce = Outcome.bounced("b@y.test", "5.1.1", "550 5.1.1 unknown", code=550)
    d = c.finish(begin(c, "Q1"), [bounce], T0)  # a@x.test still pending: the state is written
    assert d.write is Write.STATE and d.notices
    assert isinstance(c.delete("Q1"), Decision)
    assert c.unnotified(d, d.notices, T0).write is Write.NOTHING and "Q1" not in c


@pytest.mark.parametrize(
    ("sender", "notify", "dsn"),
    [("", None, False), ("s@src.test", ("NEVER",), False), ("s@src.test", ("SUCCESS",), False),
     ("s@src.test", ("FAILURE",), True), ("s@src.test", None, True)],
)
def test_dsn_follows_notify(sender: str, notify: tuple[str, ...] | None, dsn: bool) -> None:
    """RFC 3461: the null sender never gets a DSN; NOTIFY chooses which outcomes are reported."""
    c = core()
    c.add(entry(rcpts=("a@x.test",), sender=sender, notify=notify), T0)
    d = c.finish(begin(c, "Q1"), [Outcome.bounced("a@x.test", "5.0.0", "no")], T0)
    assert bool(d.notices) is dsn


def test_success_dsn_unless_the_next_hop_takes_over() -> None:
    """NOTIFY=SUCCESS asks for 'relayed', unless the next hop offered DSN (it reports then)."""
    c = core()
    c.add(entry(rcpts=("a@x.test",), notify=("SUCCESS",)), T0)
    d = c.finish(begin(c, "Q1"), [relayed("a@x.test")], T0)
    assert [n.action for n in d.notices] == ["relayed"]
    c.add(entry("Q2", rcpts=("a@x.test",), notify=("SUCCESS",)), T0)
    peer = Outcome("a@x.test", RecipientStatus.RELAYED, OutcomeEvent.SENT, "2.0.0", "ok", dsn_peer=True)
    assert not c.finish(begin(c, "Q2"), [peer], T0).notices


def test_delay_warning_once() -> None:
    """A 'delayed' DSN is sent once, the first time an attempt defers past delay_warning."""
    c = core(delay_warning=3600)
    c.add(entry(rcpts=("a@x.test",)), T0)
    defer = Outcome.deferred("a@x.test", "4.4.1", "down")
    assert not c.finish(begin(c, "Q1", T0 + 10), [defer], T0 + 10).notices
    d = c.finish(begin(c, "Q1", T0 + 3700), [defer], T0 + 3700)
    assert [n.action for n in d.notices] == ["delayed"]
    assert not c.finish(begin(c, "Q1", T0 + 9000), [defer], T0 + 9000).notices


def test_expiry_bounces_pending_recipients_with_4_4_7() -> None:
    """Past its lifetime, an attempt is not made: pending recipients bounce (event 'expired', 4.4.7)."""
    c = core()
    c.add(entry(), T0)
    c.finish(begin(c, "Q1"), [relayed("a@x.test"), Outcome.deferred("b@y.test", "4.4.1", "refused")], T0)
    d = c.begin("Q1", T0 + POLICY.lifetime)
    assert isinstance(d, Decision) and d.write is Write.REMOVE
    assert [(e.name, e.fields["recipient"], e.fields["dsn"]) for e in d.events] == [("expired", "b@y.test", "4.4.7")]
    [notice] = d.notices
    assert "last error: refused" in (notice.reports[0].diagnostic or "")


def test_no_second_attempt_while_one_runs() -> None:
    """begin() while an attempt runs, or of a held or unknown message, starts nothing."""
    c = core()
    c.add(entry(), T0)
    begin(c, "Q1")
    assert c.begin("Q1", T0) is None
    assert c.begin("nope", T0) is None
    c.add(entry("Q2", held=True), T0)
    assert c.begin("Q2", T0) is None


def test_hold_during_an_attempt_is_kept() -> None:
    """A hold during an attempt applies at once; the attempt's deferral then schedules nothing."""
    c = core()
    c.add(entry(), T0)
    plan = begin(c, "Q1")
    h = c.hold("Q1")
    assert h.write is Write.STATE and h.unschedule and h.entry is not None and h.entry.state.held
    d = c.finish(plan, [Outcome.deferred(r.address, "4.4.1", "x") for r in plan.recipients], T0)
    assert d.write is Write.STATE and d.due is None
    e = c.get("Q1")
    assert e is not None and e.state.held and c.state(e) is MessageState.HOLD
    assert e.state.next_attempt == T0 + 300  # recorded, used after release only if not flushed


def test_release_makes_it_due_now() -> None:
    """Release clears the hold and the recorded next attempt: due now."""
    c = core()
    c.add(entry(held=True), T0)
    r = c.release("Q1", T0 + 5)
    assert r.write is Write.STATE and r.due == T0 + 5
    assert r.entry is not None and not r.entry.state.held
    assert [e.name for e in r.events] == ["release"]


def test_bounce_and_delete_wait_for_a_running_attempt() -> None:
    """Bounce and delete answer BUSY during an attempt; afterwards they see only what is still pending."""
    c = core()
    c.add(entry(), T0)
    plan = begin(c, "Q1")
    assert c.bounce("Q1", "admin", T0) is BUSY
    assert c.delete("Q1") is BUSY
    c.finish(plan, [relayed("a@x.test"), Outcome.deferred("b@y.test", "4.4.1", "x")], T0)
    d = c.bounce("Q1", "admin", T0)
    assert isinstance(d, Decision) and d.write is Write.REMOVE
    assert [(e.name, e.fields["recipient"]) for e in d.events] == [("bounced", "b@y.test")]
    assert [r.address for r in d.notices[0].reports] == ["b@y.test"]


def test_delete_removes_without_notice() -> None:
    """Delete removes the message with a 'deleted' event and no DSN; unknown ids are not ok."""
    c = core()
    c.add(entry(), T0)
    d = c.delete("Q1")
    assert isinstance(d, Decision) and d.write is Write.REMOVE and not d.notices
    assert [e.name for e in d.events] == ["deleted"]
    gone = c.delete("Q1")
    assert isinstance(gone, Decision) and not gone.ok
    assert not c.hold("Q1").ok and not c.release("Q1", T0).ok


def test_flush_skips_held_messages() -> None:
    """Flush makes a message due now, except a held one."""
    c = core()
    c.add(entry(), T0)
    c.add(entry("Q2", held=True), T0)
    assert c.flush("Q1", T0 + 1).due == T0 + 1
    assert not c.flush("Q2", T0 + 1).ok


def test_cut_through_refusal_sends_no_dsn() -> None:
    """With notify_failures off (the client got the 5xx itself), a bounce asks for no DSN."""
    c = core()
    c.add(entry(rcpts=("a@x.test",)), T0)
    d = c.finish(begin(c, "Q1"), [Outcome.bounced("a@x.test", "5.1.1", "no")], T0, notify_failures=False)
    assert d.write is Write.REMOVE and not d.notices


@pytest.mark.parametrize(
    ("text", "ident"),
    [("2.0.0 Ok: queued as 4XyZ12", "4XyZ12"), ("Ok: queued as ABC; relayed", "ABC"), ("Ok", None), ("", None)],
)
def test_queued_as(text: str, ident: Any) -> None:
    """The next hop's queue id is read from its 'queued as ID' reply."""
    assert queued_as(text) == ident


def test_listing_filters_and_orders() -> None:
    """Listings are oldest first and filter by state, sender, recipient, domain and age."""
    c = core()
    c.add(entry("Q2", rcpts=("b@y.test",), sender="Bob@src.test", arrival=T0 + 10), T0)
    c.add(entry("Q1", rcpts=("a@x.test",), arrival=T0), T0)
    c.add(entry("Q3", rcpts=("c@x.test",), held=True, arrival=T0 + 20), T0)
    ids = lambda es: [e.queue_id for e in es]  # noqa: E731
    assert ids(matching(c, T0 + 30)) == ["Q1", "Q2", "Q3"]
    assert ids(matching(c, T0 + 30, state="hold")) == ["Q3"]
    assert ids(matching(c, T0 + 30, sender="bob@")) == ["Q2"]
    assert ids(matching(c, T0 + 30, recipient="A@X")) == ["Q1"]
    assert ids(matching(c, T0 + 30, domain="X.test")) == ["Q1", "Q3"]
    assert ids(matching(c, T0 + 30, min_age=15)) == ["Q1", "Q2"]
    assert ids(selected(c, None, "x.test")) == ["Q1", "Q3"] and ids(selected(c, "Q2", None)) == ["Q2"]
    [s] = summaries(c, [c.get("Q3")], T0 + 30)  # type: ignore[list-item]
    assert (s["state"], s["held"], s["age"], s["recipients"][0]["status"]) == ("hold", True, 10.0, "pending")


def test_remote_mta_only_for_a_host_that_answered() -> None:
    """
    A next hop that never answered (code 0: connection refused, timeout)
    said nothing: its DSN report has no Remote-MTA, and the diagnostic is
    relaynet's own. Remote-MTA names are hosts without a port.
    """
    from relaynet.queue.bounce import mta_name

    c = core()
    c.add(entry(), T0)
    silent = Outcome.bounced("b@y.test", "5.4.4", "connect to 192.0.2.9: refused", remote="192.0.2.9:25")
    d = c.finish(begin(c, "Q1"), [relayed("a@x.test"), silent], T0)
    [notice] = d.notices
    [report] = notice.reports
    assert report.remote_mta is None and report.diagnostic == "connect to 192.0.2.9: refused"
    assert mta_name("mx1.example[192.0.2.1]:25") == "mx1.example"
    assert mta_name("192.0.2.1:25") == "[192.0.2.1]" and mta_name("[2001:db8::1]:25") == "[IPv6:2001:db8::1]"
    assert mta_name("hop2.test:2525") == "hop2.test"
