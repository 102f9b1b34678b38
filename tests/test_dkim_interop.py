"""
DKIM signatures checked by an independent verifier (issue 13, "Must show"):
real OpenDKIM (Debian's C{opendkim}, test mode C{-t}) fetching the public keys
from a private NSD on loopback (L{harness.opendkim}).  The signer is dkimpy;
OpenDKIM shares no code with it.

 - The harness: messages signed directly with dkimpy (RSA-SHA256,
   Ed25519-SHA256, both), with keys made by C{cryptography}; each result is
   read per signature, and a tampered copy, a wrong key and a missing key
   make OpenDKIM fail, so these tests can fail.

Tests skip, with the reason, only when OpenDKIM or NSD is not installed
(C{make peers} installs them).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.opendkim import (
    OpenDKIMVerifier,
    Verification,
    ed25519_key,
    opendkim_algorithms,
    opendkim_unavailable_reason,
    rsa_key,
    txt_record,
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
