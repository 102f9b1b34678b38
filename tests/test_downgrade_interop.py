"""
The SMTP client toward next hops that lack an extension, and its CHUNKING,
with real peers on loopback (issue 12, items 5 and 6): a real C{twistd -n
relaynet} node delivering to a private Postfix instance
(L{harness.peers.PostfixInstance}, its smtpd withholding SMTPUTF8 or 8BITMIME,
or offering CHUNKING as it does by default), and to another relaynet node.

 - Postfix without SMTPUTF8 (C{smtputf8_enable = no}): an ASCII message
   submitted with SMTPUTF8 is delivered; one with a UTF-8 Subject bounces
   5.6.7 to its sender.
 - Postfix without 8BITMIME (C{smtpd_discard_ehlo_keywords = 8bitmime}): an
   8-bit message arrives converted to 7-bit MIME, its decoded parts intact.
 - Postfix with CHUNKING: the node's client says (its debug log line, JSON)
   that it sent with BDAT, in several chunks for a 3 MB message, and the
   messages arrive byte for byte, dot lines included.
 - relaynet to relaynet: the receiving node's C{received} event says
   C{"chunking": true}, and the message arrives byte for byte.

Tests skip, with the reason, only when Postfix cannot run here.
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from harness.nodeproc import NodeProcess, wait_for
from harness.peers import PostfixInstance, allow_postfix_search, postfix_unavailable_reason

try:
    from test_forwarding import (
        TIMEOUT, Net, distinct_ports, hop, make_message, open_session, route, token,
        wait_event, wait_mail,
    )
except ImportError:  # tests/ became a package
    from tests.test_forwarding import (  # type: ignore[no-redef]
        TIMEOUT, Net, distinct_ports, hop, make_message, open_session, route, token,
        wait_event, wait_mail,
    )

pytestmark = pytest.mark.slow

_POSTFIX_REASON = postfix_unavailable_reason()
requires_postfix = pytest.mark.skipif(_POSTFIX_REASON is not None, reason=str(_POSTFIX_REASON))

#: Postfix delivers in seconds; give it more room than a node.
POSTFIX_TIMEOUT = 60.0
#: The node's client logs one JSON line per message sent at this level.
DEBUG_LOG = '[log]\nformat = "json"\nlevel = "debug"\n'


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    n = Net(tmp_path / "nodes")
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """A directory the C{postfix} user can reach, outside pytest's 0700 tree (as in test_interop)."""
    d = Path(tempfile.mkdtemp(prefix="relaynet-downgrade-"))
    try:
        yield allow_postfix_search(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def postfix(peer_dir: Path, port: int, **main_cf: str) -> PostfixInstance:
    """A Postfix delivering pf.test into its Maildir, with C{main_cf} settings."""
    return PostfixInstance(peer_dir / "postfix", port=port, mode="local",
                           local_domains=["pf.test"], main_cf=main_cf)


def relay_node(net: Net, port: int, pf: PostfixInstance, **kw: Any) -> NodeProcess:
    """A node delivering src.test locally and relaying pf.test to C{pf}; started."""
    node = net.add("relay", port, local=["src.test"],
                   routes=[route(["pf.test"], [hop(pf.port)]), DEBUG_LOG], **kw)
    return node.start()


def submit(port: int, sender: str, rcpts: Sequence[str], msg: bytes, options: Sequence[str] = ()) -> None:
    """One transaction (MAIL with C{options}); every recipient must be accepted."""
    with open_session(port) as s:
        refused = s.sendmail(sender, list(rcpts), msg, mail_options=list(options))
    assert not refused, refused


def delivered(pf: PostfixInstance, count: int = 1) -> list[bytes]:
    """Wait for C{count} files in C{pf}'s Maildir; @return: their bytes, oldest first."""
    try:
        wait_for(lambda: pf.delivered_count() >= count, POSTFIX_TIMEOUT, f"{count} deliveries by Postfix")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- postfix log:\n{pf.log_tail()}") from None
    paths = [p for sub in ("new", "cur") for p in (pf.maildir / sub).glob("*")]
    return [p.read_bytes() for p in sorted(paths, key=lambda p: p.stat().st_mtime_ns)]


def transfers(node: NodeProcess) -> list[dict[str, Any]]:
    """The client's C{transfer} debug lines of C{node}'s JSON log."""
    out = []
    for line in node.log_text().splitlines():
        if line.startswith("{") and '"transfer ' in line:
            record = json.loads(line)
            if record.get("text", "").startswith("transfer "):
                out.append(record)
    return out


def message_of(data: bytes, mid: str) -> email.message.Message:
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert parsed["Message-ID"] == mid, parsed["Message-ID"]
    return parsed


def after_relaynet_trace(data: bytes) -> bytes:
    """
    A Postfix Maildir copy (LF lines) from just after relaynet's Received
    field: what the node's queue file held after its own trace field.
    """
    start = data.index(b"\nReceived: from client.test")
    end = data.index(b"\n", start + 1)
    while data[end + 1:end + 2] in (b" ", b"\t"):
        end = data.index(b"\n", end + 1)
    assert b"by relay.test (relaynet)" in data[start:end], data[start:end]
    return data[end + 1:]


# -- (a) Postfix without SMTPUTF8 ------------------------------------------------


@requires_postfix
def test_smtputf8_only_when_needed_to_postfix_without_it(net: Net, peer_dir: Path) -> None:
    """
    Postfix with C{smtputf8_enable = no} offers no SMTPUTF8. An ASCII
    message submitted to the node with SMTPUTF8 is delivered into Postfix's
    Maildir (the client drops the parameter, RFC 6531 3.4; it used to bounce
    5.6.7); one with a UTF-8 Subject bounces 5.6.7 to its sender, in a DSN.
    """
    port, pf_port = distinct_ports(2)
    with postfix(peer_dir, pf_port, smtputf8_enable="no") as pf:
        node = relay_node(net, port, pf)
        msg, mid = make_message(token(), "sender@src.test", "user@pf.test")
        submit(node.port, "sender@src.test", ["user@pf.test"], msg, ["SMTPUTF8"])
        wait_event(node, "sent", net, recipient="user@pf.test")
        (data,) = delivered(pf)
        message_of(data, mid)
        assert after_relaynet_trace(data) == msg.replace(b"\r\n", b"\n")
        (sent,) = transfers(node)
        assert sent["smtputf8"] is False and sent["code"] == 250, sent

        tok = token()
        utf8, mid2 = make_message(tok, "sender@src.test", "other@pf.test")
        utf8 = utf8.replace(f"Subject: forwarding test {tok}".encode(),
                            f"Subject: Gr\u00fc\u00dfe {tok} \u2603".encode())
        submit(node.port, "sender@src.test", ["other@pf.test"], utf8, ["SMTPUTF8", "BODY=8BITMIME"])
        bounced = wait_event(node, "bounced", net, recipient="other@pf.test")
        assert bounced["dsn"] == "5.6.7", bounced
        (dsn_path,) = wait_mail(node, "sender", "src.test", net=net)
        assert pf.delivered_count() == 1
    # An internationalised original: an RFC 6533 report (global-delivery-status).
    dsn = email.message_from_bytes(dsn_path.read_bytes(), policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report", dsn["Content-Type"]
    assert dsn.get_param("report-type") == "global-delivery-status", dsn["Content-Type"]
    status, returned = [p for p in dsn.iter_parts()][1:]
    assert status.get_content_type() == "message/global-delivery-status"
    human = " ".join(str(dsn.get_body(("plain",)).get_content()).split())
    assert "<other@pf.test>:" in human and "does not support SMTPUTF8" in human, human
    # relaynet decided this itself, before sending: no "host ... said", no Remote-MTA.
    assert "said" not in human, human
    report = status.as_string()
    assert "Reporting-MTA: dns; relay.test" in report, report
    assert "Final-Recipient: rfc822; other@pf.test" in report and "Status: 5.6.7" in report, report
    assert "Remote-MTA" not in report, report
    assert returned.get_content_type() == "message/global"
    assert mid2.encode() in returned.as_bytes(), returned


# -- (b) Postfix without 8BITMIME ------------------------------------------------

TEXT = "Gr\u00fc\u00dfe aus K\u00f6ln \u2603 \u00e9t\u00e9\r\n.a line with a dot\r\n\r\nlast line \u00e6\u00f8\u00e5\r\n"
ATTACHMENT = bytes(b for b in range(0x80, 0x100)) * 8


def eight_bit_message(mid_token: str) -> tuple[bytes, str]:
    """A multipart message: a UTF-8 text part and an 8-bit attachment, both C{8bit}."""
    head, mid = make_message(mid_token, "sender@src.test", "user@pf.test", b"")
    head = head.replace(b"\r\n\r\n", b"\r\n", 1)  # the header section continues
    body = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b0undary"\r\n\r\n'
        b"--b0undary\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + TEXT.encode()
        + b"--b0undary\r\nContent-Type: application/octet-stream; name=\"blob.bin\"\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + b"\r\n".join(ATTACHMENT[i:i + 64] for i in range(0, len(ATTACHMENT), 64))
        + b"\r\n--b0undary--\r\n"
    )
    return head + body, mid


@requires_postfix
def test_eight_bit_converted_for_postfix_without_8bitmime(net: Net, peer_dir: Path) -> None:
    """
    Postfix with C{smtpd_discard_ehlo_keywords = 8bitmime}: an 8-bit message
    (UTF-8 text and an 8-bit attachment, BODY=8BITMIME) arrives 7-bit --
    every line of Postfix's delivered file ASCII, the text part
    quoted-printable, the attachment base64 -- and decodes to what was sent.
    """
    port, pf_port = distinct_ports(2)
    with postfix(peer_dir, pf_port, smtpd_discard_ehlo_keywords="8bitmime") as pf:
        node = relay_node(net, port, pf)
        msg, mid = eight_bit_message(token())
        submit(node.port, "sender@src.test", ["user@pf.test"], msg, ["BODY=8BITMIME"])
        wait_event(node, "sent", net, recipient="user@pf.test")
        (data,) = delivered(pf)
    assert all(line.isascii() for line in data.split(b"\n")), [
        line for line in data.split(b"\n") if not line.isascii()][:3]
    parsed = message_of(data, mid)
    text, attachment = [p for p in parsed.walk() if not p.is_multipart()]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    decoded_text = text.get_payload(decode=True)
    assert isinstance(decoded_text, bytes)
    expected = TEXT.replace("\r\n", "\n").rstrip("\n")
    assert decoded_text.decode("utf-8").replace("\r\n", "\n").rstrip("\n") == expected
    assert attachment.get_payload(decode=True) == b"\r\n".join(
        ATTACHMENT[i:i + 64] for i in range(0, len(ATTACHMENT), 64))
    (sent,) = transfers(node)
    assert sent["converted"] is True and sent["body8"] is False, sent


# -- (c) Postfix with CHUNKING --------------------------------------------------


def big_body(size: int) -> bytes:
    """About C{size} octets of short lines, dot lines among them."""
    lines = [b".", b"..", b".dot first", b"plain text line of some length, 0123456789 abcdefghij"]
    out = []
    total = 0
    i = 0
    while total < size:
        line = lines[i % len(lines)] + b" %d\r\n" % i if i % 7 else b".\r\n"
        out.append(line)
        total += len(line)
        i += 1
    return b"".join(out)


@requires_postfix
def test_bdat_to_postfix(net: Net, peer_dir: Path) -> None:
    """
    Postfix offers CHUNKING by default: the node sends with BDAT -- its
    client's transfer lines say so, one chunk for a small message, three for
    a 3 MB one (1 MiB chunks) -- and both arrive in Postfix's Maildir byte
    for byte after the node's trace field, their lines starting with a dot
    unstuffed (BDAT is not dot-stuffed).
    """
    port, pf_port = distinct_ports(2)
    with postfix(peer_dir, pf_port) as pf:
        node = relay_node(net, port, pf)
        small, mid = make_message(token(), "sender@src.test", "user@pf.test",
                                  b".first line with a dot\r\n..two\r\n.\r\nend\r\n")
        big, mid2 = make_message(token(), "sender@src.test", "user@pf.test", big_body(3_000_000))
        assert len(big) > 3 * 2**20 - 2**20 and len(big) < 3 * 2**20
        submit(node.port, "sender@src.test", ["user@pf.test"], small)
        wait_event(node, "sent", net, recipient="user@pf.test")
        submit(node.port, "sender@src.test", ["user@pf.test"], big)
        wait_for(lambda: len(transfers(node)) == 2, TIMEOUT, "two transfers")
        first, second = delivered(pf, 2)
        sent = transfers(node)
    assert [(t["method"], t["chunks"], t["code"]) for t in sent] == [("BDAT", 1, 250), ("BDAT", 3, 250)], sent
    by_mid = {email.message_from_bytes(d)["Message-ID"]: d for d in (first, second)}
    for msg, m in ((small, mid), (big, mid2)):
        assert after_relaynet_trace(by_mid[m]) == msg.replace(b"\r\n", b"\n"), f"{m} altered"
    assert sent[1]["octets"] > 2 * 2**20


# -- (d) relaynet to relaynet ------------------------------------------------


def test_bdat_between_relaynet_nodes(net: Net) -> None:
    """
    hop1 -> hop2 (both relaynet; hop2 offers CHUNKING): hop1 sends with BDAT
    (a 1.5 MB message: two chunks), hop2's C{received} event says
    C{"chunking": true}, and the message lands in hop2's Maildir byte for
    byte after the two Received fields.
    """
    port1, port2 = distinct_ports(2)
    hop2 = net.add("hop2", port2, local=["dest.test"])
    hop2.start()
    hop1 = net.add("hop1", port1, routes=[route(["dest.test"], [hop(port2)]), DEBUG_LOG])
    hop1.start()
    msg, mid = make_message(token(), "sender@src.test", "user@dest.test", big_body(1_500_000))
    submit(hop1.port, "sender@src.test", ["user@dest.test"], msg)
    received = wait_event(hop2, "received", net, message_id=mid)
    assert received.get("chunking") is True, received
    (path,) = wait_mail(hop2, "user", "dest.test", net=net)
    data = path.read_bytes()  # a Maildir copy: LF lines, after Return-Path and Delivered-To
    head = b"Return-Path: <sender@src.test>\nDelivered-To: user@dest.test\n"
    assert data.startswith(head), data[:200]
    data = data[len(head):]
    for _ in range(2):  # hop2's Received field, then hop1's
        assert data.startswith(b"Received: "), data[:200]
        end = data.index(b"\n")
        while data[end + 1:end + 2] in (b" ", b"\t"):
            end = data.index(b"\n", end + 1)
        data = data[end + 1:]
    assert data == msg.replace(b"\r\n", b"\n")
    (sent,) = transfers(hop1)
    assert (sent["method"], sent["chunks"]) == ("BDAT", 2), sent
