# -*- test-case-name: tests.test_bounce -*-
"""
Delivery status notifications: RFC 3461 (when), RFC 3464 and RFC 6522 (what).

Pure functions, no I/O but reading the file object handed to L{build_dsn}.

L{build_dsn} returns a complete C{multipart/report; report-type=delivery-status}
message as bytes with CRLF line ends, to be queued with the null sender:

 1. C{text/plain}: an explanation for humans, one paragraph per kind of
    outcome, one entry per recipient;
 2. C{message/delivery-status}: the per-message fields, then one block of
    per-recipient fields for each report;
 3. C{message/rfc822} with the original message (C{RET=FULL} and small
    enough, no line over 998 octets), else C{text/rfc822-headers} with its
    header section.

An internationalised original (UTF-8 in its header section, RFC 6532) is
returned as RFC 6533 says: the parts are
C{message/global-delivery-status}, C{message/global} and
C{message/global-headers}, and the report's type parameter is
C{global-delivery-status}.

Everything is built with the standard library C{email} package. Values that
come from outside (addresses, diagnostics, ORCPT, ENVID, remote host names) are
never given to the header registry: on Python 3.11 it decodes RFC 2047 encoded
words in header values, and C{=?utf-8?q?x=0D=0ABcc:_y?=} then comes out as a
header line of its own. They are cleaned of control and line-break characters
and stored verbatim by L{_DSNPolicy}, which refolds nothing. The returned
original is the one part that may hold 8-bit octets; it is carried octet for
octet (the part and the report are then labelled C{8bit}).
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
import unicodedata
from datetime import datetime, timezone
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime, make_msgid
from io import BytesIO
from typing import Protocol

from attrs import frozen

#: The RFC 3464 actions a L{RecipientReport} may carry.
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

#: The RFC 3461 NOTIFY keyword that asks for each action.
_NOTIFY_FOR_ACTION = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}

_PART_DESCRIPTIONS = {
    "failed": "Undelivered Message",
    "delayed": "Delayed Message",
    "success": "Delivered Message",
}

#: The longest line allowed by RFC 5322, without its CRLF.
MAX_LINE = 998

# Caps on values from outside, in characters, so that no line can get longer
# than MAX_LINE whatever folding does.
_MAX_ADDRESS = 512
_MAX_FIELD = 900
_MAX_DIAGNOSTIC = 900

_HUMAN_WIDTH = 72
_FIELD_WIDTH = 78

_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_SMTP_REPLY_RE = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
    r"|\[[A-Za-z0-9:.]+\]"
)
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_BLANK_LINE_RE = re.compile(rb"(?:\A|\n)(\r?\n)")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
_LONG_LINE_RE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))
_BARE_CR_LF_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_EIGHT_BIT_RE = re.compile(rb"[\x80-\xff]")

# Unicode categories that must never reach a header: controls (CR, LF, NUL,
# the C1 set, and the characters str.splitlines() breaks at), lone surrogates
# (which surrogateescape would turn into raw octets) and line/paragraph
# separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

# RFC 3463 subject codes, for recipients reported without a diagnostic.
_STATUS_TEXT = {
    "0.0": "an unspecified error",
    "1.0": "an addressing problem",
    "1.1": "the mailbox does not exist",
    "1.2": "the destination domain does not exist or accepts no mail",
    "1.3": "the mailbox address is malformed",
    "1.6": "the mailbox has moved",
    "2.0": "a mailbox problem",
    "2.1": "the mailbox is disabled",
    "2.2": "the mailbox is full",
    "2.3": "the message is larger than the mailbox accepts",
    "3.0": "a mail system problem",
    "3.4": "the message is too big for the mail system",
    "4.0": "a network or routing problem",
    "4.1": "the destination host did not answer",
    "4.2": "the connection to the destination host was lost",
    "4.3": "a directory server failure",
    "4.4": "no route to the destination",
    "4.6": "a mail routing loop",
    "4.7": "the message was in the queue too long",
    "5.0": "a mail protocol problem",
    "6.0": "a message content problem",
    "7.0": "a security or policy problem",
    "7.1": "delivery was not authorized",
}
_SUBJECT_CLASS_TEXT = {
    "1": "an addressing problem",
    "2": "a mailbox problem",
    "3": "a mail system problem",
    "4": "a network or routing problem",
    "5": "a mail protocol problem",
    "6": "a message content problem",
    "7": "a security or policy problem",
}


class Readable(Protocol):
    """What L{build_dsn} reads the original message's body from."""

    def read(self, n: int = -1, /) -> bytes:
        """At most C{n} more octets (all if negative); C{b""} at the end."""


class _DSNPolicy(EmailPolicy):
    """
    L{EmailPolicy} that stores some fields verbatim instead of parsing them
    with the header registry.

    With C{refold_source="none"} such a field is written exactly as stored:
    its lines (folds L{_fold_field} made) joined by the line separator.

    @ivar verbatim_fields: lower-cased names of the fields stored verbatim.
    """

    verbatim_fields: frozenset[str] = frozenset()

    def header_store_parse(self, name: str, value: object) -> tuple[str, str]:
        """
        Store a verbatim field as given, after checking it cannot add a header
        line; anything else goes to the header registry.

        @raise ValueError: a verbatim value holds control or line-break
            characters other than the folds of L{_fold_field}.
        """
        if name.lower() in self.verbatim_fields and isinstance(value, str):
            lines = value.split("\n")
            if any(not line.strip() or _unsafe(line) for line in lines) or any(
                not line.startswith(" ") for line in lines[1:]
            ):
                raise ValueError(f"unsafe value for {name}: {value!r}")
            return (name, value)
        return super().header_store_parse(name, value)


class _Generator(BytesGenerator):
    """
    L{BytesGenerator} that writes a C{message/rfc822} part whose payload is a
    string (the original, decoded with C{surrogateescape}) back to its octets.
    L{BytesGenerator} writes such a payload with a strict ASCII encode, which
    fails on 8-bit octets; every other string it encodes this way is ASCII.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


_PER_MESSAGE_FIELDS = ("Original-Envelope-Id", "Reporting-MTA", "Arrival-Date", "X-Relaynet-Queue-ID")
_PER_RECIPIENT_FIELDS = (
    "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
    "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until",
)
# typeshed lists only the stdlib's own policy keywords; the constructor sets
# any attribute the class has, verbatim_fields included.
_POLICY = _DSNPolicy(  # type: ignore[call-overload]
    linesep="\r\n",
    refold_source="none",
    verbatim_fields=frozenset(
        n.lower() for n in ("To", "Message-ID") + _PER_MESSAGE_FIELDS + _PER_RECIPIENT_FIELDS
    ),
)


@frozen
class RecipientReport:
    """
    The outcome to report for one recipient.

    @ivar address: the final recipient (an RFC 822 address).
    @ivar action: one of L{ACTIONS}.
    @ivar status: the RFC 3463 status code, e.g. C{"5.1.1"}; anything else
        is reported as the generic code of the action's class.
    @ivar original_recipient: the ORCPT as stored, C{"addr-type;address"}.
    @ivar remote_mta: the host that gave the diagnostic, e.g.
        C{"hop2.example"}.
    @ivar diagnostic: the reply of that host (or a local explanation), e.g.
        C{"550 5.1.1 <a@b>: user unknown"}.
    @ivar last_attempt: time of the last delivery attempt (Unix seconds).
    @ivar will_retry_until: for C{delayed}: when the mail system gives up
        (Unix seconds).
    """

    address: str
    action: str
    status: str
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def split_headers(data: bytes) -> tuple[bytes, int]:
    """
    Find the header section of a stored message.

    The blank line may end in CRLF or a bare LF. A message without a blank
    line is all header section; one starting with a blank line has none.

    @param data: the message, or at least a prefix holding its header section.
    @return: the header section (each field with its line end, without the
        blank line) and the offset of the body's first octet (after the blank
        line; C{len(data)} when there is no body).
    """
    m = _BLANK_LINE_RE.search(data)
    if m is None:
        return data, len(data)
    return data[: m.start(1)], m.end(1)


def is_bounce_worthy(sender: str, notify: tuple[str, ...] | None, action: str) -> bool:
    """
    Whether the sender is to get a DSN for this outcome (RFC 3461 section 4.1).

    @param sender: the envelope sender; C{""} (the null sender) never gets one.
    @param notify: the recipient's NOTIFY keywords, or L{None} when it gave
        none: then failures and delays are reported, successes are not.
        C{NEVER} suppresses everything; otherwise only the listed kinds
        (C{FAILURE}, C{DELAY}, C{SUCCESS}) are reported.
        An empty tuple asks for nothing.
    @param action: one of L{ACTIONS}.
    @return: C{True} if a DSN is to be sent.
    @raise ValueError: C{action} is not one of L{ACTIONS}.
    """
    try:
        wanted = _NOTIFY_FOR_ACTION[action]
    except KeyError:
        raise ValueError(f"unknown DSN action {action!r}") from None
    if sender.strip() in ("", "<>"):
        return False
    if notify is None:
        return wanted in ("FAILURE", "DELAY")
    keywords = {k.strip().upper() for k in notify}
    if "NEVER" in keywords:
        return False
    return wanted in keywords


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    original_headers: bytes,
    original_body: Readable | None,
    reports: list[RecipientReport],
    arrival: float,
    envid: str | None = None,
    queue_id: str | None = None,
    message_id_domain: str | None = None,
    now: float | None = None,
    max_returned: int = 256 * 1024,
) -> bytes:
    """
    Build a delivery status notification (RFC 3464, RFC 6522).

    @param reporting_mta: our host name (or an address literal).
    @param sender: the envelope sender of the original: the DSN's recipient.
    @param original_headers: the header section of the original (see
        L{split_headers}), with or without the line end of its last field.
    @param original_body: the rest of the original, positioned at the first
        octet of its body, to return the whole message (C{RET=FULL}); L{None}
        to return the header section only. At most C{max_returned} octets of
        the message are read.
    @param reports: one per recipient to report on; not empty.
    @param arrival: when the original arrived (Unix seconds).
    @param envid: the C{ENVID} of the original, xtext-decoded.
    @param queue_id: the original's queue id, named in the human-readable
        part and in an C{X-Relaynet-Queue-ID} per-message field.
    @param message_id_domain: the domain of the C{Message-ID}; defaults to
        C{reporting_mta}.
    @param now: the time of the report (Unix seconds); defaults to now.
    @param max_returned: the largest original (header section, blank line
        and body) returned whole; above it only the header section is.
    @return: the message, CRLF line ends, no line over 998 octets. It holds
        8-bit octets only if the returned original does (then the report and
        that part say C{Content-Transfer-Encoding: 8bit}).
    @raise ValueError: C{reports} is empty or holds an unknown action, the
        sender is null, or C{reporting_mta} or C{message_id_domain} is not a
        host name.
    """
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    for report in reports:
        if report.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {report.action!r}")
    mta = _host_name(reporting_mta, "reporting_mta")
    id_domain = mta if message_id_domain is None else _host_name(message_id_domain, "message_id_domain")
    to = _clean(sender, _MAX_ADDRESS)
    if to in ("", "<>"):
        raise ValueError("no DSN is sent to the null sender")
    while len(to.encode("utf-8")) > _MAX_FIELD:
        to = to[:-1]
    if now is None:
        now = time.time()
    policy = _POLICY if to.isascii() else _POLICY.clone(utf8=True)
    kinds = {_kind(r.action) for r in reports}
    worst = next(k for k in ("failed", "delayed", "success") if k in kinds)

    headers = _normalise_headers(original_headers)
    returned, why_headers_only = _returned_message(headers, original_body, max_returned)
    eight_bit = _EIGHT_BIT_RE.search(headers if returned is None else returned) is not None
    # RFC 6533: an internationalised message (UTF-8 in its header section,
    # RFC 6532) goes back in the "global" types.
    international = not headers.isascii()

    # Typed as the MIMEPart it is: typeshed's attach() takes only parts of
    # the message's own class.
    msg: MIMEPart = EmailMessage(policy=policy)
    msg["From"] = f"MAILER-DAEMON@{mta} (Mail Delivery System)"
    msg["To"] = f"<{to}>"
    msg["Subject"] = _SUBJECTS[worst]
    msg["Date"] = _datetime(now)
    msg["Message-ID"] = make_msgid(idstring=_id_token(queue_id), domain=id_domain)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = (
        f"multipart/report; report-type={'global-' if international else ''}delivery-status"
    )
    if eight_bit:
        msg["Content-Transfer-Encoding"] = "8bit"
    msg.set_boundary(_boundary(content=headers if returned is None else returned))
    msg.preamble = "This is a MIME-encapsulated delivery status notification."

    msg.attach(_human_part(policy, mta, reports, arrival, queue_id, why_headers_only, max_returned))
    msg.attach(_status_part(policy, mta, reports, arrival, envid, queue_id, international))

    original = MIMEPart(policy=policy)
    if returned is not None:
        original["Content-Type"] = "message/global" if international else "message/rfc822"
        original["Content-Description"] = _PART_DESCRIPTIONS[worst]
        content = returned
    else:
        original["Content-Type"] = "message/global-headers" if international else "text/rfc822-headers"
        original["Content-Description"] = _PART_DESCRIPTIONS[worst] + " Headers"
        content = headers
    if eight_bit:
        original["Content-Transfer-Encoding"] = "8bit"
    # A str payload of a message/rfc822 part is written out as it is, and the
    # lines of a text part with surrogate escapes are written back octet for
    # octet: the original is carried unchanged either way.
    original.set_payload(content.decode("ascii", "surrogateescape"))
    msg.attach(original)

    out = BytesIO()
    _Generator(out, mangle_from_=False, policy=policy).flatten(msg)
    data = out.getvalue()
    if _BARE_CR_LF_RE.search(data) or _LONG_LINE_RE.search(data):
        raise AssertionError("built a DSN with a bare CR/LF or an over-long line")
    return data


def _boundary(content: bytes) -> str:
    """
    A MIME boundary that does not occur in C{content}. The generator's own
    check for a clash looks for the boundary before a bare LF only, and so
    misses it in CRLF text; a random 128-bit one cannot be guessed either.
    """
    while True:
        boundary = f"=_relaynet_{secrets.token_hex(16)}"
        if boundary.encode() not in content:
            return boundary


def _kind(action: str) -> str:
    """
    @return: C{failed}, C{delayed} or C{success} for an action.
    """
    return action if action in ("failed", "delayed") else "success"


def _unsafe(text: str) -> bool:
    """
    @return: whether C{text} holds a character of L{_UNSAFE_CATEGORIES}.
    """
    return any(unicodedata.category(c) in _UNSAFE_CATEGORIES for c in text)


def _clean(value: str, limit: int = _MAX_FIELD) -> str:
    """
    Make an outside value safe for one header line: control, line-break and
    surrogate characters become spaces, runs of white space one space.

    @param limit: the most characters kept.
    @return: the cleaned value, stripped, at most C{limit} characters.
    """
    text = "".join(" " if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in value)
    return " ".join(text.split())[:limit].strip()


def _ascii(value: str, limit: int = _MAX_FIELD) -> str:
    """
    L{_clean}, and every non-ASCII character becomes C{?}.
    """
    return "".join(c if c.isascii() else "?" for c in _clean(value, limit))


def mta_name(remote: str) -> str | None:
    """
    The C{Remote-MTA} name (RFC 3464 2.3.5, type C{dns}) of a next hop as
    events name it: C{mx1.example[192.0.2.1]:25} gives C{mx1.example};
    C{192.0.2.1:25} gives C{[192.0.2.1]} and C{[2001:db8::1]:25}
    C{[IPv6:2001:db8::1]} (address literals, RFC 5321 4.1.3); C{host:port}
    gives C{host}. Never a port. None for something else.
    """
    import ipaddress

    m = re.fullmatch(r"([^\[\]:]+)\[[^\]]+\](?::\d+)?", remote)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::\d+)?", remote)
    host = m.group(1) if m else remote.rsplit(":", 1)[0] if remote.count(":") == 1 else remote
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host if host and _HOST_RE.fullmatch(host) else None
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _host_name(value: str, what: str) -> str:
    """
    @return: C{value} without a trailing dot, if it is a host name or an
        address literal.
    @raise ValueError: it is not.
    """
    if len(value) > 255 or not _HOST_RE.fullmatch(value):
        raise ValueError(f"{what} is not a host name: {value!r}")
    return value.rstrip(".")


def _id_token(queue_id: str | None) -> str | None:
    """
    @return: the letters and digits of C{queue_id}, for a C{Message-ID}.
    """
    if queue_id is None:
        return None
    token = "".join(c for c in queue_id if c.isascii() and c.isalnum())[:64]
    return token or None


def _datetime(when: float) -> datetime:
    return datetime.fromtimestamp(when, timezone.utc)


def _date(when: float) -> str:
    """
    @return: C{when} as an RFC 5322 date-time, in UTC.
    """
    return format_datetime(_datetime(when))


def _unitext(address: str) -> str:
    """
    Encode an address as RFC 6533 utf-8-addr-xtext: C{\\x{HEX}} for every
    character that is not printable ASCII, and for C{+}, C{=} and C{\\}.
    """
    out = []
    for c in address:
        if "!" <= c <= "~" and c not in "+=\\":
            out.append(c)
        else:
            out.append(f"\\x{{{ord(c):X}}}")
    return "".join(out)


def _address_value(address: str, addr_type: str = "rfc822") -> str:
    """
    Render an address for a C{*-Recipient} field: C{addr-type; address},
    or C{utf-8; } and the L{_unitext} form for a non-ASCII address.
    """
    address = _clean(address, _MAX_ADDRESS)
    if address.isascii():
        return f"{addr_type}; {address}"
    encoded = _unitext(address)
    while len(encoded) > _MAX_FIELD:
        address = address[:-1]
        encoded = _unitext(address)
    return f"utf-8; {encoded}"


def _original_recipient_value(orcpt: str) -> str:
    """
    Render a stored ORCPT (C{addr-type;address}, address decoded) for the
    C{Original-Recipient} field.
    """
    addr_type, sep, address = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not sep:
        addr_type, address = "rfc822", orcpt
    elif len(addr_type) > 32 or not _ADDR_TYPE_RE.fullmatch(addr_type):
        addr_type = "unknown"
    return _address_value(address.strip(), addr_type.lower() if addr_type.lower() == "rfc822" else addr_type)


def _envid_value(envid: str) -> str:
    """
    Render an ENVID: printable ASCII as it is, other characters as RFC 3461
    C{+XX} per UTF-8 octet; at most L{_MAX_FIELD} characters.
    """
    out = []
    size = 0
    for c in envid:
        piece = c if " " <= c <= "~" else "".join(f"+{b:02X}" for b in c.encode("utf-8", "replace"))
        size += len(piece)
        if size > _MAX_FIELD:
            break
        out.append(piece)
    return "".join(out).strip()


def _diagnostic_value(diagnostic: str) -> str:
    """
    Render a diagnostic: C{smtp; } for an SMTP reply, C{X-Relaynet; } for any
    other text.
    """
    text = _ascii(diagnostic, _MAX_DIAGNOSTIC)
    if text.lower().startswith("smtp;"):
        text = text[5:].strip()
    kind = "smtp" if _SMTP_REPLY_RE.match(text) else "X-Relaynet"
    return f"{kind}; {text}"


def _status_code(report: RecipientReport) -> str:
    """
    @return: the report's status, or the generic code of its action's class
        if it is not an RFC 3463 code.
    """
    status = report.status.strip()
    if _STATUS_RE.fullmatch(status):
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(report.action, "2.0.0")


def _fold_field(name: str, value: str) -> str:
    """
    Fold a field value at white space so its lines fit in 78 columns where
    possible; a word longer than that stays whole (values are capped, so no
    line gets over 998 octets).

    @return: the value, folds as C{"\\n "}.
    """
    indent = " " * (len(name) + 2)
    lines = textwrap.wrap(
        value, width=_FIELD_WIDTH, initial_indent=indent, subsequent_indent=" ",
        break_long_words=False, break_on_hyphens=False,
    )
    lines[0] = lines[0][len(indent):]
    return "\n".join(lines)


def _block(policy: EmailPolicy, fields: list[tuple[str, str]]) -> MIMEPart:
    """
    One block of a C{message/delivery-status} body: a header-only part.
    Only the free text of C{Diagnostic-Code} is folded; the other fields are
    short or capped, and stay on one line for simple DSN readers.
    """
    block = MIMEPart(policy=policy)
    for name, value in fields:
        block[name] = _fold_field(name, value) if name == "Diagnostic-Code" else value
    return block


def _status_part(
    policy: EmailPolicy,
    mta: str,
    reports: list[RecipientReport],
    arrival: float,
    envid: str | None,
    queue_id: str | None,
    international: bool = False,
) -> MIMEPart:
    """
    The C{message/delivery-status} part. The C{email} package models its body
    as a list of header blocks, which the generator writes separated by blank
    lines and the parser reads back the same way.

    @param international: a C{message/global-delivery-status} part (RFC
        6533 section 6), for an internationalised original; its fields stay
        7-bit (UTF-8 addresses as C{utf-8} type with C{unitext} escapes,
        which both types allow).
    """
    per_message = []
    if envid is not None and _envid_value(envid):
        per_message.append(("Original-Envelope-Id", _envid_value(envid)))
    per_message.append(("Reporting-MTA", f"dns; {mta}"))
    per_message.append(("Arrival-Date", _date(arrival)))
    if queue_id is not None and _ascii(queue_id):
        per_message.append(("X-Relaynet-Queue-ID", _ascii(queue_id)))
    blocks: list[Message[str, str] | str] = [_block(policy, per_message)]
    for r in reports:
        fields = []
        if r.original_recipient is not None and _clean(r.original_recipient):
            fields.append(("Original-Recipient", _original_recipient_value(r.original_recipient)))
        fields.append(("Final-Recipient", _address_value(r.address)))
        fields.append(("Action", r.action))
        fields.append(("Status", _status_code(r)))
        if r.remote_mta is not None and _ascii(r.remote_mta):
            fields.append(("Remote-MTA", f"dns; {_ascii(r.remote_mta)}"))
        if r.diagnostic is not None and _ascii(r.diagnostic, _MAX_DIAGNOSTIC):
            fields.append(("Diagnostic-Code", _diagnostic_value(r.diagnostic)))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(_block(policy, fields))
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/global-delivery-status" if international else "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    if international:
        # The generator writes every block only for message/delivery-status;
        # of any other message/* type it writes the first. Write them here.
        out = BytesIO()
        for block in blocks:  # each ends with the blank line that separates them
            assert isinstance(block, Message)
            _Generator(out, mangle_from_=False, policy=policy).flatten(block)
        part.set_payload(out.getvalue().decode("ascii", "surrogateescape"))
        return part
    part.set_payload(blocks)
    return part


def _recipient_text(mta: str, r: RecipientReport) -> str:
    """
    The human-readable entry of one recipient.
    """
    address = _clean(r.address, _MAX_ADDRESS)
    host = _clean(r.remote_mta, _MAX_FIELD) if r.remote_mta else ""
    diagnostic = _clean(r.diagnostic, _MAX_DIAGNOSTIC) if r.diagnostic else ""
    status = _status_code(r)
    if r.action in ("failed", "delayed"):
        if diagnostic:
            text = f"host {host} said: {diagnostic}" if host else diagnostic
        else:
            detail = _STATUS_TEXT.get(status[2:]) or _SUBJECT_CLASS_TEXT.get(status[2], "an error")
            text = f"{detail} (status {status})"
            if host:
                text += f", at host {host}"
        if r.action == "delayed" and r.will_retry_until is not None:
            text += f"; delivery will be tried until {_date(r.will_retry_until)}"
    else:
        text = {
            "delivered": "delivered",
            "relayed": "relayed to a mail system that sends no delivery reports",
            "expanded": "delivered, and forwarded by the destination to further recipients",
        }[r.action]
        if host:
            text += f" (via host {host})"
        if diagnostic:
            text += f": {diagnostic}"
    return textwrap.fill(
        f"<{address}>: {text}", width=_HUMAN_WIDTH, subsequent_indent="    ",
        break_long_words=False, break_on_hyphens=False,
    )


_INTRODUCTIONS = {
    "failed": (
        "Your message could not be delivered to one or more of its recipients. "
        "The mail system has given up on them, for the reasons below."
    ),
    "delayed": (
        "This is a warning only; you do not need to send your message again. "
        "Delivery to the recipients below has been delayed, and the mail "
        "system will keep trying."
    ),
    "success": (
        "This is the delivery report you asked for. Your message reached the "
        "recipients below."
    ),
}


def _human_part(
    policy: EmailPolicy,
    mta: str,
    reports: list[RecipientReport],
    arrival: float,
    queue_id: str | None,
    why_headers_only: str | None,
    max_returned: int,
) -> MIMEPart:
    """
    The C{text/plain} part: an explanation for the sender.
    """

    def fill(text: str) -> str:
        return textwrap.fill(text, width=_HUMAN_WIDTH, break_long_words=False, break_on_hyphens=False)

    paragraphs = [f"This is the mail system at host {mta}."]
    for kind in ("failed", "delayed", "success"):
        entries = [r for r in reports if _kind(r.action) == kind]
        if entries:
            paragraphs.append(fill(_INTRODUCTIONS[kind]))
            paragraphs.append("\n\n".join(_recipient_text(mta, r) for r in entries))
    qid = _clean(queue_id) if queue_id else ""
    reference = f"Your message has the queue ID {qid}; it" if qid else "Your message"
    attachment = {
        None: "A copy of it is attached.",
        "hdrs": "Its header section is attached.",
        "size": (
            f"It is larger than {max_returned} octets, too large to be returned "
            "whole: only its header section is attached."
        ),
        "lines": (
            f"It has lines longer than {MAX_LINE} octets, which cannot be "
            "returned: only its header section is attached."
        ),
    }[why_headers_only]
    paragraphs.append(fill(f"{reference} arrived on {_date(arrival)}. {attachment}"))
    if any(r.action == "failed" for r in reports):
        paragraphs.append(fill(
            f"If you need help, write to the postmaster of {mta} and include "
            "this report. You may remove your own text from the returned message."
        ))
    paragraphs.append(f"-- The mail system at {mta}")
    text = "\n\n".join(paragraphs) + "\n"
    part = MIMEPart(policy=policy)
    if text.isascii():
        part.set_content(text, charset="us-ascii", cte="7bit")
    else:
        part.set_content(text, charset="utf-8", cte="quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def _fold_long_line(line: bytes) -> list[bytes]:
    """
    Split a header line longer than L{MAX_LINE} octets into folded lines:
    before white space in the value where there is some, else by inserting a
    space.
    """
    out = []
    start = line.find(b":") + 2 if b":" in line else 1
    while len(line) > MAX_LINE:
        cut = max(line.rfind(b" ", start, MAX_LINE + 1), line.rfind(b"\t", start, MAX_LINE + 1))
        start = 1
        if cut > 0:
            out.append(line[:cut])
            line = line[cut:]
        else:
            out.append(line[:MAX_LINE])
            line = b" " + line[MAX_LINE:]
    out.append(line)
    return out


def _normalise_headers(headers: bytes) -> bytes:
    """
    Give a header section CRLF line ends, drop empty lines (which would end it
    early) and fold lines over L{MAX_LINE} octets. Well-formed sections come
    back unchanged.

    @return: the section, each line ending in CRLF (empty if it was).
    """
    lines = [line for line in _LINE_END_RE.split(headers) if line]
    folded: list[bytes] = []
    for line in lines:
        folded.extend(_fold_long_line(line) if len(line) > MAX_LINE else [line])
    return b"".join(line + b"\r\n" for line in folded)


def _returned_message(
    headers: bytes, body: Readable | None, max_returned: int
) -> tuple[bytes | None, str | None]:
    """
    Read the original to return whole.

    @return: the message (header section, blank line, body with CRLF line
        ends) and L{None}; or L{None} and why only the header section goes
        back: C{"hdrs"} (no body given), C{"size"} (more than C{max_returned}
        octets) or C{"lines"} (a line over L{MAX_LINE} octets).
    """
    if body is None:
        return None, "hdrs"
    room = max_returned - len(headers) - 2
    if room < 0:
        return None, "size"
    chunks = []
    got = 0
    while got <= room:
        chunk = body.read(min(room + 1 - got, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > room:
        return None, "size"
    data = _LINE_END_RE.sub(b"\r\n", b"".join(chunks))
    if len(data) > room:
        return None, "size"
    if _LONG_LINE_RE.search(data):
        return None, "lines"
    return headers + b"\r\n" + data, None
