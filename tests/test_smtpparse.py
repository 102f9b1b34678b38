"""
Tests for L{relaynet.smtp.parse}.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynet.smtp.parse import (
    CommandError,
    Mailbox,
    MailRequest,
    RcptRequest,
    parse_mail,
    parse_rcpt,
    xtext_decode,
    xtext_encode,
)


def mail(arg: bytes, size_limit: int | None = None, **kw) -> MailRequest:
    return parse_mail(arg, size_limit=size_limit, **kw)


def refused(func, arg: bytes, **kw) -> tuple[int, str]:
    with pytest.raises(CommandError) as info:
        func(arg, **kw)
    return info.value.code, info.value.enhanced


def mail_refused(arg: bytes, size_limit: int | None = None, **kw) -> tuple[int, str]:
    return refused(parse_mail, arg, size_limit=size_limit, **kw)


def rcpt_refused(arg: bytes, **kw) -> tuple[int, str]:
    return refused(parse_rcpt, arg, **kw)


# --- CommandError and Mailbox ---------------------------------------------


def test_command_error_attributes():
    """CommandError keeps code, enhanced code and text and renders a reply."""
    e = CommandError(501, "5.5.4", "Syntax error")
    assert (e.code, e.enhanced, e.text) == (501, "5.5.4", "Syntax error")
    assert str(e) == "501 5.5.4 Syntax error"
    assert isinstance(e, Exception)


def test_mailbox_str_and_null():
    """Mailbox renders as local@domain; the null path is empty and is_null."""
    assert str(Mailbox("a", "b.example")) == "a@b.example"
    assert str(Mailbox("", "")) == "" and Mailbox("", "").is_null
    assert not Mailbox("a", "b.example").is_null
    assert str(Mailbox("postmaster", "")) == "postmaster"


# --- addresses --------------------------------------------------------------


def test_normal_address():
    """The local part is kept as given; the domain is lower-cased."""
    r = mail(b"FROM:<Alice@Example.ORG>")
    assert r == MailRequest(Mailbox("Alice", "example.org"), None, None, False, None, None)


def test_case_insensitive_keyword_space_and_trailing_whitespace():
    """from:/to: in any case, whitespace after the colon and at the end are fine."""
    assert mail(b"from: <a@b.example>  \t").sender == Mailbox("a", "b.example")
    assert mail(b"FrOm:<a@b.example> SIZE=1 ").size == 1
    assert parse_rcpt(b"to: <a@b.example> ").recipient == Mailbox("a", "b.example")


def test_null_sender():
    """MAIL FROM:<> gives the null reverse-path."""
    assert mail(b"FROM:<>").sender.is_null


def test_null_recipient_refused():
    """RCPT TO:<> is a bad recipient address: 501 5.1.3."""
    assert rcpt_refused(b"TO:<>") == (501, "5.1.3")


def test_postmaster_without_domain():
    """RCPT TO:<postmaster> (any case) is legal and has an empty domain."""
    assert parse_rcpt(b"TO:<postmaster>").recipient == Mailbox("postmaster", "")
    assert parse_rcpt(b"TO:<PostMaster>").recipient == Mailbox("PostMaster", "")
    assert rcpt_refused(b"TO:<bob>") == (501, "5.1.3")
    assert mail_refused(b"FROM:<postmaster>") == (501, "5.1.7")


def test_quoted_local_part():
    """A quoted local part is accepted and kept with its quotes."""
    assert mail(b'FROM:<"john doe"@x.org>').sender == Mailbox('"john doe"', "x.org")
    r = parse_rcpt(b'TO:<"a>\\"b"@x.org> NOTIFY=NEVER')
    assert r.recipient == Mailbox('"a>\\"b"', "x.org")
    assert r.notify == ("NEVER",)


def test_domain_literals():
    """IPv4 and IPv6 address literals are kept as the domain string."""
    assert mail(b"FROM:<a@[127.0.0.1]>").sender.domain == "[127.0.0.1]"
    assert parse_rcpt(b"TO:<a@[IPv6:::1]>").recipient.domain == "[IPv6:::1]"
    assert parse_rcpt(b"TO:<a@[ipv6:2001:DB8::1]>").recipient.domain == (
        "[IPv6:2001:db8::1]"
    )
    for bad in [b"[1.2.3]", b"[300.1.1.1]", b"[::1]", b"[IPv6:zz::1]", b"[x:y]", b"[]"]:
        assert rcpt_refused(b"TO:<a@" + bad + b">") == (501, "5.1.3"), bad


def test_source_route_ignored():
    """An RFC 5321 source route is stripped."""
    r = parse_rcpt(b"TO:<@a.example,@[10.0.0.1]:user@dom.example>")
    assert r.recipient == Mailbox("user", "dom.example")
    assert mail(b"FROM:<@relay.example:u@d.example>").sender == Mailbox("u", "d.example")


@pytest.mark.parametrize(
    "path",
    [b"<a b>", b"<@>", b"<user@>", b"<@dom>", b"<a@b.example", b"<a..b@x>",
     b"<a@-x.example>", b"<a@x..example>", b"<a@b.example.>", b'<"a@b.example>',
     b"<@a:>", b"<a@b@c>", b"<a\r@b>"],
)
def test_bad_address_syntax(path):
    """Malformed paths are 501 5.1.7 for MAIL and 501 5.1.3 for RCPT."""
    assert mail_refused(b"FROM:" + path) == (501, "5.1.7")
    assert rcpt_refused(b"TO:" + path) == (501, "5.1.3")


@pytest.mark.parametrize("arg", [b"FROM:a@b.example", b"FROM a@b", b"", b"TO:<a@b>",
                                 b"FROM:<a@b.example>SIZE=1", b"FROM:\xff<a@b>"])
def test_missing_brackets_or_keyword(arg):
    """Without FROM: and angle brackets MAIL is refused with 501 5.5.4."""
    assert mail_refused(arg) == (501, "5.5.4")


def test_rcpt_missing_brackets():
    """Without TO: and angle brackets RCPT is refused with 501 5.5.4."""
    assert rcpt_refused(b"TO:a@b.example") == (501, "5.5.4")
    assert rcpt_refused(b"FROM:<a@b.example>") == (501, "5.5.4")


def test_length_limits():
    """Local part > 64, domain > 255 or path > 256 octets are 501 5.1.7/5.1.3."""
    assert mail(b"FROM:<" + b"a" * 64 + b"@x.example>").sender.local == "a" * 64
    assert mail_refused(b"FROM:<" + b"a" * 65 + b"@x.example>") == (501, "5.1.7")
    assert rcpt_refused(b"TO:<" + b"a" * 65 + b"@x.example>") == (501, "5.1.3")
    domain = b".".join([b"d" * 60] * 4)  # 243 octets
    assert mail(b"FROM:<" + b"a" * 10 + b"@" + domain + b">").sender.domain
    assert mail_refused(b"FROM:<" + b"a" * 12 + b"@" + domain + b">") == (501, "5.1.7")
    assert rcpt_refused(b"TO:<a@" + b"x" * 64 + b".example>") == (501, "5.1.3")
    # A U-label domain that is short on the wire but over 255 as A-labels.
    long_idn = ".".join(["ü"] * 80).encode()
    assert rcpt_refused(b"TO:<a@" + long_idn + b">", smtputf8=True) == (501, "5.1.3")


def test_nul_refused():
    """A NUL byte anywhere is 501 5.5.2."""
    assert mail_refused(b"FROM:<a\x00@b>") == (501, "5.5.2")
    assert rcpt_refused(b"TO:<a@b> NOTIFY=NEVER\x00") == (501, "5.5.2")


# --- SMTPUTF8 and IDNA --------------------------------------------------------


def test_idna_domain():
    """With SMTPUTF8 a U-label domain is converted to its A-label."""
    r = mail("FROM:<a@bücher.example> SMTPUTF8".encode())
    assert r.smtputf8 and r.sender == Mailbox("a", "xn--bcher-kva.example")
    r2 = parse_rcpt("TO:<ñ@BÜCHER.example>".encode(), smtputf8=True)
    assert r2.recipient == Mailbox("ñ", "xn--bcher-kva.example")


def test_non_ascii_requires_smtputf8():
    """Non-ASCII in the address without SMTPUTF8 is 553 5.6.7."""
    assert mail_refused("FROM:<a@bücher.example>".encode()) == (553, "5.6.7")
    assert rcpt_refused("TO:<ü@x.example>".encode()) == (553, "5.6.7")


def test_invalid_utf8_refused():
    """Invalid UTF-8 in the address is refused with 501 even with SMTPUTF8."""
    assert mail_refused(b"FROM:<a\xff@b.example> SMTPUTF8") == (501, "5.6.7")
    assert rcpt_refused(b"TO:<a@b\xc3.example>", smtputf8=True) == (501, "5.6.7")


def test_invalid_idna_refused():
    """A domain that is not valid IDNA is a bad address (501)."""
    for bad in ["\u0300b.example", "a\u200db.example", "x\ufffdy.example",
                "a\uff20b.example", "\u00fc.example\uff0e", "\u00fc\u3002\u3002x"]:
        arg = f"TO:<a@{bad}>".encode()
        assert rcpt_refused(arg, smtputf8=True) == (501, "5.1.3"), bad


def test_smtputf8_not_allowed():
    """SMTPUTF8 when the server does not offer it is 555 5.5.4."""
    assert mail_refused(b"FROM:<a@b> SMTPUTF8", smtputf8_allowed=False) == (555, "5.5.4")
    assert mail_refused(b"FROM:<a@b> SMTPUTF8=yes") == (501, "5.5.4")


# --- parameters ---------------------------------------------------------------


def test_all_mail_parameters():
    """All supported MAIL parameters parse, keywords case-insensitively."""
    r = mail(b"FROM:<a@b.example> size=1000 Body=8bitmime SMTPUTF8 ret=hdrs "
             b"envid=QQ+2Bx+3D1", size_limit=1000)
    assert r == MailRequest(Mailbox("a", "b.example"), 1000, "8BITMIME", True, "HDRS",
                            "QQ+x=1")
    assert mail(b"FROM:<a@b> BODY=7bit RET=FULL").body == "7BIT"


def test_unknown_and_duplicate_parameters():
    """Unknown keyword: 555 5.5.4; duplicate: 501 5.5.4; bad syntax: 501 5.5.4."""
    with pytest.raises(CommandError) as info:
        mail(b"FROM:<a@b> FOO=bar")
    assert (info.value.code, info.value.enhanced) == (555, "5.5.4")
    assert info.value.text == "Unsupported parameter FOO"
    assert mail_refused(b"FROM:<a@b> NOTIFY=NEVER") == (555, "5.5.4")
    assert rcpt_refused(b"TO:<a@b> SIZE=1") == (555, "5.5.4")
    assert mail_refused(b"FROM:<a@b> SIZE=1 size=2") == (501, "5.5.4")
    assert rcpt_refused(b"TO:<a@b> ORCPT=rfc822;a ORCPT=rfc822;b") == (501, "5.5.4")
    for bad in [b"=1", b"-X=1", b"SIZE==1", b"SIZE=", b"RET=FU\x7fLL", b"SIZE=\xff"]:
        assert mail_refused(b"FROM:<a@b> " + bad) == (501, "5.5.4"), bad


def test_size():
    """SIZE must be digits; over size_limit is 552 5.3.4."""
    assert mail(b"FROM:<a@b> SIZE=0").size == 0
    assert mail(b"FROM:<a@b> SIZE=10", size_limit=10).size == 10
    with pytest.raises(CommandError) as info:
        mail(b"FROM:<a@b> SIZE=11", size_limit=10)
    assert (info.value.code, info.value.enhanced) == (552, "5.3.4")
    assert info.value.text == "Message size exceeds fixed maximum message size"
    assert mail_refused(b"FROM:<a@b> SIZE=" + b"9" * 5000, size_limit=10) == (552, "5.3.4")
    for bad in [b"SIZE", b"SIZE=-1", b"SIZE=1k", b"SIZE=+1", b"SIZE=1.0"]:
        assert mail_refused(b"FROM:<a@b> " + bad) == (501, "5.5.4"), bad


def test_size_huge_without_limit():
    """An absurdly long SIZE with no limit is 501, never an int overflow error."""
    assert mail(b"FROM:<a@b> SIZE=" + b"0" * 100 + b"7").size == 7
    assert mail_refused(b"FROM:<a@b> SIZE=" + b"9" * 5000) == (501, "5.5.4")


def test_body():
    """BODY accepts 7BIT/8BITMIME; BINARYMIME is 555; anything else 501."""
    assert mail(b"FROM:<a@b> BODY=8BitMime").body == "8BITMIME"
    assert mail_refused(b"FROM:<a@b> BODY=BINARYMIME") == (555, "5.5.4")
    assert mail_refused(b"FROM:<a@b> BODY=9BIT") == (501, "5.5.4")
    assert mail_refused(b"FROM:<a@b> BODY") == (501, "5.5.4")


def test_ret_and_envid():
    """RET is FULL|HDRS; ENVID is xtext of at most 100 characters, decoded."""
    assert mail(b"FROM:<a@b> RET=full").ret == "FULL"
    assert mail_refused(b"FROM:<a@b> RET=BODY") == (501, "5.5.4")
    assert mail(b"FROM:<a@b> ENVID=" + b"x" * 100).envid == "x" * 100
    assert mail_refused(b"FROM:<a@b> ENVID=" + b"x" * 101) == (501, "5.5.4")
    for bad in [b"ab+", b"a+G0", b"a+0D+0A", b"+C3+A9"]:
        assert mail_refused(b"FROM:<a@b> ENVID=" + bad) == (501, "5.5.4"), bad


def test_notify():
    """NOTIFY is NEVER alone or a list of SUCCESS, FAILURE, DELAY."""
    assert parse_rcpt(b"TO:<a@b> NOTIFY=never").notify == ("NEVER",)
    r = parse_rcpt(b"TO:<a@b> notify=Success,DELAY")
    assert r.notify == ("SUCCESS", "DELAY")
    assert parse_rcpt(b"TO:<a@b> NOTIFY=FAILURE,FAILURE").notify == ("FAILURE",)
    assert parse_rcpt(b"TO:<a@b>").notify is None
    for bad in [b"NEVER,SUCCESS", b"SUCCESS,", b"ALWAYS", b"", b"SUCCESS,,DELAY"]:
        assert rcpt_refused(b"TO:<a@b> NOTIFY=" + bad) == (501, "5.5.4"), bad


def test_orcpt():
    """ORCPT is addr-type;xtext, kept as addr-type;decoded-address."""
    r = parse_rcpt(b"TO:<a@b> ORCPT=rfc822;x+2By@example.org NOTIFY=DELAY")
    assert r == RcptRequest(Mailbox("a", "b"), ("DELAY",), "rfc822;x+y@example.org")
    assert parse_rcpt(b"TO:<a@b> ORCPT=utf-8;+C3+BC@x").orcpt == "utf-8;\u00fc@x"
    for bad in [b"rfc822", b"rfc822;", b";a@b", b"rfc 822;a", b"rfc822;a+2", b"rfc822;a+0A",
                b"rfc822;" + b"x" * 500]:
        assert rcpt_refused(b"TO:<a@b> ORCPT=" + bad) == (501, "5.5.4"), bad


# --- xtext ----------------------------------------------------------------------


def test_xtext_examples():
    """xtext escapes '+', '=', space, controls and non-ASCII as +HH."""
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("\u00fc") == "+C3+BC"
    assert xtext_decode("a+2bb") == "a+b"
    for bad in ["a b", "a=b", "+", "+1", "+XY", "\u00fc"]:
        with pytest.raises(ValueError):
            xtext_decode(bad)


@given(st.text())
def test_xtext_round_trip(s):
    """xtext_decode inverts xtext_encode, whose output is printable xchars."""
    encoded = xtext_encode(s)
    assert re.fullmatch(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*", encoded)
    assert xtext_decode(encoded) == s


@given(st.text())
def test_xtext_decode_total(s):
    """xtext_decode returns text or raises ValueError for any input."""
    try:
        xtext_decode(s)
    except ValueError:
        pass


# --- properties -------------------------------------------------------------


FRAGMENTS = [b"FROM:", b"TO:", b"from:", b"<", b">", b"@", b"a", b"B.example", b".",
             b" ", b"\t", b'"', b"\\", b",", b":", b"[", b"]", b"IPv6:", b"::1",
             b"127.0.0.1", b" SIZE=", b" BODY=", b"8BITMIME", b" SMTPUTF8", b" RET=",
             b"FULL", b" ENVID=", b"+2B", b"+", b" NOTIFY=", b"NEVER", b"SUCCESS,",
             b" ORCPT=", b"rfc822;", b"=", b"12", b"\x00", b"\xff", b"\xc3\xbc",
             b"postmaster", b"xn--", b"-", b"\r\n", b"\x7f", b"\xe3\x80\x82"]
structured = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join)


def _pieces(*choices: bytes, max_size: int = 4) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(choices), max_size=max_size).map(b"".join)


# Commands assembled from mostly-valid pieces, so that both acceptance and
# near-miss refusals are exercised.
near_valid = st.tuples(
    st.sampled_from([b"FROM:", b"TO:", b"from: ", b"To:", b"FROM:\t", b"TO: "]),
    st.sampled_from([b"<", b"<", b"<", b"<@r.example:", b"<@[1.2.3.4],@r:", b"<@"]),
    st.one_of(
        st.sampled_from([b"a", b"Alice.B", b'"q\\"t"', b"\xc3\xbc", b"postmaster", b""]),
        _pieces(b"a", b"Z", b".", b"+", b'"', b" ", b"\\", b"\xc3\xbc", b"\xff", b"!"),
    ),
    st.sampled_from([b"@", b"@", b"@", b"", b"@@"]),
    st.one_of(
        st.sampled_from([b"ex.example", b"B\xc3\xbc.example", b"[127.0.0.1]", b"",
                         b"[IPv6:::1]", b"xn--bcher-kva.EXAMPLE", b"a\xe3\x80\x82b"]),
        _pieces(b"ex", b".", b"-", b"B\xc3\xbc", b"xn--", b"[", b"]", b"127.0.0.1",
                b"IPv6:", b"::1", b"\xe3\x80\x82", b"\xef\xbc\xa0"),
    ),
    st.sampled_from([b">", b">", b">", b"", b">>", b"> "]),
    _pieces(b" SIZE=10", b" size=1000000", b" BODY=8bitmime", b" BODY=BINARYMIME",
            b" SMTPUTF8", b" RET=HDRS", b" ENVID=a+2Bb", b" ENVID=+C3+BC",
            b" NOTIFY=SUCCESS,DELAY", b" NOTIFY=NEVER", b" ORCPT=rfc822;a+40b",
            b" AUTH=<>", b" ", b"=", b"\x00", b"\r\n", max_size=3),
).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=400), structured, near_valid,
                      structured.map(lambda b: b"FROM:<" + b),
                      structured.map(lambda b: b"TO:<" + b))

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def check_outcome(func, arg, **kw):
    try:
        return func(arg, **kw)
    except CommandError as e:
        assert e.code in (501, 552, 553, 555)
        assert _ENHANCED.fullmatch(e.enhanced)
        assert e.text.isascii() and e.text.isprintable()
        return None


@settings(max_examples=500)
@given(any_bytes, st.one_of(st.none(), st.integers(0, 10**6)), st.booleans())
def test_parse_mail_total(arg, size_limit, allowed):
    """parse_mail returns a MailRequest or raises CommandError for any bytes."""
    r = check_outcome(parse_mail, arg, size_limit=size_limit, smtputf8_allowed=allowed)
    if r is not None:
        assert isinstance(r, MailRequest)
        reparse_is_stable(r.sender, r.smtputf8)


@settings(max_examples=500)
@given(any_bytes, st.booleans())
def test_parse_rcpt_total(arg, smtputf8):
    """parse_rcpt returns an RcptRequest or raises CommandError for any bytes."""
    r = check_outcome(parse_rcpt, arg, smtputf8=smtputf8)
    if r is not None:
        assert isinstance(r, RcptRequest)
        reparse_is_stable(r.recipient, smtputf8)


def reparse_is_stable(box: Mailbox, smtputf8: bool) -> None:
    """Serialising a parsed mailbox and parsing it again gives it back."""
    if box.is_null:
        return
    again = parse_rcpt(b"TO:<" + str(box).encode() + b">", smtputf8=smtputf8)
    assert again.recipient == box


atext = st.text("abcXYZ019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)


@given(st.lists(atext, min_size=1, max_size=4).map(".".join),
       st.lists(label, min_size=1, max_size=4).map(".".join))
def test_valid_addresses_parse(local, domain):
    """Any RFC 5321 dot-string@domain parses to (local, domain.lower())."""
    r = parse_rcpt(f"TO:<{local}@{domain}>".encode())
    assert r.recipient == Mailbox(local, domain.lower())
    assert str(r.recipient) == f"{local}@{domain.lower()}"


def test_pathological_input_is_fast():
    """Long adversarial inputs are refused quickly (no regex blow-up)."""
    start = time.monotonic()
    for arg in [b"FROM:<" + b"a" * 250 + b"!>", b"FROM:<a@" + b"a-" * 120 + b"!>",
                b"FROM:<@" + b"a." * 120 + b">", b"FROM:<" + b'"' * 10000,
                b"FROM:<a@b>" + b" SIZE" * 10000]:
        with pytest.raises(CommandError):
            mail(arg)
    assert time.monotonic() - start < 1.0
