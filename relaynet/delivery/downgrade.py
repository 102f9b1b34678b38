# -*- test-case-name: tests.test_downgrade -*-
"""
What a message needs from the next hop, and the 8-bit to 7-bit conversion
for one that lacks 8BITMIME (RFC 6152 section 3, RFC 6531 section 3.4).

 - SMTPUTF8 is needed only when the envelope (the sender or a recipient of
   this transfer) or the header section holds non-ASCII: a message that
   merely carried C{SMTPUTF8} on MAIL but is all ASCII goes to a hop without
   SMTPUTF8 without the parameter (Postfix's C{smtputf8_autodetect_classes}
   idea). What the intake recorded (C{params.content}, L{needs_smtputf8})
   decides; a message queued before that was recorded is taken as declared.
 - 8BITMIME is needed only when the message holds 8-bit octets; to a hop
   without it such a message is converted (L{to_seven_bit}: quoted-printable
   for text parts, base64 for others, as Postfix's MIME output conversion),
   or bounced 5.6.3 where C{[outbound] eight_bit = "bounce"}.
"""

from __future__ import annotations

import email.encoders
import email.parser
import email.policy
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO
from typing import Iterable

from relaynet.queue.spool import Envelope

_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def needs_smtputf8(envelope: Envelope, recipients: Iterable[str]) -> bool:
    """The message must travel with SMTPUTF8 (it cannot go to a hop without it)."""
    if not envelope.params.get("smtputf8"):
        return False
    if not envelope.sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    content = envelope.params.get("content") or ""
    if len(content) == 2 and content[0] in "78":
        return content[0] == "8"
    return True


def has_eight_bit(envelope: Envelope) -> bool:
    """The message holds 8-bit octets (needs 8BITMIME or a conversion)."""
    content = envelope.params.get("content") or ""
    if len(content) == 2 and content[1] in "78":
        return content[1] == "8"
    return envelope.params.get("body") == "8BITMIME"


class ConversionError(ValueError):
    """The message cannot be converted to 7 bits (8-bit octets in its header section)."""


def to_seven_bit(data: bytes) -> bytes:
    """
    The message with every 8-bit body part re-encoded: C{text/*} as
    quoted-printable, anything else as base64; multipart structure,
    headers and 7-bit parts are kept as they are. (RFC 2045 forbids
    encoding C{message/*} and C{multipart/*} parts: their insides are
    converted instead.)

    @raise ConversionError: the header section of the message or of a part
        holds 8-bit octets, which no Content-Transfer-Encoding can carry.
    """
    msg = email.parser.BytesParser(policy=_POLICY).parsebytes(data)
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() == "message":
            _check_headers(part)
            continue
        _check_headers(part)
        payload = part.get_payload()
        if not isinstance(payload, str) or payload.isascii():
            continue  # 7-bit on the wire already
        cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
        if cte not in ("7bit", "8bit", "binary"):
            raise ConversionError(f"8-bit octets in a {cte} part")
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes):
            raise ConversionError("a part without a decodable payload")
        del part["Content-Transfer-Encoding"]
        part.set_payload(raw)
        if part.get_content_maintype() == "text":
            # Text line breaks are line breaks of the encoding, not =0D (RFC 2045 6.7).
            part.set_payload(raw.replace(b"\r\n", b"\n"))
            email.encoders.encode_quopri(part)
        else:
            email.encoders.encode_base64(part)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(msg)
    result = out.getvalue()
    if not result.isascii():
        raise ConversionError("8-bit octets remain after conversion")
    return result


def _check_headers(part: Message) -> None:
    for name, value in part.items():
        text = str(value)
        if not text.isascii():
            raise ConversionError(f"8-bit octets in the {name} header field")


__all__ = ["ConversionError", "has_eight_bit", "needs_smtputf8", "to_seven_bit"]
