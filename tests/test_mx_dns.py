"""
MX delivery (RFC 5321 section 5, RFC 7505; C{relaynet/delivery/mx.py}) by
a real C{twistd -n relaynet} node against a real, independent authoritative
DNS server on loopback: NSD, started here with a private configuration on a
free port (L{harness.dns.NSDServer}), is the node's only resolver
(C{[dns] servers}). The exchangers are Postfix's C{smtp-sink} on other
loopback addresses (127.0.0.x) at one port, the route's C{mx_port}; the node
listens on 127.0.0.1 at that same port, so an MX record naming 127.0.0.1 is
the node itself.

One node, one NSD and the sinks are shared by the module; each test has its
own domain (zone) and its own exchangers, and reads the outcome from the
node's events (C{relay} of C{sent}: C{mx1.pref.test[127.0.0.2]:PORT};
C{dsn} of C{bounced}/C{deferred}), from the sinks' message counters and from
the DSNs the node sends back to the sender.

The in-process tests of the same lookups are in C{tests/test_mx.py}. The last
test checks relaynet's own lab zones (L{relaynet.zones}, served by
C{twisted.names}) with an independent client, C{drill} (ldnsutils).

A DNS server that never answers (deferred 4.4.3 too) is tested with the
node's resolver on a clock: for real, Twisted's resolver gives up only after
1 + 3 + 11 + 45 s.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.names import dns

from harness.dns import (
    NSDServer,
    ZoneServer,
    drill_binary,
    nsd_unavailable_reason,
    query,
    rcode,
    zone_text,
)
from harness.nodeproc import HOST, NodeProcess, free_port, wait_for
from harness.peers import SMTP_SINK, SmtpSink, missing_binaries
from relaynet.delivery.attempt import system_resolver
from relaynet.delivery.mx import MXAnswer, MXLookup

try:
    from test_forwarding import (
        assert_failed_report,
        make_message,
        open_session,
        parse_dsn,
        returned_message_id,
        send,
        token,
        transaction,
    )
except ImportError:  # tests/ became a package
    from tests.test_forwarding import (  # type: ignore[no-redef]
        assert_failed_report,
        make_message,
        open_session,
        parse_dsn,
        returned_message_id,
        send,
        token,
        transaction,
    )

_NSD_REASON = nsd_unavailable_reason()
_SINK_MISSING = missing_binaries([SMTP_SINK])

pytestmark = pytest.mark.slow

requires_nsd = pytest.mark.skipif(_NSD_REASON is not None, reason=str(_NSD_REASON))
requires_sink = pytest.mark.skipif(
    bool(_SINK_MISSING), reason=f"smtp-sink not installed ({', '.join(_SINK_MISSING)}; Debian package postfix)"
)

#: Bound on every wait for an event, a message or a DSN.
TIMEOUT = 20.0

#: The exchangers that listen (one smtp-sink each), by role.
SINKS = {
    "pref1": "127.0.0.2", "pref2": "127.0.0.3",
    "share_a": "127.0.0.4", "share_b": "127.0.0.5",
    "down_live": "127.0.0.6",
    "family": "127.0.0.8",
    "implicit": "127.0.0.9",
    "backup_primary": "127.0.0.10", "backup_third": "127.0.0.11",
    "big": "127.0.0.13", "partial": "127.0.0.14",
}
#: Addresses where nothing listens at the port (connections are refused).
DEAD = {"down_dead": "127.0.0.7", "backup2_primary": "127.0.0.12"}
#: The node listens here; an MX naming it is the node itself.
NODE = HOST


#: The number of MX records of big.test.
BIG_MX = 40


def zones() -> dict[str, str]:
    """The zones NSD serves: one domain per test (records listed out of preference order on purpose)."""
    s, d = SINKS, DEAD
    return {
        "pref.test": zone_text("pref.test", [
            "@ MX 20 mx2", "@ MX 10 mx1", f"mx2 A {s['pref2']}", f"mx1 A {s['pref1']}",
        ]),
        "share.test": zone_text("share.test", [
            "@ MX 10 a", "@ MX 10 b", f"a A {s['share_a']}", f"b A {s['share_b']}",
        ]),
        "down.test": zone_text("down.test", [
            "@ MX 20 live", "@ MX 10 dead", f"live A {s['down_live']}", f"dead A {d['down_dead']}",
        ]),
        # IPv6 first (address_preference = "ipv6"); nothing listens on [::1].
        "fam.test": zone_text("fam.test", ["@ MX 10 mx", f"mx A {s['family']}", "mx AAAA ::1"]),
        "impl.test": zone_text("impl.test", [f"@ A {s['implicit']}"]),
        "null.test": zone_text("null.test", ["@ MX 0 ."]),
        "loop.test": zone_text("loop.test", ["@ MX 10 me", f"me A {NODE}"]),
        "backup.test": zone_text("backup.test", [
            "@ MX 30 third", "@ MX 20 me", "@ MX 10 primary",
            f"primary A {s['backup_primary']}", f"me A {NODE}", f"third A {s['backup_third']}",
        ]),
        "backup2.test": zone_text("backup2.test", [
            "@ MX 30 third", "@ MX 20 me", "@ MX 10 primary",
            f"primary A {d['backup2_primary']}", f"me A {NODE}", f"third A {s['backup_third']}",
        ]),
        # 40 MX records: the answer (about 850 bytes) does not fit a 512-byte
        # UDP answer (Twisted's client sends no EDNS): NSD sets TC, the
        # resolver asks again over TCP.
        "big.test": zone_text("big.test", [f"@ MX {10 + i} mx{i:02d}" for i in range(BIG_MX)] + [
            f"mx00 A {s['big']}",
        ]),
        # The preferred exchanger's address lookup fails (SERVFAIL): the next one is used.
        "partial.test": zone_text("partial.test", [
            "@ MX 10 mx.broken.test.", "@ MX 20 ok", f"ok A {s['partial']}",
        ]),
        # Every exchanger's address lookup fails: deferred.
        "allfail.test": zone_text("allfail.test", ["@ MX 10 mx.broken.test."]),
        # No exchanger has an address (its name does not exist): bounced.
        "noaddr.test": zone_text("noaddr.test", ["@ MX 10 gone"]),
        # A zone NSD fails to load (no SOA, bad records): it answers SERVFAIL.
        "broken.test": "$ORIGIN broken.test.\n@ MX ten mx\nmx A not-an-address\n",
    }


def ipv6_loopback_usable() -> bool:
    """C{True} if a socket can be bound on C{::1}."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def tcp_port_free(host: str, port: int) -> bool:
    """C{True} if C{port} can be bound on C{host} (IPv4 or IPv6) now, with SO_REUSEADDR as Twisted binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def common_port(hosts: list[str], attempts: int = 100) -> int:
    """A TCP port free on every one of C{hosts} now."""
    for _ in range(attempts):
        port = free_port(HOST)
        if all(tcp_port_free(h, port) for h in hosts):
            return port
    raise AssertionError(f"no port free on all of {hosts} in {attempts} tries")


def node_config(port: int, dns_port: int) -> str:
    """
    A node on 127.0.0.1:PORT whose one route sends every domain but
    C{src.test} (local: the senders' mailboxes, where DSNs go) by MX to PORT,
    resolving through C{127.0.0.1:DNS_PORT} only, IPv6 first.
    """
    return f"""\
[node]
name = "mxnode"
hostname = "mxnode.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface={NODE}"

[local]
domains = ["src.test"]
catch_all = true

[queue]
# One attempt per test: a deferred message is not retried while the module runs.
minimal_backoff = 600
maximal_backoff = 1200

[outbound]
connect_timeout = 5
address_preference = "ipv6"

[dns]
servers = ["{HOST}:{dns_port}"]

[[route]]
domains = ["*"]
action = "mx"
mx_port = {port}
"""


@attrs.define
class Lab:
    """The module's NSD, sinks (by role) and node, all on one port but NSD's."""

    nsd: NSDServer
    sinks: dict[str, SmtpSink]
    node: NodeProcess
    port: int
    ipv6: bool

    def relay(self, name: str, address: str) -> str:
        """How an event names exchanger C{name} at C{address} (Postfix's log format)."""
        return f"{name}[{address}]:{self.port}"

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in self.node.events()
            if (event is None or e["event"] == event) and all(e.get(k) == v for k, v in match.items())
        ]

    def describe(self) -> str:
        return (
            "--- node events:\n" + "\n".join(json.dumps(e) for e in self.node.events())
            + f"\n--- node log:\n{self.node.log_tail(25)}\n{self.nsd.log_tail(10)}"
        )

    def wait_events(self, event: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        """Poll until the node has logged C{count} matching events; @return: them."""
        try:
            return wait_for(lambda: (found := self.events(event, **match)) and len(found) >= count and found,
                            TIMEOUT, f"{count} {event} event(s) {match}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None

    def outcomes(self, rcpt: str) -> list[str]:
        """Every delivery event for C{rcpt} (received excluded)."""
        return [e["event"] for e in self.events(recipient=rcpt) if e["event"] != "received"]

    def wait_dsn(self, user: str) -> bytes:
        """The one DSN in C{user@src.test}'s mailbox (polled)."""
        try:
            (path,) = wait_for(lambda: self.node.maildir_new(user, "src.test"), TIMEOUT, f"a DSN for {user}@src.test")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None
        return path.read_bytes()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if _NSD_REASON is not None:
        pytest.skip(_NSD_REASON)
    if _SINK_MISSING:
        pytest.skip(f"smtp-sink not installed ({_SINK_MISSING[0]}; Debian package postfix)")
    base = tmp_path_factory.mktemp("mxdns")
    ipv6 = ipv6_loopback_usable()
    hosts = [NODE, *SINKS.values(), *DEAD.values()] + (["::1"] if ipv6 else [])
    port = common_port(hosts)
    sinks: dict[str, SmtpSink] = {}
    node: NodeProcess | None = None
    with NSDServer(base / "nsd", zones()) as nsd:
        try:
            for role, address in SINKS.items():
                sink = SmtpSink(base / f"sink-{role}", host=address, port=port, hostname=f"{role}.sink.test")
                sinks[role] = sink
                sink.start()
            node = NodeProcess(base / "node", config_toml=node_config(port, nsd.port), port=port, name="mxnode")
            node.start()
            yield Lab(nsd, sinks, node, port, ipv6)
        finally:
            if node is not None:
                node.__exit__(None, None, None)
            for sink in sinks.values():
                sink.stop()


def send_many(port: int, sender: str, rcpt: str, n: int) -> list[str]:
    """C{n} messages, one transaction each, in one session; @return: their Message-IDs."""
    ids = []
    with open_session(port) as s:
        for _ in range(n):
            msg, mid = make_message(token(), sender, rcpt)
            code, resp = transaction(s, sender, [rcpt], msg)
            assert code == 250, resp
            ids.append(mid)
    return ids


def send_one(lab: Lab, sender: str, rcpt: str) -> str:
    msg, mid = make_message(token(), sender, rcpt)
    code, resp = send(lab.port, sender, [rcpt], msg)
    assert code == 250, resp
    return mid


def received(lab: Lab, *roles: str) -> dict[str, int]:
    return {role: lab.sinks[role].received() for role in roles}


# -- where the mail goes -------------------------------------------------------


@requires_nsd
@requires_sink
def test_lowest_preference_first(lab: Lab) -> None:
    """
    pref.test has MX 20 mx2 and MX 10 mx1 (in that order in the zone): all
    four messages go to mx1, none to mx2.
    """
    rcpt = "user@pref.test"
    send_many(lab.port, "s@src.test", rcpt, 4)
    sent = lab.wait_events("sent", 4, recipient=rcpt)
    assert {e["relay"] for e in sent} == {lab.relay("mx1.pref.test", SINKS["pref1"])}, sent
    lab.sinks["pref1"].wait_received(4, timeout=TIMEOUT)
    assert received(lab, "pref1", "pref2") == {"pref1": 4, "pref2": 0}


@requires_nsd
@requires_sink
def test_equal_preferences_share_the_load(lab: Lab) -> None:
    """
    share.test has two exchangers of preference 10: of 16 messages each gets
    some (all on one has a chance of 2 in 65536 with a fair shuffle).
    """
    rcpt, n = "user@share.test", 16
    send_many(lab.port, "s@src.test", rcpt, n)
    sent = lab.wait_events("sent", n, recipient=rcpt)
    relays = [e["relay"] for e in sent]
    a, b = lab.relay("a.share.test", SINKS["share_a"]), lab.relay("b.share.test", SINKS["share_b"])
    assert set(relays) == {a, b}, relays
    wait_for(lambda: sum(received(lab, "share_a", "share_b").values()) >= n, TIMEOUT, f"{n} messages at the sinks")
    counts = received(lab, "share_a", "share_b")
    assert counts == {"share_a": relays.count(a), "share_b": relays.count(b)}, (counts, relays)


@requires_nsd
@requires_sink
def test_next_exchanger_when_the_preferred_one_is_down(lab: Lab) -> None:
    """
    down.test's preference-10 exchanger refuses connections (nothing
    listens): the message goes to the preference-20 one, and the event says
    the first was tried.
    """
    rcpt = "user@down.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("live.down.test", SINKS["down_live"]), sent
    assert [t["relay"] for t in sent.get("tried") or ()] == [lab.relay("dead.down.test", DEAD["down_dead"])], sent
    lab.sinks["down_live"].wait_received(1, timeout=TIMEOUT)
    assert lab.outcomes(rcpt) == ["sent"]


@requires_nsd
@requires_sink
def test_other_address_family_when_the_first_fails(lab: Lab) -> None:
    """
    fam.test's one exchanger has AAAA ::1 (nothing listens there) and A
    127.0.0.8 (a sink); with address_preference = "ipv6" the node tries
    [::1] first, then delivers over IPv4.
    """
    if not lab.ipv6:
        pytest.skip("::1 cannot be bound here (no IPv6 loopback)")
    rcpt = "user@fam.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("mx.fam.test", SINKS["family"]), sent
    assert [t["relay"] for t in sent.get("tried") or ()] == [lab.relay("mx.fam.test", "::1")], sent
    lab.sinks["family"].wait_received(1, timeout=TIMEOUT)


@requires_nsd
@requires_sink
def test_large_mx_set_over_tcp(lab: Lab) -> None:
    """
    big.test has 40 MX records: NSD's UDP answer is truncated (TC), the
    node's resolver repeats the query over TCP and the message goes to the
    preferred exchanger.
    """
    over_udp = query(lab.nsd.port, "big.test", dns.MX)
    assert over_udp is not None and over_udp.trunc and len(over_udp.answers) < BIG_MX, over_udp
    rcpt = "user@big.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("mx00.big.test", SINKS["big"]), sent
    lab.sinks["big"].wait_received(1, timeout=TIMEOUT)


@requires_nsd
@requires_sink
def test_exchanger_whose_address_lookup_fails_is_skipped(lab: Lab) -> None:
    """
    partial.test's preferred exchanger is in a zone NSD answers SERVFAIL
    for: its addresses cannot be looked up, the next exchanger gets the mail.
    """
    assert rcode(query(lab.nsd.port, "mx.broken.test", dns.A)) == "SERVFAIL"
    rcpt = "user@partial.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("ok.partial.test", SINKS["partial"]), sent
    lab.sinks["partial"].wait_received(1, timeout=TIMEOUT)


@requires_nsd
@requires_sink
def test_implicit_mx(lab: Lab) -> None:
    """impl.test has no MX record, only an A record: the domain itself is the exchanger."""
    assert rcode(query(lab.nsd.port, "impl.test", dns.MX)) == "NOERROR"
    rcpt = "user@impl.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("impl.test", SINKS["implicit"]), sent
    lab.sinks["implicit"].wait_received(1, timeout=TIMEOUT)


# -- nowhere to go ---------------------------------------------------------------


@requires_nsd
@requires_sink
@pytest.mark.parametrize(("rcpt", "dsn", "expected_rcode"), [
    ("user@null.test", "5.1.10", "NOERROR"),    # MX 0 . (RFC 7505)
    ("user@nosuch.pref.test", "5.1.2", "NXDOMAIN"),
    ("user@noaddr.test", "5.4.4", "NOERROR"),   # MX 10 gone, and gone does not exist
])
def test_bounced_with_a_dsn(lab: Lab, rcpt: str, dsn: str, expected_rcode: str) -> None:
    """
    A null MX bounces with 5.1.10, a domain that does not exist with 5.1.2,
    a domain whose exchangers have no address with 5.4.4, at the first attempt; the sender gets a DSN (multipart/report) naming
    the recipient, the status and the returned message.
    """
    domain = rcpt.partition("@")[2]
    assert rcode(query(lab.nsd.port, domain, dns.MX)) == expected_rcode
    sender_user = f"{domain.split('.')[0]}-sender"
    mid = send_one(lab, f"{sender_user}@src.test", rcpt)
    (bounced,) = lab.wait_events("bounced", recipient=rcpt)
    assert bounced["dsn"] == dsn, bounced
    _, blocks, returned = parse_dsn(lab.wait_dsn(sender_user))
    assert len(blocks) == 1, blocks
    assert_failed_report(blocks[0], rcpt, dsn)
    assert domain in str(blocks[0]["Diagnostic-Code"]), blocks[0]["Diagnostic-Code"]
    assert returned_message_id(returned) == mid
    assert lab.outcomes(rcpt) == ["bounced"]


@requires_nsd
@requires_sink
@pytest.mark.parametrize(("domain", "expected_rcode", "why"), [
    ("broken.test", "SERVFAIL", "server failure"),   # a zone NSD failed to load
    ("elsewhere.test", "REFUSED", "refused"),        # not a zone of this server
    ("allfail.test", "NOERROR", "try again"),        # its exchanger's A/AAAA: SERVFAIL
])
def test_dns_failure_defers(lab: Lab, domain: str, expected_rcode: str, why: str) -> None:
    """
    NSD answers SERVFAIL (a zone it could not load) or REFUSED (a name
    outside its zones) to the MX query, or SERVFAIL to the address queries
    of every exchanger: the message is deferred, 4.4.3, neither bounced nor
    sent.
    """
    assert rcode(query(lab.nsd.port, domain, dns.MX)) == expected_rcode
    rcpt = f"user@{domain}"
    send_one(lab, "s@src.test", rcpt)
    (deferred,) = lab.wait_events("deferred", recipient=rcpt)
    assert deferred["dsn"] == "4.4.3", deferred
    assert why in deferred["diagnostic"], deferred
    assert lab.outcomes(rcpt) == ["deferred"]


# -- the node itself as an exchanger -------------------------------------------


@requires_nsd
@requires_sink
def test_mx_on_this_node_bounces(lab: Lab) -> None:
    """loop.test's only MX is this node (127.0.0.1 at its port): bounced, 5.4.6."""
    rcpt = "user@loop.test"
    send_one(lab, "loop-sender@src.test", rcpt)
    (bounced,) = lab.wait_events("bounced", recipient=rcpt)
    assert bounced["dsn"] == "5.4.6", bounced
    _, blocks, _ = parse_dsn(lab.wait_dsn("loop-sender"))
    assert_failed_report(blocks[0], rcpt, "5.4.6")
    assert lab.outcomes(rcpt) == ["bounced"]


@requires_nsd
@requires_sink
def test_backup_mx_delivers_to_the_better_exchanger(lab: Lab) -> None:
    """
    backup.test: MX 10 primary (a sink), MX 20 this node, MX 30 third (a
    sink): the node is a backup MX and delivers to primary.
    """
    rcpt = "user@backup.test"
    send_one(lab, "s@src.test", rcpt)
    (sent,) = lab.wait_events("sent", recipient=rcpt)
    assert sent["relay"] == lab.relay("primary.backup.test", SINKS["backup_primary"]), sent
    lab.sinks["backup_primary"].wait_received(1, timeout=TIMEOUT)
    assert lab.sinks["backup_third"].received() == 0


@requires_nsd
@requires_sink
def test_backup_mx_never_uses_worse_exchangers(lab: Lab) -> None:
    """
    backup2.test: the preference-10 exchanger is down, this node is 20, a
    live sink is 30: the node defers (it waits for the better one), it does
    not hand the mail to a worse exchanger nor to itself.
    """
    rcpt = "user@backup2.test"
    send_one(lab, "s@src.test", rcpt)
    (deferred,) = lab.wait_events("deferred", recipient=rcpt)
    assert deferred["relay"] == lab.relay("primary.backup2.test", DEAD["backup2_primary"]), deferred
    assert deferred["dsn"].startswith("4."), deferred
    assert not deferred.get("tried"), deferred
    assert lab.outcomes(rcpt) == ["deferred"]
    assert lab.sinks["backup_third"].received() == 0
    # Not relayed to itself either: the node received the message once, from the test.
    assert len([e for e in lab.events("received") if rcpt in e["recipients"]]) == 1


# -- a DNS server that never answers -------------------------------------------------
#
# A real silent server costs 60 s per test (Twisted's resolver waits 1 + 3 + 11
# + 45 s, measured: 60.1 s against a bound UDP socket that is never read), so
# the node's own resolver (system_resolver, as [dns] servers builds it) runs
# here on a clock: its datagrams go nowhere and the clock is advanced.


class SilentUDP:
    """A UDP port whose datagrams are recorded and never answered."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", HOST, 0)

    def stopListening(self) -> None:
        return None


class SilentNetwork(Clock):
    """C{IReactorTime} and C{listenUDP}: every UDP port is a L{SilentUDP}."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[SilentUDP] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> SilentUDP:
        transport = SilentUDP()
        self.ports.append(transport)
        protocol.makeConnection(transport)
        return transport


def silent_lookup(seconds: int) -> tuple[list[Any], SilentNetwork]:
    """An MX lookup through the node's resolver to a silent server, C{seconds} of clock later."""
    net = SilentNetwork()
    mx = MXLookup(system_resolver(net, [(HOST, 5353)]), net.seconds, preference=lambda: "ipv4")
    out: list[Any] = []
    mx.lookup("dest.test").addBoth(out.append)
    for _ in range(seconds):
        net.advance(1)
    return out, net


def test_silent_dns_server_defers() -> None:
    """
    A DNS server that never answers: the MX query is repeated to the
    configured server only (never the machine's resolver), then the message
    is deferred, 4.4.3, once the resolver gives up (60 s of clock).
    """
    out, net = silent_lookup(61)
    (answer,) = out
    assert isinstance(answer, MXAnswer), answer
    assert answer.failure is not None and answer.failure[:2] == ("deferred", "4.4.3"), answer
    sent = [addr for port in net.ports for _, addr in port.sent]
    assert sent and set(sent) == {(HOST, 5353)}, sent


def test_silent_dns_server_diagnostic_says_timeout() -> None:
    """The deferral's diagnostic names the cause, as for SERVFAIL and REFUSED: a timeout."""
    out, _ = silent_lookup(61)
    (answer,) = out
    assert answer.failure is not None and answer.failure[2].endswith("(timeout)"), answer.failure


# -- relaynet's own lab zones, checked by an independent client -------------------

LAB_ZONES = {
    "dest.test": ["@ MX 20 mx2", "@ MX 10 mx1", "mx1 A 192.0.2.1", "mx1 AAAA 2001:db8::1", "mx2 A 192.0.2.2"],
    "null.test": ["@ MX 0 ."],
    "bare.test": ["@ A 192.0.2.7"],
}


def drill(port: int, qtype: str, name: str) -> tuple[str, list[list[str]]]:
    """C{drill -p PORT QTYPE NAME @127.0.0.1}; @return: the rcode and the answer records, split."""
    binary = drill_binary()
    assert binary is not None
    out = subprocess.run([binary, "-p", str(port), qtype, name, f"@{HOST}"],
                         check=False, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    header = [line for line in out.stdout.splitlines() if "rcode:" in line]
    assert header, out.stdout
    code = header[0].split("rcode:")[1].split(",")[0].strip()
    records, in_answer = [], False
    for line in out.stdout.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            in_answer = True
        elif line.startswith(";;"):
            in_answer = False
        elif in_answer and line.strip():
            records.append(line.split())
    return code, records


@pytest.mark.skipif(drill_binary() is None, reason="drill not installed (Debian package ldnsutils)")
def test_lab_zones_answer_drill(tmp_path: Path) -> None:
    """
    relaynet.zones served by twisted.names (as 'relaynet lab up' does) give
    drill the MX, A and AAAA records of the spec, NXDOMAIN for a missing
    name and an empty answer (NODATA) for a missing type.
    """
    with ZoneServer(tmp_path / "zones", LAB_ZONES) as server:
        code, records = drill(server.port, "MX", "dest.test")
        assert code == "NOERROR"
        assert sorted((r[0], r[3], r[4], r[5]) for r in records) == [
            ("dest.test.", "MX", "10", "mx1.dest.test."), ("dest.test.", "MX", "20", "mx2.dest.test."),
        ], records
        assert drill(server.port, "A", "mx1.dest.test") == ("NOERROR", [["mx1.dest.test.", "300", "IN", "A", "192.0.2.1"]])
        assert drill(server.port, "AAAA", "mx1.dest.test") == (
            "NOERROR", [["mx1.dest.test.", "300", "IN", "AAAA", "2001:db8::1"]])
        assert drill(server.port, "MX", "null.test") == ("NOERROR", [["null.test.", "300", "IN", "MX", "0", "."]])
        assert drill(server.port, "A", "nx.dest.test") == ("NXDOMAIN", [])
        assert drill(server.port, "MX", "bare.test") == ("NOERROR", [])
        assert drill(server.port, "A", "bare.test") == ("NOERROR", [["bare.test.", "300", "IN", "A", "192.0.2.7"]])
