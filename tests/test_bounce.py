"""
Tests for L{relaynet.queue.bounce}: DSNs built, then read back with the standard
library parser, and the RFC 3461 rules for when to send one.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from relaynet.queue.bounce import RecipientReport, build_dsn, is_bounce_worthy, split_headers

ARRIVAL = 1700000000.0
NOW = 1700003600.0
HEADERS = (
    b"Received: from client.example by hop1.example; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@origin.example>\r\n"
    b"To: bob@dest.example, carol@dest.example\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@origin.example>\r\n"
)
BODY = b"Hello Bob,\r\n\r\nthe numbers are attached.\r\n.\r\nFrom here on, nothing.\r\n"

FAILED = RecipientReport(
    address="bob@dest.example",
    action="failed",
    status="5.1.1",
    original_recipient="rfc822;Bob@Dest.example",
    remote_mta="hop2.example",
    diagnostic="550 5.1.1 <bob@dest.example>: Recipient address rejected: User unknown",
    last_attempt=ARRIVAL + 60,
)
DELAYED = RecipientReport(
    address="carol@dest.example",
    action="delayed",
    status="4.4.1",
    remote_mta="hop3.example",
    diagnostic="421 4.4.1 hop3.example: connection timed out",
    last_attempt=ARRIVAL + 120,
    will_retry_until=ARRIVAL + 5 * 86400,
)
DELIVERED = RecipientReport(address="dave@dest.example", action="delivered", status="2.0.0")


def dsn(**kwargs: Any) -> bytes:
    """
    Build a DSN for the sample message; C{kwargs} override the defaults.
    """
    args: dict[str, Any] = dict(
        reporting_mta="hop1.example",
        sender="alice@origin.example",
        original_headers=HEADERS,
        original_body=io.BytesIO(BODY),
        reports=[FAILED],
        arrival=ARRIVAL,
        envid="ENV-42",
        queue_id="4Q8ZQ1B2C3",
        now=NOW,
    )
    args.update(kwargs)
    return build_dsn(**args)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(msg: EmailMessage) -> list[EmailMessage]:
    """
    The header blocks of the C{message/delivery-status} part.
    """
    report = parts(msg)[1]
    assert report.get_content_type() in ("message/delivery-status", "message/global-delivery-status")
    return parts(report)


def raw_content(data: bytes, msg: EmailMessage, index: int) -> bytes:
    """
    The octets of the body of part C{index} of the report, as sent: between
    the blank line after its header section and the next delimiter.
    """
    boundary = msg.get_boundary()
    assert boundary
    pieces = data.split(b"\r\n--" + boundary.encode())
    piece = pieces[index + 1]
    assert piece.startswith(b"\r\n")
    _, sep, content = piece[2:].partition(b"\r\n\r\n")
    assert sep
    return content


def assert_wire_format(data: bytes) -> None:
    """
    Every line of C{data} ends in CRLF, there is no bare CR or LF, and no
    line is longer than 998 octets.
    """
    assert data.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


def header_lines(data: bytes) -> list[bytes]:
    """
    Every line of C{data} that starts a header field (not a continuation).
    """
    return [line for line in data.split(b"\r\n") if re.match(rb"[!-9;-~]+:", line)]


def test_report_structure() -> None:
    """
    The DSN is a C{multipart/report} with report-type C{delivery-status} and
    three parts: text, C{message/delivery-status}, the returned message; the
    top-level header section is that of an automatic reply to the sender.
    """
    data = dsn()
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["MIME-Version"] == "1.0"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "message/rfc822",
    ]
    assert b"\r\nFrom: MAILER-DAEMON@hop1.example (Mail Delivery System)\r\n" in b"\r\n" + data
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@hop1.example"
    assert msg["To"].addresses[0].addr_spec == "alice@origin.example"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"].datetime.timestamp() == NOW
    assert re.search(rb"\r\nMessage-ID: <[^<>@\s]+@hop1\.example>\r\n", data)
    assert msg.defects == []


def test_message_id_domain() -> None:
    """
    The C{Message-ID} is in C{message_id_domain} when one is given, and names
    the queue id.
    """
    data = dsn(message_id_domain="mail.example.net")
    assert re.search(rb"\r\nMessage-ID: <\S+\.4Q8ZQ1B2C3@mail\.example\.net>\r\n", data)


@pytest.mark.parametrize(
    "reports, subject",
    [
        ([FAILED], "Undelivered Mail Returned to Sender"),
        ([DELAYED], "Delayed Mail (still being retried)"),
        ([DELIVERED], "Successful Mail Delivery Report"),
        ([RecipientReport("e@dest.example", "relayed", "2.0.0")], "Successful Mail Delivery Report"),
        ([DELIVERED, DELAYED], "Delayed Mail (still being retried)"),
        ([DELIVERED, DELAYED, FAILED], "Undelivered Mail Returned to Sender"),
    ],
)
def test_subject(reports: list[RecipientReport], subject: str) -> None:
    """
    The subject says what happened; with mixed outcomes, the worst wins.
    """
    assert parse(dsn(reports=reports))["Subject"] == subject


def test_per_message_fields() -> None:
    """
    The first block of the delivery-status holds the per-message fields in
    RFC 3464 order: Original-Envelope-Id, Reporting-MTA, Arrival-Date, then
    the X-Relaynet-Queue-ID extension field.
    """
    block = status_blocks(parse(dsn()))[0]
    assert block.keys() == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Relaynet-Queue-ID"]
    assert block["Original-Envelope-Id"] == "ENV-42"
    assert block["Reporting-MTA"] == "dns; hop1.example"
    assert parsedate_to_datetime(block["Arrival-Date"]).timestamp() == ARRIVAL
    assert block["X-Relaynet-Queue-ID"] == "4Q8ZQ1B2C3"


def test_per_message_fields_optional() -> None:
    """
    Without an ENVID or a queue id, their fields are left out.
    """
    block = status_blocks(parse(dsn(envid=None, queue_id=None)))[0]
    assert block.keys() == ["Reporting-MTA", "Arrival-Date"]


def test_per_recipient_fields() -> None:
    """
    Each report gets a block of its own, in order, with the optional fields
    present only when known.
    """
    blocks = status_blocks(parse(dsn(reports=[FAILED, DELAYED, DELIVERED])))
    assert len(blocks) == 4
    failed, delayed, delivered = blocks[1:]

    assert failed.keys() == [
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]
    assert failed["Original-Recipient"] == "rfc822; Bob@Dest.example"
    assert failed["Final-Recipient"] == "rfc822; bob@dest.example"
    assert failed["Action"] == "failed"
    assert failed["Status"] == "5.1.1"
    assert failed["Remote-MTA"] == "dns; hop2.example"
    assert failed["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@dest.example>: Recipient address rejected: User unknown"
    )
    assert parsedate_to_datetime(failed["Last-Attempt-Date"]).timestamp() == ARRIVAL + 60

    assert delayed.keys() == [
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date", "Will-Retry-Until",
    ]
    assert delayed["Final-Recipient"] == "rfc822; carol@dest.example"
    assert delayed["Action"] == "delayed"
    assert delayed["Status"] == "4.4.1"
    assert parsedate_to_datetime(delayed["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400

    assert delivered.keys() == ["Final-Recipient", "Action", "Status"]
    assert delivered["Action"] == "delivered"
    assert delivered["Status"] == "2.0.0"


def test_delivery_status_wire_format() -> None:
    """
    On the wire the delivery-status body is header blocks separated by single
    blank lines, with no blank line before the next delimiter.
    """
    data = dsn(reports=[FAILED, DELIVERED])
    content = raw_content(data, parse(data), 1)
    blocks = content.split(b"\r\n\r\n")
    assert len(blocks) == 3
    assert blocks[0].startswith(b"Original-Envelope-Id: ENV-42\r\nReporting-MTA: dns; hop1.example\r\n")
    assert blocks[1].startswith(b"Original-Recipient: rfc822; Bob@Dest.example\r\n")
    assert blocks[2] == (
        b"Final-Recipient: rfc822; dave@dest.example\r\nAction: delivered\r\nStatus: 2.0.0\r\n"
    )


def test_long_diagnostic_folded() -> None:
    """
    A long diagnostic is folded at white space into lines of at most 78
    columns, and unfolds to the original text.
    """
    text = "550 5.7.1 " + " ".join(f"word{i}" for i in range(100))
    data = dsn(reports=[RecipientReport("x@dest.example", "failed", "5.7.1", diagnostic=text)])
    block = status_blocks(parse(data))[1]
    assert block["Diagnostic-Code"] == "smtp; " + text
    content = raw_content(data, parse(data), 1)
    field = content[content.index(b"Diagnostic-Code:"):].split(b"\r\n\r\n")[0]
    assert field.count(b"\r\n") > 5
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))


def test_diagnostic_types_and_status_fallback() -> None:
    """
    A diagnostic that is not an SMTP reply is typed C{X-Relaynet}; one that
    already says C{smtp;} is not typed twice; a status that is not an RFC
    3463 code is reported as the generic code of the action.
    """
    blocks = status_blocks(parse(dsn(reports=[
        RecipientReport("a@dest.example", "failed", "5.1.10", diagnostic="mailbox quota exceeded"),
        RecipientReport("b@dest.example", "failed", "bogus", diagnostic="smtp; 554 no"),
        RecipientReport("c@dest.example", "delayed", "4.x.1"),
        RecipientReport("d@dest.example", "relayed", ""),
    ])))
    assert blocks[1]["Diagnostic-Code"] == "X-Relaynet; mailbox quota exceeded"
    assert blocks[1]["Status"] == "5.1.10"
    assert blocks[2]["Diagnostic-Code"] == "smtp; 554 no"
    assert blocks[2]["Status"] == "5.0.0"
    assert blocks[3]["Status"] == "4.0.0"
    assert blocks[4]["Status"] == "2.0.0"


def test_human_readable_part() -> None:
    """
    The text part is 7-bit US-ASCII and names the reporting host, the queue
    id, every recipient with what happened to it, and that a copy of the
    message is attached.
    """
    msg = parse(dsn(reports=[FAILED, DELAYED, DELIVERED]))
    text_part = parts(msg)[0]
    assert text_part.get_content_charset() == "us-ascii"
    assert text_part["Content-Transfer-Encoding"] == "7bit"
    text = " ".join(text_part.get_content().split())
    assert "This is the mail system at host hop1.example." in text
    assert "4Q8ZQ1B2C3" in text
    assert (
        "<bob@dest.example>: host hop2.example said: 550 5.1.1 <bob@dest.example>: "
        "Recipient address rejected: User unknown"
    ) in text
    assert "<carol@dest.example>: host hop3.example said: 421 4.4.1" in text
    assert "you do not need to send your message again" in text
    assert "<dave@dest.example>: delivered" in text
    assert "A copy of it is attached." in text
    assert "postmaster" in text
    assert all(len(line) <= 76 for line in text_part.get_content().splitlines())


def test_human_readable_without_diagnostic() -> None:
    """
    Without a diagnostic, the text explains the status code.
    """
    report = RecipientReport("x@dest.example", "failed", "5.4.6")
    text = " ".join(parts(parse(dsn(reports=[report])))[0].get_content().split())
    assert "<x@dest.example>: a mail routing loop (status 5.4.6)" in text


def test_full_message_returned() -> None:
    """
    With a body (RET=FULL) the original comes back as C{message/rfc822}, its
    header section and body intact.
    """
    data = dsn()
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = parts(returned)[0]
    assert inner["Subject"] == "quarterly numbers"
    assert inner["Message-ID"] == "<orig-1@origin.example>"
    assert raw_content(data, msg, 2) == HEADERS + b"\r\n" + BODY
    assert "Content-Transfer-Encoding" not in msg
    assert "Content-Transfer-Encoding" not in returned


def test_headers_only_for_ret_hdrs() -> None:
    """
    Without a body (RET=HDRS) only the header section comes back, as
    C{text/rfc822-headers}, and the text says so.
    """
    data = dsn(original_body=None)
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert raw_content(data, msg, 2) == HEADERS
    assert "Its header section is attached." in " ".join(parts(msg)[0].get_content().split())


class CountingReader(io.BytesIO):
    """A body that remembers how many octets were read from it."""

    taken = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.taken += len(data)
        return data


def test_headers_only_when_too_big() -> None:
    """
    An original above C{max_returned} octets comes back as its header section
    only, the text says why, and no more of the body is read than the limit.
    """
    body = CountingReader(b"".join(b"line %06d of a long message\r\n" % i for i in range(100_000)))
    data = dsn(original_body=body, max_returned=10_000)
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert raw_content(data, msg, 2) == HEADERS
    text = " ".join(parts(msg)[0].get_content().split())
    assert "larger than 10000 octets" in text
    assert "only its header section is attached" in text
    assert body.taken <= 10_000
    assert len(data) < 20_000


def test_size_limit_boundary() -> None:
    """
    C{max_returned} counts the header section, the blank line and the body:
    an original of exactly that size is returned whole, one octet more is not.
    """
    size = len(HEADERS) + 2 + len(BODY)
    msg = parse(dsn(max_returned=size))
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    msg = parse(dsn(max_returned=size - 1))
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    msg = parse(dsn(max_returned=10))
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_headers_only_when_lines_too_long() -> None:
    """
    A body with a line over 998 octets cannot be returned whole.
    """
    body = io.BytesIO(b"short\r\n" + b"y" * 999 + b"\r\nend\r\n")
    data = dsn(original_body=body)
    msg = parse(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "longer than 998 octets" in " ".join(parts(msg)[0].get_content().split())
    assert_wire_format(data)


def test_eight_bit_body_preserved() -> None:
    """
    An 8-bit original is carried octet for octet inside the returned part,
    which (like the report) is labelled 8bit; the generated parts stay
    7-bit. Its header section is 8-bit: an internationalised message (RFC
    6532), returned as message/global with a global-delivery-status (RFC 6533).
    """
    headers = HEADERS + b"X-Note: caf\xc3\xa9 \xff\r\n"
    body = bytes(range(0x80, 0x100)) + b"\r\n" + "gr\u00fc\u00dfe \u2603\r\n".encode() + b"\xfe\xff"
    data = dsn(original_headers=headers, original_body=io.BytesIO(body))
    msg = parse(data)
    assert raw_content(data, msg, 2) == headers + b"\r\n" + body
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[2].get_content_type() == "message/global"
    assert parts(msg)[1].get_content_type() == "message/global-delivery-status"
    assert msg.get_param("report-type") == "global-delivery-status"
    assert data[: data.index(b"Content-Type: message/global\r\n")].isascii()
    assert_wire_format(data)


def test_eight_bit_body_with_ascii_headers_is_message_rfc822() -> None:
    """An ASCII header section with an 8-bit body: message/rfc822 (8bit), not the global types."""
    body = "gr\u00fc\u00dfe\r\n".encode()
    data = dsn(original_headers=HEADERS, original_body=io.BytesIO(body))
    msg = parse(data)
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[1].get_content_type() == "message/delivery-status"
    assert msg.get_param("report-type") == "delivery-status"
    assert_wire_format(data)


def test_eight_bit_headers_only() -> None:
    """
    8-bit octets in a returned header section come back unchanged too.
    """
    headers = b"Subject: \xe2\x82\xac 100\r\nFrom: a@b.example\r\n"
    data = dsn(original_headers=headers, original_body=None)
    msg = parse(data)
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert raw_content(data, msg, 2) == headers


def test_original_normalised() -> None:
    """
    A header section without its last line end, bare LFs and CRs and
    over-long header lines are made CRLF-clean and folded.
    """
    headers = b"From: a@b.example\nX-Long: " + b"z" * 1500 + b"\rSubject: s"
    body = io.BytesIO(b"one\ntwo\rthree\r\n")
    data = dsn(original_headers=headers, original_body=body)
    assert_wire_format(data)
    msg = parse(data)
    inner = parts(parts(msg)[2])[0]
    assert inner["Subject"] == "s"
    assert inner["X-Long"] == "z" * 990 + " " + "z" * 510
    assert raw_content(data, msg, 2).endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n")


def test_wire_format() -> None:
    """
    Whatever the input, every line ends in CRLF and none is over 998 octets.
    """
    long_word = "w" * 2000
    reports = [
        RecipientReport("a" * 600 + "@dest.example", "failed", "5.1.1",
                        original_recipient="rfc822;" + "b" * 700, remote_mta="h" * 1200,
                        diagnostic=f"550 {long_word}\n{long_word}"),
        DELAYED,
        DELIVERED,
    ]
    for body in (None, io.BytesIO(BODY), io.BytesIO(b"bare\nlf\rcr")):
        data = dsn(reports=reports, original_body=body, envid="e" * 500)
        assert_wire_format(data)
        assert len(status_blocks(parse(data))) == 4


def test_wire_format_escaped_values() -> None:
    """
    Values that grow when escaped (non-ASCII ENVID, ORCPT, recipient) or
    are long (address type) still give no line over 998 octets.
    """
    report = RecipientReport(
        "\u00e9" * 400 + "@dest.example", "failed", "5.1.1",
        original_recipient="x" * 2000 + ";" + "\u00e9" * 400,
    )
    data = dsn(reports=[report], envid="\u00e9" * 500, sender="\u00e9" * 600 + "@origin.example")
    assert_wire_format(data)
    block = status_blocks(parse(data))[1]
    assert block["Original-Recipient"].startswith("utf-8; \\x{E9}")
    assert block["Final-Recipient"].startswith("utf-8; \\x{E9}")


def test_report_returned_in_report() -> None:
    """
    A DSN can carry another multipart message, DSN included: the boundaries
    do not clash and the inner message comes back octet for octet.
    """
    inner = dsn()
    headers, offset = split_headers(inner)
    data = dsn(original_headers=headers, original_body=io.BytesIO(inner[offset:]))
    msg = parse(data)
    assert raw_content(data, msg, 2) == inner
    returned = parts(parts(msg)[2])[0]
    assert returned.get_content_type() == "multipart/report"
    assert returned.get_boundary() != msg.get_boundary()
    assert [p.get_content_type() for p in parts(returned)] == [
        "text/plain", "message/delivery-status", "message/rfc822",
    ]
    assert len(status_blocks(returned)) == 2


INJECTIONS = [
    "bob@dest.example\r\nBcc: victim@evil.example",
    "bob@dest.example\nBcc: victim@evil.example",
    "bob@dest.example\rBcc: victim@evil.example",
    "bob@dest.example\x1cBcc: victim@evil.example",
    "bob@dest.example\u2028Bcc: victim@evil.example",
    "bob@dest.example\x85Bcc: victim@evil.example",
    "bob@dest.example\udc0d\udc0aBcc: victim@evil.example",
    "=?utf-8?q?x=0D=0ABcc:_victim@evil.example?=@dest.example",
    "bob@dest.example =?utf-8?q?=0D=0ABcc:_victim@evil.example?=",
]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_header_injection(evil: str) -> None:
    """
    Addresses, ORCPT, ENVID, remote host and diagnostic from outside cannot
    add a header line anywhere in the DSN, however they try: CR, LF, other
    line breaks, escaped surrogates, RFC 2047 encoded words.
    """
    report = RecipientReport(
        address=evil, action="failed", status="5.1.1", original_recipient="rfc822;" + evil,
        remote_mta=evil, diagnostic="550 " + evil,
    )
    data = dsn(sender=evil, reports=[report], envid=evil, queue_id=evil, original_body=None)
    assert_wire_format(data)
    assert not any(line.lower().startswith(b"bcc") for line in header_lines(data))
    msg = parse(data)
    assert "Bcc" not in msg
    assert msg.keys() == [
        "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version", "Content-Type",
    ]
    blocks = status_blocks(msg)
    assert len(blocks) == 2
    assert blocks[0].keys() == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Relaynet-Queue-ID"]
    assert blocks[1].keys() == [
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
    ]
    assert blocks[1]["Action"] == "failed"


def test_encoded_word_kept_verbatim() -> None:
    """
    An address that looks like an RFC 2047 encoded word is written as it is,
    not decoded (decoding it would let it carry a CRLF).
    """
    evil = "=?utf-8?q?x=0D=0ABcc:_victim@evil.example?=@dest.example"
    data = dsn(sender=evil, reports=[RecipientReport(evil, "failed", "5.1.1", diagnostic="550 " + evil)])
    unfolded = data.replace(b"\r\n ", b" ")
    assert b"\r\nTo: <" + evil.encode() + b">\r\n" in unfolded
    assert b"\r\nFinal-Recipient: rfc822; " + evil.encode() + b"\r\n" in unfolded
    assert b"\r\nDiagnostic-Code: smtp; 550 " + evil.encode() + b"\r\n" in unfolded


def test_non_ascii_addresses() -> None:
    """
    A non-ASCII recipient is reported with the RFC 6533 C{utf-8} address type
    in a 7-bit delivery-status; a non-ASCII sender gets a UTF-8 C{To:} field
    (RFC 6532), and the text part is then quoted-printable UTF-8.
    """
    report = RecipientReport(
        "j\u00f8rgen@b\u00fccher.example", "failed", "5.1.1",
        original_recipient="rfc822;J\u00f8rgen+x=y@b\u00fccher.example",
    )
    data = dsn(sender="s\u00e9bastien@origin.example", reports=[report], original_body=None)
    assert_wire_format(data)
    assert b"\r\nTo: <s\xc3\xa9bastien@origin.example>\r\n" in data
    msg = parse(data)
    block = status_blocks(msg)[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F8}rgen@b\\x{FC}cher.example"
    assert block["Original-Recipient"] == "utf-8; J\\x{F8}rgen\\x{2B}x\\x{3D}y@b\\x{FC}cher.example"
    text_part = parts(msg)[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<j\u00f8rgen@b\u00fccher.example>:" in text_part.get_content()
    assert raw_content(data, msg, 1).isascii()


def test_envid_escaped() -> None:
    """
    Non-ASCII and control characters of an ENVID are written as xtext.
    """
    block = status_blocks(parse(dsn(envid="id\u00e9\r\n1")))[0]
    assert block["Original-Envelope-Id"] == "id+C3+A9+0D+0A1"


def test_invalid_arguments() -> None:
    """
    No reports, an unknown action, the null sender and a reporting MTA that
    is not a host name are refused.
    """
    with pytest.raises(ValueError):
        dsn(reports=[])
    with pytest.raises(ValueError):
        dsn(reports=[RecipientReport("a@b.example", "bounced", "5.0.0")])
    with pytest.raises(ValueError):
        dsn(sender="")
    with pytest.raises(ValueError):
        dsn(reporting_mta="hop1.example\r\nBcc: x@y")
    with pytest.raises(ValueError):
        dsn(message_id_domain="a b")


def test_reporting_mta_forms() -> None:
    """
    A fully qualified name loses its trailing dot; an address literal is
    accepted as the reporting MTA.
    """
    assert status_blocks(parse(dsn(reporting_mta="hop1.example.")))[0]["Reporting-MTA"] == (
        "dns; hop1.example"
    )
    msg = parse(dsn(reporting_mta="[192.0.2.1]"))
    assert status_blocks(msg)[0]["Reporting-MTA"] == "dns; [192.0.2.1]"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@[192.0.2.1]"


@pytest.mark.parametrize(
    "data, headers, offset",
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", 14),
        (b"A: 1\r\n\r\n", b"A: 1\r\n", 8),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", 12),
        (b"A: 1", b"A: 1", 4),
        (b"", b"", 0),
        (b"\r\nbody", b"", 2),
        (b"A: 1\n\nbody", b"A: 1\n", 6),
        (b"A: 1\r\n folded\r\n\r\n\r\nbody", b"A: 1\r\n folded\r\n", 17),
    ],
)
def test_split_headers(data: bytes, headers: bytes, offset: int) -> None:
    """
    L{split_headers} finds the first blank line; a message without one is
    all header section.
    """
    assert split_headers(data) == (headers, offset)


def test_split_headers_feeds_build_dsn() -> None:
    """
    The two halves of L{split_headers} are what L{build_dsn} takes.
    """
    stored = HEADERS + b"\r\n" + BODY
    headers, offset = split_headers(stored)
    f = io.BytesIO(stored)
    f.seek(offset)
    data = dsn(original_headers=headers, original_body=f)
    msg = parse(data)
    assert raw_content(data, msg, 2) == stored


@pytest.mark.parametrize(
    "notify, failed, delayed, success",
    [
        (None, True, True, False),
        (("NEVER",), False, False, False),
        (("FAILURE",), True, False, False),
        (("DELAY",), False, True, False),
        (("SUCCESS",), False, False, True),
        (("SUCCESS", "FAILURE"), True, False, True),
        (("FAILURE", "DELAY"), True, True, False),
        (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
        (("success", "delay"), False, True, True),
        ((), False, False, False),
    ],
)
def test_is_bounce_worthy(
    notify: tuple[str, ...] | None, failed: bool, delayed: bool, success: bool
) -> None:
    """
    NOTIFY decides which outcomes are reported (RFC 3461 section 4.1);
    without it, failures and delays are; the null sender never gets a DSN.
    """
    sender = "alice@origin.example"
    assert is_bounce_worthy(sender, notify, "failed") is failed
    assert is_bounce_worthy(sender, notify, "delayed") is delayed
    for action in ("delivered", "relayed", "expanded"):
        assert is_bounce_worthy(sender, notify, action) is success
    for action in ("failed", "delayed", "delivered", "relayed", "expanded"):
        assert is_bounce_worthy("", notify, action) is False


def test_is_bounce_worthy_unknown_action() -> None:
    """
    An action that is not an RFC 3464 one is an error.
    """
    with pytest.raises(ValueError):
        is_bounce_worthy("alice@origin.example", None, "bounced")


def test_global_delivery_status_keeps_every_recipient_block() -> None:
    """
    In a message/global-delivery-status part every per-recipient block is
    written (the email generator writes them all only for
    message/delivery-status); parsed back, as RFC 6533 reports are.
    """
    reports = [
        RecipientReport("b@y.example", "failed", "5.1.1", remote_mta="mx.y.example", diagnostic="550 5.1.1 no"),
        RecipientReport("c@y.example", "failed", "5.2.2"),
    ]
    data = dsn(original_headers="Subject: caf\u00e9\r\nFrom: a@b.example\r\n".encode(),
               original_body=io.BytesIO(b"body\r\n"), reports=reports)
    assert_wire_format(data)
    msg = parse(data)
    status = parts(msg)[1]
    assert status.get_content_type() == "message/global-delivery-status"
    text = raw_content(data, msg, 1).decode()
    blocks = [b for b in text.strip().split("\r\n\r\n")]
    assert len(blocks) == 3, text
    fields = [email.message_from_string(b.replace("\r\n", "\n")) for b in blocks]
    assert fields[0]["Reporting-MTA"].startswith("dns;")
    assert [(f["Final-Recipient"], f["Status"]) for f in fields[1:]] == [
        ("rfc822; b@y.example", "5.1.1"), ("rfc822; c@y.example", "5.2.2")]
    assert fields[1]["Remote-MTA"] == "dns; mx.y.example"
