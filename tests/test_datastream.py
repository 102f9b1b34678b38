"""
Tests for L{relaynet.smtp.datastream}: the DATA scanner, checked against a slow
reference implementation that works line by line.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaynet.smtp.datastream import DataScanner


def feed_all(scanner: DataScanner, chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    body = []
    for i, chunk in enumerate(chunks):
        out, rest = scanner.feed(chunk)
        body.append(out)
        if rest is not None:
            return b"".join(body), rest + b"".join(chunks[i + 1 :])
    return b"".join(body), None


def reference(data: bytes, max_line: int = 1000) -> tuple[bytes, bytes | None, dict[str, bool]]:
    """
    The DATA rules applied the slow, obvious way: split into CRLF lines, stop
    at a lone dot, unstuff, and check each line.
    """
    flags = {"bare_lf": False, "bare_cr": False, "long_line": False, "nul": False}
    out = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return b"".join(out), None, flags
        line = data[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(out), data[pos:], flags
        if b"\n" in line:
            flags["bare_lf"] = True
        if b"\r" in line:
            flags["bare_cr"] = True
        if len(line) + 2 > max_line:
            flags["long_line"] = True
        if b"\0" in line:
            flags["nul"] = True
        if line.startswith(b"."):
            line = line[1:]
        out.append(line + b"\r\n")


def test_simple_message() -> None:
    """A message ends at CRLF.CRLF; what follows is returned as the rest."""
    s = DataScanner()
    body, rest = s.feed(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert body == b"Subject: x\r\n\r\nhello\r\n"
    assert rest == b"QUIT\r\n"
    assert s.ok and s.done


def test_empty_message() -> None:
    """A lone dot as the first line ends an empty message."""
    s = DataScanner()
    assert s.feed(b".\r\nNOOP\r\n") == (b"", b"NOOP\r\n")


def test_dot_unstuffing() -> None:
    """A leading dot is removed, on the first line and on later ones."""
    s = DataScanner()
    body, rest = s.feed(b"..first\r\nx\r\n..\r\n...more\r\n.\r\n")
    assert body == b".first\r\nx\r\n.\r\n..more\r\n"
    assert rest == b""


def test_end_split_across_feeds() -> None:
    """The end marker is found when it arrives one byte at a time."""
    s = DataScanner()
    data = b"a\r\nb\r\n.\r\nRSET\r\n"
    body, rest = feed_all(s, [bytes([c]) for c in data])
    assert body == b"a\r\nb\r\n"
    assert rest == b"RSET\r\n"


def test_smuggling_vectors_do_not_end_data() -> None:
    """
    The published SMTP smuggling vectors are content, never an end of data;
    each is flagged as a bare CR or LF.
    """
    vectors = [
        b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r",
        b"\r.\n",
    ]
    for v in vectors:
        s = DataScanner()
        data = b"Subject: x\r\n\r\nbody" + v + b"MAIL FROM:<evil@x>\r\nRCPT TO:<a@b>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
        body, rest = s.feed(data)
        assert rest == b"QUIT\r\n", v
        assert b"MAIL FROM:<evil@x>" in body, v
        assert s.bare_lf or s.bare_cr, v


def test_nul_vectors() -> None:
    """
    C{\\r\\n\\x00.\\r\\n} and C{\\r\\n.\\x00\\r\\n} do not end the data, and
    the NUL marks the message for refusal.
    """
    for v in (b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"):
        s = DataScanner()
        body, rest = s.feed(b"x" + v + b"MAIL FROM:<e@x>\r\n.\r\n")
        assert rest == b""
        assert b"MAIL FROM:<e@x>" in body
        assert s.nul and not s.ok


def test_long_line_keeps_reading() -> None:
    """
    An over-long line is recorded and the scanner keeps reading to the real
    end, so command-like lines after it stay content.
    """
    s = DataScanner(max_line_length=1000)
    data = b"a" * 5000 + b"\r\nRSET\r\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n"
    body, rest = feed_all(s, [data[i : i + 700] for i in range(0, len(data), 700)])
    assert s.long_line
    assert rest == b"NOOP\r\n"


def test_line_exactly_at_limit() -> None:
    """998 octets plus CRLF is allowed; 999 plus CRLF is not."""
    s = DataScanner(max_line_length=1000)
    s.feed(b"x" * 998 + b"\r\n.\r\n")
    assert not s.long_line
    s = DataScanner(max_line_length=1000)
    s.feed(b"x" * 999 + b"\r\n.\r\n")
    assert s.long_line


def test_unterminated_stream_is_bounded() -> None:
    """A stream with no CRLF does not grow the held buffer without bound."""
    s = DataScanner(max_line_length=1000)
    for _ in range(1000):
        assert s.feed(b"y" * 4096) == (b"", None)
    assert s.long_line
    assert len(s._pending) <= 1


def test_size_limit() -> None:
    """Past the size limit nothing more is returned; the end is still found."""
    s = DataScanner(max_size=100)
    body, rest = feed_all(s, [b"z" * 60 + b"\r\n"] * 5 + [b".\r\n"])
    assert s.too_big
    assert len(body) <= 100
    assert rest == b""
    assert s.size == 62 * 5


def test_received_count() -> None:
    """C{Received:} fields of the header section are counted, not in the body."""
    s = DataScanner()
    s.feed(
        b"Received: a\r\nreceived:b\r\nRECEIVED : c\r\nX-Received: no\r\nSubject: s\r\n"
        b"\r\nReceived: in body\r\n.\r\n"
    )
    assert s.received_count == 3


def test_received_count_without_body() -> None:
    """A message of headers only still has its Received fields counted."""
    s = DataScanner()
    s.feed(b"Received: a\r\nReceived: b\r\n.\r\n")
    s.finish_headers()
    assert s.received_count == 2


_pieces = st.sampled_from(
    [b"a", b"bc", b".", b"\r\n", b"\r", b"\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"x" * 40, b"\x00", b"\xff"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=60), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_matches_reference(parts: list[bytes], cuts: list[int]) -> None:
    """
    However the stream is cut into reads, the scanner finds the same end, the
    same unstuffed body and the same bare CR/LF verdict as the line-by-line
    reference (long lines use a small limit here to be exercised).
    """
    data = b"".join(parts) + b"\r\n.\r\n"
    chunks = []
    pos = 0
    i = 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        chunks.append(data[pos : pos + n])
        pos += n
        i += 1
    s = DataScanner(max_line_length=50)
    body, rest = feed_all(s, chunks)
    ref_body, ref_rest, flags = reference(data, max_line=50)
    assert rest == ref_rest
    bad = flags["bare_lf"] or flags["bare_cr"] or flags["long_line"] or flags["nul"]
    assert s.bare_lf or s.bare_cr or s.long_line or s.nul or not bad
    if not bad:
        assert body == ref_body
        assert s.ok
    else:
        assert not s.ok
    assert bool(flags["bare_lf"] or flags["bare_cr"]) == (s.bare_lf or s.bare_cr) or s.long_line


def test_message_id_like_content_untouched() -> None:
    """Header bytes pass through byte-exact (no blank line inserted, trap 13)."""
    s = DataScanner()
    body, _ = s.feed(b"no colon on this first line\r\nsecond\r\n.\r\n")
    assert body == b"no colon on this first line\r\nsecond\r\n"
    assert re.match(rb"no colon", body)


from relaynet.smtp.datastream import DotStuffer  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=60), st.lists(st.integers(1, 30), min_size=1, max_size=10))
def test_stuffer_round_trip(parts: list[bytes], cuts: list[int]) -> None:
    """
    Whatever the chunking, a message stuffed by L{DotStuffer} and ended with
    its terminator is read back by L{DataScanner} byte-exact (for messages with
    CRLF line ends only), and the data ends exactly at the terminator.
    """
    message = b"".join(parts).replace(b"\r", b"").replace(b"\n", b"\r\n")
    chunks, pos, i = [], 0, 0
    while pos < len(message):
        n = cuts[i % len(cuts)]
        chunks.append(message[pos : pos + n])
        pos += n
        i += 1
    s = DotStuffer()
    wire = b"".join(s.stuff(c) for c in chunks) + s.terminator()
    scanner = DataScanner(max_line_length=10**6)
    body, rest = scanner.feed(wire + b"NEXT")
    assert rest == b"NEXT"
    expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    assert body == expected


def test_stuffer_first_line_and_boundary() -> None:
    """A dot on the first line and one right after a chunk boundary are stuffed."""
    s = DotStuffer()
    out = s.stuff(b".first\r") + s.stuff(b"\n.second\r\n") + s.stuff(b".third\r\n")
    assert out == b"..first\r\n..second\r\n..third\r\n"
    assert s.terminator() == b".\r\n"


@pytest.mark.parametrize(("data", "headers8", "any8"), [
    (b"Subject: plain\r\n\r\nbody\r\n.\r\n", False, False),
    (b"Subject: plain\r\n\r\ncaf\xc3\xa9\r\n.\r\n", False, True),
    ("Subject: café\r\n\r\nbody\r\n.\r\n".encode(), True, True),
    (b"Subject: x\r\n" + b"y" * 300 + b"\r\n\r\n" + b"z" * 5000 + b"\xff\r\n.\r\n", False, True),
])
def test_eight_bit_octets_are_noticed(data: bytes, headers8: bool, any8: bool) -> None:
    """The scanner says whether the header section, and the message, hold 8-bit octets (fed in small pieces)."""
    from relaynet.smtp.datastream import DataScanner

    s = DataScanner()
    for i in range(0, len(data), 7):
        s.feed(data[i:i + 7])
    s.finish_headers()
    assert s.done and (s.eight_bit_headers, s.eight_bit) == (headers8, any8)


def test_raw_chunks_are_checked_across_boundaries() -> None:
    """BDAT chunks: content kept as is (no unstuffing), lines checked across chunk boundaries."""
    from relaynet.smtp.datastream import DataScanner

    s = DataScanner(max_line_length=20)
    out = s.feed_raw(b"Subject: x\r") + s.feed_raw(b"\n\r\n.dot stays\r\nab") + s.feed_raw(b"c\r\n", last=True)
    assert out == b"Subject: x\r\n\r\n.dot stays\r\nabc\r\n"
    assert s.ok and s.done and not s.eight_bit and s.size == len(out)
    bare = DataScanner()
    bare.feed_raw(b"a\nb\r\n", last=True)
    assert bare.bare_lf and not bare.ok
    long = DataScanner(max_line_length=10)
    assert long.feed_raw(b"x" * 25) == b"x" * 25  # not held back without a line end
    assert long.long_line


def counted_flags(raw: bytes, max_line: int) -> tuple[bool, bool, bool]:
    """
    C{(bare_lf, bare_cr, long_line)} of a run the way the scanner worked
    them out before it used C{splitlines}: count CRLFs, LFs and CRs, split
    at every LF (each piece keeps its CR).
    """
    crlf = raw.count(b"\r\n")
    long = bool(raw) and max(map(len, raw.split(b"\n"))) >= max_line
    return raw.count(b"\n") != crlf, raw.count(b"\r") != crlf, long


_run_pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b"\n\r", b"\r\r\n", b"x", b"y" * 7, b"z" * 18, b"."])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_run_pieces, max_size=40), st.integers(3, 30))
def test_run_check_matches_counting(parts: list[bytes], max_line: int) -> None:
    """
    The checks of a run of lines (one C{splitlines}, two counts) give
    exactly the bare CR, bare LF and long-line flags of counting and
    splitting, for runs with and without a last line end and lines on
    either side of the limit.
    """
    raw = b"".join(parts)
    s = DataScanner(max_line_length=max_line)
    s._check(raw)
    assert (s.bare_lf, s.bare_cr, s.long_line) == counted_flags(raw, max_line)


def test_run_check_on_clean_lines_at_the_limit() -> None:
    """A line of max_line_length octets with its CRLF passes; one more octet is long, also as a last unended line."""
    for content, ended, long in ((8, True, False), (9, True, True), (9, False, False), (10, False, True)):
        s = DataScanner(max_line_length=10)
        s._check(b"ab\r\n" + b"x" * content + (b"\r\n" if ended else b""))
        assert (s.long_line, s.bare_cr, s.bare_lf) == (long, False, False), (content, ended)


def _bare_and_long(raw: bytes, limit: int) -> tuple[bool, bool, bool]:
    """Byte by byte: a LF without its CR, a CR without its LF, a line (CR kept, LF not) of C{limit} or more."""
    bare_lf = any(b == 0x0A and (i == 0 or raw[i - 1] != 0x0D) for i, b in enumerate(raw))
    bare_cr = any(b == 0x0D and (i + 1 == len(raw) or raw[i + 1] != 0x0A) for i, b in enumerate(raw))
    long_line = any(len(piece) >= limit for piece in raw.split(b"\n"))
    return bare_lf, bare_cr, long_line


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"x" * 24, b"y" * 47, b"\n\r"]), max_size=40))
def test_check_finds_exactly_bare_line_ends_and_long_lines(parts: list[bytes]) -> None:
    """
    The whole-run checks (one C{splitlines}; counts only for a run with a
    bare CR or LF) give the same three verdicts as a byte-by-byte reading,
    for a BDAT message taken in one piece (its last line may lack its end).
    """
    raw = b"".join(parts)
    s = DataScanner(max_line_length=50)
    s.feed_raw(raw, last=True)
    assert (s.bare_lf, s.bare_cr, s.long_line) == _bare_and_long(raw, 50)
