# -*- test-case-name: tests.test_smtpparse -*-
"""
Parsing of the arguments of the SMTP C{MAIL} and C{RCPT} commands.

This module is pure: it performs no I/O and knows nothing of Twisted's
reactor.  It turns the bytes a client sent after the command word into
L{MailRequest} / L{RcptRequest} values, or raises L{CommandError} carrying
the SMTP reply (RFC 5321 code and RFC 3463 enhanced status code) that the
server must send back.  No input, however malformed, raises anything else.

Supported ESMTP parameters: C{SIZE} (RFC 1870), C{BODY=7BIT|8BITMIME}
(RFC 6152), C{SMTPUTF8} (RFC 6531), C{RET}, C{ENVID}, C{NOTIFY} and
C{ORCPT} (RFC 3461).

Framing is liberal where that is harmless (as Postfix is): the C{FROM:} /
C{TO:} keyword is case-insensitive, whitespace may precede it and follow
the colon, parameters may be separated by runs of spaces or tabs, and
trailing whitespace is ignored.  Angle brackets around the path are
required: without them the command is refused with C{501 5.5.4}.  A source
route (C{<@a,@b:user@example.com>}) is accepted and discarded.
"""

from __future__ import annotations

import ipaddress
import re

import idna
from attrs import frozen

__all__ = [
    "CommandError", "Mailbox", "MailRequest", "RcptRequest",
    "parse_mail", "parse_rcpt", "xtext_decode", "xtext_encode",
]


class CommandError(Exception):
    """
    A client command that must be refused; carries the SMTP reply.

    @ivar code: The three-digit SMTP reply code, e.g. C{501}.
    @ivar enhanced: The RFC 3463 enhanced status code, e.g. C{"5.5.4"}.
    @ivar text: Human-readable reply text; always ASCII.
    """

    code: int
    enhanced: str
    text: str

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        """
        @param code: See L{CommandError.code}.
        @param enhanced: See L{CommandError.enhanced}.
        @param text: See L{CommandError.text}.
        """
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        """
        @return: The reply as it would appear on the wire, without CRLF.
        """
        return f"{self.code} {self.enhanced} {self.text}"


@frozen
class Mailbox:
    """
    An RFC 5321 Mailbox, or the null reverse-path C{<>}.

    @ivar local: The local part exactly as given (a quoted local part keeps
        its quotes and backslashes); C{""} for the null path.
    @ivar domain: The domain, lower-cased, with internationalised names
        converted to A-labels (C{xn--...}).  Address literals are kept as
        C{"[192.0.2.1]"} or C{"[IPv6:2001:db8::1]"} (hex digits lower-cased,
        tag spelled C{IPv6}).  C{""} for the null path and for the bare
        C{<postmaster>} recipient.
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        """
        @return: C{True} if this is the null reverse-path C{<>}.
        """
        return not self.local and not self.domain

    def __str__(self) -> str:
        """
        @return: C{"local@domain"}, the bare local part if there is no
            domain (C{"postmaster"}), or C{""} for the null path.
        """
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


@frozen
class MailRequest:
    """
    A parsed C{MAIL FROM:} command.

    @ivar sender: The reverse-path; may be null (L{Mailbox.is_null}).
    @ivar size: The declared C{SIZE=}, or L{None}.
    @ivar body: C{"7BIT"}, C{"8BITMIME"} or L{None}.
    @ivar smtputf8: Whether the C{SMTPUTF8} parameter was given.
    @ivar ret: DSN C{RET=}: C{"FULL"}, C{"HDRS"} or L{None}.
    @ivar envid: DSN C{ENVID=}, xtext-decoded, or L{None}.
    @ivar transfer: relaynet's C{XTXN=} (the upstream node's C{node/queue-id}
        for this transfer, xtext-decoded), or L{None}; see
        L{relaynet.queue.window}.
    @ivar again: relaynet's C{XTXNAGAIN}: the upstream may have made this
        transfer before (it recovered the message at its start, or an
        earlier attempt lost the connection after sending the whole message),
        so every worker's window is asked, not only the receiving one's.
    """

    sender: Mailbox
    size: int | None
    body: str | None
    smtputf8: bool
    ret: str | None
    envid: str | None
    transfer: str | None = None
    again: bool = False


@frozen
class RcptRequest:
    """
    A parsed C{RCPT TO:} command.

    @ivar recipient: The forward-path.
    @ivar notify: DSN C{NOTIFY=}: C{("NEVER",)} or a non-empty tuple drawn
        from C{SUCCESS}, C{FAILURE}, C{DELAY} in the order given; L{None}
        if absent.
    @ivar orcpt: DSN C{ORCPT=} as C{"addr-type;address"} with the address
        xtext-decoded (addr-type as given), or L{None}.
    """

    recipient: Mailbox
    notify: tuple[str, ...] | None
    orcpt: str | None


@frozen
class _Role:
    """
    What differs between C{MAIL} and C{RCPT} when parsing.
    """

    prefix: bytes
    usage: str
    enhanced: str
    noun: str


_MAIL = _Role(b"FROM:", "Syntax: MAIL FROM:<address>", "5.1.7", "sender")
_RCPT = _Role(b"TO:", "Syntax: RCPT TO:<address>", "5.1.3", "recipient")

# RFC 5321 section 4.1.2 / 4.1.3, with RFC 6531's UTF8-non-ascii added.
# Non-ASCII only reaches these expressions when SMTPUTF8 is in effect.
_U = "\u0080-\U0010ffff"
_ATEXT = f"[A-Za-z0-9!#$%&'*+\\-/=?^_`{{|}}~{_U}]"
_QUOTED = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_U}]|\\\\[\\x20-\\x7e])*"'
_LOCAL = f"{_ATEXT}+(?:\\.{_ATEXT}+)*|{_QUOTED}"
_LETDIG = f"[A-Za-z0-9{_U}]"
_LABEL = f"{_LETDIG}(?:[A-Za-z0-9\\-{_U}]*{_LETDIG})?"
_DOMAIN = f"{_LABEL}(?:\\.{_LABEL})*|\\[[^\\[\\]\\\\]*\\]"
_ADL = f"@(?:{_DOMAIN})(?:,@(?:{_DOMAIN}))*:"
_PATH_RE = re.compile(f"(?:{_ADL})?(?P<local>{_LOCAL})@(?P<domain>{_DOMAIN})")
_LDH_LABEL = "[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_LDH_DOMAIN_RE = re.compile(f"{_LDH_LABEL}(?:\\.{_LDH_LABEL})*")
_V4_RE = re.compile(r"[0-9.]+")
_V6_RE = re.compile(r"IPv6:(?P<addr>[0-9A-Fa-f:.]+)", re.IGNORECASE)

# Locate the end of the path: ">" outside a quoted string.
_BRACKETED_RE = re.compile(rb'<((?:"(?:[^"\\]|\\.)*"|[^">])*)>', re.DOTALL)
_SPACE_RE = re.compile(rb"[ \t]+")
_KEYWORD_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_RE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+")
_XCHAR_RE = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2}")
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_MAX_PATH = 256
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_ENVID = 100
_MAX_TRANSFER = 200
_TRANSFER_RE = re.compile(r"[!-~]+/[!-~]+")
_MAX_ORCPT = 500
_MAX_SIZE_DIGITS = 20


def _syntax(text: str) -> CommandError:
    return CommandError(501, "5.5.4", text)


def xtext_encode(s: str) -> str:
    """
    Encode a string as RFC 3461 xtext.

    The string is encoded as UTF-8; every octet that is not an xchar
    (C{"!"}..C{"~"} except C{"+"} and C{"="}) becomes C{"+"} followed by
    two upper-case hex digits.

    @param s: The text to encode.
    @return: The xtext form, which contains only printable ASCII.
    @raise UnicodeEncodeError: If C{s} contains lone surrogates.
    """
    out = []
    for octet in s.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def xtext_decode(s: str) -> str:
    """
    Decode RFC 3461 xtext.

    Lower-case hex digits after C{"+"} are accepted.  The decoded octets
    are interpreted as UTF-8, so this is the inverse of L{xtext_encode}.

    @param s: The xtext.
    @return: The decoded text.
    @raise ValueError: If C{s} is not valid xtext or does not decode to
        UTF-8.
    """
    octets = bytearray()
    pos = 0
    while pos < len(s):
        m = _XCHAR_RE.match(s, pos)
        if m is None:
            raise ValueError(f"invalid xtext at offset {pos}")
        token = m.group()
        if token[0] == "+":
            octets.append(int(token[1:], 16))
        else:
            octets.append(ord(token))
        pos = m.end()
    return octets.decode("utf-8")


def _split(arg: bytes, role: _Role) -> tuple[bytes, list[bytes]]:
    """
    Split a command argument into the bytes between the angle brackets and
    the list of raw parameter tokens.
    """
    if b"\x00" in arg:
        raise CommandError(501, "5.5.2", "NUL character not allowed")
    arg = arg.strip(b" \t")
    if arg[: len(role.prefix)].upper() != role.prefix:
        raise _syntax(role.usage)
    rest = arg[len(role.prefix) :].lstrip(b" \t")
    if not rest.startswith(b"<"):
        raise _syntax(role.usage)
    m = _BRACKETED_RE.match(rest)
    if m is None:
        raise CommandError(
            501, role.enhanced, f"Bad {role.noun} address syntax: missing '>'"
        )
    tail = rest[m.end() :]
    if tail and not _SPACE_RE.match(tail):
        raise _syntax(role.usage + " [parameters]")
    return m.group(1), _SPACE_RE.split(tail)[1:]


def _parse_params(
    tokens: list[bytes], allowed: frozenset[str]
) -> dict[str, str | None]:
    """
    Parse C{KEYWORD[=value]} tokens into a dict keyed by upper-cased
    keyword.
    """
    params: dict[str, str | None] = {}
    for token in tokens:
        raw_key, eq, raw_value = token.partition(b"=")
        if not _KEYWORD_RE.fullmatch(raw_key):
            raise _syntax("Syntax error in parameters")
        if eq and not _VALUE_RE.fullmatch(raw_value):
            raise _syntax("Syntax error in parameters")
        key = raw_key.decode("ascii").upper()
        if key not in allowed:
            raise CommandError(555, "5.5.4", f"Unsupported parameter {key}")
        if key in params:
            raise _syntax(f"Duplicate parameter {key}")
        params[key] = raw_value.decode("ascii") if eq else None
    return params


def _value(params: dict[str, str | None], key: str) -> str | None:
    """
    Return the value of a parameter that requires one (L{None} if the
    parameter is absent).
    """
    if key not in params:
        return None
    value = params[key]
    if value is None:
        raise _syntax(f"{key} requires a value")
    return value


def _xtext_param(value: str, key: str, limit: int) -> str:
    """
    Decode an xtext parameter value of at most C{limit} characters.
    """
    if len(value) > limit:
        raise _syntax(f"{key} value too long")
    try:
        decoded = xtext_decode(value)
    except ValueError:
        raise _syntax(f"Malformed xtext in {key}") from None
    if _CONTROL_RE.search(decoded):
        raise _syntax(f"Control character in {key}")
    return decoded


def _parse_literal(text: str) -> str | None:
    """
    Validate an address literal (without brackets); return its normalised
    form, or L{None} if it is invalid.
    """
    try:
        if _V4_RE.fullmatch(text):
            ipaddress.IPv4Address(text)
            return f"[{text}]"
        m = _V6_RE.fullmatch(text)
        if m is not None:
            ipaddress.IPv6Address(m.group("addr"))
            return f"[IPv6:{m.group('addr').lower()}]"
    except ValueError:
        pass
    return None


def _parse_path(raw: bytes, role: _Role, smtputf8: bool) -> Mailbox:
    """
    Parse the bytes between the angle brackets into a L{Mailbox}.
    """

    def bad(why: str) -> CommandError:
        return CommandError(501, role.enhanced, f"Bad {role.noun} address {why}")

    if len(raw) + 2 > _MAX_PATH:
        raise bad("length: path exceeds 256 octets")
    if not raw.isascii():
        if not smtputf8:
            raise CommandError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(501, "5.6.7", "Invalid UTF-8 in address") from None
    else:
        path = raw.decode("ascii")
    if not path:
        if role is _MAIL:
            return Mailbox("", "")
        raise bad("syntax: empty")
    if role is _RCPT and path.isascii() and path.lower() == "postmaster":
        return Mailbox(path, "")
    m = _PATH_RE.fullmatch(path)
    if m is None:
        raise bad("syntax")
    local, domain = m.group("local", "domain")
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise bad("length: local part exceeds 64 octets")
    if domain.startswith("["):
        literal = _parse_literal(domain[1:-1])
        if literal is None:
            raise bad("syntax: invalid address literal")
        return Mailbox(local, literal)
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True, std3_rules=True).decode("ascii")
        except ValueError:
            raise bad("syntax: invalid internationalized domain") from None
    domain = domain.lower()
    if not _LDH_DOMAIN_RE.fullmatch(domain):
        raise bad("syntax: invalid domain")
    if len(domain) > _MAX_DOMAIN:
        raise bad("length: domain exceeds 255 octets")
    if any(len(label) > 63 for label in domain.split(".")):
        raise bad("syntax: domain label exceeds 63 octets")
    return Mailbox(local, domain)


_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_mail(
    arg: bytes, *, size_limit: int | None, smtputf8_allowed: bool = True,
    transfer_allowed: bool = False,
) -> MailRequest:
    """
    Parse the argument of a C{MAIL} command.

    @param arg: Everything after the command word, e.g.
        C{b"FROM:<a@example.com> SIZE=100"}.
    @param size_limit: The largest acceptable C{SIZE=} value, or L{None}
        for no limit.
    @param smtputf8_allowed: Whether the server advertises C{SMTPUTF8};
        if not, that parameter is refused as unsupported.
    @param transfer_allowed: Whether the server advertises C{XTXN}
        (relaynet's transfer identity); if not, that parameter is refused
        as unsupported.
    @return: The parsed request.
    @raise CommandError: If the command must be refused.  Missing angle
        brackets and malformed parameters give C{501 5.5.4}; a malformed or
        over-long address C{501 5.1.7}; an unknown (or disabled) parameter
        C{555 5.5.4}; C{SIZE} over C{size_limit} C{552 5.3.4}; a non-ASCII
        address without C{SMTPUTF8} C{553 5.6.7}; invalid UTF-8 in the
        address C{501 5.6.7}; a NUL byte C{501 5.5.2}.
    """
    raw, tokens = _split(arg, _MAIL)
    allowed = _MAIL_PARAMS if smtputf8_allowed else _MAIL_PARAMS - {"SMTPUTF8"}
    if transfer_allowed:
        allowed = allowed | {"XTXN", "XTXNAGAIN"}
    params = _parse_params(tokens, allowed)

    size = None
    size_text = _value(params, "SIZE")
    if size_text is not None:
        if not _DIGITS_RE.fullmatch(size_text):
            raise _syntax("SIZE requires a decimal number")
        digits = size_text.lstrip("0") or "0"
        too_big = len(digits) > _MAX_SIZE_DIGITS
        if not too_big:
            size = int(digits)
        if size_limit is not None and (size is None or size > size_limit):
            raise CommandError(
                552, "5.3.4", "Message size exceeds fixed maximum message size"
            )
        if too_big:
            raise _syntax("SIZE value out of range")

    body = _value(params, "BODY")
    if body is not None:
        body = body.upper()
        if body == "BINARYMIME":
            raise CommandError(555, "5.5.4", "Unsupported parameter BODY=BINARYMIME")
        if body not in ("7BIT", "8BITMIME"):
            raise _syntax("BODY must be 7BIT or 8BITMIME")

    smtputf8 = "SMTPUTF8" in params
    if params.get("SMTPUTF8") is not None:
        raise _syntax("SMTPUTF8 takes no value")

    ret = _value(params, "RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            raise _syntax("RET must be FULL or HDRS")

    envid = _value(params, "ENVID")
    if envid is not None:
        envid = _xtext_param(envid, "ENVID", _MAX_ENVID)
        if not envid.isascii():
            raise _syntax("ENVID must be ASCII")

    transfer = _value(params, "XTXN")
    if transfer is not None:
        transfer = _xtext_param(transfer, "XTXN", _MAX_TRANSFER)
        if not _TRANSFER_RE.fullmatch(transfer):
            raise _syntax("XTXN must be node/queue-id")
    again = "XTXNAGAIN" in params
    if again and (params["XTXNAGAIN"] is not None or transfer is None):
        raise _syntax("XTXNAGAIN takes no value and goes with XTXN")

    sender = _parse_path(raw, _MAIL, smtputf8)
    return MailRequest(sender, size, body, smtputf8, ret, envid, transfer, again)


def parse_rcpt(arg: bytes, *, smtputf8: bool = False) -> RcptRequest:
    """
    Parse the argument of a C{RCPT} command.

    @param arg: Everything after the command word, e.g.
        C{b"TO:<b@example.com> NOTIFY=NEVER"}.
    @param smtputf8: Whether the transaction's C{MAIL} command carried
        C{SMTPUTF8}; only then may the address contain UTF-8.
    @return: The parsed request.  The bare C{<postmaster>} (any case) is
        accepted and has an empty domain.
    @raise CommandError: If the command must be refused.  Missing angle
        brackets and malformed parameters give C{501 5.5.4}; a malformed,
        empty or over-long address C{501 5.1.3}; an unknown parameter
        C{555 5.5.4}; a non-ASCII address without C{SMTPUTF8}
        C{553 5.6.7}; invalid UTF-8 in the address C{501 5.6.7}; a NUL
        byte C{501 5.5.2}.
    """
    raw, tokens = _split(arg, _RCPT)
    params = _parse_params(tokens, _RCPT_PARAMS)

    notify = None
    notify_text = _value(params, "NOTIFY")
    if notify_text is not None:
        items = notify_text.upper().split(",")
        if items != ["NEVER"] and not set(items) <= _NOTIFY_VALUES:
            raise _syntax("NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY")
        notify = tuple(dict.fromkeys(items))

    orcpt = _value(params, "ORCPT")
    if orcpt is not None:
        addr_type, semi, xtext = orcpt.partition(";")
        if not semi or not xtext or not _ATOM_RE.fullmatch(addr_type):
            raise _syntax("ORCPT must be addr-type;xtext")
        if len(orcpt) > _MAX_ORCPT:
            raise _syntax("ORCPT value too long")
        orcpt = f"{addr_type};{_xtext_param(xtext, 'ORCPT', _MAX_ORCPT)}"

    recipient = _parse_path(raw, _RCPT, smtputf8)
    return RcptRequest(recipient, notify, orcpt)
