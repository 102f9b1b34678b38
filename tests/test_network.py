"""
Forwarding between relaynet nodes in one process: L{relaynet.testing.network}.

Every node here is a real intake, queue runner, delivery stage and ESMTP
client over a L{relaynet.testing.MemorySpool}; the nodes talk SMTP to each
other over L{twisted.test.iosim} pairs on one simulated clock. So the
scenarios that C{tests/test_forwarding.py} ran with real C{twistd}
processes and wall-clock backoffs run here in milliseconds, with the retry
policy's real values: a chain of hops, a next hop down and back, RFC 3464
bounces, the null sender, failover and load sharing, routing loops,
cut-through acknowledgement, expiry, a node killed and restarted, an
attempt that raises, and C{mx} routes over a fake resolver.

Tests assert on effects: mailboxes, queue contents, events and the DSNs
themselves (parsed with the C{email} package). Times are checked against
the retry policy: the n-th retry comes C{min(minimal_backoff * 2**(n-1),
maximal_backoff)} seconds after the attempt before it, +-10% jitter.

Tests marked C{xfail(strict=True, reason="BUG: ...")} expose defects of
relaynet found here; they pass (and so fail the run) once the defect is fixed.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.names import dns, error

from relaynet.config import NextHop
from relaynet.queue.core import Outcome
from relaynet.queue.spool import QueueEntry, Recipient
from relaynet.queue.window import PeerAnswer, TransferWindow
from relaynet.runner import SETTLE_DELAY
from relaynet.testing.network import NetNode, Network, StoredMail

JITTER = 0.1
"""The retry policy's jitter (L{relaynet.queue.retry.RetryPolicy.jitter})."""

EPS = 1e-5
"""Event times are rounded to microseconds."""

QUEUED = re.compile(r"Ok: queued as ([0-9A-Z]+)")

BACKOFF = {"minimal_backoff": 60, "maximal_backoff": 240, "lifetime": 86400}
"""A short retry policy: retries after ~60, ~120, ~240, ~240... seconds."""


# -- building networks --------------------------------------------------------


def relay(net: Network, domains: Sequence[str], *hops: str | tuple[str, int], **extra: Any) -> dict[str, Any]:
    """A C{relay} route for C{domains} to the nodes named by C{hops} (C{(name, priority)} pairs or names)."""
    next_hops: list[Any] = []
    for h in hops:
        if isinstance(h, tuple):
            next_hops.append({"endpoint": net.endpoint(h[0]), "priority": h[1]})
        else:
            next_hops.append(net.endpoint(h))
    return {"domains": list(domains), "action": "relay", "next_hops": next_hops, **extra}


def chain(net: Network, hop3_users: Sequence[str] | None = None, start_hop2: bool = True,
          **tables: Any) -> tuple[NetNode, NetNode, NetNode]:
    """
    hop1 -> hop2 -> hop3 for dest.test. hop1 delivers src.test locally (the
    senders live there) and hop2 routes src.test back to hop1, so that
    bounces reach them. With C{hop3_users}, hop3 knows only those users.
    """
    hop1 = net.add_node("hop1", local_domains=["src.test"], routes=[relay(net, ["dest.test"], "hop2")],
                        **tables)
    hop2 = net.add_node("hop2", routes=[relay(net, ["dest.test"], "hop3"), relay(net, ["src.test"], "hop1")],
                        start=start_hop2, **tables)
    hop3 = net.add_node("hop3", local_domains=["dest.test"], users=hop3_users, **tables)
    return hop1, hop2, hop3


# -- messages -------------------------------------------------------------------


def message(tag: str, sender: str = "sender@src.test", rcpt: str = "user@dest.test") -> bytes:
    """An RFC 5322 message with Message-ID C{<tag@client.test>} and lines that need dot-stuffing."""
    return (
        f"From: <{sender or 'mailer-daemon@client.test'}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: test {tag}\r\n"
        f"Message-ID: <{tag}@client.test>\r\n"
        "\r\n"
        f"token {tag}\r\n"
        ".a line starting with a dot\r\n"
        "..two dots\r\n"
        "last line\r\n"
    ).encode()


def submit(node: NetNode, sender: str, rcpts: Sequence[str], data: bytes,
           until: Callable[[], object] | None = None) -> str:
    """
    Send C{data} to C{node}; assert it was accepted; @return: its queue id there.

    @param until: see L{Network.run}.
    """
    replies = node.submit(sender, rcpts, data, until=until)
    accepted = [m.group(1) for code, text in replies if code == 250 and (m := QUEUED.search(text))]
    assert len(accepted) == 1, replies
    return accepted[0]


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def received(data: bytes) -> list[str]:
    """The Received fields of a stored message, top (newest) first, unfolded."""
    return [" ".join(str(v).split()) for v in parse(data).get_all("Received") or []]


def without_trace(data: bytes) -> bytes:
    """The message after the Received fields at its top."""
    out = data
    while out.startswith(b"Received:"):
        end = out.index(b"\r\n")
        while out[end + 2:end + 3] in (b" ", b"\t"):
            end = out.index(b"\r\n", end + 2)
        out = out[end + 2:]
    return out


def parse_dsn(data: bytes) -> tuple[email.message.EmailMessage, email.message.Message,
                                    list[email.message.Message], email.message.EmailMessage]:
    """
    Parse a DSN (RFC 3464) as delivered.

    @return: the report, its per-message block, its per-recipient blocks and
        the returned message.
    """
    report = parse(data)
    assert report.get_content_type() == "multipart/report", report["Content-Type"]
    assert report.get_param("report-type") == "delivery-status", report["Content-Type"]
    parts = list(report.iter_parts())
    (status,) = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    assert all(isinstance(b, email.message.Message) for b in blocks), blocks
    per_message, *per_rcpt = [b for b in blocks if isinstance(b, email.message.Message)]
    (returned,) = [p for p in parts if p.get_content_type() == "message/rfc822"]
    inner = returned.get_payload(0)
    assert isinstance(inner, email.message.EmailMessage)
    return report, per_message, per_rcpt, inner


def field(block: email.message.Message, name: str) -> str:
    """A field of a DSN block, unfolded, C{""} if absent."""
    value = block[name]
    return " ".join(str(value).split()) if value is not None else ""


def the_dsn(node: NetNode, mailbox: str) -> StoredMail:
    """The one message in C{mailbox} at C{node}, which must be a DSN from C{<>}."""
    mail = node.mailboxes.delivered(mailbox)
    assert len(mail) == 1, mail
    assert mail[0].sender == "", mail[0]
    return mail[0]


# -- time -----------------------------------------------------------------------


def times(node: NetNode, name: str, **match: Any) -> list[float]:
    """The times (network clock) of C{node}'s events C{name} matching C{match}."""
    return [e["time"] for e in node.events_named(name, **match)]


def assert_backoff(attempts: Sequence[float], minimal: float, maximal: float) -> None:
    """
    C{attempts} (times of consecutive failed attempts of one message) are
    spaced as the retry policy says: the n-th gap is C{min(minimal *
    2**(n-1), maximal)} +- the jitter.
    """
    assert len(attempts) >= 2, attempts
    for n, (before, after) in enumerate(zip(attempts, attempts[1:]), 1):
        base = min(minimal * 2 ** (n - 1), maximal)
        gap = after - before
        assert base * (1 - JITTER) - EPS <= gap <= base * (1 + JITTER) + EPS, (n, gap, base, attempts)


def due(node: NetNode, queue_id: str) -> float:
    """When C{queue_id} is next due at C{node}, as its queue state says."""
    entry = node.runner.core.get(queue_id)
    assert entry is not None, f"{queue_id} is not queued at {node.name}"
    assert entry.state.next_attempt is not None
    return entry.state.next_attempt


# -- a fake DNS -------------------------------------------------------------------


class FakeResolver:
    """
    MX and address lookups from tables, answered as C{twisted.names} would:
    each lookup fires with C{(answers, authority, additional)} of
    L{dns.RRHeader}s, a name in neither table fails with
    L{error.DNSNameError} (NXDOMAIN). (The real thing, a DNS server on
    loopback, is in C{tests/test_mx.py}.)

    @ivar queries: every lookup, C{("MX" | "A" | "AAAA", name)}.
    """

    def __init__(self, mx: Mapping[str, Sequence[tuple[int, str]]], hosts: Mapping[str, str]) -> None:
        self.mx = mx
        self.hosts = hosts
        self.queries: list[tuple[str, str]] = []

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("MX", name))
        if name not in self.mx and name not in self.hosts:
            return fail(error.DNSNameError(name))
        answers = [
            dns.RRHeader(name=name, type=dns.MX, payload=dns.Record_MX(preference, host.encode()))
            for preference, host in self.mx.get(name, ())
        ]
        return succeed((answers, [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("A", name))
        if name not in self.hosts:
            return fail(error.DNSNameError(name))
        return succeed(([dns.RRHeader(name=name, type=dns.A, payload=dns.Record_A(self.hosts[name]))], [], []))

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("AAAA", name))
        if name not in self.hosts:
            return fail(error.DNSNameError(name))
        return succeed(([], [], []))  # NODATA: the in-process network is IPv4


# -- a chain of hops ----------------------------------------------------------------


def test_three_hops() -> None:
    """
    A message sent to hop1 lands in hop3's mailbox unaltered, with one
    relaynet Received field per hop, newest on top; each hop's C{sent}
    event names the next hop's queue id (C{next_queue_id}), so a message
    can be traced hop by hop; every queue is empty afterwards.
    """
    net = Network()
    hop1, hop2, hop3 = chain(net)
    data = message("chain")
    qid1 = submit(hop1, "sender@src.test", ["user@dest.test"], data)
    net.run()

    (mail,) = hop3.mailboxes.delivered("user@dest.test")
    assert mail.sender == "sender@src.test"
    assert without_trace(mail.data) == data, "message altered on the way"
    trace = received(mail.data)
    assert len(trace) == 3, trace
    assert trace[0].startswith(f"from hop2.test ([{hop2.address}]) by hop3.test (relaynet)"), trace
    assert trace[1].startswith(f"from hop1.test ([{hop1.address}]) by hop2.test (relaynet)"), trace
    assert trace[2].startswith("from client.test ([127.0.0.1]) by hop1.test (relaynet)"), trace

    (sent1,) = hop1.events_named("sent", queue_id=qid1)
    (rec2,) = hop2.events_named("received")
    assert sent1["next_queue_id"] == rec2["queue_id"], (sent1, rec2)
    assert sent1["relay"] == f"{hop2.address}:25" and sent1["recipient"] == "user@dest.test"
    (sent2,) = hop2.events_named("sent", queue_id=rec2["queue_id"])
    (rec3,) = hop3.events_named("received")
    assert sent2["next_queue_id"] == rec3["queue_id"], (sent2, rec3)
    assert sent2["relay"] == f"{hop3.address}:25"
    assert rec3["queue_id"] == mail.queue_id
    assert [r["hops"] for r in (hop1.events_named("received")[0], rec2, rec3)] == [1, 2, 3]
    assert all(r["message_id"] == "<chain@client.test>" for r in (rec2, rec3))
    (delivered,) = hop3.events_named("delivered")
    assert delivered["queue_id"] == rec3["queue_id"] and delivered["recipient"] == "user@dest.test"
    for node in (hop1, hop2, hop3):
        assert node.queued() == [] and node.spool.count() == 0, node.name
        assert not node.events_named("deferred") and not node.events_named("bounced"), node.events


def test_next_hop_down_then_up() -> None:
    """
    With hop2 down, hop1 defers the message (4.4.1, connection refused) and
    retries it at the times the backoff policy gives (minimal_backoff
    doubling up to maximal_backoff, +-10%); once hop2 is up the message goes
    at its next scheduled retry -- not before, and not again: it is
    delivered once, with no DSN.
    """
    net = Network()
    # Without the hop-state cache (its probes would flush the message
    # earlier: tests/test_hopstate.py), only the backoff policy is at work.
    hop1, hop2, hop3 = chain(net, start_hop2=False, queue=BACKOFF, outbound={"hop_down_time": 0})
    data = message("downup")
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], data)
    (first,) = hop1.events_named("deferred")
    assert first["dsn"] == "4.4.1" and "refused" in first["diagnostic"], first
    assert first["relay"] == f"{hop2.address}:25"

    net.advance(700)  # attempts at 0, ~60, ~180, ~420, ~660
    attempts = times(hop1, "deferred", queue_id=qid)
    assert len(attempts) >= 4, attempts
    assert_backoff(attempts, 60, 240)
    assert all(e["dsn"] == "4.4.1" for e in hop1.events_named("deferred"))
    assert hop3.mailboxes.mail == [] and hop1.queued() == [qid]

    hop2.start()
    next_retry = due(hop1, qid)
    net.run_until(lambda: hop3.mailboxes.mail, limit=300)
    (sent,) = hop1.events_named("sent", queue_id=qid)
    assert sent["time"] == pytest.approx(next_retry, abs=EPS), "not sent at its scheduled retry"
    net.advance(1000)
    (mail,) = hop3.mailboxes.delivered("user@dest.test")
    assert without_trace(mail.data) == data
    assert hop1.queued() == [] and hop1.spool.count() == 0
    for node in (hop1, hop2, hop3):
        assert not node.events_named("dsn") and not node.events_named("bounced"), node.name
    assert hop1.mailboxes.mail == []


# -- bounces ---------------------------------------------------------------------


def test_permanent_failure_at_last_hop_returns_dsn() -> None:
    """
    hop3 refuses an unknown user at RCPT (550 5.1.1); hop2 bounces and its
    RFC 3464 report, from C{<>}, travels back through hop1 into the
    sender's mailbox: Action failed, Status 5.1.1, the next hop's reply as
    Diagnostic-Code, hop3 as Remote-MTA, the original message returned.
    """
    net = Network()
    hop1, hop2, hop3 = chain(net, hop3_users=["known"])
    submit(hop1, "sender@src.test", ["unknown@dest.test"], message("bounce", rcpt="unknown@dest.test"))
    net.run()

    dsn = the_dsn(hop1, "sender@src.test")
    report, per_message, blocks, returned = parse_dsn(dsn.data)
    assert report["To"].addresses[0].addr_spec == "sender@src.test"
    assert field(per_message, "Reporting-MTA") == "dns; hop2.test"
    (block,) = blocks
    assert field(block, "Final-Recipient") == "rfc822; unknown@dest.test"
    assert field(block, "Action") == "failed"
    assert field(block, "Status") == "5.1.1"
    diagnostic = field(block, "Diagnostic-Code")
    assert diagnostic.startswith("smtp; 550 5.1.1 <unknown@dest.test>"), diagnostic
    assert hop3.address in field(block, "Remote-MTA"), field(block, "Remote-MTA")
    assert returned["Message-ID"] == "<bounce@client.test>"
    assert "token bounce" in returned.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    (bounced,) = hop2.events_named("bounced")
    assert bounced["recipient"] == "unknown@dest.test" and bounced["dsn"] == "5.1.1", bounced
    (notice,) = hop2.events_named("dsn")
    assert notice["recipient"] == "sender@src.test" and notice["action"] == "failed"
    assert notice["original_queue_id"] == bounced["queue_id"]
    assert not hop1.events_named("bounced") and hop3.mailboxes.mail == []
    assert [n.queued() for n in (hop1, hop2, hop3)] == [[], [], []]


def test_dsn_remote_mta_is_a_host_name() -> None:
    """
    The Remote-MTA field of a DSN names the next hop that answered as a host,
    without a port (RFC 3464 2.3.5): here an address literal; and the
    human-readable part says that host said it.
    """
    net = Network()
    hop1, hop2, hop3 = chain(net, hop3_users=["known"])
    submit(hop1, "sender@src.test", ["unknown@dest.test"], message("mta", rcpt="unknown@dest.test"))
    net.run()
    _, _, (block,), _ = parse_dsn(the_dsn(hop1, "sender@src.test").data)
    assert field(block, "Remote-MTA") == f"dns; [{hop3.address}]"
    assert f"host [{hop3.address}] said: 550 5.1.1" in the_dsn(hop1, "sender@src.test").data.decode()


def test_null_sender_failure_is_not_bounced() -> None:
    """
    A message from C{<>} that fails permanently at the last hop is dropped:
    the failure is logged, no DSN is queued anywhere, no mailbox gets mail.
    """
    net = Network()
    hop1, hop2, hop3 = chain(net, hop3_users=["known"])
    submit(hop1, "", ["unknown@dest.test"], message("null", sender="", rcpt="unknown@dest.test"))
    net.advance(3600)
    (bounced,) = hop2.events_named("bounced")
    assert bounced["sender"] == "" and bounced["dsn"] == "5.1.1", bounced
    for node in (hop1, hop2, hop3):
        assert node.events_named("dsn") == [], node.events
        assert node.mailboxes.mail == [] and node.queued() == [], node.name


# -- several next hops ---------------------------------------------------------------


def test_failover_by_priority() -> None:
    """
    Next hops 10 (down), 20 and 30: every message goes to the priority-20
    hop, none to the priority-30 one; each C{sent} event names the hop that
    took it and lists the one tried before it, with why it failed.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], ("hop3", 30), ("dead", 10), ("hop2", 20))])
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    hop3 = net.add_node("hop3", local_domains=["dest.test"])
    for i in range(3):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"failover{i}"))
    net.run()

    assert len(hop2.mailboxes.delivered("user@dest.test")) == 3
    assert hop3.mailboxes.mail == [] and hop3.events_named("received") == []
    sent = hop1.events_named("sent")
    assert len(sent) == 3
    dead = f"{net.address_of('dead')}:25"
    for e in sent:
        assert e["relay"] == f"{hop2.address}:25", e
        (tried,) = e["tried"]
        assert tried["relay"] == dead and tried["dsn"] == "4.4.1" and "refused" in tried["diagnostic"], e
    assert not hop1.events_named("deferred") and hop1.queued() == []


def test_load_sharing_between_equal_priorities() -> None:
    """
    Two next hops of equal priority share the messages as the shuffle of
    equal priorities orders them (here it alternates: an even split), each
    message delivered exactly once; a lower-priority hop gets nothing and
    is not offered to the shuffle.
    """
    net = Network()
    shuffled: list[list[str]] = []

    def alternate(hops: list[NextHop]) -> None:
        shuffled.append(sorted(h.endpoint for h in hops))
        if sum(len(group) > 1 for group in shuffled) % 2 == 0:
            hops.reverse()

    net.shuffle = alternate
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], ("hop2", 10), ("hop3", 10), ("hop4", 20))])
    hop2, hop3, hop4 = (net.add_node(n, local_domains=["dest.test"]) for n in ("hop2", "hop3", "hop4"))
    for i in range(10):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"share{i}"))
    net.run()

    at2 = hop2.mailboxes.delivered("user@dest.test")
    at3 = hop3.mailboxes.delivered("user@dest.test")
    assert (len(at2), len(at3)) == (5, 5)
    ids = sorted(parse(m.data)["Message-ID"] for m in at2 + at3)
    assert ids == sorted(f"<share{i}@client.test>" for i in range(10)), ids
    assert hop4.mailboxes.mail == []
    pair = sorted([net.endpoint("hop2"), net.endpoint("hop3")])
    assert pair in shuffled and [net.endpoint("hop4")] in shuffled
    assert all(group in (pair, [net.endpoint("hop4")]) for group in shuffled), shuffled
    relays = [e["relay"] for e in hop1.events_named("sent")]
    assert relays.count(f"{hop2.address}:25") == 5 and relays.count(f"{hop3.address}:25") == 5


# -- loops -------------------------------------------------------------------------


def test_routing_loop_is_stopped_by_the_hop_limit() -> None:
    """
    a and b route dest.test to each other with max_hops = 5: the intakes
    take the message with 1..5 Received fields, b refuses the sixth
    (554 5.4.6), a bounces it once, the sender (local on a) gets one DSN,
    and the traffic stops.
    """
    net = Network()
    limits = {"max_hops": 5}
    a = net.add_node("a", local_domains=["src.test"], routes=[relay(net, ["dest.test"], "b")], limits=limits)
    b = net.add_node("b", routes=[relay(net, ["dest.test"], "a"), relay(net, ["src.test"], "a")], limits=limits)
    submit(a, "sender@src.test", ["user@dest.test"], message("loop"))
    net.advance(3600)

    assert [e["hops"] for e in a.events_named("received", sender="sender@src.test")] == [1, 3, 5]
    assert [e["hops"] for e in b.events_named("received")] == [2, 4]
    (reject,) = b.events_named("reject")
    assert reject["code"] == 554 and reject["dsn"] == "5.4.6", reject
    (bounced,) = a.events_named("bounced")
    assert bounced["dsn"] == "5.4.6" and bounced["recipient"] == "user@dest.test", bounced
    assert b.events_named("bounced") == [] and b.events_named("dsn") == []
    assert len(a.events_named("dsn")) == 1
    _, _, (block,), returned = parse_dsn(the_dsn(a, "sender@src.test").data)
    assert field(block, "Status") == "5.4.6" and field(block, "Action") == "failed"
    assert field(block, "Diagnostic-Code").startswith("smtp; 554 5.4.6"), field(block, "Diagnostic-Code")
    assert returned["Message-ID"] == "<loop@client.test>"
    assert a.queued() == [] and b.queued() == [] and b.mailboxes.mail == []


# -- cut-through -------------------------------------------------------------------


def cut_through_pair(net: Network, start_hop2: bool = True) -> tuple[NetNode, NetNode]:
    """hop1 relays dest.test to hop2 with ack = "cut-through"; hop2 knows only 'known'."""
    hop1 = net.add_node("hop1", local_domains=["src.test"], queue=BACKOFF, outbound={"hop_down_time": 0},
                        routes=[relay(net, ["dest.test"], "hop2", ack="cut-through")])
    hop2 = net.add_node("hop2", local_domains=["dest.test"], users=["known"], start=start_hop2)
    return hop1, hop2


def test_cut_through_mirrors_the_next_hop() -> None:
    """
    The reply to the final dot waits for hop2: 250 naming hop2's queue id
    once hop2 has the message; hop2's 550 5.1.1 for an unknown user, and
    then nothing is queued and no DSN is sent (the client has the refusal).
    """
    net = Network()
    hop1, hop2 = cut_through_pair(net)
    replies = hop1.submit("sender@src.test", ["known@dest.test"], message("ct-ok", rcpt="known@dest.test"))
    code, text = replies[-2]
    (rec,) = hop2.events_named("received")
    assert code == 250 and f"relayed: 250 2.0.0 Ok: queued as {rec['queue_id']}" in text, replies
    assert len(hop2.mailboxes.delivered("known@dest.test")) == 1

    replies = hop1.submit("sender@src.test", ["unknown@dest.test"], message("ct-bad", rcpt="unknown@dest.test"))
    code, text = replies[-2]
    assert code == 550 and text.startswith("5.1.1 "), replies
    net.advance(600)
    assert hop1.queued() == [] and hop1.spool.count() == 0
    assert hop1.events_named("dsn") == [] and hop1.mailboxes.mail == []
    assert len(hop2.events_named("received")) == 1 and len(hop2.mailboxes.mail) == 1


def test_cut_through_falls_back_to_store_and_forward() -> None:
    """
    With hop2 down the client still gets 250 (the message is durable at
    hop1), hop1 defers it, and delivers it at its retry once hop2 is up.
    """
    net = Network()
    hop1, hop2 = cut_through_pair(net, start_hop2=False)
    replies = hop1.submit("sender@src.test", ["known@dest.test"], message("ct-down", rcpt="known@dest.test"))
    code, text = replies[-2]
    assert code == 250 and "relayed" not in text, replies
    qid = QUEUED.search(text).group(1)  # type: ignore[union-attr]
    (deferred,) = hop1.events_named("deferred")
    assert deferred["dsn"] == "4.4.1" and hop1.queued() == [qid]
    hop2.start()
    retry = due(hop1, qid)
    net.run_until(lambda: hop2.mailboxes.mail, limit=120)
    (sent,) = hop1.events_named("sent")
    assert sent["time"] == pytest.approx(retry, abs=EPS)
    assert len(hop2.mailboxes.delivered("known@dest.test")) == 1
    assert hop1.events_named("dsn") == [] and hop1.queued() == []


# -- expiry -------------------------------------------------------------------------


def test_expired_message_bounces_with_4_4_7() -> None:
    """
    A message to a next hop that never answers is retried with the backoff
    and, at the end of its lifetime (exactly: the last wait is cut short),
    bounced with 4.4.7: an C{expired} event and a "failed" DSN naming the
    last error.
    """
    net = Network()
    lifetime = 3600
    hop1 = net.add_node("hop1", local_domains=["src.test"], routes=[relay(net, ["dest.test"], "dead")],
                        queue={"minimal_backoff": 300, "maximal_backoff": 1200, "lifetime": lifetime},
                        outbound={"hop_down_time": 0})
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], message("expiry"))
    (arrival,) = times(hop1, "received")
    net.advance(lifetime - 1)
    assert hop1.events_named("expired") == [] and hop1.queued() == [qid]
    net.advance(2)

    attempts = times(hop1, "deferred", queue_id=qid)
    assert len(attempts) >= 4, attempts
    assert_backoff(attempts[:4], 300, 1200)
    (expired,) = hop1.events_named("expired")
    assert expired["dsn"] == "4.4.7" and expired["recipient"] == "user@dest.test", expired
    assert expired["time"] == pytest.approx(arrival + lifetime, abs=EPS)
    assert "refused" in expired["diagnostic"], expired
    _, _, (block,), returned = parse_dsn(the_dsn(hop1, "sender@src.test").data)
    assert field(block, "Action") == "failed" and field(block, "Status") == "4.4.7"
    assert "refused" in field(block, "Diagnostic-Code"), field(block, "Diagnostic-Code")
    assert returned["Message-ID"] == "<expiry@client.test>"
    assert hop1.queued() == [] and len(hop1.events_named("dsn")) == 1


# -- a node killed and restarted ---------------------------------------------------------


def test_killed_node_delivers_its_deferred_mail_after_restart() -> None:
    """
    hop1 is killed with a deferred message in its queue; while it is down it
    refuses connections; restarted, it recovers the message from its spool
    and delivers it at the retry time it had recorded, once.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"], start=False)
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], message("restart"))
    retry = due(hop1, qid)
    net.advance(10)
    hop1.stop()
    with pytest.raises(ConnectionRefusedError):
        hop1.submit("sender@src.test", ["user@dest.test"], message("refused"))
    hop2.start()
    net.advance(10)
    assert hop2.mailboxes.mail == [] and hop1.events_named("sent") == []
    hop1.start()
    assert hop1.queued() == [qid]
    net.advance(600)
    (mail,) = hop2.mailboxes.delivered("user@dest.test")
    assert parse(mail.data)["Message-ID"] == "<restart@client.test>"
    (sent,) = hop1.events_named("sent")
    assert sent["time"] == pytest.approx(retry, abs=EPS)
    assert hop1.queued() == [] and hop1.spool.count() == 0


def test_killed_before_the_next_hops_reply_sends_again() -> None:
    """
    hop1 is killed after hop2 took the message but before hop2's 250
    reached it: restarted, hop1 still has it and sends it again (the window
    of RFC 1047). hop2 recognises the transfer (XTXN=hop1/<qid>, same bytes,
    same recipient), answers 250 with its original queue id and does not
    queue it again: delivered exactly once; hop1's queue is then empty.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    # The network runs only until hop2 has committed the message.
    replies = hop1.submit("sender@src.test", ["user@dest.test"], message("dup"),
                          until=lambda: hop2.events_named("received"))
    assert any(code == 250 and QUEUED.search(text) for code, text in replies), replies
    assert len(hop2.mailboxes.mail) == 1 and hop1.events_named("sent") == []
    (received,) = hop2.events_named("received")
    hop1.stop()
    hop1.start()
    net.advance(60)
    copies = hop2.mailboxes.delivered("user@dest.test")
    assert len(copies) == 1, copies
    (duplicate,) = hop2.events_named("duplicate")
    assert duplicate["queue_id"] == received["queue_id"]
    assert duplicate["origin"].startswith("hop1/") and duplicate["recipients"] == ["user@dest.test"]
    (sent,) = hop1.events_named("sent")
    assert sent["next_queue_id"] == received["queue_id"], sent
    assert hop1.queued() == [] and hop1.spool.count() == 0


def test_retransmission_after_the_next_hop_restarted_is_recognised() -> None:
    """
    As above, but hop2 has meanwhile delivered the message, removed it from
    its queue and been restarted itself: the transfer is remembered through
    its journal, not only its queue.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    hop1.submit("sender@src.test", ["user@dest.test"], message("dup2"),
                until=lambda: hop2.events_named("received"))
    hop1.stop()
    net.run()
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1 and hop2.spool.count() == 0
    hop2.stop()
    hop2.start()
    hop1.start()
    net.advance(60)
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1
    assert len(hop2.events_named("duplicate")) == 1 and hop1.queued() == []


def test_a_relay_killed_while_its_outcome_waits_to_be_recorded_delivers_once() -> None:
    """
    hop1 records a named transfer's 250 only C{SETTLE_DELAY} after it
    (QueueRunner._later), as a real node does. Killed in that interval, it
    still has the message queued; after its restart it sends it again marked
    C{XTXNAGAIN}, and hop2 (which has delivered it and kept the transfer in
    its journal) recognises it: one copy, nothing left queued, and the
    C{sent} event names hop2's first queue id. Recorded in time, the next
    message is not sent again.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF,
                        settle_delay=SETTLE_DELAY)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], message("settle"))
    net.run()  # the clock does not move: hop1's outcome waits to be recorded
    (received,) = hop2.events_named("received")
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1 and hop2.queued() == []
    assert hop1.queued() == [qid] and hop1.events_named("sent") == []
    hop1.stop()
    hop1.start()
    net.advance(120)
    assert hop1.queued() == [] and hop2.queued() == []
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1
    assert [d["origin"] for d in hop2.events_named("duplicate")] == [f"hop1/{qid}"]
    (sent,) = hop1.events_named("sent", queue_id=qid)
    assert sent["next_queue_id"] == received["queue_id"]

    # Recorded in time: nothing to send again.
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], message("settle-2"))
    net.run()
    assert hop1.queued() == [qid]
    net.advance(SETTLE_DELAY)
    assert hop1.queued() == [] and len(hop1.events_named("sent", queue_id=qid)) == 1
    assert len(hop2.events_named("duplicate")) == 1 and len(hop2.mailboxes.delivered("user@dest.test")) == 2


@pytest.mark.parametrize("peer_holds_it", [True, False])
def test_a_transfer_made_again_may_be_recognised_by_another_worker(peer_holds_it: bool) -> None:
    """
    In a node with workers, a transfer made again may reach another worker
    than the first time (they accept on the same sockets). hop1, restarted
    after a kill -9, marks its recovered message's transfer C{XTXNAGAIN};
    the worker of hop2 that gets it does not know it and asks the other
    workers (C{Intake.peer_transfers}; here, the first worker's window):
    the answer is 250 with the first worker's queue id, delivered once. If
    no worker holds it, it is queued again (at least once). A first
    transfer is not marked, so nobody is asked for it.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    first_worker = hop2.window
    asked: list[tuple[str, list[str]]] = []

    def peers(origin: str, digest: str, recipients: list[str]) -> Deferred[PeerAnswer]:
        asked.append((origin, recipients))
        found = first_worker.match(origin, digest)
        return succeed(PeerAnswer(found.queue_id if peer_holds_it and found.all(recipients) else None))

    hop2.intake.peer_transfers = peers
    hop1.submit("sender@src.test", ["user@dest.test"], message("again"),
                until=lambda: hop2.events_named("received"))
    (received,) = hop2.events_named("received")
    assert asked == []
    # The transfer made again reaches another worker: its window is empty.
    hop2.intake.window = TransferWindow(None, 86400, 1000, hop2.reactor.seconds)
    (qid,) = hop1.queued()
    hop1.stop()
    hop1.start()
    net.advance(60)
    assert asked == [(f"hop1/{qid}", ["user@dest.test"])]
    copies = hop2.mailboxes.delivered("user@dest.test")
    (sent,) = hop1.events_named("sent")
    if peer_holds_it:
        assert len(copies) == 1
        (duplicate,) = hop2.events_named("duplicate")
        assert duplicate["queue_id"] == received["queue_id"] == sent["next_queue_id"]
    else:
        assert len(copies) == 2 and hop2.events_named("duplicate") == []
        assert sent["next_queue_id"] != received["queue_id"]
    assert hop1.queued() == []


def test_a_lost_final_reply_marks_the_retry_a_deferral_does_not() -> None:
    """
    hop2 is killed after committing a message, before its 250 reaches
    hop1: hop1 (not restarted) lost the connection with the whole message
    sent, so its retry is marked C{XTXNAGAIN} and the worker that gets it
    asks the others. A message that hop2 never took (hop2 down at the
    time: a deferral) is retried unmarked: nobody is asked.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    hop1.submit("sender@src.test", ["user@dest.test"], message("lost-reply"),
                until=lambda: hop2.events_named("received"))
    (lost,) = hop1.queued()
    hop2.stop()
    hop1.submit("sender@src.test", ["user@dest.test"], message("while-down"))
    (lost2, down) = sorted(hop1.queued())
    assert lost2 == lost
    hop2.start()
    # The retries reach a worker whose window is empty; the other worker's is hop2's.
    other_worker = hop2.window
    hop2.intake.window = TransferWindow(None, 86400, 1000, hop2.reactor.seconds)
    asked: list[str] = []

    def peers(origin: str, digest: str, recipients: list[str]) -> Deferred[PeerAnswer]:
        asked.append(origin)
        found = other_worker.match(origin, digest)
        return succeed(PeerAnswer(found.queue_id if found.all(recipients) else None))

    hop2.intake.peer_transfers = peers
    net.advance(300)  # the retries: minimal_backoff 60 s, with jitter
    assert hop1.queued() == []
    assert asked == [f"hop1/{lost}"]
    # One copy of each: the first recognised through the other worker.
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 2
    assert [d["origin"] for d in hop2.events_named("duplicate")] == [f"hop1/{lost}"]


def test_a_transfer_made_again_waits_while_the_next_hop_recovers() -> None:
    """
    While hop2 recovers its queue (in the background, after its first 220)
    it still offers XTXN: hop1's transfer is named and remembered as any
    other. hop1 is then killed before recording hop2's 250, and hop2 is
    restarted and has not read that message back yet (its window is not
    complete): the transfer made again (C{XTXNAGAIN}) may be one it
    accepted, so it is answered 451 4.3.0 and nothing is queued; hop1
    keeps it. Once hop2's window is complete, the retry is recognised:
    delivered exactly once. (The lab's power-cut test found the first
    half: a transfer accepted unnamed during recovery, queued twice.)
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    hop2.window.complete = False  # hop2 has just started: its queue is being read
    hop1.submit("sender@src.test", ["user@dest.test"], message("recovering"),
                until=lambda: hop2.events_named("received"))
    (qid,) = hop1.queued()
    (received,) = hop2.events_named("received")
    assert hop2.window.holds(received["queue_id"], f"hop1/{qid}")
    hop1.stop()
    recovered = hop2.window
    recovered.complete = True
    unread = TransferWindow(None, 86400, 1000, hop2.reactor.seconds)
    unread.complete = False
    hop2.intake.window = unread  # restarted: the message's envelope not read yet
    hop1.start()
    net.advance(30)
    refused = hop2.events_named("reject")
    assert refused and all(r["code"] == 451 and r["dsn"] == "4.3.0" and r["origin"] == f"hop1/{qid}"
                           for r in refused), refused
    assert hop1.queued() == [qid] and len(hop2.mailboxes.delivered("user@dest.test")) == 1
    deferred = hop1.events_named("deferred")
    assert deferred and "451 4.3.0" in deferred[-1]["diagnostic"], deferred
    hop2.intake.window = recovered  # its recovery is over
    net.advance(600)
    assert hop1.queued() == []
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1
    (duplicate,) = hop2.events_named("duplicate")
    assert duplicate["queue_id"] == received["queue_id"]


def test_a_first_transfer_is_queued_while_recovering_one_made_again_waits() -> None:
    """
    While the window is not complete, a transfer not marked C{XTXNAGAIN} is
    a first one and is queued at once (intake runs at full speed during
    recovery); one marked, that the window does not hold, gets 451 4.3.0;
    one the window already holds is recognised. After recovery a marked
    transfer the window does not hold is queued (it was never accepted).
    """
    net = Network()
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    hop2.window.complete = False
    data = message("marks")

    def send(name: str, again: bool) -> list[tuple[int, str]]:
        return hop2.submit("sender@src.test", ["user@dest.test"], data,
                           mail_params=f"XTXN={name}" + (" XTXNAGAIN" if again else ""))

    assert any(code == 250 for code, _ in send("up/Q1", False))
    assert any(code == 451 and "4.3.0" in text for code, text in send("up/Q2", True))
    held = send("up/Q1", True)
    assert any(code == 250 for code, _ in held)
    assert len(hop2.events_named("received")) == 1 and len(hop2.events_named("duplicate")) == 1
    hop2.window.complete = True
    assert any(code == 250 for code, _ in send("up/Q2", True))
    net.run()
    assert len(hop2.events_named("received")) == 2
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 2


def test_a_worker_that_cannot_tell_makes_a_transfer_made_again_wait() -> None:
    """
    In a node with workers, a transfer made again that the receiving worker
    does not hold, while another worker cannot tell (it recovers its
    queue, or does not answer: C{PeerAnswer.unsure}), is answered 451 4.3.0:
    queued again it could be a second copy. Once that worker answers, the
    retry is recognised: one copy.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    first_worker = hop2.window
    hop1.submit("sender@src.test", ["user@dest.test"], message("unsure"),
                until=lambda: hop2.events_named("received"))
    hop2.intake.window = TransferWindow(None, 86400, 1000, hop2.reactor.seconds)
    answers: list[PeerAnswer] = []

    def peers(origin: str, digest: str, recipients: list[str]) -> Deferred[PeerAnswer]:
        found = first_worker.match(origin, digest)
        answers.append(PeerAnswer(found.queue_id) if first_worker.complete else PeerAnswer(None, (0,)))
        return succeed(answers[-1])

    hop2.intake.peer_transfers = peers
    first_worker.complete = False
    hop1.stop()
    hop1.start()
    net.advance(30)
    assert answers and all(a.unsure == (0,) for a in answers)
    assert [r["code"] for r in hop2.events_named("reject")] == [451] * len(answers)
    assert len(hop1.queued()) == 1 and len(hop2.mailboxes.delivered("user@dest.test")) == 1
    first_worker.complete = True
    net.advance(600)
    assert hop1.queued() == [] and len(hop2.mailboxes.delivered("user@dest.test")) == 1
    assert len(hop2.events_named("duplicate")) == 1


def test_retransmission_is_queued_again_without_the_window() -> None:
    """C{[queue] duplicate_window = 0}: XTXN is not offered; at least once, as with any MTA."""
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"], queue={"duplicate_window": 0})
    hop1.submit("sender@src.test", ["user@dest.test"], message("dup3"),
                until=lambda: hop2.events_named("received"))
    hop1.stop()
    hop1.start()
    net.advance(60)
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 2
    assert hop2.events_named("duplicate") == []


def test_same_message_in_two_transactions_is_delivered_twice() -> None:
    """
    The window never drops a message that is merely similar: the same bytes
    submitted twice are two transfers (two queue ids at hop1), both delivered.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    data = message("same")
    first = submit(hop1, "sender@src.test", ["user@dest.test"], data)
    second = submit(hop1, "sender@src.test", ["user@dest.test"], data)
    assert first != second
    net.run()
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 2
    assert hop2.events_named("duplicate") == []


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_next_hop_killed_while_receiving_delivers_once(chunking: bool) -> None:
    """
    hop2 is killed in the middle of receiving a message (after DATA, before
    its final reply; or after the first of two BDAT chunks): nothing of it
    survives there; hop1 defers it (4.4.2, connection lost) and, once hop2
    is back, delivers it at its retry, exactly once.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF,
                        outbound={"chunking": chunking})
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    data = message("midway")
    if chunking:
        # Over 1 MiB: the first chunk alone begins the message at hop2.
        data += b"filler line to make two BDAT chunks\r\n" * 40_000
    qid = submit(hop1, "sender@src.test", ["user@dest.test"], data,
                 until=lambda: hop2.began)
    assert hop2.events_named("received") == [] and hop1.events_named("deferred") == []
    hop2.stop()
    net.run()
    (deferred,) = hop1.events_named("deferred")
    assert deferred["dsn"] == "4.4.2" and "lost connection" in deferred["diagnostic"], deferred
    assert hop2.spool.count() == 0
    hop2.start()
    retry = due(hop1, qid)
    net.advance(600)
    (mail,) = hop2.mailboxes.delivered("user@dest.test")
    assert parse(mail.data)["Message-ID"] == "<midway@client.test>"
    (sent,) = hop1.events_named("sent")
    assert sent["time"] == pytest.approx(retry, abs=EPS)
    assert hop1.queued() == [] and len(hop2.events_named("received")) == 1


# -- many recipients ---------------------------------------------------------------------


def test_more_recipients_than_the_next_hop_takes_at_once() -> None:
    """
    hop2 takes 100 recipients per transaction (452 4.5.3 beyond, RFC 5321
    4.5.3.1.10), and the 30 excess 452s do not count as errors toward its
    C{max_errors} (20), as with Postfix's smtpd_recipient_overshoot_limit:
    the transaction is not cut off with 421. A message to 130 recipients
    reaches all of them, each once: the first 100 at the first attempt (the
    other 30 deferred with the 452), the rest at a retry.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"], limits={"max_recipients": 100})
    rcpts = [f"user{i}@dest.test" for i in range(130)]
    submit(hop1, "sender@src.test", rcpts, message("many"))
    net.run()
    delivered = [m.mailbox for m in hop2.mailboxes.mail]
    assert len(delivered) == 100 and len(set(delivered)) == 100
    assert len(hop1.queued()) == 1
    deferred = hop1.events_named("deferred")
    assert deferred and all("4.5.3" in str(e) for e in deferred), deferred
    net.advance(600)
    assert sorted(m.mailbox for m in hop2.mailboxes.mail) == sorted(rcpts)
    assert hop1.queued() == []


# -- attempts that raise -------------------------------------------------------------


class RaisingResolver:
    """Every MX lookup raises a plain C{RuntimeError} (a broken resolver)."""

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        raise RuntimeError("resolver is broken")


class GarbageResolver(FakeResolver):
    """Answers MX lookups with a record no parser made (preference "high"): the route's group raises."""

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("MX", name))
        garbage = SimpleNamespace(type=dns.MX, ttl=60, payload=SimpleNamespace(preference="high", name="mx"))
        return succeed(([garbage], [], []))


class RaisingAttempts:
    """A delivery stage whose attempts raise for recipients in C{broken.test}."""

    def __init__(self, delivery: Any) -> None:
        self._delivery = delivery
        self.raised = 0

    def attempt(self, entry: QueueEntry, recipients: Sequence[Recipient]) -> Deferred[list[Outcome]]:
        if any(r.address.endswith("@broken.test") for r in recipients):
            self.raised += 1
            raise RuntimeError("the attempt is broken")
        result: Deferred[list[Outcome]] = self._delivery.attempt(entry, recipients)
        return result


@pytest.mark.parametrize(("breakage", "dsn"), [
    ("resolver-raises", "4.4.3"),
    ("route-group-raises", "4.3.0"),
    ("attempt-raises", "4.3.0"),
])
def test_attempts_that_raise_do_not_stall_the_queue(breakage: str, dsn: str) -> None:
    """
    The stall regression. hop1 attempts one message at a time and holds
    three messages whose every attempt raises (a resolver raising
    C{RuntimeError}; a resolver answer that makes the route's delivery
    raise; the attempt itself raising) and one message deferred because
    hop2 is down. Without any new mail arriving, the deferred message is
    retried at its due time and delivered once hop2 is up; each raising
    message is deferred (4.4.3 for the DNS failure, 4.3.0 for the internal
    errors) with the ordinary backoff, not retried every few seconds.
    """
    net = Network()
    if breakage == "resolver-raises":
        net.resolver = RaisingResolver()
    else:
        net.resolver = GarbageResolver({"broken.test": [(10, "mx.broken.test")]}, {})
    hop1 = net.add_node("hop1", queue={**BACKOFF, "concurrency": 1}, outbound={"hop_down_time": 0},
                        routes=[relay(net, ["dest.test"], "hop2"), {"domains": ["broken.test"], "action": "mx"}])
    hop2 = net.add_node("hop2", local_domains=["dest.test"], start=False)
    if breakage == "attempt-raises":
        hop1.runner.delivery = RaisingAttempts(hop1.runner.delivery)  # type: ignore[assignment]

    good = submit(hop1, "sender@src.test", ["user@dest.test"], message("good"))
    broken = [submit(hop1, "sender@src.test", [f"u{i}@broken.test"], message(f"broken{i}", rcpt=f"u{i}@broken.test"))
              for i in range(3)]
    retry = due(hop1, good)
    net.advance(10)
    hop2.start()
    net.advance(1000)

    (sent,) = hop1.events_named("sent", queue_id=good)
    assert sent["time"] == pytest.approx(retry, abs=EPS), "the deferred message was not retried on time"
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 1
    for qid in broken:
        deferred = hop1.events_named("deferred", queue_id=qid)
        assert {e["dsn"] for e in deferred} == {dsn}, deferred
        attempts = [e["time"] for e in deferred]
        assert 5 <= len(attempts) <= 7, attempts  # ~0, 60, 180, 420, 660, 900
        assert_backoff(attempts, 60, 240)
    assert sorted(hop1.queued()) == sorted(broken)
    assert hop1.events_named("bounced") == [] and hop1.runner._slots == 0
    if isinstance(hop1.runner.delivery, RaisingAttempts):
        assert hop1.runner.delivery.raised == sum(len(hop1.events_named("deferred", queue_id=q)) for q in broken)



def test_flush_of_a_big_queue_takes_it_a_batch_per_reactor_turn() -> None:
    """
    A flush of the whole queue takes L{QueueRunner.FLUSH_BATCH} messages
    per reactor turn (a flush of 500,000 messages in one go stalled intake
    for seconds) and answers once all are taken: a message that left the
    queue meanwhile is not counted, every other one is attempted.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue=BACKOFF)
    hop2 = net.add_node("hop2", local_domains=["dest.test"], start=False)
    for i in range(10):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"batch{i}"))
    net.advance(30)
    queued = hop1.queued()
    assert len(queued) == 10
    hop2.start()
    hop1.runner.FLUSH_BATCH = 3
    flushed: list[int] = []
    hop1.runner.flush().addCallback(flushed.append)
    assert flushed == []  # 3 taken; the rest on later turns
    deleted: list[bool] = []
    hop1.runner.delete(queued[-1]).addCallback(deleted.append)
    net.run(until=lambda: flushed)
    assert deleted == [True] and flushed == [9]
    net.run()
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 9
    assert hop1.queued() == []


def test_due_messages_wait_for_a_free_attempt_slot() -> None:
    """
    With one attempt slot ([queue] concurrency = 1), messages that fall due
    together (a flush after hop2 came back) are attempted one after another,
    each as soon as the one before it is done: all are delivered at the
    time of the flush, none waits for a timer or for new mail.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")], queue={**BACKOFF, "concurrency": 1})
    hop2 = net.add_node("hop2", local_domains=["dest.test"], start=False)
    for i in range(5):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"slot{i}"))
    net.advance(30)
    hop2.start()
    now = net.reactor.seconds()
    flushed: list[int] = []
    hop1.runner.flush().addCallback(flushed.append)
    assert flushed == [5]  # a queue of one batch: at once
    net.run()
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 5
    assert [e["time"] for e in hop1.events_named("sent")] == [now] * 5
    assert hop1.queued() == [] and hop1.runner._slots == 0

# -- mx routes --------------------------------------------------------------------------


def mx_network(net: Network, resolver: FakeResolver) -> tuple[NetNode, NetNode]:
    """hop1 (senders in src.test) sends everything else by MX; hop2 is a mail exchanger."""
    net.resolver = resolver
    hop1 = net.add_node("hop1", local_domains=["src.test"], routes=[{"domains": ["*"], "action": "mx"}])
    hop2 = net.add_node("hop2", local_domains=["dest.test", "bare.test"])
    return hop1, hop2


def test_mx_route_goes_to_the_mail_exchangers_by_preference() -> None:
    """
    An C{mx} route looks up the recipient domain's MX records and tries the
    hosts by preference: the preference-10 host refuses connections, so the
    message goes to the preference-20 host (a node), and the event says so.
    """
    net = Network()
    resolver = FakeResolver(
        {"dest.test": [(20, "mx2.dest.test"), (10, "mx1.dest.test")]},
        {"mx1.dest.test": net.address_of("dead"), "mx2.dest.test": net.address_of("hop2")},
    )
    hop1, hop2 = mx_network(net, resolver)
    submit(hop1, "sender@src.test", ["user@dest.test"], message("mx"))
    net.run()
    (mail,) = hop2.mailboxes.delivered("user@dest.test")
    assert parse(mail.data)["Message-ID"] == "<mx@client.test>"
    (sent,) = hop1.events_named("sent")
    assert sent["relay"] == f"mx2.dest.test[{hop2.address}]:25", sent
    (tried,) = sent["tried"]
    assert tried["relay"] == f"mx1.dest.test[{net.address_of('dead')}]:25" and tried["dsn"] == "4.4.1", sent
    assert ("MX", "dest.test") in resolver.queries
    assert resolver.queries.index(("A", "mx1.dest.test")) < resolver.queries.index(("A", "mx2.dest.test"))


def test_mx_route_without_mx_records_uses_the_domain_address() -> None:
    """A domain with no MX record but an address is its own mail exchanger (RFC 5321 5.1)."""
    net = Network()
    resolver = FakeResolver({}, {"bare.test": net.address_of("hop2")})
    hop1, hop2 = mx_network(net, resolver)
    submit(hop1, "sender@src.test", ["user@bare.test"], message("bare", rcpt="user@bare.test"))
    net.run()
    assert len(hop2.mailboxes.delivered("user@bare.test")) == 1
    assert sorted(resolver.queries) == [("A", "bare.test"), ("AAAA", "bare.test"), ("MX", "bare.test")]


@pytest.mark.parametrize(("mx", "status"), [
    ({"dest.test": [(0, "")]}, "5.1.10"),  # null MX, RFC 7505
    ({}, "5.1.2"),  # NXDOMAIN
], ids=["null-mx", "nxdomain"])
def test_mx_route_bounces_a_domain_that_takes_no_mail(mx: dict[str, list[tuple[int, str]]], status: str) -> None:
    """
    A null MX (RFC 7505) bounces with 5.1.10 and a domain that does not
    exist (NXDOMAIN) with 5.1.2, at the first attempt, with a DSN to the
    sender; nothing is sent anywhere.
    """
    net = Network()
    hop1, hop2 = mx_network(net, FakeResolver(mx, {}))
    submit(hop1, "sender@src.test", ["user@dest.test"], message("nomail"))
    net.run()
    (bounced,) = hop1.events_named("bounced")
    assert bounced["dsn"] == status and bounced["recipient"] == "user@dest.test", bounced
    _, _, (block,), returned = parse_dsn(the_dsn(hop1, "sender@src.test").data)
    assert field(block, "Action") == "failed" and field(block, "Status") == status
    assert "dest.test" in field(block, "Diagnostic-Code")
    assert returned["Message-ID"] == "<nomail@client.test>"
    assert hop1.events_named("sent", sender="sender@src.test") == [] and hop2.mailboxes.mail == []
    assert hop1.queued() == []


# -- connections ------------------------------------------------------------------------


def connections(node: NetNode) -> int:
    """How many connections C{node} received messages on (told by the client port)."""
    return len({e["client_port"] for e in node.events_named("received")})


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_connection_reuse_paced(reuse: bool) -> None:
    """
    Messages sent one after another, each relayed before the next comes:
    with connection reuse they share one connection while it idles less
    than reuse_idle_time, and a new one is made after it; without reuse
    each message has its own connection.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2")],
                        outbound={"connection_reuse": reuse, "reuse_idle_time": 2.0})
    hop2 = net.add_node("hop2", local_domains=["dest.test"])
    for i in range(5):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"paced{i}"))
        net.advance(1)
    assert connections(hop2) == (1 if reuse else 5)
    net.advance(5)
    submit(hop1, "sender@src.test", ["user@dest.test"], message("late"))
    net.run()
    assert connections(hop2) == (2 if reuse else 6)
    assert len(hop2.mailboxes.delivered("user@dest.test")) == 6


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_connection_reuse_burst(reuse: bool) -> None:
    """
    Twenty messages due at once (a flush after hop2 came back) go over at
    most the route's concurrency (3) connections with reuse, each message
    once; without reuse over 20 connections.
    """
    net = Network()
    hop1 = net.add_node("hop1", routes=[relay(net, ["dest.test"], "hop2", concurrency=3)], queue=BACKOFF,
                        outbound={"connection_reuse": reuse})
    hop2 = net.add_node("hop2", local_domains=["dest.test"], start=False)
    for i in range(20):
        submit(hop1, "sender@src.test", ["user@dest.test"], message(f"burst{i}"))
    assert len(hop1.queued()) == 20
    hop2.start()
    flushed: list[int] = []
    hop1.runner.flush().addCallback(flushed.append)
    assert flushed == [20]  # a queue of one batch: at once
    net.run()
    mail = hop2.mailboxes.delivered("user@dest.test")
    assert sorted(parse(m.data)["Message-ID"] for m in mail) == sorted(f"<burst{i}@client.test>" for i in range(20))
    if reuse:
        assert 1 <= connections(hop2) <= 3, connections(hop2)
    else:
        assert connections(hop2) == 20
    assert hop1.queued() == []


def test_retransmission_of_a_cut_through_refusal_is_not_taken_for_a_duplicate() -> None:
    """
    A cut-through attempt's refusal is the client's answer; the transfer was
    never acknowledged, so if the upstream (which did not see the 5xx) sends
    it again, it is attempted again -- not answered 250 as a duplicate and
    dropped (found by review: mail was lost that way).
    """
    net = Network()
    hop1, hop2 = cut_through_pair(net)
    data = message("ct-bad", rcpt="unknown@dest.test")
    first = hop1.submit("sender@src.test", ["unknown@dest.test"], data, mail_params="XTXN=up/Q1")
    again = hop1.submit("sender@src.test", ["unknown@dest.test"], data, mail_params="XTXN=up/Q1")
    assert first[-2][0] == 550 and again[-2][0] == 550, (first, again)
    assert hop1.events_named("duplicate") == []
