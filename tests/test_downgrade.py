"""
L{relaynet.delivery.downgrade}: what a message needs from the next hop, and
the 8-bit to 7-bit MIME conversion (checked by parsing the result back with
Python's C{email}, and by line lengths and octets on the wire).
"""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from relaynet.delivery.downgrade import ConversionError, has_eight_bit, needs_smtputf8, to_seven_bit
from relaynet.queue.spool import Envelope, Recipient


def env(content: str | None, smtputf8: bool = True, body: str | None = "8BITMIME",
        sender: str = "a@x.test") -> Envelope:
    params = {"smtputf8": smtputf8, "body": body}
    if content is not None:
        params["content"] = content
    return Envelope("Q", sender, (Recipient("b@y.test"),), 0.0, params=params)


@pytest.mark.parametrize(("e", "rcpts", "needed"), [
    (env("77"), ["b@y.test"], False),          # SMTPUTF8 on MAIL, all ASCII: not needed
    (env("87"), ["b@y.test"], True),           # UTF-8 header section
    (env("78"), ["b@y.test"], False),          # 8-bit body only: that is 8BITMIME's business
    (env("77"), ["bj\u00f8rn@y.test"], True),  # a UTF-8 recipient
    (env("77", sender="\u00e5sa@x.test"), ["b@y.test"], True),
    (env(None), ["b@y.test"], True),           # queued by an older version: as declared
    (env("87", smtputf8=False), ["b@y.test"], False),  # never declared: not ours to add
])
def test_needs_smtputf8(e: Envelope, rcpts: list[str], needed: bool) -> None:
    assert needs_smtputf8(e, rcpts) is needed


@pytest.mark.parametrize(("e", "eight"), [
    (env("77"), False), (env("78"), True), (env(None, body="8BITMIME"), True), (env(None, body=None), False),
])
def test_has_eight_bit(e: Envelope, eight: bool) -> None:
    assert has_eight_bit(e) is eight


MULTIPART = (
    b"From: a@x.test\r\nTo: b@y.test\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Gr\u00fc\u00dfe aus K\u00f6ln \u2603\r\n.leading dot\r\n".encode()
    + b"--XX\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii stays\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + bytes(range(0x80, 0x100)).replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
    b"--XX--\r\nepilogue\r\n"
)


def test_conversion_is_7bit_and_decodes_to_the_same_content() -> None:
    out = to_seven_bit(MULTIPART)
    assert out.isascii()
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", out)
    before = email.message_from_bytes(MULTIPART, policy=email.policy.default)
    after = email.message_from_bytes(out, policy=email.policy.default)
    b_parts, a_parts = list(before.iter_parts()), list(after.iter_parts())
    assert [p.get_content_type() for p in a_parts] == [p.get_content_type() for p in b_parts]
    def content(p: object) -> bytes:
        data = p.get_payload(decode=True)  # type: ignore[attr-defined]
        assert isinstance(data, bytes)
        return data.replace(b"\r\n", b"\n")

    assert [content(p) for p in a_parts] == [content(p) for p in b_parts]
    assert b"=0D" not in out
    assert a_parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert a_parts[2]["Content-Transfer-Encoding"] == "base64"
    assert "Content-Transfer-Encoding" not in a_parts[1]
    assert after["Subject"] == "8bit" and after["To"] == "b@y.test"


def test_single_part_8bit_text() -> None:
    data = b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "\u00e9t\u00e9\r\n".encode()
    out = to_seven_bit(data)
    assert out.isascii() and b"Content-Transfer-Encoding: quoted-printable" in out
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_content() == "\u00e9t\u00e9\r\n" or msg.get_content() == "\u00e9t\u00e9\n"


def test_eight_bit_header_cannot_be_converted() -> None:
    with pytest.raises(ConversionError, match="Subject"):
        to_seven_bit("Subject: caf\u00e9\r\n\r\nbody\r\n".encode())
