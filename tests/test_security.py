"""
Security tests of the relay intake and of a node as a whole: relay control
(no open relay), limits, SMTP smuggling, bad input, files and privileges.

In memory (a L{relaynet.testing} intake): trusted networks (IPv4, IPv6,
v4-mapped), the default config, classic open-relay address tricks, the
recipient / command-line / text-line / error / connection limits, NUL and
8-bit bytes in commands, malformed paths.

Real processes (C{slow}): an untrusted client bound to 127.0.0.2 gets 554;
the published SMTP smuggling vectors sent through a node (both
C{bare_newlines} modes) to Postfix's C{smtp-sink} and to a byte-recording
next hop; connection limits per IP and in total; DATA cut off mid-message;
random bytes; file modes under umask 000; C{twistd -u/-g} privilege drop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import smtplib
import socket
import struct
import sysconfig
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from harness.nodeproc import HOST, TWISTD, NodeProcess, free_port, read_reply, wait_for

from relaynet.config import ConfigError, Limits, parse_config
from harness.peers import SmtpSink
from relaynet.intake.policy import check_recipient
from relaynet.testing import connect, send, spooled, take_replies
from relaynet.testing import make_intake as _make_intake

DELIVERY_TIMEOUT = 20.0
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
Reply = tuple[int, str]


def codes(replies: list[Reply]) -> list[int]:
    return [c for c, _ in replies]


def make_intake(tmp_path: Path, overrides: dict[str, Any] | None = None, toml: str | None = None) -> Any:
    """
    L{relaynet.testing.make_intake} with C{[limits] forbid_unauth_pipelining
    = false} unless C{overrides} say otherwise: these tests send EHLO and the
    next commands in one read for brevity (improper pipelining, which has
    tests of its own).
    """
    merged = dict(overrides or {})
    merged["limits"] = {"forbid_unauth_pipelining": False, **merged.get("limits", {})}
    return _make_intake(tmp_path, merged, toml)


def session(intake: Any, ip: str = "127.0.0.1", port: int = 40000, listener: Any = None) -> tuple[Any, Any]:
    protocol, transport = connect(intake, listener, peer=(ip, port))
    take_replies(transport)
    return protocol, transport


# -- relay control ------------------------------------------------------------


RELAY_TOML = """
[relay]
trusted_networks = ["192.0.2.0/24", "2001:db8:1::/48"]
[[route]]
domains = ["remote.test", "*.remote.test"]
action = "relay"
next_hops = ["tcp:198.51.100.1:25"]
[[route]]
domains = ["*"]
action = "mx"
"""


@pytest.mark.parametrize("ip, trusted", [
    ("192.0.2.77", True),
    ("192.0.3.1", False),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("2001:db8:1::5", True),
    ("2001:db8:1:ffff::1", True),
    ("2001:db8:2::5", False),
    ("::1", False),
    ("::ffff:192.0.2.9", True),
    ("::ffff:10.0.0.1", False),
])
def test_relay_only_for_trusted_networks(tmp_path: Path, ip: str, trusted: bool) -> None:
    """
    Relaying (route or MX) to a non-local domain: 250 inside the configured
    IPv4/IPv6 CIDRs, 554 5.7.1 from anywhere else; local recipients are
    always accepted.
    """
    intake, _, _ = make_intake(tmp_path, toml=RELAY_TOML)
    p, t = session(intake, ip)
    assert codes(send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@elsewhere.test>\r\n")) == [250, 250]
    for rcpt in (b"x@remote.test", b"x@sub.remote.test", b"x@anywhere.example"):
        ((code, text),) = send(p, t, b"RCPT TO:<" + rcpt + b">\r\n")
        if trusted:
            assert code == 250, (rcpt, text)
        else:
            assert (code, text.split()[0]) == (554, "5.7.1"), (rcpt, text)
    assert send(p, t, b"RCPT TO:<user@localhost>\r\n")[0][0] == 250


@pytest.mark.parametrize("ip", ["10.0.0.1", "192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1"])
def test_default_config_is_not_an_open_relay(tmp_path: Path, ip: str) -> None:
    """The embedded default (no file): only loopback is trusted, nothing is routed."""
    config = parse_config({"node": {"spool": str(tmp_path)}})
    for domain in ("example.com", "gmail.com", "remote.test"):
        verdict = check_recipient(config, "victim", domain, ip)
        assert not verdict.accepted
        assert (verdict.code, verdict.enhanced) == (554, "5.7.1")
    assert check_recipient(config, "user", "localhost", ip).accepted
    # Loopback is trusted, yet nothing goes out without a route.
    assert not check_recipient(config, "victim", "example.com", "127.0.0.1").accepted


@pytest.mark.parametrize("rcpt", [
    b"<victim%remote.test@localhost>",
    b"<remote.test!victim@localhost>",
    b"<\"victim@remote.test\"@localhost>",
    b"<@localhost:victim@remote.test>",
    b"<@localhost,@relay.test:victim@remote.test>",
    b"<victim@remote.test@localhost>",
    b"<victim@[198.51.100.1]>",
    b"<victim@[IPv6:2001:db8::1]>",
    b"<victim@remote.test.>",
    b"<victim@REMOTE.TEST>",
    b"<victim@localhost.remote.test>",
    b"<victim>",
])
def test_classic_open_relay_tricks_refused(tmp_path: Path, rcpt: bytes) -> None:
    """
    Percent hack, bang path, quoted local part, source routes, address
    literals, trailing dot, case: from an untrusted client each is refused
    (5xx) or, at most, delivered to a local mailbox; nothing is routed out.
    """
    intake, _, pool = make_intake(tmp_path, toml=RELAY_TOML)
    p, t = session(intake, "10.9.9.9")
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@elsewhere.test>\r\n")
    ((code, text),) = send(p, t, b"RCPT TO:" + rcpt + b"\r\n")
    if code == 250:
        assert codes(send(p, t, b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")) == [354]
        pool.run_all()
        (msg,) = spooled(intake.spool)
        assert all(r.route == "local" for r in msg.envelope.recipients), msg.envelope
    else:
        assert 500 <= code < 600, text


def test_configured_relay_domains_accept_untrusted_clients(tmp_path: Path) -> None:
    """
    Domains in [relay] relay_domains (Postfix's relay_domains) are relayed for
    anyone; other relay routes stay trusted-only, and the pattern is exact.
    """
    config = parse_config({
        "node": {"spool": str(tmp_path)},
        "relay": {"trusted_networks": ["127.0.0.1/32"], "relay_domains": ["backup.test"]},
        "route": [{"domains": ["backup.test", "other.test"], "action": "relay",
                   "next_hops": ["tcp:198.51.100.1:25"]}],
    })
    assert check_recipient(config, "user", "backup.test", "203.0.113.5").accepted
    assert not check_recipient(config, "user", "other.test", "203.0.113.5").accepted
    assert not check_recipient(config, "user", "sub.backup.test", "203.0.113.5").accepted


# -- limits -------------------------------------------------------------------


def test_limits_defaults_and_floors(tmp_path: Path) -> None:
    """
    RFC 5321 defaults, and values below its minimums are configuration
    errors: at least 100 recipients, 512-octet command lines, 1000-octet text
    lines.
    """
    d = Limits()
    assert d.max_recipients >= 100
    assert d.max_command_length >= 512
    assert d.max_line_length >= 1000
    assert d.bare_newlines == "reject"
    assert d.recipient_overshoot_limit == 1000  # Postfix's smtpd_recipient_overshoot_limit
    assert d.forbid_unauth_pipelining is True  # Postfix >= 3.9
    assert 0 < d.max_errors <= 100
    assert 0 < d.max_connections_per_ip <= d.max_connections
    assert d.idle_timeout >= 300 and d.data_timeout >= 180  # RFC 5321 4.5.3.2.7, 4.5.3.2.6
    for key, bad in [("max_recipients", 99), ("max_command_length", 511), ("max_line_length", 999),
                     ("max_connections", 0), ("max_connections_per_ip", 0), ("max_errors", 0),
                     ("bare_newlines", "accept"), ("recipient_overshoot_limit", -1),
                     ("forbid_unauth_pipelining", "yes")]:
        with pytest.raises(ConfigError) as e:
            parse_config({"node": {"spool": str(tmp_path)}, "limits": {key: bad}})
        assert e.value.key == f"limits.{key}"


def test_thousands_of_recipients(tmp_path: Path) -> None:
    """
    5000 pipelined RCPTs: exactly max_recipients accepted, 452 4.5.3 after
    that; the first recipient_overshoot_limit (1000) of those are not
    errors, then the error limit ends the session; the replies stay bounded.
    """
    intake, _, _ = make_intake(tmp_path, {"limits": {"max_recipients": 1000, "max_errors": 20}})
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    replies = send(p, t, b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(5000)))
    assert codes(replies[:1000]) == [250] * 1000
    assert replies[1000][0] == 452 and replies[1000][1].startswith("4.5.3")
    assert 250 not in codes(replies[1000:])
    assert replies[-1][0] == 421
    assert len(replies) == 1000 + 1000 + 20 + 1
    assert t.disconnecting


def test_recipient_limit_keeps_the_transaction(tmp_path: Path) -> None:
    """
    Past max_recipients RCPT gets 452 4.5.3, and the transaction goes on
    with the recipients accepted before: DATA stores one message to them.
    """
    intake, _, pool = make_intake(tmp_path, {"limits": {"max_recipients": 100}})
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    replies = send(p, t, b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(101)))
    assert codes(replies) == [250] * 100 + [452]
    assert send(p, t, b"DATA\r\n")[0][0] == 354
    send(p, t, b"Subject: x\r\n\r\nx\r\n.\r\n")
    pool.run_all()
    (msg,) = spooled(intake.spool)
    assert len(msg.envelope.recipients) == 100


def test_command_line_limit(tmp_path: Path) -> None:
    """
    512 octets (CRLF included) is the floor; a longer line gets 500 5.5.2
    and none of it runs as a command, whatever it carries past the limit.
    """
    intake, _, _ = make_intake(tmp_path, {"limits": {"max_command_length": 512}})
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\n")
    ok = b"MAIL FROM:<" + b"a" * 64 + b"@" + b"d" * (512 - 2 - 11 - 64 - 1 - 1) + b">"
    assert len(ok) + 2 == 512
    assert send(p, t, ok + b"\r\n")[0][0] != 500
    send(p, t, b"RSET\r\n")
    long = b"NOOP " + b"x" * (512 - 5) + b"MAIL FROM:<evil@x.test>"
    ((code, text),) = send(p, t, long + b"\r\n")
    assert (code, text.split()[0]) == (500, "5.5.2")
    assert send(p, t, b"RCPT TO:<victim@localhost>\r\n")[0][0] == 503
    # The same arriving in pieces, with no line end for a long time.
    for i in range(0, len(long), 100):
        send(p, t, long[i:i + 100])
    assert codes(send(p, t, b"\r\nRCPT TO:<victim@localhost>\r\n")) == [500, 503]


@pytest.mark.parametrize("pieces", [1, 7, 331])
def test_long_data_line_never_drops_into_command_mode(tmp_path: Path, pieces: int) -> None:
    """
    A 5000-octet text line in DATA, with SMTP commands after it in the same
    message: one reply after the real end of data (554 5.6.0), the embedded
    commands never run, nothing is queued.
    """
    intake, _, pool = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    body = (
        b"Subject: long\r\n\r\n" + b"A" * 5000 + b"MAIL FROM:<evil@x.test>\r\n"
        b"RCPT TO:<victim@localhost>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n" + b"B" * 3000 + b"\r\n.\r\n"
    )
    replies: list[Reply] = []
    step = max(1, len(body) // pieces)
    for i in range(0, len(body), step):
        replies += send(p, t, body[i:i + step])
    pool.run_all()
    replies += take_replies(t)
    # The ".\r\n" inside ends DATA (it is a real end of data); what follows is
    # a QUIT; the long line itself never caused a reply or a command.
    assert [(c, x.split()[0]) for c, x in replies] == [(554, "5.6.0"), (221, "2.0.0")]
    assert spooled(intake.spool) == []


def test_max_errors_disconnects(tmp_path: Path) -> None:
    intake, _, _ = make_intake(tmp_path, {"limits": {"max_errors": 4}})
    p, t = session(intake)
    replies = send(p, t, b"BOGUS\r\n\x00\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nNOOP\r\n")
    assert len(replies) == 5 and replies[-1][0] == 421 and replies[-1][1].startswith("4.7.0")
    assert t.disconnecting


def test_trusted_clients_are_exempt_from_the_per_ip_limit(tmp_path: Path) -> None:
    """
    Like Postfix's $mynetworks, trusted networks are exempt from
    max_connections_per_ip (a local submission agent or load generator may
    open many sessions); max_connections still applies to them.
    """
    intake, _, _ = make_intake(tmp_path, {"limits": {"max_connections": 4, "max_connections_per_ip": 2}})
    sessions = [connect(intake, peer=("127.0.0.1", n)) for n in range(5)]
    codes_seen = [take_replies(t)[0][0] for _, t in sessions]
    assert codes_seen == [220, 220, 220, 220, 421]


def test_connection_limits_in_memory(tmp_path: Path) -> None:
    """
    max_connections_per_ip and max_connections: the connection beyond either
    gets 421 4.7.0 and is closed; closed sessions free their slots.
    """
    intake, _, _ = make_intake(tmp_path, {"limits": {"max_connections": 3, "max_connections_per_ip": 2}})
    a = connect(intake, peer=("10.0.0.1", 1))
    b = connect(intake, peer=("10.0.0.1", 2))
    c = connect(intake, peer=("10.0.0.1", 3))
    assert [take_replies(x[1])[0][0] for x in (a, b)] == [220, 220]
    ((code, text),) = take_replies(c[1])
    assert (code, text.split()[0]) == (421, "4.7.0") and c[1].disconnecting
    c[0].connectionLost(Failure(ConnectionLost()))
    d = connect(intake, peer=("10.0.0.2", 1))
    assert take_replies(d[1])[0][0] == 220
    e = connect(intake, peer=("10.0.0.3", 1))
    ((code, text),) = take_replies(e[1])
    assert (code, text.split()[0]) == (421, "4.7.0") and e[1].disconnecting
    e[0].connectionLost(Failure(ConnectionLost()))
    a[0].connectionLost(Failure(ConnectionLost()))
    f = connect(intake, peer=("10.0.0.1", 4))
    assert take_replies(f[1])[0][0] == 220


def test_message_size_limit(tmp_path: Path) -> None:
    intake, _, pool = make_intake(tmp_path, {"limits": {"max_message_size": 2000}})
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\n")
    ((code, text),) = send(p, t, b"MAIL FROM:<a@client.test> SIZE=2001\r\n")
    assert (code, text.split()[0]) == (552, "5.3.4")
    send(p, t, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    replies = send(p, t, b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 40 + b".\r\n")
    pool.run_all()
    replies += take_replies(t)
    assert [(c, x.split()[0]) for c, x in replies] == [(552, "5.3.4")]
    assert spooled(intake.spool) == []


# -- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    b"NOOP\x00", b"\x00\x00\x00", b"MAIL FROM:<a\x00b@client.test>",
    b"RCPT TO:<b@local\x00host>", b"\x00RSET", b"MAIL FROM:<a@client.test> SIZE=1\x00",
])
def test_nul_bytes_in_commands(tmp_path: Path, line: bytes) -> None:
    intake, _, _ = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\n")
    if line.startswith(b"RCPT"):
        send(p, t, b"MAIL FROM:<a@client.test>\r\n")
    ((code, text),) = send(p, t, line + b"\r\n")
    assert 500 <= code < 600, text
    assert send(p, t, b"NOOP\r\n") == [(250, "2.0.0 Ok")]


def test_helo_name_sanitised(tmp_path: Path) -> None:
    """
    A HELO name with NUL, 8-bit, bracket-breaking and header-breaking bytes
    never reaches the stored message or its envelope as such.
    """
    intake, _, pool = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO ev\x00il\xff)(\rX-Injected:1;\r\n")
    send(p, t, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    send(p, t, b"Subject: helo\r\n\r\nx\r\n.\r\n")
    pool.run_all()
    (msg,) = spooled(intake.spool)
    received = msg.message.split(b"\r\n\r\n")[0]
    helo = msg.envelope.client["helo"]
    assert re.fullmatch(r"[A-Za-z0-9.\-_:\[\]?]+", helo), helo
    assert b"\x00" not in received and b"\xff" not in received
    assert BARE.search(received) is None
    assert b"X-Injected" not in received.replace(helo.encode(), b"")


@pytest.mark.parametrize("commands, code", [
    ([b"MAIL FROM:<j\xc3\xb6e@client.test>"], 553),
    ([b"MAIL FROM:<a@client.test>", b"RCPT TO:<j\xc3\xb6e@localhost>"], 553),
    ([b"MAIL FROM:<a@cl\xc3\xafent.test>"], 553),
    ([b"MAIL FROM:<\xff\xfe@client.test> SMTPUTF8"], 501),
    ([b"N\xc3\x96OP"], 502),
    ([b"\xff\xfe\xfd"], 502),
    ([b"MAIL FROM:<a@client.test> SIZE=1\xff"], 501),
])
def test_8bit_bytes_in_commands(tmp_path: Path, commands: list[bytes], code: int) -> None:
    """
    8-bit bytes in commands are refused without SMTPUTF8 (and invalid UTF-8
    even with it); each gets one 5xx reply and the session goes on.
    """
    intake, _, _ = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\n")
    replies = send(p, t, b"".join(c + b"\r\n" for c in commands))
    assert replies[-1][0] // 100 == 5, replies
    assert replies[-1][0] == code, replies
    assert send(p, t, b"NOOP\r\n")[0][0] == 250


def test_8bit_address_accepted_with_smtputf8(tmp_path: Path) -> None:
    """Control for the test above: the same address is fine with SMTPUTF8."""
    intake, _, _ = make_intake(tmp_path, toml=RELAY_TOML.replace("192.0.2.0/24", "127.0.0.1/32"))
    p, t = session(intake)
    replies = send(p, t, b"EHLO client.test\r\nMAIL FROM:<j\xc3\xb6e@client.test> SMTPUTF8\r\n"
                         b"RCPT TO:<j\xc3\xb6e@remote.test>\r\n")
    assert codes(replies) == [250, 250, 250]


@pytest.mark.parametrize("command", [
    b"MAIL FROM:<a@client.test", b"MAIL FROM:a@client.test", b"MAIL FROM:<<a@client.test>>",
    b"MAIL FROM:<a@@client.test>", b"MAIL FROM:<a@client..test>", b"MAIL FROM:<@client.test>",
    b"MAIL FROM:<a@-client.test>", b"MAIL FROM:<a@[300.1.2.3]>", b"MAIL FROM:<\"a@client.test>",
    b"MAIL FROM:<a b@client.test>", b"MAIL FROM:<a@client.test> <b@client.test>",
    b"MAIL FROM:<" + b"a" * 65 + b"@client.test>", b"MAIL FROM:<a@" + b"d" * 256 + b".test>",
    b"MAIL FROM:<a\r@client.test>", b"MAIL TO:<a@client.test>", b"MAIL <a@client.test>",
    b"MAIL FROM:<a@client.test> SIZE=-1", b"MAIL FROM:<a@client.test> BODY=7BIT BODY=8BITMIME",
])
def test_malformed_paths_refused(tmp_path: Path, command: bytes) -> None:
    intake, _, _ = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\n")
    ((code, text),) = send(p, t, command + b"\r\n")
    assert code in (501, 553, 555), (command, code, text)
    assert send(p, t, b"MAIL FROM:<ok@client.test>\r\n")[0][0] == 250


@pytest.mark.parametrize("rcpt", [
    b"RCPT TO:<b@localhost", b"RCPT TO:b@localhost", b"RCPT TO:<>", b"RCPT TO:<b@@localhost>",
    b"RCPT TO:<\"b@localhost>", b"RCPT TO:<b@localhost> NOTIFY=BOGUS", b"RCPT FROM:<b@localhost>",
    b"RCPT TO:<@:b@localhost>",
])
def test_malformed_recipients_refused(tmp_path: Path, rcpt: bytes) -> None:
    intake, _, _ = make_intake(tmp_path)
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    ((code, text),) = send(p, t, rcpt + b"\r\n")
    assert 500 <= code < 600, (rcpt, text)
    assert send(p, t, b"RCPT TO:<b@localhost>\r\n")[0][0] == 250


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_bare_newlines_in_spool_copy(tmp_path: Path, mode: str) -> None:
    """
    In memory, both modes: reject refuses with 550 5.5.2; normalize stores
    CRLF only (so nothing bare can be forwarded later).
    """
    intake, _, pool = make_intake(tmp_path, {"limits": {"bare_newlines": mode}})
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    replies = send(p, t, b"Subject: x\r\n\r\none\ntwo\rthree\r\r\n\n\n.\r.\n.\r\nend\r\n.\r\n")
    pool.run_all()
    replies += take_replies(t)
    if mode == "reject":
        assert [(c, x.split()[0]) for c, x in replies] == [(550, "5.5.2")]
        assert spooled(intake.spool) == []
    else:
        assert codes(replies) == [250]
        (msg,) = spooled(intake.spool)
        assert BARE.search(msg.message) is None, msg.message
        assert b"one\r\ntwo\r\nthree" in msg.message


def test_normalized_message_stays_within_size_limit(tmp_path: Path) -> None:
    intake, _, pool = make_intake(
        tmp_path, {"limits": {"bare_newlines": "normalize", "max_message_size": 2000}}
    )
    p, t = session(intake)
    send(p, t, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    replies = send(p, t, b"Subject: x\r\n\r\n" + b"x\n" * 950 + b"\r\n.\r\n")
    pool.run_all()
    replies += take_replies(t)
    stored = spooled(intake.spool)
    if codes(replies) == [250]:
        (msg,) = stored
        assert msg.envelope.size <= 2000, msg.envelope.size
    else:
        assert [(c, x.split()[0]) for c, x in replies] == [(552, "5.3.4")]
        assert stored == []


# -- real nodes: shared peers -------------------------------------------------------


class RawSink:
    """
    A next hop that keeps the exact bytes it reads: a minimal SMTP server on a
    loopback port (threads; PIPELINING, 8BITMIME, SMTPUTF8), recording every
    connection's whole input stream and every message's raw DATA bytes
    (still dot-stuffed, up to and excluding the final CRLF.CRLF).
    """

    def __init__(self) -> None:
        self.streams: list[bytearray] = []
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            th = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self._threads.append(th)
            th.start()

    def _session(self, conn: socket.socket) -> None:
        stream = bytearray()
        with self.lock:
            self.streams.append(stream)
        buf = b""
        data: bytes | None = None
        mail, rcpts = b"", []
        conn.settimeout(30)
        try:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            while not self._stop.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                with self.lock:
                    stream += chunk
                buf += chunk
                while True:
                    if data is not None:
                        data += buf
                        buf = b""
                        end = 0 if data.startswith(b".\r\n") else data.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        raw = data[:end]
                        buf = data[end + (3 if end == 0 else 5):]
                        with self.lock:
                            self.messages.append({"mail": mail, "rcpts": rcpts, "data": raw})
                        data, mail, rcpts = None, b"", []
                        conn.sendall(b"250 2.0.0 Ok\r\n")
                        continue
                    nl = buf.find(b"\r\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 2:]
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-raw.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                     b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n")
                    elif verb == b"MAIL":
                        mail, rcpts = line, []
                        conn.sendall(b"250 2.1.0 Ok\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line)
                        conn.sendall(b"250 2.1.5 Ok\r\n")
                    elif verb == b"DATA":
                        data = b""
                        conn.sendall(b"354 go ahead\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def with_token(self, token: bytes) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if token in m["data"]]

    def all_streams(self) -> list[bytes]:
        with self.lock:
            return [bytes(s) for s in self.streams]

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(timeout=5)
        for th in self._threads:
            th.join(timeout=5)


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    s = SmtpSink(tmp_path_factory.mktemp("sec-sink"), dump=True)
    try:
        s.start()
    except Exception as e:  # PeerUnavailable: postfix not installed
        pytest.skip(f"smtp-sink unavailable: {e}")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def raw_sink() -> Iterator[RawSink]:
    r = RawSink()
    yield r
    r.close()


NODE_TOML = """\
[node]
name = "{name}"
hostname = "sec.test"
spool = "spool"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[limits]
bare_newlines = "MODE"

[relay]
trusted_networks = ["127.0.0.1/32"]

[local]
domains = ["localhost"]
catch_all = true

[queue]
minimal_backoff = 3600
maximal_backoff = 3600

[outbound]
reuse_idle_time = 0.2

[[route]]
domains = ["sink.test", "remote.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:SINK"]

[[route]]
domains = ["raw.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:RAW"]

[[route]]
domains = ["dead.test"]
action = "relay"
next_hops = ["tcp:127.0.0.1:DEAD"]
"""


def start_node(base: Path, mode: str, sink: SmtpSink, raw: RawSink, umask: int | None = None) -> NodeProcess:
    toml = (
        NODE_TOML.replace("MODE", mode).replace("SINK", str(sink.port))
        .replace("RAW", str(raw.port)).replace("DEAD", str(free_port()))
    )
    node = NodeProcess(base, toml, name=f"sec-{mode}")
    old = os.umask(umask) if umask is not None else None
    try:
        node.start()
    finally:
        if old is not None:
            os.umask(old)
    return node


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink, raw_sink: RawSink
) -> Iterator[dict[str, NodeProcess]]:
    """
    Two nodes relaying to smtp-sink and the raw sink, one per bare_newlines
    mode. The reject one (the default mode) runs under umask 000, for the
    file-mode test.
    """
    made: dict[str, NodeProcess] = {}
    try:
        made["reject"] = start_node(tmp_path_factory.mktemp("sec-reject"), "reject", sink, raw_sink, 0)
        made["normalize"] = start_node(tmp_path_factory.mktemp("sec-normalize"), "normalize", sink, raw_sink)
        yield made
    finally:
        for n in made.values():
            n.__exit__(None, None, None)


class Client:
    """A raw SMTP client socket (optionally from another loopback address)."""

    def __init__(self, port: int, source: str = HOST, timeout: float = 15) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))
        self.f = self.sock.makefile("rb")
        self.greeting = read_reply(self.f)

    def cmd(self, line: bytes) -> tuple[int, list[bytes]]:
        self.sock.sendall(line + b"\r\n")
        return read_reply(self.f)

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token() -> str:
    return uuid.uuid4().hex[:12]


def received_events(node: NodeProcess, sender: str) -> list[dict[str, Any]]:
    return [e for e in node.events() if e["event"] == "received" and e.get("sender") == sender]


# -- real nodes: relay control and connection limits ------------------------------------


@pytest.mark.slow
def test_open_relay_refused_for_untrusted_source(nodes: dict[str, NodeProcess]) -> None:
    """
    The client is bound to 127.0.0.2, outside trusted_networks
    (127.0.0.1/32): relaying gets 554 5.7.1 at RCPT, local mail is fine; the
    same from 127.0.0.1 is accepted.
    """
    node = nodes["reject"]
    with Client(node.port, source="127.0.0.2") as c:
        assert c.cmd(b"EHLO untrusted.client")[0] == 250
        assert c.cmd(b"MAIL FROM:<spammer@client.test>")[0] == 250
        for rcpt in (b"<victim@remote.test>", b"<victim@unrouted.example>",
                     b"<@localhost:victim@remote.test>", b"<victim@[127.0.0.1]>"):
            code, lines = c.cmd(b"RCPT TO:" + rcpt)
            assert code == 554 and lines[0].startswith(b"554 5.7.1"), (rcpt, lines)
        code, lines = c.cmd(b"RCPT TO:<victim%remote.test@localhost>")
        assert code // 100 == 5, lines
        assert c.cmd(b"RCPT TO:<postmaster@localhost>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.sock.sendall(b"Subject: to postmaster\r\n\r\nhello\r\n.\r\n")
        code, lines = read_reply(c.f)
        assert code == 250, lines
        queue_id = lines[0].split()[-1].decode()
    (event,) = [e for e in node.events() if e.get("queue_id") == queue_id and e["event"] == "received"]
    assert event["recipients"] == ["postmaster@localhost"]
    assert event["client"] == "127.0.0.2"
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.ehlo("trusted.client")
        s.mail("a@client.test")
        assert s.rcpt("friend@remote.test")[0] == 250
        s.rset()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(
        tmp_path_factory.mktemp("sec-limits"), name="limits",
        extra_toml=(
            "\n[limits]\nmax_connections = 3\nmax_connections_per_ip = 2\n"
            '[relay]\ntrusted_networks = ["127.0.0.1/32"]\n'
        ),
    ) as node:
        yield node


def _greets(port: int, source: str) -> Client | None:
    c = Client(port, source)
    if c.greeting[0] == 220:
        return c
    c.close()
    return None


@pytest.mark.slow
def test_connection_limits_on_the_wire(limited: NodeProcess) -> None:
    """
    max_connections_per_ip = 2, max_connections = 3: the third from one
    address and the fourth in all get 421 4.7.0 and are closed; a slot freed
    by QUIT can be used again.
    """
    port = limited.port
    held: list[Client] = []
    try:
        for _ in range(2):
            held.append(wait_for(lambda: _greets(port, "127.0.0.11"), 10, "a connection slot"))
        with Client(port, "127.0.0.11") as third:
            code, lines = third.greeting
            assert code == 421 and lines[0].startswith(b"421 4.7.0"), lines
            assert third.f.read(1) == b""
        held.append(wait_for(lambda: _greets(port, "127.0.0.12"), 10, "a connection slot"))
        with Client(port, "127.0.0.13") as fourth:
            code, lines = fourth.greeting
            assert code == 421 and lines[0].startswith(b"421 4.7.0"), lines
            assert fourth.f.read(1) == b""
        assert held[0].cmd(b"QUIT")[0] == 221
        held.pop(0).close()
        held.append(wait_for(lambda: _greets(port, "127.0.0.13"), 10, "the freed slot"))
    finally:
        for c in held:
            c.close()


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node of its own, so its memory high-water mark is its own."""
    # The flood is pipelined EHLOs, which a strict node refuses at once.
    with NodeProcess(
        tmp_path_factory.mktemp("sec-flood"), name="flood",
        extra_toml="\n[limits]\nforbid_unauth_pipelining = false\n",
    ) as node:
        yield node


def _server_rx_queue(port: int, client: tuple[str, int]) -> int | None:
    """Bytes the server has not read yet on the connection from C{client} (/proc/net/tcp)."""
    def hexaddr(ip: str, p: int) -> str:
        return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(ip))[0], p)

    local, remote = hexaddr(HOST, port), hexaddr(*client)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == local and f[2] == remote:
            return int(f[4].split(":")[1], 16)
    return None


@pytest.mark.slow
def test_client_that_never_reads_cannot_balloon_memory(flood: NodeProcess) -> None:
    """
    A client pipelines 300,000 EHLOs (5 MB asking for ~35 MB of replies) and
    reads nothing: the node must stop reading rather than buffer the replies.
    """
    import fcntl
    import termios

    base = flood.vm_hwm_kib()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((HOST, flood.port))
    with s:
        s.settimeout(3)
        try:
            s.sendall(b"EHLO flood.client\r\n" * 300_000)
        except socket.timeout:
            pass  # the node stopped reading: as it should
        client = s.getsockname()

        def consumed() -> bool:
            unsent = struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\0" * 4))[0]
            return unsent == 0 and _server_rx_queue(flood.port, client) == 0

        try:
            wait_for(consumed, 10, "the node to read all the input")
        except AssertionError:
            pass  # it did not read it all: backpressure
        grown_mb = (flood.vm_hwm_kib() - base) / 1024
    assert grown_mb < 48, f"the node grew by {grown_mb:.0f} MB for one client that does not read"


# -- real nodes: SMTP smuggling ------------------------------------------------------


VECTORS = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r.\n",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]
SMUGGLED_SENDER = b"smuggled@evil.test"


def _smuggle(node: NodeProcess, vector: bytes, token: str) -> tuple[str, Reply, list[Reply]]:
    """
    One transaction whose body carries C{vector} followed by a whole smuggled
    MAIL/RCPT/DATA transaction, then the real end of data.

    @return: the sender, the reply to the end of data, and the replies to a
        RCPT, NOOP and QUIT sent after it.
    """
    sender = f"v-{token}@client.test"
    body = (
        f"Subject: vector {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\n".encode()
        + b"line one" + vector
        + b"MAIL FROM:<" + SMUGGLED_SENDER + b">\r\n"
        + f"RCPT TO:<victim-{token}@sink.test>\r\nRCPT TO:<victim-{token}@raw.test>\r\n".encode()
        + b"DATA\r\n"
        + f"Subject: smuggled {token}\r\n\r\nsmuggled body\r\n".encode()
        + b"\r\n.\r\n"
    )
    with Client(node.port) as c:
        assert c.cmd(b"EHLO smuggler.test")[0] == 250
        assert c.cmd(f"MAIL FROM:<{sender}>".encode())[0] == 250
        assert c.cmd(f"RCPT TO:<t-{token}@sink.test>".encode())[0] == 250
        assert c.cmd(f"RCPT TO:<t-{token}@raw.test>".encode())[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.sock.sendall(body)
        code, lines = read_reply(c.f)
        end = (code, b" ".join(line[4:] for line in lines).decode("utf-8", "replace"))
        after = []
        for line in (f"RCPT TO:<victim-{token}@sink.test>".encode(), b"NOOP", b"QUIT"):
            rc, rl = c.cmd(line)
            after.append((rc, b" ".join(line[4:] for line in rl).decode()))
    return sender, end, after


def _dumps_with(sink: SmtpSink, needle: bytes) -> list[bytes]:
    return [d for d in (p.read_bytes() for p in sink.dumped()) if needle in d]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reject", "normalize"])
@pytest.mark.parametrize("vector", VECTORS, ids=[repr(v)[2:-1] for v in VECTORS])
def test_smuggling_vectors(
    nodes: dict[str, NodeProcess], sink: SmtpSink, raw_sink: RawSink, mode: str, vector: bytes
) -> None:
    """
    The published SMTP smuggling vectors, each followed by a smuggled
    transaction and the real end of data, through a real node to smtp-sink
    and the byte-recording sink:

     - bare CR/LF vectors, reject mode: 550 5.5.2, nothing queued, nothing
       reaches either sink;
     - normalize mode (and the NUL vectors, which hold no bare CR/LF, in
       both modes): one message at each sink, no bare CR or LF in any byte
       the next hop read, the smuggled MAIL FROM only as body text.

    In every case only the real end of data is answered, the smuggled
    commands never run (RCPT after it is 503), and no message from the
    smuggled sender exists anywhere.
    """
    node = nodes[mode]
    token = _token()
    sender, end, after = _smuggle(node, vector, token)
    assert [c for c, _ in after] == [503, 250, 221], after
    has_bare = BARE.search(vector) is not None
    smuggled_events = [e for e in node.events() if e.get("sender") == SMUGGLED_SENDER.decode()]
    assert smuggled_events == []
    if has_bare and mode == "reject":
        assert end[0] == 550 and end[1].startswith("5.5.2"), end
        assert received_events(node, sender) == []
        # A clean message after it arrives; the refused one never does.
        control = _token()
        with smtplib.SMTP(HOST, node.port, timeout=30) as s:
            s.sendmail(f"c-{control}@client.test", [f"c-{control}@sink.test", f"c-{control}@raw.test"],
                       f"Subject: control {control}\r\n\r\nok\r\n".encode())
        wait_for(lambda: _dumps_with(sink, control.encode()), DELIVERY_TIMEOUT, "the control message")
        wait_for(lambda: raw_sink.with_token(control.encode()), DELIVERY_TIMEOUT, "the control message")
        assert _dumps_with(sink, token.encode()) == []
        assert raw_sink.with_token(token.encode()) == []
        return
    if not has_bare and end[0] != 250:
        # A NUL vector refused outright is also safe: then nothing may arrive.
        assert 500 <= end[0] < 600, end
        assert received_events(node, sender) == []
        return
    assert end[0] == 250, end
    assert len(received_events(node, sender)) == 1
    dumps = wait_for(lambda: _dumps_with(sink, token.encode()), DELIVERY_TIMEOUT, "smtp-sink")
    raws = wait_for(lambda: raw_sink.with_token(token.encode()), DELIVERY_TIMEOUT, "the raw sink")
    assert len(dumps) == 1 and len(raws) == 1, (dumps, raws)
    (dump,) = dumps
    assert b"X-Mail-Args: <" + sender.encode() + b">" in dump
    header, _, body = dump.partition(b"\n\n")
    assert b"MAIL FROM:<" + SMUGGLED_SENDER + b">" in body
    assert b"smuggled body" in body
    (raw,) = raws
    assert raw["mail"].startswith(b"MAIL FROM:<" + sender.encode() + b">")
    assert BARE.search(raw["data"]) is None, raw["data"]
    assert b"MAIL FROM:<" + SMUGGLED_SENDER + b">" in raw["data"].partition(b"\r\n\r\n")[2]
    # Nothing the next hops ever read came from the smuggled sender, and no
    # byte the raw sink read on any connection is a bare CR or LF.
    assert not any(SMUGGLED_SENDER in m["mail"] for m in raw_sink.messages)
    assert not any(b"X-Mail-Args: <" + SMUGGLED_SENDER in p.read_bytes() for p in sink.dumped())
    for stream in raw_sink.all_streams():
        # A stream may be caught between the CR and the LF of its last line.
        assert BARE.search(stream[:-1] if stream.endswith(b"\r") else stream) is None


@pytest.mark.slow
def test_long_line_in_data_on_the_wire(nodes: dict[str, NodeProcess], raw_sink: RawSink) -> None:
    """A 3000-octet line followed by a smuggled transaction: one 554 5.6.0, no commands run."""
    node = nodes["reject"]
    token = _token()
    with Client(node.port) as c:
        c.cmd(b"EHLO long.client")
        c.cmd(f"MAIL FROM:<l-{token}@client.test>".encode())
        c.cmd(f"RCPT TO:<l-{token}@raw.test>".encode())
        assert c.cmd(b"DATA")[0] == 354
        c.sock.sendall(
            f"Subject: {token}\r\n\r\n".encode() + b"x" * 3000
            + b"\r\nMAIL FROM:<" + SMUGGLED_SENDER + b">\r\nRCPT TO:<victim@raw.test>\r\nDATA\r\nhi\r\n.\r\n"
        )
        code, lines = read_reply(c.f)
        assert code == 554 and lines[0].startswith(b"554 5.6.0"), lines
        assert c.cmd(b"RCPT TO:<victim@raw.test>")[0] == 503
    assert received_events(node, f"l-{token}@client.test") == []


# -- real nodes: bad input -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["close", "reset"])
def test_half_sent_data_then_dropped(nodes: dict[str, NodeProcess], how: str) -> None:
    """
    DATA half sent, then the client closes (FIN) or resets (RST): nothing is
    queued, no received event, no partial file is left in queue/tmp.
    """
    node = nodes["reject"]
    token = _token()
    c = Client(node.port)
    c.cmd(b"EHLO half.client")
    c.cmd(f"MAIL FROM:<h-{token}@client.test>".encode())
    c.cmd(f"RCPT TO:<h-{token}@localhost>".encode())
    assert c.cmd(b"DATA")[0] == 354
    # More than the spool holds in memory (SpoolWriter.FLUSH_AT): part is on disk.
    c.sock.sendall(f"Subject: half {token}\r\n\r\n".encode() + b"half a message\r\n" * 20000)
    wait_for(lambda: node.queue_files("tmp"), 10, "the partial queue file")
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    wait_for(lambda: not node.queue_files("tmp"), 10, "the partial file to go away")
    # The node is alive and the message never became one.
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        assert s.noop()[0] == 250
    assert received_events(node, f"h-{token}@client.test") == []
    assert node.maildir_new(f"h-{token}") == []
    assert not any(f"h-{token}".encode() in p.read_bytes() for p in node.queue_files("new"))


@pytest.mark.slow
def test_random_bytes_do_not_hurt(nodes: dict[str, NodeProcess]) -> None:
    """
    Seeded random bytes, with and without line ends, in and out of DATA:
    the node stays up, logs no unhandled error, and then takes a normal
    message.
    """
    node = nodes["reject"]
    rng = random.Random(0x5EC)
    for round_ in range(6):
        with socket.create_connection((HOST, node.port), timeout=15) as s:
            s.recv(1024)
            if round_ % 2:
                s.sendall(b"EHLO fuzz\r\nMAIL FROM:<f@client.test>\r\nRCPT TO:<f@localhost>\r\nDATA\r\n")
            for _ in range(40):
                chunk = rng.randbytes(rng.randrange(1, 2048))
                if rng.random() < 0.5:
                    chunk += rng.choice([b"\r\n", b"\n", b"\r", b"\x00"])
                try:
                    s.sendall(chunk)
                except OSError:
                    break
            s.settimeout(10)
            try:
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # the node hung up first (too many errors): fine
    assert node.running()
    token = _token()
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.sendmail("ok@client.test", [f"r{token}@localhost"], b"Subject: after fuzz\r\n\r\nfine\r\n")
    wait_for(lambda: node.maildir_new(f"r{token}"), DELIVERY_TIMEOUT, "delivery after fuzzing")
    log = node.log_text()
    assert "Unhandled Error" not in log and "Traceback" not in log, log[-3000:]


# -- files and privileges -------------------------------------------------------------------


def _modes(root: Path) -> list[tuple[Path, int, int]]:
    """(path, mode, uid) of every directory, file and socket under root (symlinks skipped)."""
    out = []
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if p.is_symlink():
            continue
        out.append((p, st.st_mode, st.st_uid))
    return out


def _check_private(root: Path, uid: int | None = None) -> None:
    import stat

    for p, mode, owner in _modes(root):
        perm = stat.S_IMODE(mode)
        if stat.S_ISDIR(mode):
            assert perm == 0o700, f"{p}: directory mode {perm:o}"
        elif stat.S_ISREG(mode):
            assert perm == 0o600, f"{p}: file mode {perm:o}"
        else:
            assert perm & 0o077 == 0, f"{p}: mode {perm:o}"
        if uid is not None:
            assert owner == uid, f"{p}: owned by {owner}, not {uid}"


@pytest.mark.slow
def test_spool_and_mailboxes_are_private(nodes: dict[str, NodeProcess]) -> None:
    """
    A node started under umask 000, after local delivery and a deferred
    relay message (queue file + state): every directory of the spool and the
    mailroot is 0700, every file 0600.
    """
    node = nodes["reject"]
    token = _token()
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.sendmail(f"m{token}@client.test", [f"m{token}@localhost", f"m{token}@dead.test"],
                   b"Subject: modes\r\n\r\nmodes\r\n")
    wait_for(lambda: node.maildir_new(f"m{token}"), DELIVERY_TIMEOUT, "local delivery")
    wait_for(lambda: [e for e in node.events() if e["event"] == "deferred"
                      and e.get("sender") == f"m{token}@client.test"], DELIVERY_TIMEOUT, "deferral")
    assert node.queue_files("new") and node.queue_files("state")
    _check_private(node.spool)
    _check_private(node.mailroot)


def _low_port() -> int:
    """A free port in 600-1000 on 127.0.0.1 (binding it needs root)."""
    for port in random.Random().sample(range(600, 1000), 400):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 600-1000")


class PrivilegedNode(NodeProcess):
    """A NodeProcess run with twistd's -u/-g options."""

    run_as = (65534, 65534)

    def command(self) -> list[str]:
        uid, gid = self.run_as
        return [
            str(TWISTD), "-u", str(uid), "-g", str(gid), "-n", "--pidfile=",
            f"--logfile={self.log_path}", "relaynet", "--config", str(self.config_path),
            *self.node_args,
        ]


PRIV_TOML = """\
[node]
name = "priv"
hostname = "priv.test"
spool = "spool"

[tls]
cert = "CERT"
key = "KEY"

[auth]
password_file = "passwd"
failure_delay = 0.1

[local]
domains = ["localhost"]
catch_all = true
"""

PRIV_PASSWORD = "priv password 1"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        pwd.getpwuid(65534)
    except KeyError:
        pytest.skip("no user 65534")


@contextlib.contextmanager
def privileged_node(prepare: Any = None) -> Iterator[PrivilegedNode]:
    """
    As root: C{twistd -u 65534 -g 65534 relaynet --listen tcp:<port below
    1024>}, in a fresh directory the unprivileged user can traverse, with a
    TLS key and a password file readable by root only. C{prepare(node_dir)}
    runs before the start (to plant things in the spool).
    """
    _need_root()
    from relaynet.intake.auth import set_password
    from relaynet.smtp.tls import generate_ca, generate_cert

    base = Path(tempfile.mkdtemp(prefix="relaynet-priv-"))
    try:
        base.chmod(0o755)
        ca, ca_key = generate_ca(base / "certs")
        cert, key = generate_cert(base / "certs", ca, ca_key, ["priv.test"])
        assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == 0
        (base / "node").mkdir(mode=0o755)
        set_password(base / "node" / "passwd", "alice", PRIV_PASSWORD)
        if prepare is not None:
            prepare(base / "node")
        port = _low_port()
        node = PrivilegedNode(
            base / "node", PRIV_TOML.replace("CERT", str(cert)).replace("KEY", str(key)),
            port=port, node_args=("--listen", f"tcp:{port}:interface=127.0.0.1"),
        )
        env = dict(os.environ)
        if not _reachable_by_others(Path(sysconfig.get_paths()["stdlib"])):
            # This interpreter's standard library is out of reach of uid
            # 65534 (e.g. a pyenv build under a 0700 /root): anything the
            # node imports after the drop would fail for reasons that have
            # nothing to do with relaynet. Import the node's modules up
            # front, while still root.
            preload = base / "preload"
            preload.mkdir(mode=0o755)
            (preload / "sitecustomize.py").write_text(PRELOAD)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(preload), *filter(None, [env.get("PYTHONPATH")])]
            )
        try:
            node.start()
        finally:
            os.environ.clear()
            os.environ.update(env)
        with node:
            yield node
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def privileged() -> Iterator[PrivilegedNode]:
    with privileged_node() as node:
        yield node


PRELOAD = """\
import importlib
import pkgutil

import relaynet

for _info in pkgutil.walk_packages(relaynet.__path__, "relaynet."):
    if _info.name.startswith(("relaynet.lab", "relaynet.demo")):
        continue
    try:
        importlib.import_module(_info.name)
    except Exception:
        pass
for _name in ("twisted.names.client", "twisted.names.dns", "twisted.protocols.tls"):
    try:
        importlib.import_module(_name)
    except Exception:
        pass
"""


def _reachable_by_others(path: Path) -> bool:
    """Can a user who is neither owner nor group read C{path} (a directory)?"""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            return False
    return bool(path.stat().st_mode & 0o004)


def _ids(pid: int, what: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(what + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {what} in /proc/{pid}/status")


def _tls_ctx() -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.slow
def test_privileges_dropped_after_binding(privileged: PrivilegedNode) -> None:
    """
    The node bound a port below 1024 as root, then runs as 65534:65534 (real,
    effective, saved); its spool is owned by that user, directories 0700,
    files 0600; it still serves STARTTLS with the root-only key and delivers.
    """
    node = privileged
    assert node.port < 1024
    assert set(_ids(node.pid, "Uid")) == {65534}
    assert set(_ids(node.pid, "Gid")) == {65534}
    groups = Path(f"/proc/{node.pid}/status").read_text().split("Groups:")[1].split("\n")[0].split()
    assert set(groups) <= {"65534"}, groups
    token = _token()
    with smtplib.SMTP(HOST, node.port, timeout=30) as s:
        s.starttls(context=_tls_ctx())
        s.ehlo("priv.client")
        s.sendmail(f"p{token}@client.test", [f"p{token}@localhost"], b"Subject: priv\r\n\r\npriv\r\n")
    (path,) = wait_for(lambda: node.maildir_new(f"p{token}"), DELIVERY_TIMEOUT, "delivery")
    assert b"using TLSv1." in path.read_bytes()
    _check_private(node.spool, uid=65534)
    _check_private(node.mailroot, uid=65534)


@pytest.mark.slow
def test_auth_works_after_privileges_dropped(privileged: PrivilegedNode) -> None:
    with smtplib.SMTP(HOST, privileged.port, timeout=30) as s:
        s.starttls(context=_tls_ctx())
        s.ehlo("priv.client")
        assert s.login("alice", PRIV_PASSWORD)[0] == 235


@pytest.mark.slow
def test_spool_symlink_does_not_give_away_files() -> None:
    holder: dict[str, Path] = {}

    def plant(node_dir: Path) -> None:
        target = node_dir.parent / "precious"
        target.write_text("root's secret\n")
        target.chmod(0o600)
        spool = node_dir / "spool"
        spool.mkdir(mode=0o700)
        (spool / "innocent-looking").symlink_to(target)
        holder["target"] = target

    with privileged_node(plant):
        st = holder["target"].stat()
        assert (st.st_uid, st.st_gid) == (0, 0), f"now owned by {st.st_uid}:{st.st_gid}"


@pytest.mark.slow
def test_dangling_symlink_in_spool_does_not_stop_a_privileged_start() -> None:
    def plant(node_dir: Path) -> None:
        spool = node_dir / "spool"
        spool.mkdir(mode=0o700)
        (spool / "stale.lock").symlink_to("12345")

    with privileged_node(plant) as node:
        assert node.running()


# -- slow clients (issue 16, item 6) --------------------------------------------

import gc  # noqa: E402
import tracemalloc  # noqa: E402


from relaynet.queue.spool import SpoolWriter  # noqa: E402
from relaynet.smtp import datastream  # noqa: E402

SLOW_SESSIONS = 200
PER_SESSION_SLACK = 32 * 1024
"""Protocol, transport, scanner, writer and bookkeeping of one session (measured: a few KiB)."""
TRANSIENT_SLACK = 8 * 1024 * 1024
"""Copies alive during one read (the read itself, the header section when parsed)."""
PUSH = 64 * 1024
PAD_LINE = b"X-Pad: " + b"y" * (512 - 9) + b"\r\n"


def _traced() -> tuple[int, int]:
    gc.collect()
    return tracemalloc.get_traced_memory()


def _open_dialogue(p: Any, t: Any, lines: list[bytes]) -> list[int]:
    """Send each line as its own read, waiting for its reply (no pipelining)."""
    out: list[int] = []
    for line in lines:
        out += codes(send(p, t, line + b"\r\n"))
    return out


def test_slow_clients_cannot_starve_new_sessions_or_grow_memory(tmp_path: Path) -> None:
    """
    200 slow sessions on one intake (a third trickle a command one byte at a
    time, a third stay idle after the greeting, a third trickle a message
    body one byte at a time) hold at most what the per-session caps allow:
    the command line limit, the header section cap plus the spool writer's
    unflushed buffer and one line in DATA. Pushing every slow sender far past
    its cap holds no more. Meanwhile a new session is greeted and gets its
    message queued; the idle and DATA timeouts then close every slow session
    with 421 4.4.2, its partial message leaves C{tmp/}, and the intake
    forgets them all.
    """
    intake, reactor, pool = _make_intake(tmp_path)  # every client here waits for its replies
    limits = intake.config.limits
    pad_lines_per_push = PUSH // len(PAD_LINE)
    assert SpoolWriter.FLUSH_AT % PUSH == 0 and PUSH % len(PAD_LINE) == 0
    tracemalloc.start()
    try:
        base, _ = _traced()
        tracemalloc.reset_peak()
        trickling: list[tuple[Any, Any]] = []
        idle: list[tuple[Any, Any]] = []
        in_data: list[tuple[Any, Any]] = []
        for i in range(SLOW_SESSIONS):
            p, t = connect(intake, peer=("127.0.0.1", 20000 + i))
            assert codes(take_replies(t)) == [220]
            (trickling, idle, in_data)[i % 3].append((p, t))
        for p, t in in_data:
            assert _open_dialogue(p, t, [
                b"EHLO slow.test", b"MAIL FROM:<slow@localhost>", b"RCPT TO:<user@localhost>", b"DATA",
            ]) == [250, 250, 250, 354]
        n_cmd, n_data = len(trickling), len(in_data)

        # One byte per read: a command longer than its limit, and header lines.
        command = b"NOOP " + b"x" * (limits.max_command_length + 200)
        header = b"".join(b"X-Slow-%d: %s\r\n" % (n, b"z" * 60) for n in range(40))
        for k in range(max(len(command), len(header))):
            for p, _ in trickling:
                if k < len(command):
                    p.dataReceived(command[k : k + 1])
            for p, _ in in_data:
                if k < len(header):
                    p.dataReceived(header[k : k + 1])
        current, peak = _traced()
        # A DATA session holds at most the header section (a bytearray grows
        # by up to 1/8 over its size), the writer's unflushed bytes and one
        # partial line; a command session its command line.
        per_data = datastream._HEADER_CAP * 9 // 8 + SpoolWriter.FLUSH_AT + limits.max_line_length
        bound = (
            n_data * per_data + n_cmd * limits.max_command_length
            + SLOW_SESSIONS * PER_SESSION_SLACK + TRANSIENT_SLACK
        )
        assert peak - base < bound, (peak - base, bound)
        trickled = current - base

        # Past every cap with bigger reads (the disk keeps up: the pool runs).
        def push(rounds: int) -> int:
            for _ in range(rounds):
                for p, _ in trickling:
                    p.dataReceived(b"x" * PUSH)
                for p, _ in in_data:
                    p.dataReceived(PAD_LINE * pad_lines_per_push)
                pool.run_all()
            return _traced()[0]

        beyond_cap = (datastream._HEADER_CAP + 2 * SpoolWriter.FLUSH_AT) // PUSH
        past = push(beyond_cap)
        _, peak = _traced()
        assert peak - base < bound, (peak - base, bound)
        further = push(2 * SpoolWriter.FLUSH_AT // PUSH)
        assert further - past < SLOW_SESSIONS * 1024, (past - base, further - base)
        for _, t in trickling + idle + in_data:
            assert not t.disconnecting
            assert take_replies(t) == []
        assert all(p._writer is not None for p, _ in in_data), "still a message being received"
    finally:
        tracemalloc.stop()
    assert trickled < bound

    # (b) A new session is greeted and its message is queued.
    p, t = connect(intake, peer=("127.0.0.1", 30000))
    assert codes(take_replies(t)) == [220]
    assert _open_dialogue(p, t, [
        b"EHLO fresh.test", b"MAIL FROM:<fresh@localhost>", b"RCPT TO:<user@localhost>", b"DATA",
    ]) == [250, 250, 250, 354]
    p.dataReceived(b"Subject: fresh\r\n\r\nstill served\r\n.\r\n")
    pool.run_all()
    assert codes(take_replies(t)) == [250]
    assert [e.queue_id for e in intake.queued_entries] == [m.queue_id for m in spooled(intake.spool)]
    (message,) = spooled(intake.spool)
    assert message.message.endswith(b"still served\r\n")
    assert codes(send(p, t, b"QUIT\r\n")) == [221]
    p.connectionLost(Failure(ConnectionLost()))

    # (c) The idle timeout closes the command and idle sessions, the DATA
    # timeout the message senders; each with 421 4.4.2.
    reactor.advance(limits.idle_timeout + 1)
    for p, t in trickling + idle:
        assert [(c, x.split()[0]) for c, x in take_replies(t)][-1:] == [(421, "4.4.2")]
        assert t.disconnecting
    for _, t in in_data:
        assert not t.disconnecting and take_replies(t) == []
    reactor.advance(limits.data_timeout - limits.idle_timeout)
    for p, t in in_data:
        assert [(c, x.split()[0]) for c, x in take_replies(t)] == [(421, "4.4.2")]
        assert t.disconnecting
    for p, _ in trickling + idle + in_data:
        p.connectionLost(Failure(ConnectionLost()))
    pool.run_all()
    assert intake.sessions == set()
    assert intake.per_ip == {}
    assert list(intake.spool.tmp_dir.iterdir()) == [], "partial messages are discarded"
