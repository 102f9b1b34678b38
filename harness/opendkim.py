# -*- test-case-name: tests.test_dkim_interop -*-
"""
An independent DKIM verifier for tests: real OpenDKIM (Debian's C{opendkim})
reading the public keys we choose from a private DNS server.

relaynet signs with dkimpy; this module checks those signatures with code
that shares nothing with it: OpenDKIM's own library (C{libopendkim}, C, with
OpenSSL), in its test mode, C{opendkim -x CONF -t FILE} ("evaluate RFC5322
message in FILE and exit", opendkim(8)).

Where the keys come from: the real DNS path.  Debian builds libopendkim with
libunbound, and C{ResolverConfiguration} in opendkim.conf(5) names an
Unbound configuration file.  Ours has one C{forward-zone} for C{"."} whose
only forwarder is an NSD (L{harness.dns.NSDServer}) on a free loopback port
serving the TXT records the test publishes, with C{do-not-query-localhost:
no}.  So every key is fetched by OpenDKIM with a DNS query, over UDP, from a
real authoritative server; no key file, no port 53, no C{/etc/opendkim.conf}
(C{-x} names ours), no system service.  (opendkim.conf(5) also documents
C{TestPublicKeys} and C{TestDNSData} "for automated testing"; they bypass
DNS, which this module means not to.)  A name NSD has no zone for gets
REFUSED, which Unbound turns into SERVFAIL: OpenDKIM reports a DNS failure,
it never asks the Internet.

What OpenDKIM says: with C{-vv} test mode prints the header fields the milter
would add, among them one C{Authentication-Results:} (RFC 8601) with one
C{dkim=} result per signature (C{header.d}, C{header.s}, C{header.a},
C{header.b}, a C{reason} when it failed).  L{Verification} holds them,
parsed, one L{SignatureResult} per signature; C{AlwaysAddARHeader} makes an
unsigned message give C{dkim=none}.  A DNS failure (no answer) adds no
header field: test mode prints a C{SETREPLY} (451 4.7.5) instead, kept in
L{Verification.reply}.

Ed25519 (RFC 8463): OpenDKIM 2.11.0 as built by Debian lists
C{ed25519-sha256} among its algorithms (C{opendkim -V}) and verifies it
(C{k=ed25519} keys, the raw 32-byte public key base64 in C{p=}); only its
summary line says "0-bit key" for such a key, a cosmetic slip.

Part of the test harness (not shipped).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

from attrs import frozen

from harness.dns import DNSUnavailable, NSDServer, nsd_unavailable_reason, zone_text

OPENDKIM = "opendkim"
#: Seconds one C{opendkim -t} run may take (it takes about 20 ms here).
RUN_TIMEOUT = 30.0
#: Seconds OpenDKIM waits for a DNS answer (C{DNSTimeout}).
DNS_TIMEOUT = 5
#: Our C{authserv-id} in the C{Authentication-Results} it writes.
AUTHSERV_ID = "opendkim.relaynet.test"


class OpenDKIMError(RuntimeError):
    """OpenDKIM did not run as expected (bad configuration, crash, timeout)."""


def opendkim_binary() -> str | None:
    """The path of C{opendkim} (also looked for in C{/usr/sbin}, outside a non-root PATH)."""
    return shutil.which(OPENDKIM) or shutil.which(OPENDKIM, path="/usr/sbin:/usr/local/sbin")


def opendkim_unavailable_reason() -> str | None:
    """C{None} if OpenDKIM and NSD can run here, else why not (for C{pytest.mark.skipif})."""
    if opendkim_binary() is None:
        return "opendkim is not installed (Debian package opendkim; 'make peers' installs it)"
    return nsd_unavailable_reason()


def opendkim_algorithms() -> list[str]:
    """The signing algorithms C{opendkim -V} lists (e.g. C{rsa-sha256}, C{ed25519-sha256})."""
    binary = opendkim_binary()
    if binary is None:
        return []
    out = subprocess.run([binary, "-V"], check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT).stdout
    m = re.search(r"Supported signing algorithms:\n((?:\t\t.*\n)+)", out)
    return m.group(1).split() if m else []


# -- keys and records (with cryptography only: nothing from dkimpy) ----------------------


def rsa_key(bits: int = 2048) -> tuple[bytes, str]:
    """
    A fresh RSA key.

    @return: (the private key as PKCS#8 PEM, the TXT value to publish:
        C{v=DKIM1; k=rsa; p=BASE64(SubjectPublicKeyInfo DER)}).
    """
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    der = key.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def ed25519_key() -> tuple[bytes, str]:
    """
    A fresh Ed25519 key (RFC 8463).

    @return: (the raw 32-byte private key, the TXT value to publish:
        C{v=DKIM1; k=ed25519; p=BASE64(raw 32-byte public key)}).
    """
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return raw, f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode('ascii')}"


def txt_record(domain: str, selector: str, value: str) -> str:
    """
    The master-file line publishing C{value} at C{SELECTOR._domainkey.DOMAIN.}:
    C{value} split into quoted character-strings of at most 255 octets
    (RFC 1035 3.3.14; RFC 6376 3.6.2.2 joins them back).
    """
    if '"' in value or "\\" in value:
        raise ValueError(f"not a DKIM key record value: {value!r}")
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {parts}"


def _zone_of(record: str) -> str:
    """The zone a C{SELECTOR._domainkey.DOMAIN.} record goes in: C{DOMAIN}."""
    owner = record.split(None, 1)[0].lower()
    head, sep, domain = owner.partition("._domainkey.")
    if not (sep and head and owner.endswith(".")):
        raise ValueError(f"not an absolute SELECTOR._domainkey.DOMAIN. record: {record!r}")
    return domain.rstrip(".")


# -- results ------------------------------------------------------------------------------


@frozen
class SignatureResult:
    """
    OpenDKIM's verdict on one DKIM-Signature field, from its C{Authentication-Results}.

    @ivar result: C{pass}, C{fail}, C{neutral}, C{policy}, C{permerror}, C{temperror}.
    @ivar domain: C{header.d}, the signing domain.
    @ivar selector: C{header.s}.
    @ivar algorithm: C{header.a}, e.g. C{rsa-sha256} or C{ed25519-sha256}.
    @ivar identity: C{header.i}, or C{None}.
    @ivar b: C{header.b}, the first characters of the signature.
    @ivar reason: why it did not pass (e.g. C{signature verification
        failed}, C{key not found in DNS}), or C{None}.
    @ivar comment: OpenDKIM's comment, e.g. C{2048-bit key; unprotected}.
    """

    result: str
    domain: str
    selector: str
    algorithm: str
    identity: str | None
    b: str
    reason: str | None
    comment: str | None

    @property
    def passed(self) -> bool:
        return self.result == "pass"


@frozen
class Verification:
    """
    What one C{opendkim -t} run said about one message.

    @ivar signatures: one result per signature OpenDKIM evaluated, in the
        message's order; empty for an unsigned message and after a DNS failure.
    @ivar unsigned: OpenDKIM found no signature (C{dkim=none}).
    @ivar authentication_results: the field's value as OpenDKIM wrote it, or C{None}.
    @ivar reply: the SMTP reply the milter would give, C{(code, enhanced,
        text)}, e.g. C{("451", "4.7.5", "DKIM key retrieval failed")}, or C{None}.
    @ivar summary: OpenDKIM's one-line verdict on the message.
    @ivar output: everything it printed (for assertion messages).
    """

    signatures: tuple[SignatureResult, ...]
    unsigned: bool
    authentication_results: str | None
    reply: tuple[str, str, str] | None
    summary: str
    output: str

    @property
    def all_pass(self) -> bool:
        """At least one signature, and every one passed."""
        return bool(self.signatures) and all(s.passed for s in self.signatures)

    def result(self, domain: str, selector: str) -> SignatureResult:
        """
        The result for the signature by C{selector} of C{domain}.

        @raise KeyError: there is none (or more than one).
        """
        found = [s for s in self.signatures
                 if s.domain.lower() == domain.lower() and s.selector == selector]
        if len(found) != 1:
            raise KeyError(f"{len(found)} signatures with d={domain} s={selector}:\n{self.output}")
        return found[0]

    def results(self) -> set[tuple[str, str, str, str]]:
        """C{{(domain, selector, algorithm, result)}}, for compact assertions."""
        return {(s.domain.lower(), s.selector, s.algorithm, s.result) for s in self.signatures}


_INSHEADER = re.compile(
    r"^### (?:INS|ADD)HEADER: (?:idx=\d+ )?hname='Authentication-Results' hvalue='(.*?)'$",
    re.MULTILINE | re.DOTALL,
)
_SETREPLY = re.compile(r"^### SETREPLY: rcode='(.*?)' xcode='(.*?)' replytxt='(.*?)'$", re.MULTILINE)
_SUMMARY = re.compile(r"^opendkim: [^\n]*?: ((?:verification \(|message not signed)[^\n]*)$", re.MULTILINE)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """C{text} split at C{sep}, except inside double quotes or parentheses (RFC 5322 comments)."""
    parts: list[str] = []
    current: list[str] = []
    quoted, depth = False, 0
    for ch in text:
        if ch == '"' and depth == 0:
            quoted = not quoted
        elif ch == "(" and not quoted:
            depth += 1
        elif ch == ")" and not quoted and depth:
            depth -= 1
        if ch == sep and not quoted and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_dkim_resinfo(resinfo: str) -> SignatureResult:
    """One C{dkim=RESULT reason="..." (comment) header.d=... ...} clause."""
    comments = re.findall(r"\(([^()]*)\)", resinfo)
    bare = re.sub(r"\([^()]*\)", " ", resinfo)
    reason_m = re.search(r'\breason="([^"]*)"', bare)
    bare = re.sub(r'\breason="[^"]*"', " ", bare)
    props: dict[str, str] = {}
    result = ""
    for token in bare.split():
        key, sep, value = token.partition("=")
        if not sep:
            continue
        if key == "dkim":
            result = value.lower()
        else:
            props[key.lower()] = value
    return SignatureResult(
        result=result,
        domain=props.get("header.d", ""),
        selector=props.get("header.s", ""),
        algorithm=props.get("header.a", ""),
        identity=props.get("header.i"),
        b=props.get("header.b", ""),
        reason=reason_m.group(1) if reason_m else None,
        comment="; ".join(comments) or None,
    )


def parse_output(output: str) -> Verification:
    """
    Read what C{opendkim -vv -t FILE} printed for one message.

    @raise OpenDKIMError: it printed neither a verdict line nor an
        C{Authentication-Results} field nor a reply.
    """
    ar_m = _INSHEADER.search(output)
    reply_m = _SETREPLY.search(output)
    summary_m = _SUMMARY.search(output)
    if ar_m is None and reply_m is None and summary_m is None:
        raise OpenDKIMError(f"no verdict in OpenDKIM's output:\n{output}")
    signatures: list[SignatureResult] = []
    unsigned = False
    ar = ar_m.group(1) if ar_m else None
    if ar is not None:
        # authserv-id; resinfo; resinfo; ...
        for clause in _split_outside_quotes(ar, ";")[1:]:
            clause = " ".join(clause.split())
            if clause.startswith("dkim=none"):
                unsigned = True
            elif clause.startswith("dkim="):
                signatures.append(_parse_dkim_resinfo(clause))
    return Verification(
        signatures=tuple(signatures),
        unsigned=unsigned,
        authentication_results=ar,
        reply=(reply_m.group(1), reply_m.group(2), reply_m.group(3)) if reply_m else None,
        summary=summary_m.group(1) if summary_m else "",
        output=output,
    )


# -- the verifier -------------------------------------------------------------------------


class OpenDKIMVerifier:
    """
    OpenDKIM verifying messages against the DKIM key records we publish.

    A context manager: entering starts an L{NSDServer} on a free loopback
    port serving C{records} (one zone per signing domain) and writes an
    C{opendkim.conf} and an Unbound configuration pointing at it; leaving
    stops NSD.  Each L{verify} runs C{opendkim -t} once (a fresh process:
    no cache outlives it).

    @ivar dir: its directory (configs, zones, NSD's files, messages).
    @ivar nsd: the DNS server, once started.
    """

    def __init__(self, base_dir: Path | str, records: Iterable[str]) -> None:
        """
        @param records: master-file lines, each with an absolute owner
            C{SELECTOR._domainkey.DOMAIN.}, e.g. L{txt_record}'s, or the
            line C{relaynet dkim keygen} prints (one record per line).
        """
        self.dir = Path(base_dir).absolute()
        self.records = [r.strip() for r in records if r.strip()]
        if not self.records:
            raise ValueError("publish at least one key record")
        zones: dict[str, list[str]] = {}
        for r in self.records:
            zones.setdefault(_zone_of(r), []).append(r)
        self.zones: Mapping[str, str] = {z: zone_text(z, rs) for z, rs in zones.items()}
        self.nsd: NSDServer | None = None
        self._count = 0

    @property
    def conf_path(self) -> Path:
        return self.dir / "opendkim.conf"

    @property
    def unbound_conf_path(self) -> Path:
        return self.dir / "unbound.conf"

    def unbound_config_text(self, host: str, port: int) -> str:
        """Unbound (in libopendkim) forwarding every question to our NSD only."""
        return "\n".join([
            "server:",
            "    verbosity: 0",
            "    do-not-query-localhost: no",
            '    chroot: ""',
            '    username: ""',
            "    use-syslog: no",
            # Unbound answers names under the special-use domains of
            # RFC 6761 and RFC 8375 itself (NXDOMAIN): labs and tests use
            # .test, so those go to our NSD like the rest.
            *(f'    local-zone: "{zone}" nodefault' for zone in ("test.", "invalid.", "onion.", "home.arpa.")),
            "forward-zone:",
            '    name: "."',
            f"    forward-addr: {host}@{port}",
            "    forward-first: no",
        ]) + "\n"

    def config_text(self) -> str:
        """The private C{opendkim.conf}: verify only, keys through our resolver, no syslog."""
        return "\n".join([
            "Mode v",
            "Syslog no",
            "SoftwareHeader no",
            "AlwaysAddARHeader yes",
            f"AuthservID {AUTHSERV_ID}",
            f"DNSTimeout {DNS_TIMEOUT}",
            f"ResolverConfiguration {self.unbound_conf_path}",
            f"TemporaryDirectory {self.dir}",
        ]) + "\n"

    def start(self) -> Self:
        """
        Start NSD with the key records and write the configurations.

        @raise DNSUnavailable: NSD or OpenDKIM is not installed.
        """
        reason = opendkim_unavailable_reason()
        if reason is not None:
            raise DNSUnavailable(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nsd = NSDServer(self.dir / "nsd", self.zones).start()
        self.unbound_conf_path.write_text(self.unbound_config_text(self.nsd.host, self.nsd.port), encoding="utf-8")
        self.conf_path.write_text(self.config_text(), encoding="utf-8")
        return self

    def stop(self) -> None:
        """Stop NSD; safe to call more than once."""
        if self.nsd is not None:
            self.nsd.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def verify(self, message: bytes | Path) -> Verification:
        """
        Verify every DKIM signature of C{message} (its bytes as received,
        CRLF or LF line ends, or a file holding them).

        @raise OpenDKIMError: C{opendkim} failed to run or gave no verdict.
        """
        binary = opendkim_binary()
        if self.nsd is None or binary is None:
            raise OpenDKIMError("start the verifier first")
        if isinstance(message, Path):
            path = message
        else:
            self._count += 1
            path = self.dir / f"message-{self._count}.eml"
            path.write_bytes(message)
        try:
            proc = subprocess.run(
                [binary, "-x", str(self.conf_path), "-vv", "-t", str(path)],
                check=False, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=RUN_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            raise OpenDKIMError(f"opendkim -t {path} took more than {RUN_TIMEOUT}s") from e
        output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        if proc.returncode != 0:
            raise OpenDKIMError(f"opendkim -t {path} exited with {proc.returncode}:\n{output}")
        return parse_output(output)


def verify(message: bytes, records: Iterable[str], base_dir: Path | str | None = None) -> Verification:
    """
    One-shot: publish C{records}, verify C{message} with OpenDKIM, tear down.

    @param base_dir: where to put the files; a fresh temporary directory
        (removed afterwards) by default.
    """
    if base_dir is not None:
        with OpenDKIMVerifier(base_dir, records) as v:
            return v.verify(message)
    with tempfile.TemporaryDirectory(prefix="relaynet-opendkim-") as d, OpenDKIMVerifier(d, records) as v:
        return v.verify(message)


__all__ = [
    "AUTHSERV_ID",
    "OpenDKIMError",
    "OpenDKIMVerifier",
    "SignatureResult",
    "Verification",
    "ed25519_key",
    "opendkim_algorithms",
    "opendkim_binary",
    "opendkim_unavailable_reason",
    "parse_output",
    "rsa_key",
    "txt_record",
    "verify",
]
