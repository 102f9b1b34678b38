"""
DKIM signatures checked by an independent verifier (issue 13, "Must show"):
real OpenDKIM (Debian's C{opendkim}, test mode C{-t}) fetching the public keys
from a private NSD on loopback (L{harness.opendkim}).  The signer is dkimpy;
OpenDKIM shares no code with it.

 - The harness: messages signed directly with dkimpy (RSA-SHA256,
   Ed25519-SHA256, both), with keys made by C{cryptography}; each result is
   read per signature, and a tampered copy, a wrong key and a missing key
   make OpenDKIM fail, so these tests can fail.
 - End to end: keys made by C{relaynet dkim keygen} (a subprocess: the CLI
   path), the TXT records it printed published as printed, a real C{twistd
   -n relaynet} node signing at delivery, Postfix's C{smtp-sink} storing what
   it received (C{-d}; with C{-8} it withholds 8BITMIME), and OpenDKIM
   verifying the stored bytes: RSA only, Ed25519 only, dual, an 8-bit
   message converted to 7 bits before signing, a subdomain signed through
   the signing table, and unsigned mail (a From: domain without a key, a
   route with C{dkim = false}). Each signed case also shows a forged copy
   failing; the unsigned cases fail if anything signs.

Tests skip, with the reason, only when OpenDKIM, NSD or smtp-sink is not
installed (C{make peers} installs them).
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import stat
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from email.utils import formatdate
from pathlib import Path

import pytest

from harness.nodeproc import NodeProcess, relaynet_command, wait_for
from harness.opendkim import (
    OpenDKIMVerifier,
    Verification,
    ed25519_key,
    opendkim_algorithms,
    opendkim_unavailable_reason,
    rsa_key,
    txt_record,
)
from harness.peers import SMTP_SINK, SmtpSink, missing_binaries

try:
    from test_forwarding import (
        distinct_ports,
        events,
        hop,
        node_toml,
        open_session,
        route,
    )
except ImportError:  # tests/ became a package
    from tests.test_forwarding import (  # type: ignore[no-redef]
        distinct_ports,
        events,
        hop,
        node_toml,
        open_session,
        route,
    )

dkim = pytest.importorskip("dkim", reason="dkimpy is not installed (pip install dkimpy)")

pytestmark = pytest.mark.slow

_REASON = opendkim_unavailable_reason()
requires_opendkim = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

DOMAIN = "example.org"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <dkim-interop-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the figures are attached in spirit.\r\n"
    b".leading dot line\r\n"
)


class Keys:
    """One RSA-2048 and one Ed25519 key of C{example.org}, and the records that publish them."""

    def __init__(self) -> None:
        self.rsa_pem, self.rsa_txt = rsa_key(2048)
        self.ed_raw, self.ed_txt = ed25519_key()
        self.records = [txt_record(DOMAIN, "rsa1", self.rsa_txt), txt_record(DOMAIN, "ed1", self.ed_txt)]

    def sign_rsa(self, msg: bytes, selector: bytes = b"rsa1") -> bytes:
        sig: bytes = dkim.sign(msg, selector, DOMAIN.encode(), self.rsa_pem,
                               canonicalize=(b"relaxed", b"relaxed"))
        return sig + msg

    def sign_ed25519(self, msg: bytes, selector: bytes = b"ed1") -> bytes:
        sig: bytes = dkim.sign(msg, selector, DOMAIN.encode(), base64.b64encode(self.ed_raw),
                               canonicalize=(b"relaxed", b"relaxed"),
                               signature_algorithm=b"ed25519-sha256")
        return sig + msg

    def sign_both(self, msg: bytes) -> bytes:
        """Dual signing as a signer does it: Ed25519 first, then RSA over the same message."""
        return self.sign_rsa(self.sign_ed25519(msg))


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def verifier(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenDKIMVerifier]:
    if _REASON is not None:
        pytest.skip(_REASON)
    with OpenDKIMVerifier(tmp_path_factory.mktemp("opendkim"), keys.records) as v:
        yield v


def tamper_body(signed: bytes) -> bytes:
    out = signed.replace(b"attached in spirit", b"attached in spirit!")
    assert out != signed
    return out


def explain(v: Verification) -> str:
    return f"OpenDKIM said:\n{v.output}"


# -- the harness, against dkimpy directly ----------------------------------------------


@requires_opendkim
def test_opendkim_lists_ed25519() -> None:
    """Debian's OpenDKIM (2.11) was built with Ed25519-SHA256 (RFC 8463) as well as RSA-SHA256."""
    algorithms = opendkim_algorithms()
    assert "rsa-sha256" in algorithms
    assert "ed25519-sha256" in algorithms


@requires_opendkim
def test_rsa_signature_passes_and_tampered_copy_fails(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """An RSA-SHA256 signature by dkimpy passes OpenDKIM; the same message with one body byte changed fails."""
    signed = keys.sign_rsa(MESSAGE)
    good = verifier.verify(signed)
    assert good.results() == {(DOMAIN, "rsa1", "rsa-sha256", "pass")}, explain(good)
    assert good.all_pass
    assert good.result(DOMAIN, "rsa1").comment is not None
    assert "2048-bit key" in (good.result(DOMAIN, "rsa1").comment or "")

    bad = verifier.verify(tamper_body(signed))
    assert bad.results() == {(DOMAIN, "rsa1", "rsa-sha256", "fail")}, explain(bad)
    assert not bad.all_pass
    assert bad.result(DOMAIN, "rsa1").reason == "signature verification failed"


@requires_opendkim
def test_ed25519_signature_passes_and_tampered_copy_fails(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """An Ed25519-SHA256 signature (RFC 8463) by dkimpy passes OpenDKIM; a changed Subject makes it fail."""
    signed = keys.sign_ed25519(MESSAGE)
    good = verifier.verify(signed)
    assert good.results() == {(DOMAIN, "ed1", "ed25519-sha256", "pass")}, explain(good)

    bad = verifier.verify(signed.replace(b"Subject: quarterly figures", b"Subject: quarterly figurez"))
    assert bad.results() == {(DOMAIN, "ed1", "ed25519-sha256", "fail")}, explain(bad)


@requires_opendkim
def test_dual_signatures_both_pass_and_both_fail_when_tampered(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """A message signed with both keys gets one result per signature: both pass, and both fail once tampered."""
    signed = keys.sign_both(MESSAGE)
    good = verifier.verify(signed)
    assert good.results() == {
        (DOMAIN, "rsa1", "rsa-sha256", "pass"),
        (DOMAIN, "ed1", "ed25519-sha256", "pass"),
    }, explain(good)
    assert len(good.signatures) == 2

    bad = verifier.verify(tamper_body(signed))
    assert {(s.selector, s.result) for s in bad.signatures} == {("rsa1", "fail"), ("ed1", "fail")}, explain(bad)


@requires_opendkim
def test_lf_line_ends_as_stored_in_a_maildir_verify(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """A signed message stored with LF line ends (as Maildir delivery writes it) still verifies: OpenDKIM canonicalises to CRLF."""
    signed = keys.sign_both(MESSAGE).replace(b"\r\n", b"\n")
    v = verifier.verify(signed)
    assert v.all_pass and len(v.signatures) == 2, explain(v)


@requires_opendkim
def test_wrong_published_key_fails(keys: Keys, tmp_path: Path) -> None:
    """A signature checked against another key published under its selector fails, for each algorithm: the key really comes from our DNS."""
    other = Keys()
    with OpenDKIMVerifier(tmp_path / "other", other.records) as v:
        result = v.verify(keys.sign_both(MESSAGE))
    assert {(s.selector, s.result) for s in result.signatures} == {("rsa1", "fail"), ("ed1", "fail")}, explain(result)


@requires_opendkim
def test_key_missing_from_dns_fails_that_signature_only(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """A signature whose selector has no record fails ("key not found"); the other signature still passes."""
    signed = keys.sign_rsa(keys.sign_ed25519(MESSAGE, selector=b"ed-unpublished"))
    v = verifier.verify(signed)
    assert v.result(DOMAIN, "rsa1").result == "pass", explain(v)
    missing = v.result(DOMAIN, "ed-unpublished")
    assert missing.result != "pass"
    assert missing.reason is not None and "not found" in missing.reason, explain(v)


@requires_opendkim
def test_domain_outside_our_dns_is_a_dns_failure_not_a_lookup_elsewhere(keys: Keys, verifier: OpenDKIMVerifier) -> None:
    """A signing domain our NSD has no zone for gets no key (OpenDKIM's resolver asks only our NSD): no pass, a 4.7.5 reply."""
    sig: bytes = dkim.sign(MESSAGE, b"rsa1", b"example.com", keys.rsa_pem, canonicalize=(b"relaxed", b"relaxed"))
    v = verifier.verify(sig + MESSAGE)
    assert not any(s.passed for s in v.signatures), explain(v)
    assert v.reply is not None and v.reply[1] == "4.7.5", explain(v)


@requires_opendkim
def test_unsigned_message_is_reported_unsigned(verifier: OpenDKIMVerifier) -> None:
    """A message with no DKIM-Signature field gives no signature result and C{dkim=none}."""
    v = verifier.verify(MESSAGE)
    assert v.unsigned, explain(v)
    assert v.signatures == ()
    assert not v.all_pass


# -- end to end: relaynet signs, smtp-sink stores, OpenDKIM verifies ------------------


#: Bound on every wait for a delivery or an event.
TIMEOUT = 30.0
_SINK_REASON = f"smtp-sink is not installed ({SMTP_SINK}; Debian package postfix)" if missing_binaries([SMTP_SINK]) else None
requires_node_peers = pytest.mark.skipif(
    (_REASON or _SINK_REASON) is not None, reason=str(_REASON or _SINK_REASON))

#: The node's keys: (signing domain, selector, algorithm, --out given?).
NODE_KEYS = [
    ("rsa.example", "rsa1", "rsa", True),
    ("ed.example", "ed1", "ed25519", True),
    ("dual.example", "rsa2026", "rsa", False),  # keygen's default path: ./DOMAIN.SELECTOR.key
    ("dual.example", "ed2026", "ed25519", True),
]


def keygen(cwd: Path, domain: str, selector: str, algorithm: str, out: bool) -> tuple[str, Path]:
    """
    Run C{relaynet dkim keygen} in C{cwd}.

    @return: (the record line it printed on stdout, the key file).
    """
    path = cwd / f"{domain}.{selector}.key"
    args = [*relaynet_command(), "dkim", "keygen", domain, selector, "--algorithm", algorithm]
    if out:
        path = cwd / f"keys-{selector}-{domain}.pem"
        args += ["--out", path.name]
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"keygen printed {lines!r}"
    assert lines[0].startswith(f"{selector}._domainkey.{domain}. IN TXT \""), lines[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    return lines[0], path


class Lab:
    """
    One signing node and two smtp-sinks, and the verifier with the records keygen printed.

    Routes: C{sink.test} to C{sink} (8BITMIME offered), C{seven.test} to
    C{seven} (C{-8}: not offered), C{plain.test} to C{sink} with C{dkim = false}.

    @ivar records: C{{(domain, selector): record line as printed}}.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node_dir = base / "node"
        self.node_dir.mkdir(parents=True)
        self.records: dict[tuple[str, str], str] = {}
        key_tables = ["[dkim]", "sign = true", ""]
        for domain, selector, algorithm, out in NODE_KEYS:
            record, path = keygen(self.node_dir, domain, selector, algorithm, out)
            self.records[(domain, selector)] = record
            key_tables += ["[[dkim.keys]]", f'domain = "{domain}"', f'selector = "{selector}"',
                           f'key_file = "{path.name}"', ""]
        key_tables += ["[dkim.signing_table]", '"*.dual.example" = "dual.example"', ""]
        self.sink = SmtpSink(base / "sink", dump=True)
        self.seven = SmtpSink(base / "seven", dump=True, extra_args=["-8"])
        self.verifier = OpenDKIMVerifier(base / "opendkim", self.records.values())
        self.node: NodeProcess | None = None
        self.key_tables = "\n".join(key_tables)

    def start(self) -> None:
        self.sink.start()
        self.seven.start()
        self.verifier.start()
        (port,) = distinct_ports(1)
        routes = [
            route(["sink.test"], [hop(self.sink.port)]),
            route(["seven.test"], [hop(self.seven.port)]),
            route(["plain.test"], [hop(self.sink.port)], dkim=False),
            self.key_tables,
        ]
        text = node_toml("signer", port, routes=routes)
        self.node = NodeProcess(self.node_dir, config_toml=text, port=port, name="signer").start()

    def stop(self) -> None:
        if self.node is not None:
            self.node.__exit__(None, None, None)
        self.verifier.stop()
        self.seven.stop()
        self.sink.stop()

    def describe(self) -> str:
        if self.node is None:
            return ""
        return "--- node events:\n" + "\n".join(map(str, self.node.events())) + \
            f"\n--- node log:\n{self.node.log_tail(20)}"

    def relay(self, msg: bytes, rcpt: str, options: Sequence[str] = ()) -> tuple[bytes, str]:
        """
        Submit C{msg} to the node for C{rcpt} and wait until the sink behind
        the route has stored it and the node has logged it sent.

        @return: the bytes the sink stored (its C{X-*} and C{Received:}
            lines on top, LF line ends), and the node's queue id.
        """
        assert self.node is not None
        m = re.search(rb"^Message-ID: (<[^>]+>)", msg, re.MULTILINE | re.IGNORECASE)
        assert m is not None
        mid = m.group(1)
        with open_session(self.node.port) as s:
            code, resp = s.mail("sender@client.test", list(options))
            assert code == 250, (code, resp)
            code, resp = s.rcpt(rcpt)
            assert code == 250, (code, resp)
            code, resp = s.data(msg)
            assert code == 250, (code, resp)
        qid = re.search(rb"queued as ([0-9A-Za-z]+)", resp)
        assert qid is not None, resp
        queue_id = qid.group(1).decode()
        sink = self.seven if rcpt.endswith("@seven.test") else self.sink

        def stored() -> bytes | None:
            if not events(self.node, "sent", queue_id=queue_id):  # type: ignore[arg-type]
                return None
            for f in sink.dumped():
                data = f.read_bytes()
                if mid in data:
                    return data
            return None

        try:
            return wait_for(stored, TIMEOUT, f"{mid!r} sent and stored by {sink}"), queue_id
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None

    def dkim_events(self, queue_id: str) -> list[dict[str, object]]:
        """The node's C{dkim_signed} and C{dkim_unsigned} events about C{queue_id}."""
        assert self.node is not None
        return [e for e in events(self.node, queue_id=queue_id) if str(e["event"]).startswith("dkim_")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if (_REASON or _SINK_REASON) is not None:
        pytest.skip(str(_REASON or _SINK_REASON))
    lb = Lab(tmp_path_factory.mktemp("dkim-lab"))
    try:
        lb.start()
        yield lb
    finally:
        lb.stop()


def message(from_addr: str, rcpt: str, body: bytes | None = None, headers: bytes = b"") -> bytes:
    """A message with CRLF line ends, a fresh Message-ID and a dot line in its body."""
    tok = uuid.uuid4().hex[:16]
    if body is None:
        body = (f"token {tok}\r\n.a line starting with a dot\r\n\r\n"
                "\tindented, trailing blanks   \r\nlast line\r\n").encode()
    return (
        f"From: Sender <{from_addr}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: dkim interop {tok}\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        f"Message-ID: <{tok}@client.test>\r\n"
    ).encode() + headers + b"\r\n" + body


def forged(received: bytes) -> bytes:
    """C{received} with a line added at the end of its body."""
    return received + b"a line added by a forger\n"


def assert_tampered_fails(lab: Lab, received: bytes) -> None:
    """A copy of C{received} with its body changed fails every signature."""
    v = lab.verifier.verify(forged(received))
    assert v.signatures and not any(s.passed for s in v.signatures), explain(v)


def assert_signed_event(lab: Lab, queue_id: str, domain: str, selectors: list[str]) -> None:
    """The node logged one C{dkim_signed} event for C{queue_id}: C{domain}, C{selectors}."""
    (event,) = lab.dkim_events(queue_id)
    assert (event["event"], event["domain"], event["selectors"]) == ("dkim_signed", domain, selectors), event


def dkim_headers(received: bytes) -> list[str]:
    parsed = email.message_from_bytes(received, policy=email.policy.compat32)
    return [str(h) for h in parsed.get_all("DKIM-Signature", [])]


@requires_node_peers
def test_node_signs_with_rsa_key_from_keygen(lab: Lab) -> None:
    """A node with an RSA key from C{relaynet dkim keygen} signs relayed mail rsa-sha256, relaxed/relaxed; OpenDKIM passes it, not a forged copy."""
    received, qid = lab.relay(message("alice@rsa.example", "bob@sink.test"), "bob@sink.test")
    v = lab.verifier.verify(received)
    assert v.results() == {("rsa.example", "rsa1", "rsa-sha256", "pass")}, explain(v) + lab.describe()
    assert "2048-bit key" in (v.result("rsa.example", "rsa1").comment or "")
    assert_signed_event(lab, qid, "rsa.example", ["rsa1"])
    (sig,) = dkim_headers(received)
    assert re.search(r"c=relaxed/relaxed", sig), sig
    assert_tampered_fails(lab, received)


@requires_node_peers
def test_node_signs_with_ed25519_key_from_keygen(lab: Lab) -> None:
    """A node with only an Ed25519 key signs ed25519-sha256 (RFC 8463); OpenDKIM passes it, not a forged copy."""
    received, qid = lab.relay(message("alice@ed.example", "bob@sink.test"), "bob@sink.test")
    v = lab.verifier.verify(received)
    assert v.results() == {("ed.example", "ed1", "ed25519-sha256", "pass")}, explain(v) + lab.describe()
    assert_signed_event(lab, qid, "ed.example", ["ed1"])
    assert_tampered_fails(lab, received)


@requires_node_peers
def test_node_dual_signs_and_both_signatures_pass(lab: Lab) -> None:
    """With an RSA and an Ed25519 key for the From: domain, the node signs twice; OpenDKIM passes both, and a Subject: added later breaks both (over-signing)."""
    received, qid = lab.relay(message("alice@dual.example", "bob@sink.test"), "bob@sink.test")
    v = lab.verifier.verify(received)
    assert v.results() == {
        ("dual.example", "rsa2026", "rsa-sha256", "pass"),
        ("dual.example", "ed2026", "ed25519-sha256", "pass"),
    }, explain(v) + lab.describe()
    assert_tampered_fails(lab, received)
    # A second Subject: above the signatures (a field a verifier shows)
    # does not match the signed h= list, which names subject once more.
    added = re.sub(rb"(?m)^(DKIM-Signature:)", b"Subject: pay this invoice\n\\1", received, count=1)
    v2 = lab.verifier.verify(added)
    assert {(s.selector, s.result) for s in v2.signatures} == {("rsa2026", "fail"), ("ed2026", "fail")}, explain(v2)
    assert_signed_event(lab, qid, "dual.example", ["rsa2026", "ed2026"])


@requires_node_peers
def test_subdomain_signed_through_signing_table(lab: Lab) -> None:
    """C{[dkim.signing_table]} C{"*.dual.example" = "dual.example"}: mail From: a subdomain is signed with the parent's keys (d=dual.example)."""
    received, qid = lab.relay(message("news@news.dual.example", "bob@sink.test"), "bob@sink.test")
    v = lab.verifier.verify(received)
    assert v.all_pass and {s.domain for s in v.signatures} == {"dual.example"}, explain(v) + lab.describe()
    assert len(v.signatures) == 2
    assert_signed_event(lab, qid, "dual.example", ["rsa2026", "ed2026"])


EIGHT_BIT_TEXT = "Grüße aus Köln, naïve café — ✓\r\nZweite Zeile: äöü ß\r\n"


@requires_node_peers
def test_eight_bit_message_is_converted_then_signed(lab: Lab) -> None:
    """An 8-bit message relayed to a peer without 8BITMIME arrives 7-bit with its text intact, and both signatures (made after the conversion) pass."""
    body = EIGHT_BIT_TEXT.encode("utf-8")
    headers = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n")
    msg = message("alice@dual.example", "carol@seven.test", body=body, headers=headers)
    received, qid = lab.relay(msg, "carol@seven.test", ["BODY=8BITMIME"])
    assert max(received) < 0x80, "the peer got 8-bit bytes"
    parsed = email.message_from_bytes(received, policy=email.policy.compat32)
    assert parsed["Content-Transfer-Encoding"].strip().lower() in ("quoted-printable", "base64"), received[:800]
    text = parsed.get_payload(decode=True).decode("utf-8")
    assert text.replace("\r\n", "\n").rstrip("\n") == EIGHT_BIT_TEXT.replace("\r\n", "\n").rstrip("\n")
    v = lab.verifier.verify(received)
    assert v.results() == {
        ("dual.example", "rsa2026", "rsa-sha256", "pass"),
        ("dual.example", "ed2026", "ed25519-sha256", "pass"),
    }, explain(v) + lab.describe()
    assert_tampered_fails(lab, received)
    assert_signed_event(lab, qid, "dual.example", ["rsa2026", "ed2026"])


@requires_node_peers
def test_from_domain_without_key_goes_unsigned(lab: Lab) -> None:
    """Mail whose From: domain has no key goes out unsigned (OpenDKIM: dkim=none), with a C{dkim_unsigned} event naming the domain."""
    received, qid = lab.relay(message("dave@nokey.example", "bob@sink.test"), "bob@sink.test")
    assert dkim_headers(received) == []
    v = lab.verifier.verify(received)
    assert v.unsigned and v.signatures == (), explain(v)
    (event,) = lab.dkim_events(qid)
    assert (event["event"], event["from_domain"]) == ("dkim_unsigned", "nokey.example"), event


@requires_node_peers
def test_route_with_dkim_false_sends_unsigned(lab: Lab) -> None:
    """A route with C{dkim = false} sends unsigned even mail whose From: domain has keys."""
    received, qid = lab.relay(message("alice@dual.example", "bob@plain.test"), "bob@plain.test")
    assert dkim_headers(received) == []
    v = lab.verifier.verify(received)
    assert v.unsigned, explain(v)
    assert not [e for e in lab.dkim_events(qid) if e["event"] == "dkim_signed"]
